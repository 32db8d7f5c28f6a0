"""The exact ShapeWorld judge (reward ``shapes_geneval``).

From an image and a prompt's metadata it decides each sub-condition by colour masks, connected
components and shape moments:

- detection: a pixel belongs to colour c when it is within ``COLOR_TOL`` of c's RGB on every channel
  (saturated colours on black are far apart); 4-connected components of each mask of at least
  ``MIN_AREA`` pixels are objects;
- shape (:func:`classify_shape`): a component of at least ``DESPUR_MIN_AREA`` pixels first loses its
  spur pixels (fewer than two 4-neighbours; two passes: a stray pixel or a 2-pixel spur stuck to the
  outline), a smaller one keeps them (there a 1-pixel tip is part of the shape). The pixels are then
  affine-normalised (centred, whitened by their covariance), which maps every triangle (lopsided,
  scalene, truncated a little, pointing any way) near an equilateral one, every ellipse to a disk and
  every rectangle to a square, and two moments of the result decide (:func:`shape_moments`): 3-fold
  symmetry of at least ``TRIANGLE_MIN`` is a triangle; else 4-fold symmetry of at least
  ``SQUARE_MIN``, with the corners on the diagonals, is a square; else a circle.
- sub-conditions, GenEval style: every object clause needs its shape present (with its colour when the
  prompt names one); a counted clause needs exactly that many; a relation needs its centroids ordered
  with a margin.

``strict`` is 1 when every sub-condition holds, ``partial`` is the fraction that hold (the training
reward, as Flow-GRPO uses GenEval's).

Counting in partial credit: a counted clause ("three triangles") is two sub-conditions, the shape
present (at least one) and exactly that many, so the clause earns 0 with none drawn, 1/2 with any
other count and 1 with the right one. Kept on purpose: strict counting is GenEval's (its include
clause asks for at least N, an exclude clause for fewer than N + 1, i.e. exactly N), and every
sub-condition stays a yes/no check, so ``partial`` is a fraction in [0, 1]. Flow-GRPO's GenEval
reward server grades the count instead, 1 - |N - found| / N: that credits near misses (2 of 3: 0.67)
but pays over-drawing as much as under-drawing (4 of 3: 0.67) and goes below 0 past 2N; a graded
count would also rescale every counting reward measured so far (docs/benchmarks.md).

Shape rules, and why the descriptor changed: a triangle in any orientation is a triangle (the renderer
draws them upright, so the shipped model does; a triangle pointing down is still one); a square is a
square up to 22.5 degrees of turn, further on (a diamond) it is not called one. The descriptor was the
fill ratio area / bounding-box area (square ~1, circle ~pi/4, triangle ~1/2) with the top row narrower
than the bottom row as a tie-breaker. That called a lopsided triangle (apex over one end of its base,
fill 0.67) a circle, so "two triangles" passed on an image holding three; it also called nearly every
square turned by 5-20 degrees or carrying one stray pixel a circle. Error rates per kind of imperfect
shape, before and after, are in :mod:`alignrl.shapes.imperfect`. Known limits: a shape partly covered
by another colour loses the covered part (a square with a bite can read as a triangle), two touching
shapes of one colour are one component, and blobs under ``MIN_AREA`` pixels (a 5-pixel triangle can
be one) are not objects.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from alignrl.shapes.world import COLORS, SHAPES, TAGS

COLOR_TOL = 100  # per channel, out of 255
MIN_AREA = 12  # pixels; smaller blobs are noise
REL_MARGIN = 2.0  # pixels between centroids for a relation to hold


@dataclass
class Detection:
    shape: str
    color: str
    area: int
    cx: float
    cy: float


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as arrays of (y, x) coordinates."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    comps = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, pts = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            pts.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        comps.append(np.array(pts))
    return comps


TRIANGLE_MIN = 0.28  # 3-fold moment: triangles >= 0.3, circles and squares <= 0.27 (see shape_moments)
SQUARE_MIN = 0.21  # 4-fold moment: squares >= 0.25 (0.43 clean), circles <= 0.2 (0 for a perfect disk)
DESPUR_MIN_AREA = 40  # smaller blobs keep their spurs: there a 1-pixel tip is part of the shape
_SUB = (np.arange(4) + 0.5) / 4
_SUBPIXELS = np.stack(np.meshgrid(_SUB, _SUB, indexing="ij"), axis=-1).reshape(-1, 2)


def _despur(pts: np.ndarray, passes: int = 2) -> np.ndarray:
    """Drop spur pixels (fewer than two 4-neighbours), twice: stray pixels and 2-pixel spurs go, the
    body stays (a pass that would remove over 30% of the pixels is skipped, e.g. on a thin line)."""
    y0, x0 = pts.min(axis=0) - 1
    mask = np.zeros(tuple(pts.max(axis=0) - pts.min(axis=0) + 3), dtype=bool)
    mask[pts[:, 0] - y0, pts[:, 1] - x0] = True
    for _ in range(passes):
        inner = mask[1:-1, 1:-1]
        neighbours = (mask[:-2, 1:-1].astype(np.int8) + mask[2:, 1:-1] + mask[1:-1, :-2] + mask[1:-1, 2:])
        keep = inner & (neighbours >= 2)
        if keep.sum() == inner.sum() or keep.sum() < 0.7 * inner.sum():
            break
        mask[1:-1, 1:-1] = keep
    return np.argwhere(mask) + (y0, x0)


def shape_moments(pts: np.ndarray) -> tuple[float, float]:
    """(three, four): the 3-fold and 4-fold symmetry of a pixel set's affine-normalised shape.

    The pixels (each as 4x4 sample points, so a pixel counts as the unit square it covers) are
    centred and whitened by their covariance: that maps any ellipse to a disk, any triangle
    (scalene, lopsided, rotated) to an equilateral one and any rectangle to a square, without turning
    it. With z = x + iy of the whitened points, c3 = sum z^3 / sum |z|^3 and c4 = sum z^4 / sum |z|^4:

    - ``three`` = |c3|: 0 for a disk and a square, ~0.7 for a triangle;
    - ``four`` = |c4|, signed: 0 for a disk and a triangle, ~0.43 for a square. Positive when the
      excess mass lies on the diagonals (Re c4 < 0: a square turned less than 22.5 degrees), negative
      when it lies on the axes (a diamond, or the plus-shaped blob a 5-pixel circle rasterises to).
    """
    p = (pts[:, None, :] + _SUBPIXELS[None]).reshape(-1, 2)
    p = p - p.mean(axis=0)
    w, v = np.linalg.eigh(p.T @ p / len(p))
    q = p @ (v / np.sqrt(np.maximum(w, 1e-9))) @ v.T
    z = q[:, 1] + 1j * q[:, 0]
    r = np.abs(z)
    c4 = np.sum(z ** 4) / np.sum(r ** 4)
    return float(abs(np.sum(z ** 3)) / np.sum(r ** 3)), float(abs(c4) if c4.real < 0 else -abs(c4))


def classify_shape(pts: np.ndarray) -> str:
    """'triangle', 'square' or 'circle' for one component's (y, x) pixels (see the module docstring)."""
    three, four = shape_moments(_despur(pts) if len(pts) >= DESPUR_MIN_AREA else pts)
    if three >= TRIANGLE_MIN:
        return "triangle"
    if four >= SQUARE_MIN:
        return "square"
    return "circle"


