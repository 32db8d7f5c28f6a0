"""Rollout plans: data that says how a rollout runs, executed by the one rollout engine.

A :class:`RolloutPlan` lists, for every executed step, the kernel (``ode``, ``dpm2m`` or a stochastic
kernel such as ``sde``/``cps``/``dance``), its noise level, whether the transition is trained, how many
children each live trajectory splits into before the step (trees), and the step's loss weight. The
steps run on a *grid* of indices into the backbone's T-step schedule (default ``0..T``): a compressed
ODE tail (MixGRPO-Flash) is a grid that skips indices. Side branches (TempFlow-GRPO, G2RPO) leave an
ODE trunk at chosen steps: each child takes one stochastic step from the trunk latent and finishes by
ODE. Windows, mixed ODE-SDE schedules, trees and side branches are new plans, not new loops.

A *planner* (built from the ``sampler`` config group) makes the plan for each rollout batch; it may
draw from a generator that is seeded identically on every rank (per iteration), and it carries any
state that must survive a resume (``state_dict``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from alignrl.errors import ConfigError
from alignrl.sampling.kernels import DETERMINISTIC, KERNELS


@dataclass(frozen=True)
class StepSpec:
    kind: str = "ode"  # "ode", "dpm2m" or a name in KERNELS
    noise_level: float = 0.0
    trained: bool = False
    branch: int = 1  # each live trajectory splits into this many before this step
    loss_weight: float = 1.0

    def __post_init__(self):
        if self.kind not in DETERMINISTIC and self.kind not in KERNELS:
            raise ConfigError(f"unknown step kernel '{self.kind}'; use one of {', '.join(DETERMINISTIC + tuple(KERNELS))}")
        if self.trained and self.kind in DETERMINISTIC:
            raise ConfigError("a deterministic (ODE) step has no log-prob and cannot be a trained step of a "
                              "policy-gradient plan")
        if self.branch < 1:
            raise ConfigError(f"branch factor must be >= 1, got {self.branch}")

    @property
    def stochastic(self) -> bool:
        return self.kind not in DETERMINISTIC


@dataclass(frozen=True)
class SideBranch:
    """At trunk step ``step``, ``children`` copies of the trunk latent take one ``kind`` step (trained),
    then finish by Euler ODE, once per continuation granularity (1 = every remaining grid step, 2 = every
    other one, ...). Each (child, granularity) pair is a leaf."""

    step: int
    children: int
    kind: str = "sde"
    noise_level: float = 0.7
    granularities: tuple[int, ...] = (1,)
    loss_weight: float = 1.0


@dataclass(frozen=True)
class RolloutPlan:
    name: str
    guidance_scale: float
    steps: tuple[StepSpec, ...]
    grid: tuple[int, ...] | None = None  # executed step k runs schedule index grid[k] -> grid[k+1]
    schedule_steps: int | None = None  # T of the backbone schedule the grid indexes (default: len(steps))
    sample_fraction: float | None = None  # each sample trains a random subset of this fraction of its trained steps
    side_branches: tuple[SideBranch, ...] = ()
    fusion: str = "mean"  # how a tree node's reward is fused from its leaves: mean or logp_softmax
    fusion_alpha: float = 1.0
    width_prune_ratio: float = 0.0  # trees: after the last split keep only the best and worst fraction of edges
    noise_aware_weight: bool = False  # weight each trained step's loss by its Gaussian std (losses are normalised by the weights' sum)

    def __post_init__(self):
        grid = self.grid if self.grid is not None else tuple(range(self.base_steps + 1))
        if len(grid) != len(self.steps) + 1 or any(b <= a for a, b in zip(grid, grid[1:])):
            raise ConfigError(f"plan '{self.name}': grid {grid} must be increasing with one more entry than steps")
        if grid[0] != 0 or grid[-1] != self.base_steps:
            raise ConfigError(f"plan '{self.name}': grid must run from 0 to {self.base_steps}")
        for k, s in enumerate(self.steps):
            if s.trained and grid[k + 1] != grid[k] + 1:
                raise ConfigError(f"plan '{self.name}': trained step {k} must not skip schedule indices")
        if self.side_branches and (any(s.trained or s.branch > 1 or s.stochastic for s in self.steps)):
            raise ConfigError(f"plan '{self.name}': side branches leave a deterministic, unbranched trunk")
        if self.fusion not in ("mean", "logp_softmax"):
            raise ConfigError(f"unknown reward fusion '{self.fusion}'; use mean or logp_softmax")

    @property
    def num_steps(self) -> int:
        """Executed steps (denoiser calls per trajectory of a linear plan)."""
        return len(self.steps)

    @property
    def base_steps(self) -> int:
        return int(self.schedule_steps) if self.schedule_steps is not None else len(self.steps)

    @property
    def grid_indices(self) -> tuple[int, ...]:
        return self.grid if self.grid is not None else tuple(range(self.base_steps + 1))

    @property
    def trained_steps(self) -> list[int]:
        """Schedule indices of the trained transitions (side-branch steps included)."""
        grid = self.grid_indices
        return sorted({grid[k] for k, s in enumerate(self.steps) if s.trained} | {b.step for b in self.side_branches})

    def pruned_edges(self, n: int) -> int:
        """How many of a prompt's ``n`` edges after the last split ``width_prune_ratio`` drops."""
        return int(round(n * self.width_prune_ratio))

    def transitions_per_root(self, width_pruned: bool = False) -> list[tuple[int, tuple[str, float]]]:
        """(trained transitions a root contributes, the step's kernel) at each trained step, in schedule order: 1 on
        a linear plan, the tree's width after that step's splits on a branching one, a side branch's children. With
        ``width_pruned``, a tree's steps after its last split count the edges ``width_prune_ratio`` keeps (exact for
        one root per prompt: the advantages drop that fraction of each prompt's deepest nodes)."""
        grid, width, per_step = self.grid_indices, 1, {}
        splits = [k for k, s in enumerate(self.steps) if s.branch > 1]
        for k, s in enumerate(self.steps):
            width *= s.branch
            if s.trained:
                rows = width
                if width_pruned and splits and k >= splits[-1]:
                    rows = width - self.pruned_edges(width)
                n, _ = per_step.get(grid[k], (0, None))
                per_step[grid[k]] = (n + rows, (s.kind, float(s.noise_level)))
        for b in self.side_branches:
            n, _ = per_step.get(b.step, (0, None))
            per_step[b.step] = (n + b.children, (b.kind, float(b.noise_level)))
        return [per_step[j] for j in sorted(per_step)]

    @property
    def leaves_per_root(self) -> int:
        tree = math.prod(s.branch for s in self.steps)
        if self.side_branches:
            return sum(b.children * len(b.granularities) for b in self.side_branches)
        return tree

    @property
    def is_linear(self) -> bool:
        return self.leaves_per_root == 1 and not self.side_branches

    def continuation_grid(self, step: int, granularity: int) -> list[int]:
        """Schedule indices an ODE continuation visits after a side branch's stochastic step at ``step``."""
        rest = list(range(step + 1, self.base_steps + 1, granularity))
        if rest[-1:] != [self.base_steps]:
            rest.append(self.base_steps)
        return rest

    def model_evals(self, num_roots: int, evals_per_predict: int = 1) -> int:
        """Denoiser forward passes for ``num_roots`` trajectories (x2 per predict with batched CFG)."""
        live, total = num_roots, 0
        if self.side_branches:  # the ODE trunk runs up to the last branch point only
            total = num_roots * max(b.step for b in self.side_branches)
        for s in ([] if self.side_branches else self.steps):
            live *= s.branch
            total += live
        for b in self.side_branches:
            per_child = 1 + sum(len(self.continuation_grid(b.step, g)) - 1 for g in b.granularities)
            total += num_roots * b.children * per_child
        return total * evals_per_predict


