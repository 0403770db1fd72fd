"""HF model directory → GGUF (llama.cpp's own converter), custom metadata, quantisation, metadata reading.

    python -m export.gguf convert HF_DIR OUT.gguf [--outtype f16|f32|bf16|q8_0] [--kv talkplay.vocab_fingerprint=HEX ...]
    python -m export.gguf quantize SRC.gguf DST.gguf [--type Q8_0|Q4_K_M|...]
    python -m export.gguf meta FILE.gguf            # print the string KVs
    python -m export.gguf converter-dir             # fetch/extract the converter, print where it is

From Python::

    from export.gguf import convert_hf_to_gguf, quantize, read_metadata
    f16 = convert_hf_to_gguf("out/hf", "out/model.f16.gguf", metadata={"talkplay.vocab_fingerprint": fp})
    quantize(f16, "out/model.Q8_0.gguf", "Q8_0")
    read_metadata("out/model.Q8_0.gguf")["talkplay.vocab_fingerprint"]

The converter (``convert_hf_to_gguf.py`` + ``conversion/`` + ``gguf-py``) is not in the llama-cpp-python
wheel, only in its sdist (``vendor/llama.cpp``). ``converter_dir()`` extracts it from the sdist of exactly the
installed llama-cpp-python version (so converter and runtime agree), looking for the ``.tar.gz`` in
``$TALKPLAY_SDIST_DIR``, ``$XDG_CACHE_HOME/talkplay-edge/sdist`` and ``<repo>/.cache/sdist``, else fetching it
with ``pip download --no-deps --no-binary :all: llama-cpp-python==<version>`` (PyPI, ~76 MB). The converter
runs in a subprocess (it imports torch and transformers, with ``HF_HUB_OFFLINE=1``) against its own gguf-py.

The converter has no option for arbitrary KV pairs (``--metadata`` only takes the authorship fields), so
``metadata`` is spliced in afterwards by ``add_metadata``: a rewrite of the GGUF header at the level of the
file format (new KVs, tensor infos and data copied byte for byte; no torch, numpy or gguf-py; ~as fast as a
file copy), through a temp file renamed into place: the output path never holds a half-written file.

``read_metadata`` is a small pure-Python GGUF header parser: no torch, no numpy, no gguf package, no model
load, so the runtime can check ``talkplay.vocab_fingerprint`` cheaply. Custom string KVs also show up in
``llama_cpp.Llama(...).metadata`` (llama.cpp keeps every non-array KV; arrays are left out there).

The tokenizer pre-hash: the converter identifies a BPE tokenizer's pre-tokenizer by hashing its encoding of a
fixed text, and refuses unknown ones. SmolLM2's must come out as ``smollm``. transformers' own GGUF→HF
tokenizer conversion (``AutoTokenizer.from_pretrained(..., gguf_file=...)``) does *not* reproduce it (it drops
the individual-digit split, adds a BOS, and sets eos=<|im_start|>), so ``smollm2_tokenizer_files`` rebuilds the
original ``tokenizer.json`` from the GGUF vocabulary instead and checks the hash.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Iterable

REPO_DIR = Path(__file__).resolve().parent.parent
FINGERPRINT_KEY = "talkplay.vocab_fingerprint"
CONVERTER_FILES = ("convert_hf_to_gguf.py", "conversion", "gguf-py")


class GGUFExportError(RuntimeError):
    """A conversion step failed; the message names the file and how to fix it."""


def _log(msg: str) -> None:
    print(f"[export.gguf] {msg}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/talkplay-edge`` (default ``~/.cache/talkplay-edge``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "talkplay-edge"


def llama_cpp_version() -> str:
    """The installed llama-cpp-python version (read from package metadata: does not load the library)."""
    try:
        return importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError as e:
        raise GGUFExportError("llama-cpp-python is not installed (pip install llama-cpp-python)") from e


# ----------------------------------------------------------------------------------------------- converter


def _sdist_dirs() -> list[Path]:
    dirs = [os.environ.get("TALKPLAY_SDIST_DIR"), str(cache_root() / "sdist"), str(REPO_DIR / ".cache" / "sdist")]
    return [Path(d) for d in dirs if d]


def find_sdist(version: str | None = None, download: bool = True) -> Path:
    """The llama-cpp-python sdist ``.tar.gz`` of ``version`` (default: the installed one); pip-downloads it if absent."""
    version = version or llama_cpp_version()
    names = [f"llama_cpp_python-{version}.tar.gz", f"llama-cpp-python-{version}.tar.gz"]
    for d in _sdist_dirs():
        for n in names:
            if (d / n).is_file():
                return d / n
    if not download:
        raise GGUFExportError(f"llama-cpp-python {version} sdist not found in {', '.join(map(str, _sdist_dirs()))}")
    dest = Path(os.environ.get("TALKPLAY_SDIST_DIR") or cache_root() / "sdist")
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
           f"llama-cpp-python=={version}", "-d", str(dest)]
    _log(f"the GGUF converter ships only in the llama-cpp-python sdist: downloading llama-cpp-python=={version} "
         f"(~76 MB) from PyPI into {dest} ...")
    r = subprocess.run(cmd, capture_output=True, text=True)
    for n in names:
        if (dest / n).is_file():
            return dest / n
    raise GGUFExportError(
        f"could not download the llama-cpp-python {version} sdist (needed for convert_hf_to_gguf.py): "
        f"`{' '.join(cmd)}` exited {r.returncode}:\n{r.stderr[-2000:]}\n"
        f"Download it elsewhere and put it in one of {', '.join(map(str, _sdist_dirs()))} (or set TALKPLAY_SDIST_DIR).")


def converter_dir() -> Path:
    """A directory with ``convert_hf_to_gguf.py``, ``conversion/`` (newer llama.cpp) and ``gguf-py/``, matching
    the installed llama_cpp version; extracted once into ``$XDG_CACHE_HOME/talkplay-edge/llama.cpp-<version>/``."""
    version = llama_cpp_version()
    target = cache_root() / f"llama.cpp-{version}"
    if (target / ".complete").is_file():
        return target
    sdist = find_sdist(version)
    _log(f"extracting the converter from {sdist} into {target} ...")
    t0 = time.time()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".llama.cpp-{version}.", dir=target.parent))
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            members = []
            for m in tar:
                parts = m.name.split("/")
                # <top>/vendor/llama.cpp/<file or folder>/...
                if len(parts) >= 4 and parts[1:3] == ["vendor", "llama.cpp"] and parts[3] in CONVERTER_FILES:
                    if not (m.isfile() or m.isdir()):
                        continue
                    m = m.replace(name="/".join(parts[3:]), deep=False)
                    members.append(m)
            if not any(m.name == "convert_hf_to_gguf.py" for m in members):
                raise GGUFExportError(f"{sdist} has no vendor/llama.cpp/convert_hf_to_gguf.py")
            tar.extractall(tmp, members=members, filter="data")
        (tmp / ".complete").write_text(f"{sdist.name}\n")
        tmp.chmod(0o755)
        try:
            os.replace(tmp, target)  # atomic when target does not exist
        except OSError:
            if not (target / ".complete").is_file():  # a stale, incomplete copy: replace it
                shutil.rmtree(target, ignore_errors=True)
                os.replace(tmp, target)
    except (tarfile.TarError, OSError) as e:
        raise GGUFExportError(f"could not extract the converter from {sdist}: {e} (delete it to re-download)") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _log(f"converter ready in {time.time() - t0:.1f} s")
    return target


_SENTENCEPIECE_SHIM = '''"""Stand-in for sentencepiece, put on the converter's path by export.gguf when it is not installed.

