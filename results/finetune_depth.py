"""
results/finetune_depth.py: fine-tuning against pre-training depth, from the sweep folders.

    python results/finetune_depth.py 300:out/ft-sweep 1000:out/ft-depth-1000 3000:out/ft-depth-3000
    python results/finetune_depth.py          # redraw from the committed finetune-depth.csv

Each argument is DEPTH:FOLDER, a fine-tuning sweep (train_gpt.py --init-from a model
pre-trained for DEPTH steps, with --also-eval). Writes results/finetune-depth.csv (one row
per depth, optimizer, lr and seed) and results/finetune-depth.png, and prints per depth and
method: the new-task loss and forgetting at the method's best lr (mean and std over seeds),
and the comparison at matched forgetting: the lowest new-task loss each method reaches
along its lr sweep (seed 0) while forgetting no more than AdamW does at AdamW's best lr,
then the same at the forgetting of each lr of AdamW's sweep, minus AdamW's own there.
"""

import argparse
import csv
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


def read_folder(depth, folder):
    """The CSV's rows for one fine-tuning sweep folder."""
    runs, _ = summarize.read_runs(folder)
    return [dict(pretrain_steps=depth, optimizer=r["optimizer"], lr=r["lr"], seed=r["seed"],
                 new_task_loss=r["summary"]["final_val"], forgetting=r["summary"]["forgetting"]) for r in runs]


def read_table(path):
    """The rows of a finetune-depth.csv written earlier, with their types back."""
    types = dict(pretrain_steps=int, optimizer=str, lr=float, seed=int, new_task_loss=float, forgetting=float)
    return [{k: types[k](v) for k, v in row.items()} for row in csv.DictReader(path.read_text().splitlines())]


def depth_table(rows):
    """Per method, for the rows of one depth: its best lr, its losses and forgetting there
    (one per seed), its seed-0 lr sweep, and its gaps to AdamW at matched forgetting (see
    above): "along" at each lr of AdamW's sweep, "matched" at AdamW's best lr."""
    sweep = summarize.summarize_sweep(rows, "new_task_loss")
    best = {row["optimizer"]: row["lr"] for row in sweep if row["best"]}
    out = {}
    for name, lr_best in best.items():
        at_best = [r for r in rows if r["optimizer"] == name and r["lr"] == lr_best]
        sweep = {r["lr"]: (r["forgetting"], r["new_task_loss"]) for r in sorted(rows, key=lambda r: r["lr"])
                 if r["optimizer"] == name and r["seed"] == 0}
        out[name] = dict(lr=lr_best, sweep=sweep, loss=[r["new_task_loss"] for r in at_best],
                         forgetting=[r["forgetting"] for r in at_best])
    adamw_points = list(out["adamw"]["sweep"].values())
    for stats in out.values():  # at the forgetting of each lr of AdamW's sweep, minus AdamW's own there
        points, stats["along"] = list(stats["sweep"].values()), []
        for forgetting, _ in adamw_points:
            loss = within_forgetting(points, forgetting)
            stats["along"].append(None if loss is None else loss - within_forgetting(adamw_points, forgetting))
        stats["matched"] = stats["along"][list(out["adamw"]["sweep"]).index(out["adamw"]["lr"])]
    return out, out["adamw"]["sweep"][out["adamw"]["lr"]][0]  # and AdamW's forgetting at its best lr


def mean_std(values):
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def depth_and_folder(text):
    depth, _, folder = text.partition(":")
    if not depth.isdigit() or not folder:
        raise argparse.ArgumentTypeError(f"{text!r} is not DEPTH:FOLDER, e.g. 1000:out/ft-depth-1000")
    return int(depth), folder


def make_parser():
    p = argparse.ArgumentParser(prog="finetune_depth.py", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="*", type=depth_and_folder,
                   help="DEPTH:FOLDER, one per pre-training depth (none: redraw from the CSV)")
    return p