def ode_plan(num_steps: int, guidance_scale: float, kind: str = "ode") -> RolloutPlan:
    """A deterministic plan: every step ``kind`` (``ode``: Euler, DDIM with eta 0 on UNet backbones; ``dpm2m``:
    DPM-Solver++(2M))."""
    return RolloutPlan(kind, float(guidance_scale), tuple(StepSpec(kind=kind) for _ in range(num_steps)))


def _check_common(num_steps: int, noise_level: float, sde_type: str) -> None:
    if num_steps < 1:
        raise ConfigError(f"sampler.num_steps must be >= 1, got {num_steps}")
    if noise_level <= 0:
        raise ConfigError(f"sampler.noise_level must be > 0 for trained stochastic steps (a zero-noise step has "
                          f"no log-prob), got {noise_level}")
    if sde_type not in KERNELS:
        raise ConfigError(f"sampler.sde_type='{sde_type}' is not known; use one of {', '.join(KERNELS)}")


@dataclass
class PlannerBase:
    """What every planner shares: evaluation is an ODE plan; no state unless a planner keeps some."""

    num_steps: int = 10
    noise_level: float = 0.7
    sde_type: str = "sde"
    guidance_scale: float = 4.5
    eval_num_steps: int = 40
    eval_guidance_scale: float | None = None  # defaults to guidance_scale
    eval_solver: str = "ode"  # ode (Euler; DDIM with eta 0 on UNet backbones) or dpm2m (DPM-Solver++(2M))
    init_same_noise: bool = False  # every image of a prompt's group starts from one initial noise (DanceGRPO)

    def begin_iteration(self, iteration: int, generator: torch.Generator) -> None:
        """Called once per iteration before any plan is made (same arguments on every rank)."""

    def eval_plan(self) -> RolloutPlan:
        scale = self.guidance_scale if self.eval_guidance_scale is None else self.eval_guidance_scale
        if self.eval_solver not in DETERMINISTIC:
            raise ConfigError(f"sampler.eval_solver='{self.eval_solver}' is not known; use one of "
                              f"{', '.join(DETERMINISTIC)}")
        return ode_plan(self.eval_num_steps, scale, kind=self.eval_solver)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None

    def _window_steps(self, start: int, width: int, after: str = "ode", compress_ratio: float = 1.0):
        """ODE before ``[start, start + width)``, trained stochastic steps inside, then ``after`` (ode or
        dpm2m on a grid compressed to ``int(max((T - L) r, 1))`` steps). Returns (steps, grid)."""
        T = self.num_steps
        end = start + width
        sde = StepSpec(kind=self.sde_type, noise_level=float(self.noise_level), trained=True)
        steps = [StepSpec() for _ in range(start)] + [sde] * width
        grid = list(range(end + 1))
        tail = T - end
        if tail > 0:
            n = tail if after == "ode" else int(max(tail * compress_ratio, 1))
            idx = sorted({end + round(tail * k / n) for k in range(1, n + 1)})
            grid += idx
            steps += [StepSpec(kind=after)] * len(idx)
        return tuple(steps), tuple(grid)


