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
        n = min(len(self.ids), len(ids))
        for i in range(n):
            if self.ids[i] != ids[i]:
                return i
        return n

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


def _attention(layer, x: torch.Tensor, state: PrefixState, i: int, start: int) -> torch.Tensor:
    """Layer ``i``'s self-attention of the new positions ``x`` (N, E) over the cached and new keys; the new keys and
    values are appended to ``state``."""
    attn = layer.self_attn
    heads = attn.num_heads
    n, width = x.shape
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)  # (N, E) each

    def split(t):  # (N, E) -> (heads, N, head_dim)
        return t.reshape(n, heads, width // heads).transpose(0, 1)

    q, k, v = split(q), split(k), split(v)
    if i < len(state.keys):
        state.keys[i] = torch.cat([state.keys[i], k], dim=1)
        state.values[i] = torch.cat([state.values[i], v], dim=1)
    else:
        state.keys.append(k)
        state.values.append(v)
    keys, values = state.keys[i], state.values[i]  # (heads, start + N, head_dim)
    # new position j (absolute start + j) sees keys 0..start + j
    allowed = torch.arange(keys.shape[1])[None, :] <= (start + torch.arange(n))[:, None]  # (N, start + N)
    scores = (q @ keys.transpose(1, 2)) / math.sqrt(width // heads)  # (heads, N, start + N)
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    out = (weights @ values).transpose(0, 1).reshape(n, width)  # (N, E)
    return attn.out_proj(out)


@torch.inference_mode()
def extend(predictor, hidden: torch.Tensor, state: PrefixState, ids: list[int]) -> PrefixState:
    """The predictor's rows for the sequence ``ids`` whose layer states are ``hidden`` (T, input_dim), from
    ``state``, the cached computation of some start of it (its ``len(state)`` first positions, which must equal the
    first tokens of ``ids``). Returns the state of the whole sequence; ``.rows`` (T, output_dim) are its outputs,
    equal (up to float rounding) to ``predictor(hidden[None])[0]``. Only ``T - len(state)`` rows are computed."""
    cfg = predictor.config
    start, total = len(state), len(ids)
    if hidden.shape[0] != total:
        raise ValueError(f"hidden has {hidden.shape[0]} rows for {total} ids.")
    if total > cfg.max_len:
        raise ValueError(f"Sequence length {total} exceeds the predictor's max_len {cfg.max_len}.")
    if state.ids != list(ids[:start]):
        raise ValueError("the cached state is not a start of these ids.")
    out = PrefixState(list(ids), list(state.keys), list(state.values), state.rows)
    if start == total:
        return out
    dtype = predictor.proj_in.weight.dtype
    h = hidden[start:].float()
    h = h / h.norm(dim=-1, keepdim=True).clamp(min=1e-12) * math.sqrt(cfg.input_dim)  # as in forward
    x = predictor.proj_in(h.to(dtype)) + predictor.pos_emb(torch.arange(start, total))  # (N, d_model)
    for i, layer in enumerate(predictor.layers):
        x = x + _attention(layer, layer.norm1(x), out, i, start)
        x = x + layer.linear2(layer.activation(layer.linear1(layer.norm2(x))))
    new_rows = predictor.proj_out(predictor.norm(x))  # (N, output_dim)
    out.rows = new_rows if state.rows is None or start == 0 else torch.cat([state.rows, new_rows])
    return out
