"""Issue 6's model options: the learned prior's KL and sampling, the Tester's sampling modes and
best-of-K, SSIM, and a Trainer -> Tester round trip with them on tiny data on the CPU."""
import json
import math
import shutil

import pytest
import torch
from torch.distributions import Normal, kl_divergence

import Tester
import Trainer
from modules.metrics import psnr, ssim
from modules.model import VAE_Model, kl_gaussians, kl_standard_normal

from helpers import jitter

TINY = ["--F_dim", "16", "--L_dim", "8", "--N_dim", "4", "--D_out_dim", "16", "--device", "cpu", "--amp", "off"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # no oversubscription on a shared 2-core machine
    yield
    torch.set_num_threads(n)


def _normal(mu, logvar):
    return Normal(mu, torch.exp(0.5 * logvar))


def test_kl_gaussians_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu_q, mu_p = torch.randn(4, 3, 5, 6, generator=g), torch.randn(4, 3, 5, 6, generator=g)
    lv_q, lv_p = 2 * torch.randn(4, 3, 5, 6, generator=g), 2 * torch.randn(4, 3, 5, 6, generator=g)
    want = kl_divergence(_normal(mu_q, lv_q), _normal(mu_p, lv_p))
    torch.testing.assert_close(kl_gaussians(mu_q, lv_q, mu_p, lv_p), want, rtol=1e-5, atol=1e-5)
    # With p = N(0, I) it is the fixed prior's KL.
    zero = torch.zeros_like(mu_p)
    torch.testing.assert_close(kl_gaussians(mu_q, lv_q, zero, zero), kl_standard_normal(mu_q, lv_q))


def test_learned_prior_kl_in_the_training_pass():
    """forward()'s KL is KL(q(z_t | x_t, pose_t) || p(z_t | x_{t-1}, pose_t)) summed over the latent
    map and averaged over sequences and frames, with p the prior network on the previous frame."""
    torch.manual_seed(0)
    model = jitter(VAE_Model(16, 8, 4, 16, prior="learned")).eval()  # eval: BatchNorm independent of the batch
    B, T, H, W = 2, 4, 32, 64
    img, label = torch.rand(B, T, 3, H, W), torch.rand(B, T, 3, H, W)
    eps = torch.randn(B, T - 1, 4, H, W)
    out = model(img, label, True, eps=eps, beta=0.5, fast=False)
    want = 0.0
    for t in range(1, T):
        feat_t = model.frame_transformation(img[:, t])
        feat_prev = model.frame_transformation(img[:, t - 1])
        lab = model.label_transformation(label[:, t])
        _, mu_q, lv_q = model.Gaussian_Predictor(feat_t, lab, eps[:, t - 1])
        _, mu_p, lv_p = model.prior(feat_prev, lab, torch.zeros_like(eps[:, t - 1]))
        want = want + kl_divergence(_normal(mu_q, lv_q), _normal(mu_p, lv_p)).sum()
    want = want / (B * (T - 1))
    torch.testing.assert_close(out["kl"], want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["loss"], out["recon"] + 0.5 * out["kl"])


@pytest.mark.parametrize("prior", ["fixed", "learned"])
def test_prior_sampling_shapes_and_modes(prior):
    torch.manual_seed(0)
    model = jitter(VAE_Model(16, 8, 4, 16, prior=prior)).eval()
    B, L, H, W = 3, 5, 32, 64
    eps = model.sample_noise(B, L, H, W, generator=torch.Generator().manual_seed(1))
    assert eps.shape == (L - 1, B, 4, H, W)
    first, labels = torch.rand(B, 3, H, W), torch.rand(B, L, 3, H, W)
    with torch.no_grad():
        prev_feat = model.frame_transformation(first)
        lab = model.label_transformation(labels[:, 1])
        mu, logvar = model.prior_params(prev_feat, lab)
        assert mu.shape == logvar.shape == (B, 4, H, W)
        if prior == "fixed":
            assert not mu.any() and not logvar.any()
        # "sample" decodes z = prior mean + eps * prior std.
        z = mu + eps[0] * torch.exp(0.5 * logvar)
        want = model.decode(prev_feat, lab, z, first).clamp(0, 1)
        torch.testing.assert_close(model.step(first, lab, eps[0], "sample"), want)
        mean = model.step(first, lab, eps[0], "prior_mean")
        torch.testing.assert_close(model.step(first, lab, -eps[0], "prior_mean"), mean)  # noise ignored
        zero = model.step(first, lab, eps[0], "zero")
        torch.testing.assert_close(mean, model.decode(prev_feat, lab, mu, first).clamp(0, 1))
        torch.testing.assert_close(zero, model.decode(prev_feat, lab, torch.zeros_like(mu), first).clamp(0, 1))
        if prior == "fixed":
            torch.testing.assert_close(mean, zero)  # N(0, I): its mean is 0
        else:
            assert not torch.allclose(mean, zero)  # a learned prior's mean is not 0
        for mode in ("sample", "zero", "prior_mean"):
            video = model.generate(first, labels, eps, mode)
            assert video.shape == (B, L, 3, H, W)
            assert video.min() >= 0 and video.max() <= 1
            torch.testing.assert_close(video[:, 0], first)
        a = model.generate(first, labels, eps, "sample")
        b = model.generate(first, labels, torch.randn_like(eps), "sample")
        assert not torch.equal(a[:, 1:], b[:, 1:])


# ---- SSIM ------------------------------------------------------------------------------------

def _pair(k):
    """A (3, 32, 64) smooth pattern and a copy disturbed by a fine pattern of amplitude k."""
    i, j = torch.meshgrid(torch.arange(32, dtype=torch.float64), torch.arange(64, dtype=torch.float64),
                          indexing="ij")
    c = torch.arange(3, dtype=torch.float64)[:, None, None]
    x = 0.5 + 0.4 * torch.sin(0.3 * i + 0.7 * j + c)
    y = (x + k * torch.sin(1.3 * i * j + 2.0 * c) + 0.05 * k * torch.cos(0.2 * i)).clamp(0, 1)
    return x, y


# skimage 0.26.0 on the same arrays (built in numpy float64 by the same formulas):
# structural_similarity(x, y, data_range=1.0, gaussian_weights=True, sigma=1.5,
#                       use_sample_covariance=False, channel_axis=0)
SKIMAGE = {0.02: 0.9982745046596122, 0.1: 0.9584534676041604, 0.3: 0.7366530274852243}
SKIMAGE_FLAT = 0.013947636570164365  # x replaced by a constant 0.5 image, k = 0.1


@pytest.mark.parametrize("k", sorted(SKIMAGE))
def test_ssim_matches_skimage(k):
    x, y = _pair(k)
    assert ssim(x.float(), y.float()).item() == pytest.approx(SKIMAGE[k], abs=1e-5)


def test_ssim_properties():
    x, y = _pair(0.1)
    assert ssim(torch.full_like(x, 0.5), y).item() == pytest.approx(SKIMAGE_FLAT, abs=1e-5)
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-6)
    assert ssim(x, y).item() == pytest.approx(ssim(y, x).item(), abs=1e-6)
    # Per image, any leading dims: each entry is the SSIM of its own pair, as for psnr.
    xs = torch.stack([torch.stack([x, y]), torch.stack([y, y])]).float()  # (2, 2, 3, 32, 64)
    ys = torch.stack([torch.stack([y, y]), torch.stack([y, x])]).float()
    got = ssim(xs, ys)
    assert got.shape == psnr(xs, ys).shape == (2, 2)
    for a in range(2):
        for b in range(2):
            assert got[a, b].item() == pytest.approx(ssim(xs[a, b], ys[a, b]).item(), abs=1e-6)
    with pytest.raises(ValueError, match="11x11"):
        ssim(torch.rand(3, 8, 8), torch.rand(3, 8, 8))


