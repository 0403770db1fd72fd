"""Fit a delta's span calibration (``talkplay_edge.calibration``) on held-out conversations.

Teacher forcing: one forward pass per valid conversation; at every step of every true music span, the
logits of the trie node's children (the runtime's mask), their track counts and the true child are kept.
Per depth (0 = the cf token) a grid search picks the (alpha, beta) with the least mean negative
log-likelihood of the true child; depths with fewer than ``--min_samples`` real choices (nodes with one
child teach nothing) keep (0, 1), the model alone, or take the weights of the nearest shallower fitted depth
when those give their few choices a lower NLL (``borrow``; ``--borrow_only`` decides just that for a stored
fit). ``--write`` stores the result beside the delta (``span_calibration.json``), where ``model_build`` puts
it into the GGUF.

    python -m export.calibrate --delta talkplay_edge/models/talkplay-smollm2 --conversations 200 --write

``--held_out N`` asks whether a refit is worth shipping before any eval run: it also scores the new fit and
the delta's stored calibration on the spans of the next N valid conversations (the sum of a span's choice
NLLs, each span under the part the runtime would use), paired span by span with a bootstrap interval.

``--retrieval`` fits a retrieval prior too (``talkplay_edge.retrieval``): the hybrid retrievers rank the
catalog for each span's conversation so far; a grid picks the ``RetrievalSpec`` (weight, gamma, k0) under
which that prior alone gives the true tracks the least NLL, and (alpha, beta) are then fitted per depth
with the retrieved masses in place of the track counts. The spec is stored with the calibration.

The spans of first turns (no track played yet) get a second fit of their own, stored as the calibration's
``cold`` part, which the runtime uses for such requests (``--no_cold``: none): with only the user's words in
the context the model deserves a different weight against the prior. The main fit stays on every span.

``--features`` (the default; ``--no_features``: none) then refines every depth's (alpha, beta) together
with more weights (``SpanCalibration``'s ``count``, ``played``, ``last``, ``named``, ``artist``, ``asked``,
``genre``, ``style`` and ``era``: the log of the tracks below a child; whether a track the conversation has
played, or its last one, lies below it; whether a track by an artist the user's message names, or by the
last played track's artist, does; whether a track that gives what the message asks (a step, a decade, a
mood), has a genre it names, shares a style (a subgenre or an artist's genre) with the last played track, or
was released within two years of it, does: ``talkplay_edge.asks``, the packaged ask head, ``--no_asks`` to
leave these four out)
by L-BFGS on the same NLL, children of played-out subtrees left out as the runtime leaves them out. A
refined beta within ``--snap_beta`` (0.02) of 0 becomes 0 and the rest is refitted: the step barely read
the model, and at beta 0 the runtime decodes nothing before it. The report keeps the grid's NLL and top-1
beside the refined ones. The cold part keeps its grid (alpha, beta) and gets only the ``named``, ``asked``
(a decade, a mood) and ``genre`` weights unless ``--cold_features`` (which refines it like the main part): fitted on 200 first-turn spans, a
refined cold part with a count weight lowered the fit set's NLL but ranked held-out first turns worse
(valid 201–500: MRR .0427 → .0337, Hit@1 7 → 4 of 300).

The model is the trainer's (``export/train.py``: base + LoRA + token rows, float32, CPU is fine); the
config gives the base, catalog, valid file and sequence length.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from export import train as T
from talkplay_edge.calibration import (MARKS, ArtistIndex, SpanCalibration, calibration_file, log_track_counts,
                                       played_marks, read_calibration)
from talkplay_edge.retrieval import RetrievalPrior, RetrievalSpec

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
BETAS = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.25)
RETRIEVAL_WEIGHTS = (0.3, 0.5, 0.7, 0.85)
RETRIEVAL_GAMMAS = (0.5, 1.0, 1.5)
RETRIEVAL_K0S = (1.0, 10.0, 60.0)
MIN_DEPTHS = 6  # cf, tag, meta, lyr, aud, end-or-dup


def load_model(cfg: T.Config, delta: str):
    """(model, tokenizer, catalog) with the delta applied; the LoRA rank is the delta's."""
    from talkplay_edge.catalog import Catalog
    from talkplay_edge.model_build import load_delta

    tensors, _ = load_delta(Path(delta))
    ranks = {v.shape[0] for k, v in tensors.items() if k.startswith("lora_a.")}
    if len(ranks) > 1:
        raise SystemExit(f"{delta}: LoRA factors of several ranks {sorted(ranks)}")
    catalog = Catalog.open(cfg.catalog)
    model, tok, _ = T.load_base(cfg)
    new_ids = T.add_music_tokens(model, tok, catalog, cfg.init)
    lora = T.apply_lora(model, ranks.pop() if ranks else cfg.lora_r, cfg.lora_alpha)
    T.load_init_delta(delta, "", model, lora, new_ids, catalog.vocabulary)
    model.eval()
    return model, tok, catalog


