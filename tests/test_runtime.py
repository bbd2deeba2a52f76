"""Process and device settings of the fast path (modules/runtime.py)."""
import os
import subprocess
import sys
import textwrap

import pytest

from modules.options import trainer_parser
from modules.runtime import _mallopt, resolve_speed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
glibc = pytest.mark.skipif(_mallopt() is None, reason="needs glibc's mallopt")


@glibc
def test_malloc_cache_is_on_for_the_cpu_fast_path_only():
    def speed(*flags):
        return resolve_speed(trainer_parser().parse_args(["--device", "cpu", *flags]))
    assert speed().malloc_cache
    assert not speed("--malloc_cache", "off").malloc_cache
    assert not speed("--plain").malloc_cache


PROBE = textwrap.dedent("""
    import resource, sys, torch
    from modules.runtime import keep_freed_memory
    if sys.argv[1] == "keep":
        assert keep_freed_memory()
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):  # the heap grows to its steady state (glibc needed 7 rounds here)
        torch.empty(64 * 2**20, dtype=torch.uint8).fill_(1)
    before = faults()
    for _ in range(10):
        torch.empty(64 * 2**20, dtype=torch.uint8).fill_(1)
    print(faults() - before)
""")


@glibc
def test_keep_freed_memory_reuses_large_blocks_instead_of_faulting_in_new_pages():
    """64 MB tensors allocated, filled and freed one after the other: by default each is a fresh
    mmap (16,384 pages faulted in each); with the cache, once the heap has grown, blocks are
    reused and nothing faults in."""
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                             cwd=ROOT)
        return int(out.stdout.split()[-1])
    assert faults("default") > 10 * 16384 * 0.9
    assert faults("keep") < 1000


def test_the_plain_path_on_a_gpu_keeps_float32_matmuls_and_convolutions():
    """prepare_model turned TF32 on for every CUDA run, --plain (the float32 reference) included.
    Checked without a GPU: a module whose .to() stays on the CPU, and the backends' flags."""
    import torch
    from modules.runtime import Speed, prepare_model

    class Stays(torch.nn.Module):
        def to(self, *a, **kw):
            return self
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    try:
        for fast in (False, True, False):
            speed = Speed(device=torch.device("cuda"), amp=fast, channels_last=False, compile=False,
                          cuda_graphs=False, fast=fast)
            prepare_model(Stays(), speed)
            assert torch.backends.cuda.matmul.allow_tf32 is fast and torch.backends.cudnn.allow_tf32 is fast
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.benchmark) = before


def test_cpu_peak_memory_growth_forgets_earlier_sessions():
    """The profiler's running total carried blocks allocated under an earlier measurement and
    freed after it: each later measurement (the fast path after the plain one, every --rounds
    round) came out larger by them."""
    import torch
    from modules.runtime import peak_memory_growth
    cpu, mib = torch.device("cpu"), 2 ** 20
    kept = []

    def temporary():  # 1 MiB, freed inside the measurement
        torch.empty(mib, dtype=torch.uint8).fill_(1)

    def keeps():  # 8 MiB, freed only after the measurement ended
        kept.append(torch.empty(8 * mib, dtype=torch.uint8).fill_(1))
    first = peak_memory_growth(temporary, cpu)
    assert peak_memory_growth(keeps, cpu) >= 8 * mib
    kept.clear()
    again = [peak_memory_growth(temporary, cpu) for _ in range(2)]
    assert mib <= first < 2 * mib and all(mib <= g < 2 * mib for g in again), (first, again)


