"""Datasets for the lab's folder layout (docs/DATA.md), for generated and real data alike.

Every split is decoded once into uint8 tensors held in memory, (N, 3, H, W) for frames and labels,
and optionally saved as a cache file beside the split with a fingerprint of the files it was read
from; a batch is then only an index and a float conversion, never PNG decoding. Bad input raises
DataError, whose message is one line naming the path and what to do about it.
"""
import copy
import hashlib
import json
import multiprocessing
import os
import re
import signal
import sys

import numpy as np
import torch
from PIL import Image

from modules.files import atomic_write

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp")
CACHE_FORMAT = 2  # bump when the decoding changes, so old caches are re-read (2: 16-bit keyed PNGs)
# Bilinear is what torchvision's Resize (the lab's transform) uses on PIL images; Pillow widens
# its support when shrinking, so the downsampling is antialiased.
RESAMPLE = Image.Resampling.BILINEAR
MANIFEST = "videos.json"
# scripts/make_dance_data.py writes these: PARTIAL first, MARKER when the dataset is complete.
GENERATOR_PARTIAL, GENERATOR_MARKER = ".make_dance_data_partial", "dataset.json"


class DataError(ValueError):
    """Missing or malformed data; the message is one line naming the path and the fix."""

    def __init__(self, msg):
        super().__init__(re.sub(r"\s*[\r\n]+\s*", " ", str(msg)))  # one line, always


# ----------------------------------------------------------------------------- names

# The suffix a file manager gives a duplicate ("frame3 (1).png", "frame3 copy 2.png", "frame3 - Copy.png"):
# its number is the copy's, not the frame's.
COPY_SUFFIX = re.compile(r"(?: \(\d+\)| copy(?: \d+)?| - copy(?: \(\d+\))?)$", re.IGNORECASE)


def frame_number(path):
    """The frame number in a file name: the last run of digits of its stem ('frame12.png' -> 12),
    a file manager's copy suffix left out ('frame3 (1).png' -> 3: a duplicate of frame 3).

    Paths may use '/' or '\\' whatever the OS, as the lab's loader split on either.
    """
    name = re.split(r"[\\/]", str(path))[-1]
    digits = re.findall(r"\d+", COPY_SUFFIX.sub("", os.path.splitext(name)[0]))
    if not digits:
        raise DataError(f"{path}: no frame number in the file name; "
                        "name frames like frame12.png")
    return int(digits[-1])


def _resolve(path):
    """A path as given, or with '\\' read as a separator when that is what exists here."""
    path = os.fspath(path)
    if not os.path.exists(path) and "\\" in path and os.sep == "/":
        alt = path.replace("\\", "/")
        if os.path.exists(alt):
            return alt
    return path


def _entries(folder):
    """os.scandir's entries, or a DataError naming the folder (not a traceback, nor a message
    about the run's output folder) when it cannot be read."""
    try:
        with os.scandir(folder) as it:
            return list(it)
    except OSError as e:
        raise DataError(f"cannot list {folder} ({e.strerror or e}); check its permissions") from None


def _scan(folder, what="frames"):
    """Image files of a folder, ordered by frame number: (names, [(size, mtime_ns)])."""
    folder = _resolve(folder)
    if not os.path.isdir(folder):
        raise DataError(f"{folder} not found; expected a folder of {what} "
                        "(layout in docs/DATA.md)")
    entries = []
    for e in _entries(folder):
        if not e.name.startswith(".") and e.name.lower().endswith(IMAGE_EXTS) and e.is_symlink() \
                and not os.path.exists(e.path):  # is_file() says False: it would be passed over unsaid
            raise DataError(f"{e.path} is a link to {os.readlink(e.path)}, which does not exist; restore "
                            "it, or remove the link together with its frame or label")
        if not e.name.startswith(".") and e.name.lower().endswith(IMAGE_EXTS) and e.is_file():
            st = e.stat()
            entries.append((frame_number(os.path.join(folder, e.name)), e.name,
                            (st.st_size, st.st_mtime_ns)))
    if not entries:
        raise DataError(f"{folder} holds no {what} (*.png); fill it or fix the dataset root")
    entries.sort()
    for (a, name_a, _), (b, name_b, _) in zip(entries, entries[1:]):
        if a == b:
            copy = next((n for n in (name_a, name_b) if COPY_SUFFIX.search(os.path.splitext(n)[0])), None)
            raise DataError(f"{os.path.join(folder, name_b)} has the same frame number as "
                            f"{name_a}; rename or remove one of them"
                            + (f" ({copy} looks like a copy a file manager made)" if copy else ""))
    return [e[1] for e in entries], [e[2] for e in entries]


