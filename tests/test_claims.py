"""What a reply says of its track (``claims.ClaimReader``), and the runtime's reply guard that takes false
claims back as they are written."""

from __future__ import annotations

from talkplay_edge.catalog import Track
from talkplay_edge.claims import Claim, ClaimReader, article

READER = ClaimReader(["rock", "album rock", "hip hop", "hip pop", "permanent wave", "edm", "big room"],
                     ["contemporary country", "country", "dance pop", "world", "deep house", "focus"])
PAISLEY = Track("t1", "Online", "Brad Paisley", year=2010, artist_genres=("contemporary country", "country road"),
                features={"energy": 0.9, "valence": 0.8, "danceability": 0.5, "acousticness": 0.1, "tempo": 134.2})
ROCK = Track("t2", "Rock Your Body", "Justin Timberlake", year=2002, genres=("pop",), subgenres=("dance pop",),
             features={"energy": 0.3, "valence": 0.2, "tempo": 101.0})
EDM = Track("t3", "Animals", "Martin Garrix", year=2013, genres=("edm",), subgenres=("big room",),
            features={"energy": 0.95, "valence": 0.1})


def _said(reply, track, previous=None, kinds=("genre", "sound", "year", "bpm", "relation")):
    return [(c.kind, c.phrase, c.holds) for c in READER.claims(reply, track, previous) if c.kind in kinds]


def test_genre_claims_hold_as_whole_words_of_the_tracks_genres():
    assert _said("Here's “Online” by Brad Paisley (2010) — a high-energy upbeat country track.", PAISLEY) == [
        ("year", "2010", True), ("sound", "high-energy", True), ("sound", "upbeat", True), ("genre", "country", True)]
    assert _said("a permanent wave track", PAISLEY) == [("genre", "permanent wave", False)]
    assert _said("a contemporary country track, not quite country road", PAISLEY)[0] == ("genre", "contemporary country", True)
    assert _said("some hip pop", EDM) == [("genre", "hip pop", False)]  # the longer phrase, not "pop"
    assert _said("an electronic banger, big room at its best", EDM) == [("genre", "electronic", True),
                                                                     ("genre", "big room", True)]
    assert _said("It's electronic.", PAISLEY) == [("genre", "electronic", False)]
    # ordinary words are no claim: artists' genres without a genre word ("world", "focus")
    assert _said("the best in the world, stay focus", PAISLEY) == []


def test_the_tracks_own_title_and_artist_are_no_claim():
    assert _said("Try “Rock Your Body” by Justin Timberlake (2002) — a mellow moody dance pop track.", ROCK) == [
        ("year", "2002", True), ("sound", "mellow", True), ("sound", "moody", True), ("genre", "dance pop", True)]
    assert _said("a rock track", PAISLEY) == [("genre", "rock", False)]
    assert _said("danceable, acoustic", ROCK) == [("sound", "danceable", False), ("sound", "acoustic", False)]


def test_years_and_bpm_are_checked_against_this_track_and_the_last():
    said = _said("A slower one (101 BPM, down from 134): “Rock Your Body” (2001).", ROCK, PAISLEY, ("bpm", "year"))
    assert said == [("bpm", "101 BPM", True), ("bpm", "down from 134", True), ("year", "2001", False)]
    said = _said("Picking up the pace (140 BPM, up from 101):", PAISLEY, ROCK, ("bpm",))
    assert said == [("bpm", "140 BPM", False), ("bpm", "up from 101", True)]
    claims = READER.claims("A quicker one at 120 BPM, from 2012", PAISLEY)
    assert [(c.kind, c.value, c.instead) for c in claims] == [("relation", None, "At 134 BPM:"), ("bpm", 134, "134"),
                                                               ("year", 2010, "2010")]
    assert READER.claims("(1999)", Track("t4", "x", "y"))[0].value is None  # no year known: none to write
    assert _said("A 2010 release, not 2011.5 nor v2.2010, from 2011.", PAISLEY) == [("year", "2010", True),
                                                                                   ("year", "2011", False)]
    assert _said("Slower: 90 BPM, down from 134.", ROCK, PAISLEY, ("bpm",)) == [("bpm", "90 BPM", False),
                                                                     ("bpm", "down from 134", True)]


