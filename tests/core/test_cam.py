"""Stage 1 of CLIP-ES/CaR (``ovseg_ros.core.cam``) against direct, unoptimised computations on a tiny ViT."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovseg_ros.core import cam as C
from ovseg_ros.core import clip_vit
from ovseg_ros.core.models import ModelSpec, load_clip


@pytest.fixture(scope="module")
def clip(tiny_vit_checkpoint):
    spec = ModelSpec(name="ovseg-tiny-vit", pretrained="", checkpoint=str(tiny_vit_checkpoint), precision="fp32")
    return load_clip(spec, "cpu")


@pytest.fixture(scope="module")
def image_tensor(clip):
    img = (np.random.RandomState(0).rand(50, 70, 3) * 255).astype(np.uint8)
    return C.prepare_image(clip, img)


@pytest.fixture(scope="module")
def texts():
    g = torch.Generator().manual_seed(1)
    text = F.normalize(torch.randn(4, 32, generator=g), dim=-1)
    bg = F.normalize(torch.randn(3, 32, generator=g), dim=-1)
    return text, bg


def direct_gradcam(clip, x, text_all, target, scale=100.0):
    """Grad-CAM by hooking ``ln_1`` of the last block in the model's own (nn.MultiheadAttention) forward."""
    visual = clip.visual
    tokens, grid = clip_vit.embed(visual, x, "bilinear")
    res = clip_vit.blocks(visual)
    with torch.no_grad():
        for blk in res[:-1]:
            tokens = blk(tokens)
    saved = {}

    def hook(_mod, _inp, out):
        out = out.detach().requires_grad_(True)
        saved["a"] = out
        return out

    handle = res[-1].ln_1.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            out = res[-1](tokens)
            f = visual.ln_post(out)[:, 1:].mean(1) @ visual.proj
            f = F.normalize(f, dim=-1)
            p = torch.softmax(scale * f @ text_all.T, dim=-1)
            (g,) = torch.autograd.grad(p[0, target], saved["a"])
    finally:
        handle.remove()
    a = saved["a"].detach()[0, 1:]
    w = g[0, 1:].mean(0)
    cam = torch.relu(a @ w).reshape(grid)
    for _ in range(2):  # pytorch-grad-cam scales per layer and again after aggregating (CLIP-ES and CaR)
        cam = cam - cam.min()
        cam = cam / (cam.max() + 1e-7)
    return cam


def test_prepare_image_rounds_up_to_patch_multiples(clip) -> None:
    x = C.prepare_image(clip, np.zeros((50, 70, 3), np.uint8))
    assert tuple(x.shape) == (1, 3, 64, 80)
    x = C.prepare_image(clip, np.zeros((480, 640, 3), np.uint8), short_side=200)
    assert tuple(x.shape) == (1, 3, 208, 272)  # 200x267 -> ceil to 16


def test_encode_rounds_any_size_up_to_patch_multiples(clip) -> None:
    x = torch.randn(1, 3, 50, 70)
    enc = C.ClipCam(clip).encode(x)
    assert enc.grid == (4, 5) and enc.attention.shape == (20, 20)


def test_gradcam_matches_direct_autograd(clip, image_tensor, texts) -> None:
    text, bg = texts
    cc = C.ClipCam(clip, logit_scale=100.0)
    enc = cc.encode(image_tensor)
    cams = cc.gradcam(enc, text, bg, [0, 1, 2, 3])
    full = torch.cat([text, bg])
    for t in range(4):
        ref = direct_gradcam(clip, image_tensor, full, t)
        torch.testing.assert_close(cams[t], ref, atol=2e-4, rtol=1e-3)
    assert cams.min() >= 0 and cams.max() <= 1


