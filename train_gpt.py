"""
train_gpt.py: train a GPT (nanoGPT-style) on openwebtext-100k with any optimizer of reg.py.

    python train_gpt.py                                   # GPT-2 124M on CUDA, tiny on CPU
    python train_gpt.py --optimizer adamw,reg,muon        # compare: same seed, same data
    python train_gpt.py --preset tiny --data ../shared/data/tinyshakespeare/input.txt \\
        --bpe-dir ../shared/data/gpt2-bpe                 # local text, no network
    python train_gpt.py --resume out/gpt/reg-lr0.0006-s0  # continue an interrupted run
    python train_gpt.py --init-from out/gpt/adamw-lr0.0006-s0/ckpt.pt --data other.txt \\
        --optimizer reg,muon,adamw                        # fine-tune an AdamW-trained model
    python train_gpt.py --preset small --tokenizer bytes --optimizer adamw,muon,reg \\
        --lr 1e-3,4e-3,1.6e-2 --seed 0 --out-dir out/sweep  # an lr sweep (rerun: reuses runs)
    python train_gpt.py --summarize out/sweep             # its table and plot, per optimizer and lr

The default data set is Elriggs/openwebtext-100k (one 303 MB Parquet file from the Hugging
Face hub), tokenized once with GPT-2 BPE into uint16 files under --cache-dir and reused.
--data trains on local text instead: Parquet with a `text` column, JSON Lines (optionally
.gz) with a `text` field, plain .txt (one document per file), or a directory of them.

Every run writes to --out-dir/<optimizer>-lr<lr>-s<seed>/: log.jsonl (one line per eval:
step, train loss, val loss, lr, time), ckpt.pt (model, optimizer, step, RNG and data
position, written atomically) and, in compare mode, a summary table, results.csv and a
loss plot (PNG, when matplotlib is installed).

Measured (README, "Results"): the `small` preset with --tokenizer bytes (0.85M parameters,
300 steps of 16x128 bytes of the OpenWebText sample, about 3 minutes on one core of a
2-core AMD EPYC) reaches a validation loss of 2.48 nats per byte with AdamW and 2.01-2.06
with Muon, MuonEq and NorMuon, each at its own swept learning rate (mean of 3 seeds).
No GPU numbers have been measured yet.
"""

import argparse
import gzip
import hashlib
import itertools
import json
import math
import os
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import reg

# -----------------------------------------------------------------------------
# Data: download, read, tokenize, cache
# -----------------------------------------------------------------------------

OWT_URL = ("https://huggingface.co/datasets/Elriggs/openwebtext-100k/resolve/main/"
           "data/train-00000-of-00001-10a4de027237eace.parquet")
OWT_BYTES = 302_558_045
CACHE_VERSION = 2  # bump when the cache layout or the split rule changes


class ReportedError(Exception):
    """A problem shown to the user as one clear message, without a traceback: bad data,
    bad settings, no network, a diverged run."""


def download(url, dest, expected_bytes):
    """Fetch url to dest once, with a progress bar. The bytes go to a temporary name and
    are renamed only after the size checks out, so an interrupted download never leaves
    a file that looks complete."""
    dest = Path(dest)
    if dest.exists() and dest.stat().st_size == expected_bytes:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f, \
                tqdm(total=expected_bytes, unit="B", unit_scale=True, desc=f"download {dest.name}") as bar:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
    except OSError as e:  # URLError, timeouts and disk errors are all OSErrors
        tmp.unlink(missing_ok=True)
        raise ReportedError(
            f"could not download {url} ({e}).\nIt is expected at {dest}: download it there by "
            f"hand, or train on local text with --data PATH (.parquet, .jsonl[.gz], .txt or a "
            f"directory), e.g. --data ../shared/data/openwebtext-sample") from None
    if tmp.stat().st_size != expected_bytes:
        got = tmp.stat().st_size
        tmp.unlink()
        raise ReportedError(f"download of {url} gave {got:,} bytes, expected {expected_bytes:,}; "
                        "run again to retry")
    os.replace(tmp, dest)
    return dest


def text_files(path):
    """The files --data names: the file itself, or the readable files in a directory."""
    path = Path(path)
    if not path.exists():
        raise ReportedError(f"--data {path}: no such file or directory")
    suffixes = (".parquet", ".jsonl", ".jsonl.gz", ".txt")
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and p.name.endswith(suffixes))
    if not files:
        raise ReportedError(f"--data {path}: no .parquet, .jsonl, .jsonl.gz or .txt files in it")
    for f in files:
        if not f.name.endswith(suffixes):
            raise ReportedError(f"--data {f}: unknown format; use .parquet (with a `text` column), "
                            ".jsonl or .jsonl.gz (a `text` field per line) or .txt")
    return files


