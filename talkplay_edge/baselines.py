"""Baseline recommenders for `talkplay eval` (all implement ``recommender.Recommender``).

- ``popularity``: the catalog's most popular tracks.
- ``random``: a seeded random ranking (seeded by ``seed`` and the conversation so far: reproducible).
- ``bm25``: SQLite FTS5 BM25 over title, artist, album and tags; the query is the last 8 user turns (all
  of them in the evaluation's conversations), the latest counted twice (content words only).
- ``dense``: MiniLM embedding of the conversation against each track's "metadata · tags" embedding: the
  user turns (latest weighted up: weights 1, ½, ¼, …), normalised, plus ``track_weight`` (2) × the mean
  embedding of the tracks played so far; the track matrix is computed once and cached under
  ``paths.cache_dir()/dense/`` keyed by the catalog's vocab fingerprint and the encoder.
- ``cf``: item2vec neighbours of the tracks played so far (recent ones weighted up); popularity on the
  first turn and for tracks without a CF vector.
- ``hybrid``: reciprocal-rank fusion (k=60) of bm25, dense and cf (cf only once a played track has a CF
  vector; its popularity fallback is not fused).

Every list is topped up with popular tracks to ``n`` so all systems return full lists, and never holds an
excluded (already played) id.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import sys

import numpy as np

from .modalities import metadata_text
from .paths import cache_dir
from .progress import progress

STOPWORDS = frozenset("""
a about above after again against all am an and any anything are as at be because been before being below
between both but by can could did do does doing down during each else enough few for from further get give
got had has have having he her here hers him his how i i'd i'll i'm i've if in into is it it's its itself just
keep kind know let let's like lot make me more most my myself need next no nope nor not now of off ok okay on
once one only or other our out over own play please put really right same she should so some someone something
song songs sound sounds start such than that that's the their them then there these they this those through
to too track tracks try tune up very want was way we were what what's when where which while who why will
with would yes you your yours thing stuff music listen listening hear hey hmm maybe meh nah bit little
another love playlist recommend recommendation recommendations called mood vibe vibes feel feeling pick
find go going looking fits fit fill suggest suggestions ideas called named titled into lately
""".split())


def user_turns(history: list[dict]) -> list[str]:
    return [t["content"] for t in history if t.get("role") == "user"]


def played_ids(history: list[dict]) -> list[str]:
    return [tid for t in history if t.get("role") == "assistant" for tid in t.get("track_ids") or []]


def content_terms(text: str) -> list[str]:
    """Lower-cased alphanumeric terms of ``text`` without stopwords (the BM25 query terms)."""
    terms = "".join(c if c.isalnum() else " " for c in text.casefold()).split()
    return [t for t in terms if t not in STOPWORDS]


def _fill(ranked: list[str], fallback: list[str], exclude: set[str], n: int) -> list[str]:
    """``ranked`` without excluded/duplicate ids, topped up from ``fallback`` to ``n``."""
    out, seen = [], set(exclude)
    for src in (ranked, fallback):
        for tid in src:
            if tid not in seen:
                seen.add(tid)
                out.append(tid)
                if len(out) >= n:
                    return out
    return out


def _top(scores: np.ndarray, ids: list[str], exclude: set[str], n: int) -> list[str]:
    k = min(len(ids), n + len(exclude))
    if k <= 0:
        return []
    part = np.argpartition(-scores, k - 1)[:k] if k < len(ids) else np.arange(len(ids))
    order = part[np.lexsort((part, -scores[part]))]
    return [ids[i] for i in order if ids[i] not in exclude][:n]


class PopularityRecommender:
    name = "popularity"

    def __init__(self, catalog, threads: int = 2, **kw):
        self.ids = catalog.popular_ids()

    def recommend(self, history: list[dict], exclude: set[str], n: int = 100) -> list[str]:
        return _fill([], self.ids, exclude, n)


class RandomRecommender:
    name = "random"

    def __init__(self, catalog, threads: int = 2, seed: int = 0, **kw):
        self.ids = catalog.track_ids()
        self.seed = seed

    def recommend(self, history: list[dict], exclude: set[str], n: int = 100) -> list[str]:
        key = hashlib.sha256(json.dumps([self.seed, history], sort_keys=True).encode()).hexdigest()
        rng = random.Random(key)
        k = min(len(self.ids), n + len(exclude))
        return [t for t in rng.sample(self.ids, k) if t not in exclude][:n]


class BM25Recommender:
    """FTS5 BM25 over title, artist, album, tags; query = the last ``history_turns`` user turns (latest twice),
    content words only. The cap keeps a long chat's queries (and the memory and time they take) bounded;
    ``None`` reads every turn."""

    name = "bm25"

    def __init__(self, catalog, threads: int = 2, history_turns: int | None = 8, latest_weight: int = 2,
                 column_weights: tuple[float, float, float, float] = (1.0, 1.0, 0.5, 2.0), **kw):
        self.catalog = catalog
        self.history_turns = history_turns
        self.latest_weight = latest_weight
        self.column_weights = column_weights
        self.popular = catalog.popular_ids()
        self._terms: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # term -> (row numbers, scores)
        self._memo_postings = 0  # rows held in self._terms
        self._index: tuple[np.ndarray, np.ndarray, list[str], np.ndarray] | None = None  # see _row_index

    def query_terms(self, history: list[dict]) -> list[str]:
        turns = user_turns(history)
        turns = turns[-self.history_turns:] if self.history_turns else turns
        if not turns:
            return []
        terms = content_terms(turns[-1]) * self.latest_weight
        for t in turns[:-1]:
            terms += content_terms(t)
        return terms

    def search_fts(self, terms: list[str], limit: int) -> list[str]:
        """The ranking as one FTS5 query: ``"t1" OR "t2" …`` ordered by bm25, then id."""
        if not terms:
            return []
        match = " OR ".join(f'"{t}"' for t in terms)
        w = ", ".join(str(x) for x in self.column_weights)
        q = (f"select tracks.id from tracks_fts join tracks on tracks.rowid = tracks_fts.rowid "
             f"where tracks_fts match ? order by bm25(tracks_fts, {w}), tracks.id limit ?")
        return [r[0] for r in self.catalog.conn.execute(q, [match, limit])]

    def _term_scores(self, term: str) -> tuple[np.ndarray, np.ndarray]:
        """(row numbers, BM25 score) of the tracks matching one term; memoised (a common tag term matches
        most of the catalog, and scoring it is most of a query's cost)."""
        got = self._terms.get(term)
        if got is None:
            rowids, row_of, _, _ = self._row_index()
            w = ", ".join(str(x) for x in self.column_weights)
            hits = self.catalog.conn.execute(f"select rowid, bm25(tracks_fts, {w}) from tracks_fts where tracks_fts match ?",
                                             [f'"{term}"']).fetchall()
            hit_rowids = np.fromiter((r for r, _ in hits), dtype=np.int64, count=len(hits))
            # tracks_fts is an external-content index of tracks: every hit's rowid is a track's
            got = (row_of[np.searchsorted(rowids, hit_rowids)],
                   np.fromiter((-b for _, b in hits), dtype=np.float64, count=len(hits)))
            if self._memo_postings > 2_000_000:  # ~24 MB of memoised postings
                self._terms.clear()
                self._memo_postings = 0
            self._terms[term] = got
            self._memo_postings += len(got[0])
        return got

    def _row_index(self) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
        """(SQLite rowids sorted, the row number of each of them, track id of each row, rank of each row's id in
        id order), read once; a rowid's row number is ``row_of[searchsorted(rowids, rowid)]``."""
        if self._index is None:
            rows = self.catalog.conn.execute("select rowid, id from tracks").fetchall()
            ids = [sys.intern(r[1]) for r in rows]
            id_rank = np.empty(len(ids), dtype=np.int64)
            id_rank[sorted(range(len(ids)), key=ids.__getitem__)] = np.arange(len(ids))
            rowids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            order = np.argsort(rowids, kind="stable").astype(np.int32)
            self._index = (rowids[order], order, ids, id_rank)
        return self._index

    def search(self, terms: list[str], limit: int) -> list[str]:
        """``search_fts``'s ranking, from memoised per-term scores. FTS5's bm25 is a sum over the query's
        phrases (a repeated term counts again); adding the per-term scores in the query's order gives each
        track the same double as FTS5, so the order is the same, ties (by id) included."""
        if not terms:
            return []
        parts = [self._term_scores(t) for t in terms]
        rows = np.concatenate([r for r, _ in parts])
        if not len(rows):
            return []
        uniq, inv = np.unique(rows, return_inverse=True)
        score = np.bincount(inv, weights=np.concatenate([s for _, s in parts]), minlength=len(uniq))
        _, _, ids, id_rank = self._row_index()
        order = np.lexsort((id_rank[uniq], -score))[:limit]
        return [ids[i] for i in uniq[order]]

    def recommend(self, history: list[dict], exclude: set[str], n: int = 100) -> list[str]:
        hits = self.search(self.query_terms(history), n + len(exclude))
        return _fill(hits, self.popular, exclude, n)


DENSE_TEXT_VERSION = "meta+tags-v2"  # v2: built from the fixed text store (see TEXT_STORE_VERSION)


def track_text(row) -> str:
    """What the dense baseline embeds for a track: ``metadata_text · tags``."""
    meta = metadata_text({k: row[k] for k in ("title", "artist", "album", "year")})
    return f"{meta} · {row['tags']}" if row["tags"] else meta


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s)[:60]


