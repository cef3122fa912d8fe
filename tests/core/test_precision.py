"""Half precision and device moves on the CPU: what ``precision: auto`` does on a GPU, played on the CPU.

``models.AUTO_DTYPES`` maps a device type to what ``auto`` means there; mapping ``cpu`` to fp16 (or bf16) makes
the CPU a "fake fp16 device", so the moves a node makes (CUDA fp16 at activate, CPU fp32 at deactivate) and
the fp16 numerics (torch 2.14 runs every op these segmenters use in fp16 and bf16 on the CPU) are tested here,
without a GPU. ``tests/core/test_cuda.py`` repeats the agreement on a real device.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovseg_ros.core import models
from ovseg_ros.core.models import ModelSpec, load_clip, save_random_checkpoint
from ovseg_ros.core.segmenter import build_segmenter
from ovseg_ros.core.vocabulary import Vocabulary

VOCAB = Vocabulary.from_request(["floor", "wall", "chair", "table", "person", "door"])
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}
FCCLIP_ARCH = {"hidden_dim": 32, "mask_dim": 32, "num_queries": 12, "dec_layers": 2, "dec_heads": 2,
               "dec_ffn_dim": 64, "enc_layers": 2, "enc_heads": 2, "enc_points": 2, "enc_ffn_dim": 64}
#: Label agreement of a half-precision run with fp32 (random tiny models: many near-ties, so not 1.0).
MIN_AGREEMENT = {"fp16": 0.98, "bf16": 0.95}


@pytest.fixture()
def fake_half_cpu(monkeypatch: pytest.MonkeyPatch):
    """``fake_half_cpu("fp16")``: ``precision: auto`` means fp16 on the CPU (a GPU's state); ``(None)`` undoes it."""

    def use(name: str | None) -> None:
        if name is None:
            monkeypatch.delitem(models.AUTO_DTYPES, "cpu", raising=False)
        else:
            monkeypatch.setitem(models.AUTO_DTYPES, "cpu", HALF[name])

    return use


@pytest.fixture(scope="module")
def classifier_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_checkpoint("ovseg-tiny-vit-l4", tmp_path_factory.mktemp("prec") / "cls.pt", seed=1)


def _auto(spec: dict) -> dict:
    return {**spec, "precision": "auto"}


def _build(name: str, tiny_model_overrides: dict, classifier_checkpoint: Path):
    tiny = _auto(tiny_model_overrides["model"])
    options = {
        "dense_clip": {"model": tiny, "short_side": 64},
        "itaclip": {"model": tiny, "short_side": 64, "templates": "photo"},
        "clip_es": {"model": tiny, "crf": False},
        "car": {"cam_model": tiny, "classifier_input_size": 56,
                "classifier_model": {"name": "ovseg-tiny-vit-l4", "pretrained": "",
                                     "checkpoint": str(classifier_checkpoint), "precision": "auto"}},
        "fcclip": {"allow_random": True, "arch": FCCLIP_ARCH, "min_size": 64, "max_size": 128,
                   "model": {"name": "ovseg-tiny-convnext", "pretrained": "", "checkpoint": "", "precision": "auto"}},
    }[name]
    torch.manual_seed(0)  # FC-CLIP's random head
    return build_segmenter(name, "realtime", options, device="cpu")


def _clips(seg) -> list[models.ClipModel]:
    if seg.name == "car":
        return [c for c in (seg.cam_clip, seg.classifier.clip) if c is not None]
    if seg.name == "fcclip":
        return [seg.network.clip]
    return [seg.clip]


def _param_dtypes(seg) -> set[torch.dtype]:
    return {p.dtype for c in _clips(seg) for p in c.model.parameters() if p.is_floating_point()}


def _image() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = np.zeros((60, 80, 3), dtype=np.uint8)
    img[:, :40], img[:, 40:], img[20:40, 30:50] = (200, 30, 30), (30, 30, 200), (30, 200, 30)
    return (img * 0.7 + rng.integers(0, 70, img.shape)).astype(np.uint8)


def test_auto_means_fp16_on_cuda_and_fp32_elsewhere() -> None:
    assert models.resolve_dtype("auto", "cuda:1") == torch.float16
    assert models.resolve_dtype("auto", "cpu") == torch.float32
    assert models.resolve_dtype("bf16", "cpu") == torch.bfloat16


@pytest.mark.parametrize("half", ["fp16", "bf16"])
def test_clip_round_trip_half_fp32_half_is_lossless(tiny_vit_checkpoint: Path, fake_half_cpu, half: str) -> None:
    spec = ModelSpec("ovseg-tiny-vit", "", str(tiny_vit_checkpoint), precision="auto")
    fake_half_cpu(half)
    clip = load_clip(spec, "cpu")
    assert clip.dtype == HALF[half]
    before = {k: v.clone() for k, v in clip.model.state_dict().items()}
    fake_half_cpu(None)
    clip.to("cpu")  # "deactivate": fp32 on the CPU, not the GPU's half precision
    assert clip.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in clip.model.state_dict().values() if v.is_floating_point())
    fp32 = clip.model.state_dict()
    assert all(torch.equal(fp32[k], before[k].float()) for k in before if before[k].is_floating_point())
    fake_half_cpu(half)
    clip.to("cpu")  # "activate" again
    after = clip.model.state_dict()
    assert clip.dtype == HALF[half]
    for k, v in before.items():  # bit for bit
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k


