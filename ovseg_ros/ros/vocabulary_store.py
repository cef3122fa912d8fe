"""The runtime vocabulary on disk: what ``~/set_vocabulary`` installed survives a crash or a respawn.

One JSON file per node (``<cache_dir>/runtime/vocabulary-<node>-<hash of the fully qualified name>.json``),
written atomically (temp file, fsync, rename, fsync of the folder) *before* each new revision is published. It
holds the last revision handed out, the vocabulary of that revision with its class ids, the id table (live and
retired ids, :mod:`ovseg_ros.core.class_ids`) and a fingerprint of the vocabulary the parameters configured.

At configure (:func:`restore`):

* the revision counter continues from the file, so revisions never repeat across restarts of the node (the
  file is written before a revision is published: a crash cannot publish a revision the file does not hold);
* the ids continue from the file's table (a class keeps its id across restarts);
* the saved vocabulary replaces the configured one when ``persist_vocabulary`` is true and the configured
  vocabulary (parameters ``vocabulary``/``vocabulary_file``/``vocabulary_preset``) is the one it replaced: a
  changed launch file wins over the runtime state of the previous run.

A missing file is a first start. A corrupt, foreign (another node's name), oversized or otherwise unusable file
is ignored with a warning and configure goes on with the parameters (the revision counter is salvaged when the
file still names it). With ``cache_dir`` empty nothing is stored and revisions start at 1 at every start.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..core.class_ids import ClassIdError, ClassIdTable
from ..core.untrusted import UntrustedInputError, atomic_write, read_text_file, short_repr
from ..core.vocabulary import ClassSpec, Vocabulary, VocabularyError

FORMAT = "ovseg_ros/runtime_vocabulary/1"
#: A runtime vocabulary is at most max_vocabulary_classes (<= 65534) classes of bounded texts.
MAX_FILE_BYTES = 64 << 20
#: Revisions are uint32 in the messages; a saved counter beyond half that range is refused as corrupt (a node
#: that really counted so far would still have 2**31 changes left before the messages overflow).
MAX_REVISION = 2**31 - 1


@dataclass(frozen=True)
class Restored:
    """What configure starts from."""

    revision: int  # last revision handed out before (0: none known)
    table: Optional[ClassIdTable]  # the ids in use before (None: ids start at the positions)
    vocabulary: Optional[Vocabulary]  # the runtime vocabulary to install instead of the configured one
    note: str  # one log line: what was restored or why not ("" when there was nothing)
    warning: bool = False  # the note is a warning (unusable file)


def fingerprint(vocabulary: Vocabulary) -> str:
    """Identity of a configured vocabulary (names, synonyms, descriptions, thing flags)."""
    text = json.dumps([_class_json(c) for c in vocabulary.classes], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class VocabularyStore:
    """The file of one node (keyed by its fully qualified name: another node or namespace has its own)."""

    def __init__(self, cache_dir: str | Path, node_fqn: str) -> None:
        self.node_fqn = node_fqn
        stem = re.sub(r"[^A-Za-z0-9_]+", "_", node_fqn).strip("_")[:80] or "node"
        digest = hashlib.sha256(node_fqn.encode()).hexdigest()[:12]
        self.path = Path(cache_dir).expanduser() / "runtime" / f"vocabulary-{stem}-{digest}.json"

    def save(self, vocabulary: Vocabulary, table: ClassIdTable, configured: str) -> None:
        """Persist revision ``vocabulary.revision`` (call before publishing it).

        Raises:
            OSError: the file could not be written (the old one is left intact).
        """
        data = {
            "format": FORMAT,
            "node": self.node_fqn,
            "revision": int(vocabulary.revision),
            "configured": configured,
            "vocabulary": {"source": vocabulary.source, "classes": [_class_json(c) for c in vocabulary.classes],
                           "class_ids": list(vocabulary.ids)},
            "ids": table.to_json(),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps(data, separators=(",", ":")).encode(), durable=True)

    def load(self) -> tuple[Optional[dict[str, Any]], str]:
        """(the checked file content, "") or (None, why it is unusable); (None, "") when there is no file."""
        if not self.path.exists():
            return None, ""
        try:
            data = json.loads(read_text_file(self.path, "persisted vocabulary", max_bytes=MAX_FILE_BYTES))
        except (UntrustedInputError, ValueError, RecursionError) as exc:
            return None, f"unreadable ({short_repr(str(exc), 200)})"
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            return None, f"not a {FORMAT} file"
        if data.get("node") != self.node_fqn:
            return None, f"written by another node ({short_repr(data.get('node'))})"
        revision = data.get("revision")
        if not isinstance(revision, int) or isinstance(revision, bool) or not 0 < revision <= MAX_REVISION:
            return None, f"bad revision {short_repr(revision)}"
        return data, ""


def restore(store: Optional[VocabularyStore], configured: Vocabulary, persist: bool, id_limit: int) -> Restored:
    """What configure starts from (never raises: an unusable file is a warning)."""
    if store is None:
        return Restored(0, None, None, "cache_dir is empty: the runtime vocabulary is not persisted and "
                                       "revisions start at 1 at every start")
    data, why = store.load()
    if data is None:
        if not why:
            return Restored(0, None, None, "")
        salvaged = _salvage_revision(store.path)
        return Restored(salvaged, None, None, f"persisted vocabulary {store.path} ignored: {why}; using the "
                        f"parameters" + (f" (revision counter kept: {salvaged})" if salvaged else ""), warning=True)
    revision = int(data["revision"])
    try:
        vocabulary = _vocabulary_from_json(data.get("vocabulary"), revision)
        table = ClassIdTable.from_json(data.get("ids"))
        if table.names != tuple(vocabulary.names) or table.ids != vocabulary.ids:
            raise ClassIdError("the id table does not match the vocabulary")
        if max(table.ids + tuple(i for i, _, _ in table.retired), default=0) >= id_limit:
            raise ClassIdError(f"ids reach beyond the limit of this configuration ({id_limit} ids)")
    except (VocabularyError, ClassIdError, TypeError, ValueError, KeyError) as exc:
        return Restored(revision, None, None, f"persisted vocabulary {store.path} ignored: {reason_of(exc)}; using "
                        f"the parameters (revision counter kept: {revision})", warning=True)
    if not persist:
        return Restored(revision, table, None, f"persist_vocabulary is false: the configured vocabulary is used "
                        f"(revisions continue after {revision})")
    if data.get("configured") != fingerprint(configured):
        return Restored(revision, table, None, "the configured vocabulary changed since the runtime vocabulary was "
                        f"saved: using the parameters (revisions continue after {revision})")
    return Restored(revision, table, vocabulary, f"restored the runtime vocabulary of revision {revision} "
                    f"({len(vocabulary)} classes) from {store.path}")


def reason_of(exc: BaseException) -> str:
    return short_repr(str(exc), 300)


def _class_json(c: ClassSpec) -> dict[str, Any]:
    return {"name": c.name, "synonyms": list(c.synonyms), "description": c.description, "is_thing": c.is_thing,
            "thing_explicit": c.thing_explicit}


def _vocabulary_from_json(data: Any, revision: int) -> Vocabulary:
    if not isinstance(data, dict) or not isinstance(data.get("classes"), list):
        raise VocabularyError("no vocabulary in the file")
    classes = []
    for c in data["classes"]:
        if not isinstance(c, dict) or not isinstance(c.get("synonyms"), list):
            raise VocabularyError(f"bad class entry {short_repr(c)}")
        for key, kind in (("name", str), ("description", str), ("is_thing", bool), ("thing_explicit", bool)):
            if not isinstance(c.get(key), kind):
                raise VocabularyError(f"bad {key} in class entry {short_repr(c)}")
        classes.append(ClassSpec(c["name"], tuple(c["synonyms"]), c["description"], c["is_thing"],
                                 c["thing_explicit"]))
    ids = data.get("class_ids")
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise VocabularyError("bad class_ids")
    source = data.get("source") if isinstance(data.get("source"), str) else ""
    # Vocabulary validates everything a request is checked for (names, lengths, control characters, ids).
    return Vocabulary(tuple(classes), revision=revision, source=source, class_ids=tuple(ids))


def _salvage_revision(path: Path) -> int:
    """The revision counter of a file that is otherwise unusable (0 when even that is unreadable)."""
    try:
        data = json.loads(read_text_file(path, "persisted vocabulary", max_bytes=MAX_FILE_BYTES))
        revision = data.get("revision") if isinstance(data, dict) else None
    except (UntrustedInputError, ValueError, RecursionError):
        return 0
    if isinstance(revision, int) and not isinstance(revision, bool) and 0 < revision <= MAX_REVISION:
        return revision
    return 0
