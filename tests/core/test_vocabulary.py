from __future__ import annotations

import pytest

from ovseg_ros.core.vocabulary import (
    MAX_CLASSES,
    Vocabulary,
    VocabularyError,
    default_is_thing,
    load_vocabulary_file,
    vocabulary_from_texts,
)


def test_from_request_splits_synonyms_and_assigns_ids() -> None:
    v = Vocabulary.from_request(["floor", "chair", "person, people", "door"])
    assert v.names == ["floor", "chair", "person", "door"]
    assert v.classes[2].synonyms == ("people",)
    texts, owner = v.query_names()
    assert texts == ["floor", "chair", "person", "people", "door"]
    assert owner == [0, 1, 2, 2, 3]
    assert v.to_request()[2] == "person, people"


def test_thing_stuff_default_and_explicit() -> None:
    v = Vocabulary.from_request(["floor", "chair"])
    assert [c.is_thing for c in v.classes] == [False, True]
    v = Vocabulary.from_request(["floor", "chair"], is_thing=[True, False])
    assert [c.is_thing for c in v.classes] == [True, False]
    assert not default_is_thing("parking lot") and default_is_thing("fire hydrant")


@pytest.mark.parametrize(
    "entries, kwargs, fragment",
    [
        ([], {}, "empty"),
        (["chair", ""], {}, "class 1"),
        (["chair", "  , seat"], {}, "name is empty"),
        (["chair,"], {}, "empty synonym"),
        (["chair", "Chair"], {}, "duplicate class name"),
        (["a", "b"], {"descriptions": ["x"]}, "descriptions has 1 values for 2 classes"),
        (["a", "b"], {"is_thing": [True]}, "is_thing has 1 values"),
        (["a" * 2000], {}, "exceeds"),
        (["bad\nname"], {}, "control characters"),
    ],
)
def test_bad_requests_say_what_is_wrong(entries, kwargs, fragment) -> None:
    with pytest.raises(VocabularyError, match=fragment):
        Vocabulary.from_request(entries, **kwargs)


def test_too_many_classes_is_refused_with_the_limit() -> None:
    entries = [f"c{i}" for i in range(MAX_CLASSES + 1)]
    with pytest.raises(VocabularyError, match=str(MAX_CLASSES)):
        Vocabulary.from_request(entries)


def test_max_classes_accepted() -> None:
    v = Vocabulary.from_request([f"c{i}" for i in range(MAX_CLASSES)])
    assert len(v) == MAX_CLASSES


def test_query_texts_keep_commas_and_deduplicate() -> None:
    v = vocabulary_from_texts(["the red chair, left of the door", "door", "door"])
    assert v.names[0] == "the red chair, left of the door"
    assert len(set(n.lower() for n in v.names)) == 3
    with pytest.raises(VocabularyError):
        vocabulary_from_texts([])
    with pytest.raises(VocabularyError, match="query text 1"):
        vocabulary_from_texts(["a", " "])


def test_shipped_vocabulary_presets_load() -> None:
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "config" / "vocabularies"
    sizes = {p.stem: len(load_vocabulary_file(p)) for p in folder.glob("*.yaml")}
    assert sizes["coco_panoptic"] == 133
    assert sizes["ade20k"] == 150
    coco = load_vocabulary_file(folder / "coco_panoptic.yaml")
    assert sum(c.is_thing for c in coco.classes) == 80


def test_vocabulary_file_errors(tmp_path) -> None:
    with pytest.raises(VocabularyError, match="does not exist"):
        load_vocabulary_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("names: [a]\n")
    with pytest.raises(VocabularyError, match="classes"):
        load_vocabulary_file(bad)
    bad.write_text("classes:\n  - {name: a, colour: red}\n")
    with pytest.raises(VocabularyError, match="unknown keys"):
        load_vocabulary_file(bad)


def test_explicit_thing_flags_are_marked() -> None:
    guessed = Vocabulary.from_request(["floor", "chair"])
    given = Vocabulary.from_request(["floor", "chair"], is_thing=[True, True])
    assert not any(c.thing_explicit for c in guessed.classes)
    assert all(c.thing_explicit for c in given.classes)
    from_yaml = Vocabulary.from_mapping_list([{"name": "rug", "is_thing": True}, {"name": "cup"}])
    assert [c.thing_explicit for c in from_yaml.classes] == [True, False]
