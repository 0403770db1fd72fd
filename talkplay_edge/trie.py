"""A prefix trie over the catalog's track codes, stored as flat arrays, for constrained decoding.

Every track is one path of token ids from the root (the position right after ``<|music_start|>``) to a
leaf: its five modality tokens, an optional ``<|dup_NNN|>`` token, then ``<|music_end|>``. Ending every
path with the end token means a node after five tokens can offer both ``<|music_end|>`` (the five-token
code) and dup tokens (longer codes sharing that prefix), and every leaf is exactly one track.

Layout (CSR, built in a few vectorised numpy passes, ~20 bytes per node):

- nodes are numbered breadth-first, root = 0, and within a depth in sorted order, so the children of a
  node are the contiguous node ids ``offsets[n] + 1 .. offsets[n + 1]`` (edge ``e`` leads to node
  ``e + 1``) and ``token[e]`` is the token id on that edge (ascending within a node);
- ``parent[n]``, ``count[n]`` (tracks below ``n``) and ``track[n]`` (track index at a leaf, else -1).

A decoding step asks ``Exclusions.allowed(node)`` for the allowed token ids: an O(1) slice of the arrays,
minus the children whose subtree a session has exhausted (O(children)), never O(vocabulary). The caller
gathers the logits of just those ids. ``Exclusions`` is per session: excluding a track walks its path up
to the root (O(depth)) and prunes every subtree left without a track.
"""

from __future__ import annotations

import functools
import sys
from array import array
from typing import Iterable, Mapping, Sequence

import numpy as np


