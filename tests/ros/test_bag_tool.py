"""ovseg-bag: synthetic RGB-D recordings (sqlite3 and MCAP, written here) -> ovseg-bag -> the output bag read back.

The model-free color_key segmenter makes labels exact, so the outputs can be compared byte for byte with what
the live node publishes for the same frames, and a two-process gloo run with a one-process run.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from bag_helpers import COLOR, COMPRESSED, DEPTH, INFO, OTHER, VOCAB, frame_image, read_bag, read_order, write_rgbd_bag
from ros_harness import latched, reliable, require_ros_or_skip

require_ros_or_skip()

from rclpy.serialization import deserialize_message, serialize_message  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image, PointCloud2  # noqa: E402

import ovseg_ros  # noqa: E402
from ovseg_ros.msg import PanopticSegmentation, SegmentationInfo, Vocabulary  # noqa: E402
from ovseg_ros.tools.bag import main as bag_main  # noqa: E402

SEG = ["--segmenter", "color_key", "--device", "cpu", "--cache-dir", "", "--vocabulary", *VOCAB, "--no-progress"]
RGBD = ["--image", COLOR, "--depth", DEPTH, "--camera-info", INFO]
PER_FRAME = ("semantic/labels", "semantic/confidence", "panoptic", "info")


def _stamp(msg) -> int:
    return msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec


def _color_key_labels(image: np.ndarray) -> np.ndarray:
    from ovseg_ros.core.segmenter import build_segmenter
    from ovseg_ros.core.vocabulary import Vocabulary as CoreVocabulary

    seg = build_segmenter("color_key", "realtime", {}, device="cpu", cache_dir="", offline=True)
    state = seg.encode_vocabulary(CoreVocabulary.from_request(VOCAB))
    return seg.segment(image, state).labels


@pytest.mark.parametrize("storage,compressed", [("mcap", False), ("sqlite3", True)])
def test_every_frame_once_with_input_stamps(tmp_path: Path, storage: str, compressed: bool, capsys) -> None:
    rec = write_rgbd_bag(tmp_path / "in", storage, frames=7, compressed=compressed)
    image = ["--image", COMPRESSED if compressed else COLOR, "--depth", DEPTH, "--camera-info", INFO]
    out = tmp_path / "out"
    assert bag_main([str(rec.path), "-o", str(out), *SEG, *image, "--chunk", "3", "--copy", "inputs",
                     "--storage", storage]) == 0, capsys.readouterr().err
    assert not Path(f"{out}.partial").exists()  # parts dropped after the merge
    bag = read_bag(out)
    order = read_order(out)
    assert order[0][0] == "/segment_node/vocabulary"  # the latched vocabulary first
    vocab = deserialize_message(order[0][2], Vocabulary)
    assert [c.name for c in vocab.classes] == VOCAB and vocab.revision == 1 and vocab.segmenter == "color_key"
    for name in PER_FRAME + ("semantic/points",):
        msgs = bag[f"/segment_node/{name}"]
        assert [t for t, _ in msgs] == rec.log_times, name  # logged at the input frame's log time, once each
        typ = {"panoptic": PanopticSegmentation, "info": SegmentationInfo, "semantic/points": PointCloud2}.get(name, Image)
        assert [_stamp(deserialize_message(raw, typ)) for _, raw in msgs] == rec.stamps, name
    for i, (_, raw) in enumerate(bag["/segment_node/semantic/labels"]):
        msg = deserialize_message(raw, Image)
        got = np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height, msg.width)
        want = _color_key_labels(frame_image(i)).astype(np.uint8)  # -1 (unlabeled) -> 255, as the node encodes
        assert np.array_equal(got, want) and got[0, 0] == 255 and set(np.unique(got)) >= {0, 1, 255}
    # Copied inputs keep their messages; an unrelated topic is not copied with --copy inputs.
    assert len(bag[COMPRESSED if compressed else COLOR]) == 7 and len(bag[DEPTH]) == 7 and OTHER not in bag
    # Readable with rosbags' own deserializer from the definitions stored in the bag.
    from rosbags.highlevel import AnyReader

    with AnyReader([out]) as reader:
        conns = [c for c in reader.connections if c.topic == "/segment_node/info"]
        infos = [reader.deserialize(raw, c.msgtype) for c, _, raw in reader.messages(connections=conns)]
    assert [list(m.class_ids) for m in infos][0] and all(m.segmenter == "color_key" for m in infos)


@pytest.mark.skipif(shutil.which("ros2") is None, reason="the ROS 2 CLI (ros2 bag) is not installed")
@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_ros2_bag_info_reads_the_output(tmp_path: Path, storage: str) -> None:
    rec = write_rgbd_bag(tmp_path / "in", storage, frames=3)
    out = tmp_path / "out"
    assert bag_main([str(rec.path), "-o", str(out), *SEG, *RGBD, "--storage", storage]) == 0
    done = subprocess.run(["ros2", "bag", "info", str(out)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "/segment_node/semantic/labels" in done.stdout and "/segment_node/semantic/points" in done.stdout


def test_outputs_equal_the_live_node_byte_for_byte(tmp_path: Path, client, namespace: str, capsys) -> None:
    """The same frames through the real node (in-process, subscribed over DDS) and through ovseg-bag: every
    output is the same CDR message (~/info's measured timings and the vocabulary's configure-time stamp
    aside: they are set equal before comparing). rmw leaves CDR padding bytes uninitialised, so the node's
    message is serialized with rclpy and its padding zeroed (as ovseg-bag stores it) before comparing."""
    from ovseg_ros.tools.bag_io import Canonical, make_typestore

    canonical = Canonical(make_typestore())
    from ros_harness import active_inprocess_node

    rec = write_rgbd_bag(tmp_path / "in", "mcap", frames=4)
    node_ns = namespace + "_bytes"
    out = tmp_path / "out"
    assert bag_main([str(rec.path), "-o", str(out), *SEG, *RGBD, "--outputs", "color", "overlay",
                     "--node-name", f"{node_ns}/segment_node"]) == 0, capsys.readouterr().err
    bag = read_bag(out)
    # ovseg-bag segments chunks independently (resumable, sharded), so it does not track: track_id 0 as the
    # node publishes it with track_instances off (the filter is off by default on both)
    params = {"segmenter": "color_key", "device": "cpu", "cache_dir": "", "vocabulary": VOCAB,
              "publish_points": True, "track_instances": False}
    base = f"{node_ns}/segment_node/"
    types = {"semantic/labels": Image, "semantic/confidence": Image, "semantic/color": Image, "overlay": Image,
             "panoptic": PanopticSegmentation, "info": SegmentationInfo, "semantic/points": PointCloud2}
    with active_inprocess_node(node_ns, params):
        cols = {name: client.subscribe(base + name, t, reliable(50)) for name, t in types.items()}
        vocab_col = client.subscribe(base + "vocabulary", Vocabulary, latched())
        pub_img = client.publisher(f"{node_ns}/image", Image)
        pub_depth = client.publisher(f"{node_ns}/depth/image", Image)
        pub_info = client.publisher(f"{node_ns}/depth/camera_info", CameraInfo)
        frames = read_bag(rec.path)
        info_raw = frames[INFO][0][1]
        for (_, img_raw), (_, depth_raw), stamp in zip(frames[COLOR], frames[DEPTH], rec.stamps):
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # repeat until received (discovery, best-effort input)
                pub_info.publish(deserialize_message(info_raw, CameraInfo))
                pub_depth.publish(deserialize_message(depth_raw, Image))
                pub_img.publish(deserialize_message(img_raw, Image))
                if all(c.wait_for(lambda m: _stamp(m) == stamp, timeout=0.5) for c in cols.values()):
                    break
            else:
                pytest.fail(f"the node published no complete output set for frame {stamp}")
        vocab_msg = vocab_col.wait_for(timeout=10)
        assert vocab_msg is not None
        for name, col in cols.items():
            recorded = bag["/" + base.lstrip("/") + name]
            assert len(recorded) == len(rec.stamps), name
            for (_, raw), stamp in zip(recorded, rec.stamps):
                live = col.wait_for(lambda m: _stamp(m) == stamp, timeout=1)
                if name == "info":  # measured timings differ by nature; every other field must not
                    offline = deserialize_message(raw, SegmentationInfo)
                    for msg in (live, offline):
                        msg.latency_ms = msg.inference_ms = 0.0
                    raw = serialize_message(offline)
                msgtype = "ovseg_ros/msg/" + type(live).__name__ if name in ("info", "panoptic") else \
                    "sensor_msgs/msg/" + type(live).__name__
                if name == "info":
                    raw = canonical(raw, msgtype)
                assert canonical(serialize_message(live), msgtype) == raw, f"{name} of frame {stamp} differs"
    offline_vocab = deserialize_message(bag["/" + base.lstrip("/") + "vocabulary"][0][1], Vocabulary)
    offline_vocab.header.stamp = vocab_msg.header.stamp
    assert (canonical(serialize_message(offline_vocab), "ovseg_ros/msg/Vocabulary")
            == canonical(serialize_message(vocab_msg), "ovseg_ros/msg/Vocabulary"))


def test_two_cameras_publish_under_their_names(tmp_path: Path, capsys) -> None:
    """--image front=... --image back=...: outputs under ~/front/ and ~/back/, as the node's cameras parameter;
    the same frames raw and PNG-compressed give the same labels."""
    rec = write_rgbd_bag(tmp_path / "in", "mcap", frames=5, both=True, depth=False)
    out = tmp_path / "out"
    assert bag_main([str(rec.path), "-o", str(out), *SEG, "--image", f"front={COLOR}", "--image",
                     f"back={COMPRESSED}", "--node-name", "robot/seg"]) == 0, capsys.readouterr().err
    bag = read_bag(out)
    front, back = bag["/robot/seg/front/semantic/labels"], bag["/robot/seg/back/semantic/labels"]
    assert len(front) == len(back) == 5 and "/robot/seg/vocabulary" in bag
    assert [deserialize_message(r, Image).data.tobytes() for _, r in front] == \
        [deserialize_message(r, Image).data.tobytes() for _, r in back]
    assert "10 frames segmented" in capsys.readouterr().err


def test_time_window_and_every_nth_frame(tmp_path: Path, capsys) -> None:
    rec = write_rgbd_bag(tmp_path / "in", "sqlite3", frames=10)
    out = tmp_path / "out"
    # The recording starts with its only camera_info, 43 ms before the first frame's log time: frames 2..7
    # lie in [0.2, 0.8] s. The camera_info before the window still serves the clouds (a running node has it).
    assert bag_main([str(rec.path), "-o", str(out), *SEG, *RGBD, "--start", "0.2", "--end", "0.8",
                     "--every", "2"]) == 0
    bag = read_bag(out)
    for name in ("semantic/labels", "semantic/points"):
        assert [t for t, _ in bag[f"/segment_node/{name}"]] == [rec.log_times[i] for i in (2, 4, 6)], name
    assert "3 frames segmented" in capsys.readouterr().err


def test_interrupted_run_resumes_to_the_same_bag(tmp_path: Path, capsys) -> None:
    rec = write_rgbd_bag(tmp_path / "in", "mcap", frames=7)
    common = [str(rec.path), *SEG, *RGBD, "--chunk", "2", "--no-timings"]
    assert bag_main(common + ["-o", str(tmp_path / "full")]) == 0
    # A run that kept its parts; lose the output and one part (as if killed in that chunk), then rerun.
    partial = tmp_path / "resumed.partial"
    assert bag_main(common + ["-o", str(tmp_path / "resumed"), "--keep-parts"]) == 0
    shutil.rmtree(tmp_path / "resumed")
    (partial / "chunk-000001.part").unlink()
    capsys.readouterr()
    assert bag_main(common + ["-o", str(tmp_path / "resumed")]) == 0
    assert "(2 now" in capsys.readouterr().err  # only the lost chunk's 2 frames were segmented again
    assert read_order(tmp_path / "resumed") == read_order(tmp_path / "full")
    # Parts of other settings are refused, not mixed in.
    assert bag_main(common + ["-o", str(tmp_path / "full2"), "--keep-parts"]) == 0
    shutil.rmtree(tmp_path / "full2")
    assert bag_main([str(rec.path), *SEG, *RGBD, "--chunk", "3", "-o", str(tmp_path / "full2")]) == 2
    assert "another input or other settings" in capsys.readouterr().err


def test_ctrl_c_keeps_finished_chunks_and_the_rerun_continues(tmp_path: Path, capsys, monkeypatch) -> None:
    from ovseg_ros.ros import offline

    rec = write_rgbd_bag(tmp_path / "in", "sqlite3", frames=7)
    common = [str(rec.path), *SEG, *RGBD, "--chunk", "2", "--no-timings"]
    assert bag_main(common + ["-o", str(tmp_path / "full")]) == 0
    segment = offline.OfflineNode.segment
    calls = []

    def interrupted(self, image):  # Ctrl-C while segmenting the 6th frame (chunk 2)
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return segment(self, image)

    monkeypatch.setattr(offline.OfflineNode, "segment", interrupted)
    out = tmp_path / "out"
    assert bag_main(common + ["-o", str(out)]) == 130
    assert "run the same command to continue" in capsys.readouterr().err
    work = Path(f"{out}.partial")
    assert sorted(p.name for p in work.iterdir()) == ["chunk-000000.part", "chunk-000001.part", "manifest.json"]
    monkeypatch.setattr(offline.OfflineNode, "segment", segment)
    assert bag_main(common + ["-o", str(out)]) == 0
    assert "(3 now" in capsys.readouterr().err  # frames 4, 5, 6 only
    assert read_order(out) == read_order(tmp_path / "full")


def test_corrupt_or_truncated_input(tmp_path: Path, capsys) -> None:
    """A damaged recording: a clear error, and what was segmented before the damage is written and kept."""
    rec = write_rgbd_bag(tmp_path / "in", "sqlite3", frames=40, w=160, h=120, depth=False)
    db = next(rec.path.glob("*.db3"))
    data = bytearray(db.read_bytes())
    at = int(len(data) * 0.9)
    data[at: at + 3000] = b"\xff" * 3000  # pages near the end of the file
    db.write_bytes(bytes(data))
    out = tmp_path / "out"
    assert bag_main([str(rec.path), "-o", str(out), *SEG, "--chunk", "4"]) == 1
    err = capsys.readouterr().err
    assert "corrupt or truncated" in err and "holds the frames before that point" in err
    labels = read_bag(out)["/segment_node/semantic/labels"]
    assert 0 < len(labels) < 40 and [t for t, _ in labels] == rec.log_times[: len(labels)]
    assert sorted(Path(f"{out}.partial").glob("chunk-*.part"))  # kept for a rerun on a repaired bag
    # A truncated MCAP (recording killed): refused at open with the reason, nothing written.
    mc = write_rgbd_bag(tmp_path / "in2", "mcap", frames=5)
    f = next(mc.path.glob("*.mcap"))
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert bag_main([str(mc.path), "-o", str(tmp_path / "out2"), *SEG]) == 2
    assert "cannot open the bag" in capsys.readouterr().err and not (tmp_path / "out2").exists()


def test_refusals(tmp_path: Path, capsys) -> None:
    rec = write_rgbd_bag(tmp_path / "in", "mcap", frames=2)
    out = tmp_path / "out"
    assert bag_main([str(rec.path), "-o", str(out), *SEG, "--image", "/nope"]) == 2
    assert "not in the bag" in capsys.readouterr().err
    assert bag_main([str(rec.path), "-o", str(out), *SEG, "--image", DEPTH, "--depth", COLOR, "--camera-info", INFO,
                     "-p", "min_depth:=5.0", "-p", "max_depth:=1.0"]) == 2
    assert "min_depth" in capsys.readouterr().err
    assert bag_main([str(tmp_path / "missing"), "-o", str(out), *SEG]) == 2
    assert "no such bag" in capsys.readouterr().err
    out.mkdir()
    assert bag_main([str(rec.path), "-o", str(out), *SEG, "--image", COLOR]) == 2
    assert "exists" in capsys.readouterr().err


def test_progress_lines_without_a_terminal(capsys) -> None:
    from ovseg_ros.tools.bag import Progress

    progress = Progress(total=4, enabled=True, interval=0.0)  # pytest's stderr is not a terminal: plain lines
    progress.update()
    progress.update()
    progress.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and lines[1].startswith("ovseg-bag: 2/~4 frames,") and "frames/s, ETA " in lines[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_equal_one_process(tmp_path: Path) -> None:
    """torchrun --nproc_per_node=2 on the CPU: each process segments its chunks, rank 0 merges them into a bag
    identical, message for message and byte for byte, to a one-process run (timings off: they are measured)."""
    rec = write_rgbd_bag(tmp_path / "in", "mcap", frames=9)
    common = [str(rec.path), *SEG, *RGBD, "--chunk", "2", "--no-timings", "--copy", "all"]
    assert bag_main(common + ["-o", str(tmp_path / "one")]) == 0
    src = str(Path(ovseg_ros.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "ovseg_ros.tools.bag"] + common + ["-o", str(tmp_path / "two")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "over 2 process(es)" in done.stderr
    one, two = read_order(tmp_path / "one"), read_order(tmp_path / "two")
    assert len(one) == 1 + 9 * 5 + 9 * 2 + 1 + 3  # vocabulary, 5 outputs a frame, colour + depth, info, other
    assert two == one
