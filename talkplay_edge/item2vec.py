"""item2vec: skip-gram with negative sampling over playlists (numpy), the CF modality's embedding.

Every ordered pair of distinct tracks within ``window`` positions of each other in a playlist is a
positive (item2vec treats a playlist as a set; a wide window approximates that while bounding work).
Negatives are drawn from the unigram distribution raised to 3/4, as in word2vec. Updates are batched
(4,096 pairs; a row repeated within a batch gets the mean of its updates, which keeps small catalogs stable); the learning rate is high (0.5, linearly decayed) because most tracks sit in one or two
playlists and get few updates: on the real catalog a track's 10 nearest neighbours share a playlist with
it 99.6% of the time at lr 0.5 (89% at 0.1, chance level at 0.025 for this many epochs).
"""

from __future__ import annotations

import numpy as np

from .codebook import scatter_add
from .progress import progress


def _pairs(playlists: list[list[int]], window: int) -> np.ndarray:
    out = []
    for items in playlists:
        a = np.asarray(items, dtype=np.int64)
        for off in range(1, min(window, len(a) - 1) + 1):
            out.append(np.stack([a[:-off], a[off:]], 1))
            out.append(np.stack([a[off:], a[:-off]], 1))
    return np.concatenate(out) if out else np.zeros((0, 2), dtype=np.int64)


def train_item2vec(playlists: list[list[str]], dim: int = 64, window: int = 10, negatives: int = 5,
                   epochs: int = 5, lr: float = 0.5, batch: int = 4096, seed: int = 0
                   ) -> tuple[list[str], np.ndarray]:
    """Train on playlists of track ids; returns (ids in sorted order, L2-normalised vectors [n, dim])."""
    ids = sorted({t for p in playlists for t in p})
    if not ids:
        return [], np.zeros((0, dim), dtype=np.float32)
    index = {t: i for i, t in enumerate(ids)}
    seqs = [[index[t] for t in p] for p in playlists if len(p) > 1]
    pairs = _pairs(seqs, window)
    counts = np.bincount([i for s in seqs for i in s], minlength=len(ids)).astype(np.float64)
    noise = np.cumsum(counts ** 0.75)
    noise /= noise[-1]
    rng = np.random.default_rng(seed)
    w_in = ((rng.random((len(ids), dim)) - 0.5) / dim).astype(np.float32)
    w_out = np.zeros((len(ids), dim), dtype=np.float32)
    steps = epochs * max(1, -(-len(pairs) // batch))
    step = 0
    for _ in progress(range(epochs), desc="item2vec", leave=False):
        order = rng.permutation(len(pairs))
        for s in range(0, len(pairs), batch):
            p = pairs[order[s:s + batch]]
            rate = lr * max(1e-4, 1.0 - step / steps)
            step += 1
            centre, ctx = p[:, 0], p[:, 1]
            neg = np.minimum(np.searchsorted(noise, rng.random((len(p), negatives))), len(ids) - 1)
            targets = np.concatenate([ctx[:, None], neg], 1)  # [b, 1+neg]
            labels = np.zeros(targets.shape, dtype=np.float32)
            labels[:, 0] = 1.0
            v = w_in[centre]  # [b, d]
            u = w_out[targets]  # [b, 1+neg, d]
            score = 1.0 / (1.0 + np.exp(-np.clip(np.einsum("bd,bkd->bk", v, u), -6, 6)))  # word2vec's MAX_EXP
            g = (labels - score) * rate  # gradient of the log-likelihood
            scatter_add(w_in, centre, np.einsum("bk,bkd->bd", g, u), mean=True)
            scatter_add(w_out, targets.reshape(-1), (g[:, :, None] * v[:, None, :]).reshape(-1, dim), mean=True)
    norms = np.linalg.norm(w_in, axis=1, keepdims=True)
    return ids, (w_in / np.maximum(norms, 1e-12)).astype(np.float32)