def list_frames(folder):
    """Image file names in a folder, ordered by frame number ('frame10' after 'frame9')."""
    return _scan(folder)[0]


def _match(img_dir, imgs, label_dir, labels):
    """Every frame needs the label of the same name, and the reverse."""
    if imgs == labels:
        return
    for src, names, dst, other, what in ((img_dir, imgs, label_dir, labels, "label"),
                                         (label_dir, labels, img_dir, imgs, "frame")):
        present = set(other)
        missing = [n for n in names if n not in present]
        if missing:
            more = f" ({len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DataError(f"{os.path.join(src, missing[0])} has no {what} "
                            f"{os.path.join(dst, missing[0])}{more}; add it or remove the file")


# ----------------------------------------------------------------------------- decoding

def _to_rgb(im):
    """Any Pillow mode to 8-bit RGB; transparent pixels become black (the labels' background)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        key = im.info.get("transparency")
        keyed = a == key if isinstance(key, (int, float)) else None  # a tRNS grey value: transparent
        # 16-bit greyscale PNGs open as I;16 (or I in older Pillow): scale 0..65535 to 0..255
        if im.mode.startswith("I;16") or (im.mode == "I" and a.max() > 255):
            a = a / 257.0
        if keyed is not None:
            a[keyed] = 0
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8)).convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        im = im.convert("RGBA")
        out = Image.new("RGB", im.size)
        out.paste(im.convert("RGB"), (0, 0), im.getchannel("A"))
        return out
    return im if im.mode == "RGB" else im.convert("RGB")


def _unreadable_advice(path):
    """A training or validation pair can go; a test sequence needs every one of its frames."""
    parts = os.path.normpath(path).split(os.sep)
    if {"test_img", "test_label", "test_gt"} & set(parts):
        return "re-export the image (a test sequence needs all of its frames)"
    if parts[-2].endswith("_label"):
        return "re-export the image, or remove it together with its frame"
    return "re-export the image, or remove it together with its label"


def read_image(path, frame_H, frame_W):
    """One image as uint8 (frame_H, frame_W, 3), converted and resized."""
    try:
        with Image.open(path) as im:
            im.load()
            rgb = _to_rgb(im)
    except Exception as e:  # Pillow reports bad files with many exception types
        reason = str(e) or type(e).__name__
        raise DataError(f"cannot read {path} ({reason}); {_unreadable_advice(path)}") from e
    if rgb.size != (frame_W, frame_H):
        rgb = rgb.resize((frame_W, frame_H), RESAMPLE)
    return np.asarray(rgb)


def _decode_chunk(job):
    paths, frame_H, frame_W = job
    return np.stack([read_image(p, frame_H, frame_W) for p in paths])


def _worker_signals():
    """Ctrl-C reaches the whole process group: a decoding worker ignores it, and the parent, which
    stops the workers on its KeyboardInterrupt, reports it (else each worker prints a traceback).
    SIGTERM, which is how the parent stops them, ends a worker at once (a forked worker inherits the
    Trainer's handler, which would make it a KeyboardInterrupt traceback too)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def read_images(paths, frame_H, frame_W, workers=None):
    """Decode many images into uint8 (N, 3, H, W), in worker processes when there are many (at most
    `workers`, default one per CPU core; 0 or 1: in this process).

    Processes, not threads: Pillow holds the GIL while it inflates a PNG, so threads gave no
    speed-up. On Linux the workers are forked, which costs no re-import of torch; they only run
    Pillow and numpy.
    """
    out = np.empty((len(paths), frame_H, frame_W, 3), np.uint8)
    step = 256
    jobs = [(paths[lo:lo + step], frame_H, frame_W) for lo in range(0, len(paths), step)]
    workers = min((os.cpu_count() or 1) if workers is None else workers, len(jobs))
    if workers <= 1 or len(paths) < 1024 or multiprocessing.current_process().daemon:
        for lo, job in zip(range(0, len(paths), step), jobs):
            out[lo:lo + len(job[0])] = _decode_chunk(job)
    else:
        ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else None)
        with ctx.Pool(workers, initializer=_worker_signals) as pool:
            for lo, arr in zip(range(0, len(paths), step), pool.imap(_decode_chunk, jobs)):
                out[lo:lo + len(arr)] = arr
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------- cache

