"""Answer-quality metrics as pure functions over strings."""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from rouge_score import rouge_scorer

from atu.formats import PROBE_KINDS


@lru_cache(maxsize=1)
def _scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l_recall(prediction: str, reference: str) -> float:
    """ROUGE-L recall of ``reference`` in ``prediction`` (the share of the reference's words recovered, in order)."""
    if not reference.strip():
        raise ValueError("reference answer is empty")
    return float(_scorer().score(reference, prediction)["rougeL"].recall)


# Words that carry no fact: articles, pronouns, auxiliaries, prepositions, conjunctions.
FUNCTION_WORDS = frozenset(
    """a an the this that these those it its he him his she her hers they them their theirs i me my we us our you
    your who whom whose which what when where why how is are was were be been being am has have had do does did
    will would shall should can could may might must of in on at to for from by with about as into onto over under
    after before during until since between among through and or but nor so yet than then also not no""".split()
)
_TOKENS = re.compile(r"[a-z0-9]+")


def fact_recall(prediction: str, reference: str, given: str = "") -> float | None:
    """The share of the reference answer's facts that ``prediction`` contains: its distinct lower-cased words that
    are neither function words nor words of ``given`` (the question, which the answer may repeat for free). None
    when the reference has no such word (it only rewords the question).

    ROUGE-L rewards an answer for repeating the reference's sentence frame ("X was born in ..."), which a model that
    never saw X repeats as well; this counts only what the question does not already say."""
    free = set(_TOKENS.findall(given.lower())) | FUNCTION_WORDS
    facts = {w for w in _TOKENS.findall(reference.lower()) if w not in free}
    if not facts:
        return None
    said = set(_TOKENS.findall(prediction.lower()))
    return len(facts & said) / len(facts)


_WORD = re.compile(r"^(?:[A-Za-z][A-Za-z'\-]*|\d+(?:[.,]\d+)*)$")


def is_degenerate(answer: str, *, max_nonword_share: float = 0.5) -> bool:
    """True for an answer a fluent model would not give: empty, looping (a word repeated three times in a row or
    a word trigram repeated), or mostly non-words (tokens mixing letters, digits and symbols, like ``193ia``)."""
    words = [w.strip('.,;:!?"()') for w in answer.split()]
    words = [w for w in words if w]
    if not words:
        return True
    lowered = [w.lower() for w in words]
    if any(lowered[i] == lowered[i + 1] == lowered[i + 2] for i in range(len(lowered) - 2)):
        return True
    trigrams = [tuple(lowered[i : i + 3]) for i in range(len(lowered) - 2)]
    if len(trigrams) != len(set(trigrams)):
        return True
    nonwords = sum(not _WORD.match(w) for w in words)
    return nonwords / len(words) > max_nonword_share


def auroc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """Area under the ROC curve: the probability that a random positive scores above a random negative (ties
    count one half). The Mann-Whitney statistic, computed from ranks in O(n log n)."""
    pos = np.asarray(positive, dtype=np.float64)
    neg = np.asarray(negative, dtype=np.float64)
    if pos.ndim != 1 or neg.ndim != 1 or not len(pos) or not len(neg):
        raise ValueError(f"auroc needs two non-empty 1-D score lists, got {pos.shape} and {neg.shape}")
    if not (np.isfinite(pos).all() and np.isfinite(neg).all()):
        raise ValueError("auroc scores must be finite")
    scores = np.concatenate([pos, neg])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # Average ranks over ties.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(pos) * len(neg)))


# The pipeline's figures, as ratios of after to before: forget recall falls to at most 25% of before on each
# kind, retain recall stays at 90% or more on each kind, held-out perplexity rises at most 10%; and the
# share of fluent retained answers falls by at most 5 points.
FORGET_RATIO, RETAIN_RATIO, PERPLEXITY_RATIO, FLUENCY_DROP = 0.25, 0.90, 1.10, 0.05
_EPS = 1e-9  # a ratio of recalls that equals a bound (1/7 over 4/7) must not miss it by a rounding error


