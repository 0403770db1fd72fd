"""Damaged, foreign and mismatched files: one clear error naming the file and the fix, a non-zero exit and no
traceback from the CLI, and the file left as it was. ``bench/faults.py`` runs the same cases at scale on the
real model and catalog (its figures are in the README's Reliability table)."""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from talkplay_edge.catalog import Catalog, CatalogError
from talkplay_edge.cli import cli
from talkplay_edge.gguf_check import GGUFError, check_gguf
from talkplay_edge.runtime import ModelCatalogMismatch, TalkPlay

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_fault_injection_on_the_tiny_model_and_catalog(runtime_gguf, tiny_catalog):
    """Random truncations and bit flips of both files, plus the named cases, each in a fresh `talkplay ask`."""
    from faults import run_faults, summary

    from talkplay_edge.model_build import find_base_gguf

    cases = run_faults(runtime_gguf, tiny_catalog, flips=8, truncations=3, seed=7, timeout=120,
                       foreign=find_base_gguf(), progress=False)
    s = summary(cases)
    assert s["failures"] == [], s["failures"]
    kinds = s["by_kind"]
    for k in ("model: truncated", "model: fingerprint mismatch", "model: foreign GGUF", "model: not a GGUF",
              "catalog: truncated", "catalog: wrong schema", "catalog: not SQLite", "catalog: newer schema",
              "catalog: edited vocabulary"):
        assert kinds[k]["error"] == kinds[k]["cases"], (k, kinds[k])  # always refused, never "worked"


