"""Reward registry, the JPEG rewards, weighted multi-reward and the async runner."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from alignrl.errors import ConfigError, RewardError
from alignrl.rewards.base import REWARDS, WeightedReward, available_rewards, build_reward, register_reward
from alignrl.rewards.runner import AsyncRewardRunner


def _images(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g)


def test_jpeg_matches_definition():
    imgs = _images()
    scores, info = build_reward("jpeg_incompressibility")(imgs, ["p"] * 3, [{}] * 3)
    for i in range(3):
        arr = (imgs[i].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=95)
        assert scores[i] == pytest.approx(len(buf.getvalue()) / 1000)
    comp, _ = build_reward("jpeg_compressibility")(imgs, ["p"] * 3, [{}] * 3)
    assert np.allclose(comp, -scores)
    flat = torch.full((1, 3, 32, 32), 0.5)
    assert build_reward("jpeg_compressibility")(flat, ["p"], [{}])[0][0] > comp.max()  # flat compresses better


def test_weighted_multi_reward():
    w = WeightedReward.from_config({"jpeg_incompressibility": 2.0, "jpeg_compressibility": {"weight": 0.5}})
    imgs = _images()
    total, info = w(imgs, ["p"] * 3, [{}] * 3)
    inc = info["per_reward"]["jpeg_incompressibility"]
    assert np.allclose(total, 2.0 * inc - 0.5 * inc)
    assert "jpeg_incompressibility/size_kb" in info


def test_unknown_reward_and_bad_options():
    with pytest.raises(ConfigError, match="unknown reward 'nope'"):
        WeightedReward.from_config({"nope": 1.0})
    with pytest.raises(ConfigError, match="bad options"):
        WeightedReward.from_config({"jpeg_compressibility": {"weight": 1.0, "bogus": 3}})
    assert "jpeg_compressibility" in available_rewards()


def test_exception_inside_reward_names_it():
    @register_reward("_test_broken")
    class Broken:
        def __call__(self, images, prompts, metadata):
            raise RuntimeError("model exploded")

    try:
        w = WeightedReward.from_config({"_test_broken": 1.0})
        with pytest.raises(RewardError, match="reward '_test_broken' raised RuntimeError: model exploded"):
            w(_images(1), ["p"], [{}])
        runner = AsyncRewardRunner(w)
        fut = runner.submit(_images(1), ["p"], [{}])
        with pytest.raises(RewardError, match="_test_broken"):
            fut.result()
        runner.close()
    finally:
        REWARDS.pop("_test_broken")


def test_async_runner_overlaps_and_returns_in_order():
    import threading
    import time

    thread_names = []

    class Slow:
        def __call__(self, images, prompts, metadata):
            thread_names.append(threading.current_thread().name)
            time.sleep(0.05)
            return np.array([float(p) for p in prompts]), {}

    runner = AsyncRewardRunner(WeightedReward({"slow": Slow()}, {"slow": 1.0}))
    futures = [runner.submit(_images(2), [str(i), str(i + 1)], [{}, {}]) for i in range(3)]
    assert not all(f.done() for f in futures)  # submit returns before scoring finishes
    results = [f.result()[0] for f in futures]
    assert [r.tolist() for r in results] == [[0, 1], [1, 2], [2, 3]]
    assert all(n.startswith("reward") for n in thread_names)
    runner.close()


class BrightnessReward:
    """A reward of the user's own package, reached through ``_target_``: mean brightness times ``scale``."""

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def __call__(self, images, prompts, metadata):
        return (images.float().mean(dim=(1, 2, 3)) * self.scale).numpy(), {}


def test_a_reward_of_ones_own_is_built_from_its_target():
    import torch

    from alignrl.errors import ConfigError
    from alignrl.rewards.base import WeightedReward

    spec = {"bright": {"_target_": f"{__name__}.BrightnessReward", "scale": 2.0, "weight": 0.5}}
    reward = WeightedReward.from_config(spec)
    images = torch.stack([torch.zeros(3, 4, 4), torch.ones(3, 4, 4)])
    total, info = reward(images, ["a", "b"], [{}, {}])
    assert total.tolist() == [0.0, 1.0] and info["per_reward"]["bright"].tolist() == [0.0, 2.0]
    with pytest.raises(ConfigError, match=r"reward 'bright' .* got bad options \['colour'\]"):
        WeightedReward.from_config({"bright": {"_target_": f"{__name__}.BrightnessReward", "colour": 1}})
    with pytest.raises(ConfigError, match=r"reward.bright._target_=.*has no 'Nope'"):
        WeightedReward.from_config({"bright": {"_target_": f"{__name__}.Nope"}})
