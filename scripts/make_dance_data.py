"""Procedural dance dataset, written in the lab's folder layout (docs/DATA.md).

An articulated 2.5-D dancer (joints in 3-D, orthographic camera tilted slightly down, limbs drawn
back to front) performs generated choreography in front of a per-video background. Each frame is
rendered at twice the native size and box-downsampled, so edges are anti-aliased. The pose label is
the OpenPose-style skeleton of the same joints, so it determines the body's position exactly; the
appearance (dancer, clothes, background) is fixed within a video and must come from the first frame.

    python scripts/make_dance_data.py --out data/dance
    python scripts/make_dance_data.py --preview docs/dance_strip.png

Everything is a pure function of (flags, seed, video, frame index), so the files are byte-identical
whatever the number of workers. This module imports neither torch nor dataloader at import time:
worker processes start fast.
"""
import colorsys
import math
import multiprocessing
import os
import shutil
import signal
import sys
import time

if __name__ == "__mp_main__":
    # A rendering worker (spawned: it imports this file as __mp_main__ first): Ctrl-C is the
    # parent's to handle, from before the imports below, which are most of a worker's start-up.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
if __name__ == "__main__":  # run as a file, Python puts scripts/ on the path; the repo root holds dataloader.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from modules.environment import require
    require("scripts/make_dance_data.py", ("numpy", "PIL", "tqdm", "torch"))

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

SS = 2  # supersampling factor: render at SS x the native size, then box-downsample
FLOOR = 0.92  # feet touch the floor at this fraction of the frame height
FILL = 0.72  # standing body height as a fraction of the frame height
TILT = 0.25  # camera looks slightly down: a point nearer the camera (z > 0) appears lower
PNG_LEVEL = 1  # zlib level: 1 writes ~1.5x faster than 6, files ~15% larger (~9 KB a frame)
SERIAL_BELOW = 1500  # frames; fewer are rendered in-process, as starting workers costs ~1 s
MARKER = "dataset.json"  # written last: its presence means the dataset is complete
PARTIAL = ".make_dance_data_partial"  # written first: marks folders this script may replace
SPLIT_DIRS = ("train", "val", "test", "test_unseen")
BACKGROUNDS = ("mixed", "plain", "gradient", "textured")

# Pose parameters (radians, except x and hop in body heights). abd: arm/leg raised sideways from
# hanging down; flex: swung forward; elb/knee: bend; tw: the elbow bends the forearm forward (0)
# or upward (pi/2).
PARAMS = ("yaw", "lean", "bend", "head", "nod",
          "r_abd", "r_flex", "r_elb", "r_tw", "l_abd", "l_flex", "l_elb", "l_tw",
          "r_hab", "r_hflex", "r_knee", "l_hab", "l_hflex", "l_knee", "x", "hop")
P = {name: i for i, name in enumerate(PARAMS)}
NEUTRAL = np.zeros(len(PARAMS))
NEUTRAL[[P["r_abd"], P["l_abd"]]] = 0.15
NEUTRAL[[P["r_elb"], P["l_elb"]]] = 0.2
NEUTRAL[[P["r_hab"], P["l_hab"]]] = 0.05
MIRROR = np.arange(len(PARAMS))
for _name in PARAMS:
    if _name.startswith("r_"):
        MIRROR[P[_name]], MIRROR[P["l_" + _name[2:]]] = P["l_" + _name[2:]], P[_name]
MIRROR_SIGN = np.ones(len(PARAMS))
MIRROR_SIGN[[P["yaw"], P["lean"], P["head"]]] = -1.0

# Label keypoints: the 18 of OpenPose's COCO model, in its order, plus the two big toes of its
# BODY_25 model, so that the label also fixes which way the feet point.
KEYPOINTS = ("nose", "neck", "r_sh", "r_elb", "r_wri", "l_sh", "l_elb", "l_wri",
             "r_hip", "r_knee", "r_ank", "l_hip", "l_knee", "l_ank",
             "r_eye", "l_eye", "r_ear", "l_ear", "r_toe", "l_toe")
_SIDE_HUE = {"c": (0.75, 0.95), "r": (0.0, 0.16), "l": (0.36, 0.66)}  # warm right, cool left


def _bone_colours():
    """Limbs of the label and their colours: warm hues on the dancer's right, cool on the left,
    purples on the midline, so left and right (and so facing front or back) are told apart."""
    bones = [("neck", "r_hip", "r"), ("neck", "l_hip", "l"), ("neck", "r_sh", "r"),
             ("neck", "l_sh", "l"), ("r_sh", "r_elb", "r"), ("r_elb", "r_wri", "r"),
             ("l_sh", "l_elb", "l"), ("l_elb", "l_wri", "l"), ("r_hip", "r_knee", "r"),
             ("r_knee", "r_ank", "r"), ("r_ank", "r_toe", "r"), ("l_hip", "l_knee", "l"),
             ("l_knee", "l_ank", "l"), ("l_ank", "l_toe", "l"), ("neck", "nose", "c"),
             ("nose", "r_eye", "r"), ("r_eye", "r_ear", "r"), ("nose", "l_eye", "l"),
             ("l_eye", "l_ear", "l")]
    counts = {s: sum(b[2] == s for b in bones) for s in "crl"}
    seen = {s: 0 for s in "crl"}
    out = []
    for a, b, side in bones:
        lo, hi = _SIDE_HUE[side]
        hue = lo + (hi - lo) * seen[side] / max(1, counts[side] - 1)
        seen[side] += 1
        rgb = tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue % 1.0, 1.0, 1.0))
        out.append((KEYPOINTS.index(a), KEYPOINTS.index(b), rgb))
    return tuple(out)


BONES = _bone_colours()
# a keypoint takes the colour of the last bone drawn through it
KP_COLOUR = tuple([c for a, b, c in BONES if k in (a, b)][-1] for k in range(len(KEYPOINTS)))


def _fail(msg):
    """Raise dataloader.DataError; imported here so that worker processes never load torch."""
    from dataloader import DataError
    raise DataError(msg)


# ----------------------------------------------------------------------------- appearance

def _hsv(h, s, v):
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(h % 1.0, s, v))


def _mix(a, b, t):
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b))


def _shade(c, f):
    return tuple(max(0, min(255, int(round(x * f)))) for x in c)


SKIN = ((255, 226, 200), (236, 192, 158), (200, 148, 108), (146, 96, 62), (92, 60, 40))
HAIR = ((25, 18, 14), (62, 40, 24), (112, 72, 38), (206, 168, 98), (160, 70, 34),
        (128, 128, 132), (52, 52, 140), (150, 40, 90))


