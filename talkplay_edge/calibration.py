"""Span calibration: how a music-span step scores the children of a trie node.

A model trained on few conversations ranks a node's children well but is over-confident, and it ignores
how many catalog tracks lie below each child. At depth ``d`` of a span (0 = the cf token) the runtime can
score the allowed children as

    beta[d] * logit(child) + alpha[d] * log(prior mass below child),   normalised over the children,

``beta`` an inverse temperature on the model and ``alpha`` the weight of a prior over the catalog's tracks:
by default every track weighs the same (the mass below a child is its share of the tracks); with a
retrieval spec (``retrieval.py``) part of the mass goes to the tracks the on-device retrievers find for the
conversation. ``export/calibrate.py`` fits (alpha, beta) per depth, and the retrieval spec, on held-out
conversations (least negative log-likelihood of the true spans) and stores them beside the delta
(``span_calibration.json``); ``model_build`` writes them into the GGUF under ``talkplay.span_calibration``;
the runtime reads them from there (or from ``$TALKPLAY_SPAN_CALIBRATION``, "off" to disable). Without one,
a span step scores with the model's log-probabilities over the whole vocabulary.

A calibration may carry a second (alpha, beta), ``cold``, for requests with no track played yet in the
conversation (the first turn): there the model has only the user's words to go on and weighs differently
against the prior, so ``export/calibrate.py`` fits it on those spans alone.

It may also weigh more facts about a child, per depth (``export/calibrate.py``, on by default):

    + count[d] * log(tracks below the child)            (the catalog's shape, beside the retrieval prior)
    + played[d] * [a track played in this conversation lies below the child]
    + last[d] * [the track played last lies below the child]
    + named[d] * [a track by an artist named in the user's latest message lies below the child]
    + artist[d] * [a track by the last played track's artist lies below the child]
    + asked[d] * [a track that gives what the request asks lies below the child]
    + genre[d] * [a track of a genre the user's latest message names lies below the child]
    + style[d] * [a track that shares a style (a subgenre, or an artist's genre) with the last played
                  track (and gives what the named, asked and genre marks ask, when the message asks
                  anything) lies below the child]
    + era[d]   * [a track released within ``asks.ERA_YEARS`` of the last played one (and giving what the
                  message asks) lies below the child]

Playlists stay near what they have played: given the cf token, the true tag token is the one a played
track also has far more often than the model alone predicts; and they stay in a style and an era. The
catalog knows a track's subgenres only from training playlists (``catalog_build.training_playlist_view``),
so of the 1,608 follow-ups of the valid conversations 23% have a last track with one, and in 5.5% the
next track shares it (a random track: 0.7%). Its artists' genres (MusicOSet's) reach further: 53% have
one, and in 34% the next track shares one (random: 6.5%). With both, the style holds for 37% of
follow-ups (random: 7%), in a pool of ~5,900 tracks. The next track was released within two years of the
last one 62% of the time (random: 22%). Style and era are defaults, not
requests: they mark only the tracks that also give what the message asks, so "switch to rock" after a rap
track is not outweighed by the rap tracks. And a request that names an artist ("got
any Billy Joel?") or asks to stay with one ("more from them") is about that artist's tracks, which the
model, trained on few conversations, finds only loosely. Likewise a request for a step ("something
faster", "older", "not them again") or a decade ("from the 80s"): ``asks.Asks`` reads it from the message
and finds the tracks that give it. These marks are per request (``played_marks``, artist names from
``ArtistIndex``); played tracks themselves are never offered again (``trie.Exclusions``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from .asks import denied, deny_through_or
from .catalog import json_strings
from .retrieval import RetrievalSpec

CALIBRATION_KEY = "talkplay.span_calibration"
CALIBRATION_FILE = "span_calibration.json"


@dataclass(frozen=True)
class SpanCalibration:
    """Per-depth ``alpha`` (prior weight) and ``beta`` (inverse temperature); depths past the lists use the
    last entry. ``retrieval`` (``retrieval.RetrievalSpec``), when set, moves part of the prior's mass onto
    the tracks the on-device retrievers find for the conversation; otherwise every track weighs the same."""

    alpha: tuple[float, ...]
    beta: tuple[float, ...]
    retrieval: "RetrievalSpec | None" = None
    cold: "SpanCalibration | None" = None  # (alpha, beta) for a request with no track played yet
    count: tuple[float, ...] = ()  # per depth: weight of log(tracks below the child); () = none
    played: tuple[float, ...] = ()  # per depth: weight of "a played track lies below the child"
    last: tuple[float, ...] = ()  # per depth: weight of "the last played track lies below the child"
    named: tuple[float, ...] = ()  # per depth: weight of "a track by an artist the message names lies below"
    artist: tuple[float, ...] = ()  # per depth: weight of "a track by the last played track's artist lies below"
    asked: tuple[float, ...] = ()  # per depth: weight of "a track that gives what the request asks lies below"
    genre: tuple[float, ...] = ()  # per depth: weight of "a track of a genre the message names lies below"
    style: tuple[float, ...] = ()  # per depth: weight of "a track sharing a style with the last played lies below"
    era: tuple[float, ...] = ()  # per depth: weight of "a track from near the last played one's year lies below"

    FEATURES = ("count", "played", "last", "named", "artist", "asked", "genre", "style", "era")

    @classmethod
    def parse(cls, value) -> "SpanCalibration | None":
        """From a JSON string or a dict ``{"alpha": [...], "beta": [...]}``; None, "" or "off" give None."""
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "off", "none")):
            return None
        try:
            d = json.loads(value) if isinstance(value, str) else dict(value)
            alpha, beta = tuple(float(a) for a in d["alpha"]), tuple(float(b) for b in d["beta"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f'span calibration {value!r}: expected JSON {{"alpha": [...], "beta": [...]}} ({e})') from e
        if not alpha or len(alpha) != len(beta) or not np.isfinite(alpha + beta).all():
            raise ValueError(f"span calibration {value!r}: alpha and beta must be equal-length lists of numbers")
        try:
            retrieval = RetrievalSpec.parse(d.get("retrieval"))
        except ValueError as e:
            raise ValueError(f"span calibration {value!r}: {e}") from e
        features = {}
        for name in cls.FEATURES:
            try:
                w = tuple(float(x) for x in (d.get(name) or ()))
            except (ValueError, TypeError) as e:
                raise ValueError(f'span calibration {value!r}: "{name}" must be a list of numbers ({e})') from e
            if w and (len(w) != len(alpha) or not np.isfinite(w).all()):
                raise ValueError(f'span calibration {value!r}: "{name}" must be as long as alpha, all numbers')
            features[name] = w
        cold = None
        if d.get("cold") is not None:
            c = d["cold"]
            if not isinstance(c, dict):
                raise ValueError(f'span calibration {value!r}: "cold" must be {{"alpha": [...], "beta": [...]}}')
            cold = cls.parse({k: c.get(k) for k in ("alpha", "beta", *cls.FEATURES)})
        return cls(alpha, beta, retrieval, cold, **features)

    def to_dict(self) -> dict:
        d = {"alpha": list(self.alpha), "beta": list(self.beta)}
        for name in self.FEATURES:
            if getattr(self, name):
                d[name] = list(getattr(self, name))
        if self.retrieval is not None:
            d["retrieval"] = self.retrieval.to_dict()
        if self.cold is not None:
            d["cold"] = self.cold.to_dict()
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @property
    def uses_marks(self) -> bool:
        """Whether it weighs any of ``played_marks``' facts, here or in its cold part."""
        return any(any(getattr(self, name)) for name, _ in MARKS) or (self.cold is not None and self.cold.uses_marks)

    @property
    def uses_artists(self) -> bool:
        """Whether it weighs the artist marks (which need an ``ArtistIndex``), here or in its cold part."""
        return any(self.named) or any(self.artist) or (self.cold is not None and self.cold.uses_artists)

    @property
    def uses_asks(self) -> bool:
        """Whether it weighs the ``asked``, ``genre``, ``style`` or ``era`` mark (which need an
        ``asks.Asks``), here or in its cold part."""
        return (any(self.asked) or any(self.genre) or any(self.style) or any(self.era)
                or (self.cold is not None and self.cold.uses_asks))

    def pick(self, cold: bool) -> "SpanCalibration":
        """The (alpha, beta) for a request: ``cold`` (no track played yet) when there is one, else these."""
        return self.cold if cold and self.cold is not None else self

    def uses_logits(self, depth: int) -> bool:
        """Whether a step at ``depth`` reads the model's logits (beta 0 scores by the prior alone, so the
        runtime need not decode before it)."""
        return self.beta[min(depth, len(self.beta) - 1)] != 0.0

    def scores(self, logits: np.ndarray, log_counts: np.ndarray, depth: int, normalise: bool = True,
               log_tracks: np.ndarray | None = None, marks: np.ndarray | None = None) -> np.ndarray:
        """Calibrated log-probabilities of the allowed children (``logits`` and ``log_counts``, the log prior
        mass below each, are theirs; ``log_tracks``, log of the tracks below each, and ``marks``, their
        ``played_marks``, when the calibration weighs them);
        ``normalise=False`` leaves out the shared log-normaliser (enough to pick or sample a child)."""
        d = min(depth, len(self.alpha) - 1)
        s = self.beta[d] * np.asarray(logits, dtype=np.float64) + self.alpha[d] * np.asarray(log_counts, dtype=np.float64)
        if self.count and self.count[d] and log_tracks is not None:
            s = s + self.count[d] * np.asarray(log_tracks, dtype=np.float64)
        if marks is not None:
            for name, bit in MARKS:
                w = getattr(self, name)
                if w and w[d]:
                    s = s + (w[d] / bit) * (marks & bit)
        if not normalise:
            return s
        m = s.max()
        return s - (m + np.log(np.exp(s - m).sum()))


