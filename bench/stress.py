"""Stress scripts: concurrent sessions, a long session, and `talkplay index` killed at random moments.

    python bench/stress.py load  [--threads 8] [--requests 200] [--model M] [--catalog C] [--json]
    python bench/stress.py long  [--turns 500] [--model M] [--catalog C] [--json]
    python bench/stress.py kill  [--kills 20] [--seed 0] [--json]

``load``: ``--threads`` threads each hold their own ``ChatSession`` on ONE loaded ``TalkPlay`` and send
``--requests`` messages (greedy decoding). Checked: no exception; every reply has one real catalog track,
never repeated within its session; and every session's replies (text and tracks) are exactly what the same
messages give when replayed alone, one session after the other, on the same model (``--no-replay``
skips this) — so no reply was built from, or attached to, another session's state. Reported: requests/s
and latency p50 / p95 / max.

``long``: one session, ``--turns`` messages; RSS is sampled every 10 turns. Reported: RSS at the first
and last turn, the max, the growth over the second half, context compactions; any exception fails.

``kill``: indexes a folder (the real clips in ../shared/data/audio plus generated tones) into a fresh user
catalog (created from the embedded one on the first run), killing the ``talkplay index`` process with
SIGKILL at a random moment until it was killed ``--kills`` times (a run that finishes before its moment is
not a kill: the catalog is then started afresh), then lets one run finish. After every kill: ``PRAGMA
integrity_check`` is ok, every local file row has its track and code and vice versa, codes are unique,
no path is indexed twice, the FTS index has one row per track, and no temporary file is left behind.
The final run must index every remaining file, and a run after it must change nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from talkplay_edge.bench import rss_mb  # noqa: E402
from talkplay_edge.catalog import connect  # noqa: E402

WORDS = ("play something calm upbeat jazz rock sad happy eighties nineties dance guitar piano like that more "
         "slower faster female vocals classic new party study run rain night morning road trip").split()


def _message(rng: random.Random, k: int, j: int) -> str:
    return f"session {k} request {j}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 10)))


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


# ------------------------------------------------------------------------------------------------------
def run_load(tp, threads: int = 8, requests: int = 200, max_new_tokens: int = 16, replay: bool = True,
             cold: bool = False, progress: bool = False) -> dict:
    """``threads`` sessions × ``requests`` messages on one TalkPlay; see the module docstring.

    ``cold``: every request starts from an empty KV cache (its whole prompt is prefilled), in the threads
    and in the replay. By default the runtime switches sessions by restoring each one's KV snapshot, so a
    session's tokens are computed in the same batches whatever ran in between, and its replies must be
    bit-identical to the replay either way (llama.cpp's float results depend on how tokens were batched:
    without snapshots, re-prefilled prompts flip near-tied logits of the random test model)."""

    def send(s, msg):
        if not cold:
            return s.send(msg)
        with tp._lock:  # re-entrant: send takes it again
            tp._snapshots.clear()
            tp._owner = None
            tp._kv = []
            return s.send(msg)

    catalog_ids = set(tp.catalog.codes())
    messages = {k: [_message(random.Random(k), k, j) for j in range(requests)] for k in range(threads)}
    results: dict[int, list[tuple[str, list[str]]]] = {k: [] for k in range(threads)}
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(threads)

    def worker(k: int) -> None:
        try:
            s = tp.chat(max_new_tokens=max_new_tokens)
            seen: set[str] = set()
            start.wait()
            for j, msg in enumerate(messages[k]):
                t0 = time.perf_counter()
                r = send(s, msg)
                dt = time.perf_counter() - t0
                ids = [t.id for t in r.tracks]
                with lock:
                    latencies.append(dt)
                    if progress and len(latencies) % 50 == 0:
                        print(f"  {len(latencies)} requests", file=sys.stderr, flush=True)
                if r.exhausted and seen == catalog_ids:  # a tiny catalog runs out: start again
                    s.reset()
                    seen = set()
                    results[k].append((r.text, ids))
                    continue
                if len(ids) != 1 or ids[0] not in catalog_ids or ids[0] in seen:
                    raise AssertionError(f"session {k} request {j}: bad tracks {ids}")
                if s.history[-2]["content"] != msg or s.history[-1]["track_ids"] != ids:
                    raise AssertionError(f"session {k} request {j}: history does not hold this exchange")
                seen.add(ids[0])
                results[k].append((r.text, ids))
        except Exception as e:  # noqa: BLE001 — counted and reported
            with lock:
                errors.append(f"{type(e).__name__}: {e}")

    t0 = time.perf_counter()
    pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    wall = time.perf_counter() - t0
    mismatched = 0
    if replay and not errors:
        for k in range(threads):  # the same messages, one session at a time
            s = tp.chat(max_new_tokens=max_new_tokens)
            for j, msg in enumerate(messages[k]):
                r = send(s, msg)
                if r.exhausted:
                    s.reset()
                if (r.text, [t.id for t in r.tracks]) != results[k][j]:
                    mismatched += 1
    return {"threads": threads, "requests_per_thread": requests, "requests": len(latencies), "errors": len(errors),
            "error_samples": errors[:5], "replies_differing_from_sequential_replay": mismatched if replay else None,
            "wall_s": round(wall, 2), "requests_per_s": round(len(latencies) / wall, 2) if wall else 0.0,
            "latency_p50_s": round(_pct(latencies, .5), 3) if latencies else None,
            "latency_p95_s": round(_pct(latencies, .95), 3) if latencies else None,
            "latency_max_s": round(max(latencies), 3) if latencies else None, "max_new_tokens": max_new_tokens,
            "cold": cold, "kv_snapshots": dict(tp.snapshot_stats)}


# ------------------------------------------------------------------------------------------------------
def run_long(tp, turns: int = 500, max_new_tokens: int = 48, progress: bool = False) -> dict:
    """One session of ``turns`` messages; RSS sampled every 10 turns."""
    import gc

    s = tp.chat(max_new_tokens=max_new_tokens)
    rng = random.Random(0)
    rss: list[tuple[int, float]] = []
    times = []
    exhausted = 0
    for i in range(turns):
        t0 = time.perf_counter()
        r = s.send(_message(rng, 0, i))
        times.append(time.perf_counter() - t0)
        if r.exhausted:  # a tiny catalog runs out: start again, as a user would
            exhausted += 1
            s.reset()
        elif len(r.tracks) != 1:
            raise AssertionError(f"turn {i}: {len(r.tracks)} tracks")
        if i == 0 or (i + 1) % 10 == 0:
            gc.collect()
            rss.append((i + 1, round(rss_mb(), 1)))
            if progress and (i + 1) % 50 == 0:
                print(f"  turn {i + 1}: RSS {rss[-1][1]} MB", file=sys.stderr, flush=True)
    half = [m for t, m in rss if t >= turns // 2]
    return {"turns": turns, "rss_start_mb": rss[0][1], "rss_end_mb": rss[-1][1], "rss_max_mb": max(m for _, m in rss),
            "rss_growth_second_half_mb": round(max(half) - min(half), 1) if half else 0.0,
            "compactions": s.compactions, "exhausted_resets": exhausted, "kv_tokens_end": len(tp._kv),
            "n_ctx": tp.n_ctx, "turn_p50_s": round(_pct(times, .5), 3), "turn_p95_s": round(_pct(times, .95), 3),
            "rss_samples": rss}


# ------------------------------------------------------------------------------------------------------
def _tone(path: Path, seconds: float, freq: float) -> None:
    import numpy as np
    import soundfile as sf

    sr = 22050
    t = np.arange(int(sr * seconds)) / sr
    sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr)


def check_index_invariants(db: Path) -> list[str]:
    """What must hold in a catalog after any interruption of `talkplay index`; returns the violations."""
    bad = []
    conn = connect(db, readonly=True)  # as the next reader opens it
    try:
        ic = conn.execute("pragma integrity_check").fetchone()[0]
        if ic != "ok":
            bad.append(f"integrity_check: {ic}")
        if not conn.execute("select 1 from sqlite_master where name = 'local_files'").fetchone():
            return bad
        q = lambda sql: conn.execute(sql).fetchone()[0]  # noqa: E731
        checks = {
            "ok files without their track": "select count(*) from local_files f where status = 'ok' and "
                                            "not exists (select 1 from tracks t where t.id = f.track_id and t.path = f.path)",
            "local tracks without an ok file row": "select count(*) from tracks t where t.path is not null and not exists "
                                                   "(select 1 from local_files f where f.track_id = t.id and f.status = 'ok')",
            "tracks without a code": "select count(*) from tracks t where not exists (select 1 from code_rows c where c.track = t.rowid)",
            "codes without a track": "select count(*) from code_rows c where not exists (select 1 from tracks t where t.rowid = c.track)",
            "paths indexed twice": "select count(*) from (select path from tracks where path is not null group by path having count(*) > 1)",
            "duplicate codes": "select count(*) - count(distinct code) from codes",
            "fts rows != tracks": "select (select count(*) from tracks_fts) - (select count(*) from tracks)",
        }
        for name, sql in checks.items():
            n = q(sql)
            if n:
                bad.append(f"{name}: {n}")
    finally:
        conn.close()
    return bad


def run_kills(kills: int = 20, seed: int = 0, files: list[Path] | None = None, catalog: Path | None = None,
              progress: bool = False) -> dict:
    """See the module docstring. ``catalog``: the catalog the user catalog starts from (default embedded).

    One uninterrupted run is timed first; each kill then comes at a uniformly random moment within that
    duration (process start, model loading, catalog creation, batches and commits alike)."""
    rng = random.Random(seed)
    audio = ROOT.parent / "shared" / "data" / "audio"
    tmp = Path(tempfile.mkdtemp(prefix="talkplay-kill-"))
    try:
        music = tmp / "music"
        music.mkdir()
        for f in files if files is not None else sorted(p for p in audio.glob("*") if p.suffix in (".ogg", ".flac", ".wav", ".mp3")):
            shutil.copy(f, music / f.name)
        for i in range(6):
            _tone(music / f"tone-{i}.wav", 2.0 + i, 200.0 + 60 * i)
        (music / "broken.mp3").write_bytes(b"\x00garbage" * 100)
        n_files = sum(1 for _ in music.iterdir())
        env = dict(os.environ, XDG_DATA_HOME=str(tmp / "xdg"), TALKPLAY_PROGRESS="0")
        env.pop("TALKPLAY_CATALOG", None)
        db = tmp / "xdg" / "talkplay-edge" / "catalog.db"

        def fresh_user_catalog() -> None:
            shutil.rmtree(tmp / "xdg", ignore_errors=True)
            if catalog is not None:  # else the first run creates it from the embedded catalog (and may be killed)
                db.parent.mkdir(parents=True)
                shutil.copy(catalog, db)

        fresh_user_catalog()
        exe = Path(sys.executable).parent / "talkplay"
        cmd = [str(exe), "index", str(music), "--threads", "1", "--batch-size", "2", "--json"]
        log = []
        violations = []
        survived = 0
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=True)
        full_s = time.perf_counter() - t0
        fresh_user_catalog()
        k = -1
        while survived < kills and k < 3 * kills:  # runs that finish before their kill do not count as kills
            k += 1
            delay = rng.uniform(0.02, 0.98) * full_s
            p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                p.wait(timeout=delay)
                finished = True
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGKILL)
                p.wait()
                finished = False
            state = {"run": k + 1, "after_s": round(delay, 2), "killed": not finished, "rc": p.returncode}
            if db.exists():
                v = check_index_invariants(db)
                conn = connect(db, readonly=True)  # as the next reader opens it
                has = conn.execute("select 1 from sqlite_master where name = 'local_files'").fetchone()
                state["files_recorded"] = conn.execute("select count(*) from local_files").fetchone()[0] if has else 0
                conn.close()
                if v:
                    violations.append({"run": k + 1, "violations": v})
            leftovers = [p.name for p in db.parent.glob("*.tmp-*")] if db.parent.exists() else []
            if leftovers and finished:
                violations.append({"run": k + 1, "violations": [f"temporary files left: {leftovers}"]})
            if not finished:
                survived += 1
            log.append(state)
            if progress:
                print(f"  {state}", file=sys.stderr, flush=True)
            if finished:  # it completed before the kill: start over on a fresh catalog, keep killing
                fresh_user_catalog()
        final = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        summary = json.loads(final.stdout) if final.returncode == 0 else {"error": final.stderr[-500:]}
        again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        summary2 = json.loads(again.stdout) if again.returncode == 0 else {"error": again.stderr[-500:]}
        v = check_index_invariants(db)
        if v:
            violations.append({"run": "final", "violations": v})
        done = summary.get("local_tracks") == n_files - 1 and summary2.get("indexed") == 0 and summary2.get("failed") == 0
        return {"kills": survived, "runs": k + 1, "killed_mid_run": survived, "files": n_files, "full_run_s": round(full_s, 2),
                "violations": violations,
                "final_run": {k: summary.get(k) for k in ("indexed", "skipped", "failed", "local_tracks")},
                "rerun": {k: summary2.get(k) for k in ("indexed", "skipped", "failed")},
                "completed": bool(done), "log": log}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("load", "long", "kill"):
        p = sub.add_parser(name)
        p.add_argument("--json", action="store_true")
        if name != "kill":
            p.add_argument("--model", type=Path, default=None)
            p.add_argument("--catalog", type=Path, default=None)
            p.add_argument("--n-ctx", type=int, default=2048)
            p.add_argument("--model-threads", type=int, default=2, help="llama.cpp threads")
            p.add_argument("--session-cache-mb", type=float, default=128.0, help="KV snapshots of idle sessions")
            p.add_argument("--max-new-tokens", type=int, default=16 if name == "load" else 48)
    sub.choices["load"].add_argument("--threads", type=int, default=8)
    sub.choices["load"].add_argument("--requests", type=int, default=200)
    sub.choices["load"].add_argument("--no-replay", action="store_true")
    sub.choices["long"].add_argument("--turns", type=int, default=500)
    sub.choices["kill"].add_argument("--kills", type=int, default=20)
    sub.choices["kill"].add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.cmd == "kill":
        out = run_kills(a.kills, a.seed, progress=not a.json)
        ok = out["completed"] and not out["violations"]
    else:
        from talkplay_edge.runtime import TalkPlay

        tp = TalkPlay.load(a.model, a.catalog, threads=a.model_threads, n_ctx=a.n_ctx,
                           session_cache_mb=a.session_cache_mb)
        rss0 = rss_mb()
        if a.cmd == "load":
            out = run_load(tp, a.threads, a.requests, a.max_new_tokens, replay=not a.no_replay, progress=not a.json)
            ok = out["errors"] == 0 and not out["replies_differing_from_sequential_replay"]
        else:
            out = run_long(tp, a.turns, a.max_new_tokens, progress=not a.json)
            ok = True
        out.update(model=str(tp.model_path), catalog=str(tp.catalog.path), rss_after_load_mb=round(rss0, 1),
                   rss_end_mb=round(rss_mb(), 1), n_ctx=tp.n_ctx, session_cache_mb=a.session_cache_mb)
    print(json.dumps(out, indent=2) if a.json else "\n".join(f"{k}: {v}" for k, v in out.items() if k != "log"))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
