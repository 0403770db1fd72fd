"""The GGUF export pipeline: HF model → llama.cpp converter → GGUF that llama.cpp runs like torch does.

Uses the session fixture ``tiny_gguf`` (tests/conftest_gguf.py): an f32 GGUF of a tiny random Llama with
SmolLM2's tokenizer + music tokens and a vocabulary fingerprint.
"""

from __future__ import annotations

import ctypes
import struct
from pathlib import Path

import numpy as np
import pytest

from export import gguf as gx

llama_cpp = pytest.importorskip("llama_cpp")

# f32 GGUF with an f32 KV cache vs f32 torch on the same weights: only the order of floating-point operations
# differs (llama.cpp's matmul/softmax/rope kernels vs torch's), so logits agree to float32 rounding. Measured:
# max |diff| 2.8e-6 on logits of std 0.83 and max |logit| 4.2. 1e-4 leaves ~35x headroom and still fails on any
# real mismatch (a wrong rope layout, q/k permutation, norm eps or tied-embedding mix-up gives diffs > 0.1).
F32_LOGIT_ATOL = 1e-4
# llama.cpp's default KV cache is f16: K and V are rounded to 11 significant bits, measured max |diff| 2.4e-3.
F16_KV_LOGIT_ATOL = 2e-2
# Q8_0 weights and activations (+ the default f16 KV cache): measured max |diff| 0.14 and rms diff 2.8% of the
# logits' std; limits at ~3.5x.
Q8_LOGIT_ATOL = 0.5
Q8_REL_RMS = 0.1
GGML_TYPE_F32 = 0


def _llama(path: Path, **kw):
    return llama_cpp.Llama(str(path), n_ctx=128, n_threads=2, n_batch=128, verbose=False, **kw)


def _vocab(llm):
    return llama_cpp.llama_model_get_vocab(llm.model)


def _piece(vocab, token: int, special: bool = True) -> str:
    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
    assert n >= 0, f"token {token}: piece longer than the buffer"
    return buf.raw[:n].decode("utf-8")


def _prompts(tokens: list[str]) -> list[str]:
    span = "<|music_start|>" + "".join(t for t in tokens if t.endswith("_0003|>")) + "<|music_end|>"
    return [
        "<|im_start|>user\nPlay something like " + span + " from 1999, please!<|im_end|>\n<|im_start|>assistant\n",
        "Hello world 12345 — ünïcödé 🎵 " + tokens[2] + tokens[-1] + tokens[5] + " done",
    ]


@pytest.fixture(scope="module")
def llm(tiny_gguf):
    """The tiny GGUF with an f32 KV cache (exact comparison with torch)."""
    path, _, _ = tiny_gguf
    model = _llama(path, logits_all=True, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
    yield model
    model.close()


@pytest.fixture(scope="module")
def torch_model(tiny_gguf):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = tiny_gguf[0].parent / "hf"
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(hf, local_files_only=True)


def test_gguf_loads_with_music_vocab(tiny_gguf, llm):
    path, tokens, _ = tiny_gguf
    assert path.is_file() and path.stat().st_size > 0
    assert llm.n_vocab() == 49152 + len(tokens)
    meta = gx.read_metadata(path)
    assert meta["tokenizer.ggml.pre"] == "smollm"
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["general.architecture"] == "llama"


def test_music_tokens_are_single_control_tokens(tiny_gguf, llm):
    _, tokens, _ = tiny_gguf
    vocab = _vocab(llm)
    seen = set()
    for i, t in enumerate(tokens):
        ids = llm.tokenize(t.encode(), add_bos=False, special=True)
        assert len(ids) == 1, f"{t} tokenizes to {ids}"
        tid = ids[0]
        assert tid == 49152 + i, f"{t} has id {tid}, expected it appended in vocabulary order"
        assert _piece(vocab, tid, special=True) == t
        assert _piece(vocab, tid, special=False) == "", f"{t} renders without special=True: not a control token"
        assert llama_cpp.llama_vocab_is_control(vocab, tid), f"{t} is not a CONTROL token"
        seen.add(tid)
    assert len(seen) == len(tokens)
    # without special=True the same text is plain text, split into many ordinary tokens
    assert len(llm.tokenize(tokens[2].encode(), add_bos=False, special=False)) > 1


def test_tokenizer_matches_hf_and_chat_template_kept(tiny_gguf, llm, torch_model):
    _, tokens, _ = tiny_gguf
    _, tok = torch_model
    for text in _prompts(tokens) + ["3.14159 and 2024-01-01", " leading space", "naïve café"]:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text), text
    assert llm.metadata["tokenizer.chat_template"] == tok.chat_template
    assert llm.metadata["tokenizer.ggml.add_bos_token"] == "false"
    assert llm.token_eos() == tok.convert_tokens_to_ids("<|im_end|>")


