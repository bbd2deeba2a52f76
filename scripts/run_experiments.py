"""Run a named grid of experiments: per run, Trainer.py then Tester.py (subprocesses), each run in
its own save_root under --out. Finished runs are skipped and interrupted ones resumed, so the same
command can be run again until everything is done. A run folder made with other settings (grid
flags, flags after --, --epochs, or a finished run's --minutes) is refused rather than reused; a
run whose --minutes are spent goes on only when a larger --minutes is given.

    python scripts/run_experiments.py --grid report --out runs/report --epochs 30 -- --device cuda --batch_size 32
    python scripts/run_experiments.py --grid report --out runs/cpu --minutes 3 --test_args="--test_len 60" \\
        -- --DR data/small --F_dim 32 --L_dim 8 --N_dim 4 --D_out_dim 32 --val_vi_len 60 --device cpu
    python scripts/plot_report.py runs/report/*

Flags after `--` go to every Trainer run (after the grid's own, so they win); those the Tester also
knows (--DR, --device, --seed, --frame_H, ...) go to the Tester too. --test_args adds Tester-only
flags (--test_len, --num_samples, --z_mode). `--list` prints the grids.
"""
import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_FILE = "run.json"  # the runner's record of a run: its flags, budget and status


@dataclass
class Run:
    name: str
    flags: dict
    # Figures of scripts/plot_report.py the run belongs to: "kl" (KL strategies), "tf" (teacher
    # forcing), "prior" (fixed vs learned).
    groups: tuple = field(default=())


# The seed report compares each factor against one base setting: the lab's Cyclical schedule, the
# report's "tfr 1 / sde 5 / step 0.1" and the fixed prior. The base run is shared by all three
# comparisons, so the 4 + 3 + 2 settings make 7 runs.
BASE = {"kl_anneal_type": "Cyclical", "tfr": 1.0, "tfr_sde": 5, "tfr_d_step": 0.1, "prior": "fixed"}


def _report_grid():
    runs = [Run("base", dict(BASE), ("kl", "tf", "prior"))]
    for kl in ("Monotonic", "None", "Full_KL"):
        runs.append(Run(f"kl_{kl}", {**BASE, "kl_anneal_type": kl}, ("kl",)))
    runs.append(Run("tf_0.75_sde6_step0.2", {**BASE, "tfr": 0.75, "tfr_sde": 6, "tfr_d_step": 0.2}, ("tf",)))
    runs.append(Run("tf_0", {**BASE, "tfr": 0.0}, ("tf",)))
    runs.append(Run("prior_learned", {**BASE, "prior": "learned"}, ("prior",)))
    return runs


def _tiny_grid():
    # Two runs that differ in every factor the plotter groups by, for tests.
    return [Run("fixed", dict(BASE, tfr=0.5, tfr_sde=1, tfr_d_step=0.5), ("kl", "tf", "prior")),
            Run("learned", {**BASE, "kl_anneal_type": "Full_KL", "tfr": 0.0, "prior": "learned"},
                ("kl", "tf", "prior"))]


GRIDS = {"report": _report_grid, "tiny": _tiny_grid}


def to_argv(flags):
    """{"tfr": 0.75, "prior": "learned"} -> ["--tfr", "0.75", "--prior", "learned"]."""
    out = []
    for k, v in flags.items():
        if v is True:
            out.append(f"--{k}")
        elif v is not False and v is not None:
            out += [f"--{k}", *(map(str, v) if isinstance(v, (list, tuple)) else [str(v)])]
    return out


def tester_share(extra):
    """The part of the Trainer's extra flags that the Tester also accepts (with their values)."""
    from modules.options import tester_parser
    # Not the Trainer flags the Tester accepts only to run lab command lines (it ignores them).
    actions = {s: a for a in tester_parser()._actions for s in a.option_strings if a.help != argparse.SUPPRESS}
    out, i = [], 0
    while i < len(extra):
        tok = extra[i]
        name = tok.split("=", 1)[0]
        n = 1
        if name in actions and "=" not in tok:
            nargs = actions[name].nargs
            if nargs == 0:
                n = 1
            elif nargs in ("+", "*"):
                while i + n < len(extra) and not extra[i + n].startswith("--"):
                    n += 1
            else:
                n = 1 + (nargs if isinstance(nargs, int) else 1)
        # --batch_size means sequences per step to the Trainer, rollouts at once to the Tester.
        if name in actions and name not in ("--save_root", "--ckpt_path", "--batch_size", "--help", "-h"):
            out += extra[i:i + n]
        i += n
    return out


