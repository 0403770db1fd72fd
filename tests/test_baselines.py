"""Every baseline on the tiny generated catalog: valid, unique, non-excluded ids; each one's own behaviour."""

from __future__ import annotations

import numpy as np
import pytest

from talkplay_edge.baselines import (
    BM25Recommender, CFRecommender, DenseRecommender, PopularityRecommender, RandomRecommender, content_terms, rrf,
    embed_texts_cached, track_embeddings,
)
from talkplay_edge.catalog import Catalog
from talkplay_edge.evaluate import get_recommender

BASELINES = ("bm25", "cf", "dense", "hybrid", "popularity", "random")


@pytest.fixture(scope="module")
def cat(tiny_catalog):
    with Catalog.open(tiny_catalog) as c:
        yield c


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-cache"))


def history_for(cat, n_played: int, user: str = "play some rock") -> tuple[list[dict], set[str]]:
    pl = cat.playlists()[0]["track_ids"]
    h: list[dict] = []
    for tid in pl[:n_played]:
        h += [{"role": "user", "content": user}, {"role": "assistant", "content": "ok", "track_ids": [tid]}]
    h.append({"role": "user", "content": user})
    return h, set(pl[:n_played])


@pytest.mark.parametrize("system", BASELINES)
def test_every_baseline_returns_valid_unique_non_excluded(cat, system, text_encoder):
    rec = get_recommender(system, cat, threads=1, encoder=text_encoder, show_progress=False)
    valid = set(cat.track_ids())
    for n_played in (0, 1, 3):
        history, exclude = history_for(cat, n_played)
        for n in (5, 100):
            out = rec.recommend(history, set(exclude), n)
            assert len(out) == len(set(out)) == min(n, len(valid) - len(exclude)), (system, n_played, n)
            assert set(out) <= valid and not set(out) & exclude


def test_popularity_order(cat):
    rec = PopularityRecommender(cat)
    pops = {r[0]: r[1] or 0 for r in cat.conn.execute("select id, popularity from tracks")}
    out = rec.recommend([{"role": "user", "content": "hi"}], set(), 20)
    assert [pops[t] for t in out] == sorted((pops[t] for t in out), reverse=True)
    assert pops[out[0]] == max(pops.values())
    assert out[0] not in rec.recommend([{"role": "user", "content": "hi"}], {out[0]}, 20)


def test_random_is_seeded(cat):
    h, _ = history_for(cat, 1)
    a, b, c = RandomRecommender(cat, seed=0), RandomRecommender(cat, seed=0), RandomRecommender(cat, seed=1)
    assert a.recommend(h, set(), 20) == b.recommend(h, set(), 20) != c.recommend(h, set(), 20)


def test_bm25_finds_the_named_artist(cat):
    artist = next(t.artist for t in cat.tracks() if t.artist.startswith("The "))  # e.g. "The Nights"
    rec = BM25Recommender(cat)
    assert content_terms(f"Play something by {artist}, please!") == [w.casefold() for w in artist.split()[1:]]
    out = rec.recommend([{"role": "user", "content": f"Play something by {artist}"}], set(), 10)
    by_artist = {t.id for t in cat.tracks() if t.artist == artist}
    assert out[0] in by_artist
    # the latest turn weighs more than the earlier one
    other = next(t.artist for t in cat.tracks() if t.artist != artist and t.artist.startswith("The "))
    h = [{"role": "user", "content": f"something by {other}"}, {"role": "assistant", "content": "", "track_ids": []},
         {"role": "user", "content": f"now {artist}"}]
    h[1]["track_ids"] = [next(t.id for t in cat.tracks() if t.artist == other)]
    assert rec.recommend(h, set(h[1]["track_ids"]), 5)[0] in by_artist


