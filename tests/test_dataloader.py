import json
import os
import re
import shutil
import signal

import numpy as np
import pytest
import torch
from PIL import Image

import dataloader
from dataloader import DataError, TestSequences, TrainWindows


def _solid(path, value, size=(64, 32), mode="RGB"):
    Image.new(mode, size, value).save(path)


def _split(root, split, n, names=None, size=(64, 32)):
    """A split whose frame i is the solid grey i and whose label i is the grey 255 - i."""
    img, lab = root / split / f"{split}_img", root / split / f"{split}_label"
    img.mkdir(parents=True)
    lab.mkdir(parents=True)
    for i in range(n):
        name = names[i] if names else f"frame{i}.png"
        _solid(img / name, (i, i, i), size)
        _solid(lab / name, (255 - i,) * 3, size)
    return img, lab


def _test_split(root, lengths, gt=True):
    for k, n in enumerate(lengths):
        for sub in ("test_img", "test_label") + (("test_gt",) if gt else ()):
            (root / "test" / sub / str(k)).mkdir(parents=True)
        _solid(root / "test" / "test_img" / str(k) / "frame0.png", (k, k, k))
        for i in range(n):
            _solid(root / "test" / "test_label" / str(k) / f"frame{i}.png", (i, 0, 0))
            if gt:
                _solid(root / "test" / "test_gt" / str(k) / f"frame{i}.png", (0, i, 0))


# ----------------------------------------------------------------------------- names, order

def test_frame_number_and_separators():
    assert dataloader.frame_number("frame12.png") == 12
    assert dataloader.frame_number("DR/train/train_img/frame7.png") == 7
    assert dataloader.frame_number("DR\\train\\train_img\\frame7.png") == 7
    assert dataloader.frame_number("C:\\data\\v2\\frame0031.png") == 31
    with pytest.raises(DataError, match="cover.png"):
        dataloader.frame_number("DR/train/train_img/cover.png")


def test_frames_sorted_by_number(tmp_path):
    _split(tmp_path, "train", 12)
    names = dataloader.list_frames(tmp_path / "train" / "train_img")
    assert names[8:11] == ["frame8.png", "frame9.png", "frame10.png"]
    ds = TrainWindows(tmp_path, video_len=12, cache=False)
    assert ds.frames[:, 0, 0, 0].tolist() == list(range(12))
    assert ds.labels[:, 0, 0, 0].tolist() == [255 - i for i in range(12)]


def test_root_with_backslashes(tmp_path, monkeypatch):
    _split(tmp_path / "DR", "train", 4)
    monkeypatch.chdir(tmp_path)
    ds = TrainWindows("DR\\", video_len=4, cache=False)
    assert len(ds) == 1


def test_other_files_are_ignored(tmp_path):
    img, lab = _split(tmp_path, "train", 4)
    (img / "Thumbs.db").write_bytes(b"x")
    (img / ".DS_Store").write_bytes(b"x")
    (lab / "notes.txt").write_text("x")
    assert len(TrainWindows(tmp_path, video_len=4, cache=False)) == 1


# ----------------------------------------------------------------------------- windows

def test_windows_partial_and_items(tmp_path):
    _split(tmp_path, "train", 50)
    ds = TrainWindows(tmp_path, video_len=16, cache=False)
    assert ds.starts.tolist() == [0, 16, 32] and ds.starts.dtype == torch.int64
    img, label = ds[1]
    assert img.shape == (16, 3, 32, 64) and img.dtype == torch.uint8
    assert img[:, 0, 0, 0].tolist() == list(range(16, 32))
    assert label[:, 0, 0, 0].tolist() == [255 - i for i in range(16, 32)]
    assert len(TrainWindows(tmp_path, video_len=16, partial=0.4, cache=False)) == 1
    assert len(TrainWindows(tmp_path, video_len=16, partial=0.01, cache=False)) == 1
    assert len(ds.with_partial(0.7)) == 2 and ds.with_partial(0.7).frames is ds.frames
    with pytest.raises(DataError, match="partial"):
        TrainWindows(tmp_path, partial=0, cache=False)


