import math

import torch

from modules.metrics import drift, psnr, sequence_psnr


def test_psnr_per_sample_not_per_batch():
    target = torch.zeros(2, 3, 4, 4)
    pred = target.clone()
    pred[0] += 0.1  # MSE 0.01 -> 20 dB
    pred[1] += 0.01  # MSE 1e-4 -> 40 dB
    p = psnr(pred, target)
    torch.testing.assert_close(p, torch.tensor([20.0, 40.0]))
    batch_psnr = 10 * math.log10(1 / ((pred - target) ** 2).mean().item())
    assert abs(p.mean().item() - batch_psnr) > 5  # the scaffold's batch PSNR would be wrong


def test_sequence_psnr_skips_the_given_frame():
    gt = torch.rand(2, 5, 3, 8, 8)
    pred = gt.clone()
    pred[:, 0] = 0  # frame 0 is given, never scored
    pred[:, 1:] = (gt[:, 1:] + 0.1).clamp(0, 1)
    out = sequence_psnr(pred, gt)
    assert out.shape == (2, 4)
    # frame t against true frame t (a shift by one scores other values)
    torch.testing.assert_close(out, torch.stack([psnr(pred[:, t], gt[:, t]) for t in range(1, 5)], 1))
    assert psnr(gt[0], gt[0]).eq(100).all()  # identical frames: the floor, not infinity


def test_drift_compares_the_first_and_last_frames():
    assert drift([1.0, 2.0, 3.0, 4.0, 5.0]) == (2, 1.5, 4.5)  # at most half a short curve
    k, first, last = drift(list(range(629)))
    assert (k, first, last) == (100, 49.5, 578.5)


def test_psnr_data_range_is_the_peak_value():
    """PSNR = 10 log10(peak^2 / MSE): on 8-bit values (data_range 255) an MSE of one level is
    10 log10(255^2) = 48.13 dB, the same as on [0, 1] values scaled by 1/255."""
    target = torch.full((1, 3, 4, 4), 100.0)
    pred = target + 1.0  # MSE 1 level^2
    expected = 20 * math.log10(255)
    torch.testing.assert_close(psnr(pred, target, data_range=255), torch.tensor([expected]))
    torch.testing.assert_close(psnr(pred / 255, target / 255), torch.tensor([expected]))
