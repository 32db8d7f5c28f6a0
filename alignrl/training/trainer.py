"""The one training loop: prompts -> rollout(plan) -> rewards -> advantages -> loss -> update.

Distributed semantics: every rank samples its slice of the iteration's global batch (see
``KRepeatPromptSampler``), rewards and group keys are gathered so advantages are computed over the
whole batch, and gradients are summed across ranks once per optimizer step (an explicit all-reduce
of the trainable parameters' gradients, normalised by the global number of samples). Ranks may
therefore drop different numbers of samples (zero-std groups, non-finite rewards) without hanging,
and N processes give the result one process would with the same global batch.
"""

from __future__ import annotations

import json
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file

from alignrl.components import as_dict, build_algorithm, build_backbone, build_planner
from alignrl.config import validate_batch_arithmetic
from alignrl.data import PromptSet
from alignrl.errors import AlignError, CheckpointError, ConfigError
from alignrl.eval.evaluate import Evaluator
from alignrl.eval.report import save_grid
from alignrl.rewards.base import WeightedReward
from alignrl.rewards.runner import AsyncRewardRunner
from alignrl.sampling.engine import apply_step, rollout, sample_generators
from alignrl.training import checkpoint as ckpt
from alignrl.training.ema import EMA
from alignrl.training.logging import MetricsLogger
from alignrl.training.lora import (load_trainable_file, lora_export, named_trainable, reference_context,
                                   setup_trainable)
from alignrl.training.sampler import KRepeatPromptSampler


class _StopNow(Exception):
    """A stop was requested mid-iteration; the iteration is abandoned before its update."""


@dataclass
class IterationBatch:
    """One rank's rollouts of one iteration, ready for the update."""

    prompts: list[str]
    prompt_ids: np.ndarray
    global_index: np.ndarray
    x: torch.Tensor  # (n, S, ...) latents before each trained step
    next_x: torch.Tensor  # (n, S, ...)
    logp_old: torch.Tensor  # (n, S)
    steps: torch.Tensor  # (S,) step indices
    plan: object
    rewards: np.ndarray = field(default=None)
    per_reward: dict = field(default_factory=dict)
    reward_info: dict = field(default_factory=dict)
    preview: torch.Tensor | None = None  # decoded images of the first rollout batch (for grids)


