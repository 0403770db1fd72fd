"""The catalog: tracks, their music-token codes, codebooks and provenance in one SQLite file.

Tables (see README "catalog.db schema"):

- ``tracks``: one row per track; ``id`` is the source's track id (Spotify id for the demo catalog).
- ``codes``: the track's cluster per modality (-1 = none), its collision number and its code string.
- ``codebooks``: per modality the centroids (float16 blob, k × dim), metric, input transform, encoder name/version.
- ``tokens``: the ordered music-token vocabulary (the order the model adds them in).
- ``playlists`` / ``playlist_tracks``: the source playlists with their train/valid/test split.
- ``cf_vectors``: item2vec vectors (int8 blobs, ``v * 127``) of tracks in training playlists.
- ``meta``: key/value: ``vocab_fingerprint``, ``schema_version``, build parameters, source statistics.
- ``tracks_fts``: FTS5 over title, artist, album, tags (name lookup and the BM25 baseline).
"""

from __future__ import annotations

import json
import sqlite3
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .tokens import MODALITIES, NONE, SPAN_END, SPAN_START, code_tokens, fingerprint

SCHEMA_VERSION = 1
CF_SCALE = 127.0  # cf vectors (unit length) are stored as int8 = round(v * CF_SCALE)
REQUIRED_TABLES = ("tracks", "codes", "codebooks", "tokens", "meta", "playlists", "playlist_tracks")
TRACK_COLUMNS = (
    "id", "title", "artist", "artists", "album", "year", "release_date", "genre", "subgenre", "genres",
    "subgenres", "artist_genres", "playlists", "popularity", "duration_ms", "explicit",
    "danceability", "energy", "key", "mode", "loudness", "speechiness", "acousticness", "instrumentalness",
    "liveness", "valence", "tempo", "has_lyrics", "source", "features_provenance", "path", "lyrics_theme",
)
ADDED_COLUMNS = {"lyrics_theme": "TEXT"}  # track columns newer than some catalogs: added when opened for writing
GENERATED_COLUMNS = ("tags",)  # computed by SQLite from the JSON list columns (see catalog_build.create_schema)
JSON_COLUMNS = ("artists", "genres", "subgenres", "artist_genres", "playlists")


def repair_hint(path: Path) -> str:
    """What to do about a damaged catalog file, depending on which one it is."""
    from .paths import embedded_catalog_path, user_catalog_path

    p = Path(path).resolve()
    if p == embedded_catalog_path().resolve():
        return "restore the shipped file (`git checkout catalog.db`, or reinstall talkplay-edge)"
    if p == user_catalog_path().resolve():
        return ("move it aside and re-run `talkplay index` on your music folder (the user catalog is recreated "
                "from the embedded one)")
    return "restore it from a backup, or rebuild it with `talkplay catalog build`"


def corrupt(path: Path, e: Exception) -> "CatalogError":
    """The CatalogError for a database error met while reading ``path``."""
    return CatalogError(f"{path}: damaged catalog ({e}); {repair_hint(path)}")



def json_strings(value) -> list[str]:
    """The strings of a JSON-list column (``artists``, ``genres``, ``subgenres``); anything unreadable: []."""
    try:
        v = json.loads(value or "[]")
    except (TypeError, ValueError):
        return []
    return [x for x in v if isinstance(x, str)] if isinstance(v, list) else []

class CatalogError(Exception):
    """The catalog file is missing, unreadable, of the wrong schema or inconsistent. Names the file."""


@dataclass(frozen=True)
class Track:
    """A catalog track (what a recommendation resolves to)."""

    id: str
    title: str
    artist: str
    album: str | None = None
    year: int | None = None
    genre: str | None = None
    subgenre: str | None = None
    artist_genres: tuple[str, ...] = ()
    playlists: tuple[str, ...] = ()
    popularity: int | None = None
    duration_ms: int | None = None
    explicit: int | None = None
    has_lyrics: bool = False
    source: str | None = None
    features: dict = field(default_factory=dict, compare=False, hash=False)
    code: tuple[str, ...] = ()
    genres: tuple[str, ...] = ()  # every genre and subgenre (``genre`` / ``subgenre`` are the first of each)
    subgenres: tuple[str, ...] = ()
    lyrics_theme: str | None = None  # what its lyrics keep coming back to ("love"; ``conversations.lyrics_theme``)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        for k in ("artist_genres", "playlists", "code", "genres", "subgenres"):
            d[k] = list(d[k])
        return d

    def __str__(self) -> str:
        year = f" ({self.year})" if self.year else ""
        return f"{self.title} — {self.artist}{year}"


