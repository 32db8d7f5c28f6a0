"""The reward-gradient family: the reward's gradient backpropagated through (part of) the sampler.

Each iteration hands the method this rank's prompt slots (``batch_kind: prompts``); per optimizer step the
method samples every slot from its own initial noise (keyed by (seed, iteration, slot): independent of batching
and ranks), decodes with the graph kept (``Backbone.decode_with_grad``, optionally checkpointed), scores with
the recipe's differentiable rewards (``ctx.score``) and backpropagates its loss of the scores. Where the graph
starts is the method (``alignrl/sampling/differentiable.py``):

- ``refl`` (ReFL): no graph to a step m drawn per optimizer step from ``refl_steps`` (the reference: 40 DDPM
  steps, m in [30, 40)), one differentiated step whose x0 prediction is decoded; loss
  ``relu(margin - r) * scale`` (ImageReward's transform: margin 2, scale 1e-3);
- ``draft`` (DRaFT-K): the graph through the last K steps; loss ``-r``;
- ``draft_lv`` (DRaFT-LV): the sample without a graph, then ``lv_samples`` re-noisings of it to the last step's
  noise level, each denoised by one differentiated step; loss ``-mean_i r_i``;
- ``alignprop`` (AlignProp): the graph from a truncation k drawn per optimizer step, ``round(N(mean, std))``
  redrawn until it lies in [1, T) (the reference: 50 steps, N(42, 5)); loss ``-r`` or ``|r - target|``;
- ``adjointdpm`` (AdjointDPM): the sample without a graph, the weights' gradient by the adjoint sampler
  (memory flat in the number of steps); loss ``-r``.

The draws of the truncation are the same on every rank (keyed by (seed, iteration, optimizer step)), as the
references draw one per batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from alignrl.algorithms.base import Stateless, balanced_passes
from alignrl.errors import ConfigError
from alignrl.sampling.differentiable import adjoint_backward, grad_sample, ode_states

LOSSES = ("negative", "hinge", "distance")


@dataclass
class RewardGradient(Stateless):
    """The shared step; subclasses say where the graph starts (``sample``) and keep their own settings."""

    name: str = "reward_gradient"
    group_size: int = 1  # one image per prompt slot
    lr: float = 1e-5
    num_steps: int = 40  # the differentiated sampler's length (the sampler group's plan is for evaluation)
    guidance_scale: float = 1.0
    checkpoint: bool = True  # recompute each differentiated model call's activations in the backward pass
    decode_checkpoint: bool = True  # the same for the VAE decode
    loss: str = "negative"  # negative: -r; hinge: relu(margin - r); distance: |r - target|
    margin: float = 2.0
    target: float = 10.0
    loss_scale: float = 1.0

    batch_kind: ClassVar[str] = "prompts"
    supports_sharding = True  # train_step balances its microbatches over processes (distributed=fsdp)
    _diag_keys: ClassVar[tuple] = ("policy_loss", "reward_mean", "grad_steps")

    def __post_init__(self):
        if self.lr <= 0:
            raise ConfigError(f"algorithm.lr must be > 0, got {self.lr}")
        if self.num_steps < 1:
            raise ConfigError(f"algorithm.num_steps must be >= 1, got {self.num_steps}")
        if self.loss not in LOSSES:
            raise ConfigError(f"algorithm.loss='{self.loss}' is not known; use {', '.join(LOSSES)}")

    # -- the protocol --------------------------------------------------------------------------------------
    @property
    def needs_reference(self) -> bool:
        return False

    def advantages(self, rewards, keys, per_reward=None, weights=None):
        raise ConfigError(f"algorithm '{self.name}' backpropagates the reward and has no advantages")

    # -- the method ----------------------------------------------------------------------------------------
    def loss_of(self, r: torch.Tensor) -> torch.Tensor:
        if self.loss == "hinge":
            out = torch.relu(self.margin - r)
        elif self.loss == "distance":
            out = (r - self.target).abs()
        else:
            out = -r
        return self.loss_scale * out

    def draw(self, g: torch.Generator) -> dict:
        """This optimizer step's random choices (the same on every rank); none by default."""
        return {}

    def sample(self, ctx, cond, x_T, schedule, draw: dict) -> tuple[torch.Tensor, int]:
        """Latents to decode with the graph kept, and the number of differentiated steps."""
        raise NotImplementedError

    def score(self, ctx, latents, prompts, metadata):
        images = ctx.backbone.decode_with_grad(latents, checkpoint=self.decode_checkpoint)
        return ctx.score(images, prompts, metadata)

    @staticmethod
    def inputs(ctx, batch, mb):
        """The microbatch's prompts, metadata and conditioning."""
        prompts = [batch.prompts[int(i)] for i in mb]
        return prompts, [batch.metadata[int(i)] for i in mb], ctx.backbone.encode_prompts(prompts)

    def microbatch_loss(self, ctx, batch, mb, draw, schedule, total: float) -> tuple[float, float, int]:
        """Backpropagate one microbatch's share of the loss; returns (loss sum, reward sum, differentiated steps)."""
        prompts, metadata, cond = self.inputs(ctx, batch, mb)
        latents, steps = self.sample(ctx, cond, batch.initial_noise(ctx, mb), schedule, draw)
        r = self.score(ctx, latents, prompts, metadata)
        loss = self.loss_of(r)
        ctx.backward(loss.sum() / total)
        return float(loss.detach().sum()), float(r.detach().sum()), steps

    @staticmethod
    def blank(ctx):
        """The inputs of a padding microbatch: the empty prompt's conditioning and a zero initial latent."""
        return ctx.backbone.encode_prompts([""]), torch.zeros(1, *ctx.backbone.latent_shape(), device=ctx.device)

    def padding_pass(self, ctx, draw, schedule) -> None:
        """distributed=fsdp: a microbatch another process has and this one lacks. The same denoiser calls as a real
        one (the sampler's forwards, and in the backward the recomputed ones), so the sharded weights are gathered
        and their gradients reduced as often on every process; the loss is multiplied by zero (the decode and the
        reward touch no sharded weight and are skipped)."""
        cond, x_T = self.blank(ctx)
        latents, _ = self.sample(ctx, cond, x_T, schedule, draw)
        ctx.backward(latents.float().sum() * 0.0)

    def train_step(self, batch, adv, ctx) -> dict:
        from alignrl.sampling.engine import sample_generators

        schedule = ctx.backbone.make_schedule(self.num_steps)
        ctx.denoiser.train()
        sums = {"policy_loss": 0.0, "reward_mean": 0.0, "grad_steps": 0.0}
        count, grad_norms = 0, []
        for epoch in range(ctx.inner_epochs):
            for c, chunk in enumerate(ctx.update_chunks(batch.global_index, epoch)):
                total = float(ctx.all_reduce_sum(torch.tensor([float(len(chunk))], dtype=torch.float64,
                                                              device=ctx.device)).item())
                if total == 0:
                    continue
                draw = self.draw(sample_generators(ctx.seed * 23 + 11, ctx.iteration, [epoch * 10_000 + c])[0])
                mbs = [mb for mb in chunk.split(ctx.train_batch_size) if len(mb)]
                for mb, real in balanced_passes(mbs, ctx, None):
                    if not real:
                        self.padding_pass(ctx, draw, schedule)
                        continue
                    loss_sum, r_sum, steps = self.microbatch_loss(ctx, batch, mb, draw, schedule, total)
                    sums["policy_loss"] += loss_sum
                    sums["reward_mean"] += r_sum
                    sums["grad_steps"] += steps * len(mb)
                    count += len(mb)
                grad_norms.append(ctx.optimizer_step())
        return ctx.summarise(sums, count, 0.0, grad_norms)


