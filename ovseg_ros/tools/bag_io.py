"""rosbag2 input and output of ``ovseg-bag`` with `rosbags <https://gitlab.com/ternaris/rosbags>`_ (pure Python,
no ROS installation needed to read or write sqlite3 and MCAP bags), and the resumable parts of a run.

* :func:`make_typestore`: the ROS 2 Kilted types of rosbags plus this package's own ``msg/*.msg`` (and
  vision_msgs' LabelInfo when its definitions are installed), so the output bag carries the full message
  definitions and type hashes that ``ros2 bag`` and Foxglove need.
* :func:`open_reader`: a bag opened with a clear :class:`BagError` for a missing, unreadable or truncated one.
* Parts: each chunk of frames is written to its own file (``chunk-NNNNNN.part``) by the process that segmented
  it, through a temporary file renamed when complete, so an interrupted run keeps every finished chunk and a
  rerun redoes only the rest. :func:`write_bag` merges the parts (and copied input messages) into one bag.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, Optional

PART_MAGIC = b"OVSEGBAGPART1\n"
_RECORD = struct.Struct("<qqiiI")  # log time ns, frame index, output index, topic index, payload length
_PACKAGE = "ovseg_ros"


class BagError(Exception):
    """A bag that cannot be read or written, with the reason (shown to the user as is)."""


# --- types ------------------------------------------------------------------------------------------------
def package_msg_dir() -> Path:
    """This package's ``msg/`` folder: the installed share folder, else the source tree's."""
    try:
        from ament_index_python.packages import get_package_share_directory

        installed = Path(get_package_share_directory(_PACKAGE)) / "msg"
        if installed.is_dir():
            return installed
    except Exception:  # noqa: BLE001  (no ament index: a pip install or the source tree)
        pass
    source = Path(__file__).resolve().parents[2] / "msg"
    if source.is_dir():
        return source
    raise BagError(f"cannot find the {_PACKAGE} msg/ folder (neither installed nor in the source tree)")


def vision_msgs_dir() -> Optional[Path]:
    """vision_msgs' ``msg/`` folder when installed (LabelInfo is then written), else None."""
    try:
        from ament_index_python.packages import get_package_share_directory

        path = Path(get_package_share_directory("vision_msgs")) / "msg"
    except Exception:  # noqa: BLE001  (not installed)
        return None
    return path if (path / "LabelInfo.msg").is_file() and (path / "VisionClass.msg").is_file() else None


def make_typestore(with_vision_msgs: bool = True) -> Any:
    """rosbags' ROS 2 Kilted typestore with ``ovseg_ros/msg/*`` (and vision_msgs when found) registered."""
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    store = get_typestore(Stores.ROS2_KILTED)
    types: dict[str, Any] = {}
    folders = [(_PACKAGE, package_msg_dir())]
    vision = vision_msgs_dir() if with_vision_msgs else None
    if vision is not None:
        folders.append(("vision_msgs", vision))
    for package, folder in folders:
        for path in sorted(folder.glob("*.msg")):
            types.update(get_types_from_msg(path.read_text(), f"{package}/msg/{path.stem}"))
    store.register(types)
    return store


class Canonical:
    """CDR with zeroed padding: the same message always gives the same bytes.

    rmw's serializer (``rclpy.serialization``) leaves the alignment padding between fields uninitialised, so
    the same message can serialize to different bytes; rosbags re-serializes it with zero padding (a pure
    function of the message's content), which makes bags reproducible and comparable byte for byte.
    """

    def __init__(self, typestore: Any) -> None:
        self._store = typestore

    def __call__(self, raw: bytes, msgtype: str) -> bytes:
        return bytes(self._store.serialize_cdr(self._store.deserialize_cdr(raw, msgtype), msgtype))


def qos(latched: bool) -> Any:
    """The offered QoS recorded with an output topic: the node's output_qos / latched_qos (qos.py)."""
    from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime

    zero = QosTime(0, 0)
    return Qos(QosHistory.KEEP_LAST, 1 if latched else 2, QosReliability.RELIABLE,
               QosDurability.TRANSIENT_LOCAL if latched else QosDurability.VOLATILE, zero, zero,
               QosLiveliness.AUTOMATIC, zero, False)


# --- reading ----------------------------------------------------------------------------------------------
def open_reader(path: Path) -> Any:
    """An open rosbags Reader of the rosbag2 folder ``path`` (sqlite3 or MCAP); BagError with the reason."""
    from rosbags.rosbag2 import Reader

    if not path.exists():
        raise BagError(f"{path}: no such bag")
    if not path.is_dir() or not (path / "metadata.yaml").is_file():
        raise BagError(f"{path}: not a rosbag2 folder (it needs a metadata.yaml; run `ros2 bag reindex` on a "
                       "recording that was cut off before its metadata was written)")
    try:
        reader = Reader(path)
        reader.open()
    except Exception as exc:  # noqa: BLE001  (rosbags raises several types for broken files)
        hint = " (a recording cut off before its end: `mcap recover` rebuilds the file)" if "magic" in str(exc) else ""
        raise BagError(f"{path}: cannot open the bag (corrupt or truncated?): {type(exc).__name__}: {exc}{hint}") from exc
    return reader


def input_identity(reader: Any, path: Path) -> dict[str, Any]:
    """What identifies an input bag for resuming (a different recording at the same path is refused)."""
    return {"path": str(path.resolve()), "messages": int(reader.message_count), "start": int(reader.start_time),
            "end": int(reader.end_time), "topics": sorted(f"{c.topic}:{c.msgtype}" for c in reader.connections)}


