"""Units of the music tokenizer: token strings, k-means codebooks, item2vec."""

from __future__ import annotations

import numpy as np
import pytest

from talkplay_edge.codebook import fit_kmeans, lyrics_k, nearest, scatter_add
from talkplay_edge.item2vec import train_item2vec
from talkplay_edge.modalities import audio_vector, metadata_text, tags_text
from talkplay_edge.tokens import (MODALITIES, NONE, SPAN_END, SPAN_START, code_tokens, dup_token, fingerprint,
                                  modality_token, parse_token, vocabulary)


def test_token_strings_roundtrip_and_fit_llama_cpp():
    vocab = vocabulary({m: 1024 for m in MODALITIES}, max_dup=12)
    assert len(vocab) == 2 + 5 * 1025 + 12 and len(set(vocab)) == len(vocab)
    assert vocab[:2] == [SPAN_START, SPAN_END]
    assert max(len(t.encode()) for t in vocab) < 32
    for m in MODALITIES:
        for c in (NONE, 0, 1023):
            p = parse_token(modality_token(m, c))
            assert (p.modality, p.cluster) == (m, c)
    assert parse_token(dup_token(7)).cluster == 7
    assert code_tokens([412, 77, 931, NONE, 150]) == [
        "<|cf_0412|>", "<|tag_0077|>", "<|meta_0931|>", "<|lyr_none|>", "<|aud_0150|>"]
    with pytest.raises(ValueError):
        parse_token("<|im_start|>")


def test_fingerprint_depends_on_order_and_codebooks():
    v = vocabulary({m: 4 for m in MODALITIES}, 0)
    assert fingerprint(v, [b"a"]) == fingerprint(list(v), [b"a"])
    assert fingerprint(v, [b"a"]) != fingerprint(v[::-1], [b"a"])
    assert fingerprint(v, [b"a"]) != fingerprint(v, [b"b"])


def test_kmeans_recovers_separated_blobs_and_is_deterministic():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(6, 8)).astype(np.float32) * 10
    x = np.concatenate([c + rng.normal(size=(50, 8)).astype(np.float32) * 0.1 for c in centres])
    a = fit_kmeans(x, 6, seed=3)
    b = fit_kmeans(x, 6, seed=3)
    assert np.array_equal(a, b)
    labels = nearest(a, x)
    # every blob maps to exactly one cluster and clusters are distinct
    blob_labels = [set(labels[i * 50:(i + 1) * 50]) for i in range(6)]
    assert all(len(s) == 1 for s in blob_labels) and len(set.union(*blob_labels)) == 6


def test_kmeans_caps_k_at_distinct_points():
    x = np.repeat(np.eye(3, dtype=np.float32), 5, axis=0)
    assert fit_kmeans(x, 10).shape == (3, 3)
    assert lyrics_k(926) == 57 and lyrics_k(10) == 2 and lyrics_k(10**6) == 1024


def test_scatter_add_matches_add_at():
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 7, 100)
    vals = rng.normal(size=(100, 3))
    a, b = np.zeros((7, 3)), np.zeros((7, 3))
    np.add.at(a, rows, vals)
    scatter_add(b, rows, vals)
    assert np.allclose(a, b)


def test_item2vec_separates_disjoint_playlists():
    group_a = [f"a{i}" for i in range(12)]
    group_b = [f"b{i}" for i in range(12)]
    rng = np.random.default_rng(0)
    playlists = [list(rng.permutation(group_a)) for _ in range(6)] + [list(rng.permutation(group_b)) for _ in range(6)]
    ids, vecs = train_item2vec(playlists, dim=16, epochs=30, batch=64, seed=0)
    idx = {t: i for i, t in enumerate(ids)}
    va, vb = vecs[[idx[t] for t in group_a]], vecs[[idx[t] for t in group_b]]
    within = (va @ va.T).mean() + (vb @ vb.T).mean()
    across = 2 * (va @ vb.T).mean()
    assert within - across > 0.5
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)


def test_modality_inputs():
    t = {"title": "Song", "artist": "Band", "album": "LP", "year": 1999, "genres": ["rock"], "subgenres": ["hard rock"],
         "artist_genres": ["Rock", "grunge"], "playlists": ["Gym"], "danceability": 0.5, "energy": 0.9, "key": 3,
         "mode": 1, "loudness": -5.0, "speechiness": 0.05, "acousticness": 0.1, "instrumentalness": 0.0,
         "liveness": 0.1, "valence": 0.4, "tempo": 120.0}
    assert metadata_text(t) == "Song — Band · LP · 1999"
    assert metadata_text({"title": "Song", "artist": "Band"}) == "Song — Band"
    assert tags_text(t) == "rock, hard rock, grunge, Gym"  # case-insensitive dedupe
    assert tags_text({"genres": [], "playlists": []}) is None
    v = audio_vector(t)
    assert v.shape == (12,) and np.isclose(v[2] ** 2 + v[3] ** 2, 1.0)
    assert audio_vector({**t, "key": -1})[2:4].tolist() == [0.0, 0.0]
    assert audio_vector({**t, "tempo": None}) is None