@dataclass(frozen=True)
class Codebook:
    modality: str
    centroids: np.ndarray
    metric: str
    encoder: str
    encoder_version: str
    transform: dict


FEATURE_COLUMNS = ("danceability", "energy", "key", "mode", "loudness", "speechiness", "acousticness",
                   "instrumentalness", "liveness", "valence", "tempo")


def add_missing_columns(conn: sqlite3.Connection) -> None:
    """Add the track columns a catalog made by an older talkplay lacks (``ADDED_COLUMNS``; empty), so that
    writing tracks to it (``talkplay index``) works; reading one without them gives None."""
    have = {r[1] for r in conn.execute("pragma table_info(tracks)")}
    for column, kind in ADDED_COLUMNS.items():
        if have and column not in have:
            conn.execute(f"alter table tracks add column {column} {kind}")
    conn.commit()


# a read-only connection cannot roll back what a killed writer left (a hot journal or WAL): SQLite says
# "attempt to write a readonly database" on the first read
_NEEDS_RECOVERY = ("SQLITE_READONLY_ROLLBACK", "SQLITE_READONLY_RECOVERY")


def connect(path: Path, readonly: bool) -> sqlite3.Connection:
    """A connection to a catalog file. Read-only opens first recover the file when a writer was killed
    mid-transaction (e.g. `talkplay index`): one read through a read-write connection rolls the hot journal
    back, as the next writer would, so readers see the last committed state."""
    uri = f"file:{Path(path).resolve()}?mode={'ro' if readonly else 'rw'}"
    conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
    if readonly:
        try:
            conn.execute("select count(*) from sqlite_master").fetchone()
        except sqlite3.OperationalError as e:
            if getattr(e, "sqlite_errorname", None) not in _NEEDS_RECOVERY:
                raise
            conn.close()
            recover = sqlite3.connect(f"file:{Path(path).resolve()}?mode=rw", uri=True)
            try:
                recover.execute("select count(*) from sqlite_master").fetchone()
            finally:
                recover.close()
            conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    return conn


