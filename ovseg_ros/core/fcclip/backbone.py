"""The frozen open_clip ConvNeXt of FC-CLIP: multi-scale features and mask-pooled CLIP classification.

FC-CLIP (Yu et al., NeurIPS 2023, arXiv 2308.02487, https://github.com/bytedance/fc-clip) uses one frozen
convolutional CLIP for everything visual: the timm ConvNeXt trunk inside open_clip gives res2..res5
(strides 4..32) to the segmentation head, and its last map ("dense CLIP features", after the trunk's
``norm_pre``, an identity for ConvNeXt) is mask-pooled and sent through CLIP's own head (the trunk's
``head`` LayerNorm, then open_clip's projection MLP) to classify masks out of vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .decoder import mask_pool


class ConvNeXtCLIPBackbone(nn.Module):
    """Wraps an open_clip CLIP whose visual tower is a timm ConvNeXt (``visual.trunk.stem/stages``)."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        trunk = getattr(clip.visual, "trunk", None)
        if trunk is None or not hasattr(trunk, "stages") or not hasattr(trunk, "stem"):
            raise ValueError("FC-CLIP needs an open_clip model with a timm ConvNeXt visual trunk "
                             "(e.g. convnext_large_d_320)")
        self.clip = clip
        self.channels = [int(info["num_chs"]) for info in trunk.feature_info]
        self.embed_dim = int(clip.text_projection.shape[-1])

    @property
    def dtype(self) -> torch.dtype:
        return self.clip.visual.trunk.stem[0].weight.dtype

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Normalised (B, 3, H, W) -> ([res2, res3, res4, res5], dense CLIP map (B, C5, H/32, W/32))."""
        trunk = self.clip.visual.trunk
        x = trunk.stem(images.to(self.dtype))
        feats = []
        for stage in trunk.stages:
            x = stage(x)
            feats.append(x)
        return feats, trunk.norm_pre(x)

    def classify_masks(self, dense: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
        """CLIP embeddings (B, Q, D) of each mask: average ``dense`` under the mask binarised at the dense
        resolution (masks resized bilinearly first), then the trunk head and the projection head."""
        b, q = mask_logits.shape[:2]
        small = F.interpolate(mask_logits.float(), size=dense.shape[-2:], mode="bilinear", align_corners=False)
        pooled = mask_pool(dense, small)  # (B, Q, C5)
        x = self.clip.visual.trunk.head(pooled.reshape(b * q, -1, 1, 1))  # LayerNorm2d on a 1x1 "image"
        return self.clip.visual.head(x).view(b, q, -1)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale
