"""torchrun support: a real 2-process run on the CPU (gloo) against one process with the doubled
batch, its checkpoint in the Tester and in a single-process resume, a SIGTERM under torchrun; and
the pieces that make the two runs comparable (shards, per-window noise, resumable progress)."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

import Tester
import Trainer
from modules.engine import WindowBatches, posterior_noise, train_one_epoch
from modules.options import trainer_parser
from modules.runtime import Speed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# --no_cache: the dataset fixture is shared, and the runs must not write into it.
TINY = ["--F_dim", "16", "--L_dim", "8", "--N_dim", "4", "--D_out_dim", "16", "--val_vi_len", "20",
        "--device", "cpu", "--amp", "off", "--no_cache"]
# Full_KL puts the KL in the loss from epoch 1 (the cyclical schedule starts at beta 0).
COMPARE = ["--num_epoch", "1", "--kl_anneal_type", "Full_KL"]

needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


@pytest.fixture(autouse=True)
def _temporary_files_in_tmp_path(tmp_path, monkeypatch):
    # torchrun makes a torchelastic_* folder under TMPDIR on every launch and leaves it there.
    monkeypatch.setenv("TMPDIR", str(tmp_path))


def _env():
    # One thread per process as torchrun sets it, so the two processes do not fight over 2 cores.
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _torchrun(*args):
    # `python -m torch.distributed.run` is the torchrun command, run by this interpreter.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            os.path.join(ROOT, "Trainer.py"), *args]


def _trainer(*args):
    return [sys.executable, os.path.join(ROOT, "Trainer.py"), *args]


def _start(cmd):
    return cmd, subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)


def _finish(job, timeout=180):
    cmd, proc = job
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, f"{' '.join(cmd)}\nexit {proc.returncode}\n{out[-3000:]}\n{err[-3000:]}"
    return out


def _run(cmd):
    return _finish(_start(cmd))


def _rows(save_root):
    with open(os.path.join(save_root, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@needs_gloo
def test_torchrun_two_processes_match_one_with_doubled_batch(tiny_dance, tmp_path):
    data = ["--DR", str(tiny_dance), *TINY]
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    # Side by side: the single process uses one thread, so it takes the core torchrun leaves idle.
    jobs = [_start(_torchrun(*data, *COMPARE, "--batch_size", "1", "--save_root", str(ddp))),
            _start(_trainer(*data, *COMPARE, "--batch_size", "2", "--save_root", str(single)))]
    out = _finish(jobs[0])
    _finish(jobs[1])
    assert "(2 process(es))" in out

    # Rank 0 alone logs and writes: one metrics row, one TensorBoard file, plain checkpoints.
    rows, ref = _rows(ddp), _rows(single)
    assert len(rows) == 1 and len(ref) == 1
    assert len(list(ddp.glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in ddp.glob("*.ckpt")) == ["best.ckpt", "last.ckpt"]
    assert not list(ddp.glob("*.tmp*"))
    ckpt = torch.load(ddp / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["progress"] is None
    assert not any(k.startswith("module.") for k in ckpt["model"])

    # 6 windows: 3 steps of 2 windows in both runs, the same global batches and posterior noise.
    # What remains is BatchNorm in the pose encoder: on the CPU there is no SyncBatchNorm, so each
    # rank normalises by the statistics of its own window instead of the pair's. A sharding error
    # is far larger: the per-window mse here ranges 0.18-0.34, so a rank training on the wrong
    # windows moves the epoch mse by >10%. The KL starts at 0 (the posterior starts at the prior)
    # and is ~0.005 after 3 steps, so it is held to the loss's absolute tolerance (measured
    # difference 5e-6) rather than a relative one.
    assert rows[0]["steps"] == ref[0]["steps"] == 3
    for key in ("loss", "mse"):
        assert rows[0][key] == pytest.approx(ref[0][key], rel=2e-4), key
    assert rows[0]["kl"] == pytest.approx(ref[0]["kl"], abs=2e-4 * ref[0]["loss"])

    # The checkpoint loads in a single-process Tester ...
    assert Tester.main(["--ckpt_path", str(ddp / "last.ckpt"), "--DR", str(tiny_dance), "--test_len", "20",
                        "--device", "cpu", "--plain", "--no_cache", "--no_gif",
                        "--save_root", str(tmp_path / "test")]) == 0
    assert (tmp_path / "test" / "submission.csv").is_file()
    # --test under torchrun validates once (rank 0), not once per process.
    out = _run(_torchrun("--DR", str(tiny_dance), "--device", "cpu", "--test", "--ckpt_path", str(ddp / "last.ckpt")))
    assert out.count("val PSNR") == 1, out
    # ... and resumes in a single process, continuing the run folder at epoch 2.
    out = _run(_trainer(*data, "--kl_anneal_type", "Full_KL", "--num_epoch", "2", "--batch_size", "2",
                        "--ckpt_path", str(ddp / "last.ckpt")))
    assert "Resuming" in out and "epoch 2" in out
    assert [r["epoch"] for r in _rows(ddp)] == [1, 2]


def _training_under_torchrun(tiny_dance, tmp_path):
    """A 2-process run of 50 epochs, returned once its first epoch is done: (save_root, the log
    file both processes write to, the torchrun process)."""
    save = tmp_path / "run"
    cmd = _torchrun("--DR", str(tiny_dance), *TINY, "--num_epoch", "50", "--val_every", "100",
                    "--batch_size", "1", "--save_root", str(save))
    log = open(tmp_path / "log.txt", "w+")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 90
    while not (save / "metrics.jsonl").exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            proc.wait()
            log.seek(0)
            pytest.fail(f"the run did not start training\n{log.read()[-3000:]}")
        time.sleep(0.2)
    return save, log, proc


@needs_gloo
def test_sigterm_under_torchrun_stops_all_ranks_with_a_checkpoint(tiny_dance, tmp_path):
    """torchrun forwards SIGTERM (and Ctrl-C's SIGINT) to every worker; the ranks agree on the stop
    flag at the next step, rank 0 writes last.ckpt, and all exit: no rank waits in a collective."""
    save, log, proc = _training_under_torchrun(tiny_dance, tmp_path)
    try:
        proc.send_signal(signal.SIGTERM)
        t0 = time.time()
        # torchrun SIGKILLs workers 30 s after forwarding; stopping must take about one step.
        proc.wait(timeout=45)
        took = time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log.seek(0)
    text = log.read()
    assert "Stopped at epoch" in text, text[-3000:]
    assert text.count("SIGTERM received") == 1  # rank 0 alone says so
    # Under torchrun a second Ctrl-C reaches torchrun alone: no promise that it aborts. The resume
    # command is torchrun's with as many processes (python Trainer.py halved the global batch).
    assert "press Ctrl-C again" not in text
    assert f"Resume with: torchrun --standalone --nproc_per_node=2 Trainer.py --resume {save}" in text
    assert took < 20, f"stopping took {took:.1f} s"
    ckpt = torch.load(save / "last.ckpt", map_location="cpu", weights_only=True)
    assert 1 <= ckpt["epoch"] < 50
    if ckpt["progress"] is not None:
        assert ckpt["progress"]["windows"] == 2 * ckpt["progress"]["step"]


def _children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def _gone(pid):
    """Exited: no such process, or a zombie left for whoever adopted it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@needs_gloo
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_workers_of_a_killed_torchrun_stop_with_a_checkpoint(tiny_dance, tmp_path):
    """torchrun killed outright (SIGKILL) cannot forward anything, and its workers run in sessions of
    their own: each asked Linux for SIGTERM at its parent's death, so they stop as on `kill -TERM`
    (rank 0 writes last.ckpt) instead of training on unattended."""
    save, log, proc = _training_under_torchrun(tiny_dance, tmp_path)
    workers = []
    try:
        workers = _children(proc.pid)
        assert len(workers) == 2
        proc.kill()
        proc.wait()
        deadline = time.time() + 30
        while not all(_gone(w) for w in workers):
            assert time.time() < deadline, "the workers trained on after torchrun was killed"
            time.sleep(0.2)
    finally:
        for w in workers:
            if not _gone(w):
                os.kill(w, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log.seek(0)
    text = log.read()
    assert "SIGTERM received" in text and "Stopped at epoch" in text, text[-3000:]
    ckpt = torch.load(save / "last.ckpt", map_location="cpu", weights_only=True)
    assert 1 <= ckpt["epoch"] < 50


@needs_gloo
def test_out_of_memory_on_one_rank_stops_the_job_with_one_line_per_rank(tiny_dance, tmp_path):
    """Rank 1 runs out of memory at its third step: it says so and names the fix, rank 0 (left
    waiting in the step's all-reduce) says another process stopped; neither prints a traceback."""
    wrapper = tmp_path / "hungry_trainer.py"
    wrapper.write_text(f"""import os, sys
sys.path.insert(0, {ROOT!r})
import torch
import Trainer
from modules.model import VAE_Model
forward, calls = VAE_Model.forward, []
def hungry(self, *a, **kw):
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 3:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    return forward(self, *a, **kw)
VAE_Model.forward = hungry
sys.exit(Trainer.main(sys.argv[1:]))
""")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(wrapper),
           "--DR", str(tiny_dance), *TINY, "--num_epoch", "2", "--batch_size", "1", "--save_root", str(tmp_path / "run")]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    errors = [line[line.index("error: "):] for line in proc.stderr.splitlines() if "error: " in line]
    assert len(errors) == 2, proc.stderr[-3000:]
    oom = [e for e in errors if "out of memory" in e]
    assert len(oom) == 1 and "step 2" in oom[0] and "--grad_ckpt" in oom[0]
    assert any("another process of this torchrun job stopped" in e for e in errors)
    assert not re.search(r"\[rank\d\]: Traceback", proc.stderr)  # torchrun's own report aside


# ----------------------------------------------------------------------------- pieces

class _Windows:
    """What WindowBatches reads from a TrainWindows: n windows of T frames, frame value = window."""

    def __init__(self, n, T=3):
        v = torch.arange(n).repeat_interleave(T).to(torch.uint8)
        self.frames = v[:, None, None, None].expand(-1, 3, 2, 2).contiguous()
        self.labels = self.frames.clone()
        self.starts = torch.arange(n) * T
        self.video_len = T


def test_rank_shards_make_the_single_process_batches():
    data = _Windows(10)
    for epoch in range(3):
        one = WindowBatches(data, 2, torch.device("cpu"), seed=5).epoch(epoch)  # (5, 2)
        shards = [WindowBatches(data, 1, torch.device("cpu"), seed=5, rank=r, world_size=2).epoch(epoch)
                  for r in range(2)]
        assert [sorted(b.tolist()) for b in one] == [sorted(b.tolist()) for b in torch.cat(shards, 1)]


def test_first_frame_from_the_video():
    """first_from="video": frame 0 of a window is drawn from its own video (any of its frames),
    the same for a window whatever its batch, another in another epoch; frames 1.. untouched."""
    data = _Windows(12, T=4)
    data.frames = torch.arange(48, dtype=torch.uint8)[:, None, None, None].expand(-1, 3, 2, 2).contiguous()
    data.labels = data.frames.clone()
    data.video_lengths = [20, 28]  # windows 0-4 in video 0 (frames 0-19), windows 5-11 in video 1
    b = WindowBatches(data, 2, torch.device("cpu"), seed=5, first_from="video")
    drawn = {}
    for epoch in range(40):
        frames, _ = b.gather(torch.arange(12), epoch)
        frames = frames[:, :, 0, 0, 0].long()
        assert torch.equal(frames[:, 1:], (torch.arange(12) * 4)[:, None] + torch.arange(1, 4))
        first = frames[:, 0]
        assert ((first[:5] >= 0) & (first[:5] < 20)).all() and ((first[5:] >= 20) & (first[5:] < 48)).all()
        alone, _ = b.gather(torch.tensor([7, 3]), epoch)
        assert alone[:, 0, 0, 0, 0].tolist() == [first[7].item(), first[3].item()]
        for w in range(12):
            drawn.setdefault(w, set()).add(first[w].item())
    assert all(len(v) > 10 for v in drawn.values())  # a fresh draw each epoch
    plain, _ = WindowBatches(data, 2, torch.device("cpu"), seed=5).gather(torch.arange(12))
    assert torch.equal(plain[:, 0, 0, 0, 0].long(), torch.arange(12) * 4)


def test_posterior_noise_depends_on_the_window_not_the_batch():
    shape = (2, 4, 3, 5)
    both = posterior_noise(torch.tensor([7, 2]), 3, 0, shape, torch.device("cpu"))
    assert both.shape == (2, *shape)
    assert torch.equal(both[1], posterior_noise(torch.tensor([2]), 3, 0, shape, torch.device("cpu"))[0])
    assert not torch.equal(both[1], posterior_noise(torch.tensor([2]), 4, 0, shape, torch.device("cpu"))[0])
    # Each window, and each frame of a window, draws its own noise.
    assert not torch.equal(both[0], both[1]) and not torch.equal(both[0, 0], both[0, 1])


class _Recorder(torch.nn.Module):
    """Stands in for the model: records the windows it trains on."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.seen = []

    def forward(self, img, label, tf, eps=None, **kw):
        self.seen += (img[:, 0, 0, 0, 0] * 255).round().long().tolist()
        loss = (self.w * img.mean()) ** 2
        return {"loss": loss, "recon": loss, "kl": loss.detach() * 0}


def test_interrupted_epoch_resumes_with_another_global_batch():
    """A checkpoint counts progress in windows, so 2 steps of 1 window resume as 1 step of 2."""
    args = trainer_parser().parse_args(["--train_vi_len", "3", "--scheduler", "none", "--N_dim", "4"])
    speed = Speed(torch.device("cpu"), amp=False, channels_last=False, compile=False, cuda_graphs=False,
                  fast=False)
    data = _Windows(6)
    order = WindowBatches(data, 6, speed.device, args.seed).epoch(0)[0].tolist()

    model = _Recorder()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    calls = iter(range(100))
    _, finished, progress = train_one_epoch(model, opt, WindowBatches(data, 1, speed.device, args.seed), 0, args,
                                            speed, list(model.named_parameters()), should_stop=lambda: next(calls) >= 2)
    assert not finished and progress["step"] == 2 and progress["windows"] == 2
    assert model.seen == order[:2]

    model.seen = []
    metrics, finished, _ = train_one_epoch(model, opt, WindowBatches(data, 2, speed.device, args.seed), 0, args,
                                           speed, list(model.named_parameters()), resume=progress)
    assert finished and model.seen == order[2:]
    assert metrics["steps"] == 3  # 6 windows in steps of 2


def test_a_resume_says_where_it_goes_on_in_its_own_steps():
    """A 1-process checkpoint at step 14 (batch 1) resumed by 2 processes went on at step 7 but
    said step 14, and neither way said that the global batch had changed."""
    args = trainer_parser().parse_args(["--batch_size", "1"])
    one = {"step": 14, "windows": 14}
    assert Trainer.resume_position(one, 1, args, 1) == "epoch 2, step 14"
    assert Trainer.resume_position(one, 1, args, 2) == (
        "epoch 2, step 7 (the checkpoint's run took 1 window per step, this one takes 2: --batch_size 1 x 2 "
        "process(es); it goes on from window 15 of the epoch)")
    two = {"step": 9, "windows": 18}  # batch 1 x 2 processes
    assert Trainer.resume_position(two, 0, args, 1).startswith("epoch 1, step 18 (the checkpoint's run took 2 ")
    args.batch_size = 4
    assert Trainer.resume_position(two, 0, args, 1).endswith("it goes on from window 17 of the epoch)")  # 17-18 again
    assert Trainer.resume_position(None, 3, args, 1) == "epoch 4"
    assert Trainer.resume_position({"step": 5, "sums": None}, 3, args, 1) == "epoch 4, step 5"  # older checkpoints


def test_restart_commands_keep_the_launcher(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert Trainer.trainer_command() == "python Trainer.py"
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert Trainer.trainer_command() == "torchrun --standalone --nproc_per_node=4 Trainer.py"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two machines
    assert Trainer.trainer_command() == "torchrun <this run's torchrun flags> Trainer.py"


def test_a_stray_world_size_is_one_line_not_a_traceback(tiny_dance, tmp_path, monkeypatch, capsys):
    """WORLD_SIZE left in the environment (a job script, another launcher) made a plain
    `python Trainer.py` read RANK and fail with a KeyError traceback."""
    for k in ("RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert Trainer.main(["--DR", str(tiny_dance), *TINY, "--save_root", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == ("error: WORLD_SIZE=2 is set but RANK, MASTER_ADDR, MASTER_PORT not: this "
                                       "process was not started by torchrun; launch it with torchrun, or unset "
                                       "WORLD_SIZE\n")
    assert not (tmp_path / "run").exists()
