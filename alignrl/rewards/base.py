"""Reward registry and the weighted multi-reward.

A reward is a callable ``score(images, prompts, metadata) -> (scores, info)``:

- ``images``: float tensor (B, 3, H, W) in [0, 1] on the CPU (rewards move it where they need it); videos are
  (B, F, 3, H, W). A reward whose class sets ``video = True`` takes the clips whole; every other reward is applied
  frame by frame and its frame scores reduced per clip by the reward's ``frames`` option (``mean`` (default),
  ``min``, ``first`` or ``last``: the last two score only that frame; ``mean_positive``: the mean of the frames
  scoring above 0, 0 when none does, as Flow-GRPO's video OCR reward) over every ``frame_stride``-th frame
- ``prompts``: list of B strings; ``metadata``: list of B dicts (may be empty dicts)
- ``scores``: float64 numpy array (B,); NaN/inf marks a sample the reward could not score
- ``info``: dict of extra per-batch numbers to log

Register with ``@register_reward("name")`` on a class whose constructor takes keyword options from
the recipe (``reward: {name: {weight: 1.0, option: ...}}``). ``differentiable`` on a reward says its
``score_tensor`` keeps the autograd graph from the images to the scores (the reward-gradient methods need it:
``smoothness``, ``shapes_soft``, ``shapes_seg``, and the CLIP family and HPSv2 with ``differentiable: true``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch

from alignrl.errors import AlignError, ConfigError, RewardError
from alignrl.locate import locate

REWARDS: dict[str, type] = {}


def register_reward(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        if name in REWARDS and REWARDS[name] is not cls:
            raise ValueError(f"reward '{name}' is already registered")
        REWARDS[name] = cls
        cls.reward_name = name
        return cls

    return deco


def available_rewards() -> list[str]:
    _import_builtins()
    return sorted(REWARDS)


def _import_builtins() -> None:
    from alignrl.rewards import clip, jpeg, ocr, optional, pixel, remote, shapes, video, vlm  # noqa: F401  (they register)


FRAME_REDUCTIONS = ("mean", "min", "first", "last", "mean_positive")


def frames_option(value: Any, stride: Any, name: str) -> tuple[str, int]:
    v = str(value)
    if v not in FRAME_REDUCTIONS:
        raise ConfigError(f"reward.{name}.frames={value!r}: how a video's frame scores are reduced is one of "
                          f"{', '.join(FRAME_REDUCTIONS)}")
    try:
        k = int(stride)
    except (TypeError, ValueError):
        k = 0
    if k < 1 or str(k) != str(stride).strip():
        raise ConfigError(f"reward.{name}.frame_stride={stride!r}: score every k-th frame, k a positive integer")
    return v, k


class FrameWise:
    """How an image reward scores videos (B, F, 3, H, W): the frames it scores (every ``stride``-th from the first;
    only the first or last for those reductions), flattened into one image batch with each clip's prompt and
    metadata repeated, and the reduction of their scores back to one per clip."""

    def __init__(self, videos: torch.Tensor, prompts: list[str], metadata: list[dict], reduction: str,
                 stride: int = 1):
        self.reduction, self.batch = reduction, videos.shape[0]
        pick = {"first": slice(0, 1), "last": slice(-1, None)}.get(reduction, slice(None, None, stride))
        clips = videos[:, pick]
        self.frames = clips.shape[1]
        self.images = clips.flatten(0, 1)
        self.prompts = [p for p in prompts for _ in range(self.frames)]
        self.metadata = [m for m in metadata for _ in range(self.frames)]

    def reduce(self, scores: torch.Tensor) -> torch.Tensor:
        """(B * F,) frame scores -> (B,) clip scores (a NaN frame makes its clip NaN); keeps the graph."""
        per_clip = scores.reshape(self.batch, self.frames)
        if self.reduction == "min":
            return per_clip.min(1).values
        if self.reduction == "mean_positive":
            positive = per_clip > 0
            count = positive.sum(1)
            out = torch.where(count > 0, (per_clip * positive).sum(1) / count.clamp(min=1), torch.zeros_like(count,
                              dtype=per_clip.dtype))
            return torch.where(per_clip.isnan().any(1), torch.full_like(out, float("nan")), out)
        return per_clip.mean(1)

    def reduce_numpy(self, values) -> np.ndarray:
        """``reduce`` of per-frame numbers (scores, per-sample metrics) in float64."""
        return self.reduce(torch.as_tensor(np.asarray(values, dtype=np.float64))).numpy()


class Reward:
    """Base class (optional): a reward only needs ``__call__``."""

    reward_name = "reward"
    differentiable = False  # score_tensor keeps the graph from the images to the scores
    video = False  # takes (B, F, 3, H, W) clips whole; else videos are scored frame by frame
    # names of per-sample metrics the reward returns in info["per_sample"] (evaluation tables use them)
    per_sample_keys: tuple[str, ...] = ()

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]):
        raise NotImplementedError

    def score_tensor(self, images: torch.Tensor, prompts, metadata=None) -> torch.Tensor:
        """Scores (B,) float32 on the images' device. This default scores through ``__call__`` without a graph;
        differentiable rewards override it and keep the graph."""
        prompts = list(prompts)
        scores, _ = self(images.detach(), prompts, list(metadata) if metadata is not None else [{}] * len(prompts))
        return torch.as_tensor(np.asarray(scores, dtype=np.float32), device=images.device)


def build_reward(name: str, **options) -> Reward:
    _import_builtins()
    if name not in REWARDS:
        raise ConfigError(f"unknown reward '{name}'; available: {', '.join(sorted(REWARDS))}")
    try:
        return REWARDS[name](**options)
    except TypeError as e:
        raise ConfigError(f"reward '{name}' got bad options {sorted(options)}: {e}") from None


def _build_target(target: str, name: str, options: dict):
    cls = locate(str(target), f"reward.{name}._target_")
    try:
        reward = cls(**options)
    except TypeError as e:
        raise ConfigError(f"reward '{name}' ({target}) got bad options {sorted(options)}: {e}") from None
    if not callable(reward):
        raise ConfigError(f"reward '{name}' ({target}) is not callable: a reward maps (images, prompts, metadata) "
                          f"to (scores, info)")
    return reward


@dataclass
class WeightedReward:
    """Several rewards with weights; the training reward is the weighted sum (``reward_aggr``).

    Per-reward scores come back in ``info['per_reward']`` so each is logged separately (and so a
    per-reward advantage aggregation can use them).
    """

    rewards: dict[str, Reward]
    weights: dict[str, float]
    frames: dict[str, tuple[str, int]] = field(default_factory=dict)  # per reward: (reduction, frame stride)

    @classmethod
    def from_config(cls, spec: Mapping[str, Any]) -> "WeightedReward":
        """``spec`` maps reward name -> weight, or -> {weight: w, type: <registered reward>, **options}, or
        -> {weight: w, _target_: package.module.Class, **options} for a reward of the user's own package.

        ``type`` (default: the name itself) lets one reward class appear under several names, e.g. two
        ``remote`` servers, or ``geneval`` as a ``remote`` reward; the name is what gets logged.
        """
        if not spec:
            raise ConfigError("no reward configured; pick one with reward=<name> (see `alignrl recipes --rewards`)")
        rewards, weights, frames = {}, {}, {}
        for name, value in spec.items():
            options = dict(value) if isinstance(value, Mapping) else {"weight": value}
            frames[name] = frames_option(options.pop("frames", "mean"), options.pop("frame_stride", 1), name)
            raw = options.pop("weight", 1.0)
            try:
                weight = float(raw)
            except (TypeError, ValueError):
                raise ConfigError(f"reward '{name}' has weight {raw!r}; give a number (reward.{name}.weight=1.0)") from None
            target = options.pop("_target_", None)
            kind = str(options.pop("type", name))
            try:
                rewards[name] = _build_target(target, name, options) if target else build_reward(kind, **options)
            except AlignError as e:
                if kind == name:
                    raise
                # the options live under reward.<name> in this config: say so in the message
                raise type(e)(str(e).replace(f"reward.{kind}.", f"reward.{name}.")) from None
            weights[name] = weight
        return cls(rewards, weights, frames)

    def _frame_wise(self, name: str, fn, images: torch.Tensor, prompts: list[str], metadata: list[dict]):
        """A ``FrameWise`` view when ``images`` are videos and reward ``name`` scores images, else None."""
        if images.ndim != 5 or getattr(fn, "video", False):
            return None
        return FrameWise(images, prompts, metadata, *self.frames.get(name, ("mean", 1)))

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]):
        total = np.zeros(len(prompts), dtype=np.float64)
        per_reward: dict[str, np.ndarray] = {}
        per_sample: dict[str, np.ndarray] = {}
        info: dict = {}
        for name, fn in self.rewards.items():
            view = self._frame_wise(name, fn, images, prompts, metadata)
            try:
                if view is None:
                    scores, extra = fn(images, prompts, metadata)
                else:
                    scores, extra = fn(view.images, view.prompts, view.metadata)
            except Exception as e:  # name the reward in the error; the trainer stops with it
                raise RewardError(f"reward '{name}' raised {type(e).__name__}: {e}") from e
            scores = np.asarray(scores, dtype=np.float64).reshape(-1)
            if view is not None:
                if scores.shape[0] != len(view.prompts):
                    raise RewardError(f"reward '{name}' returned {scores.shape[0]} scores for {len(view.prompts)} "
                                      f"frames")
                scores = view.reduce_numpy(scores)
                if extra and "per_sample" in extra:
                    extra = {**extra, "per_sample": {m: view.reduce_numpy(a) for m, a in extra["per_sample"].items()}}
            if scores.shape[0] != len(prompts):
                raise RewardError(f"reward '{name}' returned {scores.shape[0]} scores for {len(prompts)} images")
            per_reward[name] = scores
            total += self.weights[name] * scores  # NaN in any reward makes the total NaN: sample dropped
            for k, v in (extra or {}).items():
                if k == "per_sample":
                    per_sample.update({f"{name}/{m}": np.asarray(a, dtype=np.float64) for m, a in v.items()})
                else:
                    info[f"{name}/{k}"] = v
        return total, {"per_reward": per_reward, "per_sample": per_sample, **info}

    @property
    def gradient_rewards(self) -> dict[str, Reward]:
        """The rewards a reward-gradient method differentiates: those with a nonzero weight (a weight-0 reward
        is only logged, e.g. the exact metric beside its differentiable surrogate)."""
        return {n: r for n, r in self.rewards.items() if self.weights[n] != 0}

    @property
    def not_differentiable(self) -> list[str]:
        """The nonzero-weight rewards whose scores carry no graph (a reward-gradient method cannot use them)."""
        return [n for n, r in self.gradient_rewards.items() if not getattr(r, "differentiable", False)]

    @property
    def differentiable(self) -> bool:
        return not self.not_differentiable

    def score_tensor(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        """The weighted total (B,) with the graph of every nonzero-weight reward."""
        total = torch.zeros(len(prompts), device=images.device)
        for name, fn in self.gradient_rewards.items():
            view = self._frame_wise(name, fn, images, prompts, metadata)
            try:
                if view is None:
                    scores = fn.score_tensor(images, prompts, metadata).to(images.device).float().reshape(-1)
                else:
                    scores = view.reduce(fn.score_tensor(view.images, view.prompts, view.metadata)
                                         .to(images.device).float().reshape(-1))
            except Exception as e:  # name the reward in the error; the trainer stops with it
                raise RewardError(f"reward '{name}' raised {type(e).__name__}: {e}") from e
            if scores.shape[0] != len(prompts):
                raise RewardError(f"reward '{name}' returned {scores.shape[0]} scores for {len(prompts)} images")
            total = total + self.weights[name] * scores
        return total

    @property
    def per_sample_keys(self) -> list[str]:
        """``<reward>/<metric>`` for every per-sample metric the rewards declare (same on every rank)."""
        return [f"{n}/{k}" for n, r in self.rewards.items() for k in getattr(r, "per_sample_keys", ())]
