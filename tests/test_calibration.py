"""Span calibration: its scores, and the runtime's use of it (greedy picks and beam scores)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from talkplay_edge.calibration import SpanCalibration, calibration_file, read_calibration


def test_parse_and_scores():
    cal = SpanCalibration.parse('{"alpha": [1, 0.5], "beta": [0, 2]}')
    assert cal == SpanCalibration.parse({"alpha": [1, 0.5], "beta": [0, 2]}) == SpanCalibration((1.0, 0.5), (0.0, 2.0))
    assert SpanCalibration.parse(cal.to_json()) == cal
    for off in (None, "", "off", "OFF"):
        assert SpanCalibration.parse(off) is None
    for bad in ('{"alpha": [1]}', '{"alpha": [1], "beta": [1, 2]}', '{"alpha": [], "beta": []}', "[1, 2",
                '{"alpha": ["x"], "beta": [1]}', '{"alpha": [NaN], "beta": [1]}'):
        with pytest.raises(ValueError, match="span calibration"):
            SpanCalibration.parse(bad)
    logits, counts = np.array([3.0, 1.0, -2.0]), np.array([1.0, 10.0, 89.0])
    # depth 0: alpha 1, beta 0 is the track-count prior: each child gets its share of the tracks
    assert np.allclose(np.exp(cal.scores(logits, np.log(counts), 0)), counts / counts.sum())
    # depth 1 and past the list: softmax(2 * logits + 0.5 * log counts)
    s = 2 * logits + 0.5 * np.log(counts)
    want = s - np.log(np.exp(s).sum())
    assert np.allclose(cal.scores(logits, np.log(counts), 1), want)
    assert np.allclose(cal.scores(logits, np.log(counts), 7), want)


def test_read_calibration_beside_a_delta(tmp_path):
    d = tmp_path / "delta"
    d.mkdir()
    assert read_calibration(d) is None
    calibration_file(d).write_text('{"alpha": [0.5], "beta": [0.25], "valid": "v.jsonl"}')  # extra keys: a report
    assert read_calibration(d) == SpanCalibration((0.5,), (0.25,))
    assert calibration_file(tmp_path / "delta.safetensors").name == "delta.span_calibration.json"
    calibration_file(d).write_text("{")
    with pytest.raises(ValueError, match="span_calibration.json"):
        read_calibration(d)


@pytest.fixture()
def prior_only(runtime_gguf, tiny_catalog):
    """The tiny model with a calibration that ignores it (beta 0): every track weighs the same."""
    from talkplay_edge.runtime import TalkPlay

    tp = TalkPlay.load(runtime_gguf, tiny_catalog, threads=1, n_ctx=1024,
                       span_calibration='{"alpha": [1], "beta": [0]}')
    yield tp
    cat = tp.catalog
    tp.close()
    cat.close()


def test_greedy_span_follows_the_track_counts(prior_only):
    """With beta 0 and alpha 1 a greedy span takes, at every node, the child with the most tracks below it
    (the first of equals), whatever the model says."""
    tp = prior_only
    trie = tp.trie
    reply = tp.chat(max_new_tokens=4).send("anything")
    node = trie.root
    while trie.track[node] < 0:
        _, kids = trie.children(node)
        node = int(kids[int(np.argmax(trie.count[kids]))])
    assert reply.tracks[0].id == tp.track_ids[int(trie.track[node])]


def test_beam_scores_are_calibrated(prior_only, talkplay):
    """Beam search with the track-count prior alone gives every track log(1 / tracks); without a
    calibration the scores are the model's log-probabilities (different, all below 0)."""
    from talkplay_edge.trie import Exclusions

    def rank(tp):
        with tp._lock:
            tp._switch_to(-1)  # as ModelRecommender does: one more user of the context
            prompt = tp.tokenize_segments([("<|im_start|>user\nanything<|im_end|>\n<|im_start|>assistant\n", True)])
            logits = tp._sync(prompt + [tp.start_id])
            return tp.rank(Exclusions(tp.trie), logits, 5)

    n_tracks = int(prior_only.trie.count[0])
    ranked = rank(prior_only)
    assert len(ranked) == 5 and len({t for t, _ in ranked}) == 5
    assert all(abs(score + math.log(n_tracks)) < 1e-9 for _, score in ranked)
    assert talkplay.calibration is None
    plain = rank(talkplay)
    assert all(score < 0 for _, score in plain) and any(abs(score + math.log(n_tracks)) > 1e-3 for _, score in plain)


