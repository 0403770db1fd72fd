"""Synthetic multi-turn music conversations from the catalog's real playlists (training and test data).

Each conversation follows one playlist: 2–8 exchanges, every assistant turn recommends one track of that
playlist. User turns carry an *intent* (playlist theme, genre, artist, era, audio mood, lyrics theme, or a
follow-up relative to the previous track: faster, older, other artist, more like this, negative feedback…)
and the target track is chosen so that the intent is TRUE of it (``faster`` → higher tempo than the
previous track, ``older`` → earlier year, …). Assistant replies state only attributes the catalog holds.

Utterances come from template banks (``PATTERNS``: intent → templates). The templates are split
deterministically into train patterns and held-out patterns (``pattern_split()``); train/valid/test use
train patterns only, ``test_unseen`` (over test playlists) uses held-out patterns only.

JSONL format (one conversation per line; see docs/conversations.md)::

    {"id": str, "turns": [{"role": "user", "content": str},
                          {"role": "assistant", "content": str, "track_ids": [str, ...]}, ...],
     "meta": {...}}   # optional, ignored by readers: playlist, split, per-turn intents and pattern ids

``read_conversations(path)`` validates a file and names the line of a malformed conversation.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import time
import unicodedata
from dataclasses import dataclass, replace
from pathlib import Path

from .progress import progress

SPLITS_OUT = ("train", "valid", "test", "test_unseen")
HELDOUT_FRACTION = 0.2


class ConversationFormatError(ValueError):
    """A conversations file is malformed; the message starts with ``file:line:``."""


# ---------------------------------------------------------------------------------------------------------
# reading and validating
# ---------------------------------------------------------------------------------------------------------

def validate_conversation(conv) -> None:
    """Raise ValueError (without location) when ``conv`` is not a valid conversation dict."""
    if not isinstance(conv, dict):
        raise ValueError("a conversation must be a JSON object")
    if not isinstance(conv.get("id"), str) or not conv["id"]:
        raise ValueError('missing or non-string "id"')
    turns = conv.get("turns")
    if not isinstance(turns, list) or not turns:
        raise ValueError('"turns" must be a non-empty list')
    for i, t in enumerate(turns):
        where = f"turn {i + 1}"
        if not isinstance(t, dict):
            raise ValueError(f"{where}: must be an object")
        role = t.get("role")
        if role not in ("user", "assistant"):
            raise ValueError(f'{where}: "role" must be "user" or "assistant", got {role!r}')
        if not isinstance(t.get("content"), str):
            raise ValueError(f'{where}: "content" must be a string')
        if role == "assistant":
            ids = t.get("track_ids")
            if not isinstance(ids, list) or not ids or not all(isinstance(x, str) and x for x in ids):
                raise ValueError(f'{where}: assistant turn needs "track_ids", a non-empty list of strings')
        elif "track_ids" in t:
            raise ValueError(f'{where}: user turns carry no "track_ids"')
    if "meta" in conv and not isinstance(conv["meta"], dict):
        raise ValueError('"meta" must be an object')


def iter_conversations(path: str | Path):
    """Yield validated conversations of a JSONL file; blank lines are skipped.

    Raises ConversationFormatError("path:LINE: why") on the first malformed line, FileNotFoundError
    if the file is missing."""
    path = Path(path)
    if not path.is_file():
        raise ConversationFormatError(f"{path}: file not found")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                conv = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConversationFormatError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            try:
                validate_conversation(conv)
            except ValueError as e:
                raise ConversationFormatError(f"{path}:{n}: {e}") from None
            yield conv


def read_conversations(path: str | Path, limit: int | None = None) -> list[dict]:
    """All (or the first ``limit``) conversations of a JSONL file, validated (see ``iter_conversations``)."""
    out: list[dict] = []
    if limit is not None and limit <= 0:
        return out
    for conv in iter_conversations(path):
        out.append(conv)
        if limit is not None and len(out) >= limit:
            break
    return out


def write_conversations(path: str | Path, conversations) -> int:
    path = Path(path)
    n = 0
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for c in conversations:
            f.write(json.dumps(c, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(path)
    return n


# ---------------------------------------------------------------------------------------------------------
# vocabularies: display names and paraphrase banks
# ---------------------------------------------------------------------------------------------------------

GENRE_DISPLAY = {"r&b": "R&B", "edm": "EDM", "latin": "Latin", "latin pop": "Latin pop",
                 "latin hip hop": "Latin hip hop", "pop edm": "pop EDM"}

DECADE_WORDS = {1950: ["50s", "1950s", "fifties"], 1960: ["60s", "1960s", "sixties"], 1970: ["70s", "1970s", "seventies"],
                1980: ["80s", "1980s", "eighties"], 1990: ["90s", "1990s", "nineties"], 2000: ["2000s", "noughties"],
                2010: ["2010s"], 2020: ["2020s"]}

# audio descriptors: name -> (feature, predicate, paraphrases); thresholds on Spotify's audio features
MOODS = {
    "energetic": ("energy", lambda v: v >= 0.8, ["high-energy", "energetic", "intense", "pumped-up", "hype"]),
    "mellow": ("energy", lambda v: v <= 0.45, ["mellow", "chill", "laid-back", "calm", "low-key"]),
    "danceable": ("danceability", lambda v: v >= 0.75, ["danceable", "groovy", "dancey"]),
    "acoustic": ("acousticness", lambda v: v >= 0.5, ["acoustic", "mostly acoustic", "unplugged-sounding"]),
    "happy": ("valence", lambda v: v >= 0.7, ["upbeat", "happy", "feel-good", "cheerful", "sunny"]),
    "sad": ("valence", lambda v: v <= 0.3, ["sad", "melancholic", "moody", "gloomy"]),
    "fast": ("tempo", lambda v: v >= 130, ["fast", "uptempo", "quick"]),
    "slow": ("tempo", lambda v: v <= 95, ["slow", "slow-tempo", "downtempo"]),
}

# lyrics themes: theme phrase -> words counted in the lyrics (a theme holds with >= 3 occurrences)
LYRIC_THEMES = {
    "love": {"love", "lover", "loving", "baby", "heart", "kiss"},
    "heartbreak": {"cry", "crying", "tears", "goodbye", "broken", "lonely"},
    "partying": {"party", "club", "drink", "drunk", "tonight", "dance"},
    "money": {"money", "cash", "rich", "dollar", "dollars", "paid"},
    "the night": {"night", "midnight", "moon", "dark", "stars"},
    "summer": {"summer", "sun", "beach", "sunshine"},
    "faith": {"god", "pray", "heaven", "lord", "jesus", "angel"},
    "dreams": {"dream", "dreams", "dreaming"},
    "the road": {"road", "highway", "drive", "ride", "miles"},
    "rain": {"rain", "raining", "storm", "thunder"},
    "fire": {"fire", "burn", "burning", "flames"},
    "the city": {"city", "streets", "town"},
}


def lyrics_theme(text: str, min_count: int = 3) -> str | None:
    """The lyrics theme whose words occur most often in ``text`` (at least ``min_count`` times), or None."""
    words = re.findall(r"[a-z']+", text.casefold())
    best, best_n = None, 0
    for theme, vocab in LYRIC_THEMES.items():
        n = sum(w in vocab for w in words)
        if n > best_n:
            best, best_n = theme, n
    return best if best_n >= min_count else None


def clean_name(name: str) -> str:
    """A playlist name fit for an utterance: no emoji/format characters, single spaces."""
    s = "".join(c for c in unicodedata.normalize("NFC", name or "") if unicodedata.category(c) not in ("So", "Cf", "Cc", "Sk"))
    return re.sub(r"\s+", " ", s).strip(" -|")


def genre_display(g: str) -> str:
    return GENRE_DISPLAY.get(g, g)


# ---------------------------------------------------------------------------------------------------------
# user-utterance patterns (templates) per intent
# ---------------------------------------------------------------------------------------------------------

def _bank(text: str) -> list[str]:
    return [ln.strip() for ln in text.strip().splitlines() if ln.strip()]


PATTERNS: dict[str, list[str]] = {
    # --- openings (first turn) ---
    "playlist": _bank("""
        I'm making a playlist called "{playlist}". What should go on it?
        Play something for my "{playlist}" playlist.
        Give me a track that fits "{playlist}".
        I need songs for "{playlist}".
        What's a good song for a playlist named "{playlist}"?
        Start me off with something that belongs on "{playlist}".
        Recommend a song that would fit "{playlist}".
        Help me fill my "{playlist}" playlist.
        Got anything that fits the vibe of "{playlist}"?
        I'm in a "{playlist}" kind of mood.
        Put on something "{playlist}"-ish.
        Building a "{playlist}" mix, any ideas?
        Could you suggest a first track for "{playlist}"?
        Songs for "{playlist}", please.
        my playlist is called {playlist}, what fits?
        Think "{playlist}". What would you play?
        Let's start a "{playlist}" session.
        I want something that sounds like "{playlist}".
        Pick a song for "{playlist}".
        Any suggestions for a "{playlist}" set?
        queue up something for {playlist}
        What would you put on a playlist titled "{playlist}"?
    """),
    "genre": _bank("""
        Play some {genre}.
        I'm in the mood for {genre}.
        Give me a {genre} track.
        Can you recommend some {genre}?
        What's a good {genre} song?
        I want to hear {genre}.
        Put on some {genre} for me.
        Any {genre} recommendations?
        I've been really into {genre} lately.
        Let's hear some {genre}, please.
        Start with a {genre} song.
        Recommend me a {genre} tune.
        I feel like listening to {genre}.
        something {genre} please
        Hit me with some {genre}.
        Looking for {genre} music.
        {genre}, please. Surprise me.
        Could you play a {genre} track?
        I'd love some {genre} right now.
        Find me a {genre} song.
    """),
    "artist": _bank("""
        Play something by {artist}.
        I want to hear {artist}.
        Put on a song by {artist}.
        Got any {artist}?
        I'm a big {artist} fan, play one of theirs.
        Can you play some {artist}?
        Give me a track from {artist}.
        I've had {artist} on repeat, play me one of their songs.
        Any {artist} songs?
        let's hear {artist}
        Start with {artist}, please.
        Recommend a song by {artist}.
        Play me one from {artist}.
        I'm in an {artist} mood.
        Something from {artist}, please.
    """),
    "like_artist": _bank("""
        Play something like {artist}.
        I like {artist}. What else would I enjoy?
        Songs similar to {artist}?
        Give me something in the style of {artist}.
        Who sounds like {artist}? Play me a track.
        I'm into {artist}, recommend something similar.
        More stuff like {artist}, please.
        If I love {artist}, what should I listen to?
        Find me a song for fans of {artist}.
        Something with a {artist} kind of vibe.
        Recommend a track that {artist} fans would like.
        I've worn out my {artist} records, what's similar?
        anything that sounds like {artist}?
        Play me something close to {artist}.
        A song in the vein of {artist}, please.
    """),
    "era": _bank("""
        Play something from the {decade}.
        I want {decade} music.
        Give me a song from the {decade}.
        Take me back to the {decade}.
        What's a good track from the {decade}?
        Any {decade} recommendations?
        I'm feeling nostalgic for the {decade}.
        Put on something released in the {decade}.
        Let's go {decade}.
        A {decade} song, please.
        Recommend a tune from the {decade}.
        Something from back in the {decade}?
        play me a {decade} track
        I'm in a {decade} mood.
        Give me a hit from the {decade}.
    """),
    "genre_era": _bank("""
        Play some {genre} from the {decade}.
        I want {decade} {genre}.
        Give me a {genre} track from the {decade}.
        Any {genre} from the {decade}?
        Take me back to {decade} {genre}.
        What's a good {decade} {genre} song?
        I'm craving {genre}, preferably from the {decade}.
        {decade} {genre}, please.
        Recommend some {genre} released in the {decade}.
        something {genre} from the {decade}
        Put on a {decade} {genre} tune.
        Find me {genre} from the {decade}.
    """),
    "mood": _bank("""
        Play something {mood}.
        I want something {mood}.
        Give me a {mood} song.
        I'm in the mood for something {mood}.
        Recommend a {mood} track.
        Put on something {mood} for me.
        Can you find me something {mood}?
        I need a {mood} tune right now.
        What's a good {mood} song?
        something {mood} please
        Let's start with something {mood}.
        Any {mood} recommendations?
        I'm looking for {mood} music.
        Hit me with something {mood}.
        Play me a {mood} track.
        Surprise me with something {mood}.
        Something {mood} to start, please.
        I feel like hearing something {mood}.
        Queue up a {mood} one.
        Could you play something {mood}?
    """),
    "genre_mood": _bank("""
        Play some {mood} {genre}.
        I want {mood} {genre}.
        Give me a {mood} {genre} track.
        Any {mood} {genre} songs?
        Something {genre}, but {mood}.
        I'm looking for {genre} that's {mood}.
        Recommend a {mood} {genre} tune.
        {genre}, and make it {mood}.
        Put on something {mood} from the {genre} world.
        Find me some {mood} {genre}.
        I need {mood} {genre} right now.
        Play a {genre} song that feels {mood}.
    """),
    "lyrics": _bank("""
        Play a song about {theme}.
        I want a song whose lyrics are about {theme}.
        Give me something with lyrics about {theme}.
        Any songs about {theme}?
        Recommend a track that sings about {theme}.
        I'm in the mood for songs about {theme}.
        Find me a song about {theme}.
        Something with lyrics around {theme}, please.
        What's a good song about {theme}?
        Play me something where the lyrics talk about {theme}.
        a song about {theme} please
        I need lyrics about {theme} right now.
        Put on a track about {theme}.
        Got a song that's all about {theme}?
        Something lyrically about {theme}.
    """),
    "playlist_mood": _bank("""
        Something for "{playlist}", but {mood}.
        "{playlist}" vibes, and make it {mood}.
        I need a {mood} track for my "{playlist}" playlist.
        Give me something {mood} that fits "{playlist}".
        A {mood} song for "{playlist}", please.
        For my "{playlist}" playlist I want something {mood}.
        Start "{playlist}" with something {mood}.
        Find a {mood} one for "{playlist}".
        Recommend something {mood} for a "{playlist}" mix.
        "{playlist}", but {mood}.
    """),
    # --- follow-ups relative to the previous track ---
    "faster": _bank("""
        Something faster.
        Can we pick up the pace?
        A bit faster, please.
        Speed it up.
        Give me something with a quicker tempo.
        Faster, please.
        Something with more BPM.
        Let's go faster than that.
        I want a higher tempo.
        Turn up the tempo a little.
        quicker one please
        Next one should be faster.
        Same vibe but faster.
    """),
    "slower": _bank("""
        Something slower.
        Can we slow it down?
        A bit slower, please.
        Slow it down a notch.
        Give me something with a slower tempo.
        Slower, please.
        Lower the tempo.
        Let's take it down to a slower pace.
        Something less rushed.
        slower one please
        Next one a bit slower.
        Same vibe but slower.
    """),
    "more_energy": _bank("""
        More energy!
        Something more energetic.
        Turn up the intensity.
        Give me something with more punch.
        Can you crank up the energy?
        I need something more intense.
        More hype, please.
        Something livelier.
        louder and harder please
        Bring more energy to the next one.
        This needs more drive.
    """),
    "less_energy": _bank("""
        Something calmer.
        Let's bring the energy down.
        Something more relaxed.
        Can you tone it down a bit?
        Less intense, please.
        I need something mellower.
        Something softer.
        Chill it out a bit.
        a calmer one please
        Less energy on the next one.
        Something more low-key.
    """),
    "happier": _bank("""
        Something happier.
        Give me something more upbeat.
        Something more cheerful, please.
        Let's lighten the mood.
        I want something more positive.
        A happier song next.
        cheer me up a bit
        More feel-good, please.
        Something sunnier.
    """),
    "sadder": _bank("""
        Something sadder.
        Give me something more melancholic.
        Something darker in mood.
        I'm in a sad mood, go sadder.
        Something more emotional and down.
        A moodier one, please.
        sadder please
        Less cheerful, more gloomy.
        Something a bit more bittersweet.
    """),
    "more_acoustic": _bank("""
        Something more acoustic.
        Less produced, more acoustic, please.
        Can we go more acoustic?
        Give me something with a more organic sound.
        More acoustic instruments, please.
        something acoustic next
        A more stripped-down sound.
        I'd like a more acoustic one.
        Something that sounds more unplugged.
    """),
    "less_acoustic": _bank("""
        Something less acoustic.
        More produced, please.
        Something with a fuller, more produced sound.
        Less unplugged, more polished.
        Can we go less acoustic?
        give me something more produced
        A slicker production next.
        Less organic, more studio sound.
    """),
    "less_electronic": _bank("""
        Something less electronic.
        Less EDM, please.
        Can we move away from the electronic stuff?
        Fewer synths next time.
        Something that isn't dance music.
        less electronic please
        Enough electronic music, something else.
        Not so electronic this time.
    """),
    "more_electronic": _bank("""
        Something more electronic.
        Give me some EDM next.
        More synths, please.
        Let's go electronic.
        I want something for the dance floor, EDM style.
        more electronic please
        Switch to electronic dance music.
    """),
    "more_danceable": _bank("""
        Something more danceable.
        I want to dance, give me something groovier.
        More groove, please.
        Something I can dance to.
        Make it more danceable.
        a groovier one please
        Something with a better beat to dance to.
        Get me on the dance floor.
    """),
    "older": _bank("""
        Something older.
        Can you go further back in time?
        Give me an older song.
        Something from an earlier year.
        Let's go back a few years.
        Older, please.
        Something more old-school.
        a bit older please
        Take me further back.
        Something released earlier than that.
        Go back in time a bit.
        An older track next.
    """),
    "newer": _bank("""
        Something newer.
        Can you give me something more recent?
        A newer song, please.
        Something from a later year.
        More recent, please.
        Let's fast-forward a few years.
        newer please
        Something more modern.
        Give me a more recent release.
        A later track next.
        Something that came out after that one.
        Bring it closer to the present.
    """),
    "other_artist": _bank("""
        Not this artist.
        Something by a different artist.
        Can we hear someone else?
        Another artist, please.
        Switch up the artist.
        I've heard enough of them, someone else.
        different artist please
        Let's hear a new artist.
        Someone else next, please.
        Not them again, somebody different.
        Change the artist but keep the vibe.
        Play someone new.
    """),
    "same_artist": _bank("""
        More from this artist.
        Play another one by them.
        I love this artist, another song please.
        Same artist, different song.
        What else do they have?
        more from them please
        Another track from the same artist.
        Keep going with this artist.
        Give me another by that artist.
        Stick with this artist.
    """),
    "more_like_this": _bank("""
        More like this.
        Something similar.
        Give me another one like that.
        Something in the same style.
        More of that sound, please.
        Similar vibe, please.
        another one like that
        Keep this vibe going.
        What's similar to this one?
        Same kind of thing, please.
        More songs like this one.
        Something that sounds like this.
        That's the sound I want, more of it.
        In the same vein, please.
        Something close to this.
    """),
    "positive_more": _bank("""
        Love it! More like that.
        This is great, keep them coming.
        Perfect, give me another like it.
        Nice one! Something similar?
        I really like this, more please.
        Great pick, another in that style.
        awesome, more like this
        Yes! That's exactly it, more of that.
        Good choice, keep going in that direction.
        That's a banger, another one like it.
    """),
    "negative": _bank("""
        Nah, not feeling that one.
        I don't like this, try something else.
        Skip this one.
        Not for me, next.
        Hmm, no. Something different.
        That's not it, another one please.
        nope, next
        I'm not into this, try again.
        Not quite, give me something else.
        Meh. Something else please.
        That one doesn't work for me.
        No thanks, different song.
        Can you try a different one?
        Not my thing, what else?
        Pass. Next one.
    """),
    "neg_too_slow": _bank("""
        This is too slow.
        Way too slow for me, speed it up.
        Too sluggish, something faster.
        It drags, I want something quicker.
        too slow, next
        That tempo is too slow.
    """),
    "neg_too_fast": _bank("""
        This is too fast.
        Too hectic, something slower.
        Way too fast for me.
        It's too rushed, slow it down.
        too fast, next
        That tempo is too quick for me.
    """),
    "neg_too_old": _bank("""
        This sounds too dated.
        Too old for me, something newer.
        That's a bit too old-school.
        Too retro, give me something recent.
        too old, next
        I want something less dated.
    """),
    "neg_too_mellow": _bank("""
        This is too mellow.
        Too sleepy, give me some energy.
        Too soft for me right now.
        It's too chill, something more intense.
        too mellow, next
        This is putting me to sleep.
    """),
    "neg_too_sad": _bank("""
        This is too depressing.
        Too sad, cheer me up.
        Too gloomy for me right now.
        It's bringing me down, something happier.
        too sad, next
        Way too melancholic.
    """),
    "genre_switch": _bank("""
        Now some {genre}.
        Can we switch to {genre}?
        Let's try some {genre} next.
        How about some {genre}?
        Give me {genre} next.
        Change it up with some {genre}.
        switch to {genre}
        Next, something {genre}.
        I'd like some {genre} now.
        What about a {genre} track?
    """),
    "era_switch": _bank("""
        Anything from the {decade}?
        Now something from the {decade}.
        Let's jump to the {decade}.
        How about a {decade} track?
        Next one from the {decade}, please.
        Take me to the {decade} now.
        {decade} next
        Switch to the {decade}.
    """),
    "lyrics_switch": _bank("""
        Now a song about {theme}.
        Next, something with lyrics about {theme}.
        How about a song about {theme}?
        Give me lyrics about {theme} next.
        song about {theme} next
        Can the next one be about {theme}?
    """),
    "generic": _bank("""
        Another one.
        What else have you got?
        Next.
        Keep going.
        Play another.
        What's next?
        one more
        Give me another song.
        Something else.
        Okay, what else?
        Keep them coming.
        And another one.
        Next track, please.
        Surprise me.
        Got anything else?
    """),
}

OPENING_INTENTS = ("playlist", "genre", "artist", "like_artist", "era", "genre_era", "mood", "genre_mood", "lyrics",
                   "playlist_mood")
OPENING_WEIGHTS = {"playlist": 3, "genre": 2, "artist": 1, "like_artist": 1, "era": 1, "genre_era": 1, "mood": 2,
                   "genre_mood": 1, "lyrics": 1.5, "playlist_mood": 1}
FOLLOWUP_WEIGHTS = {
    "faster": 1, "slower": 1, "more_energy": 1, "less_energy": 1, "happier": 0.7, "sadder": 0.7,
    "more_acoustic": 0.7, "less_acoustic": 0.5, "less_electronic": 0.6, "more_electronic": 0.4,
    "more_danceable": 0.7, "older": 1, "newer": 1, "other_artist": 1, "same_artist": 0.7, "more_like_this": 1.5,
    "positive_more": 1, "negative": 1, "neg_too_slow": 0.4, "neg_too_fast": 0.4, "neg_too_old": 0.4,
    "neg_too_mellow": 0.4, "neg_too_sad": 0.4, "genre_switch": 0.7, "era_switch": 0.6, "lyrics_switch": 0.5,
    "generic": 0.3,
}


def pattern_id(intent: str, template: str) -> str:
    return f"{intent}:{hashlib.sha256(template.encode()).hexdigest()[:8]}"


def pattern_split(fraction: float = HELDOUT_FRACTION) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(train patterns, held-out patterns), each intent → templates; deterministic from the template text.

    About ``fraction`` of each intent's templates are held out (at least one, and at least one kept)."""
    train: dict[str, list[str]] = {}
    held: dict[str, list[str]] = {}
    for intent, templates in PATTERNS.items():
        ranked = sorted(templates, key=lambda t: hashlib.sha256(f"heldout:{t}".encode()).hexdigest())
        n_held = min(max(1, round(fraction * len(ranked))), len(ranked) - 1)
        held_set = set(ranked[:n_held])
        train[intent] = [t for t in templates if t not in held_set]
        held[intent] = [t for t in templates if t in held_set]
    all_train = {t for ts in train.values() for t in ts}
    all_held = {t for ts in held.values() for t in ts}
    assert not all_train & all_held, "train and held-out patterns overlap"
    return train, held


