"""
train_cifar.py: CIFAR-100 (or CIFAR-10) classification with any optimizer of reg.py.

    python train_cifar.py                                  # ResNet-18 on CUDA, small net on CPU
    python train_cifar.py --optimizer adamw,reg,muon       # compare: same seed, same data order
    python train_cifar.py --dataset cifar10 --net small --epochs 10
    python train_cifar.py --data-dir ../shared/data/cifar100-mini/cifar-100-python --epochs 3
    python train_cifar.py --resume out/cifar/cifar100-small-reg-lr0.003-s0
    python train_cifar.py --optimizer adamw,reg --lr 1e-3,3e-3,1e-2 --seed 0,1,2  # a sweep
    python results/summarize.py out/cifar                 # its tables and figures

The data is the official "python version" archive from www.cs.toronto.edu/~kriz, downloaded
once (progress bar, temporary name, MD5 checked), extracted under --cache-dir and reused;
--data-dir uses an extracted copy and never downloads. The whole data set lives on the
device as uint8; random crops (4-pixel padding) and flips are done there on the whole
epoch at once, as airbench does: no DataLoader, no per-image Python.

Each run writes --out-dir/<dataset>-<net>-<optimizer>-lr<lr>-s<seed>/: log.jsonl (one line
per epoch), ckpt.pt (after every epoch, atomic; --resume continues exactly) and run.json;
run folders, downloads and command-line checks work as in train_gpt.py (results/runs.py).

Measured (results/README.md): the small net at --width 16 (125k parameters), 2 epochs on
all of CIFAR-10, about a minute of training on one core of a 2-core AMD EPYC, reaches
69.5% test top-1 with AdamW, 71.4% with Muon and 66.6% with REG, each at its own swept
learning rate (mean of 3 seeds), in float32. bfloat16 autocast, the default on a CPU that
multiplies it natively, trains that net at 1.38x and ResNet-18 at 2.2x float32's images/s
there. No GPU numbers have been measured yet.
"""

import argparse
import hashlib
import json
import math
import pickle
import sys
import tarfile
import time
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
                           download, existing_path, folder_path, load_checkpoint, number, optimizer_list,
                           precision_note, read_log, resumed_settings, run_folder_name, runs_to_do,
                           save_atomic, write_run_json)

# -----------------------------------------------------------------------------
# Settings: per-net sizes and every other default, in one place
# -----------------------------------------------------------------------------

NET_DEFAULTS = {  # unswept starting points; each can be set by its own flag
    "resnet18": dict(epochs=30, batch_size=256, lr=2e-3, width=64),
    "small": dict(epochs=10, batch_size=512, lr=3e-3, width=64),
}
DEFAULTS = dict(
    optimizer=["reg"], seed=[0],      # names (reg.OPTIMIZERS) and seeds: each combination runs
    weight_decay=0.1,                 # decoupled, the same for every method
    dataset="cifar100",
    warmup_epochs=1.0,                # linear warmup, then linear decay to zero
    label_smoothing=0.1,
    cache_dir="data", out_dir="out/cifar", compile=False, quiet=False,
    bf16=None,                        # bfloat16 autocast: on CUDA and on CPUs that run it natively
)
NOT_SETTINGS = ("optimizer", "lr", "seed", "out_dir", "resume", "quiet", "bf16_pinned", "data_dir", "cache_dir",
                "device", "compile")
RESUME_MAY_SET = ("epochs", "device", "compile", "quiet", "data_dir", "cache_dir")


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


def fetch_archive(spec, cache_dir):
    """The archive, downloaded once (through a temporary name) and MD5-checked; a copy
    already there is checked too, so a truncated or corrupt one is named, not used."""
    archive = Path(cache_dir) / spec["url"].rsplit("/", 1)[1]
    fresh = not archive.exists()
    if fresh:
        download(spec["url"], archive, spec["bytes"], f"point --data-dir at an extracted {spec['folder']}/ folder")
    with open(archive, "rb") as f:
        digest = hashlib.file_digest(f, "md5")
    if digest.hexdigest() != spec["md5"]:
        if fresh:
            archive.unlink()
            raise ReportedError(f"the download of {spec['url']} is corrupt (MD5 mismatch): run again")
        raise ReportedError(f"{archive} is corrupt or truncated (MD5 {digest.hexdigest()}, expected "
                            f"{spec['md5']}): delete it and run again to download it anew")
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


