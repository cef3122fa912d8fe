"""Synthetic video with exact ground truth, for measuring tracking and label flicker (tests, bench_tracking).

A scene of stuff (wall above, floor below) and thing objects (rectangles and ellipses of several classes) in a
world wider than the view: objects move at constant speed and bounce at the world's ends, so they occlude
each other (fixed depth order), leave the view and come back; the camera pans (sinusoid) and frames can be
dropped (never delivered; the stamps jump). Every pixel is painted in its class's key colour, so the model-free
``color_key`` segmenter (with :func:`color_key_options`) recovers the labels exactly from the image (which only
carries Gaussian pixel noise). The errors a real segmenter makes are injected into its *labels*
(:meth:`SyntheticFrame.corrupt`), not into the image - a segmenter's flicker happens while the image stays the
same:

* ``border``: each pixel next to a class border takes the label of a random pixel up to 2 px away with this
  probability, every frame (label noise at borders, the usual flicker);
* ``split``: with this probability per object and frame, a vertical background stripe cuts the object in two
  for that frame (an instance split);
* ``miss``: with this probability per object and frame, the object is labelled as the background behind it
  (a missed detection).

Objects of one class move in lanes that never touch, so that every connected component of a class is one
object (the instances that ``panoptic_from_semantic`` derives). The scene and the noise draw from separate
random generators: one ``seed`` gives the same scene under every kind of noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import cv2
import numpy as np

from ..core.vocabulary import Vocabulary

#: Classes (stuff first) and their key colours (pairwise far apart, also in every single channel pair).
CLASSES = ("wall", "floor", "chair", "person", "box")
IS_THING = (False, False, True, True, True)
COLORS = ("#3c3ca0", "#8c643c", "#e62828", "#28c83c", "#e6dc28")


def vocabulary() -> Vocabulary:
    return Vocabulary.from_request(list(CLASSES), is_thing=list(IS_THING))


def color_key_options() -> dict:
    """``color_key`` options that key :data:`CLASSES` to :data:`COLORS`."""
    return {"colors": list(COLORS), "max_distance": 40.0}


def _rgb(text: str) -> np.ndarray:
    return np.array([int(text[i: i + 2], 16) for i in (1, 3, 5)], np.uint8)


@dataclass(frozen=True)
class SceneConfig:
    width: int = 320
    height: int = 240
    frames: int = 150
    fps: float = 30.0
    objects: int = 6
    seed: int = 0
    #: camera pan amplitude as a share of the width (0: static camera) and its period in frames
    pan: float = 0.0
    pan_period: int = 120
    #: object speed in share of the width per frame (each object gets 0.75..1.5 times it)
    speed: float = 0.01
    #: probability that a frame is dropped (not delivered)
    drop: float = 0.0
    border: float = 0.0
    split: float = 0.0
    miss: float = 0.0
    #: Gaussian pixel noise (standard deviation, grey levels)
    pixel_sigma: float = 2.0


@dataclass
class SyntheticFrame:
    index: int  # frame number in the scene's timeline (dropped frames leave gaps)
    stamp_ns: int
    image: np.ndarray  # (H, W, 3) uint8 RGB: key colours plus pixel noise
    labels: np.ndarray  # (H, W) int32 ground-truth class ids (every pixel has one)
    instances: np.ndarray  # (H, W) int32 ground-truth object ids (1..objects; 0 = stuff)
    noisy: np.ndarray  # (H, W) int32 the labels with this frame's injected segmenter errors

    def corrupt(self, labels: np.ndarray) -> np.ndarray:
        """A segmenter's ``labels`` of this frame with the injected errors (where they differ from the truth)."""
        return np.where(self.noisy != self.labels, self.noisy, labels).astype(labels.dtype, copy=False)


@dataclass
class _Object:
    cls: int
    w: int
    h: int
    y: int
    x: float
    vx: float
    ellipse: bool


