"""SPO, step-aware preference optimisation (arXiv 2406.04314): preferences between single denoising steps.

The method samples its prompt slots itself (``batch_kind: prompts``). Along each trajectory (DDIM with eta 1, CFG),
at every step from ``divert_start_step`` on, ``candidates`` next latents are drawn from the same latent (each with
its own noise). Each candidate is scored by the preference model on its decoded x0 prediction at the next step (the
final step: the decoded image itself); the best and the worst form a pair when the two-way softmax of their scores
separates them by more than ``threshold`` (``softmax(s_best, s_worst)[0] - [1] = tanh((s_best - s_worst) / 2)``),
and the trajectory continues from a random candidate, not the best. Each kept pair trains

    loss = -log sigmoid(beta (log r_w - log r_l)),   r = clamp(p_theta(x_{t-1} | x_t) / p_ref(x_{t-1} | x_t), 1 +- eps)

with DDPO's per-dimension-mean DDIM log-probs (CFG in the training forward) against the frozen initial model.

The preference model is the recipe's reward (``reward=``) applied to the decoded x0 predictions: a step-aware
model is one that reads the step from each image's metadata (``spo_step``, ``spo_sigma``, ``spo_timestep``: the
model timestep at which the x0 prediction is made, 0 for the final image); ``reward=step_aware_pickscore`` is the
reference's step-aware PickScore (its checkpoints, trained on noised Pick-a-Pic pairs). ``score_scale`` puts the
reward on the logit scale the threshold is defined on (the reference: ``logit_scale.exp() * cos``, about 100x the
cosine).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from alignrl.algorithms.base import PromptBatch, StepContext, Stateless, balanced_passes
from alignrl.algorithms.d3po import clamped_log_ratio
from alignrl.algorithms.preference import padding_errors
from alignrl.errors import ConfigError
from alignrl.sampling.engine import apply_step, sample_generators
from alignrl.sampling.kernels import ddim_step
from alignrl.sampling.plans import StepSpec


@dataclass
class StepPairs:
    """The pairs one update trains on: the shared latent, the winner's and loser's next latents, the step, the row."""

    x: torch.Tensor
    winner: torch.Tensor
    loser: torch.Tensor
    step: torch.Tensor
    row: torch.Tensor
    gap: torch.Tensor  # the kept pairs' softmax separation
    final_rewards: np.ndarray | None = None  # each trajectory's final image's reward (the one it continued with)

    def __len__(self) -> int:
        return len(self.step)


@dataclass
class SPO(Stateless):
    name: str = "spo"
    group_size: int = 1  # one trajectory per prompt slot
    lr: float = 6e-5
    beta: float = 10.0
    eps: float = 0.1  # the ratio's clamp band
    num_steps: int = 20
    eta: float = 1.0  # DDIM's eta for every step
    guidance_scale: float = 5.0
    candidates: int = 4  # next latents drawn per step
    threshold: float = 0.3  # keep a pair when tanh((s_best - s_worst) / 2) > threshold
    divert_start_step: int = 4  # steps before this one are neither branched nor trained
    score_scale: float = 1.0  # multiplies the reward before the threshold rule

    batch_kind: ClassVar[str] = "prompts"
    supports_sharding = True  # train_step balances its pair passes over processes (distributed=fsdp)
    differentiates_reward: ClassVar[bool] = False  # the reward only ranks candidates
    _diag_keys: ClassVar[tuple] = ("policy_loss", "log_ratio", "clipfrac", "score_gap")

    def __post_init__(self):
        checks = [(self.lr > 0, f"algorithm.lr must be > 0, got {self.lr}"),
                  (self.beta > 0, f"algorithm.beta must be > 0, got {self.beta}"),
                  (0 < self.eps < 1, f"algorithm.eps must be in (0, 1), got {self.eps}"),
                  (self.eta > 0, f"algorithm.eta must be > 0 (candidates differ by their step noise), got {self.eta}"),
                  (self.candidates >= 2, f"algorithm.candidates must be >= 2, got {self.candidates}"),
                  (0 <= self.threshold < 1, f"algorithm.threshold must be in [0, 1), got {self.threshold}"),
                  (0 <= self.divert_start_step < self.num_steps,
                   f"algorithm.divert_start_step={self.divert_start_step} must be in [0, num_steps={self.num_steps})")]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @property
    def needs_reference(self) -> bool:
        return True

    def advantages(self, rewards, keys, per_reward=None, weights=None):
        raise ConfigError("SPO samples and ranks its own candidates; it has no group advantages")

    # ----- sampling the pairs ----------------------------------------------------------------------------
    @torch.no_grad()
    def collect_pairs(self, ctx: StepContext, batch: PromptBatch, rows: torch.Tensor, schedule) -> StepPairs:
        """Sample ``rows``' trajectories with candidates at every trained step; return the kept pairs."""
        backbone, k, T = ctx.backbone, self.candidates, self.num_steps
        n = len(rows)
        prompts = [batch.prompts[int(r)] for r in rows]
        meta = [batch.metadata[int(r)] for r in rows]
        cond = backbone.encode_prompts(prompts)
        cond_k = cond.index(torch.arange(n, device=ctx.device).repeat_interleave(k))
        x = backbone.to_frame(batch.initial_noise(ctx, rows), schedule.sigmas[0])
        shape = tuple(x.shape[1:])
        noise = batch.extra_noise(ctx, rows, T * k, shape).view(n, T, k, *shape)
        picks = sample_generators(ctx.seed * 17 + 11, ctx.iteration, [int(batch.global_index[int(r)]) for r in rows])
        kept = {"x": [], "winner": [], "loser": [], "step": [], "row": [], "gap": []}
        for j in range(T):
            s, s_next = schedule.sigmas[j], schedule.sigmas[j + 1]
            with ctx.autocast():
                v = backbone.predict(x, schedule.timesteps[j], cond, self.guidance_scale)
            if j < self.divert_start_step:
                x = ddim_step(x, v, s, s_next, noise_level=self.eta, noise=noise[:, j, 0]).next_x
                continue
            cand = torch.stack([ddim_step(x, v, s, s_next, noise_level=self.eta, noise=noise[:, j, c]).next_x
                                for c in range(k)], dim=1)  # (n, k, ...)
            flat = cand.flatten(0, 1)
            if j + 1 < T:  # the x0 prediction one step later, decoded
                with ctx.autocast():
                    v_next = backbone.predict(flat, schedule.timesteps[j + 1], cond_k, self.guidance_scale)
                images = backbone.decode(backbone.parameterisation.to_x0(flat, v_next.float(), s_next))
            else:
                images = backbone.decode(backbone.from_frame(flat, schedule.sigmas[T]))
            # the step-aware model's time: the model timestep at which the x0 prediction is made (0: the image)
            t_score = float(schedule.timesteps[j + 1]) if j + 1 < T else 0.0
            step_meta = [{**m, "spo_step": j, "spo_sigma": float(s), "spo_timestep": t_score}
                         for m in meta for _ in range(k)]
            scores = np.asarray(ctx.reward(images, [p for p in prompts for _ in range(k)], step_meta),
                                dtype=np.float64).reshape(n, k) * self.score_scale
            for r in range(n):
                row = scores[r]
                if not np.isfinite(row).all():
                    continue
                best, worst = int(np.argmax(row)), int(np.argmin(row))
                gap = math.tanh((row[best] - row[worst]) / 2)
                if best != worst and gap > self.threshold:
                    kept["x"].append(x[r])
                    kept["winner"].append(cand[r, best])
                    kept["loser"].append(cand[r, worst])
                    kept["step"].append(j)
                    kept["row"].append(int(rows[r]))
                    kept["gap"].append(gap)
            choice = torch.tensor([int(torch.randint(k, (1,), generator=g)) for g in picks], device=cand.device)
            x = cand[torch.arange(n, device=cand.device), choice]
            if j == T - 1:
                final = scores[np.arange(n), choice.cpu().numpy()] / self.score_scale
        if not kept["step"]:
            empty = x.new_zeros((0, *shape))
            return StepPairs(empty, empty, empty, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                             torch.zeros(0), final)
        return StepPairs(torch.stack(kept["x"]), torch.stack(kept["winner"]), torch.stack(kept["loser"]),
                         torch.tensor(kept["step"]), torch.tensor(kept["row"]), torch.tensor(kept["gap"]), final)

    # ----- the update --------------------------------------------------------------------------------------
    def pair_loss(self, ctx: StepContext, batch: PromptBatch, pairs: StepPairs, idx: torch.Tensor, schedule):
        """Per-pair losses (with gradient) and diagnostics of the pairs ``idx``."""
        backbone = ctx.backbone
        spec = StepSpec(kind="ddim", noise_level=self.eta)
        x = torch.cat([pairs.x[idx], pairs.x[idx]])
        nxt = torch.cat([pairs.winner[idx], pairs.loser[idx]])
        step = torch.cat([pairs.step[idx], pairs.step[idx]]).to(ctx.device)
        prompts = [batch.prompts[int(r)] for r in pairs.row[idx]] * 2
        cond = backbone.encode_prompts(prompts)
        timestep = schedule.timesteps[step]
        with ctx.autocast():
            v = backbone.predict(x, timestep, cond, self.guidance_scale)
        policy = apply_step(backbone, spec, schedule, step, x, v, next_x=nxt)
        v_ref = ctx.predict_reference(x, timestep, cond, self.guidance_scale)
        with torch.no_grad():
            reference = apply_step(backbone, spec, schedule, step, x, v_ref, next_x=nxt)
        raw = policy.logp_mean_per_dim - reference.logp_mean_per_dim
        log_r, outside = clamped_log_ratio(raw, self.eps)
        lw, ll = log_r.chunk(2)
        loss = -F.logsigmoid(self.beta * (lw - ll))
        diag = {"policy_loss": loss.detach(), "log_ratio": raw.detach().view(2, -1).mean(0),
                "clipfrac": outside.float().view(2, -1).mean(0), "score_gap": pairs.gap[idx].to(loss.device)}
        return loss, diag

    def train_step(self, batch: PromptBatch, adv, ctx: StepContext) -> dict:
        if ctx.reward is None:
            raise ValueError("SPO needs the loop's reward (ctx.reward) to rank its candidates")
        schedule = ctx.backbone.make_schedule(self.num_steps)
        sums = {k: 0.0 for k in self.diagnostics}
        count, grad_norms, pairs_seen, rows_seen = 0, [], 0, 0
        moments = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # count, sum, sum of squares of rewards
        for epoch in range(ctx.inner_epochs):
            for chunk in ctx.update_chunks(batch.global_index, epoch):
                ctx.denoiser.eval()
                pairs = self.collect_pairs(ctx, batch, chunk, schedule)
                total = float(ctx.all_reduce_sum(torch.tensor([float(len(pairs))], dtype=torch.float64,
                                                              device=ctx.device)).item())
                pairs_seen += len(pairs)
                rows_seen += len(chunk)
                ok = pairs.final_rewards[np.isfinite(pairs.final_rewards)]
                moments += torch.tensor([len(ok), ok.sum(), (ok ** 2).sum()], dtype=torch.float64, device=ctx.device)
                if total == 0:
                    continue  # every rank agrees: no pair passed the threshold in this chunk
                ctx.denoiser.train()
                idxs = [torch.arange(m, min(m + ctx.train_batch_size, len(pairs)))
                        for m in range(0, len(pairs), ctx.train_batch_size)]
                for idx, real in balanced_passes(idxs, ctx, None):
                    if not real:  # distributed=fsdp: another process has more pairs (a policy and a reference
                        # forward on a blank input at zero loss, as a pair's pass makes)
                        ctx.backward(padding_errors(ctx, schedule, tuple(pairs.x.shape[1:]), True).sum() * 0.0)
                        continue
                    loss, diag = self.pair_loss(ctx, batch, pairs, idx, schedule)
                    ctx.backward(loss.sum() / total)
                    for key in self.diagnostics:
                        sums[key] += float(diag[key].float().sum())
                    count += len(idx)
                grad_norms.append(ctx.optimizer_step())
        out = ctx.summarise(sums, count, 0.0, grad_norms)
        n, total_r, total_sq = ctx.all_reduce_sum(moments).tolist()
        out["reward_mean"] = total_r / n if n else float("nan")  # the sampled trajectories' final rewards
        out["reward_std"] = float(np.sqrt(max(total_sq / n - out["reward_mean"] ** 2, 0.0))) if n else float("nan")
        trained_steps = self.num_steps - self.divert_start_step
        out["pairs_per_step"] = pairs_seen / max(rows_seen * trained_steps, 1)  # this rank's share kept
        return out
