"""
train_gpt.py: train a GPT (nanoGPT-style) on openwebtext-100k with any optimizer of reg.py.

    python train_gpt.py                                   # GPT-2 124M on CUDA, tiny on a CPU
    python train_gpt.py --optimizer adamw,reg,muon        # compare: same seed, same data
    python train_gpt.py --data ../shared/data/tinyshakespeare/input.txt --tokenizer bytes
    python train_gpt.py --resume out/gpt/reg-lr0.003-s0   # continue that one run
    python train_gpt.py --init-from out/gpt/adamw-lr0.003-s0/ckpt.pt --data other.txt \\
        --optimizer reg,muon,adamw --also-eval PRETRAINING_DATA   # fine-tune, measure forgetting
    torchrun --standalone --nproc_per_node=8 train_gpt.py # data-parallel (DDP), same global batch
    python results/summarize.py out/gpt                   # tables and figures of a folder

The default data is Elriggs/openwebtext-100k (one 303 MB Parquet file from the Hugging Face
hub), tokenized once with GPT-2 BPE into uint16 files under --cache-dir; --data trains on
local text instead (Parquet, JSON Lines, .txt or a folder of them: results/text_data.py).

Each run writes --out-dir/<optimizer>-lr<lr>-s<seed>/: log.jsonl (one line per eval),
ckpt.pt (everything an exact resume needs; atomic) and run.json (settings and summary);
then the folder's results.csv and figures are rebuilt. A folder holds runs of one setting:
rerun the same command and finished runs are reused, stopped ones resumed.

Measured (results/README.md): the `small` preset with --tokenizer bytes (0.85M parameters,
300 steps of 16x128 bytes of an OpenWebText sample, 47-71 s of training on one core of a
2-core AMD EPYC) reaches a validation loss of 2.48 nats per byte with AdamW and 2.02-2.06
with Muon, MuonEq and NorMuon, each at its own swept learning rate (mean of 3 seeds).
Under bfloat16 autocast, this script's default on a CPU with native bfloat16, the same
losses come 1.97x as fast as from nanoGPT's own train.py on that model (float32 there, as
on any CPU), measured on a 2-core Zen 5 EPYC. No GPU numbers have been measured yet.
"""

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import reg
from results import summarize
from training.runs import (Parser, ReportedError, build_optimizer, check_device, claimed, default_bf16,
                           download, existing_path, folder_path, load_checkpoint, mean_over_processes,
                           number, optimizer_list, precision_note, read_log, resumed_settings,
                           run_folder_name, runs_to_do, save_atomic, start_distributed, write_run_json)
from training.text_data import load_tokenizer, prepare, text_files

# -----------------------------------------------------------------------------
# Settings: the sizes (presets) and every other default, in one place
# -----------------------------------------------------------------------------

PRESETS = {  # model and run sizes; each value can still be set by its own flag
    # 2x64, context 64: a CPU smoke test (with GPT-2 BPE it is mostly embedding)
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=64, batch_size=16, grad_accum=1,
                 max_steps=300, warmup_steps=30, eval_every=50, eval_batches=8, lr=3e-3),
    # 4x128, context 128: the CPU comparisons of results/ (with --tokenizer bytes)
    "small": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, batch_size=16, grad_accum=1,
                  max_steps=1000, warmup_steps=100, eval_every=100, eval_batches=16, lr=2e-3),
    # GPT-2 124M: 850 steps of 16x1024x8 = 111M tokens, just under one epoch of
    # openwebtext-100k (~119M training tokens at the 1.19M per 1,000 documents of a sample):
    # a longer run would measure memorization as much as optimization
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=16, grad_accum=8,
                 max_steps=850, warmup_steps=50, eval_every=50, eval_batches=20, lr=6e-4),
}
DEFAULTS = dict(
    optimizer=["reg"], seed=[0],      # names (reg.OPTIMIZERS) and seeds: each combination runs
    weight_decay=0.1,                 # decoupled, the same for every method
    dropout=0.0,                      # 0 for pre-training, as nanoGPT
    schedule="cosine",                # after the linear warmup: cosine, or wsd (flat, then linear)
    min_lr_ratio=0.1, decay_fraction=0.2,  # final lr / peak; wsd's share of steps spent decaying
    grad_clip=1.0,                    # max global gradient norm; 0 turns clipping off
    log_every=10,                     # steps between progress updates (one device sync each)
    tokenizer="gpt2", cache_dir="data", val_fraction=0.01, data_seed=1337,
    out_dir="out/gpt", track="", compile=False, quiet=False,
    bf16=None,                        # bfloat16 autocast: on CUDA and on CPUs that run it natively
)
# What may differ between the runs of one folder; everything else is a setting they share.
NOT_SETTINGS = ("optimizer", "lr", "seed", "out_dir", "resume", "quiet", "bf16_pinned", "log_every",
                "bpe_dir", "cache_dir", "peak_tflops", "device", "compile", "rank", "world")
