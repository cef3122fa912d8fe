"""Every float option is checked as float32-finite where it becomes a tensor (issue 17 item 5, defect 7):
``logit_scale: 1.0e+39`` passed validation and overflowed float32 (every pixel class 0, NaN confidence).
One place - the core's config validation - so every segmenter and every path (presets, node parameters,
tools) gets it."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from ovseg_ros.core.segmenter import FLOAT32_MAX, ConfigError, check_overrides, get_segmenter_class, list_segmenters


@pytest.mark.parametrize("name", ["itaclip", "clip_es", "dense_clip"])
@pytest.mark.parametrize("value", [1.0e39, -1.0e39, 3.5e38, 1e300])
def test_logit_scale_beyond_float32_is_refused_with_a_reason(name: str, value: float) -> None:
    with pytest.raises(ConfigError, match="finite float32") as err:
        check_overrides(name, "", {"logit_scale": value})
    assert "logit_scale" in str(err.value)


def test_largest_float32_itself_passes() -> None:
    assert check_overrides("dense_clip", "", {"logit_scale": FLOAT32_MAX}).logit_scale == FLOAT32_MAX


@pytest.mark.parametrize("name", list_segmenters())
def test_every_float_option_of_every_segmenter(name: str) -> None:
    """Field by field, nested configs too: 1e39 is refused naming the option (whatever its range)."""
    checked = 0

    def walk(cls: type, prefix: tuple[str, ...]) -> None:
        nonlocal checked
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints.get(f.name)
            if not f.init or hint is None:
                continue
            if dataclasses.is_dataclass(hint):
                walk(hint, prefix + (f.name,))
                continue
            if hint is not float:
                continue
            override: typing.Any = 1.0e39
            for key in reversed(prefix + (f.name,)):
                override = {key: override}
            with pytest.raises(ConfigError, match=".".join(prefix + (f.name,))):
                check_overrides(name, "", override)
            checked += 1

    walk(get_segmenter_class(name).config_cls, ())
    assert checked >= 1


def test_integers_beyond_int64_are_refused_not_crashing() -> None:
    with pytest.raises(ConfigError, match="64-bit"):
        check_overrides("itaclip", "", {"short_side": 10**400})
    with pytest.raises(ConfigError, match="finite float32"):
        check_overrides("dense_clip", "", {"logit_scale": 10**400})  # an int for a float, too large
