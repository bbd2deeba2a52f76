"""Train the pose-conditioned video VAE.

    python Trainer.py                                   # embedded dataset, lab defaults
    python Trainer.py --DR path/to/lab/data --save_root runs/lab
    python Trainer.py --resume runs/lab                 # continue where it stopped
    torchrun --nproc_per_node=4 Trainer.py ...          # several GPUs

`python Trainer.py --help` lists every flag.
"""
import glob
import json
import math
import os
import re
import signal
import sys
import time

# Ctrl-C while torch loads (seconds) ends the script quietly, as it does once main() runs. A
# SIGINT that the parent ignores (a background job of a script) stays ignored.
QUIET_IMPORT = __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler
if QUIET_IMPORT:
    signal.signal(signal.SIGINT, lambda signum, frame: sys.exit(130))
if __name__ == "__main__":
    from modules.environment import require
    require("Trainer.py")

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dataloader import GENERATOR_MARKER, DataError, TrainWindows  # noqa: E402
from modules.model import build_model  # noqa: E402
from modules import distributed  # noqa: E402
from modules.checkpoint import (FORMAT, VERSION, CheckpointError, check_dims, load_checkpoint,  # noqa: E402
                                load_model_weights, model_args, rng_state, save_checkpoint, set_rng_state)
from modules.engine import (OutOfMemory, SpikeGuard, TrainingDiverged, WindowBatches, epoch_settings,  # noqa: E402
                            first_line, is_out_of_memory, train_one_epoch, validate)
from modules.files import atomic_write, outermost_missing, remove_empty_folders, write_json  # noqa: E402
from modules.options import (ConfigError, check_trainer, given_flags, gpu_note, trainer_parser, writable_folder,  # noqa: E402
                             write_failure_advice)
from modules.runtime import prepare_model, resolve_speed  # noqa: E402
from modules.schedules import kl_schedule_note  # noqa: E402
from modules.visualize import psnr_figure, save_gif, save_psnr_plot, side_by_side  # noqa: E402

DEFAULT_DR = "data/dance"


class StopRequest:
    """Ctrl-C / SIGTERM set a flag the loop checks between steps; a second Ctrl-C aborts."""

    def __init__(self, verbose=True, second_aborts=True):
        self.requested = False
        self.signal = None
        self.previous = {}
        self.verbose = verbose  # under torchrun only rank 0 says so (Ctrl-C reaches every rank)
        # Under torchrun a second Ctrl-C reaches torchrun alone, which sends the processes SIGTERM:
        # they finish the step and write the checkpoint all the same.
        self.second_aborts = second_aborts

    def install(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self):
        """Put back the handlers found at install (main() may run inside a test or a notebook)."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested, self.signal = True, signal.Signals(signum).name
        if self.verbose:
            print(f"\n{self.signal} received: finishing this step and writing a checkpoint"
                  + (" (press Ctrl-C again to abort without saving)" if self.second_aborts else ""),
                  file=sys.stderr, flush=True)


def build_optimizer(model, args, speed):
    cls = {"Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW, "Adamax": torch.optim.Adamax}[args.optim]
    kw = dict(lr=args.lr, betas=tuple(args.betas), weight_decay=args.weight_decay)
    if speed.device.type == "cuda" and args.optim in ("Adam", "AdamW"):
        kw["fused"] = True  # one kernel for the whole update
    return cls(model.parameters(), **kw)


# Optimizers whose per-parameter state has the same entries (Adam's moments serve AdamW as they are).
STATE_KIND = {"Adam": "adam", "AdamW": "adam", "Adamax": "adamax"}


def load_optimizer_state(optimizer, ckpt, args, verbose=True):
    """Continue the checkpoint's optimizer state under this run's options. The state (moments, step
    counts) is the checkpoint's; the options (weight decay, ...) are this command line's, which
    Optimizer.load_state_dict would otherwise replace with the checkpoint's. A state of another
    kind (Adamax's from Adam's, or the reverse) cannot continue: the optimizer starts afresh."""
    saved = (ckpt.get("args") or {}).get("optim", args.optim)
    if STATE_KIND.get(saved) != STATE_KIND[args.optim]:
        if verbose:
            print(f"note: {args.ckpt_path} holds the state of {saved}; --optim {args.optim} starts with a "
                  "fresh state (the weights, epoch and schedules continue)", flush=True)
        return
    options = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except ValueError:  # its parameters are not this model's (the weights loaded with defaults)
        raise CheckpointError(f"{args.ckpt_path}: its optimizer state holds other parameters than this "
                              "model's (written before a module was added to the model, e.g. --pose_flow's "
                              "dancer layer); Tester.py still tests it, but training cannot continue "
                              "from it: start a new run") from None
    for group, opts in zip(optimizer.param_groups, options):
        group.update(opts)


def find_resume_checkpoint(save_root):
    """The newest checkpoint of a run folder: last.ckpt, else the newest epoch_*.ckpt."""
    last = os.path.join(save_root, "last.ckpt")
    if os.path.isfile(last):
        return last
    found = sorted(glob.glob(os.path.join(save_root, "*.ckpt")), key=os.path.getmtime)
    if not found:
        raise ConfigError(f"--resume {save_root}: no checkpoint (*.ckpt) in that folder, so nothing to resume "
                          "(a run writes its first one after epoch 1 or when stopped); start the run again")
    return found[-1]


def continues_its_folder(args):
    """Whether the run starts from a checkpoint in its own save_root."""
    return bool(args.ckpt_path) and (os.path.realpath(os.path.dirname(os.path.abspath(args.ckpt_path)))
                                     == os.path.realpath(args.save_root))


def trainer_command():
    """How to start the Trainer as this run was started: under torchrun, with as many processes
    (a plain `python Trainer.py` resumes too, but with a smaller global batch)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return "python Trainer.py"
    if int(os.environ.get("LOCAL_WORLD_SIZE", world)) == world:
        return f"torchrun --standalone --nproc_per_node={world} Trainer.py"
    return "torchrun <this run's torchrun flags> Trainer.py"


