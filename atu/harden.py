"""Hardening against relearning: re-noise the unlearned model's decoder weights, distill it back on the retain texts.

ATU changes the model only until the predictor stops seeing the concept, so what it removed is hidden, not gone: a
few fine-tuning steps on some of a forgotten person's facts bring the others back. Hardening copies the unlearned
model (the teacher) into a student whose decoder-layer weight matrices are each mixed with noise of their own scale,
``w <- (1 - noise) * w + noise * std(w) * N(0, 1)``, and trains the student to match the teacher's next-token
distributions (KL) on the retain texts only, joined end to end into windows as language models are trained.
Behaviour the teacher shows on those texts is distilled back; what the teacher hides but still holds in its weights
is not in its outputs, so the noise removes it for good.

The student can only relearn what the distillation texts exercise: they must cover what the model has to keep
(on a model trained on more than the run's texts, give general text in ``data.retain``). The run reports the
held-out perplexity before and after, and warns when hardening raises it past the retain budget. It holds the
teacher, the student and Adam's two moments: four copies of the model's weights.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from atu.attack.quantize import quantizable_linears
from atu.configs import is_open_fraction
from atu.errors import ConfigError
from atu.progress import HeldOut
from atu.texts import text_batches


@dataclass
class HardenConfig:
    """Re-noise and distill after unlearning (off unless ``enabled``)."""

    # Harden the unlearned model against relearning (off by default: the distillation can only keep what the retain
    # texts exercise, and it costs about as many steps as the unlearning)
    enabled: bool = False
    # Share of each decoder-layer weight matrix replaced by Gaussian noise of the matrix's own standard deviation.
    # Below about half, what the unlearning hid survives in the kept share and comes back.
    noise: float = 0.6
    steps: int = 200  # distillation steps (Adam) on the retain texts
    lr: float = 1e-3  # peak learning rate: linear warm-up, cosine decay to a tenth
    warmup_steps: int = 20  # steps of linear warm-up of the learning rate
    batch_size: int = 32  # sequences per step
    max_length: int = 128  # tokens per sequence
    # Each sequence a window of the retain texts joined end to end (in shuffled passes), as language models are
    # trained: the teacher's behaviour across text boundaries is distilled too. False: one text per sequence, padded.
    pack: bool = True
    seed: int = 0  # the noise and the order of the texts

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"harden.enabled must be true or false, got {self.enabled!r}")
        if isinstance(self.noise, bool) or not isinstance(self.noise, (int, float)) or not 0 < self.noise <= 1:
            raise ConfigError(f"harden.noise must be a number in (0, 1], got {self.noise!r}")
        for name in ("steps", "batch_size", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"harden.{name} must be a positive int, got {value!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ConfigError(f"harden.warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if not is_open_fraction(self.lr):
            raise ConfigError(f"harden.lr must be a number in (0, 1), got {self.lr!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def renoise_(weight: torch.Tensor, noise: float, generator: torch.Generator) -> None:
    """In place: ``weight <- (1 - noise) * weight + noise * std(weight) * N(0, 1)`` (the draw on the CPU, so a seed
    gives the same noise on any device)."""
    draw = torch.randn(weight.shape, generator=generator, dtype=torch.float32).to(weight.device, weight.dtype)
    scale = weight.float().std()
    weight.mul_(1 - noise).add_(draw * (noise * scale).to(weight.dtype))


@torch.no_grad()
def renoised_copy(model, noise: float, seed: int):
    """A deep copy of ``model`` whose decoder-layer Linear weights are re-noised (`renoise_`); embeddings, norms and
    the LM head are kept as they are."""
    student = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    for _, linear in quantizable_linears(student):
        renoise_(linear.weight, noise, generator)
    return student


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the positions where ``mask`` is 1 of KL(teacher || student) between next-token distributions.
    Logits (B, T, V), mask (B, T)."""
    teacher_logp = F.log_softmax(teacher_logits.float(), dim=-1)
    student_logp = F.log_softmax(student_logits.float(), dim=-1)
    kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    mask = mask.to(kl.dtype)
    return (kl * mask).sum() / mask.sum().clamp(min=1.0)


