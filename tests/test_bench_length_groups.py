"""benchmarks/length_groups.py on a random two-layer Llama: every loss it times agrees whole and grouped."""

import sys
from pathlib import Path

import torch

from atu.hidden import freeze_above
from atu.predictor import EmbeddingPredictor, PredictorConfig
from tests.conftest import random_llama

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import length_groups as bench  # noqa: E402


def _batch(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (len(lengths), max(lengths)), generator=g)
    attn = (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).long()
    ids[:, 0] = 1  # BOS
    return ids.masked_fill(attn == 0, 0), attn


def test_efficiency_by_hand():
    attn = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert bench.efficiency([(attn, attn)]) == 0.5


def test_every_loss_agrees_whole_and_grouped():
    model = random_llama(0).train()
    predictor = EmbeddingPredictor(PredictorConfig(input_dim=32, output_dim=8, d_model=16, n_layers=1, n_heads=2))
    predictor.eval().requires_grad_(False)
    pairs = [(_batch([20, 3, 4, 18, 2], s), _batch([2, 19, 3, 17], s + 10)) for s in range(3)]
    fns = bench.losses(model, predictor, 1, bos=1, retain=[rb for _, rb in pairs], forget=[fb for fb, _ in pairs])
    assert set(fns) == {"atu", "gd", "npo", "relearn"}
    for name, fn in fns.items():
        params = list(model.requires_grad_(True).parameters()) if name == "relearn" else freeze_above(model, 1)
        row = bench.measure(fn, pairs, params)
        assert row["loss_rel_diff"] < 1e-5, name
        assert row["grad_rel_diff"] < 1e-4, name
        assert row["seconds_whole"] > 0 and row["seconds_grouped"] > 0