convert_hf_to_gguf.py's Llama path imports sentencepiece *before* checking for a tokenizer.model, even for
BPE (tokenizer.json) models such as SmolLM2; with this stub the check runs and it falls through to BPE.
"""


class SentencePieceProcessor:
    def __init__(self, *a, **k):
        raise ImportError("this model has a sentencepiece tokenizer.model: pip install sentencepiece")
'''


def _sentencepiece_shim(cdir: Path) -> Path | None:
    """A path holding a stub ``sentencepiece`` when the real one is missing (see _SENTENCEPIECE_SHIM)."""
    import importlib.util

    if importlib.util.find_spec("sentencepiece") is not None:
        return None
    shim = cdir / "_shims"
    init = shim / "sentencepiece" / "__init__.py"
    if not init.is_file() or init.read_text() != _SENTENCEPIECE_SHIM:
        init.parent.mkdir(parents=True, exist_ok=True)
        tmp = init.with_name(f".__init__.{os.getpid()}.tmp")
        tmp.write_text(_SENTENCEPIECE_SHIM)
        os.replace(tmp, init)
    return shim


def _converter_env(cdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(cdir / "gguf-py"), str(cdir)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    shim = _sentencepiece_shim(cdir)
    if shim:
        paths.append(str(shim))  # only when this interpreter (the converter's too) has no sentencepiece
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.pop("NO_LOCAL_GGUF", None)
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _run(cmd: list[str], env: dict[str, str], what: str, quiet: bool) -> None:
    if quiet:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        out = (r.stdout + r.stderr)[-4000:]
    else:  # the converter's own log lines and tqdm bars are the progress output
        r = subprocess.run(cmd, env=env)
        out = "(its output is above)"
    if r.returncode != 0:
        raise GGUFExportError(f"{what} failed (exit {r.returncode}):\n{out}")


def _gguf_layout(f: IO[bytes], name: str) -> dict[str, Any]:
    """Byte layout of a GGUF header: version, each KV's (key, start, end), the tensor-info span, the alignment."""
    s = _Stream(f, name)
    if s.read(4) != b"GGUF":
        raise GGUFExportError(f"{name}: not a GGUF file (bad magic)")
    (version,) = struct.unpack("<I", s.read(4))
    if version < 2:
        raise GGUFExportError(f"{name}: GGUF version {version} is too old")
    n_tensors, n_kv = struct.unpack("<QQ", s.read(16))
    kvs, alignment = [], 32
    for _ in range(n_kv):
        start = f.tell()
        key = s.string()
        (vtype,) = struct.unpack("<I", s.read(4))
        v = s.value(vtype, want=key == "general.alignment")
        if key == "general.alignment":
            alignment = int(v)
        kvs.append((key, start, f.tell()))
    ti_start = f.tell()
    for _ in range(n_tensors):
        s.string()
        (n_dims,) = struct.unpack("<I", s.read(4))
        s.skip(8 * n_dims + 4 + 8)  # dims, type, offset
    ti_end = f.tell()
    data_start = (ti_end + alignment - 1) // alignment * alignment
    return {"version": version, "n_tensors": n_tensors, "kvs": kvs, "ti": (ti_start, ti_end),
            "alignment": alignment, "data_start": data_start}


