"""Every option of every segmenter is validated in one place (types, finiteness, ranges) before any model."""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest

from ovseg_ros.core.segmenter import (
    ConfigError,
    check_overrides,
    constraints_of,
    get_segmenter_class,
    list_presets,
    list_segmenters,
    make_config,
)


def _fields(cls: type) -> list[tuple[str, typing.Any]]:
    hints = typing.get_type_hints(cls)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(cls) if f.init and f.name in hints]


@pytest.mark.parametrize("name", list_segmenters())
def test_defaults_and_every_preset_pass(name: str) -> None:
    check_overrides(name)
    for preset in list_presets(name):
        check_overrides(name, preset)


@pytest.mark.parametrize("name", list_segmenters())
def test_every_number_refuses_nan_inf_and_wrong_types(name: str) -> None:
    """Field by field, also inside nested configs (model spec, LLM endpoint, FC-CLIP architecture)."""
    cls = get_segmenter_class(name).config_cls
    checked = 0

    def walk(config_cls: type, prefix: tuple[str, ...]) -> None:
        nonlocal checked
        for field, hint in _fields(config_cls):
            if dataclasses.is_dataclass(hint):
                walk(hint, prefix + (field,))
                continue
            bad: list[typing.Any] = []
            if hint is float:
                bad = [math.nan, math.inf, -math.inf, "0.5", True, None]
            elif hint is int:
                bad = [math.nan, 1.5, "3", True, None]
            elif hint is bool:
                bad = [1, "yes", None]
            elif hint is str:
                bad = [3, ["a"], {"a": 1}]
            for value in bad:
                override: typing.Any = value
                for key in reversed(prefix + (field,)):
                    override = {key: override}
                with pytest.raises(ConfigError, match=".".join(prefix + (field,))):
                    check_overrides(name, "", override)
                checked += 1

    walk(cls, ())
    assert checked > 10


@pytest.mark.parametrize("name", ["itaclip", "clip_es", "dense_clip"])
@pytest.mark.parametrize("value,fragment", [(math.nan, "finite"), (-1.0, "> 0"), (0.0, "> 0")])
def test_logit_scale(name: str, value: float, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment) as err:
        check_overrides(name, "", {"logit_scale": value})
    assert str(err.value).startswith(f"{name}: option 'logit_scale'")


@pytest.mark.parametrize("name,options,fragment", [
    ("itaclip", {"prob_thd": 1.5}, r"in \[0, 1\]"),
    ("itaclip", {"close_kernel": 4}, "odd"),
    ("itaclip", {"feature_augs": ["grayscale", "sepia"]}, "one of"),
    ("itaclip", {"short_side": 10**9}, "16384"),
    ("itaclip", {"llm": {"timeout_s": -1}}, "llm.timeout_s"),
    ("car", {"prompt_color": [255, 0]}, "3 elements"),
    ("car", {"prompt_color": [255, 0, 300]}, "255"),
    ("clip_es", {"grad_mode": "magic"}, "one of"),
    ("fcclip", {"arch": {"num_queries": 0}}, "arch.num_queries"),
    ("dense_clip", {"model": "ViT-B-16"}, "mapping"),
    ("dense_clip", {"model": {"precision": "fp8"}}, "model.precision"),
    ("dense_clip", {"nonsense": 1}, "unknown option"),
    ("car", {"cam_template": "{0.__class__}"}, "exactly one"),
    ("car", {"templates": ["a {}.", "{1} {}"]}, r"templates\[1\]"),
    ("clip_es", {"template": "a {} {"}, "unbalanced"),
    ("itaclip", {"aux_file": "../../../etc/passwd"}, "plain file name"),
])
def test_specific_rules(name: str, options: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        check_overrides(name, "", options)


def test_integers_are_accepted_for_floats_and_lists_become_tuples() -> None:
    cfg = check_overrides("itaclip", "", {"logit_scale": 50, "pamr_dilations": [4, 8]})
    assert cfg.logit_scale == 50.0 and isinstance(cfg.logit_scale, float)
    assert cfg.pamr_dilations == (4, 8)


def test_constraints_name_real_fields() -> None:
    for name in list_segmenters():
        cls = get_segmenter_class(name).config_cls
        fields = {f.name for f in dataclasses.fields(cls)}
        assert set(constraints_of(cls)) <= fields


def test_config_error_is_also_a_type_error_and_value_error() -> None:
    cls = get_segmenter_class("dense_clip").config_cls
    with pytest.raises(TypeError):
        make_config(cls, {"nope": 1})
    with pytest.raises(ValueError):
        make_config(cls, {"logit_scale": math.nan})
    with pytest.raises(ConfigError, match="must be a mapping"):
        make_config(cls, ["not", "a", "mapping"])  # type: ignore[arg-type]
