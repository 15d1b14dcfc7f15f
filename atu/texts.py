"""Texts as a model's inputs: right-padded token batches, the positions that count, next-token loss and
perplexity. Training, the stopping signal and the evaluation all read texts this way."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


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


def lm_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over real tokens (full forward)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
    labels = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100)


def token_nll(model, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """Per batch, (B, T-1) next-token NLL of every position (0 at padding), on the CPU, the model in eval mode."""
    device = next(model.parameters()).device
    out = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for ids, attn in batches:
            ids, attn = ids.to(device), attn.to(device)
            logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1].float()
            nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            out.append((nll * attn[:, 1:]).cpu())
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
