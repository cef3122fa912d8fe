"""The CLIP-ES segmenter end to end on a tiny random ViT: plumbing, presets, tags, pseudo-labels."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from ovseg_ros.core import cam as C
from ovseg_ros.core.segmenter import build_segmenter, list_presets, list_segmenters, load_preset
from ovseg_ros.core.segmenters.clip_es import ClipEsSegmenter
from ovseg_ros.core.vocabulary import UNLABELED, Vocabulary

VOCAB = ["floor", "chair", "person, people", "door", "wall"]


@pytest.fixture(scope="module")
def segmenter(tiny_model_overrides):
    seg = build_segmenter("clip_es", "voc", {**tiny_model_overrides, "crf": False})
    seg.set_vocabulary(Vocabulary.from_request(VOCAB))
    return seg


def test_registered_with_presets() -> None:
    assert "clip_es" in list_segmenters()
    assert {"voc", "coco", "realtime"} <= set(list_presets("clip_es"))
    voc, coco = load_preset("clip_es", "voc"), load_preset("clip_es", "coco")
    assert len(voc["background"]) == 25 and len(coco["background"]) == 23
    assert (voc["box_threshold"], coco["box_threshold"]) == (0.4, 0.7)
    assert tuple(voc["background"]) == C.VOC_BACKGROUND and tuple(coco["background"]) == C.COCO_BACKGROUND


def test_segment_outputs(segmenter, rgb_image) -> None:
    r = segmenter.segment(rgb_image)
    assert r.labels.shape == rgb_image.shape[:2] and r.labels.dtype == np.int32
    assert r.confidence.dtype == np.float32 and 0 <= r.confidence.min() and r.confidence.max() <= 1
    assert set(np.unique(r.labels)) <= {UNLABELED, *range(len(VOCAB))}
    assert {"backbone", "classify", "gradcam", "affinity", "labels"} <= set(r.timings)
    assert r.vocabulary.names == ["floor", "chair", "person", "door", "wall"]


def test_prompts_and_background_words(segmenter) -> None:
    st = segmenter.state
    assert segmenter.describe_prompts(st)[2] == ["a clean origami person,people."]  # authors' synonym fusion
    # the voc preset keeps every background word, as the authors (a class "wall" competes with "wall")
    assert "wall" in st.background_words and len(st.background_words) == 25
    assert st.text.shape[0] == len(VOCAB) and st.background.shape[0] == 25


def test_background_overlaps_dropped_outside_the_paper_presets(tiny_model_overrides) -> None:
    seg = build_segmenter("clip_es", "voc", {**tiny_model_overrides, "crf": False, "drop_background_overlaps": True})
    st = seg.encode_vocabulary(Vocabulary.from_request(VOCAB))
    assert "wall" not in st.background_words and len(st.background_words) == 24  # a class never competes
    assert load_preset("clip_es", "realtime").get("drop_background_overlaps", True)


def test_given_tags_restrict_labels(segmenter, rgb_image) -> None:
    r = segmenter.segment(rgb_image, present=[3, 1])
    assert set(np.unique(r.labels)) <= {UNLABELED, 1, 3}
    with pytest.raises(ValueError):
        segmenter.segment(rgb_image, present=[7])


def test_labels_match_direct_pipeline(segmenter, rgb_image) -> None:
    """Recompute the label map from the shared primitives (no CRF) and compare."""
    st, cfg = segmenter.state, segmenter.config
    x = C.prepare_image(segmenter.clip, rgb_image)
    cc = C.ClipCam(segmenter.clip, max_batch=1)
    enc = cc.encode(x)
    present = [2, 0]
    cams = cc.gradcam(enc, st.text[present], st.background, [0, 1])
    cams = C.refine_with_affinity(cc.affinity(enc), cams, cfg.box_threshold, clip_box_edges=cfg.clip_box_edges)
    up = torch.nn.functional.interpolate(cams[None], size=rgb_image.shape[:2], mode="bilinear",
                                         align_corners=False)[0].clamp(0, 1)
    scores = torch.cat([1 - up.max(0, keepdim=True).values, up])
    expected = np.array([UNLABELED, 2, 0])[scores.argmax(0).numpy()]
    got = segmenter.segment(rgb_image, present=present).labels
    assert (got == expected).mean() > 0.999


def test_presence_decision(segmenter) -> None:
    p = torch.tensor([0.05, 0.4, 0.3, 0.2, 0.05])
    assert segmenter._choose_present(p) == [1, 2, 3]
    seg = ClipEsSegmenter.__new__(ClipEsSegmenter)
    for cfg, want in (({"max_present": 2}, [1, 2]), ({"presence_threshold": 0.9}, [1]),
                      ({"presence_threshold": 0.9, "min_present": 0}, []),
                      ({"presence_threshold": 0.9, "min_present": 2}, [1, 2])):
        from ovseg_ros.core.segmenter import merge_config

        seg.config = merge_config(segmenter.config, cfg)
        assert seg._choose_present(p) == want


def test_query_gives_one_mask_per_text(segmenter, rgb_image) -> None:
    q = segmenter.query(rgb_image, ["a red chair", "a blue door", "the floor"])
    assert q.texts == ["a red chair", "a blue door", "the floor"] and len(q.masks) == 3
    assert all(m.shape == rgb_image.shape[:2] and m.dtype == bool for m in q.masks)
    assert not (q.masks[0] & q.masks[1]).any()
    assert all(0 <= s <= 1 for s in q.scores)


def test_pseudo_label_voc_convention(tiny_model_overrides, rgb_image) -> None:
    seg = build_segmenter("clip_es", "voc", tiny_model_overrides)  # CRF on, as the authors export
    seg.set_vocabulary(Vocabulary.from_request(VOCAB))
    png = seg.pseudo_label(rgb_image, present=[1, 4])
    assert png.dtype == np.uint8 and png.shape == rgb_image.shape[:2]
    assert set(np.unique(png)) <= {0, 2, 5, 255}
    assert 255 not in seg.pseudo_label(rgb_image, present=[1, 4], ignore_below=0.0)
    assert set(np.unique(seg.pseudo_label(rgb_image, present=[1, 4], ignore_below=1.01))) == {255}


def test_crf_paths_and_options(tiny_model_overrides, rgb_image) -> None:
    ov = {**tiny_model_overrides, "crf_max_side": 40, "synonyms": "mean", "retry_without_background": True,
          "short_side": 48, "clip_box_edges": True}
    seg = build_segmenter("clip_es", "coco", ov)
    st = seg.set_vocabulary(Vocabulary.from_request(VOCAB))
    assert seg.describe_prompts(st)[2] == ["a clean origami person.", "a clean origami people."]
    r = seg.segment(rgb_image)
    assert r.labels.shape == rgb_image.shape[:2] and "crf" in r.timings
    seg.backbone_forward(rgb_image)


def test_worker_thread_and_no_grad_state(segmenter, rgb_image) -> None:
    out = {}

    def work() -> None:
        out["r"] = segmenter.segment(rgb_image)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    ref = segmenter.segment(rgb_image)
    assert np.array_equal(out["r"].labels, ref.labels)
    assert all(p.grad is None and not p.requires_grad for p in segmenter.clip.model.parameters())
    assert torch.is_grad_enabled()
