"""Where a model's test error lies on the generated dance data, and what the data allows.

    python scripts/error_regions.py --DR data/dance
    python scripts/error_regions.py --DR data/dance --ckpt_path runs/x/best.ckpt

Only for data written by scripts/make_dance_data.py, at the lab's 32 x 64: each test sequence is
rendered again with and without the dancer, which splits the pixels of frame t into three
regions: the dancer at t, the wall the first frame's dancer hid that is open at t ("revealed"),
and the rest (wall, floor and the dancer's moving shadow). Printed per sequence and averaged, in
PSNR (dB, frames 1..L-1, as the Tester):
- copy-first, the first frame for every frame;
- two ceilings, exact everywhere but the revealed wall: "ghost" leaves the first frame's dancer
  there, "inpainted" fills it row by row, linearly between the visible wall on either side;
- with --ckpt_path, the model's rollout (z sampled, --seed as the Tester, rounded to 8 bits as
  submitted) and the share of its squared error in each region;
- the drift of each (the Tester's: mean PSNR of the first 100 frames and of the last 100).
"""
import json
import os
import sys

if __name__ == "__main__":  # run as a file, Python puts scripts/ on the path; modules/ is at the root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from modules.environment import require
    require("scripts/error_regions.py", ("torch", "numpy", "tqdm", "PIL", "matplotlib"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dataloader import RESAMPLE, DataError, TestSequences  # noqa: E402
from modules.checkpoint import CheckpointError  # noqa: E402
from modules.options import ConfigError, HelpFormatter, Parser  # noqa: E402
from modules.metrics import drift, psnr  # noqa: E402
from scripts.make_dance_data import MARKER, Video, plan  # noqa: E402

REGIONS = ("dancer", "revealed", "rest")


def get_parser():
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--DR", default="data/dance", help="a dataset written by scripts/make_dance_data.py")
    p.add_argument("--ckpt_path", default=None, help="also split this checkpoint's error")
    p.add_argument("--test_len", type=int, default=None,
                   help="frames per test sequence: must be the dataset's (the test_len it was written with), "
                        "which is the default; the sequences are analysed whole")
    p.add_argument("--device", default=None, help="as the Tester's (default: cuda when present)")
    p.add_argument("--seed", type=int, default=0, help="the Tester's --seed: the same z")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def _small(im, H, W):
    """The loader's resize of a rendered frame, as float (H, W, 3) in [0, 1]."""
    return np.asarray(im.resize((W, H), RESAMPLE), dtype=np.float32) / 255


def fill_rows(img, hole):
    """img (H, W, 3) with the pixels of hole (H, W) replaced, row by row, by linear interpolation
    between the nearest pixels outside the hole (held constant beyond the last one)."""
    out = img.copy()
    xs = np.arange(img.shape[1])
    for y in np.nonzero(hole.any(1) & (~hole).any(1))[0]:
        h = hole[y]
        for c in range(img.shape[2]):
            out[y, h, c] = np.interp(xs[h], xs[~h], img[y, ~h, c])
    return out


def regions(video, n, H, W):
    """Frames (n, H, W, 3) of a generator video, and the masks (n, H, W) of its three regions."""
    frames, walls = [], []
    for i in range(n):
        frames.append(_small(video.render(i)[0], H, W))
        walls.append(_small(video.render(i, figure=False)[0], H, W))
    frames, walls = np.stack(frames), np.stack(walls)
    dancer = np.abs(frames - walls).max(-1) > 0
    revealed = dancer[:1] & ~dancer
    return frames, dict(dancer=dancer, revealed=revealed, rest=~dancer & ~revealed)


def _curve(pred, truth):
    """PSNR of frames 1.. of (n, H, W, 3) arrays, per frame."""
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a[1:])).permute(0, 3, 1, 2)  # noqa: E731
    return psnr(t(pred), t(truth)).numpy()


