"""`talkplay index PATH`: add a folder of music files to the user catalog (see ``indexer.index_folder``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from .cli import UserError, _fail_cleanly, json_option, threads_option


@click.command("index")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--catalog", "catalog_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Catalog file to add the tracks to (default: the user catalog in the XDG data directory, "
                   "created from the embedded catalog on first use; never the embedded file itself).")
@click.option("--batch-size", type=int, default=8, show_default=True,
              help="Files per committed transaction (a killed run loses at most one batch).")
@threads_option
@json_option
@_fail_cleanly
def index_command(path: Path, catalog_path: Path | None, batch_size: int, threads: int, as_json: bool) -> None:
    """Index the music files under PATH (tags, audio features, five-modality codes) so that `chat` and
    `ask` can recommend them. Incremental: unchanged files are skipped; a re-run resumes an interrupted one."""
    from .indexer import IndexingError, index_folder

    def warn(line: str) -> None:
        click.echo(line, err=True)

    try:
        summary = index_folder(path, catalog_path, progress=True, threads=threads, batch_size=batch_size,
                               warn=warn)
    except IndexingError as e:
        raise UserError(str(e)) from e
    if as_json:
        click.echo(json.dumps(summary.to_dict(), indent=2, ensure_ascii=False))
        return
    if summary.created_catalog:
        click.echo(f"created {summary.catalog} (a copy of the embedded catalog)")
    click.echo(f"{summary.files_seen} audio files: {summary.indexed} indexed, {summary.skipped} unchanged, "
               f"{summary.failed} failed, {summary.removed} removed "
               f"({summary.elapsed_s:.1f} s, {summary.files_per_s:.2f} files/s)")
    if summary.playlists or summary.cf_from_playlists:
        click.echo(f"{summary.playlists} playlists: {summary.cf_from_playlists} local tracks take their cf code from one")
    click.echo(f"{summary.catalog}: {summary.local_tracks} local tracks of {summary.catalog_tracks}; "
               f"vocabulary unchanged (fingerprint {summary.vocab_fingerprint[:16]})")
    env = os.environ.get("TALKPLAY_CATALOG")
    if env and Path(env).resolve() != Path(summary.catalog).resolve():
        click.echo(f"note: $TALKPLAY_CATALOG is set ({env}); chat/ask read that catalog, not this one", err=True)
