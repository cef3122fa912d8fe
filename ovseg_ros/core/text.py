"""Text side shared by all segmenters: prompt templates (data), context checks, and a cached encoder.

:class:`TextEncoder` encodes *groups* of prompts (e.g. one class name under 80 templates) and caches each
group's per-prompt, L2-normalised embeddings in memory and on disk, keyed by the model's weights identity
and the exact prompt texts. A vocabulary seen before (even in another process) is therefore free to encode
again; random-weight models get the memory cache only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from . import cancel
from .models import ClipModel
from .untrusted import atomic_write as _atomic_write
from .vocabulary import VocabularyError

log = logging.getLogger(__name__)


def imagenet_templates() -> tuple[str, ...]:
    """The 80 OpenAI ImageNet prompt templates (from open_clip's metadata), as ``{}`` format strings."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)


#: The single template of the CLIP-ES/CaR CAM stage (chosen by the CLIP-ES sharpness criterion).
ORIGAMI_TEMPLATE = "a clean origami {}."

#: The 14 ViLD prompt templates FC-CLIP encodes every class name with (CaR's classifier adds the origami one).
VILD_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "This is a photo of a {}",
    "There is a {} in the scene",
    "There is the {} in the scene",
    "a photo of a {} in the scene",
    "a photo of a small {}.",
    "a photo of a medium {}.",
    "a photo of a large {}.",
    "This is a photo of a small {}.",
    "This is a photo of a medium {}.",
    "This is a photo of a large {}.",
    "There is a small {} in the scene.",
    "There is a medium {} in the scene.",
    "There is a large {} in the scene.",
)

#: Plain template for quick, single-prompt encodings.
PHOTO_TEMPLATE = "a photo of a {}."


def format_prompts(name: str, templates: Sequence[str]) -> list[str]:
    return [t.format(name) for t in templates]


def count_tokens(tokenizer, text: str) -> int:
    """Number of tokens of ``text`` including start/end tokens (no truncation)."""
    enc = getattr(tokenizer, "encode", None)
    if callable(enc):
        try:
            return len(enc(text)) + 2
        except TypeError:
            pass
    inner = getattr(tokenizer, "tokenizer", None)  # HF tokenizer wrappers
    if inner is not None:
        return len(inner(text)["input_ids"])
    return 0


#: Default bound of a :class:`TextEncoder`'s memory cache: 64 MB holds the 80-template groups of ~400 classes
#: of a ViT-B/16 (160 kB each), several vocabularies' worth; beyond it the disk cache serves them.
DEFAULT_MEMORY_BYTES = 64 << 20
#: The same bound in MB: the ``text_cache_mb`` option of every segmenter's ``from_config`` and of the node.
DEFAULT_TEXT_CACHE_MB = 64.0


def text_cache_bytes(mb: float) -> int:
    """``text_cache_mb`` -> bytes (0 disables the memory cache).

    Raises:
        ValueError: a negative or non-finite value.
    """
    import math

    if not isinstance(mb, (int, float)) or isinstance(mb, bool) or not math.isfinite(mb) or mb < 0:
        raise ValueError(f"text_cache_mb must be a finite number >= 0, got {mb!r}")
    return int(mb * (1 << 20))


