"""Data for LLM relevance judges: the synthetic rule world, ESCI and user files, prompts and SFT targets.

Every loader returns a `Dataset` of `Example`s: a query, one item, the gold label and the gold value of
each criterion of the dataset's rulebook (`rewards.UNKNOWN` where the data does not determine it).

- synthetic: a seeded e-commerce catalogue and query generator whose gold criteria are computed from
  the item's *stated* attributes; the gold label is `TAOBAO4.decide(criteria)` by construction.
- esci: Amazon Shopping Queries (Exact/Substitute/Complement/Irrelevant), criteria inferred from the
  label and metadata by `rewards.infer_esci_criteria`.
- jsonl / csv / parquet: user data with a field map and a label map.

Bad rows raise `DataError` naming file, row and field, or with `skip_bad_rows` are skipped and
recorded in `stats["skipped"]`, never dropped silently.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import html
import itertools
import json
import math
import os
import random
import re
import sys
import zlib
from dataclasses import dataclass, field

from helpers.errors import UserError
from rewards import ESCI, RULEBOOKS, TAOBAO4, UNKNOWN, Rulebook, format_output, infer_esci_criteria


@dataclass
class Example:
    query: str
    title: str
    label: str  # gold label, one of the rulebook's labels
    criteria: dict[str, str]  # gold value per criterion of the rulebook, or rewards.UNKNOWN
    description: str = ""
    bullets: str = ""  # one bullet point a line
    brand: str = ""
    color: str = ""
    attributes: dict[str, str] = field(default_factory=dict)  # other attributes, e.g. material, audience, size
    context: str = ""  # optional retrieved context chunk
    source_id: str = ""  # where the row came from, e.g. "train.jsonl:17" or "synthetic:train:42"
    family: str = ""  # synthetic query family; "" for real data
    evidence: dict[str, str] = field(default_factory=dict)  # per criterion, the query/item values behind it (reasons)


@dataclass
class Dataset:
    examples: list[Example]
    rulebook: Rulebook
    stats: dict


class DataError(UserError):
    """A bad input row; the message names the file, the 1-based row and the field."""

    def __init__(self, file: str, row: int, field_name: str, reason: str):
        self.file, self.row, self.field, self.reason = file, row, field_name, reason
        super().__init__(f"{file} row {row} field '{field_name}': {reason}")


class _RowError(Exception):
    def __init__(self, field_name: str, reason: str):
        super().__init__(reason)
        self.field, self.reason = field_name, reason


SPLITS = ("train", "dev", "test")
FAMILIES = ("plain", "multi_attribute", "brand", "negation", "alternative", "complement")


def _split_of(key: str) -> str:
    # A stable hash (not Python's salted hash()) so a query lands in the same split in every run and seed.
    bucket = zlib.crc32(key.encode("utf-8")) % 10
    return "dev" if bucket == 8 else "test" if bucket == 9 else "train"


# =====================================================================================================
# The synthetic rule world
# =====================================================================================================
COLORS = ("black", "white", "red", "blue", "green", "grey", "pink", "navy", "beige", "brown", "silver", "yellow")
AUDIENCES = ("men", "women", "kids")
_AUDIENCE_TITLE = {"men": "Men's", "women": "Women's", "kids": "Kids'"}
_SHOE_SIZES = "Size 7|Size 8|Size 9|Size 10|Size 11"
_CLOTHES_SIZES = "Size S|Size M|Size L|Size XL"
_BED_SIZES = "Twin|Full|Queen|King"


@dataclass(frozen=True)
class _Category:
    noun: str
    domain: str
    brands: tuple[str, ...]  # the first two are the premium brands that "alternative to" queries name
    materials: tuple[str, ...]
    sizes: tuple[str, ...]  # display form ("Size 10", "Queen", "128GB"); queries use it lower-cased
    features: tuple[str, ...]  # optional properties a negation query can exclude
    audience: bool  # sold for men / women / kids
    short: str  # how a complement query names it: "case" in "case for smartphone"


def _split(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split("|") if x.strip())


_DOMAIN_BRANDS = {
    "shoes": "Nike|Adidas|New Balance|Asics|Skechers|Puma",
    "apparel": "Patagonia|Ralph Lauren|Uniqlo|Hanes|Champion|Carhartt|Gap",
    "phones": "Apple|Samsung|Google|Motorola|OnePlus",
    "accessories": "OtterBox|Belkin|Spigen|Anker|ESR|UGREEN",
    "computers": "Apple|Dell|Logitech|Lenovo|HP|ASUS",
    "audio": "Bose|Sony|Apple|JBL|Anker|Sennheiser",
    "furniture": "West Elm|Pottery Barn|IKEA|Ashley|Zinus|Sauder",
    "bedding": "Brooklinen|Casper|Amazon Basics|Utopia|Mellanni|Zinus",
    "kitchen": "All-Clad|Le Creuset|Lodge|T-fal|Cuisinart|OXO",
    "appliances": "Breville|KitchenAid|Mr. Coffee|Cuisinart|Hamilton Beach|Keurig",
    "drinkware": "Yeti|Stanley|Hydro Flask|Contigo|Nalgene|Mikasa",
    "cleaning": "Dyson|Miele|Shark|Bissell|Hoover|Eureka",
    "outdoor": "Osprey|The North Face|Coleman|JanSport|Kelty|Teton",
    "fitness": "Bowflex|Rogue|CAP|Amazon Basics|Yes4All",
}

# noun, domain, materials, sizes, features, audience, short name in complement queries
_CATALOGUE = [
    ("running shoes", "shoes", "mesh|knit|leather", _SHOE_SIZES, "waterproof|reflective|wide fit", True, ""),
    ("sneakers", "shoes", "canvas|leather|suede", _SHOE_SIZES, "high-top|slip-on|platform", True, ""),
    ("hiking boots", "shoes", "leather|suede|nylon", _SHOE_SIZES, "waterproof|insulated|steel toe", True, ""),
    ("sandals", "shoes", "leather|rubber|cork", _SHOE_SIZES, "arch support|adjustable strap", True, ""),
    ("slippers", "shoes", "wool|fleece|suede", _SHOE_SIZES, "memory foam|non-slip sole", True, ""),
    ("t-shirt", "apparel", "cotton|polyester|linen", _CLOTHES_SIZES, "v-neck|long sleeve|pocket", True, ""),
    ("polo shirt", "apparel", "cotton|polyester|pique", _CLOTHES_SIZES, "slim fit|long sleeve", True, ""),
    ("hoodie", "apparel", "cotton|fleece|polyester", _CLOTHES_SIZES, "zip-up|oversized", True, ""),
    ("rain jacket", "apparel", "nylon|polyester", _CLOTHES_SIZES, "hooded|packable", True, ""),
    ("winter coat", "apparel", "wool|down|polyester", _CLOTHES_SIZES, "hooded|fur trim", True, ""),
    ("jeans", "apparel", "", "30x30|32x32|34x32|36x32", "ripped|high-waisted|slim fit", True, ""),
    ("chinos", "apparel", "cotton|linen", "30x30|32x32|34x32|36x32", "slim fit|stretch waist", True, ""),
    ("athletic socks", "apparel", "cotton|wool|nylon", "Size S|Size M|Size L", "cushioned|no-show", True, "socks"),
    ("dress socks", "apparel", "cotton|wool|bamboo", "Size S|Size M|Size L", "patterned|over-the-calf", True, ""),
    ("belt", "apparel", "leather|canvas|nylon", "Size 32|Size 34|Size 36|Size 38", "reversible|braided", True, ""),
    ("wallet", "apparel", "leather|canvas|nylon", "", "RFID blocking|coin pocket", True, ""),
    ("smartphone", "phones", "", "128GB|256GB|512GB", "5G|dual SIM|unlocked", False, ""),
    ("tablet", "phones", "", "64GB|128GB|256GB", "cellular|stylus support", False, ""),
    ("phone case", "accessories", "silicone|leather|plastic", "", "magnetic|kickstand|card holder", False, "case"),
    (
        "screen protector",
        "accessories",
        "tempered glass|plastic",
        "",
        "privacy filter|matte finish",
        False,
        "screen protector",
    ),
    ("phone charger", "accessories", "", "", "fast charging|wireless charging|dual port", False, "charger"),
    ("power bank", "accessories", "", "10000mAh|20000mAh", "fast charging|magnetic", False, ""),
    ("laptop", "computers", "", "13 Inch|14 Inch|15 Inch|16 Inch", "touchscreen|backlit keyboard", False, ""),
    ("wireless mouse", "computers", "", "", "silent click|rechargeable", False, "mouse"),
    ("keyboard", "computers", "", "", "mechanical|backlit|bluetooth", False, "keyboard"),
    (
        "laptop bag",
        "computers",
        "leather|nylon|canvas",
        "13 Inch|15 Inch|17 Inch",
        "padded|shoulder strap",
        False,
        "bag",
    ),
    ("wireless earbuds", "audio", "", "", "noise cancelling|waterproof", False, "earbuds"),
    ("headphones", "audio", "", "", "noise cancelling|foldable|bluetooth", False, "headphones"),
    ("bluetooth speaker", "audio", "", "", "waterproof|party lights", False, ""),
    ("sofa", "furniture", "leather|fabric|velvet|linen", "2-Seater|3-Seater", "reclining|sleeper", False, ""),
    ("armchair", "furniture", "leather|fabric|velvet", "", "reclining|swivel", False, ""),
    ("office chair", "furniture", "mesh|leather|fabric", "", "lumbar support|adjustable arms", False, "chair"),
    ("coffee table", "furniture", "wood|glass|metal|marble", "", "storage|lift-top", False, "coffee table"),
    ("desk", "furniture", "wood|metal|glass", "40 Inch|48 Inch|55 Inch", "standing|drawers", False, ""),
    ("bed sheets", "bedding", "cotton|linen|microfiber|bamboo", _BED_SIZES, "deep pocket|cooling", False, "sheets"),
    ("blanket", "bedding", "fleece|wool|cotton", "Twin|Queen|King", "weighted|reversible", False, ""),
    (
        "throw pillow",
        "bedding",
        "cotton|velvet|linen",
        "18x18 Inch|20x20 Inch",
        "insert included|removable cover",
        False,
        "pillows",
    ),
    ("mattress", "bedding", "memory foam|latex|innerspring", _BED_SIZES, "cooling gel|pillow top", False, ""),
    ("mattress topper", "bedding", "memory foam|latex|down", _BED_SIZES, "cooling gel|hypoallergenic", False, "topper"),
    (
        "frying pan",
        "kitchen",
        "cast iron|stainless steel|ceramic|aluminum",
        "8 Inch|10 Inch|12 Inch",
        "non-stick|oven safe|induction ready",
        False,
        "",
    ),
    ("saucepan", "kitchen", "stainless steel|aluminum|copper", "2 Quart|3 Quart", "non-stick|glass lid", False, ""),
    ("spatula", "kitchen", "silicone|wood|stainless steel", "", "heat resistant|slotted", False, "spatula"),
    (
        "kitchen tongs",
        "kitchen",
        "silicone|stainless steel",
        "9 Inch|12 Inch",
        "locking|heat resistant",
        False,
        "tongs",
    ),
    (
        "coffee maker",
        "appliances",
        "stainless steel|plastic",
        "4 Cup|12 Cup",
        "programmable|built-in grinder",
        False,
        "",
    ),
    (
        "electric kettle",
        "appliances",
        "glass|stainless steel|plastic",
        "",
        "temperature control|auto shut-off",
        False,
        "",
    ),
    (
        "coffee mug",
        "drinkware",
        "ceramic|glass|stainless steel",
        "12 oz|16 oz",
        "insulated|microwave safe",
        False,
        "mug",
    ),
    (
        "water bottle",
        "drinkware",
        "stainless steel|plastic|glass",
        "20 oz|32 oz|40 oz",
        "insulated|straw lid",
        False,
        "",
    ),
    ("vacuum cleaner", "cleaning", "", "", "cordless|bagless|HEPA filter", False, ""),
    ("robot vacuum", "cleaning", "", "", "self-emptying|mopping", False, ""),
    ("steam mop", "cleaning", "", "", "swivel head|removable tank", False, ""),
    ("backpack", "outdoor", "nylon|canvas|polyester", "20L|30L|40L", "waterproof|laptop sleeve", True, ""),
    ("sleeping bag", "outdoor", "down|polyester|flannel", "", "mummy|compression sack", True, ""),
    ("dumbbells", "fitness", "cast iron|rubber|neoprene", "10 lb|20 lb|50 lb", "adjustable|hex", False, ""),
    ("kettlebell", "fitness", "cast iron|vinyl|steel", "15 lb|25 lb|35 lb", "adjustable|wide handle", False, ""),
]
CATEGORIES: tuple[_Category, ...] = tuple(
    _Category(
        noun, domain, _split(_DOMAIN_BRANDS[domain]), _split(mats), _split(sizes), _split(feats), aud, short or noun
    )
    for noun, domain, mats, sizes, feats, aud, short in _CATALOGUE
)
_BY_NOUN = {c.noun: c for c in CATEGORIES}

# Related: another type of the same kind (a human grader would call it "related", not "the same").
_RELATED_GROUPS = [
    "running shoes|sneakers|hiking boots",
    "sandals|slippers",
    "t-shirt|polo shirt|hoodie",
    "hoodie|rain jacket|winter coat",
    "jeans|chinos",
    "athletic socks|dress socks",
    "belt|wallet",
    "smartphone|tablet",
    "tablet|laptop",
    "phone case|screen protector",
    "phone charger|power bank",
    "wireless mouse|keyboard",
    "laptop bag|backpack",
    "wireless earbuds|headphones|bluetooth speaker",
    "sofa|armchair",
    "armchair|office chair",
    "coffee table|desk",
    "bed sheets|blanket|throw pillow",
    "blanket|sleeping bag",
    "mattress|mattress topper",
    "frying pan|saucepan",
    "spatula|kitchen tongs",
    "coffee maker|electric kettle",
    "coffee mug|water bottle",
    "vacuum cleaner|robot vacuum|steam mop",
    "dumbbells|kettlebell",
]
# Complements: (anchor, complement) - the complement is used with the anchor ("case for smartphone").
_COMPLEMENT_PAIRS = [
    ("running shoes", "athletic socks"),
    ("sneakers", "athletic socks"),
    ("hiking boots", "athletic socks"),
    ("jeans", "belt"),
    ("chinos", "belt"),
    ("smartphone", "phone case"),
    ("smartphone", "screen protector"),
    ("smartphone", "phone charger"),
    ("tablet", "screen protector"),
    ("laptop", "laptop bag"),
    ("laptop", "wireless mouse"),
    ("laptop", "keyboard"),
    ("sofa", "throw pillow"),
    ("sofa", "coffee table"),
    ("desk", "office chair"),
    ("mattress", "bed sheets"),
    ("mattress", "mattress topper"),
    ("frying pan", "spatula"),
    ("saucepan", "kitchen tongs"),
    ("coffee maker", "coffee mug"),
    ("smartphone", "wireless earbuds"),
    ("laptop", "headphones"),
]


def _build_relations():
    related = {c.noun: [] for c in CATEGORIES}
    for group in _RELATED_GROUPS:
        nouns = _split(group)
        for a in nouns:
            related[a] += [b for b in nouns if b != a and b not in related[a]]
    complements = {c.noun: [] for c in CATEGORIES}
    for anchor, comp in _COMPLEMENT_PAIRS:
        complements[anchor].append(comp)
        complements[comp].append(anchor)
    return ({k: tuple(v) for k, v in related.items()}, {k: tuple(v) for k, v in complements.items()})


RELATED, COMPLEMENTS = _build_relations()

_MODELS = ("Pro", "Max", "Lite", "Plus", "Ultra", "Air", "Flex", "Prime", "Elite", "Sport", "One", "Go", "Classic")
_FILLERS = (
    "Lightweight",
    "Comfortable",
    "Durable",
    "Premium",
    "Everyday",
    "Modern",
    "Soft",
    "Compact",
    "Stylish",
    "Sturdy",
    "Versatile",
    "Easy Care",
)
_EXTRA_BULLETS = (
    "Easy to clean",
    "1-year warranty",
    "Gift ready packaging",
    "Ships in recyclable packaging",
    "Satisfaction guaranteed",
    "Tested for daily use",
)
_DESCRIPTIONS = (
    "A {adj} pick for everyday use.",
    "Built to last, with a {adj} design.",
    "{Noun} with a {adj} design at a fair price.",
    "A {adj} gift for friends and family.",
)
_ADJECTIVES = ("reliable", "practical", "well-made", "popular", "versatile", "simple")

# Family mix and candidate mix (same type / related type / complement / random), tuned so the natural
# label distribution is roughly Excellent 40%, Related 25%, Mismatch 20%, Irrelevant 15%.
_FAMILY_WEIGHTS = {
    "plain": 0.18,
    "multi_attribute": 0.26,
    "brand": 0.2,
    "negation": 0.13,
    "alternative": 0.1,
    "complement": 0.13,
}
_KIND_WEIGHTS = {"same": 0.62, "related": 0.21, "complement": 0.07, "random": 0.1}
_P_HIT = 0.72  # an item takes the requested value of a requested attribute with this probability
_P_STATED = {"brand": 0.9, "color": 0.8, "material": 0.8, "audience": 0.85, "size": 0.8, "feature": 0.9}
_SPECS = ("material", "audience", "size")


@dataclass
class _Query:
    text: str
    family: str
    category: _Category
    brand: str | None = None  # the brand the query asks for
    not_brand: str | None = None  # "alternative to X": any stated brand but X satisfies the brand criterion
    color: str | None = None
    specs: dict[str, str] = field(default_factory=dict)  # material / audience / size -> requested value
    exclude: str | None = None  # negation: a material or feature the item must not have
    anchor: _Category | None = None  # complement family: the product the wanted item goes with


def _spec_options(cat: _Category) -> dict[str, tuple[str, ...]]:
    opts = {"material": cat.materials, "audience": AUDIENCES if cat.audience else (), "size": cat.sizes}
    return {k: v for k, v in opts.items() if v}


def _attribute_words(rng: random.Random, q: _Query) -> str:
    """Render a query's color/specs around its noun: 'women's red cotton t-shirt size m'."""
    pre = [q.color] if q.color else []
    if "material" in q.specs:
        pre.append(q.specs["material"])
    text = " ".join(pre + [q.category.noun])
    if "audience" in q.specs:
        aud = q.specs["audience"]
        text = f"{aud}'s {text}" if aud != "kids" and rng.random() < 0.5 else f"{text} for {aud}"
    if "size" in q.specs:
        text += " " + q.specs["size"].lower()
    return text


def _sample_query(rng: random.Random) -> _Query:
    family = rng.choices(FAMILIES, weights=[_FAMILY_WEIGHTS[f] for f in FAMILIES])[0]
    if family == "complement":
        anchor_noun, comp_noun = rng.choice(_COMPLEMENT_PAIRS)
        anchor, cat = _BY_NOUN[anchor_noun], _BY_NOUN[comp_noun]
        text = f"{cat.short} for {anchor.noun}" if rng.random() < 0.7 else f"{anchor.noun} {cat.short}"
        return _Query(text, family, cat, anchor=anchor)
    cat = rng.choice(CATEGORIES)
    q = _Query("", family, cat)
    options = _spec_options(cat)
    if family == "plain":
        q.text = rng.choice(("{n}", "{n}", "best {n}", "buy {n}", "{n} deals")).format(n=cat.noun)
    elif family == "multi_attribute":
        names = ["color"] + list(options)
        for name in rng.sample(names, min(len(names), rng.choice((2, 2, 3)))):
            if name == "color":
                q.color = rng.choice(COLORS)
            else:
                q.specs[name] = rng.choice(options[name])
        q.text = _attribute_words(rng, q)
    elif family == "brand":
        q.brand = rng.choice(cat.brands)
        if rng.random() < 0.35:  # sometimes one more attribute: "nike red running shoes"
            name = rng.choice(["color"] + list(options))
            if name == "color":
                q.color = rng.choice(COLORS)
            else:
                q.specs[name] = rng.choice(options[name])
        q.text = f"{q.brand.lower()} {_attribute_words(rng, q)}"
    elif family == "negation":
        q.exclude = rng.choice(cat.materials + cat.features)
        if rng.random() < 0.3:
            q.color = rng.choice(COLORS)
        word = "without" if rng.random() < 0.7 else "no"
        q.text = f"{_attribute_words(rng, q)} {word} {q.exclude.lower()}"
    else:  # alternative
        q.not_brand = rng.choice(cat.brands[:2])
        b, n = q.not_brand.lower(), cat.noun
        q.text = rng.choice(
            (
                f"affordable alternative to {b} {n}",
                f"cheaper alternative to {b} {n}",
                f"{b} {n} alternative",
                f"{n} like {b} but cheaper",
            )
        )
    return q


def _pick(rng: random.Random, wanted: str | None, options: tuple[str, ...], p_hit: float = _P_HIT) -> str:
    return wanted if wanted in options and rng.random() < p_hit else rng.choice(options)


def _sample_item(rng: random.Random, q: _Query) -> dict:
    """An item for query q: its category, its true attribute values and which of them the text states."""
    kind = rng.choices(list(_KIND_WEIGHTS), weights=list(_KIND_WEIGHTS.values()))[0]
    target = q.category.noun
    if kind == "complement" and q.anchor is not None and rng.random() < 0.6:
        cat = q.anchor  # the trap of a complement query: the anchor product itself
    elif kind == "related" and RELATED[target]:
        cat = _BY_NOUN[rng.choice(RELATED[target])]
    elif kind == "complement" and COMPLEMENTS[target]:
        cat = _BY_NOUN[rng.choice(COMPLEMENTS[target])]
    elif kind == "random":
        cat = rng.choice(CATEGORIES)
    else:
        cat = q.category
    # "alternative to X" candidates carry X itself a third of the time
    wanted_brand = q.brand or q.not_brand
    item = {
        "category": cat,
        "brand": _pick(rng, wanted_brand, cat.brands, _P_HIT if q.brand else 0.35),
        "color": _pick(rng, q.color, COLORS),
        "features": [],
    }
    for name, options in _spec_options(cat).items():
        if name == "material" and q.exclude in options:  # "sofa without leather": leather half the time
            item[name] = _pick(rng, q.exclude, options, 0.45)
        else:
            item[name] = _pick(rng, q.specs.get(name), options)
    for feat in cat.features:
        if rng.random() < (0.5 if feat == q.exclude else 0.25):
            item["features"].append(feat)
    keys = ["brand", "color"] + [k for k in _SPECS if k in item]
    item["stated"] = {k: rng.random() < _P_STATED[k] for k in keys}
    item["features"] = [f for f in item["features"] if rng.random() < _P_STATED["feature"]]  # unstated = absent
    return item


def _gold(q: _Query, item: dict) -> tuple[dict[str, str], dict[str, str]]:
    """Gold criteria from the query's requirements and the item's *stated* attributes, with evidence."""
    cat, stated = item["category"], item["stated"]
    crit, ev = {}, {}
    if cat.noun == q.category.noun:
        crit["category"], ev["category"] = "match", cat.noun
    else:
        crit["category"] = "related" if cat.noun in RELATED[q.category.noun] else "mismatch"
        ev["category"] = f"{cat.noun}, not {q.category.noun}"

    def compare(name: str, wanted: str) -> tuple[str, str]:
        if not stated.get(name):
            return "unstated", f"{wanted} requested"
        have = item[name]
        return ("match", have) if have == wanted else ("conflict", f"{wanted} requested, {have} offered")

    if q.brand:
        crit["brand"], ev["brand"] = compare("brand", q.brand)
    elif q.not_brand:
        if not stated["brand"]:
            crit["brand"], ev["brand"] = "unstated", f"an alternative to {q.not_brand} requested"
        elif item["brand"] == q.not_brand:
            crit["brand"], ev["brand"] = "conflict", f"{q.not_brand} itself"
        else:
            crit["brand"], ev["brand"] = "match", f"{item['brand']} instead of {q.not_brand}"
    else:
        crit["brand"] = "n/a"
    if q.color:
        crit["color"], ev["color"] = compare("color", q.color)
    else:
        crit["color"] = "n/a"
    if q.specs:
        results = [compare(name, wanted) for name, wanted in q.specs.items()]
        for value in ("conflict", "unstated", "match"):  # the worst requested spec decides
            hits = [e for v, e in results if v == value]
            if hits:
                crit["specs"], ev["specs"] = value, "; ".join(hits)
                break
    else:
        crit["specs"] = "n/a"
    if q.exclude:
        stated_props = list(item["features"])
        if stated.get("material"):
            stated_props.append(item["material"])
        violated = q.exclude in stated_props
        crit["negation"] = "violated" if violated else "satisfied"
        ev["negation"] = q.exclude if violated else f"no {q.exclude}"
    else:
        crit["negation"] = "n/a"
    return {name: crit[name] for name in TAOBAO4.criterion_names}, ev


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _title(text: str) -> str:
    # "noise cancelling" -> "Noise Cancelling", but "RFID blocking" keeps its capitals (str.title would not)
    return " ".join(_cap(w) for w in text.split())


def _render_item(rng: random.Random, item: dict) -> dict:
    """Title, fields, bullets and description; an attribute the item does not state appears nowhere."""
    cat, stated = item["category"], item["stated"]
    where = {}
    for name, is_stated in stated.items():
        if is_stated:
            r = rng.random()
            where[name] = "title" if r < 0.7 else "field" if r < 0.85 else "bullets"
    feats_title = [f for f in item["features"] if rng.random() < 0.6]
    feats_bullets = [f for f in item["features"] if f not in feats_title]

    words = []
    if where.get("brand") == "title":
        words.append(item["brand"])
    if where.get("audience") == "title":
        words.append(_AUDIENCE_TITLE[item["audience"]])
    if rng.random() < 0.6:
        words.append(rng.choice(_MODELS) + (f" {rng.randint(2, 9)}" if rng.random() < 0.5 else ""))
    color_first = rng.random() < 0.4
    if where.get("color") == "title" and color_first:
        words.append(_title(item["color"]))
    if where.get("material") == "title":
        words.append(_title(item["material"]))
    words.append(_title(cat.noun))
    words += [_title(f) for f in feats_title]
    if rng.random() < 0.7:
        words += ["-"] + rng.sample(_FILLERS, rng.choice((1, 2)))
    tail = []
    if where.get("color") == "title" and not color_first:
        tail.append(_title(item["color"]))
    if where.get("size") == "title":
        tail.append(item["size"])
    title = ", ".join([" ".join(words)] + tail)

    bullets = []
    sentences = {
        "brand": "By {}",
        "color": "Finished in {}",
        "material": "Made of {}",
        "audience": "Designed for {}",
        "size": "{}" if item.get("size", "").startswith("Size ") else "Size: {}",
    }
    for name in ("brand", "color", "material", "audience", "size"):
        if where.get(name) == "bullets":
            bullets.append(sentences[name].format(item[name]))
    bullets += [_cap(f) for f in feats_bullets]
    if rng.random() < 0.5:
        bullets.append(rng.choice(_EXTRA_BULLETS))
    rng.shuffle(bullets)
    description = ""
    if rng.random() < 0.4:
        description = rng.choice(_DESCRIPTIONS).format(adj=rng.choice(_ADJECTIVES), Noun=_cap(cat.noun))
    return {
        "title": title,
        "brand": item["brand"] if where.get("brand") == "field" else "",
        "color": item["color"] if where.get("color") == "field" else "",
        # a size field reads "Size: 10", not "Size: Size 10"
        "attributes": {k: item[k].removeprefix("Size ") for k in _SPECS if where.get(k) == "field"},
        "bullets": "\n".join(bullets),
        "description": description,
    }


def generate_synthetic(split: str = "train", seed: int = 0, size: int = 2000) -> list[Example]:
    """`size` examples of the rule world; splits are disjoint by query string (stable hash)."""
    if split not in SPLITS:
        raise UserError(f"synthetic split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(f"synthetic:{seed}:{split}")
    examples: list[Example] = []
    while len(examples) < size:
        q = _sample_query(rng)
        if _split_of(q.text) != split:
            continue
        for _ in range(rng.randint(3, 6)):
            item = _sample_item(rng, q)
            criteria, evidence = _gold(q, item)
            examples.append(
                Example(
                    query=q.text,
                    label=TAOBAO4.decide(criteria),
                    criteria=criteria,
                    **_render_item(rng, item),
                    source_id=f"synthetic:{split}:{len(examples)}",
                    family=q.family,
                    evidence=evidence,
                )
            )
    return examples[:size]


# =====================================================================================================
# Files: ESCI and user data
# =====================================================================================================
_TEXT_FIELDS = ("query", "title", "label", "description", "bullets", "brand", "color", "context")
_REQUIRED = ("query", "title", "label")
ESCI_FIELD_MAP = {
    "query": "query",
    "title": "product_title",
    "label": "esci_label",
    "description": "product_description",
    "bullets": "product_bullet_point",
    "brand": "product_brand",
    "color": "product_color",
}
_ESCI_LABELS = {"e": "Exact", "s": "Substitute", "c": "Complement", "i": "Irrelevant"}
ESCI_EXAMPLES = "shopping_queries_dataset_examples.parquet"
ESCI_PRODUCTS = "shopping_queries_dataset_products.parquet"
_EXTS = ("jsonl", "csv", "parquet")
_BAD_UTF8 = re.compile("[\udc80-\udcff]")  # what surrogateescape decoding leaves for undecodable bytes
_TAG = re.compile(r"</?[A-Za-z][^<>]*>")
_BLOCK_TAG = re.compile(r"<\s*(br|/p|/li|/div|/h\d|/tr)\b[^<>]*>", re.I)
_BROKEN_TAG = re.compile(
    r"</?(?:p|br|li|ul|ol|div|span|strong|em|b|i|h\d)(?=[^A-Za-z0-9]|$)", re.I
)  # "...off.</p" cut at the '>'


def clean_html(text: str) -> str:
    """Strip HTML tags and entities; block tags become line breaks so bullets stay apart."""
    if "<" not in text and "&" not in text:
        return text.strip()
    text = html.unescape(text)  # first: some descriptions hold escaped markup ("&lt;li&gt;")
    text = _BROKEN_TAG.sub(" ", _TAG.sub(" ", _BLOCK_TAG.sub("\n", text)))
    return "\n".join(" ".join(line.split()) for line in text.split("\n") if line.strip())


def parse_field_map(spec: str | None, defaults: dict[str, str] | None = None) -> dict[str, str]:
    """'query=search_term,title=product_name' -> our field name -> the file's column (defaults: same name)."""
    fmap = {name: name for name in _TEXT_FIELDS} | (defaults or {})
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        ours, sep, theirs = part.partition("=")
        ours, theirs = ours.strip(), theirs.strip()
        if not sep or ours not in _TEXT_FIELDS or not theirs:
            raise UserError(f"bad field_map entry {part!r}: expected ours=column with ours one of {_TEXT_FIELDS}")
        fmap[ours] = theirs
    return fmap


