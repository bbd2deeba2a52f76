"""Measure training and generation speed: the plain eager float32 path against the fast path, in
one process on the same machine, for the same model and batch.

    python scripts/bench.py --device cuda --batch_size 64
    python scripts/bench.py --device cpu --batch_size 2 --gen_len 60 --json

Training frames/s counts predicted frames (batch x (train_vi_len - 1)) per second of
optimizer steps on random data (speed does not depend on content). Generation frames/s counts
generated frames of full autoregressive rollouts (z from the prior). The plain path is the lab's
way: a per-frame loop, float32, one sequence at a time, a host sync per step; it generates the
same --gen_seqs sequences as the fast path's batch, one after another. Each rollout is timed after
an untimed one (one sequence for the plain path, the whole batch for the fast path). Activation
memory is the peak of one forward + backward pass above what was allocated before it, per
sample-frame (CUDA: the allocator's statistics; CPU: the profiler's allocation record).
With --rounds N both paths are measured N times, alternating, and each figure is the median.
"""
import copy
import json
import os
import resource
import statistics
import sys
import time
from types import SimpleNamespace

if __name__ == "__main__":  # run as a file (imported, it changes nothing)
    # The CPU memory measure runs the profiler; its log lines (read when torch loads) are noise here.
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    # Python puts scripts/ on the path; modules/ is at the root.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from modules.environment import require
    require("scripts/bench.py", ("torch", "numpy", "tqdm", "PIL"))
import torch  # noqa: E402

from modules.model import build_model  # noqa: E402
from modules.engine import WindowBatches, first_line, is_out_of_memory  # noqa: E402
from modules.options import (ConfigError, HelpFormatter, Parser, add_warp_loss, check_common, check_model, check_warp_loss,  # noqa: E402
                             common_parser, hide_from_help, reads_negative_numbers)
from modules.runtime import (Speed, keep_freed_memory, peak_memory_growth, prepare_model, resolve_speed,  # noqa: E402
                            rollout, to_float)


