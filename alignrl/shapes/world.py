"""ShapeWorld: a miniature GenEval of coloured shapes on black, with prompts, metadata and a renderer.

Shapes circle/square/triangle in red/green/blue/yellow, counts 1-4, relations left/right/above/below, at
32x32. Prompts cover GenEval's six tags; each carries metadata the judge reads:

    {"tag": "color_attr",
     "objects": [{"shape": "square", "color": "red", "count": null}, {"shape": "circle", "color": "blue", ...}],
     "relation": null}                       # or {"type": "left of", "a": 0, "b": 1} for tag "position"

Colour words may appear on the objects of every tag but ``single_object`` (``two red circles``, ``a yellow
square left of a circle``), so every other tag has compositions that can be held out:

- colour-shape pairs (``HELD_OUT_COLOR_SHAPE``): never seen in training, in any tag;
- pairings (``HELD_OUT_PAIRINGS``): two coloured objects each seen in training, never together;
- coloured counts (``HELD_OUT_COUNTS``): a colour-shape pair and a count, each seen, never together.

``sample_metadata`` draws fresh training metadata from the whole world minus those (pretraining sees a new
composition at every step); ``eval_set("in_dist")`` and ``eval_set("held_out")`` are the two evaluation sets:
up to ``EVAL_PER_TAG`` prompts per tag each, held-out prompts spread over the held-out compositions (no tag is one
unseen pair). ``single_object`` prompts (``a circle``) have nothing to hold out and appear in both sets; where the
world holds fewer prompts of a tag than ``EVAL_PER_TAG`` (``colors`` holds 12 in all, 3 of them held out), every one
is used and the reports give the counts.

The renderer draws a random image that satisfies a prompt (pretraining data): shapes of 7-11 px, at
least 2 px apart, uncoloured objects in random colours, relations with a clear margin.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32
SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
RELATIONS = ("left of", "right of", "above", "below")
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")

HELD_OUT_COLOR_SHAPE = {("red", "triangle"), ("green", "circle"), ("blue", "square")}
HELD_OUT_PAIRINGS = {frozenset({("yellow", "circle"), ("red", "square")}),
                     frozenset({("green", "triangle"), ("yellow", "square")}),
                     frozenset({("blue", "circle"), ("green", "square")})}
HELD_OUT_COUNTS = {("yellow", "circle", 3), ("green", "triangle", 4), ("red", "square", 2), ("blue", "triangle", 3)}
EVAL_PER_TAG = 40
SPLITS = ("train", "in_dist", "held_out")

MIN_SIDE, MAX_SIDE, GAP = 7, 11, 2


def plural(shape: str, n: int) -> str:
    return shape if n == 1 else shape + "s"


def _obj(shape, color=None, count=None):
    return {"shape": shape, "color": color, "count": count}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def describe(obj: dict) -> str:
    words = ([obj["color"]] if obj["color"] else []) + [obj["shape"]]
    return f"{_article(words[0])} {' '.join(words)}"


def _counted(obj: dict) -> str:
    words = [COUNT_WORDS[obj["count"]]] + ([obj["color"]] if obj["color"] else []) + [plural(obj["shape"], obj["count"])]
    return " ".join(words)


def make_prompt(tag: str, objects: list[dict], relation: dict | None = None) -> dict:
    """The prompt text and metadata of a composition (the one grammar of the world)."""
    if tag == "single_object" or tag == "colors":
        text = describe(objects[0])
    elif tag == "counting":
        text = _counted(objects[0])
    elif tag == "position":
        text = f"{describe(objects[0])} {relation['type']} {describe(objects[1])}"
    else:  # two_object, color_attr
        text = f"{describe(objects[0])} and {describe(objects[1])}"
    return {"prompt": text, "tag": tag, "objects": objects, "relation": relation}


COLOR_OPTIONS = (None, *COLORS)


def all_prompts() -> list[dict]:
    """Every prompt of the world with its metadata (``{"prompt": ..., "tag": ..., ...}``)."""
    out = []
    for s in SHAPES:
        out.append(make_prompt("single_object", [_obj(s)]))
    for a, b in itertools.permutations(SHAPES, 2):
        for ca, cb in itertools.product(COLOR_OPTIONS, repeat=2):
            out.append(make_prompt("two_object", [_obj(a, ca), _obj(b, cb)]))
    for s in SHAPES:
        for n in range(2, 5):
            for c in COLOR_OPTIONS:
                out.append(make_prompt("counting", [_obj(s, c, n)]))
    for c in COLORS:
        for s in SHAPES:
            out.append(make_prompt("colors", [_obj(s, c)]))
    for a, b in itertools.permutations(SHAPES, 2):
        for rel in RELATIONS:
            for ca, cb in itertools.product(COLOR_OPTIONS, repeat=2):
                out.append(make_prompt("position", [_obj(a, ca), _obj(b, cb)], {"type": rel, "a": 0, "b": 1}))
    for (c1, s1), (c2, s2) in itertools.permutations(itertools.product(COLORS, SHAPES), 2):
        if s1 != s2:
            out.append(make_prompt("color_attr", [_obj(s1, c1), _obj(s2, c2)]))
    return out


def held_out_reasons(meta: dict) -> list[str]:
    """Which held-out compositions a prompt contains (empty: it is a training composition)."""
    objs = meta["objects"]
    reasons = [f"pair:{o['color']} {o['shape']}" for o in objs if (o["color"], o["shape"]) in HELD_OUT_COLOR_SHAPE]
    if len(objs) == 2 and all(o["color"] for o in objs):
        pairing = frozenset((o["color"], o["shape"]) for o in objs)
        if pairing in HELD_OUT_PAIRINGS:
            reasons.append("pairing:" + " + ".join(sorted(f"{c} {s}" for c, s in pairing)))
    reasons += [f"count:{o['count']} {o['color']} {o['shape']}" for o in objs
                if o["count"] and (o["color"], o["shape"], o["count"]) in HELD_OUT_COUNTS]
    return reasons


def is_held_out(meta: dict) -> bool:
    return bool(held_out_reasons(meta))


def sample_metadata(rng: random.Random, color_prob: float = 2 / 3, held_out: bool = False) -> dict:
    """A fresh composition of the world (a tag drawn uniformly, colour words on each object with ``color_prob``),
    drawn until it is a training composition (or, with ``held_out``, a held-out one)."""
    tag = rng.choice(TAGS)  # first, so rejected draws do not tilt the tag mix
    while True:
        color = lambda: rng.choice(list(COLORS)) if rng.random() < color_prob else None  # noqa: E731
        if tag == "single_object":
            meta = make_prompt(tag, [_obj(rng.choice(SHAPES))])
        elif tag == "colors":
            meta = make_prompt(tag, [_obj(rng.choice(SHAPES), rng.choice(list(COLORS)))])
        elif tag == "counting":
            meta = make_prompt(tag, [_obj(rng.choice(SHAPES), color(), rng.randint(2, 4))])
        else:
            a, b = rng.sample(SHAPES, 2)
            if tag == "color_attr":
                objects = [_obj(a, rng.choice(list(COLORS))), _obj(b, rng.choice(list(COLORS)))]
            else:
                objects = [_obj(a, color()), _obj(b, color())]
            rel = {"type": rng.choice(RELATIONS), "a": 0, "b": 1} if tag == "position" else None
            meta = make_prompt(tag, objects, rel)
        if tag == "single_object" or is_held_out(meta) == held_out:
            return meta


def _spread(rows: list[dict], k: int, rng: random.Random) -> list[dict]:
    """Up to ``k`` rows, drawn round-robin over the held-out compositions they contain (so one unseen pair or
    pairing never makes up a tag), shuffled within each."""
    buckets: dict[str, list[dict]] = {}
    for r in rows:
        buckets.setdefault(held_out_reasons(r)[0] if held_out_reasons(r) else "", []).append(r)
    for b in buckets.values():
        rng.shuffle(b)
    order = sorted(buckets)
    out = []
    while len(out) < k and any(buckets[b] for b in order):
        for b in order:
            if buckets[b] and len(out) < k:
                out.append(buckets[b].pop())
    return out


def eval_set(split: str, per_tag: int = EVAL_PER_TAG, seed: int = 0, fill: bool = False) -> list[dict]:
    """The ``in_dist`` (training compositions) or ``held_out`` evaluation prompts: up to ``per_tag`` per tag,
    seeded; held-out ones spread over the held-out compositions. ``single_object`` prompts are in both.

    ``fill``: a tag with fewer prompts repeats them (in turn) to ``per_tag`` rows, so every tag is scored on as
    many images (each row gets its own noise); its distinct prompts stay fewer, and confidence intervals
    resample prompts, not rows."""
    if split not in ("in_dist", "held_out"):
        raise ValueError(f"split must be in_dist or held_out, got {split!r}")
    rng = random.Random(seed)
    rows = []
    for tag in TAGS:
        group = [m for m in all_prompts() if m["tag"] == tag and
                 (tag == "single_object" or is_held_out(m) == (split == "held_out"))]
        picked = _spread(group, per_tag, rng)
        rows += [picked[i % len(picked)] for i in range(per_tag)] if fill and picked else picked
    return rows


def prompt_split(split: str, per_tag: int | None = None, seed: int = 0) -> list[dict]:
    """Prompts of a split: ``train`` (every training composition), ``in_dist`` or ``held_out`` (the evaluation
    sets, ``per_tag`` prompts per tag, default ``EVAL_PER_TAG``); ``eval`` means ``held_out``."""
    if split == "eval":
        split = "held_out"
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if split != "train":
        return eval_set(split, per_tag or EVAL_PER_TAG, seed)
    rows = [m for m in all_prompts() if m["tag"] == "single_object" or not is_held_out(m)]
    if per_tag:
        rng = random.Random(seed)
        rows = [r for tag in TAGS for r in _spread([m for m in rows if m["tag"] == tag], per_tag, rng)]
    return rows


# ----------------------------------------------------------------------------------------- rendering
@dataclass
class Placed:
    shape: str
    color: str
    x0: int
    y0: int
    side: int

    @property
    def center(self) -> tuple[float, float]:
        return self.x0 + self.side / 2, self.y0 + self.side / 2


def draw_shape(draw: ImageDraw.ImageDraw, p: Placed) -> None:
    x0, y0, s = p.x0, p.y0, p.side
    rgb = COLORS[p.color]
    if p.shape == "square":
        draw.rectangle([x0, y0, x0 + s - 1, y0 + s - 1], fill=rgb)
    elif p.shape == "circle":
        draw.ellipse([x0, y0, x0 + s - 1, y0 + s - 1], fill=rgb)
    else:  # upright isosceles triangle
        draw.polygon([(x0 + (s - 1) / 2, y0), (x0, y0 + s - 1), (x0 + s - 1, y0 + s - 1)], fill=rgb)


def _fits(p: Placed, others: list[Placed]) -> bool:
    for o in others:
        if not (p.x0 + p.side + GAP <= o.x0 or o.x0 + o.side + GAP <= p.x0
                or p.y0 + p.side + GAP <= o.y0 or o.y0 + o.side + GAP <= p.y0):
            return False
    return True


def _relation_holds(rel: str, a: Placed, b: Placed, margin: float) -> bool:
    (ax, ay), (bx, by) = a.center, b.center
    if rel == "left of":
        return bx - ax >= margin and abs(ay - by) <= abs(bx - ax)
    if rel == "right of":
        return ax - bx >= margin and abs(ay - by) <= abs(bx - ax)
    if rel == "above":
        return by - ay >= margin and abs(ax - bx) <= abs(by - ay)
    if rel == "below":
        return ay - by >= margin and abs(ax - bx) <= abs(by - ay)
    raise ValueError(f"unknown relation {rel!r}")


def _layout(meta: dict, rng: random.Random) -> list[Placed] | None:
    specs = []
    for obj in meta["objects"]:
        for _ in range(obj["count"] or 1):
            specs.append((obj["shape"], obj["color"] or rng.choice(list(COLORS))))
    placed: list[Placed] = []
    for shape, color in specs:
        for _ in range(200):
            side = rng.randint(MIN_SIDE, MAX_SIDE)
            p = Placed(shape, color, rng.randint(0, SIZE - side), rng.randint(0, SIZE - side), side)
            if _fits(p, placed):
                placed.append(p)
                break
        else:
            return None
    rel = meta.get("relation")
    if rel and not _relation_holds(rel["type"], placed[rel["a"]], placed[rel["b"]], margin=4):
        return None
    return placed


def render(meta: dict, rng: random.Random) -> Image.Image:
    """A random 32x32 RGB image that satisfies the prompt's metadata."""
    for _ in range(1000):
        placed = _layout(meta, rng)
        if placed is not None:
            img = Image.new("RGB", (SIZE, SIZE), (0, 0, 0))
            draw = ImageDraw.Draw(img)
            for p in placed:
                draw_shape(draw, p)
            return img
    raise RuntimeError(f"could not lay out {meta['prompt']!r}")


def render_batch(metas: list[dict], seed: int) -> np.ndarray:
    """(B, 32, 32, 3) uint8, reproducible for a given seed."""
    rng = random.Random(seed)
    return np.stack([np.asarray(render(m, rng)) for m in metas])
