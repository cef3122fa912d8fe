"""``color_key``: a model-free segmenter whose output is a known function of the image.

Each class has a key colour (its palette colour from :func:`~ovseg_ros.core.postprocess.make_palette`, or one
given per class in ``colors``); a pixel takes the class whose key colour is nearest, when it is within
``max_distance`` (Euclidean, RGB units), else it is unlabeled. Confidence falls linearly from 1 at the key
colour to 0 at ``max_distance``.

It is not a segmentation method. It exists so that the ROS layer can be tested and benchmarked on its own:
a test paints a scene in key colours and knows exactly which labels must come out (the Nav2 and fault tests),
and ``bench_node_stream.py`` measures the node without any model cost (``cost_ms`` adds a simulated model
time to study pipelining). The per-frame cost is one table look-up per pixel: colours are quantised to 5 bits
per channel and the (32768,) label/confidence tables are built once per vocabulary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import cv2
import numpy as np
import torch

from ..segmenter import (
    POSITIVE,
    Pattern,
    Range,
    SegmentationResult,
    Segmenter,
    VocabularyState,
    check_image,
    declare_constraints,
    register_segmenter,
)
from ..vocabulary import UNLABELED, Vocabulary

_BITS = 5
_CELLS = 1 << (3 * _BITS)


@dataclass(frozen=True)
class ColorKeyConfig:
    """Options of the colour-key segmenter (presets in ``presets/color_key``)."""

    #: A pixel farther than this (RGB units) from every key colour is unlabeled.
    max_distance: float = 40.0
    #: Simulated model time per frame in milliseconds (benchmarks of pipelining); 0 = none.
    cost_ms: float = 0.0
    #: Key colour per class id as "#rrggbb"; classes beyond the list use the palette colour.
    colors: tuple[str, ...] = ()


declare_constraints(
    ColorKeyConfig,
    max_distance=POSITIVE,
    cost_ms=Range(0.0, 10_000.0),
    colors=Pattern(r"#?[0-9a-fA-F]{6}", "a colour '#rrggbb'"),
)


@dataclass(frozen=True)
class ColorKeyState(VocabularyState):
    labels: np.ndarray = None  # type: ignore[assignment]  # (32768,) int32 class per quantised colour
    confidence: np.ndarray = None  # type: ignore[assignment]  # (32768,) float32


def key_colors(n: int, colors: tuple[str, ...] = ()) -> np.ndarray:
    """(n, 3) uint8 key colour of each class id: ``colors`` first, the palette after."""
    from ..postprocess import make_palette

    out = make_palette(n).copy()
    for i, text in enumerate(colors[:n]):
        value = str(text).lstrip("#")
        if len(value) != 6:
            raise ValueError(f"color_key: colors[{i}] must be '#rrggbb', got {text!r}")
        out[i] = [int(value[j: j + 2], 16) for j in (0, 2, 4)]
    return out


def cell_index(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W) uint16 index of each pixel's cell (5 bits per channel, R most significant).

    Vectorised without int32 temporaries: OpenCV splits the channels into contiguous planes and the index is
    built in place in 16 bits (half the memory traffic of the obvious int32 expression, about 2x faster).
    """
    shift = 8 - _BITS
    r, g, b = cv2.split(np.ascontiguousarray(image))
    index = (r >> shift).astype(np.uint16)
    index <<= _BITS
    index |= g >> shift
    index <<= _BITS
    index |= b >> shift
    return index


def lookup(image: np.ndarray, labels: np.ndarray, confidence: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel (labels, confidence) from the (32768,) tables; ``np.take`` (a flat gather) beats fancy indexing."""
    index = cell_index(image)
    return np.take(labels, index), np.take(confidence, index)


@register_segmenter("color_key")
class ColorKeySegmenter(Segmenter):
    """Nearest key colour per pixel. See the module docstring."""

    config_cls = ColorKeyConfig

    @classmethod
    def from_config(cls, config: ColorKeyConfig, device: str | torch.device = "cpu", **_: object) -> "ColorKeySegmenter":
        return cls(config, device)  # options are checked by make_config (declare_constraints above)

    def encode_vocabulary(self, vocabulary: Vocabulary) -> ColorKeyState:
        keys = key_colors(len(vocabulary), tuple(self.config.colors)).astype(np.float32)
        step = 1 << (8 - _BITS)
        axis = np.arange(1 << _BITS, dtype=np.float32) * step + (step - 1) / 2.0
        centres = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
        best = np.full(_CELLS, np.inf, np.float32)
        labels = np.full(_CELLS, UNLABELED, np.int32)
        for start in range(0, len(keys), 64):  # bounded memory for large vocabularies
            d = np.linalg.norm(centres[:, None, :] - keys[None, start: start + 64], axis=-1)
            idx = d.argmin(axis=1)
            dist = d[np.arange(_CELLS), idx]
            better = dist < best
            best[better] = dist[better]
            labels[better] = idx[better] + start
        far = best > self.config.max_distance
        labels[far] = UNLABELED
        conf = np.clip(1.0 - best / self.config.max_distance, 0.0, 1.0).astype(np.float32)
        conf[far] = 0.0
        return ColorKeyState(vocabulary=vocabulary, labels=labels, confidence=conf)

    def segment(self, image: np.ndarray, state: Optional[VocabularyState] = None) -> SegmentationResult:
        st = self._resolve_state(state)
        if not isinstance(st, ColorKeyState):
            raise TypeError(f"color_key: expected a ColorKeyState, got {type(st).__name__}")
        image = check_image(image)
        t0 = time.perf_counter()
        labels, conf = lookup(image, st.labels, st.confidence)
        if self.config.cost_ms > 0:
            time.sleep(self.config.cost_ms / 1e3)
        return SegmentationResult(labels, conf, st.vocabulary, timings={"lookup": time.perf_counter() - t0})

    def backbone_forward(self, image: np.ndarray) -> None:
        """No backbone: the look-up is the whole cost."""
