"""The pure functions of benchmarks/serving.py: the pair statistics, the spread note, the table, the CPU sampling.
No vLLM: hand-made pass results."""

import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import serving as bench  # noqa: E402


def _pass(tok_s, guard_ms=0.0, vllm_ms=10.0, failed=0):
    return {"output_throughput": tok_s, "failed": failed, "cpu_ms_per_request": {"guard": guard_ms, "vllm": vllm_ms}}


def _pairs(bare, guarded):
    return [
        {"bare": _pass(b), "guarded": _pass(g, guard_ms=2.0, vllm_ms=12.0), "ratio": g / b}
        for b, g in zip(bare, guarded)
    ]


def test_pair_stats_median_spread_and_quartiles():
    s = bench.pair_stats([0.9, 1.0, 0.8, 0.95, 0.85])
    assert s["n"] == 5 and s["median"] == pytest.approx(0.9)
    assert s["min"] == pytest.approx(0.8) and s["max"] == pytest.approx(1.0) and s["spread"] == pytest.approx(0.2)
    assert s["q1"] == pytest.approx(0.85) and s["q3"] == pytest.approx(0.95) and s["iqr"] == pytest.approx(0.1)


def test_pair_stats_of_one_pair_has_no_spread():
    s = bench.pair_stats([0.93])
    assert s["median"] == s["min"] == s["max"] == s["q1"] == s["q3"] == pytest.approx(0.93)
    assert s["iqr"] == 0.0 and s["spread"] == 0.0


def test_spread_note_only_where_the_spread_is_wider_than_the_gap_to_a_target():
    wide = bench.pair_stats([0.71, 0.97])  # the two single passes that started this benchmark's rework
    note = bench.spread_note("monitor", "streamed", 32, wide)
    assert note and "0.71x to 0.97x" in note and "0.95x target" in note and "cannot settle" in note
    assert "every pair" not in note  # the target lies between the pairs
    below = bench.spread_note("monitor", "streamed", 1, bench.pair_stats([0.81, 0.85]))
    assert below and below.endswith("(every pair fell below it, though).")
    above = bench.spread_note("monitor", "streamed", 1, bench.pair_stats([0.97, 1.05]))
    assert above and above.endswith("(every pair reached it, though).")
    narrow = bench.pair_stats([0.93, 0.95, 0.96])  # 0.03 wide: under the 0.05 gap to 0.95x
    assert bench.spread_note("monitor", "streamed", 32, narrow) is None
    assert bench.spread_note("block", "streamed", 32, narrow) is None  # block's gap is 0.10
    assert bench.spread_note("block", "streamed", 32, bench.pair_stats([0.8, 0.95])) is not None
    assert bench.spread_note("block", "non-streamed", 1, bench.pair_stats([0.95, 0.99])) is not None  # 0.04 > 0.03
    assert bench.spread_note("block", "non-streamed", 1, bench.pair_stats([0.97, 0.98])) is None
    assert bench.spread_note("monitor", "streamed", 8, wide) is None  # no target at 8 clients


def test_level_row_takes_medians_of_the_passes_and_sums_the_failures():
    pairs = _pairs([100.0, 110.0, 90.0], [95.0, 99.0, 90.0])
    pairs[1]["bare"]["failed"] = 2
    row = bench.level_row("monitor", "streamed", 32, pairs)
    assert row["bare_tok_s"] == pytest.approx(100.0) and row["guarded_tok_s"] == pytest.approx(95.0)
    assert row["ratio"]["median"] == pytest.approx(0.95) and row["ratio"]["min"] == pytest.approx(0.9)
    assert row["guard_cpu_ms"] == pytest.approx(2.0) and row["vllm_cpu_ms_bare"] == pytest.approx(10.0)
    assert row["vllm_cpu_ms_guarded"] == pytest.approx(12.0) and row["failed"] == 2
    assert row["note"] and "monitor, streamed, concurrency 32" in row["note"]  # 0.90..1.00 is wider than 0.05


def test_markdown_has_a_row_per_level_the_notes_and_the_latency():
    rows = [
        bench.level_row("monitor", "streamed", 1, _pairs([50.0, 50.0], [49.0, 49.0])),
        bench.level_row("block", "non-streamed", 32, _pairs([100.0, 100.0], [70.0, 95.0])),
    ]
    single = {"n": 10, "max_tokens": 64, "bare_p50_ms": 100.0, "guarded_p50_ms": 104.0, "added_paired_p50_ms": 3.5}
    res = {"backend": "capture", "machine": "x86_64, 2 CPUs", "export": "e", "input_len": 32, "output_len": 64,
           "pairs": 2, "rows": rows, "single": {"monitor": single}}  # fmt: skip
    md = bench.markdown(res)
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(table) == 3  # the header and one row per level
    assert "| monitor | streamed | 1 | 50 | 49 | **0.98x** |" in table[1] and "| 0.97x |" in table[1]
    assert "| block | non-streamed | 32 |" in table[2] and "| 0.90x |" in table[2]
    assert "- block, non-streamed, concurrency 32: the 2 pair ratios span 0.70x to 0.95x" in md
    assert "monitor, streamed, concurrency 1" not in md  # the pairs agree: no spread
    assert "**3.5 ms**" in md