_THRESHOLD = re.compile(r"^\s*(>=|<=|==|>|<)\s*([-+]?[0-9.]+(?:[eE][-+]?\d+)?)\s*:\s*(.+?)\s*$")
_OPS = {
    ">=": lambda x, t: x >= t,
    ">": lambda x, t: x > t,
    "<=": lambda x, t: x <= t,
    "<": lambda x, t: x < t,
    "==": lambda x, t: x == t,
}


def _canonical_label(value: str, rulebook: Rulebook) -> str | None:
    lower = {label.lower(): label for label in rulebook.labels}
    return lower.get(value.strip().lower())


def parse_label_map(spec: str, rulebook: Rulebook):
    """A function raw value -> label (or raises _RowError), from either style of label map:
    explicit '4=Excellent,3=Related' or thresholds '>=3.5:Excellent,>=2.5:Related' (first met wins)."""
    parts = [p for p in spec.split(",") if p.strip()]
    if not parts:
        raise UserError("empty label_map")
    if all(_THRESHOLD.match(p) for p in parts):
        rules = []
        for p in parts:
            op, number, label = _THRESHOLD.match(p).groups()
            canonical = _canonical_label(label, rulebook)
            if canonical is None:
                raise UserError(f"label_map: {label!r} is not a label of {rulebook.name} {rulebook.labels}")
            rules.append((op, float(number), canonical))

        def by_threshold(raw) -> str:
            x = _as_number(raw)
            for op, t, label in rules:
                if _OPS[op](x, t):
                    return label
            raise _RowError("label", f"value {raw!r} meets no threshold of the label map")

        return by_threshold
    table = {}
    for p in parts:
        key, sep, label = p.rpartition("=")
        canonical = _canonical_label(label, rulebook)
        if not sep or not key.strip() or canonical is None:
            raise UserError(f"bad label_map entry {p!r}: expected value=label with label one of {rulebook.labels}")
        table[_norm_key(key)] = canonical

    def by_table(raw) -> str:
        key = _norm_key(raw)
        if key not in table:
            raise _RowError("label", f"unknown label {raw!r} (expected one of {sorted(table)})")
        return table[key]

    return by_table


