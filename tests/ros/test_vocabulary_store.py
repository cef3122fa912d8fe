"""The persisted runtime vocabulary (issue 17, defect 6): atomic file, keyed per node, never a crash on a bad file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ovseg_ros.core.class_ids import assign_class_ids
from ovseg_ros.core.vocabulary import MAX_CLASSES, Vocabulary
from ovseg_ros.ros.vocabulary_store import VocabularyStore, fingerprint, restore

CONFIGURED = Vocabulary.from_request(["floor", "wall", "person"], source="parameter")


def saved(tmp_path: Path, fqn: str = "/robot/segment_node", revision: int = 7) -> VocabularyStore:
    """A store holding revision ``revision``: a runtime vocabulary that replaced CONFIGURED."""
    store = VocabularyStore(tmp_path, fqn)
    t1 = assign_class_ids(None, CONFIGURED.names, revision - 1, MAX_CLASSES).table
    runtime = Vocabulary.from_request(["person, people", "door", "floor"], descriptions=["", "a door", ""],
                                      is_thing=[True, True, False])
    table = assign_class_ids(t1, runtime.names, revision, MAX_CLASSES).table
    store.save(runtime.with_revision(revision).with_ids(table.ids), table, fingerprint(CONFIGURED))
    return store


def test_round_trip_restores_vocabulary_ids_and_revision(tmp_path: Path) -> None:
    store = saved(tmp_path)
    assert store.path.parent == tmp_path / "runtime" and store.path.name.startswith("vocabulary-robot_segment_node-")
    assert [p.name for p in store.path.parent.iterdir()] == [store.path.name]  # no temp file left behind
    r = restore(store, CONFIGURED, persist=True, id_limit=MAX_CLASSES)
    assert not r.warning and "restored" in r.note and r.revision == 7
    v = r.vocabulary
    assert v is not None and v.names == ["person", "door", "floor"] and v.ids == (2, 3, 0)
    assert v.classes[0].synonyms == ("people",) and v.classes[1].description == "a door"
    assert not v.classes[2].is_thing and v.classes[2].thing_explicit and v.revision == 7
    assert r.table is not None and r.table.id_of == {"person": 2, "door": 3, "floor": 0}
    assert (1, 7, "wall") in r.table.retired


def test_the_parameters_win_when_they_changed_or_persistence_is_off(tmp_path: Path) -> None:
    store = saved(tmp_path)
    other = Vocabulary.from_request(["floor", "wall"])
    r = restore(store, other, persist=True, id_limit=MAX_CLASSES)
    assert r.vocabulary is None and r.revision == 7 and r.table is not None and "changed" in r.note
    r = restore(store, CONFIGURED, persist=False, id_limit=MAX_CLASSES)
    assert r.vocabulary is None and r.revision == 7 and "persist_vocabulary is false" in r.note


def test_another_node_name_or_namespace_has_its_own_file(tmp_path: Path) -> None:
    saved(tmp_path)
    for fqn in ("/segment_node", "/robot2/segment_node", "/robot/segment_node2"):
        r = restore(VocabularyStore(tmp_path, fqn), CONFIGURED, persist=True, id_limit=MAX_CLASSES)
        assert (r.revision, r.vocabulary, r.note) == (0, None, "")
    # a file copied under another node's name is refused (it names its node inside)
    mine, other = saved(tmp_path), VocabularyStore(tmp_path, "/other/segment_node")
    other.path.write_bytes(mine.path.read_bytes())
    r = restore(other, CONFIGURED, persist=True, id_limit=MAX_CLASSES)
    assert r.warning and r.vocabulary is None and "another node" in r.note


@pytest.mark.parametrize("content,revision", [
    (b"", 0),
    (b"\x00\xff garbage", 0),
    (b'{"format": "ovseg_ros/runtime_vocabulary/1", "node": "/robot/segment_node", "revision": 9}', 9),
    (b'{"format": "something else", "revision": 3}', 3),
    (b"[" * 100000, 0),  # nesting bomb
    (b'{"format": "ovseg_ros/runtime_vocabulary/1", "node": "/robot/segment_node", "revision": -1}', 0),
    (b'{"format": "ovseg_ros/runtime_vocabulary/1", "node": "/robot/segment_node", "revision": 4294967295}', 0),
])
def test_a_corrupt_file_is_ignored_with_a_warning(tmp_path: Path, content: bytes, revision: int) -> None:
    store = VocabularyStore(tmp_path, "/robot/segment_node")
    store.path.parent.mkdir(parents=True)
    store.path.write_bytes(content)
    r = restore(store, CONFIGURED, persist=True, id_limit=MAX_CLASSES)
    assert r.warning and r.vocabulary is None and r.table is None and "ignored" in r.note
    assert r.revision == revision  # the counter is salvaged when the file still names it


@pytest.mark.parametrize("edit", [
    lambda d: d["vocabulary"]["classes"][0].update(name="bad\nname"),  # what a request would refuse
    lambda d: d["vocabulary"].update(class_ids=[0, 0, 1]),
    lambda d: d["ids"].update(ids=[5, 6, 7]),  # table and vocabulary disagree
    lambda d: d["vocabulary"]["classes"][1].update(is_thing="yes"),
    lambda d: d.update(vocabulary=None),
])
def test_a_tampered_vocabulary_is_ignored_but_the_revision_kept(tmp_path: Path, edit) -> None:
    store = saved(tmp_path)
    data = json.loads(store.path.read_text())
    edit(data)
    store.path.write_text(json.dumps(data))
    r = restore(store, CONFIGURED, persist=True, id_limit=MAX_CLASSES)
    assert r.warning and r.vocabulary is None and r.revision == 7 and "ignored" in r.note


def test_ids_beyond_the_configured_limit_are_not_restored(tmp_path: Path) -> None:
    store = VocabularyStore(tmp_path, "/n")
    v = CONFIGURED.with_revision(3).with_ids([0, 300, 1])
    from ovseg_ros.core.class_ids import ClassIdTable

    store.save(v, ClassIdTable(3, tuple(v.names), v.ids), fingerprint(CONFIGURED))
    r = restore(store, CONFIGURED, persist=True, id_limit=255)
    assert r.warning and r.vocabulary is None and r.revision == 3


def test_a_failed_write_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = saved(tmp_path)
    before = store.path.read_bytes()

    def fail(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    table = assign_class_ids(None, ["x"], 8, MAX_CLASSES).table
    with pytest.raises(OSError):
        store.save(Vocabulary.from_request(["x"], revision=8), table, "")
    assert store.path.read_bytes() == before and len(list(store.path.parent.iterdir())) == 1


def test_no_cache_dir_means_no_store() -> None:
    r = restore(None, CONFIGURED, persist=True, id_limit=MAX_CLASSES)
    assert r.revision == 0 and r.vocabulary is None and "cache_dir is empty" in r.note
