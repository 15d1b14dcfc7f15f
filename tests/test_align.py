import pytest
import torch

from atu.align import AlignConfig, compute_hidden, new_predictor, prepare_alignment, train_predictor
from atu.errors import ConfigError


def test_config_validation():
    with pytest.raises(ConfigError, match="align.hook_layer must be >= 1"):
        AlignConfig(hook_layer=0)
    with pytest.raises(ConfigError, match="unknown key 'layer'"):
        AlignConfig.from_dict({"layer": 2})
    with pytest.raises(ConfigError, match="the model has 4 layers"):
        AlignConfig(hook_layer=9).resolve_layer(4)
    assert AlignConfig().resolve_layer(4) == 2
    assert AlignConfig().resolve_layer(1) == 1


def test_alignment_targets_are_cached_once_and_training_raises_cosine(tiny_lm, tiny_world, encoder):
    model, tok = tiny_lm
    texts = [r.text for r in tiny_world.corpus()]
    cfg = AlignConfig(window=4, batch_size=8, epochs=0, lr=3e-3, val_fraction=0.1)
    data = prepare_alignment(texts, tok, encoder, cfg, progress=False)
    # Every target row is a distinct window, embedded once, unit length.
    assert data.targets.shape[1] == 384
    torch.testing.assert_close(data.targets.norm(dim=1), torch.ones(data.n_windows))
    used = torch.cat([b.target_index[b.target_index >= 0] for b in data.train + data.val])
    assert used.unique().numel() == data.n_windows
    assert sum(b.input_ids.shape[0] for b in data.train + data.val) == len(texts)
    hidden = compute_hidden(model, data.train, 1)
    assert [h.shape[:2] for h in hidden] == [b.input_ids.shape for b in data.train]
    predictor = new_predictor(cfg, model.config.hidden_size, 384)
    before = train_predictor(predictor, data, hidden, 0, cfg, progress=False)["train_cos"]
    after = train_predictor(predictor, data, hidden, 8, cfg, progress=False)["train_cos"]
    assert after > before + 0.1


def test_no_texts():
    with pytest.raises(ConfigError, match="no alignment texts"):
        prepare_alignment([], None, None, AlignConfig())


def test_shares_across_processes_and_too_few_batches():
    from atu.distributed import SINGLE, Dist

    items = list(range(7))
    assert SINGLE.shard(items) is items
    shares = [Dist(rank=r, world=3).shard(items) for r in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(sum(shares, [])) == items
    # More processes than alignment batches: a one-line error before any collective, the same on every process.
    batch = object()
    data = type("Data", (), {"train": [batch, batch], "val": []})()
    with pytest.raises(ConfigError, match="2 alignment batches for 3 processes"):
        train_predictor(torch.nn.Linear(1, 1), data, [], 1, AlignConfig(), progress=False, dist=Dist(0, 3))
