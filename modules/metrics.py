"""Image-quality metrics, per sample: never averaged over a batch before the log."""
import torch
import torch.nn.functional as F


def psnr(pred, target, data_range=1.0):
    """PSNR in dB of each image: pred, target (..., C, H, W) -> (...). MSE is floored at 1e-10,
    so identical images give 100 dB rather than infinity."""
    mse = (pred.float() - target.float()).pow(2).flatten(-3).mean(-1)
    return 10.0 * torch.log10(data_range ** 2 / mse.clamp_min(1e-10))


def sequence_psnr(pred, target):
    """pred, target (B, L, C, H, W) with frame 0 given -> per-frame PSNR (B, L-1) of frames 1..L-1."""
    return psnr(pred[:, 1:], target[:, 1:])


def drift(curve, n=100):
    """How much worse the end of a rollout is than its start: (k, mean of the first k values, mean
    of the last k) of a per-frame curve, k = n or at most half the curve."""
    c = torch.as_tensor(curve, dtype=torch.float64)
    k = max(1, min(n, len(c) // 2))
    return k, c[:k].mean().item(), c[-k:].mean().item()


SSIM_WINDOW = 11  # pixels: SSIM's Gaussian window, which smaller frames cannot hold


def ssim(pred, target, data_range=1.0, win_size=SSIM_WINDOW, sigma=1.5, k1=0.01, k2=0.03):
    """SSIM of each image (Wang et al. 2004): pred, target (..., C, H, W) -> (...).

    Local statistics under an 11x11 Gaussian window (sigma 1.5), population (co)variances, the
    map averaged over the positions where the window fits (no padding) and then over channels.
    This is skimage's structural_similarity(gaussian_weights=True, use_sample_covariance=False,
    data_range=1, channel_axis=...) and pytorch-msssim's ssim; tests/test_quality.py checks it
    against values computed with skimage. Written here rather than imported: skimage would bring
    scipy for 20 lines, and torchmetrics 1.9.0's SSIM with the same window and constants differs
    from skimage's by up to 0.04 on this project's frames (mean 0.954 against 0.931 over 199
    generated frames, measured)."""
    C, H, W = pred.shape[-3:]
    if H < win_size or W < win_size:
        raise ValueError(f"SSIM needs images of at least {win_size}x{win_size}, got {H}x{W}")
    x = pred.float().reshape(-1, C, H, W)
    y = target.float().reshape(-1, C, H, W)
    # Float64 for the moments: E[x^2] - E[x]^2 loses digits in float32 on flat regions.
    x, y = x.double(), y.double()
    r = torch.arange(win_size, dtype=x.dtype, device=x.device) - (win_size - 1) / 2
    g = torch.exp(-r.pow(2) / (2 * sigma ** 2))
    g = g / g.sum()
    gh, gv = g.view(1, 1, 1, -1).expand(C, 1, 1, -1), g.view(1, 1, -1, 1).expand(C, 1, -1, 1)

    def blur(t):  # separable Gaussian, one channel at a time, valid region only
        return F.conv2d(F.conv2d(t, gh, groups=C), gv, groups=C)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x.pow(2)
    var_y = blur(y * y) - mu_y.pow(2)
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x.pow(2) + mu_y.pow(2) + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1).float().reshape(pred.shape[:-3])
