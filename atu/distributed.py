"""Data-parallel unlearning: one process per device, launched by ``torchrun`` or ``accelerate launch``.

Every process holds the whole model. Each unlearning step, every process takes a different forget batch (and retain
batch), and the gradients are averaged before the clip and the optimizer step, so the processes stay identical
and N processes take N batches a step. Alignment is sharded the same way: each process embeds every N-th distinct
window (the targets are gathered, so every process holds all of them), computes and caches the hook-layer states
of every N-th batch only, and trains on those, the predictor's gradients averaged at each step. Stopping decisions
are the first process's; only the first process writes files (metrics, checkpoints, the export) and evaluates.

A single process (no launcher) gets ``SINGLE``, whose collectives do nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from atu import envs

BUCKET_ELEMENTS = 1 << 25  # gradients are averaged in buckets of about this many elements


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    device: str | None = None  # the device of this process; None: a single process, the run's device setting

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def mean_grads_(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Average the gradients of ``params`` over the processes, in place (a missing gradient counts as zero)."""
        if not self.active:
            return
        params = list(params)
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        bucket, size = [], 0
        for p in params:
            bucket.append(p.grad)
            size += p.numel()
            if size >= BUCKET_ELEMENTS:
                self._mean_(bucket)
                bucket, size = [], 0
        if bucket:
            self._mean_(bucket)

    def _mean_(self, tensors: list[torch.Tensor]) -> None:
        flat = torch.cat([t.reshape(-1) for t in tensors])  # one collective for the bucket, not one per tensor
        torch.distributed.all_reduce(flat)
        flat /= self.world
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def shard(self, items: list) -> list:
        """This process's share of ``items``: every ``world``-th one, starting at its rank."""
        return items[self.rank :: self.world] if self.active else items

    def gather_shards(self, local: torch.Tensor, total: int) -> torch.Tensor:
        """The inverse of ``shard`` for the rows of a tensor: every process passes the rows it computed for its
        share of ``total`` items and gets all ``total`` rows back, in the items' order (on ``local``'s device)."""
        if not self.active:
            return local
        per = -(-total // self.world)  # the largest share; smaller ones are padded to it for the collective
        padded = torch.zeros((per, *local.shape[1:]), dtype=local.dtype, device=self.device)
        padded[: local.shape[0]] = local.to(self.device)
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        torch.distributed.all_gather(parts, padded)
        out = torch.empty((total, *local.shape[1:]), dtype=local.dtype, device=self.device)
        for rank, part in enumerate(parts):
            n = len(range(rank, total, self.world))
            out[rank :: self.world] = part[:n]
        return out.to(local.device)

    def sum(self, value: float) -> float:
        """The sum of ``value`` over the processes."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return float(t.item())

    def from_main(self, value: float) -> float:
        """The first process's ``value``, on every process (so that a decision is the same everywhere)."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.broadcast(t, src=0)
        return float(t.item())

    def broadcast_(self, tensors: Iterable[torch.Tensor]) -> None:
        """Overwrite ``tensors`` (parameters, buffers) on every process with the first process's values."""
        if not self.active:
            return
        with torch.no_grad():
            for t in tensors:
                torch.distributed.broadcast(t.data, src=0)

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """The first process runs the block (e.g. builds a cache entry) before the others do."""
        if not self.main:
            self.barrier()
        yield
        if self.main:
            self.barrier()

    def close(self, finished: bool = True) -> None:
        """Leave the process group. ``finished``: every process got here the same way, so they first wait for each
        other (a process whose peer has already closed its connections can abort on its way out under gloo,
        "terminate called without an active exception"); after an error, leave at once, never waiting on peers that
        may be inside another collective."""
        if self.active and torch.distributed.is_initialized():
            if finished:
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()


SINGLE = Dist()


def from_environment(device: str = "auto") -> Dist:
    """The process's place in a run started by torchrun or ``accelerate launch``; ``SINGLE`` without a launcher.

    Uses accelerate to join the process group (NCCL on GPUs, one per process; gloo on CPUs)."""
    if envs.world_size() <= 1:
        return SINGLE
    from accelerate import PartialState

    state = PartialState(cpu=device == "cpu")
    return Dist(rank=state.process_index, world=state.num_processes, device=str(state.device))