def read_documents(file):
    """The documents in one file, as a list of str."""
    name = file.name
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq  # only needed for Parquet
        try:
            schema = pq.read_schema(file)
        except Exception as e:  # pyarrow raises its own error types for bad files
            raise ReportedError(f"{file}: not a readable Parquet file ({e})") from None
        if "text" not in schema.names:
            raise ReportedError(f"{file}: no `text` column (columns: {', '.join(schema.names)})")
        return [t for t in pq.read_table(file, columns=["text"]).column("text").to_pylist() if t]
    if name.endswith((".jsonl", ".jsonl.gz")):
        opener = gzip.open if name.endswith(".gz") else open
        docs = []
        with opener(file, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ReportedError(f"{file}, line {number}: not JSON ({e})") from None
                if not isinstance(record, dict) or "text" not in record:
                    raise ReportedError(f"{file}, line {number}: no `text` field")
                if record["text"]:
                    docs.append(record["text"])
        return docs
    try:
        text = Path(file).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ReportedError(f"{file}: not UTF-8 text ({e})") from None
    return [text] if text else []


class ByteTokenizer:
    """Each UTF-8 byte is a token (0-255), 256 ends a document. With 257 symbols the
    embedding and head are tiny, so nearly every weight is a hidden matrix that the matrix
    optimizers train, and a CPU spends its time in the blocks rather than in a 50k-way
    softmax: the setting in which optimizers of hidden matrices can be compared on a CPU.
    Losses are per byte, so they are not comparable with GPT-2 BPE losses (per token)."""
    name, n_vocab, eot_token = "bytes", 257, 256

    def encode_ordinary_batch(self, texts):
        return [list(text.encode("utf-8")) for text in texts]


def load_tokenizer(bpe_dir=None, kind="gpt2"):
    """The tokenizer that --tokenizer names: "gpt2" (BPE) or "bytes"."""
    if kind == "bytes":
        return ByteTokenizer()
    return load_gpt2_tokenizer(bpe_dir)


def load_gpt2_tokenizer(bpe_dir=None):
    """GPT-2 BPE through tiktoken, as nanoGPT does. tiktoken downloads its two files on
    first use; with no network, point --bpe-dir at a folder holding encoder.json and
    vocab.bpe (byte-identical copies, e.g. ../shared/data/gpt2-bpe)."""
    import tiktoken
    if bpe_dir is None:
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:  # tiktoken surfaces network failures as assorted errors
            raise ReportedError(f"could not load the GPT-2 tokenizer ({type(e).__name__}: {e}).\n"
                            "Offline? Pass --bpe-dir DIR with encoder.json and vocab.bpe, "
                            "e.g. --bpe-dir ../shared/data/gpt2-bpe") from None
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str
    bpe_dir = Path(bpe_dir)
    for name in ("encoder.json", "vocab.bpe"):
        if not (bpe_dir / name).is_file():
            raise ReportedError(f"--bpe-dir {bpe_dir}: {name} is missing")
    ranks = data_gym_to_mergeable_bpe_ranks(str(bpe_dir / "vocab.bpe"), str(bpe_dir / "encoder.json"))
    return tiktoken.Encoding(name="gpt2-local", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": len(ranks)})


def fingerprint(files):
    """What the cache depends on: each source file's path, size and modification time."""
    return [[str(Path(f).resolve()), Path(f).stat().st_size, Path(f).stat().st_mtime_ns] for f in files]


def prepare(files, cache_dir, tokenizer, val_fraction, seed):
    """Tokenize `files` into cache_dir/{train,val}.bin (uint16) plus meta.json, or reuse a
    cache that matches. Documents are split into train and val by a seeded permutation,
    with <|endoftext|> after every document. A single document (one .txt) is split by
    position instead: its last `val_fraction` of tokens is val, as nanoGPT does for
    Shakespeare."""
    cache_dir = Path(cache_dir)
    want = dict(version=CACHE_VERSION, sources=fingerprint(files), tokenizer=tokenizer.name,
                n_vocab=tokenizer.n_vocab, val_fraction=val_fraction, seed=seed)
    meta_path = cache_dir / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if {k: meta.get(k) for k in want} != json.loads(json.dumps(want)):
            print(f"cache {cache_dir} is stale (the data or settings changed): tokenizing again")
        elif not all((cache_dir / f"{s}.bin").exists() and
                     (cache_dir / f"{s}.bin").stat().st_size == 2 * meta[f"{s}_tokens"]
                     for s in ("train", "val")):
            print(f"cache {cache_dir} is truncated or incomplete: tokenizing again")
        else:
            return meta

    docs = [d for f in tqdm(files, desc="read", disable=len(files) < 2) for d in read_documents(f)]
    if not docs:
        raise ReportedError(f"no text in {', '.join(map(str, files))}")
    unique = list(dict.fromkeys(docs))  # a repeated document could land in train and in val
    if len(unique) < len(docs):
        print(f"dropped {len(docs) - len(unique):,} exact duplicate documents of {len(docs):,}")
        docs = unique
    if tokenizer.n_vocab > 2 ** 16:
        raise ReportedError("the tokenizer's vocabulary does not fit uint16")
    eot = tokenizer.eot_token
    order = np.random.default_rng(seed).permutation(len(docs))
    n_val = 0 if len(docs) == 1 else max(1, round(val_fraction * len(docs)))
    is_val = np.zeros(len(docs), dtype=bool)
    is_val[order[:n_val]] = True

    cache_dir.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)  # meta.json is written last: its presence marks a done cache
    tmp = {s: cache_dir / f"{s}.bin.tmp" for s in ("train", "val")}
    counts = {"train": 0, "val": 0}
    chunk = 256
    with open(tmp["train"], "wb") as f_train, open(tmp["val"], "wb") as f_val, \
            tqdm(total=len(docs), desc="tokenize", unit="doc") as bar:
        for start in range(0, len(docs), chunk):
            batch = docs[start:start + chunk]
            for i, ids in enumerate(tokenizer.encode_ordinary_batch(batch)):
                ids.append(eot)
                split = "val" if is_val[start + i] else "train"
                (f_val if split == "val" else f_train).write(np.asarray(ids, dtype=np.uint16).tobytes())
                counts[split] += len(ids)
            bar.update(len(batch))
    if n_val == 0:  # one document: the tail of its tokens is val
        tokens = np.fromfile(tmp["train"], dtype=np.uint16)
        cut = len(tokens) - max(1, round(val_fraction * len(tokens)))
        tokens[:cut].tofile(tmp["train"])
        tokens[cut:].tofile(tmp["val"])
        counts = {"train": cut, "val": len(tokens) - cut}
    for split, path in tmp.items():
        os.replace(path, cache_dir / f"{split}.bin")
    meta = dict(want, n_docs=len(docs), n_val_docs=n_val, eot=eot,
                train_tokens=counts["train"], val_tokens=counts["val"])
    tmp_meta = meta_path.with_suffix(".json.tmp")
    tmp_meta.write_text(json.dumps(meta, indent=1))
    os.replace(tmp_meta, meta_path)
    print(f"tokenized {len(docs):,} documents: {counts['train']:,} train and "
          f"{counts['val']:,} val tokens in {cache_dir}")
    return meta


def load_data(args):
    """Find or fetch the text, tokenize it (or reuse the cache), and map the token files."""
    if args.data is None:
        source = Path(args.cache_dir) / "openwebtext-100k" / OWT_URL.rsplit("/", 1)[1]
        name, key = "openwebtext-100k", "hub"
    else:
        source, name = Path(args.data), Path(args.data).resolve().name
        key = hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:8]
    cache_dir = Path(args.cache_dir) / f"{name}-{key}" / args.tokenizer
    if args.data is None and not source.exists() and (cache_dir / "meta.json").exists():
        # The download was removed after tokenizing: the token cache alone is enough.
        meta = json.loads((cache_dir / "meta.json").read_text())
    else:
        files = [download(OWT_URL, source, OWT_BYTES)] if args.data is None else text_files(args.data)
        meta = prepare(files, cache_dir, load_tokenizer(args.bpe_dir, args.tokenizer), args.val_fraction, args.data_seed)
    splits = {s: np.memmap(cache_dir / f"{s}.bin", dtype=np.uint16, mode="r") for s in ("train", "val")}
    for split, tokens in splits.items():
        if len(tokens) < args.block_size + 2:
            raise ReportedError(
                f"the {split} split has {len(tokens):,} tokens, too few for --block-size "
                f"{args.block_size}: lower --block-size, or give more text"
                + (" or raise --val-fraction" if split == "val" else ""))
    return splits, meta