def restart_command(args):
    """The command that starts this run again from its --ckpt_path, into the same folder."""
    there = "" if not args.save_root or continues_its_folder(args) else f" --save_root {args.save_root}"
    return f"{trainer_command()} --ckpt_path {args.ckpt_path}{there}"


def best_on_disk(path):
    """The validation PSNR of the model in best.ckpt at `path`, or -inf when there is none to read."""
    if not os.path.isfile(path):
        return float("-inf")
    try:
        return float(load_checkpoint(path).get("best_psnr", float("-inf")))
    except (CheckpointError, TypeError, ValueError):
        return float("-inf")  # unreadable: the next validation replaces it


def resume_position(progress, epoch, args, world_size):
    """Where a resume continues, in this run's steps: a mid-epoch checkpoint holds its position in
    windows, which another global batch (--batch_size x processes) divides differently."""
    if not progress:
        return f"epoch {epoch + 1}"
    batch = args.batch_size * world_size
    if "windows" not in progress:  # written before positions were in windows: one process, this batch
        return f"epoch {epoch + 1}, step {progress['step']}"
    windows, step = progress["windows"], progress["step"]
    where = f"epoch {epoch + 1}, step {windows // batch}"
    if step and windows // step != batch:
        old = windows // step
        where += (f" (the checkpoint's run took {old} window{'s' * (old != 1)} per step, this one takes {batch}: "
                  f"--batch_size {args.batch_size} x {world_size} process(es); it goes on from window "
                  f"{windows // batch * batch + 1} of the epoch)")
    return where


def plan_save_root(args):
    """Decide where the run writes and which checkpoint (if any) it resumes from."""
    if args.resume:
        if os.path.isfile(args.resume):
            raise ConfigError(f"--resume {args.resume}: that is a file; --resume takes the run folder "
                              f"(--resume {os.path.dirname(args.resume) or '.'}), --ckpt_path {args.resume} "
                              "continues from that checkpoint")
        if not os.path.isdir(args.resume):
            raise ConfigError(f"--resume {args.resume}: no such folder")
        args.save_root = args.resume
        args.ckpt_path = find_resume_checkpoint(args.resume)
        if load_checkpoint(args.ckpt_path).get("format") != FORMAT:
            # Weights only: nothing of a run to continue, and continuing in its folder would write
            # the run's own checkpoints over the file.
            raise ConfigError(f"--resume {args.resume}: {args.ckpt_path} holds weights only (lab code's), not a "
                              f"run of Trainer.py to continue; start from its weights with --ckpt_path "
                              f"{args.ckpt_path} (in a new runs/<time> folder)")
    elif args.ckpt_path and args.save_root is None:
        # A checkpoint of this project continues its run folder; weights only (lab code's) start a
        # run folder of their own, so that the run's best.ckpt and last.ckpt cannot replace the file.
        if load_checkpoint(args.ckpt_path).get("format") == FORMAT:
            args.save_root = os.path.dirname(os.path.abspath(args.ckpt_path))
        else:
            args.save_root = new_run_folder()
    elif args.save_root is None:
        args.save_root = new_run_folder()
    elif (args.ckpt_path and not args.test and not args.overwrite and continues_its_folder(args)
          and PREVIOUS_RUN.fullmatch(os.path.basename(args.ckpt_path))
          and load_checkpoint(args.ckpt_path).get("format") != FORMAT):
        raise ConfigError(f"--ckpt_path {args.ckpt_path} holds weights only (lab code's) and this run would write "
                          f"its own {os.path.basename(args.ckpt_path)} over it in --save_root {args.save_root}: "
                          "choose another --save_root, leave it out for a new runs/<time>, or pass --overwrite")
    elif (not args.test and not args.overwrite and glob.glob(os.path.join(args.save_root, "*.ckpt"))
          and not continues_its_folder(args)):
        # Only a checkpoint's own folder is continued without asking.
        raise ConfigError(f"--save_root {args.save_root} already holds checkpoints: resume it with "
                          f"--resume {args.save_root}, choose another --save_root, or pass --overwrite")
    if not args.test:  # --test only validates: it writes nothing
        writable_folder(args.save_root)


