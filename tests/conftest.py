"""Shared fixtures: a tiny world (4 people, 2-layer model trained for seconds) built once per session."""

from __future__ import annotations

import os

import pytest

# The tests never talk to a model hub; make any accidental attempt fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("atu-cache")


@pytest.fixture(scope="session")
def tiny_world(cache_root):
    from atu.world.build import build_world
    from atu.world.config import WorldConfig

    return build_world(WorldConfig.tiny(), root=cache_root, progress=False)
