"""What each of the five modalities embeds for one track (the inputs to the codebooks).

- metadata: the text ``"title — artist · album · year"`` (missing parts left out) → MiniLM.
- tags:     the genres, subgenres and names of the training playlists holding the track
            (``catalog_build.training_playlist_view``) and its artist's genres, comma-joined → MiniLM.
- lyrics:   the lyrics text, chunked and mean-pooled → MiniLM (``TextEncoder.encode_long``).
- audio:    the audio-descriptor vector below, standardised with the catalog's stored mean/std.
- cf:       the item2vec vector of a track that is in at least one training playlist.

Audio-descriptor schema (``AUDIO_SCHEMA``; Spotify's audio-feature definitions; a later stage
estimates the same vector from audio files):

====================  =====================================================
danceability          0..1
energy                0..1
key_sin, key_cos      pitch class k (0=C … 11=B) as sin/cos(2πk/12); (0, 0) when no key
mode                  1 major, 0 minor
loudness              dB (about -60..0)
speechiness           0..1
acousticness          0..1
instrumentalness      0..1
liveness              0..1
valence               0..1
tempo                 beats per minute
====================  =====================================================
"""

from __future__ import annotations

import math

import numpy as np

AUDIO_SCHEMA: tuple[str, ...] = (
    "danceability", "energy", "key_sin", "key_cos", "mode", "loudness", "speechiness", "acousticness",
    "instrumentalness", "liveness", "valence", "tempo",
)


def metadata_text(track: dict) -> str:
    """"title — artist · album · year" with the parts the track lacks left out."""
    head = track.get("title") or ""
    if track.get("artist"):
        head = f"{head} — {track['artist']}"
    parts = [head] + [str(v) for v in (track.get("album"), track.get("year")) if v]
    return " · ".join(p for p in parts if p)


def _unique(values) -> list[str]:
    seen: dict[str, None] = {}
    for v in values:
        if v and v.casefold() not in {s.casefold() for s in seen}:
            seen[v] = None
    return list(seen)


def tags_text(track: dict, max_artist_genres: int = 8) -> str | None:
    """Comma-joined semantic tags, or None when the track has none (→ the tag modality's none token)."""
    tags = _unique([*track.get("genres", []), *track.get("subgenres", []),
                    *track.get("artist_genres", [])[:max_artist_genres], *track.get("playlists", [])])
    return ", ".join(tags) if tags else None


def audio_vector(track: dict) -> np.ndarray | None:
    """The raw (unstandardised) audio-descriptor vector in ``AUDIO_SCHEMA`` order, or None if incomplete."""
    names = ("danceability", "energy", "key", "mode", "loudness", "speechiness", "acousticness",
             "instrumentalness", "liveness", "valence", "tempo")
    vals = {k: track.get(k) for k in names}
    if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in vals.values()):
        return None
    key = int(vals["key"])
    ks, kc = (math.sin(2 * math.pi * key / 12), math.cos(2 * math.pi * key / 12)) if key >= 0 else (0.0, 0.0)
    row = [vals["danceability"], vals["energy"], ks, kc, vals["mode"], vals["loudness"], vals["speechiness"],
           vals["acousticness"], vals["instrumentalness"], vals["liveness"], vals["valence"], vals["tempo"]]
    return np.asarray(row, dtype=np.float32)


def standardise(vectors: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    return ((vectors - mean) / std).astype(np.float32)
