"""On-device chat: a GGUF model (llama-cpp-python) whose music spans are constrained to catalog tracks.

    tp = TalkPlay.load(model="model.gguf", catalog="catalog.db", threads=2)
    session = tp.chat()
    reply = session.send("something calm for a rainy evening", on_text=print)
    reply.text, reply.tracks          # the reply and the recommended Track(s)

Decoding (see ``chat_format`` for the exact token format):

- Outside a music span every music token is masked out, except ``<|music_start|>`` as the first token of
  the assistant turn (the format puts the span first). Once the model opens a span (or the runtime forces
  one at the start of the turn, ``force_span=True``, the default, so an untrained model still recommends),
  every step may only pick children of the current node of a prefix
  trie over the catalog's codes (``trie.CodeTrie``), minus subtrees whose tracks were all recommended
  earlier in the session, so each span resolves to a real, new track. The mask is applied by gathering
  the logits of the allowed ids only (O(children)); token ids are mapped to tracks by the runtime, never
  by detokenizing (llama.cpp drops long control tokens).
- A span step scores the allowed children with the model's log-probabilities, or, when the GGUF carries a
  span calibration (``calibration.py``; ``span_calibration=`` or ``$TALKPLAY_SPAN_CALIBRATION`` override
  it, "off" disables it), with the calibrated mix of the model and a prior over the tracks: every track
  equal, or, when the calibration has a retrieval spec (``retrieval.py``), weighted towards the tracks that
  BM25, MiniLM and item2vec retrieve for the conversation so far (computed once per request).
- After ``<|music_end|>`` the runtime writes the track's real title, artist and year
  (``chat_format.render_track_context``) into the context and the model continues with the reply.
- The reply guard (``guard=True``, the default): as the reply is written, ``claims.ClaimReader`` reads what it
  says of the track (a genre, a sound word, the year, the BPM) and takes back what the catalog does not bear
  out. A false genre or sound word inside the description ("— a moody gangster rap track") has the
  description written again from the catalog's facts (``ClaimReader.describe``: "a high-energy upbeat
  contemporary country track"), or the reply end before it when the catalog has none; a wrong year or BPM
  is written right; anything else returns the KV cache to the token that began it and bans that token (and
  every other beginning of a false phrase of its kind, from there on). At most ``MAX_BACKOFFS`` per reply.
  ``on_text`` only gets text no later claim can reach back into (``ClaimReader.settled``: the stream waits
  at a description or a number still being written).
- Greedy by default; ``temperature``/``top_k`` with a ``seed`` sample instead. ``send(..., n=5)`` ranks
  five tracks by beam search over the trie (parallel llama.cpp sequences sharing the prompt's KV cells);
  the best one becomes the turn's span.
- When the catalog is exhausted for a session, the session **stops recommending**: the turn has no span,
  ``Reply.tracks`` is empty and ``Reply.exhausted`` is True (``reset()`` starts over).
- The KV cache is kept across turns: each call prefills only the tokens after the longest prefix shared
  with what the context already holds. When the context would overflow, the oldest turns are dropped
  (system prompt and the most recent turns kept, so the recent tracks stay in view; the session's
  exclusion list keeps every track) and the compacted prompt is re-prefilled. An over-long message keeps
  its end.

Threads: one ``TalkPlay`` (one llama context) can serve several sessions from several threads. A lock
serialises all use of the llama context (a turn holds it from prefill to the last token, ``on_text``
callbacks run under it); each session keeps its own token history, and because prefill starts at the
common prefix of the session's tokens and the tokens the KV cache holds, a session always continues from
its own history even when another session used the context in between. Switching sessions copies the
outgoing session's KV cells out and the incoming one's back in (``session_cache_mb``, default 128 MB, for
the most recently used sessions), so a switch costs a memory copy, not a re-prefill of the conversation;
a session whose snapshot was evicted re-prefills from the shared system prompt.

Memory: the KV cache holds keys and values as ``kv_cache`` (``$TALKPLAY_KV_CACHE``), ``q8_0`` by default:
half the memory of ``f16`` (24 instead of 45 MB at 2,048 tokens for SmolLM2-135M, and session snapshots
with it) for the same recommendations within noise; f16 prefills long messages faster on CPU (q8_0 needs
llama.cpp's flash attention). llama.cpp quantises the cache in blocks of 32 values, so q8_0 needs attention
heads a multiple of 32 wide: another model gets f16 by default, and a clear error when q8_0 was asked for.
The trie is built from the catalog's codes as they are read (no code is kept).
"""

from __future__ import annotations

import codecs
import ctypes
import itertools
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from . import chat_format as cf
from .calibration import CALIBRATION_KEY, ArtistIndex, SpanCalibration, is_cold, log_track_counts, played_marks
from .asks import AskHead, Asks
from .baselines import user_turns
from .retrieval import RetrievalPrior
from .catalog import Catalog, Track, corrupt
from .claims import ClaimReader, article
from .gguf_check import GGUFError, check_gguf
from .tokens import SPAN_END, SPAN_START
from .trie import Exclusions, catalog_trie

FINGERPRINT_KEY = "talkplay.vocab_fingerprint"
SPAN_MAX_TOKENS = 8  # start + 5 modality tokens + dup + end
CONTEXT_MAX_TOKENS = 96  # room reserved for the written track context
MAX_BACKOFFS = 8  # false claims the reply guard takes back per reply; later ones stay (and are counted by eval)


class _Written:
    """The text tokens of a reply being written, with what each one left (bytes, decoded characters, the UTF-8
    decoder's state), so that the reply guard can take the last ones back; ``banned`` holds, per position,
    the tokens taken back there."""

    def __init__(self):
        self.tokens: list[int] = []
        self.text = bytearray()
        self.chars = ""  # the text decoded so far (an incomplete UTF-8 character at the end waits)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._after: list[tuple[int, int, tuple]] = []  # per token: bytes, characters, decoder state after it
        self.banned: dict[int, set[int]] = {}
        self.banned_on: dict[int, set[int]] = {}  # per position, tokens banned there and at every later one
        self.streamed = 0  # characters given to on_text
        self.kv0 = self.gen0 = None  # where the text starts in the KV cache and in the turn's tokens (once begun)
        # the reply guard: claims before kept_from stay as written; its take-backs and time
        self.kept_from, self.backoffs, self.guard_s = 0, 0, 0.0
        self.rewritten = False  # the reply guard wrote the description from the catalog
        self.done = False  # the reply guard ended the reply

    def add(self, token: int, piece: bytes) -> None:
        self.tokens.append(token)
        self.text += piece
        self.chars += self._decoder.decode(piece)
        self._after.append((len(self.text), len(self.chars), self._decoder.getstate()))

    def char_start(self, j: int) -> int:
        return self._after[j - 1][1] if j else 0

    def token_at(self, char: int) -> int:
        """The index of the token that wrote character ``char``."""
        return next(j for j, (_, c, _) in enumerate(self._after) if c > char)

    def take_back(self, j: int) -> None:
        """Forget tokens j.. (and what was banned after position j)."""
        nbytes, nchars, state = self._after[j - 1] if j else (0, 0, (b"", 0))
        del self.tokens[j:], self._after[j:], self.text[nbytes:]
        self.chars = self.chars[:nchars]
        self._decoder.setstate(state)
        self.banned = {k: v for k, v in self.banned.items() if k <= j}
        self.banned_on = {k: v for k, v in self.banned_on.items() if k <= j}

    def bans(self) -> set[int]:
        """The tokens banned at the next position."""
        k = len(self.tokens)
        out = set(self.banned.get(k, ()))
        for on, tokens in self.banned_on.items():
            if on <= k:
                out |= tokens
        return out

    def stream(self, on_text, upto: int) -> None:
        """Give ``on_text`` the characters up to ``upto``, or up to the start of the token that wrote it (a
        token taken back must not have been streamed, not even the space it begins with)."""
        if upto < len(self.chars):
            upto = self.char_start(self.token_at(upto))
        if on_text is not None and upto > self.streamed:
            on_text(self.chars[self.streamed:upto])
        self.streamed = max(self.streamed, upto)

    def finish(self) -> str:
        self.chars += self._decoder.decode(b"", final=True)
        return self.chars