# What a run writes in its save_root that a later run would mistake for its own (best.ckpt above
# all: the Tester would test the old run's; old event files mix into TensorBoard's curves).
# --overwrite removes these, and only these.
PREVIOUS_RUN = re.compile(r"(last|best|epoch_\d+)\.ckpt|metrics\.jsonl|events\.out\.tfevents\..+"
                          r"|val_epoch\d+\.gif|val_psnr_epoch\d+\.png")


def remove_previous_run(args):
    """--overwrite, for a run that starts at epoch 1: delete the previous run's checkpoints and
    metrics.jsonl from save_root (never the --ckpt_path this run starts from, nor other files)."""
    keep = os.path.realpath(args.ckpt_path) if args.ckpt_path else None
    gone = []
    for name in sorted(os.listdir(args.save_root)):
        path = os.path.join(args.save_root, name)
        if PREVIOUS_RUN.fullmatch(name) and os.path.isfile(path) and os.path.realpath(path) != keep:
            os.remove(path)
            gone.append(name)
    if gone:
        print(f"--overwrite: removed the previous run's {', '.join(gone)} from {args.save_root}", flush=True)


SPIKE = 100.0  # a log window's training error this many times the lowest so far: diverged


def spike_note(recon_name, recon, lowest, best_psnr, best_path, over):
    """A line telling that training diverged (a run at learning rate 1e-3, batch 64, went from an
    MSE of 7e-4 to 2e5 in one epoch and never came back), or None. Finite losses are not skipped
    like NaN ones, so without it the only sign is the number. `over` names what recon averages."""
    # NaN epochs are told of step by step; a lowest of 0 (a perfect fit, or float32 rounding of a
    # sum) is no scale to compare with.
    if lowest is None or not lowest > 0 or not (recon > SPIKE * lowest):
        return None
    kept = (f"{best_path} keeps the best validated model ({best_psnr:.2f} dB)" if os.path.isfile(best_path)
            else "no model has been validated yet")
    return (f"note: {over} training {recon_name} is {recon:.3g}, {recon / lowest:.3g} times the lowest "
            f"so far ({lowest:.3g}): training diverged; {kept}. A lower --lr usually avoids it.")


def claim_run_folder(save_root):
    """Lock the run folder for as long as this process holds the returned descriptor (the system
    drops the lock when the process ends, however it ends): a second Trainer on the same folder
    would write over this run's checkpoints and metrics.jsonl. None where locks are not available."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no guard
        return None
    fd = os.open(save_root, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"another Trainer is writing to {save_root} (a run in progress there, or the processes "
                          "of a stopped torchrun job that still run); wait for it to end, or choose another "
                          "--save_root") from None
    except OSError:  # a file system without locks
        os.close(fd)
        return None
    return fd


def new_run_folder():
    """runs/<timestamp>, claimed with an exclusive mkdir: a second run started in the same second
    gets runs/<timestamp>-2 rather than the first run's folder."""
    base = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    path = base
    for n in range(2, 1000):
        try:
            os.makedirs(path)
            break
        except FileExistsError:
            path = f"{base}-{n}"
        except OSError:
            break  # writable_folder reports why
    return path


# Flags about this machine or this invocation rather than the run: a resume keeps the current ones.
NOT_ADOPTED = ("resume", "ckpt_path", "save_root", "overwrite", "test", "device", "gpu", "num_workers",
               "no_cache", "log_every",
               # speed only (the same function): what suits this machine, auto by default
               "channels_last", "compile", "cuda_graphs", "malloc_cache")


