"""The rollout engine: executes a :class:`RolloutPlan` on a backbone.

Randomness is per sample: every trajectory owns a generator (seeded from the run seed, the
iteration and the sample's global index), from which it draws its initial noise and then one noise
tensor per stochastic step. A sample's trajectory therefore does not depend on how samples are
batched or spread over ranks: one process and N processes with the same global batch sample the
same images, and a resumed run samples exactly what an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from alignrl.backbones.base import Backbone, Conditioning, Schedule
from alignrl.sampling.kernels import KERNELS, StepResult, ode_step
from alignrl.sampling.plans import RolloutPlan, StepSpec


def sample_generators(seed: int, iteration: int, indices: Sequence[int], device="cpu") -> list[torch.Generator]:
    """One generator per sample, keyed by (seed, iteration, global sample index)."""
    gens = []
    for idx in indices:
        g = torch.Generator(device=device)
        # A fixed odd-multiplier mix keeps keys distinct for realistic ranges (< 2^20 samples/iteration).
        g.manual_seed((int(seed) * 1_000_003 + int(iteration)) * 1_048_583 + int(idx) & 0x7FFF_FFFF_FFFF_FFFF)
        gens.append(g)
    return gens


def draw_noise(generators: Sequence[torch.Generator], shape: Sequence[int], device) -> torch.Tensor:
    return torch.stack([torch.randn(tuple(shape), generator=g, device=g.device) for g in generators]).to(device)


def _children(generators: Sequence[torch.Generator], branch: int) -> list[torch.Generator]:
    """Deterministic child generators for a branch point (each parent gives ``branch`` children)."""
    out = []
    for g in generators:
        seeds = torch.randint(0, 2**62, (branch,), generator=g, device=g.device).tolist()
        for s in seeds:
            child = torch.Generator(device=g.device)
            child.manual_seed(int(s))
            out.append(child)
    return out


@dataclass
class StepRecord:
    """What the trainer needs to re-score one step: the transition and the old policy's log-prob."""

    step: int
    x: torch.Tensor  # latent before the step (n, ...)
    next_x: torch.Tensor  # sampled latent after the step
    logp_old: torch.Tensor  # (n,) log-prob under the sampling policy, mean over dims
    mean_old: torch.Tensor  # (n, ...) step mean under the sampling policy
    node: torch.Tensor  # (n,) index of the trajectory (at this depth) the transition belongs to


@dataclass
class Rollout:
    final: torch.Tensor  # final latents of every leaf
    leaf_root: torch.Tensor  # (num_leaves,) root sample index of each leaf
    records: list[StepRecord] = field(default_factory=list)
    model_evals: int = 0  # predict() calls x rows: forward passes of the denoiser over samples

    def stacked(self):
        """For linear plans: tensors (B, S, ...) of x, next_x, mean_old and (B, S) logp_old, plus step ids (S,)."""
        if not self.records:
            raise ValueError("this rollout recorded no trained steps")
        steps = torch.tensor([r.step for r in self.records], dtype=torch.long)
        return {
            "x": torch.stack([r.x for r in self.records], dim=1),
            "next_x": torch.stack([r.next_x for r in self.records], dim=1),
            "logp_old": torch.stack([r.logp_old for r in self.records], dim=1),
            "mean_old": torch.stack([r.mean_old for r in self.records], dim=1),
            "steps": steps,
        }


def apply_step(backbone: Backbone, spec: StepSpec, schedule: Schedule, i: int, x: torch.Tensor,
               v: torch.Tensor, noise: torch.Tensor | None = None, next_x: torch.Tensor | None = None) -> StepResult:
    """Run (or, with ``next_x``, re-score) step ``i`` of ``schedule`` with the kernel ``spec`` names."""
    sigma, sigma_next = schedule.sigmas[i], schedule.sigmas[i + 1]
    if spec.kind == "ode":
        return ode_step(x, v, sigma, sigma_next)
    return KERNELS[spec.kind](x, v, sigma, sigma_next, noise_level=spec.noise_level,
                              sigma_max_guard=schedule.sigmas[1], noise=noise, next_x=next_x)


@torch.no_grad()
def rollout(backbone: Backbone, plan: RolloutPlan, cond: Conditioning, generators: Sequence[torch.Generator],
            *, transformer: torch.nn.Module | None = None, record: bool = True) -> Rollout:
    """Sample ``len(generators)`` root trajectories under ``plan``; record the trained transitions."""
    schedule = backbone.make_schedule(plan.num_steps)
    x = backbone.initial_noise(generators)
    gens = list(generators)
    node_root = torch.arange(x.shape[0], device=x.device)
    records: list[StepRecord] = []
    evals = 0
    for i, spec in enumerate(plan.steps):
        if spec.branch > 1:
            x = x.repeat_interleave(spec.branch, dim=0)
            node_root = node_root.repeat_interleave(spec.branch)
            cond = cond.index(torch.arange(cond.batch_size, device=x.device).repeat_interleave(spec.branch))
            gens = _children(gens, spec.branch)
        v = backbone.predict(x, schedule.timesteps[i], cond, plan.guidance_scale, transformer=transformer)
        evals += x.shape[0]
        noise = None if spec.kind == "ode" else draw_noise(gens, x.shape[1:], x.device)
        res = apply_step(backbone, spec, schedule, i, x, v, noise=noise)
        if record and spec.trained:
            records.append(StepRecord(step=i, x=x, next_x=res.next_x, logp_old=res.logp_mean_per_dim,
                                      mean_old=res.mean, node=torch.arange(x.shape[0], device=x.device)))
        x = res.next_x
    return Rollout(final=x, leaf_root=node_root, records=records, model_evals=evals)