@torch.no_grad()
def collect_spans(model, encoder, conversations, trie, start_id: int, show_progress: bool = True) -> list[dict]:
    """Every true music span of ``conversations`` whose tokens are targets, teacher-forced: a dict with the
    conversation before its turn (``history``, ``played``), the true track (trie index) and ``steps``, one
    (depth, child logits, child node ids, index of the true child) per multi-child step. Spans cut by
    ``seq_len`` are left out."""
    from talkplay_edge.evaluate import iter_turns
    from talkplay_edge.progress import progress

    out_emb = model.get_output_embeddings().weight
    spans = []
    it = progress(conversations, desc="spans", unit="conv") if show_progress else conversations
    for conversation in it:
        ex = encoder(conversation)
        if not ex:
            continue
        ids, labels = ex
        turns = [t for t in iter_turns(conversation) if t[2]]
        starts = [i for i, t in enumerate(ids) if t == start_id and i + 1 < len(ids) and labels[i + 1] != -100]
        if not starts:
            continue
        hidden = model.get_decoder()(input_ids=torch.tensor([ids])).last_hidden_state[0]
        for s, (_, history, _, played) in zip(starts, turns):
            node, pos, depth, steps = trie.root, s, 0, []
            while trie.track[node] < 0 and pos + 1 < len(ids):
                child_ids, kids = trie.children(node)
                child = trie.child(node, ids[pos + 1])
                if child < 0:
                    break  # not a catalog code (cannot happen with this catalog's data)
                if len(child_ids) > 1:
                    logits = (hidden[pos] @ out_emb[torch.as_tensor(child_ids.astype("int64"))].T).double().numpy()
                    steps.append((depth, logits, kids.copy(), int(np.searchsorted(child_ids, ids[pos + 1]))))
                node, pos, depth = child, pos + 1, depth + 1
            if trie.track[node] >= 0:  # spans cut by seq_len are left out
                spans.append({"history": history, "played": played, "track": int(trie.track[node]), "steps": steps})
    return spans


def samples_of(spans, log_prior, trie=None, track_index: dict[str, int] | None = None,
               artists: ArtistIndex | None = None, asks=None) -> list[tuple]:
    """(depth, child logits, child log prior mass, index of the true child) of every step; ``log_prior(i)``
    gives span ``i``'s log mass below every node. With ``trie`` and ``track_index`` each sample also has
    the children's log track counts and ``played_marks`` (the artist marks too, given ``artists``, and the
    asked, genre, style and era marks, given ``asks``), and children whose tracks were all played (the
    runtime never offers them) are left out."""
    from talkplay_edge.trie import Exclusions

    log_tracks = log_track_counts(trie) if trie is not None else None
    out = []
    for i, span in enumerate(spans):
        lm = log_prior(i)
        if trie is None:
            out += [(d, logits, lm[kids], target) for d, logits, kids, target in span["steps"]]
            continue
        marks = played_marks(trie, track_index, span["history"], artists, asks)
        excl = Exclusions(trie, [track_index[t] for t in span["played"] if t in track_index])
        for d, logits, kids, target in span["steps"]:
            keep = np.isin(kids, excl.allowed(int(trie.parent[kids[0]]))[1])  # the runtime's pruned children
            if not keep[target] or keep.sum() < 2:
                continue
            target = int(keep[:target].sum())
            kids, logits = kids[keep], logits[keep]
            mk = np.zeros(len(kids), dtype=np.uint8) if marks is None else marks[kids]
            out.append((d, logits, lm[kids], target, log_tracks[kids], mk))
    return out


