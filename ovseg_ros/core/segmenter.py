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
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from .untrusted import UntrustedInputError, load_yaml, read_text_file, short_repr
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
        confidence: (H, W) float32 in [0, 1], the score of the chosen label (0 where unlabeled by rule); a
            segmenter asked for wire dtypes may give uint8 0..255 instead (consumers accept both).
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
    #: The config field holding the confidence below which a pixel is left unlabeled (0: none). Methods keep
    #: their authors' names (ITACLIP: ``prob_thd``); :meth:`label_threshold` is the one way to read it.
    threshold_field: ClassVar[str] = "prob_threshold"

    def __init__(self, config: Any, device: torch.device | str = "cpu") -> None:
        self.config = config
        self.device = torch.device(device)
        self._state: Optional[VocabularyState] = None
        #: ONNX Runtime stand-in for the image encoder (:mod:`.deploy`); None runs the torch encoder.
        self.image_encoder: Optional[Any] = None

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

    def label_threshold(self) -> float:
        """The confidence below which :meth:`segment` leaves a pixel unlabeled (0.0 when it never does);
        published as ``LabelInfo.threshold``."""
        value = getattr(self.config, self.threshold_field, 0.0) if self.threshold_field else 0.0
        return float(value or 0.0)

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

    def image_graph(self) -> Optional[Any]:
        """The vocabulary-independent image encoder as a :class:`.deploy.ImageGraph` for ONNX export, or None
        when the method cannot run exported (see docs/deploy.md)."""
        return None

    def backbone_forward(self, image: np.ndarray) -> None:
        """One bare forward of the main backbone at the size ``segment`` would use (benchmark baseline)."""
        raise NotImplementedError

    def to(self, device: torch.device | str) -> "Segmenter":
        """Move models to ``device`` (the node moves to CPU on deactivate to free GPU memory).

        Models re-resolve their dtype for the new device (:meth:`ClipModel.to`: ``precision: auto`` is fp16
        on CUDA and fp32 on the CPU), so a deactivated node does not run text encodings in fp16 on the CPU.
        """
        self.device = torch.device(device)
        return self

    def release_device_caches(self) -> None:
        """Drop what shared caches hold on devices other than this segmenter's (the node calls it after
        moving the model, so a deactivated node frees its GPU memory): the resized position tables of
        :mod:`clip_vit`. Text-embedding memory caches hold host copies only (:class:`TextEncoder`), and
        per-segmenter device caches are cleared by :meth:`to`."""
        from .clip_vit import clear_pos_cache

        clear_pos_cache(keep=self.device)


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


#: The preset used when none is given (node, ovseg-export): the first of these the segmenter has.
AUTO_PRESETS = ("realtime", "default")


def auto_preset(segmenter: str) -> str:
    """The first of :data:`AUTO_PRESETS` that ``segmenter`` has, "" if none (its built-in configuration)."""
    available = list_presets(segmenter)
    return next((p for p in AUTO_PRESETS if p in available), "")


def load_preset(segmenter: str, preset: str) -> dict[str, Any]:
    path = PRESET_DIR / segmenter / f"{preset}.yaml"
    if not path.is_file():
        raise KeyError(
            f"segmenter {segmenter!r} has no preset {preset!r}; available: {', '.join(list_presets(segmenter))}"
        )
    try:
        data = load_yaml(read_text_file(path, "preset file"), f"preset file {path}") or {}
    except UntrustedInputError as exc:
        raise ConfigError(str(exc)) from None
    if not isinstance(data, dict):
        raise ConfigError(f"preset file {path} must hold a mapping")
    data.pop("paper", None)  # published results of the preset (for ovseg-eval), not an option
    return data


