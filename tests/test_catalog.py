"""Catalog build and the music tokenizer, on generated fake data with the real ONNX text encoder."""

from __future__ import annotations

import gzip
import json
import shutil
import sqlite3

import numpy as np
import pytest
from click.testing import CliRunner

from talkplay_edge.catalog import Catalog, CatalogError, json_strings
from talkplay_edge.catalog_build import CF_HOLDOUT, build_catalog, cf_playlist_ids, resolve_collisions, training_playlist_view
from talkplay_edge.cli import cli
from talkplay_edge.music_tokenizer import assign_clusters, embed_modalities
from talkplay_edge.sources import SourceError, load_sources
from talkplay_edge.tokens import MODALITIES, NONE, SPAN_END, SPAN_START, parse_token


def test_sources_merge(fake_data_dir):
    src = load_sources(fake_data_dir)
    ids = [t["id"] for t in src.tracks]
    assert len(ids) == len(set(ids))
    by_id = {t["id"]: t for t in src.tracks}
    shared = [t for t in src.tracks if t["source"] == "spotify_songs+musicoset"]
    assert len(shared) == 2 and all(t["explicit"] == 0 and "album rock" in t["artist_genres"] for t in shared)
    mo = by_id["mo0000"]
    assert mo["source"] == "musicoset" and mo["explicit"] == 1 and mo["artist_genres"] == ["pop", "dance pop"]
    assert by_id["mo0007"]["artist_genres"] == []  # "-" main genre and no genres: nothing invented
    assert src.stats["lyrics"] == 5 and all(by_id[t]["has_lyrics"] for t in src.lyrics)
    assert all(len(p["track_ids"]) == 10 for p in src.playlists)


def test_sources_errors_name_the_file(tmp_path, fake_data_dir):
    with pytest.raises(SourceError, match="data folder not found"):
        load_sources(tmp_path / "nope")
    broken = shutil.copytree(fake_data_dir, tmp_path / "d")
    songs = broken / "musicoset" / "songs.csv"
    songs.write_text(songs.read_text().replace("popularity", "popularitty", 1))
    with pytest.raises(SourceError, match=r"songs\.csv: missing column\(s\) popularity"):
        load_sources(broken)
    (broken / "musicoset" / "songs.csv").write_text("")
    with pytest.raises(SourceError, match=r"songs\.csv"):
        load_sources(broken)
    gz = broken / "spotify_songs" / "spotify_songs.csv.gz"
    gz.write_bytes(gzip.compress(b"x")[:10])
    with pytest.raises(SourceError, match=r"spotify_songs\.csv\.gz: cannot read"):
        load_sources(broken)


def test_codes_uncached_per_track_and_shared(tiny_catalog):
    """``codes(cache=False)`` leaves nothing behind; ``code``/``span``/``get`` read one track from the database
    and agree with the full read; tokens and ids are shared objects, not one string per track."""
    with Catalog.open(tiny_catalog) as cat:
        fresh = cat.codes(cache=False)
        assert cat._codes is None and cat.codes(cache=False) is not fresh
        tid = sorted(fresh)[3]
        assert cat.code(tid) == fresh[tid] and cat.get(tid).code == fresh[tid]
        assert cat.span(tid) == SPAN_START + "".join(fresh[tid]) + SPAN_END
        assert cat._codes is None  # per-track reads did not fill the cache
        assert cat.code("no-such-track") is None
        with pytest.raises(KeyError):
            cat.span("no-such-track")
        a = next(iter(fresh.values()))
        same = [x for x in fresh.values() if x[4] == a[4]]
        assert len(same) > 1 and all(x[4] is a[4] for x in same)  # one string object per token
        assert cat.codes() is cat.codes() and cat.codes() == fresh  # the cached read: the same codes
        assert cat.popular_ids() is cat.popular_ids() and sorted(cat.popular_ids()) == sorted(fresh)
        assert all(x is y for x, y in zip(sorted(cat.popular_ids()), sorted(fresh)))  # interned ids


