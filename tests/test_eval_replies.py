"""`talkplay eval --system model --replies`: chat through the runtime and check what users see."""

from __future__ import annotations

import json
from types import SimpleNamespace

from talkplay_edge.evaluate import evaluate_replies, mentions_track, title_core


def _track(title, artist, artists=(), tid="t"):
    return SimpleNamespace(id=tid, title=title, artist=artist, artists=artists)


def test_mentions_track_by_title_or_artist_as_whole_words():
    t = _track("Champagne Supernova - Remastered", "Oasis")
    assert title_core(t.title) == "Champagne Supernova"
    assert mentions_track("A classic: champagne supernova!", t)
    assert mentions_track("Something by OASIS, mid-90s.", t)
    assert not mentions_track("Something from the oases of the desert, supernovae", t)
    assert mentions_track("Beyonce at her best", _track("Halo", "Beyoncé"))
    assert not mentions_track("Music from Asia", _track("Chandelier", "Sia"))
    assert mentions_track("with Future on it", _track("Mask Off (Remix)", "Future", ("Future", "Kendrick Lamar")))
    assert not mentions_track("", t)


class _FakeSession:
    def __init__(self, replies):
        self.replies, self.resets = list(replies), 0

    def send(self, message):
        text, track = self.replies.pop(0)
        return SimpleNamespace(text=text, tracks=[track] if track else [], exhausted=track is None,
                               timings={"backoffs": len(self.replies) % 2})

    def reset(self):
        self.resets += 1


def test_evaluate_replies_counts_what_the_user_sees():
    from talkplay_edge.catalog import Track
    from talkplay_edge.claims import ClaimReader

    a = Track("a", "Halo", "Beyoncé", year=2008, genres=("pop",), features={"energy": 0.7, "tempo": 80.0})
    b = Track("b", "Yellow", "Coldplay", year=2000, genres=("rock",), features={"energy": 0.2, "tempo": 87.0})
    ghost = Track("zz", "X", "Y", features={"tempo": 80.0})
    session = _FakeSession([("Halo it is, a pop track (2008).", a), ("Here is Halo again, 2009", a), ("", None),
                            ("Try this.", ghost), ("Coldplay! A mellow rock track at 90 BPM, down from 80.", b)])
    tp = SimpleNamespace(track_ids=["a", "b"], chat=lambda **kw: session, claim_reader=ClaimReader(["pop", "rock"]))
    conv = {"turns": [{"role": "user", "content": m} for m in ("one", "two", "three", "four", "five")]}
    res = evaluate_replies(tp, [conv])
    d = res.to_dict()
    assert (res.turns, res.with_track, res.real, res.repeated, res.mentions, res.empty_replies) == (5, 4, 3, 1, 3, 1)
    assert d["mention_rate"] == 0.75 and session.resets == 1
    # claims: pop + 2008 (true); 2009 (false); "mellow" + "rock" + "from 80" (true: the last track, at 80),
    # "90 BPM" (false, 87) and "down" (false: 87 is up from 80)
    assert (res.claims, res.false_replies, res.false_year, res.false_bpm, res.false_genre, res.false_sound,
            res.false_relation) == (8, 2, 1, 1, 0, 0, 1)
    assert d["false_reply_rate"] == 0.5 and res.backoffs == 2  # the guard's back-offs, as the runtime counts them


