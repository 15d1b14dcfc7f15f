"""benchmarks/guard_profile.py's table, on a hand-made py-spy raw file."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import guard_profile  # noqa: E402


def test_table_counts_each_function_once_per_sample_inclusively(tmp_path):
    raw = tmp_path / "guard.txt"
    raw.write_text(
        "main (a.py:1);Scorer.score_batch (serve/scoring.py:3);Scorer._extend_streams (serve/scoring.py:9) 6\n"
        "main (a.py:1);Scorer.score_batch (serve/scoring.py:3);Scorer._report (serve/scoring.py:5) 2\n"
        "main (a.py:1);EpollSelector.select (selectors.py:4) 2\n"
    )
    text = guard_profile.table(str(raw))
    assert text.startswith("10 samples")
    assert "| `Scorer.score_batch` | 80.0% |" in text and "| `Scorer._extend_streams` | 60.0% |" in text
    assert "| `EpollSelector.select` | 20.0% |" in text and "| `Relay.run` | 0.0% |" in text
