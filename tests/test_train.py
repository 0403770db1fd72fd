"""The training path end to end on CPU: tiny Llama + catalog vocabulary → a few SFT steps → delta → merged GGUF
→ the runtime recommends real catalog tracks with it."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from export import gguf as gguf_export  # noqa: E402
from export import train  # noqa: E402
from talkplay_edge.catalog import Catalog  # noqa: E402
from talkplay_edge.chat_format import training_segments  # noqa: E402
from talkplay_edge.conversations import build_conversations  # noqa: E402
from talkplay_edge.model_build import load_delta, merge_delta_into_gguf  # noqa: E402


@pytest.fixture(scope="module")
def trained(tiny_catalog, tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    with Catalog.open(tiny_catalog) as cat:
        build_conversations(cat, d / "conv", seed=0, sizes={"train": 24, "valid": 4, "test": 4, "test_unseen": 4},
                            show_progress=False)
    summary = train.main([f"--catalog={tiny_catalog}", f"--train={d / 'conv' / 'train.jsonl'}",
                          f"--valid={d / 'conv' / 'valid.jsonl'}", f"--out={d / 'out'}", "--base=tiny",
                          "--max_steps=6", "--batch_size=4", "--eval_every=3", "--eval_batches=1", "--lora_r=4",
                          "--lora_alpha=8", "--seq_len=256", "--warmup_steps=1", "--lr=0.01", "--emb_lr=0.01",
                          "--init=text"])
    return d, summary


def test_training_segments_target_only_assistant_turns(tiny_catalog, tmp_path):
    with Catalog.open(tiny_catalog) as cat:
        tid = cat.track_ids()[0]
        conv = {"id": "c", "turns": [{"role": "user", "content": "play <|cf_0001|> something"},
                                     {"role": "assistant", "content": "Here you go.", "track_ids": [tid]}]}
        segs = training_segments(conv, cat)
        targets = "".join(t for t, _, target in segs if target)
        assert targets.startswith(cat.span(tid)) and targets.endswith("Here you go.<|im_end|>")
        user = [(t, sp) for t, sp, target in segs if "<|cf_0001|>" in t]
        assert user == [("play <|cf_0001|> something", False)]  # user text stays plain text


def test_train_logs_and_loss_falls(trained):
    _, summary = trained
    log = summary["log"]
    assert [e["step"] for e in log] == [3, 6]
    assert all(e["valid_loss"] > 0 for e in log) and summary["tokens_seen"] > 0
    assert all(0 <= e["valid_hit1"] <= 1 and e["hit_spans"] > 0 for e in log)
    assert log[-1]["valid_loss"] < log[0]["valid_loss"] * 1.05


def test_trained_delta_runs_in_the_runtime(trained, tiny_catalog):
    from talkplay_edge.runtime import TalkPlay

    d, summary = trained
    tensors, meta = load_delta(d / "out")
    with Catalog.open(tiny_catalog) as cat:
        assert json.loads(meta["added_tokens"]) == cat.vocabulary and meta["vocab_fingerprint"] == cat.fingerprint
        fp, ids = cat.fingerprint, set(cat.track_ids())
    base = gguf_export.convert_hf_to_gguf(d / "out" / "tiny-base", d / "base.gguf", outtype="f32", quiet=True)
    model = merge_delta_into_gguf(base, tensors, json.loads(meta["added_tokens"]), fp, d / "merged.gguf", quiet=True)
    tp = TalkPlay.load(model, tiny_catalog, threads=2, n_ctx=512)
    try:
        session = tp.chat(max_new_tokens=8)
        for msg in ("something upbeat", "more like that"):
            reply = session.send(msg)
            assert reply.tracks and reply.tracks[0].id in ids
    finally:
        tp.close()


def test_init_delta_continues_from_a_delta(trained, tiny_catalog, tmp_path):
    """A run started from a delta at lr 0 writes that delta back (LoRA and rows, q/k order included);
    ``init_delta_fresh=cf`` restarts the cf rows; another rank is refused."""
    from talkplay_edge.tokens import parse_token

    d, _ = trained
    before, meta = load_delta(d / "out")
    common = [f"--catalog={tiny_catalog}", f"--train={d / 'conv' / 'train.jsonl'}",
              f"--valid={d / 'conv' / 'valid.jsonl'}", "--base=tiny", "--max_steps=1", "--batch_size=2",
              "--eval_batches=1", "--hit_turns=0", "--lora_r=4", "--lora_alpha=8", "--seq_len=256", "--lr=0",
              "--emb_lr=0", "--init=text", f"--init_delta={d / 'out'}"]
    train.main(common + [f"--out={tmp_path / 'same'}"])
    after, _ = load_delta(tmp_path / "same")
    assert sorted(after) == sorted(before)
    lora = [k for k in before if k.startswith("lora_")]
    assert lora and any(abs(before[k]).max() > 0 for k in lora if k.startswith("lora_b."))
    for k in before:
        assert abs(after[k].astype("float32") - before[k].astype("float32")).max() <= 1e-3, k

    train.main(common + [f"--out={tmp_path / 'fresh'}", "--init_delta_fresh=cf"])
    fresh, _ = load_delta(tmp_path / "fresh")
    tokens = json.loads(meta["added_tokens"])
    is_cf = [parse_token(t).modality == "cf" for t in tokens]
    rows_b, rows_f = before["new_token_embd"].astype("float32"), fresh["new_token_embd"].astype("float32")
    changed = abs(rows_f - rows_b).max(axis=1) > 1e-3
    assert changed[is_cf].all() and not changed[[not c for c in is_cf]].any()

    with pytest.raises(SystemExit, match="rank"):
        train.main(common + [f"--out={tmp_path / 'r8'}", "--lora_r=8"])


def _tiny_setup(tiny_catalog, tmp_path):
    cfg = train.Config(base="tiny", out=str(tmp_path), seed=1)
    model, tok, _ = train.load_base(cfg)
    cat = Catalog.open(tiny_catalog)
    train.add_music_tokens(model, tok, cat, "mean")
    with torch.no_grad():  # distinct random rows, so that the music tokens' logits are not tied
        model.get_input_embeddings().weight.normal_(0, 0.5)
    return model, tok, cat


def test_loss_on_target_positions_equals_full_cross_entropy(tiny_catalog, tmp_path):
    model, tok, cat = _tiny_setup(tiny_catalog, tmp_path)
    conv = {"id": "c", "turns": [{"role": "user", "content": "something calm"},
                                 {"role": "assistant", "content": "Here.", "track_ids": [cat.track_ids()[3]]},
                                 {"role": "user", "content": "and another"},
                                 {"role": "assistant", "content": "This one.", "track_ids": [cat.track_ids()[7]]}]}
    ids, labels = train.encode(conv, tok, cat, 256)
    x, y = torch.tensor([ids, ids[:-5] + [0] * 5]), torch.tensor([labels, labels[:-5] + [-100] * 5])
    logits = model(input_ids=x).logits[:, :-1]
    full = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(train.loss_of(model, x, y), full, atol=1e-5)


def test_span_weight_reweights_music_targets_only(tiny_catalog, tmp_path):
    model, tok, cat = _tiny_setup(tiny_catalog, tmp_path)
    conv = {"id": "c", "turns": [{"role": "user", "content": "something calm"},
                                 {"role": "assistant", "content": "Here.", "track_ids": [cat.track_ids()[3]]}]}
    ids, labels = train.encode(conv, tok, cat, 256)
    x, y = torch.tensor([ids]), torch.tensor([labels])
    span_from = tok.convert_tokens_to_ids(cat.vocabulary[0])
    logits = model(input_ids=x).logits[0, :-1]
    target = y[0, 1:]
    keep = target != -100
    ce = torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="none")
    span = target[keep] >= span_from
    assert 0 < int(span.sum()) < int(keep.sum())  # both kinds of target are present
    w = 1 + 3.0 * span.float()
    assert torch.allclose(train.loss_of(model, x, y, span_from, 4.0), (ce * w).sum() / w.sum(), atol=1e-5)
    assert torch.allclose(train.loss_of(model, x, y, span_from, 1.0), ce.mean(), atol=1e-5)
    got_ce, got_target = train.target_ce(model, x, y)
    got_span = got_target >= span_from
    assert int(got_span.sum()) == int(span.sum()) and torch.allclose(got_ce[got_span].sum(), ce[span].sum(), atol=1e-4)
    assert not torch.allclose(train.loss_of(model, x, y, span_from, 4.0), ce.mean())


def test_quick_hit_rate_equals_greedy_decoding_over_the_trie(tiny_catalog, tmp_path):
    """The teacher-forced Hit@1 must agree with real greedy decoding over the trie, span by span."""
    from talkplay_edge.tokens import SPAN_START

    model, tok, cat = _tiny_setup(tiny_catalog, tmp_path)
    model.eval()
    trie = train.catalog_trie(tok, cat)
    start = tok.convert_tokens_to_ids(SPAN_START)
    emb = model.get_output_embeddings().weight
    by_index = sorted(cat.codes())  # the trie's track order

    def encoded(k, tid):
        conv = {"id": str(k), "turns": [{"role": "user", "content": f"request number {k}"},
                                        {"role": "assistant", "content": "ok", "track_ids": [tid]}]}
        return train.encode(conv, tok, cat, 256)

    examples, expected = [], []
    for k in range(12):
        ids, labels = encoded(k, cat.track_ids()[k])
        s = ids.index(start)
        with torch.no_grad():  # real greedy decoding over the trie, one full forward per step
            seq, node = ids[:s + 1], trie.root
            while trie.track[node] < 0:
                child_ids, _ = trie.children(node)
                h = model.get_decoder()(input_ids=torch.tensor([seq])).last_hidden_state[0, -1]
                best = int(child_ids[int((emb[torch.as_tensor(child_ids.astype("int64"))] @ h).argmax())])
                seq, node = seq + [best], trie.child(node, best)
        if k % 2 == 0:  # every other example asks for the very track greedy decoding finds: a hit
            ids, labels = encoded(k, by_index[int(trie.track[node])])
        expected.append(seq == ids[:len(seq)])
        examples.append((ids, labels))
    assert 0 < sum(expected) < len(expected)
    rate, n = train.span_hit_rate(model, examples, trie, start, limit=100, device="cpu")
    assert n == len(examples)
    assert rate == pytest.approx(sum(expected) / len(expected))


@pytest.mark.parametrize("limit", ["max_minutes", "stop_at"])
def test_a_time_limit_stops_with_an_eval_and_a_delta(tiny_catalog, tmp_path, capsys, limit):
    """max_minutes counts from the first step; stop_at is a wall-clock time (the device call's end, less a
    reserve): past it already when loading ends, the run still takes one step, evaluates and saves."""
    import time

    with Catalog.open(tiny_catalog) as cat:
        build_conversations(cat, tmp_path / "conv", seed=1, sizes={"train": 8, "valid": 2, "test": 2, "test_unseen": 2},
                            show_progress=False)
    arg = "--max_minutes=0.0001" if limit == "max_minutes" else f"--stop_at={time.time():.0f}"
    summary = train.main([f"--catalog={tiny_catalog}", f"--train={tmp_path / 'conv' / 'train.jsonl'}",
                          f"--valid={tmp_path / 'conv' / 'valid.jsonl'}", f"--out={tmp_path / 'out'}", "--base=tiny",
                          "--max_steps=1000", "--batch_size=2", "--eval_every=500", "--eval_batches=1",
                          arg, "--hit_turns=4"])
    assert [e["step"] for e in summary["log"]] == [1]
    assert f"stopping at step 1: {limit} reached" in capsys.readouterr().out
    assert (tmp_path / "out" / "train_log.json").is_file() and load_delta(tmp_path / "out")[0]
    assert not list((tmp_path / "out").glob("*.partial"))


def test_data_workers_encode_the_same_examples(tiny_catalog, tmp_path):
    with Catalog.open(tiny_catalog) as cat:
        build_conversations(cat, tmp_path / "conv", seed=2, sizes={"train": 2100, "valid": 1, "test": 1, "test_unseen": 1},
                            show_progress=False)
        _, tok, _ = train.load_base(train.Config(base="tiny", out=str(tmp_path)))
        train.add_music_tokens(train.load_base(train.Config(base="tiny", out=str(tmp_path)))[0], tok, cat, "mean")
        path = str(tmp_path / "conv" / "train.jsonl")
        one = train.load_examples(path, tok, cat, 128, workers=1)
        two = train.load_examples(path, tok, cat, 128, workers=2)
    assert len(one) == 2100 and one == two


def test_calibrate_fits_and_stores_a_span_calibration(trained, tiny_catalog):
    """export.calibrate on the tiny trained delta: per-depth (alpha, beta) from its grid, never a worse NLL
    than the model alone, written beside the delta and read back as the delta's calibration."""
    from export import calibrate
    from talkplay_edge.calibration import read_calibration

    d, _ = trained
    res = calibrate.main([f"--delta={d / 'out'}", "--config=", "--conversations=4", "--min_samples=3", "--write",
                          "--json", f"--catalog={tiny_catalog}", f"--valid={d / 'conv' / 'valid.jsonl'}",
                          "--base=tiny", "--seq_len=256", "--lora_alpha=8", "--no_features"])
    assert res["conversations"] == 4 and res["choices"] > 0
    assert len(res["alpha"]) == len(res["beta"]) == len(res["depths"]) >= calibrate.MIN_DEPTHS
    fitted = [r for r in res["depths"] if r["choices"] >= 3]
    assert fitted, "no depth had enough choices to fit"
    for r in fitted:
        assert r["alpha"] in calibrate.ALPHAS and r["beta"] in calibrate.BETAS
        assert r["nll_calibrated"] <= r["nll_model"] + 1e-9
    for r in res["depths"]:
        if r["choices"] < 3 and "borrowed_from" not in r:
            assert (r["alpha"], r["beta"]) == (0.0, 1.0)
        elif r["choices"] < 3:  # a sparse depth takes a fitted one's weights only when they do better there
            p = res["depths"][r["borrowed_from"]]
            assert (r["alpha"], r["beta"]) == (p["alpha"], p["beta"]) and r["choices"] > 0
            assert r["nll_calibrated"] == r["nll_borrowed"] < r["nll_model"]
    cal = read_calibration(d / "out")
    assert list(cal.alpha) == res["alpha"] and list(cal.beta) == res["beta"]
    assert res["choices"] == sum(r["choices"] for r in res["depths"])