def _kv_string_bytes(key: str, value: str) -> bytes:
    k, v = key.encode("utf-8"), value.encode("utf-8")
    return struct.pack("<Q", len(k)) + k + struct.pack("<I", _STRING) + struct.pack("<Q", len(v)) + v


def add_metadata(src: str | Path, dst: str | Path, metadata: dict[str, str]) -> Path:
    """Copy GGUF ``src`` to ``dst`` with the string KVs ``metadata`` added (same-named keys are replaced).

    A splice at the level of the GGUF spec, no library: the header is rewritten with the extra KVs and the
    tensor-info records and the data section are copied byte for byte (tensor offsets are relative to the
    aligned start of the data section, so they stay valid). Written through a temp file and renamed; ``dst``
    may be ``src``."""
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise GGUFExportError(f"{src}: no such GGUF file")
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str) or not k:
            raise GGUFExportError(f"metadata must map non-empty str keys to str values, got {k!r}: {v!r}")
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.kv.tmp")
    try:
        with open(src, "rb") as f:
            lay = _gguf_layout(f, str(src))
            kept = [(a, b) for key, a, b in lay["kvs"] if key not in metadata]
            with open(tmp, "wb") as out:
                out.write(b"GGUF" + struct.pack("<IQQ", lay["version"], lay["n_tensors"], len(kept) + len(metadata)))
                for a, b in kept:
                    f.seek(a)
                    out.write(f.read(b - a))
                for k, v in metadata.items():
                    out.write(_kv_string_bytes(k, v))
                f.seek(lay["ti"][0])
                out.write(f.read(lay["ti"][1] - lay["ti"][0]))
                pad = -out.tell() % lay["alignment"]
                out.write(b"\0" * pad)
                f.seek(lay["data_start"])
                shutil.copyfileobj(f, out, 1 << 22)
        got = read_metadata(tmp)
        if any(got.get(k) != v for k, v in metadata.items()):
            raise GGUFExportError(f"{dst}: metadata {sorted(metadata)} did not read back")
        os.replace(tmp, dst)
    except OSError as e:
        raise GGUFExportError(f"could not write {dst} with new metadata: {e}") from e
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def convert_hf_to_gguf(hf_dir: str | Path, out_path: str | Path, outtype: str = "f16",
                       metadata: dict[str, str] | None = None, quiet: bool = False,
                       model_name: str | None = None) -> Path:
    """Convert a transformers model directory (``save_pretrained`` output, tokenizer included) to GGUF with
    llama.cpp's ``convert_hf_to_gguf.py``; ``outtype`` is one of f32, f16, bf16, q8_0 (finer types: ``quantize``).
    ``metadata`` string KVs (e.g. ``{"talkplay.vocab_fingerprint": fp}``) are added to the file. Atomic: on
    failure ``out_path`` is untouched. ``quiet`` captures the converter's output (shown only on failure);
    ``model_name`` sets ``general.name`` (the converter's default is derived from the directory name)."""
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    if not (hf_dir / "config.json").is_file():
        raise GGUFExportError(f"{hf_dir}: not a transformers model directory (no config.json)")
    if outtype not in ("f32", "f16", "bf16", "q8_0", "auto"):
        raise GGUFExportError(f"outtype {outtype!r}: use f32, f16, bf16 or q8_0 here and quantize() for the rest")
    cdir = converter_dir()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    t0 = time.time()
    if not quiet:
        _log(f"converting {hf_dir} → {out_path} ({outtype}) ...")
    try:
        _run([sys.executable, str(cdir / "convert_hf_to_gguf.py"), str(hf_dir), "--outfile", str(tmp),
              "--outtype", outtype] + (["--model-name", model_name] if model_name else []), _converter_env(cdir), f"convert_hf_to_gguf.py on {hf_dir}", quiet)
        if not tmp.is_file():
            raise GGUFExportError(f"convert_hf_to_gguf.py on {hf_dir} wrote no {tmp}")
        if metadata:
            add_metadata(tmp, tmp, metadata)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    if not quiet:
        _log(f"wrote {out_path} ({out_path.stat().st_size / 1e6:.1f} MB) in {time.time() - t0:.1f} s")
    return out_path


