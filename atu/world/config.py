"""Configuration of the embedded world and of the small model trained on it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from atu.configs import dataclass_from_dict
from atu.errors import ConfigError


@dataclass
class TokenizerConfig:
    vocab_size: int = 1024  # byte-level BPE: 256 bytes + merges + specials
    min_frequency: int = 2

    def __post_init__(self):
        if not 300 <= self.vocab_size <= 65536:
            raise ConfigError(f"tokenizer.vocab_size must be in [300, 65536], got {self.vocab_size}")


@dataclass
class LMConfig:
    """A Llama architecture; the numbers go straight into transformers' LlamaConfig."""

    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    intermediate_size: int = 768
    max_position_embeddings: int = 512

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"lm.hidden_size ({self.hidden_size}) must be divisible by lm.num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.num_hidden_layers < 1:
            raise ConfigError(f"lm.num_hidden_layers must be >= 1, got {self.num_hidden_layers}")


@dataclass
class TrainConfig:
    steps: int = 450
    batch_size: int = 32
    block_size: int = 128  # packed sequence length in tokens
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 0  # torch CPU threads; 0 keeps torch's default

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.block_size < 8:
            raise ConfigError(
                f"train.steps, train.batch_size must be >= 1 and train.block_size >= 8, got "
                f"{self.steps}, {self.batch_size}, {self.block_size}"
            )
        if not 0 < self.lr < 1:
            raise ConfigError(f"train.lr must be in (0, 1), got {self.lr}")


@dataclass
class WorldConfig:
    """Everything that determines a built world; its hash is the cache key."""

    seed: int = 0
    n_people: int = 40
    n_unseen: int = 10
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if self.n_people < 2:
            raise ConfigError(f"n_people must be >= 2, got {self.n_people}")
        if self.n_unseen < 0:
            raise ConfigError(f"n_unseen must be >= 0, got {self.n_unseen}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorldConfig:
        data = dict(data)
        parts = {"tokenizer": TokenizerConfig, "lm": LMConfig, "train": TrainConfig}
        for key, sub in parts.items():
            if key in data:
                data[key] = dataclass_from_dict(sub, data[key], f"world.{key}")
        return dataclass_from_dict(cls, data, "world")

    @classmethod
    def tiny(cls, seed: int = 0) -> WorldConfig:
        """A world small enough for tests: a few people, a 2-layer model trained for seconds."""
        return cls(
            seed=seed,
            n_people=4,
            n_unseen=2,
            tokenizer=TokenizerConfig(vocab_size=512),
            lm=LMConfig(
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,  # head dimension 32: vLLM's CPU attention kernels reject 16
                intermediate_size=128,
                max_position_embeddings=256,
            ),
            train=TrainConfig(steps=60, batch_size=16, block_size=64, lr=5e-3, warmup_steps=5, threads=1),
        )
