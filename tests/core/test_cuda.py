"""CUDA-only checks (marker ``cuda``: skipped without a device; ``bash benchmarks/gpu_check.sh`` runs them).

Each compares the GPU path with the CPU path it must equal, or measures what only a GPU has (VRAM).
Set ``OVSEG_GPU_CHECK_JSON`` to a file to get the measured numbers appended as JSON lines.
"""

from __future__ import annotations

import gc
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovseg_ros.core.segmenter import StageTimer, build_segmenter, to_host
from ovseg_ros.core.vocabulary import Vocabulary

pytestmark = pytest.mark.cuda
VOCAB = ["floor", "wall", "chair", "table", "person", "door"]


def record(**values: object) -> None:
    path = os.environ.get("OVSEG_GPU_CHECK_JSON")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(values) + "\n")


def _tiny(overrides: dict, precision: str) -> dict:
    return {**overrides, "model": {**overrides["model"], "precision": precision}, "short_side": 64}


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precisions_agree_with_fp32(tiny_model_overrides: dict, rgb_image: np.ndarray, precision: str) -> None:
    vocab = Vocabulary.from_request(VOCAB)
    ref = build_segmenter("dense_clip", "realtime", _tiny(tiny_model_overrides, "fp32"), device="cuda")
    seg = build_segmenter("dense_clip", "realtime", _tiny(tiny_model_overrides, precision), device="cuda")
    r32 = ref.segment(rgb_image, ref.encode_vocabulary(vocab))
    r = seg.segment(rgb_image, seg.encode_vocabulary(vocab))
    assert r.labels.dtype == np.int32 and r.confidence.dtype == np.float32
    assert np.isfinite(r.confidence).all() and 0 <= r.confidence.min() and r.confidence.max() <= 1
    agree = float((r.labels == r32.labels).mean())
    record(check=f"dense_clip {precision} vs fp32 label agreement", value=round(agree, 4))
    assert agree >= 0.9


def test_crf_gpu_equals_cpu() -> None:
    from ovseg_ros.core.crf import dense_crf

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)
    probs = torch.softmax(torch.randn(4, 40, 56, generator=torch.Generator().manual_seed(0)), dim=0)
    cpu = dense_crf(image, probs, iterations=5)
    gpu = dense_crf(image, probs.cuda(), iterations=5)
    assert gpu.is_cuda
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-3)


def test_vmap_gradcam_on_cuda_equals_cpu(tiny_vit_checkpoint) -> None:
    from ovseg_ros.core import cam as C
    from ovseg_ros.core.models import ModelSpec, load_clip

    spec = ModelSpec(name="ovseg-tiny-vit", pretrained="", checkpoint=str(tiny_vit_checkpoint), precision="fp32")
    img = (np.random.RandomState(0).rand(50, 70, 3) * 255).astype(np.uint8)
    g = torch.Generator().manual_seed(1)
    text, bg = F.normalize(torch.randn(4, 32, generator=g), dim=-1), F.normalize(torch.randn(3, 32, generator=g), dim=-1)
    out = {}
    for device in ("cpu", "cuda"):
        clip = load_clip(spec, device)
        x = C.prepare_image(clip, img)
        enc = C.ClipCam(clip).encode(x)
        out[device] = C.ClipCam(clip, max_batch=8, grad_mode="vmap").gradcam(
            enc, text.to(device), bg.to(device), [3, 0, 2, 1])
        if device == "cuda":
            single = C.ClipCam(clip, max_batch=1).gradcam(enc, text.to(device), bg.to(device), [3, 0, 2, 1])
            torch.testing.assert_close(out[device], single, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(out["cuda"].cpu(), out["cpu"], atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("kernel", ["auto", "grid_sample"])
def test_fcclip_deformable_attention_on_cuda_equals_cpu(kernel: str) -> None:
    from ovseg_ros.core.fcclip.msdeform_attn import MSDeformAttn

    torch.manual_seed(0)
    shapes = [(8, 10), (4, 5), (2, 3)]
    attn = MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=4, kernel=kernel)
    for lin in (attn.sampling_offsets, attn.attention_weights):
        torch.nn.init.normal_(lin.weight, std=0.1)
        torch.nn.init.normal_(lin.bias, std=0.5)
    s = sum(h * w for h, w in shapes)
    query, value = torch.randn(2, 7, 32), torch.randn(2, s, 32)
    ref_points = torch.rand(2, 7, 3, 2)
    cpu = attn(query, ref_points, value, shapes)
    gpu = attn.cuda()(query.cuda(), ref_points.cuda(), value.cuda(), shapes)
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-3)


