"""Load, long sessions and killed indexing, on the tiny model and catalog (``bench/stress.py`` runs the same
functions on the real model and catalog; its figures are in the README's Reliability table)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
AUDIO_DIR = ROOT.parent / "shared" / "data" / "audio"


@pytest.fixture(scope="module")
def small_ctx_tp(runtime_gguf, tiny_catalog):
    from talkplay_edge.runtime import TalkPlay

    tp = TalkPlay.load(runtime_gguf, tiny_catalog, threads=1, n_ctx=256)
    yield tp
    cat = tp.catalog
    tp.close()
    cat.close()


def test_8_threads_x_200_requests_on_one_model(small_ctx_tp):
    from stress import run_load

    r = run_load(small_ctx_tp, threads=8, requests=200, max_new_tokens=3, replay=True)
    assert r["errors"] == 0, r["error_samples"]
    assert r["requests"] == 1600
    assert r["replies_differing_from_sequential_replay"] == 0  # no reply built from another session's state
    assert r["kv_snapshots"]["restored"] > 1000  # sessions switched by restoring their own KV cells
    print(r)


def test_500_turn_session_never_fails_and_memory_stays_flat(small_ctx_tp):
    from stress import run_long

    r = run_long(small_ctx_tp, turns=500, max_new_tokens=8)
    assert r["compactions"] >= 10 and r["kv_tokens_end"] <= r["n_ctx"]
    assert r["rss_growth_second_half_mb"] < 16, r["rss_samples"]
    print({k: v for k, v in r.items() if k != "rss_samples"})


@pytest.mark.skipif(not AUDIO_DIR.is_dir(), reason="real audio clips not found")
def test_index_killed_at_random_moments_loses_nothing(tiny_catalog):
    from stress import run_kills

    r = run_kills(kills=4, seed=3, files=[AUDIO_DIR / "sorohanro_-_solo-trumpet-06.ogg"], catalog=tiny_catalog)
    assert r["violations"] == [], r["violations"]
    assert r["completed"], r
    assert r["killed_mid_run"] == 4, r["log"]
    print({k: v for k, v in r.items() if k != "log"})


def test_sessions_without_kv_snapshots_still_continue_their_own_history(runtime_gguf, tiny_catalog):
    """session_cache_mb=0: every switch re-prefills from the shared prefix; still no errors, real tracks."""
    from stress import run_load

    from talkplay_edge.runtime import TalkPlay

    with TalkPlay.load(runtime_gguf, tiny_catalog, threads=1, n_ctx=256, session_cache_mb=0) as tp:
        r = run_load(tp, threads=3, requests=30, max_new_tokens=3, replay=False)
        assert r["errors"] == 0 and r["requests"] == 90, r["error_samples"]
        assert r["kv_snapshots"] == {"saved": 0, "restored": 0, "evicted": 0}
    tp.catalog.close()
