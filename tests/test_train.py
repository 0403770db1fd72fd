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