def read_json(path, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def write_json(path, obj):
    """modules/files.py's atomic writer, imported when first used (the script is run as a file:
    main() puts the repository root on sys.path first)."""
    from modules.files import write_json as write
    write(path, obj)


def epochs_done(save_root):
    """The last epoch logged in metrics.jsonl (0 when none)."""
    try:
        with open(os.path.join(save_root, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return 0
    return max((r.get("epoch", 0) for r in rows), default=0)


def run_logged(cmd, log_path, limit_s=None, on_row=None, metrics_path=None):
    """Run cmd with stdout and stderr to log_path. After limit_s seconds send SIGTERM (the Trainer
    then writes a checkpoint and exits). on_row(n, t) is called when metrics_path gains its n-th row,
    t seconds after the start. Returns (exit code, seconds, stopped by the limit)."""
    t0 = time.time()
    stopped = False
    seen = 0
    with open(log_path, "a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        # Its own session: a Ctrl-C in the terminal reaches only this process, which passes one
        # SIGINT on (a second one would make the Trainer abort without its checkpoint).
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while proc.poll() is None:
                time.sleep(0.2)
                if metrics_path and on_row:
                    n = epochs_done(os.path.dirname(metrics_path))
                    while seen < n:
                        seen += 1
                        on_row(seen, time.time() - t0)
                if limit_s is not None and not stopped and time.time() - t0 > limit_s:
                    proc.send_signal(signal.SIGTERM)
                    stopped = True
        except KeyboardInterrupt:
            # The Trainer saves a checkpoint on SIGINT, and the next invocation resumes it. After the
            # budget's SIGTERM it is saving already: one more signal would make it abort unsaved.
            if not stopped:
                proc.send_signal(signal.SIGINT)
            proc.wait()
            raise
    return proc.returncode, time.time() - t0, stopped


def fail(run, record, record_path, why, log=None):
    """Record a failed run and say why (with the end of its log)."""
    record["status"] = "failed"
    write_json(record_path, record)
    tail = f"; see {log}:\n{log_tail(log)}" if log else ""
    print(f"[{run.name}] {why}{tail}", file=sys.stderr, flush=True)
    return "failed"


def log_tail(path, n=15):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


# Trainer flags that trainer_cmd sets itself, and why a user's would break the run.
RUNNER_FLAGS = {"save_root": "one folder per run under --out", "resume": "one folder per run under --out",
                "ckpt_path": "each run starts from scratch or resumes its own folder",
                "num_epoch": "use --epochs"}


def trainer_cmd(run, save_root, num_epoch, extra, resume):
    where = ["--resume", save_root] if resume else ["--save_root", save_root]
    return [sys.executable, os.path.join(ROOT, "Trainer.py"), *where, *to_argv(run.flags),
            "--num_epoch", str(num_epoch), *extra]


def calibrate(grid, out, extra, minutes):
    """Epochs that fit in `minutes` of training: time a 2-epoch run of the grid's first
    configuration (the gap between its two metrics rows is one epoch with validation and
    checkpoints; the time to the first row beyond that is the start-up). Without --fast_train,
    whose first epochs are short and would size the runs for more epochs than fit. Cached in
    out/calibration.json for re-runs with the same flags."""
    path = os.path.join(out, "calibration.json")
    key = {"extra": extra, "flags": grid[0].flags}
    cal = read_json(path)
    if not cal or cal.get("key") != key:
        tmp = os.path.join(out, "_calibration")
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
        print(f"calibrating: 2 epochs of {grid[0].name} to size runs to {minutes} min ...", flush=True)
        stamps = {}
        full = [a for a in extra if a != "--fast_train"]
        rc, wall, _ = run_logged(trainer_cmd(grid[0], tmp, 2, full, False), os.path.join(out, "calibration.log"),
                                 on_row=lambda n, t: stamps.setdefault(n, t),
                                 metrics_path=os.path.join(tmp, "metrics.jsonl"))
        if rc != 0 or len(stamps) < 2:
            raise RuntimeError(f"calibration run failed (exit {rc}); see {out}/calibration.log:\n"
                               + log_tail(os.path.join(out, "calibration.log")))
        epoch_s = stamps[2] - stamps[1]
        cal = {"key": key, "epoch_s": round(epoch_s, 2), "startup_s": round(max(stamps[1] - epoch_s, 0.0), 2),
               "wall_s": round(wall, 2)}
        write_json(path, cal)
        shutil.rmtree(tmp)
    # 10% margin: runs other than the first may be slower (a learned prior adds a module).
    epochs = int((0.9 * minutes * 60 - cal["startup_s"]) // cal["epoch_s"])
    print(f"calibration: {cal['epoch_s']:.1f} s per epoch, {cal['startup_s']:.1f} s start-up -> "
          f"{max(epochs, 1)} epoch(s) per run", flush=True)
    return max(epochs, 1)


def more_budget(minutes, before):
    """Whether --minutes `minutes` (None: no limit) gives more training time than `before`."""
    return before is not None and (minutes is None or minutes > before)


def settings_changed(record, run, extra, num_epoch, minutes):
    """What differs between a run's record and this invocation ("" when nothing does). num_epoch is
    None when --epochs was not given (the run keeps the schedule it started with); the budget
    counts for finished runs only (an unfinished one takes the new budget), and a larger one is no
    change for a run the budget stopped: it goes on."""
    diff = []
    if record.get("flags", run.flags) != run.flags:
        diff.append(f"grid flags {shlex.join(to_argv(record['flags']))}")
    if record.get("extra", extra) != extra:
        diff.append(f"flags after -- {shlex.join(record['extra']) or '(none)'}")
    if num_epoch is not None and record.get("num_epoch", num_epoch) != num_epoch:
        diff.append(f"--epochs {record['num_epoch']}")
    if (record.get("status") == "done" and record.get("minutes", minutes) != minutes
            and not (record.get("stopped_by_budget") and more_budget(minutes, record.get("minutes")))):
        diff.append(f"--minutes {record['minutes']}" if record["minutes"] else "no --minutes")
    return ", ".join(diff)


def run_one(run, out, num_epoch, extra, test_extra, limit_s, index=0, epochs_given=True):
    """Train (or resume) then test one run. Returns its status: done or failed."""
    save_root = os.path.join(out, run.name)
    os.makedirs(save_root, exist_ok=True)
    record_path = os.path.join(save_root, RUN_FILE)
    record = read_json(record_path, {})
    done = epochs_done(save_root)
    have_ckpt = any(f.endswith(".ckpt") for f in os.listdir(save_root))
    if not done and not have_ckpt:
        # It wrote nothing (e.g. the Trainer refused a mistyped flag): no result stands for its
        # settings, so this invocation's replace them.
        record = {}
    minutes = limit_s / 60 if limit_s else None
    changed = settings_changed(record, run, extra, num_epoch if epochs_given else None, minutes)
    if changed:
        # Its results stand for the settings it ran with; reusing or mixing them would mislabel them.
        print(f"[{run.name}] {save_root} holds this run made with other settings ({changed}): use another "
              "--out, or delete that folder to run it again with these", file=sys.stderr, flush=True)
        return "failed"
    goes_on = (record.get("status") == "done" and record.get("stopped_by_budget")
               and done < record.get("num_epoch", num_epoch) and more_budget(minutes, record.get("minutes")))
    if record.get("status") == "done" and not goes_on:
        print(f"[{run.name}] done already; skipped", flush=True)
        return "done"
    if goes_on:  # tested at the epoch the smaller budget reached: trained on, then tested again
        del record["stopped_by_budget"]
        record["status"] = "training"
    # index: the run's place in its grid, the order of scripts/plot_report.py's table.
    record.update(name=run.name, index=index, flags=run.flags, groups=list(run.groups), extra=extra, minutes=minutes)
    record.setdefault("num_epoch", num_epoch)  # a resumed run keeps the schedule it started with
    num_epoch = record["num_epoch"]

    # Training time already spent counts against the budget: a run stopped by it is not resumed
    # unless a larger --minutes is given.
    left = None if limit_s is None else limit_s - record.get("train_s", 0.0)
    if record.get("status") != "trained" and done < num_epoch and left is not None and left <= 1.0:
        # The budget ran out in an invocation that was then interrupted: stopped by it all the same
        # (so a larger --minutes takes it on).
        record["stopped_by_budget"] = True
    elif record.get("status") != "trained" and done < num_epoch:
        record["status"] = "training"
        write_json(record_path, record)
        verb = f"resuming at epoch {done + 1}" if have_ckpt else "training"
        print(f"[{run.name}] {verb}: {num_epoch} epoch(s) " + shlex.join(to_argv(run.flags)), flush=True)
        t0 = time.time()
        try:
            rc, wall, stopped = run_logged(trainer_cmd(run, save_root, num_epoch, extra, have_ckpt),
                                           os.path.join(save_root, "train.log"), limit_s=left)
        except KeyboardInterrupt:
            record["train_s"] = round(record.get("train_s", 0.0) + time.time() - t0, 1)
            write_json(record_path, record)
            raise
        record["train_s"] = round(record.get("train_s", 0.0) + wall, 1)
        if stopped and rc in (0, 143, -signal.SIGTERM):
            record["stopped_by_budget"] = True  # the run keeps the epochs it finished
        elif rc != 0:
            return fail(run, record, record_path, f"Trainer failed (exit {rc})", os.path.join(save_root, "train.log"))
    record["epochs_done"] = epochs_done(save_root)
    if record["epochs_done"] == 0:
        # Stopped inside its first epoch: nothing validated to test or report.
        return fail(run, record, record_path, f"no epoch finished within the budget ({record.get('train_s', 0):.0f} s "
                    "of training): run the same command with a larger --minutes, and the run goes on from where "
                    "it stopped")
    record["status"] = "trained"
    write_json(record_path, record)

    ckpt = next((os.path.join(save_root, c) for c in ("best.ckpt", "last.ckpt")
                 if os.path.isfile(os.path.join(save_root, c))), None)
    if ckpt is None:
        return fail(run, record, record_path, f"no checkpoint in {save_root} to test")
    test_root = os.path.join(save_root, "test")
    cmd = [sys.executable, os.path.join(ROOT, "Tester.py"), "--ckpt_path", ckpt, "--save_root", test_root,
           *tester_share(extra), *test_extra]
    rc, wall, _ = run_logged(cmd, os.path.join(save_root, "test.log"))
    if rc != 0:
        return fail(run, record, record_path, f"Tester failed (exit {rc})", os.path.join(save_root, "test.log"))
    res = read_json(os.path.join(test_root, "results.json"), {})
    rows = [json.loads(x) for x in open(os.path.join(save_root, "metrics.jsonl")) if x.strip()]
    best_val = max((r["val_psnr"] for r in rows if "val_psnr" in r), default=float("nan"))
    record.update(status="done", test_s=round(wall, 1), tested=os.path.basename(ckpt))
    write_json(record_path, record)
    test = f", test PSNR {res['psnr']:.2f} dB" if "psnr" in res else ""
    print(f"[{run.name}] done: {record['epochs_done']} epoch(s) in {record['train_s']:.0f} s"
          f"{' (stopped by the budget)' if record.get('stopped_by_budget') else ''}, "
          f"best val PSNR {best_val:.2f} dB{test}", flush=True)
    return "done"


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM to the runner stops the current run as Ctrl-C does


def get_parser():
    from modules.options import HelpFormatter, Parser  # imported when used, as write_json's writer
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter,
               usage="%(prog)s [options] [-- TRAINER_FLAGS ...]")
    p.add_argument("--grid", choices=sorted(GRIDS), default="report", help="which runs")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these runs of the grid")
    p.add_argument("--out", default="runs/experiments", help="one save_root per run is made here")
    p.add_argument("--epochs", type=int, help="epochs per run (the schedules' length)")
    p.add_argument("--minutes", type=float,
                   help="training minutes per run: without --epochs, the epochs that fit (timed on a "
                        "2-epoch calibration run); in any case the Trainer is stopped (SIGTERM, it "
                        "checkpoints) when they are spent. Testing is not counted")
    p.add_argument("--test_args", default="", help='Tester-only flags, e.g. --test_args="--test_len 60 --num_samples 4"')
    p.add_argument("--list", action="store_true", help="print the grids and exit")
    p.add_argument("--dry_run", action="store_true", help="print the Trainer commands and exit")
    return p


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.list:
        for name, make in GRIDS.items():
            print(f"{name}:")
            for r in make():
                print(f"  {r.name:<22} {shlex.join(to_argv(r.flags)):<80} groups: {','.join(r.groups)}")
        return 0
    if args.epochs is None and args.minutes is None and not args.dry_run:
        parser.error("give a per-run budget: --epochs N and/or --minutes M")
    if (args.epochs is not None and args.epochs < 1) or (args.minutes is not None and args.minutes <= 0):
        parser.error("--epochs and --minutes must be positive")
    grid = GRIDS[args.grid]()
    from modules.options import given_flags, trainer_parser
    # Unknown flags are left to the Trainer to refuse.
    given = given_flags(trainer_parser, extra, known_only=True)
    own = sorted(given & set(RUNNER_FLAGS))
    if own:
        parser.error(f"{', '.join('--' + k for k in own)} after --: the runner sets it for every run "
                     f"({RUNNER_FLAGS[own[0]]}): leave it out")
    clash = sorted(given & {k for r in grid for k in r.flags})
    if clash:
        parser.error(f"{', '.join('--' + k for k in clash)} after -- would override what the runs of grid "
                     f"{args.grid} set (see --list), and their names would no longer say what they ran: leave "
                     "it out")
    index = {r.name: i for i, r in enumerate(grid)}  # the place in the whole grid, whatever --only picks
    if args.only:
        unknown = sorted(set(args.only) - {r.name for r in grid})
        if unknown:
            parser.error(f"--only: no run {unknown} in grid {args.grid} (see --list)")
        grid = [r for r in grid if r.name in args.only]
    if args.dry_run:
        for r in grid:
            print(shlex.join(trainer_cmd(r, os.path.join(args.out, r.name), args.epochs or "N", extra, False)))
        return 0
    out = os.path.abspath(args.out)
    try:
        test_extra = shlex.split(args.test_args)
    except ValueError as e:
        parser.error(f"--test_args {args.test_args!r}: {e}")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        print(f"error: --out {args.out}: {e.strerror or e}; choose another folder", file=sys.stderr)
        return 2
    limit_s = args.minutes * 60 if args.minutes else None
    t0 = time.time()
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        num_epoch = args.epochs or calibrate(grid, out, extra, args.minutes)
        status = {r.name: run_one(r, out, num_epoch, extra, test_extra, limit_s, index[r.name], args.epochs is not None)
                  for r in grid}
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; the same command resumes where this one stopped", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    failed = [n for n, s in status.items() if s != "done"]
    print(f"{len(status) - len(failed)}/{len(status)} run(s) done in {(time.time() - t0) / 60:.1f} min under {out}"
          + (f"; failed: {', '.join(failed)}" if failed else "")
          + f"\nfigures and table: python scripts/plot_report.py {os.path.join(args.out, '*')} --out {args.out}/report",
          flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)  # run as a file, Python puts scripts/ on the path; modules/ is at the root
    from modules.environment import require
    require("scripts/run_experiments.py")  # what the runs it starts (Trainer.py, Tester.py) need
    sys.exit(main())
