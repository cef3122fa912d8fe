"""Bounded reading of outside input: YAML alias bombs, deep nesting, odd files, bounded messages."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ovseg_ros.core.untrusted import UntrustedInputError, atomic_write, load_yaml, read_text_file, short_repr


def billion_laughs(levels: int = 9, fan: int = 9) -> str:
    """The classic alias bomb: ``fan ** levels`` strings from a few hundred characters."""
    lines = ['a0: &a0 ["lol"' + ', "lol"' * (fan - 1) + "]"]
    for i in range(1, levels):
        refs = ", ".join([f"*a{i - 1}"] * fan)
        lines.append(f"a{i}: &a{i} [{refs}]")
    return "\n".join(lines) + "\n"


def test_alias_bomb_is_refused_fast_and_message_is_bounded() -> None:
    doc = billion_laughs()
    assert len(doc) < 600
    t0 = time.monotonic()
    with pytest.raises(UntrustedInputError, match="expands to more than") as err:
        load_yaml(doc, "segmenter_options")
    assert time.monotonic() - t0 < 1.0
    assert len(str(err.value)) < 300


def test_expanded_count_includes_aliases() -> None:
    doc = "a: &a [1, 2, 3, 4]\nb: [*a, *a, *a, *a]\n"
    assert load_yaml(doc, max_nodes=100)["b"][3] == [1, 2, 3, 4]
    with pytest.raises(UntrustedInputError, match="nodes"):
        load_yaml(doc, max_nodes=20)


@pytest.mark.parametrize("doc,fragment", [
    ("&a [*a]", "recursive alias"),
    ("[" * 200 + "]" * 200, "nested more than"),
    ("x:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 60)) + "  " * 60 + "v", "nested more than"),
    ("a: [", "not valid YAML"),
    ("!!python/object:os.system x", "not valid YAML"),
    ("d: 2001-13-45", "could not be read"),
    ("\x1c", "not valid YAML"),  # refused by PyYAML's reader before parsing starts
])
def test_refusals(doc: str, fragment: str) -> None:
    with pytest.raises(UntrustedInputError, match=fragment):
        load_yaml(doc, "input")


def test_size_limit_and_bytes_input() -> None:
    with pytest.raises(UntrustedInputError, match="at most 10 are accepted"):
        load_yaml("a: " + "x" * 20, max_bytes=10)
    with pytest.raises(UntrustedInputError, match="not UTF-8"):
        load_yaml(b"a: \xff\xfe")
    assert load_yaml(b"a: 1") == {"a": 1}
    assert load_yaml("") is None


def test_short_repr_is_bounded_even_for_shared_trees() -> None:
    node: list = ["x"]
    for _ in range(40):  # 2**40 leaves when formatted whole
        node = [node, node]
    t0 = time.monotonic()
    text = short_repr(node)
    assert len(text) <= 120 and time.monotonic() - t0 < 0.1

    class Hostile:
        def __repr__(self) -> str:
            raise RuntimeError("no")

    assert short_repr(Hostile()).startswith("<Hostile")


def test_read_text_file_errors(tmp_path: Path) -> None:
    with pytest.raises(UntrustedInputError, match="is a directory"):
        read_text_file(tmp_path, "vocabulary file")
    with pytest.raises(UntrustedInputError, match="does not exist"):
        read_text_file(tmp_path / "missing.yaml")
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("classes: [caf\xe9]".encode("latin-1"))
    with pytest.raises(UntrustedInputError, match="not UTF-8"):
        read_text_file(bad)
    big = tmp_path / "big.yaml"
    big.write_bytes(b"a" * 100)
    with pytest.raises(UntrustedInputError, match="larger than 10 bytes"):
        read_text_file(big, max_bytes=10)


def test_atomic_write_leaves_no_temp_file_on_error(tmp_path: Path) -> None:
    atomic_write(tmp_path / "f", b"one")
    assert (tmp_path / "f").read_bytes() == b"one"
    with pytest.raises(OSError):
        atomic_write(tmp_path / "missing" / "f", b"two")  # the temp file cannot even be created
    (tmp_path / "d").mkdir()
    with pytest.raises(OSError):
        atomic_write(tmp_path / "d", b"three")  # the rename onto a directory fails after the write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f"]