def lr_factor(step: int, cfg: HardenConfig) -> float:
    """The learning rate's multiplier at ``step``: linear warm-up, then cosine decay from 1 to 0.1."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup_steps) / span))


class Sequences:
    """The distillation's batches from the retain texts, drawn in shuffled passes: packed windows (``cfg.pack``) or
    one text per row, padded."""

    def __init__(self, texts: Sequence[str], tokenizer, cfg: HardenConfig):
        if not texts:
            raise ConfigError("hardening distils on the retain texts, and the run has none (give data.retain)")
        self.texts, self.tokenizer, self.cfg = list(texts), tokenizer, cfg
        self.rng, self.queue = random.Random(cfg.seed), []
        end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.docs = [tokenizer(t)["input_ids"] + end for t in self.texts] if cfg.pack else None
        self.stream: list[int] = []

    def _take(self, n: int) -> list[int]:
        """The next ``n`` text indices of the shuffled passes."""
        while len(self.queue) < n:
            order = list(range(len(self.texts)))
            self.rng.shuffle(order)
            self.queue += order
        picked, self.queue = self.queue[:n], self.queue[n:]
        return picked

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) of one step, (batch_size, T)."""
        cfg = self.cfg
        if self.docs is None:
            picked = self._take(cfg.batch_size)
            return text_batches([self.texts[i] for i in picked], self.tokenizer, cfg.max_length, len(picked))[0]
        need = cfg.batch_size * cfg.max_length
        while len(self.stream) < need:
            self.stream += [tok for i in self._take(1) for tok in self.docs[i]]
        ids = torch.tensor(self.stream[:need], dtype=torch.long).view(cfg.batch_size, cfg.max_length)
        self.stream = self.stream[need:]
        return ids, torch.ones_like(ids)


def distill(student, teacher, tokenizer, texts: Sequence[str], cfg: HardenConfig, *, progress: bool = False) -> list:
    """Train every parameter of ``student`` for ``cfg.steps`` steps to match ``teacher`` on ``texts`` (`Sequences`);
    returns the loss of each step. Both are left in eval mode."""
    batches = Sequences(texts, tokenizer, cfg)
    device = next(student.parameters()).device
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr)
    teacher.eval()
    student.train()
    losses = []
    for step in tqdm(range(cfg.steps), desc="hardening", disable=not progress, unit="step"):
        ids, attn = (x.to(device) for x in batches.next())
        with torch.no_grad():
            target = teacher(input_ids=ids, attention_mask=attn).logits[:, :-1]
        logits = student(input_ids=ids, attention_mask=attn).logits[:, :-1]
        loss = distill_loss(logits, target, attn[:, 1:])
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    student.eval()
    return [float(x) for x in losses]


def harden(
    model, tokenizer, texts: Sequence[str], cfg: HardenConfig, *, held: HeldOut | None = None, progress: bool = False
) -> tuple[torch.nn.Module, dict]:
    """(the hardened copy of ``model``, a record of the hardening): `renoised_copy` distilled from ``model`` on
    ``texts``. ``held`` (held-out texts, never trained on, read as the schedule's retain budget reads them) gives
    the record's retain and forget perplexity before and after."""
    t0 = time.time()
    student = renoised_copy(model, cfg.noise, cfg.seed).requires_grad_(True)
    losses = distill(student, model, tokenizer, texts, cfg, progress=progress)  # the teacher runs without grad
    student.requires_grad_(False)
    record = {**cfg.to_dict(), "texts": len(texts), "loss_first": losses[0], "loss_last": losses[-1]}
    if held is not None and held.retain:
        before, after = held.retain_perplexity(model), held.retain_perplexity(student)
        record.update(check_ppl_before=before, check_ppl_after=after, check_ppl_rise=after / before - 1)
    if held is not None and held.forget:
        record.update(
            forget_ppl_before=held.forget_perplexity(model), forget_ppl_after=held.forget_perplexity(student)
        )
    record["seconds"] = round(time.time() - t0, 1)
    return student, record
