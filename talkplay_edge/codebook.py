"""K-means codebooks (numpy): k-means++ initialisation, Lloyd iterations, nearest-centroid assignment.

A codebook turns a modality's embedding into one cluster id. The centroids are stored in the catalog
so a track added later is tokenised by ``nearest(centroids, vectors)`` exactly as at build time.
"""

from __future__ import annotations

import numpy as np

from .progress import progress


def scatter_add(table: np.ndarray, rows: np.ndarray, values: np.ndarray, mean: bool = False) -> None:
    """``table[rows] += values`` with repeated rows summed (a faster ``np.add.at``), or averaged if ``mean``."""
    order = np.argsort(rows, kind="stable")
    rows = rows[order]
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
    sums = np.add.reduceat(values[order], starts, axis=0)
    if mean:
        sums /= np.diff(np.r_[starts, len(rows)])[:, None]
    table[rows[starts]] += sums


def _sq_norms(x: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", x, x)


def nearest(centroids: np.ndarray, vectors: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Index of the nearest centroid (squared euclidean) for each row of ``vectors``; ties -> lowest id."""
    centroids = np.asarray(centroids, dtype=np.float32)
    vectors = np.asarray(vectors, dtype=np.float32)
    c_norms = _sq_norms(centroids)
    out = np.empty(len(vectors), dtype=np.int64)
    for s in range(0, len(vectors), chunk):
        x = vectors[s:s + chunk]
        d = c_norms[None, :] - 2.0 * (x @ centroids.T)  # ||x||^2 is constant per row
        out[s:s + chunk] = np.argmin(d, axis=1)
    return out


def _min_sq_dist(centroids: np.ndarray, x: np.ndarray, x_norms: np.ndarray, chunk: int = 4096):
    """Distance to the nearest centroid and its index, for every row."""
    c_norms = _sq_norms(centroids)
    dist = np.empty(len(x), dtype=np.float32)
    idx = np.empty(len(x), dtype=np.int64)
    for s in range(0, len(x), chunk):
        d = x_norms[s:s + chunk, None] + c_norms[None, :] - 2.0 * (x[s:s + chunk] @ centroids.T)
        idx[s:s + chunk] = np.argmin(d, axis=1)
        dist[s:s + chunk] = np.maximum(d[np.arange(len(d)), idx[s:s + chunk]], 0.0)
    return dist, idx


def kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator, desc: str = "") -> np.ndarray:
    """k-means++ seeding: each new centre is drawn with probability proportional to D(x)^2."""
    x_norms = _sq_norms(x)
    centres = np.empty((k, x.shape[1]), dtype=np.float32)
    centres[0] = x[rng.integers(len(x))]
    d2 = np.maximum(x_norms + float(centres[0] @ centres[0]) - 2.0 * (x @ centres[0]), 0.0)
    for i in progress(range(1, k), desc=f"k-means++ {desc}".strip(), leave=False):
        total = float(d2.sum())
        j = int(rng.choice(len(x), p=d2 / total)) if total > 0 else int(rng.integers(len(x)))
        centres[i] = x[j]
        d2 = np.minimum(d2, np.maximum(x_norms + x_norms[j] - 2.0 * (x @ x[j]), 0.0))
    return centres


def fit_kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 25, tol: float = 1e-4,
               desc: str = "") -> np.ndarray:
    """Centroids (k x dim, float32) of ``x`` by k-means++ then Lloyd; k is capped by the distinct rows.

    Deterministic for a seed. An emptied cluster is re-seeded with the point farthest from its centre.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n_distinct = len(np.unique(x, axis=0))
    k = max(1, min(k, n_distinct))
    rng = np.random.default_rng(seed)
    centres = kmeans_plus_plus(x, k, rng, desc)
    x_norms = _sq_norms(x)
    prev = np.inf
    for _ in progress(range(iters), desc=f"k-means {desc}".strip(), leave=False):
        dist, idx = _min_sq_dist(centres, x, x_norms)
        inertia = float(dist.sum())
        counts = np.bincount(idx, minlength=k)
        sums = np.zeros(centres.shape, dtype=np.float64)
        scatter_add(sums, idx, x.astype(np.float64))
        filled = counts > 0
        centres[filled] = (sums[filled] / counts[filled, None]).astype(np.float32)
        empty = np.flatnonzero(~filled)
        if len(empty):
            far = np.argsort(-dist, kind="stable")[: len(empty)]
            centres[empty] = x[far]
        if len(empty) == 0 and prev - inertia <= tol * max(prev, 1e-12):
            break
        prev = inertia
    return centres


def lyrics_k(n_tracks: int, k_max: int = 1024, per_cluster: int = 16) -> int:
    """Codebook size for a sparsely covered modality: about ``per_cluster`` tracks per code."""
    return int(max(2, min(k_max, n_tracks // per_cluster)))
