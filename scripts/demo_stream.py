#!/usr/bin/env python3
"""The demo's client side (run by scripts/demo.sh, DDS settings from scripts/env.sh).

Starts the real segment_node on a tiny RANDOM-weight model, streams a synthetic camera over loopback DDS,
sets the vocabulary through ~/set_vocabulary, prints what comes out (topics, encodings, sizes, revisions,
fps, latency), changes the vocabulary mid-stream to show the revision flowing into the outputs, runs a
~/query, and shuts the node down cleanly.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

RANDOM_WARNING = (
    "NOTE: the model has RANDOM weights (no CLIP weights exist on this machine), so the masks are\n"
    "      meaningless. The demo shows the plumbing: topics, encodings, headers, revisions, rates."
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("log/demo"))
    p.add_argument("--checkpoint", type=Path, default=None, help="weights file (default: a random tiny model)")
    p.add_argument("--model", default="ovseg-tiny-vit")
    p.add_argument("--segmenter", default="dense_clip")
    p.add_argument("--device", default="auto")
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--height", type=int, default=240)
    p.add_argument("--rate", type=float, default=15.0, help="camera rate, Hz")
    p.add_argument("--seconds", type=float, default=4.0, help="length of each streaming phase")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from sensor_msgs.msg import Image

    from ovseg_ros.msg import PanopticSegmentation, SegmentationInfo, Vocabulary
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # stream_client lives beside this script
    from stream_client import (
        NodeProcess,
        StreamClient,
        rgb_image_msg,
        stamp_ns,
        synthetic_frame,
    )
    from ovseg_ros.srv import Query, SetVocabulary

    print(RANDOM_WARNING)
    ckpt = args.checkpoint
    if ckpt is None:
        from ovseg_ros.core.models import save_random_checkpoint

        ckpt = save_random_checkpoint(args.model, args.workdir / f"{args.model}-random.pt", seed=0)
        print(f"saved random weights: {ckpt}")
    ns = f"/ovseg_demo_{os.getpid()}"
    params = {"segmenter": args.segmenter, "model": args.model, "checkpoint": str(ckpt), "device": args.device,
              "cache_dir": "", "vocabulary_preset": "indoor_robot", "diagnostics_period": 1.0}
    node = NodeProcess(ns, params, args.workdir)
    print(f"started segment_node (pid {node.pid}) as {node.fqn}; log: {node.log_path}")
    rclpy.init()
    client = StreamClient("ovseg_demo_client")
    fqn = node.fqn
    try:
        vocab = client.record(f"{fqn}/vocabulary", Vocabulary, latched=True)
        first = vocab.wait(timeout=180)
        if first is None:
            print("the node did not come up; its log:\n" + node.log_path.read_text()[-3000:])
            return 1
        print(f"\n~/vocabulary (latched): revision {first.revision}, {len(first.classes)} classes from the "
              f"indoor_robot preset, labels {first.label_encoding}, model {first.model}")

        req = SetVocabulary.Request(classes=["floor", "chair", "person, people", "door"])
        resp = client.call(SetVocabulary, f"{fqn}/set_vocabulary", req)
        print(f"~/set_vocabulary {list(req.classes)} -> success={resp.success}: {resp.message}")

        topics = {"semantic/labels": Image, "semantic/confidence": Image, "semantic/color": Image,
                  "overlay": Image, "panoptic": PanopticSegmentation, "info": SegmentationInfo}
        recs = {t: client.record(f"{fqn}/{t}", ty) for t, ty in topics.items()}
        diag = client.record("/diagnostics", DiagnosticArray)
        pub = client.node.create_publisher(Image, f"{ns}/image", 5)
        time.sleep(1.0)  # discovery

        def stream(seconds: float, start: int) -> int:
            n, t_end = start, time.monotonic() + seconds
            while time.monotonic() < t_end:
                stamp = client.node.get_clock().now().to_msg()
                pub.publish(rgb_image_msg(synthetic_frame(n, args.width, args.height), stamp))
                n += 1
                time.sleep(1.0 / args.rate)
            return n

        print(f"\nstreaming {args.width}x{args.height} rgb8 at {args.rate:g} Hz on {ns}/image for {args.seconds:g} s ...")
        t0 = time.monotonic()
        sent = stream(args.seconds, 0)
        phase1 = time.monotonic() - t0
        time.sleep(1.0)
        print_outputs(recs, sent, phase1)

        new = ["wall", "table, desk", "cat", "dog", "window"]
        print(f"\nchanging the vocabulary mid-stream to {new} ...")
        changed = {}

        def change() -> None:
            changed["resp"] = client.call(SetVocabulary, f"{fqn}/set_vocabulary", SetVocabulary.Request(classes=new))

        import threading

        th = threading.Thread(target=change)
        th.start()
        sent = stream(args.seconds, sent)
        th.join()
        time.sleep(1.0)
        print(f"~/set_vocabulary -> success={changed['resp'].success}: {changed['resp'].message}")
        infos = recs["info"].messages()
        revs = [m.vocabulary_revision for m in infos]
        switch = next((i for i in range(1, len(revs)) if revs[i] != revs[i - 1]), None)
        if switch is not None:
            print(f"~/info revisions around the switch: {revs[max(0, switch - 3): switch + 3]} "
                  f"(frame {stamp_ns(infos[switch].header)} is the first with revision {revs[switch]})")
        pans = {stamp_ns(m.header): m.vocabulary_revision for m in recs["panoptic"].messages()}
        mixed = sum(1 for m in infos if pans.get(stamp_ns(m.header), m.vocabulary_revision) != m.vocabulary_revision)
        print(f"frames whose ~/info and ~/panoptic revisions differ: {mixed} (must be 0)")
        last = vocab.wait(lambda m: m.revision == changed["resp"].revision, timeout=5)
        if last is not None:
            print(f"~/vocabulary republished: revision {last.revision}: {[c.name for c in last.classes]}")

        q = client.call(Query, f"{fqn}/query", Query.Request(texts=["a red box", "the floor"]))
        sizes = [f"{m.width}x{m.height} {m.encoding}" for m in q.masks]
        print(f"\n~/query ['a red box', 'the floor'] on the latest frame -> success={q.success}: masks {sizes}, "
              f"scores {[round(s, 3) for s in q.scores]}")
        ours = [m for m in diag.messages() if any(fqn in s.name for s in m.status)]
        if ours:
            msg = ours[-1]
            st = next(s for s in msg.status if fqn in s.name)
            kv = {v.key: v.value for v in st.values}
            keys = ["frames_received", "frames_processed", "frames_dropped", "frames_refused", "latency_ms_mean",
                    "inference_ms_mean", "device", "vocabulary_revision"]
            print(f"/diagnostics (last) [{st.message}]: " + ", ".join(f"{k}={kv.get(k, '')}" for k in keys))
        print("\n" + RANDOM_WARNING)
    finally:
        client.close()
        rclpy.try_shutdown()
        code = node.stop()
        print(f"\nsegment_node stopped with exit code {code}")
    return 0 if code == 0 else 1


def print_outputs(recs: dict, sent: int, seconds: float) -> None:
    """One line per output topic: count, type, encoding, size, header/revision facts."""
    from stream_client import stamp_ns

    print(f"sent {sent} frames in {seconds:.1f} s")
    for topic, rec in recs.items():
        items = list(rec.items)
        if not items:
            print(f"  ~/{topic:<20} nothing received")
            continue
        msg = items[-1][1]
        kind = type(msg).__name__
        if kind == "Image":
            detail = f"{msg.encoding} {msg.width}x{msg.height}"
        elif kind == "PanopticSegmentation":
            detail = (f"{msg.segment_ids.encoding} {msg.segment_ids.width}x{msg.segment_ids.height}, "
                      f"{len(msg.segments)} segments, revision {msg.vocabulary_revision}")
        else:
            lat = np.array([m.latency_ms for _, m in items])
            detail = (f"revision {msg.vocabulary_revision}, latency ms mean {lat.mean():.0f} p95 "
                      f"{np.percentile(lat, 95):.0f}, inference {msg.inference_ms:.0f} ms, dropped "
                      f"{sum(m.dropped_frames for _, m in items)} frames, classes present {list(msg.class_ids)}")
        print(f"  ~/{topic:<20} {len(items):4d} msgs ({len(items) / seconds:5.1f} fps)  {kind}: {detail}, "
              f"frame_id '{msg.header.frame_id}', stamp {stamp_ns(msg.header)}")


if __name__ == "__main__":
    sys.exit(main())
