"""FC-CLIP: one frozen convolutional CLIP + a Mask2Former head with a text-embedding classifier.

Yu, Yu, Zhou, Yuan, Chen, "Convolutions Die Hard: Open-Vocabulary Segmentation with Single Frozen
Convolutional CLIP", NeurIPS 2023 (arXiv 2308.02487), https://github.com/bytedance/fc-clip (checked
against commit 2b0bbe2). Built on Mask2Former (Cheng et al., CVPR 2022, arXiv 2112.01527,
https://github.com/facebookresearch/Mask2Former) and Deformable DETR's attention (arXiv 2010.04159).

This is our own pure-PyTorch implementation (no detectron2, no compiled ops). The module tree uses our
names; :mod:`.convert` maps the authors' checkpoint names onto it. Deliberate differences from the
authors' inference code (the numbers are the same unless stated):

1. Only the last decoder layer's class logits are computed (the intermediate ones feed training losses).
2. The out-of-vocabulary void column is not computed (the authors compute it and drop it).
3. The geometric ensemble is evaluated in log space, ``(1-a) log p_in + a log p_out``; the authors'
   ``(p_in^(1-a) p_out^a).log()`` underflows to -inf (and NaN after their seen/unseen masking) on extreme
   probabilities; elsewhere the two agree to rounding.
4. The final probabilities are used directly; the authors take ``log(p + 1e-8)`` and soft-max it again
   before post-processing, which changes each probability by at most ~1e-8 relative.
5. "Seen" classes are decided against our own COCO-panoptic synonym table (:mod:`.coco_panoptic`),
   case/hyphen-insensitively, for any runtime vocabulary; the authors match exact strings of their label
   files, fixed per dataset (``seen_rule: authors`` does that; set in the paper presets).
6. The input is resized on the device with antialiased bilinear interpolation of float pixels, rounded to
   integers (the authors resize the uint8 image with PIL's bilinear filter); values differ by +-1 grey level
   at some pixels. ``resize: pil`` (the paper presets) resizes with PIL as theirs.
7. Mask upsampling (to the padded input, crop, resize to the original image) is applied as two separable
   linear maps band by band in :mod:`.postprocess`, which equals the authors' two ``F.interpolate`` calls
   up to float rounding but never holds all Q full-resolution masks in memory.
8. The compiled MSDeformAttn CUDA op is optional: used on CUDA if ``MultiScaleDeformableAttention`` is
   importable, else ``F.grid_sample`` (the authors' CPU fallback, summed level by level).
9. The CLIP backbone may run in fp16 on CUDA (``model.precision``); the pixel decoder, decoder and
   post-processing always run in fp32, as in the authors' code.
10. Panoptic segments carry a score (the query's class probability, area-weighted over merged stuff
    queries) and a bounding box; the authors' ``segments_info`` has neither.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, ContextManager, Optional

import torch
from torch import nn

from .backbone import ConvNeXtCLIPBackbone
from .config import FCCLIPArch
from .decoder import MaskedAttentionDecoder, text_logits
from .ensemble import geometric_ensemble
from .pixel_decoder import MSDeformPixelDecoder


@dataclass
class FCCLIPOutput:
    """Per-query predictions at the mask-feature stride (4) of the padded input.

    Attributes:
        mask_logits: (B, Q, Hp/4, Wp/4) float32.
        class_probs: (B, Q, K + 1) float32 ensemble probabilities, void last, rows summing to 1.
    """

    mask_logits: torch.Tensor
    class_probs: torch.Tensor


class FCCLIPModel(nn.Module):
    """The whole network. ``clip`` is an open_clip CLIP with a ConvNeXt visual trunk (frozen)."""

    def __init__(self, clip: nn.Module, arch: FCCLIPArch = FCCLIPArch()) -> None:
        super().__init__()
        arch.validate()
        self.arch = arch
        self.backbone = ConvNeXtCLIPBackbone(clip)
        self.pixel_decoder = MSDeformPixelDecoder(
            self.backbone.channels, arch.hidden_dim, arch.mask_dim, arch.enc_layers, arch.enc_heads,
            arch.enc_points, arch.enc_ffn_dim, arch.gn_groups, arch.deform_kernel,
        )
        self.decoder = MaskedAttentionDecoder(
            arch.hidden_dim, arch.mask_dim, arch.num_queries, arch.dec_layers, arch.dec_heads, arch.dec_ffn_dim,
            self.backbone.embed_dim,
        )
        self.void_embedding = nn.Embedding(1, self.backbone.embed_dim)

    def head_parameters(self) -> dict[str, torch.Tensor]:
        """The trained (non-CLIP) tensors, by our names."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def forward(
        self,
        images: torch.Tensor,
        text: torch.Tensor,
        owner: torch.Tensor,
        seen: torch.Tensor,
        alpha: float = 0.4,
        beta: float = 0.8,
        ensemble_on_valid_mask: bool = False,
        timer: Optional[Any] = None,
    ) -> FCCLIPOutput:
        """Normalised, padded (B, 3, Hp, Wp) images -> per-query masks and ensemble class probabilities.

        ``text`` (T, D) normalised name embeddings, ``owner`` (T,) their class ids, ``seen`` (K,) bool.
        ``timer``: optional object with ``stage(name)`` context managers (see ``segmenter.StageTimer``).
        """

        def stage(name: str) -> ContextManager[None]:
            return timer.stage(name) if timer is not None else nullcontext()

        with stage("backbone"):
            feats, dense = self.backbone(images)
        with stage("pixel_decoder"):
            mask_features, levels = self.pixel_decoder(feats)
        with stage("decoder"):
            image = self.image_outputs(dense, mask_features, levels)
        with stage("classify"):
            probs = self.classify(image, text, owner, seen, alpha, beta, ensemble_on_valid_mask)
        return FCCLIPOutput(image.masks, probs)

    def image_forward(self, images: torch.Tensor) -> "FCCLIPImageOutput":
        """Everything vocabulary-independent (backbone, pixel decoder, decoder, mask pooling): the exported part."""
        feats, dense = self.backbone(images)
        mask_features, levels = self.pixel_decoder(feats)
        return self.image_outputs(dense, mask_features, levels)

    def image_outputs(self, dense: torch.Tensor, mask_features: torch.Tensor,
                      levels: list[torch.Tensor]) -> "FCCLIPImageOutput":
        masks, emb = self.decoder.decode(mask_features, levels)
        clip_emb = self.backbone.classify_masks(dense, masks)
        small = nn.functional.interpolate(masks, size=dense.shape[-2:], mode="bilinear", align_corners=False)
        valid = (small > 0).flatten(2).any(-1)
        return FCCLIPImageOutput(masks, emb, clip_emb.float(), valid)

    def classify(self, image: "FCCLIPImageOutput", text: torch.Tensor, owner: torch.Tensor, seen: torch.Tensor,
                 alpha: float = 0.4, beta: float = 0.8, ensemble_on_valid_mask: bool = False) -> torch.Tensor:
        """The text side: in- and out-of-vocabulary logits and their geometric ensemble (B, Q, K + 1)."""
        k = int(seen.shape[0])
        in_logits = self.decoder.classify(image.class_embeddings, text.float(), owner, k,
                                          self.void_embedding.weight.float())
        out_logits = text_logits(image.clip_embeddings.float(), text.float(), owner, k,
                                 self.backbone.logit_scale.float())
        valid = image.valid.bool() if ensemble_on_valid_mask else None
        return geometric_ensemble(in_logits, out_logits, seen, alpha, beta, valid)


@dataclass
class FCCLIPImageOutput:
    """The vocabulary-independent outputs of one forward (what the ONNX graph returns).

    Attributes:
        masks: (B, Q, Hp/4, Wp/4) mask logits. class_embeddings: (B, Q, D) the decoder's class head output.
        clip_embeddings: (B, Q, D) frozen CLIP's embedding of each mask. valid: (B, Q) mask non-empty at CLIP's
            resolution (the authors' ENSEMBLE_ON_VALID_MASK).
    """

    masks: torch.Tensor
    class_embeddings: torch.Tensor
    clip_embeddings: torch.Tensor
    valid: torch.Tensor