def test_batched_backward_equals_one_at_a_time(clip, image_tensor, texts) -> None:
    text, bg = texts
    enc = C.ClipCam(clip).encode(image_tensor)
    batched = C.ClipCam(clip, max_batch=8).gradcam(enc, text, bg, [3, 0, 2, 1])
    single = C.ClipCam(clip, max_batch=1).gradcam(enc, text, bg, [3, 0, 2, 1])
    chunked = C.ClipCam(clip, max_batch=3).gradcam(enc, text, bg, [3, 0, 2, 1])
    vmapped = C.ClipCam(clip, max_batch=8, grad_mode="vmap").gradcam(enc, text, bg, [3, 0, 2, 1])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(chunked, single, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(vmapped, single, atol=1e-5, rtol=1e-4)


def test_no_autograd_state_left_and_inference_mode_ok(clip, image_tensor, texts) -> None:
    text, bg = texts
    cc = C.ClipCam(clip)
    with torch.inference_mode():
        cams, s = cc(image_tensor, text, bg, [0, 1])
    assert not cams.requires_grad and not s.requires_grad
    assert all(p.grad is None and not p.requires_grad for p in clip.model.parameters())


def test_encode_attention_and_embedding_match_stock_modules(clip, image_tensor) -> None:
    cc = C.ClipCam(clip, attn_layers=8)
    enc = cc.encode(image_tensor)
    visual = clip.visual
    tokens, grid = clip_vit.embed(visual, image_tensor, "bilinear")
    maps = []
    with torch.no_grad():
        for blk in clip_vit.blocks(visual):
            h = blk.ln_1(tokens)
            maps.append(blk.attn(h, h, h, need_weights=True, average_attn_weights=True)[1][0])
            tokens = blk(tokens)
        ref_attn = torch.stack(maps[-8:]).mean(0)[1:, 1:]
        ref_emb = F.normalize(clip_vit.bare_forward(visual, image_tensor, "bilinear")[:, 1:].mean(1), dim=-1)
    assert enc.grid == grid
    torch.testing.assert_close(enc.attention, ref_attn, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(enc.embedding, ref_emb, atol=1e-5, rtol=1e-4)
    probs = cc.classify(enc, F.normalize(torch.randn(6, 32), dim=-1))
    assert probs.shape == (6,) and abs(float(probs.sum()) - 1) < 1e-5


def authors_transition(attn: torch.Tensor) -> torch.Tensor:
    """The authors' loop, written out: col/row normalise, two more rounds, symmetrise, square."""
    t = attn / attn.sum(0, keepdim=True)
    t = t / t.sum(1, keepdim=True)
    for _ in range(2):
        t = t / t.sum(0, keepdim=True)
        t = t / t.sum(1, keepdim=True)
    t = (t + t.T) / 2
    return t @ t


def test_sinkhorn_properties() -> None:
    w = torch.rand(30, 30, generator=torch.Generator().manual_seed(0)) + 0.01
    d = C.sinkhorn(w, 3)
    torch.testing.assert_close(d.sum(1), torch.ones(30))  # rows exact after the last row step
    assert (d.sum(0) - 1).abs().max() < 0.05  # columns close to 1 (near doubly stochastic)
    assert (d >= 0).all()
    s = C.affinity_from_attention(w, 3)
    torch.testing.assert_close(s, s.T)
    assert ((C.sinkhorn(w, 30).sum(0) - 1).abs().max()) < 1e-4  # converges with more rounds
    torch.testing.assert_close(s @ s, authors_transition(w), atol=1e-6, rtol=1e-5)


def test_affinity_refinement_equals_reference_cubic_form() -> None:
    g = torch.Generator().manual_seed(0)
    h, w = 6, 7
    attn = torch.softmax(torch.randn(h * w, h * w, generator=g), dim=1)
    cams = C.minmax_normalize(torch.rand(3, h, w, generator=g) ** 3)
    s = C.affinity_from_attention(attn)
    mask = C.box_mask(cams, 0.4)
    got = C.refine_with_affinity(s, cams, 0.4)
    trans = authors_transition(attn)  # O(N^3)
    for i in range(3):
        ref = (trans * mask[i].reshape(1, -1).float()) @ cams[i].reshape(-1, 1)
        ref = ref.reshape(h, w)
        ref = (ref - ref.min()) / ((ref - ref.min()).max() + 1e-7)
        torch.testing.assert_close(got[i], ref, atol=1e-5, rtol=1e-4)


def authors_boxes(cam: np.ndarray, threshold: float) -> np.ndarray:
    """``scoremap2bbox`` + mask filling as in the authors' code (contours, clipped box ends)."""
    h, w = cam.shape
    q = (cam * 255).astype(np.uint8)
    _, thr = cv2.threshold(q, int(threshold * q.max()), 255, cv2.THRESH_BINARY)
    contours = cv2.findContours(thr, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[0]
    mask = np.zeros((h, w), bool)
    for c in contours:
        x, y, bw, bh = cv2.boundingRect(c)
        mask[y:min(y + bh, h - 1), x:min(x + bw, w - 1)] = True
    return mask


def test_box_mask_matches_authors_with_clipped_edges() -> None:
    rng = np.random.RandomState(3)
    for _ in range(20):
        cam = cv2.GaussianBlur(rng.rand(12, 15).astype(np.float32), (5, 5), 1.5)
        cam = (cam - cam.min()) / (cam.max() - cam.min())
        got = C.box_mask(torch.from_numpy(cam)[None], 0.4, clip_edges=True)[0].numpy()
        np.testing.assert_array_equal(got, authors_boxes(cam, 0.4))


def test_box_mask_edges_and_empty() -> None:
    cam = torch.zeros(3, 8, 10)
    cam[0, 5:, 7:] = 1.0  # touches the right and bottom edges
    cam[1, 2:4, 9] = 1.0  # only in the last column
    # cam[2] all zero
    default = C.box_mask(cam, 0.4)
    clipped = C.box_mask(cam, 0.4, clip_edges=True)
    assert default[0].sum() == 3 * 3 and default[0, 7, 9]
    assert clipped[0].sum() == 2 * 2 and not clipped[0, 7, 9]  # the authors drop the last row/column
    assert default[1].sum() == 2 and clipped[1].sum() == 0
    assert default[2].sum() == 0 and clipped[2].sum() == 0
    # Two separate regions: the union of two boxes, not one box around both.
    two = torch.zeros(1, 8, 10)
    two[0, 1, 1] = two[0, 6, 8] = 1.0
    assert C.box_mask(two, 0.4)[0].sum() == 2


def test_retry_without_background(clip, image_tensor, texts, monkeypatch) -> None:
    text, bg = texts
    cc = C.ClipCam(clip)
    enc = cc.encode(image_tensor)
    calls = []
    real = cc._gradcam_rows

    def fake(enc_, rows, targets):
        calls.append((rows.shape[0], list(targets)))
        out = real(enc_, rows, targets)
        if rows.shape[0] > text.shape[0]:
            out[1] = 0  # pretend target 1's CAM vanished against the background words
        return out

    monkeypatch.setattr(cc, "_gradcam_rows", fake)
    cams = cc.gradcam(enc, text, bg, [0, 2, 3], retry_without_background=True)
    assert calls == [(7, [0, 2, 3]), (4, [2])]
    torch.testing.assert_close(cams[1], real(enc, text, [2])[0])
