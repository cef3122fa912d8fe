"""Loading frozen open_clip models: a hub name + pretrained tag, or a local checkpoint, offline-safe.

Weights are keyed by (architecture, tag) as in open_clip; a local ``checkpoint`` path always wins over the
tag. With ``offline=True`` nothing is downloaded: a missing file fails at once with a message naming what
to download and where to put it (instead of open_clip's ~40 s of hub retries).

The package ships a few tiny architectures (``ovseg_ros/core/model_configs/*.json``, e.g. ``ovseg-tiny-vit``)
registered with open_clip on import; they exist for tests, demos and CI, with random weights that the tests
save and load back through the checkpoint path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

log = logging.getLogger(__name__)

_CONFIG_DIR = Path(__file__).parent / "model_configs"
_PRECISIONS = ("auto", "fp32", "fp16", "bf16")


class ModelLoadError(RuntimeError):
    """The model or its weights cannot be loaded; the message says what to provide."""


@dataclass(frozen=True)
class ModelSpec:
    """Which CLIP to load.

    Attributes:
        name: open_clip architecture (``ViT-B-16-quickgelu``, ``convnext_large_d_320``, ``ovseg-tiny-vit``).
        pretrained: open_clip pretrained tag (``openai``, ``laion2b_s29b_b131k_ft_soup``), or "" for none.
        checkpoint: a local weights file (.pt/.bin/.safetensors); wins over ``pretrained``.
        precision: ``auto`` (fp16 on CUDA, fp32 on CPU), ``fp32``, ``fp16`` or ``bf16``.
        allow_random: build with random weights when neither weights source is given (tests, demos).
    """

    name: str = "ViT-B-16-quickgelu"
    pretrained: str = "openai"
    checkpoint: str = ""
    precision: str = "auto"
    allow_random: bool = False


def register_model_configs(directory: Path | str = _CONFIG_DIR) -> None:
    """Register every ``*.json`` architecture in ``directory`` with open_clip (name = file stem)."""
    import open_clip

    directory = Path(directory)
    if directory.is_dir() and any(directory.glob("*.json")):
        known = set(open_clip.list_models())
        if not {p.stem for p in directory.glob("*.json")} <= known:
            open_clip.add_model_config(directory)


#: What ``precision: auto`` means per device type (fp32 for types not listed). One table so that every path
#: (load, move, FC-CLIP's head) resolves alike; tests map ``cpu`` to fp16/bf16 here to play a GPU's state
#: on the CPU (a "fake fp16 device") and check the moves between it and fp32.
AUTO_DTYPES: dict[str, torch.dtype] = {"cuda": torch.float16}


def resolve_dtype(precision: str, device: torch.device | str) -> torch.dtype:
    if precision not in _PRECISIONS:
        raise ModelLoadError(f"precision must be one of {_PRECISIONS}, got {precision!r}")
    device = torch.device(device)
    if precision == "auto":
        return AUTO_DTYPES.get(device.type, torch.float32)
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


#: Device types whose per-frame paths avoid host synchronisation. On a GPU every data-dependent shape
#: (``nonzero``, boolean-mask indexing) and every value read (``int(t)``, ``.tolist()``) stalls the host until
#: the queue drains, so there the segmenters take fixed-shape formulations; on the CPU the sparse shortcuts
#: cost nothing extra and stay. Tests add ``cpu`` here to run (and count) the GPU formulation on the CPU.
SYNC_FREE_DEVICE_TYPES: set[str] = {"cuda"}


def sync_free(device: torch.device | str) -> bool:
    """Whether per-frame code on ``device`` must not synchronise with the host (see SYNC_FREE_DEVICE_TYPES)."""
    return torch.device(device).type in SYNC_FREE_DEVICE_TYPES


def upload(values, device: torch.device | str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """A small host table (list, tuple, numpy array) on ``device`` without a host wait, for per-frame code.

    ``torch.tensor(values, device="cuda")`` is a blocking copy: the host waits until the queue has drained.
    On CUDA the table goes through pinned memory with ``non_blocking`` (the caching host allocator keeps the
    buffer until the copy has run); elsewhere it is the tensor itself. tests/core/host_sync.py counts any other
    per-frame tensor made from host data as a synchronising copy.
    """
    t = torch.as_tensor(values, dtype=dtype)
    dev = torch.device(device)
    if dev.type != "cuda":
        return t.to(dev)
    return t.pin_memory().to(dev, non_blocking=True)


_THREAD_DEVICE = threading.local()


def select_device(device: torch.device | str | None) -> None:
    """Make ``device`` the calling thread's current CUDA device; a no-op for CPU (and for None).

    CUDA's current device is per thread and starts at 0, so a worker thread of a node configured with
    ``device:=cuda:1`` would otherwise allocate, and launch kernels that take the current device's stream
    (FC-CLIP's deformable attention), on GPU 0. Every thread that may touch the model calls this at its entry
    (and again before work of a possibly re-configured model: the call is free when nothing changes).
    """
    if device is None:
        return
    device = torch.device(device)
    if device.type != "cuda":
        return
    index = device.index if device.index is not None else 0
    if getattr(_THREAD_DEVICE, "index", None) == index:
        return
    torch.cuda.set_device(index)
    _THREAD_DEVICE.index = index


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when available; an explicit CUDA device on a machine without one is an error."""
    if device in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ModelLoadError(f"invalid device {device!r}: {exc}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available; use device:=cpu or auto")
    return dev


@dataclass
class ClipModel:
    """A frozen open_clip model with what the segmenters need beside it."""

    model: torch.nn.Module
    tokenizer: Callable
    spec: ModelSpec
    #: Identity of the weights, used to key text-embedding caches (architecture + weights source).
    key: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    device: torch.device
    dtype: torch.dtype
    #: False when the weights are random (disk caches are then disabled: they would be meaningless).
    has_weights: bool

    @property
    def visual(self) -> torch.nn.Module:
        return self.model.visual

    @property
    def context_length(self) -> int:
        return int(getattr(self.model, "context_length", 77))

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp().clamp(max=100).item())

    def pixel_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) as (1, 3, 1, 1) tensors on the model's device, for normalising 0..1 RGB."""
        mean = upload(self.mean, self.device, torch.float32).view(1, 3, 1, 1)
        std = upload(self.std, self.device, torch.float32).view(1, 3, 1, 1)
        return mean, std

    def to(self, device: torch.device | str) -> "ClipModel":
        """Move to ``device`` in the dtype its precision means there (``auto``: fp16 on CUDA, fp32 on CPU).

        Keeping the dtype would park a CUDA fp16 model on the CPU in fp16, where text encoding runs several
        times slower. The casts lose nothing on a round trip: every fp16 (or bf16) value is exactly an fp32
        value, so fp16 -> fp32 -> fp16 gives back the same bits (tests/core/test_precision.py checks it).
        Weights loaded in fp32 and first moved to fp16 are rounded once, as any fp16 load would be.
        """
        self.device = torch.device(device)
        self.dtype = resolve_dtype(self.spec.precision, self.device)
        self.model.to(device=self.device, dtype=self.dtype)
        return self


