"""GIFs and figures. matplotlib is imported lazily, and figures are made without pyplot, so the
process's backend (a notebook's, say) is never switched."""

import io

import numpy as np
import torch
from PIL import Image


def to_uint8(frames):
    """(L, 3, H, W) float in [0, 1] -> (L, H, W, 3) uint8 numpy, rounded as in submission.csv."""
    return frames.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_gif(frames, path, fps=20, scale=2):
    """Write frames (L, 3, H, W) as a looping GIF, enlarged `scale` times (nearest) to be visible."""
    arr = to_uint8(frames)
    if scale > 1:
        arr = arr.repeat(scale, axis=1).repeat(scale, axis=2)
    # Pillow's GIF encoder (the one imageio calls, same bytes), into memory, then written: a write
    # that fails (a full disk) is one OSError, where imageio's file writer failed again from its
    # finaliser with a second traceback.
    images = [Image.fromarray(a) for a in arr]
    data = io.BytesIO()
    images[0].save(data, format="GIF", save_all=True, append_images=images[1:], duration=1000 / fps, loop=0)
    with open(path, "wb") as f:
        f.write(data.getvalue())


def side_by_side(*videos):
    """Concatenate videos (L, 3, H, W) along the width, e.g. prediction | truth | pose."""
    return torch.cat([v.float().cpu() for v in videos], dim=-1)


def psnr_figure(curves, title="PSNR per frame"):
    """curves: {name: list of PSNR per frame (frames 1..L-1)} -> a matplotlib Figure."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(7, 3.5))
    ax = fig.subplots()
    for name, curve in curves.items():
        ax.plot(np.arange(1, len(curve) + 1), curve, label=f"{name} (avg {np.mean(curve):.2f} dB)", lw=1)
    ax.set_xlabel("frame")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def save_psnr_plot(curves, path, title="PSNR per frame"):
    psnr_figure(curves, title).savefig(path, dpi=120)
    return path


def save_strip(rows, path, n=8, scale=2, gap=2):
    """A PNG of `n` evenly spaced frames (columns) of each video in `rows` ({name: (L, 3, H, W)},
    drawn top to bottom), enlarged `scale` times, the row names on the left: a result at a glance."""
    from PIL import Image, ImageDraw
    L = min(v.shape[0] for v in rows.values())
    idx = np.linspace(0, L - 1, min(n, L)).round().astype(int)
    H, W = next(iter(rows.values())).shape[-2:]
    h, w, margin, top = H * scale, W * scale, 70, 14
    img = Image.new("RGB", (margin + len(idx) * (w + gap), top + len(rows) * (h + gap)), "white")
    draw = ImageDraw.Draw(img)
    for c, t in enumerate(idx):
        draw.text((margin + c * (w + gap) + 2, 1), f"t={t}", fill="black")
    for r, (name, video) in enumerate(rows.items()):
        y = top + r * (h + gap)
        draw.text((2, y + h // 2 - 5), name, fill="black")
        for c, frame in enumerate(to_uint8(video[idx])):
            tile = Image.fromarray(frame).resize((w, h), Image.Resampling.NEAREST)
            img.paste(tile, (margin + c * (w + gap), y))
    img.save(path)
    return path
