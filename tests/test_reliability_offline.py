"""No network, nothing executed: chat, eval and index open no socket; no code path can fetch from a hub;
nothing the model writes or a file holds is executed or used as a path; SQL takes hostile text as data."""

from __future__ import annotations

import ast
import json
import shutil
import socket
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from talkplay_edge.cli import cli

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "talkplay_edge"
NETWORK_MODULES = {"socket", "ssl", "http", "urllib.request", "urllib3", "requests", "httpx", "aiohttp", "ftplib",
                   "smtplib", "huggingface_hub", "xmlrpc", "telnetlib", "websocket", "websockets"}
EXECUTING_CALLS = {"eval", "exec", "compile", "__import__"}
EXECUTING_ATTRS = {("os", "system"), ("os", "popen"), ("os", "execv"), ("os", "execvp"), ("pickle", "load"),
                   ("pickle", "loads"), ("marshal", "loads")}


@pytest.fixture
def no_network(monkeypatch):
    """Every way to open a connection raises and is recorded; the test asserts the record stays empty."""
    attempts: list[str] = []

    def refuse(name):
        def f(*a, **k):
            attempts.append(f"{name}{a[:2]}")
            raise OSError(f"network access attempted in a no-network test: {name}")
        return f

    class NoSocket(socket.socket):
        def __init__(self, *a, **k):
            attempts.append(f"socket.socket{a[:2]}")
            raise OSError("network access attempted in a no-network test: socket.socket")

    monkeypatch.setattr(socket, "socket", NoSocket)
    for name in ("create_connection", "getaddrinfo", "gethostbyname", "socketpair"):
        monkeypatch.setattr(socket, name, refuse(f"socket.{name}"))
    return attempts


def _python_files(*dirs: Path):
    for d in dirs:
        yield from sorted(p for p in d.rglob("*.py") if "__pycache__" not in p.parts)


def test_the_package_imports_no_network_module_and_executes_nothing():
    found = []
    for path in _python_files(PACKAGE):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for n in names:
                if n in NETWORK_MODULES or n.split(".")[0] in NETWORK_MODULES - {"urllib"}:
                    found.append(f"{path.name}:{node.lineno} imports {n}")
            if isinstance(node, ast.Call):
                f = node.func
                if isinstance(f, ast.Name) and f.id in EXECUTING_CALLS:
                    found.append(f"{path.name}:{node.lineno} calls {f.id}()")
                if (isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)
                        and (f.value.id, f.attr) in EXECUTING_ATTRS | {("subprocess", a) for a in dir(__import__("subprocess"))}):
                    found.append(f"{path.name}:{node.lineno} calls {f.value.id}.{f.attr}()")
                if isinstance(f, ast.Attribute) and f.attr == "load" and any(
                        k.arg == "allow_pickle" and getattr(k.value, "value", False) for k in node.keywords):
                    found.append(f"{path.name}:{node.lineno} loads pickles")
    assert not found, found


def test_every_from_pretrained_is_local_only():
    """transformers is only used by export/ and tests; none of its loads may reach the hub."""
    calls = 0
    bad = []
    for path in _python_files(ROOT / "export", ROOT / "tests", PACKAGE):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "from_pretrained":
                calls += 1
                if not any(k.arg == "local_files_only" and getattr(k.value, "value", None) is True for k in node.keywords):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert calls >= 5 and not bad, bad


def test_no_network_guard_works(no_network):
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", 9))
    with pytest.raises(OSError):
        socket.socket()
    assert len(no_network) == 2
    no_network.clear()


