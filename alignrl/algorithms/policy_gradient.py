"""The training step of the methods that learn from per-step log-probs (the GRPO family).

Each optimizer step takes the transitions of one chunk of roots (the chunks split the global batch the same
way on any number of ranks). Within a minibatch of roots the transitions are scored one schedule step at a
time, so a linear plan's step k of a minibatch is one forward pass, as sampled; ``trainer.steps_per_pass`` packs
that many consecutive steps of one kernel (0: all) into one pass with per-row timesteps (the same loss, fewer and
larger forwards, every packed step's activations held at once). The per-sample loss is the
algorithm's ``step_loss`` (given each row's root, so losses that couple the images of one root, D3PO's pairs,
can); transitions are weighted by the plan's loss weights and normalised by their sum
over all ranks. With sharded weights (``distributed=fsdp``) every process runs the same number of passes per
optimizer step: the ones with fewer pad with passes on their first transition whose loss is multiplied by zero.
"""

from __future__ import annotations

import math

import torch

from alignrl.algorithms.base import Advantages, RolloutBatch, StepContext, balanced_passes
from alignrl.backbones.base import Conditioning, PromptTable, set_training
from alignrl.sampling.engine import apply_step


def train_on_transitions(algo, batch: RolloutBatch, adv: Advantages, ctx: StepContext) -> dict:
    """Optimizer steps over this iteration's trained transitions; returns the logged summary."""
    set_training(ctx.denoiser, True)
    backbone = ctx.backbone
    schedule = backbone.make_schedule(batch.plan.base_steps)
    adv_t = torch.as_tensor(adv.transition, dtype=torch.float32, device=ctx.device)
    keep_all = torch.as_tensor(adv.transition_keep, dtype=torch.bool).tolist()
    weight = batch.t_weight
    # per-row schedule indices as Python ints: read row by row below (an element of a tensor costs an operation)
    t_from, t_to = batch.t_from.tolist(), batch.t_to.tolist()
    by_root: dict[int, list[int]] = {}
    for i, r in enumerate(batch.t_root.tolist()):
        by_root.setdefault(r, []).append(i)
    # the roots' prompts once (each pass gathers its rows); a training text encoder encodes per pass, as each
    # pass's backward needs a graph of its own
    table = backbone.prompt_table(batch.prompts, batch.plan.guidance_scale)
    dts: dict[tuple[int, int], torch.Tensor] = {}

    def step_dt(j, j_to) -> torch.Tensor:  # sigma_to - sigma_from, once per step of the schedule
        if not isinstance(j, int):  # a packed pass: per row
            return schedule.sigmas[j_to] - schedule.sigmas[j]
        if (j, j_to) not in dts:
            dts[j, j_to] = schedule.sigmas[j_to] - schedule.sigmas[j]
        return dts[j, j_to]

    keys = tuple(algo.diagnostics)
    sums = {k: [] for k in keys}  # per-pass values, summed once at the end
    stacked = []  # or, where a pass's values are equal-length rows, one (keys, rows) tensor per pass
    count = 0
    grad_norms = []
    ratio_dev_before_update = 0.0  # on-policy check: the first update's ratios must all be 1
    stepped = False  # whether an optimizer step has run (a skipped, empty update is not the first)
    for epoch in range(ctx.inner_epochs):
        for chunk, rows in update_sets(batch, ctx, by_root, keep_all, epoch, t_from):
            first_update = not stepped
            local_w = float(weight[rows].sum()) if rows else 0.0
            global_w = float(ctx.all_reduce_sum(torch.tensor([local_w], dtype=torch.float64,
                                                             device=ctx.device)).item())
            if global_w == 0:
                continue  # every rank agrees: nothing to learn from this chunk
            in_set = set(rows)
            kept_roots = [r for r in chunk if any(i in in_set for i in by_root.get(r, ()))]
            groups = []  # one forward/backward pass each: (rows, their steps)
            for m in range(0, len(kept_roots), ctx.train_batch_size):
                mb_roots = kept_roots[m:m + ctx.train_batch_size]
                mb_rows = [i for r in mb_roots for i in by_root[r] if i in in_set]
                groups.extend(pack_steps(batch, step_groups(batch, mb_rows, t_from, t_to), t_from, t_to,
                                         ctx.steps_per_pass, schedule.sigmas.device))
            padding = (torch.zeros(1, dtype=torch.long), (t_from[0], t_to[0]) if t_from else (0, 1))  # row 0
            passes = list(balanced_passes(groups, ctx, padding))
            rows_of = PassRows(batch, [(group, real) for (group, _), real in passes], adv_t, table, ctx.device)
            for p, ((group, (j, j_to)), real) in enumerate(passes):
                spec = batch.t_spec[int(group[0])]
                x, roots = rows_of.get("x", p), rows_of.get("root", p)
                cond = rows_of.cond(p) if table is not None else \
                    backbone.encode_prompts([batch.prompts[r] for r in roots.tolist()])
                with ctx.autocast():
                    v = backbone.predict(x, schedule.timesteps[j], cond, batch.plan.guidance_scale)
                next_x = rows_of.get("next_x", p)
                policy = apply_step(backbone, spec, schedule, j, x, v, next_x=next_x, i_to=j_to)
                reference = None
                if algo.needs_reference:
                    v_ref = ctx.predict_reference(x, schedule.timesteps[j], cond, batch.plan.guidance_scale)
                    with torch.no_grad():
                        reference = apply_step(backbone, spec, schedule, j, x, v_ref, next_x=next_x, i_to=j_to)
                # a padding pass's advantage is 0 (a dropped row's is NaN)
                adv_g = rows_of.get("adv", p) if real else torch.zeros(len(group), device=ctx.device)
                loss_vec, diag = algo.step_loss(
                    policy, rows_of.get("logp_old", p), adv_g, reference,
                    dt=step_dt(j, j_to), mean_old=rows_of.get("mean_old", p),
                    roots=roots,
                )
                if not real:  # a padding pass: the same collectives, no gradient
                    ctx.backward(loss_vec.sum() * 0.0)
                    continue
                ctx.backward((loss_vec * rows_of.get("weight", p)).sum() / global_w)
                if first_update and "ratio" in diag:
                    ratio_dev_before_update = max(ratio_dev_before_update, float((diag["ratio"] - 1).abs().max()))
                values = [diag[k] for k in keys]
                if keys and all(v.dim() == 1 and v.shape == values[0].shape for v in values):
                    with torch.no_grad():
                        stacked.append(torch.stack(values))  # one operation where a copy per key would make 2-3
                else:
                    for key, v in zip(keys, values):
                        sums[key].append(v.detach().reshape(-1))
                count += len(group)
            grad_norms.append(ctx.optimizer_step())
            stepped = True
    if stacked:
        for key, row in zip(keys, torch.cat(stacked, dim=1).unbind(0)):
            sums[key].append(row)
    totals = {k: float(torch.cat(v).double().sum()) if v else 0.0 for k, v in sums.items()}
    return ctx.summarise(totals, count, ratio_dev_before_update, grad_norms)


