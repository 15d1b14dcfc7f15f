"""Shared fixtures: a tiny world (4 people, 2-layer model trained for seconds) built once per session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# The tests never talk to a model hub; make any accidental attempt fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Everything the tests build goes to a fresh cache, never the user's.
_CACHE = Path(tempfile.mkdtemp(prefix="atu-test-cache-"))
os.environ["ATU_CACHE"] = str(_CACHE)


@pytest.fixture(scope="session")
def cache_root():
    return _CACHE


@pytest.fixture(scope="session")
def tiny_world(cache_root):
    from atu.world.build import build_world
    from atu.world.config import WorldConfig

    return build_world(WorldConfig.tiny(), root=cache_root, progress=False)


@pytest.fixture(scope="session")
def tiny_lm(tiny_world):
    from atu.loading import load_lm

    return load_lm(tiny_world.model_dir)


@pytest.fixture(scope="session")
def encoder():
    from atu.loading import load_encoder

    return load_encoder()


def random_llama(seed: int = 0):
    """A randomly initialised two-layer Llama, 32 wide with a 64-token vocabulary (for tests of weight handling)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def eval_result(forget, retain=(1.0, 0.7, 0.5), ppl=10.0, fluency=1.0) -> dict:
    """The parts of an `atu eval` result that the criteria read: recall per probe kind, perplexity, fluency."""
    kinds = ("direct", "paraphrase", "adversarial")
    return {
        "forget": dict(zip(kinds, forget)),
        "retain": dict(zip(kinds, retain)),
        "retain_perplexity": ppl,
        "fluency": {"retain": fluency},
    }


def tiny_run_config(out, **unlearn):
    """A run on the tiny world that takes seconds: few epochs, two short stages."""
    from atu.run_config import RunConfig

    raw = {
        "model": "world:tiny",
        "align": {"epochs": 4, "realign_epochs": 1, "window": 4},
        "unlearn": {"taus": [0.6, 0.3], "steps_per_stage": 4, **unlearn},
        "out": str(out),
    }
    return RunConfig.from_dict(raw)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_world):
    """(run dir, config, summary) of a whole job on the tiny world, forgetting its first person."""
    from atu.run import run

    out = tmp_path_factory.mktemp("run")
    cfg = tiny_run_config(out)
    cfg.data.forget = tiny_world.concepts().names()[:1]
    return out, cfg, run(cfg, progress=False)


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny tensors on one torch thread: on a busy 2-core machine, thread hand-offs made each small
    op take milliseconds instead of microseconds. (Session fixtures such as tiny_world are set up before it.)"""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_vllm(tiny_run, tmp_path_factory):
    """(base URL, export dir) of a real vLLM server on the tiny export, started once for the session. It answers to
    the model name "tiny" and to the model directory's path. The capture plugin is on, as `atu serve` starts it
    (socket: the ``tiny_capture_socket`` fixture); requests not marked for it are served as by a plain vLLM."""
    from atu.vllm_check import vllm_server
    from serve.launch import capture_vllm

    export = tiny_run[0] / "export"
    sock = str(tmp_path_factory.mktemp("capture") / "capture.sock")
    _CAPTURE_SOCKETS[str(export)] = sock
    capture_args, env = capture_vllm(export, sock)
    # Tool calls on (a parser that needs no special tokens), so the guard's tests can ask for them.
    tools = ["--enable-auto-tool-choice", "--tool-call-parser", "pythonic"]
    # "tiny": serve_helpers.TINY_MODEL_NAME
    args = ["--served-model-name", "tiny", str(export / "model"), *capture_args, *tools]
    with vllm_server(export / "model", extra_args=args, env=env) as base:
        yield base, export


_CAPTURE_SOCKETS: dict[str, str] = {}


@pytest.fixture(scope="session")
def tiny_scorer(tiny_vllm):
    """The guard's scorer on the tiny export, with the transformers backend."""
    from serve.scoring import Scorer

    return Scorer.from_export(tiny_vllm[1], backend="hf")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_vllm):
    """The tiny export's tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_vllm[1] / "model")


@pytest.fixture(scope="session")
def tiny_capture_socket(tiny_vllm) -> str:
    """The capture plugin's Unix socket inside the ``tiny_vllm`` server."""
    return _CAPTURE_SOCKETS[str(tiny_vllm[1])]


# Tests that are slow by what they do, marked here rather than one by one: a module that starts torchrun and
# accelerate process groups (each test spawns Python processes that import torch), and every test that uses the
# session's real vLLM server. `pytest -m "not slow"` (`make test-fast`) leaves them out; docs/testing.md says how
# long each tier takes.
SLOW_MODULES = {"test_distributed"}
SLOW_FIXTURES = {"tiny_vllm", "tiny_capture_socket", "tiny_scorer", "tiny_tokenizer"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if item.module.__name__.rpartition(".")[2] in SLOW_MODULES or fixtures & SLOW_FIXTURES:
            item.add_marker(pytest.mark.slow)
