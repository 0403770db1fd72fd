"""Benchmark: files indexed per second by `talkplay index` (talkplay_edge.indexer.index_folder) on N threads.

    python bench/index.py [--threads 2] [--repeat 2] [--catalog FILE] [--batch-size 8] [FILES_OR_DIRS ...]

Default input: the real clips in ../shared/data/audio (see the .txt licence file beside each clip),
copied into a temporary folder. Each repeat indexes them into a fresh temporary copy of the catalog
(``--catalog``; default the embedded catalog.db when it exists, else a tiny catalog built from the
test suite's fake data), so every repeat does the full work. The text encoder and the musicnn tagger
are loaded once before timing (their load time is reported separately); files/s counts every file
the run processed (indexed + failed) over the whole ``index_folder`` call (walk, tags, audio analysis,
embedding, tokenising, SQLite writes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AUDIO_EXT = {".ogg", ".flac", ".wav", ".mp3", ".m4a", ".opus", ".aiff", ".aif"}


def collect(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths or [ROOT.parent / "shared" / "data" / "audio"]):
        files += sorted(f for f in p.rglob("*") if f.suffix.lower() in AUDIO_EXT) if p.is_dir() else [p]
    return files


def tiny_catalog(tmp: Path, encoder) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from fakedata import write_fake_data

    from talkplay_edge.catalog_build import build_catalog
    from talkplay_edge.sources import load_sources

    out = tmp / "tiny-catalog.db"
    build_catalog(load_sources(write_fake_data(tmp / "fake-data")), out, encoder, k=8, quiet=True)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="*")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--catalog", type=Path, default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("TALKPLAY_PROGRESS", "0")
    files = collect(args.paths)
    if not files:
        raise SystemExit("no audio files found")

    from talkplay_edge.audio import AudioTagger
    from talkplay_edge.indexer import index_folder
    from talkplay_edge.paths import embedded_catalog_path
    from talkplay_edge.text_encoder import TextEncoder

    t0 = time.perf_counter()
    encoder = TextEncoder(threads=args.threads)
    tagger = AudioTagger(threads=args.threads)
    load_s = time.perf_counter() - t0

    with tempfile.TemporaryDirectory(prefix="talkplay-bench-index-") as tmp_s:
        tmp = Path(tmp_s)
        src = args.catalog or (embedded_catalog_path() if embedded_catalog_path().is_file() else None)
        catalog_kind = "given" if args.catalog else "embedded" if src else "tiny (fake data, k=8)"
        src = src or tiny_catalog(tmp, encoder)
        music = tmp / "music"
        music.mkdir()
        for i, f in enumerate(files):
            shutil.copy(f, music / f"{i:03d}-{f.name}")
        runs = []
        for r in range(args.repeat):
            db = tmp / f"run{r}.db"
            shutil.copy(src, db)
            s = index_folder(music, db, encoder=encoder, tagger=tagger, progress=False, batch_size=args.batch_size,
                             warn=lambda line: print(line, file=sys.stderr))
            runs.append({"files": s.indexed + s.failed, "indexed": s.indexed, "failed": s.failed,
                         "seconds": round(s.elapsed_s, 3), "files_per_s": round(s.files_per_s, 3)})
            db.unlink()
        shutil.copy(src, tmp / "rerun.db")
        index_folder(music, tmp / "rerun.db", encoder=encoder, tagger=tagger, progress=False)
        s = index_folder(music, tmp / "rerun.db", encoder=encoder, tagger=tagger, progress=False)
        unchanged_s = s.elapsed_s

    best = max(runs, key=lambda x: x["files_per_s"])
    audio_s = sum(f.stat().st_size for f in files)
    result = {
        "threads": args.threads, "files": len(files), "input_bytes": audio_s, "catalog": catalog_kind,
        "batch_size": args.batch_size, "model_load_s": round(load_s, 3), "runs": runs,
        "best_files_per_s": best["files_per_s"], "unchanged_rerun_s": round(unchanged_s, 4),
        "cpu": platform.processor() or platform.machine(), "cpus_visible": os.cpu_count(),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