def load_paper_results(segmenter: str, preset: str) -> list[dict[str, Any]]:
    """The ``paper:`` entries of a preset: the authors' published numbers (``ovseg_ros.eval`` reads them)."""
    path = PRESET_DIR / segmenter / f"{preset}.yaml"
    try:
        data = load_yaml(read_text_file(path, "preset file"), f"preset file {path}") if path.is_file() else None
    except UntrustedInputError:
        return []
    entries = data.get("paper") if isinstance(data, dict) else None
    return [dict(e) for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


# --- config validation --------------------------------------------------------------------------------
class ConfigError(ValueError, TypeError):
    """A segmenter option that is refused; the message names the option, the rule and the value.

    A ``TypeError`` too, for callers written against the earlier "unknown option" errors.
    """


@dataclass(frozen=True)
class Range:
    """Numeric constraint of a config field (for a tuple field: of every element). Values are always finite."""

    lo: float = 0.0
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False
    odd: bool = False

    def reason(self, value: float) -> Optional[str]:
        if not math.isfinite(value):
            return "must be a finite number"
        if value < self.lo or (self.lo_open and value == self.lo) or value > self.hi or (
            self.hi_open and value == self.hi
        ):
            return f"must be {self.describe()}"
        if self.odd and int(value) % 2 == 0:
            return "must be odd"
        return None

    def describe(self) -> str:
        lo, hi = ("(" if self.lo_open else "[") + f"{self.lo:g}", f"{self.hi:g}" + (")" if self.hi_open else "]")
        if math.isfinite(self.hi):
            return f"in {lo}, {hi}"
        return f"> {self.lo:g}" if self.lo_open else f">= {self.lo:g}"


@dataclass(frozen=True)
class OneOf:
    """The field (or every element of a tuple field) must be one of ``choices``."""

    choices: tuple[Any, ...]

    def reason(self, value: Any) -> Optional[str]:
        return None if value in self.choices else f"must be one of {', '.join(map(str, self.choices))}"


@dataclass(frozen=True)
class Template:
    """A prompt template: exactly one ``{}`` and no other format field (``{0.__class__}``, ``{1}``) that
    ``str.format`` would resolve or fail on at encode time; at most ``max_chars`` characters."""

    max_chars: int = 300

    def reason(self, value: Any) -> Optional[str]:
        import string

        if len(value) > self.max_chars:
            return f"must be at most {self.max_chars} characters"
        try:
            fields = [f for _, f, spec, conv in string.Formatter().parse(value) if f is not None]
        except ValueError:
            return "must be a template with one '{}' (unbalanced braces)"
        if fields != [""]:
            return "must contain exactly one '{}' and no other {...} field"
        return None


@dataclass(frozen=True)
class PlainName:
    """A file name inside a package folder: no path separators or parent references."""

    def reason(self, value: Any) -> Optional[str]:
        if value and (len(value) > 200 or "/" in value or "\\" in value or value.startswith(".")):
            return "must be a plain file name (no folders)"
        return None


@dataclass(frozen=True)
class Pattern:
    """A string field (or every element of a tuple field) that must fully match ``regex``; ``describe`` says how."""

    regex: str
    describe: str

    def reason(self, value: Any) -> Optional[str]:
        import re

        return None if len(value) <= 200 and re.fullmatch(self.regex, value) else f"must be {self.describe}"


Constraint = Union[Range, OneOf, Template, PlainName, Pattern]
#: Largest finite float32: every float option must stay below it in magnitude (checked for all of them).
FLOAT32_MAX = 3.4028234663852886e38
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
#: Numbers without a declared constraint must be finite and >= 0 (sizes, counts, thresholds, scales);
#: a field that may be negative declares its Range.
DEFAULT_RANGE = Range()
UNIT = Range(0.0, 1.0)
POSITIVE = Range(0.0, lo_open=True)
#: Pixel sizes: an input side beyond this would allocate gigabytes per frame.
SIDE = Range(0, 16384)
_CONSTRAINTS: dict[type, dict[str, Constraint]] = {}


def declare_constraints(cls: type, **constraints: Constraint) -> None:
    """Declare the value rules of config dataclass ``cls``: ``field=Range(...)`` or ``field=OneOf(...)``.

    Every config is checked by :func:`validate_config` (from :func:`make_config`), field by field: the type
    from the annotation (bool, int, float, str, tuples, nested configs), finiteness of every number (floats as
    float32, integers as int64: they become tensors), and the declared rule (numbers without one: >= 0).
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(constraints) - fields)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {unknown} to constrain")
    _CONSTRAINTS.setdefault(cls, {}).update(constraints)


def constraints_of(cls: type) -> dict[str, Constraint]:
    return dict(_CONSTRAINTS.get(cls, {}))


def validate_config(config: Any, prefix: str = "") -> None:
    """Check every field of ``config`` (and of nested configs) against its type and constraint.

    Raises:
        ConfigError: the first offending option, e.g. ``option 'logit_scale' must be in > 0, got nan``.
    """
    cls = type(config)
    hints = _type_hints(cls)
    rules = _CONSTRAINTS.get(cls, {})
    for f in dataclasses.fields(cls):
        if f.name.startswith("_") or f.name not in hints:
            continue
        value = getattr(config, f.name)
        path = f"{prefix}{f.name}"
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint) and isinstance(value, hint):
            validate_config(value, prefix=f"{path}.")
            continue
        _check_value(path, hint, value, rules.get(f.name))


def _check_value(path: str, hint: Any, value: Any, rule: Optional[Constraint]) -> None:
    import typing

    def fail(why: str) -> None:
        raise ConfigError(f"option {path!r} {why}, got {short_repr(value)}")

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        if value is None and type(None) in args:
            return
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            _check_value(path, inner[0], value, rule)
        return
    if origin is tuple:
        if not isinstance(value, tuple):
            fail("must be a list")
        if len(args) == 2 and args[1] is Ellipsis:
            for i, item in enumerate(value):
                _check_value(f"{path}[{i}]", args[0], item, rule)
        elif args and args != ((),):
            if len(value) != len(args):
                fail(f"must have {len(args)} elements")
            for i, (item, a) in enumerate(zip(value, args)):
                _check_value(f"{path}[{i}]", a, item, rule)
        return
    if hint is bool:
        if not isinstance(value, bool):
            fail("must be true or false")
    elif hint is int:
        if not isinstance(value, int) or isinstance(value, bool):
            fail("must be an integer")
    elif hint is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            fail("must be a number")
    elif hint is str:
        if not isinstance(value, str):
            fail("must be a string")
    elif dataclasses.is_dataclass(hint):
        fail("must be a mapping of options")
    else:
        return  # annotations without a rule (Any, callables)
    if hint is int and not INT64_MIN <= value <= INT64_MAX:
        fail("must fit in a 64-bit integer")
    if hint in (int, float):
        finite = not isinstance(value, float) or math.isfinite(value)  # NaN/inf: the range's own reason
        if hint is float and finite and abs(value) > FLOAT32_MAX:
            # Options become float32 tensors (or multiply them): beyond this they turn into inf/NaN silently.
            fail(f"must be a finite float32 number (|x| <= {FLOAT32_MAX:.4g})")
        why = (rule if isinstance(rule, Range) else DEFAULT_RANGE).reason(float(value))
        if why is None and isinstance(rule, OneOf):
            why = rule.reason(value)
        if why:
            fail(why)
    elif rule is not None and not isinstance(rule, Range):
        why = rule.reason(value)
        if why:
            fail(why)


def make_config(cls: type, values: Mapping[str, Any], prefix: str = "") -> Any:
    """Build config dataclass ``cls`` from a mapping and validate it (:func:`validate_config`).

    Nested dataclass fields accept mappings; lists become tuples; integers given for float fields become
    floats. Raises :class:`ConfigError` (unknown keys, wrong types, values out of range) naming the option.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    if not isinstance(values, Mapping):
        raise ConfigError(f"options{' of ' + repr(prefix.rstrip('.')) if prefix else ''} must be a mapping, "
                          f"got {short_repr(values)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    bad_keys = [k for k in values if not isinstance(k, str)]
    if bad_keys:
        raise ConfigError(f"{cls.__name__}: option names must be strings, got {short_repr(bad_keys[0])}")
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"{cls.__name__}: unknown option(s) {short_repr([prefix + k for k in unknown])}; valid: {sorted(fields)}"
        )
    kwargs = {}
    hints = _type_hints(cls)
    rules = _CONSTRAINTS.get(cls, {})
    for key, value in values.items():
        ftype = hints.get(key)
        if dataclasses.is_dataclass(ftype) and isinstance(value, Mapping):
            value = make_config(ftype, value, prefix=f"{prefix}{key}.")
        elif isinstance(value, list):
            value = tuple(value)
        if ftype is float and isinstance(value, int) and not isinstance(value, bool) and abs(value) <= FLOAT32_MAX:
            value = float(value)  # (a larger int stays one, for the check to refuse with the reason)
        if ftype is not None and not (dataclasses.is_dataclass(ftype) and isinstance(value, ftype)):
            # Before construction: a config's own __post_init__ may compare values of the wrong type.
            _check_value(prefix + key, ftype, value, rules.get(key))
        kwargs[key] = value
    try:
        config = cls(**kwargs)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001
        # The config's own __post_init__ checks (ValueError), or one tripping on an odd value (e.g. an
        # OSError from a file-name check given a 5000-character name): either way a refusal with the reason.
        text = str(exc)
        raise ConfigError(f"{cls.__name__}: {text if len(text) <= 300 else text[:297] + '...'}") from None
    validate_config(config, prefix)
    return config


def merge_config(config: Any, overrides: Mapping[str, Any]) -> Any:
    """A copy of ``config`` with ``overrides`` applied (nested mappings merge into nested dataclasses)."""
    if not isinstance(overrides, Mapping):
        raise ConfigError(f"options must be a mapping, got {short_repr(overrides)}")
    current = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
    for key, value in overrides.items():
        old = current.get(key) if isinstance(key, str) else None
        if isinstance(value, Mapping) and dataclasses.is_dataclass(old):
            value = {**{f.name: getattr(old, f.name) for f in dataclasses.fields(old) if f.init}, **value}
        current[key] = value
    return make_config(type(config), current)


def check_overrides(name: str, preset: str = "", overrides: Optional[Mapping[str, Any]] = None) -> Any:
    """The validated config :func:`build_segmenter` would use, without building anything (no models).

    Raises:
        KeyError: unknown segmenter or preset. ConfigError: an option that is refused.
    """
    cls = get_segmenter_class(name)
    values: dict[str, Any] = {}
    if preset:
        values.update(load_preset(name, preset))
    try:
        config = make_config(cls.config_cls, values)
        return merge_config(config, overrides) if overrides else config
    except ConfigError as exc:
        raise ConfigError(f"{name}: {exc}") from None


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
    backend: Optional[Any] = None,
    **kwargs: Any,
) -> Segmenter:
    """Resolve preset -> merge overrides -> build the segmenter (which loads its own models).

    ``backend`` (:class:`.deploy.BackendOptions`) with ``backend: onnxruntime`` replaces the image encoder by
    an ONNX Runtime session on the exported file (checked against this model). ``kwargs`` go to the
    segmenter's ``from_config`` (e.g. ``cache_dir``, ``offline``).
    """
    cls = get_segmenter_class(name)
    config = check_overrides(name, preset, overrides)
    if backend is not None:
        backend.check()  # a bad backend setting fails before minutes of model loading
    segmenter = cls.from_config(config, device=device, **kwargs)  # type: ignore[attr-defined]
    if backend is not None and backend.backend != "torch":
        from .deploy import attach_onnx

        attach_onnx(segmenter, backend)
    return segmenter


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
    """Collects per-stage wall times.

    On CUDA the device is synchronised around each stage only when profiling (``profile=True``, or the
    environment variable ``OVSEG_PROFILE_STAGES=1``): a synchronisation per stage stalls the queue, so by
    default GPU stage times are the time to queue the work and the last stage (the host copy) absorbs the
    wait. Profile runs (benchmarks) turn it on to see where GPU time goes.
    """

    def __init__(self, device: torch.device, profile: Optional[bool] = None) -> None:
        self.device = torch.device(device)
        if profile is None:
            profile = os.environ.get("OVSEG_PROFILE_STAGES", "") not in ("", "0")
        self.profile = bool(profile)
        self.times: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        sync = self.profile and self.device.type == "cuda"
        if sync:
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if sync:
                torch.cuda.synchronize(self.device)
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0


