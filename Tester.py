"""Generate every test sequence from its first frame and poses: GIFs, submission.csv, and PSNR
against ground truth when the dataset has it.

    python Tester.py --ckpt_path runs/xxx/best.ckpt [--DR data/dance] [--save_root out/]

The model is rebuilt from the checkpoint (no need to repeat its dims). Output is the same on every
run for a given --seed.
"""
import os
import re
import signal
import sys
import time

# Ctrl-C while torch loads (seconds) ends the script quietly, as it does once main() runs. A
# SIGINT that the parent ignores (a background job of a script) stays ignored.
QUIET_IMPORT = __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler
if QUIET_IMPORT:
    signal.signal(signal.SIGINT, lambda signum, frame: sys.exit(130))
if __name__ == "__main__":
    from modules.environment import require
    require("Tester.py", ("torch", "numpy", "tqdm", "PIL", "matplotlib"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dataloader import DataError, TestSequences  # noqa: E402
from modules.model import build_model  # noqa: E402
from modules.checkpoint import CheckpointError, load_checkpoint, load_model_weights, model_args  # noqa: E402
from modules.files import atomic_write, dump_json, outermost_missing, remove_empty_folders  # noqa: E402
from modules.engine import OutOfMemory, first_line, is_out_of_memory  # noqa: E402
from modules.metrics import SSIM_WINDOW, drift, psnr, ssim  # noqa: E402
from modules.options import (TESTER_IGNORED, ConfigError, check_tester, given_flags, gpu_note, tester_parser,  # noqa: E402
                             writable_folder, write_failure_advice)
from modules.runtime import prepare_model, resolve_speed, rollout, to_float  # noqa: E402
from modules.visualize import save_gif, save_psnr_plot, save_strip  # noqa: E402


KAGGLE_FRAME = (32, 64)  # (H, W) of the frames submission.csv holds for the course's competition
# What a test writes per sequence or once (besides submission.csv and results.json, always rewritten).
STALE = re.compile(r"(pred|pose)_seq.+\.gif|strip_seq.+\.png|psnr_per_frame\.png")


def write_output(path, write, written):
    """write(tmp), then rename to `path` (modules/files.py: Ctrl-C or a full disk leaves the previous
    file whole and no temporary one); `written` collects the paths written, for the line an
    interruption prints. An OSError names `path`, not its temporary file."""
    try:
        atomic_write(path, write, keep_ext=True)
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), path) from None
    written.append(path)


def as_submitted(frames):
    """Frames as submission.csv and the GIFs hold them, round(x * 255) / 255: the Tester scores
    these, so its PSNR is the submission's. Rounding moves each pixel by up to half a level, onto
    the truth where it was within half a level of it, so the scores move a little either way."""
    return frames.float().clamp(0, 1).mul(255).round().div(255)


def write_submission(path, videos, written):
    """The course's Kaggle format: a header `id,0,...,6143`, then one row per frame (sequences in
    order, row 0 of each the given first frame): id, then round(x * 255) of the (3, H, W) frame
    flattened in C order."""
    rows = torch.cat([v.float().clamp(0, 1).mul(255).round().to(torch.uint8).flatten(1) for v in videos])
    rows = rows.numpy().astype(np.int64)
    table = np.concatenate([np.arange(len(rows))[:, None], rows], axis=1)
    header = "id," + ",".join(str(i) for i in range(rows.shape[1]))
    write_output(path, lambda tmp: np.savetxt(tmp, table, fmt="%d", delimiter=",", header=header, comments=""),
                 written)
    return table.shape


def fmt_ssim(value):
    return f"{value:6.4f}" if value is not None else f"{'n/a':>6}"