def fit_retrieval(spans, rankings: list[list[int]], trie, depth: int) -> tuple[RetrievalSpec, float, float]:
    """The grid's ``RetrievalSpec`` under which the retrieval prior alone gives the true tracks the least mean
    NLL; returns (spec, its NLL, the uniform prior's NLL)."""
    # the true track's place in each ranking (None: not retrieved) does not depend on the spec
    places = [ranked.index(s["track"]) if s["track"] in ranked else None for s, ranked in zip(spans, rankings)]
    best = None
    for weight in RETRIEVAL_WEIGHTS:
        for gamma in RETRIEVAL_GAMMAS:
            for k0 in RETRIEVAL_K0S:
                spec = RetrievalSpec(weight, gamma, k0, depth)
                nll = [-np.log((1 - weight) / trie.n_tracks
                               + (0.0 if j is None else weight * spec.rank_weights(len(ranked))[j]))
                       for j, ranked in zip(places, rankings)]
                v = float(np.mean(nll))
                if best is None or v < best[1]:
                    best = (spec, v)
    return best[0], best[1], float(np.log(trie.n_tracks))


def _scores(cal: SpanCalibration, x: tuple, normalise: bool = True) -> np.ndarray:
    _, logits, logc, _, *more = x
    log_tracks, marks = more if more else (None, None)
    return cal.scores(logits, logc, 0, normalise, log_tracks=log_tracks, marks=marks)


def _nll(samples, alpha: float = 0.0, beta: float = 1.0, cal: SpanCalibration | None = None) -> np.ndarray:
    """Negative log-likelihood of the true child of each sample under (alpha, beta), or ``cal`` (the
    runtime's scores)."""
    cal = cal or SpanCalibration((alpha,), (beta,))
    return np.array([-_scores(cal, x)[x[3]] for x in samples])


def _top1(samples, alpha: float = 0.0, beta: float = 1.0, cal: SpanCalibration | None = None) -> float:
    cal = cal or SpanCalibration((alpha,), (beta,))
    hits = [int(np.argmax(_scores(cal, x, normalise=False))) == x[3] for x in samples]
    return float(np.mean(hits)) if hits else 0.0


