"""What the network predicts, and the conversions every kernel and loss needs from it.

Methods never write the noising convention themselves: they ask the backbone's ``parameterisation`` to noise
a clean latent (``add_noise``), to turn a prediction into the clean latent or the noise (``to_x0``,
``to_eps``), for the regression target of a training loss (``target``) and for training times
(``sample_t``). Times ``t`` are the schedule's sigma in [0, 1] (0 = data, 1 = noise); they broadcast over
the latent's trailing dimensions, so a per-sample (B,) tensor, a scalar or an already-shaped tensor works.

Flow matching (SD3, FLUX, the ShapeWorld model) predicts the velocity ``v = eps - x0`` of the straight path
``x_t = (1 - t) x0 + t eps``.

Variance-preserving models (the SD1.5/SDXL UNets: ``x = sqrt(abar) x0 + sqrt(1 - abar) eps``, predicting epsilon
or v) run in the same *flow frame*: ``x~ = x / (sqrt(abar) + sqrt(1 - abar))`` at
``t = sqrt(1 - abar) / (sqrt(abar) + sqrt(1 - abar))`` is the straight path above, and DDIM with eta 0 is exactly
the Euler step on it. Their adapters take flow-frame latents, convert them to the model's own at the model call
and return the flow velocity, so every kernel, plan and loss here works on them unchanged. ``vp_coefficients``
and ``sigma_of_alpha_bar`` convert; ``objective_weight`` turns a flow-velocity squared error into the squared
error of the model's own objective (epsilon or v), which offline methods train on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from alignrl.errors import ConfigError

TIME_SAMPLINGS = ("uniform", "logit_normal")


def _shaped(t, x: torch.Tensor) -> torch.Tensor | float:
    """``t`` broadcast against ``x``: floats stay floats, a (B,) tensor becomes (B, 1, ..., 1)."""
    if not isinstance(t, torch.Tensor) or t.ndim == 0 or t.ndim == x.ndim:
        return t
    return t.reshape(*t.shape, *([1] * (x.ndim - t.ndim)))


class Parameterisation(Protocol):
    name: str

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor: ...

    def to_x0(self, x_t: torch.Tensor, pred: torch.Tensor, t) -> torch.Tensor: ...

    def to_eps(self, x_t: torch.Tensor, pred: torch.Tensor, t) -> torch.Tensor: ...

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor: ...


@dataclass(frozen=True)
class FlowVelocity:
    """Rectified flow: ``x_t = (1 - t) x0 + t eps``, the network predicts ``v = eps - x0``."""

    name: str = "flow"

    def add_noise(self, x0, eps, t):
        t = _shaped(t, x0)
        return (1 - t) * x0 + t * eps

    def to_x0(self, x_t, pred, t):
        return x_t - _shaped(t, x_t) * pred

    def to_eps(self, x_t, pred, t):
        return x_t + (1 - _shaped(t, x_t)) * pred

    def target(self, x0, eps, t=None):
        return eps - x0


FLOW = FlowVelocity()


def deterministic_step(param: Parameterisation, x: torch.Tensor, pred: torch.Tensor, t, t_next) -> torch.Tensor:
    """The deterministic (DDIM-form) sampler step from time ``t`` to ``t_next``: x0 and eps from the prediction,
    renoised at ``t_next``. For flow models it is the Euler step ``x + (t_next - t) v``."""
    return param.add_noise(param.to_x0(x, pred, t), param.to_eps(x, pred, t), t_next)


def vp_coefficients(t):
    """(sqrt(abar), sqrt(1 - abar), n) of flow-frame time ``t``, where ``n = sqrt((1 - t)^2 + t^2)`` is the scale
    from the model's own latents to the flow frame (``x~ = n x``)."""
    n = ((1 - t) ** 2 + t**2) ** 0.5
    return (1 - t) / n, t / n, n


def sigma_of_alpha_bar(alpha_bar: torch.Tensor) -> torch.Tensor:
    """The flow-frame time of a variance-preserving noise level ``abar``: sqrt(1-abar) / (sqrt(abar) + sqrt(1-abar))."""
    a, s = alpha_bar.double().sqrt(), (1 - alpha_bar.double()).sqrt()
    return (s / (a + s)).float()


PREDICTION_TYPES = ("flow", "epsilon", "v_prediction")


def objective_weight(prediction_type: str, t):
    """The factor that turns a flow-velocity squared error at time ``t`` into the squared error of the model's own
    objective at the same latent: 1 for flow models, (1 - t)^2 for epsilon (|d eps| = (1 - t) |d v|), and
    (1 - t)^2 + t^2 for v-prediction (|d v_model| = n |d v|)."""
    if prediction_type == "flow":
        return 1.0
    if prediction_type == "epsilon":
        return (1 - t) ** 2
    if prediction_type == "v_prediction":
        return (1 - t) ** 2 + t**2
    raise ConfigError(f"unknown prediction type '{prediction_type}'; use one of {', '.join(PREDICTION_TYPES)}")


def sample_t(n: int, generator: torch.Generator | None = None, *, kind: str = "uniform", mean: float = 0.0,
             std: float = 1.0, eps: float = 1e-5) -> torch.Tensor:
    """``n`` training times in (0, 1): ``uniform``, or ``logit_normal`` (sigmoid of N(mean, std^2), SD3's
    choice, which favours the middle of the path); kept ``eps`` away from both ends."""
    if kind == "uniform":
        t = torch.rand(n, generator=generator)
    elif kind == "logit_normal":
        if std <= 0:
            raise ConfigError(f"logit-normal time sampling needs std > 0, got {std}")
        t = torch.sigmoid(mean + std * torch.randn(n, generator=generator))
    else:
        raise ConfigError(f"unknown time sampling '{kind}'; use one of {', '.join(TIME_SAMPLINGS)}")
    return t.clamp(eps, 1 - eps)


def logit_normal_density(t: float, mean: float = 0.0, std: float = 1.0) -> float:
    """The density of ``sigmoid(N(mean, std^2))`` at ``t`` (for tests and plots)."""
    z = math.log(t / (1 - t))
    return math.exp(-((z - mean) ** 2) / (2 * std**2)) / (std * math.sqrt(2 * math.pi) * t * (1 - t))
