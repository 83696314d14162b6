"""
results/speed.py: how fast the scripts train on this machine, in bfloat16 and float32,
side by side with nanoGPT's own train.py on the same model, batch and data.

    python results/speed.py --nanogpt ../nanoGPT          # a clone of karpathy/nanoGPT
    python results/speed.py --cifar-data DIR              # also train_cifar.py (extracted CIFAR)
    python results/speed.py --reps 1 --sizes 4x128        # ours only, one size, once
    python results/speed.py --sizes "" --cifar-data DIR   # train_cifar.py only
    python results/speed.py --sizes "" --attention        # attention alone: flash and written out
    python results/speed.py --sizes "" --profile          # where a 6x384 bfloat16 step's time goes

Each measurement is a real run of a script (AdamW, lr 4e-3) in its own process, and the
runs interleave (ours in bfloat16, ours in float32, nanoGPT, then all again), so that a
slow spell of a shared machine hits all alike; the tables give the median over --reps.
GPT speed is tokens/s of training (evaluation excluded). nanoGPT gets our byte tokens as
its data/owtbytes/{train,val}.bin (the same uint16 format) with vocab_size 320, as ours
pads the 257 byte symbols to a multiple of 64; it runs with compile off, bias off,
dropout 0 and, on a CPU, in float32 (its train.py autocasts only on CUDA); its tokens/s
comes from the times it prints for each iteration. CIFAR speed is images/s over the epochs
after the first (which holds the start-up). --csv FILE keeps every measurement.
"""

import argparse
import json
import pickle
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
import train_gpt  # noqa: E402
from results import summarize  # noqa: E402

GPT_SIZES = {  # name: (layers, heads, width, context, steps); batch 16 throughout
    "4x128": (4, 4, 128, 128, 300),   # the `small` preset of every CPU result
    "6x384": (6, 6, 384, 256, 40),    # 10.7M parameters: near the CPU's bfloat16 peak
}
CIFAR_NETS = {"small": (16, 512, 6), "resnet18": (64, 256, 3)}  # name: (width, batch, epochs)
ATTENTION_OPS = ("aten::bmm", "aten::_softmax", "aten::_softmax_backward_data", "aten::masked_fill",
                 "aten::masked_fill_")  # written-out attention in the profile (flash: "dot_product")


def run_ours(script, flags, out):
    done = subprocess.run([sys.executable, script, *flags, "--quiet", "--out-dir", str(out)], cwd=ROOT,
                          capture_output=True, text=True)
    runs = list(Path(out).glob("*/run.json"))
    if done.returncode or not runs:
        sys.exit(f"{script} failed:\n{done.stderr[-3000:]}")
    return runs[0].parent


def gpt_ours(size, bf16, data, out):
    layers, heads, width, context, steps = GPT_SIZES[size]
    flags = ["--tokenizer", "bytes", "--data", data, "--n-layer", layers, "--n-head", heads, "--n-embd", width,
             "--block-size", context, "--batch-size", 16, "--grad-accum", 1, "--optimizer", "adamw",
             "--lr", "4e-3", "--max-steps", steps, "--warmup-steps", 10, "--eval-every", steps,
             "--eval-batches", 2, "--bf16" if bf16 else "--no-bf16"]
    folder = run_ours("train_gpt.py", [str(f) for f in flags], out)
    return json.loads((folder / "run.json").read_text())["summary"]["tokens_per_s"]


def gpt_nanogpt(size, nanogpt, out):
    layers, heads, width, context, steps = GPT_SIZES[size]
    flags = dict(device="cpu", compile=False, dataset="owtbytes", n_layer=layers, n_head=heads, n_embd=width,
                 block_size=context, batch_size=16, gradient_accumulation_steps=1, bias=False, dropout=0.0,
                 max_iters=steps, lr_decay_iters=steps, warmup_iters=10, learning_rate=4e-3, min_lr=4e-4,
                 eval_interval=10**9, eval_iters=2, log_interval=1, always_save_checkpoint=False,
                 out_dir=Path(out).resolve())
    done = subprocess.run([sys.executable, "train.py", *(f"--{k}={v}" for k, v in flags.items())], cwd=nanogpt,
                          capture_output=True, text=True)
    ms = [float(t) for t in re.findall(r"iter \d+: loss [\d.]+, time ([\d.]+)ms", done.stdout)]
    if len(ms) < steps:
        sys.exit(f"nanoGPT's train.py failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return 16 * context * len(ms) / (sum(ms) / 1000)


def give_nanogpt_our_tokens(nanogpt, data):
    """Our byte-level token files, copied into the nanoGPT clone as its owtbytes data set."""
    args = train_gpt.parse_args(["--tokenizer", "bytes", "--data", data])
    splits, meta = train_gpt.load_data(args, data)
    target = Path(nanogpt) / "data" / "owtbytes"
    target.mkdir(parents=True, exist_ok=True)
    for split, tokens in splits.items():
        (target / f"{split}.bin").write_bytes(Path(tokens.filename).read_bytes())
    vocab = train_gpt.model_config(args, meta, None).vocab_size  # padded as ours is: 320
    (target / "meta.pkl").write_bytes(pickle.dumps(dict(vocab_size=vocab)))
    print(f"nanoGPT's data: our byte tokens in {target}")


def cifar_ours(net, bf16, data_dir, out):
    width, batch, epochs = CIFAR_NETS[net]
    flags = ["--dataset", "cifar100", "--data-dir", data_dir, "--net", net, "--width", width, "--batch-size",
             batch, "--epochs", epochs, "--warmup-epochs", 1, "--optimizer", "adamw", "--lr", "4e-3",
             "--bf16" if bf16 else "--no-bf16"]
    folder = run_ours("train_cifar.py", [str(f) for f in flags], out)
    log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()][1:]
    return sum(e["images_per_s"] * e["epoch_time"] for e in log) / sum(e["epoch_time"] for e in log)


