"""Shared fixtures: fake source data in the real formats, and a tiny catalog built from it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TALKPLAY_PROGRESS", "0")
os.environ.pop("TALKPLAY_CATALOG", None)


@pytest.fixture(autouse=True, scope="session")
def _isolated_user_dirs(tmp_path_factory):
    """Tests never read or write the developer's own user catalog or cache of built models."""
    home = tmp_path_factory.mktemp("xdg")
    old = {k: os.environ.get(k) for k in ("XDG_DATA_HOME",)}
    os.environ["XDG_DATA_HOME"] = str(home / "data")
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v

from fakedata import write_fake_data  # noqa: E402

from conftest_gguf import *  # noqa: F401,F403,E402  (tiny llama GGUFs)
from conftest_runtime import *  # noqa: F401,F403,E402  (a tiny GGUF matching tiny_catalog)


@pytest.fixture(scope="session")
def fake_data_dir(tmp_path_factory) -> Path:
    return write_fake_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def text_encoder():
    from talkplay_edge.text_encoder import TextEncoder

    return TextEncoder(threads=2)


@pytest.fixture(scope="session")
def tiny_catalog(fake_data_dir, text_encoder, tmp_path_factory) -> Path:
    """A catalog of ~56 fake tracks (K=8 per modality) built by the real builder."""
    from talkplay_edge.catalog_build import build_catalog
    from talkplay_edge.sources import load_sources

    out = tmp_path_factory.mktemp("catalog") / "catalog.db"
    build_catalog(load_sources(fake_data_dir), out, text_encoder, k=8, quiet=True)
    return out
