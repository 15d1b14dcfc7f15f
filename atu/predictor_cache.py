"""The predictor run on a growing sequence: the rows of new positions from the cached keys and values of the earlier
ones, so that scoring a stream as it grows costs one predictor row per new token, not the whole prefix again.

The predictor is causal (``atu.predictor.EmbeddingPredictor``: pre-norm transformer layers under a causal mask), so
row ``t`` depends on positions ``0..t`` only: rows computed before stay exact when positions are added after them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from atu.texts import common_prefix


@dataclass
class PrefixState:
    """What the predictor computed for the first ``len(ids)`` positions of one sequence."""

    ids: list[int] = field(default_factory=list)  # the tokens those positions hold
    keys: list[torch.Tensor] = field(default_factory=list)  # per layer (heads, T, head_dim)
    values: list[torch.Tensor] = field(default_factory=list)  # per layer (heads, T, head_dim)
    rows: torch.Tensor | None = None  # (T, output_dim) the predictor's outputs

    def __len__(self) -> int:
        return len(self.ids)

    def common_prefix(self, ids: list[int]) -> int:
        """How many leading positions ``ids`` shares with the cached ones (their rows are reused as they are)."""
        return common_prefix(self.ids, ids)

    def cut(self, n: int) -> PrefixState:
        """The state of the first ``n`` positions."""
        return PrefixState(
            self.ids[:n],
            [k[:, :n] for k in self.keys],
            [v[:, :n] for v in self.values],
            None if self.rows is None else self.rows[:n],
        )

    def nbytes(self) -> int:
        tensors = [*self.keys, *self.values] + ([self.rows] if self.rows is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)


@torch.inference_mode()
def extend_batch(predictor, hidden: list[torch.Tensor], states: list[PrefixState], ids: list[list[int]]):
    """The predictor's rows for each sequence ``ids[b]`` whose layer states are ``hidden[b]`` (T_b, input_dim), from
    ``states[b]``, the cached computation of some start of it (its ``len(states[b])`` first positions, which must
    equal the first tokens of ``ids[b]``). Returns the states of the whole sequences; ``.rows`` (T_b, output_dim)
    equal (up to float rounding) ``predictor(hidden[b][None])[0]``, and only ``T_b - len(states[b])`` rows of each
    are computed, all sequences in one pass."""
    cfg = predictor.config
    for h, s, seq in zip(hidden, states, ids):
        if h.shape[0] != len(seq) or len(seq) > cfg.max_len or s.ids != list(seq[: len(s)]):
            raise ValueError("each hidden must have one row per id, within max_len, after a cached start of them")
    starts, totals = [len(s) for s in states], [len(seq) for seq in ids]
    news = [t - s for s, t in zip(starts, totals)]
    width, longest, batch = max(max(news), 1), max(totals), len(states)
    # The per-token layers run on the new positions packed flat, (M, .) with M = sum of the new counts, so that a
    # stream's first scoring (its whole prompt) pads no one else; only attention lays them out per sequence.
    where_b = torch.cat([torch.full((n,), b, dtype=torch.long) for b, n in enumerate(news)])  # (M,)
    where_t = torch.cat([torch.arange(n) for n in news])  # (M,) index among the sequence's new positions
    h = torch.cat([hidden[b][starts[b] :].float() for b in range(batch)])  # (M, input_dim)
    pos = torch.cat([torch.arange(starts[b], totals[b]) for b in range(batch)])
    h = h / h.norm(dim=-1, keepdim=True).clamp(min=1e-12) * math.sqrt(cfg.input_dim)  # as in forward
    dtype = predictor.proj_in.weight.dtype
    x = predictor.proj_in(h.to(dtype)) + predictor.pos_emb(pos)  # (M, d_model)
    start = torch.tensor(starts)
    # query t of sequence b sits at position starts[b] + t and sees keys 0..starts[b] + t
    allowed = torch.arange(longest)[None, None, :] <= (start[:, None] + torch.arange(width)[None, :])[..., None]
    out = [PrefixState(list(seq)) for seq in ids]
    for i, layer in enumerate(predictor.layers):
        attn, heads = layer.self_attn, layer.self_attn.num_heads
        e = x.shape[-1]
        d = e // heads
        qkv = torch.zeros((batch, width, 3 * e), dtype=x.dtype)
        qkv[where_b, where_t] = F.linear(layer.norm1(x), attn.in_proj_weight, attn.in_proj_bias)
        q, k, v = (t.reshape(batch, width, heads, d).transpose(1, 2) for t in qkv.chunk(3, dim=-1))  # (B, h, N, d)
        keys = torch.zeros((batch, heads, longest, d))
        values = torch.zeros((batch, heads, longest, d))
        for b in range(batch):
            if starts[b]:
                keys[b, :, : starts[b]], values[b, :, : starts[b]] = states[b].keys[i], states[b].values[i]
            keys[b, :, starts[b] : totals[b]] = k[b, :, : news[b]]
            values[b, :, starts[b] : totals[b]] = v[b, :, : news[b]]
            out[b].keys.append(keys[b, :, : totals[b]].clone())
            out[b].values.append(values[b, :, : totals[b]].clone())
        scores = (q @ keys.transpose(-1, -2)) / math.sqrt(d)  # (B, heads, N, L)
        weights = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(dim=-1)
        mixed = (weights @ values).transpose(1, 2).reshape(batch, width, e)[where_b, where_t]  # (M, E)
        x = x + attn.out_proj(mixed)
        x = x + layer.linear2(layer.activation(layer.linear1(layer.norm2(x))))
    rows = predictor.proj_out(predictor.norm(x))  # (M, output_dim)
    for b, new in enumerate(rows.split(news)):
        old = states[b].rows
        out[b].rows = new if old is None or starts[b] == 0 else torch.cat([old, new])
    return out