def update_sets(batch: RolloutBatch, ctx: StepContext, by_root: dict, keep: list[bool], epoch: int,
                t_from: list[int]) -> list[tuple[list[int], list[int]]]:
    """Each optimizer step's (roots in order, kept transition rows) on this rank, per ``ctx.update_by``.

    ``samples``: the roots of each of the loop's chunks, all their steps. ``step``: every root, one schedule step
    per update, in schedule order (a step with no transition on any rank is skipped by the caller, which every
    rank agrees on through the reduced weight). ``transitions``: this rank's kept transitions in (root, step)
    order, ``transitions_per_update`` per update; the number of updates is the largest over ranks, so every rank
    steps the optimizer alike."""
    chunks = [chunk.tolist() for chunk in ctx.update_chunks(batch.global_index, epoch)]
    if ctx.update_by == "samples":
        return [(roots, [i for r in roots for i in by_root.get(r, ()) if keep[i]]) for roots in chunks]
    roots = [r for chunk in chunks for r in chunk]
    rows = [i for r in roots for i in sorted(by_root.get(r, ()), key=lambda i: t_from[i]) if keep[i]]
    if ctx.update_by == "step":
        steps = int(batch.plan.base_steps)
        return [(roots, [i for i in rows if t_from[i] == j]) for j in range(steps)]
    if ctx.update_by != "transitions":
        raise ValueError(f"update_by '{ctx.update_by}' is not known")
    n = ctx.transitions_per_update
    local = -(-len(rows) // n)
    updates = int(ctx.all_reduce_sum(torch.zeros(ctx.world_size, device=ctx.device).index_fill_(
        0, torch.tensor([ctx.rank], device=ctx.device), float(local))).max().item())
    return [(roots, rows[u * n:(u + 1) * n]) for u in range(updates)]


def step_groups(batch: RolloutBatch, rows: list[int], t_from: list[int], t_to: list[int]) -> list[list[int]]:
    """``rows`` split by (start index, end index, kernel), in schedule order, each in ``rows``' order (``t_from``,
    ``t_to``: the batch's per-row schedule indices as lists)."""
    groups: dict[tuple, list[int]] = {}
    for i in rows:
        spec = batch.t_spec[i]
        key = (t_from[i], t_to[i], spec.kind, spec.noise_level)
        groups.setdefault(key, []).append(i)
    return [groups[k] for k in sorted(groups)]


def pack_steps(batch: RolloutBatch, groups: list[list[int]], t_from: list[int], t_to: list[int], steps_per_pass: int,
               device) -> list[tuple[torch.Tensor, tuple]]:
    """A minibatch's step groups (``step_groups``: one per start step, end step and kernel) as passes:
    ``(rows, (j, j_to))``. Consecutive groups of one kernel share a pass, ``steps_per_pass`` groups at most (0: all;
    with one end step per start step, as every shipped plan has, a group is a schedule step); a pass of one group has
    its schedule indices as ints (the kernels' per-step factors are then kept with the schedule), a packed pass as
    per-row (B,) tensors on ``device`` (the schedule's)."""
    runs: list[list[list[int]]] = []
    last = None
    for g in groups:
        spec = batch.t_spec[g[0]]
        kernel = (spec.kind, spec.noise_level)
        if runs and kernel == last and (steps_per_pass == 0 or len(runs[-1]) < steps_per_pass):
            runs[-1].append(g)
        else:
            runs.append([g])
        last = kernel
    out = []
    for run in runs:
        rows = [i for g in run for i in g]
        if len(run) == 1:
            steps = (t_from[rows[0]], t_to[rows[0]])
        else:
            steps = (torch.tensor([t_from[i] for i in rows], device=device),
                     torch.tensor([t_to[i] for i in rows], device=device))
        out.append((torch.tensor(rows, dtype=torch.long), steps))
    return out


# PassRows gathers an optimizer step's rows at once while they take at most this many bytes (the tiny and CPU-sized
# models: a gather per tensor per pass is a measurable part of their loop); larger ones are gathered per pass
WHOLE_GATHER_BYTES = 64 << 20


class PassRows:
    """What the passes of one optimizer step read: latents, next latents, old log-probs and means, advantages, loss
    weights, roots, and the roots' conditioning (from the prompts' ``PromptTable``). Small steps
    (``WHOLE_GATHER_BYTES``) gather each tensor once in pass order and give each pass a slice of it (a view); larger
    ones gather each pass's rows when it runs, so no step holds a second copy of its rows. The values are the same
    either way. The conditioning is gathered per pass, and kept while the next pass has the same roots."""

    def __init__(self, batch: RolloutBatch, passes: list[tuple[torch.Tensor, bool]], adv: torch.Tensor,
                 table: PromptTable | None, device):
        self.device = device
        self.groups = [group for group, _ in passes]
        self.table = table
        self._cond = None  # (roots, their conditioning) of the last pass
        self.sources = {"x": batch.x, "next_x": batch.next_x, "logp_old": batch.logp_old,
                        "mean_old": batch.mean_old, "adv": adv, "weight": batch.t_weight, "root": batch.t_root}
        per_row = sum(math.prod(t.shape[1:]) * t.element_size() for t in self.sources.values())
        self.bounds = [0]
        for g in self.groups:
            self.bounds.append(self.bounds[-1] + len(g))
        self.whole = self.bounds[-1] * per_row <= WHOLE_GATHER_BYTES
        if not self.whole:
            return
        order = torch.cat(self.groups) if len(self.groups) > 1 else self.groups[0]
        self.rows = {k: self._gather(v, order) for k, v in self.sources.items()}
        self.root_list = batch.t_root.index_select(0, order).tolist()

    def _gather(self, source: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return source.index_select(0, rows.to(source.device)).to(self.device)

    def get(self, name: str, p: int) -> torch.Tensor:
        """Pass ``p``'s rows of ``name`` (x, next_x, logp_old, mean_old, adv, weight or root)."""
        if self.whole:
            return self.rows[name][self.bounds[p]:self.bounds[p + 1]]
        return self._gather(self.sources[name], self.groups[p])

    def cond(self, p: int) -> Conditioning:
        """Pass ``p``'s conditioning (with its negative rows under CFG). Consecutive passes over the same roots (a
        minibatch's schedule steps) share one gathered conditioning."""
        roots = tuple(self.root_list[self.bounds[p]:self.bounds[p + 1]] if self.whole else
                      self.sources["root"].index_select(0, self.groups[p]).tolist())
        if self._cond is None or self._cond[0] != roots:
            self._cond = (roots, self.table.conditioning(roots))
        return self._cond[1]