# v2: keys are stored as a [n, 20] uint8 array. v1 stored them as numpy "S20" strings, which drop trailing
# NUL bytes: a sha1 ending in 0x00 came back 19 bytes long, was embedded again under its full key, and the
# duplicates collapsed on the next load until keys and rows no longer lined up (wrong vectors for most texts).
TEXT_STORE_VERSION = "v2"


def _text_store_path(encoder) -> "os.PathLike":
    name = f"texts-{TEXT_STORE_VERSION}-{_safe(encoder.name)}-{_safe(str(encoder.version))}.npz"
    return cache_dir() / "dense" / name


def _load_text_store(path) -> tuple[dict[bytes, int], np.ndarray] | None:
    """(sha1 → row, vectors) of a text store, or None when it is unreadable or its keys and rows disagree."""
    try:
        with np.load(path) as z:
            keys, vecs = z["keys"], z["vecs"]
    except (OSError, ValueError, KeyError):
        return None
    if keys.dtype != np.uint8 or keys.ndim != 2 or keys.shape[1] != 20 or len(keys) != len(vecs):
        return None
    index = {k.tobytes(): i for i, k in enumerate(keys)}
    return (index, vecs) if len(index) == len(vecs) else None


def _text_key(text: str) -> bytes:
    return hashlib.sha1(text.encode()).digest()


