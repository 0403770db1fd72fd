"""``talkplay index``: add the user's own music files to a catalog, so the model can recommend them.

    summary = index_folder("~/Music")                 # the user catalog (created on first use)
    summary = index_folder(folder, "my-catalog.db")   # any catalog file (never the shipped one)

What happens to each audio file under the folder
------------------------------------------------
1. **Walk.** Every regular file with an audio extension (``AUDIO_EXTENSIONS``) under the root, in
   sorted order. Symlinks are followed only while their target stays inside the root; a directory or
   file reached twice (a symlink loop, or a second link to the same file) is visited once.
2. **Incremental.** The ``local_files`` table (created in the catalog) remembers every file seen:
   ``path`` (absolute, resolved), ``root``, ``relpath``, ``mtime_ns``, ``size``, ``track_id``,
   ``status`` (``ok`` / ``failed``), ``error``, ``indexed_at``. A file whose mtime and size are unchanged
   is skipped (also one that failed before: it is retried only when it changes), whichever root it was
   indexed from, so indexing a subfolder or a parent folder later never adds a second track for a file.
   A changed file is re-indexed in place (it keeps its track id); a recorded file under the root that no
   longer exists loses its track.
3. **Tags** (mutagen): title, artist, album, year (date), genre, embedded lyrics (ID3 ``USLT``,
   Vorbis/FLAC ``LYRICS``/``UNSYNCEDLYRICS``, MP4 ``©lyr``, ASF ``WM/Lyrics``, APE ``Lyrics``).
   Without a title tag the file name (underscores as spaces) is the title; without an artist tag the
   stored artist is ``UNKNOWN_ARTIST`` and the metadata text leaves the artist out.
4. **Audio** (``audio.analyze_file``): the 11 audio features, stored in ``tracks`` with
   ``features_provenance = 'estimated'``, and the musicnn top tags. A file that cannot be decoded is a
   *failed* file: one warning line, recorded in ``local_files``, and the run goes on (so does any other
   error raised while reading one file).
5. **Five modalities** exactly as the catalog builder computes them (``music_tokenizer.embed_modalities``
   then ``assign_clusters`` with the catalog's stored codebooks):

   - metadata: ``metadata_text`` of title/artist/album/year (MiniLM);
   - tags: the file's genre tag(s); without any, the musicnn tags with posterior ≥ ``MIN_TAG_PROB``
     (at most 5, at least the top one) — they are stored as the track's ``genres``;
   - lyrics: the embedded lyrics (``encode_long``), else none;
   - audio: the estimated features, standardised with the codebook's stored mean/std;
   - cf, in this order: (a) a file listed in an ``.m3u``/``.m3u8`` playlist under an indexed root
     takes the cf cluster nearest the mean item2vec vector of its playlist neighbours that have one
     (local files or ``#EXTINF`` artist/title entries whose catalog twin is in the catalog's
     playlists) — ``update_playlist_cf``, run at the end of every index run, playlists recorded in
     ``local_playlists``; (b) else the cf cluster of its *catalog twin*, the catalog track with the
     same normalised title + artist (``sources.norm_name``; the most popular such track); (c) else none.
6. **Code.** The five clusters; when another track already has them, the smallest free collision
   number among the vocabulary's dup tokens (``DUP_RESERVE`` = 64 are always there); a file whose
   five-token code already has every dup number taken fails with that reason.
7. **Write**, per batch of ``batch_size`` files in one transaction (``tracks``, FTS via the catalog's
   triggers, ``codes``, ``local_files``): a run that is killed loses at most the batch in flight and
   the next run resumes where it stopped. A new file's track id is ``"local:" + sha1(its path relative
   to the indexed root)`` (``sha1`` of the absolute resolved path instead if another file already has
   that id, e.g. the same relative path under another root); ``source`` is ``local``, ``path`` the
   absolute resolved path.

The vocabulary (tokens) and codebooks are never written: the vocabulary fingerprint is recomputed at
the start and the end of a run and an ``AssertionError`` is raised if it differs, so an existing
model keeps working with the grown catalog. The shipped ``catalog.db`` is never modified: the default
target is the user catalog ``paths.user_catalog_path()``, created as a copy of the embedded one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .catalog import TRACK_COLUMNS, Catalog, CatalogError, track_code
from .conversations import lyrics_theme
from .paths import embedded_catalog_path, user_catalog_path
from .sources import norm_name
from .tokens import MODALITIES, NONE, fingerprint

AUDIO_EXTENSIONS = frozenset({".mp3", ".flac", ".ogg", ".oga", ".opus", ".wav", ".m4a", ".mp4", ".aac",
                              ".aif", ".aiff", ".wma", ".wv", ".ape"})
UNKNOWN_ARTIST = "Unknown artist"
MIN_TAG_PROB = 0.1
DEFAULT_BATCH = 8

LOCAL_FILES_SCHEMA = """
create table if not exists local_files (
    path text primary key,      -- absolute, resolved
    root text not null,         -- the indexed folder (resolved)
    relpath text not null,      -- path relative to root (POSIX)
    mtime_ns integer not null,
    size integer not null,
    track_id text,              -- null when status = 'failed'
    status text not null,       -- 'ok' or 'failed'
    error text,
    indexed_at real not null
);
create index if not exists local_files_root on local_files(root);
create index if not exists local_files_track on local_files(track_id);
"""

LOCAL_PLAYLISTS_SCHEMA = """
create table if not exists local_playlists (
    path text primary key,      -- absolute, resolved .m3u / .m3u8 file
    root text not null,
    relpath text not null,
    indexed_at real not null
);
"""


class IndexingError(Exception):
    """The run cannot start (bad folder, catalog, or an encoder that does not fit the catalog)."""


@dataclass
class IndexSummary:
    """What ``index_folder`` did. ``failures``: [(path, reason)] of this run's failed files."""

    root: str
    catalog: str
    files_seen: int = 0
    indexed: int = 0          # new or changed files added (their tracks written)
    skipped: int = 0          # unchanged since the last run (including files that failed before)
    failed: int = 0           # could not be indexed this run (decode errors, no free dup token)
    removed: int = 0          # files gone from the root: their tracks were deleted
    playlists: int = 0        # .m3u/.m3u8 files found under the root
    cf_from_playlists: int = 0  # local tracks (any root) whose cf code comes from a playlist
    failures: list[tuple[str, str]] = field(default_factory=list)
    local_tracks: int = 0     # tracks with a path in the catalog after the run
    catalog_tracks: int = 0
    vocab_fingerprint: str = ""
    created_catalog: bool = False
    elapsed_s: float = 0.0

    @property
    def files_per_s(self) -> float:
        return (self.indexed + self.failed) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["failures"] = [{"path": p, "reason": r} for p, r in self.failures]
        d["files_per_s"] = round(self.files_per_s, 3)
        d["elapsed_s"] = round(self.elapsed_s, 3)
        return d