PLAYED, LAST, NAMED, ARTIST, ASKED, GENRE, STYLE, ERA = 1, 2, 4, 8, 16, 32, 64, 128  # ``played_marks``' bits
MARKS = (("played", PLAYED), ("last", LAST), ("named", NAMED), ("artist", ARTIST), ("asked", ASKED),
         ("genre", GENRE), ("style", STYLE), ("era", ERA))  # weight name, its bit (all 8 of a uint8)


class ArtistIndex:
    """The catalog's artists, for the artist marks: which tracks each artist name has (every credited artist
    of a track), each track's main artist, and the artists a message names. Compact: the tracks of all
    names in one array (CSR by name), the main artist of every track in another.

    ``named(message)`` finds names as whole words: a name of two or more words in any case ("billy joel"); a
    one-word name only as the catalog spells it and not as the message's first word ("Queen", "U2"; not
    "Play some rock"), since many one-word names are common words; not a name only denied ("no more Drake",
    ``asks.denied``; "no more Drake or Future" denies both)."""

    MAX_WORDS = 6

    def __init__(self, names: Iterable[tuple[int, list[str]]]):
        """``names``: (track index, its credited artists, main one first) per track (read once)."""
        self.keys: dict[str, int] = {}  # lower-case name -> name id
        self.one_word: set[str] = set()  # one-word names as the catalog spells them
        name_of, track_of, main = [], [], {}
        for track, artists in names:
            for i, a in enumerate(artists):
                key = " ".join(a.lower().split())
                if not key:
                    continue
                k = self.keys.setdefault(key, len(self.keys))
                name_of.append(k)
                track_of.append(track)
                if " " not in key:
                    self.one_word.add(a.strip())
                if i == 0:
                    main.setdefault(track, k)
        n, t = np.asarray(name_of, dtype=np.int32), np.asarray(track_of, dtype=np.int32)
        order = np.lexsort((t, n))
        self._tracks = t[order]
        self._offsets = np.searchsorted(n[order], np.arange(len(self.keys) + 1)).astype(np.int64)
        self._names = list(self.keys)
        self._main = np.full(max(main, default=-1) + 1, -1, dtype=np.int32)
        for track, k in main.items():
            self._main[track] = k

    @classmethod
    def from_catalog(cls, catalog, track_index: dict[str, int]) -> "ArtistIndex":
        # rows are read as the index is built, not gathered first: a list of every track's names would
        # leave ~20 MB of fragmented heap behind once freed
        names = ((track_index[tid], json_strings(artists) or ([artist] if artist else []))
                 for tid, artist, artists in catalog.rows("id, artist, artists") if tid in track_index)
        return cls(names)

    def main_of(self, track: int) -> str | None:
        """The track's main artist (lower case), or None."""
        k = int(self._main[track]) if 0 <= track < len(self._main) else -1
        return self._names[k] if k >= 0 else None

    def named(self, message: str) -> list[str]:
        """The artist names (lower case) a message names (and does not deny)."""
        return self.mentions(message)[0]

    def denied(self, message: str) -> list[str]:
        """The artist names (lower case) a message names only to deny them ("no more Drake", "skip Queen")."""
        return self.mentions(message)[1]

    def mentions(self, message: str) -> tuple[list[str], list[str]]:
        """(``named(message)``, ``denied(message)``) in one reading."""
        words = re.findall(r"[^\s,;:!?()\"“”]+", message or "")
        words = [w.strip(".'’") or w for w in words]
        low = [w.lower() for w in words]
        hits = []  # [first word, end, name, denied]
        for n in range(1, min(self.MAX_WORDS, len(words)) + 1):
            for i in range(len(words) - n + 1):
                key = " ".join(low[i:i + n])
                if key in self.keys and (n > 1 or (i > 0 and words[i] in self.one_word)):
                    hits.append([i, i + n, key, denied(" ".join(low[:i]))])
        deny_through_or(hits, lambda a, b: " ".join(low[a:b]))  # "no more Drake or Future"
        found = {key for _, _, key, no in hits if not no}
        return sorted(found), sorted({key for _, _, key, no in hits if no} - found)

    def tracks_of(self, names) -> np.ndarray:
        """Track indices by any of ``names`` (lower case)."""
        ids = [self.keys[k] for k in names if k in self.keys]
        parts = [self._tracks[self._offsets[k]:self._offsets[k + 1]] for k in ids]
        return np.unique(np.concatenate(parts)).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def played_marks(trie, track_index: dict[str, int], history: list[dict],
                 artists: ArtistIndex | None = None, asks=None, unplayed_only: bool = True) -> np.ndarray | None:
    """Per trie node: bit ``PLAYED`` when a track played in the conversation so far (its assistant turns'
    ``track_ids``) lies below it, bit ``LAST`` when the last turn's first track does; with ``artists``,
    bit ``NAMED`` when a track by an artist the latest user message names does and bit ``ARTIST`` when a
    track by the last played track's main artist does; with ``asks`` (``asks.Asks``), bit ``ASKED`` when a
    track that gives what the latest message asks does, bit ``GENRE`` when a track of a genre it names
    does and bit ``STYLE`` when a track sharing a subgenre with the last played track, and giving all the
    message asks of those three (an artist, a step or decade or mood, a genre), does. Those five
    marks count only the tracks not played yet (``unplayed_only``; the runtime never offers a played one
    again), so the last track's own branch is not marked for its artist or style by itself. None when no
    node has a bit."""
    from .baselines import played_ids, user_turns

    played = [track_index[t] for t in played_ids(history) if t in track_index]
    marked: list[tuple[np.ndarray, int]] = []
    if played:
        last = next(track_index[t] for turn in reversed(history) if turn.get("role") == "assistant"
                    for t in (turn.get("track_ids") or []) if t in track_index)
        marked += [(np.asarray(played, dtype=np.int64), PLAYED), (np.asarray([last], dtype=np.int64), LAST)]
        main = artists.main_of(last) if artists is not None else None
        if main is not None:
            marked.append((artists.tracks_of([main]), ARTIST))
    if artists is not None:
        named = artists.tracks_of(artists.named((user_turns(history) or [""])[-1]))
        if len(named):
            marked.append((named, NAMED))
    if asks is not None:
        asked = asks.asked_tracks(history)
        if asked is not None and len(asked):
            marked.append((asked, ASKED))
        genre = asks.genre_tracks(history)
        if genre is not None and len(genre):
            marked.append((genre, GENRE))
        within = None  # the tracks that give all the message asks (named, asked, genre), when it asks any
        for tracks, bit in marked:
            if bit in (NAMED, ASKED, GENRE):
                gives = np.zeros(trie.n_tracks, dtype=bool)
                gives[tracks] = True
                within = gives if within is None else within & gives
        for default, bit in ((asks.style_tracks(history) if played else None, STYLE),
                             (asks.era_tracks(history) if played else None, ERA)):
            if default is not None and within is not None:  # a default holds within what is asked, never against it
                default = default[within[default]]
            if default is not None and len(default):
                marked.append((default, bit))
    if played and unplayed_only:  # a mark of what to offer next: played tracks are never offered again
        done = np.asarray(played, dtype=np.int64)
        marked = [(t if bit in (PLAYED, LAST) else t[~np.isin(t, done)], bit) for t, bit in marked]
        marked = [(t, bit) for t, bit in marked if len(t)]
    if not marked:
        return None
    return trie.mark_ancestors(marked)


def is_cold(history: list[dict]) -> bool:
    """Whether a conversation so far has no track played (no assistant turn with a track): the first turn."""
    from .baselines import played_ids

    return not played_ids(history)


def log_track_counts(trie) -> np.ndarray:
    """log(tracks below each trie node): the prior's term, indexed by node id (computed once per trie)."""
    return np.log(np.maximum(trie.count, 1).astype(np.float64))


def calibration_file(delta_path: Path) -> Path:
    """Where a delta's calibration lives: ``span_calibration.json`` in a delta directory, or
    ``<name>.span_calibration.json`` beside a single-file delta."""
    delta_path = Path(delta_path)
    return delta_path / CALIBRATION_FILE if delta_path.is_dir() else delta_path.with_name(f"{delta_path.stem}.{CALIBRATION_FILE}")


def read_calibration(delta_path: Path) -> SpanCalibration | None:
    """The calibration stored with a delta, or None (a malformed file raises ValueError naming it)."""
    f = calibration_file(delta_path)
    if not f.is_file():
        return None
    try:
        return SpanCalibration.parse(json.loads(f.read_text()))
    except ValueError as e:
        raise ValueError(f"{f}: {e}") from e
