"""DPOK (arXiv 2305.16381): off-policy policy gradient from a replay buffer of denoising steps, a learned value
baseline and a KL penalty to the pretrained model.

Each iteration's trained transitions (latent, next latent, the sampling policy's step log-prob, schedule step,
prompt and the image's final reward) join a first-in first-out buffer of ``buffer_size`` transitions, kept per
process. Then:

- the value function V(x_t, prompt, step) takes one optimizer step on ``value_steps`` minibatches of
  ``value_batch_size`` buffer transitions (MSE to the final reward, gradients accumulated);
- the policy takes ``trainer.updates_per_iteration`` optimizer steps, each accumulating ``grad_accumulation``
  micro-batches of ``trainer.train_batch_size`` random buffer transitions:

      ratio = clamp(exp(logp_theta(x_{t-1} | x_t) - logp_stored), 1 - ratio_clip, 1 + ratio_clip)
      loss  = -reward_weight * (r - V(x_t)) * ratio + kl_weight * mean((eps_theta^cfg - eps_ref^cfg)^2)

  (the clamp is hard: no gradient outside the band; advantages are not normalised; the KL term is the squared
  difference of the CFG-combined noise predictions of the policy and the frozen pretrained model, which in the
  flow frame is ``(1 - t)^2 (v_theta - v_ref)^2``).

The value network is ours (the reference's exact layers are not reproduced): two strided convolutions over the
latent, mean-pooled, beside the prompt's mean text embedding and a learned step embedding, into an MLP. The buffer,
the value network and its optimizer are part of the checkpoint (per process), so a resumed run continues exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
import torch.nn as nn

from alignrl.algorithms.advantages import AdvantageResult
from alignrl.algorithms.base import Advantages, RolloutBatch, StepContext, Stateless
from alignrl.errors import ConfigError
from alignrl.sampling.engine import apply_step
from alignrl.sampling.kernels import mean_over_dims


class ValueNet(nn.Module):
    """V(x_t, text, step): the latent through two strided convolutions (mean-pooled), the prompt's mean text
    embedding and a step embedding, concatenated into a two-layer MLP."""

    def __init__(self, channels: int, text_dim: int, num_steps: int, width: int = 64):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.SiLU(),
                                  nn.Conv2d(width, width, 3, stride=2, padding=1), nn.SiLU())
        self.step = nn.Embedding(num_steps, width)
        self.text = nn.Linear(text_dim, width)
        self.head = nn.Sequential(nn.Linear(3 * width, 4 * width), nn.SiLU(), nn.Linear(4 * width, 1))

    def forward(self, x: torch.Tensor, text: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).mean(dim=(2, 3))
        return self.head(torch.cat([h, self.text(text), self.step(step)], dim=1)).squeeze(1)


@dataclass
class ReplayBuffer:
    """The newest ``capacity`` transitions, oldest first (tensors on the CPU, float32)."""

    capacity: int
    x: torch.Tensor | None = None
    next_x: torch.Tensor | None = None
    logp: torch.Tensor | None = None
    step: torch.Tensor | None = None
    reward: torch.Tensor | None = None
    prompts: list = field(default_factory=list)

    def __len__(self) -> int:
        return 0 if self.x is None else len(self.x)

    def add(self, x, next_x, logp, step, reward, prompts) -> None:
        new = [x.detach().float().cpu(), next_x.detach().float().cpu(), logp.detach().float().cpu(),
               step.detach().long().cpu(), reward.detach().double().cpu()]
        if self.x is None:
            self.x, self.next_x, self.logp, self.step, self.reward = new
        else:
            self.x, self.next_x, self.logp, self.step, self.reward = (
                torch.cat([a, b]) for a, b in zip((self.x, self.next_x, self.logp, self.step, self.reward), new))
        self.prompts = self.prompts + list(prompts)
        drop = len(self) - self.capacity
        if drop > 0:
            self.x, self.next_x, self.logp, self.step, self.reward = (
                t[drop:] for t in (self.x, self.next_x, self.logp, self.step, self.reward))
            self.prompts = self.prompts[drop:]

    def tensors(self) -> dict[str, torch.Tensor]:
        if self.x is None:
            return {}
        return {"x": self.x, "next_x": self.next_x, "logp": self.logp, "step": self.step, "reward": self.reward}

    def load(self, tensors: dict[str, torch.Tensor], prompts: list) -> None:
        if not tensors:
            self.x = self.next_x = self.logp = self.step = self.reward = None
            self.prompts = []
            return
        self.x, self.next_x, self.logp = tensors["x"], tensors["next_x"], tensors["logp"]
        self.step, self.reward, self.prompts = tensors["step"], tensors["reward"], list(prompts)


@dataclass
class DPOK(Stateless):
    name: str = "dpok"
    group_size: int = 1  # num_samples: images per prompt per round
    lr: float = 1e-5
    reward_weight: float = 10.0  # alpha
    kl_weight: float = 0.01  # beta_KL
    ratio_clip: float = 1e-4
    buffer_size: int = 1000  # transitions, per process
    grad_accumulation: int = 12  # micro-batches per policy optimizer step
    value_lr: float = 1e-4
    value_batch_size: int = 256
    value_steps: int = 5  # minibatches accumulated into the one value update per iteration
    value_baseline: bool = True  # v_flag: advantage r - V (false: r)
    kl_warmup: int = -1  # the KL term counts from iterations after this one

    batch_kind: ClassVar[str] = "transitions"
    supports_sharding = True  # a fixed number of passes per update on every rank (distributed=fsdp)
    replay: ClassVar[bool] = True  # updates draw from the buffer, not the iteration's own samples
    _diag_keys: ClassVar[tuple] = ("policy_loss", "kl", "ratio", "clipfrac", "advantage", "value_loss")

    def __post_init__(self):
        checks = [(self.lr > 0, f"algorithm.lr must be > 0, got {self.lr}"),
                  (self.ratio_clip > 0, f"algorithm.ratio_clip must be > 0, got {self.ratio_clip}"),
                  (self.kl_weight >= 0, f"algorithm.kl_weight must be >= 0, got {self.kl_weight}"),
                  (self.buffer_size >= 1, f"algorithm.buffer_size must be >= 1, got {self.buffer_size}"),
                  (self.grad_accumulation >= 1, f"algorithm.grad_accumulation must be >= 1, got {self.grad_accumulation}"),
                  (self.value_lr > 0, f"algorithm.value_lr must be > 0, got {self.value_lr}"),
                  (self.value_batch_size >= 1 and self.value_steps >= 1,
                   "algorithm.value_batch_size and algorithm.value_steps must be >= 1")]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        self.buffer = ReplayBuffer(self.buffer_size)
        self.value: ValueNet | None = None
        self.value_optimizer: torch.optim.Optimizer | None = None
        self._pending: dict | None = None  # tensor state loaded before the value net exists
        self.iterations = 0

    # ----- protocol ----------------------------------------------------------------------------------
    @property
    def needs_reference(self) -> bool:
        return self.kl_weight > 0

    def advantages(self, rewards: np.ndarray, keys: np.ndarray, per_reward: dict | None = None,
                   weights: dict | None = None) -> AdvantageResult:
        """The raw rewards (DPOK does not normalise; the value baseline is subtracted in the update)."""
        rewards = np.asarray(rewards, dtype=np.float64).reshape(-1)
        keep = np.isfinite(rewards)
        return AdvantageResult(np.where(keep, rewards, 0.0), keep, {"kept_frac": float(keep.mean())})

    def state_dict(self) -> dict:
        return {"iterations": self.iterations}

    def load_state_dict(self, state: dict) -> None:
        self.iterations = int(state.get("iterations", 0))

    def save_rank_state(self, path) -> None:
        """This process's buffer (its prompts in the file's metadata), value network and value optimizer, as
        safetensors (the checkpoint keeps one file per process)."""
        from safetensors.torch import save_file

        out = {f"buffer.{k}": v.contiguous() for k, v in self.buffer.tensors().items()}
        if self.value is not None:
            out.update({f"value.{k}": v.detach().cpu().contiguous() for k, v in self.value.state_dict().items()})
            out.update({f"value_opt.{k}": v for k, v in _flat_optimizer_state(self.value_optimizer).items()})
        save_file(out, str(path), metadata={"prompts": json.dumps(self.buffer.prompts)})

    def load_rank_state(self, path) -> None:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            prompts = json.loads((f.metadata() or {}).get("prompts", "[]"))
        self.buffer.load({k[len("buffer."):]: v for k, v in tensors.items() if k.startswith("buffer.")}, prompts)
        if len(self.buffer.prompts) != len(self.buffer):
            raise ConfigError(f"{path}: the DPOK buffer holds {len(self.buffer)} transitions but {len(prompts)} "
                              f"prompts; resume from another checkpoint")
        self.value, self.value_optimizer = None, None
        self._pending = {k: v for k, v in tensors.items() if not k.startswith("buffer.")}

    # ----- the update ----------------------------------------------------------------------------------
    def _ensure_value(self, ctx: StepContext, text_dim: int, num_steps: int) -> None:
        if self.value is not None:
            return
        channels = int(self.buffer.x.shape[1])
        g = torch.random.fork_rng(devices=[])
        with g:
            torch.manual_seed(int(ctx.seed) * 31 + 5)
            self.value = ValueNet(channels, text_dim, num_steps).to(ctx.device)
        self.value_optimizer = torch.optim.AdamW(self.value.parameters(), lr=self.value_lr)
        if self._pending:
            self.value.load_state_dict({k[len("value."):]: v for k, v in self._pending.items()
                                        if k.startswith("value.")})
            _load_flat_optimizer_state(self.value_optimizer, {k[len("value_opt."):]: v for k, v in
                                                              self._pending.items() if k.startswith("value_opt.")})
            self._pending = None

    def _text(self, ctx, prompts: list[str]) -> torch.Tensor:
        cond = ctx.backbone.encode_prompts(prompts)
        return cond.tensors["prompt_embeds"].float().mean(dim=1)

    def _draw(self, g: torch.Generator, n: int) -> torch.Tensor:
        return torch.randint(0, len(self.buffer), (n,), generator=g)

    def train_step(self, batch: RolloutBatch, adv: Advantages, ctx: StepContext) -> dict:
        backbone = ctx.backbone
        schedule = backbone.make_schedule(batch.plan.base_steps)
        # 1. this iteration's trained transitions join the buffer with their image's final reward
        reward = torch.as_tensor(np.asarray(batch.rewards, dtype=np.float64))
        leaf = batch.t_leaf_lo
        ok = torch.isfinite(reward[leaf])
        if ok.any():
            rows = torch.nonzero(ok).flatten()
            self.buffer.add(batch.x[rows.to(batch.x.device)], batch.next_x[rows.to(batch.x.device)],
                            batch.logp_old[rows.to(batch.x.device)], batch.t_from[rows], reward[leaf][rows],
                            [batch.prompts[int(r)] for r in batch.t_root[rows]])
        self.iterations += 1
        sums = {k: 0.0 for k in self.diagnostics}
        # every rank agrees: while any rank's buffer is empty, none trains (every rank then makes the same number
        # of forward/backward passes, as sharded weights need)
        empty = float(ctx.all_reduce_sum(torch.tensor([float(len(self.buffer) == 0)], device=ctx.device)).item())
        if empty > 0:
            return ctx.summarise(sums, 0, 0.0, [])
        text_dim = int(self._text(ctx, [self.buffer.prompts[0]]).shape[1])
        self._ensure_value(ctx, text_dim, schedule.num_steps)
        g = torch.Generator().manual_seed((int(ctx.seed) * 1_000_003 + int(ctx.iteration)) * 7919 + int(ctx.rank))

        # 2. the value function: one optimizer step over value_steps minibatches (MSE to the final reward)
        self.value.train()
        self.value_optimizer.zero_grad(set_to_none=True)
        value_loss = 0.0
        for _ in range(self.value_steps):
            idx = self._draw(g, min(self.value_batch_size, len(self.buffer)))
            v = self._value(ctx, idx)
            loss = ((v - self.buffer.reward[idx].to(ctx.device).float()) ** 2).mean() / self.value_steps
            loss.backward()
            value_loss += float(loss.detach())
        self.value_optimizer.step()
        self.value.eval()

        # 3. the policy: updates_per_iteration optimizer steps of grad_accumulation micro-batches
        ctx.denoiser.train()
        use_kl = self.kl_weight > 0 and self.iterations > self.kl_warmup
        count, grad_norms = 0, []
        for _ in range(ctx.updates_per_iteration):
            for _ in range(self.grad_accumulation):
                idx = self._draw(g, ctx.train_batch_size)
                loss, diag = self._policy_loss(ctx, batch, schedule, idx, use_kl)
                ctx.backward(loss.mean() / self.grad_accumulation)
                for k, val in diag.items():
                    sums[k] += float(val.sum())
                count += len(idx)
            grad_norms.append(ctx.optimizer_step())
        sums["value_loss"] = value_loss * count  # averaged by count in the summary
        return ctx.summarise(sums, count, 0.0, grad_norms)

    def _value(self, ctx, idx: torch.Tensor) -> torch.Tensor:
        x = self.buffer.x[idx].to(ctx.device)
        with torch.no_grad():
            text = self._text(ctx, [self.buffer.prompts[int(i)] for i in idx])
        return self.value(x, text, self.buffer.step[idx].to(ctx.device))

    def _policy_loss(self, ctx, batch: RolloutBatch, schedule, idx: torch.Tensor, use_kl: bool):
        backbone = ctx.backbone
        buf = self.buffer
        x, next_x = buf.x[idx].to(ctx.device), buf.next_x[idx].to(ctx.device)
        step = buf.step[idx].to(ctx.device)
        prompts = [buf.prompts[int(i)] for i in idx]
        cond = backbone.encode_prompts(prompts)
        spec = next(s for s in batch.plan.steps if s.trained)  # the sampler's kernel (buffer rows share it)
        timestep = schedule.timesteps[step]
        with ctx.autocast():
            v = backbone.predict(x, timestep, cond, batch.plan.guidance_scale)
        policy = apply_step(backbone, spec, schedule, step, x, v, next_x=next_x)
        r = buf.reward[idx].to(ctx.device).float()
        with torch.no_grad():
            baseline = self._value(ctx, idx) if self.value_baseline else torch.zeros_like(r)
        advantage = r - baseline
        raw = torch.exp(policy.logp_mean_per_dim - buf.logp[idx].to(ctx.device))
        ratio = raw.clamp(1 - self.ratio_clip, 1 + self.ratio_clip)
        loss = -self.reward_weight * advantage * ratio
        kl = torch.zeros_like(loss)
        if use_kl:
            v_ref = ctx.predict_reference(x, timestep, cond, batch.plan.guidance_scale)
            t = schedule.sigmas[step].view(-1, *([1] * (x.ndim - 1)))
            kl = mean_over_dims(((1 - t) * (v.float() - v_ref.float())) ** 2)  # the eps-space difference
            loss = loss + self.kl_weight * kl
        diag = {"policy_loss": loss.detach(), "kl": kl.detach(), "ratio": raw.detach(),
                "clipfrac": ((raw.detach() - 1).abs() > self.ratio_clip).float(), "advantage": advantage.detach()}
        return loss, diag


def _flat_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW's per-parameter state as flat tensors ("<param index>.<name>")."""
    out = {}
    for i, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            out[f"{i}.{name}"] = torch.as_tensor(value).detach().cpu().clone().contiguous()
    return out


def _load_flat_optimizer_state(optimizer: torch.optim.Optimizer, flat: dict[str, torch.Tensor]) -> None:
    if not flat:
        return
    state: dict[int, dict] = {}
    for key, value in flat.items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = value
    sd = optimizer.state_dict()
    sd["state"] = state
    optimizer.load_state_dict(sd)