class Batches:
    """Random windows of block_size+1 tokens (nanoGPT's get_batch), drawn by a seeded
    torch.Generator whose state is the data position a checkpoint saves."""

    def __init__(self, tokens, batch_size, block_size, device, seed):
        self.tokens, self.batch_size, self.block_size = tokens, batch_size, block_size
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)
        self.offsets = np.arange(block_size + 1)

    def window(self, starts):
        rows = torch.from_numpy(self.tokens[starts[:, None] + self.offsets].astype(np.int64))
        if self.device.type == "cuda":  # pinned memory lets the copy overlap the GPU's work
            rows = rows.pin_memory().to(self.device, non_blocking=True)
        else:
            rows = rows.to(self.device)
        return rows[:, :-1], rows[:, 1:]

    def next(self):
        high = len(self.tokens) - self.block_size - 1
        starts = torch.randint(high, (self.batch_size,), generator=self.generator).numpy()
        return self.window(starts)

    def fixed(self, n_batches):
        """The same evenly spaced windows every time: a fixed validation set."""
        starts = np.linspace(0, len(self.tokens) - self.block_size - 1,
                             n_batches * self.batch_size).astype(np.int64)
        return [self.window(s) for s in np.split(starts, n_batches)]


# -----------------------------------------------------------------------------
# The model: a GPT in the nanoGPT mould
# -----------------------------------------------------------------------------

