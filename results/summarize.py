"""
results/summarize.py: the tables and figures of a folder of runs, rebuilt from the runs.

    python results/summarize.py out/gpt-sweep        # any --out-dir of train_gpt.py or train_cifar.py

Each run folder holds run.json (its settings and, once finished, its summary) and
log.jsonl (one line per evaluation). From them this prints a table and writes, into the
folder:
  results.csv     one row per finished run
  sweep.csv/.png  per optimizer and learning rate: mean and sample std over seeds, the best
                  lr (chosen on the seeds every lr ran) and a flag when it is at the grid's edge
  best.csv        the runs at each optimizer's best lr
  curves.png      their evaluation curves (val loss against tokens, or accuracy by epoch)
  forgetting.png  fine-tuning with --also-eval: forgetting against the new task's loss
  track.png       runs with --track: conditioning of a weight's momentum and update
The training scripts call `report` after their runs, so a folder's files always describe
every finished run in it. matplotlib is optional: without it, the tables only.
"""

import argparse
import json
import math
import os
import sys
from pathlib import Path


class SweepError(Exception):
    """A folder that cannot be summarized, with the reason in one line."""


def read_jsonl(path):
    """The entries of a log.jsonl. A last line cut short (a process killed while appending
    it) is dropped: the run resumes from its checkpoint, before that line. A bad line
    anywhere else is a SweepError."""
    lines = Path(path).read_text().splitlines()
    entries = []
    for i, line in enumerate(lines):
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise SweepError(f"{path}: line {i + 1} is not JSON") from None
    return entries


def read_runs(folder):
    """(finished, unfinished) runs in `folder`: run.json of each subfolder, with its log."""
    finished, unfinished = [], []
    for path in sorted(Path(folder).glob("*/run.json")):
        run = json.loads(path.read_text())
        run["log"] = read_jsonl(path.parent / "log.jsonl") if (path.parent / "log.jsonl").exists() else []
        (finished if run["finished"] else unfinished).append(run)
    return finished, unfinished


def settings_differences(a, b):
    """How two runs' settings differ, as readable strings: runs that differ in more than
    optimizer, lr and seed do not belong in one table."""
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def summarize_sweep(runs, metric, lower_is_better=True):
    """Learning-rate sweeps with seeds: one row per (optimizer, lr) with n (seeds), mean,
    std (sample standard deviation; 0 for one seed), best and edge (the best lr is the
    smallest or largest tried: widen the grid). runs: dicts with optimizer, lr, seed and
    `metric`. The best lr is chosen on the seeds that every lr of that optimizer ran, so
    seeds added at the winner afterwards cannot change which lr wins."""
    by_cell = {}
    for r in runs:
        by_cell.setdefault((r["optimizer"], r["lr"]), {})[r["seed"]] = r[metric]
    table = []
    for name in dict.fromkeys(r["optimizer"] for r in runs):  # first-seen order
        lrs = sorted(lr for (n, lr) in by_cell if n == name)
        shared = set.intersection(*(set(by_cell[name, lr]) for lr in lrs))
        sign = 1 if lower_is_better else -1
        best = min(lrs, key=lambda lr: sign * sum(by_cell[name, lr][s] for s in shared))
        for lr in lrs:
            values = list(by_cell[name, lr].values())
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
            table.append(dict(optimizer=name, lr=lr, n=len(values), mean=mean, std=std, best=lr == best,
                              edge=lr == best and len(lrs) > 1 and lr in (lrs[0], lrs[-1])))
    return table


def write_csv(rows, path):
    """Rows (dicts) -> CSV, one column per key any row has (in order of first appearance;
    empty where a row lacks it, as runs made before a column existed do), written
    atomically: a reader, or another process writing the same folder, sees the old file or
    the new one, never a mix."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = [",".join(columns)] + [",".join("" if row.get(c) is None else str(row[c]) for c in columns)
                                   for row in rows]
    tmp = Path(f"{path}.{os.getpid()}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


def report(folder, strict=True, quiet=False):
    """Print the folder's tables and write its CSVs and figures (see the module docstring).
    results.csv always lists every finished run; the sweep tables and figures need runs of
    one setting: otherwise SweepError (strict) or a note. SweepError too with no finished run."""
    folder = Path(folder)
    runs, unfinished = read_runs(folder)
    say = (lambda *a: None) if quiet else print
    for run in unfinished:
        say(f"{run['run']}: unfinished, left out (resume it with --resume {folder / run['run']})")
    if not runs:
        raise SweepError(f"{folder}: no finished runs there (a run folder holds run.json)")
    rows = [run["summary"] for run in runs]
    write_csv(rows, folder / "results.csv")
    say("\n" + "  ".join(f"{k:>10}" for k in rows[0]))
    for row in rows:
        say("  ".join(f"{v:>10.4g}" if isinstance(v, float) else f"{v!s:>10}" for v in row.values()))
    for run in runs[1:]:
        differences = settings_differences(runs[0]["settings"], run["settings"])
        if differences:
            problem = (f"{folder} holds runs with different settings ({runs[0]['run']} vs {run['run']}: "
                       f"{'; '.join(differences[:3])}): no sweep table, which compares like with like")
            if strict:
                raise SweepError(problem)
            return say(f"note: {problem}")
    metric, lower = runs[0]["metric"], runs[0]["lower_is_better"]
    table = summarize_sweep(rows, metric, lower)
    best = {(row["optimizer"], row["lr"]) for row in table if row["best"]}
    best_runs = [run for run in runs if (run["optimizer"], run["lr"]) in best]
    say(f"\n{'optimizer':<11}{'lr':>9}{'seeds':>6}  {metric} (mean +- std)")
    for row in table:
        flag = ("  best" + ("  (at the edge of the grid: widen it)" if row["edge"] else "")) if row["best"] else ""
        say(f"{row['optimizer']:<11}{row['lr']:>9.3g}{row['n']:>6}  {row['mean']:.4f} +- {row['std']:.4f}{flag}")
    write_csv(table, folder / "sweep.csv")
    write_csv([run["summary"] for run in best_runs], folder / "best.csv")
    plt = pyplot()
    if plt is None:
        say("(matplotlib is not installed: tables only; pip install matplotlib for the figures)")
        return table
    if len({row["lr"] for row in table}) > 1:
        plot_sweep(plt, table, metric, folder / "sweep.png")
    plot_curves(plt, best_runs, folder / "curves.png")
    if "forgetting" in rows[0]:
        plot_forgetting(plt, table, summarize_sweep(rows, "forgetting"), folder / "forgetting.png")
    if any("track" in entry for run in best_runs for entry in run["log"]):
        plot_track(plt, best_runs, folder / "track.png")
    say(f"figures and tables: {folder}")
    return table


# -----------------------------------------------------------------------------
# Figures
# -----------------------------------------------------------------------------

def pyplot():
    """matplotlib.pyplot drawing to files, or None where matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save(plt, fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)  # pyplot keeps every open figure alive until it is closed


