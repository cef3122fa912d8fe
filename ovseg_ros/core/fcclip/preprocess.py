"""FC-CLIP's test-time input geometry: shortest-edge resize with a long-side cap, normalise, pad to 32.

The authors use detectron2's ``ResizeShortestEdge(800, 1333)`` (1024/2560 for Cityscapes and Mapillary),
CLIP's mean/std on 0..255 pixels, and ``ImageList`` zero padding (after normalisation) to a multiple of 32.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..geometry import image_to_device
from ..models import upload


def shortest_edge_size(h: int, w: int, min_size: int, max_size: int) -> tuple[int, int]:
    """(new_h, new_w): short side to ``min_size``, then everything scaled down if the long side exceeds
    ``max_size``, rounded half up (detectron2's rule). ``min_size <= 0`` keeps the input size."""
    if min_size <= 0:
        return h, w
    scale = min_size / min(h, w)
    new_h, new_w = (float(min_size), scale * w) if h < w else (scale * h, float(min_size))
    if max_size > 0 and max(new_h, new_w) > max_size:
        shrink = max_size / max(new_h, new_w)
        new_h, new_w = new_h * shrink, new_w * shrink
    return int(new_h + 0.5), int(new_w + 0.5)


def prepare_image(
    image: np.ndarray,
    device: torch.device,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    min_size: int,
    max_size: int,
    divisibility: int = 32,
    resize: str = "device",
) -> tuple[torch.Tensor, tuple[int, int]]:
    """(H, W, 3) uint8 RGB -> ((1, 3, Hp, Wp) float32 normalised and zero-padded, (h, w) before padding).

    ``mean``/``std`` are CLIP's statistics for 0..1 pixels. The resize is bilinear with antialiasing on
    the device (the authors resize the uint8 image with PIL's bilinear filter, which also antialiases);
    ``resize='pil'`` does exactly what detectron2's ``ResizeTransform`` does to a uint8 image.
    """
    if resize not in ("device", "pil"):
        raise ValueError(f"resize must be 'device' or 'pil', got {resize!r}")
    h, w = image.shape[:2]
    if resize == "pil" and shortest_edge_size(h, w, min_size, max_size) != (h, w):
        from PIL import Image

        nh, nw = shortest_edge_size(h, w, min_size, max_size)
        image = np.array(Image.fromarray(np.ascontiguousarray(image)).resize((nw, nh), Image.BILINEAR))
        h, w = nh, nw
    x = image_to_device(image, device)
    x = x.permute(2, 0, 1).unsqueeze(0).float()
    new_h, new_w = shortest_edge_size(h, w, min_size, max_size)
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False,
                          antialias=new_h < h or new_w < w)
        x = x.round_().clamp_(0, 255)  # the authors resize uint8 pixels: keep their quantisation
    m = upload(mean, device, torch.float32).view(1, 3, 1, 1) * 255.0
    s = upload(std, device, torch.float32).view(1, 3, 1, 1) * 255.0
    x = (x - m) / s
    if divisibility > 1:
        ph, pw = (-new_h) % divisibility, (-new_w) % divisibility
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), value=0.0)
    return x, (new_h, new_w)
