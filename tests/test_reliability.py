"""Faults a training run must survive (issue 5), on tiny data on the CPU: Ctrl-C and SIGTERM,
kill -9 at any moment (also in the middle of a checkpoint write), non-finite losses, a full disk
or an unwritable folder, and an existing save_root. Each checks the exit code, the message, and
that nothing was lost: earlier checkpoints load, and a resumed run matches the uninterrupted one
epoch by epoch. The kill tests run a real `Trainer.py` process and signal or kill it.
"""
import errno
import glob
import hashlib
import json
import math
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings

import pytest
import torch

import Tester
import Trainer
from modules.checkpoint import load_checkpoint, save_checkpoint
from modules.engine import SpikeGuard, largest_share
from modules.model import VAE_Model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--F_dim", "16", "--L_dim", "8", "--N_dim", "4", "--D_out_dim", "16", "--val_vi_len", "20",
        "--batch_size", "2", "--device", "cpu", "--amp", "off"]
# Every schedule moves inside these 3 epochs (6 steps each, a checkpoint each), so a resume that
# restored any of them wrong shows in the metrics: cosine lr with warm-up (changes every step), Monotonic beta,
# a decaying teacher-forcing ratio with one coin per step, and Adam's state.
RUN = TINY + ["--num_epoch", "3", "--train_vi_len", "4", "--partial", "0.5", "--scheduler", "cosine",
              "--warmup_epochs", "1", "--kl_anneal_type", "Monotonic", "--tfr_sde", "1", "--tfr_d_step", "0.4",
              "--tf_mode", "step", "--per_save", "1"]
SHORT = TINY + ["--train_vi_len", "4", "--partial", "0.25"]  # 3 steps of 2 x 4 frames an epoch
# One thread in and out of process: the same arithmetic (so runs compare exactly), and no thread
# oversubscription on a 2-core CI machine.
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def dr(tiny_dance, tmp_path_factory):
    """A private copy of the tiny dataset (training writes its decoded-frame cache beside it)."""
    path = tmp_path_factory.mktemp("rel") / "DR"
    shutil.copytree(tiny_dance, path)
    return str(path)


@pytest.fixture(scope="module")
def baseline(dr, tmp_path_factory):
    """The uninterrupted 3-epoch run every resumed run must reproduce."""
    run = str(tmp_path_factory.mktemp("baseline") / "run")
    assert Trainer.main(["--DR", dr, *RUN, "--save_root", run]) == 0
    return run


def rows(run):
    """metrics.jsonl without the wall-clock time."""
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k != "time_s"} for line in f]


def digests(run):
    out = {}
    for path in sorted(glob.glob(os.path.join(run, "*.ckpt"))):
        with open(path, "rb") as f:
            out[os.path.basename(path)] = hashlib.sha256(f.read()).hexdigest()
    return out


def error_line(err):
    """The one `error: ...` line of stderr (and no traceback)."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def spawn(args, cwd, stdout=subprocess.PIPE):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "Trainer.py"), *map(str, args)], cwd=cwd,
                            env=ENV, stdout=stdout, stderr=subprocess.STDOUT, text=True)


class Lines:
    """A child's output read by a thread, so waiting for a line has a deadline."""

    def __init__(self, proc):
        self.queue, self.seen = queue.Queue(), []
        threading.Thread(target=self._pump, args=(proc.stdout,), daemon=True).start()

    def _pump(self, stream):
        for line in stream:  # text mode splits tqdm's \r updates into lines too
            self.queue.put(line)
        self.queue.put(None)

    def wait_for(self, pattern, timeout=120):
        deadline = time.time() + timeout
        while True:
            line = self.queue.get(timeout=max(deadline - time.time(), 0.01))
            if line is None:
                pytest.fail(f"exited before printing {pattern!r}:\n{''.join(self.seen)}")
            self.seen.append(line)
            found = re.search(pattern, line)
            if found:
                return found

    def rest(self):
        while (line := self.queue.get(timeout=60)) is not None:
            self.seen.append(line)
        return "".join(self.seen)


def run_from(baseline, epoch, run):
    """A run folder as the baseline left it after `epoch` epochs (its checkpoint and rows)."""
    os.makedirs(run)
    shutil.copy(os.path.join(baseline, f"epoch_{epoch}.ckpt"), os.path.join(run, "last.ckpt"))
    with open(os.path.join(baseline, "metrics.jsonl")) as f, open(os.path.join(run, "metrics.jsonl"), "w") as g:
        g.writelines(f.readlines()[:epoch])
    return run


def signal_mid_epoch(proc, epoch, sig):
    """Send `sig` once the progress bar shows a step of `epoch` done and more to come."""
    lines = Lines(proc)
    lines.wait_for(rf"epoch {epoch}/3:.*\| [1-5]/6 \[")
    proc.send_signal(sig)
    return proc.wait(timeout=120), lines.rest()


# ----------------------------------------------------------------------------- Ctrl-C, SIGTERM

def test_ctrl_c_and_sigterm_save_mid_epoch_and_resume_exactly(baseline, tmp_path):
    run = run_from(baseline, 1, str(tmp_path / "run"))
    last = os.path.join(run, "last.ckpt")
    rc, out = signal_mid_epoch(spawn(["--resume", run], tmp_path), 2, signal.SIGINT)
    assert rc == 130, out
    assert "SIGINT received" in out and "Traceback" not in out
    ckpt = load_checkpoint(last)
    assert ckpt["epoch"] == 1 and ckpt["progress"]["step"] >= 1  # inside epoch 2
    # The run says how to resume; that command, as printed, continues it.
    command = re.search(r"Resume with: python Trainer.py (.+)", out).group(1).split()
    assert command == ["--resume", run]

    rc, out = signal_mid_epoch(spawn(command, tmp_path), 3, signal.SIGTERM)
    assert rc == 143, out
    assert f"Resuming {last} at epoch 2, step {ckpt['progress']['step']}" in out and "SIGTERM received" in out
    ckpt = load_checkpoint(last)
    assert ckpt["epoch"] == 2 and ckpt["progress"]["step"] >= 1

    assert Trainer.main(["--ckpt_path", last]) == 0
    assert rows(run) == rows(baseline)


# ----------------------------------------------------------------------------- kill -9

def kill_at_write(proc, run, nth):
    """SIGKILL the moment the `nth` checkpoint write of this process opens its temporary file."""
    seen = set()
    while proc.poll() is None:
        seen.update(n for n in os.listdir(run) if n.endswith(f".ckpt.tmp{proc.pid}"))
        if len(seen) >= nth:
            proc.kill()
            break
        time.sleep(0.0002)
    return proc.wait(timeout=60)


def check_nothing_lost(run, pid):
    """Every checkpoint on disk loads; a temporary file is the only casualty. Returns whether the
    kill caught process `pid` inside a write."""
    names = os.listdir(run)
    for name in names:
        if name.endswith(".ckpt"):
            load_checkpoint(os.path.join(run, name))
        else:
            assert re.search(r"\.tmp\d+$", name) or name in ("args.json", "metrics.jsonl") \
                or name.startswith("events."), name
    return any(n.endswith(f".ckpt.tmp{pid}") for n in names)


def test_kill_9_at_any_moment_loses_nothing_and_resumes_exactly(baseline, tmp_path):
    run = run_from(baseline, 2, str(tmp_path / "run"))
    # Inside the second checkpoint write at the end of epoch 3 (of best.ckpt, epoch_3.ckpt,
    # last.ckpt): after the metrics row and maybe a checkpoint, before the epoch is committed.
    with open(tmp_path / "log.txt", "w") as log:
        proc = spawn(["--resume", run], tmp_path, stdout=log)
        rc = kill_at_write(proc, run, 2)
    assert rc == -signal.SIGKILL, (tmp_path / "log.txt").read_text()
    assert check_nothing_lost(run, proc.pid)
    assert load_checkpoint(os.path.join(run, "last.ckpt"))["epoch"] == 2
    # At a random moment of the epoch: a step, validation or a write (or just after the end).
    proc = spawn(["--resume", run], tmp_path)
    Lines(proc).wait_for("Resuming")
    time.sleep(random.Random(os.getpid()).uniform(0.0, 1.5))
    proc.kill()
    assert proc.wait(timeout=60) in (-signal.SIGKILL, 0)
    check_nothing_lost(run, proc.pid)

    assert Trainer.main(["--ckpt_path", os.path.join(run, "last.ckpt")]) == 0
    assert rows(run) == rows(baseline)


def test_resume_finds_the_newest_checkpoint_without_last_ckpt(baseline, tmp_path, capsys):
    """A crash can leave a folder without last.ckpt (it is written last): --resume takes the
    newest checkpoint there is, and says so when there is none."""
    run = str(tmp_path / "run")
    os.makedirs(run)
    assert Trainer.main(["--resume", run]) == 2
    assert "no checkpoint (*.ckpt) in that folder, so nothing to resume" in error_line(capsys.readouterr().err)
    for epoch in (1, 2):
        shutil.copy2(os.path.join(baseline, f"epoch_{epoch}.ckpt"), run)
    assert Trainer.main(["--resume", run, "--num_epoch", "2"]) == 0  # nothing left to train
    assert f"all 2 epochs of {run} are done (newest checkpoint {os.path.join(run, 'epoch_2.ckpt')})" \
        in capsys.readouterr().out


