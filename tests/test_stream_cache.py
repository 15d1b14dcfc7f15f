"""The byte-bounded cache of streams kept between scorings, and the shared-prefix count it is keyed on."""

from atu.texts import common_prefix
from serve.stream_cache import StreamCache


def test_oldest_streams_go_first_past_the_limit_and_the_total_follows():
    cache = StreamCache(limit=10)
    cache.put("a", "A", 4)
    cache.put("b", "B", 4)
    assert len(cache) == 2 and cache.nbytes == 8
    cache.put("a", "A2", 5)  # stored again: now the most recent, its old size replaced
    assert cache.nbytes == 9
    cache.put("c", "C", 3)  # 12 > 10: the least recent ("b") goes
    assert cache.pop("b") is None and cache.nbytes == 8 and len(cache) == 2
    assert cache.pop("a") == "A2" and cache.nbytes == 3 and cache.pop("a") is None
    cache.put("huge", "H", 50)  # over the limit alone: kept, everything older dropped
    assert len(cache) == 1 and cache.nbytes == 50 and cache.pop("huge") == "H" and cache.nbytes == 0


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2 and common_prefix([], [1]) == 0 and common_prefix([7], [8]) == 0
