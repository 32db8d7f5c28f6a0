"""The algorithm protocol: what a method needs from the loop, and its training step.

The loop (``alignrl/training/trainer.py``) collects what the algorithm asks for (``batch_kind``), scores it,
asks ``advantages`` for the group statistics and hands the batch to ``train_step`` with a ``StepContext``: the
services of the loop (the backbone, autocast, backward, the optimizer step, the distributed reductions, the
reference and old-policy weights). The algorithm owns everything in between, so it can be tested with a
hand-made batch and context, without a Trainer.

Batch kinds:

- ``transitions``: rollouts with each trained step's latents and log-probs (the GRPO family);
- ``final_latents``: the final latents of each image and their rewards (AWM, DiffusionNFT);
- ``pairs``, ``lists``, ``labels``, ``captions``: rows of an offline image dataset (``data.offline``,
  ``alignrl/imagedata.py``) as latents, in an ``OfflineBatch`` (the preference family, SFT);
- ``prompts``: the iteration's prompt slots only, in a ``PromptBatch``: the method samples them itself, with the
  graph kept (the reward-gradient family); the loop lends a differentiable ``score``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, ContextManager, Iterator, Protocol, runtime_checkable

import numpy as np
import torch

from alignrl.algorithms.advantages import AdvantageResult, GroupStatTracker
from alignrl.errors import ConfigError

ROLLOUT_KINDS = ("transitions", "final_latents")
OFFLINE_KINDS = ("pairs", "lists", "labels", "captions")
PROMPT_KINDS = ("prompts",)
BATCH_KINDS = ROLLOUT_KINDS + OFFLINE_KINDS + PROMPT_KINDS


@dataclass
class RolloutBatch:
    """One rank's rollouts of one iteration, ready for the update.

    Roots are the sampled trajectories (one per prompt slot); leaves are the images that get rewards (one per
    root for linear plans, several for trees and side branches); transitions are the trained steps, flat
    over roots, steps and tree nodes, each pointing at its root and at the leaves of its child node.
    """

    prompts: list[str]  # per root
    prompt_ids: np.ndarray  # per root
    global_index: np.ndarray  # per root
    plan: object
    leaf_root: torch.Tensor  # (L,) local root of each leaf
    leaves_per_root: int
    leaf_x0: torch.Tensor | None  # (L, ...) final latents (kept for batch_kind final_latents)
    leaf_path_logp: torch.Tensor | None
    leaf_tag: torch.Tensor | None
    x: torch.Tensor  # (N, ...) latents before each trained transition
    next_x: torch.Tensor  # (N, ...)
    logp_old: torch.Tensor  # (N,)
    mean_old: torch.Tensor  # (N, ...)
    t_from: torch.Tensor  # (N,) schedule index the transition starts at
    t_to: torch.Tensor  # (N,)
    t_spec: list  # (N,) StepSpec of each transition
    t_root: torch.Tensor  # (N,) local root
    t_leaf_lo: torch.Tensor  # (N,) first local leaf of the child node
    t_leaf_count: torch.Tensor  # (N,)
    t_key: torch.Tensor  # (N,) node key (tree depth / side-branch index)
    t_weight: torch.Tensor  # (N,) loss weight
    rewards: np.ndarray = field(default=None)  # per leaf
    per_reward: dict = field(default_factory=dict)
    reward_info: dict = field(default_factory=dict)
    preview: torch.Tensor | None = None  # decoded images of the first rollout batch (for grids)

    @property
    def leaf_prompts(self) -> list[str]:
        return [self.prompts[int(r)] for r in self.leaf_root]

    def leaf_ids(self, leaves: np.ndarray) -> np.ndarray:
        """Global ids of local leaves (the same on any number of ranks): root's global index x leaves per root
        + the leaf's position under its root."""
        leaves = np.asarray(leaves)
        return self.global_index[self.leaf_root.numpy()[leaves]] * self.leaves_per_root + \
            (leaves % self.leaves_per_root)


