"""The GRPO-family plans, kernels and losses: evaluation counts, trained edges, tree advantages, ratios."""

import math

import numpy as np
import pytest
import torch

from alignrl.algorithms.guard import guard_log_ratio
from alignrl.config import compose, validate_batch_arithmetic
from alignrl.components import build_algorithm, build_planner
from alignrl.errors import ConfigError
from alignrl.sampling.engine import rollout, sample_generators
from alignrl.sampling.kernels import dance_sde_step, dpm_solver_2m_step, flow_sde_step, ode_step
from alignrl.sampling.plans import (BranchPlanner, DancePlanner, FastPlanner, MixGRPOPlanner, SideBranchPlanner)
from test_engine import CountingTransformer


def _run(backbone, plan, roots=2, prompts=None):
    counter = CountingTransformer(backbone.transformer)
    cond = backbone.encode_prompts(prompts or [f"prompt {i}" for i in range(roots)])
    out = rollout(backbone, plan, cond, sample_generators(0, 0, range(roots)), transformer=counter)
    return out, counter


# ---------------------------------------------------------------- every recipe builds
# (each recipe's planner, algorithm and backbone keys: tests/test_recipes.py, from its once-composed configs)


@pytest.mark.parametrize("recipe", ["mixgrpo_flux", "branchgrpo_flux", "g2rpo_flux", "dancegrpo_flux",
                                    "tempflow_sd35", "awm_sd35", "grpo_guard_sd35"])
def test_switching_backbone_is_one_override(recipe):
    for backbone in ("sd35_medium", "flux1_dev"):
        cfg = compose([f"recipe={recipe}", f"backbone={backbone}", "run_dir=/tmp/unused"])
        assert cfg.backbone.name.startswith(backbone.split("_")[0][:2])
        build_planner(cfg), build_algorithm(cfg)


# ---------------------------------------------------------------- kernels
def test_dance_kernel_and_dpm_solver_closed_forms():
    torch.manual_seed(0)
    x, v, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    s, s2, eta = 0.6, 0.5, 0.3
    res = dance_sde_step(x, v, s, s2, noise_level=eta, noise=eps)
    x0 = x - s * v
    score = -(x - (1 - s) * x0) / s**2
    mean = x + (s2 - s) * v - 0.5 * eta**2 * score * (s2 - s)
    std = eta * math.sqrt(s - s2)
    assert torch.allclose(res.mean, mean, atol=1e-6) and torch.allclose(res.next_x, mean + std * eps, atol=1e-6)
    logp = (-(eps * std) ** 2 / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)).mean(dim=(1, 2, 3))
    assert torch.allclose(res.logp_mean_per_dim, logp, atol=1e-5)
    # DPM-Solver++: first order from pure noise is x' = s' x + (1 - s') x0_hat (DDIM); the last step lands on x0_hat
    y, state = dpm_solver_2m_step(x, v, 1.0, s2, None)
    assert torch.allclose(y, s2 * x + (1 - s2) * (x - v), atol=1e-6)
    z, _ = dpm_solver_2m_step(y, v, s2, 0.0, state)
    assert torch.allclose(z, y - s2 * v, atol=1e-6)
    # on a straight flow (constant v) every solver is exact: 2M equals Euler
    x1 = torch.randn(2, 4)
    d = torch.randn(2, 4)
    vel = x1 - d  # x_t = (1 - t) d + t x1 has velocity x1 - d everywhere
    xt, st = x1.clone(), None
    grid = [1.0, 0.7, 0.45, 0.2, 0.0]
    for a, b in zip(grid, grid[1:]):
        xt, st = dpm_solver_2m_step(xt, vel, a, b, st)
    assert torch.allclose(xt, d, atol=1e-5)
    assert torch.allclose(ode_step(x1, vel, 1.0, 0.0).next_x, d, atol=1e-6)


