"""How readily the model opens a music span with ``<|cf_none|>``, the code of CF-cold tracks.

    python -m bench.cf_none                                  # the default model, first 20 test conversations
    python -m bench.cf_none --model M.gguf --conversations conversations/test.jsonl -n 50 --json

For every assistant turn it prefills the conversation so far (earlier answers as their ground-truth spans,
exactly as ``talkplay eval --system model`` does) up to ``<|music_start|>`` and takes the softmax over the
first span step's allowed tokens (the trie root's children). It reports the mean probability of
``<|cf_none|>`` and how often it is the top choice, split by whether the turn's answer is CF-cold. Most test
answers are cold (their playlists never fed item2vec), so a model that gives ``<|cf_none|>`` little
probability cannot reach them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from talkplay_edge.runtime import ModelRecommender  # noqa: E402
from talkplay_edge.tokens import NONE, modality_token  # noqa: E402

CF_NONE = modality_token("cf", NONE)


def measure(rec: ModelRecommender, conversations: list[dict]) -> dict:
    tp = rec.tp
    root_tokens = np.asarray(tp.trie.children(0)[0], dtype=np.int64)
    k = int(np.flatnonzero(root_tokens == tp.music_ids[CF_NONE])[0])
    rows: dict[str, list[tuple[float, bool]]] = {"cold": [], "warm": []}
    for conv in conversations:
        turns = conv["turns"]
        for i, turn in enumerate(turns):
            if turn["role"] != "assistant" or not turn.get("track_ids"):
                continue
            target = turn["track_ids"][0]
            if target not in tp.track_index:
                continue
            cold = CF_NONE in tp.catalog.span(target)
            with tp._lock:
                tp._switch_to(-1)
                logits = np.array(tp._sync(rec._prompt(turns[:i])))[root_tokens]
            p = np.exp(logits - logits.max())
            p /= p.sum()
            rows["cold" if cold else "warm"].append((float(p[k]), int(p.argmax()) == k))
    return {key: {"turns": len(v), "mean_p_cf_none": float(np.mean([x for x, _ in v])) if v else None,
                  "top_choice_share": float(np.mean([t for _, t in v])) if v else None}
            for key, v in rows.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="GGUF (default: the embedded model, built on first use)")
    ap.add_argument("--catalog", default=None, help="catalog.db (default: the embedded one)")
    ap.add_argument("--conversations", default="conversations/test.jsonl")
    ap.add_argument("-n", type=int, default=20, help="first N conversations")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    with open(args.conversations) as f:
        conversations = [json.loads(line) for _, line in zip(range(args.n), f)]
    rec = ModelRecommender(args.catalog, threads=args.threads, model=args.model)
    try:
        result = measure(rec, conversations)
    finally:
        rec.close()
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for key, r in result.items():
        if r["turns"]:
            print(f"{key:5} answers: {r['turns']:4} turns  mean p({CF_NONE}) {r['mean_p_cf_none']:.4f}  "
                  f"top choice {r['top_choice_share']:.2f}")


if __name__ == "__main__":
    main()