def test_catalog_contents(tiny_catalog):
    with Catalog.open(tiny_catalog, verify=True) as cat:
        info = cat.info()
        assert info["tracks"] == len(cat) == 56
        codes = cat.codes()
        assert len(codes) == 56 and len(set(codes.values())) == 56  # every track reachable
        vocab = set(cat.vocabulary)
        assert cat.vocabulary[:2] == [SPAN_START, SPAN_END]
        assert all(len(t.encode()) < 32 for t in cat.vocabulary)
        for code in codes.values():
            assert [parse_token(t).modality for t in code[:5]] == list(MODALITIES)
            assert set(code) <= vocab
        assert cat.span(next(iter(codes))).startswith(SPAN_START)
        # a track in no training playlist has no CF; musicoset-only tracks have no playlist at all
        assert cat.get("mo0003").code[0] == "<|cf_none|>"
        assert cat.get("mo0007").code[1] == "<|tag_none|>"  # no genres, no playlists, no artist genres
        with_lyrics = {r[0] for r in cat.conn.execute("select id from tracks where has_lyrics")}
        for tid, code in codes.items():
            assert (code[3] == "<|lyr_none|>") == (tid not in with_lyrics)
        cf_ids, cf = cat.cf_vectors()
        # CF is learnt from the training playlists outside the held-out fold (CF-cold tracks for training)
        fed_ids = cf_playlist_ids([p["id"] for p in cat.playlists("train")], 0)
        fed = [p for p in cat.playlists("train") if p["id"] in fed_ids]
        assert 0 < len(fed) < len(cat.playlists("train"))
        train = {t for p in fed for t in p["track_ids"]}
        assert set(cf_ids) == train and cf.shape[1] == 64
        assert {tid for tid, code in codes.items() if code[0] != "<|cf_none|>"} == train
        assert json.loads(cat.meta["build"])["cf_holdout"] == CF_HOLDOUT
        assert {p["split"] for p in cat.playlists()} <= {"train", "valid", "test"}
        assert cat.search("Throwback Jams", 5), "FTS finds playlist-name tags"
        assert info["modalities"]["metadata"]["coverage"] == 1.0


def test_held_out_playlists_stay_out_of_track_text(tiny_catalog, fake_data_dir):
    """A valid or test playlist's name or genre on its tracks would point every system (tag token, BM25, the
    dense retriever, the genre and style marks) at the tracks an eval conversation over that playlist is after."""
    src = {t["id"]: t for t in load_sources(fake_data_dir).tracks}
    with Catalog.open(tiny_catalog) as cat:
        assert {p["name"] for p in cat.playlists() if p["split"] != "train"} == {"Rainy Day Rock", "Gym Bangers"}
        in_train: dict[str, set] = {}
        genres: dict[str, set] = {}
        for p in cat.playlists("train"):
            for t in p["track_ids"]:
                in_train.setdefault(t, set()).add(p["name"])
                genres.setdefault(t, set()).update(x for pid, g, sub in src[t]["playlist_genres"] if pid == p["id"]
                                                   for x in (g, sub))
        rows = list(cat.rows("id, playlists, genres, subgenres, genre, subgenre, tags"))
        assert sum(bool(json_strings(r["playlists"])) for r in rows) > 30
        assert sum(bool(json_strings(r["genres"])) for r in rows) > 30
        for r in rows:
            assert set(json_strings(r["playlists"])) == in_train.get(r["id"], set()), r["id"]
            assert "Rainy Day" not in (r["tags"] or "") and "Bangers" not in (r["tags"] or "")
            both = set(json_strings(r["genres"])) | set(json_strings(r["subgenres"]))
            assert both <= genres.get(r["id"], set()), r["id"]
            assert r["genre"] == (json_strings(r["genres"]) or [None])[0]
        assert cat.search("Rainy", 5) == [] and cat.search("Bangers", 5) == []
        build = json.loads(cat.meta["build"])
        assert build["playlist_names"] == build["playlist_genres"] == "training playlists only"