def test_guard_log_ratio_matches_its_closed_form():
    torch.manual_seed(1)
    x, v_old, eps = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    old = flow_sde_step(x, v_old, 0.7, 0.6, noise_level=0.7, sigma_max_guard=0.9, noise=eps)
    v_new = v_old + 0.05 * torch.randn_like(v_old)
    new = flow_sde_step(x, v_new, 0.7, 0.6, noise_level=0.7, sigma_max_guard=0.9, next_x=old.next_x)
    got = guard_log_ratio(new, old.logp_mean_per_dim, old.mean)
    # (logp - logp_old + ||mu - mu_old||^2 / (2 s^2)) * s = mean((mu - mu_old) * eps)
    want = ((new.mean - old.mean) * eps).mean(dim=(1, 2, 3))
    assert torch.allclose(got, want, atol=1e-5)
    same = flow_sde_step(x, v_old, 0.7, 0.6, noise_level=0.7, sigma_max_guard=0.9, next_x=old.next_x)
    assert torch.equal(torch.exp(guard_log_ratio(same, old.logp_mean_per_dim, old.mean)), torch.ones(4))


# ---------------------------------------------------------------- plans: evaluation counts and trained edges
def test_branchgrpo_tree_counts_and_edges(tiny_sd3):
    planner = BranchPlanner(num_steps=20, split_points=(0, 3, 6, 9), branch_factor=2, guidance_scale=1.0)
    plan = planner.plan()
    # live trajectories: 2 for steps 0-2, 4 for 3-5, 8 for 6-8, 16 for 9-19
    assert plan.model_evals(1) == 2 * 3 + 4 * 3 + 8 * 3 + 16 * 11 == 218
    assert plan.leaves_per_root == 16
    out, counter = _run(tiny_sd3, plan, roots=1)
    assert counter.rows == 218 and out.model_evals == 218 and out.final.shape[0] == 16
    assert [r.step for r in out.records] == list(range(19))  # every stochastic edge but the last step
    assert [r.node_key for r in out.records][:4] == [1, 1, 1, 2] and out.records[-1].node_key == 4
    # independent trajectories would need 16 x 20 = 320 evaluations for the same 16 leaves
    assert plan.model_evals(1) / 16 < 20
    pruned = BranchPlanner(num_steps=20, split_points=(0, 3, 6, 9), prune_depths=(1, 2)).plan()
    assert pruned.trained_steps == list(range(6, 19)) and pruned.model_evals(1) == 218  # rollout unchanged
    mix = BranchPlanner(num_steps=20, split_points=(0, 3, 6, 9), mix=True, mix_window=2).plan()
    assert mix.trained_steps == [0, 1, 3, 4, 6, 7, 9, 10]
    assert all(s.kind == "ode" for i, s in enumerate(mix.steps) if i not in mix.trained_steps)


def test_mixgrpo_windows_and_flash_compression(tiny_sd3):
    p = MixGRPOPlanner(num_steps=25, window_size=4, shift_interval=2, window_stride=1)
    starts = []
    for it in range(8):
        p.begin_iteration(it, torch.Generator().manual_seed(it))
        starts.append(p.window[0])
    assert starts == [0, 0, 1, 1, 2, 2, 3, 3]
    plan = p.plan()
    assert plan.trained_steps == [3, 4, 5, 6] and plan.model_evals(1) == 25
    state = p.state_dict()
    q = MixGRPOPlanner(num_steps=25, window_size=4, shift_interval=2)
    q.load_state_dict(state)
    q.begin_iteration(8, torch.Generator())
    p.begin_iteration(8, torch.Generator())
    assert q.window == p.window == (4, 8)  # the window survives a resume
    # the window stops at T - w (or rolls back to 0)
    end = MixGRPOPlanner(num_steps=6, window_size=4, shift_interval=1)
    back = MixGRPOPlanner(num_steps=6, window_size=4, shift_interval=1, roll_back=True)
    for it in range(5):
        end.begin_iteration(it, torch.Generator())
        back.begin_iteration(it, torch.Generator())
    assert end.window[0] == 2 and back.window[0] == 1
    # random: the same draw for the same iteration generator on every rank
    r1, r2 = (MixGRPOPlanner(num_steps=25, strategy="random") for _ in range(2))
    r1.begin_iteration(5, torch.Generator().manual_seed(11))
    r2.begin_iteration(5, torch.Generator().manual_seed(11))
    assert r1.window == r2.window
    # decay: the interval shrinks from shift_interval towards 1 as the window advances
    d = MixGRPOPlanner(num_steps=25, window_size=4, strategy="decay", shift_interval=10)
    first = d.interval()
    d._start = d.max_start
    assert first == 10 and d.interval() == 1
    # Flash: L = l + w, the tail compressed to int(max((T - L) * 0.4, 1)) DPM-Solver++ steps
    flash = MixGRPOPlanner(num_steps=25, window_size=4, window_start=2, ode_after="dpm2m", compress_ratio=0.4)
    fplan = flash.plan()
    tail = int(max((25 - 6) * 0.4, 1))
    assert fplan.model_evals(1) == 6 + tail == 13 and fplan.trained_steps == [2, 3, 4, 5]
    assert [s.kind for s in fplan.steps[6:]] == ["dpm2m"] * tail
    out, counter = _run(tiny_sd3, replace_guidance(fplan), roots=2)
    assert counter.rows == 2 * 13 and [r.step for r in out.records] == [2, 3, 4, 5]
    assert torch.isfinite(out.final).all()


