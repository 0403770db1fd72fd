"""Train the ask head (``talkplay_edge/asks.py``): which step a user message asks of the next track.

    python -m export.asks --write [--conversations conversations/train.jsonl] [--limit 20000]
                          [--held_out FILE ...] [--l2 0.0003] [--word_weight 0.5]
                          [--out talkplay_edge/models/ask_head.npz] [--json]

Every user turn of the training conversations is a (message, intent) pair (``meta.intents``, one per user
turn); intents that ask for a step map to the head's kinds (``asks.KINDS``: "Too slow for me" asks
"faster", "nah, not feeling that" another artist), the rest to "none". The distinct messages are embedded
once with the packaged MiniLM (~30 s on 2 cores for ~11k) and a softmax regression on the embedding and
the message's words (those of at least 2 distinct messages, at ``--word_weight``) is fitted by L-BFGS,
each distinct message counting once, with an L2 penalty: strong enough that the head stays unsure (and silent) on phrasings far from the ones it
saw, rather than confidently wrong. Held-out files (default: valid and, where present, test_unseen, whose
phrasings the training never uses) report accuracy and, for the turns where the head speaks, how often it
is right.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from talkplay_edge.asks import ASKS, HEAD_FILE, KINDS, NONE, OTHER_ARTIST, SAME_ARTIST, AskHead, words_of

# the conversations' intents (``conversations.py``) that ask for a step, by the kind they ask
INTENT_KIND = {**{k: k for k in ASKS}, "neg_too_slow": "faster", "neg_too_fast": "slower",
               "neg_too_mellow": "more_energy", "neg_too_sad": "happier", "neg_too_old": "newer",
               "other_artist": OTHER_ARTIST, "negative": OTHER_ARTIST, "same_artist": SAME_ARTIST}


def labelled_messages(conversations) -> list[tuple[str, str]]:
    """(user message, kind) of every user turn whose conversation lists its intents."""
    out = []
    for c in conversations:
        intents = (c.get("meta") or {}).get("intents")
        if not isinstance(intents, list):
            continue
        users = [t["content"] for t in c["turns"] if t["role"] == "user"]
        out += [(u, INTENT_KIND.get(i, NONE)) for u, i in zip(users, intents)]
    return out


def fit_head(embeddings: np.ndarray, kinds: list[str], l2: float = 3e-4, scale: float = 10.0,
             weights: np.ndarray | None = None, encoder: str = "", encoder_version: str = "",
             messages: list[str] | None = None, word_weight: float = 0.5, min_messages: int = 2) -> AskHead:
    """Softmax regression of ``kinds`` on ``embeddings`` (rows weighted by ``weights``, e.g. counts); with
    ``messages``, on their words too (those in at least ``min_messages`` of them, at ``word_weight``)."""
    import torch

    words: tuple[str, ...] = ()
    if messages is not None and word_weight:
        df: dict[str, int] = {}
        for m in messages:
            for w in words_of(m):
                df[w] = df.get(w, 0) + 1
        words = tuple(sorted(w for w, c in df.items() if c >= min_messages))
    shell = AskHead(np.zeros((np.shape(embeddings)[1] + len(words), len(KINDS))), np.zeros(len(KINDS)), KINDS,
                    scale, words=words, word_weight=word_weight)
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
                   word_weight)


def score(head: AskHead, embeddings: np.ndarray, kinds: list[str], threshold: float = 0.5,
          messages: list[str] | None = None) -> dict:
    """Accuracy, and for the turns where the head speaks (a kind other than none, at ``threshold``): how
    many, how many right, out of how many turns ask a step."""
    p = head.probabilities(embeddings, messages)
    pred = np.array(head.kinds)[p.argmax(1)]
    speaks = (pred != NONE) & (p.max(1) >= threshold)
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
    p.add_argument("--l2", type=float, default=3e-4)
    p.add_argument("--word_weight", type=float, default=0.5,
                   help="weight of the word features beside the embedding (0: embedding only)")
    p.add_argument("--threshold", type=float, default=0.5, help="the runtime's (asks.Asks) for the report")
    p.add_argument("--out", default=str(HEAD_FILE))
    p.add_argument("--write", action="store_true", help="write the head to --out (else only report)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    from talkplay_edge.conversations import read_conversations
    from talkplay_edge.text_encoder import TextEncoder

    t = time.time()
    pairs = labelled_messages(read_conversations(args.conversations, args.limit or None))
    if not pairs:
        raise SystemExit(f"{args.conversations}: no user turns with intents (meta.intents) to learn from")
    counts: dict[tuple[str, str], int] = {}
    for pair in pairs:
        counts[pair] = counts.get(pair, 0) + 1
    encoder = TextEncoder()
    X = encoder.encode([m for m, _ in counts], progress=not args.json)
    # each distinct phrasing counts once: weighting by how often a template recurs makes the head sure of
    # itself on phrasings it never saw (held-out: right in 54% of the turns it speaks on, against 72%)
    messages = [m for m, _ in counts]
    head = fit_head(X, [k for _, k in counts], args.l2, encoder=encoder.name, encoder_version=encoder.version,
                    messages=messages, word_weight=args.word_weight)
    report = {"conversations": args.conversations, "limit": args.limit, "turns": len(pairs), "distinct": len(counts), "l2": args.l2,
              "word_weight": args.word_weight, "words": len(head.words), "threshold": args.threshold,
              "train": score(head, X, [k for _, k in counts], args.threshold, messages)}
    held = args.held_out
    if held is None:
        d = Path(args.conversations).parent
        held = [str(f) for f in (d / "valid.jsonl", d / "test_unseen.jsonl") if f.is_file()]
    for f in held:
        pairs_f = labelled_messages(read_conversations(f))
        if pairs_f:
            ms = [m for m, _ in pairs_f]
            report[Path(f).stem] = score(head, encoder.encode(ms), [k for _, k in pairs_f], args.threshold, ms)
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
