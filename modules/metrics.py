"""Image-quality metrics, per sample: never averaged over a batch before the log."""
import torch


def psnr(pred, target, data_range=1.0):
    """PSNR in dB of each image: pred, target (..., C, H, W) -> (...). MSE is floored at 1e-10,
    so identical images give 100 dB rather than infinity."""
    mse = (pred.float() - target.float()).pow(2).flatten(-3).mean(-1)
    return 10.0 * torch.log10(data_range ** 2 / mse.clamp_min(1e-10))


def sequence_psnr(pred, target):
    """pred, target (B, L, C, H, W) with frame 0 given -> per-frame PSNR (B, L-1) of frames 1..L-1."""
    return psnr(pred[:, 1:], target[:, 1:])