def load_data(args):
    """All four tensors on the device: normalized images (bf16 on CUDA) and labels."""
    folder = Path(args.data_dir) if args.data_dir else extracted_folder(args.dataset, args.cache_dir)
    if not folder.is_dir():
        raise ReportedError(f"--data-dir {folder}: not a folder (it should be an extracted "
                            f"{DATASETS[args.dataset]['folder']}/ folder)")
    train_x, train_y = read_split(folder, args.dataset, "train")
    test_x, test_y = read_split(folder, args.dataset, "test")
    if args.subset:
        train_x, train_y = train_x[:args.subset], train_y[:args.subset]
    dtype = torch.bfloat16 if args.device.startswith("cuda") and args.bf16 else torch.float32
    return (normalize(train_x.to(args.device), args.dataset, dtype), train_y.to(args.device),
            normalize(test_x.to(args.device), args.dataset, dtype), test_y.to(args.device))


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
def evaluate(model, images, labels, batch_size, autocast, layout):
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


def start(args, name, lr, seed, run_dir, resume):
    """Model, optimizer and counters, fresh (the same initial weights for every optimizer of
    one seed) or restored from the run's checkpoint."""
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    # One memory layout for the model and every batch: channels_last, faster on CUDA and
    # for the small net on a CPU (850 vs 700 images/s here). ResNet-18 on a CPU keeps the
    # plain layout: oneDNN's channels_last backward of its strided 1x1 shortcut conv
    # segfaults on an odd-sized batch with 2+ threads (torch 2.13).
    layout = torch.channels_last if args.device.startswith("cuda") or args.net == "small" else torch.contiguous_format
    model = NETS[args.net](DATASETS[args.dataset]["classes"], args.width).to(args.device, memory_format=layout)
    opt = build_optimizer(name, model, lr, args.weight_decay)
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]
    run = SimpleNamespace(args=args, name=name, lr=lr, seed=seed, dir=run_dir, model=model, opt=opt,
                          layout=layout, net=torch.compile(model) if args.compile else model,
                          epoch=0, elapsed=0.0, startup_s=None, log=[])
    if resume:
        saved = load_checkpoint(run_dir, "--resume")
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        run.epoch, run.elapsed, run.startup_s = saved["epoch"], saved["elapsed"], saved.get("startup_s")
        run.log = read_log(run_dir, "epoch", run.epoch)
    (run_dir / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in run.log))
    if args.compile:
        reg.use_compiled_math()
    run.autocast = torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.bf16)
    write_record(run, finished=False)
    return run