def embed_texts_cached(texts: list[str], encoder, cache: bool = True, show_progress: bool = True,
                       desc: str = "embedding tracks (dense baseline)") -> np.ndarray:
    """Embeddings of ``texts``, reusing the per-encoder text store (sha1(text) → vector) under the cache dir;
    new texts are embedded in batches with a progress bar and added to the store."""
    store_keys: dict[bytes, int] = {}
    store = np.zeros((0, getattr(encoder, "dim", 384)), np.float32)
    path = _text_store_path(encoder)
    loaded = _load_text_store(path) if cache and path.is_file() else None
    if loaded is not None:
        store_keys, store = loaded
    keys = [_text_key(t) for t in texts]
    todo = list(dict.fromkeys(k for k in keys if k not in store_keys))
    if todo:
        by_key = {k: t for k, t in zip(keys, texts)}
        parts, step = [], 512
        bar = progress(total=len(todo), desc=desc, unit="track") if show_progress else None
        for i in range(0, len(todo), step):
            parts.append(np.asarray(encoder.encode([by_key[k] for k in todo[i:i + step]]), dtype=np.float32))
            if bar is not None:
                bar.update(len(todo[i:i + step]))
        if bar is not None:
            bar.close()
        new = np.concatenate(parts)
        base = len(store)
        store = np.concatenate([store.reshape(base, new.shape[1]), new]) if base else new
        for j, k in enumerate(todo):
            store_keys[k] = base + j
        if cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.stem + f".tmp-{os.getpid()}.npz")
            all_keys = np.frombuffer(b"".join(sorted(store_keys, key=store_keys.get)), np.uint8).reshape(-1, 20)
            np.savez(tmp, keys=all_keys, vecs=store)
            os.replace(tmp, path)
    if not texts:
        return np.zeros((0, store.shape[1] if store.ndim == 2 else 384), np.float32)
    return store[[store_keys[k] for k in keys]]


def track_vectors_file(catalog_path) -> "os.PathLike":
    """The shipped track vectors beside a catalog: ``catalog.db`` → ``catalog.vectors.npz``."""
    from pathlib import Path

    p = Path(catalog_path)
    return p.with_name(p.stem + ".vectors.npz")


