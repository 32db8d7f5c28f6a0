"""ShapeWorld's exact judge as a reward: the fraction of satisfied sub-conditions (partial credit, the
training reward, as Flow-GRPO's GenEval reward), with the strict 0/1 score per sample alongside."""

from __future__ import annotations

import numpy as np

from alignrl.rewards.base import Reward, register_reward
from alignrl.rewards.jpeg import to_uint8


@register_reward("shapes_geneval")
class ShapesGenEval(Reward):
    per_sample_keys = ("strict", "partial")

    def __init__(self, score: str = "partial"):
        if score not in ("partial", "strict"):
            raise ValueError(f"score must be partial or strict, got {score!r}")
        self.score = score

    def __call__(self, images, prompts, metadata):
        from alignrl.shapes.judge import check

        for m, p in zip(metadata, prompts):
            if "objects" not in m:
                raise ValueError(f"prompt {p!r} has no ShapeWorld metadata (use data=shapes prompt sets)")
        results = [check(img, m) for img, m in zip(to_uint8(images), metadata)]
        strict = np.array([r["strict"] for r in results])
        partial = np.array([r["partial"] for r in results])
        return (partial if self.score == "partial" else strict), {
            "strict": float(strict.mean()), "partial": float(partial.mean()),
            "per_sample": {"strict": strict, "partial": partial},
        }