# ---- Trainer -> Tester round trip -----------------------------------------------------------

@pytest.fixture(scope="module")
def learned_run(tiny_dance, tmp_path_factory):
    """Two epochs with the learned prior and L1 loss; returns (dataset, run folder)."""
    dr = tmp_path_factory.mktemp("quality") / "DR"
    shutil.copytree(tiny_dance, dr)  # the loaders write their caches beside the data
    run = tmp_path_factory.mktemp("quality") / "run"
    rc = Trainer.main(["--DR", str(dr), *TINY, "--prior", "learned", "--recon", "l1", "--num_epoch", "2",
                       "--train_vi_len", "4", "--partial", "0.5", "--val_vi_len", "10",
                       "--kl_anneal_type", "Full_KL", "--save_root", str(run)])
    assert rc == 0
    return dr, run


def test_trainer_logs_learned_prior_run(learned_run):
    _, run = learned_run
    args = json.loads((run / "args.json").read_text())
    assert args["prior"] == "learned" and args["recon"] == "l1"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        assert "l1" in r and "mse" not in r and r["beta"] == 1.0
        curve = r["val_psnr_per_frame"]
        assert len(curve) == 9  # frames 1..9 of the 10-frame validation sequence
        assert sum(curve) / len(curve) == pytest.approx(r["val_psnr"], abs=1e-2)


