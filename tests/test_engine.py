"""The training loop's pieces, driven directly: the windows a batch gathers (first frame from the
video), the learning rate of every step, the skipped non-finite steps, the gradient clipping."""
import math

import pytest
import torch

from modules.engine import WindowBatches, train_one_epoch
from modules.model import VAE_Model
from modules.options import trainer_parser
from modules.runtime import Speed

CPU = torch.device("cpu")


def _speed():
    return Speed(CPU, amp=False, channels_last=False, compile=False, cuda_graphs=False, fast=False)


class _Data:
    """What WindowBatches reads from a TrainWindows: videos of random uint8 frames and labels, cut
    into windows of T frames. Pixel (0, 0, 0) of frame i holds i (of label i: 100 + i), so a
    gathered frame names its index; every other pixel is random."""

    def __init__(self, video_lengths, T, size=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        n = sum(video_lengths)
        self.frames = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
        self.labels = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
        self.frames[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
        self.labels[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8) + 100
        starts, offset = [], 0
        for length in video_lengths:
            starts += list(range(offset, offset + length - T + 1, T))
            offset += length
        self.starts = torch.tensor(starts, dtype=torch.int64)
        self.video_len = T
        self.video_lengths = list(video_lengths)


# ----------------------------------------------------------------------------- first frame from the video

def test_first_frame_from_the_video_comes_with_its_own_label():
    """first_from="video": frame 0 of a window is another frame of its video, and label 0 must be
    that frame's pose (not the pose of the window's own frame 0); positions 1.. are the window's."""
    data = _Data([20, 28], T=4)  # windows 0-4 in video 0 (frames 0-19), 5-11 in video 1 (20-47)
    assert len(data.starts) == 12
    b = WindowBatches(data, 2, CPU, seed=5, first_from="video")
    moved = 0
    for epoch in range(6):
        frames, labels = b.gather(torch.arange(12), epoch)
        assert frames.shape == labels.shape == (12, 4, 3, 16, 16)
        for w in range(12):
            s = int(data.starts[w])
            f = int(frames[w, 0, 0, 0, 0])  # the index of the frame drawn for position 0
            lo, hi = (0, 20) if w < 5 else (20, 48)
            assert lo <= f < hi
            assert torch.equal(frames[w, 0], data.frames[f])
            assert torch.equal(labels[w, 0], data.labels[f]), (epoch, w, f, s)
            assert torch.equal(frames[w, 1:], data.frames[s + 1:s + 4])
            assert torch.equal(labels[w, 1:], data.labels[s + 1:s + 4])
            moved += f != s
    assert moved > 30  # most draws are not the window's own first frame: the check above bites


# ----------------------------------------------------------------------------- one epoch of training

def _args(*extra):
    return trainer_parser().parse_args(["--train_vi_len", "3", "--N_dim", "4", "--kl_anneal_type", "Full_KL",
                                        "--device", "cpu", "--amp", "off", *extra])


def _model():
    torch.manual_seed(0)
    return VAE_Model(16, 8, 4, 16)


def _record_steps(optimizer, record):
    """Wrap optimizer.step so that every call first runs record(optimizer)."""
    step = optimizer.step

    def recorded(*a, **kw):
        record(optimizer)
        return step(*a, **kw)
    optimizer.step = recorded


def test_learning_rate_is_set_at_every_step_of_the_cosine_schedule():
    """The rate follows the schedule within an epoch, at epoch + step / steps: cosine with a linear
    warm-up of 1 epoch over 3 epochs, lr 1e-3 down to min_lr 1e-5."""
    args = _args("--scheduler", "cosine", "--warmup_epochs", "1", "--num_epoch", "3", "--lr", "1e-3",
                 "--min_lr", "1e-5", "--batch_size", "1")
    data = _Data([12], T=3)  # 4 windows: 4 steps of 1
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    seen = []
    _record_steps(opt, lambda o: seen.append(o.param_groups[0]["lr"]))
    batches = WindowBatches(data, 1, CPU, seed=args.seed)
    for epoch in range(3):
        metrics, finished, _ = train_one_epoch(model, opt, batches, epoch, args, _speed(),
                                               list(model.named_parameters()))
        assert finished and metrics["nan_skipped"] == 0 and metrics["spikes_skipped"] == 0
    assert len(seen) == 12

    def expected(progress):
        if progress < 1:  # warm-up: linear from ~0 to lr over the first epoch
            return 1e-3 * (progress + 1e-3) / (1 + 1e-3)
        t = (progress - 1) / 2  # then half a cosine over the remaining 2 epochs
        return 1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * t))

    want = [expected(e + s / 4) for e in range(3) for s in range(4)]
    assert seen == pytest.approx(want, rel=1e-9)
    # concretely: about 1e-6, 0.25e-3, 0.5e-3, 0.75e-3 in the warm-up, then decaying step by step
    assert seen[:4] == pytest.approx([1e-6, 0.25e-3, 0.5e-3, 0.75e-3], rel=1e-2)
    assert len(set(seen[4:8])) == 4 and seen[4] == pytest.approx(1e-3) and seen[4] > seen[5] > seen[6] > seen[7]


