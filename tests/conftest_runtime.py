"""Fixtures for the runtime tests: a tiny random-weight GGUF whose music tokens are ``tiny_catalog``'s.

``runtime_gguf`` is built once per session with ``tinymodel.build_tiny_gguf(music_tokens, out_dir,
fingerprint)`` (the GGUF pipeline's own tiny-model builder). ``mismatched_gguf`` is a byte copy of it with
a different ``talkplay.vocab_fingerprint`` (same length, patched in the header), for the refusal test.
Import from conftest.py: ``from conftest_runtime import *``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

__all__ = ["runtime_gguf", "mismatched_gguf", "talkplay"]


@pytest.fixture(scope="session")
def runtime_gguf(tiny_catalog, tmp_path_factory) -> Path:
    from tinymodel import build_tiny_gguf

    from talkplay_edge.catalog import Catalog

    with Catalog.open(tiny_catalog) as cat:
        vocab, fp = list(cat.vocabulary), cat.fingerprint
    out = build_tiny_gguf(vocab, tmp_path_factory.mktemp("runtime_gguf"), fp)
    return Path(out)


@pytest.fixture(scope="session")
def mismatched_gguf(runtime_gguf, tiny_catalog, tmp_path_factory) -> Path:
    from talkplay_edge.catalog import Catalog

    with Catalog.open(tiny_catalog) as cat:
        fp = cat.fingerprint.encode()
    data = runtime_gguf.read_bytes()
    assert data.count(fp) == 1, "fingerprint not found once in the GGUF header"
    other = bytes(reversed(fp)) if bytes(reversed(fp)) != fp else b"0" * len(fp)
    out = tmp_path_factory.mktemp("mismatch") / "other.gguf"
    out.write_bytes(data.replace(fp, other))
    return out


@pytest.fixture(scope="session")
def talkplay(runtime_gguf, tiny_catalog):
    """One loaded TalkPlay (tiny model, n_ctx 1024) shared by the runtime tests."""
    from talkplay_edge.runtime import TalkPlay

    tp = TalkPlay.load(runtime_gguf, tiny_catalog, threads=1, n_ctx=1024)  # 1 thread: robust on a busy CPU
    yield tp
    cat = tp.catalog
    tp.close()
    cat.close()


def check_turn(reply, catalog_ids: set[str], seen: set[str]) -> bool:
    """Assert one turn's documented outcome: one real catalog track not recommended before in the session
    (added to ``seen``), or — once every track was recommended — no track at all. Returns whether the
    catalog was exhausted (the caller then resets the session and ``seen``)."""
    if reply.exhausted:
        assert reply.tracks == [] and seen == catalog_ids
        return True
    assert len(reply.tracks) == 1
    track = reply.tracks[0]
    assert track.id in catalog_ids and track.id not in seen
    seen.add(track.id)
    return False
