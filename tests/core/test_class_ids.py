"""Stable class ids (issue 17, defect 5): assignment rules, quarantine, the 255 limit, the persisted form."""

from __future__ import annotations

import random

import pytest

from ovseg_ros.core.class_ids import (
    QUARANTINE_REVISIONS,
    ClassIdError,
    ClassIdTable,
    assign_class_ids,
)
from ovseg_ros.core.vocabulary import MAX_CLASSES, Vocabulary, VocabularyError

NAV2 = 255


def chain(vocabularies: list[list[str]], limit: int = NAV2) -> list[ClassIdTable]:
    tables, table = [], None
    for r, names in enumerate(vocabularies, start=1):
        table = assign_class_ids(table, names, r, limit).table
        tables.append(table)
    return tables


def test_first_vocabulary_gets_positions() -> None:
    (t,) = chain([["floor", "wall", "person"]])
    assert t.ids == (0, 1, 2) and t.revision == 1 and t.retired == ()


def test_kept_names_keep_their_ids_and_new_names_take_never_used_ids() -> None:
    a, b = chain([["floor", "wall", "person"], ["person", "tree", "floor"]])
    assert b.id_of == {"person": 2, "floor": 0, "tree": 3}  # wall's 1 is quarantined, 3 never used
    assert b.retired == ((1, 2, "wall"),)


def test_a_returning_name_gets_its_old_id_back() -> None:
    *_, c = chain([["floor", "wall"], ["floor", "door"], ["floor", "wall"]])
    assert c.id_of == {"floor": 0, "wall": 1}


def test_ids_are_reused_only_after_the_quarantine_and_oldest_first() -> None:
    # 240 names stay; one name is replaced by a brand-new one at every change: 15 spare ids rotate
    base = [f"c{i}" for i in range(240)]
    table = assign_class_ids(None, base + ["x0"], 1, NAV2).table
    history = {1: dict(table.id_of)}
    for r in range(2, 60):
        got = assign_class_ids(table, base + [f"x{r - 1}"], r, NAV2)
        table = got.table
        assert not got.warnings and max(table.ids) < NAV2
        history[r] = dict(table.id_of)
        new_id = table.id_of[f"x{r - 1}"]
        assert new_id == 240 + (r - 1) % 15  # never-used ids first, then the longest retired one
        for back in range(max(1, r - QUARANTINE_REVISIONS), r):  # not another name's id recently
            assert all(i != new_id or n == f"x{r - 1}" for n, i in history[back].items()), (r, back)


def test_the_limit_forces_reuse_inside_the_quarantine_with_a_warning_per_id() -> None:
    base = [f"c{i}" for i in range(253)]
    table = assign_class_ids(None, base + ["x0"], 1, NAV2).table  # id 254 is the only spare one
    table = assign_class_ids(table, base + ["x1"], 2, NAV2).table
    got = assign_class_ids(table, base + ["x2"], 3, NAV2)
    assert got.table.id_of["x2"] == 253 and len(got.warnings) == 1 and "'x0'" in got.warnings[0]


def test_no_id_names_two_classes_in_neighbouring_revisions_random_walk() -> None:
    """The property Nav2 needs: reading revision r's mask with r-1's or r+1's map never renames a pixel."""
    rng = random.Random(7)
    pool = [f"n{i}" for i in range(120)]
    table, tables = None, []
    for r in range(1, 400):
        names = rng.sample(pool, rng.randint(1, 100))
        table = assign_class_ids(table, names, r, NAV2).table
        assert max(table.ids) < NAV2
        tables.append(table)
    for window in range(1, QUARANTINE_REVISIONS + 1):
        for a, b in zip(tables, tables[window:]):
            ma, mb = dict(zip(a.ids, a.names)), dict(zip(b.ids, b.names))
            assert all(mb[i] == n for i, n in ma.items() if i in mb), (a.revision, b.revision)


def test_at_the_255_limit_quarantined_ids_are_reused_with_a_warning() -> None:
    first = [f"a{i}" for i in range(200)]
    second = ["keep"] + [f"b{i}" for i in range(200)]
    t1 = assign_class_ids(None, first, 1, NAV2).table
    t2 = assign_class_ids(t1, ["keep"], 2, NAV2).table  # a step down: 200 ids retired at revision 2
    got = assign_class_ids(t2, second, 3, NAV2)
    assert max(got.table.ids) < NAV2 and len(set(got.table.ids)) == 201
    assert got.warnings and "quarantine" in got.warnings[0] and "limit" in got.warnings[0]
    # ids of the previous revision (only "keep") are never given to another name
    assert got.table.id_of["keep"] == t2.id_of["keep"]


def test_at_the_255_limit_a_change_that_would_rename_live_ids_is_refused() -> None:
    t1 = assign_class_ids(None, [f"a{i}" for i in range(200)], 1, NAV2).table
    with pytest.raises(ClassIdError, match="two steps"):
        assign_class_ids(t1, [f"b{i}" for i in range(200)], 2, NAV2)
    with pytest.raises(ClassIdError, match="256 classes"):
        assign_class_ids(None, [f"a{i}" for i in range(256)], 1, NAV2)


def test_without_nav2_ids_go_beyond_255_before_breaking_the_quarantine() -> None:
    t1 = assign_class_ids(None, [f"a{i}" for i in range(200)], 1, MAX_CLASSES).table
    got = assign_class_ids(t1, [f"b{i}" for i in range(200)], 2, MAX_CLASSES)
    assert not got.warnings and min(got.table.ids) >= 55 and max(got.table.ids) >= 255
    assert not set(got.table.ids) & set(t1.ids)
    # a later small vocabulary gets ids below 255 again (mono8) once they are out of quarantine
    later = assign_class_ids(got.table, ["c"], 2 + QUARANTINE_REVISIONS, MAX_CLASSES).table
    assert later.ids[0] < 255


def test_kept_ids_beyond_a_smaller_limit_are_renumbered() -> None:
    t1 = ClassIdTable(4, ("a", "b"), (0, 300))
    t2 = assign_class_ids(t1, ["a", "b"], 5, NAV2).table
    assert t2.id_of["a"] == 0 and t2.id_of["b"] < NAV2


def test_table_json_round_trip_and_malformed_input() -> None:
    *_, t = chain([["floor", "wall"], ["floor", "door"]])
    assert ClassIdTable.from_json(t.to_json()) == t
    for bad in ({}, {"revision": 1, "names": ["a"], "ids": [0, 1], "retired": []},
                {"revision": 1, "names": ["a", "b"], "ids": [0, 0], "retired": []},
                {"revision": 1, "names": ["a"], "ids": ["0"], "retired": []},
                {"revision": 1, "names": ["a"], "ids": [0], "retired": [[0, 1, "b"]]}, [1, 2], "x"):
        with pytest.raises(ClassIdError):
            ClassIdTable.from_json(bad)


def test_vocabulary_carries_its_ids() -> None:
    v = Vocabulary.from_request(["floor", "wall"])
    assert v.ids == (0, 1) and v.ids_are_positions and v.id_bound == 2
    w = v.with_ids([3, 1])
    assert w.ids == (3, 1) and not w.ids_are_positions and w.id_bound == 4
    for bad in ([1], [2, 2], [-1, 0], [0, MAX_CLASSES]):
        with pytest.raises(VocabularyError):
            v.with_ids(bad)
