"""Fault injection: damaged, foreign and mismatched files given to the CLI → one clear error, never a crash.

    python bench/faults.py [--model M] [--catalog C] [--flips 40] [--truncations 10] [--seed 0] [--json]

Each case writes one damaged copy (the originals are never touched) and runs
``talkplay ask --model … --catalog … --json "something calm"`` in a fresh process. A case passes when the
process either

- exits 0 with a real catalog track (the damage hit bytes that do not matter, e.g. a title's letter), or
- exits non-zero with a one-line error that names the damaged file and no Python traceback,

and the damaged file is byte-identical afterwards (nothing is "repaired" or lost). A signal death (abort,
segfault), a traceback, a hang (``--timeout``) or a wrong answer is a failure. Cases:

- model: truncated at random offsets; single bit flips in the metadata (tokenizer, hyper-parameters),
  in the tensor descriptions and in the tensor data; zero bytes; a text file; a foreign GGUF (the base
  SmolLM2 without music tokens); another vocabulary fingerprint;
- catalog: truncated; single bit flips anywhere (SQLite pages); an SQLite file with other tables; random
  bytes; zero bytes; a newer schema version; an edited vocabulary (fingerprint mismatch).

Defaults: the default model (built on first use) and the embedded catalog. The tests run the same
cases on the tiny test model (``tests/test_reliability_files.py``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Case:
    target: str      # "model" or "catalog"
    kind: str
    detail: str
    outcome: str = ""  # "ok" (worked), "error" (clean error), or "FAIL: …"
    message: str = ""
    seconds: float = 0.0


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def run_cli(model: Path, catalog: Path, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "talkplay"
    cmd = [str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else ["-m", "talkplay_edge.cli"]),
           "ask", "--model", str(model), "--catalog", str(catalog), "--threads", "1", "--max-new-tokens", "4",
           "--json", "something calm for a rainy drive"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or dict(os.environ))


def judge(case: Case, damaged: Path, proc: subprocess.CompletedProcess | None, sha_before: str,
          track_ids: set[str]) -> None:
    if proc is None:
        case.outcome = "FAIL: timed out"
        return
    err = proc.stderr.strip()
    case.message = err.splitlines()[-1][:300] if err else ""
    if damaged.exists() and damaged.is_file() and _sha(damaged) != sha_before:
        case.outcome = "FAIL: the file was modified"
    elif proc.returncode < 0:
        case.outcome = f"FAIL: killed by signal {-proc.returncode}"
    elif "Traceback" in proc.stderr:
        case.outcome = "FAIL: traceback"
    elif proc.returncode == 0:
        try:
            tracks = json.loads(proc.stdout)["tracks"]
            ok = len(tracks) == 1 and tracks[0]["id"] in track_ids
        except (ValueError, KeyError, TypeError, IndexError):
            ok = False
        case.outcome = "ok" if ok else "FAIL: exit 0 without a real track"
    elif str(damaged) not in proc.stderr:
        case.outcome = "FAIL: the error does not name the file"
    elif len([line for line in err.splitlines() if line.strip()]) > 3:
        case.outcome = "FAIL: more than a short error"
    else:
        case.outcome = "error"


def model_cases(model: Path, rng: random.Random, flips: int, truncations: int, foreign: Path | None) -> list:
    """(kind, detail, writer(dst)) for damaged copies of a GGUF model."""
    data = model.read_bytes()
    from talkplay_edge.gguf_check import check_gguf

    info = check_gguf(model)
    meta_end, data_start = info.metadata_end, info.data_start
    out = []

    def flipped(off: int, bit: int):
        def w(dst: Path):
            b = bytearray(data)
            b[off] ^= 1 << bit
            dst.write_bytes(b)
        return w

    for _ in range(truncations):
        n = rng.randrange(0, len(data))
        out.append(("truncated", f"at byte {n}", lambda dst, n=n: dst.write_bytes(data[:n])))
    regions = [("metadata", 8, meta_end), ("tensor descriptions", meta_end, data_start), ("tensor data", data_start, len(data))]
    weights = [0.6, 0.25, 0.15]
    for _ in range(flips):
        name, lo, hi = rng.choices(regions, weights)[0]
        off, bit = rng.randrange(lo, hi), rng.randrange(8)
        out.append((f"bit flip in {name}", f"byte {off} bit {bit}", flipped(off, bit)))
    out.append(("empty file", "0 bytes", lambda dst: dst.write_bytes(b"")))
    out.append(("not a GGUF", "a text file", lambda dst: dst.write_text("this is not a model\n" * 100)))
    if foreign is not None:
        out.append(("foreign GGUF", foreign.name, lambda dst: shutil.copy(foreign, dst)))

    def other_fp(dst: Path):
        import re

        m = re.search(rb"talkplay\.vocab_fingerprint.{12}([0-9a-f]{64})", data, re.S)
        b = bytearray(data)
        b[m.start(1):m.end(1)] = bytes(reversed(m.group(1)))
        dst.write_bytes(b)
    out.append(("fingerprint mismatch", "another vocabulary's fingerprint", other_fp))
    return out


def catalog_cases(catalog: Path, rng: random.Random, flips: int, truncations: int) -> list:
    data = catalog.read_bytes()
    out = []
    for _ in range(truncations):
        n = rng.randrange(0, len(data))
        out.append(("truncated", f"at byte {n}", lambda dst, n=n: dst.write_bytes(data[:n])))
    for i in range(flips):
        off = rng.randrange(0, 4096) if i % 4 == 0 else rng.randrange(0, len(data))  # page 1 (schema) more often
        bit = rng.randrange(8)

        def w(dst: Path, off=off, bit=bit):
            b = bytearray(data)
            b[off] ^= 1 << bit
            dst.write_bytes(b)
        out.append(("bit flip", f"byte {off} bit {bit}", w))

    def other_tables(dst: Path):
        c = sqlite3.connect(dst)
        c.execute("create table songs (id integer primary key, name text)")
        c.commit()
        c.close()

    def sql_edit(sql: str):
        def w(dst: Path):
            dst.write_bytes(data)
            c = sqlite3.connect(dst)
            c.execute(sql)
            c.commit()
            c.close()
        return w

    out += [("wrong schema", "an SQLite file with other tables", other_tables),
            ("not SQLite", "random bytes", lambda dst: dst.write_bytes(rng.randbytes(64 * 1024))),
            ("empty file", "0 bytes", lambda dst: dst.write_bytes(b"")),
            ("newer schema", "schema_version 99", sql_edit("update meta set value = '99' where key = 'schema_version'")),
            ("edited vocabulary", "a token renamed",
             sql_edit("update tokens set token = '<|cf_9999|>' where id = (select min(id) from tokens where kind = 'cf')"))]
    return out


def run_faults(model: Path, catalog: Path, flips: int = 40, truncations: int = 10, seed: int = 0,
               timeout: float = 120.0, foreign: Path | None = None, progress: bool = True) -> list[Case]:
    """Run every case; returns them with their outcomes."""
    sys.path.insert(0, str(ROOT))
    from talkplay_edge.catalog import Catalog

    with Catalog.open(catalog) as cat:
        track_ids = set(cat.codes())
    rng = random.Random(seed)
    cases: list[Case] = []
    plan = [("model", *c) for c in model_cases(model, rng, flips, truncations, foreign)]
    plan += [("catalog", *c) for c in catalog_cases(catalog, rng, flips, truncations)]
    with tempfile.TemporaryDirectory(prefix="talkplay-faults-") as tmp:
        for i, (target, kind, detail, write) in enumerate(plan):
            dst = Path(tmp) / ("damaged.gguf" if target == "model" else "damaged.db")
            write(dst)
            sha = _sha(dst)
            case = Case(target, kind, detail)
            t0 = time.perf_counter()
            try:
                proc = run_cli(dst if target == "model" else model, dst if target == "catalog" else catalog, timeout)
            except subprocess.TimeoutExpired:
                proc = None
            case.seconds = round(time.perf_counter() - t0, 2)
            judge(case, dst, proc, sha, track_ids)
            cases.append(case)
            dst.unlink()
            if progress:
                print(f"[{i + 1}/{len(plan)}] {target:7s} {kind:32s} {detail:36s} → {case.outcome}  {case.message[:90]}",
                      file=sys.stderr, flush=True)
    return cases


def summary(cases: list[Case]) -> dict:
    out = {"cases": len(cases), "worked": sum(c.outcome == "ok" for c in cases),
           "clean_errors": sum(c.outcome == "error" for c in cases),
           "failures": [asdict(c) for c in cases if c.outcome.startswith("FAIL")]}
    by_kind: dict[str, dict] = {}
    for c in cases:
        k = by_kind.setdefault(f"{c.target}: {c.kind}", {"cases": 0, "ok": 0, "error": 0, "fail": 0})
        k["cases"] += 1
        k["ok" if c.outcome == "ok" else "error" if c.outcome == "error" else "fail"] += 1
    out["by_kind"] = by_kind
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="GGUF model (default: the default model)")
    ap.add_argument("--catalog", type=Path, default=None, help="catalog (default: the embedded catalog.db)")
    ap.add_argument("--flips", type=int, default=40, help="bit-flip cases per file")
    ap.add_argument("--truncations", type=int, default=10, help="truncation cases per file")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds before a case counts as a hang")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from talkplay_edge.model_build import find_base_gguf
    from talkplay_edge.paths import default_model_path, embedded_catalog_path

    model = a.model or default_model_path()
    catalog = a.catalog or embedded_catalog_path()
    cases = run_faults(model, catalog, a.flips, a.truncations, a.seed, a.timeout, foreign=find_base_gguf())
    s = summary(cases)
    s.update(model=str(model), catalog=str(catalog), seed=a.seed)
    if a.json:
        print(json.dumps(s, indent=2))
    else:
        print(f"{s['cases']} faults injected: {s['worked']} harmless (a real track), {s['clean_errors']} clean errors, "
              f"{len(s['failures'])} failures")
        for k, v in s["by_kind"].items():
            print(f"  {k:44s} {v['cases']:3d} cases: {v['ok']:3d} ok, {v['error']:3d} clean errors, {v['fail']} failures")
        for f in s["failures"]:
            print("  FAILURE:", f)
    sys.exit(1 if s["failures"] else 0)


if __name__ == "__main__":
    main()