def plot_sweep(plt, table, metric, path, reference=None):
    """The metric against lr, one line per optimizer; error bars of one std where there
    are several seeds; the best lr ringed. reference: (value, label), drawn as a dotted
    horizontal line (a baseline's result)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if reference is not None:
        ax.axhline(reference[0], color="black", ls=":", lw=1, label=reference[1])
    for name in dict.fromkeys(row["optimizer"] for row in table):
        rows = [row for row in table if row["optimizer"] == name]
        line = ax.errorbar([r["lr"] for r in rows], [r["mean"] for r in rows],
                           yerr=[r["std"] for r in rows], marker=".", capsize=3, label=name)
        best = next(r for r in rows if r["best"])
        ax.plot(best["lr"], best["mean"], "o", mfc="none", ms=10, color=line[0].get_color())
    if all(row["lr"] > 0 for row in table):
        ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel(f"{metric} (ring: best lr)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save(plt, fig, path)


def plot_curves(plt, runs, path):
    """Each run's evaluation curve (run.json names its x and y); a second evaluation set
    (--also-eval) dashed in the same colour."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    x, y = runs[0]["curve"]
    also = runs[0].get("also_curve")
    for run in runs:
        log = [e for e in run["log"] if e.get(y) is not None]
        line, = ax.plot([e[x] for e in log], [e[y] for e in log], marker="." if len(log) < 20 else None,
                        label=f"{run['optimizer']} lr={run['lr']:g} s{run['seed']}")
        if also:
            ax.plot([e[x] for e in log], [e[also] for e in log], "--", color=line.get_color())
    ax.set_xlabel(x)
    ax.set_ylabel(y + (f" (dashed: {also})" if also else ""))
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save(plt, fig, path)


def plot_forgetting(plt, table, forgetting, path):
    """Fine-tuning sweeps: forgetting against the new task's loss, one point per lr. A
    larger lr learns the new data faster and forgets more, so optimizers are compared
    along these curves (down and left is better), not at one point each."""
    forgot = {(r["optimizer"], r["lr"]): r["mean"] for r in forgetting}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(row["optimizer"] for row in table):
        rows = [row for row in table if row["optimizer"] == name]
        line, = ax.plot([r["mean"] for r in rows], [forgot[name, r["lr"]] for r in rows], marker=".", label=name)
        best = next(r for r in rows if r["best"])
        ax.plot(best["mean"], forgot[name, best["lr"]], "o", mfc="none", ms=10, color=line.get_color())
    ax.set_xlabel("final val loss on the new data (points: lrs; ring: best lr)")
    ax.set_ylabel("forgetting: rise of the --also-eval val loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save(plt, fig, path)


def plot_track(plt, runs, path):
    """Per tracked weight, the condition number and row-norm spread of each run's update
    (solid) and momentum (dotted) through training: where each method balances."""
    names = sorted({n for run in runs for e in run["log"] for n in e.get("track", {})})
    fig, axes = plt.subplots(len(names), 2, figsize=(11, 3.6 * len(names)), squeeze=False)
    for row, name in zip(axes, names):
        for run in runs:
            points = [(e["tokens"], e["track"][name]) for e in run["log"] if e.get("track", {}).get(name)]
            for ax, stat in zip(row, ("cond", "row_spread")):
                line, = ax.plot([t for t, _ in points], [x["update"][stat] for _, x in points], label=run["optimizer"])
                ax.plot([t for t, _ in points], [x["momentum"][stat] for _, x in points], ":", color=line.get_color())
        for ax, title in zip(row, ("condition number", "row-norm spread (max/min)")):
            ax.set_yscale("log")
            ax.set_title(f"{name}: {title}", fontsize=9)
            ax.set_xlabel("tokens")
            ax.grid(alpha=0.3)
        row[1].legend(fontsize=8, title="update (solid), momentum (dotted)", title_fontsize=8)
    save(plt, fig, path)


def make_parser():
    p = argparse.ArgumentParser(prog="summarize.py", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="an --out-dir of train_gpt.py or train_cifar.py")
    return p


def main(argv=None):
    folder = make_parser().parse_args(argv).folder
    if not Path(folder).is_dir():
        sys.exit(f"error: {folder}: no such folder")
    try:
        report(folder)
    except SweepError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
