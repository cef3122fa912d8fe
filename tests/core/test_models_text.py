from __future__ import annotations

import time

import pytest
import torch

from ovseg_ros.core.models import ModelLoadError, ModelSpec, load_clip, resolve_device
from ovseg_ros.core.text import TextEncoder, imagenet_templates
from ovseg_ros.core.vocabulary import VocabularyError


def test_checkpoint_roundtrip_gives_the_saved_weights(tiny_vit_checkpoint) -> None:
    a = load_clip(ModelSpec("ovseg-tiny-vit", "", str(tiny_vit_checkpoint)))
    b = load_clip(ModelSpec("ovseg-tiny-vit", "", str(tiny_vit_checkpoint)))
    sd = torch.load(tiny_vit_checkpoint, weights_only=True)
    assert torch.equal(a.model.visual.proj, sd["visual.proj"])
    assert a.key == b.key and a.has_weights
    assert not any(p.requires_grad for p in a.model.parameters())


def test_missing_checkpoint_names_the_path(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_clip(ModelSpec("ovseg-tiny-vit", "", str(tmp_path / "nope.pt")))


def test_wrong_checkpoint_for_architecture(tiny_vit_checkpoint) -> None:
    with pytest.raises(ModelLoadError, match="does not fit"):
        load_clip(ModelSpec("ovseg-tiny-vit-l4", "", str(tiny_vit_checkpoint)))


def test_offline_hub_weights_fail_fast_naming_what_to_download() -> None:
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load_clip(ModelSpec("ViT-B-16-quickgelu", "openai"), offline=True)
    msg = str(info.value)
    assert "ViT-B-16-quickgelu" in msg and "openai" in msg and "checkpoint:=" in msg
    assert "timm/vit_base_patch16_clip_224.openai" in msg  # where to download from
    assert time.perf_counter() - t0 < 20  # no 40 s of hub retries


def test_unknown_architecture_and_tag() -> None:
    with pytest.raises(ModelLoadError, match="unknown open_clip architecture"):
        load_clip(ModelSpec("no-such-model", "openai"))
    with pytest.raises(ModelLoadError, match="no pretrained tag"):
        load_clip(ModelSpec("ViT-B-16-quickgelu", "nonsense"))


def test_no_weights_without_allow_random() -> None:
    with pytest.raises(ModelLoadError, match="no weights"):
        load_clip(ModelSpec("ovseg-tiny-vit", "", ""))
    assert not load_clip(ModelSpec("ovseg-tiny-vit", "", "", allow_random=True)).has_weights


def test_bad_device_is_a_clear_error() -> None:
    with pytest.raises(ModelLoadError):
        resolve_device("banana")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            resolve_device("cuda:0")
    assert resolve_device("auto").type in ("cpu", "cuda")


def test_text_cache_memory_then_disk(tiny_vit_checkpoint, tmp_path) -> None:
    spec = ModelSpec("ovseg-tiny-vit", "", str(tiny_vit_checkpoint))
    enc = TextEncoder(load_clip(spec), tmp_path)
    first = enc.encode_templated(["chair", "door"], imagenet_templates())
    assert first.shape == (2, 32)
    assert torch.allclose(first.norm(dim=-1), torch.ones(2))
    assert enc.stats["encoded_prompts"] == 160
    again = enc.encode_templated(["chair", "door"], imagenet_templates())
    assert enc.stats["memory_hits"] == 2 and torch.equal(first, again)
    # A new process (new encoder) reads the disk cache: nothing is encoded again.
    enc2 = TextEncoder(load_clip(spec), tmp_path)
    third = enc2.encode_templated(["chair", "door"], imagenet_templates())
    assert enc2.stats == {"memory_hits": 0, "disk_hits": 2, "encoded_prompts": 0}
    assert torch.allclose(first, third, atol=1e-6)


def test_text_cache_is_keyed_by_weights(tiny_vit_checkpoint, tmp_path) -> None:
    from ovseg_ros.core.models import save_random_checkpoint

    other = save_random_checkpoint("ovseg-tiny-vit", tmp_path / "other.pt", seed=1)
    a = TextEncoder(load_clip(ModelSpec("ovseg-tiny-vit", "", str(tiny_vit_checkpoint))), tmp_path / "c")
    b = TextEncoder(load_clip(ModelSpec("ovseg-tiny-vit", "", str(other))), tmp_path / "c")
    ea, eb = a.encode_texts(["chair"]), b.encode_texts(["chair"])
    assert b.stats["disk_hits"] == 0 and not torch.allclose(ea, eb)


def test_random_weights_never_touch_the_disk_cache(tmp_path) -> None:
    enc = TextEncoder(load_clip(ModelSpec("ovseg-tiny-vit", "", "", allow_random=True)), tmp_path / "c")
    enc.encode_texts(["chair"])
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").rglob("*.npy"))


def test_text_longer_than_context_is_refused(tiny_vit_checkpoint) -> None:
    enc = TextEncoder(load_clip(ModelSpec("ovseg-tiny-vit", "", str(tiny_vit_checkpoint))))
    long_text = " ".join(["word"] * 100)
    with pytest.raises(VocabularyError, match="tokens long"):
        enc.encode_texts([long_text])