# ------------------------------------------------------------------------------------------------------
# catalog file handling


def ensure_catalog(catalog_path: str | Path | None = None, source: str | Path | None = None) -> tuple[Path, bool]:
    """The catalog to write (default: the user catalog), created as a copy of ``source`` (default: the
    embedded catalog) when missing. Returns (path, created). Refuses to target the embedded file."""
    target = Path(catalog_path).expanduser() if catalog_path else user_catalog_path()
    embedded = embedded_catalog_path()
    if embedded.exists() and target.exists() and target.resolve() == embedded.resolve():
        raise IndexingError(f"{target}: refusing to modify the shipped catalog; index into the user catalog "
                            f"(omit --catalog) or another file")
    for stale in target.parent.glob(f"{target.name}.tmp-*"):  # left by a copy that was killed
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            stale.unlink(missing_ok=True)
    if target.exists():
        return target, False
    src = Path(source) if source else embedded
    if not src.is_file():
        raise IndexingError(f"{src}: no catalog to start the user catalog from "
                            "(build one with `talkplay catalog build`)")
    Catalog.open(src).close()  # validate before copying
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    try:
        src_conn = sqlite3.connect(f"file:{src.resolve()}?mode=ro", uri=True)
        dst_conn = sqlite3.connect(tmp)
        with dst_conn:
            src_conn.backup(dst_conn)  # a consistent copy even if the source is being read
        src_conn.close()
        dst_conn.close()
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target, True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def local_track_ids(catalog: Catalog | str | Path) -> set[str]:
    """Ids of the tracks that are local files (a non-null ``path``): what ``--only-local`` keeps."""
    if isinstance(catalog, Catalog):
        return {r[0] for r in catalog.conn.execute("select id from tracks where path is not null")}
    with Catalog.open(catalog) as cat:
        return local_track_ids(cat)


