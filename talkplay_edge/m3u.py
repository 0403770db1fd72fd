"""Reading .m3u / .m3u8 playlists found in a user's music folder (for the cf modality of local files).

    entries = read_m3u("~/Music/road trip.m3u8")
    [(e.path, e.artist, e.title) for e in entries]

Each non-comment line is one entry: a path relative to the playlist's folder, an absolute path, a
``file://`` URI (percent-decoded), or a URL (``http://``… : kept as an entry without a path, never
fetched). An ``#EXTINF:<seconds>,<artist> - <title>`` line just before it gives the entry's artist and
title, so an entry can be matched to a catalog track even when its file is not in the folder.

Nothing an entry names is opened or followed: paths are normalised as strings (``os.path.normpath``),
so a playlist cannot make the indexer read a file. ``.m3u8`` is UTF-8; ``.m3u`` is read as UTF-8 when it
decodes, else Latin-1 (the traditional encoding). A playlist that cannot be read raises ``OSError``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

PLAYLIST_EXTENSIONS = frozenset({".m3u", ".m3u8"})
MAX_PLAYLIST_BYTES = 16 * 1024 * 1024  # a bigger "playlist" is not one: refused
_EXTINF = re.compile(r"#EXTINF\s*:\s*-?[\d.]+\s*(?:[^,]*?),(.*)$", re.I)


@dataclass(frozen=True)
class PlaylistEntry:
    """One playlist line: ``path`` (absolute, normalised; None for a URL) and the #EXTINF artist/title."""

    path: str | None
    artist: str | None = None
    title: str | None = None


def _decode(data: bytes, suffix: str) -> str:
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if suffix == ".m3u8":
        return data.decode("utf-8", errors="replace")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _entry_path(line: str, folder: str) -> str | None:
    if re.match(r"^[a-z][a-z0-9+.-]*://", line, re.I):
        parts = urlsplit(line)
        if parts.scheme.lower() != "file":
            return None
        line = unquote(parts.path)
    line = line.replace("\\", "/") if os.sep == "/" else line
    return os.path.normpath(os.path.join(folder, os.path.expanduser(line)))


def parse_extinf(line: str) -> tuple[str | None, str | None]:
    """(artist, title) of an ``#EXTINF`` line ("Artist - Title"; without " - " the whole text is the title)."""
    m = _EXTINF.match(line.strip())
    if not m:
        return None, None
    text = m.group(1).strip()
    if " - " in text:
        artist, title = text.split(" - ", 1)
        return artist.strip() or None, title.strip() or None
    return None, text or None


def read_m3u(path: str | Path) -> list[PlaylistEntry]:
    """The entries of one playlist file, in order."""
    path = Path(path)
    with open(path, "rb") as f:
        data = f.read(MAX_PLAYLIST_BYTES + 1)
    if len(data) > MAX_PLAYLIST_BYTES:
        raise OSError(f"{path}: larger than {MAX_PLAYLIST_BYTES // (1024 * 1024)} MB, not read as a playlist")
    folder = str(path.parent)
    entries: list[PlaylistEntry] = []
    artist = title = None
    for raw in _decode(data, path.suffix.lower()).splitlines():
        line = raw.strip().replace("\x00", "")
        if not line:
            continue
        if line.startswith("#"):
            if line.upper().startswith("#EXTINF"):
                artist, title = parse_extinf(line)
            continue
        entries.append(PlaylistEntry(_entry_path(line, folder), artist, title))
        artist = title = None
    return entries
