"""
train_cifar.py: CIFAR-100 (or CIFAR-10) classification with any optimizer of reg.py.

    python train_cifar.py                                  # ResNet-18 on CUDA, small net on CPU
    python train_cifar.py --optimizer adamw,reg,muon       # compare: same seed, same data order
    python train_cifar.py --dataset cifar10 --net small --epochs 10
    python train_cifar.py --data-dir ../shared/data/cifar100-mini/cifar-100-python --epochs 3
    python train_cifar.py --resume out/cifar/cifar100-small-reg-lr0.003-s0
    python train_cifar.py --optimizer adamw,reg --lr 1e-3,3e-3,1e-2 --seed 0,1,2  # a sweep
    python train_cifar.py --summarize out/cifar           # its table and plot, per optimizer and lr

The data is the official "python version" archive from www.cs.toronto.edu/~kriz, downloaded
once (progress bar, temporary name, MD5 checked), extracted under --cache-dir and reused;
--data-dir uses an extracted copy and never downloads. The whole data set lives on the
device as uint8; random crops (4-pixel padding) and flips are done there on the whole
epoch at once, as airbench does: no DataLoader, no per-image Python.

Each run writes --out-dir/<dataset>-<net>-<optimizer>-lr<lr>-s<seed>/: log.jsonl (one line
per epoch: train loss and accuracy, test top-1 and top-5, time) and ckpt.pt (written
atomically after every epoch; --resume continues exactly). Compare mode adds a table,
results.csv and an accuracy plot (PNG, when matplotlib is installed); run again, it reuses
finished runs and resumes stopped ones.

Measured (README, "Results"): the small net at --width 16 (125k parameters), 2 epochs on all
of CIFAR-10, about 4 minutes on one core of a 2-core AMD EPYC, reaches 69.4% test top-1
with AdamW, 70.7% with Muon, 71.5% with MuonEq-R and 66.5% with REG, each at its own swept
learning rate (mean of 3 seeds). No GPU numbers have been measured yet.
"""

import argparse
import hashlib
import itertools
import json
import math
import os
import pickle
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import reg

# -----------------------------------------------------------------------------
# Data: the official pickles, downloaded once and checked
# -----------------------------------------------------------------------------

DATASETS = {
    "cifar100": dict(url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                     bytes=169_001_437, md5="eb9058c3a382ffc7106e4002c42a8d85",
                     folder="cifar-100-python", classes=100,
                     train=["train"], test=["test"], label_key=b"fine_labels"),
    "cifar10": dict(url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                    bytes=170_498_071, md5="c58f30108f718f92721af3b95e74349a",
                    folder="cifar-10-batches-py", classes=10,
                    train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"],
                    label_key=b"labels"),
}
# Per-channel mean and std of the training images, in 0..255 (the usual values).
MEAN_STD = {"cifar100": ((129.3, 124.1, 112.4), (68.2, 65.4, 70.4)),
            "cifar10": ((125.3, 123.0, 113.9), (63.0, 62.1, 66.7))}


class ReportedError(Exception):
    """A problem shown to the user as one clear message, without a traceback."""


def md5_of(path):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_archive(spec, cache_dir):
    """Download the archive once to a temporary name, check size and MD5, then rename.
    A file that is already there is checked too: a truncated or corrupt copy is named."""
    archive = Path(cache_dir) / spec["url"].rsplit("/", 1)[1]
    if archive.exists():
        if md5_of(archive) != spec["md5"]:
            raise ReportedError(f"{archive} is corrupt or truncated (MD5 {md5_of(archive)}, expected "
                                f"{spec['md5']}): delete it and run again to download it anew")
        return archive
    archive.parent.mkdir(parents=True, exist_ok=True)
    tmp = archive.with_name(archive.name + ".part")
    try:
        with urllib.request.urlopen(spec["url"], timeout=60) as response, open(tmp, "wb") as f, \
                tqdm(total=spec["bytes"], unit="B", unit_scale=True, desc=f"download {archive.name}") as bar:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ReportedError(
            f"could not download {spec['url']} ({e}).\nPut the archive at {archive} by hand, or "
            f"point --data-dir at an extracted {spec['folder']}/ folder") from None
    if md5_of(tmp) != spec["md5"]:
        tmp.unlink()
        raise ReportedError(f"the download of {spec['url']} is corrupt (MD5 mismatch): run again")
    os.replace(tmp, archive)
    return archive