def replace_guidance(plan):
    from dataclasses import replace

    return replace(plan, guidance_scale=1.0)


def test_fast_windows_and_branched_variant(tiny_sd3):
    p = FastPlanner(num_steps=10, window_size=2)
    starts = {p.plan(torch.Generator().manual_seed(s)).trained_steps[0] for s in range(60)}
    assert starts == set(range(0, 8))  # window inside [0, T - 1): the last step never trained
    branched = FastPlanner(num_steps=10, window_size=2, branched=True, branches=4)
    plan = replace_guidance(branched.plan(torch.Generator().manual_seed(3)))
    l0 = plan.trained_steps[0]
    assert plan.model_evals(1) == l0 + 4 * (10 - l0) and plan.leaves_per_root == 4
    out, counter = _run(tiny_sd3, plan, roots=1)
    assert counter.rows == plan.model_evals(1) and len(out.records) == 2 and out.records[0].x.shape[0] == 4


def test_side_branch_plans_count_children_and_granularities(tiny_sd3):
    tf = SideBranchPlanner(num_steps=10, branch_steps=(0, 2, 4, 6), children=3, guidance_scale=1.0).plan()
    # trunk to the last branch step (6) + per branch step i: children x (1 SDE + (T - i - 1) ODE)
    want = 6 + 3 * (10 + 8 + 6 + 4)
    assert tf.model_evals(1) == want
    out, counter = _run(tiny_sd3, tf, roots=2)
    assert counter.rows == 2 * want and out.final.shape[0] == 2 * 12
    assert [r.step for r in out.records] == [0, 2, 4, 6] and all(r.x.shape[0] == 6 for r in out.records)
    # every child of a branch starts from the same trunk latent
    assert torch.equal(out.records[1].x[0], out.records[1].x[2])
    g2 = SideBranchPlanner(num_steps=10, branch_steps=(0, 4), children=2, granularities=(1, 2),
                           guidance_scale=1.0).plan()
    # per child: 1 SDE step + 9 (g=1) + 5 (g=2) ODE steps from step 0; 1 + 5 + 3 from step 4
    assert g2.model_evals(1) == 4 + 2 * (1 + 9 + 5) + 2 * (1 + 5 + 3)
    out, counter = _run(tiny_sd3, g2, roots=1)
    assert counter.rows == g2.model_evals(1) and out.final.shape[0] == g2.leaves_per_root == 8
    assert out.leaf_tag.tolist() == [0, 1] * 4


def test_dance_plan_trains_a_subset_per_sample():
    plan = DancePlanner(num_steps=16, timestep_fraction=0.6).plan()
    assert plan.trained_steps == list(range(15)) and plan.sample_fraction == 0.6
    assert all(s.kind == "dance" for s in plan.steps)
    x0 = DancePlanner(num_steps=16, final_step="ode").plan()  # the reference scores the last step's x0 prediction
    assert x0.trained_steps == plan.trained_steps and [s.kind for s in x0.steps] == ["dance"] * 15 + ["ode"]
    with pytest.raises(ConfigError, match="final_step='x0' is not known"):
        DancePlanner(final_step="x0")


