"""The image side of a segmenter as an ONNX graph, run by ONNX Runtime (CPU, CUDA or TensorRT providers).

A CLIP segmenter's heavy part, the image encoder (ViT/ConvNeXt forward to dense features), does not depend on
the vocabulary: text embeddings are applied *after* the graph by the segmenter's own torch code. So a file is
exported once per model and preset, and ``~/set_vocabulary`` keeps working unchanged (nothing is re-exported).

* :func:`export_onnx` writes the graph of ``segmenter.image_graph()`` with metadata: segmenter, architecture,
  SHA-256 of the weights inside the graph, the options that shape it, input sizes, precision, package version.
* :func:`attach_onnx` (called by ``build_segmenter`` for ``backend: onnxruntime``) opens the file in an ONNX
  Runtime session with the requested execution providers, refuses a file that does not match the configured
  model (with the reason), and hands the segmenter an :class:`OrtImageEncoder` that replaces its torch image
  encoder. Everything before (resize, normalise, augment) and after (text product, PAMR, labels) is the same
  torch code for both backends.

Exporter: torch 2.x's ``torch.export``-based exporter (``dynamo=True``, needs ``onnxscript``). The TorchScript
tracer (``dynamo=False``) fails on open_clip's ViT: in eval mode ``nn.MultiheadAttention`` takes its fused
``_native_multi_head_attention`` path, which has no ONNX symbolic; ``torch.export`` decomposes it, keeps height
and width symbolic (one graph for every input size) and is the exporter torch maintains.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime")
#: Our provider names -> ONNX Runtime's, in the order tried when none are given.
PROVIDERS = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
FORMAT_VERSION = "1"
META_PREFIX = "ovseg."
DEFAULT_OPSET = 18
#: The node's ``max_image_pixels`` default: the bound of a dynamic-size file's TensorRT profile.
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
#: Camera shapes (height:width) whose largest frame within ``max_image_pixels`` bounds a dynamic file's
#: TensorRT profile (both orientations): square to 2:1, which covers the usual robot cameras.
PROFILE_ASPECTS = (1.0, 4 / 3, 16 / 9, 2.0)
#: The opt camera when neither ``trt_opt_size`` nor a declared size gives one.
DEFAULT_OPT_CAMERA = (480, 640)
#: Deployment requirements (``requirements-deploy.txt``); the GPU build replaces ``onnxruntime`` on robots.
INSTALL_HINT = ("pip install -r requirements-deploy.txt (onnx, onnxruntime, onnxscript); for CUDA/TensorRT "
                "install onnxruntime-gpu (on Jetson: the JetPack build of onnxruntime-gpu) instead of onnxruntime")


class DeployError(RuntimeError):
    """An export or an ONNX Runtime backend that cannot be used; the message says what to install or export."""


@dataclass(frozen=True)
class BackendOptions:
    """How the image encoder runs: ``torch`` (default) or ``onnxruntime`` with an exported file.

    Attributes:
        backend: ``torch`` or ``onnxruntime``.
        onnx_file: the file written by ``ovseg-export`` (``onnxruntime`` only).
        providers: execution providers in order of preference, from ``tensorrt``, ``cuda``, ``cpu``; empty
            means every available one in that order. A provider asked for but not available is an error.
        trt_cache_dir: TensorRT engine cache folder (engines are built at the first run of each input shape:
            minutes on a Jetson; later starts load them in seconds). Empty: ``<onnx_file>.trt_cache``.
        trt_fp16: let TensorRT build fp16 engines (an fp32 file still runs in fp16 then).
        device_id: the CUDA device of the CUDA and TensorRT providers (the node's ``cuda:N`` -> N).
        trt_opt_size: camera (height, width) TensorRT tunes its engine for (the profile's opt shape); empty:
            the file's first declared size, else 480x640.
        max_image_pixels: largest camera frame (pixels) the TensorRT profile of a dynamic-size file must cover.
        cameras: cameras one model call may batch (segmenters that batch frames: the profile's batch range).
    """

    backend: str = "torch"
    onnx_file: str = ""
    providers: tuple[str, ...] = ()
    trt_cache_dir: str = ""
    trt_fp16: bool = True
    device_id: int = 0
    trt_opt_size: tuple[int, ...] = ()
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    cameras: int = 1

    def check(self) -> None:
        if self.backend not in BACKENDS:
            raise DeployError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        bad = [p for p in self.providers if p not in PROVIDERS]
        if bad:
            raise DeployError(f"unknown execution provider(s) {bad}; choose from {', '.join(PROVIDERS)}")
        if self.backend == "onnxruntime" and not self.onnx_file:
            raise DeployError("backend 'onnxruntime' needs onnx_file: export one with ovseg-export")
        if self.trt_opt_size and (len(self.trt_opt_size) != 2 or min(self.trt_opt_size) < 1):
            raise DeployError(f"trt_opt_size must be a camera HEIGHTxWIDTH, got {self.trt_opt_size}")
        if self.max_image_pixels < 1 or self.cameras < 1 or self.device_id < 0:
            raise DeployError("max_image_pixels and cameras must be >= 1, device_id >= 0")


@dataclass
class ImageGraph:
    """What a segmenter exports: a module from normalised images (B, 3, H, W) float32 to float32 outputs.

    Attributes:
        module: the image encoder (a thin wrapper over the segmenter's own torch functions).
        outputs: output names, in the module's return order.
        options: the config values that change the graph (compared at load: a mismatch refuses the file).
        input_size: camera (h, w) -> the graph's input (h, w) for this preset (declared-size exports).
        min_side: smallest input side the graph accepts (one patch).
        static: the graph has one fixed input size (exported for exactly one camera size).
        batch: images one call sends through the graph for one frame (augmentations x batched windows): the
            TensorRT profile's opt batch.
        batches_frames: the segmenter batches several cameras' frames in one call (``segment_batch``): the
            profile's max batch is ``batch`` x cameras.
    """

    module: nn.Module
    outputs: tuple[str, ...]
    options: dict[str, Any]
    input_size: Callable[[int, int], tuple[int, int]]
    min_side: int = 16
    static: bool = False
    batch: int = 1
    batches_frames: bool = False


# --- identity of the weights and of the file ------------------------------------------------------------
def weights_sha256(module: nn.Module) -> str:
    """SHA-256 over the module's tensors (sorted names, values rounded to fp16, little-endian).

    Rounded to fp16 so that the fp32 and fp16 copies of the same weights (an fp16 export checked against an
    fp32 node, or the reverse) have one identity; weights that differ anywhere above fp16 precision differ.
    """
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        if t.is_floating_point():
            t = t.detach().to("cpu", torch.float16)
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("ovseg_ros")
    except Exception:  # noqa: BLE001  (colcon installs have no dist-info)
        return _PACKAGE_XML_VERSION


_PACKAGE_XML_VERSION = "0.1.0"


def expected_metadata(segmenter: Any, graph: ImageGraph) -> dict[str, str]:
    """The metadata a file for this segmenter must carry (compared by :func:`check_metadata`)."""
    spec = getattr(segmenter.config, segmenter.primary_model_field)
    return {
        "format": FORMAT_VERSION,
        "segmenter": segmenter.name,
        "architecture": spec.name,
        "weights_sha256": weights_sha256(graph.module),
        "graph_options": json.dumps(graph.options, sort_keys=True),
    }


#: Keys whose mismatch refuses a file, and what to do about each.
_MUST_MATCH = {
    "format": "re-export it with this version's ovseg-export",
    "segmenter": "export the configured segmenter",
    "architecture": "export the configured model",
    "weights_sha256": "export it from the configured weights (checkpoint/pretrained)",
    "graph_options": "export it with the configured preset and segmenter_options",
}


def check_metadata(found: dict[str, str], expected: dict[str, str], path: str) -> None:
    """Raise :class:`DeployError` naming every mismatch between a file's metadata and the configured model."""
    if not found.get("format"):
        raise DeployError(f"{path} is not an ovseg-export file (no {META_PREFIX}* metadata); export it with "
                          f"ovseg-export")
    why = []
    for key, fix in _MUST_MATCH.items():
        if found.get(key) != expected[key]:
            a, b = found.get(key, "<missing>"), expected[key]
            if key == "weights_sha256":
                a, b = a[:16] + "...", b[:16] + "..."
            why.append(f"{key}: file has {a}, configured {b} ({fix})")
    if why:
        raise DeployError(f"ONNX file {path} does not match the configured model: " + "; ".join(why))


# --- export -----------------------------------------------------------------------------------------------
def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"480x640,720x1280"`` (height x width) -> [(480, 640), (720, 1280)]."""
    sizes = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        try:
            h, w = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise DeployError(f"size {item!r} must be HEIGHTxWIDTH, e.g. 480x640") from None
        if not (1 <= h <= 16384 and 1 <= w <= 16384):
            raise DeployError(f"size {item!r} must have sides in [1, 16384]")
        sizes.append((h, w))
    return sizes


class _FloatIO(nn.Module):
    """float32 in, float32 out whatever the weights' precision (TensorRT and the host side see one dtype)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.inner(images)
        out = out if isinstance(out, tuple) else (out,)
        return tuple(o.float() for o in out)


def export_onnx(
    segmenter: Any,
    path: str | Path,
    preset: str = "",
    camera_sizes: Sequence[tuple[int, int]] = (),
    opset: int = DEFAULT_OPSET,
) -> dict[str, str]:
    """Export ``segmenter.image_graph()`` to ``path`` in the segmenter's current precision; returns the metadata.

    The graph has dynamic batch, height and width. ``camera_sizes`` (camera h, w) are turned into the graph's
    input sizes and recorded: the backend then refuses other sizes and TensorRT builds engines for exactly those
    shapes. Without sizes any input size runs (TensorRT builds an engine per new shape, at first use).
    """
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise DeployError(f"exporting needs onnx and onnxscript ({exc}); {INSTALL_HINT}") from None
    from torch.export import Dim

    graph = segmenter.image_graph()
    if graph is None:
        raise DeployError(f"segmenter {segmenter.name!r} has no exportable image graph (see docs/deploy.md)")
    sizes = sorted({graph.input_size(h, w) for h, w in camera_sizes})
    if graph.static:
        if len(sizes) > 1:
            raise DeployError(f"{segmenter.name} exports one input size per file (its graph is static); give one "
                              f"camera size in --sizes, got {len(sizes)} graph sizes {sizes}")
        sizes = sizes or [graph.input_size(480, 640)]
    ref = sizes[0] if sizes else graph.input_size(480, 640)
    module = _FloatIO(graph.module).eval()
    # Batch 2 in the example: torch.export specialises a dimension whose example value is 1.
    example = torch.randn(1 if graph.static else 2, 3, *ref, device=segmenter.device)
    dims = None if graph.static else {
        "images": {0: Dim("batch", min=1, max=1024), 2: Dim("height", min=graph.min_side, max=16384),
                   3: Dim("width", min=graph.min_side, max=16384)}}
    meta = expected_metadata(segmenter, graph)
    dtype = next(graph.module.parameters()).dtype
    spec = getattr(segmenter.config, segmenter.primary_model_field)
    meta.update({
        "precision": {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32"),
        "preset": preset,
        "options": json.dumps(_jsonable(segmenter.config), sort_keys=True, default=str),
        "input_sizes": json.dumps([list(s) for s in sizes]) if sizes else "dynamic",
        "outputs": ",".join(graph.outputs),
        "package_version": package_version(),
        "checkpoint_sha256": _checkpoint_sha(spec),
        "torch_version": torch.__version__,
        "opset": str(opset),
    })
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    quiet = [logging.getLogger(n) for n in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [q.level for q in quiet]
    for q in quiet:  # the optimizer's per-node notes ("Skipping constant folding ...") are not for users
        q.setLevel(logging.ERROR)
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                module, (example,), dynamo=True, opset_version=opset, input_names=["images"],
                output_names=list(graph.outputs), dynamic_shapes=dims, verbose=False,
            )
    finally:
        for q, lv in zip(quiet, levels):
            q.setLevel(lv)
    model = program.model_proto
    del model.metadata_props[:]
    for k, v in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = META_PREFIX + k, v
    import onnx

    tmp = path.with_name(path.name + ".tmp")
    onnx.save_model(model, str(tmp))
    os.replace(tmp, path)  # a half-written file is never left under the real name
    log.info("exported %s in %.1f s", path, time.perf_counter() - t0)
    return meta


def _checkpoint_sha(spec: Any) -> str:
    if getattr(spec, "checkpoint", ""):
        from .models import file_content_hash

        return file_content_hash(spec.checkpoint)
    return ""


def _jsonable(config: Any) -> Any:
    import dataclasses

    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config


# --- runtime ----------------------------------------------------------------------------------------------
def _import_ort() -> Any:
    try:
        import onnxruntime as ort
    except ImportError:
        raise DeployError(f"backend 'onnxruntime' needs the onnxruntime package: {INSTALL_HINT}") from None
    return ort


Shape = tuple[int, ...]


@dataclass(frozen=True)
class TrtProfile:
    """One TensorRT optimisation profile: per dynamic graph input, its (min, opt, max) shapes.

    Without one, TensorRT (through ONNX Runtime) builds its engine for the first shape that arrives and rebuilds
    it, mid-stream, for every shape outside what it has seen. With one, a single engine covers the whole range,
    tuned for ``opt``; ONNX Runtime stores the profile beside the cached engine and rebuilds only when it changes.
    """

    shapes: dict[str, tuple[Shape, Shape, Shape]]

    def provider_options(self) -> dict[str, str]:
        """The TensorRT execution provider's ``trt_profile_{min,opt,max}_shapes``: ``name:d0xd1x...`` per
        input, comma-separated (ONNX Runtime >= 1.15; every dynamic input must be listed in all three)."""
        def fmt(i: int) -> str:
            return ",".join(f"{name}:{'x'.join(str(d) for d in s[i])}" for name, s in self.shapes.items())

        return {"trt_profile_min_shapes": fmt(0), "trt_profile_opt_shapes": fmt(1), "trt_profile_max_shapes": fmt(2)}

    def refusal(self, name: str, shape: Sequence[int]) -> Optional[str]:
        """Why ``shape`` (batch excepted: larger batches are split) is outside the profile, or None."""
        if name not in self.shapes:
            return None
        lo, _, hi = self.shapes[name]
        out = [f"dim {i}: {d} not in [{lo[i]}, {hi[i]}]" for i, d in enumerate(shape) if i and not lo[i] <= d <= hi[i]]
        return "; ".join(out) or None

    def max_batch(self, name: str) -> int:
        return self.shapes[name][2][0] if name in self.shapes else 0


def graph_inputs(path: str) -> tuple[list[tuple[str, list[Any]]], dict[str, str]]:
    """The graph inputs of an ONNX file, ``(name, dims)`` with ``None``/a name for a dynamic dimension, and its
    ``ovseg.*`` metadata, read without creating a session (the TensorRT options must exist before it)."""
    try:
        import onnx
    except ImportError:
        raise DeployError(f"the TensorRT provider's profile is read from the file with onnx: {INSTALL_HINT}") from None
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # noqa: BLE001  (onnx raises protobuf/IO errors of several types)
        raise DeployError(f"onnx cannot read {path}: {str(exc)[:300]}") from None
    init = {t.name for t in model.graph.initializer}
    inputs = []
    for i in model.graph.input:
        if i.name in init:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                for d in i.type.tensor_type.shape.dim]
        inputs.append((i.name, dims))
    meta = {p.key[len(META_PREFIX):]: p.value for p in model.metadata_props if p.key.startswith(META_PREFIX)}
    return inputs, meta


def derive_trt_profile(
    inputs: Sequence[tuple[str, Sequence[Any]]],
    declared: Optional[Sequence[tuple[int, int]]],
    input_size: Callable[[int, int], tuple[int, int]],
    min_side: int,
    batch: int = 1,
    max_batch: int = 1,
    opt_camera: Sequence[int] = (),
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> Optional[TrtProfile]:
    """The TensorRT profile of a file's dynamic inputs (images: batch, 3, height, width); None if none is dynamic.

    Height and width: a file with ``declared`` graph sizes spans their min/max, opt being the graph size of
    ``opt_camera`` when it is one of them, else the first declared. A dynamic-size file spans one patch
    (``min_side``) up to the largest graph input that a camera frame of at most ``max_image_pixels`` pixels, of
    shape 1:1 to 2:1 in either orientation (:data:`PROFILE_ASPECTS`), or ``opt_camera`` itself gives after the
    preset's resize (``input_size``): e.g. ITACLIP realtime's short side 336 with a long side <= 2048 bounds it
    by 672, a preset without a resize by ``max_image_pixels``. Opt is ``opt_camera``'s graph size (480x640 when
    none). Batch: 1 to ``max_batch``, opt ``batch``.
    """
    cam = (int(opt_camera[0]), int(opt_camera[1])) if opt_camera else DEFAULT_OPT_CAMERA
    if declared:
        sizes = [(int(s[0]), int(s[1])) for s in declared]
        opt = input_size(*cam) if opt_camera and input_size(*cam) in sizes else sizes[0]
        lo = (min(s[0] for s in sizes), min(s[1] for s in sizes))
        hi = (max(s[0] for s in sizes), max(s[1] for s in sizes))
    else:
        opt = input_size(*cam)
        probes = [cam, cam[::-1]]
        for a in PROFILE_ASPECTS:
            short = max(1, int((max_image_pixels / a) ** 0.5))  # the largest short x long frame of aspect a
            probes += [(short, max_image_pixels // short), (max_image_pixels // short, short)]
        graph_sizes = [input_size(h, w) for h, w in probes]
        lo = (min_side, min_side)
        hi = (max(s[0] for s in graph_sizes), max(s[1] for s in graph_sizes))
    lo = (min(lo[0], opt[0]), min(lo[1], opt[1]))
    hi = (max(hi[0], opt[0]), max(hi[1], opt[1]))
    batch, max_batch = max(1, batch), max(1, batch, max_batch)
    shapes: dict[str, tuple[Shape, Shape, Shape]] = {}
    for name, dims in inputs:
        if all(isinstance(d, int) and d > 0 for d in dims):
            continue  # static input: TensorRT needs no profile for it
        if len(dims) != 4 or not (isinstance(dims[1], int) and dims[1] > 0):
            raise DeployError(f"cannot derive a TensorRT profile for graph input {name!r} with shape {list(dims)} "
                              f"(expected images: batch x channels x height x width)")
        per = [(1, batch, max_batch), (dims[1],) * 3, (lo[0], opt[0], hi[0]), (lo[1], opt[1], hi[1])]
        for i, d in enumerate(dims):
            if isinstance(d, int) and d > 0:
                per[i] = (d, d, d)  # a static dimension keeps its value in all three
        shapes[name] = tuple(tuple(p[k] for p in per) for k in range(3))  # type: ignore[assignment]
    return TrtProfile(shapes) if shapes else None


def file_trt_profile(path: str, graph: ImageGraph, options: BackendOptions) -> Optional[TrtProfile]:
    """:func:`derive_trt_profile` for the file at ``path`` and the configured graph and node settings."""
    inputs, meta = graph_inputs(path)
    sizes = meta.get("input_sizes", "dynamic")
    declared = None if sizes == "dynamic" else [tuple(s) for s in json.loads(sizes)]
    max_batch = graph.batch * (options.cameras if graph.batches_frames else 1)
    return derive_trt_profile(inputs, declared, graph.input_size, graph.min_side, graph.batch, max_batch,
                              options.trt_opt_size, options.max_image_pixels)


def resolve_providers(options: BackendOptions, available: Sequence[str],
                      profile: Optional[TrtProfile] = None) -> list[Any]:
    """ONNX Runtime provider list (names with their options) for ``options``; a missing one is an error.

    TensorRT: fp16 flag, engine and timing caches in the cache folder (the timing cache makes a rebuild for a
    new profile or a new file of the same model much faster), the optimisation ``profile`` of the file's dynamic
    inputs. CUDA and TensorRT run on ``options.device_id``.
    """
    wanted = list(options.providers) or [p for p in PROVIDERS if PROVIDERS[p] in available]
    missing = [p for p in wanted if PROVIDERS[p] not in available]
    if missing:
        raise DeployError(
            f"execution provider(s) {missing} not available in this onnxruntime (available: "
            f"{', '.join(available)}); {INSTALL_HINT}, or set onnx_providers to those available")
    out: list[Any] = []
    for p in wanted:
        if p == "tensorrt":
            cache = str(Path(options.trt_cache_dir or f"{options.onnx_file}.trt_cache").expanduser())
            Path(cache).mkdir(parents=True, exist_ok=True)
            trt: dict[str, Any] = {
                "device_id": options.device_id, "trt_fp16_enable": options.trt_fp16,
                "trt_engine_cache_enable": True, "trt_engine_cache_path": cache,
                "trt_timing_cache_enable": True, "trt_timing_cache_path": cache,
            }
            if profile is not None:
                trt.update(profile.provider_options())
            out.append((PROVIDERS[p], trt))
        elif p == "cuda":
            out.append((PROVIDERS[p], {"device_id": options.device_id}))
        else:
            out.append(PROVIDERS[p])
    return out


class OrtImageEncoder:
    """An ONNX Runtime session standing in for a segmenter's torch image encoder.

    Called with the normalised image batch (torch, any device); returns the graph's outputs as float32 torch
    tensors on the input's device. ``InferenceSession.run`` is thread-safe, so the node's threads share one.
    """

    def __init__(self, session: Any, path: str, metadata: dict[str, str], providers: list[str],
                 profile: Optional[TrtProfile] = None) -> None:
        self.session = session
        self.path = path
        self.metadata = metadata
        self.providers = providers
        self._input = session.get_inputs()[0].name
        #: The TensorRT profile the session was built with (None: no TensorRT, or a static graph).
        self.profile = profile if "Tensorrt" in providers else None
        sizes = metadata.get("input_sizes", "dynamic")
        self.sizes: Optional[set[tuple[int, int]]] = (
            None if sizes == "dynamic" else {tuple(s) for s in json.loads(sizes)})  # type: ignore[misc]

    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        size = (int(images.shape[-2]), int(images.shape[-1]))
        if self.sizes is not None and size not in self.sizes:
            from .segmenter import ImageError

            raise ImageError(
                f"the ONNX file {self.path} was exported for input sizes {sorted(self.sizes)}, this frame needs "
                f"{size[0]}x{size[1]}: export it with that camera size (ovseg-export --sizes) or without --sizes")
        x = images.detach().to("cpu", torch.float32).contiguous().numpy()
        step = len(x)
        if self.profile is not None:
            why = self.profile.refusal(self._input, x.shape)
            if why:  # TensorRT would fail (or rebuild mid-stream) outside its profile
                from .segmenter import ImageError

                raise ImageError(
                    f"the graph input {size[0]}x{size[1]} is outside the TensorRT profile of {self.path} ({why}): "
                    f"set trt_opt_size to this camera, raise max_image_pixels, or export with --sizes")
            step = self.profile.max_batch(self._input) or step
        parts = [self.session.run(None, {self._input: x[i:i + step]}) for i in range(0, len(x), step)]
        outs = parts[0] if len(parts) == 1 else [np.concatenate(o) for o in zip(*parts)]
        return [torch.from_numpy(o).to(images.device) for o in outs]

    def warm_up(self) -> float:
        """TensorRT builds or loads its engine now, at configure, not at the first camera frame: one run at the
        profile's opt shape (one engine covers the profile), else one per declared size (batch 1). Returns
        the seconds it took."""
        t0 = time.perf_counter()
        if self.profile is not None and self._input in self.profile.shapes:
            shapes = [self.profile.shapes[self._input][1]]
        else:
            shapes = [(1, 3, h, w) for h, w in sorted(self.sizes or ())]
        for shape in shapes:
            self.session.run(None, {self._input: np.zeros(shape, np.float32)})
        return time.perf_counter() - t0

    def describe(self) -> str:
        return f"onnxruntime {os.path.basename(self.path)} ({self.metadata.get('precision', '?')}, " \
               f"{'/'.join(self.providers)})"


def open_session(options: BackendOptions, expected: Optional[dict[str, str]] = None,
                 threads: int = 0, graph: Optional[ImageGraph] = None) -> OrtImageEncoder:
    """Open ``options.onnx_file`` with the providers in order and check its metadata against ``expected``;
    with TensorRT, ``graph`` (the configured segmenter's) gives the optimisation profile of dynamic inputs."""
    options.check()
    ort = _import_ort()
    path = str(Path(options.onnx_file).expanduser())
    if not Path(path).is_file():
        raise DeployError(f"ONNX file {path} does not exist: export it with ovseg-export --segmenter ... "
                          f"--output {path}")
    providers = resolve_providers(options, ort.get_available_providers())
    profile = None
    if graph is not None and any(not isinstance(p, str) and p[0] == PROVIDERS["tensorrt"] for p in providers):
        profile = file_trt_profile(path, graph, options)
        providers = resolve_providers(options, ort.get_available_providers(), profile)
        if profile is not None:
            log.info("TensorRT profile of %s: %s", path, profile.provider_options())
    so = ort.SessionOptions()
    so.log_severity_level = 3
    # No busy-waiting pool threads between runs: they would take the cores the node's other threads (and torch's
    # pre/post-processing of the same frame) need.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(path, sess_options=so, providers=providers)
    except Exception as exc:  # noqa: BLE001  (ORT raises its own types for bad files and provider failures)
        raise DeployError(f"onnxruntime cannot open {path}: {str(exc)[:400]}") from None
    meta = {k[len(META_PREFIX):]: v for k, v in session.get_modelmeta().custom_metadata_map.items()
            if k.startswith(META_PREFIX)}
    if expected is not None:
        check_metadata(meta, expected, path)
    active = session.get_providers()
    wanted = [p if isinstance(p, str) else p[0] for p in providers]
    lost = [p for p in wanted if p not in active]
    if lost and options.providers:  # e.g. TensorRT listed but its libraries failed to load
        raise DeployError(f"execution provider(s) {lost} failed to start for {path} (active: {active}); "
                          f"check the CUDA/TensorRT libraries of onnxruntime-gpu or drop them from onnx_providers")
    return OrtImageEncoder(session, path, meta, [p.replace("ExecutionProvider", "") for p in active], profile)


_NOT_EXPORTED = {"color_key": "it has no model"}


def attach_onnx(segmenter: Any, options: BackendOptions) -> Any:
    """Give ``segmenter`` an ONNX Runtime image encoder for ``options``; refuses unsupported methods and files
    that do not match the configured model. Returns the segmenter."""
    graph_fn = getattr(segmenter, "image_graph", None)
    graph = graph_fn() if graph_fn is not None else None
    if graph is None:
        why = _NOT_EXPORTED.get(segmenter.name, "it has no exported image encoder")
        raise DeployError(f"segmenter {segmenter.name!r} cannot run on the onnxruntime backend: {why} "
                          f"(docs/deploy.md); use backend torch")
    if segmenter.device.type == "cuda" and options.device_id == 0 and segmenter.device.index:
        options = BackendOptions(**{**options.__dict__, "device_id": segmenter.device.index})
    encoder = open_session(options, expected_metadata(segmenter, graph), graph=graph)
    if (encoder.sizes or encoder.profile) and any(p in ("Tensorrt", "CUDA") for p in encoder.providers):
        log.info("%s: engines for %s ready in %.1f s", encoder.describe(),
                 encoder.profile.provider_options() if encoder.profile else sorted(encoder.sizes or ()),
                 encoder.warm_up())
    log.info("%s: image encoder %s", segmenter.name, encoder.describe())
    segmenter.image_encoder = encoder
    return segmenter


# --- command-line options shared by ovseg-segment and ovseg-eval ----------------------------------------
def add_backend_arguments(parser: Any, flag: str = "--backend") -> None:
    """The image-backend options of the tools (``flag`` names the torch/onnxruntime switch)."""
    g = parser.add_argument_group("image backend")
    g.add_argument(flag, dest="image_backend", default="torch", choices=BACKENDS,
                   help="image encoder: torch, or onnxruntime with the file of ovseg-export")
    g.add_argument("--onnx-file", default="", help="the ovseg-export file (backend onnxruntime)")
    g.add_argument("--onnx-providers", default="",
                   help="execution providers in order, comma-separated from tensorrt,cuda,cpu (default: all available)")
    g.add_argument("--trt-cache-dir", default="", help="TensorRT engine cache (default: <onnx-file>.trt_cache)")
    g.add_argument("--no-trt-fp16", action="store_true", help="TensorRT engines in fp32")
    g.add_argument("--trt-opt-size", default="", help="camera HEIGHTxWIDTH TensorRT tunes its engine for "
                   "(default: the file's first size, else 480x640); a dynamic-size file's profile covers frames "
                   "up to 4096x4096 pixels (docs/deploy.md)")


def backend_from_args(args: Any, device: Any = "cpu") -> BackendOptions:
    dev = torch.device(device)
    return BackendOptions(
        backend=args.image_backend, onnx_file=args.onnx_file,
        providers=tuple(p.strip() for p in args.onnx_providers.split(",") if p.strip()),
        trt_cache_dir=args.trt_cache_dir, trt_fp16=not args.no_trt_fp16,
        device_id=(dev.index or 0) if dev.type == "cuda" else 0,
        trt_opt_size=parse_sizes(args.trt_opt_size)[0] if getattr(args, "trt_opt_size", "") else (),
    )
