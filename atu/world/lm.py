"""The small Llama of the embedded world and its pre-training loop (nanoGPT-style, one visible loop)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from atu.world.config import LMConfig, TrainConfig

logger = logging.getLogger(__name__)


def build_model(cfg: LMConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    )
    return LlamaForCausalLM(config)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``lr * min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * coeff)


def _stream(docs: Sequence[list[int]], gen: torch.Generator) -> torch.Tensor:
    order = torch.randperm(len(docs), generator=gen).tolist()
    return torch.tensor([t for i in order for t in docs[i]], dtype=torch.long)


def pretrain(
    model: LlamaForCausalLM, docs: Sequence[list[int]], cfg: TrainConfig, *, progress: bool = True
) -> list[float]:
    """Train ``model`` on token documents (each already framed with BOS/EOS), packed into random blocks.

    Returns the loss of every step. The document order is reshuffled each time the stream is used up.
    """
    if not docs:
        raise ValueError("no training documents")
    threads_before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _pretrain(model, docs, cfg, progress)
    finally:
        torch.set_num_threads(threads_before)  # the setting is process-wide: leave it as the caller had it


def _pretrain(model: LlamaForCausalLM, docs: Sequence[list[int]], cfg: TrainConfig, progress: bool) -> list[float]:
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    stream = _stream(docs, gen)
    block = min(cfg.block_size, len(stream) - 1)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    model.train()
    losses: list[float] = []
    used = 0
    t0 = time.time()
    bar = tqdm(range(cfg.steps), desc="training LM", disable=not progress, unit="step")
    for step in bar:
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        if used >= len(stream):  # one pass over the data: reshuffle documents
            stream, used = _stream(docs, gen), 0
        starts = torch.randint(0, len(stream) - block, (cfg.batch_size,), generator=gen)
        batch = torch.stack([stream[s : s + block + 1] for s in starts.tolist()])  # (B, block+1)
        used += cfg.batch_size * block
        logits = model(input_ids=batch[:, :-1]).logits  # (B, block, V)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(loss.item())  # CPU training: the sync costs nothing
        if step % 20 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{lr:.1e}")
    logger.info("trained %d steps in %.1fs, final loss %.4f", cfg.steps, time.time() - t0, losses[-1])
    model.eval()
    return losses