def test_training_playlist_view_drops_what_held_out_playlists_say():
    """Per source row: a genre a held-out playlist gives is dropped even where a training playlist holds the
    track under another one; a track only held-out playlists hold keeps no genre, subgenre or name."""
    playlists = [{"id": "tr", "name": "Train Mix", "genre": "pop", "subgenre": "dance pop", "split": "train",
                  "track_ids": ["a"]},
                 {"id": "te", "name": "Dance Room", "genre": "rock", "subgenre": "hard rock", "split": "test",
                  "track_ids": ["a", "b"]}]
    tracks = [{"id": "a", "genres": ["rock", "pop"], "subgenres": ["hard rock", "dance pop"],
               "playlists": ["Dance Room", "Train Mix"],
               "playlist_genres": [["te", "rock", "hard rock"], ["tr", "pop", "dance pop"]]},
              {"id": "b", "genres": ["rock"], "subgenres": ["hard rock"], "playlists": ["Dance Room"],
               "playlist_genres": [["te", "rock", "hard rock"]]},
              {"id": "c", "genres": ["pop"], "subgenres": [], "playlists": []}]  # no source rows
    a, b, c = training_playlist_view(tracks, playlists)
    assert (a["genres"], a["subgenres"], a["playlists"]) == (["pop"], ["dance pop"], ["Train Mix"])
    assert (b["genres"], b["subgenres"], b["playlists"]) == ([], [], [])
    assert c["genres"] == []  # no training playlist holds it
    playlists[0]["track_ids"].append("c")  # without rows, the training playlist's own genre counts
    assert training_playlist_view(tracks, playlists)[2]["genres"] == ["pop"]
    assert tracks[1]["genres"] == ["rock"]  # copies: the source is left as it was


def test_build_with_reused_codebooks_keeps_the_fingerprint(fake_data_dir, text_encoder, tiny_catalog, tmp_path):
    """``--codebooks``: the same codebooks and fingerprint, codes assigned anew; another encoder is refused."""
    src = load_sources(fake_data_dir)
    for t in src.tracks:  # what the tags say changes, the codebooks do not
        t["artist_genres"] = ["polka"]
    out = tmp_path / "reused.db"
    build_catalog(src, out, text_encoder, k=8, quiet=True, codebooks_from=tiny_catalog)
    with Catalog.open(tiny_catalog) as a, Catalog.open(out) as b:
        assert a.fingerprint == b.fingerprint
        for m in MODALITIES:
            assert np.array_equal(a.codebook(m).centroids, b.codebook(m).centroids)
        changed = {t for t, code in b.codes().items() if code[1] != a.codes()[t][1]}
        assert changed and {t for t, code in b.codes().items() if code[2] != a.codes()[t][2]} == set()
        assert json.loads(b.meta["build"])["codebooks_from"] == tiny_catalog.name

    class Other:
        name, version, dim = "another-encoder", "1", text_encoder.dim

        def encode(self, texts, **kw):
            return text_encoder.encode(texts, **kw)

        def encode_long(self, text):
            return text_encoder.encode_long(text)

    with pytest.raises(ValueError, match="tags codebook was made with .* build without --codebooks"):
        build_catalog(load_sources(fake_data_dir), tmp_path / "x.db", Other(), k=8, quiet=True,
                      codebooks_from=tiny_catalog)


def test_build_is_deterministic(fake_data_dir, text_encoder, tiny_catalog, tmp_path):
    out = tmp_path / "again.db"
    build_catalog(load_sources(fake_data_dir), out, text_encoder, k=8, quiet=True)
    with Catalog.open(tiny_catalog) as a, Catalog.open(out) as b:
        assert a.fingerprint == b.fingerprint
        assert a.codes() == b.codes()


