"""Train the ask head (``talkplay_edge/asks.py``): which step a user message asks of the next track.

    python -m export.asks --write [--conversations conversations/train.jsonl] [--limit 20000]
                          [--held_out FILE ...] [--l2 0.0001] [--word_weight 1] [--cue_weight 2] [--cv 5]
                          [--out talkplay_edge/models/ask_head.npz] [--json]

Every user turn of the training conversations is a (message, intent) pair (``meta.intents``, one per user
turn); intents that ask for a step map to the head's kinds (``asks.KINDS``: "Too slow for me" asks
"faster", "nah, not feeling that" another artist), the rest to "none". The distinct messages are embedded
once with the packaged MiniLM (~30 s on 2 cores for ~11k) and a softmax regression on the embedding, the
message's words (those of at least 2 distinct messages, at ``--word_weight``) and its cues (``asks.CUES``,
at ``--cue_weight``) is fitted by L-BFGS, each distinct message counting once, with an L2 penalty.
Held-out files (default: valid and, where present, test_unseen, whose phrasings the training never uses)
report, on their follow-up turns (a first turn has nothing played to step from), accuracy and, for the
turns where the head speaks, how often it is right.

The settings are chosen by ``--cv K``: leave-phrasings-out cross-validation on the training conversations
(``cross_validate``), which asks the question test_unseen asks (does the head read phrasings it never saw?)
without reading test_unseen. ``--changed_from OLD_HEAD --changed_in FILE...`` lists the turns whose reading
the new head changes: only their ranks can change, so `talkplay eval --only-turns` re-scores just those.
A head trained under another cue table loads only with the code it was trained with: there, ``--readings_out
FILE --changed_in FILE...`` writes each follow-up turn's reading, and ``--changed_from FILE`` takes those.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from talkplay_edge.asks import (ASKS, HEAD_FILE, KINDS, NONE, OTHER_ARTIST, SAME_ARTIST, SIMILAR, AskHead,
                                AskHeadError, cues_of, words_of)

# the conversations' intents (``conversations.py``) that ask for a step, by the kind they ask
INTENT_KIND = {**{k: k for k in ASKS}, "neg_too_slow": "faster", "neg_too_fast": "slower",
               "neg_too_mellow": "more_energy", "neg_too_sad": "happier", "neg_too_old": "newer",
               "other_artist": OTHER_ARTIST, "negative": OTHER_ARTIST, "same_artist": SAME_ARTIST,
               "more_like_this": SIMILAR, "positive_more": SIMILAR}


def labelled_turns(conversations) -> list[tuple[str, str, str, int]]:
    """(user message, kind, pattern id or "", turn number from 1) of every user turn whose conversation lists
    its intents."""
    out = []
    for c in conversations:
        meta = c.get("meta") or {}
        intents = meta.get("intents")
        if not isinstance(intents, list):
            continue
        patterns = meta.get("patterns") if isinstance(meta.get("patterns"), list) else [""] * len(intents)
        users = [t["content"] for t in c["turns"] if t["role"] == "user"]
        out += [(u, INTENT_KIND.get(i, NONE), str(p), n) for n, (u, i, p) in enumerate(zip(users, intents, patterns), 1)]
    return out


def labelled_messages(conversations) -> list[tuple[str, str]]:
    """(user message, kind) of every user turn whose conversation lists its intents."""
    return [(u, k) for u, k, _, _ in labelled_turns(conversations)]


def pattern_folds(patterns, k: int) -> dict[str, int]:
    """Pattern id -> fold in 0..k-1, about 1/k of each intent's patterns per fold; an intent with a single
    pattern is never held out (-1). Deterministic from the ids."""
    by_intent: dict[str, set[str]] = {}
    for p in patterns:
        by_intent.setdefault(p.split(":")[0], set()).add(p)
    folds = {}
    for intent, ps in by_intent.items():
        ranked = sorted(ps, key=lambda p: hashlib.sha256(f"cv:{p}".encode()).hexdigest())
        offset = int(hashlib.sha256(intent.encode()).hexdigest(), 16) % k
        for r, p in enumerate(ranked):
            folds[p] = (r + offset) % k if len(ranked) >= 2 else -1
    return folds


def cross_validate(turns: list[tuple[str, str, str, int]], embed, k: int = 5, threshold: float = 0.5,
                   **fit_args) -> dict:
    """Leave-phrasings-out cross-validation on training turns (message, kind, pattern id, turn number):
    each fold's head is fitted without that fold's patterns and scored on the follow-up turns (turn 2 on:
    the runtime reads no step on a first turn) only they produce, as ``test_unseen`` scores phrasings the
    training never saw; but choosing settings this way never reads ``test_unseen``. ``embed(messages)``
    gives their embeddings. Pooled over the folds: the asking turns, how many the head reads right
    (``coverage``: their share), how often it speaks on a turn that asks nothing, and ``precision`` (right
    of all the turns it speaks on); ``by_kind``: per true kind, its turns, how many are read right and how
    many turns the head reads as that kind wrongly, and what it reads its turns as when not that kind."""
    if not turns or not all(p for _, _, p, _ in turns):
        raise ValueError("cross-validation needs every turn's pattern id (meta.patterns)")
    distinct = sorted({(m, kind) for m, kind, _, _ in turns})
    row = {pair: i for i, pair in enumerate(distinct)}
    X = embed([m for m, _ in distinct])
    folds = pattern_folds([p for _, _, p, _ in turns], k)
    out = {"folds": k, "asking_turns": 0, "right": 0, "speaks_on_asking": 0, "none_turns": 0,
           "speaks_on_none": 0}
    by_kind = {kind: {"turns": 0, "right": 0, "read_wrongly_as": 0, "read_as": {}} for kind in KINDS}
    for f in range(k):
        train = sorted({row[(m, kind)] for m, kind, p, _ in turns if folds[p] != f})
        kept = set(train)
        held = [(m, kind) for m, kind, p, n in turns if folds[p] == f and row[(m, kind)] not in kept and n > 1]
        if not held:
            continue
        head = fit_head(X[train], [distinct[i][1] for i in train], messages=[distinct[i][0] for i in train],
                        **fit_args)
        pred = np.array(head.read(X[[row[h] for h in held]], [m for m, _ in held], threshold))
        speaks = pred != NONE
        truth = np.array([kind for _, kind in held])
        asking = truth != NONE
        out["asking_turns"] += int(asking.sum())
        out["right"] += int((speaks & (pred == truth)).sum())
        out["speaks_on_asking"] += int((speaks & asking).sum())
        out["none_turns"] += int((~asking).sum())
        out["speaks_on_none"] += int((speaks & ~asking).sum())
        for t, p_ in zip(truth, pred):
            by_kind[t]["turns"] += 1
            by_kind[t]["right"] += int(p_ == t and t != NONE)
            if p_ != t:
                by_kind[t]["read_as"][str(p_)] = by_kind[t]["read_as"].get(str(p_), 0) + 1
    out["coverage"] = round(out["right"] / max(out["asking_turns"], 1), 4)
    out["precision"] = round(out["right"] / max(out["speaks_on_asking"] + out["speaks_on_none"], 1), 4)
    for v in by_kind.values():  # the turns of every other kind read as this one
        for read_as, n in v["read_as"].items():
            if read_as != NONE:
                by_kind[read_as]["read_wrongly_as"] += n
    out["by_kind"] = {kind: v for kind, v in by_kind.items() if v["turns"] or v["read_wrongly_as"]}
    return out


def fit_head(embeddings: np.ndarray, kinds: list[str], l2: float = 3e-4, scale: float = 10.0,
             weights: np.ndarray | None = None, encoder: str = "", encoder_version: str = "",
             messages: list[str] | None = None, word_weight: float = 0.5, min_messages: int = 2,
             cue_weight: float = 0.0, cue_fallback: bool = False) -> AskHead:
    """Softmax regression of ``kinds`` on ``embeddings`` (rows weighted by ``weights``, e.g. counts); with
    ``messages``, on their words too (those in at least ``min_messages`` of them, at ``word_weight``) and
    their cues (``asks.cues_of``, likewise, at ``cue_weight``). ``cue_fallback``: the head, where it reads no
    step, takes the one its cues ask for (``AskHead.read``)."""
    import torch

    def seen(read, weight) -> tuple[str, ...]:
        if messages is None or not weight:
            return ()
        df: dict[str, int] = {}
        for m in messages:
            for w in read(m):
                df[w] = df.get(w, 0) + 1
        return tuple(sorted(w for w, c in df.items() if c >= min_messages))

    words, cues = seen(words_of, word_weight), seen(cues_of, cue_weight)
    shell = AskHead(np.zeros((np.shape(embeddings)[1] + len(words) + len(cues), len(KINDS))), np.zeros(len(KINDS)),
                    KINDS, scale, words=words, word_weight=word_weight, cues=cues, cue_weight=cue_weight)
    X = torch.tensor(shell.features(embeddings, messages))
    y = torch.tensor([KINDS.index(k) for k in kinds])
    w = torch.tensor(np.ones(len(kinds)) if weights is None else np.asarray(weights, dtype=np.float64),
                     dtype=torch.float32)
    w = w / w.sum()
    W = torch.zeros(X.shape[1], len(KINDS), requires_grad=True)
    b = torch.zeros(len(KINDS), requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        nll = torch.nn.functional.cross_entropy(scale * (X @ W) + b, y, reduction="none")
        loss = (w * nll).sum() + l2 * (W ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return AskHead(W.detach().numpy(), b.detach().numpy(), KINDS, scale, encoder, encoder_version, words,
                   word_weight, cues, cue_weight, cue_fallback=cue_fallback)


def readings(head: AskHead, conversations, embed, threshold: float = 0.5) -> list[dict]:
    """{"conversation", "turn", "intent", "kind"} for each user message after the first (a first turn has no
    track to step from, so its reading is not used): the step ``head`` reads there."""
    rows = []
    for index, conv in enumerate(conversations):
        intents = (conv.get("meta") or {}).get("intents") or []
        users = [t["content"] for t in conv["turns"] if t["role"] == "user"]
        rows += [{"conversation": str(conv.get("id", index)), "turn": n, "message": m,
                  "intent": intents[n - 1] if n <= len(intents) else None} for n, m in enumerate(users, 1) if n > 1]
    if not rows:
        return []
    messages = [r.pop("message") for r in rows]
    for r, kind in zip(rows, head.read(embed(messages), messages, threshold)):
        r["kind"] = str(kind)
    return rows


def changed_turns(old, new: AskHead, conversations, embed, threshold: float = 0.5) -> list[dict]:
    """The turns whose step ``new`` reads otherwise than ``old`` (a head, or the ``readings`` of the old one:
    a head trained under another cue table loads only with the code it was trained with): {"conversation",
    "turn", "intent", "was", "now"}. Only these turns' ranks can change when a head replaces another: list
    them for `talkplay eval --only-turns`."""
    now = readings(new, conversations, embed, threshold)
    if isinstance(old, AskHead):
        was = {(r["conversation"], r["turn"]): r["kind"] for r in readings(old, conversations, embed, threshold)}
    else:
        was = {(str(r["conversation"]), int(r["turn"])): str(r["kind"]) for r in old}
    missing = [(r["conversation"], r["turn"]) for r in now if (r["conversation"], r["turn"]) not in was]
    if missing:
        raise ValueError(f"the old readings lack {len(missing)} turns, e.g. {missing[0]}: read the same files")
    return [{**{k: r[k] for k in ("conversation", "turn", "intent")}, "was": was[(r["conversation"], r["turn"])],
             "now": r["kind"]} for r in now if r["kind"] != was[(r["conversation"], r["turn"])]]


def remembering(encode):
    """``encode(messages)`` that embeds each distinct message once over all its calls (a held-out file that
    is also a --changed_in file is not embedded twice)."""
    seen: dict[str, np.ndarray] = {}

    def embed(messages: list[str], **kw) -> np.ndarray:
        new = [m for m in dict.fromkeys(messages) if m not in seen]
        if new:
            seen.update(zip(new, encode(new, **kw)))
        return np.stack([seen[m] for m in messages])

    return embed


def score(head: AskHead, embeddings: np.ndarray, kinds: list[str], threshold: float = 0.5,
          messages: list[str] | None = None) -> dict:
    """Accuracy, and for the turns where the head speaks (a kind other than none, at ``threshold``): how
    many, how many right, out of how many turns ask a step."""
    pred = np.array(head.read(embeddings, messages, threshold))
    speaks = pred != NONE
    truth = np.array(kinds)
    return {"turns": len(kinds), "accuracy": round(float((pred == truth).mean()), 4),
            "asking_turns": int((truth != NONE).sum()), "speaks": int(speaks.sum()),
            "speaks_right": int((pred[speaks] == truth[speaks]).sum())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.asks", description=__doc__.split("\n\n")[0])
    p.add_argument("--conversations", default="conversations/train.jsonl")
    p.add_argument("--limit", type=int, default=20000,
                   help="the file's first N conversations (the default build's size; 0: all)")
    p.add_argument("--held_out", nargs="*", default=None,
                   help="files to report on (default: valid.jsonl and test_unseen.jsonl beside --conversations)")
    p.add_argument("--l2", type=float, default=1e-4)
    p.add_argument("--word_weight", type=float, default=1.0,
                   help="weight of the word features beside the embedding (0: embedding only)")
    p.add_argument("--cue_weight", type=float, default=2.0,
                   help="weight of the cue features (asks.CUES; 0: none)")
    p.add_argument("--no_cue_fallback", dest="cue_fallback", action="store_false",
                   help="read no step where the head is unsure, whatever the cues ask (default: the cues' one)")
    p.add_argument("--cv", type=int, default=0, metavar="K",
                   help="also report K-fold leave-phrasings-out cross-validation on --conversations (how "
                        "settings are chosen: it never reads test_unseen)")
    p.add_argument("--threshold", type=float, default=0.5, help="the runtime's (asks.Asks) for the report")
    p.add_argument("--changed_from", metavar="OLD", default=None,
                   help="list the turns of --changed_in whose step this head reads otherwise than OLD: a head "
                        "(.npz), or the JSON lines --readings_out wrote for it (needed when the cue table changed)")
    p.add_argument("--changed_in", nargs="*", default=[], metavar="FILE", help="conversations files for --changed_from")
    p.add_argument("--changed_out", default="changed_turns.jsonl",
                   help="where --changed_from writes them (JSON lines: `talkplay eval --only-turns` reads it)")
    p.add_argument("--readings_out", metavar="FILE", default=None,
                   help="write the step this head reads on each follow-up turn of --changed_in (JSON lines)")
    p.add_argument("--out", default=str(HEAD_FILE))
    p.add_argument("--write", action="store_true", help="write the head to --out (else only report)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    from talkplay_edge.conversations import read_conversations
    from talkplay_edge.text_encoder import TextEncoder

    t = time.time()
    turns = labelled_turns(read_conversations(args.conversations, args.limit or None))
    pairs = [(m, k) for m, k, _, _ in turns]
    if not pairs:
        raise SystemExit(f"{args.conversations}: no user turns with intents (meta.intents) to learn from")
    counts: dict[tuple[str, str], int] = {}
    for pair in pairs:
        counts[pair] = counts.get(pair, 0) + 1
    encoder = TextEncoder()
    embed = remembering(encoder.encode)
    X = embed([m for m, _ in counts], progress=not args.json)
    # each distinct phrasing counts once: weighting by how often a template recurs makes the head sure of
    # itself on phrasings it never saw (held-out: right in 54% of the turns it speaks on, against 72%)
    messages = [m for m, _ in counts]
    fit_args = {"l2": args.l2, "word_weight": args.word_weight, "cue_weight": args.cue_weight,
                "cue_fallback": args.cue_fallback}
    head = fit_head(X, [k for _, k in counts], encoder=encoder.name, encoder_version=encoder.version,
                    messages=messages, **fit_args)
    report = {"conversations": args.conversations, "limit": args.limit, "turns": len(pairs),
              "distinct": len(counts), **fit_args, "words": len(head.words), "cues": len(head.cues),
              "threshold": args.threshold, "train": score(head, X, [k for _, k in counts], args.threshold, messages)}
    if args.cv:
        row = {m: i for i, m in enumerate(messages)}
        report["cv"] = cross_validate(turns, lambda ms: X[[row[m] for m in ms]], args.cv, args.threshold,
                                      **fit_args)
    held = args.held_out
    if held is None:
        d = Path(args.conversations).parent
        held = [str(f) for f in (d / "valid.jsonl", d / "test_unseen.jsonl") if f.is_file()]
    for f in held:
        # follow-up turns only: the runtime reads no step on a first turn (nothing played to step from)
        pairs_f = [(m, k) for m, k, _, n in labelled_turns(read_conversations(f)) if n > 1]
        if pairs_f:
            ms = [m for m, _ in pairs_f]
            report[Path(f).stem] = score(head, embed(ms), [k for _, k in pairs_f], args.threshold, ms)
    if args.readings_out:
        with open(args.readings_out, "w", encoding="utf-8") as out:
            for f in args.changed_in:
                out.writelines(json.dumps(r) + "\n" for r in readings(head, read_conversations(f), embed,
                                                                      args.threshold))
        report["readings_out"] = args.readings_out
    if args.changed_from:
        if args.changed_from.endswith((".jsonl", ".json")):
            with open(args.changed_from, encoding="utf-8") as f:
                old = [json.loads(line) for line in f if line.strip()]
        else:
            try:
                old = AskHead.load(args.changed_from)
            except AskHeadError as e:
                raise SystemExit(f"--changed_from: {e}; or pass the readings that head's code wrote "
                                 "(--readings_out)") from None
        changed = []
        for f in args.changed_in:
            try:
                rows = changed_turns(old, head, read_conversations(f), embed, args.threshold)
            except ValueError as e:
                raise SystemExit(f"--changed_from {args.changed_from}: {e}") from None
            report[f"changed in {Path(f).stem}"] = len(rows)
            changed += rows
        with open(args.changed_out, "w", encoding="utf-8") as out:
            out.writelines(json.dumps(r) + "\n" for r in changed)
        report["changed_out"] = args.changed_out
    if args.write:
        head.save(args.out)
        report["written"] = args.out
    report["seconds"] = round(time.time() - t, 1)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        for k, v in report.items():
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
