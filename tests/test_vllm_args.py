"""The vLLM command line `atu serve` builds, for a CUDA machine and for a CPU one. No server is started: the argv and
the environment are what is checked."""

import contextlib
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from atu.errors import AtuError
from atu.vllm_check import CPU_ARGS, vllm_command, vllm_device, vllm_environment
from serve.launch import ServeOptions, check_capture_args, served_model_name, upstream_servers


def option(argv: list[str], name: str) -> str | None:
    """The value vLLM's argparse would keep for ``name`` (the last one)."""
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == name]
    return values[-1] if values else None


def test_cpu_command_has_the_cpu_settings():
    argv = vllm_command("/m", port=9000, device="cpu")
    assert argv[1:5] == ["-m", "vllm.entrypoints.openai.api_server", "--model", "/m"]
    assert option(argv, "--dtype") == "float32" and option(argv, "--gpu-memory-utilization") == "0.3"
    assert "--enforce-eager" in argv and option(argv, "--port") == "9000" and option(argv, "--host") == "127.0.0.1"
    env = vllm_environment("cpu")
    assert env == {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "GOMP_SPINCOUNT": "1000"}


def test_cuda_command_keeps_vllms_defaults():
    argv = vllm_command("/m", port=9000, device="cuda")
    for flag in CPU_ARGS:
        if flag.startswith("--"):
            assert flag not in argv, f"{flag} must not be forced on a GPU"
    assert vllm_environment("cuda") == {}  # the multiprocess engine, as vLLM starts by default


def test_user_args_come_last_unchanged_and_override():
    user = ["--tensor-parallel-size", "2", "--max-model-len", "8192", "--quantization", "fp8", "--dtype", "bfloat16"]
    argv = vllm_command("/m", port=1, device="cpu", extra_args=["--served-model-name", "x"], user_args=user)
    assert argv[-len(user) :] == user
    assert option(argv, "--dtype") == "bfloat16"  # the user's value is the one vLLM keeps
    for reserved in (["--port", "2"], ["--host=0.0.0.0"], ["--model", "/other"]):
        with pytest.raises(AtuError, match="is set by atu serve"):
            vllm_command("/m", port=1, device="cuda", user_args=reserved)


def test_device_auto_follows_torch(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert vllm_device("auto") == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert vllm_device("auto") == "cpu" and vllm_device("cuda") == "cuda"
    with pytest.raises(AtuError, match="auto, cuda or cpu"):
        vllm_device("tpu")


def test_served_name_and_capture_conflicts():
    assert served_model_name(["--max-model-len", "9", "--served-model-name", "mine"], "export") == "mine"
    assert served_model_name(["--served-model-name=other"], "export") == "other"
    assert served_model_name([], "export") == "export"
    check_capture_args(["--tensor-parallel-size", "2", "--max-model-len", "4096"])
    for bad in ("--enable-prefix-caching", "--no-enforce-eager", "-O3", "--compilation-config={}"):
        with pytest.raises(AtuError, match="conflicts with the capture backend"):
            check_capture_args([bad])


@pytest.fixture
def started(monkeypatch, tmp_path):
    """Run `upstream_servers` with a fake vLLM: record the argv and environment it would start vLLM with."""
    import atu.export
    import atu.vllm_check

    calls = []

    @contextlib.contextmanager
    def fake_server(model_dir, *, port=None, extra_args=(), env=None, device="auto", user_args=(), **_):
        dev = atu.vllm_check.vllm_device(device)
        argv = atu.vllm_check.vllm_command(model_dir, port=port or 8001, device=dev, extra_args=extra_args,
                                           user_args=user_args)  # fmt: skip
        calls.append({"argv": argv, "env": {**atu.vllm_check.vllm_environment(dev), **(env or {})}})
        yield "http://127.0.0.1:8001"

    monkeypatch.setattr(atu.vllm_check, "vllm_server", fake_server)
    monkeypatch.setattr(atu.export, "load_export", lambda _: SimpleNamespace(guard=SimpleNamespace(hook_layer=3)))
    (tmp_path / "exp").mkdir()
    return tmp_path / "exp", calls


@pytest.mark.parametrize("machine", ["cuda", "cpu"])
def test_atu_serve_argv_with_capture(started, monkeypatch, machine):
    import torch

    export, calls = started
    monkeypatch.setattr(torch.cuda, "is_available", lambda: machine == "cuda")
    user = ("--tensor-parallel-size", "2", "--served-model-name", "prod")
    with upstream_servers(ServeOptions(export_dir=export, vllm_args=user)) as up:
        assert up.backend == "capture" and up.model_name == "prod" and up.capture_socket
    (call,) = calls
    argv, env = call["argv"], call["env"]
    assert argv[-len(user) :] == list(user)
    assert "--no-enable-prefix-caching" in argv and "--enforce-eager" in argv  # what the capture plugin needs
    assert env["ATU_CAPTURE_LAYER"] == "3" and env["ATU_CAPTURE_SOCKET"] == up.capture_socket
    if machine == "cuda":
        assert "--dtype" not in argv and "--gpu-memory-utilization" not in argv
        assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in env and "GOMP_SPINCOUNT" not in env
    else:
        assert option(argv, "--dtype") == "float32" and option(argv, "--gpu-memory-utilization") == "0.3"
        assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" and env["GOMP_SPINCOUNT"] == "1000"


def test_atu_serve_hf_backend_on_cuda_keeps_cuda_graphs(started, monkeypatch):
    import torch

    export, calls = started
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with upstream_servers(ServeOptions(export_dir=export, backend="hf")):
        pass
    argv = calls[0]["argv"]
    assert "--enforce-eager" not in argv and "--no-enable-prefix-caching" not in argv


def test_cli_passes_args_after_double_dash(monkeypatch, tmp_path):
    import atu.export
    import serve.launch
    from atu.cli import main

    seen = {}

    @contextlib.contextmanager
    def fake_upstreams(opts):
        seen["opts"] = opts
        raise AtuError("stopped before starting vLLM")
        yield

    monkeypatch.setattr(atu.export, "load_export", lambda _: None)
    monkeypatch.setattr(serve.launch, "upstream_servers", fake_upstreams)
    export = tmp_path / "exp"
    export.mkdir()
    args = ["serve", str(export), "-v", "--port", "0", "--no-audit", "--vllm-device", "cuda", "--",
            "--max-model-len", "4096", "--quantization", "fp8"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "stopped before starting vLLM" in result.output
    opts = seen["opts"]
    assert opts.vllm_args == ("--max-model-len", "4096", "--quantization", "fp8") and opts.vllm_device == "cuda"
    assert Path(opts.export_dir) == export
    with pytest.raises(AtuError, match="with --upstream, give them to your own vLLM"):
        with upstream_servers(ServeOptions(export_dir=export, upstream_url="http://x", vllm_args=("--a",))):
            pass


@pytest.mark.parametrize("backend", ["hf", "capture", "vllm"])
def test_a_tampered_export_is_refused_before_vllm_loads_it(started, monkeypatch, backend):
    import atu.export

    export, calls = started

    def tampered(path):
        raise atu.export.ExportError(f"{path}/model/model.safetensors: sha256 mismatch (file changed after export)")

    monkeypatch.setattr(atu.export, "load_export", tampered)
    with pytest.raises(AtuError, match="sha256 mismatch"):
        with upstream_servers(ServeOptions(export_dir=export, backend=backend)):
            pass
    assert calls == []  # vLLM was never started on it
