"""Flow-GRPO: group-normalised advantages, PPO-clip on per-dimension-mean log-probs, KL to the base.

Per trained step j of a sample with advantage A:

    ratio = exp(logp_theta - logp_old)
    L_pg  = max(-A ratio, -A clamp(ratio, 1 - eps, 1 + eps))
    L_kl  = mean_dims((mean_theta - mean_ref)^2) / (2 std_t^2)       (dt omitted, as the reference;
                                                                       kl_include_dt adds it: / (2 std_t^2 (-dt)))
    loss  = L_pg + beta L_kl

The reference model is the frozen base: the same network with the LoRA adapter disabled, or a frozen
copy for full fine-tuning (the trainer provides it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from alignrl.algorithms.advantages import AdvantageResult, GroupStatTracker, best_of_n_mask, per_reward_advantages
from alignrl.algorithms.base import Advantages, GroupRelative, RolloutBatch, StepContext
from alignrl.algorithms.policy_gradient import train_on_transitions
from alignrl.errors import ConfigError
from alignrl.sampling.kernels import StepResult, mean_over_dims


def ppo_clip(logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, clip_range: float):
    """Per-sample clipped policy-gradient loss and its diagnostics."""
    log_ratio = logp - logp_old
    ratio = torch.exp(log_ratio)
    neg_adv = -adv
    unclipped = neg_adv * ratio
    clipped = neg_adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped)
    with torch.no_grad():
        diag = {
            "ratio": ratio.detach(),
            "clipfrac": (torch.abs(ratio - 1.0) > clip_range).float(),
            "approx_kl": 0.5 * log_ratio.detach() ** 2,
        }
    return loss, diag


@dataclass
class FlowGRPO(GroupRelative):
    name: str = "flowgrpo"
    group_size: int = 24
    lr: float = 3e-4
    clip_range: float = 1e-4
    beta: float = 0.04
    global_std: bool = True
    kl_include_dt: bool = False
    advantage_aggr: str = "reward"  # reward: normalise the weighted reward sum; advantage: sum of per-reward advantages
    best_of_n: int = 0  # DanceGRPO: train only the n/2 best and n/2 worst samples of each group (0: all)

    batch_kind = "transitions"
    supports_sharding = True  # train_on_transitions balances its passes over processes (distributed=fsdp)

    def __post_init__(self):
        if self.advantage_aggr not in ("reward", "advantage"):
            raise ConfigError(f"algorithm.advantage_aggr='{self.advantage_aggr}' is not known; use reward or advantage")
        if self.best_of_n < 0 or (self.best_of_n and self.best_of_n >= self.group_size):
            raise ConfigError(f"algorithm.best_of_n must be 0 (off) or in [2, group_size), got {self.best_of_n}")
        if self.clip_range <= 0:
            raise ConfigError(f"algorithm.clip_range must be > 0, got {self.clip_range}")
        super().__post_init__()

    @property
    def diagnostics(self) -> tuple[str, ...]:
        """Per-sample diagnostics ``step_loss`` returns (averaged over samples, steps and ranks for logging)."""
        return ("ratio", "clipfrac", "approx_kl", "policy_loss") + (("kl",) if self.beta > 0 else ())

    def advantages(self, rewards: np.ndarray, keys: np.ndarray, per_reward: dict | None = None,
                   weights: dict | None = None) -> AdvantageResult:
        if self.advantage_aggr == "advantage" and per_reward and len(per_reward) > 1:
            result = per_reward_advantages(per_reward, weights or {}, keys, lambda: GroupStatTracker(
                global_std=self.global_std, std_eps=self.std_eps, adv_clip_max=self.adv_clip_max,
                std_ddof=self.std_ddof))
        else:
            result = self.tracker.compute(rewards, keys)
        if self.best_of_n:
            result.keep &= best_of_n_mask(np.asarray(rewards, dtype=np.float64), np.asarray(keys), self.best_of_n)
            result.stats["kept_frac"] = float(result.keep.mean())
        return result

    def step_loss(self, policy: StepResult, logp_old: torch.Tensor, adv: torch.Tensor,
                  reference: StepResult | None, dt: torch.Tensor | None = None,
                  mean_old: torch.Tensor | None = None, roots: torch.Tensor | None = None):
        """Per-sample loss for one trained step, plus per-sample diagnostics to average for logging."""
        pg, diag = ppo_clip(policy.logp_mean_per_dim, logp_old, adv, self.clip_range)
        loss = pg
        diag["policy_loss"] = pg.detach()
        if self.beta > 0 and reference is not None:
            std_t = policy.std_t.reshape(-1)  # scalar or per-sample
            kl = mean_over_dims((policy.mean - reference.mean) ** 2) / (2 * std_t**2)
            if self.kl_include_dt and dt is not None:
                kl = kl / (-dt)
            loss = loss + self.beta * kl
            diag["kl"] = kl.detach()
        return loss, diag

    def train_step(self, batch: RolloutBatch, adv: Advantages, ctx: StepContext) -> dict:
        return train_on_transitions(self, batch, adv, ctx)
