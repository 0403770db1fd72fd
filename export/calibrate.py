"""Fit a delta's span calibration (``talkplay_edge.calibration``) on held-out conversations.

Teacher forcing: one forward pass per valid conversation; at every step of every true music span, the
logits of the trie node's children (the runtime's mask), their track counts and the true child are kept.
Per depth (0 = the cf token) a grid search picks the (alpha, beta) with the least mean negative
log-likelihood of the true child; depths with fewer than ``--min_samples`` real choices (nodes with one
child teach nothing) keep (0, 1), the model alone. ``--write`` stores the result beside the delta
(``span_calibration.json``), where ``model_build`` puts it into the GGUF.

    python -m export.calibrate --delta talkplay_edge/models/talkplay-smollm2 --conversations 200 --write

The model is the trainer's (``export/train.py``: base + LoRA + token rows, float32, CPU is fine); the
config gives the base, catalog, valid file and sequence length.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from export import train as T
from talkplay_edge.calibration import SpanCalibration, calibration_file, log_track_counts

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25)
BETAS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.25)
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
def collect(model, examples, trie, start_id: int, show_progress: bool = True) -> list[tuple[int, np.ndarray, np.ndarray, int]]:
    """(depth, child logits, child log track counts, index of the true child) at every multi-child step of
    every true span whose tokens are targets."""
    from talkplay_edge.progress import progress

    out_emb = model.get_output_embeddings().weight
    log_count = log_track_counts(trie)
    samples = []
    it = progress(examples, desc="spans", unit="conv") if show_progress else examples
    for ids, labels in it:
        starts = [i for i, t in enumerate(ids) if t == start_id and i + 1 < len(ids) and labels[i + 1] != -100]
        if not starts:
            continue
        hidden = model.get_decoder()(input_ids=torch.tensor([ids])).last_hidden_state[0]
        for s in starts:
            node, pos, depth, steps = trie.root, s, 0, []
            while trie.track[node] < 0 and pos + 1 < len(ids):
                child_ids, kids = trie.children(node)
                child = trie.child(node, ids[pos + 1])
                if child < 0:
                    break  # not a catalog code (cannot happen with this catalog's data)
                if len(child_ids) > 1:
                    logits = (hidden[pos] @ out_emb[torch.as_tensor(child_ids.astype("int64"))].T).double().numpy()
                    steps.append((depth, logits, log_count[kids], int(np.searchsorted(child_ids, ids[pos + 1]))))
                node, pos, depth = child, pos + 1, depth + 1
            if trie.track[node] >= 0:  # spans cut by seq_len are left out
                samples += steps
    return samples


def _nll(samples, alpha: float, beta: float) -> np.ndarray:
    """Negative log-likelihood of the true child of each sample under (alpha, beta) (the runtime's scores)."""
    cal = SpanCalibration((alpha,), (beta,))
    return np.array([-cal.scores(logits, logc, 0)[target] for _, logits, logc, target in samples])


def _top1(samples, alpha: float, beta: float) -> float:
    cal = SpanCalibration((alpha,), (beta,))
    hits = [int(np.argmax(cal.scores(lg, lc, 0, normalise=False))) == t for _, lg, lc, t in samples]
    return float(np.mean(hits)) if hits else 0.0


def fit(samples, min_samples: int = 30) -> tuple[SpanCalibration, list[dict]]:
    """Per depth, the grid's (alpha, beta) of least NLL; the report has n, NLL and top-1 before and after."""
    depths = max([d for d, *_ in samples] + [MIN_DEPTHS - 1]) + 1
    alpha, beta, report = [], [], []
    for d in range(depths):
        xs = [x for x in samples if x[0] == d]
        a, b, nll = 0.0, 1.0, {}
        if len(xs) >= min_samples:
            nll = {(a, b): _nll(xs, a, b).mean() for a in ALPHAS for b in BETAS}  # holds (0, 1), the model alone
            a, b = min(nll, key=nll.get)
        else:
            nll[a, b] = _nll(xs, a, b).mean() if xs else 0.0
        alpha.append(a)
        beta.append(b)
        report.append({"depth": d, "choices": len(xs), "alpha": a, "beta": b,
                       "nll_model": round(float(nll[0.0, 1.0]), 4), "nll_calibrated": round(float(nll[a, b]), 4),
                       "top1_model": round(_top1(xs, 0.0, 1.0), 4), "top1_calibrated": round(_top1(xs, a, b), 4)})
    return SpanCalibration(tuple(alpha), tuple(beta)), report


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
    args, overrides = p.parse_known_args(argv)  # the rest: trainer config overrides, --key=value
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

    examples = T.load_examples(cfg.valid, tok, catalog, cfg.seq_len, args.conversations)
    trie = T.catalog_trie(tok, catalog)
    samples = collect(model, examples, trie, tok.convert_tokens_to_ids(SPAN_START), show_progress=not args.json)
    if not samples:
        raise SystemExit(f"{cfg.valid}: no music spans to fit on")
    calibration, report = fit(samples, args.min_samples)
    result = {"alpha": list(calibration.alpha), "beta": list(calibration.beta), "valid": cfg.valid,
              "conversations": len(examples), "choices": len(samples), "depths": report,
              "seconds": round(time.time() - t, 1)}
    if args.write:
        f = calibration_file(Path(args.delta))
        f.write_text(json.dumps(result, indent=1) + "\n")
        result["written"] = str(f)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{len(examples)} conversations of {cfg.valid}, {len(samples)} choices, {result['seconds']} s")
        print("depth  choices  alpha  beta   NLL model → calibrated   top-1 model → calibrated")
        for r in report:
            print(f"{r['depth']:5d}  {r['choices']:7d}  {r['alpha']:5.2f}  {r['beta']:4.2f}   "
                  f"{r['nll_model']:9.3f} → {r['nll_calibrated']:.3f}        {r['top1_model']:.3f} → {r['top1_calibrated']:.3f}")
        if args.write:
            print(f"wrote {result['written']}")
    return result


if __name__ == "__main__":
    main()