class CodeTrie:
    """Immutable trie over token-id sequences (one per track, each ending in the span-end token)."""

    root = 0

    def __init__(self, offsets: np.ndarray, token: np.ndarray, parent: np.ndarray, count: np.ndarray,
                 track: np.ndarray, leaf_of_track: np.ndarray):
        self.offsets, self.token, self.parent = offsets, token, parent
        self.count, self.track, self.leaf_of_track = count, track, leaf_of_track

    @classmethod
    def build(cls, sequences: Sequence[Sequence[int]] | np.ndarray) -> "CodeTrie":
        """Build from one token-id sequence per track (track index = position). Sequences must be distinct
        and none may be a prefix of another (end each one with the span-end token to guarantee it)."""
        if isinstance(sequences, np.ndarray):
            seqs = np.asarray(sequences, dtype=np.int64)
        else:
            width = max((len(s) for s in sequences), default=0)
            seqs = np.full((len(sequences), width), -1, dtype=np.int64)
            for i, s in enumerate(sequences):
                seqs[i, :len(s)] = s
        n_tracks, width = seqs.shape
        if n_tracks == 0:
            raise ValueError("cannot build a trie without tracks")
        lengths = (seqs >= 0).sum(axis=1)
        if (lengths == 0).any():
            raise ValueError("empty code sequence")
        order = np.lexsort(tuple(seqs[:, j] for j in reversed(range(width))))
        rows = seqs[order]
        node_of = np.zeros(n_tracks, dtype=np.int64)  # node reached by each row so far (root first)
        tokens, parents = [np.zeros(0, dtype=np.int64)], [np.full(1, -1, dtype=np.int64)]
        next_id = 1
        changed = np.zeros(n_tracks, dtype=bool)
        changed[0] = True
        for d in range(width):
            col = rows[:, d]
            valid = col >= 0
            changed = changed.copy()
            changed[1:] |= col[1:] != col[:-1]
            starts = changed & valid
            n_new = int(starts.sum())
            if n_new == 0:
                break
            ids = np.cumsum(starts) - 1 + next_id
            parents.append(node_of[starts])
            tokens.append(col[starts])
            node_of = np.where(valid, ids, node_of)
            next_id += n_new
        n_nodes = next_id
        parent = np.concatenate(parents)
        token_ids = np.concatenate(tokens)  # edge e (node e + 1)
        # leaves: the node each row ends on; distinct codes <=> distinct leaves
        leaf_rows = node_of
        if len(np.unique(leaf_rows)) != n_tracks:
            raise ValueError("duplicate track codes")
        has_child = np.zeros(n_nodes, dtype=bool)
        has_child[parent[1:]] = True
        if has_child[leaf_rows].any():
            raise ValueError("a track code is a prefix of another (end every code with the span-end token)")
        track = np.full(n_nodes, -1, dtype=np.int32)
        track[leaf_rows] = order
        leaf_of_track = np.empty(n_tracks, dtype=np.int32)
        leaf_of_track[order] = leaf_rows
        # subtree counts: leaves count 1, accumulate bottom-up (children have larger ids than parents)
        count = np.zeros(n_nodes, dtype=np.int64)
        count[leaf_rows] = 1
        # process depth by depth from the deepest: parents of a depth are all in the previous depth
        depth_sizes = [1] + [len(t) for t in tokens[1:]]
        bounds = np.cumsum([0] + depth_sizes)
        for d in range(len(depth_sizes) - 1, 0, -1):
            lo, hi = bounds[d], bounds[d + 1]
            np.add.at(count, parent[lo:hi], count[lo:hi])
        offsets = np.searchsorted(parent[1:], np.arange(n_nodes + 1), side="left").astype(np.int32)
        tok_dtype = np.uint16 if token_ids.max(initial=0) < np.iinfo(np.uint16).max else np.int32
        return cls(offsets, token_ids.astype(tok_dtype), parent.astype(np.int32), count.astype(np.int32),
                   track, leaf_of_track)

    # -- queries ---------------------------------------------------------------------------------------
    @property
    def n_nodes(self) -> int:
        return len(self.parent)

    @property
    def n_tracks(self) -> int:
        return len(self.leaf_of_track)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.offsets, self.token, self.parent, self.count, self.track,
                                      self.leaf_of_track))

    @functools.cached_property
    def levels(self) -> tuple[tuple[int, int], ...]:
        """(first node, end) of each depth below the root, shallowest first: nodes are numbered depth by
        depth, so every depth is one contiguous run whose parents all lie in the run before it."""
        levels, hi = [], 1  # the root is the run [0, 1)
        while True:  # the next depth ends where the children of this one's last node end (``offsets``)
            lo, hi = hi, int(self.offsets[hi]) + 1  # node = edge + 1
            if lo == hi:
                return tuple(levels)
            levels.append((lo, hi))

    @functools.cached_property
    def _sibling_runs(self) -> tuple[tuple[int, int, np.ndarray, np.ndarray], ...]:
        """Per depth (deepest first): (first node, end, the distinct parents, where each one's children
        start in the run); siblings are contiguous, in their parents' order."""
        runs = []
        for lo, hi in reversed(self.levels):
            p = self.parent[lo:hi]
            starts = np.flatnonzero(np.r_[True, p[1:] != p[:-1]])
            runs.append((lo, hi, p[starts].astype(np.int64), starts))
        return tuple(runs)

    def mark_ancestors(self, marked: Sequence[tuple[np.ndarray, int]]) -> np.ndarray:
        """uint8 per node: the OR of the ``bit`` of every (track indices, bit) pair with a track below it
        (the leaf itself included), in one bottom-up pass over the nodes."""
        marks = np.zeros(self.n_nodes, dtype=np.uint8)
        for tracks, bit in marked:
            marks[self.leaf_of_track[np.asarray(tracks, dtype=np.int64)]] |= np.uint8(bit)
        for lo, hi, parents, starts in self._sibling_runs:
            marks[parents] |= np.bitwise_or.reduceat(marks[lo:hi], starts)
        return marks

    def children(self, node: int) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, child node ids) of a node: array views, O(1)."""
        s, e = int(self.offsets[node]), int(self.offsets[node + 1])
        return self.token[s:e], np.arange(s + 1, e + 1)

    def child(self, node: int, token_id: int) -> int:
        """The child reached by ``token_id``, or -1."""
        s, e = int(self.offsets[node]), int(self.offsets[node + 1])
        toks = self.token[s:e]
        i = int(np.searchsorted(toks, token_id))
        return s + 1 + i if i < len(toks) and int(toks[i]) == token_id else -1

    def path(self, track_index: int) -> list[int]:
        """Token ids from the root to the track's leaf."""
        node, out = int(self.leaf_of_track[track_index]), []
        while node > 0:
            out.append(int(self.token[node - 1]))
            node = int(self.parent[node])
        return out[::-1]