@dataclass
class OfflineBatch:
    """One rank's rows of an offline dataset for one iteration, encoded to latents."""

    kind: str  # pairs | lists | labels | captions
    prompts: list[str]  # per row
    latents: torch.Tensor  # (R, k, *latent_shape): pairs k = 2 (winner first), lists k images, else k = 1
    global_index: np.ndarray  # (R,) position in the iteration's rows (the same on any number of ranks)
    row_ids: np.ndarray  # (R,) rows of the dataset
    scores: torch.Tensor | None = None  # (R, k): lists' label scores; pairs' reward scores when the data has them
    labels: torch.Tensor | None = None  # (R,): labels' 1 desirable / 0 undesirable
    extra: dict = field(default_factory=dict)  # per-row tensors a method adds (DRO's sampled negatives)

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class PromptBatch:
    """One rank's prompt slots of one iteration (``batch_kind: prompts``): the method samples them itself."""

    prompts: list[str]
    metadata: list[dict]
    prompt_ids: np.ndarray
    global_index: np.ndarray  # (R,) the slot's position in the iteration (the same on any number of ranks)

    def __len__(self) -> int:
        return len(self.prompts)

    def initial_noise(self, ctx, rows: torch.Tensor) -> torch.Tensor:
        """The initial latents of ``rows``, keyed by (seed, iteration, slot) as the rollouts' are."""
        from alignrl.sampling.engine import sample_generators

        idx = [int(self.global_index[int(r)]) for r in rows]
        return ctx.backbone.initial_noise(sample_generators(ctx.seed, ctx.iteration, idx, ctx.device))

    def extra_noise(self, ctx, rows: torch.Tensor, n: int, shape: tuple) -> torch.Tensor:
        """(len(rows), n, *shape) further standard-normal draws per slot (DRaFT-LV's re-noisings)."""
        from alignrl.sampling.engine import sample_generators

        idx = [int(self.global_index[int(r)]) for r in rows]
        gens = sample_generators(ctx.seed * 29 + 13, ctx.iteration, idx)
        return torch.stack([torch.randn((n, *shape), generator=g) for g in gens]).to(ctx.device)


@dataclass
class Advantages:
    """This rank's advantages: per leaf (linear plans; None for trees) and per trained transition."""

    leaf: np.ndarray | None
    leaf_keep: np.ndarray | None
    transition: np.ndarray
    transition_keep: np.ndarray
    stats: dict


# normalise(values, keys, ids, per_reward) -> this rank's rows of the group-normalised result over all ranks
Normaliser = Callable[[np.ndarray, np.ndarray, np.ndarray, "dict | None"], AdvantageResult]


@dataclass
class StepContext:
    """What the loop lends an algorithm's ``train_step``.

    Losses are summed into gradients with ``backward`` (already divided by the global normaliser the
    algorithm computes with ``all_reduce_sum``); ``optimizer_step`` reduces gradients over ranks, clips,
    steps the optimizer and schedule and the EMA, and returns the gradient norm; ``summarise`` averages the
    diagnostics over ranks for logging.
    """

    backbone: Any
    denoiser: torch.nn.Module  # the trained network (a transformer or a UNet)
    device: torch.device
    seed: int
    iteration: int
    train_batch_size: int
    updates_per_iteration: int
    inner_epochs: int
    autocast: Callable[[], ContextManager]
    backward: Callable[[torch.Tensor], None]
    optimizer_step: Callable[[], float]
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]
    update_chunks: Callable[[np.ndarray, int], list]  # (global_index, epoch) -> this rank's samples per step
    predict_reference: Callable[..., torch.Tensor]  # like backbone.predict, with the frozen reference, no grad
    old_policy_weights: Callable[[], ContextManager]  # the weights that drew the rollouts (EMA for NFT)
    summarise: Callable[[dict, int, float, list], dict]
    rank: int = 0
    world_size: int = 1
    # (images, prompts, metadata) -> (B,) weighted reward with its graph (batch_kind prompts); None otherwise
    score: Callable[[torch.Tensor, list, list], torch.Tensor] | None = None
    # (images, prompts, metadata) -> (B,) weighted reward as numbers, no graph (batch_kind prompts: SPO's ranking)
    reward: Callable[[torch.Tensor, list, list], np.ndarray] | None = None
    mixed_precision: str = "no"  # no | bf16 | fp16 (fp16 scales the loss inside ``backward``)
    update_by: str = "samples"  # samples | step | transitions (trainer.update_by; the transition-trained methods)
    transitions_per_update: int = 12  # update_by transitions: this process's transitions per optimizer step
    # schedule steps of a minibatch in one training forward (trainer.steps_per_pass, 0: all; 1 where the method's
    # per-step transitions do not train independently)
    steps_per_pass: int = 1
    # distributed=fsdp: n -> the largest n over processes; a sharded step pads its forward/backward passes to it
    # (every pass gathers weights: every process must run as many). The identity when nothing is sharded.
    balance: Callable[[int], int] = lambda n: n