def test_bad_plans_are_refused():
    with pytest.raises(ConfigError, match="split_points"):
        BranchPlanner(num_steps=10, split_points=(0, 9))
    with pytest.raises(ConfigError, match="strategy"):
        MixGRPOPlanner(strategy="sideways")
    with pytest.raises(ConfigError, match="window_range"):
        FastPlanner(num_steps=4, window_size=3, window_range=(0, 2))
    with pytest.raises(ConfigError, match="prunes every"):
        BranchPlanner(num_steps=10, split_points=(0, 3), prune_depths=(1, 2))
    with pytest.raises(ConfigError, match="group_size must be >= 2"):
        validate_batch_arithmetic(compose(["recipe=tiny_flowgrpo", "algorithm.group_size=1", "run_dir=/tmp/u"]), 1)


# ---------------------------------------------------------------- the trainer on trees and windows
def _trainer(tmp_path, recipe, *extra):
    from accelerate.state import AcceleratorState

    from alignrl.training.trainer import Trainer

    AcceleratorState._reset_state()
    cfg = compose([f"recipe={recipe}", f"run_dir={tmp_path}", "trainer.max_steps=2", "logger.progress_bar=false",
                   "trainer.eval_every=0", "trainer.checkpoint_every=0", "trainer.log_images_every=0", *extra])
    return Trainer(cfg, tmp_path)


def test_tree_advantages_match_a_hand_computed_example(tmp_path):
    t = _trainer(tmp_path, "tiny_branchgrpo", "sampler.num_steps=4", "sampler.split_points=[0,2]",
                 "data.groups_per_iteration=2", "trainer.rollout_batch_size=2", "trainer.train_batch_size=1",
                 "algorithm.std_eps=0.0")
    t.timing = {}
    batch = t.collect()
    t.reward_runner.close()
    assert len(batch.leaf_root) == 8 and batch.leaf_root.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    batch.rewards = np.array([1.0, 2.0, 3.0, 5.0, 0.0, 0.0, 4.0, 4.0])
    result = t.advantages(batch)
    adv, keep, stats = result.transition, result.transition_keep, result.stats
    # tree 0: depth-1 nodes fuse {1, 2} -> 1.5 and {3, 5} -> 4: mean 2.75, std 1.25 -> -1, +1;
    # depth-2 nodes are the leaves: (r - 2.75) / std([1, 2, 3, 5])
    leaf_std = np.std([1.0, 2.0, 3.0, 5.0])
    got = {(int(s), int(lo)): (a, k) for s, lo, a, k in zip(batch.t_from, batch.t_leaf_lo, adv, keep)}
    for step in (0, 1):
        assert got[(step, 0)][0] == pytest.approx(-1.0) and got[(step, 2)][0] == pytest.approx(1.0)
    for leaf, r in enumerate([1.0, 2.0, 3.0, 5.0]):
        assert got[(2, leaf)][0] == pytest.approx((r - 2.75) / leaf_std)
    # tree 1: depth-1 nodes 0 and 4 -> -1, +1; the leaves tie in pairs but not overall
    assert got[(0, 4)][0] == pytest.approx(-1.0) and got[(0, 6)][0] == pytest.approx(1.0)
    assert got[(2, 4)][0] == pytest.approx(-1.0) and got[(2, 7)][0] == pytest.approx(1.0)
    assert all(k for _, k in got.values())
    assert stats["nodes"] == 2 * (2 + 4)
    # the last step (3) is never trained; steps 0-1 have 2 edges per tree, step 2 has 4
    assert sorted(batch.t_from.tolist()) == [0] * 4 + [1] * 4 + [2] * 8


