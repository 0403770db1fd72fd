"""Offline evaluation of conversational recommenders (what `talkplay eval` runs).

For every assistant turn of every conversation the system gets the conversation so far (earlier turns with
their ground-truth ``track_ids``, ending with the user turn to answer) and returns up to 100 ranked track
ids. The tracks already played in the conversation are passed as ``exclude`` and are also filtered out here,
as are duplicates and ids not in the catalog, so every system is scored on the same terms.

Metrics per turn: reciprocal rank of the first target within the top 100 (0 beyond), Hit@1/10/100;
averaged over turns and per turn index (the 1st, 2nd, … assistant turn of a conversation). Turns whose
targets are all unknown to the catalog are skipped and counted, never fatal.

Systems come from a registry (``SYSTEMS``: name → factory or "module:attribute" string); the runtime adds
the model with ``register_recommender("model", factory)`` or a ``"model": "talkplay_edge.x:Factory"`` entry.
A factory is called as ``factory(catalog, threads=threads, **kw)`` and returns a ``Recommender``.
"""

from __future__ import annotations

import importlib
import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterable

from .progress import progress
from .recommender import Recommender

N_RANKED = 100
HIT_KS = (1, 10, 100)

SYSTEMS: dict[str, Callable | str] = {
    "popularity": "talkplay_edge.baselines:PopularityRecommender",
    "random": "talkplay_edge.baselines:RandomRecommender",
    "bm25": "talkplay_edge.baselines:BM25Recommender",
    "dense": "talkplay_edge.baselines:DenseRecommender",
    "cf": "talkplay_edge.baselines:CFRecommender",
    "hybrid": "talkplay_edge.baselines:HybridRecommender",
    "model": "talkplay_edge.runtime:ModelRecommender",  # the GGUF model: $TALKPLAY_MODEL or the default model
}


class UnknownSystemError(KeyError):
    def __str__(self) -> str:
        return self.args[0]


def register_recommender(name: str, factory: Callable | str) -> None:
    """Make ``--system NAME`` available: ``factory(catalog, threads=.., **kw) -> Recommender``."""
    SYSTEMS[name] = factory


def get_recommender(name: str, catalog, threads: int = 2, **kw) -> Recommender:
    """A Recommender for a registered system name (see ``SYSTEMS``)."""
    return _make_recommender(name, system_factory(name), catalog, threads=threads, **kw)


def system_factory(name: str) -> Callable | str:
    """The registered factory of a system name (``SYSTEMS``); ``UnknownSystemError`` for any other name."""
    factory = SYSTEMS.get(name)
    if factory is None:
        raise UnknownSystemError(f"unknown system {name!r} (known: {', '.join(sorted(SYSTEMS))})")
    return factory


def _make_recommender(name: str, factory: Callable | str, catalog, threads: int, **kw) -> Recommender:
    if isinstance(factory, str):
        module, _, attr = factory.partition(":")
        factory = getattr(importlib.import_module(module), attr)
    rec = factory(catalog, threads=threads, **kw)
    if not isinstance(rec, Recommender):
        raise TypeError(f"system {name!r}: {type(rec).__name__} does not implement Recommender")
    return rec


# ---------------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------------

def first_hit_rank(ranked: list[str], targets: Iterable[str], k: int = N_RANKED) -> int | None:
    """1-based rank of the first target within the top ``k`` of ``ranked``, or None."""
    targets = set(targets)
    for i, tid in enumerate(ranked[:k], 1):
        if tid in targets:
            return i
    return None


def reciprocal_rank(ranked: list[str], targets: Iterable[str], k: int = N_RANKED) -> float:
    r = first_hit_rank(ranked, targets, k)
    return 1.0 / r if r else 0.0


def hit_at(ranked: list[str], targets: Iterable[str], k: int) -> float:
    return 1.0 if first_hit_rank(ranked, targets, k) else 0.0


def summarise(ranks: list[int | None]) -> dict:
    """Mean MRR and Hit@k over turns given each turn's first-hit rank (None = not in the top 100)."""
    n = len(ranks)
    if n == 0:
        return {"turns": 0, "mrr": 0.0, **{f"hit@{k}": 0.0 for k in HIT_KS}}
    out = {"turns": n, "mrr": sum(1.0 / r for r in ranks if r and r <= N_RANKED) / n}
    for k in HIT_KS:
        out[f"hit@{k}"] = sum(1 for r in ranks if r and r <= k) / n
    return out


