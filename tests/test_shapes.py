"""ShapeWorld: renderer, prompt split, the exact judge, the reward and the shipped model."""

import json
import random
from importlib import resources

import numpy as np
import pytest
import torch

from alignrl.shapes.judge import check, detect, per_tag_table
from alignrl.shapes.world import (EVAL_PER_TAG, HELD_OUT_COLOR_SHAPE, RELATIONS, TAGS, all_prompts, eval_set,
                                  held_out_reasons, is_held_out, prompt_split, render_batch, sample_metadata)


def _sample_metas(n, seed=0):
    prompts = all_prompts()
    rng = random.Random(seed)
    return [rng.choice([m for m in prompts if m["tag"] == tag]) for tag in TAGS for _ in range(n // len(TAGS))]


def test_renderer_is_deterministic_per_seed():
    metas = _sample_metas(60)
    a, b = render_batch(metas, seed=3), render_batch(metas, seed=3)
    assert a.shape == (60, 32, 32, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(a, render_batch(metas, seed=4))


def test_judge_on_ground_truth_and_on_noise():
    metas = _sample_metas(1200, seed=1)
    images = render_batch(metas, seed=11)
    results = [check(im, m) for im, m in zip(images, metas)]
    table = per_tag_table(metas, results)
    assert set(table) == set(TAGS) | {"overall"}
    assert all(table[t]["strict"] >= 0.99 for t in TAGS), table
    noise = np.random.RandomState(0).randint(0, 256, (300, 32, 32, 3)).astype(np.uint8)
    noisy = [check(im, m) for im, m in zip(noise, metas)]
    assert np.mean([r["strict"] for r in noisy]) <= 0.01
    assert np.mean([r["partial"] for r in noisy]) <= 0.05
    black = [check(np.zeros((32, 32, 3), np.uint8), m) for m in metas[:50]]
    assert all(r["strict"] == 0 and r["partial"] == 0 for r in black)


def test_judge_partial_credit_and_wrong_answers():
    meta = next(m for m in all_prompts() if m["prompt"] == "three circles")
    img = render_batch([meta], seed=0)[0]
    assert check(img, meta) == {"conditions": [True, True], "strict": 1.0, "partial": 1.0, "detections": 3}
    two = next(m for m in all_prompts() if m["prompt"] == "two circles")
    r = check(img, two)  # circles present, but three of them
    assert r["conditions"] == [True, False] and r["strict"] == 0 and r["partial"] == 0.5
    left = next(m for m in all_prompts() if m["prompt"] == "a circle left of a square")
    flipped = render_batch([left], seed=5)[0][:, ::-1]  # mirror: now the circle is right of the square
    assert check(flipped, left)["conditions"] == [True, True, False]
    red = next(m for m in all_prompts() if m["prompt"] == "a red circle")
    wrong_colour = render_batch([red], seed=2)[0][..., [2, 1, 0]]  # red -> blue
    assert check(wrong_colour, red)["strict"] == 0
    assert [d.color for d in detect(wrong_colour)] == ["blue"]


def test_split_holds_out_compositions():
    train, in_dist, held_out = (prompt_split(s) for s in ("train", "in_dist", "held_out"))
    assert not any(is_held_out(m) for m in train + in_dist)
    shared = {m["prompt"] for m in train} & {m["prompt"] for m in held_out}
    assert shared == {"a circle", "a square", "a triangle"}  # single objects: nothing to hold out
    assert all(held_out_reasons(m) for m in held_out if m["tag"] != "single_object")
    assert set(TAGS) == {m["tag"] for m in in_dist} == {m["tag"] for m in held_out} == {m["tag"] for m in train}
    for m in train:
        for o in m["objects"]:
            assert (o["color"], o["shape"]) not in HELD_OUT_COLOR_SHAPE
    # no tag of the held-out set is one unseen composition: each spreads over several
    for tag in TAGS[1:]:
        reasons = {held_out_reasons(m)[0] for m in held_out if m["tag"] == tag}
        assert len(reasons) >= 3, (tag, reasons)
    # the shipped prompt files are exactly these sets (evaluation files: 40 rows per tag)
    files = {"train": train, "in_dist": eval_set("in_dist", fill=True), "held_out": eval_set("held_out", fill=True)}
    for split, rows in files.items():
        text = (resources.files("alignrl.prompts") / f"shapes_{split}.jsonl").read_text()
        assert [json.loads(x) for x in text.splitlines()] == rows
        if split != "train":
            assert all(sum(r["tag"] == t for r in rows) == EVAL_PER_TAG for t in TAGS)


def test_an_eval_subset_spreads_over_every_tag():
    """eval.num_prompts=N keeps N prompts round-robin over the tags: the eval files list tags in blocks, and the
    first 30 rows of the held-out set would be single objects only."""
    from alignrl.data import PromptSet
    from alignrl.eval.evaluate import Evaluator, spread_subset

    held_out = PromptSet.load("builtin:shapes_held_out", "data.eval.held_out")
    assert {m["tag"] for m in held_out.metadata[:30]} == {"single_object"}
    keep = spread_subset(held_out.metadata, 30)
    assert len(keep) == 30 and keep == sorted(set(keep))
    assert all(sum(held_out.metadata[i]["tag"] == t for i in keep) == 5 for t in TAGS)
    ev = Evaluator(None, None, held_out, None, seed=0, batch_size=8, num_prompts=13)
    assert {m["tag"] for m in ev.metadata} == set(TAGS) and len(ev.prompts) == 13
    assert ev.prompts == [held_out.prompts[i] for i in spread_subset(held_out.metadata, 13)]
    assert spread_subset([{}] * 10, 4) == [0, 3, 6, 9] and spread_subset([{}] * 3, 5) == [0, 1, 2]


def test_a_gain_is_bootstrapped_paired_over_prompts():
    from alignrl.eval.evaluate import bootstrap_gain, bootstrap_mean

    rng = np.random.default_rng(0)
    groups = [f"p{i // 4}" for i in range(240)]  # 60 prompts x 4 images
    ease = np.repeat(rng.uniform(0, 1, 60), 4)  # prompts differ a lot in difficulty
    before = (rng.uniform(0, 1, 240) < ease).astype(float)
    after = before.copy()
    flip = np.flatnonzero(before == 0)[:24]  # 24 failures become passes: +0.1
    after[flip] = 1.0
    gain, lo, hi = bootstrap_gain(before, after, groups)
    assert gain == pytest.approx(0.1) and 0 < lo < gain < hi
    _, b_lo, b_hi = bootstrap_mean(before, groups)
    _, a_lo, a_hi = bootstrap_mean(after, groups)
    assert a_lo < b_hi  # the two intervals of the means overlap: only the paired interval shows the gain
    assert bootstrap_gain(before, before, groups) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same images"):
        bootstrap_gain(before, after[:200], groups)


def test_pretraining_draws_fresh_training_compositions():
    """The pretraining sampler never draws a held-out composition, covers every tag, relation and count, and puts
    colour words on most objects."""
    rng = random.Random(0)
    metas = [sample_metadata(rng) for _ in range(6000)]
    assert not any(is_held_out(m) for m in metas)
    tags = {t: sum(m["tag"] == t for m in metas) for t in TAGS}
    assert min(tags.values()) > 800, tags  # uniform over tags: 1000 each
    assert {m["relation"]["type"] for m in metas if m["relation"]} == set(RELATIONS)
    assert {o["count"] for m in metas for o in m["objects"] if o["count"]} == {2, 3, 4}
    objs = [o for m in metas if m["tag"] != "single_object" for o in m["objects"]]
    assert sum(o["color"] is not None for o in objs) / len(objs) > 0.6
    assert len({m["prompt"] for m in metas}) > 400  # fresh compositions, not a fixed list
    drawn = [sample_metadata(rng, held_out=True) for _ in range(50)]  # the held-out side of the sampler
    assert all(is_held_out(m) or m["tag"] == "single_object" for m in drawn)


def test_shapes_reward_through_the_registry():
    from alignrl.rewards.base import WeightedReward

    metas = _sample_metas(12, seed=2)
    images = torch.from_numpy(render_batch(metas, seed=1)).permute(0, 3, 1, 2).float() / 255
    reward = WeightedReward.from_config({"shapes_geneval": {"weight": 1.0}})
    scores, info = reward(images, [m["prompt"] for m in metas], metas)
    assert np.allclose(scores, 1.0)
    assert info["shapes_geneval/strict"] == 1.0 and list(info["per_sample"]) == reward.per_sample_keys
    scores, _ = reward(torch.zeros_like(images), [m["prompt"] for m in metas], metas)
    assert np.allclose(scores, 0.0)
    with pytest.raises(Exception, match="no ShapeWorld metadata"):
        reward(images[:1], ["a circle"], [{}])


def test_the_default_recipe_and_the_variable_that_changes_it(monkeypatch):
    """`alignrl train` with no recipe runs tiny_flowgrpo (shapes_quick does not yet show a held-out gain in three
    minutes: docs/shapes.md); ALIGNRL_DEFAULT_RECIPE names another default, and an explicit recipe= wins."""
    from alignrl.config import compose

    monkeypatch.delenv("ALIGNRL_DEFAULT_RECIPE", raising=False)
    assert compose(["run_dir=/tmp/alignrl-default"]).backbone.name == "tiny_sd3"
    monkeypatch.setenv("ALIGNRL_DEFAULT_RECIPE", "shapes_quick")
    cfg = compose(["run_dir=/tmp/alignrl-default"])
    assert cfg.backbone.name == "shapes" and cfg.trainer.max_minutes == 3
    assert cfg.sampler.guidance_scale == 3.0 and cfg.sampler.eval_guidance_scale is None  # one policy
    assert compose(["recipe=tiny_flowgrpo_flux", "run_dir=/tmp/alignrl-default"]).backbone.name == "tiny_flux"
    from conftest import run_inprocess  # the command line takes the same path

    res = run_inprocess("train", "--cfg", "job", env={"ALIGNRL_DEFAULT_RECIPE": "shapes_quick"})
    assert res.returncode == 0 and "name: shapes\n" in res.stdout and "max_minutes: 3" in res.stdout, res.stderr
    # placed with the other overrides, so Hydra's flags keep working around it
    from alignrl.cli import _with_default_recipe

    assert _with_default_recipe(["-m", "seed=1,2", "x=1"]) == ["-m", "recipe=shapes_quick", "seed=1,2", "x=1"]
    assert _with_default_recipe(["--cfg", "job", "x=1"]) == ["--cfg", "job", "recipe=shapes_quick", "x=1"]
    assert _with_default_recipe(["x=1", "--cfg", "job"]) == ["recipe=shapes_quick", "x=1", "--cfg", "job"]
    assert _with_default_recipe(["--cfg", "job"]) == ["--cfg", "job", "recipe=shapes_quick"]
    assert _with_default_recipe(["recipe=tiny_flowgrpo", "-m"]) == ["recipe=tiny_flowgrpo", "-m"]
    monkeypatch.delenv("ALIGNRL_DEFAULT_RECIPE")
    assert _with_default_recipe(["-m", "seed=1,2"]) == ["-m", "seed=1,2"]


def test_flowgrpo_raises_the_judge_reward_on_a_small_prompt_set(tmp_path):
    """The CI-sized learning test: `alignrl train recipe=shapes_flowgrpo` (CFG-free here: half the cost) on four
    prompts that all ask for red objects; eight Flow-GRPO iterations (about 45 s on 2 idle cores) must lift the
    judge's partial credit on those prompts by a clear margin. Measured on the v2 model: 0.688 -> 0.906 (strict
    0.625 -> 0.844). The same test on four held-out two-object prompts showed no gain (docs/shapes.md)."""
    from conftest import run_inprocess

    prompts = tmp_path / "red.jsonl"
    rows = [{"prompt": f"a red {s}", "tag": "colors", "objects": [{"shape": s, "color": "red", "count": None}],
             "relation": None} for s in ("circle", "square", "triangle")]
    rows.append({"prompt": "two red circles", "tag": "counting",
                 "objects": [{"shape": "circle", "color": "red", "count": 2}], "relation": None})
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_dir = tmp_path / "run"
    res = run_inprocess(
        "train", "recipe=shapes_flowgrpo", f"data.train={prompts}", f"data.eval={prompts}",
        "data.groups_per_iteration=4", "data.balance=null", "trainer.rollout_batch_size=32",
        "trainer.train_batch_size=16", "trainer.max_steps=8", "trainer.eval_every=8", "trainer.eval_at_start=true",
        "sampler.guidance_scale=1.0", "sampler.eval_num_steps=8", "eval.images_per_prompt=8",
        "eval.batch_size=32", "eval.num_prompts=null", "trainer.log_images_every=0", "trainer.checkpoint_every=0",
        "trainer.max_minutes=null", "trainer.eval_every_minutes=null", "logger.plots=false",
        "logger.progress_bar=false", f"run_dir={run_dir}",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    evals = [m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if "eval/shapes_geneval/partial_mean" in m]
    assert [m["step"] for m in evals] == [0, 8]
    before, after = (m["eval/shapes_geneval/partial_mean"] for m in evals)
    assert after >= before + 0.15, (before, after)
    log = (run_dir / "alignrl.log").read_text().splitlines()  # lines are "[time] alignrl: ..."
    line = next(ln for ln in log if "alignrl: eval/images/strict:" in ln)
    gain = evals[1]["eval/images/strict"] - evals[0]["eval/images/strict"]
    lo, hi = map(float, line.split("gain 95% CI ")[1].split(" (paired")[0].split(" to "))
    assert f"({gain:+.3f})" in line and lo <= gain <= hi and hi - lo < 1, line  # the paired interval of the gain
    its = [m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "time/rollout" in m]
    assert len(its) == 8 and all(m["time/update"] > 0 for m in its)