def _params(model):
    """A copy of the weights (BatchNorm's running statistics, which a forward pass updates, left out)."""
    return {k: p.detach().clone() for k, p in model.named_parameters()}


def test_a_non_finite_gradient_with_a_finite_loss_skips_the_step():
    """An infinite gradient (here one parameter's, on the epoch's first step only) makes a finite
    loss's update unusable: it is skipped and counted as non-finite; the next step is taken."""
    args = _args("--scheduler", "none", "--batch_size", "1", "--num_epoch", "1")
    data = _Data([6], T=3)  # 2 windows: 2 steps
    model = _model()
    name, param = next(iter(model.named_parameters()))
    calls = []

    def inf_once(grad):
        calls.append(1)
        return torch.full_like(grad, math.inf) if len(calls) == 1 else grad
    param.register_hook(inf_once)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    weights = []
    _record_steps(opt, lambda o: weights.append(_params(model)))
    before = _params(model)
    losses = []
    model.register_forward_hook(lambda m, i, out: losses.append(out["loss"].item()))
    with pytest.warns(UserWarning, match="non-finite loss or gradient; step skipped"):
        metrics, finished, progress = train_one_epoch(model, opt, WindowBatches(data, 1, CPU, seed=args.seed), 0,
                                                      args, _speed(), list(model.named_parameters()))
    assert finished and metrics["nan_skipped"] == 1 and progress["nan_skipped"] == 1
    assert len(weights) == 1  # the optimizer stepped at the second step only
    assert progress["nan_run"] == 0 and metrics["steps"] == 1
    assert len(calls) == 2 and len(losses) == 2 and all(math.isfinite(x) for x in losses)
    # the weights the second step started from are the untouched initial ones
    assert all(torch.equal(weights[0][k], before[k]) for k in before)  # (BatchNorm's statistics aside)


def test_a_non_finite_gradient_alone_leaves_the_weights_unchanged():
    args = _args("--scheduler", "none", "--batch_size", "1", "--num_epoch", "1", "--grad_clip", "0")
    data = _Data([3], T=3)  # 1 window: 1 step
    model = _model()
    next(iter(model.parameters())).register_hook(lambda g: torch.full_like(g, math.nan))
    before = _params(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with pytest.warns(UserWarning, match="non-finite"):
        metrics, finished, _ = train_one_epoch(model, opt, WindowBatches(data, 1, CPU, seed=args.seed), 0, args,
                                               _speed(), list(model.named_parameters()))
    assert finished and metrics["nan_skipped"] == 1 and metrics["steps"] == 0
    assert all(torch.equal(v, before[k]) for k, v in _params(model).items())


def _step_grads(grad_clip):
    """The gradients the optimizer sees in one training step from the same model and batch."""
    args = _args("--scheduler", "none", "--batch_size", "2", "--num_epoch", "1", "--grad_clip", str(grad_clip))
    data = _Data([6], T=3)
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    grads = []
    _record_steps(opt, lambda o: grads.append([p.grad.detach().clone() if p.grad is not None
                                               else torch.zeros_like(p) for p in model.parameters()]))
    metrics, finished, _ = train_one_epoch(model, opt, WindowBatches(data, 2, CPU, seed=args.seed), 0, args,
                                           _speed(), list(model.named_parameters()))
    assert finished and len(grads) == 1
    return grads[0]


def _norm(grads):
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))


