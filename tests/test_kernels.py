"""Step kernels against closed forms."""

import math

import pytest
import torch

from alignrl.sampling.kernels import (cps_step, flow_sde_std_t, flow_sde_step, gaussian_logp_mean_per_dim,
                                      ode_step)


def _inputs(seed=0, shape=(3, 4, 5, 5)):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.randn(shape, generator=g))


def test_ode_step_is_euler():
    x, v, _ = _inputs()
    out = ode_step(x, v, torch.tensor(0.7), torch.tensor(0.5))
    assert torch.allclose(out.next_x, x - 0.2 * v, atol=1e-6)
    assert out.logp_mean_per_dim is None


def test_sde_logp_equals_gaussian_density():
    x, v, eps = _inputs()
    sigma, sigma_next, a = torch.tensor(0.8), torch.tensor(0.6), 0.7
    out = flow_sde_step(x, v, sigma, sigma_next, noise_level=a, sigma_max_guard=torch.tensor(0.95), noise=eps)
    dt = sigma_next - sigma
    std_t = a * math.sqrt(0.8 / (1 - 0.8))
    mean = x * (1 + std_t**2 / (2 * sigma) * dt) + v * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
    std = std_t * math.sqrt(0.2)
    assert torch.allclose(out.mean, mean, atol=1e-6)
    assert torch.allclose(out.next_x, mean + std * eps, atol=1e-6)
    ref = torch.distributions.Normal(mean, std).log_prob(out.next_x).mean(dim=(1, 2, 3))
    assert torch.allclose(out.logp_mean_per_dim, ref, atol=1e-5)
    assert torch.allclose(out.std_t, torch.tensor(std_t), atol=1e-6)


def test_sde_scoring_a_stored_sample_gives_same_logp():
    x, v, eps = _inputs(1)
    s, sn, guard = torch.tensor(0.9), torch.tensor(0.7), torch.tensor(0.95)
    sampled = flow_sde_step(x, v, s, sn, noise_level=0.7, sigma_max_guard=guard, noise=eps)
    scored = flow_sde_step(x, v, s, sn, noise_level=0.7, sigma_max_guard=guard, next_x=sampled.next_x)
    ratio = torch.exp(scored.logp_mean_per_dim - sampled.logp_mean_per_dim)
    assert torch.equal(ratio, torch.ones_like(ratio))  # exactly 1 on-policy


def test_sde_noise_zero_mean_is_ode_step():
    x, v, eps = _inputs(2)
    s, sn = torch.tensor(0.8), torch.tensor(0.6)
    out = flow_sde_step(x, v, s, sn, noise_level=0.0, sigma_max_guard=torch.tensor(0.95), noise=eps)
    assert torch.allclose(out.mean, ode_step(x, v, s, sn).next_x, atol=1e-7)
    assert torch.allclose(out.next_x, ode_step(x, v, s, sn).next_x, atol=1e-7)


def test_sde_std_guard_at_sigma_one():
    # sigma == 1 would divide by zero; the reference substitutes sigmas[1].
    std = flow_sde_std_t(torch.tensor(1.0), torch.tensor(0.96), 0.7)
    assert torch.isfinite(std)
    assert std.item() == pytest.approx(0.7 * math.sqrt(1.0 / (1 - 0.96)), rel=1e-5)


def test_sde_per_sample_sigmas_match_scalar_calls():
    x, v, eps = _inputs(3)
    sig = torch.tensor([0.9, 0.5, 0.3])
    nxt = torch.tensor([0.8, 0.4, 0.1])
    batched = flow_sde_step(x, v, sig, nxt, noise_level=0.7, sigma_max_guard=torch.tensor(0.95), noise=eps)
    for i in range(3):
        one = flow_sde_step(x[i:i + 1], v[i:i + 1], sig[i], nxt[i], noise_level=0.7,
                            sigma_max_guard=torch.tensor(0.95), noise=eps[i:i + 1])
        assert torch.allclose(batched.logp_mean_per_dim[i], one.logp_mean_per_dim[0], atol=1e-6)


def test_cps_closed_form_and_deterministic_last_step():
    x, v, eps = _inputs(4)
    s, sn, a = torch.tensor(0.6), torch.tensor(0.4), 0.8
    out = cps_step(x, v, s, sn, noise_level=a, noise=eps)
    std = 0.4 * math.sin(a * math.pi / 2)
    x0, x1 = x - 0.6 * v, x + 0.4 * v
    mean = 0.6 * x0 + math.sqrt(0.4**2 - std**2) * x1
    assert torch.allclose(out.mean, mean, atol=1e-6)
    assert torch.allclose(out.next_x, mean + std * eps, atol=1e-6)
    assert torch.allclose(out.logp_mean_per_dim, -((out.next_x - mean) ** 2).mean(dim=(1, 2, 3)), atol=1e-6)
    last = cps_step(x, v, s, torch.tensor(0.0), noise_level=a, noise=eps)
    assert torch.allclose(last.next_x, x - 0.6 * v, atol=1e-6)  # std 0: x0_hat exactly


def test_gaussian_logp_helper():
    x, m, _ = _inputs(5)
    std = torch.tensor(0.3)
    ref = torch.distributions.Normal(m, std).log_prob(x).mean(dim=(1, 2, 3))
    assert torch.allclose(gaussian_logp_mean_per_dim(x, m, std), ref, atol=1e-5)


def test_kernels_need_noise_or_sample():
    x, v, _ = _inputs()
    with pytest.raises(ValueError):
        flow_sde_step(x, v, torch.tensor(0.5), torch.tensor(0.4), noise_level=0.7, sigma_max_guard=torch.tensor(0.9))