def clean_ranking(ranked: Iterable[str], exclude: set[str], valid: set[str] | None, n: int = N_RANKED) -> tuple[list[str], int]:
    """The system's list without excluded, duplicate and (when ``valid`` is given) unknown ids, cut to ``n``;
    returns (list, number of unknown ids dropped)."""
    out, seen, unknown = [], set(), 0
    for tid in ranked:
        if tid in seen or tid in exclude:
            continue
        if valid is not None and tid not in valid:
            unknown += 1
            continue
        seen.add(tid)
        out.append(tid)
        if len(out) >= n:
            break
    return out, unknown


# ---------------------------------------------------------------------------------------------------------
# the evaluation loop
# ---------------------------------------------------------------------------------------------------------

@dataclass
class EvalResult:
    system: str
    conversations: int
    turns: int  # scored assistant turns
    overall: dict
    per_turn: dict[int, dict]  # turn index (1-based) -> summary
    per_intent: dict[str, dict] = field(default_factory=dict)  # from the optional meta.intents of generated data
    skipped_unknown_target: int = 0  # turns whose targets are all outside the catalog
    skipped_target_played: int = 0  # turns whose targets were all played earlier (cannot be recommended)
    unknown_ids_returned: int = 0  # ids a system returned that the catalog does not hold (dropped)
    runtime_s: float = 0.0
    timed_turns: int | None = None  # the turns scored in runtime_s, when fewer than turns (a resumed run)
    extra: dict = field(default_factory=dict)
    turn_ranks: list[dict] = field(default_factory=list)  # one row per scored turn (``write_ranks``)
    records: list[dict] = field(default_factory=list)  # one per conversation (``score_conversation``)

    @property
    def turns_per_s(self) -> float | None:
        timed = self.turns if self.timed_turns is None else self.timed_turns
        return timed / self.runtime_s if self.runtime_s and timed else None

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("turn_ranks", "records")}
        d["per_turn"] = {str(k): v for k, v in sorted(self.per_turn.items())}
        d["per_intent"] = dict(sorted(self.per_intent.items(), key=lambda kv: -kv[1]["turns"]))
        d["turns_per_s"] = self.turns_per_s
        return d


def iter_turns(conversation: dict):
    """(turn index, history, targets, played) for each assistant turn: history = the turns before it."""
    turns = conversation["turns"]
    played: list[str] = []
    idx = 0
    for i, t in enumerate(turns):
        if t["role"] != "assistant":
            continue
        idx += 1
        yield idx, turns[:i], list(t["track_ids"]), list(played)
        played.extend(t["track_ids"])


def evaluate(recommender: Recommender, conversations: list[dict], catalog_ids: set[str], n: int = N_RANKED,
             show_progress: bool = False, max_turn: int | None = None,
             on_conversation: Callable[[dict], None] | None = None, indices: list[int] | None = None,
             only: set[tuple[str, int]] | None = None) -> EvalResult:
    """Score ``recommender`` on every assistant turn of ``conversations`` (see the module docstring), or on
    those up to ``max_turn`` (1: the first turns only), or on the (conversation id, turn) pairs in ``only``.
    ``indices``: each conversation's index in its file (default 0, 1, …); it names a conversation without an
    ``id``.
    ``on_conversation(record)`` is called after each one with its ``score_conversation`` record (progress,
    the journal of `talkplay eval --ranks`)."""
    t0 = time.perf_counter()
    if indices is None:
        indices = list(range(len(conversations)))
    if len(indices) != len(conversations):
        raise ValueError(f"{len(indices)} indices for {len(conversations)} conversations")
    records: list[dict] = []
    bar = progress(conversations, desc=f"eval {recommender.name}", unit="conv") if show_progress else conversations
    for conv, index in zip(bar, indices):
        records.append(score_conversation(recommender, conv, index, catalog_ids, n=n, max_turn=max_turn,
                                          only=only))
        if on_conversation is not None:
            on_conversation(records[-1])
    return result_from_records(getattr(recommender, "name", type(recommender).__name__), records,
                               runtime_s=time.perf_counter() - t0)