def test_partial_keeps_the_first_windows(tmp_path):
    """--partial p keeps the FIRST fraction p of the training windows (the lab's partial), in
    order, in the dataset and in with_partial."""
    _split(tmp_path, "train", 80)  # 5 windows of 16, starting at frames 0, 16, 32, 48, 64
    ds = TrainWindows(tmp_path, video_len=16, partial=0.4, cache=False)
    assert ds.starts.tolist() == [0, 16]
    assert [ds[i][0][0, 0, 0, 0].item() for i in range(len(ds))] == [0, 16]
    assert ds[1][1][:, 0, 0, 0].tolist() == [255 - i for i in range(16, 32)]
    more = ds.with_partial(0.6)  # from all the windows, not from the 2 kept
    assert more.starts.tolist() == [0, 16, 32] and more[2][0][:, 0, 0, 0].tolist() == list(range(32, 48))
    assert ds.with_partial(0.2).starts.tolist() == [0]
    assert ds.with_partial(1.0).starts.tolist() == [0, 16, 32, 48, 64]
    assert ds.starts.tolist() == [0, 16]  # with_partial left the dataset as it was


def test_manifest_keeps_windows_inside_videos(tmp_path):
    _split(tmp_path, "train", 40)
    (tmp_path / "train" / "videos.json").write_text(json.dumps({"video_lengths": [20, 20]}))
    ds = TrainWindows(tmp_path, video_len=16, cache=False)
    assert ds.starts.tolist() == [0, 20]  # without the manifest: [0, 16]
    (tmp_path / "train" / "videos.json").write_text("[10, 10, 10]")
    with pytest.raises(DataError, match="videos.json lists 30 frames"):
        TrainWindows(tmp_path, video_len=16, cache=False)
    (tmp_path / "train" / "videos.json").write_text("{oops")
    with pytest.raises(DataError, match="videos.json"):
        TrainWindows(tmp_path, video_len=16, cache=False)


def test_windows_do_not_join_frames_across_a_gap_in_the_numbers(tmp_path):
    """Without a manifest the split was cut into windows in sorted order, so a missing pair
    (frame20 and its label deleted) put frames 19 and 21 side by side in one window."""
    _split(tmp_path, "train", 41, names=[f"frame{i}.png" for i in (*range(20), *range(21, 42))])
    ds = TrainWindows(tmp_path, video_len=16, cache=False)
    assert ds.video_lengths == [20, 21] and ds.starts.tolist() == [0, 20]  # [0, 16] joined 19 and 21
    assert ds[1][0][:, 0, 0, 0].tolist() == list(range(20, 36))  # files frame21 ... frame36


