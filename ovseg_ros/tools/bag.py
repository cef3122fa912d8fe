"""``ovseg-bag``: segment rosbag2 recordings offline into a new bag of exactly segment_node's outputs.

Examples::

    ovseg-bag run1/ -o run1_seg/ --image /camera/color/image_raw --vocabulary floor wall "person, people"
    ovseg-bag run1/ -o run1_seg/ --image /cam/color/image_raw/compressed --depth /cam/depth/image_rect_raw \\
        --camera-info /cam/depth/camera_info --copy inputs --every 5 --start 10 --end 70
    torchrun --nproc_per_node=4 -m ovseg_ros.tools.bag run1/ -o run1_seg/ ...   # 4 processes share the frames

Reads sqlite3 and MCAP bags with rosbags (no ROS installation needed for the bag files themselves; the messages
are built by the node's own code with rclpy, see :mod:`ovseg_ros.ros.offline`). Output topics are the node's
(``/<node-name>/semantic/labels``, ``.../info``, ...; a camera named ``front=TOPIC`` publishes under
``/<node-name>/front/``), stamped with the input stamps and logged at the input frame's log time; the latched
``~/vocabulary`` (and ``~/label_info`` when vision_msgs is installed) come first.

Frames are processed in chunks; each finished chunk is kept in ``OUT.partial/`` so an interrupted run continues
where it stopped (run the same command again). Under torchrun each process segments every N-th chunk into its
own parts and rank 0 merges them into one bag, identical to a one-process run.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import itertools
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from . import plain_help
from .bag_io import (
    BagError,
    Canonical,
    PartWriter,
    Record,
    Topic,
    input_identity,
    make_typestore,
    open_reader,
    read_part,
    vision_msgs_dir,
    write_bag,
)

log = logging.getLogger("ovseg_bag")

IMAGE_TYPES = {"sensor_msgs/msg/Image": False, "sensor_msgs/msg/CompressedImage": True}
OPTIONAL_OUTPUTS = ("color", "overlay")
MANIFEST_VERSION = 1
#: Depth images logged up to this long before the time window are still paired (the node would hold them).
DEPTH_LEAD_NS = 1_000_000_000


# --- arguments ----------------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    from ..cli import add_cache_arguments, add_model_arguments

    p = argparse.ArgumentParser(prog="ovseg-bag", description=plain_help(__doc__.split("\n\n")[0]),
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=plain_help(__doc__.split("\n\n", 1)[1]))
    p.add_argument("input", help="rosbag2 folder (sqlite3 or MCAP)")
    p.add_argument("-o", "--output", required=True, help="output bag folder (must not exist, see --overwrite)")
    p.add_argument("--image", action="append", default=[], metavar="[CAMERA=]TOPIC",
                   help="camera topic (sensor_msgs/Image or CompressedImage); repeat for several cameras. "
                        "CAMERA names the node camera (outputs under ~/CAMERA/). Default: the bag's only image topic")
    p.add_argument("--depth", action="append", default=[], metavar="[CAMERA=]TOPIC",
                   help="depth image registered to the camera: adds ~/semantic/points (needs --camera-info)")
    p.add_argument("--camera-info", action="append", default=[], metavar="[CAMERA=]TOPIC",
                   help="the depth camera's camera_info")
    p.add_argument("--node-name", default="segment_node", help="node name (with namespace) the outputs are under")
    p.add_argument("--outputs", nargs="*", default=[], choices=OPTIONAL_OUTPUTS,
                   help="also write these (the node computes them only while subscribed); labels, confidence, info "
                        "and panoptic (publish_panoptic) are always written")
    p.add_argument("--start", type=float, default=None, help="skip the first START seconds of the recording")
    p.add_argument("--end", type=float, default=None, help="stop END seconds after the recording's start")
    p.add_argument("--every", type=int, default=1, help="segment every N-th frame of each camera")
    p.add_argument("--copy", choices=["none", "inputs", "all"], default="none",
                   help="copy input topics into the output: the camera topics used, or every topic")
    p.add_argument("--storage", choices=["mcap", "sqlite3"], default="mcap", help="output storage format")
    add_model_arguments(p, segmenter="", preset_help="method preset; default: the node's (realtime, else default)")
    add_cache_arguments(p)
    p.add_argument("--params-file", default="", help="segment_node parameters YAML (e.g. config/segment_node.yaml)")
    p.add_argument("-p", "--param", action="append", default=[], metavar="NAME:=VALUE",
                   help="a segment_node parameter (YAML value), e.g. -p overlay_alpha:=0.3; wins over the rest")
    p.add_argument("--chunk", type=int, default=50, help="frames per resumable part")
    p.add_argument("--no-timings", action="store_true",
                   help="write 0 for ~/info's measured latency_ms/inference_ms (byte-reproducible runs)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT and drop the parts of an earlier run")
    p.add_argument("--keep-parts", action="store_true", help="keep OUT.partial/ after the merge")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    p.add_argument("--backend", default="auto", choices=["auto", "nccl", "gloo"], help="torch.distributed backend")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.every < 1 or args.chunk < 1:
        p.error("--every and --chunk must be >= 1")
    if args.start is not None and args.end is not None and args.end <= args.start:
        p.error("--end must be after --start")
    args.defaults = {a.dest: a.default for a in p._actions}  # to tell given options from defaults
    return args


def parameter_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """segment_node parameter values from --params-file, the model/vocabulary options that were given, and -p."""
    from ..core.untrusted import load_yaml

    values: dict[str, Any] = {}
    if args.params_file:
        data = load_yaml(Path(args.params_file).read_text(), args.params_file)
        values.update(_node_parameters(data, args.node_name, args.params_file))
    given = {k: v for k, v in vars(args).items() if k in args.defaults and v != args.defaults[k]}
    for option, name in (("segmenter", "segmenter"), ("preset", "preset"), ("model", "model"),
                         ("checkpoint", "checkpoint"), ("device", "device"), ("options", "segmenter_options"),
                         ("vocabulary_file", "vocabulary_file"), ("vocabulary_preset", "vocabulary_preset"),
                         ("cache_dir", "cache_dir")):
        if option in given:
            values[name] = given[option]
    if "pretrained" in given:
        values["pretrained"] = args.pretrained or ""
    if "precision" in given:
        values["precision"] = args.precision or "auto"
    if "vocabulary" in given:
        values["vocabulary"] = list(args.vocabulary)
        values.pop("vocabulary_file", None)
    if "vocabulary_file" in given or "vocabulary_preset" in given:  # wins over a params file's vocabulary
        values["vocabulary"] = []
    if "vocabulary_preset" in given:
        values["vocabulary_file"] = ""
    if "online" in given:
        values["offline"] = False
    for item in args.param:
        name, sep, text = item.partition(":=")
        if not sep or not name:
            raise ValueError(f"-p {item!r}: expected NAME:=VALUE")
        values[name.strip()] = load_yaml(text, f"-p {name}") if text.strip() else ""
    return values


def _node_parameters(data: Any, node_name: str, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a ROS parameters file (node: {{ros__parameters: {{...}}}})")
    base = node_name.strip("/").split("/")[-1]
    for key in (node_name, "/" + node_name.strip("/"), base, "/**"):
        entry = data.get(key)
        if isinstance(entry, dict) and isinstance(entry.get("ros__parameters"), dict):
            return dict(entry["ros__parameters"])
    entries = [v for v in data.values() if isinstance(v, dict) and isinstance(v.get("ros__parameters"), dict)]
    if len(entries) == 1:
        return dict(entries[0]["ros__parameters"])
    raise ValueError(f"{where}: no ros__parameters for node {node_name!r}")


def _named(specs: list[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, topic = spec.rpartition("=")
        if not topic.startswith("/"):
            raise ValueError(f"--{what} {spec!r}: the topic must be absolute (start with /)")
        if name in out:
            raise ValueError(f"--{what}: camera {name or '(default)'!r} given twice")
        out[name] = topic
    return out


def resolve_cameras(args: argparse.Namespace, reader: Any) -> list[Any]:
    """The cameras to segment, checked against the bag's topics."""
    from ..ros.offline import CameraTopics

    types = {c.topic: c.msgtype for c in reader.connections}
    images = _named(args.image, "image")
    if not images:
        found = [t for t, m in types.items() if m in IMAGE_TYPES and "depth" not in t.lower()]
        if len(found) != 1:
            raise ValueError("give the camera topic with --image; image topics in the bag: "
                             + (", ".join(sorted(t for t, m in types.items() if m in IMAGE_TYPES)) or "none"))
        images = {"": found[0]}
    depths, infos = _named(args.depth, "depth"), _named(args.camera_info, "camera-info")
    for name in set(depths) | set(infos):
        if name not in images:
            raise ValueError(f"--depth/--camera-info for camera {name or '(default)'!r}, which has no --image")
        if (name in depths) != (name in infos):
            raise ValueError(f"camera {name or '(default)'!r}: --depth and --camera-info go together")
    cameras = []
    for name, topic in images.items():
        _check_topic(types, topic, IMAGE_TYPES)
        if name in depths:
            _check_topic(types, depths[name], {"sensor_msgs/msg/Image": False})
            _check_topic(types, infos[name], {"sensor_msgs/msg/CameraInfo": False})
        cameras.append(CameraTopics(name, topic, IMAGE_TYPES[types[topic]], depths.get(name, ""), infos.get(name, "")))
    return cameras


