"""Fuzzing every decoder and parser that takes outside input: only clean refusals are allowed.

Each target gets seeded random inputs for a bounded time and asserts that the input is either accepted
(with a well-formed result) or refused with the module's own error type and a non-empty message; any
other exception fails the test, with the seed and input that caused it.

Budget: ``OVSEG_FUZZ_SECONDS`` seconds per target (default 0.25, a few seconds for the module in CI);
e.g. ``OVSEG_FUZZ_SECONDS=60 pytest tests/core/test_fuzz.py`` for a long run. ``OVSEG_FUZZ_SEED`` picks
the seed (default 0, so CI failures reproduce).
"""

from __future__ import annotations

import array
import json
import math
import os
import random
import struct
import time
import types
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

import cv2
import numpy as np
import pytest

from ovseg_ros.core.llm_text import MAX_ANSWER_CHARS, EndpointError, LLMConfig, LLMTextClient, clean_answer, parse_chat_response
from ovseg_ros.core.segmenter import ConfigError, check_overrides, list_segmenters
from ovseg_ros.core.untrusted import UntrustedInputError, load_yaml
from ovseg_ros.core.vocabulary import (
    Vocabulary,
    VocabularyError,
    check_query_texts,
    load_vocabulary_file,
    vocabulary_from_texts,
)
from ovseg_ros.ros.conversions import ENCODINGS, ConversionError, compressed_to_rgb, image_msg_to_rgb

BUDGET_S = float(os.environ.get("OVSEG_FUZZ_SECONDS", "0.25"))
SEED = int(os.environ.get("OVSEG_FUZZ_SEED", "0"))


def cases(make: Callable[[random.Random], Any], min_cases: int = 30) -> Iterator[Any]:
    """Inputs from ``make`` for BUDGET_S seconds (and at least ``min_cases``), from a seeded generator."""
    rng = random.Random(SEED)
    deadline = time.monotonic() + BUDGET_S
    n = 0
    while n < min_cases or time.monotonic() < deadline:
        yield make(rng)
        n += 1


def refused_cleanly(exc: BaseException, kind: type[BaseException] | tuple[type[BaseException], ...]) -> None:
    assert isinstance(exc, kind), f"{type(exc).__name__}: {str(exc)[:300]}"
    assert str(exc).strip(), f"{type(exc).__name__} without a message"


# --- value generators -------------------------------------------------------------------------------
_STRINGS = ["", " ", "chair", "a, b", ",", "x" * 5000, "\x00", "\n", "\x1f", "é", "2001-12-14", "{a: 1}", "nan",
            "[", "&a [*a]", "cpu\n", "cuda:99999999", "\ud800"]


def any_value(rng: random.Random, depth: int = 0) -> Any:
    pick = rng.randrange(12 if depth < 3 else 8)
    if pick == 0:
        return rng.choice([None, True, False])
    if pick == 1:
        return rng.choice([0, -1, 1, 2**31, -(2**63), 10**30, rng.randrange(-1000, 1000)])
    if pick == 2:
        return rng.choice([math.nan, math.inf, -math.inf, -0.0, 1e308, rng.uniform(-10, 10)])
    if pick in (3, 4):
        return rng.choice(_STRINGS)
    if pick == 5:
        return "".join(chr(rng.randrange(0, 0x3000)) for _ in range(rng.randrange(0, 20)))
    if pick == 6:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 16)))
    if pick == 7:
        return rng.choice([object(), 1j, b"", bytearray(b"ab")])
    if pick in (8, 9):
        return [any_value(rng, depth + 1) for _ in range(rng.randrange(0, 5))]
    return {str(any_value(rng, depth + 1))[:20] if rng.random() < 0.8 else rng.choice([None, 1, 1.5, True, b"k", (1,)]):
            any_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))}