def test_relations_to_the_last_track_are_checked_and_a_false_lead_is_written_again():
    # Rock Your Body (2002, 101 BPM) after Online (2010, 134 BPM): older and slower
    assert _said("A slower one (101 BPM, down from 134):", ROCK, PAISLEY) == [
        ("relation", "slower", True), ("bpm", "101 BPM", True), ("relation", "down", True),
        ("bpm", "down from 134", True)]
    claims = READER.claims("Picking up the pace (101 BPM, up from 134): Try “Rock Your Body”", ROCK, PAISLEY)
    assert [(c.kind, c.phrase, c.holds, c.instead, c.instead_at) for c in claims if c.kind == "relation"] == [
        ("relation", "Picking up the pace", False, "At 101 BPM:", 0), ("relation", "up", False, "down", None)]
    ups = [c for c in READER.claims("Try it: 101 BPM, Up from 134", ROCK, PAISLEY) if c.kind == "relation"]
    assert [(c.phrase, c.holds, c.instead) for c in ups] == [("Up", False, "Down")]  # written as it was
    claims = READER.claims("  A newer one, from 2002: Try “Rock Your Body”", ROCK, PAISLEY)
    assert (claims[0].phrase, claims[0].holds, claims[0].instead, claims[0].instead_at) == ("newer", False,
                                                                                            "From 2002:", 2)
    assert _said("Going back to 2002:", ROCK, PAISLEY)[0] == ("relation", "Going back", True)
    assert _said("Fast-forward to 2010: Try", PAISLEY, ROCK)[0] == ("relation", "Fast-forward", True)
    # past the lead, nothing is known to write instead: the guard bans it
    claims = READER.claims("Try “Rock Your Body” — a quicker one", ROCK, PAISLEY)
    assert (claims[0].phrase, claims[0].holds, claims[0].instead) == ("quicker", False, None)
    # no last track, or no tempo known: no relation holds
    assert _said("Something more recent, from 2010:", PAISLEY) == [("relation", "more recent", False),
                                                                    ("year", "2010", True)]
    assert not READER.claims("A quicker one", EDM, ROCK)[0].holds  # EDM has no tempo
    assert not READER.claims("A newer one", EDM, Track("t6", "x", "y", year=2013))[0].holds  # the same year
    assert READER.claims("A newer one", EDM, Track("t7", "x", "y", year=2020))[0].instead == "From 2013:"
    assert READER.claims("A slower one", EDM, PAISLEY)[0].instead is None  # no tempo to say
    assert READER.holding("relation", ROCK, PAISLEY)[("older",)] and not READER.holding("relation", ROCK)[("older",)]


def test_lyrics_themes_hold_only_as_the_catalog_has_them():
    from dataclasses import replace

    night = replace(ROCK, lyrics_theme="the night")

    def lyrics(reply, track):
        return [(c.phrase, c.holds, c.instead, None if c.instead is None else reply[:c.instead_at] + c.instead, c.ends)
                for c in READER.claims(reply, track) if c.kind == "lyrics"]

    reply = "Here's “Rock Your Body” by Justin Timberlake (2002) — an upbeat track, with lyrics about love."
    # no theme in the catalog: the reply ends before it; with another theme, that theme is written
    assert lyrics(reply, ROCK) == [("with lyrics about love", False, ".", reply.split(",")[0] + ".", True)]
    assert lyrics(reply, night)[0][2:4] == ("with lyrics about the night", reply.replace("love", "the night")[:-1])
    assert lyrics("Try it (2002) — a moody track about night.", night) == [("about night", True, None, None, False)]
    reply = "Check out “Rock Your Body” (2002). Its lyrics keep coming back to the road."
    assert lyrics(reply, ROCK)[0][3:] == ("Check out “Rock Your Body” (2002).", True)
    # in a lead, it goes (the guard bans what began it)
    reply = "For lyrics about money: check out “Rock Your Body” (2002)."
    assert lyrics(reply, ROCK) == [("lyrics about money", False, "", "", False)]
    assert lyrics("Try “Song About Love” (2002).", replace(ROCK, title="Song About Love")) == []  # its title
    # the stream holds a clause that may be a lyrics claim, comma and all
    text = "Try “Rock Your Body” (2002) — an upbeat track, with lyrics ab"
    assert READER.settled(text) == text.index(", with")
    assert READER.settled(text[:-len("lyrics ab")] + "a smile") == len(text[:-len("lyrics ab")] + "a smile")


