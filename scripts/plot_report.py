"""The lab report's figures and results table from finished runs.

    python scripts/plot_report.py runs/report/* --out runs/report/report

Reads each RUN_DIR's metrics.jsonl and args.json (written by Trainer.py), test/results.json
(Tester.py) and run.json (scripts/run_experiments.py: which comparison a run belongs to; without
it, runs are grouped by their settings). Folders without metrics.jsonl are skipped. Writes:
  tf.png               teacher-forcing ratio and train loss per epoch, one panel per TF setting
  kl.png               beta and train loss per epoch, one panel per KL strategy
  kl_compare.png       train loss, reconstruction error and val PSNR of the KL strategies, shared axes
  prior_compare.png    the same for fixed vs learned prior
  psnr_per_frame.png   validation PSNR per frame of each run, at its best epoch
  results.md           best val PSNR and test metrics of each run (a test of a checkpoint the run has
                       since replaced is marked stale)
"""
import json
import math
import os
import re
import sys

if __name__ == "__main__":  # run as a file, Python puts scripts/ on the path; modules/ is at the root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from modules.environment import require
    require("scripts/plot_report.py", ("numpy", "matplotlib"))

import numpy as np  # noqa: E402


def load_run(path):
    """A run folder -> dict(name, args, rows, test, groups), or None without metrics.jsonl."""
    metrics = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(metrics):
        return None
    rows = []
    with open(metrics) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:  # a row cut short: the run was killed, or is writing it right now
                continue
            if isinstance(row, dict) and "epoch" in row:
                rows.append(row)
    if not rows:
        return None

    def read(*parts):  # {} for a file that is missing, cut short or not a JSON object
        try:
            with open(os.path.join(path, *parts)) as f:
                found = json.load(f)
        except (OSError, ValueError):
            return {}
        return found if isinstance(found, dict) else {}

    record = read("run.json")
    # Should an epoch be logged twice (a run resumed by hand from an older checkpoint), keep the last.
    by_epoch = {r["epoch"]: r for r in rows}
    return {"name": record.get("name") or os.path.basename(os.path.normpath(path)), "path": path,
            "args": read("args.json"), "rows": [by_epoch[e] for e in sorted(by_epoch)],
            "test": read("test", "results.json"), "groups": record.get("groups"), "index": record.get("index")}


def tf_label(args):
    if args.get("tfr", 1.0) == 0:
        return "tfr 0"
    if not all(k in args for k in ("tfr", "tfr_sde", "tfr_d_step")):
        return "?"  # no (readable) args.json
    mode = args.get("tf_mode", "epoch")  # the lab's one coin per epoch, unless said otherwise
    return (f"tfr {args.get('tfr'):g}, sde {args.get('tfr_sde')}, step {args.get('tfr_d_step'):g}"
            + ("" if mode == "epoch" else f", per {mode}"))


def kl_label(args):
    kind = args.get("kl_anneal_type", "?")
    return f"{kind} ({args.get('kl_anneal_cycle')} cycles)" if kind == "Cyclical" else kind


def known(args, key, default):
    """args[key]; the default for an args.json written before the flag existed; "?" without one."""
    return args.get(key, default) if args else "?"


LABELS = {"kl": kl_label, "tf": tf_label, "prior": lambda a: known(a, "prior", "fixed")}


def group(runs, key):
    """The runs of one comparison, labelled: those run.json puts in `key`; for runs without a
    run.json, the first run of each distinct setting."""
    out, seen = [], set()
    for r in runs:
        label = LABELS[key](r["args"])
        if r["groups"] is not None:
            if key in r["groups"]:
                out.append((label, r))
        elif label not in seen:
            seen.add(label)
            out.append((label, r))
    return out


def series(run, key):
    xs = [r["epoch"] for r in run["rows"] if key in r]
    return xs, [r[key] for r in run["rows"] if key in r]


def recon_key(run):
    return "l1" if "l1" in run["rows"][0] else "mse"


def figure(nrows=1, ncols=1, figsize=None, **kw):
    """A matplotlib Figure and its axes, made without pyplot: the process's backend is left as it is."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kw)


def log_y(ax):
    """Log y axis (call after plotting) in plain numbers, also labelled at 2x and 5x powers of
    ten when the data span less than two decades."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
    ax.yaxis.set_minor_formatter(plain if hi / lo < 100 else NullFormatter())