def fit(samples, min_samples: int = 30, retrieval: RetrievalSpec | None = None,
        features: bool = False, snap_beta: float = 0.0, marks_only: bool = False) -> tuple[SpanCalibration, list[dict]]:
    """Per depth, the grid's (alpha, beta) of least NLL, refined with the ``count`` and mark weights when
    ``features`` (samples from ``samples_of`` with a trie; ``snap_beta``: see ``refine``; ``marks_only``:
    (alpha, beta) stay the grid's and ``count`` 0); the report has n, NLL and top-1 before and after."""
    depths = max([d for d, *_ in samples] + [MIN_DEPTHS - 1]) + 1
    alpha, beta, report = [], [], []
    extra = {name: [] for name in SpanCalibration.FEATURES}
    for d in range(depths):
        xs = [x for x in samples if x[0] == d]
        a, b, nll = 0.0, 1.0, {}
        if len(xs) >= min_samples:
            nll = {(a, b): _nll(xs, a, b).mean() for a in ALPHAS for b in BETAS}  # holds (0, 1), the model alone
            a, b = min(nll, key=nll.get)
        else:
            nll[a, b] = _nll(xs, a, b).mean() if xs else 0.0
        row = {"depth": d, "choices": len(xs), "alpha": a, "beta": b,
               "nll_model": round(float(nll[0.0, 1.0]), 4), "nll_calibrated": round(float(nll[a, b]), 4),
               "top1_model": round(_top1(xs, 0.0, 1.0), 4), "top1_calibrated": round(_top1(xs, a, b), 4)}
        w = {"alpha": a, "beta": b, **{name: 0.0 for name in SpanCalibration.FEATURES}}
        if features and len(xs) >= min_samples and len(xs[0]) == 6:
            w = refine(xs, a, b, use_count=retrieval is not None and not marks_only, snap_beta=snap_beta,
                       fit_ab=not marks_only)
            cal = _one_depth(w)
            row.update({k: round(v, 4) for k, v in w.items()},
                       nll_grid=row["nll_calibrated"], top1_grid=row["top1_calibrated"],
                       nll_calibrated=round(float(_nll(xs, cal=cal).mean()), 4), top1_calibrated=round(_top1(xs, cal=cal), 4))
        alpha.append(round(w["alpha"], 4))
        beta.append(round(w["beta"], 4))
        for name in extra:
            extra[name].append(round(w[name], 4))
        report.append(row)
    extra = {k: tuple(v) if any(v) else () for k, v in extra.items()}
    return borrow(SpanCalibration(tuple(alpha), tuple(beta), retrieval, **extra), samples, report, min_samples)


def _one_depth(w: dict[str, float]) -> SpanCalibration:
    """A calibration of one depth with the weights ``w`` (``alpha``, ``beta`` and each feature's)."""
    return SpanCalibration((w["alpha"],), (w["beta"],), None, None, *[(w[n],) for n in SpanCalibration.FEATURES])


def _weights(cal: SpanCalibration, d: int) -> dict[str, float]:
    """Depth ``d``'s weights of ``cal`` (0 for a feature it does not weigh)."""
    return {"alpha": cal.alpha[d], "beta": cal.beta[d],
            **{name: (getattr(cal, name)[d] if getattr(cal, name) else 0.0) for name in SpanCalibration.FEATURES}}


def borrow(cal: SpanCalibration, samples, report: list[dict], min_samples: int) -> tuple[SpanCalibration, list[dict]]:
    """A depth with too few choices to fit (``report``'s rows, one per depth of ``cal``) keeps the model
    alone, unless the weights of the nearest shallower fitted depth give its choices a lower mean NLL: then
    it takes those. The last depth of a span (``<|music_end|>`` or a ``<|dup_NNN|>`` token: which of the
    tracks sharing a five-token code) has few choices, and there the model alone does worse than a uniform
    pick (shipped delta: NLL 3.65 on 29 valid choices of 2 to 5 children), so a request's marks (a decade
    it asks, an artist it names) could not tell such tracks apart."""
    rows = [dict(r) for r in report]
    w = [_weights(cal, d) for d in range(len(cal.alpha))]
    for d, row in enumerate(rows):
        fitted = [p for p in range(d) if rows[p]["choices"] >= min_samples and "borrowed_from" not in rows[p]]
        xs = [x for x in samples if x[0] == d] if row["choices"] < min_samples and fitted else []
        if not xs:
            continue
        p = fitted[-1]
        own, theirs = _one_depth(w[d]), _one_depth(w[p])
        nll_own, nll_theirs = float(_nll(xs, cal=own).mean()), float(_nll(xs, cal=theirs).mean())
        row["nll_borrowed"], row["top1_borrowed"] = round(nll_theirs, 4), round(_top1(xs, cal=theirs), 4)
        if nll_theirs < nll_own:
            w[d] = dict(w[p])
            row.update({k: round(v, 4) for k, v in w[d].items()}, borrowed_from=p,
                       nll_calibrated=row["nll_borrowed"], top1_calibrated=row["top1_borrowed"])
    features = {n: tuple(x[n] for x in w) for n in SpanCalibration.FEATURES}
    features = {n: v if any(v) else () for n, v in features.items()}
    return dataclasses.replace(cal, alpha=tuple(x["alpha"] for x in w), beta=tuple(x["beta"] for x in w),
                               **features), rows


