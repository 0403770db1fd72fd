"""What the KV cache's type costs: memory, prefill and decode speed, f16 against q8_0.

    python -m bench.kv_cache                       # the default model, 2 threads, both types
    python -m bench.kv_cache --types q8_0 --json   # one type, JSON

Each type runs in its own process (so one type's freed memory does not flatter the next): load the model,
then, five times over, clear the cache, prefill a 100-token prompt, prefill 200 more tokens after it and
decode 30 tokens one at a time; the medians of the last four rounds are reported with the cache's size
(``llama_state_seq_get_size`` after 300 tokens: what a session snapshot copies) and the process's peak RSS.
The prompt is ordinary text; music spans cost the same per token.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from talkplay_edge.bench import peak_rss_mb  # noqa: E402
from talkplay_edge.runtime import KV_CACHE_TYPES  # noqa: E402

TEXT = "Play me something upbeat for a morning run, like the eighties synth pop I love. " * 30


def measure(kind: str, model=None, catalog=None, threads: int = 2, rounds: int = 5) -> dict:
    from talkplay_edge.runtime import TalkPlay

    tp = TalkPlay.load(model, catalog, threads=threads, kv_cache=kind)
    lc = tp._llama_cpp
    tokens = tp.model.tokenize(TEXT.encode(), add_bos=False, special=False)[:330]
    times = []
    with tp._lock:
        for _ in range(rounds):
            lc.llama_memory_clear(tp._mem, True)
            t0 = time.perf_counter()
            tp._decode(tokens[:100], 0)
            t1 = time.perf_counter()
            tp._decode(tokens[100:300], 100)
            t2 = time.perf_counter()
            for i in range(30):
                tp._decode(tokens[300 + i:301 + i], 300 + i)
            times.append((t1 - t0, t2 - t1, (time.perf_counter() - t2) / 30))
        snapshot = int(lc.llama_state_seq_get_size(tp.ctx.ctx, 0))
        lc.llama_memory_clear(tp._mem, True)
    tp.close()
    med = np.median(np.asarray(times[1:]), axis=0)
    return {"kv_cache": kind, "threads": threads, "prefill_100_ms": med[0] * 1e3, "prefill_200_after_100_ms": med[1] * 1e3,
            "decode_ms_per_token": med[2] * 1e3, "snapshot_300_tokens_mb": snapshot / 2**20,
            "peak_rss_mb": peak_rss_mb()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="GGUF (default: the embedded model, built on first use)")
    ap.add_argument("--catalog", default=None, help="catalog.db (default: the embedded one)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", nargs="+", default=list(KV_CACHE_TYPES), choices=list(KV_CACHE_TYPES))
    ap.add_argument("--json", action="store_true", help="print JSON")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one type in this process
    a = ap.parse_args(argv)
    if a.one:
        print(json.dumps(measure(a.one, a.model, a.catalog, a.threads)))
        return
    results = []
    for kind in a.types:
        cmd = [sys.executable, "-m", "bench.kv_cache", "--one", kind, "--threads", str(a.threads)]
        cmd += ["--model", a.model] if a.model else []
        cmd += ["--catalog", a.catalog] if a.catalog else []
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
        if out.returncode:
            sys.exit(f"bench.kv_cache: {kind} failed:\n{out.stderr.strip()[-2000:]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    if a.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{'KV cache':<9} {'prefill 100':>12} {'+200 after':>11} {'decode':>10} {'snapshot@300':>13} {'peak RSS':>9}")
    for r in results:
        print(f"{r['kv_cache']:<9} {r['prefill_100_ms']:>9.0f} ms {r['prefill_200_after_100_ms']:>8.0f} ms "
              f"{r['decode_ms_per_token']:>7.1f} ms {r['snapshot_300_tokens_mb']:>10.1f} MB {r['peak_rss_mb']:>6.0f} MB")


if __name__ == "__main__":
    main()
