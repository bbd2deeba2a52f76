"""Training and validation loops, shared by Trainer.py (and torchrun) and the benchmark."""
import collections
import math
import warnings

import torch
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from .metrics import sequence_psnr
from .runtime import rollout, to_float
from .schedules import TeacherForcingCoins, kl_beta, lr_factor, teacher_forcing_ratio


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite losses."""


class SpikeGuard:
    """Skips an update whose gradient norm is over `k` times the recent norm of its kind of step.

    One update can spoil a run: in a 12-epoch CPU run (docs/RESULTS.md) a single batch gave a
    gradient norm of 1.36 where its neighbours gave 0.007-0.03; after that update the training error
    tripled, validation fell from 30.9 to 25.7 dB, and an epoch later one window's error was 1e10
    times its lowest. Replayed with that one update skipped, the run went on as before it.
    The reference is an exponential average of the norms of the updates taken (about the last 50);
    it acts after WARMUP of them (the first norms fall fast). A run of RUN spikes in a row is a
    lasting change, not one batch: the reference then restarts from it and the update is taken.

    A change of the objective is not an outlier either, so norms are compared within one objective
    (the lab's recurrence in the report's grid, docs/RESULTS.md): teacher-forced and free-running
    steps (step_kind) keep a reference each, a free-running step's norm being 11-26x a teacher-forced
    one's; and a new beta restarts every reference from the next update of its kind, since after
    an epoch at beta 0 the KL's first pull on the posterior was 135-142x the norm before it. Its state
    goes in the checkpoints (`state()`), so a resumed run decides as the uninterrupted one would."""
    WARMUP, DECAY, RUN = 50, 0.98, 5
    KINDS = ("all", "teacher_forced", "free_running")

    def __init__(self, k, state=None):
        """state: what `state()` returned, from a checkpoint (None: a new run)."""
        self.k = k
        self.beta = None   # the objective's beta the references were measured under
        self.kinds = {}    # kind -> {"ref": device tensor (no host sync to update it) or None,
        #                           "taken": updates averaged into ref, "run": spikes in a row}
        if state and "kinds" in state:
            self.beta = state["beta"]
            for kind, s in state["kinds"].items():
                self.kinds[kind] = self._entry(s["ref"], s["taken"], s["run"])
        elif state:  # written before the kinds: one reference for every step
            for kind in self.KINDS:
                self.kinds[kind] = self._entry(state["ref"], state["taken"], state["run"])

    @staticmethod
    def _entry(ref, taken, run):
        return {"ref": None if ref is None else torch.tensor(ref, dtype=torch.float32), "taken": taken, "run": run}

    def _of(self, kind):
        return self.kinds.setdefault(kind, self._entry(None, 0, 0))

    def state(self):
        """Plain numbers for a checkpoint (host syncs: at checkpoints only)."""
        return {"beta": self.beta, "kinds": {kind: {"ref": None if s["ref"] is None else s["ref"].item(),
                                                    "taken": s["taken"], "run": s["run"]}
                                             for kind, s in self.kinds.items()}}

    def begin_epoch(self, beta):
        """Before an epoch's first step (a resumed epoch's too): under a new beta every reference
        restarts from the next update of its kind and acts after it (one still warming up goes on
        warming up)."""
        if self.beta is not None and beta != self.beta:
            for s in self.kinds.values():
                s["ref"], s["taken"], s["run"] = None, min(s["taken"], self.WARMUP - 1), 0
        self.beta = beta

    def reference(self, kind):
        """The average norm a step of this kind is compared with (a host sync)."""
        return self._of(kind)["ref"].item()

    def is_spike(self, norm, kind):
        """A device bool: whether `norm` (finite) is a spike (always False while warming up)."""
        s = self._of(kind)
        if not self.k or s["taken"] < self.WARMUP:
            return torch.zeros((), dtype=torch.bool, device=norm.device)
        return norm > self.k * s["ref"].to(norm.device)  # on the CPU if read from a checkpoint

    def took(self, norm, kind):
        """The update with this (finite) norm was taken."""
        s = self._of(kind)
        norm = norm.detach().float()
        s["ref"] = (norm.clone() if s["ref"] is None
                    else s["ref"].to(norm.device).mul(self.DECAY).add_(norm, alpha=1 - self.DECAY))
        s["taken"] += 1
        s["run"] = 0

    def skips(self, kind):
        """A spike was found: whether to skip its update. The RUN-th in a row is taken instead, and
        its norm becomes the reference (took() is called next with it)."""
        s = self._of(kind)
        s["run"] += 1
        if s["run"] < self.RUN:
            return True
        s["ref"], s["taken"] = None, self.WARMUP - 1
        return False


def step_kind(tf, args):
    """Which of SpikeGuard's references a step is compared with. The lab's recurrence with a
    teacher-forcing coin per epoch or per step makes two kinds of step, teacher-forced and
    free-running; coins per frame mix them within every step, and condition="first" reads no
    previous frame, so every step is of one kind."""
    if getattr(args, "condition", "previous") == "first" or isinstance(tf, list):
        return "all"
    return "teacher_forced" if tf else "free_running"


def largest_share(named):
    """(name, share): the parameter whose gradient holds the largest part of the squared gradient
    norm, and that part. Tells apart the two kinds of skipped update seen so far (docs/RESULTS.md):
    an outlier batch, spread over the decoder's layers, and the KL pulling a uniform offset of the
    posterior's mean back to the prior, nearly all of it in the posterior's last bias. Host
    syncs: called at a skipped update only."""
    named = [(n, p.grad) for n, p in named if p.grad is not None]
    sq = torch.stack([g.detach().float().pow(2).sum() for _, g in named])
    i = int(sq.argmax())
    return named[i][0], (sq[i] / sq.sum()).item()


class OutOfMemory(RuntimeError):
    """A training step ran out of device memory in a run of several processes (one process
    instead stops like an interrupted run, with its position saved)."""


def is_out_of_memory(e):
    # CUDA raises torch.OutOfMemoryError; the CPU allocator a plain RuntimeError.
    return isinstance(e, torch.cuda.OutOfMemoryError) or "can't allocate memory" in str(e)


def first_line(e, limit=160):
    """An error's first line, for the one-line messages (CUDA's run to a paragraph)."""
    return str(e).splitlines()[0][:limit] if str(e) else type(e).__name__


class WindowBatches:
    """Batches of training windows gathered by index from uint8 tensors (on the GPU when they
    fit), so a step costs one gather and a float conversion, never a decode.

    The order comes from a DistributedSampler seeded by (seed, epoch): each rank of a torchrun job
    gets its own shard, a single process gets the whole permutation, and a resumed run replays
    the same order.

    first_from="video" replaces frame 0 of each window with a frame drawn uniformly from the same
    video (for condition="first": the conditioning frame at any distance from the targets). The
    draw is a pure function of (seed, epoch, window), like the posterior noise."""

    def __init__(self, dataset, batch_size, device, seed=0, rank=0, world_size=1, first_from="window"):
        self.frames, self.labels = dataset.frames, dataset.labels
        self.first_from = first_from
        if first_from == "video":
            # (offset, length) of the video that holds each window
            lengths = torch.tensor(dataset.video_lengths, dtype=torch.int64)
            offsets = torch.cumsum(lengths, 0) - lengths
            video = torch.searchsorted(offsets, dataset.starts, right=True) - 1
            self.video_span = torch.stack([offsets[video], lengths[video]], 1)
        self.starts, self.video_len = dataset.starts, dataset.video_len
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        if device.type == "cuda":
            need = 2 * self.frames.numel()
            free, _ = torch.cuda.mem_get_info(device)
            if need < 0.25 * free:
                self.frames, self.labels = self.frames.to(device), self.labels.to(device)
            else:
                self.frames, self.labels = self.frames.pin_memory(), self.labels.pin_memory()
        self.offsets = torch.arange(self.video_len, device=self.frames.device)
        self.starts = self.starts.to(self.frames.device)

    def windows(self, fraction=1.0):
        return max(1, int(len(self.starts) * fraction))

    def steps(self, fraction=1.0):
        return self.windows(fraction) // (self.batch_size * self.world_size)

    def epoch(self, epoch, fraction=1.0):
        """Index tensors of the batches of `epoch` for this rank (incomplete batches dropped)."""
        n = self.windows(fraction)
        sampler = DistributedSampler(range(n), num_replicas=self.world_size, rank=self.rank,
                                     shuffle=True, seed=self.seed, drop_last=True)
        sampler.set_epoch(epoch)
        idx = torch.tensor(list(sampler), dtype=torch.long)
        steps = len(idx) // self.batch_size
        return idx[:steps * self.batch_size].view(steps, self.batch_size)

    def gather(self, idx, epoch=0):
        """(B,) window indices -> uint8 (B, T, 3, H, W) frames and labels."""
        frame_idx = self.starts[idx.to(self.starts.device)][:, None] + self.offsets  # (B, T)
        if self.first_from == "video":
            frame_idx[:, 0] = self.first_frames(idx, epoch).to(frame_idx.device)
        return self.frames[frame_idx], self.labels[frame_idx]

    def first_frames(self, idx, epoch):
        """(B,) window indices -> (B,) frame indices drawn uniformly from each window's video."""
        g = torch.Generator()
        out = []
        for w in idx.tolist():
            offset, length = self.video_span[w].tolist()
            g.manual_seed(((self.seed * 1_000_003 + epoch) * 1_000_003 + w) % 2**63 ^ 0x5EED)
            out.append(offset + int(torch.randint(length, (1,), generator=g)))
        return torch.tensor(out, dtype=torch.int64)