def save(fig, path):
    from matplotlib.ticker import MaxNLocator
    for ax in fig.axes:
        if ax.get_xlabel() == "epoch":
            epochs = sorted({x for line in ax.get_lines() for x in line.get_xdata()})
            # MaxNLocator gives up on integers with fewer than two of them (a 1-epoch run: 0.95, 0.96, ...).
            if len(epochs) < 2:
                ax.set_xticks(epochs)
            else:
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path


def coin_off_epochs(run):
    """The epochs whose coin turned teacher forcing off though the ratio was above 0: the lab flips
    one coin per epoch. Per step or per frame the ratio is a share of the steps or frames, and no
    epoch coin decides anything: none."""
    if run["args"].get("tf_mode", "epoch") != "epoch":
        return []
    return [r["epoch"] for r in run["rows"] if r.get("tf_epoch_coin") is False and r.get("tfr", 0) > 0]


def schedule_panels(items, key, ylabel, title, path):
    """One panel per run: a schedule (tfr or beta) on the left axis, the train loss on the right."""
    n = len(items)
    cols = 2 if n == 4 else min(n, 3)
    fig, axes = figure(math.ceil(n / cols), cols, figsize=(3.6 * cols, 2.8 * math.ceil(n / cols)),
                             squeeze=False)
    for ax, (label, run) in zip(axes.flat, items):
        xs, ys = series(run, key)
        ax.step(xs, ys, where="mid", color="C0", lw=1.8, marker=".")
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel, color="C0")
        if key == "tfr":
            off = coin_off_epochs(run)
            ax.plot(off, [0.0] * len(off), "x", color="C3", ms=4, label="coin: no TF")
            if off:
                ax.legend(loc="center left", fontsize=7)
        twin = ax.twinx()
        lx, ly = series(run, "loss")
        twin.plot(lx, ly, color="C1", lw=1.2)
        if ly and min(ly) > 0:
            log_y(twin)
        twin.set_ylabel("train loss", color="C1")
        ax.set_title(f"{label}  ({run['name']})", fontsize=9)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    return save(fig, path)


def compare(items, title, path):
    """Train loss, reconstruction error and val PSNR per epoch of several runs on shared axes."""
    fig, axes = figure(1, 3, figsize=(12, 3.4), sharex=True)
    for i, (label, run) in enumerate(items):
        for ax, key in zip(axes, ("loss", recon_key(run), "val_psnr")):
            xs, ys = series(run, key)
            ax.plot(xs, ys, color=f"C{i}", lw=1.4, marker="." if len(xs) < 30 else None, label=label)
    for ax, name in zip(axes, ("train loss (recon + beta KL)", f"train {recon_key(items[0][1])}", "val PSNR (dB)")):
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    for ax, key in zip(axes[:2], ("loss", None)):
        values = [v for _, r in items for v in series(r, key or recon_key(r))[1]]
        if values and all(v > 0 for v in values):  # (a log axis of no data is an error)
            log_y(ax)
    axes[2].legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    return save(fig, path)


def best_row(run):
    """The metrics row of the best validation (what best.ckpt holds)."""
    vals = [r for r in run["rows"] if isinstance(r.get("val_psnr"), (int, float)) and math.isfinite(r["val_psnr"])]
    return max(vals, key=lambda r: r["val_psnr"]) if vals else None


def stale_test(run):
    """(epoch tested, epoch now) when test/results.json was made from a checkpoint that the run has
    since replaced (it trained on, and best.ckpt or last.ckpt moved), else None."""
    tested = run["test"].get("checkpoint_epoch")
    targs = run["test"].get("args")
    name = os.path.basename(str(targs.get("ckpt_path", ""))) if isinstance(targs, dict) else ""
    if not isinstance(tested, int):  # a test of a lab code's checkpoint, or by an older Tester
        return None
    if name == "best.ckpt":
        best = best_row(run)
        now = best["epoch"] if best else None
    elif name == "last.ckpt":
        now = run["rows"][-1]["epoch"]
    else:
        m = re.fullmatch(r"epoch_(\d+)\.ckpt", name)
        now = int(m.group(1)) if m else None
    return (tested, now) if now is not None and now != tested else None


