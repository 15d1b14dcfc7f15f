"""Alignment: train the embedding predictor E to map layer-L hidden states to the encoder's embedding of the
next ``k`` encoder tokens, with the LM frozen.

Both inputs of the loss are fixed while E trains, so they are computed once: the window targets once per
dataset (each distinct window embedded once), the layer-L states once per model state (again after every
unlearning stage, since the LM has changed). Training then runs on cached tensors only.

Across processes (torchrun, ``accelerate launch``) the work is sharded: each process embeds every N-th window and
caches the states of every N-th batch (``Dist.shard``), and the predictor's gradients are averaged at every step.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from atu.configs import dataclass_from_dict
from atu.distributed import SINGLE, Dist
from atu.errors import ConfigError
from atu.hidden import hidden_at
from atu.losses import alignment_loss, cosine_to_targets
from atu.predictor import EmbeddingPredictor, PredictorConfig
from atu.windows import build_windows

logger = logging.getLogger(__name__)


@dataclass
class AlignConfig:
    """How the predictor is built and aligned."""

    hook_layer: int | None = None  # decoder layers applied before E reads the states; None: the middle layer
    window: int = 8  # k: encoder tokens in each future window (paper: 8)
    max_length: int = 256  # LM tokens per text (longer texts are truncated)
    d_model: int = 128  # predictor width
    n_layers: int = 2  # predictor depth
    n_heads: int = 4
    epochs: int = 20  # initial alignment epochs over the cached states
    realign_epochs: int = 5  # epochs of each re-alignment after an unlearning stage
    batch_size: int = 32
    lr: float = 1e-3  # learning rate of the predictor (Adam)
    val_fraction: float = 0.1  # texts held out to report held-out cosine
    encode_batch_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.hook_layer is not None and (isinstance(self.hook_layer, bool) or self.hook_layer < 1):
            raise ConfigError(f"align.hook_layer must be >= 1 or null (middle layer), got {self.hook_layer!r}")
        for name in ("window", "max_length", "d_model", "n_layers", "n_heads", "batch_size", "encode_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"align.{name} must be >= 1, got {getattr(self, name)}")
        if self.epochs < 0 or self.realign_epochs < 0:
            raise ConfigError(
                f"align.epochs and align.realign_epochs must be >= 0, got {self.epochs}, {self.realign_epochs}"
            )
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"align.val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0 < self.lr < 1:
            raise ConfigError(f"align.lr must be in (0, 1), got {self.lr}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AlignConfig:
        return dataclass_from_dict(cls, data, "align")

    def resolve_layer(self, num_layers: int) -> int:
        layer = self.hook_layer if self.hook_layer is not None else max(1, num_layers // 2)
        if layer > num_layers:
            raise ConfigError(
                f"align.hook_layer is {layer} but the model has {num_layers} layers; use 1..{num_layers}"
            )
        return layer


@dataclass
class TextBatch:
    """One fixed batch of texts (right-padded) with, per position, the row of its window target (-1: none)."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    target_index: torch.Tensor  # (B, T) into AlignmentData.targets, -1 where masked


@dataclass
class AlignmentData:
    train: list[TextBatch]
    val: list[TextBatch]
    targets: torch.Tensor  # (W, D) L2-normalised encoder embeddings of the distinct windows

    @property
    def n_windows(self) -> int:
        return self.targets.shape[0]


def _batches(texts: list[str], tokenizer, enc_tokenizer, cfg: AlignConfig, window_ids: dict[str, int]):
    # Sort by length so batches carry little padding; the batch order is shuffled at training time.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = []
    for start in range(0, len(order), cfg.batch_size):
        chunk = [texts[i] for i in order[start : start + cfg.batch_size]]
        wb = build_windows(chunk, tokenizer, enc_tokenizer, cfg.window, cfg.max_length)
        local_to_global = torch.tensor([window_ids.setdefault(w, len(window_ids)) for w in wb.window_texts] + [-1])
        target_index = local_to_global[wb.window_index]  # -1 stays -1 through the appended sentinel
        out.append(TextBatch(wb.input_ids, wb.attention_mask, target_index))
    return out


@torch.no_grad()
def encode_texts(encoder, texts: list[str], batch_size: int = 256, progress: bool = False) -> torch.Tensor:
    """L2-normalised sentence embeddings, (N, D) float32 on CPU."""
    emb = encoder.encode(
        texts, batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=progress
    )
    return emb.float().cpu()


def prepare_alignment(
    texts: list[str], tokenizer, encoder, cfg: AlignConfig, *, progress: bool = True, dist: Dist = SINGLE
) -> AlignmentData:
    """Tokenise ``texts``, find every position's future window and embed each distinct window once (across
    processes: each embeds its share of the windows, and every process gets all the targets)."""
    if not texts:
        raise ConfigError("no alignment texts: alignment needs a corpus")
    rng = random.Random(cfg.seed)
    idx = list(range(len(texts)))
    rng.shuffle(idx)
    n_val = int(len(texts) * cfg.val_fraction) if len(texts) >= 10 else 0
    val_texts = [texts[i] for i in idx[:n_val]]
    train_texts = [texts[i] for i in idx[n_val:]]
    window_ids: dict[str, int] = {}
    enc_tok = encoder.tokenizer
    train = _batches(train_texts, tokenizer, enc_tok, cfg, window_ids)
    val = _batches(val_texts, tokenizer, enc_tok, cfg, window_ids) if val_texts else []
    windows = sorted(window_ids, key=window_ids.get)
    logger.info("embedding %d distinct windows of %d texts", len(windows), len(texts))
    mine = dist.shard(windows)
    if mine:
        local = encode_texts(encoder, mine, cfg.encode_batch_size, progress)
    else:  # more processes than windows
        local = torch.zeros(0, encoder.get_embedding_dimension())
    return AlignmentData(train, val, dist.gather_shards(local, len(windows)))