def test_generated_data_without_manifest_reads_like_lab_data(tiny_dance, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(tiny_dance, root)
    (root / "train" / "videos.json").unlink()
    ds = TrainWindows(root, video_len=16)
    assert len(ds) == 6 and ds.video_lengths == [96]


def test_val_and_too_few_frames(tiny_dance):
    val = TrainWindows(tiny_dance, split="val", video_len=20)
    assert len(val) == 1 and val[0][0].shape == (20, 3, 32, 64)
    with pytest.raises(DataError, match=r"val_img.*20 frames.*--val_vi_len"):
        TrainWindows(tiny_dance, split="val", video_len=630)
    with pytest.raises(DataError, match=r"longest video has 32 frames.*--train_vi_len"):
        TrainWindows(tiny_dance, video_len=40)


def test_test_sequences(tiny_dance):
    seqs = TestSequences(tiny_dance, test_len=20)
    assert len(seqs) == 2 and seqs.names == ["0", "1"]
    item = seqs[1]
    assert item["name"] == "1"
    assert item["first"].shape == (3, 32, 64) and item["first"].dtype == torch.uint8
    assert item["labels"].shape == (20, 3, 32, 64) and item["gt"].shape == (20, 3, 32, 64)
    assert torch.equal(item["first"], item["gt"][0])
    unseen = TestSequences(tiny_dance, test_len=20, split="test_unseen")
    assert len(unseen) == 1
    with pytest.raises(DataError, match=r"holds sequences of 20 pose labels but test_len is 630.*--test_len 20"):
        TestSequences(tiny_dance)


def test_test_sequences_order_and_missing_gt(tmp_path):
    _test_split(tmp_path, [3] * 11, gt=False)
    seqs = TestSequences(tmp_path, test_len=3, cache=False)
    assert seqs.names == [str(k) for k in range(11)]  # "10" after "9"
    assert seqs[10]["first"][0, 0, 0] == 10 and seqs[10]["gt"] is None
    assert seqs[0]["labels"][:, 0, 0, 0].tolist() == [0, 1, 2]


def test_test_sequence_mismatches(tmp_path):
    _test_split(tmp_path, [3, 3])
    shutil.rmtree(tmp_path / "test" / "test_label" / "1")
    with pytest.raises(DataError, match=r"test_img/1 has no matching .*test_label/1"):
        TestSequences(tmp_path, test_len=3, cache=False)
    (tmp_path / "test" / "test_label" / "1").mkdir()
    with pytest.raises(DataError, match=r"test_label/1 holds no pose labels"):
        TestSequences(tmp_path, test_len=3, cache=False)
    shutil.copytree(tmp_path / "test" / "test_label" / "0", tmp_path / "test" / "test_label" / "1",
                    dirs_exist_ok=True)
    (tmp_path / "test" / "test_gt" / "1" / "frame2.png").unlink()
    with pytest.raises(DataError, match=r"test_label/1/frame2.png has no frame"):
        TestSequences(tmp_path, test_len=3, cache=False)
    (tmp_path / "test" / "test_img" / "extra").mkdir()
    with pytest.raises(DataError, match=r"test_img/extra: sequence folders must be named"):
        TestSequences(tmp_path, test_len=3, cache=False)
    (tmp_path / "test" / "test_img" / "extra").rmdir()
    shutil.copytree(tmp_path / "test" / "test_img" / "1", tmp_path / "test" / "test_img" / "01")
    with pytest.raises(DataError, match=r"test_img/1 has the same sequence number as 01"):
        TestSequences(tmp_path, test_len=3, cache=False)


# ----------------------------------------------------------------------------- cache

def test_cache_hit_and_invalidation(tmp_path, monkeypatch):
    img, _ = _split(tmp_path, "train", 20)
    first = TrainWindows(tmp_path, video_len=4)
    cache = tmp_path / "train" / ".cache" / "train_img-32x64.pt"
    assert cache.exists()
    obj = torch.load(cache, weights_only=True)
    assert torch.equal(obj["frames"], first.frames)

    def no_decoding(*a, **k):
        raise AssertionError("decoded despite a valid cache")

    with monkeypatch.context() as m:
        m.setattr(dataloader, "read_images", no_decoding)
        again = TrainWindows(tmp_path, video_len=4)
    assert torch.equal(again.frames, first.frames) and torch.equal(again.labels, first.labels)

    # a changed file (new content and mtime) is read again
    _solid(img / "frame3.png", (200, 100, 50))
    st = os.stat(img / "frame3.png")
    os.utime(img / "frame3.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = TrainWindows(tmp_path, video_len=4)
    assert changed.frames[3, :, 0, 0].tolist() == [200, 100, 50]
    # another frame size is another cache file
    TrainWindows(tmp_path, frame_H=16, frame_W=32, video_len=4)
    assert (tmp_path / "train" / ".cache" / "train_img-16x32.pt").exists()


def _count_decoding(monkeypatch):
    """Patch read_images to count its calls (it still decodes)."""
    calls, real = [], dataloader.read_images

    def counted(paths, *a, **k):
        calls.append(len(paths))
        return real(paths, *a, **k)
    monkeypatch.setattr(dataloader, "read_images", counted)
    return calls


def test_cache_is_rebuilt_when_only_a_modification_time_changes(tmp_path, monkeypatch):
    """The fingerprint holds each file's size and mtime: a file touched (same bytes, new mtime) is
    decoded again, and so is a label."""
    img, lab = _split(tmp_path, "train", 8)
    TrainWindows(tmp_path, video_len=4)
    calls = _count_decoding(monkeypatch)
    TrainWindows(tmp_path, video_len=4)
    assert calls == []  # a valid cache: nothing decoded
    for path in (img / "frame3.png", lab / "frame5.png"):
        data = path.read_bytes()
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        assert path.read_bytes() == data and os.stat(path).st_size == st.st_size
        calls.clear()
        TrainWindows(tmp_path, video_len=4)
        assert calls == [8, 8], path  # frames and labels read again
        calls.clear()
        TrainWindows(tmp_path, video_len=4)
        assert calls == [], path  # and the cache written then is used


def test_cache_sees_a_same_size_rewrite(tmp_path):
    """A frame rewritten with other pixels but the same file size (a new mtime) is not read from
    the cache."""
    img, _ = _split(tmp_path, "train", 8)
    assert TrainWindows(tmp_path, video_len=4).frames[3, :, 0, 0].tolist() == [3, 3, 3]
    path = img / "frame3.png"
    st = os.stat(path)
    new = (img / "frame5.png").read_bytes()  # solid grey 5: a PNG of the same size as grey 3
    assert len(new) == st.st_size and new != path.read_bytes()
    path.write_bytes(new)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # whatever the file system's clock resolution
    assert TrainWindows(tmp_path, video_len=4).frames[3, :, 0, 0].tolist() == [5, 5, 5]


def test_corrupt_cache_is_ignored(tmp_path):
    _split(tmp_path, "train", 8)
    TrainWindows(tmp_path, video_len=4)
    cache = tmp_path / "train" / ".cache" / "train_img-32x64.pt"
    cache.write_bytes(b"not a torch file")
    assert TrainWindows(tmp_path, video_len=4).frames[5, 0, 0, 0] == 5


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt(),
                                   RuntimeError("open file failed with strerror: Permission denied")])