def test_gguf_check_refuses_what_llama_cpp_aborts_on(runtime_gguf, tmp_path):
    info = check_gguf(runtime_gguf)
    assert info.metadata["talkplay.vocab_fingerprint"] and len(info.tokens) == info.tensors["token_embd.weight"][0][1]
    data = runtime_gguf.read_bytes()
    # two vocabulary strings made equal: llama.cpp's GGML_ASSERT(id_to_token.size() == token_to_id.size())
    a, b = info.tokens[300], info.tokens[301]
    assert len(a) == len(b)
    bad = tmp_path / "dup.gguf"
    i = data.index(len(b).to_bytes(8, "little") + b, data.index(len(a).to_bytes(8, "little") + a))
    bad.write_bytes(data[:i + 8] + a + data[i + 8 + len(b):])
    with pytest.raises(GGUFError, match="same text"):
        check_gguf(bad)
    for cut in (0, 3, 24, len(data) // 3, len(data) - 1):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(GGUFError, match=str(tmp_path / "cut.gguf")):
            check_gguf(tmp_path / "cut.gguf")


def test_mismatch_is_refused_before_loading(mismatched_gguf, tiny_catalog, monkeypatch):
    from llama_cpp import _internals

    def no_load(*a, **k):
        raise AssertionError("the model was loaded although its fingerprint does not match")

    monkeypatch.setattr(_internals, "LlamaModel", no_load)
    with pytest.raises(ModelCatalogMismatch):
        TalkPlay.load(mismatched_gguf, tiny_catalog)


def test_damaged_catalog_found_after_open_names_the_file(runtime_gguf, tiny_catalog, tmp_path):
    """Corruption in pages read only later (the codes) is reported as the catalog's, with the fix."""
    db = tmp_path / "catalog.db"
    shutil.copy(tiny_catalog, db)
    conn = sqlite3.connect(db)
    root = conn.execute("select rootpage from sqlite_master where name = 'code_rows'").fetchone()[0]
    page = conn.execute("pragma page_size").fetchone()[0]
    conn.close()
    data = bytearray(db.read_bytes())
    off = (root - 1) * page
    data[off:off + page] = b"\xff" * page  # the codes' b-tree page is garbage
    db.write_bytes(bytes(data))
    sha = _sha(db)
    with pytest.raises(CatalogError, match=f"{db}: damaged catalog .*rebuild it"):
        TalkPlay.load(runtime_gguf, db)
    r = CliRunner().invoke(cli, ["ask", "--model", str(runtime_gguf), "--catalog", str(db), "hello"])
    assert r.exit_code == 1 and str(db) in r.output and "Traceback" not in r.output and "damaged catalog" in r.output
    assert _sha(db) == sha


def test_chat_opens_the_catalog_read_only(runtime_gguf, tiny_catalog, tmp_path):
    db = tmp_path / "catalog.db"
    shutil.copy(tiny_catalog, db)
    sha = _sha(db)
    with TalkPlay.load(runtime_gguf, db, threads=1, n_ctx=512) as tp:
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            tp.catalog.conn.execute("create table x (a)")
        s = tp.chat(max_new_tokens=2)
        for _ in range(3):
            s.send("more please")
    tp.catalog.close()
    assert _sha(db) == sha and not list(tmp_path.glob("catalog.db-*"))  # no journal or WAL left behind


def test_missing_or_damaged_encoders_are_clear_errors(tiny_catalog, tmp_path, monkeypatch):
    from talkplay_edge import audio, text_encoder

    music = tmp_path / "music"
    music.mkdir()
    import numpy as np
    import soundfile as sf

    sf.write(music / "tone.wav", np.zeros(22050, np.float32), 22050)
    db = tmp_path / "catalog.db"
    shutil.copy(tiny_catalog, db)
    sha = _sha(db)
    runner = CliRunner()

    missing = tmp_path / "nothing-here"
    monkeypatch.setattr(text_encoder, "MODEL_DIR", missing)
    r = runner.invoke(cli, ["index", str(music), "--catalog", str(db)])
    assert r.exit_code == 1 and str(missing) in r.output and "export.text_encoder" in r.output
    assert "Traceback" not in r.output
    monkeypatch.undo()

    damaged = tmp_path / "musicnn"
    shutil.copytree(audio.MODEL_DIR, damaged)
    model = damaged / audio.MODEL_FILE
    model.write_bytes(model.read_bytes()[:1000])
    audio._DEFAULT_TAGGER.clear()
    monkeypatch.setattr(audio, "MODEL_DIR", damaged)
    r = runner.invoke(cli, ["index", str(music), "--catalog", str(db)])
    assert r.exit_code == 1 and str(damaged) in r.output and "export.audio_encoder" in r.output
    model.unlink()
    r = runner.invoke(cli, ["index", str(music), "--catalog", str(db)])
    assert r.exit_code == 1 and str(model) in r.output and "Traceback" not in r.output
    audio._DEFAULT_TAGGER.clear()
    assert _sha(db) == sha


def test_index_refuses_a_damaged_user_catalog_and_keeps_it(tmp_path):
    music = tmp_path / "music"
    music.mkdir()
    db = tmp_path / "catalog.db"
    db.write_bytes(b"SQLite format 3\x00" + b"\x00" * 200)
    sha = _sha(db)
    r = CliRunner().invoke(cli, ["index", str(music), "--catalog", str(db)])
    assert r.exit_code == 1 and str(db) in r.output and "Traceback" not in r.output
    assert _sha(db) == sha


def test_debug_shows_the_traceback(tmp_path):
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"not a database" * 100)
    r = CliRunner().invoke(cli, ["--debug", "info", "--catalog", str(bad)])
    assert r.exit_code != 0 and isinstance(r.exception, CatalogError)
    r = CliRunner().invoke(cli, ["info", "--catalog", str(bad)])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and str(bad) in r.output
    with pytest.raises(CatalogError):
        Catalog.open(bad)


def test_code_token_outside_the_vocabulary_is_a_damaged_catalog(runtime_gguf, tiny_catalog, tmp_path):
    """A flipped bit in a stored cluster number (found by bench/faults.py) names the catalog, not a KeyError."""
    db = tmp_path / "catalog.db"
    shutil.copy(tiny_catalog, db)
    conn = sqlite3.connect(db)
    conn.execute("update code_rows set metadata = 4635 where track = (select min(track) from code_rows)")
    conn.commit()
    conn.close()
    with pytest.raises(CatalogError, match=f"{db}: damaged catalog .*meta_4635"):
        TalkPlay.load(runtime_gguf, db)