def posterior_noise(windows, epoch, seed, shape, device):
    """Posterior noise eps (B, *shape) for the training windows (B,) of a step. Window w draws its
    noise in `epoch` from a stream seeded by (seed, epoch, w), so the noise does not depend on the
    batch the window lands in, the rank, the world size, or a resume: a torchrun job and one
    process with the same global batch see the same z. One small draw per window."""
    g = torch.Generator(device=device)
    eps = []
    for w in windows.tolist():
        g.manual_seed(((seed * 1_000_003 + epoch) * 1_000_003 + w) % 2**63)
        eps.append(torch.randn(shape, generator=g, device=device))
    return torch.stack(eps)


def epoch_settings(epoch, args):
    """beta, teacher-forcing ratio and data fraction of `epoch`: pure functions of the epoch."""
    beta = kl_beta(epoch, args.kl_anneal_type, args.num_epoch, args.kl_anneal_cycle, args.kl_anneal_ratio)
    tfr = teacher_forcing_ratio(epoch, args.tfr, args.tfr_sde, args.tfr_d_step)
    # The lab's fast training: its first fast_train_epoch epochs use fast_partial of the data instead
    # of partial.
    fraction = args.fast_partial if args.fast_train and epoch < args.fast_train_epoch else args.partial
    return beta, tfr, fraction