def _fingerprint(frame_H, frame_W, listings):
    """Digest of the frame size, the decoder version and every file's name, size and mtime."""
    h = hashlib.sha256(f"{CACHE_FORMAT} {frame_H}x{frame_W} {RESAMPLE}".encode())
    for folder, names, stats in listings:
        h.update(f"\n{os.path.basename(os.path.normpath(folder))}\n".encode())
        for name, (size, mtime) in zip(names, stats):
            h.update(f"{name} {size} {mtime}\n".encode())
    return h.hexdigest()


def _load_cache(path, fingerprint):
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # missing, truncated by a crash, or from another torch: read the PNGs
        return None
    if isinstance(obj, dict) and obj.get("format") == CACHE_FORMAT \
            and obj.get("fingerprint") == fingerprint:
        return obj
    return None


def _save_cache(path, obj):
    """Write whole or not at all (an interruption leaves no temporary file in .cache); a read-only
    dataset or a full disk just goes without a cache."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, lambda tmp: torch.save(obj, tmp))
    except (OSError, RuntimeError):  # torch.save reports a failed open or write as RuntimeError
        pass


def _cache_path(split_dir, stem, frame_H, frame_W):
    return os.path.join(split_dir, ".cache", f"{stem}-{frame_H}x{frame_W}.pt")


# ----------------------------------------------------------------------------- readers

def load_frames(img_dir, label_dir, frame_H, frame_W, cache=True, workers=None):
    """All frames of a split folder and their labels: two uint8 tensors (N, 3, H, W).

    Labels are matched by file name, frames ordered by the number in the name. With cache, the
    tensors are kept in <split>/.cache/ and reused while no file, size or mtime changes. workers:
    decoding processes (read_images).
    """
    _check_size(frame_H, frame_W)
    img_dir, label_dir = os.path.normpath(_resolve(img_dir)), os.path.normpath(_resolve(label_dir))
    imgs, img_stats = _scan(img_dir, "frames")
    labels, label_stats = _scan(label_dir, "pose labels")
    _match(img_dir, imgs, label_dir, labels)
    fp = _fingerprint(frame_H, frame_W, [(img_dir, imgs, img_stats),
                                         (label_dir, labels, label_stats)])
    path = _cache_path(os.path.dirname(img_dir), os.path.basename(img_dir), frame_H, frame_W)
    if cache:
        hit = _load_cache(path, fp)
        if hit is not None:
            return hit["frames"], hit["labels"]
    frames = read_images([os.path.join(img_dir, n) for n in imgs], frame_H, frame_W, workers)
    labels_t = read_images([os.path.join(label_dir, n) for n in labels], frame_H, frame_W, workers)
    if cache:
        _save_cache(path, dict(format=CACHE_FORMAT, fingerprint=fp, frames=frames,
                               labels=labels_t, count=len(imgs)))
    return frames, labels_t


def _check_size(frame_H, frame_W):
    if int(frame_H) < 1 or int(frame_W) < 1:
        raise DataError(f"frame size {frame_H}x{frame_W} is empty; pass positive "
                        "--frame_H/--frame_W")


def _root(root):
    root = _resolve(root)
    if os.path.isfile(root):
        raise DataError(f"dataset root {root} is a file; point --DR at the folder that holds train/, val/ "
                        "and test/")
    if not os.path.isdir(root):
        raise DataError(f"dataset root {root} not found; create it with "
                        f"`python scripts/make_dance_data.py --out {root}` or point --DR "
                        "at the lab's data")
    if (os.path.exists(os.path.join(root, GENERATOR_PARTIAL))
            and not os.path.exists(os.path.join(root, GENERATOR_MARKER))):
        raise DataError(f"{root} is incomplete: scripts/make_dance_data.py was interrupted while "
                        f"writing it; write it again with `python scripts/make_dance_data.py --out "
                        f"{root} --overwrite` (and the flags it was made with)")
    return root


def _split_dir(root, split, inner):
    d = os.path.join(root, split)
    if not os.path.isdir(d):
        raise DataError(f"{d} not found; {root} needs {split}/{inner} in the lab's layout "
                        "(docs/DATA.md)")
    return d


def video_lengths(split_dir, n_frames, img_dir=None):
    """Lengths of the videos concatenated in a split, from its videos.json when there is one
    (the generator writes it; windows never cross from one video into the next), else the runs
    of consecutive frame numbers in img_dir: one video of all frames, as the lab's loader
    assumes, unless the numbering skips (frame41 then frame43), where no window may join frames
    that were not consecutive."""
    path = os.path.join(split_dir, MANIFEST)
    if not os.path.exists(path):
        if img_dir is None:
            return [n_frames]
        numbers = [frame_number(n) for n in list_frames(img_dir)]  # a listing, no decoding
        cuts = [i + 1 for i in range(len(numbers) - 1) if numbers[i + 1] != numbers[i] + 1]
        return [b - a for a, b in zip([0, *cuts], [*cuts, len(numbers)])]
    try:
        with open(path) as f:
            obj = json.load(f)
        lengths = obj["video_lengths"] if isinstance(obj, dict) else obj
        lengths = [int(n) for n in lengths]
        if any(n < 0 for n in lengths):
            raise ValueError("negative length")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path} is not a list of video lengths ({e}); "
                        "fix or delete it") from e
    if sum(lengths) != n_frames:
        raise DataError(f"{path} lists {sum(lengths)} frames but the split has {n_frames}; "
                        "regenerate the data or delete the manifest")
    return lengths


def _first_skip(names):
    """The index of the first file name whose frame number is not followed by the next one, or None."""
    numbers = [frame_number(n) for n in names]
    return next((i for i in range(len(numbers) - 1) if numbers[i + 1] != numbers[i] + 1), None)


def _check_test_lengths(label_root, labels, test_len):
    """Every test sequence is generated for test_len frames, one pose each: a skip in a sequence's
    numbering (a lost label) or sequences of different lengths are named as such, where a
    message about one sequence's count would send the user from one --test_len to another."""
    for k, names in labels.items():
        skip = _first_skip(names)
        if skip is not None:
            raise DataError(f"{os.path.join(label_root, k)} skips from {names[skip]} to {names[skip + 1]}: a test "
                            "sequence needs the pose of every frame; restore the missing labels")
    counts = {k: len(names) for k, names in labels.items()}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{k}: {n}" for k, n in counts.items())
        raise DataError(f"the test sequences in {label_root} hold different numbers of pose labels ({listed}); "
                        f"each is generated for --test_len frames ({test_len}): give them the same length")
    n = next(iter(counts.values()))
    if n != test_len:
        raise DataError(f"{label_root} holds sequences of {n} pose labels but test_len is {test_len}; "
                        f"pass --test_len {n} if that is intended")


