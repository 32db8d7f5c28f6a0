"""Training plots from metrics.jsonl, `alignrl runs --plot`, the eval chart, and wrapped grid captions."""

import json
import math
import random

import numpy as np
import torch
from PIL import Image

from alignrl.eval.evaluate import EvalResult, write_report
from alignrl.eval.report import image_grid, wrap_text
from alignrl.plots import Curves, _figure, _panel, read_metrics, write_run_plots
from conftest import run_inprocess

BLUE, ORANGE = (31, 119, 180), (255, 127, 14)  # matplotlib's first two line colours (C0, C1)


def colour_pixels(path, rgb, tol=12) -> int:
    """Pixels within ``tol`` of ``rgb``: a drawn line of that colour, not a blank or empty chart."""
    with Image.open(path) as im:
        im.verify()  # a complete, valid PNG
    arr = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int((np.abs(arr - np.array(rgb)).max(axis=2) <= tol).sum())


def synthetic_rows(n, start=1, seed=0, eval_every=20):
    rng = random.Random(seed)
    rows, seconds = [], 0.0
    for step in range(start, start + n):
        seconds += 2 + rng.random()
        row = {"step": step, "reward_mean": math.log(step) + rng.gauss(0, 0.3), "reward_std": 0.3,
               "reward/pickscore_mean": 20 + rng.random(), "reward/pickscore_std": 1.0,
               "reward/ocr_mean": rng.random(), "reward/ocr_std": 0.1, "approx_kl": 1e-3 * step,
               "clipfrac": rng.random() * 0.1, "lr": 1e-4, "train_seconds": seconds}
        if step % eval_every == 0:
            row.update({"eval/reward_mean": step / 200, "eval/reward_std": 0.1, "eval/pickscore_mean": 21.0,
                        "eval/ocr_mean": 0.5, "eval/geneval/strict_mean": step / 300,
                        "eval/tag/single_object/strict": 0.3, "eval/tag/two_object/strict": 0.2})
        rows.append(row)
    return rows


def write_rows(path, rows, mode="w"):
    with open(path, mode) as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def test_run_plots_from_synthetic_metrics(tmp_path):
    write_rows(tmp_path / "metrics.jsonl", synthetic_rows(80))  # >= 60: smoothed lines too
    written = write_run_plots(tmp_path)
    names = sorted(p.name for p in written)
    assert names == ["clipfrac.png", "eval.png", "kl.png", "reward.png"]
    for p in written:
        assert p.parent == tmp_path / "plots"
        with Image.open(p) as im:
            assert im.width >= 900 and im.height >= 250
        assert colour_pixels(p, BLUE) > 300, p.name  # lines were drawn
    # reward: the total and one panel per term (each against step and wall-clock): 3 rows of 2 axes
    with Image.open(tmp_path / "plots" / "reward.png") as im, Image.open(tmp_path / "plots" / "clipfrac.png") as one:
        assert im.height > 2.5 * one.height
    assert not list((tmp_path / "plots").glob(".*tmp*"))  # written through a temporary file, none left


def test_plots_update_when_rows_are_added(tmp_path):
    rows = synthetic_rows(40)
    write_rows(tmp_path / "metrics.jsonl", rows[:1])
    write_run_plots(tmp_path)
    png = tmp_path / "plots" / "reward.png"
    first, first_blue = png.read_bytes(), colour_pixels(png, BLUE)
    assert first_blue > 10  # a single logged step is drawn (as a marker)
    assert not (tmp_path / "plots" / "eval.png").exists()  # nothing evaluated yet: no eval figure
    write_rows(tmp_path / "metrics.jsonl", rows[1:], mode="a")
    write_run_plots(tmp_path)
    assert png.read_bytes() != first
    assert colour_pixels(png, BLUE) > 5 * first_blue
    assert (tmp_path / "plots" / "eval.png").is_file()


