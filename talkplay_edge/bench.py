"""`talkplay bench`: how fast the on-device runtime is, and whether the trie scales to a million tracks.

Measured on the given model and catalog (threads as given, 2 by default):

- model load time (GGUF + catalog trie + llama context);
- per chat turn (one session, ``turns`` prompts, KV cache kept across turns): time from sending the message
  to the first track being known (p50/p95) and the full reply latency (p50/p95);
- decode speed: constrained span steps (trie-masked) vs free text steps (music tokens masked) vs a raw
  decode loop without any mask (tokens/s);
- peak RSS of the process (and the KV cache's type and size: ``$TALKPLAY_KV_CACHE``).

Scale check (no model): a synthetic trie of ``trie_tracks`` codes (five 1024-way modality tokens, skewed,
some ``none``, collisions resolved with dup tokens like the real catalog): build time, its memory (array
bytes and RSS growth), and the per-step mask time — allowed ids of a node (with 1,000 tracks excluded in the
session) + gather of their logits + argmax — over random root-to-leaf walks, against the 2 ms target; the
cost of a naive full-vocabulary mask is printed beside it.
"""

from __future__ import annotations

import gc
import resource
import time

import numpy as np

PROMPTS = [
    "Play me something upbeat for a morning run.",
    "I want calm acoustic music for studying.",
    "Something like 80s synth pop, please.",
    "Give me a sad song for a rainy evening.",
    "Any good hip hop from the nineties?",
    "Recommend a rock anthem to sing along to.",
    "More like that, but slower.",
    "Something with a female vocalist.",
    "A dance track for a party tonight.",
    "Jazz for a quiet dinner.",
    "Something I have probably never heard.",
    "A classic from the seventies.",
]