def slot_values(genres: list[str] | None = None) -> dict[str, list[str]]:
    """The closed slot vocabularies (``artist`` and ``playlist`` are open); ``genres``: catalog genre names."""
    return {"mood": sorted({w for _, _, ws in MOODS.values() for w in ws}),
            "decade": sorted({w for ws in DECADE_WORDS.values() for w in ws}),
            "theme": sorted(LYRIC_THEMES), "genre": sorted({genre_display(g) for g in (genres or [])})}


def pattern_regex(template: str, values: dict[str, list[str]] | None = None) -> re.Pattern:
    """A regex matching every utterance a template can produce: a slot with values in ``values`` matches one
    of them, any other slot any non-empty text."""
    values = values or {}
    parts = re.split(r"(\{[a-z_]+\})", template)
    out = []
    for p in parts:
        m = re.fullmatch(r"\{([a-z_]+)\}", p)
        if m and values.get(m.group(1)):
            out.append("(?:" + "|".join(re.escape(v) for v in values[m.group(1)]) + ")")
        else:
            out.append(".+?" if m else re.escape(p))
    return re.compile("^" + "".join(out) + "$", re.S)


def count_patterns() -> dict:
    train, held = pattern_split()
    return {"total": sum(len(v) for v in PATTERNS.values()), "train": sum(len(v) for v in train.values()),
            "heldout": sum(len(v) for v in held.values()), "intents": len(PATTERNS)}


