"""Read the raw catalog sources (spotify_songs + MusicOSet) and merge them into one list of tracks.

``load_sources(data_dir)`` returns ``SourceData``: track records (plain dicts, one per unique track id),
playlists (ordered track ids), and lyrics texts. Nothing here embeds or clusters; see ``catalog_build``.

- ``spotify_songs/spotify_songs.csv.gz``: one row per (track, playlist); tracks appearing in several
  playlists are merged, keeping every playlist name, genre and subgenre.
- ``musicoset/*.csv`` (tab-separated): Billboard songs with artist ids, artist genres, audio features,
  release dates and some lyrics. A song whose Spotify id is already in spotify_songs enriches that track
  (explicit flag, artist genres, lyrics); the others become tracks of their own.
- Artist genres for spotify_songs tracks come from MusicOSet's artists table, matched by artist name.
"""

from __future__ import annotations

import ast
import csv
import gzip
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

AUDIO_FEATURES = (
    "danceability", "energy", "key", "mode", "loudness", "speechiness", "acousticness",
    "instrumentalness", "liveness", "valence", "tempo",
)

SPOTIFY_COLUMNS = (
    "track_id", "track_name", "track_artist", "track_popularity", "track_album_id", "track_album_name",
    "track_album_release_date", "playlist_name", "playlist_id", "playlist_genre", "playlist_subgenre",
    *AUDIO_FEATURES, "duration_ms",
)
MUSICOSET_COLUMNS = {
    "songs.csv": ("song_id", "song_name", "artists", "popularity", "explicit"),
    "artists.csv": ("artist_id", "name", "main_genre", "genres"),
    "tracks.csv": ("song_id", "album_id", "release_date"),
    "acoustic_features.csv": ("song_id", "duration_ms", *AUDIO_FEATURES),
    "lyrics.csv": ("song_id", "lyrics"),
}


class SourceError(Exception):
    """A source file is missing, unreadable, empty or lacks a column. The message names the file."""


@dataclass
class SourceData:
    tracks: list[dict]
    playlists: list[dict]  # {"id", "name", "genre", "subgenre", "track_ids": [...]} in source order
    lyrics: dict[str, str]  # track id -> lyrics text
    stats: dict = field(default_factory=dict)


def _read_rows(path: Path, required: tuple[str, ...], delimiter: str = ",") -> list[dict]:
    if not path.is_file():
        raise SourceError(f"{path}: file not found")
    csv.field_size_limit(1 << 30)
    try:
        raw = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
        text = raw.decode("utf-8")
        rows = list(csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter))
    except (OSError, UnicodeDecodeError, EOFError, csv.Error) as e:
        raise SourceError(f"{path}: cannot read ({e})") from e
    header = rows[0].keys() if rows else next(csv.reader(io.StringIO(text), delimiter=delimiter), [])
    missing = [c for c in required if c not in header]
    if missing:
        raise SourceError(f"{path}: missing column(s) {', '.join(missing)}")
    if not rows:
        raise SourceError(f"{path}: no rows")
    return rows


def _float(v) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _int(v) -> int | None:
    f = _float(v)
    return None if f is None else int(f)


def _year(date: str | None) -> int | None:
    m = re.match(r"\s*(\d{4})", date or "")
    return int(m.group(1)) if m else None


def _literal(text: str, default):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return default


def _lyrics_text(raw: str) -> str:
    """MusicOSet stores lyrics as a Python list literal of strings; join it into plain text."""
    value = _literal(raw, raw)
    if isinstance(value, (list, tuple)):
        value = "\n".join(str(v) for v in value)
    text = str(value)
    text = re.sub(r"\[[^\]\n]{0,40}\]", "", text)  # section headers like [Chorus]
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def norm_name(s: str) -> str:
    """Normalised artist/title for matching across sources."""
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", s.casefold())).strip()


def _features(row: dict) -> dict:
    return {k: _float(row.get(k)) for k in AUDIO_FEATURES}


def load_spotify_songs(path: Path) -> tuple[dict[str, dict], list[dict]]:
    rows = _read_rows(path, SPOTIFY_COLUMNS)
    tracks: dict[str, dict] = {}
    playlists: dict[str, dict] = {}
    for r in rows:
        tid = r["track_id"].strip()
        if not tid:
            continue
        pl = playlists.setdefault(r["playlist_id"], {
            "id": r["playlist_id"], "name": r["playlist_name"].strip(), "genre": r["playlist_genre"],
            "subgenre": r["playlist_subgenre"], "track_ids": [],
        })
        if tid not in pl["track_ids"]:
            pl["track_ids"].append(tid)
        t = tracks.get(tid)
        if t is None:
            artist = r["track_artist"].strip()
            t = tracks[tid] = {
                "id": tid, "title": r["track_name"].strip(), "artists": [artist] if artist else [],
                "album": r["track_album_name"].strip() or None, "album_id": r["track_album_id"] or None,
                "release_date": r["track_album_release_date"] or None,
                "year": _year(r["track_album_release_date"]),
                "genres": [], "subgenres": [], "artist_genres": [], "playlists": [], "playlist_genres": [],
                "popularity": _int(r["track_popularity"]), "duration_ms": _int(r["duration_ms"]),
                "explicit": None, **_features(r), "source": "spotify_songs",
            }
        for key, value in (("genres", r["playlist_genre"]), ("subgenres", r["playlist_subgenre"]),
                           ("playlists", r["playlist_name"].strip())):
            if value and value not in t[key]:
                t[key].append(value)
        row_genres = [r["playlist_id"], r["playlist_genre"], r["playlist_subgenre"]]
        if row_genres not in t["playlist_genres"]:  # which playlist each genre came from (the split filters them)
            t["playlist_genres"].append(row_genres)
    return tracks, list(playlists.values())