def test_plots_tolerate_missing_keys_nan_and_resumed_rows(tmp_path):
    lines = [
        json.dumps({"step": 1, "reward_mean": 0.1, "clipfrac": None, "train_seconds": 1.0}),
        '{"step": 2, "reward_mean": NaN, "approx_kl": "n/a", "train_seconds": 2.0}',  # NaN and a string
        json.dumps({"step": 2, "reward_mean": 0.3, "train_seconds": 2.5}),  # step 2 again (a resumed run)
        json.dumps([1, 2]),  # not a row
        json.dumps({"reward_mean": 5.0}),  # no step
        json.dumps({"step": 3, "reward_mean": 0.4}),  # no train_seconds (an older run)
        '{"step": 4, "reward_me',  # cut short by a crash
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 5
    curves = Curves(read_metrics(tmp_path / "metrics.jsonl"))
    assert curves.series("reward_mean") == ([1, 2, 3], [0.1, 0.3, 0.4])  # the later step-2 value wins
    assert curves.series("reward_mean", wall_clock=True) == ([1.0, 2.5], [0.1, 0.3])  # step 3 has no time
    assert not curves.has("clipfrac") and not curves.has("approx_kl")
    fig, axes = _figure(2, 2, width=8, row_height=3)
    untimed = Curves([{"step": 1, "reward_mean": 0.5}])
    for row, c in zip(axes, (curves, untimed)):
        _panel(row[0], c, ["reward_mean"], "reward", False, ("s", 1.0))
        _panel(row[1], c, ["reward_mean"], "reward", True, ("s", 1.0))
    assert axes[0][0].get_legend() is not None and axes[0][1].get_legend() is None  # one legend per row
    assert not axes[0][1].texts and len(axes[0][1].lines) == 1  # drawn against time, no placeholder
    assert [t.get_text() for t in axes[1][1].texts] == ["no train_seconds logged"] and not axes[1][1].lines
    written = write_run_plots(tmp_path)
    assert [p.name for p in written] == ["reward.png"]  # no KL, clip or eval figure from nothing
    assert colour_pixels(written[0], BLUE) > 30
    assert write_run_plots(tmp_path / "missing") == []  # no metrics.jsonl: nothing written, no error
    (tmp_path / "plots" / "notes.png").write_bytes(b"a user's file")
    (tmp_path / "metrics.jsonl").write_text("")  # a restart from scratch dropped every row
    assert write_run_plots(tmp_path) == []
    assert [p.name for p in (tmp_path / "plots").iterdir()] == ["notes.png"]  # stale figures gone, not others


def test_runs_plot_compares_two_runs(tmp_path):
    for name, seed in (("run_a", 0), ("run_b", 1)):
        run = tmp_path / "outputs" / name
        run.mkdir(parents=True)
        (run / "status.json").write_text(json.dumps({"state": "finished", "step": 40, "max_steps": 40}))
        write_rows(run / "metrics.jsonl", synthetic_rows(40, seed=seed, eval_every=10))
    out = tmp_path / "compare.png"
    proc = run_inprocess("runs", "--plot", str(out), "outputs", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "run_a" in proc.stdout and "run_b" in proc.stdout  # the table is printed too
    assert f"wrote {out}" in proc.stdout
    assert colour_pixels(out, BLUE) > 300 and colour_pixels(out, ORANGE) > 300  # one line per run
    bad = run_inprocess("runs", "--plot=chart.svg", "outputs", cwd=tmp_path)
    assert bad.returncode == 2 and "ending in .png" in bad.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    none = run_inprocess("runs", "--plot", "x.png", str(empty), cwd=tmp_path)
    assert none.returncode == 1 and not (tmp_path / "x.png").exists()


def test_eval_report_writes_a_chart_and_links_it(tmp_path):
    table = {"single_object": {"reward": 0.5, "strict": 0.5, "partial": 0.6, "n": 4},
             "two_object": {"reward": 0.2, "strict": 0.0, "partial": 0.3, "n": 4},
             "overall": {"reward": 0.35, "strict": 0.25, "partial": 0.45, "n": 8}}
    metrics = {"eval/reward_mean": 0.35, "eval/reward_std": 0.2, "eval/num_images": 8}
    images = torch.rand(8, 3, 16, 16)
    tagged = write_report(tmp_path / "tagged", EvalResult(metrics, images, ["a circle"] * 8, np.zeros(8), table),
                          "eval", {})
    assert colour_pixels(tagged["chart"], BLUE) > 200 and colour_pixels(tagged["chart"], ORANGE) > 200  # strict, partial
    summary = (tmp_path / "tagged" / "summary.md").read_text()
    assert "![per tag](chart.png)" in summary
    assert summary.index("| two_object") < summary.index("![per tag](chart.png)")  # beside the table
    per_reward = {"eval/reward_mean": 1.5, "eval/reward_std": 0.2, "eval/pickscore_mean": 21.0,
                  "eval/pickscore_std": 1.0, "eval/ocr_mean": 0.4, "eval/ocr_std": 0.1, "eval/num_images": 8}
    plain = write_report(tmp_path / "plain", EvalResult(per_reward, None, [], np.zeros(8)), "eval", {})
    assert colour_pixels(plain["chart"], BLUE) > 200
    assert "![per reward](chart.png)" in (tmp_path / "plain" / "summary.md").read_text()


def test_wrap_text_keeps_every_word_and_caps_lines():
    measure = lambda s: 6 * len(s)  # noqa: E731  a monospace font of 6 px per character
    text = "PASS 0.412 a photo of a yellow cat and a red dog to the left of a blue supercalifragilistic bus"
    lines = wrap_text(text, 60, measure, max_lines=20)
    assert len(lines) > 3 and all(measure(line) <= 60 for line in lines)
    assert "".join(lines).replace(" ", "") == text.replace(" ", "")  # every character, in order
    assert " ".join(lines).split() != text.split()  # the 16-letter word is broken (wider than a line)
    capped = wrap_text(text, 60, measure, max_lines=3)
    assert len(capped) == 3 and capped[-1].endswith("...") and measure(capped[-1]) <= 60
    assert capped[:2] == lines[:2]
    assert wrap_text("short", 60, measure) == ["short"]


def test_grid_captions_wrap_and_the_strip_grows():
    images = torch.rand(4, 3, 32, 32)
    short = image_grid(images, ["a"] * 4)
    long_caption = "PASS 0.91 a photo of a yellow cat and a red dog to the left of a blue bus"
    tall = image_grid(images, [long_caption] + ["a"] * 3)
    assert tall.width == short.width and tall.height > short.height + 2 * 2 * 10  # >= 2 more lines per row
    capped = image_grid(images, [long_caption * 10] + ["a"] * 3, max_caption_lines=4)
    assert capped.height < image_grid(images, [long_caption * 10] + ["a"] * 3).height
    # ink below the first image reaches the lines the old cut-at-cw//6 strip never had
    arr = np.asarray(tall.convert("L"))
    cell = 128
    strip = arr[cell:tall.height // 2, :cell]
    dark_rows = np.where((strip < 128).any(axis=1))[0]
    assert dark_rows.max() - dark_rows.min() > 30