def extracted_folder(dataset, cache_dir):
    """The extracted official folder under cache_dir, fetching and unpacking it if needed."""
    spec = DATASETS[dataset]
    folder = Path(cache_dir) / spec["folder"]
    if (folder / ".complete").exists():
        return folder
    archive = fetch_archive(spec, cache_dir)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(cache_dir, filter="data")  # "data": no absolute paths or links out
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ReportedError(f"{archive} cannot be unpacked ({e}): delete it and run again") from None
    (folder / ".complete").touch()
    return folder


def read_split(folder, dataset, split):
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 from the official pickles."""
    spec = DATASETS[dataset]
    images, labels = [], []
    for name in spec[split]:
        path = Path(folder) / name
        if not path.is_file():
            raise ReportedError(f"{path} is missing: --data-dir must be an extracted "
                                f"{spec['folder']}/ folder (with {', '.join(spec[split])})")
        try:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="bytes")  # the pickles come from Python 2
            images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch[spec["label_key"]], dtype=np.int64))
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as e:
            raise ReportedError(f"{path} is not an official {dataset} pickle ({type(e).__name__}: {e})") from None
    images, labels = np.concatenate(images), np.concatenate(labels)
    if labels.min() < 0 or labels.max() >= spec["classes"]:
        raise ReportedError(f"{folder}: labels outside 0..{spec['classes'] - 1}: is this {dataset}?")
    return torch.from_numpy(images), torch.from_numpy(labels)


# -----------------------------------------------------------------------------
# On-device data pipeline: normalize, crop, flip, whole tensors at once
# -----------------------------------------------------------------------------

def normalize(images_uint8, dataset, dtype):
    mean, std = (torch.tensor(v, device=images_uint8.device).view(1, 3, 1, 1) for v in MEAN_STD[dataset])
    return ((images_uint8.float() - mean) / std).to(dtype)


def augment(images, generator, pad=4):
    """Random crop with `pad` pixels of reflection padding, and a random horizontal flip,
    for a whole (N, C, H, W) batch with one gather: no loop over images."""
    N, C, H, W = images.shape
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (N,), generator=generator, device=images.device)
    dx = torch.randint(0, 2 * pad + 1, (N,), generator=generator, device=images.device)
    flip = torch.rand(N, generator=generator, device=images.device) < 0.5
    j = torch.arange(W, device=images.device)
    j = torch.where(flip[:, None], W - 1 - j, j)  # a flipped image reads its columns backwards
    rows = (dy[:, None] + torch.arange(H, device=images.device))[:, :, None]  # (N, H, 1)
    cols = (dx[:, None] + j)[:, None, :]                                      # (N, 1, W)
    n = torch.arange(N, device=images.device)[:, None, None]
    return padded[n, :, rows, cols].permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)


# -----------------------------------------------------------------------------
# Networks
# -----------------------------------------------------------------------------

def conv_bn(c_in, c_out, stride=1):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1, self.conv2 = conv_bn(c_in, c_out, stride), conv_bn(c_out, c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x):
        return F.relu(self.conv2(F.relu(self.conv1(x))) + self.shortcut(x))


class ResNet18(nn.Module):
    """The usual CIFAR ResNet-18 (He et al. 2016, with a 3x3 stem and no max-pool): 11.2M
    parameters, the standard CIFAR-100 baseline."""

    def __init__(self, classes, width=64):
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.stem = conv_bn(3, width)
        layers, c_in = [], width
        for i, c in enumerate(widths):
            layers += [BasicBlock(c_in, c, 1 if i == 0 else 2), BasicBlock(c, c, 1)]
            c_in = c
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, classes)

    def forward(self, x):
        x = self.layers(F.relu(self.stem(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class SmallNet(nn.Module):
    """A small fast net in the spirit of airbench: three groups of (conv, max-pool, BN, GELU,
    conv, BN, GELU) at widths w, 4w, 4w, a global max-pool and a linear head. 2.0M
    parameters at w = 64; quick on a GPU and usable on a CPU."""

    def __init__(self, classes, width=64):
        super().__init__()
        widths = [width, 4 * width, 4 * width]
        groups, c_in = [nn.Sequential(nn.Conv2d(3, width // 2, 3, padding=1, bias=False),
                                      nn.BatchNorm2d(width // 2), nn.GELU())], width // 2
        for c in widths:
            groups.append(nn.Sequential(
                nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(c), nn.GELU(),
                nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.GELU()))
            c_in = c
        self.features = nn.Sequential(*groups)
        self.fc = nn.Linear(c_in, classes, bias=False)

    def forward(self, x):
        return self.fc(F.adaptive_max_pool2d(self.features(x), 1).flatten(1))


NETS = {"resnet18": ResNet18, "small": SmallNet}


# -----------------------------------------------------------------------------
# Training
# -----------------------------------------------------------------------------

def lr_factor(step, total, warmup):
    """Linear warmup, then linear decay to zero (the one-cycle shape airbench uses)."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