def cpu_identity():
    """The CPU, as Linux names it, without commas (it goes into the CSV): bfloat16 speed
    differs between generations of one brand, so 'family 25 model 17' matters."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    first_core = info.split("\n\n")[0].splitlines()
    field = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in first_core)}
    flags = [f for f in field.get("flags", "").split() if f in ("avx512_bf16", "amx_bf16")]
    return (f"{field.get('model name', 'unknown').replace(',', ' ')} family {field.get('cpu family', '?')} "
            f"model {field.get('model', '?')} {torch.get_num_threads()} threads "
            f"{' '.join(flags) or 'no native bfloat16'}")


def attention_ms(heads, context, head_size, dtype, written_out=False, reps=10):
    """Milliseconds for a forward and backward of causal attention on a batch of 16:
    F.scaled_dot_product_attention (whichever kernel torch picks: flash on a CPU), or with
    written_out the GPT's own matmul_attention."""
    attention = train_gpt.matmul_attention if written_out else (
        lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
    q, k, v = (torch.randn(16, heads, context, head_size, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn_like(q)
    times = []
    for _ in range(reps + 2):  # two warm-up rounds
        start = time.perf_counter()
        attention(q, k, v).backward(grad)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times[2:])


def matmul_gflops(n, dtype, seconds=2.0):
    """GFLOP/s of an n x n by n x n product in `dtype`, repeated for `seconds`."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e9


def step_profile(size="6x384", steps=5):
    """Our GPT's bfloat16 training step at `size` (AdamW, batch 16, random tokens): ms per
    step, eager and torch.compile'd, and the eager step split by torch.profiler into
    matmuls, attention and the rest, with the matmuls' GFLOP/s (6 x matrix weights x tokens)."""
    layers, heads, width, context, _ = GPT_SIZES[size]
    torch.manual_seed(0)
    model = train_gpt.GPT(train_gpt.GPTConfig(vocab_size=320, block_size=context, n_layer=layers,
                                              n_head=heads, n_embd=width))
    opt = train_gpt.reg.build_optimizer("adamw", model, lr=1e-3)
    x, y = torch.randint(0, 257, (16, context)), torch.randint(0, 257, (16, context))

    def step(net):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            net(x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    ms = {}
    for name, net in (("eager", model), ("compiled", torch.compile(model))):
        for _ in range(2):  # warm-up (and, compiled, the compilation)
            step(net)
        start = time.perf_counter()
        for _ in range(steps):
            step(net)
        ms[name] = 1e3 * (time.perf_counter() - start) / steps
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step(model)
    parts = dict(matmuls=0.0, attention=0.0, rest=0.0)
    for event in prof.key_averages():
        kind = ("matmuls" if event.key == "aten::mm" else  # the Linear layers; attention's are aten::bmm
                "attention" if event.key in ATTENTION_OPS or "dot_product" in event.key else "rest")
        parts[kind] += event.self_cpu_time_total / 1e3 / steps  # ms per step
    matrix_weights = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and n != "wpe.weight")
    gflops = 6 * matrix_weights * 16 * context / (parts["matmuls"] / 1e3) / 1e9
    return ms, parts, gflops


def csv_path(text):
    """--csv: checked before the minutes of measuring, not after."""
    path = Path(text)
    if path.is_dir() or not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: " + ("is a folder" if path.is_dir() else
                                                        f"no folder {path.parent} to write it in"))
    return path


def make_parser():
    parser = argparse.ArgumentParser(prog="speed.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nanogpt", help="a clone of github.com/karpathy/nanoGPT (left out: ours only)")
    parser.add_argument("--cifar-data", help="an extracted CIFAR-100 python folder: also time train_cifar.py")
    parser.add_argument("--data", default="../shared/data/openwebtext-sample/data", help="the text for the GPT")
    parser.add_argument("--sizes", default=",".join(GPT_SIZES), help="comma list of " + ", ".join(GPT_SIZES))
    parser.add_argument("--reps", type=int, default=3, help="rounds of interleaved runs (3)")
    parser.add_argument("--csv", type=csv_path,
                        help="write every measurement to this file, replacing it (the page's: results/speed-cpu.csv)")
    parser.add_argument("--attention", action="store_true", help="also time attention alone: flash attention in float32 and bfloat16, and written out in bfloat16")
    parser.add_argument("--profile", action="store_true",
                        help="also: matmul GFLOP/s, and where a 6x384 bfloat16 step's time goes")
    return parser


