"""The one interface every segmenter implements, its results, and the registry of methods and presets.

Text is what stays the same across frames, so the work is split in two:

* :meth:`Segmenter.encode_vocabulary` turns a :class:`Vocabulary` into an immutable, method-specific
  :class:`VocabularyState` (text embeddings and whatever else the method derives from text). It is the
  expensive, cacheable part and runs *outside* the inference path (the node calls it from its service thread).
* :meth:`Segmenter.segment` takes one HWC uint8 RGB image and a state and returns a
  :class:`SegmentationResult` at the image's resolution, tagged with the state's vocabulary.

Passing the state explicitly is what makes vocabulary changes atomic: a frame is segmented with the one
state object it started with, and swapping the node's state reference is a single assignment.

Methods register a builder by name (``@register_segmenter("itaclip")``) with a config dataclass; presets
are YAML files in ``presets/<method>/<preset>.yaml`` turned into that dataclass, so unknown keys fail loudly.
"""

from __future__ import annotations

import abc
import dataclasses
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
import yaml

from .vocabulary import UNLABELED, Vocabulary, vocabulary_from_texts

PRESET_DIR = Path(__file__).parent / "presets"


class ImageError(ValueError):
    """An input image that cannot be segmented; the message says why."""


@dataclass(frozen=True)
class VocabularyState:
    """What a segmenter derived from a vocabulary (subclasses add embeddings etc.). Immutable."""

    vocabulary: Vocabulary

    def to(self, device: torch.device | str) -> "VocabularyState":
        """A copy with every tensor field (also inside tuples/lists) on ``device``; self if nothing moves.

        The node moves states to the CPU on deactivate so GPU memory is really freed.
        """
        device = torch.device(device)

        def move(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                return value.to(device)
            if isinstance(value, (tuple, list)):
                items = [move(v) for v in value]
                if any(a is not b for a, b in zip(items, value)):
                    return type(value)(items)
            return value

        changes = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            moved = move(value)
            if moved is not value:
                changes[f.name] = moved
        return dataclasses.replace(self, **changes) if changes else self


@dataclass(frozen=True)
class Segment:
    """One panoptic segment. ``bbox`` is (x, y, width, height) in pixels, inclusive of the segment."""

    id: int
    class_id: int
    is_thing: bool
    score: float
    area: int
    bbox: tuple[int, int, int, int]


@dataclass
class PanopticResult:
    """``segment_ids``: (H, W) int32, 0 = no segment; ``segments`` describes every id present."""

    segment_ids: np.ndarray
    segments: list[Segment]


@dataclass
class SegmentationResult:
    """What a segmenter returns for one image (all arrays at the input resolution).

    Attributes:
        labels: (H, W) int32 class ids into ``vocabulary.classes``; :data:`UNLABELED` (-1) where no class.
        confidence: (H, W) float32 in [0, 1], the score of the chosen label (0 where unlabeled by rule).
        vocabulary: the vocabulary this result was computed with (its ``revision`` goes into every output).
        panoptic: real instances when the method predicts them (FC-CLIP); None otherwise.
        timings: seconds per stage, for latency reporting.
    """

    labels: np.ndarray
    confidence: np.ndarray
    vocabulary: Vocabulary
    panoptic: Optional[PanopticResult] = None
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class QueryResult:
    """One mask (H, W) bool and one score in [0, 1] per query text."""

    texts: list[str]
    masks: list[np.ndarray]
    scores: list[float]
    timings: dict[str, float] = field(default_factory=dict)


class Segmenter(abc.ABC):
    """Base class of all segmenters. Subclasses set ``name`` and ``config_cls`` and register themselves."""

    name: ClassVar[str] = ""
    #: The config dataclass; presets and overrides are validated against its fields.
    config_cls: ClassVar[type] = object
    #: True when :meth:`segment` fills ``panoptic`` with real instances.
    predicts_instances: ClassVar[bool] = False
    #: The config field holding the main model's ModelSpec: where the node's and the CLI's
    #: ``model``/``pretrained``/``checkpoint`` settings go (CaR has two models; this names the CAM one).
    primary_model_field: ClassVar[str] = "model"

    def __init__(self, config: Any, device: torch.device | str = "cpu") -> None:
        self.config = config
        self.device = torch.device(device)
        self._state: Optional[VocabularyState] = None

    # --- the contract -----------------------------------------------------------------------------
    @abc.abstractmethod
    def encode_vocabulary(self, vocabulary: Vocabulary) -> VocabularyState:
        """Compute everything text-derived for ``vocabulary``. Thread-safe w.r.t. :meth:`segment`.

        Raises:
            VocabularyError: a text the model cannot take (e.g. longer than the CLIP context).
        """

    @abc.abstractmethod
    def segment(self, image: np.ndarray, state: Optional[VocabularyState] = None) -> SegmentationResult:
        """Segment one image: (H, W, 3) uint8 RGB, C-contiguous. Uses ``state`` or the last one set."""

    def query(self, image: np.ndarray, texts: Sequence[str]) -> QueryResult:
        """Free-form texts -> one mask and score each, without touching the current vocabulary.

        The default treats the texts as a temporary vocabulary; methods with a referring mode override it.
        """
        state = self.encode_vocabulary(vocabulary_from_texts(texts))
        result = self.segment(image, state)
        masks, scores = [], []
        for i in range(len(texts)):
            m = result.labels == i
            masks.append(m)
            scores.append(float(result.confidence[m].mean()) if m.any() else 0.0)
        return QueryResult(list(texts), masks, scores, dict(result.timings))

    def describe_prompts(self, state: VocabularyState) -> list[list[str]]:
        """The exact texts encoded for each class (published in the Vocabulary message).

        The default lists the class names; methods using templates override it.
        """
        return [list(c.names) for c in state.vocabulary.classes]

    # --- conveniences -----------------------------------------------------------------------------
    def set_vocabulary(self, vocabulary: Vocabulary) -> VocabularyState:
        """Encode and keep ``vocabulary`` as the default state (CLI and scripts; the node swaps its own)."""
        self._state = self.encode_vocabulary(vocabulary)
        return self._state

    @property
    def state(self) -> Optional[VocabularyState]:
        return self._state

    def _resolve_state(self, state: Optional[VocabularyState]) -> VocabularyState:
        state = state if state is not None else self._state
        if state is None:
            raise RuntimeError(f"{self.name}: no vocabulary set; call set_vocabulary() first")
        return state

    def backbone_forward(self, image: np.ndarray) -> None:
        """One bare forward of the main backbone at the size ``segment`` would use (benchmark baseline)."""
        raise NotImplementedError

    def to(self, device: torch.device | str) -> "Segmenter":
        """Move models to ``device`` (the node moves to CPU on deactivate to free GPU memory)."""
        self.device = torch.device(device)
        return self


# --- registry ---------------------------------------------------------------------------------------
SegmenterBuilder = Callable[..., Segmenter]
_REGISTRY: dict[str, type[Segmenter]] = {}


def register_segmenter(name: str) -> Callable[[type[Segmenter]], type[Segmenter]]:
    """Class decorator: make a segmenter buildable by ``name``."""

    def wrap(cls: type[Segmenter]) -> type[Segmenter]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"segmenter {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def _load_builtin_segmenters() -> None:
    # Importing the package registers every method module it lists.
    from . import segmenters  # noqa: F401


def list_segmenters() -> list[str]:
    _load_builtin_segmenters()
    return sorted(_REGISTRY)


def get_segmenter_class(name: str) -> type[Segmenter]:
    _load_builtin_segmenters()
    if name not in _REGISTRY:
        raise KeyError(f"unknown segmenter {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def list_presets(segmenter: str) -> list[str]:
    folder = PRESET_DIR / segmenter
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def load_preset(segmenter: str, preset: str) -> dict[str, Any]:
    path = PRESET_DIR / segmenter / f"{preset}.yaml"
    if not path.is_file():
        raise KeyError(
            f"segmenter {segmenter!r} has no preset {preset!r}; available: {', '.join(list_presets(segmenter))}"
        )
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"preset file {path} must hold a mapping")
    data.pop("paper", None)  # published results of the preset (for ovseg-eval), not an option
    return data


def load_paper_results(segmenter: str, preset: str) -> list[dict[str, Any]]:
    """The ``paper:`` entries of a preset: the authors' published numbers (``ovseg_ros.eval`` reads them)."""
    path = PRESET_DIR / segmenter / f"{preset}.yaml"
    data = yaml.safe_load(path.read_text()) if path.is_file() else None
    entries = data.get("paper") if isinstance(data, dict) else None
    return [dict(e) for e in entries] if isinstance(entries, list) else []


def make_config(cls: type, values: Mapping[str, Any]) -> Any:
    """Build config dataclass ``cls`` from a mapping; nested dataclass fields accept mappings.

    Unknown keys raise ``TypeError`` naming them; lists become tuples where the field default is a tuple.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise TypeError(f"{cls.__name__}: unknown option(s) {unknown}; valid: {sorted(fields)}")
    kwargs = {}
    hints = _type_hints(cls)
    for key, value in values.items():
        ftype = hints.get(key)
        if dataclasses.is_dataclass(ftype) and isinstance(value, Mapping):
            value = make_config(ftype, value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def merge_config(config: Any, overrides: Mapping[str, Any]) -> Any:
    """A copy of ``config`` with ``overrides`` applied (nested mappings merge into nested dataclasses)."""
    current = dataclasses.asdict(config)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(current.get(key), dict):
            current[key] = {**current[key], **value}
        else:
            current[key] = value
    return make_config(type(config), current)


def _type_hints(cls: type) -> dict[str, Any]:
    import typing

    try:
        return typing.get_type_hints(cls)
    except Exception:  # forward references that cannot resolve: fall back to no nesting
        return {}


def build_segmenter(
    name: str,
    preset: str = "",
    overrides: Optional[Mapping[str, Any]] = None,
    device: str | torch.device = "cpu",
    **kwargs: Any,
) -> Segmenter:
    """Resolve preset -> merge overrides -> build the segmenter (which loads its own models).

    ``kwargs`` go to the segmenter's ``from_config`` (e.g. ``cache_dir``, ``offline``).
    """
    cls = get_segmenter_class(name)
    values: dict[str, Any] = {}
    if preset:
        values.update(load_preset(name, preset))
    config = make_config(cls.config_cls, values)
    if overrides:
        config = merge_config(config, overrides)
    return cls.from_config(config, device=device, **kwargs)  # type: ignore[attr-defined]


# --- small shared helpers -----------------------------------------------------------------------------
def check_image(image: np.ndarray, max_pixels: int = 8192 * 8192) -> np.ndarray:
    """Validate an HWC uint8 RGB image; return it C-contiguous. Raises :class:`ImageError`."""
    if not isinstance(image, np.ndarray):
        raise ImageError(f"expected a numpy array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ImageError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ImageError(f"expected uint8 pixels, got {image.dtype}")
    h, w = image.shape[:2]
    if h == 0 or w == 0:
        raise ImageError(f"the image is empty ({w}x{h})")
    if h * w > max_pixels:
        raise ImageError(f"the image has {w}x{h} pixels, more than the limit of {max_pixels}")
    return np.ascontiguousarray(image)


class StageTimer:
    """Collects per-stage wall times; synchronises CUDA so GPU stages are measured, not just queued."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        sync = self.device.type == "cuda"
        if sync:
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if sync:
                torch.cuda.synchronize(self.device)
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0


def labels_from_probs(
    probs: torch.Tensor, background: Optional[torch.Tensor] = None, prob_threshold: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """(K, H, W) class scores -> (labels int32, confidence float32) as numpy, one GPU->CPU copy each.

    Pixels where ``background`` (H, W) beats every class, or where the best class score is below
    ``prob_threshold``, are :data:`UNLABELED`. Confidence is the winning score (the background score
    where background wins), clamped to [0, 1].
    """
    conf, idx = probs.max(dim=0)
    labels = idx.to(torch.int32)
    unlabeled = torch.full_like(labels, UNLABELED)
    if background is not None:
        bg_wins = background > conf
        labels = torch.where(bg_wins, unlabeled, labels)
        conf = torch.where(bg_wins, background.to(conf.dtype), conf)
    if prob_threshold > 0:
        labels = torch.where(conf < prob_threshold, unlabeled, labels)
    return labels.cpu().numpy(), conf.float().clamp(0, 1).cpu().numpy()
