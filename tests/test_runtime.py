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