def rss_mb() -> float:
    """This process's resident memory now, in MiB (/proc/self/statm)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:  # pragma: no cover
        return float("nan")


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _pct(xs, q) -> float:
    return float(np.percentile(np.asarray(xs, dtype=float), q)) if xs else float("nan")


def bench_model(model=None, catalog=None, threads: int = 2, n_ctx: int = 2048, turns: int = 20,
                max_new_tokens: int = 48, kv_cache: str | None = None, guard: bool = True) -> dict:
    from .runtime import TalkPlay

    t0 = time.perf_counter()
    tp = TalkPlay.load(model, catalog, threads=threads, n_ctx=n_ctx, kv_cache=kv_cache)
    load_s = time.perf_counter() - t0
    out: dict = {"model": str(tp.model_path), "catalog": str(tp.catalog.path), "threads": threads,
                 "tracks": len(tp.track_ids), "trie_nodes": tp.trie.n_nodes, "load_s": load_s,
                 "kv_cache": tp.kv_cache, "n_ctx": tp.n_ctx, "guard": guard}
    # warm-up turn (graph allocation), not counted
    tp.chat(max_new_tokens=4).send("hello")
    session = tp.chat(max_new_tokens=max_new_tokens, guard=guard)
    first, total, span_tok, span_s, text_tok, text_s, prefill = [], [], 0, 0.0, 0, 0.0, []
    span_mask_s = text_mask_s = 0.0
    backoffs, guard_s = 0, 0.0  # false claims the reply guard took back, and its time (reading, taking back)
    for i in range(turns):
        if session.excl.exhausted:
            session.reset()
        r = session.send(PROMPTS[i % len(PROMPTS)])
        tm = r.timings
        if tm.get("first_track_s") is not None:
            first.append(tm["first_track_s"])
        total.append(tm["total_s"])
        prefill.append(tm["prefill_s"])
        span_tok += tm["span_tokens"]
        span_s += tm["span_s"]
        text_tok += tm["text_tokens"]
        text_s += tm["text_s"]
        span_mask_s += tm["span_mask_s"]
        text_mask_s += tm["text_mask_s"]
        backoffs += tm.get("backoffs", 0)
        guard_s += tm.get("guard_s", 0.0)
    # raw decode loop, no masks: same context, greedy argmax over the full logits
    with tp._lock:
        logits = tp._sync(tp.tokenize_segments([("<|im_start|>", True), ("user\nhello", False)]))
        n_raw, t = 64, time.perf_counter()
        for _ in range(n_raw):
            tok = int(np.argmax(logits))
            logits = tp._append([tok])
        raw_s = time.perf_counter() - t
        # beam search ranking of 5 tracks from a fresh prompt
        logits = tp._sync(tp.tokenize_segments([("<|im_start|>", True), ("user\nsomething calm", False),
                                                ("<|im_end|>", True), ("\n", False), ("<|im_start|>", True),
                                                ("assistant\n", False), ("<|music_start|>", True)]))
        from .trie import Exclusions

        t = time.perf_counter()
        ranked = tp.rank(Exclusions(tp.trie), logits, 5)
        beam5_s = time.perf_counter() - t
    out.update(
        turns=turns, max_new_tokens=max_new_tokens,
        first_track_p50_s=_pct(first, 50), first_track_p95_s=_pct(first, 95),
        reply_p50_s=_pct(total, 50), reply_p95_s=_pct(total, 95), prefill_p50_s=_pct(prefill, 50),
        constrained_tok_s=span_tok / span_s if span_s else float("nan"),
        text_tok_s=text_tok / text_s if text_s else float("nan"),
        raw_tok_s=n_raw / raw_s, beam5_s=beam5_s, beam5_found=len(ranked),
        span_mask_us=span_mask_s / span_tok * 1e6 if span_tok else float("nan"),
        text_mask_us=text_mask_s / text_tok * 1e6 if text_tok else float("nan"), backoffs=backoffs,
        guard_ms_per_reply=guard_s / len(total) * 1e3 if total else float("nan"),
        compactions=session.compactions,
    )
    tp.close()
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def synthetic_codes(n_tracks: int, k: int = 1024, seed: int = 0, base: int = 49152) -> np.ndarray:
    """``n_tracks`` distinct token-id sequences shaped like real codes (5 modality tokens, optional dup, end),
    as a (n, 7) array padded with -1. Token ids: modality m's none token at ``base + 2 + m*(k+1)``, its
    clusters after it, dups after all modalities, end = ``base + 1``."""
    rng = np.random.default_rng(seed)
    end = base + 1
    cols = []
    for m in range(5):
        c = (k * rng.random(n_tracks) ** 2).astype(np.int64)  # skewed cluster sizes (the biggest ~30× the median)
        c = rng.permutation(k)[c]
        none = rng.random(n_tracks) < (0.9 if m == 3 else 0.1)  # lyrics mostly missing
        cols.append(np.where(none, base + 2 + m * (k + 1), base + 3 + m * (k + 1) + c))
    five = np.stack(cols, axis=1)
    # collisions → dup numbers (0 for the first of each group)
    order = np.lexsort(five.T[::-1])
    sorted5 = five[order]
    new = np.r_[True, (sorted5[1:] != sorted5[:-1]).any(axis=1)]
    group_start = np.maximum.accumulate(np.where(new, np.arange(n_tracks), 0))
    dup_sorted = np.arange(n_tracks) - group_start
    dup = np.empty(n_tracks, dtype=np.int64)
    dup[order] = dup_sorted
    dup_base = base + 2 + 5 * (k + 1)
    seqs = np.full((n_tracks, 7), -1, dtype=np.int64)
    seqs[:, :5] = five
    has = dup > 0
    seqs[has, 5] = dup_base + dup[has] - 1
    seqs[has, 6] = end
    seqs[~has, 5] = end
    return seqs


def bench_trie(n_tracks: int = 1_000_000, n_vocab: int = 49152 + 2 + 5 * 1025 + 512, steps: int = 3000,
               n_excluded: int = 1000, seed: int = 0) -> dict:
    from .trie import CodeTrie, Exclusions

    seqs = synthetic_codes(n_tracks, seed=seed)
    dup_base = 49152 + 2 + 5 * 1025
    dup_tracks = int((seqs[:, 5] >= dup_base).sum())
    max_dup = int(seqs[:, 5].max()) - dup_base + 1 if dup_tracks else 0
    n_vocab = max(n_vocab, int(seqs.max()) + 1)
    gc.collect()
    rss0 = rss_mb()
    t = time.perf_counter()
    trie = CodeTrie.build(seqs)
    build_s = time.perf_counter() - t
    del seqs
    gc.collect()
    rss1 = rss_mb()
    rng = np.random.default_rng(seed)
    excl = Exclusions(trie, rng.choice(n_tracks, size=min(n_excluded, n_tracks - 1), replace=False).tolist())
    logits = rng.normal(size=n_vocab).astype(np.float32)
    times, fanouts = [], []
    warm = 50  # first steps touch cold pages: not counted
    while len(times) < steps + warm:
        node = 0
        while trie.track[node] < 0:
            t = time.perf_counter_ns()
            toks, kids = excl.allowed(node)
            k = int(np.argmax(logits[toks.astype(np.int64)]))
            times.append(time.perf_counter_ns() - t)
            fanouts.append(len(toks))
            node = int(kids[k]) if rng.random() < 0.5 else int(kids[rng.integers(len(kids))])
        logits = rng.normal(size=n_vocab).astype(np.float32)
    us = np.asarray(times[warm:]) / 1000
    fanouts = fanouts[warm:]
    # naive full-vocabulary mask for comparison
    t = time.perf_counter()
    for _ in range(200):
        mask = np.full(n_vocab, -np.inf, dtype=np.float32)
        toks, _ = excl.allowed(0)
        mask[toks.astype(np.int64)] = 0
        int(np.argmax(logits + mask))
    naive_us = (time.perf_counter() - t) / 200 * 1e6
    return {"trie_tracks": n_tracks, "synthetic_nodes": trie.n_nodes, "trie_build_s": build_s,
            "trie_array_mb": trie.nbytes / 2**20, "trie_rss_growth_mb": rss1 - rss0,
            "dup_tracks": dup_tracks, "max_dup": max_dup, "mask_steps": len(us), "mask_mean_us": float(us.mean()),
            "mask_p50_us": float(np.percentile(us, 50)), "mask_p95_us": float(np.percentile(us, 95)),
            "mask_max_us": float(us.max()), "max_fanout": int(max(fanouts)),
            "naive_full_vocab_mask_us": naive_us, "target_us": 2000.0}


def run_bench(model=None, catalog=None, threads: int = 2, n_ctx: int = 2048, turns: int = 20,
              max_new_tokens: int = 48, trie_tracks: int = 1_000_000, kv_cache: str | None = None,
              guard: bool = True) -> dict:
    out = bench_model(model, catalog, threads=threads, n_ctx=n_ctx, turns=turns, max_new_tokens=max_new_tokens,
                      kv_cache=kv_cache, guard=guard)
    if trie_tracks:
        out.update(bench_trie(trie_tracks))
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def format_table(r: dict) -> str:
    rows = [
        ("model", r["model"]),
        ("catalog", f"{r['catalog']} ({r['tracks']} tracks, {r['trie_nodes']} trie nodes)"),
        ("threads", r["threads"]),
        ("KV cache", f"{r.get('kv_cache', '?')}, {r.get('n_ctx', '?')} tokens"),
        ("model load", f"{r['load_s'] * 1000:.0f} ms"),
        ("first track known", f"p50 {r['first_track_p50_s'] * 1000:.0f} ms   p95 {r['first_track_p95_s'] * 1000:.0f} ms"),
        ("full reply", f"p50 {r['reply_p50_s'] * 1000:.0f} ms   p95 {r['reply_p95_s'] * 1000:.0f} ms "
                       f"({r['turns']} turns, ≤{r['max_new_tokens']} new tokens, prefill p50 "
                       f"{r['prefill_p50_s'] * 1000:.0f} ms)"),
        ("constrained (span)", f"{r['constrained_tok_s']:.0f} tok/s"),
        ("text (music masked)", f"{r['text_tok_s']:.0f} tok/s"),
        ("raw decode, no mask", f"{r['raw_tok_s']:.0f} tok/s (short context)"),
        ("token choice overhead", f"span {r['span_mask_us']:.0f} µs/token (trie mask + pick), text "
                                  f"{r['text_mask_us']:.0f} µs/token (music mask + pick)"),
        ("reply guard", f"{r['guard_ms_per_reply']:.1f} ms per reply (reading claims, taking back "
                        f"{r['backoffs']} false ones)" if r.get("guard") else "off (--no-guard)"),
        ("beam search, n=5", f"{r['beam5_s'] * 1000:.0f} ms ({r['beam5_found']} tracks)"),
        ("peak RSS", f"{r['peak_rss_mb']:.0f} MB"),
    ]
    if "trie_tracks" in r:
        ok = "OK" if r["mask_p95_us"] <= r["target_us"] else "OVER TARGET"
        rows += [
            ("synthetic trie", f"{r['trie_tracks']:,} tracks, {r['synthetic_nodes']:,} nodes, {r['dup_tracks']:,} with a dup token (max dup {r['max_dup']}), "
                               f"built in {r['trie_build_s']:.1f} s"),
            ("trie memory", f"{r['trie_array_mb']:.0f} MB arrays, RSS +{r['trie_rss_growth_mb']:.0f} MB"),
            ("mask per step", f"mean {r['mask_mean_us']:.0f} µs  p95 {r['mask_p95_us']:.0f} µs  max "
                              f"{r['mask_max_us']:.0f} µs (target ≤ 2000 µs: {ok}; fan-out ≤ {r['max_fanout']})"),
            ("naive full-vocab mask", f"{r['naive_full_vocab_mask_us']:.0f} µs per step"),
        ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)
