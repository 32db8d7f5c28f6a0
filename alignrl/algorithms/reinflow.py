"""ReinFlow (arXiv 2505.22094): a learnable noise network turns a few-step flow sampler into a Markov chain of
Gaussians whose exact log-likelihood PPO trains.

Each of the ``num_steps`` Euler steps of the flow ODE gets a Gaussian around its mean,

    x_{k+1} ~ N(x_k + (sigma_{k+1} - sigma_k) v_theta(x_k, sigma_k, c),  diag s_phi(k, c)^2),

with ``s_phi`` a small network of the step and the prompt's mean text embedding (not of x_k): an MLP, ``tanh``,
mapped into ``[log s_min^2, log s_max^2]``; one std per sample and step (the reference's is per action dimension;
a latent's layout differs per backbone, so here it is isotropic). Sampling keeps ``s >= s_min`` and clips each draw to
the mean +- ``noise_clip`` standard deviations. The chain's log-likelihood is the sum of the transitions' Gaussian
log-densities over steps and dimensions, divided by both (the reference's two normalisations), and clamped to
``[-logp_clip, logp_clip]`` for the policy and the sampling policy alike; PPO with clip ``clip_range`` on the ratio
of the two, an entropy bonus ``ent_coef`` times the chain's entropy rate (per step and dimension), and the noise
network trained with the policy (its own AdamW, gradients averaged over processes). ``s_max`` is held for the first
``hold_fraction`` of the run, then annealed linearly to ``s_min + 0.7 (s_max - s_min)`` at its end.

For images (the reference trains robot policies with a critic and GAE over environment steps) the return is the
final image's reward and the advantage its group-normalised value (the prompt's ``group_size`` images), as GRPO
does; the initial noise's density is left out (the reference's option). Evaluation samples the deterministic ODE.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn as nn

from alignrl.algorithms.advantages import AdvantageResult, GroupStatTracker
from alignrl.algorithms.base import PromptBatch, StepContext, Stateless, balanced_passes
from alignrl.errors import ConfigError
from alignrl.sampling.engine import sample_generators

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def expected_logp_per_dim(std: float) -> float:
    """A transition's expected Gaussian log-density per dimension at ``std`` (E[eps^2] ~ 1): -1/2 - log std -
    log sqrt(2 pi). It grows as the std shrinks: at std 0.1 it is 0.88, and below ``clamp_free_std(1.0)`` = 0.089 it
    passes the reference's clamp of +-1, where chains stop giving the policy a gradient."""
    return -0.5 - math.log(std) - LOG_SQRT_2PI


def clamp_free_std(logp_clip: float) -> float:
    """The std below which a transition's expected log-density per dimension exceeds ``logp_clip``."""
    return math.exp(-(logp_clip + 0.5 + LOG_SQRT_2PI))


class NoiseNet(nn.Module):
    """log s^2 per channel from (step, mean text embedding): MLP -> tanh -> [log s_min^2, log s_max^2]."""

    def __init__(self, text_dim: int, num_steps: int, channels: int, width: int = 64):
        super().__init__()
        self.step = nn.Embedding(num_steps, width)
        self.text = nn.Linear(text_dim, width)
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(2 * width, width), nn.SiLU(), nn.Linear(width, channels))

    def forward(self, step: torch.Tensor, text: torch.Tensor, log_var_min: float, log_var_max: float) -> torch.Tensor:
        h = torch.tanh(self.mlp(torch.cat([self.step(step), self.text(text)], dim=1)))
        return log_var_min + (h + 1) / 2 * (log_var_max - log_var_min)  # (B, C)


