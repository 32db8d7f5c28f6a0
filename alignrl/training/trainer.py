"""The one training loop: prompts -> rollout(plan) -> rewards -> advantages -> loss -> update.

Distributed semantics: every rank samples its slice of the iteration's global batch (see
``KRepeatPromptSampler``), rewards and group keys are gathered so advantages are computed over the
whole batch, and gradients are summed across ranks once per optimizer step (an explicit all-reduce
of the trainable parameters' gradients, normalised by the global number of samples). Ranks may
therefore drop different numbers of samples (zero-std groups, non-finite rewards) without hanging,
and N processes give the result one process would with the same global batch.
"""

from __future__ import annotations

import math

import os
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from alignrl import hostalloc
from alignrl.algorithms.advantages import batch_advantages
from alignrl.algorithms.base import (OFFLINE_KINDS, PROMPT_KINDS, Advantages, OfflineBatch, PromptBatch,
                                     RolloutBatch, StepContext)
from alignrl.components import as_dict, build_algorithm, build_backbone, build_planner
from alignrl.config import steps_per_pass, validate_batch_arithmetic
from alignrl.data import PromptSet, eval_prefix, load_eval_sets
from alignrl.errors import AlignError, ConfigError
from alignrl.eval.report import save_grid
from alignrl.imagedata import ImageDataset, LatentCache
from alignrl.rewards.base import WeightedReward
from alignrl.rewards.runner import AsyncRewardRunner
from alignrl.policy import Policy
from alignrl.training import checkpoint as ckpt
from alignrl.training.checkpointer import Checkpointer, Counters, RunParts
from alignrl.training.collect import RolloutCollector, StopRequested, iteration_generator
from alignrl.training.control import RunControl, one_line
from alignrl.training.distributed import Collectives
from alignrl.training.early_stop import EarlyStop
from alignrl.training.eval_hook import EvalHook
from alignrl.training.logging import MetricsLogger
from alignrl.training.sampler import DatasetSampler, KRepeatPromptSampler, balance_strata
from alignrl.training.sharding import DistributedConfig, check_strategy, make_sharding
from alignrl.training.trainer_config import TrainerConfig
from alignrl.trajectories import RecordedCollector, TrajectoryStore


_StopNow = StopRequested  # a stop was requested mid-iteration (raised before any update)