def test_imports_and_plots_leave_the_process_as_they_found_it(tmp_path):
    """Importing the benchmark set KINETO_LOG_LEVEL and put the repository on sys.path (as did
    error_regions); every PSNR plot switched matplotlib to Agg, so a notebook's figures stopped
    showing after a Trainer or Tester run in it."""
    probe = textwrap.dedent(f"""
        import os, sys
        import matplotlib
        matplotlib.use("svg")
        path, env = list(sys.path), dict(os.environ)
        from scripts import bench, error_regions, plot_report
        from modules.visualize import psnr_figure, save_psnr_plot
        assert sys.path == path and dict(os.environ) == env, "import changed sys.path or the environment"
        save_psnr_plot({{"val": [20.0, 21.0]}}, {str(tmp_path / "p.png")!r})
        plot_report.save(plot_report.figure(figsize=(2, 2))[0], {str(tmp_path / "q.png")!r})
        print(matplotlib.get_backend())
    """)
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "svg"
    assert (tmp_path / "p.png").stat().st_size > 0 and (tmp_path / "q.png").stat().st_size > 0


@pytest.mark.parametrize("amp", [False, True])
def test_captured_step_replays_each_frames_prev_pose_and_noise(monkeypatch, amp):
    """The captured generation step copies each frame's inputs (previous frame, pose features and
    noise) into the graph's static buffers before the replay; without the noise's copy every frame
    replayed the first frame's noise. Checked on the CPU with a faked capture whose graph records
    the torch calls made while capturing and replays them: tensors made during the capture are
    recomputed, every other tensor (static buffers, weights) is read as it is at replay time, as a
    CUDA graph reads its captured addresses, and the results are written back into the captured
    tensors. The captured rollout must give the eager one's frames, frame by frame."""
    import contextlib

    import torch
    from torch.overrides import TorchFunctionMode
    from torch.utils._pytree import tree_leaves, tree_map

    from helpers import fake_cuda_graphs, jitter
    from modules import VAE_Model
    from modules.runtime import Speed, rollout

    class Recorder(TorchFunctionMode):
        def __init__(self, calls):
            super().__init__()
            self.calls = calls

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            result = func(*args, **kwargs)
            self.calls.append((func, args, kwargs, result))  # holds the tensors: their ids stay unique
            return result

    replays = []

    class FakeGraph:
        def __init__(self):
            self.calls = []

        @torch.no_grad()
        def replay(self):
            replays.append(self)
            new = {}

            def sub(a):
                return new.get(id(a), a) if isinstance(a, torch.Tensor) else a
            for func, args, kwargs, result in self.calls:
                out = func(*tree_map(sub, args), **tree_map(sub, kwargs))
                for r, o in zip(tree_leaves(result), tree_leaves(out)):
                    if isinstance(r, torch.Tensor):
                        new[id(r)] = o
            for _, _, _, result in self.calls:
                for r in tree_leaves(result):
                    if isinstance(r, torch.Tensor) and r._base is None and new[id(r)] is not r:
                        r.copy_(new[id(r)])

    @contextlib.contextmanager
    def capture(graph):
        with Recorder(graph.calls):
            yield

    fake_cuda_graphs(monkeypatch, FakeGraph, capture)

    torch.manual_seed(0)
    model = jitter(VAE_Model(16, 8, 4, 16, prior="learned", residual=True)).eval()
    torch.nn.init.normal_(model.Generator[-1].weight, std=0.1)
    g = torch.Generator().manual_seed(1)
    first, labels = torch.rand(2, 3, 16, 32, generator=g), torch.rand(2, 6, 3, 16, 32, generator=g)
    eps = model.sample_noise(2, 6, 16, 32, generator=g)
    cpu = torch.device("cpu")
    eager_speed = Speed(cpu, amp, False, False, False, True)
    captured = rollout(model, first, labels, eps, Speed(cpu, amp, False, False, True, True))
    assert len(replays) == 5 and len(replays[0].calls) > 50  # the frames came from the replays
    eager = rollout(model, first, labels, eps, eager_speed)
    one_noise = rollout(model, first, labels, eps[:1].expand_as(eps), eager_speed)
    assert (eager[:, 2:] - one_noise[:, 2:]).abs().amax(dim=(0, 2, 3, 4)).min() > 2e-3  # each frame's noise matters
    assert (eager[:, 2] - eager[:, 1]).abs().max() > 1e-2  # and each frame's previous one moves
    for t in range(eager.shape[1]):
        torch.testing.assert_close(captured[:, t], eager[:, t], rtol=0, atol=1e-6, msg=f"frame {t}")
