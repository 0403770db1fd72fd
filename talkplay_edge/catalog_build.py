"""Build catalog.db: sources → five modality embeddings → K-means codebooks → codes → SQLite.

``build_catalog(source, out_path, encoder)`` does the whole job for any ``SourceData`` (the real
data, or a few fake tracks in the tests). It writes to a temporary file next to ``out_path`` and
renames it into place only when complete, so a failed build never replaces a good catalog.
Deterministic for a seed: the same input gives the same vocabulary fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import sqlite_utils

from .catalog import CF_SCALE, SCHEMA_VERSION, TRACK_COLUMNS, Codebook, track_code
from .codebook import fit_kmeans, lyrics_k
from .conversations import lyrics_theme
from .item2vec import train_item2vec
from .music_tokenizer import assign_clusters, embed_modalities
from .progress import progress
from .sources import SourceData
from .tokens import MODALITIES, NONE, PREFIX, fingerprint, parse_token, vocabulary

DEFAULT_K = 1024
MAX_ARTIST_GENRES = 8  # as many as the tags text uses
DUP_RESERVE = 64  # collision tokens in every vocabulary, so tracks indexed later fit without changing it
SPLITS = (("train", 0.8), ("valid", 0.9), ("test", 1.0))
# Share of the training playlists left out of item2vec. CF is learnt from training playlists only, so most
# tracks of valid/test playlists are CF-cold (``<|cf_none|>``: 78% of test targets on the real catalog). If
# every training playlist fed item2vec, every training target would be CF-warm and a model trained on them
# would never open a span with ``<|cf_none|>``, i.e. could not reach most test tracks. Leaving a fold out
# gives training conversations whose tracks are cold the way test tracks are.
CF_HOLDOUT = 0.3


def playlist_split(playlist_id: str, seed: int) -> str:
    """train / valid / test (80/10/10) from a hash of the playlist id, stable across builds."""
    u = int(hashlib.sha256(f"{seed}:{playlist_id}".encode()).hexdigest()[:12], 16) / 16 ** 12
    return next(name for name, cut in SPLITS if u < cut)


def cf_playlist_ids(playlist_ids: list[str], seed: int, holdout: float = CF_HOLDOUT) -> set[str]:
    """The training playlists item2vec learns from: all but the ``round(holdout · n)`` whose hash of the id
    comes first (an exact, deterministic share, also for a catalog with a handful of playlists)."""
    def key(pid: str) -> str:
        return hashlib.sha256(f"cf:{seed}:{pid}".encode()).hexdigest()

    ranked = sorted(set(playlist_ids), key=key)
    return set(ranked[round(holdout * len(ranked)):])


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def resolve_collisions(keys: list[tuple], popularity: list[int | None], ids: list[str]) -> tuple[list[int], dict]:
    """Collision number per track: 0 for the first (most popular, then id) of each shared key, then 1, 2, …"""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, k in enumerate(keys):
        groups[k].append(i)
    dup = [0] * len(keys)
    colliding = 0
    for members in groups.values():
        if len(members) > 1:
            colliding += len(members)
            members.sort(key=lambda i: (-(popularity[i] or 0), ids[i]))
            for n, i in enumerate(members):
                dup[i] = n
    n = max(len(keys), 1)
    stats = {
        "tracks_sharing_code_before": colliding, "collision_rate_before": colliding / n,
        "largest_group": max((len(m) for m in groups.values()), default=0), "max_dup": max(dup, default=0),
    }
    return dup, stats


def training_playlist_view(tracks: list[dict], playlists: list[dict]) -> list[dict]:
    """Copies of ``tracks`` that keep only what the training playlists say about them: the names of the
    training playlists holding them (``playlists``) and the genres and subgenres those playlists give them.

    Everything else comes from a valid or test playlist, and would tell every system (tag token, BM25, the
    dense retriever, the runtime's genre and style marks) which tracks an eval conversation over that playlist
    is after: its name ("help me fill my Dance Room playlist" found exactly them), and its genre for the 78%
    of test targets that no training playlist holds (each had exactly its test playlist's subgenre, so "the
    style the session is in" held for every follow-up). A track's ``playlist_genres`` rows ([playlist id,
    genre, subgenre], from the source) say which playlist gave which genre; without them a training
    playlist's own genre and subgenre count."""
    train = {p["id"] for p in playlists if p["split"] == "train"}
    names: dict[str, set[str]] = defaultdict(set)
    own_rows: dict[str, list] = defaultdict(list)  # for tracks without source rows
    for p in playlists:
        if p["id"] in train:
            for tid in p["track_ids"]:
                names[tid].add(p["name"])
                own_rows[tid].append([p["id"], p.get("genre"), p.get("subgenre")])
    out = []
    for t in tracks:
        rows = t.get("playlist_genres")
        kept = [(g, s) for pid, g, s in (own_rows[t["id"]] if rows is None else rows) if pid in train]
        genres, subgenres = {g for g, _ in kept}, {s for _, s in kept}
        out.append({**t, "playlists": [n for n in t.get("playlists") or [] if n in names[t["id"]]],
                    "genres": [g for g in t.get("genres") or [] if g in genres],
                    "subgenres": [s for s in t.get("subgenres") or [] if s in subgenres]})
    return out


