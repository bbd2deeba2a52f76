"""The one checkpoint reader and writer.

A checkpoint is plain data (tensors, numbers, strings, lists, dicts) and loads with
`torch.load(..., weights_only=True)`: loading never executes code. Writes are atomic (temporary
file, fsync, rename), so a crash mid-write leaves the previous checkpoint intact.
Checkpoints written by lab code ({"state_dict": ..., "optimizer": ..., ...}) load too.
"""
import errno
import os
import pickle
import shutil
import warnings

import torch

from .files import atomic_write
from .options import MODEL_ARGS, MODEL_DIMS

FORMAT = "pose-cvae-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the fix."""


def save_checkpoint(path, state):
    """Atomically write `state` to `path`. Raises CheckpointError (earlier files untouched) when the
    folder is not writable or the disk is full."""
    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        # Also on KeyboardInterrupt (a second Ctrl-C mid-write) no partial file stays behind.
        atomic_write(path, write)
    except OSError as e:
        why = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise CheckpointError(f"cannot write checkpoint {path}: {why}; free space or choose another "
                              "--save_root (earlier checkpoints are untouched)") from None
    except RuntimeError as e:
        # torch.save's zip writer reports a failed write (a disk that fills up mid-file) as a
        # RuntimeError ("unexpected pos ...") rather than the OSError underneath.
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        raise CheckpointError(f"cannot write checkpoint {path}: the write failed ({(str(e).splitlines() or [type(e).__name__])[0][:120]}) "
                              f"with {free / 2**20:.1f} MB free on its disk; free space or choose another "
                              "--save_root (earlier checkpoints are untouched)") from None


# What DataParallel and DistributedDataParallel ("module.") and torch.compile ("_orig_mod.") put
# before every name of the model they wrap: lab code that wraps its model saves them.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def unwrapped(sd):
    """A state_dict without the prefixes a wrapped model's carries (only where every key has it)."""
    while sd:
        prefix = next((p for p in WRAPPER_PREFIXES if all(isinstance(k, str) and k.startswith(p) for k in sd)), None)
        if prefix is None:
            return sd
        sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def load_checkpoint(path):
    """Read a checkpoint onto the CPU, safely. Returns the dict; raises CheckpointError."""
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} is a folder; pass a checkpoint file in it, e.g. "
                              f"{os.path.join(path, 'best.ckpt')} (Trainer.py --resume {path} continues the "
                              "run in it)")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist; check --ckpt_path")
    try:
        with warnings.catch_warnings():  # torch's own notes (a TorchScript file, an old pickle) would
            warnings.simplefilter("ignore")  # come before the one line that says what is wrong
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # The safe unpickler names a refused class or function as "GLOBAL module.name"; any other
        # refusal is an opcode it does not know, i.e. a file that is not a torch.save checkpoint.
        code = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line]
        if code:
            raise CheckpointError(f"refusing {path}: it holds pickled objects that could run code, not plain data "
                                  f"({code[0][:200]}); checkpoints are read with weights_only=True only. If you trust "
                                  "its source, re-save just its state_dict with torch.save") from None
        raise CheckpointError(f"cannot read checkpoint {path}: it is not a PyTorch checkpoint; pass a file written "
                              "by Trainer.py or torch.save") from None
    except Exception as e:  # garbage makes torch.load raise almost anything (KeyError, EOFError, ...)
        raise CheckpointError(f"cannot read checkpoint {path}: it is truncated or not a PyTorch checkpoint "
                              f"({type(e).__name__}); pass another with --ckpt_path, e.g. an epoch_N.ckpt or "
                              "best.ckpt of the same run") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} is not a checkpoint (it holds a {type(ckpt).__name__}, not a dict)")
    if "model" not in ckpt and "state_dict" not in ckpt:
        sd = unwrapped(ckpt)
        if all(isinstance(v, torch.Tensor) for v in sd.values()) and any(str(k).startswith("Generator.") for k in sd):
            # A bare state_dict: this project never writes one, lab code's users do (the state_dict of
            # a checkpoint that pickled objects, re-saved as the refusal above tells them), so it is
            # read as lab code's model.
            return {"model": sd, "lab_format": True}
        raise CheckpointError(f"{path} is not a checkpoint of this model (no 'model' or 'state_dict' entry)")
    if "model" not in ckpt:  # written by lab code
        sd = ckpt["state_dict"]
        ckpt = {"model": unwrapped(sd) if isinstance(sd, dict) else sd, "lab_format": True}
    sd = ckpt["model"]
    if not (isinstance(sd, dict) and sd and all(isinstance(v, torch.Tensor) for v in sd.values())):
        raise CheckpointError(f"{path} is not a checkpoint of this model (its "
                              f"'{'state_dict' if ckpt.get('lab_format') else 'model'}' entry is not a state_dict)")
    return ckpt


