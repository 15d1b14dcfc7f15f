"""Directories that appear whole or not at all: fill a hidden sibling, then rename it into place.

The export (`atu.export.write_export`), the checkpoint, ``aligned/`` and ``unlearned/`` of a run directory all swap
in this way, so a crash or a full disk leaves the previous directory or the new one, never a half-written one.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)


def fsync(path: Path) -> None:
    """Flush a file, or a directory's entries, to disk."""
    if path.is_dir() and os.name == "nt":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sibling(final: Path, tag: str) -> Path:
    """A hidden, unused name next to ``final`` (same filesystem, so renames between them are atomic)."""
    return final.parent / f".{final.name}.{tag}-{secrets.token_hex(6)}"


def install_dir(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` to ``final``. An existing ``final`` is moved aside first, put back if the rename
    fails, and removed only once the new one is in place."""
    old = None
    if final.exists():
        old = sibling(final, "old")
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if old is not None:
            os.replace(old, final)
        raise
    fsync(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
        if old.exists():
            logger.warning("could not remove the replaced directory at %s; delete it by hand", old)


@contextmanager
def replaced_dir(final: Path) -> Iterator[Path]:
    """Yield an empty directory beside ``final`` to fill; when the block ends without error it takes ``final``'s
    place (`install_dir`). If the block fails, the partial directory is removed and ``final`` is left as it was.
    The partial directory has a fixed name, so one left by a killed process is cleared by the next call."""
    tmp = final.parent / f".{final.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        install_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
