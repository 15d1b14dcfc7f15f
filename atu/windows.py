"""Future-window targets: which span of raw text each LM token position must predict the embedding of.

For LM token position ``t`` the target window is the next ``k`` *encoder* tokens of the raw text that start at or
after the end character of token ``t``'s character span. The LM and the encoder tokenise the same string
differently; character offsets are the only coordinates they share, so the alignment is done on offsets.

Two facts about real offsets shape the code (both seen with the tokenizers this project uses):

- Special tokens (BOS, EOS, ...) have offsets ``(0, 0)``. Taken literally, an EOS at the end of a text would
  point back at the start of the text. So the *effective* end of position ``t`` is the maximum end over positions
  ``0..t``: BOS gets 0 (its window is the first ``k`` encoder tokens), a trailing EOS gets the end of the text.
- Byte-level BPE splits a multi-byte character across tokens, and such tokens report the character(s) they
  touch: offsets of consecutive tokens can overlap (``" naï"`` = (11, 15), ``"ïve"`` = (14, 17)) and a token
  holding the last byte of one character and the first of the next spans both. Starts stay non-decreasing, which
  is all ``np.searchsorted`` needs; ends are made non-decreasing the same way (running maximum).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class WindowBatch:
    """A tokenised batch with the future window of every LM position.

    Attributes:
        input_ids: (B, T) int64, LM token ids, right padded (pad id: the tokenizer's ``pad_token_id``, else 0).
        attention_mask: (B, T) int64, 1 for real tokens, 0 for padding.
        spans: (B, T, 2) int64 numpy array, character span ``[start, end)`` of each window in its text; (0, 0)
            where ``mask`` is False.
        mask: (B, T) bool tensor, True where the position is a real token with a full window of ``k`` tokens.
        window_texts: the sorted distinct window substrings of the batch, so each is embedded once.
        window_index: (B, T) int64, index into ``window_texts``; -1 where ``mask`` is False.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    spans: np.ndarray
    mask: torch.Tensor
    window_texts: list[str]
    window_index: torch.Tensor


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k (window size in encoder tokens) must be a positive int, got {k!r}; the paper uses k=8.")


def _check_offsets(name: str, offsets: np.ndarray) -> np.ndarray:
    offsets = np.asarray(offsets)
    if offsets.ndim != 2 or offsets.shape[1] != 2:
        raise ValueError(f"{name} must have shape (N, 2) of [start, end) character offsets, got {offsets.shape}.")
    if offsets.size and not np.issubdtype(offsets.dtype, np.integer):
        raise ValueError(f"{name} must hold integer character offsets, got dtype {offsets.dtype}.")
    offsets = offsets.astype(np.int64, copy=False)
    if offsets.size and ((offsets < 0).any() or (offsets[:, 1] < offsets[:, 0]).any()):
        raise ValueError(f"{name} must satisfy 0 <= start <= end for every token; got {offsets.tolist()!s:.200}.")
    return offsets


def window_spans(
    lm_offsets: np.ndarray, enc_offsets: np.ndarray, k: int, valid: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Character span of the ``k``-encoder-token window that follows each LM token.

    Args:
        lm_offsets: (T, 2) int, ``[start, end)`` of each LM token; special tokens are (0, 0).
        enc_offsets: (M, 2) int, ``[start, end)`` of each encoder token of the same text, starts non-decreasing;
            zero-width tokens (start == end) are ignored.
        k: window size in encoder tokens, >= 1.
        valid: (T,) bool, False for padding positions; None means all valid.

    Returns:
        spans: (T, 2) int64, ``(start of the first window token, end of the k-th)``; (0, 0) where masked.
        mask: (T,) bool, False where fewer than ``k`` encoder tokens start at or after the position's effective
            end (the running maximum of LM ends, see the module docstring) or where ``valid`` is False.
    """
    _check_k(k)
    lm_offsets = _check_offsets("lm_offsets", lm_offsets)
    enc_offsets = _check_offsets("enc_offsets", enc_offsets)
    n_lm = lm_offsets.shape[0]
    if valid is None:
        valid = np.ones(n_lm, dtype=bool)
    valid = np.asarray(valid)
    if valid.shape != (n_lm,) or valid.dtype != np.bool_:
        raise ValueError(f"valid must be a bool array of shape ({n_lm},), got {valid.dtype} {valid.shape}.")
    # A zero-width encoder token (a special token, or whitespace that trim_offsets reduced to nothing) covers no
    # text: a window made of it would be an empty string, so it does not count towards k.
    enc_offsets = enc_offsets[enc_offsets[:, 1] > enc_offsets[:, 0]]
    n_enc = enc_offsets.shape[0]
    enc_starts = enc_offsets[:, 0]
    if (np.diff(enc_starts) < 0).any():
        raise ValueError(
            f"enc_offsets starts must be non-decreasing (one text, in order); got {enc_starts.tolist()!s:.200}."
        )

    # Padding offsets are meaningless; zero them so they cannot raise the running maximum.
    ends = np.where(valid, lm_offsets[:, 1], 0)
    ends = np.maximum.accumulate(ends) if n_lm else ends  # (T,)
    first = np.searchsorted(enc_starts, ends, side="left")  # (T,) first encoder token starting at or after end
    last = first + (k - 1)  # (T,)
    mask = valid & (last < n_enc)

    spans = np.zeros((n_lm, 2), dtype=np.int64)
    if mask.any():
        enc_ends = np.maximum.accumulate(enc_offsets[:, 1])  # (M,) overlapping byte tokens never shrink the span
        spans[mask, 0] = enc_starts[first[mask]]
        spans[mask, 1] = enc_ends[last[mask]]
    return spans, mask


def _encode_offsets(tokenizer, texts: list[str], role: str, **kwargs) -> dict:
    try:
        encoded = tokenizer(texts, return_offsets_mapping=True, padding=False, verbose=False, **kwargs)
    except NotImplementedError as err:  # slow (pure Python) tokenizers cannot report offsets
        raise ValueError(
            f"The {role} tokenizer ({type(tokenizer).__name__}) cannot return character offsets; "
            "load a fast tokenizer (AutoTokenizer.from_pretrained(..., use_fast=True))."
        ) from err
    if "offset_mapping" not in encoded:
        raise ValueError(f"The {role} tokenizer ({type(tokenizer).__name__}) returned no offset_mapping.")
    return encoded


def build_windows(texts: list[str], lm_tokenizer, enc_tokenizer, k: int, max_length: int) -> WindowBatch:
    """Tokenise ``texts`` for the LM and find every position's future window of ``k`` encoder tokens.

    The LM side adds special tokens and truncates to ``max_length``; the encoder side tokenises the whole text
    (no special tokens, no truncation), so positions near a truncation point still get windows from the text
    beyond it. Padding is done here, on the right, whatever the tokenizers' own settings; neither tokenizer is
    modified. ``T`` is the longest LM sequence of the batch (<= ``max_length``).
    """
    _check_k(k)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive int, got {max_length!r}.")
    if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"texts must be a non-empty list of str, got {type(texts).__name__} {texts!r:.80}.")
    texts = list(texts)
    lm = _encode_offsets(lm_tokenizer, texts, "LM", add_special_tokens=True, truncation=True, max_length=max_length)
    enc = _encode_offsets(enc_tokenizer, texts, "encoder", add_special_tokens=False, truncation=False)

    batch, seq_len = len(texts), max((len(ids) for ids in lm["input_ids"]), default=0)
    pad_id = lm_tokenizer.pad_token_id if lm_tokenizer.pad_token_id is not None else 0
    input_ids = np.full((batch, seq_len), pad_id, dtype=np.int64)
    attention = np.zeros((batch, seq_len), dtype=np.int64)
    spans = np.zeros((batch, seq_len, 2), dtype=np.int64)
    mask = np.zeros((batch, seq_len), dtype=bool)
    for b in range(batch):
        n = len(lm["input_ids"][b])
        assert len(lm["offset_mapping"][b]) == n
        input_ids[b, :n] = lm["input_ids"][b]
        attention[b, :n] = 1
        lm_off = np.asarray(lm["offset_mapping"][b], dtype=np.int64).reshape(n, 2)
        enc_off = np.asarray(enc["offset_mapping"][b], dtype=np.int64).reshape(-1, 2)
        spans[b, :n], mask[b, :n] = window_spans(lm_off, enc_off, k)

    subs = {(b, t): texts[b][spans[b, t, 0] : spans[b, t, 1]] for b, t in zip(*np.nonzero(mask), strict=True)}
    window_texts = sorted(set(subs.values()))
    position = {s: i for i, s in enumerate(window_texts)}
    window_index = np.full((batch, seq_len), -1, dtype=np.int64)
    for (b, t), s in subs.items():
        window_index[b, t] = position[s]
    return WindowBatch(
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(attention),
        spans=spans,
        mask=torch.from_numpy(mask),
        window_texts=window_texts,
        window_index=torch.from_numpy(window_index),
    )