# What --resume may change; the rest comes from the run itself.
RESUME_MAY_SET = ("max_steps", "device", "compile", "quiet", "log_every", "peak_tflops",
                  "bpe_dir", "cache_dir")


# -----------------------------------------------------------------------------
# Data: a token cache made once from the text (results/text_data.py), read in random windows
# -----------------------------------------------------------------------------

OWT_URL = ("https://huggingface.co/datasets/Elriggs/openwebtext-100k/resolve/main/"
           "data/train-00000-of-00001-10a4de027237eace.parquet")
OWT_BYTES = 302_558_045
OFFLINE = ("train on local text with --data PATH (.parquet, .jsonl[.gz], .txt or a directory), "
           "e.g. --data ../shared/data/openwebtext-sample")


def load_data(args, data):
    """Find or fetch the text (`data`: a path, or None for openwebtext-100k), tokenize it
    or reuse the cache, and map the token files: ({"train": ..., "val": ...}, meta)."""
    if data is None:
        source, name, key = Path(args.cache_dir) / "openwebtext-100k" / OWT_URL.rsplit("/", 1)[1], "openwebtext-100k", "hub"
    else:
        source, name = Path(data), Path(data).resolve().name
        key = hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:8]
    cache_dir = Path(args.cache_dir) / f"{name}-{key}" / args.tokenizer
    if data is None and not source.exists() and (cache_dir / "meta.json").exists():
        meta = json.loads((cache_dir / "meta.json").read_text())  # the download was removed
    else:
        files = text_files(data) if data else [download(OWT_URL, source, OWT_BYTES, OFFLINE)]
        meta = prepare(files, cache_dir, load_tokenizer(args.bpe_dir, args.tokenizer), args.val_fraction,
                       args.data_seed)
    splits = {s: np.memmap(cache_dir / f"{s}.bin", dtype=np.uint16, mode="r") for s in ("train", "val")}
    for split, tokens in splits.items():
        if len(tokens) < args.block_size + 2:
            raise ReportedError(f"the {split} split has {len(tokens):,} tokens, too few for --block-size "
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
        return rows[:, :-1].to(self.device), rows[:, 1:].to(self.device)

    def next(self, load=True):
        """The next batch. Under DDP every process draws every micro-batch, so that all
        follow one seeded order, and loads only its own (load=False skips the others)."""
        high = len(self.tokens) - self.block_size - 1
        starts = torch.randint(high, (self.batch_size,), generator=self.generator).numpy()
        return self.window(starts) if load else None

    def fixed(self, n_batches):
        """The same evenly spaced windows every time: a fixed validation set."""
        starts = np.linspace(0, len(self.tokens) - self.block_size - 1, n_batches * self.batch_size)
        return [self.window(s) for s in np.split(starts.astype(np.int64), n_batches)]


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


# Up to this context, attention on a CPU under bfloat16 autocast runs as plain bfloat16
# matmuls (matmul_attention): there torch's CPU flash-attention kernel is slower in bfloat16
# than in float32, and the written-out form is as fast or faster than either (forward and
# backward at 6 heads x 256 x 64, batch 16: 17-31 ms against 33-34 for flash attention in
# either precision). Its T x T scores grow quadratically, though: from context 512 bfloat16
# flash attention is as fast or faster, and at 1,024 twice as fast (results/speed.py --attention).
CPU_MATMUL_ATTENTION_MAX_CONTEXT = 256


def matmul_attention(q, k, v, dropout_p=0.0):
    """Causal attention written out, as in nanoGPT's fallback: softmax(q k^T / sqrt(d)) v,
    each position seeing itself and the positions before it. Under bfloat16 autocast the
    scores and weights are rounded to bfloat16. The softmax itself sums in float32 inside
    the kernel, so this is the precision of any bfloat16 attention matmul."""
    T = q.size(-2)
    scores = (q @ k.transpose(-2, -1)) * q.size(-1) ** -0.5
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(diagonal=1)
    weights = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
    if dropout_p > 0:
        weights = F.dropout(weights, dropout_p)
    return weights @ v


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
        dropout = self.dropout if self.training else 0.0
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and T <= CPU_MATMUL_ATTENTION_MAX_CONTEXT:
            y = matmul_attention(q, k, v, dropout)
        else:  # flash attention where the device has it: never materializes the T x T matrix
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
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
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits
        # Under bfloat16 autocast, cross_entropy runs in float32 by itself.
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    def flops_per_token(self, context):
        """Training FLOPs per token at this context length (PaLM appendix B, as nanoGPT's
        estimate_mfu): 6 per weight (the position table aside) plus the attention matmuls."""
        n = sum(p.numel() for p in self.parameters()) - self.wpe.weight.numel()
        return 6 * n + 12 * self.cfg.n_layer * self.cfg.n_embd * context


# -----------------------------------------------------------------------------
# The optimizer: reg.build_optimizer routes the weights; the schedule scales its lr
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


# -----------------------------------------------------------------------------
# One run: set up (or resume), train, evaluate, checkpoint
# -----------------------------------------------------------------------------

def load_init(args, quiet=True):
    """--init-from's checkpoint as {"model", "model_config", "args"}: a checkpoint of this
    script, or a plain state_dict of this GPT (model.state_dict(), as people share them),
    whose shape is read off its tensors, all but n_head, which comes from --n-head."""
    saved = load_checkpoint(args.init_from, "--init-from")
    if isinstance(saved, dict) and {"model", "model_config"} <= set(saved):
        return {"args": {}, **saved}
    need = ("wte.weight", "wpe.weight", "blocks.0.attn.qkv.weight")
    if not (isinstance(saved, dict) and all(k in saved for k in need) and all(map(torch.is_tensor, saved.values()))):
        lacks = [k for k in ("model", "model_config") if not isinstance(saved, dict) or k not in saved]
        raise ReportedError(f"--init-from {args.init_from}: neither a checkpoint of train_gpt.py (it has no "
                            f"{' or '.join(map(repr, lacks))}) nor a state_dict of this GPT (with "
                            f"{', '.join(need)}, ...): point --init-from at one of those")
    (vocab, n_embd), context = saved["wte.weight"].shape, saved["wpe.weight"].shape[0]
    n_layer = len({k.split(".")[1] for k in saved if k.startswith("blocks.")})
    if n_embd % args.n_head:
        raise ReportedError(f"--init-from {args.init_from}: a state_dict of width {n_embd}, which --n-head "
                            f"{args.n_head} does not divide: pass the --n-head it was trained with")
    if not quiet:
        print(f"--init-from {args.init_from}: a plain state_dict: {n_layer} layers, width {n_embd}, context "
              f"{context}, {vocab} tokens read off its tensors; {args.n_head} heads from --n-head")
    return dict(model=saved, args={}, model_config=dict(vocab_size=vocab, block_size=context, n_layer=n_layer,
                                                        n_head=args.n_head, n_embd=n_embd))


def model_config(args, meta, init):
    """The model's shape: from the --init-from checkpoint when fine-tuning, else the flags."""
    if init:
        return GPTConfig(**{**init["model_config"], "dropout": args.dropout})
    return GPTConfig(vocab_size=math.ceil(meta["n_vocab"] / 64) * 64, block_size=args.block_size,
                     n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout)


def write_record(run, finished):
    """run.json: who the run is, its settings and, once finished, its results.csv row. A
    fine-tuning run with --also-eval gets its forgetting: how much the other data's val
    loss rose from step 0."""
    summary = None
    if finished:
        first, last = run.log[0], run.log[-1]
        summary = dict(optimizer=run.name, lr=run.lr, seed=run.seed, final_val=last["val_loss"],
                       best_val=run.best_val, final_train=last["train_loss"], steps=last["step"],
                       tokens=last["tokens"], time=round(run.elapsed, 1), startup_s=round(run.startup_s, 3),
                       tokens_per_s=round(steady_tokens_per_s(run)))
        if run.args.peak_tflops:  # per process: each has one device's peak
            flops = run.model.flops_per_token(run.args.block_size) * steady_tokens_per_s(run) / run.args.world
            summary["mfu"] = round(flops / (run.args.peak_tflops * 1e12), 4)
        if "also_val_loss" in last:
            summary["also_val"] = last["also_val_loss"]
            if first["step"] == 0:
                summary["forgetting"] = last["also_val_loss"] - first["also_val_loss"]
    write_run_json(run, NOT_SETTINGS, script="train_gpt", finished=finished, metric="final_val",
                   lower_is_better=True, curve=["tokens", "val_loss"], summary=summary,
                   also_curve="also_val_loss" if run.args.also_eval else None)


def steady_tokens_per_s(run):
    """Training tokens per second after each session's first step, which pays for the
    compile and the warm-up of the kernels (a minute or more on a GPU with --compile)."""
    steps, seconds = run.steady  # a run of a single step has no steady state: its own rate then
    return steps * run.tokens_per_step / seconds if steps else run.log[-1]["tokens"] / max(run.elapsed, 1e-9)


def start(args, name, lr, seed, data, run_dir, resume):
    """Everything a run needs, fresh (the same initial weights for every optimizer of one
    seed) or restored from its checkpoint: model, optimizer, data, log and counters."""
    splits, meta, also_val = data
    if args.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    resumed = load_checkpoint(run_dir, "--resume") if resume else None
    init = load_init(args) if args.init_from and not resumed else None
    torch.manual_seed(seed)
    cfg = GPTConfig(**resumed["model_config"]) if resumed else model_config(args, meta, init)
    model = GPT(cfg).to(args.device)
    if init:
        model.load_state_dict(init["model"])
    opt = build_optimizer(name, model, lr, args.weight_decay)
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]  # the schedule scales this
    run = SimpleNamespace(args=args, name=name, lr=lr, seed=seed, dir=run_dir, cfg=cfg, model=model,
                          net=torch.compile(model) if args.compile else model, opt=opt, init=init,
                          step=0, best_val=math.inf, elapsed=0.0, startup_s=None, steady=[0, 0.0], log=[],
                          writes=args.rank == 0)
    run.train_net = run.net  # what the training step calls: under torchrun, DDP around the net
    if args.world > 1:  # gradients are averaged across processes during backward
        from torch.nn.parallel import DistributedDataParallel
        run.train_net = DistributedDataParallel(
            run.net, device_ids=[torch.device(args.device)] if args.device.startswith("cuda") else None)
    run.train_batches = Batches(splits["train"], args.batch_size, args.block_size, args.device, seed)
    run.val_batches = [Batches(tokens, args.batch_size, args.block_size, args.device, seed).fixed(args.eval_batches)
                       for tokens in (splits["val"], also_val) if tokens is not None]
    named = dict(model.named_parameters())
    run.tracked = {k: named[k] for k in args.track.split(",") if k}
    run.autocast = torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.bf16)
    run.tokens_per_step = args.batch_size * args.block_size * args.grad_accum
    if resumed:
        model.load_state_dict(resumed["model"])
        opt.load_state_dict(resumed["optimizer"])
        run.step, run.best_val, run.elapsed = resumed["step"], resumed["best_val"], resumed["elapsed"]
        run.startup_s, run.steady = resumed.get("startup_s"), resumed.get("steady", [0, 0.0])
        torch.set_rng_state(resumed["rng"]["torch"])
        run.train_batches.generator.set_state(resumed["rng"]["data"])
        if args.device.startswith("cuda") and resumed["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(resumed["rng"]["cuda"], args.device)
        run.log = read_log(run_dir, "step", run.step)
    if run.writes:
        (run_dir / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in run.log))
        write_record(run, finished=False)
    if args.compile:
        reg.use_compiled_math()
    return run


