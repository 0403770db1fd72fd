"""Metrics against hand-computed cases, the evaluation loop (history, exclusion, skipped turns), the eval CLI."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from talkplay_edge.catalog import Catalog
from talkplay_edge.cli import cli
from talkplay_edge.evaluate import (
    SYSTEMS, RanksFormatError, UnknownSystemError, clean_ranking, compare_ranks, evaluate, first_hit_rank,
    format_comparison, format_table, get_recommender, hit_at, iter_turns, read_ranks, reciprocal_rank,
    register_recommender, sign_test_p, summarise, write_ranks,
)


def conv(cid: str, *pairs) -> dict:
    turns = []
    for user, targets in pairs:
        turns += [{"role": "user", "content": user}, {"role": "assistant", "content": "ok", "track_ids": targets}]
    return {"id": cid, "turns": turns}


class Scripted:
    """Returns a fixed list per call (in order) and records what it was shown."""

    name = "scripted"

    def __init__(self, lists):
        self.lists = list(lists)
        self.calls = []

    def recommend(self, history, exclude, n=100):
        self.calls.append((list(history), set(exclude), n))
        return self.lists.pop(0)


def test_metrics_hand_computed():
    ranked = ["a", "b", "c", "d"]
    assert first_hit_rank(ranked, {"c"}) == 3
    assert first_hit_rank(ranked, {"d", "b"}) == 2
    assert first_hit_rank(ranked, {"z"}) is None
    assert first_hit_rank(ranked, {"d"}, k=3) is None
    assert reciprocal_rank(ranked, ["c"]) == pytest.approx(1 / 3)
    assert reciprocal_rank(ranked, ["z"]) == 0.0
    assert hit_at(ranked, ["a"], 1) == 1.0 and hit_at(ranked, ["b"], 1) == 0.0
    s = summarise([1, 3, None, 20, 150])
    assert s["turns"] == 5
    assert s["mrr"] == pytest.approx((1 + 1 / 3 + 0 + 1 / 20 + 0) / 5)
    assert (s["hit@1"], s["hit@10"], s["hit@100"]) == (0.2, 0.4, 0.6)
    assert summarise([])["mrr"] == 0.0


def test_clean_ranking():
    out, unknown = clean_ranking(["a", "x", "a", "b", "zz", "c", "d"], exclude={"x"}, valid={"a", "b", "c", "d", "x"}, n=3)
    assert out == ["a", "b", "c"] and unknown == 1


def test_iter_turns_history_and_played():
    c = conv("c", ("hi", ["t1"]), ("more", ["t2"]), ("again", ["t3"]))
    steps = list(iter_turns(c))
    assert [s[0] for s in steps] == [1, 2, 3]
    idx, history, targets, played = steps[2]
    assert history[-1] == {"role": "user", "content": "again"} and len(history) == 5
    assert targets == ["t3"] and played == ["t1", "t2"]


def test_evaluate_scores_excludes_and_skips():
    ids = {f"t{i}" for i in range(10)}
    convs = [conv("a", ("one", ["t1"]), ("two", ["t2"]), ("three", ["ghost"])),
             conv("b", ("one", ["t5"]), ("two", ["t6"]))]
    # turn a1: t1 at rank 2; a2: system puts the played t1 first (filtered) then t2 → rank 1;
    # a3: unknown target → skipped, never asked; b1: miss; b2: t6 at rank 3 after dropping an unknown id
    rec = Scripted([["t0", "t1"], ["t1", "t2", "t3"], ["t9"], ["t5", "nope", "t0", "t6"]])
    res = evaluate(rec, convs, ids)
    assert res.turns == 4 and res.skipped_unknown_target == 1 and res.conversations == 2
    assert res.unknown_ids_returned == 1
    assert res.overall["mrr"] == pytest.approx((1 / 2 + 1 + 0 + 1 / 2) / 4)
    # b2: t5 was played → filtered, "nope" dropped, t0 rank 1, t6 rank 2
    assert res.overall["hit@1"] == pytest.approx(1 / 4) and res.overall["hit@10"] == pytest.approx(3 / 4)
    assert res.per_turn[1]["turns"] == 2 and res.per_turn[1]["mrr"] == pytest.approx(0.25)
    assert res.per_turn[2]["mrr"] == pytest.approx((1 + 1 / 2) / 2)
    assert 3 not in res.per_turn
    assert rec.calls[1][1] == {"t1"} and rec.calls[1][0][-1]["content"] == "two"
    assert rec.calls[3][1] == {"t5"} and rec.calls[0][1] == set()
    d = res.to_dict()
    assert json.loads(json.dumps(d))["per_turn"]["2"]["turns"] == 2
    assert "turn_ranks" not in d  # the per-turn rows go to --ranks, not into the summary
    assert res.turn_ranks == [{"conversation": "a", "turn": 1, "intent": None, "rank": 2},
                              {"conversation": "a", "turn": 2, "intent": None, "rank": 1},
                              {"conversation": "b", "turn": 1, "intent": None, "rank": None},
                              {"conversation": "b", "turn": 2, "intent": None, "rank": 2}]
    table = format_table(res)
    assert "MRR" in table and "1 with targets not in the catalog" in table


def test_target_already_played_is_skipped():
    res = evaluate(Scripted([["t2"]]), [conv("c", ("one", ["t1"]), ("again", ["t1"]))], {"t1", "t2"})
    assert res.turns == 1 and res.skipped_target_played == 1


def test_registry(tiny_catalog):
    with Catalog.open(tiny_catalog) as cat:
        with pytest.raises(UnknownSystemError, match="unknown system 'nope'"):
            get_recommender("nope", cat)

        class Fixed:
            name = "fixed"

            def __init__(self, catalog, threads=2, **kw):
                self.first = catalog.track_ids()[0]

            def recommend(self, history, exclude, n=100):
                return [self.first]

        register_recommender("fixed-test", Fixed)
        try:
            rec = get_recommender("fixed-test", cat, threads=1, seed=3)
            assert rec.recommend([], set()) == [cat.track_ids()[0]]
        finally:
            SYSTEMS.pop("fixed-test")


def _write(path, convs, extra_line=None):
    lines = [json.dumps(c) for c in convs]
    if extra_line is not None:
        lines.insert(1, extra_line)
    path.write_text("\n".join(lines) + "\n")


def test_cli_eval_json_and_errors(tiny_catalog, tmp_path):
    with Catalog.open(tiny_catalog) as cat:
        pl = cat.playlists()[0]["track_ids"]
        top = [r[0] for r in cat.conn.execute("select id from tracks order by popularity desc, id limit 1")]
    convs = [conv("a", ("hi", [pl[0]]), ("more", [pl[1]]), ("unknown", ["not-a-track"])), conv("b", ("x", top))]
    good = tmp_path / "c.jsonl"
    _write(good, convs)
    r = CliRunner().invoke(cli, ["eval", "--system", "popularity", "--conversations", str(good),
                                 "--catalog", str(tiny_catalog), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["turns"] == 3 and d["skipped_unknown_target"] == 1 and d["system"] == "popularity"
    assert d["per_turn"]["1"]["turns"] == 2 and d["per_turn"]["1"]["hit@1"] >= 0.5  # b's target is the most popular
    assert d["overall"]["hit@100"] == 1.0 and d["runtime_s"] >= 0
    r = CliRunner().invoke(cli, ["eval", "--system", "popularity", "--conversations", str(good),
                                 "--catalog", str(tiny_catalog), "--limit", "1"])
    assert r.exit_code == 0 and "MRR" in r.output and "2 scored turns" in r.output
    # --skip 1: conversation b alone; --max-turn 1: first turns only (a's turn 1 and b's)
    d = json.loads(CliRunner().invoke(cli, ["eval", "--system", "popularity", "--conversations", str(good),
                                            "--catalog", str(tiny_catalog), "--skip", "1", "--json"]).stdout)
    assert d["conversations"] == 1 and d["turns"] == 1 and d["overall"]["hit@1"] == 1.0
    d = json.loads(CliRunner().invoke(cli, ["eval", "--system", "popularity", "--conversations", str(good),
                                            "--catalog", str(tiny_catalog), "--max-turn", "1", "--json"]).stdout)
    assert d["turns"] == 2 and list(d["per_turn"]) == ["1"] and d["skipped_unknown_target"] == 0

    bad = tmp_path / "bad.jsonl"
    _write(bad, convs, extra_line='{"id": "x", "turns": [{"role": "assistant", "content": "no ids"}]}')
    r = CliRunner().invoke(cli, ["eval", "--system", "popularity", "--conversations", str(bad),
                                 "--catalog", str(tiny_catalog)])
    assert r.exit_code == 1 and "bad.jsonl:2:" in r.output and "track_ids" in r.output
    r = CliRunner().invoke(cli, ["eval", "--system", "nope", "--conversations", str(good), "--catalog", str(tiny_catalog)])
    assert r.exit_code == 1 and "unknown system 'nope'" in r.output


def test_sign_test_hand_computed():
    assert sign_test_p(0, 0) == 1.0
    assert sign_test_p(3, 3) == 1.0
    assert sign_test_p(5, 0) == pytest.approx(2 / 32)  # all 5 of 5 one way: 2 · 1/2^5
    assert sign_test_p(1, 9) == pytest.approx(2 * (1 + 10) / 1024)
    assert sign_test_p(9, 1) == sign_test_p(1, 9)


def _rows(ranks, intents=None):
    return [{"conversation": f"c{i // 2}", "turn": i % 2 + 1, "intent": (intents or [None] * len(ranks))[i], "rank": r}
            for i, r in enumerate(ranks)]


def test_compare_ranks_paired():
    a = _rows([1, None, 5, 2, None, 10], ["x", "x", "y", "y", "y", "x"])
    b = _rows([2, 1, 5, 1, None, 100], ["x", "x", "y", "y", "y", "x"])
    cmp = compare_ranks(a, b, n_boot=200)
    o = cmp["overall"]
    assert o["turns"] == 6 and cmp["only_a"] == cmp["only_b"] == 0
    assert o["mrr_a"] == pytest.approx((1 + 0 + 0.2 + 0.5 + 0 + 0.1) / 6)
    assert o["mrr_b"] == pytest.approx((0.5 + 1 + 0.2 + 1 + 0 + 0.01) / 6)
    assert o["mrr_diff"] == pytest.approx(o["mrr_b"] - o["mrr_a"])
    # turns: B better on 2 and 4, A better on 1 and 6, tied on 3 and 5
    assert (o["b_better"], o["a_better"], o["ties"]) == (2, 2, 2) and o["sign_p"] == 1.0
    assert (o["hit1_a"], o["hit1_b"], o["hit1_only_b"], o["hit1_only_a"]) == (1, 2, 2, 1)
    lo, hi = o["mrr_diff_ci95"]
    assert lo <= o["mrr_diff"] <= hi
    assert cmp["per_intent"]["x"]["turns"] == 3 and cmp["per_intent"]["y"]["b_better"] == 1
    # only the shared turns are paired
    cmp = compare_ranks(a[:4], b[2:], n_boot=0)
    assert cmp["overall"]["turns"] == 2 and cmp["only_a"] == 2 and cmp["only_b"] == 2
    assert "mrr_diff_ci95" not in cmp["overall"]
    assert "sign test" in format_comparison(cmp, per_intent=True)


def test_ranks_file_round_trip_and_errors(tmp_path):
    rows = _rows([3, None], ["genre", "mood"])
    write_ranks(rows, tmp_path / "r.jsonl")
    assert read_ranks(tmp_path / "r.jsonl") == rows
    write_ranks(rows, tmp_path / "r.jsonl.gz")  # compressed, byte for byte the same each time
    assert read_ranks(tmp_path / "r.jsonl.gz") == rows and (tmp_path / "r.jsonl.gz").read_bytes()[:2] == b"\x1f\x8b"
    first = (tmp_path / "r.jsonl.gz").read_bytes()
    write_ranks(rows, tmp_path / "r.jsonl.gz")
    assert (tmp_path / "r.jsonl.gz").read_bytes() == first
    (tmp_path / "cut.jsonl.gz").write_bytes(first[:-12])
    with pytest.raises(RanksFormatError, match="cut.jsonl.gz: cannot read"):
        read_ranks(tmp_path / "cut.jsonl.gz")
    (tmp_path / "bad.jsonl").write_text('{"conversation": "c", "turn": 1, "rank": 0}\n')
    with pytest.raises(RanksFormatError, match="line 1"):
        read_ranks(tmp_path / "bad.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(RanksFormatError, match="no rank rows"):
        read_ranks(tmp_path / "empty.jsonl")
    (tmp_path / "eval.json").write_text(json.dumps({"overall": {}}, indent=2))  # an --json summary, not ranks
    with pytest.raises(RanksFormatError, match="not a rank row"):
        read_ranks(tmp_path / "eval.json")


def test_cli_eval_ranks_and_compare(tiny_catalog, tmp_path):
    with Catalog.open(tiny_catalog) as cat:
        pl = cat.playlists()[0]["track_ids"]
    convs = [conv("a", ("hi", [pl[0]]), ("more", [pl[1]])), conv("b", ("x", [pl[2]]))]
    path = tmp_path / "c.jsonl"
    _write(path, convs)
    for system in ("popularity", "random"):
        r = CliRunner().invoke(cli, ["eval", "--system", system, "--conversations", str(path), "--catalog",
                                     str(tiny_catalog), "--ranks", str(tmp_path / f"{system}.jsonl"), "--json"])
        assert r.exit_code == 0, r.output
        summary = json.loads(r.stdout)
        rows = read_ranks(tmp_path / f"{system}.jsonl")
        assert [(x["conversation"], x["turn"]) for x in rows] == [("a", 1), ("a", 2), ("b", 1)]
        assert summarise([x["rank"] for x in rows])["mrr"] == pytest.approx(summary["overall"]["mrr"])
    r = CliRunner().invoke(cli, ["eval-compare", str(tmp_path / "popularity.jsonl"), str(tmp_path / "random.jsonl"),
                                 "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["overall"]["turns"] == 3 and d["b"].endswith("random.jsonl")
    r = CliRunner().invoke(cli, ["eval-compare", str(tmp_path / "popularity.jsonl"), str(path)])
    assert r.exit_code == 1 and "not a rank row" in r.output
    other = tmp_path / "other.jsonl"
    write_ranks([{"conversation": "zz", "turn": 1, "intent": None, "rank": 1}], other)
    r = CliRunner().invoke(cli, ["eval-compare", str(tmp_path / "popularity.jsonl"), str(other)])
    assert r.exit_code == 1 and "share no scored turn" in r.output


def test_split_evenly_keeps_order_and_balance():
    from talkplay_edge.evaluate import split_evenly

    assert split_evenly(list("abcdefg"), 3) == [(0, ["a", "b", "c"]), (3, ["d", "e"]), (5, ["f", "g"])]
    assert split_evenly(["a", "b"], 5) == [(0, ["a"]), (1, ["b"])]  # never an empty run
    assert split_evenly([], 4) == [(0, [])]


def test_cli_eval_jobs_gives_the_figures_of_one_process(tiny_catalog, tmp_path):
    from talkplay_edge.conversations import build_conversations

    with Catalog.open(tiny_catalog) as cat:
        build_conversations(cat, tmp_path, seed=5, sizes={"train": 1, "valid": 1, "test": 7, "test_unseen": 1},
                            show_progress=False)
    convs = tmp_path / "test.jsonl"
    out = {}
    for jobs in (1, 3):
        r = CliRunner().invoke(cli, ["eval", "--system", "bm25", "--conversations", str(convs), "--catalog",
                                     str(tiny_catalog), "--skip", "1", "--jobs", str(jobs), "--threads", "1",
                                     "--ranks", str(tmp_path / f"r{jobs}.jsonl"), "--json"])
        assert r.exit_code == 0, r.output
        out[jobs] = json.loads(r.stdout)
    assert out[3]["extra"]["jobs"] == 3 and out[1]["extra"]["jobs"] == 1
    assert out[1]["turns"] > 6 and out[1]["conversations"] == out[3]["conversations"] == 6
    for key in ("turns", "overall", "per_turn", "per_intent", "skipped_unknown_target", "skipped_target_played"):
        assert out[3][key] == out[1][key], key
    assert read_ranks(tmp_path / "r3.jsonl") == read_ranks(tmp_path / "r1.jsonl")  # the same turns, in order


def test_cli_eval_jobs_reports_a_failing_process(tiny_catalog, tmp_path):
    with Catalog.open(tiny_catalog) as cat:
        pl = cat.playlists()[0]["track_ids"]
    path = tmp_path / "c.jsonl"
    _write(path, [conv("a", ("hi", [pl[0]])), conv("b", ("x", [pl[1]]))])
    register_recommender("broken-in-a-job", "talkplay_edge.baselines:NoSuchRecommender")
    register_recommender("local-object", lambda catalog, threads=1, **kw: None)
    try:
        r = CliRunner().invoke(cli, ["eval", "--system", "broken-in-a-job", "--conversations", str(path),
                                     "--catalog", str(tiny_catalog), "--jobs", "2"])
        assert r.exit_code == 1
        assert re.search(r"eval job [12] of 2: AttributeError: .*NoSuchRecommender", r.output), r.output
        r = CliRunner().invoke(cli, ["eval", "--system", "local-object", "--conversations", str(path),
                                     "--catalog", str(tiny_catalog), "--jobs", "2"])
        assert r.exit_code == 1 and "'module:attribute' string" in r.output, r.output
    finally:
        SYSTEMS.pop("broken-in-a-job"), SYSTEMS.pop("local-object")


def test_cli_eval_summary_pools_ranks_of_pieces(tiny_catalog, tmp_path):
    from talkplay_edge.conversations import build_conversations

    with Catalog.open(tiny_catalog) as cat:
        build_conversations(cat, tmp_path, seed=7, sizes={"train": 1, "valid": 1, "test": 6, "test_unseen": 1},
                            show_progress=False)
    convs = str(tmp_path / "test.jsonl")
    base = ["eval", "--system", "bm25", "--conversations", convs, "--catalog", str(tiny_catalog), "--json"]
    whole = json.loads(CliRunner().invoke(cli, base + ["--ranks", str(tmp_path / "all.jsonl")]).stdout)
    for name, piece in (("a", ["--limit", "2"]), ("b", ["--skip", "2", "--limit", "3"]), ("c", ["--skip", "5"])):
        assert CliRunner().invoke(cli, base + piece + ["--ranks", str(tmp_path / f"{name}.jsonl")]).exit_code == 0
    pieces = [str(tmp_path / f"{n}.jsonl") for n in "cab"]  # any order
    r = CliRunner().invoke(cli, ["eval-summary", *pieces, "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["conversations"] == 6 and d["turns"] == whole["turns"] > 6
    rounded = lambda x: {k: rounded(v) for k, v in x.items()} if isinstance(x, dict) else round(x, 12)  # noqa: E731
    for key in ("overall", "per_turn", "per_intent"):
        assert rounded(d[key]) == rounded(whole[key]), key
    r = CliRunner().invoke(cli, ["eval-summary", *pieces, "--per-intent"])
    assert r.exit_code == 0 and r.output.startswith("3 ranks files: 6 conversations") and "intent" in r.output
    r = CliRunner().invoke(cli, ["eval-summary", pieces[1], str(tmp_path / "all.jsonl")])
    assert r.exit_code == 1 and "is also in" in r.output
    r = CliRunner().invoke(cli, ["eval-summary", convs])
    assert r.exit_code == 1 and "not a rank row" in r.output
    # --only-turns: the whole run restricted to two pieces' turns is those pieces pooled
    r = CliRunner().invoke(cli, ["eval-summary", str(tmp_path / "all.jsonl"), "--only-turns", pieces[1],
                                 "--only-turns", pieces[0], "--json"])
    assert r.exit_code == 0, r.output
    only = json.loads(r.stdout)
    r = CliRunner().invoke(cli, ["eval-summary", pieces[1], pieces[0], "--json"])
    two = json.loads(r.stdout)
    assert only["conversations"] == 3 and 3 < only["turns"] == two["turns"] < whole["turns"]
    assert rounded(only["overall"]) == rounded(two["overall"])
    r = CliRunner().invoke(cli, ["eval-summary", pieces[1], "--only-turns", str(tmp_path / "all.jsonl")])
    assert r.exit_code == 1 and "are in no RANKS file" in r.output, r.output


def test_eval_jobs_end_when_the_parent_is_killed(tiny_catalog, tmp_path):
    """A SIGKILLed `talkplay eval --jobs 2` leaves no job process running (Linux: PR_SET_PDEATHSIG)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    if not sys.platform.startswith("linux"):
        pytest.skip("the parent-death signal is Linux's")
    (tmp_path / "slowrec.py").write_text(
        "import time\n"
        "class Slow:\n"
        "    name = 'slow'\n"
        "    def __init__(self, catalog, threads=1, **kw):\n"
        "        pass\n"
        "    def recommend(self, history, exclude, n=100):\n"
        "        time.sleep(120)\n"
        "        return []\n")
    with Catalog.open(tiny_catalog) as cat:
        pl = cat.playlists()[0]["track_ids"]
    path = tmp_path / "c.jsonl"
    _write(path, [conv("a", ("hi", [pl[0]])), conv("b", ("x", [pl[1]]))])
    code = ("import sys; from talkplay_edge.evaluate import register_recommender; "
            "register_recommender('slow', 'slowrec:Slow'); from talkplay_edge.cli import main; sys.exit(main())")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    parent = subprocess.Popen([sys.executable, "-c", code, "eval", "--system", "slow", "--conversations", str(path),
                               "--catalog", str(tiny_catalog), "--jobs", "2"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def children() -> list[int]:
        out = []
        for d in os.listdir("/proc"):
            try:
                stat = open(f"/proc/{d}/stat").read()
                cmd = open(f"/proc/{d}/cmdline", "rb").read()
            except OSError:
                continue
            if d.isdigit() and int(stat.rsplit(")", 1)[1].split()[1]) == parent.pid and b"spawn_main" in cmd:
                out.append(int(d))
        return out

    def running(pid: int) -> bool:
        try:
            return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    jobs: list[int] = []
    try:
        deadline = time.time() + 60
        while len(jobs := children()) < 2 and time.time() < deadline:
            time.sleep(0.2)
        assert len(jobs) == 2, "the two job processes did not start"
        time.sleep(3)  # past their start-up, into the slow recommend()
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.time() + 15
        while any(map(running, jobs)) and time.time() < deadline:
            time.sleep(0.2)
        alive = [j for j in jobs if running(j)]
        assert not alive, f"job processes {alive} outlived their killed parent"
    finally:
        for j in filter(running, jobs):
            os.kill(j, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()


FLAKY = '''
import os
from talkplay_edge.evaluate import get_recommender

class Flaky:
    """bm25, but stopping (as a crash or Ctrl-C would) at the conversation whose first message is FLAKY_STOP."""
    name = "bm25"
    def __init__(self, catalog, threads=1, **kw):
        self.inner = get_recommender("bm25", catalog, threads=threads)
    def recommend(self, history, exclude, n=100):
        if history and history[0]["content"] == os.environ.get("FLAKY_STOP"):
            raise RuntimeError("stopped here")
        return self.inner.recommend(history, exclude, n)
'''


@pytest.mark.parametrize("jobs", [1, 2])
def test_cli_eval_resume_continues_a_stopped_run(tiny_catalog, tmp_path, monkeypatch, jobs):
    """A run stopped at conversation 5 of 7 keeps 1–4 in RANKS.partial; --resume scores the rest and gives
    exactly the figures and ranks file of one uninterrupted run."""
    from talkplay_edge.conversations import build_conversations, read_conversations
    from talkplay_edge.eval_journal import journal_path, read_journal

    with Catalog.open(tiny_catalog) as cat:
        build_conversations(cat, tmp_path, seed=5, sizes={"train": 1, "valid": 1, "test": 8, "test_unseen": 1},
                            show_progress=False)
    convs = tmp_path / "test.jsonl"
    lines = convs.read_text().splitlines()
    odd = json.loads(lines[3])
    odd["id"] = "line\u2028separator"  # a character str.splitlines() breaks on: a journal line must not
    lines[3] = json.dumps(odd, ensure_ascii=False)
    convs.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "flakyrec.py").write_text(FLAKY)
    monkeypatch.syspath_prepend(str(tmp_path))
    register_recommender("flaky", "flakyrec:Flaky")
    base = ["eval", "--conversations", str(convs), "--catalog", str(tiny_catalog), "--skip", "1",
            "--jobs", str(jobs), "--threads", "1"]
    try:
        r = CliRunner().invoke(cli, base + ["--system", "bm25", "--ranks", str(tmp_path / "whole.jsonl"), "--json"])
        assert r.exit_code == 0, r.output
        whole = json.loads(r.stdout)
        assert not journal_path(tmp_path / "whole.jsonl").exists()  # a finished run leaves no journal

        stop_at = read_conversations(convs)[6]["turns"][0]["content"]  # the 6th conversation scored (of 7)
        monkeypatch.setenv("FLAKY_STOP", stop_at)
        ranks = tmp_path / "r.jsonl"
        r = CliRunner().invoke(cli, base + ["--system", "flaky", "--ranks", str(ranks)])
        assert r.exit_code == 1 and "stopped here" in r.output, r.output
        assert "--resume to continue" in r.output and not ranks.exists()
        key, done = read_journal(journal_path(ranks))
        assert key["conversations"] == 7 and 6 not in done and done  # the ones before the stop (jobs 2: some)
        if jobs == 1:
            assert sorted(done) == [1, 2, 3, 4, 5]
        with journal_path(ranks).open("a") as f:
            f.write('{"index": 7, "rows": [{"conv')  # the line being written when the run was killed

        r = CliRunner().invoke(cli, base + ["--system", "flaky", "--ranks", str(ranks)])
        assert r.exit_code == 1 and "add --resume to continue it" in r.output, r.output
        r = CliRunner().invoke(cli, base + ["--system", "flaky", "--ranks", str(ranks), "--resume", "--max-turn", "2"])
        assert r.exit_code == 1 and "differs in max_turn" in r.output, r.output
        r = CliRunner().invoke(cli, base + ["--system", "bm25", "--ranks", str(ranks), "--resume"])
        assert r.exit_code == 1 and "differs in system" in r.output, r.output

        monkeypatch.delenv("FLAKY_STOP")
        r = CliRunner().invoke(cli, base + ["--system", "flaky", "--ranks", str(ranks), "--resume", "--json"])
        assert r.exit_code == 0, r.output
        resumed = json.loads(r.stdout)
        assert resumed["extra"]["resumed_conversations"] == len(done)
        assert resumed["timed_turns"] == whole["turns"] - sum(len(rec["rows"]) for rec in done.values())
        for key in ("conversations", "turns", "overall", "per_turn", "per_intent", "skipped_unknown_target",
                    "skipped_target_played"):
            assert resumed[key] == whole[key], key
        assert read_ranks(ranks) == read_ranks(tmp_path / "whole.jsonl")
        assert not journal_path(ranks).exists()
    finally:
        SYSTEMS.pop("flaky")


def test_cli_eval_resume_errors(tiny_catalog, tmp_path):
    with Catalog.open(tiny_catalog) as cat:
        pl = cat.playlists()[0]["track_ids"]
    path = tmp_path / "c.jsonl"
    _write(path, [conv("a", ("hi", [pl[0]]))])
    base = ["eval", "--system", "bm25", "--conversations", str(path), "--catalog", str(tiny_catalog)]
    r = CliRunner().invoke(cli, base + ["--resume"])
    assert r.exit_code == 1 and "--resume needs --ranks" in r.output
    r = CliRunner().invoke(cli, base + ["--ranks", str(tmp_path / "fresh.jsonl"), "--resume"])
    assert r.exit_code == 0 and "nothing to resume" in r.output and (tmp_path / "fresh.jsonl").exists()
    r = CliRunner().invoke(cli, base + ["--ranks", "/dev/null", "--resume"])  # not a file: no journal there
    assert r.exit_code == 1 and "needs --ranks to name a file" in r.output
    r = CliRunner().invoke(cli, ["eval", "--system", "nope", "--conversations", str(path), "--catalog",
                                 str(tiny_catalog), "--skip", "5"])  # nothing to score, still a wrong name
    assert r.exit_code == 1 and "unknown system 'nope'" in r.output
    (tmp_path / "r.jsonl.partial").write_text('{"not": "a journal"}\n')
    r = CliRunner().invoke(cli, base + ["--ranks", str(tmp_path / "r.jsonl"), "--resume"])
    assert r.exit_code == 1 and "not a journal of `talkplay eval --ranks`" in r.output
    r = CliRunner().invoke(cli, ["eval", "--system", "nope", "--conversations", str(path), "--catalog",
                                 str(tiny_catalog), "--ranks", str(tmp_path / "n.jsonl")])
    assert r.exit_code == 1 and not (tmp_path / "n.jsonl.partial").exists()  # nothing scored: no journal left


def test_journal_is_one_run_s_at_a_time_and_keeps_what_is_intact(tmp_path):
    import sys

    from talkplay_edge.eval_journal import Journal, JournalError, journal_path, read_journal, run_key

    key = run_key("bm25", [{"id": "a", "turns": []}, {"id": "b", "turns": []}], 0, None, 0, "fp")
    rec = {"index": 0, "rows": [{"conversation": "a", "turn": 1, "intent": None, "rank": 3}],
           "skipped_unknown_target": 0, "skipped_target_played": 0, "unknown_ids_returned": 0}
    j = Journal.open(tmp_path / "r.jsonl", key)
    j.add(rec)
    if sys.platform != "win32":
        with pytest.raises(JournalError, match="another `talkplay eval` is writing"):
            Journal.open(tmp_path / "r.jsonl", key, resume=True)
    j.close()
    path = journal_path(tmp_path / "r.jsonl")
    with path.open("ab") as f:
        f.write(b'{"index": 1, "rows": [')  # killed mid-line
    j = Journal.open(tmp_path / "r.jsonl", key, resume=True)
    assert list(j.done) == [0]
    j.add({**rec, "index": 1, "rows": []})
    j.close()
    assert sorted(read_journal(path)[1]) == [0, 1]  # the cut line is gone, the next record on a line of its own
    with path.open("ab") as f:
        f.write(b'{"index": 1}\n')
    with pytest.raises(JournalError, match="line 4: not a conversation record"):
        read_journal(path)


def test_cli_eval_only_turns_and_splice_give_a_whole_run_s_ranks(tiny_catalog, tmp_path):
    from talkplay_edge.conversations import build_conversations

    with Catalog.open(tiny_catalog) as cat:
        build_conversations(cat, tmp_path, seed=7, sizes={"train": 1, "valid": 1, "test": 6, "test_unseen": 1},
                            show_progress=False)
    convs = str(tmp_path / "test.jsonl")
    base = ["eval", "--conversations", convs, "--catalog", str(tiny_catalog), "--json"]
    for system in ("bm25", "popularity"):
        assert CliRunner().invoke(cli, base + ["--system", system, "--ranks", str(tmp_path / f"{system}.jsonl")]).exit_code == 0
    bm25, popularity = read_ranks(tmp_path / "bm25.jsonl"), read_ranks(tmp_path / "popularity.jsonl")
    listed = bm25[1::2]
    assert len(listed) >= 4 and len({r["conversation"] for r in listed}) >= 3
    turns = tmp_path / "turns.jsonl"
    turns.write_text("".join(json.dumps({"conversation": r["conversation"], "turn": r["turn"]}) + "\n" for r in listed))
    for jobs in ("1", "2"):
        r = CliRunner().invoke(cli, base + ["--system", "popularity", "--only-turns", str(turns), "--jobs", jobs,
                                            "--ranks", str(tmp_path / f"patch{jobs}.jsonl")])
        assert r.exit_code == 0, r.output
        d = json.loads(r.stdout)
        assert d["turns"] == len(listed) and d["extra"]["only_turns"] == str(turns)
        patch = read_ranks(tmp_path / f"patch{jobs}.jsonl")
        want = {(x["conversation"], x["turn"]) for x in listed}
        assert patch == [x for x in popularity if (x["conversation"], x["turn"]) in want]  # a whole run's ranks
    r = CliRunner().invoke(cli, ["eval-splice", str(tmp_path / "bm25.jsonl"), str(tmp_path / "patch2.jsonl"),
                                 "--out", str(tmp_path / "spliced.jsonl.gz"), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["turns"] == len(bm25) and info["replaced"] == len(listed)
    spliced = read_ranks(tmp_path / "spliced.jsonl.gz")
    assert spliced[1::2] == popularity[1::2] and spliced[::2] == bm25[::2]
    assert info["rank_changed"] == sum(a["rank"] != b["rank"] for a, b in zip(bm25[1::2], popularity[1::2])) > 0
    # errors: a patch turn the base lacks, a turn list naming no conversation here, a file of something else
    r = CliRunner().invoke(cli, ["eval-splice", str(tmp_path / "patch1.jsonl"), str(tmp_path / "bm25.jsonl"),
                                 "--out", str(tmp_path / "x.jsonl")])
    assert r.exit_code == 1 and "is not in" in r.output and not (tmp_path / "x.jsonl").exists()
    (tmp_path / "elsewhere.jsonl").write_text(json.dumps({"conversation": "nowhere-1", "turn": 2}) + "\n")
    r = CliRunner().invoke(cli, base + ["--system", "bm25", "--only-turns", str(tmp_path / "elsewhere.jsonl")])
    assert r.exit_code == 1 and "none of its conversations" in r.output
    r = CliRunner().invoke(cli, base + ["--system", "bm25", "--only-turns", convs])
    assert r.exit_code == 1 and "not a turn (conversation, turn)" in r.output