@dataclass
class ReinFlow(Stateless):
    name: str = "reinflow"
    group_size: int = 8  # images per prompt: the advantage's group
    lr: float = 4.5e-5  # the flow policy
    noise_lr: float = 4.5e-5  # the noise network
    num_steps: int = 4
    guidance_scale: float = 1.0
    sigma_min: float = 0.10
    sigma_max: float = 0.24
    hold_fraction: float = 0.35
    total_iterations: int = 1000  # for the s_max schedule (recipes: ${trainer.max_steps})
    noise_clip: float = 3.0  # draws clipped to the mean +- this many stds
    logp_clip: float = 1.0
    clip_range: float = 0.01
    ent_coef: float = 0.03
    adv_clip_max: float = 5.0
    std_eps: float = 1e-4

    batch_kind: ClassVar[str] = "prompts"
    supports_sharding = True  # train_step balances its passes over processes (distributed=fsdp)
    differentiates_reward: ClassVar[bool] = False
    _diag_keys: ClassVar[tuple] = ("policy_loss", "ratio", "clipfrac", "entropy", "noise_std")

    def __post_init__(self):
        checks = [(self.lr > 0 and self.noise_lr > 0, "algorithm.lr and algorithm.noise_lr must be > 0"),
                  (1 <= self.num_steps <= 16, f"algorithm.num_steps must be in [1, 16] (few-step flows), got "
                                              f"{self.num_steps}"),
                  (0 < self.sigma_min < self.sigma_max, "algorithm.sigma_min must be in (0, sigma_max)"),
                  (0 <= self.hold_fraction <= 1, "algorithm.hold_fraction must be in [0, 1]"),
                  (self.group_size >= 2, f"algorithm.group_size must be >= 2 (the advantage's group), got "
                                         f"{self.group_size}"),
                  (self.clip_range > 0 and self.logp_clip > 0, "algorithm.clip_range and logp_clip must be > 0")]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if expected_logp_per_dim(self.sigma_max) >= self.logp_clip:
            raise ConfigError(
                f"algorithm.sigma_max={self.sigma_max} gives a chain a log-likelihood of about "
                f"{expected_logp_per_dim(self.sigma_max):.2f} per dimension, above algorithm.logp_clip={self.logp_clip}: "
                f"the clamp would take every chain's gradient; raise sigma_max above "
                f"{clamp_free_std(self.logp_clip):.3f} or logp_clip above {expected_logp_per_dim(self.sigma_max):.2f}")
        self.noise_net: NoiseNet | None = None
        self.noise_optimizer: torch.optim.Optimizer | None = None
        self._pending: dict | None = None
        self.iterations = 0

    # ----- protocol ----------------------------------------------------------------------------------
    @property
    def needs_reference(self) -> bool:
        return False

    def advantages(self, rewards, keys, per_reward=None, weights=None):
        raise ConfigError("ReinFlow samples its own chains; the loop computes no advantages for it")

    def state_dict(self) -> dict:
        return {"iterations": self.iterations}

    def load_state_dict(self, state: dict) -> None:
        self.iterations = int(state.get("iterations", 0))

    def save_rank_state(self, path) -> None:
        from safetensors.torch import save_file

        from alignrl.algorithms.dpok import _flat_optimizer_state

        out = {}
        if self.noise_net is not None:
            out = {f"noise.{k}": v.detach().cpu().contiguous() for k, v in self.noise_net.state_dict().items()}
            out.update({f"noise_opt.{k}": v for k, v in _flat_optimizer_state(self.noise_optimizer).items()})
        save_file(out, str(path), metadata={"iterations": json.dumps(self.iterations)})

    def load_rank_state(self, path) -> None:
        from safetensors.torch import load_file

        self._pending = load_file(str(path)) or None
        self.noise_net, self.noise_optimizer = None, None

    # ----- the noise network and the schedule ----------------------------------------------------------
    def log_var_bounds(self) -> tuple[float, float]:
        """[log s_min^2, log s_max^2] at this iteration: s_max held, then annealed to s_min + 0.7 (s_max - s_min)."""
        hold = self.hold_fraction * self.total_iterations
        end = self.sigma_min + 0.7 * (self.sigma_max - self.sigma_min)
        if self.iterations <= hold or self.total_iterations <= hold:
            top = self.sigma_max
        else:
            frac = min(1.0, (self.iterations - hold) / max(self.total_iterations - hold, 1))
            top = self.sigma_max + frac * (end - self.sigma_max)
        return 2 * math.log(self.sigma_min), 2 * math.log(top)

    def _ensure_noise_net(self, ctx: StepContext, text_dim: int, channels: int) -> None:
        if self.noise_net is not None:
            return
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(ctx.seed) * 37 + 3)
            self.noise_net = NoiseNet(text_dim, self.num_steps, channels).to(ctx.device)
        self.noise_optimizer = torch.optim.AdamW(self.noise_net.parameters(), lr=self.noise_lr, weight_decay=0.0)
        if self._pending:
            from alignrl.algorithms.dpok import _load_flat_optimizer_state

            self.noise_net.load_state_dict({k[len("noise."):]: v for k, v in self._pending.items()
                                            if k.startswith("noise.")})
            _load_flat_optimizer_state(self.noise_optimizer, {k[len("noise_opt."):]: v for k, v in
                                                              self._pending.items() if k.startswith("noise_opt.")})
            self._pending = None

    def stds(self, ctx, step: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(B, C) standard deviations of the steps ``step`` (B,), with the noise network's graph."""
        lo, hi = self.log_var_bounds()
        return torch.exp(0.5 * self.noise_net(step, text, lo, hi))

    # ----- sampling and scoring the chain ----------------------------------------------------------------
    def chain_logp(self, ctx, chain: torch.Tensor, cond, text: torch.Tensor, schedule):
        """The chain's log-likelihood per sample (mean over steps and dimensions, unclamped), its entropy rate and
        mean std, with the graph of the policy and the noise network. ``chain``: (B, K + 1, ...) in the flow frame."""
        backbone = ctx.backbone
        logp, entropy, stds = 0.0, 0.0, 0.0
        for k in range(self.num_steps):
            x, nxt = chain[:, k], chain[:, k + 1]
            with ctx.autocast():
                v = backbone.predict(x, schedule.timesteps[k], cond, self.guidance_scale)
            mean = x + (schedule.sigmas[k + 1] - schedule.sigmas[k]) * v.float()
            std = self.stds(ctx, torch.full((len(x),), k, device=x.device), text)
            std = std.clamp(min=self.sigma_min).view(len(x), -1, *([1] * (x.ndim - 2)))
            per_dim = -((nxt - mean) ** 2) / (2 * std**2) - torch.log(std) - LOG_SQRT_2PI
            logp = logp + per_dim.mean(dim=tuple(range(1, x.ndim)))
            entropy = entropy + (torch.log(std) + 0.5 + LOG_SQRT_2PI).expand_as(x).mean(dim=tuple(range(1, x.ndim)))
            stds = stds + std.detach().mean(dim=tuple(range(1, std.ndim)))
        return logp / self.num_steps, entropy / self.num_steps, stds / self.num_steps

    @torch.no_grad()
    def sample_chains(self, ctx, batch: PromptBatch, rows: torch.Tensor, schedule, cond, text):
        """(B, K + 1, ...) chains of ``rows`` in the flow frame, noise from each slot's own generator."""
        backbone = ctx.backbone
        x = backbone.to_frame(batch.initial_noise(ctx, rows), schedule.sigmas[0])
        shape = tuple(x.shape[1:])
        noise = batch.extra_noise(ctx, rows, self.num_steps, shape)
        chain = [x]
        for k in range(self.num_steps):
            with ctx.autocast():
                v = backbone.predict(x, schedule.timesteps[k], cond, self.guidance_scale)
            mean = x + (schedule.sigmas[k + 1] - schedule.sigmas[k]) * v.float()
            std = self.stds(ctx, torch.full((len(x),), k, device=x.device), text).clamp(min=self.sigma_min)
            std = std.view(len(x), -1, *([1] * (x.ndim - 2)))
            eps = noise[:, k].clamp(-self.noise_clip, self.noise_clip)  # the draw clipped to mean +- clip std
            x = mean + std * eps
            chain.append(x)
        return torch.stack(chain, dim=1)

    # ----- the update ------------------------------------------------------------------------------------
    def train_step(self, batch: PromptBatch, adv, ctx: StepContext) -> dict:
        backbone = ctx.backbone
        schedule = backbone.make_schedule(self.num_steps)
        rows = torch.arange(len(batch))
        prompts = list(batch.prompts)
        cond = backbone.encode_prompts(prompts)
        text = cond.tensors["prompt_embeds"].float().mean(dim=1)
        self._ensure_noise_net(ctx, int(text.shape[1]), 1)
        ctx.denoiser.eval()
        chains = self.sample_chains(ctx, batch, rows, schedule, cond, text)
        final = backbone.from_frame(chains[:, -1], schedule.sigmas[-1])
        images = backbone.decode(final)
        rewards = np.asarray(ctx.reward(images, prompts, list(batch.metadata)), dtype=np.float64)
        with torch.no_grad():
            logp_old = self.chain_logp(ctx, chains, cond, text, schedule)[0].clamp(-self.logp_clip, self.logp_clip)
        advantages, (reward_mean, reward_std) = self._advantages(ctx, batch, rewards)
        ctx.denoiser.train()
        sums = {k: 0.0 for k in self.diagnostics}
        count, grad_norms = 0, []
        finite = np.isfinite(rewards)
        for epoch in range(ctx.inner_epochs):
            for chunk in ctx.update_chunks(batch.global_index, epoch):
                keep = chunk[torch.as_tensor(finite[chunk.numpy()], dtype=torch.bool)]
                total = float(ctx.all_reduce_sum(torch.tensor([float(len(keep))], dtype=torch.float64,
                                                              device=ctx.device)).item())
                if total == 0:
                    continue
                mbs = [keep[m:m + ctx.train_batch_size] for m in range(0, len(keep), ctx.train_batch_size)]
                for mb, real in balanced_passes(mbs, ctx, None):
                    if not real:  # distributed=fsdp: the same calls on this process's first chain, no gradient
                        first = torch.zeros(1, dtype=torch.long, device=ctx.device)
                        logp, entropy, _ = self.chain_logp(ctx, chains[first], cond.index(first), text[first],
                                                           schedule)
                        ctx.backward((logp.sum() + entropy.sum()) * 0.0)
                        continue
                    mbd = mb.to(ctx.device)
                    logp, entropy, std = self.chain_logp(ctx, chains[mbd], cond.index(mbd), text[mbd], schedule)
                    logp = logp.clamp(-self.logp_clip, self.logp_clip)
                    ratio = torch.exp(logp - logp_old[mbd])
                    a = advantages[mbd]
                    pg = torch.maximum(-a * ratio, -a * ratio.clamp(1 - self.clip_range, 1 + self.clip_range))
                    loss = pg - self.ent_coef * entropy
                    ctx.backward(loss.sum() / total)
                    sums["policy_loss"] += float(pg.detach().sum())
                    sums["ratio"] += float(ratio.detach().sum())
                    sums["clipfrac"] += float(((ratio.detach() - 1).abs() > self.clip_range).float().sum())
                    sums["entropy"] += float(entropy.detach().sum())
                    sums["noise_std"] += float(std.sum())
                    count += len(mb)
                self._noise_step(ctx)
                grad_norms.append(ctx.optimizer_step())
        self.iterations += 1
        out = ctx.summarise(sums, count, 0.0, grad_norms)
        out["noise_std_max"] = math.exp(0.5 * self.log_var_bounds()[1])
        out["reward_mean"], out["reward_std"] = reward_mean, reward_std
        return out

    def _noise_step(self, ctx) -> None:
        """The noise network's optimizer step, its gradients averaged over processes."""
        for p in self.noise_net.parameters():
            if p.grad is not None and ctx.world_size > 1:
                p.grad.copy_(ctx.all_reduce_sum(p.grad) / ctx.world_size)
        self.noise_optimizer.step()
        self.noise_optimizer.zero_grad(set_to_none=True)

    def _advantages(self, ctx, batch: PromptBatch, rewards: np.ndarray) -> tuple[torch.Tensor, tuple]:
        """Group-normalised final rewards over all processes (groups: the prompt's images; a group's images may sit
        on several processes: every rank fills its slots of one iteration-wide table, summed over ranks), and the
        iteration's finite rewards' mean and std."""
        n_total = int(ctx.all_reduce_sum(torch.tensor([float(len(batch))], dtype=torch.float64,
                                                      device=ctx.device)).item())
        table = torch.zeros((n_total, 2), dtype=torch.float64, device=ctx.device)
        idx = torch.as_tensor(batch.global_index, dtype=torch.long, device=ctx.device)
        table[idx, 0] = torch.as_tensor(rewards, dtype=torch.float64, device=ctx.device)
        table[idx, 1] = torch.as_tensor(batch.prompt_ids, dtype=torch.float64, device=ctx.device)
        table = ctx.all_reduce_sum(table).cpu().numpy()
        tracker = GroupStatTracker(global_std=False, std_eps=self.std_eps, adv_clip_max=self.adv_clip_max)
        res: AdvantageResult = tracker.compute(table[:, 0], table[:, 1].astype(np.int64))
        finite = np.isfinite(table[:, 0])
        stats = (float(table[finite, 0].mean()), float(table[finite, 0].std())) if finite.any() else (np.nan, np.nan)
        return torch.as_tensor(res.advantages[batch.global_index], dtype=torch.float32, device=ctx.device), stats