def _objects(cfg: SceneConfig, world_w: int, rng: np.random.Generator) -> list[_Object]:
    things = [i for i, t in enumerate(IS_THING) if t]
    n_cls = len(things)
    lanes = max(cfg.objects, 1)
    top, bottom = 0.12 * cfg.height, 0.88 * cfg.height
    # same-class objects are n_cls lanes apart: their lanes must not touch
    spacing = (bottom - top) / max(lanes - 1, 1)
    h_max = int(min(0.22 * cfg.height, n_cls * spacing - 3))
    out = []
    for k in range(cfg.objects):
        h = int(rng.integers(max(h_max * 2 // 3, 4), max(h_max, 5)))
        w = int(h * rng.uniform(0.8, 1.6))
        yc = top + k * spacing if lanes > 1 else cfg.height / 2
        speed = cfg.speed * cfg.width * rng.uniform(0.75, 1.5) * (1 if rng.random() < 0.5 else -1)
        out.append(_Object(things[k % n_cls], w, h, int(yc - h / 2), float(rng.uniform(0, world_w - w)), speed,
                           bool(k % 2)))
    return out


def generate(cfg: SceneConfig) -> Iterator[SyntheticFrame]:
    """The delivered frames of the scene, in order."""
    scene_rng = np.random.default_rng(cfg.seed)
    noise_rng = np.random.default_rng(cfg.seed + 1_000_003)
    drop_rng = np.random.default_rng(cfg.seed + 2_000_003)  # the same drops and images under every noise
    pixel_rng = np.random.default_rng(cfg.seed + 3_000_003)
    margin = int(round((max(cfg.pan, 0.0) + 0.2) * cfg.width))
    world_w = cfg.width + 2 * margin
    objs = _objects(cfg, world_w, scene_rng)
    colors = np.stack([_rgb(c) for c in COLORS])
    horizon = int(0.55 * cfg.height)
    period_ns = int(round(1e9 / cfg.fps))
    for t in range(cfg.frames):
        cam_x = margin + int(round(cfg.pan * cfg.width * np.sin(2 * np.pi * t / max(cfg.pan_period, 1))))
        labels = np.zeros((cfg.height, cfg.width), np.int32)
        labels[horizon:] = 1
        background = labels.copy()
        instances = np.zeros_like(labels)
        painted = labels.copy()  # what the segmenter will output (noise: split, miss, border)
        for k, o in enumerate(objs):
            x0 = int(round(o.x)) - cam_x
            mask = np.zeros((cfg.height, cfg.width), np.uint8)
            if o.ellipse:
                cv2.ellipse(mask, (x0 + o.w // 2, o.y + o.h // 2), (o.w // 2, o.h // 2), 0, 0, 360, 1, -1)
            else:
                cv2.rectangle(mask, (x0, o.y), (x0 + o.w - 1, o.y + o.h - 1), 1, -1)
            m = mask.astype(bool)
            labels[m] = o.cls
            instances[m] = k + 1
            if cfg.miss and noise_rng.random() < cfg.miss:
                painted[m] = background[m]
                continue
            painted[m] = o.cls
            if cfg.split and noise_rng.random() < cfg.split:
                sw = max(2, o.w // 8)
                xs = x0 + o.w // 2 - sw // 2
                stripe = np.zeros_like(m)
                stripe[:, max(xs, 0): max(xs + sw, 0)] = True
                painted[m & stripe] = background[m & stripe]
        for o in objs:  # move (bounce at the world's ends)
            o.x += o.vx
            if o.x < 0 or o.x > world_w - o.w:
                o.vx = -o.vx
                o.x = float(np.clip(o.x, 0, world_w - o.w))
        if t > 0 and cfg.drop and drop_rng.random() < cfg.drop:
            continue  # dropped: never delivered
        if cfg.border:
            painted = _border_noise(painted, cfg.border, noise_rng)
        image = colors[labels]
        if cfg.pixel_sigma > 0:
            noise = pixel_rng.normal(0.0, cfg.pixel_sigma, image.shape)
            image = np.clip(image.astype(np.float32) + noise, 0, 255).astype(np.uint8)
        yield SyntheticFrame(t, (t + 1) * period_ns, image, labels, instances, painted)


def _border_noise(labels: np.ndarray, p: float, rng: np.random.Generator) -> np.ndarray:
    """Each pixel within 1 px of a class border takes the label of a random pixel up to 2 px away, with prob ``p``."""
    lab = labels.astype(np.uint8)
    k = np.ones((3, 3), np.uint8)
    border = cv2.dilate(lab, k) != cv2.erode(lab, k)
    ys, xs = np.nonzero(border & (rng.random(labels.shape) < p))
    h, w = labels.shape
    dy = rng.integers(-2, 3, ys.size)
    dx = rng.integers(-2, 3, xs.size)
    out = labels.copy()
    out[ys, xs] = labels[np.clip(ys + dy, 0, h - 1), np.clip(xs + dx, 0, w - 1)]
    return out