def score_conversation(recommender: Recommender, conv: dict, index: int, catalog_ids: set[str], n: int = N_RANKED,
                       max_turn: int | None = None, only: set[tuple[str, int]] | None = None) -> dict:
    """One conversation's record: {"index", "rows": one rank row per scored turn, and the counts of turns
    skipped (targets unknown / already played) and of returned ids the catalog does not hold}. With
    ``only``, the turns whose (conversation id, turn) it lacks are not scored (nor counted): a turn's rank
    depends on its ground-truth history alone, so scoring some turns gives the ranks a whole run gives them."""
    meta = conv.get("meta") or {}
    conv_id = str(conv.get("id", index))
    intents = meta.get("intents") if isinstance(meta.get("intents"), list) else []
    rec = {"index": index, "rows": [], "skipped_unknown_target": 0, "skipped_target_played": 0,
           "unknown_ids_returned": 0}
    for idx, history, targets, played in iter_turns(conv):
        if max_turn is not None and idx > max_turn:
            break
        if only is not None and (conv_id, idx) not in only:
            continue
        exclude = set(played)
        known = [t for t in targets if t in catalog_ids]
        if not known:
            rec["skipped_unknown_target"] += 1
            continue
        live = [t for t in known if t not in exclude]
        if not live:
            rec["skipped_target_played"] += 1
            continue
        raw = recommender.recommend(history, set(exclude), n)
        ranked, unk = clean_ranking(raw, exclude, catalog_ids, n)
        rec["unknown_ids_returned"] += unk
        intent = str(intents[idx - 1]) if idx <= len(intents) else None
        rec["rows"].append({"conversation": conv_id, "turn": idx, "intent": intent,
                            "rank": first_hit_rank(ranked, live, n)})
    return rec


RECORD_COUNTS = ("skipped_unknown_target", "skipped_target_played", "unknown_ids_returned")


def result_from_records(system: str, records: list[dict], runtime_s: float = 0.0,
                        conversations: int | None = None) -> EvalResult:
    """The ``EvalResult`` of conversation records (``score_conversation``), pooled in the order of their
    indices: the same whether they came from one run, several processes, or a journal and a resumed run."""
    records = sorted(records, key=lambda r: r["index"])
    result = result_from_rows(system, len(records) if conversations is None else conversations,
                              [row for r in records for row in r["rows"]], runtime_s=runtime_s,
                              **{k: sum(r[k] for r in records) for k in RECORD_COUNTS})
    result.records = records
    return result


def result_from_rows(system: str, conversations: int, rows: list[dict], **counts) -> EvalResult:
    """The summaries (overall, per turn index, per intent) of scored-turn rows, as ``evaluate`` returns them;
    ``counts``: the other ``EvalResult`` fields (skipped turns, dropped ids, runtime_s)."""
    by_turn: dict[int, list[int | None]] = {}
    by_intent: dict[str, list[int | None]] = {}
    for row in rows:
        by_turn.setdefault(row["turn"], []).append(row["rank"])
        if row["intent"] is not None:
            by_intent.setdefault(row["intent"], []).append(row["rank"])
    ranks = [row["rank"] for row in rows]
    return EvalResult(system=system, conversations=conversations, turns=len(ranks), overall=summarise(ranks),
                      per_turn={k: summarise(v) for k, v in sorted(by_turn.items())},
                      per_intent={k: summarise(v) for k, v in by_intent.items()}, turn_ranks=rows, **counts)


def _timing(result: EvalResult) -> str:
    if not result.turns_per_s:
        return ""
    if result.timed_turns is not None and result.timed_turns != result.turns:
        return f" ({result.timed_turns} scored now, in {result.runtime_s:.1f} s: {result.turns_per_s:.1f} turns/s)"
    return f" in {result.runtime_s:.1f} s ({result.turns_per_s:.1f} turns/s)"