def test_a_relay_row_says_it_measures_the_hop_not_the_guard():
    rows = [bench.level_row(bench.RELAY, "streamed", 32, _pairs([100.0], [96.0]))]
    res = {"backend": "capture", "machine": "m", "export": "e", "input_len": 1, "output_len": 1, "pairs": 1,
           "rows": rows, "single": {}}  # fmt: skip
    md = bench.markdown(res)
    assert "| relay | streamed | 32 | 100 | 96 | **0.96x** |" in md and "| - |" in md  # no target for the hop
    assert "- " + bench.RELAY_NOTE in md
    assert bench.RELAY_NOTE not in bench.markdown(
        {**res, "rows": [bench.level_row("monitor", "streamed", 32, _pairs([100.0], [96.0]))]}
    )


def test_markdown_without_notes_has_no_notes_section():
    rows = [bench.level_row("monitor", "streamed", 8, _pairs([50.0], [10.0]))]
    res = {"backend": "hf", "machine": "m", "export": "e", "input_len": 1, "output_len": 1, "pairs": 1,
           "rows": rows, "single": {}}  # fmt: skip
    assert "Notes:" not in bench.markdown(res)


def test_measured_divides_each_process_cpu_time_by_the_completed_requests():
    def busy():
        t = os.times()
        while sum(os.times()[:2]) - sum(t[:2]) < 0.05:
            pass
        return {"completed": 5}

    r = bench.measured(busy, {"me": os.getpid()})
    assert r["completed"] == 5 and r["cpu_ms_per_request"]["me"] >= 0.05 * 1000 / 5 * 0.5


def test_stopped_share_counts_blocked_and_cut_among_the_audited():
    assert bench.stopped_share({"passed": 6, "cut": 3, "blocked": 1}) == pytest.approx(0.4)
    assert bench.stopped_share({"annotated": 5}) == 0.0
    assert bench.stopped_share({}) is None and bench.stopped_share(None) is None


def test_a_level_whose_requests_the_guard_stopped_says_so_with_the_request_ratio():
    pairs = _pairs([100.0, 100.0, 100.0], [50.0, 60.0, 55.0])
    for pair, cut in zip(pairs, (5, 6, 7)):
        pair["bare"]["request_throughput"], pair["guarded"]["request_throughput"] = 10.0, 9.0
        pair["guarded"]["actions"] = {"passed": 10 - cut, "cut": cut}
    row = bench.level_row("block", "streamed", 32, pairs)
    assert row["stopped"] == pytest.approx(0.6)
    note = row["stopped_note"]
    assert note and "cut 60% of the guarded requests" in note and "guarded/bare: 0.90x" in note
    res = {"backend": "capture", "machine": "m", "export": "e", "input_len": 1, "output_len": 1, "pairs": 3,
           "rows": [row], "single": {}}  # fmt: skip
    md = bench.markdown(res)
    assert "| 60% |" in md and note in md
    clean = bench.level_row("monitor", "streamed", 8, _pairs([50.0], [49.0]))  # no audit read: nothing said
    assert clean["stopped"] is None and clean["stopped_note"] is None
    assert bench.markdown({**res, "rows": [clean]}).splitlines()[-1].endswith("| - |")


def test_audit_actions_reads_what_the_guard_logged_since_the_pass_began(tmp_path):
    from serve.audit import AuditLog
    from serve.audit_record import AuditRecord

    path = tmp_path / "audit.sqlite"
    with AuditLog(path) as log:
        log.append_sync(AuditRecord("old", action="cut", time=1000.0))  # before the pass: not counted
        for i, action in enumerate(["passed", "cut", "cut", "blocked"]):
            log.append_sync(AuditRecord(f"r{i}", action=action, time=2000.0 + i))
        assert bench.audit_actions(str(path), 2000.0, expect=4) == {"passed": 1, "cut": 2, "blocked": 1}
        t = time.monotonic()  # fewer records than expected: it waits, then returns what is there
        assert bench.audit_actions(str(path), 2003.0, expect=2, wait_s=0.3) == {"blocked": 1}
        assert time.monotonic() - t >= 0.3