class ModelCatalogMismatch(Exception):
    """The model's music vocabulary is not the catalog's (fingerprints differ)."""


class ModelNotFound(FileNotFoundError):
    """No model file given and no default model available."""


@dataclass
class Reply:
    text: str
    tracks: list[Track] = field(default_factory=list)
    exhausted: bool = False  # the catalog had no track left to recommend in this session
    timings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"text": self.text, "tracks": [t.to_dict() for t in self.tracks], "exhausted": self.exhausted,
                "timings": self.timings}


def _quiet_llama() -> None:
    """Route llama.cpp's log through llama-cpp-python's logger at ERROR level (no load chatter)."""
    try:
        from llama_cpp import _logger

        _logger.set_verbose(False)
    except Exception:  # pragma: no cover
        pass


def default_model() -> Path:
    """``$TALKPLAY_MODEL``, else the embedded model (``talkplay_edge.paths.default_model_path()``), else a clear
    ModelNotFound."""
    import os

    from . import paths

    env = os.environ.get("TALKPLAY_MODEL")
    fn = getattr(paths, "default_model_path", None)
    path = Path(env) if env else (fn() if fn else None)
    if path is None or not Path(path).is_file():
        where = f" (looked for {path})" if path else ""
        raise ModelNotFound("no model given and no default model found" + where + ": pass one with --model PATH "
                            "(model=... in Python, or set $TALKPLAY_MODEL); build one with the GGUF export "
                            "(export/gguf.py)")
    return Path(path)


# ggml types of the KV cache (ggml.h); a quantised V cache needs flash attention, which llama.cpp turns on
# by itself on CPU ("auto")
KV_CACHE_TYPES = {"f16": 1, "q8_0": 8}
DEFAULT_KV_CACHE = "q8_0"