def balanced_passes(passes: list, ctx: StepContext, filler) -> Iterator[tuple[Any, bool]]:
    """``(pass, True)`` for each of ``passes``, then ``(filler, False)`` until this process has run as many passes as
    the process with the most (``ctx.balance``: none are added when nothing is sharded). With sharded weights every
    pass gathers them, so every process must run as many; a padding pass reaches the same collectives (its forward
    and backward) and its caller multiplies its loss by zero."""
    for i in range(ctx.balance(len(passes))):
        yield (passes[i], True) if i < len(passes) else (filler, False)


class Stateless:
    """Protocol members shared by methods with no checkpointed state: live rollout weights, their diagnostics
    (``_diag_keys``), empty state."""

    _diag_keys: ClassVar[tuple] = ("policy_loss",)

    @property
    def rollout_weights(self) -> str:
        return "live"

    @property
    def diagnostics(self) -> tuple[str, ...]:
        return self._diag_keys

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None


@runtime_checkable
class Algorithm(Protocol):
    """An alignment method as the loop sees it (``alignrl/algorithms/*.py`` implement it)."""

    name: str
    group_size: int  # K images per prompt (the prompt sampler deals groups of this size)
    lr: float  # read by the optimizer

    @property
    def batch_kind(self) -> str: ...  # one of BATCH_KINDS: what the loop must collect

    @property
    def needs_reference(self) -> bool: ...  # a frozen reference model enters the loss

    @property
    def rollout_weights(self) -> str: ...  # "live" or "ema": whose weights draw the rollouts

    @property
    def diagnostics(self) -> tuple[str, ...]: ...  # per-sample values train_step averages for logging

    def advantages(self, rewards: np.ndarray, keys: np.ndarray, per_reward: dict | None = None,
                   weights: dict | None = None) -> AdvantageResult: ...

    def train_step(self, batch: RolloutBatch | OfflineBatch, adv: Advantages | None, ctx: StepContext) -> dict: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class GroupRelative:
    """Shared by the methods that normalise rewards within each prompt's group (GRPO family, AWM, NFT):
    the hyperparameters every one of them has, validation, and the per-prompt statistics tracker."""

    name: str = ""
    group_size: int = 8  # K images per prompt (read by the prompt sampler)
    lr: float = 3e-4  # learning rate (read by the optimizer; lives here because methods differ)
    beta: float = 0.0  # weight of the KL / reference term (0: no reference model)
    adv_clip_max: float = 5.0
    global_std: bool = False
    std_eps: float = 1e-4
    std_ddof: int = 0  # 0: population std (Flow-GRPO's numpy); 1: unbiased (DanceGRPO's torch.std)
    stat_buffer_size: int = 0
    stat_min_count: int = 0

    batch_kind = "transitions"

    def __post_init__(self):
        if self.lr <= 0:
            raise ConfigError(f"algorithm.lr must be > 0, got {self.lr}")
        if self.beta < 0:
            raise ConfigError(f"algorithm.beta must be >= 0, got {self.beta}")
        if self.std_ddof not in (0, 1):
            raise ConfigError(f"algorithm.std_ddof must be 0 (population std) or 1 (unbiased), got {self.std_ddof}")
        self.tracker = GroupStatTracker(global_std=self.global_std, std_eps=self.std_eps,
                                        adv_clip_max=self.adv_clip_max, buffer_size=self.stat_buffer_size,
                                        min_count=self.stat_min_count, std_ddof=self.std_ddof)

    @property
    def needs_reference(self) -> bool:
        return self.beta > 0

    @property
    def rollout_weights(self) -> str:
        return "live"

    def advantages(self, rewards: np.ndarray, keys: np.ndarray, per_reward: dict | None = None,
                   weights: dict | None = None) -> AdvantageResult:
        return self.tracker.compute(rewards, keys)

    def state_dict(self) -> dict:
        return {"tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.tracker.load_state_dict(state.get("tracker", {}))