def _check_topic(types: dict[str, str], topic: str, allowed: dict[str, bool]) -> None:
    if topic not in types:
        raise ValueError(f"topic {topic} is not in the bag; its topics: {', '.join(sorted(types))}")
    if types[topic] not in allowed:
        raise ValueError(f"topic {topic} is {types[topic]}, expected {' or '.join(allowed)}")


# --- progress -------------------------------------------------------------------------------------------------
class Progress:
    """A tqdm bar with rate and ETA on a terminal; a plain line every ``interval`` s otherwise."""

    def __init__(self, total: int, enabled: bool, interval: float = 10.0) -> None:
        self.total, self.done, self.enabled, self.interval = total, 0, enabled, interval
        self._bar = None
        self._t0 = self._last = time.monotonic()
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, unit="frame", desc="ovseg-bag", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                self._bar = None

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if self.enabled and now - self._last >= self.interval:
            self._last = now
            rate = self.done / max(now - self._t0, 1e-9)
            left = max(self.total - self.done, 0) / rate if rate > 0 else float("inf")
            print(f"ovseg-bag: {self.done}/~{self.total} frames, {rate:.2f} frames/s, ETA {_duration(left)}",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# --- the run --------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """What the run reads and where it writes."""

    cameras: list[Any]
    start: Optional[int]  # ns, log time
    stop: Optional[int]
    every: int
    chunk: int
    work: Path
    settings: dict[str, Any]


@dataclass
class Chunk:
    part: PartWriter
    waiting: int = 0  # own frames whose cloud is not decided yet


@dataclass
class Counts:
    frames: int = 0  # selected frames (all processes)
    segmented: int = 0  # by this process
    refused: int = 0
    resumed: int = 0  # frames of parts kept from an earlier run
    failed: list[str] = field(default_factory=list)


def part_path(work: Path, chunk: int, partial: bool = False) -> Path:
    return work / (f"chunk-{chunk:06d}.partial.part" if partial else f"chunk-{chunk:06d}.part")


def run_shard(node: Any, reader: Any, plan: Plan, ctx: Any, progress: Progress, counts: Counts,
              canonical: Canonical) -> None:
    """Segment this process's chunks and write their parts. Raises BagError when the input breaks off
    (finished chunks stay; the chunk in progress is written as a partial part, redone by a rerun)."""
    from ..ros.conversions import ConversionError
    from ..ros.offline import cdr_stamp_ns

    by_image = {c.image: c for c in plan.cameras}
    by_depth = {c.depth: c for c in plan.cameras if c.depth}
    by_info = {c.camera_info: c for c in plan.cameras if c.camera_info}
    wanted = set(by_image) | set(by_depth) | set(by_info)
    conns = [c for c in reader.connections if c.topic in wanted]
    from ..ros.outputs import OUTPUT_TOPICS

    topics: list[tuple[str, str]] = []
    topic_ids: dict[str, int] = {}
    msgtypes = {node.topic(c.name, n): OUTPUT_TOPICS[n][1] for c in plan.cameras for n in OUTPUT_TOPICS}
    seen = {c.name: 0 for c in plan.cameras}
    chunks: dict[int, Chunk] = {}

    def topic_id(name: str) -> int:
        if name not in topic_ids:
            topic_ids[name] = len(topics)
            topics.append((name, ""))
        return topic_ids[name]

    def mine(chunk: int) -> bool:
        return chunk % ctx.world_size == ctx.rank and not part_path(plan.work, chunk).exists()

    def clouds(done: list[tuple[int, int, str, Optional[bytes]]]) -> None:
        from ..ros.offline import POINTS_INDEX

        for index, log_time, topic, data in done:
            ch = chunks.get(index // plan.chunk)
            if ch is None:
                continue  # another process's frame
            ch.waiting -= 1
            if data is not None:
                ch.part.add(Record(log_time, index, POINTS_INDEX, topic_id(topic), canonical(data, msgtypes[topic])))

    def finish(upto: int, partial: bool = False) -> None:
        """Write the parts of own chunks below ``upto`` that no longer wait for depth (all when partial)."""
        for k in sorted(chunks):
            ch = chunks[k]
            if k < upto and (ch.waiting <= 0 or partial):
                ch.part.close(topics, part_path(plan.work, k, partial))
                del chunks[k]

    # A node running before the window would hold the last camera_info (often published once, latched) and
    # recent depth images: with a depth topic, reading starts at the recording's start; frames and depth
    # images from long before the window are skipped.
    start = plan.start
    read_from = None if by_info and start is not None else start
    depth_from = (start or 0) - DEPTH_LEAD_NS
    messages = _guarded(reader, conns, plan, read_from)
    try:
        for conn, log_time, raw in messages:
            topic = conn.topic
            if topic in by_depth:
                if log_time >= depth_from:
                    clouds(node.push_depth(by_depth[topic].name, raw))
            elif topic in by_info:
                node.push_camera_info(by_info[topic].name, raw)
            if topic not in by_image or (start is not None and log_time < start):
                finish(counts.frames // plan.chunk)
                continue
            cam = by_image[topic]
            k = seen[cam.name]
            seen[cam.name] += 1
            if k % plan.every:
                continue
            index = counts.frames
            counts.frames += 1
            chunk = index // plan.chunk
            finish(chunk)
            if not mine(chunk):
                if part_path(plan.work, chunk).exists() and chunk % ctx.world_size == ctx.rank:
                    counts.resumed += 1
                clouds(node.push_frame(cam.name, index, log_time, _stamp(cdr_stamp_ns, raw)))
                progress.update()
                continue
            if chunk not in chunks:
                chunks[chunk] = Chunk(PartWriter(part_path(plan.work, chunk)))
            ch = chunks[chunk]
            result = header = image = None
            try:
                header, image = node.decode(cam.name, raw)
                result, inference_ms = node.segment(image)
            except ConversionError as exc:
                counts.refused += 1
                log.warning("frame %d on %s refused: %s", index, topic, exc)
            except Exception as exc:  # noqa: BLE001  (the node logs a failed inference and goes on too)
                counts.refused += 1
                counts.failed.append(f"frame {index}: {type(exc).__name__}: {exc}")
                log.error("frame %d on %s: segmentation failed: %s: %s", index, topic, type(exc).__name__, exc)
            if result is not None:
                for out_index, out_topic, data in node.frame_outputs(cam.name, header, image, result, inference_ms):
                    ch.part.add(Record(log_time, index, out_index, topic_id(out_topic),
                                       canonical(data, msgtypes[out_topic])))
                counts.segmented += 1
            if cam.depth:
                ch.waiting += 1
                clouds(node.push_frame(cam.name, index, log_time, _stamp(cdr_stamp_ns, raw), header, image, result))
            progress.update()
    except BagError:
        finish(counts.frames // plan.chunk)  # chunks a later frame was seen after are complete
        clouds(node.flush())
        finish(1 << 62, partial=True)  # the rest: kept in the output, redone by a rerun
        raise
    except BaseException:  # interrupted: unfinished chunks are redone by a rerun
        for ch in chunks.values():
            ch.part.discard()
        raise
    clouds(node.flush())
    finish(1 << 62)


def _stamp(fn: Any, raw: bytes) -> int:
    try:
        return fn(raw)
    except ValueError:
        return 0


def _guarded(reader: Any, conns: list[Any], plan: Plan, start: Any = "window") -> Iterator[tuple[Any, int, bytes]]:
    """The reader's messages (from ``start``, default the window's); a failure to read turns into BagError
    saying where the recording broke off."""
    start = plan.start if start == "window" else start
    last = start or 0
    n = 0
    try:
        for conn, log_time, raw in reader.messages(connections=conns, start=start, stop=plan.stop):
            last = log_time
            n += 1
            yield conn, log_time, raw
    except BagError:
        raise
    except Exception as exc:  # noqa: BLE001  (sqlite3, mcap, zstd and rosbags errors alike)
        raise BagError(f"the input bag is corrupt or truncated: reading failed after {n} messages "
                       f"(last log time {last / 1e9:.3f} s): {type(exc).__name__}: {exc}") from exc


def merge(reader: Any, plan: Plan, out: Path, storage: str, node: Any, copy: str, typestore: Any) -> dict[str, int]:
    """Merge the parts (and copied input messages) into one bag at ``out``, latched outputs first."""
    parts = sorted(plan.work.glob("chunk-*.part"))
    first = max(plan.start or 0, int(reader.start_time))
    topics = [Topic(t, m, latched=l) for t, m, l in node.output_topics(node.has_label_info)]
    canonical, types = Canonical(typestore), {t.name: t.msgtype for t in topics}
    latched = [(t, canonical(data, types[t])) for t, data in node.latched(first)]
    index = {t.name: i for i, t in enumerate(topics)}
    streams: list[Iterator[tuple[tuple, int, int, bytes]]] = [
        iter([((first, 0, 0, i), first, index[t], data) for i, (t, data) in enumerate(latched)])]

    def part_stream(path: Path) -> Iterator[tuple[tuple, int, int, bytes]]:
        table, records = read_part(path)
        for r in records:
            yield r.key, r.log_time, index[table[r.topic][0]], r.data

    # Each part is sorted and part k+1 holds later frames than part k: one stream, one open file at a time.
    streams.append(itertools.chain.from_iterable(part_stream(p) for p in parts))
    if copy != "none":
        wanted = ({c.image for c in plan.cameras} | {c.depth for c in plan.cameras if c.depth}
                  | {c.camera_info for c in plan.cameras if c.camera_info})
        conns = [c for c in reader.connections if copy == "all" or c.topic in wanted]
        conn_index = {}
        for c in conns:
            if c.topic in index:
                continue  # an output topic of an earlier run in the input: the new outputs replace it
            if not c.digest and c.msgtype not in typestore.fielddefs:
                log.warning("not copying %s: the bag has no definition of %s", c.topic, c.msgtype)
                continue
            conn_index[c.id] = len(topics)
            index[c.topic] = len(topics)
            topics.append(Topic(c.topic, c.msgtype, msgdef=c.msgdef.data if c.digest else None,
                                rihs01=c.digest or None, offered_qos=tuple(c.ext.offered_qos_profiles)))
        copied = [c for c in conns if c.id in conn_index]

        def inputs() -> Iterator[tuple[tuple, int, int, bytes]]:
            try:
                for n, (c, t, raw) in enumerate(_guarded(reader, copied, plan)):
                    yield (t, 1, n, 0), t, conn_index[c.id], raw
            except BagError as exc:  # a broken input: copy what could be read
                log.warning("copying the input stopped: %s", exc)

        streams.append(inputs())
    merged = ((t, topic, data) for _, t, topic, data in heapq.merge(*streams, key=lambda item: item[0]))
    tmp = plan.work / "merged"
    if tmp.exists():
        shutil.rmtree(tmp)
    counts = write_bag(tmp, storage, topics, merged, typestore)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return counts


def _manifest(plan: Plan, identity: dict[str, Any]) -> dict[str, Any]:
    settings = json.dumps(plan.settings, sort_keys=True, default=str)
    return {"version": MANIFEST_VERSION, "input": identity, "settings": plan.settings,
            "settings_sha256": hashlib.sha256(settings.encode()).hexdigest()}


def prepare_work(plan: Plan, identity: dict[str, Any], overwrite: bool, ctx: Any) -> None:
    """Create OUT.partial/ with its manifest, or check that the one there is of this run (resume)."""
    path = plan.work / "manifest.json"
    want = _manifest(plan, identity)
    if ctx.is_main:
        if overwrite and plan.work.exists():
            shutil.rmtree(plan.work)
        plan.work.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.write_text(json.dumps(want, indent=1, default=str))
        for stale in [*plan.work.glob("*.partial.part"), *plan.work.glob("*.tmp"), *plan.work.glob("*.spool")]:
            stale.unlink()  # chunks a broken-off run left unfinished: redone
    from ..eval import distributed as dist

    dist.barrier(ctx)
    have = json.loads(path.read_text())
    if have.get("settings_sha256") != want["settings_sha256"] or have.get("input") != want["input"]:
        raise ValueError(f"{plan.work} holds the parts of a run with another input or other settings; "
                         "use --overwrite to drop them, or another --output")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        import rclpy  # noqa: F401

        from ..ros import offline
        from ..ros.params import NodeConfig
    except ImportError as exc:
        print(f"ovseg-bag: needs rclpy and the built ovseg_ros interfaces ({exc}); source your ROS 2 workspace "
              "(or scripts/env.sh here)", file=sys.stderr)
        return 2
    from ..core.models import ModelLoadError
    from ..core.vocabulary import VocabularyError
    from ..eval import distributed as dist

    out = Path(args.output)
    ctx = None
    try:
        values = offline.node_values(parameter_overrides(args))
        cfg = NodeConfig.from_values(values)
        ctx, device = dist.init(cfg.device, args.backend)
        if out.exists() and not args.overwrite:
            raise ValueError(f"{out} exists; use --overwrite to replace it")
        reader = open_reader(Path(args.input))
        cameras = resolve_cameras(args, reader)
        t0 = int(reader.start_time)
        start = t0 + int(args.start * 1e9) if args.start is not None else None
        stop = t0 + int(args.end * 1e9) if args.end is not None else None
        settings = {"cameras": [vars(c) for c in cameras], "start": start, "stop": stop, "every": args.every,
                    "chunk": args.chunk, "node_name": args.node_name, "outputs": sorted(args.outputs),
                    "timings": not args.no_timings, "parameters": values}
        plan = Plan(cameras, start, stop, args.every, args.chunk, Path(f"{out}.partial"), settings)
        prepare_work(plan, input_identity(reader, Path(args.input)), args.overwrite, ctx)
        binding = offline.configure(cfg, device)
        node = offline.OfflineNode(cfg, binding, args.node_name, cameras, set(args.outputs),
                                   timings=not args.no_timings, log=log)
        if node.has_label_info and vision_msgs_dir() is None:
            node.drop_label_info()  # the bag needs LabelInfo's definition; a vision_msgs without share/ has none
            log.warning("vision_msgs is importable but its msg/ definitions are not installed: no ~/label_info")
        typestore = make_typestore(with_vision_msgs=node.has_label_info)
    except (BagError, ModelLoadError, VocabularyError, FileNotFoundError, KeyError, TypeError, ValueError) as exc:
        print(f"ovseg-bag: {exc}", file=sys.stderr)
        return 2
    if binding.model_identity.endswith("@random"):
        log.warning("the model has RANDOM weights: outputs are meaningless (tests/demo only)")
    if not node.has_label_info and ctx.is_main:
        print("ovseg-bag: vision_msgs is not installed: ~/label_info is not written (a node without vision_msgs "
              "does not publish it either); ~/vocabulary carries the class names", file=sys.stderr)
    total = _estimate_frames(reader, plan)
    progress = Progress(total, enabled=ctx.is_main and not args.no_progress)
    broken: Optional[BagError] = None
    t_run = time.monotonic()
    counts = Counts()
    try:
        run_shard(node, reader, plan, ctx, progress, counts, Canonical(typestore))
    except BagError as exc:
        broken = exc
    except KeyboardInterrupt:
        progress.close()
        print(f"ovseg-bag: interrupted; finished parts are kept in {plan.work}: run the same command to continue",
              file=sys.stderr)
        return 130
    progress.close()
    seconds = time.monotonic() - t_run
    stats = dist.all_gather_objects((counts.segmented, counts.refused, counts.resumed, counts.frames,
                                     str(broken) if broken else ""), ctx)
    rc = 0
    if ctx.is_main:
        segmented = sum(s[0] for s in stats)
        refused = sum(s[1] for s in stats)
        frames = max(s[3] for s in stats)
        errors = sorted({s[4] for s in stats if s[4]})
        try:
            written = merge(reader, plan, out, args.storage, node, args.copy, typestore)
        except (BagError, OSError, ValueError) as exc:
            print(f"ovseg-bag: could not write {out}: {exc} (the parts stay in {plan.work})", file=sys.stderr)
            rc = 1
        else:
            outputs = sum(v for k, v in written.items() if k.endswith("/info"))
            print(f"ovseg-bag: {out}: {outputs} frames segmented ({segmented} now at {segmented / seconds:.2f} "
                  f"frames/s over {ctx.world_size} process(es), {frames - segmented - refused} from earlier parts, "
                  f"{refused} refused)", file=sys.stderr)
            for name, n in sorted(node.points_stats().items()):
                log.info("camera %r clouds: %s", name, n)
            if errors:
                print(f"ovseg-bag: {errors[0]}\novseg-bag: {out} holds the frames before that point; the parts stay "
                      f"in {plan.work}", file=sys.stderr)
                rc = 1
            elif not args.keep_parts:
                shutil.rmtree(plan.work, ignore_errors=True)
    elif broken is not None:
        rc = 1
    dist.finish(ctx)  # no barrier: the other processes need not wait (and time out) while rank 0 merges
    return rc


def _estimate_frames(reader: Any, plan: Plan) -> int:
    """Selected frames, from the bag's message counts (scaled by the time window)."""
    n = sum(c.msgcount for c in reader.connections if c.topic in {cam.image for cam in plan.cameras})
    span = max(int(reader.end_time) - int(reader.start_time), 1)
    lo = max(plan.start or 0, int(reader.start_time))
    hi = min(plan.stop if plan.stop is not None else int(reader.end_time), int(reader.end_time))
    return max(int(round(n * max(hi - lo, 0) / span / plan.every)), 0) if plan.start or plan.stop else -(-n // plan.every)


if __name__ == "__main__":
    sys.exit(main())