def _device_for(cfg_trainer) -> str:
    want = str(cfg_trainer.get("device", "auto"))
    if want == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu")
    return want


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: Path):
        from accelerate import Accelerator

        self.cfg = cfg
        self.run_dir = Path(run_dir)
        tcfg = cfg.trainer
        device = _device_for(tcfg)
        mp = str(tcfg.get("mixed_precision", "no"))
        if mp not in ("no", "fp16", "bf16"):
            raise ConfigError(f"trainer.mixed_precision='{mp}' is not known; use no, bf16 or fp16")
        if mp == "fp16" and device == "cpu":
            raise ConfigError("fp16 mixed precision needs a GPU; use trainer.mixed_precision=bf16 or no on CPU")
        self.accelerator = Accelerator(mixed_precision=mp, cpu=device == "cpu")
        acc = self.accelerator
        self.rank, self.world = acc.process_index, acc.num_processes
        self.is_main = acc.is_main_process
        self.device = acc.device if device != "cpu" else torch.device("cpu")

        # ---- everything that can be checked without a model ----
        self.seed = int(cfg.seed)
        self.train_prompts = PromptSet.load(cfg.data.train, "data.train")
        self.eval_prompts = PromptSet.load(cfg.data.eval, "data.eval") if cfg.data.get("eval") else None
        self.algorithm = build_algorithm(cfg)
        self.planner = build_planner(cfg)
        self.layout = validate_batch_arithmetic(cfg, self.world, num_prompts=len(self.train_prompts))
        self.sampler = KRepeatPromptSampler(
            num_prompts=len(self.train_prompts), groups_per_iteration=int(cfg.data.groups_per_iteration),
            group_size=int(self.algorithm.group_size), world_size=self.world, rank=self.rank, seed=self.seed,
        )
        self.reward = WeightedReward.from_config(as_dict(cfg.reward))
        schedules = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
        if str(tcfg.get("lr_schedule", "constant")) not in schedules:
            raise ConfigError(f"trainer.lr_schedule='{tcfg.lr_schedule}' is not known; use one of {', '.join(schedules)}")
        self.resume_from = ckpt.resolve_resume(cfg.get("resume"), self.run_dir)
        if self.resume_from is None and cfg.get("resume") in (None, "", "none") and \
                ckpt.latest_checkpoint(self.run_dir / "checkpoints") is not None:
            raise CheckpointError(f"{self.run_dir} already holds checkpoints; pass resume=auto to continue it "
                                  f"or choose another run_dir")

        # ---- models ----
        torch.manual_seed(self.seed)
        self.backbone = build_backbone(cfg, self.device)
        self.transformer = self.backbone.transformer
        self.finetune = str(tcfg.finetune)
        self.trainable_names = setup_trainable(self.backbone, self.finetune, as_dict(tcfg.get("lora")))
        self.params = named_trainable(self.transformer, self.trainable_names)
        if tcfg.get("gradient_checkpointing"):
            self.transformer.enable_gradient_checkpointing()
        self.ref_transformer = None
        if self.algorithm.needs_reference and self.finetune == "full":
            import copy

            self.ref_transformer = copy.deepcopy(self.transformer).requires_grad_(False).eval()

        opt = as_dict(tcfg.optimizer)
        self.optimizer = torch.optim.AdamW(
            self.params, lr=float(self.algorithm.lr), betas=tuple(opt.get("betas", (0.9, 0.999))),
            weight_decay=float(opt.get("weight_decay", 1e-4)), eps=float(opt.get("eps", 1e-8)),
        )
        from diffusers.optimization import get_scheduler

        self.max_steps = int(tcfg.max_steps)
        updates = self.layout["updates_per_iteration"] * int(tcfg.get("inner_epochs", 1))
        self.lr_scheduler = get_scheduler(
            str(tcfg.get("lr_schedule", "constant")), optimizer=self.optimizer,
            num_warmup_steps=int(tcfg.get("warmup_steps", 0)), num_training_steps=self.max_steps * updates,
        )
        self.optimizer = acc.prepare_optimizer(self.optimizer)  # fp16 loss scaling when asked
        ema_cfg = as_dict(tcfg.get("ema"))
        self.ema = EMA(self.params, float(ema_cfg.get("decay", 0.9)), int(ema_cfg.get("update_every", 8))) \
            if ema_cfg.get("enabled", True) else None

        self.reward_runner = AsyncRewardRunner(self.reward, int(tcfg.get("reward_workers", 1)))
        self.iteration = 0
        self.optimizer_steps = 0
        self.train_seconds = 0.0  # wall-clock of training iterations (evaluation and saving excluded)
        self.stop_signal: int | None = None
        if self.resume_from is not None:
            self._load(self.resume_from)

    # ------------------------------------------------------------------ helpers
    def autocast(self):
        return self.accelerator.autocast() if self.accelerator.mixed_precision != "no" else nullcontext()

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(t) if self.world > 1 else t

    def _all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t

    def _agreed_max(self, value: float) -> float:
        """The largest of the ranks' values, so decisions taken on it (time budgets) agree everywhere."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return float(t.item())

    def _iteration_generator(self, *salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(hash((self.seed, self.iteration) + salt) & 0x7FFF_FFFF)

    # ------------------------------------------------------------------ rollout
    @torch.no_grad()
    def collect(self) -> IterationBatch:
        slots = self.sampler.rank_slots(self.iteration)
        bs = self.layout["rollout_batch_size"]
        plan_gen = self._iteration_generator(1)  # same on every rank: plans agree across ranks
        self.transformer.eval()
        parts, futures = [], []
        plan0 = None
        for start in range(0, len(slots), bs):
            chunk = slots[start:start + bs]
            prompts = [self.train_prompts.prompts[s.prompt_id] for s in chunk]
            meta = [self.train_prompts.metadata[s.prompt_id] for s in chunk]
            cond = self.backbone.encode_prompts(prompts)
            plan = self.planner.plan(plan_gen)
            if plan0 is None:
                plan0 = plan
            elif plan.trained_steps != plan0.trained_steps:
                raise NotImplementedError("plans whose trained steps vary within an iteration need per-batch updates")
            gens = sample_generators(self.seed, self.iteration, [s.global_index for s in chunk], self.device)
            with self.autocast():
                out = rollout(self.backbone, plan, cond, gens)
            images = self.backbone.decode(out.final)
            futures.append(self.reward_runner.submit(images, prompts, meta))  # scored while the next batch samples
            parts.append((out.stacked(), images if start == 0 else None))
            if start + bs < len(slots) and self._stop_agreed():
                raise _StopNow
        self._sync()
        t_wait = time.perf_counter()
        results = [f.result() for f in futures]  # RewardError propagates with the reward's name
        self.timing["reward_wait"] = time.perf_counter() - t_wait
        stacked = [p[0] for p in parts]
        batch = IterationBatch(
            prompts=[self.train_prompts.prompts[s.prompt_id] for s in slots],
            prompt_ids=np.array([s.prompt_id for s in slots]),
            global_index=np.array([s.global_index for s in slots]),
            x=torch.cat([s["x"] for s in stacked]), next_x=torch.cat([s["next_x"] for s in stacked]),
            logp_old=torch.cat([s["logp_old"] for s in stacked]), steps=stacked[0]["steps"], plan=plan0,
            preview=parts[0][1],
        )
        batch.rewards = np.concatenate([r[0] for r in results])
        names = results[0][1].get("per_reward", {}).keys()
        batch.per_reward = {n: np.concatenate([r[1]["per_reward"][n] for r in results]) for n in names}
        for r in results:
            for k, v in r[1].items():
                if k != "per_reward" and isinstance(v, (int, float)):
                    batch.reward_info.setdefault(k, []).append(float(v))
        return batch

    # ------------------------------------------------------------------ advantages
    def advantages(self, batch: IterationBatch):
        local = torch.tensor(np.stack([batch.rewards, batch.prompt_ids, batch.global_index], axis=1),
                             dtype=torch.float64, device=self.device)
        full = self._gather(local).cpu().numpy()
        per_reward = {}
        for name, arr in batch.per_reward.items():
            per_reward[name] = self._gather(torch.from_numpy(arr).to(self.device)).cpu().numpy()
        result = self.algorithm.advantages(full[:, 0], full[:, 1].astype(np.int64))
        n = len(batch.prompts)
        mine = slice(self.rank * n, (self.rank + 1) * n)
        assert np.array_equal(full[mine, 2], batch.global_index), "gathered order must follow rank order"
        finite = full[np.isfinite(full[:, 0]), 0]
        stats = {
            "reward_mean": float(finite.mean()) if finite.size else float("nan"),
            "reward_std": float(finite.std()) if finite.size else float("nan"),
            **result.stats,
        }
        for name, arr in per_reward.items():
            ok = arr[np.isfinite(arr)]
            stats[f"reward/{name}_mean"] = float(ok.mean()) if ok.size else float("nan")
            stats[f"reward/{name}_std"] = float(ok.std()) if ok.size else float("nan")
        return result.advantages[mine], result.keep[mine], stats

    # ------------------------------------------------------------------ update
    def update(self, batch: IterationBatch, adv: np.ndarray, keep: np.ndarray) -> dict:
        tcfg = self.cfg.trainer
        self.transformer.train()
        schedule = self.backbone.make_schedule(batch.plan.num_steps)
        specs = [batch.plan.steps[int(j)] for j in batch.steps]
        num_steps = len(specs)
        adv_t = torch.as_tensor(adv, dtype=torch.float32, device=self.device)
        keep_t = torch.as_tensor(keep, device=self.device)
        mb_size = self.layout["train_batch_size"]
        updates = self.layout["updates_per_iteration"]
        sums = {k: 0.0 for k in self.algorithm.diagnostics}
        count = 0
        grad_norms = []
        ratio_dev_before_update = 0.0  # on-policy check: the first update's ratios must all be 1
        for epoch in range(int(tcfg.get("inner_epochs", 1))):
            for chunk_index, chunk in enumerate(self._update_chunks(batch.global_index, updates, epoch)):
                first_update = epoch == 0 and chunk_index == 0
                kept = chunk[keep_t[chunk].cpu()]
                global_kept = int(self._all_reduce_sum(torch.tensor([len(kept)], device=self.device)).item())
                if global_kept == 0:
                    continue  # every rank agrees: nothing to learn from this chunk
                denom = global_kept * sum(s.loss_weight for s in specs)
                for mb in (kept.split(mb_size) if len(kept) else ()):
                    mb_dev = mb.to(self.device)
                    cond = self.backbone.encode_prompts([batch.prompts[i] for i in mb.tolist()])
                    for k, spec in enumerate(specs):
                        j = int(batch.steps[k])
                        x = batch.x[mb_dev, k]
                        with self.autocast():
                            v = self.backbone.predict(x, schedule.timesteps[j], cond, batch.plan.guidance_scale)
                        policy = apply_step(self.backbone, spec, schedule, j, x, v, next_x=batch.next_x[mb_dev, k])
                        reference = None
                        if self.algorithm.needs_reference:
                            reference = self._reference_step(spec, schedule, j, x, cond, batch, mb_dev, k)
                        loss_vec, diag = self.algorithm.step_loss(
                            policy, batch.logp_old[mb_dev, k], adv_t[mb_dev], reference,
                            dt=schedule.sigmas[j + 1] - schedule.sigmas[j],
                        )
                        self.accelerator.backward(loss_vec.sum() * (spec.loss_weight / denom))
                        if first_update and "ratio" in diag:
                            dev = float((diag["ratio"] - 1).abs().max()) if len(mb) else 0.0
                            ratio_dev_before_update = max(ratio_dev_before_update, dev)
                        for key in self.algorithm.diagnostics:
                            sums[key] += float(diag[key].float().sum())
                        count += len(mb)
                grad_norms.append(self._optimizer_step(float(tcfg.get("max_grad_norm", 1.0))))
        keys = list(self.algorithm.diagnostics)  # the same keys on every rank, even one with no samples
        totals = self._all_reduce_sum(torch.tensor([count] + [sums[k] for k in keys], dtype=torch.float64,
                                                   device=self.device)).tolist()
        out = {k: v / max(totals[0], 1) for k, v in zip(keys, totals[1:])}  # averaged over all ranks
        if self.world > 1:
            dev = torch.tensor([ratio_dev_before_update], device=self.device)
            torch.distributed.all_reduce(dev, op=torch.distributed.ReduceOp.MAX)
            ratio_dev_before_update = float(dev.item())
        if "ratio" in out:
            out["ratio_mean"] = out.pop("ratio")
        out["ratio_dev_before_update"] = ratio_dev_before_update
        out["grad_norm"] = float(np.mean(grad_norms)) if grad_norms else 0.0
        out["lr"] = self.lr_scheduler.get_last_lr()[0]
        out["optimizer_steps"] = self.optimizer_steps
        return out

    def _update_chunks(self, global_index: np.ndarray, updates: int, epoch: int) -> list[torch.Tensor]:
        """This rank's local sample indices for each optimizer step of an epoch.

        The split is made over the iteration's *global* batch with a generator every rank shares, so
        each optimizer step sees the same samples whatever the number of processes.
        """
        total = self.sampler.samples_per_iteration
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

    @torch.no_grad()
    def _reference_step(self, spec, schedule, j, x, cond, batch, mb_dev, k):
        ref_model = self.ref_transformer
        ctx = reference_context(self.transformer, self.finetune) if ref_model is None else nullcontext()
        with ctx, self.autocast():
            v_ref = self.backbone.predict(x, schedule.timesteps[j], cond, batch.plan.guidance_scale,
                                          transformer=ref_model)
        return apply_step(self.backbone, spec, schedule, j, x, v_ref, next_x=batch.next_x[mb_dev, k])

    def _optimizer_step(self, max_norm: float) -> float:
        if self.world > 1:  # sum of per-rank partial sums = the global mean over the chunk
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
            flat = torch.cat([g.reshape(-1) for g in grads])
            torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
            offset = 0
            for p, g in zip(self.params, grads):
                p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
                offset += g.numel()
        norm = self.accelerator.clip_grad_norm_(self.params, max_norm) if max_norm > 0 else torch.tensor(0.0)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_steps += 1
        if self.ema is not None:
            self.ema.step()
        return float(norm)

    # ------------------------------------------------------------------ main loop
    def train(self) -> str:
        """Run to ``trainer.max_steps`` iterations. Returns 'finished' or 'preempted'."""
        tcfg = self.cfg.trainer
        resolved = OmegaConf.to_container(self.cfg, resolve=True)
        self.logger = MetricsLogger(self.run_dir, as_dict(self.cfg.logger), resolved, self.is_main,
                                    self.max_steps, self.iteration, self.run_dir.name)
        self.evaluator = self._make_evaluator()
        if self.is_main and self.stop_file.exists():
            self.stop_file.unlink()  # a stop request of an earlier (now resumed) process
        self.accelerator.wait_for_everyone()
        self._install_signal_handlers()
        self._write_status("running")
        if self.is_main:
            self.logger.write(
                f"alignrl: {self.backbone.describe()}; {len(self.trainable_names)} trainable tensors "
                f"({sum(p.numel() for p in self.params) / 1e6:.3f}M params, {self.finetune}); "
                f"{self.world} process(es); run dir {self.run_dir}"
                + (f"; resumed from {self.resume_from}" if self.resume_from else "")
            )
        every = lambda key: int(tcfg.get(key, 0) or 0)  # noqa: E731
        budget_s = 60 * float(tcfg.get("max_minutes") or 0)  # training wall-clock, evaluation excluded
        eval_every_s = 60 * float(tcfg.get("eval_every_minutes") or 0)
        state = "finished"
        try:
            if self.evaluator and tcfg.get("eval_at_start") and self.iteration == 0:
                self.logger.log(0, {"train_seconds": 0.0, **self.evaluate(0)})
            while self.iteration < self.max_steps and not (budget_s and self.train_seconds >= budget_s):
                try:
                    metrics = self.run_iteration()
                except _StopNow:
                    metrics = None  # the iteration was abandoned before any update: state is unchanged
                if metrics is not None:
                    before = self.train_seconds
                    self.train_seconds = self._agreed_max(self.train_seconds + metrics["time/iteration"])
                    metrics["train_seconds"] = self.train_seconds
                    self.iteration += 1
                    step = self.iteration
                    images = {}
                    if self.is_main and every("log_images_every") and step % every("log_images_every") == 0:
                        images["rollouts"] = self._save_rollout_grid(step)
                    timed_eval = eval_every_s and int(self.train_seconds // eval_every_s) > int(before // eval_every_s)
                    if self.evaluator and ((every("eval_every") and step % every("eval_every") == 0) or timed_eval):
                        metrics.update(self.evaluate(step))
                    self.logger.log(step, metrics, images)
                    self.logger.progress(step, metrics)
                    if every("checkpoint_every") and step % every("checkpoint_every") == 0:
                        self.save_checkpoint()
                if metrics is None or self._stop_agreed():
                    if not ckpt.is_checkpoint(self._step_dir()):
                        self.save_checkpoint()
                    self.logger.write(f"alignrl: stop requested ({self._stop_reason()}); checkpoint saved at step "
                                      f"{self.iteration}, exiting (continue with resume=auto run_dir={self.run_dir})")
                    state = "preempted"
                    break
            if state == "finished":
                last_logged_eval = (every("eval_every") and self.iteration % every("eval_every") == 0)
                if self.evaluator and (every("eval_every") or eval_every_s) and not last_logged_eval:
                    self.logger.log(self.iteration, {"train_seconds": self.train_seconds,
                                                     **self.evaluate(self.iteration)})
                if not ckpt.is_checkpoint(self._step_dir()):
                    self.save_checkpoint()
        except BaseException:
            self._write_status("failed")
            raise
        finally:
            self.reward_runner.close()
            self.logger.close()
        self._write_status(state)
        return state

    def run_iteration(self) -> dict:
        """One rollout + update round. Raises ``_StopNow`` (before any update) when a stop is requested."""
        self.timing = {}
        t0 = time.perf_counter()
        failure = None
        try:
            batch = self.collect()
        except _StopNow:
            raise  # raised on every rank at the same point (the stop check is collective)
        except Exception as e:  # noqa: BLE001  every rank must learn of it, or the others hang in the gather
            failure = e
        self._raise_if_any_failed(failure)
        if self._stop_agreed():
            raise _StopNow
        self._sync()
        t1 = time.perf_counter()
        adv, keep, stats = self.advantages(batch)
        t2 = time.perf_counter()
        self._last_batch = batch
        upd = self.update(batch, adv, keep)
        self._sync()
        t3 = time.perf_counter()
        reward_wait = self.timing.get("reward_wait", 0.0)
        metrics = {**stats, **upd}
        for k, v in batch.reward_info.items():
            metrics[f"reward/{k}"] = float(np.mean(v))
        metrics.update({
            "time/rollout": t1 - t0 - reward_wait, "time/reward_wait": reward_wait,
            "time/advantage": t2 - t1, "time/update": t3 - t2, "time/iteration": t3 - t0,
            "iteration": self.iteration,
        })
        self._last_rewards = batch.rewards
        return metrics

    def _save_rollout_grid(self, step: int) -> Path:
        batch = self._last_batch
        imgs = batch.preview[:16].cpu()
        caps = [f"{r:.3g} {p}" for p, r in zip(batch.prompts, batch.rewards)]  # score first: cells are narrow
        return save_grid(self.run_dir / "samples" / f"step_{step:06d}.png", imgs, caps[: len(imgs)])

    # ------------------------------------------------------------------ eval
    def _make_evaluator(self):
        if self.eval_prompts is None:
            return None
        ecfg = as_dict(self.cfg.get("eval"))
        return Evaluator(
            self.backbone, self.planner.eval_plan(), self.eval_prompts, self.reward, seed=self.seed,
            batch_size=int(ecfg.get("batch_size", self.layout["rollout_batch_size"])),
            num_prompts=ecfg.get("num_prompts"), images_per_prompt=int(ecfg.get("images_per_prompt", 1)),
            rank=self.rank, world_size=self.world, gather=self._gather, autocast=self.autocast,
        )

    def evaluate(self, step: int) -> dict:
        self.transformer.eval()
        ctx = self.ema.swapped() if self.ema is not None else nullcontext()
        with ctx:
            result = self.evaluator.run()
        if self.is_main and result.images is not None:
            k = min(16, len(result.images))
            save_grid(self.run_dir / "eval" / f"step_{step:06d}.png", result.images[:k], result.captions[:k])
            (self.run_dir / "eval" / f"step_{step:06d}.json").write_text(json.dumps(result.metrics, indent=2))
        return result.metrics

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> None:
        writer = ckpt.CheckpointWriter(self.run_dir, int(self.cfg.trainer.get("keep_checkpoints", 3)))
        step = self.iteration
        if self.is_main:
            writer.begin(step)
        self.accelerator.wait_for_everyone()
        writer.write_rank_rng(step, self.rank)
        self.accelerator.wait_for_everyone()
        if self.is_main:
            tmp = writer.tmp_dir(step)
            save_file({n: p.detach().cpu().contiguous() for n, p in zip(self.trainable_names, self.params)},
                      str(tmp / "trainable.safetensors"))
            if self.ema is not None:
                save_file({k: v.cpu() for k, v in self.ema.state_tensors(self.trainable_names).items()},
                          str(tmp / "ema.safetensors"))
            torch.save(self.optimizer.optimizer.state_dict() if hasattr(self.optimizer, "optimizer")
                       else self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
            if self.finetune == "lora":
                self.export_lora(tmp / "lora")
            state = {
                "iteration": step, "optimizer_steps": self.optimizer_steps, "world_size": self.world,
                "train_seconds": self.train_seconds,
                "finetune": self.finetune, "trainable": len(self.trainable_names),
                "sampler": self.sampler.state_dict(), "planner": self.planner.state_dict(),
                "algorithm": self.algorithm.state_dict(),
                "ema": self.ema.counters() if self.ema is not None else None,
                "backbone": self.backbone.family, "seed": self.seed,
            }
            (tmp / "state.json").write_text(json.dumps(state, indent=2))
            writer.commit(step)
        self.accelerator.wait_for_everyone()

    def export_lora(self, directory: Path) -> None:
        """Write the adapter (EMA weights when EMA is on) in diffusers' LoRA format."""
        ctx = self.ema.swapped() if self.ema is not None else nullcontext()
        with ctx:
            state, meta = lora_export(self.transformer)
        self.backbone.save_lora(str(directory), state, meta)

    def _load(self, path: Path) -> None:
        state = ckpt.load_json(path / "state.json")
        if state.get("finetune") != self.finetune:
            raise CheckpointError(f"{path} was trained with finetune={state.get('finetune')}, "
                                  f"this config says {self.finetune}")
        load_trainable_file(self.transformer, self.trainable_names, path / "trainable.safetensors")
        if self.ema is not None and (path / "ema.safetensors").is_file():
            from safetensors.torch import load_file

            self.ema.load_state_tensors(self.trainable_names, load_file(str(path / "ema.safetensors")))
            self.ema.load_counters(state["ema"])
        inner = self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer
        inner.load_state_dict(ckpt.torch_load_trusted(path / "optimizer.pt"))
        self.lr_scheduler.load_state_dict(ckpt.torch_load_trusted(path / "lr_scheduler.pt"))
        self.sampler.load_state_dict(state["sampler"])
        self.planner.load_state_dict(state.get("planner", {}))
        self.algorithm.load_state_dict(state.get("algorithm", {}))
        rng_file = path / "rng" / f"rank_{self.rank}.pt"
        if rng_file.is_file():
            ckpt.set_rng_state(ckpt.torch_load_trusted(rng_file))
        self.iteration = int(state["iteration"])
        self.optimizer_steps = int(state["optimizer_steps"])
        self.train_seconds = float(state.get("train_seconds", 0.0))

    # ------------------------------------------------------------------ signals and status
    def _install_signal_handlers(self) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            self.stop_signal = signum

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, handler)

    @property
    def stop_file(self) -> Path:
        """Creating this file asks the run to checkpoint and exit, like SIGTERM (the launcher uses it)."""
        return self.run_dir / "STOP"

    def _stop_agreed(self) -> bool:
        """True on every rank when any rank was signalled or the stop file exists."""
        local = self.stop_signal is not None or self.stop_file.exists()
        flag = torch.tensor([1 if local else 0], device=self.device)
        if self.world > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def _stop_reason(self) -> str:
        if self.stop_signal is not None:
            return f"signal {signal.Signals(self.stop_signal).name}"
        return f"{self.stop_file.name} file" if self.stop_file.exists() else "another process"

    def _raise_if_any_failed(self, failure: Exception | None) -> None:
        flag = torch.tensor([0 if failure is None else 1], device=self.device)
        if self.world > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if failure is not None:
            raise failure
        if flag.item():
            raise AlignError("another process failed during the rollout (its error is printed above); stopping")

    def _step_dir(self) -> Path:
        return self.run_dir / "checkpoints" / ckpt.step_dir_name(self.iteration)

    def _write_status(self, state: str) -> None:
        if not self.is_main:
            return
        status = {"state": state, "step": self.iteration, "max_steps": self.max_steps, "pid": os.getpid(),
                  "updated": time.strftime("%Y-%m-%dT%H:%M:%S"), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
        ckpt.atomic_write_text(self.run_dir / "status.json", json.dumps(status, indent=2))