def test_width_pruning_keeps_best_and_worst_edges(tmp_path):
    t = _trainer(tmp_path, "tiny_branchgrpo", "sampler.num_steps=4", "sampler.split_points=[0,2]",
                 "sampler.width_prune_ratio=0.5", "data.groups_per_iteration=2", "trainer.rollout_batch_size=2",
                 "trainer.train_batch_size=1")
    t.timing = {}
    batch = t.collect()
    t.reward_runner.close()
    batch.rewards = np.array([1.0, 2.0, 3.0, 5.0, 0.0, 1.0, 4.0, 6.0])
    result = t.advantages(batch)
    adv, keep = result.transition, result.transition_keep
    last = {int(lo): bool(k) for s, lo, k in zip(batch.t_from, batch.t_leaf_lo, keep) if int(s) == 2}
    assert last == {0: True, 1: False, 2: False, 3: True, 4: True, 5: False, 6: False, 7: True}
    assert all(k for s, k in zip(batch.t_from, keep) if int(s) < 2)  # pruning only after the last split


def test_g2rpo_advantage_sums_granularities(tmp_path):
    t = _trainer(tmp_path, "tiny_g2rpo", "sampler.branch_steps=[1]", "sampler.children=2",
                 "data.groups_per_iteration=2", "trainer.rollout_batch_size=2", "trainer.train_batch_size=1",
                 "algorithm.std_eps=0.0")
    t.timing = {}
    batch = t.collect()
    t.reward_runner.close()
    # per root: child 0 (g1, g2), child 1 (g1, g2)
    batch.rewards = np.array([1.0, 0.0, 3.0, 2.0, 5.0, 5.0, 5.0, 1.0])
    result = t.advantages(batch)
    adv, keep = result.transition, result.transition_keep
    by_leaf = {int(lo): a for lo, a in zip(batch.t_leaf_lo, adv)}
    # root 0: g1 rewards {1, 3} -> -1, +1; g2 {0, 2} -> -1, +1: children -2 and +2
    assert by_leaf[0] == pytest.approx(-2.0) and by_leaf[2] == pytest.approx(2.0)
    # root 1: g1 ties (5, 5) -> no signal; g2 {5, 1} -> +1, -1
    assert by_leaf[4] == pytest.approx(1.0) and by_leaf[6] == pytest.approx(-1.0)


def test_dance_subsets_are_per_sample_and_reproducible(tmp_path):
    t = _trainer(tmp_path, "tiny_dancegrpo")
    t.timing = {}
    a = t.collect()
    b = t.collect()
    t.reward_runner.close()
    per_root = np.bincount(a.t_root.numpy())
    assert set(per_root.tolist()) == {int(5 * 0.6)}  # 3 of the 5 trainable steps per sample
    assert torch.equal(a.t_from, b.t_from)  # the same (seed, iteration, sample) draws the same subset
    subsets = {tuple(sorted(a.t_from[a.t_root == r].tolist())) for r in range(len(a.prompts))}
    assert len(subsets) > 1  # different samples train different steps


def test_tempflow_weights_each_transition_by_its_step_noise(tmp_path):
    """noise_aware_weight: a transition's loss weight is its step's Gaussian std itself (the loss divides by the
    weights' sum over all ranks, so the reference's constant factor cancels and nothing depends on the ranks)."""
    t = _trainer(tmp_path, "tiny_tempflow")
    t.timing = {}
    batch = t.collect()
    t.reward_runner.close()
    stds = {}
    for i in range(len(batch.t_from)):
        stds.setdefault(int(batch.t_from[i]), set()).add(round(float(batch.t_weight[i]), 6))
    assert len(stds) > 1 and all(len(v) == 1 for v in stds.values())  # one weight per branch step
    weights = [next(iter(stds[k])) for k in sorted(stds)]
    assert weights == sorted(weights, reverse=True) and weights[-1] > 0  # noise shrinks along the trajectory


