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

With ``strata`` (a label per prompt, e.g. its GenEval ``tag``: ``data.balance: tag``) the groups are spread
over the labels instead of over the prompts: each iteration deals its groups to the labels in a freshly
shuffled order (so over iterations every label gets the same share, whatever its number of prompts) and draws
distinct prompts within each label. A prompt set with 360 position prompts and 3 single-object ones then
trains every tag as often as an eval that weighs tags alike scores it.
"""

from __future__ import annotations

import math

from dataclasses import dataclass

import torch

from alignrl.errors import ConfigError


def group_by_label(strata: tuple, n: int, what: str) -> tuple[list, list[list[int]]]:
    """The labels of ``strata`` (one per item, ``n`` items), sorted by their text, and each label's item indices."""
    if len(strata) != n:
        raise ValueError(f"strata has {len(strata)} labels for {n} {what}")
    by_label: dict = {}
    for i, label in enumerate(strata):
        by_label.setdefault(label, []).append(i)
    labels = sorted(by_label, key=str)
    return labels, [by_label[k] for k in labels]


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
    strata: tuple | None = None  # a label per prompt: groups are spread over the labels (data.balance)

    def __post_init__(self):
        if self.groups_per_iteration > self.num_prompts:
            raise ConfigError(
                f"data.groups_per_iteration={self.groups_per_iteration} exceeds the {self.num_prompts} prompts "
                f"of the training set; lower it or use a larger prompt set"
            )
        self._members: list[list[int]] = []
        if self.strata is not None:
            labels, self._members = group_by_label(self.strata, self.num_prompts, "prompts")
            per_label = -(-self.groups_per_iteration // len(labels))
            small = {str(k): len(m) for k, m in zip(labels, self._members) if len(m) < per_label}
            if small:
                raise ConfigError(
                    f"data.balance: data.groups_per_iteration={self.groups_per_iteration} over "
                    f"{len(self._members)} labels needs {per_label} distinct prompts per label in one iteration, "
                    f"but {', '.join(f'{k} has {n}' for k, n in small.items())}; lower groups_per_iteration or "
                    f"set data.balance: null"
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
        if self._members:
            labels = torch.randperm(len(self._members), generator=g).tolist()
            dealt = [labels[k % len(labels)] for k in range(self.groups_per_iteration)]
            # each label's prompts in a random order, taken in turn: distinct prompts within a label
            picks = {lab: iter(torch.randperm(len(self._members[lab]), generator=g).tolist())
                     for lab in sorted(set(dealt))}
            chosen = torch.tensor([self._members[lab][next(picks[lab])] for lab in dealt], dtype=torch.long)
        else:
            chosen = torch.randperm(self.num_prompts, generator=g)[: self.groups_per_iteration]
        repeated = chosen.repeat_interleave(self.group_size)
        order = torch.randperm(repeated.numel(), generator=g)
        return [Slot(i, int(pid)) for i, pid in enumerate(repeated[order].tolist())]

    def rank_slots(self, iteration: int) -> list[Slot]:
        n = self.samples_per_rank
        return self.global_assignment(iteration)[self.rank * n:(self.rank + 1) * n]

    def state_dict(self) -> dict:
        return {"num_prompts": self.num_prompts, "groups_per_iteration": self.groups_per_iteration,
                "group_size": self.group_size, "seed": self.seed,
                "balanced_labels": len(self._members)}

    def load_state_dict(self, state: dict) -> None:
        _check_unchanged(self.state_dict(), state, "prompt sampler", "settings")


def _check_unchanged(mine: dict, saved: dict, what: str, original: str) -> None:
    """A checkpoint's sampler settings must be this config's (the rows of an iteration depend on them)."""
    changed = {k: (saved[k], mine[k]) for k in mine if k in saved and saved[k] != mine[k]}
    if changed:
        detail = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
        raise ConfigError(f"the checkpoint's {what} differs from this config ({detail}); resume with the original "
                          f"{original}")


def balance_strata(prompts, key) -> tuple | None:
    """The labels ``data.balance: <key>`` spreads the groups over: each training prompt's metadata ``key``
    (``tag`` for GenEval-style sets); None when ``key`` is null."""
    if key is None:
        return None
    if not isinstance(key, str) or not key:
        raise ConfigError(f"data.balance={key!r}: give a metadata key of the training prompts (e.g. tag) or null")
    missing = [p for p, m in zip(prompts.prompts, prompts.metadata) if m.get(key) is None]
    if missing:
        raise ConfigError(f"data.balance: {key}: {len(missing)} of {len(prompts)} training prompts have no "
                          f"'{key}' (first: {missing[0]!r}); add it to their metadata or set data.balance: null")
    return tuple(m[key] for m in prompts.metadata)


@dataclass
class DatasetSampler:
    """Rows of an offline dataset for each iteration: epochs of a shuffled order, read in turn.

    Epoch e's order is a permutation drawn from (seed, e); the rows are a stream of these epochs and iteration
    ``it`` takes the ``rows_per_iteration`` rows after the previous iteration's, rank r a contiguous slice.
    The rows of an iteration are a pure function of (seed, iteration): a run resumed mid-epoch reads the same
    rows as one that never stopped, and a row's global index (its position in the iteration) keys its noise
    whatever the number of processes.

    With ``strata`` (a label per row: ``data.offline.balance``) every label gets the same share of each
    iteration, whatever its number of rows: ``rows_per_iteration // L`` rows each, the remainder dealt to the
    labels in turn over iterations (label l's count after ``it`` iterations is a closed form, so resuming needs
    no state). Each label reads its own stream of shuffled epochs of its rows (a small label repeats sooner, a
    label with fewer rows than its share repeats rows within an iteration); the iteration's rows are then
    shuffled together.

    ``power`` p (``data.offline.balance_power``) sets the shares between these and the rows' own proportions:
    label l gets a share proportional to n_l^p of its n_l rows (0: equal shares, as above; 1: proportional, the
    unbalanced mix; 0.5 the square root, which caps how often a small label's rows repeat). With p > 0, label l
    has read floor(it x R x share_l) rows after ``it`` iterations of R rows and the largest label takes the rest.
    """

    num_rows: int
    rows_per_iteration: int
    world_size: int = 1
    rank: int = 0
    seed: int = 0
    strata: tuple | None = None
    power: float = 0.0

    def __post_init__(self):
        if self.num_rows < 1:
            raise ConfigError("the offline dataset has no rows")
        if self.rows_per_iteration < 1:
            raise ConfigError(f"rows per iteration must be >= 1, got {self.rows_per_iteration}")
        if self.rows_per_iteration % self.world_size:
            raise ConfigError(f"{self.rows_per_iteration} dataset rows per iteration do not split over "
                              f"{self.world_size} processes; make data.offline.rows_per_iteration a multiple of it")
        self._labels, self._members = [], []
        if self.strata is not None:
            self._labels, self._members = group_by_label(self.strata, self.num_rows, "rows")
            if len(self._members) > self.rows_per_iteration:
                raise ConfigError(f"data.offline.balance: {len(self._members)} labels do not fit in "
                                  f"{self.rows_per_iteration} rows per iteration; raise data.offline.rows_per_iteration "
                                  f"to at least {len(self._members)} or set data.offline.balance: null")
        if isinstance(self.power, bool) or not isinstance(self.power, (int, float)) or not 0 <= self.power <= 1:
            raise ConfigError(f"data.offline.balance_power={self.power!r}: give a number in [0, 1] (0: every label "
                              f"the same share, 1: shares as the rows' own proportions)")
        if self.power and self.strata is None:
            raise ConfigError(f"data.offline.balance_power={self.power} needs data.offline.balance (the row field whose "
                              f"labels it shares rows over); set both, or balance_power: 0")
        self._shares: list[float] = []
        if self._members and self.power:
            sizes = [len(m) ** float(self.power) for m in self._members]
            self._shares = [x / sum(sizes) for x in sizes]
            self._largest = max(range(len(sizes)), key=lambda i: (sizes[i], -i))
            room = self.rows_per_iteration - sum(math.ceil(self.rows_per_iteration * w)
                                                 for i, w in enumerate(self._shares) if i != self._largest)
            if room < 0:
                raise ConfigError(f"data.offline.balance_power={self.power}: {len(self._members)} labels' shares do "
                                  f"not fit in {self.rows_per_iteration} rows per iteration; raise "
                                  f"data.offline.rows_per_iteration or lower the power")

    @property
    def samples_per_iteration(self) -> int:
        return self.rows_per_iteration

    def describe_shares(self) -> str:
        """Each label's share of an iteration's rows and its row count, for the run's log (balanced mode)."""
        shares = self._shares or [1 / len(self._labels)] * len(self._labels)
        return (f"rows balanced (balance_power {float(self.power):g}): "
                + ", ".join(f"{label} {100 * w:.1f}% of {len(m)}"
                            for label, w, m in zip(self._labels, shares, self._members)))

    def label_count(self, label: int, iteration: int) -> int:
        """Rows label ``label`` has read in iterations 0 .. ``iteration`` - 1 (balanced mode): the even share,
        plus the remainder slots dealt in turn (slot k of the stream 0, 1, 2, ... goes to label k mod L). With
        ``power`` > 0: floor(iteration x R x share), the largest label the rest."""
        if self._shares:
            if label != self._largest:
                return math.floor(iteration * self.rows_per_iteration * self._shares[label] + 1e-9)
            return iteration * self.rows_per_iteration - sum(self.label_count(other, iteration)
                                                             for other in range(len(self._shares)) if other != label)
        n = len(self._members)
        extra = iteration * (self.rows_per_iteration % n)
        return iteration * (self.rows_per_iteration // n) + extra // n + (1 if label < extra % n else 0)

    def _stream(self, members, salt: int, start: int, stop: int) -> list[int]:
        """Positions ``start`` .. ``stop`` - 1 of the stream of shuffled epochs of ``members``, epoch e's order drawn
        from (seed, e, salt)."""
        out, epoch, offset = [], start // len(members), start % len(members)
        while len(out) < stop - start:
            g = torch.Generator().manual_seed(int(self.seed) * 6_151 + int(epoch) * 49_157 + salt)
            order = torch.randperm(len(members), generator=g).tolist()
            out.extend(members[i] for i in order[offset:offset + stop - start - len(out)])
            epoch, offset = epoch + 1, 0
        return out

    def global_rows(self, iteration: int) -> list[int]:
        """The row ids of iteration ``iteration`` (all ranks), in order."""
        if not self._members:  # one stream over all rows
            start = iteration * self.rows_per_iteration
            return self._stream(range(self.num_rows), 29, start, start + self.rows_per_iteration)
        rows = []
        for label, members in enumerate(self._members):  # a stream per label, then shuffled together
            rows.extend(self._stream(members, 1_009 * (label + 1) + 31, self.label_count(label, iteration),
                                     self.label_count(label, iteration + 1)))
        g = torch.Generator().manual_seed(int(self.seed) * 7_927 + int(iteration) * 104_723 + 3)
        return [rows[i] for i in torch.randperm(len(rows), generator=g).tolist()]

    def rank_rows(self, iteration: int) -> list[Slot]:
        """This rank's rows as slots (global index within the iteration, row id)."""
        n = self.rows_per_iteration // self.world_size
        rows = self.global_rows(iteration)
        return [Slot(i, rows[i]) for i in range(self.rank * n, (self.rank + 1) * n)]

    def epoch(self, iteration: int) -> float:
        """Epochs completed by the end of ``iteration`` (for logging)."""
        return (iteration + 1) * self.rows_per_iteration / self.num_rows

    def state_dict(self) -> dict:
        # balanced_labels 0: unbalanced (checkpoints written before balancing existed lack it: not compared)
        return {"num_rows": self.num_rows, "rows_per_iteration": self.rows_per_iteration, "seed": self.seed,
                "balanced_labels": len(self._members), "balance_power": float(self.power)}

    def load_state_dict(self, state: dict) -> None:
        _check_unchanged(self.state_dict(), state, "dataset sampler", "dataset and settings")
