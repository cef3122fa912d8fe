from __future__ import annotations

import numpy as np
import pytest
import torch

from ovseg_ros.core import clip_vit
from ovseg_ros.core.models import ModelSpec, load_clip
from ovseg_ros.core.segmenter import ImageError, build_segmenter, list_presets, list_segmenters
from ovseg_ros.core.vocabulary import UNLABELED, Vocabulary


@pytest.fixture(scope="module")
def segmenter(tiny_model_overrides):
    seg = build_segmenter("dense_clip", "default", {**tiny_model_overrides, "short_side": 64})
    seg.set_vocabulary(Vocabulary.from_request(["floor", "chair", "person, people", "door"]))
    return seg


def test_registered_with_presets() -> None:
    assert "dense_clip" in list_segmenters()
    assert {"default", "realtime", "sliding"} <= set(list_presets("dense_clip"))


def test_output_shapes_values_and_vocabulary(segmenter, rgb_image) -> None:
    r = segmenter.segment(rgb_image)
    assert r.labels.shape == rgb_image.shape[:2] and r.labels.dtype == np.int32
    assert r.confidence.shape == rgb_image.shape[:2] and r.confidence.dtype == np.float32
    assert set(np.unique(r.labels)) <= {UNLABELED, 0, 1, 2, 3}
    assert 0.0 <= r.confidence.min() and r.confidence.max() <= 1.0
    assert r.vocabulary.names == ["floor", "chair", "person", "door"]
    assert {"backbone", "classify"} <= set(r.timings)


def test_state_is_explicit_and_atomic(segmenter, rgb_image) -> None:
    old = segmenter.state
    new = segmenter.encode_vocabulary(Vocabulary.from_request(["sky", "road"], revision=7))
    r_new = segmenter.segment(rgb_image, new)
    r_old = segmenter.segment(rgb_image)  # the default state did not change
    assert r_new.vocabulary.revision == 7 and set(np.unique(r_new.labels)) <= {UNLABELED, 0, 1}
    assert r_old.vocabulary is old.vocabulary


def test_labels_equal_argmax_of_max_over_names(segmenter, rgb_image) -> None:
    """Recompute the class decision directly and compare (fp32, same resize path)."""
    st = segmenter.state
    x = segmenter._prepare(rgb_image)
    feats, _ = clip_vit.dense_features(segmenter.clip.visual, x)
    scores = torch.einsum("bchw,qc->bqhw", feats.float(), st.text)[0]
    probs = torch.softmax(segmenter.config.logit_scale * scores, 0)
    per_class = torch.stack([probs[[i for i, o in enumerate(st.owner.tolist()) if o == k]].max(0).values
                             for k in range(4)])
    up = torch.nn.functional.interpolate(per_class[None], size=rgb_image.shape[:2], mode="bilinear",
                                         align_corners=False)[0]
    expected = up.argmax(0).numpy()
    got = segmenter.segment(rgb_image).labels
    assert (got == expected).mean() > 0.999


def test_background_words_leave_pixels_unlabeled(tiny_model_overrides, rgb_image) -> None:
    seg = build_segmenter("dense_clip", "default", {**tiny_model_overrides, "short_side": 64,
                                                     "background": ["wall", "sky", "ground"], "logit_scale": 100.0})
    seg.set_vocabulary(Vocabulary.from_request(["chair"]))
    r = seg.segment(rgb_image)
    assert set(np.unique(r.labels)) <= {UNLABELED, 0}


def test_sliding_windows_match_shapes(tiny_model_overrides, rgb_image) -> None:
    seg = build_segmenter("dense_clip", "sliding", {**tiny_model_overrides, "short_side": 64, "window": 32,
                                                     "window_stride": 16, "templates": "photo"})
    seg.set_vocabulary(Vocabulary.from_request(["a", "b"]))
    r = seg.segment(rgb_image)
    assert r.labels.shape == (60, 80)