class Catalog:
    """Read access to a catalog file; ``Catalog.open(path)`` validates it first."""

    def __init__(self, path: Path, conn: sqlite3.Connection):
        self.path = Path(path)
        self.conn = conn
        self.meta = {r["key"]: r["value"] for r in conn.execute("select key, value from meta")}
        self.fingerprint: str = self.meta.get("vocab_fingerprint", "")
        self.vocabulary: list[str] = [r[0] for r in conn.execute("select token from tokens order by id")]
        self._codes: dict[str, tuple[str, ...]] | None = None
        self._popular: list[str] | None = None
        self.columns = frozenset(r[1] for r in conn.execute("pragma table_info(tracks)"))  # of its tracks table

    @classmethod
    def open(cls, path: str | Path | None = None, readonly: bool = True, verify: bool = False) -> "Catalog":
        """Open and check a catalog (default: the embedded ``catalog.db``); ``verify`` re-hashes the vocabulary."""
        from .paths import default_catalog_path

        path = Path(path) if path else default_catalog_path()
        if not path.is_file():
            raise CatalogError(f"{path}: catalog not found (build one with `talkplay catalog build`)")
        try:
            conn = connect(path, readonly)
            tables = {r[0] for r in conn.execute("select name from sqlite_master where type in ('table','view')")}
        except sqlite3.DatabaseError as e:
            raise CatalogError(f"{path}: not a readable SQLite catalog ({e}); {repair_hint(path)}") from e
        missing = [t for t in REQUIRED_TABLES if t not in tables]
        if missing:
            conn.close()
            raise CatalogError(f"{path}: not a talkplay catalog (missing table(s): {', '.join(missing)})")
        try:
            if not readonly:
                add_missing_columns(conn)
            cat = cls(path, conn)
            version = int(cat.meta.get("schema_version", 0))
            if version != SCHEMA_VERSION:
                raise CatalogError(f"{path}: schema version {version}, this talkplay reads {SCHEMA_VERSION}; "
                                   "rebuild it with `talkplay catalog build`")
            if not cat.fingerprint or not cat.vocabulary:
                raise CatalogError(f"{path}: catalog has no music-token vocabulary")
            if verify:
                cat.verify()
        except sqlite3.DatabaseError as e:
            conn.close()
            raise corrupt(path, e) from e
        return cat

    def close(self) -> None:
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- vocabulary and codes ------------------------------------------------------------------------
    def verify(self) -> None:
        """Recompute the fingerprint from tokens + codebooks and check SQLite's integrity."""
        ok = self.conn.execute("pragma quick_check").fetchone()[0]
        if ok != "ok":
            raise CatalogError(f"{self.path}: integrity check failed ({ok}); {repair_hint(self.path)}")
        blobs = [r[0] for r in self.conn.execute("select centroids from codebooks order by modality")]
        if fingerprint(self.vocabulary, blobs) != self.fingerprint:
            raise CatalogError(f"{self.path}: vocabulary fingerprint does not match its tokens/codebooks")

    def codes(self, cache: bool = True) -> dict[str, tuple[str, ...]]:
        """track id -> its code's token strings (without span markers). Cached unless ``cache=False``, which
        reads a fresh dict the caller may drop. Token strings are shared between codes, track ids are
        interned."""
        if self._codes is not None:
            return self._codes
        tok = {t: t for t in self.vocabulary}
        codes = {sys.intern(r[0]): tuple(tok.get(t, t) for t in r[1].split(" "))
                 for r in self.conn.execute("select track_id, code from codes")}
        if cache:
            self._codes = codes
        return codes

    def iter_codes(self) -> Iterator[tuple[str, list[str]]]:
        """(track id, its code's token strings) for every track with a code, in ascending id order, read as
        they come (the runtime builds its trie from them and keeps no code)."""
        for tid, code in self.conn.execute("select track_id, code from codes order by track_id"):
            yield tid, code.split(" ")

    def code(self, track_id: str) -> tuple[str, ...] | None:
        """One track's code (as in ``codes()``), or None when the track has none; reads the cache when
        ``codes()`` filled it, else the database."""
        if self._codes is not None:
            return self._codes.get(track_id)
        r = self.conn.execute("select code from codes where track_id = ?", [track_id]).fetchone()
        return tuple(r[0].split(" ")) if r else None

    def span(self, track_id: str) -> str:
        """The full music span of a track as text: start marker, code tokens, end marker (KeyError when the
        track has no code)."""
        code = self.code(track_id)
        if code is None:
            raise KeyError(track_id)
        return SPAN_START + "".join(code) + SPAN_END

    def codebook(self, modality: str) -> Codebook:
        r = self.conn.execute("select * from codebooks where modality = ?", [modality]).fetchone()
        if r is None:
            raise CatalogError(f"{self.path}: no codebook for modality {modality!r}")
        cents = np.frombuffer(r["centroids"], dtype=np.float16).reshape(r["k"], r["dim"]).astype(np.float32)
        return Codebook(modality, cents, r["metric"], r["encoder"], r["encoder_version"], json.loads(r["transform"]))

    # -- tracks ------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.conn.execute("select count(*) from tracks").fetchone()[0]

    def track_ids(self) -> list[str]:
        return [sys.intern(r[0]) for r in self.conn.execute("select id from tracks order by id")]

    def popular_ids(self) -> list[str]:
        """Every track id, most popular first (ties and unknown popularity by id); read once, shared by the
        retrievers that fall back on it."""
        if self._popular is None:
            self._popular = [sys.intern(r[0]) for r in self.conn.execute(
                "select id from tracks order by coalesce(popularity, -1) desc, id")]
        return self._popular

    def _track(self, r: sqlite3.Row, codes: dict | None = None) -> Track:
        loads = lambda v: tuple(json.loads(v)) if v else ()  # noqa: E731
        return Track(
            id=r["id"], title=r["title"], artist=r["artist"], album=r["album"], year=r["year"], genre=r["genre"],
            subgenre=r["subgenre"], artist_genres=loads(r["artist_genres"]), playlists=loads(r["playlists"]),
            popularity=r["popularity"], duration_ms=r["duration_ms"], explicit=r["explicit"],
            has_lyrics=bool(r["has_lyrics"]), source=r["source"],
            features={k: r[k] for k in FEATURE_COLUMNS if r[k] is not None},
            code=(codes.get(r["id"]) if codes is not None else self.code(r["id"])) or (),
            genres=tuple(json_strings(r["genres"])), subgenres=tuple(json_strings(r["subgenres"])),
            lyrics_theme=r["lyrics_theme"] if "lyrics_theme" in self.columns else None,
        )

    def get(self, track_id: str) -> Track | None:
        r = self.conn.execute("select * from tracks where id = ?", [track_id]).fetchone()
        return self._track(r) if r else None

    def tracks(self, ids: list[str] | None = None) -> list[Track]:
        """Tracks by id, in the given order (unknown ids skipped); all tracks when ``ids`` is None."""
        if ids is None:
            codes = self.codes(cache=False)
            return [self._track(r, codes) for r in self.conn.execute("select * from tracks order by id")]
        out = []
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            q = f"select * from tracks where id in ({','.join('?' * len(chunk))})"
            found = {r["id"]: self._track(r) for r in self.conn.execute(q, chunk)}
            out.extend(found[t] for t in chunk if t in found)
        return out

    def rows(self, columns: str = "*"):
        """Raw track rows (sqlite3.Row) for bulk work such as baselines."""
        return self.conn.execute(f"select {columns} from tracks order by id")

    def search(self, query: str, limit: int = 10) -> list[tuple[str, float]]:
        """FTS5/BM25 search over title, artist, album and tags: [(track id, score)], best first."""
        terms = [t for t in "".join(c if c.isalnum() else " " for c in query.casefold()).split() if t]
        if not terms:
            return []
        match = " OR ".join(f'"{t}"' for t in terms)
        q = ("select tracks.id, bm25(tracks_fts) as s from tracks_fts join tracks on tracks.rowid = tracks_fts.rowid "
             "where tracks_fts match ? order by s limit ?")
        return [(r[0], -r[1]) for r in self.conn.execute(q, [match, limit])]

    def playlists(self, split: str | None = None) -> list[dict]:
        """Playlists with their ordered track ids, optionally only one split (train/valid/test)."""
        where, args = ("where split = ?", [split]) if split else ("", [])
        pls = [dict(r) for r in self.conn.execute(f"select * from playlists {where} order by id", args)]
        for p in pls:
            p["track_ids"] = [r[0] for r in self.conn.execute(
                "select track_id from playlist_tracks where playlist_id = ? order by position", [p["id"]])]
        return pls

    def cf_vectors(self) -> tuple[list[str], np.ndarray]:
        """item2vec vectors: (track ids, float32 matrix)."""
        rows = self.conn.execute("select track_id, vector from cf_vectors order by track_id").fetchall()
        if not rows:
            return [], np.zeros((0, 0), dtype=np.float32)
        mat = np.stack([np.frombuffer(r[1], dtype=np.int8) for r in rows]).astype(np.float32) / CF_SCALE
        return [sys.intern(r[0]) for r in rows], mat

    def info(self) -> dict:
        """Summary statistics (what `talkplay info` prints)."""
        n = len(self)
        per_modality = {}
        for m in MODALITIES:
            cb = self.conn.execute("select k, encoder, encoder_version from codebooks where modality = ?", [m]).fetchone()
            covered = self.conn.execute(f"select count(*) from codes where {m} != ?", [NONE]).fetchone()[0]
            used, largest = self.conn.execute(
                f"select count(*), max(c) from (select count(*) c from codes where {m} != ? group by {m})", [NONE]
            ).fetchone()
            per_modality[m] = {
                "coverage": covered / n if n else 0.0, "tracks": covered, "k": cb["k"] if cb else 0,
                "codes_used": used, "largest_cluster": largest or 0,
                "encoder": cb["encoder"] if cb else None,
            }
        collisions = json.loads(self.meta.get("collisions", "{}"))
        themes = dict(self.conn.execute(
            "select lyrics_theme, count(*) c from tracks where lyrics_theme is not null group by 1 order by c desc, 1"
        ).fetchall()) if "lyrics_theme" in self.columns else None
        return {
            "path": str(self.path), "file_size_bytes": self.path.stat().st_size, "tracks": n,
            "playlists": self.conn.execute("select count(*) from playlists").fetchone()[0],
            "vocabulary_size": len(self.vocabulary), "vocab_fingerprint": self.fingerprint,
            "modalities": per_modality, "collisions": collisions, "lyrics_themes": themes,
            "build": json.loads(self.meta.get("build", "{}")), "sources": json.loads(self.meta.get("sources", "{}")),
        }


def track_code(clusters: dict[str, int], dup: int) -> str:
    """The stored code string: token strings joined by single spaces."""
    return " ".join(code_tokens([clusters[m] for m in MODALITIES], dup))
