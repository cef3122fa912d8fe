"""QoS profiles of segment_node (see docs: ros-conventions.md, section 0 items 3 and 7).

* Camera input: sensor-data style, KEEP_LAST depth 2 (``image_queue_depth``), best effort by default
  (``image_reliability`` switches to reliable for reliable-only publishers such as some bag players). The
  callback only hands the frame to a one-slot mailbox, so a deeper queue adds no latency: it lets a frame that
  arrives while the executor is briefly held up wait for it, instead of DDS overwriting it uncounted; the
  mailbox keeps the newest and counts the rest as dropped.
* Image outputs: reliable, KEEP_LAST depth 2, volatile. Reliable matches both reliable and best-effort
  subscribers (a best-effort subscriber such as Nav2's SensorDataQoS still connects); depth 2 lets one frame
  be in flight while the next is written without unbounded queues.
* Vocabulary / LabelInfo: reliable + transient_local, depth 1 (latched): late subscribers get the current
  vocabulary, which Nav2's semantic layer needs before it buffers any mask.
"""

from __future__ import annotations

from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

RELIABILITIES = ("best_effort", "reliable")
OUTPUT_DEPTH = 2


def input_qos(reliability: str = "best_effort", depth: int = 2) -> QoSProfile:
    """Camera subscription profile; ``reliability`` is ``best_effort`` or ``reliable``."""
    if reliability not in RELIABILITIES:
        raise ValueError(f"image_reliability must be one of {RELIABILITIES}, got {reliability!r}")
    if not 1 <= depth <= 10:
        raise ValueError(f"image_queue_depth must be in 1..10, got {depth}")
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST,
        depth=depth,
        reliability=ReliabilityPolicy.BEST_EFFORT if reliability == "best_effort" else ReliabilityPolicy.RELIABLE,
        durability=DurabilityPolicy.VOLATILE,
    )


def output_qos() -> QoSProfile:
    """Per-frame outputs (images, panoptic, info)."""
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST,
        depth=OUTPUT_DEPTH,
        reliability=ReliabilityPolicy.RELIABLE,
        durability=DurabilityPolicy.VOLATILE,
    )


def latched_qos() -> QoSProfile:
    """Vocabulary and LabelInfo: the last message is kept for late subscribers."""
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST,
        depth=1,
        reliability=ReliabilityPolicy.RELIABLE,
        durability=DurabilityPolicy.TRANSIENT_LOCAL,
    )