def test_failed_cache_write_leaves_nothing(tmp_path, monkeypatch, error):
    """A cache write that fails half-way (full disk, read-only dataset) is skipped; one that is
    interrupted (Ctrl-C) goes on as the interruption. Neither leaves a file in .cache."""
    _split(tmp_path, "train", 8)

    def half_written(obj, f):
        with open(f, "wb") as out:
            out.write(b"half")
        raise error

    monkeypatch.setattr(dataloader.torch, "save", half_written)
    if isinstance(error, (OSError, RuntimeError)):
        assert len(TrainWindows(tmp_path, video_len=4)) == 2
    else:
        with pytest.raises(KeyboardInterrupt):
            TrainWindows(tmp_path, video_len=4)
    assert not [p for p in (tmp_path / "train").rglob("*") if p.is_file() and ".cache" in p.parts]


def test_test_cache(tiny_dance, monkeypatch):
    a = TestSequences(tiny_dance, test_len=20)
    monkeypatch.setattr(dataloader, "read_images", None)  # any decoding would fail
    b = TestSequences(tiny_dance, test_len=20)
    assert all(torch.equal(x["labels"], y["labels"]) for x, y in zip(a, b))


# ----------------------------------------------------------------------------- image modes

def test_modes_and_sizes(tmp_path):
    d = tmp_path / "modes"
    d.mkdir()
    Image.new("L", (128, 64), 100).save(d / "grey.png")
    Image.new("LA", (64, 32), (100, 0)).save(d / "grey_alpha.png")  # fully transparent
    Image.new("RGBA", (256, 128), (10, 20, 30, 255)).save(d / "rgba.png")
    pal = Image.new("P", (64, 32), 1)
    pal.putpalette([0, 0, 0, 7, 8, 9] + [0] * 762)
    pal.save(d / "palette.png")
    Image.fromarray(np.full((40, 80), 65535, np.uint16)).save(d / "deep.png")  # 16-bit grey
    Image.new("RGB", (17, 9), (50, 60, 70)).save(d / "odd.jpg", quality=100)
    keyed = np.full((32, 64), 30583, np.uint16)
    keyed[0, 0] = 65535
    Image.fromarray(keyed).save(d / "deep_keyed.png", transparency=30583)  # 16-bit grey, a tRNS key
    expect = {"grey.png": (100,) * 3, "grey_alpha.png": (0, 0, 0), "rgba.png": (10, 20, 30),
              "palette.png": (7, 8, 9), "deep.png": (255,) * 3, "odd.jpg": (50, 60, 70),
              "deep_keyed.png": (0, 0, 0)}  # transparent pixels are black, as in every other mode
    for name, rgb in expect.items():
        a = dataloader.read_image(str(d / name), 32, 64)
        assert a.shape == (32, 64, 3) and a.dtype == np.uint8, name
        assert np.abs(a[16, 32].astype(int) - rgb).max() <= 2, (name, a[16, 32])


