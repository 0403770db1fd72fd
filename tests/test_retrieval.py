"""The retrieval prior: its spec, its masses over the trie, the runtime's use of it, and the shipped track
vectors that spare a fresh install the dense retriever's embedding pass."""

from __future__ import annotations

import shutil
import sqlite3

import numpy as np
import pytest

from talkplay_edge.calibration import SpanCalibration
from talkplay_edge.retrieval import RetrievalPrior, RetrievalSpec

RETRIEVAL = {"weight": 0.99, "gamma": 1.0, "k0": 1.0, "depth": 20}


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-cache"))


def test_spec_parse_and_calibration_round_trip():
    spec = RetrievalSpec.parse(RETRIEVAL)
    assert spec == RetrievalSpec(0.99, 1.0, 1.0, 20) and RetrievalSpec.parse(None) is None
    w = spec.rank_weights(4)
    assert np.isclose(w.sum(), 1) and np.all(np.diff(w) < 0)
    cal = SpanCalibration.parse({"alpha": [1], "beta": [0], "retrieval": RETRIEVAL})
    assert cal.retrieval == spec and SpanCalibration.parse(cal.to_json()) == cal
    assert SpanCalibration.parse('{"alpha": [1], "beta": [0]}').retrieval is None
    for bad in ({"weight": 1.0, "gamma": 1, "k0": 1, "depth": 5}, {"weight": 0.5, "gamma": 1, "k0": 0, "depth": 5},
                {"weight": 0.5, "gamma": 1, "k0": 1}, {"weight": "x", "gamma": 1, "k0": 1, "depth": 5}):
        with pytest.raises(ValueError, match="span calibration .*retrieval"):
            SpanCalibration.parse({"alpha": [1], "beta": [0], "retrieval": bad})


def test_masses_add_up_over_the_trie():
    """Every node holds the prior mass of the tracks below it: the root 1, a leaf its track's share."""
    from talkplay_edge.trie import CodeTrie

    trie = CodeTrie.build([[1, 5, 9], [1, 6, 9], [2, 5, 9], [2, 7, 9], [3, 5, 9]])
    spec = RetrievalSpec(0.6, 1.0, 2.0, 10)
    prior = RetrievalPrior(None, trie, {}, spec)
    ranked = [3, 0]
    m = prior.mass(ranked)
    w = spec.rank_weights(2)
    leaf = trie.leaf_of_track
    assert np.isclose(m[0], 1.0)
    assert np.isclose(m[leaf[3]], 0.4 / 5 + 0.6 * w[0]) and np.isclose(m[leaf[0]], 0.4 / 5 + 0.6 * w[1])
    assert np.isclose(m[leaf[4]], 0.4 / 5)
    for node in range(trie.n_nodes):  # a node's mass is its children's sum
        _, kids = trie.children(node)
        if len(kids):
            assert np.isclose(m[node], m[kids].sum())
    assert np.allclose(prior.mass([]), 0.4 * trie.count / 5)


@pytest.fixture()
def retrieval_only(runtime_gguf, tiny_catalog):
    """The tiny model with a calibration that ignores it (beta 0) and follows the retrieval prior."""
    from talkplay_edge.runtime import TalkPlay

    tp = TalkPlay.load(runtime_gguf, tiny_catalog, threads=1, n_ctx=1024,
                       span_calibration={"alpha": [1], "beta": [0], "retrieval": RETRIEVAL})
    yield tp
    cat = tp.catalog
    tp.close()
    cat.close()


def _history(cat):
    t = cat.tracks()[7]
    played = cat.playlists()[0]["track_ids"][0]
    return [{"role": "user", "content": "something to start"},
            {"role": "assistant", "content": "here", "track_ids": [played]},
            {"role": "user", "content": f"more like {t.title} by {t.artist}"}], {played}