def refine(xs, alpha: float, beta: float, use_count: bool = True, l2: float = 1e-3,
           snap_beta: float = 0.0, fit_ab: bool = True) -> dict[str, float]:
    """(alpha, beta, count and the mark weights) of least mean NLL of the true children (L-BFGS from the
    grid's (alpha, beta), or with them fixed unless ``fit_ab``; a little L2 on the other weights); a weight
    whose fact never varies stays 0.
    A beta within ``snap_beta`` of 0 is set to 0 and the rest refitted: such a step barely reads the model,
    and at beta 0 the runtime need not decode before it (``SpanCalibration.uses_logits``)."""
    n, width = len(xs), max(len(x[1]) for x in xs)
    f = np.zeros((n, width, 3 + len(MARKS)))
    valid = np.zeros((n, width), dtype=bool)
    target = np.array([x[3] for x in xs])
    for i, (_, logits, lm, _, lt, mk) in enumerate(xs):
        k = len(logits)
        f[i, :k] = np.stack([logits, lm, lt, *[(mk & bit) > 0 for _, bit in MARKS]], 1)
        valid[i, :k] = True
    free = np.array([fit_ab, fit_ab, use_count, *[(f[..., 3 + j] > 0).any() for j in range(len(MARKS))]])
    F, V, T_ = torch.tensor(f), torch.tensor(valid), torch.tensor(target)
    w = _lbfgs(F, V, T_, free, [beta, alpha] + [0.0] * (1 + len(MARKS)), l2)
    if fit_ab and snap_beta and w[0] != 0.0 and abs(w[0]) < snap_beta:
        free[0] = False
        w = _lbfgs(F, V, T_, free, [0.0] + w[1:], l2)
    return dict(zip(("beta", "alpha", "count", *[name for name, _ in MARKS]), w))


