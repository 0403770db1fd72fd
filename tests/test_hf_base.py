"""A local Hugging Face base (``export.train --base DIR``) end to end: a tiny Qwen2 with an untied output layer
and spare embedding rows past its tokenizer's last token, as Qwen2.5's (q/k/v biases; llama.cpp's converter
keeps its q/k rows in Hugging Face order, unlike Llama's, and pads the vocabulary to the rows) trains a few
steps on CPU, ``export.build`` turns base directory + delta into a GGUF, its logits match the torch model,
and the runtime recommends real catalog tracks with it. A changed base, an unsupported architecture and a
tokenizer without the ChatML markers are refused."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from export import build as export_build  # noqa: E402
from export import compare as export_compare  # noqa: E402
from export import train  # noqa: E402
from talkplay_edge.catalog import Catalog  # noqa: E402
from talkplay_edge.conversations import build_conversations  # noqa: E402
from talkplay_edge.model_build import ModelBuildError, build_model, load_delta  # noqa: E402


@pytest.fixture(scope="module")
def qwen(tiny_catalog, tmp_path_factory):
    """(work dir, base dir, delta dir): a tiny untied Qwen2 trained 6 steps on tiny_catalog's conversations."""
    from tinymodel import build_tiny_hf_model

    d = tmp_path_factory.mktemp("qwen")
    base = build_tiny_hf_model([], d / "Qwen2-tiny", seed=3, arch="qwen2", tied=False, spare_rows=7)
    with Catalog.open(tiny_catalog) as cat:
        build_conversations(cat, d / "conv", seed=0, sizes={"train": 24, "valid": 4, "test": 4, "test_unseen": 4},
                            show_progress=False)
    train.main([f"--catalog={tiny_catalog}", f"--train={d / 'conv' / 'train.jsonl'}",
                f"--valid={d / 'conv' / 'valid.jsonl'}", f"--out={d / 'delta'}", f"--base={base}",
                "--max_steps=6", "--batch_size=4", "--eval_every=6", "--eval_batches=1", "--lora_r=4",
                "--lora_alpha=8", "--seq_len=256", "--warmup_steps=1", "--lr=0.02", "--emb_lr=0.02",
                "--init=text", "--hit_turns=4"])
    return d, base, d / "delta"


def test_delta_records_the_base_and_its_layout(qwen, tiny_catalog):
    _, base, delta = qwen
    tensors, meta = load_delta(delta)
    assert meta["base"] == str(base.resolve()) and meta["base_dir_sha256"] == export_build.hf_dir_sha256(base)
    assert meta["lora_qk_order"] == "hf"  # Qwen2: llama.cpp keeps Hugging Face's q/k rows
    with Catalog.open(tiny_catalog) as cat:
        n = len(cat.vocabulary)
    assert tensors["new_output_rows"].shape == tensors["new_token_embd"].shape == (n, 64)
    # both row sets trained away from their common start (the untied output rows are not a copy of the input's)
    assert np.abs(tensors["new_output_rows"].astype(np.float32) - tensors["new_token_embd"].astype(np.float32)).max() > 1e-3
    assert max(np.abs(tensors[k].astype(np.float32)).max() for k in tensors if k.startswith("lora_b.")) > 0


def test_init_delta_continues_from_a_qwen_delta(qwen, tiny_catalog, tmp_path):
    """A run started from the delta at lr 0 writes it back: output rows, and q/k rows left in their order."""
    d, base, delta = qwen
    before, _ = load_delta(delta)
    train.main([f"--catalog={tiny_catalog}", f"--train={d / 'conv' / 'train.jsonl'}",
                f"--valid={d / 'conv' / 'valid.jsonl'}", f"--out={tmp_path / 'same'}", f"--base={base}",
                "--max_steps=1", "--batch_size=2", "--eval_batches=1", "--hit_turns=0", "--lora_r=4",
                "--lora_alpha=8", "--seq_len=256", "--lr=0", "--emb_lr=0", f"--init_delta={delta}"])
    after, meta = load_delta(tmp_path / "same")
    assert sorted(after) == sorted(before) and meta["lora_qk_order"] == "hf"
    for k in before:
        assert np.abs(after[k].astype(np.float32) - before[k].astype(np.float32)).max() <= 1e-3, k
    with pytest.raises(SystemExit, match="another architecture"):  # the Llama tiny base reads q/k rows otherwise
        train.main([f"--catalog={tiny_catalog}", f"--train={d / 'conv' / 'train.jsonl'}",
                    f"--valid={d / 'conv' / 'valid.jsonl'}", f"--out={tmp_path / 'llama'}", "--base=tiny",
                    "--max_steps=1", "--lora_r=4", "--lora_alpha=8", f"--init_delta={delta}"])


