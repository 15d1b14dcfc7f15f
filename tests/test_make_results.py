"""docs/make_results.py: docs/results.md is what the script writes from results/*.json, and a file with keys
missing (an older or newer benchmark) still renders."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def make_results():
    spec = importlib.util.spec_from_file_location("make_results", ROOT / "docs" / "make_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_page_is_current(make_results):
    assert sorted((ROOT / "results").glob("*.json")), "no results/*.json to render"
    doc = (ROOT / "docs" / "results.md").read_text(encoding="utf-8")
    assert doc == make_results.render(ROOT / "results"), "run `python docs/make_results.py`"


def test_every_committed_file_has_a_section(make_results):
    text = make_results.render(ROOT / "results")
    for path in (ROOT / "results").glob("*.json"):
        assert f"results/{path.name}" in text
    assert "## Other files" not in text  # every benchmark's shape is known


def _strip(value, depth):
    """``value`` with every other key dropped below the top level, and every list cut to its first item."""
    if isinstance(value, dict):
        keys = list(value)
        kept = keys if depth == 0 else keys[::2]
        return {k: _strip(value[k], depth + 1) for k in kept}
    if isinstance(value, list):
        return [_strip(v, depth + 1) for v in value[:1]]
    return value


def test_missing_keys_and_bad_files_render(make_results, tmp_path):
    for path in sorted((ROOT / "results").glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        (tmp_path / path.name).write_text(json.dumps(_strip(data, 0)))
        (tmp_path / f"empty_{path.name}").write_text("{}")
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "a_list.json").write_text("[1, 2]")
    text = make_results.render(tmp_path)
    assert "### results/broken.json" in text and "unreadable: JSONDecodeError" in text
    assert "A list, not a mapping" in text


def test_check_flag_reports_a_stale_page(make_results, tmp_path, capsys):
    (tmp_path / "serving.json").write_text(json.dumps({"load": [{"concurrency": 1, "throughput_ratio": 0.9}]}))
    out = tmp_path / "results.md"
    assert make_results.main(["--results", str(tmp_path), "--out", str(out), "--check"]) == 1
    assert "out of date" in capsys.readouterr().err
    assert make_results.main(["--results", str(tmp_path), "--out", str(out)]) == 0
    assert make_results.main(["--results", str(tmp_path), "--out", str(out), "--check"]) == 0
    assert "| 1 | - | - | 0.900 |" in out.read_text()


@pytest.mark.parametrize(
    ("value", "cell"),
    [(None, "-"), (True, "yes"), (12345, "12,345"), (10066.5, "10,066"), (12.34, "12.3"), (0.5, "0.500"),
     (3e-4, "0.0003"), ("a|b", "a\\|b"), ([0.1, None], "0.100, -")],
)  # fmt: skip
def test_cells(make_results, value, cell):
    assert make_results.fmt(value) == cell


def test_the_paired_serving_results_render_with_their_spread_notes(make_results, tmp_path):
    row = {"policy": "monitor", "mode": "streamed", "concurrency": 32, "bare_tok_s": 100.0, "guarded_tok_s": 90.0,
           "ratio": {"median": 0.9, "min": 0.8, "max": 0.97}, "guard_cpu_ms": 5.0, "vllm_cpu_ms_guarded": 60.0,
           "failed": 0, "note": "monitor, streamed, concurrency 32: too wide"}  # fmt: skip
    (tmp_path / "serving.json").write_text(
        json.dumps({"pairs": 5, "rows": [row], "single": {"monitor": {"n": 30, "added_paired_p50_ms": 3.5}}})
    )
    page = make_results.render(tmp_path)
    assert "interleaved pairs" in page and "| monitor | streamed | 32 | 100.0 | 90.0 | 0.900 | 0.800 | 0.970 |" in page
    assert "- monitor, streamed, concurrency 32: too wide" in page and "| monitor | 30 | 3.500 |" in page