def train(args, name, lr, seed, data, run_dir, resume=False):
    """Train one model, writing its log, checkpoints and run.json; returns its log."""
    t_start = time.perf_counter()
    run = start(args, name, lr, seed, data, run_dir, resume)
    model, opt = run.model, run.opt
    flops_per_step = model.flops_per_token(args.block_size) * run.tokens_per_step
    if run.init and run.step == 0:  # where fine-tuning starts from, on both data sets
        evaluate_and_save(run, 0, None)  # no training loss yet: null in the log
    bar = tqdm(range(run.step, args.max_steps), initial=run.step, total=args.max_steps,
               desc=f"{name} lr={lr:g} seed={seed}", dynamic_ncols=True, disable=args.quiet)
    pending, t_last, step_last = [], time.perf_counter(), run.step
    first_step = run.step
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lr_factor(step, args)
        loss_sum, share = torch.zeros((), device=args.device), args.grad_accum // args.world
        for i in range(args.grad_accum):  # micro-batch i belongs to process i % world
            batch = run.train_batches.next(load=i % args.world == args.rank)
            if batch is None:
                continue
            if args.world > 1:  # all-reduce the gradients once, after this process's last micro-batch
                run.train_net.require_backward_grad_sync = i // args.world == share - 1
            with run.autocast:
                loss = run.train_net(*batch) / share
            loss.backward()
            loss_sum += loss.detach()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        pending.append(loss_sum)  # read every log_every steps: one device sync per interval

        done = step + 1
        if step == first_step:  # this session's first step: the end of its startup
            if args.device.startswith("cuda"):
                torch.cuda.synchronize(args.device)
            now = time.perf_counter()
            run.startup_s = now - t_start if run.startup_s is None else run.startup_s
            run.elapsed += now - t_last
            t_last, step_last = now, done
        is_eval = done % args.eval_every == 0 or done == args.max_steps
        if done % args.log_every == 0 or is_eval:
            losses = mean_over_processes(torch.stack(pending), args.world).tolist()
            check_finite(losses, done, run, bar)
            pending, now = [], time.perf_counter()
            run.elapsed += now - t_last
            run.steady = [run.steady[0] + done - step_last, run.steady[1] + now - t_last]
            speed = (done - step_last) / max(now - t_last, 1e-9)
            t_last, step_last = now, done
            postfix = dict(loss=f"{losses[-1]:.3f}", lr=f"{opt.param_groups[0]['lr']:.2e}",
                           tok_s=f"{speed * run.tokens_per_step:,.0f}")
            if args.peak_tflops:  # per process: the step's FLOPs are shared out over `world` devices
                postfix["mfu"] = f"{speed * flops_per_step / args.world / (args.peak_tflops * 1e12):.1%}"
            bar.set_postfix(postfix)
        if is_eval:
            evaluate_and_save(run, done, losses[-1])
            t_last = time.perf_counter()  # evaluation and saving are not training time
    bar.close()
    if run.writes:
        write_record(run, finished=True)
    print(f"{name} lr={lr:g} seed={seed}: final val loss {run.log[-1]['val_loss']:.4f} "
          f"(best {run.best_val:.4f}), {run.elapsed:.1f}s of training, "
          f"{steady_tokens_per_s(run):,.0f} tokens/s after a startup of {run.startup_s:.1f}s")
    return run.log