def test_bm25_reads_the_last_eight_user_turns(cat):
    """A long chat's query is its last 8 user turns (the evaluation's conversations have at most 8), the
    latest twice: older turns' words drop out, so the query, and the memory it takes, stay bounded."""
    history = []
    for i in range(12):
        history += [{"role": "user", "content": f"word{i}"}, {"role": "assistant", "content": "", "track_ids": []}]
    history.pop()
    got = BM25Recommender(cat).query_terms(history)
    assert got == ["word11", "word11"] + [f"word{i}" for i in range(4, 11)]
    assert len(BM25Recommender(cat, history_turns=None).query_terms(history)) == 13


def test_cf_neighbours(cat):
    rec = CFRecommender(cat)
    h, exclude = history_for(cat, 1)
    played = next(iter(exclude))
    out = rec.recommend(h, exclude, 5)
    if played in rec.index:  # the nearest item2vec neighbour by cosine comes first
        v = rec.mat[rec.index[played]]
        sims = rec.mat @ v
        sims[rec.index[played]] = -np.inf
        assert out[0] == rec.ids[int(np.argmax(sims))]
    first_turn = rec.recommend([{"role": "user", "content": "hi"}], set(), 5)
    assert first_turn == PopularityRecommender(cat).recommend([], set(), 5)


def test_dense_cache_and_query(cat, text_encoder, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    ids, mat = track_embeddings(cat, text_encoder, show_progress=False)
    files = list((tmp_path / "talkplay-edge" / "dense").glob("*.npy"))
    assert len(files) == 1 and cat.fingerprint[:16] in files[0].name
    assert len(list((tmp_path / "talkplay-edge" / "dense").glob("texts-*.npz"))) == 1
    assert mat.shape == (len(cat), text_encoder.dim) and np.allclose(np.linalg.norm(mat, axis=1), 1, atol=1e-3)

    class NoEncode:  # the second load must come from the cache
        name, version, dim = text_encoder.name, text_encoder.version, text_encoder.dim

        def encode(self, texts, **kw):
            raise AssertionError("re-encoded despite the cache")

    ids2, mat2 = track_embeddings(cat, NoEncode(), show_progress=False)
    assert ids2 == ids and np.array_equal(mat, mat2)
    files[0].unlink()  # the per-encoder text store still spares re-encoding
    ids3, mat3 = track_embeddings(cat, NoEncode(), show_progress=False)
    assert np.array_equal(mat, mat3)
    rec = DenseRecommender(cat, encoder=text_encoder, show_progress=False)
    same = {t: i for i, t in enumerate(ids)}  # a mapping the caller holds already is used, not rebuilt ...
    assert DenseRecommender(cat, encoder=text_encoder, show_progress=False, index=same).index is same
    other = dict(same, **{ids[0]: 1, ids[1]: 0})  # ... unless it maps some id to another row
    assert DenseRecommender(cat, encoder=text_encoder, show_progress=False, index=other).index == same
    t = cat.tracks()[5]
    out = rec.recommend([{"role": "user", "content": "hello"}, {"role": "assistant", "content": "", "track_ids": ["x"]},
                         {"role": "user", "content": f"{t.title} by {t.artist}"}], set(), 5)
    assert t.id in out


def test_text_store_keeps_keys_and_rows_aligned(tmp_path, monkeypatch):
    """Texts whose sha1 ends in a NUL byte once lost it in the store ("S20" keys), were embedded again, and the
    duplicate keys then shifted every later row: the store must give each text its own vector, save after save."""
    import hashlib

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))

    def expect(texts):  # a vector that says which text it came from
        return np.array([[float(len(t)), float(sum(map(ord, t)))] + [0.0] * 6 for t in texts], np.float32)

    class HashEncoder:
        name, version, dim = "hash-encoder", "1", 8
        calls = 0

        def encode(self, texts, **kw):
            HashEncoder.calls += len(texts)
            return expect(texts)

    nul = [t for t in (f"track {i}" for i in range(5000)) if hashlib.sha1(t.encode()).digest()[-1] == 0][:3]
    assert len(nul) == 3
    enc = HashEncoder()
    for round_ in range(4):  # each round adds texts and rewrites the store
        texts = nul + [f"other {round_} {j}" for j in range(20)] + ["shared text"]
        before = HashEncoder.calls
        got = embed_texts_cached(texts, enc, show_progress=False)
        assert np.array_equal(got, expect(texts))
        assert HashEncoder.calls - before == (24 if round_ == 0 else 20)  # only the new texts are encoded
    store = np.load(next((tmp_path / "talkplay-edge" / "dense").glob("texts-*.npz")))
    assert store["keys"].shape == (len(store["vecs"]), 20)


