"""
results/long_runs.py: the results past the early phase, from their run folders.

    python results/long_runs.py text out/long-gpt --out results        # one epoch of text
    python results/long_runs.py images out/long-cifar10 --out results  # the CIFAR-10 runs

Reads a folder of train_gpt.py or train_cifar.py runs (summarize.read_runs), prints its
tables and, with --out (results/ for the page's files; without it nothing is written, so
a look at a folder whose sweeps are still running replaces nothing), writes there, for
PREFIX long-gpt or long-cifar10:
  PREFIX-runs.csv   every finished run     PREFIX-sweep.csv, .png  per method and lr
  PREFIX-best.csv   the runs at each method's best lr (chosen on the seeds every lr ran)
and for text also
  long-gpt-speedup.csv  per method: the step at which its eval curve (at its best lr, the
                        mean of its seeds, straight lines between evaluations) first
                        reaches AdamW's final loss (the mean of AdamW's seeds); empty
                        where it never does: "AdamW-equivalent steps"; steps_per_seed
                        does the same for each seed's own curve ("0:1218 1:1247 2:never")
  long-gpt-curves.png   those mean curves, AdamW's final loss as a line
  reg-readings.csv      REG's readings (p, racs_steps) run as reg:p=..:racs_steps=.. specs
  reg-readings.png      their final loss against lr, AdamW's final loss as a line
and for images, when the folder holds REG's readings, long-cifar10-reg-readings.csv and .png.
Methods are the --optimizer specs of the runs ("muon:ns_coefficients=polar_express" is a
method of its own); REG's readings other than its default stay out of the headline files.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from results import summarize  # noqa: E402


def reading(spec):
    """(p, racs_steps) of a "reg[:p=..][:racs_steps=..]" spec, None for any other method."""
    name, *options = spec.split(":")
    if name != "reg":
        return None
    values = dict(o.split("=", 1) for o in options)
    return values.get("p", "2"), int(values.get("racs_steps", "1"))


def mean_curve(runs, key):
    """(steps, the mean over the runs of `key` at each step every run evaluated)."""
    steps = sorted(set.intersection(*({e["step"] for e in r["log"] if e.get(key) is not None} for r in runs)))
    values = [sum(next(e[key] for e in r["log"] if e["step"] == s) for r in runs) / len(runs) for s in steps]
    return steps, values


def first_reaching(steps, values, target):
    """The step at which a curve first gets down to `target`, straight lines between its
    points; None if it never does."""
    for i, (s, v) in enumerate(zip(steps, values)):
        if v <= target:
            if i == 0:
                return float(s)
            s0, v0 = steps[i - 1], values[i - 1]
            return s0 + (s - s0) * (v0 - target) / (v0 - v)
    return None


def speedups(best_runs, baseline="adamw"):
    """Rows of long-gpt-speedup.csv (see the module docstring) and the mean curves."""
    by_method = {}
    for run in best_runs:
        by_method.setdefault(run["optimizer"], []).append(run)
    if baseline not in by_method:
        raise summarize.SweepError(f"no {baseline} runs: the speed-up is measured against {baseline}'s final loss")
    base = by_method[baseline]
    target = sum(r["summary"]["final_val"] for r in base) / len(base)
    rows, curves = [], {}
    for name, runs in by_method.items():
        steps, values = curves[name] = mean_curve(runs, "val_loss")
        reached = first_reaching(steps, values, target)
        per_seed = {r["seed"]: first_reaching(*mean_curve([r], "val_loss"), target) for r in runs}
        rows.append(dict(optimizer=name, lr=runs[0]["lr"], seeds=len(runs), final_val=values[-1],
                         adamw_final_val=target, steps=steps[-1],
                         steps_to_adamw_final=None if reached is None else round(reached, 1),
                         fraction_of_the_steps=None if reached is None else round(reached / steps[-1], 3),
                         steps_per_seed=" ".join(f"{seed}:" + ("never" if s is None else f"{s:.0f}")
                                                 for seed, s in sorted(per_seed.items()))))
    return rows, curves, target


def plot_curves(curves, target, path):
    plt = summarize.pyplot()
    if plt is None:
        return print("(matplotlib is not installed: no figure)")
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for name, (steps, values) in curves.items():
        ax.plot(steps, values, label=name, lw=2.2 if name == "adamw" else 1.4)
    ax.axhline(target, color="black", ls=":", lw=1, label="AdamW's final loss")
    low = min(min(v) for _, v in curves.values())
    ax.set_ylim(low - 0.05, target + 0.6)
    ax.set(xlabel="step", ylabel="val loss (nats per byte), mean of the seeds at the best lr")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    summarize.save(plt, fig, path)


def report(kind, folder, out=None):
    runs, unfinished = summarize.read_runs(folder)
    if not runs:
        raise summarize.SweepError(f"{folder}: no finished runs there")
    prefix = "long-gpt" if kind == "text" else "long-cifar10"
    def write(rows, name):  # only with --out: a look at a running sweep replaces nothing
        if out:
            out.mkdir(parents=True, exist_ok=True)
            summarize.write_csv(rows, out / name)

    metric, lower = runs[0]["metric"], runs[0]["lower_is_better"]
    headline = [r for r in runs if reading(r["optimizer"]) in (None, ("2", 1))]
    summaries = [r["summary"] for r in headline]
    table = summarize.summarize_sweep(summaries, metric, lower)
    best = {(row["optimizer"], row["lr"]) for row in table if row["best"]}
    best_runs = [r for r in headline if (r["optimizer"], r["lr"]) in best]
    write(summaries, f"{prefix}-runs.csv")
    write(table, f"{prefix}-sweep.csv")
    write([r["summary"] for r in best_runs], f"{prefix}-best.csv")
    plt = summarize.pyplot() if out else None
    if plt is not None:
        summarize.plot_sweep(plt, table, metric, out / f"{prefix}-sweep.png")
    print(f"{len(runs)} finished runs ({len(unfinished)} unfinished) in {folder}")
    print_sweep(table, metric)
    adamw = [r for r in best_runs if r["optimizer"] == "adamw"]
    if kind == "text":
        rows, curves, target = speedups(best_runs)
        write(rows, "long-gpt-speedup.csv")
        print(f"\nAdamW's final loss {target:.4f}; the step at which each method first reaches it:")
        print_speedups(rows)
        if out:
            plot_curves(curves, target, out / "long-gpt-curves.png")
    readings = [r for r in runs if reading(r["optimizer"])]
    if readings:
        report_readings(kind, readings, adamw, write, plt, out)


def report_readings(kind, readings, adamw, write, plt, out):
    """REG's readings as a sweep of their own, each (p, racs_steps) a method, set against
    AdamW at its best lr (adamw: those runs) like the headline's methods; on text, with
    the steps each reading's best lr takes to reach AdamW's final loss."""
    metric, lower = readings[0]["metric"], readings[0]["lower_is_better"]
    name = "reg-readings" if kind == "text" else "long-cifar10-reg-readings"
    rows = [dict(zip(("p", "racs_steps"), reading(r["optimizer"])), lr=r["lr"], seed=r["seed"],
                 **{metric: r["summary"][metric]}) for r in readings]
    write(sorted(rows, key=lambda r: (r["p"], r["racs_steps"], r["lr"], r["seed"])), f"{name}.csv")
    table = summarize.summarize_sweep([r["summary"] for r in readings], metric, lower)
    best = {(row["optimizer"], row["lr"]) for row in table if row["best"]}
    print("\nREG's readings (p, racs_steps):")
    print_sweep(table, metric)
    if kind == "text":
        rows, _, _ = speedups(adamw + [r for r in readings if (r["optimizer"], r["lr"]) in best])
        print("and the step at which each reading, at its best lr, first reaches AdamW's final loss:")
        print_speedups(rows[1:])
    if plt is not None:
        mean = sum(r["summary"][metric] for r in adamw) / len(adamw) if adamw else None
        summarize.plot_sweep(plt, table, metric, out / f"{name}.png",
                             reference=None if mean is None else (mean, "AdamW at its best lr"))


def print_sweep(table, metric):
    print(f"{'method':<36}{'lr':>9}{'seeds':>6}  {metric} (mean +- std)")
    for row in table:
        flag = ("  best" + ("  (edge: widen the grid)" if row["edge"] else "")) if row["best"] else ""
        print(f"{row['optimizer']:<36}{row['lr']:>9.3g}{row['n']:>6}  {row['mean']:.4f} +- {row['std']:.4f}{flag}")


def print_speedups(rows):
    for row in rows:
        reached, fraction = row["steps_to_adamw_final"], row["fraction_of_the_steps"]
        print(f"{row['optimizer']:<36}" + (f"{'never':>7}" if reached is None else f"{reached:>7.0f} ({fraction:.0%})")
              + f"   per seed {row['steps_per_seed']}")


def make_parser():
    p = argparse.ArgumentParser(prog="long_runs.py", description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=["text", "images"], help="a train_gpt.py (text) or train_cifar.py (images) folder")
    p.add_argument("folder", help="its --out-dir")
    p.add_argument("--out", help="where the CSVs and figures go (results for the page's); none: print only")
    return p


def main(argv=None):
    args = make_parser().parse_args(argv)
    if not Path(args.folder).is_dir():
        sys.exit(f"error: {args.folder}: no such folder")
    try:
        report(args.kind, args.folder, Path(args.out) if args.out else None)
    except summarize.SweepError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