# ---------------------------------------------------------------------------------------------------------
# tracks and grounded assistant replies
# ---------------------------------------------------------------------------------------------------------

@dataclass
class T:
    """The track facts conversations are grounded in."""

    id: str
    title: str
    artist: str
    artists: tuple[str, ...]
    year: int | None
    genres: tuple[str, ...]
    subgenres: tuple[str, ...]
    feats: dict
    popularity: int
    theme: str | None = None

    def f(self, name: str) -> float | None:
        v = self.feats.get(name)
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def load_tracks(catalog, ids: set[str] | None = None, lyrics: dict[str, str] | None = None) -> dict[str, T]:
    """The catalog's tracks (those of ``ids``) as conversations see them. Lyrics themes come from ``lyrics``
    (track id -> text) when given, else from the catalog's ``lyrics_theme`` column where it has one."""
    stored = "lyrics_theme" in catalog.columns
    cols = ("id, title, artist, artists, year, genres, subgenres, popularity, has_lyrics, "
            "danceability, energy, acousticness, valence, tempo, speechiness, instrumentalness"
            + (", lyrics_theme" if stored else ""))
    out = {}
    for r in catalog.rows(cols):
        if ids is not None and r["id"] not in ids:
            continue
        feats = {k: r[k] for k in ("danceability", "energy", "acousticness", "valence", "tempo") if r[k] is not None}
        if lyrics:
            theme = lyrics_theme(lyrics[r["id"]]) if (r["has_lyrics"] and r["id"] in lyrics) else None
        else:
            theme = r["lyrics_theme"] if stored else None
        artists = tuple(a for a in json.loads(r["artists"] or "[]") if a) or ((r["artist"],) if r["artist"] else ())
        out[r["id"]] = T(r["id"], r["title"], r["artist"], artists, r["year"], tuple(json.loads(r["genres"] or "[]")),
                         tuple(json.loads(r["subgenres"] or "[]")), feats, r["popularity"] or 0, theme)
    return out