def make_dancer(rng):
    """One person's look and movement style, as plain values (sent to worker processes)."""
    t = rng.uniform(0, len(SKIN) - 1)
    i = min(int(t), len(SKIN) - 2)
    shirt = _hsv(rng.random(), rng.uniform(0.35, 0.9), rng.uniform(0.45, 0.95))
    bottom = (_hsv(rng.uniform(0.55, 0.68), rng.uniform(0.4, 0.8), rng.uniform(0.25, 0.6))
              if rng.random() < 0.4 else
              _hsv(rng.random(), rng.uniform(0.1, 0.8), rng.uniform(0.15, 0.8)))
    return dict(
        skin=_mix(SKIN[i], SKIN[i + 1], t - i),
        hair=HAIR[rng.integers(len(HAIR))],
        hair_style=str(rng.choice(["short", "long", "bun"])),
        shirt=shirt,
        stripes=_shade(shirt, rng.choice([0.55, 1.45])) if rng.random() < 0.3 else None,
        sleeves=int(rng.integers(3)),  # 0 none, 1 short, 2 long
        bottom=bottom,
        bottom_style=str(rng.choice(["trousers", "shorts", "skirt"], p=[0.5, 0.2, 0.3])),
        shoes=_hsv(rng.random(), rng.uniform(0, 0.5), rng.choice([0.12, 0.9])),
        height=rng.uniform(0.92, 1.04), shoulders=rng.uniform(0.9, 1.12),
        hips=rng.uniform(0.9, 1.15), thickness=rng.uniform(0.85, 1.2),
        legs=rng.uniform(0.95, 1.06), head=rng.uniform(0.93, 1.08),
        energy=rng.uniform(0.8, 1.15), arm_bias=rng.uniform(-0.4, 0.4),
        bounce=rng.uniform(0.1, 0.3), bpm=rng.uniform(100, 128))


def _body(d):
    """Bone lengths and widths in units of the standing height."""
    legs, th = d["legs"], d["thickness"]
    return dict(torso=0.30, neck=0.05, rh=0.065 * d["head"], sw=0.11 * d["shoulders"],
                hw=0.075 * d["hips"], upper=0.17, fore=0.15, hand=0.06,
                thigh=0.24 * legs, shin=0.23 * legs, ankle=0.04, foot=0.13,
                w_upper=0.024 * th, w_fore=0.02 * th, w_hand=0.02 * th,
                w_thigh=0.038 * th, w_shin=0.03 * th, w_neck=0.024 * th,
                chest=0.135 * d["shoulders"] * th ** 0.5, waist=0.095 * th, depth=0.07 * th)


