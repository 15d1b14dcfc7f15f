"""Before/after evaluation of an unlearning run: probe recall by group and kind, perplexity, predictor similarity.

The JSON shape (one object per model) is stable so scripts can read it::

    {"forget": {"direct", "paraphrase", "adversarial"}, "neighbour": {...}, "retain": {...},
     "retain_perplexity": float, "fluency": {"forget", "retain"}, "leakage_auroc": float | null,
     "mia_auroc": float | null, "n_probes": {"forget", "neighbour", "retain"},
     "forget_floor": {"direct", "paraphrase", "adversarial"} | null, "answers": [...],
     "facts": {"forget": {...}, "neighbour": {...}, "retain": {...}, "forget_floor": {...} | null}}

``fluency`` is the share of answers that are not degenerate; ``leakage_auroc`` says how well the predictor's
similarity to the forgotten concepts separates forget texts from retain texts (1.0: perfectly); ``mia_auroc`` how
well the model's loss separates forget texts from texts about people it never saw (0.5: not at all, the goal);
``forget_floor`` what the model scores on the forget probes asked about people it never saw (the recall of knowing
nothing: forgetting cannot go below it on average). ``facts`` holds the same figures in fact recall
(`atu.evaluation.metrics.fact_recall`: the share of an answer's words, other than the question's and function
words, that the model's answer contains), whose floor is lower where answers repeat their question's frame.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from atu.concept_reader import ConceptReader
from atu.configs import FPR_SCOPES
from atu.evaluation.metrics import auroc, is_degenerate
from atu.evaluation.probes import answer_probes, mean_recall_by_kind, stand_in_probes
from atu.formats import ConceptSet, Probe
from atu.texts import perplexity, text_batches


def neighbour_names(concepts: ConceptSet, forget: Sequence[str]) -> list[str]:
    """Concepts linked to a forgotten one (and not forgotten themselves)."""
    forget_set = set(forget)
    out = []
    for name in forget:
        for n in concepts.get(name).neighbours:
            if n not in forget_set and n not in out and n in concepts.names():
                out.append(n)
    return out


@dataclass
class EvalInputs:
    """What `evaluate_model` scores a model on."""

    probes: Sequence[Probe]
    concepts: ConceptSet
    forget: Sequence[str]
    perplexity_texts: Sequence[str]  # held-out texts of retained concepts
    forget_texts: Sequence[str] = ()  # the forgotten concepts' own texts (membership inference, leakage AUROC)
    retain_texts: Sequence[str] = ()  # texts of retained concepts (leakage AUROC)
    unseen_texts: Sequence[str] = ()  # texts about concepts the model never saw (membership inference)
    stand_ins: Sequence[str] = ()  # names of people the model never saw (``forget_floor``)

    def without_floor(self) -> EvalInputs:
        """The same inputs without the stand-ins: the floor is a property of the data, measured once."""
        return replace(self, stand_ins=())


def evaluate_model(
    model, tokenizer, inputs: EvalInputs, *, guard: ConceptReader | None = None, progress: bool = False,
    max_new_tokens: int = 24,
) -> dict:  # fmt: skip
    """Probe recall for forgotten, neighbouring and other concepts, perplexity on held-out retain texts,
    fluency, and, given the texts, membership-inference AUROC and (with ``guard``) the predictor's leakage AUROC.
    With stand-ins (names of people the model never saw), also ``forget_floor``: the same forget probes asked about
    those people instead, scored against the forgotten person's answers: what knowing nothing about them already
    scores."""
    forget_texts, retain_texts, unseen_texts = inputs.forget_texts, inputs.retain_texts, inputs.unseen_texts
    out = _probe_scores(model, tokenizer, inputs, progress=progress, max_new_tokens=max_new_tokens)
    perplexity_texts = inputs.perplexity_texts
    out["retain_perplexity"] = (
        perplexity(model, text_batches(perplexity_texts, tokenizer)) if perplexity_texts else None
    )
    out["mia_auroc"] = None
    if forget_texts and unseen_texts:
        member = [-x for x in text_nll(model, tokenizer, forget_texts)]  # lower loss: more likely trained on
        out["mia_auroc"] = auroc(member, [-x for x in text_nll(model, tokenizer, unseen_texts)])
    out["leakage_auroc"] = None
    if guard is not None and forget_texts and retain_texts:
        out["leakage_auroc"] = auroc(
            guard.leakage(model, tokenizer, forget_texts), guard.leakage(model, tokenizer, retain_texts)
        )
    return out


def _probe_scores(model, tokenizer, inputs: EvalInputs, *, progress: bool, max_new_tokens: int) -> dict:
    """The probe part of `evaluate_model`: recall and fact recall by group and kind, the floors, fluency, answers."""
    forget_set = set(inputs.forget)
    neighbours = set(neighbour_names(inputs.concepts, inputs.forget))
    rows = answer_probes(model, tokenizer, list(inputs.probes), progress=progress, max_new_tokens=max_new_tokens)
    groups = {
        "forget": [r for r in rows if r["concept"] in forget_set],
        "neighbour": [r for r in rows if r["concept"] in neighbours],
        "retain": [r for r in rows if r["concept"] not in forget_set and r["concept"] not in neighbours],
    }
    out: dict = {g: mean_recall_by_kind(rs) for g, rs in groups.items()}
    out["facts"] = {g: mean_recall_by_kind(rs, "facts") for g, rs in groups.items()}
    out["n_probes"] = {g: len(rs) for g, rs in groups.items()}
    out["forget_floor"] = out["facts"]["forget_floor"] = None
    forgotten = [p for p in inputs.probes if p.concept in forget_set]
    stand_in = stand_in_probes(forgotten, inputs.concepts, inputs.stand_ins) if inputs.stand_ins else []
    if stand_in:
        # her name is in her own question, so her answer gets it for free: a stand-in's answer gets it too
        given = [p.concept for p in stand_in]
        floor = answer_probes(model, tokenizer, stand_in, given=given, max_new_tokens=max_new_tokens)
        out["forget_floor"] = mean_recall_by_kind(floor)
        out["facts"]["forget_floor"] = mean_recall_by_kind(floor, "facts")
    out["fluency"] = {
        g: (sum(not is_degenerate(r["prediction"]) for r in groups[g]) / len(groups[g]) if groups[g] else None)
        for g in ("forget", "retain")
    }
    keep = ("concept", "kind", "question", "prediction", "recall", "facts")
    out["answers"] = [{k: r[k] for k in keep} for r in groups["forget"]]
    return out


@torch.no_grad()
def text_nll(model, tokenizer, texts: Sequence[str], max_length: int = 256) -> list[float]:
    """Mean next-token NLL of each text (one number per text)."""
    device = next(model.parameters()).device
    out: list[float] = []
    for ids, attn in text_batches(texts, tokenizer, max_length):
        ids, attn = ids.to(device), attn.to(device)
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T-1)
        mask = attn[:, 1:].float()
        out += ((nll * mask).sum(1) / mask.sum(1).clamp(min=1)).tolist()
    return out


def fpr_thresholds(scores, fpr: float):
    """(N, C) scores of texts that must not be flagged -> (C,) thresholds that at most ``fpr`` of them exceed.

    Per concept, the smallest of the N scores such that the share of scores strictly above it is <= ``fpr`` (so
    the threshold is always one of the observed scores; ties never push the share over ``fpr``).
    """
    import numpy as np

    s = np.asarray(scores, dtype=np.float32)  # the index stores float32 thresholds: compare in float32
    if s.ndim != 2 or s.shape[0] == 0:
        raise ValueError(f"scores must have shape (N, C) with N >= 1, got {s.shape}.")
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr must be in (0, 1), got {fpr!r}.")
    n = s.shape[0]
    ordered = np.sort(s, axis=0)  # (N, C) ascending
    # Candidate k (0-based) leaves the scores strictly above ordered[k]; with distinct values that is n - 1 - k.
    k = int(np.ceil(n * (1.0 - fpr))) - 1
    k = min(max(k, 0), n - 1)
    thr = ordered[k].copy()
    for c in range(s.shape[1]):  # ties: move up until the share above is small enough
        while (s[:, c] > thr[c]).mean() > fpr:
            thr[c] = ordered[np.searchsorted(ordered[:, c], thr[c], side="right"), c]
    return thr.astype(np.float32)


def too_few_to_calibrate(n: int, fpr: float) -> bool:
    """Whether ``fpr`` of ``n`` texts is under one text: the thresholds can only be the highest scores seen."""
    return n * fpr < 1


def calibrated_thresholds(scores, fpr: float, scope: str):
    """``union_fpr_thresholds`` (scope "union") or ``fpr_thresholds`` ("concept") of ``scores``."""
    if scope not in FPR_SCOPES:
        raise ValueError(f"scope must be one of {FPR_SCOPES}, got {scope!r}.")
    return union_fpr_thresholds(scores, fpr) if scope == "union" else fpr_thresholds(scores, fpr)


def union_fpr_thresholds(scores, fpr: float):
    """(N, C) scores of texts that must not be flagged -> (C,) thresholds such that at most ``fpr`` of the texts
    score above the threshold of any concept: the share of clean traffic a guard over all C concepts flags, which
    per-concept thresholds at ``fpr`` each let grow with C.

    Every concept gets the same rank: the thresholds that leave at most j of its N scores above them, for the largest
    j whose union stays within ``fpr`` (j = 0, each concept's highest score, always does). One concept: the same as
    ``fpr_thresholds``."""
    import numpy as np

    s = np.asarray(scores, dtype=np.float32)
    fpr_thresholds(s, fpr)  # validates shapes and fpr
    n = s.shape[0]

    def at_rank(j: int):  # at most j of each concept's scores above (ties resolved as fpr_thresholds does)
        return fpr_thresholds(s, (j + 0.5) / n)

    lo, hi = 0, int(np.floor(n * fpr + 1e-9))  # the union of j per concept is at least j texts
    while lo < hi:  # the largest j within fpr: the union only grows with j
        mid = (lo + hi + 1) // 2
        if (s > at_rank(mid)).any(axis=1).mean() <= fpr:
            lo = mid
        else:
            hi = mid - 1
    return at_rank(lo)