def _lbfgs(F, V, T_, free, start: list[float], l2: float) -> list[float]:
    """``refine``'s L-BFGS from ``start`` (beta, alpha, count, then the mark weights) over the weights marked
    ``free`` (the others stay at their start)."""
    if not free.any():
        return list(start)
    n = len(T_)
    w = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor(free, dtype=torch.float64)
    fixed = torch.tensor(start, dtype=torch.float64) * (1 - mask)
    opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        ww = w * mask + fixed
        s = (F @ ww).masked_fill(~V, float("-inf"))
        loss = -torch.log_softmax(s, 1)[torch.arange(n), T_].mean() + l2 * (ww[2:] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return (w * mask + fixed).detach().tolist()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m export.calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("--delta", default="talkplay_edge/models/talkplay-smollm2", help="delta file or directory")
    p.add_argument("--config", default="export/configs/smollm2-cpu-continue.json",
                   help="trainer config: base, catalog, valid file, seq_len (its init_delta is ignored; '' for none)")
    p.add_argument("--valid", help="held-out conversations (default: the config's valid file)")
    p.add_argument("--conversations", type=int, default=200, help="how many (the file's first)")
    p.add_argument("--min_samples", type=int, default=30, help="fewer choices at a depth: keep the model alone")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--write", action="store_true", help=f"store it beside the delta ({calibration_file(Path('DELTA')).name})")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--retrieval", action="store_true",
                   help="fit a retrieval prior too (talkplay_edge.retrieval: the hybrid retrievers' ranking)")
    p.add_argument("--retrieval_depth", type=int, default=600, help="tracks of the retrieved ranking given mass")
    p.add_argument("--no_cold", dest="cold", action="store_false",
                   help="one (alpha, beta) for every request (default: a second one, \"cold\", for requests with "
                        "no track played yet, fitted on those spans alone)")
    p.add_argument("--min_cold_spans", type=int, default=50, help="fewer first-turn spans: no cold part")
    p.add_argument("--no_features", dest="features", action="store_false",
                   help="(alpha, beta) alone (default: refine them with the count and mark weights)")
    p.add_argument("--cold_features", action="store_true",
                   help="refine the cold part like the main one (default: its grid (alpha, beta) and the named "
                        "weight alone; a refined one did worse on held-out first turns)")
    p.add_argument("--no_asks", dest="asks", action="store_false",
                   help="leave out the asked, genre, style and era marks (what a request asks: a step from the "
                        "last track, a decade, a mood; a genre it names; the last track's style and years)")
    p.add_argument("--ask_head", default=None, help="the ask head (default: the packaged models/ask_head.npz)")
    p.add_argument("--snap_beta", type=float, default=0.02,
                   help="a refined beta closer to 0 than this becomes 0, the rest refitted: the runtime then "
                        "decodes nothing before that step (0: never)")
    p.add_argument("--held_out", type=int, default=0,
                   help="also score the new fit and the delta's stored calibration on the spans of the file's next "
                        "N conversations (mean NLL of the true track, paired): is a refit worth shipping?")
    p.add_argument("--borrow_only", action="store_true",
                   help="keep the delta's stored calibration and only decide, on these spans, which of its depths "
                        "with too few choices to fit take a shallower depth's weights (``borrow``)")
    args, overrides = p.parse_known_args(argv)  # the rest: trainer config overrides, --key=value
    if args.held_out and (args.borrow_only or not args.conversations):
        p.error("--held_out scores a new fit on the conversations after the first --conversations N "
                "(so N > 0, and not with --borrow_only, which fits nothing)")
    if args.threads:
        torch.set_num_threads(args.threads)
    scratch = tempfile.mkdtemp(prefix="talkplay-calibrate-")  # the trainer's loaders write tokenizer files here
    cfg = T.load_config((["--config", args.config] if args.config else []) + [f"--init_delta={args.delta}", f"--out={scratch}"] + overrides
                        + ([f"--valid={args.valid}"] if args.valid else []))
    if not Path(args.delta).exists():
        raise SystemExit(f"{args.delta}: no such delta")
    t = time.time()
    model, tok, catalog = load_model(cfg, args.delta)
    from talkplay_edge.tokens import SPAN_START

    from talkplay_edge.conversations import read_conversations

    conversations = read_conversations(cfg.valid, args.conversations or None)
    trie = T.catalog_trie(tok, catalog)
    spans = collect_spans(model, T.Encoder(tok, catalog, cfg.seq_len), conversations, trie,
                          tok.convert_tokens_to_ids(SPAN_START), show_progress=not args.json)
    spec, extra = None, {}
    track_index = {t: i for i, t in enumerate(sorted(catalog.codes()))}  # trie order
    stored = None
    if args.borrow_only:
        stored = read_calibration(Path(args.delta))
        if stored is None:
            raise SystemExit(f"{args.delta}: no stored calibration to borrow within ({calibration_file(Path(args.delta))})")
        stored_report = json.loads(calibration_file(Path(args.delta)).read_text())
        args.retrieval, args.features = stored.retrieval is not None, stored.uses_marks
        args.asks = stored.uses_asks
    if args.retrieval and spans:  # the stored spec (--borrow_only), or the grid's
        spec = stored.retrieval if stored is not None else None
        prior = RetrievalPrior(catalog, trie, track_index, spec or RetrievalSpec(depth=args.retrieval_depth),
                               show_progress=not args.json)
        rankings = [prior.ranking(s["history"], set(s["played"])) for s in spans]
        if spec is None:
            spec, nll, uniform = fit_retrieval(spans, rankings, trie, args.retrieval_depth)
            prior = RetrievalPrior(catalog, trie, prior.track_index, spec)
            extra = {"retrieval": {**spec.to_dict(), "nll_prior": round(nll, 4), "nll_uniform": round(uniform, 4)}}
        masses = [np.log(prior.mass(r)) for r in rankings]
        log_prior = masses.__getitem__
    else:
        log_count = log_track_counts(trie)
        log_prior = lambda i: log_count  # noqa: E731
    artists = ArtistIndex.from_catalog(catalog, track_index) if args.features else None
    asks = None
    if args.features and args.asks:
        from talkplay_edge.asks import AskHead, Asks
        from talkplay_edge.text_encoder import TextEncoder

        asks = Asks(catalog, track_index, AskHead.load(args.ask_head), TextEncoder().encode, artists)
    samples = samples_of(spans, log_prior, trie, track_index, artists, asks)
    if not samples:
        raise SystemExit(f"{cfg.valid}: no music spans to fit on")
    cold = [i for i, s in enumerate(spans) if not s["played"]]  # first turns: no track played yet
    cold_samples = lambda: samples_of([spans[i] for i in cold], lambda j: log_prior(cold[j]), trie,  # noqa: E731
                                      track_index, artists, asks)
    sizes = {"valid": cfg.valid, "conversations": len(conversations), "spans": len(spans), "choices": len(samples)}
    if stored is not None:  # the stored fit stays; only its sparse depths are decided again, on these spans
        calibration, report = borrow(dataclasses.replace(stored, cold=None), samples, stored_report["depths"],
                                     args.min_samples)
        extra = {k: stored_report[k] for k in ("retrieval",) if k in stored_report}
        if stored.cold is not None:
            cold_cal, cold_report = borrow(stored.cold, cold_samples(), stored_report["cold"]["depths"],
                                           args.min_samples)
            calibration = dataclasses.replace(calibration, cold=cold_cal)
            extra["cold"] = {**cold_cal.to_dict(), "spans": stored_report["cold"]["spans"], "depths": cold_report}
        extra["borrowed_on"] = sizes
        sizes = {k: stored_report[k] for k in sizes}  # what the stored fit was fitted on
    else:
        calibration, report = fit(samples, args.min_samples, spec, args.features, args.snap_beta)
        if args.cold and len(cold) >= args.min_cold_spans:
            cold_cal, cold_report = fit(cold_samples(), args.min_samples, spec, args.features, args.snap_beta,
                                        marks_only=not args.cold_features)
            calibration = dataclasses.replace(calibration, cold=dataclasses.replace(cold_cal, retrieval=None))
            extra["cold"] = {**cold_cal.to_dict(), "spans": len(cold), "depths": cold_report}
    result = {**calibration.to_dict(), **extra, **sizes, "depths": report}  # extra: retrieval's and cold part's reports
    if args.held_out:
        result["held_out"] = held_out(model, tok, catalog, cfg, trie, track_index, artists, asks, calibration,
                                      read_calibration(Path(args.delta)), args.conversations, args.held_out,
                                      show_progress=not args.json)
    result["seconds"] = round(time.time() - t, 1)
    if args.write:
        f = calibration_file(Path(args.delta))
        f.write_text(json.dumps(result, indent=1) + "\n")
        result["written"] = str(f)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{len(conversations)} conversations of {cfg.valid}, {len(spans)} spans, {len(samples)} choices, "
              f"{result['seconds']} s" + (" (the stored fit kept; only its sparse depths decided)" if stored else ""))
        if spec is not None:
            r = result["retrieval"]
            print(f"retrieval prior: weight {spec.weight}, gamma {spec.gamma}, k0 {spec.k0}, depth {spec.depth}; "
                  f"NLL of the true track {r['nll_uniform']:.3f} (uniform) → {r['nll_prior']:.3f}")
        tables = [("", report)]
        if "cold" in result:
            tables = [(f"every request ({len(spans)} spans):", report),
                      (f"cold: first turns, no track played yet ({len(cold)} spans):", result["cold"]["depths"])]
        for title, rows in tables:
            if title:
                print(title)
            refined = any("nll_grid" in r for r in rows)
            print("depth  choices  alpha   beta   NLL model → calibrated   top-1 model → calibrated"
                  + ("".join(f"  {name:>6s}" for name in SpanCalibration.FEATURES) + "   (grid NLL, top-1)"
                     if refined else ""))
            for r in rows:
                print(f"{r['depth']:5d}  {r['choices']:7d}  {r['alpha']:5.2f}  {r['beta']:5.2f}   "
                      f"{r['nll_model']:9.3f} → {r['nll_calibrated']:.3f}        {r['top1_model']:.3f} → {r['top1_calibrated']:.3f}"
                      + ("".join(f"  {r[name]:6.2f}" for name in SpanCalibration.FEATURES)
                         + f"   ({r['nll_grid']:.3f}, {r['top1_grid']:.3f})" if "nll_grid" in r else "")
                      + (f"   depth {r['borrowed_from']}'s weights" if "borrowed_from" in r else
                         f"   (depth above's weights: NLL {r['nll_borrowed']:.3f}, kept the model's)"
                         if "nll_borrowed" in r else ""))
        if "held_out" in result:
            h = result["held_out"]
            print(f"held out: {h['spans']} spans of {h['conversations']} more conversations; mean NLL of the true "
                  f"track, this fit {h['nll_fit']:.4f}" + ("" if h["nll_stored"] is None else
                  f", stored {h['nll_stored']:.4f}: difference {h['difference']:+.4f} (95% CI {h['ci95'][0]:+.4f} .. "
                  f"{h['ci95'][1]:+.4f}), {h['better']} spans better, {h['worse']} worse"))
        if args.write:
            print(f"wrote {result['written']}")
    return result


