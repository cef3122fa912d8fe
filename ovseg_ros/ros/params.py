"""segment_node's parameters: one table of specs -> declarations with descriptors, validation, and config.

Every parameter is declared with a :class:`~rcl_interfaces.msg.ParameterDescriptor` (description, ranges,
allowed values). Values are validated by :func:`validate` both in the node's on-set callback (runtime
changes are refused with a reason) and by :func:`validate_all` at configure (startup values: configure
fails with the reasons instead of the process dying with a traceback).

When a value takes effect is part of each spec (``when``, the single source): ``live`` parameters on the next
frame or request, ``activate`` ones at the next activate (they shape the subscriptions), ``configure`` ones at
the next configure (they shape the model); ``startup`` ones are read once when the node starts. ``LIVE`` and
``ON_ACTIVATE`` are derived from the table, and each descriptor's description says it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from ..core.temporal import FILTERS, MAX_FRAMES
from ..core.untrusted import UntrustedInputError, load_yaml, short_repr
from ..core.vocabulary import (  # noqa: F401
    MAX_QUERY_TEXTS,
    Vocabulary,
    VocabularyError,
    find_vocabulary_preset,
    list_vocabulary_presets,
    load_vocabulary_file,
)
from .guard import sanitize
from .qos import RELIABILITIES

#: The node's default method (config/segment_node.yaml leaves it to the node, so switching is this one line).
DEFAULT_SEGMENTER = "itaclip"
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
#: Image backends and ONNX Runtime providers (core/deploy.py owns them; repeated here to keep torch unimported).
BACKENDS = ("torch", "onnxruntime")
PROVIDER_NAMES = ("tensorrt", "cuda", "cpu")
_DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d{1,3})?")  # fullmatch: "cpu\n" is refused
#: Longest ``segmenter_options`` text, and its YAML limits (nodes with aliases expanded, depth).
MAX_OPTIONS_BYTES = 64 * 1024
MAX_OPTIONS_NODES = 10_000
MAX_OPTIONS_DEPTH = 8
#: The core's check_image refuses more than this; the node's limit cannot be larger.
MAX_PIXELS_LIMIT = 8192 * 8192

#: Longest refusal reason returned by :func:`validate`.
MAX_REASON_CHARS = 1000

#: When a parameter takes effect (ParamSpec.when).
WHEN = ("live", "activate", "configure", "startup")
_WHEN_TEXT = {"live": "at once (next frame or request)", "activate": "at the next activate",
              "configure": "at the next configure", "startup": "at startup only"}


@dataclass(frozen=True)
class ParamSpec:
    """One parameter: name, default, type (``str``/``bool``/``int``/``float``/``list``) and constraints."""

    name: str
    default: Any
    type: str
    description: str
    choices: tuple[str, ...] = ()
    range: Optional[tuple[float, float]] = None
    read_only: bool = False
    #: Extra check: value -> reason or None. Gets the pending values of all parameters as second argument.
    check: Optional[Callable[[Any, Mapping[str, Any]], Optional[str]]] = None
    #: When a new value takes effect: one of WHEN.
    when: str = "configure"


# --- checks ----------------------------------------------------------------------------------------
def _check_segmenter(value: str, values: Mapping[str, Any]) -> Optional[str]:
    from ..core.segmenter import list_segmenters

    known = list_segmenters()
    return None if value in known else f"unknown segmenter {short_repr(value)}; available: {', '.join(known)}"


def _check_preset(value: str, values: Mapping[str, Any]) -> Optional[str]:
    if not value:
        return None
    from ..core.segmenter import list_presets

    name = values.get("segmenter", "")
    presets = list_presets(name)
    if value not in presets:
        return f"segmenter {short_repr(name)} has no preset {short_repr(value)}; available: {', '.join(presets) or 'none'}"
    return None


def _check_device(value: str, values: Mapping[str, Any]) -> Optional[str]:
    if isinstance(value, str) and _DEVICE_RE.fullmatch(value):
        return None
    return f"device must be auto, cpu, cuda or cuda:N, got {short_repr(value)}"


def _check_vocabulary(value: Sequence[str], values: Mapping[str, Any]) -> Optional[str]:
    if not value:
        return None
    from ..core.vocabulary import Vocabulary, VocabularyError

    try:
        Vocabulary.from_request(list(value))
    except VocabularyError as exc:
        return str(exc)
    return None


def _check_vocabulary_file(value: str, values: Mapping[str, Any]) -> Optional[str]:
    if not value:
        return None
    path = Path(os.path.expanduser(value))
    if path.is_dir():
        return f"vocabulary_file {short_repr(value)} is a directory; expected a YAML file with a 'classes' list"
    if not path.is_file():
        return f"vocabulary_file {short_repr(value)} does not exist"
    return None


def _check_vocabulary_preset(value: str, values: Mapping[str, Any]) -> Optional[str]:
    if not value or find_vocabulary_preset(value):
        return None
    return f"unknown vocabulary_preset {short_repr(value)}; available: {', '.join(list_vocabulary_presets()) or 'none'}"


def _check_options(value: str, values: Mapping[str, Any]) -> Optional[str]:
    """Parse the options and build the segmenter's config from them (no model): bad values are refused now,
    with the reason, instead of failing the next configure."""
    try:
        options = parse_options(value)
    except ValueError as exc:
        return str(exc)
    name = values.get("segmenter", "")
    if not options or not isinstance(name, str) or _check_segmenter(name, values) is not None:
        return None  # the segmenter's own check reports an unknown segmenter
    from ..core.segmenter import ConfigError, auto_preset, check_overrides

    preset = values.get("preset", "")
    if not isinstance(preset, str) or _check_preset(preset, values) is not None:
        preset = ""
    try:
        check_overrides(name, preset or auto_preset(name), options)
    except (ConfigError, KeyError) as exc:
        return str(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc)
    return None


_CAMERA_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]*(/[A-Za-z][A-Za-z0-9_]*)*")
#: ROS's longest topic name (rmw: 255 minus 8 reserved for the middleware's prefixes).
MAX_TOPIC_CHARS = 255 - 8
#: The longest topic under a camera's output prefix ``~/<camera>/`` (the inputs ``<camera>/...`` sit in the
#: node's namespace, always shorter than under the node's own name).
LONGEST_CAMERA_TOPIC = "semantic/confidence"
#: Key of :func:`current_values` holding the node's fully qualified name (not a parameter).
NODE_NAME_KEY = "__node__"


def _check_cameras(value: Sequence[str], values: Mapping[str, Any]) -> Optional[str]:
    names = list(value or [])
    if len(names) > 16:
        return f"at most 16 cameras per node, got {len(names)}"
    node = values.get(NODE_NAME_KEY) or "/segment_node"
    for name in names:
        if not isinstance(name, str) or not _CAMERA_RE.fullmatch(name):
            return f"camera name {short_repr(name)} is not a relative ROS name (letters, digits, _ and /)"
        # Checked here, not found at configure half-way through creating the camera's publishers.
        longest = f"{node.rstrip('/')}/{name}/{LONGEST_CAMERA_TOPIC}"
        if len(longest) > MAX_TOPIC_CHARS:
            return (f"camera name {short_repr(name)} is too long: its topic {short_repr(longest)} would have "
                    f"{len(longest)} characters, ROS allows {MAX_TOPIC_CHARS}")
    if len(set(names)) != len(names):
        return "camera names must be unique"
    return None


def _check_onnx_file(value: str, values: Mapping[str, Any]) -> Optional[str]:
    if values.get("backend", "torch") == "onnxruntime" and not value:
        return "backend onnxruntime needs onnx_file: export one with ovseg-export (ros2 run ovseg_ros ovseg_export)"
    return None


def _check_providers(value: Sequence[str], values: Mapping[str, Any]) -> Optional[str]:
    bad = [v for v in value if v not in PROVIDER_NAMES]
    return f"unknown execution provider(s) {short_repr(bad)}; choose from {', '.join(PROVIDER_NAMES)}" if bad else None


def _check_depth_range(value: float, values: Mapping[str, Any]) -> Optional[str]:
    lo, hi = values.get("min_depth", 0.1), values.get("max_depth", 10.0)
    return None if lo < hi else f"min_depth ({lo}) must be smaller than max_depth ({hi})"


PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec("segmenter", DEFAULT_SEGMENTER, "str", "Segmentation method (core registry name).", check=_check_segmenter),
    ParamSpec("preset", "", "str", "Preset of the segmenter (ovseg_ros/core/presets/<segmenter>/); empty: its "
              "'realtime' preset, else its 'default' one, else the method's built-in defaults.", check=_check_preset),
    ParamSpec("model", "", "str", "open_clip architecture overriding the preset's (e.g. ViT-B-16-quickgelu). "
              "A different architecture drops the preset's pretrained tag unless 'pretrained' is given."),
    ParamSpec("pretrained", "", "str", "open_clip pretrained tag overriding the preset's (e.g. openai)."),
    ParamSpec("checkpoint", "", "str", "Local weights file of the method, wins over pretrained: the CLIP's "
              "(.pt/.bin/.safetensors), or for FC-CLIP its own checkpoint (the CLIP then comes from model/pretrained)."),
    ParamSpec("precision", "auto", "str", "Model precision (auto: fp16 on CUDA, fp32 on CPU).", choices=PRECISIONS),
    ParamSpec("device", "auto", "str", "auto, cpu, cuda or cuda:N.", check=_check_device),
    ParamSpec("offline", True, "bool", "Never download weights; a missing file fails configure with what to get."),
    ParamSpec("cache_dir", "~/.cache/ovseg_ros", "str", "Text-embedding cache folder (empty: memory only)."),
    ParamSpec("text_cache_mb", 64.0, "float", "Bound of each text encoder's in-memory embedding cache in MB (host RAM; "
              "0: none, the disk cache still serves).", range=(0.0, 65536.0)),
    ParamSpec("vocabulary", [], "list", "Initial vocabulary, one 'name, synonym, ...' entry per class; "
              "wins over vocabulary_file and vocabulary_preset. Change it at run time with ~/set_vocabulary.",
              check=_check_vocabulary),
    ParamSpec("vocabulary_file", "", "str", "Vocabulary YAML file (classes: list); wins over vocabulary_preset.",
              check=_check_vocabulary_file),
    ParamSpec("vocabulary_preset", "indoor_robot", "str", "Vocabulary preset name (config/vocabularies/<name>.yaml).",
              check=_check_vocabulary_preset),
    ParamSpec("image_reliability", "best_effort", "str", "Reliability of the camera subscriptions.",
              choices=RELIABILITIES, when="activate"),
    ParamSpec("image_queue_depth", 2, "int", "KEEP_LAST depth of the camera subscriptions: 2 absorbs a short stall "
              "of the executor (the frames are then dropped and counted by the node, newest kept), 1 leaves it to "
              "DDS to overwrite them uncounted.", range=(1, 10), when="activate"),
    ParamSpec("use_compressed", False, "bool", "Also subscribe image/compressed (sensor_msgs/CompressedImage).",
              when="activate"),
    ParamSpec("max_image_pixels", 4096 * 4096, "int", "Frames with more pixels are refused.",
              range=(1, MAX_PIXELS_LIMIT), when="live"),
    ParamSpec("overlay_alpha", 0.5, "float", "Weight of the class colours in ~/overlay.", range=(0.0, 1.0),
              when="live"),
    ParamSpec("publish_panoptic", True, "bool", "Publish ~/panoptic (segments from the labels when the method "
              "predicts no instances).", when="live"),
    ParamSpec("panoptic_min_area", 0, "int", "Segments derived from the labels smaller than this many pixels get no "
              "panoptic segment (id 0): speckle from label noise is not published as instances.",
              range=(0, MAX_PIXELS_LIMIT), when="live"),
    ParamSpec("panoptic_format", "int32", "str", "Form of ~/panoptic's id image: int32 (32SC1), uint16 (16UC1 while "
              "the ids fit, else 32SC1 for that frame: half the bytes) or segments_only (no id image: an empty "
              "0x0 image with encoding '', the segments with class, score, area and box). The image's encoding says "
              "which form a message has.", choices=("int32", "uint16", "segments_only"), when="live"),
    ParamSpec("diagnostics_period", 1.0, "float", "Seconds between /diagnostics messages.", range=(0.1, 60.0)),
    ParamSpec("autostart", True, "bool", "Configure and activate at startup (false: wait for a lifecycle manager).",
              read_only=True, when="startup"),
    ParamSpec("cameras", [], "list", "Camera names served by this node with one model: camera 'front' subscribes "
              "front/image and publishes under ~/front/. Empty: one camera on image, outputs under ~/.",
              check=_check_cameras),
    ParamSpec("max_vocabulary_classes", 2000, "int", "~/set_vocabulary refuses requests with more classes "
              "(bounds the encoding cost).", range=(1, 65534), when="live"),
    ParamSpec("vocabulary_timeout", 60.0, "float", "Seconds a ~/set_vocabulary or ~/query call waits for its "
              "encoding/inference; past it the request is abandoned and the vocabulary stays unchanged.",
              range=(0.1, 3600.0), when="live"),
    ParamSpec("max_query_texts", MAX_QUERY_TEXTS, "int", "~/query refuses requests with more texts.",
              range=(1, MAX_QUERY_TEXTS), when="live"),
    ParamSpec("segmenter_options", "", "str", "YAML/JSON mapping of segmenter options merged onto the preset, "
              "e.g. '{short_side: 224, templates: photo}'.", check=_check_options),
    ParamSpec("publish_points", False, "bool", "Publish ~/semantic/points, the organised semantic point cloud "
              "pixel-aligned with the labels, from depth/image (registered to the colour camera; 16UC1 mm or "
              "32FC1 m) and depth/camera_info.", when="activate"),
    ParamSpec("min_depth", 0.1, "float", "Depth below this (m) gives NaN points.", range=(0.0, 1000.0),
              check=_check_depth_range, when="activate"),
    ParamSpec("max_depth", 10.0, "float", "Depth beyond this (m) gives NaN points.", range=(0.001, 1000.0),
              check=_check_depth_range, when="activate"),
    ParamSpec("points_rgb", False, "bool", "Add the camera colour as a packed 'rgb' field to ~/semantic/points.",
              when="activate"),
    ParamSpec("depth_slop", 0.05, "float", "Largest stamp difference (s) between a frame and the depth image "
              "paired with it.", range=(0.0, 10.0), when="activate"),
    ParamSpec("depth_buffer_mb", 128, "int", "Bound (MiB) of the depth images waiting for their frame, per camera "
              "(128: ~200 VGA 16UC1 images, 6 s at 30 Hz). Raise it when depth runs far ahead of colour at high "
              "resolution; the farthest image from the frames is dropped first.", range=(1, 65536), when="activate"),
    ParamSpec("track_instances", True, "bool", "Give each thing segment of ~/panoptic a persistent track_id "
              "(per camera; 0 = untracked). Switching it resets the tracks.", when="live"),
    ParamSpec("track_max_age", 3.0, "float", "Seconds (ROS time of the frame stamps) a track not seen is kept, so "
              "that an occlusion, a missed or dropped frame or a short exit from the view keeps the id.",
              range=(0.0, 3600.0), when="live"),
    ParamSpec("temporal_filter", "none", "str", "Temporal filter of the labels: none, or vote (per pixel, a "
              "confidence-weighted vote over the last temporal_frames frames that restarts where the image "
              "changes: less flicker on still parts, no smearing behind motion). Changing it restarts the filter.",
              choices=FILTERS, when="live"),
    ParamSpec("temporal_frames", 3, "int", "Frames in the vote of temporal_filter=vote; a label change without an "
              "image change is followed after temporal_frames // 2 frames.", range=(1, MAX_FRAMES), when="live"),
    ParamSpec("temporal_image_threshold", 10, "int", "Colour difference (0..255, largest channel) above which a "
              "pixel counts as changed for temporal_filter=vote (its older votes are dropped).", range=(0, 255),
              when="live"),
    ParamSpec("nav2_compatible", False, "bool", "Nav2 semantic_segmentation_layer mode: labels stay mono8 (the "
              "layer reads one byte per pixel), so a vocabulary of more than 255 classes is refused."),
    # Deployment (ovseg_ros/core/deploy.py): the image encoder on ONNX Runtime; read at configure.
    ParamSpec("backend", "torch", "str", "Image encoder: torch, or onnxruntime running onnx_file (ovseg-export); "
              "text, post-processing and ~/set_vocabulary are the same code either way.", choices=BACKENDS),
    ParamSpec("onnx_file", "", "str", "File written by ovseg-export for this segmenter, preset and weights "
              "(backend onnxruntime); a mismatched file fails configure with the reason.", check=_check_onnx_file),
    ParamSpec("onnx_providers", [], "list", "ONNX Runtime execution providers in order, from tensorrt, cuda, cpu; "
              "empty: every available one in that order.", check=_check_providers),
    ParamSpec("trt_cache_dir", "", "str", "TensorRT engine cache folder (empty: <onnx_file>.trt_cache); engines "
              "are built at the first frame of each input size, then loaded from here."),
    ParamSpec("trt_fp16", True, "bool", "Let TensorRT build fp16 engines."),
    ParamSpec("persist_vocabulary", True, "bool", "Restore the vocabulary set at run time (~/set_vocabulary) and "
              "its class ids at configure, e.g. after a crash or a respawn; it is saved in cache_dir/runtime, one "
              "file per node name. Revisions continue from the saved counter either way (empty cache_dir: "
              "nothing is saved)."),
)
SPECS: dict[str, ParamSpec] = {p.name: p for p in PARAMS}
LIVE = frozenset(p.name for p in PARAMS if p.when == "live")
ON_ACTIVATE = frozenset(p.name for p in PARAMS if p.when == "activate")


_PY_TYPES: dict[str, tuple[type, ...]] = {"str": (str,), "bool": (bool,), "int": (int,), "float": (int, float)}


def validate(name: str, value: Any, values: Mapping[str, Any]) -> Optional[str]:
    """Reason why ``value`` is invalid for parameter ``name`` (None when valid).

    Never raises: a check that fails unexpectedly is itself a refusal (with the exception named), because
    this runs in rclpy's parameter callback, where an escaping exception kills the process.
    """
    try:
        reason = _validate(name, value, values)
        if reason is None:
            return None
        # Escaped and bounded: a reason goes into a parameter-set reply and the logs.
        reason = sanitize(reason)
        return reason if len(reason) <= MAX_REASON_CHARS else reason[: MAX_REASON_CHARS - 3] + "..."
    except Exception as exc:  # noqa: BLE001  (any input must end in a reason, never in a traceback)
        return f"{name}: value {short_repr(value)} could not be checked ({type(exc).__name__}: {short_repr(str(exc))})"


def _validate(name: str, value: Any, values: Mapping[str, Any]) -> Optional[str]:
    spec = SPECS.get(name)
    if spec is None:
        return None
    if spec.type == "list":
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            return f"{name} must be a list of strings, got {short_repr(value)}"
    elif not isinstance(value, _PY_TYPES[spec.type]) or (spec.type in ("int", "float") and isinstance(value, bool)):
        return f"{name} must be of type {spec.type}, got {type(value).__name__} {short_repr(value)}"
    if spec.type == "float" and value != value:  # NaN compares unequal to itself
        return f"{name} must be a finite number, got {value!r}"
    if spec.choices and value not in spec.choices:
        return f"{name} must be one of {', '.join(spec.choices)}, got {short_repr(value)}"
    if spec.range is not None and not spec.range[0] <= value <= spec.range[1]:
        return f"{name} must be in [{spec.range[0]}, {spec.range[1]}], got {short_repr(value)}"
    if spec.check is not None:
        reason = spec.check(value, values)
        if reason:
            return f"{name}: {reason}"
    return None


def validate_all(values: Mapping[str, Any]) -> list[str]:
    """Every reason why the set of ``values`` is invalid (never raises, see :func:`validate`)."""
    reasons = []
    try:
        items = [(spec.name, values[spec.name]) for spec in PARAMS if spec.name in values]
    except Exception as exc:  # noqa: BLE001  (a broken mapping)
        return [f"parameters could not be read ({type(exc).__name__}: {short_repr(str(exc))})"]
    for name, value in items:
        reason = validate(name, value, values)
        if reason:
            reasons.append(reason)
    return reasons


def parse_options(text: Any) -> dict[str, Any]:
    """``segmenter_options``: empty, or a YAML/JSON mapping with string keys.

    Raises:
        ValueError: (an :class:`~ovseg_ros.core.untrusted.UntrustedInputError`) not a string, too large, too
            many nodes or too deep (alias bombs), invalid YAML, or not a mapping; the input is never
            formatted whole in the message.
    """
    if not isinstance(text, str):
        raise UntrustedInputError(f"segmenter_options must be a string, got {type(text).__name__}")
    if not text.strip():
        return {}
    data = load_yaml(text, "segmenter_options", max_bytes=MAX_OPTIONS_BYTES, max_nodes=MAX_OPTIONS_NODES,
                     max_depth=MAX_OPTIONS_DEPTH)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UntrustedInputError(
            f"segmenter_options must be a mapping such as '{{short_side: 224}}', got {type(data).__name__} "
            f"{short_repr(data)}"
        )
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise UntrustedInputError(f"segmenter_options keys must be option names, got {short_repr(bad[0])}")
    return data


# --- vocabulary presets -----------------------------------------------------------------------------
# --- resolved configuration ------------------------------------------------------------------------
@dataclass(frozen=True)
class NodeConfig:
    """The parameters as read at configure."""

    segmenter: str
    preset: str
    model: str
    pretrained: str
    checkpoint: str
    precision: str
    device: str
    offline: bool
    cache_dir: str
    text_cache_mb: float
    vocabulary: tuple[str, ...]
    vocabulary_file: str
    vocabulary_preset: str
    image_reliability: str
    image_queue_depth: int
    use_compressed: bool
    max_image_pixels: int
    overlay_alpha: float
    publish_panoptic: bool
    panoptic_min_area: int
    panoptic_format: str
    diagnostics_period: float
    autostart: bool
    cameras: tuple[str, ...]
    max_vocabulary_classes: int
    vocabulary_timeout: float
    max_query_texts: int
    segmenter_options: str
    publish_points: bool = False
    min_depth: float = 0.1
    max_depth: float = 10.0
    points_rgb: bool = False
    depth_slop: float = 0.05
    depth_buffer_mb: int = 128
    nav2_compatible: bool = False
    backend: str = "torch"
    onnx_file: str = ""
    onnx_providers: tuple[str, ...] = ()
    trt_cache_dir: str = ""
    trt_fp16: bool = True
    track_instances: bool = True
    track_max_age: float = 3.0
    temporal_filter: str = "none"
    temporal_frames: int = 3
    temporal_image_threshold: int = 10
    persist_vocabulary: bool = True
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> "NodeConfig":
        kwargs = {p.name: values.get(p.name, p.default) for p in PARAMS}
        for p in PARAMS:
            if p.type == "float" and isinstance(kwargs[p.name], int) and not isinstance(kwargs[p.name], bool):
                kwargs[p.name] = float(kwargs[p.name])
        kwargs["vocabulary"] = tuple(kwargs["vocabulary"] or ())
        kwargs["cameras"] = tuple(kwargs["cameras"] or ())
        kwargs["onnx_providers"] = tuple(kwargs["onnx_providers"] or ())
        return cls(**kwargs, options=parse_options(kwargs["segmenter_options"]))

    def resolved_preset(self) -> str:
        """``preset``, or for an empty one :func:`~ovseg_ros.core.segmenter.auto_preset`'s."""
        from ..core.segmenter import auto_preset

        return self.preset or auto_preset(self.segmenter)

    def segmenter_overrides(self) -> dict[str, Any]:
        """``segmenter_options`` plus the model parameters, as overrides for ``build_segmenter``.

        Raises:
            ValueError: model parameters given for a segmenter whose config has no such model field.
        """
        from ..core.segmenter import get_segmenter_class

        cls = get_segmenter_class(self.segmenter)
        key = cls.primary_model_field  # "model"; CaR's is its CAM model
        overrides = dict(self.options)
        given = overrides.get(key) or {}
        if not isinstance(given, Mapping):
            raise ValueError(f"segmenter_options: {key!r} must be a mapping such as '{{{key}: {{name: ...}}}}', "
                             f"got {short_repr(given)}")
        model: dict[str, Any] = dict(given)
        if self.model:
            model["name"] = self.model
            # The preset's tag belongs to the preset's architecture.
            model.setdefault("pretrained", "")
        if self.pretrained:
            model["pretrained"] = self.pretrained
        fields = getattr(cls.config_cls, "__dataclass_fields__", {})
        if self.checkpoint:
            # A method with weights of its own beside the CLIP (FC-CLIP) takes the file as its checkpoint.
            target = overrides if "checkpoint" in fields else model
            target["checkpoint"] = os.path.expanduser(self.checkpoint)
        if self.precision != "auto":
            model["precision"] = self.precision
        if model:
            if key not in fields:
                raise ValueError(
                    f"segmenter {self.segmenter!r} has no {key!r} option; set its weights through segmenter_options"
                )
            overrides[key] = model
        return overrides

    def backend_options(self, device: Any) -> Any:
        """The image backend for ``build_segmenter`` (CUDA providers on the node's device)."""
        from ..core.deploy import BackendOptions

        return BackendOptions(
            backend=self.backend, onnx_file=os.path.expanduser(self.onnx_file), providers=self.onnx_providers,
            trt_cache_dir=os.path.expanduser(self.trt_cache_dir), trt_fp16=self.trt_fp16,
            device_id=(device.index or 0) if getattr(device, "type", "") == "cuda" else 0,
        )

    def model_identity(self, segmenter: Any) -> str:
        """Weights identity for the Vocabulary message: ``name@pretrained``, ``name@file:<basename>``,
        ``name@random`` (a model built without weights) or ``model-free`` (color_key has no model)."""
        spec = getattr(getattr(segmenter, "config", None), getattr(segmenter, "primary_model_field", "model"), None)
        if spec is None:
            return "model-free"
        name = getattr(spec, "name", self.model or "?")
        if getattr(spec, "checkpoint", ""):
            return f"{name}@file:{Path(spec.checkpoint).name}"
        if getattr(spec, "pretrained", ""):
            return f"{name}@{spec.pretrained}"
        return f"{name}@random"


