"""Retrieval prior: the on-device retrievers' ranking as the prior of a span calibration.

A span calibration (``calibration.py``) scores the children of a trie node as ``beta·logit + alpha·log(prior
mass below the child)``. Without retrieval the prior gives every catalog track the same mass. With a
``RetrievalSpec`` the prior puts a share ``weight`` of its mass on the tracks the retrievers find for the
conversation so far, and spreads the rest evenly over the catalog:

    prior(track) = (1 - weight) / N  +  weight · (rank + k0) ** -gamma / Z      (rank < depth, 0-based)

where ``rank`` is the track's place in the reciprocal-rank fusion of BM25 (title, artist, album, tags),
MiniLM dense retrieval and item2vec neighbours of the tracks played so far (the ``hybrid`` system of
``baselines.py``), and ``Z`` normalises the retrieved share. With alpha = 1 and beta = 0 at every depth the
span scores telescope to exactly log prior(track); the model's logits re-rank within it. ``export/calibrate.py
--retrieval`` fits the spec and (alpha, beta) on held-out conversations.

The prior is computed per request (one BM25 query, one MiniLM query, one item2vec product, then the masses
of the nodes above at most ``depth`` tracks). The dense retriever needs the catalog's track vectors: they
ship beside the catalog (``catalog.vectors.npz``, ``talkplay catalog vectors``); for a catalog without them
they are embedded once (minutes on 2 cores, with a progress bar) and cached.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class RetrievalSpec:
    """How the retrieved ranking becomes prior mass (see the module docstring)."""

    weight: float = 0.5
    gamma: float = 1.0
    k0: float = 10.0
    depth: int = 600

    @classmethod
    def parse(cls, value) -> "RetrievalSpec | None":
        if value is None:
            return None
        try:
            d = json.loads(value) if isinstance(value, str) else dict(value)
            spec = cls(float(d["weight"]), float(d["gamma"]), float(d["k0"]), int(d["depth"]))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f'retrieval {value!r}: expected {{"weight", "gamma", "k0", "depth"}} ({e})') from e
        if not (0.0 <= spec.weight < 1.0) or spec.gamma < 0 or spec.k0 <= 0 or spec.depth < 1:
            raise ValueError(f"retrieval {value!r}: need 0 <= weight < 1, gamma >= 0, k0 > 0, depth >= 1")
        return spec

    def to_dict(self) -> dict:
        return asdict(self)

    def rank_weights(self, n: int) -> np.ndarray:
        """The retrieved share's mass of ranks 0..n-1 (sums to 1)."""
        w = (np.arange(n, dtype=np.float64) + self.k0) ** -self.gamma
        return w / w.sum() if n else w


class RetrievalPrior:
    """Per-request prior masses over a trie's nodes from the retrievers' ranking.

    ``RetrievalPrior(catalog, trie, track_index, spec, threads=2)``; ``log_mass(history, exclude)`` gives
    log prior mass below every node (an array indexed by node id). The retrievers are built on first use."""

    def __init__(self, catalog, trie, track_index: dict[str, int], spec: RetrievalSpec, threads: int = 2,
                 encoder=None, show_progress: bool = True):
        self.catalog, self.trie, self.track_index, self.spec = catalog, trie, track_index, spec
        self.threads, self.encoder, self.show_progress = threads, encoder, show_progress
        self._hybrid = None
        self._uniform = np.maximum(trie.count, 1).astype(np.float64) * ((1.0 - spec.weight) / trie.n_tracks)

    @property
    def hybrid(self):
        """The retrievers: the ``hybrid`` baseline (bm25 + dense + cf), built on first use."""
        if self._hybrid is None:
            from .baselines import HybridRecommender

            self._hybrid = HybridRecommender(self.catalog, threads=self.threads, encoder=self.encoder,
                                             show_progress=self.show_progress, index=self.track_index)
        return self._hybrid

    def load(self) -> "RetrievalPrior":
        """Build the retrievers now (else on first use)."""
        _ = self.hybrid
        return self

    def ranking(self, history: list[dict], exclude: set[str]) -> list[int]:
        """Track indices (trie order) the retrievers rank for the conversation so far, best first."""
        ids = self.hybrid.fused(history, exclude, self.spec.depth)[:self.spec.depth]
        return [self.track_index[t] for t in ids if t in self.track_index]  # fused() leaves out ``exclude``

    def mass(self, ranked: list[int]) -> np.ndarray:
        """Prior mass below every node for a ranking of track indices."""
        trie = self.trie
        m = self._uniform.copy()
        if ranked:
            w = self.spec.weight * self.spec.rank_weights(len(ranked))
            nodes = trie.leaf_of_track[np.asarray(ranked, dtype=np.int64)].astype(np.int64)
            while True:  # add each track's mass to its leaf and every ancestor (the root's parent is -1)
                np.add.at(m, nodes, w)
                up = trie.parent[nodes].astype(np.int64)
                keep = up >= 0
                if not keep.any():
                    break
                nodes, w = up[keep], w[keep]
        return m

    def log_mass(self, history: list[dict], exclude: set[str]) -> np.ndarray:
        return np.log(self.mass(self.ranking(history, exclude)))
