"""Sampling with gradients, for the reward-gradient methods (ReFL, DRaFT, AlignProp, AdjointDPM).

Every sampler here runs the probability-flow ODE over a backbone schedule in the deterministic DDIM form of the
backbone's parameterisation (x0 and eps from the prediction, renoised at the next time; for flow models that is
the Euler step). What differs is where the autograd graph is kept:

- ``grad_sample``: the steps from ``grad_from`` on keep the graph (DRaFT-K: the last K; AlignProp: a truncation
  drawn per batch; all of them: ``grad_from=0``); the earlier ones run without it. With ``stop_at`` the sample
  ends at that step and returns the step's x0 prediction (ReFL). With ``checkpoint`` every differentiated model
  call stores only its input and recomputes its activations in the backward pass, so memory grows with the
  number of differentiated steps by one latent each, not by the network's activations.
- ``adjoint_backward``: AdjointDPM. The sample is solved without any graph; then the adjoint of the sampler is
  solved backwards from the data end: ``a_N = dL/dx_N``, and at each step (last to first), with the step
  ``x_{i+1} = x_i + h_i v(x_i, t_i)``, ``a_i = a_{i+1} + h_i (dv/dx)^T a_{i+1}`` and the weights' gradient
  ``h_i (dv/dtheta)^T a_{i+1}``: one vector-Jacobian product per step, so memory does not grow with the number
  of steps. The states are recomputed backwards by the reversed step (``x_i ~ x_{i+1} - h_i v(x_{i+1},
  t_{i+1})``, the paper's backward solve of the state) or, with ``states="store"``, kept from the forward
  solve (N latents; then the gradient is exactly that of the discrete sampler). For flow models the paper's
  exponential-integrator coordinates (y = x / alpha, rho = sigma / alpha, where DDIM is Euler) are the flow
  ODE itself: DDIM is the Euler step in (x, t) already. The gradient with respect to the initial noise
  (``a_0``) is returned, and the conditioning's if its tensors require grad.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch

from alignrl.sampling.parameterisation import deterministic_step


def _predict(backbone, x, timestep, cond, guidance: float, autocast, checkpoint: bool) -> torch.Tensor:
    def call(x_in):
        with autocast():
            return backbone.predict(x_in, timestep, cond, guidance)  # float32 (float64 for a float64 model)

    if checkpoint and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint as recompute

        return recompute(call, x, use_reentrant=False)
    return call(x)


def grad_sample(backbone, cond, x_T: torch.Tensor, schedule, guidance: float, *, grad_from: int = 0,
                stop_at: int | None = None, checkpoint: bool = True, autocast: Callable = nullcontext
                ) -> torch.Tensor:
    """The ODE sample from ``x_T``, the graph kept from step ``grad_from`` on; ``stop_at``: return that step's
    x0 prediction instead of continuing (its step keeps the graph whatever ``grad_from`` says)."""
    param = backbone.parameterisation
    n = len(schedule.timesteps)
    last = n - 1 if stop_at is None else stop_at
    if not 0 <= last < n:
        raise ValueError(f"stop_at={stop_at} is outside the {n}-step schedule")
    x = backbone.to_frame(x_T, schedule.sigmas[0])
    for i in range(last + 1):
        s, s_next = schedule.sigmas[i], schedule.sigmas[i + 1]
        timestep = schedule.timesteps[i].expand(len(x))
        live = i >= grad_from or i == stop_at
        with nullcontext() if live else torch.no_grad():
            pred = _predict(backbone, x if live else x.detach(), timestep, cond, guidance, autocast,
                            checkpoint and live)
            if i == stop_at:
                return param.to_x0(x, pred, s)
            x = deterministic_step(param, x, pred, s, s_next)
    return backbone.from_frame(x, schedule.sigmas[-1])


@torch.no_grad()
def ode_states(backbone, cond, x_T: torch.Tensor, schedule, guidance: float, autocast: Callable = nullcontext,
               keep: bool = False) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """The ODE solved without a graph: the final latent, and every state x_0..x_{N-1} with ``keep`` (those in the
    flow frame the steps run in; ``x_T`` and the final latent in the model's own, as ``grad_sample``)."""
    param = backbone.parameterisation
    x, states = backbone.to_frame(x_T, schedule.sigmas[0]), [] if keep else None
    for i in range(len(schedule.timesteps)):
        if keep:
            states.append(x)
        pred = _predict(backbone, x, schedule.timesteps[i].expand(len(x)), cond, guidance, autocast, False)
        x = deterministic_step(param, x, pred, schedule.sigmas[i], schedule.sigmas[i + 1])
    return backbone.from_frame(x, schedule.sigmas[-1]), states


def adjoint_backward(backbone, cond, x_final: torch.Tensor, grad_final: torch.Tensor, schedule, guidance: float, *,
                     backward: Callable[[torch.Tensor], None], states: list[torch.Tensor] | None = None,
                     refine: int = 1, autocast: Callable = nullcontext) -> torch.Tensor:
    """Accumulate the weights' gradient of a loss L(x_N) (``grad_final`` = dL/dx_N) into their ``.grad`` by the
    adjoint of the sampler, one step at a time (``backward(scalar)`` runs the loop's backward on each step's
    vector-Jacobian surrogate). Returns dL/dx_T, the gradient with respect to the initial noise. ``states``
    (from ``ode_states(keep=True)``) makes the gradient exact; without them each state is recomputed by the
    reversed step and ``refine`` fixed-point iterations toward the forward step's exact inverse (each one model
    call, no graph). Only flow-velocity backbones (the Euler step ``x + h v``) are supported."""
    if getattr(backbone.parameterisation, "name", "") != "flow":
        raise NotImplementedError("the adjoint sampler is written for flow-velocity backbones")
    n = len(schedule.timesteps)
    # x_final and grad_final are in the model's own latents; the steps run in the flow frame (x~ = to_frame(x)),
    # where dL/dx~ = dL/dx / n = from_frame(dL/dx)
    a = backbone.from_frame(grad_final.detach(), schedule.sigmas[-1])
    x = backbone.to_frame(x_final.detach(), schedule.sigmas[-1])
    for i in reversed(range(n)):
        h = schedule.sigmas[i + 1] - schedule.sigmas[i]
        if states is not None:
            x = states[i]
        else:  # the reversed Euler step x_i ~ x_{i+1} - h v(x_{i+1}, t_{i+1}), then fixed-point refinements
            # x_i <- x_{i+1} - h v(x_i, t_i), which converge to the exact inverse of the forward step
            t_next = schedule.timesteps[i + 1] if i + 1 < n else torch.zeros_like(schedule.timesteps[i])
            with torch.no_grad():
                x_next = x
                x = x_next - h * _predict(backbone, x_next, t_next.expand(len(x)), cond, guidance, autocast, False)
                for _ in range(refine):
                    x = x_next - h * _predict(backbone, x, schedule.timesteps[i].expand(len(x)), cond, guidance,
                                              autocast, False)
        x_in = x.detach().requires_grad_(True)
        with torch.enable_grad():
            v = _predict(backbone, x_in, schedule.timesteps[i].expand(len(x)), cond, guidance, autocast, False)
            backward((v * (h * a)).sum())  # weights: += h (dv/dtheta)^T a;  x_in.grad = h (dv/dx)^T a
        a = a + x_in.grad
    return backbone.to_frame(a, schedule.sigmas[0])  # dL/d(noise) = n_0 dL/dx~_0
