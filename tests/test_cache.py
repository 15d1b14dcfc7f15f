import pytest

from atu import cache, envs


def test_config_key_ignores_key_order_and_sees_values():
    assert cache.config_key({"a": 1, "b": [1, 2]}) == cache.config_key({"b": [1, 2], "a": 1})
    assert cache.config_key({"a": 1}) != cache.config_key({"a": 2})


def test_get_or_build_builds_once(tmp_path):
    calls = []

    def build(out):
        calls.append(out)
        (out / "x.txt").write_text("hello")

    first = cache.get_or_build("things", {"n": 1}, build, root=tmp_path)
    second = cache.get_or_build("things", {"n": 1}, build, root=tmp_path)
    assert first == second and len(calls) == 1
    assert (first / "x.txt").read_text() == "hello"
    assert (first / "config.json").is_file()
    other = cache.get_or_build("things", {"n": 2}, build, root=tmp_path)
    assert other != first and len(calls) == 2


def test_crash_during_build_leaves_no_entry(tmp_path):
    def boom(out):
        (out / "half.txt").write_text("partial")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        cache.get_or_build("things", {"n": 3}, boom, root=tmp_path)
    final = cache.entry_dir("things", cache.config_key({"n": 3}), tmp_path)
    assert not final.exists()
    assert not list((tmp_path / "things").glob("*.partial"))


def test_incomplete_leftover_is_rebuilt(tmp_path):
    final = cache.entry_dir("things", cache.config_key({"n": 4}), tmp_path)
    final.mkdir(parents=True)
    (final / "stale.txt").write_text("left by a killed process")
    entry = cache.get_or_build("things", {"n": 4}, lambda out: (out / "ok.txt").write_text("ok"), root=tmp_path)
    assert (entry / "ok.txt").is_file() and not (entry / "stale.txt").exists()


def test_cache_root_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv(envs.ATU_CACHE, str(tmp_path / "c"))
    assert envs.cache_root() == tmp_path / "c"
    monkeypatch.delenv(envs.ATU_CACHE)
    monkeypatch.setenv(envs.XDG_CACHE_HOME, str(tmp_path / "xdg"))
    assert envs.cache_root() == tmp_path / "xdg" / "atu"