def psnr_per_frame(runs, path):
    fig, ax = figure(figsize=(8, 3.8))
    drawn = 0
    for i, run in enumerate(runs):
        row = best_row(run)
        if row is None or "val_psnr_per_frame" not in row:
            continue
        curve = row["val_psnr_per_frame"]
        ax.plot(np.arange(1, len(curve) + 1), curve, color=f"C{i % 10}", lw=1.1,
                label=f"{run['name']} (epoch {row['epoch']}, avg {np.mean(curve):.2f} dB)")
        drawn += 1
    ax.set_xlabel("frame")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title("Validation PSNR per frame (each run at its best epoch)")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=7)
    return save(fig, path)


def fmt(v, spec=".2f"):
    return format(v, spec) if isinstance(v, (int, float)) and math.isfinite(v) else "-"


def results_table(runs):
    """A markdown table: one row per run."""
    oracle = any(r["test"].get("args", {}).get("num_samples", 1) > 1 for r in runs)
    head = ["run", "KL", "teacher forcing", "prior", "recon", "epochs", "best val PSNR (epoch)",
            "test PSNR", "test SSIM"] + (["best-of-K PSNR (oracle)"] if oracle else []) + ["copy-first PSNR"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        a, t, best, stale = run["args"], run["test"], best_row(run), stale_test(run)
        k = t.get("args", {}).get("num_samples", 1)
        cells = [run["name"], LABELS["kl"](a), tf_label(a), LABELS["prior"](a), known(a, "recon", "mse"),
                 str(run["rows"][-1]["epoch"]),
                 f"{fmt(best['val_psnr'])} ({best['epoch']})" if best else "-",
                 fmt(t.get("psnr")) + (f" (stale: epoch {stale[0]})" if stale else ""),
                 fmt(t.get("ssim"), ".4f")]
        if oracle:
            cells.append(f"{fmt(t.get('best_of_k_psnr'))} (K={k})" if k > 1 else "-")
        cells.append(fmt(t.get("copy_first_psnr")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def make_report(run_dirs, out):
    """Write the figures and results.md for the runs in run_dirs to `out`; returns the paths."""
    runs = [r for r in (load_run(d) for d in run_dirs if os.path.isdir(d)) if r is not None]
    # Runs of one grid in the grid's order (the order the runner ran them), others as given.
    runs.sort(key=lambda r: (r["index"] is None, r["index"] or 0))
    if not runs:
        raise SystemExit("error: none of the folders holds a metrics.jsonl (give run folders written by Trainer.py)")
    os.makedirs(out, exist_ok=True)
    written = []
    tf, kl, prior = group(runs, "tf"), group(runs, "kl"), group(runs, "prior")
    if tf:
        written.append(schedule_panels(tf, "tfr", "teacher-forcing ratio", "Teacher forcing: ratio and train loss",
                                       os.path.join(out, "tf.png")))
    if kl:
        written.append(schedule_panels(kl, "beta", "KL weight beta", "KL annealing: beta and train loss",
                                       os.path.join(out, "kl.png")))
        written.append(compare(kl, "KL strategies", os.path.join(out, "kl_compare.png")))
    if prior:
        written.append(compare(prior, "Fixed vs learned prior", os.path.join(out, "prior_compare.png")))
    written.append(psnr_per_frame(runs, os.path.join(out, "psnr_per_frame.png")))
    for run in runs:
        stale = stale_test(run)
        if stale:
            (tested, now), ckpt = stale, os.path.basename(run["test"]["args"]["ckpt_path"])
            print(f"note: {run['name']}: test/results.json is of the epoch-{tested} {ckpt}; the run's {ckpt} is now "
                  f"epoch {now}: test it again (python Tester.py --ckpt_path {os.path.join(run['path'], ckpt)})",
                  file=sys.stderr)
    table = os.path.join(out, "results.md")
    with open(table, "w") as f:
        f.write(results_table(runs))
    written.append(table)
    return written


def get_parser():
    from modules.options import Parser  # imported when used: the module loads without the repo on sys.path
    p = Parser(description="Write the lab report's figures and results table from run folders.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="save_root folders of Trainer.py runs")
    p.add_argument("--out", default="report", help="folder for the PNGs and results.md")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    try:
        written = make_report(args.run_dirs, args.out)
    except OSError as e:
        print(f"error: cannot write the report to --out {args.out}: {e.strerror or e}; choose another folder",
              file=sys.stderr)
        return 2
    for path in written:
        print(path)
    with open(os.path.join(args.out, "results.md")) as f:
        print(f.read(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