def get_parser():
    p = reads_negative_numbers(Parser(description=__doc__.split("\n\n")[0],
                                                       parents=[common_parser()],
                                                       formatter_class=HelpFormatter))
    # Random data: the data flags are accepted (Trainer command lines pass them) but unused.
    hide_from_help(p, ("DR", "save_root", "num_workers", "no_cache"))
    p.add_argument("--batch_size", type=int, default=2, help="sequences per training step")
    p.add_argument("--train_vi_len", type=int, default=16, help="frames per training window")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per path")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile, autotuning)")
    p.add_argument("--gen_len", type=int, default=630, help="frames per generated sequence")
    p.add_argument("--gen_seqs", type=int, default=5, help="sequences generated together on the fast path")
    p.add_argument("--compile_mode", default="default",
                   choices=("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead"),
                   help="torch.compile mode of the training pass (with --compile on) and of the generation "
                        "step (with --compile_gen); max-autotune tries generated convolutions with fused "
                        "epilogues, and its warm-up takes minutes")
    p.add_argument("--compile_gen", action="store_true",
                   help="torch.compile the generation step of the fast path (then captured as usual)")
    p.add_argument("--grad_ckpt", action="store_true", help="activation checkpointing on the fast path")
    add_warp_loss(p)
    p.add_argument("--tf", choices=("on", "off"), default="on",
                   help="teacher forcing during the timed steps (off: the per-frame loop on both paths)")
    p.add_argument("--skip_eager", action="store_true", help="measure the fast path only")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat plain-then-fast this many times and report each figure's median")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mb(device):
    """CUDA: the allocator's peak over the timed steps. CPU: the process's peak resident memory so
    far, which after the plain path includes its peak (run --skip_eager for the fast path's own)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def time_training(model, speed, args, eager):
    """Frames/s of full optimizer steps, and activation memory per sample-frame: the peak memory of
    one forward + backward pass above what was allocated before it (parameter gradients included,
    6 MB at the lab's dims), over batch x train_vi_len."""
    B, T, H, W = args.batch_size, args.train_vi_len, args.frame_H, args.frame_W
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (B, T, 3, H, W), dtype=torch.uint8, generator=g)
    lab = torch.randint(0, 256, (B, T, 3, H, W), dtype=torch.uint8, generator=g)
    img, lab = to_float(img, speed), to_float(lab, speed)
    fused = speed.device.type == "cuda" and not eager
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=fused or None)
    train_model = torch.compile(model, mode=speed.compile_mode) if speed.compile else model
    tf = args.tf == "on"

    def forward():
        with speed.autocast():
            return train_model(img, lab, tf, fast=speed.fast, grad_ckpt=args.grad_ckpt and not eager,
                               warp_loss=args.warp_loss)

    def step():
        out = forward()
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if eager:
            out["loss"].item()  # the lab logs the loss every step: one host sync per step
        else:
            bool(torch.isfinite(norm))  # the Trainer's one sync per step (non-finite check)
        opt.step()

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync(speed.device)
    warm_s = time.perf_counter() - t0
    if speed.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(speed.device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(speed.device)
    dt = time.perf_counter() - t0
    peak = peak_mb(speed.device)
    opt.zero_grad(set_to_none=True)
    act = peak_memory_growth(lambda: forward()["loss"].backward(), speed.device) / 2**20 / (B * T)
    return B * (T - 1) * args.steps / dt, peak, act, warm_s


def time_generation(model, speed, args, n_seq, plain):
    H, W, L = args.frame_H, args.frame_W, args.gen_len
    g = torch.Generator().manual_seed(0)
    first = to_float(torch.randint(0, 256, (n_seq, 3, H, W), dtype=torch.uint8, generator=g), speed)
    labels = to_float(torch.randint(0, 256, (n_seq, L, 3, H, W), dtype=torch.uint8, generator=g), speed)
    eps = model.sample_noise(n_seq, L, H, W, generator=g).to(speed.device)
    # One untimed rollout: compile, cuDNN autotuning, oneDNN's kernels and allocator warm-up. The
    # plain path generates one sequence at a time, so one sequence warms it up.
    k = 1 if plain else n_seq
    t0 = time.perf_counter()
    rollout(model, first[:k], labels[:k], eps[:, :k], speed)
    sync(speed.device)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    rollout(model, first, labels, eps, speed)
    sync(speed.device)
    return n_seq * (L - 1) / (time.perf_counter() - t0), warm_s


def time_data(args, speed, train_steps_per_s):
    """Batches/s of the Trainer's data path (index gather + float conversion) on a 20k-frame store."""
    n, T = 20000, args.train_vi_len
    store = SimpleNamespace(frames=torch.zeros(n, 3, args.frame_H, args.frame_W, dtype=torch.uint8),
                            labels=torch.zeros(n, 3, args.frame_H, args.frame_W, dtype=torch.uint8),
                            starts=torch.arange(0, n - T + 1, T), video_len=T)
    batches = WindowBatches(store, args.batch_size, speed.device)
    plan = batches.epoch(0)
    reps = min(len(plan), 200)
    sync(speed.device)
    t0 = time.perf_counter()
    for i in range(reps):
        img, lab = batches.gather(plan[i])
        to_float(img, speed), to_float(lab, speed)
    sync(speed.device)
    rate = reps / (time.perf_counter() - t0)
    return rate, rate / max(train_steps_per_s, 1e-9)


def flops_per_frame(model, speed, args):
    """FLOPs of one training step (forward + backward) per predicted frame, counted by PyTorch, for
    the step the fast path times: its teacher forcing, and the recomputation of --grad_ckpt."""
    from torch.utils.flop_counter import FlopCounterMode
    B, T = 1, args.train_vi_len
    x = torch.rand(B, T, 3, args.frame_H, args.frame_W, device=speed.device)
    m = copy.deepcopy(model).float()
    with FlopCounterMode(display=False) as counter:
        m(x, x, args.tf == "on", fast=True, grad_ckpt=args.grad_ckpt, warp_loss=args.warp_loss)["loss"].backward()
    return counter.get_total_flops() / (B * (T - 1))


def matmul_tflops(device, dtype, n=4096, reps=3):
    """TFLOP/s of an n x n matmul: the roofline's compute ceiling as this device reaches it."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12


def measure(base, plain, fast, args, log):
    """One round: the plain path, then the fast path, on fresh copies of the model."""
    res = {}
    if not args.skip_eager:
        m = prepare_model(copy.deepcopy(base), plain)
        (res["eager_train_frames_per_s"], res["eager_peak_mem_mb"], res["eager_act_mem_mb_per_sample_frame"],
         _) = time_training(m, plain, args, eager=True)
        log(f"eager train: {res['eager_train_frames_per_s']:.1f} frames/s, "
            f"activations {res['eager_act_mem_mb_per_sample_frame']:.2f} MB per sample-frame")
        # The same sequences as the fast path's batch, one after another as the plain path runs them.
        res["eager_gen_frames_per_s"], _ = time_generation(m, plain, args, args.gen_seqs, plain=True)
        log(f"eager generation ({args.gen_seqs} sequences, one at a time): {res['eager_gen_frames_per_s']:.1f} frames/s")
        del m
    if fast.device.type == "cuda":
        torch.cuda.empty_cache()
    m = prepare_model(copy.deepcopy(base), fast)
    tfps, peak, act, warm_s = time_training(m, fast, args, eager=False)
    res.update(train_frames_per_s=tfps, peak_mem_mb=peak, act_mem_mb_per_sample_frame=act, warmup_s=warm_s)
    what = "peak memory" if fast.device.type == "cuda" else "process peak RSS so far"
    log(f"fast train: {tfps:.1f} frames/s, {what} {peak:.0f} MB, activations {act:.2f} MB per sample-frame"
        f" (warm-up {warm_s:.1f}s)")
    res["gen_1seq_frames_per_s"], res["gen_warmup_s"] = time_generation(m, fast, args, 1, plain=False)
    res["gen_frames_per_s"], _ = time_generation(m, fast, args, args.gen_seqs, plain=False)
    res["gen_batch_seconds"] = args.gen_seqs * (args.gen_len - 1) / res["gen_frames_per_s"]
    log(f"fast generation: {res['gen_1seq_frames_per_s']:.1f} frames/s (1 sequence), "
        f"{res['gen_frames_per_s']:.1f} frames/s ({args.gen_seqs} sequences: {res['gen_batch_seconds']:.3f} s); "
        f"first rollout (warm-up) {res['gen_warmup_s']:.1f} s")
    res["data_batches_per_s"], res["data_over_train"] = time_data(args, fast, tfps / (args.batch_size * (args.train_vi_len - 1)))
    log(f"data path: {res['data_batches_per_s']:.0f} batches/s, {res['data_over_train']:.0f}x the training step rate")
    if "eager_train_frames_per_s" in res:
        res["train_speedup"] = tfps / res["eager_train_frames_per_s"]
        res["gen_speedup"] = res["gen_frames_per_s"] / res["eager_gen_frames_per_s"]
        log(f"speed-up: training {res['train_speedup']:.2f}x, generation {res['gen_speedup']:.2f}x")
    return res


def main(argv=None):
    try:
        return run(argv)
    except KeyboardInterrupt:
        print("error: interrupted; no figures (they are printed when every round is done)", file=sys.stderr)
        return 130


def run(argv=None):
    args = get_parser().parse_args(argv)
    try:
        check_common(args)
        check_model(args)
        check_warp_loss(args)
        if (args.compile_gen and args.compile_mode in ("reduce-overhead", "max-autotune")
                and args.device.startswith("cuda") and args.cuda_graphs != "off" and not args.plain):
            raise ConfigError(f"--compile_mode {args.compile_mode} captures CUDA graphs itself, and the generation "
                              "step is captured already: use default or max-autotune-no-cudagraphs with --compile_gen")
        for k in ("steps", "rounds", "gen_len", "gen_seqs", "batch_size", "train_vi_len", "warmup"):
            least = 2 if k in ("gen_len", "train_vi_len") else 0 if k == "warmup" else 1
            if getattr(args, k) < least:
                raise ConfigError(f"--{k} must be at least {least}, got {getattr(args, k)}")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    fast = resolve_speed(args)
    fast.compile_gen, fast.compile_mode = args.compile_gen, args.compile_mode
    plain = Speed(device=fast.device, amp=False, channels_last=False, compile=False, cuda_graphs=False, fast=False)
    base = build_model(vars(args))
    res = {"device": torch.cuda.get_device_name(fast.device) if fast.device.type == "cuda" else f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)",
           "torch": torch.__version__, "batch_size": args.batch_size, "train_vi_len": args.train_vi_len,
           "gen_len": args.gen_len, "gen_seqs": args.gen_seqs, "teacher_forcing": args.tf,
           "dims": [args.F_dim, args.L_dim, args.N_dim, args.D_out_dim],
           "fast": {"amp": fast.amp, "channels_last": fast.channels_last, "compile": fast.compile,
                    "compile_mode": args.compile_mode, "cuda_graphs": fast.cuda_graphs,
                    "compile_gen": fast.compile_gen, "grad_ckpt": args.grad_ckpt, "malloc_cache": fast.malloc_cache},
           "warp_loss": args.warp_loss,
           # What peak_mem_mb is (see peak_mb): on the CPU it is not the fast path's own after the plain one.
           "peak_mem_of": ("the allocator's peak of the timed training steps" if fast.device.type == "cuda" else
                           "the process's peak resident memory so far" + ("" if args.skip_eager else
                                                                          ", the plain path's included"))}

    def log(msg):
        if not args.json:
            print(msg, flush=True)

    if fast.malloc_cache:
        # Process-wide, so on from the start: the plain path gets it too (on this project's CPU
        # it makes the plain step ~2% faster), which keeps the ratio conservative.
        keep_freed_memory()
    rounds = []
    for r in range(args.rounds):
        if args.rounds > 1:
            log(f"-- round {r + 1} of {args.rounds}")
        try:
            rounds.append(measure(base, plain, fast, args, log))
        except RuntimeError as e:
            if not is_out_of_memory(e):
                raise
            print(f"error: out of memory at batch {args.batch_size} x {args.train_vi_len} frames on {fast.device}: "
                  f"add --grad_ckpt (fast path) or lower --batch_size; --skip_eager leaves out the plain path, "
                  f"which needs the most. ({first_line(e)})", file=sys.stderr)
            return 2
    # Each figure is the median over rounds: the paths alternate, so a slow spell of the machine
    # touches both instead of one.
    for k in rounds[0]:
        res[k] = statistics.median(x[k] for x in rounds)
    if args.rounds > 1:
        for k in ("train_speedup", "gen_speedup"):
            if k in rounds[0]:
                res[k + "_rounds"] = [x[k] for x in rounds]
    fpf = flops_per_frame(base.to(fast.device), fast, args)
    res["gflop_per_train_frame"] = fpf / 1e9
    res["train_tflops"] = fpf * res["train_frames_per_s"] / 1e12
    dtype = torch.bfloat16 if fast.amp else torch.float32
    res["matmul_peak_tflops"] = matmul_tflops(fast.device, dtype)
    log(f"{fpf / 1e9:.2f} GFLOP per training frame (fwd+bwd) -> {res['train_tflops']:.2f} TFLOP/s achieved, "
        f"{100 * res['train_tflops'] / res['matmul_peak_tflops']:.0f}% of a large {str(dtype)[6:]} matmul on this "
        f"device ({res['matmul_peak_tflops']:.2f} TFLOP/s)")
    if args.rounds > 1:
        log("median of rounds: " + ", ".join(f"{k} {res[k]:.2f}" for k in rounds[0]))
    if args.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