def test_cli_eval_replies_on_the_tiny_model(runtime_gguf, tiny_catalog, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from talkplay_edge.catalog import Catalog
    from talkplay_edge.cli import cli
    from talkplay_edge.conversations import build_conversations

    with Catalog.open(tiny_catalog) as cat:
        build_conversations(cat, tmp_path, seed=3, sizes={"train": 1, "valid": 1, "test": 3, "test_unseen": 1},
                            show_progress=False)
    convs = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    user_turns = sum(t["role"] == "user" for c in convs for t in c["turns"])
    monkeypatch.setenv("TALKPLAY_MODEL", str(runtime_gguf))
    r = CliRunner().invoke(cli, ["eval", "--system", "model", "--replies", "--conversations", str(tmp_path / "test.jsonl"),
                                 "--catalog", str(tiny_catalog), "--threads", "1", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)["replies"]
    assert rep["turns"] == user_turns and rep["with_track"] == user_turns  # the runtime forces a span
    assert rep["real_rate"] == 1.0 and rep["repeated"] == 0
    # two processes: the same ranks and the same replies, counted once
    r2 = CliRunner().invoke(cli, ["eval", "--system", "model", "--replies", "--conversations", str(tmp_path / "test.jsonl"),
                                  "--catalog", str(tiny_catalog), "--threads", "1", "--jobs", "2", "--json"])
    assert r2.exit_code == 0, r2.output
    one, two = json.loads(r.output), json.loads(r2.output)
    assert two["extra"]["jobs"] == 2 and two["overall"] == one["overall"] and two["per_turn"] == one["per_turn"]
    for key in ("conversations", "turns", "with_track", "real", "repeated", "mentions", "reply_chars"):
        assert two["replies"][key] == rep[key], key
    assert [e["reply"] for e in two["replies"]["examples"]] == [e["reply"] for e in rep["examples"]]
    r = CliRunner().invoke(cli, ["eval", "--system", "hybrid", "--replies", "--conversations", str(tmp_path / "test.jsonl"),
                                 "--catalog", str(tiny_catalog)])
    assert r.exit_code == 1 and "--system model" in r.output
    # without the reply guard, over two processes: nothing is taken back
    r3 = CliRunner().invoke(cli, ["eval", "--system", "model", "--replies", "--no-guard", "--conversations",
                                  str(tmp_path / "test.jsonl"), "--catalog", str(tiny_catalog), "--threads", "1",
                                  "--jobs", "2", "--json"])
    assert r3.exit_code == 0, r3.output
    assert json.loads(r3.output)["replies"]["backoffs"] == 0 and "false_reply_rate" in json.loads(r3.output)["replies"]
    r = CliRunner().invoke(cli, ["eval", "--system", "model", "--no-guard", "--conversations", str(tmp_path / "test.jsonl"),
                                 "--catalog", str(tiny_catalog)])
    assert r.exit_code == 1 and "--replies" in r.output


def test_cli_eval_resume_is_refused_on_another_model(runtime_gguf, tiny_catalog, tmp_path, monkeypatch):
    """The journal of a model run names its GGUF: a rebuilt or other model file does not continue it."""
    import os
    import shutil

    from click.testing import CliRunner

    from talkplay_edge.catalog import Catalog
    from talkplay_edge.cli import cli
    from talkplay_edge.conversations import build_conversations, read_conversations
    from talkplay_edge.eval_journal import Journal, run_key

    with Catalog.open(tiny_catalog) as cat:
        build_conversations(cat, tmp_path, seed=3, sizes={"train": 1, "valid": 1, "test": 2, "test_unseen": 1},
                            show_progress=False)
        fingerprint = cat.fingerprint
    path = tmp_path / "test.jsonl"
    model = tmp_path / "m.gguf"
    shutil.copy(runtime_gguf, model)
    monkeypatch.setenv("TALKPLAY_MODEL", str(model))
    ranks = tmp_path / "r.jsonl"
    from talkplay_edge.asks import HEAD_FILE

    key = run_key("model", read_conversations(path), 0, None, 0, fingerprint, catalog=tiny_catalog, model=model,
                  ask_head=HEAD_FILE)  # as `talkplay eval --system model` keys it
    journal = Journal.open(ranks, key)
    journal.add({"index": 0, "rows": [], "skipped_unknown_target": 0, "skipped_target_played": 0,
                 "unknown_ids_returned": 0})
    journal.close()
    args = ["eval", "--system", "model", "--conversations", str(path), "--catalog", str(tiny_catalog), "--threads", "1",
            "--ranks", str(ranks), "--resume", "--json"]
    st = model.stat()
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the model file was rebuilt
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 1 and "differs in model" in r.output, r.output
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns))
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["extra"]["resumed_conversations"] == 1 and ranks.exists()
    # a journal made with another ask head (it changes which tracks a request asks for) is not continued
    other_head = tmp_path / "other_head.npz"
    shutil.copy(HEAD_FILE, other_head)
    journal = Journal.open(tmp_path / "r2.jsonl", run_key("model", read_conversations(path), 0, None, 0, fingerprint,
                                                         catalog=tiny_catalog, model=model, ask_head=other_head))
    journal.add({"index": 0, "rows": [], "skipped_unknown_target": 0, "skipped_target_played": 0,
                 "unknown_ids_returned": 0})
    journal.close()
    r = CliRunner().invoke(cli, args[:-4] + ["--ranks", str(tmp_path / "r2.jsonl"), "--resume", "--json"])
    assert r.exit_code == 1 and "differs in ask_head" in r.output, r.output
