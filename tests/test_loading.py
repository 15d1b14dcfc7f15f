import pytest
import torch

from atu.errors import LoadError
from atu.loading import load_encoder, load_lm


def test_load_lm_from_built_world(tiny_world):
    model, tok = load_lm(tiny_world.model_dir)
    ids = tok("Q: hello\nA:", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok))
    assert not model.training


def test_load_lm_rejects_non_model_directory(tmp_path):
    with pytest.raises(LoadError, match="no config.json"):
        load_lm(tmp_path)


def test_load_lm_unknown_id_is_one_clear_error():
    with pytest.raises(LoadError, match="could not load causal LM 'no-such-org/no-such-model'"):
        load_lm("no-such-org/no-such-model")


def test_load_lm_bad_dtype(tiny_world):
    with pytest.raises(LoadError, match="unknown dtype 'float7'"):
        load_lm(tiny_world.model_dir, dtype="float7")


def test_default_encoder_is_packaged_minilm():
    enc = load_encoder()
    emb = enc.encode(["Selford is a city.", "Selford is a town."], normalize_embeddings=True)
    assert emb.shape == (2, 384)
    assert float(emb[0] @ emb[1]) > 0.8


def test_load_encoder_bad_path(tmp_path):
    with pytest.raises(LoadError, match="could not load sentence-transformers encoder"):
        load_encoder(tmp_path / "missing")
