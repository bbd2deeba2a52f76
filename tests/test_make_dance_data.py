import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import dataloader
from scripts import make_dance_data as mdd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _png(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _names(folder):
    return sorted(os.listdir(folder), key=dataloader.frame_number)


def test_layout_counts_and_sizes(tiny_dance):
    r = tiny_dance
    assert mdd.dataset_ready(r) and not (r / mdd.PARTIAL).exists()
    for split in ("train", "val"):
        imgs = _names(r / split / f"{split}_img")
        assert imgs == _names(r / split / f"{split}_label")
        assert imgs == [f"frame{i}.png" for i in range(len(imgs))]
    assert len(os.listdir(r / "train" / "train_img")) == 96
    assert len(os.listdir(r / "val" / "val_img")) == 20
    for split, n in (("test", 2), ("test_unseen", 1)):
        for k in range(n):
            assert os.listdir(r / split / "test_img" / str(k)) == ["frame0.png"]
            labels = _names(r / split / "test_label" / str(k))
            assert labels == [f"frame{i}.png" for i in range(20)]
            assert labels == _names(r / split / "test_gt" / str(k))
            first = (r / split / "test_img" / str(k) / "frame0.png").read_bytes()
            assert first == (r / split / "test_gt" / str(k) / "frame0.png").read_bytes()
    assert not (r / "test" / "test_img" / "2").exists()
    with Image.open(r / "train" / "train_img" / "frame5.png") as im:
        assert im.size == (64, 32) and im.mode == "RGB"
    meta = json.loads((r / mdd.MARKER).read_text())
    assert meta["args"]["train_frames"] == 96 and meta["splits"]["train"]["videos"] == 3


def test_windows_never_cross_videos(tiny_dance):
    manifest = json.loads((tiny_dance / "train" / "videos.json").read_text())
    lengths = manifest["video_lengths"]
    assert lengths == [32, 32, 32] and manifest["window"] == 16
    assert manifest["dancer_ids"] == [0, 1, 0]
    ds = dataloader.TrainWindows(tiny_dance, video_len=16, cache=False)
    ends = np.cumsum(lengths)
    for s in ds.starts.tolist():
        video = np.searchsorted(ends, s, side="right")
        assert s + 16 <= ends[video]
    # The manifest matches the pictures: the background jumps between videos, not inside one.
    f = ds.frames.float()
    diff = (f[1:] - f[:-1]).abs().mean((1, 2, 3))
    boundary = ends[:-1] - 1
    inside = np.setdiff1d(np.arange(len(diff)), boundary)
    assert diff[boundary].min() > 3 * diff[inside].max()


def test_frames_move_like_video(tiny_dance):
    frames = np.stack([_png(tiny_dance / "val" / "val_img" / f"frame{i}.png") for i in range(20)])
    diff = np.abs(np.diff(frames.astype(float), axis=0)).mean((1, 2, 3))
    assert (diff > 0).all()  # the dancer moves every frame
    assert diff.max() < 8  # but only a little, as at 30 fps (values 0..255)


def test_labels_are_coloured_skeletons(tiny_dance):
    label = _png(tiny_dance / "train" / "train_label" / "frame0.png").astype(int)
    lit = label.max(-1) > 60
    assert 0.01 < lit.mean() < 0.4  # a skeleton, not an empty or full frame
    r, g, b = (label[..., i][lit] for i in range(3))
    assert ((r > g + 40) & (r > b + 40)).sum() > 3  # warm limbs: the dancer's right side
    assert ((b > r + 40) | (g > r + 40)).sum() > 3  # cool limbs: the left side
    assert (label[~lit].max() if (~lit).any() else 0) <= 60  # on black


def test_bone_colours_tell_left_from_right():
    hue = {}
    for a, b, c in mdd.BONES:
        names = mdd.KEYPOINTS[a] + mdd.KEYPOINTS[b]
        side = "r" if "r_" in names else "l" if "l_" in names else "c"
        hue.setdefault(side, set()).add(c)
    assert not hue["r"] & hue["l"]


def test_deterministic_and_independent_of_workers(tmp_path, monkeypatch):
    small = dict(train_frames=32, val_frames=6, test_seqs=1, test_len=6, height=32, width=64,
                 unseen_seqs=0, progress=False)
    mdd.make_dataset(tmp_path / "a", workers=1, **small)
    monkeypatch.setattr(mdd, "SERIAL_BELOW", 0)  # force the process pool
    mdd.make_dataset(tmp_path / "b", workers=2, **small)
    mdd.make_dataset(tmp_path / "c", seed=1, workers=1, **small)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert len(files) == 2 * 32 + 2 * 6 + 1 + 2 * 6
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert any((tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes()
               for f in files)


def test_tiny_dataset_is_fast(tmp_path):
    import time
    t = time.perf_counter()
    mdd.make_dataset(tmp_path / "t", train_frames=64, val_frames=20, test_seqs=2, test_len=20,
                     height=32, width=64, progress=False)
    assert time.perf_counter() - t < 2.0


def test_train_frames_round_down_to_windows(tmp_path):
    mdd.make_dataset(tmp_path / "d", train_frames=40, val_frames=4, test_seqs=0, test_len=4,
                     height=32, width=64, window=8, train_videos=2, unseen_seqs=0,
                     progress=False)
    manifest = json.loads((tmp_path / "d" / "train" / "videos.json").read_text())
    assert manifest["video_lengths"] == [24, 16]
    assert len(os.listdir(tmp_path / "d" / "train" / "train_img")) == 40


def test_difficulty_flags(tmp_path):
    still = dict(train_frames=16, val_frames=4, test_seqs=0, test_len=4, height=32, width=64,
                 unseen_seqs=0, progress=False, motion=0.0, travel=0.0, turns=0.0,
                 background="plain")
    mdd.make_dataset(tmp_path / "s", **still)
    frames = [_png(tmp_path / "s" / "val" / "val_img" / f"frame{i}.png") for i in range(4)]
    # no motion, no travel, no turns: the dancer stands still
    assert np.abs(frames[0].astype(int) - frames[3]).mean() < 1.0


def test_main_errors_are_one_line(tmp_path, capsys):
    assert mdd.main(["--out", str(tmp_path / "x"), "--height", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--height" in err and "\n" not in err
    assert mdd.main([]) == 2
    capsys.readouterr()


def test_test_len_below_2_is_refused(tmp_path, capsys):
    """--test_len 1 was accepted, and wrote test sequences the Tester refuses (it needs 2)."""
    for bad in ("1", "0"):
        assert mdd.main(["--out", str(tmp_path / "x"), "--train_frames", "16", "--val_frames", "4", "--test_seqs",
                         "1", "--test_len", bad, "--height", "32", "--width", "64", "--unseen_seqs", "0",
                         "--quiet"]) == 2
        assert capsys.readouterr().err == \
            f"error: --test_len must be at least 2 (the Tester predicts frames 1.. from frame 0), got {bad}\n"
    assert not (tmp_path / "x").exists()


def test_main_refuses_to_overwrite(tmp_path, capsys):
    args = ["--out", str(tmp_path / "o"), "--train_frames", "16", "--val_frames", "4",
            "--test_seqs", "1", "--test_len", "4", "--height", "32", "--width", "64",
            "--unseen_seqs", "0", "--quiet"]
    assert mdd.main(args) == 0
    assert mdd.main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert mdd.main(args + ["--overwrite"]) == 0
    # a folder this script did not write is never deleted, even with --overwrite
    foreign = tmp_path / "lab"
    (foreign / "train" / "train_img").mkdir(parents=True)
    (foreign / "train" / "train_img" / "frame0.png").write_bytes(b"x")
    args[1] = str(foreign)
    assert mdd.main(args) == 2
    err = capsys.readouterr().err  # --overwrite would not help, so it is not suggested
    assert "did not write" in err and "--overwrite" not in err
    assert mdd.main(args + ["--overwrite"]) == 2
    assert "did not write" in capsys.readouterr().err
    assert (foreign / "train" / "train_img" / "frame0.png").exists()


def test_ctrl_c_is_one_line_naming_the_fix(tmp_path, monkeypatch, capsys):
    """Ctrl-C mid-render (was a KeyboardInterrupt traceback): one line, exit 130, and the command
    that writes the dataset again."""
    args = ["--out", str(tmp_path / "o"), "--train_frames", "16", "--val_frames", "4", "--test_seqs", "1",
            "--test_len", "4", "--height", "32", "--width", "64", "--unseen_seqs", "0", "--quiet"]
    real = mdd._render_chunk
    calls = []

    def interrupted(task):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(mdd, "_render_chunk", interrupted)
    assert mdd.main(args) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1
    assert err.startswith(f"error: interrupted; {tmp_path / 'o'} is incomplete") and "--overwrite" in err
    monkeypatch.undo()
    assert mdd.main(args + ["--overwrite"]) == 0 and mdd.dataset_ready(tmp_path / "o")


def test_interrupted_overwrite_leaves_a_dataset_marked_incomplete(tmp_path, monkeypatch, capsys):
    """--overwrite deleted the old splits before marking the folder incomplete: a Ctrl-C during the
    deletion left dataset.json beside half the splits, a dataset every reader took as whole."""
    args = ["--out", str(tmp_path / "o"), "--train_frames", "16", "--val_frames", "4", "--test_seqs", "1",
            "--test_len", "4", "--height", "32", "--width", "64", "--unseen_seqs", "0", "--quiet"]
    assert mdd.main(args) == 0
    real, calls = mdd.shutil.rmtree, []

    def interrupted(path, *a, **kw):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(path, *a, **kw)

    monkeypatch.setattr(mdd.shutil, "rmtree", interrupted)
    assert mdd.main(args + ["--overwrite"]) == 130
    assert len(calls) == 2 and not mdd.dataset_ready(tmp_path / "o")
    assert "is incomplete: run the same command with --overwrite" in capsys.readouterr().err
    with pytest.raises(dataloader.DataError, match="incomplete"):
        dataloader.TrainWindows(tmp_path / "o", video_len=4)
    monkeypatch.undo()
    assert mdd.main(args + ["--overwrite"]) == 0 and mdd.dataset_ready(tmp_path / "o")


@pytest.mark.parametrize("flags, message", [
    (["--seed", "-1"], "--seed must be in 0 .. 2**32 - 1"),  # numpy's SeedSequence raised a traceback
    (["--seed", str(2 ** 32)], "--seed must be in 0 .. 2**32 - 1"),  # another seed's dancers
    (["--height", "100000"], "--height and --width must be in 16 .. 4096"),  # a MemoryError traceback
    (["--val_frames", "1"], "--val_frames must be at least 2 (a validation sequence is 2 frames or more)"),
    (["--workers", "0"], "--workers must be at least 1 (without it: one per core), got 0"),  # ran on all cores
])
def test_flags_out_of_range_are_refused_and_write_nothing(tmp_path, capsys, flags, message):
    argv = ["--out", str(tmp_path / "x"), "--preview", str(tmp_path / "p.png"), "--quiet", *flags]
    assert mdd.main(argv) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert os.listdir(tmp_path) == []  # neither the dataset nor the preview


def test_a_refused_dataset_writes_no_preview(tmp_path, capsys):
    args = ["--out", str(tmp_path / "o"), "--train_frames", "16", "--val_frames", "4", "--test_seqs", "1",
            "--test_len", "4", "--height", "32", "--width", "64", "--unseen_seqs", "0", "--quiet"]
    assert mdd.main(args) == 0
    assert mdd.main(args + ["--preview", str(tmp_path / "p.png")]) == 2  # holds a dataset: no --overwrite
    assert "already holds a dataset" in capsys.readouterr().err and not (tmp_path / "p.png").exists()


def test_ctrl_c_with_worker_processes_is_one_line(tmp_path):
    """Ctrl-C reaches the whole process group: each rendering worker printed its own traceback
    before the one line (the in-process test above has no workers)."""
    out = tmp_path / "o"
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "make_dance_data.py"), "--out", str(out),
           "--train_frames", "8000", "--val_frames", "20", "--test_seqs", "1", "--test_len", "20",
           "--height", "32", "--width", "64", "--unseen_seqs", "0", "--workers", "2", "--quiet"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 60
    while not list(out.glob("train/train_img/*.png")) and time.time() < deadline:
        time.sleep(0.1)  # a worker is rendering
    time.sleep(0.5)  # and the other one too, or importing its modules
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.count("\n") == 1 and err.startswith("error: interrupted;") and "Traceback" not in err, err


def test_preview(tmp_path, capsys):
    out = tmp_path / "strip.png"
    assert mdd.main(["--preview", str(out), "--height", "32", "--width", "64"]) == 0
    with Image.open(out) as im:
        assert im.size == (8 * 64, 2 * 32)


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failed_json_write_leaves_no_temporary_file(tmp_path, monkeypatch, error):
    """The JSON writer the generator, the Trainer and the Tester share: a write that fails (full
    disk, Ctrl-C) leaves the previous file and nothing else (the generator's own writer left its
    temporary file)."""
    from modules.files import write_json
    path = tmp_path / "videos.json"
    write_json(str(path), {"a": 1})

    def half(obj, f, **kw):
        f.write('{"b": ')
        raise error

    monkeypatch.setattr(json, "dump", half)
    with pytest.raises(type(error)):
        write_json(str(path), {"b": 2})
    assert os.listdir(tmp_path) == ["videos.json"] and json.loads(path.read_text()) == {"a": 1}


def test_output_that_cannot_be_written_is_one_line(tmp_path, capsys):
    """--out naming a file printed the bare OSError ("[Errno 17] File exists: ...")."""
    taken = tmp_path / "afile"
    taken.write_text("x")
    assert mdd.main(["--out", str(taken / "sub"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write {taken}") and "choose another --out" in err
    assert err.count("\n") == 1


def test_no_test_sequences_is_refused(tmp_path, capsys):
    """--test_seqs 0 wrote a dataset the Tester cannot use (test not found)."""
    assert mdd.main(["--out", str(tmp_path / "d"), "--test_seqs", "0", "--quiet"]) == 2
    assert "--test_seqs must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_long_test_sequences_and_what_dataset_json_records(tmp_path):
    """A test sequence longer than a rendering chunk (32 frames here) is rendered in several
    chunks: test_img/k still holds its first frame only (the chunk starting at frame 32 wrote
    frame32.png there too). dataset.json and val/videos.json record the splits as written: the
    Trainer reads the test length from it, which must not be the validation length."""
    out = tmp_path / "d"
    mdd.make_dataset(out, train_frames=32, val_frames=6, test_seqs=1, test_len=70, height=32, width=64,
                     train_videos=2, unseen_seqs=1, workers=1, progress=False)
    for split in ("test", "test_unseen"):
        assert os.listdir(out / split / "test_img" / "0") == ["frame0.png"], split
        assert _names(out / split / "test_label" / "0") == [f"frame{i}.png" for i in range(70)]
        assert (out / split / "test_img" / "0" / "frame0.png").read_bytes() == \
            (out / split / "test_gt" / "0" / "frame0.png").read_bytes()
    meta = json.loads((out / mdd.MARKER).read_text())
    assert meta["splits"] == {"train": {"frames": 32, "videos": 2}, "val": {"frames": 6, "videos": 1},
                              "test": {"sequences": 1, "length": 70, "dancer_ids": [0]},
                              "test_unseen": {"sequences": 1, "length": 70}}
    assert meta["args"]["test_len"] == 70 and meta["args"]["val_frames"] == 6
    val = json.loads((out / "val" / "videos.json").read_text())
    assert val["video_lengths"] == [6] and val["dancer_ids"] == [0]  # the validation video is dancer 0's
    import Trainer
    assert Trainer.generated_test_len(str(out)) == 70


def test_unseen_dancers_are_never_training_dancers():
    """test_unseen/ is for dancers never seen in training: none of its people is a training
    dancer (drawn from the same seed stream, they were the training dancers again), while
    test/ shows the training dancers."""
    videos, used = mdd.plan(seed=0, train_frames=64, val_frames=4, test_seqs=2, test_len=4, height=32, width=64,
                            dancers=2, train_videos=2, unseen_seqs=4, unseen_dancers=4)
    people = {split: [v["video"]["dancer"] for v in videos if v["split"] == split]
              for split in ("train", "val", "test", "test_unseen")}
    assert used == 2 and len(people["test_unseen"]) == 4
    assert not any(u == t for u in people["test_unseen"] for t in people["train"])
    assert all(t in people["train"] for t in people["test"] + people["val"])


def test_more_videos_than_windows_makes_one_video_per_window(tmp_path):
    """--train_videos above the number of windows (48 frames: 3 windows of 16, 5 videos asked)
    gives 3 videos of one window, not 5 with 2 empty ones in videos.json."""
    mdd.make_dataset(tmp_path / "d", train_frames=48, val_frames=4, test_seqs=0, test_len=4, height=32, width=64,
                     window=16, train_videos=5, unseen_seqs=0, progress=False)
    manifest = json.loads((tmp_path / "d" / "train" / "videos.json").read_text())
    assert manifest["video_lengths"] == [16, 16, 16] and len(manifest["dancer_ids"]) == 3
    assert json.loads((tmp_path / "d" / mdd.MARKER).read_text())["splits"]["train"] == {"frames": 48, "videos": 3}