def adopt_run_args(args, argv):
    """A resume continues the run as it was started: every flag not written on this command line
    takes the checkpoint's value, so `--resume SAVE_ROOT` alone gives the same model, data order
    and schedules."""
    if args.resume and args.ckpt_path:
        return  # check_trainer refuses this
    if args.resume:
        if not os.path.isdir(args.resume):
            return  # plan_save_root says so
        path = find_resume_checkpoint(args.resume)
    elif args.ckpt_path:
        path = args.ckpt_path
    else:
        return
    ckpt = load_checkpoint(path)
    stored = ckpt.get("args") or {}
    if ckpt.get("lab_format"):
        # Weights only: lab code's model (VAE_Model), or this project's re-saved. The model is what
        # the weights say (dims, layers) and imply (lab_activation, condition, residual); the other
        # flags are this run's.
        stored = {k: v for k, v in model_args(ckpt, path).items()
                  if v is not None and k not in ("frame_H", "frame_W")}
    given = given_flags(trainer_parser, argv)
    for k, v in stored.items():
        if hasattr(args, k) and k not in given and k not in NOT_ADOPTED:
            setattr(args, k, v)
    if "DR" not in given and args.DR != DEFAULT_DR and not os.path.exists(args.DR):
        # A relative --DR is read from the folder the run was started in; the message that the
        # dataset is missing would suggest generating a new one there, another dataset than the run's.
        raise ConfigError(f"{path} was trained on --DR {args.DR}, which is not found from "
                          f"{os.getcwd()}: pass --DR with that dataset's path")


def trim_metrics(path, epoch):
    """Keep the rows of the first `epoch` epochs, which a (re)started run does not redo. A row is
    written before its epoch's checkpoint, so a crash between the two leaves a row that is dropped
    here and written again, never a gap; a line cut short by a crash is dropped too."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.read().splitlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line)["epoch"] <= epoch:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            pass
    if len(keep) < len(lines):
        def write(tmp):
            with open(tmp, "w") as f:
                f.write("".join(line + "\n" for line in keep))
        atomic_write(path, write)
        print(f"{path}: dropped {len(lines) - len(keep)} row(s) after epoch {epoch}, which this run does again",
              flush=True)


def ensure_dataset(args, d):
    """Generate the embedded dataset at the default --DR on first use, or finish one whose
    generation was interrupted (the generator only ever replaces folders it wrote itself)."""
    from scripts.make_dance_data import PARTIAL, make_dataset
    interrupted = os.path.exists(os.path.join(args.DR, PARTIAL))
    if args.DR != DEFAULT_DR or (os.path.exists(args.DR) and not interrupted):
        return
    if d.is_main:
        print(f"No complete dataset at {args.DR}: generating the embedded procedural dance dataset there "
              "(once; about a minute on 2 cores).", flush=True)
        try:
            make_dataset(args.DR, overwrite=os.path.exists(args.DR))
        except OSError as e:  # else reported as a failure to write the run's own folder
            raise DataError(f"cannot write the embedded dataset to {args.DR} ({e.strerror or e}); "
                            "run from a writable folder or pass --DR") from None
    d.barrier()


def generated_test_len(root):
    """The test sequences' length recorded by scripts/make_dance_data.py, or None."""
    try:
        with open(os.path.join(root, GENERATOR_MARKER)) as f:
            return int(json.load(f)["splits"]["test"]["length"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def plain_args(args):
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, type(None)))}