def test_resuming_a_finished_run_says_so_and_writes_nothing(baseline, tmp_path, capsys):
    """It printed 'Training on ...' then 'Done' (and rewrote args.json, added an event file)."""
    run = str(tmp_path / "run")
    shutil.copytree(baseline, run)
    before = {n: os.path.getmtime(os.path.join(run, n)) for n in os.listdir(run)}
    for more in ([], ["--num_epoch", "2"]):
        assert Trainer.main(["--resume", run, *more]) == 0
        out = capsys.readouterr().out
        assert out == f"all 3 epochs of {run} are done (newest checkpoint {os.path.join(run, 'last.ckpt')}); " \
                      "raise --num_epoch above 3 to train more\n"
    assert {n: os.path.getmtime(os.path.join(run, n)) for n in os.listdir(run)} == before
    last = os.path.join(run, "last.ckpt")
    assert Trainer.main(["--ckpt_path", last]) == 0
    assert capsys.readouterr().out == f"all 3 epochs of {last} are done; raise --num_epoch above 3 to train more\n"


def test_a_resume_keeps_this_machines_and_this_commands_own_flags(tmp_path):
    """A resume takes the run's flags from its checkpoint, except the flags given on its command
    line and those of the machine or the invocation (README: --device, --gpu, --num_workers,
    --no_cache, --log_every; --save_root, --overwrite, --test, ...): a run started on cuda:3 and
    resumed on a CPU-only machine was sent to cuda:3, and a resume took the run's --overwrite."""
    path = tmp_path / "last.ckpt"
    stored = {"device": "cuda:3", "gpu": 2, "num_workers": 9, "no_cache": True, "log_every": 3,
              "save_root": "elsewhere", "overwrite": True, "test": True, "resume": "x", "ckpt_path": "y",
              "lr": 0.5, "tfr_sde": 7, "per_save": 4, "val_every": 2, "kl_anneal_type": "Full_KL",
              "tf_mode": "frame", "skip_spikes": 0.0, "max_nan_steps": 9, "fast_train": True}
    save_checkpoint(path, {"model": {"w": torch.zeros(1)}, "args": stored})
    argv = ["--ckpt_path", str(path), "--per_save", "5"]
    args = Trainer.trainer_parser().parse_args(argv)
    Trainer.adopt_run_args(args, argv)
    assert (args.device, args.gpu, args.num_workers, args.no_cache, args.log_every) == (None, 1, None, False, 20)
    assert (args.save_root, args.overwrite, args.test, args.resume, args.ckpt_path) == \
        (None, False, False, None, str(path))
    assert (args.lr, args.tfr_sde, args.val_every, args.kl_anneal_type, args.tf_mode, args.skip_spikes,
            args.max_nan_steps, args.fast_train) == (0.5, 7, 2, "Full_KL", "frame", 0.0, 9, True)
    assert args.per_save == 5  # given here


# ----------------------------------------------------------------------------- NaN / Inf

