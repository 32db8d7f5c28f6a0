"""Rollouts of one iteration: this rank's prompt slots sampled under the planner's plans, decoded, scored (the
reward of one batch runs while the next samples) and flattened into a ``RolloutBatch`` of roots, leaves and
trained transitions."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import numpy as np
import torch

from alignrl.algorithms.base import RolloutBatch
from alignrl.backbones.base import ENCODE_BATCH, set_training
from alignrl.data import PromptSet
from alignrl.errors import ConfigError
from alignrl.sampling.engine import rollout, sample_generators


ENCODE_LOOKAHEAD = 4  # iterations ``encode_ahead`` looks ahead to fill an encoder batch


class StopRequested(Exception):
    """A stop was requested mid-iteration; the iteration is abandoned before its update."""


def iteration_generator(seed: int, iteration: int, *salt: int) -> torch.Generator:
    """A generator every rank builds alike for (seed, iteration, salt): plans and update chunks agree across ranks."""
    return torch.Generator().manual_seed(hash((seed, iteration) + salt) & 0x7FFF_FFFF)


@dataclass
class RolloutCollector:
    backbone: Any
    denoiser: torch.nn.Module
    planner: Any
    prompts: PromptSet
    sampler: Any  # KRepeatPromptSampler
    reward_runner: Any
    seed: int
    device: torch.device
    rollout_batch_size: int
    keep_final_latents: bool  # batch_kind final_latents: keep each leaf's final latent
    autocast: Callable[[], ContextManager]
    rollout_weights: Callable[[], ContextManager]  # the weights that sample (the EMA for NFT)
    stop_requested: Callable[[], bool]  # collective: the same answer on every rank
    sync: Callable[[], None]

    @torch.no_grad()
    def collect(self, iteration: int) -> tuple[RolloutBatch, float]:
        """(the batch, seconds spent waiting for the rewards after the last sampling batch)."""
        slots = self.sampler.rank_slots(iteration)
        bs = self.rollout_batch_size
        plan_gen = iteration_generator(self.seed, iteration, 1)  # same on every rank: plans agree across ranks
        self.planner.begin_iteration(iteration, plan_gen)
        set_training(self.denoiser, False)
        parts, futures = [], []
        plan0 = table = None
        keep_x0 = self.keep_final_latents
        for start in range(0, len(slots), bs):
            chunk = slots[start:start + bs]
            prompts = [self.prompts.prompts[s.prompt_id] for s in chunk]
            meta = [self.prompts.metadata[s.prompt_id] for s in chunk]
            plan = self.planner.plan(plan_gen)
            if plan0 is None:
                plan0 = plan
                # the iteration's prompts encoded together (the new ones in full encoder batches), then each batch's
                # conditioning, with its CFG negative rows, in one gather
                self.encode_ahead(iteration, slots)
                table = self.backbone.prompt_table([self.prompts.prompts[s.prompt_id] for s in slots],
                                                   plan.guidance_scale)
            elif (plan.base_steps, plan.guidance_scale, plan.leaves_per_root) != \
                    (plan0.base_steps, plan0.guidance_scale, plan0.leaves_per_root):
                raise ConfigError("the plans of one iteration must share schedule length, guidance and leaves per root")
            cond = table.conditioning(range(start, start + len(chunk))) if table is not None else \
                self.backbone.encode_prompts(prompts)
            gens = sample_generators(self.seed, iteration, [s.global_index for s in chunk], self.device)
            x_init = None
            if getattr(self.planner, "init_same_noise", False):  # one noise per prompt's group (a planner of
                # one's own need not declare it), keyed by the prompt
                x_init = self.backbone.start_latents(sample_generators(
                    self.seed * 31 + 11, iteration, [s.prompt_id for s in chunk], self.device),
                    self.backbone.make_schedule(plan.base_steps))
            with self.autocast(), self.rollout_weights():
                out = rollout(self.backbone, plan, cond, gens, start=x_init)
            if not out.records and not keep_x0:
                raise ConfigError(f"plan '{plan.name}' trains no step; check the sampler's trained steps")
            images = self.backbone.decode(out.final)
            leaf_idx = out.leaf_root.cpu().tolist()
            futures.append(self.reward_runner.submit(  # scored while the next batch samples
                images, [prompts[i] for i in leaf_idx], [meta[i] for i in leaf_idx]))
            parts.append((out, start, images if start == 0 else None))
            if start + bs < len(slots) and self.stop_requested():
                raise StopRequested
        self.sync()
        t_wait = time.perf_counter()
        results = [f.result() for f in futures]  # RewardError propagates with the reward's name
        reward_wait = time.perf_counter() - t_wait
        batch = self._flatten(parts, slots, plan0, keep_x0, iteration)
        batch.rewards = np.concatenate([r[0] for r in results])
        names = results[0][1].get("per_reward", {}).keys()
        batch.per_reward = {n: np.concatenate([r[1]["per_reward"][n] for r in results]) for n in names}
        for r in results:
            for k, v in r[1].items():
                if k != "per_reward" and isinstance(v, (int, float)):
                    batch.reward_info.setdefault(k, []).append(float(v))
        return batch, reward_wait

    def encode_ahead(self, iteration: int, slots) -> None:
        """Encode the iteration's prompts missing from the backbone's prompt cache, with as many of the next
        iterations' new prompts (this rank's, known in advance: the sampler is a function of the iteration) as fill
        the last encoder batch: the text encoders run full batches of ``ENCODE_BATCH`` instead of one part-filled,
        padded batch per iteration. Embeddings do not depend on their batch (see ``Backbone.encode_prompts``), so
        the run is the same."""
        cache = self.backbone.cache
        if cache is None or self.backbone.text_trainable:
            return
        missing = cache.split([self.prompts.prompts[s.prompt_id] for s in slots])
        ahead = iteration + 1
        while missing and len(missing) % ENCODE_BATCH and ahead <= iteration + ENCODE_LOOKAHEAD:
            known = set(missing)
            later = [self.prompts.prompts[s.prompt_id] for s in self.sampler.rank_slots(ahead)]
            upcoming = [p for p in cache.split(later) if p not in known]
            missing += upcoming[:ENCODE_BATCH - len(missing) % ENCODE_BATCH]
            ahead += 1
        self.backbone.cache_prompts(missing)

    def _flatten(self, parts, slots, plan, keep_x0: bool, iteration: int) -> RolloutBatch:
        """Concatenate the rollout batches into flat roots, leaves and transitions (local indices)."""
        per_root = plan.leaves_per_root
        cols = {k: [] for k in ("x", "next_x", "logp_old", "mean_old", "t_root", "t_leaf_lo")}
        # the per-record numbers, one per row, as Python lists made into one tensor each at the end
        scalars = {k: [] for k in ("t_from", "t_to", "t_leaf_count", "t_key", "t_weight", "std")}
        specs = []
        leaf_root, x0, path, tag = [], [], [], []
        for out, root_offset, _ in parts:
            leaf_offset = root_offset * per_root
            leaf_root.append(out.leaf_root + root_offset)
            if keep_x0:
                x0.append(out.final)
            path.append(out.leaf_path_logp if out.leaf_path_logp is not None else torch.zeros(len(out.leaf_root)))
            tag.append(out.leaf_tag if out.leaf_tag is not None else torch.zeros(len(out.leaf_root), dtype=torch.long))
            for r in out.records:
                n = r.x.shape[0]
                cols["x"].append(r.x)
                cols["next_x"].append(r.next_x)
                cols["logp_old"].append(r.logp_old)
                cols["mean_old"].append(r.mean_old)
                cols["t_root"].append(r.root + root_offset)
                cols["t_leaf_lo"].append(r.leaf_lo + leaf_offset)
                for key, value in (("t_from", r.step), ("t_to", r.step_to), ("t_leaf_count", r.leaf_count),
                                   ("t_key", r.node_key), ("t_weight", r.spec.loss_weight), ("std", float(r.std))):
                    scalars[key] += [value] * n
                specs += [r.spec] * n
        cat = {k: (torch.cat(v) if v else None) for k, v in cols.items()}
        for key, values in scalars.items():
            dtype = torch.float32 if key in ("t_weight", "std") else torch.long
            cat[key] = torch.tensor(values, dtype=dtype) if values else None
        if plan.noise_aware_weight and cat["std"] is not None:
            # TempFlow: weight by the step's Gaussian std. The loss divides by the weights' sum over all ranks, so
            # a constant factor (the reference's 2.25 on SD3, 1.73 on FLUX) cancels; no per-rank normalisation,
            # which would make the weights depend on how samples are spread over processes.
            cat["t_weight"] = cat["t_weight"] * cat["std"]
        if plan.sample_fraction is not None and cat["t_root"] is not None:
            keep = self._sample_subset(cat["t_root"], cat["t_from"], slots, plan.sample_fraction, iteration)
            cat = {k: (v[keep] if v is not None else None) for k, v in cat.items()}
            specs = [specs[i] for i in torch.nonzero(keep).flatten().tolist()]
        empty = torch.zeros(0, dtype=torch.long)
        return RolloutBatch(
            prompts=[self.prompts.prompts[s.prompt_id] for s in slots],
            prompt_ids=np.array([s.prompt_id for s in slots]),
            global_index=np.array([s.global_index for s in slots]),
            plan=plan, leaf_root=torch.cat(leaf_root).cpu(), leaves_per_root=per_root,
            leaf_x0=torch.cat(x0) if keep_x0 else None, leaf_path_logp=torch.cat(path).cpu(),
            leaf_tag=torch.cat(tag).cpu(),
            x=cat["x"], next_x=cat["next_x"], logp_old=cat["logp_old"], mean_old=cat["mean_old"],
            t_from=cat["t_from"].cpu() if cat["t_from"] is not None else empty,
            t_to=cat["t_to"].cpu() if cat["t_to"] is not None else empty, t_spec=specs,
            t_root=cat["t_root"].cpu() if cat["t_root"] is not None else empty,
            t_leaf_lo=cat["t_leaf_lo"].cpu() if cat["t_leaf_lo"] is not None else empty,
            t_leaf_count=cat["t_leaf_count"].cpu() if cat["t_leaf_count"] is not None else empty,
            t_key=cat["t_key"].cpu() if cat["t_key"] is not None else empty,
            t_weight=cat["t_weight"].cpu() if cat["t_weight"] is not None else torch.zeros(0),
            preview=parts[0][2],
        )

    def _sample_subset(self, t_root, t_from, slots, fraction: float, iteration: int) -> torch.Tensor:
        """DanceGRPO: each sample keeps a random ``fraction`` of its trained steps, drawn from a generator keyed
        by (seed, iteration, global sample index), so the choice does not depend on batching or ranks."""
        keep = torch.zeros(len(t_root), dtype=torch.bool)
        t_root = t_root.cpu()
        for r in torch.unique(t_root).tolist():
            rows = torch.nonzero(t_root == r).flatten()
            rows = rows[torch.argsort(t_from[rows].cpu())]
            n = max(1, int(len(rows) * fraction))
            g = sample_generators(self.seed * 7 + 3, iteration, [slots[r].global_index])[0]
            keep[rows[torch.randperm(len(rows), generator=g)[:n]]] = True
        return keep