def jsonable(value: Any) -> Any:
    """``value`` with every mapping key made a string (JSON's rule), other odd leaves as strings."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def yaml_text(rng: random.Random) -> str:
    tokens = ["a", "b:", "- ", "[", "]", "{", "}", ",", ": ", "&x ", "*x", "&y ", "*y", "!!str ", "!!binary ",
              "!!python/object:os.system ", "2001-12-14", "1e400", ".nan", "'", '"', "\n", "  ", "#", "? ", "|",
              ">", "<<: *x", "\t", "%YAML 1.1\n", "---\n", "...\n", "\\u0000", "\x85", "classes: ", "name: "]
    return "".join(rng.choice(tokens) for _ in range(rng.randrange(0, 60)))


# --- sensor_msgs/Image ----------------------------------------------------------------------------------
def image_msg(rng: random.Random) -> Any:
    encoding = rng.choice(list(ENCODINGS) + ["", "RGB8", "yuv422", "32FC1", 3, None, b"rgb8"])
    width = rng.choice([0, 1, 2, 7, 16, -1, 2**31, 10**9, 1.5, "4", None])
    height = rng.choice([0, 1, 3, 9, -5, 2**40, True])
    bpp = ENCODINGS[encoding].bytes_per_pixel if isinstance(encoding, str) and encoding in ENCODINGS else 1
    w = width if isinstance(width, int) and 0 < width < 64 else 1
    h = height if isinstance(height, int) and 0 < height < 64 else 1
    step = rng.choice([w * bpp, w * bpp + rng.randrange(0, 8), w * bpp - 1, 0, -3, 10**12, "x"])
    size = rng.choice([h * step if isinstance(step, int) and 0 < step < 10**6 else 0, rng.randrange(0, 200)])
    payload = bytes(rng.randrange(256) for _ in range(min(size, 20000)))
    data = rng.choice([payload, bytearray(payload), array.array("B", payload), list(payload), None, "text",
                       [300] * 3, np.frombuffer(payload, np.uint8) if payload else b"", array.array("f", [1.0])])
    return types.SimpleNamespace(encoding=encoding, width=width, height=height, step=step, data=data,
                                 is_bigendian=rng.choice([0, 1, True, None, "yes"]))


def test_fuzz_image_messages() -> None:
    accepted = 0
    for msg in cases(image_msg, 200):
        try:
            out = image_msg_to_rgb(msg, max_pixels=64 * 64)
        except Exception as exc:  # noqa: BLE001
            refused_cleanly(exc, ConversionError)
            continue
        assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
        accepted += 1
    assert accepted > 0  # the generator also makes valid messages


# --- sensor_msgs/CompressedImage ----------------------------------------------------------------------------
def _seed_files() -> list[bytes]:
    rng = np.random.default_rng(SEED)
    img = rng.integers(0, 256, (12, 17, 3), dtype=np.uint8)
    out = [cv2.imencode(ext, arr)[1].tobytes() for ext in (".png", ".jpg") for arr in (img, img[:, :, 0])]
    out.append(cv2.imencode(".png", (img.astype(np.uint16) * 257))[1].tobytes())
    return out


def _png_header(w: int, h: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))


def compressed_msg(rng: random.Random, seeds: list[bytes] = _seed_files()) -> Any:
    data = bytearray(rng.choice(seeds))
    op = rng.randrange(6)
    if op == 0:  # bit flips
        for _ in range(rng.randrange(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif op == 1:  # truncation
        data = data[: rng.randrange(len(data))]
    elif op == 2:  # a header that lies about the size
        data = bytearray(_png_header(rng.choice([0, 1, 50000, 2**32 - 1]), rng.choice([0, 3, 50000]))) + data[33:]
    elif op == 3:  # random bytes
        data = bytearray(rng.randrange(256) for _ in range(rng.randrange(0, 64)))
    elif op == 4 and data[:2] == b"\xff\xd8":  # JPEG frame header sizes
        i = data.find(b"\xff\xc0")
        if i > 0:
            data[i + 5: i + 9] = bytes(rng.randrange(256) for _ in range(4))
    return types.SimpleNamespace(format=rng.choice(["png", "jpeg", "", "rgb8; jpeg compressed bgr8"]),
                                 data=rng.choice([bytes(data), array.array("B", data), list(data)]))


def test_fuzz_compressed_images() -> None:
    accepted = 0
    for msg in cases(compressed_msg, 60):
        try:
            out = compressed_to_rgb(msg, max_pixels=256 * 256)
        except Exception as exc:  # noqa: BLE001
            refused_cleanly(exc, ConversionError)
            continue
        assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3 and out.shape[0] * out.shape[1] <= 65536
        accepted += 1
    assert accepted > 0


# --- YAML, segmenter options, parameters ----------------------------------------------------------------------
def test_fuzz_yaml_loader() -> None:
    for text in cases(yaml_text, 300):
        try:
            load_yaml(text, "fuzz", max_nodes=2000, max_depth=8)
        except Exception as exc:  # noqa: BLE001
            refused_cleanly(exc, UntrustedInputError)


@pytest.mark.parametrize("name", list_segmenters())
def test_fuzz_segmenter_options(name: str) -> None:
    from ovseg_ros.core.segmenter import get_segmenter_class

    fields = [f for f in get_segmenter_class(name).config_cls.__dataclass_fields__]

    def options(rng: random.Random) -> Any:
        if rng.random() < 0.1:
            return any_value(rng)
        return {rng.choice(fields + ["bogus", "model", "llm"]): any_value(rng) for _ in range(rng.randrange(1, 4))}

    for opts in cases(options, 50):
        try:
            check_overrides(name, "", opts)
        except Exception as exc:  # noqa: BLE001
            refused_cleanly(exc, ConfigError)


def test_fuzz_parameters() -> None:
    pytest.importorskip("rclpy")  # params.py declares QoS names from rclpy
    from ovseg_ros.ros.params import PARAMS, validate, validate_all

    names = [p.name for p in PARAMS] + ["unknown"]

    def values(rng: random.Random) -> tuple[str, Any, dict[str, Any]]:
        pending = {p.name: p.default for p in PARAMS}
        for _ in range(rng.randrange(0, 3)):
            pending[rng.choice(names)] = any_value(rng)
        name = rng.choice(names)
        value = yaml_text(rng) if name == "segmenter_options" and rng.random() < 0.5 else any_value(rng)
        pending[name] = value
        return name, value, pending

    for name, value, pending in cases(values, 150):
        reason = validate(name, value, pending)
        assert reason is None or (isinstance(reason, str) and reason and len(reason) < 2000)
        reasons = validate_all(pending)
        assert all(isinstance(r, str) and r for r in reasons)


# --- vocabularies and queries -------------------------------------------------------------------------------
def test_fuzz_vocabulary_requests() -> None:
    def request(rng: random.Random) -> tuple[Any, Any, Any]:
        n = rng.randrange(0, 6)
        entries = [rng.choice(_STRINGS + ["chair, seat", "seat", "table,", "Chair"]) if rng.random() < 0.8
                   else any_value(rng) for _ in range(n)]
        desc = rng.choice([(), [any_value(rng) for _ in range(n)], ["d"] * n, ["d"]])
        thing = rng.choice([(), [True] * n, [any_value(rng)] * n, [False]])
        return entries, desc, thing

    for entries, desc, thing in cases(request, 200):
        try:
            Vocabulary.from_request(entries, desc, thing)
        except Exception as exc:  # noqa: BLE001
            refused_cleanly(exc, VocabularyError)
        try:
            vocabulary_from_texts(entries)
            check_query_texts(entries)
        except Exception as exc:  # noqa: BLE001
            refused_cleanly(exc, VocabularyError)


def test_fuzz_vocabulary_files(tmp_path: Path) -> None:
    path = tmp_path / "vocabulary.yaml"

    def content(rng: random.Random) -> bytes:
        if rng.random() < 0.5:
            doc = {"classes": [any_value(rng) if rng.random() < 0.3 else
                               {rng.choice(["name", "synonyms", "description", "is_thing", "x"]): any_value(rng)}
                               for _ in range(rng.randrange(0, 4))]}
            try:
                return json.dumps(jsonable(doc)).encode()
            except ValueError:  # NaN is fine for JSON-in-YAML; anything else falls back
                return b"classes: []"
        if rng.random() < 0.2:
            return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40)))
        return ("classes:\n" + yaml_text(rng)).encode("utf-8", "surrogatepass")

    for data in cases(content, 150):
        path.write_bytes(data)
        try:
            load_vocabulary_file(path)
        except Exception as exc:  # noqa: BLE001
            refused_cleanly(exc, VocabularyError)


# --- LLM answers and caches ----------------------------------------------------------------------------------
def test_fuzz_llm_answers() -> None:
    def body(rng: random.Random) -> bytes:
        pick = rng.randrange(4)
        if pick == 0:
            return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 50)))
        if pick == 1:
            return json.dumps(jsonable(any_value(rng))).encode()
        content = any_value(rng) if pick == 2 else yaml_text(rng) + " word" * rng.randrange(0, 500)
        return json.dumps({"choices": [{"message": {"content": jsonable(content)}}]}).encode()

    for raw in cases(body, 200):
        for kind in ("definition", "synonym"):
            try:
                text = parse_chat_response(raw, kind, 30)
            except Exception as exc:  # noqa: BLE001
                refused_cleanly(exc, EndpointError)
                continue
            assert isinstance(text, str) and len(text.split()) <= 30 and "\n" not in text
            assert len(text) <= MAX_ANSWER_CHARS and len(clean_answer(text, kind, 30)) <= len(text)


def test_fuzz_llm_cache_files(tmp_path: Path) -> None:
    cfg = LLMConfig(endpoint="http://127.0.0.1:9", timeout_s=0.1)
    target = LLMTextClient(cfg, tmp_path)._file
    assert target is not None
    target.parent.mkdir(parents=True, exist_ok=True)

    def content(rng: random.Random) -> bytes:
        if rng.random() < 0.5:
            answers = {rng.choice(["definition\x1fchair", "synonym\x1fcar", "x", "poem\x1fa"]): any_value(rng)
                       for _ in range(3)}
            return json.dumps(jsonable({"answers": answers if rng.random() < 0.8 else any_value(rng)})).encode()
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64)))

    for data in cases(content, 100):
        target.write_bytes(data)
        client = LLMTextClient(cfg, tmp_path)  # must not raise
        assert all(isinstance(k, str) and isinstance(v, str) and v for k, v in client._cache.items())


def test_fuzz_text_cache_entries(tmp_path: Path) -> None:
    import io

    import torch

    from ovseg_ros.core.text import TextEncoder

    clip = types.SimpleNamespace(has_weights=True, key="fuzz-model", model=torch.nn.Module())
    enc = TextEncoder(clip, tmp_path)  # type: ignore[arg-type]
    enc._dim = 8
    assert enc._disk is not None
    entry = enc._disk / "k.npy"

    def content(rng: random.Random) -> bytes:
        pick = rng.randrange(4)
        if pick == 0:
            return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200)))
        arr: Any = np.random.default_rng(rng.randrange(2**32)).normal(size=(rng.choice([1, 2]), rng.choice([8, 7])))
        if pick == 1:
            arr /= np.linalg.norm(arr, axis=1, keepdims=True)
        if pick == 2:
            arr = arr.astype(rng.choice([np.float16, np.int8, np.complex64, object]))
        if pick == 3 and rng.random() < 0.5:
            arr[0, 0] = rng.choice([np.nan, np.inf])
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=True)
        data = buf.getvalue()
        return data[: rng.randrange(len(data) + 1)] if rng.random() < 0.2 else data

    for data in cases(content, 150):
        entry.write_bytes(data)
        out = enc._load_disk("k", 2)
        if out is not None:
            assert out.shape == (2, 8) and out.dtype == torch.float32 and torch.isfinite(out).all()
            assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-2)
        else:
            assert not entry.exists()  # a refused entry is evicted