def format_table(result: EvalResult, per_intent: bool = False, title: str | None = None) -> str:
    """The human-readable report: one row per turn index, the overall row; optionally one row per intent.
    ``title``: what the first line calls the run (default "system NAME")."""
    o = result.overall
    lines = [f"{title or 'system ' + result.system}: {result.conversations} conversations, {result.turns} scored turns"
             + _timing(result)]
    if result.skipped_unknown_target or result.skipped_target_played:
        lines.append(f"skipped turns: {result.skipped_unknown_target} with targets not in the catalog, "
                     f"{result.skipped_target_played} with targets already played")
    if result.unknown_ids_returned:
        lines.append(f"dropped {result.unknown_ids_returned} returned ids not in the catalog")
    head = f"{'turn':>6} {'n':>6} {'MRR':>7} {'Hit@1':>7} {'Hit@10':>7} {'Hit@100':>8}"
    lines += ["", head, "-" * len(head)]

    def row(label: str, s: dict) -> str:
        return f"{label:>6} {s['turns']:>6} {s['mrr']:>7.4f} {s['hit@1']:>7.4f} {s['hit@10']:>7.4f} {s['hit@100']:>8.4f}"

    lines += [row(str(k), s) for k, s in sorted(result.per_turn.items())]
    lines += ["-" * len(head), row("all", o)]
    if per_intent and result.per_intent:
        head2 = f"{'intent':>16} {'n':>6} {'MRR':>7} {'Hit@1':>7} {'Hit@10':>7} {'Hit@100':>8}"
        lines += ["", head2, "-" * len(head2)]
        for name, s in sorted(result.per_intent.items(), key=lambda kv: -kv[1]["turns"]):
            lines.append(f"{name:>16} {s['turns']:>6} {s['mrr']:>7.4f} {s['hit@1']:>7.4f} {s['hit@10']:>7.4f} "
                         f"{s['hit@100']:>8.4f}")
    return "\n".join(lines)


# -- per-turn ranks: paired comparison of two runs ---------------------------------------------------------
def write_ranks(rows: list[dict], path) -> None:
    """One JSON line per scored turn: conversation id, turn index, intent, first-hit rank (null: not in top 100).
    A path ending in .gz is gzip-compressed (reproducibly: no timestamp)."""
    text = "".join(json.dumps(row) + "\n" for row in rows).encode("utf-8")
    if str(path).endswith(".gz"):
        import gzip

        text = gzip.compress(text, mtime=0)
    with Path(path).open("wb") as f:
        f.write(text)


class RanksFormatError(ValueError):
    pass


def read_ranks(path, need_rank: bool = True) -> list[dict]:
    """The rows ``write_ranks`` wrote (``talkplay eval --ranks``, .gz too); a clear error for anything else.
    ``need_rank=False`` reads a list of turns (``--only-turns``): each row needs a conversation and a turn."""
    import gzip
    import zlib

    rows = []
    try:
        data = Path(path).read_bytes()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        lines = data.decode("utf-8").splitlines()
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise RanksFormatError(f"{path}: cannot read ({e})") from e
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            key = (str(row["conversation"]), int(row["turn"]))
            rank = row["rank"] if need_rank else row.get("rank")
            if rank is not None and (not isinstance(rank, int) or rank < 1):
                raise ValueError(f"rank {rank!r}")
        except (ValueError, KeyError, TypeError) as e:
            what = "a rank row written by `talkplay eval --ranks`" if need_rank else "a turn (conversation, turn)"
            raise RanksFormatError(f"{path} line {n}: not {what} ({e})") from e
        rows.append({"conversation": key[0], "turn": key[1], "intent": row.get("intent"), "rank": rank})
    if not rows:
        raise RanksFormatError(f"{path}: no {'rank rows' if need_rank else 'turns'}")
    return rows


def splice_ranks(base: list[dict], patch: list[dict]) -> tuple[list[dict], int]:
    """(``base`` with each ``patch`` row in place of its turn, how many of those ranks differ); raises
    KeyError((conversation, turn)) for a patch turn ``base`` lacks."""
    at = {(r["conversation"], r["turn"]): i for i, r in enumerate(base)}
    out, changed = list(base), 0
    for row in patch:
        key = (row["conversation"], row["turn"])
        if key not in at:
            raise KeyError(key)
        changed += out[at[key]]["rank"] != row["rank"]
        out[at[key]] = row
    return out, changed


