"""CLIP-ES: softmax Grad-CAM + class-aware attention affinity (+ dense CRF) as an open-vocabulary segmenter.

Lin, Chen, Zhou, Zhang, Gao, Tan and He, "CLIP is Also an Efficient Segmenter: A Text-Driven Approach for
Weakly Supervised Semantic Segmentation", CVPR 2023 (arXiv 2212.09506); authors' code
https://github.com/linyq2117/CLIP-ES. Our own implementation on open_clip; the stage-1 machinery lives
in :mod:`ovseg_ros.core.cam` (shared with CaR) and the CRF in :mod:`ovseg_ros.core.crf`.

Per frame: one ViT pass (:meth:`ClipCam.encode`), image-level softmax over vocabulary ∪ background
words to decide which classes are present (or the caller's tags), one batched last-block re-run with
gradients for all present classes (softmax Grad-CAM), CAA refinement with the box mask, background score
``(1 - max_c cam)^α``, optional dense CRF, argmax. Labels are vocabulary ids, UNLABELED where the
background wins (or the winning score is below ``prob_threshold``).

On a GPU (``models.sync_free``) :meth:`ClipEsSegmenter.segment` never waits on the host before the label copy:
presence is a mask over ``max(max_present, min_present)`` fixed slots, absent slots leave the Grad-CAM softmax
and the labels, and the CAA box mask runs on the device (:func:`~ovseg_ros.core.cam.box_mask`); the same numbers
as the CPU's list of present classes (tests/core/test_host_sync.py). With ``crf`` on, or given tags, the list path
runs (the CRF reads once per call, see :mod:`ovseg_ros.core.crf`).

Deliberate differences from the authors' code (``docs/methods/clip_es.md`` has the table). Each one that
changes numbers has a switch, set to the authors' value in the paper presets (voc, coco): ``resize``
(``pil``: their PIL bicubic; the default), ``cam_eps`` (1e-7, applied twice as their pytorch-grad-cam),
``clip_box_edges`` (true: box ends clipped to size - 1), ``crf_image`` (``authors``: BGR minus mean cast to
uint8), ``drop_background_overlaps`` (false), ``present`` tags given by the caller (their ground-truth tags;
otherwise decided per frame), ``short_side: 0`` (original size), ``synonyms: join``. Without a switch because
the numbers do not change: batched Grad-CAM via ``torch.autograd.grad``, Sinkhorn once per image and
``S·(S·(B⊙cam))``, no discarded flipped copy. Not reproduced: fp16 positional embeddings on CPU, the
77-token quirk, pydensecrf (ours: :mod:`ovseg_ros.core.crf`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import clip_vit
from ..cam import (
    CLIP_ES_EPS,
    RESIZE_MODES,
    VOC_BACKGROUND,
    ClipCam,
    ImageEncoding,
    authors_crf_image,
    prepare_image,
    refine_with_affinity,
)
from ..crf import dense_crf_capped
from ..geometry import resize
from ..models import ClipModel, ModelSpec, load_clip, sync_free
from ..segmenter import (
    QueryResult,
    Segmenter,
    SegmentationResult,
    StageTimer,
    VocabularyState,
    check_image,
    register_segmenter,
    to_host,
)
from ..segmenter import POSITIVE, SIDE, UNIT, OneOf, Range, Template, declare_constraints
from ..text import ORIGAMI_TEMPLATE, DEFAULT_TEXT_CACHE_MB, TextEncoder, text_cache_bytes
from ..vocabulary import UNLABELED, Vocabulary, background_without_classes, vocabulary_from_texts

if TYPE_CHECKING:
    from ..deploy import ImageGraph


@dataclass(frozen=True)
class ClipEsConfig:
    """Options of CLIP-ES (presets in ``presets/clip_es``; defaults are the authors' VOC values)."""

    model: ModelSpec = field(default_factory=ModelSpec)
    #: Resize so the short side is this many pixels (0 keeps the input size, as the authors).
    short_side: int = 0
    #: Cap on the long side (0 = none). H and W are then rounded up to patch multiples.
    max_long_side: int = 0
    #: Input resampling: ``pil`` = the authors' PIL bicubic on the uint8 image; ``torch`` = torch bicubic.
    resize: str = "pil"
    #: Prompt template for classes and background words.
    template: str = ORIGAMI_TEMPLATE
    #: ``join``: one prompt per class with its names comma-joined (authors); ``mean``: average per name.
    synonyms: str = "join"
    #: Background words added to every softmax (VOC list: 25 words; COCO: 23).
    background: tuple[str, ...] = VOC_BACKGROUND
    #: Drop background words equal to a vocabulary name or synonym (ours; the authors keep every word).
    drop_background_overlaps: bool = True
    #: Softmax temperature (pretrained CLIP's exp(logit_scale) = 100).
    logit_scale: float = 100.0
    #: Blocks whose attention the affinity averages, Sinkhorn rounds, and the power t of S.
    attn_layers: int = 8
    sinkhorn_rounds: int = 3
    affinity_power: int = 2
    #: CAA on/off, and the CAM threshold λ of the box mask (VOC 0.4, COCO 0.7).
    use_affinity: bool = True
    box_threshold: float = 0.4
    #: Reproduce the authors' box clipping at the right/bottom edge.
    clip_box_edges: bool = False
    #: Min-max epsilon of the CAM normalisation (the authors' pytorch-grad-cam: 1e-7).
    cam_eps: float = CLIP_ES_EPS
    #: CaR's rule: redo an all-zero CAM without the background words.
    retry_without_background: bool = False
    #: Classes per batched last-block forward/backward (memory vs. speed), and how the batch is formed:
    #: ``replicate`` (activation copied per class) or ``vmap`` (one forward, vmapped backward).
    max_batch: int = 8
    grad_mode: str = "replicate"
    #: Per-frame presence: image-level probability threshold, the cap, and the minimum kept (top ones).
    presence_threshold: float = 0.1
    max_present: int = 8
    min_present: int = 1
    #: Background score exponent α in (1 - max cam)^α (the CRF script uses 1).
    bg_power: float = 1.0
    #: Dense CRF (authors' parameters) and an optional cap on the long side it runs at (0 = full size).
    crf: bool = True
    crf_iterations: int = 10
    crf_gaussian_sxy: float = 1.0
    crf_gaussian_compat: float = 3.0
    crf_bilateral_sxy: float = 67.0
    crf_bilateral_srgb: float = 3.0
    crf_bilateral_compat: float = 4.0
    crf_max_side: int = 0
    #: Image the CRF's bilateral kernel sees: ``rgb`` (ours) or ``authors`` (BGR minus the mean, cast to
    #: uint8 with wrap-around, as ``eval_cam_with_crf.py``).
    crf_image: str = "rgb"
    #: ``segment``: pixels whose winning score is below this are UNLABELED.
    prob_threshold: float = 0.0
    #: Pseudo-label export: pixels whose winning score is below this become 255 (ignore), as the authors.
    ignore_below: float = 0.95


declare_constraints(
    ClipEsConfig,
    short_side=SIDE, max_long_side=SIDE, synonyms=OneOf(("join", "mean")), logit_scale=POSITIVE,
    attn_layers=Range(1, 1000), sinkhorn_rounds=Range(0, 100), affinity_power=Range(1, 16), box_threshold=UNIT,
    max_batch=Range(1, 4096), grad_mode=OneOf(("replicate", "vmap")), presence_threshold=UNIT,
    max_present=Range(1, 100_000), min_present=Range(0, 100_000), bg_power=Range(0, 100),
    crf_iterations=Range(0, 100), crf_gaussian_sxy=POSITIVE, crf_bilateral_sxy=POSITIVE, crf_bilateral_srgb=POSITIVE,
    crf_max_side=SIDE, prob_threshold=UNIT, ignore_below=UNIT, template=Template(),
)


@dataclass(frozen=True)
class ClipEsState(VocabularyState):
    text: torch.Tensor = None  # type: ignore[assignment]  # (K, E) one normalised embedding per class
    background: Optional[torch.Tensor] = None  # (G, E) background words, or None
    background_words: tuple[str, ...] = ()
    prompts: tuple[tuple[str, ...], ...] = ()


@dataclass
class ClipEsMaps:
    """What one frame produced before labelling (for tools that need more than labels)."""

    present: list[int]  # vocabulary ids, in the order of ``probs[1:]`` (empty when ``row_ids`` holds them)
    image_probs: torch.Tensor  # (K,) image-level probabilities of the vocabulary classes
    probs: torch.Tensor  # (1 + P, H, W) background first, then the present classes (CRF marginals if on)
    #: The sync-free path (``segment`` on a GPU): (P,) int32 vocabulary ids of ``probs[1:]`` on the device,
    #: UNLABELED for slots not present (their rows in ``probs`` are -1, so they never win).
    row_ids: Optional[torch.Tensor] = None


@register_segmenter("clip_es")
class ClipEsSegmenter(Segmenter):
    """CLIP-ES. See the module docstring."""

    config_cls = ClipEsConfig

    def __init__(self, config: ClipEsConfig, clip: ClipModel, text_encoder: TextEncoder) -> None:
        super().__init__(config, clip.device)
        if config.synonyms not in ("join", "mean"):
            raise ValueError(f"synonyms must be 'join' or 'mean', got {config.synonyms!r}")
        if config.resize not in RESIZE_MODES:
            raise ValueError(f"clip_es: resize must be one of {RESIZE_MODES}, got {config.resize!r}")
        if config.crf_image not in ("rgb", "authors"):
            raise ValueError(f"clip_es: crf_image must be 'rgb' or 'authors', got {config.crf_image!r}")
        self.clip = clip
        self.text_encoder = text_encoder
        self.cam = ClipCam(
            clip,
            logit_scale=config.logit_scale,
            attn_layers=config.attn_layers,
            sinkhorn_rounds=config.sinkhorn_rounds,
            pos_mode="bilinear",
            max_batch=config.max_batch,
            grad_mode=config.grad_mode,
            eps=config.cam_eps,
        )

    @classmethod
    def from_config(
        cls, config: ClipEsConfig, device: str | torch.device = "cpu", cache_dir: str = "", offline: bool = True,
        text_cache_mb: float = DEFAULT_TEXT_CACHE_MB,
    ) -> "ClipEsSegmenter":
        clip = load_clip(config.model, device, cache_dir=cache_dir or None, offline=offline)
        return cls(config, clip, TextEncoder(clip, cache_dir, max_memory_bytes=text_cache_bytes(text_cache_mb)))

    # --- text ---------------------------------------------------------------------------------------
    def _class_prompts(self, names: Sequence[str]) -> tuple[str, ...]:
        tpl = self.config.template
        if self.config.synonyms == "join":
            return (tpl.format(",".join(names)),)
        return tuple(tpl.format(n) for n in names)

    def encode_vocabulary(self, vocabulary: Vocabulary) -> ClipEsState:
        prompts = tuple(self._class_prompts(c.names) for c in vocabulary.classes)
        text = torch.stack([F.normalize(self.text_encoder.encode_group(list(p)).mean(dim=0), dim=-1)
                            for p in prompts])
        words = (background_without_classes(self.config.background, vocabulary)
                 if self.config.drop_background_overlaps else tuple(self.config.background))
        bg = self.text_encoder.encode_templated(words, [self.config.template]) if words else None
        return ClipEsState(vocabulary=vocabulary, text=text, background=bg, background_words=words,
                           prompts=prompts)

    def describe_prompts(self, state: VocabularyState) -> list[list[str]]:
        return [list(p) for p in getattr(state, "prompts", ())] or super().describe_prompts(state)

    # --- image --------------------------------------------------------------------------------------
    def _prepare(self, image: np.ndarray) -> torch.Tensor:
        cfg = self.config
        return prepare_image(self.clip, image, cfg.short_side, cfg.max_long_side, resize=cfg.resize)

    def image_graph(self) -> "ImageGraph":
        """The ViT pass (blocks 1..L-1, the attention maps for the affinity, the image embedding): everything
        but the Grad-CAM, whose last-block backward per class stays in torch. One static size per file."""
        from ..cam import prepared_size
        from ..deploy import ImageGraph

        cfg = self.config
        p = clip_vit.patch_size(self.clip.visual)
        outputs = ("block_input", "attention", "embedding") if cfg.use_affinity else ("block_input", "embedding")
        return ImageGraph(self.cam.encode_graph(cfg.use_affinity), outputs,
                          {"attn_layers": cfg.attn_layers if cfg.use_affinity else 0, "pos_mode": "bilinear"},
                          lambda h, w: prepared_size(h, w, p, cfg.short_side, cfg.max_long_side), p, static=True)

    def _choose_present(self, image_probs: torch.Tensor) -> list[int]:
        cfg = self.config
        order = torch.argsort(image_probs, descending=True, stable=True).tolist()
        keep = [k for k in order if float(image_probs[k]) >= cfg.presence_threshold]
        keep = keep[: max(cfg.max_present, 0)] if cfg.max_present > 0 else keep
        if len(keep) < cfg.min_present:
            keep = order[: cfg.min_present]
        return keep

    def _present_slots(self, image_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_choose_present` on the device: (M,) vocabulary ids of the M = min(K, max(max_present,
        min_present)) most probable classes, best first, and (M,) bool, which of them are present.

        The classes at or above the threshold are a prefix of the sorted order, so "present" is a prefix of
        the slots: the first ``min(#above, max_present)``, at least ``min_present``.
        """
        cfg = self.config
        k = image_probs.shape[0]
        m = min(k, max(cfg.max_present, cfg.min_present))
        order = torch.argsort(image_probs, descending=True, stable=True)[:m]
        rank = torch.arange(m, device=image_probs.device)
        valid = ((image_probs[order] >= cfg.presence_threshold) & (rank < cfg.max_present)) | (rank < cfg.min_present)
        return order, valid

    def compute_maps(
        self,
        image: np.ndarray,
        state: Optional[VocabularyState] = None,
        present: Optional[Sequence[int]] = None,
        timer: Optional[StageTimer] = None,
        fixed_slots: bool = False,
    ) -> ClipEsMaps:
        """Everything up to the label decision: present classes and (1 + P, H, W) scores, background first.

        ``present`` (vocabulary ids) skips the per-frame presence decision, as the authors' given tags.
        ``fixed_slots`` (``segment`` in the sync-free mode, without CRF): the presence decision stays on the
        device; the maps then hold every candidate slot (``row_ids``) and nothing is read on the host.
        """
        if fixed_slots and present is None and not self.config.crf:
            return self._compute_slot_maps(image, state, timer or StageTimer(self.device))
        timer = timer or StageTimer(self.device)
        cfg = self.config
        image, enc, text, bg, image_probs = self._encode_and_classify(image, state, timer)
        k = image_probs.shape[0]
        with timer.stage("classify"):
            if present is None:
                present = self._choose_present(image_probs)
            present = [int(p) for p in present]
            if any(p < 0 or p >= k for p in present):
                raise ValueError(f"present class ids must be in 0..{k - 1}, got {present}")
        h, w = image.shape[:2]
        if not present:
            probs = torch.ones((1, h, w), device=self.device)
            return ClipEsMaps([], image_probs, probs)
        with timer.stage("gradcam"):
            # The softmax competitors are the present classes and the background words (authors).
            cams = self.cam.gradcam(enc, text[present], bg, list(range(len(present))),
                                    cfg.retry_without_background)
        if cfg.use_affinity:
            with timer.stage("affinity"):
                s = self.cam.affinity(enc)
                cams = refine_with_affinity(s, cams, cfg.box_threshold, cfg.affinity_power, cfg.clip_box_edges,
                                            eps=cfg.cam_eps)
        with timer.stage("postprocess"):
            cams = resize(cams[None].float(), (h, w))[0].clamp_(0, 1)
            bg_score = (1 - cams.max(dim=0, keepdim=True).values).pow(cfg.bg_power)
            probs = torch.cat([bg_score, cams])
        if cfg.crf:
            with timer.stage("crf"):
                probs = self._crf(image, probs)
        return ClipEsMaps(present, image_probs, probs)

    def _compute_slot_maps(self, image: np.ndarray, state: Optional[VocabularyState], timer: StageTimer) -> ClipEsMaps:
        """:meth:`compute_maps` for the sync-free mode: the same numbers, with the presence decision as a mask
        over a fixed number of slots (at most ``max_present`` CAMs, the absent slots masked out of the
        Grad-CAM softmax and of the labels), so a GPU never waits on the host until the label copy."""
        cfg = self.config
        image, enc, text, bg, image_probs = self._encode_and_classify(image, state, timer)
        with timer.stage("classify"):
            slots, valid = self._present_slots(image_probs)
        with timer.stage("gradcam"):
            cams = self.cam.gradcam(enc, text[slots], bg, list(range(slots.shape[0])),
                                    cfg.retry_without_background, text_mask=valid)
        if cfg.use_affinity:
            with timer.stage("affinity"):
                s = self.cam.affinity(enc)
                cams = refine_with_affinity(s, cams, cfg.box_threshold, cfg.affinity_power, cfg.clip_box_edges,
                                            eps=cfg.cam_eps)
        h, w = image.shape[:2]
        with timer.stage("postprocess"):
            cams = resize(cams[None].float(), (h, w))[0].clamp_(0, 1) * valid.view(-1, 1, 1)
            bg_score = (1 - cams.max(dim=0, keepdim=True).values).pow(cfg.bg_power)
            probs = torch.cat([bg_score, torch.where(valid.view(-1, 1, 1), cams, -1.0)])
        row_ids = torch.where(valid, slots.to(torch.int32), UNLABELED)
        return ClipEsMaps([], image_probs, probs, row_ids)

    def _encode_and_classify(
        self, image: np.ndarray, state: Optional[VocabularyState], timer: StageTimer
    ) -> tuple[np.ndarray, ImageEncoding, torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
        """The checked image, its CLIP encoding, the class and background text rows on the device, and the
        image-level class probabilities (K,) that both presence decisions start from."""
        st: ClipEsState = self._resolve_state(state)  # type: ignore[assignment]
        image = check_image(image)
        with timer.stage("preprocess"):
            x = self._prepare(image)
            text = st.text.to(self.device)
            bg = st.background.to(self.device) if st.background is not None else None
        with timer.stage("backbone"):
            enc = self.cam.encode(x, with_attention=self.config.use_affinity, encoder=self.image_encoder)
        with timer.stage("classify"):
            rows = text if bg is None else torch.cat([text, bg])
            image_probs = self.cam.classify(enc, rows)[: len(st.vocabulary)]
        return image, enc, text, bg, image_probs

    def _crf(self, image: np.ndarray, probs: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if cfg.crf_image == "authors":
            image = authors_crf_image(image)
        return dense_crf_capped(
            image, probs, cfg.crf_max_side, iterations=cfg.crf_iterations, gaussian_sxy=cfg.crf_gaussian_sxy,
            gaussian_compat=cfg.crf_gaussian_compat, bilateral_sxy=cfg.crf_bilateral_sxy,
            bilateral_srgb=cfg.crf_bilateral_srgb, bilateral_compat=cfg.crf_bilateral_compat,
        )

    def segment(
        self,
        image: np.ndarray,
        state: Optional[VocabularyState] = None,
        present: Optional[Sequence[int]] = None,
    ) -> SegmentationResult:
        """Segment one frame; ``present`` (vocabulary ids) are given tags, else decided per frame."""
        st = self._resolve_state(state)
        timer = StageTimer(self.device)
        with torch.no_grad():
            maps = self.compute_maps(image, st, present, timer, fixed_slots=sync_free(self.device))
            with timer.stage("labels"):
                labels, conf = self._labels(maps)
        return SegmentationResult(labels, conf, st.vocabulary, timings=timer.times)

    def _labels(self, maps: ClipEsMaps) -> tuple[np.ndarray, np.ndarray]:
        conf, idx = maps.probs.max(dim=0)
        if maps.row_ids is not None:
            unlabeled = torch.full((1,), UNLABELED, dtype=torch.int32, device=idx.device)
            lut = torch.cat([unlabeled, maps.row_ids.to(idx.device)])
        else:
            lut = torch.tensor([UNLABELED] + maps.present, dtype=torch.int32, device=idx.device)
        labels = lut[idx]
        if self.config.prob_threshold > 0:
            labels = torch.where(conf < self.config.prob_threshold, UNLABELED, labels)
        labels_np, conf_np = to_host(labels, conf.float().clamp(0, 1))
        return labels_np, conf_np

    def pseudo_label(
        self, image: np.ndarray, state: Optional[VocabularyState] = None, present: Optional[Sequence[int]] = None,
        ignore_below: Optional[float] = None,
    ) -> np.ndarray:
        """(H, W) uint8 in the VOC convention: 0 background, class id + 1, 255 where the winning score is
        below ``ignore_below`` (default: config ``ignore_below``, the authors' 0.95). At most 254 classes."""
        st = self._resolve_state(state)
        if len(st.vocabulary) > 254:
            raise ValueError("VOC-style PNG pseudo-labels hold at most 254 classes")
        with torch.no_grad():
            maps = self.compute_maps(image, st, present)
        return self.maps_to_pseudo_label(maps, self.config.ignore_below if ignore_below is None else ignore_below)

    @staticmethod
    def maps_to_pseudo_label(maps: ClipEsMaps, ignore_below: float) -> np.ndarray:
        """VOC-convention uint8 PNG values from :meth:`compute_maps`' output (see :meth:`pseudo_label`)."""
        conf, idx = maps.probs.max(dim=0)
        lut = torch.tensor([0] + [p + 1 for p in maps.present], dtype=torch.uint8, device=idx.device)
        out = lut[idx]
        out[conf < ignore_below] = 255
        return out.cpu().numpy()

    def query(self, image: np.ndarray, texts: Sequence[str]) -> QueryResult:
        """Every text is a given tag: one CLIP-ES mask each; score = its image-level probability (softmax
        over the texts and the background words)."""
        state = self.encode_vocabulary(vocabulary_from_texts(texts))
        timer = StageTimer(self.device)
        with torch.no_grad():
            maps = self.compute_maps(image, state, list(range(len(texts))), timer)
            labels, _ = self._labels(maps)
        masks = [labels == i for i in range(len(texts))]
        scores = [float(p) for p in maps.image_probs.cpu()]
        return QueryResult(list(texts), masks, scores, dict(timer.times))

    def backbone_forward(self, image: np.ndarray) -> None:
        with torch.inference_mode():
            clip_vit.bare_forward(self.clip.visual, self._prepare(check_image(image)), "bilinear")

    def to(self, device: torch.device | str) -> "ClipEsSegmenter":
        super().to(device)
        self.clip.to(device)
        return self
