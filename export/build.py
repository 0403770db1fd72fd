"""A trained delta → a GGUF the runtime loads, whatever base it was trained on.

    python -m export.build out/delta out/model.q8_0.gguf                    # base from the delta's metadata
    python -m export.build out/delta out/model.gguf --type Q4_K_M --base ~/models/Qwen2.5-0.5B-Instruct
    talkplay ask --model out/model.q8_0.gguf --catalog catalog.db "something mellow"

- A delta trained on the pinned SmolLM2 (``base=smollm2``, the default model) is merged into the pinned
  Q4_1 GGUF exactly as on first use (``talkplay_edge.model_build.build_model``).
- A delta trained on a local Hugging Face directory (``export.train --base DIR``) records the directory and
  ``base_dir_sha256``, a hash of its config, tokenizer and weight files. The build checks that hash (a
  changed or different directory is refused), converts the directory to an F32 GGUF with llama.cpp's own
  converter (``export.gguf``), merges the delta into it (LoRA ``W += B·A``, the music tokens' input rows,
  and output rows for an untied output layer) and quantises.

The result carries the catalog's vocabulary fingerprint and the delta's span calibration, like the default
model. Writes go through a temp file: ``OUT`` is either the finished model or untouched.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

# the files of a Hugging Face model directory that decide what the model computes and how it tokenizes
HASHED_PATTERNS = ("config.json", "*.safetensors", "*.bin", "tokenizer.json", "tokenizer_config.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "special_tokens_map.json")


def hf_dir_sha256(model_dir: str | Path) -> str:
    """One sha256 over a model directory's config, tokenizer and weight files (names and bytes)."""
    from talkplay_edge.model_build import sha256_file

    d = Path(model_dir)
    files = sorted({f for pattern in HASHED_PATTERNS for f in d.glob(pattern) if f.is_file()})
    if not any(f.name == "config.json" for f in files):
        raise FileNotFoundError(f"{d}: not a Hugging Face model directory (no config.json)")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + sha256_file(f).encode())
    return h.hexdigest()


def build(delta: str | Path, out: str | Path, ftype: str = "Q8_0", base: str | Path | None = None,
          threads: int = 2, quiet: bool = False) -> Path:
    """Build ``out`` from ``delta`` and its base (see the module docstring); returns ``out``."""
    from talkplay_edge.model_build import ModelBuildError, build_model, load_delta

    from export.gguf import convert_hf_to_gguf

    delta, out = Path(delta), Path(out)
    _, meta = load_delta(delta)
    if "base_dir_sha256" not in meta:  # the pinned SmolLM2 GGUF (or a GGUF given as --base)
        return build_model(delta, out, ftype=ftype, base=Path(base) if base else None, threads=threads, quiet=quiet)
    base_dir = Path(base or meta.get("base", ""))
    if not (base_dir / "config.json").is_file():
        raise ModelBuildError(f"{delta} was trained on {meta.get('base')!r}, which is not a model directory here; "
                              "pass the base with --base DIR")
    got = hf_dir_sha256(base_dir)
    if got != meta["base_dir_sha256"]:
        raise ModelBuildError(f"{base_dir}: its files (sha256 {got[:12]}…) are not the base the delta was trained "
                              f"on ({meta['base_dir_sha256'][:12]}…, {meta.get('base')})")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".talkplay-build-", dir=out.parent) as tmp:
        base_gguf = convert_hf_to_gguf(base_dir, Path(tmp) / "base.f32.gguf", outtype="f32", quiet=quiet)
        return build_model(delta, out, ftype=ftype, base=base_gguf, threads=threads, quiet=quiet, check_base=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.build", description=__doc__.split("\n\n")[0])
    ap.add_argument("delta", type=Path, help="delta directory (or one .safetensors file) from export.train")
    ap.add_argument("out", type=Path, help="the GGUF to write")
    ap.add_argument("--type", default="Q8_0", help="Q8_0 (default), Q4_K_M, F16, ... (llama.cpp's names)")
    ap.add_argument("--base", help="the base: a Hugging Face directory (default: the one the delta names) or a GGUF")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="print {out, size_mb, seconds} as JSON")
    a = ap.parse_args(argv)
    from talkplay_edge.model_build import ModelBuildError

    from export.gguf import GGUFExportError

    t = time.perf_counter()
    try:
        path = build(a.delta, a.out, a.type, a.base, a.threads, quiet=a.json)
    except (ModelBuildError, GGUFExportError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    result = {"out": str(path), "size_mb": round(path.stat().st_size / 1e6, 1),
              "seconds": round(time.perf_counter() - t, 1)}
    print(json.dumps(result) if a.json else f"wrote {path} ({result['size_mb']} MB) in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
