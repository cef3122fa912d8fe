"""Text-embedding cache identity and integrity; weights files that are not weights."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ovseg_ros.core.models import ModelLoadError, ModelSpec, check_weights_file, load_clip, save_random_checkpoint
from ovseg_ros.core.text import TextEncoder, prompt_key


def test_same_path_size_and_mtime_with_other_content_gets_other_embeddings(tmp_path: Path) -> None:
    a = save_random_checkpoint("ovseg-tiny-vit", tmp_path / "a.pt", seed=0)
    b = save_random_checkpoint("ovseg-tiny-vit", tmp_path / "b.pt", seed=1)
    assert a.stat().st_size == b.stat().st_size
    weights = tmp_path / "weights.pt"
    shutil.copy(a, weights)
    st = weights.stat()
    spec = ModelSpec("ovseg-tiny-vit", "", str(weights))
    first = TextEncoder(load_clip(spec), tmp_path / "cache").encode_texts(["chair"])
    shutil.copy(b, weights)  # another model, forged to the same path, size and mtime
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    enc = TextEncoder(load_clip(spec), tmp_path / "cache")
    second = enc.encode_texts(["chair"])
    assert enc.stats["disk_hits"] == 0 and not torch.allclose(first, second)


def test_prompt_key_is_unambiguous() -> None:
    assert prompt_key(["chair\x1fdoor"]) != prompt_key(["chair", "door"])
    assert prompt_key(["a", "b"]) != prompt_key(["a, b"]) and prompt_key(["x"]) == prompt_key(("x",))


def test_a_text_with_the_old_separator_gets_one_row(tiny_vit_checkpoint: Path, tmp_path: Path) -> None:
    enc = TextEncoder(load_clip(ModelSpec("ovseg-tiny-vit", "", str(tiny_vit_checkpoint))), tmp_path)
    enc.encode_group(["chair", "door"])
    assert enc.encode_texts(["chair\x1fdoor"]).shape[0] == 1


@pytest.mark.parametrize("corrupt", ["nan", "unnormalised", "shape", "dtype", "garbage", "pickle"])
def test_bad_disk_entries_are_evicted_and_recomputed(tiny_vit_checkpoint: Path, tmp_path: Path, corrupt: str) -> None:
    spec = ModelSpec("ovseg-tiny-vit", "", str(tiny_vit_checkpoint))
    clip = load_clip(spec)
    good = TextEncoder(clip, tmp_path).encode_group(["a photo of a chair."]).cpu()
    [entry] = [p for p in tmp_path.rglob("*.npy")]
    arr = np.load(entry)
    if corrupt == "nan":
        arr[0, 0] = np.nan
        np.save(entry, arr)
    elif corrupt == "unnormalised":
        np.save(entry, arr * 3)
    elif corrupt == "shape":
        np.save(entry, np.concatenate([arr, arr], axis=1) / np.sqrt(2))
    elif corrupt == "dtype":
        np.save(entry, (arr * 1000).astype(np.int32))
    elif corrupt == "garbage":
        entry.write_bytes(b"\x93NUMPY garbage")
    else:
        np.save(entry, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    enc = TextEncoder(clip, tmp_path)
    again = enc.encode_group(["a photo of a chair."]).cpu()
    assert enc.rejected_entries == 1 and enc.stats["disk_hits"] == 0 and enc.stats["encoded_prompts"] == 1
    assert torch.allclose(good, again, atol=1e-5)
    assert _embedding_ok(np.load(entry))  # rewritten with the good value


def _embedding_ok(arr: np.ndarray) -> bool:
    return arr.dtype == np.float32 and np.isfinite(arr).all() and np.allclose(np.linalg.norm(arr, axis=1), 1, atol=1e-4)


def test_unwritable_cache_folder_falls_back_to_memory(tiny_vit_checkpoint: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    enc = TextEncoder(load_clip(ModelSpec("ovseg-tiny-vit", "", str(tiny_vit_checkpoint))), blocker)
    assert enc.encode_texts(["chair"]).shape[0] == 1
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize("content", [b"root:x:0:0:root:/root:/bin/bash\n", b"", b"\x89PNG\r\n\x1a\n0000"])
def test_checkpoint_that_is_not_weights_is_a_clear_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "passwd"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=r"'.*passwd' is not a weights file .*expected a PyTorch state dict"):
        load_clip(ModelSpec("ovseg-tiny-vit", "", str(path)))


def test_checkpoint_directory_and_weights_formats(tmp_path: Path, tiny_vit_checkpoint: Path) -> None:
    with pytest.raises(ModelLoadError, match="is a directory"):
        check_weights_file(tmp_path)
    assert check_weights_file(tiny_vit_checkpoint) == "zip"
    pickled = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(1)}, pickled, _use_new_zipfile_serialization=False)
    assert check_weights_file(pickled) == "pickle"
    header = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    st = tmp_path / "w.safetensors"
    st.write_bytes(len(header).to_bytes(8, "little") + header + b"\0\0\0\0")
    assert check_weights_file(st) == "safetensors"


def test_weights_shaped_file_with_other_content_is_a_model_load_error(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save([1, 2, 3], path)  # a valid torch file that is no state dict
    with pytest.raises(ModelLoadError, match="other.pt"):
        load_clip(ModelSpec("ovseg-tiny-vit", "", str(path)))


def test_fcclip_checkpoint_that_is_not_weights(tmp_path: Path) -> None:
    from ovseg_ros.core.fcclip.convert import read_checkpoint

    path = tmp_path / "passwd"
    path.write_text("root:x:0:0:root:/root:/bin/bash\n")
    with pytest.raises(ModelLoadError, match="FC-CLIP checkpoint .*passwd' is not a weights file"):
        read_checkpoint(path)


def test_a_cancelled_encoding_stops_between_batches_and_caches_nothing(tiny_vit_checkpoint: Path,
                                                                        tmp_path: Path) -> None:
    import threading

    from ovseg_ros.core.cancel import Cancelled, cancellable

    enc = TextEncoder(load_clip(ModelSpec("ovseg-tiny-vit", "", str(tiny_vit_checkpoint))), tmp_path,
                      batch_size=2)
    stop = threading.Event()
    calls = {"n": 0}
    forward = enc.clip.model.encode_text

    def counting(tokens: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 2:
            stop.set()  # the model is replaced while the second batch runs
        return forward(tokens)

    enc.clip.model.encode_text = counting
    with cancellable(stop), pytest.raises(Cancelled):
        enc.encode_group(["a", "b", "c", "d", "e", "f"])
    assert calls["n"] == 2  # stopped before the third batch
    assert enc.stats["encoded_prompts"] == 0 and not list(tmp_path.rglob("*.npy"))
    assert enc.encode_group(["a", "b"]).shape[0] == 2  # outside a scope nothing is checked


def test_weights_hash_memo_survives_a_restart_but_not_a_replaced_file(tmp_path: Path, monkeypatch) -> None:
    from ovseg_ros.core import models

    weights = save_random_checkpoint("ovseg-tiny-vit", tmp_path / "w.pt", seed=0)
    memo = tmp_path / "cache"
    first = models.file_content_hash(weights, memo)
    assert (memo / models.HASH_MEMO_FILE).is_file()
    models._HASHES.clear()  # a new process
    real_open = open
    reads: list[str] = []

    def counting_open(file, mode="r", *args, **kwargs):  # type: ignore[no-untyped-def]
        if Path(str(file)) == weights.resolve() and mode == "rb":
            reads.append(str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", counting_open)
    assert models.file_content_hash(weights, memo) == first and reads == []  # from the memo, not hashed
    models._HASHES.clear()
    st = weights.stat()
    shutil.copy(save_random_checkpoint("ovseg-tiny-vit", tmp_path / "other.pt", seed=1), weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # same path, size and mtime: ctime still moves
    assert models.file_content_hash(weights, memo) != first and len(reads) == 1
    # A malformed memo file is ignored (and rewritten), never trusted.
    (memo / models.HASH_MEMO_FILE).write_text('{"x": "not a digest", "y": 3}')
    models._HASHES.clear()
    assert models.file_content_hash(weights, memo) != first and len(reads) == 2
