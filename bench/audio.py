"""Benchmark: audio files analysed per second (talkplay_edge.audio.analyze_file) on N threads.

    python bench/audio.py [--threads 2] [--repeat 2] [FILES_OR_DIRS ...]

Default input: the real clips in ../shared/data/audio (see the .txt licence file beside each clip).
The tagger (onnxruntime) gets ``--threads`` intra-op threads; the numpy DSP runs on one. One warm-up
file is analysed first (session start-up and first-call costs are reported separately).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from talkplay_edge.audio import AudioTagger, analyze_file

ROOT = Path(__file__).resolve().parents[1]
AUDIO_EXT = {".ogg", ".flac", ".wav", ".mp3", ".m4a", ".opus", ".aiff", ".aif"}


def collect(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths or [ROOT.parent / "shared" / "data" / "audio"]):
        files += sorted(f for f in p.rglob("*") if f.suffix.lower() in AUDIO_EXT) if p.is_dir() else [p]
    return files


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="*")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args(argv)
    files = collect(args.paths)
    if not files:
        raise SystemExit("no audio files found")
    t0 = time.perf_counter()
    tagger = AudioTagger(threads=args.threads)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    analyze_file(files[0], tagger=tagger)
    warm_s = time.perf_counter() - t0
    per_file: dict[str, float] = {}
    audio_s = 0.0
    t0 = time.perf_counter()
    for _ in range(args.repeat):
        for f in files:
            t = time.perf_counter()
            a = analyze_file(f, tagger=tagger)
            per_file[f.name] = min(per_file.get(f.name, 1e9), time.perf_counter() - t)
            audio_s += a.duration_s
    total = time.perf_counter() - t0
    n = len(files) * args.repeat
    result = {"files": len(files), "repeat": args.repeat, "threads": args.threads,
              "model_load_s": round(load_s, 3), "warmup_file_s": round(warm_s, 3),
              "files_per_s": round(n / total, 3), "audio_seconds_per_s": round(audio_s / total, 1),
              "best_s_per_file": {k: round(v, 3) for k, v in per_file.items()}}
    for k, v in result["best_s_per_file"].items():
        print(f"{v:7.3f} s  {k}")
    print(f"{result['files_per_s']:.2f} files/s, {result['audio_seconds_per_s']:.0f}x real time "
          f"({n} analyses, {args.threads} threads; model load {load_s:.2f} s, first file {warm_s:.2f} s)")
    print(json.dumps({k: v for k, v in result.items() if k != "best_s_per_file"}))
    return result


if __name__ == "__main__":
    main()