#: What a weights file may start with: a torch.save zip archive, a pickle (legacy torch.save, detectron2 .pkl),
#: or safetensors (an 8-byte little-endian header length, then a JSON header).
WEIGHTS_FORMATS = "a PyTorch state dict (.pt/.pth/.bin, torch.save zip or pickle) or a .safetensors file"


def check_weights_file(path: str | Path, what: str = "checkpoint") -> str:
    """The format of weights file ``path`` from its first bytes: ``zip``, ``pickle`` or ``safetensors``.

    Nothing is unpickled or loaded: a text file, an image or an empty file (``checkpoint:=/etc/passwd``)
    is refused here with a message naming the file and what was expected, instead of an error from deep
    inside the loader.

    Raises:
        ModelLoadError: missing, a directory, unreadable, or not a weights file.
    """
    p = Path(path)
    if p.is_dir():
        raise ModelLoadError(f"{what} {str(p)!r} is a directory; expected a weights file: {WEIGHTS_FORMATS}")
    try:
        with open(p, "rb") as f:
            head = f.read(16)
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise ModelLoadError(f"{what} {str(p)!r} does not exist; expected a weights file: {WEIGHTS_FORMATS}") from None
    except OSError as exc:
        raise ModelLoadError(f"{what} {str(p)!r} cannot be read ({exc.strerror or type(exc).__name__})") from None
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if 2 <= header_len <= size - 8 and head[8:9] == b"{":
            return "safetensors"
    kind = "an empty file" if size == 0 else f"a file of {size} bytes starting with {head[:8].hex()}"
    raise ModelLoadError(f"{what} {str(p)!r} is not a weights file ({kind}); expected {WEIGHTS_FORMATS}")


