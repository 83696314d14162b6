"""
results/benchmark.py: every optimizer's step time and state on a GPT-2-small-shaped
parameter set, side by side with torch.optim in one process (results/README.md, "Speed
and memory", has the numbers and what they show).

    python results/benchmark.py --blocks 2          # 1 min on a 2-core CPU
    python results/benchmark.py --device cuda --compile
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # reg.py
import reg  # noqa: E402
from reg import Muon, build_optimizer, default_ns_dtype, param_groups  # noqa: E402
from training.runs import check_device  # noqa: E402


def gpt2_small_params(blocks=12, width=768, vocab=50257, context=1024, device="cpu",
                      dtype=torch.float32):
    """A GPT-2-small-shaped parameter set with random gradients: per block qkv (2304, 768),
    attention proj (768, 768), MLP (3072, 768) and (768, 3072), two LayerNorms; the token
    embedding tied to the head, the position embedding and the final LayerNorm."""
    def block(w):
        return nn.ModuleDict(dict(ln_1=nn.LayerNorm(w), ln_2=nn.LayerNorm(w), qkv=nn.Linear(w, 3 * w, bias=False),
                                  proj=nn.Linear(w, w, bias=False), fc=nn.Linear(w, 4 * w, bias=False),
                                  mlp_proj=nn.Linear(4 * w, w, bias=False)))
    model = nn.ModuleDict(dict(wte=nn.Embedding(vocab, width), wpe=nn.Embedding(context, width),
                               blocks=nn.ModuleList(block(width) for _ in range(blocks)),
                               ln_f=nn.LayerNorm(width), lm_head=nn.Linear(width, vocab, bias=False)))
    model.lm_head.weight = model.wte.weight  # registered last: param_groups' head
    model.to(device=device, dtype=dtype)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    return model


def time_steps(optimizer, device, steps, warmup, label):
    """Median seconds per optimizer.step() after `warmup` untimed steps (progress shown),
    and the optimizer's state in MB."""
    times = []
    for _ in tqdm(range(warmup + steps), desc=label, leave=False):
        t0 = time.perf_counter()
        optimizer.step()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)  # the device being timed, which need not be the current one
        times.append(time.perf_counter() - t0)
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values()
                for t in s.values() if torch.is_tensor(t)) / 2**20
    return sorted(times[warmup:])[steps // 2], state


def benchmark(device="cpu", dtype=torch.float32, blocks=12, steps=5, warmup=2,
              compile_math=False, torch_muon_blocks=None, width=768, vocab=50257):
    """Seconds per step and state size of every optimizer on a GPT-2-small-shaped
    parameter set, as ratios to torch.optim.AdamW in its fastest form here (foreach or
    fused); then Muon against torch.optim.Muon on the hidden matrices alone (it takes
    nothing else), whose Newton-Schulz always runs in bfloat16."""
    if compile_math:
        reg.use_compiled_math()
    model = gpt2_small_params(blocks, width, vocab, device=device, dtype=dtype)
    n_matrix = sum(p.numel() for g in param_groups(model) if not g["use_adamw"] for p in g["params"])
    print(f"device {device}, {str(dtype)[6:]} parameters, {blocks} blocks: "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params "
          f"({n_matrix / 1e6:.1f}M in hidden matrices), NS in {str(default_ns_dtype(device))[6:]}, "
          f"compile={compile_math}, median of {steps} steps after {warmup}", flush=True)
    rows = []
    for form in ("foreach", "fused"):
        try:
            rows.append((f"torch AdamW ({form})", *time_steps(build_optimizer("adamw", model, **{form: True}),
                                                              device, steps, warmup, f"torch AdamW ({form})")))
        except (RuntimeError, ValueError):  # fused is not built for every device and dtype
            pass
    rows = [min(rows, key=lambda row: row[1])]
    for name, options in (("reg", {}), ("rmnp", {}), ("muon", {}), ("muon (Polar Express)", {"ns_coefficients": "polar_express"}),
                          ("muoneq-r", {}), ("muoneq-rc", {}), ("normuon", {})):
        optimizer = build_optimizer(name.split()[0], model, **options)
        rows.append((name, *time_steps(optimizer, device, steps, warmup, name)))
    print(f"{'optimizer':<22}{'ms/step':>10}{'x AdamW':>9}{'state MB':>10}{'x AdamW':>9}")
    for label, t, mb in rows:
        print(f"{label:<22}{t * 1e3:>10.1f}{t / rows[0][1]:>9.2f}{mb:>10.1f}{mb / rows[0][2]:>9.2f}")
    sub = gpt2_small_params(torch_muon_blocks or blocks, width, vocab, device=device, dtype=dtype)
    matrices = [p for g in param_groups(sub) if not g["use_adamw"] for p in g["params"]]
    t_ref, _ = time_steps(torch.optim.Muon(matrices, adjust_lr_fn="match_rms_adamw"), device,
                          steps, warmup, "torch.optim.Muon")
    print(f"hidden matrices of {torch_muon_blocks or blocks} block(s): torch.optim.Muon "
          f"{t_ref * 1e3:.1f} ms/step")
    for ns_dtype in dict.fromkeys([default_ns_dtype(device), torch.bfloat16]):
        label = f"reg.Muon, NS in {str(ns_dtype)[6:]}"
        t, _ = time_steps(Muon([dict(params=matrices)], ns_dtype=ns_dtype), device, steps, warmup, label)
        print(f"  {label}: {t * 1e3:.1f} ms/step = {t / t_ref:.3f} x torch.optim.Muon")


def make_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter dtype")
    add("--blocks", type=int, default=12, help="transformer blocks (GPT-2 small: 12)")
    add("--steps", type=int, default=5, help="timed steps (median reported)")
    add("--warmup", type=int, default=2, help="untimed steps first")
    add("--compile", action="store_true", help="torch.compile the math (use_compiled_math)")
    add("--torch-muon-blocks", type=int, help="blocks for the torch.optim.Muon comparison (default: --blocks)")
    add("--width", type=int, default=768, help="model width (GPT-2 small: 768)")
    add("--vocab", type=int, default=50257, help="vocabulary (GPT-2: 50257)")
    return parser


if __name__ == "__main__":
    parser = make_parser()
    args = parser.parse_args()
    if min(args.blocks, args.steps, args.width, args.vocab, args.torch_muon_blocks or 1) < 1 or args.warmup < 0:
        parser.error("--blocks, --steps, --width, --vocab and --torch-muon-blocks must be >= 1, --warmup >= 0")
    try:
        check_device(args.device)
    except ValueError as e:
        parser.error(str(e))
    torch.manual_seed(0)
    benchmark(args.device, getattr(torch, args.dtype), args.blocks, args.steps, args.warmup,
              args.compile, args.torch_muon_blocks, args.width, args.vocab)