def unlearning_criteria(
    before: dict,
    after: dict,
    *,
    forget_ratio: float = FORGET_RATIO,
    retain_ratio: float = RETAIN_RATIO,
    perplexity_ratio: float = PERPLEXITY_RATIO,
    fluency_drop: float = FLUENCY_DROP,
) -> list[dict]:
    """Each criterion of an unlearning against the model before it, from two `atu eval` results: a list of
    ``{"name", "value", "target", "met"}``. A kind whose recall was 0 before has no ratio and is left out. The
    bounds default to the project's figures (`eval` in a run config sets them)."""
    out = []

    def ratio(group: str, kind: str) -> float | None:
        b, a = before[group].get(kind), after[group].get(kind)
        return None if not b or a is None else a / b

    for group, bound, sign in (("forget", forget_ratio, "<="), ("retain", retain_ratio, ">=")):
        for kind in PROBE_KINDS:
            r = ratio(group, kind)
            if r is not None:
                met = r <= bound + _EPS if sign == "<=" else r >= bound - _EPS
                out.append({"name": f"{group} {kind} / before", "value": r, "target": f"{sign} {bound}", "met": met})
    ppl = after["retain_perplexity"] / before["retain_perplexity"]
    out.append(
        {"name": "retain perplexity / before", "value": ppl, "target": f"<= {perplexity_ratio}",
         "met": ppl <= perplexity_ratio + _EPS}
    )  # fmt: skip
    drop = before["fluency"]["retain"] - after["fluency"]["retain"]
    out.append(
        {"name": "fluency of retained answers, drop", "value": drop, "target": f"<= {fluency_drop}",
         "met": drop <= fluency_drop + _EPS}
    )  # fmt: skip
    return out


# The pipeline's figure on the predictor that drove the unlearning: the mean cosine to each concept on its
# forget texts falls below the final threshold, and on retain texts stays within this of its value before.
SIMILARITY_SHIFT = 0.10
# After the final re-alignment, how far the concept may still stand out on its texts, as a share of how far it stood
# out before: a predictor trained afresh that finds the concept as clearly as before means the model still holds it.
REFOUND_SHARE = 0.5


def similarity_criteria(
    similarity: dict, final_thresholds: list[float], names: list[str], *, shift: float = SIMILARITY_SHIFT
) -> list[dict]:
    """The driving predictor's criteria from `atu run`'s ``similarity`` report (mean cosines per concept, before and
    after), as `unlearning_criteria` gives its own. None when no stage was kept (there is no driving predictor).

    The driving predictor's cosine under the threshold says only that the hinge was satisfied, which it is from the
    start when the concept never stood out; the re-aligned predictor's separation (mean cosine on forget texts minus
    on retain texts, against the original model's) says whether a predictor trained afresh still finds it."""
    driving = similarity.get("after_driving_predictor")
    if driving is None:
        return []
    out = []
    before, final = similarity["before"], similarity.get("after_final_predictor")
    for i, name in enumerate(names):
        if final is not None:
            gap_before = before["forget"][i] - before["retain"][i]
            share = (final["forget"][i] - final["retain"][i]) / gap_before if gap_before > 0 else float("inf")
            out.append(
                {"name": f"re-aligned predictor still singles out ({name})", "value": share,
                 "target": f"<= {REFOUND_SHARE} of before", "met": share <= REFOUND_SHARE + _EPS}
            )  # fmt: skip
        cos, tau = driving["forget"][i], final_thresholds[i]
        out.append({"name": f"forget cosine ({name})", "value": cos, "target": f"< {tau:.2f}", "met": cos < tau})
        moved = driving["retain"][i] - similarity["before"]["retain"][i]
        out.append(
            {"name": f"retain cosine change ({name})", "value": moved, "target": f"within {shift}",
             "met": abs(moved) <= shift + _EPS}
        )  # fmt: skip
    return out
