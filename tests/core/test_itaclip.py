"""ITACLIP mathematics: attention, augmentations, flips, windows, post-processing, presets and data files.

The segmenter-level tests (tiny random model, build_segmenter end to end) are in test_itaclip_segmenter.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ovseg_ros.core import clip_vit
from ovseg_ros.core.geometry import resize, sliding_windows
from ovseg_ros.core.postprocess import close_labels
from ovseg_ros.core.segmenter import list_presets, load_preset, make_config
from ovseg_ros.core.segmenters.itaclip import (
    ITACLIPConfig,
    area_suppression,
    close_labels_torch,
    combine_augmented,
    default_intermediate_layers,
    fused_attention_values,
    gaussian_blur,
    gaussian_kernel1d,
    grayscale,
    load_aux_file,
    load_dataset_vocabulary,
    self_self_attention,
)

# --- the authors' configuration table (docs/methods/itaclip.md; configs/cfg_*.py at 521a33c) ---------
#          short  stride  tau   beta   aux           alpha  prob  area  pamr  dataset       bg words  queries
PAPER = {
    "voc21":       (336, 28, 60, 0.05, "definition", 0.70, 0.1, 0.1, 10, "voc20",       44, 80),
    "context60":   (336, 28, 55, 0.15, "definition", 0.75, 0.1, 0.0, 10, "context59",   1,  75),
    "coco_object": (336, 28, 50, 0.10, "synonym",    0.75, 0.1, 0.0, 10, "coco_object", 26, 119),
    "coco_stuff":  (448, 28, 40, 0.20, "definition", 0.75, 0.0, 0.0, 10, "coco_stuff",  0,  183),
    "cityscapes":  (560, 28, 40, 0.05, "synonym",    0.70, 0.0, 0.0, 10, "cityscapes",  0,  26),
}


@pytest.mark.parametrize("preset", sorted(PAPER))
def test_paper_presets_equal_the_authors_table(preset: str) -> None:
    short, stride, tau, beta, aux, alpha, prob, area, steps, dataset, n_bg, n_queries = PAPER[preset]
    cfg: ITACLIPConfig = make_config(ITACLIPConfig, load_preset("itaclip", preset))
    assert (cfg.model.name, cfg.model.pretrained) == ("ViT-B-16-quickgelu", "openai")
    assert (cfg.short_side, cfg.max_long_side, cfg.slide_crop, cfg.slide_stride) == (short, 2048, 224, stride)
    assert (cfg.logit_scale, cfg.def_coefficient, cfg.aux_kind, cfg.img_eng_coefficient) == (tau, beta, aux, alpha)
    assert (cfg.prob_thd, cfg.area_thd, cfg.pamr_steps, cfg.pamr_dilations) == (prob, area, steps, (8, 16))
    assert cfg.img_engineering and cfg.attn_self and cfg.attn_fusion == 0.5 and cfg.intermediate_layers == ()
    assert cfg.augmentations == ("original", "grayscale", "blur", "vertical", "horizontal")
    assert (cfg.blur_kernel, cfg.blur_sigma, cfg.templates, cfg.close_kernel) == (11, 5.0, "imagenet80", 3)
    assert cfg.refine_at == "input" and not cfg.drop_background_in_vocabulary
    assert cfg.aux_file == ("definitions.yaml" if aux == "definition" else "synonyms.yaml")
    assert cfg.dataset == dataset and len(cfg.background_words) == n_bg
    vocab = load_dataset_vocabulary(dataset)
    assert len(vocab.query_names()[0]) + n_bg == n_queries  # the authors' query counts
    table = load_aux_file(cfg.aux_file)
    assert all(any(k in table for k in (_key(n) for n in c.names)) for c in vocab.classes), "aux text missing"


def _key(name: str) -> str:
    import re

    return re.sub(r"[^a-z0-9]", "", name.lower())


def test_dataset_class_counts() -> None:
    counts = {"voc20": 20, "context59": 59, "coco_object": 80, "coco_stuff": 171, "cityscapes": 19}
    for name, n in counts.items():
        assert len(load_dataset_vocabulary(name)) == n
    assert sum(not c.is_thing for c in load_dataset_vocabulary("coco_stuff").classes) == 91


def test_every_preset_is_valid_and_realtime_is_one_pass() -> None:
    assert set(list_presets("itaclip")) == set(PAPER) | {"realtime"}
    rt: ITACLIPConfig = make_config(ITACLIPConfig, load_preset("itaclip", "realtime"))
    assert rt.slide_crop == 0 and rt.augmentations == ("original",) and rt.refine_at == "processing"
    assert rt.drop_background_in_vocabulary and rt.pamr_steps < 10


def test_config_rejects_bad_values() -> None:
    with pytest.raises(TypeError):
        make_config(ITACLIPConfig, {"slide_strid": 28})
    for bad in ({"aux_kind": "poem"}, {"feature_augs": ("sepia",)}, {"img_eng_coefficient": 1.5},
                {"blur_kernel": 10}, {"refine_at": "somewhere"}, {"aux_file": "missing.yaml"}, {"close_kernel": 2}):
        with pytest.raises(ValueError):
            ITACLIPConfig(**bad)


# --- architecture -----------------------------------------------------------------------------------
def test_intermediate_layers_by_relative_depth() -> None:
    assert default_intermediate_layers(12) == (7, 8, 10)
    assert default_intermediate_layers(24) == (14, 16, 20)
    assert default_intermediate_layers(4) == (2, 3)
    assert all(1 <= b < d for d in range(2, 40) for b in default_intermediate_layers(d))


def test_self_self_attention_rows_sum_to_two() -> None:
    q, k = torch.randn(2, 3, 17, 8), torch.randn(2, 3, 17, 8)
    attn = self_self_attention(q, k)
    assert attn.shape == (2, 3, 17, 17)
    torch.testing.assert_close(attn.sum(-1), torch.full((2, 3, 17), 2.0))
    torch.testing.assert_close(attn, torch.softmax(q @ q.transpose(-1, -2) / 8**0.5, -1)
                               + torch.softmax(k @ k.transpose(-1, -2) / 8**0.5, -1))


@pytest.mark.parametrize("attn_self", [True, False])
def test_fused_values_equal_explicit_fused_map(attn_self: bool) -> None:
    torch.manual_seed(0)
    pairs = [(torch.randn(2, 4, 30, 8), torch.randn(2, 4, 30, 8)) for _ in range(4)]
    v = torch.randn(2, 4, 30, 8)

    def amap(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return self_self_attention(q, k) if attn_self else clip_vit.attention_probs(q, k)

    fused = 0.5 * amap(*pairs[0]) + 0.5 * torch.stack([amap(*p) for p in pairs[1:]]).mean(0)
    if attn_self:
        torch.testing.assert_close(fused.sum(-1), torch.full((2, 4, 30), 2.0))  # never renormalised
    torch.testing.assert_close(fused_attention_values(pairs, v, attn_self, 0.5), fused @ v, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused_attention_values(pairs[:1], v, attn_self), amap(*pairs[0]) @ v,
                               rtol=1e-4, atol=1e-5)


# --- image engineering ------------------------------------------------------------------------------
def test_grayscale_and_blur_match_torchvision() -> None:
    tvf = pytest.importorskip("torchvision.transforms.functional")
    x = torch.randn(2, 3, 40, 33)  # normalised values, as the authors apply them
    torch.testing.assert_close(grayscale(x), tvf.rgb_to_grayscale(x, 1).expand(-1, 3, -1, -1))
    ref = tvf.gaussian_blur(x, kernel_size=[11, 11], sigma=[5.0, 5.0])
    torch.testing.assert_close(gaussian_blur(x, gaussian_kernel1d(11, 5.0)), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("crop", [(224, 224), (70, 90)])
def test_token_level_flip_back_equals_authors_order(crop: tuple[int, int]) -> None:
    """Authors: per pass, logits -> upsample to the crop -> flip back -> average -> mix with α.
    Ours: mix on the token grid, one product with the text, one upsampling. Must agree."""
    torch.manual_seed(0)
    augs = ("original", "grayscale", "blur", "vertical", "horizontal")
    b, gh, gw, e, nq, alpha = 2, 5, 7, 16, 6, 0.7
    feats = torch.randn(len(augs) * b, gh, gw, e)
    text = torch.randn(nq, e)
    ours = resize(torch.einsum("bhwe,qe->bqhw", combine_augmented(feats, augs, alpha), text), crop)

    per = feats.reshape(len(augs), b, gh, gw, e)
    up = [resize(torch.einsum("bhwe,qe->bqhw", per[i], text), crop) for i in range(len(augs))]
    feature_logits = resize(torch.einsum("bhwe,qe->bqhw", per[:3].mean(0), text), crop)
    flips = (up[3].flip(-2) + up[4].flip(-1)) / 2
    torch.testing.assert_close(ours, alpha * feature_logits + (1 - alpha) * flips, rtol=1e-4, atol=1e-5)
    # without image engineering only the original pass exists
    torch.testing.assert_close(combine_augmented(per[0], ("original",), alpha), per[0])


# --- windows ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("h, w, expected", [(336, 448, 45), (448, 597, 135), (560, 1120, 429), (200, 150, 1)])
def test_window_counts_and_coverage(h: int, w: int, expected: int) -> None:
    wins = sliding_windows(h, w, 224, 28)
    assert len(wins) == expected
    cover = np.zeros((h, w), dtype=int)
    for y0, y1, x0, x1 in wins:
        assert y1 - y0 == min(224, h) and x1 - x0 == min(224, w)
        cover[y0:y1, x0:x1] += 1
    assert cover.min() >= 1


# --- post-processing --------------------------------------------------------------------------------
def test_device_closing_equals_cv2_closing() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        labels = rng.integers(-1, 6, size=(31, 47)).astype(np.int32)
        ours = close_labels_torch(torch.from_numpy(labels), 3).numpy()
        np.testing.assert_array_equal(ours, close_labels(labels, 3))
    assert close_labels_torch(torch.from_numpy(labels), 1) is not None


def test_max_over_names_with_uneven_name_counts() -> None:
    # classes 0, 1, 2 own 1, 3, 2 rows; background (index 3) owns 2 rows
    owner = torch.tensor([1, 0, 2, 1, 3, 1, 2, 3])
    scores = torch.randn(1, 8, 4, 5)
    out = clip_vit.max_over_names(scores, owner, 4)
    for c in range(4):
        torch.testing.assert_close(out[0, c], scores[0, owner == c].max(dim=0).values)


def test_area_suppression_zeroes_small_classes_only() -> None:
    probs = torch.zeros(4, 10, 10)  # classes 0..2, background row 3
    probs[0, :, :8] = 0.9  # 80 px
    probs[1, :, 8:] = 0.8  # 19 px
    probs[2, 0, 9] = 0.95  # 1 px
    probs[3] = 0.5
    out = area_suppression(probs, 3, 0.1)
    assert out[2].abs().sum() == 0 and torch.equal(out[:2], probs[:2]) and torch.equal(out[3], probs[3])
    assert area_suppression(probs, 3, 0.0) is probs


def test_data_files_are_ours_and_short() -> None:
    for file in ("definitions.yaml", "synonyms.yaml"):
        table = load_aux_file(file)
        assert len(table) > 100
        assert max(len(t.split()) for t in table.values()) <= 20
    assert len(load_aux_file("synonyms.yaml")["car"].split()) == 1