def _norm_key(raw) -> str:
    """4, 4.0, "4" and "4.0" are the same key of an explicit label map, whatever the file format (a CSV
    holds strings, and a spreadsheet writes 3 as "3.0")."""
    text = str(raw).strip().lower()
    try:
        x = float(text)
    except ValueError:
        return text
    if not math.isfinite(x):
        return text
    return str(int(x)) if x.is_integer() else repr(x)


def _as_number(raw) -> float:
    if isinstance(raw, bool):
        raise _RowError("label", f"expected a number, got bool {raw!r}")
    try:
        x = float(raw)
    except (TypeError, ValueError):
        raise _RowError("label", f"expected a number, got {raw!r}") from None
    if math.isnan(x):
        raise _RowError("label", "label is NaN")
    return x


def _text(row: dict, column: str, ours: str, required: bool) -> str:
    if column not in row or row[column] is None:
        if required:
            raise _RowError(column, "missing required field" if column not in row else "required field is null")
        return ""
    value = row[column]
    if ours == "bullets" and isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = "\n".join(value)  # a list of bullet points is fine
    if not isinstance(value, str):
        raise _RowError(column, f"expected a string, got {type(value).__name__} {str(value)[:40]!r}")
    if _BAD_UTF8.search(value):
        raise _RowError(column, "not valid UTF-8")
    value = clean_html(value)
    if ours not in ("description", "bullets", "context"):
        value = " ".join(value.split())  # one line
    if required and not value:
        raise _RowError(column, "empty")
    return value