def test_nonfinite_steps_are_skipped_counted_and_a_streak_stops_the_run(dr, tmp_path, monkeypatch, capsys):
    """3 steps an epoch: forward call 2 turns NaN (skipped, counted, run goes on), then every call
    from 5 on: 2 bad steps end epoch 2 and 2 more start epoch 3, a streak of 4 = --max_nan_steps
    across the epoch boundary."""
    forward, calls = VAE_Model.forward, []

    def poisoned(self, *a, **kw):
        out = forward(self, *a, **kw)
        calls.append(1)
        if len(calls) == 2 or len(calls) >= 5:
            out = dict(out, loss=out["loss"] * float("nan"))
        return out

    monkeypatch.setattr(VAE_Model, "forward", poisoned)
    run = str(tmp_path / "run")
    handler = signal.getsignal(signal.SIGINT)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = Trainer.main(["--DR", dr, *SHORT, "--num_epoch", "4", "--max_nan_steps", "4", "--save_root", run])
    err = capsys.readouterr().err
    assert rc == 2
    line = error_line(err)
    assert "4 consecutive non-finite losses at epoch 3" in line and "--lr" in line
    assert f"the last good checkpoint, {os.path.join(run, 'last.ckpt')}, is intact" in line
    skipped = [str(w.message) for w in caught if "non-finite" in str(w.message)]
    assert len(skipped) == 5 and "step skipped" in skipped[0]
    first, second = rows(run)
    assert (first["nan_skipped"], first["steps"], second["nan_skipped"], second["steps"]) == (1, 2, 2, 1)
    assert all(map(torch.isfinite, (torch.tensor(first["loss"]), torch.tensor(second["loss"]))))
    ckpt = load_checkpoint(os.path.join(run, "last.ckpt"))
    assert ckpt["epoch"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert signal.getsignal(signal.SIGINT) is handler  # main() put the Ctrl-C handler back


def test_a_resume_at_an_epoch_boundary_keeps_the_streak_of_bad_steps(dr, tmp_path, monkeypatch, capsys):
    """Epoch 2 ends with 2 bad steps in a row; resumed from its checkpoint with every step bad, the
    run stops after 2 more (a streak of 4 = --max_nan_steps), as it would have without the stop.
    The count was kept in mid-epoch checkpoints only, so the resume stopped an epoch later."""
    forward, calls, bad = VAE_Model.forward, [], {"from": None}

    def poisoned(self, *a, **kw):
        out = forward(self, *a, **kw)
        calls.append(1)
        if len(calls) >= 5 or (bad["from"] is not None and len(calls) >= bad["from"]):
            out = dict(out, loss=out["loss"] * float("nan"))
        return out

    monkeypatch.setattr(VAE_Model, "forward", poisoned)
    run = str(tmp_path / "run")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert Trainer.main(["--DR", dr, *SHORT, "--num_epoch", "2", "--max_nan_steps", "4", "--save_root", run]) == 0
        assert load_checkpoint(os.path.join(run, "last.ckpt"))["nan_run"] == 2
        calls.clear()
        bad["from"] = 1
        rc = Trainer.main(["--resume", run, "--num_epoch", "4"])
    assert rc == 2
    assert "4 consecutive non-finite losses at epoch 3" in error_line(capsys.readouterr().err)


@pytest.mark.parametrize("flags, message", [
    (["--per_save", "0"], "--per_save must be positive, got 0"),
    (["--val_every", "0"], "--val_every must be positive, got 0"),
    (["--val_every", "-2"], "--val_every must be positive, got -2"),
    (["--max_nan_steps", "0"], "--max_nan_steps must be positive, got 0"),
    (["--log_every", "0"], "--log_every must be positive, got 0"),
])
def test_training_control_flags_out_of_range_are_one_line(dr, tmp_path, capsys, flags, message):
    """Refused before any work: --per_save 0 or --val_every 0 divided by zero after the first
    epoch's training (a traceback, the epoch lost)."""
    run = tmp_path / "run"
    assert Trainer.main(["--DR", dr, *SHORT, "--num_epoch", "1", *flags, "--save_root", str(run)]) == 2
    assert message in error_line(capsys.readouterr().err)
    assert not run.exists()


def test_a_real_divergence_stops_with_a_message(dr, tmp_path, capsys):
    """No patching: a learning rate of 1e12 blows the weights up after one step."""
    with pytest.warns(UserWarning, match="non-finite loss or gradient; step skipped"):
        rc = Trainer.main(["--DR", dr, *SHORT, "--num_epoch", "2", "--lr", "1e12", "--max_nan_steps", "2",
                           "--save_root", str(tmp_path / "run")])
    assert rc == 2
    line = error_line(capsys.readouterr().err)
    assert "2 consecutive non-finite losses at epoch 1" in line and "no checkpoint had been written yet" in line


def spike_after(monkeypatch, steps):
    """Training steps after the first `steps` report a loss and error 1e6 times the true ones."""
    forward, calls = VAE_Model.forward, []

    def spiked(self, *a, **kw):
        out = forward(self, *a, **kw)
        calls.append(1)
        return dict(out, loss=out["loss"] * 1e6, recon=out["recon"] * 1e6) if len(calls) > steps else out

    monkeypatch.setattr(VAE_Model, "forward", spiked)


def test_a_finite_loss_spike_is_told_once(dr, tmp_path, monkeypatch, capsys):
    """An epoch whose training error is over 100x the lowest so far (finite, so no step is
    skipped): one note that training diverged, naming best.ckpt; then the run goes on."""
    spike_after(monkeypatch, 3)
    run = str(tmp_path / "run")
    assert Trainer.main(["--DR", dr, *SHORT, "--num_epoch", "3", "--save_root", run]) == 0
    out = capsys.readouterr().out
    # Told once, at the end of epoch 2's steps (its 3 steps are fewer than --log_every: one window).
    notes = [l for l in out.splitlines() if l.startswith("note: the ")]
    assert len(notes) == 1 and notes[0].startswith("note: the last 3 steps' training mse"), out
    first, second, third = rows(run)
    assert second["mse"] > 1e5 * first["mse"] and len(notes) == 1
    assert "training diverged" in notes[0] and os.path.join(run, "best.ckpt") in notes[0] and "--lr" in notes[0]
    assert Trainer.spike_note("mse", 0.5, 0.01, 30.0, run, "x") is None  # 50x: rough, not a divergence
    assert Trainer.spike_note("mse", float("nan"), 0.01, 30.0, run, "x") is None


def test_a_loss_spike_in_the_first_epoch_is_told_at_the_next_log_point(dr, tmp_path, monkeypatch, capsys):
    """Within an epoch (the first has no epoch before it to compare with), the mean error of each
    --log_every window against the lowest window so far: one note at the first window 100x it."""
    spike_after(monkeypatch, 4)
    run = str(tmp_path / "run")
    assert Trainer.main(["--DR", dr, *SHORT, "--partial", "1", "--num_epoch", "1", "--log_every", "2",
                         "--save_root", run]) == 0  # 12 steps; steps 5 on spike
    out = capsys.readouterr().out
    notes = [l for l in out.splitlines() if l.startswith("note: the ")]  # (not the KL schedule's note)
    assert len(notes) == 1 and notes[0].startswith("note: the last 2 steps' training mse is")
    assert "training diverged" in notes[0] and "no model has been validated yet" in notes[0]
    assert out.index(notes[0]) < out.index("epoch 1/1 |")  # told before the epoch ended


def test_a_loss_spike_after_the_last_log_point_of_an_epoch_is_told(dr, tmp_path, monkeypatch, capsys):
    """The steps after an epoch's last multiple of --log_every were never watched: 6 steps with
    --log_every 4 and a spike from step 5 ended without a note."""
    spike_after(monkeypatch, 4)
    run = str(tmp_path / "run")
    assert Trainer.main(["--DR", dr, *SHORT, "--partial", "0.5", "--num_epoch", "1", "--log_every", "4",
                         "--save_root", run]) == 0  # 6 steps; steps 5 and 6 spike
    out = capsys.readouterr().out
    notes = [l for l in out.splitlines() if l.startswith("note: the ")]
    # Judged over the last 4 steps (5 and 6 with the 2 before them), as a log window would be.
    assert len(notes) == 1 and notes[0].startswith("note: the last 4 steps' training mse is"), out
    assert out.index(notes[0]) < out.index("epoch 1/1 |")


def test_one_hard_step_after_the_last_log_point_is_not_a_divergence(dr, tmp_path, monkeypatch, capsys):
    """The steps after an epoch's last log point were judged alone: one hard step (300x, as a
    rough batch can be) there made a 1-step window 100x the lowest mean of 11 and a false
    'training diverged'. It reaches back into the window before it now."""
    forward, calls = VAE_Model.forward, []

    def one_hard_step(self, *a, **kw):
        out = forward(self, *a, **kw)
        calls.append(1)
        return dict(out, recon=out["recon"] * 300) if len(calls) == 12 else out
    monkeypatch.setattr(VAE_Model, "forward", one_hard_step)
    assert Trainer.main(["--DR", dr, *SHORT, "--partial", "1", "--num_epoch", "1", "--log_every", "11",
                         "--skip_spikes", "0", "--save_root", str(tmp_path / "run")]) == 0  # 12 steps
    assert "training diverged" not in capsys.readouterr().out


def test_small_errors_after_a_spike_are_measured_exactly(dr, tmp_path, monkeypatch, capsys):
    """The error of a log window was the difference of two running float32 sums: after one huge
    step the small steps that followed came out as 0, 0 became the lowest window, and the next
    spike divided by it (ZeroDivisionError, a 12-epoch CPU run stopped in its fifth epoch)."""
    forward, calls, seen = VAE_Model.forward, [], []

    def spiked(self, *a, **kw):
        out = forward(self, *a, **kw)
        calls.append(1)
        return dict(out, loss=out["loss"] * 1e12, recon=out["recon"] * 1e12) if len(calls) in (3, 5) else out
    monkeypatch.setattr(VAE_Model, "forward", spiked)
    real_note = Trainer.spike_note

    def note(recon_name, recon, lowest, *a, **kw):
        seen.append((recon, lowest))
        return real_note(recon_name, recon, lowest, *a, **kw)
    monkeypatch.setattr(Trainer, "spike_note", note)
    run = str(tmp_path / "run")
    assert Trainer.main(["--DR", dr, *SHORT, "--partial", "1", "--num_epoch", "1", "--log_every", "1",
                         "--save_root", run]) == 0
    windows = [recon for recon, _ in seen]  # one per step
    assert len(seen) == 12 and windows[2] > 1e9 and windows[4] > 1e9
    assert all(0 < w < 1 for i, w in enumerate(windows) if i not in (2, 4))  # none lost to rounding
    assert Trainer.spike_note("mse", 1.0, 0.0, 30.0, run, "x") is None  # no scale to compare with
    assert sum(l.startswith("note: the last step's training mse") for l in capsys.readouterr().out.splitlines()) == 1


def test_a_divergence_by_steps_of_10x_is_told(dr, tmp_path, monkeypatch, capsys):
    """The note compares a window with the lowest window so far, not with the one before it: an
    error growing 10x a step (each window only 10x its predecessor) is 1000x the lowest by step 6."""
    forward, calls = VAE_Model.forward, []

    def growing(self, *a, **kw):
        out = forward(self, *a, **kw)
        calls.append(1)
        return dict(out, recon=out["recon"] * 10.0 ** max(0, len(calls) - 3))  # the loss trains as before
    monkeypatch.setattr(VAE_Model, "forward", growing)
    assert Trainer.main(["--DR", dr, *SHORT, "--partial", "0.5", "--num_epoch", "1", "--log_every", "1",
                         "--save_root", str(tmp_path / "run")]) == 0  # 6 steps: 1, 1, 1, 10, 100, 1000 x
    notes = [l for l in capsys.readouterr().out.splitlines() if "training diverged" in l]
    assert len(notes) == 1 and notes[0].startswith("note: the last step's training mse"), notes


def scaled_training_steps(monkeypatch, scale):
    """Every training forward's loss times scale(step number from 1, teacher_forcing); returns the
    count of optimizer updates taken and the list of teacher_forcing values seen."""
    forward, seen, taken = VAE_Model.forward, [], []

    def scaled(self, img, label, teacher_forcing=True, *a, **kw):
        out = forward(self, img, label, teacher_forcing, *a, **kw)
        if not self.training:
            return out
        seen.append(teacher_forcing)
        return dict(out, loss=out["loss"] * scale(len(seen), teacher_forcing))
    monkeypatch.setattr(VAE_Model, "forward", scaled)
    step = torch.optim.Adam.step

    def counted(self, *a, **kw):
        taken.append(1)
        return step(self, *a, **kw)
    monkeypatch.setattr(torch.optim.Adam, "step", counted)
    monkeypatch.setattr(SpikeGuard, "WARMUP", 3)  # the tiny epoch has 12 steps, not the 50 it waits for
    return taken, seen


def outlier_updates(monkeypatch, steps):
    """The training steps numbered in `steps` (1, 2, ...) get a loss 1e4 times the true one, so a
    gradient norm 1e4 times larger; returns the count of optimizer updates taken."""
    return scaled_training_steps(monkeypatch, lambda n, tf: 1e4 if n in steps else 1.0)[0]


def test_an_outlier_update_is_skipped(dr, tmp_path, monkeypatch, capsys):
    """A step whose gradient norm is over --skip_spikes times the recent average is not taken (a
    12-epoch CPU run lost 5 dB of validation to one such update, docs/RESULTS.md): one note naming
    the step, the count in metrics.jsonl, and every other step's update taken."""
    taken = outlier_updates(monkeypatch, {7})
    run = str(tmp_path / "run")
    assert Trainer.main(["--DR", dr, *SHORT, "--partial", "1", "--num_epoch", "1", "--save_root", run]) == 0
    notes = [l for l in capsys.readouterr().out.splitlines() if "update skipped" in l]
    assert len(taken) == 11 and rows(run)[0]["spikes_skipped"] == 1 and rows(run)[0]["nan_skipped"] == 0
    assert len(notes) == 1 and notes[0].startswith("note: epoch 1 step 6: gradient norm")
    assert "x the recent average" in notes[0] and "--skip_spikes 10" in notes[0]
    share, name = re.search(r"; (\d+)% of its square in ([\w.]+)$", notes[0]).groups()
    assert 0 < int(share) <= 100 and name in dict(VAE_Model().named_parameters())


def test_the_skip_note_names_where_the_gradient_lies():
    """largest_share names the parameter with the largest part of the squared gradient norm: the
    posterior's last bias when the KL pulls its mean back (the case of docs/RESULTS.md)."""
    model = VAE_Model(16, 8, 4, 16)
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-4)
    bias = model.Gaussian_Predictor[-1].bias
    bias.grad = torch.full_like(bias, 3.0)
    name, share = largest_share(model.named_parameters())
    total = sum(p.grad.pow(2).sum() for p in model.parameters())
    assert name == "Gaussian_Predictor.6.bias" and share == pytest.approx((bias.grad.pow(2).sum() / total).item())
    assert 0.99 < share < 1
    model.Generator[-1].weight.grad = torch.full_like(model.Generator[-1].weight, 10.0)
    assert largest_share(model.named_parameters())[0] == "Generator.7.weight"


