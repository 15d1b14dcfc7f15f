"""What the scorer and the hf backend keep of the streams they score between two scorings, bounded by bytes: the
least recently stored stream is dropped first, and the total is kept as entries come and go (not summed again)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any


class StreamCache:
    """``key -> value`` with the bytes each value holds, at most ``limit`` bytes in all (one entry is always kept,
    however large)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._entries: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def pop(self, key: str) -> Any:
        """The value under ``key``, taken out, or None."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        self.nbytes -= entry[1]
        return entry[0]

    def put(self, key: str, value: Any, nbytes: int) -> None:
        """Keep ``value`` under ``key`` as the most recent entry, dropping the oldest past the limit."""
        self.pop(key)
        self._entries[key] = (value, nbytes)
        self.nbytes += nbytes
        while self.nbytes > self.limit and len(self._entries) > 1:
            self.nbytes -= self._entries.popitem(last=False)[1][1]
