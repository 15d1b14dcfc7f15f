import pytest
import torch

from atu.world.config import LMConfig, TrainConfig
from atu.world.generate import generate_world
from atu.world.lm import build_model, lr_at, pretrain
from atu.world.tokenizer import train_tokenizer


def test_lr_schedule_warms_up_then_decays():
    cfg = TrainConfig(steps=100, lr=1e-2, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-3)
    assert lrs[9] == pytest.approx(1e-2)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(1e-3, rel=0.05)


def test_short_training_lowers_loss_and_changes_weights():
    world = generate_world(0, 3, 0)
    tok = train_tokenizer([r.text for r in world.corpus], vocab_size=400)
    docs = [tok(r.text).input_ids + [tok.eos_token_id] for r in world.corpus]
    torch.manual_seed(0)
    model = build_model(
        LMConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64), tok
    )
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    threads = torch.get_num_threads()
    cfg = TrainConfig(steps=30, batch_size=8, block_size=32, lr=5e-3, warmup_steps=3, threads=1)
    losses = pretrain(model, docs, cfg, progress=False)
    assert torch.get_num_threads() == threads  # the process-wide setting is given back
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert not torch.equal(before, model.model.layers[0].mlp.up_proj.weight)
