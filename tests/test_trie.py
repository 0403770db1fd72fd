"""The code trie (CSR arrays) and per-session exclusions, checked against brute force."""

from __future__ import annotations

import random

import numpy as np
import pytest

from talkplay_edge.trie import CodeTrie, Exclusions

END = 99


def random_codes(n: int, seed: int = 0) -> list[list[int]]:
    """Distinct codes of 4 tokens in 0..4, some with a trailing 'dup' token (10..12), all ending in END."""
    rng = random.Random(seed)
    seen = set()
    while len(seen) < n:
        s = tuple(rng.randrange(5) for _ in range(4))
        if rng.random() < 0.3:
            s += (10 + rng.randrange(3),)
        seen.add(s)
    return [list(s) + [END] for s in sorted(seen, key=lambda s: rng.random())]


def brute_allowed(codes, excluded, prefix):
    return {c[len(prefix)] for i, c in enumerate(codes)
            if i not in excluded and c[:len(prefix)] == prefix and len(c) > len(prefix)}


def walk(trie, seq):
    node = 0
    for t in seq:
        node = trie.child(node, t)
        assert node > 0
    return node


def test_paths_roundtrip_and_leaves():
    codes = random_codes(300)
    trie = CodeTrie.build(codes)
    assert trie.n_tracks == 300
    for i, c in enumerate(codes):
        assert trie.path(i) == c
        assert trie.track[walk(trie, c)] == i
    assert int(trie.count[0]) == 300
    assert (trie.track >= 0).sum() == 300
    assert trie.child(0, 4242) == -1


def test_mark_ancestors_matches_walking_every_path():
    """A (tracks, bit) pair marks each track's leaf and every node on its path, the root included; codes of
    two lengths (dup tokens) and repeated tracks too."""
    codes = random_codes(300, seed=3)
    trie = CodeTrie.build(codes)
    assert [lo for lo, _ in trie.levels] == [1] + [hi for _, hi in trie.levels[:-1]] and trie.levels[-1][1] == trie.n_nodes
    rng = np.random.default_rng(0)
    marked = [(rng.choice(300, size=k, replace=True), bit) for k, bit in ((1, 1), (40, 2), (120, 64), (0, 8))]
    want = np.zeros(trie.n_nodes, dtype=np.uint8)
    for tracks, bit in marked:
        for t in tracks:
            node = 0
            want[node] |= bit
            for tok in codes[t]:
                node = trie.child(node, tok)
                want[node] |= bit
    got = trie.mark_ancestors(marked)
    assert np.array_equal(got, want) and got[0] == 1 | 2 | 64 and (got == 0).any()


def test_five_token_code_prefix_of_dup_code():
    codes = [[1, 2, 3, 4, 5, END], [1, 2, 3, 4, 5, 50, END], [1, 2, 3, 4, 5, 51, END]]
    trie = CodeTrie.build(codes)
    node = walk(trie, [1, 2, 3, 4, 5])
    toks, kids = trie.children(node)
    assert sorted(toks.tolist()) == [50, 51, END]
    ex = Exclusions(trie, [0])
    toks, _ = ex.allowed(node)
    assert sorted(toks.tolist()) == [50, 51]  # the 5-token code is gone, the dup codes remain
    ex.exclude(1)
    ex.exclude(2)
    assert ex.exhausted
    assert ex.allowed(0)[0].size == 0


def test_allowed_matches_brute_force_while_excluding():
    codes = random_codes(250, seed=1)
    trie = CodeTrie.build(codes)
    ex = Exclusions(trie)
    rng = random.Random(2)
    order = list(range(len(codes)))
    rng.shuffle(order)
    for k, t in enumerate(order):
        # check every prefix on the path of a few random codes
        for c in rng.sample(codes, 5):
            node = 0
            for d in range(len(c)):
                got = set(ex.allowed(node)[0].tolist())
                assert got == brute_allowed(codes, ex.tracks, c[:d]), (c, d)
                if not got or c[d] not in got:
                    break
                node = trie.child(node, c[d])
        assert ex.remaining() == len(codes) - k
        ex.exclude(t)
    assert ex.exhausted and ex.remaining() == 0


