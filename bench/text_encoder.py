"""Throughput of the shipped MiniLM text encoder (onnxruntime + tokenizers, no torch).

    python -m bench.text_encoder                 # 2 threads: short (~12 words) and medium (~60 words) texts
    python -m bench.text_encoder --json          # the same as JSON
    python -m bench.text_encoder --threads 1 --repeat 5

Measures ``TextEncoder.encode`` end to end (tokenisation, length-sorted batching, onnxruntime), best of
``--repeat`` runs over distinct texts (so deduplication never helps), after one warm-up run; plus the latency
of a single chat message (batch of one, median), the session load time and the memory it takes (RSS growth
over loading it and one warm-up text). Also reports process CPU time per text and the load average, and
warns when other work was competing for the CPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from talkplay_edge.bench import rss_mb  # noqa: E402
from talkplay_edge.text_encoder import TextEncoder, _release_free_heap  # noqa: E402

WORDS = ("midnight summer love fire city heart river golden electric lonely neon wild dream ocean highway broken "
         "velvet silver thunder paradise shadow dancing rain echo stardust honey gravity sunset ghost wonder fever "
         "crystal satellite mellow upbeat rock jazz pop soul funk disco ballad acoustic guitar piano drums synth "
         "rainy drive night party chill vibes classic indie folk latin reggaeton country blues").split()


def short_texts(n: int, seed: int = 0) -> list[str]:
    """~12-word metadata/tag-like texts: "Title — Artist · Album · Year, tags"."""
    rng = random.Random(seed)
    out = set()
    while len(out) < n:
        w = lambda k: " ".join(rng.choice(WORDS) for _ in range(k)).title()  # noqa: E731
        out.add(f"{w(2)} — {w(2)} · {w(3)} · {rng.randint(1950, 2024)}, {rng.choice(WORDS)}, {rng.choice(WORDS)} {rng.choice(WORDS)}")
    return sorted(out)


def medium_texts(n: int, seed: int = 1) -> list[str]:
    """~60-word texts: a chat request with context or a tag-heavy description."""
    rng = random.Random(seed)
    out = set()
    while len(out) < n:
        out.add("I'm looking for " + " ".join(rng.choice(WORDS) for _ in range(57)) + " please")
    return sorted(out)


def measure(enc: TextEncoder, texts: list[str], repeat: int, batch_size: int) -> dict:
    enc.encode(texts[: min(len(texts), 128)], batch_size=batch_size)  # warm-up
    times, cpu = [], []
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        enc.encode(texts, batch_size=batch_size)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    best = min(times)
    tokens = [len(e.ids) for e in enc._tok.encode_batch(texts)]
    return {"texts": len(texts), "words_per_text": round(statistics.mean(len(t.split()) for t in texts), 1),
            "tokens_per_text": round(statistics.mean(tokens), 1), "best_s": round(best, 3),
            "median_s": round(statistics.median(times), 3), "texts_per_s": round(len(texts) / best, 1),
            "ms_per_text": round(1e3 * best / len(texts), 3),
            "cpu_ms_per_text": round(1e3 * min(cpu) / len(texts), 3)}


def latency(enc: TextEncoder, n: int = 50) -> dict:
    msgs = [f"something mellow for a rainy drive, like artist number {i}" for i in range(n)]
    enc.encode(msgs[:1])
    ts = []
    for m in msgs:
        t = time.perf_counter()
        enc.encode([m])
        ts.append(time.perf_counter() - t)
    return {"median_ms": round(1e3 * statistics.median(ts), 2), "p90_ms": round(1e3 * sorted(ts)[int(0.9 * n)], 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.text_encoder", description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--short", type=int, default=1024, help="number of short texts")
    ap.add_argument("--medium", type=int, default=256, help="number of medium texts")
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    load_before = os.getloadavg()[0]
    import onnxruntime  # noqa: F401 — imported before the first reading: its own memory is not the encoder's
    import tokenizers  # noqa: F401

    _release_free_heap()
    rss0 = rss_mb()
    t = time.perf_counter()
    enc = TextEncoder(args.model_dir, threads=args.threads)
    load_s = time.perf_counter() - t
    enc.encode(["warm up"])
    _release_free_heap()
    rss_growth = rss_mb() - rss0
    res = {
        "encoder": enc.name, "version": enc.version, "threads": args.threads, "batch_size": args.batch_size,
        "load_s": round(load_s, 2), "rss_growth_mb": round(rss_growth, 1),
        "int8_in_memory": {"tables": enc.int8_tables, "matrices": enc.int8_matrices},
        "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
        "short": measure(enc, short_texts(args.short), args.repeat, args.batch_size),
        "medium": measure(enc, medium_texts(args.medium), args.repeat, args.batch_size),
        "single_chat_message": latency(enc),
        "cpus": os.cpu_count(), "loadavg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    busy = max(res["loadavg_1m"]) > (os.cpu_count() or 1)
    res["contended"] = busy
    try:
        import onnxruntime

        res["onnxruntime"] = onnxruntime.__version__
    except ImportError:  # pragma: no cover
        pass
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"{enc.name}  {enc.version}  threads={args.threads}  batch={args.batch_size}  load {res['load_s']} s, "
          f"+{res['rss_growth_mb']} MB RSS (int8 in memory: {res['int8_in_memory']['tables']} tables, "
          f"{res['int8_in_memory']['matrices']} matrices)")
    print(f"{'texts':<8}{'n':>6}{'words':>8}{'tokens':>8}{'texts/s':>10}{'ms/text':>9}{'cpu ms':>8}")
    for k in ("short", "medium"):
        r = res[k]
        print(f"{k:<8}{r['texts']:>6}{r['words_per_text']:>8}{r['tokens_per_text']:>8}{r['texts_per_s']:>10}{r['ms_per_text']:>9}{r['cpu_ms_per_text']:>8}")
    lat = res["single_chat_message"]
    print(f"single chat message: median {lat['median_ms']} ms, p90 {lat['p90_ms']} ms")
    print(f"cpu ms/text (process time, all threads): short {res['short']['cpu_ms_per_text']}, "
          f"medium {res['medium']['cpu_ms_per_text']}; load average {res['loadavg_1m'][0]} → {res['loadavg_1m'][1]} "
          f"on {res['cpus']} CPUs")
    if busy:
        print("warning: the machine was busy with other work (load average > CPUs): wall-clock figures are low",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
