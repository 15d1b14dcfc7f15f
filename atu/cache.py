"""A content-addressed build cache, in the spirit of the Hugging Face cache.

An entry is a directory ``<root>/<kind>/<key>`` where ``key`` is a hash of the config that built it.
Building happens in a temporary sibling directory that is renamed into place only once complete, so a
crash never leaves an entry that looks finished. A per-key file lock stops two processes from building
the same entry at once; the second one waits, then reuses the first one's result.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from atu import envs

logger = logging.getLogger(__name__)

COMPLETE_MARKER = ".complete"


def config_key(config: dict[str, Any]) -> str:
    """A short stable hash of a JSON-serialisable config (key order does not matter)."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def entry_dir(kind: str, key: str, root: Path | None = None) -> Path:
    return (root or envs.cache_root()) / kind / key


def is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file()


def get_or_build(
    kind: str, config: dict[str, Any], build: Callable[[Path], None], *, root: Path | None = None, force: bool = False
) -> Path:
    """Return the cache entry for ``config``, calling ``build(tmp_dir)`` to create it if missing.

    ``build`` writes everything into the directory it is given. The entry's ``config.json`` records the
    config that made it.
    """
    key = config_key(config)
    final = entry_dir(kind, key, root)
    if is_complete(final) and not force:
        logger.info("reusing cached %s %s", kind, final)
        return final
    with _locked(final.parent / f".{key}.lock"):
        if is_complete(final) and not force:  # another process finished it while we waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".partial", dir=final.parent))
        try:
            build(tmp)
            (tmp / "config.json").write_text(json.dumps(config, sort_keys=True, indent=2, default=str) + "\n")
            (tmp / COMPLETE_MARKER).write_text(key + "\n")
            _fsync_tree(tmp)
            if final.exists():
                shutil.rmtree(final)  # an incomplete leftover or a forced rebuild
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _fsync_tree(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