def test_calibrate_fits_a_retrieval_prior(trained, tiny_catalog, tmp_path):
    """``--retrieval``: the prior's spec comes from its grid, (alpha, beta) are fitted with the retrieved
    masses and refined with the count/played/last weights, and the written calibration carries all of it
    (so the GGUF and the runtime do)."""
    import shutil

    from export import calibrate
    from talkplay_edge.calibration import read_calibration

    d, _ = trained
    delta = tmp_path / "delta"
    shutil.copytree(d / "out", delta)
    res = calibrate.main([f"--delta={delta}", "--config=", "--conversations=4", "--min_samples=3", "--write",
                          "--json", "--retrieval", "--retrieval_depth=30", f"--catalog={tiny_catalog}",
                          f"--valid={d / 'conv' / 'valid.jsonl'}", "--base=tiny", "--seq_len=256", "--lora_alpha=8"])
    r = res["retrieval"]
    assert r["weight"] in calibrate.RETRIEVAL_WEIGHTS and r["gamma"] in calibrate.RETRIEVAL_GAMMAS
    assert r["k0"] in calibrate.RETRIEVAL_K0S and r["depth"] == 30
    assert r["nll_prior"] > 0 and res["spans"] > 0 and res["choices"] > 0
    for row in res["depths"]:
        assert row["nll_calibrated"] <= row["nll_model"] + 1e-9
    cal = read_calibration(delta)
    assert cal.retrieval is not None and cal.retrieval.to_dict() == {k: r[k] for k in ("weight", "gamma", "k0", "depth")}
    assert list(cal.alpha) == res["alpha"]
    # the default --features refines the grid's (alpha, beta) with the count/played/last weights: never worse
    refined = [row for row in res["depths"] if "nll_grid" in row]
    assert refined and all(row["nll_calibrated"] <= row["nll_grid"] + 1e-6 for row in refined)
    assert any(row["played"] or row["last"] for row in refined), "no depth weighed the played tracks"
    for name in ("count", "played", "last"):
        assert list(getattr(cal, name)) == res.get(name, [])


