"""ShapeWorld: renderer, prompt split, the exact judge, the reward and the shipped model."""

import json
import random
from importlib import resources

import numpy as np
import pytest
import torch

from alignrl.shapes.judge import check, detect, per_tag_table
from alignrl.shapes.world import (HELD_OUT_COLOR_SHAPE, TAGS, all_prompts, is_held_out, prompt_split,
                                  render_batch)


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
    train, ev = prompt_split("train"), prompt_split("eval")
    shared = {m["prompt"] for m in train} & {m["prompt"] for m in ev}
    assert shared == {"a circle", "a square", "a triangle"}  # single objects: nothing to hold out
    assert not any(is_held_out(m) for m in train)
    assert all(is_held_out(m) for m in ev if m["tag"] != "single_object")
    assert {t for t in TAGS} == {m["tag"] for m in ev} == {m["tag"] for m in train}
    for m in train:
        for o in m["objects"]:
            assert (o["color"], o["shape"]) not in HELD_OUT_COLOR_SHAPE
    # the shipped prompt files are exactly these sets
    for split, rows in (("train", train), ("eval", ev)):
        text = (resources.files("alignrl.prompts") / f"shapes_{split}.jsonl").read_text()
        assert [json.loads(x) for x in text.splitlines()] == rows


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