def _vocab_fingerprint(conn: sqlite3.Connection) -> tuple[str, str]:
    """(stored fingerprint, fingerprint recomputed from tokens + codebooks)."""
    stored = conn.execute("select value from meta where key = 'vocab_fingerprint'").fetchone()[0]
    tokens = [r[0] for r in conn.execute("select token from tokens order by id")]
    blobs = [r[0] for r in conn.execute("select centroids from codebooks order by modality")]
    return stored, fingerprint(tokens, blobs)


# ------------------------------------------------------------------------------------------------------
# walking the folder


def walk_files(root: str | Path, extensions: frozenset[str] = AUDIO_EXTENSIONS) -> Iterator[tuple[Path, str]]:
    """(resolved path, POSIX path relative to the resolved root) of every file with one of ``extensions``.

    Sorted, depth-first. Symlinks (to files or directories) are followed only when their target is
    inside the root; each directory and each file (by device + inode) is visited once, so symlink loops
    and duplicate links are harmless. Unreadable directories are skipped.
    """
    root = Path(root).expanduser().resolve()
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: set[tuple[int, int]] = set()

    def inside(p: Path) -> bool:
        return p == root or root in p.parents

    def visit(d: Path) -> Iterator[tuple[Path, str]]:
        try:
            st = d.stat()
        except OSError:
            return
        if (st.st_dev, st.st_ino) in seen_dirs:
            return
        seen_dirs.add((st.st_dev, st.st_ino))
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:
            return
        for e in entries:
            p = Path(e.path)
            try:
                if e.is_symlink():
                    target = p.resolve()
                    if not inside(target):
                        continue
                else:
                    target = p
                if target.is_dir():
                    yield from visit(target)
                elif target.is_file() and target.suffix.lower() in extensions:
                    fst = target.stat()
                    if (fst.st_dev, fst.st_ino) in seen_files:
                        continue
                    seen_files.add((fst.st_dev, fst.st_ino))
                    yield target, target.relative_to(root).as_posix()
            except (OSError, RuntimeError, ValueError):  # broken link, loop while resolving, vanished file
                continue

    yield from visit(root)


def walk_audio_files(root: str | Path) -> Iterator[tuple[Path, str]]:
    """Every audio file under ``root`` (``walk_files`` with ``AUDIO_EXTENSIONS``)."""
    return walk_files(root, AUDIO_EXTENSIONS)


# ------------------------------------------------------------------------------------------------------
# tags


def _first(v) -> str | None:
    """The first non-empty text of a mutagen tag value (list, frame, MP4 atom list, ASF attribute…)."""
    if v is None:
        return None
    if hasattr(v, "text") and not isinstance(v, str):  # ID3 frame
        v = v.text
    if isinstance(v, (list, tuple)):
        for x in v:
            s = _first(x)
            if s:
                return s
        return None
    s = str(v).strip().strip("\x00")
    return s or None


def _all(v) -> list[str]:
    if v is None:
        return []
    if hasattr(v, "genres"):  # ID3 TCON: resolves "(17)" and "Rock/Pop" style values
        return [g for g in v.genres if g]
    if hasattr(v, "text") and not isinstance(v, str):
        v = v.text
    vals = v if isinstance(v, (list, tuple)) else [v]
    return [str(x).strip() for x in vals if str(x).strip()]