@torch.no_grad()
def evaluate(model, images, labels, batch_size, autocast, layout=torch.contiguous_format):
    """Top-1 and top-5 accuracy on the (already normalized, on-device) test set."""
    model.eval()
    top1 = top5 = 0
    for i in range(0, len(images), batch_size):
        with autocast:
            logits = model(images[i:i + batch_size].contiguous(memory_format=layout))
        top = logits.topk(min(5, logits.size(1)), dim=1).indices
        y = labels[i:i + batch_size, None]
        top1 += (top[:, :1] == y).sum()
        top5 += (top == y).any(dim=1).sum()
    model.train()
    return top1.item() / len(images), top5.item() / len(images)


def save_atomic(obj, path):
    tmp = Path(str(path) + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a crash mid-write leaves the previous checkpoint intact


def train(args, data, optimizer_name, lr, seed, run_dir, resume_from=None):
    device = torch.device(args.device)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path = run_dir / "ckpt.pt", run_dir / "log.jsonl"
    train_x, train_y, test_x, test_y = data
    classes = DATASETS[args.dataset]["classes"]

    torch.manual_seed(seed)  # same seed: same initial weights for every optimizer
    # One memory layout for the model and every batch. channels_last is faster on CUDA
    # tensor cores, and on a CPU for the small net (850 vs 700 images/s here). On a CPU,
    # ResNet-18 keeps the plain layout: oneDNN's channels_last backward of its strided 1x1
    # shortcut conv crashes (segfault) on an odd-sized batch with 2+ threads (torch 2.13).
    layout = torch.channels_last if device.type == "cuda" or args.net == "small" else torch.contiguous_format
    model = NETS[args.net](classes, args.width).to(device, memory_format=layout)
    opt = reg.build_optimizer(optimizer_name, model, lr=lr, weight_decay=args.weight_decay)
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]
    start_epoch, elapsed, log_lines = 0, 0.0, []
    if resume_from:
        saved = torch.load(resume_from, map_location=device, weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        start_epoch, elapsed = saved["epoch"], saved["elapsed"]
        log_lines = [l for l in log_path.read_text().splitlines()
                     if l.strip() and json.loads(l)["epoch"] <= start_epoch] if log_path.exists() else []
    log_path.write_text("".join(l + "\n" for l in log_lines))
    net = torch.compile(model) if args.compile else model
    if args.compile:
        reg.use_compiled_math()
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and args.bf16
                else torch.autocast("cpu", enabled=False))

    steps_per_epoch = math.ceil(len(train_x) / args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    warmup = round(args.warmup_epochs * steps_per_epoch)
    for epoch in range(start_epoch, args.epochs):
        # The data order and augmentation of epoch e depend only on (seed, e), so a run
        # resumed at an epoch boundary sees exactly what an uninterrupted one sees.
        g = torch.Generator(device).manual_seed(seed * 100_003 + epoch)
        t0 = time.perf_counter()
        images = augment(train_x, g)
        order = torch.randperm(len(images), generator=g, device=device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        bar = tqdm(range(steps_per_epoch), desc=f"{optimizer_name} lr={lr:g} epoch {epoch + 1}/{args.epochs}",
                   disable=args.quiet, leave=False)
        for i in bar:
            step = epoch * steps_per_epoch + i
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lr_factor(step, total_steps, warmup)
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            x, y = images[idx].contiguous(memory_format=layout), train_y[idx]
            with autocast:
                logits = net(x)
                loss = F.cross_entropy(logits, y, label_smoothing=args.label_smoothing)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss_sum += loss.detach() * len(idx)
            correct += (logits.argmax(1) == y).sum()
        train_loss = loss_sum.item() / len(images)  # one sync per epoch
        if not math.isfinite(train_loss):
            raise ReportedError(f"{optimizer_name} lr={lr:g}: the loss became {train_loss} in epoch "
                                f"{epoch + 1}; stopped. The last good checkpoint is {ckpt_path} "
                                "(lower --lr)")
        epoch_time = time.perf_counter() - t0
        elapsed += epoch_time
        top1, top5 = evaluate(net, test_x, test_y, 1000, autocast, layout)
        entry = dict(epoch=epoch + 1, train_loss=train_loss, train_acc=correct.item() / len(images),
                     test_top1=top1, test_top5=top5, lr=opt.param_groups[0]["lr"],
                     epoch_time=round(epoch_time, 2), time=round(elapsed, 2),
                     images_per_s=round(len(images) / epoch_time, 1))
        with open(log_path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        save_atomic(dict(model=model.state_dict(), optimizer=opt.state_dict(), epoch=epoch + 1,
                         elapsed=elapsed, optimizer_name=optimizer_name, lr=lr, seed=seed,
                         args=vars(args)), ckpt_path)
        if not args.quiet:
            print(f"{optimizer_name} lr={lr:g} epoch {epoch + 1}: loss {train_loss:.3f}, train acc "
                  f"{entry['train_acc']:.3f}, test top-1 {top1:.4f} top-5 {top5:.4f}, "
                  f"{epoch_time:.1f}s ({entry['images_per_s']:,.0f} img/s)")
    summary = run_summary(optimizer_name, lr, seed, log_path, elapsed)
    print(f"{optimizer_name} lr={lr:g} seed={seed}: test top-1 {summary['test_top1']:.4f}, "
          f"top-5 {summary['test_top5']:.4f} after {args.epochs} epochs, {elapsed:.1f}s")
    return summary


def run_summary(optimizer_name, lr, seed, log_path, elapsed):
    """One row of results.csv, from the last epoch in a run's log."""
    entries = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    last = entries[-1] if entries else {}
    return dict(optimizer=optimizer_name, lr=lr, seed=seed, epochs=last.get("epoch", 0),
                test_top1=last.get("test_top1", float("nan")),
                test_top5=last.get("test_top5", float("nan")), time=round(elapsed, 1))


# What may differ between the runs of one comparison; every other argument is a setting
# that they must share (checked when a finished run is reused, or a folder summarized).
NOT_SETTINGS = ("optimizer", "lr", "seed", "optimizers", "lrs", "seeds", "out_dir", "resume",
                "summarize", "quiet", "epochs_given", "data_dir", "cache_dir")


def load_run(run_dir, what):
    path = run_dir / "ckpt.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise ReportedError(f"{what} {path}: not a readable checkpoint ({e})") from None


def finished_run(run_dir, settings):
    """A summary of the finished run in run_dir, "unfinished" for one that stopped early
    (to be resumed), or None where there is none. A run made with other settings than
    `settings` (an args dict) is an error: mixing it into a comparison would be a wrong
    result."""
    if not (run_dir / "ckpt.pt").exists():
        return None
    saved = load_run(run_dir, "the earlier run in")
    differences = reg.settings_differences(saved["args"], settings, NOT_SETTINGS)
    if differences:
        raise ReportedError(f"{run_dir} was run with other settings ({'; '.join(differences[:3])}); "
                            "a folder holds one sweep: pass another --out-dir, or remove that run")
    if saved["epoch"] < settings["epochs"]:
        return "unfinished"
    return run_summary(saved["optimizer_name"], saved["lr"], saved["seed"], run_dir / "log.jsonl",
                       saved["elapsed"])


def summarize(folder):
    """--summarize: the lr sweep of every finished run in a folder, as a table (mean and
    spread of test top-1 over seeds at each lr), sweep.csv and sweep.png; then results.csv and
    accuracy.png of the runs at each optimizer's best lr."""
    folder = Path(folder)
    run_dirs = sorted(path.parent for path in folder.glob("*/ckpt.pt"))
    if not run_dirs:
        raise ReportedError(f"--summarize {folder}: no finished runs there (each run folder holds a ckpt.pt)")
    settings = load_run(run_dirs[0], "--summarize")["args"]
    runs = []
    for run_dir in run_dirs:
        summary = finished_run(run_dir, settings)
        if summary == "unfinished":
            print(f"{run_dir.name}: unfinished, left out")
        else:
            runs.append(dict(summary, run=run_dir.name))
    if not runs:
        raise ReportedError(f"--summarize {folder}: every run there is unfinished")
    table = reg.summarize_sweep(runs, "test_top1", lower_is_better=False)
    reg.write_sweep(table, folder, "test top-1 accuracy")
    best = {(row["optimizer"], row["lr"]) for row in table if row["best"]}
    report([r for r in runs if (r["optimizer"], r["lr"]) in best], folder)


# -----------------------------------------------------------------------------
# Command line, compare mode, report
# -----------------------------------------------------------------------------

DEFAULTS = {  # per net: epochs, batch size, lr (unswept starting points)
    "resnet18": dict(epochs=30, batch_size=256, lr=2e-3, width=64),
    "small": dict(epochs=10, batch_size=512, lr=3e-3, width=64),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optimizer", default="reg",
                   help=f"one name or a comma list to compare ({', '.join(reg.OPTIMIZERS)})")
    p.add_argument("--lr", default=None, help="learning rate, or a comma list (default: the net's)")
    p.add_argument("--seed", default="0", help="seed, or a comma list")
    p.add_argument("--weight-decay", type=float, default=0.1, help="decoupled, all methods alike")
    p.add_argument("--dataset", choices=DATASETS, default="cifar100", help="official python version")
    p.add_argument("--net", choices=NETS, default=None, help="default: resnet18 on CUDA, small elsewhere")
    p.add_argument("--width", type=int, default=None, help="base channel width (64)")
    p.add_argument("--epochs", type=int, default=None, help="default: resnet18 30, small 10")
    p.add_argument("--batch-size", type=int, default=None, help="default: resnet18 256, small 512")
    p.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warmup, then linear decay to 0")
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--subset", type=int, default=None, help="train on the first N training images")
    p.add_argument("--data-dir", default=None, help="an extracted official folder; never downloads")
    p.add_argument("--cache-dir", default="data", help="where the archive is downloaded and extracted")
    p.add_argument("--out-dir", default="out/cifar", help="runs, logs, checkpoints, plots")
    p.add_argument("--resume", default=None, help="a run directory or ckpt.pt to continue")
    p.add_argument("--summarize", default=None, metavar="DIR",
                   help="train nothing: tabulate the finished runs in DIR (an --out-dir) per "
                        "optimizer and lr, mean and spread over seeds, and plot the sweep")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="CUDA: no bfloat16 autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile the net and reg's math")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    args = p.parse_args(argv)
    args.net = args.net or ("resnet18" if args.device.startswith("cuda") else "small")
    args.epochs_given = args.epochs is not None
    for key, value in DEFAULTS[args.net].items():
        if key != "lr" and getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.optimizers, args.lrs, args.seeds = reg.parse_grid(
            args.optimizer, args.lr or str(DEFAULTS[args.net]["lr"]), args.seed)
    except ValueError as e:
        p.error(str(e))
    for key in ("epochs", "batch_size", "width"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.subset is not None and args.subset < 1:
        p.error("--subset must be >= 1")
    if args.resume and (len(args.optimizers) > 1 or len(args.lrs) > 1 or len(args.seeds) > 1):
        p.error("--resume continues one run: give one optimizer, lr and seed (or none)")
    return args


def load_data(args):
    """All four tensors on the device: normalized images (bf16 on CUDA) and labels."""
    if args.data_dir is not None:
        folder = Path(args.data_dir)
        if not folder.is_dir():
            raise ReportedError(f"--data-dir {folder}: no such directory (it should be an extracted "
                                f"{DATASETS[args.dataset]['folder']}/ folder)")
    else:
        folder = extracted_folder(args.dataset, args.cache_dir)
    train_x, train_y = read_split(folder, args.dataset, "train")
    test_x, test_y = read_split(folder, args.dataset, "test")
    if args.subset:
        train_x, train_y = train_x[:args.subset], train_y[:args.subset]
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" and args.bf16 else torch.float32
    return (normalize(train_x.to(device), args.dataset, dtype), train_y.to(device),
            normalize(test_x.to(device), args.dataset, dtype), test_y.to(device))


def report(summaries, out_dir):
    print(f"\n{'optimizer':<11}{'lr':>9}{'seed':>6}{'top-1':>8}{'top-5':>8}{'time s':>9}")
    for s in summaries:
        print(f"{s['optimizer']:<11}{s['lr']:>9.2g}{s['seed']:>6}{s['test_top1']:>8.4f}"
              f"{s['test_top5']:>8.4f}{s['time']:>9.1f}")
    reg.write_csv(summaries, out_dir / "results.csv")
    plt = reg.pyplot("accuracy.png")
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in summaries:
        entries = [json.loads(l) for l in (out_dir / s["run"] / "log.jsonl").read_text().splitlines()]
        ax.plot([e["epoch"] for e in entries], [e["test_top1"] for e in entries],
                marker="o", label=f"{s['optimizer']} lr={s['lr']:g} s{s['seed']}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 accuracy")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    reg.save_figure(plt, fig, out_dir / "accuracy.png")


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.summarize:
            return summarize(args.summarize)
        resume_from = None
        if args.resume:  # the run continues with the settings it was started with
            resume_from = Path(args.resume)
            resume_from = resume_from / "ckpt.pt" if resume_from.is_dir() else resume_from
            if not resume_from.is_file():
                raise ReportedError(f"--resume {args.resume}: no checkpoint there")
            saved = torch.load(resume_from, map_location="cpu", weights_only=False)
            keep = dict(resume=args.resume, quiet=args.quiet,
                        epochs=args.epochs if args.epochs_given else saved["args"]["epochs"])
            args = argparse.Namespace(**{**vars(args), **saved["args"], **keep})
            args.optimizers, args.lrs, args.seeds = [saved["optimizer_name"]], [saved["lr"]], [saved["seed"]]
        data = load_data(args)
        out_dir = Path(args.out_dir) if not resume_from else resume_from.parent.parent
        summaries = []
        for name, lr, seed in itertools.product(args.optimizers, args.lrs, args.seeds):
            run = f"{args.dataset}-{args.net}-{name}-lr{lr:g}-s{seed}"
            run_from = resume_from
            if resume_from:
                run = resume_from.parent.name
            else:  # a sweep that was interrupted, or extended, redoes nothing that is done
                earlier = finished_run(out_dir / run, vars(args))
                if isinstance(earlier, dict):
                    print(f"{run}: finished earlier with these settings; reusing it")
                    summaries.append(dict(earlier, run=run))
                    continue
                if earlier == "unfinished":
                    print(f"{run}: stopped early; resuming it")
                    run_from = out_dir / run / "ckpt.pt"
            summaries.append(dict(train(args, data, name, lr, seed, out_dir / run, run_from), run=run))
        report(summaries, out_dir)
    except ReportedError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