def test_chat_opens_no_socket(no_network, runtime_gguf, tiny_catalog):
    from talkplay_edge.runtime import TalkPlay

    with TalkPlay.load(runtime_gguf, tiny_catalog, threads=1, n_ctx=512) as tp:
        s = tp.chat(max_new_tokens=4)
        for msg in ("something calm for a rainy drive", "more like that", "http://example.com/play?x=1"):
            assert len(s.send(msg).tracks) == 1
        assert s.more(3).tracks
    tp.catalog.close()
    r = CliRunner().invoke(cli, ["ask", "--model", str(runtime_gguf), "--catalog", str(tiny_catalog),
                                 "--threads", "1", "--max-new-tokens", "4", "--json", "jazz please"])
    assert r.exit_code == 0, r.output
    assert no_network == []


def test_eval_opens_no_socket(no_network, runtime_gguf, tiny_catalog, tmp_path, monkeypatch):
    from talkplay_edge.catalog import Catalog

    with Catalog.open(tiny_catalog) as cat:
        pl = cat.playlists()[0]["track_ids"]
    conv = {"id": "c1", "turns": [{"role": "user", "content": "calm jazz"},
                                   {"role": "assistant", "content": "x", "track_ids": [pl[0]]},
                                   {"role": "user", "content": "more"},
                                   {"role": "assistant", "content": "y", "track_ids": [pl[1]]}]}
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(conv) + "\n")
    monkeypatch.setenv("TALKPLAY_MODEL", str(runtime_gguf))
    for system in ("hybrid", "model"):
        r = CliRunner().invoke(cli, ["eval", "--system", system, "--conversations", str(path),
                                     "--catalog", str(tiny_catalog), "--threads", "1", "--json"])
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["turns"] == 2
    assert no_network == []


AUDIO_DIR = ROOT.parent / "shared" / "data" / "audio"


def test_index_opens_no_socket_and_takes_hostile_text_as_data(no_network, tiny_catalog, tmp_path):
    """Tags, file names and playlist lines that spell SQL, paths and URLs are stored verbatim, never run."""
    import mutagen
    import numpy as np
    import soundfile as sf

    from talkplay_edge.catalog import Catalog
    from talkplay_edge.indexer import index_folder

    music = tmp_path / "music"
    music.mkdir()
    hostile_title = "Robert'); DROP TABLE tracks;--"
    hostile_artist = '" OR 1=1 -- $(rm -rf ~) `reboot`'
    name = "it's a \"tone\"; DELETE FROM codes.wav"
    t = np.arange(22050 * 2) / 22050
    sf.write(music / name, (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 22050)
    sf.write(music / "plain.flac", (0.2 * np.sin(2 * np.pi * 330 * t)).astype(np.float32), 22050)
    f = mutagen.File(music / "plain.flac")
    if f.tags is None:
        f.add_tags()
    f["title"], f["artist"], f["genre"] = hostile_title, hostile_artist, "../../../etc/passwd"
    f.save()
    (music / "list.m3u").write_text(f"#EXTINF:1,{hostile_artist} - {hostile_title}\n"
                                    "http://169.254.169.254/latest/meta-data\n/etc/shadow\n../../../etc/passwd\n"
                                    f"{name}\nplain.flac\n")
    db = tmp_path / "catalog.db"
    shutil.copy(tiny_catalog, db)
    s = index_folder(music, db, progress=False, threads=1, warn=pytest.fail)  # loads its own ONNX encoders
    assert (s.indexed, s.failed, s.playlists) == (2, 0, 1)
    with Catalog.open(db, verify=True) as cat:
        rows = {r["path"]: dict(r) for r in cat.conn.execute("select * from tracks where path is not null")}
        assert cat.conn.execute("pragma integrity_check").fetchone()[0] == "ok"
        assert len(cat.codes()) == len(cat)  # codes and tracks intact
    plain = rows[str(music / "plain.flac")]
    assert (plain["title"], plain["artist"], plain["genre"]) == (hostile_title, hostile_artist, "../../../etc/passwd")
    assert rows[str(music / name)]["title"] == Path(name).stem.replace("_", " ")
    conn = sqlite3.connect(db)
    assert {r[0] for r in conn.execute("select path from local_playlists")} == {str(music / "list.m3u")}
    conn.close()
    assert no_network == []