def descriptors(t: T) -> list[str]:
    """True audio descriptors of a track (from its Spotify features), strongest claims first."""
    return descriptors_of(t.feats)


def descriptors_of(features: dict) -> list[str]:
    """The audio descriptors a reply may state of a track with these Spotify ``features`` (``descriptors``)."""
    def f(name):
        v = features.get(name)
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)

    out = []
    e, d, a, v = f("energy"), f("danceability"), f("acousticness"), f("valence")
    if e is not None and e >= 0.8:
        out.append("high-energy")
    elif e is not None and e <= 0.4:
        out.append("mellow")
    if d is not None and d >= 0.75:
        out.append("danceable")
    if a is not None and a >= 0.5:
        out.append("acoustic")
    if v is not None and v >= 0.7:
        out.append("upbeat")
    elif v is not None and v <= 0.3:
        out.append("moody")
    return out


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _genre_of(t: T, prefer: str | None = None) -> str | None:
    if prefer and (prefer in t.subgenres or prefer in t.genres):
        return genre_display(prefer)
    if t.subgenres:
        return genre_display(t.subgenres[0])
    return genre_display(t.genres[0]) if t.genres else None


REPLIES = [
    "Try “{title}” by {artist}{year_p}{dash_desc}.",
    "How about “{title}” by {artist}{year_p}?{sent_desc}",
    "Here's “{title}” by {artist}{year_p}{dash_desc}.",
    "You might like “{title}” by {artist}{year_p}{dash_desc}.",
    "Coming up: “{title}” by {artist}{year_p}{dash_desc}.",
    "Check out “{title}” by {artist}{year_p}.{sent_desc}",
    "I'd go with “{title}” by {artist}{year_p}{dash_desc}.",
    "Let's play “{title}” by {artist}{year_p}{dash_desc}.",
]

