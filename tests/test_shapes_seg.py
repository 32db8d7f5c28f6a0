"""The judge's reading as labels (``label_map``), the segmenter distilled from it (shipped in the package) and the
shape-aware surrogate ``shapes_seg`` built on it."""

import json
import random
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def _render(meta: dict, seed: int = 0) -> torch.Tensor:
    from alignrl.shapes.world import render

    return torch.from_numpy(np.array(render(meta, random.Random(seed)))).permute(2, 0, 1).float() / 255


def test_label_map_is_the_judges_reading_pixel_by_pixel():
    """Every object the judge detects is labelled with its (colour, shape) class over exactly its pixel count, and
    nothing else is labelled: on renders of every tag, and on a mirrored render (the mirror of the reading)."""
    from alignrl.shapes.judge import CLASSES, detect, label_map
    from alignrl.shapes.world import eval_set, render_batch

    metas = eval_set("held_out", per_tag=4)
    images = render_batch(metas, seed=1)
    for img in images:
        labels = label_map(img)
        dets = detect(img)
        assert (labels > 0).sum() == sum(d.area for d in dets)
        for cls in range(1, len(CLASSES) + 1):
            colour, shape = CLASSES[cls - 1]
            assert (labels == cls).sum() == sum(d.area for d in dets if (d.color, d.shape) == (colour, shape))
        assert np.array_equal(label_map(img[:, ::-1].copy()), labels[:, ::-1])


def test_shipped_segmenter_reads_shapes_that_the_colour_surrogate_cannot():
    """A red square against a red circle for "a red square": the exact judge passes only the square; shapes_soft
    (colour masks) scores both alike; shapes_seg, reading the shipped segmenter, scores the square well above the
    circle, and its gradient reaches the pixels."""
    from alignrl.rewards.shapes import ShapesGenEval, ShapesSeg, ShapesSoft
    from alignrl.shapes.world import make_prompt

    rows = []
    for shape in ("square", "circle", "triangle"):
        want = make_prompt("colors", [{"shape": shape, "color": "red", "count": None}])
        for drawn in ("square", "circle", "triangle"):
            meta = make_prompt("colors", [{"shape": drawn, "color": "red", "count": None}])
            for seed in range(3):
                rows.append((want, _render(meta, seed), drawn == shape))
    images = torch.stack([im for _, im, _ in rows])
    metas = [m for m, _, _ in rows]
    prompts = [m["prompt"] for m in metas]
    right = np.array([ok for _, _, ok in rows])
    exact, _ = ShapesGenEval()(images, prompts, metas)
    assert np.array_equal(exact == 1.0, right)
    soft = ShapesSoft().score_tensor(images, prompts, metas).numpy()
    assert abs(soft[right].mean() - soft[~right].mean()) < 0.05  # blind to shape
    x = images.clone().requires_grad_(True)
    seg = ShapesSeg().score_tensor(x, prompts, metas)
    s = seg.detach().numpy()
    assert s[right].mean() > 0.8 and s[~right].mean() < 0.4, (s[right].mean(), s[~right].mean())
    assert s[right].min() > s[~right].max() - 0.1
    seg.sum().backward()
    assert float(x.grad.abs().sum()) > 0


def test_shapes_seg_tracks_the_judge_on_renders_with_shuffled_prompts():
    """Ground-truth renders scored against their own and against shuffled prompts: shapes_seg ranks them as the
    exact judge does, closer than shapes_soft (which cannot see shapes)."""
    from alignrl.rewards.shapes import ShapesGenEval, ShapesSeg, ShapesSoft
    from alignrl.shapes.world import eval_set, render_batch

    metas = eval_set("held_out", per_tag=8)
    images = torch.from_numpy(render_batch(metas, seed=5)).permute(0, 3, 1, 2).float() / 255
    rng = np.random.default_rng(1)
    ms = metas + [metas[int(j)] for j in rng.permutation(len(metas))]
    imgs = torch.cat([images, images])
    prompts = [m["prompt"] for m in ms]
    exact, _ = ShapesGenEval()(imgs, prompts, ms)
    with torch.no_grad():
        seg = ShapesSeg().score_tensor(imgs, prompts, ms).numpy()
    soft = ShapesSoft().score_tensor(imgs, prompts, ms).numpy()
    r_seg, r_soft = np.corrcoef(seg, exact)[0, 1], np.corrcoef(soft, exact)[0, 1]
    assert r_seg > 0.8 and r_seg > r_soft, (r_seg, r_soft)


def test_shipped_segmenter_records_how_it_was_made():
    from alignrl.shapes import segmenter

    info = json.loads((segmenter.default_dir() / segmenter.INFO).read_text())
    assert info["command"].startswith("python scripts/train_shapes_segmenter.py")
    val = info["metrics"]["validation"]
    assert val["object_pixel_accuracy"] > 0.8 and info["validation_images"] >= 300
    model = segmenter.load()
    assert not any(p.requires_grad for p in model.parameters())


def test_missing_segmenter_weights_name_the_script(tmp_path):
    from alignrl.errors import ConfigError
    from alignrl.shapes import segmenter

    with pytest.raises(ConfigError, match="train_shapes_segmenter.py"):
        segmenter.load(tmp_path)


def test_training_script_runs_small_and_writes_loadable_weights(tmp_path, capsys):
    from alignrl.rewards.shapes import ShapesSeg
    from alignrl.shapes import segmenter

    out = tmp_path / "seg"
    script = REPO / "scripts" / "train_shapes_segmenter.py"
    main = runpy.run_path(str(script), run_name="train_shapes_segmenter")["main"]
    assert main(["--model-images", "8", "--renders", "16", "--steps", "3", "--val-per-tag", "1", "--width", "8",
                 "--out", str(out)]) == 0  # the script's own main, in this process
    assert "Pearson r with the exact judge" in capsys.readouterr().out
    info = json.loads((out / segmenter.INFO).read_text())
    assert info["steps"] == 3 and info["model_images"] == 8 and info["width"] == 8
    model = segmenter.load(out)
    assert model.width == 8
    from alignrl.shapes.world import make_prompt

    meta = make_prompt("colors", [{"shape": "square", "color": "red", "count": None}])
    score = ShapesSeg(segmenter=str(out)).score_tensor(_render(meta)[None], [meta["prompt"]], [meta])
    assert score.shape == (1,) and 0.0 <= float(score) <= 1.0