def test_fingerprint_in_metadata(tiny_gguf, llm):
    path, tokens, fp = tiny_gguf
    from talkplay_edge.tokens import fingerprint

    assert fp == fingerprint(tokens)
    assert gx.read_metadata(path)[gx.FINGERPRINT_KEY] == fp
    assert llm.metadata[gx.FINGERPRINT_KEY] == fp  # llama.cpp exposes custom string KVs too


def _torch_logits(torch_model, ids: list[int]) -> np.ndarray:
    import torch

    model, _ = torch_model
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def _llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def test_llama_cpp_logits_match_torch(tiny_gguf, llm, torch_model):
    path, tokens, _ = tiny_gguf
    default_kv = _llama(path, logits_all=True)  # f16 KV cache, as the runtime uses it
    worst = worst_f16kv = 0.0
    try:
        for text in _prompts(tokens):
            ids = llm.tokenize(text.encode(), add_bos=False, special=True)
            assert len(ids) > 10
            ref = _torch_logits(torch_model, ids)
            got = _llama_logits(llm, ids)
            assert got.shape == ref.shape
            assert ref.std() > 0.5, "logits too flat for the comparison to mean anything"
            diff = float(np.abs(got - ref).max())
            worst = max(worst, diff)
            assert diff < F32_LOGIT_ATOL, f"max |llama.cpp - torch| = {diff:.3g} on {text!r}"
            assert (got.argmax(-1) == ref.argmax(-1)).all()
            diff16 = float(np.abs(_llama_logits(default_kv, ids) - ref).max())
            worst_f16kv = max(worst_f16kv, diff16)
            assert diff16 < F16_KV_LOGIT_ATOL, f"f16 KV cache: max |llama.cpp - torch| = {diff16:.3g} on {text!r}"
    finally:
        default_kv.close()
    print(f"f32 GGUF vs torch: max |logit diff| = {worst:.3g} (f32 KV), {worst_f16kv:.3g} (f16 KV)")


def test_quantize_q8_0(tiny_gguf, torch_model, tmp_path):
    path, tokens, fp = tiny_gguf
    q8 = gx.quantize(path, tmp_path / "tiny-Q8_0.gguf", "Q8_0", quiet=True)
    assert q8.stat().st_size < path.stat().st_size * 0.6
    assert gx.read_metadata(q8)[gx.FINGERPRINT_KEY] == fp  # quantisation keeps custom KVs
    assert gx.read_kv(q8, ["general.file_type"])["general.file_type"] == llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    model = _llama(q8, logits_all=True)
    try:
        ids = model.tokenize(_prompts(tokens)[0].encode(), add_bos=False, special=True)
        ref = _torch_logits(torch_model, ids)
        d = _llama_logits(model, ids) - ref
        diff, rel_rms = float(np.abs(d).max()), float(d.std() / ref.std())
        print(f"Q8_0 GGUF vs torch: max |logit diff| = {diff:.3g}, rms diff / std = {rel_rms:.3g}")
        assert diff < Q8_LOGIT_ATOL, f"Q8_0 max |logit diff| = {diff:.3g}"
        assert rel_rms < Q8_REL_RMS, f"Q8_0 rms logit diff = {rel_rms:.3g} of the logits' std"
    finally:
        model.close()


