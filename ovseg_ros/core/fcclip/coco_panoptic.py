"""The 133 COCO panoptic classes (80 things, 53 stuff) with synonyms: FC-CLIP's training vocabulary.

FC-CLIP was trained on COCO panoptic only, so its in-vocabulary classifier is reliable for classes it saw
there and its frozen-CLIP classifier must carry the rest. The geometric ensemble therefore weighs the two by
whether a class was "seen" (alpha for seen, beta for unseen). The authors decide "seen" by exact string
match of any synonym against the synonyms of their COCO label file; we recompute it for any runtime
vocabulary against this table (case-, hyphen- and whitespace-insensitive).

The official category names come from the COCO panoptic annotations (Kirillov et al., "Panoptic
Segmentation", CVPR 2019; Caesar et al., COCO-Stuff, CVPR 2018). The synonyms are ours: common alternative
names and plurals a robot operator might type. They are data, not code; extend them freely.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Iterable, Optional, Sequence

# (official name, is_thing, synonyms). Order = COCO panoptic contiguous ids 0..132.
COCO_PANOPTIC: tuple[tuple[str, bool, tuple[str, ...]], ...] = (
    ("person", True, ("people", "human", "humans", "man", "men", "woman", "women", "child", "children",
                      "boy", "girl", "pedestrian", "pedestrians")),
    ("bicycle", True, ("bicycles", "bike", "bikes")),
    ("car", True, ("cars", "automobile", "sedan", "taxi")),
    ("motorcycle", True, ("motorcycles", "motorbike", "motorbikes", "scooter")),
    ("airplane", True, ("airplanes", "aeroplane", "plane", "aircraft", "jet")),
    ("bus", True, ("buses", "coach")),
    ("train", True, ("trains", "locomotive", "tram")),
    ("truck", True, ("trucks", "lorry", "pickup truck")),
    ("boat", True, ("boats", "ship", "ships", "sailboat", "canoe", "kayak")),
    ("traffic light", True, ("traffic lights", "traffic signal", "stoplight")),
    ("fire hydrant", True, ("fire hydrants", "hydrant")),
    ("stop sign", True, ("stop signs",)),
    ("parking meter", True, ("parking meters",)),
    ("bench", True, ("benches", "park bench")),
    ("bird", True, ("birds",)),
    ("cat", True, ("cats", "kitten")),
    ("dog", True, ("dogs", "puppy")),
    ("horse", True, ("horses", "pony")),
    ("sheep", True, ("lamb",)),
    ("cow", True, ("cows", "cattle", "bull")),
    ("elephant", True, ("elephants",)),
    ("bear", True, ("bears",)),
    ("zebra", True, ("zebras",)),
    ("giraffe", True, ("giraffes",)),
    ("backpack", True, ("backpacks", "rucksack")),
    ("umbrella", True, ("umbrellas", "parasol")),
    ("handbag", True, ("handbags", "purse", "bag")),
    ("tie", True, ("ties", "necktie")),
    ("suitcase", True, ("suitcases", "luggage")),
    ("frisbee", True, ("frisbees", "flying disc")),
    ("skis", True, ("ski",)),
    ("snowboard", True, ("snowboards",)),
    ("sports ball", True, ("ball", "balls", "football", "soccer ball", "basketball", "tennis ball")),
    ("kite", True, ("kites",)),
    ("baseball bat", True, ("baseball bats", "bat")),
    ("baseball glove", True, ("baseball gloves", "baseball mitt")),
    ("skateboard", True, ("skateboards",)),
    ("surfboard", True, ("surfboards",)),
    ("tennis racket", True, ("tennis rackets", "racket", "racquet")),
    ("bottle", True, ("bottles",)),
    ("wine glass", True, ("wine glasses",)),
    ("cup", True, ("cups", "mug", "mugs")),
    ("fork", True, ("forks",)),
    ("knife", True, ("knives",)),
    ("spoon", True, ("spoons",)),
    ("bowl", True, ("bowls",)),
    ("banana", True, ("bananas",)),
    ("apple", True, ("apples",)),
    ("sandwich", True, ("sandwiches", "burger")),
    ("orange", True, ("oranges",)),
    ("broccoli", True, ()),
    ("carrot", True, ("carrots",)),
    ("hot dog", True, ("hot dogs", "hotdog")),
    ("pizza", True, ("pizzas",)),
    ("donut", True, ("donuts", "doughnut", "doughnuts")),
    ("cake", True, ("cakes", "cupcake")),
    ("chair", True, ("chairs", "stool", "armchair")),
    ("couch", True, ("couches", "sofa", "sofas")),
    ("potted plant", True, ("potted plants", "houseplant", "plant pot", "flowerpot")),
    ("bed", True, ("beds",)),
    ("dining table", True, ("dining tables", "table", "tables", "desk", "desks")),
    ("toilet", True, ("toilets",)),
    ("tv", True, ("television", "tv monitor", "monitor", "screen")),
    ("laptop", True, ("laptops", "notebook computer")),
    ("mouse", True, ("computer mouse",)),
    ("remote", True, ("remote control", "remote controls")),
    ("keyboard", True, ("keyboards", "computer keyboard")),
    ("cell phone", True, ("cell phones", "mobile phone", "smartphone", "phone")),
    ("microwave", True, ("microwaves", "microwave oven")),
    ("oven", True, ("ovens", "stove")),
    ("toaster", True, ("toasters",)),
    ("sink", True, ("sinks", "washbasin")),
    ("refrigerator", True, ("refrigerators", "fridge")),
    ("book", True, ("books",)),
    ("clock", True, ("clocks",)),
    ("vase", True, ("vases",)),
    ("scissors", True, ()),
    ("teddy bear", True, ("teddy bears", "teddy", "stuffed animal")),
    ("hair drier", True, ("hair dryer", "hairdryer", "blow dryer")),
    ("toothbrush", True, ("toothbrushes",)),
    # --- stuff ---
    ("banner", False, ("banners", "flag")),
    ("blanket", False, ("blankets", "quilt")),
    ("bridge", False, ("bridges",)),
    ("cardboard", False, ("cardboard box", "carton")),
    ("counter", False, ("counters", "countertop", "kitchen counter")),
    ("curtain", False, ("curtains", "drape", "drapes")),
    ("door-stuff", False, ("door", "doors")),
    ("floor-wood", False, ("wood floor", "wooden floor", "parquet")),
    ("flower", False, ("flowers",)),
    ("fruit", False, ("fruits",)),
    ("gravel", False, ()),
    ("house", False, ("houses",)),
    ("light", False, ("lamp", "lamps", "lights", "ceiling light")),
    ("mirror-stuff", False, ("mirror", "mirrors")),
    ("net", False, ("nets", "netting")),
    ("pillow", False, ("pillows", "cushion", "cushions")),
    ("platform", False, ("platforms", "railway platform")),
    ("playingfield", False, ("playing field", "sports field", "pitch")),
    ("railroad", False, ("railway", "railroad track", "railway track", "rail track")),
    ("river", False, ("rivers", "stream")),
    ("road", False, ("roads", "street", "streets")),
    ("roof", False, ("roofs", "rooftop")),
    ("sand", False, ("beach",)),
    ("sea", False, ("ocean",)),
    ("shelf", False, ("shelves", "bookshelf", "bookcase")),
    ("snow", False, ()),
    ("stairs", False, ("stair", "staircase", "stairway", "steps")),
    ("tent", False, ("tents",)),
    ("towel", False, ("towels",)),
    ("wall-brick", False, ("brick wall", "brick")),
    ("wall-stone", False, ("stone wall",)),
    ("wall-tile", False, ("tile wall", "tiled wall")),
    ("wall-wood", False, ("wood wall", "wooden wall")),
    ("water-other", False, ("water", "lake", "pond")),
    ("window-blind", False, ("window blind", "window blinds", "blinds")),
    ("window-other", False, ("window", "windows")),
    ("tree-merged", False, ("tree", "trees", "bush", "bushes", "palm tree")),
    ("fence-merged", False, ("fence", "fences", "railing")),
    ("ceiling-merged", False, ("ceiling",)),
    ("sky-other-merged", False, ("sky",)),
    ("cabinet-merged", False, ("cabinet", "cabinets", "cupboard", "wardrobe")),
    ("table-merged", False, ("table", "tables")),
    ("floor-other-merged", False, ("floor", "floors", "flooring")),
    ("pavement-merged", False, ("pavement", "sidewalk", "footpath")),
    ("mountain-merged", False, ("mountain", "mountains", "hill", "hills")),
    ("grass-merged", False, ("grass", "lawn")),
    ("dirt-merged", False, ("dirt", "soil", "ground", "earth", "mud")),
    ("paper-merged", False, ("paper", "papers")),
    ("food-other-merged", False, ("food",)),
    ("building-other-merged", False, ("building", "buildings", "skyscraper")),
    ("rock-merged", False, ("rock", "rocks", "stone", "stones")),
    ("wall-other-merged", False, ("wall", "walls")),
    ("rug-merged", False, ("rug", "rugs", "carpet", "mat")),
)

#: FC-CLIP's own training names, one comma-joined string per COCO panoptic class in contiguous order: the
#: label file ``fcclip/data/datasets/coco_panoptic_with_prompt_eng.txt`` of bytedance/fc-clip (data, read with
#: the ``search`` tool). The authors' "seen" rule compares these strings exactly (``seen_rule: authors``).
AUTHORS_COCO_NAMES: tuple[str, ...] = (
    "person,child,girl,boy,woman,man,people,children,girls,boys,women,men,lady,guy,ladies,guys,clothes",
    "bicycle,bicycles,bike,bikes",
    "car,cars",
    "motorcycle,motorcycles",
    "airplane,airplanes",
    "bus,buses",
    "train,trains,locomotive,locomotives,freight train",
    "truck,trucks",
    "boat,boats",
    "traffic light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "bench,benches",
    "bird,birds",
    "cat,cats,kitties,kitty",
    "dog,dogs,puppy,puppies",
    "horse,horses,foal",
    "sheep",
    "cow,cows,calf",
    "elephant,elephants",
    "bear,bears",
    "zebra,zebras",
    "giraffe,giraffes",
    "backpack,backpacks",
    "umbrella,umbrellas",
    "handbag,handbags",
    "tie",
    "suitcase,suitcases",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite,kites",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle,bottles,water bottle",
    "wine glass,wine glasses,wineglass",
    "cup,cups,water cup,water glass",
    "fork,forks",
    "knife,knives",
    "spoon,spoons",
    "bowl,bowls",
    "banana,bananas",
    "apple,apples,apple fruit",
    "sandwich,sandwiches",
    "orange fruit",
    "broccoli",
    "carrot,carrots",
    "hot dog",
    "pizza",
    "donut,donuts",
    "cake,cakes",
    "chair,chairs",
    "couch,sofa,sofas",
    "potted plant,potted plants,pottedplant,pottedplants,planter,planters",
    "bed,beds",
    "dining table,dining tables,diningtable,diningtables,plate,plates,diningtable tablecloth",
    "toilet",
    "tv",
    "laptop",
    "mouse",
    "tv remote,remote control",
    "keyboard",
    "cell phone,mobile",
    "microwave",
    "oven,ovens",
    "toaster",
    "sink,sinks",
    "refrigerator,fridge",
    "book,books",
    "clock",
    "vase,vases",
    "scissor,scissors",
    "teddy bear,teddy bears",
    "hair drier",
    "toothbrush,toothbrushes",
    "banner,banners",
    "blanket,blankets",
    "bridge",
    "cardboard",
    "counter",
    "curtain,curtains",
    "door,doors",
    "wood floor",
    "flower,flowers",
    "fruit,fruits",
    "gravel",
    "house",
    "lamp,bulb,lamps,bulbs",
    "mirror",
    "tennis net",
    "pillow,pillows",
    "platform",
    "playingfield,tennis court,baseball field,soccer field,tennis field",
    "railroad",
    "river",
    "road",
    "roof",
    "sand",
    "sea,sea wave,wave,waves",
    "shelf",
    "snow",
    "stairs",
    "tent",
    "towel",
    "brick wall",
    "stone wall",
    "tile wall",
    "wood wall",
    "water",
    "window blind",
    "window",
    "tree,trees,palm tree,bushes",
    "fence,fences",
    "ceiling",
    "sky,clouds",
    "cabinet,cabinets",
    "table",
    "floor,flooring,tile floor",
    "pavement",
    "mountain,mountains",
    "grass",
    "dirt",
    "paper",
    "food",
    "building,buildings",
    "rock",
    "wall,walls",
    "rug",
)

_SPACES = re.compile(r"[\s_\-]+")


def normalize_name(name: str) -> str:
    """Lower-case, hyphens/underscores as spaces, single spaces: ``Door-Stuff`` -> ``door stuff``."""
    return _SPACES.sub(" ", name.strip().lower()).strip()


@lru_cache(maxsize=1)
def _index() -> tuple[frozenset[str], frozenset[str]]:
    """(normalised names of thing classes, of stuff classes), each with every synonym."""
    things: set[str] = set()
    stuff: set[str] = set()
    for name, is_thing, synonyms in COCO_PANOPTIC:
        target = things if is_thing else stuff
        target.update(normalize_name(n) for n in (name, *synonyms))
    return frozenset(things), frozenset(stuff)


def coco_membership(names: Iterable[str]) -> Optional[bool]:
    """True if any of ``names`` is a COCO thing, False if one is COCO stuff (and none a thing), else None.

    A name can be both ("table": dining table and table-merged); things win, because a robot usually wants
    instances of such objects.
    """
    things, stuff = _index()
    keys = {normalize_name(n) for n in names}
    if keys & things:
        return True
    if keys & stuff:
        return False
    return None


def is_seen(names: Iterable[str]) -> bool:
    """Whether a class (given by all its names) overlaps FC-CLIP's COCO panoptic training vocabulary."""
    return coco_membership(names) is not None


