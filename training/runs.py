"""
training/runs.py: what train_gpt.py and train_cifar.py share, none of it about optimizers.

Run folders (which runs a command still has to do, resuming one with its own settings,
atomic writes, checkpoints), downloads, the command line's checks, the choice of
precision, and joining a torchrun launch. Every problem a user can cause is a
ReportedError: one line, no traceback. results/summarize.py then turns the run folders
into tables and figures.
"""

import argparse
import contextlib
import itertools
import json
import math
import os
import re
import sys
import urllib.request
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

try:
    import fcntl  # POSIX file locks
except ImportError:  # Windows
    fcntl = None

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # reg.py
import reg  # noqa: E402
from results import summarize  # noqa: E402


class ReportedError(Exception):
    """A problem shown to the user as one clear line, without a traceback."""


# -----------------------------------------------------------------------------
# Run folders: atomic writes, checkpoints, which runs to do, resuming
# -----------------------------------------------------------------------------

def write_atomic(path, text):
    tmp = Path(f"{path}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # a crash mid-write leaves the previous file whole


def write_run_json(run, not_settings, **fields):
    """run.json, atomically: which run this is, its settings (every flag but those in
    `not_settings`: what the runs of one folder share) and the script's own fields
    (finished, metric, curve, summary: what summarize.py reads)."""
    record = dict(run=run.dir.name, optimizer=run.name, lr=run.lr, seed=run.seed,
                  settings={k: v for k, v in vars(run.args).items() if k not in not_settings}, **fields)
    write_atomic(run.dir / "run.json", json.dumps(record, indent=1))


def read_log(run_dir, key, upto):
    """A resumed run's log.jsonl up to its checkpoint (`key` <= `upto`): the rest is redone.
    A last line cut short by a kill is dropped (summarize.read_jsonl)."""
    try:
        return [e for e in summarize.read_jsonl(Path(run_dir) / "log.jsonl") if e[key] <= upto]
    except summarize.SweepError as e:
        raise ReportedError(f"{e}: delete {run_dir} to train that run from the start") from None


def load_checkpoint(path, what):
    """A checkpoint, loaded as data (weights_only=True): tensors, numbers, strings, lists and
    dicts, never code, so loading a checkpoint someone shared cannot run anything."""
    path = Path(path) / "ckpt.pt" if Path(path).is_dir() else Path(path)
    if not path.is_file():
        raise ReportedError(f"{what} {path}: no checkpoint there")
    fix = ("point --init-from at a whole checkpoint" if what == "--init-from"
           else f"delete {path.parent} to train that run from the start")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # code where data should be, or a truncated or foreign file
        code = re.search(r"GLOBAL (\S+)", str(e))  # what the file would have called
        if code:
            raise ReportedError(f"{what} {path}: holds more than tensors and plain data (it calls "
                                f"{code[1]}), so it is not loaded: a checkpoint is read as data, never "
                                "run as code") from None
        raise ReportedError(f"{what} {path}: not a readable checkpoint ({str(e).splitlines()[0][:120]}); "
                            f"{fix}") from None


def runs_to_do(args, not_settings, run_name):
    """The runs this command asks for, as (optimizer, lr, seed, run folder): --resume's one
    run, or every combination of --optimizer, --lr and --seed less those finished in the
    folder (`claimed` then says, run by run, whether to start, resume or skip it). A folder
    holds runs of one setting: a run there with other settings is an error (never mixed in)
    that names what differs."""
    if args.resume:
        return [(args.optimizer[0], args.lr[0], args.seed[0], Path(args.resume))]
    settings, finished = {k: v for k, v in vars(args).items() if k not in not_settings}, {}
    for path in sorted(Path(args.out_dir).glob("*/run.json")):
        record = json.loads(path.read_text())
        differences = summarize.settings_differences(record["settings"], settings)
        if differences:
            raise ReportedError(f"{path.parent} was run with other settings ({'; '.join(differences[:3])}); "
                                "a folder holds one sweep: pass another --out-dir")
        finished[path.parent.name] = record["finished"]
    todo = []
    for name, lr, seed in itertools.product(args.optimizer, args.lr, args.seed):
        run_dir = Path(args.out_dir) / run_name(name, lr, seed)
        if finished.get(run_dir.name):
            print(f"{run_dir.name}: finished earlier with these settings; reusing it")
        else:
            todo.append((name, lr, seed, run_dir))
    return todo


@contextlib.contextmanager
def claimed(run_dir, args, explicit=False):
    """Hold an OS lock on run_dir/.lock while this process trains the run, so that one run
    has one writer: a second command on the same folder skips the runs another process is
    training and takes the others (launch a sweep N times and it is shared out N ways). The
    OS releases the lock when the process ends, kill -9 included. Yields "fresh", "resume"
    (a checkpoint is there) or None (another process holds the run, or finished it since
    this command listed it). Under torchrun rank 0 decides for all. `explicit` (--resume):
    a run held elsewhere is an error, not a skip. No lock where the OS has no flock
    (Windows): there, run one command per folder."""
    handle, decision = None, 0  # 0: skip, 1: fresh, 2: resume
    rank, world = getattr(args, "rank", 0), getattr(args, "world", 1)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(run_dir / ".lock", "a")
        try:
            if fcntl:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            record = run_dir / "run.json"
            finished = not explicit and record.exists() and json.loads(record.read_text()).get("finished")
            decision = 0 if finished else 2 if (run_dir / "ckpt.pt").exists() else 1
            if finished:
                print(f"{run_dir.name}: finished by another process meanwhile; reusing it")
            elif decision == 2 and not explicit:
                print(f"{run_dir.name}: stopped early; resuming it")
        except BlockingIOError:
            handle.close()
            handle = None
            if explicit:
                raise ReportedError(f"{run_dir} is being trained by another process right now: "
                                    "wait for it to finish, or stop it first") from None
            print(f"{run_dir.name}: another process is training it; skipping it here")
    if world > 1:
        flag = torch.tensor([decision], device=args.device)
        torch.distributed.broadcast(flag, 0)
        decision = int(flag.item())
    try:
        yield (None, "fresh", "resume")[decision]
    finally:
        if handle:
            handle.close()  # closing the file releases the lock


def resumed_settings(given, may_set, progress, limit):
    """--resume RUN: the run's own settings from its checkpoint; only the flags in `may_set`
    may change, and `limit` ("max_steps", "epochs") must lie beyond its `progress`."""
    saved = load_checkpoint(given["resume"], "--resume")
    changed = sorted(k for k in given if k not in may_set + ("resume",) and given[k] != saved["args"].get(k))
    if changed:
        raise ValueError(f"--{changed[0].replace('_', '-')} cannot change when resuming (the run "
                         f"continues with its own settings); --resume may set: "
                         + ", ".join("--" + k.replace("_", "-") for k in may_set))
    args = argparse.Namespace(**{**saved["args"], **given})
    args.resume = str(Path(given["resume"]).parent if Path(given["resume"]).is_file() else given["resume"])
    args.optimizer, args.lr, args.seed = [saved["optimizer_name"]], [saved["lr"]], [saved["seed"]]
    here = "cuda" if torch.cuda.is_available() else "cpu"
    if "device" not in given and torch.device(args.device).type != here:  # train where the user is
        print(f"note: the run was trained on {args.device}; it continues on {here}, as a fresh run "
              "here would (--device to choose)")
        args.device = here
    if "bf16" not in given and not saved["args"].get("bf16_pinned") and args.bf16 != default_bf16(args.device):
        args.bf16 = default_bf16(args.device)  # precision follows the device unless the run chose it
        print(f"note: it continues {'in bfloat16 autocast' if args.bf16 else 'in float32'}, this "
              f"device's default (--bf16 / --no-bf16 to choose)")
    if getattr(args, limit) <= saved[progress]:
        flag = "--" + limit.replace("_", "-")
        raise ValueError(f"--resume {given['resume']}: the run is at {progress} {saved[progress]} of "
                         f"{getattr(args, limit)}; pass {flag} above {saved[progress]} to train it further")
    return args


def save_atomic(checkpoint, path):
    """torch.save through a temporary name: a crash mid-write never replaces the last good
    checkpoint with half of a new one."""
    torch.save(checkpoint, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)


# -----------------------------------------------------------------------------
# Downloads
# -----------------------------------------------------------------------------

def download(url, dest, expected_bytes, alternative):
    """Fetch url to dest once, with a progress bar, through a temporary name that is
    renamed only after the size checks out: an interrupted download never looks complete.
    `alternative`: what the user can do instead, said when the download fails."""
    dest = Path(dest)
    if dest.exists() and dest.stat().st_size == expected_bytes:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f, \
                tqdm(total=expected_bytes, unit="B", unit_scale=True, desc=f"download {dest.name}") as bar:
            while chunk := response.read(1 << 20):
                bar.update(f.write(chunk))
    except OSError as e:  # URLError, timeouts and disk errors are all OSErrors
        tmp.unlink(missing_ok=True)
        raise ReportedError(f"could not download {url} ({e}). It is expected at {dest}: put it "
                            f"there by hand, or {alternative}") from None
    if tmp.stat().st_size != expected_bytes:
        got = tmp.stat().st_size
        tmp.unlink()
        raise ReportedError(f"download of {url} gave {got:,} bytes, expected {expected_bytes:,}; "
                            "run again to retry")
    os.replace(tmp, dest)
    return dest


# -----------------------------------------------------------------------------
# The command line's checks
# -----------------------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block: "error: argument --lr: ..."
        self.exit(2, f"error: {message}\n")


def number(kind=float, low=0.0, high=math.inf, many=False):
    """An argparse type: a finite number in [low, high] (or a comma list of them)."""
    def parse(text):
        try:
            values = [kind(v) for v in text.split(",")] if many else [kind(text)]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'comma list of ' if many else ''}"
                                             f"{kind.__name__}") from None
        if not all(math.isfinite(v) and low <= v <= high for v in values):
            raise argparse.ArgumentTypeError(f"{text}: must be in [{low:g}, {high:g}]")
        return values if many else values[0]
    return parse


