"""The journal of a running `talkplay eval --ranks F`: every finished conversation is appended to
``F.partial`` as it ends, so a run that is stopped (Ctrl-C, a crash, a closed laptop) keeps what it did and
``--resume`` scores only the rest. A finished run writes F and removes the journal.

Format: JSON lines. The first line is the run's key (what must match to resume: the system, a hash of the
conversations scored, the turn limit, the seed, the catalog's vocabulary fingerprint); every other line is one
conversation's record as ``evaluate.score_conversation`` returns it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

JOURNAL_FORMAT = "talkplay eval journal 1"


class JournalError(ValueError):
    """A journal that cannot be used: another run's, unreadable, or in the way of a new run."""


def journal_path(ranks_path) -> Path:
    """Where the journal of a run writing ``ranks_path`` lives: next to it, ``.partial`` added."""
    p = Path(ranks_path)
    return p.with_name(p.name + ".partial")


def run_key(system: str, conversations: list[dict], first_index: int, max_turn: int | None, seed: int,
            vocab_fingerprint: str, model: Path | None = None) -> dict:
    """What identifies a run: a journal is only resumed by a run with the same key. ``model``: the GGUF file
    a model system scores (its path, size and modification time are part of the key)."""
    digest = hashlib.sha256()
    for conv in conversations:
        digest.update(json.dumps(conv, sort_keys=True, ensure_ascii=False).encode("utf-8"))
        digest.update(b"\n")
    return {"format": JOURNAL_FORMAT, "system": system, "conversations": len(conversations),
            "first_index": first_index, "conversations_sha256": digest.hexdigest(), "max_turn": max_turn,
            "seed": seed, "vocab_fingerprint": vocab_fingerprint, "model": _file_identity(model)}


def _file_identity(path: Path | None) -> str | None:
    if path is None:
        return None
    st = Path(path).stat()
    return f"{Path(path).resolve()} ({st.st_size} bytes, modified {st.st_mtime_ns})"


def _is_record(obj) -> bool:
    return (isinstance(obj, dict) and isinstance(obj.get("index"), int) and isinstance(obj.get("rows"), list)
            and all(isinstance(obj.get(k), int) for k in ("skipped_unknown_target", "skipped_target_played",
                                                           "unknown_ids_returned")))


def read_journal(path) -> tuple[dict, dict[int, dict]]:
    """(key, {conversation index: record}). A last line cut short (the run was killed while writing it) is
    left out; any other damage is a ``JournalError``."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise JournalError(f"{path}: cannot read ({e})") from e
    try:
        key = json.loads(lines[0]) if lines else None
    except json.JSONDecodeError:
        key = None
    if not isinstance(key, dict) or key.get("format") != JOURNAL_FORMAT:
        raise JournalError(f"{path}: not a journal of `talkplay eval --ranks`; delete it to start over")
    records: dict[int, dict] = {}
    for n, line in enumerate(lines[1:], 2):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):  # the line being written when the run stopped
                break
            raise JournalError(f"{path} line {n}: damaged; delete the file to start over") from None
        if not _is_record(rec):
            raise JournalError(f"{path} line {n}: not a conversation record; delete the file to start over")
        records[rec["index"]] = rec
    return key, records


class Journal:
    """Appends conversation records to a journal file, one flushed line each."""

    def __init__(self, path: Path, key: dict, done: dict[int, dict]):
        self.path = path
        self.key = key
        self.done = done  # index -> record, from an earlier run (``--resume``)
        self.added = 0
        self._f = None

    @classmethod
    def open(cls, ranks_path, key: dict, resume: bool = False) -> "Journal":
        """The journal of a run writing ``ranks_path``. An existing journal is continued with ``resume`` (if
        it is this run's: same key) and refused otherwise, so an unfinished run is never overwritten."""
        path = journal_path(ranks_path)
        done: dict[int, dict] = {}
        if path.exists() and path.stat().st_size > 0:
            old_key, done = read_journal(path)
            if not done:  # a run that stopped before its first conversation: nothing to keep
                old_key = key
            elif not resume:
                raise JournalError(f"{path} holds {len(done)} finished conversation(s) of an unfinished run: add "
                                   "--resume to continue it, or delete it to start over")
            differ = [k for k in sorted(set(key) | set(old_key)) if key.get(k) != old_key.get(k)]
            if differ:
                raise JournalError(f"{path} is the journal of another run (it differs in {', '.join(differ)}); "
                                   "run with the same options, or delete it to start over")
            lo, hi = key["first_index"], key["first_index"] + key["conversations"]
            if any(not lo <= i < hi for i in done):
                raise JournalError(f"{path}: a record's conversation index lies outside this run; delete it")
        journal = cls(path, key, done)
        try:  # (re)written whole: a line cut short at the end must not run into the next one
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(json.dumps(obj, ensure_ascii=False) + "\n" for obj in [key, *done.values()]),
                           encoding="utf-8")
            os.replace(tmp, path)
            journal._f = path.open("a", encoding="utf-8")
        except OSError as e:
            raise JournalError(f"{path}: cannot write ({e})") from e
        return journal

    def _write(self, obj: dict) -> None:
        self._f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self._f.flush()

    def add(self, record: dict) -> None:
        """Record one finished conversation."""
        self._write(record)
        self.added += 1

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def finish(self) -> None:
        """The run is complete and its ranks file written: the journal goes."""
        self.close()
        self.path.unlink(missing_ok=True)

    def __len__(self) -> int:
        return len(self.done) + self.added
