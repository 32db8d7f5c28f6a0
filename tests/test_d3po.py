"""D3PO: pair preferences (scalar and Pareto), the pair loss and its gradient against the formula, the hard clamp,
and pairs that share their initial noise."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from alignrl.algorithms.d3po import D3PO, pair_preferences
from alignrl.errors import ConfigError
from alignrl.sampling.kernels import StepResult


def test_pair_preferences_scalar_ties_nonfinite_and_pareto():
    keys = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    r = np.array([1.0, 2.0, 3.0, 1.0, 5.0, 5.0, np.nan, 1.0])
    assert pair_preferences(r, keys).tolist() == [-1, 1, 1, -1, 0, 0, 0, 0]
    per = {"a": np.array([1.0, 2.0, 1.0, 2.0]), "b": np.array([1.0, 1.0, 2.0, 1.0])}
    # pair 0: (1,1) vs (2,1): the second dominates; pair 1: (1,2) vs (2,1): incomparable, a tie
    assert pair_preferences(np.zeros(4), np.array([0, 0, 1, 1]), per).tolist() == [-1, 1, 0, 0]
    with pytest.raises(ConfigError, match="pairs"):
        pair_preferences(np.zeros(3), np.array([0, 0, 0]))


def test_d3po_loss_and_gradient_equal_the_formula():
    algo = D3PO(beta=0.7, eps=0.2)
    theta = torch.tensor([0.05, -0.03, 0.1, 0.4], requires_grad=True)  # log-ratios; row 3 is beyond the band
    ref = StepResult(next_x=torch.zeros(4), logp_mean_per_dim=torch.tensor([0.3, -0.2, 0.0, 0.1]))
    pol = StepResult(next_x=torch.zeros(4), logp_mean_per_dim=ref.logp_mean_per_dim + theta)
    h = torch.tensor([1.0, -1.0, -1.0, 1.0])
    roots = torch.tensor([7, 7, 2, 2])  # two pairs
    loss, diag = algo.step_loss(pol, torch.zeros(4), h, ref, roots=roots)
    lo, hi = math.log(0.8), math.log(1.2)
    want = []
    for a, b in ((0, 1), (2, 3)):
        la, lb = (min(max(float(theta.detach()[i]), lo), hi) for i in (a, b))
        want.append(-math.log(1 / (1 + math.exp(-0.7 * (float(h[a]) * la + float(h[b]) * lb)))))
    assert torch.allclose(loss, torch.tensor([want[0], want[0], want[1], want[1]]), atol=1e-6)
    loss.sum().backward()
    # d/dtheta_a of 2 * L_pair (each pair's loss sits on both of its rows) = -2 beta h_a sigmoid(-z) inside the band
    z0 = 0.7 * (0.05 * 1 + -0.03 * -1)
    g0 = -2 * 0.7 * 1 / (1 + math.exp(z0))
    assert math.isclose(float(theta.grad[0]), g0, rel_tol=1e-5)
    assert float(theta.grad[3]) == 0.0  # clamped: no gradient outside [1 - eps, 1 + eps]
    assert diag["clipfrac"].tolist() == [0, 0, 0, 1]


def test_shared_noise_pairs_start_alike_and_then_differ():
    from alignrl.backbones.unet import SD15Backbone
    from alignrl.sampling.engine import rollout, sample_generators
    from alignrl.sampling.plans import SharedNoisePlanner

    bb = SD15Backbone.tiny()
    plan = SharedNoisePlanner(num_steps=3).plan()
    out = rollout(bb, plan, bb.encode_prompts(["a cat", "a dog"]), sample_generators(0, 0, range(2)))
    assert out.final.shape[0] == 4 and out.leaf_root.tolist() == [0, 0, 1, 1]
    first = out.records[0]
    assert torch.equal(first.x[0], first.x[1]) and torch.equal(first.x[2], first.x[3])  # one x_T per pair
    assert not torch.equal(first.x[0], first.x[2])
    assert not torch.equal(first.next_x[0], first.next_x[1])  # each image draws its own step noise
    assert all(len(r.x) == 4 for r in out.records) and len(out.records) == 3  # every step trained
    assert torch.isfinite(torch.stack([r.logp_old for r in out.records])).all()


def test_ddim_refuses_to_train_a_step_to_sigma_zero():
    from alignrl.sampling.kernels import ddim_step

    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(ConfigError, match="sigma 0"):
        ddim_step(x, torch.randn_like(x), 0.2, 0.0, noise_level=1.0, noise=torch.randn_like(x))


def test_human_mode_stores_ranked_trajectories_and_trains_on_them(tmp_path):
    """D3PO's human mode end to end: `alignrl data kind=trajectories` stores each prompt's K chains from one
    initial noise, drawn by the recipe's model (each stored step is a DDIM eta-1 draw of that model: unit
    z-scores; another model's are far off); a ranks file makes every pair of different ranks; a bad file or
    another plan is refused before training; training on the file learns its pairs (the pair loss falls below
    log 2, from log-ratios that start at 0)."""
    import json

    from alignrl.backbones.unet import SD15Backbone
    from alignrl.sampling.engine import apply_step
    from alignrl.sampling.plans import SharedNoisePlanner
    from alignrl.trajectories import TrajectoryStore
    from conftest import run_inprocess

    store_dir = tmp_path / "store"
    res = run_inprocess("data", "recipe=tiny_d3po", "kind=trajectories", f"out={store_dir}", "samples_per_prompt=3",
                        "num_prompts=4", "ranks=reward", "progress=false")
    assert res.returncode == 0, res.stderr[-2000:]
    ranks_file = store_dir / "ranks.jsonl"
    rows = [json.loads(x) for x in ranks_file.read_text().splitlines()]
    store = TrajectoryStore.load(str(ranks_file))
    want = sum(len({(a, b) for a in range(3) for b in range(a + 1, 3) if r["ranks"][a] != r["ranks"][b]})
               for r in rows)
    assert len(rows) == 4 and len(store.pairs) == want > 0
    assert all(rows[r]["ranks"][a] < rows[r]["ranks"][b] for r, a, b in store.pairs)  # the better one first

    chains = store.chains(0)  # (K, S + 1, *latent): one shared start
    assert chains.shape[:2] == (3, 7) and torch.equal(chains[0, 0], chains[1, 0])
    plan = SharedNoisePlanner(num_steps=6).plan()

    @torch.no_grad()
    def z2(bb):  # the mean squared z-score of the stored steps under bb's DDIM eta-1 step
        cond, sched, total = bb.encode_prompts([store.prompts[0]] * 3), bb.make_schedule(6), 0.0
        for j in range(6):
            x, nxt = chains[:, j], chains[:, j + 1]
            res = apply_step(bb, plan.steps[j], sched, j, x, bb.predict(x, sched.timesteps[j], cond, 5.0), next_x=nxt)
            total += float((((nxt - res.mean) / res.std) ** 2).mean()) / 6
        return total

    # tiny_d3po's backbone (backbone/tiny_sd15.yaml); 6 x 192 unit-variance dims: the mean is 1 +- 0.04
    assert 0.85 < z2(SD15Backbone.tiny(resolution=32, vae_channels=64)) < 1.15
    assert z2(SD15Backbone.tiny(seed=1, resolution=32, vae_channels=64)) > 2

    bad = store_dir / "ranks_unfinished.jsonl"  # a copy someone is still ranking
    bad.write_text(ranks_file.read_text().replace(json.dumps(rows[1]["ranks"]), "null", 1))
    with pytest.raises(ConfigError, match="line 2 .*'ranks' must list 3 integers"):
        TrajectoryStore.load(str(bad))
    other = run_inprocess("train", "recipe=tiny_d3po", f"algorithm.human_file={ranks_file}", "sampler.num_steps=4",
                          f"run_dir={tmp_path / 'other'}")
    assert other.returncode != 0 and "drawn with other settings: num_steps 6 (here 4)" in other.stderr

    run = tmp_path / "run"
    res = run_inprocess("train", "recipe=tiny_d3po", f"algorithm.human_file={ranks_file}", f"run_dir={run}",
                        "trainer.max_steps=4", "trainer.eval_every=0", "algorithm.lr=1e-3", "logger.plots=false")
    assert res.returncode == 0, res.stderr[-2000:]
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [m["policy_loss"] for m in metrics if "policy_loss" in m]
    assert len(losses) == 4 and abs(losses[0] - math.log(2)) < 0.02 and losses[-1] < math.log(2) - 0.05, losses
    assert all(m["reward/human_rank_mean"] < 0 for m in metrics if "policy_loss" in m)