def existing_path(text):
    if not Path(text).exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file or directory")
    return text


def folder_path(text):
    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text}: exists and is not a folder")
    return text


def option_value(text):
    """A method option's value from the command line: a number (inf too), true/false, or
    the text itself ("polar_express", "R")."""
    for kind in (int, float):
        with contextlib.suppress(ValueError):
            return kind(text)
    return {"true": True, "false": False}.get(text.lower(), text)


def optimizer_spec(spec):
    """"reg:p=inf:racs_steps=3" -> ("reg", {"p": inf, "racs_steps": 3}): a name of
    reg.OPTIMIZERS, then its options after colons."""
    name, *options = spec.split(":")
    pairs = [o.split("=", 1) for o in options]
    if any(len(pair) != 2 or not pair[0] for pair in pairs):
        raise argparse.ArgumentTypeError(f"{spec}: options go as name:key=value[:key=value], "
                                         "e.g. muon:ns_coefficients=polar_express")
    return name, {key: option_value(value) for key, value in pairs}


def optimizer_list(text):
    """--optimizer: a comma list such as "adamw,reg,muon:ns_coefficients=polar_express" ->
    its specs, each name known and each option one its optimizer takes, with a valid value
    (checked by building it on a dummy weight)."""
    specs = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in specs if optimizer_spec(n)[0] not in reg.OPTIMIZERS]
    if unknown or not specs:
        raise argparse.ArgumentTypeError(f"unknown optimizer {', '.join(unknown) or repr(text)}; "
                                         f"known: {', '.join(reg.OPTIMIZERS)}")
    for spec in specs:
        name, options = optimizer_spec(spec)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                reg.build_optimizer(name, [torch.nn.Parameter(torch.zeros(2, 2))], **options)
        except (TypeError, ValueError) as e:
            raise argparse.ArgumentTypeError(f"{spec}: {e}") from None
    return specs


