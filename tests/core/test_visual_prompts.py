"""Visual prompts (CaR stage 2): each prompt is drawn where the mask is, and composes as the reference does."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from ovseg_ros.core import visual_prompts as vp


def _image(h: int = 40, w: int = 60, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).permute(2, 0, 1)[None].float()


def _box_mask(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
    m = torch.zeros((1, h, w), dtype=torch.bool)
    m[0, y0:y1, x0:x1] = True
    return m


def _red(out: torch.Tensor) -> torch.Tensor:
    """(H, W) bool: pixels exactly (255, 0, 0)."""
    return (out[0] == 255) & (out[1] == 0) & (out[2] == 0)


def test_kinds_are_validated_and_ordered() -> None:
    assert vp.check_kinds(["circle", "blur", "gray"]) == ("blur", "gray", "circle")
    with pytest.raises(ValueError, match="unknown visual prompt"):
        vp.check_kinds(["sparkles"])


def test_circle_is_an_ellipse_on_the_centroid_and_box() -> None:
    img = torch.zeros((1, 3, 40, 60))
    mask = _box_mask(40, 60, 10, 21, 20, 41)  # 11 x 21 box, centroid (15, 30)
    out = vp.apply_visual_prompts(img, mask, ["circle"])[0]
    red = _red(out)
    ys, xs = torch.nonzero(red, as_tuple=True)
    # semi-axes (11//2, 21//2) = (5, 10) around (15, 30): the outline spans exactly that box
    assert (int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())) == (10, 20, 20, 40)
    assert not red[15, 30]  # an outline, not a filled disc
    assert red[10, 30] and red[20, 30] and red[15, 20] and red[15, 40]  # the four extreme points
    # one pixel thick: far fewer pixels than the filled ellipse (~pi*5*10 = 157)
    assert int(red.sum()) < 60


def test_circle_follows_the_centroid_not_the_box_centre() -> None:
    m = torch.zeros((1, 30, 30), dtype=torch.bool)
    m[0, 5:25, 5:8] = True  # a tall bar on the left ...
    m[0, 5:8, 5:25] = True  # ... and a bar on top: centroid up-left of the box centre
    cy, cx, bh, bw = vp.mask_geometry(m)
    ys, xs = torch.nonzero(m[0], as_tuple=True)
    assert (int(cy), int(cx)) == (int(ys.float().mean()), int(xs.float().mean()))
    assert (int(bh), int(bw)) == (20, 20)


def test_rectangle_and_contour_are_drawn_on_the_mask() -> None:
    img = torch.zeros((1, 3, 30, 40))
    mask = _box_mask(30, 40, 5, 16, 10, 31)
    rect = _red(vp.apply_visual_prompts(img, mask, ["rectangle"])[0])
    ys, xs = torch.nonzero(rect, as_tuple=True)
    assert (int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())) == (5, 15, 10, 30)
    ring = mask.clone()
    ring[0, 8:12, 15:25] = False  # a hole: the contour of the hole-filled mask is the outer border only
    cont = _red(vp.apply_visual_prompts(img, ring, ["contour"])[0])
    border = mask[0] & ~torch.from_numpy(cv2.erode(mask[0].numpy().astype(np.uint8), np.ones((3, 3), np.uint8))
                                         .astype(bool))
    assert torch.equal(cont, border)


def test_blur_gray_black_change_only_the_outside() -> None:
    img = _image()
    mask = _box_mask(40, 60, 10, 30, 15, 45)
    for kinds in (["blur"], ["gray"], ["black"], ["blur", "gray"]):
        out = vp.apply_visual_prompts(img, mask, kinds)[0]
        assert torch.equal(out[:, mask[0]], img[0][:, mask[0]]), kinds  # the inside is untouched
        assert not torch.equal(out[:, ~mask[0]], img[0][:, ~mask[0]]), kinds
    black = vp.apply_visual_prompts(img, mask, ["black"])[0]
    assert float(black[:, ~mask[0]].abs().max()) == 0.0
    gray = vp.apply_visual_prompts(img, mask, ["gray"])[0]
    assert torch.equal(gray[0, ~mask[0]], gray[1, ~mask[0]]) and torch.equal(gray[1, ~mask[0]], gray[2, ~mask[0]])


def test_blur_matches_opencv_and_gray_orders() -> None:
    img = _image(32, 48, seed=1)
    ref = cv2.GaussianBlur(img[0].permute(1, 2, 0).numpy().astype(np.uint8), (15, 15), 0)
    ours = vp.gaussian_blur(img, 15)[0].permute(1, 2, 0).numpy()
    assert np.abs(ours - ref.astype(np.float32)).max() <= 1.0  # uint8 rounding
    rgb = img[0].permute(1, 2, 0).numpy().astype(np.uint8)
    assert np.abs(vp.to_gray(img, "rgb")[0, 0].numpy() - cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)).max() <= 1
    assert np.abs(vp.to_gray(img, "bgr")[0, 0].numpy() - cv2.cvtColor(rgb, cv2.COLOR_BGR2GRAY)).max() <= 1


def test_composition_equals_sequential_masking() -> None:
    """blur then gray then circle, composed once per image, equals the reference's step-by-step compositing."""
    img = _image(36, 50, seed=2)
    masks = torch.stack([_box_mask(36, 50, 5, 20, 5, 30)[0], _box_mask(36, 50, 15, 35, 20, 48)[0]])
    out = vp.apply_visual_prompts(img, masks, ["circle", "gray", "blur"])
    for i in range(2):
        m = masks[i]
        step = torch.where(m, img[0], vp.gaussian_blur(img)[0])
        step = torch.where(m, step, vp.to_gray(step[None])[0])
        lines = vp.prompt_outlines(m[None], ["circle"])[0]
        step = torch.where(lines, torch.tensor([255.0, 0, 0]).view(3, 1, 1), step)
        assert torch.equal(out[i], step)


