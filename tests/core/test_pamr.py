"""PAMR: affinities, invariants, equality with a direct (stacked-neighbour) reference, and edge snapping."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ovseg_ros.core.pamr import PAMR, neighbour_offsets, pamr, pamr_affinity


def _reference_pamr(image: torch.Tensor, mask: torch.Tensor, steps: int, dilations: tuple[int, ...]) -> torch.Tensor:
    """The published formulation, written the direct way: stack every neighbour with one-hot convolutions."""

    def stack(x: torch.Tensor, with_centre: bool) -> torch.Tensor:
        b, c, h, w = x.shape
        cells = [(i, j) for i in range(3) for j in range(3) if with_centre or (i, j) != (1, 1)]
        kernel = torch.zeros(len(cells), 1, 3, 3, dtype=x.dtype)
        for n, (i, j) in enumerate(cells):
            kernel[n, 0, i, j] = 1.0
        flat = x.reshape(b * c, 1, h, w)
        out = [F.conv2d(F.pad(flat, [d] * 4, mode="replicate"), kernel, dilation=d) for d in dilations]
        return torch.cat(out, 1).reshape(b, c, -1, h, w)

    std = stack(image, True).std(dim=2, keepdim=True)
    diff = (image.unsqueeze(2) - stack(image, False)).abs()
    aff = torch.softmax((-diff / (1e-8 + 0.1 * std)).mean(dim=1, keepdim=True), dim=2)
    for _ in range(steps):
        mask = (stack(mask, False) * aff).sum(dim=2)
    return mask


def test_offsets_are_eight_per_dilation_without_centre() -> None:
    offs = neighbour_offsets((8, 16))
    assert len(offs) == 16
    assert all((dy, dx) != (0, 0) for _, dy, dx in offs)
    assert {(dy, dx) for d, dy, dx in offs if d == 16} == {(a * 16, b * 16) for a in (-1, 0, 1) for b in (-1, 0, 1)} - {(0, 0)}
    with pytest.raises(ValueError):
        neighbour_offsets((0,))


def test_affinity_is_a_distribution_over_neighbours() -> None:
    image = torch.rand(2, 3, 20, 24)
    aff = pamr_affinity(image, (1, 3))
    assert aff.shape == (2, 16, 20, 24)
    torch.testing.assert_close(aff.sum(dim=1), torch.ones(2, 20, 24))
    assert (aff >= 0).all()


def test_matches_reference_formulation() -> None:
    torch.manual_seed(0)
    image = torch.rand(1, 3, 23, 31)
    mask = torch.randn(1, 5, 23, 31)
    for dilations in ((1,), (2, 4), (8, 16)):
        torch.testing.assert_close(pamr(image, mask, 4, dilations), _reference_pamr(image, mask, 4, dilations),
                                   rtol=1e-4, atol=1e-5)


def test_constant_scores_stay_constant_and_zero_steps_is_identity() -> None:
    image = torch.rand(1, 3, 16, 16)
    mask = torch.full((1, 2, 16, 16), 0.3)
    torch.testing.assert_close(pamr(image, mask, 10, (1, 2)), mask)
    other = torch.randn(1, 2, 16, 16)
    assert pamr(image, other, 0) is other


def test_scores_snap_to_image_edges() -> None:
    # Image edge at x = 64; the score boundary is 6 px too far right. PAMR moves it onto the edge.
    h, w = 48, 128
    image = torch.zeros(1, 3, h, w)
    image[..., 64:] = 1.0
    image += 0.01 * torch.randn_like(image)
    left = torch.zeros(1, 1, h, w)
    left[..., :70] = 1.0
    scores = torch.cat([left, 1 - left], dim=1)
    out = PAMR(10, (8, 16))(image, scores)
    labels = out.argmax(dim=1)[0]
    assert (labels[:, 8:62] == 0).all()  # left region kept
    assert (labels[:, 64:70] == 1).all()  # the wrongly-left strip joined the right region
    assert (labels[:, 72:] == 1).all()


def test_resizes_low_resolution_scores() -> None:
    out = pamr(torch.rand(1, 3, 32, 40), torch.randn(1, 3, 8, 10), 2, (1, 2))
    assert out.shape == (1, 3, 32, 40) and out.dtype == torch.float32


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu() -> None:
    image, mask = torch.rand(1, 3, 40, 50), torch.randn(1, 4, 40, 50)
    cpu = pamr(image, mask, 10, (8, 16))
    gpu = pamr(image.cuda(), mask.cuda(), 10, (8, 16)).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-4)