def build_optimizer(spec, model, lr, weight_decay):
    """reg.build_optimizer for an --optimizer spec (optimizer_spec)."""
    name, options = optimizer_spec(spec)
    return reg.build_optimizer(name, model, lr=lr, weight_decay=weight_decay, **options)


def run_folder_name(spec):
    """A spec as part of a folder name: its colons (which Windows forbids) as '+'."""
    return spec.replace(":", "+")


def check_device(text):
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"--device {text}: not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {text}: CUDA is not available here; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ValueError(f"--device {text}: this machine has {count} CUDA device{'s' * (count != 1)} "
                         f"(cuda:0 to cuda:{count - 1})")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {text}: this script runs on cpu or cuda")


# -----------------------------------------------------------------------------
# Precision: bfloat16 autocast where the device runs it natively
# -----------------------------------------------------------------------------

def cpu_runs_bfloat16():
    """Whether this CPU multiplies bfloat16 natively (avx512_bf16 or AMX), where bfloat16
    autocast is faster than float32. torch's check is oneDNN's, which also accepts AVX-512
    CPUs that only emulate bfloat16 (slower than float32): where Linux lists the CPU's
    flags, they decide."""
    if not torch.backends.mkldnn.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return True
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_bf16(device):
    return device.startswith("cuda") or cpu_runs_bfloat16()


def precision_note(args):
    """One line: which precision this run computes in, and why."""
    if args.device.startswith("cuda"):
        return f"precision: {'bfloat16 autocast' if args.bf16 else 'TF32'} on CUDA (--no-bf16 / --bf16 to choose)"
    native = cpu_runs_bfloat16()
    why = "this CPU multiplies bfloat16 natively" if native else "this CPU has no native bfloat16 (avx512_bf16 or AMX)"
    return (f"precision: {'bfloat16 autocast, float32 weights' if args.bf16 else 'float32'}: {why}"
            f"{'' if args.bf16 == native else ' (chosen by flag)'}; --bf16 / --no-bf16 to choose")


# -----------------------------------------------------------------------------
# Several processes: torchrun
# -----------------------------------------------------------------------------

def start_distributed(args):
    """Under torchrun: join the process group (NCCL on CUDA, gloo on a CPU), take this
    process's GPU, and let rank 0 alone print. Sets args.rank and args.world (0 and 1
    without torchrun, where nothing else changes)."""
    args.rank, args.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if args.world == 1:
        return
    if args.grad_accum % args.world:
        raise ReportedError(f"--grad-accum {args.grad_accum} must be divisible by the {args.world} "
                            "processes: each takes an equal share of a step's micro-batches")
    if args.device.startswith("cuda"):
        args.device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(args.device)
    torch.distributed.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    if args.rank > 0:
        args.quiet, sys.stdout = True, open(os.devnull, "w")  # one process speaks for all


def mean_over_processes(values, world):
    """The mean of `values` over the processes of a torchrun launch (itself without one)."""
    if world > 1:
        torch.distributed.all_reduce(values)  # a sum: gloo has no average
        values = values / world
    return values