def make_state(model, optimizer, args, epoch, progress, best_psnr, nan_skipped, nan_run, guard):
    beta, tfr, _ = epoch_settings(min(epoch, args.num_epoch - 1), args)
    return {
        "format": FORMAT, "version": VERSION,
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        # The learning rate is a pure function of (epoch, step) (modules/schedules.lr_factor).
        "scheduler": {"name": args.scheduler, "lr": optimizer.param_groups[0]["lr"]},
        "epoch": epoch,               # epochs finished (or the epoch in progress when progress is set)
        "progress": progress,         # mid-epoch position, or None at an epoch boundary
        "best_psnr": best_psnr, "tfr": tfr, "beta": beta, "nan_skipped": nan_skipped,
        "nan_run": nan_run,           # non-finite steps in a row: --max_nan_steps counts across epochs
        "spike_guard": guard.state(),  # --skip_spikes' reference: a resume decides as the run would have
        "rng": rng_state(), "args": plain_args(args), "saved_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def log_epoch(writer, row, val):
    e = row["epoch"]
    for k in ("loss", "mse", "l1", "kl", "beta", "tfr", "lr"):
        if k in row:
            writer.add_scalar(f"train/{k}", row[k], e)
    if val is not None:
        writer.add_scalar("val/psnr", val["psnr"], e)
        writer.add_scalar("val/loss", val["loss"], e)
        writer.add_figure("val/psnr_per_frame", psnr_figure({"val": val["psnr_per_frame"]}), e)
        L = val["pred"].shape[0]
        picks = torch.linspace(1, L - 1, min(8, L - 1)).long()
        writer.add_images("val/pred_vs_truth", side_by_side(val["pred"][picks], val["gt"][picks]).clamp(0, 1), e)
    writer.flush()


def save_visualization(save_root, epoch, val):
    """--store_visualization's GIF and PSNR plot of a validation, written whole or not at all after
    the epoch's checkpoints: optional outputs, so a failure to write them is told and training goes
    on (a full disk then stops the run at its next checkpoint, with the epochs before it saved)."""
    outputs = ((f"val_epoch{epoch}.gif", lambda p: save_gif(side_by_side(val["pred"], val["gt"]), p)),
               (f"val_psnr_epoch{epoch}.png", lambda p: save_psnr_plot({"val": val["psnr_per_frame"]}, p)))
    for name, write in outputs:
        try:
            atomic_write(os.path.join(save_root, name), write, keep_ext=True)
        except OSError as e:
            print(f"note: cannot write {name} in {save_root} ({e.strerror or e}); training goes on", flush=True)


def run(args):
    d = distributed.setup(args)
    stop = StopRequest(verbose=d.is_main, second_aborts=not d.enabled)
    leave_group = True
    # The folders this run makes for its run folder (plan_save_root makes them: --save_root a/b/c
    # with a/ new makes a/, a/b/ and a/b/c/; by default runs/<timestamp>, and runs/ if missing) are
    # removed again when the run stops before writing anything in them: a bad --DR must not leave
    # empty folders behind. `top` is the outermost of them (None: only the run folder itself).
    clean, top = False, None
    if d.is_main and not args.resume:
        if args.save_root:
            top = outermost_missing(args.save_root)
            clean = top is not None
        else:  # runs/<timestamp>, or a checkpoint's folder, which holds it and so is never removed
            top, clean = outermost_missing("runs"), True
    claimed = []  # the run folder's lock (claim_run_folder), held until the run ends
    try:
        return _train(args, d, stop, claimed)
    except OutOfMemory:
        # Under torchrun only this rank failed: the others wait in a collective it will never
        # join, so it exits without the group's goodbye (torchrun then stops them).
        leave_group = False
        raise
    finally:
        stop.uninstall()
        for fd in claimed:
            os.close(fd)
        if clean and args.save_root:
            remove_empty_folders(args.save_root, top or args.save_root)
        if leave_group:
            distributed.cleanup(d)


def _train(args, d, stop, claimed):
    torch.manual_seed(args.seed + d.rank)
    speed = resolve_speed(args)
    refused = None
    if d.is_main:
        try:
            plan_save_root(args)
            if not args.test:
                claimed += [fd for fd in [claim_run_folder(args.save_root)] if fd is not None]
        except ConfigError as e:
            refused = e  # sent to every rank, so all stop with the message instead of a broken pipe
    refused, args.save_root, args.ckpt_path = d.broadcast_object((refused, args.save_root, args.ckpt_path))
    if refused is not None:
        raise refused
    ensure_dataset(args, d)
    cache = not args.no_cache
    val_set = TrainWindows(args.DR, args.frame_H, args.frame_W, video_len=args.val_vi_len, split="val", cache=cache,
                          workers=args.num_workers)

    model = build_model(vars(args))
    ckpt = None
    if args.ckpt_path:
        ckpt = load_checkpoint(args.ckpt_path)
        check_dims(ckpt, args, args.ckpt_path)
        load_model_weights(model, ckpt, args.ckpt_path)
    prepare_model(model, speed)

    if args.test:
        if d.is_main:  # under torchrun, one validation, not one per rank
            val = validate(model, val_set, args, speed)
            print(f"val PSNR {val['psnr']:.3f} dB over {len(val_set)} sequence(s) of {args.val_vi_len} frames "
                  f"(frames 1..{args.val_vi_len - 1}, z from the prior)", flush=True)
            if args.store_visualization:
                print("note: --test writes nothing, so no --store_visualization GIF either; Tester.py writes "
                      "each test sequence's GIF (a training run writes the validation GIF at each validation)",
                      flush=True)
        d.barrier()
        return 0

    if ckpt is not None and "optimizer" in ckpt and ckpt.get("format") == FORMAT and ckpt["epoch"] >= args.num_epoch:
        if d.is_main:  # nothing to train: nothing is written either
            newest = f" (newest checkpoint {args.ckpt_path})" if args.resume else ""
            print(f"all {ckpt['epoch']} epochs of {args.resume or args.ckpt_path} are done{newest}; "
                  f"raise --num_epoch above {ckpt['epoch']} to train more", flush=True)
        return 0
    train_set = TrainWindows(args.DR, args.frame_H, args.frame_W, video_len=args.train_vi_len,
                             partial=1.0, split="train", cache=cache, workers=args.num_workers)
    batches = WindowBatches(train_set, args.batch_size, speed.device, args.seed, d.rank, d.world_size,
                            first_from=args.first_frame_from)
    flag, fraction = "--partial", args.partial
    if args.fast_train and args.fast_partial < fraction:
        flag, fraction = "--fast_partial", args.fast_partial
    if batches.steps(fraction) == 0:
        raise ConfigError(f"{len(train_set)} training windows of {args.train_vi_len} frames make no batch of "
                          f"{args.batch_size} x {d.world_size} process(es) at {flag} {fraction}; "
                          "lower --batch_size or use more data")
    optimizer = build_optimizer(model, args, speed)
    start_epoch, progress, best_psnr, nan_skipped, nan_run, guard_state = 0, None, float("-inf"), 0, 0, None
    if ckpt is not None and "optimizer" in ckpt and ckpt.get("format") == FORMAT:
        load_optimizer_state(optimizer, ckpt, args, d.is_main)
        start_epoch, progress = ckpt["epoch"], ckpt.get("progress")
        nan_skipped, nan_run, guard_state = ckpt.get("nan_skipped", 0), ckpt.get("nan_run", 0), ckpt.get("spike_guard")
        # best.ckpt is the best model validated in its folder: a run continued in another folder
        # writes one at its first validation, whatever the source run's best was.
        if continues_its_folder(args):
            best_psnr = ckpt.get("best_psnr", best_psnr)
        if d.world_size == 1:
            set_rng_state(ckpt.get("rng"))
        if d.is_main:
            print(f"Resuming {args.ckpt_path} at {resume_position(progress, start_epoch, args, d.world_size)}",
                  flush=True)
    elif ckpt is not None and d.is_main:
        why = ("a checkpoint of the lab's code: its optimizer state, epoch, lr and tfr are not continued; "
               "this run's flags set them" if args.lab_activation else "weights only: no optimizer state or epoch in it")
        print(f"Starting from the weights in {args.ckpt_path} ({why})", flush=True)

    train_model = model
    if d.enabled:
        if speed.device.type == "cuda":
            train_model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(train_model)
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[speed.device.index] if speed.device.type == "cuda" else None)
    if speed.compile:
        train_model = torch.compile(train_model)

    writer = None
    if d.is_main:
        # A new run in save_root: from scratch, or from a checkpoint of another folder. (A run that
        # continues from its own folder's checkpoint keeps the folder's other checkpoints.)
        if args.overwrite and not args.resume and (start_epoch == 0 and progress is None
                                                   or not continues_its_folder(args)):
            remove_previous_run(args)
        # A run taken back to an earlier checkpoint of its folder (--ckpt_path .../epoch_3.ckpt)
        # may find a better model in best.ckpt, validated after that epoch: it is replaced only by
        # a better one.
        best_path = os.path.join(args.save_root, "best.ckpt")
        kept = best_on_disk(best_path)
        if kept > best_psnr:
            print(f"{best_path} holds a model validated at {kept:.2f} dB, above this run's best so far "
                  f"({best_psnr:.2f} dB): a validation replaces it only if it scores higher", flush=True)
            best_psnr = kept
        write_json(os.path.join(args.save_root, "args.json"), plain_args(args))  # atomic: a crash keeps the old one
        print(f"Training on {speed.device} ({d.world_size} process(es)), amp={speed.amp}, "
              f"channels_last={speed.channels_last}, compile={speed.compile}; "
              f"{len(train_set)} windows of {args.train_vi_len} frames; writing to {args.save_root}", flush=True)
        for note in (gpu_note(args),
                     kl_schedule_note(args.kl_anneal_type, args.num_epoch, args.kl_anneal_cycle, args.kl_anneal_ratio)):
            if note:
                print(note, flush=True)

    stop.install()
    params = list(model.named_parameters())  # names for the guard's note
    metrics_path = os.path.join(args.save_root, "metrics.jsonl")
    last = os.path.join(args.save_root, "last.ckpt")
    # metrics.jsonl keeps the rows of epochs after start_epoch (a run taken back to an earlier
    # checkpoint, or one that crashed before last.ckpt was written) until this run writes its first
    # row, and TensorBoard shows their events until then: a run that fails before that leaves the
    # folder as it found it.
    trimmed = False
    # Where a failure before this run's first checkpoint leaves the user: at the checkpoint it started from.
    started_from = None if args.resume or not args.ckpt_path else args.ckpt_path
    guard = SpikeGuard(args.skip_spikes, guard_state)  # its reference carries across epochs
    # The lowest training error of this process per log window (every --log_every steps, and the
    # rest of an epoch): a window 100x it tells of a divergence within the epoch, the first included.
    lowest, spike_noted = None, False

    def watch(recon, steps):
        nonlocal lowest, spike_noted
        note = spike_note(args.recon, recon, lowest, best_psnr, os.path.join(args.save_root, "best.ckpt"),
                          over=f"the last {steps} steps'" if steps > 1 else "the last step's")
        if note and not spike_noted:  # once a run: the steps after a spike stay high
            tqdm.write(note)
            spike_noted = True
        if math.isfinite(recon):
            lowest = recon if lowest is None else min(lowest, recon)

    for epoch in range(start_epoch, args.num_epoch):
        t0 = time.time() - (progress or {}).get("time_s", 0.0)  # a resumed epoch counts its time before the stop
        try:
            row, finished, prog = train_one_epoch(
                train_model, optimizer, batches, epoch, args, speed, params, resume=progress,
                should_stop=lambda: d.any(stop.requested, speed.device), is_main=d.is_main,
                all_reduce=d.sum if d.enabled else None, nan_run=nan_run, watch=watch if d.is_main else None,
                guard=guard)
        except TrainingDiverged as e:
            if started_from is not None:
                kept = (f"this run started from {started_from}, which is intact: start from it again with a lower "
                        f"--lr ({restart_command(args)} --lr ...)")
            elif os.path.isfile(last):
                kept = (f"the last good checkpoint, {last}, is intact: resume it with a lower --lr "
                        f"({trainer_command()} --resume {args.save_root} --lr ...)")
            else:
                kept = "no checkpoint had been written yet"
            raise TrainingDiverged(f"{e}; {kept}") from None
        except OutOfMemory as e:  # several processes: nothing saved from this epoch
            kept = (f"the last checkpoint, {last}, is intact: resume it with --grad_ckpt or a smaller --batch_size"
                    if os.path.isfile(last) else
                    "no checkpoint had been written yet: start again with --grad_ckpt or a smaller --batch_size")
            raise OutOfMemory(f"{e}; {kept}") from None
        progress = None
        nan_skipped, nan_run = prog["nan_skipped"], prog["nan_run"]
        if not finished:
            oom = prog.pop("oom", None)
            prog["time_s"] = time.time() - t0
            if d.is_main:
                save_checkpoint(last, make_state(model, optimizer, args, epoch, prog, best_psnr, nan_skipped, nan_run, guard))
                if oom is None:
                    print(f"Stopped at epoch {epoch + 1}, step {prog['step']}; checkpoint {last}.\n"
                          f"Resume with: {trainer_command()} --resume {args.save_root}", flush=True)
            if oom is not None:
                less = (f"--resume {args.save_root} --grad_ckpt (about 10x less activation memory) or a smaller "
                        "--batch_size" if not args.grad_ckpt else
                        f"--resume {args.save_root} --batch_size {max(1, args.batch_size // 2)}")
                raise OutOfMemory(f"out of memory at epoch {epoch + 1}, step {prog['step']} (batch "
                                  f"{args.batch_size} x {args.train_vi_len} frames on {speed.device}); the position "
                                  f"is saved in {last}. Continue with less memory: {trainer_command()} {less}. ({oom})")
            return 130 if stop.signal == "SIGINT" else 143
        row = {"epoch": epoch + 1, **row, "time_s": round(time.time() - t0, 2)}
        val = val_oom = None
        if d.is_main and ((epoch + 1) % args.val_every == 0 or epoch + 1 == args.num_epoch):
            try:
                val = validate(model, val_set, args, speed)
            except RuntimeError as e:
                if not is_out_of_memory(e):
                    raise
                val_oom = first_line(e)  # the epoch is saved below, unvalidated
        if val is not None:
            # The curve goes in the row (rounded: 629 numbers at the lab's length) so that
            # scripts/plot_report.py needs nothing but metrics.jsonl.
            row.update(val_psnr=val["psnr"], val_loss=val["loss"],
                       val_psnr_per_frame=[round(x, 3) for x in val["psnr_per_frame"]])
        if d.is_main:
            is_best = val is not None and val["psnr"] > best_psnr
            if is_best:
                best_psnr = val["psnr"]
            # last.ckpt is written last: until it is, a resume redoes the epoch and rewrites the
            # row (see trim_metrics), its events and the other checkpoints, whatever moment a crash hit.
            if not trimmed:
                trim_metrics(metrics_path, epoch)
                from torch.utils.tensorboard import SummaryWriter
                # Events of later epochs than this one are hidden from TensorBoard's curves.
                writer = SummaryWriter(args.save_root, purge_step=epoch + 1)
                trimmed = True
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            log_epoch(writer, row, val)
            state = make_state(model, optimizer, args, epoch + 1, None, best_psnr, nan_skipped, nan_run, guard)
            if is_best:
                save_checkpoint(os.path.join(args.save_root, "best.ckpt"), state)
            if (epoch + 1) % args.per_save == 0:
                save_checkpoint(os.path.join(args.save_root, f"epoch_{epoch + 1}.ckpt"), state)
            save_checkpoint(last, state)
            if args.store_visualization and val is not None:
                save_visualization(args.save_root, epoch + 1, val)
            vtxt = f" | val PSNR {val['psnr']:.2f} dB{' (best)' if is_best else ''}" if val else ""
            tftxt = f"tfr {row['tfr']:.2f} | " if args.condition == "previous" else ""  # else moot
            print(f"epoch {epoch + 1}/{args.num_epoch} | loss {row['loss']:.4g} | {args.recon} "
                  f"{row.get('mse', row.get('l1')):.4g} | kl {row['kl']:.4g} | beta {row['beta']:.3g} | "
                  f"{tftxt}lr {row['lr']:.2e} | {row['time_s']:.1f}s{vtxt}", flush=True)
            if val_oom is not None:
                raise OutOfMemory(
                    f"out of memory validating after epoch {epoch + 1} ({len(val_set)} sequence(s) of "
                    f"{args.val_vi_len} frames on {speed.device}); the epoch is saved in {last}, without its "
                    f"validation. Continue with: {trainer_command()} --resume {args.save_root} --val_vi_len "
                    f"{max(2, args.val_vi_len // 2)} (or a larger --val_every). ({val_oom})")
        started_from = None  # last.ckpt is this run's now
        d.barrier()
    if d.is_main:
        writer.close()  # made at the first epoch's row; every run that gets here wrote one
        # best.ckpt is written only for a finite val PSNR (a NaN one never beats -inf).
        best = os.path.join(args.save_root, "best.ckpt")
        # The Tester reads the data flags from its own command line, not from the checkpoint.
        same_data = [f"--{k} {getattr(args, k)}" for k in ("DR", "frame_H", "frame_W")
                     if getattr(args, k) != trainer_parser().get_default(k)]
        test_len = generated_test_len(args.DR)
        if test_len not in (None, 630):  # 630: the Tester's default, the lab's
            same_data.append(f"--test_len {test_len}")
        print(f"Done. Best val PSNR {best_psnr:.2f} dB. Checkpoints in {args.save_root}; test with:\n"
              f"  python Tester.py --ckpt_path {best if os.path.isfile(best) else last}"
              + "".join(" " + f for f in same_data), flush=True)
    return 0