@dataclass
class GPTConfig:
    vocab_size: int = 50304  # GPT-2's 50257 padded to a multiple of 64 (faster matmuls)
    block_size: int = 1024   # context length
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0     # 0 for pre-training, as nanoGPT


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.proj_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # Flash attention where the device has it: never materializes the T x T matrix.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj_dropout(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=False), nn.GELU(),
                                 nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=False),
                                 nn.Dropout(cfg.dropout))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        # Registered last, so reg.param_groups' "last nn.Linear is the head" holds; tied to
        # wte (as GPT-2), so it is one parameter and goes to AdamW with the embeddings.
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        T = idx.size(1)
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits
        # Under bfloat16 autocast, cross_entropy runs in float32 by itself.
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    def flops_per_token(self):
        """Training FLOPs per token (PaLM appendix B, as nanoGPT's estimate_mfu): 6 per
        non-embedding-lookup weight plus the attention matmuls."""
        n = sum(p.numel() for p in self.parameters()) - self.wpe.weight.numel()
        c = self.cfg
        return 6 * n + 12 * c.n_layer * c.n_embd * c.block_size


# -----------------------------------------------------------------------------
# Schedule and evaluation
# -----------------------------------------------------------------------------

def lr_factor(step, args):
    """Linear warmup, then cosine down to min_lr_ratio, or warmup-stable-decay (flat, then
    linear down over the last decay_fraction of the run)."""
    if step < args.warmup_steps:
        return (step + 1) / args.warmup_steps
    if args.schedule == "wsd":
        decay_start = int(args.max_steps * (1 - args.decay_fraction))
        if step < decay_start:
            return 1.0
        progress = (step - decay_start) / max(1, args.max_steps - decay_start)
    else:
        progress = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
        progress = 0.5 * (1 - math.cos(math.pi * min(1.0, progress)))
    return 1.0 - (1.0 - args.min_lr_ratio) * progress


@torch.no_grad()
def evaluate(model, batches, autocast):
    model.eval()
    losses = []
    for x, y in batches:
        with autocast:
            losses.append(model(x, y))
    model.train()
    return torch.stack(losses).mean().item()


def inspect_matrix(opt, p):
    """reg.matrix_stats of a weight's momentum and of the update direction the optimizer
    would apply to it now, computed on copies: inspecting never changes the run."""
    group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
    state = opt.state.get(p, {})
    m, n = reg.matrix_shape(p)
    if isinstance(opt, reg.MatrixOptimizer) and "momentum_buffer" in state:
        momentum = state["momentum_buffer"].reshape(m, n).float()
        copies = [{k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}]
        update = opt.direction(momentum[None].clone(), copies, group)[0]
    elif "exp_avg" in state:  # AdamW: the bias-corrected m / (sqrt(v) + eps)
        beta1, beta2 = group["betas"]
        step = float(state["step"])
        momentum = state["exp_avg"].reshape(m, n).float()
        v_hat = state["exp_avg_sq"].reshape(m, n).float() / (1 - beta2 ** step)
        update = momentum / (1 - beta1 ** step) / (v_hat.sqrt() + group["eps"])
    else:
        return None
    return dict(momentum=reg.matrix_stats(momentum), update=reg.matrix_stats(update))


# -----------------------------------------------------------------------------
# Checkpoints: atomic writes, exact resume
# -----------------------------------------------------------------------------

def save_atomic(obj, path):
    """torch.save to a temporary name, then rename: a crash mid-write never replaces the
    last good checkpoint with half of a new one."""
    tmp = Path(str(path) + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, what):
    path = Path(path)
    if path.is_dir():
        path = path / "ckpt.pt"
    if not path.is_file():
        raise ReportedError(f"{what} {path}: no checkpoint there")
    try:
        return torch.load(path, map_location="cpu", weights_only=False), path
    except Exception as e:  # a truncated or foreign file
        raise ReportedError(f"{what} {path}: not a readable checkpoint ({e})") from None


def read_log(path, up_to_step):
    """The log lines of steps <= up_to_step (a resumed run re-does the steps after its
    checkpoint, so their lines are dropped and written again)."""
    if not path.exists():
        return []
    return [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= up_to_step]


# -----------------------------------------------------------------------------
# One training run
# -----------------------------------------------------------------------------

