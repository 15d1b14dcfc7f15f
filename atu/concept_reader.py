"""In memory, what an export's ``guard/`` reads texts with: the aligned predictor, the hook layer it reads and the
concept vectors. The scores that the evaluation, the guard's calibration and the run's reports take from texts are
its methods, so that they are computed one way."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from atu.hidden import hidden_at
from atu.losses import concept_similarity
from atu.texts import content_mask, text_batches


@dataclass
class ConceptReader:
    """The predictor at its hook layer, and the concepts it is compared with."""

    predictor: torch.nn.Module  # an EmbeddingPredictor
    layer: int  # the hook layer whose states it reads
    vectors: torch.Tensor  # (C, D) the concept vectors

    @classmethod
    def from_export(cls, export, rows: Sequence[int] | None = None) -> ConceptReader:
        """The reader of an ``atu.export.Export``: its predictor, hook layer and index vectors (``rows`` of them)."""
        vectors = torch.from_numpy(export.index.vectors())
        if rows is not None:
            vectors = vectors[list(rows)]
        return cls(export.predictor, export.guard.hook_layer, vectors)

    def _similarities(self, model, tokenizer, texts: Sequence[str], max_length: int):
        """Per batch of ``texts``: the cosine to each concept (B, T, C) and the positions to count (B, T)."""
        device = next(model.parameters()).device
        predictor = self.predictor.to(device)
        vectors = self.vectors.to(device).float()
        # The predictor's positions cover align.max_length (+ a margin); a longer text is cut there, as in alignment.
        max_length = min(max_length, predictor.config.max_len)
        for ids, attn in text_batches(texts, tokenizer, max_length):
            ids, attn = ids.to(device), attn.to(device)
            pred = predictor(hidden_at(model, ids, attn, self.layer), attn)
            yield concept_similarity(pred.float(), vectors), content_mask(ids, attn, tokenizer.bos_token_id)

    @torch.no_grad()
    def mean_similarity(self, model, tokenizer, texts: Sequence[str], max_length: int = 256) -> list[float]:
        """Mean cosine between the predictor's outputs on ``model``'s states and each concept vector over all tokens
        of ``texts`` (C,)."""
        total = torch.zeros(self.vectors.shape[0])
        count = 0
        for sim, mask in self._similarities(model, tokenizer, texts, max_length):
            sim = sim[mask]  # (N, C)
            total += sim.sum(0).cpu()
            count += sim.shape[0]
        return (total / max(count, 1)).tolist()

    @torch.no_grad()
    def concept_scores(self, model, tokenizer, texts: Sequence[str], max_length: int = 256) -> torch.Tensor:
        """(N, C): per text and concept, the highest cosine over the text's positions (what the guard scores)."""
        rows = [
            sim.masked_fill(~mask[..., None], -2.0).amax(1).cpu()  # (B, T, C) -> (B, C)
            for sim, mask in self._similarities(model, tokenizer, texts, max_length)
        ]
        return torch.cat(rows) if rows else torch.zeros(0, self.vectors.shape[0])

    def leakage(self, model, tokenizer, texts: Sequence[str], max_length: int = 256) -> list[float]:
        """Per text, the guard's score: the highest cosine to any concept over the text's positions."""
        scores = self.concept_scores(model, tokenizer, texts, max_length)
        return scores.amax(-1).tolist() if scores.shape[1] else [-2.0] * len(texts)
