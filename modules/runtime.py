"""Device, precision and speed settings, and the captured generation step.

The plain path (`--plain`) is the reference: per-frame loop, float32, no channels_last, compile or
CUDA graphs. The fast path computes the same function (tests check it on CPU in float32)."""
import copy
import ctypes
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class Speed:
    device: torch.device
    amp: bool            # bfloat16 autocast
    channels_last: bool
    compile: bool        # torch.compile the training forward
    cuda_graphs: bool    # capture the generation step
    fast: bool           # batch the teacher-forced frames of a sequence
    compile_gen: bool = False  # torch.compile the generation step (before any graph capture)
    compile_mode: str = "default"  # torch.compile's mode wherever compile is on
    malloc_cache: bool = False  # keep freed host memory in the process (see keep_freed_memory)

    def autocast(self, cache_enabled=True):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp,
                              cache_enabled=cache_enabled)


def cpu_has_bf16():
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_speed(args):
    """Turn the 'auto' flags into settings that are best on the device in use."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"

    def pick(value, auto):
        return False if args.plain else (auto if value == "auto" else value == "on")

    return Speed(
        device=device,
        amp=pick(args.amp, cuda or cpu_has_bf16()),
        channels_last=pick(args.channels_last, True),
        compile=pick(args.compile, cuda),
        cuda_graphs=pick(args.cuda_graphs, cuda) and cuda,
        fast=not args.plain,
        malloc_cache=pick(args.malloc_cache, device.type == "cpu" and _mallopt() is not None),
    )


def _mallopt():
    """glibc's mallopt, or None (another C library, or not Linux)."""
    try:
        return ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return None


def keep_freed_memory():
    """Make glibc's malloc keep freed memory for reuse (process-wide; returns whether it could).

    By default glibc serves every block over 32 MB with a fresh mmap and unmaps it when freed, and
    trims the heap's top: a CPU training step at the lab's dims allocates its large activations
    again each step, 0.6-1.2 GiB of new pages that the kernel must fault in and zero (measured:
    165,000-310,000 page faults and 0.3-0.5 s of system time per step, batch 2). With mmap off and
    trimming off, freed blocks are reused: no faults after the first steps, 12.4-13.5 -> 14.4-14.7
    training frames/s. The process keeps its peak footprint until it exits."""
    mallopt = _mallopt()
    if mallopt is None:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def peak_memory_growth(fn, device):
    """Bytes: the most memory allocated at once while fn() runs, above what was allocated when it
    started. CUDA: the caching allocator's peak statistic. CPU: the profiler's record of every
    allocation (frees of older blocks are not in it, so this is an upper bound when fn frees
    memory it did not allocate)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    import json
    import os
    import tempfile
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    memory = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    if not memory:
        return 0
    # The profiler's running total does not start at 0 in every session: blocks allocated under an
    # earlier profiler and freed after it stopped stay counted. What it held before the first event
    # is that event's total less its own allocation.
    base = memory[0]["args"]["Total Allocated"] - memory[0]["args"]["Bytes"]
    return max(e["args"]["Total Allocated"] for e in memory) - base


def prepare_model(model, speed):
    """Move the model to the device in the settings' memory format, and set the process up for
    them (CUDA math modes, the host memory cache)."""
    if speed.malloc_cache:
        keep_freed_memory()
    model.to(speed.device)
    if speed.channels_last:
        model.to(memory_format=torch.channels_last)
    if speed.device.type == "cuda":
        # TF32 for any float32 matmul/conv left outside autocast; the reference path (--plain) is
        # float32 throughout (cuDNN's convolutions would run in TF32 by PyTorch's default).
        torch.backends.cuda.matmul.allow_tf32 = speed.fast
        torch.backends.cudnn.allow_tf32 = speed.fast
        torch.backends.cudnn.benchmark = True
    return model


def to_float(x, speed):
    """uint8 images (..., 3, H, W) -> float32 in [0, 1] on the device."""
    return x.to(speed.device, non_blocking=True).float().div_(255.0)


def with_bf16_convs(model):
    """A copy of model whose convolutions hold weights and biases in bfloat16, the values autocast
    casts them to at every call; under autocast it computes the same function (a test checks the
    rollouts are equal). Other modules (the pose encoder's BatchNorm) are left as they are."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.to(torch.bfloat16)
    return model


def make_step_fn(model, speed, z_mode, example):
    """The per-frame generation step for `model.generate`. On CUDA with graphs on, the step is
    captured once for the example shapes (prev, label_feat, eps) and replayed: one launch per frame
    instead of one per kernel. Otherwise the eager step, run under the caller's speed.autocast().
    With speed.compile_gen the step is compiled first (fused element-wise kernels, so fewer
    kernels per frame); the compiled step is captured like the eager one."""
    if speed.amp:
        # A captured or compiled step keeps no autocast cache: each call would cast every
        # convolution's weights to bfloat16 again (169 casts per step at the lab's dims, about as
        # many kernels as the step itself runs); an eager one would cast the ConvFFN's weight
        # halves, views that autocast does not cache. Cast once; the step computes the same function.
        model = with_bf16_convs(model)
    step = torch.compile(model.step, dynamic=False, mode=speed.compile_mode) if speed.compile_gen else model.step
    if not speed.cuda_graphs:
        def eager(prev, label_feat, eps):  # called under speed.autocast(), which the rollout holds
            return step(prev, label_feat, eps, z_mode).float()
        return eager

    static = [t.clone() for t in example]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), speed.autocast(cache_enabled=False):
        for _ in range(3):  # warm-up outside the capture (compile, cuDNN autotuning, allocator)
            step(*static, z_mode)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    # Autocast's weight-cast cache must be off while capturing (its tensors would be freed).
    with torch.cuda.graph(graph), speed.autocast(cache_enabled=False):
        out = step(*static, z_mode).float()

    def replay(prev, label_feat, eps):
        static[0].copy_(prev)
        static[1].copy_(label_feat)
        static[2].copy_(eps)
        graph.replay()
        return out.clone()
    # The graph reads the weights at the addresses it was captured with and holds no reference to
    # them: the model (the bf16 copy made above, which nothing else holds) must live as long as
    # the replay, or the allocator hands its memory to the frames (NaN from the 6th frame, H100).
    replay.model = model
    return replay