class TrainWindows(torch.utils.data.Dataset):
    """Non-overlapping windows of video_len consecutive frames, inside each video.

    Window i is frames[starts[i] : starts[i] + video_len] (as the lab's loader, which cut the
    split into consecutive windows); with a manifest no window crosses two videos, without one
    no window crosses a gap in the frame numbers. `partial`
    keeps the first fraction of the windows (the lab's partial / fast_partial). For validation
    use split="val" with video_len=val_vi_len.
    Items: (img, label), each uint8 (video_len, 3, H, W).
    """

    def __init__(self, root, frame_H=32, frame_W=64, video_len=16, partial=1.0, split="train",
                 cache=True, workers=None):
        if not 0 < float(partial) <= 1:
            raise DataError(f"partial must be in (0, 1], got {partial}")
        if int(video_len) < 1:
            raise DataError(f"video_len must be at least 1, got {video_len}")
        root = _root(root)
        split_dir = _split_dir(root, split, f"{split}_img and {split}/{split}_label")
        img_dir = os.path.join(split_dir, f"{split}_img")
        self.frames, self.labels = load_frames(img_dir, os.path.join(split_dir, f"{split}_label"),
                                               frame_H, frame_W, cache, workers)
        self.video_len = int(video_len)
        self.video_lengths = video_lengths(split_dir, len(self.frames), img_dir)
        starts, offset = [], 0
        for n in self.video_lengths:
            starts.extend(range(offset, offset + n - self.video_len + 1, self.video_len))
            offset += n
        if not starts:
            longest = max(self.video_lengths)
            where = (f"its longest video has {longest} frames" if len(self.video_lengths) > 1
                     else f"it has {longest} frames")
            flag = "train_vi_len" if split == "train" else "val_vi_len"
            fix = f"lower --{flag} or add frames"
            if len(self.video_lengths) > 1 and not os.path.exists(os.path.join(split_dir, MANIFEST)):
                # The videos are the runs of consecutive numbers: a skip (a lost frame, frames
                # numbered in steps) is what cut them short.
                names = list_frames(img_dir)
                i = _first_skip(names)
                fix = (f"the frame numbers skip ({names[i]} then {names[i + 1]}, {len(self.video_lengths) - 1} "
                       f"skip(s)) and no sequence crosses a skip: restore the missing frames, number them "
                       f"consecutively, or give the videos' lengths in {os.path.join(split_dir, MANIFEST)} "
                       f"(docs/DATA.md); or {fix}")
            raise DataError(f"{img_dir}: {where}, fewer than one sequence of {self.video_len}; {fix}")
        self.all_starts = torch.tensor(starts, dtype=torch.int64)
        self.starts = self.all_starts[:max(1, int(len(starts) * float(partial)))]

    def with_partial(self, partial):
        """The same data (shared, not copied) with another fraction of the windows."""
        if not 0 < float(partial) <= 1:
            raise DataError(f"partial must be in (0, 1], got {partial}")
        other = copy.copy(self)
        other.starts = self.all_starts[:max(1, int(len(self.all_starts) * float(partial)))]
        return other

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, i):
        s = int(self.starts[i])
        return self.frames[s:s + self.video_len], self.labels[s:s + self.video_len]


