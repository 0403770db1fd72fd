"""The chat format, shared by training and the runtime: ONE definition, so both see the same tokens.

It is SmolLM2-Instruct's ChatML template, with no BOS token::

    <|im_start|>system\\n{system}<|im_end|>\\n
    <|im_start|>user\\n{user message}<|im_end|>\\n
    <|im_start|>assistant\\n{assistant turn}<|im_end|>\\n
    ...
    <|im_start|>assistant\\n            <- generation prompt; the model writes the turn and <|im_end|>

An assistant turn that recommends a track is, exactly (``assistant_turn_text``)::

    <|music_start|><|cf_0412|><|tag_0077|><|meta_0931|><|lyr_none|><|aud_0150|><|music_end|> "Title" by Artist (1998).\\n{reply}

i.e. the music span first (five modality tokens, an optional ``<|dup_NNN|>``, the end marker), then the
*track context* ``render_track_context(track)`` — a space, the title in ASCII double quotes, `` by ``, the
artist, `` (year)`` when the year is known, a full stop and a newline — then the reply text. The model
generates the span; the runtime, not the model, writes the track context (the real catalog title, artist
and year) right after ``<|music_end|>``, and the model continues with the reply, grounded in that song. In
training the context tokens are part of the target like any other (the model sees them; whether the loss
covers them is the trainer's choice, they are fixed at inference). A turn without a track is just the reply.
One span per turn: when the runtime ranks several tracks (``send(n=5)``), only the best is written into the
turn. The runtime always closes a turn with ``<|im_end|>\n``, also when generation stopped at the length
limit. The default system prompt is ``DEFAULT_SYSTEM``; training should use it (or pass the same one).

Text normalisation: user messages and reply texts are stripped of surrounding whitespace (so the template's
``\\n`` is never merged with text whitespace by the BPE pre-tokenizer) and an empty user message is an
error.

Tokenization: template markers and music spans are special tokens; *user text is plain text*, so a user
typing ``<|im_start|>`` or ``<|cf_0001|>`` gets those characters, not the tokens. ``prompt_segments`` returns
the prompt as ``(text, special)`` pieces: tokenize a piece with special-token parsing iff ``special`` is
True (llama.cpp: ``tokenize(text, add_bos=False, special=special)``; HF: ``tokenizer(text,
add_special_tokens=False, split_special_tokens=not special)``) and concatenate. Because every piece
boundary is a special token or a newline followed by stripped text, this equals tokenizing the rendered
string (``build_prompt``) when the user text spells no special token. The runtime keeps the generated
assistant token ids as they are rather than re-tokenizing its own turns.
"""

from __future__ import annotations

import re

from typing import Iterable, Mapping

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ROLES = ("system", "user", "assistant")

DEFAULT_SYSTEM = ("You are TalkPlay, a music recommendation assistant. When the user asks for music, answer with "
                  "one track from the catalog, then a short reply about it.")


class EmptyMessageError(ValueError):
    """A user message that is empty (or only whitespace)."""


def render_track_context(track) -> str:
    """Text the runtime inserts right after ``<|music_end|>``: `` "Title" by Artist (1998).\\n``.

    ``track`` is a ``catalog.Track`` (or anything with ``title``, ``artist`` and ``year``)."""
    title = " ".join(str(track.title or "").split()) or "Untitled"
    artist = " ".join(str(track.artist or "").split()) or "Unknown artist"
    year = f" ({int(track.year)})" if getattr(track, "year", None) else ""
    return f' "{title}" by {artist}{year}.\n'


def assistant_turn_text(track_span: str | None, track, reply: str) -> str:
    """The full assistant turn: music span, track context, reply (just the reply without a track)."""
    reply = reply.strip()
    if not track_span:
        return reply
    return track_span + render_track_context(track) + reply


_SURROGATES = re.compile("[\ud800-\udfff]")


def normalize_message(text: str) -> str:
    """Strip a user message; an empty one is refused (ValueError). Lone surrogates (not encodable text,
    e.g. from a broken UTF-16 source) become U+FFFD; NUL characters are dropped."""
    if not isinstance(text, str):
        raise TypeError("a message is a str")
    text = _SURROGATES.sub("\ufffd", text).replace("\x00", "").strip()
    if not text:
        raise EmptyMessageError("empty message: type a request")
    return text


def turn_segments(role: str, content: str, *, content_special: bool) -> list[tuple[str, bool]]:
    """One ``<|im_start|>role\\ncontent<|im_end|>\\n`` block as (text, special) pieces."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}")
    return [(IM_START, True), (f"{role}\n", False), (content, content_special), (IM_END, True), ("\n", False)]


def generation_prompt_segments() -> list[tuple[str, bool]]:
    return [(IM_START, True), ("assistant\n", False)]


def prompt_segments(system: str | None, history: Iterable[Mapping[str, str]],
                    add_generation_prompt: bool = True) -> list[tuple[str, bool]]:
    """The prompt as (text, special) pieces. ``history``: dicts with ``role`` (user/assistant) and ``content``
    (assistant content already in ``assistant_turn_text`` form, so its spans are special tokens; user
    content is plain text)."""
    segs = turn_segments("system", (system if system is not None else DEFAULT_SYSTEM).strip(), content_special=False)
    for turn in history:
        role = turn["role"]
        if role == "user":
            segs += turn_segments("user", normalize_message(turn["content"]), content_special=False)
        elif role == "assistant":
            segs += turn_segments("assistant", turn["content"], content_special=True)  # as given, not stripped
        else:
            raise ValueError(f"unknown role {role!r} in history")
    if add_generation_prompt:
        segs += generation_prompt_segments()
    return segs


def build_prompt(system: str | None, history: Iterable[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
    """The prompt as one string (SmolLM2's chat template)."""
    return "".join(text for text, _ in prompt_segments(system, history, add_generation_prompt))


def training_segments(conversation: Mapping, catalog, system: str | None = None) -> list[tuple[str, bool, bool]]:
    """A conversation (the JSONL format) as ``(text, special, is_target)`` pieces for supervised training.

    Built from the same pieces as the runtime's prompt: each assistant turn is ``assistant_turn_text`` of
    its first acceptable track (music span from the catalog, track context, reply); the loss covers the
    assistant turn and its ``<|im_end|>`` (``is_target``), nothing of the system or user turns.
    """
    out: list[tuple[str, bool, bool]] = [(t, sp, False) for t, sp in
                                         turn_segments("system", (system if system is not None else DEFAULT_SYSTEM).strip(),
                                                       content_special=False)]
    for turn in conversation["turns"]:
        if turn["role"] == "user":
            out += [(t, sp, False) for t, sp in turn_segments("user", normalize_message(turn["content"]), content_special=False)]
            continue
        ids = turn.get("track_ids") or []
        track = catalog.get(ids[0]) if ids else None
        content = assistant_turn_text(catalog.span(track.id) if track else None, track, turn["content"])
        pieces = turn_segments("assistant", content, content_special=True)
        # <|im_start|>, "assistant\n" are given; the content and <|im_end|> are what the model must produce
        out += [(t, sp, i in (2, 3)) for i, (t, sp) in enumerate(pieces)]
    return out
