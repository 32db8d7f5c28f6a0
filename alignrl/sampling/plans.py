"""Rollout plans: data that says how a rollout runs, executed by the one rollout engine.

A :class:`RolloutPlan` lists, for every step of a T-step schedule, the kernel (``ode`` or a
stochastic kernel such as ``sde``/``cps``), its noise level, whether the transition is trained, how
many children each live trajectory splits into before the step (trees), and the step's loss
weight. Windows, mixed ODE-SDE schedules and branching trees are new plans, not new loops.

A *planner* (built from the ``sampler`` config group) makes the plan for each rollout batch; it may
draw from a generator that is seeded identically on every rank, and it carries any state that must
survive a resume (``state_dict``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from alignrl.errors import ConfigError
from alignrl.sampling.kernels import KERNELS


@dataclass(frozen=True)
class StepSpec:
    kind: str = "ode"  # "ode" or a name in KERNELS
    noise_level: float = 0.0
    trained: bool = False
    branch: int = 1  # each live trajectory splits into this many before this step
    loss_weight: float = 1.0

    def __post_init__(self):
        if self.kind != "ode" and self.kind not in KERNELS:
            raise ConfigError(f"unknown step kernel '{self.kind}'; use one of ode, {', '.join(KERNELS)}")
        if self.trained and self.kind == "ode":
            raise ConfigError("an ODE step has no log-prob and cannot be a trained step of a policy-gradient plan")
        if self.branch < 1:
            raise ConfigError(f"branch factor must be >= 1, got {self.branch}")


@dataclass(frozen=True)
class RolloutPlan:
    name: str
    guidance_scale: float
    steps: tuple[StepSpec, ...]

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def trained_steps(self) -> list[int]:
        return [i for i, s in enumerate(self.steps) if s.trained]

    @property
    def leaves_per_root(self) -> int:
        return math.prod(s.branch for s in self.steps)

    @property
    def is_linear(self) -> bool:
        return self.leaves_per_root == 1

    def model_evals(self, num_roots: int, evals_per_predict: int = 1) -> int:
        """Denoiser forward passes for ``num_roots`` trajectories (x2 per predict with batched CFG)."""
        live, total = num_roots, 0
        for s in self.steps:
            live *= s.branch
            total += live
        return total * evals_per_predict


def ode_plan(num_steps: int, guidance_scale: float) -> RolloutPlan:
    return RolloutPlan("ode", float(guidance_scale), tuple(StepSpec() for _ in range(num_steps)))


@dataclass
class FlowGRPOPlanner:
    """Flow-GRPO: every step stochastic; steps ``0 .. int(T * timestep_fraction) - 1`` are trained.

    With ``timestep_fraction`` 0.99 and T = 10 that is steps 0..8: the last step is never trained.
    """

    num_steps: int = 10
    noise_level: float = 0.7
    sde_type: str = "sde"
    guidance_scale: float = 4.5
    timestep_fraction: float = 0.99
    eval_num_steps: int = 40
    eval_guidance_scale: float | None = None  # defaults to guidance_scale
    _plan: RolloutPlan | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.num_steps < 1:
            raise ConfigError(f"sampler.num_steps must be >= 1, got {self.num_steps}")
        if not 0 < self.timestep_fraction <= 1:
            raise ConfigError(f"sampler.timestep_fraction must be in (0, 1], got {self.timestep_fraction}")
        if self.noise_level <= 0:
            raise ConfigError(f"sampler.noise_level must be > 0 for trained SDE steps (a zero-noise step has no "
                              f"log-prob), got {self.noise_level}")
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

    def eval_plan(self) -> RolloutPlan:
        scale = self.guidance_scale if self.eval_guidance_scale is None else self.eval_guidance_scale
        return ode_plan(self.eval_num_steps, scale)

    @property
    def max_trained_steps(self) -> int:
        return len(self._plan.trained_steps)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None