# ---------------------------------------------------------------------------------------------- quantize

QUANT_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_0", "Q5_1", "Q4_K_M", "Q4_K_S", "Q4_0", "Q4_1", "F16", "BF16")


def quantize(src: str | Path, dst: str | Path, ftype: str = "Q8_0", nthread: int = 0, quiet: bool = False) -> Path:
    """Quantise GGUF ``src`` into ``dst`` with ``llama_cpp.llama_model_quantize`` (``ftype``: Q8_0, Q4_K_M, ...;
    the names of ``llama_cpp.LLAMA_FTYPE_MOSTLY_*``). KVs, custom ones included, are copied. Tensors whose row
    width is not a multiple of 256 fall back to a legacy type for the K-quants (llama.cpp prints which), e.g.
    SmolLM2's 576-wide tensors get Q5_0 under Q4_K_M. Atomic via a temp file."""
    from talkplay_edge.model_build import ModelBuildError
    from talkplay_edge.model_build import quantize as llama_quantize

    src, dst = Path(src), Path(dst)
    t0 = time.time()
    if not quiet:
        _log(f"quantising {src} → {dst} ({ftype.upper()}) ...")
    try:
        with _quiet_fd2(quiet):
            llama_quantize(src, dst, ftype, threads=nthread)
    except ModelBuildError as e:
        raise GGUFExportError(str(e)) from e
    if not quiet:
        _log(f"wrote {dst} ({dst.stat().st_size / 1e6:.1f} MB) in {time.time() - t0:.1f} s")
    return dst


@contextlib.contextmanager
def _quiet_fd2(quiet: bool):
    """Silence the C library's stderr chatter (fd 2) when ``quiet``."""
    if not quiet:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# --------------------------------------------------------------------------------------- reading GGUF KVs