@pytest.mark.parametrize("half", ["fp16", "bf16"])
@pytest.mark.parametrize("name", ["dense_clip", "itaclip", "clip_es", "car", "fcclip"])
def test_every_segmenter_moves_between_half_and_fp32(
    name: str, half: str, tiny_model_overrides: dict, classifier_checkpoint: Path, fake_half_cpu
) -> None:
    """fp32 (CPU) -> fake half device -> fp32 -> half: dtypes follow the device, results agree with fp32,
    and the second half-precision run equals the first exactly (nothing was lost on the way)."""
    img = _image()
    seg = _build(name, tiny_model_overrides, classifier_checkpoint)
    assert _param_dtypes(seg) == {torch.float32}
    ref = seg.segment(img, seg.encode_vocabulary(VOCAB))

    fake_half_cpu(half)
    seg.to("cpu")
    assert HALF[half] in _param_dtypes(seg) and all(c.dtype == HALF[half] for c in _clips(seg))
    first = seg.segment(img, seg.encode_vocabulary(VOCAB))
    assert first.labels.dtype == np.int32 and np.isfinite(first.confidence).all()
    agree = float((first.labels == ref.labels).mean())
    assert agree >= MIN_AGREEMENT[half], f"{name} {half}: {agree:.4f} of the labels equal fp32's"

    fake_half_cpu(None)
    seg.to("cpu")
    assert _param_dtypes(seg) == {torch.float32} and all(c.dtype == torch.float32 for c in _clips(seg))
    back = seg.segment(img, seg.encode_vocabulary(VOCAB))
    assert float((back.labels == ref.labels).mean()) >= MIN_AGREEMENT[half]

    fake_half_cpu(half)
    seg.to("cpu")
    again = seg.segment(img, seg.encode_vocabulary(VOCAB))
    np.testing.assert_array_equal(again.labels, first.labels)
    np.testing.assert_array_equal(again.confidence, first.confidence)


def _cam_setup(tiny_vit_checkpoint: Path, half: str | None, fake_half_cpu):
    from ovseg_ros.core import cam as C

    fake_half_cpu(half)
    clip = load_clip(ModelSpec("ovseg-tiny-vit", "", str(tiny_vit_checkpoint), precision="auto"), "cpu")
    fake_half_cpu(None)
    rng = np.random.default_rng(3)
    img = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    cam = C.ClipCam(clip, logit_scale=100.0)
    enc = cam.encode(C.prepare_image(clip, img))
    # Text rows 0..2 lie half way between the image's embedding and random directions, row 3 is the image's
    # own: at temperature 100 rows 0..2 get softmax probabilities of ~1e-9..1e-15 (a class the image does not
    # show), and the gradient of such a target is what an fp16 backward loses.
    e = enc.embedding[0].float()
    g = torch.Generator().manual_seed(1)
    others = F.normalize(0.5 * e + 0.5 * F.normalize(torch.randn(3, e.shape[0], generator=g), dim=-1), dim=-1)
    text = torch.cat([others, e[None]])
    return cam, enc, text


