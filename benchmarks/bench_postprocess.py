#!/usr/bin/env python3
"""Per-frame cost of everything in the node that is not the model, stage by stage, before and after issue 10.

Stages (one core: OpenCV and torch limited to one thread):

* ``convert_in``  sensor_msgs/Image (rgb8 and bgr8) -> (H, W, 3) RGB array (:func:`image_msg_to_rgb`)
* ``encode``      label and confidence images in the wire dtypes (``encode_labels``, ``encode_confidence``)
* ``panoptic``    ``panoptic_from_semantic`` (thing components, stuff per class, areas, boxes, scores)
* ``messages``    labels/confidence/panoptic Image messages (``numpy_to_image``), PanopticSegmentation and
  SegmentationInfo (``panoptic_msg``, ``info_msg``)
* ``color``       ``colorize`` + ``overlay`` and their Image messages (only when someone subscribes)

Maps: ``realistic`` (a 20-class vocabulary, floor/wall/ceiling stuff and ~25 thing blobs: a few tens of
segments) and ``worst`` (a grid of 2000 tiny cells: about 1000 segments). "before" runs the implementations
replaced in issue 10, kept here verbatim as the baseline; "after" the package's. Minimum of ``--repeats``.

    source scripts/env.sh && python benchmarks/bench_postprocess.py --repeats 30
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from types import SimpleNamespace
from typing import Any, Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")
import cv2  # noqa: E402
import numpy as np  # noqa: E402

import benchlib  # noqa: E402  (also puts the repository root on sys.path)
from ovseg_ros.core.postprocess import colorize, make_palette, overlay, panoptic_from_semantic  # noqa: E402
from ovseg_ros.core.segmenter import PanopticResult, Segment  # noqa: E402
from ovseg_ros.core.vocabulary import UNLABELED, Vocabulary  # noqa: E402

STUFF = ["floor", "wall", "ceiling", "road", "grass", "sky", "carpet", "curtain"]
THINGS = ["person", "chair", "table", "door", "cup", "bottle", "laptop", "plant", "box", "bag", "dog", "shelf"]


# --- the implementations before issue 10 (the baseline) ------------------------------------------------
def old_panoptic(labels: np.ndarray, confidence: np.ndarray, vocabulary: Vocabulary) -> PanopticResult:
    h, w = labels.shape
    flat_labels = labels.ravel()
    provisional = np.full(h * w, -1, dtype=np.int64)
    owners: list[tuple[int, bool]] = []
    present = np.unique(flat_labels)
    for cls in present[(present != UNLABELED) & (present < len(vocabulary))]:
        cls = int(cls)
        thing = vocabulary.classes[cls].is_thing
        in_class = flat_labels == cls
        if thing:
            n, comp = cv2.connectedComponents(in_class.reshape(h, w).astype(np.uint8), connectivity=8)
            comp = comp.ravel()
            provisional[in_class] = comp[in_class] - 1 + len(owners)
            owners.extend((cls, True) for _ in range(n - 1))
        else:
            provisional[in_class] = len(owners)
            owners.append((cls, False))
    valid = provisional >= 0
    pid = provisional[valid]
    n = len(owners)
    area = np.bincount(pid, minlength=n)
    score_sum = np.bincount(pid, weights=confidence.ravel()[valid].astype(np.float64), minlength=n)
    ys, xs = np.divmod(np.flatnonzero(valid), w)
    x0, y0 = np.full(n, w, np.int64), np.full(n, h, np.int64)
    x1, y1 = np.full(n, -1, np.int64), np.full(n, -1, np.int64)
    np.minimum.at(x0, pid, xs)
    np.minimum.at(y0, pid, ys)
    np.maximum.at(x1, pid, xs)
    np.maximum.at(y1, pid, ys)
    keep = area >= 1
    final = np.zeros(n + 1, dtype=np.int32)
    final[1:][keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    ids = final[provisional + 1].reshape(h, w)
    segments = [Segment(int(final[k + 1]), cls, thing, float(score_sum[k] / area[k]), int(area[k]),
                        (int(x0[k]), int(y0[k]), int(x1[k] - x0[k] + 1), int(y1[k] - y0[k] + 1)))
                for k, (cls, thing) in enumerate(owners) if keep[k]]
    return PanopticResult(ids, segments)


def old_colorize(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    lut = np.vstack([np.zeros((1, 3), np.uint8), palette.astype(np.uint8)])
    idx = labels.astype(np.int64) + 1
    idx[(idx < 0) | (idx >= len(lut))] = 0
    return lut[idx]


def old_overlay(image: np.ndarray, color: np.ndarray, alpha: float, labels: np.ndarray) -> np.ndarray:
    blend = cv2.addWeighted(image, 1.0 - alpha, color, alpha, 0.0)
    keep = labels == UNLABELED
    blend[keep] = image[keep]
    return blend


def old_encode_labels(labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, str]:
    out = labels.astype(np.uint8)
    out[labels == UNLABELED] = 255
    return out, "mono8"


def old_encode_confidence(confidence: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(confidence * 255.0), 0, 255).astype(np.uint8)


def old_class_areas(labels: np.ndarray, num_classes: int) -> tuple[list[int], list[int]]:
    counts = np.bincount(labels.ravel().astype(np.int64) + 1, minlength=num_classes + 1)[1:]
    present = np.nonzero(counts)[0]
    return [int(c) for c in present], [int(counts[c]) for c in present]


def old_info_msg(header: Any, vocab: Vocabulary, labels: np.ndarray) -> Any:
    from ovseg_ros.msg import SegmentationInfo

    msg = SegmentationInfo()
    msg.header = header
    msg.vocabulary_revision = int(vocab.revision)
    msg.segmenter = "x"
    ids, areas = old_class_areas(labels, len(vocab))
    msg.class_ids = ids
    msg.class_areas = areas
    return msg


# --- inputs ----------------------------------------------------------------------------------------------
def vocabulary() -> Vocabulary:
    return Vocabulary.from_request(STUFF + THINGS, is_thing=[False] * len(STUFF) + [True] * len(THINGS))


def realistic_map(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Ceiling/wall/floor bands, a curtain, ~25 thing blobs (ellipses and boxes), a little unlabeled."""
    lab = np.full((h, w), 1, np.int32)  # wall
    lab[: h // 8] = 2  # ceiling
    lab[int(h * 0.62):] = 0  # floor
    cv2.rectangle(lab, (int(w * 0.75), h // 8), (w - 1, int(h * 0.62)), 7, -1)  # curtain
    n_stuff = len(STUFF)
    for _ in range(25):
        cls = n_stuff + int(rng.integers(0, len(THINGS)))
        cx, cy = int(rng.integers(0, w)), int(rng.integers(h // 4, h))
        ax, ay = int(rng.integers(w // 40, w // 8)), int(rng.integers(h // 30, h // 6))
        if rng.random() < 0.5:
            cv2.ellipse(lab, (cx, cy), (ax, ay), 0, 0, 360, cls, -1)
        else:
            cv2.rectangle(lab, (cx - ax, cy - ay), (cx + ax, cy + ay), cls, -1)
    cv2.circle(lab, (w // 3, h // 2), h // 20, UNLABELED, -1)
    return lab


def worst_map(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """40 x 50 cells of random classes (12 of 20 are things): about 1000 segments."""
    small = rng.integers(0, len(STUFF) + len(THINGS), (40, 50)).astype(np.int32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)


def image_msg(rgb: np.ndarray, encoding: str) -> Any:
    try:
        from sensor_msgs.msg import Image
    except ImportError:
        Image = None  # noqa: N806
    data = rgb if encoding == "rgb8" else cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    fields = dict(height=rgb.shape[0], width=rgb.shape[1], encoding=encoding, is_bigendian=0,
                  step=rgb.shape[1] * 3)
    if Image is None:
        return SimpleNamespace(data=data.tobytes(), **fields)
    import array

    msg = Image(**fields)
    buf = array.array("B")
    buf.frombytes(data.tobytes())
    msg.data = buf
    return msg


# --- measuring ---------------------------------------------------------------------------------------------
def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    """The least disturbed run (min) in ms: this machine is shared."""
    return benchlib.timed(fn, repeats, benchlib.torch.device("cpu"), reduce=min) * 1e3


def stages(h: int, w: int, kind: str, repeats: int, have_ros: bool) -> dict[str, dict[str, float]]:
    rng = np.random.default_rng(0)
    vocab = vocabulary()
    n = len(vocab)
    labels = realistic_map(h, w, rng) if kind == "realistic" else worst_map(h, w, rng)
    conf = rng.random((h, w), dtype=np.float32)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    palette = make_palette(n)
    out: dict[str, dict[str, float]] = {"before": {}, "after": {}}
    from ovseg_ros.ros.conversions import image_msg_to_rgb

    for enc in ("rgb8", "bgr8"):
        msg = image_msg(rgb, enc)
        t = median_ms(lambda: image_msg_to_rgb(msg), repeats)
        out["before"][f"in_{enc}"] = out["after"][f"in_{enc}"] = t  # the converter was already copy-free
    if have_ros:
        from std_msgs.msg import Header

        from ovseg_ros.ros import messages
        from ovseg_ros.ros.conversions import numpy_to_image

        header = Header()
    old_pan = old_panoptic(labels, conf, vocab)
    new_pan = panoptic_from_semantic(labels, conf, vocab)
    assert np.array_equal(old_pan.segment_ids, new_pan.segment_ids), "fast panoptic differs from the old one"
    out["before"]["segments"] = out["after"]["segments"] = float(len(new_pan.segments))
    for which in ("before", "after"):
        if which == "before":
            enc_l, enc_c = old_encode_labels, old_encode_confidence
            pan_fn, col_fn, ov_fn = old_panoptic, old_colorize, old_overlay
        else:
            enc_l, enc_c = messages_mod().encode_labels, messages_mod().encode_confidence
            pan_fn, col_fn, ov_fn = panoptic_from_semantic, colorize, overlay
        r = out[which]
        r["encode"] = median_ms(lambda: (enc_l(labels, n), enc_c(conf)), repeats)
        r["panoptic"] = median_ms(lambda: pan_fn(labels, conf, vocab), repeats)
        color = col_fn(labels, palette)
        r["color"] = median_ms(lambda: ov_fn(rgb, col_fn(labels, palette), 0.5, labels), repeats)
        if have_ros:
            lab8, _ = enc_l(labels, n)
            conf8 = enc_c(conf)
            pan = pan_fn(labels, conf, vocab)

            def build() -> None:
                numpy_to_image(lab8, "mono8", header)
                numpy_to_image(conf8, "mono8", header)
                messages.panoptic_msg(header, vocab, pan)
                if which == "before":
                    old_info_msg(header, vocab, labels)
                else:
                    messages.info_msg(header, vocab, "x", 0.0, 0.0, 0, labels)

            r["messages"] = median_ms(build, repeats)
            r["color"] += median_ms(lambda: (numpy_to_image(color, "rgb8", header),
                                             numpy_to_image(color, "rgb8", header)), repeats)
    for r in out.values():
        r["total"] = r["in_rgb8"] + r["encode"] + r["panoptic"] + r.get("messages", 0.0)
        r["total+color"] = r["total"] + r["color"]
    return out


_MESSAGES: Any = None


def messages_mod() -> Any:
    """The package's encoders (ovseg_ros.ros.messages needs the built interfaces; fall back to a copy)."""
    global _MESSAGES
    if _MESSAGES is None:
        try:
            from ovseg_ros.ros import messages as m
        except ImportError:
            m = SimpleNamespace(encode_labels=old_encode_labels, encode_confidence=old_encode_confidence)
            print("note: ovseg_ros interfaces not built (source scripts/env.sh): encoders measured as before")
        _MESSAGES = m
    return _MESSAGES


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="*", default=["480x640", "720x1280"])
    ap.add_argument("--maps", nargs="*", default=["realistic", "worst"])
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    cv2.setNumThreads(1)
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    try:
        from ovseg_ros.msg import PanopticSegmentation  # noqa: F401
        from std_msgs.msg import Header  # noqa: F401

        have_ros = True
    except ImportError:
        have_ros = False
        print("note: ROS messages not importable (source scripts/env.sh): message stages skipped")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus (1 thread used), "
          f"python {sys.version.split()[0]}, numpy {np.__version__}, opencv {cv2.__version__}")
    cols = ["in_rgb8", "in_bgr8", "encode", "panoptic", "messages", "color", "total", "total+color"]
    print(f"{'size':<9} {'map':<10} {'segs':>5} {'version':<7} " + " ".join(f"{c:>11}" for c in cols) + "   (ms)")
    for size in args.sizes:
        h, w = (int(v) for v in size.split("x"))
        for kind in args.maps:
            res = stages(h, w, kind, args.repeats, have_ros)
            for which in ("before", "after"):
                r = res[which]
                print(f"{size:<9} {kind:<10} {int(r['segments']):>5} {which:<7} "
                      + " ".join(f"{r.get(c, float('nan')):>11.2f}" for c in cols))
            b, a = res["before"], res["after"]
            print(f"{'':<9} {'':<10} {'':>5} {'ratio':<7} "
                  + " ".join(f"{b.get(c, float('nan')) / max(a.get(c, float('nan')), 1e-9):>10.1f}x" for c in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