# ----------------------------------------------------------------------------- bad input

def test_missing_root_and_split(tmp_path):
    with pytest.raises(DataError, match=r"nowhere not found.*make_dance_data"):
        TrainWindows(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"train not found"):
        TrainWindows(tmp_path)
    (tmp_path / "train" / "train_img").mkdir(parents=True)
    with pytest.raises(DataError, match=r"train_img holds no frames"):
        TrainWindows(tmp_path)
    _solid(tmp_path / "train" / "train_img" / "frame0.png", (0, 0, 0))
    with pytest.raises(DataError, match=r"train_label not found"):
        TrainWindows(tmp_path)
    with pytest.raises(DataError, match=r"test not found"):
        TestSequences(tmp_path)


def test_a_broken_link_is_named(tmp_path):
    """A frame that is a link to a missing file was passed over: the pair vanished unsaid (its
    video split in two), or its label was said to have no frame, which was there."""
    img, lab = _split(tmp_path, "train", 6)
    for folder in (img, lab):
        (folder / "frame3.png").unlink()
        (folder / "frame3.png").symlink_to(tmp_path / "gone.png")
    with pytest.raises(DataError, match=r"train_img/frame3.png is a link to .*gone.png, which does not exist"):
        TrainWindows(tmp_path, video_len=2, cache=False)


def test_image_without_label_and_reverse(tmp_path):
    img, lab = _split(tmp_path, "train", 6)
    (lab / "frame4.png").unlink()
    with pytest.raises(DataError, match=r"train_img/frame4.png has no label .*train_label/frame4"):
        TrainWindows(tmp_path, video_len=2, cache=False)
    _solid(lab / "frame4.png", (0, 0, 0))
    _solid(lab / "frame9.png", (0, 0, 0))
    with pytest.raises(DataError, match=r"train_label/frame9.png has no frame"):
        TrainWindows(tmp_path, video_len=2, cache=False)


def test_unreadable_and_truncated_png(tmp_path):
    img, _ = _split(tmp_path, "train", 6)
    data = (img / "frame2.png").read_bytes()
    (img / "frame2.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cannot read .*train_img/frame2.png"):
        TrainWindows(tmp_path, video_len=2, cache=False)
    (img / "frame2.png").write_bytes(b"this is not an image")
    with pytest.raises(DataError, match=r"cannot read .*train_img/frame2.png .*remove it together with its label$"):
        TrainWindows(tmp_path, video_len=2, cache=False)


def test_unreadable_image_advice_fits_what_the_image_is(tmp_path):
    """A broken label was told to be removed 'together with its label', and a broken test frame to
    be removed, which breaks its sequence."""
    from dataloader import read_image
    for path, advice in ((tmp_path / "train" / "train_label" / "frame2.png", "together with its frame"),
                         (tmp_path / "val" / "val_img" / "frame2.png", "together with its label"),
                         (tmp_path / "test" / "test_label" / "3" / "frame2.png", "needs all of its frames"),
                         (tmp_path / "test" / "test_img" / "3" / "frame0.png", "needs all of its frames")):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"this is not an image")
        with pytest.raises(DataError, match=f"cannot read {re.escape(str(path))} .*; re-export the image.*{advice}"):
            read_image(str(path), 32, 64)


