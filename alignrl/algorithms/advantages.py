"""Group-normalised advantages (GRPO) and the per-prompt statistics tracker.

Convention (named, as the reference's numpy code): float64, population std (ddof 0) plus ``std_eps``
(1e-4); ``std_ddof=1`` takes the unbiased std instead (DanceGRPO and the methods built on its code). With ``global_std`` only the std is global over the batch; the mean stays per group.
Advantages are clamped to +-``adv_clip_max``. A group whose finite rewards all tie (or that has one
finite reward left) carries no signal: its samples are dropped from the loss. Non-finite rewards
(NaN/inf) drop their sample and are left out of every statistic.

Groups are keyed by an integer prompt id (never by decoded text). A persistent per-prompt buffer
(``buffer_size`` > 0, DDPO's tracker) keeps the last rewards of each prompt across iterations and falls
back to batch statistics until a prompt has ``min_count`` of them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class AdvantageResult:
    advantages: np.ndarray  # (N,) float64, 0 where dropped
    keep: np.ndarray  # (N,) bool: sample contributes to the loss
    stats: dict


@dataclass
class GroupStatTracker:
    global_std: bool = True
    std_eps: float = 1e-4
    adv_clip_max: float = 5.0
    buffer_size: int = 0
    std_ddof: int = 0
    min_count: int = 0
    buffers: dict[int, deque] = field(default_factory=dict)

    def compute(self, rewards: np.ndarray, keys: np.ndarray) -> AdvantageResult:
        rewards = np.asarray(rewards, dtype=np.float64).reshape(-1)
        keys = np.asarray(keys).reshape(-1)
        finite = np.isfinite(rewards)
        adv = np.zeros_like(rewards)
        keep = np.zeros(rewards.shape, dtype=bool)
        if not finite.any():
            return AdvantageResult(adv, keep, {"zero_std_group_frac": 1.0, "nonfinite_rewards": int(rewards.size)})
        batch_mean = rewards[finite].mean()
        batch_std = self._std(rewards[finite])
        groups = np.unique(keys)
        tied = 0
        for key in groups:
            member = keys == key
            sel = member & finite
            r = rewards[sel]
            if self.buffer_size > 0:
                buf = self.buffers.setdefault(int(key), deque(maxlen=self.buffer_size))
                buf.extend(r.tolist())
                hist = np.asarray(buf, dtype=np.float64)
                if len(hist) < max(self.min_count, 1):
                    mean, std = batch_mean, batch_std
                else:
                    mean, std = hist.mean(), self._std(hist)
                if self.global_std:
                    std = batch_std
                signal = r.size > 0 and std > 0
            else:
                mean = r.mean() if r.size else 0.0
                std = batch_std if self.global_std else self._std(r)
                signal = r.size > 1 and np.ptp(r) > 0
            if not signal:
                tied += 1
                continue
            adv[sel] = np.clip((r - mean) / (std + self.std_eps), -self.adv_clip_max, self.adv_clip_max)
            keep[sel] = True
        stats = {
            "zero_std_group_frac": tied / max(len(groups), 1),
            "nonfinite_rewards": int((~finite).sum()),
            "kept_frac": float(keep.mean()),
        }
        return AdvantageResult(adv, keep, stats)

    def _std(self, values: np.ndarray) -> float:
        """Population (ddof 0) or unbiased (ddof 1) std; 0 where too few values to define it."""
        return float(values.std(ddof=self.std_ddof)) if values.size > self.std_ddof else 0.0

    def state_dict(self) -> dict:
        return {"buffers": {str(k): list(v) for k, v in self.buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.buffers = {
            int(k): deque(v, maxlen=self.buffer_size or None) for k, v in state.get("buffers", {}).items()
        }


def per_reward_advantages(per_reward: dict[str, np.ndarray], weights: dict[str, float], keys: np.ndarray,
                          make_tracker) -> AdvantageResult:
    """``advantage_aggr``: A = sum_k w_k (R_k - mu_k) / sigma_k, each reward normalised in its own groups
    (``make_tracker()`` gives a fresh tracker with the algorithm's conventions); a sample is kept when any
    reward gave it a signal."""
    total, keep, stats = None, None, {}
    for name, values in per_reward.items():
        res = make_tracker().compute(values, keys)
        part = weights.get(name, 1.0) * res.advantages
        total = part if total is None else total + part
        keep = res.keep if keep is None else keep | res.keep
        stats[f"zero_std_group_frac/{name}"] = res.stats["zero_std_group_frac"]
    stats["kept_frac"] = float(keep.mean())
    return AdvantageResult(total, keep, stats)


def best_of_n_mask(rewards: np.ndarray, keys: np.ndarray, n: int) -> np.ndarray:
    """DanceGRPO's best-of-n: per group keep the n/2 best and n/2 worst samples (ties broken by position)."""
    keep = np.zeros(len(rewards), dtype=bool)
    half = max(1, n // 2)
    for key in np.unique(keys):
        members = np.nonzero((keys == key) & np.isfinite(rewards))[0]
        order = members[np.argsort(rewards[members], kind="stable")]
        keep[order[:half]] = True
        keep[order[-half:]] = True
    return keep


def batch_advantages(batch, normalise) -> "Advantages":
    """Per-leaf and per-transition advantages of one rank's batch (a ``RolloutBatch``).

    ``normalise(values, keys, ids, per_reward)`` group-normalises values over all ranks (the loop gathers
    them; ``ids`` are global, so the result does not depend on the number of ranks) and returns this rank's
    rows. Linear plans normalise leaf rewards per prompt (GRPO). Trees and side branches score each child
    node (its leaves' rewards fused), normalised over the nodes of the same prompt and depth (or side
    branch); with several continuation granularities (G2RPO) the leaves are normalised per granularity and
    a node's advantage is their sum.
    """
    from alignrl.algorithms.base import Advantages

    if batch.plan.is_linear:
        leaves = np.arange(len(batch.leaf_root))
        keys = batch.prompt_ids[batch.leaf_root.numpy()]
        res = normalise(np.asarray(batch.rewards, dtype=np.float64), keys, batch.leaf_ids(leaves), batch.per_reward)
        t_leaf = batch.t_leaf_lo.numpy()
        return Advantages(res.advantages, res.keep, res.advantages[t_leaf], res.keep[t_leaf], res.stats)
    adv, keep, stats = node_advantages(batch, normalise)
    return Advantages(None, None, adv, keep, stats)


def node_advantages(batch, normalise):
    """Per-transition advantages and keep flags for trees and side branches (see ``batch_advantages``)."""
    rewards = torch.as_tensor(batch.rewards, dtype=torch.float64)
    lo, cnt = batch.t_leaf_lo.numpy(), batch.t_leaf_count.numpy()
    # one row per distinct child node (a node spans the steps between two splits)
    node_of, uniq = np.unique(np.stack([batch.t_key.numpy(), lo]), axis=1, return_inverse=True)
    node_key, node_lo = node_of
    uniq = uniq.reshape(-1)
    node_cnt = np.zeros(len(node_lo), dtype=np.int64)
    node_cnt[uniq] = cnt
    prompt = batch.prompt_ids[batch.leaf_root.numpy()[node_lo]]
    plan = batch.plan
    multi = plan.side_branches and max(len(b.granularities) for b in plan.side_branches) > 1
    if multi:  # G2RPO: normalise each granularity's leaves, sum over a node's granularities
        leaf_node = np.concatenate([np.full(c, i) for i, c in enumerate(node_cnt)])
        leaf_ids = np.concatenate([np.arange(l0, l0 + c) for l0, c in zip(node_lo, node_cnt)])
        values = rewards.numpy()[leaf_ids]
        keys = (prompt[leaf_node] * 1000 + node_key[leaf_node]) * 16 + batch.leaf_tag.numpy()[leaf_ids]
        res = normalise(values, keys, batch.leaf_ids(leaf_ids), None)
        adv = np.zeros(len(node_lo))
        keep = np.zeros(len(node_lo), dtype=bool)
        np.add.at(adv, leaf_node, res.advantages)
        np.logical_or.at(keep, leaf_node, res.keep)
        stats = res.stats
    else:
        values = np.array([fuse_leaf_rewards(rewards, batch.leaf_path_logp, int(l0), int(c), plan)
                           for l0, c in zip(node_lo, node_cnt)])
        keys = prompt * 1000 + node_key
        res = normalise(values, keys, batch.leaf_ids(node_lo), None)
        adv, keep = res.advantages, res.keep.copy()
        stats = res.stats
        if plan.width_prune_ratio > 0:  # keep the best and worst edges after the last split only
            deepest = node_key == node_key.max()
            for k in np.unique(keys[deepest]):
                members = np.nonzero((keys == k) & keep)[0]
                n_drop = plan.pruned_edges(len(members))
                if n_drop:
                    order = members[np.argsort(values[members], kind="stable")]
                    lo_keep = (len(members) - n_drop) // 2
                    keep[order[lo_keep:lo_keep + n_drop]] = False
    stats["nodes"] = int(len(node_lo))
    return adv[uniq], keep[uniq], stats


def fuse_leaf_rewards(rewards: torch.Tensor, path_logp: torch.Tensor, lo: int, count: int, plan) -> float:
    """A node's value from its leaves' finite rewards: their mean, or (``fusion: logp_softmax``, BranchGRPO)
    weighted by the softmax of the leaves' path log-probs."""
    r = rewards[lo:lo + count]
    ok = torch.isfinite(r)
    if not ok.any():
        return float("nan")
    if plan.fusion == "logp_softmax":
        w = torch.softmax(plan.fusion_alpha * path_logp[lo:lo + count].double()[ok], dim=0)
        return float((w * r[ok]).sum())
    return float(r[ok].mean())
