"""The model: shapes, parameter names of the lab, KL, and the fast path against the plain one."""
import io

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from modules import VAE_Model
from modules.checkpoint import load_model_weights
from modules.model import (FLOW_SCALE, MASK_START, MATCH_BLOCK, WARP_BLURS, DancerLayer, blur, gather, kl_gaussians,
                           kl_standard_normal, match_error, warp, warp_error)
from modules.modules import reparameterize
from modules.runtime import Speed, make_step_fn, peak_memory_growth, prepare_model, rollout, with_bf16_convs

from helpers import fake_cuda_graphs, jitter

TINY = (16, 8, 4, 16)


def lab_parameter_shapes(F=128, L=32, N=12, D=192):
    """Parameter names and shapes of the lab's model, written out from its module description
    (LAB_REFERENCE.md) independently of modules/: a state_dict saved by lab code has these keys."""
    shapes = {}

    def conv(name, cin, cout, k, groups=1):
        shapes[f"{name}.weight"] = (cout, cin // groups, k, k)
        shapes[f"{name}.bias"] = (cout,)

    def res(name, cin, cout):
        conv(f"{name}.conv1", cin, cout, 3)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.adaptor", cin, cout, 1)

    def dcb(name, cin, cout):
        conv(f"{name}.block.0.conv1.0", cin, cin, 1)
        conv(f"{name}.block.0.depth_conv", cin, cin, 3, groups=cin)
        conv(f"{name}.block.0.conv2", cin, cout, 1)
        if cin != cout:
            conv(f"{name}.block.0.adaptor", cin, cout, 1)
        hidden = max(min(cout * 4, 1024), cout * 2)
        conv(f"{name}.block.1.conv", cout, hidden, 1)
        conv(f"{name}.block.1.conv_out", hidden // 2, cout, 1)

    e = "frame_transformation"
    res(f"{e}.0", 3, F // 8), dcb(f"{e}.1", F // 8, F // 8), res(f"{e}.2", F // 8, F // 4)
    dcb(f"{e}.3", F // 4, F // 4), res(f"{e}.4", F // 4, F // 2), dcb(f"{e}.5", F // 2, F // 2)
    conv(f"{e}.6", F // 2, F, 3)
    e = "label_transformation"
    conv(f"{e}.1", 3, L // 2, 7)
    shapes.update({f"{e}.2.weight": (L // 2,), f"{e}.2.bias": (L // 2,), f"{e}.2.running_mean": (L // 2,),
                   f"{e}.2.running_var": (L // 2,), f"{e}.2.num_batches_tracked": ()})
    res(f"{e}.4", L // 2, L)
    e, c = "Gaussian_Predictor", F + L
    res(f"{e}.0", c, N // 4), dcb(f"{e}.1", N // 4, N // 4), res(f"{e}.2", N // 4, N // 2)
    dcb(f"{e}.3", N // 2, N // 2), res(f"{e}.4", N // 2, N), conv(f"{e}.6", N, 2 * N, 1)
    e, c = "Decoder_Fusion", F + L + N
    dcb(f"{e}.0", c, c), res(f"{e}.1", c, c // 4), dcb(f"{e}.2", c // 4, c // 2)
    res(f"{e}.3", c // 2, c // 2), dcb(f"{e}.4", c // 2, D // 2), conv(f"{e}.5", D // 2, D, 1)
    e = "Generator"
    dcb(f"{e}.0", D, D), res(f"{e}.1", D, D // 2), dcb(f"{e}.2", D // 2, D // 2), res(f"{e}.3", D // 2, D // 4)
    dcb(f"{e}.4", D // 4, D // 4), res(f"{e}.5", D // 4, D // 8), dcb(f"{e}.6", D // 8, D // 8)
    conv(f"{e}.7", D // 8, 3, 1)
    return shapes


def test_lab_state_dict_loads_and_parameter_count():
    model = VAE_Model()
    lab = lab_parameter_shapes()
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == lab
    sd = {k: torch.randn(s) if s else torch.tensor(7) for k, s in lab.items()}
    model.load_state_dict(sd, strict=True)
    n = sum(p.numel() for p in model.parameters())
    assert 1.5e6 < n < 1.7e6  # "about 1.6 M parameters"


@pytest.mark.parametrize("prior", ["fixed", "learned"])
def test_shapes(prior):
    torch.manual_seed(0)
    m = VAE_Model(*TINY, prior=prior)
    img, lab = torch.rand(2, 5, 3, 32, 64), torch.rand(2, 5, 3, 32, 64)
    out = m(img, lab, True)
    assert out["pred"].shape == (2, 4, 3, 32, 64)
    assert out["loss"].shape == out["kl"].shape == ()
    eps = m.sample_noise(2, 5, 32, 64)
    assert eps.shape == (4, 2, 4, 32, 64)
    gen = m.generate(img[:, 0], lab, eps)
    assert gen.shape == (2, 5, 3, 32, 64)
    assert torch.equal(gen[:, 0], img[:, 0])
    assert gen.min() >= 0 and gen.max() <= 1


def test_reparameterize_is_standard_normal():
    mu, logvar = torch.full((200_000,), 2.0), torch.full((200_000,), 2 * torch.log(torch.tensor(3.0)))
    torch.manual_seed(0)
    z = reparameterize(mu, logvar)
    assert abs(z.mean().item() - 2.0) < 0.03
    assert abs(z.std().item() - 3.0) < 0.03
    assert (z < 2.0).float().mean().item() == pytest.approx(0.5, abs=0.01)  # symmetric, not uniform


def test_kl_against_torch_distributions():
    torch.manual_seed(0)
    mu_q, lv_q, mu_p, lv_p = (torch.randn(3, 4, 5) for _ in range(4))
    q = Normal(mu_q, (0.5 * lv_q).exp())
    ref_std = kl_divergence(q, Normal(torch.zeros_like(mu_q), torch.ones_like(mu_q)))
    ref = kl_divergence(q, Normal(mu_p, (0.5 * lv_p).exp()))
    torch.testing.assert_close(kl_standard_normal(mu_q, lv_q), ref_std)
    torch.testing.assert_close(kl_gaussians(mu_q, lv_q, mu_p, lv_p), ref)


def _loss_and_grads(model, img, lab, tf, eps, fast, grad_ckpt=False, warp_loss=0.0):
    model.zero_grad()
    out = model(img, lab, tf, eps=eps, beta=0.7, fast=fast, grad_ckpt=grad_ckpt, warp_loss=warp_loss)
    out["loss"].backward()
    return out, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


# condition="first" with the learned prior runs in float64 to 1e-10, and in float32 to 1e-4: there
# the first frame's features collect 2 x 5 gradient terms that largely cancel, and float32
# summation order alone moves the encoder's gradients by ~3e-5 relative (measured; float64 agrees
# to 1e-14).
@pytest.mark.parametrize("prior,residual,condition,dtype,rtol", [
    ("fixed", False, "previous", torch.float32, 1e-5), ("learned", False, "previous", torch.float32, 1e-5),
    ("fixed", True, "previous", torch.float32, 1e-5), ("fixed", True, "first", torch.float32, 1e-5),
    ("learned", True, "first", torch.float64, 1e-10), ("learned", True, "first", torch.float32, 1e-4),
    ("learned", True, "previous", torch.float32, 1e-5), ("fixed", False, "first", torch.float32, 1e-5)])
@pytest.mark.parametrize("tf", [True, False, "mixed"])
def test_fast_path_matches_plain(tf, prior, residual, condition, dtype, rtol):
    """The batched teacher-forced frames (fast) against the per-frame loop (plain): same loss,
    predictions and gradients, float32 on CPU."""
    torch.manual_seed(0)
    model = jitter(VAE_Model(*TINY, prior=prior, residual=residual, condition=condition)).to(dtype)
    if residual:  # away from the zero start, so the Generator's output matters
        torch.nn.init.normal_(model.Generator[-1].weight, std=0.1)
    img, lab = torch.rand(2, 6, 3, 32, 64, dtype=dtype), torch.rand(2, 6, 3, 32, 64, dtype=dtype)
    eps = torch.randn(2, 5, 4, 32, 64, dtype=dtype)
    tf = [True, False, False, True, True] if tf == "mixed" else tf
    a, ga = _loss_and_grads(model, img, lab, tf, eps, fast=True)
    b, gb = _loss_and_grads(model, img, lab, tf, eps, fast=False)
    torch.testing.assert_close(a["loss"], b["loss"], rtol=rtol, atol=0)
    torch.testing.assert_close(a["pred"], b["pred"], rtol=rtol, atol=rtol / 10)
    _assert_grads_close(ga, gb, rtol, model)


def _rel_err(a, b):
    """Relative error of a whole gradient tensor (elementwise ratios blow up near zero)."""
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _assert_grads_close(ga, gb, rtol, model):
    assert ga.keys() == gb.keys() and len(ga) == len(list(model.parameters()))
    for k in ga:
        if k == "label_transformation.1.bias":
            # The bias of the convolution just before BatchNorm has an exact gradient of 0 (the
            # normalisation removes it); what is computed is rounding noise (1e-8 to 1e-6 here).
            assert ga[k].norm() < 1e-4 and gb[k].norm() < 1e-4
        else:
            assert _rel_err(ga[k], gb[k]) < rtol, k


MIXED7 = [True, False, False, True, True, False, True]


@pytest.mark.parametrize("prior,condition,tf,fast", [("fixed", "previous", True, True), ("learned", "first", True, True),
                                                     ("learned", "previous", MIXED7, True),
                                                     ("fixed", "previous", MIXED7, False)])
def test_activation_checkpointing_same_function(prior, condition, tf, fast):
    """grad_ckpt recomputes one time step at a time (in the batched pass and in the per-frame loop
    of scheduled sampling): same loss and gradients, and the peak memory of a training pass falls
    with the number of time steps (7 here; measured ratio 0.18 with teacher forcing, 0.36 for the
    per-frame loop of the plain path with a coin per frame).
    float64: the gradients are summed per time step instead of over all frames at once, which in
    float32 alone moves some of them by up to 2e-5 relative (measured)."""
    dtype = torch.float64
    torch.manual_seed(0)
    model = jitter(VAE_Model(*TINY, prior=prior, condition=condition)).to(dtype)
    img, lab = torch.rand(2, 8, 3, 32, 64, dtype=dtype), torch.rand(2, 8, 3, 32, 64, dtype=dtype)
    eps = torch.randn(2, 7, TINY[2], 32, 64, dtype=dtype)
    a, ga = _loss_and_grads(model, img, lab, tf, eps, fast=fast, grad_ckpt=True)
    b, gb = _loss_and_grads(model, img, lab, tf, eps, fast=fast)
    rtol = 1e-10
    torch.testing.assert_close(a["loss"], b["loss"], rtol=rtol, atol=0)
    torch.testing.assert_close(a["pred"], b["pred"], rtol=rtol, atol=rtol / 10)
    _assert_grads_close(ga, gb, rtol, model)
    peak = [peak_memory_growth(lambda: _loss_and_grads(model, img, lab, tf, eps, fast=fast, grad_ckpt=c),
                               torch.device("cpu")) for c in (False, True)]
    assert peak[1] < (0.3 if fast else 0.45) * peak[0], peak  # the per-frame loop: 0.36 measured


@pytest.mark.parametrize("z_mode,condition", [("sample", "previous"), ("zero", "previous"),
                                              ("prior_mean", "previous"), ("sample", "first"), ("zero", "first"),
                                              ("prior_mean", "first")])
def test_fast_rollout_matches_plain(z_mode, condition):
    """Sequences batched, pose features computed once, channels_last: same frames as the plain
    one-sequence-at-a-time loop for the same noise (float32, CPU)."""
    torch.manual_seed(0)
    model = jitter(VAE_Model(*TINY, prior="learned", condition=condition)).eval()
    first, labels = torch.rand(3, 3, 32, 64), torch.rand(3, 8, 3, 32, 64)
    eps = model.sample_noise(3, 8, 32, 64, generator=torch.Generator().manual_seed(1))
    cpu = torch.device("cpu")
    plain = rollout(model, first, labels, eps, Speed(cpu, False, False, False, False, False), z_mode)
    fast = rollout(model.to(memory_format=torch.channels_last), first, labels, eps,
                   Speed(cpu, False, True, False, False, True), z_mode)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)
    assert not torch.equal(plain[:, 1], plain[:, 2])  # a real rollout, not a constant


def test_generation_uses_the_noise_only_when_sampling():
    torch.manual_seed(0)
    model = jitter(VAE_Model(*TINY)).eval()
    first, labels = torch.rand(1, 3, 32, 64), torch.rand(1, 4, 3, 32, 64)
    e1, e2 = model.sample_noise(1, 4, 32, 64), model.sample_noise(1, 4, 32, 64)
    assert not torch.equal(model.generate(first, labels, e1), model.generate(first, labels, e2))
    torch.testing.assert_close(model.generate(first, labels, e1, "zero"), model.generate(first, labels, e2, "zero"))


def test_residual_model_starts_as_a_copy_of_the_previous_frame():
    torch.manual_seed(0)
    model = VAE_Model(*TINY, residual=True).eval()
    assert model.state_dict().keys() == VAE_Model(*TINY).state_dict().keys()
    first, labels = torch.rand(2, 3, 32, 64), torch.rand(2, 6, 3, 32, 64)
    out = model.generate(first, labels, model.sample_noise(2, 6, 32, 64))
    torch.testing.assert_close(out, first[:, None].expand(-1, 6, -1, -1, -1))
    img = torch.rand(2, 4, 3, 32, 64)
    torch.testing.assert_close(model(img, labels[:, :4], True)["pred"], img[:, :-1])


def test_first_frame_condition_never_reads_its_own_frames():
    """condition="first": frame t of a rollout is one step from the first frame with pose t and
    z_t, whatever the frames before it; the training pass decodes every frame from frame 0 too.
    With residual=True the untrained model copies the first frame."""
    torch.manual_seed(0)
    model = jitter(VAE_Model(*TINY, prior="learned", condition="first")).eval()
    first, labels = torch.rand(2, 3, 32, 64), torch.rand(2, 6, 3, 32, 64)
    eps = model.sample_noise(2, 6, 32, 64, generator=torch.Generator().manual_seed(1))
    out = model.generate(first, labels, eps)
    with torch.no_grad():
        for t in range(1, 6):
            one = model.step(first, model.label_transformation(labels[:, t]), eps[t - 1])
            torch.testing.assert_close(out[:, t], one, rtol=1e-5, atol=1e-6)
        # Frames in batches: chunk 6 = 2 sequences x 3 frames, then the last 2 frames.
        label_feat = model.label_transformation(labels[:, 1:].flatten(0, 1)).unflatten(0, (2, 5))
        torch.testing.assert_close(model.generate_from_first(first, label_feat, eps, chunk=6), out,
                                   rtol=1e-5, atol=1e-6)
        # Another pose at frame 2 changes frame 2 and no other.
        moved = labels.clone()
        moved[:, 2] = torch.rand(2, 3, 32, 64)
        other = model.generate(first, moved, eps)
    assert not torch.allclose(other[:, 2], out[:, 2])
    torch.testing.assert_close(other[:, [0, 1, 3, 4, 5]], out[:, [0, 1, 3, 4, 5]], rtol=1e-5, atol=1e-6)
    # Training: the prediction of frame t does not depend on frames 1..T-1 (only on frame 0,
    # through the decoder; they reach the loss only through the posterior).
    img, eps_q = torch.rand(2, 4, 3, 32, 64), torch.randn(2, 3, TINY[2], 32, 64)
    a = model(img, labels[:, :4], True, eps=eps_q)["pred"]
    b = model(img, labels[:, :4], False, eps=eps_q)["pred"]
    torch.testing.assert_close(a, b)  # teacher forcing has nothing to switch
    copy = VAE_Model(*TINY, residual=True, condition="first").eval()
    gen = copy.generate(first, labels, eps)
    torch.testing.assert_close(gen, first[:, None].expand(-1, 6, -1, -1, -1))
    torch.testing.assert_close(copy(img, labels[:, :4], True)["pred"], img[:, :1].expand(-1, 3, -1, -1, -1))
    with pytest.raises(ValueError, match="condition"):
        VAE_Model(*TINY, condition="last")


def _assert_training_paths_agree(model, img, lab, eps, warp_loss=0.0, per_frame_dtype=torch.float32):
    """Batched against per-frame training in float32 (float64 where summation order alone moves
    gradients by more, as for condition="first" with the learned prior above), and against
    checkpointed in float64 (it sums the gradients per time step, which in float32 alone moves some
    by ~1e-5 relative, as in the test above): loss, predictions and gradients. Returns the batched
    gradients of the first comparison."""
    out = None
    first_rtol = 1e-5 if per_frame_dtype == torch.float32 else 1e-10
    for dtype, other, rtol in ((per_frame_dtype, dict(fast=False), first_rtol),
                               (torch.float64, dict(fast=True, grad_ckpt=True), 1e-10)):
        model.to(dtype)
        x, y, e = img.to(dtype), lab.to(dtype), eps.to(dtype)
        a, ga = _loss_and_grads(model, x, y, True, e, fast=True, warp_loss=warp_loss)
        b, gb = _loss_and_grads(model, x, y, True, e, warp_loss=warp_loss, **other)
        torch.testing.assert_close(a["loss"], b["loss"], rtol=rtol, atol=0)
        torch.testing.assert_close(a["warp"], b["warp"], rtol=rtol, atol=0)
        torch.testing.assert_close(a["pred"], b["pred"], rtol=rtol, atol=rtol / 10)
        _assert_grads_close(ga, gb, rtol, model)
        out = out or ga
    model.float()
    return out


def test_first_pose_starts_as_the_model_without_it_and_every_path_agrees():
    """first_pose: one more module (pose_fusion), starting at zero, so the untrained model is the
    one without it. Trained (jittered): the training pass batched, per frame and checkpointed is
    one function (loss and gradients); every rollout (loop, batches of frames, one sequence at a
    time, the fast rollout) gives the same frames; the first frame's pose changes them."""
    torch.manual_seed(0)
    model = jitter(VAE_Model(*TINY, residual=True, condition="first", first_pose=True))
    torch.nn.init.normal_(model.Generator[-1].weight, std=0.1)
    without = VAE_Model(*TINY, residual=True, condition="first")
    sd = model.state_dict()
    assert sorted(set(sd) - set(without.state_dict())) == ["pose_fusion.bias", "pose_fusion.weight"]
    without.load_state_dict({k: v for k, v in sd.items() if not k.startswith("pose_fusion.")})
    img, lab = torch.rand(2, 6, 3, 32, 64), torch.rand(2, 6, 3, 32, 64)
    eps = torch.randn(2, 5, TINY[2], 32, 64)
    fresh = VAE_Model(*TINY, residual=True, condition="first", first_pose=True)
    assert fresh.pose_fusion.weight.abs().sum() == 0 and fresh.pose_fusion.bias.abs().sum() == 0
    with torch.no_grad():
        model.pose_fusion.weight.zero_()
        model.pose_fusion.bias.zero_()
        model.eval()  # running BatchNorm statistics: in training mode frame 0's pose joins the batch
        without.eval()
        torch.testing.assert_close(model(img, lab, True, eps=eps)["pred"], without(img, lab, True, eps=eps)["pred"])
        model.train()
    jitter(model.pose_fusion, seed=1)

    grads = _assert_training_paths_agree(model, img, lab, eps)
    assert grads["pose_fusion.weight"].norm() > 0

    model.eval()
    first, labels = img[:, 0], lab
    moved = lab.clone()
    moved[:, 0] = torch.rand(2, 3, 32, 64)  # the first frame's pose only
    noise = model.sample_noise(2, 6, 32, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        loop = model.generate(first, labels, noise)
        label_feat = model.label_transformation(labels[:, 1:].flatten(0, 1)).unflatten(0, (2, 5))
        batched = model.generate_from_first(first, label_feat, noise, chunk=6, first_label=labels[:, 0])
        torch.testing.assert_close(batched, loop, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.generate_plain(first, labels, noise), loop, rtol=1e-5, atol=1e-6)
        fast = rollout(model.to(memory_format=torch.channels_last), first, labels, noise,
                       Speed(torch.device("cpu"), False, True, False, False, True))
        torch.testing.assert_close(fast, loop, rtol=1e-4, atol=1e-5)
        other = model.generate(first, moved, noise)
        with pytest.raises(ValueError, match="first frame's pose"):
            model.generate_from_first(first, label_feat, noise)
    assert not torch.allclose(other[:, 1:], loop[:, 1:])
    with pytest.raises(ValueError, match="first_pose needs condition='first'"):
        VAE_Model(*TINY, first_pose=True)


@pytest.mark.parametrize("prior", ["fixed", "learned"])
def test_model_starts_at_the_prior_and_blind_to_z(prior):
    """At initialisation q = p = N(0, I) (KL exactly 0) and the frames do not depend on z; the
    zeroed weights still get gradients, so training can move them."""
    torch.manual_seed(0)
    model = VAE_Model(*TINY, prior=prior)
    img, labels = torch.rand(2, 4, 3, 32, 64), torch.rand(2, 4, 3, 32, 64)
    e1, e2 = torch.randn(2, 3, TINY[2], 32, 64), torch.randn(2, 3, TINY[2], 32, 64)
    a, b = model(img, labels, True, eps=e1), model(img, labels, True, eps=e2)
    assert a["kl"].item() == 0.0
    torch.testing.assert_close(a["pred"], b["pred"], rtol=0, atol=0)
    # A loss that rewards using z: the decoder's z weights get a gradient at once; the posterior's
    # last layer gets one as soon as the decoder reads z (after one step).
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(2):
        opt.zero_grad()
        out = model(img, labels, True, eps=e1)
        (out["recon"] - (out["pred"] * e1[:, :, :1]).mean()).backward()
        if step == 0:
            assert model.Decoder_Fusion[1].conv1.weight.grad[:, TINY[0] + TINY[1]:].abs().sum() > 0
        opt.step()
    assert model.Gaussian_Predictor[-1].weight.grad.abs().sum() > 0


def test_compiled_generation_step_matches_plain():
    """--compile_gen (bench): the torch.compile'd step gives the plain rollout's frames (float32,
    CPU; on CUDA the same compiled step is then captured in a graph)."""
    torch.manual_seed(0)
    model = jitter(VAE_Model(*TINY)).eval()
    first, labels = torch.rand(2, 3, 32, 64), torch.rand(2, 5, 3, 32, 64)
    eps = model.sample_noise(2, 5, 32, 64, generator=torch.Generator().manual_seed(1))
    cpu = torch.device("cpu")
    plain = rollout(model, first, labels, eps, Speed(cpu, False, False, False, False, False))
    compiled = rollout(model, first, labels, eps, Speed(cpu, False, False, False, False, True, compile_gen=True))
    torch.testing.assert_close(compiled, plain, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("condition", ["previous", "first"])
def test_bf16_conv_copy_computes_the_autocast_step(condition):
    """A captured or compiled step runs a copy whose convolutions hold bfloat16 weights: under
    autocast it gives the autocast step's frames exactly, and the model itself keeps float32."""
    torch.manual_seed(0)
    model = jitter(VAE_Model(*TINY, prior="learned", condition=condition, residual=True)).eval()
    prev, eps = torch.rand(3, 3, 32, 64), torch.randn(3, TINY[2], 32, 64)
    copy = with_bf16_convs(model)
    assert copy.Generator[-1].weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        label_feat = model.label_transformation(torch.rand(3, 3, 32, 64))
        ref = model.step(prev, label_feat, eps)
        out = copy.step(prev, label_feat, eps)
    assert torch.equal(out, ref)
    assert not torch.equal(ref, model.step(prev, label_feat, eps))  # float32 differs: a real bf16 run


def test_compiled_or_captured_step_runs_the_bf16_copy(monkeypatch):
    """make_step_fn hands the bf16 copy's step to torch.compile (and to graph capture) under
    --amp, and the model's own step otherwise."""
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(fn.__self__) or fn)
    model = VAE_Model(*TINY).eval()
    cpu = torch.device("cpu")
    for amp in (True, False):
        make_step_fn(model, Speed(cpu, amp, False, False, False, True, compile_gen=True), "sample", None)
    assert seen[0] is not model and seen[0].Generator[-1].weight.dtype == torch.bfloat16
    assert seen[1] is model


def test_eager_step_under_amp_runs_the_bf16_copy(monkeypatch):
    """The eager step under --amp runs the bf16 copy too (the ConvFFN's weight halves are views,
    which autocast would cast again at every frame), and its frames are the model's own under
    autocast; without --amp it runs the model itself."""
    seen = []
    monkeypatch.setattr(VAE_Model, "step", lambda self, *a: seen.append(self) or a[0])
    model = VAE_Model(*TINY).eval()
    cpu = torch.device("cpu")
    for amp in (True, False):
        make_step_fn(model, Speed(cpu, amp, False, False, False, True), "sample", None)(torch.zeros(1), None, None)
    assert seen[0] is not model and seen[0].Generator[-1].weight.dtype == torch.bfloat16
    assert seen[1] is model
    monkeypatch.undo()
    torch.manual_seed(0)
    model = jitter(VAE_Model(*TINY, residual=True)).eval()
    first, labels = torch.rand(2, 3, 32, 64), torch.rand(2, 4, 3, 32, 64)
    eps = model.sample_noise(2, 4, 32, 64, generator=torch.Generator().manual_seed(1))
    amp = Speed(cpu, True, False, False, False, True)
    with torch.no_grad(), amp.autocast():
        label_feat = model.encode_labels(labels[:, 1:].flatten(0, 1)).unflatten(0, (2, 3))
        ref = model.generate(first, None, eps, label_feat=label_feat)
        out = rollout(model, first, labels, eps, amp)
    assert torch.equal(out, ref)


def test_conv_ffn_halves_are_the_chunks_of_its_convolution():
    """ConvFFN runs its gate's halves as two convolutions on the halves of one weight (contiguous
    outputs in channels_last): the lab's function, x + conv_out(a * LeakyReLU(b)) with (a, b) the
    halves of conv(x), in float32, in either memory format."""
    from modules.layers import ConvFFN
    torch.manual_seed(0)
    ffn = jitter(ConvFFN(24))
    x = torch.randn(2, 24, 8, 16)
    a, b = ffn.conv(x).chunk(2, dim=1)
    ref = x + ffn.conv_out(a * ffn.relu(b))
    torch.testing.assert_close(ffn(x), ref, rtol=1e-6, atol=1e-6)
    ffn.to(memory_format=torch.channels_last)
    torch.testing.assert_close(ffn(x.contiguous(memory_format=torch.channels_last)), ref, rtol=1e-6, atol=1e-6)


def test_captured_step_keeps_its_bf16_copy_alive(monkeypatch):
    """A CUDA graph reads the weights at the addresses it captured and holds no reference to them,
    so the replay must keep the bf16 copy alive: it once did not, the copy was freed and its
    memory reused by the frames (NaN from the 6th frame on an H100). The capture is faked so that
    the lifetime is checked on the CPU."""
    import contextlib
    import gc
    import weakref

    import modules.runtime as runtime

    class FakeGraph:
        def replay(self):
            pass

    fake_cuda_graphs(monkeypatch, FakeGraph, lambda g: contextlib.nullcontext())
    copies, real = [], runtime.with_bf16_convs

    def recorded(m):
        copy = real(m)
        copies.append(weakref.ref(copy))
        return copy
    monkeypatch.setattr(runtime, "with_bf16_convs", recorded)

    model = VAE_Model(*TINY).eval()
    example = (torch.rand(2, 3, 32, 64), model.label_transformation(torch.rand(2, 3, 32, 64)),
               torch.randn(2, TINY[2], 32, 64))
    with torch.no_grad():
        replay = make_step_fn(model, Speed(torch.device("cpu"), True, False, False, True, True), "sample", example)
    gc.collect()
    assert copies[0]() is not None and copies[0]() is not model
    del replay
    gc.collect()
    assert copies[0]() is None  # the check above can fail: nothing else holds the copy


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run in GPU sessions)")
@pytest.mark.parametrize("residual", [False, True])
def test_captured_rollout_matches_the_eager_one_on_cuda(residual):
    """On a GPU the captured step (bf16 copy, CUDA graph) gives the eager autocast step's frames:
    with the copy freed after capture it gave NaN from the 6th frame."""
    torch.manual_seed(0)
    model = jitter(VAE_Model(*TINY, residual=residual)).eval()
    cuda = torch.device("cuda")
    graph, eager = (Speed(cuda, True, True, False, g, True) for g in (True, False))
    prepare_model(model, graph)
    g = torch.Generator().manual_seed(1)
    first, labels = torch.rand(4, 3, 32, 64, generator=g).to(cuda), torch.rand(4, 24, 3, 32, 64, generator=g).to(cuda)
    eps = model.sample_noise(4, 24, 32, 64, generator=g).to(cuda)
    a, b = rollout(model, first, labels, eps, graph), rollout(model, first, labels, eps, eager)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-2)


def test_warp_moves_pixels_by_the_flow():
    """warp reads img at each pixel's position plus the flow, bilinearly, edges repeated."""
    torch.manual_seed(0)
    img = torch.rand(2, 3, 8, 16)
    zero = torch.zeros(2, 2, 8, 16)
    assert torch.equal(warp(img, zero), img)
    right = zero.clone()
    right[:, 0] = 1.0  # every pixel reads the one to its right
    out = warp(img, right)
    assert torch.equal(out[..., :-1], img[..., 1:])
    assert torch.equal(out[..., -1], img[..., -1])  # past the edge: the edge pixel
    half = zero.clone()
    half[:, 1] = -0.5  # half a pixel up: the mean of the two rows
    torch.testing.assert_close(warp(img, half)[..., 1:, :], (img[..., 1:, :] + img[..., :-1, :]) / 2)


def _warp_rollouts_agree(model, first, lab, noise):
    """The loop, the plain rollout and the fast one (float32, channels_last) give the same frames
    of a warp model; returns the loop's."""
    loop = model.generate(first, lab, noise)
    # float32 rounding in the flow moves a sample point by ~1e-6 pixel, times the image's slope.
    torch.testing.assert_close(model.generate_plain(first, lab, noise), loop, rtol=1e-4, atol=1e-5)
    fast = rollout(model.to(memory_format=torch.channels_last), first, lab, noise,
                   Speed(torch.device("cpu"), False, True, False, False, True))
    torch.testing.assert_close(fast, loop, rtol=1e-4, atol=1e-5)
    return loop


@pytest.mark.parametrize("condition", ["first", "previous"])
def test_warp_starts_as_the_model_without_it_and_every_path_agrees(condition):
    """warp: one more module (flow), starting at zero, so the untrained model is the one without it
    and an untrained residual model still copies. Trained (jittered): the training pass batched and
    per frame is one function (loss and gradients, the flow's included); the rollouts agree."""
    torch.manual_seed(0)
    fresh = VAE_Model(*TINY, residual=True, condition=condition, warp=True)
    img, lab = torch.rand(2, 6, 3, 32, 64), torch.rand(2, 6, 3, 32, 64)
    eps = torch.randn(2, 5, TINY[2], 32, 64)
    without = VAE_Model(*TINY, residual=True, condition=condition)
    assert sorted(set(fresh.state_dict()) - set(without.state_dict())) == ["flow.bias", "flow.weight", "flow_scale"]
    with torch.no_grad():
        copied = fresh(img, lab, True, eps=eps)["pred"]
        torch.testing.assert_close(copied, (img[:, :1] if condition == "first" else img[:, :-1]).expand(-1, 5, -1, -1, -1))
    _, grads = _loss_and_grads(fresh, img, lab, True, eps, fast=True)
    assert grads["flow.weight"].norm() > 0  # zero flow is where training starts, not where it stays

    model = jitter(VAE_Model(*TINY, residual=True, condition=condition, warp=True))
    torch.nn.init.normal_(model.Generator[-1].weight, std=0.1)
    assert _assert_training_paths_agree(model, img, lab, eps)["flow.weight"].norm() > 0
    model.eval()
    noise = model.sample_noise(2, 6, 32, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        loop = _warp_rollouts_agree(model, img[:, 0], lab, noise)
        model.flow.weight.zero_()
        model.flow.bias.zero_()
        assert not torch.allclose(loop, model.generate(img[:, 0], lab, noise))  # the flow moved pixels
    with pytest.raises(ValueError, match="warp needs residual"):
        VAE_Model(*TINY, warp=True)


@pytest.mark.parametrize("prior", ["fixed", "learned"])
def test_pose_flow_starts_near_the_model_without_and_every_path_agrees(prior):
    """pose_flow: six more modules (the pose match's query and key, the coarse flow, the dancer
    layer's mask, the gathered layer's mask, the Generator's view of the frame it changes, starting
    at zero) and the match's block size; the coarse flow's last layer starts at zero and the masks
    at sigmoid(MASK_START) everywhere, so with the masks off the untrained model is the one without
    it, and with them each layer is 1.8 % of the frame. Trained (jittered): batched, per-frame and
    checkpointed training agree (its gradients included), the rollouts agree, and the coarse flow
    and both layers change the frames. It works at frame sizes its block does not divide."""
    torch.manual_seed(0)
    opts = dict(prior=prior, residual=True, condition="first", first_pose=True, warp=True)
    fresh, without = VAE_Model(*TINY, **opts, pose_flow=True), VAE_Model(*TINY, **opts)
    added = sorted(set(fresh.state_dict()) - set(without.state_dict()))
    assert {k.split(".")[0] for k in added} == {"flow_coarse", "pose_query", "pose_key", "dancer_mask", "match_block",
                                                 "base_view", "gather_mask"}
    assert torch.all(fresh.base_view.weight == 0) and torch.all(fresh.base_view.bias == 0)
    without.load_state_dict({k: v for k, v in fresh.state_dict().items() if k not in added})
    img, lab = torch.rand(2, 6, 3, 32, 64), torch.rand(2, 6, 3, 32, 64)
    eps = torch.randn(2, 5, TINY[2], 32, 64)
    with torch.no_grad():
        base = without(img, lab, True, eps=eps)["pred"]
        assert not torch.allclose(fresh(img, lab, True, eps=eps)["pred"], base)
        for mask in (fresh.dancer_mask, fresh.gather_mask):
            assert torch.all(mask.weight == 0)
            torch.testing.assert_close(mask.bias, torch.tensor([MASK_START]))
            mask.bias.fill_(float("-inf"))
        torch.testing.assert_close(fresh(img, lab, True, eps=eps)["pred"], base, rtol=0, atol=0)

    model = jitter(VAE_Model(*TINY, **opts, pose_flow=True))
    torch.nn.init.normal_(model.flow_coarse[-1].weight, std=0.1)
    # In float64: with both layers, summation order alone (it changes with the thread count) moves
    # one bias gradient of the per-frame path by 1.02e-5 relative in float32 on 2 threads.
    grads = _assert_training_paths_agree(model, img, lab, eps, per_frame_dtype=torch.float64)
    assert grads["pose_query.weight"].norm() > 0 and grads["flow_coarse.0.weight"].norm() > 0
    model.eval()
    noise = model.sample_noise(2, 6, 32, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        loop = _warp_rollouts_agree(model, img[:, 0], lab, noise)
        odd = model.generate(img[:, 0, :, :30, :62], lab[..., :30, :62], noise[..., :30, :62])
        assert odd.shape[-2:] == (30, 62) and torch.isfinite(odd).all()
        model.flow_coarse[-1].weight.zero_()
        model.flow_coarse[-1].bias.zero_()
        no_coarse = model.generate(img[:, 0], lab, noise)
        assert not torch.allclose(loop, no_coarse)  # the coarse flow moved pixels
        model.dancer_mask.bias.fill_(float("-inf"))
        no_dancer = model.generate(img[:, 0], lab, noise)
        assert not torch.allclose(no_coarse, no_dancer)  # so did the dancer layer
        model.gather_mask.bias.fill_(float("-inf"))
        assert not torch.allclose(no_dancer, model.generate(img[:, 0], lab, noise))  # and the gathered layer
    with pytest.raises(ValueError, match="pose_flow needs warp=True and first_pose=True"):
        VAE_Model(*TINY, residual=True, condition="first", warp=True, pose_flow=True)


def _one_hot_match(b):
    """A pose_flow model matching b x b blocks (its match_block, loaded from a state_dict) whose
    match keys single out one block (one-hot features, large weights), and pose features with
    feature 3 in block (x 10, y 2) of the first pose and in block (x 1, y 5) of pose t (32 x 64
    frames)."""
    model = VAE_Model(*TINY, residual=True, condition="first", first_pose=True, warp=True, pose_flow=True)
    model.load_state_dict({**model.state_dict(), "match_block": torch.tensor(b)})
    L, H, W = TINY[1], 32, 64
    with torch.no_grad():
        for conv in (model.pose_query, model.pose_key):
            conv.weight.zero_()
            if conv.bias is not None:
                conv.bias.zero_()
            conv.weight[:L, :, 0, 0] = 20.0 * torch.eye(L)
    first, now = torch.zeros(1, L, H, W), torch.zeros(1, L, H, W)
    first[0, 3, 2 * b:3 * b, 10 * b:11 * b] = 1.0
    now[0, 3, 5 * b:6 * b, b:2 * b] = 1.0
    return model, first, now


@pytest.mark.parametrize("b", [2, 4])
def test_pose_match_finds_where_a_block_of_the_pose_was(b):
    """pose_match: each block of pose t moves by the attention-weighted position of the first
    pose's blocks. With keys that single out one block (one-hot features, large weights), a block
    of pose t whose features match the block at (x0, y0) gets (x0 - x, y0 - y) blocks, in
    FLOW_SCALE pixels, for the model's block size b (2 for new models, 4 in older checkpoints)."""
    model, first, now = _one_hot_match(b)
    H, W = first.shape[-2:]
    with torch.no_grad():
        d = model.pose_match(now, first)
    assert d.shape == (1, 2, H // b, W // b)
    torch.testing.assert_close(d[0, :, 5, 1], torch.tensor([10.0 - 1, 2.0 - 5]) * b / FLOW_SCALE, rtol=0, atol=1e-4)


@pytest.mark.parametrize("b", [2, 4])
def test_match_error_reads_the_first_poses_colours_through_the_match(b):
    """match_error: the first pose image's block means read through the match's attention, against
    pose t's, mean squared per row, summed. With _one_hot_match's keys and pose images whose
    colours sit where those features are, the match that finds the block reproduces it there; pose
    t's empty blocks attend evenly and read the first pose's mean; a wrong colour in the matched
    block adds its squared difference, averaged over the row."""
    model, first, now = _one_hot_match(b)
    first, now = first.expand(2, -1, -1, -1), now.expand(2, -1, -1, -1)
    H, W = first.shape[-2:]
    first_img, now_img = torch.zeros(2, 3, H, W), torch.zeros(2, 3, H, W)
    first_img[:, 0, 2 * b:3 * b, 10 * b:11 * b] = 1.0  # the limb is red where its features are
    now_img[0, 0, 5 * b:6 * b, b:2 * b] = 1.0  # row 0: red where pose t's features are
    now_img[1, 1, 5 * b:6 * b, b:2 * b] = 1.0  # row 1: green there, so the match brings the wrong colour
    with torch.no_grad():
        attn = model._match_attn(now, first)[0]
        err = torch.stack([match_error(attn[i:i + 1], now_img[i:i + 1], first_img[i:i + 1], b) for i in range(2)])
        both = match_error(attn, now_img, first_img, b)
    n = (H // b) * (W // b)
    # pose t's empty blocks attend evenly over the first pose, so read its mean: 1/n of red
    empty = (n - 1) * (1 / n) ** 2 / (3 * n)
    torch.testing.assert_close(err[0], torch.tensor(empty), rtol=1e-3, atol=0)
    torch.testing.assert_close(err[1] - err[0], torch.tensor(2.0 / (3 * n)), rtol=1e-3, atol=0)
    torch.testing.assert_close(both, err.sum())


@pytest.mark.parametrize("size,b", [((32, 64), 2), ((30, 62), 4)])
def test_gather_reads_blocks_through_the_attention(size, b):
    """gather: block q of the result is sum_k attn[q, k] * block k of the image, pixel (i, j) from
    pixel (i, j), the blocks in row-major order (checked against a loop over blocks). One-hot
    attention copies a block; even attention gives every block the mean of all blocks. A frame
    the block does not divide is read as padded by repeating its edges, as the match pools it."""
    torch.manual_seed(0)
    H, W = size
    img = torch.rand(2, 3, H, W)
    h, w = -(-H // b), -(-W // b)
    attn = torch.softmax(torch.randn(2, h * w, h * w) * 3, -1)
    padded = F.pad(img, (0, w * b - W, 0, h * b - H), mode="replicate")
    blocks = [padded[:, :, y * b:(y + 1) * b, x * b:(x + 1) * b] for y in range(h) for x in range(w)]
    expected = torch.zeros_like(padded)
    for q in range(h * w):
        y, x = divmod(q, w)
        expected[:, :, y * b:(y + 1) * b, x * b:(x + 1) * b] = sum(attn[:, q, k, None, None, None] * blocks[k]
                                                                   for k in range(h * w))
    out = gather(img, attn, b)
    assert out.shape == img.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, expected[..., :H, :W])
    one_hot = torch.zeros(2, h * w, h * w)
    one_hot[:, :, 5] = 1.0  # every block reads block 5: (y, x) = divmod(5, w)
    y5, x5 = divmod(5, w)
    torch.testing.assert_close(gather(img, one_hot, b)[:, :, :b, :b], img[:, :, y5 * b:(y5 + 1) * b, x5 * b:(x5 + 1) * b])
    even = gather(img, torch.full((2, h * w, h * w), 1.0 / (h * w)), b)
    torch.testing.assert_close(even[:, :, :b, :b], torch.stack(blocks).mean(0))
    assert gather(img.bfloat16(), attn, b).dtype == torch.float32


def test_blur_and_warp_error():
    """blur: a normalised Gaussian (a constant image stays constant, a point spreads symmetrically
    and keeps its sum in the interior). warp_error: per row, the mean over WARP_BLURS of the mean
    squared error of the blurred warped image against the blurred target, summed over rows; 0
    where the flow maps the image onto the target; with a dancer layer, the image moved by the
    layer's displacement blended over the warped one by its mask."""
    torch.manual_seed(0)
    const = torch.full((1, 3, 16, 32), 0.3)
    torch.testing.assert_close(blur(const, 2), const)
    point = torch.zeros(1, 1, 31, 31)
    point[..., 15, 15] = 1.0
    b = blur(point, 2)
    torch.testing.assert_close(b.sum(), torch.tensor(1.0))
    torch.testing.assert_close(b, b.flip(-1))
    torch.testing.assert_close(b, b.transpose(-1, -2))
    assert torch.equal(blur(point, 0), point)

    img, target = torch.rand(3, 3, 16, 32), torch.rand(3, 3, 16, 32)
    flow = torch.randn(3, 2, 16, 32)
    expected = sum(sum(F.mse_loss(warp(blur(img[i:i + 1], s), flow[i:i + 1]), blur(target[i:i + 1], s))
                       for s in WARP_BLURS) for i in range(3)) / len(WARP_BLURS)
    torch.testing.assert_close(warp_error(img, flow, target), expected)
    right = torch.zeros(3, 2, 16, 32)
    right[:, 0] = 1.0
    shifted = warp(img, right)  # every pixel moved one to the left, the right edge repeated
    # Blur and warp commute but at the right edge, where both repeat the edge pixel differently.
    assert warp_error(img, right, shifted) < 1e-2 * warp_error(img, torch.zeros_like(right), shifted)
    # pose_flow's layer: img moved by its displacement, blended in by its mask, at every blur.
    d, mask = torch.randn(3, 2, 16, 32), torch.rand(3, 1, 16, 32)
    attn = torch.zeros(())  # unused by warp_error
    torch.testing.assert_close(warp_error(img, flow, target, DancerLayer(d, torch.zeros_like(mask), attn)),
                               warp_error(img, flow, target))
    torch.testing.assert_close(warp_error(img, flow, target, DancerLayer(d, torch.ones_like(mask), attn)),
                               warp_error(img, d, target))
    blended = sum(sum(F.mse_loss(warp(blur(img[i:i + 1], s), flow[i:i + 1]) * (1 - mask[i:i + 1])
                                 + warp(blur(img[i:i + 1], s), d[i:i + 1]) * mask[i:i + 1], blur(target[i:i + 1], s))
                      for s in WARP_BLURS) for i in range(3)) / len(WARP_BLURS)
    torch.testing.assert_close(warp_error(img, flow, target, DancerLayer(d, mask, attn)), blended)


@pytest.mark.parametrize("condition", ["first", "previous"])
def test_warp_loss_adds_the_warp_error_and_every_path_agrees(condition):
    """warp_loss w: loss = recon + beta * kl + w * warp, warp being warp_error of the frame the
    change is added to (the first or the previous true frame) warped by the model's flow (and, for
    pose_flow, its dancer layer blended in, plus the match's error), averaged
    over frames; batched, per-frame and checkpointed training agree with it on; it changes the flow's
    gradients; w = 0 leaves the loss as it was; a model without warp refuses it."""
    torch.manual_seed(0)
    model = jitter(VAE_Model(*TINY, residual=True, condition=condition, warp=True,
                             first_pose=condition == "first", pose_flow=condition == "first"))
    torch.nn.init.normal_(model.Generator[-1].weight, std=0.1)
    torch.nn.init.normal_(model.flow.weight, std=0.05)
    img, lab = torch.rand(2, 6, 3, 32, 64), torch.rand(2, 6, 3, 32, 64)
    eps = torch.randn(2, 5, TINY[2], 32, 64)
    off, g_off = _loss_and_grads(model, img, lab, True, eps, fast=True)
    on, g_on = _loss_and_grads(model, img, lab, True, eps, fast=True, warp_loss=0.5)
    assert off["warp"].item() == 0
    torch.testing.assert_close(off["loss"], off["recon"] + 0.7 * off["kl"], rtol=0, atol=0)
    torch.testing.assert_close(on["loss"], on["recon"] + 0.7 * on["kl"] + 0.5 * on["warp"])
    assert on["warp"] > 0
    assert not torch.allclose(g_on["flow.weight"], g_off["flow.weight"])
    # By hand: the flow decode used, the frame it warped, and frame t as the target.
    seen, decode = [], model._decode
    model._decode = lambda *a: seen.append((a[3], *decode(*a)[1:])) or decode(*a)
    with torch.no_grad():
        again = model(img, lab, True, eps=eps, beta=0.7, warp_loss=0.5)
    del model._decode
    (prev_img, flow, layer), = seen
    torch.testing.assert_close(prev_img, (img[:, :1].expand(-1, 5, -1, -1, -1) if condition == "first"
                                          else img[:, :-1]).flatten(0, 1))
    assert (layer is None) == (condition != "first")
    expected = warp_error(prev_img, flow, img[:, 1:].flatten(0, 1), layer)
    if condition == "first":  # pose_flow: and the match's error, pose t against the first pose
        with torch.no_grad():
            feat = model.label_transformation(lab.flatten(0, 1)).unflatten(0, (2, 6))
            attn = model._match_attn(feat[:, 1:].flatten(0, 1), feat[:, :1].expand(-1, 5, -1, -1, -1).flatten(0, 1))[0]
            expected = expected + match_error(attn, lab[:, 1:].flatten(0, 1),
                                              lab[:, :1].expand(-1, 5, -1, -1, -1).flatten(0, 1))
    torch.testing.assert_close(again["warp"], expected / 10)
    _assert_training_paths_agree(model, img, lab, eps, warp_loss=0.5)
    with pytest.raises(ValueError, match="warp_loss needs a warp model"):
        VAE_Model(*TINY, residual=True)(img, lab, True, eps=eps, warp_loss=0.5)


def test_flow_scale_and_checkpoints_written_before_it():
    """The flow in pixels is the convolution's output times flow_scale: FLOW_SCALE in a new model,
    stored in its state_dict; a checkpoint written before the scale existed (no flow_scale) loads
    with 1, the function it was trained as."""
    torch.manual_seed(0)
    model = jitter(VAE_Model(*TINY, residual=True, condition="first", warp=True)).eval()
    assert model.flow_scale.item() == FLOW_SCALE == 16.0
    first, lab = torch.rand(2, 3, 32, 64), torch.rand(2, 5, 3, 32, 64)
    noise = model.sample_noise(2, 5, 32, 64, generator=torch.Generator().manual_seed(1))

    def fresh():
        return VAE_Model(*TINY, residual=True, condition="first", warp=True).eval()

    again = fresh()
    load_model_weights(again, {"model": model.state_dict()}, "new.ckpt")
    assert again.flow_scale.item() == FLOW_SCALE
    old = fresh()
    load_model_weights(old, {"model": {k: v for k, v in model.state_dict().items() if k != "flow_scale"}}, "old.ckpt")
    assert old.flow_scale.item() == 1.0
    with torch.no_grad():
        model.flow.weight /= FLOW_SCALE  # the same flow in pixels as the old checkpoint's
        model.flow.bias /= FLOW_SCALE
        torch.testing.assert_close(old.generate(first, lab, noise), model.generate(first, lab, noise),
                                   rtol=1e-4, atol=1e-5)
        assert not torch.allclose(old.generate(first, lab, noise), again.generate(first, lab, noise))


@torch.no_grad()
def _frame_1(m):
    """A pose_flow model's frame 1 from fixed random inputs: (pred, flow, DancerLayer, the
    Generator's change computed from the features alone, the first frame)."""
    g = torch.Generator().manual_seed(5)
    first, lab = torch.rand(2, 3, 32, 64, generator=g), torch.rand(2, 2, 3, 32, 64, generator=g)
    z = torch.randn(2, TINY[2], 32, 64, generator=g)
    cond, label_feat = m.encode_first(first, lab[:, 0]), m.encode_labels(lab[:, 1])
    pred, flow, layer = m._decode(cond, label_feat, z, first)
    return pred, flow, layer, m.Generator(m.Decoder_Fusion(m._split(cond)[0], label_feat, z)), first


def test_pose_flow_checkpoints_written_before_the_dancer_layer():
    """A pose_flow checkpoint without dancer_mask loads with the mask at zero everywhere: the
    frame is the warped frame plus the Generator's change, the function it was trained as. A
    model with the layer on is not."""
    torch.manual_seed(0)
    opts = dict(residual=True, condition="first", first_pose=True, warp=True, pose_flow=True)
    model = jitter(VAE_Model(*TINY, **opts)).eval()
    old_sd = {k: v for k, v in model.state_dict().items()
              if not k.startswith(("dancer_mask.", "base_view.", "gather_mask."))}
    old = VAE_Model(*TINY, **opts).eval()
    load_model_weights(old, {"model": old_sd}, "old.ckpt")
    for m, layer_off in ((old, True), (model, False)):
        pred, flow, _, change, first = _frame_1(m)
        assert torch.allclose(pred, warp(first, flow) + change, rtol=1e-5, atol=1e-6) == layer_off


def test_pose_flow_checkpoints_written_before_the_generator_saw_its_base():
    """A pose_flow checkpoint without base_view loads with a view of zeros: the frame is the
    warped frame with the dancer layer blended in, plus the Generator's change computed from the
    features alone, the function it was trained as. A model whose Generator sees that frame is not."""
    torch.manual_seed(0)
    opts = dict(residual=True, condition="first", first_pose=True, warp=True, pose_flow=True)
    model = jitter(VAE_Model(*TINY, **opts)).eval()
    old = VAE_Model(*TINY, **opts).eval()
    load_model_weights(old, {"model": {k: v for k, v in model.state_dict().items()
                                       if not k.startswith(("base_view.", "gather_mask."))}}, "old.ckpt")
    assert torch.all(old.base_view.weight == 0) and torch.all(old.base_view.bias == 0)
    for m, blind in ((old, True), (model, False)):
        pred, flow, layer, change, first = _frame_1(m)
        base = warp(first, flow)
        base = base + layer.mask * (warp(first, layer.displacement) - base)
        assert torch.allclose(pred, base + change, rtol=1e-5, atol=1e-6) == blind


def test_pose_flow_checkpoints_written_before_the_gathered_layer():
    """A pose_flow checkpoint without gather_mask loads with that mask at zero everywhere: its
    frames are those of the same weights with the gathered layer off, the function it was trained
    as. The same weights with the layer on give other frames."""
    torch.manual_seed(0)
    opts = dict(residual=True, condition="first", first_pose=True, warp=True, pose_flow=True)
    model = jitter(VAE_Model(*TINY, **opts)).eval()
    old = VAE_Model(*TINY, **opts).eval()
    load_model_weights(old, {"model": {k: v for k, v in model.state_dict().items()
                                       if not k.startswith("gather_mask.")}}, "old.ckpt")
    assert torch.all(old.gather_mask.weight == 0) and torch.all(old.gather_mask.bias == float("-inf"))
    on = _frame_1(model)[0]
    with torch.no_grad():
        model.gather_mask.bias.fill_(float("-inf"))
    off = _frame_1(model)[0]
    torch.testing.assert_close(_frame_1(old)[0], off, rtol=0, atol=0)
    assert not torch.allclose(on, off)


def test_pose_flow_checkpoints_written_before_the_match_block():
    """A pose_flow checkpoint without match_block (written when the match used 4 x 4 blocks) loads
    matching 4 x 4 blocks; one written now keeps its own block size (2) through a save and load;
    the two compute different frames from the same weights."""
    torch.manual_seed(0)
    opts = dict(residual=True, condition="first", first_pose=True, warp=True, pose_flow=True)
    model = jitter(VAE_Model(*TINY, **opts)).eval()
    assert model._match_px == model.match_block.item() == MATCH_BLOCK == 2
    old, new = VAE_Model(*TINY, **opts).eval(), VAE_Model(*TINY, **opts).eval()
    load_model_weights(old, {"model": {k: v for k, v in model.state_dict().items() if k != "match_block"}}, "old.ckpt")
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    load_model_weights(new, {"model": torch.load(buf, weights_only=True)}, "new.ckpt")
    assert old._match_px == 4 and new._match_px == 2
    first, lab = torch.rand(2, 3, 32, 64), torch.rand(2, 3, 3, 32, 64)
    eps = model.sample_noise(2, 3, 32, 64)
    with torch.no_grad():
        assert old.pose_match(old.encode_labels(lab[:, 1]), old.encode_labels(lab[:, 0])).shape == (2, 2, 8, 16)
        ref = model.generate(first, lab, eps)
        torch.testing.assert_close(new.generate(first, lab, eps), ref, rtol=0, atol=0)
        assert not torch.allclose(old.generate(first, lab, eps), ref)


def test_kl_near_the_prior_is_accurate_and_never_negative():
    """Near q = p (where training sits once z carries little) the KL is tiny; float32 computes it
    to 1e-5 relative of its float64 value, never below 0 (exp(v) - 1 - v rounded to negatives)."""
    torch.manual_seed(0)
    logvar = (torch.rand(100_000) - 0.5) * 1e-3
    mu = torch.zeros(100_000)
    exact = kl_standard_normal(mu.double(), logvar.double())
    for kl in (kl_standard_normal(mu, logvar), kl_gaussians(mu, logvar, mu, torch.zeros_like(logvar))):
        assert kl.min() >= 0
        torch.testing.assert_close(kl.sum().double(), exact.sum(), rtol=1e-5, atol=0)


def test_the_pose_match_and_the_warp_loss_stay_float32_under_autocast():
    """They are documented in at least float32, but autocast ran their matrix products and the
    loss's blurs in bfloat16 on float32 inputs: the dancer layer's displacement was rounded by up
    to a quarter of a pixel."""
    m = jitter(VAE_Model(*TINY, residual=True, condition="first", first_pose=True, warp=True, pose_flow=True))
    g = torch.Generator().manual_seed(0)
    lf, fpf = torch.randn(2, TINY[1], 8, 16, generator=g), torch.randn(2, TINY[1], 8, 16, generator=g)
    img, target = torch.rand(2, 3, 8, 16, generator=g), torch.rand(2, 3, 8, 16, generator=g)
    flow = torch.randn(2, 2, 8, 16, generator=g)
    attn, hw = m._match_attn(lf, fpf)
    layer = DancerLayer(torch.randn(2, 2, 8, 16, generator=g) * 4, torch.rand(2, 1, 8, 16, generator=g), attn)
    labels = torch.rand(2, 3, 8, 16, generator=g), torch.rand(2, 3, 8, 16, generator=g)
    plain = (m._displacement(attn, hw, 2), warp_error(img, flow, target, layer), match_error(attn, *labels))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto_attn, _ = m._match_attn(lf, fpf)
        auto = (m._displacement(attn, hw, 2), warp_error(img, flow, target, layer), match_error(attn, *labels))
    assert auto_attn.dtype == torch.float32
    for a, b in zip(auto, plain):
        assert a.dtype == torch.float32 and torch.equal(a, b)


def test_unknown_z_mode_or_recon_is_refused():
    """generate(z_mode="samples") ran the "zero" rollout and forward(recon="MSE") trained with L1."""
    m = VAE_Model(*TINY)
    first, labels = torch.rand(1, 3, 8, 16), torch.rand(1, 3, 3, 8, 16)
    with pytest.raises(ValueError, match="z_mode must be one of"):
        m.generate(first, labels, m.sample_noise(1, 3, 8, 16), z_mode="samples")
    with pytest.raises(ValueError, match="recon must be one of"):
        m(torch.rand(1, 3, 3, 8, 16), labels, recon="MSE")


# ---- mutation audit: per-frame teacher forcing, the recon choice, the gathered layer, the blocks ----

@pytest.mark.parametrize("fast,grad_ckpt", [(True, False), (False, False), (True, True), (False, True)])
def test_teacher_forcing_per_frame_reads_the_true_or_the_own_previous_frame(fast, grad_ckpt):
    """teacher_forcing as a list: frame t (1..T-1) is decoded from the true frame t-1 where entry
    t-1 is True, else from the model's own clamped frame t-1 (frame 1 always from frame 0), in the
    batched, per-frame and checkpointed paths. Fixed eps. The frames whose entry is True are those
    of an all-True pass; the others are those of an all-True pass on a sequence whose previous
    frame was replaced by the model's own clamped output (frame t's z and pose are unchanged)."""
    torch.manual_seed(0)
    model = jitter(VAE_Model(*TINY, residual=True)).eval()
    torch.nn.init.normal_(model.Generator[-1].weight, std=0.1)
    g = torch.Generator().manual_seed(2)
    img, lab = torch.rand(2, 5, 3, 16, 32, generator=g), torch.rand(2, 5, 3, 16, 32, generator=g)
    eps = torch.randn(2, 4, TINY[2], 16, 32, generator=g)

    def pred(x, tf):
        with torch.set_grad_enabled(grad_ckpt):  # the checkpointed path runs only with grad on
            return model(x, lab, tf, eps=eps, fast=fast, grad_ckpt=grad_ckpt)["pred"].detach()
    mixed, forced = pred(img, [True, False, True, False]), pred(img, True)
    for i in (0, 2):  # frames 1 and 3: from the true frames 0 and 2
        torch.testing.assert_close(mixed[:, i], forced[:, i], rtol=1e-5, atol=1e-6)
    for i in (1, 3):  # frames 2 and 4: from the model's own frames 1 and 3, far from the true ones
        assert (mixed[:, i] - forced[:, i]).abs().max() > 1e-2, i
    own = img.clone()
    own[:, 1], own[:, 3] = mixed[:, 0].clamp(0, 1), mixed[:, 2].clamp(0, 1)
    ref = pred(own, True)
    for i in (1, 3):
        torch.testing.assert_close(mixed[:, i], ref[:, i], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("recon", ["mse", "l1"])
@pytest.mark.parametrize("fast,grad_ckpt,tf", [(True, False, True), (False, False, True), (True, False, [True, False]),
                                               (True, True, True), (False, True, [True, False])])
def test_recon_is_the_mean_error_of_the_returned_frames(recon, fast, grad_ckpt, tf):
    """recon="l1" is the mean absolute error of pred against frames 1..T-1, "mse" the mean squared
    error (computed here from the returned pred), in the batched, per-frame and checkpointed paths;
    loss = recon + beta * kl."""
    torch.manual_seed(0)
    model = jitter(VAE_Model(*TINY))
    g = torch.Generator().manual_seed(3)
    img, lab = torch.rand(2, 3, 3, 16, 32, generator=g), torch.rand(2, 3, 3, 16, 32, generator=g)
    eps = torch.randn(2, 2, TINY[2], 16, 32, generator=g)
    with torch.set_grad_enabled(grad_ckpt):
        out = model(img, lab, tf, eps=eps, beta=0.5, recon=recon, fast=fast, grad_ckpt=grad_ckpt)
    diff = out["pred"].detach().double() - img[:, 1:].double()
    ref = diff.abs().mean() if recon == "l1" else diff.pow(2).mean()
    mae, mse = diff.abs().mean(), diff.pow(2).mean()
    assert abs(mae - mse) > 0.05 * mae  # the two errors are told apart here
    torch.testing.assert_close(out["recon"].detach().double(), ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(out["loss"].detach(), (out["recon"] + 0.5 * out["kl"]).detach(), rtol=1e-6, atol=0)


def test_pose_flow_gathered_layer_reads_the_first_frame_not_the_warped_one(monkeypatch):
    """pose_flow's third layer reads the first frame (the prev_img given to _decode) through the
    match's attention, not the frame the flow warped and the dancer layer blended. With the
    gathered layer's mask fully on and the Generator's change off, the frame is the gathered one."""
    import modules.model as model_module
    torch.manual_seed(0)
    m = jitter(VAE_Model(*TINY, residual=True, condition="first", first_pose=True, warp=True, pose_flow=True)).eval()
    g = torch.Generator().manual_seed(4)
    first, first_label, label = (torch.rand(2, 3, 16, 32, generator=g) for _ in range(3))
    z = torch.randn(2, TINY[2], 16, 32, generator=g)
    seen, real = [], model_module.gather
    monkeypatch.setattr(model_module, "gather",
                        lambda img, attn, block: seen.append(img.clone()) or real(img, attn, block))
    with torch.no_grad():
        feat, label_feat = m.encode_first(first, first_label), m.label_transformation(label)
        _, flow, layer = m._decode(feat, label_feat, z, first)
        assert len(seen) == 1 and torch.equal(seen[0], first)
        assert (warp(first, flow) - first).abs().max() > 1e-2  # the warped frame is not the first one
        # Independently of the wrapper: the gathered layer alone, each block of the frame the
        # attention-weighted mean of the first frame's blocks (written out here).
        m.gather_mask.weight.zero_()
        m.gather_mask.bias.fill_(float("inf"))
        m.Generator[-1].weight.zero_()
        m.Generator[-1].bias.zero_()
        out, _, layer = m._decode(feat, label_feat, z, first)
        b = m._match_px
        B, C, H, W = first.shape
        blocks = first.unflatten(2, (H // b, b)).unflatten(4, (W // b, b)).permute(0, 2, 4, 1, 3, 5)
        blocks = blocks.flatten(1, 2).flatten(2)  # (B, hw, C*b*b), row-major blocks
        mixed = torch.einsum("bij,bjk->bik", layer.attn, blocks)
        ref = mixed.unflatten(1, (H // b, W // b)).unflatten(3, (C, b, b)).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert (out - first).abs().max() > 1e-2


@pytest.mark.parametrize("cin,cout", [(6, 6), (6, 10)])
def test_layer_blocks_compute_their_documented_functions(cin, cout):
    """ResidualBlock: 3x3 conv, LeakyReLU, 3x3 conv, LeakyReLU (slope 0.01), plus identity or a 1x1
    adaptor; DepthConv: 1x1 conv + LeakyReLU (0.01), depthwise 3x3, 1x1 conv, plus identity or
    adaptor; ConvFFN: x + conv_out(a * LeakyReLU(b)) (slope 0.1) with (a, b) the channel halves of
    conv(x); DepthConvBlock: ConvFFN after DepthConv. Written with F.conv2d from the parameters."""
    from modules.layers import ConvFFN, DepthConv, DepthConvBlock, ResidualBlock
    torch.manual_seed(0)
    x = torch.randn(2, cin, 8, 16)

    def conv(c, x, **kw):
        return F.conv2d(x, c.weight, c.bias, **kw)

    def identity(block, x):
        assert (block.adaptor is None) == (cin == cout)
        return x if cin == cout else conv(block.adaptor, x)

    res = jitter(ResidualBlock(cin, cout), scale=0.1)
    h = F.leaky_relu(conv(res.conv1, x, padding=1), 0.01)
    ref = F.leaky_relu(conv(res.conv2, h, padding=1), 0.01) + identity(res, x)
    with torch.no_grad():
        torch.testing.assert_close(res(x), ref, rtol=1e-5, atol=1e-5)

    def depth_ref(dc, x):
        h = F.leaky_relu(conv(dc.conv1[0], x), 0.01)
        h = conv(dc.depth_conv, h, padding=1, groups=cin)
        return conv(dc.conv2, h) + identity(dc, x)

    def ffn_ref(ffn, y):
        c = y.shape[1]
        assert ffn.conv.out_channels == max(min(4 * c, 1024), 2 * c)
        a, b = conv(ffn.conv, y).split(ffn.conv.out_channels // 2, dim=1)
        return y + conv(ffn.conv_out, a * F.leaky_relu(b, 0.1))

    dc = jitter(DepthConv(cin, cout), scale=0.1)
    ffn = jitter(ConvFFN(cout), seed=1, scale=0.1)
    block = jitter(DepthConvBlock(cin, cout), seed=2, scale=0.1)
    y = torch.randn(2, cout, 8, 16)
    with torch.no_grad():
        torch.testing.assert_close(dc(x), depth_ref(dc, x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ffn(y), ffn_ref(ffn, y), rtol=1e-5, atol=1e-5)
        ref = ffn_ref(block.block[1], depth_ref(block.block[0], x))
        torch.testing.assert_close(block(x), ref, rtol=1e-5, atol=1e-5)
