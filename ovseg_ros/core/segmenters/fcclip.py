"""FC-CLIP: open-vocabulary panoptic segmentation with one frozen convolutional CLIP (real instances).

Yu, Yu, Zhou, Yuan, Chen, "Convolutions Die Hard: Open-Vocabulary Segmentation with Single Frozen
Convolutional CLIP", NeurIPS 2023 (arXiv 2308.02487), https://github.com/bytedance/fc-clip (checked against
commit 2b0bbe2). The network, the checkpoint conversion and the post-processing live in
:mod:`ovseg_ros.core.fcclip`; :mod:`ovseg_ros.core.fcclip.model` lists every deliberate difference from the
authors' code. This module is the :class:`Segmenter`: weights, vocabulary encoding and the per-frame path.

One forward gives both outputs of the node: the panoptic result (``~/panoptic``: thing instances with unique
ids, stuff merged per class, a score and box per segment) and the semantic label map (``~/semantic/*``).

On a GPU (``models.sync_free``) the post-processing keeps every query with the dropped ones masked, merges the
panoptic segments as fixed-shape tensors and brings the panoptic ids, the per-segment table and the semantic
planes back in one packed copy (``to_host_packed``): one host wait per frame (tests/core/test_host_sync.py).
Instance inference (``predict(instances=True)``, not the per-frame path) still reads on the host.

Weights: the trained head comes from the authors' ``fcclip_cocopan.pth`` (``checkpoint``); the CLIP text
tower, which that file may lack, from open_clip's ``convnext_large_d_320`` / ``laion2b_s29b_b131k_ft_soup``
(``model.pretrained``, or a local file as ``model.checkpoint``). See docs/methods/fcclip.md.

Thing/stuff per class (``thing_from``): ``coco`` (default) keeps a flag the request or vocabulary file gave
explicitly, else uses COCO-panoptic membership of the class name or a synonym (things win when both match),
else the vocabulary's guess from the name; ``vocabulary`` always uses the vocabulary's flag (the authors':
their dataset's own ``isthing``; the paper presets use it). "Seen" per class (``seen_rule``): ``synonyms``
(ours) or ``authors`` (exact names of their COCO label file; the paper presets use it).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from ..fcclip.config import FCCLIPArch
from ..models import ClipModel, ModelLoadError, ModelSpec, load_clip, register_model_configs, resolve_device, resolve_dtype
from ..segmenter import (
    Segmenter,
    SegmentationResult,
    StageTimer,
    VocabularyState,
    check_image,
    register_segmenter,
)
from ..models import file_content_hash
from ..segmenter import SIDE, UNIT, OneOf, Range, declare_constraints
from ..text import VILD_TEMPLATES, DEFAULT_TEXT_CACHE_MB, TextEncoder, text_cache_bytes, format_prompts
from ..vocabulary import UNLABELED, Vocabulary

if TYPE_CHECKING:
    from ..deploy import ImageGraph
    from ..fcclip.model import FCCLIPModel
    from ..fcclip.postprocess import InstanceResult, SeparableResize

log = logging.getLogger(__name__)


_THING_SOURCES = ("coco", "vocabulary")
_SEMANTIC_SOURCES = ("semantic", "panoptic")


def _default_clip() -> ModelSpec:
    return ModelSpec(name="convnext_large_d_320", pretrained="laion2b_s29b_b131k_ft_soup")


@dataclass(frozen=True)
class FCCLIPConfig:
    """Options of the FC-CLIP segmenter (presets in ``presets/fcclip``; defaults = the authors' ADE20K eval)."""

    #: The authors' checkpoint (``fcclip_cocopan.pth``, detectron2 format); "" needs ``allow_random``.
    checkpoint: str = ""
    #: The frozen CLIP: architecture, and the source of the text tower when the checkpoint lacks it.
    #: ``precision`` applies to the CLIP only (fp16 on CUDA by default); the head always runs in fp32.
    model: ModelSpec = field(default_factory=_default_clip)
    #: Without a checkpoint, build the head with random weights (tests, benchmarks); outputs are meaningless.
    allow_random: bool = False
    arch: FCCLIPArch = field(default_factory=FCCLIPArch)
    #: Resize so the short side is ``min_size`` unless the long side would exceed ``max_size`` (0 = input size).
    min_size: int = 800
    max_size: int = 1333
    size_divisibility: int = 32
    #: Input resize: ``device`` (bilinear on float pixels on the device, rounded) or ``pil`` (the authors':
    #: detectron2's PIL bilinear on the uint8 image).
    resize: str = "device"
    #: Geometric-ensemble weight of frozen CLIP for classes seen in COCO panoptic (alpha) and unseen ones (beta).
    alpha: float = 0.4
    beta: float = 0.8
    #: Which classes count as "seen" (alpha): ``synonyms`` (ours: our COCO synonym table, case- and
    #: hyphen-insensitive) or ``authors`` (exact match against their COCO label file's names).
    seen_rule: str = "synonyms"
    #: Ignore frozen CLIP for queries whose mask is empty at the CLIP feature resolution (the authors' ResNet setting).
    ensemble_on_valid_mask: bool = False
    #: Panoptic: queries whose best class is void, or whose best probability is at or below this, are dropped.
    object_mask_threshold: float = 0.0
    #: Panoptic: a query must win at least this fraction of its own mask to become a segment.
    overlap_threshold: float = 0.8
    #: Thing/stuff flags: ``coco`` (explicit request flag, else COCO-panoptic membership, else the name guess)
    #: or ``vocabulary``.
    thing_from: str = "coco"
    #: Labels of ``~/semantic``: ``semantic`` (the authors' semantic inference) or ``panoptic`` (segment classes).
    semantic_source: str = "semantic"
    #: Semantic pixels whose confidence is below this are UNLABELED.
    semantic_threshold: float = 0.0
    #: Instances kept by :meth:`FCCLIPSegmenter.predict` (top-k over query x thing class, as the authors').
    instance_topk: int = 100
    #: Post-processing band size in queries x rows x width elements (small bands stay in the CPU cache).
    band_elements: int = 1 << 20


declare_constraints(
    FCCLIPConfig,
    min_size=SIDE, max_size=SIDE, size_divisibility=Range(0, 1024), alpha=UNIT, beta=UNIT,
    object_mask_threshold=UNIT, overlap_threshold=UNIT, thing_from=OneOf(_THING_SOURCES),
    semantic_source=OneOf(_SEMANTIC_SOURCES), semantic_threshold=UNIT, instance_topk=Range(0, 100_000),
    band_elements=Range(1, 1 << 31),
)
declare_constraints(
    FCCLIPArch,
    **{name: Range(1, 65536) for name in ("hidden_dim", "mask_dim", "num_queries", "dec_layers", "dec_heads",
                                          "dec_ffn_dim", "enc_layers", "enc_heads", "enc_points", "enc_ffn_dim",
                                          "gn_groups")},
    deform_kernel=OneOf(("auto", "grid_sample", "gather")),
)


@dataclass(frozen=True)
class FCCLIPState(VocabularyState):
    text: torch.Tensor = None  # type: ignore[assignment]  # (T, D) one normalised row per class name
    owner: torch.Tensor = None  # type: ignore[assignment]  # (T,) class index of each row
    seen: torch.Tensor = None  # type: ignore[assignment]  # (K,) bool, class in COCO panoptic
    is_thing: torch.Tensor = None  # type: ignore[assignment]  # (K,) bool
    prompts: tuple[tuple[str, ...], ...] = ()


@dataclass
class FCCLIPNetwork:
    """A loaded network and the CLIP wrapper its text side uses (shareable between segmenter instances)."""

    model: "FCCLIPModel"
    clip: ClipModel


@dataclass
class FCCLIPPrediction:
    result: SegmentationResult
    instances: Optional["InstanceResult"] = None


def _file_key(name: str, path: str, cache_dir: str = "") -> str:
    # Content hash: a different file at the same path, size and mtime must not reuse cached embeddings.
    return f"{name}@fcclip:{file_content_hash(path, cache_dir or None)[:32]}"


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


def _bare_clip(spec: ModelSpec, key: str) -> ClipModel:
    """An open_clip model with random weights that the FC-CLIP checkpoint will overwrite completely."""
    import open_clip

    register_model_configs()
    if spec.name not in open_clip.list_models():
        raise ModelLoadError(f"unknown open_clip architecture {spec.name!r}")
    quiet = _DropRandomInitWarning()
    logging.getLogger().addFilter(quiet)  # open_clip warns "initialized randomly"; the checkpoint fills it
    try:
        model = open_clip.create_model(spec.name, pretrained=None, device="cpu").eval().requires_grad_(False)
    finally:
        logging.getLogger().removeFilter(quiet)
    pp = getattr(model.visual, "preprocess_cfg", None) or {}
    return ClipModel(
        model=model, tokenizer=open_clip.get_tokenizer(spec.name), spec=spec, key=key,
        mean=tuple(pp.get("mean", open_clip.OPENAI_DATASET_MEAN)), std=tuple(pp.get("std", open_clip.OPENAI_DATASET_STD)),
        device=torch.device("cpu"), dtype=torch.float32, has_weights=True,
    )


def load_fcclip(config: FCCLIPConfig, device: str | torch.device = "cpu", cache_dir: str = "",
                offline: bool = True) -> FCCLIPNetwork:
    """Build FC-CLIP and load its weights: the checkpoint, plus open_clip's text tower if the file lacks it.

    Raises:
        ModelLoadError: no weights, a file that does not fit, or open_clip weights missing offline.
    """
    from ..fcclip import convert
    from ..fcclip.model import FCCLIPModel

    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
    cpu_spec = replace(config.model, precision="fp32")
    authors = None
    if config.checkpoint:
        authors = convert.read_checkpoint(config.checkpoint)
    elif not config.allow_random:
        raise ModelLoadError(
            f"no FC-CLIP weights: download {convert.CHECKPOINT_NAME} from the authors' README "
            f"({convert.CHECKPOINT_URL}) and set checkpoint:=/path/to/{convert.CHECKPOINT_NAME} "
            f"(or allow_random:=true for a random-weight test model)"
        )
    has_text = False
    if authors is None:
        clip = load_clip(replace(cpu_spec, allow_random=True), "cpu", cache_dir or None, offline)
    else:
        mapped, _, _ = convert.map_state_dict(authors)
        has_text = any(convert.is_text_tower_key(k) for k in mapped)
        if has_text:  # a complete checkpoint: every CLIP weight comes from the file
            clip = _bare_clip(cpu_spec, _file_key(cpu_spec.name, config.checkpoint, cache_dir))
        else:  # the usual case: the text tower comes from open_clip's pretrained weights
            try:
                clip = load_clip(cpu_spec, "cpu", cache_dir or None, offline)
            except ModelLoadError as exc:
                raise ModelLoadError(
                    f"FC-CLIP checkpoint {config.checkpoint!r} has no CLIP text tower, so open_clip's weights are "
                    f"needed (model.pretrained / model.checkpoint): {exc}"
                ) from exc
        del mapped
    model = FCCLIPModel(clip.model, config.arch).eval().requires_grad_(False)
    if authors is not None:
        report = convert.load_into(model, authors, source=f"FC-CLIP checkpoint {config.checkpoint!r}")
        if has_text and report.text_tower_missing:
            raise ModelLoadError(
                f"FC-CLIP checkpoint {config.checkpoint!r} holds only part of the CLIP text tower; missing: "
                + ", ".join(report.text_tower_missing[:8])
            )
        if report.text_tower_missing:
            log.info("fcclip: CLIP text tower (%d tensors) from open_clip '%s' (%s)", len(report.text_tower_missing),
                     clip.spec.name, clip.spec.checkpoint or clip.spec.pretrained)
    del authors  # the loaded copy is in the model now; free it before moving to the device
    network = FCCLIPNetwork(model, clip)
    _move(network, dev, resolve_dtype(config.model.precision, dev))
    return network


def _move(network: FCCLIPNetwork, device: torch.device, dtype: torch.dtype) -> None:
    """CLIP in ``dtype`` (fp16 allowed on CUDA); the trained head stays fp32, as in the authors' code."""
    model = network.model
    model.to(device=device, dtype=torch.float32)
    model.backbone.clip.to(dtype=dtype)
    network.clip.device, network.clip.dtype = device, dtype


@register_segmenter("fcclip")
class FCCLIPSegmenter(Segmenter):
    """FC-CLIP panoptic + semantic segmentation. See the module docstring."""

    config_cls = FCCLIPConfig
    predicts_instances = True

    def __init__(self, config: FCCLIPConfig, network: FCCLIPNetwork, text_encoder: TextEncoder) -> None:
        if config.thing_from not in _THING_SOURCES:
            raise ValueError(f"thing_from must be one of {_THING_SOURCES}, got {config.thing_from!r}")
        from ..fcclip.coco_panoptic import SEEN_RULES

        if config.resize not in ("device", "pil"):
            raise ValueError(f"resize must be 'device' or 'pil', got {config.resize!r}")
        if config.seen_rule not in SEEN_RULES:
            raise ValueError(f"seen_rule must be one of {SEEN_RULES}, got {config.seen_rule!r}")
        if config.semantic_source not in _SEMANTIC_SOURCES:
            raise ValueError(f"semantic_source must be one of {_SEMANTIC_SOURCES}, got {config.semantic_source!r}")
        super().__init__(config, network.clip.device)
        self.network = network
        self.clip = network.clip
        self.text_encoder = text_encoder
        self._resizers: OrderedDict[tuple, "SeparableResize"] = OrderedDict()

    @classmethod
    def from_config(
        cls,
        config: FCCLIPConfig,
        device: str | torch.device = "cpu",
        cache_dir: str = "",
        offline: bool = True,
        model: Optional[FCCLIPNetwork] = None,
        text_cache_mb: float = DEFAULT_TEXT_CACHE_MB,
    ) -> "FCCLIPSegmenter":
        """Load weights (or reuse ``model``, a network from :func:`load_fcclip`) and build the segmenter."""
        network = model if model is not None else load_fcclip(config, device, cache_dir, offline)
        return cls(config, network, TextEncoder(network.clip, cache_dir,
                                                    max_memory_bytes=text_cache_bytes(text_cache_mb)))

    # --- text ---------------------------------------------------------------------------------------
    def _thing_flags(self, vocabulary: Vocabulary) -> list[bool]:
        from ..fcclip.coco_panoptic import coco_membership

        if self.config.thing_from == "vocabulary":
            return [c.is_thing for c in vocabulary.classes]
        flags = []
        for c in vocabulary.classes:
            coco = coco_membership(c.names)
            flags.append(c.is_thing if c.thing_explicit or coco is None else coco)
        return flags

    def encode_vocabulary(self, vocabulary: Vocabulary) -> FCCLIPState:
        from ..fcclip.coco_panoptic import seen_mask_by

        names, owner = vocabulary.query_names()
        # Per name: the 14 prompts normalised, averaged, renormalised (raises VocabularyError if too long).
        text = self.text_encoder.encode_templated(names, VILD_TEMPLATES)
        prompts = tuple(tuple(p for n in c.names for p in format_prompts(n, VILD_TEMPLATES)) for c in vocabulary.classes)
        return FCCLIPState(
            vocabulary=vocabulary,
            text=text,
            owner=torch.tensor(owner, dtype=torch.long, device=text.device),
            # On the text's (the model's) device, as ``text`` and ``owner``: no host-to-device copy per frame.
            seen=torch.tensor(seen_mask_by([c.names for c in vocabulary.classes], self.config.seen_rule),
                              dtype=torch.bool, device=text.device),
            is_thing=torch.tensor(self._thing_flags(vocabulary), dtype=torch.bool, device=text.device),
            prompts=prompts,
        )

    def describe_prompts(self, state: VocabularyState) -> list[list[str]]:
        return [list(p) for p in getattr(state, "prompts", ())] or super().describe_prompts(state)

    # --- image --------------------------------------------------------------------------------------
    def _prepare(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        from ..fcclip.preprocess import prepare_image

        cfg = self.config
        return prepare_image(image, self.device, self.clip.mean, self.clip.std, cfg.min_size, cfg.max_size,
                             cfg.size_divisibility, cfg.resize)

    def _resizer(self, mask_hw: tuple[int, int], padded_hw: tuple[int, int], crop_hw: tuple[int, int],
                 out_hw: tuple[int, int]) -> "SeparableResize":
        from ..fcclip.postprocess import SeparableResize

        key = (mask_hw, padded_hw, crop_hw, out_hw, str(self.device))
        hit = self._resizers.get(key)
        if hit is None:
            hit = SeparableResize(mask_hw, padded_hw, crop_hw, out_hw, self.device)
            self._resizers[key] = hit
            while len(self._resizers) > 8:
                self._resizers.popitem(last=False)
        return hit

    @torch.inference_mode()
    def predict(self, image: np.ndarray, state: Optional[VocabularyState] = None,
                instances: bool = True) -> FCCLIPPrediction:
        """Semantic + panoptic result and, if ``instances``, the top-k thing instances, from one forward."""
        from ..fcclip.postprocess import PostprocessOptions, postprocess

        st: FCCLIPState = self._resolve_state(state)  # type: ignore[assignment]
        image = check_image(image)
        cfg = self.config
        timer = StageTimer(self.device)
        with timer.stage("preprocess"):
            x, crop_hw = self._prepare(image)
        if self.image_encoder is None:
            out = self.network.model(
                x, st.text.to(self.device), st.owner.to(self.device), st.seen.to(self.device), cfg.alpha, cfg.beta,
                cfg.ensemble_on_valid_mask, timer,
            )
        else:  # the exported graph up to mask and class embeddings, then the same text head
            from ..fcclip.model import FCCLIPImageOutput, FCCLIPOutput

            with timer.stage("backbone"):
                masks, emb, clip_emb, valid = self.image_encoder(x)
            with timer.stage("classify"):
                probs = self.network.model.classify(
                    FCCLIPImageOutput(masks, emb, clip_emb, valid > 0.5), st.text.to(self.device),
                    st.owner.to(self.device), st.seen.to(self.device), cfg.alpha, cfg.beta,
                    cfg.ensemble_on_valid_mask)
            out = FCCLIPOutput(masks, probs)
        with timer.stage("postprocess"):
            masks = out.mask_logits[0]
            resize = self._resizer(tuple(masks.shape[-2:]), tuple(x.shape[-2:]), crop_hw, image.shape[:2])
            options = PostprocessOptions(
                object_mask_threshold=cfg.object_mask_threshold, overlap_threshold=cfg.overlap_threshold,
                semantic=cfg.semantic_source == "semantic", panoptic=True,
                instance_topk=cfg.instance_topk if instances else 0,
                semantic_threshold=cfg.semantic_threshold, band_elements=cfg.band_elements,
            )
            pp = postprocess(masks, out.class_probs[0], st.is_thing, resize, options)
            assert pp.panoptic is not None
            if pp.labels is None:  # semantic_source == "panoptic": the classes of the segments
                labels, confidence = _semantic_from_panoptic(pp.panoptic.segment_ids, pp.panoptic.segments)
            else:
                labels, confidence = pp.labels, pp.confidence
        result = SegmentationResult(labels, confidence, st.vocabulary, panoptic=pp.panoptic, timings=timer.times)
        return FCCLIPPrediction(result, pp.instances)

    def segment(self, image: np.ndarray, state: Optional[VocabularyState] = None) -> SegmentationResult:
        return self.predict(image, state, instances=False).result

    def image_graph(self) -> "ImageGraph":
        """Backbone, pixel decoder and decoder up to mask logits and class/CLIP embeddings per query; the text
        products, the ensemble and post-processing stay in torch. One static input size per file: the
        deformable attention's level shapes are Python integers of the graph."""
        from ..deploy import ImageGraph
        from ..fcclip.preprocess import shortest_edge_size

        cfg = self.config

        def input_size(h: int, w: int) -> tuple[int, int]:
            nh, nw = shortest_edge_size(h, w, cfg.min_size, cfg.max_size)
            d = max(cfg.size_divisibility, 1)
            return nh + (-nh) % d, nw + (-nw) % d

        return ImageGraph(_FCCLIPImage(self.network.model), ("masks", "class_embeddings", "clip_embeddings", "valid"),
                          {"arch": dataclasses.asdict(self.network.model.arch)}, input_size, 32, static=True)

    @torch.inference_mode()
    def backbone_forward(self, image: np.ndarray) -> None:
        x, _ = self._prepare(check_image(image))
        self.network.model.backbone(x)

    def to(self, device: torch.device | str) -> "FCCLIPSegmenter":
        dev = torch.device(device)
        _move(self.network, dev, resolve_dtype(self.config.model.precision, dev))
        self._resizers.clear()
        super().to(dev)
        return self


class _FCCLIPImage(torch.nn.Module):
    """The exported graph: padded normalised images -> (masks, class embeddings, CLIP embeddings, valid)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model.image_forward(images)
        return out.masks, out.class_embeddings, out.clip_embeddings, out.valid.float()


def _semantic_from_panoptic(ids: np.ndarray, segments: list) -> tuple[np.ndarray, np.ndarray]:
    """Label and confidence maps painted from panoptic segments (UNLABELED / 0 where no segment)."""
    cls_lut = np.full(len(segments) + 1, UNLABELED, dtype=np.int32)
    score_lut = np.zeros(len(segments) + 1, dtype=np.float32)
    for s in segments:
        cls_lut[s.id], score_lut[s.id] = s.class_id, s.score
    return cls_lut[ids], score_lut[ids]