@torch.no_grad()
def evaluate(model, batches, autocast):
    model.eval()
    losses = []
    for x, y in batches:
        with autocast:
            losses.append(model(x, y))
    model.train()
    return torch.stack(losses).mean().item()


def evaluate_and_save(run, step, train_loss):
    """One log line (val loss, also-eval loss, tracked weights), then a checkpoint."""
    entry = dict(step=step, train_loss=train_loss, lr=run.opt.param_groups[0]["lr"],
                 time=round(run.elapsed, 3), tokens=step * run.tokens_per_step)
    for key, batches in zip(("val_loss", "also_val_loss"), run.val_batches):
        entry[key] = evaluate(run.net, batches, run.autocast)
    if run.tracked:
        entry["track"] = {k: reg.inspect_matrix(run.opt, p) for k, p in run.tracked.items()}
    run.log.append(entry)
    if step:
        run.best_val = min(run.best_val, entry["val_loss"])
    if run.writes:  # rank 0 alone writes; every process evaluates the same windows
        with open(run.dir / "log.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")
        if step:
            save_checkpoint(run, step)


def check_finite(losses, done, run, bar):
    bad = [i for i, v in enumerate(losses) if not math.isfinite(v)]
    if bad:
        bar.close()
        raise ReportedError(f"{run.name} lr={run.lr:g}: the loss became {losses[bad[0]]} at step "
                            f"{done - len(losses) + bad[0] + 1}; stopped. The last good checkpoint is "
                            f"{run.dir / 'ckpt.pt'} (lower --lr or raise --warmup-steps).")


