"""Generated source data for tests: a few dozen fake tracks in the real file formats (never the real data)."""

from __future__ import annotations

import csv
import gzip
import random
from pathlib import Path

from talkplay_edge.sources import AUDIO_FEATURES, MUSICOSET_COLUMNS, SPOTIFY_COLUMNS

GENRES = {"rock": ["album rock", "hard rock"], "pop": ["dance pop", "electropop"], "rap": ["trap", "gangster rap"]}
WORDS = ["night", "summer", "fire", "love", "rain", "city", "heart", "road", "dream", "gold", "river", "light"]
PLAYLIST_NAMES = ["Rainy Day Rock", "Summer Pop Hits", "Late Night Trap", "Workout Rap", "Classic Rock 70s",
                  "Chill Pop", "Road Trip", "Gym Bangers", "Indie Mornings", "Sad Songs", "Party Starters",
                  "Throwback Jams"]


def _features(rng: random.Random, genre: str) -> dict:
    energy = {"rock": 0.8, "pop": 0.6, "rap": 0.7}[genre]
    return {
        "danceability": round(rng.uniform(0.3, 0.9), 3), "energy": round(min(1, energy + rng.uniform(-0.2, 0.2)), 3),
        "key": rng.randrange(12), "mode": rng.randrange(2), "loudness": round(rng.uniform(-12, -3), 2),
        "speechiness": round(rng.uniform(0.02, 0.4 if genre == "rap" else 0.1), 3),
        "acousticness": round(rng.uniform(0, 0.5), 3), "instrumentalness": round(rng.uniform(0, 0.1), 4),
        "liveness": round(rng.uniform(0.05, 0.4), 3), "valence": round(rng.uniform(0.1, 0.9), 3),
        "tempo": round(rng.uniform(70, 170), 2),
    }


def write_fake_data(root: Path, n_tracks: int = 48, n_playlists: int = 12, seed: int = 0) -> Path:
    """Write spotify_songs/ and musicoset/ files with fake tracks under ``root``; returns ``root``."""
    rng = random.Random(seed)
    (root / "spotify_songs").mkdir(parents=True, exist_ok=True)
    (root / "musicoset").mkdir(parents=True, exist_ok=True)
    artists = [f"The {w.title()}s" for w in WORDS]
    tracks = []
    for i in range(n_tracks):
        genre = list(GENRES)[i % 3]
        tracks.append({
            "track_id": f"sp{i:04d}", "track_name": f"{rng.choice(WORDS).title()} {rng.choice(WORDS)} {i}",
            "track_artist": artists[i % len(artists)], "track_popularity": rng.randrange(100),
            "track_album_id": f"al{i // 4}", "track_album_name": f"Album {i // 4}",
            "track_album_release_date": f"{1970 + i % 50}-05-01", "genre": genre,
            "subgenre": GENRES[genre][i % 2], **_features(rng, genre), "duration_ms": rng.randrange(120000, 300000),
        })
    rows = []
    for p in range(n_playlists):
        members = [tracks[(p * 4 + j) % n_tracks] for j in range(10)]  # overlapping windows cover every track
        for t in members:
            rows.append({**{k: t[k] for k in SPOTIFY_COLUMNS if k in t}, "playlist_name": PLAYLIST_NAMES[p % len(PLAYLIST_NAMES)],
                         "playlist_id": f"pl{p:03d}", "playlist_genre": t["genre"], "playlist_subgenre": t["subgenre"]})
    with gzip.open(root / "spotify_songs" / "spotify_songs.csv.gz", "wt", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=SPOTIFY_COLUMNS)
        w.writeheader()
        w.writerows(rows)

    # MusicOSet: 2 songs shared with spotify_songs (enrich), 8 of its own; lyrics for 5
    songs = [{"song_id": t["track_id"], "song_name": t["track_name"], "artists": repr({f"ar{i}": t["track_artist"]}),
              "popularity": t["track_popularity"], "explicit": "False"} for i, t in enumerate(rows[:2])]
    for j in range(8):
        songs.append({"song_id": f"mo{j:04d}", "song_name": f"Billboard {rng.choice(WORDS)} {j}",
                      "artists": repr({f"mar{j}": f"Singer {j}"}), "popularity": rng.randrange(100),
                      "explicit": "True" if j % 3 == 0 else "False"})
    artists_rows = [{"artist_id": f"ar{i}", "name": rows[i]["track_artist"], "main_genre": "rock",
                     "genres": repr(["rock", "album rock"])} for i in range(2)]
    artists_rows += [{"artist_id": f"mar{j}", "name": f"Singer {j}", "main_genre": "pop" if j < 6 else "-",
                      "genres": repr(["pop", "dance pop"] if j < 6 else [])} for j in range(8)]
    mo_tracks = [{"song_id": s["song_id"], "album_id": f"mal{k}", "release_date": f"{1980 + k}-01-01"} for k, s in enumerate(songs)]
    feats = [{"song_id": s["song_id"], "duration_ms": 200000, **_features(rng, "pop")} for s in songs]
    lyrics = [{"song_id": s["song_id"], "lyrics": repr([f"[Verse 1]\n{' '.join(rng.choices(WORDS, k=60))}\n[Chorus]\n"
                                                        f"{' '.join(rng.choices(WORDS, k=30))}"])} for s in songs[:5]]
    for name, data in (("songs.csv", songs), ("artists.csv", artists_rows), ("tracks.csv", mo_tracks),
                       ("acoustic_features.csv", feats), ("lyrics.csv", lyrics)):
        cols = list(MUSICOSET_COLUMNS[name]) + [c for c in data[0] if c not in MUSICOSET_COLUMNS[name]]
        with open(root / "musicoset" / name, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=cols, delimiter="\t")
            w.writeheader()
            w.writerows(data)
    assert set(AUDIO_FEATURES) <= set(feats[0])
    return root