class TalkPlay:
    """A loaded model + catalog. ``chat()`` opens a session; thread-safe (see the module docstring)."""

    def __init__(self, model_path: str | Path, catalog: Catalog, *, threads: int = 2, n_ctx: int = 2048,
                 n_batch: int = 512, max_beam: int = 32, session_cache_mb: float = 128.0, verbose: bool = False,
                 span_calibration: "SpanCalibration | str | None" = None, kv_cache: str | None = None):
        import llama_cpp
        from llama_cpp import _internals

        t0 = time.perf_counter()
        asked = kv_cache or os.environ.get("TALKPLAY_KV_CACHE")
        self.kv_cache = asked or DEFAULT_KV_CACHE
        if self.kv_cache not in KV_CACHE_TYPES:
            raise ValueError(f"KV cache type {self.kv_cache!r} (kv_cache= or $TALKPLAY_KV_CACHE): expected one of "
                             f"{', '.join(KV_CACHE_TYPES)}")
        self.model_path = Path(model_path)
        self.catalog = catalog
        if not self.model_path.is_file():
            raise ModelNotFound(f"{self.model_path}: model not found (pass --model PATH)")
        if not verbose:
            _quiet_llama()
        self._llama_cpp = llama_cpp
        try:  # a damaged file is refused here: llama.cpp aborts the process on some damage
            info = check_gguf(self.model_path)
        except OSError as e:
            raise ModelNotFound(f"{self.model_path}: cannot read the model ({e.strerror or e})") from e
        model_fp = str(info.metadata.get(FINGERPRINT_KEY, ""))
        if model_fp != catalog.fingerprint:
            have = f"vocabulary fingerprint {model_fp[:16]}…" if model_fp else f"no {FINGERPRINT_KEY}"
            raise ModelCatalogMismatch(
                f"model {self.model_path} ({have}) does not match catalog {catalog.path} (fingerprint "
                f"{catalog.fingerprint[:16]}…): the model was exported for another music vocabulary. Pass the "
                "catalog the model was trained with (--catalog), or re-export/retrain the model on this catalog.")
        mparams = llama_cpp.llama_model_default_params()
        try:
            self.model = _internals.LlamaModel(path_model=str(self.model_path), params=mparams, verbose=verbose)
        except ValueError as e:
            raise GGUFError(f"{self.model_path}: not a loadable GGUF model ({e}); delete the file so it is "
                            "rebuilt, or pass another with --model") from e
        self.metadata = self.model.metadata()
        self.vocab = self.model.vocab
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))

        # -- token ids of the music vocabulary and of the template markers ---------------------------
        self.music_ids: dict[str, int] = {}
        buf = (llama_cpp.llama_token * 8)()
        for tok in catalog.vocabulary:
            raw = tok.encode()
            k = llama_cpp.llama_tokenize(self.vocab, raw, len(raw), buf, 8, False, True)
            ids = list(buf[:k]) if k > 0 else []
            if len(ids) != 1:
                raise ModelCatalogMismatch(f"model {self.model_path} has no single token for {tok} "
                                           f"(catalog {catalog.path}); re-export the model for this catalog")
            self.music_ids[tok] = ids[0]
        self.start_id, self.end_id = self.music_ids[SPAN_START], self.music_ids[SPAN_END]
        if self.start_id in self.model.tokenize(SPAN_START.encode(), add_bos=False, special=False):
            raise ModelCatalogMismatch(f"model {self.model_path}: music tokens are not control tokens, so user text "
                                       "could spell them; re-export the model (added tokens must be special)")
        music = np.array(sorted(self.music_ids.values()), dtype=np.int64)
        self._mask_in_text = music[music != self.start_id]  # masked outside spans
        self._music_set = set(int(i) for i in music)
        self.im_start = self._single(cf.IM_START)
        self.im_end = self._single(cf.IM_END)
        # a reply ends at any end-of-generation or other control token (<|im_end|>, <|endoftext|>, <|im_start|>...)
        self.stop_ids = {self.im_end, self.im_start}
        for i in range(self.n_vocab):
            if i not in self._music_set and (llama_cpp.llama_vocab_is_control(self.vocab, i)
                                             or llama_cpp.llama_vocab_is_eog(self.vocab, i)):
                self.stop_ids.add(i)

        # -- the trie over the catalog's codes ------------------------------------------------------------
        try:  # read row by row: no code is kept once the trie is built
            self.track_ids, self.trie = catalog_trie(catalog.iter_codes(), self.music_ids, self.end_id)
        except sqlite3.DatabaseError as e:
            raise corrupt(catalog.path, e) from e
        except KeyError as e:  # a code token outside the catalog's vocabulary
            raise corrupt(catalog.path, ValueError(e.args[0])) from e
        self.track_index = {tid: i for i, tid in enumerate(self.track_ids)}
        self._track_cache: dict[int, Track] = {}
        # the span calibration: given, else $TALKPLAY_SPAN_CALIBRATION, else the model's own (GGUF metadata)
        source = "span_calibration="
        if span_calibration is None and os.environ.get("TALKPLAY_SPAN_CALIBRATION"):
            span_calibration, source = os.environ["TALKPLAY_SPAN_CALIBRATION"], "$TALKPLAY_SPAN_CALIBRATION"
        elif span_calibration is None:
            span_calibration, source = self.metadata.get(CALIBRATION_KEY), f"{self.model_path} ({CALIBRATION_KEY})"
        try:
            self.calibration = (span_calibration if isinstance(span_calibration, SpanCalibration)
                                else SpanCalibration.parse(span_calibration))
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from e
        self._log_count = log_track_counts(self.trie) if self.calibration is not None else None
        # the catalog's artists: for the artist marks (when the calibration weighs them), and for the artists a
        # request denies ("no more Drake": their tracks are left out of that answer, ``turn_exclusions``)
        self.artists = ArtistIndex.from_catalog(catalog, self.track_index)
        self.retrieval = (RetrievalPrior(catalog, self.trie, self.track_index, self.calibration.retrieval, threads)
                          if self.calibration is not None and self.calibration.retrieval is not None else None)
        if self.retrieval is not None:
            self.retrieval.load()  # the retrievers load now (their index and vectors), not on the first request
        # what a request asks ("something faster", "from the 80s", "something mellow") and the genres it
        # names, when the calibration weighs them: the head reads the dense retriever's embedding of the
        # message (already computed for the prior)
        self.asks = None
        if self.calibration is not None and self.calibration.uses_asks:
            if self.retrieval is not None:
                embed = self.retrieval.hybrid.dense.embed
            else:
                from .text_encoder import TextEncoder

                embed = TextEncoder(threads=threads).encode
            self.asks = Asks(catalog, self.track_index, AskHead.load(), embed, self.artists)

        # -- the llama context: one main sequence (0) plus 2 × max_beam beam sequences -----------------
        self.max_beam = max(1, int(max_beam))
        self.max_beam = min(self.max_beam, (int(llama_cpp.llama_max_parallel_sequences()) - 1) // 2)
        self.n_seq_max = 1 + 2 * self.max_beam
        n_batch = max(int(n_batch), self.n_seq_max)  # llama.cpp aborts when n_batch < n_seq_max
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = int(n_ctx)
        cparams.n_batch = int(n_batch)
        cparams.n_ubatch = int(n_batch)
        cparams.n_threads = cparams.n_threads_batch = int(threads)
        cparams.n_seq_max = self.n_seq_max
        cparams.kv_unified = True
        cparams.type_k = cparams.type_v = KV_CACHE_TYPES[self.kv_cache]
        cparams.no_perf = True
        try:
            self.ctx = _internals.LlamaContext(model=self.model, params=cparams, verbose=verbose)
        except ValueError as e:
            if self.kv_cache == "f16":
                raise
            if asked:  # llama.cpp quantises K and V in blocks of 32 values: each head's size must be a multiple
                raise ValueError(f"{self.model_path}: llama.cpp cannot make a {self.kv_cache} KV cache for this model "
                                 f"({e}); use kv_cache='f16' (TALKPLAY_KV_CACHE=f16)") from e
            self.kv_cache = "f16"  # the default falls back
            cparams.type_k = cparams.type_v = KV_CACHE_TYPES["f16"]
            self.ctx = _internals.LlamaContext(model=self.model, params=cparams, verbose=verbose)
        self.n_ctx = int(llama_cpp.llama_n_ctx(self.ctx.ctx))
        self.n_batch = int(llama_cpp.llama_n_batch(self.ctx.ctx))  # llama.cpp may lower it (to n_ctx); larger aborts
        self._mem = llama_cpp.llama_get_memory(self.ctx.ctx)
        self._batch = llama_cpp.llama_batch_init(max(self.n_batch, self.max_beam), 0, self.n_seq_max)
        self._kv: list[int] = []  # tokens held by sequence 0 of the KV cache, positions 0..len-1
        self._lock = threading.RLock()
        # sessions sharing the context: the one whose tokens sequence 0 holds, and snapshots of the others'
        self._owner: int | None = None
        self._snapshots: "OrderedDict[int, tuple[bytes, list[int]]]" = OrderedDict()  # session id -> (KV, tokens)
        self.session_cache_bytes = int(session_cache_mb * 2**20)
        self.snapshot_stats = {"saved": 0, "restored": 0, "evicted": 0}
        self.threads = threads
        # what replies say of their track, read against this catalog (the reply guard, ``ChatSession.send``)
        try:
            self.claim_reader = ClaimReader.from_catalog(catalog)
        except sqlite3.DatabaseError as e:
            raise corrupt(catalog.path, e) from e
        self._phrase_starts: dict[tuple[str, ...], set[int]] = {}  # a phrase -> its first tokens as a reply writes it
        self.load_seconds = time.perf_counter() - t0

    def false_starts(self, kind: str, track: Track, previous: Track | None = None) -> set[int]:
        """The tokens that begin a phrase of ``kind`` (genre, sound, relation: ``claims.ClaimReader``) that does
        not hold for ``track`` (after ``previous``), save those that also begin one that does (" hip" for hip
        hop and hip pop)."""
        false, true = set(), set()
        for words, holds in self.claim_reader.holding(kind, track, previous).items():
            if words not in self._phrase_starts:
                text = " ".join(words)
                variants = {text, text.capitalize(), text.title(), text.upper()}
                self._phrase_starts[words] = {ids[0] for v in variants if (ids := self.tokenize(" " + v))}
            (true if holds else false).update(self._phrase_starts[words])
        return false - true

    # ------------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, model: str | Path | None = None, catalog: str | Path | Catalog | None = None, threads: int = 2,
             **kw) -> "TalkPlay":
        """Load a model (default: the embedded one) and a catalog (default: the embedded catalog.db)."""
        cat = catalog if isinstance(catalog, Catalog) else Catalog.open(catalog)
        try:
            return cls(model if model is not None else default_model(), cat, threads=threads, **kw)
        except BaseException:
            if not isinstance(catalog, Catalog):
                cat.close()
            raise

    def chat(self, system: str | None = None, **kw) -> "ChatSession":
        """A new conversation (see ``ChatSession`` for the options)."""
        return ChatSession(self, system=system, **kw)

    def close(self) -> None:
        with self._lock:
            if self._batch is not None:
                self._llama_cpp.llama_batch_free(self._batch)
                self._batch = None
            self.ctx.close()
            self.model.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- tokens -----------------------------------------------------------------------------------------
    def _single(self, text: str) -> int:
        ids = self.model.tokenize(text.encode(), add_bos=False, special=True)
        if len(ids) != 1:
            raise ValueError(f"{self.model_path}: {text} is not one token in this model (not a ChatML model?)")
        return ids[0]

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        return self.model.tokenize(text.encode("utf-8", "replace"), add_bos=False, special=special) if text else []

    def tokenize_segments(self, segments: Sequence[tuple[str, bool]]) -> list[int]:
        out: list[int] = []
        for text, special in segments:
            out += self.tokenize(text, special)
        return out

    def piece(self, token: int) -> bytes:
        """The bytes of one (text) token; control tokens give b''."""
        buf = ctypes.create_string_buffer(64)
        n = self._llama_cpp.llama_token_to_piece(self.vocab, token, buf, 64, 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._llama_cpp.llama_token_to_piece(self.vocab, token, buf, -n, 0, False)
        return buf.raw[:max(n, 0)]

    def track(self, index: int) -> Track:
        t = self._track_cache.get(index)
        if t is None:
            try:
                t = self.catalog.get(self.track_ids[index])
            except sqlite3.DatabaseError as e:
                raise corrupt(self.catalog.path, e) from e
            if t is None:
                raise KeyError(f"{self.catalog.path}: track {self.track_ids[index]} has a code but no row")
            self._track_cache[index] = t
        return t

    # -- llama context ------------------------------------------------------------------------------------
    def _decode(self, tokens: Sequence[int], pos: int, seq: int = 0) -> np.ndarray:
        """Decode ``tokens`` at positions pos.. on ``seq``; return the last token's logits (a view)."""
        lc, b = self._llama_cpp, self._batch
        for s in range(0, len(tokens), self.n_batch):
            chunk = tokens[s:s + self.n_batch]
            b.n_tokens = len(chunk)
            for i, t in enumerate(chunk):
                b.token[i] = int(t)
                b.pos[i] = pos + s + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = seq
                b.logits[i] = 0
            b.logits[len(chunk) - 1] = 1
            rc = lc.llama_decode(self.ctx.ctx, b)
            if rc != 0:
                self._kv = []
                lc.llama_memory_clear(self._mem, True)
                raise RuntimeError(f"llama_decode failed ({rc}) at position {pos + s} of {self.n_ctx}")
        return self._logits(len(tokens[s:s + self.n_batch]) - 1)

    def _logits(self, i: int) -> np.ndarray:
        ptr = self._llama_cpp.llama_get_logits_ith(self.ctx.ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def _sync(self, tokens: list[int]) -> np.ndarray:
        """Make sequence 0 hold exactly ``tokens``; prefill only past the common prefix. Returns the logits
        after the last token."""
        if not tokens:
            raise ValueError("nothing to decode")
        if len(tokens) > self.n_ctx:
            raise RuntimeError(f"{len(tokens)} tokens do not fit the context ({self.n_ctx})")
        kv = self._kv
        p, m = 0, min(len(kv), len(tokens))
        while p < m and kv[p] == tokens[p]:
            p += 1
        p = min(p, len(tokens) - 1)  # the last token is always decoded again for its logits
        self._llama_cpp.llama_memory_seq_rm(self._mem, -1, p, -1)
        self._kv = kv[:p]
        logits = self._decode(tokens[p:], p)
        self._kv = list(tokens)
        return logits

    def _append(self, tokens: Sequence[int]) -> np.ndarray:
        """Decode ``tokens`` after what sequence 0 holds."""
        if not tokens:
            raise ValueError("nothing to decode")
        if len(self._kv) + len(tokens) > self.n_ctx:
            raise RuntimeError(f"context full ({self.n_ctx} tokens)")
        logits = self._decode(tokens, len(self._kv))
        self._kv.extend(int(t) for t in tokens)
        return logits

    # -- sessions sharing the context ----------------------------------------------------------------------
    def _switch_to(self, session_id: int) -> None:
        """Make sequence 0 hold ``session_id``'s tokens when a snapshot of them exists (call under the lock).

        The outgoing session's KV cells are copied out (``llama_state_seq_get_data``) and the incoming one's
        copied back, so switching sessions costs a memory copy instead of re-prefilling the whole
        conversation, and the restored cells are bit-identical to the ones the session computed.
        Snapshots are kept for the most recently used sessions within ``session_cache_mb``; a session
        without one re-prefills from the prefix it shares with what the context holds (always correct)."""
        if self._owner == session_id:
            return
        lc, ctx = self._llama_cpp, self.ctx.ctx
        old = self._owner
        if old is not None and self._kv and self.session_cache_bytes > 0:
            size = int(lc.llama_state_seq_get_size(ctx, 0))
            if 0 < size <= self.session_cache_bytes:
                buf = (ctypes.c_uint8 * size)()
                n = int(lc.llama_state_seq_get_data(ctx, buf, size, 0))
                if n > 0:
                    self._snapshots[old] = (bytes(memoryview(buf)[:n]), list(self._kv))
                    self._snapshots.move_to_end(old)
                    self.snapshot_stats["saved"] += 1
                    while sum(len(b) for b, _ in self._snapshots.values()) > self.session_cache_bytes:
                        self._snapshots.popitem(last=False)
                        self.snapshot_stats["evicted"] += 1
        self._owner = session_id
        snap = self._snapshots.pop(session_id, None)
        if snap is None:
            return
        data, tokens = snap
        lc.llama_memory_seq_rm(self._mem, -1, -1, -1)
        self._kv = []
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        if int(lc.llama_state_seq_set_data(ctx, buf, len(data), 0)) > 0:
            self._kv = tokens
            self.snapshot_stats["restored"] += 1
        else:  # could not restore: start clean (the prompt is re-prefilled)
            lc.llama_memory_seq_rm(self._mem, -1, -1, -1)

    def _forget(self, session_id: int) -> None:
        self._snapshots.pop(session_id, None)

    # -- constrained span decoding -----------------------------------------------------------------------
    def _beam(self, logits: np.ndarray, excl: Exclusions, n: int, width: int | None = None,
              log_prior: np.ndarray | None = None, cold: bool = False,
              marks: np.ndarray | None = None) -> list[tuple[int, float]]:
        """Rank up to ``n`` tracks by beam search over the trie, starting from ``logits`` (the state after
        ``<|music_start|>`` on sequence 0). Returns [(track index, log-prob)], best first. Sequence 0 is left
        as it was."""
        lc = self._llama_cpp
        room = (self.n_ctx - len(self._kv)) // SPAN_MAX_TOKENS  # each beam needs up to one span of KV cells
        if room < 1:
            raise RuntimeError(f"no room left in the context ({self.n_ctx} tokens) for a music span")
        width = max(1, min(self.max_beam, width or n, room))
        finished: list[tuple[float, int]] = []
        base = len(self._kv)
        beams = [(0.0, 0, 0)]  # (score, node, seq)
        row = {0: np.asarray(logits, dtype=np.float64).copy()}  # seq -> logits row (copied: decode overwrites)
        bank = 0
        try:
            depth = 0
            while beams:
                cands: list[tuple[float, int, int]] = []
                for score, node, seq in beams:
                    lg = row[seq]
                    toks, kids = excl.allowed(node)
                    if len(toks) == 0:
                        continue
                    lp = self.span_scores(lg, toks, kids, depth, log_prior=log_prior, cold=cold, marks=marks)
                    keep = np.argsort(-lp)[:width]
                    cands += [(score + float(lp[k]), int(kids[k]), seq) for k in keep]
                cands.sort(key=lambda c: -c[0])
                live = []
                for sc, node, seq in cands:
                    if len(live) >= width:
                        break
                    if self.trie.track[node] >= 0:
                        finished.append((sc, int(self.trie.track[node])))
                    else:
                        live.append((sc, node, seq))
                finished.sort(key=lambda f: -f[0])
                if len(finished) >= n and (not live or live[0][0] <= finished[n - 1][0]):
                    break
                if not live:
                    break
                # advance the live beams one token on fresh sequences of the other bank
                bank ^= 1
                first = 1 + bank * self.max_beam
                for j in range(self.max_beam):
                    lc.llama_memory_seq_rm(self._mem, first + j, -1, -1)
                b = self._batch
                b.n_tokens = len(live)
                for j, (sc, node, seq) in enumerate(live):
                    lc.llama_memory_seq_cp(self._mem, seq, first + j, -1, -1)
                    b.token[j] = int(self.trie.token[node - 1])
                    b.pos[j] = base + depth
                    b.n_seq_id[j] = 1
                    b.seq_id[j][0] = first + j
                    b.logits[j] = 1
                rc = lc.llama_decode(self.ctx.ctx, b)
                if rc != 0:
                    raise RuntimeError(f"llama_decode failed ({rc}) in beam search")
                row = {first + j: np.asarray(self._logits(j), dtype=np.float64).copy() for j in range(len(live))}
                beams = [(sc, node, first + j) for j, (sc, node, seq) in enumerate(live)]
                depth += 1
        finally:
            for s in range(1, self.n_seq_max):
                lc.llama_memory_seq_rm(self._mem, s, -1, -1)
        return [(t, s) for s, t in finished[:n]]

    def pick_span(self, excl: Exclusions, logits: np.ndarray, pick: Callable[[np.ndarray], int],
                  log_prior: np.ndarray | None = None, cold: bool = False,
                  marks: np.ndarray | None = None) -> tuple[list[int], int, list[int], float]:
        """One track, picked step by step over the trie from ``logits`` (the state after ``<|music_start|>``):
        at each step ``pick`` chooses among the allowed children's ``span_scores`` (argmax, or a sample), as a
        chat turn does. Returns (the span's tokens, the track's index, its last tokens not yet decoded, the
        seconds spent choosing). A forced step, or one whose calibration reads no logits, is not decoded
        before the next step that needs them."""
        path: list[int] = []
        undecoded: list[int] = []
        node, chose = 0, 0.0
        while self.trie.track[node] < 0:
            toks, kids = excl.allowed(node)
            if len(toks) == 1:  # a forced step needs no logits: decode it later, in one batch
                k = 0
            else:
                if undecoded and self.uses_logits(len(path), cold):  # (a beta-0 step needs none either)
                    logits = self._append(undecoded)
                    undecoded = []
                tm = time.perf_counter()
                k = pick(self.span_scores(logits, toks, kids, len(path), normalise=False, log_prior=log_prior,
                                          cold=cold, marks=marks))
                chose += time.perf_counter() - tm
            path.append(int(toks[k]))
            node = int(kids[k])
            undecoded.append(path[-1])
        return path, int(self.trie.track[node]), undecoded, chose

    def span_scores(self, logits: np.ndarray, toks: np.ndarray, kids: np.ndarray, depth: int,
                    normalise: bool = True, log_prior: np.ndarray | None = None, cold: bool = False,
                    marks: np.ndarray | None = None) -> np.ndarray:
        """Log-scores of the allowed children ``kids`` (token ids ``toks``) of a node at ``depth`` of a span:
        the model's log-probabilities, or their calibrated form (``SpanCalibration``; its ``cold`` part when
        ``cold``, a request with no track played yet) with the request's ``log_prior`` (``retrieval_prior``;
        default: every track weighs the same) and ``marks`` (``played_marks``: what the conversation has
        played). ``normalise=False`` leaves out the log-normaliser shared by the children (a greedy pick or a
        sample needs none)."""
        lg = logits[toks.astype(np.int64)]
        if self.calibration is not None:
            cal = self.calibration.pick(cold)
            prior = self._log_count if log_prior is None else log_prior
            return cal.scores(lg, prior[kids], depth, normalise, log_tracks=self._log_count[kids] if cal.count else None,
                              marks=None if marks is None else marks[kids])
        if not normalise:
            return lg
        mx = logits.max()
        return lg - (mx + np.log(np.exp(logits - mx).sum()))

    def uses_logits(self, depth: int, cold: bool = False) -> bool:
        """Whether a span step at ``depth`` is scored with the model's logits (not where the calibration's
        beta is 0)."""
        return self.calibration is None or self.calibration.pick(cold).uses_logits(depth)

    def played_marks(self, history: list[dict]) -> np.ndarray | None:
        """``calibration.played_marks`` of a conversation so far, when the calibration weighs them; else None."""
        if self.calibration is None or not self.calibration.uses_marks:
            return None
        return played_marks(self.trie, self.track_index, history, self.artists, self.asks)

    def retrieval_prior(self, history: list[dict], exclude: Iterable[str] = ()) -> np.ndarray | None:
        """Log prior mass below every trie node for a request (the conversation so far, ending with the user
        message to answer), when the calibration carries a retrieval prior; else None (every track weighs
        the same)."""
        if self.retrieval is None:
            return None
        return self.retrieval.log_mass(history, set(exclude))

    def turn_exclusions(self, excl: Exclusions, message: str) -> Exclusions:
        """``excl`` and, for one answer, the tracks of the artists ``message`` denies ("no more Drake", "skip
        Queen") and, when the calibration reads asks, of the genres it denies ("no more country, some rock");
        ``excl`` itself when it denies none, or when they are all the tracks left."""
        denied = [self.artists.tracks_of(self.artists.denied(message))]
        if self.asks is not None:
            denied.append(self.asks.denied_genre_tracks(message))
        denied = [t for t in denied if t is not None and len(t)]
        if not denied:
            return excl
        turn = excl.copy()
        turn.exclude_many(np.concatenate(denied))
        return excl if turn.exhausted else turn

    def rank(self, excl: Exclusions, logits: np.ndarray, n: int, log_prior: np.ndarray | None = None,
             cold: bool = False, marks: np.ndarray | None = None) -> list[tuple[int, float]]:
        """Up to ``n`` distinct tracks (beam search; reruns excluding what it found until ``n`` or exhausted)."""
        out: list[tuple[int, float]] = []
        ex = excl.copy()
        logits = np.array(logits, dtype=np.float64)  # a copy: the beams' decodes overwrite llama's buffer
        while len(out) < n and not ex.exhausted:
            got = self._beam(logits, ex, n - len(out), width=max(n - len(out), 4), log_prior=log_prior, cold=cold,
                             marks=marks)
            if not got:
                break
            for t, s in got:
                out.append((t, s))
                ex.exclude(t)
        return out


_SESSION_IDS = itertools.count()


class ChatSession:
    """One conversation. ``send`` answers a message; ``more`` ranks further tracks for the last request.

    Options: ``system`` prompt, ``force_span`` (start every assistant turn with a music span; default on),
    ``temperature`` (0 = greedy) / ``top_k`` / ``seed`` for sampling, ``max_new_tokens`` per reply, ``only``
    (recommend only these track ids, e.g. ``indexer.local_track_ids(catalog)``), ``guard`` (take back what a
    reply says of its track that the catalog does not bear out; default on)."""

    def __init__(self, tp: TalkPlay, system: str | None = None, *, force_span: bool = True,
                 temperature: float = 0.0, top_k: int = 0, seed: int | None = None, max_new_tokens: int = 96,
                 only: Iterable[str] | None = None, guard: bool = True):
        self.tp = tp
        self.guard = bool(guard)
        self.id = next(_SESSION_IDS)
        self.only = None if only is None else set(only)  # restrict recommendations to these track ids
        self.system = cf.DEFAULT_SYSTEM if system is None else system
        self.force_span, self.temperature, self.top_k = force_span, float(temperature), int(top_k)
        self.max_new_tokens = int(max_new_tokens)
        self.rng = np.random.default_rng(seed)
        self._system_tokens = tp.tokenize_segments(cf.turn_segments("system", self.system.strip(), content_special=False))
        self.reset()

    def reset(self) -> None:
        """Forget the conversation and the recommended tracks."""
        with self.tp._lock:
            self.tp._forget(self.id)
        self.turns: list[list[int]] = []  # token ids of each finished user+assistant exchange
        self.history: list[dict] = []  # [{"role", "content", ["track_ids"]}] as readable text
        self.excl = Exclusions(self.tp.trie)
        if self.only is not None:  # e.g. --only-local: every other track is excluded up front
            for i, tid in enumerate(self.tp.track_ids):
                if tid not in self.only:
                    self.excl.exclude(i)
        self.recommended: list[str] = []
        self._last_user: list[int] | None = None
        self.compactions = 0

    # -- budget --------------------------------------------------------------------------------------
    def _reserve(self, n: int = 1) -> int:
        """Tokens kept free after the prompt: the reply, a span, the track context, and the beams' cells."""
        beams = min(min(max(n, 4), self.tp.max_beam) * SPAN_MAX_TOKENS, self.tp.n_ctx // 4) if n > 1 else 0
        return self.max_new_tokens + SPAN_MAX_TOKENS + CONTEXT_MAX_TOKENS + 4 + beams

    def _user_block(self, text: str, n: int = 1) -> list[int]:
        """``<|im_start|>user\\n…<|im_end|>\\n<|im_start|>assistant\\n`` with the text as plain tokens, the
        message cut (keeping its end) so that it fits the context with the system prompt."""
        tp = self.tp
        text = cf.normalize_message(text)
        head = tp.tokenize_segments([(cf.IM_START, True), ("user\n", False)])
        tail = tp.tokenize_segments([(cf.IM_END, True), ("\n", False)] + cf.generation_prompt_segments())
        budget = tp.n_ctx - self._reserve(n) - len(self._system_tokens) - len(head) - len(tail)
        if budget < 8:
            raise ValueError(f"the context ({tp.n_ctx} tokens) is too small for a message")
        if len(text) > 16 * budget:  # cheap pre-cut: no token is longer than 16 characters on average
            text = text[-16 * budget:]
        body = tp.tokenize(text, special=False)
        if len(body) > budget:
            body = body[-budget:]
        return head + body + tail

    def _prompt(self, user_block: list[int], n: int = 1) -> list[int]:
        """System + recent turns + this message. When that would not fit, the oldest turns are dropped until
        it takes at most half the usable context, so the (full) re-prefill this costs happens rarely."""
        limit = self.tp.n_ctx - self._reserve(n)
        size = lambda: len(self._system_tokens) + sum(map(len, self.turns)) + len(user_block)  # noqa: E731
        if size() > limit:
            self.compactions += 1
            while self.turns and size() > limit // 2:
                self.turns.pop(0)
        out = list(self._system_tokens)
        for t in self.turns:
            out += t
        return out + user_block

    # -- sampling ------------------------------------------------------------------------------------
    def _pick(self, scores: np.ndarray) -> int:
        """Index into ``scores`` (already masked): argmax, or a temperature/top-k sample."""
        if self.temperature <= 0:
            return int(np.argmax(scores))
        s = np.asarray(scores, dtype=np.float64) / self.temperature
        idx = np.arange(len(s))
        if 0 < self.top_k < len(s):
            idx = np.argpartition(-s, self.top_k - 1)[:self.top_k]
            s = s[idx]
        finite = np.isfinite(s)
        idx, s = idx[finite], s[finite]
        p = np.exp(s - s.max())
        p /= p.sum()
        return int(idx[self.rng.choice(len(p), p=p)])

    # -- the reply guard ----------------------------------------------------------------------------
    def _guard(self, written: _Written, gen: list[int], track: Track, previous: Track | None, budget: int,
               upto: int) -> tuple[np.ndarray | None, int]:
        """The reply guard's step: take back the first false claim of ``written.chars[:upto]`` (at or after
        ``written.kept_from``) if there is one. Returns (the logits after the take-back, or None when nothing
        was taken back; the token budget)."""
        tm = time.perf_counter()
        logits = None
        claim = self.tp.claim_reader.first_false(written.chars[:upto], track, previous, written.kept_from,
                                                 complete=True)
        if claim is not None:
            logits, budget = self._take_back(written, claim, gen, track, previous, budget)
            written.backoffs += logits is not None
        written.guard_s += time.perf_counter() - tm
        return logits, budget

    def _take_back(self, written: _Written, claim, gen: list[int], track: Track, previous: Track | None,
                   budget: int):
        """Take a false claim back. A false genre or sound word in a description ("— a moody gangster rap
        track") has the whole description written again from the catalog's facts (``ClaimReader.describe``),
        or the reply end before it when the catalog has none; a wrong year, BPM or way ("up from 120") is
        written right, and a lead that says "newer" of an older track is written again as "From 2005:"; a
        lyrics theme the catalog does not hold becomes the track's own, or goes, and the reply ends there
        (``Claim.instead``). Anything else returns to the token that began it and bans that token there, and
        every beginning of a false phrase of its kind from there on. Returns (the logits after it, or None;
        the token budget); a claim already streamed, or one past ``MAX_BACKOFFS``, stays as written (and
        ``kept_from`` moves past it)."""
        tp, reader = self.tp, self.tp.claim_reader
        chars = written.chars
        if written.backoffs >= MAX_BACKOFFS or claim.start < written.streamed:
            written.kept_from = claim.end
            return None, budget
        force, at, ban, stop = None, claim.start, None, False
        if claim.kind in ("genre", "sound") and not written.rewritten:
            start = reader.description_start(chars, claim)
            if start is not None:
                phrase = reader.describe(track)
                cut = None if phrase else reader.description_cut(chars, start)
                if cut is not None and written.char_start(written.token_at(cut[0])) < written.streamed:
                    cut = None  # its lead is out already: say its BPM instead
                if not phrase and cut is None:
                    phrase = reader.describe(track, tempo=True)
                if phrase:
                    at, force = start, f"{article(phrase)} {phrase}"
                elif cut is not None:
                    (at, force), stop = cut, True
        if force is None and claim.instead is not None:  # the true year, BPM, way, lead or theme, if not out yet
            at0 = claim.start if claim.instead_at is None else claim.instead_at
            if written.char_start(written.token_at(at0)) >= written.streamed:
                at, force, stop = at0, claim.instead, claim.ends
        j = written.token_at(at)
        if written.char_start(j) < written.streamed:
            written.kept_from = claim.end
            return None, budget
        if force is not None:
            force = chars[written.char_start(j):at] + force  # what the token began with before the claim
            if stop:
                force = force.rstrip()
            elif not force:  # nothing to write instead ("For lyrics about money:" goes): not what began it
                force = None
        if force is None:
            ban = written.tokens[j]
        budget += len(written.tokens) - j + 1
        kv = tp._kv[:written.kv0 + j]
        del gen[written.gen0 + j:]
        written.take_back(j)
        if force is not None:
            toks = tp.tokenize(force)
            for t in toks:
                written.add(t, tp.piece(t))
            gen += toks
            budget -= len(toks)
            written.rewritten = written.rewritten or claim.kind in ("genre", "sound")
            written.done = stop
            written.kept_from = len(written.chars)
            return tp._sync(kv + toks), budget
        written.banned.setdefault(j, set()).add(ban)
        if claim.kind in ("year", "bpm"):  # no true number to write: none at all
            written.banned[j].update(t for d in "0123456789" for t in tp.tokenize(d)[:1])
        elif claim.kind != "lyrics":  # nor any other false phrase of its kind, there or later
            written.banned_on.setdefault(j, set()).update(tp.false_starts(claim.kind, track, previous))
        return tp._sync(kv), budget

    # -- a turn --------------------------------------------------------------------------------------
    def send(self, message: str, *, n: int = 1, on_text: Callable[[str], None] | None = None,
             on_track: Callable[[Track], None] | None = None) -> Reply:
        """Answer ``message``: a reply and (normally) one track; ``n > 1`` ranks ``n`` tracks by beam search
        (all returned, best first, and all counted as recommended). ``on_track`` gets each track as soon as
        its span resolves (before the reply text), ``on_text`` the reply text as it is generated. An empty
        message raises ``chat_format.EmptyMessageError`` (a ValueError); an over-long one keeps its end."""
        tp = self.tp
        t0 = time.perf_counter()
        if n < 1:
            raise ValueError("n must be at least 1")
        user_block = self._user_block(message, n)
        timings: dict = {}
        with tp._lock:
            tp._switch_to(self.id)
            prompt = self._prompt(user_block, n)
            kv_before = len(tp._kv)
            exhausted = self.excl.exhausted
            forced = self.force_span and not exhausted
            t_pref = time.perf_counter()
            # a forced span's start marker is prefilled with the prompt: one decode call fewer per turn
            logits = tp._sync(prompt + [tp.start_id] if forced else prompt)
            timings["prefill_s"] = time.perf_counter() - t_pref
            timings["prompt_tokens"] = len(prompt)
            timings["reused_tokens"] = min(kv_before, len(prompt))
            gen: list[int] = [tp.start_id] if forced else []
            tracks: list[Track] = []
            written = _Written()
            reader = tp.claim_reader if self.guard else None
            previous = tp.track(tp.track_index[self.recommended[-1]]) if self.recommended and reader else None
            in_span, node, span_done = forced, 0, False
            pending: list[int] = []
            span_steps, span_time, text_steps, text_time = 0, 0.0, 0, 0.0
            span_mask_s, text_mask_s = 0.0, 0.0  # time spent choosing tokens (masks, sampling), not decoding
            first_track_s = None
            budget = self.max_new_tokens
            log_prior = None  # the retrieval prior, computed when a span opens
            user_turn = {"role": "user", "content": cf.normalize_message(message)[-2000:]}
            request = self.history + [user_turn]
            cold = is_cold(self.history)  # no track played yet: the calibration's first-turn part
            marks = tp.played_marks(request)  # what it has played and the artists it names, if the calibration weighs them
            turn_excl = tp.turn_exclusions(self.excl, user_turn["content"])  # and not the artists it denies
            while True:
                ts = time.perf_counter()
                if pending:
                    logits = tp._append(pending)
                    gen += pending
                    if pending[0] == tp.start_id and len(pending) == 1:
                        in_span, node = True, 0
                    pending = []
                if in_span:
                    if log_prior is None and tp.retrieval is not None:
                        tm = time.perf_counter()
                        log_prior = tp.retrieval_prior(request, self.recommended)
                        timings["retrieval_s"] = time.perf_counter() - tm
                    if n > 1:
                        idxs = [t for t, _ in tp.rank(turn_excl, logits, n, log_prior, cold, marks)]
                        if not idxs:  # cannot happen: spans only open while tracks remain
                            raise RuntimeError("no track left for the span")
                        path = tp.trie.path(idxs[0])
                        span_steps += len(path)
                        todo = path
                    else:
                        # todo: its last tokens, decoded together with the track context below
                        path, index, todo, chose_s = tp.pick_span(turn_excl, logits, self._pick, log_prior, cold,
                                                                  marks)
                        span_mask_s += chose_s
                        idxs = [index]
                        span_steps += len(path)
                    for i in idxs:
                        self.excl.exclude(i)
                        tracks.append(tp.track(i))
                    first_track_s = time.perf_counter() - t0
                    span_time += time.perf_counter() - ts
                    if on_track is not None:
                        for t in tracks:
                            on_track(t)
                    ctx_tokens = tp.tokenize(cf.render_track_context(tracks[0]), special=False)[:CONTEXT_MAX_TOKENS]
                    logits = tp._append(todo + ctx_tokens)
                    gen += path + ctx_tokens
                    in_span, span_done = False, True
                    continue
                if budget <= 0 or len(tp._kv) >= tp.n_ctx - 2:
                    break
                tm = time.perf_counter()
                scores = logits.copy()
                scores[tp._mask_in_text] = -np.inf
                if span_done or exhausted or gen:  # a span can only open the turn (the training format)
                    scores[tp.start_id] = -np.inf
                banned = written.bans() if written.kv0 is not None else None
                if banned:
                    scores[list(banned)] = -np.inf
                tok = self._pick(scores)
                text_mask_s += time.perf_counter() - tm
                budget -= 1
                if tok in tp.stop_ids:
                    if reader is not None and tracks and written.kv0 is not None:
                        back, budget = self._guard(written, gen, tracks[0], previous, budget, len(written.chars))
                        if back is not None and not written.done:
                            logits = back
                            continue
                    break
                if written.kv0 is None:
                    written.kv0, written.gen0 = len(tp._kv), len(gen)
                gen.append(tok)
                if tok == tp.start_id:
                    pending = []
                    logits = tp._append([tok])
                    in_span, node = True, 0
                    text_time += time.perf_counter() - ts
                    written.kv0 = written.gen0 = None
                    continue
                written.add(tok, tp.piece(tok))
                logits = tp._append([tok])
                text_steps += 1
                if reader is not None and tracks:
                    cut = reader.settled(written.chars)  # what the stream may get: the claims read now
                    back, budget = self._guard(written, gen, tracks[0], previous, budget, cut)
                    if back is not None:
                        logits, cut = back, reader.settled(written.chars)
                    if written.done:
                        text_time += time.perf_counter() - ts
                        break
                    written.stream(on_text, cut)
                else:
                    written.stream(on_text, len(written.chars))
                text_time += time.perf_counter() - ts
            if (reader is not None and tracks and written.kv0 is not None and not written.done
                    and len(tp._kv) + SPAN_MAX_TOKENS * 2 < tp.n_ctx):  # the reply ran out of tokens: read it whole
                self._guard(written, gen, tracks[0], previous, budget, len(written.chars))
            written.finish()
            written.stream(on_text, len(written.chars))
            end = tp.tokenize_segments([(cf.IM_END, True), ("\n", False)])
            self.turns.append(user_block + gen + end)
            # leave the KV as is: the next turn's prefill decodes the end marker with the next message
        reply_text = written.text.decode("utf-8", errors="replace").strip()
        self.recommended += [t.id for t in tracks]
        self._last_user = user_block
        self.history.append(user_turn)
        self.history.append({"role": "assistant", "content": reply_text, "track_ids": [t.id for t in tracks]})
        timings.update(total_s=time.perf_counter() - t0, first_track_s=first_track_s, span_tokens=span_steps,
                       span_s=span_time, text_tokens=text_steps, text_s=text_time, span_mask_s=span_mask_s,
                       text_mask_s=text_mask_s, backoffs=written.backoffs, guard_s=written.guard_s)
        return Reply(reply_text, tracks, exhausted=exhausted and not tracks, timings=timings)

    def more(self, n: int = 1) -> Reply:
        """``n`` further tracks for the last request (beam-ranked, not yet recommended); no reply text."""
        if self._last_user is None:
            raise ValueError("nothing asked yet")
        tp = self.tp
        t0 = time.perf_counter()
        with tp._lock:
            tp._switch_to(self.id)
            if self.excl.exhausted:
                return Reply("", [], exhausted=True)
            prev = self.turns[:-1]
            prompt = list(self._system_tokens)
            for t in prev:
                prompt += t
            prompt += self._last_user + [tp.start_id]
            if len(prompt) > tp.n_ctx - SPAN_MAX_TOKENS:
                prompt = list(self._system_tokens) + self._last_user + [tp.start_id]
            logits = tp._sync(prompt)
            log_prior = tp.retrieval_prior(self.history[:-1], self.recommended)
            ranked = tp.rank(tp.turn_exclusions(self.excl, user_turns(self.history)[-1]), logits, n, log_prior,
                             is_cold(self.history[:-1]), tp.played_marks(self.history[:-1]))
            tracks = []
            for i, _ in ranked:
                self.excl.exclude(i)
                tracks.append(tp.track(i))
        self.recommended += [t.id for t in tracks]
        return Reply("", tracks, timings={"total_s": time.perf_counter() - t0})


class ModelRecommender:
    """The model as a ``Recommender`` for ``talkplay eval --system model``: history → ranked track ids.

    ``ModelRecommender(catalog, threads=2, model=None)``: ``catalog`` a Catalog (or path); earlier assistant
    turns are rendered with their first ground-truth track as a music span (``chat_format``), then the
    tracks are ranked by beam search from ``<|im_start|>assistant\\n<|music_start|>``."""

    name = "model"

    def __init__(self, catalog=None, threads: int = 2, model: str | Path | None = None, tp: TalkPlay | None = None,
                 system: str | None = None, n_ctx: int = 2048, max_beam: int = 32, **_):
        self.tp = tp or TalkPlay.load(model, catalog, threads=threads, n_ctx=n_ctx, max_beam=max_beam)
        self.system = system

    def _segments(self, history: list[dict]) -> list[tuple[str, bool]]:
        cat = self.tp.catalog
        turns = []
        for t in history:
            if t["role"] == "assistant":
                tid = next((i for i in t.get("track_ids") or [] if i in self.tp.track_index), None)
                track = cat.get(tid) if tid else None
                span = cat.span(tid) if track else None
                turns.append({"role": "assistant", "content": cf.assistant_turn_text(span, track, t.get("content", ""))})
            elif t["role"] == "user":
                if str(t.get("content", "")).strip():
                    turns.append({"role": "user", "content": t["content"]})
        while True:
            segs = cf.prompt_segments(self.system, turns) + [(SPAN_START, True)]
            toks = self.tp.tokenize_segments(segs)
            if len(toks) <= self.tp.n_ctx - self._reserve() or len(turns) <= 1:
                return toks
            turns = turns[1:]

    def _reserve(self) -> int:
        return min((self.tp.max_beam + 1) * SPAN_MAX_TOKENS, self.tp.n_ctx // 2)

    def _prompt(self, history: list[dict]) -> list[int]:
        """The tokens up to the answer's ``<|music_start|>``, leaving room for the beam search."""
        toks = self._segments(history)
        room = self.tp.n_ctx - self._reserve()
        return toks[-room:] if len(toks) > room else toks

    def close(self) -> None:
        self.tp.close()

    def recommend(self, history: list[dict], exclude: set[str], n: int = 100) -> list[str]:
        tp = self.tp
        toks = self._prompt(history)
        excl = Exclusions(tp.trie, [tp.track_index[i] for i in exclude if i in tp.track_index])
        excl = tp.turn_exclusions(excl, (user_turns(history) or [""])[-1])  # "no more Drake": none of his
        with tp._lock:
            tp._switch_to(-1)  # the recommender is one more user of the context
            logits = tp._sync(toks)
            ranked = tp.rank(excl, logits, n, tp.retrieval_prior(history, exclude), is_cold(history),
                             tp.played_marks(history))
        return [tp.track_ids[i] for i, _ in ranked]