def test_without_the_guard_every_update_is_taken(dr, tmp_path, monkeypatch, capsys):
    taken = outlier_updates(monkeypatch, {7})
    run = str(tmp_path / "run")
    assert Trainer.main(["--DR", dr, *SHORT, "--partial", "1", "--num_epoch", "1", "--skip_spikes", "0",
                         "--save_root", run]) == 0
    assert len(taken) == 12 and rows(run)[0]["spikes_skipped"] == 0
    assert "update skipped" not in capsys.readouterr().out


def test_a_lasting_change_of_the_gradient_scale_is_followed(dr, tmp_path, monkeypatch, capsys):
    """Every step from the 5th on at the new scale (as when an epoch turns teacher forcing off): the
    guard skips RUN - 1 of them, then takes the next and measures from it, so training goes on."""
    taken = outlier_updates(monkeypatch, set(range(5, 13)))
    run = str(tmp_path / "run")
    assert Trainer.main(["--DR", dr, *SHORT, "--partial", "1", "--num_epoch", "1", "--save_root", run]) == 0
    assert rows(run)[0]["spikes_skipped"] == SpikeGuard.RUN - 1 and len(taken) == 12 - (SpikeGuard.RUN - 1)


def test_a_resume_keeps_the_guards_reference(dr, tmp_path, monkeypatch):
    """The guard's average is in the checkpoints: a run resumed before an outlier skips it as the
    uninterrupted run does (it warmed up afresh, took that update and trained on differently)."""
    forward = VAE_Model.forward

    def outlier_at_training_step(n):
        calls = []

        def spiked(self, *a, **kw):
            out = forward(self, *a, **kw)
            calls.append(self.training)
            return dict(out, loss=out["loss"] * 1e4) if self.training and sum(calls) == n else out
        monkeypatch.setattr(VAE_Model, "forward", spiked)
    monkeypatch.setattr(SpikeGuard, "WARMUP", 3)
    argv = ["--DR", dr, *SHORT, "--partial", "1", "--num_epoch", "2", "--per_save", "1"]
    whole = str(tmp_path / "whole")
    outlier_at_training_step(12 + 2)  # epoch 2, step 2
    assert Trainer.main([*argv, "--save_root", whole]) == 0
    assert [r["spikes_skipped"] for r in rows(whole)] == [0, 1]
    resumed = run_from(whole, 1, str(tmp_path / "resumed"))
    assert load_checkpoint(os.path.join(resumed, "last.ckpt"))["spike_guard"]["kinds"]["teacher_forced"]["taken"] == 12
    outlier_at_training_step(2)  # the same step, counted from the resume
    assert Trainer.main(["--resume", resumed]) == 0
    assert rows(resumed) == rows(whole)


def test_free_running_steps_are_compared_with_free_running_steps(dr, tmp_path, monkeypatch, capsys):
    """Free-running steps have gradients 11-26x the teacher-forced ones (the report's grid, a coin
    per epoch, docs/RESULTS.md); with a coin per step the two kinds alternate. The guard keeps a
    reference for each kind, so none of them is skipped as a spike (here 1000x)."""
    taken, seen = scaled_training_steps(monkeypatch, lambda n, tf: 1.0 if tf else 1e3)
    run = str(tmp_path / "run")
    assert Trainer.main(["--DR", dr, *SHORT, "--partial", "1", "--num_epoch", "1", "--tf_mode", "step",
                         "--tfr", "0.8", "--seed", "3", "--save_root", run]) == 0
    # Meaningful only if a free-running step comes after the warm-up of teacher-forced ones alone.
    assert seen[:seen.index(False)].count(True) >= SpikeGuard.WARMUP
    assert rows(run)[0]["spikes_skipped"] == 0 and len(taken) == 12
    assert "update skipped" not in capsys.readouterr().out


def test_an_outlier_among_free_running_steps_is_skipped(dr, tmp_path, monkeypatch, capsys):
    """Free-running steps have their own reference, and it catches an outlier among them."""
    taken, seen = scaled_training_steps(monkeypatch, lambda n, tf: 1e4 if n == 7 else 1.0)
    run = str(tmp_path / "run")
    assert Trainer.main(["--DR", dr, *SHORT, "--partial", "1", "--num_epoch", "1", "--tfr", "0",
                         "--save_root", run]) == 0
    assert set(seen) == {False} and rows(run)[0]["spikes_skipped"] == 1 and len(taken) == 11
    notes = [l for l in capsys.readouterr().out.splitlines() if "update skipped" in l]
    assert len(notes) == 1 and "x the recent average of free-running steps (" in notes[0]


@pytest.mark.parametrize("kl, skipped", [("Monotonic", 0), ("Full_KL", SpikeGuard.RUN - 1)])
def test_a_new_beta_restarts_the_reference(dr, tmp_path, monkeypatch, kl, skipped):
    """Every step of epoch 2 at 1e4 times the scale of epoch 1. Monotonic beta changes between the
    epochs (0, then 0.5): a new objective, whose norms are not compared with the old one's, so
    nothing is skipped (after an epoch at beta 0 the KL's first pull was 135-142x the norm before it,
    docs/RESULTS.md). Full_KL keeps beta at 1: the same change is a lasting change of scale,
    followed after RUN - 1 skipped updates as before."""
    taken, _ = scaled_training_steps(monkeypatch, lambda n, tf: 1e4 if n > 12 else 1.0)
    run = str(tmp_path / "run")
    assert Trainer.main(["--DR", dr, *SHORT, "--partial", "1", "--num_epoch", "2", "--kl_anneal_type", kl,
                         "--save_root", run]) == 0
    assert [r["beta"] for r in rows(run)] == ([0.0, 0.5] if kl == "Monotonic" else [1.0, 1.0])
    assert [r["spikes_skipped"] for r in rows(run)] == [0, skipped] and len(taken) == 24 - skipped


def test_the_guards_state_is_plain_data_and_decides_the_same():
    """state() -> checkpoint -> SpikeGuard(k, state) gives the same decisions; a state written
    before the kinds (one reference) becomes every kind's."""
    g = SpikeGuard(10)
    g.begin_epoch(0.5)
    for kind, norm in [("teacher_forced", 1.0), ("free_running", 20.0)] * SpikeGuard.WARMUP:
        g.took(torch.tensor(norm), kind)
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"guard_{os.getpid()}.pt")
    torch.save(g.state(), path)
    try:
        h = SpikeGuard(10, torch.load(path, weights_only=True))
    finally:
        os.remove(path)
    for guard in (g, h):
        assert guard.is_spike(torch.tensor(15.0), "teacher_forced")
        assert not guard.is_spike(torch.tensor(15.0), "free_running")
        assert guard.is_spike(torch.tensor(250.0), "free_running")
        assert not guard.is_spike(torch.tensor(1e6), "all")  # a kind not seen yet warms up first
    h.begin_epoch(0.5)  # the same beta: nothing restarts
    assert h.is_spike(torch.tensor(15.0), "teacher_forced")
    h.begin_epoch(0.6)  # a new one: the next update is taken and measured from
    assert not h.is_spike(torch.tensor(15.0), "teacher_forced")
    h.took(torch.tensor(15.0), "teacher_forced")
    assert not h.is_spike(torch.tensor(100.0), "teacher_forced") and h.is_spike(torch.tensor(200.0), "teacher_forced")
    old = SpikeGuard(10, {"ref": 2.0, "taken": 60, "run": 0})
    assert all(old.is_spike(torch.tensor(25.0), k) and not old.is_spike(torch.tensor(15.0), k) for k in SpikeGuard.KINDS)


# ----------------------------------------------------------------------------- out of memory