def test_new_track_gets_its_build_time_code(fake_data_dir, text_encoder, tiny_catalog):
    """Re-tokenise tracks with the stored centroids only: same clusters as stored at build time."""
    src = load_sources(fake_data_dir)
    with Catalog.open(tiny_catalog) as cat:
        cf_ids, cf = cat.cf_vectors()
        sample = src.tracks[::5]
        emb = embed_modalities(sample, text_encoder, lyrics=src.lyrics, cf=dict(zip(cf_ids, cf)))
        clusters = assign_clusters(len(sample), emb, {m: cat.codebook(m) for m in MODALITIES})
        stored = {r["track_id"]: r for r in cat.conn.execute("select * from codes")}
        for i, t in enumerate(sample):
            assert [int(clusters[m][i]) for m in MODALITIES] == [stored[t["id"]][m] for m in MODALITIES], t["id"]


def test_collisions_get_dup_tokens(fake_data_dir, text_encoder, tmp_path):
    src = load_sources(fake_data_dir)
    original = next(t for t in src.tracks if t["id"] == "mo0007")  # no playlist (cf), no lyrics
    twin = dict(original, id="zz-twin", popularity=-1)  # identical content, less popular
    src.tracks.append(twin)
    out = tmp_path / "c.db"
    summary = build_catalog(src, out, text_encoder, k=8, quiet=True)
    assert summary["collisions"]["tracks_sharing_code_before"] >= 2
    assert summary["collisions"]["collision_rate_after"] == 0.0
    with Catalog.open(out) as cat:
        a, b = cat.codes()["mo0007"], cat.codes()["zz-twin"]
        assert a[:5] == b[:5] and a != b and b[5] == "<|dup_001|>"
        assert "<|dup_001|>" in cat.vocabulary


def test_resolve_collisions_orders_by_popularity():
    dup, stats = resolve_collisions([(1, 2), (1, 2), (3, 4), (1, 2)], [5, 9, 1, None], ["a", "b", "c", "d"])
    assert dup == [1, 0, 0, 2] and stats["largest_group"] == 3 and stats["max_dup"] == 2


def test_failed_build_keeps_the_good_catalog(fake_data_dir, tiny_catalog, tmp_path):
    target = tmp_path / "catalog.db"
    shutil.copy(tiny_catalog, target)
    before = target.read_bytes()

    class Broken:
        name, version, dim = "broken", "0", 384

        def encode(self, texts, **kw):
            raise RuntimeError("encoder crashed")

    with pytest.raises(RuntimeError, match="encoder crashed"):
        build_catalog(load_sources(fake_data_dir), target, Broken(), k=8, quiet=True)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["catalog.db"]


def test_open_rejects_bad_files(tmp_path, tiny_catalog):
    with pytest.raises(CatalogError, match="not found"):
        Catalog.open(tmp_path / "missing.db")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(CatalogError, match="junk.db"):
        Catalog.open(junk)
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("create table x (a)").connection.commit()
    with pytest.raises(CatalogError, match="missing table"):
        Catalog.open(other)
    tampered = tmp_path / "tampered.db"
    shutil.copy(tiny_catalog, tampered)
    with sqlite3.connect(tampered) as conn:
        conn.execute("update tokens set token = '<|cf_9999|>' where id = 3")
    Catalog.open(tampered).close()  # cheap open does not hash
    with pytest.raises(CatalogError, match="fingerprint"):
        Catalog.open(tampered, verify=True)