def train(args, optimizer_name, lr, seed, splits, meta, run_dir, resume_from=None, also_val=None):
    """Train one model; returns a summary dict. Raises ReportedError on a non-finite loss.
    also_val: tokens of a second validation set (--also-eval), logged as also_val_loss."""
    device = torch.device(args.device)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path = run_dir / "ckpt.pt", run_dir / "log.jsonl"
    resumed = load_checkpoint(resume_from, "--resume")[0] if resume_from else None
    init = load_checkpoint(args.init_from, "--init-from")[0] if args.init_from and not resumed else None

    # Same seed, same initial weights and same data order for every optimizer.
    torch.manual_seed(seed)
    if resumed:
        cfg = GPTConfig(**resumed["model_config"])
    elif init:
        cfg = GPTConfig(**{**init["model_config"], "dropout": args.dropout})
    else:
        cfg = GPTConfig(vocab_size=math.ceil(meta["n_vocab"] / 64) * 64, block_size=args.block_size,
                        n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                        dropout=args.dropout)
    if init and init["args"].get("tokenizer", "gpt2") != args.tokenizer:
        raise ReportedError(f"--init-from {args.init_from} was trained with --tokenizer "
                            f"{init['args'].get('tokenizer', 'gpt2')}: pass the same --tokenizer")
    if cfg.n_embd % cfg.n_head:
        raise ReportedError(f"--n-embd {cfg.n_embd} must be divisible by --n-head {cfg.n_head}")
    if meta["n_vocab"] > cfg.vocab_size:
        raise ReportedError(f"the checkpoint's vocabulary ({cfg.vocab_size}) is smaller than the "
                        f"tokenizer's ({meta['n_vocab']})")
    if args.block_size > cfg.block_size:
        raise ReportedError(f"--block-size {args.block_size} is longer than the model's context "
                        f"({cfg.block_size})")
    model = GPT(cfg).to(device)
    if init:
        model.load_state_dict(init["model"])
    named = dict(model.named_parameters())
    for name in args.track:
        if name not in named or named[name].ndim < 2:
            matrices = [k for k, v in named.items() if v.ndim >= 2 and k not in ("wte.weight", "wpe.weight")]
            raise ReportedError(f"--track {name}: not a weight matrix of this model; try one of "
                                f"{', '.join(matrices[:6])}, ...")
    tracked = {name: named[name] for name in args.track}
    opt = reg.build_optimizer(optimizer_name, model, lr=lr, weight_decay=args.weight_decay)
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]  # the schedule scales this
    train_batches = Batches(splits["train"], args.batch_size, args.block_size, device, seed)
    val_batches = Batches(splits["val"], args.batch_size, args.block_size, device, seed).fixed(args.eval_batches)
    also_batches = (Batches(also_val, args.batch_size, args.block_size, device, seed).fixed(args.eval_batches)
                    if also_val is not None else None)

    start_step, best_val, elapsed = 0, math.inf, 0.0
    if resumed:
        model.load_state_dict(resumed["model"])
        opt.load_state_dict(resumed["optimizer"])
        start_step, best_val, elapsed = resumed["step"], resumed["best_val"], resumed["elapsed"]
        torch.set_rng_state(resumed["rng"]["torch"])
        train_batches.generator.set_state(resumed["rng"]["data"])
        if device.type == "cuda" and resumed["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(resumed["rng"]["cuda"])
        log_lines = read_log(log_path, start_step)
        log_path.write_text("".join(line + "\n" for line in log_lines))
    else:
        log_path.write_text("")

    if args.compile:
        model = torch.compile(model)
        reg.use_compiled_math()
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and args.bf16
                else torch.autocast("cpu", enabled=False))
    tokens_per_step = args.batch_size * args.block_size * args.grad_accum
    flops_per_step = (model._orig_mod if args.compile else model).flops_per_token() * tokens_per_step

    def checkpoint(step):
        save_atomic(dict(model=(model._orig_mod if args.compile else model).state_dict(),
                         optimizer=opt.state_dict(), model_config=asdict(cfg), step=step,
                         best_val=best_val, elapsed=elapsed, optimizer_name=optimizer_name,
                         lr=lr, seed=seed, args=vars(args),
                         rng=dict(torch=torch.get_rng_state(), data=train_batches.generator.get_state(),
                                  cuda=torch.cuda.get_rng_state() if device.type == "cuda" else None)),
                    ckpt_path)

    def log(entry):
        with open(log_path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def log_eval(step, train_loss):
        val_loss = evaluate(model, val_batches, autocast)
        entry = dict(step=step, train_loss=train_loss, val_loss=val_loss, lr=opt.param_groups[0]["lr"],
                     time=round(elapsed, 3), tokens=step * tokens_per_step)
        if also_batches is not None:
            entry["also_val_loss"] = evaluate(model, also_batches, autocast)
        if tracked:
            entry["track"] = {name: inspect_matrix(opt, p) for name, p in tracked.items()}
        log(entry)
        return entry

    if init and start_step == 0:  # where fine-tuning starts from, on both data sets
        log_eval(0, None)  # no training loss yet: null in the log

    # Losses stay on the device and are read every log_every steps: reading one each step
    # would make the CPU wait for the GPU every step.
    pending = []
    bar = tqdm(range(start_step, args.max_steps), initial=start_step, total=args.max_steps,
               desc=f"{optimizer_name} lr={lr:g} seed={seed}", dynamic_ncols=True, disable=args.quiet)
    t_last, step_last = time.perf_counter(), start_step
    train_loss, val_loss, last_eval = float("nan"), float("nan"), {}
    for step in bar:
        factor = lr_factor(step, args)
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * factor
        loss_sum = torch.zeros((), device=device)
        for _ in range(args.grad_accum):
            x, y = train_batches.next()
            with autocast:
                loss = model(x, y) / args.grad_accum
            loss.backward()
            loss_sum += loss.detach()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        pending.append(loss_sum)

        done = step + 1
        is_eval = done % args.eval_every == 0 or done == args.max_steps
        if done % args.log_every == 0 or is_eval:
            losses = torch.stack(pending).tolist()  # the one sync of this interval
            bad = [i for i, v in enumerate(losses) if not math.isfinite(v)]
            if bad:
                first = done - len(losses) + bad[0] + 1
                bar.close()
                raise ReportedError(f"{optimizer_name} lr={lr:g}: the loss became {losses[bad[0]]} at "
                                f"step {first}; stopped. The last good checkpoint is {ckpt_path} "
                                "(lower --lr or raise --warmup-steps).")
            pending = []
            train_loss = losses[-1]
            now = time.perf_counter()
            elapsed += now - t_last
            steps_per_s = (done - step_last) / (now - t_last)
            t_last, step_last = now, done
            postfix = dict(loss=f"{train_loss:.3f}", lr=f"{opt.param_groups[0]['lr']:.2e}",
                           tok_s=f"{steps_per_s * tokens_per_step:,.0f}")
            if args.peak_tflops:
                postfix["mfu"] = f"{steps_per_s * flops_per_step / (args.peak_tflops * 1e12):.1%}"
            bar.set_postfix(postfix)
        if is_eval:
            last_eval = log_eval(done, train_loss)
            val_loss = last_eval["val_loss"]
            best_val = min(best_val, val_loss)
            checkpoint(done)
            t_last = time.perf_counter()  # evaluation and saving are not training time
    bar.close()
    print(f"{optimizer_name} lr={lr:g} seed={seed}: best val loss {best_val:.4f}, "
          f"final {val_loss:.4f}, {elapsed:.1f}s of training")
    return run_summary(optimizer_name, lr, seed, read_log(log_path, args.max_steps), best_val, elapsed)


def run_summary(optimizer_name, lr, seed, log_lines, best_val, elapsed):
    """One row of results.csv, from a run's log (its last step is always an eval). A
    fine-tuning run with --also-eval also gets its forgetting: how much the other data's
    val loss rose from step 0."""
    first, last = json.loads(log_lines[0]), json.loads(log_lines[-1])
    summary = dict(optimizer=optimizer_name, lr=lr, seed=seed, final_val=last["val_loss"],
                   best_val=best_val, final_train=last["train_loss"], steps=last["step"],
                   tokens=last["tokens"], time=round(elapsed, 1))
    if "also_val_loss" in last:
        summary["also_val"] = last["also_val_loss"]
        if first["step"] == 0:
            summary["forgetting"] = last["also_val_loss"] - first["also_val_loss"]
    return summary


# What may differ between the runs of one comparison; every other argument is a setting
# that they must share (checked when a finished run is reused, or a folder summarized).
NOT_SETTINGS = ("optimizer", "lr", "seed", "optimizers", "lrs", "seeds", "out_dir", "resume",
                "summarize", "quiet", "log_every", "max_steps_given", "bpe_dir", "cache_dir",
                "peak_tflops")


def finished_run(run_dir, settings):
    """A summary of the finished run in run_dir, "unfinished" for one that stopped early
    (to be resumed), or None where there is none. A run made with other settings than
    `settings` (an args dict) is an error: mixing it into a comparison would be a wrong
    result."""
    if not (run_dir / "ckpt.pt").exists():
        return None
    saved, _ = load_checkpoint(run_dir, "the earlier run in")
    differences = reg.settings_differences(saved["args"], settings, NOT_SETTINGS)
    if differences:
        raise ReportedError(f"{run_dir} was run with other settings ({'; '.join(differences[:3])}); "
                            "a folder holds one sweep: pass another --out-dir, or remove that run")
    if saved["step"] < settings["max_steps"]:
        return "unfinished"
    return run_summary(saved["optimizer_name"], saved["lr"], saved["seed"],
                       read_log(run_dir / "log.jsonl", saved["step"]), saved["best_val"], saved["elapsed"])


# -----------------------------------------------------------------------------
# Command line, compare mode, report
# -----------------------------------------------------------------------------

PRESETS = {  # model and run sizes; every value can still be set by its own flag
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=64, batch_size=16, grad_accum=1,
                 max_steps=300, warmup_steps=30, eval_every=50, eval_batches=8, lr=3e-3),
    "small": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, batch_size=16, grad_accum=1,
                  max_steps=1000, warmup_steps=100, eval_every=100, eval_batches=16, lr=2e-3),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=16, grad_accum=8,
                 max_steps=5000, warmup_steps=250, eval_every=250, eval_batches=20, lr=6e-4),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optimizer", default="reg",
                   help=f"one name or a comma list to compare ({', '.join(reg.OPTIMIZERS)})")
    p.add_argument("--lr", default=None, help="learning rate, or a comma list (default: the preset's)")
    p.add_argument("--seed", default="0", help="seed, or a comma list; same seed = same init and data order")
    p.add_argument("--weight-decay", type=float, default=0.1, help="decoupled, all methods alike")
    p.add_argument("--preset", choices=PRESETS, default=None,
                   help="model/run size (default: gpt2 on CUDA, tiny elsewhere)")
    for name in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum",
                 "max_steps", "warmup_steps", "eval_every", "eval_batches"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None, help="overrides the preset")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout (0 for pre-training)")
    p.add_argument("--schedule", choices=["cosine", "wsd"], default="cosine",
                   help="after warmup: cosine decay, or warmup-stable-decay")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr / peak lr")
    p.add_argument("--decay-fraction", type=float, default=0.2, help="wsd: share of steps spent decaying")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    p.add_argument("--log-every", type=int, default=10, help="steps between progress updates")
    p.add_argument("--data", default=None, help="local text instead of openwebtext-100k")
    p.add_argument("--tokenizer", choices=["gpt2", "bytes"], default="gpt2",
                   help="gpt2: GPT-2 BPE (nanoGPT); bytes: UTF-8 bytes, 257 symbols (small CPU "
                        "runs in which the hidden matrices hold nearly all weights)")
    p.add_argument("--bpe-dir", default=None, help="local GPT-2 encoder.json + vocab.bpe (offline)")
    p.add_argument("--cache-dir", default="data", help="downloads and token caches")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out")
    p.add_argument("--data-seed", type=int, default=1337, help="seed of the train/val split")
    p.add_argument("--out-dir", default="out/gpt", help="runs, logs, checkpoints, plots")
    p.add_argument("--resume", default=None, help="a run directory or ckpt.pt to continue")
    p.add_argument("--summarize", default=None, metavar="DIR",
                   help="train nothing: tabulate the finished runs in DIR (an --out-dir) per "
                        "optimizer and lr, mean and spread over seeds, and plot the sweep")
    p.add_argument("--init-from", default=None, help="start from a checkpoint's weights (fine-tuning)")
    p.add_argument("--also-eval", default=None,
                   help="also log the val loss on this data's val split (e.g. the pre-training data, "
                        "to measure forgetting; same --val-fraction and --data-seed)")
    p.add_argument("--track", default="",
                   help="weight names (comma list, e.g. blocks.1.mlp.0.weight): log the condition "
                        "number, stable rank and row-norm spread of their momentum and update")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="CUDA: no bfloat16 autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile the model and reg's math")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's peak for MFU (H100 SXM bf16 dense: 989)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    args.track = [t.strip() for t in args.track.split(",") if t.strip()]
    args.preset = args.preset or ("gpt2" if args.device.startswith("cuda") else "tiny")
    args.max_steps_given = args.max_steps is not None  # --resume may extend a run
    for key, value in PRESETS[args.preset].items():
        if key != "lr" and getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.optimizers, args.lrs, args.seeds = reg.parse_grid(
            args.optimizer, args.lr or str(PRESETS[args.preset]["lr"]), args.seed)
    except ValueError as e:
        p.error(str(e))
    for key in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum",
                "max_steps", "eval_every", "eval_batches", "log_every"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.resume and (len(args.optimizers) > 1 or len(args.lrs) > 1 or len(args.seeds) > 1):
        p.error("--resume continues one run: give one optimizer, lr and seed (or none)")
    if not 0 < args.val_fraction < 1:
        p.error("--val-fraction must be between 0 and 1")
    return args