def test_gguf_matches_torch(qwen, tiny_catalog):
    d, _, delta = qwen
    r = export_compare.compare(delta, tiny_catalog, ["F16"], n_prompts=2, conversations=d / "conv" / "valid.jsonl")
    f16 = r["ftypes"]["F16"]
    print(f"tiny Qwen2 F16 GGUF vs torch: max |logit diff| {f16['max_abs_diff']:.3g}, logit std {r['logit_std']:.3g}")
    assert f16["same_tokenization"] and f16["argmax_agreement"] > 0.97
    assert f16["max_abs_diff"] < 0.05 * r["logit_std"] + 1e-2


def test_compare_sees_a_wrong_qk_order(qwen, tiny_catalog, tmp_path):
    """The comparison can fail: the same delta read as if its q/k rows were in llama.cpp's order."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    d, _, delta = qwen
    for f in delta.glob("delta-*.safetensors"):
        with safe_open(str(f), framework="numpy") as st:
            meta = dict(st.metadata())
        save_file(load_file(str(f)), str(tmp_path / f.name), metadata={**meta, "lora_qk_order": "llama.cpp"})
    r = export_compare.compare(tmp_path, tiny_catalog, ["F16"], n_prompts=2, conversations=d / "conv" / "valid.jsonl")
    assert r["ftypes"]["F16"]["max_abs_diff"] > 0.05 * r["logit_std"] + 1e-2


def test_built_model_recommends_in_the_runtime(qwen, tiny_catalog, capsys):
    from talkplay_edge.runtime import TalkPlay

    d, _, delta = qwen
    out = d / "qwen.q8_0.gguf"
    assert export_build.main([str(delta), str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["out"] == str(out) and out.is_file() and result["size_mb"] > 0
    with Catalog.open(tiny_catalog) as cat:
        ids = set(cat.track_ids())
    tp = TalkPlay.load(out, tiny_catalog, threads=2, n_ctx=512)
    try:  # the converter padded the vocabulary to the 7 spare rows; the music tokens come after them
        from transformers import AutoTokenizer

        n_tokens = len(AutoTokenizer.from_pretrained(qwen[1], local_files_only=True))
        assert tp.n_vocab == n_tokens + 7 + len(tp.music_ids) and min(tp.music_ids.values()) == n_tokens + 7
        session = tp.chat(max_new_tokens=8)
        played = []
        for msg in ("something upbeat", "more like that", "another one"):
            reply = session.send(msg)
            assert reply.tracks and reply.tracks[0].id in ids
            played.append(reply.tracks[0].id)
        assert len(set(played)) == len(played)
    finally:
        tp.close()


def test_a_changed_base_is_refused(qwen, tmp_path, capsys):
    _, base, delta = qwen
    with pytest.raises(ModelBuildError, match="export.build"):
        build_model(delta, tmp_path / "m.gguf")  # the first-use builder only knows the pinned SmolLM2
    other = shutil.copytree(base, tmp_path / "other")
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-6}))
    assert export_build.main([str(delta), str(tmp_path / "m.gguf"), "--base", str(other)]) == 1
    assert "not the base the delta was trained on" in capsys.readouterr().err
    assert not (tmp_path / "m.gguf").exists()
    with pytest.raises(ModelBuildError, match="--base"):
        export_build.build(delta, tmp_path / "m.gguf", base=tmp_path / "missing")


def test_unsupported_bases_are_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    assert train.qk_row_order(SimpleNamespace(model_type="llama")) == "llama.cpp"
    assert train.qk_row_order(SimpleNamespace(model_type="qwen3")) == "hf"
    with pytest.raises(SystemExit, match="not supported"):
        train.qk_row_order(SimpleNamespace(model_type="gpt2"))
    raw = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "<": 2}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")
    with pytest.raises(SystemExit, match="ChatML"):
        train.check_chat_markers(tok, "some-base")
    with pytest.raises(SystemExit, match="no config.json"):
        train.load_base(train.Config(base=str(tmp_path)))
