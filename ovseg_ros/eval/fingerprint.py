"""What an evaluation's per-image records depend on, so that a resumed run never mixes results.

The fingerprint is stored in ``run.json`` and in ``report.json`` (``run.fingerprint``); a rerun into the same
output folder reuses the records only when every field is equal, otherwise it is refused with the fields that
differ (``--overwrite`` starts afresh). Fields:

* ``segmenter``, ``preset``: the method and preset names;
* ``config``: the resolved segmenter configuration (preset + overrides, every option of the config
  dataclass), so an edited preset file or a changed default is seen as well as a changed ``--options``;
* ``weights``: per weights source of the configuration (``model``, ``checkpoint``, ``classifier``, ...) the
  SHA-256 of the file's content (``sha256:<hex>``), or ``<architecture>@<pretrained tag>`` for weights
  open_clip fetches by name, or ``random`` (tests); other files an option names (``*_file``) are hashed too,
  so a replaced checkpoint at the same path is caught;
* ``package``: the ovseg_ros version;
* ``dataset``: name, resolved root, class names, ignore label, number of images and a SHA-256 over the sorted
  (id, image file, annotation file, annotation size) list; for COCO panoptic also the annotation JSON's
  SHA-256 (it holds the segments). Image contents are not read (cost); a changed split or annotation set is.

Not in it: the device, precision "auto" resolution, ``--limit``, the number of processes (records of any
rank count are reused) and the progress or output options.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Optional

from .datasets import Dataset

#: Config fields that name files whose content decides the results.
_FILE_FIELDS = ("checkpoint",)
_FILE_SUFFIX = "_file"


def package_version() -> str:
    from .. import __version__

    return str(__version__)


def _plain(value: Any) -> Any:
    """A JSON-ready copy of a (nested) config value: dataclasses as dicts, tuples as lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def resolved_config(config: Any) -> dict[str, Any]:
    """The segmenter's configuration as a JSON-ready mapping ({} for a config that is not a dataclass)."""
    plain = _plain(config)
    return plain if isinstance(plain, dict) else {}


def _walk(tree: Any, prefix: str = ""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _walk(v, f"{prefix}.{k}" if prefix else k)
    else:
        yield prefix, tree


def weights_identity(config: dict[str, Any], cache_dir: Optional[str] = None) -> dict[str, str]:
    """{config path: content hash or open_clip tag} of every weights source and option file of ``config``."""
    from ..core.models import file_content_hash

    out: dict[str, str] = {}
    for path, value in _walk(config):
        leaf = path.rsplit(".", 1)[-1]
        if (leaf in _FILE_FIELDS or leaf.endswith(_FILE_SUFFIX)) and isinstance(value, str) and value:
            p = Path(value).expanduser()
            out[path] = f"sha256:{file_content_hash(p, cache_dir)}" if p.is_file() else f"missing:{value}"
    # ModelSpecs that load by name: architecture@tag (open_clip's hub weights are fixed per tag).
    for path, value in _walk_specs(config):
        if not value.get("checkpoint"):
            out[path] = f"{value.get('name')}@{value['pretrained']}" if value.get("pretrained") else "random"
    return dict(sorted(out.items()))


def _walk_specs(tree: Any, prefix: str = ""):
    if isinstance(tree, dict):
        if {"name", "pretrained", "checkpoint"} <= set(tree):
            yield prefix or "model", tree
            return
        for k, v in tree.items():
            yield from _walk_specs(v, f"{prefix}.{k}" if prefix else k)


def dataset_identity(dataset: Dataset) -> dict[str, Any]:
    h = hashlib.sha256()
    root = Path(dataset.root).resolve()
    for s in sorted(dataset.samples, key=lambda s: s.id):
        try:
            size = s.annotation.stat().st_size
        except OSError:
            size = -1
        h.update(json.dumps([s.id, _rel(s.image, root), _rel(s.annotation, root), size]).encode())
    ident: dict[str, Any] = {"name": dataset.name, "root": str(root), "classes": list(dataset.class_names),
                             "ignore_index": dataset.ignore_index, "images": len(dataset.samples),
                             "samples_sha256": h.hexdigest()}
    for key, path in sorted(dataset._extra.get("identity_files", {}).items()):
        ident[f"{key}_sha256"] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return ident


def _rel(p: Path, root: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(root))
    except ValueError:
        return str(p)


def fingerprint(segmenter_name: str, preset: str, config: Any, dataset: Dataset,
                cache_dir: Optional[str] = None) -> dict[str, Any]:
    """The full fingerprint of an evaluation run (see the module docstring)."""
    cfg = resolved_config(config)
    return {"segmenter": segmenter_name, "preset": preset, "config": cfg,
            "weights": weights_identity(cfg, cache_dir), "package": package_version(),
            "dataset": dataset_identity(dataset)}


def differences(old: Optional[dict[str, Any]], new: dict[str, Any], limit: int = 8) -> list[str]:
    """Human-readable differences between two fingerprints (dotted paths), at most ``limit`` of them."""
    if not isinstance(old, dict):
        return ["the folder's run.json has no fingerprint (an older ovseg-eval or a damaged file)"]
    a, b = dict(_walk(old)), dict(_walk(new))
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            out.append(f"{key}: {_short(a.get(key, '<absent>'))} -> {_short(b.get(key, '<absent>'))}")
    if len(out) > limit:
        out = out[:limit] + [f"... and {len(out) - limit} more"]
    return out


def _short(value: Any, n: int = 80) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= n else text[: n - 3] + "..."