def read_tags(path: str | Path) -> dict:
    """title, artist, album, year, date, genres (list), lyrics read with mutagen; {} when unreadable."""
    import mutagen

    try:
        f = mutagen.File(path)
    except Exception:  # noqa: BLE001 — mutagen raises many kinds on corrupt files; the audio decoder judges
        return {}
    if f is None or f.tags is None:
        return {}
    tags = f.tags
    out: dict = {}

    from mutagen.id3 import ID3

    if isinstance(tags, ID3):
        out["title"] = _first(tags.get("TIT2"))
        out["artist"] = _first(tags.get("TPE1")) or _first(tags.get("TPE2"))
        out["album"] = _first(tags.get("TALB"))
        out["date"] = _first(tags.get("TDRC")) or _first(tags.get("TYER")) or _first(tags.get("TDRL"))
        out["genres"] = _all(tags.get("TCON"))
        lyr = [fr.text for fr in tags.getall("USLT") if fr.text and fr.text.strip()]
        out["lyrics"] = lyr[0] if lyr else None
    else:
        # Vorbis comments / FLAC / APE / ASF / MP4: case varies by format; mutagen's dict-like tags
        keys = {str(k).lower(): k for k in tags.keys()}

        def pick(*names):
            for n in names:
                if n.lower() in keys:
                    return tags[keys[n.lower()]]
            return None

        out["title"] = _first(pick("title", "\xa9nam", "Title"))
        out["artist"] = _first(pick("artist", "\xa9ART", "Author", "albumartist", "aART"))
        out["album"] = _first(pick("album", "\xa9alb", "WM/AlbumTitle"))
        out["date"] = _first(pick("date", "year", "\xa9day", "WM/Year", "originaldate"))
        out["genres"] = _all(pick("genre", "\xa9gen", "WM/Genre"))
        out["lyrics"] = _first(pick("lyrics", "unsyncedlyrics", "unsynced lyrics", "\xa9lyr", "WM/Lyrics"))
    genres: list[str] = []
    for g in out.get("genres") or []:
        for part in re.split(r"\s*[;\x00]\s*", g):
            if part and part.casefold() not in {x.casefold() for x in genres}:
                genres.append(part)
    out["genres"] = genres
    m = re.match(r"\s*(\d{4})", out.get("date") or "")
    out["year"] = int(m.group(1)) if m else None
    return {k: v for k, v in out.items() if v not in (None, "", [])}


def _title_from_name(relpath: str) -> str:
    stem = Path(relpath).stem.replace("_", " ")
    return re.sub(r"\s+", " ", stem).strip() or Path(relpath).name


# ------------------------------------------------------------------------------------------------------
# the cf modality of local files: catalog twins and .m3u playlists


def catalog_twins(conn: sqlite3.Connection) -> dict[tuple[str, str], tuple[str, int]]:
    """(normalised title, normalised artist) → (track id, cf cluster) of catalog tracks that have a cf code.

    Local files are not twins. Where several catalog tracks share a name, the most popular wins.
    """
    q = ("select t.title, t.artist, t.id, c.cf from tracks t join codes c on c.track_id = t.id "
         "where c.cf != ? and t.path is null order by coalesce(t.popularity, 0) asc, t.id desc")
    out: dict[tuple[str, str], tuple[str, int]] = {}
    for title, artist, tid, cf in conn.execute(q, [NONE]):  # most popular last → wins
        out[(norm_name(title or ""), norm_name(artist or ""))] = (tid, int(cf))
    return out


def find_twin(twins: dict[tuple[str, str], tuple[str, int]], title: str | None,
              artist: str | None) -> tuple[str, int] | None:
    """The catalog twin of a title + artist (also trying the first of several credited artists)."""
    if not artist or not title:
        return None
    t = norm_name(title)
    for a in (artist, re.split(r"\s*(?:,|;|&|/| feat\.? | ft\.? | featuring | x )\s*", artist, flags=re.I)[0]):
        hit = twins.get((t, norm_name(a)))
        if hit is not None:
            return hit
    return None


def dup_numbers(conn: sqlite3.Connection) -> int:
    """The largest collision number the vocabulary has a ``dup`` token for."""
    return max([r[0] for r in conn.execute("select cluster from tokens where kind = 'dup'")] or [0])


def free_dup(conn: sqlite3.Connection, cl: dict[str, int], max_dup: int) -> int | None:
    """The smallest collision number no track with the five clusters ``cl`` uses (None: all taken)."""
    where = " and ".join(f"{m} = ?" for m in MODALITIES)
    used = {r[0] for r in conn.execute(f"select dup from codes where {where}", [cl[m] for m in MODALITIES])}
    return next((n for n in range(max_dup + 1) if n not in used), None)