def save_checkpoint(run, step):
    """ckpt.pt, atomically: everything an exact resume needs."""
    device = torch.device(run.args.device)
    rng = dict(torch=torch.get_rng_state(), data=run.train_batches.generator.get_state(),
               cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
    save_atomic(dict(model=run.model.state_dict(), optimizer=run.opt.state_dict(), model_config=asdict(run.cfg),
                     step=step, best_val=run.best_val, elapsed=run.elapsed, startup_s=run.startup_s,
                     steady=run.steady, optimizer_name=run.name,
                     lr=run.lr, seed=run.seed, args=vars(run.args), rng=rng), run.dir / "ckpt.pt")


# -----------------------------------------------------------------------------
# Command line: settings, checks, main
# -----------------------------------------------------------------------------

def make_parser():
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--optimizer", type=optimizer_list, help=f"a name or a comma list ({', '.join(reg.OPTIMIZERS)})")
    add("--lr", type=number(many=True), help="learning rate or comma list (default: the preset's)")
    add("--seed", type=number(int, 0, 2**32 - 1, many=True), help="seed or comma list: same seed, same init and data")
    add("--weight-decay", type=number(), help="decoupled, the same for all methods (0.1)")
    add("--preset", choices=PRESETS, help="model and run size (gpt2 on CUDA, tiny elsewhere)")
    for name in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum", "max_steps",
                 "eval_every", "eval_batches"):
        add("--" + name.replace("_", "-"), type=number(int, 1), help="overrides the preset")
    add("--warmup-steps", type=number(int, 0), help="linear warmup steps; overrides the preset")
    add("--dropout", type=number(float, 0, 0.99), help="dropout probability (0)")
    add("--schedule", choices=["cosine", "wsd"], help="after warmup: cosine, or warmup-stable-decay")
    add("--min-lr-ratio", type=number(float, 0, 1), help="final lr / peak lr (0.1)")
    add("--decay-fraction", type=number(float, 0, 1), help="wsd: share of steps spent decaying (0.2)")
    add("--grad-clip", type=number(), help="max gradient norm, 0: off (1.0)")
    add("--log-every", type=number(int, 1), help="steps between progress updates (10)")
    add("--data", type=existing_path, help="local text instead of openwebtext-100k (a file or folder)")
    add("--tokenizer", choices=["gpt2", "bytes"], help="gpt2: GPT-2 BPE (nanoGPT); bytes: UTF-8 "
        "bytes, 257 symbols: CPU runs in which the hidden matrices hold nearly all weights")
    add("--bpe-dir", type=existing_path, help="local GPT-2 encoder.json + vocab.bpe (offline)")
    add("--cache-dir", type=folder_path, help="downloads and token caches (data)")
    add("--val-fraction", type=number(float, 1e-6, 0.99), help="share of documents held out (0.01)")
    add("--data-seed", type=number(int, 0, 2**32 - 1), help="seed of the train/val split (1337)")
    add("--out-dir", type=folder_path, help="runs, logs, checkpoints, tables (out/gpt)")
    add("--resume", type=existing_path, help="a run folder (or its ckpt.pt) to continue: that run alone")
    add("--init-from", type=existing_path, help="start from a checkpoint's weights (fine-tuning)")
    add("--also-eval", type=existing_path, help="also log the val loss on this data's val split "
        "(e.g. the pre-training data, to measure forgetting)")
    add("--track", help="weight names, comma list: log the conditioning of their momentum and update")
    add("--device", help="cuda, cuda:N or cpu (cuda when there is one)")
    add("--bf16", action=argparse.BooleanOptionalAction,
        help="bfloat16 autocast, float32 weights (default: on CUDA and on CPUs with native bfloat16)")
    add("--compile", action=argparse.BooleanOptionalAction, help="torch.compile model and math (off)")
    add("--peak-tflops", type=number(float, 1e-3), help="the device's peak, for MFU (known: A100, H100, H200)")
    add("--quiet", action="store_true", default=None, help="no progress bar")
    return p


