"""Per-epoch schedules: KL weight (beta), teacher-forcing ratio and its coins, learning rate.
Each is a pure function of the epoch (and the seed), so a resumed or distributed run recomputes
exactly the values an uninterrupted single process would use."""
import math
import random


def frange_cycle_linear(n_iter, start=0.0, stop=1.0, n_cycle=4, ratio=0.5):
    """Cyclical annealing (Fu et al., NAACL 2019): n_cycle cycles over n_iter steps, each rising
    linearly from start to stop over the first `ratio` of the cycle, then held at stop."""
    schedule = [stop] * n_iter
    period = n_iter / n_cycle
    step = (stop - start) / (period * ratio)
    for c in range(n_cycle):
        v, i = start, 0
        while v <= stop and int(i + c * period) < n_iter:
            schedule[int(i + c * period)] = v
            v += step
            i += 1
    return schedule


def kl_beta(epoch, kl_anneal_type, num_epoch, kl_anneal_cycle=10, kl_anneal_ratio=1.0):
    """beta used during `epoch` (0-based)."""
    if kl_anneal_type == "Full_KL":
        return 1.0
    if kl_anneal_type == "None":
        return 0.0
    cycles = kl_anneal_cycle if kl_anneal_type == "Cyclical" else 1
    if kl_anneal_type not in ("Cyclical", "Monotonic"):
        raise ValueError(f"unknown kl_anneal_type {kl_anneal_type!r}")
    return frange_cycle_linear(num_epoch, n_cycle=cycles, ratio=kl_anneal_ratio)[min(epoch, num_epoch - 1)]


def kl_schedule_note(kl_anneal_type, num_epoch, kl_anneal_cycle=10, kl_anneal_ratio=1.0):
    """A warning when an annealed beta is 0 in every epoch (Cyclical with more cycles than epochs:
    each cycle starts at 0 and lasts less than an epoch, and beta is set once per epoch), or when
    --kl_anneal_ratio over 1 keeps it below 1/ratio; else None."""
    if kl_anneal_type not in ("Cyclical", "Monotonic") or num_epoch < 1:
        return None
    top = max(kl_beta(e, kl_anneal_type, num_epoch, kl_anneal_cycle, kl_anneal_ratio) for e in range(num_epoch))
    if top == 0:
        return (f"note: --kl_anneal_type {kl_anneal_type} with --kl_anneal_cycle {kl_anneal_cycle} over --num_epoch "
                f"{num_epoch} gives beta 0 in every epoch (beta is set once per epoch, and each cycle starts at 0), "
                "so the KL term is never trained and the prior that validation and testing sample from is not the "
                "posterior's; use more epochs than cycles, or --kl_anneal_type Full_KL")
    if kl_anneal_ratio > 1:
        # Accepted, as the lab's schedule accepts it: a ramp longer than the cycle, cut off by the next.
        return (f"note: --kl_anneal_ratio {kl_anneal_ratio:g} is the share of each cycle over which beta rises "
                f"to 1; over 1, the cycle ends first, and beta reaches at most {top:.2f} in this run")
    return None


def teacher_forcing_ratio(epoch, tfr, tfr_sde, tfr_d_step):
    """The lab's schedule: after each finished epoch e (counted from 1) with e >= tfr_sde the ratio
    drops by tfr_d_step, floored at 0 (so the first epoch runs at tfr, and tfr_sde 0 acts as 1).
    Returns the ratio used during `epoch` (0-based)."""
    decays = max(0, epoch + 1 - max(tfr_sde, 1))
    return max(tfr - tfr_d_step * decays, 0.0)


class TeacherForcingCoins:
    """Draws the teacher-forcing decisions of one epoch from a stream seeded by (seed, epoch):
    the same on every rank and after a resume. mode 'epoch' flips one coin for the epoch (the
    lab's), 'step' one per training step, 'frame' one per predicted frame of each step."""

    def __init__(self, seed, epoch, ratio, mode="epoch"):
        self.rng = random.Random(seed * 1_000_003 + epoch)
        self.ratio, self.mode = ratio, mode
        self.epoch_coin = self.rng.random() < ratio

    def draw(self, n_frames):
        """Decisions for one step: a bool (whole sequence) or a list of n_frames bools."""
        if self.mode == "epoch":
            return self.epoch_coin
        if self.mode == "step":
            return self.rng.random() < self.ratio
        return [self.rng.random() < self.ratio for _ in range(n_frames)]


def lr_factor(progress, args):
    """Learning-rate multiplier at `progress` epochs (a float: stepped every iteration)."""
    if args.scheduler == "multistep":
        return args.gamma ** sum(1 for m in args.milestones if math.floor(progress) >= m)
    if args.scheduler == "step":
        return args.gamma ** (math.floor(progress) // args.step_size)
    if args.scheduler == "cosine":
        if progress < args.warmup_epochs:
            return (progress + 1e-3) / (args.warmup_epochs + 1e-3)
        span = max(args.num_epoch - args.warmup_epochs, 1e-8)
        t = min((progress - args.warmup_epochs) / span, 1.0)
        floor = args.min_lr / args.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    return 1.0
