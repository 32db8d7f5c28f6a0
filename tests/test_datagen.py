"""`alignrl data`: datasets for the offline methods from a model and a reward."""

from __future__ import annotations

import json

import numpy as np
import pytest

from alignrl.datagen import rows_for_prompt
from alignrl.imagedata import ImageDataset

NAMES = ["a.png", "b.png", "c.png", "d.png"]


def test_pairs_best_and_worst_or_all_above_the_margin():
    s = np.array([0.2, 0.9, 0.5, 0.2])
    rows = rows_for_prompt("pairs", "p", NAMES, s)
    assert [(r["winner"], r["loser"]) for r in rows] == [("b.png", "d.png")]  # worst tie: the later one
    every = rows_for_prompt("pairs", "p", NAMES, s, pairing="all", margin=0.35)
    assert {(r["winner"], r["loser"]) for r in every} == {("b.png", "a.png"), ("b.png", "d.png"), ("b.png", "c.png")}
    assert all(r["winner_score"] - r["loser_score"] >= 0.35 for r in every)
    assert rows_for_prompt("pairs", "p", NAMES, np.full(4, 0.5)) == []  # all tied: no pair
    assert rows_for_prompt("pairs", "p", NAMES, s, margin=0.8) == []


def test_lists_labels_captions_and_non_finite_scores():
    s = np.array([0.1, float("nan"), 0.7, 0.4])
    lists = rows_for_prompt("lists", "p", NAMES, s, meta={"tag": "x"})
    assert lists == [{"prompt": "p", "images": ["a.png", "c.png", "d.png"], "scores": [0.1, 0.7, 0.4], "tag": "x"}]
    labels = rows_for_prompt("labels", "p", NAMES, np.array([0.1, 0.9, 0.7, 0.4]))
    assert {r["image"]: r["label"] for r in labels} == {"b.png": 1, "c.png": 1, "a.png": 0, "d.png": 0}
    quarter = rows_for_prompt("labels", "p", NAMES, np.array([0.1, 0.9, 0.7, 0.4]), label_fraction=0.25)
    assert {r["image"]: r["label"] for r in quarter} == {"b.png": 1, "a.png": 0}
    assert rows_for_prompt("labels", "p", NAMES, np.full(4, 0.3)) == []  # no gap between the halves
    assert rows_for_prompt("captions", "p", NAMES, s) == [{"prompt": "p", "image": "c.png", "score": 0.7}]
    assert rows_for_prompt("captions", "p", NAMES, np.full(4, np.nan)) == []  # all NaN
    top = rows_for_prompt("captions", "p", NAMES, np.array([0.7, 0.2, 0.7, 0.7]), captions="top")
    assert [r["image"] for r in top] == ["a.png", "c.png", "d.png"]  # every image tied with the best, in order
    assert [r["image"] for r in rows_for_prompt("captions", "p", NAMES, s, captions="top")] == ["c.png"]


