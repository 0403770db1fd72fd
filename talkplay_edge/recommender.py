"""The interface every recommender implements, so baselines and the model plug into `talkplay eval` alike.

A conversation is the JSONL shape documented in README ("Conversation format")::

    {"id": str, "turns": [{"role": "user", "content": str},
                          {"role": "assistant", "content": str, "track_ids": [str, ...]}, ...]}

``recommend(history, exclude, n)`` gets the turns so far, ending with the user turn to answer (earlier
assistant turns carry their ground-truth ``track_ids``), and returns up to ``n`` track ids, best first,
none of them in ``exclude`` (the tracks already played in the conversation).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Recommender(Protocol):
    name: str

    def recommend(self, history: list[dict], exclude: set[str], n: int = 100) -> list[str]:
        ...