def _row_to_example(
    row: dict, fmap: dict[str, str], to_label, rulebook: Rulebook, esci: bool, source_id: str
) -> Example:
    for key, value in row.items():  # undecodable bytes anywhere in the row are an error of that field
        if isinstance(key, str) and _BAD_UTF8.search(key):
            raise _RowError(
                key.encode("utf-8", "surrogateescape").decode("utf-8", "replace"), "column name is not valid UTF-8"
            )
        if isinstance(value, str) and _BAD_UTF8.search(value):
            raise _RowError(key, "not valid UTF-8")
    values = {}
    for ours in _TEXT_FIELDS:
        if ours == "label":
            continue
        values[ours] = _text(row, fmap[ours], ours, ours in _REQUIRED)
    label_col = fmap["label"]
    if label_col not in row or row[label_col] is None:
        raise _RowError(label_col, "missing required field" if label_col not in row else "required field is null")
    raw = row[label_col]
    if isinstance(raw, str) and not raw.strip():
        raise _RowError(label_col, "empty")
    try:
        label = to_label(raw)
    except _RowError as e:
        raise _RowError(label_col, e.reason) from None

    criteria = {name: UNKNOWN for name in rulebook.criterion_names}
    if esci:
        criteria.update(infer_esci_criteria(label, values["query"], values["brand"]))
    attributes = {}
    for key, value in row.items():
        if key.startswith("criterion_"):
            name = key[len("criterion_") :]
            if name not in rulebook.criterion_names:
                raise _RowError(key, f"{name!r} is not a criterion of {rulebook.name} {rulebook.criterion_names}")
            if value is None or (isinstance(value, str) and value.strip().lower() in ("", UNKNOWN)):
                continue
            if not isinstance(value, str) or value.strip().lower() not in rulebook.allowed(name):
                raise _RowError(key, f"value {value!r} not one of {rulebook.allowed(name)}")
            criteria[name] = value.strip().lower()
        elif key.startswith("attr_") and value not in (None, ""):
            if not isinstance(value, str):
                raise _RowError(key, f"expected a string, got {type(value).__name__}")
            attributes[key[len("attr_") :]] = " ".join(value.split())
    return Example(label=label, criteria=criteria, attributes=attributes, source_id=source_id, **values)


