"""The ShapeWorld judge's shape classifier on imperfect, model-like shapes (alignrl.shapes.imperfect)."""

import math

import numpy as np
import pytest
from PIL import Image, ImageDraw

from alignrl.shapes.imperfect import DISTORTIONS, error_table, imperfect_image, paint, triangle_outline
from alignrl.shapes.judge import COLOR_TOL, check, classify_shape, detect, per_tag_table
from alignrl.shapes.world import (MAX_SIDE, MIN_SIDE, SHAPES, SIZE, TAGS, Placed, all_prompts, draw_shape,
                                  render_batch)


def _prompt(text):
    return next(m for m in all_prompts() if m["prompt"] == text)


def _fill_ratio_rule(pts):
    """The judge's previous classifier (area / bounding box, top vs bottom row), to show the fixture
    below is the reported failure."""
    ys = pts[:, 0]
    fill = len(pts) / float((np.ptp(ys) + 1) * (np.ptp(pts[:, 1]) + 1))
    if fill >= 0.9:
        return "square"
    if fill < 0.6 or (fill < 0.66 and np.sum(ys == ys.max()) >= 2 * np.sum(ys == ys.min())):
        return "triangle"
    return "circle"


def _three_triangles_one_lopsided():
    """Two renderer triangles and one whose apex sits 3.2 px right of its base's middle (base 8)."""
    img = Image.new("RGB", (SIZE, SIZE))
    draw = ImageDraw.Draw(img)
    draw_shape(draw, Placed("triangle", "red", 2, 2, 9))
    draw_shape(draw, Placed("triangle", "blue", 20, 3, 8))
    lopsided = triangle_outline(cx=16, cy=24, base=8, height=8, apex_shift=3.2)
    return paint(lopsided, "green", gain=1.2, canvas=np.asarray(img))


def test_reported_false_pass_three_triangles_one_lopsided():
    image = _three_triangles_one_lopsided()
    green = np.argwhere(np.all(np.abs(image.astype(int) - (0, 255, 0)) <= COLOR_TOL, axis=-1))  # as the judge sees it
    assert len(green) == 33
    assert _fill_ratio_rule(green) == "circle"  # the reported failure: fill 33/49 = 0.67
    assert classify_shape(green) == "triangle"
    assert sorted((d.color, d.shape) for d in detect(image)) == [
        ("blue", "triangle"), ("green", "triangle"), ("red", "triangle")]
    two = check(image, _prompt("two triangles"))
    assert two["conditions"] == [True, False] and two["strict"] == 0 and two["partial"] == 0.5
    assert check(image, _prompt("three triangles"))["strict"] == 1
    # apex over the other end of the base: mirrored, same verdicts
    mirrored = image[:, ::-1]
    assert check(mirrored, _prompt("two triangles"))["strict"] == 0
    assert check(mirrored, _prompt("three triangles"))["strict"] == 1


def test_clean_renders_stay_exact():
    for shape in SHAPES:
        for side in range(MIN_SIDE, MAX_SIDE + 1):
            img = Image.new("RGB", (SIZE, SIZE))
            draw_shape(ImageDraw.Draw(img), Placed(shape, "yellow", 10, 10, side))
            assert [d.shape for d in detect(np.asarray(img))] == [shape], (shape, side)
    metas = all_prompts()
    results = [check(im, m) for im, m in zip(render_batch(metas, seed=21), metas)]
    assert all(r["strict"] == 1 for r in results), [m["prompt"] for m, r in zip(metas, results) if r["strict"] < 1]
    assert all(per_tag_table(metas, results)[t]["strict"] == 1 for t in TAGS)


# Error per (shape, distortion), measured with 1000 shapes each (seed 2024); the caps leave margin.
# Shapes of 5-7 px ("small") are where circle, square and a blunt triangle share pixel patterns, and a
# triangle under MIN_AREA pixels is not detected at all (most of that row's misses).
CAPS = {"small": 0.12}
DEFAULT_CAP = 0.04


def test_accuracy_on_imperfect_shapes():
    table = error_table(n=120, seed=7)
    assert set(table) == {(s, d) for s, kinds in DISTORTIONS.items() for d in kinds}
    for (shape, kind), row in table.items():
        assert row["error"] <= CAPS.get(kind, DEFAULT_CAP), (shape, kind, row)
    for shape in SHAPES:
        rows = [row["error"] for (s, _), row in table.items() if s == shape]
        assert np.mean(rows) <= 0.025, (shape, rows)


def test_orientation_and_size_rules():
    def one(image):
        dets = detect(image)
        assert len(dets) == 1, dets
        return dets[0].shape

    for turn in (0, 90, 180, 270, 33):  # a triangle pointing any way is a triangle
        tri = triangle_outline(16, 16, 10, 9, apex_shift=-2.0, angle=math.radians(turn))
        assert one(paint(tri, "red", sigma=0.3)) == "triangle", turn
    truncated = triangle_outline(16, 16, 10, 9, top=2.5)  # apex cut flat
    assert one(paint(truncated, "red", sigma=0.3)) == "triangle"

    def square(turn_deg, side=9.0):
        c, s = math.cos(math.radians(turn_deg)), math.sin(math.radians(turn_deg))
        corners = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        return np.array([(16.3 + side / 2 * (c * x - s * y), 15.8 + side / 2 * (s * x + c * y)) for x, y in corners])

    for turn in (-15, -8, 0, 8, 15):
        assert one(paint(square(turn), "blue")) == "square", turn
    assert one(paint(square(45), "blue")) == "circle"  # a diamond is not called a square
    # a 5-pixel circle rasterises to a plus-shaped blob: the corners sit on the axes, not a square
    plus = np.zeros((SIZE, SIZE, 3), np.uint8)
    plus[10:15, 11:14] = plus[11:14, 10:15] = (0, 255, 0)
    assert one(plus) == "circle"


def test_generator_rejects_unknown_kinds():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown distortion 'ellipse' for 'square'"):
        imperfect_image("square", "ellipse", rng)
    with pytest.raises(ValueError, match="unknown distortion"):
        imperfect_image("hexagon", "clean", rng)
    img = imperfect_image("triangle", "lopsided", rng, color="yellow")
    assert img.shape == (SIZE, SIZE, 3) and img.dtype == np.uint8 and img.max() > 200
