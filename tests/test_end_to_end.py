"""Tiny train + test on generated data, on the CPU: the outputs users hand in."""
import csv
import json
import os
import shutil
import tempfile

import numpy as np
import pytest
import torch

import Tester
import Trainer
from dataloader import TestSequences
from modules import VAE_Model
from helpers import jitter

TINY = ["--F_dim", "16", "--L_dim", "8", "--N_dim", "4", "--D_out_dim", "16", "--device", "cpu"]


@pytest.fixture(scope="module")
def run(tiny_dance, tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    save = root / "run"
    rc = Trainer.main(["--DR", str(tiny_dance), "--save_root", str(save), "--num_epoch", "2", "--batch_size", "2",
                       "--val_vi_len", "20", "--per_save", "1", "--kl_anneal_type", "Full_KL", "--tfr", "0.5",
                       "--tf_mode", "step", *TINY])
    assert rc == 0
    return tiny_dance, save


def test_trainer_outputs(run):
    _, save = run
    for name in ("last.ckpt", "best.ckpt", "epoch_1.ckpt", "epoch_2.ckpt", "args.json", "metrics.jsonl"):
        assert (save / name).is_file(), name
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(save))
    rows = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(r["beta"] == 1.0 and "val_psnr" in r and len(r["val_psnr_per_frame"]) == 19 for r in rows)
    ckpt = torch.load(save / "last.ckpt", map_location="cpu", weights_only=True)  # plain data only
    for key in ("model", "optimizer", "scheduler", "epoch", "tfr", "beta", "best_psnr", "rng", "args"):
        assert key in ckpt, key
    assert ckpt["epoch"] == 2 and ckpt["args"]["F_dim"] == 16 and ckpt["progress"] is None


def _submission(path):
    with open(path) as f:
        return list(csv.reader(f))


def test_tester_submission_gifs_and_reproducibility(run, tmp_path, capsys):
    dr, save = run
    outs = []
    for k in range(2):
        out = tmp_path / f"t{k}"
        # No dims given: the Tester rebuilds the model from the checkpoint.
        assert Tester.main(["--ckpt_path", str(save / "best.ckpt"), "--DR", str(dr), "--save_root", str(out),
                            "--test_len", "20", "--device", "cpu"]) == 0
        outs.append(out)
    a, b = (o / "submission.csv" for o in outs)
    assert a.read_bytes() == b.read_bytes()  # bit for bit, fixed seed
    rows = _submission(a)
    assert rows[0] == ["id"] + [str(i) for i in range(3 * 32 * 64)]
    assert len(rows) == 1 + 2 * 20
    assert [int(r[0]) for r in rows[1:]] == list(range(40))
    seqs = TestSequences(dr, 32, 64, test_len=20)
    for k in range(2):
        first = [int(v) for v in rows[1 + 20 * k][1:]]
        assert first == seqs[k]["first"].flatten().tolist()  # row 0 of each sequence: the given frame
    assert all(0 <= int(v) <= 255 for v in rows[5][1:])
    for k in range(2):
        assert (outs[0] / f"pred_seq{seqs[k]['name']}.gif").stat().st_size > 0
        assert (outs[0] / f"pose_seq{seqs[k]['name']}.gif").stat().st_size > 0
        from PIL import Image
        with Image.open(outs[0] / f"strip_seq{seqs[k]['name']}.png") as strip:  # pose, truth, predicted
            assert strip.format == "PNG" and strip.size == (70 + 8 * (128 + 2), 14 + 3 * (64 + 2))
    res = json.loads((outs[0] / "results.json").read_text())
    assert len(res["sequences"]) == 2 and res["copy_first_psnr"] > 0 and "psnr" in res
    # The scores are those of the frames as submitted: PSNR per frame of the CSV's values against
    # the truth, frames 1..19, averaged (per sequence, then over sequences).
    from modules.metrics import psnr
    for k in range(2):
        sub = torch.tensor([[int(v) for v in r[1:]] for r in rows[1 + 20 * k:1 + 20 * (k + 1)]])
        sub = sub.view(20, 3, 32, 64).float() / 255
        gt = seqs[k]["gt"].float() / 255
        assert res["sequences"][k]["psnr"] == pytest.approx(psnr(sub[1:], gt[1:]).mean().item(), abs=1e-5)
    assert "copy-first" in (shown := capsys.readouterr().out) and "Kaggle format" not in shown
    # Drift: means over the first and last 9 predicted frames of the averaged per-frame curve.
    curve = np.mean([r["psnr_per_frame"] for r in res["sequences"]], 0)
    assert len(curve) == 19
    assert res["psnr_first_frames"] == pytest.approx(curve[:9].mean())
    assert res["psnr_last_frames"] == pytest.approx(curve[-9:].mean())
    copy = np.mean([r["copy_first_per_frame"] for r in res["sequences"]], 0)
    assert np.mean(copy) == pytest.approx(res["copy_first_psnr"])
    assert res["copy_first_last_frames"] == pytest.approx(copy[-9:].mean())