def test_truncated_png_in_worker_processes(tmp_path):
    paths = []
    for i in range(1100):
        p = tmp_path / f"frame{i}.png"
        paths.append(str(p))
    _solid(paths[0], (1, 2, 3), size=(8, 4))
    data = open(paths[0], "rb").read()
    for p in paths:
        with open(p, "wb") as f:
            f.write(data)
    with open(paths[1050], "wb") as f:
        f.write(data[:30])
    with pytest.raises(DataError, match=r"frame1050.png"):
        dataloader.read_images(paths, 4, 8, workers=2)


def test_name_without_number_and_duplicates(tmp_path):
    img, lab = _split(tmp_path, "train", 3)
    _solid(img / "cover.png", (0, 0, 0))
    with pytest.raises(DataError, match=r"train_img/cover.png: no frame number"):
        TrainWindows(tmp_path, video_len=2, cache=False)
    (img / "cover.png").unlink()
    _solid(img / "frame01.png", (0, 0, 0))
    with pytest.raises(DataError, match=r"frame1.png has the same frame number as frame01.png; rename or remove "
                                        r"one of them$"):
        TrainWindows(tmp_path, video_len=2, cache=False)
    (img / "frame01.png").unlink()
    # A file manager's duplicate of frame 2 was named a duplicate of frame 1 ("(1)"), or, with a
    # label of its own, read as frame 1000.
    assert [dataloader.frame_number(n) for n in ("frame2 (1).png", "frame2 copy.png", "frame2 copy 3.png",
                                                  "frame2 - Copy.png", "frame2 - Copy (4).png")] == [2] * 5
    for copy in ("frame2 (1).png", "frame2 (1000).png"):
        _solid(img / copy, (0, 0, 0))
        _solid(lab / copy, (0, 0, 0))
        with pytest.raises(DataError, match=r"frame2.png has the same frame number as frame2 \(1(000)?\).png; "
                                            r"rename or remove one of them \(frame2 \(1(000)?\).png looks like a "
                                            r"copy a file manager made\)"):
            TrainWindows(tmp_path, video_len=2, cache=False)
        (img / copy).unlink()
        (lab / copy).unlink()


def test_messages_are_one_line(tmp_path):
    with pytest.raises(DataError) as e:
        TrainWindows(tmp_path / "x\ny")
    assert "\n" not in str(e.value)


def test_num_workers_reaches_the_decoder(tiny_dance, tmp_path, monkeypatch):
    """--num_workers was read by nothing: decoding always used one process per core."""
    import Tester
    asked, real = [], dataloader.read_images

    def spy(paths, frame_H, frame_W, workers=None):
        asked.append(workers)
        return real(paths, frame_H, frame_W, workers)
    monkeypatch.setattr(dataloader, "read_images", spy)
    TrainWindows(tiny_dance, video_len=4, cache=False, workers=3)
    TestSequences(tiny_dance, test_len=20, cache=False, workers=2)
    assert asked == [3, 3, 2]
    from modules.model import VAE_Model
    ckpt = tmp_path / "m.ckpt"
    torch.save({"model": VAE_Model(16, 8, 4, 16).state_dict()}, ckpt)
    assert Tester.main(["--ckpt_path", str(ckpt), "--DR", str(tiny_dance), "--save_root", str(tmp_path / "t"),
                        "--test_len", "20", "--no_gif", "--no_cache", "--device", "cpu", "--num_workers", "1"]) == 0
    assert asked[3:] == [1]


def _copies(tmp_path, n):
    """n paths of one tiny PNG: enough (>= 1024) for read_images to use worker processes."""
    first = tmp_path / "frame0.png"
    _solid(first, (1, 2, 3), size=(8, 4))
    data = first.read_bytes()
    paths = [str(first)]
    for i in range(1, n):
        p = tmp_path / f"frame{i}.png"
        p.write_bytes(data)
        paths.append(str(p))
    return paths


