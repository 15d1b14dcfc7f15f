"""What the schedule measures on training-side data: the predictor's cosines per target row (to place thresholds
and to see whether a concept still stands out), and whether forgetting happened on texts the unlearning never
trained on (held-out texts about the forgotten concepts).

Nothing here reads evaluation probes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from atu.hidden import hidden_at
from atu.losses import concept_similarity
from atu.texts import content_mask, perplexity, token_nll, tokenize_texts
from atu.unlearn import ForgetBatch

# Held-out forget perplexity must rise this many points more than the retain perplexity for a run to count as
# having forgotten anything: a model that only drifts raises both alike.
FORGET_MARGIN = 0.10


@torch.no_grad()
def forget_cosines(
    model, predictor, batches: list[ForgetBatch], vectors: torch.Tensor, layer: int
) -> list[torch.Tensor]:
    """Per target row r, (N_r,) cosines at the content positions of the batches' texts about r's concept.
    ``vectors`` (R, D); each batch's ``concept_mask`` is (B, R)."""
    device = next(model.parameters()).device
    vectors = vectors.to(device)
    out: list[list[torch.Tensor]] = [[] for _ in range(vectors.shape[0])]
    for b in batches:
        ids, attn = b.input_ids.to(device), b.attention_mask.to(device)
        sim = concept_similarity(predictor(hidden_at(model, ids, attn, layer), attn), vectors).cpu()  # (B, T, R)
        for r in range(vectors.shape[0]):
            rows = b.concept_mask[:, r]  # (B,)
            out[r].append(sim[rows][b.position_mask[rows]][:, r])
    return [torch.cat(x) if x else torch.empty(0) for x in out]


@torch.no_grad()
def text_cosines(
    model, predictor, tokenizer, texts: list[str], vectors: torch.Tensor, layer: int, max_length: int, batch: int = 32
) -> torch.Tensor:
    """(M, R) cosines of every target row at every content position of ``texts``."""
    device = next(model.parameters()).device
    vectors = vectors.to(device)
    parts = []
    for i in range(0, len(texts), batch):
        ids, attn = tokenize_texts(texts[i : i + batch], tokenizer, max_length)
        mask = content_mask(ids, attn, tokenizer.bos_token_id)
        ids, attn = ids.to(device), attn.to(device)
        sim = concept_similarity(predictor(hidden_at(model, ids, attn, layer), attn), vectors).cpu()  # (B, T, R)
        parts.append(sim[mask])
    return torch.cat(parts) if parts else torch.empty(0, vectors.shape[0])


@dataclass
class HeldOut:
    """Held-out texts the schedule watches: forget texts it never trains on and retain texts."""

    forget: list[tuple[torch.Tensor, torch.Tensor]]  # token batches of held-out texts about forgotten concepts
    retain: list[tuple[torch.Tensor, torch.Tensor]]  # token batches of held-out retain texts (the stop signal's)
    retain_keep: list[torch.Tensor] | None = None  # per retain batch, the positions the budget reads (None: all)

    @classmethod
    def build(cls, forget_texts: list[str], retain_texts: list[str], tokenizer, max_length: int) -> HeldOut:
        def batches(texts):
            return [tokenize_texts(texts[i : i + 32], tokenizer, max_length) for i in range(0, len(texts), 32)]

        return cls(batches(forget_texts), batches(retain_texts))

    def keep_predictable(self, model, min_prob: float) -> float:
        """From now on the retain perplexity reads only the tokens ``model`` gives at least ``min_prob``: what it
        knows of the retained texts, not the tokens it cannot predict at all, whose perplexity a small change to
        the model moves either way. Returns the share of tokens kept; when it is 0, every token stays counted."""
        nll = token_nll(model, self.retain)
        keep = [(n <= -math.log(min_prob)) & attn[:, 1:].bool() for n, (_, attn) in zip(nll, self.retain)]
        kept = sum(int(k.sum()) for k in keep)
        self.retain_keep = keep if kept else None
        return kept / max(sum(int(attn[:, 1:].sum()) for _, attn in self.retain), 1)

    def retain_perplexity(self, model) -> float:
        return perplexity(model, self.retain, self.retain_keep)

    def forget_perplexity(self, model) -> float | None:
        """None when there are no held-out forget texts."""
        return perplexity(model, self.forget) if self.forget else None


def forgetting_verdict(forget_ppl_ratio: float | None, retain_ppl_ratio: float, stages_kept: int) -> tuple[bool, str]:
    """(failed, why): whether held-out texts about the forgotten concepts became harder for the model to predict
    than the retained ones. ``forget_ppl_ratio`` is None when there were no held-out forget texts."""
    if stages_kept == 0:
        return True, "no unlearning stage stayed within the retain budget: the model is unchanged"
    if forget_ppl_ratio is None:
        return False, "no held-out forget texts to measure forgetting on"
    gap = forget_ppl_ratio - retain_ppl_ratio
    if gap < FORGET_MARGIN:
        return True, (
            f"held-out forget perplexity rose {forget_ppl_ratio - 1:+.1%} against {retain_ppl_ratio - 1:+.1%} on "
            f"retain texts (needs {FORGET_MARGIN:.0%} more): the model still predicts the forgotten texts"
        )
    rose = f"held-out forget perplexity rose {forget_ppl_ratio - 1:+.1%}"
    return False, f"{rose} against {retain_ppl_ratio - 1:+.1%} on retain texts"
