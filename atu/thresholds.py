"""Where the unlearning thresholds go, placed from what the aligned predictor measures on the data.

An absolute schedule (the paper's tau = 0.9, 0.8, ... 0.2) assumes that a concept's cosine on its own texts starts
near 1 and that everything under some fixed value is harmless. Neither travels: on one corpus a name's cosine on
its texts never reaches 0.8, so stages at 0.9 and 0.8 push nothing; on another the texts of everyone else already
sit above the schedule's last thresholds, so pushing there wrecks them (docs/generality.md). The adaptive schedule
reads both ends off the data, per target row:

- start: the ``start_quantile`` of the row's cosines on the positions of its own forget texts (the top of what the
  unlearning has to push);
- floor: the ``floor_quantile`` of the row's cosines on retain positions (where the texts of everything that is
  kept already sit: below it, a forget position is no longer told apart from them, and pushing further only
  moves the model away from what it must keep), but never above the ``cap_quantile`` of the row's own forget
  cosines: where the top of the retain texts reaches the top of the concept's own (a name the encoder finds close
  to every other name, documents that share one template), the retain texts alone would leave nothing to push,
  so the stages push at least the upper part of the concept's own positions;

and the stages step down evenly from the start to the floor, the last stage at the floor.

Pure functions over tensors: tested against hand values without a model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Placement:
    """The measured ends of each target row and the thresholds placed between them."""

    start: torch.Tensor  # (R,) start_quantile of each row's cosines on its forget positions
    floor: torch.Tensor  # (R,) floor_quantile of each row's cosines on retain positions
    taus: torch.Tensor  # (S, R) the threshold of each row in each stage; taus[-1] == max(floor, ...) per row
    idle: torch.Tensor  # (R,) bool: the row's forget texts do not stand out (start <= floor + min_gap)


def quantile(values: torch.Tensor, q: float) -> float:
    """The ``q`` quantile of a 1-D tensor (linear interpolation); NaN for an empty tensor."""
    if values.ndim != 1:
        raise ValueError(f"values must be 1-D, got shape {tuple(values.shape)}")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    if values.numel() == 0:
        return float("nan")
    return float(torch.quantile(values.double(), q))


def place_thresholds(
    forget_cos: list[torch.Tensor],
    retain_cos: torch.Tensor,
    stages: int,
    start_quantile: float,
    floor_quantile: float,
    min_gap: float = 0.02,
    cap_quantile: float = 1.0,
) -> Placement:
    """Thresholds per stage and target row.

    ``forget_cos[r]``: (N_r,) cosines of row r at the positions of the forget texts about its concept.
    ``retain_cos``: (M, R) cosines of every row at retain positions.
    The floor is capped at the ``cap_quantile`` of the row's forget cosines (1.0: no cap). A row whose start is not
    above its floor by ``min_gap`` is idle: its threshold stays at the start in every
    stage, so it pushes only the positions above that quantile (the data gives nothing to push towards).
    """
    if stages < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")
    if retain_cos.ndim != 2 or retain_cos.shape[1] != len(forget_cos):
        raise ValueError(
            f"retain_cos must be (M, {len(forget_cos)}) to match forget_cos, got {tuple(retain_cos.shape)}"
        )
    if retain_cos.shape[0] == 0:
        raise ValueError("retain_cos has no positions: the floor needs retain texts")
    if any(f.numel() == 0 for f in forget_cos):
        raise ValueError("every row needs at least one forget position to place its start")
    start = torch.tensor([quantile(f.float(), start_quantile) for f in forget_cos])  # (R,)
    floor = torch.tensor([quantile(retain_cos[:, r].float(), floor_quantile) for r in range(len(forget_cos))])
    cap = torch.tensor([quantile(f.float(), cap_quantile) for f in forget_cos])
    floor = torch.minimum(floor, cap)
    idle = start <= floor + min_gap
    fraction = torch.arange(1, stages + 1, dtype=torch.float32)[:, None] / stages  # (S, 1)
    taus = start[None, :] - (start - floor)[None, :] * fraction  # (S, R)
    taus = torch.where(idle[None, :], start[None, :].expand_as(taus), taus)
    return Placement(start, floor, taus, idle)
