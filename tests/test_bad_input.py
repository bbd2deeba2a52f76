"""Bad input (issue 5): each answered by Trainer.py or Tester.py with one `error: ...` line on
stderr that names the thing and the fix, exit code 2, and no traceback. Tiny data, CPU, in process.
"""
import json
import os
import shutil
import sys

import pytest
import torch

import Tester
import Trainer

TINY = ["--F_dim", "16", "--L_dim", "8", "--N_dim", "4", "--D_out_dim", "16", "--val_vi_len", "20",
        "--batch_size", "2", "--device", "cpu", "--amp", "off"]


@pytest.fixture(scope="module")
def trained(tiny_dance, tmp_path_factory):
    """A one-step run: (dataset copy, its last.ckpt)."""
    base = tmp_path_factory.mktemp("bad")
    dr = str(base / "DR")
    shutil.copytree(tiny_dance, dr)
    run = str(base / "run")
    assert Trainer.main(["--DR", dr, *TINY, "--num_epoch", "1", "--train_vi_len", "4", "--partial", "0.09",
                         "--save_root", run]) == 0
    return dr, os.path.join(run, "last.ckpt")


def error_of(main, argv, capsys):
    """Run main(argv); return its one `error: ...` line after checking exit code 2."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def args_for_trainer(dr, *extra):
    return ["--DR", dr, *TINY, "--num_epoch", "1", *extra]


def args_for_tester(dr, ckpt, *extra):
    return ["--DR", dr, "--ckpt_path", ckpt, "--device", "cpu", "--test_len", "20", "--no_gif", *extra]


# ----------------------------------------------------------------------------- flag values

@pytest.mark.parametrize("flags, message", [
    (["--tfr", "1.5"], "--tfr must lie in [0, 1], got 1.5"),
    (["--tfr", "-0.1"], "--tfr must lie in [0, 1], got -0.1"),
    (["--num_epoch", "0"], "--num_epoch must be positive, got 0"),
    (["--batch_size", "0"], "--batch_size must be positive, got 0"),
    (["--batch_size", "-2"], "--batch_size must be positive, got -2"),
    (["--lr", "0"], "--lr must be positive"),
    (["--lr", "-1e-3"], "--lr must be positive, got -0.001"),  # was argparse's "expected one argument"
    (["--train_vi_len", "1"], "--train_vi_len must be at least 2"),
    (["--val_vi_len", "0"], "--val_vi_len must be positive, got 0"),
    (["--frame_H", "0"], "--frame_H must be positive, got 0"),
    (["--frame_H", "3"], "--frame_H must be at least 4"),
    (["--frame_W", "2"], "--frame_W must be at least 4"),
    (["--F_dim", "0"], "--F_dim must be positive, got 0"),
    (["--N_dim", "-4"], "--N_dim must be positive, got -4"),
    (["--F_dim", "12"], "--F_dim 12 is not a multiple of 8"),
    (["--L_dim", "3"], "--L_dim 3 is not a multiple of 2"),
    (["--N_dim", "6"], "--N_dim 6 is not a multiple of 4"),
    (["--D_out_dim", "20"], "--D_out_dim 20 is not a multiple of 8"),
    (["--kl_anneal_ratio", "0"], "--kl_anneal_ratio must be positive, got 0"),
    (["--kl_anneal_ratio", "-0.5"], "--kl_anneal_ratio must be positive"),
    (["--partial", "0"], "--partial must lie in (0, 1]"),
    (["--gamma", "-1"], "--gamma must be positive"),  # was a negative learning rate, silently
    (["--gamma", "0"], "--gamma must be positive"),
    (["--scheduler", "cosine", "--min_lr", "5"], "--min_lr 5.0 exceeds --lr 0.001"),  # was lr 3.75, NaN
    (["--device", "tpu"], "--device must be cpu, cuda or cuda:N, got 'tpu'"),
    (["--first_frame_from", "video"], "--first_frame_from video needs --condition first"),
    (["--first_pose"], "--first_pose needs --condition first"),
    (["--warp"], "--warp needs --residual"),
    (["--residual", "--pose_flow"], "--pose_flow needs --warp and --first_pose"),
    (["--residual", "--warp", "--pose_flow"], "--pose_flow needs --warp and --first_pose"),
    (["--warp_loss", "1"], "--warp_loss needs --warp"),
    (["--residual", "--warp", "--warp_loss", "-1"], "--warp_loss must be >= 0"),
    # argparse's float() reads nan and inf: a NaN learning rate was a traceback from torch's Adam
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--grad_clip", "nan"], "--grad_clip must be a finite number"),
    (["--milestones", "-1", "3"], "--milestones are epochs (1, 2, ...)"),  # was lr x 0.01 from epoch 1
    (["--num_workers", "-1"], "--num_workers must be >= 0"),
    (["--skip_spikes", "1"], "--skip_spikes is 0 (off) or a factor above 1"),  # would skip about half the steps
    (["--skip_spikes", "-2"], "--skip_spikes is 0 (off) or a factor above 1"),
    (["--skip_spikes", "nan"], "--skip_spikes must be a finite number"),
    (["--betas", "0.9", "1"], "--betas are two decay rates in [0, 1), got 0.9 1"),
    (["--betas", "-0.1", "0.99"], "--betas are two decay rates in [0, 1)"),
])
def test_trainer_flag_out_of_range(trained, tmp_path, capsys, flags, message):
    line = error_of(Trainer.main, [*args_for_trainer(trained[0]), *flags, "--save_root", tmp_path / "run"], capsys)
    assert message in line
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_trainer_error_line_is_one_write(trained, tmp_path, monkeypatch):
    """Under torchrun every process writes its error line to the same stderr: a line written in
    two pieces (print's text, then its newline) can end up split by another process's line."""
    class Recorder:
        def __init__(self):
            self.writes = []

        def write(self, s):
            self.writes.append(s)

        def flush(self):
            pass

    err = Recorder()
    monkeypatch.setattr(sys, "stderr", err)
    argv = [*args_for_trainer(trained[0]), "--skip_spikes", "1", "--save_root", str(tmp_path / "run")]
    assert Trainer.main(argv) == 2
    lines = [w for w in err.writes if "error: " in w]
    assert len(lines) == 1 and lines[0].startswith("error: --skip_spikes") and lines[0].endswith("\n")
    assert lines[0].count("\n") == 1


@pytest.mark.parametrize("flags, message", [
    (["--test_len", "1"], "--test_len must be at least 2"),
    (["--test_len", "0"], "--test_len must be positive, got 0"),
    (["--num_samples", "0"], "--num_samples must be positive, got 0"),
    (["--batch_size", "0"], "--batch_size must be positive, got 0"),
    (["--frame_W", "3"], "--frame_W must be at least 4"),
    (["--seed", "-1"], "--seed must be in 0 .. 2**63 - 1, got -1"),
    (["--seed", str(2 ** 64)], f"--seed must be in 0 .. 2**63 - 1, got {2 ** 64}"),  # was a traceback
])
def test_tester_flag_out_of_range(trained, capsys, flags, message):
    assert message in error_of(Tester.main, args_for_tester(*trained, *flags), capsys)


@pytest.mark.parametrize("main, flag", [(Trainer.main, f) for f in ("--resume", "--ckpt_path", "--save_root", "--DR")]
                         + [(Tester.main, f) for f in ("--ckpt_path", "--save_root", "--DR")],
                         ids=lambda x: x if isinstance(x, str) else x.__module__)
def test_an_empty_path_is_refused(trained, tmp_path, monkeypatch, capsys, main, flag):
    """`--resume "$RUN"` with RUN unset trained a new model in runs/<time> and exited 0."""
    monkeypatch.chdir(tmp_path)
    argv = args_for_trainer(trained[0]) if main is Trainer.main else args_for_tester(*trained)
    assert error_of(main, [*argv, flag, ""], capsys) == f"error: {flag} was given an empty path"
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("main", [Trainer.main, Tester.main], ids=["Trainer", "Tester"])
def test_cuda_asked_for_without_a_gpu(trained, tmp_path, monkeypatch, capsys, main):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = args_for_trainer(trained[0]) if main is Trainer.main else args_for_tester(*trained)
    line = error_of(main, [*argv, "--device", "cuda", "--save_root", tmp_path / "out"], capsys)
    assert "--device cuda was asked for but no CUDA GPU is available; use --device cpu" in line


@pytest.mark.parametrize("argv, line", [
    (["--num_epoch", "three"], "argument --num_epoch: invalid int value: 'three'"),
    (["--kl_anneal_type", "cyclical"], "argument --kl_anneal_type: invalid choice: 'cyclical' (choose from "
                                       "'Cyclical', 'Monotonic', 'Full_KL', 'None')"),
    (["--ckpt_path"], "argument --ckpt_path: expected one argument"),
])
def test_a_malformed_flag_is_one_line_too(capsys, argv, line):
    """argparse printed its whole usage (over 30 lines) above the message."""
    with pytest.raises(SystemExit) as exit_:
        Trainer.main(argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"error: {line} (--help lists the flags)\n"
    with pytest.raises(SystemExit) as exit_:
        Tester.main([])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: the following arguments are required: --ckpt_path (--help lists the flags)\n"


# ----------------------------------------------------------------------------- checkpoints

class RunsCode:
    """Unpickling this would create a folder: proof that loading ran code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def make_bad_checkpoint(kind, good, folder):
    path = os.path.join(folder, f"{kind}.ckpt")
    with open(good, "rb") as f:
        data = f.read()
    if kind == "missing":
        return path
    if kind == "folder":
        return folder
    with open(path, "wb") as f:
        f.write({"empty": b"", "truncated": data[:len(data) // 2], "text": b"epoch 3, loss 0.1\n"}.get(kind, b""))
    if kind == "image":
        path = os.path.join(folder, "frame0.png")
        from PIL import Image
        Image.new("RGB", (64, 32)).save(path)
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "no_model":
        torch.save({"epoch": 3, "optimizer": {}}, path)
    elif kind == "code":
        torch.save({"model": RunsCode(os.path.join(folder, "PWNED"))}, path)
    elif kind == "model_not_a_dict":
        torch.save({"model": "resnet50"}, path)
    elif kind == "lab_other_shape":  # a module widened by hand in lab code
        sd = torch.load(good, weights_only=True)["model"]
        sd["Generator.7.weight"] = torch.zeros(3, 5, 1, 1)
        torch.save({"state_dict": sd, "optimizer": {}}, path)
    elif kind in ("missing_key", "unexpected_key"):  # a module taken out of, or added to, the model by hand
        ckpt = torch.load(good, weights_only=True)
        if kind == "missing_key":
            del ckpt["model"]["Generator.7.bias"]
        else:
            ckpt["model"]["Generator.8.weight"] = torch.zeros(3, 3, 1, 1)
        torch.save(ckpt, path)
    elif kind == "torchscript":
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    elif kind == "plain_pickle":  # pickle.dump's own: torch warns about the protocol first
        import pickle
        with open(path, "wb") as f:
            pickle.dump({"epoch": 3}, f, protocol=4)
    return path


BAD_CHECKPOINTS = {
    "missing": "does not exist; check --ckpt_path",
    "folder": "is a folder; pass a checkpoint file",
    "empty": "it is truncated or not a PyTorch checkpoint",
    "truncated": "it is truncated or not a PyTorch checkpoint",
    "text": "it is truncated or not a PyTorch checkpoint",
    "image": "it is not a PyTorch checkpoint",
    "tensor": "is not a checkpoint (it holds a Tensor, not a dict)",
    "no_model": "is not a checkpoint of this model (no 'model' or 'state_dict' entry)",
    "code": "it holds pickled objects that could run code",
    "model_not_a_dict": "is not a checkpoint of this model (its 'model' entry is not a state_dict)",
    "lab_other_shape": "does not match the model: size mismatch for Generator.7.weight",
    "missing_key": "does not match the model: missing ['Generator.7.bias'], unexpected []",
    "unexpected_key": "does not match the model: missing [], unexpected ['Generator.8.weight']",
    "torchscript": "",  # one line, and no warning of torch's before it
    "plain_pickle": "it is not a PyTorch checkpoint",
}


@pytest.mark.parametrize("kind", list(BAD_CHECKPOINTS))
@pytest.mark.parametrize("main", [Trainer.main, Tester.main], ids=["Trainer", "Tester"])
def test_bad_checkpoint(trained, tmp_path, capsys, main, kind):
    dr, good = trained
    path = make_bad_checkpoint(kind, good, str(tmp_path))
    argv = ([*args_for_trainer(dr), "--ckpt_path", path, "--save_root", tmp_path / "run"] if main is Trainer.main
            else args_for_tester(dr, path, "--save_root", tmp_path / "out"))
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: "), err  # nothing but the one line
    line = err.strip()
    assert path in line and BAD_CHECKPOINTS[kind] in line
    if kind == "code":
        assert "os.makedirs" in line and "weights_only=True" in line
        assert not os.path.exists(os.path.join(tmp_path, "PWNED"))  # nothing was executed


def test_the_weights_decide_the_model_over_the_stored_flags(trained):
    """args.json-like flags that contradict the weights (edited by hand, or a weights file with
    another run's args) do not rebuild a model the weights cannot fill."""
    from modules.checkpoint import model_args
    ckpt = torch.load(trained[1], weights_only=True)  # F/L/N/D 16/8/4/16
    ckpt["args"].update(F_dim=32, N_dim=8, prior="learned")
    got = model_args(ckpt)
    assert (got["F_dim"], got["N_dim"], got["prior"]) == (16, 4, "fixed")


@pytest.mark.parametrize("flags, named", [
    (["--F_dim", "32"], ["--F_dim 32 (checkpoint: 16)"]),
    (["--N_dim", "8", "--D_out_dim", "32"], ["--N_dim 8 (checkpoint: 4)", "--D_out_dim 32 (checkpoint: 16)"]),
    (["--prior", "learned"], ["--prior learned (checkpoint: fixed)"]),
    (["--condition", "first", "--first_pose"], ["--first_pose True (checkpoint: False)"]),
    (["--residual", "--warp"], ["--warp True (checkpoint: False)"]),
    (["--residual", "--warp", "--condition", "first", "--first_pose", "--pose_flow"],
     ["--pose_flow True (checkpoint: False)"]),
    # No weights tell these two; the checkpoint's arguments do (a run continued with another value
    # trained a different function from the same weights, silently).
    (["--residual"], ["--residual True (checkpoint: False)"]),
    (["--condition", "first"], ["--condition first (checkpoint: previous)"]),
])
def test_checkpoint_for_other_dims_names_the_flag(trained, tmp_path, capsys, flags, named):
    dr, good = trained
    line = error_of(Trainer.main, ["--ckpt_path", good, *flags, "--save_root", tmp_path / "run"], capsys)
    assert f"{good} was written for another model" in line
    assert all(n in line for n in named)


def test_test_flag_writes_nothing_anywhere(trained, tmp_path, monkeypatch, capsys):
    """--test only validates, yet it was refused beside another run's checkpoints and needed a
    writable folder."""
    dr, good = trained
    other = tmp_path / "other"
    other.mkdir()
    (other / "last.ckpt").write_text("another run's")

    def unwritable(path, flag="--save_root"):
        raise Trainer.ConfigError(f"{flag} {path} is not writable")
    monkeypatch.setattr(Trainer, "writable_folder", unwritable)
    before = sorted(os.listdir(os.path.dirname(good)))
    for extra in ([], ["--save_root", str(other)]):
        assert Trainer.main(["--DR", dr, "--ckpt_path", good, "--test", "--val_vi_len", "20", "--device", "cpu",
                             *extra]) == 0
        assert "val PSNR" in capsys.readouterr().out
    assert sorted(os.listdir(os.path.dirname(good))) == before and os.listdir(other) == ["last.ckpt"]


def test_a_resume_keeps_this_machines_speed_flags(tmp_path):
    """A run started with --compile on (a GPU's choice) was resumed with it on any machine; the
    speed-only flags follow the machine, the run's other flags come back."""
    from modules.checkpoint import save_checkpoint
    path = tmp_path / "last.ckpt"
    save_checkpoint(path, {"model": {"w": torch.zeros(1)}, "args": {"compile": "on", "cuda_graphs": "off", "channels_last": "off",
                                                 "malloc_cache": "on", "amp": "off", "lr": 0.5}})
    args = Trainer.trainer_parser().parse_args(["--ckpt_path", str(path)])
    Trainer.adopt_run_args(args, ["--ckpt_path", str(path)])
    assert (args.compile, args.cuda_graphs, args.channels_last, args.malloc_cache) == ("auto",) * 4
    assert (args.amp, args.lr) == ("off", 0.5)


def test_checkpoint_whose_optimizer_holds_other_parameters(trained, tmp_path, capsys):
    """A checkpoint written before a module was added (its optimizer state one parameter short, as a
    --pose_flow run's from before the dancer layer) cannot be trained on: named, with what to do."""
    dr, good = trained
    ckpt = torch.load(good, weights_only=True)
    group = ckpt["optimizer"]["param_groups"][0]
    ckpt["optimizer"]["state"].pop(group["params"].pop())
    path = str(tmp_path / "older.ckpt")
    torch.save(ckpt, path)
    line = error_of(Trainer.main, ["--DR", dr, *TINY, "--num_epoch", "2", "--ckpt_path", path,
                                   "--save_root", tmp_path / "run"], capsys)
    assert path in line and "optimizer state holds other parameters than this model's" in line
    assert "start a new run" in line


@pytest.mark.parametrize("before, after", [("Adam", "Adamax"), ("Adamax", "Adam")])
def test_resume_with_another_kind_of_optimizer_starts_its_state_afresh(trained, tmp_path, capsys, before, after):
    """Adam's state (exp_avg_sq) is not Adamax's (exp_inf): a resume with the other --optim loaded
    it and failed at the first step with a KeyError traceback, after rewriting args.json."""
    dr = trained[0]
    run = str(tmp_path / "run")
    common = ["--DR", dr, *TINY, "--train_vi_len", "4", "--partial", "0.09", "--save_root", run]
    assert Trainer.main([*common, "--num_epoch", "1", "--optim", before]) == 0
    capsys.readouterr()
    assert Trainer.main(["--resume", run, "--num_epoch", "2", "--optim", after]) == 0
    out = capsys.readouterr().out
    assert f"holds the state of {before}; --optim {after} starts with a fresh state" in out
    ckpt = torch.load(os.path.join(run, "last.ckpt"), weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["args"]["optim"] == after
    kind = "exp_inf" if after == "Adamax" else "exp_avg_sq"
    assert all(kind in st for st in ckpt["optimizer"]["state"].values())


def test_resume_keeps_the_checkpoints_optimizer_state_under_this_runs_options(trained, tmp_path):
    """Optimizer.load_state_dict takes the options of the checkpoint's groups too: a resume with
    --optim AdamW (from Adam) or another --weight_decay silently kept the checkpoint's."""
    from types import SimpleNamespace
    dr, good = trained
    ckpt = torch.load(good, weights_only=True)
    args = Trainer.trainer_parser().parse_args(["--optim", "AdamW", "--weight_decay", "0.25", "--lr", "3e-4",
                                                "--betas", "0.8", "0.99"])
    args.ckpt_path = good
    model = Trainer.build_model(ckpt["args"])
    model.load_state_dict(ckpt["model"])
    opt = Trainer.build_optimizer(model, args, SimpleNamespace(device=torch.device("cpu")))
    Trainer.load_optimizer_state(opt, ckpt, args, verbose=False)
    group = opt.param_groups[0]
    assert group["weight_decay"] == 0.25 and group["lr"] == 3e-4 and tuple(group["betas"]) == (0.8, 0.99)
    assert group.get("decoupled_weight_decay", True)  # AdamW's, not the checkpoint's Adam
    saved = ckpt["optimizer"]["state"]
    assert len(opt.state) == len(saved) > 0
    first = opt.state[opt.param_groups[0]["params"][0]]
    assert torch.equal(first["exp_avg"], saved[0]["exp_avg"])  # the moments are the checkpoint's


def test_resume_with_another_save_root_is_refused(trained, tmp_path, capsys):
    """--resume A --save_root B trained into A and never made B, silently."""
    run = os.path.dirname(trained[1])
    line = error_of(Trainer.main, ["--resume", run, "--save_root", tmp_path / "B"], capsys)
    assert f"--resume {run} continues that run in its own folder" in line
    assert f"--ckpt_path {os.path.join(run, 'last.ckpt')} --save_root {tmp_path / 'B'}" in line
    assert not (tmp_path / "B").exists()


def test_resume_from_another_folder_with_a_relative_dataset_path(trained, tmp_path, monkeypatch, capsys):
    """A run trained on a relative --DR, resumed from another folder, was told to generate a new
    dataset at that path (another dataset than the run's)."""
    dr = trained[0]
    monkeypatch.chdir(os.path.dirname(dr))
    run = str(tmp_path / "run")
    assert Trainer.main(["--DR", os.path.basename(dr), *TINY, "--num_epoch", "1", "--train_vi_len", "4",
                         "--partial", "0.09", "--save_root", run]) == 0
    monkeypatch.chdir(tmp_path)
    line = error_of(Trainer.main, ["--resume", run, "--num_epoch", "2"], capsys)
    assert f"was trained on --DR {os.path.basename(dr)}, which is not found from {tmp_path}" in line
    assert "pass --DR" in line and "make_dance_data" not in line
    assert Trainer.main(["--resume", run, "--num_epoch", "2", "--DR", dr]) == 0


def test_lab_checkpoint_dims_come_off_its_weights(trained, tmp_path, capsys):
    """Checkpoints written by lab code hold only {"state_dict", ...}: the dims come off the weights
    (they were refused at the defaults, so the user had to type them); dims given that contradict
    them are named."""
    dr, good = trained
    lab = str(tmp_path / "lab.ckpt")
    torch.save({"state_dict": torch.load(good, weights_only=True)["model"], "optimizer": {}}, lab)
    common = ["--DR", dr, "--device", "cpu", "--val_vi_len", "20", "--ckpt_path", lab, "--num_epoch", "1",
              "--train_vi_len", "4", "--partial", "0.09"]
    line = error_of(Trainer.main, [*common, "--F_dim", "128", "--save_root", tmp_path / "run"], capsys)
    assert "--F_dim 128 (checkpoint: 16)" in line and "L_dim" not in line
    assert Trainer.main([*common, "--save_root", str(tmp_path / "run")]) == 0
    assert json.load(open(tmp_path / "run" / "args.json"))["F_dim"] == 16


# ----------------------------------------------------------------------------- dataset

def broken_copy(dr, tmp_path, how):
    out = str(tmp_path / "DR")
    shutil.copytree(dr, out)
    if how == "corrupt_frame":
        with open(os.path.join(out, "train", "train_img", "frame5.png"), "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n cut short")
    elif how == "missing_label":
        os.remove(os.path.join(out, "train", "train_label", "frame7.png"))
    elif how == "short_test_sequence":
        for i in range(15, 20):
            os.remove(os.path.join(out, "test", "test_label", "1", f"frame{i}.png"))
    elif how == "test_label_gap":  # a lost label, and its frame
        for kind in ("test_label", "test_gt"):
            os.remove(os.path.join(out, "test", kind, "0", "frame5.png"))
    elif how == "val_gap":  # as the lab's data, which has no videos.json
        os.remove(os.path.join(out, "val", "videos.json"))
        for kind in ("val_img", "val_label"):
            os.remove(os.path.join(out, "val", kind, "frame10.png"))
    elif how == "interrupted_generation":  # as make_dance_data.py leaves a dataset it did not finish
        os.remove(os.path.join(out, "dataset.json"))
        open(os.path.join(out, ".make_dance_data_partial"), "w").close()
    elif how == "corrupt_test_frame":
        with open(os.path.join(out, "test", "test_img", "0", "frame0.png"), "wb") as f:
            f.write(b"not an image")
    return out


@pytest.mark.parametrize("how, extra, message", [
    ("missing_root", [], "dataset root {dr} not found"),
    ("corrupt_frame", [], "cannot read {dr}/train/train_img/frame5.png"),
    ("missing_label", [], "{dr}/train/train_img/frame7.png has no label {dr}/train/train_label/frame7.png"),
    ("intact", ["--train_vi_len", "40"], "fewer than one sequence of 40; lower --train_vi_len"),
    ("intact", ["--val_vi_len", "30"], "fewer than one sequence of 30; lower --val_vi_len"),
    ("val_gap", [], "fewer than one sequence of 20; the frame numbers skip (frame9.png then frame11.png, 1 skip(s)) "
                    "and no sequence crosses a skip: restore the missing frames, number them consecutively, or give "
                    "the videos' lengths in {dr}/val/videos.json (docs/DATA.md); or lower --val_vi_len or add frames"),
    ("interrupted_generation", [], "{dr} is incomplete: scripts/make_dance_data.py was interrupted"),
])
def test_trainer_dataset_problem(trained, tmp_path, capsys, how, extra, message):
    dr = str(tmp_path / "nowhere") if how == "missing_root" else broken_copy(trained[0], tmp_path, how)
    argv = [*args_for_trainer(dr), "--no_cache", *extra, "--save_root", tmp_path / "run"]
    line = error_of(Trainer.main, argv, capsys)
    assert message.format(dr=dr) in line
    assert not (tmp_path / "run").exists()  # the run folder it made is removed again


@pytest.mark.parametrize("who, folder", [("Trainer", "val/val_img"), ("Tester", "test/test_label")])
def test_unreadable_dataset_folder_is_named(trained, tmp_path, monkeypatch, capsys, who, folder):
    """A folder of the dataset that cannot be listed was reported as a failure to write the run's
    output ("free space or choose another --save_root")."""
    dr = broken_copy(trained[0], tmp_path, "intact")
    locked, real = os.path.join(dr, folder), os.scandir

    def scandir(path="."):
        if os.path.abspath(path) == os.path.abspath(locked):
            raise PermissionError(13, "Permission denied", path)
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    if who == "Trainer":
        line = error_of(Trainer.main, [*args_for_trainer(dr), "--no_cache", "--save_root", tmp_path / "run"], capsys)
    else:
        line = error_of(Tester.main, [*args_for_tester(dr, trained[1], "--no_cache"),
                                      "--save_root", tmp_path / "run"], capsys)
    assert line == f"error: cannot list {locked} (Permission denied); check its permissions"


def test_bad_dataset_leaves_no_empty_run_folder(tmp_path, monkeypatch, capsys):
    """The Trainer made the run folder before it read the data: a bad --DR left an empty one."""
    monkeypatch.chdir(tmp_path)
    nowhere = str(tmp_path / "nowhere")
    assert "dataset root" in error_of(Trainer.main, args_for_trainer(nowhere), capsys)
    assert not (tmp_path / "runs").exists()  # neither runs/<timestamp> nor the runs/ it made
    (tmp_path / "runs").mkdir()
    assert "dataset root" in error_of(Trainer.main, args_for_trainer(nowhere), capsys)
    assert os.listdir(tmp_path / "runs") == []  # runs/ was there before: kept
    (tmp_path / "mine").mkdir()  # a folder the user made is kept, empty or not
    assert "dataset root" in error_of(Trainer.main, [*args_for_trainer(nowhere), "--save_root", "mine"], capsys)
    assert os.listdir(tmp_path / "mine") == []
    # --save_root a/b/c with a/ new: all three are removed, not only c/ (a/b/ was left)
    assert "dataset root" in error_of(Trainer.main, [*args_for_trainer(nowhere), "--save_root", "mine/a/b/c"], capsys)
    assert os.listdir(tmp_path / "mine") == []


@pytest.mark.parametrize("how, extra, message", [
    ("missing_root", [], "dataset root {dr} not found"),
    ("short_test_sequence", [], "the test sequences in {dr}/test/test_label hold different numbers of pose labels "
                                "(0: 20, 1: 15); each is generated for --test_len frames (20): give them the same "
                                "length"),
    ("test_label_gap", [], "{dr}/test/test_label/0 skips from frame4.png to frame6.png: a test sequence needs the "
                           "pose of every frame; restore the missing labels"),
    ("intact", ["--test_len", "30"], "{dr}/test/test_label holds sequences of 20 pose labels but test_len is 30; "
                                     "pass --test_len 20"),
    ("corrupt_test_frame", [], "cannot read {dr}/test/test_img/0/frame0.png"),
    ("interrupted_generation", [], "{dr} is incomplete: scripts/make_dance_data.py was interrupted"),
])
def test_tester_dataset_problem(trained, tmp_path, capsys, how, extra, message):
    dr = str(tmp_path / "nowhere") if how == "missing_root" else broken_copy(trained[0], tmp_path, how)
    argv = [*args_for_tester(dr, trained[1], "--no_cache", *extra), "--save_root", tmp_path / "out" / "a"]
    line = error_of(Tester.main, argv, capsys)
    assert message.format(dr=dr) in line
    assert not (tmp_path / "out").exists()  # the folders it made are removed again (were left empty)


# Runs a script as `python SCRIPT` would, with the named packages hidden from imports and from
# importlib.util.find_spec (the path finder answers None for them, as for a package not installed).
HIDDEN_RUN = """
import os, runpy, sys
from importlib.machinery import PathFinder
hidden = set(sys.argv[1].split(","))
class Without(PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.split(".")[0] in hidden else PathFinder.find_spec(name, path, target)
sys.meta_path[sys.meta_path.index(PathFinder)] = Without
sys.argv = sys.argv[2:]
sys.path[0] = os.path.dirname(sys.argv[0])  # as `python SCRIPT` sets it
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("script, hidden, named", [
    ("Trainer.py", "tensorboard", "tensorboard"),  # was: a traceback after the first epoch, which was lost
    ("Tester.py", "matplotlib", "matplotlib"),
    ("scripts/make_dance_data.py", "PIL,torch", "Pillow, torch"),
    ("scripts/plot_report.py", "matplotlib", "matplotlib"),
    ("scripts/bench.py", "torch", "torch"),
])
def test_a_python_without_the_packages_is_told_so_before_anything_runs(tiny_dance, tmp_path, script, hidden, named):
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = {"Trainer.py": ["--DR", str(tiny_dance), "--save_root", str(tmp_path / "run"), *TINY],
            "Tester.py": ["--ckpt_path", str(tmp_path / "none.ckpt")],
            "scripts/make_dance_data.py": ["--out", str(tmp_path / "DR")],
            "scripts/plot_report.py": [str(tmp_path)],
            "scripts/bench.py": []}[script]
    proc = subprocess.run([sys.executable, "-c", HIDDEN_RUN, hidden, os.path.join(root, script), *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr == (f"error: {script} needs {named}, which this Python ({sys.executable}) does not have: "
                           "run it in the project's environment (`source scripts/setup_env.sh` makes .venv and "
                           "enters it), or `pip install -r requirements.txt`\n")
    assert os.listdir(tmp_path) == []  # nothing written
    # The packages that are there take the script past the check (the hidden-package mechanism
    # itself hides nothing else).
    if script == "scripts/plot_report.py":
        ok = subprocess.run([sys.executable, "-c", HIDDEN_RUN, "no_such_package", os.path.join(root, script),
                             "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert ok.returncode == 0 and "usage:" in ok.stdout, ok.stderr
