"""The real training run on a lent GPU machine (the workplace's `device` tool), packed to fit its limits.

The tool copies this checkout's working tree to the machine (at most 64 MiB per call, tracked files included),
keeps /root while the machine stays warm (30 s after a call) and brings back at most 8 files of 16 MiB from
``$OUT``. The tracked tree alone is ~84 MB (``catalog.db``, its track vectors and the ONNX encoders), and
training needs the 98 MB base GGUF, the catalog and the conversations. So::

    talkplay conversations build --train 100000            # here, once
    python -m export.device pack                          # here: .devpack/part-K, each fits one call
    python -m export.device aside                         # here: move catalog.db(+ vectors), talkplay_edge/models aside
    # device tool, one call per part, back to back (the machine stays warm only 30 s):
    #   run(command="python3 -m export.device step", carry=[".devpack/part-1"], timeout_s=120)
    #   run(command="python3 -m export.device step", carry=[".devpack/part-2"], timeout_s=600)
    python -m export.device restore                       # here, at once: put them back
    python -m export.device install <files_at>/text       # the returned delta becomes the shipped model
    python -m export.calibrate --retrieval --write         # then fit its span calibration (export/calibrate.py)

``pack`` writes one tar (base GGUF, ``catalog.db.xz``, the conversations as ``.xz``, the ``gguf`` wheel),
split into parts with a manifest (sha256 of every part and of the whole). ``step`` runs on the device: it
stashes the parts it was sent in /root; once all are there it checks and unpacks them, installs the wheel,
and trains every variant of the manifest at once on the one GPU (default ``init=text`` and ``init=mean``,
the A/B the issue asks for; the second is capped at 40% of GPU memory so it can never starve the first),
each stopping at ``max_minutes`` (or earlier, so that the call ends within its timeout); it copies each
variant's delta shards and train_log.json to ``$OUT/<init>``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from talkplay_edge.model_build import sha256_file

CALL_LIMIT = 64 * 2**20  # working tree + carried paths, per call
PACK_DIR = ".devpack"
ASIDE = ("catalog.db", "catalog.vectors.npz", "talkplay_edge/models")  # tracked, large, not needed to train
FIRST_CALL_S, LAST_CALL_S = 120, 600  # device timeouts: a call that only stashes its part; the training call
# the training call must end before the tool kills it, or nothing comes back: training stops (eval + save) this
# long before the call's limit however long unpacking and loading took, and a variant still running this long
# before it is killed so that the deltas it saved at its last evaluation are copied to $OUT
STOP_RESERVE_S, KILL_RESERVE_S = 90, 25
STASH = Path(os.environ.get("TALKPLAY_DEVICE_STASH", "/root/talkplay-devpack"))
GGUF_WHEEL = "gguf==0.19.0"  # transformers' gguf_file= loader; the device image lacks it


def travelling_bytes(root: Path, without: tuple[str, ...] = ASIDE) -> int:
    """Bytes the device tool would send from ``root``: tracked files that exist + untracked files not ignored,
    minus the ``without`` paths (which ``aside`` moves out) and the pack folder itself."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True, check=True).stdout.decode()
    total = 0
    for rel in filter(None, out.split("\0")):
        if rel.startswith(PACK_DIR + "/") or any(rel == w or rel.startswith(w + "/") for w in without):
            continue
        p = root / rel
        if p.is_file():
            total += p.stat().st_size
    return total


def _xz_member(tar: tarfile.TarFile, name: str, src: Path, limit_lines: int = 0) -> None:
    """Add ``src`` (its first ``limit_lines`` lines, if given) as ``name`` compressed with xz."""
    comp = lzma.LZMACompressor(preset=6)
    buf = io.BytesIO()
    with open(src, "rb") as f:
        for i, line in enumerate(f):
            if limit_lines and i >= limit_lines:
                break
            buf.write(comp.compress(line))
    buf.write(comp.flush())
    info = tarfile.TarInfo(name)
    info.size = buf.tell()
    buf.seek(0)
    tar.addfile(info, buf)