def _vectors_key(catalog, encoder, ids: list[str]) -> tuple[str, str]:
    """(key, digest) of the vectors for ``ids``: the digest covers the ids and what the catalog's tracks say
    (the columns ``track_text`` reads), so vectors of a catalog whose texts changed under the same
    vocabulary fingerprint (``talkplay catalog build --codebooks``) are stale."""
    key = f"{catalog.fingerprint[:16]}-{_safe(encoder.name)}-{_safe(str(encoder.version))}-{DENSE_TEXT_VERSION}"
    h = hashlib.sha256("\n".join(ids).encode())
    h.update(_text_digest(catalog))
    return key, h.hexdigest()[:16]


def _text_digest(catalog) -> bytes:
    """sha256 of the columns every track's ``track_text`` is made of, in id order (~0.2 s for the demo
    catalog; remembered on the catalog object)."""
    got = getattr(catalog, "_track_text_digest", None)
    if got is None:
        rows = catalog.conn.execute("select id, title, artist, album, year, genres, subgenres, artist_genres, "
                                    "playlists from tracks order by id").fetchall()
        got = catalog._track_text_digest = hashlib.sha256(repr([tuple(r) for r in rows]).encode()).digest()
    return got


def write_track_vectors(catalog, encoder, path=None, show_progress: bool = True) -> dict:
    """Store ``track_embeddings`` beside the catalog (``track_vectors_file``) as int8 rows with a scale each
    (¼ of float32; rankings agree with the float vectors to within noise), so a fresh install needs not
    embed every track (minutes on 2 cores) before dense retrieval works. Returns a summary."""
    ids, mat = track_embeddings(catalog, encoder, show_progress=show_progress)
    key, digest = _vectors_key(catalog, encoder, ids)
    q, scale = quantize_rows(mat)
    path = path or track_vectors_file(catalog.path)
    tmp = path.with_name(path.stem + f".tmp-{os.getpid()}.npz")
    np.savez_compressed(tmp, key=np.array(key), digest=np.array(digest), q=q, scale=scale)
    os.replace(tmp, path)
    return {"path": str(path), "tracks": len(ids), "bytes": path.stat().st_size, "key": key, "digest": digest}


class TrackVectors:
    """L2-normalised track vectors held as int8 rows (row i ≈ ``q[i] / |q[i]|``): ¼ of float32's memory
    (17 MB instead of 72 MB for the demo catalog). ``vectors @ v`` scores every row (single-threaded, in
    row blocks, so no BLAS threads spin on the cores llama.cpp decodes on); ``vectors[rows]`` gives float32
    rows."""

    BLOCK = 1024

    def __init__(self, q: np.ndarray):
        self.q = np.ascontiguousarray(q, dtype=np.int8)
        self.shape = self.q.shape
        norms = np.zeros(len(self.q), dtype=np.float32)
        for rows, b in self._blocks():
            norms[rows] = np.sqrt(np.einsum("ij,ij->i", b, b))
        self.inv_norm = (1.0 / np.where(norms > 0, norms, 1.0)).astype(np.float32)

    def _blocks(self):
        """(row slice, its rows as float32) in blocks: never a float copy of the whole matrix."""
        for s in range(0, len(self), self.BLOCK):
            rows = slice(s, s + self.BLOCK)
            yield rows, self.q[rows].astype(np.float32)

    @classmethod
    def quantize(cls, mat: np.ndarray) -> "TrackVectors":
        """From float rows: each row scaled so its largest |value| is 127, then rounded."""
        return cls(quantize_rows(mat)[0])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        return self.q[rows].astype(np.float32) * self.inv_norm[rows, None]

    def __matmul__(self, v: np.ndarray) -> np.ndarray:
        v = np.asarray(v, dtype=np.float32)
        out = np.empty(len(self), dtype=np.float32)
        for rows, b in self._blocks():
            out[rows] = np.einsum("ij,j->i", b, v)
        return out * self.inv_norm

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.inv_norm.nbytes