def test_a_reply_being_written_is_read_once_its_words_are():
    text = "Try “Online” by Brad Paisley (2010) — a high-energy permanent wave track."
    cut, dash = text.index("permanent"), text.index(" —")
    # "perm" may still become "permanent wave": the stream waits before the description it is part of,
    # dash and all (the guard may end the reply there)
    assert READER.settled(text[:cut + 4]) == dash
    assert READER.settled(text[:cut + len("permanent wave")]) == dash  # not ended yet: may go on
    assert READER.settled(text[:cut + len("permanent wave track")]) == len(text) - 1  # the description ended
    assert READER.first_false(text[:cut + len("permanent")], PAISLEY) is None
    assert READER.first_false(text[:cut + len("permanent wave")], PAISLEY) is None  # may go on
    assert READER.first_false(text[:cut + len("permanent wave ")], PAISLEY).phrase == "permanent wave"
    assert READER.settled("Try it. It's a dance") == len("Try it.")  # may become "dance pop"
    assert READER.settled("Try it: it, a dance") == len("Try it: it")  # no dash nor "It's" leads it
    lead = "A slower one: "
    assert READER.settled(lead + "try it (10") == len(lead + "try it (")  # a number waits for "BPM"
    assert READER.settled(lead + "try it (101 B") == len(lead + "try it (")
    assert READER.settled(lead + "try it (101 BPM, down") == len(lead + "try it (101 BPM, down")
    assert READER.settled(lead + "try it ") == len(lead + "try it")  # the space may end it yet
    assert READER.settled(lead + "try it, ") == len(lead + "try it")
    assert READER.settled(lead + "try the") == len(lead + "try the")  # no phrase begins "the"
    # a lead is held whole till it ends: the guard may write it again ("From 2005:")
    assert READER.settled("A slower one (101 BPM, down") == 0
    assert READER.settled("Try it ") == 0
    assert READER.settled("Try “") == len("Try “")
    assert READER.settled("A newer one, from 2005:") == len("A newer one, from")  # the year may go on
    assert READER.settled("This is a long way round to say it, with no quote nor colon in it ") > 0


def test_the_description_to_write_instead():
    assert READER.describe(PAISLEY) == "high-energy upbeat contemporary country track"
    assert READER.describe(ROCK) == "mellow moody dance pop track"  # its subgenre before its genre
    assert READER.describe(Track("t5", "x", "y", features={"energy": 0.6})) == ""
    mellow = Track("t8", "x", "y", artist_genres=("neo mellow",), features=ROCK.features)
    assert READER.describe(mellow) == "moody neo mellow track"  # not "mellow moody neo mellow"
    assert READER.describe(Track("t5", "x", "y", features={"energy": 0.6, "tempo": 80.4}), tempo=True) == "80 BPM track"
    assert [article(p) for p in ("upbeat track", "80 BPM track", "115 BPM track", "18 BPM", "mellow track")] == [
        "an", "an", "a", "an", "a"]
    text = "Here's “Online” by Brad Paisley (2010) — a high-energy moody permanent wave track."
    claim = READER.false_claims(text, PAISLEY)[0]
    assert claim.phrase == "moody" and text[READER.description_start(text, claim):].startswith("a high-energy moody")
    assert READER.description_cut(text, READER.description_start(text, claim)) == (text.index(" —"), ".")
    text = "Check out “Online” by Brad Paisley (2010). It's a moody track."
    start = READER.description_start(text, READER.false_claims(text, PAISLEY)[0])
    assert READER.description_cut(text, start) == (text.index(" It's"), "")
    text = "Check out “Online”, moody as it is"
    assert READER.description_start(text, READER.false_claims(text, PAISLEY)[0]) is None


def test_holding_lists_every_phrase_of_a_kind():
    genres = READER.holding("genre", PAISLEY)
    assert genres[("country",)] and genres[("contemporary", "country")] and not genres[("rock",)]
    assert READER.holding("sound", ROCK) == {("high", "energy"): False, ("mellow",): True, ("danceable",): False,
                                             ("acoustic",): False, ("upbeat",): False, ("moody",): True}


def test_the_reader_from_the_catalog(tiny_catalog):
    from talkplay_edge.catalog import Catalog

    with Catalog.open(tiny_catalog) as cat:
        reader = ClaimReader.from_catalog(cat)
        names = {n for t in cat.tracks() for n in (*t.genres, *t.subgenres)}
    assert names and all(tuple(n.replace("-", " ").split()) in reader.phrases for n in names)


def test_the_guard_takes_a_false_claim_back_as_the_tiny_model_writes_it(talkplay):
    """The tiny model writes noise; a word of it is made a genre its track lacks, and the guard must keep that
    word out of the reply (streamed text and all), where the unguarded reply has it."""
    import re

    tp = talkplay
    message = "something for a rainy drive"
    plain = tp.chat(guard=False, max_new_tokens=40).send(message)
    track = plain.tracks[0]
    own = set(re.findall(r"\w+", f"{track.title} {track.artist} {track.album or ''}".lower()))
    words = [w for w in re.findall(r"(?<![\w'-])[a-z]{3,}(?![\w'-])", plain.text.lower()) if w not in own]
    assert words, f"no word to claim in {plain.text!r}"
    word = words[0]
    saved = tp.claim_reader
    try:
        tp.claim_reader = ClaimReader([word, "zzyzx"])
        assert tp.claim_reader.false_claims(plain.text, track)  # the word is a false claim of that reply
        streamed = []
        guarded = tp.chat(max_new_tokens=40).send(message, on_text=streamed.append)
    finally:
        tp.claim_reader = saved
    assert guarded.tracks[0].id == track.id
    assert guarded.timings["backoffs"] >= 1
    assert "".join(streamed).strip() == guarded.text
    assert not re.search(rf"(?<![\w'-]){word}(?![\w'-])", guarded.text.lower())
    assert guarded.text.lower().startswith(plain.text.lower().split(word)[0].strip())  # the same up to the claim