def make_background(rng, height, width, kind="mixed"):
    """Wall and floor of one video, at the render size, as (image, darkened copy for shadows)."""
    H, W = height * SS, width * SS
    if kind == "mixed":
        kind = str(rng.choice(["plain", "gradient", "textured"]))
    c1 = np.array(_hsv(rng.random(), rng.uniform(0.05, 0.6), rng.uniform(0.35, 0.95)), float)
    c2 = np.array(_hsv(rng.random(), rng.uniform(0.05, 0.6), rng.uniform(0.2, 0.9)), float)
    yy = np.linspace(0, 1, H)[:, None, None]
    if kind == "plain":
        wall = np.broadcast_to(c1, (H, W, 3)).copy()
    elif kind == "gradient":
        wall = c1 + (c2 - c1) * yy ** rng.uniform(0.6, 1.6) + np.zeros((1, W, 1))
    else:
        # Smooth blotches: random values on a coarse grid, upsampled bicubically; optional
        # vertical wallpaper stripes on top.
        coarse = rng.random((int(rng.integers(3, 8)), int(rng.integers(5, 14))))
        blot = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8))
                          .resize((W, H), Image.BICUBIC), float)[..., None] / 255
        wall = c1 + (c2 - c1) * blot
        if rng.random() < 0.5:
            period = rng.uniform(0.04, 0.12) * W
            xs = np.arange(W)[None, :, None]
            wall *= 1 - 0.12 * (np.sin(2 * np.pi * xs / period) > 0.6)
    floor_top = int((FLOOR - rng.uniform(0.1, 0.2)) * H)
    f1 = np.array(_hsv(rng.uniform(0.05, 0.12) if rng.random() < 0.5 else rng.random(),
                       rng.uniform(0.1, 0.6), rng.uniform(0.3, 0.8)), float)
    fy = np.linspace(0, 1, H - floor_top)[:, None, None]
    wall[floor_top:] = f1 * (0.75 + 0.35 * fy)
    wall[floor_top:floor_top + max(1, H // 64)] *= 0.6  # skirting line where wall meets floor
    img = Image.fromarray(np.clip(wall, 0, 255).astype(np.uint8))
    if rng.random() < 0.6:  # floor boards receding to a vanishing point above the frame
        draw = ImageDraw.Draw(img)
        vx, vy = W * rng.uniform(0.3, 0.7), floor_top - 2.5 * H
        line = _shade(tuple(int(v) for v in f1), 0.7)
        for x in np.linspace(-W, 2 * W, int(rng.integers(10, 24))):
            t = (floor_top - vy) / (H - vy)
            draw.line([(vx + (x - vx) * t, floor_top), (x, H)], fill=line, width=SS)
    dark = Image.fromarray((np.asarray(img, float) * 0.62).astype(np.uint8))
    return img, dark


# ----------------------------------------------------------------------------- choreography

def _spline(keys, step, n):
    """Catmull-Rom through keys (K, P) placed every `step` frames, sampled at frames 0..n-1."""
    t = np.arange(n) / step
    k = np.floor(t).astype(np.int64)
    u = (t - k)[:, None]
    last = len(keys) - 1
    p0, p1, p2, p3 = (keys[np.clip(k + j, 0, last)] for j in (-1, 0, 1, 2))
    return 0.5 * (2 * p1 + (p2 - p0) * u + (2 * p0 - 5 * p1 + 4 * p2 - p3) * u ** 2
                  + (3 * p1 - p0 - 3 * p2 + p3) * u ** 3)


def _key_pose(rng, arm_level, sym, scale):
    """One keyframe pose: arms around this motif's level, one of three leg stances."""
    k = NEUTRAL.copy()
    for side in "rl":
        k[P[side + "_abd"]] = np.clip(arm_level + rng.normal(0, 0.5), 0.05, 3.0)
        k[P[side + "_flex"]] = rng.uniform(-0.4, 1.2) if k[P[side + "_abd"]] < 2.2 \
            else rng.uniform(-0.3, 0.3)
        k[P[side + "_elb"]] = rng.uniform(0, 2.0)
        k[P[side + "_tw"]] = rng.uniform(0, 1.5)
    if sym:
        for j in ("abd", "flex", "elb", "tw"):
            k[P["l_" + j]] = k[P["r_" + j]]
    stance = rng.random()
    lift, other = ("r", "l") if rng.random() < 0.5 else ("l", "r")
    if stance < 0.5:  # both feet down, crouching a little
        c = rng.uniform(0, 0.5)
        for side in "rl":
            k[P[side + "_hab"]] = rng.uniform(0.03, 0.25)
            k[P[side + "_hflex"]] = 0.6 * c + rng.uniform(-0.05, 0.1)
            k[P[side + "_knee"]] = 1.2 * c
    elif stance < 0.8:  # one knee lifted or a kick
        k[P[lift + "_hflex"]] = rng.uniform(0.3, 1.3)
        k[P[lift + "_knee"]] = rng.uniform(0.2, 1.8)
        k[P[lift + "_hab"]] = rng.uniform(0, 0.3)
        k[P[other + "_hflex"]] = rng.uniform(-0.05, 0.2)
        k[P[other + "_knee"]] = rng.uniform(0, 0.3)
    else:  # leg out to the side
        k[P[lift + "_hab"]] = rng.uniform(0.3, 0.7)
        k[P[lift + "_knee"]] = rng.uniform(0, 0.3)
        k[P[other + "_knee"]] = rng.uniform(0, 0.25)
    k[P["lean"]] = np.clip(rng.normal(0, 0.12), -0.35, 0.35)
    k[P["bend"]] = rng.uniform(-0.05, 0.3)
    k[P["head"]] = rng.normal(0, 0.15)
    k[P["nod"]] = rng.normal(0, 0.1)
    if rng.random() < 0.08:
        k[P["hop"]] = rng.uniform(0.03, 0.07)
    return NEUTRAL + scale * (k - NEUTRAL)


def choreography(rng, n, dancer, motion=1.0, speed=1.0, turns=0.15, travel=1.0, stage=0.8):
    """Pose parameters (n, len(PARAMS)) for n frames at 30 fps.

    Motifs of 2 or 4 beats, each a few keyframes on the half-beat, are repeated 2-4 times
    (alternately mirrored for some), so the dance is rhythmic without being one sine per joint;
    keyframes are joined by Catmull-Rom splines, a knee bounce on the beat and slow drift are
    added on top. Some motifs turn the dancer round or show the back.
    """
    bpm = float(np.clip(dancer["bpm"] + rng.normal(0, 6), 80, 150)) * speed
    step = 900.0 / bpm  # frames per half-beat
    scale = motion * dancer["energy"]
    keys, yaw_base, x_base = [], 0.0, 0.0
    while len(keys) < n / step + 4:
        m = int(rng.choice([4, 8]))
        reps = int(rng.integers(2, 5))
        mirror = rng.random() < 0.5
        arm_level = np.clip(rng.uniform(0.2, 2.6) + dancer["arm_bias"], 0.1, 2.8)
        motif = np.stack([_key_pose(rng, arm_level, rng.random() < 0.35, scale) for _ in range(m)])
        x_base = float(np.clip(x_base + rng.normal(0, 0.35) * travel, -stage, stage))
        gait = rng.choice(["still", "step", "walk"])
        if gait == "step":
            motif[:, P["x"]] = 0.05 * travel * (-1) ** np.arange(m)
        elif gait == "walk":
            motif[:, P["x"]] = np.linspace(-0.25, 0.25, m) * travel * rng.choice([-1, 1])
        r = rng.random()
        face = 0.0 if r < 0.6 else rng.uniform(-0.8, 0.8) * min(1.0, motion)
        spin = 0.0
        if r > 1 - turns:
            spin = 2 * np.pi * rng.choice([-1, 1])
        elif r > 1 - 1.5 * turns:
            face = np.pi * rng.choice([-1, 1])  # show the back for the whole motif
        for rep in range(reps):
            block = motif.copy()
            if mirror and rep % 2 == 1:
                block = block[:, MIRROR] * MIRROR_SIGN
            block[:, P["yaw"]] += yaw_base + face
            if spin and rep == 0:
                block[:, P["yaw"]] += spin * np.arange(m) / m
            block[:, P["x"]] = np.clip(block[:, P["x"]] + x_base, -stage, stage)
            keys.extend(block)
        yaw_base += spin
        # keep the unwrapped yaw near 0 so the spline never spins the long way round
        yaw_base -= 2 * np.pi * round(yaw_base / (2 * np.pi))
    pose = _spline(np.stack(keys), step, n)
    t = np.arange(n)
    beat = 0.5 - 0.5 * np.cos(2 * np.pi * t / (2 * step))
    bounce = dancer["bounce"] * motion * beat
    for side in "rl":
        pose[:, P[side + "_knee"]] += bounce
        pose[:, P[side + "_hflex"]] += 0.5 * bounce
    for j in range(len(PARAMS)):
        if PARAMS[j] in ("yaw", "x", "hop"):
            continue
        per = rng.uniform(40, 200, 3)
        ph = rng.uniform(0, 2 * np.pi, 3)
        pose[:, j] += 0.04 * motion * np.sin(2 * np.pi * t[:, None] / per + ph).sum(1)
    lim = {"abd": (0, 3.05), "elb": (0, 2.5), "knee": (0, 2.2), "hab": (-0.1, 0.9),
           "hflex": (-0.5, 1.6), "flex": (-0.6, 1.5), "tw": (0, 1.6)}
    for name, (lo, hi) in lim.items():
        for side in "rl":
            pose[:, P[side + "_" + name]] = np.clip(pose[:, P[side + "_" + name]], lo, hi)
    pose[:, P["hop"]] = np.maximum(pose[:, P["hop"]], 0)
    return pose


# ----------------------------------------------------------------------------- kinematics

def _rot(axis, a):
    """(n, 3, 3) rotations about x, y or z by angles a (n,)."""
    c, s = np.cos(a), np.sin(a)
    o, z = np.ones_like(a), np.zeros_like(a)
    m = {"x": [[o, z, z], [z, c, -s], [z, s, c]],
         "y": [[c, z, s], [z, o, z], [-s, z, c]],
         "z": [[c, -s, z], [s, c, z], [z, z, o]]}[axis]
    return np.stack([np.stack(row, -1) for row in m], -2)


def _apply(R, v):
    """Rotate vectors: R (n, 3, 3), v (3,) or (n, 3) -> (n, 3)."""
    return np.einsum("nij,nj->ni", R, np.broadcast_to(v, (R.shape[0], 3)))


def _unit(v):
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-9)


def _bend(d, elbow, target):
    """Turn unit directions d (n, 3) by angle elbow (n,) towards target (3,) (same frame)."""
    perp = target - (d @ target)[:, None] * d
    fallback = np.cross(d, np.array([0.0, 0.0, 1.0]))
    perp = np.where(np.linalg.norm(perp, axis=1, keepdims=True) < 1e-4, fallback, perp)
    return np.cos(elbow)[:, None] * d + np.sin(elbow)[:, None] * _unit(perp)


def _limb_dir(side, abd, flex):
    """Direction of an arm or leg hanging down, raised sideways by abd then swung forward."""
    x, y = side * np.sin(abd), -np.cos(abd)
    return np.stack([x, y * np.cos(flex), -y * np.sin(flex)], -1)


def skeleton(pose, body):
    """3-D points (name -> (n, 3)), x right, y up, z towards the camera, feet on y = 0.

    The dancer faces the camera at yaw 0, so their right side (side -1) is on the viewer's left.
    """
    p = {k: pose[:, i] for k, i in P.items()}
    n = len(pose)
    R_yaw = _rot("y", p["yaw"])
    R_t = R_yaw @ _rot("z", p["lean"]) @ _rot("x", p["bend"])  # chest
    R_p = R_yaw @ _rot("z", -0.3 * p["lean"])  # pelvis sways against the lean
    R_h = R_t @ _rot("z", p["head"]) @ _rot("x", p["nod"])
    b = body
    pt = {"pelvis": np.zeros((n, 3))}
    pt["neck"] = _apply(R_t, [0, b["torso"], 0])
    pt["head"] = pt["neck"] + _apply(R_h, [0, b["neck"] + b["rh"], 0])
    rh = b["rh"]
    pt["nose"] = pt["head"] + _apply(R_h, [0, -0.15 * rh, 0.95 * rh])
    pt["hair_back"] = pt["head"] + _apply(R_h, [0, -1.2 * rh, -0.8 * rh])
    pt["bun"] = pt["head"] + _apply(R_h, [0, 0.75 * rh, -0.75 * rh])
    for s, side in (("r", -1.0), ("l", 1.0)):
        pt[s + "_eye"] = pt["head"] + _apply(R_h, [side * 0.35 * rh, 0.15 * rh, 0.8 * rh])
        pt[s + "_ear"] = pt["head"] + _apply(R_h, [side * 0.95 * rh, 0, -0.05 * rh])
        sh = pt["neck"] + _apply(R_t, [side * b["sw"], -0.02, 0])
        d = _limb_dir(side, p[s + "_abd"], p[s + "_flex"])
        tw = p[s + "_tw"]
        # elbow bends forward (tw 0) or up (tw pi/2); a little inward keeps it defined
        target = np.stack([np.full(n, -side * 0.2), np.sin(tw), np.cos(tw) + 0.3], -1)
        perp = target - np.sum(target * d, 1, keepdims=True) * d
        e = np.cos(p[s + "_elb"])[:, None] * d + np.sin(p[s + "_elb"])[:, None] * _unit(perp)
        d, e = _apply(R_t, d), _apply(R_t, e)
        pt[s + "_sh"] = sh
        pt[s + "_elb"] = sh + b["upper"] * d
        pt[s + "_wri"] = pt[s + "_elb"] + b["fore"] * e
        pt[s + "_hand"] = pt[s + "_wri"] + b["hand"] * e
        hip = _apply(R_p, [side * b["hw"], 0, 0])
        d = _limb_dir(side, p[s + "_hab"], p[s + "_hflex"])
        e = _bend(d, p[s + "_knee"], np.array([0.0, -0.5, -1.0]))  # knees bend backwards
        d, e = _apply(R_p, d), _apply(R_p, e)
        pt[s + "_hip"] = hip
        pt[s + "_knee"] = hip + b["thigh"] * d
        pt[s + "_ank"] = pt[s + "_knee"] + b["shin"] * e
        fwd = _unit(_apply(R_yaw, [side * 0.25, 0, 1]))  # toes turned out a little
        sole = pt[s + "_ank"] - np.array([0, b["ankle"], 0])
        pt[s + "_heel"] = sole - 0.25 * b["foot"] * fwd
        pt[s + "_toe"] = sole + 0.75 * b["foot"] * fwd
    # the lowest foot point touches the floor, except during a hop
    low = np.min([pt[k][:, 1] for k in ("r_heel", "r_toe", "l_heel", "l_toe")], axis=0)
    lift = np.stack([p["x"], p["hop"] - low, np.zeros(n)], -1)
    for k in pt:
        pt[k] = pt[k] + lift
    facing = _apply(R_h, [0, 0, 1])[:, 2]
    visible = {"nose": facing > 0.05}
    for s, side in (("r", -1.0), ("l", 1.0)):
        visible[s + "_eye"] = _unit(_apply(R_h, [side * 0.35, 0, 1]))[:, 2] > 0.05
        visible[s + "_ear"] = _apply(R_h, [side, 0, -0.1])[:, 2] > -0.5
    return pt, visible, p["yaw"]


# ----------------------------------------------------------------------------- rendering

class Video:
    """One dancer in one setting: the whole motion is computed up front, frames on demand."""

    def __init__(self, dancer, seed, n_frames, height, width, motion=1.0, speed=1.0,
                 turns=0.15, travel=1.0, background="mixed"):
        rng = np.random.default_rng(seed)
        self.d, self.n, self.H, self.W = dancer, n_frames, height, width
        self.body = _body(dancer)
        self.S = FILL * height * dancer["height"] * SS  # render pixels per body height
        stage = max(0.0, width * SS / self.S / 2 - 0.5)
        self.bg, self.bg_dark = make_background(rng, height, width, background)
        pose = choreography(rng, n_frames, dancer, motion, speed, turns, travel, stage)
        pt, self.visible, self.yaw = skeleton(pose, self.body)
        self.depth = {k: v[:, 2] for k, v in pt.items()}
        cx, fy = width * SS / 2, FLOOR * height * SS
        # screen position in render pixels: y down, and nearer points lower (camera tilt)
        self.xy = {k: np.stack([cx + v[:, 0] * self.S, fy - (v[:, 1] - TILT * v[:, 2]) * self.S],
                               -1) for k, v in pt.items()}
        self.hop = pose[:, P["hop"]]

    def _capsule(self, draw, a, b, wa, wb, colour, edge):
        """A tapered limb with round ends; drawn once enlarged in the edge colour (outline)."""
        d = b - a
        nrm = np.array([-d[1], d[0]]) / max(np.hypot(*d), 1e-6)
        o = 0.9 * SS
        for fill, grow in ((edge, o), (colour, 0.0)):
            ra, rb = wa + grow, wb + grow
            draw.polygon([tuple(a + nrm * ra), tuple(b + nrm * rb),
                          tuple(b - nrm * rb), tuple(a - nrm * ra)], fill=fill)
            draw.ellipse([a[0] - ra, a[1] - ra, a[0] + ra, a[1] + ra], fill=fill)
            draw.ellipse([b[0] - rb, b[1] - rb, b[0] + rb, b[1] + rb], fill=fill)

    def _slab(self, top, bot, half_w, half_d, yaw, flare=1.0):
        """Screen outline of a body part with an elliptic cross-section seen at this yaw."""
        axis = bot - top
        nrm = np.array([-axis[1], axis[0]]) / max(np.hypot(*axis), 1e-6)
        w = math.hypot(half_w * math.cos(yaw), half_d * math.sin(yaw)) * self.S
        return [tuple(top + nrm * w), tuple(bot + nrm * w * flare),
                tuple(bot - nrm * w * flare), tuple(top - nrm * w)]

    def render(self, i, figure=True):
        """Frame i and its pose label, both (height, width) RGB PIL images. figure=False leaves the
        dancer out (the wall, floor and shadow alone): what the dancer hides, for analysis."""
        d, b, S = self.d, self.body, self.S
        xy = {k: v[i] for k, v in self.xy.items()}
        z = {k: float(v[i]) for k, v in self.depth.items()}
        yaw = float(self.yaw[i])
        img = self.bg.copy()
        # shadow on the floor under the pelvis, smaller while hopping
        sx, sy = xy["pelvis"][0], FLOOR * self.H * SS
        rx, ry = max((0.2 - self.hop[i]) * S, 1.0), max(0.035 * S, 1.0)  # never an empty box
        box = tuple(int(round(v)) for v in (sx - rx, sy - ry, sx + rx, sy + ry))
        mask = Image.new("L", (box[2] - box[0], box[3] - box[1]), 0)
        ImageDraw.Draw(mask).ellipse([0, 0, mask.width - 1, mask.height - 1], fill=150)
        img.paste(self.bg_dark.crop(box), box[:2], mask)
        draw = ImageDraw.Draw(img)

        parts = []  # (depth, order, function, args); drawn back to front

        def add(depth, fn, *args):
            parts.append((depth, len(parts), fn, args))

        def shade(c, depth):
            return _shade(c, min(1.1, max(0.72, 1 + 1.6 * depth)))

        def limb(a, bb, wa, wb, colour, bias=0.0):
            dz = 0.5 * (z[a] + z[bb]) + bias
            c = shade(colour, dz)
            add(dz, self._capsule, draw, xy[a], xy[bb], wa * S, wb * S, c, _shade(c, 0.55))

        def poly(depth, points, colour, outline=True):
            c = shade(colour, depth)
            add(depth, lambda pts, c, e: draw.polygon(pts, fill=c, outline=e, width=SS if e else 0),
                points, c, _shade(c, 0.55) if outline else None)

        def ellipse(depth, centre, rx, ry, colour, outline=True):
            c = shade(colour, depth)
            box = [centre[0] - rx, centre[1] - ry, centre[0] + rx, centre[1] + ry]
            add(depth, lambda bx, c, e: draw.ellipse(bx, fill=c, outline=e, width=SS if e else 0),
                box, c, _shade(c, 0.55) if outline else None)

        skin, shirt, bottom = d["skin"], d["shirt"], d["bottom"]
        long_legs = d["bottom_style"] == "trousers"
        for s in "rl":
            limb(s + "_sh", s + "_elb", b["w_upper"], b["w_upper"] * 0.9,
                 shirt if d["sleeves"] else skin, 0.01)
            limb(s + "_elb", s + "_wri", b["w_fore"], b["w_fore"] * 0.8,
                 shirt if d["sleeves"] == 2 else skin, 0.012)
            limb(s + "_wri", s + "_hand", b["w_hand"], b["w_hand"] * 0.9, skin, 0.014)
            limb(s + "_hip", s + "_knee", b["w_thigh"], b["w_thigh"] * 0.8,
                 skin if d["bottom_style"] == "skirt" else bottom, -0.02)
            limb(s + "_knee", s + "_ank", b["w_shin"], b["w_shin"] * 0.8,
                 bottom if long_legs else skin, -0.015)
            limb(s + "_heel", s + "_toe", b["w_shin"] * 0.7, b["w_shin"] * 0.6, d["shoes"], -0.01)
        limb("neck", "head", b["w_neck"], b["w_neck"], skin, -0.03)
        # torso: chest to pelvis, with a shirt hem over the trousers' waistband
        zt = 0.5 * (z["neck"] + z["pelvis"])
        waist = xy["neck"] + 0.62 * (xy["pelvis"] - xy["neck"])
        chest = self._slab(xy["neck"], waist, b["chest"], b["depth"], yaw, b["waist"] / b["chest"])
        low = self._slab(waist, xy["pelvis"] + 0.04 * (xy["pelvis"] - xy["neck"]),
                         b["waist"], b["depth"], yaw, (b["hw"] + 0.03) / b["waist"])
        poly(zt - 0.001, self._slab(xy["pelvis"] - 0.05 * (xy["pelvis"] - xy["neck"]),
                                    xy["pelvis"] + 0.22 * (xy["pelvis"] - xy["neck"]),
                                    b["hw"] + 0.03, b["depth"], yaw), bottom)
        poly(zt, [chest[0], chest[1], low[1], low[2], chest[2], chest[3]], shirt)
        if d["stripes"]:
            left, right = np.array(chest[0]), np.array(chest[3])
            lb, rb = np.array(chest[1]), np.array(chest[2])
            for f in np.linspace(0.15, 0.85, 4):
                add(zt + 1e-4, lambda a, c, w: draw.line(a, fill=c, width=w),
                    [tuple(left + (lb - left) * f), tuple(right + (rb - right) * f)],
                    shade(d["stripes"], zt), max(1, int(0.018 * S)))
        if d["bottom_style"] == "skirt":
            hip_c = xy["pelvis"] - 0.03 * (xy["neck"] - xy["pelvis"])
            hem = xy["pelvis"] + np.array([0.0, 0.22 * S])
            poly(zt + 0.03, self._slab(hip_c, hem, b["hw"] + 0.03, b["depth"] + 0.02, yaw, 1.7),
                 bottom)
        # head: hair behind, face (if turned towards us), hair on top
        rh = b["rh"] * S
        hc = xy["head"]
        sy_, cy_ = math.sin(yaw), math.cos(yaw)
        zh = z["head"]
        if d["hair_style"] == "long":
            poly(z["hair_back"], self._slab(hc, xy["hair_back"], 1.0 * b["rh"], 0.6 * b["rh"], yaw),
                 d["hair"])
        if d["hair_style"] == "bun":
            ellipse(z["bun"], xy["bun"], 0.45 * rh, 0.45 * rh, d["hair"])
        ellipse(zh, hc + np.array([-0.12 * sy_ * rh, -0.1 * rh]), 1.02 * rh, 1.04 * rh, d["hair"])
        if cy_ > -0.3:
            face_w = 0.82 * rh * (0.65 + 0.35 * abs(cy_))
            ellipse(zh + 1e-4, hc + np.array([0.25 * sy_ * rh, 0.14 * rh]), face_w, 0.86 * rh, skin)
            if cy_ > 0.3:
                for s in "rl":
                    e = xy[s + "_eye"]
                    add(zh + 2e-4, lambda bx: draw.ellipse(bx, fill=(25, 20, 20)),
                        [e[0] - 0.12 * rh, e[1] - 0.12 * rh, e[0] + 0.12 * rh, e[1] + 0.12 * rh])
        parts.sort(key=lambda t: (t[0], t[1]))
        for _, _, fn, args in parts if figure else ():
            fn(*args)
        return img.reduce(SS), self.label(i)

    def label(self, i):
        """OpenPose-style skeleton of frame i on black."""
        img = Image.new("RGB", (self.W * SS, self.H * SS))
        draw = ImageDraw.Draw(img)
        xy = [self.xy[k][i] for k in KEYPOINTS]
        vis = [bool(self.visible[k][i]) if k in self.visible else True for k in KEYPOINTS]
        w = max(SS, 0.032 * self.S)
        r = max(SS, 0.028 * self.S)
        for a, b, colour in BONES:
            if vis[a] and vis[b]:
                draw.line([tuple(xy[a]), tuple(xy[b])], fill=colour, width=int(round(w)))
        for k, (x, y) in enumerate(xy):
            if vis[k]:
                draw.ellipse([x - r, y - r, x + r, y + r], fill=KP_COLOUR[k])
        return img.reduce(SS)


# ----------------------------------------------------------------------------- dataset

def _save(img, path):
    img.save(path, format="PNG", compress_level=PNG_LEVEL)


def _render_chunk(task):
    """Worker: render frames [start, stop) of one video and write them. Returns the count."""
    video = Video(**task["video"])
    for i in range(task["start"], task["stop"]):
        frame, label = video.render(i)
        name = "frame%d.png" % (task["offset"] + i)
        _save(frame, os.path.join(task["img_dir"], name))
        _save(label, os.path.join(task["label_dir"], name))
        if i == 0 and task.get("first_dir"):
            _save(frame, os.path.join(task["first_dir"], name))
    return task["stop"] - task["start"]


def dataset_ready(out):
    """True when `out` holds a complete dataset written by this script."""
    return os.path.isfile(os.path.join(out, MARKER))


def _video_lengths(train_frames, window, videos):
    """Whole windows per video, as even as possible: no training window crosses two videos."""
    n_win = train_frames // window
    videos = max(1, min(videos, n_win))
    base, extra = divmod(n_win, videos)
    return [(base + (v < extra)) * window for v in range(videos)]


def _prepare_out(out, overwrite):
    """Create out, or replace a dataset this script wrote there; never delete anything else."""
    ours = os.path.exists(os.path.join(out, MARKER)) or os.path.exists(os.path.join(out, PARTIAL))
    present = [s for s in SPLIT_DIRS if os.path.isdir(os.path.join(out, s))]
    if present:
        if not ours:  # first: --overwrite would not help
            _fail(f"{out} holds data this generator did not write "
                  f"({', '.join(present)}); choose another --out")
        if not overwrite:
            _fail(f"{out} already holds a dataset ({', '.join(present)}); "
                  "pass --overwrite to replace it, or choose another --out")
    # Marked incomplete before anything is deleted: an interruption from here on leaves a folder
    # that every reader refuses and that --overwrite replaces.
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, PARTIAL), "w") as f:
        f.write("incomplete dataset written by scripts/make_dance_data.py\n")
    if os.path.exists(os.path.join(out, MARKER)):
        os.remove(os.path.join(out, MARKER))
    for s in present:
        shutil.rmtree(os.path.join(out, s))


