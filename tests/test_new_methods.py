"""The methods born on UNets (DDPO, D3PO, DPOK, SPO) and ReinFlow: each tiny twin lifts the tiny task's JPEG reward
through the trainer (a file of its own, so test workers split the learning runs; DDPO's on-policy first update is
checked with the other PPO methods in tests/test_plans.py)."""

from __future__ import annotations

import pytest

from test_plans import assert_reward_rises


# iterations per method and the measured gain / first-4 std (the test asks for > 1), with the recipe's seed 42 and
# with seed 1: ddpo (tiny SD1.5, 32px) 3.2 / 2.2, d3po 6.6, dpok 4.3 / 6.2 under the test workers' one thread (its
# value baseline needs value_lr 1e-2 to learn in 12 iterations: at 1e-3 it gave -3.4 / 6.4), spo at lr 3e-3
# and 10 iterations 1.7 to 4.9 on seeds 42 and 1-5, with torch's AVX-512 and with its AVX2 kernels (at lr 1e-2 it
# jumps in its first iterations, then drifted back on seeds 42 and 1 on an AVX-512 machine: -1.5 / -3.8), reinflow
# (tiny SD3, 4 steps) 2.9 / 1.15. Other learning rates were worse for reinflow (2e-2: -2.5 / -2.2). The runs are
# chaotic: the same seed gave other trajectories with the thread count set in the shell instead of in-process.
# ReinFlow's gain is seed-dependent (2026-12-02, the VAE in channels-last layout, which moves every run by float
# rounding: -2.9 / 0.0 / +2.7 for seeds 42 / 1 / 2; docs/benchmarks.md): its test holds for the
# recipe's seed with the shipped layout, and does not yet show that the tiny ReinFlow learns on every seed.
LEARNING = {"tiny_ddpo": 12, "tiny_d3po": 12, "tiny_dpok": 12, "tiny_spo": 10, "tiny_reinflow": 12}


@pytest.mark.parametrize("recipe", sorted(LEARNING))
def test_every_new_tiny_method_raises_its_reward(tmp_path, recipe):
    assert_reward_rises(tmp_path, recipe, LEARNING[recipe])