def train(args, name, lr, seed, data, run_dir, resume=False):
    """Train one model, writing its log, checkpoints and run.json; returns its log."""
    t_start = time.perf_counter()
    run = start(args, name, lr, seed, run_dir, resume)
    train_x, train_y, test_x, test_y = data
    steps_per_epoch = math.ceil(len(train_x) / args.batch_size)
    total, warmup = args.epochs * steps_per_epoch, round(args.warmup_epochs * steps_per_epoch)
    for epoch in range(run.epoch, args.epochs):
        # The data order and augmentation of epoch e depend only on (seed, e), so a run
        # resumed at an epoch boundary sees exactly what an uninterrupted one sees.
        g = torch.Generator(args.device).manual_seed(seed * 100_003 + epoch)
        t0 = time.perf_counter()
        images = augment(train_x, g)
        order = torch.randperm(len(images), generator=g, device=args.device)
        loss_sum = torch.zeros((), device=args.device)
        correct = torch.zeros((), device=args.device, dtype=torch.long)
        for i in tqdm(range(steps_per_epoch), desc=f"{name} lr={lr:g} epoch {epoch + 1}/{args.epochs}",
                      disable=args.quiet, leave=False):
            for group in run.opt.param_groups:
                group["lr"] = group["initial_lr"] * lr_factor(epoch * steps_per_epoch + i, total, warmup)
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            x, y = images[idx].contiguous(memory_format=run.layout), train_y[idx]
            with run.autocast:
                logits = run.net(x)
                loss = F.cross_entropy(logits, y, label_smoothing=args.label_smoothing)
            loss.backward()
            run.opt.step()
            run.opt.zero_grad(set_to_none=True)
            loss_sum += loss.detach() * len(idx)
            correct += (logits.argmax(1) == y).sum()
            if run.startup_s is None:  # the run's first step is done: model, data, compile
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize(args.device)
                run.startup_s = time.perf_counter() - t_start
        train_loss = loss_sum.item() / len(images)  # one sync per epoch
        if not math.isfinite(train_loss):
            raise ReportedError(f"{name} lr={lr:g}: the loss became {train_loss} in epoch {epoch + 1}; "
                                f"stopped. The last good checkpoint is {run_dir / 'ckpt.pt'} (lower --lr)")
        epoch_time = time.perf_counter() - t0
        run.elapsed += epoch_time
        top1, top5 = evaluate(run.net, test_x, test_y, 1000, run.autocast, run.layout)
        entry = dict(epoch=epoch + 1, train_loss=train_loss, train_acc=correct.item() / len(images),
                     test_top1=top1, test_top5=top5, lr=run.opt.param_groups[0]["lr"],
                     epoch_time=round(epoch_time, 2), time=round(run.elapsed, 2),
                     images_per_s=round(len(images) / epoch_time, 1))
        save(run, entry)
        if not args.quiet:
            print(f"{name} lr={lr:g} epoch {epoch + 1}: loss {train_loss:.3f}, train acc {entry['train_acc']:.3f}, "
                  f"test top-1 {top1:.4f} top-5 {top5:.4f}, {epoch_time:.1f}s ({entry['images_per_s']:,.0f} img/s)")
    write_record(run, finished=True)
    last = run.log[-1]
    print(f"{name} lr={lr:g} seed={seed}: test top-1 {last['test_top1']:.4f}, top-5 "
          f"{last['test_top5']:.4f} after {args.epochs} epochs, {run.elapsed:.1f}s")
    return run.log


def save(run, entry):
    """The epoch's log line, then ckpt.pt (atomically)."""
    run.log.append(entry)
    with open(run.dir / "log.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")
    save_atomic(dict(model=run.model.state_dict(), optimizer=run.opt.state_dict(), epoch=entry["epoch"],
                     elapsed=run.elapsed, startup_s=run.startup_s, optimizer_name=run.name, lr=run.lr, seed=run.seed,
                     args=vars(run.args)), run.dir / "ckpt.pt")


def write_record(run, finished):
    """run.json: the run, its settings and, once finished, its results.csv row."""
    last = run.log[-1] if run.log else {}
    steady = run.log[1:] or run.log  # from the second epoch on: the first pays for the startup
    images = sum(e["images_per_s"] * e["epoch_time"] for e in steady)
    write_run_json(run, NOT_SETTINGS, script="train_cifar", finished=finished, metric="test_top1",
                   lower_is_better=False, curve=["epoch", "test_top1"],
                   summary=dict(optimizer=run.name, lr=run.lr, seed=run.seed, epochs=last.get("epoch", 0),
                                test_top1=last.get("test_top1"), test_top5=last.get("test_top5"),
                                time=round(run.elapsed, 1), startup_s=round(run.startup_s or 0.0, 3),
                                images_per_s=round(images / max(sum(e["epoch_time"] for e in steady), 1e-9))))


# -----------------------------------------------------------------------------
# Command line: settings, checks, main
# -----------------------------------------------------------------------------