def test_calibrate_fits_a_cold_part(trained, tiny_catalog, tmp_path):
    """First-turn spans (no track played yet) get their own (alpha, beta), stored as the calibration's
    ``cold`` part; the main fit stays on every choice, the same as without a cold part."""
    import shutil

    from export import calibrate
    from talkplay_edge.calibration import read_calibration

    d, _ = trained
    delta = tmp_path / "delta"
    shutil.copytree(d / "out", delta)
    res = calibrate.main([f"--delta={delta}", "--config=", "--conversations=4", "--min_samples=2", "--write",
                          "--json", "--min_cold_spans=1", f"--catalog={tiny_catalog}",
                          f"--valid={d / 'conv' / 'valid.jsonl'}", "--base=tiny", "--seq_len=256", "--lora_alpha=8"])
    cold = res["cold"]
    assert cold["spans"] == 4  # one first turn per conversation
    # without --cold_features the cold part keeps its grid (alpha, beta) and may weigh only named artists
    assert all(r["alpha"] in calibrate.ALPHAS and r["beta"] in calibrate.BETAS for r in cold["depths"])
    assert not (cold.get("count") or cold.get("played") or cold.get("last") or cold.get("artist"))
    assert sum(r["choices"] for r in res["depths"]) == res["choices"] > sum(r["choices"] for r in cold["depths"]) > 0
    for r in cold["depths"]:
        assert r["nll_calibrated"] <= r["nll_model"] + 1e-9
    cal = read_calibration(delta)
    assert cal.cold is not None and list(cal.cold.alpha) == cold["alpha"] and list(cal.cold.beta) == cold["beta"]
    assert list(cal.alpha) == res["alpha"]
    no_cold = calibrate.main([f"--delta={delta}", "--config=", "--conversations=4", "--min_samples=2", "--json",
                              "--min_cold_spans=1", "--no_cold", f"--catalog={tiny_catalog}",
                              f"--valid={d / 'conv' / 'valid.jsonl'}", "--base=tiny", "--seq_len=256", "--lora_alpha=8"])
    assert "cold" not in no_cold and (no_cold["alpha"], no_cold["beta"]) == (res["alpha"], res["beta"])
    # --borrow_only keeps the stored fit: every fitted depth's weights, main and cold, stay as they were
    kept = calibrate.main([f"--delta={delta}", "--config=", "--conversations=4", "--min_samples=2", "--json",
                           "--write", "--borrow_only", f"--catalog={tiny_catalog}",
                           f"--valid={d / 'conv' / 'valid.jsonl'}", "--base=tiny", "--seq_len=256", "--lora_alpha=8"])
    assert kept["borrowed_on"]["spans"] == res["spans"] and kept["choices"] == res["choices"]
    for new, old, part in ((kept, res, ""), (kept["cold"], cold, "cold ")):
        for r, o in zip(new["depths"], old["depths"]):
            if o["choices"] >= 2 or "borrowed_from" in o:
                assert (r["alpha"], r["beta"]) == (o["alpha"], o["beta"]), f"{part}depth {r['depth']} refitted"
            elif "borrowed_from" not in r:
                assert (r["alpha"], r["beta"]) == (0.0, 1.0)
    again = read_calibration(delta)
    assert list(again.alpha) == kept["alpha"] and list(again.cold.alpha) == kept["cold"]["alpha"]