def test_progress_bar_names_the_loss_in_use(tiny_dance, tmp_path, capfd):
    dr = tmp_path / "DR"
    shutil.copytree(tiny_dance, dr)
    assert Trainer.main(["--DR", str(dr), *TINY, "--recon", "l1", "--num_epoch", "1", "--train_vi_len", "4",
                         "--val_vi_len", "10", "--log_every", "1", "--save_root", str(tmp_path / "run")]) == 0
    err = capfd.readouterr().err
    assert "l1=" in err and "mse=" not in err


def test_tester_sampling_modes_and_best_of_k(learned_run, capsys):
    dr, run = learned_run
    base = ["--DR", str(dr), "--ckpt_path", str(run / "best.ckpt"), "--device", "cpu", "--amp", "off",
            "--test_len", "20", "--no_gif"]
    results = {}
    for mode, k in (("sample", 3), ("prior_mean", 2)):
        out = run / f"test_{mode}"
        assert Tester.main([*base, "--z_mode", mode, "--num_samples", str(k), "--save_root", str(out)]) == 0
        results[mode] = json.loads((out / "results.json").read_text())
        assert (out / "submission.csv").is_file()
    printed = capsys.readouterr().out
    assert "prior learned" in printed  # the Tester samples from the prior the run was trained with
    assert "oracle" in printed and "SSIM" in printed
    assert "rollouts are identical" in printed  # prior_mean with K > 1
    for mode, res in results.items():
        assert len(res["sequences"]) == 2
        for key in ("psnr", "best_of_k_psnr", "ssim", "copy_first_psnr"):
            assert math.isfinite(res[key])
        assert -1 <= res["ssim"] <= 1
        for seq in res["sequences"]:
            assert len(seq["psnr_per_frame"]) == 19
            # The best sample is no worse than the mean (1e-4 dB: float32 rounding of the two averages).
            assert seq["best_of_k_psnr"] >= seq["psnr"] - 1e-4
    # K samples of the deterministic mode are one rollout; sampled ones differ.
    for seq in results["prior_mean"]["sequences"]:
        assert seq["best_of_k_psnr"] == pytest.approx(seq["psnr"], abs=1e-5)
    assert any(s["best_of_k_psnr"] > s["psnr"] + 1e-6 for s in results["sample"]["sequences"])


def test_sample_zero_does_not_depend_on_num_samples(learned_run, tmp_path):
    """--num_samples 3 drew the noise of all rollouts in one tensor, so the first sample of each
    sequence (the one submission.csv holds) differed from that of --num_samples 1 with the same seed."""
    dr, run = learned_run
    base = ["--DR", str(dr), "--ckpt_path", str(run / "best.ckpt"), "--device", "cpu", "--amp", "off",
            "--test_len", "20", "--no_gif"]
    csv = {}
    for k in (1, 3):
        assert Tester.main([*base, "--num_samples", str(k), "--save_root", str(tmp_path / f"k{k}")]) == 0
        csv[k] = (tmp_path / f"k{k}" / "submission.csv").read_bytes()
        res = json.loads((tmp_path / f"k{k}" / "results.json").read_text())
        assert res["model"]["prior"] == "learned" and res["model"]["F_dim"] == int(TINY[TINY.index("--F_dim") + 1])
        assert "F_dim" not in res["args"]  # the command line's model flags take no effect
    assert csv[1] == csv[3]


def test_first_frame_conditioning_with_its_pose_trains_and_tests(tiny_dance, tmp_path):
    """--condition first --residual --first_frame_from video --first_pose: the Trainer writes the
    option and pose_fusion's weights, learns them, and the Tester rebuilds the model from the
    checkpoint alone and scores it."""
    dr = tmp_path / "DR"
    shutil.copytree(tiny_dance, dr)
    run = tmp_path / "run"
    assert Trainer.main(["--DR", str(dr), *TINY, "--condition", "first", "--residual", "--first_frame_from",
                         "video", "--first_pose", "--num_epoch", "2", "--train_vi_len", "4", "--batch_size", "4",
                         "--val_vi_len", "10", "--save_root", str(run)]) == 0
    assert json.loads((run / "args.json").read_text())["first_pose"] is True
    weights = torch.load(run / "last.ckpt", weights_only=True)["model"]
    assert weights["pose_fusion.weight"].abs().sum() > 0  # trained away from its zero start
    out = tmp_path / "test"
    assert Tester.main(["--DR", str(dr), "--ckpt_path", str(run / "last.ckpt"), "--device", "cpu", "--amp", "off",
                        "--test_len", "20", "--no_gif", "--save_root", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert len(res["sequences"]) == 2 and math.isfinite(res["psnr"])
