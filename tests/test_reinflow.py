"""ReinFlow: the chain's exact log-likelihood, the noise bounds and their schedule, and an exact resume of the noise
network."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from alignrl.algorithms.reinflow import ReinFlow
from conftest import FAST, run_inprocess


def test_noise_bounds_hold_then_anneal():
    algo = ReinFlow(sigma_min=0.1, sigma_max=0.3, hold_fraction=0.5, total_iterations=100)
    top = lambda: math.exp(0.5 * algo.log_var_bounds()[1])  # noqa: E731
    lo = math.exp(0.5 * algo.log_var_bounds()[0])
    assert lo == pytest.approx(0.1)
    for it, want in ((0, 0.3), (50, 0.3), (75, 0.3 + 0.5 * (0.24 - 0.3)), (100, 0.1 + 0.7 * 0.2), (150, 0.24)):
        algo.iterations = it
        assert top() == pytest.approx(want), it


def test_noise_bounds_that_the_clamp_would_swallow_are_refused():
    """A chain whose largest std gives a log-likelihood above the clamp has no gradient (measured: with sigma bounds
    0.02 to 0.1 the tiny runs at lr 1e-2 and 3e-3 were identical); such bounds are refused in one line."""
    from alignrl.algorithms.reinflow import clamp_free_std, expected_logp_per_dim
    from alignrl.errors import ConfigError

    assert expected_logp_per_dim(0.1) == pytest.approx(0.88, abs=0.01)
    assert expected_logp_per_dim(clamp_free_std(1.0)) == pytest.approx(1.0)
    eps = torch.randn(200_000, generator=torch.Generator().manual_seed(0)).clamp(-3, 3)
    empirical = float((-(eps**2) / 2 - math.log(0.05) - 0.5 * math.log(2 * math.pi)).mean())
    assert empirical == pytest.approx(expected_logp_per_dim(0.05), abs=0.02)  # the clipped draws' E[eps^2] ~ 1
    with pytest.raises(ConfigError, match=r"sigma_max=0.08 .* raise sigma_max above 0.089"):
        ReinFlow(sigma_min=0.02, sigma_max=0.08)
    ReinFlow(sigma_min=0.02, sigma_max=0.24)  # the clamp reaches only the lowest stds: allowed


def test_chain_log_likelihood_is_the_gaussian_chain_density(tmp_path):
    """Sampled chains stay within the noise bounds and the clip, and chain_logp equals the Gaussian density of every
    transition (torch.distributions), summed and divided by steps and dimensions."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    import numpy as np

    from alignrl.algorithms.base import PromptBatch
    from alignrl.backbones.sd3 import SD3Backbone

    bb = SD3Backbone.tiny(resolution=32)
    algo = ReinFlow(num_steps=3, guidance_scale=1.0, sigma_min=0.1, sigma_max=0.3)
    ctx = SimpleNamespace(backbone=bb, device=torch.device("cpu"), seed=0, iteration=0, autocast=nullcontext)
    batch = PromptBatch(prompts=["a red cat", "a blue dog"], metadata=[{}, {}], prompt_ids=np.array([0, 1]),
                        global_index=np.array([0, 1]))
    schedule = bb.make_schedule(3)
    cond = bb.encode_prompts(batch.prompts)
    text = cond.tensors["prompt_embeds"].float().mean(dim=1)
    algo._ensure_noise_net(ctx, int(text.shape[1]), 1)
    rows = torch.arange(2)
    chain = algo.sample_chains(ctx, batch, rows, schedule, cond, text)
    assert chain.shape[:2] == (2, 4)
    with torch.no_grad():
        logp, entropy, std = algo.chain_logp(ctx, chain, cond, text, schedule)
        want = torch.zeros(2)
        for k in range(3):
            v = bb.predict(chain[:, k], schedule.timesteps[k], cond, 1.0)
            mean = chain[:, k] + (schedule.sigmas[k + 1] - schedule.sigmas[k]) * v
            s = algo.stds(ctx, torch.full((2,), k), text).clamp(min=0.1).view(2, 1, 1, 1)
            assert bool(((s >= 0.1 - 1e-7) & (s <= 0.3 + 1e-7)).all())
            assert bool(((chain[:, k + 1] - mean).abs() <= 3 * s + 1e-5).all())  # draws clipped to 3 stds
            want += torch.distributions.Normal(mean, s.expand_as(mean)).log_prob(chain[:, k + 1]).flatten(1).sum(1)
    dims = chain[0, 0].numel()
    assert torch.allclose(logp, want / (3 * dims), atol=1e-5)


def test_reinflow_resumes_exactly_with_its_noise_network(tmp_path):
    args = [a for a in FAST if not a.startswith(("sampler.num_steps", "sampler.eval_num_steps"))] + [
        "recipe=tiny_reinflow", "trainer.max_steps=4", "trainer.checkpoint_every=2", "sampler.eval_num_steps=4",
        "algorithm.total_iterations=4"]  # the noise schedule's length, fixed for the run stopped at 2
    straight, split = tmp_path / "straight", tmp_path / "split"
    proc = run_inprocess("train", f"run_dir={straight}", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert run_inprocess("train", f"run_dir={split}", *args, "trainer.max_steps=2", cwd=tmp_path).returncode == 0
    proc = run_inprocess("train", f"run_dir={split}", *args, "resume=auto", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("trainable.safetensors", "rng/algorithm_rank_0.safetensors"):
        a = load_file(str(straight / "checkpoints" / "step_000004" / name))
        b = load_file(str(split / "checkpoints" / "step_000004" / name))
        assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
