"""Synthetic conversations: patterns, grounding of intents, held-out patterns, determinism, the JSONL reader."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from talkplay_edge.catalog import Catalog
from talkplay_edge.cli import cli
from talkplay_edge.conversations import (
    PATTERNS, ConversationFormatError, build_conversations, count_patterns, descriptors, load_tracks,
    lyrics_theme, pattern_id, pattern_regex, pattern_split, read_conversations, slot_values, with_playlist_genre,
)
from talkplay_edge.sources import load_sources

SIZES = {"train": 200, "valid": 20, "test": 40, "test_unseen": 40}


@pytest.fixture(scope="module")
def generated(tiny_catalog, fake_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv")
    lyrics = load_sources(fake_data_dir).lyrics
    with Catalog.open(tiny_catalog) as cat:
        stats = build_conversations(cat, out, seed=0, sizes=SIZES, lyrics=lyrics, show_progress=False)
    return out, stats


def test_pattern_bank_size_and_split():
    counts = count_patterns()
    assert counts["total"] >= 300
    train, held = pattern_split()
    all_train = {t for ts in train.values() for t in ts}
    all_held = {t for ts in held.values() for t in ts}
    assert not all_train & all_held
    assert len(all_train) + len(all_held) == counts["total"] == len({(i, t) for i, ts in PATTERNS.items() for t in ts})
    assert counts["heldout"] >= 60 and all(held[i] and train[i] for i in PATTERNS)
    assert pattern_split() == (train, held)  # deterministic


def test_pattern_regex_typed_slots():
    values = slot_values(["rock", "hard rock"])
    rx = pattern_regex("something {genre} please", values)
    assert rx.match("something hard rock please") and not rx.match("something upbeat please")
    assert pattern_regex("Play something by {artist}.", values).match("Play something by The Rains.")


def test_lyrics_theme():
    assert lyrics_theme("baby baby I love you, my heart") == "love"
    assert lyrics_theme("nothing to see here at all") is None


def test_files_and_stats(generated):
    out, stats = generated
    for name, n in SIZES.items():
        convs = read_conversations(out / f"{name}.jsonl")
        assert len(convs) == n == stats["splits"][name]["conversations"]
        assert len({c["id"] for c in convs}) == n
    assert json.loads((out / "stats.json").read_text())["patterns"] == count_patterns()


def test_conversations_follow_one_playlist_and_split(generated, tiny_catalog):
    out, _ = generated
    with Catalog.open(tiny_catalog) as cat:
        pls = {p["id"]: p for p in cat.playlists()}
    for name in SIZES:
        for c in read_conversations(out / f"{name}.jsonl"):
            turns = c["turns"]
            assert [t["role"] for t in turns] == ["user", "assistant"] * (len(turns) // 2)
            assert 2 <= len(turns) // 2 <= 8
            pl = pls[c["meta"]["playlist_id"]]
            assert pl["split"] == ("test" if name == "test_unseen" else name)
            targets = [tid for t in turns if t["role"] == "assistant" for tid in t["track_ids"]]
            assert len(targets) == len(set(targets)) and set(targets) <= set(pl["track_ids"])


def test_intents_are_true_of_the_target(generated, tiny_catalog, fake_data_dir):
    """Each follow-up intent holds for the chosen track relative to the previous one; replies are grounded."""
    out, _ = generated
    with Catalog.open(tiny_catalog) as cat:
        tracks = load_tracks(cat, lyrics=load_sources(fake_data_dir).lyrics)
        playlists = {p["id"]: p for p in cat.playlists()}
    checked = {}
    for name in SIZES:
        for c in read_conversations(out / f"{name}.jsonl"):
            playlist = playlists[c["meta"]["playlist_id"]]  # as the user knows the tracks: with its genre
            targets = [with_playlist_genre(tracks[t["track_ids"][0]], playlist)
                       for t in c["turns"] if t["role"] == "assistant"]
            replies = [t["content"] for t in c["turns"] if t["role"] == "assistant"]
            users = [t["content"] for t in c["turns"] if t["role"] == "user"]
            for k, intent in enumerate(c["meta"]["intents"]):
                t, prev = targets[k], targets[k - 1] if k else None
                assert f"“{t.title}” by {t.artist}" in replies[k]
                if t.year:
                    assert f"({t.year})" in replies[k]
                for word in ("high-energy", "mellow", "danceable", "acoustic", "upbeat", "moody"):
                    if f" {word} " in replies[k]:
                        assert word in descriptors(t), (word, replies[k])
                ok = {
                    "faster": lambda: t.f("tempo") > prev.f("tempo"), "neg_too_slow": lambda: t.f("tempo") > prev.f("tempo"),
                    "slower": lambda: t.f("tempo") < prev.f("tempo"), "neg_too_fast": lambda: t.f("tempo") < prev.f("tempo"),
                    "more_energy": lambda: t.f("energy") > prev.f("energy"),
                    "less_energy": lambda: t.f("energy") < prev.f("energy"),
                    "happier": lambda: t.f("valence") > prev.f("valence"), "sadder": lambda: t.f("valence") < prev.f("valence"),
                    "older": lambda: t.year < prev.year, "newer": lambda: t.year > prev.year,
                    "neg_too_old": lambda: t.year > prev.year,
                    "other_artist": lambda: not set(t.artists) & {a for p in targets[:k] for a in p.artists},
                    "same_artist": lambda: bool(set(t.artists) & set(prev.artists)),
                    "artist": lambda: any(a in users[k] for a in t.artists),
                    "era": lambda: any(w in users[k] for w in (str(t.year // 10 * 10) + "s", f"{t.year % 100 // 10}0s")),
                    "lyrics": lambda: t.theme is not None and t.theme in users[k],
                    "more_like_this": lambda: bool(set(t.subgenres) & set(prev.subgenres)),
                }.get(intent)
                if ok is not None and (intent != "era" or t.year < 1980):  # "eighties" etc. are not digit forms
                    assert ok(), (intent, c["id"], users[k])
                    checked[intent] = checked.get(intent, 0) + 1
    assert {"faster", "slower", "older", "newer", "other_artist", "more_like_this"} <= set(checked)


def test_the_user_knows_their_playlists_genre(tiny_catalog):
    """The catalog keeps no genre a held-out playlist gives; the simulated user, whose playlist it is, does."""
    with Catalog.open(tiny_catalog) as cat:
        t = next(iter(load_tracks(cat).values()))
    bare = type(t)(t.id, t.title, t.artist, t.artists, t.year, (), (), t.feats, t.popularity)
    known = with_playlist_genre(bare, {"genre": "rock", "subgenre": "hard rock"})
    assert (known.genres, known.subgenres) == (("rock",), ("hard rock",)) and bare.genres == ()
    both = with_playlist_genre(known, {"genre": "pop", "subgenre": "hard rock"})
    assert (both.genres, both.subgenres) == (("rock", "pop"), ("hard rock",))
    assert with_playlist_genre(both, {"genre": "pop", "subgenre": None}) is both


def test_training_asks_for_cf_cold_tracks_like_test_does(generated, tiny_catalog):
    """Test playlists' tracks are mostly CF-cold (``<|cf_none|>``, 78% of the real test turns); the catalog's
    CF holdout must give the training conversations cold targets too, or a model never learns to open a span
    with ``<|cf_none|>``."""
    out, _ = generated
    with Catalog.open(tiny_catalog) as cat:
        cf = {tid: code[0] for tid, code in cat.codes().items()}

    def cold_share(split: str) -> float:
        targets = [t["track_ids"][0] for c in read_conversations(out / f"{split}.jsonl") for t in c["turns"]
                   if t.get("track_ids")]
        return sum(cf[t] == "<|cf_none|>" for t in targets) / len(targets)

    assert 0.02 < cold_share("train") < 0.95  # exactly 0 without the holdout


def test_heldout_patterns_never_in_train_splits(generated, tiny_catalog):
    out, _ = generated
    train, held = pattern_split()
    train_ids = {pattern_id(i, t) for i, ts in train.items() for t in ts}
    held_ids = {pattern_id(i, t) for i, ts in held.items() for t in ts}
    with Catalog.open(tiny_catalog) as cat:
        genres = {g for t in load_tracks(cat).values() for g in (*t.genres, *t.subgenres)}
    values = slot_values(sorted(genres))
    held_rx = [pattern_regex(t, values) for ts in held.values() for t in ts]
    for name in ("train", "valid", "test"):
        for c in read_conversations(out / f"{name}.jsonl"):
            assert set(c["meta"]["patterns"]) <= train_ids
            for t in c["turns"]:
                if t["role"] == "user":
                    hits = [rx.pattern for rx in held_rx if rx.match(t["content"])]
                    assert not hits, (name, t["content"], hits)
    unseen = read_conversations(out / "test_unseen.jsonl")
    for c in unseen:
        assert set(c["meta"]["patterns"]) <= held_ids
        for t in c["turns"]:  # the text check has teeth: every unseen utterance is an instance of a held-out pattern
            if t["role"] == "user":
                assert any(rx.match(t["content"]) for rx in held_rx), t["content"]


def test_generation_is_deterministic_per_seed(generated, tiny_catalog, tmp_path):
    out, _ = generated
    small = {"train": 30, "valid": 5, "test": 10, "test_unseen": 10}
    with Catalog.open(tiny_catalog) as cat:
        build_conversations(cat, tmp_path / "a", seed=0, sizes=small, show_progress=False)
        build_conversations(cat, tmp_path / "b", seed=0, sizes=small, show_progress=False)
        build_conversations(cat, tmp_path / "c", seed=1, sizes=small, show_progress=False)
    for name in small:
        a = (tmp_path / "a" / f"{name}.jsonl").read_text()
        assert a == (tmp_path / "b" / f"{name}.jsonl").read_text()
        assert a != (tmp_path / "c" / f"{name}.jsonl").read_text()
    # conversation i does not depend on how many are generated (each has its own RNG)
    with Catalog.open(tiny_catalog) as cat:
        build_conversations(cat, tmp_path / "d", seed=0, sizes={"train": 12, "valid": 0, "test": 0, "test_unseen": 0},
                            show_progress=False)
    assert read_conversations(tmp_path / "d" / "train.jsonl") == read_conversations(tmp_path / "a" / "train.jsonl", limit=12)


@pytest.mark.parametrize("line, why", [
    ("{not json", "not valid JSON"),
    ('{"id": "x", "turns": []}', "non-empty list"),
    ('{"id": "x", "turns": [{"role": "assistant", "content": "hi"}]}', "track_ids"),
    ('{"id": "x", "turns": [{"role": "bot", "content": "hi"}]}', "role"),
    ('{"turns": [{"role": "user", "content": "hi"}]}', '"id"'),
    ('["a"]', "JSON object"),
])
def test_malformed_line_is_named(tmp_path, line, why):
    good = json.dumps({"id": "ok", "turns": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "try x", "track_ids": ["t1"]}]})
    p = tmp_path / "c.jsonl"
    p.write_text(f"{good}\n\n{good}\n{line}\n{good}\n")
    with pytest.raises(ConversationFormatError, match=rf"c\.jsonl:4: .*{why}"):
        read_conversations(p)
    assert len(read_conversations(p, limit=2)) == 2  # lines before the bad one are fine


def test_cli_build(tiny_catalog, fake_data_dir, tmp_path):
    import shutil
    import sqlite3

    def build(catalog, data, out):
        r = CliRunner().invoke(cli, ["conversations", "build", "--out", str(out), "--catalog", str(catalog),
                                     "--train", "20", "--valid", "3", "--test", "5", "--test-unseen", "5",
                                     "--data", str(data), "--json"])
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)

    # the catalog keeps its tracks' lyrics themes: no source data needed, and the same conversations
    stats = build(tiny_catalog, tmp_path / "missing", tmp_path / "convs")
    assert stats["splits"]["test"]["conversations"] == 5 and stats["lyrics_available"] is True
    out = tmp_path / "convs"
    assert {p.name for p in out.iterdir()} == {"train.jsonl", "valid.jsonl", "test.jsonl", "test_unseen.jsonl", "stats.json"}
    old = tmp_path / "old.db"  # a catalog made before it kept them: the lyrics come from the source data
    shutil.copy(tiny_catalog, old)
    with sqlite3.connect(old) as conn:
        conn.execute("alter table tracks drop column lyrics_theme")
    assert build(old, fake_data_dir, tmp_path / "from-data")["lyrics_available"] is True
    for name in ("train.jsonl", "test.jsonl", "test_unseen.jsonl"):
        assert (out / name).read_text() == (tmp_path / "from-data" / name).read_text()
    assert build(old, tmp_path / "missing", tmp_path / "none")["lyrics_available"] is False