def seen_mask(classes: Sequence[Sequence[str]]) -> list[bool]:
    """:func:`is_seen` for every class of a vocabulary (each given by its name and synonyms)."""
    return [is_seen(names) for names in classes]


@lru_cache(maxsize=1)
def _authors_names() -> frozenset[str]:
    return frozenset(n for line in AUTHORS_COCO_NAMES for n in line.replace(", ", ",").split(","))


def is_seen_authors(names: Iterable[str]) -> bool:
    """The authors' rule (``FCCLIP.prepare_class_names_from_metadata``): a class is seen when any of its
    names equals, as an exact string, any name of their COCO panoptic label file. No case folding, no
    synonyms of ours: e.g. ADE20K's "sofa" is seen (it is in their "couch" line), "rail" is not."""
    flat = _authors_names()
    return any(n in flat for n in names)


SEEN_RULES = ("synonyms", "authors")


def seen_mask_by(classes: Sequence[Sequence[str]], rule: str = "synonyms") -> list[bool]:
    """``seen`` per class under ``rule``: ``synonyms`` (ours, :func:`is_seen`) or ``authors``."""
    if rule not in SEEN_RULES:
        raise ValueError(f"seen_rule must be one of {SEEN_RULES}, got {rule!r}")
    fn = is_seen if rule == "synonyms" else is_seen_authors
    return [fn(names) for names in classes]