@pytest.mark.parametrize("error", [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory")])
def test_out_of_memory_saves_the_position_and_names_the_fix(baseline, dr, tmp_path, monkeypatch, capsys, error):
    """A step that runs out of memory (CUDA's error, or the CPU allocator's) stops the run with one
    line naming --grad_ckpt and the resume command; the position before that step is saved, and
    the resumed run matches the uninterrupted one exactly."""
    forward, calls = VAE_Model.forward, []

    def hungry(self, *a, **kw):
        calls.append(1)
        if len(calls) == 9:  # epoch 2, step 2 (6 steps an epoch)
            raise error
        return forward(self, *a, **kw)

    monkeypatch.setattr(VAE_Model, "forward", hungry)
    run = str(tmp_path / "run")
    assert Trainer.main(["--DR", dr, *RUN, "--save_root", run]) == 2
    line = error_line(capsys.readouterr().err)
    last = os.path.join(run, "last.ckpt")
    assert "out of memory at epoch 2, step 2 (batch 2 x 4 frames on cpu)" in line
    assert f"the position is saved in {last}" in line
    assert f"python Trainer.py --resume {run} --grad_ckpt" in line and str(error).split(".")[0] in line
    ckpt = load_checkpoint(last)
    assert ckpt["epoch"] == 1 and ckpt["progress"]["step"] == 2 and "oom" not in ckpt["progress"]
    monkeypatch.setattr(VAE_Model, "forward", forward)
    assert Trainer.main(["--resume", run]) == 0
    assert rows(run) == rows(baseline)


def test_a_resumed_epoch_counts_its_time_before_the_stop(dr, tmp_path, monkeypatch):
    """time_s of an epoch stopped and resumed covered only the steps after the resume."""
    forward, calls = VAE_Model.forward, []

    def slow_then_out_of_memory(self, *a, **kw):
        calls.append(1)
        if len(calls) in (7, 8):  # epoch 2, steps 0 and 1 (6 steps an epoch): 1.2 s before the stop
            time.sleep(0.6)
        if len(calls) == 9:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory.")
        return forward(self, *a, **kw)
    monkeypatch.setattr(VAE_Model, "forward", slow_then_out_of_memory)
    run = str(tmp_path / "run")
    assert Trainer.main(["--DR", dr, *RUN, "--save_root", run]) == 2
    assert load_checkpoint(os.path.join(run, "last.ckpt"))["progress"]["time_s"] >= 1.2
    monkeypatch.setattr(VAE_Model, "forward", forward)
    assert Trainer.main(["--resume", run]) == 0
    with open(os.path.join(run, "metrics.jsonl")) as f:
        assert json.loads(f.readlines()[1])["time_s"] >= 1.2


def events(run, tag="train/loss"):
    """The epochs TensorBoard shows for `tag` in a run folder, as its reader resolves them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(run)
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def test_tensorboard_keeps_every_epoch_through_a_stop_anywhere(baseline, tmp_path, monkeypatch):
    """Two ways TensorBoard lost epochs for good: a run taken back to an earlier checkpoint hid the
    later epochs' events as it started (a stop before its first epoch ended then lost them, while
    metrics.jsonl kept its rows); and an epoch's events were written after last.ckpt, so a stop in
    between left that epoch out of the curves."""
    run = str(tmp_path / "run")
    shutil.copytree(baseline, run)
    assert events(run) == [1, 2, 3]
    train_one_epoch = Trainer.train_one_epoch

    def interrupted(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(Trainer, "train_one_epoch", interrupted)
    assert Trainer.main(["--ckpt_path", os.path.join(run, "epoch_1.ckpt")]) == 130
    assert events(run) == [1, 2, 3] and [r["epoch"] for r in rows(run)] == [1, 2, 3]

    monkeypatch.setattr(Trainer, "train_one_epoch", train_one_epoch)
    log_epoch = Trainer.log_epoch

    def killed_while_logging(writer, row, val):
        if row["epoch"] == 3:
            raise KeyboardInterrupt
        log_epoch(writer, row, val)
    monkeypatch.setattr(Trainer, "log_epoch", killed_while_logging)
    assert Trainer.main(["--ckpt_path", os.path.join(run, "epoch_1.ckpt")]) == 130
    monkeypatch.setattr(Trainer, "log_epoch", log_epoch)
    assert Trainer.main(["--resume", run]) == 0
    assert events(run) == [1, 2, 3] and events(run, "val/psnr") == [1, 2, 3]
    assert [r["epoch"] for r in rows(run)] == [1, 2, 3]


def test_a_first_epoch_stopped_before_its_checkpoint_is_logged_once(dr, tmp_path, monkeypatch):
    """Epoch 1's events are written before its checkpoint; a stop in between and the same command
    again gave TensorBoard two points at epoch 1 (nothing was hidden for a run starting at 0)."""
    real = Trainer.save_checkpoint

    def stopped(path, state):
        if os.path.basename(path) == "last.ckpt" and state["epoch"] == 1:
            raise KeyboardInterrupt
        real(path, state)
    run = str(tmp_path / "run")
    argv = ["--DR", dr, *SHORT, "--num_epoch", "2", "--val_every", "2", "--save_root", run]
    monkeypatch.setattr(Trainer, "save_checkpoint", stopped)
    assert Trainer.main(argv) == 130
    monkeypatch.setattr(Trainer, "save_checkpoint", real)
    assert Trainer.main(argv) == 0
    assert events(run) == [1, 2] and [r["epoch"] for r in rows(run)] == [1, 2]


def scalars(run, tag):
    """(epoch, value) of every point TensorBoard shows for `tag` in a run folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(run, size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_rows_and_tensorboard_hold_each_epochs_schedule_values(baseline):
    """RUN's schedules, by hand: Monotonic beta over 3 epochs (ratio 1) rises by 1/3 an epoch; tfr 1
    drops by 0.4 after every epoch from the first; an epoch's lr is its last step's (6 steps), cosine
    with 1 epoch of warm-up from 1e-3 down to 0 over the 2 after it. metrics.jsonl and TensorBoard
    show each epoch's values, and the loss is the error plus that epoch's beta times the KL."""
    beta, tfr = [0.0, 1 / 3, 2 / 3], [1.0, 0.6, 0.2]
    lr = [1e-3 * (5 / 6 + 1e-3) / (1 + 1e-3)] + [1e-3 * 0.5 * (1 + math.cos(math.pi * t)) for t in (5 / 12, 11 / 12)]
    got = rows(baseline)
    assert [r["beta"] for r in got] == pytest.approx(beta) and [r["tfr"] for r in got] == pytest.approx(tfr)
    assert [r["lr"] for r in got] == pytest.approx(lr, rel=1e-9)
    assert [r["steps"] for r in got] == [6, 6, 6]
    for r, b in zip(got, beta):
        assert r["loss"] == pytest.approx(r["mse"] + b * r["kl"], rel=1e-5)
    for tag, key in (("train/loss", "loss"), ("train/mse", "mse"), ("train/kl", "kl"), ("train/beta", "beta"),
                     ("train/tfr", "tfr"), ("train/lr", "lr"), ("val/psnr", "val_psnr"), ("val/loss", "val_loss")):
        points = scalars(baseline, tag)
        assert [step for step, _ in points] == [1, 2, 3], tag
        assert [v for _, v in points] == pytest.approx([r[key] for r in got], rel=1e-6), tag  # (float32)


def test_checkpoints_and_validations_follow_per_save_and_val_every(dr, tmp_path):
    """--per_save 2 --val_every 3 over 4 epochs: epoch_2.ckpt and epoch_4.ckpt, validations after
    epochs 3 and 4 (the last epoch is always validated), best.ckpt the better of the two."""
    run = str(tmp_path / "run")
    assert Trainer.main(["--DR", dr, *SHORT, "--num_epoch", "4", "--per_save", "2", "--val_every", "3",
                         "--save_root", run]) == 0
    assert sorted(n for n in os.listdir(run) if n.endswith(".ckpt")) == \
        ["best.ckpt", "epoch_2.ckpt", "epoch_4.ckpt", "last.ckpt"]
    assert [load_checkpoint(os.path.join(run, n))["epoch"] for n in ("epoch_2.ckpt", "epoch_4.ckpt", "last.ckpt")] \
        == [2, 4, 4]
    got = rows(run)
    assert [r["epoch"] for r in got] == [1, 2, 3, 4]
    assert ["val_psnr" in r for r in got] == [False, False, True, True]
    assert events(run, "val/psnr") == [3, 4] and events(run) == [1, 2, 3, 4]
    best = load_checkpoint(os.path.join(run, "best.ckpt"))
    psnr = {r["epoch"]: r["val_psnr"] for r in got[2:]}
    assert best["best_psnr"] == max(psnr.values()) and psnr[best["epoch"]] == best["best_psnr"]


def test_out_of_memory_in_validation_keeps_the_epoch(dr, tmp_path, monkeypatch, capsys):
    """Validation that runs out of memory: the trained epoch is saved (its row without val_psnr),
    and one line names the resume command with a shorter validation."""
    def hungry(*a, **kw):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    monkeypatch.setattr(Trainer, "validate", hungry)
    run = str(tmp_path / "run")
    assert Trainer.main(["--DR", dr, *SHORT, "--num_epoch", "2", "--save_root", run]) == 2
    line = error_line(capsys.readouterr().err)
    last = os.path.join(run, "last.ckpt")
    assert "out of memory validating after epoch 1 (1 sequence(s) of 20 frames on cpu)" in line
    assert f"the epoch is saved in {last}" in line and f"python Trainer.py --resume {run} --val_vi_len 10" in line
    assert load_checkpoint(last)["epoch"] == 1
    assert [("val_psnr" in r, r["epoch"]) for r in rows(run)] == [(False, 1)]
    monkeypatch.undo()
    assert Trainer.main(["--resume", run]) == 0
    assert [("val_psnr" in r, r["epoch"]) for r in rows(run)] == [(False, 1), (True, 2)]


def test_out_of_memory_in_the_tester_names_the_fix(baseline, dr, tmp_path, monkeypatch, capsys):
    def hungry(*a, **kw):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(Tester, "rollout", hungry)
    assert Tester.main(["--ckpt_path", os.path.join(baseline, "last.ckpt"), "--DR", dr, "--test_len", "20",
                        "--save_root", str(tmp_path / "t"), "--device", "cpu", "--batch_size", "4"]) == 2
    line = error_line(capsys.readouterr().err)
    assert "out of memory generating 2 rollout(s) of 20 frames together on cpu: use a smaller --batch_size (now 4)" in line
    assert "can't allocate memory" in line


@pytest.fixture
def tester_run(dr, tmp_path):
    """Tester arguments for an untrained model's checkpoint, into tmp_path/out."""
    from modules.checkpoint import save_checkpoint
    ckpt = str(tmp_path / "m.ckpt")
    save_checkpoint(ckpt, {"model": VAE_Model(16, 8, 4, 16).state_dict()})
    out = tmp_path / "out"
    return out, ["--ckpt_path", ckpt, "--DR", dr, "--test_len", "20", "--device", "cpu", "--save_root", str(out)]


def test_ctrl_c_in_the_tester_says_what_was_written(tester_run, monkeypatch, capsys):
    """Ctrl-C was a traceback. Now one line naming what was written by then, exit code 130, and
    no half-written or temporary file (the previous run's file that was being replaced is whole)."""
    out, argv = tester_run
    out.mkdir()
    (out / "pose_seq0.gif").write_bytes(b"the previous run's")
    real, calls = Tester.save_gif, []

    def save_gif(frames, path, *a, **kw):
        calls.append(path)
        if len(calls) == 2:  # pose_seq0.gif, after submission.csv and pred_seq0.gif
            with open(path, "wb") as f:
                f.write(b"GIF89a half")
            raise KeyboardInterrupt
        return real(frames, path, *a, **kw)
    monkeypatch.setattr(Tester, "save_gif", save_gif)
    assert Tester.main(argv) == 130
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"error: interrupted; wrote only submission.csv, pred_seq0.gif in {out} "), line
    assert sorted(os.listdir(out)) == ["pose_seq0.gif", "pred_seq0.gif", "submission.csv"]
    assert (out / "pose_seq0.gif").read_bytes() == b"the previous run's"

    def interrupted(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(Tester, "rollout", interrupted)
    assert Tester.main(argv + ["--save_root", str(out / "again")]) == 130
    assert error_line(capsys.readouterr().err) == "error: interrupted; nothing written"


def test_disk_full_in_the_tester_leaves_no_temporary_file(tester_run, monkeypatch, capsys):
    out, argv = tester_run
    out.mkdir()
    (out / "submission.csv").write_text("the previous run's")

    def savetxt(fname, *a, **kw):
        with open(fname, "w") as f:
            f.write("id,0,1")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(Tester.np, "savetxt", savetxt)
    assert Tester.main(argv) == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {out / 'submission.csv'}: {os.strerror(errno.ENOSPC)}; free space"), line
    assert line.endswith("(nothing written)")
    assert os.listdir(out) == ["submission.csv"] and (out / "submission.csv").read_text() == "the previous run's"


# ----------------------------------------------------------------------------- disk, folders

@pytest.mark.parametrize("fault", ["disk full mid-write", "folder turned read-only", "writer error"])
def test_failed_checkpoint_write_keeps_earlier_checkpoints(baseline, tmp_path, monkeypatch, capsys, fault):
    run = str(tmp_path / "run")
    shutil.copytree(baseline, run)
    before = digests(run)
    if fault == "disk full mid-write":
        real_save, expect = torch.save, "the disk is full"

        def save(obj, f, *a, **kw):
            if ".ckpt.tmp" in str(getattr(f, "name", f)):
                f.write(b"PK\x03\x04 half a checkpoint")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_save(obj, f, *a, **kw)
        monkeypatch.setattr(torch, "save", save)
    elif fault == "writer error":
        # On a disk that is full already, torch.save's zip writer fails with a RuntimeError (not an
        # OSError): it was a traceback.
        real_save, expect = torch.save, r"the write failed \(\[enforce fail at inline_container.cc:672\] . unexpected pos 64 vs 0\) with [\d.]+ MB free on its disk"

        def save(obj, f, *a, **kw):
            if ".ckpt.tmp" in str(getattr(f, "name", f)):
                f.write(b"PK\x03\x04")
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
            return real_save(obj, f, *a, **kw)
        monkeypatch.setattr(torch, "save", save)
    else:
        real_replace, expect = os.replace, os.strerror(errno.EROFS)

        def replace(src, dst, *a, **kw):
            if str(dst).endswith(".ckpt"):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dst))
            return real_replace(src, dst, *a, **kw)
        monkeypatch.setattr(os, "replace", replace)
    rc = Trainer.main(["--resume", run, "--num_epoch", "4", "--partial", "0.17"])
    assert rc == 2
    line = error_line(capsys.readouterr().err)
    # The first write of epoch 4 fails (best.ckpt or last.ckpt, whichever comes first).
    assert re.search(rf"cannot write checkpoint {re.escape(run)}/\w+\.ckpt: {expect}", line), line
    assert "earlier checkpoints are untouched" in line
    monkeypatch.undo()
    assert digests(run) == before
    assert not [n for n in os.listdir(run) if ".tmp" in n]
    for name in before:
        load_checkpoint(os.path.join(run, name))