def catalog_trie(codes: Mapping[str, Sequence[str]] | Iterable[tuple[str, Sequence[str]]], token_ids: Mapping[str, int],
                 end_id: int) -> tuple[list[str], CodeTrie]:
    """(track ids in trie order = sorted, the trie) over a catalog's codes: a mapping track id -> code tokens
    (``Catalog.codes()``), or (track id, code tokens) pairs in ascending id order (``Catalog.iter_codes()``,
    read as they come: only the ids and one flat array of token ids are kept while building). Each track's
    path is its token ids, then the span-end token. A code token not in ``token_ids`` raises KeyError naming
    the track and the token; pairs out of order raise ValueError."""
    pairs = sorted(codes.items()) if isinstance(codes, Mapping) else codes
    track_ids: list[str] = []
    flat, lengths = array("q"), array("q")  # machine integers, not Python objects
    for tid, code in pairs:
        if track_ids and tid <= track_ids[-1]:
            raise ValueError(f"codes not in ascending track-id order ({track_ids[-1]!r}, then {tid!r})")
        try:
            flat.extend([token_ids[t] for t in code])
        except KeyError as e:
            raise KeyError(f"track {tid} has the code token {e.args[0]}, which is not in the vocabulary") from None
        lengths.append(len(code))
        track_ids.append(sys.intern(tid))
    lens = np.frombuffer(lengths, dtype=np.int64)
    seqs = np.full((len(lens), int(lens.max(initial=0)) + 1), -1, dtype=np.int64)  # no tracks: build refuses
    seqs[np.arange(seqs.shape[1])[None, :] < lens[:, None]] = np.frombuffer(flat, dtype=np.int64)  # row by row
    seqs[np.arange(len(lens)), lens] = end_id
    return track_ids, CodeTrie.build(seqs)


class Exclusions:
    """One session's excluded tracks over a shared trie; prunes exhausted subtrees.

    Memory is O(excluded tracks × depth), so sessions are cheap however big the trie is."""

    def __init__(self, trie: CodeTrie, tracks: Sequence[int] = ()):
        self.trie = trie
        self.tracks: set[int] = set()
        self._removed: dict[int, int] = {}
        self._dead: dict[int, list[int]] = {}  # node -> positions (among its children) of exhausted children
        for t in tracks:
            self.exclude(t)

    def copy(self) -> "Exclusions":
        other = Exclusions(self.trie)
        other.tracks = set(self.tracks)
        other._removed = dict(self._removed)
        other._dead = {k: list(v) for k, v in self._dead.items()}
        return other

    def exclude(self, track_index: int) -> None:
        if track_index in self.tracks:
            return
        self.tracks.add(track_index)
        node = int(self.trie.leaf_of_track[track_index])
        while node >= 0:
            node = self._remove(node, 1)

    def exclude_many(self, track_indices) -> None:
        """``exclude`` each of ``track_indices`` (the same result, in one pass over their ancestors)."""
        new = np.unique(np.asarray(track_indices, dtype=np.int64))
        new = new[[int(t) not in self.tracks for t in new]] if len(new) else new
        if not len(new):
            return
        self.tracks.update(int(t) for t in new)
        trie, levels = self.trie, []
        nodes = trie.leaf_of_track[new].astype(np.int64)
        while len(nodes):
            levels.append(nodes)
            nodes = trie.parent[nodes].astype(np.int64)
            nodes = nodes[nodes >= 0]
        touched, added = np.unique(np.concatenate(levels), return_counts=True)
        for node, n in zip(touched.tolist(), added.tolist()):
            self._remove(node, n)

    def _remove(self, node: int, n: int) -> int:
        """Count ``n`` more excluded tracks below ``node``; prune it from its parent once none is left.
        Returns the parent (-1 at the root)."""
        r = self._removed.get(node, 0) + n
        self._removed[node] = r
        parent = int(self.trie.parent[node])
        if r == int(self.trie.count[node]) and parent >= 0:
            self._dead.setdefault(parent, []).append(node - 1 - int(self.trie.offsets[parent]))
        return parent

    def remaining(self, node: int = 0) -> int:
        """Tracks still allowed below ``node``."""
        return int(self.trie.count[node]) - self._removed.get(node, 0)

    @property
    def exhausted(self) -> bool:
        return self.remaining(0) <= 0

    def allowed(self, node: int) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, child nodes) allowed after ``node``: O(children), pruned of exhausted subtrees."""
        toks, kids = self.trie.children(node)
        dead = self._dead.get(node)
        if dead:
            keep = np.ones(len(toks), dtype=bool)
            keep[dead] = False
            toks, kids = toks[keep], kids[keep]
        return toks, kids
