"""What a request asks of the next track (talkplay_edge/asks.py), its head (export/asks.py), the asked mark."""

from __future__ import annotations

import numpy as np
import pytest

from talkplay_edge.asks import (ASKS, CUES, KINDS, NEAR_COUNT, NONE, OTHER_ARTIST, SAME_ARTIST, SIMILAR, AskHead,
                                AskHeadError, Asks, cues_of, decade_of, genres_in, moods_of)
from talkplay_edge.calibration import (ASKED, ERA, GENRE, LAST, PLAYED, STYLE, ArtistIndex, SpanCalibration,
                                       played_marks)


@pytest.mark.parametrize("message, decade", [
    ("Anything from the 80s?", 1980), ("I want 1980s music", 1980), ("some '90s rock", 1990),
    ("Take me back to the eighties.", 1980), ("a Nineties tune", 1990), ("something from the 2010s", 2010),
    ("Give me a 2000s hit", 2000), ("noughties pop please", 2000), ("a 1960s song", 1960),
    ("twenty-tens pop", 2010), ("Something faster.", None), ("play 80 songs", None), ("", None),
    ("the 1980s and the 90s", 1980), ("my 2080s playlist", 2080),
    # a decade only denied asks for none
    ("not from the 80s please", None), ("no songs from the 90s, something from the 2000s", 2000),
    ("Not 80s, 90s", 1990),
])
def test_decade_of(message, decade):
    assert decade_of(message) == decade


GENRES = ["latin", "latin hip hop", "hip hop", "r&b", "rap", "post-teen pop", "pop", "edm", "pop edm"]


@pytest.mark.parametrize("message, genres", [
    ("Give me a R&B track.", ["r&b"]), ("my playlist is called Hip-Hop Favourites", ["hip hop"]),
    ("Any Latin hip hop?", ["latin hip hop"]), ("latin pop and hip hop", ["hip hop", "latin", "pop"]),
    ("I want some post-teen pop", ["post-teen pop"]), ("Post teen pop, please", ["post-teen pop"]),
    ("a Pop EDM banger", ["pop edm"]), ("a rapper I like", []), ("popular songs", []), ("", []),
    ("rap, pop and EDM", ["edm", "pop", "rap"]),
    # everyday words for a genre, once each
    ("Something more electronic.", ["edm"]), ("Switch to electronic dance music.", ["edm"]),
    ("electronic or EDM, whatever", ["edm"]),
    # a genre only denied is not asked for
    ("Less EDM, please.", []), ("Something less electronic.", []), ("Not so electronic this time.", []),
    ("Can we move away from the electronic stuff?", []), ("Something that isn't dance music.", []),
    ("Enough of the pop, something else.", []), ("no more rap, some latin hip hop", ["latin hip hop"]),
    ("less pop more rap", ["rap"]), ("instead of rap, some pop", ["pop"]), ("rap, not pop", ["rap"]),
    ("something that isn’t EDM", []), ("no more pop or rap", []), ("no pop, rap please", ["rap"]),
])
def test_genres_in(message, genres):
    assert genres_in(message, GENRES) == genres


@pytest.mark.parametrize("message, genres", [
    ("Less EDM, please.", ["edm"]), ("Something less electronic.", ["edm"]), ("Not so electronic this time.", ["edm"]),
    ("Can we move away from the electronic stuff?", ["edm"]), ("Something that isn't dance music.", ["edm"]),
    ("Enough of the pop, something else.", ["pop"]), ("no more rap, some latin hip hop", ["rap"]),
    ("less pop more rap", ["pop"]), ("instead of rap, some pop", ["rap"]), ("rap, not pop", ["pop"]),
    ("no more pop or rap", ["pop", "rap"]), ("not rap nor r&b", ["r&b", "rap"]),  # a denial reaches on through "or"
    ("no pop, rap please", ["pop"]), ("no pop and some rap", ["pop"]),
    # asked, not denied; denied and asked again: not denied
    ("Play some rap.", []), ("Something more electronic.", []), ("", []), ("no pop. ok, pop", []),
    ("No more latin hip hop, some hip hop", ["latin hip hop"]),
])
def test_genres_denied(message, genres):
    from talkplay_edge.asks import genres_denied

    assert genres_denied(message, GENRES) == genres


def test_genre_words_only_for_genres_the_catalog_has():
    assert genres_in("something electronic", ["pop", "rap"]) == []
    assert genres_in("something electronic", ["pop", "edm"], words={}) == []
    assert genres_in("something electronic", ["pop", "edm"]) == ["edm"]


@pytest.mark.parametrize("message, moods", [
    ("Something chill, please.", ["mellow"]), ("I want feel-good gangster rap.", ["happy"]),
    ("Any high-energy songs?", ["energetic"]), ("an upbeat, danceable one", ["danceable", "happy"]),
    ("This is too mellow.", []), ("too sad, next", []), ("Play some rock", []), ("calmness", []),
    ("something slow-tempo", ["slow"]), ("mostly acoustic please", ["acoustic"]),
])
def test_moods_of(message, moods):
    assert moods_of(message) == moods