def test_rrf_hand_computed():
    assert rrf([["a", "b"], ["b", "c"]], k=1) == ["b", "a", "c"]  # b: 1/3 + 1/2, a: 1/2, c: 1/3
    assert rrf([["a"], ["b"]], k=60) == ["a", "b"]  # tie broken by id


def test_bm25_memoised_search_equals_the_fts5_query(cat):
    """``search`` (per-term scores, memoised, summed in query order) must rank exactly as one FTS5 query,
    repeated terms and ties included, before and after the memo is warm."""
    rec = BM25Recommender(cat)
    words = sorted({w for t in cat.tracks()[:40] for w in content_terms(f"{t.title} {t.artist} {t.album or ''}")})
    assert len(words) >= 6
    queries = [words[:1], words[:3], words[2:6] * 2 + words[:1], [words[0]] * 3 + words[-2:], words[::2], ["zzzqqq"]]
    for _ in range(2):
        for q in queries:
            assert rec.search(q, 50) == rec.search_fts(q, 50), q
    assert rec.search([], 5) == [] and rec.search(["zzzqqq"], 5) == []


def test_track_vectors_int8():
    """``TrackVectors`` scores like the L2-normalised float rows it quantises (every row, the last partial
    block too), gives float rows back, and holds a quarter of float32's bytes."""
    from talkplay_edge.baselines import TrackVectors

    rng = np.random.default_rng(0)
    mat = rng.normal(size=(TrackVectors.BLOCK + 37, 24)).astype(np.float32)
    vec = TrackVectors.quantize(mat)
    want = vec.q.astype(np.float64) / np.linalg.norm(vec.q.astype(np.float64), axis=1, keepdims=True)
    v = rng.normal(size=24).astype(np.float32)
    got = vec @ v
    assert got.shape == (len(mat),) and np.allclose(got, want @ v, atol=1e-5)
    assert np.allclose(vec[[3, len(mat) - 1]], want[[3, len(mat) - 1]], atol=1e-6)
    assert np.abs(want - mat / np.linalg.norm(mat, axis=1, keepdims=True)).max() < 0.02  # int8 rounding
    assert vec.nbytes < mat.nbytes / 3
    assert len(TrackVectors.quantize(np.zeros((0, 24), np.float32)) @ v) == 0


def test_dense_takes_the_shipped_int8_vectors(cat, text_encoder, tmp_path, monkeypatch):
    """With vectors shipped beside the catalog the dense retriever holds them as int8 (no float copy) and
    ranks as the float vectors read from the same file."""
    import shutil

    from talkplay_edge.baselines import TrackVectors, _top, read_track_vectors, write_track_vectors
    from talkplay_edge.catalog import Catalog

    db = tmp_path / "cat.db"
    shutil.copy(cat.path, db)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with Catalog.open(db) as c:
        write_track_vectors(c, text_encoder, show_progress=False)
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "fresh"))
        rec = DenseRecommender(c, encoder=text_encoder, show_progress=False)
        assert isinstance(rec.mat, TrackVectors)
        floats = read_track_vectors(c, text_encoder, rec.ids)
        h, exclude = history_for(c, 2)
        q = rec.query(h)
        assert np.allclose(rec.mat @ q, floats @ q, atol=1e-5)
        assert rec.recommend(h, exclude, 10) == _top(floats @ q, rec.ids, exclude, 10)
