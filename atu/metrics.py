"""Answer-quality metrics as pure functions over strings."""

from __future__ import annotations

from functools import lru_cache

from rouge_score import rouge_scorer


@lru_cache(maxsize=1)
def _scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l_recall(prediction: str, reference: str) -> float:
    """ROUGE-L recall of ``reference`` in ``prediction`` (the share of the reference's words recovered, in order)."""
    if not reference.strip():
        raise ValueError("reference answer is empty")
    return float(_scorer().score(reference, prediction)["rougeL"].recall)