def _field_hints(candidates, fmap: dict[str, str], columns) -> list[tuple[str, str]]:
    """(our field, column) pairs for fields whose mapped column is absent while a candidate column is
    named like the field ('product_description' for description)."""
    return [
        (ours, column)
        for ours in _TEXT_FIELDS
        if fmap[ours] not in columns
        for column in candidates
        if ours in column.lower()
    ]


def _check_columns(file: str, row: dict, fmap: dict[str, str]) -> None:
    """A required field whose column the file lacks is the file's problem, not every row's: one error with the
    file's columns and the --field-map that would fix it."""
    for ours in _REQUIRED:
        if fmap[ours] not in row:
            unmapped = [c for c in row if c not in fmap.values()]
            like = next((column for field, column in _field_hints(unmapped, fmap, row) if field == ours), "<column>")
            raise UserError(
                f"{file} has no column {fmap[ours]!r} for the required field '{ours}'; its columns: "
                f"{', '.join(map(str, row))}; map one with --field-map {ours}={like}"
            )


def _esci_label(raw) -> str:
    if not isinstance(raw, str):
        raise _RowError("label", f"expected a string, got {type(raw).__name__} {raw!r}")
    value = raw.strip().lower()
    label = _ESCI_LABELS.get(value) or _canonical_label(value, ESCI)
    if label is None:
        raise _RowError("label", f"unknown label {raw!r} (expected one of {ESCI.labels} or E/S/C/I)")
    return label


# --- Row readers: each yields (1-based row, dict) or (row, _RowError) ---------------------------------
def _read_jsonl(path: str):
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                continue  # blank lines are not rows
            try:
                obj = json.loads(raw.decode("utf-8", errors="surrogateescape"))
            except json.JSONDecodeError as e:
                yield lineno, _RowError("(row)", f"malformed JSON: {e.msg} at column {e.colno}")
                continue
            if not isinstance(obj, dict):
                yield lineno, _RowError("(row)", f"expected a JSON object, got {type(obj).__name__}")
                continue
            yield lineno, obj


def _read_csv(path: str):
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # huge descriptions are truncated later, not rejected
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield 1, _RowError("(header)", f"malformed CSV: {e}")
            return
        while True:
            start = reader.line_num + 1
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                yield start, _RowError("(row)", f"malformed CSV: {e}")
                continue
            if not cells:
                continue
            if len(cells) != len(header):
                yield start, _RowError("(row)", f"expected {len(header)} columns, found {len(cells)}")
                continue
            yield start, dict(zip(header, cells))