def test_random_walks_only_reach_allowed_tracks():
    codes = random_codes(200, seed=3)
    trie = CodeTrie.build(codes)
    ex = Exclusions(trie)
    rng = np.random.default_rng(0)
    found = []
    while not ex.exhausted:
        node = 0
        while trie.track[node] < 0:
            toks, kids = ex.allowed(node)
            assert len(toks), "dead end: exhausted subtree not pruned"
            node = int(kids[rng.integers(len(kids))])
        t = int(trie.track[node])
        assert t not in ex.tracks
        found.append(t)
        ex.exclude(t)
    assert sorted(found) == list(range(200))


def test_exclusions_copy_is_independent_and_idempotent():
    trie = CodeTrie.build(random_codes(50, seed=4))
    a = Exclusions(trie, [1, 2])
    b = a.copy()
    b.exclude(3)
    b.exclude(3)
    assert a.tracks == {1, 2} and b.tracks == {1, 2, 3}
    assert a.remaining() == 48 and b.remaining() == 47


def test_exclude_many_is_exclude_of_each():
    """Excluding tracks in one pass (a denied genre's thousands) leaves the state excluding one by one does,
    with some already excluded, repeats, and whole subtrees going dead."""
    codes = random_codes(300, seed=5)
    trie = CodeTrie.build(codes)
    rng = random.Random(6)
    for _ in range(20):
        before = rng.sample(range(len(codes)), rng.randrange(0, 40))
        batch = [rng.randrange(len(codes)) for _ in range(rng.randrange(0, 300))]
        one, many = Exclusions(trie, before), Exclusions(trie, before)
        for t in batch:
            one.exclude(t)
        many.exclude_many(batch)
        assert many.tracks == one.tracks and many._removed == one._removed
        assert {k: sorted(v) for k, v in many._dead.items()} == {k: sorted(v) for k, v in one._dead.items()}
        for node in range(len(trie.count)):
            assert np.array_equal(many.allowed(node)[1], one.allowed(node)[1])
    whole = Exclusions(trie)
    whole.exclude_many(range(len(codes)))
    assert whole.exhausted


def test_rejects_duplicates_and_prefix_codes():
    with pytest.raises(ValueError, match="duplicate"):
        CodeTrie.build([[1, 2, END], [1, 2, END]])
    with pytest.raises(ValueError, match="prefix"):
        CodeTrie.build([[1, 2], [1, 2, 3]])
    with pytest.raises(ValueError):
        CodeTrie.build([])


def test_synthetic_scale_shape_and_mask_speed():
    """A 50k-track synthetic catalog (the 1M check is `talkplay bench`): leaves, counts, and a fast mask."""
    from talkplay_edge.bench import bench_trie, synthetic_codes

    seqs = synthetic_codes(50_000, seed=1)
    trie = CodeTrie.build(seqs)
    assert trie.n_tracks == 50_000 and int(trie.count[0]) == 50_000
    for i in (0, 123, 49_999):
        row = seqs[i][seqs[i] >= 0].tolist()
        assert trie.path(i) == row
    r = bench_trie(50_000, steps=300, n_excluded=100)
    assert r["mask_p50_us"] < 2000


def test_catalog_trie_from_rows_equals_from_mapping(tiny_catalog):
    """The runtime builds its trie from the catalog's rows as they come (``Catalog.iter_codes``): the same
    ids and arrays as from the whole ``codes()`` mapping; rows out of id order and a code token outside the
    vocabulary are refused by name."""
    from talkplay_edge.catalog import Catalog
    from talkplay_edge.trie import catalog_trie

    with Catalog.open(tiny_catalog) as cat:
        token_ids = {t: 1000 + i for i, t in enumerate(cat.vocabulary)}
        ids_a, a = catalog_trie(cat.codes(cache=False), token_ids, END)
        rows = list(cat.iter_codes())
    ids_b, b = catalog_trie(iter(rows), token_ids, END)
    assert ids_a == ids_b == sorted(ids_a) and [r[0] for r in rows] == ids_a
    for name in ("offsets", "token", "parent", "count", "track", "leaf_of_track"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    for i, (tid, code) in enumerate(rows):
        assert b.path(i) == [token_ids[t] for t in code] + [END]
    with pytest.raises(ValueError, match="ascending track-id order"):
        catalog_trie(iter([rows[1], rows[0]]), token_ids, END)
    tid, code = rows[2]
    with pytest.raises(KeyError, match=f"track {tid} has the code token <\\|meta_4635\\|>"):
        catalog_trie(iter(rows[:2] + [(tid, code[:2] + ["<|meta_4635|>"] + code[3:])]), token_ids, END)
    with pytest.raises(ValueError, match="without tracks"):
        catalog_trie(iter([]), token_ids, END)