LEADS = {  # intent -> lead-in that is true given how the target was chosen (may use {prev_*} values)
    "faster": ["Picking up the pace ({bpm} BPM, up from {prev_bpm}):", "A quicker one at {bpm} BPM:"],
    "neg_too_slow": ["Faster then ({bpm} BPM, up from {prev_bpm}):", "Let's speed up to {bpm} BPM:"],
    "slower": ["Slowing down to {bpm} BPM:", "A slower one ({bpm} BPM, down from {prev_bpm}):"],
    "neg_too_fast": ["Slower then, at {bpm} BPM:", "Easing off to {bpm} BPM:"],
    "older": ["Going back to {year}:", "An older one, from {year}:"],
    "neg_too_old": ["Something more recent, from {year}:", "Fast-forward to {year}:"],
    "newer": ["A newer one, from {year}:", "Moving forward to {year}:"],
    "era": ["From {year}:", "A {year} release:"],
    "genre_era": ["From {year}:"],
    "era_switch": ["From {year}:", "Jumping to {year}:"],
    "other_artist": ["Switching artists:", "Someone different:"],
    "negative": ["Sure, something different:", "No problem, try this instead:"],
    "same_artist": ["More from {artist}:", "Another one by {artist}:"],
    "artist": ["Here's one by {artist}:"],
    "lyrics": ["For lyrics about {theme}:"],
    "lyrics_switch": ["For lyrics about {theme}:"],
    "more_like_this": ["In the same vein:", "Similar sound:"],
    "positive_more": ["Glad you like it! In the same vein:", "Another in that style:"],
}


