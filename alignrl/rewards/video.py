"""Video rewards: they take whole clips (B, F, 3, H, W) in [0, 1] (``video = True``). Image rewards score
videos frame by frame without any of this (alignrl/rewards/base.py, the ``frames:`` option).

- ``motion``: how much the clip moves, the mean absolute difference between consecutive frames per pixel and
  channel (0: a still clip; 1: black and white swapping every frame), times ``scale``. With ``target`` set the
  score is ``-scale * |motion - target|``: a clip that moves as much as the target scores 0. Frame differences
  measure change of any cause (motion, flicker, a cut); optical flow would separate them, at a model's cost.
- ``temporal_consistency``: the mean cosine similarity of consecutive frames' embeddings (1: every frame alike).
  ``features: pixels`` (default, no model) embeds a frame as its pixels average-pooled to ``size`` x ``size``
  and centred per frame, so lighting shifts count less than content changes; ``features: clip`` embeds with a
  CLIP image tower (``model``, ``processor``: hub ids or local directories; needs the CLIP extra's weights).

Both are differentiable with ``features: pixels``: ``score_tensor`` keeps the graph.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from alignrl.errors import ConfigError
from alignrl.rewards.base import Reward, register_reward


def _clips(images: torch.Tensor, reward: str) -> torch.Tensor:
    if images.ndim != 5:
        raise ValueError(f"{reward} scores videos (B, F, 3, H, W); got images of shape {tuple(images.shape)} (use "
                         f"it with a video backbone such as wan21)")
    if images.shape[1] < 2:
        raise ValueError(f"{reward} needs at least 2 frames per clip; got {images.shape[1]}")
    return images.float()


class _TensorReward(Reward):
    def __call__(self, images, prompts, metadata):
        with torch.no_grad():
            scores = self.score_tensor(images, prompts, metadata)
        return scores.detach().cpu().double().numpy().astype(np.float64), {}


@register_reward("motion")
class Motion(_TensorReward):
    video = True
    differentiable = True

    def __init__(self, scale: float = 1.0, target: float | None = None):
        self.scale = float(scale)
        self.target = None if target is None else float(target)
        if self.target is not None and not 0.0 <= self.target <= 1.0:
            raise ConfigError(f"reward.motion.target={target}: a mean frame difference lies in [0, 1]")

    def score_tensor(self, images, prompts, metadata=None):
        x = _clips(images, "motion")
        motion = (x[:, 1:] - x[:, :-1]).abs().mean(dim=(1, 2, 3, 4))
        if self.target is None:
            return self.scale * motion
        return -self.scale * (motion - self.target).abs()


@register_reward("temporal_consistency")
class TemporalConsistency(_TensorReward):
    video = True

    def __init__(self, features: str = "pixels", size: int = 16, model: str | None = None,
                 processor: str | None = None, device: Any = "auto"):
        if features not in ("pixels", "clip"):
            raise ConfigError(f"reward.temporal_consistency.features={features!r}: use pixels or clip")
        self.features, self.size = features, int(size)
        if self.size < 1:
            raise ConfigError(f"reward.temporal_consistency.size={size}: a positive number of pixels")
        self.differentiable = features == "pixels"
        self._clip = None
        if features == "clip":
            from alignrl.rewards.clip import ClipScore

            self._clip = ClipScore(model=model, processor=processor, device=device)

    def _embed(self, frames: torch.Tensor) -> torch.Tensor:
        if self._clip is not None:
            with torch.no_grad():
                return self._clip.embed_images(frames).float().to(frames.device)
        pooled = F.adaptive_avg_pool2d(frames, self.size).flatten(1)
        return pooled - pooled.mean(1, keepdim=True)

    def score_tensor(self, images, prompts, metadata=None):
        x = _clips(images, "temporal_consistency")
        b, f = x.shape[:2]
        emb = self._embed(x.flatten(0, 1)).reshape(b, f, -1)
        return F.cosine_similarity(emb[:, 1:], emb[:, :-1], dim=-1, eps=1e-6).mean(1)