@dataclass
class ReFL(RewardGradient):
    name: str = "refl"
    lr: float = 1e-5
    num_steps: int = 40
    refl_low: int = 30  # m ~ U{refl_low .. num_steps - 1}
    loss: str = "hinge"
    margin: float = 2.0
    loss_scale: float = 1e-3

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.refl_low < self.num_steps:
            raise ConfigError(f"algorithm.refl_low={self.refl_low} must be in [0, num_steps={self.num_steps})")

    def draw(self, g):
        return {"m": int(torch.randint(self.refl_low, self.num_steps, (), generator=g))}

    def sample(self, ctx, cond, x_T, schedule, draw):
        return grad_sample(ctx.backbone, cond, x_T, schedule, self.guidance_scale, grad_from=self.num_steps,
                           stop_at=draw["m"], checkpoint=self.checkpoint, autocast=ctx.autocast), 1


@dataclass
class DRaFT(RewardGradient):
    name: str = "draft"
    lr: float = 1e-4
    num_steps: int = 50
    last_k: int = 1

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.last_k <= self.num_steps:
            raise ConfigError(f"algorithm.last_k={self.last_k} must be in [1, num_steps={self.num_steps}]")

    def sample(self, ctx, cond, x_T, schedule, draw):
        return grad_sample(ctx.backbone, cond, x_T, schedule, self.guidance_scale,
                           grad_from=self.num_steps - self.last_k, checkpoint=self.checkpoint,
                           autocast=ctx.autocast), self.last_k


