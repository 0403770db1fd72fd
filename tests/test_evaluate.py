"""Metrics against hand-computed cases, the evaluation loop (history, exclusion, skipped turns), the eval CLI."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from talkplay_edge.catalog import Catalog
from talkplay_edge.cli import cli
from talkplay_edge.evaluate import (
    SYSTEMS, UnknownSystemError, clean_ranking, evaluate, first_hit_rank, format_table, get_recommender, hit_at,
    iter_turns, reciprocal_rank, register_recommender, summarise,
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