def make_parser():
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--optimizer", type=optimizer_list, help=f"a name or a comma list ({', '.join(reg.OPTIMIZERS)})")
    add("--lr", type=number(many=True), help="learning rate or comma list (default: the net's)")
    add("--seed", type=number(int, 0, 2**32 - 1, many=True), help="seed or comma list")
    add("--weight-decay", type=number(), help="decoupled, the same for all methods (0.1)")
    add("--dataset", choices=DATASETS, help="the official python version (cifar100)")
    add("--net", choices=NETS, help="resnet18 on CUDA, small elsewhere")
    add("--width", type=number(int, 1), help="base channel width (64)")
    add("--epochs", type=number(int, 1), help="resnet18 30, small 10")
    add("--batch-size", type=number(int, 1), help="resnet18 256, small 512")
    add("--warmup-epochs", type=number(float, 0), help="linear warmup, then linear decay to 0 (1.0)")
    add("--label-smoothing", type=number(float, 0, 0.99), help="(0.1)")
    add("--subset", type=number(int, 1), help="train on the first N training images")
    add("--data-dir", type=existing_path, help="an extracted official folder; never downloads")
    add("--cache-dir", type=folder_path, help="where the archive is downloaded and extracted (data)")
    add("--out-dir", type=folder_path, help="runs, logs, checkpoints, tables (out/cifar)")
    add("--resume", type=existing_path, help="a run folder (or its ckpt.pt) to continue: that run alone")
    add("--device", help="cuda, cuda:N or cpu (cuda when there is one)")
    add("--bf16", action=argparse.BooleanOptionalAction,
        help="bfloat16 autocast, float32 weights (default: on CUDA and on CPUs with native bfloat16)")
    add("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the net and math (off)")
    add("--quiet", action="store_true", default=None, help="no progress bar or per-epoch lines")
    return p


def parse_args(argv=None):
    """Each flag given, else the net's default, else DEFAULTS; with --resume, the run's own
    settings (only RESUME_MAY_SET may change). All checked before anything is written."""
    p = make_parser()
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    try:
        if "resume" in given:
            args = resumed_settings(given, RESUME_MAY_SET, "epoch", "epochs")
        else:
            device = given.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
            net = given.get("net") or ("resnet18" if device.startswith("cuda") else "small")
            args = argparse.Namespace(**{**DEFAULTS, **NET_DEFAULTS[net], "lr": [NET_DEFAULTS[net]["lr"]],
                                         "net": net, "device": device, "subset": None, "data_dir": None,
                                         "resume": None, **given})
            args.bf16_pinned = args.bf16 is not None  # chosen by --bf16 / --no-bf16: kept on resume
            args.bf16 = default_bf16(args.device) if args.bf16 is None else args.bf16
            if args.warmup_epochs >= args.epochs and "warmup_epochs" not in given:
                print(f"note: {args.warmup_epochs:g} warmup epochs do not fit in --epochs {args.epochs}: "
                      f"warming up for {args.epochs / 10:g} (pass --warmup-epochs to choose)")
                args.warmup_epochs = args.epochs / 10
        check_device(args.device)
        if args.warmup_epochs >= args.epochs:
            raise ValueError(f"--warmup-epochs {args.warmup_epochs:g} must be below --epochs {args.epochs}")
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv=None):
    try:
        args = parse_args(argv)
        if args.device.startswith("cuda"):  # TF32 matmuls; cuDNN picks the fastest conv algorithms
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        todo = runs_to_do(args, NOT_SETTINGS, lambda name, lr, seed: f"{args.dataset}-{args.net}-{run_folder_name(name)}-lr{lr:g}-s{seed}")
        data = load_data(args)
        print(precision_note(args))
        for name, lr, seed, run_dir in todo:
            with claimed(run_dir, args, explicit=bool(args.resume)) as claim:  # one writer per run
                if claim:
                    train(args, name, lr, seed, data, run_dir, claim == "resume")
        summarize.report(Path(args.resume).parent if args.resume else args.out_dir, strict=False)
    except (ReportedError, summarize.SweepError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
