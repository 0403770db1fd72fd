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

from .catalog import SCHEMA_VERSION, TRACK_COLUMNS, Codebook, track_code
from .codebook import fit_kmeans, lyrics_k
from .item2vec import train_item2vec
from .modalities import tags_text
from .music_tokenizer import assign_clusters, embed_modalities
from .progress import progress
from .sources import SourceData
from .tokens import MODALITIES, NONE, PREFIX, fingerprint, parse_token, vocabulary

DEFAULT_K = 1024
DUP_RESERVE = 64  # collision tokens in every vocabulary, so tracks indexed later fit without changing it
SPLITS = (("train", 0.8), ("valid", 0.9), ("test", 1.0))


def playlist_split(playlist_id: str, seed: int) -> str:
    """train / valid / test (80/10/10) from a hash of the playlist id, stable across builds."""
    u = int(hashlib.sha256(f"{seed}:{playlist_id}".encode()).hexdigest()[:12], 16) / 16 ** 12
    return next(name for name, cut in SPLITS if u < cut)


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


def build_catalog(source: SourceData, out_path: str | Path, encoder, seed: int = 0, k: int = DEFAULT_K,
                  k_lyrics: int | None = None, item2vec_epochs: int = 5, kmeans_iters: int = 25,
                  quiet: bool = False) -> dict:
    """Build a catalog file from ``source``; returns its summary (fingerprint, timings, collisions)."""
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    out_path = Path(out_path)
    tracks = source.tracks
    if not tracks:
        raise ValueError("no tracks to build a catalog from")
    ids = [t["id"] for t in tracks]

    # 1. playlists and the split (CF is learnt from training playlists only, so eval never sees test co-occurrence)
    for p in source.playlists:
        p["split"] = playlist_split(p["id"], seed)
    train_lists = [p["track_ids"] for p in source.playlists if p["split"] == "train"]
    t = time.perf_counter()
    _log(f"item2vec over {len(train_lists)} training playlists", quiet)
    cf_ids, cf_vecs = train_item2vec(train_lists, epochs=item2vec_epochs, seed=seed)
    cf = dict(zip(cf_ids, cf_vecs.astype(np.float16).astype(np.float32)))  # as stored (float16)
    timings["item2vec_s"] = time.perf_counter() - t

    # 2. embeddings
    t = time.perf_counter()
    _log(f"embedding {len(tracks)} tracks (metadata, tags, lyrics) with {encoder.name}", quiet)
    embedded = embed_modalities(tracks, encoder, lyrics=source.lyrics, cf=cf, progress=True)
    timings["embed_s"] = time.perf_counter() - t

    # 3. codebooks
    t = time.perf_counter()
    codebooks: dict[str, Codebook] = {}
    for m in progress(MODALITIES, desc="codebooks"):
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
        enc_name, enc_version = (encoder.name, encoder.version) if m in ("tags", "metadata", "lyrics") else (
            ("item2vec-sgns", f"dim={cf_vecs.shape[1] if len(cf_vecs) else 0},epochs={item2vec_epochs},seed={seed}") if m == "cf"
            else ("spotify-audio-features", "schema=1"))
        codebooks[m] = Codebook(m, cents.astype(np.float32), "euclidean", enc_name, enc_version, spec)
    timings["kmeans_s"] = time.perf_counter() - t

    # 4. codes, collisions, vocabulary
    clusters = assign_clusters(len(tracks), embedded, codebooks)
    keys = list(zip(*(clusters[m].tolist() for m in MODALITIES)))
    dup, coll = resolve_collisions(keys, [t.get("popularity") for t in tracks], ids)
    vocab = vocabulary({m: len(codebooks[m].centroids) for m in MODALITIES}, max(coll["max_dup"], DUP_RESERVE))
    blobs = [codebooks[m].centroids.tobytes() for m in sorted(MODALITIES)]
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
        _write(tmp, source, tracks, clusters, dup, codes, codebooks, vocab, fp, cf, coll, seed, k, timings)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    timings["write_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    _log(f"wrote {out_path} ({out_path.stat().st_size / 1e6:.1f} MB, {len(tracks)} tracks, fingerprint {fp[:16]})", quiet)
    return {"path": str(out_path), "tracks": len(tracks), "vocab_fingerprint": fp, "collisions": coll,
            "timings": timings}


def _write(path: Path, source: SourceData, tracks: list[dict], clusters: dict, dup: list[int], codes: list[str],
           codebooks: dict[str, Codebook], vocab: list[str], fp: str, cf: dict, coll: dict, seed: int, k: int,
           timings: dict) -> None:
    db = sqlite_utils.Database(path)
    db.conn.execute("pragma journal_mode = delete")
    rows = []
    for t in tracks:
        r = {c: t.get(c) for c in TRACK_COLUMNS}
        r["genre"] = (t.get("genres") or [None])[0]
        r["subgenre"] = (t.get("subgenres") or [None])[0]
        r["tags"] = tags_text(t)
        for c in ("artists", "genres", "subgenres", "artist_genres", "playlists"):
            r[c] = json.dumps(t.get(c) or [], ensure_ascii=False)
        rows.append(r)
    columns = {c: str for c in TRACK_COLUMNS}
    columns.update({c: int for c in ("year", "popularity", "duration_ms", "explicit", "has_lyrics")})
    columns.update({c: float for c in ("danceability", "energy", "key", "mode", "loudness", "speechiness",
                                       "acousticness", "instrumentalness", "liveness", "valence", "tempo")})
    db["tracks"].create(columns, pk="id", not_null={"title", "artist"})
    db["tracks"].insert_all(rows, batch_size=2000)
    db["tracks"].enable_fts(["title", "artist", "album", "tags"], fts_version="FTS5", create_triggers=True,
                            tokenize="unicode61 remove_diacritics 2")

    db["codes"].create({"track_id": str, **{m: int for m in MODALITIES}, "dup": int, "code": str},
                       pk="track_id", foreign_keys=[("track_id", "tracks", "id")])
    db["codes"].insert_all(({"track_id": t["id"], **{m: int(clusters[m][i]) for m in MODALITIES}, "dup": dup[i],
                             "code": codes[i]} for i, t in enumerate(tracks)), batch_size=5000)
    db["codes"].create_index(["code"], unique=True)

    db["codebooks"].create({"modality": str, "k": int, "dim": int, "metric": str, "encoder": str,
                            "encoder_version": str, "transform": str, "centroids": bytes}, pk="modality")
    db["codebooks"].insert_all({"modality": m, "k": cb.centroids.shape[0], "dim": cb.centroids.shape[1],
                                "metric": cb.metric, "encoder": cb.encoder, "encoder_version": cb.encoder_version,
                                "transform": json.dumps(cb.transform), "centroids": cb.centroids.tobytes()}
                               for m, cb in sorted(codebooks.items()))

    def token_row(i: int, tok: str) -> dict:
        p = parse_token(tok)
        kind = p.modality or ("dup" if p.cluster is not None else "span")
        return {"id": i, "token": tok, "kind": kind, "cluster": p.cluster}

    db["tokens"].create({"id": int, "token": str, "kind": str, "cluster": int}, pk="id")
    db["tokens"].insert_all(token_row(i, tok) for i, tok in enumerate(vocab))
    db["tokens"].create_index(["token"], unique=True)

    db["playlists"].create({"id": str, "name": str, "genre": str, "subgenre": str, "split": str, "n_tracks": int}, pk="id")
    db["playlists"].insert_all({"id": p["id"], "name": p["name"], "genre": p.get("genre"), "subgenre": p.get("subgenre"),
                                "split": p["split"], "n_tracks": len(p["track_ids"])} for p in source.playlists)
    db["playlist_tracks"].create({"playlist_id": str, "position": int, "track_id": str}, pk=("playlist_id", "position"),
                                 foreign_keys=[("playlist_id", "playlists", "id"), ("track_id", "tracks", "id")])
    db["playlist_tracks"].insert_all(({"playlist_id": p["id"], "position": j, "track_id": tid}
                                      for p in source.playlists for j, tid in enumerate(p["track_ids"])), batch_size=5000)
    db["playlist_tracks"].create_index(["track_id"])

    db["cf_vectors"].create({"track_id": str, "vector": bytes}, pk="track_id")
    db["cf_vectors"].insert_all(({"track_id": tid, "vector": v.astype(np.float16).tobytes()}
                                 for tid, v in sorted(cf.items())), batch_size=5000)

    build = {"seed": seed, "k": k, "k_per_modality": {m: int(cb.centroids.shape[0]) for m, cb in codebooks.items()},
             "modality_order": list(MODALITIES), "token_prefixes": PREFIX, "none_cluster": NONE,
             "splits": {name: cut for name, cut in SPLITS}, "timings": {k_: round(v, 2) for k_, v in timings.items()}}
    meta = {"schema_version": str(SCHEMA_VERSION), "vocab_fingerprint": fp, "vocab_size": str(len(vocab)),
            "collisions": json.dumps(coll), "build": json.dumps(build), "sources": json.dumps(source.stats)}
    db["meta"].create({"key": str, "value": str}, pk="key")
    db["meta"].insert_all({"key": k_, "value": v} for k_, v in meta.items())
    db.conn.commit()
    db.conn.execute("vacuum")
    db.conn.close()
