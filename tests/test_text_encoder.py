"""The MiniLM text encoder: ONNX vs torch, no torch at run time, batching/order/dedupe, long texts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from talkplay_edge.text_encoder import MODEL_DIR, TextEncoder, TextEncoderError, TextEncoderMissing

REPO = Path(__file__).resolve().parent.parent

SHORT = [
    "Bohemian Rhapsody — Queen · A Night at the Opera · 1975",
    "rock, album rock, classic rock, Classic Rock 70s 80s 90s",
    "something mellow for a rainy drive, like Norah Jones",
    "",
    "Dreams — Fleetwood Mac · Rumours · 1977",
    "reggaeton, latin pop, tropical, Latin Party Hits",
    "play me something upbeat for the gym",
    "Clair de lune — Claude Debussy · Suite bergamasque · 1905",
]


@pytest.fixture(scope="module")
def enc(text_encoder) -> TextEncoder:  # the session-wide fixture of conftest.py
    return text_encoder


def _long_text(words: int) -> str:
    rng = np.random.default_rng(0)
    vocab = ("we were running through the neon rain and the city never knew our names hold me till the morning "
             "light every road leads back to you summer fading like a polaroid ghosts of yesterday").split()
    return " ".join(vocab[i] for i in rng.integers(0, len(vocab), words))


# ------------------------------------------------------------------------------------------ basics

def test_identity(enc):
    assert enc.name == "sentence-transformers/all-MiniLM-L6-v2"
    assert enc.dim == 384
    info = json.loads((MODEL_DIR / "info.json").read_text())
    assert enc.version.endswith(info["onnx_sha256"][:12])
    assert enc.version.startswith(info["source"]["version"] + "+")
    assert enc.max_length == 256


def test_shape_dtype_norm(enc):
    v = enc.encode(SHORT)
    assert v.shape == (len(SHORT), 384) and v.dtype == np.float32
    assert np.all(np.isfinite(v))
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert enc.encode([]).shape == (0, 384)


def test_empty_string_is_a_valid_vector(enc):
    v = enc.encode([""])[0]
    assert np.isfinite(v).all() and abs(np.linalg.norm(v) - 1) < 1e-5
    assert np.allclose(enc.encode(["", " "])[1], v, atol=1e-6)  # whitespace tokenises to nothing too


def test_rejects_non_strings(enc):
    with pytest.raises(TypeError):
        enc.encode(["ok", None])


def test_similar_texts_are_closer(enc):
    a, b, c = enc.encode(["classic rock from the 70s", "70s classic rock anthems", "lo-fi beats to study to"])
    assert a @ b > a @ c


# ------------------------------------------------------------------------------ batching, order, dedupe

def test_batching_order_and_dedupe(enc):
    a, b = SHORT[0], SHORT[2]
    rows = enc.encode([a, b, a])
    single_a, single_b = enc.encode([a])[0], enc.encode([b])[0]
    np.testing.assert_allclose(rows[0], single_a, atol=1e-5)
    np.testing.assert_allclose(rows[1], single_b, atol=1e-5)
    np.testing.assert_array_equal(rows[0], rows[2])  # a duplicate is embedded once


def test_batch_composition_does_not_change_vectors(enc):
    """Length-sorted batches of any size give each text the vector it gets alone (catalog codes rely on it)."""
    texts = SHORT + [_long_text(40), _long_text(300), "jazz", "k-pop, dance pop, Kpop ON!"] * 2
    big = enc.encode(texts, batch_size=64)
    small = enc.encode(texts, batch_size=3)
    alone = np.stack([enc.encode([t])[0] for t in texts])
    np.testing.assert_allclose(big, alone, atol=1e-5)
    np.testing.assert_allclose(small, alone, atol=1e-5)
    rev = enc.encode(texts[::-1])
    np.testing.assert_allclose(rev[::-1], big, atol=1e-5)


def test_truncates_at_max_length(enc):
    long = _long_text(1000)
    ids = enc._tok.encode(long).ids
    assert len(ids) == enc.max_length and ids[0] == enc._cls and ids[-1] == enc._sep
    assert np.isfinite(enc.encode([long])).all()


def test_progress_bar_optional(enc, monkeypatch):
    monkeypatch.setenv("TALKPLAY_PROGRESS", "1")
    np.testing.assert_allclose(enc.encode(SHORT, progress=True), enc.encode(SHORT), atol=1e-6)


# ------------------------------------------------------------------------------------------ long texts

def test_encode_long_3000_words(enc):
    text = _long_text(3000)
    v = enc.encode_long(text)
    assert v.shape == (384,) and v.dtype == np.float32 and np.isfinite(v).all()
    assert abs(np.linalg.norm(v) - 1) < 1e-5
    assert v @ enc.encode([text])[0] > 0.8  # the truncated first window says much the same thing
    overlapped = enc.encode_long(text, chunk_tokens=128, stride=64)
    assert overlapped @ v > 0.9
    assert np.array_equal(enc.encode_long(text), v)  # deterministic


def test_encode_long_short_text_equals_encode(enc):
    for t in ("Norah Jones, late night, quiet", ""):
        np.testing.assert_allclose(enc.encode_long(t), enc.encode([t])[0], atol=1e-6)


def test_encode_long_argument_checks(enc):
    with pytest.raises(ValueError):
        enc.encode_long("x", chunk_tokens=300)
    with pytest.raises(ValueError):
        enc.encode_long("x", chunk_tokens=100, stride=150)


# ---------------------------------------------------------------------------------- files and imports

def test_missing_directory_names_path_and_command(tmp_path):
    with pytest.raises(TextEncoderMissing) as e:
        TextEncoder(tmp_path / "nowhere")
    msg = str(e.value)
    assert str(tmp_path / "nowhere") in msg and "python -m export.text_encoder" in msg
    assert isinstance(e.value, FileNotFoundError)


def test_model_info_mismatch_is_refused(tmp_path):
    d = tmp_path / "enc"
    shutil.copytree(MODEL_DIR, d)
    info = json.loads((d / "info.json").read_text())
    info["onnx_sha256"] = "0" * 64
    (d / "info.json").write_text(json.dumps(info))
    with pytest.raises(TextEncoderError, match="not the model info.json describes"):
        TextEncoder(d)


def test_unloadable_model_is_refused_by_name(tmp_path):
    """A model.onnx that info.json does not pin and onnxruntime cannot parse: TextEncoderError naming it."""
    d = tmp_path / "enc"
    shutil.copytree(MODEL_DIR, d)
    data = (d / "model.onnx").read_bytes()
    (d / "model.onnx").write_bytes(data[:len(data) // 3])
    info = json.loads((d / "info.json").read_text())
    del info["onnx_sha256"]
    (d / "info.json").write_text(json.dumps(info))
    with pytest.raises(TextEncoderError, match="onnxruntime cannot load it") as e:
        TextEncoder(d)
    assert str(d / "model.onnx") in str(e.value)


def test_runtime_import_does_not_import_torch():
    code = ("import sys, talkplay_edge.text_encoder as t; e = t.TextEncoder(threads=1); e.encode(['x']); "
            "e.encode_long('word ' * 500); assert 'torch' not in sys.modules, 'torch imported'; "
            "assert 'transformers' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_artifact_is_small_enough_to_commit():
    info = json.loads((MODEL_DIR / "info.json").read_text())
    size = (MODEL_DIR / "model.onnx").stat().st_size
    assert size == info["onnx_bytes"]
    if info["quantization"]["method"] != "none (fp32)":
        assert size < 50e6


# ---------------------------------------------------------------------------------- ONNX vs torch

@pytest.fixture(scope="module")
def reference():
    """Texts and their torch fp32 embeddings (transformers AutoModel on the package's safetensors)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    export = pytest.importorskip("export.text_encoder")
    try:
        export.source_model_dir()
    except SystemExit as e:
        pytest.skip(str(e))
    texts = export.calibration_texts()[::3]  # ≈ 215 texts of every kind, lyric paragraphs included
    return export, texts, export.torch_reference(texts)


def _cos(a, b):
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_fp32_export_matches_torch(reference, tmp_path):
    pytest.importorskip("onnx")
    export, texts, ref = reference
    path = tmp_path / "fp32.onnx"
    export.export_fp32(path)
    cos = _cos(export.onnx_embed(path, texts), ref)
    assert cos.min() >= 0.999, (cos.mean(), cos.min())


def test_shipped_encoder_matches_torch(reference, enc):
    export, texts, ref = reference
    cos = _cos(enc.encode(texts), ref)
    assert cos.mean() >= 0.99 and cos.min() >= 0.97, (cos.mean(), cos.min())


def test_manual_mean_pooling_matches_transformers(reference):
    """The reference itself: mean pooling + normalize over AutoModel equals an independent numpy pooling."""
    import torch

    export, texts, ref = reference
    model, tok = export.load_torch_model(), export.make_tokenizer()
    enc_ = tok.encode_batch(texts[:16])
    ids = torch.tensor([e.ids for e in enc_])
    mask = torch.tensor([e.attention_mask for e in enc_])
    with torch.inference_mode():
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    m = mask.numpy()[..., None].astype(np.float32)
    pooled = (h * m).sum(1) / m.sum(1)
    pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
    np.testing.assert_allclose(pooled, ref[:16], atol=1e-5)


def test_idle_encoder_threads_do_not_spin(enc):
    """Between queries the encoder's threads sleep instead of busy-waiting (onnxruntime spins by default),
    so they leave the cores to llama.cpp: CPU time with pauses between queries stays near that without."""
    import resource

    def cpu():
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    def run(pause):
        c = cpu()
        for i in range(10):
            enc.encode([f"a short query, number {i}"])
            time.sleep(pause)
        return cpu() - c

    run(0.0)
    busy, paused = run(0.0), run(0.02)
    assert paused < 1.5 * busy + 0.03, (busy, paused)


# ------------------------------------------------------------------------------ int8 embedding tables

def test_int8_weights_give_the_exported_vectors(enc):
    """The encoder loads model.onnx with its int8 weights kept int8 (``onnx_lookup``). The embedding tables,
    looked up before dequantising, give the same numbers bit for bit as a session on the file as exported
    (which folds every weight into fp32); the 36 matrices, as 8-bit MatMulNBits, give vectors within 1e-6 of
    it and equal to it in every rank that matters here (nearest texts)."""
    import onnxruntime as ort

    from talkplay_edge.onnx_lookup import int8_lookups
    from talkplay_edge.text_encoder import session_options

    assert enc.int8_tables == 2  # word and position embeddings
    assert enc.int8_matrices == 36  # 6 layers × (q, k, v, attention output, FFN in, FFN out)
    raw = (MODEL_DIR / "model.onnx").read_bytes()
    plain = ort.InferenceSession(raw, session_options(2), providers=["CPUExecutionProvider"])
    lookups = ort.InferenceSession(int8_lookups(raw)[0], session_options(2), providers=["CPUExecutionProvider"])
    texts = SHORT + [_long_text(150), "ünïcödé — 東京 · ♫"]
    ids = [e.ids for e in enc._tok.encode_batch(texts)]
    width = max(map(len, ids))
    input_ids = np.array([i + [0] * (width - len(i)) for i in ids], np.int64)
    mask = np.array([[1] * len(i) + [0] * (width - len(i)) for i in ids], np.int64)
    feeds = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": np.zeros_like(input_ids)}
    names = [i.name for i in plain.get_inputs()]
    want = plain.run(None, {k: feeds[k] for k in names})[0]
    assert np.array_equal(lookups.run(None, {k: feeds[k] for k in names})[0], want)
    got = enc._sess.run(None, {k: feeds[k] for k in names})[0]
    assert np.abs(got - want).max() < 1e-6
    assert np.array_equal(np.argsort(-(got @ got.T), axis=1), np.argsort(-(want @ want.T), axis=1))


def _dq_model(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int, use: str,
              extra_use: bool) -> bytes:
    """A graph that reads ``DequantizeLinear(q, scale, zero point)`` through ``use``: ``Gather`` (rows looked
    up by the int64 input ``ids``) or ``MatMul`` (the float input ``x`` times it); optionally a second use of
    the dequantised tensor."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(q, "t_q"), numpy_helper.from_array(scale.astype(np.float32), "t_s")]
    dq_in = ["t_q", "t_s"]
    if zero_point is not None:
        inits.append(numpy_helper.from_array(zero_point.astype(np.int8), "t_zp"))
        dq_in.append("t_zp")
    if use == "Gather":
        read = helper.make_node("Gather", ["t_dq", "ids"], ["out"])
        inp = helper.make_tensor_value_info("ids", TensorProto.INT64, [None, None])
        out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, None, None])
    else:
        read = helper.make_node("MatMul", ["x", "t_dq"], ["out"])
        inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, q.shape[0]])
        out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, q.shape[1]])
    nodes, outputs = [helper.make_node("DequantizeLinear", dq_in, ["t_dq"], axis=axis), read], [out]
    if extra_use:
        nodes.append(helper.make_node("ReduceSum", ["t_dq"], ["total"], keepdims=0))
        outputs.append(helper.make_tensor_value_info("total", TensorProto.FLOAT, []))
    m = helper.make_model(helper.make_graph(nodes, "g", [inp], outputs, inits),
                          opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m.SerializeToString()


def _table_graph(scale: np.ndarray, zero_point: np.ndarray | None, axis: int = 0, extra_use: bool = False):
    """A graph ``Gather(DequantizeLinear(q [50, 8], scale, zero point), ids)`` (+ optionally a second use of
    the dequantised table), and its int8 table."""
    q = np.random.default_rng(1).integers(-127, 128, (50, 8)).astype(np.int8)
    return _dq_model(q, scale, zero_point, axis, "Gather", extra_use), q


@pytest.mark.parametrize("kind", ["per_row", "single", "no_zero_point"])
def test_int8_lookups_rewrites_a_table_exactly(kind):
    import onnx
    import onnxruntime as ort

    from talkplay_edge.onnx_lookup import int8_lookups

    rng = np.random.default_rng(2)
    scale = {"single": np.array(0.013)}.get(kind, rng.uniform(0.001, 0.05, 50))
    model, q = _table_graph(scale, None if kind == "no_zero_point" else np.zeros(scale.shape))
    new, n = int8_lookups(model)
    assert n == 1
    m = onnx.load_from_string(new)
    onnx.checker.check_model(m)
    assert "DequantizeLinear" not in [x.op_type for x in m.graph.node]
    ids = rng.integers(0, 50, (3, 7))
    want = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
    got = ort.InferenceSession(new, providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
    assert got.dtype == np.float32 and np.array_equal(got, want)
    np.testing.assert_allclose(got, q[ids].astype(np.float32) * np.broadcast_to(scale, (50,))[ids][..., None]
                               if scale.ndim else q[ids] * np.float32(scale), rtol=1e-6)


def test_int8_lookups_leaves_other_graphs_alone():
    """A zero point other than 0, a per-column scale, or a table used elsewhere too: bytes unchanged."""
    from talkplay_edge.onnx_lookup import int8_lookups

    scale = np.full(50, 0.01)
    zp = np.zeros(50)
    zp[3] = 1
    for model in (_table_graph(scale, zp)[0], _table_graph(np.full(8, 0.01), np.zeros(8), axis=1)[0],
                  _table_graph(scale, np.zeros(50), extra_use=True)[0]):
        new, n = int8_lookups(model)
        assert n == 0 and new is model
    good = _table_graph(scale, np.zeros(50))[0]
    for damaged in (b"", b"\xff" * 64, good[:len(good) // 2]):  # left for onnxruntime to refuse, by name
        new, n = int8_lookups(damaged)
        assert n == 0 and new is damaged


def _matmul_graph(k: int = 256, n: int = 24, axis: int = 1, zero_point: bool = True, extra_use: bool = False,
                  scale_shape: str = "column"):
    """A graph ``MatMul(x [?, k], DequantizeLinear(int8 w [k, n], scale, zero point 0))`` (+ optionally a
    second use of the dequantised weight), and its float reference weight."""
    rng = np.random.default_rng(3)
    q = rng.integers(-127, 128, (k, n)).astype(np.int8)
    scale = rng.uniform(0.001, 0.05, {"column": n, "row": k}[scale_shape]).astype(np.float32)
    model = _dq_model(q, scale, np.zeros(scale.shape) if zero_point else None, axis, "MatMul", extra_use)
    return model, q.astype(np.float32) * (scale[None, :] if scale_shape == "column" else scale[:, None])


@pytest.mark.parametrize("zero_point", [True, False])
def test_int8_matmuls_rewrites_a_matrix(zero_point):
    """``MatMul(x, DequantizeLinear(int8 w, per-column scale))`` becomes one 8-bit ``MatMulNBits`` over uint8
    blocks: the same products up to fp32 rounding, the int8 weight no longer dequantised at load."""
    import onnx
    import onnxruntime as ort

    from talkplay_edge.onnx_lookup import int8_matmuls

    model, w = _matmul_graph(zero_point=zero_point)
    new, n = int8_matmuls(model)
    assert n == 1
    m = onnx.load_from_string(new)
    assert [x.op_type for x in m.graph.node] == ["MatMulNBits"] and m.graph.node[0].domain == "com.microsoft"
    assert "com.microsoft" in [o.domain for o in m.opset_import]
    assert sorted(i.name for i in m.graph.initializer) == ["t_dq/nbits_q", "t_dq/nbits_scales"]  # no int8 copy
    onnx.checker.check_model(m)
    again, n2 = int8_matmuls(new)  # nothing left to rewrite; the opset import is not added twice
    assert n2 == 0 and again is new
    from talkplay_edge.text_encoder import session_options

    x = np.random.default_rng(4).standard_normal((5, 256)).astype(np.float32)
    # the encoder's options: without them onnxruntime would run the original as int8 arithmetic (errors ~0.5)
    want = ort.InferenceSession(model, session_options(1), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(new, session_options(1), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert got.dtype == np.float32 and got.shape == (5, 24)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, x.astype(np.float64) @ w.astype(np.float64), rtol=1e-4, atol=1e-4)


def test_int8_matmuls_leaves_other_graphs_alone():
    """A per-row scale, K not a multiple of the block, a weight used elsewhere too, or a uint8 weight (zero
    point 0, where MatMulNBits implies 128): bytes unchanged."""
    from talkplay_edge.onnx_lookup import int8_matmuls

    uint8 = _dq_model(np.full((256, 8), 200, np.uint8), np.full(8, 0.01), None, 1, "MatMul", False)
    for model in (_matmul_graph(axis=0, scale_shape="row")[0], _matmul_graph(k=200)[0],
                  _matmul_graph(extra_use=True)[0], _table_graph(np.full(50, 0.01), np.zeros(50))[0], uint8):
        new, n = int8_matmuls(model)
        assert n == 0 and new is model
    for damaged in (b"", b"\xff" * 64):
        new, n = int8_matmuls(damaged)
        assert n == 0 and new is damaged


def test_bench_text_encoder_reports_memory_and_int8_weights(capsys):
    """``python -m bench.text_encoder`` (a tiny run): throughput, latency, and the encoder's memory with the
    int8 weights it keeps."""
    sys.path.insert(0, str(REPO))
    from bench import text_encoder as bench

    assert bench.main(["--short", "8", "--medium", "4", "--repeat", "1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["int8_in_memory"] == {"tables": 2, "matrices": 36}
    assert res["short"]["texts"] == 8 and res["medium"]["texts"] == 4 and res["single_chat_message"]["median_ms"] > 0
    assert res["rss_growth_mb"] > 5  # weights alone: ~22 MB of int8 (0 would mean nothing was measured)