def test_labels_leave_out_only_the_images_tied_across_the_boundary():
    """A judge's 1s and 0s: six of eight images pass. The halves share a score, and the images tied across the
    boundary are left out, not the prompt (which gave no labels before: 422 of ShapeWorld's 542 prompts)."""
    from alignrl.datagen import label_halves

    names = [f"{i}.png" for i in range(8)]
    rows = rows_for_prompt("labels", "p", names, np.array([1, 0, 1, 1, 1, 0, 1, 1.0]))
    assert {r["image"]: r["label"] for r in rows} == {"0.png": 1, "2.png": 1, "3.png": 1, "4.png": 1,
                                                       "1.png": 0, "5.png": 0}
    assert label_halves([1, 1, 0, 0, 0, 0, 0, 0], 0.5) == ([0, 1], [4, 5, 6, 7])  # the mirror case
    assert label_halves([0.9, 0.7, 0.4, 0.1], 0.5) == ([0, 1], [2, 3])  # no tie: the plain halves
    rng = np.random.default_rng(0)
    for _ in range(500):
        k = int(rng.integers(2, 10))
        ranked = sorted(rng.integers(0, 3, size=k) / 2, reverse=True)
        fraction = float(rng.choice([0.25, 0.5]))
        top, bottom = label_halves(ranked, fraction)
        n = min(max(1, round(k * fraction)), k // 2)
        assert set(top) <= set(range(n)) and set(bottom) <= set(range(k - n, k))  # within the halves
        assert bool(top) == bool(bottom)  # both sides or neither
        assert all(ranked[a] > ranked[b] for a in top for b in bottom)  # every desirable above every undesirable
        if ranked[n - 1] > ranked[k - n]:
            assert (top, bottom) == (list(range(n)), list(range(k - n, k)))  # a gap: nothing left out
        elif len(set(ranked)) > 1 and (ranked[0] > ranked[k - n] or ranked[n - 1] > ranked[-1]):
            assert top  # a score gap inside the halves always gives labels


def _data(tmp_path, out, *args):
    from conftest import run_inprocess

    return run_inprocess("data", "recipe=tiny_flowgrpo", f"out={out}", "samples_per_prompt=4", "progress=false",
                         "backbone.resolution=32", *args, cwd=tmp_path)


def test_data_command_writes_a_valid_dataset_and_resumes_to_the_same_rows(tmp_path):
    whole = tmp_path / "whole"
    proc = _data(tmp_path, whole, "num_prompts=4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    ds = ImageDataset.load(whole / "pairs.jsonl", "pairs")
    assert ds.validate()["images"] == 2 * len(ds) and 1 <= len(ds) <= 4
    assert all(r.scores[0] > r.scores[1] for r in ds.rows)  # winner first, by the reward
    assert len(list((whole / "images").glob("*.png"))) == 16
    # an interrupted run (2 prompts) continued to 4 ends with the rows of the uninterrupted one
    part = tmp_path / "part"
    assert _data(tmp_path, part, "num_prompts=2").returncode == 0
    for name in ("pairs.jsonl", "lists.jsonl"):  # a crash after a prompt's rows, before progress.json said so
        with open(part / name, "a") as fh:
            fh.write('{"prompt": "written before the crash"}\n')
    assert _data(tmp_path, part, "num_prompts=4").returncode == 0
    assert (part / "pairs.jsonl").read_text() == (whole / "pairs.jsonl").read_text()
    # every image's score is kept beside the pairs, one list per prompt, resumed alike
    assert (part / "lists.jsonl").read_text() == (whole / "lists.jsonl").read_text()
    assert len(ImageDataset.load(whole / "lists.jsonl", "lists")) == 4
    assert json.loads((part / "progress.json").read_text())["prompts_done"] == 4
    # the same directory with another setting is refused, in one line
    proc = _data(tmp_path, part, "num_prompts=4", "kind=lists")
    assert proc.returncode != 0 and "written with other settings (kind)" in proc.stderr
    # the sampler that drew the images is recorded, and another guidance or step count is refused too
    progress = json.loads((part / "progress.json").read_text())
    assert progress["settings"]["sampling"] == {"solver": "ode", "steps": 6, "guidance": 4.5}, progress["settings"]
    proc = _data(tmp_path, part, "num_prompts=4", "sampler.guidance_scale=2")
    assert proc.returncode != 0 and "written with other settings (sampling)" in proc.stderr
    # datagen.guidance_scale draws at another CFG scale than the eval's (shapes_sft: 1), recorded alike
    g1 = tmp_path / "g1"
    assert _data(tmp_path, g1, "num_prompts=1", "guidance_scale=1").returncode == 0
    assert json.loads((g1 / "progress.json").read_text())["settings"]["sampling"]["guidance"] == 1.0
    assert (g1 / "images" / "00000_00.png").read_bytes() != (part / "images" / "00000_00.png").read_bytes()
    proc = _data(tmp_path, tmp_path / "g0", "num_prompts=1", "guidance_scale=0.5")
    assert proc.returncode != 0 and "datagen.guidance_scale=0.5: give a CFG scale >= 1" in proc.stderr
    # a directory written before the sampler was recorded resumes (its settings lack the key)
    del progress["settings"]["sampling"]
    (part / "progress.json").write_text(json.dumps(progress))
    assert _data(tmp_path, part, "num_prompts=4").returncode == 0
    proc = _data(tmp_path, tmp_path / "x", "kind=triples")
    assert proc.returncode != 0 and "kind='triples' is not known" in proc.stderr


def test_kinds_derived_from_a_lists_run_equal_the_sampled_ones(tmp_path):
    """One sampling pass (kind=lists) serves every offline method: pairs, labels and captions derived from it are,
    byte for byte, the files sampling runs of those kinds write (same keyed images, same scores)."""
    lists = tmp_path / "lists"
    assert _data(tmp_path, lists, "num_prompts=3", "kind=lists").returncode == 0
    assert len(ImageDataset.load(lists / "lists.jsonl", "lists")) == 3
    for kind in ("pairs", "labels", "captions"):
        sampled = tmp_path / f"sampled_{kind}"
        assert _data(tmp_path, sampled, "num_prompts=3", f"kind={kind}").returncode == 0
        assert (sampled / "lists.jsonl").read_text() == (lists / "lists.jsonl").read_text()  # kept by every kind
        proc = _data(tmp_path, lists, f"kind={kind}", f"from_lists={lists}")  # written beside lists.jsonl
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert (lists / f"{kind}.jsonl").read_text() == (sampled / f"{kind}.jsonl").read_text()
        ImageDataset.load(lists / f"{kind}.jsonl", kind).validate()
    # another out=: the image paths are rewritten relative to it, the images the same files
    other = tmp_path / "elsewhere" / "d"
    assert _data(tmp_path, other, "kind=pairs", f"from_lists={lists / 'lists.jsonl'}").returncode == 0
    moved, here = ImageDataset.load(other / "pairs.jsonl", "pairs"), ImageDataset.load(lists / "pairs.jsonl", "pairs")
    assert [[p.resolve() for p in r.images] for r in moved.rows] == [[p.resolve() for p in r.images] for r in here.rows]
    assert not (other / "images").exists()
    # a pairs run's own directory, no out=: its labels derived in place from the scores it kept; a line the run
    # had not committed (progress.json counts them: a crash, or a run still going) is not read
    from conftest import run_inprocess

    pairs_run = tmp_path / "sampled_pairs"
    with open(pairs_run / "lists.jsonl", "a") as fh:
        fh.write('{"prompt": "half-writ')
    proc = run_inprocess("data", "kind=labels", f"from_lists={pairs_run}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (pairs_run / "labels.jsonl").read_text() == (lists / "labels.jsonl").read_text()
    # a lists file copied without its images is refused when deriving, not when training
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "lists.jsonl").write_text((lists / "lists.jsonl").read_text())
    proc = _data(tmp_path, bare, "kind=pairs", f"from_lists={bare}")
    assert proc.returncode != 0 and "does not exist" in proc.stderr and "copy the run's images/" in proc.stderr
    assert not (bare / "pairs.jsonl").exists()
    # refused in one line: an existing file, kind=lists, a missing source
    proc = _data(tmp_path, lists, "kind=pairs", f"from_lists={lists}")
    assert proc.returncode != 0 and "pairs.jsonl exists; remove it or give another out=" in proc.stderr
    proc = _data(tmp_path, lists, "kind=lists", f"from_lists={lists}")
    assert proc.returncode != 0 and "kind=lists is the source itself" in proc.stderr
    proc = _data(tmp_path, tmp_path / "y", "kind=pairs", f"from_lists={tmp_path / 'nothing'}")
    assert proc.returncode != 0 and "is not a lists .jsonl" in proc.stderr
    # captions=top: every image tied with each prompt's best score (captions=best keeps the first of them)
    top = tmp_path / "top"
    proc = _data(tmp_path, top, "kind=captions", "captions=top", f"from_lists={lists}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    want = sum(sum(s == max(r.scores) for s in r.scores) for r in ImageDataset.load(lists / "lists.jsonl", "lists").rows)
    assert len(ImageDataset.load(top / "captions.jsonl", "captions")) == want >= 3
    proc = _data(tmp_path, tmp_path / "z", "kind=captions", "captions=all", f"from_lists={lists}")
    assert proc.returncode != 0 and "captions='all' is not known" in proc.stderr


def _pickapic_parquet(directory, n=5):
    """A Pick-a-Pic v2 layout parquet file: caption, jpg_0/jpg_1 (JPEG bytes), label_0 (row 2 a tie), PickScore
    cosines (SmPO's preprocessing columns)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    def jpeg(colour):
        buf = io.BytesIO()
        Image.new("RGB", (40, 24), colour).save(buf, format="JPEG")
        return buf.getvalue()

    directory.mkdir(parents=True)
    table = pa.table({
        "caption": [f"prompt {i}" for i in range(n)],
        "jpg_0": [jpeg((10 * i, 0, 0)) for i in range(n)],
        "jpg_1": [jpeg((0, 10 * i, 0)) for i in range(n)],
        "label_0": [1.0, 0.0, 0.5, 1.0, 0.0][:n],
        "ps_score_0": [0.2, 0.15, 0.2, 0.22, 0.12][:n],
        "ps_score_1": [0.18, 0.21, 0.2, 0.19, 0.2][:n],
        "best_image_uid": [f"uid{i}" for i in range(n)],
    })
    pq.write_table(table, directory / "train-00000-of-00001.parquet")
    return directory


def test_a_pickapic_layout_dataset_imports_resumes_and_trains(tmp_path):
    """`alignrl data source=<dir>` reads a Pick-a-Pic-layout parquet directory with `datasets` (streamed), writes
    the images as they are and pairs rows; training reads them with ties dropped and the winner first (label_0 0:
    image_1 preferred), scores kept for SmPO. An interrupted import resumes to the same file."""
    from conftest import run_inprocess

    src = _pickapic_parquet(tmp_path / "pickapic")
    part = tmp_path / "part"
    proc = run_inprocess("data", "recipe=tiny_diffusion_dpo", f"source={src}", "kind=pairs", f"out={part}", "limit=2",
                         "progress=false", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_inprocess("data", "recipe=tiny_diffusion_dpo", f"source={src}", "kind=pairs", f"out={part}",
                         "progress=false", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    whole = tmp_path / "whole"
    assert run_inprocess("data", "recipe=tiny_diffusion_dpo", f"source={src}", "kind=pairs", f"out={whole}",
                         "progress=false", cwd=tmp_path).returncode == 0
    assert (part / "pairs.jsonl").read_text() == (whole / "pairs.jsonl").read_text()
    assert sorted(p.suffix for p in (whole / "images").iterdir()) == [".jpg"] * 10  # bytes as they were
    ds = ImageDataset.load(whole / "pairs.jsonl", "pairs")
    assert ds.dropped_ties == 1 and [r.prompt for r in ds.rows] == ["prompt 0", "prompt 1", "prompt 3", "prompt 4"]
    assert ds.validate()["sizes"] == {"40x24": 8}
    assert ds.rows[1].images[0].name == "00000001_1.jpg" and ds.rows[1].scores == pytest.approx([0.21, 0.15])
    run = tmp_path / "run"
    proc = run_inprocess("train", "recipe=tiny_diffusion_dpo", f"data.offline.path={whole / 'pairs.jsonl'}",
                         "data.offline.rows_per_iteration=4", "trainer.train_batch_size=4",
                         "trainer.updates_per_iteration=1", "trainer.max_steps=1", "trainer.eval_every=0",
                         "trainer.checkpoint_every=0", "logger.progress_bar=false", "logger.plots=false",
                         f"run_dir={run}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["policy_loss"] > 0
    # a layout without the kind's columns is one line naming them
    proc = run_inprocess("data", "recipe=tiny_diffusion_dpo", f"source={src}", "kind=labels", f"out={tmp_path / 'l'}",
                         "progress=false", cwd=tmp_path)
    assert proc.returncode != 0 and "no column jpg or image" in proc.stderr and "Traceback" not in proc.stderr
