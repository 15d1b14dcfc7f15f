"""Probe scores: ROUGE-L recall and fact recall of a model's greedy answers, per probe kind and per concept."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from atu.evaluation.metrics import fact_recall, rouge_l_recall
from atu.formats import PROBE_KINDS, ConceptSet, Probe
from atu.generation import generate_answers


def answer_probes(model, tokenizer, probes: Sequence[Probe], *, given: Sequence[str] | None = None, **kwargs):
    """One row per probe: the probe's fields, the model's answer, its ROUGE-L recall and its fact recall (None where
    the reference answer only rewords the question). ``given[i]``: more words probe ``i``'s answer gets for free
    besides its question's."""
    answers = generate_answers(model, tokenizer, [p.question for p in probes], **kwargs)
    given = given or [""] * len(probes)
    return [
        {
            "concept": p.concept,
            "kind": p.kind,
            "question": p.question,
            "answer": p.answer,
            "attribute": p.attribute,
            "prediction": a,
            "recall": rouge_l_recall(a, p.answer),
            "facts": fact_recall(a, p.answer, f"{p.question} {extra}"),
        }
        for p, a, extra in zip(probes, answers, given)
    ]


def mean_recall_by_kind(rows: Sequence[dict], key: str = "recall") -> dict[str, float | None]:
    """Mean of ``key`` (recall, or facts) for each probe kind, over the rows that have it (None for a kind with
    none)."""
    sums: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        if r.get(key) is not None:
            sums[r["kind"]].append(r[key])
    return {k: (sum(v) / len(v) if (v := sums.get(k)) else None) for k in PROBE_KINDS}


def stand_in_probes(probes: Sequence[Probe], concepts: ConceptSet, stand_ins: Sequence[str]) -> list[Probe]:
    """Each probe that names its concept, asked once about every stand-in (a person the model never saw) instead,
    with the original answer kept: how often a model that knows nothing of the person is right anyway (a common
    award, a frequent employer's first word). Probes that do not name their concept are left out."""
    out = []
    for p in probes:
        pattern = concepts.get(p.concept).surface_pattern()
        if not pattern.search(p.question):
            continue
        out.extend(
            Probe(p.concept, p.kind, pattern.sub(lambda _m, n=name: n, p.question), p.answer, p.attribute)
            for name in stand_ins
        )
    return out