def pack(root: Path, base_gguf: Path, catalog: Path, train: Path, valid: Path, wheel: Path | None,
         conversations: int, variants: list[str], max_minutes: float, config: str,
         call_limit: int = CALL_LIMIT, margin: int = 2**20) -> dict:
    """Write ``.devpack/payload.tar`` split into ``.devpack/part-K/`` (each with the manifest); returns it."""
    out = root / PACK_DIR
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    tar_path = out / "payload.tar"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(base_gguf, arcname="base.gguf")
        _xz_member(tar, "catalog.db.xz", catalog)
        _xz_member(tar, "conversations/train.jsonl.xz", train, conversations)
        _xz_member(tar, "conversations/valid.jsonl.xz", valid)
        if wheel:
            tar.add(wheel, arcname=f"wheels/{wheel.name}")
    tree = travelling_bytes(root)
    chunk = call_limit - tree - margin
    if chunk < call_limit // 16:
        raise SystemExit(f"the tree alone nearly fills a call ({tree / 2**20:.1f} MiB): "
                         "move more aside or ignore untracked files")
    manifest = {"sha256": sha256_file(tar_path), "size": tar_path.stat().st_size, "parts": [],
                "base_sha256": sha256_file(base_gguf), "tree_bytes": tree,
                "variants": variants, "max_minutes": max_minutes, "config": config,
                "conversations": conversations, "packed": time.strftime("%Y-%m-%d %H:%M:%S")}
    with open(tar_path, "rb") as f:
        k = 0
        while block := f.read(chunk):
            k += 1
            part = out / f"part-{k}" / f"payload.part-{k}"
            part.parent.mkdir()
            part.write_bytes(block)
            manifest["parts"].append({"name": part.name, "size": len(block),
                                      "sha256": hashlib.sha256(block).hexdigest()})
    tar_path.unlink()
    manifest["calls"] = device_calls(len(manifest["parts"]))
    for k in range(1, len(manifest["parts"]) + 1):
        (out / f"part-{k}" / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def device_calls(parts: int) -> list[dict]:
    """The device tool calls that send ``parts`` parts, in order, back to back: only the last one trains."""
    return [{"command": "python3 -m export.device step", "carry": [f"{PACK_DIR}/part-{k}"],
             "timeout_s": LAST_CALL_S if k == parts else FIRST_CALL_S} for k in range(1, parts + 1)]


def _move(root: Path, away: bool, clash: str) -> list[str]:
    moved = []
    for rel in ASIDE:
        home, parked = root / rel, root / PACK_DIR / "aside" / rel
        src, dst = (home, parked) if away else (parked, home)
        if src.exists():
            if dst.exists():
                raise SystemExit(f"{dst} already exists: {clash}")
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(src), str(dst))
            moved.append(rel)
    return moved


def aside(root: Path) -> list[str]:
    """Move the ``ASIDE`` paths into ``.devpack/aside`` (ignored, so they do not travel)."""
    return _move(root, True, "run `python -m export.device restore` first")


def restore(root: Path) -> list[str]:
    """Undo ``aside`` (``git checkout -- catalog.db talkplay_edge/models`` restores the committed files too)."""
    return _move(root, False, "so does its copy in .devpack/aside: compare them and keep one")


