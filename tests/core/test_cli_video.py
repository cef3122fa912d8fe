"""``ovseg-segment`` on video: an ordered folder of frames (``--sequence``) and a video file, with the node's
tracking and filter; track ids in the per-frame JSON, checked against the synthetic ground truth."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from ovseg_ros import cli
from ovseg_ros.eval.video_synth import CLASSES, SceneConfig, color_key_options, generate

ARGS = ["--segmenter", "color_key", "--preset", "realtime", "--options", json.dumps(color_key_options()),
        "--vocabulary", *CLASSES, "--panoptic-min-area", "16"]


def _write_frames(folder: Path, scene: SceneConfig) -> list:
    folder.mkdir()
    frames = list(generate(scene))
    for k, f in enumerate(frames):  # names that sort wrongly as text: frame2 < frame10 only in natural order
        cv2.imwrite(str(folder / f"frame{k}.png"), cv2.cvtColor(f.image, cv2.COLOR_RGB2BGR))
    return frames


def test_folder_sequence_keeps_track_ids(tmp_path: Path) -> None:
    frames = _write_frames(tmp_path / "seq", SceneConfig(width=160, height=120, frames=24, objects=4, seed=3))
    out = tmp_path / "out"
    assert cli.main([str(tmp_path / "seq"), "--sequence", "-o", str(out), "--fps", "10", *ARGS]) == 0
    ids_of: dict[int, set[int]] = {}
    for k, f in enumerate(frames):
        meta = json.loads((out / "seq" / f"{k:06d}.json").read_text())
        assert meta["frame"] == k and meta["frame_name"] == f"frame{k}.png"
        assert abs(meta["stamp_s"] - k / 10) < 1e-9
        seg_ids = cv2.imread(str(out / "seq" / f"{k:06d}_labels.png"), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(seg_ids, f.labels.astype(np.uint8))
        things = [s for s in meta["segments"] if s["is_thing"]]
        assert things and all(s["track_id"] > 0 for s in things)
        assert all(s["track_id"] == 0 for s in meta["segments"] if not s["is_thing"])
        # each visible object is one thing segment of its class; match them by box overlap with the truth
        for obj in np.unique(f.instances):
            m = f.instances == obj
            if obj == 0 or m.sum() < 64:
                continue
            ys, xs = np.nonzero(m)
            best = max(things, key=lambda s: _overlap(s["bbox"], (xs.min(), ys.min(), xs.max(), ys.max())))
            ids_of.setdefault(int(obj), set()).add(best["track_id"])
    assert len(ids_of) >= 3 and all(len(v) == 1 for v in ids_of.values()), ids_of


def _overlap(bbox: list, box: tuple) -> int:
    x, y, w, h = bbox
    return max(0, min(x + w - 1, box[2]) - max(x, box[0]) + 1) * max(0, min(y + h - 1, box[3]) - max(y, box[1]) + 1)


def test_video_file_and_filter(tmp_path: Path) -> None:
    frames = list(generate(SceneConfig(width=160, height=120, frames=12, objects=4, seed=3)))
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 15.0, (160, 120))
    assert writer.isOpened()
    for f in frames:
        writer.write(cv2.cvtColor(f.image, cv2.COLOR_RGB2BGR))
    writer.release()
    out = tmp_path / "out"
    assert cli.main([str(path), "-o", str(out), "--temporal-filter", "vote", *ARGS]) == 0
    metas = [json.loads((out / "clip" / f"{k:06d}.json").read_text()) for k in range(len(frames))]
    stamps = [m["stamp_s"] for m in metas]
    assert all(b > a for a, b in zip(stamps, stamps[1:]))
    assert all("track_id" in s for m in metas for s in m["segments"])
    assert any(s["track_id"] > 0 for m in metas for s in m["segments"])


def test_bad_video_and_options_are_reported(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video")
    assert cli.main([str(bad), "-o", str(tmp_path / "o"), *ARGS]) == 1
    assert "not a readable video" in capsys.readouterr().err
    assert cli.main([str(bad), "-o", str(tmp_path / "o"), "--temporal-frames", "99", *ARGS]) == 2
    assert "frames must be in" in capsys.readouterr().err
    assert cli.main([str(bad), "-o", str(tmp_path / "o"), "--fps", "0", *ARGS]) == 2
