"""segment_node run in-process (own multi-threaded executor thread) over loopback DDS: the latest-frame
policy under a deliberately slow segmenter, overlays computed only for subscribers, compressed input, and
runtime parameter validation. In-process so a test-only wrapper can slow the segmenter down."""

from __future__ import annotations

import time
from typing import Any, Iterator

import cv2
import numpy as np
import pytest
from ros_harness import (
    RosClient,
    active_inprocess_node,
    make_image,
    publish_until,
    require_ros_or_skip,
    same_header,
    stamp_of,
)

require_ros_or_skip()

from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402

from ovseg_ros.msg import SegmentationInfo  # noqa: E402
from ovseg_ros.ros.segment_node import SegmentNode  # noqa: E402

SLOW_S = 0.4  # added to every segment() call by the test wrapper
STREAM_HZ = 30.0


@pytest.fixture(scope="module")
def node(ros_session: None, fast_params: dict, namespace: str) -> Iterator[SegmentNode]:
    with active_inprocess_node(namespace, {**fast_params, "use_compressed": True}) as n:
        yield n


@pytest.fixture()
def topics(node: SegmentNode, namespace: str) -> dict[str, str]:
    fqn = node.get_fully_qualified_name()
    return {"image": f"{namespace}/image", "compressed": f"{namespace}/image/compressed",
            "labels": f"{fqn}/semantic/labels", "info": f"{fqn}/info", "color": f"{fqn}/semantic/color",
            "overlay": f"{fqn}/overlay"}


def test_slow_segmenter_drops_stale_frames_without_backlog(node: SegmentNode, client: RosClient,
                                                           topics: dict[str, str]) -> None:
    info = client.subscribe(topics["info"], SegmentationInfo)
    pub = client.publisher(topics["image"], Image)
    publish_until(pub, lambda i: make_image(), info, lambda m, s: True, timeout=30)  # discovery done
    inner = node.segmenter.segment

    def slow_segment(image: np.ndarray, state: Any = None) -> Any:
        time.sleep(SLOW_S)
        return inner(image, state)

    node.segmenter.segment = slow_segment  # test-only wrapper (instance attribute shadows the method)
    try:
        time.sleep(2 * SLOW_S)
        info.clear()
        dropped_before = node.cameras[0].mailbox.dropped_total
        sent = 0
        t_end = time.monotonic() + 3.0
        while time.monotonic() < t_end:
            msg = make_image()
            msg.header.stamp = client.node.get_clock().now().to_msg()
            pub.publish(msg)
            sent += 1
            time.sleep(1.0 / STREAM_HZ)
        stopped = time.monotonic()
        n_at_stop = len(info.snapshot())
        time.sleep(3 * SLOW_S + 0.5)
        msgs = info.snapshot()
    finally:
        node.segmenter.segment = inner
    processed = len(msgs)
    dropped = node.cameras[0].mailbox.dropped_total - dropped_before
    latencies = [m.latency_ms for m in msgs]
    print(f"sent {sent}, processed {processed}, dropped {dropped}, latency ms {latencies}")
    assert 3 <= processed <= 3.0 / SLOW_S + 3
    assert dropped >= sent // 2, "stale frames must be dropped (and counted), not queued"
    assert sum(m.dropped_frames for m in msgs) >= dropped - 2  # reported per frame in ~/info
    # bounded latency: a frame waits at most about one inference, then its own inference
    assert max(latencies) < 1000 * (3 * SLOW_S) + 1500
    # no backlog: after the stream stops, at most the in-flight frame, the one in the mailbox and one result
    # in the publishing stage's slot come out
    assert len(msgs) - n_at_stop <= 3, f"{len(msgs) - n_at_stop} outputs after the stream stopped at {stopped}"


def test_color_and_overlay_computed_only_when_subscribed(node: SegmentNode, client: RosClient,
                                                         topics: dict[str, str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from ovseg_ros.core import postprocess

    calls = []
    original = postprocess.colorize
    monkeypatch.setattr(postprocess, "colorize", lambda *a, **k: calls.append(1) or original(*a, **k))
    labels = client.subscribe(topics["labels"], Image)
    pub = client.publisher(topics["image"], Image)
    hit, _ = publish_until(pub, lambda i: make_image(), labels,
                           lambda m, sent: any(same_header(m.header, s.header) for s in sent), timeout=30)
    assert hit is not None
    for _ in range(3):
        publish_until(pub, lambda i: make_image(), labels, lambda m, sent: same_header(m.header, sent[-1].header))
    assert calls == [], "colour computed with nobody subscribed"
    overlay = client.subscribe(topics["overlay"], Image)
    hit, _ = publish_until(pub, lambda i: make_image(), overlay,
                           lambda m, sent: any(same_header(m.header, s.header) for s in sent), timeout=30)
    client.unsubscribe(overlay)
    assert hit is not None and hit.encoding == "rgb8"
    assert calls, "overlay published without computing colours?"


def test_compressed_input(node: SegmentNode, client: RosClient, topics: dict[str, str]) -> None:
    labels = client.subscribe(topics["labels"], Image)
    pub = client.publisher(topics["compressed"], CompressedImage)
    rgb = np.zeros((30, 40, 3), np.uint8)
    rgb[:, 20:] = (0, 200, 0)
    ok, buf = cv2.imencode(".png", rgb)

    def make(i: int) -> CompressedImage:
        msg = CompressedImage(format="png", data=buf.tobytes())
        msg.header.frame_id = "compressed_cam"
        msg.header.stamp.sec, msg.header.stamp.nanosec = 777, 1000 + i
        return msg

    hit, sent = publish_until(pub, make, labels,
                              lambda m, sent: m.header.frame_id == "compressed_cam", timeout=30)
    assert hit is not None
    assert stamp_of(hit.header) in {stamp_of(s.header) for s in sent}
    assert (hit.width, hit.height) == (40, 30)


@pytest.mark.parametrize(
    "name,value,expected",
    [
        ("precision", "fp64", "precision must be one of auto, fp32, fp16, bf16"),
        ("device", "gpu", "device must be auto, cpu, cuda or cuda:N"),
        ("segmenter", "nope", "unknown segmenter 'nope'"),
        ("preset", "nope", "has no preset 'nope'"),
        ("image_reliability", "sometimes", "image_reliability must be one of best_effort, reliable"),
        ("vocabulary", ["chair", "chair"], "duplicate class name"),
        ("vocabulary_file", "/nonexistent/vocab.yaml", "does not exist"),
        ("vocabulary_preset", "nope", "unknown vocabulary_preset 'nope'"),
        ("segmenter_options", "[1, 2]", "must be a mapping"),
        ("max_image_pixels", 0, ""),
        ("overlay_alpha", 1.5, ""),
    ],
)
def test_invalid_parameter_changes_are_refused_with_a_reason(node: SegmentNode, name: str, value: Any,
                                                             expected: str) -> None:
    before = node.get_parameter(name).value
    result = node.set_parameters([Parameter(name, value=value)])[0]
    assert not result.successful
    assert expected in result.reason and result.reason
    assert node.get_parameter(name).value == before


def test_live_parameter_change_is_accepted(node: SegmentNode) -> None:
    assert node.set_parameters([Parameter("overlay_alpha", value=0.25)])[0].successful
    assert node.get_parameter("overlay_alpha").value == 0.25
    descriptor = node.describe_parameter("max_image_pixels")
    assert descriptor.description and descriptor.integer_range[0].from_value == 1
