"""How far the shipped GGUF is from the torch model it was trained as: max logit difference per quantisation.

    python -m export.compare --delta talkplay_edge/models/talkplay-smollm2            # F16, Q8_0, Q4_K_M
    python -m export.compare --delta out/delta-cpu --ftypes Q8_0 --prompts 2 --json

The torch side is the trainer's own model: the delta's base (the pinned SmolLM2 dequantised by transformers,
or the Hugging Face directory it was trained on), the catalog's tokens appended, the delta's rows and LoRA
factors (``W += B·A``, q/k rows back in Hugging Face order where the delta stores llama.cpp's) merged in.
The GGUF side is ``export.build`` (for the default model: ``model_build.build_model``, the path users run),
evaluated by llama.cpp with all logits.
Prompts are the first valid conversations in the training format (music spans included), so the positions
that choose music tokens are compared too. Reports per ftype: max and mean |Δlogit| over every position and
vocabulary entry, and how often the argmax agrees.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np


def torch_model(delta: Path, catalog):
    """(model, tokenizer, new token ids): the delta's base + the catalog's tokens + the delta, merged, float32,
    eval mode."""
    import torch

    from talkplay_edge.model_build import load_delta

    from export import train

    tensors, meta = load_delta(delta)
    base = meta.get("base", "smollm2")
    model, tok, _ = train.load_base(train.Config(base=base, out=tempfile.mkdtemp(prefix="talkplay-compare-")))
    new_ids = train.add_music_tokens(model, tok, catalog, "mean")
    cfg = model.config
    order = meta.get("lora_qk_order", "llama.cpp")
    with torch.no_grad():
        for key, w in train.new_row_tensors(model):
            w[min(new_ids):] = torch.from_numpy(tensors[key].astype(np.float32))
        inverse = {v: k for k, v in train.LORA_TARGETS.items()}
        for name, a in tensors.items():
            if not name.startswith("lora_a."):
                continue
            gguf = name[len("lora_a."):]  # blk.{i}.{kind}.weight
            _, i, kind, _ = gguf.split(".")
            b = train.qk_rows(tensors[f"lora_b.{gguf}"].astype(np.float32), gguf, cfg, order, back=True)
            parent, attr = inverse[kind].split(".")
            lin = getattr(getattr(model.model.layers[int(i)], parent), attr)
            lin.weight += torch.from_numpy(b @ a.astype(np.float32))
    return model.eval(), tok, new_ids


def compare(delta: Path, catalog_path: Path, ftypes: list[str], n_prompts: int = 4, max_tokens: int = 256,
            threads: int = 2, conversations: Path = Path("conversations/valid.jsonl")) -> dict:
    import llama_cpp
    import torch

    from talkplay_edge.catalog import Catalog
    from talkplay_edge.conversations import read_conversations
    from export import train
    from export.build import build

    catalog = Catalog.open(catalog_path)
    model, tok, new_ids = torch_model(delta, catalog)
    encoder = train.Encoder(tok, catalog, max_tokens)
    prompts = [ex[0] for ex in map(encoder, read_conversations(conversations, n_prompts)) if ex] \
        if Path(conversations).is_file() else []
    if not prompts:  # no conversations built: one hand-written turn with a real span
        tid = catalog.track_ids()[0]
        conv = {"id": "x", "turns": [{"role": "user", "content": "something mellow for a rainy drive"},
                                     {"role": "assistant", "content": "Here you go.", "track_ids": [tid]}]}
        prompts = [encoder(conv)[0]]
    with torch.no_grad():
        reference = [model(input_ids=torch.tensor([ids])).logits[0].float().numpy() for ids in prompts]
    out: dict = {"delta": str(delta), "prompts": len(prompts), "tokens": sum(map(len, prompts)), "ftypes": {}}
    with tempfile.TemporaryDirectory(prefix="talkplay-compare-") as d:
        for ftype in ftypes:
            path = build(delta, Path(d) / f"m.{ftype.lower()}.gguf", ftype=ftype, threads=threads, quiet=True)
            llm = llama_cpp.Llama(str(path), n_ctx=max_tokens + 8, n_batch=max_tokens + 8, logits_all=True,
                                  verbose=False, n_threads=threads)
            # a padded base vocabulary (Qwen: more embedding rows than tokens) puts the music tokens later
            # in the GGUF than in torch: compare token for token
            cols, first_new = np.arange(reference[0].shape[1]), min(new_ids)
            to_gguf = np.where(cols >= first_new, cols + llm.n_vocab() - len(new_ids) - first_new, cols)
            diffs, agree, total, same_tokens = [], 0, 0, True
            for ids, ref in zip(prompts, reference):
                text = tok.decode(ids)
                gguf_ids = [int(to_gguf[i]) for i in ids]
                same_tokens &= llm.tokenize(text.encode(), add_bos=False, special=True) == gguf_ids
                llm.reset()
                llm.eval(gguf_ids)
                ours = np.array(llm.scores[:len(ids)], dtype=np.float32)[:, to_gguf]
                diffs.append(np.abs(ours - ref))
                agree += int((ours.argmax(-1) == ref.argmax(-1)).sum())
                total += len(ids)
            all_d = np.concatenate([x.ravel() for x in diffs])
            out["ftypes"][ftype] = {"max_abs_diff": float(all_d.max()), "mean_abs_diff": float(all_d.mean()),
                                    "argmax_agreement": agree / total, "same_tokenization": bool(same_tokens),
                                    "size_mb": round(path.stat().st_size / 1e6, 1)}
            llm.close()
    out["logit_std"] = float(np.concatenate([r.ravel() for r in reference]).std())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--delta", type=Path, default=Path("talkplay_edge/models/talkplay-smollm2"))
    ap.add_argument("--catalog", type=Path, default=Path("catalog.db"))
    ap.add_argument("--conversations", type=Path, default=Path("conversations/valid.jsonl"),
                    help="prompts: the first conversations of this file (default: a hand-written one if absent)")
    ap.add_argument("--ftypes", default="F16,Q8_0,Q4_K_M")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    r = compare(a.delta, a.catalog, a.ftypes.split(","), a.prompts, threads=a.threads, conversations=a.conversations)
    if a.json:
        print(json.dumps(r, indent=2))
    else:
        print(f"{r['prompts']} prompts, {r['tokens']} tokens; torch logit std {r['logit_std']:.2f}")
        print(f"{'ftype':>8} {'MB':>7} {'max|Δ|':>8} {'mean|Δ|':>8} {'argmax=':>8}")
        for f, s in r["ftypes"].items():
            print(f"{f:>8} {s['size_mb']:>7.1f} {s['max_abs_diff']:>8.3f} {s['mean_abs_diff']:>8.4f} "
                  f"{s['argmax_agreement']:>8.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