def render_reply(rng: random.Random, t: T, intent: str, prev: T | None, genre_hint: str | None) -> str:
    """A short reply stating only facts the catalog holds about ``t`` (title, artist, year, genre, features)."""
    desc = descriptors(t)
    rng.shuffle(desc)
    genre = _genre_of(t, genre_hint)
    words = " ".join(desc[:2]).strip()
    if genre:
        phrase = f"{words} {genre} track".strip()
    elif words:
        phrase = f"{words} track"
    else:
        phrase = ""
    dash_desc = f" — {_article(phrase)} {phrase}" if phrase else ""
    sent_desc = f" It's {_article(phrase)} {phrase}." if phrase else ""
    if intent == "lyrics" or intent == "lyrics_switch":
        sent_desc += " Its lyrics keep coming back to " + (t.theme or "") + "."
        dash_desc += f", with lyrics about {t.theme}"
    values = {"title": t.title, "artist": t.artist, "year_p": f" ({t.year})" if t.year else "",
              "dash_desc": dash_desc, "sent_desc": sent_desc}
    leads = LEADS.get(intent) if rng.random() < 0.7 else None
    text = rng.choice([r for r in REPLIES if not r.startswith("Coming")] if leads else REPLIES).format(**values)
    if leads:
        lead_values = {"bpm": round(t.f("tempo") or 0), "prev_bpm": round(prev.f("tempo") or 0) if prev else 0,
                       "year": t.year, "artist": t.artist, "theme": t.theme}
        candidates = [ld for ld in leads if ("{year}" not in ld or t.year) and ("{bpm}" not in ld or t.f("tempo"))]
        if candidates:
            lead = rng.choice(candidates).format(**lead_values)
            text = f"{lead} {text if text.startswith('I') else text[0].lower() + text[1:]}"
    return text


# ---------------------------------------------------------------------------------------------------------
# intents: choose a target the intent is true of
# ---------------------------------------------------------------------------------------------------------