def test_remove_drift_takes_out_the_common_direction_only():
    """Rows that all moved along one direction plus their own small moves: the shared move is removed, the
    rows' own moves orthogonal to it stay, rows outside ``which`` are untouched."""
    import numpy as np

    from export.dedrift import remove_drift

    rng = np.random.default_rng(0)
    start = rng.normal(size=(200, 16)).astype(np.float32)
    u = np.zeros(16, np.float32)
    u[3] = 1.0
    own = rng.normal(scale=0.1, size=(200, 16)).astype(np.float32)
    own[:, 3] = 0.0
    rows = start + 2.0 * u + own
    which = np.ones(200, bool)
    which[:5] = False
    out, summary = remove_drift(rows, start, which)
    np.testing.assert_allclose(out[:5], rows[:5])
    moved = out[which] - start[which]
    assert np.abs(moved @ u).max() < 0.05  # the shared move is gone
    np.testing.assert_allclose(moved - np.outer(moved @ u, u), own[which], atol=0.05)  # own moves kept
    assert summary["rows"] == 195 and abs(summary["mean_removed"] - 2.0) < 0.05
    # estimated on a subset: the same direction, removed from every selected row
    out2, s2 = remove_drift(rows, start, which, estimate=which & (np.arange(200) % 2 == 0))
    assert s2["estimated_on"] == 97 and np.abs((out2[which] - start[which]) @ u).max() < 0.05