def dims_from_state_dict(sd, path="the checkpoint"):
    """Recover F/L/N/D dims, the prior type, first_pose, warp and pose_flow from the parameters (for lab
    checkpoints, and so that a checkpoint's weights decide the model that loads them)."""
    try:
        return dict(
            F_dim=sd["frame_transformation.6.weight"].shape[0],
            L_dim=sd["label_transformation.4.conv2.weight"].shape[0],
            N_dim=sd["Gaussian_Predictor.6.weight"].shape[0] // 2,
            D_out_dim=sd["Generator.0.block.0.conv1.0.weight"].shape[0],
            prior="learned" if any(k.startswith("prior.") for k in sd) else "fixed",
            first_pose=any(k.startswith("pose_fusion.") for k in sd),
            warp=any(k.startswith("flow.") for k in sd),
            pose_flow=any(k.startswith("flow_coarse.") for k in sd),
        )
    except KeyError as e:
        raise CheckpointError(f"{path}: its weights are not this model's (missing {e.args[0]})") from None


def model_args(ckpt, path="the checkpoint"):
    """The arguments that rebuild the checkpoint's model: stored ones, else read off the weights,
    else the model's defaults."""
    stored = ckpt.get("args") or {}
    found = dims_from_state_dict(ckpt["model"], path)
    out = {k: stored.get(k, found.get(k)) for k in MODEL_ARGS}
    out.update({k: found[k] for k in found})  # the weights are the truth
    if ckpt.get("lab_format"):
        if found["first_pose"] or found["warp"]:
            # Weights of layers lab code has not: this project's model, saved as weights only. What
            # those layers need is implied; the rest (--residual without --warp) cannot be told.
            out.update(condition="first" if found["first_pose"] else out["condition"],
                       residual=True if found["warp"] else out["residual"], lab_activation=False)
        else:
            out["lab_activation"] = True  # lab code's LeakyReLU(True) (VAE_Model)
    out["residual"], out["lab_activation"] = bool(out["residual"]), bool(out["lab_activation"])
    out["condition"] = out["condition"] or "previous"
    return out


def check_dims(ckpt, args, path):
    """Raise CheckpointError naming each flag whose value differs from the checkpoint's."""
    found = dims_from_state_dict(ckpt["model"], path)
    diff = [f"--{k} {getattr(args, k)} (checkpoint: {found[k]})" for k in MODEL_DIMS + ("prior", "first_pose", "warp", "pose_flow")
            if getattr(args, k, found[k]) != found[k]]
    # Options without weights of their own, as the run that wrote the checkpoint had them.
    stored = ckpt.get("args") or {}
    diff += [f"--{k} {getattr(args, k)} (checkpoint: {stored[k]})" for k in ("residual", "condition", "lab_activation")
             if k in stored and hasattr(args, k) and getattr(args, k) != stored[k]]
    if diff:
        raise CheckpointError(f"{path} was written for another model: " + ", ".join(diff)
                              + "; pass the checkpoint's values or start a new run")


def load_model_weights(model, ckpt, path):
    sd = ckpt["model"]
    if "flow.weight" in sd and "flow_scale" not in sd:
        # Written before the flow had a scale: its flow was the convolution's output as it is.
        sd = {**sd, "flow_scale": torch.tensor(1.0)}
    for mask in ("dancer_mask", "gather_mask"):
        if "flow_coarse.0.weight" in sd and f"{mask}.weight" not in sd:
            # pose_flow written before that layer: a mask that is zero everywhere (sigmoid(-inf))
            # is that model's function exactly.
            w = sd["flow.weight"]
            sd = {**sd, f"{mask}.weight": w.new_zeros(1, *w.shape[1:]), f"{mask}.bias": w.new_full((1,), float("-inf"))}
    if "flow_coarse.0.weight" in sd and "match_block" not in sd:
        # pose_flow written before the match's block size was stored: it matched 4 x 4 blocks.
        sd = {**sd, "match_block": torch.tensor(4)}
    if "flow_coarse.0.weight" in sd and "base_view.weight" not in sd:
        # pose_flow written before the Generator saw the frame it changes: a view of zeros.
        w = sd["flow.weight"]
        sd = {**sd, "base_view.weight": w.new_zeros(w.shape[1], 3, 1, 1), "base_view.bias": w.new_zeros(w.shape[1])}
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # a parameter of another shape (modules widened by hand, another model)
        shapes = [line.strip() for line in str(e).splitlines() if "size mismatch" in line]
        raise CheckpointError(f"{path} does not match the model: {(shapes or str(e).splitlines())[0][:300]}") from None
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")


def rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    if not state:
        return
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
