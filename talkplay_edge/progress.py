"""Progress bars on stderr when tqdm is available (it comes with tokenizers), silent otherwise."""

from __future__ import annotations

import os
import sys


def progress(iterable=None, desc: str = "", total: int | None = None, leave: bool = True, unit: str = "it"):
    """``tqdm(iterable)`` when stderr is a terminal or TALKPLAY_PROGRESS=1; the plain iterable otherwise."""
    enabled = os.environ.get("TALKPLAY_PROGRESS", "1" if sys.stderr.isatty() else "0") == "1"
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(iterable, desc=desc, total=total, leave=leave, unit=unit, dynamic_ncols=True)
        except ImportError:
            pass
    return _Quiet(iterable)


class _Quiet:
    """A stand-in with tqdm's small API (update/close/set_postfix) that prints nothing."""

    def __init__(self, iterable):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n=1):
        pass

    def set_postfix(self, *a, **k):
        pass

    def close(self):
        pass
