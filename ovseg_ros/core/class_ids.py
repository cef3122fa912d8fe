"""Stable class ids across vocabulary changes: the wire id of each class, kept while its name stays.

Segmenters label pixels by *position* in the vocabulary. Published labels (label images, clouds, panoptic
class ids, LabelInfo, ~/vocabulary) use *ids* from a :class:`ClassIdTable`, so that a consumer that reads a
mask with the label map of a neighbouring revision never takes a pixel for another class. Nav2's
semantic_segmentation_layer does exactly that: it rebuilds its id -> name map when a LabelInfo arrives and
reads every mask that comes later with it, also masks computed before the change (issue 17, defect 5).

Rules (:func:`assign_class_ids`), for a change from table ``P`` (revision p) to revision ``r``:

1. A name that stays keeps its id (names compare exactly: Nav2 matches ``class_name`` as a string).
2. An id live in ``P`` is never given to another name in ``r`` (hard rule): a mask of ``r`` read with the map
   of ``P`` - or a mask of ``P`` read with the map of ``r`` - shows that id unmapped (skipped), never renamed.
3. A removed id is *quarantined* for :data:`QUARANTINE_REVISIONS` revisions after the one that removed it, so
   masks still in flight across several quick swaps are not renamed either. Free ids are taken in this order:
   the id the same name had before (it comes back: same name, safe), never-used ids (lowest first), then
   retired ids whose quarantine is over (longest retired first) - an id is reused as late as possible.
4. Ids stay below ``soft_limit`` (255: mono8 labels, 255 = unlabeled) while possible; above it only when
   ``limit`` allows (the labels then become mono16).
5. At the limit (``nav2_compatible``: 255 ids for mono8), when rules 1-4 cannot name every class, ids still in
   quarantine are reused, longest retired first, and each reuse is reported (a warning in the node's log):
   only masks older than the previous revision could then be misread. When even rule 2 cannot hold (the new
   names need more ids than the limit leaves besides the previous revision's ids) the change is refused with
   :class:`ClassIdError`, which says how to get there in two steps (first a smaller vocabulary).

The state is tiny (live ids plus retired ids with the revision that retired them) and is persisted with the
vocabulary (:mod:`ovseg_ros.ros.vocabulary_store`), so ids also survive a respawn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

#: Revisions a removed id stays unused after the revision that removed it (rule 3). With the swaps far
#: apart (> ~0.1 s, the usual in-flight time of a frame) one revision would do; 8 covers bursts of changes.
QUARANTINE_REVISIONS = 8

#: Ids below this fit ``mono8`` labels (255 is "unlabeled"); assignment stays below it while it can.
MONO8_IDS = 255


class ClassIdError(ValueError):
    """A vocabulary change whose classes cannot get ids under the rules (the message says why and what to do)."""


@dataclass(frozen=True)
class ClassIdTable:
    """The ids of one vocabulary revision.

    Attributes:
        revision: the vocabulary revision these ids belong to.
        names: class names in vocabulary order (positions).
        ids: the wire id of each position.
        retired: ``(id, revision that removed it, its last name)`` of ids not live now, oldest first.
    """

    revision: int
    names: tuple[str, ...]
    ids: tuple[int, ...]
    retired: tuple[tuple[int, int, str], ...] = field(default=())

    def __post_init__(self) -> None:
        if len(self.names) != len(self.ids):
            raise ClassIdError(f"{len(self.names)} names but {len(self.ids)} ids")
        if len(set(self.ids)) != len(self.ids) or any(i < 0 for i in self.ids):
            raise ClassIdError("class ids must be distinct and non-negative")
        if len(set(self.names)) != len(self.names):
            raise ClassIdError("class names must be distinct")
        if {i for i, _, _ in self.retired} & set(self.ids):
            raise ClassIdError("a retired id is live")

    @classmethod
    def positions(cls, names: Sequence[str], revision: int = 0) -> "ClassIdTable":
        """The table of a first vocabulary: ids are the positions."""
        return cls(revision, tuple(names), tuple(range(len(names))))

    @property
    def id_of(self) -> dict[str, int]:
        return dict(zip(self.names, self.ids))

    def to_json(self) -> dict[str, Any]:
        return {"revision": self.revision, "names": list(self.names), "ids": list(self.ids),
                "retired": [list(r) for r in self.retired]}

    @classmethod
    def from_json(cls, data: Any) -> "ClassIdTable":
        """Inverse of :meth:`to_json`; :class:`ClassIdError` for anything malformed (a foreign/corrupt file)."""
        try:
            retired = tuple((int(i), int(r), str(n)) for i, r, n in data["retired"])
            names, ids = data["names"], data["ids"]
            if not all(isinstance(n, str) for n in names) or not all(isinstance(i, int) for i in ids):
                raise TypeError("names must be text and ids integers")
            return cls(int(data["revision"]), tuple(names), tuple(ids), retired)
        except (KeyError, TypeError, ValueError) as exc:
            raise ClassIdError(f"malformed class id table: {exc}") from None


@dataclass(frozen=True)
class Assignment:
    table: ClassIdTable
    #: Human-readable notes on quarantined ids that had to be reused (rule 5); empty normally.
    warnings: tuple[str, ...] = ()


def assign_class_ids(
    previous: Optional[ClassIdTable],
    names: Sequence[str],
    revision: int,
    limit: int,
    soft_limit: int = MONO8_IDS,
    quarantine: int = QUARANTINE_REVISIONS,
) -> Assignment:
    """Ids for the vocabulary ``names`` of ``revision``, following the module's rules.

    Args:
        previous: the table in use (None: a first vocabulary, ids are positions).
        names: class names of the new vocabulary, in order (distinct).
        revision: its revision (greater than ``previous.revision``).
        limit: ids must be below it (255 in Nav2 mode, 65534 otherwise).
        soft_limit: ids stay below it while possible (mono8).
        quarantine: revisions a removed id stays unused (rule 3).

    Raises:
        ClassIdError: more classes than ``limit`` ids, or the change cannot keep rule 2 (message: what to do).
    """
    if len(names) > limit:
        raise ClassIdError(f"{len(names)} classes but only {limit} class ids (0..{limit - 1}) are available")
    if previous is None:
        return Assignment(ClassIdTable.positions(names, revision))
    old = previous.id_of
    ids: dict[str, int] = {n: old[n] for n in names if n in old and old[n] < limit}  # rule 1
    blocked = set(previous.ids)  # rule 2 (kept names already hold theirs)
    retired = {i: (r, n) for i, r, n in previous.retired}
    retired_name = {n: i for i, (_, n) in retired.items()}
    new = [n for n in names if n not in ids]
    taken = set(ids.values())
    warnings: list[str] = []

    def free(i: int) -> bool:
        return i not in blocked and i not in taken

    # The same name comes back: its former id, whatever its age (the same name cannot be misread).
    for n in new:
        i = retired_name.get(n)
        if i is not None and free(i) and i < limit:
            ids[n] = i
            taken.add(i)
    new = [n for n in new if n not in ids]
    if new:
        cap = min(soft_limit, limit)
        never = (i for i in range(limit) if i not in retired and free(i))
        candidates = _never_used(never, cap) + [
            i for i, (r, _) in sorted(retired.items(), key=lambda kv: kv[1][0])
            if revision - r >= quarantine and free(i) and i < cap]
        if len(candidates) < len(new) and limit > cap:  # rule 4: beyond mono8 before breaking quarantine
            candidates += [i for i in range(cap, limit) if i not in retired and free(i)][:len(new) - len(candidates)]
        candidates += [i for i, (r, _) in sorted(retired.items(), key=lambda kv: kv[1][0])  # rule 5
                       if revision - r < quarantine and free(i) and i < limit and i not in candidates]
        if len(candidates) < len(new):
            live = len(names) - len(new)
            raise ClassIdError(
                f"no class ids left: {len(new)} new class names need ids, but of the {limit} ids {live} stay with "
                f"kept classes and {len(blocked - taken)} belong to classes of the previous revision (reusing those "
                "would show masks still in flight under a wrong name); change the vocabulary in two steps, first "
                "to a smaller one (e.g. only the classes you keep), then to the new one")
        for n, i in zip(new, candidates):
            ids[n] = i
            taken.add(i)
            if i in retired and revision - retired[i][0] < quarantine:
                warnings.append(
                    f"class id {i} (last {retired[i][1]!r}, retired at revision {retired[i][0]}) reused for {n!r} "
                    f"after {revision - retired[i][0]} of {quarantine} quarantine revisions: the id limit "
                    f"({limit}) is reached; only masks older than revision {previous.revision} could be misread")
    live_ids = set(ids.values())
    removed = [(i, revision, n) for n, i in zip(previous.names, previous.ids) if n not in ids]
    still = [(i, r, n) for i, r, n in previous.retired if i not in live_ids]
    table = ClassIdTable(revision, tuple(names), tuple(ids[n] for n in names), tuple(still + removed))
    return Assignment(table, tuple(warnings))


def _never_used(ids: Any, cap: int) -> list[int]:
    out = []
    for i in ids:
        if i >= cap:
            break
        out.append(i)
    return out