def _rr(rank: int | None) -> float:
    return 1.0 / rank if rank and rank <= N_RANKED else 0.0


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact binomial (sign) test of wins vs losses under p = 1/2."""
    import math

    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def _paired(pairs: list[tuple[int | None, int | None]], n_boot: int, seed: int) -> dict:
    import numpy as np

    a = np.array([_rr(x) for x, _ in pairs], dtype=np.float64)
    b = np.array([_rr(y) for _, y in pairs], dtype=np.float64)
    d = b - a
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    h1a = np.array([x == 1 for x, _ in pairs], dtype=bool)
    h1b = np.array([y == 1 for _, y in pairs], dtype=bool)
    out = {"turns": len(pairs), "mrr_a": float(a.mean()) if len(a) else 0.0, "mrr_b": float(b.mean()) if len(b) else 0.0,
           "mrr_diff": float(d.mean()) if len(d) else 0.0, "b_better": wins, "a_better": losses,
           "ties": len(pairs) - wins - losses, "sign_p": sign_test_p(wins, losses),
           "hit1_a": int(h1a.sum()), "hit1_b": int(h1b.sum()),
           "hit1_only_b": int((h1b & ~h1a).sum()), "hit1_only_a": int((h1a & ~h1b).sum())}
    out["hit1_p"] = sign_test_p(out["hit1_only_b"], out["hit1_only_a"])
    if n_boot and len(d) > 1:
        rng = np.random.default_rng(seed)
        means = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(axis=1)
        out["mrr_diff_ci95"] = [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]
    return out


def compare_ranks(a: list[dict], b: list[dict], n_boot: int = 2000, seed: int = 0) -> dict:
    """Paired comparison of two runs' per-turn ranks (run B against run A) on the turns both scored.

    Per turn the reciprocal rank of B minus that of A: mean difference with a paired bootstrap 95% interval,
    turns where B / A ranks better and a two-sided sign test; Hit@1 turns only one run gets (McNemar's exact
    test is the sign test on those). The same per intent."""
    index_a = {(r["conversation"], r["turn"]): r for r in a}
    index_b = {(r["conversation"], r["turn"]): r for r in b}
    shared = [k for k in index_a if k in index_b]
    pairs = [(index_a[k]["rank"], index_b[k]["rank"]) for k in shared]
    out = {"only_a": len(index_a) - len(shared), "only_b": len(index_b) - len(shared),
           "overall": _paired(pairs, n_boot, seed), "per_intent": {}}
    intents: dict[str, list] = {}
    for k in shared:
        intent = index_b[k].get("intent") or index_a[k].get("intent")
        if intent:
            intents.setdefault(str(intent), []).append((index_a[k]["rank"], index_b[k]["rank"]))
    for name, ps in sorted(intents.items(), key=lambda kv: -len(kv[1])):
        out["per_intent"][name] = _paired(ps, 0, seed)
    return out


def format_comparison(cmp: dict, label_a: str = "A", label_b: str = "B", per_intent: bool = False) -> str:
    """The human-readable report of ``compare_ranks``."""
    o = cmp["overall"]
    lines = [f"{o['turns']} turns in both runs ({cmp['only_a']} only in {label_a}, {cmp['only_b']} only in {label_b})",
             f"MRR {label_a} {o['mrr_a']:.4f}  {label_b} {o['mrr_b']:.4f}  difference {o['mrr_diff']:+.4f}"
             + (" (95% CI {:+.4f} .. {:+.4f})".format(*o["mrr_diff_ci95"]) if "mrr_diff_ci95" in o else ""),
             f"turns ranked better: {label_b} {o['b_better']}, {label_a} {o['a_better']}, tied {o['ties']} "
             f"(sign test p = {o['sign_p']:.3g})",
             f"Hit@1 {label_a} {o['hit1_a']}  {label_b} {o['hit1_b']}: only {label_b} {o['hit1_only_b']}, "
             f"only {label_a} {o['hit1_only_a']} (p = {o['hit1_p']:.3g})"]
    if per_intent and cmp["per_intent"]:
        head = f"{'intent':>16} {'n':>5} {'MRR ' + label_a:>10} {'MRR ' + label_b:>10} {'diff':>8} {'better':>9} {'p':>7}"
        lines += ["", head, "-" * len(head)]
        for name, s in cmp["per_intent"].items():
            lines.append(f"{name:>16} {s['turns']:>5} {s['mrr_a']:>10.4f} {s['mrr_b']:>10.4f} {s['mrr_diff']:>+8.4f} "
                         f"{str(s['b_better']) + '/' + str(s['a_better']):>9} {s['sign_p']:>7.3g}")
    return "\n".join(lines)


# -- replies: what a user of the chat sees -----------------------------------------------------------------
def _fold(text: str) -> str:
    """``sources.norm_name`` (case, punctuation, spaces) without accents: "Beyoncé!" -> "beyonce"."""
    import unicodedata

    from .sources import norm_name

    return norm_name("".join(c for c in unicodedata.normalize("NFKD", str(text or "")) if not unicodedata.combining(c)))


def title_core(title: str) -> str:
    """A title without version suffixes: "Champagne Supernova - Remastered" -> "Champagne Supernova"."""
    core = str(title or "").split(" - ")[0]
    return core.split(" (")[0].split(" [")[0].strip() or str(title or "")


def mentions_track(reply: str, track) -> bool:
    """Does the reply name the track: its title (without version suffixes) or its artist (any of them), as
    whole words, ignoring case, accents and punctuation?"""
    text = f" {_fold(reply)} "
    names = [title_core(track.title), track.artist, *(getattr(track, "artists", ()) or ())]
    return any(f" {n} " in text for n in map(_fold, names) if n)


@dataclass
class ReplyResult:
    """Chat turns run through ``ChatSession.send`` (the conversations' user messages, the model's own history)."""
    conversations: int = 0
    turns: int = 0
    with_track: int = 0  # turns that recommended a track
    real: int = 0  # ... a track of the catalog
    repeated: int = 0  # ... already recommended in that session
    mentions: int = 0  # ... whose reply text names the track (title or artist)
    empty_replies: int = 0
    exhausted: int = 0
    reply_chars: int = 0
    claims: int = 0  # what replies say of their track (``claims.ClaimReader``): genre, sound, year, BPM, relation, lyrics
    false_replies: int = 0  # turns whose reply says something of its track that the catalog does not bear out
    false_genre: int = 0
    false_sound: int = 0
    false_year: int = 0
    false_bpm: int = 0
    false_relation: int = 0  # "a newer one", "up from 120" when it is not
    false_lyrics: int = 0  # "with lyrics about love" when the catalog holds no such theme for it
    backoffs: int = 0  # times the reply guard took back a false claim as it was written
    runtime_s: float = 0.0
    examples: list = field(default_factory=list)  # the first few turns, for a look

    def to_dict(self) -> dict:
        d = asdict(self)
        t = max(self.with_track, 1)
        d.update(real_rate=self.real / t, repeat_rate=self.repeated / t, mention_rate=self.mentions / t,
                 track_rate=self.with_track / max(self.turns, 1), mean_reply_chars=self.reply_chars / max(self.turns, 1),
                 false_reply_rate=self.false_replies / t,
                 turns_per_s=self.turns / self.runtime_s if self.runtime_s else None)
        return d

    @classmethod
    def pooled(cls, parts: list["ReplyResult"], n_examples: int = 5) -> "ReplyResult":
        """The counts of runs made side by side (``talkplay eval --jobs``): summed, the slowest run's time, the
        first ``n_examples`` examples in order."""
        out = cls(runtime_s=max(p.runtime_s for p in parts),
                  examples=[e for p in parts for e in p.examples][:n_examples])
        for f in fields(cls):
            if f.name not in ("runtime_s", "examples"):
                setattr(out, f.name, sum(getattr(p, f.name) for p in parts))
        return out

    def format(self) -> str:
        d = self.to_dict()
        return (f"replies: {self.turns} turns in {self.conversations} conversations ({self.runtime_s:.1f} s); "
                f"track in {d['track_rate']:.1%}; real {d['real_rate']:.1%}; repeated {d['repeat_rate']:.1%}; "
                f"reply names the track in {d['mention_rate']:.1%}; mean reply {d['mean_reply_chars']:.0f} chars; "
                f"{self.empty_replies} empty; says something false of its track in {d['false_reply_rate']:.1%} "
                f"({self.claims} claims; false: {self.false_genre} genre, {self.false_sound} sound, {self.false_year} "
                f"year, {self.false_bpm} BPM, {self.false_relation} relation, {self.false_lyrics} lyrics; {self.backoffs} taken back as written)")


def evaluate_replies(tp, conversations: list[dict], max_new_tokens: int = 64, n_examples: int = 5,
                     show_progress: bool = False, on_conversation: Callable[[], None] | None = None,
                     guard: bool = True) -> ReplyResult:
    """Chat through ``tp`` (a ``runtime.TalkPlay``) with each conversation's user messages, greedy, as a user
    would: count real / repeated tracks, replies that name their track, and what replies say of their track
    that the catalog does not bear out (``claims.ClaimReader``); ``guard=False`` chats without the reply guard."""
    catalog_ids = set(tp.track_ids)
    reader = tp.claim_reader
    res = ReplyResult()
    t0 = time.perf_counter()
    bar = progress(conversations, desc="replies", unit="conv") if show_progress else conversations
    for conv in bar:
        session = tp.chat(max_new_tokens=max_new_tokens, guard=guard)
        seen: set[str] = set()
        previous = None
        res.conversations += 1
        try:
            for turn in conv["turns"]:
                if turn["role"] != "user" or not str(turn.get("content", "")).strip():
                    continue
                reply = session.send(turn["content"])
                res.turns += 1
                res.reply_chars += len(reply.text)
                res.empty_replies += not reply.text
                res.exhausted += reply.exhausted
                res.backoffs += (reply.timings or {}).get("backoffs", 0)
                if reply.tracks:
                    track = reply.tracks[0]
                    res.with_track += 1
                    res.real += track.id in catalog_ids
                    res.repeated += track.id in seen
                    res.mentions += mentions_track(reply.text, track)
                    claims = reader.claims(reply.text, track, previous)
                    res.claims += len(claims)
                    false = [c.kind for c in claims if not c.holds]
                    res.false_replies += bool(false)
                    for kind in false:
                        setattr(res, f"false_{kind}", getattr(res, f"false_{kind}") + 1)
                    seen.add(track.id)
                    previous = track
                if len(res.examples) < n_examples:
                    res.examples.append({"user": turn["content"], "reply": reply.text,
                                         "track": f'"{reply.tracks[0].title}" by {reply.tracks[0].artist}'
                                         if reply.tracks else None})
        finally:
            session.reset()  # frees the session's KV snapshot
        if on_conversation is not None:
            on_conversation()
    res.runtime_s = time.perf_counter() - t0
    return res


# -- several processes: `talkplay eval --jobs N` -----------------------------------------------------------
class EvalJobError(RuntimeError):
    """A process of ``evaluate_in_processes`` failed; the message names the job and the cause."""


_ticks = None  # in a job process: the queue its finished conversations go to (records; 1 for a chat)


def _job_init(ticks, parent_pid: int) -> None:
    global _ticks
    _ticks = ticks
    _end_with_parent(parent_pid)


def _end_with_parent(parent_pid: int) -> None:
    """On Linux, have the kernel end this job when its parent dies, so a killed `talkplay eval --jobs` leaves
    no process evaluating on for nothing (a Ctrl-C or a normal exit already ends them)."""
    import os
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before the call above
        os._exit(1)


def _job(job: dict) -> dict:
    """One process's share: its own catalog connection and recommender, one run of contiguous conversations."""
    import functools

    from .catalog import Catalog

    try:
        t0 = time.perf_counter()
        with Catalog.open(job["catalog"]) as cat:
            rec = _make_recommender(job["system"], job["factory"], cat, threads=job["threads"], **job["kw"])
            setup_s = time.perf_counter() - t0
            put = _ticks.put if _ticks is not None else None  # to the parent: each record, a 1 per chat
            result = evaluate(rec, job["conversations"], set(cat.track_ids()), max_turn=job["max_turn"],
                              indices=job["indices"], on_conversation=put, only=job["only"])
            chat = (evaluate_replies(rec.tp, job["conversations"], guard=job["guard"],
                                     on_conversation=functools.partial(put, 1) if put else None)
                    if job["replies"] else None)
    except Exception as e:  # noqa: BLE001 — sent back to the parent as one picklable, readable error
        why = str(e) if type(e).__module__.startswith("talkplay_edge.") else f"{type(e).__name__}: {e}"
        raise EvalJobError(f"eval job {job['job']} of {job['jobs']}: {why}") from None
    return {"result": result, "replies": chat, "setup_s": setup_s}