def train_one_epoch(train_model, optimizer, batches, epoch, args, speed, params, resume=None,
                    should_stop=lambda: False, is_main=True, all_reduce=None, nan_run=0, watch=None, guard=None):
    """Train one epoch; returns (metrics dict, finished: bool, progress dict).

    params: the model's named parameters, [(name, tensor)], whose gradient is clipped (the names
    are for the note on a skipped update).

    watch: called on the main process at every log point (every --log_every steps, skipped ones
    included) and after the epoch's last step, with the mean training reconstruction error of the
    updates among the last --log_every steps and the number of steps (the Trainer's divergence
    note reads it there, so it needs no epoch to end).

    nan_run: non-finite steps in a row at the end of the previous epoch (progress["nan_run"]), so
    that --max_nan_steps counts across epochs shorter than it.

    guard: the run's SpikeGuard, kept across epochs (default: a new one with --skip_spikes).

    resume: the progress dict of an interrupted epoch ({"step", "windows", "sums", ...}) to
    continue from. Stops early (finished=False) when should_stop() turns true, or when a step runs
    out of memory in a single process (then progress["oom"] holds the error); the progress dict
    then holds what a checkpoint needs to continue from the step that did not run. Metrics are
    averaged over the epoch's windows, over all ranks when `all_reduce` (an all-reduce sum) is
    given."""
    beta, tfr, fraction = epoch_settings(epoch, args)
    coins = TeacherForcingCoins(args.seed, epoch, tfr, args.tf_mode)
    plan = batches.epoch(epoch, fraction)
    steps_per_epoch = len(plan)
    T = args.train_vi_len
    global_batch = batches.batch_size * batches.world_size
    # sums = (loss, recon, kl) weighted by windows, and the window count: averages that do not
    # depend on the batch size or the world size, so an interrupted epoch resumes in either mode
    # (from the step that holds its next window; with another global batch a few windows rerun).
    start, sums, oom = 0, torch.zeros(4, device=speed.device), None
    if resume:
        if "windows" in resume:
            start = resume["windows"] // global_batch
            saved = resume["sums"]
        else:  # written before sums were per window: one process, one count per step
            start, saved = resume["step"], resume["sums"] * batches.batch_size
        if is_main:  # saved sums are totals over the ranks of the interrupted run
            sums = saved.to(speed.device)
    nan_total = resume.get("nan_skipped", 0) if resume else 0
    spikes = resume.get("spikes_skipped", 0) if resume else 0
    guard = guard if guard is not None else SpikeGuard(args.skip_spikes)
    guard.begin_epoch(beta)
    nan_run = resume.get("nan_run", nan_run) if resume else nan_run
    bar = tqdm(range(steps_per_epoch), initial=start, total=steps_per_epoch, disable=not is_main,
               desc=f"epoch {epoch + 1}/{args.num_epoch}", dynamic_ncols=True, leave=False)
    train_model.train()
    step = start
    # The sums of the last --log_every steps (None for a skipped one), kept apart: differences of
    # the running sums lose the small errors that follow a spike (float32; a window of 0 was then
    # the lowest).
    recent = collections.deque(maxlen=args.log_every)
    watched = start  # the step after the previous call of watch

    def watch_window(upto):
        """Hand `watch` the mean training error of the last --log_every steps up to step `upto`
        (exclusive; fewer only when the epoch has run fewer since its start or resume), and their
        number, unless every one was skipped. At a log point they are the steps since the previous
        one; after an epoch's last log point they reach back into its window, so that a few steps
        are not judged alone against a mean of many."""
        nonlocal watched
        watched = upto
        taken = [c for c in recent if c is not None]
        if watch is not None and taken:
            since = torch.stack(taken).sum(0).tolist()
            watch(since[1] / since[3], len(recent))

    for step in range(steps_per_epoch):
        tf = coins.draw(T - 1)  # drawn for skipped steps too, so the stream stays aligned
        if step < start:
            continue
        if should_stop():
            break
        lr = args.lr * lr_factor(epoch + step / max(steps_per_epoch, 1), args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        img, label = batches.gather(plan[step], epoch)
        img, label = to_float(img, speed), to_float(label, speed)
        eps = posterior_noise(plan[step], epoch, args.seed, (T - 1, args.N_dim, *img.shape[-2:]), speed.device)
        try:
            with speed.autocast():
                out = train_model(img, label, tf, eps=eps, beta=beta, recon=args.recon, fast=speed.fast,
                                  grad_ckpt=args.grad_ckpt, warp_loss=args.warp_loss)
            loss = out["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        except RuntimeError as e:
            if not is_out_of_memory(e):
                raise
            # Nothing of this step reached the weights or the optimizer: stop before it, so the
            # position can be saved and the step redone with less memory.
            out = loss = None
            optimizer.zero_grad(set_to_none=True)
            if speed.device.type == "cuda":
                torch.cuda.empty_cache()
            if all_reduce is not None:  # the other ranks wait in this step's collectives
                raise OutOfMemory(f"out of memory at epoch {epoch + 1}, step {step}: {e}") from None
            oom = first_line(e)
            break
        norm = torch.nn.utils.clip_grad_norm_([p for _, p in params],
                                              args.grad_clip if args.grad_clip > 0 else float("inf"))
        # A non-finite loss or gradient skips the update, and so does a spike of the gradient norm
        # (SpikeGuard). This is the one host sync per step.
        finite = torch.isfinite(loss.detach()) & torch.isfinite(norm)
        kind = step_kind(tf, args)
        flags = torch.stack([~finite, finite & guard.is_spike(norm, kind)])
        if all_reduce is not None:
            # Every rank must skip together, or the replicas drift apart (and one rank raising
            # TrainingDiverged alone would leave the others waiting in the next collective).
            flags = all_reduce(flags.float()) > 0
        bad, spike = flags.tolist()
        contrib = None  # the step's sums, for an update taken
        if spike and not bad and guard.skips(kind):
            spikes += 1
            if is_main:
                n, ref = norm.item(), guard.reference(kind)
                name, share = largest_share(params)
                of = "" if kind == "all" else f" of {kind.replace('_', '-')} steps"
                tqdm.write(f"note: epoch {epoch + 1} step {step}: gradient norm {n:.3g}, {n / ref:.0f}x the "
                           f"recent average{of} ({ref:.3g}); update skipped (--skip_spikes {args.skip_spikes:g}); "
                           f"{share:.0%} of its square in {name}")
        elif bad:
            nan_total += 1
            nan_run += 1
            if is_main:
                warnings.warn(f"epoch {epoch + 1} step {step}: non-finite loss or gradient; step skipped "
                              f"({nan_run} in a row)", stacklevel=1)
            if nan_run >= args.max_nan_steps:
                bar.close()  # clears the bar, so the error message starts its own line
                raise TrainingDiverged(f"{nan_run} consecutive non-finite losses at epoch {epoch + 1}; "
                                       "try a lower --lr or --grad_clip")
        else:
            nan_run = 0
            guard.took(norm, kind)
            optimizer.step()
            b = float(img.shape[0])  # loss, recon and kl are means over the step's windows
            contrib = torch.stack([loss.detach().float() * b, out["recon"].detach().float() * b,
                                   out["kl"].detach().float() * b, torch.full((), b, device=speed.device)])
            sums += contrib
        recent.append(contrib)
        bar.update(1)
        if is_main and (step + 1) % args.log_every == 0:  # skipped steps count: the points stay regular
            watch_window(step + 1)
            s = (sums[:3] / sums[3].clamp_min(1)).tolist()
            tf_shown = {"tfr": f"{tfr:.2f}"} if getattr(args, "condition", "previous") == "previous" else {}
            recon = {args.recon: f"{s[1]:.4g}"}  # mse or l1, whichever the loss uses
            bar.set_postfix(loss=f"{s[0]:.4g}", **recon, kl=f"{s[2]:.4g}", beta=f"{beta:.3g}",
                            **tf_shown, lr=f"{lr:.2e}")
    else:
        step = steps_per_epoch
    if is_main and step > watched:
        watch_window(step)  # the steps after the last log point (all of them in an epoch shorter than --log_every)
    bar.close()
    finished = step >= steps_per_epoch
    total = sums.clone()
    if all_reduce is not None:
        total = all_reduce(total)
    progress = {"step": step, "windows": step * global_batch, "sums": total.detach().cpu(),
                "nan_skipped": nan_total, "nan_run": nan_run, "spikes_skipped": spikes}
    if oom is not None:
        progress["oom"] = oom
    n = total[3].item()
    nan = float("nan")  # an epoch whose every step was skipped has no average, not a loss of 0
    metrics = {"loss": total[0].item() / n if n else nan,
               "mse" if args.recon == "mse" else "l1": total[1].item() / n if n else nan,
               "kl": total[2].item() / n if n else nan, "beta": beta, "tfr": tfr, "tf_epoch_coin": coins.epoch_coin,
               "lr": optimizer.param_groups[0]["lr"], "steps": round(total[3].item() / global_batch),
               "nan_skipped": nan_total, "spikes_skipped": spikes}
    return metrics, finished, progress


def validation_noise(model, n_seq, length, H, W, seed):
    """The same prior noise at every validation, so a PSNR change reflects the model alone."""
    g = torch.Generator().manual_seed(seed + 12345)
    return model.sample_noise(n_seq, length, H, W, generator=g)


@torch.no_grad()
def validate(model, val_set, args, speed, max_batch=8):
    """Roll out every validation sequence from its first frame with z from the prior.
    Returns dict(psnr, mse, psnr_per_frame (L-1,) list, pred (L, 3, H, W) and gt of sequence 0)."""
    L = val_set.video_len
    H, W = val_set.frames.shape[-2:]
    eps_all = validation_noise(model, len(val_set), L, H, W, args.seed)
    curves, mses, pred0 = [], [], None
    for lo in range(0, len(val_set), max_batch):
        ids = range(lo, min(lo + max_batch, len(val_set)))
        gt = torch.stack([val_set[i][0] for i in ids])
        lab = torch.stack([val_set[i][1] for i in ids])
        gt, lab = to_float(gt, speed), to_float(lab, speed)
        eps = eps_all[:, lo:lo + len(ids)].to(speed.device)
        pred = rollout(model, gt[:, 0], lab, eps, speed)
        curves.append(sequence_psnr(pred, gt).cpu())  # (b, L-1)
        mses.append((pred[:, 1:] - gt[:, 1:]).pow(2).flatten(2).mean(2).cpu())
        if pred0 is None:
            pred0, gt0 = pred[0].cpu(), gt[0].cpu()
    curve = torch.cat(curves)
    mse = torch.cat(mses).mean().item()
    return {"psnr": curve.mean().item(), "mse": mse, "psnr_per_frame": curve.mean(0).tolist(),
            "pred": pred0, "gt": gt0, "loss": mse if math.isfinite(mse) else float("nan")}