# --- declaration on a node ---------------------------------------------------------------------------
def descriptor(spec: ParamSpec) -> Any:
    """The ParameterDescriptor of ``spec`` (description, allowed values, numeric range, read-only)."""
    from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType

    ptype = {
        "str": ParameterType.PARAMETER_STRING,
        "bool": ParameterType.PARAMETER_BOOL,
        "int": ParameterType.PARAMETER_INTEGER,
        "float": ParameterType.PARAMETER_DOUBLE,
        "list": ParameterType.PARAMETER_STRING_ARRAY,
    }[spec.type]
    description = f"{spec.description} [takes effect: {_WHEN_TEXT[spec.when]}]"
    desc = ParameterDescriptor(name=spec.name, type=ptype, description=description, read_only=spec.read_only)
    if spec.choices:
        desc.additional_constraints = "one of: " + ", ".join(spec.choices)
    if spec.range is not None and spec.type == "int":
        desc.integer_range = [IntegerRange(from_value=int(spec.range[0]), to_value=int(spec.range[1]), step=0)]
    elif spec.range is not None and spec.type == "float":
        desc.floating_point_range = [
            FloatingPointRange(from_value=float(spec.range[0]), to_value=float(spec.range[1]), step=0.0)
        ]
    return desc


def declare_parameters(node: Any) -> dict[str, str]:
    """Declare every parameter on ``node``; return {name: reason} for overrides that could not be applied.

    A bad override (wrong type, out of range) must not kill the process with a traceback: the parameter is
    declared with its default instead and the reason is returned, so configure can fail with it (until the
    parameter is set to a valid value).
    """
    from rclpy.exceptions import InvalidParameterTypeException, ParameterException
    from rclpy.parameter import Parameter

    errors = {}
    for spec in PARAMS:
        default: Any = Parameter.Type.STRING_ARRAY if spec.type == "list" else spec.default
        try:
            try:
                node.declare_parameter(spec.name, default, descriptor(spec))
            except InvalidParameterTypeException:
                value = _integer_override(node, spec)
                if value is None:
                    raise
                # ``max_depth: 10`` in a params file: YAML reads an integer where a double is declared.
                node.declare_parameter(spec.name, float(value), descriptor(spec), ignore_override=True)
        except (ParameterException, TypeError, ValueError, OverflowError) as exc:
            errors[spec.name] = f"parameter {spec.name}: {exc}"
            node.declare_parameter(spec.name, default, descriptor(spec), ignore_override=True)
    add_pre_set = getattr(node, "add_pre_set_parameters_callback", None)  # rclpy >= Iron
    if add_pre_set is not None:
        add_pre_set(integers_as_doubles)
    return errors