def test_dedrift_writes_a_delta_that_the_runtime_loads(trained, tiny_catalog, tmp_path):
    """``python -m export.dedrift`` on a trained delta: LoRA factors and span-marker rows unchanged, the music
    rows' common drift removed, a second pass refused; the result merges and recommends real tracks."""
    import numpy as np

    from export import dedrift
    from talkplay_edge.runtime import TalkPlay
    from talkplay_edge.tokens import parse_token

    d, _ = trained
    before, meta = load_delta(d / "out")
    summary = dedrift.main(["--delta", str(d / "out"), "--out", str(tmp_path / "dd"), "--catalog", str(tiny_catalog)])
    after, meta2 = load_delta(tmp_path / "dd")
    assert sorted(after) == sorted(before) and json.loads(meta2["dedrift"]) == summary
    for k in before:
        if k != "new_token_embd":
            assert np.array_equal(after[k], before[k]), k
    tokens = json.loads(meta["added_tokens"])
    music = np.array([parse_token(t).modality is not None for t in tokens])
    rows_b, rows_a = before["new_token_embd"].astype("float32"), after["new_token_embd"].astype("float32")
    assert np.array_equal(rows_a[~music], rows_b[~music])
    assert summary["mean_drift"] > 0 and np.abs(rows_a[music] - rows_b[music]).max() > 1e-3
    with pytest.raises(SystemExit, match="already de-drifted"):
        dedrift.main(["--delta", str(tmp_path / "dd"), "--out", str(tmp_path / "dd2"), "--catalog", str(tiny_catalog)])

    base = gguf_export.convert_hf_to_gguf(d / "out" / "tiny-base", tmp_path / "base.gguf", outtype="f32", quiet=True)
    model = merge_delta_into_gguf(base, after, tokens, meta2["vocab_fingerprint"], tmp_path / "m.gguf", quiet=True)
    tp = TalkPlay.load(model, tiny_catalog, threads=2, n_ctx=512)
    try:
        with Catalog.open(tiny_catalog) as cat:
            ids = set(cat.track_ids())
        reply = tp.chat(max_new_tokens=8).send("something upbeat")
        assert reply.tracks and reply.tracks[0].id in ids
    finally:
        tp.close()


