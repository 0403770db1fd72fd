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
from pathlib import Path

JOURNAL_FORMAT = "talkplay eval journal 1"


class JournalError(ValueError):
    """A journal that cannot be used: another run's, unreadable, or in the way of a new run."""


def journal_path(ranks_path) -> Path:
    """Where the journal of a run writing ``ranks_path`` lives: next to it, ``.partial`` added."""
    p = Path(ranks_path)
    return p.with_name(p.name + ".partial")


def run_key(system: str, conversations: list[dict], first_index: int, max_turn: int | None, seed: int,
            vocab_fingerprint: str, catalog: Path | None = None, model: Path | None = None,
            only: set[tuple[str, int]] | None = None, ask_head: Path | None = None) -> dict:
    """What identifies a run: a journal is only resumed by a run with the same key. ``catalog`` and ``model``:
    the files scored with (their path, size and modification time are part of the key; `talkplay index`
    changes a user catalog, a rebuild changes a model; ``ask_head``, the model's ask head, likewise);
    ``only``: the turns scored (`--only-turns`). Threads and jobs are not: they may change."""
    digest = hashlib.sha256()
    for conv in conversations:
        digest.update(json.dumps(conv, sort_keys=True).encode("utf-8"))
        digest.update(b"\n")
    key = {"format": JOURNAL_FORMAT, "system": system, "conversations": len(conversations),
           "first_index": first_index, "conversations_sha256": digest.hexdigest(), "max_turn": max_turn,
           "seed": seed, "vocab_fingerprint": vocab_fingerprint, "catalog": _file_identity(catalog),
           "model": _file_identity(model)}
    if ask_head is not None:
        key["ask_head"] = _file_identity(ask_head)
    if only is not None:
        key["only_turns_sha256"] = hashlib.sha256(json.dumps(sorted(only)).encode("utf-8")).hexdigest()
    return key


def _file_identity(path: Path | None) -> str | None:
    if path is None:
        return None
    st = Path(path).stat()
    return f"{Path(path).resolve()} ({st.st_size} bytes, modified {st.st_mtime_ns})"


def _is_row(row) -> bool:
    return (isinstance(row, dict) and isinstance(row.get("conversation"), str) and isinstance(row.get("turn"), int)
            and (row.get("rank") is None or isinstance(row.get("rank"), int)))


def _is_record(obj) -> bool:
    return (isinstance(obj, dict) and isinstance(obj.get("index"), int) and isinstance(obj.get("rows"), list)
            and all(_is_row(row) for row in obj["rows"])
            and all(isinstance(obj.get(k), int) for k in ("skipped_unknown_target", "skipped_target_played",
                                                           "unknown_ids_returned")))


def parse_journal(data: bytes, path) -> tuple[dict | None, dict[int, dict], int]:
    """(key or None when ``data`` is empty, {conversation index: record}, the length of the intact part).
    A last line cut short (the run was killed while writing it) is left out of both; any other damage is a
    ``JournalError``. Lines are written as ASCII JSON, so only "\\n" ends one."""
    lines = data.split(b"\n")
    lines.pop()  # "" after the last newline, or the line being written when the run stopped
    if not lines and data and not data.startswith(b'{"format": "' + JOURNAL_FORMAT.encode()):
        raise JournalError(f"{path}: not a journal of `talkplay eval --ranks`; delete it to start over")
    if not lines:
        return None, {}, 0
    try:
        key = json.loads(lines[0])
    except (ValueError, UnicodeDecodeError):
        key = None
    if not isinstance(key, dict) or key.get("format") != JOURNAL_FORMAT:
        raise JournalError(f"{path}: not a journal of `talkplay eval --ranks`; delete it to start over")
    records: dict[int, dict] = {}
    for n, line in enumerate(lines[1:], 2):
        try:
            rec = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            raise JournalError(f"{path} line {n}: damaged; delete the file to start over") from None
        if not _is_record(rec):
            raise JournalError(f"{path} line {n}: not a conversation record; delete the file to start over")
        records[rec["index"]] = rec
    return key, records, sum(len(line) + 1 for line in lines)


def read_journal(path) -> tuple[dict, dict[int, dict]]:
    """(key, {conversation index: record}) of a journal file (see ``parse_journal``)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise JournalError(f"{path}: cannot read ({e})") from e
    key, records, _ = parse_journal(data, path)
    if key is None:
        raise JournalError(f"{path}: empty")
    return key, records


def _lock(f, path: Path) -> None:
    """An exclusive lock for this run's lifetime (POSIX): two runs never write one journal."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        return
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise JournalError(f"{path}: another `talkplay eval` is writing this journal (the same --ranks)") from None


class Journal:
    """Appends conversation records to a journal file, one flushed line each."""

    def __init__(self, path: Path, key: dict, done: dict[int, dict], f):
        self.path = path
        self.key = key
        self.done = done  # index -> record, from an earlier run (``--resume``)
        self.added = 0
        self._f = f

    @classmethod
    def open(cls, ranks_path, key: dict, resume: bool = False) -> "Journal":
        """The journal of a run writing ``ranks_path``. An existing journal is continued with ``resume`` (if
        it is this run's: same key) and refused otherwise, so an unfinished run is never overwritten."""
        path = journal_path(ranks_path)
        try:
            f = path.open("a+b")  # created if missing; nothing in it is changed before the checks pass
        except OSError as e:
            raise JournalError(f"{path}: cannot write ({e})") from e
        try:
            _lock(f, path)
            f.seek(0)
            old_key, done, intact = parse_journal(f.read(), path)
            if done and not resume:
                raise JournalError(f"{path} holds {len(done)} finished conversation(s) of an unfinished run: add "
                                   "--resume to continue it, or delete it to start over")
            if done:
                differ = [k for k in sorted(set(key) | set(old_key)) if key.get(k) != old_key.get(k)]
                if differ:
                    raise JournalError(f"{path} is the journal of another run (it differs in {', '.join(differ)}); "
                                       "run with the same options, or delete it to start over")
                lo, hi = key["first_index"], key["first_index"] + key["conversations"]
                if any(not lo <= i < hi for i in done):
                    raise JournalError(f"{path}: a record's conversation index lies outside this run; delete it")
                f.truncate(intact)  # drop a line cut short, so the next one starts on its own line
            else:  # new, or a run that stopped before its first conversation: nothing to keep
                f.truncate(0)
            journal = cls(path, key, done, f)
            if not done:
                journal._write(key)
        except JournalError:
            f.close()
            raise
        except OSError as e:
            f.close()
            raise JournalError(f"{path}: cannot write ({e})") from e
        return journal

    def _write(self, obj: dict) -> None:
        self._f.write((json.dumps(obj) + "\n").encode("ascii"))  # ASCII: no character of a record ends a line
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
        self.path.unlink(missing_ok=True)
        self.close()

    def __len__(self) -> int:
        return len(self.done) + self.added
