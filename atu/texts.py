"""Texts as a model's inputs: right-padded token batches, the positions that count, next-token loss and
perplexity. Training, the stopping signal and the evaluation all read texts this way."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from atu.unpad import by_length


def tokenize_texts(texts: list[str], tokenizer, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask) without touching the tokenizer's settings."""
    ids = [tokenizer(t, truncation=True, max_length=max_length).input_ids for t in texts]
    width = max(len(i) for i in ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return input_ids, mask


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens the id lists ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def content_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, bos_token_id: int | None) -> torch.Tensor:
    """(B, T) bool: real tokens except BOS. BOS has one state for every text: pushing or scoring it says nothing
    about the text, and pushing it would harm all texts."""
    mask = attention_mask.bool()
    return mask & (input_ids != bos_token_id) if bos_token_id is not None else mask


def next_token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T-1) float32 log-likelihood of each next token of right-padded sequences: position t predicts token t+1,
    0 where that token is padding. ``logits`` (B, T, V), ``input_ids`` and ``attention_mask`` (B, T)."""
    if logits.dim() != 3 or logits.shape[:2] != input_ids.shape or input_ids.shape != attention_mask.shape:
        raise ValueError(
            f"expected logits (B, T, V) and input_ids, attention_mask (B, T), got {tuple(logits.shape)}, "
            f"{tuple(input_ids.shape)}, {tuple(attention_mask.shape)}"
        )
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return logp * attention_mask[:, 1:].to(logp.dtype)


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T-1) float32 log-probability the model gives each next token (position t predicts token t+1), 0 where
    that token is padding. The rows run in groups of similar length (`atu.unpad.by_length`), each reduced to its
    tokens' log-probabilities inside its group: no (B, T, V) logits over the padding are ever held."""

    def run(ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        return next_token_logprobs(model(input_ids=ids, attention_mask=attn, use_cache=False).logits, ids, attn)

    return by_length(run, input_ids, attention_mask)


def lm_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over real tokens (full forward)."""
    total = token_logprobs(model, input_ids, attention_mask).sum()
    return -total / attention_mask[:, 1:].sum().clamp(min=1)


def token_nll(model, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """Per batch, (B, T-1) next-token NLL of every position (0 at padding), on the CPU, the model in eval mode."""
    device = next(model.parameters()).device
    out = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for ids, attn in batches:
            out.append(-token_logprobs(model, ids.to(device), attn.to(device)).cpu())
    model.train(was_training)
    return out


def perplexity(model, batches: list[tuple[torch.Tensor, torch.Tensor]], keep: list | None = None) -> float:
    """Token-weighted perplexity over fixed batches (a validation or evaluation signal); ``keep``: per batch, (B, T-1)
    bool of the next-token positions that count (default: every real token)."""
    if keep is not None:
        nll = token_nll(model, batches)
        total = sum(float(n[k].sum()) for n, k in zip(nll, keep))
        return math.exp(total / max(sum(int(k.sum()) for k in keep), 1))
    device = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for ids, attn in batches:
            n = int(attn[:, 1:].sum())
            total += lm_loss(model, ids.to(device), attn.to(device)).item() * n
            count += n
    model.train(was_training)
    return math.exp(total / max(count, 1))


def text_batches(texts: Sequence[str], tokenizer, max_length: int = 256, batch_size: int = 32):
    """``tokenize_texts`` in batches of ``batch_size``."""
    return [
        tokenize_texts(list(texts[i : i + batch_size]), tokenizer, max_length)
        for i in range(0, len(texts), batch_size)
    ]