def test_the_guard_reads_a_reply_cut_short_by_its_token_budget(talkplay):
    """A reply that runs out of tokens inside a claim ends with a word nothing ended yet: the guard reads the
    reply whole at the end and still takes the claim back."""
    import re

    tp = talkplay
    message = "something for a rainy drive"
    for budget in range(2, 41):
        plain = tp.chat(guard=False, max_new_tokens=budget).send(message)
        track = plain.tracks[0]
        own = set(re.findall(r"\w+", f"{track.title} {track.artist} {track.album or ''}".lower()))
        last = re.search(r"(?<![\w'-])([a-z]{3,})$", plain.text.lower())
        if last and last.group(1) not in own:
            break
    else:
        raise AssertionError("no reply of the tiny model ends with a word")
    word = last.group(1)
    saved = tp.claim_reader
    try:
        tp.claim_reader = ClaimReader([word, "zzyzx"])
        streamed = []
        guarded = tp.chat(max_new_tokens=budget).send(message, on_text=streamed.append)
        assert not tp.claim_reader.false_claims(guarded.text, track)
    finally:
        tp.claim_reader = saved
    assert guarded.timings["backoffs"] >= 1 and "".join(streamed).strip() == guarded.text


class _WordAsLyrics(ClaimReader):
    """Reads one word of a reply as a lyrics theme the catalog does not hold for its track: the reply ends
    before it, or, as the reply's first word, it goes with nothing written instead."""

    def __init__(self, word):
        super().__init__(["zzyzx"])
        self.word = word

    def claims(self, reply, track, previous=None, complete=True):
        import re

        if not complete:
            reply = reply[:self.settled(reply)]
        out = super().claims(reply, track, previous)
        m = re.search(rf"(?<![\w'-]){re.escape(self.word)}(?=[^\w'-])", reply.lower())
        if m:
            before = reply[:m.start()].rstrip(" ,—–-\n")
            if before:
                out.append(Claim("lyrics", reply[m.start():m.end()], m.start(), m.end(), False, None,
                                 "" if before.endswith((".", "!", "?")) else ".", len(before), True))
            else:
                out.append(Claim("lyrics", reply[m.start():m.end()], m.start(), m.end(), False, None, "", 0))
        return sorted(out, key=lambda c: c.start)

    def settled(self, reply):
        import re

        n = super().settled(reply)
        tail = re.search(r"[\w'-]+$", reply)
        if tail and self.word.startswith(tail.group(0).lower()):  # may be the word: hold it, and what ends before it
            n = min(n, len(reply[:tail.start()].rstrip(" ,—–-\n")))
        return n


def test_the_guard_ends_a_reply_before_a_false_lyrics_theme_and_drops_one_that_leads_it(talkplay):
    """On the tiny model: a word of its unguarded reply read as a false lyrics theme. Mid-reply, the guarded
    reply is the unguarded one up to that word, ended there; as the first word, it is not written at all."""
    import re

    tp = talkplay
    message = "something for a rainy drive"
    plain = tp.chat(guard=False, max_new_tokens=40).send(message)
    words = [m for m in re.finditer(r"(?<![\w'-])[a-z]{3,}(?=[^\w'-])", plain.text.lower())]
    assert len(words) >= 2, f"too few words in {plain.text!r}"
    first = re.match(r"[\w'-]+", plain.text.lower())
    middle = next(m for m in words if m.start() > 0 and m.group(0) != (first and first.group(0)))
    saved = tp.claim_reader
    try:
        tp.claim_reader = _WordAsLyrics(middle.group(0))
        streamed = []
        guarded = tp.chat(max_new_tokens=40).send(message, on_text=streamed.append)
        if first:
            tp.claim_reader = _WordAsLyrics(first.group(0))
            led = tp.chat(max_new_tokens=40).send(message)
    finally:
        tp.claim_reader = saved
    before = plain.text[:middle.start()].rstrip(" ,—–-\n")
    assert guarded.text == before + ("" if before.endswith((".", "!", "?")) else ".")
    assert guarded.timings["backoffs"] == 1 and "".join(streamed).strip() == guarded.text
    if first:
        assert led.timings["backoffs"] >= 1 and not led.text.lower().startswith(first.group(0))
