"""ShapeWorld: a miniature GenEval of coloured shapes on black, with prompts, metadata and a renderer.

Shapes circle/square/triangle in red/green/blue/yellow, counts 1-4, relations left/right/above/below, at
32x32. Prompts cover GenEval's six tags; each carries metadata the judge reads:

    {"tag": "color_attr",
     "objects": [{"shape": "square", "color": "red", "count": null}, {"shape": "circle", "color": "blue", ...}],
     "relation": null}                       # or {"type": "left of", "a": 0, "b": 1} for tag "position"

The train and eval prompt sets are disjoint compositions: colour-shape pairs in HELD_OUT_COLOR_SHAPE,
shape pairs in HELD_OUT_SHAPE_PAIRS and counts in HELD_OUT_COUNTS appear only in eval prompts. The three
single-object prompts are the one exception (there is nothing to hold out) and appear in both.

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
HELD_OUT_SHAPE_PAIRS = {frozenset(("square", "triangle"))}
HELD_OUT_COUNTS = {("circle", 3), ("square", 4), ("triangle", 2)}

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


def all_prompts() -> list[dict]:
    """Every prompt of the world with its metadata (``{"prompt": ..., "tag": ..., ...}``)."""
    out = []

    def add(tag, objects, text, relation=None):
        out.append({"prompt": text, "tag": tag, "objects": objects, "relation": relation})

    for s in SHAPES:
        add("single_object", [_obj(s)], f"a {s}")
    for a, b in itertools.permutations(SHAPES, 2):
        add("two_object", [_obj(a), _obj(b)], f"a {a} and a {b}")
    for s in SHAPES:
        for n in range(2, 5):
            add("counting", [_obj(s, count=n)], f"{COUNT_WORDS[n]} {plural(s, n)}")
    for c in COLORS:
        for s in SHAPES:
            add("colors", [_obj(s, c)], f"a {c} {s}")
    for a, b in itertools.permutations(SHAPES, 2):
        for rel in RELATIONS:
            add("position", [_obj(a), _obj(b)], f"a {a} {rel} a {b}", {"type": rel, "a": 0, "b": 1})
    for (c1, s1), (c2, s2) in itertools.permutations(itertools.product(COLORS, SHAPES), 2):
        if s1 == s2:
            continue
        add("color_attr", [_obj(s1, c1), _obj(s2, c2)], f"a {c1} {s1} and a {c2} {s2}")
    return out


def is_held_out(meta: dict) -> bool:
    objs = meta["objects"]
    if any((o["color"], o["shape"]) in HELD_OUT_COLOR_SHAPE for o in objs if o["color"]):
        return True
    if len(objs) == 2 and frozenset(o["shape"] for o in objs) in HELD_OUT_SHAPE_PAIRS:
        return True
    return any((o["shape"], o["count"]) in HELD_OUT_COUNTS for o in objs if o["count"])


def prompt_split(split: str, per_tag: int | None = None, seed: int = 0) -> list[dict]:
    """The train or eval prompts (held-out compositions only in eval; single-object prompts in both).

    ``per_tag`` caps the prompts per tag (a seeded, reproducible subset).
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be train or eval, got {split!r}")
    rows = [m for m in all_prompts()
            if m["tag"] == "single_object" or is_held_out(m) == (split == "eval")]
    if per_tag:
        rng = random.Random(seed)
        capped = []
        for tag in TAGS:
            group = [m for m in rows if m["tag"] == tag]
            capped += group if len(group) <= per_tag else rng.sample(group, per_tag)
        rows = capped
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