def test_seen_row_updates_leave_absent_rows_alone(trained, tiny_catalog, tmp_path):
    """``row_updates=seen``: a music row whose token no training batch contains keeps its start value; with
    the default (``all``) Adam moves it too (through the tied output's softmax)."""
    import numpy as np

    d, _ = trained
    common = [f"--catalog={tiny_catalog}", f"--train={d / 'conv' / 'train.jsonl'}",
              f"--valid={d / 'conv' / 'valid.jsonl'}", "--base=tiny", "--max_steps=3", "--batch_size=2",
              "--eval_batches=1", "--hit_turns=0", "--lora_r=4", "--lora_alpha=8", "--seq_len=256", "--lr=0.01",
              "--emb_lr=0.01", "--init=text", "--max_train_conversations=2", "--warmup_steps=1"]
    start = train.main(common + ["--max_steps=0", f"--out={tmp_path / 'start'}"])  # the rows before training
    rows0 = load_delta(tmp_path / "start")[0]["new_token_embd"].astype("float32")
    train.main(common + [f"--out={tmp_path / 'all'}"])
    train.main(common + [f"--out={tmp_path / 'seen'}", "--row_updates=seen"])
    rows_all = load_delta(tmp_path / "all")[0]["new_token_embd"].astype("float32")
    rows_seen = load_delta(tmp_path / "seen")[0]["new_token_embd"].astype("float32")
    moved_all = np.abs(rows_all - rows0).max(axis=1) > 1e-4
    moved_seen = np.abs(rows_seen - rows0).max(axis=1) > 1e-4
    assert moved_all.mean() > 0.9  # nearly every row moves with the default
    assert 0 < moved_seen.sum() < 0.2 * len(moved_seen)  # only the rows of two conversations' tokens
    assert start is not None
    with pytest.raises(SystemExit, match="row_updates"):
        train.main(common + [f"--out={tmp_path / 'bad'}", "--row_updates=some"])


