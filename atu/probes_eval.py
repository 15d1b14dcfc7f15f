"""Probe scores: ROUGE-L recall of a model's greedy answers, per probe kind and per concept."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from atu.formats import PROBE_KINDS, ConceptSet, Probe
from atu.generation import generate_answers
from atu.metrics import rouge_l_recall


def answer_probes(model, tokenizer, probes: Sequence[Probe], **kwargs) -> list[dict]:
    """One row per probe: the probe's fields, the model's answer and its ROUGE-L recall."""
    answers = generate_answers(model, tokenizer, [p.question for p in probes], **kwargs)
    return [
        {
            "concept": p.concept,
            "kind": p.kind,
            "question": p.question,
            "answer": p.answer,
            "attribute": p.attribute,
            "prediction": a,
            "recall": rouge_l_recall(a, p.answer),
        }
        for p, a in zip(probes, answers)
    ]


def mean_recall_by_kind(rows: Sequence[dict]) -> dict[str, float | None]:
    """Mean recall for each probe kind (None for a kind with no probes)."""
    sums: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        sums[r["kind"]].append(r["recall"])
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
