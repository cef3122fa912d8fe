"""Dense CLIP: the plain MaskCLIP reading of CLIP's last block, the speed floor of ovseg_ros.

Zhou, Loy and Dai, "Extract Free Dense Labels from CLIP", ECCV 2022 (arXiv 2112.01071),
https://github.com/chongzhou96/MaskCLIP. The last ViT block's attention is replaced by the identity
(each patch keeps its own value embedding, then the output projection, ``ln_post`` and ``proj``), giving
one CLIP embedding per patch that is compared with template-averaged text embeddings.

Our port differs from MaskCLIP in that: it runs on any open_clip ViT; positional embeddings are
interpolated so a whole frame goes through in one pass (sliding windows are optional); it has no key
smoothing or prompt denoising (the seed methods build their own refinements on top of this base);
probabilities are upsampled in class chunks so large vocabularies fit in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from .. import clip_vit
from ..geometry import (
    image_to_tensor,
    normalize,
    resize,
    short_side_size,
    slide_inference,
    upsample_max,
    upsample_max_topk,
)
from ..models import ClipModel, ModelSpec, load_clip, sync_free
from ..segmenter import (
    Segmenter,
    SegmentationResult,
    StageTimer,
    VocabularyState,
    check_image,
    register_segmenter,
    to_host,
)
from ..segmenter import POSITIVE, SIDE, UNIT, OneOf, Range, declare_constraints
from ..text import (
    DEFAULT_TEXT_CACHE_MB, PHOTO_TEMPLATE, TextEncoder, format_prompts, imagenet_templates, text_cache_bytes,
)
from ..vocabulary import UNLABELED, Vocabulary

if TYPE_CHECKING:
    from ..deploy import ImageGraph


@dataclass(frozen=True)
class DenseClipConfig:
    """Options of the dense CLIP segmenter (presets in ``presets/dense_clip``)."""

    model: ModelSpec = field(default_factory=ModelSpec)
    #: Resize so the short side is this many pixels before the ViT (0 keeps the input size).
    short_side: int = 448
    #: Cap on the long side after resizing (0 = no cap).
    max_long_side: int = 1344
    #: Sliding-window crop size; 0 runs the whole frame in one pass with interpolated positions.
    window: int = 0
    window_stride: int = 112
    window_batch: int = 16
    #: ``imagenet80`` (the 80 OpenAI templates averaged) or ``photo`` (one template, faster to encode).
    templates: str = "imagenet80"
    #: Words whose pixels are left unlabeled (e.g. "background", "sky" when sky is not a class).
    background: tuple[str, ...] = ()
    #: Softmax temperature on cosine scores.
    logit_scale: float = 50.0
    #: Pixels whose best class probability is below this are left unlabeled.
    prob_threshold: float = 0.0
    #: Upsample only each pixel's candidate classes (the top-k of its low-resolution neighbours, checked
    #: against a bound, :func:`upsample_max_topk`): cost flat in vocabulary size, labels equal up to ties.
    fast_upsample: bool = False
    #: ``torch.compile`` the ViT's residual blocks (:func:`clip_vit.compile_blocks`): the first frame of each
    #: input size compiles (seconds), later ones run fused kernels; outputs equal up to float rounding.
    compile_blocks: bool = False


declare_constraints(
    DenseClipConfig,
    short_side=SIDE, max_long_side=SIDE, window=SIDE, window_stride=Range(1, 16384), window_batch=Range(1, 4096),
    templates=OneOf(("imagenet80", "photo")), logit_scale=POSITIVE, prob_threshold=UNIT,
)


@dataclass(frozen=True)
class DenseClipState(VocabularyState):
    text: torch.Tensor = None  # type: ignore[assignment]  # (Q, E) one row per class name
    owner: torch.Tensor = None  # type: ignore[assignment]  # (Q,) class index of each row
    background: Optional[torch.Tensor] = None  # (G, E) background words
    prompts: tuple[tuple[str, ...], ...] = ()


class _DenseFeatures(torch.nn.Module):
    """The exported graph: normalised images (B, 3, H, W) -> MaskCLIP patch embeddings (B, E, h, w)."""

    def __init__(self, visual: torch.nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return clip_vit.dense_features(self.visual, images)[0]


@register_segmenter("dense_clip")
class DenseClipSegmenter(Segmenter):
    """MaskCLIP-style dense CLIP. See the module docstring."""

    config_cls = DenseClipConfig

    def __init__(self, config: DenseClipConfig, clip: ClipModel, text_encoder: TextEncoder) -> None:
        super().__init__(config, clip.device)
        self.clip = clip
        self.text_encoder = text_encoder
        if config.compile_blocks:
            clip_vit.compile_blocks(clip.visual)

    @classmethod
    def from_config(
        cls, config: DenseClipConfig, device: str | torch.device = "cpu", cache_dir: str = "", offline: bool = True,
        text_cache_mb: float = DEFAULT_TEXT_CACHE_MB,
    ) -> "DenseClipSegmenter":
        clip = load_clip(config.model, device, cache_dir=cache_dir or None, offline=offline)
        return cls(config, clip, TextEncoder(clip, cache_dir, max_memory_bytes=text_cache_bytes(text_cache_mb)))

    # --- text ---------------------------------------------------------------------------------------
    def _templates(self) -> tuple[str, ...]:
        if self.config.templates == "imagenet80":
            return imagenet_templates()
        if self.config.templates == "photo":
            return (PHOTO_TEMPLATE,)
        raise ValueError(f"templates must be 'imagenet80' or 'photo', got {self.config.templates!r}")

    def encode_vocabulary(self, vocabulary: Vocabulary) -> DenseClipState:
        templates = self._templates()
        names, owner = vocabulary.query_names()
        text = self.text_encoder.encode_templated(names, templates)
        bg = self.text_encoder.encode_templated(list(self.config.background), templates) if self.config.background else None
        prompts = tuple(
            tuple(p for n in c.names for p in format_prompts(n, templates)) for c in vocabulary.classes
        )
        return DenseClipState(
            vocabulary=vocabulary,
            text=text,
            owner=torch.tensor(owner, dtype=torch.long, device=text.device),
            background=bg,
            prompts=prompts,
        )

    def describe_prompts(self, state: VocabularyState) -> list[list[str]]:
        return [list(p) for p in getattr(state, "prompts", ())] or super().describe_prompts(state)

    # --- image --------------------------------------------------------------------------------------
    def _prepare(self, image: np.ndarray) -> torch.Tensor:
        x = image_to_tensor(image, self.device)
        h, w = image.shape[:2]
        if self.config.short_side > 0:
            x = resize(x, short_side_size(h, w, self.config.short_side, self.config.max_long_side))
        mean, std = self.clip.pixel_stats()
        return normalize(x, mean, std).to(self.clip.dtype)

    def _scores(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """(1, R, h', w') cosine scores of image ``x`` against text ``rows`` at the ViT's input resolution."""
        def run(crops: torch.Tensor) -> torch.Tensor:
            return resize(clip_vit.class_scores(self._features(crops), rows), crops.shape[-2:])

        cfg = self.config
        if cfg.window > 0:
            return slide_inference(x, run, cfg.window, cfg.window_stride, rows.shape[0], cfg.window_batch)
        return clip_vit.class_scores(self._features(x), rows)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, E, h, w) float32 normalised patch embeddings: the torch ViT or its exported graph."""
        if self.image_encoder is not None:
            return self.image_encoder(x)[0]
        return clip_vit.dense_features(self.clip.visual, x)[0].float()

    def image_graph(self) -> "ImageGraph":
        """The MaskCLIP ViT (images -> dense features): everything vocabulary-independent."""
        from ..deploy import ImageGraph

        cfg = self.config

        def input_size(h: int, w: int) -> tuple[int, int]:
            if cfg.window > 0:
                return cfg.window, cfg.window
            return short_side_size(h, w, cfg.short_side, cfg.max_long_side) if cfg.short_side > 0 else (h, w)

        # Sliding windows: window_batch crops per call, frame by frame; whole frames: one per camera, batched.
        return ImageGraph(_DenseFeatures(self.clip.visual), ("features",), {"head": "maskclip"}, input_size,
                          clip_vit.patch_size(self.clip.visual), batch=cfg.window_batch if cfg.window > 0 else 1,
                          batches_frames=cfg.window <= 0)

    @torch.inference_mode()
    def segment(self, image: np.ndarray, state: Optional[VocabularyState] = None) -> SegmentationResult:
        return self.segment_batch([image], state)[0]

    @torch.inference_mode()
    def segment_batch(self, images: list[np.ndarray], state: Optional[VocabularyState] = None) -> list[SegmentationResult]:
        """Several frames (e.g. one per camera): one backbone pass for all frames that share a size.

        Sliding-window presets run frame by frame (their windows are already batched).
        """
        st: DenseClipState = self._resolve_state(state)  # type: ignore[assignment]
        images = [check_image(im) for im in images]
        timer = StageTimer(self.device)
        with timer.stage("preprocess"):
            xs = [self._prepare(im) for im in images]
            rows = st.text.to(self.device)
            if st.background is not None:
                rows = torch.cat([rows, st.background.to(self.device)])
        scores: list[Optional[torch.Tensor]] = [None] * len(images)
        with timer.stage("backbone"):
            groups: dict[tuple[int, ...], list[int]] = {}
            for i, x in enumerate(xs):
                groups.setdefault(tuple(x.shape) if self.config.window == 0 else (i,), []).append(i)
            for members in groups.values():
                batch = self._scores(torch.cat([xs[i] for i in members]), rows)  # (B, Q [+ G], h, w)
                for j, i in enumerate(members):
                    scores[i] = batch[j]
        results = []
        for image, s in zip(images, scores):
            frame_timer = StageTimer(self.device)
            frame_timer.times = {k: v / len(images) for k, v in timer.times.items()}
            results.append(self._classify(s, st, image.shape[:2], frame_timer))
        return results

    def _classify(self, scores: torch.Tensor, st: DenseClipState, size: tuple[int, int],
                  timer: StageTimer) -> SegmentationResult:
        """(Q [+ G], h, w) cosine scores of one frame -> labels and confidence at ``size``."""
        k = len(st.vocabulary)
        with timer.stage("classify"):
            probs = torch.softmax(self.config.logit_scale * scores, dim=0)
            names = probs[: st.text.shape[0]]
            per_class = clip_vit.max_over_names(names[None], st.owner.to(self.device), k)[0]
            if st.background is not None:
                per_class = torch.cat([per_class, probs[st.text.shape[0]:].max(dim=0, keepdim=True).values])
            # The candidate shortcut reads data-dependent shapes: a host sync per frame on a GPU, where the
            # full upsampling is cheap anyway.
            fast = self.config.fast_upsample and not sync_free(self.device)
            conf, idx = (upsample_max_topk if fast else upsample_max)(per_class, size)
            labels = torch.where(idx >= k, UNLABELED, idx.to(torch.int32))  # a background word won
            if self.config.prob_threshold > 0:
                labels = torch.where(conf < self.config.prob_threshold, UNLABELED, labels)
            labels_np, conf_np = to_host(labels, conf.clamp(0, 1))
        return SegmentationResult(labels_np, conf_np, st.vocabulary, timings=timer.times)

    @torch.inference_mode()
    def backbone_forward(self, image: np.ndarray) -> None:
        clip_vit.bare_forward(self.clip.visual, self._prepare(check_image(image)))

    def to(self, device: torch.device | str) -> "DenseClipSegmenter":
        super().to(device)
        self.clip.to(device)
        return self