def test_refine_snaps_a_beta_near_zero():
    """A refined beta within ``snap_beta`` of 0 becomes exactly 0 (the runtime then decodes nothing before
    that step) and the other weights are refitted; a larger beta is left alone."""
    import numpy as np

    from export.calibrate import refine

    rng = np.random.default_rng(0)
    xs = []
    for _ in range(300):
        lm = np.log(rng.dirichlet(np.ones(6)))
        target = int(rng.choice(6, p=np.exp(lm)))
        logits = rng.normal(size=6) + 0.3 * (np.arange(6) == target)  # the model: a weak signal
        xs.append((0, logits, lm, target, np.zeros(6), np.zeros(6, dtype=np.uint8)))
    free = refine(xs, 1.0, 1.0, use_count=False)
    assert 0 < free["beta"] < 1 and free["alpha"] > 0.5
    snapped = refine(xs, 1.0, 1.0, use_count=False, snap_beta=1.0)
    assert snapped["beta"] == 0.0 and snapped["alpha"] > 0.5
    assert snapped["alpha"] != free["alpha"]  # refitted without the model
    assert refine(xs, 1.0, 1.0, use_count=False, snap_beta=free["beta"] / 2) == free


def test_a_sparse_depth_borrows_a_fitted_depths_weights_only_when_they_do_better():
    """``borrow``: a depth with too few choices to fit takes the nearest shallower fitted depth's weights when
    they give its choices a lower NLL than the model alone (the model confidently wrong, an asked mark right),
    and keeps the model alone when it is the better (the model right, the mark wrong)."""
    import numpy as np

    from export.calibrate import borrow, fit
    from talkplay_edge.calibration import ASKED

    rng = np.random.default_rng(1)

    def sample(depth, model_right):
        target = int(rng.integers(3))
        logits = np.full(3, 0.0)
        logits[target if model_right else (target + 1) % 3] = 6.0  # confident, right or wrong
        marks = np.zeros(3, dtype=np.uint8)
        marks[target if not model_right else (target + 2) % 3] = ASKED  # the mark: right when the model is not
        return (depth, logits, np.log(np.full(3, 1 / 3)), target, np.zeros(3), marks)

    fitted = [sample(0, model_right=False) for _ in range(200)]  # depth 0: the mark wins, so it is weighed
    for sparse_right, borrowed in ((False, True), (True, False)):
        sparse = [sample(1, model_right=sparse_right) for _ in range(5)]
        cal, rows = fit(fitted + sparse, min_samples=30, features=True)
        assert rows[0]["choices"] == 200 and rows[1]["choices"] == 5
        assert cal.asked[0] > 1
        assert rows[1]["nll_borrowed"] > 0
        if borrowed:
            assert rows[1]["borrowed_from"] == 0 and cal.asked[1] == cal.asked[0]
            assert (cal.alpha[1], cal.beta[1]) == (cal.alpha[0], cal.beta[0])
            assert rows[1]["nll_calibrated"] == rows[1]["nll_borrowed"] < rows[1]["nll_model"]
        else:
            assert "borrowed_from" not in rows[1] and (cal.alpha[1], cal.beta[1]) == (0.0, 1.0)
            assert not cal.asked[1] and rows[1]["nll_calibrated"] == rows[1]["nll_model"] < rows[1]["nll_borrowed"]
        again, _ = borrow(cal, fitted + sparse, rows, 30)  # deciding again on the same choices changes nothing
        assert again == cal
    # a sparse depth with no choices at all keeps the model alone
    cal, rows = fit(fitted, min_samples=30, features=True)
    assert (cal.alpha[1], cal.beta[1]) == (0.0, 1.0) and "nll_borrowed" not in rows[1]