# -- on the device --------------------------------------------------------------------------------------
def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _unxz(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with lzma.open(src) as f, open(dst, "wb") as g:
        shutil.copyfileobj(f, g, 1 << 20)


def assemble(stash: Path) -> Path | None:
    """The unpacked payload folder once every part is stashed and checks out; None while parts are missing."""
    manifest = json.loads((stash / "manifest.json").read_text())
    here = [p for p in manifest["parts"] if (stash / p["name"]).is_file()
            and (stash / p["name"]).stat().st_size == p["size"]]
    _log(f"payload: {len(here)} of {len(manifest['parts'])} parts stashed in {stash}")
    if len(here) < len(manifest["parts"]):
        return None
    unpacked = stash / "payload"
    ok = unpacked / ".ok"
    if ok.is_file() and ok.read_text() == manifest["sha256"]:
        return unpacked  # unpacked by an earlier call
    h, tar_path = hashlib.sha256(), stash / "payload.tar"
    with open(tar_path, "wb") as out:
        for p in manifest["parts"]:
            block = (stash / p["name"]).read_bytes()
            if hashlib.sha256(block).hexdigest() != p["sha256"]:
                raise SystemExit(f"{p['name']}: damaged in transfer (sha256 differs); send it again")
            h.update(block)
            out.write(block)
    if h.hexdigest() != manifest["sha256"]:
        raise SystemExit("payload sha256 differs from the manifest: pack again")
    shutil.rmtree(unpacked, ignore_errors=True)
    with tarfile.open(tar_path) as tar:
        tar.extractall(unpacked, filter="data")
    tar_path.unlink()
    (unpacked / ".ok").write_text(manifest["sha256"])
    return unpacked


def _environment() -> None:
    """Print what the training will run on (first call: learn early that something is missing)."""
    try:
        import torch
        import transformers

        gpu = (f"{torch.cuda.get_device_name(0)}, {torch.cuda.mem_get_info()[0] / 2**30:.0f} GiB free"
               if torch.cuda.is_available() else "NO CUDA DEVICE")
        _log(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}; {gpu}")
    except Exception as e:  # report, the training itself will fail with the details
        _log(f"environment: {type(e).__name__}: {e}")


def step(workdir: Path, out: Path, stash: Path = STASH, extra: list[str] | None = None,
         call_s: float = LAST_CALL_S) -> int:
    """One device call: stash the parts sent with it; when all are there, unpack and train every variant,
    all of it within ``call_s`` seconds of the call's start (the device tool's timeout)."""
    started = time.time()
    stash.mkdir(parents=True, exist_ok=True)
    _environment()
    for f in sorted((workdir / PACK_DIR).glob("part-*/*")):
        shutil.copy2(f, stash / f.name)
    if not (stash / "manifest.json").is_file():
        raise SystemExit(f"no manifest in {stash}: carry a .devpack/part-K folder made by `export.device pack`")
    payload = assemble(stash)
    if payload is None:
        return 0
    manifest = json.loads((stash / "manifest.json").read_text())
    env = dict(os.environ, TALKPLAY_BASE_GGUF=str(payload / "base.gguf"), PYTHONUNBUFFERED="1")
    wheels = sorted((payload / "wheels").glob("*.whl"))
    if wheels:
        site = stash / "site"
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--upgrade", "--target", str(site), *map(str, wheels)], check=True)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    data = workdir / "devdata"
    for name in ("catalog.db", "conversations/train.jsonl", "conversations/valid.jsonl"):
        if not (data / name).is_file():
            _unxz(payload / f"{name}.xz", data / name)
    base_sha = sha256_file(payload / "base.gguf")
    if manifest.get("base_sha256") and base_sha != manifest["base_sha256"]:
        raise SystemExit(f"base.gguf sha256 {base_sha[:16]}… is not the packed base {manifest['base_sha256'][:16]}…")
    _log(f"unpacked; base sha256 {base_sha[:16]}…; training {manifest['variants']} for {manifest['max_minutes']} min each")
    procs = []
    for i, init in enumerate(manifest["variants"]):
        args = [sys.executable, "-m", "export.train", "--config", manifest["config"], f"--init={init}",
                f"--catalog={data / 'catalog.db'}", f"--train={data / 'conversations/train.jsonl'}",
                f"--valid={data / 'conversations/valid.jsonl'}", f"--out={stash / 'out' / init}",
                f"--max_minutes={manifest['max_minutes']}",
                f"--max_train_conversations={manifest['conversations']}",
                f"--stop_at={started + call_s - STOP_RESERVE_S:.0f}", *(extra or [])]
        if i > 0:
            args.append("--cuda_memory_fraction=0.4")  # a side variant can never starve the first
        for old in (stash / "out" / init, out / init):  # an earlier try's delta must never come back as this one's
            shutil.rmtree(old, ignore_errors=True)
        (stash / "out").mkdir(parents=True, exist_ok=True)
        log = open(stash / "out" / f"{init}.log", "w")
        procs.append((init, subprocess.Popen(args, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    deadline = min(time.time() + manifest["max_minutes"] * 60 + 240, started + call_s - KILL_RESERVE_S)
    results = {}
    for init, proc, log in procs:
        try:
            rc = proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = "killed"
        log.close()
        dst = out / init
        dst.mkdir(parents=True, exist_ok=True)
        for f in sorted((stash / "out" / init).glob("delta-*.safetensors")) + [stash / "out" / init / "train_log.json"]:
            if f.is_file():
                shutil.copy2(f, dst / f.name)
        results[init] = {"rc": rc, "files": sorted(p.name for p in dst.iterdir())}
        _log(f"{init}: exit {rc}; {results[init]['files']}")
    with open(out / "train.log", "w") as combined:  # one file: at most 8 come back
        for init in results:
            text = (stash / "out" / f"{init}.log").read_text(errors="replace")
            combined.write(f"==== init={init} ====\n{text}\n")
            tail = [l for l in text.splitlines() if l.startswith("{") or "stopping" in l or "Error" in l]
            print(f"---- {init}: evals ----", *tail[-8:], sep="\n")
    print(json.dumps(results))
    return 0 if all(r["rc"] == 0 for r in results.values()) else 1


def install(src: Path, root: Path) -> list[Path]:
    """Replace the shipped delta (talkplay_edge/models/talkplay-smollm2) with the shards in ``src``. The old
    delta's span calibration is removed (it was fitted to the old model): refit it with export.calibrate."""
    from talkplay_edge.calibration import CALIBRATION_FILE

    shards = sorted(src.glob("delta-*.safetensors"))
    if not shards:
        raise SystemExit(f"no delta-*.safetensors in {src}")
    dst = root / "talkplay_edge" / "models" / "talkplay-smollm2"
    for old in dst.glob("delta-*.safetensors"):
        old.unlink()
    (dst / CALIBRATION_FILE).unlink(missing_ok=True)
    return [Path(shutil.copy2(s, dst / s.name)) for s in shards]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.device", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="here: split the payload into parts that each fit one device call")
    p.add_argument("--conversations", type=int, default=100_000, help="training conversations to send")
    p.add_argument("--train", type=Path, default=Path("conversations/train.jsonl"))
    p.add_argument("--valid", type=Path, default=Path("conversations/valid.jsonl"))
    p.add_argument("--catalog", type=Path, default=Path("catalog.db"))
    p.add_argument("--base", type=Path, default=None, help="base GGUF (default: the pinned SmolLM2)")
    p.add_argument("--wheel", default="download", help="gguf wheel file, 'download' (pip download) or 'none'")
    p.add_argument("--variants", default="text,mean", help="init= values to train side by side")
    p.add_argument("--max-minutes", type=float, default=7.0)
    p.add_argument("--config", default="export/configs/smollm2-gpu.json")
    sub.add_parser("aside", help="here: move catalog.db, its vectors and talkplay_edge/models into .devpack/aside")
    sub.add_parser("restore", help="here: move them back")
    s = sub.add_parser("step", help="on the device: stash this call's part; with all parts, train")
    s.add_argument("--call-s", type=float, default=LAST_CALL_S,
                   help=f"this call's timeout_s (default {LAST_CALL_S}; less when the session has less device time "
                        "left): training stops in time for the call to end within it")
    s.add_argument("extra", nargs="*", help="extra export.train arguments (tests: --base=tiny --device=cpu ...)")
    i = sub.add_parser("install", help="here: make a returned delta the shipped model")
    i.add_argument("src", type=Path)
    a = ap.parse_args(argv)
    root = Path.cwd()
    if a.cmd == "pack":
        from talkplay_edge.model_build import find_base_gguf

        wheel = None
        if a.wheel == "download":
            d = root / "out" / "wheels"
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                            "-d", str(d), GGUF_WHEEL], check=True)
            wheel = sorted(d.glob("gguf-*.whl"))[-1]
        elif a.wheel != "none":
            wheel = Path(a.wheel)
        m = pack(root, a.base or find_base_gguf(), a.catalog, a.train, a.valid, wheel, a.conversations,
                 a.variants.split(","), a.max_minutes, a.config)
        print(json.dumps({"parts": len(m["parts"]), "payload_mb": round(m["size"] / 1e6, 1),
                          "tree_mb": round(m["tree_bytes"] / 1e6, 1), "calls": m["calls"]}, indent=1))
    elif a.cmd == "aside":
        print(json.dumps({"moved": aside(root), "tree_mb": round(travelling_bytes(root, ()) / 1e6, 1)}))
    elif a.cmd == "restore":
        print(json.dumps({"restored": restore(root)}))
    elif a.cmd == "step":
        out = Path(os.environ.get("OUT", "out/device"))
        out.mkdir(parents=True, exist_ok=True)
        return step(root, out, extra=a.extra, call_s=a.call_s)
    elif a.cmd == "install":
        print(json.dumps({"installed": [str(p) for p in install(a.src, root)],
                          "next": "python -m export.calibrate --retrieval --write  (fit the new delta's span calibration)"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
