"""torchrun support: process-group set-up from the environment torchrun provides, and the few
collective helpers the Trainer needs. A plain `python Trainer.py` is a world of one."""
import ctypes
import os
import signal
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .options import ConfigError


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def sum(self, t):
        """A copy of `t` summed over ranks. For averages the caller sums values and counts and
        divides afterwards (see engine.train_one_epoch), which stays right when ranks differ in
        counts."""
        if not self.enabled:
            return t
        t = t.clone()
        dist.all_reduce(t)
        return t

    def any(self, flag, device):
        """True on every rank if `flag` is true on any rank."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def broadcast_object(self, obj):
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def setup(args):
    """Join the process group when launched by torchrun (WORLD_SIZE > 1). On CUDA each rank takes
    the card LOCAL_RANK and NCCL; on CPU, gloo. Updates args.device for the rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:  # WORLD_SIZE left over from a job script or another launcher
        raise ConfigError(f"WORLD_SIZE={world} is set but {', '.join(missing)} not: this process was not started "
                          "by torchrun; launch it with torchrun, or unset WORLD_SIZE")
    stop_with_launcher()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if args.device.startswith("cuda"):
        torch.cuda.set_device(local)
        args.device = f"cuda:{local}"
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend)
    return Dist(rank=rank, local_rank=local, world_size=world)


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def stop_with_launcher():
    """Have Linux send this process SIGTERM when its parent, the torchrun launcher, dies.

    torchrun starts every process in a session of its own and forwards the signals it receives; a
    launcher killed outright (`kill -9`, the out-of-memory killer) forwards nothing, and its
    processes would train on unattended, holding the GPUs and the run folder's lock. With this they
    stop as on `kill -TERM`: they finish the step and rank 0 writes last.ckpt. Not covered: a
    launcher that dies in the second or two between starting a process and this call. Elsewhere
    than Linux it does nothing. Returns whether it was set."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def cleanup(d):
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def lost_peer(e):
    """Whether exception e says another process of the torchrun job is gone (it crashed or stopped
    with its own message), as opposed to a failure of this process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    kinds = tuple(k for k in (getattr(dist, "DistBackendError", None), getattr(dist, "DistNetworkError", None)) if k)
    return isinstance(e, kinds) or any(s in str(e) for s in ("closed by peer", "reset by peer"))
