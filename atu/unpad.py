"""Running a right-padded batch as sub-batches of similar length.

A batch drawn at random from a corpus of short facts and long biographies is mostly padding: on the embedded world
a batch of 16 holds about 30% real tokens, and a forward pass costs the same for a pad as for a token. With right
padding and causal attention a row's real positions never see its padding, so each group of rows of similar length
can run cut to its own longest row and the outputs padded back: the same values at every real position (up to the
order of float sums), at a third of the work. Positions past a row's group width come back as zeros; every loss
here masks them out, as it does padding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

# One more forward call costs about as much as this many padded positions (Python and kernel launches): a group is
# split off only when it saves more padding than that.
CALL_COST = 32
_whole = False  # set by `whole_batches`


@contextmanager
def whole_batches() -> Iterator[None]:
    """Within the block `by_length` runs every batch whole, as padded (to compare the two ways)."""
    global _whole
    before, _whole = _whole, True
    try:
        yield
    finally:
        _whole = before


def length_groups(lengths: Sequence[int], call_cost: int = CALL_COST) -> list[list[int]]:
    """The rows of a batch split into groups, each run as one forward call cut to its longest row.

    Rows are sorted by length and cut into runs so that the padded positions of all groups plus ``call_cost`` per
    group is smallest (exact, by dynamic programming over the cuts). Groups come shortest first; each lists row
    indices in increasing length (ties in row order)."""
    if any(n < 0 for n in lengths) or call_cost < 0:
        raise ValueError(f"lengths and call_cost must be >= 0, got {list(lengths)} and {call_cost}")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    width = [lengths[i] for i in order]
    best = [0] + [None] * len(order)  # best[j]: cheapest cost of the first j sorted rows
    cut = [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        for i in range(j):
            cost = best[i] + (j - i) * width[j - 1] + call_cost
            if best[j] is None or cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(order)
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


def is_right_padded(attention_mask: torch.Tensor) -> bool:
    """Whether every row of a (B, T) mask is ones then zeros."""
    mask = attention_mask.bool()
    return bool((mask[:, 1:] <= mask[:, :-1]).all()) if mask.shape[1] > 1 else True


def by_length(
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    call_cost: int = CALL_COST,
) -> torch.Tensor:
    """``fn(input_ids, attention_mask)`` computed group by group (`length_groups`), each group cut to its longest row.

    ``fn`` maps a (b, t) batch to a (b, t', ...) tensor along its positions (t' = t, or t - 1 for next-token values)
    and must treat rows independently (a causal LM does). The result has the rows in their order, each group's time
    axis padded with zeros by as much as the group was cut, so that it spans the batch's full width.
    A batch that is not right-padded, or that one call serves best, goes to ``fn`` whole. Gradients flow to every
    group."""
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        shapes = f"{tuple(input_ids.shape)}, {tuple(attention_mask.shape)}"
        raise ValueError(f"expected (B, T) input_ids and attention_mask, got {shapes}")
    mask = attention_mask.detach().to("cpu", torch.bool)  # one copy to the host for both reads (a GPU syncs once)
    lengths = mask.sum(1).tolist()
    groups = length_groups(lengths, call_cost) if is_right_padded(mask) and not _whole else []
    if len(groups) <= 1 and (not groups or max(lengths) == input_ids.shape[1]):
        return fn(input_ids, attention_mask)
    full, outs = input_ids.shape[1], []
    for rows in groups:
        idx = torch.tensor(rows, device=input_ids.device)
        width = max(1, max(lengths[i] for i in rows))
        out = fn(input_ids[idx, :width], attention_mask[idx, :width])
        outs.append(F.pad(out, [0, 0] * (out.dim() - 2) + [0, full - width]))  # the time axis to full width
    order = torch.tensor([i for rows in groups for i in rows], device=input_ids.device)
    return torch.cat(outs)[torch.argsort(order)]
