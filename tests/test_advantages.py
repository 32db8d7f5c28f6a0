"""Group-normalised advantages, the PPO-clip loss and the KL term."""

import numpy as np
import pytest
import torch

from alignrl.algorithms.advantages import GroupStatTracker
from alignrl.algorithms.flowgrpo import FlowGRPO, ppo_clip
from alignrl.sampling.kernels import StepResult


def test_per_prompt_std_by_hand():
    rewards = np.array([1.0, 3.0, 10.0, 20.0, 30.0, 40.0])
    keys = np.array([0, 0, 1, 1, 1, 1])
    res = GroupStatTracker(global_std=False, std_eps=1e-4).compute(rewards, keys)
    # group 0: mean 2, population std 1; group 1: mean 25, std sqrt(125)
    expect0 = np.array([-1, 1]) / (1 + 1e-4)
    expect1 = (np.array([10, 20, 30, 40]) - 25) / (np.sqrt(125) + 1e-4)
    assert np.allclose(res.advantages, np.concatenate([expect0, expect1]))
    assert res.keep.all()


def test_global_std_keeps_per_prompt_mean():
    rewards = np.array([1.0, 3.0, 10.0, 12.0])
    keys = np.array([5, 5, 9, 9])
    res = GroupStatTracker(global_std=True, std_eps=1e-4).compute(rewards, keys)
    std = rewards.std()  # population std over the batch
    assert np.allclose(res.advantages, np.array([-1, 1, -1, 1]) / (std + 1e-4))


def test_clamp_and_zero_std_groups_dropped():
    rewards = np.array([0.0, 0.0, 0.0, 1000.0, 2.0, 2.0, 2.0])
    keys = np.array([0, 0, 0, 0, 1, 1, 1])
    res = GroupStatTracker(global_std=False, adv_clip_max=5.0).compute(rewards, keys)
    assert res.advantages.max() <= 5.0 and res.advantages.min() >= -5.0
    assert res.keep.tolist() == [True, True, True, True, False, False, False]
    assert np.all(res.advantages[4:] == 0)
    assert res.stats["zero_std_group_frac"] == 0.5


def test_nonfinite_rewards_drop_only_their_sample():
    rewards = np.array([1.0, np.nan, 3.0, np.inf, 5.0, 7.0])
    keys = np.array([0, 0, 0, 1, 1, 1])
    res = GroupStatTracker(global_std=False).compute(rewards, keys)
    assert res.keep.tolist() == [True, False, True, False, True, True]
    assert res.stats["nonfinite_rewards"] == 2
    assert np.allclose(res.advantages[[0, 2]], [-1 / (1 + 1e-4), 1 / (1 + 1e-4)])


def test_groups_keyed_by_id_not_position():
    rewards = np.array([1.0, 10.0, 3.0, 20.0])
    keys = np.array([0, 1, 0, 1])  # interleaved, as the sampler spreads groups
    res = GroupStatTracker(global_std=False).compute(rewards, keys)
    assert np.allclose(res.advantages, [-1, -1, 1, 1], atol=1e-3)


def test_stat_buffer_persists_and_round_trips():
    t = GroupStatTracker(global_std=False, buffer_size=4, min_count=3)
    t.compute(np.array([1.0, 2.0]), np.array([0, 0]))
    state = t.state_dict()
    t2 = GroupStatTracker(global_std=False, buffer_size=4, min_count=3)
    t2.load_state_dict(state)
    r1 = t.compute(np.array([3.0, 4.0]), np.array([0, 0]))
    r2 = t2.compute(np.array([3.0, 4.0]), np.array([0, 0]))
    assert np.allclose(r1.advantages, r2.advantages)
    hist = np.array([1.0, 2.0, 3.0, 4.0])  # buffer now holds all four
    assert np.allclose(r1.advantages, (np.array([3.0, 4.0]) - hist.mean()) / (hist.std() + 1e-4))