def test_query_masks_and_scores(segmenter, rgb_image) -> None:
    q = segmenter.query(rgb_image, ["the red part", "the blue part"])
    assert len(q.masks) == 2 and all(m.shape == (60, 80) and m.dtype == bool for m in q.masks)
    assert all(0.0 <= s <= 1.0 for s in q.scores)
    assert segmenter.state.vocabulary.names[0] == "floor"  # query never touches the vocabulary


@pytest.mark.parametrize(
    "bad, fragment",
    [
        (np.zeros((0, 5, 3), np.uint8), "empty"),
        (np.zeros((5, 5), np.uint8), "RGB"),
        (np.zeros((5, 5, 3), np.float32), "uint8"),
        ("not an image", "numpy"),
    ],
)
def test_bad_images_raise_image_error(segmenter, bad, fragment) -> None:
    with pytest.raises(ImageError, match=fragment):
        segmenter.segment(bad)


def test_unknown_option_and_preset_fail_loudly(tiny_model_overrides) -> None:
    with pytest.raises(TypeError, match="unknown option"):
        build_segmenter("dense_clip", "default", {**tiny_model_overrides, "shortside": 3})
    with pytest.raises(KeyError, match="no preset"):
        build_segmenter("dense_clip", "nonexistent")
    with pytest.raises(KeyError, match="unknown segmenter"):
        build_segmenter("nope")


def test_pos_embed_interpolation_keeps_trained_grid(tiny_vit_checkpoint) -> None:
    visual = load_clip(ModelSpec("ovseg-tiny-vit", "", str(tiny_vit_checkpoint))).visual
    assert clip_vit.interpolate_pos_embed(visual, (14, 14)) is visual.positional_embedding
    assert clip_vit.interpolate_pos_embed(visual, (5, 7)).shape == (36, 32)


def test_max_over_names_uneven_counts() -> None:
    scores = torch.tensor([[1.0, 5.0, 2.0, 0.5, 3.0]]).view(1, 5, 1, 1)
    owner = torch.tensor([0, 1, 1, 2, 1])
    out = clip_vit.max_over_names(scores, owner, 3).flatten().tolist()
    assert out == [1.0, 5.0, 0.5]


def test_resized_pos_embed_is_cached_and_follows_weight_changes(tiny_vit_checkpoint) -> None:
    visual = load_clip(ModelSpec("ovseg-tiny-vit", "", str(tiny_vit_checkpoint))).visual
    a = clip_vit.interpolate_pos_embed(visual, (5, 7))
    assert clip_vit.interpolate_pos_embed(visual, (5, 7)) is a  # one interpolation per frame size
    with torch.no_grad():
        visual.positional_embedding.mul_(2.0)  # in-place weight change (as load_state_dict does)
    b = clip_vit.interpolate_pos_embed(visual, (5, 7))
    assert b is not a and torch.allclose(b, 2 * a)
    with torch.inference_mode():
        c = clip_vit.interpolate_pos_embed(visual, (6, 6))
    assert not c.is_inference()  # usable by the gradient-based methods too


def test_segment_batch_equals_frame_by_frame(segmenter, rgb_image) -> None:
    """Several cameras in one pass: same labels as one call per frame, also with frames of another size."""
    state = segmenter.encode_vocabulary(Vocabulary.from_request(["floor", "wall", "person"]))
    other = np.ascontiguousarray(rgb_image[::-1, ::2])
    frames = [rgb_image, np.ascontiguousarray(rgb_image[:, ::-1]), other]
    batched = segmenter.segment_batch(frames, state)
    for frame, got in zip(frames, batched):
        one = segmenter.segment(frame, state)
        assert got.labels.shape == frame.shape[:2]
        assert (got.labels == one.labels).mean() > 0.999
        np.testing.assert_allclose(got.confidence, one.confidence, atol=1e-4)
        assert got.vocabulary is state.vocabulary