def _read_parquet(path: str):
    import pyarrow.parquet as pq

    for i, row in enumerate(pq.read_table(path).to_pylist(), 1):
        yield i, row


def _read_esci_official(dirpath: str, split: str):
    """The official release's two parquet files, joined on (product_id, product_locale), locale 'us'.

    train and test are the release's own `split` column. Our dev is 10% of the official train queries,
    chosen by a fixed hash of the query id (independent of --seed on purpose, so that train and dev stay
    disjoint whatever seeds two runs use); train is the other 90%.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if split not in SPLITS:
        raise UserError(f"esci split must be one of {SPLITS}, got {split!r}")

    def read(name):  # an all-null column has Arrow type null, which join() refuses: make it string
        table = pq.read_table(os.path.join(dirpath, name))
        return table.cast(
            pa.schema([pa.field(f.name, pa.string()) if pa.types.is_null(f.type) else f for f in table.schema])
        )

    examples = read(ESCI_EXAMPLES)
    examples = examples.append_column("_row", pa.array(range(1, examples.num_rows + 1), pa.int64()))
    official = "test" if split == "test" else "train"
    examples = examples.filter(
        pc.and_(pc.equal(examples["product_locale"], "us"), pc.equal(examples["split"], official))
    )
    products = read(ESCI_PRODUCTS)
    joined = examples.join(products, keys=["product_id", "product_locale"], join_type="left outer").sort_by("_row")
    for row in joined.to_pylist():
        if split != "test":
            key = str(row.get("query_id") if row.get("query_id") is not None else row.get("query"))
            if (zlib.crc32(key.encode("utf-8")) % 10 == 0) != (split == "dev"):
                continue
        yield row.pop("_row"), row


def _resolve(name: str, path: str | None, split: str):
    """(reader, file path for messages, whether the file holds every split) for a loader name and a path."""
    if path is None:
        raise UserError(f"--dataset {name} needs --data-path (a file, or a folder with {split}.jsonl/.csv/.parquet)")
    if os.path.isdir(path):
        if name == "esci" and os.path.exists(os.path.join(path, ESCI_EXAMPLES)):
            return (lambda: _read_esci_official(path, split)), os.path.join(path, ESCI_EXAMPLES), False
        exts = _EXTS if name == "esci" else (name,)
        for ext in exts:
            candidate = os.path.join(path, f"{split}.{ext}")
            if os.path.exists(candidate):
                return _resolve(ext, candidate, split)[0], candidate, False
        raise UserError(f"no {' / '.join(f'{split}.{e}' for e in exts)} in {path}")
    if not os.path.exists(path):
        raise UserError(f"data path {path} does not exist")
    ext = name if name in _EXTS else path.rsplit(".", 1)[-1].lower()
    readers = {"jsonl": _read_jsonl, "json": _read_jsonl, "csv": _read_csv, "parquet": _read_parquet}
    if ext not in readers:
        raise UserError(f"cannot tell the format of {path}: expected .jsonl, .csv or .parquet")
    return (lambda: readers[ext](path)), path, True


# A single file holds every split: its queries are split into train and dev, DEV_FRACTION of the distinct
# queries (at least one) going to dev, chosen by a fixed hash of the query text, so that the same file
# gives the same split in every script and run, and no query is both trained on and evaluated.
DEV_FRACTION = 0.1


def dev_queries(queries: set[str], fraction: float = DEV_FRACTION) -> set[str]:
    """The dev share of a single file's distinct queries: the ones with the smallest hash (file order does not matter)."""
    ranked = sorted(queries, key=lambda q: (zlib.crc32(f"agrl-dev:{q}".encode("utf-8")), q))
    return set(ranked[: max(1, round(fraction * len(ranked)))]) if len(ranked) > 1 else set()


def _main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _load_rows(name, path, split, fmap, to_label, rulebook, skip_bad_rows) -> tuple[list[Example], dict]:
    """Rows of one split. A single file is split by query (see DEV_FRACTION) unless `split` is "all"."""
    if split == "all" and (path is None or os.path.isdir(path)):
        raise UserError(f"--split all reads one whole file; {path} is a folder: name one of its files")
    reader, file_path, whole_file = _resolve(name, path, split)
    file = os.path.basename(file_path)
    examples, skipped, rows_read, columns = [], [], 0, {}
    for row_number, row in reader():
        rows_read += 1
        if isinstance(row, dict):
            if not columns:
                _check_columns(file, row, fmap)
            columns.update(dict.fromkeys(row))
        try:
            if isinstance(row, _RowError):
                raise row
            examples.append(_row_to_example(row, fmap, to_label, rulebook, name == "esci", f"{file}:{row_number}"))
        except _RowError as e:
            if not skip_bad_rows:
                raise DataError(file, row_number, e.field, e.reason) from None
            skipped.append({"file": file, "row": row_number, "field": e.field, "reason": e.reason})
    used = [c for c in columns if c in fmap.values() or c.startswith(("criterion_", "attr_"))]
    ignored = [c for c in columns if c not in used]
    stats = {
        "source": file_path,
        "rows_read": rows_read,
        "rows_used": len(examples),
        "rows_skipped": len(skipped),
        "columns_used": used,
        "columns_ignored": ignored,
        "skipped": skipped,
    }
    if ignored and _main_process():
        print(
            f"data: {file}: columns not read (no field maps to them): {', '.join(ignored)}"
            + "".join(
                f"; to read it: --field-map {ours}={column}"
                for ours, column in _field_hints(ignored, fmap, columns)[:3]
            ),
            file=sys.stderr,
        )
    if skipped and _main_process():
        fields = {}
        for s in skipped:
            fields[s["field"]] = fields.get(s["field"], 0) + 1
        first = skipped[0]
        print(
            f"data: skipped {len(skipped)} of {rows_read} rows of {file} (--skip-bad-rows; by field: "
            + ", ".join(f"{k} {v}" for k, v in fields.items())
            + f"; first: row {first['row']} field "
            f"'{first['field']}': {first['reason'][:80]}); every one is listed in the run folder's "
            "data_stats.json (eval_data_stats.json for the evaluation)",
            file=sys.stderr,
        )
    if whole_file and split != "all":
        if split not in ("train", "dev"):
            raise UserError(
                f"{file_path} is one file: it is split into train and dev only (or read whole with "
                f"--split all), not {split!r}"
            )
        queries = {e.query for e in examples}
        dev = dev_queries(queries)
        if len(queries) < 2:
            raise UserError(
                f"{file_path} holds {len(queries)} distinct query: a single file is split by query into "
                f"train and dev, which needs two or more (or give a folder with train and dev files)"
            )
        in_split = [e for e in examples if (e.query in dev) == (split == "dev")]
        stats.update(
            rows_used=len(in_split),
            rows_other_split=len(examples) - len(in_split),
            file_split=dict(
                split=split,
                dev_fraction=DEV_FRACTION,
                queries=len(queries),
                dev_queries=len(dev),
                rule="queries with the smallest crc32('agrl-dev:' + query) are dev",
            ),
        )
        if _main_process():
            print(
                f"data: {file} is one file, split by query with a fixed hash: {len(dev)} of {len(queries)} queries "
                f"({DEV_FRACTION:.0%}, at least one) are dev, the rest train; the {split} split has {len(in_split)} of "
                f"{len(examples)} rows (a folder with train and dev files sets the split yourself)"
            )
        examples = in_split
    return examples, stats