def split_evenly(items: list, parts: int) -> list[tuple[int, list]]:
    """``items`` as at most ``parts`` contiguous, non-empty runs whose sizes differ by at most one:
    [(index of the run's first item, run), ...]."""
    parts = max(1, min(parts, len(items)))
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (i < extra)
        out.append((start, items[start:end]))
        start = end
    return out


def evaluate_in_processes(system: str, catalog_path, conversations: list[dict], jobs: int, threads: int = 1,
                          max_turn: int | None = None, replies: bool = False, guard: bool = True,
                          show_progress: bool = False, indices: list[int] | None = None,
                          on_conversation: Callable[[dict], None] | None = None,
                          only: set[tuple[str, int]] | None = None,
                          **kw) -> tuple[EvalResult, ReplyResult | None, float]:
    """``evaluate`` (and ``evaluate_replies`` with ``replies``; without the reply guard with ``guard=False``)
    split over ``jobs`` processes of ``threads`` threads each, every process with its own recommender on a
    contiguous run of the conversations.
    ``indices``, ``only`` and ``on_conversation`` (called here, in this process) are ``evaluate``'s.

    Returns (result, replies or None, the slowest process's setup seconds). The rows and summaries are the
    ones a single run gives (systems are deterministic per conversation; ``random`` is seeded per process).
    A failing process stops the others and raises ``EvalJobError``."""
    import multiprocessing
    import os
    import pickle
    import queue as queue_mod

    factory = system_factory(system)
    try:
        pickle.dumps(factory)
    except Exception as e:  # noqa: BLE001
        raise EvalJobError(f"system {system!r} was registered as an object other processes cannot load ({e}); "
                           "register it as a 'module:attribute' string, or run with one job") from None
    if indices is None:
        indices = list(range(len(conversations)))
    runs = split_evenly(list(zip(indices, conversations)), jobs)
    todo = [{"job": i + 1, "jobs": len(runs), "system": system, "factory": factory, "catalog": str(catalog_path),
             "threads": threads, "kw": kw, "conversations": [c for _, c in run], "indices": [i for i, _ in run],
             "max_turn": max_turn, "replies": replies, "guard": guard, "only": only}
            for i, (_, run) in enumerate(runs)]
    ctx = multiprocessing.get_context("spawn")  # llama.cpp and sqlite connections do not survive fork
    ticks = ctx.Queue()
    total = len(conversations) * (2 if replies else 1)
    bar = progress(desc=f"eval {system} ({len(runs)} jobs)", total=total, unit="conv") if show_progress else None
    try:
        with ctx.Pool(len(runs), initializer=_job_init, initargs=(ticks, os.getpid())) as pool:  # leaving it kills the rest
            pending = [pool.apply_async(_job, (job,)) for job in todo]
            while not all(p.ready() for p in pending):
                try:
                    msg = ticks.get(timeout=0.2)
                except queue_mod.Empty:
                    msg = None
                if isinstance(msg, dict) and on_conversation is not None:
                    on_conversation(msg)
                if msg is not None and bar is not None:
                    bar.update(1)
                for p in pending:
                    if p.ready() and not p.successful():
                        p.get()  # raises the job's EvalJobError
            outs = [p.get() for p in pending]
    finally:
        while on_conversation is not None:  # records still on their way (e.g. when a job failed): to the journal
            try:
                msg = ticks.get(timeout=0.05)
            except (queue_mod.Empty, OSError, ValueError):
                break
            if isinstance(msg, dict):
                try:
                    on_conversation(msg)
                except Exception:  # noqa: BLE001 — e.g. a full disk: the error on its way matters more
                    break
        if bar is not None:
            bar.close()
    parts = [o["result"] for o in outs]
    result = result_from_records(parts[0].system, [r for p in parts for r in p.records],
                                 runtime_s=max(p.runtime_s for p in parts))  # the processes ran side by side
    chat = ReplyResult.pooled([o["replies"] for o in outs]) if replies else None
    return result, chat, max(o["setup_s"] for o in outs)