_HASHES: dict[tuple, str] = {}
_HASH_LOCK = threading.Lock()
#: File in a cache folder that keeps content hashes across restarts (hashing 1.5 GB of weights takes seconds).
HASH_MEMO_FILE = "weights_sha256.json"
_HASH_MEMO_ENTRIES = 256
_HASH_MEMO_MAX_BYTES = 256 * 1024


def file_content_hash(path: str | Path, memo_dir: Optional[str | Path] = None) -> str:
    """SHA-256 of the file's bytes (hex), computed once per distinct file state.

    The memo is keyed by (path, device, inode, size, mtime, ctime): a file replaced in place, even with the
    same size and a forged mtime, gets a new inode or ctime (which no user can set) and is hashed again.
    ``memo_dir`` (the node's cache folder) also keeps the memo on disk, so a restart does not hash the same
    weights again; an unreadable or malformed memo file is ignored and rewritten.
    """
    p = Path(path).resolve()
    st = p.stat()
    sig = (str(p), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    with _HASH_LOCK:
        hit = _HASHES.get(sig)
    memo = _read_hash_memo(memo_dir) if hit is None and memo_dir else {}
    hit = hit or memo.get(repr(sig))
    if hit is None:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        hit = h.hexdigest()
        if memo_dir:
            _write_hash_memo(memo_dir, {**memo, repr(sig): hit})
    with _HASH_LOCK:
        _HASHES[sig] = hit
    return hit


def _read_hash_memo(memo_dir: str | Path) -> dict[str, str]:
    """The on-disk memo: {repr(signature): hex digest}, only well-formed entries; {} when absent or bad."""
    path = Path(memo_dir).expanduser() / HASH_MEMO_FILE
    try:
        if path.stat().st_size > _HASH_MEMO_MAX_BYTES:
            return {}
        data = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str) and len(v) == 64
            and all(c in "0123456789abcdef" for c in v)}


def _write_hash_memo(memo_dir: str | Path, memo: dict[str, str]) -> None:
    """Keep the newest entries (dicts keep insertion order); a failed write only costs a later re-hash."""
    from .untrusted import atomic_write

    entries = list(memo.items())[-_HASH_MEMO_ENTRIES:]
    try:
        folder = Path(memo_dir).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / HASH_MEMO_FILE, json.dumps(dict(entries)).encode("utf-8"))
    except OSError as exc:
        log.debug("weights hash memo not written in %s: %s", memo_dir, exc)


def _weights_key(spec: ModelSpec, cache_dir: Optional[str] = None) -> tuple[str, bool]:
    if spec.checkpoint:
        return f"{spec.name}@sha256:{file_content_hash(spec.checkpoint, cache_dir)[:32]}", True
    if spec.pretrained:
        return f"{spec.name}@{spec.pretrained}", True
    return f"{spec.name}@random:{os.getpid()}:{id(spec)}", False