def held_out(model, tok, catalog, cfg, trie, track_index, artists, asks, fitted: SpanCalibration,
             stored: SpanCalibration | None, skip: int, n: int, show_progress: bool = True) -> dict:
    """Mean NLL of the true track (its span choices summed, each span scored by the part the runtime would
    use: cold on a first turn) on the spans of conversations ``skip`` .. ``skip + n`` of the valid file, under
    ``fitted`` and, paired span by span with a bootstrap 95% interval of the difference, ``stored``."""
    from talkplay_edge.conversations import read_conversations
    from talkplay_edge.tokens import SPAN_START

    conversations = read_conversations(cfg.valid, skip + n)[skip:]
    spans = collect_spans(model, T.Encoder(tok, catalog, cfg.seq_len), conversations, trie,
                          tok.convert_tokens_to_ids(SPAN_START), show_progress=show_progress)
    samples: dict = {}  # retrieval spec (or None) -> each span's samples under its prior, made once per spec

    def nll(cal: SpanCalibration) -> np.ndarray:
        spec = cal.retrieval
        if spec not in samples:
            if spec is None:
                log_count = log_track_counts(trie)
                priors = [log_count] * len(spans)
            else:
                prior = RetrievalPrior(catalog, trie, track_index, spec, show_progress=show_progress)
                priors = [np.log(prior.mass(prior.ranking(s["history"], set(s["played"])))) for s in spans]
            samples[spec] = [samples_of([s], lambda _, lp=lp: lp, trie, track_index, artists, asks)
                             for s, lp in zip(spans, priors)]
        return np.array([float(_nll(xs, cal=cal.pick(not s["played"])).sum()) if xs else 0.0
                         for s, xs in zip(spans, samples[spec])])

    fit_nll = nll(fitted)
    res = {"conversations": len(conversations), "spans": len(spans), "nll_fit": round(float(fit_nll.mean()), 4),
           "nll_stored": None}
    if stored is not None and len(spans):
        d = fit_nll - nll(stored)
        rng = np.random.default_rng(0)
        boot = [float(d[rng.integers(0, len(d), len(d))].mean()) for _ in range(2000)]
        res.update(nll_stored=round(float(fit_nll.mean() - d.mean()), 4), difference=round(float(d.mean()), 4),
                   ci95=[round(float(q), 4) for q in np.quantile(boot, [0.025, 0.975])],
                   better=int((d < -1e-9).sum()), worse=int((d > 1e-9).sum()))
    return res


if __name__ == "__main__":
    main()