@dataclass
class FlowGRPOPlanner(PlannerBase):
    """Flow-GRPO: every step stochastic; steps ``0 .. int(T * timestep_fraction) - 1`` are trained.

    With ``timestep_fraction`` 0.99 and T = 10 that is steps 0..8: the last step is never trained.
    """

    timestep_fraction: float = 0.99
    _plan: RolloutPlan | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        _check_common(self.num_steps, self.noise_level, self.sde_type)
        if not 0 < self.timestep_fraction <= 1:
            raise ConfigError(f"sampler.timestep_fraction must be in (0, 1], got {self.timestep_fraction}")
        num_trained = int(self.num_steps * self.timestep_fraction)
        if num_trained < 1:
            raise ConfigError(
                f"sampler.timestep_fraction={self.timestep_fraction} trains no step of {self.num_steps}; raise it"
            )
        if self.sde_type == "cps" and num_trained == self.num_steps:
            raise ConfigError("the last CPS step is deterministic (std 0) and cannot be trained; "
                              "use sampler.timestep_fraction < 1")
        step = StepSpec(kind=self.sde_type, noise_level=float(self.noise_level))
        steps = tuple(replace(step, trained=i < num_trained) for i in range(self.num_steps))
        self._plan = RolloutPlan("flowgrpo", float(self.guidance_scale), steps)

    def plan(self, generator: torch.Generator | None = None) -> RolloutPlan:
        return self._plan

    @property
    def max_trained_steps(self) -> int:
        return len(self._plan.trained_steps)


