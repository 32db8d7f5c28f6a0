"""Losses on the final samples, with no log-probs: AWM and DiffusionNFT.

Rollouts may use any sampler (ODE included); only each image's clean latent ``x0`` and its advantage are
kept. ``train_step`` draws, per sample, ``num_train_timesteps`` stratified times from the rollout grid
(pure noise excluded) and fresh noise ``eps``, noises ``x0`` to ``x_t`` with the backbone's parameterisation
(flow matching: ``x_t = (1 - t) x0 + t eps``, target ``v = eps - x0``) and asks the loss for the prediction
at ``x_t`` without CFG. The formulas below are written for flow matching; the code goes through
``param.target`` and ``param.to_x0``.

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
from typing import ClassVar

import numpy as np
import torch

from alignrl.algorithms.base import Advantages, GroupRelative, RolloutBatch, StepContext, balanced_passes
from alignrl.errors import ConfigError
from alignrl.sampling.engine import sample_generators
from alignrl.sampling.kernels import mean_over_dims
from alignrl.sampling.parameterisation import FLOW, Parameterisation


@dataclass
class _MatchingBase(GroupRelative):
    name: str = "awm"
    group_size: int = 8
    lr: float = 3e-4
    num_train_timesteps: int = 6

    batch_kind = "final_latents"
    supports_sharding = True  # train_step balances its passes over processes (distributed=fsdp)
    needs_old_policy = False  # the loss compares with the velocities of the weights that drew the rollouts
    _diag_keys: ClassVar[tuple] = ("policy_loss",)  # a class constant, not a field: subclasses set their own

    def __post_init__(self):
        super().__post_init__()
        if self.num_train_timesteps < 1:
            raise ConfigError(f"algorithm.num_train_timesteps must be >= 1, got {self.num_train_timesteps}")

    @property
    def diagnostics(self) -> tuple[str, ...]:
        return self._diag_keys + (("kl",) if self.beta > 0 else ())

    def train_step(self, batch: RolloutBatch, adv: Advantages, ctx: StepContext) -> dict:
        """Optimizer steps on the final samples: no log-probs, no CFG.

        Per sample, ``num_train_timesteps`` schedule indices are drawn stratified over 1..T-1 (pure noise and
        the clean end excluded) with fresh noise, from a generator keyed by (seed, iteration, sample), so the
        draw does not depend on batching or ranks. The old policy's velocities (NFT) are computed for every
        (sample, time) before the first optimizer step, i.e. under the sampling weights.
        """
        if not batch.plan.is_linear or adv.leaf is None:
            raise ConfigError(f"algorithm '{self.name}' trains on final images: use a linear sampler plan")
        backbone = ctx.backbone
        schedule = backbone.make_schedule(batch.plan.base_steps)
        T = batch.plan.base_steps
        n_t = int(self.num_train_timesteps)
        x0 = batch.leaf_x0.float()
        idx = torch.empty((len(x0), n_t), dtype=torch.long)
        eps = torch.empty((len(x0), n_t, *x0.shape[1:]))
        inner = list(range(1, T)) or [0]
        strata = np.array_split(np.array(inner), min(n_t, len(inner)))
        for i, g in enumerate(sample_generators(ctx.seed * 11 + 5, ctx.iteration, batch.global_index.tolist())):
            for k in range(n_t):
                s_ = strata[k % len(strata)]
                idx[i, k] = int(s_[int(torch.randint(len(s_), (1,), generator=g))])
                eps[i, k] = torch.randn(x0.shape[1:], generator=g)
        eps = eps.to(ctx.device)
        sig = schedule.sigmas[idx.to(ctx.device)]  # (B, n_t)
        shape = (-1, n_t, *([1] * (x0.ndim - 1)))
        param = backbone.parameterisation
        x_t = param.add_noise(x0.unsqueeze(1), eps, sig.view(shape))
        v_old = None
        if self.needs_old_policy:
            v_old = torch.empty_like(x_t)
            ctx.denoiser.eval()
            with torch.no_grad(), ctx.autocast(), ctx.old_policy_weights():
                for k in range(n_t):
                    for m in torch.arange(len(x0)).split(ctx.train_batch_size):
                        cond = backbone.encode_prompts([batch.prompts[int(r)] for r in m])
                        v_old[m, k] = backbone.predict(x_t[m, k], schedule.timesteps[idx[m, k].to(ctx.device)],
                                                       cond, 1.0)
        ctx.denoiser.train()
        adv_t = torch.as_tensor(adv.leaf, dtype=torch.float32, device=ctx.device)
        keep_t = torch.as_tensor(adv.leaf_keep, dtype=torch.bool)
        sums = {k: 0.0 for k in self.diagnostics}
        count, grad_norms = 0, []
        for epoch in range(ctx.inner_epochs):
            for chunk in ctx.update_chunks(batch.global_index, epoch):
                kept = chunk[keep_t[chunk]]
                total = int(ctx.all_reduce_sum(torch.tensor([len(kept)], device=ctx.device)).item()) * n_t
                if total == 0:
                    continue
                passes = [(mb, k) for mb in kept.split(ctx.train_batch_size) for k in range(n_t)]
                cond = None
                for (mb, k), real in balanced_passes(passes, ctx, (torch.zeros(1, dtype=torch.long), 0)):  # row 0
                    if k == 0 or not real:
                        cond = backbone.encode_prompts([batch.prompts[int(r)] for r in mb])
                    t_idx = idx[mb, k].to(ctx.device)
                    with ctx.autocast():
                        v = backbone.predict(x_t[mb, k], schedule.timesteps[t_idx], cond, 1.0)
                    v_ref = ctx.predict_reference(x_t[mb, k], schedule.timesteps[t_idx], cond, 1.0) \
                        if self.needs_reference else None
                    adv_mb = adv_t[mb] if real else torch.zeros(len(mb), device=ctx.device)  # a dropped row's: NaN
                    loss_vec, diag = self.matching_loss(
                        v, v_old[mb, k] if v_old is not None else None, v_ref, x_t[mb, k], x0[mb],
                        eps[mb, k], sig[mb, k], adv_mb, param)
                    if not real:
                        ctx.backward(loss_vec.sum() * 0.0)
                        continue
                    ctx.backward(loss_vec.sum() / total)
                    for key in self.diagnostics:
                        sums[key] += float(diag[key].float().sum())
                    count += len(mb)
                grad_norms.append(ctx.optimizer_step())
        return ctx.summarise(sums, count, 0.0, grad_norms)

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

    def matching_loss(self, v, v_old, v_ref, x_t, x0, eps, t, adv, param: Parameterisation = FLOW):
        mse = mean_over_dims((v - param.target(x0, eps, t)) ** 2)
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
    policy_loss_scale: float = 1.0  # the reference multiplies the policy loss by adv_clip_max (5) before the KL

    needs_old_policy = True
    _diag_keys = ("positive_weight", "policy_loss")

    @property
    def rollout_weights(self) -> str:
        return "ema" if self.old_policy == "ema" else "live"

    def __post_init__(self):
        super().__post_init__()
        if self.nft_beta <= 0:
            raise ConfigError(f"algorithm.nft_beta must be > 0, got {self.nft_beta}")
        if self.policy_loss_scale <= 0:
            raise ConfigError(f"algorithm.policy_loss_scale must be > 0, got {self.policy_loss_scale}")
        if self.old_policy not in ("ema", "sampling"):
            raise ConfigError(f"algorithm.old_policy='{self.old_policy}' is not known; use ema or sampling")

    def matching_loss(self, v, v_old, v_ref, x_t, x0, eps, t, adv, param: Parameterisation = FLOW):
        b = self.nft_beta
        r = (self.scaled_advantage(adv) / 2 + 0.5).clamp(0, 1)
        v_plus = b * v + (1 - b) * v_old
        v_minus = (1 + b) * v_old - b * v
        x0_plus, x0_minus = param.to_x0(x_t, v_plus, t), param.to_x0(x_t, v_minus, t)
        w_plus = mean_over_dims((x0_plus.detach() - x0).abs()).clamp(min=self.weight_floor)
        w_minus = mean_over_dims((x0_minus.detach() - x0).abs()).clamp(min=self.weight_floor)
        loss = self.policy_loss_scale * (r * mean_over_dims((x0_plus - x0) ** 2) / w_plus
                                         + (1 - r) * mean_over_dims((x0_minus - x0) ** 2) / w_minus) / b
        diag = {"positive_weight": r.detach(), "policy_loss": loss.detach()}
        if self.beta > 0 and v_ref is not None:
            kl = mean_over_dims((v - v_ref) ** 2)
            loss = loss + self.beta * kl
            diag["kl"] = kl.detach()
        return loss, diag
