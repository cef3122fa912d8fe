"""The vocabulary: the class names a segmenter labels, with synonyms, descriptions and thing/stuff flags.

A :class:`Vocabulary` is immutable. Changing the vocabulary means building a new one (with a new
``revision``) and swapping it in whole, so an output can always say exactly which vocabulary made it.
Segmenters label pixels by position in ``classes`` (0-based); :data:`UNLABELED` marks pixels that belong to
no class (background words, low confidence). The ids *published* for the classes are ``class_ids`` (one per
position, stable across vocabulary changes, see :mod:`.class_ids`); without them they are the positions.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from functools import cached_property
import os
import re
import unicodedata
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

from .untrusted import UntrustedInputError, load_yaml, read_text_file, short_repr

#: Label value of "no class" in the core's int32 label maps. The ROS layer maps it to the
#: vision_msgs convention (255 in mono8, 65535 in mono16).
UNLABELED = -1

#: Largest vocabulary: ids 0..65533 fit mono16 with 65535 reserved for "unlabeled" (and 65534 kept free
#: so that "number of classes" itself also fits a uint16).
MAX_CLASSES = 65534

#: Longest accepted name/synonym/description in characters; the CLIP context check comes later,
#: per model, when the text is tokenised.
MAX_TEXT_CHARS = 1000

#: Most texts of one ``query`` call, and the longest query text in characters: a query is encoded and
#: segmented on demand, so its cost must be bounded (3000 texts took 45 s and 2.7 GB on the tiny model).
MAX_QUERY_TEXTS = 64
MAX_QUERY_TEXT_CHARS = 300

#: Limits of a vocabulary file (bytes, YAML nodes with aliases expanded, nesting depth).
MAX_VOCABULARY_FILE_BYTES = 4 << 20
MAX_VOCABULARY_FILE_NODES = 500_000
MAX_VOCABULARY_FILE_DEPTH = 8

# Words that usually name amorphous regions ("stuff"). Used only when a request gives no thing/stuff
# flag; FC-CLIP overrides this with COCO-panoptic membership.
_STUFF_WORDS = frozenset(
    """
    floor wall ceiling sky road sidewalk pavement grass ground earth dirt sand snow water sea river lake
    ocean mountain hill rock stone field terrain vegetation tree trees bush forest building house roof
    fence railing curtain carpet rug path track runway gravel mud stairs stair staircase door window
    platform bridge wood tile brick concrete asphalt parking lot crosswalk lane background land cloud
    clouds fog
    """.split()
)


class VocabularyError(ValueError):
    """A vocabulary request that cannot be used; the message says exactly what is wrong."""


@dataclass(frozen=True)
class ClassSpec:
    """One class of the vocabulary.

    Attributes:
        name: the display name, published in LabelInfo and matched by consumers (Nav2 matches by name).
        synonyms: further names for the same class; segmenters score every name and keep the best.
        description: an optional definition (ITACLIP fuses it with the names).
        is_thing: countable object (split into instances) or amorphous stuff (merged per class).
    """

    name: str
    synonyms: tuple[str, ...] = ()
    description: str = ""
    is_thing: bool = True
    #: True when ``is_thing`` came from the request/file, False when it was guessed from the name
    #: (methods with their own knowledge, e.g. FC-CLIP's COCO membership, may then override it).
    thing_explicit: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        """The name followed by its synonyms: every text a segmenter should score for this class."""
        return (self.name,) + self.synonyms


@dataclass(frozen=True)
class Vocabulary:
    """An immutable, validated list of classes; ids are positions."""

    classes: tuple[ClassSpec, ...]
    revision: int = 0
    #: Free-form provenance (preset name, "service", "parameter"), for logs only.
    source: str = ""
    #: Published id of each class (same order as ``classes``); empty: the positions.
    class_ids: tuple[int, ...] = ()
    #: Allow one text among the names of two classes. Only for a published class list read as it is (the
    #: FC-CLIP authors' ``*_with_prompt_eng.txt`` files share synonyms between classes; a method that takes
    #: the best of each class's names scores a shared text for both). Never set for user vocabularies.
    shared_texts: bool = False

    def __post_init__(self) -> None:
        _validate_classes(self.classes, self.shared_texts)
        if self.class_ids and (len(self.class_ids) != len(self.classes) or len(set(self.class_ids)) != len(
                self.class_ids) or min(self.class_ids) < 0 or max(self.class_ids) >= MAX_CLASSES):
            raise VocabularyError(f"class_ids must be {len(self.classes)} distinct ids in 0..{MAX_CLASSES - 1}")

    def __len__(self) -> int:
        return len(self.classes)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    def with_revision(self, revision: int) -> "Vocabulary":
        return replace(self, revision=revision)

    def with_ids(self, class_ids: Sequence[int]) -> "Vocabulary":
        return replace(self, class_ids=tuple(int(i) for i in class_ids))

    @property
    def ids(self) -> tuple[int, ...]:
        """The published id of each class (positions when no ids were assigned)."""
        return self.class_ids or tuple(range(len(self.classes)))

    @property
    def id_bound(self) -> int:
        """Largest published id + 1: the label image must hold ids below it (mono8 while <= 255)."""
        return max(self.class_ids) + 1 if self.class_ids else len(self.classes)

    @cached_property  # read per frame; the dataclass is frozen, so the answer never changes
    def ids_are_positions(self) -> bool:
        return not self.class_ids or self.class_ids == tuple(range(len(self.classes)))

    def query_names(self) -> tuple[list[str], list[int]]:
        """Flatten every name of every class: (texts, class index of each text).

        Segmenters score each text separately and take the max per class, so classes may carry
        different numbers of names.
        """
        texts = [n for c in self.classes for n in c.names]
        owner = [i for i, c in enumerate(self.classes) for _ in c.names]
        return texts, owner

    @classmethod
    def from_request(
        cls,
        entries: Sequence[str],
        descriptions: Sequence[str] = (),
        is_thing: Sequence[bool] = (),
        revision: int = 0,
        source: str = "",
    ) -> "Vocabulary":
        """Build from the service/parameter form: each entry is ``"name, synonym, synonym"``.

        ``descriptions`` and ``is_thing`` are optional: empty, or one value per entry.
        Raises :class:`VocabularyError` naming the offending entry.
        """
        if len(entries) == 0:
            raise VocabularyError("the vocabulary is empty: give at least one class name")
        if len(entries) > MAX_CLASSES:
            raise VocabularyError(
                f"{len(entries)} classes requested; at most {MAX_CLASSES} fit a mono16 label image "
                f"with 65535 reserved for 'unlabeled'"
            )
        for label, values in (("descriptions", descriptions), ("is_thing", is_thing)):
            if len(values) not in (0, len(entries)):
                raise VocabularyError(
                    f"{label} has {len(values)} values for {len(entries)} classes: give none or one per class"
                )
        classes = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, str):
                raise VocabularyError(f"class {i}: expected a string, got {type(entry).__name__}")
            if len(entry) > MAX_TEXT_CHARS * 8:
                raise VocabularyError(f"class {i}: the entry has {len(entry)} characters; at most "
                                      f"{MAX_TEXT_CHARS * 8} are accepted")
            names = [n.strip() for n in entry.split(",")]
            if not names[0]:
                raise VocabularyError(f"class {i} ({short_repr(entry)}): the name is empty")
            if any(not n for n in names[1:]):
                raise VocabularyError(f"class {i} ({short_repr(entry)}): empty synonym (stray comma?)")
            thing = bool(is_thing[i]) if is_thing else default_is_thing(names[0])
            if descriptions and not isinstance(descriptions[i], str):
                raise VocabularyError(f"class {i}: the description must be a string")
            desc = descriptions[i].strip() if descriptions else ""
            classes.append(ClassSpec(names[0], tuple(names[1:]), desc, thing, thing_explicit=bool(is_thing)))
        return cls(tuple(classes), revision=revision, source=source)

    @classmethod
    def from_mapping_list(cls, items: Iterable[Mapping | str], revision: int = 0, source: str = "") -> "Vocabulary":
        """Build from YAML-style items: a string ``"name, syn"`` or a mapping with keys
        ``name``, ``synonyms`` (list or comma string), ``description``, ``is_thing``."""
        if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Iterable):
            raise VocabularyError(f"'classes' must be a list of classes, got {type(items).__name__}")
        classes = []
        for i, item in enumerate(items):
            if i >= MAX_CLASSES:
                raise VocabularyError(f"more than {MAX_CLASSES} classes; at most {MAX_CLASSES} are supported")
            if isinstance(item, str):
                classes.append(Vocabulary.from_request([item]).classes[0])
                continue
            if not isinstance(item, Mapping) or "name" not in item:
                raise VocabularyError(
                    f"class {i}: expected a string or a mapping with a 'name', got {short_repr(item)}"
                )
            unknown = [k for k in item if k not in ("name", "synonyms", "description", "is_thing")]
            if unknown:
                raise VocabularyError(f"class {i} ({short_repr(item['name'])}): unknown keys {short_repr(unknown)}")
            name = _text_field(item["name"], i, "name")
            syn = item.get("synonyms", ())
            if syn is None:
                syn = ()
            if isinstance(syn, str):
                syn = syn.split(",")
            if not isinstance(syn, (list, tuple)):
                raise VocabularyError(f"class {i} ({short_repr(name)}): synonyms must be a list or a comma "
                                      f"separated string, got {type(syn).__name__}")
            thing = item.get("is_thing")
            if thing is not None and not isinstance(thing, bool):
                raise VocabularyError(f"class {i} ({short_repr(name)}): is_thing must be true or false, "
                                      f"got {short_repr(thing)}")
            classes.append(
                ClassSpec(
                    name.strip(),
                    tuple(_text_field(s, i, "synonym").strip() for s in syn),
                    _text_field(item.get("description", "") or "", i, "description").strip(),
                    default_is_thing(name) if thing is None else thing,
                    thing_explicit=thing is not None,
                )
            )
        if not classes:
            raise VocabularyError("the vocabulary is empty: give at least one class name")
        return cls(tuple(classes), revision=revision, source=source)

    def to_request(self) -> list[str]:
        """The inverse of :meth:`from_request` (``"name, syn, syn"`` per class)."""
        return [", ".join(c.names) for c in self.classes]


def _text_field(value: object, i: int, what: str) -> str:
    """A name/synonym/description from a file: strings, and plain numbers read by YAML (``- 7up`` is text,
    ``- 1984`` an int); anything else (mappings, lists, dates) is refused rather than formatted whole."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise VocabularyError(f"class {i}: the {what} must be text, got {type(value).__name__} {short_repr(value)}")


