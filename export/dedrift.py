"""Take the optimiser's common drift out of a delta's music-token rows.

The music tokens' rows are both input embeddings and (tied) output rows. At every training step the softmax
pushes every music token that is not the target away from the hidden state, and Adam turns even a tiny
gradient into a step of about the learning rate, so rows that the training data rarely or never answers
with all move a long way in one shared direction: in the CPU-trained v2, rows of tokens that answer none
of its pool's turns moved ~2.0 (their start had norm ~1.0) along a direction that their mean drift nearly
fills (norm 1.98 of 2.06), frequent ones ~0.4 along it. That makes the model sure of the codes it was trained
on and blind to the rest (79% of held-out answers are tracks no training conversation answers).

This step estimates the direction as the mean drift, from their start (``init`` of the delta's config,
rebuilt from the pinned base), of the rows whose tokens answer none of the training pool's turns (the
first ``max_train_conversations`` of the config's train file; all modality rows if fewer than 20 qualify),
and removes every modality row's component along it; the LoRA factors and the span markers' rows are
untouched. The result is a new delta; refit its calibration afterwards
(``python -m export.calibrate --delta OUT --retrieval --write``).

    python -m export.dedrift --delta talkplay_edge/models/talkplay-smollm2 --out out/delta-dedrift
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

DEDRIFT_KEY = "dedrift"


def common_drift(rows: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Unit vector of the rows' mean drift from their start."""
    u = (rows - start).mean(axis=0)
    n = float(np.linalg.norm(u))
    if n == 0.0:
        raise ValueError("the rows did not move from their start: nothing to remove")
    return u / n


def remove_drift(rows: np.ndarray, start: np.ndarray, which: np.ndarray,
                 estimate: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """``rows`` with the component of their drift along the common direction removed, for the rows selected
    by the boolean mask ``which``; the direction is estimated on the rows of ``estimate`` (default
    ``which``). Returns (rows, summary)."""
    rows64, start64 = rows.astype(np.float64), start.astype(np.float64)
    est = which if estimate is None else estimate
    u = common_drift(rows64[est], start64[est])
    moved = rows64[which] - start64[which]
    proj = moved @ u
    out = rows64.copy()
    out[which] -= proj[:, None] * u[None, :]
    return out.astype(rows.dtype), {"rows": int(which.sum()), "estimated_on": int(est.sum()),
                                    "mean_drift": round(float(np.linalg.norm(moved, axis=1).mean()), 4),
                                    "mean_removed": round(float(proj.mean()), 4),
                                    "max_removed": round(float(np.abs(proj).max()), 4)}


def answered_tokens(train_file: str, pool: int, catalog) -> set[str]:
    """The music tokens of every track that answers a turn of the first ``pool`` conversations of
    ``train_file`` (0: all of them); empty when the file is not there."""
    from talkplay_edge.conversations import read_conversations

    if not Path(train_file).is_file():
        return set()
    codes = catalog.codes()
    out: set[str] = set()
    for c in read_conversations(train_file, pool or None):
        for t in c["turns"]:
            for tid in (t.get("track_ids") or [])[:1]:
                out.update(codes.get(tid, ()))
    return out


def main(argv: list[str] | None = None) -> dict:
    from safetensors.numpy import save_file

    from export import train as T
    from talkplay_edge.catalog import Catalog
    from talkplay_edge.model_build import load_delta
    from talkplay_edge.tokens import parse_token

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--delta", required=True, help="delta directory (or .safetensors file) to correct")
    ap.add_argument("--out", required=True, help="directory for the corrected delta")
    ap.add_argument("--catalog", default=None, help="catalog (default: the delta's training config's)")
    a = ap.parse_args(argv)

    tensors, meta = load_delta(Path(a.delta))
    config = json.loads(meta.get("config") or "{}")
    if DEDRIFT_KEY in meta:
        raise SystemExit(f"{a.delta}: already de-drifted ({meta[DEDRIFT_KEY]})")
    overrides = [f"--{k}={v}" for k, v in (("base", config.get("base")), ("init", config.get("init")),
                                                 ("seed", config.get("seed"))) if v is not None and v != ""]
    cfg = T.load_config(overrides + [f"--catalog={a.catalog or config.get('catalog') or 'catalog.db'}",
                                     f"--out={a.out}"])
    catalog = Catalog.open(cfg.catalog)
    vocab = json.loads(meta["added_tokens"])
    if vocab != catalog.vocabulary:
        raise SystemExit(f"{a.delta}: its music tokens are not those of {cfg.catalog}")
    model, tok, _ = T.load_base(cfg)
    ids = T.add_music_tokens(model, tok, catalog, cfg.init)
    start = model.get_input_embeddings().weight.detach().numpy()[ids]
    rows = tensors["new_token_embd"]
    which = np.array([parse_token(t).modality is not None for t in vocab])
    answered = answered_tokens(config.get("train") or cfg.train, int(config.get("max_train_conversations") or 0),
                               catalog)
    never = which & np.array([t not in answered for t in vocab])
    new_rows, summary = remove_drift(rows.astype(np.float32), start.astype(np.float32), which,
                                     never if never.sum() >= 20 else None)
    summary["init"] = cfg.init
    tensors = dict(tensors)
    tensors["new_token_embd"] = new_rows.astype(rows.dtype)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {**meta, DEDRIFT_KEY: json.dumps(summary)}
    name = "delta-01-of-01.safetensors"
    save_file(tensors, str(out / name), metadata=meta)
    print(json.dumps({"delta": str(out / name), **summary}))
    return summary


if __name__ == "__main__":
    main()