# GGUF value types (gguf spec): scalar struct formats; 8 = string, 9 = array
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _Stream:
    """Little-endian reads from a binary stream (a file, or a member of a zip)."""

    def __init__(self, f: IO[bytes], name: str):
        self.f, self.name = f, name

    def read(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise GGUFExportError(f"{self.name}: truncated GGUF header")
        return b

    def scalar(self, vtype: int) -> Any:
        fmt = _SCALAR[vtype]
        return struct.unpack("<" + fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        (n,) = struct.unpack("<Q", self.read(8))
        return self.read(n).decode("utf-8", errors="replace")

    def skip(self, n: int) -> None:
        if n:
            self.read(n) if not self.f.seekable() else self.f.seek(n, os.SEEK_CUR)

    def value(self, vtype: int, want: bool) -> Any:
        if vtype == _STRING:
            if want:
                return self.string()
            (n,) = struct.unpack("<Q", self.read(8))
            self.skip(n)
            return None
        if vtype == _ARRAY:
            (sub,) = struct.unpack("<I", self.read(4))
            (count,) = struct.unpack("<Q", self.read(8))
            if sub in _SCALAR:
                fmt = _SCALAR[sub]
                size = struct.calcsize(fmt) * count
                if not want:
                    self.skip(size)
                    return None
                return list(struct.unpack(f"<{count}{fmt}", self.read(size)))
            values = [self.value(sub, want) for _ in range(count)]
            return values if want else None
        if vtype in _SCALAR:
            return self.scalar(vtype)
        raise GGUFExportError(f"{self.name}: unknown GGUF value type {vtype}")


def _read_kv(f: IO[bytes], name: str, keys: Iterable[str] | None, strings_only: bool) -> dict[str, Any]:
    s = _Stream(f, name)
    if s.read(4) != b"GGUF":
        raise GGUFExportError(f"{name}: not a GGUF file (bad magic)")
    (version,) = struct.unpack("<I", s.read(4))
    if version < 2:
        raise GGUFExportError(f"{name}: GGUF version {version} is too old")
    _n_tensors, n_kv = struct.unpack("<QQ", s.read(16))
    wanted = set(keys) if keys is not None else None
    out: dict[str, Any] = {}
    for _ in range(n_kv):
        key = s.string()
        (vtype,) = struct.unpack("<I", s.read(4))
        want = (wanted is None or key in wanted) and (not strings_only or vtype == _STRING)
        v = s.value(vtype, want)
        if want:
            out[key] = v
        if wanted is not None and wanted.issubset(out):
            break
    return out


def read_kv(source: str | Path | IO[bytes], keys: Iterable[str] | None = None) -> dict[str, Any]:
    """KV pairs of a GGUF (all, or only ``keys``), arrays as lists; ``source`` is a path or a binary stream
    (e.g. ``zipfile.ZipFile(...).open(member)``: only the header is read)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise GGUFExportError(f"{path}: no such GGUF file")
        with open(path, "rb", buffering=1 << 20) as f:
            return _read_kv(f, str(path), keys, strings_only=False)
    return _read_kv(source, getattr(source, "name", "<stream>"), keys, strings_only=False)


def read_metadata(gguf_path: str | Path) -> dict[str, str]:
    """The string-valued KV pairs of a GGUF (``general.name``, ``tokenizer.chat_template``,
    ``talkplay.vocab_fingerprint``, ...). Pure Python: reads only the header, imports neither torch nor numpy nor
    llama_cpp. (A loaded ``llama_cpp.Llama`` has the same strings in ``.metadata``, custom keys included.)"""
    path = Path(gguf_path)
    if not path.is_file():
        raise GGUFExportError(f"{path}: no such GGUF file")
    with open(path, "rb", buffering=1 << 20) as f:
        return _read_kv(f, str(path), None, strings_only=True)


# --------------------------------------------------------------------------- SmolLM2 tokenizer from a GGUF

#: the converter's hash of SmolLM's pre-tokenizer (conversion/base.py: get_vocab_base_pre → "smollm")
SMOLLM_PRE_HASH = "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249"
_CHKTXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ '
           '🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
           '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
           '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
_TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                   "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                   "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.chat_template",
                   "tokenizer.ggml.add_bos_token",
                   "llama.context_length")


def pre_tokenizer_hash(tokenizer) -> str:
    """The converter's identification hash of a tokenizer (``tokenizers.Tokenizer`` or a transformers one)."""
    ids = tokenizer.encode(_CHKTXT)
    ids = getattr(ids, "ids", ids)
    return hashlib.sha256(str(list(ids)).encode()).hexdigest()


def smollm2_tokenizer_files(source: str | Path | IO[bytes], out_dir: str | Path) -> Path:
    """Write SmolLM2's original HF tokenizer files (``tokenizer.json``, ``tokenizer_config.json``,
    ``special_tokens_map.json``) into ``out_dir``, rebuilt from a SmolLM2 GGUF's vocabulary (``source``: path or
    binary stream). Loads with ``AutoTokenizer.from_pretrained(out_dir)``; the converter recognises it as
    ``smollm`` (checked here), eos=<|im_end|>, no BOS added, digits split one by one like llama.cpp does."""
    from tokenizers import Tokenizer

    kv = read_kv(source, _TOKENIZER_KEYS)
    name = str(source) if isinstance(source, (str, Path)) else getattr(source, "name", "<stream>")
    if kv.get("tokenizer.ggml.model") != "gpt2" or kv.get("tokenizer.ggml.pre") != "smollm":
        raise GGUFExportError(f"{name}: not a SmolLM tokenizer (model={kv.get('tokenizer.ggml.model')!r}, "
                              f"pre={kv.get('tokenizer.ggml.pre')!r})")
    tokens, types, merges = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"], kv["tokenizer.ggml.merges"]
    special = [i for i, t in enumerate(types) if t == 3]  # CONTROL
    tj = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i in special],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": [m.split(" ", 1) for m in merges]},
    }
    tok = Tokenizer.from_str(json.dumps(tj, ensure_ascii=False))
    got = pre_tokenizer_hash(tok)
    if got != SMOLLM_PRE_HASH:
        raise GGUFExportError(f"{name}: rebuilt tokenizer hashes to {got}, not smollm's {SMOLLM_PRE_HASH}")

    def tok_at(key: str) -> str | None:
        i = kv.get(key)
        return tokens[i] if i is not None else None

    eos = tok_at("tokenizer.ggml.eos_token_id")
    cfg = {
        "add_prefix_space": False,
        "add_bos_token": bool(kv.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": False,
        "bos_token": tok_at("tokenizer.ggml.bos_token_id"),
        "eos_token": eos,
        "unk_token": tok_at("tokenizer.ggml.unknown_token_id"),
        "pad_token": tok_at("tokenizer.ggml.padding_token_id") or eos,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(kv.get("llama.context_length") or 8192),
        "tokenizer_class": "GPT2Tokenizer",
        "vocab_size": len(tokens),
        "chat_template": kv.get("tokenizer.chat_template"),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token", "additional_special_tokens")}, indent=2))
    return out


# --------------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.gguf", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="HF model directory → GGUF")
    c.add_argument("hf_dir", type=Path)
    c.add_argument("out", type=Path)
    c.add_argument("--outtype", default="f16", choices=["f32", "f16", "bf16", "q8_0"])
    c.add_argument("--model-name", help="general.name (default: from the directory name)")
    c.add_argument("--kv", action="append", default=[], metavar="KEY=VALUE", help="string KV to add (repeatable)")
    q = sub.add_parser("quantize", help="quantise a GGUF with llama.cpp")
    q.add_argument("src", type=Path)
    q.add_argument("dst", type=Path)
    q.add_argument("--type", default="Q8_0", help="Q8_0, Q4_K_M, Q5_K_M, ...")
    q.add_argument("--threads", type=int, default=0)
    m = sub.add_parser("meta", help="print a GGUF's string KVs")
    m.add_argument("file", type=Path)
    m.add_argument("--key", help="print only this key's value")
    sub.add_parser("converter-dir", help="fetch/extract convert_hf_to_gguf.py; print its directory")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "convert":
            kv = {}
            for item in a.kv:
                k, sep, v = item.partition("=")
                if not sep:
                    ap.error(f"--kv {item!r}: expected KEY=VALUE")
                kv[k] = v
            convert_hf_to_gguf(a.hf_dir, a.out, a.outtype, kv or None, model_name=a.model_name)
        elif a.cmd == "quantize":
            quantize(a.src, a.dst, a.type, nthread=a.threads)
        elif a.cmd == "meta":
            meta = read_metadata(a.file)
            if a.key:
                if a.key not in meta:
                    print(f"{a.file}: no string key {a.key!r}", file=sys.stderr)
                    return 1
                print(meta[a.key])
            else:
                for k, v in meta.items():
                    print(f"{k} = {v if len(v) < 200 else v[:200] + '...'}")
        else:
            print(converter_dir())
    except GGUFExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
