"""Imperfect ShapeWorld shapes, the way a diffusion model draws them: a test bench for the judge.

The renderer (``world.py``) draws pixel-exact shapes; a model draws them with soft edges, a shifted apex,
rounded corners and the odd stray pixel. :func:`imperfect_image` draws one such shape on black, and
:func:`error_table` measures how often the judge (:func:`alignrl.shapes.judge.detect`) names it right.

How one shape is drawn: its outline (floating-point coordinates, random sub-pixel position, side 7-11 px
like the renderer's ``MIN_SIDE``/``MAX_SIDE``) is filled at 8x resolution and box-averaged down, which
gives each pixel its covered fraction; a Gaussian blur softens the edge; a gain in [0.9, 1.4] and a
little noise (a model's output saturates inside the shape and is never exactly black outside) scale
it; the pixel is that fraction of the colour. The judge's colour tolerance then re-thresholds it at
about 0.45-0.7 coverage, so the edge moves in or out by up to a pixel, as a model's does.

Distortions (``DISTORTIONS``), each with the mild blur (sigma <= 0.4 px) unless it says otherwise:

- every shape: ``clean``; ``small`` (side 5-7 px, below the renderer's 7: the shipped model draws
  some that small); ``blurred`` (sigma 0.5-0.9 px, corners come out rounded and apexes blunt);
  ``stray`` (one or two full-colour pixels stuck to the outline, apart or as a 2-pixel spur);
- triangle: ``lopsided`` (apex shifted sideways by 30-100% of half the base: scalene up to a right
  triangle); ``truncated`` (the apex cut flat, top edge 12-30% of the base); ``rotated`` (any angle:
  pointing down or sideways). The renderer, hence the pretraining data, holds only upright triangles,
  so the shipped model draws upright ones; a policy trained by RL may drift, and a triangle pointing down
  is still a triangle, so the judge is held to it;
- circle: ``ellipse`` (squashed to an aspect of 0.75-0.9, any orientation);
- square: ``rounded`` (corner radius 10-20% of the side); ``rotated`` (5-20 degrees either way).

Apex shifts beyond half the base, truncations past 30% and corner radii past 20% are left out on
purpose: there the shape stops being clearly one class (a triangle cut at half its height is a
trapezoid, a square rounded by half its side is a circle).

Measured (``error_table(n=1000, seed=2024)``, 18,000 shapes; "before" is the judge's previous
fill-ratio classifier, "after" the moment classifier of ``judge.classify_shape``): the share of shapes
not judged as exactly one object of the true shape and colour.

=========  ==========  ======  =====   =========  ==========  ======  =====
shape      distortion  before  after   shape      distortion  before  after
=========  ==========  ======  =====   =========  ==========  ======  =====
circle     clean        1.1%   0.1%    square     rounded      3.9%   0.5%
circle     small        3.1%   2.9%    square     rotated     96.1%   0.4%
circle     blurred      1.2%   0.1%    triangle   clean        4.4%   0.0%
circle     stray        7.6%   0.7%    triangle   small       37.5%   6.0%
circle     ellipse      0.9%   0.7%    triangle   blurred     28.5%   0.5%
square     clean        2.2%   0.0%    triangle   stray        4.2%   0.1%
square     small        6.3%   0.9%    triangle   lopsided     3.1%   0.0%
square     blurred      4.9%   0.8%    triangle   truncated   37.7%   0.0%
square     stray       88.1%   0.0%    triangle   rotated      9.5%   0.0%
=========  ==========  ======  =====   =========  ==========  ======  =====

5.8 of the 6.0 points left on small triangles are triangles under the judge's ``MIN_AREA`` (not
detected at all, before or after). Run ``python -m alignrl.shapes.imperfect --n 1000`` for the current
judge's column.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from alignrl.shapes.judge import COLOR_TOL
from alignrl.shapes.world import COLORS, MAX_SIDE, MIN_SIDE, SIZE

DISTORTIONS = {
    "circle": ("clean", "small", "blurred", "stray", "ellipse"),
    "square": ("clean", "small", "blurred", "stray", "rounded", "rotated"),
    "triangle": ("clean", "small", "blurred", "stray", "lopsided", "truncated", "rotated"),
}
SUPERSAMPLE = 8
SMALL_SIDE = 5  # the shipped model sometimes draws shapes below the renderer's MIN_SIDE


def _rotate(pts: np.ndarray, angle: float, center: tuple[float, float]) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    d = pts - np.asarray(center)
    return np.stack([c * d[:, 0] - s * d[:, 1], s * d[:, 0] + c * d[:, 1]], axis=1) + np.asarray(center)


def triangle_outline(cx: float, cy: float, base: float, height: float, apex_shift: float = 0.0,
                     top: float = 0.0, angle: float = 0.0) -> np.ndarray:
    """A triangle with a horizontal base, its apex ``apex_shift`` px right of the base's middle (left
    when negative), cut flat to a ``top`` px wide top edge when ``top`` > 0, turned by ``angle``
    radians; its bounding box centred on (cx, cy). (N, 2) array of (x, y) in pixels."""
    ax, y0, y1 = cx + apex_shift, cy - height / 2, cy + height / 2
    pts = [(ax - top / 2, y0), (ax + top / 2, y0), (cx + base / 2, y1), (cx - base / 2, y1)]
    pts = np.array(pts if top else [pts[0], pts[2], pts[3]], dtype=float)
    pts[:, 0] += cx - (pts[:, 0].min() + pts[:, 0].max()) / 2
    return _rotate(pts, angle, (cx, cy)) if angle else pts


def _outline(shape: str, distortion: str, rng: np.random.Generator, side: float,
             cx: float, cy: float) -> np.ndarray:
    """The shape's outline as an (N, 2) array of (x, y) in pixel units."""
    if shape == "triangle":
        shift = rng.choice([-1, 1]) * rng.uniform(0.3, 1.0) * side / 2 if distortion == "lopsided" else 0.0
        top = rng.uniform(0.12, 0.30) * side if distortion == "truncated" else 0.0
        angle = rng.uniform(math.radians(20), math.radians(340)) if distortion == "rotated" else 0.0
        return triangle_outline(cx, cy, side, side * rng.uniform(0.85, 1.05), shift, top, angle)
    if shape == "circle":
        t = np.linspace(0, 2 * math.pi, 96, endpoint=False)
        aspect = rng.uniform(0.75, 0.9) if distortion == "ellipse" else 1.0
        pts = np.stack([cx + side / 2 * np.cos(t), cy + aspect * side / 2 * np.sin(t)], axis=1)
        return _rotate(pts, rng.uniform(0, math.pi), (cx, cy)) if distortion == "ellipse" else pts
    if shape == "square":
        half = side / 2
        r = rng.uniform(0.10, 0.20) * side if distortion == "rounded" else 0.0
        pts = []
        for qx, qy, a0 in ((1, 1, 0.0), (-1, 1, 0.5), (-1, -1, 1.0), (1, -1, 1.5)):
            ccx, ccy = cx + qx * (half - r), cy + qy * (half - r)
            if r:
                for t in np.linspace(a0 * math.pi, (a0 + 0.5) * math.pi, 8):
                    pts.append((ccx + r * math.cos(t), ccy + r * math.sin(t)))
            else:
                pts.append((ccx, ccy))
        pts = np.array(pts, dtype=float)
        if distortion == "rotated":
            pts = _rotate(pts, rng.choice([-1, 1]) * math.radians(rng.uniform(5, 20)), (cx, cy))
        return pts
    raise ValueError(f"unknown shape {shape!r}; expected one of {sorted(DISTORTIONS)}")


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return a
    r = max(1, int(math.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    a = np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), 0, a)
    return np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), 1, a)