@torch.no_grad()
def rollout(model, first, labels, eps, speed, z_mode="sample"):
    """Generate (B, L, 3, H, W) float32 on the device from the first frames (B, 3, H, W) and the
    poses (B, L, 3, H, W) in [0, 1], with noise eps (L-1, B, N, H, W). The one rollout used by
    validation, the Tester and the benchmark."""
    was_training = model.training
    model.eval()
    try:
        if not speed.fast:
            return model.generate_plain(first, labels, eps, z_mode)
        fmt = torch.channels_last if speed.channels_last else torch.contiguous_format
        first = first.contiguous(memory_format=fmt)
        with speed.autocast():
            # Pose features of the whole sequence are computed once, before the loop.
            B, L = labels.shape[:2]
            label_feat = model.encode_labels(labels[:, 1:].flatten(0, 1)).unflatten(0, (B, L - 1))
            if model.condition == "first":  # no frame reads another: batches of frames, no loop
                # On the CPU small batches are fastest (lab dims, bf16, 2 threads, measured:
                # 40.6 / 38.0 / 28.1 frames/s at 8 / 32 / 128 frames, peak memory +0.2 / 0.5 /
                # 1.3 GB); a GPU wants large ones.
                chunk = 256 if first.is_cuda else 8
                return model.generate_from_first(first, label_feat, eps, z_mode, chunk=chunk,
                                                 first_label=labels[:, 0].contiguous(memory_format=fmt)).float()
        step = make_step_fn(model, speed, z_mode, (first, label_feat[:, 0], eps[0]))
        # One autocast context for the whole loop: its cache casts the weights once, not per frame
        # (2-3% of a CPU rollout, measured). A replayed graph runs no autocast op.
        with speed.autocast():
            return model.generate(first, None, eps, z_mode, step_fn=step, label_feat=label_feat)
    finally:
        model.train(was_training)