def test_args_json_is_rewritten_atomically(dr, tmp_path, monkeypatch, capsys):
    """A start that dies while writing args.json (here the disk fills up halfway through it)
    leaves the previous args.json whole, and no temporary file (it was truncated in place)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "args.json").write_text('{"old": 1}')
    real_dump = json.dump

    def dump(obj, f, *a, **kw):
        if "args.json" in str(getattr(f, "name", "")):
            f.write('{"lr": ')
            f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_dump(obj, f, *a, **kw)
    monkeypatch.setattr(json, "dump", dump)
    assert Trainer.main(["--DR", dr, *SHORT, "--num_epoch", "1", "--save_root", str(run)]) == 2
    assert os.strerror(errno.ENOSPC) in error_line(capsys.readouterr().err)
    assert json.loads((run / "args.json").read_text()) == {"old": 1}
    assert not [n for n in os.listdir(run) if ".tmp" in n]


def test_unwritable_save_root_is_refused_before_any_work(baseline, dr, tmp_path, capsys):
    # Under a regular file no one can create a folder, root included (chmod does not stop root).
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    assert Trainer.main(["--DR", dr, *TINY, "--save_root", str(blocked / "run")]) == 2
    line = error_line(capsys.readouterr().err)
    assert f"--save_root {blocked / 'run'} is not writable" in line and "choose another folder" in line
    assert Tester.main(["--DR", dr, "--device", "cpu", "--test_len", "20", "--no_gif",
                        "--ckpt_path", os.path.join(baseline, "last.ckpt"), "--save_root", str(blocked / "out")]) == 2
    line = error_line(capsys.readouterr().err)
    assert f"--save_root {blocked / 'out'} is not writable" in line


def test_save_root_that_is_a_file_is_named_so(baseline, dr, tmp_path, capsys):
    """It read 'is not writable (File exists)'; --overwrite leaves the file alone."""
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    assert Trainer.main(["--DR", dr, *TINY, "--save_root", str(a_file), "--overwrite"]) == 2
    assert f"--save_root {a_file} is a file, not a folder" in error_line(capsys.readouterr().err)
    assert Tester.main(["--DR", dr, "--device", "cpu", "--test_len", "20", "--no_gif",
                        "--ckpt_path", os.path.join(baseline, "last.ckpt"), "--save_root", str(a_file)]) == 2
    assert f"--save_root {a_file} is a file, not a folder" in error_line(capsys.readouterr().err)
    assert a_file.read_text() == "keep"


def test_existing_save_root_is_never_silently_overwritten(baseline, dr, tmp_path, capsys):
    run = str(tmp_path / "run")
    shutil.copytree(baseline, run)
    before = digests(run)
    one_step = ["--DR", dr, *TINY, "--num_epoch", "1", "--train_vi_len", "4", "--partial", "0.09"]
    assert Trainer.main([*one_step, "--save_root", run]) == 2
    line = error_line(capsys.readouterr().err)
    assert f"--save_root {run} already holds checkpoints" in line
    assert f"--resume {run}" in line and "another --save_root" in line and "--overwrite" in line
    # Continuing another run's checkpoint into this folder is refused too.
    other = os.path.join(baseline, "epoch_2.ckpt")
    assert Trainer.main(["--ckpt_path", other, "--save_root", run]) == 2
    assert "already holds checkpoints" in error_line(capsys.readouterr().err)
    assert digests(run) == before
    # --overwrite is the explicit way; the old run's metrics do not leak into the new one's.
    assert Trainer.main([*one_step, "--save_root", run, "--overwrite"]) == 0
    assert [r["epoch"] for r in rows(run)] == [1]


def test_overwrite_removes_the_previous_runs_checkpoints(dr, tmp_path, monkeypatch, capsys):
    """--overwrite left the previous run's best.ckpt beside the new run's: a new run stopped
    before its first validation left the old best.ckpt, which the Tester would then test. It
    removes what a run writes there, not the checkpoint it starts from nor the user's files."""
    from modules.checkpoint import save_checkpoint
    run = tmp_path / "run"
    run.mkdir()
    (run / "mine").mkdir()
    for name in ("epoch_5.ckpt", "last.ckpt", "metrics.jsonl", "events.out.tfevents.1.old", "val_epoch5.gif",
                 "notes.txt", "mine.ckpt", "mine/best.ckpt"):
        (run / name).write_text("the previous run's")
    save_checkpoint(run / "best.ckpt", {"model": VAE_Model(16, 8, 4, 16).state_dict()})

    def interrupted(*a, **kw):  # the new run is stopped before its first validation
        raise KeyboardInterrupt
    monkeypatch.setattr(Trainer, "train_one_epoch", interrupted)
    start = ["--DR", dr, *SHORT, "--num_epoch", "1", "--save_root", str(run), "--overwrite"]
    # Starting from the weights in best.ckpt: that file stays, the rest of the old run goes.
    assert Trainer.main([*start, "--ckpt_path", str(run / "best.ckpt")]) == 130
    assert (f"--overwrite: removed the previous run's epoch_5.ckpt, events.out.tfevents.1.old, last.ckpt, "
            f"metrics.jsonl, val_epoch5.gif from {run}" in capsys.readouterr().out)
    assert not (run / "events.out.tfevents.1.old").exists()
    assert sorted(n for n in os.listdir(run) if not n.startswith("events.")) == \
        ["args.json", "best.ckpt", "mine", "mine.ckpt", "notes.txt"]
    assert Trainer.main(start) == 130
    assert not (run / "best.ckpt").exists()
    assert (run / "mine" / "best.ckpt").read_text() == (run / "notes.txt").read_text() == "the previous run's"