def quantize_rows(mat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 rows, float32 scale per row) with ``mat ≈ q * scale[:, None]``."""
    scale = np.maximum(np.abs(mat).max(axis=1), 1e-12).astype(np.float32) / 127.0 if len(mat) else np.zeros(0, np.float32)
    return np.round(mat / scale[:, None]).astype(np.int8), scale


def read_track_vectors(catalog, encoder, ids: list[str], as_int8: bool = False):
    """The shipped vectors when the file beside the catalog matches its tracks and the encoder: L2-normalised
    float32, or ``TrackVectors`` with ``as_int8``; None otherwise (missing, stale or unreadable: the caller
    embeds the tracks instead)."""
    path = track_vectors_file(catalog.path)
    if not path.is_file():
        return None
    key, digest = _vectors_key(catalog, encoder, ids)
    try:
        with np.load(path) as z:
            if str(z["key"]) != key or str(z["digest"]) != digest or z["q"].shape[0] != len(ids):
                return None
            if as_int8:
                return TrackVectors(z["q"])
            mat = z["q"].astype(np.float32) * z["scale"][:, None]
    except (OSError, ValueError, KeyError):
        return None
    norms = np.linalg.norm(mat, axis=1, keepdims=True)
    return mat / np.where(norms > 0, norms, 1.0)


def track_embeddings(catalog, encoder, cache: bool = True, show_progress: bool = True) -> tuple[list[str], np.ndarray]:
    """(track ids, float32 [n, dim] L2-normalised) of ``track_text``; cached as .npy per catalog and encoder
    (``cache_dir()/dense/<fingerprint>-<encoder>-….npy``), taken from the vectors shipped beside the catalog
    (``write_track_vectors``) when they match, else built from the per-encoder text store."""
    rows = catalog.rows("id, title, artist, album, year, tags").fetchall()
    ids = [r["id"] for r in rows]
    key, digest = _vectors_key(catalog, encoder, ids)
    path = cache_dir() / "dense" / f"{key}-{digest}.npy"
    if cache and path.is_file():
        mat = np.load(path)
        if mat.shape[0] == len(ids):
            return ids, mat
    mat = read_track_vectors(catalog, encoder, ids) if cache else None
    if mat is None:
        mat = embed_texts_cached([track_text(r) for r in rows], encoder, cache=cache, show_progress=show_progress)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + f".tmp-{os.getpid()}.npy")
        np.save(tmp, mat)
        os.replace(tmp, path)
    return ids, mat


def track_vectors(catalog, encoder, cache: bool = True, show_progress: bool = True) -> tuple[list[str], TrackVectors]:
    """(track ids, ``TrackVectors``): the shipped int8 vectors when they match (no float copy is made), else
    ``track_embeddings`` quantised the same way."""
    if cache:
        ids = catalog.track_ids()
        got = read_track_vectors(catalog, encoder, ids, as_int8=True)
        if got is not None:
            return ids, got
    ids, mat = track_embeddings(catalog, encoder, cache=cache, show_progress=show_progress)
    return ids, TrackVectors.quantize(mat)


class DenseRecommender:
    """MiniLM query (user turns, latest weighted up, + the played tracks' embeddings) · track embeddings
    (int8, ``TrackVectors``)."""

    name = "dense"

    def __init__(self, catalog, threads: int = 2, encoder=None, decay: float = 0.5, history_turns: int = 4,
                 track_weight: float = 2.0, cache: bool = True, show_progress: bool = True,
                 index: dict[str, int] | None = None, **kw):
        """``index``: a track id -> position mapping the caller holds already (the runtime's trie order),
        used instead of a second one when it maps the vectors' ids to their rows."""
        if encoder is None:
            from .text_encoder import TextEncoder

            encoder = TextEncoder(threads=threads)
        self.encoder = encoder
        self.ids, self.mat = track_vectors(catalog, encoder, cache=cache, show_progress=show_progress)
        same = index is not None and len(index) == len(self.ids) and all(index.get(t) == i for i, t in enumerate(self.ids))
        self.index = index if same else {t: i for i, t in enumerate(self.ids)}
        self.decay, self.history_turns, self.track_weight = decay, history_turns, track_weight
        self.popular = catalog.popular_ids()
        self._memo: dict[str, np.ndarray] = {}

    def embed(self, texts: list[str]) -> np.ndarray:
        """[n, dim] sentence embeddings of ``texts``, remembered (a conversation's turns recur)."""
        todo = [t for t in dict.fromkeys(texts) if t not in self._memo]
        if todo:
            if len(self._memo) > 20000:
                self._memo.clear()
            for t, v in zip(todo, np.asarray(self.encoder.encode(todo), dtype=np.float32)):
                self._memo[t] = v
        return np.stack([self._memo[t] for t in texts])

    def query(self, history: list[dict]) -> np.ndarray | None:
        turns = user_turns(history)[-self.history_turns:]
        if not turns:
            return None
        vecs = self.embed(turns)
        w = np.array([self.decay ** (len(turns) - 1 - i) for i in range(len(turns))], dtype=np.float32)
        q = (w[:, None] * vecs).sum(0)
        if self.track_weight:
            rows = [self.index[t] for t in played_ids(history) if t in self.index]
            if rows:
                tv = self.mat[rows].mean(0)
                q = q / (np.linalg.norm(q) or 1.0) + self.track_weight * tv / (np.linalg.norm(tv) or 1.0)
        norm = np.linalg.norm(q)
        return q / norm if norm else None

    def recommend(self, history: list[dict], exclude: set[str], n: int = 100) -> list[str]:
        q = self.query(history)
        if q is None or not len(self.ids):
            return _fill([], self.popular, exclude, n)
        return _fill(_top(self.mat @ q, self.ids, exclude, n), self.popular, exclude, n)


class CFRecommender:
    """item2vec neighbours of the played tracks (weights 1, ½, ¼, … from the latest); popularity otherwise."""

    name = "cf"

    def __init__(self, catalog, threads: int = 2, decay: float = 0.5, **kw):
        ids, mat = catalog.cf_vectors()
        norms = np.linalg.norm(mat, axis=1, keepdims=True) if len(ids) else np.ones((0, 1), np.float32)
        self.ids, self.mat = ids, (mat / np.where(norms > 0, norms, 1.0)).astype(np.float32)
        self.index = {t: i for i, t in enumerate(ids)}
        self.decay = decay
        self.popular = catalog.popular_ids()

    def neighbours(self, history: list[dict], exclude: set[str], n: int = 100) -> list[str]:
        """The item2vec neighbours only ([] when no played track has a CF vector)."""
        played = [t for t in played_ids(history) if t in self.index]
        if not played:
            return []
        w = np.array([self.decay ** (len(played) - 1 - i) for i in range(len(played))], dtype=np.float32)
        q = (w[:, None] * self.mat[[self.index[t] for t in played]]).sum(0)
        return _top(self.mat @ q, self.ids, exclude, n)

    def recommend(self, history: list[dict], exclude: set[str], n: int = 100) -> list[str]:
        return _fill(self.neighbours(history, exclude, n), self.popular, exclude, n)


def rrf(rankings: list[list[str]], k: int = 60, weights: list[float] | None = None) -> list[str]:
    """Reciprocal-rank fusion: score(id) = Σ w / (k + rank), ties broken by id."""
    weights = weights or [1.0] * len(rankings)
    scores: dict[str, float] = {}
    for ranking, w in zip(rankings, weights):
        for r, tid in enumerate(ranking, 1):
            scores[tid] = scores.get(tid, 0.0) + w / (k + r)
    return sorted(scores, key=lambda t: (-scores[t], t))


class HybridRecommender:
    """Reciprocal-rank fusion of bm25, dense and cf (each asked for ``depth`` tracks)."""

    name = "hybrid"

    def __init__(self, catalog, threads: int = 2, k: int = 60, depth: int = 200, encoder=None,
                 show_progress: bool = True, index: dict[str, int] | None = None, **kw):
        self.parts = [BM25Recommender(catalog), DenseRecommender(catalog, threads=threads, encoder=encoder,
                                                                 show_progress=show_progress, index=index),
                      CFRecommender(catalog)]
        self.k, self.depth = k, depth
        self.popular = self.parts[0].popular

    @property
    def dense(self) -> DenseRecommender:
        """The MiniLM part (its ``embed`` remembers the conversation's embedded turns)."""
        return self.parts[1]

    def fused(self, history: list[dict], exclude: set[str], depth: int | None = None) -> list[str]:
        """The fused ranking (each part asked for ``depth`` tracks, default ``self.depth``), before the top-up."""
        depth = depth or self.depth
        bm25, dense, cf = self.parts
        lists = [bm25.recommend(history, exclude, depth), dense.recommend(history, exclude, depth),
                 cf.neighbours(history, exclude, depth)]  # cf joins only with real neighbours, not its popularity fallback
        return rrf([x for x in lists if x], self.k)

    def recommend(self, history: list[dict], exclude: set[str], n: int = 100) -> list[str]:
        return _fill(self.fused(history, exclude, max(n, self.depth)), self.popular, exclude, n)
