"""The embedding predictor E: a small, strictly causal transformer from LM hidden states to encoder embeddings.

Unlike the reference code (whose cross-attention sees the whole sequence), every output position here depends
only on the hidden states at and before it, so the guard can score a stream token by token.

Saved as two files in one directory: ``predictor.safetensors`` (weights) and ``predictor.json`` (sorted keys:
``format_version``, ``atu_version``, ``config``). Loading rebuilds the architecture from the JSON, never from
defaults, and never unpickles anything.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from atu import __version__
from atu.configs import check_keys
from atu.errors import ConfigError, FormatError

FORMAT_VERSION = 1
WEIGHTS_NAME = "predictor.safetensors"
CONFIG_NAME = "predictor.json"


@dataclass
class PredictorConfig:
    """Architecture of the embedding predictor."""

    input_dim: int  # width of the LM hidden states at the hook layer
    output_dim: int  # width of the text encoder's sentence embedding
    d_model: int = 128  # transformer width
    n_layers: int = 2  # pre-norm transformer layers, causally masked
    n_heads: int = 4  # attention heads; must divide d_model
    ffn_mult: int = 4  # feed-forward width = ffn_mult * d_model
    dropout: float = 0.0  # dropout inside the transformer layers (training only)
    max_len: int = 1024  # longest sequence the learned position embedding covers

    def __post_init__(self) -> None:
        for name in ("input_dim", "output_dim", "d_model", "n_layers", "n_heads", "ffn_mult", "max_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"PredictorConfig.{name} must be a positive int, got {value!r}.")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"PredictorConfig.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}); "
                "pick n_heads among its divisors."
            )
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ConfigError(f"PredictorConfig.dropout must be a float in [0, 1), got {self.dropout!r}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PredictorConfig:
        """Build from a dict such as ``to_dict()`` wrote; unknown or missing required keys are errors."""
        check_keys(cls, data, "predictor config")
        missing = sorted({"input_dim", "output_dim"} - set(data))
        if missing:
            raise ConfigError(f"PredictorConfig is missing required keys {missing}.")
        return cls(**data)


class EmbeddingPredictor(nn.Module):
    """hidden (B, T, input_dim) -> predicted window embeddings (B, T, output_dim), causally.

    Input normalisation: each token's hidden state is L2-normalised, then scaled by sqrt(input_dim) (unit RMS),
    so the output is the same for ``h``, ``h / ||h||`` and ``a * h`` (a > 0). This is what lets a predictor
    trained on Hugging Face hidden states run on vLLM's, which arrive L2-normalised.
    """

    def __init__(self, config: PredictorConfig) -> None:
        super().__init__()
        self.config = config
        self.proj_in = nn.Linear(config.input_dim, config.d_model)
        self.pos_emb = nn.Embedding(config.max_len, config.d_model)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model=config.d_model,
                nhead=config.n_heads,
                dim_feedforward=config.ffn_mult * config.d_model,
                dropout=config.dropout,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(config.n_layers)
        )
        self.norm = nn.LayerNorm(config.d_model)
        self.proj_out = nn.Linear(config.d_model, config.output_dim)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the embedding of the future window at every position.

        Args:
            hidden: (B, T, input_dim) hidden states at the hook layer, any float dtype.
            attention_mask: (B, T), 1 for real tokens and 0 for padding, or None. Padding must be on the right:
                with causal attention a real position never sees the padding after it, so its output does not
                depend on padding; outputs at padding positions are set to 0. Left padding is not supported
                (it would shift positions and let real tokens attend to pads), and is not checked, since that
                check would cost a device sync per call.

        Returns:
            (B, T, output_dim) in the model's parameter dtype.
        """
        cfg = self.config
        if not isinstance(hidden, torch.Tensor) or hidden.ndim != 3 or hidden.shape[-1] != cfg.input_dim:
            got = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
            raise ValueError(
                f"hidden must have shape (B, T, {cfg.input_dim}) (the hook layer's width), got {got}; "
                "check that the predictor was aligned on this model and layer."
            )
        batch, seq_len, _ = hidden.shape
        if seq_len > cfg.max_len:
            raise ValueError(
                f"Sequence length {seq_len} exceeds the predictor's max_len {cfg.max_len}; "
                "truncate the input or align a predictor with a larger max_len."
            )
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, seq_len):
            raise ValueError(f"attention_mask must have shape {(batch, seq_len)}, got {tuple(attention_mask.shape)}.")

        dtype = self.proj_in.weight.dtype
        h = hidden.float()
        h = h / h.norm(dim=-1, keepdim=True).clamp(min=1e-12) * math.sqrt(cfg.input_dim)  # (B, T, input_dim)
        positions = torch.arange(seq_len, device=hidden.device)
        x = self.proj_in(h.to(dtype)) + self.pos_emb(positions)  # (B, T, d_model)
        causal = torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=hidden.device), diagonal=1)
        for layer in self.layers:
            x = layer(x, src_mask=causal, is_causal=True)
        out = self.proj_out(self.norm(x))  # (B, T, output_dim)
        if attention_mask is not None:
            out = out * attention_mask.to(device=out.device, dtype=out.dtype)[..., None]
        return out


def save_predictor(model: EmbeddingPredictor, directory: str | os.PathLike) -> Path:
    """Write ``predictor.safetensors`` and ``predictor.json`` into ``directory`` (created if missing)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    meta = {"format_version": FORMAT_VERSION, "atu_version": __version__, "config": model.config.to_dict()}
    # Write then rename, so an interrupted save never leaves a file that half loads.
    tmp_weights, tmp_config = directory / f".{WEIGHTS_NAME}.tmp", directory / f".{CONFIG_NAME}.tmp"
    save_file(state, str(tmp_weights), metadata={"format_version": str(FORMAT_VERSION)})
    tmp_config.write_text(json.dumps(meta, sort_keys=True, indent=2) + "\n")
    os.replace(tmp_weights, directory / WEIGHTS_NAME)
    os.replace(tmp_config, directory / CONFIG_NAME)
    return directory


def load_predictor(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> EmbeddingPredictor:
    """Rebuild a predictor saved by ``save_predictor``, in eval mode, on ``map_location``.

    Raises:
        FormatError (a ValueError) naming the file when a file is missing, corrupt, of another format version,
        or holds weights whose names or shapes do not match its config.
    """
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    try:
        meta = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FormatError(f"{config_path}: cannot read the predictor config ({err}); re-save the predictor.") from err
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        got = meta.get("format_version") if isinstance(meta, dict) else meta
        raise FormatError(f"{config_path}: format_version must be {FORMAT_VERSION}, got {got!r}.")
    try:
        config = PredictorConfig.from_dict(meta.get("config"))
    except ConfigError as err:
        raise FormatError(f"{config_path}: invalid config: {err}") from err

    try:
        state = load_file(str(weights_path), device=str(map_location))
    except (OSError, SafetensorError) as err:
        raise FormatError(
            f"{weights_path}: cannot read the predictor weights ({err}); re-save the predictor."
        ) from err
    # Keep the saved dtype (a bf16 predictor stays bf16) instead of the float32 a fresh module has.
    dtype = next(iter(state.values())).dtype if state else torch.float32
    model = EmbeddingPredictor(config).to(dtype)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise FormatError(f"{weights_path}: weights do not match the config in {config_path.name}: {err}") from err
    return model.to(map_location).eval()