# =====================================================================================================
# The entry point
# =====================================================================================================
def load_dataset(
    name: str,
    split: str = "train",
    path: str | None = None,
    seed: int = 0,
    limit: int | None = None,
    balanced: bool = False,
    field_map: str | None = None,
    label_map: str | None = None,
    rulebook: str | None = None,
    skip_bad_rows: bool = False,
    synthetic_size: int = 2000,
) -> Dataset:
    """Load one split of a dataset.

    name: synthetic | esci | jsonl | csv | parquet. esci: `path` is a directory with {split}.jsonl (or
    .csv/.parquet), a joined file, or a directory with the official two parquet files (see
    `_read_esci_official` for how dev is carved out of the official train split). jsonl/csv/parquet:
    a directory holding {split}.<ext>, or one file that is split by query into train and dev
    (`dev_queries`; split "all" reads it whole); `field_map` maps our fields to columns,
    `label_map` maps raw labels (explicit or thresholds), `rulebook` names the label set (default
    taobao4); columns criterion_<name> give gold criteria, attr_<name> extra attributes.
    balanced: class-balanced resample, classes interleaved so that any prefix stays balanced.
    limit: the first `limit` examples after a seeded shuffle (or of the balanced interleaving).
    """
    if name == "synthetic":
        book = TAOBAO4
        examples = generate_synthetic(split, seed, synthetic_size if split == "train" else synthetic_size // 5)
        stats = {
            "source": "synthetic",
            "rows_read": len(examples),
            "rows_used": len(examples),
            "rows_skipped": 0,
            "skipped": [],
        }
    elif name == "esci":
        book = ESCI
        fmap = parse_field_map(field_map, ESCI_FIELD_MAP)
        to_label = parse_label_map(label_map, book) if label_map else _esci_label
        examples, stats = _load_rows(name, path, split, fmap, to_label, book, skip_bad_rows)
    elif name in _EXTS:
        key = (rulebook or TAOBAO4.name).lower()
        if key not in RULEBOOKS:
            raise UserError(f"unknown rulebook {rulebook!r}: expected one of {sorted(RULEBOOKS)}")
        book = RULEBOOKS[key]
        fmap = parse_field_map(field_map)
        if label_map:
            to_label = parse_label_map(label_map, book)
        else:

            def to_label(raw, book=book):
                label = _canonical_label(raw, book) if isinstance(raw, str) else None
                if label is None:
                    raise _RowError(
                        "label", f"unknown label {raw!r} (expected one of {book.labels}, or give a label_map)"
                    )
                return label

        examples, stats = _load_rows(name, path, split, fmap, to_label, book, skip_bad_rows)
    else:
        raise UserError(f"unknown dataset {name!r}: expected synthetic, esci, jsonl, csv or parquet")

    if balanced:
        examples = balanced_sample(examples, book.labels, seed)
    elif limit is not None:
        order = list(range(len(examples)))
        random.Random(seed).shuffle(order)
        examples = [examples[i] for i in order]
    if limit is not None:
        examples = examples[:limit]
    stats["rows_after_sampling"] = len(examples)
    stats["label_counts"] = {label: sum(e.label == label for e in examples) for label in book.labels}
    return Dataset(examples, book, stats)


_announced = False


def load_for(args, split: str | None = None) -> Dataset:
    """`load_dataset` with a script's common data flags (dataset, data_path, split, seed or data_seed, limit, field_map,
    label_map, rulebook, skip_bad_rows). The default data, the synthetic world, is announced once."""
    global _announced
    if args.dataset == "synthetic" and not _announced and _main_process():
        print(
            "data: the synthetic rule world (the default). ESCI: --dataset esci --data-path DIR; your own file: "
            "--dataset jsonl --data-path FILE (docs/DATA.md)"
        )
        _announced = True
    seed = args.seed if args.data_seed is None else args.data_seed
    return load_dataset(
        args.dataset,
        split or args.split,
        args.data_path,
        seed=seed,
        limit=args.limit,
        field_map=args.field_map,
        label_map=args.label_map,
        rulebook=args.rulebook,
        skip_bad_rows=args.skip_bad_rows,
    )


def balanced_sample(examples: list[Example], labels: tuple[str, ...], seed: int) -> list[Example]:
    """Downsample every non-empty class to the smallest one (seeded); classes are interleaved in
    `labels` order, so a prefix of the result is balanced too. Labels outside `labels` are dropped."""
    rng = random.Random(seed)
    groups = [[e for e in examples if e.label == label] for label in labels]
    groups = [g for g in groups if g]
    if not groups:
        return []
    n = min(len(g) for g in groups)
    picks = [rng.sample(g, n) for g in groups]
    return [pick[i] for i in range(n) for pick in picks]


# =====================================================================================================
# Prompts
# =====================================================================================================
def balanced_order(examples: list[Example], labels: tuple[str, ...], seed: int) -> list[int]:
    """One epoch of example indices (as many as there are examples) in which the gold labels take turns
    in a shuffled round, so each comes equally often: a label's examples are drawn without replacement
    and reshuffled when used up (minority examples repeat, majority ones are subsampled)."""
    rng = random.Random(seed)
    pools = {label: [i for i, e in enumerate(examples) if e.label == label] for label in labels}
    present = [label for label in labels if pools[label]]
    queues: dict[str, list[int]] = {label: [] for label in present}
    order: list[int] = []
    while len(order) < len(examples):
        turn = list(present)
        rng.shuffle(turn)
        for label in turn:
            if not queues[label]:
                queues[label] = list(pools[label])
                rng.shuffle(queues[label])
            order.append(queues[label].pop())
    return order[: len(examples)]


def item_text(example: Example) -> str:
    """Compact item lines: title, brand, color, other attributes, bullets, description (empty ones left out).
    The long free texts come last, so truncation by a token budget cuts them first."""
    lines = [" ".join(example.title.split())]
    if example.brand:
        lines.append(f"Brand: {example.brand}")
    if example.color:
        lines.append(f"Color: {example.color}")
    for key, value in example.attributes.items():
        lines.append(f"{key.replace('_', ' ').capitalize()}: {value}")
    bullets = [" ".join(b.split()) for b in example.bullets.split("\n") if b.strip()]
    if bullets:
        lines.append("Bullets: " + "; ".join(bullets))
    if example.description.strip():
        lines.append("Description: " + " ".join(example.description.split()))
    return "\n".join(lines)


_item_text = item_text  # build_messages has a parameter of the same name


@functools.lru_cache(maxsize=None)
def system_prompt(rulebook: Rulebook, order: str = "label_first") -> str:
    """Task, labels best first, criteria with their questions, rules, and the format with the allowed
    values as placeholders (each value list is shown once, to keep the prompt short for CPU training)."""
    lines = [
        f"Judge a shopping item's relevance to a search query. Labels, best first: {', '.join(rulebook.labels)}.",
        "Criteria:",
    ]
    lines += [f"- {c.name}: {c.question}" for c in rulebook.criteria]
    values = {v for c in rulebook.criteria for v in c.values}
    if "unstated" in values:
        lines.append("Judge what the item states. unstated: the item does not say; n/a: the query does not ask.")
    elif "n/a" in values:
        lines.append("n/a: the query does not ask.")
    lines.append("Rules, first match wins:")
    lines += [f"{i}. {rule}" for i, rule in enumerate(rulebook.rules, 1)]
    placeholder = format_output(
        "LABEL", {c.name: "|".join(c.values) for c in rulebook.criteria}, "a short reason", rulebook, order
    )
    lines.append("Answer exactly in this format, one value each:\n" + placeholder)
    return "\n".join(lines)


def build_messages(
    example: Example,
    rulebook: Rulebook,
    order: str = "label_first",
    item_text: str | None = None,
    guidance: str | None = None,
) -> list[dict]:
    text = item_text if item_text is not None else _item_text(example)
    user = f"Query: {example.query}\nItem: {text}"
    if example.context:
        user += f"\nContext: {example.context}"
    if guidance:
        user += f"\n\nGuidance: {guidance}"
    return [{"role": "system", "content": system_prompt(rulebook, order)}, {"role": "user", "content": user}]


MAX_QUERY_TOKENS = 64  # queries are short; a longer one is cut like an item text, never silently kept


def _cut(tokenizer, text: str, budget: int) -> tuple[str, bool]:
    """The text, or its first `budget` tokens marked ' ...' when it is longer."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) <= budget:
        return text, False
    return tokenizer.decode(ids[:budget]) + " ...", True


def encode_prompt(
    tokenizer,
    example: Example,
    rulebook: Rulebook,
    order: str = "label_first",
    max_item_tokens: int = 256,
    guidance: str | None = None,
) -> tuple[list[int], bool]:
    """Chat-template prompt ids and whether anything was cut. The explicit truncation rule: the item text
    and the context are each cut at `max_item_tokens` tokens, the query at MAX_QUERY_TOKENS."""
    text, cut_item = _cut(tokenizer, item_text(example), max_item_tokens)
    query, cut_query = _cut(tokenizer, example.query, MAX_QUERY_TOKENS)
    context, cut_context = _cut(tokenizer, example.context, max_item_tokens) if example.context else ("", False)
    if cut_query or cut_context:
        example = dataclasses.replace(example, query=query, context=context)
    messages = build_messages(example, rulebook, order, item_text=text, guidance=guidance)
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if not isinstance(out, list):  # transformers 5 returns a BatchEncoding
        out = out["input_ids"]
    return list(out), cut_item or cut_query or cut_context


# =====================================================================================================
# SFT targets
# =====================================================================================================
# For unknown gold values of real data: per label, the values in order of plausibility. The fill is
# the cheapest combination (sum of ranks) that the rulebook decides as the gold label.
_PREFERENCES = {
    "taobao4": {
        "category": {
            "Excellent": ("match",),
            "Related": ("related", "match"),
            "Mismatch": ("match", "related"),
            "Irrelevant": ("mismatch",),
        },
        "brand": {"Related": ("n/a", "match", "unstated"), "Mismatch": ("n/a", "conflict", "match")},
        "color": {"Related": ("n/a", "match", "unstated"), "Mismatch": ("n/a", "conflict", "match")},
        "specs": {"Related": ("n/a", "match", "unstated"), "Mismatch": ("n/a", "conflict", "match")},
        "negation": {"Mismatch": ("n/a", "satisfied", "violated")},
    },
    "esci": {
        "product_type": {
            "Exact": ("same",),
            "Substitute": ("same", "substitute"),
            "Complement": ("complement",),
            "Irrelevant": ("different",),
        },
        "specs": {
            "Exact": ("met",),
            "Substitute": ("unmet", "met"),
            "Complement": ("unmet",),
            "Irrelevant": ("unmet",),
        },
        "brand": {},
    },
}


@functools.lru_cache(maxsize=4096)
def _fill(rulebook: Rulebook, label: str, known: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    prefs = _PREFERENCES.get(rulebook.name, {})
    known_d = dict(known)
    options = []
    for c in rulebook.criteria:
        if known_d.get(c.name, UNKNOWN) in c.values:
            # a known value is kept unless it contradicts the label (then the cheapest fix wins)
            options.append([(known_d[c.name], 0)] + [(v, 100) for v in c.values if v != known_d[c.name]])
        else:
            preferred = prefs.get(c.name, {}).get(label, ("n/a",) if "n/a" in c.values else ())
            ranked = list(preferred) + [v for v in c.values if v not in preferred]
            options.append([(v, r) for r, v in enumerate(ranked)])
    best = None
    for combo in itertools.product(*options):
        values = {c.name: v for c, (v, _) in zip(rulebook.criteria, combo)}
        if rulebook.decide(values) != label:
            continue
        ranks = tuple(r for _, r in combo)
        key = (sum(ranks), ranks)
        if best is None or key < best[0]:
            best = (key, values)
    return tuple(best[1].items())


def fill_criteria(example: Example, rulebook: Rulebook) -> dict[str, str]:
    """The gold criteria with every unknown value replaced by the most plausible rule-adherent one."""
    if example.label not in rulebook.labels:
        raise ValueError(f"label {example.label!r} is not one of {rulebook.labels}")
    known = tuple((n, example.criteria.get(n, UNKNOWN)) for n in rulebook.criterion_names)
    return dict(_fill(rulebook, example.label, known))


def _paren(text: str | None) -> str:
    return f" ({text})" if text else ""


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _agree(names: list[str], singular: str, plural: str) -> str:
    # "the brand conflicts", "the specs conflict", "the brand and color conflict"
    return singular if len(names) == 1 and names[0] != "specs" else plural


def _reason_taobao4(c: dict[str, str], ev: dict[str, str]) -> str:
    if c["category"] == "mismatch":
        return f"A different product type{_paren(ev.get('category'))}, so it does not serve the query."
    lead = (
        "Same product type" if c["category"] == "match" else f"Only a related product type{_paren(ev.get('category'))}"
    )
    attrs = ("brand", "color", "specs")

    def evidence(names):
        return _paren("; ".join(ev[a] for a in names if a in ev))

    conflicts = [a for a in attrs if c[a] == "conflict"]
    problems = []
    if conflicts:
        problems.append(
            f"the {_join(conflicts)} {_agree(conflicts, 'conflicts', 'conflict')} with the query{evidence(conflicts)}"
        )
    if c["negation"] == "violated":
        problems.append(f"it has what the query excludes{_paren(ev.get('negation'))}")
    if problems:
        return f"{lead}, but {' and '.join(problems)}."
    unstated = [a for a in attrs if c[a] == "unstated"]
    if unstated:
        return f"{lead}, but the item does not state its {_join(unstated)}{evidence(unstated)}."
    matched = [a for a in attrs if c[a] == "match"]
    good = []
    if matched:
        good.append(f"the requested {_join(matched)} {_agree(matched, 'matches', 'match')}{evidence(matched)}")
    if c["negation"] == "satisfied":
        good.append(f"it avoids what the query excludes{_paren(ev.get('negation'))}")
    if c["category"] == "related":
        return f"{lead}." if not good else f"{lead}, though {' and '.join(good)}."
    return f"{lead}, and {' and '.join(good)}." if good else f"{lead}, and the query asks for nothing more."


def _reason_esci(c: dict[str, str], ev: dict[str, str]) -> str:
    kind = c["product_type"]
    if kind == "different":
        return "A different kind of product that does not serve the query."
    if kind == "complement":
        return "Not the queried product, but something used together with it."
    lead = "The queried product type" if kind == "same" else "A functional substitute for the queried product"
    problems = []
    if c["specs"] == "unmet":
        problems.append("a specification in the query is not met")
    if c["brand"] == "conflict":
        problems.append("the brand differs from the one in the query")
    text = (
        f"{lead}, but {' and '.join(problems)}."
        if problems
        else (f"{lead}, and every specification in the query is met." if kind == "same" else f"{lead}.")
    )
    if c["brand"] == "match":
        text += f" The brand matches the query{_paren(ev.get('brand'))}."
    return text


def sft_reason(example: Example, criteria: dict[str, str], rulebook: Rulebook) -> str:
    evidence = dict(example.evidence)
    if rulebook.name == "esci" and example.brand and "brand" not in evidence:
        evidence["brand"] = example.brand
    if rulebook.name == "taobao4":
        return _reason_taobao4(criteria, evidence)
    if rulebook.name == "esci":
        return _reason_esci(criteria, evidence)
    return "Criteria: " + ", ".join(f"{k} {v}" for k, v in criteria.items()) + "."


def sft_target(example: Example, rulebook: Rulebook, order: str = "label_first") -> str:
    """The rule-adherent answer: gold label, gold criteria (unknown ones filled plausibly), templated reason."""
    criteria = fill_criteria(example, rulebook)
    return format_output(example.label, criteria, sft_reason(example, criteria, rulebook), rulebook, order)


def encode_sft(
    tokenizer, example: Example, rulebook: Rulebook, order: str = "label_first", max_item_tokens: int = 256
) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated): labels are -100 over the prompt and the target ids over the completion."""
    prompt_ids, truncated = encode_prompt(tokenizer, example, rulebook, order, max_item_tokens)
    target_ids = tokenizer.encode(sft_target(example, rulebook, order), add_special_tokens=False)
    target_ids = target_ids + [tokenizer.convert_tokens_to_ids(tokenizer.eos_token)]
    return prompt_ids + target_ids, [-100] * len(prompt_ids) + target_ids, truncated