def report(summaries, out_dir):
    """A table on stdout, results.csv, and a loss plot when matplotlib is there."""
    also = "also_val" in summaries[0]
    print(f"\n{'optimizer':<11}{'lr':>9}{'seed':>6}{'best val':>10}{'final val':>11}"
          + (f"{'also-eval':>11}" if also else "") + f"{'time s':>9}")
    for s in summaries:
        print(f"{s['optimizer']:<11}{s['lr']:>9.2g}{s['seed']:>6}{s['best_val']:>10.4f}"
              f"{s['final_val']:>11.4f}" + (f"{s['also_val']:>11.4f}" if also else "") + f"{s['time']:>9.1f}")
    reg.write_csv(summaries, out_dir / "results.csv")
    plt = reg.pyplot("loss.png")
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in summaries:
        entries = [json.loads(l) for l in (out_dir / s["run"] / "log.jsonl").read_text().splitlines()]
        tokens = [e["tokens"] for e in entries]
        line, = ax.plot(tokens, [e["val_loss"] for e in entries],
                        label=f"{s['optimizer']} lr={s['lr']:g} s{s['seed']}")
        if also:  # the --also-eval data, dashed, in the same colour
            ax.plot(tokens, [e["also_val_loss"] for e in entries], "--", color=line.get_color(),
                    label=f"{s['optimizer']} on --also-eval data")
    ax.set_xlabel("tokens")
    ax.set_ylabel("validation loss" + (" (dashed: --also-eval data)" if also else ""))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    reg.save_figure(plt, fig, out_dir / "loss.png")
    plot_track(summaries, out_dir, plt)


