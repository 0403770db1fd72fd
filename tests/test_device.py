"""The device kit (export/device.py) on CPU: pack → parts that each fit a call → stash/assemble/check → the
variants train side by side → their deltas land in $OUT; damaged parts are refused; aside/restore round-trip."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")

from export import device  # noqa: E402
from talkplay_edge.catalog import Catalog  # noqa: E402
from talkplay_edge.conversations import build_conversations  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def packed(tiny_catalog, tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    (root / "code.py").write_text("x = 1\n" * 1000)  # ~6 kB that travels with every call
    with Catalog.open(tiny_catalog) as cat:
        build_conversations(cat, tmp_path / "conv", seed=0, sizes={"train": 16, "valid": 4, "test": 1, "test_unseen": 1},
                            show_progress=False)
    base = tmp_path / "base.gguf"
    base.write_bytes(bytes(range(256)) * 400)  # stands in for the 98 MB GGUF (the tiny base does not read it)
    manifest = device.pack(root, base, Path(tiny_catalog), tmp_path / "conv" / "train.jsonl",
                           tmp_path / "conv" / "valid.jsonl", None, conversations=12, variants=["text", "mean"],
                           max_minutes=1.0, config=str(REPO / "export" / "configs" / "smollm2-gpu.json"),
                           call_limit=80_000, margin=1_000)
    return root, manifest


def test_pack_splits_into_parts_that_fit_a_call(packed):
    root, manifest = packed
    parts = sorted((root / ".devpack").glob("part-*"))
    assert len(parts) == len(manifest["parts"]) >= 2
    tree = device.travelling_bytes(root)
    for d in parts:
        assert tree + sum(f.stat().st_size for f in d.iterdir()) <= 80_000
        assert json.loads((d / "manifest.json").read_text())["sha256"] == manifest["sha256"]
    calls = manifest["calls"]  # one call per part, in order; only the last trains (the long timeout)
    assert [c["carry"] for c in calls] == [[f".devpack/{d.name}"] for d in parts]
    assert [c["timeout_s"] for c in calls] == [device.FIRST_CALL_S] * (len(parts) - 1) + [device.LAST_CALL_S]


def test_this_checkout_sends_the_real_payload_in_two_calls():
    """The README's plan is two device calls. The real payload is ~118.5 MB (98.4 MB base GGUF, 8.6 MB
    catalog.db.xz, 11.3 MB of 100k training conversations as xz, the gguf wheel): with what ``aside`` moves
    out, this checkout's tree must leave room for it in two calls (catalog.vectors.npz, 16.8 MB, once made
    it three)."""
    payload = 125 * 10**6  # the real one plus headroom
    tree = device.travelling_bytes(REPO)
    assert 2 * (device.CALL_LIMIT - tree - 2**20) >= payload, f"tree after aside: {tree / 2**20:.1f} MiB"


def test_step_waits_for_all_parts_then_trains_every_variant(packed, tmp_path, monkeypatch):
    from tinymodel import smollm2_tokenizer_dir

    smollm2_tokenizer_dir()  # the tiny base's tokenizer comes from the real base: cache it before the step
    root, manifest = packed  # points TALKPLAY_BASE_GGUF at the stand-in (alone, this test once failed on that)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    held = tmp_path / "held"
    held.mkdir()
    later = sorted((root / ".devpack").glob("part-*"))[1:]
    for d in later:  # the first call carries only part-1
        shutil.move(str(d), str(held / d.name))
    out, stash = tmp_path / "OUT", tmp_path / "stash"
    out.mkdir()
    extra = ["--base=tiny", "--device=cpu", "--dtype=float32", "--max_steps=2", "--batch_size=2", "--eval_every=2",
             "--eval_batches=1", "--hit_turns=4", "--seq_len=256", "--lora_r=2", "--lora_alpha=4", "--warmup_steps=1"]
    assert device.step(root, out, stash, extra) == 0
    assert not any(out.iterdir())  # nothing trained yet
    shutil.rmtree(root / ".devpack")  # the next call carries only the next part
    (root / ".devpack").mkdir()
    for d in later:
        shutil.move(str(held / d.name), str(root / ".devpack" / d.name))
    stale = stash / "out" / "text" / "delta-09-of-09.safetensors"  # left by an earlier try on a warm machine
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    started = time.time()
    assert device.step(root, out, stash, extra, call_s=400) == 0  # a session with less device time left
    for init in ("text", "mean"):
        files = sorted(p.name for p in (out / init).iterdir())
        assert files == ["delta-01-of-01.safetensors", "train_log.json"]
        log = json.loads((out / init / "train_log.json").read_text())
        assert log["config"]["init"] == init and log["log"][-1]["step"] == 2
        assert log["config"]["max_train_conversations"] == 12
        assert log["config"]["row_updates"] == "seen"  # the GPU config's: unseen music rows do not drift
        # training stops in time for the call to end within the device tool's timeout, deltas copied
        assert started < log["config"]["stop_at"] <= started + 400 - device.STOP_RESERVE_S + 1
    assert (out / "train.log").read_text().count("init=mean") == 1
    assert len([f for f in out.rglob("*") if f.is_file()]) <= 8  # what comes back: at most 8 files


def test_a_damaged_part_is_refused(packed, tmp_path):
    root, manifest = packed
    stash = tmp_path / "stash"
    stash.mkdir()
    for f in (root / ".devpack").glob("part-*/*"):
        shutil.copy2(f, stash / f.name)
    first = stash / manifest["parts"][0]["name"]
    data = bytearray(first.read_bytes())
    data[100] ^= 1
    first.write_bytes(bytes(data))
    with pytest.raises(SystemExit, match="damaged in transfer"):
        device.assemble(stash)


def test_aside_and_restore_round_trip(tmp_path):
    (tmp_path / "talkplay_edge" / "models" / "m").mkdir(parents=True)
    (tmp_path / "talkplay_edge" / "models" / "m" / "w.bin").write_bytes(b"w")
    (tmp_path / "catalog.db").write_bytes(b"db")
    (tmp_path / "catalog.vectors.npz").write_bytes(b"vec")
    assert device.aside(tmp_path) == ["catalog.db", "catalog.vectors.npz", "talkplay_edge/models"]
    assert not (tmp_path / "catalog.db").exists() and not (tmp_path / "talkplay_edge" / "models").exists()
    with pytest.raises(SystemExit):
        (tmp_path / "catalog.db").write_bytes(b"new")
        device.aside(tmp_path)
    (tmp_path / "catalog.db").unlink()
    assert device.restore(tmp_path) == ["catalog.db", "catalog.vectors.npz", "talkplay_edge/models"]
    assert (tmp_path / "catalog.db").read_bytes() == b"db"
    assert (tmp_path / "talkplay_edge" / "models" / "m" / "w.bin").read_bytes() == b"w"


def test_install_replaces_the_delta_and_drops_its_calibration(tmp_path):
    """install: the returned shards replace the shipped ones; the old span calibration (fitted to the old
    delta) goes with them; a folder without shards is refused and changes nothing."""
    from export.device import install

    shipped = tmp_path / "root" / "talkplay_edge" / "models" / "talkplay-smollm2"
    shipped.mkdir(parents=True)
    (shipped / "delta-01-of-02.safetensors").write_bytes(b"old1")
    (shipped / "delta-02-of-02.safetensors").write_bytes(b"old2")
    (shipped / "span_calibration.json").write_text('{"alpha": [1], "beta": [1]}')
    (shipped / "README.md").write_text("kept")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="no delta"):
        install(empty, tmp_path / "root")
    assert (shipped / "span_calibration.json").is_file() and len(list(shipped.glob("delta-*"))) == 2
    new = tmp_path / "new"
    new.mkdir()
    (new / "delta-01-of-01.safetensors").write_bytes(b"new")
    install(new, tmp_path / "root")
    assert sorted(p.name for p in shipped.iterdir()) == ["README.md", "delta-01-of-01.safetensors"]
    assert (shipped / "delta-01-of-01.safetensors").read_bytes() == b"new"