def coverage(outline: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Fraction of each pixel of a (size, size) canvas inside a polygon (pixel (i, j) spans [j, j+1) x [i, i+1))."""
    img = Image.new("L", (size * SUPERSAMPLE, size * SUPERSAMPLE), 0)
    ImageDraw.Draw(img).polygon([tuple(p) for p in outline * SUPERSAMPLE], fill=255)
    a = np.asarray(img, dtype=np.float64) / 255.0
    return a.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))


def paint(outline: np.ndarray, color: str, sigma: float = 0.0, gain: float = 1.0,
          canvas: np.ndarray | None = None) -> np.ndarray:
    """An outline filled in ``color`` onto ``canvas`` (a new black 32x32 image by default), without
    noise: each pixel is its covered fraction, blurred by ``sigma`` px and times ``gain`` (at most
    1), of the colour. (H, W, 3) uint8."""
    cov = np.clip(_blur(coverage(outline), sigma) * gain, 0.0, 1.0)
    out = np.round(cov[..., None] * np.asarray(COLORS[color], dtype=np.float64)).astype(np.uint8)
    return out if canvas is None else np.maximum(canvas, out)


def _add_strays(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Pixels to light up: one or two outside the mask, 4-adjacent to it (apart, or as a 2-pixel spur)."""
    h, w = mask.shape
    pad = np.pad(mask, 1)
    touching = (pad[:-2, 1:-1] | pad[2:, 1:-1] | pad[1:-1, :-2] | pad[1:-1, 2:]) & ~mask
    cand = np.argwhere(touching)
    extra = np.zeros_like(mask)
    y, x = cand[rng.integers(len(cand))]
    extra[y, x] = True
    if rng.random() < 0.5:  # a second stray elsewhere on the outline
        y, x = cand[rng.integers(len(cand))]
        extra[y, x] = True
    else:  # a 2-pixel spur: continue outward from the first
        for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            ny, nx = y + dy, x + dx
            if 0 <= ny < h and 0 <= nx < w and not mask[ny, nx] and not extra[ny, nx]:
                # outward: the pixel on the far side of (y, x) from the shape
                by, bx = y - dy, x - dx
                if 0 <= by < h and 0 <= bx < w and mask[by, bx]:
                    extra[ny, nx] = True
                    break
    return extra


def imperfect_image(shape: str, distortion: str, rng: np.random.Generator, color: str | None = None,
                    center: tuple[float, float] | None = None, canvas: np.ndarray | None = None) -> np.ndarray:
    """One imperfect ``shape`` drawn onto ``canvas`` (a new black 32x32 image by default); (H, W, 3) uint8."""
    if distortion not in DISTORTIONS.get(shape, ()):
        raise ValueError(f"unknown distortion {distortion!r} for {shape!r}; expected one of "
                         f"{DISTORTIONS.get(shape, sorted(DISTORTIONS))}")
    color = color or str(rng.choice(list(COLORS)))
    side = rng.uniform(SMALL_SIDE, MIN_SIDE) if distortion == "small" else rng.uniform(MIN_SIDE, MAX_SIDE + 1)
    cx, cy = center if center is not None else (SIZE / 2 + rng.uniform(-4, 4), SIZE / 2 + rng.uniform(-4, 4))
    cov = coverage(_outline(shape, distortion, rng, side, cx, cy))
    sigma = rng.uniform(0.5, 0.9) if distortion == "blurred" else rng.uniform(0.0, 0.4)
    cov = np.clip(_blur(cov, sigma) * rng.uniform(0.9, 1.4), 0.0, 1.0)
    rgb = np.asarray(COLORS[color], dtype=np.float64)
    img = cov[..., None] * rgb
    if distortion == "stray":
        lit = np.all(np.abs(np.round(img) - rgb) <= COLOR_TOL, axis=-1)  # what the judge will see
        img[_add_strays(lit, rng)] = rgb
    img = img + rng.normal(0.0, 4.0, img.shape)
    out = np.clip(np.round(img), 0, 255).astype(np.uint8)
    if canvas is not None:
        return np.maximum(canvas, out)
    return out


def error_table(detect=None, n: int = 200, seed: int = 0) -> dict:
    """Per (shape, distortion): the fraction of ``n`` imperfect shapes the judge gets wrong.

    Wrong means anything but exactly one detection, of the true shape and colour. ``detect`` (an
    image -> detections function like :func:`alignrl.shapes.judge.detect`, the default) is the judge
    measured. Returns ``{(shape, distortion): {"error": f, "as": {what it said instead: count}}}``.
    """
    if detect is None:
        from alignrl.shapes.judge import detect
    rng = np.random.default_rng(seed)
    table = {}
    for shape, kinds in DISTORTIONS.items():
        for kind in kinds:
            wrong, called = 0, {}
            for _ in range(n):
                color = str(rng.choice(list(COLORS)))
                dets = detect(imperfect_image(shape, kind, rng, color=color))
                if len(dets) == 1 and dets[0].shape == shape and dets[0].color == color:
                    continue
                wrong += 1
                label = dets[0].shape if len(dets) == 1 else f"{len(dets)} objects"
                called[label] = called.get(label, 0) + 1
            table[(shape, kind)] = {"error": wrong / n, "as": called}
    return table


def format_table(*tables: dict, names: tuple[str, ...] = ()) -> str:
    """Markdown rows: shape, distortion, then each table's error rate in percent."""
    names = names or tuple(f"run {i}" for i in range(len(tables)))
    lines = ["| shape | distortion | " + " | ".join(names) + " |",
             "|---|---|" + "---|" * len(tables)]
    for key in tables[0]:
        lines.append(f"| {key[0]} | {key[1]} | "
                     + " | ".join(f"{100 * t[key]['error']:.1f}%" for t in tables) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="error rate of the ShapeWorld judge on imperfect shapes")
    p.add_argument("--n", type=int, default=300, help="shapes per (shape, distortion)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    t = error_table(n=args.n, seed=args.seed)
    print(format_table(t, names=("judge",)))
    for key, row in t.items():
        if row["as"]:
            print(key, row["as"])