def name_key(name: str) -> str:
    """Comparison key of a name: lower-case letters and digits only ("Traffic-Light" == "traffic light")."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def background_without_classes(
    words: Sequence[str], vocabulary: Vocabulary, extra_names: Sequence[str] = ()
) -> tuple[str, ...]:
    """Background words minus those naming a class (or one of ``extra_names``).

    A word such as "wall" must not push down the class "wall" when the user asks for it indoors.
    """
    taken = {name_key(n) for c in vocabulary.classes for n in c.names} | {name_key(n) for n in extra_names}
    return tuple(w for w in words if name_key(w) not in taken)


def default_is_thing(name: str) -> bool:
    """Guess thing/stuff from the name when the request does not say (stuff if any word is a stuff word)."""
    words = name.lower().replace("-", " ").replace("_", " ").split()
    return not any(w in _STUFF_WORDS for w in words)


def _validate_classes(classes: Sequence[ClassSpec], shared_texts: bool = False) -> None:
    if len(classes) == 0:
        raise VocabularyError("the vocabulary is empty: give at least one class name")
    if len(classes) > MAX_CLASSES:
        raise VocabularyError(f"{len(classes)} classes; at most {MAX_CLASSES} are supported")
    seen: dict[str, int] = {}
    for i, c in enumerate(classes):
        for text in itertools.chain(c.names, [c.description]):
            if not isinstance(text, str):
                raise VocabularyError(f"class {i}: names and descriptions must be text, got {type(text).__name__}")
            if len(text) > MAX_TEXT_CHARS:
                raise VocabularyError(
                    f"class {i} ({short_repr(c.name[:40])}...): a text of {len(text)} characters exceeds "
                    f"{MAX_TEXT_CHARS}"
                )
            if _has_control(text):
                raise VocabularyError(
                    f"class {i} ({short_repr(c.name)}): control characters are not allowed in names"
                )
        if not c.name or not c.name.strip():
            raise VocabularyError(f"class {i}: the name is empty")
        if any(not s.strip() for s in c.synonyms):
            raise VocabularyError(f"class {i} ({short_repr(c.name)}): empty synonym")
        key = c.name.strip().lower()
        if key in seen:
            raise VocabularyError(
                f"duplicate class name {short_repr(c.name)} (classes {seen[key]} and {i}); names must be unique, "
                f"put alternative names as synonyms: 'person, people'"
            )
        seen[key] = i
    # A text naming two classes (one's name is the other's synonym, or a shared synonym) makes the label of
    # that text ambiguous: segmenters score every name and keep the best, so both classes would claim it.
    owner: dict[str, int] = {}
    for i, c in enumerate([] if shared_texts else classes):
        for text in dict.fromkeys(n.strip().lower() for n in c.names):
            j = owner.setdefault(text, i)
            if j != i:
                raise VocabularyError(
                    f"the name {short_repr(text)} is used by class {j} ({short_repr(classes[j].name)}) and by class "
                    f"{i} ({short_repr(c.name)}); a name or synonym may belong to one class only"
                )


def vocabulary_from_texts(texts: Sequence[str], source: str = "query") -> Vocabulary:
    """A throw-away vocabulary for runtime queries: one class per free-form text, no synonyms split.

    Query texts may contain commas ("the red chair, left of the door"), so they are not split.
    Duplicates are allowed in queries; they are made unique by position.
    """
    check_query_texts(texts)
    classes = []
    for i, t in enumerate(texts):
        classes.append(ClassSpec(name=t.strip(), is_thing=True))
    names = [c.name.lower() for c in classes]
    if len(set(names)) != len(names):
        classes = [replace(c, name=f"{c.name} #{i}") if names.count(c.name.lower()) > 1 else c
                   for i, c in enumerate(classes)]
    return Vocabulary(tuple(classes), source=source)


def check_query_texts(texts: Sequence[str]) -> None:
    """Refuse a query before any work: no texts, more than :data:`MAX_QUERY_TEXTS`, a text that is empty,
    not a string, longer than :data:`MAX_QUERY_TEXT_CHARS`, or holding control characters.

    Raises:
        VocabularyError: the reason.
    """
    try:
        n = len(texts)
    except TypeError:
        raise VocabularyError(f"the query texts must be a list, got {type(texts).__name__}") from None
    if n == 0:
        raise VocabularyError("the query has no texts")
    if n > MAX_QUERY_TEXTS:
        raise VocabularyError(f"the query has {n} texts; at most {MAX_QUERY_TEXTS} are accepted per call")
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise VocabularyError(f"query text {i} is empty")
        if len(t) > MAX_QUERY_TEXT_CHARS:
            raise VocabularyError(
                f"query text {i} has {len(t)} characters; at most {MAX_QUERY_TEXT_CHARS} are accepted"
            )
        if _has_control(t):
            raise VocabularyError(f"query text {i} contains control characters")


def _has_control(text: str) -> bool:
    """Any C0/C1 control character (NUL, newlines, ESC of ANSI sequences like ``\x1b[2J``, DEL): such a
    name would reach logs and terminals of every consumer (Nav2 logs LabelInfo names it does not know)."""
    return not text.isprintable() and any(unicodedata.category(ch) == "Cc" for ch in text)


def merge_descriptions(vocabulary: Vocabulary, descriptions: Mapping[str, str]) -> Vocabulary:
    """Fill empty descriptions from a name -> text mapping (case-insensitive), keeping given ones."""
    lower = {k.lower(): v for k, v in descriptions.items()}
    classes = tuple(
        c if c.description else replace(c, description=lower.get(c.name.lower(), ""))
        for c in vocabulary.classes
    )
    return replace(vocabulary, classes=classes)


def load_vocabulary_file(path: str | Path, revision: int = 0) -> Vocabulary:
    """Read a vocabulary YAML (``classes:`` list of strings or mappings, see ``config/vocabularies``)."""
    path = Path(path)
    try:
        text = read_text_file(path, "vocabulary file", max_bytes=MAX_VOCABULARY_FILE_BYTES)
        data = load_yaml(text, f"vocabulary file {path}", max_bytes=MAX_VOCABULARY_FILE_BYTES,
                         max_nodes=MAX_VOCABULARY_FILE_NODES, max_depth=MAX_VOCABULARY_FILE_DEPTH)
    except UntrustedInputError as exc:
        raise VocabularyError(str(exc)) from None
    if not isinstance(data, Mapping) or "classes" not in data:
        raise VocabularyError(f"vocabulary file {path} must be a mapping with a 'classes' list")
    try:
        return Vocabulary.from_mapping_list(data["classes"], revision=revision, source=path.stem)
    except VocabularyError as exc:
        raise VocabularyError(f"vocabulary file {path}: {exc}") from None


# --- vocabulary presets ------------------------------------------------------------------------------
def vocabulary_preset_dirs() -> list[Path]:
    """Where vocabulary presets (``config/vocabularies``) are looked up: ``$OVSEG_VOCABULARY_PATH`` (folders
    separated by ``:``), the ROS install's share folder (when ament_index_python is there), then the source tree."""
    dirs = [Path(p) for p in os.environ.get("OVSEG_VOCABULARY_PATH", "").split(":") if p]
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory

        try:
            dirs.append(Path(get_package_share_directory("ovseg_ros")) / "config" / "vocabularies")
        except (PackageNotFoundError, OSError, ValueError):  # OSError: no AMENT_PREFIX_PATH (not a ROS shell)
            pass
    except ImportError:
        pass
    dirs.append(Path(__file__).resolve().parents[2] / "config" / "vocabularies")
    return [d for d in dirs if d.is_dir()]


def find_vocabulary_preset(name: str) -> Optional[Path]:
    """The YAML file of preset ``name``, or None (names are plain file stems: no paths)."""
    if not re.match(r"^[A-Za-z0-9_.-]+$", name):
        return None
    for d in vocabulary_preset_dirs():
        path = d / f"{name}.yaml"
        if path.is_file():
            return path
    return None


def list_vocabulary_presets() -> list[str]:
    return sorted({p.stem for d in vocabulary_preset_dirs() for p in d.glob("*.yaml")})