def test_init_same_noise_starts_a_group_from_one_noise(tmp_path):
    """sampler.init_same_noise: the images of one prompt's group share their initial noise (DanceGRPO's
    init_same_noise), keyed by the prompt so it does not depend on batching; groups differ; the SDE steps after
    it still draw per-sample noise, so the group's images differ."""
    t = _trainer(tmp_path, "tiny_dancegrpo", "sampler.init_same_noise=true", "sampler.timestep_fraction=1.0",
                 "trainer.rollout_batch_size=2")
    t.timing = {}
    batch = t.collect()
    t.reward_runner.close()
    first = batch.t_from == 0
    starts, prompts = batch.x[first], [batch.prompts[int(r)] for r in batch.t_root[first]]
    for i in range(len(prompts)):
        for j in range(len(prompts)):
            assert torch.equal(starts[i], starts[j]) == (prompts[i] == prompts[j])
    nxt = batch.next_x[first]
    pairs = [(i, j) for i in range(len(prompts)) for j in range(i + 1, len(prompts)) if prompts[i] == prompts[j]]
    assert pairs and all(not torch.equal(nxt[i], nxt[j]) for i, j in pairs)


@pytest.mark.parametrize("recipe", ["tiny_flowgrpo_fast", "tiny_mixgrpo_flash", "tiny_dancegrpo", "tiny_grpo_guard",
                                    "tiny_branchgrpo", "tiny_tempflow", "tiny_awm", "tiny_nft", "tiny_ddpo"])
def test_every_method_updates_on_policy(tmp_path, recipe):
    """One iteration of each method through the trainer; losses with a ratio start exactly on-policy."""
    t = _trainer(tmp_path, recipe, "trainer.updates_per_iteration=1")
    t.timing = {}
    before = [p.detach().clone() for p in t.params]
    metrics = t.run_iteration()
    t.reward_runner.close()
    assert metrics["optimizer_steps"] == 1 and np.isfinite(metrics["policy_loss"])
    assert metrics["ratio_dev_before_update"] == 0.0
    assert any(not torch.equal(b, p) for b, p in zip(before, t.params))