def analyse(root, ckpt_path=None, test_len=None, device=None, seed=0):
    marker = os.path.join(root, MARKER)
    try:
        with open(marker) as f:
            made = json.load(f)["args"]
        if made["test_len"] < 2:  # (checked before plan(), which refuses it as a generator flag)
            raise DataError(f"{root}: its test sequences have {made['test_len']} frame, and the analysis scores "
                            "frames 1.. against frame 0; write the data with --test_len 2 or more")
        tests = [v for v in plan(**made)[0] if v["split"] == "test"]
    except DataError:
        raise
    except (ValueError, KeyError, TypeError) as e:  # a file cut short or edited by hand
        raise DataError(f"{marker} does not describe a dataset written by scripts/make_dance_data.py "
                        f"({type(e).__name__}: {e}); write the data again") from None
    H, W = 32, 64
    L = made["test_len"] if test_len is None else test_len
    seqs = TestSequences(root, H, W, test_len=L, cache=False)
    extra = [seq["name"] for seq in seqs if not 0 <= int(seq["name"]) < len(tests)]
    if extra:
        raise DataError(f"{root}: test sequence(s) {', '.join(extra)} are not among the {len(tests)} its "
                        f"{MARKER} describes (added by hand?); the analysis renders each sequence again")
    preds = None
    if ckpt_path:
        from Tester import as_submitted, load_model
        from modules.options import check_tester, tester_parser
        from modules.runtime import prepare_model, resolve_speed, rollout, to_float
        targs = check_tester(tester_parser().parse_args(  # the Tester's settings
            ["--ckpt_path", ckpt_path] + (["--device", device] if device else [])))
        speed = resolve_speed(targs)
        model, _, _ = load_model(ckpt_path, targs)
        prepare_model(model, speed)
        eps = model.sample_noise(len(seqs), L, H, W, generator=torch.Generator().manual_seed(seed))
        first = torch.stack([s["first"] for s in seqs])
        labels = torch.stack([s["labels"] for s in seqs])
        out = as_submitted(rollout(model, to_float(first, speed), to_float(labels, speed), eps.to(speed.device), speed))
        preds = out.permute(0, 1, 3, 4, 2).cpu().numpy()
    rows, curves = [], {}
    for k, seq in enumerate(seqs):
        frames, masks = regions(Video(**tests[int(seq["name"])]["video"]), L, H, W)
        if seq["gt"] is None or not np.array_equal(np.rint(frames * 255), seq["gt"].permute(0, 2, 3, 1).numpy()):
            raise DataError(f"{root}: test sequence {seq['name']} is not what scripts/make_dance_data.py "
                            "renders from its dataset.json (another version of the generator, or edited files)")
        hole = masks["dancer"][0]
        row = dict(name=seq["name"], fraction={r: float(masks[r][1:].mean()) for r in REGIONS})
        scored = dict(copy_first=np.broadcast_to(frames[:1], frames.shape))
        for name, fill in (("ghost", frames[0]), ("inpainted", fill_rows(frames[0], hole))):
            ceiling = frames.copy()
            ceiling[masks["revealed"]] = np.broadcast_to(fill, frames.shape)[masks["revealed"]]
            scored[name] = ceiling
        if preds is not None:
            scored["model"] = preds[k]
            err = ((preds[k] - frames) ** 2).sum(-1)[1:]
            row["share"] = {r: float(err[masks[r][1:]].sum() / err.sum()) for r in REGIONS}
        for name, pred in scored.items():
            curve = _curve(pred, frames)
            row[name] = float(curve.mean())
            curves.setdefault(name, []).append(curve)
        rows.append(row)
    keys = list(curves)
    mean = {key: float(np.mean([r[key] for r in rows])) for key in keys}
    ends = {}  # the Tester's drift, of the curve averaged over sequences
    for key, c in curves.items():
        n, first, last = drift(np.mean(c, 0))
        ends[key] = dict(first=first, last=last)
    for group in ("fraction", "share"):
        if group in rows[0]:
            mean[group] = {r: float(np.mean([row[group][r] for row in rows])) for r in REGIONS}
    return dict(sequences=rows, mean=mean, drift=ends, drift_frames=n, test_len=L)


def main(argv=None):
    args = get_parser().parse_args(argv)
    try:
        if args.test_len is not None and args.test_len < 2:  # 0 was read as "all"
            raise ConfigError(f"--test_len must be at least 2 (the dataset's length, the default), "
                              f"got {args.test_len}")
        if not os.path.isfile(os.path.join(args.DR, MARKER)):
            raise DataError(f"{args.DR} has no {MARKER}: this analysis needs data written by "
                            "scripts/make_dance_data.py (it renders the test sequences again)")
        res = analyse(args.DR, args.ckpt_path, args.test_len, args.device, args.seed)
    except (DataError, CheckpointError, ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing written", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(res))
        return 0
    keys = list(res["mean"].keys() - {"fraction", "share"})
    keys.sort(key=["copy_first", "ghost", "inpainted", "model"].index)
    print("PSNR (dB) " + " | ".join(f"{k:>10}" for k in keys) + " | pixels dancer / revealed / rest"
          + (" | model's squared error there" if "model" in keys else ""))
    for r in res["sequences"] + [dict(res["mean"], name="mean")]:
        line = f"{r['name']:>9} " + " | ".join(f"{r[k]:10.2f}" for k in keys)
        line += " | " + " / ".join(f"{r['fraction'][g]:.3f}" for g in REGIONS)
        if "share" in r:
            line += " | " + " / ".join(f"{r['share'][g]:.2f}" for g in REGIONS)
        print(line)
    n, L = res["drift_frames"], res["test_len"]
    print(f"drift, frames 1-{n} -> {L - n}-{L - 1}: " + ", ".join(
        f"{k} {d['first']:.2f} -> {d['last']:.2f} ({d['last'] - d['first']:+.2f})" for k, d in res["drift"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