def _seq_folders(folder):
    """Sub-folders named by an integer, ordered by it: {name: folder}."""
    folder = _resolve(folder)
    if not os.path.isdir(folder):
        raise DataError(f"{folder} not found; expected one numbered folder per test sequence")
    names = [e.name for e in _entries(folder) if e.is_dir() and not e.name.startswith(".")]
    if not names:
        raise DataError(f"{folder} holds no sequence folders (0/, 1/, ...); fill it or fix the "
                        "dataset root")
    keyed = []
    for n in names:
        digits = re.findall(r"\d+", n)
        if not digits:
            raise DataError(f"{os.path.join(folder, n)}: sequence folders must be named by a "
                            "number (0, 1, ...); rename or remove it")
        keyed.append((int(digits[-1]), n))
    keyed.sort()
    for (a, name_a), (b, name_b) in zip(keyed, keyed[1:]):
        if a == b:  # both would be sequence a, in an order the submission cannot tell apart
            raise DataError(f"{os.path.join(folder, name_b)} has the same sequence number as "
                            f"{name_a}; rename or remove one of them")
    return [n for _, n in keyed]


class TestSequences:
    """Test sequences: the first frame, every pose label and, when present, the ground truth.

    Reads <root>/<split>/test_img/{k}/ (only its first frame is used), test_label/{k}/ (exactly
    test_len labels) and test_gt/{k}/ (optional, as many frames as labels, same names). Items are
    dicts: name (the folder name), first (3, H, W), labels (test_len, 3, H, W), gt (same) or None.
    """
    __test__ = False  # not a pytest test class, whatever its name says


    def __init__(self, root, frame_H=32, frame_W=64, test_len=630, cache=True, split="test", workers=None):
        _check_size(frame_H, frame_W)
        root = _root(root)
        split_dir = _split_dir(root, split, "test_img and test_label")
        dirs = {k: os.path.join(split_dir, k) for k in ("test_img", "test_label", "test_gt")}
        names = _seq_folders(dirs["test_img"])
        label_names = _seq_folders(dirs["test_label"])
        for a, b, have, lack in ((names, label_names, "test_img", "test_label"),
                                 (label_names, names, "test_label", "test_img")):
            extra = [n for n in a if n not in b]
            if extra:
                raise DataError(f"{os.path.join(dirs[have], extra[0])} has no matching "
                                f"{os.path.join(dirs[lack], extra[0])}; add it or remove the "
                                "sequence")
        scans = {k: _scan(os.path.join(dirs["test_label"], k), "pose labels") for k in names}
        _check_test_lengths(dirs["test_label"], {k: labels for k, (labels, _) in scans.items()}, test_len)
        listings, plan = [], []
        for k in names:
            img_dir = os.path.join(dirs["test_img"], k)
            label_dir = os.path.join(dirs["test_label"], k)
            gt_dir = os.path.join(dirs["test_gt"], k)
            imgs, img_stats = _scan(img_dir, "first frames")
            labels, label_stats = scans[k]
            listings += [(img_dir, imgs[:1], img_stats[:1]), (label_dir, labels, label_stats)]
            gt = None
            if os.path.isdir(gt_dir):
                gt, gt_stats = _scan(gt_dir, "ground-truth frames")
                _match(gt_dir, gt, label_dir, labels)
                listings.append((gt_dir, gt, gt_stats))
            plan.append((k, os.path.join(img_dir, imgs[0]),
                         [os.path.join(label_dir, n) for n in labels],
                         [os.path.join(gt_dir, n) for n in gt] if gt else None))
        fp = _fingerprint(frame_H, frame_W, listings)
        path = _cache_path(split_dir, split, frame_H, frame_W)
        hit = _load_cache(path, fp) if cache else None
        if hit is not None:
            self.items = hit["items"]
        else:
            paths = []
            for _, first, labels, gt in plan:
                paths += [first] + labels + (gt or [])
            data = read_images(paths, frame_H, frame_W, workers)
            self.items, i = [], 0
            for k, _, labels, gt in plan:
                n_gt = len(gt) if gt else 0
                self.items.append(dict(
                    name=k, first=data[i].clone(),
                    labels=data[i + 1:i + 1 + len(labels)].clone(),
                    gt=data[i + 1 + len(labels):i + 1 + len(labels) + n_gt].clone() if gt
                    else None))
                i += 1 + len(labels) + n_gt
            if cache:
                _save_cache(path, dict(format=CACHE_FORMAT, fingerprint=fp, items=self.items))
        self.names = [it["name"] for it in self.items]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, k):
        return self.items[k]

    def __iter__(self):
        return iter(self.items)