def plot_track(summaries, out_dir, plt):
    """track.png: per tracked weight, the condition number and row-norm spread of each run's
    update (solid) and momentum (dashed) through training: where each method balances."""
    logs = {s["run"]: [json.loads(l) for l in (out_dir / s["run"] / "log.jsonl").read_text().splitlines()]
            for s in summaries}
    names = sorted({n for entries in logs.values() for e in entries for n in e.get("track", {})})
    if not names:
        return
    fig, axes = plt.subplots(len(names), 2, figsize=(11, 3.6 * len(names)), squeeze=False)
    for row, name in zip(axes, names):
        for s in summaries:
            points = [(e["tokens"], e["track"][name]) for e in logs[s["run"]] if e.get("track", {}).get(name)]
            tokens = [t for t, _ in points]
            for ax, stat in zip(row, ("cond", "row_spread")):
                line, = ax.plot(tokens, [x["update"][stat] for _, x in points], label=s["optimizer"])
                ax.plot(tokens, [x["momentum"][stat] for _, x in points], ":", color=line.get_color())
        for ax, title in zip(row, ("condition number", "row-norm spread (max/min)")):
            ax.set_yscale("log")
            ax.set_title(f"{name}: {title}", fontsize=9)
            ax.set_xlabel("tokens")
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=8, title="update (solid), momentum (dotted)", title_fontsize=8)
    reg.save_figure(plt, fig, out_dir / "track.png")


