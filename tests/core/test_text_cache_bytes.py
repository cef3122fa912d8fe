"""The text-embedding memory cache is bounded in bytes (``text_cache_mb``), not only in groups."""

from __future__ import annotations

from pathlib import Path

import pytest

from ovseg_ros.core.models import ModelSpec, load_clip
from ovseg_ros.core.segmenter import build_segmenter
from ovseg_ros.core.text import DEFAULT_MEMORY_BYTES, TextEncoder, text_cache_bytes


def test_memory_cache_is_bounded_in_bytes(tiny_vit_checkpoint: Path) -> None:
    clip = load_clip(ModelSpec("ovseg-tiny-vit", "", str(tiny_vit_checkpoint)))
    one = TextEncoder(clip).encode_group(["a photo of a chair.", "a chair."])
    group_bytes = one.numel() * 4  # float32 host copies
    enc = TextEncoder(clip, max_memory_bytes=3 * group_bytes)
    names = ["chair", "table", "door", "wall", "floor"]
    for n in names:
        enc.encode_group([f"a photo of a {n}.", f"a {n}."])
    assert enc.memory_bytes == 3 * group_bytes and len(enc._memory) == 3
    encoded = enc.stats["encoded_prompts"]
    enc.encode_group(["a photo of a floor.", "a floor."])  # newest: still in memory
    assert enc.stats["memory_hits"] == 1 and enc.stats["encoded_prompts"] == encoded
    enc.encode_group(["a photo of a chair.", "a chair."])  # evicted first: encoded again
    assert enc.stats["encoded_prompts"] == encoded + 2 and enc.memory_bytes <= 3 * group_bytes
    enc.clear_memory()
    assert enc.memory_bytes == 0 and not enc._memory


def test_zero_keeps_nothing_and_bad_values_are_refused(tiny_vit_checkpoint: Path) -> None:
    clip = load_clip(ModelSpec("ovseg-tiny-vit", "", str(tiny_vit_checkpoint)))
    enc = TextEncoder(clip, max_memory_bytes=0)
    enc.encode_group(["a chair."])
    enc.encode_group(["a chair."])
    assert enc.memory_bytes == 0 and enc.stats["memory_hits"] == 0 and enc.stats["encoded_prompts"] == 2
    assert text_cache_bytes(1.5) == 3 << 19 and TextEncoder(clip).max_memory_bytes == DEFAULT_MEMORY_BYTES
    for bad in (-1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="text_cache_mb"):
            text_cache_bytes(bad)


def test_segmenters_take_the_option(tiny_model_overrides: dict) -> None:
    seg = build_segmenter("dense_clip", "realtime", tiny_model_overrides, text_cache_mb=2.0)
    assert seg.text_encoder.max_memory_bytes == 2 << 20