def missing_weights_message(spec: ModelSpec, cache_dir: Optional[str]) -> str:
    """Say exactly what to download for ``spec`` and where to put it."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(spec.name, spec.pretrained) if spec.pretrained else {}
    source = []
    if cfg.get("hf_hub"):
        repo = cfg["hf_hub"].rstrip("/")
        source.append(f"the Hugging Face repository '{repo}' (file open_clip_model.safetensors or "
                      f"open_clip_pytorch_model.bin)")
    if cfg.get("url"):
        source.append(f"the URL {cfg['url']}")
    where = cache_dir or os.environ.get("HF_HUB_CACHE") or "~/.cache/huggingface/hub"
    src = " or ".join(source) if source else "the model's publisher"
    return (
        f"weights for open_clip model '{spec.name}' with pretrained tag '{spec.pretrained}' are not available "
        f"offline. Download them from {src} on a machine with internet, then either pass the file as "
        f"checkpoint:=/path/to/weights (parameter 'checkpoint'), or pre-fill the cache at {where} "
        f"(e.g. `python -c \"import open_clip; open_clip.create_model('{spec.name}', pretrained='{spec.pretrained}')\"`"
        f" with internet) and keep offline:=true."
    )


def load_clip(
    spec: ModelSpec,
    device: str | torch.device = "cpu",
    cache_dir: Optional[str] = None,
    offline: bool = True,
) -> ClipModel:
    """Build the open_clip model of ``spec``, load its weights, freeze it and move it to ``device``.

    Raises:
        ModelLoadError: unknown architecture or tag, missing or mismatched checkpoint, no weights offline.
    """
    if offline:
        # Must be set before huggingface_hub is imported to take effect; patched below in case it was.
        os.environ["HF_HUB_OFFLINE"] = "1"
    import open_clip

    if offline:
        _force_hf_offline()
    register_model_configs()
    device = torch.device(device)
    dtype = resolve_dtype(spec.precision, device)
    if spec.name not in open_clip.list_models():
        raise ModelLoadError(
            f"unknown open_clip architecture {spec.name!r}; known ones include "
            f"{', '.join(m for m in open_clip.list_models() if 'ViT-B' in m or 'ovseg' in m)} ... "
            f"(open_clip.list_models() lists all)"
        )
    if spec.checkpoint:
        if not Path(spec.checkpoint).is_file():
            raise ModelLoadError(
                f"checkpoint {spec.checkpoint!r} does not exist; give the path of a weights file for "
                f"'{spec.name}' (.pt, .bin or .safetensors)"
            )
        check_weights_file(spec.checkpoint, f"checkpoint for '{spec.name}'")
        with _quiet_random_init_warning():  # the weights come right after, from the checkpoint
            model = open_clip.create_model(spec.name, pretrained=None, device="cpu")
        try:
            open_clip.load_checkpoint(model, spec.checkpoint, strict=True)
        except (RuntimeError, KeyError, ValueError, OSError) as exc:
            raise ModelLoadError(
                f"checkpoint {spec.checkpoint!r} does not fit architecture '{spec.name}': {_short(exc)}"
            ) from exc
        except Exception as exc:  # noqa: BLE001  (a weights-shaped file holding something else: IndexError, ...)
            raise ModelLoadError(
                f"checkpoint {spec.checkpoint!r} could not be read as weights of '{spec.name}' "
                f"(expected {WEIGHTS_FORMATS} holding its state dict): {_short(exc)}"
            ) from exc
    elif spec.pretrained:
        tags = open_clip.list_pretrained_tags_by_model(spec.name)
        if spec.pretrained not in tags:
            raise ModelLoadError(
                f"open_clip has no pretrained tag {spec.pretrained!r} for '{spec.name}'; known tags: {tags or 'none'}"
                f"; or give a local file as checkpoint:=..."
            )
        try:
            model = open_clip.create_model(spec.name, pretrained=spec.pretrained, device="cpu", cache_dir=cache_dir)
        except Exception as exc:  # hub/network/file errors come in many types
            raise ModelLoadError(missing_weights_message(spec, cache_dir) + f" (cause: {_short(exc)})") from exc
    elif spec.allow_random:
        log.warning("building %s with RANDOM weights: outputs are meaningless (tests/demo only)", spec.name)
        model = open_clip.create_model(spec.name, pretrained=None, device="cpu")
    else:
        raise ModelLoadError(
            f"no weights given for '{spec.name}': set pretrained (an open_clip tag) or checkpoint (a local file)"
        )
    model.eval().requires_grad_(False)
    model.to(device=device, dtype=dtype)
    pp = getattr(model.visual, "preprocess_cfg", None) or {}
    mean = tuple(pp.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(pp.get("std", open_clip.OPENAI_DATASET_STD))
    key, has_weights = _weights_key(spec, cache_dir)
    return ClipModel(
        model=model,
        tokenizer=open_clip.get_tokenizer(spec.name),
        spec=spec,
        key=key,
        mean=mean,
        std=std,
        device=device,
        dtype=dtype,
        has_weights=has_weights,
    )


def save_random_checkpoint(name: str, path: str | Path, seed: int = 0) -> Path:
    """Build ``name`` with random weights (seeded) and save its state_dict: the fixture of tests and demos."""
    import open_clip

    register_model_configs()
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None, device="cpu")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


@contextmanager
def _quiet_random_init_warning() -> Iterator[None]:
    """Hide open_clip's "No pretrained weights loaded ... initialized randomly" while the weights follow."""

    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "initialized randomly" not in record.getMessage()

    root = logging.getLogger()
    flt = _Drop()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


def _force_hf_offline() -> None:
    try:
        import huggingface_hub.constants as hf_constants

        hf_constants.HF_HUB_OFFLINE = True
    except ImportError:
        pass


def _short(exc: BaseException, limit: int = 400) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[:limit] + " ..."
