"""Every environment variable the package reads, in one place, with its default.

Nothing else in the package touches ``os.environ``: call the functions here.
"""

from __future__ import annotations

import os
from pathlib import Path

# Root of everything atu builds and reuses (generated worlds, trained default models).
# Default: $XDG_CACHE_HOME/atu, else ~/.cache/atu, like Hugging Face's cache.
ATU_CACHE = "ATU_CACHE"
# Standard XDG base directory for caches.
XDG_CACHE_HOME = "XDG_CACHE_HOME"
# Hugging Face's offline switch; set by atu only when loading the packaged default encoder.
HF_HUB_OFFLINE = "HF_HUB_OFFLINE"
# The serving guard's API key (`atu serve`), when --api-key is not given. Unset: no key, every client is allowed.
ATU_API_KEY = "ATU_API_KEY"
# The guard's operator key (`atu serve --operator-key`): opens /v1/leakage and /metrics. Unset: those answer 403.
ATU_OPERATOR_KEY = "ATU_OPERATOR_KEY"
# The key between the guard and the vLLM server `atu serve` starts (given to vLLM as VLLM_API_KEY, which vLLM reads
# itself). Unset: a new random key per run, so that no other local process can reach that vLLM around the guard.
ATU_VLLM_KEY = "ATU_VLLM_KEY"
VLLM_API_KEY = "VLLM_API_KEY"
# Set by `atu serve` on the vLLM server it starts: the hook layer whose per-token states the in-engine capture
# plugin (serve/capture.py, entry point `vllm.general_plugins`) records. Unset: the plugin does nothing.
ATU_CAPTURE_LAYER = "ATU_CAPTURE_LAYER"
# Unix socket on which that plugin serves the recorded states to the guard.
ATU_CAPTURE_SOCKET = "ATU_CAPTURE_SOCKET"
# Memory the plugin may hold for recorded states not yet read by the guard, in MiB (oldest requests dropped
# beyond it). Default 256: 262,144 token rows of a 256-wide model, 16,384 of a 4,096-wide one.
ATU_CAPTURE_MAX_MIB = "ATU_CAPTURE_MAX_MIB"
# Set by torchrun and `accelerate launch`: the number of processes of a data-parallel run (atu/distributed.py).
WORLD_SIZE = "WORLD_SIZE"


def world_size() -> int:
    """Processes in this data-parallel run (1 when not launched by torchrun or accelerate)."""
    return int(os.environ.get(WORLD_SIZE) or 1)


def cache_root() -> Path:
    """The directory under which atu caches built artifacts."""
    explicit = os.environ.get(ATU_CACHE)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get(XDG_CACHE_HOME)
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "atu"


def set_hub_offline() -> None:
    """Forbid Hugging Face hub calls in this process (the packaged encoder needs none)."""
    os.environ[HF_HUB_OFFLINE] = "1"


def api_key() -> str | None:
    """The guard's API key from the environment, or None when unset or empty."""
    return os.environ.get(ATU_API_KEY) or None


def operator_key() -> str | None:
    """The guard's operator key from the environment, or None when unset or empty."""
    return os.environ.get(ATU_OPERATOR_KEY) or None


def vllm_key() -> str:
    """The key of the vLLM server `atu serve` starts: $ATU_VLLM_KEY, else a new random one."""
    import secrets

    return os.environ.get(ATU_VLLM_KEY) or secrets.token_urlsafe(32)


def capture_settings() -> tuple[int, str, int] | None:
    """(hook layer, socket path, memory budget in bytes) for the in-engine capture plugin, or None when it is not
    asked for."""
    layer, path = os.environ.get(ATU_CAPTURE_LAYER), os.environ.get(ATU_CAPTURE_SOCKET)
    if not layer or not path:
        return None
    return int(layer), path, int(float(os.environ.get(ATU_CAPTURE_MAX_MIB) or 256) * 2**20)


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment for a child process: this process's, with ``extra`` added."""
    return {**os.environ, **extra}