def parse_args(argv=None):
    """The settings of this command: each flag given, else the preset's, else DEFAULTS;
    with --resume, the run's own settings (see resumed_settings). All checked here, before
    anything is written."""
    p = make_parser()
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    try:
        args = resumed_settings(given, RESUME_MAY_SET, "step", "max_steps") if "resume" in given else fresh_settings(given)
        check_device(args.device)
        if args.n_embd % args.n_head:
            raise ValueError(f"--n-embd {args.n_embd} must be divisible by --n-head {args.n_head}")
        if args.warmup_steps >= args.max_steps:
            raise ValueError(f"--warmup-steps {args.warmup_steps} must be below --max-steps {args.max_steps}")
    except ValueError as e:
        p.error(str(e))
    return args


def fresh_settings(given):
    device = given.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    preset = PRESETS[given.get("preset") or ("gpt2" if device.startswith("cuda") else "tiny")]
    args = argparse.Namespace(**{**DEFAULTS, **preset, "lr": [preset["lr"]], "device": device,
                                 **{k: None for k in ("data", "bpe_dir", "init_from", "also_eval",
                                                      "peak_tflops", "resume")}, **given})
    args.bf16_pinned = args.bf16 is not None  # chosen by --bf16 / --no-bf16: kept on resume
    args.bf16 = default_bf16(args.device) if args.bf16 is None else args.bf16
    if args.warmup_steps >= args.max_steps and "warmup_steps" not in given:
        short = max(1, args.max_steps // 10)  # a run must leave its warmup
        print(f"note: the preset's {args.warmup_steps} warmup steps do not fit in --max-steps "
              f"{args.max_steps}: warming up for {short} (pass --warmup-steps to choose)")
        args.warmup_steps = short
    return args


def check_model(args, meta):
    """What needs the model's shape, checked on a weightless copy before anything is written."""
    init = load_init(args, quiet=False) if args.init_from else None
    if init and init["args"] and init["args"].get("tokenizer", "gpt2") != args.tokenizer:  # a state_dict can't say
        raise ReportedError(f"--init-from {args.init_from} was trained with --tokenizer "
                            f"{init['args'].get('tokenizer', 'gpt2')}: pass the same --tokenizer")
    cfg = model_config(args, meta, init)
    if meta["n_vocab"] > cfg.vocab_size or args.block_size > cfg.block_size:
        raise ReportedError(f"--init-from {args.init_from}: its model ({cfg.vocab_size} tokens, context "
                            f"{cfg.block_size}) does not fit this data and --block-size {args.block_size}")
    with torch.device("meta"):
        named = dict(GPT(cfg).named_parameters())
    matrices = [k for k, v in named.items() if v.ndim >= 2 and k not in ("wte.weight", "wpe.weight")]
    for name in filter(None, args.track.split(",")):
        if name not in matrices:
            raise ReportedError(f"--track {name}: not a weight matrix of this model; try one of "
                                f"{', '.join(matrices[:6])}, ...")


# Dense bf16 TFLOPS by GPU name, the first name contained in the device's that matches (so
# the NVL cards, with lower clocks, come before the SXM ones); None: unknown, pass --peak-tflops.
PEAK_TFLOPS = {"H100 PCIe": 756, "H100 NVL": None, "H100": 989, "H200 NVL": 835, "H200": 989, "A100": 312}


def known_peak_tflops(device_name, bf16):
    """A known GPU's dense peak: bfloat16, or TF32 (half of it) without autocast; else None."""
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)
    return None if peak is None else peak if bf16 else peak / 2


