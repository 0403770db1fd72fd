"""`talkplay eval` and `talkplay conversations build` (registered in cli.py)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .cli import UserError, _fail_cleanly, catalog_option, json_option, threads_option
from .paths import DEFAULT_DATA_DIR, default_catalog_path


@click.command("eval")
@click.option("--system", "system", required=True, help="Recommender: popularity, random, bm25, dense, cf, hybrid "
              "(or one the runtime registers, e.g. model).")
@click.option("--conversations", "conv_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Conversations JSONL (e.g. conversations/test.jsonl).")
@click.option("--limit", type=int, default=None, help="Only the first N conversations (after --skip).")
@click.option("--skip", type=click.IntRange(min=0), default=0, show_default=True,
              help="Leave out the first N conversations (e.g. those a calibration was fitted on).")
@click.option("--max-turn", type=click.IntRange(min=1), default=None,
              help="Only score assistant turns up to this index (1: first turns only).")
@click.option("--only-turns", "only_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Score only the turns this file lists (JSON lines with conversation and turn, e.g. a ranks "
              "file): re-score the turns a change touches, then `talkplay eval-splice` them into a whole run.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random system.")
@click.option("--per-intent", is_flag=True, help="Also print one row per intent (generated data's meta.intents).")
@click.option("--ranks", "ranks_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write each scored turn's first-hit rank here (JSON lines; compare two runs with "
              "`talkplay eval-compare`). While it runs, finished conversations are kept in RANKS.partial.")
@click.option("--resume", is_flag=True, help="Continue the stopped run whose RANKS.partial is there: score only "
              "the conversations it lacks (the same figures as one uninterrupted run).")
@click.option("--replies", is_flag=True, help="(--system model) Also chat through the runtime with the user "
              "messages: real / repeated tracks, replies that name their track, replies that say something false "
              "of their track.")
@click.option("--no-guard", is_flag=True, help="(--replies) Chat without the reply guard: the model's own words.")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Split the conversations over N processes of --threads threads each (the same figures as one "
              "process).")
@catalog_option
@threads_option
@json_option
@_fail_cleanly
def eval_command(system: str, conv_path: Path, limit: int | None, skip: int, max_turn: int | None,
                 only_path: Path | None, seed: int,
                 per_intent: bool, ranks_path: Path | None, resume: bool, replies: bool, no_guard: bool, jobs: int,
                 catalog_path: Path | None, threads: int, as_json: bool) -> None:
    """Score a recommender on conversations: MRR, Hit@1/10/100 overall and per turn.

    \b
      talkplay eval --system hybrid --conversations conversations/test.jsonl --limit 50
      talkplay eval --system model --conversations conversations/test.jsonl --jobs 2 --threads 1 --ranks m.jsonl
      talkplay eval --system model --conversations conversations/test.jsonl --jobs 2 --threads 1 --ranks m.jsonl --resume
    """
    from .catalog import Catalog
    from .conversations import ConversationFormatError, read_conversations
    from .eval_journal import Journal, JournalError, run_key
    from .evaluate import (RanksFormatError, UnknownSystemError, format_table, read_ranks, result_from_records,
                           system_factory, write_ranks)

    if no_guard and not replies:
        raise UserError("--no-guard is for --replies (the reply guard changes only the reply text)")
    if replies and system != "model":
        raise UserError("--replies needs --system model (only the model writes replies)")
    if resume and ranks_path is None:
        raise UserError("--resume needs --ranks (the stopped run's journal is RANKS.partial)")
    if resume and replies:
        raise UserError("--resume does not work with --replies (the chat figures are not kept in the journal)")
    try:
        convs = read_conversations(conv_path, limit=None if limit is None else skip + limit)[skip:]
    except ConversationFormatError as e:
        raise UserError(str(e)) from e
    only = None
    if only_path is not None:
        if replies:
            raise UserError("--only-turns does not work with --replies (the chat runs whole conversations)")
        only = _listed_turns([only_path])
        listed = {c for c, _ in only}
        convs_by_index = [(i, c) for i, c in enumerate(convs, skip) if str(c.get("id", i)) in listed]
        if not convs_by_index:
            raise UserError(f"--only-turns {only_path}: none of its conversations is in {conv_path} "
                            f"(after --skip/--limit)")
    try:
        system_factory(system)  # an unknown system is told before anything else
    except UnknownSystemError as e:
        raise UserError(str(e)) from e
    # the journal (RANKS.partial): for a ranks file, not a pipe; not with --replies, whose figures it lacks
    journalled = ranks_path is not None and not replies and (not ranks_path.exists() or ranks_path.is_file())
    if resume and not journalled:
        raise UserError(f"--resume needs --ranks to name a file ({ranks_path} is not one)")
    model = None
    if system == "model" and (journalled or jobs > 1):  # built once, here: the journal names it, jobs share it
        from .runtime import default_model

        model = default_model()
    with Catalog.open(catalog_path or default_catalog_path()) as cat:
        journal = None
        if journalled:
            try:
                journal = Journal.open(ranks_path, run_key(system, convs, skip, max_turn, seed, cat.fingerprint,
                                                           catalog=cat.path, model=model, only=only,
                                                           ask_head=_ask_head_file(system)),
                                       resume=resume)
            except JournalError as e:
                raise UserError(str(e)) from e
        scored = convs_by_index if only is not None else list(enumerate(convs, skip))
        pending = [(i, c) for i, c in scored if journal is None or i not in journal.done]
        if journal is not None and journal.done:
            click.echo(f"resuming: {len(journal.done)} of {len(scored)} conversations are in {journal.path}",
                       err=True)
        elif resume:
            click.echo(f"nothing to resume in {journal.path}: scoring every conversation", err=True)
        try:
            result, chat, setup_s = _score(system, cat, [c for _, c in pending], [i for i, _ in pending], jobs,
                                           threads=threads, seed=seed, max_turn=max_turn, replies=replies,
                                           guard=not no_guard,
                                           show_progress=True, only=only,
                                           on_conversation=journal.add if journal is not None else None)
        except BaseException:
            if journal is not None and len(journal):
                journal.close()
                click.echo(f"talkplay eval: {len(journal)} finished conversations are kept in {journal.path}; "
                           "run the same command with --resume to continue", err=True)
            elif journal is not None:
                journal.finish()  # nothing in it worth keeping
            raise
        if journal is not None and journal.done:
            scored_now = result
            result = result_from_records(scored_now.system, list(journal.done.values()) + scored_now.records,
                                         runtime_s=scored_now.runtime_s)
            result.timed_turns = scored_now.turns
        result.extra = {"conversations_file": str(conv_path), "catalog": str(cat.path), "setup_s": round(setup_s, 2),
                        "limit": limit, "skip": skip, "max_turn": max_turn,
                        "only_turns": str(only_path) if only_path is not None else None,
                        "jobs": min(jobs, max(len(pending), 1)),
                        "resumed_conversations": len(journal.done) if journal is not None else 0}
        if ranks_path is not None:
            try:
                write_ranks(result.turn_ranks, ranks_path)
            except OSError as e:
                kept = f"; the scores are kept in {journal.path}: --resume writes them" if journal is not None else ""
                if journal is not None:
                    journal.close()
                raise UserError(f"--ranks {ranks_path}: cannot write ({e}){kept}") from e
            if journal is not None:
                journal.finish()
    if as_json:
        click.echo(json.dumps({**result.to_dict(), **({"replies": chat.to_dict()} if chat else {})}, indent=2))
    else:
        click.echo(format_table(result, per_intent=per_intent))
        if chat:
            click.echo(chat.format())
        click.echo(f"(setup {setup_s:.1f} s)")


def _ask_head_file(system: str) -> Path | None:
    """The ask head file the model system reads (part of its journal's key), None for other systems."""
    if system != "model":
        return None
    from .asks import HEAD_FILE

    return HEAD_FILE if HEAD_FILE.is_file() else None


def _score(system: str, cat, convs: list[dict], indices: list[int], jobs: int, threads: int, seed: int,
           max_turn: int | None, replies: bool, show_progress: bool, on_conversation, only=None, guard: bool = True):
    """(result, replies or None, setup seconds) of ``system`` on ``convs``, in one process or ``jobs``."""
    import time

    from .evaluate import evaluate, evaluate_in_processes, evaluate_replies, get_recommender, result_from_records

    if not convs:  # e.g. a resumed run whose journal already holds every conversation
        return result_from_records(system, []), None, 0.0
    if jobs > 1 and len(convs) > 1:  # (a model system: built by the caller)
        return evaluate_in_processes(system, cat.path, convs, jobs, threads=threads, max_turn=max_turn,
                                     replies=replies, guard=guard, indices=indices, show_progress=show_progress,
                                     seed=seed, on_conversation=on_conversation, only=only)
    t0 = time.perf_counter()
    rec = get_recommender(system, cat, threads=threads, seed=seed, show_progress=show_progress)
    setup_s = time.perf_counter() - t0
    result = evaluate(rec, convs, set(cat.track_ids()), show_progress=show_progress, max_turn=max_turn,
                      indices=indices, on_conversation=on_conversation, only=only)
    chat = evaluate_replies(rec.tp, convs, show_progress=show_progress, guard=guard) if replies else None
    return result, chat, setup_s


def _listed_turns(paths) -> set[tuple[str, int]]:
    """The (conversation, turn) keys the ranks files ``paths`` hold (``--only-turns``)."""
    from .evaluate import RanksFormatError, read_ranks

    try:
        return {(r["conversation"], r["turn"]) for path in paths for r in read_ranks(path, need_rank=False)}
    except RanksFormatError as e:
        raise UserError(str(e)) from e


@click.command("eval-compare")
@click.argument("ranks_a", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("ranks_b", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--per-intent", is_flag=True, help="Also one row per intent.")
@click.option("--bootstrap", type=click.IntRange(min=0), default=2000, show_default=True,
              help="Paired bootstrap resamples for the MRR difference's 95% interval (0: none).")
@json_option
@_fail_cleanly
def eval_compare_command(ranks_a: Path, ranks_b: Path, per_intent: bool, bootstrap: int, as_json: bool) -> None:
    """Paired comparison of two `talkplay eval --ranks` files, B against A, turn by turn.

    \b
      talkplay eval --system hybrid --conversations conversations/test.jsonl --limit 50 --ranks a.jsonl
      talkplay eval --system model  --conversations conversations/test.jsonl --limit 50 --ranks b.jsonl
      talkplay eval-compare a.jsonl b.jsonl --per-intent
    """
    from .evaluate import RanksFormatError, compare_ranks, format_comparison, read_ranks

    try:
        a, b = read_ranks(ranks_a), read_ranks(ranks_b)
    except RanksFormatError as e:
        raise UserError(str(e)) from e
    cmp = compare_ranks(a, b, n_boot=bootstrap)
    if cmp["overall"]["turns"] == 0:
        raise UserError(f"{ranks_a} and {ranks_b} share no scored turn (different conversations files or subsets?)")
    if as_json:
        click.echo(json.dumps({"a": str(ranks_a), "b": str(ranks_b), **cmp}, indent=2))
    else:
        click.echo(f"A = {ranks_a}\nB = {ranks_b}")
        click.echo(format_comparison(cmp, per_intent=per_intent))


@click.command("eval-summary")
@click.argument("ranks", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--per-intent", is_flag=True, help="Also one row per intent.")
@click.option("--only-turns", "only_paths", multiple=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Pool only the turns these ranks files hold (repeatable; e.g. a baseline's whole-file run on "
              "the turns of the model's pieces). Every such turn must be in RANKS.")
@json_option
@_fail_cleanly
def eval_summary_command(ranks: tuple[Path, ...], per_intent: bool, only_paths: tuple[Path, ...],
                         as_json: bool) -> None:
    """The MRR / Hit@K table of one or more `talkplay eval --ranks` files, pooled (e.g. runs of pieces of a
    conversations file made with --skip/--limit, on one machine or several). A turn in two files is refused.

    \b
      talkplay eval --system model --conversations conversations/test.jsonl --limit 500 --ranks a.jsonl
      talkplay eval --system model --conversations conversations/test.jsonl --skip 500 --ranks b.jsonl
      talkplay eval-summary a.jsonl b.jsonl
      talkplay eval-summary dense.jsonl --only-turns a.jsonl --only-turns b.jsonl   # the same turns, dense
    """
    from .evaluate import RanksFormatError, format_table, read_ranks, result_from_rows

    rows: list[dict] = []
    where: dict[tuple[str, int], Path] = {}
    for path in ranks:
        try:
            file_rows = read_ranks(path)
        except RanksFormatError as e:
            raise UserError(str(e)) from e
        for row in file_rows:
            key = (row["conversation"], row["turn"])
            if key in where:
                raise UserError(f"{path}: conversation {key[0]} turn {key[1]} is also in {where[key]} "
                                "(the same conversations twice, or ranks of two systems?)")
            where[key] = path
        rows += file_rows
    if only_paths:
        only = _listed_turns(only_paths)
        missing = only - where.keys()
        if missing:
            conv, turn = min(missing)
            raise UserError(f"{len(missing)} of the {len(only)} turns --only-turns lists are in no RANKS file "
                            f"(e.g. conversation {conv} turn {turn}): the ranks come from another conversations "
                            "file or a subset of it")
        rows = [r for r in rows if (r["conversation"], r["turn"]) in only]
    result = result_from_rows("ranks", len({r["conversation"] for r in rows}), rows)
    result.extra = {"ranks": [str(p) for p in ranks], "only_turns": [str(p) for p in only_paths]}
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        click.echo(format_table(result, per_intent=per_intent,
                                title=f"{len(ranks)} ranks file{'s' * (len(ranks) > 1)}"))


@click.command("eval-splice")
@click.argument("base", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("patch", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the spliced ranks (.gz: compressed).")
@json_option
@_fail_cleanly
def eval_splice_command(base: Path, patch: Path, out_path: Path, as_json: bool) -> None:
    """BASE's ranks with PATCH's turns put in place of the same turns: a whole run's ranks after a change that
    touched some turns, re-scored with `talkplay eval --only-turns`. A PATCH turn BASE lacks is refused.

    \b
      talkplay eval --system model --conversations conversations/test_unseen.jsonl --only-turns changed.jsonl --ranks patch.jsonl
      talkplay eval-splice old-test_unseen.jsonl.gz patch.jsonl --out new.jsonl
      talkplay eval-compare old-test_unseen.jsonl.gz new.jsonl
    """
    from .evaluate import RanksFormatError, read_ranks, splice_ranks, write_ranks

    try:
        patch_rows = read_ranks(patch)
        rows, changed = splice_ranks(read_ranks(base), patch_rows)
    except RanksFormatError as e:
        raise UserError(str(e)) from e
    except KeyError as e:
        raise UserError(f"{patch}: conversation {e.args[0][0]} turn {e.args[0][1]} is not in {base}") from None
    write_ranks(rows, out_path)
    info = {"base": str(base), "patch": str(patch), "out": str(out_path), "turns": len(rows),
            "replaced": len(patch_rows), "rank_changed": changed}
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        click.echo(f"{out_path}: {info['turns']} turns, {info['replaced']} from {patch} "
                   f"({changed} with another rank than in {base})")


@click.group("conversations")
def conversations_group() -> None:
    """Synthetic conversation data sets (training and test data)."""


@conversations_group.command("build")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("conversations"),
              show_default=True, help="Output folder.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--train", "n_train", type=int, default=20000, show_default=True, help="Training conversations.")
@click.option("--valid", "n_valid", type=int, default=500, show_default=True)
@click.option("--test", "n_test", type=int, default=1000, show_default=True)
@click.option("--test-unseen", "n_unseen", type=int, default=1000, show_default=True,
              help="Test conversations written only with held-out patterns.")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), default=DEFAULT_DATA_DIR, show_default=True,
              help="Source data folder: lyrics for the lyrics-theme intents, read only for a catalog that does "
                   "not keep its tracks' lyrics themes (made before 2026-12-08).")
@catalog_option
@json_option
@_fail_cleanly
def conversations_build(out_dir: Path, seed: int, n_train: int, n_valid: int, n_test: int, n_unseen: int,
                        data_dir: Path, catalog_path: Path | None, as_json: bool) -> None:
    """Write train/valid/test/test_unseen.jsonl and stats.json from the catalog's playlists."""
    from .catalog import Catalog
    from .conversations import build_conversations

    lyrics = None
    with Catalog.open(catalog_path or default_catalog_path()) as cat:
        if "lyrics_theme" not in cat.columns:  # a catalog made before it kept them: read the lyrics
            if data_dir and Path(data_dir).is_dir():
                from .sources import load_sources

                if not as_json:
                    click.echo(f"reading lyrics from {data_dir}", err=True)
                lyrics = load_sources(data_dir).lyrics
            else:
                click.echo(f"warning: {data_dir} not found and the catalog keeps no lyrics themes; no "
                           "lyrics-theme intents", err=True)
        stats = build_conversations(cat, out_dir, seed=seed, lyrics=lyrics, show_progress=True,
                                    sizes={"train": n_train, "valid": n_valid, "test": n_test, "test_unseen": n_unseen})
    if as_json:
        click.echo(json.dumps(stats, indent=2))
        return
    p = stats["patterns"]
    click.echo(f"patterns: {p['train']} train, {p['heldout']} held out ({p['intents']} intents)")
    for name, s in stats["splits"].items():
        click.echo(f"{name:12} {s['conversations']:>6} conversations, {s['assistant_turns']:>7} turns "
                   f"(mean {s['mean_turns']:.2f}) over {s['playlists']} playlists -> {out_dir / (name + '.jsonl')}")
    click.echo(f"stats -> {out_dir / 'stats.json'} ({stats['runtime_s']:.0f} s)")