def _check(seed, train_frames, val_frames, test_seqs, test_len, height, width, dancers, window,
           train_videos, unseen_seqs, unseen_dancers, motion, speed, turns, travel, background):
    checks = [(16 <= height <= MAX_SIDE and 16 <= width <= MAX_SIDE,
               f"--height and --width must be in 16 .. {MAX_SIDE}"),
              # numpy's SeedSequence reads a larger seed as several 32-bit words, and [2**32, a, 0]
              # is then [0, a, 1]: another seed's dancers, the unseen ones included.
              (0 <= seed < 2 ** 32, "--seed must be in 0 .. 2**32 - 1"),
              (window >= 1, "--window must be at least 1"),
              (train_frames >= window, f"--train_frames must be at least --window ({window})"),
              (val_frames >= 2, "--val_frames must be at least 2 (a validation sequence is 2 frames or more)"),
              (test_seqs >= 0 and unseen_seqs >= 0, "--test_seqs/--unseen_seqs must be >= 0"),
              (test_len >= 2, "--test_len must be at least 2 (the Tester predicts frames 1.. "
                              f"from frame 0), got {test_len}"),
              (dancers >= 1 and train_videos >= 1, "--dancers and --train_videos must be >= 1"),
              (unseen_dancers >= 1, "--unseen_dancers must be at least 1"),
              (0 <= motion <= 2, "--motion must be in [0, 2]"),
              (0 < speed <= 3, "--speed must be in (0, 3]"),
              (0 <= turns <= 0.6, "--turns must be in [0, 0.6]"),
              (0 <= travel <= 3, "--travel must be in [0, 3]"),
              (background in BACKGROUNDS, f"--background must be one of {', '.join(BACKGROUNDS)}")]
    for ok, msg in checks:
        if not ok:
            _fail(msg)