def test_vram_is_freed_when_moved_off_the_gpu() -> None:
    """What the node's deactivate does (models and vocabulary state to the CPU, cache emptied), measured
    on the real ViT-B/16 architecture (random weights)."""
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    model = {"name": "ViT-B-16-quickgelu", "pretrained": "", "checkpoint": "", "allow_random": True, "precision": "fp16"}
    seg = build_segmenter("dense_clip", "realtime", {"model": model, "templates": "photo"}, device="cuda")
    state = seg.encode_vocabulary(Vocabulary.from_request(VOCAB))
    seg.segment(np.zeros((480, 640, 3), np.uint8), state)
    torch.cuda.synchronize()
    loaded = torch.cuda.memory_allocated()
    seg.to("cpu")
    state = state.to("cpu")
    gc.collect()
    torch.cuda.empty_cache()
    freed = torch.cuda.memory_allocated()
    record(check="VRAM ViT-B/16 fp16 loaded / after deactivate (MiB)",
           value=f"{(loaded - base) / 2**20:.0f} / {(freed - base) / 2**20:.1f}")
    assert loaded - base > 100 * 2**20  # the model really was on the GPU
    assert freed - base < 4 * 2**20


def test_topk_upsampling_and_host_copy_on_cuda() -> None:
    from ovseg_ros.core.geometry import upsample_max, upsample_max_topk

    g = torch.Generator(device="cuda").manual_seed(0)
    base = torch.randn(1, 150, 6, 8, generator=g, device="cuda")
    s = torch.softmax(6 * F.interpolate(base, size=(24, 32), mode="bilinear")[0], dim=0)
    best, label = upsample_max(s, (240, 320))
    fbest, flabel = upsample_max_topk(s, (240, 320))
    assert (flabel == label).float().mean().item() >= 0.995
    lab_np, conf_np = to_host(flabel.to(torch.int32), fbest)
    assert lab_np.dtype == np.int32 and conf_np.dtype == np.float32 and lab_np.shape == (240, 320)
    timer = StageTimer(torch.device("cuda"), profile=True)
    with timer.stage("x"):
        torch.ones(10, device="cuda").sum()
    assert timer.profile and timer.times["x"] > 0
    assert not StageTimer(torch.device("cuda"), profile=False).profile


@pytest.mark.parametrize("name", ["dense_clip", "itaclip", "clip_es", "car", "fcclip"])
def test_realtime_frame_has_no_host_sync_on_cuda(tiny_model_overrides: dict, rgb_image: np.ndarray, name: str,
                                                 tmp_path) -> None:
    """The on-device twin of tests/core/test_host_sync.py: ``torch.cuda.set_sync_debug_mode`` warns on every
    synchronising op; one frame of the realtime preset may only wait in ``to_host`` / ``to_host_packed`` (an
    explicit stream sync after pinned copies, which the mode does not report). CaR also reads once per loop
    step and once per dense CRF (the counted exceptions of test_host_sync.py)."""
    import warnings

    from ovseg_ros.core.models import save_random_checkpoint

    tiny = _tiny(tiny_model_overrides, "fp16")
    extra = {"itaclip": {"templates": "photo"}, "clip_es": {"short_side": 64}}.get(name, {})
    if name == "car":
        cls = save_random_checkpoint("ovseg-tiny-vit-l4", tmp_path / "cls.pt", seed=1)
        tiny = {"cam_model": tiny["model"], "classifier_input_size": 56,
                "classifier_model": {"name": "ovseg-tiny-vit-l4", "pretrained": "", "checkpoint": str(cls),
                                     "precision": "fp16"}}
    elif name == "fcclip":
        tiny = {"allow_random": True, "min_size": 64, "max_size": 128,
                "arch": {"hidden_dim": 32, "mask_dim": 32, "num_queries": 12, "dec_layers": 2, "dec_heads": 2,
                         "dec_ffn_dim": 64, "enc_layers": 2, "enc_heads": 2, "enc_points": 2, "enc_ffn_dim": 64},
                "model": {"name": "ovseg-tiny-convnext", "pretrained": "", "checkpoint": "", "precision": "fp16"}}
    seg = build_segmenter(name, "realtime", {**tiny, **extra}, device="cuda")
    state = seg.encode_vocabulary(Vocabulary.from_request(VOCAB + [f"thing {i}" for i in range(20)]))
    seg.segment(rgb_image, state)  # first-frame caches
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            seg.segment(rgb_image, state)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]
    record(check=f"{name} realtime host syncs per frame (sync debug mode)", value=len(syncs))
    allowed = 0
    if name == "car":
        allowed = sum(len(loop.steps) for loop in seg.last_loops) + (len(seg.last_loops) if seg.config.crf else 0)
    assert len(syncs) == allowed, syncs
