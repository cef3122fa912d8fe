"""The model-free ``color_key`` segmenter: a known output for ROS-layer tests and benchmarks."""

from __future__ import annotations

import numpy as np
import pytest

from ovseg_ros.core.segmenter import build_segmenter, list_segmenters
from ovseg_ros.core.segmenters.color_key import key_colors
from ovseg_ros.core.vocabulary import UNLABELED, Vocabulary


def test_registered_with_a_preset() -> None:
    assert "color_key" in list_segmenters()


def test_key_colours_give_their_class_and_others_are_unlabeled() -> None:
    seg = build_segmenter("color_key", "realtime")
    vocab = Vocabulary.from_request(["floor", "wall", "person", "chair"])
    state = seg.encode_vocabulary(vocab)
    keys = key_colors(4)
    image = np.zeros((40, 50, 3), np.uint8)
    image[:, :] = (128, 128, 128)  # grey: far from every palette colour
    for i in range(4):
        image[i * 10: (i + 1) * 10, :25] = keys[i]
    result = seg.segment(image, state)
    for i in range(4):
        assert (result.labels[i * 10: (i + 1) * 10, :25] == i).all()
        assert (result.confidence[i * 10: (i + 1) * 10, :25] > 0.8).all()
    grey = np.linalg.norm(keys.astype(float) - 128, axis=1).min()
    if grey > 40:
        assert (result.labels[:, 25:] == UNLABELED).all()
    assert result.labels.dtype == np.int32 and result.vocabulary is vocab


def test_explicit_colours_and_bad_options() -> None:
    seg = build_segmenter("color_key", "realtime", {"colors": ["#ff0000", "#00ff00"]})
    state = seg.encode_vocabulary(Vocabulary.from_request(["a", "b"]))
    image = np.zeros((2, 2, 3), np.uint8)
    image[0] = (255, 0, 0)
    image[1] = (0, 255, 0)
    assert seg.segment(image, state).labels.tolist() == [[0, 0], [1, 1]]
    with pytest.raises(ValueError, match="max_distance"):
        build_segmenter("color_key", "realtime", {"max_distance": float("nan")})
    with pytest.raises(ValueError, match="#rrggbb"):
        build_segmenter("color_key", "realtime", {"colors": ["red"]})


def test_large_vocabulary_labels_stay_in_range() -> None:
    seg = build_segmenter("color_key", "realtime")
    vocab = Vocabulary.from_request([f"class {i}" for i in range(300)])
    result = seg.segment(np.random.default_rng(0).integers(0, 256, (30, 30, 3), dtype=np.uint8), seg.encode_vocabulary(vocab))
    assert result.labels.min() >= UNLABELED and result.labels.max() < 300


def test_model_free_identity_is_not_random_weights(tiny_model_overrides) -> None:
    """color_key has no model: its identity says so, so the node does not warn about RANDOM weights
    (segment_node warns only for identities ending in '@random'); a model without weights still warns."""
    from ovseg_ros.ros.params import NodeConfig

    cfg = NodeConfig.from_values({})
    assert cfg.model_identity(build_segmenter("color_key", "realtime")) == "model-free"
    tiny = build_segmenter("dense_clip", "realtime", tiny_model_overrides)
    assert cfg.model_identity(tiny).startswith("ovseg-tiny-vit@file:")


def test_vectorised_lookup_matches_the_per_channel_formula() -> None:
    """The uint16 cell index (cv2.split + in-place shifts) is the 5-bit RGB cell, for every byte value and for
    non-contiguous input (a crop of a larger image)."""
    from ovseg_ros.core.segmenters.color_key import cell_index, lookup

    rng = np.random.default_rng(3)
    big = rng.integers(0, 256, (40, 260, 3), dtype=np.uint8)
    values = np.arange(256, dtype=np.uint8)
    big[0, :256] = np.stack([values, values[::-1], rng.permutation(values)], -1)  # every byte in every channel
    for image in (big, big[:30, 3:250]):
        q = image.astype(np.int64) >> 3
        expected = (q[..., 0] << 10) | (q[..., 1] << 5) | q[..., 2]
        index = cell_index(image)
        assert index.dtype == np.uint16 and index.shape == image.shape[:2]
        np.testing.assert_array_equal(index, expected)
        labels_table = rng.integers(-1, 20, 1 << 15).astype(np.int32)
        conf_table = rng.random(1 << 15).astype(np.float32)
        labels, conf = lookup(image, labels_table, conf_table)
        np.testing.assert_array_equal(labels, labels_table[expected])
        np.testing.assert_array_equal(conf, conf_table[expected])