def load_model(path, args, given=()):
    """The checkpoint's model, rebuilt from the dims stored in it (or read off its weights), its model
    arguments and the epochs it had trained (None for a checkpoint of the lab's code).
    `given`: the flags on the command line; a model flag among them that the checkpoint contradicts
    is noted (it takes no effect)."""
    ckpt = load_checkpoint(path)
    margs = model_args(ckpt, path)
    if margs["lab_activation"] and ckpt.get("lab_format"):
        # The weights alone cannot tell the lab's model from this project's (the same parameters).
        print(f"note: {path} holds weights only, as the lab's code writes them: rebuilt as the lab's model, whose "
              "Label_Encoder and Gaussian_Predictor have LeakyReLU(True) (a slope of 1). A checkpoint of this "
              "project re-saved that way computes another function here: test its original file (best.ckpt, "
              "last.ckpt), which records the model")
    for k in TESTER_IGNORED:
        if k in given and getattr(args, k) != margs.get(k):
            print(f"note: --{k} {getattr(args, k)} takes no effect: the model is rebuilt from the checkpoint "
                  f"(--{k} {margs.get(k)})")
    for k in ("frame_H", "frame_W"):
        if margs.get(k) not in (None, getattr(args, k)):
            print(f"note: the checkpoint was trained at --{k} {margs[k]}; testing at {getattr(args, k)}")
    model = build_model(margs)
    load_model_weights(model, ckpt, path)
    return model.eval(), margs, ckpt.get("epoch")