def test_cli_info_and_errors(tiny_catalog, tmp_path):
    runner = CliRunner()
    r = runner.invoke(cli, ["info", "--catalog", str(tiny_catalog), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["tracks"] == 56 and set(data["modalities"]) == set(MODALITIES)
    assert all(m["codes_used"] <= m["k"] for m in data["modalities"].values())
    with Catalog.open(tiny_catalog) as cat:
        themes = [t.lyrics_theme for t in cat.tracks() if t.lyrics_theme]
    assert themes and sum(data["lyrics_themes"].values()) == len(themes)
    assert f"{len(themes)} tracks with a lyrics theme" in runner.invoke(cli, ["info", "--catalog", str(tiny_catalog)]).output
    r = runner.invoke(cli, ["info", "--catalog", str(tmp_path / "nope.db")])
    assert r.exit_code == 1 and "catalog not found" in r.output and "Traceback" not in r.output
    r = runner.invoke(cli, ["catalog", "build", "--data", str(tmp_path / "nodata"), "--out", str(tmp_path / "x.db")])
    assert r.exit_code == 1 and "data folder not found" in r.output
    assert not (tmp_path / "x.db").exists()


def test_none_clusters_for_missing_modalities(text_encoder):
    tracks = [{"id": "a", "title": "Solo", "artist": "Nobody", "genres": [], "subgenres": [], "artist_genres": [],
               "playlists": [], "danceability": None}]
    emb = embed_modalities(tracks, text_encoder)

    class CB:
        def __init__(self, d):
            self.centroids, self.transform = np.eye(2, d, dtype=np.float32), {}

    clusters = assign_clusters(1, emb, {"metadata": CB(384), "tags": CB(384), "lyrics": CB(384), "audio": CB(12), "cf": CB(64)})
    assert clusters["metadata"][0] != NONE
    assert all(clusters[m][0] == NONE for m in ("tags", "lyrics", "audio", "cf"))


def test_read_only_open_recovers_from_a_killed_writer(tiny_catalog, tmp_path):
    """A writer killed mid-transaction (as `talkplay index` can be) leaves a hot journal, which a plain
    read-only SQLite connection refuses ("attempt to write a readonly database"); Catalog.open rolls it back
    and reads the last committed state."""
    import os
    import signal
    import subprocess
    import sys

    db = tmp_path / "catalog.db"
    shutil.copy(tiny_catalog, db)
    with Catalog.open(db) as cat:
        n_tracks = len(cat.track_ids())
    writer = ("import sqlite3, sys, time\n"
              "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
              "c.execute('pragma cache_size=1')\nc.execute('begin')\n"
              "c.execute('delete from tracks')\n"  # an uncommitted change, spilled to the file (tiny cache)
              "for i in range(20000): c.execute('insert into meta values (?, ?)', (f'junk{i}', 'x' * 200))\n"
              "print('ready', flush=True)\ntime.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", writer, str(db)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert (tmp_path / "catalog.db-journal").stat().st_size > 0
    plain = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        plain.execute("select count(*) from tracks").fetchone()
    plain.close()
    with Catalog.open(db) as cat:
        assert len(cat.track_ids()) == n_tracks and "junk0" not in cat.meta


def test_lyrics_themes_are_stored_and_an_older_catalog_gains_the_column(tiny_catalog, fake_data_dir, tmp_path):
    from talkplay_edge.catalog_build import fill_lyrics_themes
    from talkplay_edge.conversations import lyrics_theme

    lyrics = load_sources(fake_data_dir).lyrics
    want = {tid: lyrics_theme(text) for tid, text in lyrics.items()}
    assert any(want.values())  # the fake lyrics repeat theme words
    with Catalog.open(tiny_catalog) as cat:
        got = {t.id: t.lyrics_theme for t in cat.tracks()}
    assert {tid: got[tid] for tid in want} == want
    assert not any(theme for tid, theme in got.items() if tid not in lyrics)
    # a catalog made before the column: reads None, gains it when opened for writing, and is filled in
    old = tmp_path / "old.db"
    shutil.copy(tiny_catalog, old)
    with sqlite3.connect(old) as conn:
        conn.execute("alter table tracks drop column lyrics_theme")
    with Catalog.open(old) as cat:
        assert not any(t.lyrics_theme for t in cat.tracks())
    assert fill_lyrics_themes(old, fake_data_dir) == sum(map(bool, want.values()))
    with Catalog.open(old, verify=True) as cat:
        assert {t.id: t.lyrics_theme for t in cat.tracks()} == got