def test_grad_clip_scales_the_gradient_to_its_norm():
    """--grad_clip c: a gradient of norm N > c reaches the optimizer scaled to norm c (Adam would
    hide the scale in the weights, so the gradients are read at the optimizer's step)."""
    free = _step_grads(0)  # 0: no clipping
    n = _norm(free)
    c = n / 10
    assert n > 0
    clipped = _step_grads(c)
    assert _norm(clipped) == pytest.approx(c, rel=1e-4)
    for a, b in zip(clipped, free):  # the same direction, every component scaled by c / N
        assert torch.allclose(a, b * (c / n), rtol=1e-4, atol=1e-12)
    # a clip above the norm leaves the gradient as it is
    assert _norm(_step_grads(2 * n)) == pytest.approx(n, rel=1e-5)


def test_each_epoch_trains_with_its_beta_and_teacher_forcing():
    """beta and teacher forcing reach the model as the lab's schedules set them per epoch, and the
    epoch's row reports them: Monotonic over 4 epochs with --kl_anneal_ratio 0.5 rises by
    1 / (4 x 0.5) per epoch, 0, 0.5, 1, 1; --tfr 1 drops by --tfr_d_step 0.5 after each epoch from
    the first, 1, 0.5, 0, 0, and at 1 every step is teacher-forced, at 0 none is (one coin a step)."""
    args = _args("--scheduler", "none", "--batch_size", "1", "--num_epoch", "4", "--kl_anneal_type", "Monotonic",
                 "--kl_anneal_ratio", "0.5", "--tfr", "1", "--tfr_sde", "1", "--tfr_d_step", "0.5",
                 "--tf_mode", "step")
    data = _Data([12], T=3)  # 4 windows: 4 steps of 1
    model = _model()
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append((a[2], kw["beta"])), with_kwargs=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = WindowBatches(data, 1, CPU, seed=args.seed)
    want_beta, want_tfr = [0.0, 0.5, 1.0], [1.0, 0.5, 0.0]  # (epoch 4 repeats epoch 3's)
    for epoch in range(3):
        seen.clear()
        metrics, finished, _ = train_one_epoch(model, opt, batches, epoch, args, _speed(),
                                               list(model.named_parameters()))
        assert finished and len(seen) == 4
        assert [beta for _, beta in seen] == pytest.approx([want_beta[epoch]] * 4)
        assert metrics["beta"] == pytest.approx(want_beta[epoch]) and metrics["tfr"] == pytest.approx(want_tfr[epoch])
        if want_tfr[epoch] in (0.0, 1.0):
            assert [tf for tf, _ in seen] == [want_tfr[epoch] == 1.0] * 4, epoch
        # the loss the model was trained on: the error plus this epoch's beta times the KL
        assert metrics["loss"] == pytest.approx(metrics["mse"] + want_beta[epoch] * metrics["kl"], rel=1e-5)
        assert epoch == 0 or metrics["kl"] > 0  # (so that a wrong beta shows in the loss)


def test_a_resumed_epoch_counts_the_steps_skipped_before_its_stop(monkeypatch):
    """An epoch stopped and resumed reports every skipped step in its row: step 2 a spike (its loss,
    so its gradient, 1e4 times the first step's), step 3 a NaN loss, a stop before step 4, then the
    resume trains step 4. The row counts 1 spike, 1 NaN step and 2 updates."""
    from modules.engine import SpikeGuard
    monkeypatch.setattr(SpikeGuard, "WARMUP", 1)  # the first update is the reference
    args = _args("--scheduler", "none", "--batch_size", "1", "--num_epoch", "1")
    data = _Data([12], T=3)  # 4 windows: 4 steps of 1
    model = _model()
    calls = []

    def scaled(m, a, out):
        calls.append(1)
        return dict(out, loss=out["loss"] * {2: 1e4, 3: math.nan}.get(len(calls), 1.0))
    model.register_forward_hook(scaled)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches, params = WindowBatches(data, 1, CPU, seed=args.seed), list(model.named_parameters())
    stops = iter(range(100))
    with pytest.warns(UserWarning, match="non-finite"):
        _, finished, progress = train_one_epoch(model, opt, batches, 0, args, _speed(), params,
                                                should_stop=lambda: next(stops) >= 3)
    assert not finished and progress["step"] == 3 and len(calls) == 3
    assert (progress["spikes_skipped"], progress["nan_skipped"]) == (1, 1)
    metrics, finished, _ = train_one_epoch(model, opt, batches, 0, args, _speed(), params, resume=progress)
    assert finished and len(calls) == 4
    assert (metrics["spikes_skipped"], metrics["nan_skipped"], metrics["steps"]) == (1, 1, 2)
