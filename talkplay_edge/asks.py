"""What a request asks of the next track, and which catalog tracks give it.

A follow-up such as "something faster", "a bit older" or "not them again" asks for a step away from the
track just played; "anything from the 80s?" asks for a decade. The span calibration weighs this as one
more mark (``calibration.ASKED``: a track that gives what the request asks lies below the child), so a
model trained on few conversations still moves the way the listener asked.

    ASKS             kind -> (track attribute, direction, least step): faster, slower, more/less energy,
                     happier, sadder, more/less acoustic, more danceable, older, newer
    OTHER_ARTIST     another artist than the last track's
    SAME_ARTIST      the last track's artist again ("more from them", "same artist, different song")
    SIMILAR          more like the last track ("more like this", "love it, another one like that"): the
                     ``NEAR_COUNT`` tracks nearest to it in sound (energy, danceability, valence,
                     acousticness, tempo / 100) in the whole catalog; the style mark (below) then favours
                     those of them that share a style with it
    decade_of(msg)   the decade a message names ("80s", "1980s", "eighties", "noughties", "2010s"), or None
    moods_of(msg)    the moods a message names ("mellow", "upbeat", "danceable"...: ``conversations.MOODS``,
                     each a threshold on one audio feature: "mellow" is energy <= 0.45)
    genres_in(msg, names)  the catalog genres a message asks for, longest first ("latin hip hop", not "latin";
                     "electronic" for "edm"; not "less EDM")
    genres_denied(msg, names)  the genres it names only to deny them ("less EDM", "no more pop or rap"); the
                     runtime leaves their tracks out of that answer (``Asks.denied_genre_tracks``)
    cues_of(msg)     the cue features of a message (``CUES``: everyday words for each direction, so
                     "quicker", "speed it up" and "pick up the pace" read alike; "too quick" is its own cue)
    AskHead          a linear classifier over the MiniLM sentence embedding of the user's latest message,
                     its words and its cues -> the kind of step it asks for (or "none"); trained by ``python
                     -m export.asks`` on the training conversations' intents, shipped as
                     ``models/ask_head.npz`` (~110 KB). The words matter: MiniLM puts "something older" and
                     "something newer" close together, a word ("older") tells them apart; the cues carry a
                     step to phrasings whose words the training never used.
    Asks             the catalog's attributes + the head: ``asked_tracks(history)`` -> track indices, or None

A genre the latest message names is its own mark (``calibration.GENRE``, ``Asks.genre_tracks``): the
tracks with that genre or subgenre. So is the style a session is in (``calibration.STYLE``,
``Asks.style_tracks``): the tracks that share a style with the last played track, a style being a
subgenre (which training playlists give a track) or a genre of its artists (MusicOSet's), kept apart
(``style_names``). And so is its era (``calibration.ERA``, ``Asks.era_tracks``): the tracks released
within ``ERA_YEARS`` of the last one. ``played_marks`` keeps of those two only the tracks that also give
what the message asks. A mood counts towards the asked mark when the message asks no step ("something
mellow", not "too mellow" or "something more upbeat than this").

The head answers only when it is sure (probability >= ``threshold``, default 0.5): a wrong step rules out
the tracks the listener wanted, a missed one only leaves the model on its own.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import sys
from pathlib import Path

import numpy as np

from .catalog import json_strings
from .conversations import MOODS

ASKS: dict[str, tuple[str, int, float]] = {
    "faster": ("tempo", 1, 8.0), "slower": ("tempo", -1, 8.0),
    "more_energy": ("energy", 1, 0.1), "less_energy": ("energy", -1, 0.1),
    "happier": ("valence", 1, 0.15), "sadder": ("valence", -1, 0.15),
    "more_acoustic": ("acousticness", 1, 0.15), "less_acoustic": ("acousticness", -1, 0.15),
    "more_danceable": ("danceability", 1, 0.1),
    "older": ("year", -1, 2.0), "newer": ("year", 1, 2.0),
}
OTHER_ARTIST = "other_artist"
SAME_ARTIST = "same_artist"
SIMILAR = "similar"
NONE = "none"
KINDS = (NONE, *sorted(ASKS), OTHER_ARTIST, SAME_ARTIST, SIMILAR)  # the head's classes, in this order
NEAR_FEATURES = (("energy", 1.0), ("danceability", 1.0), ("valence", 1.0), ("acousticness", 1.0), ("tempo", 0.01))
NEAR_COUNT = 2000  # how many tracks "more like this" asks for (fitted on valid: see docs/results.md)
ERA_YEARS = 2  # the era a session is in: tracks released this many years or fewer from the last one
ATTRIBUTES = sorted({a for a, _, _ in ASKS.values()} | {f for f, _, _ in MOODS.values()})
HEAD_FILE = Path(__file__).parent / "models" / "ask_head.npz"
TRAIN_COMMAND = "python -m export.asks --write"

_TENS = {"twenties": 20, "thirties": 30, "forties": 40, "fifties": 50, "sixties": 60, "seventies": 70,
         "eighties": 80, "nineties": 90}
_DECADE = re.compile(r"(?<![\w])(?:(19|20)([0-9])0s|'?([0-9])0s|(twenties|thirties|forties|fifties|sixties|seventies|"
                     r"eighties|nineties)|(noughties|aughts|two[- ]thousands)|(twenty[- ]tens))(?![\w])", re.I)


def decade_of(message: str) -> int | None:
    """The first decade ``message`` names, as its first year (1980 for "80s", "1980s", "'80s", "eighties";
    2000 for "2000s", "noughties"; 2010 for "2010s", "twenty-tens"); None when it names none. A bare "20s"
    or "10s" reads as the 1920s / 1910s, the usual sense. A decade only denied ("not from the 80s") is none."""
    m = next((m for m in _DECADE.finditer(message or "") if not denied(message[:m.start()])), None)
    if not m:
        return None
    century, tens, short, word, noughties, tens_word = m.groups()
    if century:
        return int(century) * 100 + int(tens) * 10
    if short:
        return 1900 + int(short) * 10
    if word:
        return 1900 + _TENS[word.lower()]
    return 2000 if noughties else 2010


def _phrase_text(text: str) -> str:
    """Lower case, hyphens and punctuation (but ``&`` and ``'``) as spaces, padded: for whole-phrase search."""
    return " " + " ".join(re.sub(r"[^\w&']+", " ", (text or "").lower().replace("-", " ")).split()) + " "


def _without(message: str, phrases: list[str]) -> str:
    """``message`` as phrase text (``_phrase_text``) with each of ``phrases`` blanked out."""
    for phrase in phrases:
        message = _phrase_text(message).replace(_phrase_text(phrase), "  ")
    return message


def _mentions(message: str, phrases) -> list[tuple[object, bool]]:
    """What the ``phrases`` (an iterable, or a mapping phrase -> what it names) ``message`` holds as whole words
    name, longest phrase first, each with whether a denial comes before it (``denied``); a phrase inside a
    longer one found (``hip hop`` in ``latin hip hop``) does not count again."""
    table = phrases if isinstance(phrases, dict) else {p: p for p in phrases}
    text, hits = _phrase_text(message), []
    for phrase in sorted(table, key=lambda p: (-len(p), p)):
        key = _phrase_text(phrase)
        if not key.strip():
            continue
        while (i := text.find(key)) >= 0:
            hits.append([i, i + len(key), table[phrase], denied(text[:i])])
            text = text[:i] + " " + "_" * (len(key) - 2) + " " + text[i + len(key):]  # a word, no phrase's
    deny_through_or(hits, lambda a, b: text[a:b])
    return [(name, no) for _, _, name, no in hits]


_OR = re.compile(r"\s*(or|nor)\s*")


def deny_through_or(hits: list[list], gap) -> None:
    """Carry a denial on through "or" / "nor": ``hits`` are [start, end, name, denied] mentions of a message
    (any order; changed in place); in the message's order, one whose ``gap(end, start)`` from the last denied
    one is just "or" / "nor" is denied too ("no more pop or rap", "no more Drake or Future")."""
    denied_to = -1  # the end of the last denied mention
    for hit in sorted(hits, key=lambda h: (h[0], h[1])):
        hit[3] = hit[3] or (denied_to >= 0 and _OR.fullmatch(gap(denied_to, hit[0])) is not None)
        if hit[3]:
            denied_to = max(denied_to, hit[1])


def _phrases_in(message: str, phrases, skip_denied: bool = False) -> list:
    """What the ``phrases`` ``message`` holds name (``_mentions``), each once; with ``skip_denied``, not one
    named only after a denial."""
    found = []
    for name, no in _mentions(message, phrases):
        if not (skip_denied and no) and name not in found:
            found.append(name)
    return found


_MOOD_WORDS = {w: mood for mood, (_, _, words) in MOODS.items() for w in words}
_TOO = re.compile(r"\btoo\b", re.I)


def moods_of(message: str) -> list[str]:
    """The moods (``MOODS`` keys) a message names by one of their words, e.g. ["mellow"] for "something
    chill"; a message that finds something *too* much names none ("too mellow" asks for the opposite)."""
    if _TOO.search(message or ""):
        return []
    return sorted(_phrases_in(message, _MOOD_WORDS))


def mood_holds(mood: str, values: dict[str, np.ndarray]) -> np.ndarray:
    """Bool per track: ``mood`` holds for its audio feature (a track without the value: False)."""
    feature, predicate, _ = MOODS[mood]
    v = values[feature]
    known = ~np.isnan(v)
    out = np.zeros(len(v), dtype=bool)
    out[known] = predicate(v[known].astype(np.float64))  # compares elementwise, in float64 like float(x)
    return out


# everyday words for a genre the catalog names otherwise (used when the catalog has the genre)
GENRE_WORDS = {"electronic": "edm", "electronica": "edm", "electronic dance music": "edm", "dance music": "edm"}
# a genre, artist or decade named right after one of these is not asked for ("less EDM", "no more rock",
# "enough of the pop", "not so electronic", "something that isn't dance music", "away from rap", "no more Drake",
# "skip Drake", "not from the 80s", "no songs from the 90s", "instead of / other than latin")
_DENIALS = {"less", "fewer", "no", "not", "never", "enough", "without", "isn't", "isnt", "aren't", "arent", "t",
            "avoid", "skip", "except", "besides", "instead", "away"}  # "t": "isn’t" with a typographic apostrophe
_DENIAL_SKIP = {"so", "too", "much", "any", "more", "of", "the", "this", "that", "all", "very", "really", "a", "bit",
                "little", "lot", "as", "from", "by", "song", "songs", "track", "tracks", "music", "stuff", "one", "ones",
                "anything", "something"}


def denied(before: str) -> bool:
    """Whether the words ``before`` a name deny it: the last of them that is not a filler word
    (``_DENIAL_SKIP``: "no more songs by", "not from the") is a denial (``_DENIALS``), or "other than"."""
    words = [w.strip(".,;:!?\"'“”‘’") for w in before.lower().replace("’", "'").split()]
    words = [w for w in words if w]
    j = len(words) - 1
    while j >= 0 and words[j] in _DENIAL_SKIP:
        j -= 1
    if j < 0:
        return False
    return words[j] in _DENIALS or (words[j] == "than" and j >= 1 and words[j - 1] in ("other", "rather"))


def genres_in(message: str, names, words: dict[str, str] | None = None) -> list[str]:
    """The genre ``names`` (lower case, as the catalog has them) a message asks for as whole words ("R&B",
    "hip-hop" and "Hip Hop" alike), a longer name before the shorter ones inside it; ``words`` (default
    ``GENRE_WORDS``: "electronic" for "edm") name a genre too. A genre only denied ("less EDM", "no more
    rock") is not asked for."""
    return _phrases_in(message, _genre_table(names, words), skip_denied=True)


def _genre_table(names, words: dict[str, str] | None = None) -> dict[str, str]:
    """Phrase -> the genre name it names: the ``names`` themselves and the ``words`` (default ``GENRE_WORDS``)
    for those of them the catalog has."""
    names = set(names)
    table = {w: g for w, g in (GENRE_WORDS if words is None else words).items() if g in names}
    table.update({n: n for n in names})
    return table


def genres_denied(message: str, names, words: dict[str, str] | None = None) -> list[str]:
    """The genre ``names`` a message names only to deny them ("no more country", "less EDM", "skip the
    jazz"), found as ``genres_in`` finds them; one it also asks for elsewhere in the message is not denied."""
    found = _mentions(message, _genre_table(names, words))
    asked = {g for g, no in found if not no}
    out = []
    for g, no in found:
        if no and g not in asked and g not in out:
            out.append(g)
    return out


class AskHeadError(RuntimeError):
    pass


_WORD = re.compile(r"[a-z0-9']+")


def words_of(message: str) -> set[str]:
    """The lower-case words of a message (the head's word features)."""
    return set(_WORD.findall((message or "").lower()))


# Cue words: everyday words and phrases for each direction a step can take, written from plain English (their
# author had read training phrasings, never test_unseen's). The head's words only know the words of the phrasings it was trained on; a
# cue maps "quicker", "speed it up" and "pick up the pace" to one feature (``cue:fast``), so a phrasing it
# never saw still reads as a step when it says it in other words. A cue after "too" ("too quick for me")
# or after "less" / "not as" ("less intense") is its own feature (``cue:too_fast``, ``cue:less_energetic``):
# the head learns from its training phrasings which way those point.
CUES: dict[str, str] = {
    "fast": "fast faster quick quicker speedy speedier rapid brisk uptempo fast-paced pacey | speed up | "
            "speed it up | speed things up | pick up the pace | pick it up | up the tempo | higher tempo | "
            "faster tempo | more bpm | higher bpm",
    "slow": "slow slower sluggish leisurely unhurried downtempo draggy slow-paced | slow down | slow it down | "
            "slow things down | lower tempo | lower the tempo | slower tempo | less bpm | lower bpm | "
            "bring the tempo down | take it slow | ease off",
    "energetic": "energetic energy intense intensity hype hyped pumped louder harder heavier powerful punchy "
                 "lively livelier wilder rowdy amped fierce aggressive | turn it up | kick it up",
    "calm": "mellow mellower calm calmer chill chiller relaxed relaxing gentle gentler soft softer quiet quieter "
            "low-key lowkey sleepy laid-back laidback soothing peaceful tranquil subdued | laid back | "
            "tone it down | turn it down | bring it down | energy down | bring the energy down | wind down | "
            "take it easy",
    "happy": "happy happier cheerful cheery sunny sunnier upbeat joyful joyous bright brighter uplifting "
             "positive feel-good optimistic | feel good",
    "sad": "sad sadder melancholic melancholy gloomy gloomier dark darker somber sombre emotional depressing "
           "heartbroken bleak mournful downbeat moody moodier",
    "acoustic": "acoustic unplugged organic stripped stripped-down raw | stripped down | stripped back",
    "produced": "produced polished slick slicker studio processed | more production | big production",
    "dance": "danceable dancey dancing dancefloor groovy groovier groove funky funkier bouncy bouncier "
             "rhythmic | dance floor | to dance to | move to",
    "old": "older oldie oldies earlier retro vintage throwback dated | back in time | further back | go back | "
           "older stuff | old school",
    "new": "newer recent latest modern fresher current later nowadays | more recent | these days | "
           "fast forward | closer to now | closer to today",
    "other_artist": "| different artist | another artist | other artist | someone else | somebody else | "
                    "change the artist | new artist | switch artists | not them | not him | not her | "
                    "not this artist | different singer | different band",
    "same_artist": "| same artist | same band | same singer | more from | more by | another one by | "
                   "another song by | another track by | this artist | that artist | by them | from them",
    "similar": "similar alike | same vibe | same feel | same style | same sound | same kind | same mood | "
               "same energy | like this | like that | like this one | like that one | more of this | "
               "more of that | more of the same | more like | along those lines | along the same lines | "
               "in that vein | same vein | this vibe | "
               "that vibe | that sound | this sound | another one like",
}
# what a cue asks for when the head has nothing to say (``AskHead.read`` with ``cue_fallback``); a "too_" or
# "less_" cue asks for the opposite step
CUE_KINDS = {"fast": "faster", "slow": "slower", "energetic": "more_energy", "calm": "less_energy",
             "happy": "happier", "sad": "sadder", "acoustic": "more_acoustic", "produced": "less_acoustic",
             "dance": "more_danceable", "old": "older", "new": "newer", "other_artist": OTHER_ARTIST,
             "same_artist": SAME_ARTIST, "similar": SIMILAR}
OPPOSITE = {"faster": "slower", "more_energy": "less_energy", "happier": "sadder", "more_acoustic": "less_acoustic",
            "older": "newer"}
OPPOSITE.update({b: a for a, b in OPPOSITE.items()})
_CUE_PHRASES = sorted(((" " + " ".join(p.replace("-", " ").split()) + " ", cue) for cue, spec in CUES.items()
                       for part in (spec.split("|")[0].split(), spec.split("|")[1:]) for p in part if p.strip()),
                      key=lambda pc: (-len(pc[0]), pc[0]))
_CUE_RULES = 3  # the version of how cues_of reads them: part of CUE_TABLE
CUE_TABLE = hashlib.sha256(json.dumps([CUES, _CUE_RULES], sort_keys=True).encode()).hexdigest()[:16]  # heads record it
_INTENSIFIERS = {"way", "much", "far", "really", "very", "so", "a", "bit", "little", "lot", "damn", "darn", "kind",
                 "of", "kinda", "just", "slightly", "somewhat", "even"}


@functools.lru_cache(maxsize=4096)  # the head's features and its fallback read the same message's cues
def cues_of(message: str) -> frozenset[str]:
    """The cue features of a message (``CUES``), e.g. {"cue:fast", "cue:too_slow"} for "Way too sluggish,
    speed it up"; longer phrases first, each word counted once. The word before a cue (past intensifiers:
    "way", "a bit", ...) makes it ``too_``: "too", or ``less_``: "less", "fewer", "not", "not as"."""
    text = _phrase_text(message).replace("'", " ")
    found = set()
    for phrase, cue in _CUE_PHRASES:
        while (i := text.find(phrase)) >= 0:
            before = text[:i].split()
            j = len(before) - 1
            while j >= 0 and before[j] in _INTENSIFIERS:
                j -= 1
            word = before[j] if j >= 0 else ""
            if word == "as" and j >= 1 and before[j - 1] == "not":
                word = "not"
            prefix = "too_" if word == "too" else "less_" if word in ("less", "fewer", "not", "t", "never") else ""
            found.add("cue:" + prefix + cue)
            text = text[:i] + " " * (len(phrase) - 1) + text[i + len(phrase) - 1:]
    return frozenset(found)


def cue_kind(message: str) -> str:
    """The one kind of step a message's cues ask for ("too quick" asks slower), or ``NONE`` when they ask
    for none or for more than one; "more like this" (``SIMILAR``) beside one step asks for that step."""
    kinds = set()
    for cue in cues_of(message):
        name = cue.removeprefix("cue:")
        prefix, _, base = name.partition("_")
        if prefix in ("too", "less") and base in CUE_KINDS:
            kind = OPPOSITE.get(CUE_KINDS[base])
        else:
            kind = CUE_KINDS.get(name)
        if kind:
            kinds.add(kind)
    if len(kinds) == 2 and SIMILAR in kinds:  # "like this, but faster": the step says more than the likeness
        kinds.discard(SIMILAR)
    return kinds.pop() if len(kinds) == 1 else NONE


class AskHead:
    """Softmax regression ``p = softmax(scale · [x, word_weight · w, cue_weight · c] @ W + b)`` over
    ``KINDS``: ``x`` the message's L2-normalised sentence embedding, ``w`` which of the head's ``words`` it
    has and ``c`` which of its ``cues`` (``cues_of``), each scaled to unit length. It keeps the encoder's
    name and version it was trained against, and the cue table's (``CUE_TABLE``)."""

    def __init__(self, W: np.ndarray, b: np.ndarray, kinds: tuple[str, ...] = KINDS, scale: float = 10.0,
                 encoder: str = "", encoder_version: str = "", words: tuple[str, ...] = (),
                 word_weight: float = 0.0, cues: tuple[str, ...] = (), cue_weight: float = 0.0,
                 cue_table: str = CUE_TABLE, cue_fallback: bool = False):
        W, b = np.asarray(W, dtype=np.float32), np.asarray(b, dtype=np.float32)
        if (W.ndim != 2 or W.shape[1] != len(kinds) or b.shape != (len(kinds),)
                or W.shape[0] <= len(words) + len(cues)):
            raise AskHeadError(f"ask head: W {W.shape}, b {b.shape}, {len(words)} words and {len(cues)} cues do "
                               f"not fit {len(kinds)} kinds")
        unknown = [k for k in kinds if k not in KINDS]
        if unknown:
            raise AskHeadError(f"ask head: unknown kinds {unknown}")
        self.W, self.b, self.kinds, self.scale = W, b, tuple(kinds), float(scale)
        self.encoder, self.encoder_version = encoder, encoder_version
        self.words, self.word_weight = tuple(words), float(word_weight)
        self.cues, self.cue_weight, self.cue_fallback = tuple(cues), float(cue_weight), bool(cue_fallback)
        if (self.cues or self.cue_fallback) and cue_table != CUE_TABLE:
            raise AskHeadError(f"ask head: trained with another cue table ({cue_table}, this code has "
                               f"{CUE_TABLE}); retrain it with `{TRAIN_COMMAND}`")
        self._word_index = {w: i for i, w in enumerate(self.words)}
        self._cue_index = {c: i for i, c in enumerate(self.cues)}

    @property
    def dim(self) -> int:
        """The sentence embedding's width."""
        return self.W.shape[0] - len(self.words) - len(self.cues)

    def features(self, embeddings: np.ndarray, messages: list[str] | None = None) -> np.ndarray:
        """[n, dim + words + cues] inputs: the embeddings, then the messages' word indicators and cue
        indicators (each block unit length, times ``word_weight`` / ``cue_weight``); without messages,
        embeddings alone (a head with no words or cues)."""
        x = np.asarray(embeddings, dtype=np.float32)
        if not self.words and not self.cues:
            return x
        if messages is None or len(messages) != len(x):
            raise AskHeadError("ask head: this head reads the messages' words too; pass them")
        blocks = [x]
        for index, weight, read in ((self._word_index, self.word_weight, words_of),
                                    (self._cue_index, self.cue_weight, cues_of)):
            f = np.zeros((len(x), len(index)), dtype=np.float32)
            for r, m in enumerate(messages):
                cols = [index[t] for t in read(m) if t in index]
                if cols:
                    f[r, cols] = weight / np.sqrt(len(cols))
            blocks.append(f)
        return np.concatenate(blocks, 1)

    def probabilities(self, embeddings: np.ndarray, messages: list[str] | None = None) -> np.ndarray:
        """[n, kinds] class probabilities of [n, dim] embeddings (and their ``messages``, for the words)."""
        s = self.scale * (self.features(embeddings, messages) @ self.W) + self.b
        s = s - s.max(1, keepdims=True)
        e = np.exp(s)
        return e / e.sum(1, keepdims=True)

    def read(self, embeddings: np.ndarray, messages: list[str] | None = None, threshold: float = 0.5) -> list[str]:
        """The kind each message asks for: the most probable kind where its probability is at least
        ``threshold``, else ``NONE``; with ``cue_fallback``, a message the head reads as ``NONE`` whose cues
        ask for one kind (``cue_kind``) asks for that kind."""
        p = self.probabilities(embeddings, messages)
        best = p.argmax(1)
        out = [self.kinds[k] if p[r, k] >= threshold else NONE for r, k in enumerate(best)]
        if self.cue_fallback and messages is not None:
            out = [k if k != NONE else cue_kind(m) for k, m in zip(out, messages)]
        return out

    def save(self, path) -> None:
        np.savez_compressed(path, W=self.W, b=self.b, kinds=np.array(self.kinds), scale=np.float32(self.scale),
                 encoder=np.array(self.encoder), encoder_version=np.array(self.encoder_version),
                 words=np.array(self.words, dtype=str), word_weight=np.float32(self.word_weight),
                 cues=np.array(self.cues, dtype=str), cue_weight=np.float32(self.cue_weight),
                 cue_table=np.array(CUE_TABLE), cue_fallback=np.bool_(self.cue_fallback))

    @classmethod
    def load(cls, path=None) -> "AskHead":
        path = Path(path) if path is not None else HEAD_FILE
        if not path.is_file():
            raise AskHeadError(f"ask head not found: {path}; train it with `{TRAIN_COMMAND}`")
        try:
            with np.load(path) as z:
                cues = tuple(str(c) for c in z["cues"]) if "cues" in z else ()  # heads before the cues
                fallback = bool(z["cue_fallback"]) if "cue_fallback" in z else False
                return cls(z["W"], z["b"], tuple(str(k) for k in z["kinds"]), float(z["scale"]),
                           str(z["encoder"]), str(z["encoder_version"]), tuple(str(w) for w in z["words"]),
                           float(z["word_weight"]), cues, float(z["cue_weight"]) if cues else 0.0,
                           str(z["cue_table"]) if cues or fallback else CUE_TABLE, fallback)
        except (OSError, ValueError, KeyError) as e:
            raise AskHeadError(f"{path}: not an ask head ({e}); train it with `{TRAIN_COMMAND}`") from e


def style_names(row) -> tuple[str, ...]:
    """A catalog row's styles: its subgenres (``"sub:latin hip hop"``, from training playlists) and its
    artists' genres (``"artist:dance pop"``, MusicOSet's); one interned string each, so tracks share them."""
    return tuple(sorted({sys.intern(f"{kind}:{' '.join(g.lower().split())}")
                         for kind, column in (("sub", "subgenres"), ("artist", "artist_genres"))
                         for g in json_strings(row[column]) if g.strip()}))


class Asks:
    """The tracks a request asks for: ``Asks(catalog, track_index, head, embed, artists=None)``;
    ``embed(texts)`` gives the head's sentence embeddings (the runtime passes the dense retriever's, which
    has the latest message embedded already). ``artists`` (``calibration.ArtistIndex``) is needed for
    "another artist" and "the same artist"; without it those kinds ask nothing."""

    def __init__(self, catalog, track_index: dict[str, int], head: AskHead, embed, artists=None,
                 threshold: float = 0.5):
        self.head, self.embed, self.artists, self.threshold = head, embed, artists, float(threshold)
        self.track_index = track_index
        n = max(track_index.values(), default=-1) + 1
        self.values = {a: np.full(n, np.nan, dtype=np.float32) for a in ATTRIBUTES}
        genre_tracks: dict[str, list[int]] = {}
        style_tracks: dict[str, list[int]] = {}
        self.styles_of: dict[int, tuple[str, ...]] = {}  # track -> its styles (see style_names)
        for row in catalog.rows("id, genres, subgenres, artist_genres, " + ", ".join(ATTRIBUTES)):
            i = track_index.get(row["id"])
            if i is None:
                continue
            for a in ATTRIBUTES:
                if row[a] is not None:
                    self.values[a][i] = row[a]
            for g in set(json_strings(row["genres"])) | set(json_strings(row["subgenres"])):
                genre_tracks.setdefault(" ".join(g.lower().split()), []).append(i)
            styles = style_names(row)
            if styles:
                self.styles_of[i] = styles
                for g in styles:
                    style_tracks.setdefault(g, []).append(i)
        self.genres = {g: np.asarray(t, dtype=np.int64) for g, t in genre_tracks.items() if g}
        self.styles = {g: np.asarray(t, dtype=np.int64) for g, t in style_tracks.items()}
        self.sounding = np.flatnonzero(~np.isnan(self.values["energy"]))  # the tracks ``near`` ranks
        self._moods: dict[str, np.ndarray] = {}
        self._any_genre: dict[str, np.ndarray] | None = None
        self._genre_text: dict[str, str] = {}

    def kind(self, message: str) -> str:
        """The kind of step ``message`` asks for (``KINDS``), ``NONE`` unless the head is sure."""
        if not message or not message.strip():
            return NONE
        return self.head.read(self.embed([message]), [message], self.threshold)[0]

    def satisfying(self, kind: str, last: int | None) -> np.ndarray | None:
        """Bool per track: gives ``kind`` relative to track ``last``; None when it asks nothing here."""
        if kind == SIMILAR:
            return self.near(last)
        if kind in ASKS and last is not None:
            attribute, sign, step = ASKS[kind]
            v = self.values[attribute]
            if np.isnan(v[last]):
                return None
            with np.errstate(invalid="ignore"):
                return sign * (v - v[last]) >= step  # a track without the attribute gives nothing
        if kind in (OTHER_ARTIST, SAME_ARTIST) and last is not None and self.artists is not None:
            main = self.artists.main_of(last)
            if main is None:
                return None
            ok = np.full(len(self.values["year"]), kind == OTHER_ARTIST, dtype=bool)
            ok[self.artists.tracks_of([main])] = kind == SAME_ARTIST
            return ok
        return None

    def near(self, last: int | None, count: int | None = None) -> np.ndarray | None:
        """Bool per track: one of the ``count`` (default ``NEAR_COUNT``) tracks nearest to ``last`` in sound
        (``NEAR_FEATURES``, squared distance over the features both have) among the tracks with an energy
        value, ``last`` itself left out; None when it has none. Not only those sharing a style with it: a
        track's styles are often unknown (on ``valid``, 94 of 262 "more like this" turns follow a track
        without one), and the style mark weighs the shared ones apart."""
        count = max(0, NEAR_COUNT if count is None else count)
        energy = self.values["energy"]
        if last is None or np.isnan(energy[last]):
            return None
        pool = self.sounding[self.sounding != last]
        d = np.zeros(len(pool))
        for feature, scale in NEAR_FEATURES:
            v = self.values[feature]
            diff = (v[pool].astype(np.float64) - float(v[last])) * scale
            d += np.where(np.isnan(diff), 0.0, diff * diff)
        if 0 < count < len(pool):  # the candidates up to the count-th distance, then the nearest, ties by index
            keep = np.flatnonzero(d <= np.partition(d, count - 1)[count - 1])
            pool, d = pool[keep], d[keep]
        ok = np.zeros(len(energy), dtype=bool)
        ok[pool[np.argsort(d, kind="stable")[:count]]] = True
        return ok

    def asked_tracks(self, history: list[dict]) -> np.ndarray | None:
        """Indices of the tracks that give what the latest user message asks (a decade it names, and the
        step its kind asks from the last played track); None when it asks nothing this can check."""
        from .baselines import user_turns

        message = (user_turns(history) or [""])[-1]
        last = self._last(history)
        ok = None
        decade = decade_of(message)
        if decade is not None:
            year = self.values["year"]
            with np.errstate(invalid="ignore"):
                ok = (year >= decade) & (year < decade + 10)
        kind = self.kind(message) if last is not None else NONE  # a first turn has no track to step from
        step = self.satisfying(kind, last)
        if step is not None:
            ok = step if ok is None else ok & step
        if kind == NONE:  # a mood is what the track is, not a step from the last one
            for mood in moods_of(message):
                holds = self.mood_tracks(mood)
                ok = holds if ok is None else ok & holds
        return None if ok is None else np.flatnonzero(ok)

    def _last(self, history: list[dict]) -> int | None:
        """The index of the last assistant turn's first track (None: none played, or not in the index)."""
        return next((self.track_index.get(t) for turn in reversed(history) if turn.get("role") == "assistant"
                     for t in (turn.get("track_ids") or [])[:1]), None)

    def style_tracks(self, history: list[dict]) -> np.ndarray | None:
        """Indices of the tracks that share a style (``style_names``: a subgenre, or an artist's genre) with
        the last played track (the style a session is in); None on a first turn or when that track has none."""
        return self._in_style(self._last(history))

    def _in_style(self, last: int | None) -> np.ndarray | None:
        """Indices of the tracks that share a style with track ``last`` (itself included); None when it
        has none."""
        styles = self.styles_of.get(last, ()) if last is not None else ()
        if not styles:
            return None
        return np.unique(np.concatenate([self.styles[g] for g in styles]))

    def era_tracks(self, history: list[dict]) -> np.ndarray | None:
        """Indices of the tracks released within ``ERA_YEARS`` of the last played track (the era a session is
        in; itself included); None on a first turn or when that track has no year."""
        last = self._last(history)
        if last is None or np.isnan(self.values["year"][last]):
            return None
        with np.errstate(invalid="ignore"):
            return np.flatnonzero(np.abs(self.values["year"] - self.values["year"][last]) <= ERA_YEARS)

    def mood_tracks(self, mood: str) -> np.ndarray:
        """Bool per track: ``mood`` (a ``MOODS`` key) holds for it."""
        if mood not in self._moods:
            self._moods[mood] = mood_holds(mood, self.values)
        return self._moods[mood]

    def denied_genre_tracks(self, message: str) -> np.ndarray | None:
        """Indices of the tracks of a genre ``message`` names only to deny it ("no more country"): every track
        whose genres, subgenres or artists' genres have a name that holds it as whole words ("country":
        country, contemporary country, country rock); None when it denies none. An artist's name it names
        or denies is no genre ("no more Pop Smoke" denies no pop)."""
        if self._any_genre is None:  # every genre name the catalog has -> its tracks (built on first use)
            names: dict[str, list[np.ndarray]] = {}
            for g, tracks in self.genres.items():
                names.setdefault(g, []).append(tracks)
            for style, tracks in self.styles.items():
                kind, _, g = style.partition(":")
                if kind == "artist":
                    names.setdefault(g, []).append(tracks)
            self._any_genre = {g: np.unique(np.concatenate(t)) for g, t in names.items()}
            self._genre_text = {g: _phrase_text(g) for g in self._any_genre}
        if self.artists is not None:
            message = _without(message, [n for names in self.artists.mentions(message) for n in names])
        denied = genres_denied(message, self._any_genre)
        if not denied:
            return None
        denied += [GENRE_WORDS[g] for g in denied if g in GENRE_WORDS]  # "electronic", some artists' genre, is edm too
        texts = {_phrase_text(g) for g in denied}
        return np.unique(np.concatenate([self._any_genre[g] for g, text in self._genre_text.items()
                                         if any(d in text for d in texts)]))

    def genre_tracks(self, history: list[dict]) -> np.ndarray | None:
        """Indices of the tracks with a genre (or subgenre) the latest user message names; None when it
        names none. Words of an artist's name it names are not a genre ("like Pop Smoke" asks no pop)."""
        from .baselines import user_turns

        message = (user_turns(history) or [""])[-1]
        if self.artists is not None:
            message = _without(message, self.artists.named(message))
        named = genres_in(message, self.genres)
        if not named:
            return None
        return np.unique(np.concatenate([self.genres[g] for g in named]))