def test_calibrate_scores_a_held_out_part(trained, tiny_catalog, tmp_path):
    """``--held_out N`` scores the new fit and the stored calibration on the next N conversations' spans,
    paired: against a stored calibration that is this very fit the difference is exactly nothing."""
    import shutil

    from export import calibrate
    from talkplay_edge.calibration import calibration_file

    d, _ = trained
    delta = tmp_path / "delta"
    shutil.copytree(d / "out", delta)
    calibration_file(delta).unlink(missing_ok=True)  # another test may have stored one in the trained delta
    common = [f"--delta={delta}", "--config=", "--conversations=2", "--min_samples=2", "--json", "--min_cold_spans=1",
              f"--catalog={tiny_catalog}", f"--valid={d / 'conv' / 'valid.jsonl'}", "--base=tiny", "--seq_len=256",
              "--lora_alpha=8"]
    first = calibrate.main(common + ["--held_out=2"])
    h = first["held_out"]
    assert h["conversations"] == 2 and h["spans"] > 0 and h["nll_fit"] > 0
    assert h["nll_stored"] is None  # the delta had no calibration yet
    calibrate.main(common + ["--write"])
    again = calibrate.main(common + ["--held_out=2"])["held_out"]
    assert again["nll_fit"] == h["nll_fit"] == again["nll_stored"]
    assert again["difference"] == 0 and again["better"] == again["worse"] == 0
    other = calibrate.main(common + ["--held_out=2", "--no_cold"])["held_out"]  # a different fit: it shows
    assert other["nll_stored"] == h["nll_fit"] and other["better"] + other["worse"] > 0
    for bad in (["--borrow_only"], ["--conversations=0"]):
        with pytest.raises(SystemExit):
            calibrate.main(common + ["--held_out=2"] + bad)