def test_empty_mask_gives_the_plain_image_and_batches_are_independent() -> None:
    img = _image()
    masks = torch.zeros((3, 40, 60), dtype=torch.bool)
    masks[1, 5:10, 5:10] = True
    out = vp.apply_visual_prompts(img, masks, ["circle", "blur"])
    assert torch.equal(out[0], img[0]) and torch.equal(out[2], img[0])
    single = vp.apply_visual_prompts(img, masks[1:2], ["circle", "blur"])
    assert torch.equal(out[1], single[0])


def test_degenerate_masks_draw_lines() -> None:
    img = torch.zeros((1, 3, 20, 20))
    m = torch.zeros((1, 20, 20), dtype=torch.bool)
    m[0, 4:15, 7] = True  # one column wide: the ellipse degenerates to a vertical line
    red = _red(vp.apply_visual_prompts(img, m, ["circle"])[0])
    assert red[:, 7].sum() >= 10 and red[:, :7].sum() == 0 and red[:, 8:].sum() == 0


def test_keep_full_image_keeps_a_prompt_at_the_edge() -> None:
    """A prompt at the right end of a wide image survives padding, and is cut by the centre crop."""
    img = torch.zeros((1, 3, 50, 200))
    mask = _box_mask(50, 200, 10, 40, 170, 198)
    prompted = vp.apply_visual_prompts(img, mask, ["circle"], thickness=3)
    padded = vp.to_classifier_input(prompted, 56, keep_full_image=True)
    cropped = vp.to_classifier_input(prompted, 56, keep_full_image=False)
    assert padded.shape == cropped.shape == (1, 3, 56, 56)
    assert float(padded[0, 0].max()) > 100  # red survives
    assert float(cropped[0, 0].max()) < 1  # the crop kept only the middle 50 px: the prompt is gone
    # padding is centred and uses the fill colour
    fill = vp.to_classifier_input(torch.zeros((1, 3, 10, 40)), 40, True, fill=(10.0, 20.0, 30.0))
    assert fill[0, :, 0, 20].tolist() == pytest.approx([10.0, 20.0, 30.0], abs=0.5)
    assert fill[0, :, 20, 20].tolist() == pytest.approx([0.0, 0.0, 0.0], abs=0.5)