def test_quantize_rejects_unknown_type(tiny_gguf, tmp_path):
    with pytest.raises(gx.GGUFExportError, match="unknown quantisation type"):
        gx.quantize(tiny_gguf[0], tmp_path / "x.gguf", "Q9_9")
    assert not (tmp_path / "x.gguf").exists()


def test_add_metadata_replaces_and_keeps_model_intact(tiny_gguf, tmp_path):
    path, tokens, fp = tiny_gguf
    out = gx.add_metadata(path, tmp_path / "relabelled.gguf", {gx.FINGERPRINT_KEY: "0" * 64, "talkplay.note": "é ok"})
    meta = gx.read_metadata(out)
    assert meta[gx.FINGERPRINT_KEY] == "0" * 64 and meta["talkplay.note"] == "é ok"
    assert list(meta).count(gx.FINGERPRINT_KEY) == 1
    before, after = gx.read_kv(path), gx.read_kv(out)
    assert {k: v for k, v in after.items() if not k.startswith("talkplay.")} == \
        {k: v for k, v in before.items() if not k.startswith("talkplay.")}
    # the tensor data is copied byte for byte: the data sections hash the same
    def data_section(p):
        with open(p, "rb") as f:
            start = gx._gguf_layout(f, str(p))["data_start"]
            f.seek(start)
            return f.read()
    assert data_section(out) == data_section(path)
    m = _llama(out)
    try:
        assert m.metadata["talkplay.note"] == "é ok"
        assert len(m.tokenize(tokens[3].encode(), add_bos=False, special=True)) == 1
    finally:
        m.close()


def test_read_metadata_errors_name_the_file(tmp_path):
    bad = tmp_path / "not.gguf"
    bad.write_bytes(b"NOPE" + struct.pack("<I", 3))
    with pytest.raises(gx.GGUFExportError, match="not.gguf.*not a GGUF"):
        gx.read_metadata(bad)
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 5))
    with pytest.raises(gx.GGUFExportError, match="trunc.gguf.*truncated"):
        gx.read_metadata(trunc)
    with pytest.raises(gx.GGUFExportError, match="missing.gguf"):
        gx.read_metadata(tmp_path / "missing.gguf")


def test_convert_failure_leaves_no_output(tmp_path, monkeypatch):
    """A converter that writes half a file and fails: the error names the input, nothing is left behind."""
    fake = tmp_path / "fake-llama.cpp"
    (fake / "gguf-py").mkdir(parents=True)
    (fake / "convert_hf_to_gguf.py").write_text(
        "import sys\n"
        "out = sys.argv[sys.argv.index('--outfile') + 1]\n"
        "open(out, 'wb').write(b'GGUF partial')\n"
        "print('boom: unsupported model', file=sys.stderr)\n"
        "sys.exit(3)\n")
    monkeypatch.setattr(gx, "converter_dir", lambda: fake)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    out = tmp_path / "out" / "model.gguf"
    with pytest.raises(gx.GGUFExportError, match=r"(?s)convert_hf_to_gguf.py on .*hf.*exit 3.*boom"):
        gx.convert_hf_to_gguf(hf, out, quiet=True)
    assert not out.exists() and not list(out.parent.iterdir())
    with pytest.raises(gx.GGUFExportError, match="no config.json"):
        gx.convert_hf_to_gguf(tmp_path / "out", out)


def test_converter_matches_installed_llama_cpp():
    d = gx.converter_dir()
    assert (d / "convert_hf_to_gguf.py").is_file() and (d / "gguf-py" / "gguf" / "__init__.py").is_file()
    assert d.name == f"llama.cpp-{gx.llama_cpp_version()}"
    assert gx.llama_cpp_version() == llama_cpp.__version__