@dataclass
class FastPlanner(PlannerBase):
    """Flow-GRPO-Fast: each rollout batch draws a window start ``l ~ U{lo, .., hi - w}``; SDE (trained) inside
    ``[l, l + w)``, ODE elsewhere. ``branched``: one ODE prefix per root splits into ``branches`` copies at the
    window start (use ``algorithm.group_size=1``: the K images of a prompt are the branches)."""

    window_size: int = 2
    window_range: tuple[int, int] | None = None  # (lo, hi); default (0, T - 1): the last step is never trained
    branched: bool = False
    branches: int = 8

    def __post_init__(self):
        _check_common(self.num_steps, self.noise_level, self.sde_type)
        lo, hi = self.window_range if self.window_range is not None else (0, self.num_steps - 1)
        if not (0 <= lo and hi <= self.num_steps and hi - lo >= self.window_size >= 1):
            raise ConfigError(f"sampler.window_range=({lo}, {hi}) cannot hold a window of {self.window_size} "
                              f"steps in a {self.num_steps}-step schedule")
        if self.branched and self.branches < 2:
            raise ConfigError(f"sampler.branches must be >= 2 for the branched variant, got {self.branches}")
        self.lo, self.hi = int(lo), int(hi)

    def plan(self, generator: torch.Generator | None = None) -> RolloutPlan:
        start = int(torch.randint(self.lo, self.hi - self.window_size + 1, (1,), generator=generator))
        steps, grid = self._window_steps(start, self.window_size)
        if self.branched:
            steps = tuple(replace(s, branch=self.branches) if k == start else s for k, s in enumerate(steps))
        return RolloutPlan("flowgrpo_fast", float(self.guidance_scale), steps, grid=grid,
                           schedule_steps=self.num_steps)

    @property
    def max_trained_steps(self) -> int:
        return self.window_size


