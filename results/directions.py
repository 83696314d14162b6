"""
results/directions.py: what each method's direction does to one real momentum matrix.

    python results/directions.py out/gpt-sweep/muon-lr0.016-s0 --weight blocks.1.mlp.0.weight

Reads one weight's momentum from a train_gpt.py checkpoint (a matrix method's
momentum_buffer, or AdamW's exp_avg), applies the directions of Muon, MuonEq-R, NorMuon
(its first step), REG (one RACS step, and three) and RMNP to it, and prints and plots, for
the momentum and each direction, the singular values and the row norms. Every matrix is
first scaled to the Frobenius norm of a semi-orthogonal matrix of its shape, sqrt(min(m,
n)), so that only the *shape* of the spectrum and of the rows differs. Writes results/directions.png (or --out).

reg.inspect_matrix, the same look during training, is what train_gpt.py --track logs.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # reg.py and train_gpt.py
import reg  # noqa: E402
import train_gpt  # noqa: E402


def momentum_of(checkpoint, weight):
    """The named weight's momentum in a train_gpt.py checkpoint, as an (m, n) float32 matrix."""
    model = train_gpt.GPT(train_gpt.GPTConfig(**checkpoint["model_config"]))
    names = [name for g in reg.param_groups(model) for name in g["param_names"]]
    if weight not in names:
        matrices = [n for g in reg.param_groups(model) if not g["use_adamw"] for n in g["param_names"]]
        raise SystemExit(f"error: --weight {weight}: not in this model; try one of {', '.join(matrices[:4])}, ...")
    state = checkpoint["optimizer"]["state"].get(names.index(weight), {})
    momentum = state.get("momentum_buffer", state.get("exp_avg"))
    if momentum is None:
        raise SystemExit(f"error: the checkpoint holds no momentum for {weight}")
    return momentum.reshape(momentum.shape[0], -1).float()


def directions(M):
    """The momentum and what each method makes of it, each at the Frobenius norm of a
    semi-orthogonal matrix of its shape."""
    O = reg.newton_schulz(M)
    out = {"momentum": M, "Muon": O, "MuonEq-R": reg.newton_schulz(reg.equilibrate(M, "R")),
           "NorMuon": reg.normuon_normalize(O, torch.zeros(M.shape[0], 1))[0], "REG": reg.racs(M),
           "REG, 3 steps": reg.racs(M, steps=3), "RMNP": reg.row_normalize(M)}
    return {k: v * min(M.shape) ** 0.5 / v.norm() for k, v in out.items()}


def make_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("run", help="a train_gpt.py run folder or its ckpt.pt")
    p.add_argument("--weight", default="blocks.1.mlp.0.weight", help="a hidden weight matrix of the model")
    p.add_argument("--out", default=str(Path(__file__).parent / "directions.png"), help="the figure")
    return p


def main(argv=None):
    args = make_parser().parse_args(argv)
    path = Path(args.run) / "ckpt.pt" if Path(args.run).is_dir() else Path(args.run)
    if not path.is_file():
        raise SystemExit(f"error: {args.run}: no checkpoint there")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    mats = directions(momentum_of(checkpoint, args.weight))
    print(f"{args.weight} of {path} (step {checkpoint.get('step')}, trained with "
          f"{checkpoint.get('optimizer_name')}), {tuple(mats['momentum'].shape)}")
    print(f"{'':<13}{'cond':>12}{'stable rank':>13}{'row spread':>12}")
    for name, X in mats.items():
        s = reg.matrix_stats(X)
        print(f"{name:<13}{s['cond'] or float('inf'):>12.3g}{s['stable_rank']:>13.1f}{s['row_spread'] or float('inf'):>12.3g}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return print("(matplotlib is not installed: no figure; pip install matplotlib)")
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"momentum": dict(color="black", lw=2.5), "Muon": dict(ls="-"), "MuonEq-R": dict(ls="--"),
              "NorMuon": dict(ls=":", lw=2), "REG": dict(ls="-."),
              "REG, 3 steps": dict(ls="-.", lw=0.8), "RMNP": dict(ls=(0, (5, 1, 1, 1, 1, 1)))}
    for name, X in mats.items():
        style = styles[name]
        left.plot(torch.linalg.svdvals(X.double()), label=name, **style)
        right.plot(X.norm(dim=1).sort(descending=True).values, label=name, **style)
    left.set(yscale="log", xlabel="index (largest first)", title="singular values")
    right.set(yscale="log", xlabel="row (sorted, largest first)", title="row norms (one per output neuron)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    fig.suptitle(f"one momentum matrix ({args.weight}, {tuple(mats['momentum'].shape)}) and each "
                 f"method's direction, at equal Frobenius norm", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"figure: {args.out}")


if __name__ == "__main__":
    main()
