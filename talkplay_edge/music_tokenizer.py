"""The music tokenizer: a track's five modality embeddings → five cluster ids → music tokens.

``embed_modalities`` computes, for a batch of track records, each modality's vectors (only for the
tracks that have that modality). ``assign_clusters`` maps vectors to their nearest stored centroid.
The catalog builder fits the codebooks on the first and then calls the second; a track added later
(``talkplay index``) goes through exactly the same two functions with the stored codebooks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .codebook import nearest
from .modalities import audio_vector, metadata_text, standardise, tags_text
from .tokens import MODALITIES, NONE


@dataclass
class ModalityVectors:
    """Vectors of one modality for the rows (indices into the track list) that have it."""

    rows: np.ndarray  # int64 [m]
    vectors: np.ndarray  # float32 [m, dim]


def embed_modalities(tracks: list[dict], encoder, lyrics: dict[str, str] | None = None,
                     cf: dict[str, np.ndarray] | None = None, progress: bool = False) -> dict[str, ModalityVectors]:
    """Raw embeddings per modality. Audio vectors are unstandardised here (the codebook transform does it)."""
    lyrics, cf = lyrics or {}, cf or {}
    out: dict[str, ModalityVectors] = {}

    def text_modality(texts: list[str | None]) -> ModalityVectors:
        rows = np.array([i for i, t in enumerate(texts) if t], dtype=np.int64)
        vecs = encoder.encode([texts[i] for i in rows], progress=progress) if len(rows) else np.zeros((0, encoder.dim), np.float32)
        return ModalityVectors(rows, np.asarray(vecs, dtype=np.float32))

    out["metadata"] = text_modality([metadata_text(t) or None for t in tracks])
    out["tags"] = text_modality([tags_text(t) for t in tracks])

    lyr_rows = [i for i, t in enumerate(tracks) if lyrics.get(t["id"])]
    lyr_vecs = [encoder.encode_long(lyrics[tracks[i]["id"]]) for i in lyr_rows]
    out["lyrics"] = ModalityVectors(np.array(lyr_rows, dtype=np.int64),
                                    np.stack(lyr_vecs).astype(np.float32) if lyr_vecs else np.zeros((0, encoder.dim), np.float32))

    audio = [audio_vector(t) for t in tracks]
    aud_rows = [i for i, v in enumerate(audio) if v is not None]
    out["audio"] = ModalityVectors(np.array(aud_rows, dtype=np.int64),
                                   np.stack([audio[i] for i in aud_rows]) if aud_rows else np.zeros((0, 12), np.float32))

    cf_rows = [i for i, t in enumerate(tracks) if t["id"] in cf]
    dim = len(next(iter(cf.values()))) if cf else 0
    out["cf"] = ModalityVectors(np.array(cf_rows, dtype=np.int64),
                                np.stack([cf[tracks[i]["id"]] for i in cf_rows]).astype(np.float32) if cf_rows else np.zeros((0, dim), np.float32))
    return out


def transform(modality_vectors: np.ndarray, transform_spec: dict) -> np.ndarray:
    """Apply a codebook's stored input transform (standardisation for audio; identity otherwise)."""
    spec = transform_spec.get("standardise")
    if spec:
        return standardise(modality_vectors, np.asarray(spec["mean"], np.float32), np.asarray(spec["std"], np.float32))
    return modality_vectors


def assign_clusters(n_tracks: int, embedded: dict[str, ModalityVectors], codebooks: dict) -> dict[str, np.ndarray]:
    """Cluster id per track and modality (``NONE`` where the track lacks the modality).

    ``codebooks`` maps modality → an object with ``centroids`` and ``transform`` (catalog.Codebook).
    """
    clusters = {}
    for m in MODALITIES:
        ids = np.full(n_tracks, NONE, dtype=np.int64)
        mv = embedded.get(m)
        cb = codebooks.get(m)
        if mv is not None and cb is not None and len(mv.rows) and len(cb.centroids):
            ids[mv.rows] = nearest(cb.centroids, transform(mv.vectors, cb.transform))
        clusters[m] = ids
    return clusters