def _device_for(cfg_trainer) -> str:
    want = str(cfg_trainer if isinstance(cfg_trainer, str) else cfg_trainer.get("device", "auto"))
    if want == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu")
    return want


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.is_main = int(os.environ.get("RANK", "0")) == 0  # until the accelerator says
        self.iteration = 0
        self.train_seconds = 0.0  # wall-clock of training iterations (evaluation and saving excluded)
        self.settings = TrainerConfig.from_config(cfg.trainer)  # typed and checked before anything loads
        self.max_steps = self.settings.max_steps
        self.resume_from: Path | None = None
        self._owns_status = False  # set once this process may write the run's status.json
        self._step_known = False  # self.iteration is the run's step (fresh start, or a checkpoint loaded)
        self._last_saved_step: int | None = None  # the step of a good checkpoint this process saved or loaded
        self._nonfinite_streak = 0
        self._failure: str | None = None
        self._training = False  # train() was entered (status.json "phase": setup | train)
        try:
            self._setup()
        except BaseException as e:  # a failure it can record: status.json says failed, with the message
            if self._owns_status:
                self._failure = one_line(e)
                self._write_status("failed")
            raise

    def _setup(self) -> None:
        from accelerate import Accelerator

        cfg = self.cfg
        tcfg = self.settings
        device = _device_for(tcfg.device)
        mp = tcfg.mixed_precision
        if mp == "fp16" and device == "cpu":
            raise ConfigError("fp16 mixed precision needs a GPU; use trainer.mixed_precision=bf16 or no on CPU")
        self.accelerator = Accelerator(mixed_precision=mp, cpu=device == "cpu")
        acc = self.accelerator
        self.rank, self.world = acc.process_index, acc.num_processes
        self.is_main = acc.is_main_process
        self.device = acc.device if device != "cpu" else torch.device("cpu")

        self.dist = Collectives(self.rank, self.world, self.device, acc)
        self.control = RunControl(self.run_dir, self.dist, self.is_main)
        self.host_allocator = hostalloc.tune(tcfg.host_allocator, self.device.type)  # before any model is built

        # ---- which checkpoint to resume (found now; verified below, before any model loads) ----
        self.checkpointer = Checkpointer(self.run_dir, cfg.get("resume"), self.dist, self.is_main,
                                         tcfg.keep_checkpoints)
        self._owns_status = True
        self._step_known = not self.checkpointer.resuming

        # ---- everything that can be checked without a model ----
        self.seed = int(cfg.seed)
        self.eval_sets = load_eval_sets(cfg.data.get("eval"))  # {"": set} or {held_out: ..., in_dist: ...}
        self.algorithm = build_algorithm(cfg)
        self.offline = self.algorithm.batch_kind in OFFLINE_KINDS
        self.direct = self.algorithm.batch_kind in PROMPT_KINDS  # the method samples its prompts itself
        self.planner = build_planner(cfg)  # rollouts, and the evaluation's sampling for offline methods
        self.store = None  # D3PO's human mode: ranked stored trajectories in place of rollouts
        if self.offline:  # rows of an image dataset, every image opened once before anything loads
            self.layout = validate_batch_arithmetic(cfg, self.world)
            spec = as_dict(cfg.data.get("offline"))
            balance = spec.get("balance")
            self.dataset = ImageDataset.load(spec.get("path"), self.algorithm.batch_kind, root=spec.get("root"),
                                             drop_ties=bool(spec.get("drop_ties", True)), balance=balance,
                                             min_score=spec.get("min_score"))
            self.dataset.validate()
            self.batch_sampler = DatasetSampler(len(self.dataset), self.layout["samples_per_rank"] * self.world,
                                                world_size=self.world, rank=self.rank, seed=self.seed,
                                                strata=tuple(r.stratum for r in self.dataset.rows)
                                                if balance is not None else None,
                                                power=0.0 if spec.get("balance_power") is None else spec["balance_power"])
            self._latent_dir = Path(spec.get("latent_cache") or self.run_dir / "latent_cache")
        else:
            human = getattr(self.algorithm, "human_file", None)
            # D3PO's human mode trains on a store's ranked pairs, not on fresh rollouts of the training prompts
            self.store = TrajectoryStore.load(human) if human else None
            self.train_prompts = None if self.store else PromptSet.load(cfg.data.train, "data.train")
            units = len(self.store.pairs) if self.store else len(self.train_prompts)
            self.layout = validate_batch_arithmetic(cfg, self.world, num_prompts=units)
            self.batch_sampler = KRepeatPromptSampler(
                num_prompts=units, groups_per_iteration=int(cfg.data.groups_per_iteration),
                group_size=int(self.algorithm.group_size), world_size=self.world, rank=self.rank, seed=self.seed,
                strata=None if self.store else balance_strata(self.train_prompts, cfg.data.get("balance")),
            )
        self.reward = WeightedReward.from_config(as_dict(cfg.reward))
        if self.direct and getattr(self.algorithm, "differentiates_reward", True) and not self.reward.differentiable:
            plain = self.reward.not_differentiable
            raise ConfigError(f"algorithm {self.algorithm.name} backpropagates the reward, but {', '.join(plain)} "
                              f"cannot be differentiated; use a differentiable reward (smoothness, shapes_soft, "
                              f"shapes_seg, or pickscore/aesthetic/clipscore/hpsv2 with "
                              f"reward.<name>.differentiable=true), or give "
                              f"it weight 0 to only log it")
        self._max_nonfinite = tcfg.max_nonfinite_iterations
        self.steps_per_pass = steps_per_pass(cfg)  # schedule steps a training pass packs (1 where they cannot)
        self.checkpointer.verify()  # checksums and headers, before the models load

        self.finetune = tcfg.finetune
        self.distributed = DistributedConfig.from_config(cfg.get("distributed"))
        check_strategy(self.distributed, algorithm=self.algorithm, finetune=self.finetune,
                       text_encoder=tcfg.text_encoder, mixed_precision=mp, optimizer=tcfg.optimizer.name)
        self.sharding = make_sharding(self.distributed, self.world, self.device, mp)
        if tcfg.decay_to_base and self.distributed.strategy in ("zero2", "zero3"):  # on any number of processes
            raise ConfigError(f"trainer.decay_to_base is not supported with distributed={self.distributed.strategy} "
                              f"(DeepSpeed owns the weights' update on several processes); use distributed=ddp or "
                              f"fsdp, or trainer.decay_to_base=0")
        self.early_stop = EarlyStop(tcfg.early_stop) if tcfg.early_stop.enabled else None
        if self.early_stop is not None:
            self.early_stop.check_names([eval_prefix(name) for name in self.eval_sets])
        if self.algorithm.rollout_weights == "reference" and not self.algorithm.needs_reference:
            raise ConfigError(f"algorithm {self.algorithm.name} rolls out with the reference but does not declare "
                              f"needs_reference, so none is kept; make needs_reference true when it does")
        if tcfg.text_encoder != "frozen" and self.algorithm.needs_reference:
            raise ConfigError(f"trainer.text_encoder={tcfg.text_encoder} with a KL or reference term (algorithm "
                              f"{self.algorithm.name}) would need a frozen copy of the text encoder as reference; "
                              f"set algorithm.beta=0 or trainer.text_encoder=frozen")

        # ---- models ----
        torch.manual_seed(self.seed)
        self.backbone = build_backbone(cfg, self.device)
        self.denoiser = self.backbone.transformer
        self.policy = Policy.for_training(self.backbone, tcfg, self.algorithm.needs_reference, self.sharding)
        self.trainable_names, self.params = self.policy.trainable_names, self.policy.params
        self.reference_denoiser, self.ema = self.policy.reference_denoiser, self.policy.ema
        # the weights the run starts from (rebuilt identically on resume: pretrained weights, seeded adapters),
        # which trainer.decay_to_base pulls toward; this process's shards only with distributed=fsdp
        self._base_weights = [p.detach().clone() for p in self.params] if tcfg.decay_to_base else None

        self.optimizer = tcfg.build_optimizer(self.params, float(self.algorithm.lr))
        from diffusers.optimization import get_scheduler

        self.lr_scheduler = get_scheduler(  # advances once per optimizer step
            tcfg.lr_schedule, optimizer=self.optimizer, num_warmup_steps=tcfg.warmup_steps,
            num_training_steps=self.max_steps * tcfg.optimizer_steps_per_iteration,
        )
        if self.sharding.owns_update:  # distributed=zero2|zero3: DeepSpeed's engine around the optimizer
            self.optimizer = self.policy.wrap_optimizer(self.optimizer, tcfg.max_grad_norm)
            self.ema = self.policy.ema  # over this process's partitions with ZeRO-3
        else:
            self.optimizer = acc.prepare_optimizer(self.optimizer)  # fp16 loss scaling when asked
        if self.algorithm.rollout_weights == "ema" and self.ema is None:
            raise ConfigError(f"algorithm.old_policy=ema ({self.algorithm.name}) needs the EMA: set "
                              "trainer.ema.enabled=true, or algorithm.old_policy=sampling")

        reward_threads = tcfg.reward_threads
        if reward_threads is None:  # on the CPU a reward's second pool of intra-op threads contends with the sampler's
            reward_threads = 1 if self.device.type == "cpu" else 0
        self.reward_runner = AsyncRewardRunner(self.reward, tcfg.reward_workers, reward_threads)
        if self.store is not None:
            self.store.check(self.backbone.family, self.backbone.resolution, self.planner.plan())
            self.collector = RecordedCollector(self.store, self.batch_sampler, self.planner.plan(), self.device)
        else:
            self.collector = None if self.offline or self.direct else RolloutCollector(
                backbone=self.backbone, denoiser=self.denoiser, planner=self.planner, prompts=self.train_prompts,
                sampler=self.batch_sampler, reward_runner=self.reward_runner, seed=self.seed, device=self.device,
                rollout_batch_size=self.layout["rollout_batch_size"],
                keep_final_latents=self.algorithm.batch_kind == "final_latents", autocast=self.autocast,
                rollout_weights=self._old_policy_weights, stop_requested=self.control.stop_agreed, sync=self._sync)
        self.checkpointer.attach(RunParts(
            policy=self.policy, optimizer=self.optimizer, lr_scheduler=self.lr_scheduler,
            batch_sampler=self.batch_sampler, planner=self.planner, algorithm=self.algorithm,
            backbone_family=self.backbone.family, seed=self.seed, finetune=self.finetune,
            text_encoder=tcfg.text_encoder, sharded=self.distributed.sharded,
            whole_weights=self.distributed.whole_weights, early_stop=self.early_stop))
        self.optimizer_steps = 0
        try:
            self._resume()
        except BaseException:
            self.reward_runner.close()
            raise

    # ------------------------------------------------------------------ helpers
    def autocast(self):
        return self.accelerator.autocast() if self.accelerator.mixed_precision != "no" else nullcontext()

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _iteration_generator(self, *salt: int) -> torch.Generator:
        return iteration_generator(self.seed, self.iteration, *salt)

    # ------------------------------------------------------------------ rollout
    def _old_policy_weights(self):
        """The weights that draw the rollouts: the EMA where the algorithm's old policy is the EMA (DiffusionNFT)."""
        return self.policy.weights(self.algorithm.rollout_weights)

    def collect(self) -> RolloutBatch:
        """This rank's rollouts of the iteration, scored (``RolloutCollector``); raises ``_StopNow`` on a stop."""
        batch, self.timing["reward_wait"] = self.collector.collect(self.iteration)
        return batch

    @torch.no_grad()
    def collect_offline(self) -> OfflineBatch:
        """This rank's dataset rows of the iteration as latents (encoded once, then read from the cache)."""
        if getattr(self, "_latent_cache", None) is None:
            self._latent_cache = LatentCache(self._latent_dir, self.backbone)
        slots = self.batch_sampler.rank_rows(self.iteration)
        rows = [self.dataset.rows[s.prompt_id] for s in slots]
        k = len(rows[0].images)
        latents = self._latent_cache.latents([p for r in rows for p in r.images], self.layout["rollout_batch_size"])
        scores = torch.tensor([r.scores for r in rows], dtype=torch.float32) \
            if all(r.scores is not None for r in rows) else None
        labels = torch.tensor([r.label for r in rows], dtype=torch.float32) if self.dataset.kind == "labels" else None
        return OfflineBatch(kind=self.dataset.kind, prompts=[r.prompt for r in rows],
                            latents=latents.view(len(rows), k, *latents.shape[1:]),
                            global_index=np.array([s.global_index for s in slots]),
                            row_ids=np.array([s.prompt_id for s in slots]), scores=scores, labels=labels)

    # ------------------------------------------------------------------ advantages
    def advantages(self, batch: RolloutBatch) -> Advantages:
        """This rank's advantages (the algorithm's estimator over the rewards of all ranks) and the reward
        statistics of the whole batch for logging."""
        local = torch.as_tensor(np.asarray(batch.rewards, dtype=np.float64), device=self.device)
        full = self.dist.gather_uneven(local, self.dist.gather_sizes(len(local))).cpu().numpy()
        finite = full[np.isfinite(full)]
        self._finite_rewards = int(finite.size)  # over all ranks: the same on each
        stats = {"reward_mean": float(finite.mean()) if finite.size else float("nan"),
                 "reward_std": float(finite.std()) if finite.size else float("nan")}
        for name, arr in batch.per_reward.items():
            arr = self.dist.gather_uneven(torch.from_numpy(arr).to(self.device),
                                          self.dist.gather_sizes(len(arr))).cpu().numpy()
            ok = arr[np.isfinite(arr)]
            stats[f"reward/{name}_mean"] = float(ok.mean()) if ok.size else float("nan")
            stats[f"reward/{name}_std"] = float(ok.std()) if ok.size else float("nan")
        result = batch_advantages(batch, self._normalise)
        result.stats = {**stats, **result.stats}
        return result

    def _normalise(self, values: np.ndarray, keys: np.ndarray, ids: np.ndarray, per_reward: dict | None):
        """The algorithm's group normalisation over all ranks' values (rows in rank order, checked by their
        global ids); returns this rank's rows."""
        local = torch.tensor(np.stack([values, keys, ids], axis=1), dtype=torch.float64, device=self.device)
        sizes = self.dist.gather_sizes(len(values))
        full = self.dist.gather_uneven(local, sizes).cpu().numpy()
        start = sum(sizes[:self.rank])
        sl = slice(start, start + len(values))
        assert np.array_equal(full[sl, 2], ids), "gathered order must follow rank order"
        gathered = None
        if per_reward:
            gathered = {n: self.dist.gather_uneven(torch.from_numpy(np.asarray(a, dtype=np.float64)).to(self.device),
                                               sizes).cpu().numpy() for n, a in per_reward.items()}
        res = self.algorithm.advantages(full[:, 0], full[:, 1].astype(np.int64), per_reward=gathered,
                                        weights=self.reward.weights)
        res.advantages, res.keep = res.advantages[sl], res.keep[sl]
        return res

    # ------------------------------------------------------------------ update
    def step_context(self) -> StepContext:
        """The loop's services for the algorithm's ``train_step`` (this iteration's)."""
        tcfg = self.settings
        return StepContext(
            backbone=self.backbone, denoiser=self.denoiser, device=self.device, seed=self.seed,
            iteration=self.iteration, train_batch_size=self.layout["train_batch_size"],
            updates_per_iteration=self.layout["updates_per_iteration"], inner_epochs=tcfg.inner_epochs,
            autocast=self.autocast,
            backward=self.sharding.backward if self.sharding.owns_update else self.accelerator.backward,
            optimizer_step=lambda: self._optimizer_step(tcfg.max_grad_norm), all_reduce_sum=self.dist.all_reduce_sum,
            update_chunks=lambda global_index, epoch: self._update_chunks(
                global_index, self.layout["updates_per_iteration"], epoch),
            predict_reference=self._predict_reference, old_policy_weights=self._old_policy_weights,
            summarise=self._update_summary, rank=self.rank, world_size=self.world,
            mixed_precision=self.accelerator.mixed_precision,
            update_by=tcfg.update_by, transitions_per_update=tcfg.transitions_per_update,
            steps_per_pass=self.steps_per_pass,
            balance=self.sharding.balance, score=self.reward.score_tensor if self.direct else None,
            reward=(lambda images, prompts, metadata: self.reward(images, prompts, metadata)[0]) if self.direct else None,
        )

    @torch.no_grad()
    def _predict_reference(self, x, timestep, cond, guidance_scale):
        """The frozen reference's prediction: the base (adapter disabled, for LoRA) or a frozen copy."""
        return self.policy.predict_reference(x, timestep, cond, guidance_scale, self.autocast)

    def _update_summary(self, sums: dict, count: int, ratio_dev: float, grad_norms: list) -> dict:
        keys = list(self.algorithm.diagnostics)  # the same keys on every rank, even one with no samples
        totals = self.dist.all_reduce_sum(torch.tensor([count] + [sums[k] for k in keys], dtype=torch.float64,
                                                   device=self.device)).tolist()
        out = {k: v / max(totals[0], 1) for k, v in zip(keys, totals[1:])}  # averaged over all ranks
        if self.world > 1:
            dev = torch.tensor([ratio_dev], device=self.device)
            torch.distributed.all_reduce(dev, op=torch.distributed.ReduceOp.MAX)
            ratio_dev = float(dev.item())
        if "ratio" in out:
            out["ratio_mean"] = out.pop("ratio")
        out["ratio_dev_before_update"] = ratio_dev
        out["grad_norm"] = float(np.mean(grad_norms)) if grad_norms else 0.0
        out["lr"] = self.lr_scheduler.get_last_lr()[0]
        out["optimizer_steps"] = self.optimizer_steps
        return out

    def _update_chunks(self, global_index: np.ndarray, updates: int, epoch: int) -> list[torch.Tensor]:
        """This rank's local sample indices for each optimizer step of an epoch.

        The split is made over the iteration's *global* batch with a generator every rank shares, so
        each optimizer step sees the same samples whatever the number of processes.
        """
        total = self.batch_sampler.samples_per_iteration
        order = torch.randperm(total, generator=self._iteration_generator(2, epoch))
        position = torch.empty(total, dtype=torch.long)
        position[order] = torch.arange(total)
        mine = position[torch.as_tensor(global_index, dtype=torch.long)]  # shuffled position of my samples
        chunk_of = mine * updates // total
        chunks = []
        for c in range(updates):
            local = torch.nonzero(chunk_of == c).flatten()
            chunks.append(local[torch.argsort(mine[local])])  # in shuffled order
        return chunks

    def _optimizer_step(self, max_norm: float) -> float:
        if self.sharding.owns_update:  # DeepSpeed: reduce, clip, step and zero the gradients in one call
            norm = self.sharding.step()
            if not math.isfinite(norm):  # DeepSpeed skipped the step; the weights stay finite
                raise AlignError(
                    f"the update diverged: the gradients are not finite (NaN/inf) at optimizer step "
                    f"{self.optimizer_steps + 1} (iteration {self.iteration + 1}), so DeepSpeed skipped it and the run "
                    f"stops; lower algorithm.lr (now {float(self.algorithm.lr):g}) or trainer.max_grad_norm and "
                    f"resume from the last checkpoint (resume=auto)")
        elif self.sharding.active:  # reduce-scattered (summed) in the backward passes already
            norm = self.sharding.clip_grad_norm(self.params, max_norm) if max_norm > 0 else 0.0
        else:
            self.dist.sum_gradients(self.params)  # sum of per-rank partial sums = the global mean over the chunk
            norm = self.accelerator.clip_grad_norm_(self.params, max_norm) if max_norm > 0 else torch.tensor(0.0)
        if not self.sharding.owns_update:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self._base_weights is not None and not getattr(self.optimizer, "step_was_skipped", False):
                self._decay_to_base()  # (not after a step fp16 loss scaling skipped)
        self.lr_scheduler.step()
        self.optimizer_steps += 1
        if not self.policy.weights_finite():  # the same weights on every rank: all stop here together
            raise AlignError(
                f"the update diverged: the trainable weights are not finite (NaN/inf) after optimizer step {self.optimizer_steps} "
                f"(iteration {self.iteration + 1}), so the run stops without saving them; lower algorithm.lr "
                f"(now {float(self.algorithm.lr):g}) or trainer.max_grad_norm and resume from the last checkpoint "
                f"(resume=auto)")
        if self.ema is not None:
            self.ema.step()
        return float(norm)

    @torch.no_grad()
    def _decay_to_base(self) -> None:
        """Decoupled decay toward the starting weights (as AdamW's weight decay is toward zero): each weight moves
        the fraction lr * decay_to_base of its distance to its starting value."""
        fraction = min(1.0, float(self.lr_scheduler.get_last_lr()[0]) * self.settings.decay_to_base)
        for p, base in zip(self.params, self._base_weights):
            p.lerp_(base, fraction)

    def _watch(self, step: int, metrics: dict) -> tuple[bool, bool]:
        """trainer.early_stop: log its view of this evaluation; (new best, stop now), agreed by every process."""
        if self.early_stop is None:
            return False, False
        log, new_best, stop = self.early_stop.observe(step, metrics)
        metrics.update(log)
        decided = self.dist.broadcast_int(int(new_best) + 2 * int(stop))  # the main process's decision
        return bool(decided & 1), bool(decided & 2)

    def _keep_best(self) -> None:
        """trainer.early_stop.keep_best: a checkpoint of this (best) evaluation's step, kept through pruning."""
        self.checkpointer.protected = self.iteration
        if self._last_saved_step != self.iteration:
            self.save_checkpoint()
        if self.is_main:
            ckpt.mark_best(self.run_dir, self.iteration)

    def _reconcile_best(self) -> None:
        """After a resume: checkpoints/BEST names the guard's restored best when its checkpoint exists (a crash
        between saving it and naming it, or a resume from an earlier checkpoint, leaves another step there);
        otherwise, or without keep_best, no step is protected and the file goes."""
        best = self.early_stop.best_step if self.early_stop is not None else None
        keep = self.settings.early_stop.keep_best and best is not None and \
            ckpt.is_checkpoint(self.run_dir / "checkpoints" / ckpt.step_dir_name(best))
        self.checkpointer.protected = best if keep else None
        if self.is_main:
            if keep:
                ckpt.mark_best(self.run_dir, best)
            else:
                (self.run_dir / "checkpoints" / ckpt.BEST).unlink(missing_ok=True)

    # ------------------------------------------------------------------ main loop
    def train(self) -> str:
        """Run to ``trainer.max_steps`` iterations. Returns 'finished' or 'preempted'.

        Any exception ends the run with status ``failed`` and its one-line message in status.json."""
        tcfg = self.settings
        every = lambda key: getattr(tcfg, key)  # noqa: E731  (iteration intervals; 0: off)
        budget_s = 60 * (tcfg.max_minutes or 0)  # training wall-clock, evaluation excluded
        eval_every_s = 60 * (tcfg.eval_every_minutes or 0)
        state = "finished"
        last_eval_step = -1
        previous_handlers = {}
        self.logger = None
        self._training = True
        try:
            if self.is_main:  # leftovers of killed runs: temporary checkpoint dirs, half-written files
                ckpt.CheckpointWriter(self.run_dir).clean()
                ckpt.remove_stale_temp_files(self.run_dir)
            resolved = OmegaConf.to_container(self.cfg, resolve=True)
            self.logger = MetricsLogger(self.run_dir, as_dict(self.cfg.logger), resolved, self.is_main,
                                        self.max_steps, self.iteration, self.run_dir.name, budget_s)
            self.eval_hook = EvalHook(
                self.eval_sets, backbone=self.backbone, plan=self.planner.eval_plan(), reward=self.reward,
                seed=self.seed, ecfg=as_dict(self.cfg.get("eval")), default_batch=self.layout["rollout_batch_size"],
                rank=self.rank, world=self.world, gather=self.dist.gather, autocast=self.autocast, policy=self.policy,
                run_dir=self.run_dir, is_main=self.is_main)
            self.control.clear_stale_stop_file()
            self.accelerator.wait_for_everyone()
            previous_handlers = self.control.install_signal_handlers()
            self._write_status("running")
            if self.is_main:
                self.logger.write(
                    f"alignrl: {self.policy.describe()}; {self.world} process(es)"
                    + (f", {self.sharding.describe()}" if self.distributed.strategy != "ddp" else "") + f"; run dir {self.run_dir}"
                    + (f"; resumed from {self.resume_from}" if self.resume_from else "")
                )
                self.logger.write(f"alignrl: {self.host_allocator}")
                if self.steps_per_pass != self.settings.steps_per_pass:
                    self.logger.write(f"alignrl: trainer.steps_per_pass={self.settings.steps_per_pass} does not apply to "
                                      f"{self.algorithm.name} (no independent per-step transitions): one forward a "
                                      f"pass as the method defines it")
                if self.offline:
                    d = self.dataset
                    self.logger.write(f"alignrl: {len(d)} {d.kind} rows from {d.source}"
                                      + (f" ({d.dropped_ties} ties dropped)" if d.dropped_ties else "")
                                      + (f" ({d.below_min_score} scored below data.offline.min_score left out)"
                                         if d.below_min_score else "")
                                      + (f"; {self.batch_sampler.describe_shares()}" if self.batch_sampler.strata
                                         else ""))
            stopped_early = self.early_stop is not None and self.early_stop.stopped
            if stopped_early:  # resumed after the guard stopped the run, with the same patience
                last_eval_step = self.iteration  # evaluated when it stopped
                self.logger.write(f"alignrl: this run stopped early at step {self.early_stop.stopped_at} "
                                  f"({self.early_stop.reason()}); nothing to train: raise trainer.early_stop.patience "
                                  f"or set trainer.early_stop.metric=null to continue it")
            if self.eval_hook and tcfg.eval_at_start and self.iteration == 0 and self.resume_from is None:
                first = {"train_seconds": 0.0, **self.eval_hook.evaluate(0)}
                new_best, _ = self._watch(0, first)
                self.logger.log(0, first)
                last_eval_step = 0
                if new_best and tcfg.early_stop.keep_best:
                    self._keep_best()
            while not stopped_early and self.iteration < self.max_steps and \
                    not (budget_s and self.train_seconds >= budget_s):
                try:
                    metrics = self.run_iteration()
                except _StopNow:
                    metrics = None  # the iteration was abandoned before any update: state is unchanged
                if metrics is not None:
                    before = self.train_seconds
                    self.train_seconds = self.dist.agreed_max(self.train_seconds + metrics["time/iteration"])
                    metrics["train_seconds"] = self.train_seconds
                    self.iteration += 1
                    step = self.iteration
                    images = {}
                    if self.is_main and self.collector is not None and every("log_images_every") and \
                            step % every("log_images_every") == 0 and self._last_batch.preview is not None:
                        images["rollouts"] = self._save_rollout_grid(step)
                    timed_eval = eval_every_s and int(self.train_seconds // eval_every_s) > int(before // eval_every_s)
                    new_best = stop_early = False
                    if self.eval_hook and ((every("eval_every") and step % every("eval_every") == 0) or timed_eval):
                        metrics.update(self.eval_hook.evaluate(step))
                        last_eval_step = step
                        images.update(self.eval_hook.grids)
                        new_best, stop_early = self._watch(step, metrics)
                    self.logger.log(step, metrics, images)
                    self.logger.progress(step, metrics)
                    self._write_status("running")  # a killed run still shows where it stopped
                    if stop_early:  # before any save below: the checkpoint's guard state holds the stop
                        self.early_stop.stopped_at = step
                    if new_best and tcfg.early_stop.keep_best:
                        self._keep_best()
                    if every("checkpoint_every") and step % every("checkpoint_every") == 0 and \
                            self._last_saved_step != step:
                        self.save_checkpoint()
                    if stop_early:
                        if self._last_saved_step != step:
                            self.save_checkpoint()
                        best = self.checkpointer.protected
                        self.logger.write(f"alignrl: {self.early_stop.reason()}; checkpoint saved at step "
                                          f"{self.iteration}" + (f", the best at {self.run_dir / 'checkpoints' / ckpt.step_dir_name(best)}"
                                                                  if best is not None else ""))
                        break
                if metrics is None or self.control.stop_agreed():
                    if self._last_saved_step != self.iteration:
                        self.save_checkpoint()
                    self.logger.write(f"alignrl: stop requested ({self.control.stop_reason()}); checkpoint saved at "
                                      f"step {self.iteration}, exiting (continue with resume=auto "
                                      f"run_dir={self.run_dir})")
                    state = "preempted"
                    break
            if state == "finished":
                if self.eval_hook and (every("eval_every") or eval_every_s) and last_eval_step != self.iteration:
                    self.logger.log(self.iteration, {"train_seconds": self.train_seconds,
                                                     **self.eval_hook.evaluate(self.iteration)})
                if self._last_saved_step != self.iteration:
                    self.save_checkpoint()
                if self.is_main:
                    for line in self.eval_hook.summary_lines():
                        self.logger.write(line)
        except BaseException as e:
            state = "failed"
            self._failure = one_line(e)
            raise
        finally:
            self.reward_runner.close()
            if self.logger is not None:
                self.logger.close()
            self.control.restore_signal_handlers(previous_handlers)
            self._write_status(state)
        return state

    def run_iteration(self) -> dict:
        """One rollout + update round. Raises ``_StopNow`` (before any update) when a stop is requested."""
        self.timing = {}
        t0 = time.perf_counter()
        if self.offline or self.direct:
            return self._run_direct_iteration(t0)
        failure = None
        try:
            batch = self.collect()
        except _StopNow:
            raise  # raised on every rank at the same point (the stop check is collective)
        except Exception as e:  # noqa: BLE001  every rank must learn of it, or the others hang in the gather
            failure = e
        self.control.raise_if_any_failed(failure)
        if self.control.stop_agreed():
            raise _StopNow
        self._sync()
        t1 = time.perf_counter()
        adv = self.advantages(batch)
        self._check_rewards_finite(batch)
        t2 = time.perf_counter()
        self._last_batch = batch
        upd = self.algorithm.train_step(batch, adv, self.step_context())
        self._sync()
        t3 = time.perf_counter()
        reward_wait = self.timing.get("reward_wait", 0.0)
        metrics = {**adv.stats, **upd}
        for k, v in batch.reward_info.items():
            metrics[f"reward/{k}"] = float(np.mean(v))
        metrics.update({
            "time/rollout": t1 - t0 - reward_wait, "time/reward_wait": reward_wait,
            "time/advantage": t2 - t1, "time/update": t3 - t2, "time/iteration": t3 - t0,
            "iteration": self.iteration,
        })
        self._last_rewards = batch.rewards
        return metrics

    def prompt_batch(self) -> PromptBatch:
        """This rank's prompt slots of the iteration (the reward-gradient methods sample them themselves)."""
        slots = self.batch_sampler.rank_slots(self.iteration)
        prompts = self.train_prompts
        return PromptBatch(prompts=[prompts.prompts[s.prompt_id] for s in slots],
                           metadata=[prompts.metadata[s.prompt_id] for s in slots],
                           prompt_ids=np.array([s.prompt_id for s in slots]),
                           global_index=np.array([s.global_index for s in slots]))

    def _run_direct_iteration(self, t0: float) -> dict:
        """An iteration without rollouts: the dataset rows (offline methods) or the prompt slots (reward-gradient
        methods) go straight to the algorithm's step."""
        failure = None
        try:
            batch = self.collect_offline() if self.offline else self.prompt_batch()
        except Exception as e:  # noqa: BLE001  every rank must learn of it (the others would wait in a reduce)
            failure = e
        self.control.raise_if_any_failed(failure)
        if self.control.stop_agreed():
            raise _StopNow
        t1 = time.perf_counter()
        upd = self.algorithm.train_step(batch, None, self.step_context())
        self._sync()
        t2 = time.perf_counter()
        epoch = {"epoch": self.batch_sampler.epoch(self.iteration)} if self.offline else {}
        return {**upd, **epoch, "time/data": t1 - t0, "time/update": t2 - t1, "time/iteration": t2 - t0,
                "iteration": self.iteration}

    def _check_rewards_finite(self, batch: RolloutBatch) -> None:
        """Stop when every reward of ``trainer.max_nonfinite_iterations`` iterations in a row was NaN/inf: such
        iterations drop every sample, so the run would otherwise 'finish' without a single update."""
        if self._finite_rewards:
            self._nonfinite_streak = 0
            return
        self._nonfinite_streak += 1
        if self._max_nonfinite and self._nonfinite_streak >= self._max_nonfinite:
            first = self.iteration + 2 - self._nonfinite_streak
            names = ", ".join(self.reward.rewards)
            raise AlignError(
                f"every reward was NaN/inf for {self._nonfinite_streak} iterations in a row (iterations {first}-"
                f"{self.iteration + 1}), so nothing can be learned: the reward ({names}) cannot score these images; "
                f"check it with `alignrl reward-check`, or raise trainer.max_nonfinite_iterations (0: never stop)")

    def _save_rollout_grid(self, step: int) -> Path:
        batch = self._last_batch
        imgs = batch.preview[:16].cpu()
        caps = [f"{r:.3g} {p}" for p, r in zip(batch.leaf_prompts, batch.rewards)]  # score first: cells are narrow
        return save_grid(self.run_dir / "samples" / f"step_{step:06d}.png", imgs, caps[: len(imgs)])

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> None:
        self.checkpointer.save(Counters(self.iteration, self.optimizer_steps, self.train_seconds))
        self._last_saved_step = self.iteration

    def _resume(self) -> None:
        resumed = self.checkpointer.load()
        if resumed is None:
            return
        c = resumed.counters
        self.iteration, self.optimizer_steps, self.train_seconds = c.iteration, c.optimizer_steps, c.train_seconds
        self.resume_from = resumed.path
        self._reconcile_best()
        self._step_known = True
        self._last_saved_step = resumed.saved_at_step

    # ------------------------------------------------------------------ status
    def _write_status(self, state: str) -> None:
        """status.json: before a checkpoint is loaded the step is the one the run last recorded."""
        step = self.iteration if self._step_known else self.checkpointer.prior_step
        self.control.write_status(state, step=step, max_steps=self.max_steps, train_seconds=self.train_seconds,
                                  training=self._training, failure=self._failure)