def update_playlist_cf(cat: Catalog, root: Path, warn: Callable[[str], None],
                       twins: dict[tuple[str, str], tuple[str, int]] | None = None) -> tuple[int, int]:
    """Record the .m3u/.m3u8 playlists under ``root`` and re-derive every local track's cf code.

    A local track listed in a recorded playlist (under any indexed root) takes the cf cluster nearest
    to the mean item2vec vector of the *other* entries that have one: an entry has one when it is a
    local file or an ``#EXTINF`` artist/title whose catalog twin is in the catalog's playlists. That is
    the item2vec fold-in of a new item: its vector is the centre of its playlist neighbours. A local
    track with no such neighbour inherits its own twin's cluster, else ``none``. Changed codes are
    rewritten (with a free collision number) in one transaction. Returns (playlists, tracks whose cf
    came from a playlist). ``twins``: ``catalog_twins`` when the caller has it already.
    """
    from .catalog import CF_SCALE
    from .codebook import nearest
    from .m3u import PLAYLIST_EXTENSIONS, read_m3u
    from .music_tokenizer import transform

    conn = cat.conn
    found = {str(p): rel for p, rel in walk_files(root, PLAYLIST_EXTENSIONS)}
    prefix = str(root).rstrip(os.sep) + os.sep
    has_table = conn.execute("select 1 from sqlite_master where name = 'local_playlists'").fetchone()
    recorded = [r[0] for r in conn.execute("select path from local_playlists")] if has_table else []
    if not found and not recorded:  # no playlist anywhere: every local file keeps the cluster it was written with
        return 0, 0
    conn.executescript(LOCAL_PLAYLISTS_SCHEMA)
    gone = [p for p in recorded if p.startswith(prefix) and p not in found and not os.path.lexists(p)]

    playlists: list[list] = []
    for path in sorted(set(recorded) - set(gone) | set(found)):
        try:
            playlists.append(read_m3u(path))
        except OSError as e:
            if path in found:
                warn(f"warning: skipped playlist {path}: {e.strerror or e}")

    local = {r[0]: (r[1], r[2], r[3]) for r in conn.execute(
        "select f.path, t.id, t.title, t.artist from local_files f join tracks t on t.id = f.track_id "
        "where f.status = 'ok'")}
    twins = catalog_twins(conn) if twins is None else twins
    vectors: dict[str, np.ndarray] = {}

    def vector_of(tid: str) -> np.ndarray | None:
        if tid not in vectors:
            row = conn.execute("select vector from cf_vectors where track_id = ?", [tid]).fetchone()
            vectors[tid] = np.frombuffer(row[0], dtype=np.int8).astype(np.float32) / CF_SCALE if row else None
        return vectors[tid]

    def resolve(entry) -> tuple[str | None, np.ndarray | None]:
        """(local track id, cf vector) of one playlist entry."""
        tid = None
        title, artist = entry.title, entry.artist
        if entry.path:
            hit = local.get(entry.path) or local.get(os.path.realpath(entry.path))
            if hit:
                tid, title, artist = hit
        twin = find_twin(twins, title, artist)
        return tid, (vector_of(twin[0]) if twin else None)

    sums: dict[str, list] = {}  # local track id → [sum of neighbour vectors, count]
    for entries in playlists:
        resolved = [resolve(e) for e in entries]
        for tid, _ in resolved:
            if tid is None:
                continue
            acc = sums.setdefault(tid, [0.0, 0])
            for other, vec in resolved:
                if vec is not None and other != tid:
                    acc[0] = acc[0] + vec
                    acc[1] += 1
    from_playlists = {tid: acc[0] / acc[1] for tid, acc in sums.items() if acc[1]}
    desired: dict[str, int] = {}
    for tid, title, artist in local.values():
        twin = find_twin(twins, title, artist)
        desired[tid] = twin[1] if twin else NONE
    cb = cat.codebook("cf") if from_playlists else None
    if cb is not None and cb.centroids.size:
        ids = sorted(from_playlists)
        mean = np.stack([from_playlists[t] for t in ids])
        mean /= np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)
        for tid, cl in zip(ids, nearest(cb.centroids, transform(mean, cb.transform))):
            desired[tid] = int(cl)

    mods = ", ".join(MODALITIES)
    current = {r[0]: r for r in conn.execute(
        f"select c.track_id, {', '.join('c.' + m for m in MODALITIES)} from codes c join tracks t on t.id = c.track_id "
        "where t.path is not null")}
    changed = [(tid, cf) for tid, cf in desired.items() if tid in current and current[tid][1] != cf]
    new = [p for p in found if p not in set(recorded)]
    if not (gone or new or changed):
        return len(found), sum(1 for t in from_playlists if t in current)
    now = time.time()
    max_dup = dup_numbers(conn)
    conn.execute("begin immediate")
    try:
        for p in gone:
            conn.execute("delete from local_playlists where path = ?", [p])
        for p in new:
            rel = found[p]
            conn.execute("insert or replace into local_playlists (path, root, relpath, indexed_at) values (?, ?, ?, ?)",
                         [p, str(root), rel, now])
        for tid, cf in changed:
            old = dict(zip(MODALITIES, current[tid][1:]))
            cl = {**old, "cf": cf}
            conn.execute("delete from codes where track_id = ?", [tid])
            dup = free_dup(conn, cl, max_dup)
            if dup is None:  # every collision number of the new code is taken: keep the old code
                cl, dup = old, free_dup(conn, old, max_dup)
                warn(f"warning: kept the old cf code of {tid}: every collision token of its new code is taken")
            conn.execute(f"insert into codes (track_id, {mods}, dup, code) values (?, {', '.join('?' * len(MODALITIES))}, ?, ?)",
                         [tid, *[cl[m] for m in MODALITIES], dup, track_code(cl, dup)])
        conn.execute("commit")
    except BaseException:
        conn.execute("rollback")
        raise
    return len(found), sum(1 for t in from_playlists if t in current)