def test_zero_workers_decode_in_this_process(tmp_path, monkeypatch):
    """--num_workers 0 (PyTorch's "in the main process") was refused; and read_images took 0 for
    "one per core"."""
    paths = _copies(tmp_path, 1030)

    def no_pool(*a, **kw):
        raise AssertionError("a worker pool was started")
    monkeypatch.setattr(dataloader.multiprocessing, "get_context", no_pool)
    out = dataloader.read_images(paths, 4, 8, workers=0)
    assert out.shape == (1030, 3, 4, 8) and (out[:, 0] == 1).all()


_DECODE = dataloader._decode_chunk


def _decode_if_sigint_ignored(job):
    """dataloader._decode_chunk, run in a worker (forked: it inherits the test's patch), that
    fails unless the worker ignores SIGINT."""
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        raise RuntimeError("worker does not ignore SIGINT")
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        raise RuntimeError("worker does not end on SIGTERM")
    return _DECODE(job)


def test_decoding_workers_ignore_ctrl_c(tmp_path, monkeypatch):
    """Ctrl-C reaches the workers too: each printed a traceback under the Trainer's one-line
    message. They ignore it; the parent stops them, with SIGTERM, which ends them at once."""
    paths = _copies(tmp_path, 1030)
    monkeypatch.setattr(dataloader, "_decode_chunk", _decode_if_sigint_ignored)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)  # as Trainer.py's, which workers inherit
    try:
        assert dataloader.read_images(paths, 4, 8, workers=2).shape == (1030, 3, 4, 8)
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_dataset_root_that_is_a_file(tmp_path):
    root = tmp_path / "DR"
    root.write_text("not a folder")
    with pytest.raises(DataError, match=r"dataset root .*DR is a file; point --DR at the folder"):
        TrainWindows(root, video_len=2, cache=False)


def test_frame_number_is_the_last_number_of_the_name():
    """The frame number is the last run of digits of the file name: a name that carries another
    number first (a video or take) was ordered, and matched, by that one."""
    assert dataloader.frame_number("dance2_frame12.png") == 12
    assert dataloader.frame_number("DR/train/train_img/take3-v2-frame0007.png") == 7
    assert dataloader.frame_number("C:\\clips\\7\\s01_frame10 (1).png") == 10


def test_downsizing_is_antialiased_bilinear(tmp_path):
    """Frames are shrunk as torchvision's Resize does on PIL images (bilinear, its filter widened
    by the scale factor), not by picking pixels. Halving columns striped 0,0,255,255 with the
    triangle filter of support 2 source pixels (weights 1/8, 3/8, 3/8, 1/8 on source columns
    2j-1 .. 2j+2) gives 255/4 ~ 64 for an even output column j and 255 * 3/4 ~ 191 for an odd one;
    picking pixels (nearest) or averaging pairs (box) gives 0 and 255."""
    a = np.zeros((64, 128, 3), np.uint8)
    a[:, np.arange(128) % 4 >= 2] = 255
    Image.fromarray(a).save(tmp_path / "frame0.png")
    out = dataloader.read_image(str(tmp_path / "frame0.png"), 32, 64).astype(int)
    inner = out[:, 1:-1]  # the edge columns have fewer taps
    assert np.abs(inner[:, 1::2] - 64).max() <= 1 and np.abs(inner[:, 0::2] - 191).max() <= 1


def test_manifest_with_a_negative_length_is_refused(tmp_path):
    """videos.json [-4, 44] sums to the split's 40 frames, and windows started at frame -4 (an
    empty slice of the frames): it is refused as not a list of video lengths."""
    _split(tmp_path, "train", 40)
    (tmp_path / "train" / "videos.json").write_text("[-4, 44]")
    with pytest.raises(DataError, match=r"videos.json is not a list of video lengths"):
        TrainWindows(tmp_path, video_len=16, cache=False)
