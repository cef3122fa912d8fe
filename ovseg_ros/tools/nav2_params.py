"""``ovseg-nav2-params``: a vocabulary -> the parameter block of Nav2's semantic_segmentation_layer.

    ovseg-nav2-params --preset indoor_robot --cost floor=free --cost person=lethal --default-cost 100
    ovseg-nav2-params --vocabulary-file my_vocab.yaml --group obstacles=chair,table --cost obstacles=lethal
    ovseg-nav2-params --node /segment_node --wrap local_costmap -o semantic_layer.yaml   # asks the running node

The layer (ros-navigation/semantic_segmentation_layer, formerly kiwicampus/) matches classes by *name*
against the LabelInfo it latches, and logs a critical error for every name without a configuration, so the
block names every class of the vocabulary exactly once. Parameter names are the layer's own (read from its
``onInitialize``): per observation source ``segmentation_topic``, ``confidence_topic``, ``labels_topic``,
``pointcloud_topic``, ``observation_persistence``, ``expected_update_rate``, ``max_obstacle_distance``,
``min_obstacle_distance``, ``tile_map_decay_time``, ``visualize_tile_map``, ``use_cost_selection``,
``class_types`` (and ``sensor_frame`` and the field-of-view options, left at their defaults); per class type
``classes``, ``base_cost``, ``max_cost``, ``mark_confidence``, ``samples_to_max_cost``, ``dominant_priority``.
Layer level: ``use_approximate_time_sync`` is written ``false``: the node gives labels, confidence and cloud
the camera's stamp, so exact pairing always succeeds and can never pair outputs of two frames (the layer's
default is approximate, within 0.1 s).

A class type is a parameter name beside the source's own ones, so a class whose name would become one of
them (a class "class types" -> ``class_types``) would overwrite that parameter and take the layer down; such
a class type gets a ``_class`` suffix instead, and the tool says so (the class name itself is unchanged).

Each class gets its own class type (named after the class, made a valid parameter name), so its cost can be
tuned on its own later. Costs: a number 0-254 or a name (``free`` 0, ``low`` 64, ``medium`` 128, ``high`` 200,
``inscribed`` 253, ``lethal`` 254), given per class, per group (``--group NAME=class,class``; the groups
``things`` and ``stuff`` exist already, from the vocabulary's is_thing flags), else ``--default-cost``.
Precedence: class, then group (in the order given), then default. Lethal classes get ``dominant_priority``
so an obstacle takes over its cell at once.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

#: The layer stores class ids as uint8 (messages.MONO8_MAX_CLASSES on the node's side).
NAV2_MAX_CLASSES = 255
PLUGIN = "semantic_segmentation_layer::SemanticSegmentationLayer"
COST_NAMES = {"free": 0, "low": 64, "medium": 128, "high": 200, "inscribed": 253, "lethal": 254}
LETHAL = 254
#: Parameters the layer declares per observation source (its onInitialize): no class type may take these names.
SOURCE_PARAMS = frozenset({
    "segmentation_topic", "confidence_topic", "labels_topic", "pointcloud_topic", "observation_persistence",
    "sensor_frame", "expected_update_rate", "class_types", "max_obstacle_distance", "min_obstacle_distance",
    "tile_map_decay_time", "visualize_tile_map", "use_cost_selection", "camera_horizontal_fov",
    "camera_vertical_fov", "fov_decay_time", "outside_fov_decay_time", "visualize_frustum_fov",
})
#: Parameters the layer declares at its own level (plus the costmap's ``plugin``): no source may take these.
LAYER_PARAMS = frozenset({"plugin", "enabled", "combination_method", "observation_sources",
                          "publish_debug_topics", "use_approximate_time_sync"})


class Nav2ParamsError(ValueError):
    """Bad input to the generator; the message is the reason."""


@dataclass(frozen=True)
class VocabEntry:
    name: str
    is_thing: bool


def parse_cost(text: str) -> int:
    """``free``/``lethal``/... or an integer 0-254."""
    key = str(text).strip().lower()
    if key in COST_NAMES:
        return COST_NAMES[key]
    try:
        value = int(key)
    except ValueError:
        raise Nav2ParamsError(f"cost {text!r} is neither a number 0-254 nor one of {', '.join(COST_NAMES)}") from None
    if not 0 <= value <= LETHAL:
        raise Nav2ParamsError(f"cost {value} is outside 0-254 (255 is Nav2's NO_INFORMATION)")
    return value


def type_name(class_name: str, taken: set[str], notes: Optional[list[str]] = None) -> str:
    """A valid, unique ROS parameter name segment for a class (letters, digits, underscores), never one of the
    layer's per-source parameter names (:data:`SOURCE_PARAMS`): such a name gets ``_class`` appended and a
    line is added to ``notes``."""
    base = re.sub(r"[^0-9a-zA-Z_]+", "_", class_name.strip()).strip("_").lower() or "class"
    if not base[0].isalpha():
        base = "c_" + base
    if base in SOURCE_PARAMS:
        renamed = base + "_class"
        if notes is not None:
            notes.append(f"class {class_name!r} would be the layer's parameter {base!r}; "
                         f"its class type is named {renamed!r} instead")
        base = renamed
    name, i = base, 2
    while name in taken or name in SOURCE_PARAMS:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def resolve_costs(
    entries: Sequence[VocabEntry],
    costs: Sequence[str] = (),
    groups: Sequence[str] = (),
    default_cost: str = "medium",
) -> list[int]:
    """The cost of each class from ``--cost NAME=COST`` (class or group), ``--group G=a,b`` and the default."""
    names = [e.name for e in entries]
    known = set(names)
    group_members: dict[str, set[str]] = {
        "things": {e.name for e in entries if e.is_thing},
        "stuff": {e.name for e in entries if not e.is_thing},
    }
    for text in groups:
        if "=" not in text:
            raise Nav2ParamsError(f"--group {text!r}: expected GROUP=class,class")
        gname, members = (t.strip() for t in text.split("=", 1))
        listed = {m.strip() for m in members.split(",") if m.strip()}
        unknown = sorted(listed - known)
        if unknown:
            raise Nav2ParamsError(f"--group {gname}: {', '.join(unknown)} not in the vocabulary ({', '.join(names)})")
        if gname in known:
            raise Nav2ParamsError(f"--group {gname}: the name is a class of the vocabulary; pick another group name")
        group_members[gname] = listed
    per_class: dict[str, int] = {}
    per_group: list[tuple[str, int]] = []
    for text in costs:
        if "=" not in text:
            raise Nav2ParamsError(f"--cost {text!r}: expected NAME=COST (a class or group name)")
        key, value = (t.strip() for t in text.rsplit("=", 1))
        cost = parse_cost(value)
        if key in known:
            per_class[key] = cost
        elif key in group_members:
            per_group.append((key, cost))
        else:
            raise Nav2ParamsError(
                f"--cost {key}: neither a class ({', '.join(names)}) nor a group ({', '.join(group_members)})")
    default = parse_cost(default_cost)
    out = []
    for name in names:
        if name in per_class:
            out.append(per_class[name])
            continue
        group_cost = next((c for g, c in per_group if name in group_members[g]), None)
        out.append(default if group_cost is None else group_cost)
    return out


def layer_params(
    entries: Sequence[VocabEntry],
    class_costs: Sequence[int],
    node: str = "/segment_node",
    source: str = "ovseg",
    max_obstacle_distance: float = 5.0,
    min_obstacle_distance: float = 0.3,
    tile_map_decay_time: float = 5.0,
    samples_to_max_cost: int = 0,
    mark_confidence: int = 0,
    use_confidence: bool = True,
    notes: Optional[list[str]] = None,
) -> dict[str, Any]:
    """The layer's parameter block (a mapping to nest under the costmap's ros__parameters); renamed class
    types are reported in ``notes``."""
    names = [e.name for e in entries]
    if not names:
        raise Nav2ParamsError("the vocabulary is empty")
    if len(names) > NAV2_MAX_CLASSES:
        raise Nav2ParamsError(
            f"{len(names)} classes: Nav2's semantic_segmentation_layer stores class ids as uint8 (at most "
            f"{NAV2_MAX_CLASSES} classes); run the node with nav2_compatible:=true and a smaller vocabulary")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise Nav2ParamsError(f"class names must be unique (the layer matches by name): {', '.join(dup)}")
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", source) or source in LAYER_PARAMS:
        raise Nav2ParamsError(f"--source {source!r}: must be a parameter name (letters, digits, _) other than the "
                              f"layer's own parameters ({', '.join(sorted(LAYER_PARAMS))})")
    node = "/" + node.strip("/")
    taken: set[str] = set()
    types = [type_name(n, taken, notes) for n in names]
    src: dict[str, Any] = {
        "segmentation_topic": f"{node}/semantic/labels",
        "confidence_topic": f"{node}/semantic/confidence" if use_confidence else "",
        "labels_topic": f"{node}/label_info",
        "pointcloud_topic": f"{node}/semantic/points",
        "observation_persistence": 0.0,
        "expected_update_rate": 0.0,
        "max_obstacle_distance": float(max_obstacle_distance),
        "min_obstacle_distance": float(min_obstacle_distance),
        "tile_map_decay_time": float(tile_map_decay_time),
        "visualize_tile_map": False,
        "use_cost_selection": True,
        "class_types": types,
    }
    for t, name, cost in zip(types, names, class_costs):
        src[t] = {
            "classes": [name],
            "base_cost": int(cost),
            "max_cost": int(cost),
            "mark_confidence": int(mark_confidence),
            "samples_to_max_cost": int(samples_to_max_cost),
            "dominant_priority": cost >= LETHAL,
        }
    return {"plugin": PLUGIN, "enabled": True, "use_approximate_time_sync": False, "observation_sources": source,
            source: src}


def wrap(block: dict[str, Any], layer: str, costmap: Optional[str]) -> dict[str, Any]:
    """``{layer: block}``, or the whole costmap node section when ``costmap`` is given."""
    if not costmap:
        return {layer: block}
    return {costmap: {costmap: {"ros__parameters": {"plugins": [layer], layer: block}}}}


# --- vocabulary sources ------------------------------------------------------------------------------
def entries_from_file(path: str | Path) -> list[VocabEntry]:
    from ..core.vocabulary import load_vocabulary_file

    vocab = load_vocabulary_file(path)
    return [VocabEntry(c.name, bool(c.is_thing)) for c in vocab.classes]


def entries_from_preset(name: str) -> list[VocabEntry]:
    from ..core.vocabulary import find_vocabulary_preset, list_vocabulary_presets

    path = find_vocabulary_preset(name)
    if path is None:
        raise Nav2ParamsError(f"unknown vocabulary preset {name!r}; available: {', '.join(list_vocabulary_presets())}")
    return entries_from_file(path)


def entries_from_node(node: str, timeout: float = 10.0) -> list[VocabEntry]:
    """The running node's vocabulary through its ``~/get_vocabulary`` service."""
    try:
        import rclpy

        from ovseg_ros.srv import GetVocabulary
    except ImportError as exc:
        raise Nav2ParamsError(f"--node needs ROS 2 and the built ovseg_ros interfaces ({exc}); "
                              "source your workspace, or use --preset / --vocabulary-file") from exc
    service = "/" + node.strip("/") + "/get_vocabulary"
    own_context = not rclpy.ok()
    if own_context:
        rclpy.init()
    helper = rclpy.create_node("ovseg_nav2_params")
    try:
        client = helper.create_client(GetVocabulary, service)
        if not client.wait_for_service(timeout_sec=timeout):
            raise Nav2ParamsError(f"service {service} is not available (is the node running and configured?)")
        future = client.call_async(GetVocabulary.Request())
        rclpy.spin_until_future_complete(helper, future, timeout_sec=timeout)
        if not future.done() or future.result() is None:
            raise Nav2ParamsError(f"service {service} did not answer within {timeout} s")
        classes = future.result().vocabulary.classes
        if not classes:
            raise Nav2ParamsError(f"{service} returned no classes (the node is not configured)")
        return [VocabEntry(c.name, bool(c.is_thing)) for c in sorted(classes, key=lambda c: c.id)]
    finally:
        helper.destroy_node()
        if own_context:
            rclpy.try_shutdown()