def test_the_prior_alone_ranks_as_the_retrievers(retrieval_only):
    """alpha 1 and beta 0 telescope to log prior(track): the model's beam search must return the retrievers'
    fused ranking (the hybrid baseline's) first. (Exact here: each of the 20 retrieved tracks outweighs any
    subtree of unretrieved ones, so all their prefixes fit the 32-wide beam.)"""
    from talkplay_edge.runtime import ModelRecommender

    tp = retrieval_only
    history, exclude = _history(tp.catalog)
    fused = tp.retrieval.hybrid.fused(history, exclude, RETRIEVAL["depth"])[:RETRIEVAL["depth"]]
    assert len(fused) == RETRIEVAL["depth"]
    got = ModelRecommender(tp=tp).recommend(history, exclude, 32)
    assert got[:len(fused)] == fused
    assert tp.retrieval.hybrid.dense.index is tp.track_index  # one id -> row mapping, shared
    log_prior = tp.retrieval_prior(history, exclude)
    leaf = tp.trie.leaf_of_track[[tp.track_index[t] for t in fused]]
    assert np.all(np.diff(log_prior[leaf]) < 0)  # strictly decreasing along the ranking


def _greedy(tp, log_prior, excl) -> str:
    """The track a greedy span picks when only the prior counts: the heaviest allowed child at every node."""
    node = tp.trie.root
    while tp.trie.track[node] < 0:
        _, kids = excl.allowed(node)
        node = int(kids[int(np.argmax(log_prior[kids]))])
    return tp.track_ids[int(tp.trie.track[node])]


def test_a_chat_turn_uses_the_prior(retrieval_only):
    """A greedy span follows the prior of its own request: the heaviest child at every node, turn after
    turn (the first track then excluded), and not the track-count prior's pick."""
    from talkplay_edge.trie import Exclusions

    tp = retrieval_only
    history, _ = _history(tp.catalog)
    message = history[-1]["content"]
    session = tp.chat(max_new_tokens=4)
    first = session.send(message)
    excl = Exclusions(tp.trie)
    want = _greedy(tp, tp.retrieval_prior([{"role": "user", "content": message}]), excl)
    assert first.tracks[0].id == want and "retrieval_s" in first.timings
    assert want != _greedy(tp, np.log(np.maximum(tp.trie.count, 1)), excl)
    second = session.send(message)
    excl.exclude(tp.track_index[want])
    want2 = _greedy(tp, tp.retrieval_prior(session.history[:-1], [want]), excl)
    assert second.tracks[0].id == want2 != want


def test_shipped_track_vectors(tiny_catalog, text_encoder, tmp_path, monkeypatch):
    """``write_track_vectors`` stores int8 vectors beside the catalog; a fresh cache takes them instead of
    embedding every track; vectors for other tracks (a stale file) are ignored."""
    from talkplay_edge.baselines import read_track_vectors, track_embeddings, track_vectors_file, write_track_vectors
    from talkplay_edge.catalog import Catalog

    db = tmp_path / "cat.db"
    shutil.copy(tiny_catalog, db)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache-a"))
    with Catalog.open(db) as cat:
        summary = write_track_vectors(cat, text_encoder, show_progress=False)
        assert summary["path"] == str(track_vectors_file(db)) == str(tmp_path / "cat.vectors.npz")
        ids, exact = track_embeddings(cat, text_encoder, show_progress=False)

        class NoEncode:
            name, version, dim = text_encoder.name, text_encoder.version, text_encoder.dim

            def encode(self, texts, **kw):
                raise AssertionError("embedded the tracks despite the shipped vectors")

        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache-b"))  # a fresh install: nothing cached
        ids2, shipped = track_embeddings(cat, NoEncode(), show_progress=False)
        assert ids2 == ids and np.abs(shipped - exact).max() < 0.01
        assert np.allclose(np.linalg.norm(shipped, axis=1), 1, atol=1e-4)
        assert read_track_vectors(cat, text_encoder, ids[:-1]) is None  # other tracks: stale
        track_vectors_file(db).write_bytes(b"not a zip")
        assert read_track_vectors(cat, text_encoder, ids) is None
        write_track_vectors(cat, text_encoder, show_progress=False)
        assert read_track_vectors(cat, text_encoder, ids) is not None
    # the same tracks and fingerprint, another text (a rebuild with --codebooks): the vectors are stale
    con = sqlite3.connect(db)
    con.execute("""update tracks set playlists = '["Another Name"]' where id = ?""", [ids[0]])
    con.commit()
    con.close()
    with Catalog.open(db) as cat:
        assert cat.track_ids() == ids and read_track_vectors(cat, text_encoder, ids) is None