def test_overwrite_with_another_runs_checkpoint_starts_a_clean_folder(baseline, dr, tmp_path, capsys):
    """--overwrite removed nothing when --ckpt_path came from another folder and held a finished
    epoch: the old run's later checkpoints stayed beside the new run's, and its best.ckpt, a model
    the new run never beat, was the one the closing line told the user to test."""
    run = tmp_path / "run"
    shutil.copytree(baseline, run)  # a previous run of 3 epochs
    start = tmp_path / "elsewhere" / "epoch_1.ckpt"
    start.parent.mkdir()
    shutil.copy(os.path.join(baseline, "epoch_1.ckpt"), start)
    assert Trainer.main(["--DR", dr, *RUN, "--num_epoch", "2", "--save_root", str(run), "--overwrite",
                         "--ckpt_path", str(start)]) == 0
    assert "--overwrite: removed the previous run's" in capsys.readouterr().out
    assert not (run / "epoch_3.ckpt").exists() and not (run / "epoch_1.ckpt").exists()
    assert [r["epoch"] for r in rows(str(run))] == [2]
    assert load_checkpoint(str(run / "best.ckpt"))["epoch"] == 2


def test_overwrite_removes_exactly_the_files_a_run_writes(tmp_path, capsys):
    """--overwrite deletes what a run writes in its save_root (checkpoints, metrics.jsonl, event
    files, --store_visualization's GIFs and PNGs), never the --ckpt_path it starts from, nor files
    whose names only look alike, nor anything in subfolders."""
    from types import SimpleNamespace
    run = tmp_path / "run"
    (run / "old").mkdir(parents=True)
    gone = ["best.ckpt", "epoch_12.ckpt", "events.out.tfevents.1700000000.host.1.0", "last.ckpt", "metrics.jsonl",
            "val_epoch3.gif", "val_psnr_epoch3.png"]
    kept = ["args.json", "epoch_3.ckpt", "epoch_x.ckpt", "last.ckpt.bak", "metrics.jsonl.old", "mine.ckpt", "notes.txt",
            "old", "val_epoch.gif", "val_psnr_epoch3.png.txt"]
    for name in gone + kept[:-3] + kept[-2:]:
        (run / name).write_text("x")
    (run / "old" / "last.ckpt").write_text("x")
    Trainer.remove_previous_run(SimpleNamespace(save_root=str(run), ckpt_path=str(run / "epoch_3.ckpt")))
    assert sorted(os.listdir(run)) == sorted(kept) and os.listdir(run / "old") == ["last.ckpt"]
    assert f"--overwrite: removed the previous run's {', '.join(gone)} from {run}" in capsys.readouterr().out


def test_a_run_continued_in_another_folder_writes_its_own_best(baseline, dr, tmp_path, capsys):
    """A run continued from another folder's checkpoint kept the source run's best PSNR: no
    validation below it wrote best.ckpt, and the folder had none for the Tester."""
    start = tmp_path / "elsewhere" / "epoch_2.ckpt"
    start.parent.mkdir()
    save_checkpoint(start, dict(load_checkpoint(os.path.join(baseline, "epoch_2.ckpt")), best_psnr=99.0))
    new = tmp_path / "new"
    assert Trainer.main(["--DR", dr, *RUN, "--num_epoch", "3", "--save_root", str(new), "--ckpt_path", str(start)]) == 0
    best = load_checkpoint(str(new / "best.ckpt"))
    assert best["epoch"] == 3 and best["best_psnr"] == rows(str(new))[-1]["val_psnr"] < 99.0
    assert f"python Tester.py --ckpt_path {new / 'best.ckpt'}" in capsys.readouterr().out


def test_a_run_taken_back_that_fails_leaves_the_folder_as_it_was(baseline, dr, tmp_path, monkeypatch, capsys):
    """Going back to epoch_1.ckpt dropped the later rows of metrics.jsonl at the start; when the
    run then failed, last.ckpt was still epoch 3's and the rows were gone, and the message said to
    resume, which continued epoch 3."""
    run = tmp_path / "run"
    shutil.copytree(baseline, run)

    def diverges(*a, **kw):
        raise Trainer.TrainingDiverged("5 non-finite losses in a row")
    monkeypatch.setattr(Trainer, "train_one_epoch", diverges)
    start = str(run / "epoch_1.ckpt")
    assert Trainer.main(["--ckpt_path", start, "--lr", "0.1"]) == 2
    line = error_line(capsys.readouterr().err)
    assert f"this run started from {start}, which is intact" in line and f"--ckpt_path {start} --lr" in line
    assert rows(str(run)) == rows(baseline) and digests(str(run)) == digests(baseline)


def _val_psnr_events(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, round(e.value, 3)) for e in acc.Scalars("val/psnr")]


def test_going_back_to_an_earlier_checkpoint_keeps_a_better_best(baseline, dr, tmp_path, monkeypatch, capsys):
    """A run taken back to epoch_1.ckpt compared its validations with epoch 1's best PSNR, so a
    worse model overwrote the better best.ckpt of a later epoch; TensorBoard showed the old run's
    later epochs beside the new ones."""
    from modules.checkpoint import save_checkpoint
    run = tmp_path / "run"
    shutil.copytree(baseline, run)
    best = load_checkpoint(str(run / "best.ckpt"))
    save_checkpoint(run / "best.ckpt", dict(best, best_psnr=50.0))  # a later epoch validated at 50 dB
    real = Trainer.validate
    monkeypatch.setattr(Trainer, "validate", lambda *a, **kw: dict(real(*a, **kw), psnr=40.0))
    assert load_checkpoint(str(run / "epoch_1.ckpt"))["best_psnr"] < 40.0
    assert Trainer.main(["--ckpt_path", str(run / "epoch_1.ckpt"), "--num_epoch", "2"]) == 0
    out = capsys.readouterr().out
    assert "holds a model validated at 50.00 dB" in out and "Best val PSNR 50.00 dB" in out
    assert load_checkpoint(str(run / "best.ckpt"))["best_psnr"] == 50.0
    old = _val_psnr_events(baseline)
    assert [step for step, _ in old] == [1, 2, 3]
    assert _val_psnr_events(run) == [old[0], (2, 40.0)]


def test_resume_given_a_checkpoint_file_names_the_right_flag(baseline, capsys):
    """--resume RUN/last.ckpt was answered 'no such folder' about a file that exists."""
    last = os.path.join(baseline, "last.ckpt")
    assert Trainer.main(["--resume", last]) == 2
    line = error_line(capsys.readouterr().err)
    assert f"--resume {last}: that is a file" in line
    assert f"--resume {baseline})" in line and f"--ckpt_path {last} continues" in line


