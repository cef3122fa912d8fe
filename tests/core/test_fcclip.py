"""FC-CLIP building blocks: checkpoint layout, deformable attention, ensemble and post-processing rules.

Everything here is checked against direct re-computations on small tensors (explicit bilinear loops, the
authors' formulas written out, the authors' per-query panoptic loop on full-resolution masks).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovseg_ros.core.fcclip import coco_panoptic, convert
from ovseg_ros.core.fcclip.config import FCCLIPArch
from ovseg_ros.core.fcclip.decoder import mask_pool, max_over_names
from ovseg_ros.core.fcclip.ensemble import geometric_ensemble
from ovseg_ros.core.fcclip.layers import sine_position_embedding
from ovseg_ros.core.fcclip.msdeform_attn import MSDeformAttn, ms_deform_attn_gather, ms_deform_attn_sample
from ovseg_ros.core.fcclip.pixel_decoder import encoder_reference_points
from ovseg_ros.core.fcclip.postprocess import PostprocessOptions, SeparableResize, postprocess
from ovseg_ros.core.fcclip.preprocess import shortest_edge_size

# The authors' state_dict (846 keys, shapes, dtypes), shipped beside convert.py; the source tree as fallback.
TABLE = next(p for p in (Path(convert.__file__).with_name("authors_state_dict.tsv"),
                         Path(__file__).resolve().parents[2] / "ovseg_ros/core/fcclip/authors_state_dict.tsv")
             if p.is_file())


# --- checkpoint layout ------------------------------------------------------------------------------------
def _table() -> dict[str, tuple[int, ...]]:
    rows = TABLE.read_text().splitlines()[1:]
    out = {}
    for row in rows:
        key, shape, _ = row.split("\t")
        out[key] = () if shape == "scalar" else tuple(int(s) for s in shape.split("x"))
    return out


def test_default_model_state_dict_equals_the_authors_table() -> None:
    """All 846 keys and shapes of the released model, built on the meta device (no memory, no weights)."""
    import open_clip

    from ovseg_ros.core.fcclip.model import FCCLIPModel

    with torch.device("meta"):
        clip = open_clip.create_model("convnext_large_d_320", pretrained=None, device="meta")
        model = FCCLIPModel(clip, FCCLIPArch())
    ours = {k: tuple(v.shape) for k, v in convert.to_authors_state_dict(model).items()}
    table = _table()
    assert len(table) == 846
    assert sorted(set(table) - set(ours)) == [] and sorted(set(ours) - set(table)) == []
    assert [k for k in table if table[k] != ours[k]] == []


def test_key_mapping_is_a_bijection_on_the_table() -> None:
    for key in _table():
        if key.startswith(convert.TRAINING_ONLY_PREFIXES):
            assert convert.authors_to_ours(key) is None
            continue
        ours = convert.authors_to_ours(key)
        assert ours is not None, key
        assert convert.ours_to_authors(ours) == key
    assert convert.authors_to_ours("sem_seg_head.pixel_decoder.adapter_1.weight") == "pixel_decoder.lateral.0.conv.weight"
    assert convert.is_text_tower_key("backbone.clip.token_embedding.weight")
    assert not convert.is_text_tower_key("backbone.clip.visual.head.mlp.fc1.weight")


# --- multi-scale deformable attention ---------------------------------------------------------------------
def _bilinear(img: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """Sample (D, H, W) at normalised (x, y): pixel centres at (i + 0.5) / size, zeros outside."""
    _, h, w = img.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(img.shape[0], dtype=torch.float64)
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                out += wy * wx * img[:, yy, xx].double()
    return out


def _reference_sample(value, shapes, locations, weights) -> torch.Tensor:
    n, _, m, d = value.shape
    _, lq, _, levels, points, _ = locations.shape
    out = torch.zeros(n, lq, m * d, dtype=torch.float64)
    starts = np.cumsum([0] + [h * w for h, w in shapes])
    for b in range(n):
        for q in range(lq):
            for head in range(m):
                acc = torch.zeros(d, dtype=torch.float64)
                for lvl, (h, w) in enumerate(shapes):
                    img = value[b, starts[lvl]:starts[lvl + 1], head].T.reshape(d, h, w)
                    for p in range(points):
                        x, y = locations[b, q, head, lvl, p].tolist()
                        acc += weights[b, q, head, lvl, p].item() * _bilinear(img, x, y)
                out[b, q, head * d:(head + 1) * d] = acc
    return out


@pytest.mark.parametrize("sample", [ms_deform_attn_sample, ms_deform_attn_gather])
def test_deformable_sampling_equals_explicit_bilinear_loops(sample) -> None:
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (2, 3), (1, 2)]
    n, m, d, lq, p = 2, 2, 3, 5, 3
    s = sum(h * w for h, w in shapes)
    value = torch.randn(n, s, m, d, generator=g)
    # Include points outside [0, 1] to exercise the zero padding.
    locations = torch.rand(n, lq, m, len(shapes), p, 2, generator=g) * 1.4 - 0.2
    weights = torch.rand(n, lq, m, len(shapes), p, generator=g)
    got = sample(value, shapes, locations, weights)
    ref = _reference_sample(value, shapes, locations, weights)
    assert got.shape == (n, lq, m * d)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", ["grid_sample", "gather", "auto"])
def test_msdeform_attn_module_places_points_in_pixels_of_each_level(kernel: str) -> None:
    torch.manual_seed(0)
    shapes = [(4, 6), (2, 3)]
    attn = MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=2, kernel=kernel)
    for lin in (attn.sampling_offsets, attn.attention_weights):
        torch.nn.init.normal_(lin.weight, std=0.5)
    s = sum(h * w for h, w in shapes)
    x = torch.randn(1, s, 8)
    ref_pts = encoder_reference_points(shapes, 2, torch.device("cpu"))
    got = attn(x, ref_pts, x, shapes)
    # Recompute by hand: offsets / (w, h) added to the reference points, softmax over levels x points.
    value = attn.value_proj(x).view(1, s, 2, 4)
    off = attn.sampling_offsets(x).view(1, s, 2, 2, 2, 2)
    norm = torch.tensor([[6.0, 4.0], [3.0, 2.0]])
    loc = ref_pts[:, :, None, :, None, :] + off / norm[None, None, None, :, None, :]
    w = attn.attention_weights(x).view(1, s, 2, 4).softmax(-1).view(1, s, 2, 2, 2)
    expected = attn.output_proj(_reference_sample(value, shapes, loc, w).float())
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_reference_points_are_pixel_centres() -> None:
    ref = encoder_reference_points([(2, 4)], 3, torch.device("cpu"))
    assert ref.shape == (1, 8, 3, 2)
    assert torch.allclose(ref[0, :4, 0, 0], torch.tensor([0.125, 0.375, 0.625, 0.875]))
    assert torch.allclose(ref[0, ::4, 2, 1], torch.tensor([0.25, 0.75]))


def test_sine_position_embedding_matches_the_detr_formula() -> None:
    pe = sine_position_embedding(3, 5, 4, torch.device("cpu"))
    assert pe.shape == (1, 8, 3, 5)
    y, x = 2, 4  # last row/column: normalised position ~ 2*pi
    yv, xv = 3 / (3 + 1e-6) * 2 * math.pi, 5 / (5 + 1e-6) * 2 * math.pi
    freq = [10000 ** (2 * (k // 2) / 4) for k in range(4)]
    expect_y = [math.sin(yv / freq[0]), math.cos(yv / freq[1]), math.sin(yv / freq[2]), math.cos(yv / freq[3])]
    expect_x = [math.sin(xv / freq[0]), math.cos(xv / freq[1]), math.sin(xv / freq[2]), math.cos(xv / freq[3])]
    assert torch.allclose(pe[0, :, y, x], torch.tensor(expect_y + expect_x), atol=1e-5)


# --- heads and ensemble -----------------------------------------------------------------------------------
def test_max_over_names_and_mask_pool() -> None:
    logits = torch.tensor([[[1.0, 5.0, 2.0, -1.0]]])
    assert max_over_names(logits, torch.tensor([0, 0, 1, 2]), 3).tolist() == [[[5.0, 2.0, -1.0]]]
    feats = torch.arange(8.0).view(1, 2, 2, 2)
    masks = torch.tensor([[[[1.0, -1.0], [1.0, -1.0]], [[-1.0, -1.0], [-1.0, -1.0]]]])
    pooled = mask_pool(feats, masks)
    assert torch.allclose(pooled[0, 0], torch.tensor([1.0, 5.0])) and torch.all(pooled[0, 1] == 0)


def test_geometric_ensemble_follows_the_formula() -> None:
    in_logits = torch.tensor([[2.0, 0.5, -1.0, 0.3]])  # 3 classes + void
    out_logits = torch.tensor([[-1.0, 3.0, 0.0]])
    seen = torch.tensor([True, False, True])
    got = geometric_ensemble(in_logits, out_logits, seen, alpha=0.4, beta=0.8)[0].double()
    p_in = torch.softmax(in_logits[0, :3].double(), 0)
    p_out = torch.softmax(out_logits[0].double(), 0)
    a = torch.tensor([0.4, 0.8, 0.4], dtype=torch.float64)
    logit = torch.log(p_in ** (1 - a) * p_out ** a)
    p_void = torch.softmax(in_logits[0].double(), 0)[3]
    expected = torch.cat([torch.softmax(logit, 0) * (1 - p_void), p_void[None]])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert abs(got.sum().item() - 1) < 1e-6


def test_seen_classes_trust_the_trained_head_unseen_ones_clip() -> None:
    # The trained head says class 0, frozen CLIP says class 1, equally sure.
    in_logits = torch.tensor([[4.0, 0.0, -20.0]])
    out_logits = torch.tensor([[0.0, 4.0]])
    both_seen = geometric_ensemble(in_logits, out_logits, torch.tensor([True, True]))
    both_unseen = geometric_ensemble(in_logits, out_logits, torch.tensor([False, False]))
    assert both_seen[0, 0] > both_seen[0, 1]  # alpha = 0.4: the trained head dominates
    assert both_unseen[0, 1] > both_unseen[0, 0]  # beta = 0.8: frozen CLIP dominates


def test_void_probability_comes_from_the_trained_head_and_extremes_stay_finite() -> None:
    in_logits = torch.tensor([[0.0, 0.0, 9.0], [1000.0, -1000.0, -1000.0]])
    out_logits = torch.tensor([[5.0, -5.0], [-1000.0, 1000.0]])
    probs = geometric_ensemble(in_logits, out_logits, torch.tensor([True, False]))
    assert probs[0, -1] == pytest.approx(torch.softmax(in_logits[0], 0)[-1].item(), rel=1e-6)
    assert torch.isfinite(probs).all() and torch.allclose(probs.sum(-1), torch.ones(2))


def test_ensemble_on_valid_mask_ignores_clip_for_empty_masks() -> None:
    in_logits = torch.tensor([[2.0, 0.0, -5.0], [2.0, 0.0, -5.0]])
    out_logits = torch.tensor([[0.0, 6.0], [0.0, 6.0]])
    probs = geometric_ensemble(in_logits, out_logits, torch.tensor([False, False]), valid=torch.tensor([True, False]))
    p_void = torch.softmax(in_logits[1], 0)[-1]
    torch.testing.assert_close(probs[1, :2], torch.softmax(in_logits[1, :2], 0) * (1 - p_void))
    assert probs[0, 1] > probs[0, 0]


# --- COCO vocabulary --------------------------------------------------------------------------------------
def test_coco_panoptic_table_and_membership() -> None:
    assert len(coco_panoptic.COCO_PANOPTIC) == 133
    assert sum(t for _, t, _ in coco_panoptic.COCO_PANOPTIC) == 80
    assert coco_panoptic.coco_membership(["Person"]) is True
    assert coco_panoptic.coco_membership(["wall"]) is False
    assert coco_panoptic.coco_membership(["door_stuff"]) is False  # hyphens/underscores normalised
    assert coco_panoptic.coco_membership(["table"]) is True  # dining table (thing) wins over table-merged
    assert coco_panoptic.coco_membership(["forklift", "pallet jack"]) is None
    assert coco_panoptic.seen_mask([("forklift",), ("sofa", "settee")]) == [False, True]


# --- geometry and post-processing -------------------------------------------------------------------------
def test_shortest_edge_size_follows_detectron2() -> None:
    assert shortest_edge_size(480, 640, 800, 1333) == (800, 1067)
    assert shortest_edge_size(720, 1280, 800, 1333) == (750, 1333)
    assert shortest_edge_size(1024, 2048, 1024, 2560) == (1024, 2048)
    assert shortest_edge_size(480, 640, 0, 1333) == (480, 640)


def _authors_upsample(masks: torch.Tensor, padded, crop, out) -> torch.Tensor:
    up = F.interpolate(masks[None], size=padded, mode="bilinear", align_corners=False)
    up = up[:, :, : crop[0], : crop[1]]
    return F.interpolate(up, size=out, mode="bilinear", align_corners=False)[0]


def test_separable_resize_equals_interpolate_crop_interpolate() -> None:
    torch.manual_seed(0)
    masks = torch.randn(5, 8, 12)
    rs = SeparableResize((8, 12), (32, 48), (29, 45), (40, 61), torch.device("cpu"))
    torch.testing.assert_close(rs.full(masks), _authors_upsample(masks, (32, 48), (29, 45), (40, 61)),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rs.rows(masks, 7, 19), rs.full(masks)[:, 7:19])
    down = SeparableResize((8, 12), (32, 48), (32, 48), (20, 30), torch.device("cpu"))
    torch.testing.assert_close(down.full(masks), _authors_upsample(masks, (32, 48), (32, 48), (20, 30)),
                               atol=1e-5, rtol=1e-5)


def _identity(h: int, w: int) -> SeparableResize:
    return SeparableResize((h, w), (h, w), (h, w), (h, w), torch.device("cpu"))


def _probs(rows: list[list[float]]) -> torch.Tensor:
    p = torch.tensor(rows)
    return p / p.sum(-1, keepdim=True)


def test_panoptic_merges_stuff_per_class_and_splits_things() -> None:
    h, w = 6, 8
    big = 8.0
    masks = torch.full((5, h, w), -big)
    masks[0, :, :2] = big  # stuff class 0 ("wall"), left
    masks[1, :, 6:] = big  # stuff class 0 again, right: merged with query 0
    masks[2, 1:3, 3:5] = big  # thing class 1
    masks[3, 4:6, 3:5] = big  # thing class 1 again: its own id
    masks[4, :, :] = -big  # void query, never a segment
    probs = _probs([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.05, 0.9, 0.05], [0.1, 0.7, 0.2], [0.1, 0.1, 0.8]])
    out = postprocess(masks, probs, torch.tensor([False, True]), _identity(h, w))
    pan = out.panoptic
    segs = {s.id: s for s in pan.segments}
    assert sorted(segs) == [1, 2, 3] and sorted(np.unique(pan.segment_ids).tolist()) == [0, 1, 2, 3]
    stuff = [s for s in pan.segments if not s.is_thing]
    assert len(stuff) == 1 and stuff[0].class_id == 0 and stuff[0].area == 2 * h * 2
    assert stuff[0].bbox == (0, 0, 8, 6)
    assert stuff[0].score == pytest.approx((0.9 + 0.8) / 2)  # area-weighted over the merged queries
    things = sorted((s for s in pan.segments if s.is_thing), key=lambda s: s.bbox[1])
    assert [t.class_id for t in things] == [1, 1] and [t.area for t in things] == [4, 4]
    assert things[0].bbox == (3, 1, 2, 2) and things[1].bbox == (3, 4, 2, 2)
    for s in pan.segments:
        assert (pan.segment_ids == s.id).sum() == s.area


def test_panoptic_overlap_threshold_and_object_mask_threshold() -> None:
    h, w = 4, 10
    masks = torch.full((3, h, w), -6.0)
    masks[0, :, :6] = 6.0  # strong query over columns 0..5
    masks[1, :, 4:8] = 6.0  # weaker query: wins only columns 6..7 of its 4 -> 50% < 0.8, dropped
    masks[2, :, 8:] = 6.0  # low-score query
    probs = _probs([[0.1, 0.85, 0.05], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4]])
    probs[2] = torch.tensor([0.35, 0.33, 0.32])  # best class 0 with 0.35
    out = postprocess(masks, probs, torch.tensor([True, True]), _identity(h, w),
                      PostprocessOptions(object_mask_threshold=0.4))
    ids = out.panoptic.segment_ids
    assert len(out.panoptic.segments) == 1
    assert (ids[:, :6] == 1).all() and (ids[:, 6:] == 0).all()
    out = postprocess(masks, probs, torch.tensor([True, True]), _identity(h, w),
                      PostprocessOptions(object_mask_threshold=0.0, overlap_threshold=0.4))
    assert len(out.panoptic.segments) == 3


def _authors_panoptic(masks: torch.Tensor, probs: torch.Tensor, is_thing: list[bool], thr: float, overlap: float):
    """The authors' loop, written out on full-resolution masks."""
    k = probs.shape[1] - 1
    scores, labels = probs.max(-1)
    sig = masks.sigmoid()
    keep = (labels != k) & (scores > thr)
    cur_scores, cur_classes, cur_masks = scores[keep], labels[keep], sig[keep]
    seg = torch.zeros(masks.shape[-2:], dtype=torch.int32)
    infos, stuff, cur = [], {}, 0
    if cur_masks.shape[0] == 0:
        return seg, infos
    ids = (cur_scores.view(-1, 1, 1) * cur_masks).argmax(0)
    for i in range(cur_classes.shape[0]):
        c = int(cur_classes[i])
        thing = is_thing[c]
        area = int((ids == i).sum())
        orig = int((cur_masks[i] >= 0.5).sum())
        m = (ids == i) & (cur_masks[i] >= 0.5)
        if area > 0 and orig > 0 and int(m.sum()) > 0:
            if area / orig < overlap:
                continue
            if not thing:
                if c in stuff:
                    seg[m] = stuff[c]
                    continue
                stuff[c] = cur + 1
            cur += 1
            seg[m] = cur
            infos.append((cur, c, thing))
    return seg, infos


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_panoptic_and_semantic_equal_the_authors_rules_on_random_predictions(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    q, k = 12, 4
    masks = torch.randn(q, 6, 9, generator=g) * 4
    probs = torch.softmax(torch.randn(q, k + 1, generator=g) * 2, -1)
    is_thing = [True, False, True, False]
    padded, crop, out_hw = (24, 36), (22, 33), (31, 45)
    rs = SeparableResize((6, 9), padded, crop, out_hw, torch.device("cpu"))
    opts = PostprocessOptions(overlap_threshold=0.6, instance_topk=10, band_elements=q * 45 * 5)
    got = postprocess(masks, probs, torch.tensor(is_thing), rs, opts)
    full = _authors_upsample(masks, padded, crop, out_hw)
    seg, infos = _authors_panoptic(full, probs, is_thing, 0.0, 0.6)
    assert (got.panoptic.segment_ids == seg.numpy()).mean() > 0.999
    assert [(s.id, s.class_id, s.is_thing) for s in got.panoptic.segments] == infos
    sem = torch.einsum("qc,qhw->chw", probs[:, :k], full.sigmoid())
    assert (got.labels == sem.argmax(0).numpy()).mean() > 0.999
    assert got.confidence.min() >= 0 and got.confidence.max() <= 1
    # Instances: top-10 (query, class) pairs, things only, score = prob x mean sigmoid inside the mask.
    flat = probs[:, :k].reshape(-1)
    top_s, top_i = flat.topk(10)
    thing_pairs = [(s.item(), i.item() // k, i.item() % k) for s, i in zip(top_s, top_i) if is_thing[i.item() % k]]
    expected = []
    for s, qi, c in thing_pairs:
        pos = (full[qi] > 0).float()
        expected.append(s * float((full[qi].sigmoid() * pos).sum() / (pos.sum() + 1e-6)))
    inst = got.instances
    assert sorted(inst.scores.tolist(), reverse=True) == pytest.approx(sorted(expected, reverse=True), rel=1e-4)
    assert inst.masks.shape == (len(expected), *out_hw) and inst.masks.dtype == bool
    assert all(is_thing[c] for c in inst.class_ids)


def test_semantic_threshold_and_all_void() -> None:
    masks = torch.randn(3, 4, 5)
    probs = torch.tensor([[0.0, 0.0, 1.0]] * 3)  # every query is void
    out = postprocess(masks, probs, torch.tensor([True, False]), _identity(4, 5),
                      PostprocessOptions(semantic_threshold=0.5))
    assert out.panoptic.segments == [] and (out.panoptic.segment_ids == 0).all()
    assert (out.labels == -1).all() and (out.confidence == 0).all()


def test_gather_and_grid_sample_agree_at_a_realistic_shape() -> None:
    g = torch.Generator().manual_seed(3)
    shapes = [(6, 8), (12, 16), (24, 32)]
    s = sum(h * w for h, w in shapes)
    value = torch.randn(2, s, 4, 8, generator=g)
    locations = torch.rand(2, s, 4, 3, 4, 2, generator=g) * 1.2 - 0.1
    weights = torch.rand(2, s, 4, 3, 4, generator=g).softmax(-1)
    torch.testing.assert_close(ms_deform_attn_gather(value, shapes, locations, weights),
                               ms_deform_attn_sample(value, shapes, locations, weights), atol=1e-5, rtol=1e-5)