def test_unnormalised_scores_pick_the_same_child():
    cal = SpanCalibration((0.5,), (0.3,))
    logits, logc = np.array([1.0, 4.0, 2.0, -1.0]), np.log([5.0, 1.0, 40.0, 2.0])
    full, raw = cal.scores(logits, logc, 0), cal.scores(logits, logc, 0, normalise=False)
    assert np.allclose(full - raw, full[0] - raw[0]) and not np.allclose(full, raw)
    assert int(np.argmax(full)) == int(np.argmax(raw)) == 2


def test_a_bad_calibration_is_refused_naming_its_source(runtime_gguf, tiny_catalog, monkeypatch):
    from talkplay_edge.runtime import TalkPlay

    monkeypatch.setenv("TALKPLAY_SPAN_CALIBRATION", '{"alpha": [1]}')
    with pytest.raises(ValueError, match=r"\$TALKPLAY_SPAN_CALIBRATION: span calibration"):
        TalkPlay.load(runtime_gguf, tiny_catalog, threads=1, n_ctx=256)
    monkeypatch.setenv("TALKPLAY_SPAN_CALIBRATION", "off")
    tp = TalkPlay.load(runtime_gguf, tiny_catalog, threads=1, n_ctx=256, span_calibration='{"alpha": [2], "beta": [0.5]}')
    try:
        assert tp.calibration == SpanCalibration((2.0,), (0.5,))  # an explicit argument wins over the variable
    finally:
        cat = tp.catalog
        tp.close()
        cat.close()


def test_a_beta_zero_step_decodes_nothing(prior_only, monkeypatch):
    """Where beta is 0 a span step is scored by the prior alone, so the greedy span decodes no token before
    it: the whole span goes to llama.cpp in one batch with the track context."""
    tp = prior_only
    calls = []
    append = tp._append
    monkeypatch.setattr(tp, "_append", lambda tokens: calls.append(list(tokens)) or append(tokens))
    reply = tp.chat(max_new_tokens=1).send("anything")
    track = tp.track_index[reply.tracks[0].id]
    path = [int(t) for t in tp.trie.path(track)]
    node, branching = tp.trie.root, 0
    for tok in path[:-1]:
        node = tp.trie.child(node, tok)
        branching += len(tp.trie.children(node)[0]) > 1
    assert branching, "the test needs a span with a choice after its first step"
    assert calls[0][:len(path)] == path


