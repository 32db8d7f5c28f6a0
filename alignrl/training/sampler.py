"""The distributed K-repeat prompt sampler.

Iteration ``it`` draws ``groups_per_iteration`` distinct prompts with a generator seeded by (seed, it)
that every rank builds identically, repeats each ``group_size`` times, shuffles the whole list with
the same generator, and gives rank r the r-th contiguous slice. So:

- every group is complete (exactly K samples, no drift), groups spread over ranks;
- no prompt appears in two groups of one iteration;
- the assignment is a pure function of (seed, iteration): resuming needs no sampler state and
  cannot lag behind (the failure of prefetching samplers with ``set_epoch``);
- a sample's *global index* (its position in the shuffled list) does not depend on the world size,
  and keys its noise generator, so N processes sample what one process would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignrl.errors import ConfigError


@dataclass(frozen=True)
class Slot:
    global_index: int  # position in the iteration's shuffled list, 0 .. groups*K - 1
    prompt_id: int  # index into the prompt set; the group key


@dataclass
class KRepeatPromptSampler:
    num_prompts: int
    groups_per_iteration: int
    group_size: int
    world_size: int = 1
    rank: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.groups_per_iteration > self.num_prompts:
            raise ConfigError(
                f"data.groups_per_iteration={self.groups_per_iteration} exceeds the {self.num_prompts} prompts "
                f"of the training set; lower it or use a larger prompt set"
            )
        if self.samples_per_iteration % self.world_size:
            raise ConfigError(
                f"groups_per_iteration x group_size = {self.samples_per_iteration} samples do not split over "
                f"{self.world_size} processes; make it a multiple of the world size"
            )

    @property
    def samples_per_iteration(self) -> int:
        return self.groups_per_iteration * self.group_size

    @property
    def samples_per_rank(self) -> int:
        return self.samples_per_iteration // self.world_size

    def global_assignment(self, iteration: int) -> list[Slot]:
        g = torch.Generator().manual_seed(int(self.seed) * 7_919 + int(iteration) * 104_729 + 17)
        chosen = torch.randperm(self.num_prompts, generator=g)[: self.groups_per_iteration]
        repeated = chosen.repeat_interleave(self.group_size)
        order = torch.randperm(repeated.numel(), generator=g)
        return [Slot(i, int(pid)) for i, pid in enumerate(repeated[order].tolist())]

    def rank_slots(self, iteration: int) -> list[Slot]:
        n = self.samples_per_rank
        return self.global_assignment(iteration)[self.rank * n:(self.rank + 1) * n]

    def state_dict(self) -> dict:
        return {"num_prompts": self.num_prompts, "groups_per_iteration": self.groups_per_iteration,
                "group_size": self.group_size, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        changed = {k: (state[k], mine[k]) for k in mine if k in state and state[k] != mine[k]}
        if changed:
            detail = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
            raise ConfigError(f"the checkpoint's prompt sampler differs from this config ({detail}); "
                              f"resume with the original settings")
