"""Concept names written out in text: the guard's lexical check beside the predictor's score.

The predictor scores what the model's states say comes next; a short answer ("Ceda Kestridge" to a question that
describes her) leaves it few rows to read, and a question that names her is scored by rows that predict the
answer, not the name. A name written out is the plainest leak there is, so the guard also looks for the concepts'
names: whole words, case-insensitive, the words of a name separated by spaces, hyphens, apostrophes or an
initial's period ("Ceda Kestridge", "ceda  kestridge's", "Ceda-Kestridge" all match; "Cedar Kestridges" does not).

Matching looks words up in a table keyed by the name's words, so its cost grows with the text's length, not with
the number of concepts. Labels too short to mean anything on their own (fewer than ``MIN_CHARS`` letters and
digits) or without a letter ("1984") are not matched: a year or an initial would flag ordinary text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

MIN_CHARS = 4  # letters and digits in a label, at least, for it to be matched
_WORD = re.compile(r"\w+")
_GAP = re.compile(r"[\s\-'\u2019.]{1,3}")  # what may stand between a name's words


def name_words(text: str) -> tuple[str, ...]:
    """The words of ``text``, case-folded: the key names and text are compared by."""
    return tuple(w.casefold() for w in _WORD.findall(text))


class NameMatcher:
    """``find(text)``: which labels occur in ``text`` as whole words, and where."""

    def __init__(self, labels: Sequence[str], min_chars: int = MIN_CHARS) -> None:
        self._rows: dict[tuple[str, ...], list[int]] = {}
        longest = 0
        for row, label in enumerate(labels):
            key = name_words(label)
            if sum(map(len, key)) < min_chars or not any(ch.isalpha() for ch in label):
                continue
            self._rows.setdefault(key, []).append(row)
            longest = max(longest, len(label))
        self._lengths = sorted({len(k) for k in self._rows}, reverse=True)
        self.max_chars = longest + 2 * max(self._lengths, default=0)  # a name with its widest gaps

    def __len__(self) -> int:
        """How many labels are matched."""
        return sum(len(rows) for rows in self._rows.values())

    def find(self, text: str, start: int = 0) -> dict[int, tuple[int, int]]:
        """Label rows whose name occurs in ``text`` from character ``start`` on, each with the [start, end)
        characters of its first occurrence."""
        if not self._rows or start >= len(text):
            return {}
        while start > 0 and (text[start - 1].isalnum() or text[start - 1] == "_"):
            start -= 1  # never begin inside a word: its tail could read as a shorter name
        words = [(m.start(), m.end(), m.group().casefold()) for m in _WORD.finditer(text, start)]
        found: dict[int, tuple[int, int]] = {}
        for i in range(len(words)):
            for n in self._lengths:
                if i + n > len(words):
                    continue
                rows = self._rows.get(tuple(w for _, _, w in words[i : i + n]))
                if not rows or not all(
                    _GAP.fullmatch(text, words[j][1], words[j + 1][0]) for j in range(i, i + n - 1)
                ):
                    continue
                for row in rows:
                    found.setdefault(row, (words[i][0], words[i + n - 1][1]))
        return found