def to_host(*tensors: torch.Tensor) -> list[np.ndarray]:
    """Device tensors -> numpy arrays with one wait: on CUDA each is copied into pinned host memory
    asynchronously and the stream is synchronised once; CPU tensors are shared, not copied."""
    if not tensors or all(t.device.type != "cuda" for t in tensors):
        return [t.detach().cpu().numpy() for t in tensors]
    outs = []
    for t in tensors:
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t.detach(), non_blocking=True)
        outs.append(host)
    torch.cuda.current_stream(tensors[0].device).synchronize()
    return [h.numpy() for h in outs]


def confidence_to_u8(conf: torch.Tensor) -> torch.Tensor:
    """[0, 1] scores -> uint8 0..255 on the scores' device (round half to even, like the wire encoder)."""
    return conf.float().mul(255.0).round_().clamp_(0, 255).to(torch.uint8)


def labels_from_probs(
    probs: torch.Tensor,
    background: Optional[torch.Tensor] = None,
    prob_threshold: float = 0.0,
    confidence_u8: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(K, H, W) class scores -> (labels int32, confidence) as numpy, copied to the host once.

    Pixels where ``background`` (H, W) beats every class, or where the best class score is below
    ``prob_threshold``, are :data:`UNLABELED`. Confidence is the winning score (the background score
    where background wins), clamped to [0, 1]: float32, or with ``confidence_u8`` the ``mono8`` wire values
    0..255 computed on the device (a quarter of the bytes to copy, no host-side encoding).
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
    conf_out = confidence_to_u8(conf.clamp(0, 1)) if confidence_u8 else conf.float().clamp(0, 1)
    labels_np, conf_np = to_host(labels, conf_out)
    return labels_np, conf_np


def _declare_shared_constraints() -> None:
    # The shared nested configs (the CLIP spec, the LLM endpoint) are declared here, once.
    from .llm_text import LLMConfig
    from .models import _PRECISIONS, ModelSpec

    declare_constraints(ModelSpec, precision=OneOf(_PRECISIONS))
    declare_constraints(
        LLMConfig,
        timeout_s=Range(0, 600, lo_open=True), temperature=Range(0, 2), top_p=Range(0, 1, lo_open=True),
        max_words=Range(1, 200), retry_after_s=Range(0, 86400), max_body_bytes=Range(1024, 16 << 20),
    )


_declare_shared_constraints()
