"""The rollout engine: executes a :class:`RolloutPlan` on a backbone.

Randomness is per sample: every trajectory owns a generator (seeded from the run seed, the
iteration and the sample's global index), from which it draws its initial noise and then one noise
tensor per stochastic step. A sample's trajectory therefore does not depend on how samples are
batched or spread over ranks: one process and N processes with the same global batch sample the
same images, and a resumed run samples exactly what an uninterrupted one would.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import Sequence

import torch

from alignrl.backbones.base import Backbone, Conditioning, Schedule
from alignrl.sampling.kernels import (KERNELS, REVERSE_SDE, StepResult, dpm_solver_2m_step, ode_step,
                                     reverse_sde_step, sde_coefficients)
from alignrl.sampling.plans import RolloutPlan, StepSpec


def generator_seed(seed: int, iteration: int, index: int) -> int:
    """The seed of sample ``index``'s generator in ``iteration``: a fixed odd-multiplier mix keeps keys distinct
    for realistic ranges (< 2^20 samples per iteration)."""
    return (int(seed) * 1_000_003 + int(iteration)) * 1_048_583 + int(index) & 0x7FFF_FFFF_FFFF_FFFF


def sample_generators(seed: int, iteration: int, indices: Sequence[int], device="cpu") -> list[torch.Generator]:
    """One generator per sample, keyed by (seed, iteration, global sample index)."""
    return [torch.Generator(device=device).manual_seed(generator_seed(seed, iteration, idx)) for idx in indices]


def draw_noise(generators: Sequence[torch.Generator], shape: Sequence[int], device) -> torch.Tensor:
    return torch.stack([torch.randn(tuple(shape), generator=g, device=g.device) for g in generators]).to(device)


_ONE_CALL_DRAWS: dict[int, bool] = {}


def _one_call_equals_successive(numel: int) -> bool:
    """Whether one ``randn`` of ``k * numel`` values from a CPU generator gives the values (and leaves the generator
    in the state) of ``k`` successive draws of ``numel``: true where the CPU normal sampler's blocks of 16 do not
    straddle two draws, i.e. for sizes that are a multiple of 16. Checked once per size on this build."""
    if numel not in _ONE_CALL_DRAWS:
        one, each = torch.Generator().manual_seed(12345), torch.Generator().manual_seed(12345)
        whole = torch.randn(3 * numel, generator=one)
        parts = torch.cat([torch.randn(numel, generator=each) for _ in range(3)])
        _ONE_CALL_DRAWS[numel] = numel % 16 == 0 and torch.equal(whole, parts) and \
            torch.equal(torch.randn(5, generator=one), torch.randn(5, generator=each))
    return _ONE_CALL_DRAWS[numel]


def draw_noise_ahead(generators: Sequence[torch.Generator], shape: Sequence[int], count: int,
                     device) -> torch.Tensor | None:
    """``count`` successive ``draw_noise`` results, (count, B, *shape), drawn in one call per generator: the same
    values, and the generators left as after the successive draws. None where that would not hold (a CUDA generator,
    or a size ``_one_call_equals_successive`` refuses): the caller then draws step by step."""
    if count < 2 or any(g.device.type != "cpu" for g in generators):
        return None
    shape = tuple(shape)
    if not _one_call_equals_successive(math.prod(shape)):
        return None
    return torch.stack([torch.randn((count, *shape), generator=g) for g in generators], dim=1).to(device)


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
    """Trained transitions of one executed step: what the trainer needs to re-score them.

    Rows are live trajectories. ``node_key`` groups nodes for advantages (the tree depth, or the side
    branch's index); each row's child node owns the leaves ``leaf_lo .. leaf_lo + leaf_count - 1``.
    """

    step: int  # schedule index the step starts at
    step_to: int  # schedule index it ends at
    spec: StepSpec
    x: torch.Tensor  # latent before the step (n, ...)
    next_x: torch.Tensor  # sampled latent after the step
    logp_old: torch.Tensor  # (n,) log-prob under the sampling policy, mean over dims
    mean_old: torch.Tensor  # (n, ...) step mean under the sampling policy
    root: torch.Tensor  # (n,) root sample (index into the rollout's conditioning) of each row
    leaf_lo: torch.Tensor  # (n,) first leaf of each row's child node
    leaf_count: int
    node_key: int = 0
    std: float = 0.0  # the step's Gaussian std (mean over rows), for noise-aware loss weights


@dataclass
class Rollout:
    final: torch.Tensor  # final latents of every leaf, root-major (a root's leaves are contiguous)
    leaf_root: torch.Tensor  # (num_leaves,) root sample index of each leaf
    records: list[StepRecord] = field(default_factory=list)
    model_evals: int = 0  # predict() calls x rows: forward passes of the denoiser over samples
    leaf_path_logp: torch.Tensor | None = None  # (num_leaves,) sum of step log-probs along each leaf's path
    leaf_tag: torch.Tensor | None = None  # (num_leaves,) continuation granularity index (side branches)

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


def apply_step(backbone: Backbone, spec: StepSpec, schedule: Schedule, i, x: torch.Tensor,
               v: torch.Tensor, noise: torch.Tensor | None = None, next_x: torch.Tensor | None = None,
               i_to=None) -> StepResult:
    """Run (or, with ``next_x``, re-score) the step ``i -> i_to`` (default ``i + 1``) of ``schedule`` with the
    kernel ``spec`` names. ``i`` may be a per-sample (B,) tensor of schedule indices."""
    i_to = i + 1 if i_to is None else i_to
    if spec.kind in REVERSE_SDE and isinstance(i, int) and isinstance(i_to, int) \
            and not torch.is_inference_mode_enabled():  # (inference tensors kept would refuse a later backward)
        # a step's factors depend on the schedule only: computed once per (step, kernel) and kept on the schedule
        key = (spec.kind, i, i_to, float(spec.noise_level), x.device)
        c = schedule.memo.get(key)
        if c is None:
            c = schedule.memo[key] = sde_coefficients(spec.kind, x, schedule.sigmas[i], schedule.sigmas[i_to],
                                                      noise_level=spec.noise_level, sigma_max_guard=schedule.sigmas[1])
        return reverse_sde_step(spec.kind, x, v, c, noise=noise, next_x=next_x)
    sigma, sigma_next = schedule.sigmas[i], schedule.sigmas[i_to]
    if spec.kind == "ode":
        return ode_step(x, v, sigma, sigma_next)
    if spec.kind == "dpm2m":
        raise ValueError("dpm2m is a multistep solver: the rollout engine runs it, it cannot be re-scored")
    return KERNELS[spec.kind](x, v, sigma, sigma_next, noise_level=spec.noise_level,
                              sigma_max_guard=schedule.sigmas[1], noise=noise, next_x=next_x)


@torch.no_grad()
def rollout(backbone: Backbone, plan: RolloutPlan, cond: Conditioning, generators: Sequence[torch.Generator],
            *, transformer: torch.nn.Module | None = None, record: bool = True,
            start: torch.Tensor | None = None) -> Rollout:
    """Sample ``len(generators)`` root trajectories under ``plan``; record the trained transitions. ``start``:
    the initial latents (default: each sample's generator draws its own)."""
    schedule = backbone.make_schedule(plan.base_steps)
    grid = plan.grid_indices
    if start is not None and start.shape[0] != len(generators):
        raise ValueError(f"rollout: {start.shape[0]} initial latents for {len(generators)} samples")
    x = backbone.start_latents(generators, schedule) if start is None else start
    roots = x.shape[0]
    gens = list(generators)
    node_root = torch.arange(roots, device=x.device)
    path_logp = torch.zeros(roots, device=x.device)
    records: list[StepRecord] = []
    evals = 0
    depth = 0
    leaves_after = [1] * (len(plan.steps) + 1)  # leaves per live trajectory after step k's branching
    for k in range(len(plan.steps) - 1, -1, -1):
        leaves_after[k] = leaves_after[k + 1] * (plan.steps[k + 1].branch if k + 1 < len(plan.steps) else 1)
    trunk: dict[int, torch.Tensor] = {}
    side_steps = {b.step for b in plan.side_branches}
    dpm_state = None
    leaf_lo: dict[tuple[int, int], torch.Tensor] = {}
    noise_ahead, drawn = None, 0
    if not plan.side_branches and all(spec.branch == 1 for spec in plan.steps):  # the generators never change:
        # every step's noise in one draw per sample
        noise_ahead = draw_noise_ahead(gens, x.shape[1:], sum(_draws_noise(spec) for spec in plan.steps), x.device)
    for k, spec in enumerate(plan.steps):
        a, b = grid[k], grid[k + 1]
        if a in side_steps:
            trunk[a] = x
            if a == max(side_steps):
                break  # the trunk is only needed up to the last branch point
        if spec.branch > 1:
            depth += 1
            x = x.repeat_interleave(spec.branch, dim=0)
            node_root = node_root.repeat_interleave(spec.branch)
            path_logp = path_logp.repeat_interleave(spec.branch)
            cond = cond.index(torch.arange(cond.prompt_rows, device=x.device).repeat_interleave(spec.branch))
            gens = _children(gens, spec.branch)
        v = backbone.predict(x, schedule.timesteps[a], cond, plan.guidance_scale, transformer=transformer)
        evals += x.shape[0]
        if spec.kind == "dpm2m":
            # diffusers' lower_order_final: under 15 steps the last step is first order
            prev = None if k == len(plan.steps) - 1 and len(plan.steps) < 15 else dpm_state
            x, dpm_state = dpm_solver_2m_step(x, v, schedule.sigmas[a], schedule.sigmas[b], prev)
            continue
        dpm_state = None
        noise = None
        if _draws_noise(spec):
            noise = noise_ahead[drawn] if noise_ahead is not None else draw_noise(gens, x.shape[1:], x.device)
            drawn += 1
        res = apply_step(backbone, spec, schedule, a, x, v, noise=noise, i_to=b)
        if spec.stochastic:
            path_logp = path_logp + res.logp_mean_per_dim
        if record and spec.trained:
            lo_key = (x.shape[0], leaves_after[k])  # the same rows and leaves per row: the same first leaves
            if lo_key not in leaf_lo:
                leaf_lo[lo_key] = torch.arange(x.shape[0], device=x.device) * leaves_after[k]
            records.append(StepRecord(step=a, step_to=b, spec=spec, x=x, next_x=res.next_x,
                                      logp_old=res.logp_mean_per_dim, mean_old=res.mean, root=node_root,
                                      leaf_lo=leaf_lo[lo_key], leaf_count=leaves_after[k], node_key=depth,
                                      std=_mean_std(res)))
        x = res.next_x
    if not plan.side_branches:
        return Rollout(final=backbone.from_frame(x, schedule.sigmas[grid[-1]]), leaf_root=node_root, records=records, model_evals=evals, leaf_path_logp=path_logp)
    return _side_branches(backbone, plan, schedule, cond, generators, trunk, transformer, record, evals)


def _side_branches(backbone, plan: RolloutPlan, schedule: Schedule, cond: Conditioning, generators, trunk,
                   transformer, record: bool, evals: int) -> Rollout:
    """Children leave the trunk at each side branch: one stochastic step, then ODE per granularity.
    Leaves are laid out root-major: root, branch, child, granularity."""
    roots = len(generators)
    per_root = plan.leaves_per_root
    final = None
    path = torch.zeros(roots * per_root, device=trunk[plan.side_branches[0].step].device)
    tag = torch.zeros(roots * per_root, dtype=torch.long, device=path.device)
    records: list[StepRecord] = []
    offset = 0
    for bi, br in enumerate(plan.side_branches):
        n = br.children
        g_count = len(br.granularities)
        x = trunk[br.step].repeat_interleave(n, dim=0)  # (roots * n, ...): root-major
        c = cond.index(torch.arange(roots, device=x.device).repeat_interleave(n))
        # one child generator per (root, child), derived from the root's generator and the branch step
        gens = []
        for g in generators:
            seeds = torch.randint(0, 2**62, (n,), generator=_fork(g, br.step)).tolist()
            gens += [torch.Generator(device=g.device).manual_seed(int(s)) for s in seeds]
        spec = StepSpec(kind=br.kind, noise_level=br.noise_level, trained=True, loss_weight=br.loss_weight)
        v = backbone.predict(x, schedule.timesteps[br.step], c, plan.guidance_scale, transformer=transformer)
        evals += x.shape[0]
        res = apply_step(backbone, spec, schedule, br.step, x, v, noise=draw_noise(gens, x.shape[1:], x.device))
        rows = torch.arange(roots * n, device=x.device)
        root_of = rows // n
        leaf_lo = root_of * per_root + offset + (rows % n) * g_count
        if record:
            records.append(StepRecord(step=br.step, step_to=br.step + 1, spec=spec, x=x, next_x=res.next_x,
                                      logp_old=res.logp_mean_per_dim, mean_old=res.mean, root=root_of,
                                      leaf_lo=leaf_lo, leaf_count=g_count, node_key=bi, std=_mean_std(res)))
        for gi, gran in enumerate(br.granularities):
            y = res.next_x
            idx = plan.continuation_grid(br.step, gran)
            for a, b in zip(idx, idx[1:]):
                vv = backbone.predict(y, schedule.timesteps[a], c, plan.guidance_scale, transformer=transformer)
                evals += y.shape[0]
                y = ode_step(y, vv, schedule.sigmas[a], schedule.sigmas[b]).next_x
            if final is None:
                final = torch.empty((roots * per_root, *y.shape[1:]), dtype=y.dtype, device=y.device)
            final[leaf_lo + gi] = backbone.from_frame(y, schedule.sigmas[idx[-1]])
            path[leaf_lo + gi] = res.logp_mean_per_dim
            tag[leaf_lo + gi] = gi
        offset += n * g_count
    leaf_root = torch.arange(roots, device=path.device).repeat_interleave(per_root)
    return Rollout(final=final, leaf_root=leaf_root, records=records, model_evals=evals, leaf_path_logp=path,
                   leaf_tag=tag)


@torch.no_grad()
def sample_images(backbone: Backbone, plan: RolloutPlan, prompts: Sequence[str], ids: Sequence[int], seed: int,
                  batch: int | None = None) -> torch.Tensor:
    """Decoded samples on the CPU, one per prompt: sample ``ids[i]`` of ``prompts[i]`` from its own keyed stream
    (``sample_generators(seed, 0, ids)``: the same image whatever the batching), ``batch`` at a time (default all)."""
    step = batch or max(1, len(prompts))
    out = []
    for lo in range(0, len(prompts), step):
        cond = backbone.encode_prompts(list(prompts[lo:lo + step]))
        gens = sample_generators(seed, 0, ids[lo:lo + step], backbone.device)
        out.append(backbone.decode(rollout(backbone, plan, cond, gens, record=False).final).cpu())
    return torch.cat(out)


def _draws_noise(spec: StepSpec) -> bool:
    """Whether the rollout draws noise for a step of this kernel (a multistep solver's steps draw none)."""
    return spec.stochastic and spec.kind != "dpm2m"


def _mean_std(res: StepResult) -> float:
    if res.coefficients is not None:  # kept with the step's factors: read once per step, not per record
        return res.coefficients.std_mean
    return float(torch.as_tensor(res.std).float().mean()) if res.std is not None else 0.0


def _fork(generator: torch.Generator, salt: int) -> torch.Generator:
    """A generator derived from ``generator``'s seed and ``salt`` without advancing ``generator``."""
    g = torch.Generator(device=generator.device)
    g.manual_seed((generator.initial_seed() * 1_000_003 + 7919 * (int(salt) + 1)) & 0x7FFF_FFFF_FFFF_FFFF)
    return g
