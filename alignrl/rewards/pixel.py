"""Differentiable pixel-statistic rewards (no model, no download): cheap signals for the reward-gradient methods
on tiny models and CPUs, and smooth stand-ins for the JPEG rewards."""

from __future__ import annotations

import numpy as np
import torch

from alignrl.rewards.base import Reward, register_reward


@register_reward("smoothness")
class Smoothness(Reward):
    """Minus the mean absolute difference between neighbouring pixels (total variation per pixel and channel),
    times ``scale`` (100: images in [0, 1] score about -1 to 0 on the tiny model, flat images 0). A smooth,
    differentiable proxy of JPEG compressibility: neighbours that agree are what JPEG's DCT compresses."""

    differentiable = True

    def __init__(self, scale: float = 100.0):
        self.scale = float(scale)

    def score_tensor(self, images: torch.Tensor, prompts, metadata=None) -> torch.Tensor:
        x = images.float()
        tv = (x[..., 1:, :] - x[..., :-1, :]).abs().mean(dim=(1, 2, 3)) + \
            (x[..., :, 1:] - x[..., :, :-1]).abs().mean(dim=(1, 2, 3))
        return -self.scale * tv

    def __call__(self, images, prompts, metadata):
        with torch.no_grad():
            scores = self.score_tensor(images, prompts, metadata)
        return scores.cpu().double().numpy().astype(np.float64), {}