@dataclass
class DRaFTLV(RewardGradient):
    name: str = "draft_lv"
    lr: float = 1e-4
    num_steps: int = 50
    lv_samples: int = 2

    def __post_init__(self):
        super().__post_init__()
        if self.lv_samples < 1:
            raise ConfigError(f"algorithm.lv_samples must be >= 1, got {self.lv_samples}")

    def microbatch_loss(self, ctx, batch, mb, draw, schedule, total):
        from alignrl.sampling.differentiable import _predict

        backbone, param = ctx.backbone, ctx.backbone.parameterisation
        prompts, metadata, cond = self.inputs(ctx, batch, mb)
        x0, _ = ode_states(backbone, cond, batch.initial_noise(ctx, mb), schedule, self.guidance_scale,
                           ctx.autocast)
        s, timestep = schedule.sigmas[-2], schedule.timesteps[-1].expand(len(mb))  # the last step's noise level
        eps_all = batch.extra_noise(ctx, mb, self.lv_samples, tuple(x0.shape[1:]))
        loss_sum = r_sum = 0.0
        for i in range(self.lv_samples):
            x_s = param.add_noise(x0.detach(), eps_all[:, i], s)
            pred = _predict(backbone, x_s, timestep, cond, self.guidance_scale, ctx.autocast, self.checkpoint)
            r = self.score(ctx, param.to_x0(x_s, pred, s), prompts, metadata)
            loss = self.loss_of(r) / self.lv_samples
            ctx.backward(loss.sum() / total)
            loss_sum += float(loss.detach().sum())
            r_sum += float(r.detach().sum()) / self.lv_samples
        return loss_sum, r_sum, 1

    def padding_pass(self, ctx, draw, schedule) -> None:
        from alignrl.sampling.differentiable import _predict

        backbone, param = ctx.backbone, ctx.backbone.parameterisation
        cond, x_T = self.blank(ctx)
        x0, _ = ode_states(backbone, cond, x_T, schedule, self.guidance_scale, ctx.autocast)
        s, timestep = schedule.sigmas[-2], schedule.timesteps[-1].expand(1)
        for _ in range(self.lv_samples):
            pred = _predict(backbone, param.add_noise(x0, torch.zeros_like(x0), s), timestep, cond,
                            self.guidance_scale, ctx.autocast, self.checkpoint)
            ctx.backward(pred.float().sum() * 0.0)


