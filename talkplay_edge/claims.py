"""What a reply says about its track, checked against the catalog.

Replies are trained to state only facts the catalog holds ("Try “Halo” by Beyoncé (2008) — a danceable dance
pop track"), but the model writes them from the music tokens alone, so it can say "moody" of a cheerful
song, carry the last track's genre over to a new one, or get the year wrong. ``ClaimReader`` reads six
kinds of claim from a reply and says whether each holds for the track:

- ``genre``: a genre name ("gangster rap", "country", "electronic") that no genre, subgenre or artist's
  genre of the track holds as whole words ("rock" holds for "album rock"; "hip pop" does not for "hip hop");
- ``sound``: a sound word of the replies ("high-energy", "mellow", "danceable", "acoustic", "upbeat",
  "moody") that the track's audio features do not bear out (``conversations.descriptors_of``);
- ``year``: a year (1900–2099) other than the track's;
- ``bpm``: "N BPM" more than 1 from the track's tempo, and "from N" after it more than 1 from the last
  track's;
- ``relation``: what it says of the track against the last one ("a newer one", "picking up the pace",
  "up from 120") when the track is not newer, quicker... than the last (or there is no last one);
- ``lyrics``: what its lyrics are about ("with lyrics about love"), other than the theme the catalog holds
  for the track (``Track.lyrics_theme``; most tracks have none).

Words of the track's own title, artist and album are no claim ("Rock Your Body" claims no rock).

For the runtime's reply guard (``runtime.ChatSession.send``): ``first_false`` gives the earliest false claim
of a reply being written whose words are all written; ``settled`` how much of it no later claim can reach
back into (the part it can stream); a claim's ``instead`` what to write in its place where the catalog
knows it (the true year, BPM or lyrics theme, "From 2005:" for a false lead); ``describe`` what to say of the track
instead, from the catalog, and ``description_start`` / ``description_cut`` where the description it
replaces begins, or where the reply ends when there is nothing true to say.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

from .catalog import json_strings
from .conversations import GENRE_DISPLAY, LYRIC_THEMES, descriptors_of

SOUND_WORDS = {  # the sound words replies use (conversations.render_reply) -> the descriptor that makes them true
    "high energy": "high-energy", "mellow": "mellow", "danceable": "danceable", "acoustic": "acoustic",
    "upbeat": "upbeat", "moody": "moody",
}
# genre words of a name that make it a genre claim in a reply; names of nothing else ("world", "focus",
# "sleep", "tribute", "comedy") are ordinary words there. Every track genre and subgenre counts as well.
GENRE_CORE = frozenset("""rock pop rap hip hop trap country jazz soul blues folk funk disco reggae reggaeton edm
electronic electronica house techno trance dubstep drum bass metal punk grunge emo indie r&b gospel classical
latin salsa cumbia bachata dancehall afrobeat afropop grime drill ska swing bluegrass americana rockabilly
synthpop electropop electro ambient lounge""".split())
RELATION_WORDS = {  # what replies say of their track against the last one -> (what it compares, which way)
    "newer": ("year", 1), "more recent": ("year", 1), "fast forward": ("year", 1), "moving forward": ("year", 1),
    "older": ("year", -1), "going back": ("year", -1),
    "faster": ("bpm", 1), "quicker": ("bpm", 1), "picking up the pace": ("bpm", 1), "pick up the pace": ("bpm", 1),
    "speed up": ("bpm", 1), "speeding up": ("bpm", 1),
    "slower": ("bpm", -1), "slowing down": ("bpm", -1), "slow down": ("bpm", -1), "easing off": ("bpm", -1),
    "ease off": ("bpm", -1),
}
LYRICS_OPENERS = ("about", "around", "lyrics about", "with lyrics about", "its lyrics keep coming back to",
                  "keep coming back to", "keeps coming back to", "coming back to")  # + a theme: a lyrics claim
EXTRA_GENRE_NAMES = {"electronic": "edm", "electronica": "edm", "electronic dance music": "edm", "dance music": "edm",
                     "hip-hop": "hip hop", "rnb": "r&b"}
_WORD = re.compile(r"[\w&']+")
_YEAR = re.compile(r"(?<![\w.])(19|20)\d\d(?!\w|\.\d)")  # a whole number: "2008." yes, "2008.5" no
_BPM = re.compile(r"(?<![\w.])(\d{2,3})\s*(?:bpm|BPM)\b")
_FROM_BPM = re.compile(r"(?<![\w.])(?:(up|down)\s+)?from\s+(\d{2,3})(?!\w|\.\d)", re.I)
_LEAD_END = re.compile(r"[“”\":—.!?]")  # what ends a reply's lead ("A newer one, from 2005:"), or shows none
LEAD_MAX_CHARS = 60  # a lead is shorter than this
_SEPARATORS = " \t\n,—–-"  # what may end a reply's text between words
BPM_SLACK = 1  # replies state round(tempo)


def _words(text: str) -> tuple[str, ...]:
    return tuple(w.lower() for w in _WORD.findall((text or "").replace("-", " ")))


@dataclass(frozen=True)
class Claim:
    """One claim of a reply: its ``kind`` (genre, sound, year, bpm, relation, lyrics), the ``phrase`` as written,
    where it is in the reply (``start``, ``end``: character offsets) and whether the catalog bears it out;
    for a false one, what to write ``instead`` from character ``instead_at`` on (None: nothing known to
    write)."""

    kind: str
    phrase: str
    start: int
    end: int
    holds: bool
    value: int | None = None  # the true number, for a year or BPM claim (None when the catalog has none)
    instead: str | None = None
    instead_at: int | None = None  # where ``instead`` begins: the claim's start, or a false lead's
    ends: bool = False  # the reply ends after ``instead`` ("", or "."), in place of a false lyrics theme


class ClaimReader:
    """Reads a reply's claims about its track: ``ClaimReader(track_genres, artist_genres)``, the catalog's
    genre and subgenre names (each a genre claim when a reply says it) and its artists' genre names (a claim
    when they hold a word of ``GENRE_CORE``); ``from_catalog`` reads both."""

    def __init__(self, track_genres, artist_genres=()):
        phrases: dict[tuple[str, ...], tuple[str, str]] = {}
        for n in artist_genres:
            words = _words(n)
            if GENRE_CORE.intersection(words):
                phrases[words] = ("genre", " ".join(words))
        for n in track_genres:
            if _words(n):
                phrases[_words(n)] = ("genre", " ".join(_words(n)))
        for w, n in EXTRA_GENRE_NAMES.items():
            phrases.setdefault(_words(w), ("genre", n))
        for w, d in SOUND_WORDS.items():
            phrases[_words(w)] = ("sound", d)
        self._known = {w for p in phrases for w in p}  # the words of genre and sound claims (descriptions)
        for w in RELATION_WORDS:
            phrases[_words(w)] = ("relation", w)
        for theme in LYRIC_THEMES:  # "about the night", and "about night"
            for said in {theme, theme.removeprefix("the ")}:
                for opener in LYRICS_OPENERS:
                    phrases[_words(f"{opener} {said}")] = ("lyrics", theme)
        self.phrases = phrases
        self.longest = max(map(len, phrases))
        nexts: dict[tuple[str, ...], set[str]] = {}
        for p in phrases:
            for i in range(len(p)):
                nexts.setdefault(p[:i], set()).add(p[i])
        # a run of words (() too) -> the words a phrase goes on with after it
        self._next_words = {k: sorted(v) for k, v in nexts.items()}

    @classmethod
    def from_catalog(cls, catalog) -> "ClaimReader":
        """The reader for a ``catalog.Catalog`` (its distinct genre lists, ~0.1 s for 47k tracks)."""
        def names(*columns):
            out = set()
            for column in columns:
                for (value,) in catalog.conn.execute(f"select distinct {column} from tracks"):
                    out.update(n.lower() for n in json_strings(value))
            return sorted(out)

        return cls(names("genres", "subgenres"), names("artist_genres"))

    # -- what holds for a track ---------------------------------------------------------------------------
    @staticmethod
    def genre_texts(track) -> list[str]:
        """The track's genre names as padded word text (for whole-word containment)."""
        names = [*getattr(track, "genres", ()), *getattr(track, "subgenres", ()), *(track.artist_genres or ())]
        names += [n for n in (getattr(track, "genre", None), getattr(track, "subgenre", None)) if n]
        return [" " + " ".join(_words(n)) + " " for n in names]

    def holding(self, kind: str, track, previous=None) -> dict[tuple[str, ...], bool]:
        """Every phrase of ``kind`` (genre, sound, relation, lyrics), as words, with whether it holds for ``track``
        (after ``previous``, for a relation)."""
        texts = self.genre_texts(track)
        return {w: self._holds(k, w, n, track, texts, previous) for w, (k, n) in self.phrases.items() if k == kind}

    def _holds(self, kind: str, words: tuple[str, ...], name: str, track, texts: list[str], previous=None) -> bool:
        if kind == "sound":
            return name in descriptors_of(track.features or {})
        if kind == "relation":
            what, sign = RELATION_WORDS[name]
            return sign * _compare(what, track, previous) > 0
        if kind == "lyrics":
            return getattr(track, "lyrics_theme", None) == name
        keys = {" " + " ".join(words) + " ", " " + name + " "}
        return any(k in t for k in keys for t in texts)

    # -- reading a reply --------------------------------------------------------------------------------
    def claims(self, reply: str, track, previous=None, complete: bool = True) -> list[Claim]:
        """Every claim ``reply`` makes about ``track`` (a ``catalog.Track``), in reply order; ``previous`` is the
        track before it (for "from N BPM"). With ``complete=False`` the reply is still being written, and only
        its ``settled`` part is read."""
        if not complete:
            reply = reply[:self.settled(reply)]
        own = set(_words(f"{track.title} {track.artist} {track.album or ''}"))
        texts = self.genre_texts(track)
        matches = _matches(reply)
        out = []
        i = 0
        while i < len(matches):
            for n in range(min(self.longest, len(matches) - i), 0, -1):
                words = tuple(w for w, _, _ in matches[i:i + n])
                hit = self.phrases.get(words)
                if hit is None or not set(words) - own:
                    continue
                kind, name = hit
                start, end = matches[i][1], matches[i + n - 1][2]
                holds = self._holds(kind, words, name, track, texts, previous)
                instead = at = None
                ends = False
                if kind == "relation" and not holds:
                    at = self.lead_start(reply, start)
                    instead = None if at is None else self.lead(RELATION_WORDS[name][0], track)
                elif kind == "lyrics" and not holds:
                    said = _words(name)
                    if words[-len(said):] != said:
                        said = said[1:]  # "about night" for the night
                    at, instead, ends = self._lyrics_instead(reply, start, matches[i + n - len(said)][1], track)
                out.append(Claim(kind, reply[start:end], start, end, holds, None, instead, at, ends))
                i += n - 1
                break
            i += 1
        out += self._numbers(reply, track, previous, own)
        return sorted(out, key=lambda c: c.start)

    def _numbers(self, reply: str, track, previous, own: set[str]) -> list[Claim]:
        out = []
        year = int(track.year) if track.year else None
        for m in _YEAR.finditer(reply):
            if m.group(0) not in own:
                out.append(Claim("year", m.group(0), m.start(), m.end(), year == int(m.group(0)), year, _text(year)))
        for m in _BPM.finditer(reply):
            bpm = _bpm(track)
            out.append(Claim("bpm", m.group(0), m.start(1), m.end(1), _near(bpm, int(m.group(1))), bpm, _text(bpm)))
            after = _FROM_BPM.match(reply, len(reply) - len(reply[m.end():].lstrip(" ,")))
            if after is None:
                continue
            if after.group(1):  # "up from 120": the way the tempo went
                way = _compare("bpm", track, previous)
                said = 1 if after.group(1).lower() == "up" else -1
                right = {1: "up", -1: "down"}.get(way)
                if right and after.group(1)[0].isupper():
                    right = right.upper() if after.group(1).isupper() else right.title()
                out.append(Claim("relation", after.group(1), after.start(1), after.end(1), said * way > 0, None,
                                 right))
            prev = _bpm(previous) if previous is not None else None
            out.append(Claim("bpm", after.group(0), after.start(2), after.end(2), _near(prev, int(after.group(2))),
                             prev, _text(prev)))
        return out

    def false_claims(self, reply: str, track, previous=None) -> list[Claim]:
        return [c for c in self.claims(reply, track, previous) if not c.holds]

    def first_false(self, reply: str, track, previous=None, after: int = 0, complete: bool = False) -> Claim | None:
        """The earliest false claim starting at or after character ``after`` of a reply being written (its
        ``settled`` part; the whole reply with ``complete``), or None."""
        return next((c for c in self.claims(reply, track, previous, complete=complete)
                     if not c.holds and c.start >= after), None)

    # -- what to write instead ---------------------------------------------------------------------------
    @staticmethod
    def lead_start(reply: str, start: int) -> int | None:
        """Where the lead a claim at ``start`` is part of begins ("A newer one, from 2005:" before “Title”), or
        None when the claim is past the reply's lead."""
        if start >= LEAD_MAX_CHARS or _LEAD_END.search(reply, 0, start):
            return None
        return len(reply) - len(reply.lstrip())

    def _lyrics_instead(self, reply: str, start: int, theme_at: int, track) -> tuple[int, str, bool]:
        """What to write for a false lyrics claim starting at ``start`` (its theme at ``theme_at``): the track's
        own theme when the catalog holds one ("with lyrics about summer"); else, in a lead, nothing ("For
        lyrics about money:" goes); else the reply ends before it ("— an upbeat track, with lyrics about
        love." becomes "— an upbeat track.")."""
        theme = getattr(track, "lyrics_theme", None)
        if theme:
            return start, reply[start:theme_at] + theme, False
        lead = self.lead_start(reply, start)
        if lead is not None:
            return lead, "", False
        before = reply[:start].rstrip(_SEPARATORS)
        return len(before), ("" if before.endswith((".", "!", "?")) else "."), True

    @staticmethod
    def lead(what: str, track) -> str | None:
        """A lead that says no more than the catalog holds of ``track``, for one whose relation is false:
        "From 2005:" (``what`` = "year") or "At 120 BPM:" ("bpm"); None when the catalog has no such value."""
        if what == "year":
            return f"From {int(track.year)}:" if track.year else None
        bpm = _bpm(track)
        return f"At {bpm} BPM:" if bpm else None

    def describe(self, track, tempo: bool = False) -> str:
        """What a reply may say of ``track`` after "a": up to two sound words and a genre, as the training
        replies put them ("high-energy danceable big room track"; ``conversations.render_reply``), from the
        catalog's facts: its first subgenre, else genre, else its artist's first genre (a sound word the genre
        says already goes: "acoustic neo mellow", not "mellow acoustic neo mellow"). When it has none, ""
        (or with ``tempo``, its BPM: "115 BPM track", when known)."""
        names = [*getattr(track, "subgenres", ()), *getattr(track, "genres", ()), *(track.artist_genres or ())]
        genre = GENRE_DISPLAY.get(names[0], names[0]) if names else ""
        words = [w for w in descriptors_of(track.features or {}) if w not in genre.split()][:2]
        if words or genre:
            return " ".join([*words, *([genre] if genre else []), "track"])
        bpm = _bpm(track) if tempo else None
        return f"{bpm} BPM track" if bpm else ""

    def description_start(self, reply: str, claim: Claim) -> int | None:
        """Where the description a false genre or sound claim is part of begins: the "a" / "an" before it,
        with only claim words between ("— a high-energy moody gangster rap track"); None when there is none."""
        words = _matches(reply[:claim.start])
        i = len(words) - 1
        while i >= 0 and words[i][0] in self._known:
            i -= 1
        return words[i][1] if i >= 0 and words[i][0] in ("a", "an") else None

    @staticmethod
    def description_cut(reply: str, start: int) -> tuple[int, str] | None:
        """Where a reply ends when the description beginning at ``start`` has nothing true to say, and what
        ends it there: before the dash that leads it, with a full stop ("…(2012) — a …" becomes "…(2012).")
        or before "It's", as it is ("…(2012). It's a …" becomes "…(2012)."); None when neither leads it."""
        before = reply[:start].rstrip()
        for lead, end in (("—", "."), ("–", "."), (" -", "."), ("It's", ""), ("It’s", ""), ("It is", "")):
            if before.endswith(lead):
                return len(before[:-len(lead)].rstrip()), end
        return None

    # -- a reply being written --------------------------------------------------------------------------
    def settled(self, reply: str) -> int:
        """How many characters of a reply being written no later claim can take in, or take back (``_settled``),
        less the spaces, commas and dashes it ends with: the guard may end the reply before them ("— an upbeat
        track, with lyrics about love" ends "— an upbeat track.")."""
        return len(reply[:self._settled(reply)].rstrip(_SEPARATORS))

    def _settled(self, reply: str) -> int:
        """How much of a reply being written no later claim can take in, or take back. It ends before the
        first word still open (the last word while nothing ends it and it may begin a phrase or
        is a number; a run of words at the end that a phrase may go on from; a number with at most one word
        after it, "120" before "BPM"), and before the description that open word is part of ("— a
        high-energy mo…": before the dash, which the guard may take back with it). A reply's lead is held
        whole until it ends ("A newer one, from 2005:"; ``lead_start``): the guard may write it again."""
        if len(reply) < LEAD_MAX_CHARS and not _LEAD_END.search(reply):
            return 0  # a lead may say "newer" of an older track, and be written again whole ("From 2005:")
        matches = _matches(reply)
        n = len(matches)
        k = n
        partial = n and matches[-1][2] == len(reply)
        for i in range(max(0, n - self.longest - 1), n):
            run = tuple(w for w, _, _ in matches[i:])
            if (run[0].isdigit() and n - i <= 2 or partial and self._may_begin(run[:-1], run[-1])
                    or not partial and run in self._next_words):
                k = i
                break
        if k == n:
            return len(reply)
        while k > 0 and matches[k - 1][0] in self._known:
            k -= 1
        if k > 0 and matches[k - 1][0] in ("a", "an"):
            k -= 1
            cut = self.description_cut(reply, matches[k][1])
            if cut is not None:
                return cut[0]
        return matches[k][1]

    def _may_begin(self, words: tuple[str, ...], partial: str) -> bool:
        """Whether a phrase begins with ``words`` and then a word ``partial`` begins."""
        following = self._next_words.get(words, ())
        i = bisect.bisect_left(following, partial)
        return i < len(following) and following[i].startswith(partial)