def describe(args, meta):
    """What this run will do, printed once: data, epochs, precision, MFU's reference."""
    tokens = args.max_steps * args.batch_size * args.block_size * args.grad_accum
    epochs = tokens / meta["train_tokens"]
    print(f"data: {meta['train_tokens']:,} training tokens; a run: {args.max_steps} steps x "
          f"{args.batch_size * args.block_size * args.grad_accum:,} tokens = {tokens:,} = {epochs:.2f} epochs")
    if epochs > 1:
        print(f"warning: each run sees its training data {epochs:.1f} times: past one epoch, a "
              "comparison measures memorization as much as optimization")
    print(precision_note(args))
    if args.device.startswith("cuda"):
        name = torch.cuda.get_device_name(args.device)
        args.peak_tflops = args.peak_tflops or known_peak_tflops(name, args.bf16)
        print(f"device: {name}; MFU against "
              + (f"{args.peak_tflops:g} TFLOPS" if args.peak_tflops else "nothing (pass --peak-tflops)"))


def main(argv=None):
    args = None
    try:
        args = parse_args(argv)
        start_distributed(args)
        if args.device.startswith("cuda"):  # float32 matmuls on tensor cores (TF32), as nanoGPT
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        todo = runs_to_do(args, NOT_SETTINGS, lambda name, lr, seed: f"{run_folder_name(name)}-lr{lr:g}-s{seed}")
        for turn in ("first", "then"):  # rank 0 tokenizes (or checks the cache) before the others read it
            if (args.rank == 0) == (turn == "first"):
                splits, meta = load_data(args, args.data)
                also_val = load_data(args, args.also_eval)[0]["val"] if args.also_eval else None
            if args.world > 1:
                torch.distributed.barrier()
        check_model(args, meta)
        describe(args, meta)
        for name, lr, seed, run_dir in todo:
            with claimed(run_dir, args, explicit=bool(args.resume)) as claim:  # one writer per run
                if claim:
                    train(args, name, lr, seed, (splits, meta, also_val), run_dir, claim == "resume")
        if args.rank == 0:
            summarize.report(Path(args.resume).parent if args.resume else args.out_dir, strict=False)
        if args.world > 1:  # leave together: a process that exited while rank 0 still wrote the
            torch.distributed.barrier()  # summary aborted at exit now and then (SIGABRT, gloo)
    except (ReportedError, summarize.SweepError) as e:
        sys.exit(f"error: {e}")
    finally:
        if args is not None and getattr(args, "world", 1) > 1:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