def test_tester_on_the_unseen_dancers(run, tmp_path, capsys):
    """--split test_unseen generates the generated dataset's sequences of dancers never seen in
    training, into <checkpoint folder>/test_unseen unless --save_root says otherwise."""
    dr, save = run
    ckpt = tmp_path / "ckpt" / "best.ckpt"
    ckpt.parent.mkdir()
    shutil.copy(save / "best.ckpt", ckpt)
    assert Tester.main(["--ckpt_path", str(ckpt), "--DR", str(dr), "--split", "test_unseen", "--test_len", "20",
                        "--no_gif", "--device", "cpu"]) == 0
    res = json.loads((tmp_path / "ckpt" / "test_unseen" / "results.json").read_text())
    first = TestSequences(dr, 32, 64, test_len=20, split="test_unseen")[0]["first"]
    assert len(res["sequences"]) == 1 and res["args"]["split"] == "test_unseen"
    rows = _submission(tmp_path / "ckpt" / "test_unseen" / "submission.csv")
    assert len(rows) == 1 + 20 and [int(v) for v in rows[1][1:]] == first.flatten().tolist()
    assert not (tmp_path / "ckpt" / "test").exists()


def test_tester_no_gif_notes_the_gifs_of_an_earlier_test(run, tmp_path, capsys):
    """A second test with --no_gif into the same folder left the first test's GIFs beside the new
    submission.csv, silently."""
    dr, save = run
    argv = ["--ckpt_path", str(save / "best.ckpt"), "--DR", str(dr), "--save_root", str(tmp_path / "o"),
            "--test_len", "20", "--device", "cpu"]
    assert Tester.main(argv) == 0
    assert "from an earlier test" not in capsys.readouterr().out
    assert Tester.main(argv + ["--no_gif"]) == 0
    out = capsys.readouterr().out
    assert (f"note: {tmp_path / 'o'} also holds pose_seq0.gif, pose_seq1.gif, pred_seq0.gif ... from an earlier "
            "test, not written by this one") in out


def test_tester_scores_the_sequences_that_have_ground_truth(run, tmp_path, capsys):
    """One sequence without test_gt/ silently dropped every score, and a later test without ground
    truth left the earlier psnr_per_frame.png beside its outputs without a word."""
    dr, save = run
    part = tmp_path / "dr"
    shutil.copytree(dr / "test", part / "test")
    shutil.rmtree(part / "test" / "test_gt" / "1")
    argv = ["--ckpt_path", str(save / "best.ckpt"), "--DR", str(part), "--save_root", str(tmp_path / "o"),
            "--test_len", "20", "--device", "cpu", "--no_gif"]
    assert Tester.main(argv) == 0
    out = capsys.readouterr().out
    assert "note: no ground truth (test_gt/) for sequence(s) 1: the scores are of the other 1 of 2" in out
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert [r["name"] for r in res["sequences"]] == ["0"] and res["psnr"] == res["sequences"][0]["psnr"]
    assert "also holds" not in out
    shutil.rmtree(part / "test" / "test_gt")
    assert Tester.main(argv) == 0
    out = capsys.readouterr().out
    assert json.loads((tmp_path / "o" / "results.json").read_text())["sequences"] == []
    assert "no ground truth" not in out
    assert f"note: {tmp_path / 'o'} also holds psnr_per_frame.png from an earlier test" in out


def test_tester_batches_take_each_rollouts_own_noise(run, tmp_path, monkeypatch):
    """Rollouts generated a batch at a time (--batch_size below the number of rollouts) each take
    their own noise, the same as when all run together (the first batch's noise reused would give
    every sample of every sequence the same z)."""
    dr, save = run
    real, seen = Tester.rollout, {}

    def recording(model, first, labels, eps, *a, **k):
        seen[batch].append(eps.clone())
        return real(model, first, labels, eps, *a, **k)
    monkeypatch.setattr(Tester, "rollout", recording)
    scores = []
    for batch in ("1", "8"):  # 2 sequences x 3 samples: 6 batches of one, or one of six
        seen[batch] = []
        out = tmp_path / f"b{batch}"
        assert Tester.main(["--ckpt_path", str(save / "best.ckpt"), "--DR", str(dr), "--save_root", str(out),
                            "--test_len", "20", "--no_gif", "--num_samples", "3", "--batch_size", batch,
                            "--device", "cpu"]) == 0
        scores.append(json.loads((out / "results.json").read_text())["sequences"])
    assert [e.shape[1] for e in seen["1"]] == [1] * 6 and [e.shape[1] for e in seen["8"]] == [6]
    assert torch.equal(torch.cat(seen["1"], 1), seen["8"][0])
    assert all(not torch.equal(a, b) for i, a in enumerate(seen["1"]) for b in seen["1"][i + 1:])
    for one, together in zip(*scores):
        assert one["psnr"] == pytest.approx(together["psnr"], abs=1e-3)
        assert one["best_of_k_psnr"] == pytest.approx(together["best_of_k_psnr"], abs=1e-3)


def test_submission_rounds_to_the_nearest_level():
    """round(x * 255), not truncation, in the course's format (row 0 round-trips either way)."""
    written = []
    levels = torch.tensor([0.0, 0.4, 0.6, 1.5, 254.4, 254.6]) / 255  # x * 255 just below/above .5
    video = levels.repeat(3 * 2 * 1).view(1, 3, 2, 6)  # one frame, 3 x 2 x 6
    path = os.path.join(tempfile.mkdtemp(), "submission.csv")
    assert Tester.write_submission(path, [video], written) == (1, 1 + 36)
    rows = _submission(path)
    assert rows[1][:7] == ["0", "0", "0", "1", "2", "254", "255"]