def run(args, written=None, given=()):
    """`written` (a list) collects the outputs written, for main()'s line on an interruption;
    `given` the flags on the command line."""
    written = [] if written is None else written
    speed = resolve_speed(args)
    model, margs, epoch = load_model(args.ckpt_path, args, given)
    prepare_model(model, speed)
    save_root = output_folder(args)
    writable_folder(save_root)
    seqs = TestSequences(args.DR, args.frame_H, args.frame_W, test_len=args.test_len, cache=not args.no_cache,
                         split=args.split, workers=args.num_workers)
    H, W, L, K = args.frame_H, args.frame_W, args.test_len, args.num_samples
    note = gpu_note(args)
    if note:
        print(note, flush=True)
    print(f"Generating {len(seqs)} sequence(s) x {K} sample(s) x {L} frames on {speed.device} "
          f"(prior {margs['prior']}, z_mode {args.z_mode}, seed {args.seed})", flush=True)
    if (H, W) != KAGGLE_FRAME:
        print(f"note: submission.csv will hold frames of 3 x {H} x {W} values; the course's Kaggle format is "
              f"3 x {KAGGLE_FRAME[0]} x {KAGGLE_FRAME[1]} (--frame_H {KAGGLE_FRAME[0]} --frame_W {KAGGLE_FRAME[1]})",
              flush=True)
    if K > 1 and args.z_mode != "sample":
        print(f"note: z_mode {args.z_mode} ignores the noise, so the {K} rollouts are identical; "
              "use --z_mode sample for K different ones", flush=True)

    # The noise of sample s of every sequence is drawn after that of samples 0..s-1, from one CPU
    # generator: the same z on any device, and sample 0 the same whatever --num_samples.
    g = torch.Generator().manual_seed(args.seed)
    jobs = [(k, s) for k in range(len(seqs)) for s in range(K)]
    noise = [model.sample_noise(len(seqs), L, H, W, generator=g) for _ in range(K)]  # K x (L-1, seqs, N, H, W)
    eps_all = noise[0] if K == 1 else torch.stack(noise, 2).flatten(1, 2)  # (L-1, jobs, N, H, W), jobs' order
    del noise
    preds = {}
    t0 = time.time()
    for lo in range(0, len(jobs), args.batch_size):
        batch = jobs[lo:lo + args.batch_size]
        first = torch.stack([seqs[k]["first"] for k, _ in batch])
        labels = torch.stack([seqs[k]["labels"] for k, _ in batch])
        try:
            out = rollout(model, to_float(first, speed), to_float(labels, speed),
                          eps_all[:, lo:lo + len(batch)].to(speed.device), speed, args.z_mode)
        except RuntimeError as e:
            if not is_out_of_memory(e):
                raise
            raise OutOfMemory(f"out of memory generating {len(batch)} rollout(s) of {L} frames together on "
                              f"{speed.device}: use a smaller --batch_size (now {args.batch_size}). "
                              f"({first_line(e)})") from None
        for j, job in enumerate(batch):
            preds[job] = as_submitted(out[j].cpu())
    if speed.device.type == "cuda":
        torch.cuda.synchronize()
    gen_s = time.time() - t0
    print(f"Generated {len(jobs) * (L - 1)} frames in {gen_s:.2f} s ({len(jobs) * (L - 1) / gen_s:.0f} frames/s)")

    videos = [preds[(k, 0)] for k in range(len(seqs))]
    shape = write_submission(os.path.join(save_root, "submission.csv"), videos, written)
    if not args.no_gif:
        for k, seq in enumerate(seqs):
            write_output(os.path.join(save_root, f"pred_seq{seq['name']}.gif"),
                         lambda p: save_gif(videos[k], p), written)
            write_output(os.path.join(save_root, f"pose_seq{seq['name']}.gif"),
                         lambda p: save_gif(seq["labels"].float() / 255, p), written)
            rows = {"pose": seq["labels"].float() / 255}
            if seq["gt"] is not None:
                rows["truth"] = seq["gt"].float() / 255
            rows["predicted"] = videos[k]
            write_output(os.path.join(save_root, f"strip_seq{seq['name']}.png"), lambda p: save_strip(rows, p), written)

    # The Tester's own flags, and the model as rebuilt from the checkpoint (the model flags of the
    # command line take no effect, so they are not recorded).
    # checkpoint_epoch: epochs the checkpoint had trained (None for lab code's), so that a report
    # can tell a test of an older best.ckpt from one of the current.
    results = {"sequences": [], "generation_s": gen_s, "checkpoint_epoch": epoch,
               "args": {k: v for k, v in vars(args).items()
                        if isinstance(v, (int, float, str, bool, type(None))) and k not in TESTER_IGNORED},
               "model": {k: v for k, v in margs.items() if isinstance(v, (int, float, str, bool, type(None)))}}
    scored = [k for k, seq in enumerate(seqs) if seq["gt"] is not None]
    if scored and len(scored) < len(seqs):
        print(f"note: no ground truth (test_gt/) for sequence(s) "
              f"{', '.join(seq['name'] for seq in seqs if seq['gt'] is None)}: the scores are of the other "
              f"{len(scored)} of {len(seqs)}", flush=True)
    if scored:
        print(f"\n{'seq':>6} | {'PSNR':>7} | {'best-of-%d' % K if K > 1 else '':>9} | {'SSIM':>6} | copy-first")
        curves = {}
        with_ssim = min(H, W) >= SSIM_WINDOW  # its 11 x 11 window must fit in the frame
        for k in scored:
            seq = seqs[k]
            gt = seq["gt"].float() / 255
            per_sample = torch.stack([psnr(preds[(k, s)][1:], gt[1:]) for s in range(K)])  # (K, L-1)
            ssims = (torch.stack([ssim(preds[(k, s)][1:], gt[1:]) for s in range(K)])  # (K, L-1)
                     if with_ssim else None)
            copy = psnr(gt[:1].expand(L - 1, -1, -1, -1), gt[1:])
            row = {"name": seq["name"], "psnr": per_sample.mean().item(),
                   "best_of_k_psnr": per_sample.mean(1).max().item(), "ssim": ssims.mean().item() if with_ssim else None,
                   "copy_first_psnr": copy.mean().item(), "psnr_per_frame": per_sample.mean(0).tolist(),
                   "copy_first_per_frame": copy.tolist()}
            results["sequences"].append(row)
            curves[f"seq {seq['name']}"] = row["psnr_per_frame"]
            best = f"{row['best_of_k_psnr']:9.3f}" if K > 1 else " " * 9
            print(f"{seq['name']:>6} | {row['psnr']:7.3f} | {best} | {fmt_ssim(row['ssim'])} | {row['copy_first_psnr']:7.3f}")
        for key in ("psnr", "best_of_k_psnr", "ssim", "copy_first_psnr"):
            results[key] = float(np.mean([r[key] for r in results["sequences"]])) if with_ssim or key != "ssim" else None
        best = f"{results['best_of_k_psnr']:9.3f}" if K > 1 else " " * 9
        print(f"{'avg':>6} | {results['psnr']:7.3f} | {best} | {fmt_ssim(results['ssim'])} | {results['copy_first_psnr']:7.3f}")
        if not with_ssim:
            print(f"(SSIM needs frames of at least {SSIM_WINDOW} x {SSIM_WINDOW} pixels, its window; these are "
                  f"{H} x {W}: not computed)")
        # Drift: how much worse the end of the rollouts is than their start. Copy-first's own
        # decline, beside it, is how far the poses move away from the first frame's.
        for key, prefix in (("psnr_per_frame", "psnr"), ("copy_first_per_frame", "copy_first")):
            n, results[f"{prefix}_first_frames"], results[f"{prefix}_last_frames"] = drift(
                np.mean([r[key] for r in results["sequences"]], 0))
        print(f"drift: mean PSNR {results['psnr_first_frames']:.3f} dB over frames 1-{n}, "
              f"{results['psnr_last_frames']:.3f} dB over frames {L - n}-{L - 1} "
              f"(copy-first: {results['copy_first_first_frames']:.3f}, {results['copy_first_last_frames']:.3f})")
        if K > 1:
            print("(best-of-K picks the sample closest to the truth: an oracle metric, not a prediction score)")
        write_output(os.path.join(save_root, "psnr_per_frame.png"),
                     lambda p: save_psnr_plot(curves, p, "Test PSNR per frame"), written)
    write_output(os.path.join(save_root, "results.json"), lambda p: dump_json(p, results), written)
    # Outputs of an earlier test in the same folder (other sequences, GIFs under --no_gif, a plot
    # when this run has no ground truth) would pass for this run's: say so, delete nothing.
    stale = sorted(n for n in os.listdir(save_root) if STALE.fullmatch(n) and os.path.join(save_root, n) not in written)
    if stale:
        print(f"note: {save_root} also holds {', '.join(stale[:3])}{' ...' if len(stale) > 3 else ''} from an "
              "earlier test, not written by this one", flush=True)
    print(f"\nWrote {save_root}/submission.csv ({shape[0]} rows x {shape[1]} columns)"
          + ("" if args.no_gif else ", pred_seq*.gif and strip_seq*.png"), flush=True)
    return 0