def test_ppo_clip_on_policy_and_clipping():
    logp = torch.tensor([0.1, 0.2, 0.3], requires_grad=True)
    adv = torch.tensor([1.0, -1.0, 2.0])
    loss, diag = ppo_clip(logp, logp.detach(), adv, 1e-4)
    assert torch.equal(diag["ratio"], torch.ones(3))
    assert torch.allclose(loss, -adv)
    loss.sum().backward()
    assert torch.allclose(logp.grad, -adv)  # gradient of -A ratio at ratio 1
    # far off-policy with positive advantage: the clipped branch takes over, no gradient
    logp2 = torch.tensor([0.5], requires_grad=True)
    loss2, diag2 = ppo_clip(logp2, torch.tensor([0.0]), torch.tensor([1.0]), 1e-4)
    loss2.sum().backward()
    assert diag2["clipfrac"].item() == 1.0 and logp2.grad.item() == 0.0
    assert loss2.item() == pytest.approx(-(1 + 1e-4))


def test_kl_term_matches_reference_formula():
    algo = FlowGRPO(beta=0.5, clip_range=1e-4)
    mean = torch.randn(2, 3, 4, 4)
    ref_mean = mean + 0.1
    std_t = torch.tensor(0.7)
    policy = StepResult(next_x=mean, mean=mean, std=std_t, logp_mean_per_dim=torch.zeros(2), std_t=std_t)
    reference = StepResult(next_x=mean, mean=ref_mean, std=std_t, logp_mean_per_dim=torch.zeros(2), std_t=std_t)
    loss, diag = algo.step_loss(policy, torch.zeros(2), torch.zeros(2), reference)
    kl = torch.full((2,), 0.01 / (2 * 0.49))
    assert torch.allclose(diag["kl"], kl, atol=1e-6)
    assert torch.allclose(loss, 0.5 * kl, atol=1e-6)  # zero advantage: only the KL remains


def test_ddpo_tracker_against_hand_computed_buffers():
    """DDPO's per-prompt tracker (buffer 3, min_count 2, std + 1e-6): a prompt with fewer than min_count rewards in
    its buffer uses the whole batch's mean and std; once it has enough, its buffer's (the current rewards already in
    it); the oldest fall out of a full buffer. Values computed by hand."""
    t = GroupStatTracker(global_std=False, std_eps=1e-6, adv_clip_max=1e9, buffer_size=3, min_count=2)
    # iteration 1: prompt 7 has one reward (< min_count: batch stats), prompt 9 two (its own buffer)
    r1 = t.compute(np.array([1.0, 4.0, 6.0]), np.array([7, 9, 9]))
    batch = np.array([1.0, 4.0, 6.0])
    assert np.allclose(r1.advantages[0], (1.0 - batch.mean()) / (batch.std() + 1e-6))
    assert np.allclose(r1.advantages[1:], (np.array([4.0, 6.0]) - 5.0) / (1.0 + 1e-6))
    # iteration 2: prompt 7 now holds [1, 3] (own stats); prompt 9's buffer [4, 6, 8, 10] keeps the newest 3
    r2 = t.compute(np.array([3.0, 8.0, 10.0]), np.array([7, 9, 9]))
    assert np.allclose(r2.advantages[0], (3.0 - 2.0) / (1.0 + 1e-6))
    hist = np.array([6.0, 8.0, 10.0])
    assert np.allclose(r2.advantages[1:], (np.array([8.0, 10.0]) - hist.mean()) / (hist.std() + 1e-6))
    assert list(t.buffers[9]) == [6.0, 8.0, 10.0] and list(t.buffers[7]) == [1.0, 3.0]


def test_unbiased_std_option_scales_advantages_by_the_bessel_factor():
    """std_ddof=1 (DanceGRPO's torch.std) divides by the unbiased std: advantages are sqrt((n-1)/n) of the
    population-std ones (with a negligible std_eps), per group and with a global std alike."""
    import numpy as np

    from alignrl.algorithms.advantages import GroupStatTracker

    rng = np.random.default_rng(0)
    rewards, keys = rng.normal(size=12), np.repeat([0, 1, 2], 4)
    for global_std, n in ((False, 4), (True, 12)):
        pop = GroupStatTracker(global_std=global_std, std_eps=1e-12).compute(rewards, keys).advantages
        unb = GroupStatTracker(global_std=global_std, std_eps=1e-12, std_ddof=1).compute(rewards, keys).advantages
        assert np.allclose(unb, pop * np.sqrt((n - 1) / n))
    one = GroupStatTracker(global_std=False, std_ddof=1).compute(np.array([1.0]), np.array([0]))
    assert not one.keep.any() and one.advantages.tolist() == [0.0]  # a group of one carries no signal