def test_tester_other_seed_changes_the_samples(run, tmp_path):
    dr, save = run
    csvs = []
    for seed in (0, 1):
        out = tmp_path / f"s{seed}"
        Tester.main(["--ckpt_path", str(save / "best.ckpt"), "--DR", str(dr), "--save_root", str(out),
                     "--test_len", "20", "--no_gif", "--seed", str(seed), "--device", "cpu"])
        csvs.append((out / "submission.csv").read_bytes())
    assert csvs[0] != csvs[1]


@pytest.mark.parametrize("stored", [{"first_pose": True, "warp": True, "pose_flow": True}, {}])
def test_tester_rebuilds_the_model_options_from_the_checkpoint(tmp_path, stored):
    """--residual, --condition and --prior come back from the checkpoint's stored arguments;
    --first_pose, --warp and --pose_flow too, and from the weights where the arguments lack them."""
    from modules.checkpoint import save_checkpoint
    model = VAE_Model(16, 8, 4, 16, prior="learned", residual=True, condition="first", first_pose=True, warp=True,
                      pose_flow=True)
    args = dict(F_dim=16, L_dim=8, N_dim=4, D_out_dim=16, prior="learned", residual=True, condition="first",
                **stored)
    path = tmp_path / "last.ckpt"
    save_checkpoint(path, {"model": model.state_dict(), "args": args})
    opts = Tester.tester_parser().parse_args(["--ckpt_path", str(path)])
    loaded, _, _ = Tester.load_model(str(path), opts)
    assert (loaded.prior_type, loaded.residual, loaded.condition, loaded.pose_fusion is not None,
            loaded.flow is not None, loaded.flow_coarse is not None) == ("learned", True, "first", True, True, True)


def test_lab_format_checkpoint_loads_in_tester(run, tmp_path, capsys):
    dr, save = run
    model = VAE_Model(16, 8, 4, 16)
    path = tmp_path / "epoch=3.ckpt"
    torch.save({"state_dict": model.state_dict(), "optimizer": {}, "lr": 1e-3, "tfr": 1.0, "last_epoch": 3}, path)
    common = ["--DR", str(dr), "--test_len", "20", "--no_gif", "--device", "cpu"]
    assert Tester.main(["--ckpt_path", str(path), "--save_root", str(tmp_path / "o"), *common]) == 0
    assert len(_submission(tmp_path / "o" / "submission.csv")) == 41
    # Said, because a checkpoint of this project re-saved as weights only would be read the same way.
    assert "rebuilt as the lab's model" in capsys.readouterr().out
    assert Tester.main(["--ckpt_path", str(save / "last.ckpt"), "--save_root", str(tmp_path / "p"), *common]) == 0
    assert "the lab's model" not in capsys.readouterr().out


def test_lab_checkpoints_of_a_wrapped_model_load(run, tmp_path, capsys):
    """Lab code that wraps its model in DataParallel ("module.") or torch.compile ("_orig_mod.")
    saves names with the prefix; they were refused as "missing frame_transformation.6.weight"."""
    dr, _ = run
    sd = jitter(VAE_Model(16, 8, 4, 16)).state_dict()
    common = ["--DR", str(dr), "--test_len", "20", "--no_gif", "--device", "cpu"]
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": sd, "optimizer": {}}, plain)
    assert Tester.main(["--ckpt_path", str(plain), "--save_root", str(tmp_path / "plain"), *common]) == 0
    for prefix in ("module.", "_orig_mod.", "module._orig_mod."):
        wrapped = {prefix + k: v for k, v in sd.items()}
        for name, obj in (("entry", {"state_dict": wrapped, "optimizer": {}}), ("bare", wrapped)):
            path = tmp_path / f"{name}{prefix}ckpt"
            torch.save(obj, path)
            out = tmp_path / f"{name}{prefix}"
            assert Tester.main(["--ckpt_path", str(path), "--save_root", str(out), *common]) == 0, capsys.readouterr().err
            assert (out / "submission.csv").read_bytes() == (tmp_path / "plain" / "submission.csv").read_bytes()
    # Only a prefix every name has is removed: a model of which one module is wrapped is not this one.
    torch.save({"state_dict": {("module." + k if k.startswith("Generator.") else k): v for k, v in sd.items()},
                "optimizer": {}}, tmp_path / "half.ckpt")
    assert Tester.main(["--ckpt_path", str(tmp_path / "half.ckpt"), "--save_root", str(tmp_path / "half"), *common]) == 2
    assert "its weights are not this model's (missing Generator.0.block.0.conv1.0.weight)" in capsys.readouterr().err


