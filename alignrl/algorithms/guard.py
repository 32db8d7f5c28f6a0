"""GRPO-Guard: Flow-GRPO's PPO-clip with a regulated ratio.

With the step's Gaussian std ``s = sqrt(-dt) * std_t`` and the sampling policy's step mean ``mean_old``:

    bias  = mean_dims((mean_theta - mean_old)^2) / (2 s^2)
    ratio = exp((logp_theta - logp_old + bias) * s)           ratio normalisation
    L_pg  = PPO-clip(ratio, A) / (sqrt(-dt))^2                 gradient reweighting over timesteps

Expanding the Gaussian log-densities, the normalised log-ratio has the closed form
``mean_dims((mean_theta - mean_old) * eps)``, eps the standard-normal noise the step drew: it is centred
at every timestep, which is what keeps the clip meaningful where std_t is large.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignrl.algorithms.flowgrpo import FlowGRPO
from alignrl.sampling.kernels import StepResult, mean_over_dims


def guard_log_ratio(policy: StepResult, logp_old: torch.Tensor, mean_old: torch.Tensor) -> torch.Tensor:
    std = torch.as_tensor(policy.std, dtype=torch.float32)
    s = std.reshape(std.shape[0], -1).mean(dim=1) if std.ndim > 0 and std.shape[0] == logp_old.shape[0] \
        else std.mean().expand(logp_old.shape[0])
    bias = mean_over_dims((policy.mean - mean_old.float()) ** 2) / (2 * s**2)
    return (policy.logp_mean_per_dim - logp_old + bias) * s


@dataclass
class GRPOGuard(FlowGRPO):
    name: str = "grpo_guard"
    clip_range: float = 2e-6
    beta: float = 0.0
    global_std: bool = False
    lr: float = 1e-4

    def step_loss(self, policy: StepResult, logp_old, adv, reference, dt=None, mean_old=None, roots=None):
        if mean_old is None or dt is None:
            raise ValueError("GRPO-Guard needs the sampling step mean and dt")
        log_ratio = guard_log_ratio(policy, logp_old, mean_old)
        ratio = torch.exp(log_ratio)
        unclipped = -adv * ratio
        clipped = -adv * torch.clamp(ratio, 1.0 - self.clip_range, 1.0 + self.clip_range)
        pg = torch.maximum(unclipped, clipped) / (-torch.as_tensor(dt, dtype=torch.float32))
        diag = {"ratio": ratio.detach(), "clipfrac": (torch.abs(ratio - 1.0) > self.clip_range).float(),
                "approx_kl": 0.5 * log_ratio.detach() ** 2, "policy_loss": pg.detach()}
        loss = pg
        if self.beta > 0 and reference is not None:
            kl = mean_over_dims((policy.mean - reference.mean) ** 2) / (2 * policy.std_t.reshape(-1) ** 2)
            loss = loss + self.beta * kl
            diag["kl"] = kl.detach()
        return loss, diag
