import torch

from atu.concept_reader import ConceptReader
from atu.predictor import EmbeddingPredictor, PredictorConfig


def test_texts_longer_than_the_predictor_are_cut_not_refused(tiny_lm):
    """A predictor aligned with a short align.max_length covers few positions; scoring long texts must cut them
    where alignment did instead of failing."""
    model, tokenizer = tiny_lm
    torch.manual_seed(0)
    config = PredictorConfig(model.config.hidden_size, 8, d_model=16, n_layers=1, n_heads=2, max_len=12)
    predictor = EmbeddingPredictor(config).eval()
    texts = ["word " * 40, "a short one"]
    assert len(tokenizer(texts[0]).input_ids) > config.max_len
    vectors = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    reader = ConceptReader(predictor, 1, vectors)
    scores = reader.concept_scores(model, tokenizer, texts)
    assert scores.shape == (2, 3) and bool(((scores >= -1) & (scores <= 1)).all())
    cut = reader.concept_scores(model, tokenizer, texts, max_length=12)
    assert torch.allclose(scores, cut)  # the same as asking for the predictor's length