def _objects(image: np.ndarray):
    """(colour, shape, (y, x) pixels) of each object in one (H, W, 3) uint8 image."""
    img = image.astype(np.int16)
    for name, rgb in COLORS.items():
        mask = np.all(np.abs(img - np.array(rgb, dtype=np.int16)) <= COLOR_TOL, axis=-1)
        for pts in _components(mask):
            if len(pts) >= MIN_AREA:
                yield name, classify_shape(pts), pts


def detect(image: np.ndarray) -> list[Detection]:
    """Objects in one (H, W, 3) uint8 image."""
    return [Detection(shape, color, len(pts), float(pts[:, 1].mean()), float(pts[:, 0].mean()))
            for color, shape, pts in _objects(image)]


# the classes of ``label_map``: 0 is background, then every (colour, shape)
CLASSES = [(c, s) for c in COLORS for s in SHAPES]


def label_map(image: np.ndarray) -> np.ndarray:
    """(H, W) int64: each pixel's object as the judge sees it, 1 + its index in ``CLASSES`` (0: no object; the
    colour masks of the 4 colours do not overlap at ``COLOR_TOL`` 100). What ``shapes_seg`` is trained to
    predict."""
    out = np.zeros(image.shape[:2], dtype=np.int64)
    for color, shape, pts in _objects(image):
        out[pts[:, 0], pts[:, 1]] = 1 + CLASSES.index((color, shape))
    return out


def _matches(d: Detection, clause: dict) -> bool:
    return d.shape == clause["shape"] and (clause["color"] is None or d.color == clause["color"])


def check(image: np.ndarray, meta: dict) -> dict:
    """Sub-condition results for one image: {'conditions': [bool...], 'strict': 0/1, 'partial': float}."""
    dets = detect(image)
    conditions = []
    chosen = []
    for clause in meta["objects"]:
        hits = [d for d in dets if _matches(d, clause)]
        conditions.append(len(hits) > 0)
        if clause.get("count"):
            conditions.append(len(hits) == clause["count"])
        chosen.append(max(hits, key=lambda d: d.area) if hits else None)
    rel = meta.get("relation")
    if rel:
        a, b = chosen[rel["a"]], chosen[rel["b"]]
        conditions.append(a is not None and b is not None and relation_holds(rel["type"], a, b))
    strict = float(all(conditions))
    return {"conditions": conditions, "strict": strict, "partial": float(np.mean(conditions)),
            "detections": len(dets)}


def relation_holds(rel: str, a: Detection, b: Detection) -> bool:
    if rel == "left of":
        return b.cx - a.cx >= REL_MARGIN
    if rel == "right of":
        return a.cx - b.cx >= REL_MARGIN
    if rel == "above":
        return b.cy - a.cy >= REL_MARGIN
    if rel == "below":
        return a.cy - b.cy >= REL_MARGIN
    raise ValueError(f"unknown relation {rel!r}")


def per_tag_table(metas: list[dict], results: list[dict]) -> dict:
    """GenEval-style summary: per tag strict and partial accuracy, and the overall (mean over tags)."""
    table = {}
    for tag in TAGS:
        rows = [r for m, r in zip(metas, results) if m.get("tag") == tag]
        if rows:
            table[tag] = {"strict": float(np.mean([r["strict"] for r in rows])),
                          "partial": float(np.mean([r["partial"] for r in rows])), "n": len(rows)}
    if table:
        table["overall"] = {"strict": float(np.mean([v["strict"] for v in table.values()])),
                            "partial": float(np.mean([v["partial"] for v in table.values()])),
                            "n": sum(v["n"] for v in table.values())}
    return table