def main(argv=None):
    runs = make_parser().parse_args(argv).runs
    if runs:
        all_rows = [row for depth, folder in runs for row in read_folder(depth, folder)]
        summarize.write_csv(all_rows, HERE / "finetune-depth.csv")
    else:
        all_rows = read_table(HERE / "finetune-depth.csv")
    tables = {d: depth_table([r for r in all_rows if r["pretrain_steps"] == d])
              for d in sorted({r["pretrain_steps"] for r in all_rows})}
    for depth, (out, target) in tables.items():
        adamw = statistics.mean(out["adamw"]["loss"])
        print(f"\npre-trained {depth} steps (AdamW's seed 0 forgets {target:+.3f} at its best lr)")
        print(f"{'optimizer':<11}{'best lr':>9}{'new task':>17}{'forgetting':>17}{'gap':>8}{'gap, forgetting <= AdamW':>27}")
        for name, s in out.items():
            (loss, loss_sd), (forgot, forgot_sd) = mean_std(s["loss"]), mean_std(s["forgetting"])
            matched = "-" if s["matched"] is None else f"{s['matched']:+.3f}"
            print(f"{name:<11}{s['lr']:>9g}{loss:>10.3f} ± {loss_sd:.3f}{forgot:>+10.3f} ± {forgot_sd:.3f}"
                  f"{loss - adamw:>+8.3f}{matched:>27}")
        lrs = list(out["adamw"]["sweep"])
        print(f"gap at the forgetting of AdamW's lr (seed 0; * its best):\n{'':<11}"
              + "".join(f"{f'{lr:g}' + ('*' if lr == out['adamw']['lr'] else ''):>9}" for lr in lrs))
        for name, s in out.items():
            if name != "adamw":
                print(f"{name:<11}" + "".join(f"{'-' if g is None else f'{g:+.3f}':>9}" for g in s["along"]))
    plt = summarize.pyplot()
    if plt is None:
        return print("(matplotlib is not installed: no figure)")
    depths = sorted(tables)
    names = list(tables[depths[0]][0])
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.2))
    for name in names:
        stats = [tables[d][0][name] for d in depths]
        base = [statistics.mean(tables[d][0]["adamw"]["loss"]) for d in depths]
        forgot = [mean_std(s["forgetting"]) for s in stats]
        line = middle.errorbar(depths, [m for m, _ in forgot], yerr=[sd for _, sd in forgot], marker="o",
                               capsize=3, label=name, color="black" if name == "adamw" else None)
        if name == "adamw":
            continue
        gaps = [mean_std(s["loss"]) for s in stats]
        left.errorbar(depths, [g - b for (g, _), b in zip(gaps, base)], yerr=[sd for _, sd in gaps],
                      marker="o", capsize=3, label=name, color=line[0].get_color())
        for shift, style in ((0, "-"), (-1, "--")):  # AdamW's best lr, and half of it
            at = [list(tables[d][0]["adamw"]["sweep"]).index(tables[d][0]["adamw"]["lr"]) + shift for d in depths]
            right.plot(depths, [math.nan if s["along"][i] is None else s["along"][i] for s, i in zip(stats, at)],
                       marker="o", ls=style, color=line[0].get_color())
    for ax, title in ((left, "new-task loss minus AdamW's at each best lr"),
                      (middle, "forgetting at each best lr"),
                      (right, "the same, forgetting <= AdamW's at: its best lr (-), lr/2 (--)")):
        ax.set(xscale="log", xlabel="AdamW pre-training steps", title=title)
        ax.grid(alpha=0.3)
    for ax in (left, right):  # linear near 0 (the deeper pre-trainings), compressed beyond 0.02
        ax.axhline(0, color="black", lw=1)
        ax.set_yscale("symlog", linthresh=0.02)
        ax.set_ylabel("below 0: better than AdamW")
    middle.legend(fontsize=8)
    summarize.save(plt, fig, HERE / "finetune-depth.png")
    print(f"\nwrote {HERE / 'finetune-depth.csv'} and {HERE / 'finetune-depth.png'}")


if __name__ == "__main__":
    main()