# --- parts ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Record:
    """One output message of a part: sorted by (log time, frame index, output index)."""

    log_time: int
    frame: int
    index: int
    topic: int  # index into the part's topic table
    data: bytes

    @property
    def key(self) -> tuple[int, int, int, int]:
        return (self.log_time, 2, self.frame, self.index)


class PartWriter:
    """One part, written as its records come (a chunk's clouds may come after later frames' outputs) to an
    unsorted spool file, then rewritten in record order and renamed into place by :meth:`close`: memory holds
    the index, not the messages, and a part that exists is complete."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._spool_path = path.with_name(path.name + ".spool")
        self._spool = open(self._spool_path, "w+b")
        self._index: list[tuple[tuple[int, int, int, int], int, int, int, int, int]] = []

    def add(self, record: Record) -> None:
        offset = self._spool.tell()
        self._spool.write(record.data)
        self._index.append((record.key, offset, len(record.data), record.frame, record.index, record.topic))

    def close(self, topics: list[tuple[str, str]], path: Optional[Path] = None) -> None:
        """Write the part (to ``path``, default the one given at creation) atomically."""
        self._spool.flush()
        self._index.sort(key=lambda item: item[0])

        def records() -> Iterator[Record]:
            for key, offset, size, frame, index, topic in self._index:
                self._spool.seek(offset)
                yield Record(key[0], frame, index, topic, self._spool.read(size))

        try:
            write_part(path or self.path, topics, records())
        finally:
            self.discard()

    def discard(self) -> None:
        self._spool.close()
        self._spool_path.unlink(missing_ok=True)


def write_part(path: Path, topics: list[tuple[str, str]], records: Iterable[Record]) -> None:
    """Write a part atomically (temporary file, fsync, rename): a part that exists is complete."""
    tmp = path.with_name(path.name + ".tmp")
    header = json.dumps({"topics": topics}).encode()
    with open(tmp, "wb") as f:
        f.write(PART_MAGIC)
        f.write(struct.pack("<I", len(header)))
        f.write(header)
        for r in records:
            f.write(_RECORD.pack(r.log_time, r.frame, r.index, r.topic, len(r.data)))
            f.write(r.data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_part(path: Path) -> tuple[list[tuple[str, str]], Iterator[Record]]:
    """(topic table, records) of a part; BagError when it is not one of ours or is damaged."""
    f = open(path, "rb")
    try:
        if f.read(len(PART_MAGIC)) != PART_MAGIC:
            raise BagError(f"{path}: not an ovseg-bag part")
        (n,) = struct.unpack("<I", _read_exact(f, 4, path))
        topics = [tuple(t) for t in json.loads(_read_exact(f, n, path))["topics"]]
    except Exception:
        f.close()
        raise
    return topics, _records(f, path)  # type: ignore[return-value]


def _records(f: BinaryIO, path: Path) -> Iterator[Record]:
    with f:
        while True:
            head = f.read(_RECORD.size)
            if not head:
                return
            if len(head) != _RECORD.size:
                raise BagError(f"{path}: damaged part (delete it to redo its frames)")
            t, frame, index, topic, size = _RECORD.unpack(head)
            yield Record(t, frame, index, topic, _read_exact(f, size, path))


def _read_exact(f: BinaryIO, n: int, path: Path) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise BagError(f"{path}: damaged part (delete it to redo its frames)")
    return data


# --- writing ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Topic:
    """An output connection: name, type, and how it is recorded."""

    name: str
    msgtype: str
    latched: bool = False
    msgdef: Optional[str] = None  # copied input topics keep the recording's own definition
    rihs01: Optional[str] = None
    offered_qos: tuple = ()


def write_bag(path: Path, storage: str, topics: list[Topic], messages: Iterable[tuple[int, int, bytes]],
              typestore: Any) -> dict[str, int]:
    """Write ``messages`` ((log time, topic index, CDR bytes), in time order) to a new rosbag2 bag at ``path``.

    Returns the message count per topic name. The bag is written to ``path`` directly; on failure the
    incomplete bag is removed, so ``path`` only ever holds a complete bag.
    """
    from rosbags.rosbag2 import StoragePlugin, Writer

    plugin = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}[storage]
    counts: dict[str, int] = {}
    writer = Writer(path, version=9, storage_plugin=plugin)
    try:
        writer.open()
        conns = []
        for t in topics:
            if t.msgdef is not None:
                conns.append(writer.add_connection(t.name, t.msgtype, msgdef=t.msgdef, rihs01=t.rihs01,
                                                   offered_qos_profiles=list(t.offered_qos)))
            else:
                conns.append(writer.add_connection(t.name, t.msgtype, typestore=typestore,
                                                   offered_qos_profiles=list(t.offered_qos) or [qos(t.latched)]))
        for log_time, topic, data in messages:
            writer.write(conns[topic], log_time, data)
            counts[topics[topic].name] = counts.get(topics[topic].name, 0) + 1
        writer.close()
    except BaseException:
        try:
            writer.abort() if hasattr(writer, "abort") else writer.close()
        except Exception:  # noqa: BLE001  (already failing: report the first error)
            pass
        _remove_tree(path)
        raise
    return counts


def _remove_tree(path: Path) -> None:
    if path.is_dir():
        for p in sorted(path.rglob("*"), reverse=True):
            p.unlink() if not p.is_dir() else p.rmdir()
        path.rmdir()
