"""Fuzzed chat input through the Python API (hypothesis): nothing but the documented errors escapes,
and every recommendation is a real catalog track, never repeated in a session.

The number of generated inputs is ``TALKPLAY_FUZZ_EXAMPLES`` (default 10,000; the figure in the README's
Reliability table). Generation is derandomised, so a CI failure reproduces locally.
"""

from __future__ import annotations

import os

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest_runtime import check_turn  # noqa: E402

from talkplay_edge import chat_format as cf  # noqa: E402

EXAMPLES = int(os.environ.get("TALKPLAY_FUZZ_EXAMPLES", "10000"))
MARKERS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|music_start|>", "<|music_end|>", "<|cf_0001|>",
           "<|tag_none|>", "<|dup_063|>", "<|im_start|>assistant\n", "<|im_start|>system\nYou are", "<s>", "</s>",
           "[INST]", "{{", "}}", "{% for %}", "\\n", "\x00", "\x1b[2J", "\u202e", "\ufeff", "\ud800", "\udfff",
           "\U0001f3b5", "' OR 1=1; --", "../../etc/passwd"]


def _texts():
    chars = st.characters(codec=None, blacklist_categories=())  # every code point, lone surrogates included
    piece = st.one_of(st.text(chars, max_size=40), st.sampled_from(MARKERS),
                      st.text(st.sampled_from(" \t\r\n\x0b\x0c\x85\u2028\u3000"), max_size=20))
    return st.one_of(
        st.lists(piece, max_size=8).map("".join),
        st.sampled_from(["", " ", "\n\n\t", "\x00" * 50, "a" * 100_000, "<|cf_0001|>" * 5_000,
                         "<|im_start|>" * 3000, "\ud800" * 1000, "🎵" * 30_000]),
        st.builds(lambda s, k: s * k, st.text(chars, min_size=1, max_size=5), st.integers(1, 20_000)),
    )


@pytest.fixture(scope="module")
def fuzz_tp(runtime_gguf, tiny_catalog):
    """Its own small-context model (n_ctx 384): long messages are cut to fit and old turns are dropped
    often, so the fuzz also exercises context compaction."""
    from talkplay_edge.runtime import TalkPlay

    tp = TalkPlay.load(runtime_gguf, tiny_catalog, threads=1, n_ctx=384)
    yield tp
    cat = tp.catalog
    tp.close()
    cat.close()


@pytest.fixture(scope="module")
def fuzz_session(fuzz_tp):
    return fuzz_tp.chat(max_new_tokens=1, temperature=0.8, seed=0)


def test_fuzzed_messages(fuzz_tp, fuzz_session):
    tp = fuzz_tp
    catalog_ids = set(tp.catalog.codes())
    stats = {"n": 0, "empty": 0, "tracks": 0}
    seen: set[str] = set()

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(_texts())
    def check(message):
        nonlocal seen
        stats["n"] += 1
        try:
            reply = fuzz_session.send(message)
        except cf.EmptyMessageError:
            assert not message.replace("\x00", "").strip(), repr(message[:80])
            stats["empty"] += 1
            return
        assert isinstance(reply.text, str)
        reply.text.encode("utf-8")  # always valid text (no lone surrogates)
        if check_turn(reply, catalog_ids, seen):
            fuzz_session.reset()
            seen = set()
            return
        stats["tracks"] += 1

    check()
    print(f"fuzzed {stats['n']} messages: {stats['empty']} empty (EmptyMessageError), {stats['tracks']} tracks")
    assert stats["n"] >= EXAMPLES * 0.95 and stats["tracks"] > stats["n"] // 2


@pytest.mark.parametrize("bad", [None, 42, b"bytes", ["list"]])
def test_non_text_is_a_type_error(fuzz_session, bad):
    with pytest.raises(TypeError):
        fuzz_session.send(bad)


def test_a_prompt_longer_than_the_batch_with_a_small_context(fuzz_tp):
    """Found by this fuzz: llama.cpp lowers n_batch to the requested n_ctx (384 < 512), and a prompt chunk
    longer than that aborted the process (GGML_ASSERT(n_tokens_all <= cparams.n_batch))."""
    assert fuzz_tp.n_batch <= 384
    reply = fuzz_tp.chat(max_new_tokens=1).send("\U0001f3b5" * 30_000)
    assert len(reply.tracks) == 1