class TextEncoder:
    """Encode prompt groups with a frozen CLIP; cache results in memory (LRU) and on disk.

    Args:
        clip: the model whose text tower encodes.
        cache_dir: folder for the disk cache ("" disables it); one sub-folder per model weights key.
        max_memory_groups: LRU size of the in-memory cache, in groups.
        batch_size: prompts per forward of the text tower.
        max_memory_bytes: bound of the in-memory cache in bytes (:data:`DEFAULT_MEMORY_BYTES`; 0 = no memory
            cache). Groups differ in size by 80x (one prompt or 80 templates), so a count alone bounds
            nothing: 4096 groups of ViT-B/16 templated prompts are ~650 MB of host RAM.

    The memory cache holds host (CPU) copies, so moving the model between devices never leaves text
    embeddings in GPU memory; :meth:`clear_memory` empties it (the node calls it on deactivate).
    """

    def __init__(
        self, clip: ClipModel, cache_dir: str | Path = "", max_memory_groups: int = 4096, batch_size: int = 256,
        max_memory_bytes: Optional[int] = None,
    ) -> None:
        self.clip = clip
        self.batch_size = batch_size
        self.max_memory_groups = max_memory_groups
        self.max_memory_bytes = DEFAULT_MEMORY_BYTES if max_memory_bytes is None else int(max_memory_bytes)
        self._memory_bytes = 0
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self._disk: Optional[Path] = None
        self._dim: Optional[int] = _embedding_dim(clip.model)
        self.stats = {"memory_hits": 0, "disk_hits": 0, "encoded_prompts": 0}
        #: Disk entries refused by validation (corrupt, foreign, non-finite, not unit-norm) and evicted.
        self.rejected_entries = 0
        if cache_dir and clip.has_weights:
            # clip.key holds a content hash of the weights file (models.file_content_hash), so another file
            # at the same path, size and mtime gets another folder.
            digest = hashlib.sha256(clip.key.encode()).hexdigest()[:24]
            folder = Path(cache_dir).expanduser() / digest
            try:
                folder.mkdir(parents=True, exist_ok=True)
                _atomic_write(folder / "MODEL", (clip.key + "\n").encode())
                self._disk = folder
            except OSError as exc:
                log.warning("text cache folder %s is not usable (%s); caching in memory only", folder, exc)

    # -- validation --------------------------------------------------------------------------------
    def check_context(self, texts: Sequence[str], what: str = "text") -> None:
        """Raise :class:`VocabularyError` for any text longer than the model's context (CLIP truncates silently)."""
        limit = self.clip.context_length
        for text in texts:
            n = count_tokens(self.clip.tokenizer, text)
            if n > limit:
                raise VocabularyError(
                    f"{what} {text[:60]!r}{'...' if len(text) > 60 else ''} is {n} tokens long; "
                    f"the model '{self.clip.spec.name}' reads at most {limit} (including start/end tokens)"
                )

    # -- encoding ----------------------------------------------------------------------------------
    def encode_group(self, prompts: Sequence[str]) -> torch.Tensor:
        """(len(prompts), D) L2-normalised embeddings, float32 on the model's device."""
        key = prompt_key(prompts)
        with self._lock:
            hit = self._memory.get(key)
            if hit is not None and hit.shape[0] == len(prompts):
                self._memory.move_to_end(key)
                self.stats["memory_hits"] += 1
                # Non-blocking from the (never modified) host copy: CaR fetches its CAM texts every loop step,
                # and a blocking copy would wait for the device queue each time.
                return hit.to(self.clip.device, non_blocking=True)
        emb = self._load_disk(key, len(prompts))
        if emb is None:
            self.check_context(prompts, "prompt")
            emb = self._encode(prompts).cpu()
            if self._dim is None:
                self._dim = int(emb.shape[1])
            if _embedding_problem(emb.numpy(), len(prompts), self._dim) is None:
                self._save_disk(key, emb)  # a non-finite encoding (broken weights) is never cached
        else:
            self.stats["disk_hits"] += 1
        self._remember(key, emb.cpu())
        return emb.to(self.clip.device)

    def _remember(self, key: str, emb: torch.Tensor) -> None:
        """Keep ``emb`` (host) in the LRU, evicting the oldest groups past the group and byte bounds."""
        size = emb.numel() * emb.element_size()
        with self._lock:
            old = self._memory.pop(key, None)
            if old is not None:
                self._memory_bytes -= old.numel() * old.element_size()
            if size > self.max_memory_bytes:
                return  # larger than the whole bound: served, not kept
            self._memory[key] = emb
            self._memory_bytes += size
            while len(self._memory) > self.max_memory_groups or self._memory_bytes > self.max_memory_bytes:
                _, dropped = self._memory.popitem(last=False)
                self._memory_bytes -= dropped.numel() * dropped.element_size()

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the in-memory cache now."""
        with self._lock:
            return self._memory_bytes

    def clear_memory(self) -> None:
        """Drop the in-memory cache (the disk cache stays: a later vocabulary reads it back)."""
        with self._lock:
            self._memory.clear()
            self._memory_bytes = 0

    def encode_templated(self, names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """(len(names), D): per name, the mean of its normalised template prompts, renormalised."""
        out = [self.encode_group(format_prompts(n, templates)).mean(dim=0) for n in names]
        return torch.nn.functional.normalize(torch.stack(out), dim=-1)

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(len(texts), D) normalised embeddings of raw texts (each its own cache group)."""
        return torch.cat([self.encode_group([t]) for t in texts]) if texts else torch.empty(0)

    @torch.inference_mode()
    def _encode(self, prompts: Sequence[str]) -> torch.Tensor:
        chunks = []
        for i in range(0, len(prompts), self.batch_size):
            cancel.check()  # between batches: an abandoned vocabulary job stops here
            tokens = self.clip.tokenizer(list(prompts[i:i + self.batch_size])).to(self.clip.device)
            feats = self.clip.model.encode_text(tokens).float()
            chunks.append(torch.nn.functional.normalize(feats, dim=-1))
        self.stats["encoded_prompts"] += len(prompts)
        return torch.cat(chunks)

    def _load_disk(self, key: str, n: int) -> Optional[torch.Tensor]:
        if self._disk is None:
            return None
        path = self._disk / f"{key}.npy"
        if not path.is_file():
            return None
        try:
            arr = np.load(path, allow_pickle=False)
            problem = _embedding_problem(arr, n, self._dim)
        except Exception as exc:  # noqa: BLE001  (truncated, not .npy, object arrays, ...)
            problem = f"unreadable ({type(exc).__name__})"
        if problem is not None:
            # A corrupt or foreign entry is evicted and the group encoded again, never served.
            self.rejected_entries += 1
            log.warning("text cache entry %s rejected (%s); re-encoding", path.name, problem)
            try:
                path.unlink()
            except OSError:
                pass
            return None
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))

    def _save_disk(self, key: str, emb: torch.Tensor) -> None:
        if self._disk is None:
            return
        import io

        buf = io.BytesIO()
        np.save(buf, emb.detach().cpu().numpy().astype(np.float32))
        try:
            _atomic_write(self._disk / f"{key}.npy", buf.getvalue())
        except OSError as exc:
            log.warning("text cache write failed (%s); continuing without disk cache", exc)