def main(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)
    sizes = [size for size in args.sizes.split(",") if size]  # --sizes "": no GPT
    for problem, ok in ((f"--sizes takes {', '.join(GPT_SIZES)}", set(sizes) <= set(GPT_SIZES)),
                        (f"--nanogpt {args.nanogpt} has no train.py", not args.nanogpt
                         or (Path(args.nanogpt) / "train.py").is_file()),
                        ("--reps must be at least 1", args.reps >= 1)):
        if not ok:
            parser.error(problem)
    cpu = cpu_identity()
    print("CPU:", cpu)
    if args.attention:
        print(f"{'heads x context x head size':<28}{'flash float32 ms':>17}{'flash bfloat16':>15}"
              f"{'matmuls bfloat16':>17}")
        for shape in ((4, 128, 32), (2, 128, 64), (6, 256, 64), (12, 256, 32), (6, 512, 64), (12, 1024, 64)):
            reps = 3 if shape[1] > 256 else 10
            ms = [attention_ms(*shape, torch.float32, reps=reps), attention_ms(*shape, torch.bfloat16, reps=reps),
                  attention_ms(*shape, torch.bfloat16, written_out=True, reps=reps)]
            print(f"{' x '.join(map(str, shape)):<28}{ms[0]:>17.1f}{ms[1]:>15.1f}{ms[2]:>17.1f}")
    if args.profile:
        for n in (512, 1024, 2048):
            rates = [matmul_gflops(n, dtype) for dtype in (torch.float32, torch.bfloat16)]
            print(f"{n} x {n} matmul: float32 {rates[0]:.0f}, bfloat16 {rates[1]:.0f} GFLOP/s "
                  f"({rates[1] / rates[0]:.2f}x)")
        ms, parts, gflops = step_profile()
        print(f"6x384 bfloat16 step: {ms['eager']:.0f} ms eager ({16 * 256 / ms['eager'] * 1e3:,.0f} tokens/s), "
              f"{ms['compiled']:.0f} ms compiled ({16 * 256 / ms['compiled'] * 1e3:,.0f} tokens/s)")
        print("profiled, ms per step: " + ", ".join(f"{k} {v:.0f}" for k, v in parts.items())
              + f" (profiler overhead included); matmuls at {gflops:.0f} GFLOP/s")
    if args.nanogpt:
        give_nanogpt_our_tokens(args.nanogpt, args.data)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for size in sizes:
                for kind in ["ours bf16", "ours fp32"] + (["nanoGPT fp32"] if args.nanogpt else []):
                    out = Path(tmp) / f"{len(rows)}"
                    speed = (gpt_nanogpt(size, args.nanogpt, out) if kind.startswith("nanoGPT") else
                             gpt_ours(size, kind.endswith("bf16"), args.data, out))
                    rows.append(dict(script="train_gpt.py", size=size, kind=kind, rep=rep, per_s=round(speed), cpu=cpu))
                    print(f"{size} {kind}: {speed:,.0f} tokens/s", flush=True)
            for net in CIFAR_NETS if args.cifar_data else []:
                for kind in ("ours bf16", "ours fp32"):
                    speed = cifar_ours(net, kind.endswith("bf16"), args.cifar_data, Path(tmp) / f"{len(rows)}")
                    rows.append(dict(script="train_cifar.py", size=net, kind=kind, rep=rep, per_s=round(speed, 1),
                                     cpu=cpu))
                    print(f"{net} {kind}: {speed:,.1f} images/s", flush=True)
    if not rows:
        return
    if args.csv:
        summarize.write_csv(rows, args.csv)
    print(f"\n{'script':<15}{'size':<10}{'kind':<14}{'median /s':>11}{'x float32':>11}{'x nanoGPT':>11}")
    median = {}
    for row in rows:
        median.setdefault((row["script"], row["size"], row["kind"]), []).append(row["per_s"])
    for (script, size, kind), values in median.items():
        m = statistics.median(values)
        fp32 = statistics.median(median[(script, size, "ours fp32")])
        nano = median.get((script, size, "nanoGPT fp32"))
        versus_nano = f"{m / statistics.median(nano):.2f}" if nano else "-"
        print(f"{script:<15}{size:<10}{kind:<14}{m:>11,.0f}{m / fp32:>11.2f}{versus_nano:>11}")
    if args.csv:
        print(f"\nwrote {args.csv}")


if __name__ == "__main__":
    main()
