"""
results/finetune_depth.py: fine-tuning against pre-training depth, from the sweep folders.

    python results/finetune_depth.py 300:out/ft-sweep 1000:out/ft-depth-1000 3000:out/ft-depth-3000

Each argument is DEPTH:FOLDER, a fine-tuning sweep (train_gpt.py --init-from a model
pre-trained for DEPTH steps, with --also-eval). Writes results/finetune-depth.csv (one row
per depth, optimizer, lr and seed) and results/finetune-depth.png, and prints per depth and
method: the new-task loss and forgetting at the method's best lr (mean and std over seeds),
and the comparison at matched forgetting: the lowest new-task loss each method reaches
along its lr sweep (seed 0) while forgetting no more than AdamW does at AdamW's best lr.
"""

import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from results import summarize  # noqa: E402

HERE = Path(__file__).resolve().parent


def within_forgetting(points, target):
    """The lowest new-task loss a method's sweep reaches while forgetting no more than
    `target`: points are its (forgetting, loss) at each lr in lr order (seed 0), joined by
    straight lines between neighbouring lrs; None where it forgets more at every lr."""
    candidates = [loss for f, loss in points if f <= target]
    for (f0, l0), (f1, l1) in zip(points, points[1:]):
        if min(f0, f1) < target < max(f0, f1):
            candidates.append(l0 + (l1 - l0) * (target - f0) / (f1 - f0))
    return min(candidates, default=None)


def depth_table(depth, folder):
    runs, _ = summarize.read_runs(folder)
    rows = [dict(pretrain_steps=depth, optimizer=r["optimizer"], lr=r["lr"], seed=r["seed"],
                 new_task_loss=r["summary"]["final_val"], forgetting=r["summary"]["forgetting"]) for r in runs]
    sweep = summarize.summarize_sweep(rows, "new_task_loss")
    best = {row["optimizer"]: row["lr"] for row in sweep if row["best"]}
    out = {}
    for name, lr_best in best.items():
        at_best = [r for r in rows if r["optimizer"] == name and r["lr"] == lr_best]
        sweep = {r["lr"]: (r["forgetting"], r["new_task_loss"]) for r in sorted(rows, key=lambda r: r["lr"])
                 if r["optimizer"] == name and r["seed"] == 0}
        out[name] = dict(lr=lr_best, sweep=sweep, loss=[r["new_task_loss"] for r in at_best],
                         forgetting=[r["forgetting"] for r in at_best])
    target, out["adamw"]["seed0"] = out["adamw"]["sweep"][out["adamw"]["lr"]]  # AdamW's seed 0, best lr
    for stats in out.values():
        stats["matched"] = within_forgetting(list(stats["sweep"].values()), target)
    return rows, out, target


def mean_std(values):
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or not all(":" in a and a.split(":", 1)[0].isdigit() for a in argv):
        sys.exit("usage: python results/finetune_depth.py DEPTH:FOLDER [DEPTH:FOLDER ...]")
    tables, all_rows = {}, []
    for arg in argv:
        depth, folder = arg.split(":", 1)
        rows, out, target = depth_table(int(depth), folder)
        tables[int(depth)] = (out, target)
        all_rows += rows
    summarize.write_csv(all_rows, HERE / "finetune-depth.csv")
    for depth, (out, target) in tables.items():
        adamw = statistics.mean(out["adamw"]["loss"])
        print(f"\npre-trained {depth} steps (AdamW's seed 0 forgets {target:+.3f} at its best lr)")
        print(f"{'optimizer':<11}{'best lr':>9}{'new task':>17}{'forgetting':>17}{'gap':>8}{'gap, forgetting <= AdamW':>27}")
        for name, s in out.items():
            (loss, loss_sd), (forgot, forgot_sd) = mean_std(s["loss"]), mean_std(s["forgetting"])
            matched = "-" if s["matched"] is None else f"{s['matched'] - out['adamw']['seed0']:+.3f}"
            print(f"{name:<11}{s['lr']:>9g}{loss:>10.3f} ± {loss_sd:.3f}{forgot:>+10.3f} ± {forgot_sd:.3f}"
                  f"{loss - adamw:>+8.3f}{matched:>27}")
    plt = summarize.pyplot()
    if plt is None:
        return print("(matplotlib is not installed: no figure)")
    depths = sorted(tables)
    names = list(tables[depths[0]][0])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for name in names:
        if name == "adamw":
            continue
        gaps = [mean_std(tables[d][0][name]["loss"]) for d in depths]
        base = [statistics.mean(tables[d][0]["adamw"]["loss"]) for d in depths]
        line = left.errorbar(depths, [g - b for (g, _), b in zip(gaps, base)], yerr=[sd for _, sd in gaps],
                             marker="o", capsize=3, label=name)
        matched = [tables[d][0][name]["matched"] for d in depths]
        right.plot(depths, [math.nan if m is None else m - tables[d][0]["adamw"]["seed0"]
                            for d, m in zip(depths, matched)], marker="o", color=line[0].get_color(), label=name)
    for ax, title in ((left, "at each method's best lr (3 seeds)"),
                      (right, "forgetting no more than AdamW (seed-0 lr sweeps)")):
        ax.axhline(0, color="black", lw=1)
        ax.set(xscale="log", xlabel="AdamW pre-training steps", title=title)
        ax.grid(alpha=0.3)
    left.set_ylabel("new-task loss minus AdamW's (below 0: better)")
    left.legend(fontsize=8)
    summarize.save(plt, fig, HERE / "finetune-depth.png")
    print(f"\nwrote {HERE / 'finetune-depth.csv'} and {HERE / 'finetune-depth.png'}")


if __name__ == "__main__":
    main()