@dataclass
class MixGRPOPlanner(PlannerBase):
    """MixGRPO: a sliding window ``[l, l + w)`` of trained SDE steps, ODE outside; the window moves every
    ``shift_interval`` iterations by ``window_stride`` (progressive, optionally rolling back to 0), is drawn
    uniformly per iteration (random, the same on every rank), or moves with an interval that shrinks as the
    window advances (decay: linearly from ``shift_interval`` to 1; exp_decay: ``shift_interval * decay_rate^l``).
    ``frozen`` keeps it at ``window_start``. Flash: after the window the ODE runs on a grid compressed to
    ``int(max((T - L) * compress_ratio, 1))`` steps with DPM-Solver++(2M) (``ode_after=dpm2m``).
    The window position is part of the checkpoint."""

    window_size: int = 4
    strategy: str = "progressive"  # progressive | random | decay | exp_decay | frozen
    shift_interval: int = 25
    window_stride: int = 1
    window_start: int = 0
    roll_back: bool = False
    decay_rate: float = 0.8
    ode_after: str = "ode"  # ode | dpm2m (Flash)
    compress_ratio: float = 1.0  # Flash: 0.4; Flash*: 0.2 with strategy=frozen
    _start: int = field(default=0, init=False)
    _since_move: int = field(default=0, init=False)
    _last_iteration: int = field(default=-1, init=False)

    STRATEGIES = ("progressive", "random", "decay", "exp_decay", "frozen")

    def __post_init__(self):
        _check_common(self.num_steps, self.noise_level, self.sde_type)
        if self.strategy not in self.STRATEGIES:
            raise ConfigError(f"sampler.strategy='{self.strategy}' is not known; use one of {', '.join(self.STRATEGIES)}")
        if not 1 <= self.window_size <= self.max_start + self.window_size:
            raise ConfigError(f"sampler.window_size must be in [1, {self.num_steps - (self.sde_type == 'cps')}], "
                              f"got {self.window_size}")
        if not 0 <= self.window_start <= self.max_start:
            raise ConfigError(f"sampler.window_start must be in [0, {self.max_start}], got {self.window_start}")
        if self.shift_interval < 1 or self.window_stride < 1:
            raise ConfigError("sampler.shift_interval and sampler.window_stride must be >= 1")
        if self.ode_after not in DETERMINISTIC:
            raise ConfigError(f"sampler.ode_after='{self.ode_after}' is not known; use ode or dpm2m")
        if not 0 < self.compress_ratio <= 1:
            raise ConfigError(f"sampler.compress_ratio must be in (0, 1], got {self.compress_ratio}")
        self._start = int(self.window_start)

    @property
    def max_start(self) -> int:
        # l <- min(l + s, T - w) as the reference; a CPS last step is deterministic, so it stays out
        return self.num_steps - self.window_size - (1 if self.sde_type == "cps" else 0)

    def interval(self) -> int:
        if self.strategy == "decay":
            frac = self._start / max(self.max_start, 1)
            return max(1, round(self.shift_interval - (self.shift_interval - 1) * frac))
        if self.strategy == "exp_decay":
            return max(1, round(self.shift_interval * self.decay_rate ** self._start))
        return self.shift_interval

    def begin_iteration(self, iteration: int, generator: torch.Generator) -> None:
        if iteration == self._last_iteration:
            return
        self._last_iteration = iteration
        if self.strategy == "random":
            self._start = int(torch.randint(0, self.max_start + 1, (1,), generator=generator))
            return
        if self.strategy == "frozen" or iteration == 0:
            return
        self._since_move += 1
        if self._since_move >= self.interval():
            self._since_move = 0
            nxt = self._start + self.window_stride
            if nxt > self.max_start:
                nxt = 0 if self.roll_back else self.max_start
            self._start = nxt

    def plan(self, generator: torch.Generator | None = None) -> RolloutPlan:
        steps, grid = self._window_steps(self._start, self.window_size, self.ode_after, self.compress_ratio)
        name = "mixgrpo_flash" if self.ode_after == "dpm2m" else "mixgrpo"
        return RolloutPlan(name, float(self.guidance_scale), steps, grid=grid, schedule_steps=self.num_steps)

    @property
    def window(self) -> tuple[int, int]:
        return self._start, self._start + self.window_size

    @property
    def max_trained_steps(self) -> int:
        return self.window_size

    def state_dict(self) -> dict:
        return {"start": self._start, "since_move": self._since_move, "last_iteration": self._last_iteration}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self._start = int(state["start"])
            self._since_move = int(state["since_move"])
            self._last_iteration = int(state["last_iteration"])


@dataclass
class DancePlanner(PlannerBase):
    """DanceGRPO: every step a Dance SDE step; each sample trains a random ``timestep_fraction`` of steps
    0..T-2 (the subset is drawn per sample at update time, seeded by the run, iteration and sample)."""

    sde_type: str = "dance"
    noise_level: float = 0.3  # eta
    timestep_fraction: float = 0.6
    final_step: str = "sde"  # the last (never trained) step: sde, or ode (the image is its x0 prediction)

    def __post_init__(self):
        _check_common(self.num_steps, self.noise_level, self.sde_type)
        if not 0 < self.timestep_fraction <= 1:
            raise ConfigError(f"sampler.timestep_fraction must be in (0, 1], got {self.timestep_fraction}")
        if self.num_steps < 2:
            raise ConfigError("DanceGRPO needs sampler.num_steps >= 2 (the last step is never trained)")
        if self.final_step not in ("sde", "ode"):
            raise ConfigError(f"sampler.final_step='{self.final_step}' is not known; use sde or ode")
        step = StepSpec(kind=self.sde_type, noise_level=float(self.noise_level))
        steps = tuple(replace(step, trained=i < self.num_steps - 1) for i in range(self.num_steps))
        if self.final_step == "ode":  # the deterministic step to 0 gives the last step's x0 prediction
            steps = steps[:-1] + (StepSpec(kind="ode"),)
        self._plan = RolloutPlan("dancegrpo", float(self.guidance_scale), steps,
                                 sample_fraction=float(self.timestep_fraction))

    def plan(self, generator: torch.Generator | None = None) -> RolloutPlan:
        return self._plan

    @property
    def max_trained_steps(self) -> int:
        return max(1, int((self.num_steps - 1) * self.timestep_fraction))