MAX_SIDE = 4096  # beyond it one frame alone is tens of MB, and a dataset would not fit in memory


def _worker_init():
    """A rendering worker leaves Ctrl-C, which reaches the whole process group, to the parent (it
    stops the pool and prints one line), and ends at once on the SIGTERM the pool stops it with.
    (dataloader's decoding workers do the same; these never import torch, so not from there.)
    Also set here for a worker that imports this module by name rather than as __mp_main__."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _seed(seed, *path):
    return np.random.SeedSequence([seed, *path])


def plan(seed=0, train_frames=20000, val_frames=630, test_seqs=5, test_len=630, height=128,
         width=256, dancers=8, train_videos=16, window=16, unseen_seqs=2, unseen_dancers=4,
         motion=1.0, speed=1.0, turns=0.15, travel=1.0, background="mixed"):
    """Every video of the dataset: split, folders, dancer, length, seed. Pure function of args."""
    _check(seed, train_frames, val_frames, test_seqs, test_len, height, width, dancers, window,
           train_videos, unseen_seqs, unseen_dancers, motion, speed, turns, travel, background)
    style = dict(height=height, width=width, motion=motion, speed=speed, turns=turns,
                 travel=travel, background=background)
    lengths = _video_lengths(train_frames, window, train_videos)
    dancers = min(dancers, len(lengths))
    people = [make_dancer(np.random.default_rng(_seed(seed, 1, k))) for k in range(dancers)]
    strangers = [make_dancer(np.random.default_rng(_seed(seed, 2, k)))
                 for k in range(unseen_dancers)]
    videos, offset = [], 0
    for v, n in enumerate(lengths):
        videos.append(dict(split="train", dirs=("train/train_img", "train/train_label", None),
                           offset=offset, dancer_id=v % dancers,
                           video=dict(dancer=people[v % dancers], seed=_seed(seed, 3, v),
                                      n_frames=n, **style)))
        offset += n
    videos.append(dict(split="val", dirs=("val/val_img", "val/val_label", None), offset=0,
                       dancer_id=0, video=dict(dancer=people[0], seed=_seed(seed, 4, 0),
                                               n_frames=val_frames, **style)))
    for split, count, pool, stream in (("test", test_seqs, people, 5),
                                       ("test_unseen", unseen_seqs, strangers, 6)):
        for k in range(count):
            videos.append(dict(split=split, dirs=(f"{split}/test_gt/{k}", f"{split}/test_label/{k}",
                                                  f"{split}/test_img/{k}"),
                               offset=0, dancer_id=k % len(pool),
                               video=dict(dancer=pool[k % len(pool)], seed=_seed(seed, stream, k),
                                          n_frames=test_len, **style)))
    return videos, dancers


def make_dataset(out, seed=0, train_frames=20000, val_frames=630, test_seqs=5, test_len=630,
                 height=128, width=256, dancers=8, workers=None, progress=True, *,
                 overwrite=False, train_videos=16, window=16, unseen_seqs=2, unseen_dancers=4,
                 motion=1.0, speed=1.0, turns=0.15, travel=1.0, background="mixed"):
    """Write a complete dataset in the lab's layout under `out` (see docs/DATA.md).

    train_frames is rounded down to whole windows of `window` frames. The keyword-only arguments
    set the difficulty: motion (joint excursion), speed (tempo), turns (share of motifs that spin
    or show the back), travel (root translation), background (mixed, plain, gradient, textured).
    Raises dataloader.DataError (a ValueError) for bad arguments or an output folder it may not
    touch.
    """
    from modules.files import write_json  # here, not at import: worker processes never load torch
    t0 = time.perf_counter()
    args = dict(seed=seed, train_frames=train_frames, val_frames=val_frames, test_seqs=test_seqs,
                test_len=test_len, height=height, width=width, dancers=dancers,
                train_videos=train_videos, window=window, unseen_seqs=unseen_seqs,
                unseen_dancers=unseen_dancers, motion=motion, speed=speed, turns=turns,
                travel=travel, background=background)
    videos, used_dancers = plan(**args)
    out = os.fspath(out)
    _prepare_out(out, overwrite)
    for v in videos:
        for d in v["dirs"]:
            if d:
                os.makedirs(os.path.join(out, d), exist_ok=True)
    total = sum(v["video"]["n_frames"] for v in videos)
    workers = max(1, workers or os.cpu_count() or 1)
    # Chunks small enough to keep every worker busy to the end, large enough that recomputing a
    # video's motion and background per chunk stays negligible.
    chunk = int(np.clip(total // (workers * 12), 32, 400))
    tasks = []
    for v in videos:
        n = v["video"]["n_frames"]
        img_dir, label_dir, first_dir = (os.path.join(out, d) if d else None for d in v["dirs"])
        for start in range(0, n, chunk):
            tasks.append(dict(video=v["video"], start=start, stop=min(n, start + chunk),
                              offset=v["offset"], img_dir=img_dir, label_dir=label_dir,
                              first_dir=first_dir))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, unit="frame", desc=f"rendering {out}", file=sys.stderr)
    if workers == 1 or total < SERIAL_BELOW:
        results = map(_render_chunk, tasks)
        pool = None
    else:
        # spawn: the same behaviour on every OS, and safe when the caller has imported torch
        pool = multiprocessing.get_context("spawn").Pool(min(workers, len(tasks)), initializer=_worker_init)
        results = pool.imap_unordered(_render_chunk, tasks)
    try:
        for done in results:
            if bar is not None:
                bar.update(done)
    except BaseException:
        if pool is not None:
            pool.terminate()
        raise
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        if bar is not None:
            bar.close()
    lengths = [v["video"]["n_frames"] for v in videos if v["split"] == "train"]
    manifest = dict(video_lengths=lengths, window=window,
                    dancer_ids=[v["dancer_id"] for v in videos if v["split"] == "train"])
    write_json(os.path.join(out, "train", "videos.json"), manifest)
    write_json(os.path.join(out, "val", "videos.json"),
                dict(video_lengths=[val_frames], window=window, dancer_ids=[0]))
    summary = dict(train=dict(frames=sum(lengths), videos=len(lengths)),
                   val=dict(frames=val_frames, videos=1),
                   test=dict(sequences=test_seqs, length=test_len,
                             dancer_ids=[v["dancer_id"] for v in videos if v["split"] == "test"]))
    if unseen_seqs:
        summary["test_unseen"] = dict(sequences=unseen_seqs, length=test_len)
    write_json(os.path.join(out, MARKER),
                dict(generator="scripts/make_dance_data.py", format=1, args=args,
                     dancers_used=used_dancers, splits=summary))
    os.remove(os.path.join(out, PARTIAL))
    if progress:
        print(f"wrote {out} in {time.perf_counter() - t0:.1f} s ({height}x{width} PNG):\n"
              f"  train: {sum(lengths)} frames, {len(lengths)} videos of {used_dancers} dancers "
              f"({sum(lengths) // window} windows of {window}; lengths in train/videos.json)\n"
              f"  val:   {val_frames} frames, 1 video of dancer 0\n"
              f"  test:  {test_seqs} sequences x {test_len} frames "
              f"(test_img, test_label, ground truth in test/test_gt)"
              + (f"\n  test_unseen: {unseen_seqs} sequences of new dancers" if unseen_seqs else ""))


def make_preview(path, seed=0, height=128, width=256, frames=8, stride=8, dancers=8, **style):
    """A strip of `frames` frames (every `stride`-th) above their labels, from the first training
    video of a small dataset of `frames * stride`-frame videos (not the default dataset's)."""
    videos, _ = plan(seed=seed, train_frames=16 * frames * stride, height=height, width=width,
                     dancers=dancers, test_seqs=0, **style)
    spec = dict(videos[0]["video"], n_frames=frames * stride)
    video = Video(**spec)
    strip = Image.new("RGB", (width * frames, height * 2))
    for j in range(frames):
        img, label = video.render(j * stride)
        strip.paste(img, (j * width, 0))
        strip.paste(label, (j * width, height))
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    strip.save(path, format="PNG", optimize=True)
    return path


def get_args_parser():
    from modules.options import HelpFormatter, Parser  # here, not at import, as write_json below
    p = Parser(
        description="Write the procedural dance dataset in the lab's layout (docs/DATA.md).",
        formatter_class=HelpFormatter)
    p.add_argument("--out", help="dataset root to write (the lab's DR)")
    p.add_argument("--seed", type=int, default=0,
                   help="same flags and seed give byte-identical files")
    p.add_argument("--train_frames", type=int, default=20000,
                   help="training frames, rounded down to whole windows")
    p.add_argument("--val_frames", type=int, default=630, help="frames of the validation video")
    p.add_argument("--test_seqs", type=int, default=5, help="test sequences")
    p.add_argument("--test_len", type=int, default=630, help="frames per test sequence (at least 2)")
    p.add_argument("--height", type=int, default=128, help="native render height")
    p.add_argument("--width", type=int, default=256, help="native render width")
    p.add_argument("--dancers", type=int, default=8, help="distinct people in training")
    p.add_argument("--train_videos", type=int, default=16,
                   help="training videos, each a whole number of windows")
    p.add_argument("--window", type=int, default=16,
                   help="training window (the lab's train_vi_len); video lengths are multiples")
    p.add_argument("--unseen_seqs", type=int, default=2,
                   help="extra test sequences of dancers never seen in training (test_unseen/)")
    p.add_argument("--unseen_dancers", type=int, default=4, help="people in test_unseen/")
    p.add_argument("--motion", type=float, default=1.0, help="joint excursion (0 = limbs still; --travel 0 --turns 0 for no travel or turns)")
    p.add_argument("--speed", type=float, default=1.0, help="tempo multiplier")
    p.add_argument("--turns", type=float, default=0.15,
                   help="share of dance motifs that spin round or show the back")
    p.add_argument("--travel", type=float, default=1.0, help="how far the dancer moves about")
    p.add_argument("--background", default="mixed", choices=BACKGROUNDS,
                   help="wall of each video; mixed draws one of the others per video")
    p.add_argument("--workers", type=int, default=None,
                   help="processes, all cores if not given; the files do not depend on it")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a dataset this script wrote earlier in --out")
    p.add_argument("--preview", metavar="PNG",
                   help="write a strip of frames above their labels (and, with --out, the data)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return p


def main(argv=None):
    try:
        from dataloader import DataError  # it loads torch: a second or more
    except KeyboardInterrupt:
        print("error: interrupted; nothing written", file=sys.stderr)
        return 130
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if not args.out and not args.preview:
        parser.print_usage(sys.stderr)
        print("error: give --out DIR (and/or --preview PNG)", file=sys.stderr)
        return 2
    style = dict(motion=args.motion, speed=args.speed, turns=args.turns, travel=args.travel,
                 background=args.background)
    try:
        if args.out and args.test_seqs < 1:  # make_dataset allows none (for tests); a user's dataset needs one
            _fail(f"--test_seqs must be at least 1 (Tester.py generates the test split), got {args.test_seqs}")
        if args.workers is not None and args.workers < 1:
            _fail(f"--workers must be at least 1 (without it: one per core), got {args.workers}")
        if args.out:  # first: a command that fails writes no preview either
            make_dataset(args.out, seed=args.seed, train_frames=args.train_frames,
                         val_frames=args.val_frames, test_seqs=args.test_seqs,
                         test_len=args.test_len, height=args.height, width=args.width,
                         dancers=args.dancers, workers=args.workers, progress=not args.quiet,
                         overwrite=args.overwrite, train_videos=args.train_videos,
                         window=args.window, unseen_seqs=args.unseen_seqs,
                         unseen_dancers=args.unseen_dancers, **style)
        if args.preview:
            make_preview(args.preview, seed=args.seed, height=args.height, width=args.width,
                         dancers=args.dancers, **style)
            if not args.quiet:
                print(f"wrote {args.preview} ({os.path.getsize(args.preview) // 1024} KB)")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path that is a file where a folder goes, a read-only place, a full disk
        what = e.filename or args.out or args.preview
        print(f"error: cannot write {what}: {e.strerror or e}; choose another --out / --preview",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        where = (f"; {args.out} is incomplete: run the same command with --overwrite to write it again"
                 if args.out and not dataset_ready(args.out) else "")
        print(f"error: interrupted{where}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