def prompt_key(prompts: Sequence[str]) -> str:
    """Cache key of a prompt group: a hash of its JSON encoding, so no text can fake a group boundary
    (joining with a separator made ``["a\x1fb"]`` and ``["a", "b"]`` the same key)."""
    encoded = json.dumps(list(prompts), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(encoded.encode("utf-8", "surrogatepass")).hexdigest()[:40]


#: Tolerance on the L2 norm of a cached row (float32 round-off is ~1e-7; fp16 encoders ~1e-3).
_NORM_TOLERANCE = 1e-2


def _embedding_problem(arr: np.ndarray, n: int, dim: Optional[int]) -> Optional[str]:
    """Why ``arr`` is not a valid (n, dim) block of L2-normalised float embeddings (None when it is)."""
    if not isinstance(arr, np.ndarray) or arr.dtype.kind != "f":
        return f"dtype {getattr(arr, 'dtype', type(arr).__name__)} is not floating point"
    if arr.ndim != 2 or arr.shape[0] != n or (dim is not None and arr.shape[1] != dim):
        return f"shape {arr.shape} is not ({n}, {dim if dim is not None else 'D'})"
    if not np.isfinite(arr).all():
        return "non-finite values"
    norms = np.linalg.norm(arr.astype(np.float64), axis=1)
    if np.abs(norms - 1.0).max(initial=0.0) > _NORM_TOLERANCE:
        return "rows are not unit-norm"
    return None


def _embedding_dim(model: torch.nn.Module) -> Optional[int]:
    """Width of the text embeddings of an open_clip model, when it says (None: learnt at the first encoding)."""
    proj = getattr(model, "text_projection", None)
    if isinstance(proj, torch.Tensor) and proj.ndim == 2:
        return int(proj.shape[1])
    if isinstance(proj, torch.nn.Linear):
        return int(proj.out_features)
    dim = getattr(getattr(model, "text", None), "output_dim", None)
    return int(dim) if isinstance(dim, int) else None
