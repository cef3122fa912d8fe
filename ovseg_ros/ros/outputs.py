"""A segmented frame -> the messages of one camera (the publishing stage's work, timed stage by stage).

Colour and overlay images are computed only while someone subscribes to them; the panoptic message only
when ``publish_panoptic`` is true. Every message carries the input image's header unchanged.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np

from ..core import postprocess
from ..core.video import VideoState
from . import messages
from .conversions import numpy_to_image


#: Output name -> (topic under the node's ``~/`` (a named camera's under ``~/<camera>/``), message type): the
#: names build_outputs returns, plus the semantic cloud (points.py), as published by camera.py and written
#: by ovseg-bag.
OUTPUT_TOPICS: dict[str, tuple[str, str]] = {
    "labels": ("semantic/labels", "sensor_msgs/msg/Image"),
    "confidence": ("semantic/confidence", "sensor_msgs/msg/Image"),
    "color": ("semantic/color", "sensor_msgs/msg/Image"),
    "overlay": ("overlay", "sensor_msgs/msg/Image"),
    "panoptic": ("panoptic", "ovseg_ros/msg/PanopticSegmentation"),
    "info": ("info", "ovseg_ros/msg/SegmentationInfo"),
    "points": ("semantic/points", "sensor_msgs/msg/PointCloud2"),
}
#: The node-wide latched outputs (``~/vocabulary``, ``~/label_info``).
LATCHED_TOPICS: dict[str, tuple[str, str]] = {
    "vocabulary": ("vocabulary", "ovseg_ros/msg/Vocabulary"),
    "label_info": ("label_info", "vision_msgs/msg/LabelInfo"),
}


class Palette:
    """Class colours for ``n`` classes, rebuilt only when ``n`` changes."""

    def __init__(self) -> None:
        self._n, self._colors = -1, np.zeros((0, 3), np.uint8)

    def __call__(self, n: int) -> np.ndarray:
        if n != self._n:
            self._n, self._colors = n, postprocess.make_palette(n)
        return self._colors


def build_outputs(
    item: Any,
    wants: Callable[[str], bool],
    palette: Palette,
    overlay_alpha: float,
    publish_panoptic: bool,
    latency_ms: float,
    panoptic_min_area: int = 0,
    video: Optional[VideoState] = None,
    stamp_ns: int = 0,
    panoptic_format: str = "int32",
    depth_cue: Optional[Callable[[], Any]] = None,
) -> list[tuple[str, Any]]:
    """(output name, message) pairs for one segmented frame, in publishing order (info last).

    ``panoptic_min_area``: segments derived from the labels smaller than this many pixels get no panoptic
    segment (their pixels keep id 0); a method's own instances (FC-CLIP) are published as predicted.

    ``video``: the camera's :class:`~ovseg_ros.core.video.VideoState` (temporal filter, tracker), run at
    ``stamp_ns`` (ROS time of the frame): the filtered labels replace ``item.result`` (so that every output of
    the frame, the semantic cloud too, carries them), the panoptic segments get their track ids. The context
    of both is the binding's vocabulary revision and model generation: a new one resets them.
    ``panoptic_format``: the id image's form (:data:`messages.PANOPTIC_FORMATS`). ``depth_cue``: gives the
    frame's :class:`~ovseg_ros.core.tracking.DepthCue` when its depth image is at hand (``publish_points``), for
    the tracker's 3D gate (see :meth:`~ovseg_ros.core.video.VideoState.track`).
    """
    if video is not None:
        context = (item.result.vocabulary.revision, getattr(item.binding, "generation", 0))
        item.result = video.filter_result(item.result, item.frame.image, stamp_ns, context)
    header, result = item.frame.header, item.result
    vocab = result.vocabulary
    n = len(vocab)
    # The byte codes (positions, 255 unlabeled) once per frame: every step below takes them as they are instead of
    # narrowing the int32 labels again (label image, colour, overlay, panoptic runs).
    codes = postprocess.class_codes(result.labels, n)
    sem = codes if codes is not None else result.labels
    labels, encoding, _ = messages.wire_labels(sem, vocab)  # positions -> the frame's own ids
    outputs: list[tuple[str, Any]] = [
        ("labels", numpy_to_image(labels, encoding, header)),
        ("confidence", numpy_to_image(messages.encode_confidence(result.confidence), "mono8", header)),
    ]
    want_color, want_overlay = wants("color"), wants("overlay")
    if want_color or want_overlay:
        color = postprocess.colorize(sem, palette(n))
        if want_color:
            outputs.append(("color", numpy_to_image(color, "rgb8", header)))
        if want_overlay:
            blended = postprocess.overlay(item.frame.image, color, overlay_alpha, sem)
            outputs.append(("overlay", numpy_to_image(blended, "rgb8", header)))
    if publish_panoptic:
        panoptic = result.panoptic
        if panoptic is None:
            panoptic = postprocess.panoptic_from_semantic(sem, result.confidence, vocab,
                                                          min_area=panoptic_min_area)
        track_ids = video.track(panoptic, stamp_ns, context, depth=depth_cue) if video is not None else None
        outputs.append(("panoptic", messages.panoptic_msg(header, vocab, panoptic, track_ids, panoptic_format)))
    outputs.append(("info", messages.info_msg(
        header, vocab, item.binding.segmenter_name, latency_ms, item.inference_ms, item.dropped, labels)))
    return outputs


# --- latched outputs (the node under its gate, ovseg-bag per vocabulary) ---------------------------------------
def label_threshold(segmenter: Any) -> float:
    """``LabelInfo.threshold``: the confidence below which the segmenter leaves a pixel unlabeled
    (``Segmenter.label_threshold``, each method's own field: ITACLIP's ``prob_thd``); 0.0 when it has none."""
    try:
        return float(segmenter.label_threshold())
    except Exception:  # noqa: BLE001  (a segmenter without the method: no threshold)
        return 0.0


def vocabulary_message(binding: Any, stamp: Any) -> Any:
    """``~/vocabulary`` of a binding (segmenter, vocabulary state, names), with the exact prompts when the
    segmenter can list them."""
    try:
        prompts = binding.segmenter.describe_prompts(binding.state)
    except Exception:  # noqa: BLE001  (optional introspection; names are the fallback)
        prompts = None
    return messages.vocabulary_msg(binding.vocabulary, stamp, binding.segmenter_name, binding.model_identity,
                                   prompts)


def label_info_message(label_info_cls: Any, binding: Any, stamp: Any) -> Any:
    """``~/label_info`` of a binding (``label_info_cls``: vision_msgs/LabelInfo)."""
    return messages.label_info_msg(label_info_cls, binding.vocabulary, stamp, label_threshold(binding.segmenter))
