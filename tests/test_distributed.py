"""Data-parallel unlearning across processes: real torchrun, gloo on the CPU."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from atu import distributed
from atu.hidden import hidden_at
from atu.losses import unlearning_loss
from atu.unlearn import retain_terms, weighted_retain

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
HERE = Path(__file__).parent


def _accelerate() -> list[str]:
    """`accelerate launch --multi_gpu` for two processes, as README's multi-GPU command (on a machine without a GPU
    it starts the same two gloo processes through torch.distributed.run), on a free port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
    ]  # fmt: skip


def _torchrun(args, tmp_path, timeout=300, launcher=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    return subprocess.run(
        [*(launcher or TORCHRUN), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout,
        check=False,
    )  # fmt: skip


def test_single_process_collectives_do_nothing(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    single = distributed.from_environment()
    assert single is distributed.SINGLE and single.main and not single.active
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    single.mean_grads_([p])
    single.broadcast_([p])
    assert single.sum(1.5) == 1.5 and single.from_main(2.5) == 2.5
    torch.testing.assert_close(p.grad, torch.full((3,), 2.0))
    with single.main_first():
        single.barrier()


def test_two_processes_take_two_batches_and_average_their_gradients(tiny_world, tmp_path):
    import dist_worker as w

    proc = _torchrun([str(HERE / "dist_worker.py"), str(tiny_world.model_dir), str(tmp_path)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))

    # Reference, one process: the mean over the two forget batches (each with its own retain batch) of the step's
    # loss gradient, clipped, one SGD step. Which process took which forget batch does not change the mean.
    model, _tok, predictor, batches, vectors, taus, retain, params = w.setup(tiny_world.model_dir)
    assert len(batches) == 2 and len(retain.batches) == 2
    model.train()
    losses = []
    for rank, b in enumerate(batches):
        pred = predictor(hidden_at(model, b.input_ids, b.attention_mask, w.LAYER), b.attention_mask)
        loss = unlearning_loss(pred, vectors, taus, b.position_mask, b.concept_mask)
        kept = retain_terms(model, predictor, vectors, retain, rank, w.LAYER, w.CONFIG)
        total = loss + weighted_retain(kept, w.CONFIG)
        (total / 2).backward()
        losses.append(loss.item())
    torch.nn.utils.clip_grad_norm_(params, w.CONFIG.grad_clip)
    torch.optim.SGD(params, lr=w.CONFIG.lr).step()
    expected = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    assert rank0.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(rank0[name], rank1[name], rtol=0, atol=0)  # the processes stay identical
        torch.testing.assert_close(rank0[name], value, rtol=1e-5, atol=1e-6)
    assert any(
        (rank0[n] - load_file(str(tiny_world.model_dir / "model.safetensors"))[n]).abs().max() > 0 for n in rank0
    )
    # The logged loss is the mean over the processes.
    for r in (0, 1):
        assert float((tmp_path / f"rank{r}.loss").read_text()) == pytest.approx(sum(losses) / 2, rel=1e-5)


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_atu_run_on_two_processes(tiny_world, tmp_path, launcher):
    """The whole job on two processes, launched by torchrun or by `accelerate launch --multi_gpu`: one export, one
    eval.json, each step logged once, one report printed."""
    from conftest import tiny_run_config

    from atu.export import load_export

    cfg = tiny_run_config(tmp_path / "run")
    cfg.data.forget = tiny_world.concepts().names()[:1]
    cfg.device = "cpu"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    command = TORCHRUN if launcher == "torchrun" else _accelerate()
    proc = _torchrun(["-m", "atu.cli", "run", str(config)], tmp_path, timeout=600, launcher=command)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1 and proc.stdout.count("forget    direct") == 1
    summary = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert len(summary["stages"]) == len(cfg.unlearn.taus) and summary["processes"] == 2
    assert summary["after"]["forget"]["direct"] is not None
    load_export(tmp_path / "run" / "export")  # verifies hashes and dimensions
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "step" in r]
    assert steps and len(steps) == len(set(steps))


def test_two_processes_share_the_alignment(tiny_world, tmp_path):
    """Sharded alignment: each process embeds half the windows and caches the states of half the batches; the
    gathered targets equal one process's, and training equals one process averaging both processes' gradients."""
    import math
    import random

    import align_worker as w

    from atu.align import compute_hidden, mean_cosine
    from atu.losses import alignment_loss

    proc = _torchrun([str(HERE / "align_worker.py"), str(tiny_world.root), str(tmp_path)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    metrics = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    model, data, predictor = w.setup(tiny_world.root)
    n = len(data.train)
    assert n == 5 and len(data.val) == 1 and data.n_windows > 2
    assert [m["cached"] for m in metrics] == [3, 2]  # each process holds the states of its own batches only
    for r in (0, 1):
        torch.testing.assert_close(ranks[r]["targets"], data.targets, rtol=1e-5, atol=1e-6)

    # Reference, one process: each step, the mean of the two processes' batch gradients; the smaller share
    # repeats its first batch of the epoch.
    cfg, layer = w.CONFIG, w.CONFIG.hook_layer
    hidden = compute_hidden(model, data.train, layer)
    shares = [list(range(n))[r::2] for r in (0, 1)]
    rngs = [random.Random(cfg.seed + r) for r in (0, 1)]
    per_epoch = math.ceil(n / 2)
    total = cfg.epochs * per_epoch
    opt = torch.optim.Adam(predictor.parameters(), lr=cfg.lr)
    predictor.train()
    step = 0
    for _ in range(cfg.epochs):
        orders = []
        for share, rng in zip(shares, rngs):
            order = list(range(len(share)))
            rng.shuffle(order)
            orders.append([share[i] for i in order + order[: per_epoch - len(order)]])
        for s in range(per_epoch):
            for group in opt.param_groups:
                group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / total))
            opt.zero_grad(set_to_none=True)
            for order in orders:
                b = data.train[order[s]]
                pred = predictor(hidden[order[s]], b.attention_mask)
                loss = alignment_loss(pred, data.targets[b.target_index.clamp(min=0)], b.target_index >= 0)
                (loss / 2).backward()
            torch.nn.utils.clip_grad_norm_(predictor.parameters(), 1.0)
            opt.step()
            step += 1
    predictor.eval()
    for name, value in predictor.state_dict().items():
        torch.testing.assert_close(ranks[0][name], ranks[1][name], rtol=0, atol=0)  # the processes stay identical
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-4, atol=1e-5)
    # The reported cosines are over every process's batches, the same on each.
    assert metrics[0]["train_cos"] == metrics[1]["train_cos"]
    assert metrics[0]["train_cos"] == pytest.approx(mean_cosine(predictor, hidden, data.train, data.targets), abs=1e-4)
    val = compute_hidden(model, data.val, layer)
    assert metrics[1]["val_cos"] == pytest.approx(mean_cosine(predictor, val, data.val, data.targets), abs=1e-4)