@pytest.mark.parametrize("message, cues", [
    ("Way too sluggish, speed it up!", {"fast", "too_slow"}), ("That tempo is too quick for me.", {"too_fast"}),
    ("Less intense, please.", {"less_energetic"}), ("not as gloomy", {"less_sad"}),
    ("Something released earlier than that.", {"old"}), ("Same artist, different song.", {"same_artist"}),
    ("Play another one by them", {"same_artist"}), ("someone else please", {"other_artist"}),
    ("a groovier one", {"dance"}), ("slow it down, slow", {"slow"}), ("Play me some jazz.", set()), ("", set()),
    ("Don't stop-the-music: laid-back", {"calm"}), ("More like this, please!", {"similar"}),
    ("I don't like this one", {"less_similar"}), ("same vibe but quicker", {"similar", "fast"}),
])
def test_cues_of(message, cues):
    assert cues_of(message) == {"cue:" + c for c in cues}
    assert all(c.split("_", 1)[-1] in CUES or c in CUES for c in cues)


@pytest.mark.parametrize("message, kind", [
    ("Something quicker.", "faster"), ("way too quick for me", "slower"), ("less intense please", "less_energy"),
    ("Too gloomy.", "happier"), ("a throwback next", "older"), ("someone else please", OTHER_ARTIST),
    ("more from them", SAME_ARTIST), ("quicker and older", NONE), ("Play me some jazz.", NONE), ("", NONE),
    ("not as slow", "faster"), ("Same vibe, please.", SIMILAR), ("like this but quicker", "faster"),
    ("I don't like this one", NONE), ("like this, by them, but older", NONE),
])
def test_cue_kind(message, kind):
    from talkplay_edge.asks import cue_kind

    assert cue_kind(message) == kind


def _onehot_embed(texts):
    """A stand-in encoder: a message that is a kind's name embeds as that kind's one-hot row, others as none's."""
    eye = np.eye(len(KINDS), dtype=np.float32)
    return np.stack([eye[KINDS.index(t) if t in KINDS else 0] for t in texts])


def _sure_head() -> AskHead:
    return AskHead(np.eye(len(KINDS)), np.zeros(len(KINDS)), KINDS, scale=10.0)


