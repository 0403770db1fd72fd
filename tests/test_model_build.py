"""Shipping path of the fine-tune: LoRA + new token rows (export/train.py) → delta → merged GGUF (numpy only).

A tiny 2-layer Llama (4 query heads, 2 KV heads, so llama.cpp's q/k row permutation matters) is the "base":
converted to GGUF by llama.cpp's converter. Random LoRA factors and new music-token rows are exported by the
trainer's ``export_delta`` and merged by ``model_build``; llama.cpp's logits of the merged GGUF must match the
torch model carrying the same adapters.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from export import gguf as gguf_export  # noqa: E402
from export.train import apply_lora, export_delta  # noqa: E402
from talkplay_edge.model_build import (ModelBuildError, build_model, load_delta,  # noqa: E402
                                       merge_delta_into_gguf)
from talkplay_edge.tokens import vocabulary  # noqa: E402

MUSIC = vocabulary({"cf": 3, "tags": 3, "metadata": 3, "lyrics": 2, "audio": 3}, max_dup=1)


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    """(base gguf, torch model with LoRA + new rows, tokenizer, delta dir)."""
    from tinymodel import build_tiny_hf_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tmp_path_factory.mktemp("mb")
    hf = build_tiny_hf_model([], d / "base-hf", seed=1)
    base = gguf_export.convert_hf_to_gguf(hf, d / "base.gguf", outtype="f32", quiet=True)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(hf, local_files_only=True)
    n_old = len(tok)
    tok.add_tokens(MUSIC, special_tokens=True)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.get_input_embeddings().weight[n_old:] = torch.randn(len(MUSIC), model.config.hidden_size, generator=g) * 0.1
    lora = apply_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for m in lora.values():
            m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=g) * 0.2)
    model.eval()
    new_ids = list(range(n_old, len(tok)))
    export_delta(model, lora, new_ids, MUSIC, {"base_sha256": "x", "vocab_fingerprint": "fp-test"}, d / "delta", shard_mb=1)
    return base, model, tok, d / "delta"


def test_delta_is_sharded_and_complete(adapted):
    _, model, _, delta_dir = adapted
    shards = sorted(delta_dir.glob("delta-*.safetensors"))
    assert len(shards) >= 1
    tensors, meta = load_delta(delta_dir)
    assert json.loads(meta["added_tokens"]) == MUSIC and meta["vocab_fingerprint"] == "fp-test"
    assert tensors["new_token_embd"].shape == (len(MUSIC), model.config.hidden_size)
    assert sum(k.startswith("lora_a.") for k in tensors) == 7 * model.config.num_hidden_layers


def test_merged_gguf_matches_torch(adapted, tmp_path):
    import llama_cpp

    base, model, tok, delta_dir = adapted
    tensors, _ = load_delta(delta_dir)
    out = merge_delta_into_gguf(base, tensors, MUSIC, "fp-test", tmp_path / "merged.gguf", quiet=True)
    assert gguf_export.read_metadata(out)["talkplay.vocab_fingerprint"] == "fp-test"
    llm = llama_cpp.Llama(str(out), n_ctx=128, verbose=False, logits_all=True, type_k=0, type_v=0)
    text = "<|im_start|>user\nplay something<|im_end|>\n<|im_start|>assistant\n<|music_start|><|cf_0001|><|tag_0002|>"
    ids = llm.tokenize(text.encode(), add_bos=False, special=True)
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert tok.convert_tokens_to_ids("<|tag_0002|>") in ids
    llm.eval(ids)
    ours = np.array(llm.scores[: len(ids)])
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0].numpy()
    diff = np.abs(ours - theirs).max()
    spread = theirs.std()
    assert diff < 0.05 * spread + 1e-2, f"max logit diff {diff:.4f} (logit std {spread:.3f})"
    # and the adapters matter: the un-adapted base differs clearly
    plain = merge_delta_into_gguf(base, {"new_token_embd": tensors["new_token_embd"]}, MUSIC, "fp", tmp_path / "plain.gguf", quiet=True)
    llm2 = llama_cpp.Llama(str(plain), n_ctx=128, verbose=False, logits_all=True, type_k=0, type_v=0)
    llm2.eval(ids)
    assert np.abs(np.array(llm2.scores[: len(ids)]) - theirs).max() > 10 * diff


def test_build_model_checks_the_base_hash(adapted, tmp_path):
    base, _, _, delta_dir = adapted
    with pytest.raises(ModelBuildError, match="not the pinned base"):
        build_model(delta_dir, tmp_path / "m.gguf", base=base)
    with pytest.raises(ModelBuildError, match="delta not found"):
        build_model(tmp_path / "nothing", tmp_path / "m.gguf", base=base)


def test_compare_unpermutes_what_the_trainer_permutes():
    from export.train import llama_cpp_unpermute
    from export.train import llama_cpp_permute

    w = torch.arange(8 * 4 * 3, dtype=torch.float32).reshape(8 * 4, 3)
    p = llama_cpp_permute(w, 4)
    assert not torch.equal(p, w) and torch.equal(llama_cpp_unpermute(p, 4), w)
    assert np.array_equal(llama_cpp_unpermute(p.numpy(), 4), w.numpy())


def test_build_model_carries_the_span_calibration(adapted, tmp_path):
    """A delta's span_calibration.json goes into the GGUF (and into the cache key); a bad one is refused."""
    from gguf import GGUFReader

    from talkplay_edge.calibration import CALIBRATION_KEY, SpanCalibration
    from talkplay_edge.model_build import delta_sha256, sha256_file

    from safetensors import safe_open
    from safetensors.numpy import save_file

    base, _, _, delta_dir = adapted
    delta = tmp_path / "delta"
    delta.mkdir()
    for f in sorted(delta_dir.glob("delta-*.safetensors")):  # the same delta, pinned to this test's base
        with safe_open(str(f), framework="numpy") as st:
            save_file({k: st.get_tensor(k) for k in st.keys()}, str(delta / f.name),
                      metadata={**st.metadata(), "base_sha256": sha256_file(base)})
    plain_key = delta_sha256(delta)
    cal = SpanCalibration((0.75, 0.5, 1.0), (0.3, 0.4, 0.05))
    (delta / "span_calibration.json").write_text(cal.to_json())
    assert delta_sha256(delta) != plain_key
    out = build_model(delta, tmp_path / "m.gguf", ftype="F16", base=base, quiet=True)
    field = GGUFReader(out).fields[CALIBRATION_KEY]
    assert SpanCalibration.parse(field.contents()) == cal
    (delta / "span_calibration.json").write_text('{"alpha": [1]}')
    with pytest.raises(ModelBuildError, match="span_calibration.json"):
        build_model(delta, tmp_path / "m2.gguf", ftype="F16", base=base, quiet=True)