def test_a_cold_part_scores_the_first_turn(runtime_gguf, tiny_catalog, monkeypatch):
    """A calibration's ``cold`` (alpha, beta) scores requests with no track played yet, the main one every
    later request: the first greedy span follows the track counts (cold alpha 1, beta 0) although the main
    part is the model alone, and the second turn's steps are scored as warm."""
    from talkplay_edge.calibration import is_cold
    from talkplay_edge.runtime import TalkPlay

    cal = SpanCalibration.parse('{"alpha": [0], "beta": [1], "cold": {"alpha": [1], "beta": [0]}}')
    assert cal.cold == SpanCalibration((1.0,), (0.0,)) and SpanCalibration.parse(cal.to_json()) == cal
    assert cal.pick(True) is cal.cold and cal.pick(False) is cal
    with pytest.raises(ValueError, match="cold"):
        SpanCalibration.parse('{"alpha": [0], "beta": [1], "cold": [1, 0]}')
    assert is_cold([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}])
    assert not is_cold([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x", "track_ids": ["t"]}])

    tp = TalkPlay.load(runtime_gguf, tiny_catalog, threads=1, n_ctx=1024, span_calibration=cal)
    try:
        seen = []
        scores = tp.span_scores
        monkeypatch.setattr(tp, "span_scores", lambda *a, **kw: seen.append(kw.get("cold")) or scores(*a, **kw))
        session = tp.chat(max_new_tokens=4)
        first = session.send("anything")
        trie, node = tp.trie, tp.trie.root
        while trie.track[node] < 0:
            _, kids = trie.children(node)
            node = int(kids[int(np.argmax(trie.count[kids]))])
        assert first.tracks[0].id == tp.track_ids[int(trie.track[node])]
        assert seen and all(seen)
        seen.clear()
        session.send("another one")
        assert seen and not any(seen)
    finally:
        cat = tp.catalog
        tp.close()
        cat.close()


def test_count_played_and_last_weights():
    """The optional per-depth weights: parsed, round-tripped (also in the cold part), refused when their
    length differs from alpha's, and added to the scores only where a child has the fact."""
    from talkplay_edge.calibration import LAST, PLAYED

    cal = SpanCalibration.parse({"alpha": [1, 0.5], "beta": [0, 2], "count": [0, -0.5], "played": [0, 2.5],
                                 "last": [0, 1.0], "cold": {"alpha": [1], "beta": [0], "count": [0.25]}})
    assert cal.played == (0.0, 2.5) and cal.cold.count == (0.25,) and cal.uses_marks
    assert SpanCalibration.parse(cal.to_json()) == cal
    assert not SpanCalibration((1.0,), (1.0,)).uses_marks and "played" not in SpanCalibration((1.0,), (1.0,)).to_json()
    for bad in ({"alpha": [1, 2], "beta": [1, 1], "played": [1]}, {"alpha": [1], "beta": [1], "last": ["x"]},
                {"alpha": [1], "beta": [1], "count": [float("inf")]}):
        with pytest.raises(ValueError, match="span calibration"):
            SpanCalibration.parse(bad)
    logits, logc = np.array([1.0, 2.0, 0.5]), np.log([4.0, 1.0, 10.0])
    tracks = np.log([8.0, 2.0, 20.0])
    marks = np.array([0, PLAYED, PLAYED | LAST], dtype=np.uint8)
    raw = 2 * logits + 0.5 * logc - 0.5 * tracks + 2.5 * np.array([0, 1, 1]) + 1.0 * np.array([0, 0, 1])
    assert np.allclose(cal.scores(logits, logc, 1, log_tracks=tracks, marks=marks), raw - np.log(np.exp(raw).sum()))
    plain = 2 * logits + 0.5 * logc  # without the facts the new weights add nothing
    assert np.allclose(cal.scores(logits, logc, 1, normalise=False), plain)
    assert np.allclose(cal.scores(logits, logc, 0, log_tracks=tracks, marks=marks), logc - np.log(np.exp(logc).sum()))


def test_played_marks_mark_every_ancestor():
    from talkplay_edge.calibration import LAST, PLAYED, played_marks
    from talkplay_edge.trie import CodeTrie

    trie = CodeTrie.build([[1, 10, 100], [1, 10, 101], [1, 11, 102], [2, 12, 103]])
    index = {"a": 0, "b": 1, "c": 2, "d": 3}
    assert played_marks(trie, index, [{"role": "user", "content": "hi"}]) is None
    history = [{"role": "assistant", "content": "x", "track_ids": ["d"]},
               {"role": "assistant", "content": "y", "track_ids": ["zz", "b", "c"]}]  # unknown ids are skipped
    marks = played_marks(trie, index, history)

    def node(path):
        n = trie.root
        for tok in path:
            n = trie.child(n, tok)
        return n

    assert marks[node([1])] == PLAYED | LAST and marks[node([1, 10])] == PLAYED | LAST
    assert marks[node([1, 10, 101])] == PLAYED | LAST and marks[node([1, 10, 100])] == 0
    assert marks[node([1, 11])] == PLAYED and marks[node([2, 12])] == PLAYED
    assert marks.dtype == np.uint8 and len(marks) == trie.n_nodes


def test_the_runtime_follows_the_last_played_track(runtime_gguf, tiny_catalog):
    """With the model and the prior switched off (alpha = beta = 0) and a large ``last`` weight, the beam's
    best track is one nearest the last played track in the trie (the longest shared code prefix), and the
    runtime passes the conversation's marks to every request kind (eval's recommender here)."""
    from talkplay_edge.runtime import ModelRecommender, TalkPlay

    tp = TalkPlay.load(runtime_gguf, tiny_catalog, threads=1, n_ctx=1024,
                       span_calibration={"alpha": [0], "beta": [0], "last": [20]})
    try:
        rec = ModelRecommender(tp=tp)
        paths = {tid: tp.trie.path(i) for i, tid in enumerate(tp.track_ids)}

        def shared(a, b):
            return next((k for k, (x, y) in enumerate(zip(paths[a], paths[b])) if x != y), len(paths[a]))

        for last in tp.track_ids[::max(1, len(tp.track_ids) // 5)]:
            history = [{"role": "user", "content": "something"}, {"role": "assistant", "content": "x", "track_ids": [last]},
                       {"role": "user", "content": "another"}]
            best = rec.recommend(history, {last}, n=3)[0]
            assert shared(best, last) == max(shared(t, last) for t in tp.track_ids if t != last)
        assert tp.played_marks(history) is not None
    finally:
        cat = tp.catalog
        tp.close()
        cat.close()


def test_artist_index_finds_the_artists_a_message_names():
    """Names of two or more words match in any case; one-word names only as the catalog spells them and
    not as the first word; every credited artist of a track counts, the first is its main artist."""
    from talkplay_edge.calibration import ArtistIndex

    ix = ArtistIndex([(0, ["Billy Joel"]), (1, ["Queen"]), (2, ["Queen", "David Bowie"]), (3, ["So"]),
                      (4, ["Mos Def", "Nate Dogg"]), (5, [])])
    assert ix.named("Got any Billy Joel?") == ["billy joel"] and ix.named("got any billy  joel") == ["billy joel"]
    assert ix.named("Can you play some Queen?") == ["queen"] and ix.named("can you play some queen") == []
    assert ix.named("So, what now?") == [] and ix.named("Play some rock.") == [] and ix.named("") == []
    assert ix.named("Queen or David Bowie, and something like Nate Dogg.") == ["david bowie", "nate dogg"]
    # a name only denied is not named: "no more Billy Joel" must not bring more of his songs
    assert ix.named("No more Billy Joel, please") == [] and ix.named("skip Queen") == []
    assert ix.named("no more songs by David Bowie, some Billy Joel") == ["billy joel"]
    assert ix.named("No, play something by Billy Joel") == ["billy joel"]
    # a denial carries on through "or" / "nor" to the next name, not through other words
    assert ix.named("no more Billy Joel or Queen") == []
    assert ix.denied("no more Billy Joel or Queen") == ["billy joel", "queen"]
    assert ix.denied("not Queen nor david bowie, please") == ["david bowie", "queen"]
    assert ix.named("no more Billy Joel, some Queen") == ["queen"]
    assert ix.named("skip Queen and Billy Joel") == ["billy joel"]
    assert list(ix.tracks_of(["queen"])) == [1, 2] and list(ix.tracks_of(["nate dogg", "nobody"])) == [4]
    assert [ix.main_of(t) for t in range(7)] == ["billy joel", "queen", "queen", "so", "mos def", None, None]


def test_played_marks_mark_named_and_same_artist_tracks():
    """With an ``ArtistIndex``: bit NAMED above the tracks of an artist the latest user message names (on a
    first turn too), bit ARTIST above the tracks of the last played track's main artist."""
    from talkplay_edge.calibration import ARTIST, LAST, NAMED, PLAYED, ArtistIndex, played_marks
    from talkplay_edge.trie import CodeTrie

    trie = CodeTrie.build([[1, 10, 100], [1, 10, 101], [1, 11, 102], [2, 12, 103]])
    index = {"a": 0, "b": 1, "c": 2, "d": 3}
    artists = ArtistIndex([(0, ["Billy Joel"]), (1, ["Queen"]), (2, ["Other"]), (3, ["Queen"])])
    leaf = trie.leaf_of_track
    cold = [{"role": "user", "content": "Got any Billy Joel?"}]
    assert played_marks(trie, index, cold) is None  # without the index: nothing played, nothing marked
    marks = played_marks(trie, index, cold, artists)
    assert marks[leaf[0]] == NAMED and marks[trie.parent[leaf[0]]] == NAMED and marks[0] == NAMED
    assert marks[leaf[1]] == 0 and marks[leaf[3]] == 0
    assert played_marks(trie, index, [{"role": "user", "content": "anything"}], artists) is None
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x", "track_ids": ["b"]},
               {"role": "user", "content": "more from them"}]
    marks = played_marks(trie, index, history, artists)
    assert marks[leaf[1]] == PLAYED | LAST and marks[leaf[3]] == ARTIST  # b is played: not one to offer
    assert played_marks(trie, index, history, artists, unplayed_only=False)[leaf[1]] == PLAYED | LAST | ARTIST
    assert marks[leaf[0]] == 0 and marks[leaf[2]] == 0 and marks[trie.parent[leaf[3]]] == ARTIST


def test_named_and_artist_weights_score_their_marks():
    from talkplay_edge.calibration import ARTIST, NAMED, PLAYED

    cal = SpanCalibration.parse({"alpha": [0], "beta": [1], "named": [3.0], "artist": [-1.5],
                                 "cold": {"alpha": [0], "beta": [1], "named": [2.0]}})
    assert cal.uses_marks and cal.uses_artists and cal.cold.named == (2.0,)
    assert SpanCalibration.parse(cal.to_json()) == cal
    assert not SpanCalibration.parse({"alpha": [0], "beta": [1], "played": [1]}).uses_artists
    logits = np.array([0.0, 1.0, 2.0, 0.5])
    marks = np.array([NAMED, ARTIST, NAMED | ARTIST | PLAYED, 0], dtype=np.uint8)
    want = logits + 3.0 * np.array([1, 0, 1, 0]) - 1.5 * np.array([0, 1, 1, 0])
    assert np.allclose(cal.scores(logits, np.zeros(4), 0, normalise=False, marks=marks), want)


def test_the_runtime_plays_the_artist_a_request_names(runtime_gguf, tiny_catalog):
    """With the model and the prior switched off and a large ``named`` weight, a request naming an artist
    gets one of that artist's tracks (an artist the unweighted pick is not by), from eval's recommender and
    from a chat message alike (the mark reads the message being answered)."""
    from talkplay_edge.runtime import ModelRecommender, TalkPlay

    def picks(named: float, message: str) -> tuple[str, str]:
        """(eval's recommender's track, a chat session's track) for a first message."""
        tp = TalkPlay.load(runtime_gguf, tiny_catalog, threads=1, n_ctx=1024,
                           span_calibration={"alpha": [0], "beta": [0], "named": [named]})
        try:
            ranked = ModelRecommender(tp=tp).recommend([{"role": "user", "content": message}], set(), n=1)[0]
            return ranked, tp.chat(max_new_tokens=4).send(message).tracks[0].id
        finally:
            cat = tp.catalog
            tp.close()
            cat.close()

    from talkplay_edge.catalog import Catalog

    with Catalog.open(tiny_catalog) as cat:
        by = {t.id: t.artist for t in cat.tracks()}
    default = {by[t] for t in picks(0.0, "Got anything?")}  # eval's beam and chat's greedy may break ties apart
    artist = next(a for a in sorted(set(by.values())) if a not in default)
    assert {by[t] for t in picks(0.0, f"Got any {artist}?")} == default  # the weight, not the words, does it
    assert [by[t] for t in picks(20.0, f"Got any {artist}?")] == [artist, artist]