@dataclass
class AlignProp(RewardGradient):
    name: str = "alignprop"
    lr: float = 1e-3
    num_steps: int = 50
    guidance_scale: float = 5.0
    truncation_mean: float = 42.0  # k ~ round(N(mean, std)) in [1, num_steps): the graph from step k on
    truncation_std: float = 5.0

    def __post_init__(self):
        super().__post_init__()
        if self.num_steps < 2:
            raise ConfigError("algorithm.num_steps must be >= 2 for a truncation in [1, num_steps)")
        if self.truncation_std < 0:
            raise ConfigError(f"algorithm.truncation_std must be >= 0, got {self.truncation_std}")
        if self.truncation_std == 0 and not 1 <= round(self.truncation_mean) < self.num_steps:
            raise ConfigError(f"algorithm.truncation_mean={self.truncation_mean} with std 0 must round into "
                              f"[1, num_steps={self.num_steps})")

    def draw(self, g):
        for _ in range(10_000):
            k = round(self.truncation_mean + self.truncation_std * float(torch.randn((), generator=g)))
            if 1 <= k < self.num_steps:
                return {"k": int(k)}
        raise ConfigError(f"algorithm.truncation_mean={self.truncation_mean} (std {self.truncation_std}) rarely "
                          f"falls in [1, num_steps={self.num_steps}); move it inside")

    def sample(self, ctx, cond, x_T, schedule, draw):
        return grad_sample(ctx.backbone, cond, x_T, schedule, self.guidance_scale, grad_from=draw["k"],
                           checkpoint=self.checkpoint, autocast=ctx.autocast), self.num_steps - draw["k"]


@dataclass
class AdjointDPM(RewardGradient):
    name: str = "adjointdpm"
    lr: float = 1e-5
    num_steps: int = 20
    states: str = "reconstruct"  # reconstruct (the paper's backward state solve) | store (exact, N latents)
    refine: int = 1  # fixed-point refinements of each reconstructed state (one model call each)

    def __post_init__(self):
        super().__post_init__()
        if self.states not in ("reconstruct", "store"):
            raise ConfigError(f"algorithm.states='{self.states}' is not known; use reconstruct or store")
        if self.refine < 0:
            raise ConfigError(f"algorithm.refine must be >= 0, got {self.refine}")

    def train_step(self, batch, adv, ctx) -> dict:
        if ctx.mixed_precision == "fp16":  # the loop's backward would scale each step's adjoint again
            raise ConfigError("algorithm adjointdpm does not support fp16 loss scaling (the adjoint passes each "
                              "step's gradient on through the loop's backward); use trainer.mixed_precision=bf16")
        return super().train_step(batch, adv, ctx)

    def padding_pass(self, ctx, draw, schedule) -> None:
        cond, x_T = self.blank(ctx)
        x_final, states = ode_states(ctx.backbone, cond, x_T, schedule, self.guidance_scale, ctx.autocast,
                                     keep=self.states == "store")
        adjoint_backward(ctx.backbone, cond, x_final, torch.zeros_like(x_final), schedule, self.guidance_scale,
                         backward=ctx.backward, states=states, refine=self.refine, autocast=ctx.autocast)

    def microbatch_loss(self, ctx, batch, mb, draw, schedule, total):
        backbone = ctx.backbone
        prompts, metadata, cond = self.inputs(ctx, batch, mb)
        x_final, states = ode_states(backbone, cond, batch.initial_noise(ctx, mb), schedule, self.guidance_scale,
                                     ctx.autocast, keep=self.states == "store")
        x_leaf = x_final.detach().requires_grad_(True)
        with torch.enable_grad():
            r = self.score(ctx, x_leaf, prompts, metadata)
            loss = self.loss_of(r)
            (grad_final,) = torch.autograd.grad(loss.sum() / total, x_leaf)
        adjoint_backward(backbone, cond, x_final, grad_final, schedule, self.guidance_scale, backward=ctx.backward,
                         states=states, refine=self.refine, autocast=ctx.autocast)
        return float(loss.detach().sum()), float(r.detach().sum()), self.num_steps
