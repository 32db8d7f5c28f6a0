"""Losses on the final samples, with no log-probs: AWM and DiffusionNFT.

Rollouts may use any sampler (ODE included); only each image's clean latent ``x0`` and its advantage are
kept. The trainer draws, per sample, ``num_train_timesteps`` stratified times from the rollout grid
(pure noise excluded) and fresh noise ``eps``, builds ``x_t = (1 - t) x0 + t eps`` and asks the loss for
the velocity at ``x_t`` without CFG.

AWM (advantage-weighted matching)::

    mse  = mean_dims((v_theta - (eps - x0))^2)
    loss = A' * w(t, mse) + beta * mean_dims((v_theta - v_ref)^2),   A' = clip(A, +-5) / 5

with ``w`` the plain MSE (``weighting=mse``, the paper's core) or the reference's generalised Huber
``t ((mse + 1e-10)^p - 1e-10^p) / p`` (``weighting=huber``, p = 0.25).

DiffusionNFT (negative-aware fine-tuning)::

    r       = clamp(clip(A, +-5) / 5 / 2 + 0.5, 0, 1)
    v_plus  = b v_theta + (1 - b) v_old ;   v_minus = (1 + b) v_old - b v_theta
    loss    = [r ||x_t - t v_plus - x0||^2 / w_plus + (1 - r) ||x_t - t v_minus - x0||^2 / w_minus] / b

with adaptive weights ``w = mean|x0_hat - x0|`` (no gradient, at least 1e-5). The old policy is
``old_policy``: ``ema`` (the reference's choice: the trainer's EMA of the trainable weights both draws the
rollouts and gives ``v_old``; ``trainer.ema`` sets its decay) or ``sampling`` (the live weights at the start
of the iteration: no EMA needed, and ``v_old`` is exactly the policy that drew the samples).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from alignrl.algorithms.advantages import AdvantageResult, GroupStatTracker
from alignrl.errors import ConfigError
from alignrl.sampling.kernels import mean_over_dims


@dataclass
class _MatchingBase:
    name: str = "awm"
    group_size: int = 8
    lr: float = 3e-4
    beta: float = 0.0
    adv_clip_max: float = 5.0
    global_std: bool = False
    std_eps: float = 1e-4
    num_train_timesteps: int = 6
    stat_buffer_size: int = 0
    stat_min_count: int = 0

    needs_final_latents = True

    def __post_init__(self):
        if self.lr <= 0:
            raise ConfigError(f"algorithm.lr must be > 0, got {self.lr}")
        if self.beta < 0:
            raise ConfigError(f"algorithm.beta must be >= 0, got {self.beta}")
        if self.num_train_timesteps < 1:
            raise ConfigError(f"algorithm.num_train_timesteps must be >= 1, got {self.num_train_timesteps}")
        self.tracker = GroupStatTracker(global_std=self.global_std, std_eps=self.std_eps,
                                        adv_clip_max=self.adv_clip_max, buffer_size=self.stat_buffer_size,
                                        min_count=self.stat_min_count)

    @property
    def needs_reference(self) -> bool:
        return self.beta > 0

    needs_old_policy = False
    _diag_keys: tuple = ("policy_loss",)

    @property
    def diagnostics(self) -> tuple[str, ...]:
        return self._diag_keys + (("kl",) if self.beta > 0 else ())

    def advantages(self, rewards: np.ndarray, keys: np.ndarray) -> AdvantageResult:
        return self.tracker.compute(rewards, keys)

    def state_dict(self) -> dict:
        return {"tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.tracker.load_state_dict(state.get("tracker", {}))

    def scaled_advantage(self, adv: torch.Tensor) -> torch.Tensor:
        return adv.clamp(-self.adv_clip_max, self.adv_clip_max) / self.adv_clip_max


@dataclass
class AWM(_MatchingBase):
    name: str = "awm"
    weighting: str = "mse"  # mse | huber
    huber_p: float = 0.25

    _diag_keys = ("matching_mse", "policy_loss")

    def __post_init__(self):
        super().__post_init__()
        if self.weighting not in ("mse", "huber"):
            raise ConfigError(f"algorithm.weighting='{self.weighting}' is not known; use mse or huber")

    def matching_loss(self, v, v_old, v_ref, x_t, x0, eps, t, adv):
        mse = mean_over_dims((v - (eps - x0)) ** 2)
        if self.weighting == "huber":
            p = self.huber_p
            weighted = t * ((mse + 1e-10) ** p - 1e-10**p) / p
        else:
            weighted = mse
        loss = self.scaled_advantage(adv) * weighted
        diag = {"matching_mse": mse.detach(), "policy_loss": loss.detach()}
        if self.beta > 0 and v_ref is not None:
            kl = mean_over_dims((v - v_ref) ** 2)
            loss = loss + self.beta * kl
            diag["kl"] = kl.detach()
        return loss, diag


@dataclass
class DiffusionNFT(_MatchingBase):
    name: str = "nft"
    nft_beta: float = 1.0  # b: how far the implicit positive/negative policies sit from the old one
    weight_floor: float = 1e-5
    old_policy: str = "ema"  # ema: the trainer's EMA samples and gives v_old; sampling: the live weights

    needs_old_policy = True
    _diag_keys = ("positive_weight", "policy_loss")

    def __post_init__(self):
        super().__post_init__()
        if self.nft_beta <= 0:
            raise ConfigError(f"algorithm.nft_beta must be > 0, got {self.nft_beta}")
        if self.old_policy not in ("ema", "sampling"):
            raise ConfigError(f"algorithm.old_policy='{self.old_policy}' is not known; use ema or sampling")

    def matching_loss(self, v, v_old, v_ref, x_t, x0, eps, t, adv):
        b = self.nft_beta
        r = (self.scaled_advantage(adv) / 2 + 0.5).clamp(0, 1)
        t_ = t.view(-1, *([1] * (x_t.ndim - 1)))
        v_plus = b * v + (1 - b) * v_old
        v_minus = (1 + b) * v_old - b * v
        x0_plus, x0_minus = x_t - t_ * v_plus, x_t - t_ * v_minus
        w_plus = mean_over_dims((x0_plus.detach() - x0).abs()).clamp(min=self.weight_floor)
        w_minus = mean_over_dims((x0_minus.detach() - x0).abs()).clamp(min=self.weight_floor)
        loss = (r * mean_over_dims((x0_plus - x0) ** 2) / w_plus
                + (1 - r) * mean_over_dims((x0_minus - x0) ** 2) / w_minus) / b
        diag = {"positive_weight": r.detach(), "policy_loss": loss.detach()}
        if self.beta > 0 and v_ref is not None:
            kl = mean_over_dims((v - v_ref) ** 2)
            loss = loss + self.beta * kl
            diag["kl"] = kl.detach()
        return loss, diag