def summarize(folder):
    """--summarize: the lr sweep of every finished run in a folder, as a table (mean and
    spread of the final val loss over seeds at each lr), sweep.csv and sweep.png; then results.csv and
    loss.png of the runs at each optimizer's best lr."""
    folder = Path(folder)
    run_dirs = sorted(path.parent for path in folder.glob("*/ckpt.pt"))
    if not run_dirs:
        raise ReportedError(f"--summarize {folder}: no finished runs there (each run folder holds a ckpt.pt)")
    settings = load_checkpoint(run_dirs[0], "--summarize")[0]["args"]
    runs = []
    for run_dir in run_dirs:
        summary = finished_run(run_dir, settings)
        if summary == "unfinished":
            print(f"{run_dir.name}: unfinished, left out")
        else:
            runs.append(dict(summary, run=run_dir.name))
    if not runs:
        raise ReportedError(f"--summarize {folder}: every run there is unfinished")
    table = reg.summarize_sweep(runs, "final_val")
    reg.write_sweep(table, folder, "final val loss")
    best = {(row["optimizer"], row["lr"]) for row in table if row["best"]}
    if "forgetting" in runs[0]:
        plot_forgetting(runs, table, folder)
    report([r for r in runs if (r["optimizer"], r["lr"]) in best], folder)


def plot_forgetting(runs, table, folder):
    """Fine-tuning sweeps: forgetting at each optimizer's best lr, and forgetting.png, the
    trade-off across lrs. A larger lr learns the new data faster and forgets more, so
    optimizers are best compared along these curves (down and left is better), not at one
    point each."""
    forgetting = {(r["optimizer"], r["lr"]): r for r in reg.summarize_sweep(runs, "forgetting")}
    print(f"\n{'optimizer':<11}{'best lr':>9}  forgetting (mean +- std)")
    for row in table:
        if row["best"]:
            f = forgetting[row["optimizer"], row["lr"]]
            print(f"{row['optimizer']:<11}{row['lr']:>9.3g}  {f['mean']:+.4f} +- {f['std']:.4f}")
    plt = reg.pyplot("forgetting.png")
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(row["optimizer"] for row in table):
        rows = [row for row in table if row["optimizer"] == name]
        line, = ax.plot([r["mean"] for r in rows], [forgetting[name, r["lr"]]["mean"] for r in rows],
                        marker=".", label=name)
        best = next(r for r in rows if r["best"])
        ax.plot(best["mean"], forgetting[name, best["lr"]]["mean"], "o", mfc="none", ms=10,
                color=line.get_color())
    ax.set_xlabel("final val loss on the new data (points: lrs; ring: best lr)")
    ax.set_ylabel("forgetting: rise of the --also-eval val loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    reg.save_figure(plt, fig, folder / "forgetting.png")


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.summarize:
            return summarize(args.summarize)
        if args.resume:  # the run continues with the settings it was started with
            saved, _ = load_checkpoint(args.resume, "--resume")
            keep = dict(resume=args.resume, quiet=args.quiet,
                        max_steps=args.max_steps if args.max_steps_given else saved["args"]["max_steps"])
            args = argparse.Namespace(**{**vars(args), **saved["args"], **keep})
        out_dir = Path(args.out_dir)
        splits, meta = load_data(args)
        also_val = None
        if args.also_eval:
            also_val = load_data(argparse.Namespace(**{**vars(args), "data": args.also_eval}))[0]["val"]
        summaries = []
        for name, lr, seed in itertools.product(args.optimizers, args.lrs, args.seeds):
            run = f"{name}-lr{lr:g}-s{seed}"
            resume_from = args.resume
            if resume_from:
                saved, _ = load_checkpoint(resume_from, "--resume")
                name, lr, seed = saved["optimizer_name"], saved["lr"], saved["seed"]
                run_dir = Path(resume_from) if Path(resume_from).is_dir() else Path(resume_from).parent
                run = run_dir.name
                out_dir = run_dir.parent
            else:  # a sweep that was interrupted, or extended, redoes nothing that is done
                earlier = finished_run(out_dir / run, vars(args))
                if isinstance(earlier, dict):
                    print(f"{run}: finished earlier with these settings; reusing it")
                    summaries.append(dict(earlier, run=run))
                    continue
                if earlier == "unfinished":
                    print(f"{run}: stopped early; resuming it")
                    resume_from = out_dir / run
            summary = train(args, name, lr, seed, splits, meta, out_dir / run, resume_from, also_val)
            summaries.append(dict(summary, run=run))
        report(summaries, out_dir)
    except ReportedError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
