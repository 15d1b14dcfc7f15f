"""Before/after evaluation of an unlearning run: probe recall by group and kind, perplexity, predictor similarity.

The JSON shape (one object per model) is stable so scripts can read it::

    {"forget": {"direct", "paraphrase", "adversarial"}, "neighbour": {...}, "retain": {...},
     "retain_perplexity": float, "n_probes": {"forget", "neighbour", "retain"}}
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from atu.formats import ConceptSet, Probe
from atu.hidden import hidden_at
from atu.losses import concept_similarity
from atu.probes_eval import answer_probes, mean_recall_by_kind
from atu.unlearn import perplexity, tokenize_texts


def neighbour_names(concepts: ConceptSet, forget: Sequence[str]) -> list[str]:
    """Concepts linked to a forgotten one (and not forgotten themselves)."""
    forget_set = set(forget)
    out = []
    for name in forget:
        for n in concepts.get(name).neighbours:
            if n not in forget_set and n not in out and n in concepts.names():
                out.append(n)
    return out


def text_batches(texts: Sequence[str], tokenizer, max_length: int = 256, batch_size: int = 32):
    return [
        tokenize_texts(list(texts[i : i + batch_size]), tokenizer, max_length)
        for i in range(0, len(texts), batch_size)
    ]


def evaluate_model(
    model,
    tokenizer,
    probes: Sequence[Probe],
    concepts: ConceptSet,
    forget: Sequence[str],
    perplexity_texts: Sequence[str],
    *,
    progress: bool = False,
) -> dict:
    """Probe recall for forgotten, neighbouring and other concepts, and perplexity on held-out retain texts."""
    forget_set = set(forget)
    neighbours = set(neighbour_names(concepts, forget))
    rows = answer_probes(model, tokenizer, list(probes), progress=progress)
    groups = {
        "forget": [r for r in rows if r["concept"] in forget_set],
        "neighbour": [r for r in rows if r["concept"] in neighbours],
        "retain": [r for r in rows if r["concept"] not in forget_set and r["concept"] not in neighbours],
    }
    out: dict = {g: mean_recall_by_kind(rs) for g, rs in groups.items()}
    out["n_probes"] = {g: len(rs) for g, rs in groups.items()}
    out["retain_perplexity"] = (
        perplexity(model, text_batches(perplexity_texts, tokenizer)) if perplexity_texts else None
    )
    out["answers"] = [
        {k: r[k] for k in ("concept", "kind", "question", "prediction", "recall")} for r in groups["forget"]
    ]
    return out


@torch.no_grad()
def mean_similarity(
    model, predictor, tokenizer, texts: Sequence[str], vectors: torch.Tensor, layer: int, max_length: int = 256
) -> list[float]:
    """Mean cosine between the predictor's outputs and each concept vector over all tokens of ``texts`` (C,)."""
    device = next(model.parameters()).device
    total = torch.zeros(vectors.shape[0])
    count = 0
    for ids, attn in text_batches(texts, tokenizer, max_length):
        ids, attn = ids.to(device), attn.to(device)
        pred = predictor.to(device)(hidden_at(model, ids, attn, layer), attn)
        mask = attn.bool()
        if tokenizer.bos_token_id is not None:
            mask &= ids != tokenizer.bos_token_id
        sim = concept_similarity(pred.float(), vectors.to(device).float())[mask]  # (N, C)
        total += sim.sum(0).cpu()
        count += sim.shape[0]
    return (total / max(count, 1)).tolist()