@pytest.mark.parametrize("half", ["fp16", "bf16"])
def test_gradcam_of_a_half_model_runs_in_fp32_and_agrees(tiny_vit_checkpoint: Path, fake_half_cpu, half: str) -> None:
    targets = [0, 1, 2, 3]
    cam32, enc32, text = _cam_setup(tiny_vit_checkpoint, None, fake_half_cpu)
    ref = cam32.gradcam(enc32, text, None, targets)
    cam_h, enc_h, _ = _cam_setup(tiny_vit_checkpoint, half, fake_half_cpu)
    assert cam_h.clip.dtype == HALF[half]
    out = cam_h.gradcam(enc_h, text, None, targets)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert float(cam32.classify(enc32, text)[:3].max()) < 1e-6  # the unlikely targets are unlikely
    assert (ref.flatten(1).amax(dim=1) > 0).all()
    assert (out.flatten(1).amax(dim=1) > 0).all(), "a CAM of the half-precision model came out all zero"
    # Same maps up to the half-precision image pass (the block input differs by its rounding).
    torch.testing.assert_close(out, ref, atol=0.03 if half == "fp16" else 0.1, rtol=0)


def test_gradcam_through_the_fp16_block_underflows(tiny_vit_checkpoint: Path, fake_half_cpu) -> None:
    """The failure the fp32 head prevents: the same targets backpropagated through the fp16 modules give
    all-zero CAMs for the unlikely classes (if this stops failing, fp16 CAMs may have become safe)."""
    from ovseg_ros.core import clip_vit

    cam_h, enc_h, text = _cam_setup(tiny_vit_checkpoint, "fp16", fake_half_cpu)
    visual = cam_h.visual
    cam_h._grad_head = lambda: (clip_vit.blocks(visual)[-1], visual.ln_post, visual.proj)  # type: ignore[method-assign]
    out = cam_h.gradcam(enc_h, text, None, [0, 1, 2])
    assert (out.flatten(1).amax(dim=1) == 0).all()


def test_fp32_grad_head_follows_moves(tiny_vit_checkpoint: Path, fake_half_cpu) -> None:
    cam_h, enc_h, text = _cam_setup(tiny_vit_checkpoint, "fp16", fake_half_cpu)
    block32, ln32, _ = cam_h._grad_head()
    assert block32.ln_1.weight.dtype == torch.float32 and cam_h._grad_head()[0] is block32  # kept, not rebuilt
    cam_h.clip.to("cpu")  # fp32 now: the model's own modules, the copy dropped
    block, _, _ = cam_h._grad_head()
    assert block is cam_h.visual.transformer.resblocks[-1] and cam_h._head32 is None


def test_pos_cache_is_released_for_other_devices(tiny_model_overrides: dict, classifier_checkpoint: Path) -> None:
    from ovseg_ros.core import clip_vit

    seg = _build("dense_clip", tiny_model_overrides, classifier_checkpoint)
    seg.segment(_image(), seg.encode_vocabulary(VOCAB))
    visual = seg.clip.visual
    clip_vit.interpolate_pos_embed(visual, (5, 7))
    fake = torch.zeros(3, device="meta")  # an entry on another device, as a CUDA table after deactivate
    with clip_vit._POS_LOCK:
        clip_vit._POS_CACHE[("x", 0, fake.device, fake.dtype, (1, 1), "bicubic")] = (lambda: None, fake)
    seg.release_device_caches()
    with clip_vit._POS_LOCK:
        devices = {t.device.type for _, t in clip_vit._POS_CACHE.values()}
    assert devices <= {"cpu"} and len(clip_vit._POS_CACHE) >= 1
    assert clip_vit.clear_pos_cache() >= 1 and not clip_vit._POS_CACHE