@torch.no_grad()
def compute_hidden(model, batches: list[TextBatch], layer: int) -> list[torch.Tensor]:
    """Layer-``layer`` states of every batch, float32 on CPU (the LM is frozen during alignment)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = [hidden_at(model, b.input_ids.to(device), b.attention_mask.to(device), layer).float().cpu() for b in batches]
    model.train(was_training)
    return out


def alignment_hidden(
    model, data: AlignmentData, layer: int, dist: Dist = SINGLE
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The layer-``layer`` states `train_predictor` reads: of this process's share (`Dist.shard`) of the training
    batches, and of the held-out ones."""
    return compute_hidden(model, dist.shard(data.train), layer), compute_hidden(model, dist.shard(data.val), layer)


def new_predictor(cfg: AlignConfig, hidden_size: int, embedding_dim: int) -> EmbeddingPredictor:
    torch.manual_seed(cfg.seed)
    return EmbeddingPredictor(
        PredictorConfig(hidden_size, embedding_dim, cfg.d_model, cfg.n_layers, cfg.n_heads, max_len=cfg.max_length + 8)
    )


@torch.no_grad()
def mean_cosine(
    predictor: EmbeddingPredictor,
    hidden: list[torch.Tensor],
    batches: list[TextBatch],
    targets: torch.Tensor,
    dist: Dist = SINGLE,
) -> float:
    """Mean cosine between predictions and window targets over all target positions (of every process's
    ``batches``, each process passing its share and the states it computed for them)."""
    total, count = 0.0, 0
    device = next(predictor.parameters()).device
    for h, b in zip(hidden, batches):
        mask = b.target_index >= 0
        if not mask.any():
            continue
        pred = predictor(h.to(device), b.attention_mask.to(device))
        tgt = targets[b.target_index.clamp(min=0)].to(device)
        cos = cosine_to_targets(pred, tgt)[mask.to(device)]
        total += cos.sum().item()
        count += cos.numel()
    return dist.sum(total) / max(dist.sum(count), 1)


def _shares(data: AlignmentData, train_hidden: list[torch.Tensor], epochs: int, dist: Dist):
    """This process's (training, held-out) batches, checked against the states cached for them."""
    if epochs and len(data.train) < dist.world:
        raise ConfigError(
            f"{len(data.train)} alignment batches for {dist.world} processes: use fewer processes or a smaller "
            "align.batch_size"
        )
    train, val = dist.shard(data.train), dist.shard(data.val)
    if len(train_hidden) != len(train):
        raise ValueError(f"{len(train_hidden)} cached states for this process's {len(train)} training batches")
    return train, val


def train_predictor(
    predictor: EmbeddingPredictor,
    data: AlignmentData,
    train_hidden: list[torch.Tensor],
    epochs: int,
    cfg: AlignConfig,
    *,
    val_hidden: list[torch.Tensor] | None = None,
    progress: bool | str = True,
    dist: Dist = SINGLE,
) -> dict[str, float]:
    """Adam on ``1 - cos`` over the cached states; returns train and held-out mean cosine.

    ``progress``: False hides the progress bar; a str is the bar's label (True: "aligning").

    ``train_hidden`` (and ``val_hidden``) are the states of this process's share of the batches,
    ``dist.shard(data.train)``. Every step each process takes one of its batches and the gradients are averaged, so
    an epoch is as many steps as the largest share has batches (a smaller share repeats one batch)."""
    device = next(predictor.parameters()).device
    train, val = _shares(data, train_hidden, epochs, dist)
    opt = torch.optim.Adam(predictor.parameters(), lr=cfg.lr)
    rng = random.Random(cfg.seed + dist.rank)
    predictor.train()
    per_epoch = -(-len(data.train) // dist.world)  # the same on every process
    total = epochs * per_epoch if train else 0
    desc = progress if isinstance(progress, str) else "aligning"
    bar = tqdm(total=total, desc=desc, disable=not progress or total == 0, unit="batch")
    step = 0
    for _ in range(epochs if train else 0):
        order = list(range(len(train)))
        rng.shuffle(order)
        order += order[: per_epoch - len(order)]
        for i in order:
            b, h = train[i], train_hidden[i]
            lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / max(1, total)))  # cosine decay within a call
            for group in opt.param_groups:
                group["lr"] = lr
            pred = predictor(h.to(device), b.attention_mask.to(device))  # (B, T, D)
            target = data.targets[b.target_index.clamp(min=0)].to(device)  # (B, T, D)
            loss = alignment_loss(pred, target, (b.target_index >= 0).to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            dist.mean_grads_(predictor.parameters())
            torch.nn.utils.clip_grad_norm_(predictor.parameters(), 1.0)
            opt.step()
            step += 1
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    predictor.eval()
    metrics = {"train_cos": mean_cosine(predictor, train_hidden, train, data.targets, dist)}
    if val_hidden is not None and data.val:
        metrics["val_cos"] = mean_cosine(predictor, val_hidden, val, data.targets, dist)
    logger.info("%s: %s", desc, metrics)
    return metrics
