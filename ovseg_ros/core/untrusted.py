"""Reading input that comes from outside the process: bounded YAML, bounded files, bounded messages.

Everything a peer on the ROS graph or a user's file can supply goes through here before the rest of the
code sees it, so that no input can cost more than a known amount of time or memory:

* :func:`load_yaml` parses YAML with limits on the text size, on the node count *with aliases expanded*
  (a 344-character "billion laughs" document expands to 10^9 nodes), and on the nesting depth, refusing
  recursive aliases. The structure is checked on the composed node graph, before any Python object is
  built, and the safe constructor is used (no arbitrary classes).
* :func:`read_text_file` reads a UTF-8 text file of bounded size with clear errors (directory, not UTF-8,
  missing, too large) instead of raw Python exceptions.
* :func:`short_repr` formats any value for an error message in bounded time and length: an untrusted
  structure is never formatted whole (``repr`` of a shared-reference tree is exponential).
"""

from __future__ import annotations

import os
import reprlib
import threading
from pathlib import Path
from typing import Any, Optional

import yaml

#: Defaults of :func:`load_yaml`; callers with smaller inputs pass smaller limits.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_NODES = 100_000
MAX_YAML_DEPTH = 32
#: Largest text file :func:`read_text_file` reads by default.
MAX_TEXT_FILE_BYTES = 4 << 20


class UntrustedInputError(ValueError):
    """Outside input that is refused; the message says why (and never contains the input whole)."""


_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxdict = _REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxfrozenset = 6
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlong = 40


def short_repr(value: Any, limit: int = 120) -> str:
    """``repr(value)`` bounded in depth, items and characters; never raises (for error messages)."""
    try:
        text = _REPR.repr(value)
    except Exception:  # noqa: BLE001  (a hostile __repr__; the type name is still useful)
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_yaml(
    text: str | bytes,
    what: str = "YAML",
    max_bytes: int = MAX_YAML_BYTES,
    max_nodes: int = MAX_YAML_NODES,
    max_depth: int = MAX_YAML_DEPTH,
) -> Any:
    """Parse one untrusted YAML document with bounded cost.

    Args:
        text: the document (bytes must be UTF-8).
        what: names the input in error messages (e.g. ``"segmenter_options"``, ``"vocabulary file x.yaml"``).
        max_bytes, max_nodes, max_depth: limits; nodes are counted with every alias expanded.

    Raises:
        UntrustedInputError: too large, too many nodes, too deep, recursive, or not valid YAML.
    """
    if isinstance(text, (bytes, bytearray, memoryview)):
        raw = bytes(text)
        if len(raw) > max_bytes:
            raise UntrustedInputError(f"{what} is {len(raw)} bytes; at most {max_bytes} are accepted")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UntrustedInputError(f"{what} is not UTF-8 text (byte {exc.start})") from None
    if not isinstance(text, str):
        raise UntrustedInputError(f"{what} must be text, got {type(text).__name__}")
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise UntrustedInputError(f"{what} is {size} bytes; at most {max_bytes} are accepted")
    loader: Optional[_BoundedLoader] = None
    try:
        loader = _BoundedLoader(text, max_depth)  # the reader already rejects some characters here
        node = loader.get_single_node()
        if node is None:
            return None
        _check_graph(node, what, max_nodes, max_depth)
        return loader.construct_document(node)
    except UntrustedInputError as exc:
        raise UntrustedInputError(f"{what}: {exc}; refused" if str(exc).startswith("nested") else str(exc)) from None
    except yaml.YAMLError as exc:
        raise UntrustedInputError(f"{what} is not valid YAML/JSON: {_short_yaml_error(exc)}") from None
    except RecursionError:
        raise UntrustedInputError(f"{what} is nested too deeply (at most {max_depth} levels)") from None
    except Exception as exc:  # noqa: BLE001  (constructor errors on odd scalars, e.g. an impossible date)
        raise UntrustedInputError(f"{what} could not be read: {type(exc).__name__}: {short_repr(str(exc))}") from None
    finally:
        if loader is not None:
            loader.dispose()


class _BoundedLoader(yaml.SafeLoader):
    """The safe loader with the composer's nesting depth bounded (it recurses once per level)."""

    def __init__(self, text: str, max_depth: int) -> None:
        super().__init__(text)
        self._max_depth = max_depth
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > self._max_depth:
                raise UntrustedInputError(f"nested more than {self._max_depth} levels deep")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _check_graph(root: yaml.Node, what: str, max_nodes: int, max_depth: int) -> None:
    """Count nodes with aliases expanded and measure depth, iteratively (no recursion limit to hit).

    An alias is the same node object seen again, so sizes are memoised per node: the graph is walked once
    even when its expansion is exponential.
    """
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        children = _children(node)
        if done:
            on_path.discard(key)
            total = 1 + sum(size[id(c)] for c in children)
            deep = 1 + max((depth[id(c)] for c in children), default=0)
            if total > max_nodes:
                raise UntrustedInputError(
                    f"{what} expands to more than {max_nodes} nodes (aliases counted expanded); refused"
                )
            if deep > max_depth:
                raise UntrustedInputError(f"{what} is nested more than {max_depth} levels deep; refused")
            size[key], depth[key] = total, deep
            continue
        if key in size:
            continue
        if key in on_path:
            raise UntrustedInputError(f"{what} contains a recursive alias; refused")
        if len(on_path) >= max_depth:
            raise UntrustedInputError(f"{what} is nested more than {max_depth} levels deep; refused")
        on_path.add(key)
        stack.append((node, True))
        for child in children:
            if id(child) not in size:
                if id(child) in on_path:
                    raise UntrustedInputError(f"{what} contains a recursive alias; refused")
                stack.append((child, False))


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _short_yaml_error(exc: yaml.YAMLError) -> str:
    # PyYAML's messages quote the offending line; keep them short.
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:197] + "..."


def read_text_file(path: str | Path, what: str = "file", max_bytes: int = MAX_TEXT_FILE_BYTES) -> str:
    """The UTF-8 text of ``path``, at most ``max_bytes`` bytes.

    Raises:
        UntrustedInputError: missing, a directory, unreadable, too large, or not UTF-8; the message names
            the file and what was expected.
    """
    p = Path(path)
    try:
        if p.is_dir():
            raise UntrustedInputError(f"{what} {str(p)!r} is a directory; expected a UTF-8 text file")
        with open(p, "rb") as f:
            raw = f.read(max_bytes + 1)
    except UntrustedInputError:
        raise
    except FileNotFoundError:
        raise UntrustedInputError(f"{what} {str(p)!r} does not exist") from None
    except OSError as exc:
        raise UntrustedInputError(f"{what} {str(p)!r} cannot be read: {exc.strerror or type(exc).__name__}") from None
    if len(raw) > max_bytes:
        raise UntrustedInputError(f"{what} {str(p)!r} is larger than {max_bytes} bytes; refused")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UntrustedInputError(
            f"{what} {str(p)!r} is not UTF-8 text (invalid byte at offset {exc.start}); expected a UTF-8 text file"
        ) from None


def atomic_write(path: str | Path, data: bytes, durable: bool = False) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder renamed into place (readers never
    see half a file); the temp file is removed when anything fails (full disk, permissions, interrupt).
    ``durable``: fsync the file before the rename and the folder after it, so that the new content (not an
    empty or old file) is what a power loss or a crash right after the call leaves behind.

    Raises:
        OSError: the write failed (nothing is left behind).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