def test_a_lab_checkpoint_is_named_with_its_models_values_and_never_written_over(run, tmp_path, monkeypatch,
                                                                                  capsys):
    """A lab file named best.ckpt, given as --ckpt_path, was replaced by the run's own best.ckpt
    (its folder was taken as the run's); the Tester's notes named its flags as None."""
    import hashlib
    dr, _ = run
    lab = tmp_path / "lab" / "best.ckpt"
    lab.parent.mkdir()
    torch.save({"state_dict": VAE_Model(16, 8, 4, 16).state_dict(), "optimizer": {}, "last_epoch": 3}, lab)
    digest = hashlib.sha1(lab.read_bytes()).hexdigest()
    monkeypatch.chdir(tmp_path)
    assert Trainer.main(["--DR", str(dr), "--device", "cpu", "--ckpt_path", str(lab), "--num_epoch", "1",
                         "--val_vi_len", "20", "--train_vi_len", "4", "--partial", "0.1"]) == 0  # dims from its weights
    assert "its optimizer state, epoch, lr and tfr are not continued; this run's flags set them" \
        in capsys.readouterr().out
    assert hashlib.sha1(lab.read_bytes()).hexdigest() == digest and os.listdir(lab.parent) == ["best.ckpt"]
    # Nor with its own folder as --save_root: refused, as the run would write its best.ckpt there.
    assert Trainer.main(["--DR", str(dr), "--device", "cpu", "--ckpt_path", str(lab), "--num_epoch", "1",
                         "--save_root", str(lab.parent)]) == 2
    assert "holds weights only (lab code's) and this run would write its own best.ckpt over it" \
        in capsys.readouterr().err
    assert hashlib.sha1(lab.read_bytes()).hexdigest() == digest and os.listdir(lab.parent) == ["best.ckpt"]
    # Nor --resume of its folder (it was continued there, and best.ckpt replaced).
    assert Trainer.main(["--DR", str(dr), "--device", "cpu", "--resume", str(lab.parent), "--num_epoch", "1"]) == 2
    assert (f"holds weights only (lab code's), not a run of Trainer.py to continue; start from its weights with "
            f"--ckpt_path {lab}") in capsys.readouterr().err
    assert hashlib.sha1(lab.read_bytes()).hexdigest() == digest and os.listdir(lab.parent) == ["best.ckpt"]
    (new,) = os.listdir(tmp_path / "runs")
    assert (tmp_path / "runs" / new / "best.ckpt").is_file()
    capsys.readouterr()
    assert Tester.main(["--ckpt_path", str(lab), "--DR", str(dr), "--test_len", "20", "--no_gif", "--device", "cpu",
                        "--save_root", str(tmp_path / "o"), "--residual", "--condition", "first"]) == 0
    out = capsys.readouterr().out
    assert "--residual True takes no effect: the model is rebuilt from the checkpoint (--residual False)" in out
    assert "(--condition previous)" in out and "None" not in out


def test_this_projects_weights_saved_alone_are_rebuilt_as_they_imply(run, tmp_path, capsys):
    """A state_dict re-saved from a --first_pose --warp run (as the refusal of pickled files tells
    users to do) crashed the Tester (ValueError: warp needs residual=True), and the Trainer took it
    for lab code's model. Its first_pose and flow layers say it is this project's: condition first,
    residual, this project's activations."""
    from modules.checkpoint import save_checkpoint
    dr, _ = run
    model = jitter(VAE_Model(16, 8, 4, 16, residual=True, condition="first", first_pose=True, warp=True))
    full, bare = tmp_path / "full.ckpt", tmp_path / "bare.pt"
    save_checkpoint(full, {"model": model.state_dict(), "args": dict(F_dim=16, L_dim=8, N_dim=4, D_out_dim=16,
                                                                     residual=True, condition="first")})
    torch.save(model.state_dict(), bare)
    common = ["--DR", str(dr), "--test_len", "20", "--no_gif", "--device", "cpu"]
    for path in (full, bare):
        assert Tester.main(["--ckpt_path", str(path), "--save_root", str(tmp_path / path.stem), *common]) == 0
    assert "the lab's model" not in capsys.readouterr().out
    assert (tmp_path / "bare" / "submission.csv").read_bytes() == (tmp_path / "full" / "submission.csv").read_bytes()
    args = Trainer.trainer_parser().parse_args(["--ckpt_path", str(bare)])
    Trainer.adopt_run_args(args, ["--ckpt_path", str(bare)])
    assert (args.condition, args.residual, args.lab_activation) == ("first", True, False)


def test_lab_activation_against_a_checkpoint_without_it_is_refused(run, tmp_path, capsys):
    dr, save = run
    assert Trainer.main(["--ckpt_path", str(save / "best.ckpt"), "--test", "--lab_activation"]) == 2
    assert "--lab_activation True (checkpoint: False)" in capsys.readouterr().err


@pytest.mark.parametrize("prior", ["fixed", "learned"])
def test_lab_checkpoint_computes_the_lab_codes_function(tmp_path, prior):
    """Lab code writes nn.LeakyReLU(True) (a slope of 1: no activation) in Label_Encoder and
    Gaussian_Predictor; its checkpoints are rebuilt with it, ours keep the slope of 0.01."""
    from modules.checkpoint import load_checkpoint, model_args
    from modules.model import build_model
    sd = jitter(VAE_Model(16, 8, 4, 16, prior=prior)).state_dict()
    lab, bare, ours = tmp_path / "lab.ckpt", tmp_path / "bare.pt", tmp_path / "ours.ckpt"
    torch.save({"state_dict": sd, "optimizer": {}}, lab)
    torch.save(sd, bare)
    torch.save({"model": sd, "args": {"F_dim": 16}}, ours)
    g = torch.Generator().manual_seed(0)
    label, feat = torch.rand(2, 3, 8, 16, generator=g), torch.randn(2, 16, 8, 16, generator=g)

    def lab_code(m):  # the lab's two modules, written out with the identity where it has LeakyReLU(True)
        enc = m.label_transformation
        pose = enc[4](enc[2](enc[1](enc[0](label))))
        gp = m.Gaussian_Predictor
        return pose, gp[6](torch.nn.Sequential(*list(gp)[:5])(torch.cat([feat, pose], 1)))

    for path, is_lab in ((lab, True), (bare, True), (ours, False)):
        ckpt = load_checkpoint(str(path))
        m = build_model(model_args(ckpt)).eval()
        m.load_state_dict(ckpt["model"])
        with torch.no_grad():
            pose, params = lab_code(m)
            got_pose = m.label_transformation(label)
            got = torch.cat(m.Gaussian_Predictor(feat, got_pose)[1:], 1)
        same = torch.allclose(got_pose, pose, atol=1e-6) and torch.allclose(got, params, atol=1e-6)
        assert same == is_lab, path.name
        if prior == "learned":
            assert m.prior[5].negative_slope == (1.0 if is_lab else 0.01)