def say_error(msg):
    """One `error: ...` line on stderr in one write: print() writes the text and the newline
    separately, and under torchrun (unbuffered) the lines of two processes then interleave."""
    sys.stderr.write(f"error: {msg}\n")
    sys.stderr.flush()


def main(argv=None):
    started = time.time()  # a last.ckpt older than this is an earlier run's
    parser = trainer_parser()
    args = parser.parse_args(argv)
    try:
        adopt_run_args(args, argv)
        check_trainer(args)
        return run(args)
    except (ConfigError, DataError, CheckpointError, TrainingDiverged, OutOfMemory) as e:
        say_error(e)
        return 2
    except OSError as e:  # the disk filled up, or a folder vanished or turned read-only mid-run
        say_error(f"{e.filename or args.save_root}: {e.strerror or e}; {write_failure_advice(e)} "
                  "(checkpoints already written are intact)")
        return 2
    except RuntimeError as e:
        if not distributed.lost_peer(e):
            raise
        say_error(f"another process of this torchrun job stopped ({first_line(e)}); its "
                  "own error line says why. Checkpoints already written are intact")
        return 1
    except KeyboardInterrupt as e:  # a second Ctrl-C, or Ctrl-C or SIGTERM before training started
        say_error(f"interrupted; {interrupted_advice(args, started)}")
        return 143 if e.args == ("SIGTERM",) else 130


def interrupted_advice(args, started):
    """Where an interrupted run leaves the user. A last.ckpt older than this process is an earlier
    run's: it is this run's to resume only under --resume; a run from --ckpt_path goes back to it."""
    last = os.path.join(args.save_root or "", "last.ckpt")
    if args.test:
        return "nothing was written"
    if args.resume or (args.save_root and os.path.isfile(last) and os.path.getmtime(last) >= started):
        return f"resume from the last checkpoint with: {trainer_command()} --resume {args.resume or args.save_root}"
    if args.ckpt_path:
        return (f"no checkpoint was written; this run started from {args.ckpt_path}, which is intact: "
                f"{restart_command(args)}")
    return "no checkpoint was written"


def terminated(signum, frame):
    """SIGTERM while the run sets up (dataset decoding, the model) ends it like Ctrl-C: one line, and
    the empty run folder removed. From the first step on, StopRequest takes over: it saves first."""
    raise KeyboardInterrupt("SIGTERM")


if __name__ == "__main__":
    if QUIET_IMPORT:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # main() handles Ctrl-C from here
    signal.signal(signal.SIGTERM, terminated)
    sys.exit(main())