def codebook_encoder(modality: str, encoder, cf_version: str) -> tuple[str, str]:
    """(encoder name, version) a ``modality``'s codebook is made with, as stored in its row."""
    if modality in ("tags", "metadata", "lyrics"):
        return encoder.name, encoder.version
    return ("item2vec-sgns", cf_version) if modality == "cf" else ("spotify-audio-features", "schema=1")


def reused_codebooks(path: str | Path, encoder, cf_version: str) -> dict[str, Codebook]:
    """The codebooks of the catalog at ``path``, to tokenise with instead of fitting new ones (so the
    vocabulary fingerprint, and a model trained on it, stay valid); refused when they were made with
    another text encoder or another item2vec."""
    from .catalog import Catalog

    with Catalog.open(path) as old:
        books = {m: old.codebook(m) for m in MODALITIES}
    for m, cb in books.items():
        want = codebook_encoder(m, encoder, cf_version)
        if (cb.encoder, cb.encoder_version) != want:
            raise ValueError(f"{path}: the {m} codebook was made with {cb.encoder} {cb.encoder_version}, "
                             f"this build embeds with {want[0]} {want[1]}; build without --codebooks")
    return books


def build_catalog(source: SourceData, out_path: str | Path, encoder, seed: int = 0, k: int = DEFAULT_K,
                  k_lyrics: int | None = None, item2vec_epochs: int = 5, kmeans_iters: int = 25,
                  cf_holdout: float = CF_HOLDOUT, quiet: bool = False, codebooks_from: str | Path | None = None
                  ) -> dict:
    """Build a catalog file from ``source``; returns its summary (fingerprint, timings, collisions).
    ``codebooks_from``: tokenise with that catalog's codebooks instead of fitting new ones."""
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    out_path = Path(out_path)
    tracks = source.tracks
    if not tracks:
        raise ValueError("no tracks to build a catalog from")
    ids = [t["id"] for t in tracks]

    # 1. playlists and the split. CF is learnt from training playlists only (eval never sees test
    #    co-occurrence), and not from all of them: a held-out fold (CF_HOLDOUT) keeps CF-cold tracks in training
    if not 0.0 <= cf_holdout < 1.0:
        raise ValueError(f"cf_holdout must be in [0, 1), not {cf_holdout}")
    for p in source.playlists:
        p["split"] = playlist_split(p["id"], seed)
    train_ids = [p["id"] for p in source.playlists if p["split"] == "train"]
    fed = cf_playlist_ids(train_ids, seed, cf_holdout)
    train_lists = [p["track_ids"] for p in source.playlists if p["id"] in fed]
    tracks = training_playlist_view(tracks, source.playlists)
    t = time.perf_counter()
    _log(f"item2vec over {len(train_lists)} training playlists ({len(train_ids) - len(train_lists)} held out)", quiet)
    cf_ids, cf_vecs = train_item2vec(train_lists, epochs=item2vec_epochs, seed=seed)
    cf = dict(zip(cf_ids, np.round(cf_vecs * CF_SCALE).astype(np.int8).astype(np.float32) / CF_SCALE))  # as stored
    timings["item2vec_s"] = time.perf_counter() - t
    cf_version = f"dim={cf_vecs.shape[1] if len(cf_vecs) else 0},epochs={item2vec_epochs},seed={seed}"
    reused = None if codebooks_from is None else reused_codebooks(codebooks_from, encoder, cf_version)

    # 2. embeddings
    t = time.perf_counter()
    _log(f"embedding {len(tracks)} tracks (metadata, tags, lyrics) with {encoder.name}", quiet)
    embedded = embed_modalities(tracks, encoder, lyrics=source.lyrics, cf=cf, progress=True)
    timings["embed_s"] = time.perf_counter() - t

    # 3. codebooks
    t = time.perf_counter()
    codebooks: dict[str, Codebook] = dict(reused or {})
    if reused:
        _log(f"codebooks from {codebooks_from}", quiet)
    for m in progress(MODALITIES if reused is None else (), desc="codebooks"):
        mv = embedded[m]
        spec: dict = {"input": {"cf": "item2vec", "tags": "tags_text", "metadata": "metadata_text",
                                "lyrics": "lyrics_text (chunked, mean-pooled)", "audio": "audio_vector"}[m]}
        vecs = mv.vectors
        if m == "audio" and len(vecs):
            mean, std = vecs.mean(0), vecs.std(0)
            std = np.where(std > 1e-6, std, 1.0).astype(np.float32)
            spec["standardise"] = {"mean": [float(x) for x in mean], "std": [float(x) for x in std]}
            vecs = ((vecs - mean) / std).astype(np.float32)
        want = (k_lyrics or lyrics_k(len(vecs), k)) if m == "lyrics" else k
        cents = fit_kmeans(vecs, want, seed=seed, iters=kmeans_iters, desc=m) if len(vecs) else np.zeros((0, vecs.shape[1] if vecs.ndim == 2 else 0), np.float32)
        enc_name, enc_version = codebook_encoder(m, encoder, cf_version)
        # stored as float16 (halves the catalog's codebooks); codes are assigned with exactly the stored values
        codebooks[m] = Codebook(m, cents.astype(np.float16).astype(np.float32), "euclidean", enc_name, enc_version, spec)
    timings["kmeans_s"] = time.perf_counter() - t

    # 4. codes, collisions, vocabulary
    clusters = assign_clusters(len(tracks), embedded, codebooks)
    keys = list(zip(*(clusters[m].tolist() for m in MODALITIES)))
    dup, coll = resolve_collisions(keys, [t.get("popularity") for t in tracks], ids)
    vocab = vocabulary({m: len(codebooks[m].centroids) for m in MODALITIES}, max(coll["max_dup"], DUP_RESERVE))
    blobs = [codebooks[m].centroids.astype(np.float16).tobytes() for m in sorted(MODALITIES)]
    fp = fingerprint(vocab, blobs)
    codes = [track_code({m: int(clusters[m][i]) for m in MODALITIES}, dup[i]) for i in range(len(tracks))]
    coll["collision_rate_after"] = 1.0 - len(set(codes)) / len(codes)
    if coll["collision_rate_after"] != 0.0:
        raise AssertionError("collision resolution left two tracks with one code")

    # 5. write to a temp file, then rename
    t = time.perf_counter()
    tmp = out_path.with_name(out_path.name + f".tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        _write(tmp, source, tracks, clusters, dup, codes, codebooks, vocab, fp, cf, coll, seed, k, timings, cf_holdout,
               None if codebooks_from is None else Path(codebooks_from).name)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    timings["write_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    _log(f"wrote {out_path} ({out_path.stat().st_size / 1e6:.1f} MB, {len(tracks)} tracks, fingerprint {fp[:16]})", quiet)
    return {"path": str(out_path), "tracks": len(tracks), "vocab_fingerprint": fp, "collisions": coll,
            "timings": timings}


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _code_sql(alias: str) -> str:
    """SQL computing a track's code string from its cluster columns (the ``codes`` view)."""
    parts = []
    for m in MODALITIES:
        col = f"{alias}.{m}"
        parts.append(f"'<|{PREFIX[m]}_' || CASE WHEN {col} < 0 THEN 'none' ELSE printf('%04d', {col}) END || '|>'")
    dup = f"CASE WHEN {alias}.dup > 0 THEN ' <|dup_' || printf('%03d', {alias}.dup) || '|>' ELSE '' END"
    return " || ' ' || ".join(parts) + f" || {dup}"


def _inner(col: str) -> str:
    return f"substr(coalesce({col}, '[]'), 2, length(coalesce({col}, '[]')) - 2)"


# The tag text for search and the dense baseline, computed from the JSON list columns (not stored):
# genres, subgenres, artist genres and playlist names, comma-separated.
_joined = " || ',' || ".join(_inner(c) for c in ("genres", "subgenres", "artist_genres", "playlists"))
TAGS_SQL = (f"nullif(replace(trim(replace(replace(replace(replace(replace({_joined}, '\"', ''), ', ', ','), ',,', ','), "
            "',,', ','), ',,', ','), ','), ',', ', '), '')")


def create_schema(conn) -> None:
    """Tables that reference tracks by their integer rowid (compact), with ``codes`` as an updatable view.

    ``codes`` (track_id, cf, tags, metadata, lyrics, audio, dup, code) reads and writes like a table: its
    INSTEAD OF triggers store rows in ``code_rows`` keyed by ``tracks.rowid``; ``code`` is computed.
    """
    features = ", ".join(f"{c} REAL" for c in ("danceability", "energy", "key", "mode", "loudness", "speechiness",
                                                "acousticness", "instrumentalness", "liveness", "valence", "tempo"))
    ints = {"year", "popularity", "duration_ms", "explicit", "has_lyrics"}
    floats = set(features.replace(" REAL", "").split(", "))
    cols = []
    for c in TRACK_COLUMNS:
        if c == "id":
            cols.append("id TEXT NOT NULL UNIQUE")
        elif c in ("title", "artist"):
            cols.append(f"{c} TEXT NOT NULL")
        elif c in ints:
            cols.append(f"{c} INTEGER")
        elif c in floats:
            cols.append(f"{c} REAL")
        else:
            cols.append(f"{c} TEXT")
    mods = ", ".join(MODALITIES)
    conn.executescript(f"""
        CREATE TABLE tracks (rowid INTEGER PRIMARY KEY, {", ".join(cols)},
            tags TEXT GENERATED ALWAYS AS ({TAGS_SQL}) VIRTUAL);
        CREATE VIRTUAL TABLE tracks_fts USING fts5(title, artist, album, tags, content='tracks', content_rowid='rowid',
            tokenize='unicode61 remove_diacritics 2', detail='column');
        CREATE TRIGGER tracks_ai AFTER INSERT ON tracks BEGIN
            INSERT INTO tracks_fts(rowid, title, artist, album, tags) VALUES (new.rowid, new.title, new.artist, new.album, new.tags);
        END;
        CREATE TRIGGER tracks_ad AFTER DELETE ON tracks BEGIN
            INSERT INTO tracks_fts(tracks_fts, rowid, title, artist, album, tags) VALUES ('delete', old.rowid, old.title, old.artist, old.album, old.tags);
            DELETE FROM code_rows WHERE track = old.rowid;
            DELETE FROM cf_vectors_rows WHERE track = old.rowid;
        END;
        CREATE TRIGGER tracks_au AFTER UPDATE ON tracks BEGIN
            INSERT INTO tracks_fts(tracks_fts, rowid, title, artist, album, tags) VALUES ('delete', old.rowid, old.title, old.artist, old.album, old.tags);
            INSERT INTO tracks_fts(rowid, title, artist, album, tags) VALUES (new.rowid, new.title, new.artist, new.album, new.tags);
        END;
        CREATE TABLE code_rows (track INTEGER PRIMARY KEY REFERENCES tracks(rowid),
            {", ".join(f"{m} INTEGER NOT NULL" for m in MODALITIES)}, dup INTEGER NOT NULL DEFAULT 0);
        CREATE VIEW codes AS SELECT t.id AS track_id, {", ".join(f"c.{m}" for m in MODALITIES)}, c.dup,
            {_code_sql("c")} AS code FROM code_rows c JOIN tracks t ON t.rowid = c.track;
        CREATE TRIGGER codes_insert INSTEAD OF INSERT ON codes BEGIN
            SELECT RAISE(ABORT, 'codes: no track with that id') WHERE NOT EXISTS (SELECT 1 FROM tracks WHERE id = new.track_id);
            INSERT INTO code_rows(track, {mods}, dup)
            VALUES ((SELECT rowid FROM tracks WHERE id = new.track_id), {", ".join(f"new.{m}" for m in MODALITIES)}, coalesce(new.dup, 0));
        END;
        CREATE TRIGGER codes_delete INSTEAD OF DELETE ON codes BEGIN
            DELETE FROM code_rows WHERE track = (SELECT rowid FROM tracks WHERE id = old.track_id);
        END;
        CREATE TABLE cf_vectors_rows (track INTEGER PRIMARY KEY REFERENCES tracks(rowid), vector BLOB NOT NULL);
        CREATE VIEW cf_vectors AS SELECT t.id AS track_id, v.vector FROM cf_vectors_rows v JOIN tracks t ON t.rowid = v.track;
        CREATE TABLE playlists (rowid INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, name TEXT, genre TEXT, subgenre TEXT,
            split TEXT, n_tracks INTEGER);
        CREATE TABLE playlist_rows (playlist INTEGER NOT NULL REFERENCES playlists(rowid), position INTEGER NOT NULL,
            track INTEGER NOT NULL REFERENCES tracks(rowid), PRIMARY KEY (playlist, position)) WITHOUT ROWID;
        CREATE VIEW playlist_tracks AS SELECT p.id AS playlist_id, r.position, t.id AS track_id
            FROM playlist_rows r JOIN playlists p ON p.rowid = r.playlist JOIN tracks t ON t.rowid = r.track;
    """)


def _write(path: Path, source: SourceData, tracks: list[dict], clusters: dict, dup: list[int], codes: list[str],
           codebooks: dict[str, Codebook], vocab: list[str], fp: str, cf: dict, coll: dict, seed: int, k: int,
           timings: dict, cf_holdout: float, codebooks_from: str | None = None) -> None:
    db = sqlite_utils.Database(path)
    db.conn.execute("pragma journal_mode = delete")
    create_schema(db.conn)
    rows = []
    for t in tracks:
        r = {c: t.get(c) for c in TRACK_COLUMNS}
        r["genre"] = (t.get("genres") or [None])[0]
        r["subgenre"] = (t.get("subgenres") or [None])[0]
        r["artist_genres"] = t.get("artist_genres", [])[:MAX_ARTIST_GENRES]
        for c in ("genres", "subgenres", "artist_genres", "playlists"):
            r[c] = _json(r.get(c) if c == "artist_genres" else (t.get(c) or []))
        # artists: only stored when it says more than `artist` (a collaboration)
        r["artists"] = _json(t["artists"]) if len(t.get("artists") or []) > 1 else None
        r["lyrics_theme"] = lyrics_theme(source.lyrics.get(t["id"]) or "")
        rows.append(r)
    db["tracks"].insert_all(rows, batch_size=2000)
    rowid = {r[1]: r[0] for r in db.conn.execute("select rowid, id from tracks")}
    db.conn.executemany(f"insert into code_rows (track, {', '.join(MODALITIES)}, dup) values ({', '.join('?' * (len(MODALITIES) + 2))})",
                        ([rowid[t["id"]], *[int(clusters[m][i]) for m in MODALITIES], dup[i]] for i, t in enumerate(tracks)))
    stored = dict(db.conn.execute("select track_id, code from codes"))
    assert all(stored[t["id"]] == codes[i] for i, t in enumerate(tracks)), "codes view disagrees with track_code"

    db["codebooks"].create({"modality": str, "k": int, "dim": int, "metric": str, "encoder": str,
                            "encoder_version": str, "transform": str, "centroids": bytes}, pk="modality")
    db["codebooks"].insert_all({"modality": m, "k": cb.centroids.shape[0], "dim": cb.centroids.shape[1],
                                "metric": cb.metric, "encoder": cb.encoder, "encoder_version": cb.encoder_version,
                                "transform": json.dumps(cb.transform), "centroids": cb.centroids.astype(np.float16).tobytes()}
                               for m, cb in sorted(codebooks.items()))

    def token_row(i: int, tok: str) -> dict:
        p = parse_token(tok)
        kind = p.modality or ("dup" if p.cluster is not None else "span")
        return {"id": i, "token": tok, "kind": kind, "cluster": p.cluster}

    db["tokens"].create({"id": int, "token": str, "kind": str, "cluster": int}, pk="id")
    db["tokens"].insert_all(token_row(i, tok) for i, tok in enumerate(vocab))
    db["tokens"].create_index(["token"], unique=True)

    db.conn.executemany("insert into playlists (id, name, genre, subgenre, split, n_tracks) values (?, ?, ?, ?, ?, ?)",
                        ([p["id"], p["name"], p.get("genre"), p.get("subgenre"), p["split"], len(p["track_ids"])]
                         for p in source.playlists))
    pl_rowid = {r[1]: r[0] for r in db.conn.execute("select rowid, id from playlists")}
    db.conn.executemany("insert into playlist_rows (playlist, position, track) values (?, ?, ?)",
                        ([pl_rowid[p["id"]], j, rowid[tid]] for p in source.playlists for j, tid in enumerate(p["track_ids"])))
    db.conn.executemany("insert into cf_vectors_rows (track, vector) values (?, ?)",
                        ([rowid[tid], np.round(v * CF_SCALE).astype(np.int8).tobytes()] for tid, v in sorted(cf.items())))

    build = {"seed": seed, "k": k, "k_per_modality": {m: int(cb.centroids.shape[0]) for m, cb in codebooks.items()},
             "modality_order": list(MODALITIES), "token_prefixes": PREFIX, "none_cluster": NONE,
             "splits": {name: cut for name, cut in SPLITS}, "cf_holdout": cf_holdout,
             "playlist_names": "training playlists only", "playlist_genres": "training playlists only", "codebooks_from": codebooks_from, "timings": {k_: round(v, 2) for k_, v in timings.items()}}
    meta = {"schema_version": str(SCHEMA_VERSION), "vocab_fingerprint": fp, "vocab_size": str(len(vocab)),
            "collisions": json.dumps(coll), "build": json.dumps(build), "sources": json.dumps(source.stats)}
    db["meta"].create({"key": str, "value": str}, pk="key")
    db["meta"].insert_all({"key": k_, "value": v} for k_, v in meta.items())
    db.conn.commit()
    db.conn.execute("vacuum")
    db.conn.close()


def fill_lyrics_themes(path: str | Path, data_dir: str | Path) -> int:
    """Write each track's lyrics theme (``conversations.lyrics_theme`` of its lyrics in ``data_dir``) into
    the catalog at ``path``, as ``talkplay catalog build`` does, for a catalog built before it did. Touches only
    that column (its tokens, codes and fingerprint stay as they are); returns the tracks given a theme."""
    from .catalog import Catalog
    from .sources import load_sources

    lyrics = load_sources(data_dir).lyrics
    with Catalog.open(path, readonly=False) as cat:
        themes = [(lyrics_theme(text), tid) for tid, text in lyrics.items()]
        with cat.conn:
            cat.conn.execute("update tracks set lyrics_theme = null where lyrics_theme is not null")
            n = sum(cat.conn.execute("update tracks set lyrics_theme = ? where id = ?", row).rowcount
                    for row in themes if row[0])
    return n
