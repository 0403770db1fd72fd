"""Check a GGUF file's structure before llama.cpp reads it, so a damaged model is a clear error, not an abort.

    info = check_gguf("model.gguf")       # raises GGUFError naming the file and what is wrong
    info.metadata["talkplay.vocab_fingerprint"], info.tensors["token_embd.weight"]

llama.cpp validates most of a file itself and reports failures as errors, but a few damaged values stop
the whole process with an assertion (measured here: a bit flip that makes two vocabulary strings equal
aborts in ``llama-vocab.cpp``). This reader walks the header, every metadata value and every tensor
description with bounds checks (nothing is allocated from a size the file claims without checking it
against the file's length), then checks what llama.cpp asserts on or needs to be consistent: unique
token strings, token arrays of one length matching the embedding's rows, attention head counts that
divide, one of each tensor name, known tensor types, and tensor data inside the file, aligned.

It reads the file through ``mmap`` and keeps only scalar metadata and the token list; about 0.1 s for
the default model.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

MAGIC = b"GGUF"
MAX_DIMS = 4
# ggml tensor types: id -> (elements per block, bytes per block). The ones a llama.cpp build of this era
# reads; anything else is refused up front.
GGML_TYPES = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 36),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
    16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110), 22: (256, 82),
    23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8), 29: (256, 56), 30: (1, 2),
    34: (256, 54), 35: (256, 66), 39: (32, 17),
}
# metadata value types: id -> struct format of a scalar (8 = string, 9 = array)
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


class GGUFError(ValueError):
    """The file is not a usable GGUF model; the message names the file and the problem."""


@dataclass
class GGUFInfo:
    path: Path
    version: int
    metadata: dict = field(default_factory=dict)       # scalars and strings (arrays: their length)
    tokens: list[bytes] = field(default_factory=list)  # tokenizer.ggml.tokens
    tensors: dict[str, tuple[tuple[int, ...], int]] = field(default_factory=dict)  # name -> (shape, type)
    metadata_end: int = 0  # byte offset where the tensor descriptions start
    data_start: int = 0    # byte offset of the tensor data


class _Reader:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.size, self.path = buf, 0, len(buf), path

    def fail(self, what: str):
        raise GGUFError(f"{self.path}: damaged GGUF model ({what} at byte {self.pos}); delete the file so it is "
                        "rebuilt, or pass another with --model")

    def take(self, fmt: str):
        n = struct.calcsize(fmt)
        if self.pos + n > self.size:
            self.fail("truncated")
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return v

    def string(self) -> bytes:
        n = self.take("<Q")
        if n > self.size - self.pos:
            self.fail(f"a string of {n} bytes runs past the end of the file")
        s = self.buf[self.pos:self.pos + n]
        self.pos += n
        return s

    def value(self, vtype: int, keep: bool):
        if vtype in SCALARS:
            return self.take(SCALARS[vtype])
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            itype, n = self.take("<I"), self.take("<Q")
            if itype == STRING:
                if n > (self.size - self.pos) // 8:
                    self.fail(f"an array of {n} strings cannot fit the file")
                return [self.string() for _ in range(n)] if keep else self._skip_strings(n)
            if itype not in SCALARS:
                self.fail(f"unknown array item type {itype}")
            width = struct.calcsize(SCALARS[itype])
            if n * width > self.size - self.pos:
                self.fail(f"an array of {n} items runs past the end of the file")
            self.pos += n * width
            return n
        self.fail(f"unknown metadata type {vtype}")

    def _skip_strings(self, n: int) -> int:
        buf, pos, size = self.buf, self.pos, self.size
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(n):
            if pos + 8 > size:
                self.pos = pos
                self.fail("truncated")
            pos += 8 + unpack(buf, pos)[0]
            if pos > size:
                self.pos = pos
                self.fail("a string runs past the end of the file")
        self.pos = pos
        return n


def check_gguf(path: str | Path) -> GGUFInfo:
    """Parse and check a GGUF file; raises ``GGUFError`` (a ValueError) or ``OSError`` (unreadable)."""
    path = Path(path)
    with open(path, "rb") as f:
        try:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # empty file
            raise GGUFError(f"{path}: empty file, not a GGUF model") from None
    try:
        return _check(mm, path)  # the mmap itself: no exported buffers, so it always closes
    finally:
        mm.close()


def _check(buf, path: Path) -> GGUFInfo:
    r = _Reader(buf, path)
    if buf[:4] != MAGIC:
        raise GGUFError(f"{path}: not a GGUF model (no GGUF magic); pass a llama.cpp .gguf file with --model")
    r.pos = 4
    version = r.take("<I")
    if version not in (2, 3):
        r.fail(f"unsupported GGUF version {version}")
    n_tensors, n_kv = r.take("<Q"), r.take("<Q")
    if n_tensors > r.size // 32 or n_kv > r.size // 16:
        r.fail(f"implausible counts ({n_tensors} tensors, {n_kv} metadata keys)")
    info = GGUFInfo(path, version)
    arrays: dict[str, int] = {}
    for _ in range(n_kv):
        key = r.string().decode("utf-8", "replace")
        vtype = r.take("<I")
        if key in info.metadata:
            r.fail(f"metadata key {key!r} appears twice")
        v = r.value(vtype, keep=key == "tokenizer.ggml.tokens")
        if isinstance(v, list):
            info.tokens = v
            arrays[key] = len(v)
            info.metadata[key] = len(v)
        else:
            if vtype == ARRAY:
                arrays[key] = v
            info.metadata[key] = v.decode("utf-8", "replace") if isinstance(v, bytes) else v
    info.metadata_end = r.pos
    align = info.metadata.get("general.alignment", 32)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        r.fail(f"bad general.alignment {align!r}")
    specs = []
    for _ in range(n_tensors):
        name = r.string().decode("utf-8", "replace")
        n_dims = r.take("<I")
        if not 1 <= n_dims <= MAX_DIMS:
            r.fail(f"tensor {name!r} has {n_dims} dimensions")
        shape = tuple(r.take("<Q") for _ in range(n_dims))
        ttype, offset = r.take("<I"), r.take("<Q")
        if ttype not in GGML_TYPES:
            r.fail(f"tensor {name!r} has unknown type {ttype}")
        if name in info.tensors:
            r.fail(f"tensor {name!r} appears twice")
        if any(d == 0 or d > 1 << 32 for d in shape):
            r.fail(f"tensor {name!r} has shape {shape}")
        info.tensors[name] = (shape, ttype)
        specs.append((name, shape, ttype, offset))
    data_start = info.data_start = -(-r.pos // align) * align
    for name, shape, ttype, offset in specs:
        block, nbytes = GGML_TYPES[ttype]
        n = 1
        for d in shape:
            n *= d
        if shape[0] % block or offset % align:
            r.fail(f"tensor {name!r} is misaligned")
        if data_start + offset + n // block * nbytes > r.size:
            raise GGUFError(f"{path}: truncated GGUF model (tensor {name!r} ends past the end of the file); "
                            "delete the file so it is rebuilt, or pass another with --model")
    _check_model(info, arrays, r)
    return info


def _check_model(info: GGUFInfo, arrays: dict[str, int], r: _Reader) -> None:
    """What llama.cpp asserts on, or needs consistent, for a llama-style model with a tokenizer."""
    md = info.metadata
    if info.tokens:
        n = len(info.tokens)
        if len(set(info.tokens)) != n:
            r.fail("two vocabulary tokens have the same text")
        for key in ("tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
            if key in arrays and arrays[key] != n:
                r.fail(f"{key} has {arrays[key]} entries for {n} tokens")
        emb = info.tensors.get("token_embd.weight")
        if emb is not None and emb[0][-1] != n:
            r.fail(f"token_embd.weight has {emb[0][-1]} rows for {n} tokens")
    arch = md.get("general.architecture")
    if isinstance(arch, str):
        heads, kv_heads = md.get(f"{arch}.attention.head_count"), md.get(f"{arch}.attention.head_count_kv", None)
        embd, blocks = md.get(f"{arch}.embedding_length"), md.get(f"{arch}.block_count")
        for key, v in ((f"{arch}.attention.head_count", heads), (f"{arch}.embedding_length", embd),
                       (f"{arch}.block_count", blocks)):
            if v is not None and (not isinstance(v, int) or v <= 0 or v > 1 << 20):
                r.fail(f"{key} = {v!r}")
        if isinstance(heads, int) and isinstance(embd, int) and embd % heads:
            r.fail(f"embedding length {embd} is not a multiple of {heads} heads")
        if kv_heads is not None and isinstance(heads, int) and (not isinstance(kv_heads, int) or kv_heads <= 0
                                                               or heads % kv_heads):
            r.fail(f"{kv_heads!r} key/value heads for {heads} heads")
        if isinstance(blocks, int) and info.tensors:
            present = {int(k.split(".")[1]) for k in info.tensors if k.startswith("blk.") and k.split(".")[1].isdigit()}
            if present and present != set(range(blocks)):
                r.fail(f"block_count {blocks} but tensors for {len(present)} blocks")