def test_done_line_names_a_checkpoint_that_exists(dr, tmp_path, monkeypatch, capsys):
    """A run whose validation never gave a finite PSNR writes no best.ckpt: the closing line must
    not tell the user to test it (it named best.ckpt, which the Tester then called missing)."""
    real = Trainer.validate

    def nan_psnr(*a, **kw):
        return dict(real(*a, **kw), psnr=float("nan"))

    monkeypatch.setattr(Trainer, "validate", nan_psnr)
    run = str(tmp_path / "run")
    assert Trainer.main(["--DR", dr, *SHORT, "--num_epoch", "1", "--save_root", run]) == 0
    found = re.search(r"python Tester.py --ckpt_path (\S+)(.*)", capsys.readouterr().out)
    assert not os.path.exists(os.path.join(run, "best.ckpt"))
    assert found.group(1) == os.path.join(run, "last.ckpt")
    # The Tester does not read the dataset from the checkpoint: the command names it, and the
    # length of its test sequences (20 here; the Tester's default is the lab's 630).
    assert found.group(2).split() == ["--DR", dr, "--test_len", "20"]


def test_a_visualization_that_cannot_be_written_does_not_stop_the_run(dr, tmp_path, monkeypatch, capsys):
    """--store_visualization's GIF was written before the epoch's checkpoints, in place: a full
    disk left a cut GIF and lost the epoch just trained."""
    def full(frames, path, *a, **kw):
        with open(path, "wb") as f:
            f.write(b"GIF89a")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    monkeypatch.setattr(Trainer, "save_gif", full)
    run = tmp_path / "run"
    assert Trainer.main(["--DR", dr, *SHORT, "--num_epoch", "1", "--store_visualization", "--save_root", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"note: cannot write val_epoch1.gif in {run} ({os.strerror(errno.ENOSPC)}); training goes on" in out
    names = os.listdir(run)
    assert "last.ckpt" in names and "val_psnr_epoch1.png" in names
    assert not [n for n in names if n.endswith(".gif") or ".tmp" in n]


def test_gif_on_a_full_disk_is_one_error(tmp_path, monkeypatch):
    """imageio's GIF writer, failing on a full disk, failed again from its finaliser ("Exception
    ignored in: PluginV3.__del__" and a second traceback on stderr)."""
    import gc
    from modules.visualize import save_gif
    ignored = []
    monkeypatch.setattr(sys, "unraisablehook", ignored.append)  # where "Exception ignored" goes
    path = tmp_path / "full.gif"
    path.symlink_to("/dev/full")  # every write to it fails with ENOSPC
    with pytest.raises(OSError) as e:
        save_gif(torch.rand(4, 3, 8, 16), str(path))
    assert e.value.errno == errno.ENOSPC
    del e  # its traceback holds the writer
    gc.collect()
    assert ignored == []


def test_two_trainers_on_one_folder(dr, tmp_path, capsys):
    """Two runs started on the same --save_root both ran: one's checkpoints over the other's, their
    rows mixed in metrics.jsonl, and each reported its own best for the other's best.ckpt."""
    run = tmp_path / "run"
    run.mkdir()
    held = Trainer.claim_run_folder(str(run))  # as another process's run does while it trains
    try:
        assert Trainer.main(["--DR", dr, *SHORT, "--num_epoch", "1", "--save_root", str(run)]) == 2
        line = error_line(capsys.readouterr().err)
        assert line == (f"error: another Trainer is writing to {run} (a run in progress there, or the processes of a "
                        "stopped torchrun job that still run); wait for it to end, or choose another --save_root")
        assert os.listdir(run) == []
    finally:
        os.close(held)
    assert Trainer.main(["--DR", dr, *SHORT, "--num_epoch", "1", "--save_root", str(run)]) == 0
    assert Trainer.main(["--resume", str(run), "--num_epoch", "2"]) == 0  # the lock went with the run
    assert sorted(os.listdir(run)).count("last.ckpt") == 1 and not [n for n in os.listdir(run) if n.startswith(".")]


def test_sigterm_before_training_exits_cleanly(dr, tmp_path, monkeypatch, capsys):
    """SIGTERM while the data were decoded ended the process with no message and left the empty run
    folder; it ends like Ctrl-C now (StopRequest takes it over from the first step)."""
    def terminated(*a, **kw):
        Trainer.terminated(signal.SIGTERM, None)
    monkeypatch.setattr(Trainer, "TrainWindows", terminated)
    assert Trainer.main(["--DR", dr, *TINY, "--save_root", str(tmp_path / "run")]) == 143
    assert "interrupted; no checkpoint was written" in error_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_write_probe_is_removed_when_its_write_fails(tmp_path, monkeypatch):
    """On a full disk the probe file is created but its write fails: it was left behind, one per try."""
    from modules import options
    real_open = open

    class Full:
        def __init__(self, path):
            self.f = real_open(path, "w")

        def __enter__(self):
            return self

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __exit__(self, *exc):
            self.f.close()
    monkeypatch.setattr(options, "open", lambda path, mode="r": Full(path), raising=False)
    with pytest.raises(options.ConfigError, match="is not writable"):
        options.writable_folder(str(tmp_path / "out"))
    assert os.listdir(tmp_path / "out") == []


def test_write_failure_advice():
    from modules.options import write_failure_advice
    assert write_failure_advice(OSError(errno.ENOSPC, "full")) == "free space or choose another --save_root"
    assert write_failure_advice(OSError(errno.EROFS, "read-only")) == "choose another --save_root"


def test_new_run_folders_never_collide(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(Trainer.time, "strftime", lambda fmt: "20250101-120000")
    first, second = Trainer.new_run_folder(), Trainer.new_run_folder()
    assert first == os.path.join("runs", "20250101-120000") and second == first + "-2"
    assert os.path.isdir(first) and os.path.isdir(second)


def test_ctrl_c_before_training_exits_cleanly(dr, tmp_path, monkeypatch, capsys):
    def interrupted(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(Trainer, "TrainWindows", interrupted)
    assert Trainer.main(["--DR", dr, *TINY, "--save_root", str(tmp_path / "run")]) == 130
    assert "interrupted; no checkpoint was written" in error_line(capsys.readouterr().err)


def test_a_second_ctrl_c_points_to_the_checkpoint_this_run_can_go_on_from(baseline, tmp_path, monkeypatch, capsys):
    """A run started from epoch_1.ckpt of a finished folder was told to --resume that folder,
    whose last.ckpt (the old run's, epoch 3) has nothing left to train; a --test run was told to
    resume too. Once this run has written last.ckpt, --resume is right."""
    run = str(tmp_path / "run")
    shutil.copytree(baseline, run)
    calls = []
    train_one_epoch = Trainer.train_one_epoch

    def second_ctrl_c(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return train_one_epoch(*a, **kw)

    monkeypatch.setattr(Trainer, "train_one_epoch", second_ctrl_c)
    start = os.path.join(run, "epoch_1.ckpt")
    calls.append(1)  # the first epoch is interrupted
    assert Trainer.main(["--ckpt_path", start, "--num_epoch", "4"]) == 130
    assert error_line(capsys.readouterr().err) == (
        f"error: interrupted; no checkpoint was written; this run started from {start}, which is intact: "
        f"python Trainer.py --ckpt_path {start}")
    calls.clear()  # the second epoch is: the first one wrote last.ckpt
    assert Trainer.main(["--ckpt_path", start, "--num_epoch", "4"]) == 130
    assert error_line(capsys.readouterr().err) == \
        f"error: interrupted; resume from the last checkpoint with: python Trainer.py --resume {run}"
    assert load_checkpoint(os.path.join(run, "last.ckpt"))["epoch"] == 2

    def interrupted(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(Trainer, "validate", interrupted)
    assert Trainer.main(["--ckpt_path", os.path.join(run, "best.ckpt"), "--test"]) == 130
    assert error_line(capsys.readouterr().err) == "error: interrupted; nothing was written"
    # Into another folder: the command given goes on there, not in the checkpoint's folder.
    monkeypatch.setattr(Trainer, "train_one_epoch", interrupted)
    other = str(tmp_path / "other")
    assert Trainer.main(["--ckpt_path", start, "--num_epoch", "4", "--save_root", other]) == 130
    assert error_line(capsys.readouterr().err).endswith(f"which is intact: python Trainer.py --ckpt_path {start} "
                                                        f"--save_root {other}")


@pytest.mark.parametrize("script", ["Trainer.py", "Tester.py"])
def test_ctrl_c_while_torch_loads_exits_quietly(script):
    """Ctrl-C in the seconds the script spends importing torch: exit code 130 and no traceback,
    as after main() has started. The signal is sent once torch's library is mapped into the
    process (its import has begun; the rest of it takes a second or more)."""
    # Ctrl-C as in a terminal: a suite started in the background of a script inherits SIGINT
    # ignored (POSIX), and so would the child, whose --help would then run to its end.
    terminal = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    for _ in range(5):  # on a busy machine this loop can see the mapping only after --help is done
        proc = subprocess.Popen([sys.executable, script, "--help"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, preexec_fn=terminal)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            with open(f"/proc/{proc.pid}/maps") as f:
                if "libtorch" in f.read():
                    break
            time.sleep(0.002)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        if not (proc.returncode == 0 and "usage:" in out):
            break
    assert proc.returncode == 130, (out[-300:], err[-1000:])
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