def _integer_override(node: Any, spec: ParamSpec) -> Optional[int]:
    """The integer given (params file, ``-p``) for a double parameter, else None."""
    if spec.type != "float":
        return None
    override = getattr(node, "_parameter_overrides", {}).get(spec.name)  # rclpy has no public accessor
    value = getattr(override, "value", None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def integers_as_doubles(params: list) -> list:
    """rclpy pre-set callback: an integer set on a double parameter (``ros2 param set ... depth_slop 0``)
    becomes that double, instead of rclpy's refusal "expected '3' got '2'". Never raises (an entry point)."""
    try:
        from rclpy.parameter import Parameter

        out = []
        for p in params:
            spec = SPECS.get(p.name)
            if spec is not None and spec.type == "float" and p.type_ == Parameter.Type.INTEGER:
                try:
                    p = Parameter(p.name, Parameter.Type.DOUBLE, float(p.value))
                except OverflowError:
                    pass  # left as it is: refused by rclpy's type check, with its reason
            out.append(p)
        return out
    except Exception:  # noqa: BLE001
        return list(params)


def current_values(node: Any) -> dict[str, Any]:
    """The node's values of every parameter (an unset string array reads as empty), and its fully qualified
    name under :data:`NODE_NAME_KEY` (checks of names derived from it need it)."""
    from rclpy.exceptions import ParameterUninitializedException

    values = {}
    for spec in PARAMS:
        try:
            value = node.get_parameter(spec.name).value
        except ParameterUninitializedException:
            value = None
        if spec.type == "list":
            value = list(value or [])
        values[spec.name] = value
    try:
        values[NODE_NAME_KEY] = node.get_fully_qualified_name()
    except Exception:  # noqa: BLE001  (a stand-in node in tests)
        pass
    return values


def video_options(node: Any) -> tuple[bool, float, Any]:
    """(track_instances, track_max_age, FilterConfig) from the node's live parameters (read every frame)."""
    from ..core.temporal import FilterConfig

    get = node.get_parameter
    return (bool(get("track_instances").value), float(get("track_max_age").value),
            FilterConfig(str(get("temporal_filter").value), int(get("temporal_frames").value),
                         int(get("temporal_image_threshold").value)))


def initial_vocabulary(cfg: NodeConfig) -> Vocabulary:
    """The node's initial vocabulary: ``vocabulary``, else ``vocabulary_file``, else ``vocabulary_preset``."""
    if cfg.vocabulary:
        return Vocabulary.from_request(list(cfg.vocabulary), source="parameter")
    if cfg.vocabulary_file:
        return load_vocabulary_file(os.path.expanduser(cfg.vocabulary_file))
    path = find_vocabulary_preset(cfg.vocabulary_preset) if cfg.vocabulary_preset else None
    if path is None:
        raise VocabularyError("no vocabulary: set vocabulary, vocabulary_file or vocabulary_preset")
    return load_vocabulary_file(path)
