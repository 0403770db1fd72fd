"""The chat's one-track pick against the beam search's first, on the same turns.

    python -m bench.chat_pick --conversations conversations/test.jsonl --first 1 --last 150 \
        --ranks docs/ranks/model-test-1-150.jsonl.gz --json

``talkplay eval --system model`` ranks 100 tracks by beam search, and its Hit@1 is the beam's first track.
A chat turn (``ChatSession.send`` with n = 1) picks one track greedily instead: the best-scored child at each
step of the span. This script makes that pick on every scored turn's ground-truth history (as the eval sees
it: earlier answers as their ground-truth spans, played tracks excluded) and counts how often it is the
target, next to the turns whose beam rank (from an eval ``--ranks`` file of the same turns) is 1.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from math import comb

import numpy as np

from talkplay_edge.evaluate import iter_turns
from talkplay_edge.runtime import Exclusions, ModelRecommender, is_cold, user_turns


def chat_pick(rec: ModelRecommender, history: list[dict], played: list[str]) -> str:
    """The track a chat turn picks for ``history`` (ending with the user message) with ``played`` excluded:
    ``TalkPlay.pick_span`` with argmax, as ``ChatSession.send`` picks it."""
    tp = rec.tp
    excl = Exclusions(tp.trie, [tp.track_index[i] for i in played if i in tp.track_index])
    excl = tp.turn_exclusions(excl, (user_turns(history) or [""])[-1])
    with tp._lock:
        tp._switch_to(-1)
        logits = tp._sync(rec._prompt(history))
        _, track, _, _ = tp.pick_span(excl, logits, lambda scores: int(np.argmax(scores)),
                                      tp.retrieval_prior(history, set(played)), is_cold(history),
                                      tp.played_marks(history))
    return tp.track_ids[track]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--conversations", required=True)
    p.add_argument("--first", type=int, default=1, help="First conversation (1-based).")
    p.add_argument("--last", type=int, default=150, help="Last conversation (inclusive).")
    p.add_argument("--ranks", required=True, help="An eval --ranks file (.jsonl or .jsonl.gz) of the same turns.")
    p.add_argument("--model", default=None)
    p.add_argument("--catalog", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    opener = gzip.open if a.ranks.endswith(".gz") else open
    with opener(a.ranks, "rt") as f:
        beam = {(r["conversation"], r["turn"]): r["rank"] for r in map(json.loads, f)}
    with open(a.conversations) as f:
        convs = [json.loads(line) for line in f][a.first - 1:a.last]
    rec = ModelRecommender(a.catalog, threads=a.threads, model=a.model)
    ids = set(rec.tp.track_ids)
    t0 = time.perf_counter()
    turns = picked = first = both = missing = 0
    for conv in convs:
        for idx, history, targets, played in iter_turns(conv):
            live = [t for t in targets if t in ids and t not in set(played)]
            if not live:
                continue
            if (conv["id"], idx) not in beam:
                missing += 1
                continue
            hit = chat_pick(rec, history, played) in live
            top = beam[(conv["id"], idx)] == 1
            turns, picked, first, both = turns + 1, picked + hit, first + top, both + (hit and top)
    only_pick, only_beam = picked - both, first - both
    n, k = only_pick + only_beam, min(only_pick, only_beam)
    out = {"conversations": len(convs), "turns": turns, "turns_without_a_beam_rank": missing,
           "chat_pick_hits": picked, "beam_first_hits": first, "both": both, "chat_pick_only": only_pick,
           "beam_only": only_beam,  # McNemar's exact test on the turns only one gets
           "mcnemar_p": min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0,
           "seconds_per_turn": (time.perf_counter() - t0) / max(turns, 1)}
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{turns} turns: the chat's pick hits {picked} ({picked / max(turns, 1):.2%}), the beam's first "
              f"{first} ({first / max(turns, 1):.2%}); both {both}, only the pick {only_pick}, only the beam "
              f"{only_beam} (McNemar p = {out['mcnemar_p']:.3f}); {out['seconds_per_turn']:.2f} s a turn")
    rec.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
