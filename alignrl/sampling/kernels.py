"""Pure step kernels for flow matching (sigma runs from 1 = noise to 0 = data).

Every kernel takes the current latent ``x``, the velocity ``v`` predicted at ``sigma`` and the next
sigma, and returns a :class:`StepResult`. Stochastic kernels also give the Gaussian step mean, its
standard deviation and the log-density of the sample, averaged over the non-batch dimensions
(``logp_mean_per_dim``), the convention of every reference implementation (hence tiny clip ranges).

All arithmetic is float32. When ``next_x`` is given (re-scoring a stored trajectory during training)
the kernel scores it instead of drawing a new sample; the sample is always detached when scored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import torch

from alignrl.errors import ConfigError
from alignrl.sampling.parameterisation import FLOW, vp_coefficients

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class StepResult:
    next_x: torch.Tensor
    mean: torch.Tensor | None = None  # mean of the step's Gaussian (None for deterministic steps)
    std: torch.Tensor | None = None  # std of the step's Gaussian, shape (B,) or scalar
    logp_mean_per_dim: torch.Tensor | None = None  # (B,)
    std_t: torch.Tensor | None = None  # kernel-specific noise scale used by the KL (see flow_sde_step)
    coefficients: "SDECoefficients | None" = None  # a reverse-SDE step's factors (their mean std is kept there)


def _per_sample(t: torch.Tensor | float, ref: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or per-sample (B,) tensor against a (B, ...) tensor."""
    t = torch.as_tensor(t, dtype=torch.float32, device=ref.device)
    if t.ndim == 0:
        return t
    return t.view(-1, *([1] * (ref.ndim - 1)))


def mean_over_dims(t: torch.Tensor) -> torch.Tensor:
    return t.mean(dim=tuple(range(1, t.ndim)))