# --- command line ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ovseg-nav2-params",
        description="Write the Nav2 semantic_segmentation_layer parameters for an ovseg_ros vocabulary.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[1] if __doc__ else None,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="vocabulary preset (config/vocabularies/<name>.yaml), e.g. indoor_robot")
    src.add_argument("--vocabulary-file", help="vocabulary YAML file (classes: list)")
    src.add_argument("--node", help="ask the running node, e.g. /segment_node (its ~/get_vocabulary service)")
    p.add_argument("--cost", action="append", default=[], metavar="NAME=COST",
                   help="cost of a class or group: 0-254 or free, low, medium, high, inscribed, lethal (repeatable)")
    p.add_argument("--group", action="append", default=[], metavar="GROUP=a,b",
                   help="name a group of classes for --cost (things and stuff exist already) (repeatable)")
    p.add_argument("--default-cost", default="medium", help="cost of classes not given otherwise (default: medium)")
    p.add_argument("--topics-node", default=None,
                   help="fully qualified node name in the topic names (default: --node, else /segment_node)")
    p.add_argument("--source", default="ovseg", help="observation source name (default: ovseg)")
    p.add_argument("--layer", default="semantic_layer", help="layer name in the costmap (default: semantic_layer)")
    p.add_argument("--wrap", metavar="COSTMAP", default=None,
                   help="emit the whole costmap section, e.g. local_costmap or global_costmap")
    p.add_argument("--max-obstacle-distance", type=float, default=5.0)
    p.add_argument("--min-obstacle-distance", type=float, default=0.3)
    p.add_argument("--tile-map-decay-time", type=float, default=5.0)
    p.add_argument("--samples-to-max-cost", type=int, default=0)
    p.add_argument("--no-confidence", action="store_true", help="leave confidence_topic empty")
    p.add_argument("-o", "--output", help="write to this file instead of stdout")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for --node's service")
    return p