def test_ask_head_round_trip_and_bad_files(tmp_path):
    head = AskHead(np.arange(5 * len(KINDS), dtype=np.float32).reshape(5, -1) / 100, np.ones(len(KINDS)), KINDS,
                   4.0, "enc", "1.0", ("faster", "older"), 0.5)
    head.save(tmp_path / "h.npz")
    back = AskHead.load(tmp_path / "h.npz")
    assert back.kinds == KINDS and back.scale == 4.0 and (back.encoder, back.encoder_version) == ("enc", "1.0")
    assert back.words == ("faster", "older") and back.word_weight == 0.5 and back.dim == 3
    x = np.random.default_rng(0).normal(size=(2, 3)).astype(np.float32)
    msgs = ["Faster, please!", "something else"]
    assert np.allclose(back.probabilities(x, msgs), head.probabilities(x, msgs))
    assert np.allclose(head.probabilities(x, msgs).sum(1), 1)
    assert np.allclose(head.features(x, msgs)[:, 3:], [[0.5, 0], [0, 0]])  # the words it has, unit length × weight
    with pytest.raises(AskHeadError, match="pass them"):
        head.probabilities(x)
    with pytest.raises(AskHeadError, match="not found.*export.asks"):
        AskHead.load(tmp_path / "missing.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(AskHeadError, match="not an ask head"):
        AskHead.load(tmp_path / "bad.npz")
    with pytest.raises(AskHeadError, match="do not fit"):
        AskHead(np.zeros((3, 2)), np.zeros(2), KINDS)
    with pytest.raises(AskHeadError, match="do not fit"):
        AskHead(np.zeros((2, len(KINDS))), np.zeros(len(KINDS)), KINDS, words=("a", "b"))
    with pytest.raises(AskHeadError, match="unknown kinds"):
        AskHead(np.zeros((3, 2)), np.zeros(2), (NONE, "louder"))
    head = AskHead(np.zeros((4, len(KINDS))), np.zeros(len(KINDS)), KINDS, words=("a",))
    np.savez(tmp_path / "old.npz", W=head.W, b=head.b)  # not every field
    with pytest.raises(AskHeadError, match="not an ask head"):
        AskHead.load(tmp_path / "old.npz")


def test_ask_head_with_cues_round_trips_and_knows_its_cue_table(tmp_path, monkeypatch):
    import talkplay_edge.asks as asks_mod

    head = AskHead(np.arange(6 * len(KINDS), dtype=np.float32).reshape(6, -1) / 100, np.ones(len(KINDS)), KINDS,
                   4.0, "enc", "1.0", ("faster",), 0.5, ("cue:fast", "cue:old"), 2.0)
    assert head.dim == 3
    x = np.random.default_rng(0).normal(size=(3, 3)).astype(np.float32)
    msgs = ["Faster, quicker!", "something from back in time", "jazz"]
    f = head.features(x, msgs)
    assert np.allclose(f[:, 3:], [[0.5, 2.0, 0], [0, 0, 2.0], [0, 0, 0]])  # words, then cues, each unit × weight
    head.save(tmp_path / "h.npz")
    back = AskHead.load(tmp_path / "h.npz")
    assert back.cues == ("cue:fast", "cue:old") and back.cue_weight == 2.0 and not back.cue_fallback
    AskHead(head.W, head.b, KINDS, 4.0, words=("faster",), word_weight=0.5, cues=head.cues, cue_weight=2.0,
            cue_fallback=True).save(tmp_path / "f.npz")
    assert AskHead.load(tmp_path / "f.npz").cue_fallback
    assert np.allclose(back.probabilities(x, msgs), head.probabilities(x, msgs))
    monkeypatch.setattr(asks_mod, "CUE_TABLE", "another table")  # the code's cue words changed since training
    with pytest.raises(AskHeadError, match="another cue table.*export.asks"):
        AskHead.load(tmp_path / "h.npz")


def test_the_packaged_head_reads_steps_from_messages(text_encoder):
    head = AskHead.load()
    assert head.encoder_version == text_encoder.version  # trained on this encoder's embeddings
    msgs = ["Something older, please.", "slow it down a little", "Play me some jazz.", "not this artist again",
            "More like this one, please."]
    p = head.probabilities(text_encoder.encode(msgs), msgs)
    assert [head.kinds[i] for i in p.argmax(1)] == ["older", "slower", NONE, "other_artist", SIMILAR]
    assert head.cues and head.cue_weight > 0 and head.cue_fallback  # the shipped head reads cue words


@pytest.fixture()
def asks_on_tiny(tiny_catalog):
    from talkplay_edge.catalog import Catalog

    cat = Catalog.open(tiny_catalog)
    index = {t: i for i, t in enumerate(sorted(cat.codes()))}
    rows = {r["id"]: r for r in cat.rows("id, tempo, year, artist")}
    artists = ArtistIndex.from_catalog(cat, index)
    yield Asks(cat, index, _sure_head(), _onehot_embed, artists), index, rows, artists
    cat.close()


def _styles(row) -> set[tuple[str, str]]:
    """A track's styles as the runtime should read them: its subgenres and its artists' genres, apart."""
    import json

    return {(kind, " ".join(g.lower().split())) for kind, column in (("sub", "subgenres"), ("artist", "artist_genres"))
            for g in json.loads(row[column] or "[]") if g.strip()}


def _after(track: str, message: str) -> list[dict]:
    return [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x", "track_ids": [track]},
            {"role": "user", "content": message}]


def test_asks_finds_the_tracks_a_step_asks_for(asks_on_tiny):
    asks, index, rows, artists = asks_on_tiny
    ids = sorted(index, key=index.get)
    last = min(ids, key=lambda t: rows[t]["tempo"] if rows[t]["tempo"] is not None else 1e9)  # leaves faster ones
    got = asks.asked_tracks(_after(last, "faster"))
    want = [index[t] for t in ids if rows[t]["tempo"] is not None and rows[t]["tempo"] >= rows[last]["tempo"] + 8]
    assert want and sorted(got.tolist()) == want and index[last] not in got
    assert ASKS["faster"][0] == "tempo"
    # another artist: every track but the last one's main artist's
    other = set(asks.asked_tracks(_after(last, OTHER_ARTIST)).tolist())
    theirs = set(artists.tracks_of([artists.main_of(index[last])]).tolist())
    assert theirs and other == set(range(len(ids))) - theirs
    # the same artist: exactly the last one's main artist's tracks
    assert set(asks.asked_tracks(_after(last, SAME_ARTIST)).tolist()) == theirs
    # asking nothing, or a step with no track played yet: None
    assert asks.asked_tracks(_after(last, "play me something")) is None
    assert asks.asked_tracks([{"role": "user", "content": "faster"}]) is None
    # a decade, first turn or not; with a step too, both
    decade = (rows[ids[0]]["year"] // 10) * 10
    in_decade = {index[t] for t in ids if rows[t]["year"] and decade <= rows[t]["year"] < decade + 10}
    assert set(asks.asked_tracks([{"role": "user", "content": f"anything from the {decade}s?"}]).tolist()) == in_decade
    older = {index[t] for t in ids if rows[t]["year"] and rows[t]["year"] <= rows[last]["year"] - 2}
    assert older  # the fake years spread over decades


def test_asks_finds_the_tracks_that_sound_like_the_last_one(asks_on_tiny, tiny_catalog):
    """"More like this": the nearest tracks in sound in the whole catalog, whatever their style."""
    from talkplay_edge.asks import NEAR_FEATURES
    from talkplay_edge.catalog import Catalog

    asks, index, _, _ = asks_on_tiny
    with Catalog.open(tiny_catalog) as cat:
        rows = {index[r["id"]]: r for r in cat.rows("id, subgenres, artist_genres, "
                                                    + ", ".join(f for f, _ in NEAR_FEATURES))}
    styles = {i: _styles(r) for i, r in rows.items()}
    sounded = [i for i in rows if rows[i]["energy"] is not None]

    def dist(last, j):
        return sum(((rows[j][f] - rows[last][f]) * w) ** 2 for f, w in NEAR_FEATURES
                   if rows[j][f] is not None and rows[last][f] is not None)

    def nearest(last):
        return sorted((j for j in sounded if j != last), key=lambda j: (dist(last, j), j))

    # a track whose 3 nearest include one sharing no style with it: a style-only pool would leave that one out
    last = next(i for i in sorted(sounded) if any(not styles[j] & styles[i] for j in nearest(i)[:3])
                and dist(i, nearest(i)[3]) > dist(i, nearest(i)[2]))  # and no tie at the cut
    want = nearest(last)
    assert set(np.flatnonzero(asks.near(last, count=3)).tolist()) == set(want[:3])
    track = next(t for t, i in index.items() if i == last)
    got = set(asks.asked_tracks(_after(track, SIMILAR)).tolist())
    assert got == set(want[:NEAR_COUNT]) and last not in got
    assert asks.near(None) is None and asks.asked_tracks([{"role": "user", "content": SIMILAR}]) is None


def test_asks_near_nothing_for_a_track_without_sound(tiny_catalog, tmp_path):
    """A track without audio features has no sound to be near to, and is never among another's nearest."""
    import shutil
    import sqlite3

    from talkplay_edge.catalog import Catalog

    db = tmp_path / "catalog.db"
    shutil.copy(tiny_catalog, db)
    with Catalog.open(db) as cat:
        ids = sorted(cat.codes())
    silent_id, other_id = ids[0], ids[1]
    con = sqlite3.connect(db)
    con.execute("UPDATE tracks SET energy = NULL WHERE id = ?", (silent_id,))
    con.commit()
    con.close()
    index = {t: i for i, t in enumerate(ids)}
    with Catalog.open(db) as cat:
        asks = Asks(cat, index, _sure_head(), _onehot_embed)
        assert asks.near(index[silent_id]) is None
        assert asks.satisfying(SIMILAR, index[silent_id]) is None
        near = asks.near(index[other_id], count=len(ids))
        assert near is not None and not near[index[silent_id]] and not near[index[other_id]]
        assert near.sum() == len(asks.sounding) - 1


def test_played_marks_mark_the_asked_tracks():
    """Bit ASKED above every track ``asks.asked_tracks`` gives, on a first turn too; nothing without asks."""
    from talkplay_edge.trie import CodeTrie

    class FixedAsks:
        def __init__(self, tracks, genre=None, style=None, era=None):
            self.tracks, self.genre, self.style, self.era = tracks, genre, style, era

        def asked_tracks(self, history):
            return self.tracks

        def genre_tracks(self, history):
            return self.genre

        def style_tracks(self, history):
            return self.style

        def era_tracks(self, history):
            return self.era

    trie = CodeTrie.build([[1, 10, 100], [1, 10, 101], [1, 11, 102], [2, 12, 103]])
    index = {"a": 0, "b": 1, "c": 2, "d": 3}
    leaf = trie.leaf_of_track
    cold = [{"role": "user", "content": "from the 80s"}]
    marks = played_marks(trie, index, cold, asks=FixedAsks(np.array([1, 3])))
    assert [int(marks[leaf[i]]) for i in range(4)] == [0, ASKED, 0, ASKED]
    assert marks[trie.parent[leaf[0]]] == ASKED and marks[trie.parent[leaf[2]]] == 0 and marks[0] == ASKED
    assert played_marks(trie, index, cold) is None
    assert played_marks(trie, index, cold, asks=FixedAsks(None)) is None
    assert played_marks(trie, index, cold, asks=FixedAsks(np.array([], dtype=np.int64))) is None
    marks = played_marks(trie, index, cold, asks=FixedAsks(np.array([1]), genre=np.array([1, 2])))
    assert [int(marks[leaf[i]]) for i in range(4)] == [0, ASKED | GENRE, GENRE, 0]
    assert marks[0] == ASKED | GENRE and marks[trie.parent[leaf[3]]] == 0
    # the style mark: after a played track only (a first turn has no style to keep)
    style = FixedAsks(None, style=np.array([0, 3]))
    assert played_marks(trie, index, cold, asks=style) is None
    after = [*cold, {"role": "assistant", "content": "x", "track_ids": ["a"]}, {"role": "user", "content": "more"}]
    marks = played_marks(trie, index, after, asks=style)  # "a" itself is played: only "d" counts
    assert [int(marks[leaf[i]]) & STYLE for i in range(4)] == [0, 0, 0, STYLE]
    assert marks[leaf[0]] == PLAYED | LAST and marks[trie.parent[leaf[3]]] == STYLE and marks[0] & STYLE
    marks = played_marks(trie, index, after, asks=style, unplayed_only=False)
    assert [int(marks[leaf[i]]) & STYLE for i in range(4)] == [STYLE, 0, 0, STYLE]
    only_played = FixedAsks(np.array([0]), style=np.array([0]))  # marks of played tracks alone: none
    assert played_marks(trie, index, after, asks=only_played)[leaf[0]] == PLAYED | LAST
    # within what the message asks: style ∩ asked ∩ genre; none when they share no track
    marks = played_marks(trie, index, after, asks=FixedAsks(np.array([2, 3]), style=np.array([1, 2, 3]),
                                                             genre=np.array([1, 2])))
    assert [int(marks[leaf[i]]) & STYLE for i in range(4)] == [0, 0, STYLE, 0]
    marks = played_marks(trie, index, after, asks=FixedAsks(np.array([3]), style=np.array([1, 2])))
    assert not (marks & STYLE).any() and marks[leaf[3]] & ASKED
    # the era mark: like the style, after a played track only, unplayed tracks, within what is asked
    era = FixedAsks(None, style=np.array([3]), era=np.array([0, 1, 3]))
    assert played_marks(trie, index, cold, asks=era) is None
    marks = played_marks(trie, index, after, asks=era)
    assert [int(marks[leaf[i]]) & (STYLE | ERA) for i in range(4)] == [0, ERA, 0, STYLE | ERA]
    assert marks[trie.parent[leaf[1]]] & ERA and not marks[trie.parent[leaf[2]]] & ERA
    marks = played_marks(trie, index, after, asks=FixedAsks(np.array([2, 3]), era=np.array([1, 3])))
    assert [int(marks[leaf[i]]) & ERA for i in range(4)] == [0, 0, 0, ERA]


def test_asks_finds_the_genres_and_moods_a_request_names(asks_on_tiny, tiny_catalog, monkeypatch):
    """A genre named: every track with it as genre or subgenre (its own mark); a mood named: the tracks it
    holds for (the asked mark), on a first turn and when no step is asked, with a decade both."""
    asks, index, rows, artists = asks_on_tiny
    import json

    from talkplay_edge.catalog import Catalog
    from talkplay_edge.conversations import MOODS

    with Catalog.open(tiny_catalog) as cat:
        info = {r["id"]: r for r in cat.rows("id, genres, subgenres, energy, year")}
    ids = sorted(index, key=index.get)
    genre_of = {t: set(json.loads(info[t]["genres"] or "[]")) | set(json.loads(info[t]["subgenres"] or "[]")) for t in ids}
    assert set(asks.genres) >= {"rock", "pop", "rap"}
    rock = {index[t] for t in ids if "rock" in genre_of[t]}
    assert rock and set(asks.genre_tracks([{"role": "user", "content": "Play some Rock!"}]).tolist()) == rock
    assert asks.genre_tracks([{"role": "user", "content": "play something"}]) is None
    monkeypatch.setattr(asks, "artists", ArtistIndex([(0, ["Rock Mafia"])]))  # a genre word in a name
    assert asks.genre_tracks([{"role": "user", "content": "more like Rock Mafia"}]) is None
    assert set(asks.genre_tracks([{"role": "user", "content": "rock like rock mafia"}]).tolist()) == rock
    # a genre only denied: the tracks of every genre, subgenre or artist's genre holding its name, for the
    # runtime to leave out of that answer ("rock": hard rock too); an artist's name is no genre
    with Catalog.open(tiny_catalog) as cat:
        every = {r["id"]: {" ".join(g.lower().split()) for c in ("genres", "subgenres", "artist_genres")
                           for g in json.loads(r[c] or "[]")} for r in cat.rows("id, genres, subgenres, artist_genres")}
    rockish = {index[t] for t in ids if any(" rock " in f" {g} " for g in every[t])}
    assert rockish - rock and {g for t in ids for g in every[t] if "rock" in g} - {"rock"}  # else it could not tell
    assert set(asks.denied_genre_tracks("No more rock, some pop please").tolist()) == rockish
    assert asks.denied_genre_tracks("Play some Rock!") is None and asks.denied_genre_tracks("") is None
    assert asks.denied_genre_tracks("no more Rock Mafia") is None
    monkeypatch.undo()
    sub = sorted(g for g in asks.genres if " " in g)[0]  # a two-word subgenre of the fake data
    assert set(asks.genre_tracks(_after(ids[0], f"a {sub.upper()} one?")).tolist()) == {
        index[t] for t in ids if sub in genre_of[t]}
    high = MOODS["energetic"][1]
    energetic = {index[t] for t in ids if info[t]["energy"] is not None and high(info[t]["energy"])}
    assert 0 < len(energetic) < len(ids)
    assert set(asks.asked_tracks([{"role": "user", "content": "something intense"}]).tolist()) == energetic
    assert set(asks.asked_tracks(_after(ids[0], "something intense")).tolist()) == energetic
    assert asks.asked_tracks(_after(ids[0], "too intense")) is None
    decade = (info[ids[0]]["year"] // 10) * 10
    both = {index[t] for t in ids if index[t] in energetic and decade <= info[t]["year"] < decade + 10}
    assert set(asks.asked_tracks([{"role": "user", "content": f"intense {decade}s"}]).tolist()) == both
    # a step read from the message: the step alone, not the mood ("more intense than this" is relative)
    slowest = min(ids, key=lambda t: rows[t]["tempo"] if rows[t]["tempo"] is not None else 1e9)
    faster = set(np.flatnonzero(asks.satisfying("faster", index[slowest])).tolist())
    assert faster - energetic  # else the test could not tell
    monkeypatch.setattr(asks, "kind", lambda message: "faster")
    assert set(asks.asked_tracks(_after(slowest, "faster and more intense")).tolist()) == faster


def test_asks_finds_the_era_of_the_last_track(asks_on_tiny):
    """The tracks released within ERA_YEARS of the last played track; None on a first turn or without a year."""
    from talkplay_edge.asks import ERA_YEARS

    asks, index, rows, _ = asks_on_tiny
    last = next(t for t in sorted(index) if rows[t]["year"] is not None)
    want = {index[t] for t in index if rows[t]["year"] is not None
            and abs(rows[t]["year"] - rows[last]["year"]) <= ERA_YEARS}
    assert index[last] in want and 1 < len(want) < len(index)  # else the test could not tell
    assert set(asks.era_tracks(_after(last, "another one")).tolist()) == want
    assert asks.era_tracks([{"role": "user", "content": "hi"}]) is None
    bare = next((t for t in index if rows[t]["year"] is None), None)
    if bare is not None:
        assert asks.era_tracks(_after(bare, "more")) is None


def test_asks_finds_the_style_of_the_last_track(asks_on_tiny, tiny_catalog):
    """The tracks sharing a style (a subgenre, or an artist genre) with the last played track (its first one,
    of the last turn); None on a first turn, for a track without either or unknown to the index."""
    from talkplay_edge.catalog import Catalog

    asks, index, rows, artists = asks_on_tiny
    with Catalog.open(tiny_catalog) as cat:
        subs = {r["id"]: _styles(r) for r in cat.rows("id, subgenres, artist_genres")}
    ids = sorted(index, key=index.get)
    last = next(t for t in ids if subs[t])
    want = {index[t] for t in ids if subs[t] & subs[last]}
    assert index[last] in want and len(want) < len(ids)  # else the test could not tell
    # an artist's genre counts: a track sharing only that is in the style
    by_artist = next(t for t in ids if any(k == "artist" for k, _ in subs[t]))
    want_a = {index[t] for t in ids if subs[t] & subs[by_artist]}
    same_sub = {index[t] for t in ids if {s for s in subs[t] if s[0] == "sub"} & subs[by_artist]}
    assert want_a - same_sub - {index[by_artist]}  # else the test could not tell
    assert set(asks.style_tracks(_after(by_artist, "more")).tolist()) == want_a
    assert set(asks.style_tracks(_after(last, "another one")).tolist()) == want
    history = [*_after(ids[-1], "x"), {"role": "assistant", "content": "y", "track_ids": [last, ids[-1]]},
               {"role": "user", "content": "more"}]
    assert set(asks.style_tracks(history).tolist()) == want  # the last turn's first track
    assert asks.style_tracks([{"role": "user", "content": "hi"}]) is None
    assert asks.style_tracks(_after("not-a-track", "more")) is None
    bare = next((t for t in ids if not subs[t]), None)
    if bare is not None:
        assert asks.style_tracks(_after(bare, "more")) is None


def test_the_asked_weight_scores_its_mark_and_round_trips():
    cal = SpanCalibration((1.0,), (0.5,), asked=(3.0,))
    assert cal.uses_asks and cal.uses_marks and not cal.uses_artists
    assert SpanCalibration.parse(cal.to_json()) == cal
    logits, marks = np.array([1.0, 2.0, 0.5]), np.array([0, ASKED, ASKED | 1], dtype=np.uint8)
    assert np.allclose(cal.scores(logits, np.zeros(3), 0, normalise=False, marks=marks), 0.5 * logits + [0, 3, 3])
    assert not SpanCalibration((1.0,), (0.5,)).uses_asks
    cal = SpanCalibration((1.0,), (0.5,), genre=(2.0,))
    assert cal.uses_asks and SpanCalibration.parse(cal.to_json()) == cal
    assert np.allclose(cal.scores(logits, np.zeros(3), 0, normalise=False, marks=np.array([GENRE, ASKED, 0], dtype=np.uint8)),
                       0.5 * logits + [2, 0, 0])
    cal = SpanCalibration((1.0,), (0.5,), genre=(2.0,), style=(1.5,))
    assert cal.uses_asks and SpanCalibration.parse(cal.to_json()) == cal
    marks = np.array([GENRE | STYLE, STYLE, ASKED], dtype=np.uint8)
    assert np.allclose(cal.scores(logits, np.zeros(3), 0, normalise=False, marks=marks), 0.5 * logits + [3.5, 1.5, 0])
    assert SpanCalibration((1.0,), (0.5,), style=(1.5,)).uses_asks
    cal = SpanCalibration((1.0,), (0.5,), style=(1.5,), era=(0.75,))
    assert cal.uses_asks and SpanCalibration.parse(cal.to_json()) == cal and SpanCalibration((1.0,), (0.5,), era=(1.0,)).uses_asks
    marks = np.array([ERA | STYLE, ERA, ASKED], dtype=np.uint8)
    assert np.allclose(cal.scores(logits, np.zeros(3), 0, normalise=False, marks=marks), 0.5 * logits + [2.25, 0.75, 0])
    assert SpanCalibration.parse({"alpha": [1.0], "beta": [0.5], "style": [1.5]}).era == ()  # an older file: no era


def test_export_asks_labels_and_fits_a_head():
    from export.asks import INTENT_KIND, fit_head, labelled_messages, score

    conv = {"turns": [{"role": "user", "content": "Too slow."}, {"role": "assistant", "content": "a", "track_ids": ["x"]},
                      {"role": "user", "content": "nah"}, {"role": "assistant", "content": "b", "track_ids": ["y"]},
                      {"role": "user", "content": "jazz"}, {"role": "assistant", "content": "c", "track_ids": ["z"]}],
            "meta": {"intents": ["neg_too_slow", "negative", "genre"]}}
    assert labelled_messages([conv, {"turns": conv["turns"]}]) == [("Too slow.", "faster"), ("nah", OTHER_ARTIST),
                                                                   ("jazz", NONE)]
    assert all(k in KINDS for k in INTENT_KIND.values())
    kinds = [KINDS[i % len(KINDS)] for i in range(60)]
    X = _onehot_embed(kinds) + np.random.default_rng(1).normal(0, 0.05, (60, len(KINDS))).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    head = fit_head(X, kinds, l2=1e-4)
    r = score(head, X, kinds)
    assert r["accuracy"] == 1.0 and r["speaks"] == r["speaks_right"] == sum(k != NONE for k in kinds)
    # the words: messages that embed alike ("older" and "newer" below) are told apart by a word they hold
    kinds = ["older", "newer"] * 20
    messages = [f"{k} one {i}" for i, k in enumerate(kinds)]
    same = np.tile(np.eye(1, len(KINDS), dtype=np.float32), (40, 1))
    assert score(fit_head(same, kinds, l2=1e-4), same, kinds)["accuracy"] == 0.5
    head = fit_head(same, kinds, l2=1e-4, messages=messages, word_weight=1.0)
    assert set(head.words) >= {"older", "newer", "one"} and "0" not in head.words  # words of >= 2 messages
    assert score(head, same, kinds, messages=messages)["accuracy"] == 1.0


def test_cues_carry_a_step_to_words_the_head_never_saw_and_cross_validation_shows_it():
    from export.asks import changed_turns, cross_validate, fit_head, pattern_folds, readings, score

    # every message embeds alike: only its words and cues tell the kinds apart
    phrasings = {"faster": ["quicker one {}", "faster tempo {}"], "slower": ["slower one {}", "slow it down {}"],
                 NONE: ["jazz please {}", "something by band {}"]}
    turns = [(p.format(i), kind, f"{kind}:{j}", 2) for kind, ps in phrasings.items() for j, p in enumerate(ps)
             for i in range(6)]
    same = lambda ms: np.tile(np.eye(1, 8, dtype=np.float32), (len(ms), 1))  # noqa: E731
    ms, ks = [m for m, _, _, _ in turns], [k for _, k, _, _ in turns]
    unseen, truth = ["speedy please", "more leisurely"], ["faster", "slower"]
    plain = fit_head(same(ms), ks, l2=1e-4, messages=ms, word_weight=1.0)
    cued = fit_head(same(ms), ks, l2=1e-4, messages=ms, word_weight=1.0, cue_weight=2.0)
    assert cued.cues == ("cue:fast", "cue:slow") and not plain.cues
    assert score(plain, same(unseen), truth, messages=unseen)["speaks_right"] == 0
    assert score(cued, same(unseen), truth, messages=unseen)["speaks_right"] == 2
    # leave-phrasings-out: each fold holds out one of each kind's two patterns; only the cues carry over
    folds = pattern_folds([p for _, _, p, _ in turns], 2)
    assert sorted(folds.values()).count(0) == sorted(folds.values()).count(1) == 3
    cv_plain = cross_validate(turns, same, 2, l2=1e-4, word_weight=1.0)
    cv_cued = cross_validate(turns, same, 2, l2=1e-4, word_weight=1.0, cue_weight=2.0)
    assert cv_plain["asking_turns"] == cv_cued["asking_turns"] == 24 and cv_plain["right"] < 24
    assert cv_cued["right"] == 24 and cv_cued["precision"] == 1.0
    assert cv_cued["by_kind"]["faster"] == {"turns": 12, "right": 12, "read_wrongly_as": 0, "read_as": {}}
    missed = cv_plain["by_kind"]["faster"]  # what the plain head reads held-out "faster" turns as instead
    assert missed["turns"] == 12 and sum(missed["read_as"].values()) == 12 - missed["right"] > 0
    first_turns = [(m, k, p, 1) for m, k, p, _ in turns]  # a first turn's reading is never used: not scored
    assert cross_validate(first_turns, same, 2, l2=1e-4)["asking_turns"] == 0
    with pytest.raises(ValueError, match="pattern id"):
        cross_validate([(m, k, "", 2) for m, k, _, _ in turns], same, 2)
    # with cue_fallback a head that reads no step takes the one the cues ask for; "too" turns it around
    fallback = fit_head(same(ms), ks, l2=1e-4, messages=ms, word_weight=1.0, cue_fallback=True)
    msgs = ["speedy please", "that is way too quick", "jazz please 1", "quicker, no, slower"]
    assert plain.read(same(msgs), msgs) == [NONE, NONE, NONE, "slower"]
    assert fallback.read(same(msgs), msgs) == ["faster", "slower", NONE, "slower"]
    # the turns a new head reads otherwise than an old one (first turns are never listed)
    conv = {"id": "c1", "turns": [{"role": "user", "content": "speedy please"}, {"role": "assistant", "content": "a"},
                                  {"role": "user", "content": "speedy please"}, {"role": "assistant", "content": "b"},
                                  {"role": "user", "content": "jazz please 1"}, {"role": "assistant", "content": "c"}],
            "meta": {"intents": ["faster", "faster", "genre"]}}
    assert changed_turns(plain, cued, [conv], same) == [{"conversation": "c1", "turn": 2, "intent": "faster",
                                                         "was": NONE, "now": "faster"}]
    assert changed_turns(cued, cued, [conv], same) == []
    # or against the old head's readings (a head of another cue table loads only under its own code)
    old = readings(plain, [conv], same)
    assert old == [{"conversation": "c1", "turn": 2, "intent": "faster", "kind": NONE},
                   {"conversation": "c1", "turn": 3, "intent": "genre", "kind": NONE}]
    assert changed_turns(old, cued, [conv], same) == changed_turns(plain, cued, [conv], same)
    with pytest.raises(ValueError, match="lack 1 turns"):
        changed_turns(old[:1], cued, [conv], same)


def _first_track(gguf, catalog, calibration: dict, message: str, check=lambda tp: None) -> str:
    """The first track the runtime plays for ``message`` with this span calibration (``check(tp)`` first)."""
    from talkplay_edge.runtime import TalkPlay

    tp = TalkPlay.load(gguf, catalog, threads=1, n_ctx=1024, span_calibration=calibration)
    try:
        check(tp)
        return tp.chat(max_new_tokens=4).send(message).tracks[0].id
    finally:
        cat = tp.catalog
        tp.close()
        cat.close()


def test_the_runtime_plays_the_decade_a_request_asks(runtime_gguf, tiny_catalog):
    """With the model and the prior switched off and a large ``asked`` weight, a first request naming a
    decade gets a track from it (a decade the unweighted pick is not from); the packaged head and MiniLM
    are loaded for it."""
    from talkplay_edge.catalog import Catalog

    def pick(asked: float, message: str, retrieval: bool = False) -> str:
        cal = {"alpha": [0], "beta": [0], "asked": [asked]}
        if retrieval:  # the head then reads the dense retriever's (remembered) embedding of the message
            cal["retrieval"] = {"weight": 0.5, "gamma": 1.0, "k0": 10.0, "depth": 20}

        def check(tp):
            assert (tp.asks is not None) == (asked != 0)
            if retrieval:
                assert tp.asks.embed.__self__ is tp.retrieval.hybrid.dense

        return _first_track(runtime_gguf, tiny_catalog, cal, message, check)

    with Catalog.open(tiny_catalog) as cat:
        year = {r["id"]: r["year"] for r in cat.rows("id, year")}
    default = pick(0.0, "Got anything?")
    decades = sorted({(y // 10) * 10 for y in year.values() if y} - {(year[default] // 10) * 10})
    d = decades[0]
    assert (year[pick(0.0, f"Got anything from the {d}s?")] // 10) * 10 != d  # the weight, not the words
    assert (year[pick(20.0, f"Got anything from the {d}s?")] // 10) * 10 == d
    assert (year[pick(20.0, f"Got anything from the {d}s?", retrieval=True)] // 10) * 10 == d


def test_the_runtime_plays_the_genre_a_request_names(runtime_gguf, tiny_catalog):
    """With the model and the prior switched off and a large ``genre`` weight, a first request naming a
    genre gets a track of it (one the unweighted pick does not have)."""
    import json

    from talkplay_edge.catalog import Catalog

    def pick(weight: float, message: str) -> str:
        def check(tp):
            assert (tp.asks is not None) == (weight != 0)

        return _first_track(runtime_gguf, tiny_catalog, {"alpha": [0], "beta": [0], "genre": [weight]}, message, check)

    with Catalog.open(tiny_catalog) as cat:
        genres = {r["id"]: set(json.loads(r["genres"] or "[]")) for r in cat.rows("id, genres")}
    default = pick(0.0, "Got anything?")
    other = sorted({g for gs in genres.values() for g in gs} - genres[default])[0]
    assert other not in genres[pick(0.0, f"Got any {other}?")]  # the weight, not the words
    assert other in genres[pick(20.0, f"Got any {other}?")]


def test_the_runtime_keeps_the_style_of_the_last_track(runtime_gguf, tiny_catalog):
    """With the model and the prior switched off and a large ``style`` weight, a follow-up gets a track that
    shares a style (a subgenre or an artist genre) with the one just played (the unweighted follow-up does
    not)."""
    import json

    from talkplay_edge.catalog import Catalog
    from talkplay_edge.runtime import TalkPlay

    with Catalog.open(tiny_catalog) as cat:
        rows = list(cat.rows("id, genres, subgenres, artist_genres"))
    subs = {r["id"]: _styles(r) for r in rows}
    genre = sorted(g for r in rows if subs[r["id"]] for g in json.loads(r["genres"] or "[]"))[0]

    def picks(weight: float, then: str = "Another one.") -> list[str]:  # a track of a genre, then a follow-up
        tp = TalkPlay.load(runtime_gguf, tiny_catalog, threads=1, n_ctx=1024,
                           span_calibration={"alpha": [0], "beta": [0], "genre": [10.0], "style": [weight]})
        try:
            chat = tp.chat(max_new_tokens=4)
            return [chat.send(m).tracks[0].id for m in (f"Play some {genre}.", then)]
        finally:
            cat = tp.catalog
            tp.close()
            cat.close()

    first, second = picks(0.0)
    assert subs[first] and not subs[first] & subs[second]  # the weight, not the trie's order
    first_w, second_w = picks(20.0)
    assert first_w == first and subs[first] & subs[second_w]
    # a genre the follow-up names wins over the style, though the style weighs more: the style marks only
    # the tracks that also have that genre (here none)
    genres = {r["id"]: set(json.loads(r["genres"] or "[]")) for r in rows}
    other = sorted({g for gs in genres.values() for g in gs} - genres[first])[0]
    _, switched = picks(20.0, f"Switch to {other}.")
    assert other in genres[switched] and not subs[first] & subs[switched]


def test_a_genre_the_request_denies_is_left_out_of_that_answer(runtime_gguf, tiny_catalog):
    """"No more rock": no rock track in that answer (the recommender's ranking, a chat turn), unless rock is
    all that is left; this needs a calibration that reads asks (the shipped one does)."""
    import json

    from talkplay_edge.catalog import Catalog
    from talkplay_edge.runtime import ModelRecommender, TalkPlay

    with Catalog.open(tiny_catalog) as cat:
        rock = {r["id"] for r in cat.rows("id, genres, subgenres, artist_genres")
                if any(" rock " in f" {g.lower()} " for c in ("genres", "subgenres", "artist_genres")
                       for g in json.loads(r[c] or "[]"))}
    message = "No more rock, some pop please"
    tp = TalkPlay.load(runtime_gguf, tiny_catalog, threads=1, n_ctx=1024,
                       span_calibration={"alpha": [0], "beta": [1], "genre": [1.0]})
    try:
        assert 0 < len(rock) < len(tp.track_ids)  # else the test could not tell
        ranked = ModelRecommender(tp=tp).recommend([{"role": "user", "content": message}], set(), n=len(tp.track_ids))
        assert len(ranked) == len(tp.track_ids) - len(rock) and not set(ranked) & rock
        other = next(t for t in tp.track_ids if t not in rock)
        chat = tp.chat(only=rock | {other}, max_new_tokens=4)
        assert chat.send(message).tracks[0].id == other
        assert chat.send(message).tracks[0].id in rock  # only rock is left: the denial gives way
    finally:
        cat = tp.catalog
        tp.close()
        cat.close()
    tp = TalkPlay.load(runtime_gguf, tiny_catalog, threads=1, n_ctx=1024, span_calibration="off")
    try:  # no asks read: the words leave nothing out
        assert tp.asks is None
        assert len(ModelRecommender(tp=tp).recommend([{"role": "user", "content": message}], set(), n=len(tp.track_ids))) == len(tp.track_ids)
    finally:
        cat = tp.catalog
        tp.close()
        cat.close()
