"""Vocabulary inputs from outside: files, names shared by two classes, query bounds."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ovseg_ros.core.vocabulary import (
    MAX_QUERY_TEXT_CHARS,
    MAX_QUERY_TEXTS,
    Vocabulary,
    VocabularyError,
    check_query_texts,
    load_vocabulary_file,
    vocabulary_from_texts,
)


def test_directory_and_non_utf8_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(VocabularyError, match="is a directory"):
        load_vocabulary_file(tmp_path)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("classes: [caf\xe9]\n".encode("latin-1"))
    with pytest.raises(VocabularyError, match="not UTF-8"):
        load_vocabulary_file(latin)
    with pytest.raises(VocabularyError, match="does not exist"):
        load_vocabulary_file(tmp_path / "nope.yaml")


def test_alias_bomb_file_is_refused_fast(tmp_path: Path) -> None:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    lines.append("classes: *a8")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert path.stat().st_size < 600
    t0 = time.monotonic()
    with pytest.raises(VocabularyError, match="expands to more than|nested more than") as err:
        load_vocabulary_file(path)
    assert time.monotonic() - t0 < 1.0 and len(str(err.value)) < 400


@pytest.mark.parametrize("body,fragment", [
    ("classes: chair", "must be a list"),
    ("classes: [{name: chair, is_thing: maybe}]", "is_thing must be true or false"),
    ("classes: [{name: {a: 1}}]", "must be text"),
    ("classes: [{name: chair, synonyms: 3}]", "synonyms must be a list"),
    ("classes: [{name: day, synonyms: [2001-12-14]}]", "must be text"),
    ("classes: [[1, 2]]", "expected a string or a mapping"),
])
def test_malformed_entries(tmp_path: Path, body: str, fragment: str) -> None:
    path = tmp_path / "v.yaml"
    path.write_text(body + "\n")
    with pytest.raises(VocabularyError, match=fragment):
        load_vocabulary_file(path)


def test_numbers_are_read_as_names(tmp_path: Path) -> None:
    path = tmp_path / "v.yaml"
    path.write_text("classes: [{name: 7up, synonyms: [1984]}]\n")
    assert load_vocabulary_file(path).classes[0].synonyms == ("1984",)


@pytest.mark.parametrize("entries", [
    ["chair", "seat, chair"],        # a class name is another class's synonym
    ["armchair, seat", "stool, Seat"],  # a synonym shared by two classes (case-insensitive)
])
def test_a_name_belongs_to_one_class_only(entries: list[str]) -> None:
    with pytest.raises(VocabularyError, match="used by class 0 .* and by class 1"):
        Vocabulary.from_request(entries)


def test_a_synonym_repeating_its_own_name_is_harmless() -> None:
    assert len(Vocabulary.from_request(["chair, Chair", "table"])) == 2


def test_query_bounds() -> None:
    assert len(vocabulary_from_texts(["a"] * MAX_QUERY_TEXTS)) == MAX_QUERY_TEXTS
    with pytest.raises(VocabularyError, match=f"at most {MAX_QUERY_TEXTS}"):
        vocabulary_from_texts(["a"] * (MAX_QUERY_TEXTS + 1))
    with pytest.raises(VocabularyError, match=f"at most {MAX_QUERY_TEXT_CHARS}"):
        check_query_texts(["x" * (MAX_QUERY_TEXT_CHARS + 1)])
    for bad in ([], [""], ["ok", 3], ["a\nb"]):
        with pytest.raises(VocabularyError):
            check_query_texts(bad)  # type: ignore[arg-type]
    with pytest.raises(VocabularyError, match="must be a list"):
        check_query_texts(None)  # type: ignore[arg-type]