def output_folder(args):
    return args.save_root or os.path.join(os.path.dirname(os.path.abspath(args.ckpt_path)), args.split)


def what_was_written(written):
    """'nothing written', or which files of the output folder this run wrote before it stopped."""
    if not written:
        return "nothing written"
    return (f"wrote only {', '.join(os.path.basename(p) for p in written)} in {os.path.dirname(written[0])} "
            "(the rest is missing: run it again)")


def main(argv=None):
    args = tester_parser().parse_args(argv)
    written, top = [], None
    try:
        check_tester(args)
        # The folders made for the output are removed again if nothing gets written in them (a
        # bad --DR left an empty test/ beside the checkpoint).
        top = outermost_missing(output_folder(args))
        return run(args, written, given_flags(tester_parser, argv))
    except (ConfigError, DataError, CheckpointError, OutOfMemory) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the disk filled up, or the output folder vanished or turned read-only
        print(f"error: {e.filename or args.save_root or 'output'}: {e.strerror or e}; {write_failure_advice(e)} "
              f"({what_was_written(written)})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"error: interrupted; {what_was_written(written)}", file=sys.stderr)
        return 130
    finally:
        if top:
            remove_empty_folders(output_folder(args), top)


if __name__ == "__main__":
    if QUIET_IMPORT:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # main() handles Ctrl-C from here
    sys.exit(main())
