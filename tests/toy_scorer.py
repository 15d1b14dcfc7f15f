"""A hand-made scorer for tests: the real ``Scorer`` over a byte tokenizer, a table of random hidden states and a
predictor that passes them through, so that the row reaching each score is known exactly and nothing is trained."""

from __future__ import annotations

import numpy as np
import torch

from atu.index import ConceptIndex
from serve.backends import StateBackend, check_id_lists
from serve.scoring import Scorer


class ByteTokenizer:
    """A stand-in for a byte-level BPE fast tokenizer: one token per UTF-8 byte (id = byte + 3, BOS = 1), offsets
    in characters, every byte of a multi-byte character reporting that character's span (as byte-level BPE does)."""

    is_fast = True
    bos_token_id = 1

    def __call__(self, texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False):
        ids = [[b + 3 for ch in t for b in ch.encode()] for t in texts]
        offsets = [[(i, i + 1) for i, ch in enumerate(t) for _ in ch.encode()] for t in texts]
        return {"input_ids": ids, "offset_mapping": offsets}

    # what the guard's request validation asks of a tokenizer
    chat_template = "plain"

    def __len__(self) -> int:
        return 259

    def decode(self, ids, skip_special_tokens=False):
        return bytes(i - 3 for i in ids if i >= 3).decode(errors="replace")

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


class TableBackend(StateBackend):
    """Hidden state of a token = a fixed random vector of its id."""

    def __init__(self, table):
        self.table = table

    def hidden_states(self, sequences, captures=None):
        return [self.table[np.asarray(s)] for s in check_id_lists(sequences)]


class Identity(torch.nn.Module):
    """A predictor whose row t is the hidden state of token t: the best row for a concept is known exactly."""

    def forward(self, hidden, mask):
        return hidden * mask[..., None]


DIM = 64
TABLE = np.random.default_rng(0).standard_normal((260, DIM)).astype(np.float32)


def byte_id(ch):
    return ch.encode()[0] + 3


def toy_scorer(labels_ids, max_tokens=64, thresholds=None, top_k=None):
    index = ConceptIndex.build(
        TABLE[list(labels_ids.values())], list(labels_ids), thresholds or [0.99] * len(labels_ids)
    )
    return Scorer(TableBackend(TABLE), ByteTokenizer(), Identity(), index, max_tokens=max_tokens, top_k=top_k)
