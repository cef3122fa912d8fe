"""No host synchronisation per frame in the realtime paths, apart from one copy of the planes, checked on the
CPU with :mod:`host_sync`.

``models.SYNC_FREE_DEVICE_TYPES`` gets ``cpu`` so the CPU runs the formulation a GPU runs; each test also checks
that it gives the CPU path's labels (>= 99.9 %) and confidences (1e-5). What is allowed, per frame:

* dense_clip, ITACLIP, CLIP-ES: the label and confidence planes (``to_host``: two ``numpy`` views, one wait);
* FC-CLIP: ONE packed copy of the panoptic ids, the segment table and the semantic planes (``to_host_packed``);
* CaR: the planes, plus one ``tolist`` per step of its loop (the survivors decide the next step's shapes; a
  fixed number of device rounds over every query measured 2-3x the work, docs/benchmarks.md) and one per
  dense CRF (the permutohedral lattice's vertex count depends on the image).

Tensors made from host data count as blocking copies unless sent through ``models.upload`` (pinned,
non-blocking) or ``geometry.image_to_device`` (the frame). The counter itself is checked to see the culprits.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from host_sync import count_host_syncs
from ovseg_ros.core import models
from ovseg_ros.core.models import save_random_checkpoint
from ovseg_ros.core.segmenter import build_segmenter
from ovseg_ros.core.vocabulary import Vocabulary

#: The one allowed copy: labels and confidence to numpy.
ALLOWED = {"Tensor.numpy": 2}
FCCLIP_ARCH = {"hidden_dim": 32, "mask_dim": 32, "num_queries": 12, "dec_layers": 2, "dec_heads": 2,
               "dec_ffn_dim": 64, "enc_layers": 2, "enc_heads": 2, "enc_points": 2, "enc_ffn_dim": 64}


def _image() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = np.zeros((60, 80, 3), dtype=np.uint8)
    img[:, :40], img[:, 40:], img[20:40, 30:50] = (200, 30, 30), (30, 30, 200), (30, 200, 30)
    return (img * 0.7 + rng.integers(0, 70, img.shape)).astype(np.uint8)


@pytest.fixture()
def sync_free_cpu(monkeypatch: pytest.MonkeyPatch):
    def on() -> None:
        monkeypatch.setattr(models, "SYNC_FREE_DEVICE_TYPES", {"cuda", "cpu"})
    return on


@pytest.fixture(scope="module")
def classifier_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_checkpoint("ovseg-tiny-vit-l4", tmp_path_factory.mktemp("sync") / "cls.pt", seed=1)


def test_the_counter_sees_the_usual_syncs() -> None:
    x = torch.arange(10.0)
    with count_host_syncs() as c:
        int(x.sum()), x.tolist(), (x > 3).nonzero(), x[x > 3], float(x.max())  # noqa: B018
        x.repeat_interleave(torch.full((10,), 2)), torch.bincount(x.long())
        if x.any():
            pass
        x.cpu(), torch.tensor([1, 2], device=x.device), x[[1, 2]]  # noqa: B018
        x[0] = 1.0  # a Python scalar: no copy
        models.upload([1, 2], x.device)  # pinned and non-blocking on a GPU: not a wait
    assert c["Tensor.__int__"] == 1 and c["Tensor.tolist"] == 1 and c["aten.nonzero"] == 1
    assert c["aten.index (boolean mask)"] == 1 and c["Tensor.__float__"] == 1 and c["Tensor.__bool__"] == 1
    assert c["aten.repeat_interleave (no output_size)"] == 1 and c["aten.bincount"] == 1
    assert c["Tensor.cpu"] == 1 and c["aten.lift_fresh (host data to the device)"] == 2 and c.uploads == 1


def _build(name: str, tiny_model_overrides: dict, classifier_checkpoint: Path):
    tiny = tiny_model_overrides["model"]
    options = {
        "dense_clip": {"model": tiny, "short_side": 64},
        "itaclip": {"model": tiny, "short_side": 64, "templates": "photo"},
        "clip_es": {"model": tiny, "short_side": 64},
        "car": {"cam_model": tiny, "classifier_input_size": 56,
                "classifier_model": {"name": "ovseg-tiny-vit-l4", "pretrained": "",
                                     "checkpoint": str(classifier_checkpoint), "precision": "fp32"}},
        "fcclip": {"allow_random": True, "arch": FCCLIP_ARCH, "min_size": 64, "max_size": 128,
                   "model": {"name": "ovseg-tiny-convnext", "pretrained": "", "checkpoint": "", "precision": "fp32"}},
    }[name]
    torch.manual_seed(0)  # FC-CLIP's random head
    return build_segmenter(name, "realtime", options, device="cpu")


def _allowed(seg) -> dict[str, int]:
    if seg.name == "fcclip":
        return {"Tensor.numpy": 1}
    if seg.name == "car":  # one read per loop step and one per dense CRF (one CRF per pass when joint)
        steps = sum(len(loop.steps) for loop in seg.last_loops)
        crfs = len(seg.last_loops) if seg.config.crf else 0
        return {**ALLOWED, "Tensor.tolist": steps + crfs}
    return ALLOWED


@pytest.mark.parametrize("classes", [6, 20])  # 20: above ITACLIP's FAST_MIN_CLASSES (the ranking path)
@pytest.mark.parametrize("name", ["dense_clip", "itaclip", "clip_es", "car", "fcclip"])
def test_realtime_segment_has_no_host_sync(
    name: str, classes: int, tiny_model_overrides: dict, classifier_checkpoint: Path, sync_free_cpu
) -> None:
    seg = _build(name, tiny_model_overrides, classifier_checkpoint)
    names = ["floor", "wall", "chair", "table", "person", "door"] + [f"thing {i}" for i in range(classes - 6)]
    state = seg.encode_vocabulary(Vocabulary.from_request(names))
    img = _image()
    if name == "itaclip":  # the CPU reference without pruning (a GPU refines every row: exact, not pruned)
        seg.config = dataclasses.replace(seg.config, prune_names=0)
    ref = seg.segment(img, state)
    sync_free_cpu()
    seg.segment(img, state)  # warm (first-frame caches)
    with count_host_syncs() as counts:
        out = seg.segment(img, state)
    assert dict(counts) == _allowed(seg), f"{name}: host syncs in one frame: {dict(counts)}"
    assert float((out.labels == ref.labels).mean()) >= 0.999
    np.testing.assert_allclose(out.confidence, ref.confidence, atol=1e-5)
    if ref.panoptic is not None:
        np.testing.assert_array_equal(out.panoptic.segment_ids, ref.panoptic.segment_ids)
        assert out.panoptic.segments == ref.panoptic.segments


@pytest.mark.parametrize("options", [{"presence_threshold": 1.0, "min_present": 0},  # nothing present
                                     {"presence_threshold": 0.0, "max_present": 2, "prob_threshold": 0.5}])
def test_clip_es_presence_edges_agree(options: dict, tiny_model_overrides: dict, sync_free_cpu) -> None:
    seg = build_segmenter("clip_es", "realtime", {**tiny_model_overrides, "short_side": 64, **options})
    state = seg.encode_vocabulary(Vocabulary.from_request(["floor", "wall", "chair", "table"]))
    ref = seg.segment(_image(), state)
    sync_free_cpu()
    with count_host_syncs() as counts:
        out = seg.segment(_image(), state)
    assert dict(counts) == ALLOWED
    np.testing.assert_array_equal(out.labels, ref.labels)
    np.testing.assert_allclose(out.confidence, ref.confidence, atol=1e-5)


def test_itaclip_cpu_path_still_prunes(tiny_model_overrides: dict) -> None:
    """Outside the sync-free mode the CPU keeps its sparse shortcuts (they are what keeps it flat in K)."""
    seg = build_segmenter("itaclip", "realtime", {**tiny_model_overrides, "short_side": 64, "templates": "photo"})
    state = seg.encode_vocabulary(Vocabulary.from_request([f"thing {i}" for i in range(20)]))
    with count_host_syncs() as counts:
        seg.segment(_image(), state)
    assert counts["aten.index (boolean mask)"] >= 1


# --- the device formulations, piece by piece, against the host ones -------------------------------------
def _snake(h: int, w: int) -> torch.Tensor:
    """A one-cell-wide path through the whole grid (the longest region a grid holds) plus a separate blob."""
    m = torch.zeros(h, w)
    for y in range(0, h, 2):
        m[y, 1:] = 1.0
        m[y + 1 if y + 1 < h else y, (w - 1) if (y // 2) % 2 == 0 else 1] = 1.0
    m[h - 3:, 0] = 0.6
    return m


def test_box_mask_on_device_equals_opencv(sync_free_cpu) -> None:
    from ovseg_ros.core import cam

    g = torch.Generator().manual_seed(0)
    cases = [torch.rand(3, 9, 13, generator=g), (torch.rand(4, 7, 5, generator=g) > 0.6) * torch.rand(4, 7, 5, generator=g),
             torch.nn.functional.interpolate(torch.rand(1, 3, 3, 4, generator=g), size=(12, 16), mode="bilinear")[0],
             torch.zeros(2, 4, 4), _snake(11, 9)[None], torch.rand(1, 1, 1, generator=g)]
    expected = [[cam.box_mask(c, t, e) for t in (0.0, 0.4, 0.7, 1.0) for e in (False, True)] for c in cases]
    sync_free_cpu()
    for c, exp in zip(cases, expected):
        with count_host_syncs() as counts:
            got = [cam.box_mask(c, t, e) for t in (0.0, 0.4, 0.7, 1.0) for e in (False, True)]
        assert not counts
        for a, b in zip(exp, got):
            assert torch.equal(a, b)


@pytest.mark.parametrize("grad_mode", ["replicate", "vmap"])
def test_gradcam_retry_and_row_mask_on_device(grad_mode: str, tiny_vit_checkpoint: Path, sync_free_cpu) -> None:
    from ovseg_ros.core import cam as C
    from ovseg_ros.core.models import ModelSpec, load_clip

    clip = load_clip(ModelSpec("ovseg-tiny-vit", "", str(tiny_vit_checkpoint), precision="fp32"), "cpu")
    rng = np.random.default_rng(3)
    cam = C.ClipCam(clip, logit_scale=100.0, max_batch=2, grad_mode=grad_mode, eps=C.CAR_EPS)
    enc = cam.encode(C.prepare_image(clip, rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)))
    g = torch.Generator().manual_seed(2)
    text = torch.nn.functional.normalize(torch.randn(4, enc.embedding.shape[1], generator=g), dim=-1)
    bg = torch.cat([enc.embedding, torch.nn.functional.normalize(torch.randn(2, text.shape[1], generator=g), dim=-1)])
    ref = cam.gradcam(enc, text, bg, range(4), retry_without_background=True)  # bg row 0 is the image: zeros
    ref_sub = cam.gradcam(enc, text[[0, 2]], bg, range(2))
    plain = cam.gradcam(enc, text, bg, range(4))
    assert (plain.flatten(1).amax(1) <= 0).any()  # the retry has something to do
    assert (ref.flatten(1).amax(1) > 0).all()
    live = torch.tensor([True, False, True, False])
    sync_free_cpu()
    with count_host_syncs() as counts:
        got = cam.gradcam(enc, text, bg, range(4), retry_without_background=True)
        masked = cam.gradcam(enc, text, bg, [0, 2], text_mask=live)
    assert not counts
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(masked, ref_sub, atol=1e-5, rtol=0)


def test_fcclip_panoptic_merge_on_device_equals_host(sync_free_cpu) -> None:
    """Many queries, stuff classes shared by several queries (merged ids), dropped and void queries."""
    from ovseg_ros.core.fcclip.postprocess import PostprocessOptions, SeparableResize, postprocess

    g = torch.Generator().manual_seed(0)
    q, k, h, w = 16, 5, 24, 30
    is_thing = torch.tensor([True, False, True, False, False])
    resize = SeparableResize((12, 15), (24, 32), (24, 30), (h, w), torch.device("cpu"))
    cases = []
    for seed in range(6):
        g.manual_seed(seed)
        logits = 4 * torch.randn(q, 12, 15, generator=g)
        cls = torch.softmax(3 * torch.randn(q, k + 1, generator=g), dim=-1)
        for thr in (0.0, 0.3):
            for ovl in (0.2, 0.8):
                for semantic in (True, False):
                    cases.append((logits, cls, PostprocessOptions(object_mask_threshold=thr, overlap_threshold=ovl,
                                                                   semantic=semantic, semantic_threshold=0.3)))
    refs = [postprocess(m, c, is_thing, resize, o) for m, c, o in cases]
    assert max(len(r.panoptic.segments) for r in refs) >= 4
    assert any(len({s.class_id for s in r.panoptic.segments}) < len(r.panoptic.segments) for r in refs)  # shared
    sync_free_cpu()
    for (m, c, o), ref in zip(cases, refs):
        with count_host_syncs() as counts:
            out = postprocess(m, c, is_thing, resize, o)
        assert dict(counts) == {"Tensor.numpy": 1}
        np.testing.assert_array_equal(out.panoptic.segment_ids, ref.panoptic.segment_ids)
        assert out.panoptic.segments == ref.panoptic.segments
        if o.semantic:
            np.testing.assert_array_equal(out.labels, ref.labels)
            np.testing.assert_array_equal(out.confidence, ref.confidence)


def test_car_painting_on_device_equals_host() -> None:
    from ovseg_ros.core.segmenters.car import paint_labels, paint_labels_on_device

    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        masks = torch.rand(6, 10, 12, generator=g) > 0.5
        scores = torch.randint(0, 4, (6,), generator=g).float() / 4  # ties and zeros
        stuff = (torch.rand(6, generator=g) > 0.5).tolist()
        labels, conf = paint_labels(masks.numpy(), scores.numpy(), stuff)
        with count_host_syncs() as counts:
            dl, dc = paint_labels_on_device(masks, scores, stuff)
        assert not counts
        np.testing.assert_array_equal(dl.numpy(), labels)
        np.testing.assert_array_equal(dc.numpy(), conf)


@pytest.mark.parametrize("keep_best", [True, False])
@pytest.mark.parametrize("reuse", [True, False])
def test_car_recurrence_reads_once_per_step(keep_best: bool, reuse: bool, sync_free_cpu) -> None:
    """Scripted steps (random scores, some all-empty proposals): the sync-free decision equals the host one."""
    from ovseg_ros.core.segmenters.car import run_recurrence

    def scripted(seed: int):
        g = torch.Generator().manual_seed(seed)
        coin = random.Random(seed)

        def propose(active: list[int], step: int) -> torch.Tensor:
            empty = coin.random() < 0.3
            return torch.zeros(len(active), 4, 5) if empty else torch.rand(len(active), 4, 5, generator=g)

        def score(props: torch.Tensor, active: list[int]) -> torch.Tensor:
            return torch.softmax(2 * torch.randn(len(active), len(active), generator=g), dim=-1)
        return propose, score

    runs = []
    for seed in range(25):
        runs.append(run_recurrence(7, *scripted(seed), 0.3, 0, seed % 2 == 0, reuse, keep_best))
    sync_free_cpu()
    for seed, ref in enumerate(runs):
        with count_host_syncs() as counts:
            got = run_recurrence(7, *scripted(seed), 0.3, 0, seed % 2 == 0, reuse, keep_best)
        assert dict(counts) == {"Tensor.tolist": len(got.steps)}
        assert got.steps == ref.steps and got.queries == ref.queries
        assert torch.equal(got.proposals, ref.proposals) and torch.equal(got.scores, ref.scores)


def test_crf_lattice_reads_once(sync_free_cpu) -> None:
    from ovseg_ros.core import crf

    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
    p = torch.softmax(torch.randn(3, 30, 40, generator=torch.Generator().manual_seed(0)), dim=0)
    ref = crf.dense_crf(img, p)
    sync_free_cpu()
    with count_host_syncs() as counts:
        got = crf.dense_crf(img, p)
    assert dict(counts) == {"Tensor.tolist": 1}
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)  # fixed-point splats (the GPU's) vs float sums
