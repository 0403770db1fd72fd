"""The `talkplay` command line. Every command mirrors a Python API call; `--json` prints machine output."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .catalog import Catalog
from .paths import DEFAULT_DATA_DIR, default_catalog_path, embedded_catalog_path

catalog_option = click.option("--catalog", "catalog_path", type=click.Path(dir_okay=False, path_type=Path),
                              default=None, help="Catalog file (default: the embedded catalog.db).")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")
threads_option = click.option("--threads", type=int, default=2, show_default=True, help="CPU threads.")


class UserError(click.ClickException):
    """An error the user can fix; printed as one line, exit status 1."""


def _fail_cleanly(fn):
    """Turn known errors into one clear line and a non-zero exit (tracebacks only with --debug)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except Exception as e:  # noqa: BLE001 — the CLI boundary
            if click.get_current_context().find_root().params.get("debug"):
                raise
            raise UserError(_describe(e)) from e

    return wrapper


def _describe(e: Exception) -> str:
    import sqlite3

    if type(e).__module__.startswith("talkplay_edge."):  # our own errors are written for users: file + fix
        return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    if isinstance(e, sqlite3.DatabaseError):  # met after the catalog opened: name the file being read
        from .catalog import corrupt
        from .paths import default_catalog_path

        params = click.get_current_context().params
        return str(corrupt(params.get("catalog_path") or default_catalog_path(), e))
    return f"{type(e).__name__}: {e} (run with --debug for the traceback)"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.version_option(package_name="talkplay-edge")
def cli(debug: bool) -> None:
    """talkplay: conversational music recommendation that runs on your device."""


@cli.group()
def catalog() -> None:
    """Build and inspect catalogs."""


@catalog.command("build")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), default=DEFAULT_DATA_DIR, show_default=True,
              help="Folder holding spotify_songs/ and musicoset/.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output file (default: the embedded catalog.db).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-k", "k", type=int, default=1024, show_default=True, help="Codebook size per modality.")
# = catalog_build.CF_HOLDOUT, written out so that `talkplay` does not import the builder (sqlite-utils, ~90 ms)
@click.option("--cf-holdout", type=float, default=0.3, show_default=True,
              help="Share of training playlists item2vec does not learn from, so training sees CF-cold tracks.")
@click.option("--codebooks", "codebooks_from", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Tokenise with this catalog's codebooks instead of fitting new ones (keeps its "
                                 "vocabulary fingerprint, so a model trained on it still fits).")
@threads_option
@json_option
@_fail_cleanly
def catalog_build(data_dir: Path, out: Path | None, seed: int, k: int, cf_holdout: float,
                  codebooks_from: Path | None, threads: int, as_json: bool) -> None:
    """Build a catalog from the source data: embeddings, codebooks, codes, FTS index."""
    from .catalog_build import build_catalog
    from .sources import load_sources
    from .text_encoder import TextEncoder

    out = out or embedded_catalog_path()
    source = load_sources(data_dir)
    encoder = TextEncoder(threads=threads)
    summary = build_catalog(source, out, encoder, seed=seed, k=k, cf_holdout=cf_holdout, codebooks_from=codebooks_from)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        c = summary["collisions"]
        click.echo(f"{summary['tracks']} tracks in {summary['timings']['total_s']:.0f} s; "
                   f"collisions {c['collision_rate_before']:.2%} → {c['collision_rate_after']:.2%}; "
                   f"fingerprint {summary['vocab_fingerprint'][:16]}")


@catalog.command("vectors")
@catalog_option
@threads_option
@json_option
@_fail_cleanly
def catalog_vectors(catalog_path: Path | None, threads: int, as_json: bool) -> None:
    """Embed every track's text (MiniLM) and store the vectors beside the catalog (CATALOG.vectors.npz, int8),
    so dense retrieval and the model's retrieval prior need no embedding pass on a fresh install."""
    from .baselines import write_track_vectors
    from .text_encoder import TextEncoder

    with Catalog.open(catalog_path or default_catalog_path()) as cat:
        summary = write_track_vectors(cat, TextEncoder(threads=threads))
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(f"{summary['tracks']} track vectors → {summary['path']} ({summary['bytes'] / 1e6:.1f} MB)")


@cli.command()
@catalog_option
@json_option
@_fail_cleanly
def info(catalog_path: Path | None, as_json: bool) -> None:
    """Catalog statistics: tracks, coverage and clusters per modality, collisions, fingerprint."""
    with Catalog.open(catalog_path or default_catalog_path()) as cat:
        data = cat.info()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"catalog      {data['path']} ({data['file_size_bytes'] / 1e6:.1f} MB)")
    click.echo(f"tracks       {data['tracks']}   playlists {data['playlists']}")
    click.echo(f"vocabulary   {data['vocabulary_size']} music tokens, fingerprint {data['vocab_fingerprint'][:16]}…")
    c = data["collisions"]
    if c:
        click.echo(f"collisions   {c['tracks_sharing_code_before']} tracks shared a 5-token code "
                   f"({c['collision_rate_before']:.2%}); after dup tokens {c['collision_rate_after']:.2%}")
    themes = data["lyrics_themes"]
    if themes is not None:
        top = ", ".join(f"{t} {n}" for t, n in list(themes.items())[:4])
        click.echo(f"lyrics       {sum(themes.values())} tracks with a lyrics theme" + (f" ({top}…)" if top else ""))
    click.echo(f"\n{'modality':10} {'coverage':>9} {'tracks':>7} {'codes used':>11} {'largest':>8}  encoder")
    for m, s in data["modalities"].items():
        click.echo(f"{m:10} {s['coverage']:>9.1%} {s['tracks']:>7} {s['codes_used']:>5}/{s['k']:<5} "
                   f"{s['largest_cluster']:>8}  {s['encoder']}")


@cli.command()
@click.argument("query")
@click.option("--limit", type=int, default=10, show_default=True)
@catalog_option
@json_option
@_fail_cleanly
def search(query: str, limit: int, catalog_path: Path | None, as_json: bool) -> None:
    """Find catalog tracks by title, artist, album or tag (full-text search)."""
    with Catalog.open(catalog_path) as cat:
        hits = cat.search(query, limit)
        tracks = {t.id: t for t in cat.tracks([h[0] for h in hits])}
    if as_json:
        click.echo(json.dumps([dict(tracks[i].to_dict(), score=s) for i, s in hits], indent=2))
        return
    for i, s in hits:
        click.echo(f"{s:6.2f}  {tracks[i]}  [{i}]")


# --- commands defined in other modules (one add_command line each) ---
from .eval_cli import (conversations_group, eval_command, eval_compare_command,  # noqa: E402
                       eval_splice_command, eval_summary_command)
cli.add_command(eval_command)
cli.add_command(eval_compare_command)
cli.add_command(eval_summary_command)
cli.add_command(eval_splice_command)
cli.add_command(conversations_group)
from .chat_cli import ask, bench, chat  # noqa: E402
cli.add_command(chat)
cli.add_command(ask)
cli.add_command(bench)
from .index_cli import index_command  # noqa: E402
cli.add_command(index_command)


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="talkplay")

