"""Issue 11: the pixel and numeric paths the paper presets share with the authors' code.

Each test compares with the library call the authors make (torchvision on a PIL image, OpenCV on uint8),
not with a re-derivation of ours: input resizing of CLIP-ES/CaR, the CAM normalisation epsilon of each
method, CaR's visual prompts and classifier preprocessing, and the image the authors' dense CRF sees.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from ovseg_ros.core import cam as C
from ovseg_ros.core import visual_prompts as vp
from ovseg_ros.core.models import ModelSpec, load_clip
from ovseg_ros.core.segmenter import make_config
from ovseg_ros.core.segmenters.car import CarConfig
from ovseg_ros.core.segmenters.clip_es import ClipEsConfig

tv = pytest.importorskip("torchvision.transforms")


@pytest.fixture(scope="module")
def clip(tiny_vit_checkpoint):
    spec = ModelSpec(name="ovseg-tiny-vit", pretrained="", checkpoint=str(tiny_vit_checkpoint), precision="fp32")
    return load_clip(spec, "cpu")


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus noise: enough structure for bicubic ringing to show."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([128 + 100 * np.sin(xx / 5.0), 128 + 100 * np.cos(yy / 3.0), (xx * 7 + yy * 3) % 256], -1)
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def _authors_transform_resize(image: np.ndarray, h: int, w: int) -> torch.Tensor:
    """The authors' ``_transform_resize(h, w)`` (CLIP-ES and CaR): torchvision on a PIL image."""
    t = tv.Compose([tv.Resize((h, w), interpolation=tv.InterpolationMode.BICUBIC), tv.ToTensor(),
                    tv.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
    return t(Image.fromarray(image))[None]


@pytest.mark.parametrize("shape", [(50, 70), (37, 90), (64, 80), (120, 33)])
def test_paper_resize_equals_the_authors_pil_transform(clip, shape) -> None:
    img = _photo(*shape)
    ours = C.prepare_image(clip, img)  # default: PIL, as the paper presets
    h, w = ours.shape[-2:]
    ref = _authors_transform_resize(img, h, w)
    assert torch.allclose(ours, ref, atol=1e-6), float((ours - ref).abs().max())
    fast = C.prepare_image(clip, img, resize="torch")
    if (h, w) != shape:  # torch bicubic (a = -0.75, floats) is not PIL's (a = -0.5, uint8)
        assert float((fast - ref).abs().max()) > 1e-3


def test_pil_resize_handles_shrinking_like_pil(clip) -> None:
    img = _photo(96, 130, seed=3)
    ours = C.prepare_image(clip, img, short_side=40)
    h, w = ours.shape[-2:]
    assert torch.allclose(ours, _authors_transform_resize(img, h, w), atol=1e-6)


def test_prepare_image_rejects_unknown_resize(clip) -> None:
    with pytest.raises(ValueError, match="resize"):
        C.prepare_image(clip, _photo(20, 20), resize="lanczos")


def test_cam_epsilon_is_per_method() -> None:
    assert make_config(ClipEsConfig, {}).cam_eps == 1e-7
    assert make_config(CarConfig, {}).cam_eps == 1e-15
    tiny = torch.zeros((1, 2, 2))
    tiny[0, 0, 0] = 1e-7  # the raw Grad-CAM maximum of a class of very low probability
    assert float(C.minmax_normalize(tiny, 1e-15).max()) == pytest.approx(1.0, rel=1e-6)
    assert float(C.minmax_normalize(tiny, 1e-7).max()) == pytest.approx(0.5, rel=1e-6)


def test_gradcam_normalises_twice_with_the_method_epsilon(clip, monkeypatch) -> None:
    """The authors' CAM passes through ``scale_cam_image`` twice (per layer, then after aggregation)."""
    x = C.prepare_image(clip, _photo(48, 64))
    g = torch.Generator().manual_seed(5)
    text = torch.nn.functional.normalize(torch.randn(3, 32, generator=g), dim=-1)
    enc = C.ClipCam(clip).encode(x)
    with monkeypatch.context() as mp:
        mp.setattr(C, "minmax_normalize", lambda t, eps=0.0: t)
        raw = C.ClipCam(clip).gradcam(enc, text, None, [0, 1, 2])
    scale = float(raw.max())
    for eps in (1e-7, 1e-15, scale):  # eps = the maximum: one and two passes differ visibly
        got = C.ClipCam(clip, eps=eps).gradcam(enc, text, None, [0, 1, 2])
        expected = C.minmax_normalize(C.minmax_normalize(raw, eps), eps)
        assert torch.allclose(got, expected, atol=1e-6)
    once = C.minmax_normalize(raw, scale)
    assert not torch.allclose(once, C.minmax_normalize(once, scale), atol=1e-3)


def test_authors_crf_image_wraps_like_numpy_cast() -> None:
    img = np.array([[[0, 0, 0], [255, 255, 255], [122, 116, 105]]], dtype=np.uint8)
    got = C.authors_crf_image(img)
    bgr = img[..., ::-1].astype(np.float32) - np.array((104.008, 116.669, 122.675), np.float32)
    expected = (np.trunc(bgr).astype(np.int64) % 256).astype(np.uint8)[..., ::-1]
    assert np.array_equal(got, expected)
    assert got[0, 0].tolist() == [134, 140, 152]  # -122.675 -> -122 -> 134, ...


# --- CaR's prompts as the authors draw them ----------------------------------------------------------------
def _ellipse_mask(h: int, w: int) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    cv2.ellipse(m, (30, 22), (14, 9), 20, 0, 360, 1, -1)
    return m


def test_reference_circle_prompt_is_opencvs_ellipse() -> None:
    img, m = _photo(45, 64), _ellipse_mask(45, 64)
    got = vp.reference_prompt(img, m, ["circle"])
    rows, cols = np.nonzero(m)
    expected = img.copy()
    cy, cx = int(np.mean(rows)), int(np.mean(cols))
    hh, ww = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    cv2.ellipse(expected, (cx, cy), (int(ww) // 2, int(hh) // 2), 0, 0, 360, (255, 0, 0), 1)
    assert np.array_equal(got, expected)
    # the fast torch path draws an analytic outline: nearly, not exactly, the same pixels
    fast = vp.apply_visual_prompts(torch.from_numpy(img).permute(2, 0, 1).float(), torch.from_numpy(m > 0)[None],
                                   ["circle"])[0].permute(1, 2, 0).numpy().astype(np.uint8)
    assert not np.array_equal(fast, expected)


def test_reference_blur_gray_prompt_is_the_authors_composition() -> None:
    img, m = _photo(45, 64, seed=2), _ellipse_mask(45, 64)
    got = vp.reference_prompt(img, m, ["gray", "blur"])
    blurred = cv2.GaussianBlur(img, (15, 15), 0)
    step1 = cv2.add(cv2.bitwise_and(img, img, mask=m), (blurred * (1 - m)[:, :, None]).astype(np.uint8))
    gray = np.repeat(cv2.cvtColor(step1, cv2.COLOR_BGR2GRAY)[:, :, None], 3, axis=2)
    expected = cv2.add(cv2.bitwise_and(step1, step1, mask=m), (gray * (1 - m)[:, :, None]).astype(np.uint8))
    assert np.array_equal(got, expected)



def test_reference_gray_prompt_follows_gray_order() -> None:
    """``gray_order`` means the same on the authors' prompt backend as on ours (it was ignored there)."""
    img, m = _photo(45, 64, seed=3), _ellipse_mask(45, 64)
    out = m[:, :, None] == 0
    for order, code in (("bgr", cv2.COLOR_BGR2GRAY), ("rgb", cv2.COLOR_RGB2GRAY)):
        got = vp.reference_prompt(img, m, ["gray"], gray_order=order)
        gray = np.repeat(cv2.cvtColor(img, code)[:, :, None], 3, axis=2)
        assert np.array_equal(got, np.where(out, gray, img))
    fast = vp.apply_visual_prompts(torch.from_numpy(img).permute(2, 0, 1)[None].float(),
                                   torch.from_numpy(m > 0)[None], ["gray"], gray_order="rgb")
    ref = vp.reference_prompt(img, m, ["gray"], gray_order="rgb")
    assert np.abs(fast[0].permute(1, 2, 0).numpy() - ref).max() <= 1  # OpenCV's fixed-point luma rounds
    with pytest.raises(ValueError, match="gray order"):
        vp.reference_prompt(img, m, ["gray"], gray_order="brg")

@pytest.mark.parametrize("shape", [(45, 64), (80, 50), (224, 224)])
def test_reference_classifier_input_is_clips_stock_preprocess(shape) -> None:
    img = _photo(*shape, seed=4)
    got = vp.reference_classifier_input(img, 56)
    t = tv.Compose([tv.Resize(56, interpolation=tv.InterpolationMode.BICUBIC), tv.CenterCrop(56)])
    assert np.array_equal(got, np.asarray(t(Image.fromarray(img))))


# --- FC-CLIP's "seen" rule ---------------------------------------------------------------------------------
def test_fcclip_authors_seen_rule_is_exact_match_against_their_label_file() -> None:
    from ovseg_ros.core.fcclip import coco_panoptic as cp

    assert len(cp.AUTHORS_COCO_NAMES) == 133
    assert cp.is_seen_authors(["sofa"]) and cp.is_seen_authors(["palm tree"])  # in their couch / tree lines
    assert not cp.is_seen_authors(["Couch"]) and cp.is_seen(["Couch"])  # exact strings vs our normalisation
    assert not cp.is_seen_authors(["pedestrian"]) and cp.is_seen(["pedestrian"])  # our synonym table only
    classes = [["wall"], ["rail"], ["person", "pedestrian"], ["pedestrian"]]
    assert cp.seen_mask_by(classes, "authors") == [True, False, True, False]
    assert cp.seen_mask_by(classes, "synonyms")[3] is True
    with pytest.raises(ValueError, match="seen_rule"):
        cp.seen_mask_by(classes, "fuzzy")


def test_paper_presets_default_to_the_authors_behaviour() -> None:
    from ovseg_ros.core.segmenter import load_preset

    for name in ("voc", "coco_object", "pascal_context", "ade", "refcoco", "demo"):
        p = load_preset("car", name)
        assert p["prompt_backend"] == "authors" and p["reuse_whole_stack"] and p["cam_clip_box_edges"], name
        assert p["gray_order"] == "bgr" and p["keep_full_image"] is False and p["crf_image"] == "authors"
    for name in ("voc", "coco"):
        p = load_preset("clip_es", name)
        assert p["clip_box_edges"] and p["crf_image"] == "authors" and p["resize"] == "pil"
    for name in ("ade20k", "cityscapes", "coco_panoptic"):
        p = load_preset("fcclip", name)
        assert p["seen_rule"] == "authors" and p["thing_from"] == "vocabulary"


def test_fcclip_pil_resize_is_detectron2s() -> None:
    from ovseg_ros.core.fcclip.preprocess import prepare_image

    img = _photo(45, 70, seed=6)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    x, (h, w) = prepare_image(img, torch.device("cpu"), mean, std, 64, 128, 32, resize="pil")
    ref = np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR)).astype(np.float32)
    ref = (ref / 255.0 - 0.5) / 0.25
    assert np.allclose(x[0, :, :h, :w].permute(1, 2, 0).numpy(), ref, atol=1e-5)
    fast, _ = prepare_image(img, torch.device("cpu"), mean, std, 64, 128, 32)
    assert not torch.equal(fast, x)


def test_itaclip_cv2_resize_is_mmsegs(tiny_model_overrides) -> None:
    from ovseg_ros.core.segmenter import build_segmenter

    seg = build_segmenter("itaclip", "voc21", {**tiny_model_overrides, "short_side": 50})
    assert seg.config.resize == "cv2"  # the dataset presets resize as the authors
    img = _photo(45, 71, seed=7)
    s = min(2048 / 71, 50 / 45)  # mmcv rescale_size with scale (2048, 50)
    h, w = int(45 * s + 0.5), int(71 * s + 0.5)
    assert seg.processing_size(45, 71) == (h, w)
    ref = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255.0
    mean, std = seg.clip.pixel_stats()
    expected = (torch.from_numpy(ref).permute(2, 0, 1)[None] - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    assert torch.allclose(seg._prepare(img), expected, atol=1e-5)