def test_mixgrpo_window_survives_resume_exactly(tmp_path):
    """The sliding window is part of the checkpoint: stop after 3 iterations, resume to 6, same weights."""
    from safetensors.torch import load_file

    from conftest import FAST, run_inprocess

    args = ["recipe=tiny_mixgrpo", *FAST, "sampler.num_steps=6", "sampler.window_size=2", "sampler.shift_interval=1",
            "trainer.max_steps=6"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_inprocess("train", f"run_dir={straight}", *args).returncode == 0
    assert run_inprocess("train", f"run_dir={split}", *args, "trainer.max_steps=3").returncode == 0
    state = __import__("json").loads((split / "checkpoints" / "step_000003" / "state.json").read_text())
    assert state["planner"]["start"] == 2  # moved at iterations 1 and 2
    proc = run_inprocess("train", f"run_dir={split}", *args, "resume=auto")
    assert proc.returncode == 0, proc.stderr[-2000:]
    a = load_file(str(straight / "checkpoints" / "step_000006" / "trainable.safetensors"))
    b = load_file(str(split / "checkpoints" / "step_000006" / "trainable.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# iterations per method; measured gain / first-4 std at 12 iterations (2 CPU cores): fast 2.9, mixgrpo 2.8,
# flash 3.6, guard 4.9, branch 2.7, tempflow 2.8, g2rpo 2.4, awm 3.3; nft (1.0) needs 16 (6.4 there). dance at
# lr 1e-2 stalled on seed 42 on an AVX-512 machine (0.4 at 16 and 20 iterations; seeds 1-5: 3.3 to 5.8), at lr
# 5e-3 (its recipe since 2026-12-03) it gains on every seed in 20 iterations: 1.5 (seed 42) to 4.8 (seeds 1-5),
# the same with torch's AVX2 kernels; 22 here for margin. The test asks for > 1. (The UNet-born methods and ReinFlow: tests/test_new_methods.py.)
LEARNING = {
    "tiny_flowgrpo_fast": 12, "tiny_mixgrpo": 12, "tiny_mixgrpo_flash": 12, "tiny_dancegrpo": 22,
    "tiny_grpo_guard": 12, "tiny_branchgrpo": 12, "tiny_tempflow": 12, "tiny_g2rpo": 12, "tiny_awm": 12,
    "tiny_nft": 16,
}


def assert_reward_rises(tmp_path, recipe: str, n: int, *overrides: str) -> None:
    """``n`` iterations of ``recipe`` (with ``overrides``) through the trainer: the last four iterations' mean
    training reward beats the first four's by more than their mean within-batch std."""
    t = _trainer(tmp_path, recipe, f"trainer.max_steps={n}", *overrides)
    rewards, stds = [], []
    try:
        for _ in range(n):
            t.timing = {}
            m = t.run_iteration()
            t.iteration += 1
            rewards.append(m["reward_mean"])
            stds.append(m["reward_std"])
    finally:
        t.reward_runner.close()
    k = 4
    first, last = np.mean(rewards[:k]), np.mean(rewards[-k:])
    assert last - first > np.mean(stds[:k]), (recipe, first, last, np.mean(stds[:k]))


@pytest.mark.parametrize("recipe", sorted(LEARNING))
def test_every_tiny_method_raises_its_reward(tmp_path, recipe):
    """Each method's tiny twin trains through the one trainer and lifts the tiny task's reward."""
    assert_reward_rises(tmp_path, recipe, LEARNING[recipe])


def test_nft_old_policy_is_the_ema(tmp_path):
    """old_policy=ema: the EMA weights draw the rollouts (and give v_old); sampling: the live weights do."""
    t = _trainer(tmp_path / "ema", "tiny_nft", "algorithm.old_policy=ema")
    t.timing = {}
    live = [p.detach().clone() for p in t.params]
    a = t.collect()  # EMA == live weights at the start
    with torch.no_grad():
        for s in t.ema.shadow:
            s.add_(0.05 * torch.randn_like(s))
    b = t.collect()
    assert not torch.equal(a.leaf_x0, b.leaf_x0)  # the perturbed EMA drew these
    assert all(torch.equal(x, p) for x, p in zip(live, t.params))  # live weights restored after the rollout
    t.algorithm.old_policy = "sampling"
    c = t.collect()
    t.reward_runner.close()
    assert torch.equal(a.leaf_x0, c.leaf_x0)  # the live weights draw again
    with pytest.raises(ConfigError, match="trainer.ema.enabled=true"):
        _trainer(tmp_path / "no_ema", "tiny_nft", "algorithm.old_policy=ema", "trainer.ema.enabled=false")


def test_compiled_blocks_sample_the_same_and_train_alike(tmp_path):
    """trainer.compile=true compiles each repeated block in place (parameter names unchanged). With the tracing-only
    backend (aot_eager) the rollout is bit for bit the eager one and the update agrees to float rounding (its
    backward decomposes ops: 1e-8 on gradients, 5e-5 on weights after Adam's two steps of ~1e-2, which amplify
    near-zero gradients; measured); inductor's fused kernels differ by ~1e-6 in the forward (the bench)."""
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["trainer.compile=true", "trainer.compile_backend=aot_eager"])):
        t = _trainer(tmp_path / name, "tiny_flowgrpo", "sampler.num_steps=4", "data.groups_per_iteration=2",
                     "algorithm.group_size=4", "trainer.rollout_batch_size=4", "trainer.train_batch_size=4", *extra)
        t.timing = {}
        m = t.run_iteration()
        t.reward_runner.close()
        runs[name] = (m, dict(zip(t.trainable_names, [p.detach().clone() for p in t.params])), t)
    (m0, w0, t0), (m1, w1, t1) = runs["eager"], runs["compiled"]
    assert all(hasattr(b, "_compiled_call_impl") and b._compiled_call_impl is not None
               for b in t1.denoiser.transformer_blocks)
    assert not any(getattr(b, "_compiled_call_impl", None) for b in t0.denoiser.transformer_blocks)
    assert w0.keys() == w1.keys()
    assert m0["reward_mean"] == m1["reward_mean"] and m0["policy_loss"] == pytest.approx(m1["policy_loss"], abs=1e-6)
    assert max(float((w0[k] - w1[k]).abs().max()) for k in w0) < 1e-4
    with pytest.raises(ConfigError, match="trainer.compile_backend='nope' is not a torch.compile backend"):
        _trainer(tmp_path / "bad", "tiny_flowgrpo", "trainer.compile=true", "trainer.compile_backend=nope")
