"""The exact ShapeWorld judge (reward ``shapes_geneval``).

From an image and a prompt's metadata it decides each sub-condition by colour masks, connected
components and shape descriptors:

- detection: a pixel belongs to colour c when it is within ``COLOR_TOL`` of c's RGB on every channel
  (saturated colours on black are far apart); 4-connected components of each mask of at least
  ``MIN_AREA`` pixels are objects;
- shape: fill ratio area / bounding-box area (square ~1, circle ~pi/4, triangle ~1/2), with the
  triangle's top row much narrower than its bottom row as a tie-breaker;
- sub-conditions, GenEval style: every object clause needs its shape present (with its colour when the
  prompt names one); a counted clause needs exactly that many; a relation needs its centroids ordered
  with a margin.

``strict`` is 1 when every sub-condition holds, ``partial`` is the fraction that hold (the training
reward, as Flow-GRPO uses GenEval's).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from alignrl.shapes.world import COLORS, TAGS

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


def classify_shape(pts: np.ndarray) -> str:
    ys, xs = pts[:, 0], pts[:, 1]
    h = ys.max() - ys.min() + 1
    w = xs.max() - xs.min() + 1
    fill = len(pts) / float(h * w)
    if fill >= 0.9:
        return "square"
    top = np.sum(ys == ys.min())
    bottom = np.sum(ys == ys.max())
    if fill < 0.66 and bottom >= 2 * top:
        return "triangle"
    if fill < 0.6:
        return "triangle"
    return "circle"


def detect(image: np.ndarray) -> list[Detection]:
    """Objects in one (H, W, 3) uint8 image."""
    img = image.astype(np.int16)
    found = []
    for name, rgb in COLORS.items():
        mask = np.all(np.abs(img - np.array(rgb, dtype=np.int16)) <= COLOR_TOL, axis=-1)
        for pts in _components(mask):
            if len(pts) < MIN_AREA:
                continue
            found.append(Detection(classify_shape(pts), name, len(pts), float(pts[:, 1].mean()),
                                   float(pts[:, 0].mean())))
    return found


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