def generate(args: argparse.Namespace) -> str:
    if args.node:
        entries = entries_from_node(args.node, args.timeout)
    elif args.preset:
        entries = entries_from_preset(args.preset)
    else:
        if not Path(args.vocabulary_file).is_file():
            raise Nav2ParamsError(f"vocabulary file {args.vocabulary_file!r} does not exist")
        entries = entries_from_file(args.vocabulary_file)
    costs = resolve_costs(entries, args.cost, args.group, args.default_cost)
    notes: list[str] = []
    block = layer_params(
        entries, costs, node=args.topics_node or args.node or "/segment_node", source=args.source,
        max_obstacle_distance=args.max_obstacle_distance, min_obstacle_distance=args.min_obstacle_distance,
        tile_map_decay_time=args.tile_map_decay_time, samples_to_max_cost=args.samples_to_max_cost,
        use_confidence=not args.no_confidence, notes=notes)
    for note in notes:
        print(f"ovseg-nav2-params: {note}", file=sys.stderr)
    origin = args.node or args.preset or args.vocabulary_file
    header = (f"# Nav2 semantic_segmentation_layer parameters for {len(entries)} classes of {origin}\n"
              f"# generated by ovseg-nav2-params; run segment_node with nav2_compatible:=true and depth:=...\n"
              + "".join(f"# note: {n}\n" for n in notes))
    return header + yaml.safe_dump(wrap(block, args.layer, args.wrap), sort_keys=False, default_flow_style=None,
                                   width=120)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        text = generate(args)
    except (Nav2ParamsError, ValueError, OSError) as exc:
        print(f"ovseg-nav2-params: {exc}", file=sys.stderr)
        return 2
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