@dataclass
class SharedNoisePlanner(PlannerBase):
    """D3PO: ``branch_factor`` trajectories from one initial noise (2: a pair), each drawing its own noise at every
    step after it; every step stochastic, steps ``0 .. int(T * timestep_fraction) - 1`` trained. One root per
    prompt (``algorithm.group_size=1``): its leaves are the images compared. DDIM (eta 1) as the reference."""

    num_steps: int = 20
    noise_level: float = 1.0
    sde_type: str = "ddim"
    guidance_scale: float = 5.0
    branch_factor: int = 2
    timestep_fraction: float = 1.0
    _plan: RolloutPlan | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        _check_common(self.num_steps, self.noise_level, self.sde_type)
        if self.branch_factor < 2:
            raise ConfigError(f"sampler.branch_factor must be >= 2 (images per initial noise), got {self.branch_factor}")
        if not 0 < self.timestep_fraction <= 1:
            raise ConfigError(f"sampler.timestep_fraction must be in (0, 1], got {self.timestep_fraction}")
        trained = max(1, int(self.num_steps * self.timestep_fraction))
        step = StepSpec(kind=self.sde_type, noise_level=float(self.noise_level))
        steps = tuple(replace(step, trained=i < trained, branch=self.branch_factor if i == 0 else 1)
                      for i in range(self.num_steps))
        self._plan = RolloutPlan("shared_noise", float(self.guidance_scale), steps)

    def plan(self, generator: torch.Generator | None = None) -> RolloutPlan:
        return self._plan

    @property
    def max_trained_steps(self) -> int:
        return len(self._plan.trained_steps)


@dataclass
class BranchPlanner(PlannerBase):
    """BranchGRPO: trajectories split into ``branch_factor`` children before each step in ``split_points``
    (shared prefixes computed once). Every stochastic edge is trained with its child node's advantage;
    ``prune_depths`` removes the gradient of edges at those depths (the rollout is unchanged);
    ``width_prune_ratio`` keeps only the best and worst edges after the last split. ``mix``: SDE only at the
    split points and the ``mix_window - 1`` steps after each, ODE elsewhere (BranchGRPO-Mix). Split noise
    uses the kernel's own std, which is also the density scored. Use ``algorithm.group_size=1``
    (one tree per prompt; its leaves are the group)."""

    num_steps: int = 20
    noise_level: float = 0.7
    split_points: tuple[int, ...] = (0, 3, 6, 9)
    branch_factor: int = 2
    prune_depths: tuple[int, ...] = ()
    width_prune_ratio: float = 0.0
    fusion: str = "mean"
    fusion_alpha: float = 1.0
    mix: bool = False
    mix_window: int = 1

    def __post_init__(self):
        _check_common(self.num_steps, self.noise_level, self.sde_type)
        pts = tuple(sorted(int(p) for p in self.split_points))
        if not pts or pts[0] < 0 or pts[-1] >= self.num_steps - 1 or len(set(pts)) != len(pts):
            raise ConfigError(f"sampler.split_points {list(self.split_points)} must be distinct steps in "
                              f"[0, {self.num_steps - 2}]")
        if self.branch_factor < 2:
            raise ConfigError(f"sampler.branch_factor must be >= 2, got {self.branch_factor}")
        if not 0 <= self.width_prune_ratio < 1:
            raise ConfigError(f"sampler.width_prune_ratio must be in [0, 1), got {self.width_prune_ratio}")
        self.split_points = pts
        steps = []
        for i in range(self.num_steps):
            depth = sum(1 for p in pts if p <= i)
            stochastic = not self.mix or any(p <= i < p + self.mix_window for p in pts)
            trained = stochastic and i < self.num_steps - 1 and depth not in set(self.prune_depths)
            kind = self.sde_type if stochastic else "ode"
            steps.append(StepSpec(kind=kind, noise_level=float(self.noise_level) if stochastic else 0.0,
                                  trained=trained, branch=self.branch_factor if i in pts else 1))
        if not any(s.trained for s in steps):
            raise ConfigError("sampler.prune_depths prunes every trained edge; keep at least one depth")
        self._plan = RolloutPlan("branchgrpo_mix" if self.mix else "branchgrpo", float(self.guidance_scale),
                                 tuple(steps), fusion=self.fusion, fusion_alpha=float(self.fusion_alpha),
                                 width_prune_ratio=float(self.width_prune_ratio))

    def plan(self, generator: torch.Generator | None = None) -> RolloutPlan:
        return self._plan

    @property
    def max_trained_steps(self) -> int:
        return len(self._plan.trained_steps)


