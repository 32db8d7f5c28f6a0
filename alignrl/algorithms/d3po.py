"""D3PO (arXiv 2311.13231): DPO on the denoising steps of two trajectories that share their initial noise.

A root's two leaves (``sampler: d3po``: one initial noise, then each image draws its own DDIM noise) are
compared: ``h = +1`` for the preferred image, ``-1`` for the other, 0 for both on a tie (a scalar reward: the
larger wins; several rewards: Pareto dominance, incomparable = tie). At every trained step j, with both
images' step log-probs under the policy and under the frozen initial model (the reference, CFG in both):

    r_k    = clamp(exp(logp_theta(x^k_{j+1} | x^k_j) - logp_ref(x^k_{j+1} | x^k_j)), 1 - eps, 1 + eps)
    loss_j = -log sigmoid(beta (h_0 log r_0 + h_1 log r_1))

The clamp is hard (no gradient outside the band), and the ratio is against the initial model, not the sampling
policy. ``human_file``: the reference's human mode, stored trajectories ranked by people (alignrl/trajectories.py)
instead of fresh rollouts scored by a reward. Log-probs are DDPO's per-dimension means. Ties carry no gradient and are left out of the mean (the
reference keeps them in it at a constant log 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from alignrl.algorithms.advantages import AdvantageResult
from alignrl.algorithms.base import Advantages, RolloutBatch, StepContext, Stateless
from alignrl.algorithms.policy_gradient import train_on_transitions
from alignrl.errors import ConfigError
from alignrl.sampling.kernels import StepResult


def pair_preferences(rewards: np.ndarray, keys: np.ndarray, per_reward: dict | None = None) -> np.ndarray:
    """h in {+1, -1, 0} per image: within each key (one pair), +1 for the image that wins, -1 for the other, 0 on a
    tie or a non-finite reward. Several rewards: the image that is at least as good on every reward and better on
    one wins (Pareto dominance); otherwise a tie."""
    rewards = np.asarray(rewards, dtype=np.float64).reshape(-1)
    keys = np.asarray(keys).reshape(-1)
    table = np.stack([np.asarray(v, dtype=np.float64).reshape(-1) for v in per_reward.values()], axis=1) \
        if per_reward and len(per_reward) > 1 else rewards[:, None]
    h = np.zeros(len(rewards))
    for key in np.unique(keys):
        members = np.nonzero(keys == key)[0]
        if len(members) != 2:
            raise ConfigError(f"D3PO compares pairs, but a prompt's group holds {len(members)} images; use "
                              f"sampler=d3po (branch_factor 2) with algorithm.group_size=1")
        a, b = table[members[0]], table[members[1]]
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            continue
        if np.all(a >= b) and np.any(a > b):
            h[members] = (1.0, -1.0)
        elif np.all(b >= a) and np.any(b > a):
            h[members] = (-1.0, 1.0)
    return h


def clamped_log_ratio(raw: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``log clamp(exp(raw), 1 - eps, 1 + eps)`` (no gradient outside the band) and where it was clamped (D3PO, SPO)."""
    lo, hi = math.log(1 - eps), math.log(1 + eps)
    outside = (raw.detach() < lo) | (raw.detach() > hi)
    return raw.clamp(lo, hi), outside


@dataclass
class D3PO(Stateless):
    name: str = "d3po"
    group_size: int = 1  # one root per prompt; its two leaves are the pair (sampler: d3po)
    lr: float = 3e-5
    beta: float = 0.1
    eps: float = 0.1  # the ratio's clamp band [1 - eps, 1 + eps]
    human_file: str | None = None  # ranks.jsonl of `alignrl data kind=trajectories`: train on people's rankings

    batch_kind: ClassVar[str] = "transitions"
    splits_transitions: ClassVar[bool] = False  # a pair's two transitions must share an optimizer step
    supports_sharding = True  # train_on_transitions balances its passes over processes (distributed=fsdp)
    _diag_keys: ClassVar[tuple] = ("policy_loss", "log_ratio", "clipfrac")

    def __post_init__(self):
        if self.lr <= 0:
            raise ConfigError(f"algorithm.lr must be > 0, got {self.lr}")
        if self.beta <= 0:
            raise ConfigError(f"algorithm.beta must be > 0, got {self.beta}")
        if not 0 < self.eps < 1:
            raise ConfigError(f"algorithm.eps must be in (0, 1), got {self.eps}")

    @property
    def needs_reference(self) -> bool:
        return True

    def advantages(self, rewards: np.ndarray, keys: np.ndarray, per_reward: dict | None = None,
                   weights: dict | None = None) -> AdvantageResult:
        h = pair_preferences(rewards, keys, per_reward)
        keep = h != 0
        return AdvantageResult(h, keep, {"tie_frac": float(1 - keep.mean()) if len(h) else 0.0,
                                         "kept_frac": float(keep.mean()) if len(h) else 0.0})

    def step_loss(self, policy: StepResult, logp_old: torch.Tensor, adv: torch.Tensor,
                  reference: StepResult | None, dt=None, mean_old=None, roots: torch.Tensor | None = None):
        """Each row's loss is its pair's ``-log sigmoid(beta sum_k h_k log r_k)`` (the two rows of a root are the
        pair; the loop's mean over rows is then the mean over pairs)."""
        if reference is None or roots is None:
            raise ValueError("D3PO needs the reference's step log-probs and each row's root")
        raw = policy.logp_mean_per_dim - reference.logp_mean_per_dim
        log_r, outside = clamped_log_ratio(raw, self.eps)
        pair, inverse = torch.unique(roots, return_inverse=True)
        z = torch.zeros(len(pair), dtype=log_r.dtype, device=log_r.device).index_add(0, inverse,
                                                                                   self.beta * adv * log_r)
        loss = -F.logsigmoid(z)[inverse]
        diag = {"policy_loss": loss.detach(), "log_ratio": raw.detach(),
                "clipfrac": outside.float()}
        return loss, diag

    def train_step(self, batch: RolloutBatch, adv: Advantages, ctx: StepContext) -> dict:
        return train_on_transitions(self, batch, adv, ctx)
