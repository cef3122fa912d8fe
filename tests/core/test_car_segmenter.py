"""CaR end to end on tiny random CLIPs saved to disk and loaded back through checkpoint paths.

The CAM model is ``ovseg-tiny-vit`` (patch 16, 12 blocks, standing in for ViT-B/16), the classifier
``ovseg-tiny-vit-l4`` (patch 14, standing in for ViT-L/14). Random weights: these tests check plumbing and
arithmetic, not recognition. A scripted stage 1 (:class:`BoxStage1`) makes the masks known where a test needs
to reason about them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from ovseg_ros.core import visual_prompts as vp
from ovseg_ros.core.models import ModelSpec, load_clip, save_random_checkpoint
from ovseg_ros.core.segmenter import build_segmenter, list_presets, make_config
from ovseg_ros.core.segmenters.car import CarConfig, CarSegmenter, PromptClassifier
from ovseg_ros.core.text import TextEncoder
from ovseg_ros.core.vocabulary import UNLABELED, Vocabulary

ORIGAMI = "a clean origami "


@pytest.fixture(scope="module")
def classifier_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_checkpoint("ovseg-tiny-vit-l4", tmp_path_factory.mktemp("car") / "cls.pt", seed=1)


@pytest.fixture(scope="module")
def car_overrides(tiny_vit_checkpoint: Path, classifier_checkpoint: Path) -> dict:
    return {
        "cam_model": {"name": "ovseg-tiny-vit", "pretrained": "", "checkpoint": str(tiny_vit_checkpoint),
                      "precision": "fp32"},
        "classifier_model": {"name": "ovseg-tiny-vit-l4", "pretrained": "", "checkpoint": str(classifier_checkpoint),
                             "precision": "fp32"},
        "classifier_input_size": 56,  # the tiny classifier at a quarter of 224: fast, positions interpolated
    }


@pytest.fixture(scope="module")
def segmenter(car_overrides: dict) -> CarSegmenter:
    seg = build_segmenter("car", "pascal_context", car_overrides)
    seg.set_vocabulary(Vocabulary.from_request(["floor", "chair", "person, people", "wall"]))
    return seg  # type: ignore[return-value]


class BoxStage1:
    """Stage 1 with scripted proposals: one box per query name (raw or origami-templated)."""

    def __init__(self, boxes: dict[str, tuple[int, int, int, int]]) -> None:
        self.boxes = boxes
        self.calls: list[tuple[list[str], list[str], bool]] = []

    def prepare(self, image: np.ndarray) -> tuple[int, int]:
        return image.shape[:2]

    def propose(self, prepared, queries, background, separate=False) -> torch.Tensor:
        self.calls.append((list(queries), list(background), separate))
        out = torch.zeros((len(queries),) + tuple(prepared))
        for i, q in enumerate(queries):
            y0, y1, x0, x1 = self.boxes[q[len(ORIGAMI):-1] if q.startswith(ORIGAMI) else q]
            out[i, y0:y1, x0:x1] = 1.0
        return out


def _scripted(classifier_checkpoint: Path, boxes: dict, **options) -> CarSegmenter:
    config = dataclasses.replace(make_config(CarConfig, {}), **{"classifier_input_size": 56, **options})
    clip = load_clip(ModelSpec("ovseg-tiny-vit-l4", "", str(classifier_checkpoint), "fp32"))
    return CarSegmenter(config, BoxStage1(boxes), PromptClassifier(clip, TextEncoder(clip), config))


# --- through build_segmenter ------------------------------------------------------------------------------
def test_presets_exist() -> None:
    assert {"voc", "coco_object", "pascal_context", "ade", "refcoco", "demo", "realtime"} <= set(list_presets("car"))


@pytest.mark.parametrize("preset", list_presets("car"))
def test_every_preset_segments(preset: str, car_overrides: dict, rgb_image: np.ndarray) -> None:
    seg = build_segmenter("car", preset, car_overrides)
    seg.set_vocabulary(Vocabulary.from_request(["sky", "chair", "person, people"]))
    r = seg.segment(rgb_image)
    assert r.labels.shape == (60, 80) and r.labels.dtype == np.int32
    assert r.confidence.shape == (60, 80) and r.confidence.dtype == np.float32
    assert set(np.unique(r.labels)) <= {UNLABELED, 0, 1, 2}
    assert 0.0 <= float(r.confidence.min()) and float(r.confidence.max()) <= 1.0
    assert {"cam_encode", "cam", "classify", "refine", "paint"} <= set(r.timings)
    for loop in seg.last_loops:
        assert 1 <= len(loop.steps) <= len(loop.steps[0].queries) + 1


def test_query_is_referring_mode_and_leaves_the_vocabulary(segmenter: CarSegmenter, rgb_image: np.ndarray) -> None:
    texts = ["the red part, on the left", "the blue part", "a green square"]
    q = segmenter.query(rgb_image, texts)
    assert q.texts == texts and len(q.masks) == len(q.scores) == 3
    assert all(m.shape == (60, 80) and m.dtype == bool for m in q.masks)
    assert all(0.0 <= s <= 1.0 for s in q.scores) and max(q.scores) > 0  # the loop keeps at least one text
    assert all(not m.any() for m, s in zip(q.masks, q.scores) if s == 0)  # dropped texts get no mask
    assert segmenter.state.vocabulary.names == ["floor", "chair", "person", "wall"]
    merged, score = segmenter.refer(rgb_image, texts[:2])
    assert merged.shape == (60, 80) and merged.dtype == bool and 0.0 <= score <= 1.0


def test_text_is_encoded_once_per_vocabulary(segmenter: CarSegmenter, rgb_image: np.ndarray) -> None:
    cls_stats = segmenter.classifier.text.stats
    cam_stats = segmenter.stage1.text.stats  # type: ignore[attr-defined]
    before = (cls_stats["encoded_prompts"], cam_stats["encoded_prompts"])
    for _ in range(2):
        segmenter.segment(rgb_image)
    assert (cls_stats["encoded_prompts"], cam_stats["encoded_prompts"]) == before
    assert cls_stats["memory_hits"] > 0 and cam_stats["memory_hits"] > 0


def test_mutual_background_pass_and_prompts(segmenter: CarSegmenter, rgb_image: np.ndarray) -> None:
    segmenter.segment(rgb_image)
    assert len(segmenter.last_loops) == 2  # things (chair, person), then stuff (floor, wall)
    assert set(segmenter.last_loops[0].steps[0].queries) == {0, 1}
    prompts = segmenter.describe_prompts(segmenter.state)
    assert prompts[2][:2] == ["person,people", "a clean origami person,people."]
    assert len(prompts[2]) == 16  # raw, then the 15 classifier prompts (the origami one doubles as the CAM text)


def test_shared_model_and_forwards(car_overrides: dict, rgb_image: np.ndarray) -> None:
    same = {**car_overrides, "classifier_model": car_overrides["cam_model"], "classifier_input_size": 64}
    seg = build_segmenter("car", "refcoco", same)
    assert seg.cam_clip is seg.classifier.clip
    seg.backbone_forward(rgb_image)
    seg.classifier_forward(batch=2)
    assert seg.to("cpu") is seg
    q = seg.query(rgb_image, ["a thing"])
    assert q.scores == [1.0]  # one text, one template: the softmax over one query is 1


# --- scripted stage 1 -------------------------------------------------------------------------------------
def test_survivors_equal_a_hand_computation(classifier_checkpoint: Path, rgb_image: np.ndarray) -> None:
    """Step 1's diagonal recomputed one prompted image at a time with open_clip's own encode_image."""
    boxes = {"cat": (0, 30, 0, 40), "dog": (20, 40, 30, 50), "car": (30, 60, 40, 80), "tree": (0, 60, 60, 80)}
    seg = _scripted(classifier_checkpoint, boxes, classifier_skip_last_block=False, confidence_threshold=0.25,
                    visual_prompts=("circle", "blur"), crf=False, classifier_input_size=224)
    names = list(boxes)
    seg.set_vocabulary(Vocabulary.from_request(names, is_thing=[True] * 4))
    seg.segment(rgb_image)
    step1 = seg.last_loops[0].steps[0]

    clip = seg.classifier.clip
    img = torch.from_numpy(rgb_image).permute(2, 0, 1)[None].float()
    mean, std = clip.pixel_stats()
    text = torch.stack([torch.nn.functional.normalize(
        clip.model.encode_text(clip.tokenizer([t.format(n) for t in seg.config.templates])).float(), dim=-1)
        for n in names])  # (Q, T, E)
    expected = []
    for i, n in enumerate(names):
        y0, y1, x0, x1 = boxes[n]
        m = torch.zeros((1, 60, 80), dtype=torch.bool)
        m[0, y0:y1, x0:x1] = True
        x = vp.to_classifier_input(vp.apply_visual_prompts(img, m, ["circle", "blur"]), 224, True,
                                   tuple(255 * v for v in clip.mean))
        f = torch.nn.functional.normalize(clip.model.encode_image((x / 255 - mean) / std).float(), dim=-1)[0]
        per_t = torch.stack([(100.0 * text[:, t] @ f).softmax(0) for t in range(text.shape[1])])
        expected.append(float(per_t.sum(0).softmax(0)[i]))
    assert step1.scores == pytest.approx(expected, abs=1e-5)
    assert step1.survivors == tuple(i for i, s in enumerate(expected) if s > 0.25)


def test_labels_follow_the_masks_without_crf(classifier_checkpoint: Path, rgb_image: np.ndarray) -> None:
    boxes = {"left": (0, 60, 0, 40), "right": (0, 60, 40, 80)}
    seg = _scripted(classifier_checkpoint, boxes, confidence_threshold=0.0, crf=False)
    seg.set_vocabulary(Vocabulary.from_request(list(boxes), is_thing=[True, True]))
    r = seg.segment(rgb_image)
    assert (r.labels[:, :40] == 0).all() and (r.labels[:, 40:] == 1).all()
    assert r.confidence[0, 0] == pytest.approx(seg.last_loops[0].scores[0].item())


def test_stuff_pass_uses_thing_names_as_background(classifier_checkpoint: Path, rgb_image: np.ndarray) -> None:
    boxes = {"helmet": (0, 20, 0, 20), "person": (0, 60, 0, 40), "grass": (40, 60, 0, 80), "sky": (0, 20, 0, 80)}
    seg = _scripted(classifier_checkpoint, boxes, mutual_background=True, crf=False)
    seg.set_vocabulary(Vocabulary.from_request(list(boxes), is_thing=[True, True, False, False]))
    seg.segment(rgb_image)
    calls = seg.stage1.calls  # type: ignore[attr-defined]
    thing_calls = [c for c in calls if set(c[0]) <= {"helmet", "person", ORIGAMI + "helmet.", ORIGAMI + "person."}]
    stuff_calls = [c for c in calls if c not in thing_calls]
    assert thing_calls[0][0] == ["helmet", "person"]  # step 1: raw names
    bg = thing_calls[0][1]
    # the 23 words minus those naming a class ("helmet", "grass", "sky")
    assert len(bg) == 20 and ORIGAMI + "tree." in bg and ORIGAMI + "helmet." not in bg
    assert stuff_calls[0][0] == ["grass", "sky"]
    assert stuff_calls[0][1] == [ORIGAMI + "helmet.", ORIGAMI + "person."]
    assert all(not c[2] for c in calls)  # semantic mode: one joint softmax per step


def test_query_runs_one_cam_per_text(classifier_checkpoint: Path, rgb_image: np.ndarray) -> None:
    boxes = {"the cup": (0, 20, 0, 20), "the table": (20, 60, 0, 80)}
    seg = _scripted(classifier_checkpoint, boxes, confidence_threshold=0.0, crf=False)
    q = seg.query(rgb_image, list(boxes))
    assert all(c[2] for c in seg.stage1.calls)  # type: ignore[attr-defined]
    assert q.masks[0][:20, :20].all() and not q.masks[0][20:].any()
    assert q.masks[1][20:].all()


def test_external_mask_source_snaps_masks(classifier_checkpoint: Path, rgb_image: np.ndarray) -> None:
    boxes = {"box": (10, 30, 10, 40)}
    sam = np.zeros((2, 60, 80), dtype=bool)
    sam[0, 10:31, 10:41] = True  # the object's true extent, one pixel larger
    sam[1, 40:, :] = True  # something else
    seg = _scripted(classifier_checkpoint, boxes, confidence_threshold=0.0, crf=False, matching_threshold=0.7)
    seg.set_vocabulary(Vocabulary.from_request(["box"]))
    assert (seg.segment(rgb_image).labels == 0).sum() == 20 * 30
    seg.mask_source = lambda image: sam
    r = seg.segment(rgb_image)
    assert np.array_equal(r.labels == 0, sam[0]) and "external_masks" in r.timings
    seg.mask_source = lambda image: sam[:, :10]
    with pytest.raises(ValueError, match="mask_source"):
        seg.segment(rgb_image)


def test_nobody_passing_step_1_continues_with_the_best_class(classifier_checkpoint: Path, rgb_image: np.ndarray) -> None:
    """Issue 11: as the authors' loop, an empty first step keeps the best class and runs step 2 on it alone
    (where it scores 1); the old loop stopped there and labelled nothing."""
    boxes = {"red": (0, 30, 0, 40), "blue": (30, 60, 40, 80), "green": (20, 40, 30, 50)}
    seg = _scripted(classifier_checkpoint, boxes, confidence_threshold=0.9, crf=False,
                    templates=["a photo of a {}."], classifier_logit_scale=1.0)  # scores near 1/3 each
    seg.set_vocabulary(Vocabulary.from_request(["red", "blue", "green"]))
    r = seg.segment(rgb_image)
    steps = seg.last_loops[0].steps
    assert max(steps[0].scores) <= 0.9 and len(steps) == 2 and len(steps[1].queries) == 1
    best = steps[1].queries[0]
    assert steps[0].scores[best] == max(steps[0].scores) and steps[1].scores == (1.0,)
    assert (r.labels == best).sum() > 0 and set(np.unique(r.labels)) == {UNLABELED, best}


def test_classifier_negatives_let_a_single_query_fail(classifier_checkpoint: Path, rgb_image: np.ndarray) -> None:
    boxes = {"a unicorn": (0, 30, 0, 40)}
    plain = _scripted(classifier_checkpoint, boxes, confidence_threshold=0.0, crf=False)
    assert plain.query(rgb_image, ["a unicorn"]).scores == [1.0]  # alone in the softmax: always 1
    neg = _scripted(classifier_checkpoint, boxes, confidence_threshold=0.0, crf=False, classifier_negatives=True)
    score = neg.query(rgb_image, ["a unicorn"]).scores[0]
    assert 0.0 < score < 1.0  # now it competes with the 23 background words
    strict = _scripted(classifier_checkpoint, boxes, confidence_threshold=score + 1e-3, crf=False,
                       classifier_negatives=True)
    q = strict.query(rgb_image, ["a unicorn"])
    # the authors' loop never drops the best query: it stays, with its own score below θ
    assert q.scores[0] == pytest.approx(score, abs=1e-6) and q.masks[0].any()
    reject = _scripted(classifier_checkpoint, boxes, confidence_threshold=score + 1e-3, crf=False,
                       classifier_negatives=True, keep_best_when_empty=False)
    q = reject.query(rgb_image, ["a unicorn"])
    assert q.scores == [0.0] and not q.masks[0].any()  # rejected


@pytest.mark.parametrize("bad, fragment", [
    ({"visual_prompts": ["sparkles"]}, "unknown visual prompt"),
    ({"gray_order": "grb"}, "gray_order"),
    ({"templates": ["no slot"]}, "templates"),
    ({"mask_threshold": 1.5}, "mask_threshold"),
    ({"nonsense": 1}, "unknown option"),
])
def test_bad_options_fail_at_build(car_overrides: dict, bad: dict, fragment: str) -> None:
    with pytest.raises((ValueError, TypeError), match=fragment):
        build_segmenter("car", "voc", {**car_overrides, **bad})


def test_refer_char_filter_scores_characters_from_step_2(classifier_checkpoint: Path, rgb_image: np.ndarray) -> None:
    """The authors' _filter_texts without semantic_templates: after step 1, live text q is scored, under each
    step-1 prompt j as a "template", against character q of prompt j; query() never does this."""
    boxes = {"the cup": (0, 20, 0, 20), "the table": (20, 60, 0, 80), "a lamp": (0, 30, 40, 80)}
    texts = list(boxes)
    seg = _scripted(classifier_checkpoint, boxes, confidence_threshold=0.0, crf=False,
                    templates=("a clean origami {}.",), refer_char_filter=True)
    seen: list[torch.Tensor] = []
    original = seg._classify

    def spy(img, props, text, kinds, negatives=None):
        seen.append(text.detach().clone())
        return original(img, props, text, kinds, negatives)

    seg._classify = spy  # type: ignore[method-assign]
    seg.refer(rgb_image, texts)
    prompts = [f"a clean origami {t}." for t in texts]
    steps = seg.last_loops[0].steps
    assert len(seen) == len(steps) >= 2
    bank = seg.classifier.encode_queries(texts)
    assert torch.allclose(seen[0], bank)  # step 1: the texts themselves
    live = list(steps[1].queries)
    expect = torch.stack([seg.classifier.text.encode_group([p[q] for p in prompts]) for q in live]).float()
    assert seen[1].shape == (len(live), len(texts), bank.shape[-1]) and torch.allclose(seen[1], expect)
    # query(): the sensible behaviour, whatever the switch
    seen.clear()
    seg.query(rgb_image, texts)
    live = list(seg.last_loops[0].steps[1].queries) if len(seg.last_loops[0].steps) > 1 else []
    if live:
        assert torch.allclose(seen[1], bank[live])
    with pytest.raises(ValueError, match="exactly one template"):
        _scripted(classifier_checkpoint, boxes, templates=("a {}.", "the {}."), refer_char_filter=True,
                  confidence_threshold=0.0, crf=False).refer(rgb_image, texts)