@dataclass
class SideBranchPlanner(PlannerBase):
    """TempFlow-GRPO and G2RPO: an ODE trunk; at each step in ``branch_steps``, ``children`` copies of the
    trunk latent take one SDE step (trained) and finish by ODE. TempFlow: granularities (1,), the child's
    reward is the process reward of its step, advantages per (prompt, step), optional noise-aware loss
    weighting. G2RPO: granularities (1, 2) (coarser ODE continuations), advantage summed over granularities.
    Use ``algorithm.group_size=1``: a prompt's children are its groups."""

    num_steps: int = 10
    branch_steps: tuple[int, ...] = (0, 2, 4, 6)
    children: int = 6
    granularities: tuple[int, ...] = (1,)
    noise_aware_weight: bool = False
    method: str = "tempflow"

    def __post_init__(self):
        _check_common(self.num_steps, self.noise_level, self.sde_type)
        pts = tuple(sorted(int(p) for p in self.branch_steps))
        if not pts or pts[0] < 0 or pts[-1] >= self.num_steps - 1 or len(set(pts)) != len(pts):
            raise ConfigError(f"sampler.branch_steps {list(self.branch_steps)} must be distinct steps in "
                              f"[0, {self.num_steps - 2}]")
        if self.children < 2:
            raise ConfigError(f"sampler.children must be >= 2 (a group), got {self.children}")
        if not self.granularities or any(int(g) < 1 for g in self.granularities):
            raise ConfigError(f"sampler.granularities must be positive integers, got {list(self.granularities)}")
        self.branch_steps = pts
        branches = tuple(SideBranch(step=p, children=int(self.children), kind=self.sde_type,
                                    noise_level=float(self.noise_level),
                                    granularities=tuple(int(g) for g in self.granularities)) for p in pts)
        self._plan = RolloutPlan(self.method, float(self.guidance_scale), tuple(StepSpec() for _ in range(self.num_steps)),
                                 side_branches=branches, noise_aware_weight=bool(self.noise_aware_weight))

    def plan(self, generator: torch.Generator | None = None) -> RolloutPlan:
        return self._plan

    @property
    def max_trained_steps(self) -> int:
        return len(self.branch_steps)


@dataclass
class ODEPlanner(PlannerBase):
    """Deterministic Euler rollouts with no trained transitions: for losses on final images (AWM, NFT)."""

    def __post_init__(self):
        if self.num_steps < 1:
            raise ConfigError(f"sampler.num_steps must be >= 1, got {self.num_steps}")

    def plan(self, generator: torch.Generator | None = None) -> RolloutPlan:
        return ode_plan(self.num_steps, self.guidance_scale)

    @property
    def max_trained_steps(self) -> int:
        return 0
