"""atu.atomic: a directory is replaced whole or not at all."""

import os

import pytest

import atu.atomic
from atu.atomic import install_dir, replaced_dir


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


def test_replaced_dir_swaps_in_the_new_directory(tmp_path):
    final = tmp_path / "run" / "checkpoint"
    with replaced_dir(final) as tmp:
        (tmp / "a").write_text("1")
    assert (final / "a").read_text() == "1"
    with replaced_dir(final) as tmp:
        assert not any(tmp.iterdir())  # starts empty
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in final.iterdir()) == ["b"]
    assert _siblings(final) == []  # no partial or old directory left behind


def test_a_failed_block_leaves_the_old_directory_and_no_partial(tmp_path):
    final = tmp_path / "aligned"
    with replaced_dir(final) as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with replaced_dir(final) as tmp:
            (tmp / "a").write_text("half")
            raise RuntimeError("disk full")
    assert (final / "a").read_text() == "old"
    assert _siblings(final) == []


def test_a_partial_directory_of_a_killed_run_is_cleared(tmp_path):
    final = tmp_path / "unlearned"
    stale = tmp_path / ".unlearned.partial"
    stale.mkdir()
    (stale / "junk").write_text("x")
    with replaced_dir(final) as tmp:
        assert not (tmp / "junk").exists()
        (tmp / "a").write_text("1")
    assert sorted(p.name for p in final.iterdir()) == ["a"] and not stale.exists()


def test_install_dir_puts_the_old_directory_back_when_the_rename_fails(tmp_path, monkeypatch):
    final, tmp = tmp_path / "export", tmp_path / ".export.tmp"
    final.mkdir()
    (final / "a").write_text("old")
    tmp.mkdir()
    real = os.replace

    def failing(src, dst):
        if str(src) == str(tmp):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(atu.atomic.os, "replace", failing)
    with pytest.raises(OSError, match="No space left"):
        install_dir(tmp, final)
    assert (final / "a").read_text() == "old"
    assert _siblings(final) == [".export.tmp"]  # the caller still owns its temporary directory
