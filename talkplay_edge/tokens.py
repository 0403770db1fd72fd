"""Music-token vocabulary: token strings, the fixed modality order, and the vocabulary fingerprint.

A track's code is a *music span*::

    <|music_start|><|cf_0412|><|tag_0077|><|meta_0931|><|lyr_none|><|aud_0150|>[<|dup_001|>]<|music_end|>

- five modality tokens, always in ``MODALITIES`` order (cf, tag, meta, lyr, aud);
- a modality the track lacks is ``<|{prefix}_none|>``, never a made-up cluster;
- when several tracks share all five tokens, the first of them (most popular, then by id) keeps the
  five-token code and the others get one trailing collision token ``<|dup_NNN|>`` (as TIGER does), so
  every track is reachable;
- every token string is ASCII and shorter than 32 bytes (llama.cpp's detokenizer drops longer ones).

The ordered vocabulary (``vocabulary()``) is what the model adds to its tokenizer, and its fingerprint
(``fingerprint()``) is stored both in ``catalog.db`` and in the model, so a mismatched pair is refused.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Sequence

#: Modality names in code order, with the short prefix used in token strings.
MODALITIES: tuple[str, ...] = ("cf", "tags", "metadata", "lyrics", "audio")
PREFIX: dict[str, str] = {"cf": "cf", "tags": "tag", "metadata": "meta", "lyrics": "lyr", "audio": "aud"}

SPAN_START = "<|music_start|>"
SPAN_END = "<|music_end|>"
NONE = -1  # cluster id stored for a missing modality


def modality_token(modality: str, cluster: int) -> str:
    """Token string for one modality cluster (``NONE`` gives the modality's none token)."""
    prefix = PREFIX[modality]
    return f"<|{prefix}_none|>" if cluster == NONE else f"<|{prefix}_{cluster:04d}|>"


def dup_token(n: int) -> str:
    """Collision token number ``n`` (1-based; 0 means "no collision token")."""
    if n < 1:
        raise ValueError("collision tokens are numbered from 1")
    return f"<|dup_{n:03d}|>"


def code_tokens(clusters: Sequence[int], dup: int = 0) -> list[str]:
    """The token strings of one track code (without span markers)."""
    if len(clusters) != len(MODALITIES):
        raise ValueError(f"a code has {len(MODALITIES)} clusters, got {len(clusters)}")
    tokens = [modality_token(m, int(c)) for m, c in zip(MODALITIES, clusters)]
    if dup:
        tokens.append(dup_token(dup))
    return tokens


def vocabulary(k_per_modality: dict[str, int], max_dup: int) -> list[str]:
    """The ordered list of every music token: span markers, then per modality none + clusters, then dups."""
    tokens = [SPAN_START, SPAN_END]
    for m in MODALITIES:
        tokens.append(modality_token(m, NONE))
        tokens.extend(modality_token(m, c) for c in range(k_per_modality[m]))
    tokens.extend(dup_token(n) for n in range(1, max_dup + 1))
    assert all(len(t.encode()) < 32 for t in tokens)
    return tokens


def fingerprint(tokens: Iterable[str], codebook_blobs: Iterable[bytes] = ()) -> str:
    """sha256 over the ordered token strings and the codebook centroids: identifies a vocabulary."""
    h = hashlib.sha256()
    for t in tokens:
        h.update(t.encode("utf-8") + b"\n")
    for blob in codebook_blobs:
        h.update(hashlib.sha256(blob).digest())
    return h.hexdigest()


@dataclass(frozen=True)
class ParsedToken:
    modality: str | None  # None for span markers and dup tokens
    cluster: int | None  # NONE for a none token, n for dup_n


def parse_token(token: str) -> ParsedToken:
    """Inverse of ``modality_token``/``dup_token``: which modality and cluster a token string names."""
    if not (token.startswith("<|") and token.endswith("|>")):
        raise ValueError(f"not a music token: {token!r}")
    body = token[2:-2]
    if token in (SPAN_START, SPAN_END):
        return ParsedToken(None, None)
    prefix, _, value = body.rpartition("_")
    if prefix == "dup":
        return ParsedToken(None, int(value))
    for m, p in PREFIX.items():
        if p == prefix:
            return ParsedToken(m, NONE if value == "none" else int(value))
    raise ValueError(f"not a music token: {token!r}")
