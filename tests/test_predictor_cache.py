"""The predictor continued from cached keys and values equals its full forward pass."""

import pytest
import torch

from atu.predictor import EmbeddingPredictor, PredictorConfig
from atu.predictor_cache import PrefixState, extend_batch


@pytest.fixture
def predictor():
    torch.manual_seed(0)
    return EmbeddingPredictor(PredictorConfig(24, 16, d_model=32, n_layers=2, n_heads=4, max_len=64)).eval()


def test_growing_sequences_in_one_batch_match_the_full_forward(predictor):
    seqs = [(torch.randn(n, 24), list(range(100, 100 + n))) for n in (40, 17, 33)]
    full = [predictor(h[None])[0] for h, _ in seqs]
    states = [PrefixState() for _ in seqs]
    for frac in (0.1, 0.3, 0.31, 0.7, 1.0):  # 0.3 -> 0.31 adds nothing to the shortest: no new rows there
        ends = [max(1, int(len(ids) * frac)) for _, ids in seqs]
        hidden = [h[:e] for (h, _), e in zip(seqs, ends)]
        states = extend_batch(predictor, hidden, states, [ids[:e] for (_, ids), e in zip(seqs, ends)])
    for state, want, (_, ids) in zip(states, full, seqs):
        assert len(state) == len(ids) and state.keys[0].shape == (4, len(ids), 8)
        torch.testing.assert_close(state.rows, want.detach(), atol=1e-5, rtol=0)


def test_a_changed_ending_is_computed_again_from_where_it_changed(predictor):
    h, ids = torch.randn(30, 24), list(range(30))
    (state,) = extend_batch(predictor, [h[:20]], [PrefixState()], [ids[:20]])
    other = ids[:15] + [99] * 15  # the same first 15 tokens, then different ones
    h2 = torch.cat([h[:15], torch.randn(15, 24)])
    shared = state.common_prefix(other)
    assert shared == 15
    (got,) = extend_batch(predictor, [h2], [state.cut(shared)], [other])
    torch.testing.assert_close(got.rows, predictor(h2[None])[0].detach(), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="cached start"):
        extend_batch(predictor, [h2], [state], [other])  # the cached tokens are not a start of these
