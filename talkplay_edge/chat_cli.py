"""`talkplay chat`, `talkplay ask` and `talkplay bench`: the runtime on the command line (mirrors ``runtime``).

    talkplay ask "upbeat 80s synth pop" [--n 5] [--json]
    talkplay chat                       # interactive: /reset, /more [N], /quit
    talkplay bench [--turns 20]         # latency / throughput table + the 1M-track trie check

Every command takes ``--model PATH`` (default: the embedded model), ``--catalog PATH`` (default: the
embedded catalog.db) and ``--threads N``.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from .catalog import CatalogError
from .cli import UserError, _fail_cleanly, catalog_option, json_option, threads_option
from .runtime import DEFAULT_KV_CACHE, KV_CACHE_TYPES

model_option = click.option("--model", "model_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
                            help="GGUF model (default: the embedded model).")
ctx_option = click.option("--n-ctx", type=int, default=2048, show_default=True, help="Context size in tokens.")
kv_option = click.option("--kv-cache", type=click.Choice(list(KV_CACHE_TYPES)), default=None,
                         help=f"KV cache type (default: $TALKPLAY_KV_CACHE, else {DEFAULT_KV_CACHE}); f16 prefills "
                              "faster and takes ~20 MB more.")
sampling_options = [
    click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy."),
    click.option("--top-k", type=int, default=0, show_default=True, help="Sample from the k best (0 = all)."),
    click.option("--seed", type=int, default=None, help="Sampling seed."),
    click.option("--max-new-tokens", type=int, default=96, show_default=True, help="Reply length limit."),
    click.option("--no-force-span", is_flag=True, help="Let the model decide whether to recommend a track."),
    click.option("--only-local", is_flag=True, help="Recommend only your own indexed files (`talkplay index`)."),
    click.option("--no-guard", is_flag=True, help="Let replies say what the catalog does not bear out of their "
                 "track (a genre, a sound, a year or BPM); by default such a claim is taken back as it is written."),
]


def _options(fn):
    for opt in reversed(sampling_options):
        fn = opt(fn)
    return fn


def _clean_errors(fn):
    """Known runtime errors become one line (inside `_fail_cleanly`)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .runtime import ModelCatalogMismatch, ModelNotFound

        try:
            return fn(*args, **kwargs)
        except (ModelCatalogMismatch, ModelNotFound, CatalogError, ValueError) as e:
            if click.get_current_context().find_root().params.get("debug"):
                raise
            raise UserError(str(e)) from e

    return wrapper


def _load(model_path, catalog_path, threads, n_ctx, kv_cache=None):
    from .runtime import TalkPlay

    return TalkPlay.load(model_path, catalog_path, threads=threads, n_ctx=n_ctx, kv_cache=kv_cache)


def _session(tp, temperature, top_k, seed, max_new_tokens, no_force_span, only_local=False, no_guard=False):
    only = None
    if only_local:
        from .indexer import local_track_ids

        only = local_track_ids(tp.catalog)
        if not only:
            raise UserError(f"{tp.catalog.path}: no local tracks (add your music with `talkplay index PATH`)")
    return tp.chat(temperature=temperature, top_k=top_k, seed=seed, max_new_tokens=max_new_tokens,
                   force_span=not no_force_span, only=only, guard=not no_guard)


def _track_line(i: int | None, t) -> str:
    return f"{'' if i is None else f'{i:>2}. '}♪ {t}  [{t.id}]"


@click.command("ask")
@click.argument("message")
@click.option("--n", "n", type=int, default=1, show_default=True, help="Tracks to rank (beam search when > 1).")
@model_option
@catalog_option
@threads_option
@ctx_option
@kv_option
@_options
@json_option
@_fail_cleanly
@_clean_errors
def ask(message, n, model_path, catalog_path, threads, n_ctx, kv_cache, temperature, top_k, seed, max_new_tokens,
        no_force_span, only_local, no_guard, as_json):
    """Ask once: a reply and ranked track(s)."""
    if n < 1:
        raise UserError("--n must be at least 1")
    tp = _load(model_path, catalog_path, threads, n_ctx, kv_cache)
    session = _session(tp, temperature, top_k, seed, max_new_tokens, no_force_span, only_local, no_guard)
    if as_json:
        reply = session.send(message, n=n)
        click.echo(json.dumps(reply.to_dict(), indent=2, ensure_ascii=False))
        return
    reply = session.send(message, n=n, on_track=lambda t: None)
    for i, t in enumerate(reply.tracks, 1):
        click.echo(_track_line(i if n > 1 else None, t))
    if reply.exhausted:
        click.echo("(every catalog track has been recommended)")
    click.echo(reply.text)


@click.command("chat")
@model_option
@catalog_option
@threads_option
@ctx_option
@kv_option
@_options
@_fail_cleanly
@_clean_errors
def chat(model_path, catalog_path, threads, n_ctx, kv_cache, temperature, top_k, seed, max_new_tokens, no_force_span,
         only_local, no_guard):
    """Chat interactively. Commands: /reset (new conversation), /more [N] (more tracks), /quit."""
    from .chat_format import EmptyMessageError

    tp = _load(model_path, catalog_path, threads, n_ctx, kv_cache)
    session = _session(tp, temperature, top_k, seed, max_new_tokens, no_force_span, only_local, no_guard)
    interactive = sys.stdin.isatty()
    if interactive:
        click.echo(f"talkplay — {len(tp.track_ids)} tracks. /reset, /more [N], /quit")
    while True:
        try:
            line = input("you> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit", "/q"):
            break
        if line == "/reset":
            session.reset()
            click.echo("(new conversation)")
            continue
        if line.split()[0] == "/more":
            parts = line.split()
            try:
                k = int(parts[1]) if len(parts) > 1 else 1
            except ValueError:
                click.echo("usage: /more [N]")
                continue
            try:
                reply = session.more(max(1, k))
            except ValueError as e:
                click.echo(f"({e})")
                continue
            for t in reply.tracks:
                click.echo(_track_line(None, t))
            if reply.exhausted or not reply.tracks:
                click.echo("(every catalog track has been recommended; /reset to start over)")
            continue
        try:
            reply = session.send(line, on_track=lambda t: click.echo(_track_line(None, t)),
                                 on_text=lambda s: click.echo(s, nl=False))
        except EmptyMessageError as e:
            click.echo(f"({e})")
            continue
        click.echo("")
        if reply.exhausted:
            click.echo("(every catalog track has been recommended; /reset to start over)")


@click.command("bench")
@model_option
@catalog_option
@threads_option
@ctx_option
@kv_option
@click.option("--turns", type=int, default=20, show_default=True, help="Chat turns to time.")
@click.option("--max-new-tokens", type=int, default=48, show_default=True)
@click.option("--trie-tracks", type=int, default=1_000_000, show_default=True,
              help="Size of the synthetic trie for the scale check (0 = skip).")
@click.option("--no-guard", is_flag=True, help="Time replies without the reply guard.")
@json_option
@_fail_cleanly
@_clean_errors
def bench(model_path, catalog_path, threads, n_ctx, kv_cache, turns, max_new_tokens, trie_tracks, no_guard, as_json):
    """Benchmark: load time, time to first track, reply latency, tokens/s, peak RSS; 1M-track trie check."""
    from .bench import format_table, run_bench

    result = run_bench(model_path, catalog_path, threads=threads, n_ctx=n_ctx, turns=turns,
                       max_new_tokens=max_new_tokens, trie_tracks=trie_tracks, kv_cache=kv_cache, guard=not no_guard)
    click.echo(json.dumps(result, indent=2) if as_json else format_table(result))