def _decade(year: int | None) -> int | None:
    return (year // 10) * 10 if year else None


@dataclass
class Ctx:
    playlist: dict
    pname: str
    pool: list[T]  # playlist tracks not yet recommended
    played: list[T]
    rng: random.Random

    @property
    def prev(self) -> T | None:
        return self.played[-1] if self.played else None


def _pick(ctx: Ctx, cands: list[T]) -> T | None:
    return ctx.rng.choice(cands) if cands else None


def _rel(ctx: Ctx, feat: str, sign: int, margin: float) -> T | None:
    p = ctx.prev.f(feat) if ctx.prev else None
    if p is None:
        return None
    return _pick(ctx, [t for t in ctx.pool if t.f(feat) is not None and sign * (t.f(feat) - p) >= margin])


def _mood_slot(ctx: Ctx, t: T) -> str | None:
    true = [m for m, (feat, pred, _) in MOODS.items() if t.f(feat) is not None and pred(t.f(feat))]
    return ctx.rng.choice(MOODS[ctx.rng.choice(true)][2]) if true else None


def _genre_slot(ctx: Ctx, t: T) -> str | None:
    pl_sub, pl_gen = ctx.playlist.get("subgenre"), ctx.playlist.get("genre")
    options = [g for g in (pl_sub, pl_gen) if g and (g in t.subgenres or g in t.genres)]
    if not options:
        options = list(t.subgenres) + list(t.genres)
    return genre_display(ctx.rng.choice(options)) if options else None


def _decade_slot(ctx: Ctx, t: T) -> str | None:
    d = _decade(t.year)
    return ctx.rng.choice(DECADE_WORDS[d]) if d in DECADE_WORDS else None


def choose(intent: str, ctx: Ctx) -> tuple[T, dict] | None:
    """Pick a target in ``ctx.pool`` that makes ``intent`` true; returns (target, template slots) or None."""
    rng, pool, prev = ctx.rng, ctx.pool, ctx.prev
    if not pool:
        return None
    if intent == "playlist":
        return (_pick(ctx, pool), {"playlist": ctx.pname}) if ctx.pname else None
    if intent in ("genre", "genre_switch"):
        cands = pool
        if intent == "genre_switch":  # a genre the previous track does not have
            cands = [t for t in pool if set(t.subgenres) - set(prev.subgenres)]
            t = _pick(ctx, cands)
            if t is None:
                return None
            return t, {"genre": genre_display(rng.choice(sorted(set(t.subgenres) - set(prev.subgenres))))}
        t = _pick(ctx, cands)
        g = _genre_slot(ctx, t)
        return (t, {"genre": g}) if g else None
    if intent == "artist":
        t = _pick(ctx, [t for t in pool if t.artists])
        return (t, {"artist": rng.choice(t.artists)}) if t else None
    if intent == "like_artist":
        others = [o for o in pool if o.artists]
        rng.shuffle(others)
        for ref in others[:5]:
            cands = [t for t in pool if t is not ref and not set(t.artists) & set(ref.artists)
                     and set(t.subgenres) & set(ref.subgenres)]
            if cands:
                return _pick(ctx, cands), {"artist": rng.choice(ref.artists)}
        return None
    if intent in ("era", "genre_era", "era_switch"):
        cands = [t for t in pool if _decade(t.year) in DECADE_WORDS]
        if intent == "era_switch":
            cands = [t for t in cands if _decade(t.year) != _decade(prev.year)]
        t = _pick(ctx, cands)
        if t is None:
            return None
        slots = {"decade": _decade_slot(ctx, t)}
        if intent == "genre_era":
            slots["genre"] = _genre_slot(ctx, t)
        return (t, slots) if all(slots.values()) else None
    if intent in ("mood", "genre_mood", "playlist_mood"):
        cands = [t for t in pool if descriptors(t) or any(MOODS[m][1](t.f(MOODS[m][0])) for m in MOODS
                                                           if t.f(MOODS[m][0]) is not None)]
        t = _pick(ctx, cands)
        if t is None:
            return None
        slots = {"mood": _mood_slot(ctx, t)}
        if intent == "genre_mood":
            slots["genre"] = _genre_slot(ctx, t)
        if intent == "playlist_mood":
            slots["playlist"] = ctx.pname
        return (t, slots) if all(slots.values()) else None
    if intent in ("lyrics", "lyrics_switch"):
        cands = [t for t in pool if t.theme and (prev is None or t.theme != prev.theme)]
        t = _pick(ctx, cands)
        return (t, {"theme": t.theme}) if t else None
    if prev is None:
        return None
    # follow-ups: relative to the previous track
    rel = {"faster": ("tempo", 1, 8.0), "neg_too_slow": ("tempo", 1, 8.0), "slower": ("tempo", -1, 8.0),
           "neg_too_fast": ("tempo", -1, 8.0), "more_energy": ("energy", 1, 0.1), "neg_too_mellow": ("energy", 1, 0.1),
           "less_energy": ("energy", -1, 0.1), "happier": ("valence", 1, 0.15), "neg_too_sad": ("valence", 1, 0.15),
           "sadder": ("valence", -1, 0.15), "more_acoustic": ("acousticness", 1, 0.15),
           "less_acoustic": ("acousticness", -1, 0.15), "more_danceable": ("danceability", 1, 0.1)}
    if intent in rel:
        if intent == "neg_too_slow" and not (prev.f("tempo") or 999) <= 110:
            return None
        if intent == "neg_too_fast" and not (prev.f("tempo") or 0) >= 120:
            return None
        if intent == "neg_too_mellow" and not (prev.f("energy") or 1) <= 0.6:
            return None
        if intent == "neg_too_sad" and not (prev.f("valence") or 1) <= 0.4:
            return None
        t = _rel(ctx, *rel[intent])
        return (t, {}) if t else None
    if intent in ("older", "newer", "neg_too_old"):
        if not prev.year:
            return None
        if intent == "neg_too_old" and prev.year >= 2005:
            return None
        sign = -1 if intent == "older" else 1
        t = _pick(ctx, [t for t in pool if t.year and sign * (t.year - prev.year) >= 2])
        return (t, {}) if t else None
    if intent in ("less_electronic", "more_electronic"):
        prev_edm = "edm" in prev.genres
        if (intent == "less_electronic") != prev_edm:
            return None
        want = intent == "more_electronic"
        t = _pick(ctx, [t for t in pool if ("edm" in t.genres) == want])
        return (t, {}) if t else None
    played_artists = {a for p in ctx.played for a in p.artists}
    if intent in ("other_artist", "negative"):
        banned = played_artists if intent == "other_artist" else set(prev.artists)
        t = _pick(ctx, [t for t in pool if not set(t.artists) & banned])
        return (t, {}) if t else None
    if intent == "same_artist":
        t = _pick(ctx, [t for t in pool if set(t.artists) & set(prev.artists)])
        return (t, {}) if t else None
    if intent in ("more_like_this", "positive_more"):
        cands = [t for t in pool if set(t.subgenres) & set(prev.subgenres)]
        feats = ("energy", "danceability", "valence", "acousticness")
        if prev.f("energy") is None:
            return None

        def dist(t: T) -> float:
            return sum((t.f(k) - prev.f(k)) ** 2 for k in feats if t.f(k) is not None and prev.f(k) is not None) + \
                (((t.f("tempo") or 0) - (prev.f("tempo") or 0)) / 100) ** 2
        cands = sorted((t for t in cands if t.f("energy") is not None), key=dist)[:3]
        return (_pick(ctx, cands), {}) if cands else None
    if intent == "generic":
        return _pick(ctx, pool), {}
    raise KeyError(f"unknown intent {intent!r}")


def _weighted_order(rng: random.Random, weights: dict[str, float]) -> list[str]:
    keys = sorted(weights)
    return sorted(keys, key=lambda k: -(rng.random() ** (1.0 / weights[k])))


TURN_COUNTS = (2, 3, 4, 5, 6, 7, 8)
TURN_WEIGHTS = (3, 4, 4, 3, 2, 1.5, 1)


def with_playlist_genre(t: T, playlist: dict) -> T:
    """``t`` with ``playlist``'s genre and subgenre added to its own (after them) where it lacks them."""
    g, s = playlist.get("genre"), playlist.get("subgenre")
    if (not g or g in t.genres) and (not s or s in t.subgenres):
        return t
    return replace(t, genres=t.genres + ((g,) if g and g not in t.genres else ()),
                   subgenres=t.subgenres + ((s,) if s and s not in t.subgenres else ()))


def make_conversation(conv_id: str, playlist: dict, tracks: dict[str, T], patterns: dict[str, list[str]],
                      rng: random.Random, split: str = "") -> dict | None:
    """One conversation over ``playlist`` using ``patterns`` (intent → templates); None if under 2 tracks.

    The user knows their playlist: its tracks carry its genre and subgenre here even where the catalog,
    which keeps only what training playlists say (``catalog_build.training_playlist_view``), has none."""
    seen: set[str] = set()
    pool = []
    for tid in playlist["track_ids"]:
        if tid in tracks and tid not in seen:
            seen.add(tid)
            pool.append(with_playlist_genre(tracks[tid], playlist))
    if len(pool) < 2:
        return None
    n_turns = min(rng.choices(TURN_COUNTS, TURN_WEIGHTS)[0], len(pool))
    ctx = Ctx(playlist, clean_name(playlist.get("name") or ""), pool, [], rng)
    turns, intents, pids = [], [], []
    for k in range(n_turns):
        weights = OPENING_WEIGHTS if k == 0 else FOLLOWUP_WEIGHTS
        picked = None
        for intent in _weighted_order(rng, weights):
            res = choose(intent, ctx)
            if res and res[0] is not None:
                picked = (intent, *res)
                break
        if picked is None:  # openings all failed (no name, no genre…): fall back to a generic request
            picked = ("generic", _pick(ctx, ctx.pool), {})
        intent, target, slots = picked
        template = rng.choice(patterns[intent])
        turns.append({"role": "user", "content": template.format(**slots)})
        genre_hint = ctx.playlist.get("subgenre")
        turns.append({"role": "assistant", "content": render_reply(rng, target, intent, ctx.prev, genre_hint),
                      "track_ids": [target.id]})
        intents.append(intent)
        pids.append(pattern_id(intent, template))
        ctx.pool = [t for t in ctx.pool if t.id != target.id]
        ctx.played.append(target)
    return {"id": conv_id, "turns": turns,
            "meta": {"playlist_id": playlist["id"], "split": split, "intents": intents, "patterns": pids}}


# ---------------------------------------------------------------------------------------------------------
# the whole data set
# ---------------------------------------------------------------------------------------------------------

DEFAULT_SIZES = {"train": 20000, "valid": 500, "test": 1000, "test_unseen": 1000}


def generate_split(split: str, n: int, playlists: list[dict], tracks: dict[str, T], patterns: dict[str, list[str]],
                   seed: int, bar=None) -> list[dict]:
    """``n`` conversations spread evenly over ``playlists`` (shuffled per seed); conversation i uses its own RNG."""
    pls = [p for p in playlists if sum(t in tracks for t in p["track_ids"]) >= 2]
    if not pls or n <= 0:
        return []
    order = sorted(pls, key=lambda p: hashlib.sha256(f"{seed}:{split}:{p['id']}".encode()).hexdigest())
    out = []
    for i in range(n):
        rng = random.Random(f"{seed}:{split}:{i}")
        conv = make_conversation(f"{split}-{i:06d}", order[i % len(order)], tracks, patterns, rng, split)
        if conv:
            out.append(conv)
        if bar is not None:
            bar.update(1)
    return out


def build_conversations(catalog, out_dir: str | Path, seed: int = 0, sizes: dict[str, int] | None = None,
                        lyrics: dict[str, str] | None = None, show_progress: bool = True) -> dict:
    """Generate train/valid/test/test_unseen JSONL files + ``stats.json`` under ``out_dir``; returns the stats."""
    t0 = time.perf_counter()
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    by_split = {s: catalog.playlists(s) for s in ("train", "valid", "test")}
    ids = {t for pls in by_split.values() for p in pls for t in p["track_ids"]}
    tracks = load_tracks(catalog, ids, lyrics)
    train_pat, held_pat = pattern_split()
    plan = [("train", "train", train_pat), ("valid", "valid", train_pat), ("test", "test", train_pat),
            ("test_unseen", "test", held_pat)]
    themed = any(t.theme for t in tracks.values())  # lyrics themes, from ``lyrics`` or the catalog
    stats: dict = {"seed": seed, "catalog": str(catalog.path), "vocab_fingerprint": catalog.fingerprint,
                   "patterns": count_patterns(), "lyrics_available": themed or bool(lyrics), "splits": {}}
    total = sum(sizes[s] for s, _, _ in plan)
    bar = progress(total=total, desc="conversations", unit="conv") if show_progress else None
    for name, pl_split, pats in plan:
        convs = generate_split(name, sizes[name], by_split[pl_split], tracks, pats, seed, bar)
        write_conversations(out_dir / f"{name}.jsonl", convs)
        intents: dict[str, int] = {}
        for c in convs:
            for it in c["meta"]["intents"]:
                intents[it] = intents.get(it, 0) + 1
        n_turns = sum(len(c["meta"]["intents"]) for c in convs)
        stats["splits"][name] = {
            "conversations": len(convs), "assistant_turns": n_turns,
            "mean_turns": round(n_turns / len(convs), 3) if convs else 0.0,
            "playlists": len({c["meta"]["playlist_id"] for c in convs}),
            "playlists_available": len(by_split[pl_split]),
            "distinct_patterns_used": len({p for c in convs for p in c["meta"]["patterns"]}),
            "intents": dict(sorted(intents.items(), key=lambda kv: -kv[1])),
        }
    if bar is not None:
        bar.close()
    stats["runtime_s"] = round(time.perf_counter() - t0, 2)
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats
