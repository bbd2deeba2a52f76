"""The one argument builder. Trainer.py and Tester.py build their parsers from these parents, so a
flag is declared once. Flag names and defaults are the lab's; additions follow the same style."""
import argparse
import errno
import math
import os
import re


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, as every other bad input's: argparse prints the
    whole usage above its message (over 30 lines for Trainer.py), which hides the message."""

    def error(self, message):
        self.exit(2, f"error: {message} (--help lists the flags)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default, but none for a default of None: there the flag's help says
    what happens without it ("(default: None)" beside "default: cuda when present")."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


MODEL_DIMS = ("F_dim", "L_dim", "N_dim", "D_out_dim")
# The arguments that rebuild the model from a checkpoint.
MODEL_ARGS = MODEL_DIMS + ("frame_H", "frame_W", "prior", "residual", "condition", "first_pose", "warp", "pose_flow",
                           "lab_activation")
# Model flags the Tester takes from the checkpoint instead (the frame size it tests at is its own).
TESTER_IGNORED = tuple(k for k in MODEL_ARGS if k not in ("frame_H", "frame_W"))
KL_TYPES = ("Cyclical", "Monotonic", "Full_KL", "None")
TF_MODES = ("epoch", "step", "frame")
SCHEDULERS = ("multistep", "step", "cosine", "none")
AUTO = ("auto", "on", "off")


class ConfigError(ValueError):
    """A flag value that cannot work; the message names the flag and the fix."""


def default_device():
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def reads_negative_numbers(p):
    """p, made to read "-1e-3" as a value: argparse (Python 3.11 to 3.13, checked) recognises only "-1"
    and "-0.5" as negative numbers and takes "--lr -1e-3" for a flag without its value, so the user got
    "expected one argument" instead of the flag's own range check."""
    p._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
    return p


def common_parser():
    """Flags shared by Trainer.py and Tester.py: data, model, device, performance."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("data")
    g.add_argument("--DR", type=str, default="data/dance",
                   help="dataset root in the lab's layout (Trainer.py generates the default one on first use)")
    g.add_argument("--save_root", type=str, default=None,
                   help="output folder (Trainer: a new runs/<timestamp>; Tester: <checkpoint folder>/test, "
                        "or /test_unseen with --split test_unseen)")
    g.add_argument("--num_workers", type=int, default=None,
                   help="processes that decode the dataset's PNGs (once: they are cached); 0 decodes in this "
                        "process; default one per CPU core")
    g.add_argument("--frame_H", type=int, default=32, help="frame height the images are resized to")
    g.add_argument("--frame_W", type=int, default=64, help="frame width the images are resized to")
    g.add_argument("--no_cache", action="store_true", help="do not read or write the decoded-frame cache")
    g = p.add_argument_group("model")
    g.add_argument("--F_dim", type=int, default=128, help="frame feature channels")
    g.add_argument("--L_dim", type=int, default=32, help="label (pose) feature channels")
    g.add_argument("--N_dim", type=int, default=12, help="latent channels")
    g.add_argument("--D_out_dim", type=int, default=192, help="decoder fusion output channels")
    g.add_argument("--prior", choices=("fixed", "learned"), default="fixed",
                   help="fixed N(0, I) (the lab's) or a learned prior p(z_t | previous frame, pose_t)")
    g.add_argument("--residual", action="store_true",
                   help="not the lab's: the Generator predicts the change from the previous frame "
                        "(starts as a copy of it; learns much faster)")
    g.add_argument("--condition", choices=("previous", "first"), default="previous",
                   help="what each frame is generated from: the previous frame (the lab's) or, not "
                        "the lab's, the sequence's first frame (errors cannot compound over long "
                        "rollouts; teacher forcing has nothing to do)")
    g.add_argument("--first_pose", action="store_true",
                   help="not the lab's, needs --condition first: the first frame's pose features join "
                        "its frame features (a 1x1 convolution starting at zero), so the model is told "
                        "where the dancer stands in the frame it copies from (docs/RESULTS.md)")
    g.add_argument("--warp", action="store_true",
                   help="not the lab's, needs --residual: the change is added to the frame it is generated "
                        "from warped by a flow the model predicts (a 3x3 convolution starting at zero, times 16 pixels), "
                        "which moves that frame's pixels to the new pose (docs/RESULTS.md)")
    g.add_argument("--pose_flow", action="store_true",
                   help="not the lab's, needs --warp and --first_pose: every 2x2 block of pose t is matched "
                        "against the first frame's pose; the match gives a second flow at a quarter of the size, "
                        "added to the warp's, and moves the first frame by itself as a second layer, blended "
                        "in by a learned mask, so a dancer tens of pixels from where the first frame has them "
                        "is carried there; a third layer, also blended in by a mask, reads the first frame's "
                        "blocks through the match, so that a limb can take the colours of that limb in the "
                        "first frame (use with --warp_loss; docs/RESULTS.md)")
    g = p.add_argument_group("device and speed")
    g.add_argument("--device", type=str, default=None, help="cuda, cuda:N or cpu (default: cuda when present)")
    g.add_argument("--gpu", type=int, default=1,
                   help="accepted for lab scripts and ignored (a value other than 1 is noted): pick a card with "
                        "--device cuda:N")
    g.add_argument("--seed", type=int, default=0, help="seed of every random draw (weights, data order, z)")
    g.add_argument("--amp", choices=AUTO, default="auto",
                   help="bfloat16 autocast (auto: on for CUDA and for CPUs with bf16 instructions)")
    g.add_argument("--channels_last", choices=AUTO, default="auto", help="NHWC memory format (auto: on)")
    g.add_argument("--compile", choices=AUTO, default="auto", help="torch.compile the modules (auto: on for CUDA)")
    g.add_argument("--cuda_graphs", choices=AUTO, default="auto",
                   help="capture the generation step in a CUDA graph (auto: on for CUDA)")
    g.add_argument("--malloc_cache", choices=AUTO, default="auto",
                   help="keep freed host memory for reuse instead of returning it to the system, so large "
                        "tensors do not cost fresh zeroed pages on every step (glibc; auto: on for CPU)")
    g.add_argument("--plain", action="store_true",
                   help="the reference path: per-frame loop, float32 (no TF32 on a GPU), no compile, graphs, "
                        "channels_last or malloc cache")
    return p


def add_warp_loss(g):
    """--warp_loss: the Trainer's, and the benchmark's (its training step computes the same loss)."""
    g.add_argument("--warp_loss", type=float, default=0.0,
                   help="with --warp: weight of the warp's own loss, the frame warped by the predicted flow "
                        "(with --pose_flow, the dancer layer blended in) against the true frame, both blurred at "
                        "0, 1, 2 and 4 pixels, so the flow learns to find the dancer several pixels away; with "
                        "--pose_flow also the match's error (the first "
                        "pose's colours read through the match against pose t's), which trains the match to "
                        "find each limb (0, the default, trains the flow through the frame only; docs/RESULTS.md)")


def check_warp_loss(args):
    if args.warp_loss < 0:
        raise ConfigError(f"--warp_loss must be >= 0, got {args.warp_loss}")
    if args.warp_loss > 0 and not args.warp:
        raise ConfigError("--warp_loss needs --warp (it is the loss of the warp's flow)")


def trainer_parser():
    p = reads_negative_numbers(Parser(description="Train the pose-conditioned video VAE.",
                                                       parents=[common_parser()],
                                                       formatter_class=HelpFormatter))
    g = p.add_argument_group("training")
    g.add_argument("--batch_size", type=int, default=2, help="sequences per step (per process under torchrun)")
    g.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    g.add_argument("--optim", choices=("Adam", "AdamW", "Adamax"), default="Adam", help="optimizer")
    g.add_argument("--weight_decay", type=float, default=0.0, help="the optimizer's weight decay")
    g.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.999], metavar=("B1", "B2"),
                   help="the optimizer's decay rates of its moment estimates (torch's defaults)")
    g.add_argument("--scheduler", choices=SCHEDULERS, default="multistep",
                   help="multistep (the lab's), step, cosine (with warm-up), none; the rate is set at every "
                        "step: multistep and step change it at epoch boundaries, cosine and its warm-up follow "
                        "the fractional epoch")
    g.add_argument("--milestones", type=int, nargs="+", default=[2, 5], help="multistep: epochs")
    g.add_argument("--gamma", type=float, default=0.1, help="multistep/step: factor")
    g.add_argument("--step_size", type=int, default=10, help="step: epochs between decays")
    g.add_argument("--warmup_epochs", type=float, default=0.0, help="cosine: linear warm-up length")
    g.add_argument("--min_lr", type=float, default=0.0, help="cosine: final learning rate")
    g.add_argument("--grad_clip", type=float, default=1.0, help="max gradient norm (0 disables)")
    g.add_argument("--recon", choices=("mse", "l1"), default="mse",
                   help="reconstruction loss (with --residual --condition first, l1 kept the model at "
                        "its starting copy of the first frame: docs/RESULTS.md)")
    add_warp_loss(g)
    g.add_argument("--num_epoch", type=int, default=70, help="epochs to train")
    g.add_argument("--per_save", type=int, default=3, help="keep a checkpoint every this many epochs")
    g.add_argument("--partial", type=float, default=1.0, help="fraction of the training data used")
    g.add_argument("--train_vi_len", type=int, default=16, help="frames per training window")
    g.add_argument("--val_vi_len", type=int, default=630, help="frames of each validation rollout")
    g.add_argument("--val_every", type=int, default=1, help="validate every this many epochs")
    g.add_argument("--test", action="store_true", help="only validate the checkpoint given by --ckpt_path")
    g.add_argument("--store_visualization", action="store_true",
                   help="also write the validation GIF and PSNR-per-frame PNG every validation")
    g.add_argument("--ckpt_path", type=str, default=None,
                   help="checkpoint to resume from; flags not given take the checkpoint's values")
    g.add_argument("--resume", type=str, default=None, metavar="SAVE_ROOT",
                   help="resume the run in SAVE_ROOT from its newest checkpoint, with the run's flags "
                        "(flags given here override them)")
    g.add_argument("--overwrite", action="store_true",
                   help="start a new run in a save_root that has checkpoints: once the data and model are "
                        "checked, the previous run's checkpoints (last, best, epoch_N), metrics.jsonl, "
                        "TensorBoard event files and validation GIFs/PNGs there are deleted (other files "
                        "are left)")
    g.add_argument("--grad_ckpt", action="store_true",
                   help="activation checkpointing: keep only each time step's inputs and recompute its "
                        "frames in the backward pass, one time step at a time (about 10x less "
                        "activation memory for about a third more compute)")
    g.add_argument("--log_every", type=int, default=20, help="steps between progress-bar and log updates")
    g.add_argument("--skip_spikes", type=float, default=10.0, metavar="K",
                   help="skip an update whose gradient norm is over K times the recent average (one such "
                        "update can spoil a run; 0 disables)")
    g.add_argument("--max_nan_steps", type=int, default=5,
                   help="stop after this many consecutive non-finite losses (each one is skipped)")
    g.add_argument("--lab_activation", action="store_true",
                   help="the lab code's activation in Label_Encoder and Gaussian_Predictor, nn.LeakyReLU(True): "
                        "a slope of 1, i.e. none (this project's modules use a slope of 0.01); set by itself "
                        "when --ckpt_path is a checkpoint written by lab code, so it trains on as the function "
                        "it was trained as")
    g = p.add_argument_group("teacher forcing")
    g.add_argument("--tfr", type=float, default=1.0, help="teacher-forcing ratio at the start")
    g.add_argument("--tfr_sde", type=int, default=10,
                   help="the ratio drops by --tfr_d_step after each finished epoch from this one on "
                        "(counted from 1: the first epoch always runs at --tfr)")
    g.add_argument("--tfr_d_step", type=float, default=0.1, help="decay per epoch (floor 0)")
    g.add_argument("--tf_mode", choices=TF_MODES, default="epoch",
                   help="one coin per epoch (the lab's), per step, or per frame (scheduled sampling)")
    g.add_argument("--first_frame_from", choices=("window", "video"), default="window",
                   help="with --condition first, the frame that training conditions on: the window's "
                        "first, or a random frame of the same video (gaps as long as a test "
                        "sequence's, not only train_vi_len - 1)")
    g = p.add_argument_group("KL annealing")
    g.add_argument("--kl_anneal_type", choices=KL_TYPES, default="Cyclical",
                   help="the KL weight beta by epoch: Cyclical (rises from 0 in every cycle), Monotonic (rises "
                        "once), Full_KL (1 throughout), None (0 throughout)")
    g.add_argument("--kl_anneal_cycle", type=int, default=10, help="Cyclical: cycles over the run")
    g.add_argument("--kl_anneal_ratio", type=float, default=1.0,
                   help="share of each cycle over which beta rises to 1")
    g = p.add_argument_group("lab's fast training")
    g.add_argument("--fast_train", action="store_true",
                   help="the first --fast_train_epoch epochs use --fast_partial of the data instead of --partial")
    g.add_argument("--fast_partial", type=float, default=0.4, help="fraction of the data in the fast epochs")
    g.add_argument("--fast_train_epoch", type=int, default=5, help="how many epochs are fast")
    return p


def tester_parser():
    p = reads_negative_numbers(Parser(description="Generate the test sequences, GIFs and "
                                                       "submission.csv.", parents=[common_parser()],
                                                       formatter_class=HelpFormatter))
    p.add_argument("--ckpt_path", type=str, required=True, help="checkpoint written by Trainer.py (or lab code)")
    p.add_argument("--test_len", type=int, default=630, help="frames per test sequence, the first included")
    p.add_argument("--split", choices=("test", "test_unseen"), default="test",
                   help="the sequences to generate: test (the lab's), or test_unseen (datasets made by "
                        "scripts/make_dance_data.py: dancers never seen in training)")
    p.add_argument("--z_mode", choices=("sample", "zero", "prior_mean"), default="sample",
                   help="z from the prior (sample), 0, or the prior's mean")
    p.add_argument("--num_samples", type=int, default=1,
                   help="rollouts per sequence; with ground truth also reports best-of-K (an oracle)")
    p.add_argument("--batch_size", type=int, default=8, help="rollouts generated together")
    p.add_argument("--no_gif", action="store_true", help="skip writing GIFs and strip PNGs")
    # Accepted and ignored, so that the lab's Tester command lines run: its parser is the Trainer's
    # (every training flag) plus --no_sanity, --test and --make_gif (GIFs are written unless --no_gif).
    for name, kw in (("--lr", dict(type=float)), ("--optim", dict(type=str)), ("--num_epoch", dict(type=int)),
                     ("--per_save", dict(type=int)), ("--partial", dict(type=float)),
                     ("--train_vi_len", dict(type=int)), ("--val_vi_len", dict(type=int)),
                     ("--tfr", dict(type=float)), ("--tfr_sde", dict(type=int)), ("--tfr_d_step", dict(type=float)),
                     ("--fast_partial", dict(type=float)), ("--fast_train_epoch", dict(type=int)),
                     ("--kl_anneal_type", dict(type=str)), ("--kl_anneal_cycle", dict(type=int)),
                     ("--kl_anneal_ratio", dict(type=float))):
        p.add_argument(name, default=None, help=argparse.SUPPRESS, **kw)
    for name in ("--test", "--store_visualization", "--no_sanity", "--make_gif", "--fast_train"):
        p.add_argument(name, action="store_true", help=argparse.SUPPRESS)
    # The model is rebuilt from the checkpoint: the model flags are accepted (lab command lines
    # pass them) but take no effect, so --help does not list them (Tester.py notes a contradiction).
    hide_from_help(p, TESTER_IGNORED)
    return p


def hide_from_help(p, dests):
    """Keep the flags of `dests` accepted by parser p but out of its --help."""
    for action in p._actions:
        if action.dest in dests:
            action.help = argparse.SUPPRESS


def _positive(args, names):
    for n in names:
        v = getattr(args, n, None)
        if v is not None and not v > 0:  # `not >`: NaN is refused too
            raise ConfigError(f"--{n} must be positive, got {v}")


def _finite(args):
    """argparse's float() reads 'nan' and 'inf': refuse them for every float flag (torch's
    optimizers raise a traceback on a NaN learning rate; an infinite one diverges at once)."""
    for n, v in sorted(vars(args).items()):
        values = v if isinstance(v, list) else [v]
        if any(isinstance(x, float) and not math.isfinite(x) for x in values):
            raise ConfigError(f"--{n} must be a finite number, got {v}")


def check_common(args):
    """Validate shared flags and resolve 'auto' ones. Raises ConfigError."""
    import torch
    _finite(args)
    _positive(args, MODEL_DIMS + ("frame_H", "frame_W"))
    if args.num_workers is not None and args.num_workers < 0:
        raise ConfigError(f"--num_workers must be >= 0 (0: decode in this process), got {args.num_workers}")
    for flag in ("ckpt_path", "resume", "save_root", "DR"):
        if getattr(args, flag, None) == "":  # an unset shell variable; taken as no flag, a new run would start
            raise ConfigError(f"--{flag} was given an empty path")
    if not 0 <= args.seed < 2 ** 63:  # torch.Generator takes < 2**64; seeds derived from it add a little
        raise ConfigError(f"--seed must be in 0 .. 2**63 - 1, got {args.seed}")
    for n in ("frame_H", "frame_W"):
        if getattr(args, n) < 4:  # the label encoder pads by 3 pixels (reflection) on each side
            raise ConfigError(f"--{n} must be at least 4 (the label encoder's 7x7 reflection padding), "
                              f"got {getattr(args, n)}")
    # RGB_Encoder and Generator split their width in 8ths, Label_Encoder in halves, the Gaussian
    # predictor in quarters.
    bad = [f"--{n} {getattr(args, n)} is not a multiple of {m}"
           for n, m in (("F_dim", 8), ("L_dim", 2), ("N_dim", 4), ("D_out_dim", 8)) if getattr(args, n) % m]
    if bad:
        raise ConfigError("the modules divide their widths: " + ", ".join(bad) + "; pick a multiple "
                          "(defaults 128 / 32 / 12 / 192)")
    if (args.F_dim + args.L_dim + args.N_dim) % 4:
        raise ConfigError("--F_dim + --L_dim + --N_dim must be a multiple of 4 (the fusion divides it by 4)")
    args.device = args.device or default_device()
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {args.device} was asked for but no CUDA GPU is available; use --device cpu")
        try:
            idx = torch.device(args.device).index
        except RuntimeError:
            raise ConfigError(f"--device must be cpu, cuda or cuda:N, got {args.device!r}") from None
        if idx is not None and idx >= torch.cuda.device_count():
            raise ConfigError(f"--device {args.device}: only {torch.cuda.device_count()} GPU(s) visible")
    elif args.device != "cpu":
        raise ConfigError(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    return args


def gpu_note(args):
    """A note when --gpu names a card: the flag is the lab's and takes no effect here."""
    if args.gpu == 1:  # the lab's default, which its scripts pass
        return None
    return (f"note: --gpu {args.gpu} takes no effect (accepted for the lab's scripts); this runs on {args.device}: "
            "pick a card with --device cuda:N")


def check_model(args):
    """Model options that only work together (the Trainer and the benchmark build from flags)."""
    if args.first_pose and args.condition != "first":
        raise ConfigError("--first_pose needs --condition first (the lab's --condition previous generates "
                          "each frame from the previous one)")
    if args.warp and not args.residual:
        raise ConfigError("--warp needs --residual (the Generator's output is a change to the warped frame)")
    if args.pose_flow and not (args.warp and args.first_pose):
        raise ConfigError("--pose_flow needs --warp and --first_pose (it matches pose t against the first "
                          "frame's pose and adds to the warp's flow)")
    return args


def check_trainer(args):
    check_common(args)
    _positive(args, ("batch_size", "lr", "num_epoch", "per_save", "val_vi_len", "val_every", "log_every",
                     "kl_anneal_cycle", "kl_anneal_ratio", "fast_train_epoch", "max_nan_steps", "step_size"))
    if args.train_vi_len < 2:
        raise ConfigError(f"--train_vi_len must be at least 2 (a frame and its successor), got {args.train_vi_len}")
    if args.val_vi_len < 2:
        raise ConfigError(f"--val_vi_len must be at least 2, got {args.val_vi_len}")
    for n in ("tfr", "tfr_d_step"):
        if not 0.0 <= getattr(args, n) <= 1.0:
            raise ConfigError(f"--{n} must lie in [0, 1], got {getattr(args, n)}")
    for n in ("partial", "fast_partial"):
        if not 0.0 < getattr(args, n) <= 1.0:
            raise ConfigError(f"--{n} must lie in (0, 1], got {getattr(args, n)}")
    if args.skip_spikes != 0 and not args.skip_spikes > 1:
        raise ConfigError(f"--skip_spikes is 0 (off) or a factor above 1 (the default 10 skips an update whose "
                          f"gradient norm is over 10x the recent average), got {args.skip_spikes:g}")
    if args.grad_clip < 0 or args.weight_decay < 0 or args.tfr_sde < 0 or args.min_lr < 0 or args.warmup_epochs < 0:
        raise ConfigError("--grad_clip, --weight_decay, --tfr_sde, --min_lr and --warmup_epochs must be >= 0")
    if not all(0 <= b < 1 for b in args.betas):
        raise ConfigError(f"--betas are two decay rates in [0, 1), got {' '.join(f'{b:g}' for b in args.betas)}")
    check_warp_loss(args)
    if args.milestones and min(args.milestones) < 1:
        raise ConfigError(f"--milestones are epochs (1, 2, ...) after which the learning rate is multiplied by "
                          f"--gamma, got {' '.join(map(str, args.milestones))}")
    if args.gamma <= 0:
        raise ConfigError(f"--gamma must be positive (the learning rate is multiplied by it), got {args.gamma}")
    if args.scheduler == "cosine" and args.min_lr > args.lr:
        raise ConfigError(f"--min_lr {args.min_lr} exceeds --lr {args.lr}: cosine decays from --lr down to --min_lr")
    if args.first_frame_from == "video" and args.condition != "first":
        raise ConfigError("--first_frame_from video needs --condition first (the lab's model "
                          "conditions on the previous frame)")
    check_model(args)
    if args.ckpt_path and args.resume:
        raise ConfigError("give either --ckpt_path or --resume, not both")
    if args.resume and args.save_root is not None and (os.path.realpath(args.save_root)
                                                       != os.path.realpath(args.resume)):
        raise ConfigError(f"--resume {args.resume} continues that run in its own folder; --save_root "
                          f"{args.save_root} would be ignored: drop it, or start a run in {args.save_root} "
                          f"from the checkpoint with --ckpt_path {os.path.join(args.resume, 'last.ckpt')} "
                          f"--save_root {args.save_root}")
    if args.test and not (args.ckpt_path or args.resume):
        raise ConfigError("--test validates a trained model: pass --ckpt_path FILE")
    return args


def check_tester(args):
    check_common(args)
    _positive(args, ("test_len", "num_samples", "batch_size"))
    if args.test_len < 2:
        raise ConfigError(f"--test_len must be at least 2, got {args.test_len}")
    return args


def given_flags(make_parser, argv, known_only=False):
    """The dests of the flags written on the command line `argv` (None: sys.argv[1:]), as opposed
    to those left at their defaults; abbreviations count (argparse resolves them). known_only:
    flags the parser does not know are passed over instead of refused."""
    p, unset = make_parser(), object()
    # argparse fills in a default only where the namespace lacks the attribute.
    ns = argparse.Namespace(**{a.dest: unset for a in p._actions if a.dest != argparse.SUPPRESS})
    ns = p.parse_known_args(argv, namespace=ns)[0] if known_only else p.parse_args(argv, namespace=ns)
    return {k for k, v in vars(ns).items() if v is not unset}


def writable_folder(path, flag="--save_root"):
    """Create `path` if needed and check that a file can be written in it. Raises ConfigError."""
    if os.path.exists(path) and not os.path.isdir(path):  # makedirs would say only "File exists"
        raise ConfigError(f"{flag} {path} is a file, not a folder; choose another folder")
    probe = os.path.join(path, f".write_test{os.getpid()}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
    except OSError as e:
        raise ConfigError(f"{flag} {path} is not writable ({e.strerror or e}); choose another folder") from None
    finally:
        try:  # also where the file was made but its write failed (a full disk)
            os.remove(probe)
        except OSError:
            pass
    return path


def write_failure_advice(e):
    """What to do about an OSError from writing outputs: room on a full disk, else another folder."""
    return ("free space or choose another --save_root" if e.errno in (errno.ENOSPC, errno.EDQUOT)
            else "choose another --save_root")