def test_trainer_keeps_a_lab_checkpoints_activation(run, tmp_path):
    dr, _ = run
    lab = tmp_path / "lab.ckpt"
    torch.save({"state_dict": VAE_Model(16, 8, 4, 16).state_dict()}, lab)
    save = tmp_path / "from_lab"
    assert Trainer.main(["--DR", str(dr), "--save_root", str(save), "--ckpt_path", str(lab), "--num_epoch", "1",
                         "--batch_size", "2", "--val_vi_len", "20", "--train_vi_len", "4", "--partial", "0.25",
                         *TINY]) == 0
    ckpt = torch.load(save / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["args"]["lab_activation"] is True
    loaded, _, _ = Tester.load_model(str(save / "last.ckpt"),
                                  Tester.tester_parser().parse_args(["--ckpt_path", str(save / "last.ckpt")]))
    assert loaded.label_transformation[3].negative_slope == 1.0


def test_the_labs_tester_command_line_runs(run, tmp_path, capsys):
    """The lab's Tester takes the Trainer's flags and --no_sanity, --test, --make_gif; each was an
    'unrecognized arguments' error."""
    dr, save = run
    out = tmp_path / "lab_cmd"
    lab = ["--batch_size", "2", "--lr", "0.001", "--optim", "Adam", "--gpu", "1", "--no_sanity", "--test",
           "--make_gif", "--num_workers", "4", "--num_epoch", "70", "--per_save", "3", "--partial", "1.0",
           "--train_vi_len", "16", "--val_vi_len", "630", "--frame_H", "32", "--frame_W", "64", "--F_dim", "16",
           "--L_dim", "8", "--N_dim", "4", "--D_out_dim", "16", "--tfr", "1.0", "--tfr_sde", "10", "--tfr_d_step",
           "0.1", "--fast_train", "--fast_partial", "0.4", "--fast_train_epoch", "5", "--kl_anneal_type",
           "Cyclical", "--kl_anneal_cycle", "10", "--kl_anneal_ratio", "1"]
    assert Tester.main(["--DR", str(dr), "--save_root", str(out), "--ckpt_path", str(save / "best.ckpt"),
                        "--test_len", "20", "--device", "cpu", *lab]) == 0
    assert (out / "submission.csv").is_file() and (out / "pred_seq0.gif").is_file()
    assert "--gpu" not in capsys.readouterr().out  # the lab's own value: no note


def test_gpu_naming_a_card_is_noted(run, tmp_path, capsys):
    """--gpu is the lab's flag and picks nothing here: --gpu 3 ran on the default device silently."""
    dr, save = run
    assert Tester.main(["--DR", str(dr), "--save_root", str(tmp_path / "t"), "--ckpt_path", str(save / "best.ckpt"),
                        "--test_len", "20", "--device", "cpu", "--no_gif", "--gpu", "3"]) == 0
    assert "note: --gpu 3 takes no effect (accepted for the lab's scripts); this runs on cpu: pick a card with " \
           "--device cuda:N" in capsys.readouterr().out
    assert Trainer.main(["--DR", str(dr), "--save_root", str(tmp_path / "r"), "--F_dim", "16", "--L_dim", "8",
                         "--N_dim", "4", "--D_out_dim", "16", "--train_vi_len", "4", "--partial", "0.25",
                         "--val_vi_len", "10", "--num_epoch", "1", "--device", "cpu", "--gpu", "0"]) == 0
    assert "note: --gpu 0 takes no effect" in capsys.readouterr().out


def test_tester_notes_model_flags_the_checkpoint_contradicts(run, tmp_path, capsys):
    """The Tester rebuilds the model from the checkpoint: model flags were taken silently and listed
    in --help as if they chose the model."""
    dr, save = run
    common = ["--DR", str(dr), "--ckpt_path", str(save / "best.ckpt"), "--test_len", "20", "--device", "cpu",
              "--no_gif"]
    assert Tester.main([*common, "--save_root", str(tmp_path / "a"), "--F_dim", "64", "--residual",
                        "--L_dim", "8"]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: --")]
    assert notes == ["note: --F_dim 64 takes no effect: the model is rebuilt from the checkpoint (--F_dim 16)",
                     "note: --residual True takes no effect: the model is rebuilt from the checkpoint "
                     "(--residual False)"]
    assert (tmp_path / "a" / "submission.csv").read_bytes() == \
        (Tester.main([*common, "--save_root", str(tmp_path / "b")]) == 0 and
         (tmp_path / "b" / "submission.csv").read_bytes())
    shown = Tester.tester_parser().format_help()
    assert "--F_dim" not in shown and "--pose_flow" not in shown and "--frame_H" in shown


def test_tester_on_frames_too_small_for_ssim(run, tmp_path, capsys):
    """At 8 x 16 the Tester ended in a traceback (SSIM's 11 x 11 window does not fit) after
    generating everything, and wrote no results.json."""
    dr, save = run
    out = tmp_path / "small"
    assert Tester.main(["--ckpt_path", str(save / "best.ckpt"), "--DR", str(dr), "--save_root", str(out),
                        "--test_len", "20", "--no_gif", "--device", "cpu", "--frame_H", "8", "--frame_W", "16"]) == 0
    shown = capsys.readouterr().out
    assert "SSIM needs frames of at least 11 x 11 pixels" in shown
    # The CSV is not the course's shape, and says so (the frames-of-32x64 tests above have no such note).
    assert ("note: submission.csv will hold frames of 3 x 8 x 16 values; the course's Kaggle format is 3 x 32 x 64 "
            "(--frame_H 32 --frame_W 64)") in shown
    res = json.loads((out / "results.json").read_text())
    assert res["ssim"] is None and all(r["ssim"] is None for r in res["sequences"]) and res["psnr"] > 0
    assert len(_submission(out / "submission.csv")[1]) == 1 + 3 * 8 * 16


def test_trainer_test_flag_validates_only(run, capsys):
    dr, save = run
    before = sorted(os.listdir(save))
    assert Trainer.main(["--DR", str(dr), "--ckpt_path", str(save / "last.ckpt"), "--test", "--val_vi_len", "20",
                         "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "val PSNR" in out and "--store_visualization" not in out
    # The lab's flag with it: said to write nothing (it wrote nothing, silently).
    assert Trainer.main(["--DR", str(dr), "--ckpt_path", str(save / "last.ckpt"), "--test", "--val_vi_len", "20",
                         "--device", "cpu", "--store_visualization"]) == 0
    assert "note: --test writes nothing, so no --store_visualization GIF either" in capsys.readouterr().out
    assert sorted(os.listdir(save)) == before


def test_bench_json(capsys, monkeypatch):
    from scripts import bench
    real = bench.matmul_tflops  # the roofline's 4096 x 4096 matmul takes seconds on a CPU
    monkeypatch.setattr(bench, "matmul_tflops", lambda device, dtype: real(device, dtype, n=256))
    assert bench.main(["--device", "cpu", *TINY[:8], "--steps", "1", "--warmup", "1", "--gen_len", "4",
                       "--gen_seqs", "2", "--rounds", "2", "--train_vi_len", "4", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("device", "train_frames_per_s", "gen_frames_per_s", "eager_train_frames_per_s",
                "eager_gen_frames_per_s", "peak_mem_mb", "act_mem_mb_per_sample_frame",
                "eager_act_mem_mb_per_sample_frame", "matmul_peak_tflops"):
        assert key in res and (key == "device" or res[key] > 0), key
    assert len(res["train_speedup_rounds"]) == 2 and len(res["gen_speedup_rounds"]) == 2
    assert bench.main(["--device", "cpu", "--rounds", "0"]) == 2
    assert "--rounds must be at least 1" in capsys.readouterr().err


def test_bench_counts_the_flops_of_the_step_it_times():
    """The FLOP count was of a teacher-forced pass without checkpointing whatever --tf and
    --grad_ckpt said, so the TFLOP/s of those steps came out low."""
    from types import SimpleNamespace
    from scripts import bench
    from modules.runtime import Speed
    model = VAE_Model(16, 8, 4, 16)
    speed = Speed(torch.device("cpu"), False, False, False, False, True)
    flops = {(tf, ckpt): bench.flops_per_frame(model, speed, SimpleNamespace(
        train_vi_len=4, frame_H=32, frame_W=64, tf=tf, grad_ckpt=ckpt, warp_loss=0.0))
        for tf in ("on", "off") for ckpt in (False, True)}
    base = flops[("on", False)]
    assert flops[("off", False)] > base  # free-running encodes each prediction again
    assert flops[("on", True)] > 1.2 * base  # the recomputed forward pass


def test_bench_ctrl_c_is_one_line(capsys, monkeypatch):
    from scripts import bench

    def interrupted(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(bench, "build_model", interrupted)
    assert bench.main(["--device", "cpu"]) == 130
    assert capsys.readouterr().err == "error: interrupted; no figures (they are printed when every round is done)\n"


def test_bench_times_the_warp_loss(capsys, monkeypatch):
    """--warp_loss reaches every training pass the benchmark runs (the Trainer's loss; it was
    refused as an unknown flag), and is refused without --warp as the Trainer refuses it."""
    from scripts import bench
    from modules.model import VAE_Model
    seen, forward = [], VAE_Model.forward

    def spy(self, *a, **kw):
        seen.append(kw.get("warp_loss"))
        return forward(self, *a, **kw)
    monkeypatch.setattr(VAE_Model, "forward", spy)
    monkeypatch.setattr(bench, "matmul_tflops", lambda device, dtype: 1.0)
    flags = ["--device", "cpu", *TINY[:8], "--steps", "1", "--warmup", "1", "--gen_len", "4", "--gen_seqs", "2",
             "--train_vi_len", "4", "--json"]
    assert bench.main([*flags, "--residual", "--warp", "--warp_loss", "0.5"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["warp_loss"] == 0.5
    assert len(seen) >= 6 and set(seen) == {0.5}  # eager and fast steps, memory pass, FLOP count
    assert bench.main([*flags, "--warp_loss", "1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error: --warp_loss needs --warp" in err


@pytest.mark.parametrize("flags, message", [
    (["--batch_size", "0"], "--batch_size must be at least 1, got 0"),
    (["--batch_size", "-1"], "--batch_size must be at least 1, got -1"),
    (["--train_vi_len", "1"], "--train_vi_len must be at least 2, got 1"),
    (["--warmup", "-1"], "--warmup must be at least 0, got -1"),  # ran as 0
])
def test_bench_sizes_out_of_range(capsys, flags, message):
    """Refused with one line before any work (were a ZeroDivisionError or a tensor error traceback)."""
    from scripts import bench
    assert bench.main(["--device", "cpu", *TINY[:8], "--steps", "1", "--warmup", "0", "--gen_len", "4",
                       "--skip_eager", *flags]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"error: {message}" in err


def test_bench_out_of_memory_names_the_fix(capsys, monkeypatch):
    from scripts import bench

    def hungry(*a, **kw):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.81 GiB")
    monkeypatch.setattr(bench, "time_training", hungry)
    assert bench.main(["--device", "cpu", *TINY[:8], "--batch_size", "128", "--skip_eager"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "error: out of memory at batch 128 x 16 frames on cpu: add --grad_ckpt" in err and "2.81 GiB" in err


def test_default_dataset_made_on_first_use_and_after_an_interrupted_generation(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import scripts.make_dance_data as gen
    from modules.distributed import Dist
    calls = []
    monkeypatch.setattr(gen, "make_dataset", lambda out, **kw: calls.append((out, kw)))
    monkeypatch.chdir(tmp_path)
    args = SimpleNamespace(DR=Trainer.DEFAULT_DR)
    Trainer.ensure_dataset(args, Dist())  # nothing there: generated
    assert calls == [(Trainer.DEFAULT_DR, {"overwrite": False})]
    os.makedirs(Trainer.DEFAULT_DR)
    Trainer.ensure_dataset(args, Dist())  # a dataset (e.g. the lab's real one) is there: used as is
    assert len(calls) == 1
    open(os.path.join(Trainer.DEFAULT_DR, gen.PARTIAL), "w").close()
    Trainer.ensure_dataset(args, Dist())  # a generation cut short: made again
    assert calls[-1] == (Trainer.DEFAULT_DR, {"overwrite": True})
    Trainer.ensure_dataset(SimpleNamespace(DR="elsewhere"), Dist())  # never for a user's --DR
    assert len(calls) == 2


def test_trainer_takes_the_fast_path_and_its_flags(tiny_dance, tmp_path, monkeypatch):
    """The Trainer trains on the fast path by default, on the plain one with --plain, and passes
    --grad_ckpt on: nothing showed that none of them is dropped on the way to the model."""
    seen, real = [], VAE_Model.forward

    def spy(self, *a, **kw):
        seen.append((kw.get("fast"), kw.get("grad_ckpt")))
        return real(self, *a, **kw)

    monkeypatch.setattr(VAE_Model, "forward", spy)
    base = ["--DR", str(tiny_dance), "--num_epoch", "1", "--batch_size", "2", "--train_vi_len", "4",
            "--partial", "0.25", "--val_vi_len", "20", *TINY]
    for name, extra, want in (("fast", [], (True, False)), ("plain", ["--plain"], (False, False)),
                              ("ckpt", ["--grad_ckpt"], (True, True))):
        seen.clear()
        assert Trainer.main([*base, *extra, "--save_root", str(tmp_path / name)]) == 0
        assert seen and set(seen) == {want}, name


def test_validation_in_batches_scores_as_one_at_a_time(tiny_dance):
    """Each validation sequence keeps its own noise whichever batch it is generated in."""
    from types import SimpleNamespace

    from dataloader import TrainWindows
    from modules.engine import validate
    from modules.options import trainer_parser
    from modules.runtime import resolve_speed
    val = TrainWindows(tiny_dance, video_len=5, split="val")  # 4 sequences of 5 frames
    assert len(val) == 4
    torch.manual_seed(0)
    model = jitter(VAE_Model(16, 8, 4, 16)).eval()  # a decoder that reads z
    speed = resolve_speed(trainer_parser().parse_args(["--device", "cpu", "--plain"]))
    one = validate(model, val, SimpleNamespace(seed=0), speed, max_batch=1)
    three = validate(model, val, SimpleNamespace(seed=0), speed, max_batch=3)
    assert one["psnr_per_frame"] == pytest.approx(three["psnr_per_frame"], rel=1e-5)
    assert one["psnr"] == pytest.approx(three["psnr"], rel=1e-5)
    other = validate(model, val, SimpleNamespace(seed=1), speed, max_batch=3)  # the noise matters
    assert other["psnr_per_frame"] != pytest.approx(three["psnr_per_frame"], rel=1e-5)


def _gif_frames(path, fps=20):
    """(size, one array per video frame). Pillow writes a run of identical frames (a pose held
    still) as one frame shown that much longer: it is counted as many times."""
    from PIL import Image, ImageSequence
    frames = []
    with Image.open(path) as gif:
        for f in ImageSequence.Iterator(gif):
            frames += [np.asarray(f.convert("RGB")).astype(int)] * round(f.info["duration"] * fps / 1000)
        return gif.size, frames


def test_tester_gifs_and_strips_show_each_sequence(run, tmp_path):
    """pred_seq{k}.gif is sequence k's submitted video and pose_seq{k}.gif its poses, one GIF frame
    per frame, enlarged twice (nearest); strip_seq{k}.png shows rows pose, truth, predicted (top
    to bottom) at frames 0, 3, 5, 8, 11, 14, 16, 19 of 20 (8 evenly spaced, rounded), each tile the
    frame enlarged twice. The GIF's palette moves colours a little: compared on average."""
    dr, save = run
    out = tmp_path / "o"
    assert Tester.main(["--ckpt_path", str(save / "best.ckpt"), "--DR", str(dr), "--save_root", str(out),
                        "--test_len", "20", "--device", "cpu"]) == 0
    rows = _submission(out / "submission.csv")[1:]
    seqs = TestSequences(dr, 32, 64, test_len=20)
    shown = [0, 3, 5, 8, 11, 14, 16, 19]
    for k in range(2):
        pred = np.array([[int(v) for v in r[1:]] for r in rows[20 * k:20 * (k + 1)]]).reshape(20, 3, 32, 64)
        videos = {"pose": seqs[k]["labels"].numpy(), "truth": seqs[k]["gt"].numpy(), "predicted": pred}
        for name, kind in (("pred", "predicted"), ("pose", "pose")):
            size, frames = _gif_frames(out / f"{name}_seq{k}.gif")
            assert size == (128, 64) and len(frames) == 20, name
            for t, f in enumerate(frames):
                assert (f[::2, ::2] == f[1::2, 1::2]).all()  # each pixel a 2 x 2 block
                assert np.abs(f[::2, ::2] - videos[kind][t].transpose(1, 2, 0)).mean() < 2, (name, k, t)
        from PIL import Image
        with Image.open(out / f"strip_seq{k}.png") as im:
            strip = np.asarray(im.convert("RGB")).astype(int)
        for r, kind in enumerate(("pose", "truth", "predicted")):
            for c, t in enumerate(shown):
                tile = strip[14 + r * 66:14 + r * 66 + 64, 70 + c * 130:70 + c * 130 + 128]
                assert (tile[::2, ::2] == videos[kind][t].transpose(1, 2, 0)).all(), (k, kind, t)


def test_strip_frames_are_evenly_spaced_and_rounded(tmp_path):
    """save_strip alone: 8 of 20 frames, 0 .. 19 evenly spaced and rounded to the nearest (0, 2.71,
    5.43, ... 19 -> 0, 3, 5, 8, 11, 14, 16, 19), values round(x * 255) as in submission.csv."""
    from PIL import Image
    from modules.visualize import save_strip
    video = ((torch.arange(20).float() + 0.6) / 255).view(20, 1, 1, 1).expand(20, 3, 4, 8)  # rounds to t + 1
    save_strip({"only": video}, tmp_path / "s.png")
    with Image.open(tmp_path / "s.png") as im:
        strip = np.asarray(im.convert("RGB")).astype(int)
    assert strip.shape == (14 + 8 + 2, 70 + 8 * (16 + 2), 3)
    assert [strip[14, 70 + c * 18, 0] for c in range(8)] == [1, 4, 6, 9, 12, 15, 17, 20]


def test_psnr_figure_numbers_the_frames_from_one():
    """A curve holds frames 1..L-1 (frame 0 is given): the plot's x values are 1.. and the legend
    shows the average."""
    from modules.visualize import psnr_figure
    (ax,) = psnr_figure({"seq 0": [10.0, 20.0, 33.0]}).axes
    (line,) = ax.lines
    assert list(line.get_xdata()) == [1, 2, 3] and list(line.get_ydata()) == [10.0, 20.0, 33.0]
    assert line.get_label() == "seq 0 (avg 21.00 dB)"


def test_tester_scores_per_frame_and_copy_first(run, tmp_path):
    """results.json with --num_samples 3: psnr_per_frame is the per-frame PSNR averaged over the 3
    samples, so its mean is the sequence's psnr (sample 0's curve was taken); copy_first_psnr is
    10 log10(1 / MSE) of the given first frame against each true frame 1..19, averaged, computed
    here from the PNGs."""
    dr, save = run
    out = tmp_path / "o"
    assert Tester.main(["--ckpt_path", str(save / "best.ckpt"), "--DR", str(dr), "--save_root", str(out),
                        "--test_len", "20", "--device", "cpu", "--no_gif", "--num_samples", "3"]) == 0
    res = json.loads((out / "results.json").read_text())
    seqs = TestSequences(dr, 32, 64, test_len=20)
    for k, row in enumerate(res["sequences"]):
        assert len(row["psnr_per_frame"]) == 19
        assert np.mean(row["psnr_per_frame"]) == pytest.approx(row["psnr"], abs=1e-5)
        gt = seqs[k]["gt"].numpy().astype(np.float64) / 255
        copy = [10 * np.log10(1 / np.mean((gt[0] - gt[t]) ** 2)) for t in range(1, 20)]
        assert row["copy_first_per_frame"] == pytest.approx(copy, abs=1e-4)
        assert row["copy_first_psnr"] == pytest.approx(np.mean(copy), abs=1e-4)
    assert res["copy_first_psnr"] == pytest.approx(np.mean([r["copy_first_psnr"] for r in res["sequences"]]))