def load_musicoset(folder: Path) -> dict:
    """The MusicOSet tables needed here, keyed by song id / artist id."""
    tables = {name: _read_rows(folder / name, cols, delimiter="\t") for name, cols in MUSICOSET_COLUMNS.items()}
    artists = {}
    for a in tables["artists.csv"]:
        genres = _literal(a["genres"], [])
        genres = [g for g in genres if isinstance(g, str)] if isinstance(genres, list) else []
        if not genres and a["main_genre"] and a["main_genre"] != "-":
            genres = [a["main_genre"]]
        artists[a["artist_id"]] = {"name": a["name"], "genres": genres}
    return {
        "songs": {s["song_id"]: s for s in tables["songs.csv"]},
        "artists": artists,
        "tracks": {t["song_id"]: t for t in tables["tracks.csv"]},
        "features": {f["song_id"]: f for f in tables["acoustic_features.csv"]},
        "lyrics": {l["song_id"]: l["lyrics"] for l in tables["lyrics.csv"] if l.get("song_id") and l.get("lyrics")},
    }


def load_sources(data_dir: str | Path) -> SourceData:
    """Read and merge both sources found under ``data_dir`` (the shared data folder)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise SourceError(f"{data_dir}: data folder not found (pass --data PATH to the folder holding "
                          "spotify_songs/ and musicoset/)")
    tracks, playlists = load_spotify_songs(data_dir / "spotify_songs" / "spotify_songs.csv.gz")
    n_spotify = len(tracks)
    mos = load_musicoset(data_dir / "musicoset")

    genres_by_artist_name: dict[str, list[str]] = {}
    for a in mos["artists"].values():
        genres_by_artist_name.setdefault(norm_name(a["name"]), a["genres"])

    lyrics: dict[str, str] = {}
    shared = 0
    for sid, song in mos["songs"].items():
        artist_map = _literal(song["artists"], {})
        artist_map = artist_map if isinstance(artist_map, dict) else {}
        artist_genres: list[str] = []
        for aid in artist_map:
            for g in mos["artists"].get(aid, {}).get("genres", []):
                if g not in artist_genres:
                    artist_genres.append(g)
        explicit = {"True": 1, "False": 0}.get(song["explicit"])
        t = tracks.get(sid)
        if t is not None:
            shared += 1
            t["source"] = "spotify_songs+musicoset"
            t["explicit"] = explicit
            for g in artist_genres:
                if g not in t["artist_genres"]:
                    t["artist_genres"].append(g)
        else:
            feats = mos["features"].get(sid)
            rel = mos["tracks"].get(sid, {})
            names = [str(n).strip() for n in artist_map.values() if str(n).strip()]
            tracks[sid] = {
                "id": sid, "title": song["song_name"].strip(), "artists": names, "album": None,
                "album_id": rel.get("album_id") or None, "release_date": rel.get("release_date") or None,
                "year": _year(rel.get("release_date")), "genres": [], "subgenres": [],
                "artist_genres": artist_genres, "playlists": [], "popularity": _int(song["popularity"]),
                "duration_ms": _int(feats["duration_ms"]) if feats else None, "explicit": explicit,
                **(_features(feats) if feats else {k: None for k in AUDIO_FEATURES}), "source": "musicoset",
            }
        raw = mos["lyrics"].get(sid)
        if raw:
            text = _lyrics_text(raw)
            if len(text) >= 40:
                lyrics[sid] = text

    for t in tracks.values():
        if not t["artist_genres"]:
            for a in t["artists"]:
                for g in genres_by_artist_name.get(norm_name(a), []):
                    if g not in t["artist_genres"]:
                        t["artist_genres"].append(g)
        t["artist"] = ", ".join(t["artists"])
        t["has_lyrics"] = int(t["id"] in lyrics)
        t["features_provenance"] = "spotify" if t["energy"] is not None else None

    ordered = sorted(tracks.values(), key=lambda t: t["id"])
    stats = {
        "spotify_songs_tracks": n_spotify, "musicoset_songs": len(mos["songs"]), "shared_ids": shared,
        "tracks": len(ordered), "playlists": len(playlists), "lyrics": len(lyrics),
        "with_artist_genres": sum(bool(t["artist_genres"]) for t in ordered),
    }
    return SourceData(tracks=ordered, playlists=playlists, lyrics=lyrics, stats=stats)