# ------------------------------------------------------------------------------------------------------
# indexing


@dataclass
class _Prepared:
    path: Path
    relpath: str
    mtime_ns: int
    size: int
    track_id: str
    track: dict          # the record embed_modalities reads (and the tracks row's source)
    lyrics: str | None


def _delete_track(conn: sqlite3.Connection, track_id: str) -> None:
    conn.execute("delete from codes where track_id = ?", [track_id])
    conn.execute("delete from tracks where id = ?", [track_id])


def _warn_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class _Indexer:
    def __init__(self, cat: Catalog, root: Path, encoder, tagger, warn: Callable[[str], None]):
        self.conn, self.root, self.encoder, self.tagger, self.warn = cat.conn, root, encoder, tagger, warn
        self.codebooks = {m: cat.codebook(m) for m in MODALITIES}
        conn = cat.conn
        self.max_dup = dup_numbers(conn)
        self.twins = catalog_twins(conn)

    def cf_cluster(self, title: str, artist: str | None) -> int:
        twin = find_twin(self.twins, title, artist)
        return twin[1] if twin else NONE

    def track_id(self, path: Path, relpath: str) -> str:
        """The file's track id: the one it already has (indexed before, maybe from another root), else new."""
        old = self.conn.execute("select track_id from local_files where path = ?", [str(path)]).fetchone()
        if old is not None and old[0]:
            return old[0]
        tid = "local:" + hashlib.sha1(relpath.encode("utf-8")).hexdigest()
        other = self.conn.execute("select path from local_files where track_id = ? and path != ?",
                                  [tid, str(path)]).fetchone()
        if other is not None:  # another root has a file at the same relative path
            tid = "local:" + hashlib.sha1(str(path).encode("utf-8")).hexdigest()
        return tid

    def prepare(self, path: Path, relpath: str, st: os.stat_result):
        """Tags + audio analysis of one file → _Prepared, or raises AudioDecodeError."""
        from .audio import analyze_file

        analysis = analyze_file(path, tagger=self.tagger)
        tags = read_tags(path)
        title = tags.get("title") or _title_from_name(relpath)
        artist = tags.get("artist")
        genres = tags.get("genres") or []
        if not genres:
            top = analysis.top_tags
            genres = [t for t, p in top if p >= MIN_TAG_PROB] or [t for t, _ in top[:1]]
        track = {
            "id": self.track_id(path, relpath), "title": title, "artist": artist, "album": tags.get("album"),
            "year": tags.get("year"), "release_date": tags.get("date"), "genres": genres, "subgenres": [],
            "artist_genres": [], "playlists": [], "artists": [artist] if artist else [],
            "duration_ms": int(round(analysis.duration_s * 1000)), "has_lyrics": 1 if tags.get("lyrics") else 0,
            "lyrics_theme": lyrics_theme(tags.get("lyrics") or ""),
            **analysis.features,
        }
        return _Prepared(path, relpath, st.st_mtime_ns, st.st_size, track["id"], track, tags.get("lyrics"))

    def write_batch(self, batch: list[_Prepared], failed: list[tuple[Path, str, int, int, str]],
                    summary: IndexSummary, before_commit: Callable[[], None] | None) -> None:
        from .music_tokenizer import assign_clusters, embed_modalities

        clusters = {}
        if batch:
            tracks = [p.track for p in batch]
            lyrics = {p.track_id: p.lyrics for p in batch if p.lyrics}
            embedded = embed_modalities(tracks, self.encoder, lyrics=lyrics, cf={})
            clusters = assign_clusters(len(tracks), embedded, self.codebooks)
            clusters["cf"] = np.array([self.cf_cluster(t["title"], t["artist"]) for t in tracks], dtype=np.int64)
        now = time.time()
        c = self.conn
        c.execute("begin immediate")
        try:
            for i, p in enumerate(batch):
                self._delete_track(p.track_id)
                cl = {m: int(clusters[m][i]) for m in MODALITIES}
                dup = free_dup(self.conn, cl, self.max_dup)
                if dup is None:
                    reason = (f"all {self.max_dup} collision tokens of code "
                              f"{track_code(cl, 0)} are taken")
                    failed.append((p.path, p.relpath, p.mtime_ns, p.size, reason))
                    continue
                t = p.track
                row = {col: t.get(col) for col in TRACK_COLUMNS}
                row.update({
                    "artist": t["artist"] or UNKNOWN_ARTIST, "genre": (t["genres"] or [None])[0],
                    "source": "local", "features_provenance": "estimated",
                    "path": str(p.path),
                })
                for col in ("artists", "genres", "subgenres", "artist_genres", "playlists"):
                    row[col] = json.dumps(t.get(col) or [], ensure_ascii=False, separators=(",", ":"))
                cols = list(row)
                c.execute(f"insert into tracks ({', '.join(cols)}) values ({', '.join('?' * len(cols))})",
                          [row[k] for k in cols])
                c.execute(f"insert into codes (track_id, {', '.join(MODALITIES)}, dup, code) "
                          f"values (?, {', '.join('?' * len(MODALITIES))}, ?, ?)",
                          [p.track_id, *[cl[m] for m in MODALITIES], dup, track_code(cl, dup)])
                self._record(p.path, p.relpath, p.mtime_ns, p.size, p.track_id, "ok", None, now)
                summary.indexed += 1
            for path, relpath, mtime_ns, size, reason in failed:
                old = c.execute("select track_id from local_files where path = ?", [str(path)]).fetchone()
                if old and old[0]:
                    self._delete_track(old[0])  # a changed file that no longer decodes loses its old track
                self._record(path, relpath, mtime_ns, size, None, "failed", reason, now)
                summary.failed += 1
                summary.failures.append((str(path), reason))
                self.warn(f"warning: skipped {path}: {reason}")
            if before_commit:
                before_commit()
            c.execute("commit")
        except BaseException:
            c.execute("rollback")
            raise

    def _delete_track(self, track_id: str) -> None:
        _delete_track(self.conn, track_id)

    def _record(self, path, relpath, mtime_ns, size, track_id, status, error, now) -> None:
        self.conn.execute(
            "insert or replace into local_files (path, root, relpath, mtime_ns, size, track_id, status, error, "
            "indexed_at) values (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [str(path), str(self.root), relpath, mtime_ns, size, track_id, status, error, now])


def _load_models(cat: Catalog, encoder, tagger, threads: int, warn: Callable[[str], None]):
    """The text encoder and audio tagger (created when not given); checks the encoder fits the codebooks."""
    if encoder is None:
        from .text_encoder import TextEncoder

        encoder = TextEncoder(threads=threads)
    for m in ("metadata", "tags", "lyrics"):
        cb = cat.codebook(m)
        if cb.centroids.size and cb.centroids.shape[1] != encoder.dim:
            raise IndexingError(f"{cat.path}: the {m} codebook has dim {cb.centroids.shape[1]}, "
                                f"the text encoder gives {encoder.dim}")
    mismatch = [m for m in ("metadata", "tags", "lyrics")
                if (cat.codebook(m).encoder, cat.codebook(m).encoder_version) != (encoder.name, encoder.version)]
    if mismatch:
        cb = cat.codebook(mismatch[0])
        warn(f"warning: the catalog's {', '.join(mismatch)} codebooks were built with {cb.encoder} "
             f"{cb.encoder_version}, indexing with {encoder.name} {encoder.version}: their clusters are approximate")
    if tagger is None:
        from .audio import default_tagger

        tagger = default_tagger(threads=threads)
    return encoder, tagger


def index_folder(root: str | Path, catalog_path: str | Path | None = None, encoder=None, tagger=None,
                 progress: bool = True, *, threads: int = 2, batch_size: int = DEFAULT_BATCH,
                 warn: Callable[[str], None] | None = None,
                 on_batch: Callable[[IndexSummary], None] | None = None,
                 before_commit: Callable[[], None] | None = None) -> IndexSummary:
    """Index the audio files under ``root`` into ``catalog_path`` (default: the user catalog).

    ``encoder`` (a ``TextEncoder``) and ``tagger`` (an ``audio.AudioTagger``) are created with ``threads``
    when not given. ``warn`` receives one line per failed file (default: stderr). ``on_batch`` is called
    after each committed batch, ``before_commit`` inside each batch's transaction just before it commits
    (both for tests and progress reporting). Raises ``IndexingError`` when the folder or catalog is unusable.
    """
    t0 = time.perf_counter()
    root_in = Path(root).expanduser()
    if not root_in.is_dir():
        raise IndexingError(f"{root_in}: not a folder")
    root_p = root_in.resolve()
    warn = warn or _warn_stderr
    target, created = ensure_catalog(catalog_path)
    cat = Catalog.open(target, readonly=False)
    conn = cat.conn
    conn.isolation_level = None  # explicit transactions: one per batch
    summary = IndexSummary(root=str(root_p), catalog=str(target), created_catalog=created)
    try:
        stored, computed = _vocab_fingerprint(conn)
        if stored != computed:
            raise CatalogError(f"{target}: vocabulary fingerprint does not match its tokens/codebooks")
        prefix = str(root_p).rstrip(os.sep) + os.sep  # files under the root, whichever root indexed them
        has_table = conn.execute("select 1 from sqlite_master where name = 'local_files'").fetchone()
        known = {r["path"]: r for r in conn.execute(
            "select path, mtime_ns, size, track_id, status from local_files where substr(path, 1, ?) = ?",
            [len(prefix), prefix])} if has_table else {}
        files = list(walk_audio_files(root_p))
        summary.files_seen = len(files)
        todo = []
        seen = set()
        for path, rel in files:
            seen.add(str(path))
            try:
                st = path.stat()
            except OSError:
                continue
            k = known.get(str(path))
            if k is not None and k["mtime_ns"] == st.st_mtime_ns and k["size"] == st.st_size:
                summary.skipped += 1
            else:
                todo.append((path, rel, st))

        if todo:  # the models are loaded only when there is work, and before anything is written
            encoder, tagger = _load_models(cat, encoder, tagger, threads, warn)
        conn.executescript(LOCAL_FILES_SCHEMA)

        gone = [r for p, r in known.items() if p not in seen and not os.path.lexists(p)]
        if gone:
            conn.execute("begin immediate")
            try:
                for r in gone:
                    if r["track_id"]:
                        _delete_track(conn, r["track_id"])
                    conn.execute("delete from local_files where path = ?", [r["path"]])
                conn.execute("commit")
            except BaseException:
                conn.execute("rollback")
                raise
            summary.removed = len(gone)

        from .audio import AudioDecodeError
        from .progress import progress as _progress

        bar = _progress(total=len(todo), desc="indexing", unit="file") if progress and todo else None

        def say(line: str) -> None:  # a warning line that does not tear the progress bar
            if bar is not None and hasattr(bar, "clear"):
                bar.clear()
                warn(line)
                bar.refresh()
            else:
                warn(line)

        try:
            if todo:
                ix = _Indexer(cat, root_p, encoder, tagger, say)
            for start in range(0, len(todo), max(1, batch_size)):
                chunk = todo[start:start + max(1, batch_size)]
                prepared, failed = [], []
                for path, rel, st in chunk:
                    try:
                        prepared.append(ix.prepare(path, rel, st))
                    except AudioDecodeError as e:
                        failed.append((path, rel, st.st_mtime_ns, st.st_size, e.reason))
                    except Exception as e:  # noqa: BLE001 — one bad file (unreadable, odd content) never stops a run
                        failed.append((path, rel, st.st_mtime_ns, st.st_size, f"{type(e).__name__}: {e}"))
                    if bar is not None:
                        bar.update(1)
                ix.write_batch(prepared, failed, summary, before_commit)
                if on_batch:
                    on_batch(summary)
        finally:
            if bar is not None:
                bar.close()

        summary.playlists, summary.cf_from_playlists = update_playlist_cf(cat, root_p, warn,
                                                                          ix.twins if todo else None)

        stored_after, computed_after = _vocab_fingerprint(conn)
        assert stored_after == stored and computed_after == computed, "indexing changed the music-token vocabulary"
        summary.vocab_fingerprint = stored
        summary.local_tracks = conn.execute("select count(*) from tracks where path is not null").fetchone()[0]
        summary.catalog_tracks = conn.execute("select count(*) from tracks").fetchone()[0]
    finally:
        cat.close()
    summary.elapsed_s = time.perf_counter() - t0
    return summary