def _matches(text: str) -> list[tuple[str, int, int]]:
    return [(m.group(0).lower(), m.start(), m.end()) for m in _WORD.finditer(text.replace("-", " "))]


def article(phrase: str) -> str:
    """"a" or "an" before ``phrase`` ("an upbeat …", "an 80 BPM …", "an 18 …", "a 115 BPM …")."""
    first = phrase.split()[0] if phrase.split() else ""
    if first.isdigit():
        return "an" if first.startswith("8") or first in ("11", "18") else "a"
    return "an" if first[:1].lower() in "aeiou" and first[:1] else "a"


def _bpm(track) -> int | None:
    tempo = (track.features or {}).get("tempo")
    return round(float(tempo)) if tempo else None


def _text(value) -> str | None:
    return None if value is None else str(value)


def _compare(what: str, track, previous) -> int:
    """1, -1 or 0: whether ``track`` is newer / quicker than ``previous`` (``what``: "year" or "bpm"), older /
    slower, or neither (or either is unknown)."""
    if previous is None:
        return 0
    a, b = (track.year, previous.year) if what == "year" else (_bpm(track), _bpm(previous))
    return 0 if not a or not b else (a > b) - (a < b)


def _near(true: int | None, said: int) -> bool:
    return true is not None and abs(true - said) <= BPM_SLACK