def gaussian_logp_mean_per_dim(sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Log-density of ``sample`` under N(mean, std^2), averaged over non-batch dims."""
    std = _per_sample(std, sample) if torch.as_tensor(std).ndim <= 1 else std
    return _logp(sample, mean, 2 * std**2, torch.log(std))


def _logp(sample: torch.Tensor, mean: torch.Tensor, two_var: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """``gaussian_logp_mean_per_dim`` given ``2 std^2`` and ``log std`` (computed once per step by the SDE kernels)."""
    return mean_over_dims(-((sample.detach() - mean) ** 2) / two_var - log_std - LOG_SQRT_2PI)


def ode_step(x, v, sigma, sigma_next) -> StepResult:
    """Euler step of the probability-flow ODE: ``x' = x + (sigma_next - sigma) v``."""
    dt = _per_sample(sigma_next, x) - _per_sample(sigma, x)
    return StepResult(next_x=x.float() + dt * v.float())


def flow_sde_std_t(sigma, sigma_max_guard, noise_level: float) -> torch.Tensor:
    """``std_t = a sqrt(sigma / (1 - sigma_))`` with ``sigma_ = sigmas[1]`` where sigma == 1 (no division by 0)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    guard = torch.as_tensor(sigma_max_guard, dtype=torch.float32, device=sigma.device)
    denom = 1 - torch.where(sigma == 1, guard, sigma)
    return noise_level * torch.sqrt(sigma / denom)


@dataclass(frozen=True)
class SDECoefficients:
    """A reverse-SDE step's scalar (or per-sample) factors, which depend on the schedule, not on the latents:
    ``mean = x * c_x + v * c_v * dt``, ``next_x = mean + std * eps``. Computed by ``sde_coefficients`` (the rollout
    engine keeps them per schedule step, so a step repeated over batches and updates computes them once)."""

    dt: torch.Tensor
    std_t: torch.Tensor
    c_x: torch.Tensor
    c_v: torch.Tensor
    std: torch.Tensor
    two_var: torch.Tensor  # 2 std^2
    log_std: torch.Tensor

    @cached_property
    def std_mean(self) -> float:
        """The std's mean over samples (a record's ``std``), read once per set of factors."""
        return float(self.std.float().mean())


# each reverse-SDE kernel's noise scale std_t (x, sigma, sigma broadcast against x, sigmas[1], a)
_STD_T = {
    "sde": lambda x, sigma, s, guard, a: _per_sample(
        flow_sde_std_t(torch.as_tensor(sigma, device=x.device), guard, a), x),
    "wan": lambda x, sigma, s, guard, a: a * torch.as_tensor(guard, dtype=torch.float32, device=x.device) * s,
}
REVERSE_SDE = tuple(_STD_T)  # the kernels made of sde_coefficients and reverse_sde_step


def sde_coefficients(kind: str, x: torch.Tensor, sigma, sigma_next, *, noise_level: float,
                     sigma_max_guard) -> SDECoefficients:
    """The factors of the marginal-preserving reverse SDE of a rectified flow for ``kind`` "sde" (Flow-GRPO:
    ``std_t = a sqrt(sigma / (1 - sigma))``) or "wan" (``std_t = a * sigmas[1] * sigma``), broadcast against
    ``x``: mean = x (1 + std_t^2 dt / (2 sigma)) + v (1 + std_t^2 (1 - sigma) / (2 sigma)) dt, std = std_t sqrt(-dt)."""
    if kind not in _STD_T:
        raise ValueError(f"sde_coefficients: kernel '{kind}' is not a reverse-SDE kernel ({', '.join(_STD_T)})")
    s = _per_sample(sigma, x)
    dt = _per_sample(sigma_next, x) - s
    std_t = _STD_T[kind](x, sigma, s, sigma_max_guard, noise_level)
    std = std_t * torch.sqrt(-dt)
    return SDECoefficients(dt=dt, std_t=std_t, c_x=1 + std_t**2 / (2 * s) * dt,
                           c_v=1 + std_t**2 * (1 - s) / (2 * s), std=std, two_var=2 * std**2, log_std=torch.log(std))


def reverse_sde_step(name: str, x, v, c: SDECoefficients, noise=None, next_x=None) -> StepResult:
    """The Euler-Maruyama step of the reverse SDE with factors ``c``; sampled with ``noise``, or ``next_x``
    re-scored."""
    x, v = x.float(), v.float()
    mean = x * c.c_x + v * c.c_v * c.dt
    if next_x is None:
        if noise is None:
            raise ValueError(f"{name} needs noise to sample or next_x to score")
        next_x = mean + c.std * noise.float()
    logp = _logp(next_x.float(), mean, c.two_var, c.log_std)
    return StepResult(next_x=next_x, mean=mean, std=c.std, logp_mean_per_dim=logp, std_t=c.std_t, coefficients=c)


def flow_sde_step(x, v, sigma, sigma_next, *, noise_level: float, sigma_max_guard, noise=None,
                  next_x=None) -> StepResult:
    """Flow-GRPO's SDE step (``reverse_sde_step``) with ``std_t = a sqrt(sigma / (1 - sigma))``. ``sigma_max_guard``
    is ``sigmas[1]`` of the schedule."""
    c = sde_coefficients("sde", x, sigma, sigma_next, noise_level=noise_level, sigma_max_guard=sigma_max_guard)
    return reverse_sde_step("flow_sde_step", x, v, c, noise, next_x)


def wan_sde_step(x, v, sigma, sigma_next, *, noise_level: float, sigma_max_guard, noise=None,
                 next_x=None) -> StepResult:
    """Flow-GRPO's SDE step as its Wan2.1 trainer runs it: ``reverse_sde_step`` with ``std_t = a * sigmas[1] * sigma``
    (the reference: ``a = 1``, ``sigma_min + (sigma_max - sigma_min) sigma`` with ``sigma_max = sigmas[1]`` and
    ``sigma_min = sigmas[-1] = 0``), so the noise shrinks linearly with sigma and never divides by ``1 - sigma``."""
    c = sde_coefficients("wan", x, sigma, sigma_next, noise_level=noise_level, sigma_max_guard=sigma_max_guard)
    return reverse_sde_step("wan_sde_step", x, v, c, noise, next_x)


def cps_step(x, v, sigma, sigma_next, *, noise_level: float, noise=None, next_x=None, **_unused) -> StepResult:
    """Coefficients-Preserving Sampling (arXiv 2509.05952).

    std = sigma_next sin(a pi / 2); mean = (1 - sigma_next) x0_hat + sqrt(sigma_next^2 - std^2) x1_hat.
    The score drops constants and the 1/(2 std^2) factor, as the reference does
    (``logp = -mean_dims((x' - mean)^2)``), so it pairs with clip ranges around 1e-5.
    At the last step sigma_next = 0, so std = 0 and the step is deterministic.
    """
    x, v = x.float(), v.float()
    s = _per_sample(sigma, x)
    s_next = _per_sample(sigma_next, x)
    std = s_next * math.sin(noise_level * math.pi / 2)
    x0_hat = FLOW.to_x0(x, v, s)
    x1_hat = FLOW.to_eps(x, v, s)
    mean = (1 - s_next) * x0_hat + torch.sqrt(torch.clamp(s_next**2 - std**2, min=0)) * x1_hat
    if next_x is None:
        if noise is None:
            raise ValueError("cps_step needs noise to sample or next_x to score")
        next_x = mean + std * noise.float()
    logp = -mean_over_dims((next_x.float().detach() - mean) ** 2)
    return StepResult(next_x=next_x, mean=mean, std=std, logp_mean_per_dim=logp, std_t=std)


def dance_sde_step(x, v, sigma, sigma_next, *, noise_level: float, noise=None, next_x=None, **_unused) -> StepResult:
    """DanceGRPO's SDE step (``noise_level`` is its eta, 0.3 for images).

    mean = x + dt v - 0.5 eta^2 score dt with score = -(x - (1 - sigma) x0_hat) / sigma^2 and
    x0_hat = x - sigma v; std = eta sqrt(sigma - sigma_next); the Gaussian log-density is averaged over dims.
    """
    x, v = x.float(), v.float()
    s = _per_sample(sigma, x)
    dt = _per_sample(sigma_next, x) - s
    x0_hat = FLOW.to_x0(x, v, s)
    score = -(x - x0_hat * (1 - s)) / s**2
    mean = x + dt * v - 0.5 * noise_level**2 * score * dt
    std = noise_level * torch.sqrt(-dt)
    if next_x is None:
        if noise is None:
            raise ValueError("dance_sde_step needs noise to sample or next_x to score")
        next_x = mean + std * noise.float()
    logp = gaussian_logp_mean_per_dim(next_x.float(), mean, std)
    return StepResult(next_x=next_x, mean=mean, std=std, logp_mean_per_dim=logp, std_t=std)


def ddim_step(x, v, sigma, sigma_next, *, noise_level: float, noise=None, next_x=None, **_unused) -> StepResult:
    """DDIM with ``eta = noise_level`` (DDPO's sampler and log-prob), on flow-frame latents.

    In the variance-preserving variables (``abar`` and the model's latent ``x = x~ / n``, see
    ``parameterisation.vp_coefficients``): x0 and eps from the prediction,
    ``std = eta sqrt((1 - abar') / (1 - abar) (1 - abar / abar'))``,
    ``mean = sqrt(abar') x0 + sqrt(1 - abar' - std^2) eps``, ``x' = mean + std n``. The step runs in the flow
    frame (mean and std times n'), and the log-density is reported in the model's own variables (``+ log n'``
    per dimension), so it equals the reference's value; the two differ by a constant per step, which ratios and
    KL terms do not see. For flow models (n = 1 at the ends) it is the DDIM view of the same straight path.
    At a last step to abar' = 1 (sigma' = 0) std is 0: use it only where the schedule ends above 0 (DDIM with
    ``set_alpha_to_one=False``, as SD1.5/SDXL ship) or make that step deterministic.
    """
    x, v = x.float(), v.float()
    s = _per_sample(sigma, x)
    s_next = _per_sample(sigma_next, x)
    a, b, _ = vp_coefficients(s)
    a_next, b_next, n_next = vp_coefficients(s_next)
    x0, eps = FLOW.to_x0(x, v, s), FLOW.to_eps(x, v, s)
    var = (b_next / b) ** 2 * (1 - (a / a_next) ** 2)
    std_model = noise_level * torch.sqrt(torch.clamp(var, min=0))
    mean = n_next * (a_next * x0 + torch.sqrt(torch.clamp(b_next**2 - std_model**2, min=0)) * eps)
    std = n_next * std_model
    if noise_level > 0 and bool((std_model == 0).any()):
        raise ConfigError("a ddim step ends at sigma 0 (abar 1), where its std is 0 and it has no log-prob: train it "
                          "on a schedule that ends above 0 (the SD1.5/SDXL backbones') or leave the last step untrained "
                          "(sampler.timestep_fraction < 1)")
    if next_x is None:
        if noise is None:
            raise ValueError("ddim_step needs noise to sample or next_x to score")
        next_x = mean + std * noise.float()
    logp = gaussian_logp_mean_per_dim(next_x.float(), mean, std) + torch.log(n_next).reshape(-1)
    return StepResult(next_x=next_x, mean=mean, std=std, logp_mean_per_dim=logp, std_t=std)


def dpm_solver_2m_step(x, v, sigma, sigma_next, prev: tuple[torch.Tensor, float, float] | None = None):
    """One step of DPM-Solver++(2M) (data prediction, multistep) on the flow ``x_t = (1 - t) x0 + t eps``.

    With alpha = 1 - sigma and lambda = log(alpha / sigma), first order (exactly DDIM) reads
    ``x' = (s'/s) x + (a' - a s'/s) D`` for the data prediction ``D = x - sigma v``; second order replaces
    D by ``(1 + 1/(2r)) D - 1/(2r) D_prev`` with ``r = h_prev / h`` (h = lambda' - lambda). ``prev`` is
    (D_prev, lambda_prev, lambda) of the previous step or None; the first step (sigma = 1, lambda = -inf)
    and the last (sigma' = 0) are first order, as diffusers' ``lower_order_final``.
    Returns the next latent and the state to pass to the following step.
    """
    x, v = x.float(), v.float()
    s, s_next = float(sigma), float(sigma_next)
    data = FLOW.to_x0(x, v, s)
    lam = _lambda(s)
    lam_next = _lambda(s_next)
    use = data
    if prev is not None and math.isfinite(lam_next) and math.isfinite(prev[1]) and math.isfinite(lam):
        h, h_prev = lam_next - lam, lam - prev[1]
        r = h_prev / h
        use = (1 + 1 / (2 * r)) * data - (1 / (2 * r)) * prev[0]
    a_next = 1 - s_next
    next_x = (s_next / s) * x + (a_next - (1 - s) * s_next / s) * use
    return next_x, (data, lam, lam_next)


def _lambda(sigma: float) -> float:
    if sigma >= 1:
        return -math.inf
    if sigma <= 0:
        return math.inf
    return math.log((1 - sigma) / sigma)


KernelFn = Callable[..., StepResult]

# Stochastic kernels by name; "ode" is the deterministic Euler step and "dpm2m" the deterministic
# DPM-Solver++(2M) step (the engine carries its multistep state).
KERNELS: dict[str, KernelFn] = {"sde": flow_sde_step, "cps": cps_step, "dance": dance_sde_step, "ddim": ddim_step,
                                "wan": wan_sde_step}
DETERMINISTIC = ("ode", "dpm2m")
