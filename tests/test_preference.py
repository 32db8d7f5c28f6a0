"""The preference family's objectives against closed forms on hand-made numbers."""

from __future__ import annotations

import math

import pytest
import torch

from alignrl.algorithms.preference import (LOG2, ddo_loss, dpo_loss, dro_loss, kto_loss, kto_reference_point,
                                           rankdpo_loss, rwr_weights, smpo_soft_weight)
from alignrl.errors import ConfigError


def t(*v):
    return torch.tensor(v, dtype=torch.float64)


def test_dpo_with_identical_winner_and_loser_is_log_2():
    e = t(0.3, 0.7, 1.1)
    loss, diag = dpo_loss(e, e, t(0.2, 0.5, 0.9), t(0.2, 0.5, 0.9), beta=5000.0)
    assert torch.allclose(loss, torch.full_like(loss, LOG2))
    assert diag["implicit_acc"].tolist() == [0.5, 0.5, 0.5]  # a tie counts half


def test_dpo_closed_form_and_gradient_sign():
    e_w = t(0.10).requires_grad_()
    e_l = t(0.30).requires_grad_()
    ref_w, ref_l = t(0.20), t(0.25)
    beta = 4.0
    loss, diag = dpo_loss(e_w, e_l, ref_w, ref_l, beta)
    inside = -(beta / 2) * ((0.10 - 0.30) - (0.20 - 0.25))
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-inside))))
    assert diag["implicit_acc"].item() == 1.0
    loss.sum().backward()
    assert e_w.grad.item() > 0 > e_l.grad.item()  # lower the winner's error, raise the loser's


def test_dpo_groupings_agree_and_the_diffusers_convention_is_beta_over_2():
    """Flow-DPO's grouping [(e_th(w) - e_ref(w)) - (e_th(l) - e_ref(l))] is the same number; diffusers'
    beta * (ref_diff - model_diff) equals the official loss at half the beta."""
    e_w, e_l, r_w, r_l = t(0.4), t(0.1), t(0.3), t(0.2)
    loss, _ = dpo_loss(e_w, e_l, r_w, r_l, beta=10.0)
    flow_inside = -(10.0 / 2) * ((0.4 - 0.3) - (0.1 - 0.2))
    diffusers_inside = 5.0 * ((0.3 - 0.2) - (0.4 - 0.1))
    assert float(loss) == pytest.approx(math.log1p(math.exp(-flow_inside)))
    assert float(loss) == pytest.approx(math.log1p(math.exp(-diffusers_inside)))


def test_smpo_weight_is_zero_for_a_tie_and_scales_the_dpo_argument():
    assert smpo_soft_weight(t(0.2), t(0.2)).item() == 0.0
    w = smpo_soft_weight(t(0.28202), t(0.11544))  # the widest gap: n_w - n_l = 1
    assert w.item() == pytest.approx(10 * (2 / (1 + math.exp(-1)) - 1))
    plain, _ = dpo_loss(t(0.1), t(0.3), t(0.2), t(0.2), beta=2.0, weight=1.0)
    soft, _ = dpo_loss(t(0.1), t(0.3), t(0.2), t(0.2), beta=2.0 / w.item(), weight=w)
    assert float(soft) == pytest.approx(float(plain))  # the weight multiplies beta
    tie, _ = dpo_loss(t(0.1), t(0.3), t(0.2), t(0.2), beta=2.0, weight=smpo_soft_weight(t(0.2), t(0.2)))
    assert float(tie) == pytest.approx(LOG2)  # a tie carries no preference


def test_kto_reference_point_and_closed_form():
    e_th, e_ref = t(0.1, 0.4, 0.2, 0.2), t(0.3, 0.3, 0.2, 0.1)
    g = e_ref - e_th  # 0.2, -0.1, 0, -0.1: mean 0
    z = kto_reference_point(g.sum(), len(g))
    assert z.item() == pytest.approx(0.0)
    assert kto_reference_point(t(-1.0), 4).item() == 0.0  # clamped at 0
    y = t(1, 0, 1, 0)
    loss, diag = kto_loss(e_th, e_ref, y, beta=10.0, z=z)
    expect = [1 - 1 / (1 + math.exp(-10 * s * (gi - 0.0))) for s, gi in zip([1, -1, 1, -1], [0.2, -0.1, 0.0, -0.1])]
    assert loss.tolist() == pytest.approx(expect)
    assert diag["implicit_acc"].tolist() == [1.0, 1.0, 0.0, 1.0]


def test_kto_reduces_to_its_pairwise_case():
    """A desirable and an undesirable image at z = 0 with weights 1: the KTO loss falls as the policy moves
    toward the desirable one (g up) and away from the undesirable one (g down), as DPO's pair does."""
    up, _ = kto_loss(t(0.1, 0.5), t(0.3, 0.3), t(1, 0), beta=5.0, z=0.0)
    flat, _ = kto_loss(t(0.3, 0.3), t(0.3, 0.3), t(1, 0), beta=5.0, z=0.0)
    assert flat.tolist() == pytest.approx([0.5, 0.5])  # at the reference: 1 - sigmoid(0)
    assert up.sum() < flat.sum()


def test_rankdpo_without_weights_on_two_images_is_dpo():
    d = t(-0.05, 0.02)  # D(x_0), D(x_1)
    loss, _ = rankdpo_loss(d, labels=t(1.0, 0.0), beta=8.0, weighting="none")
    dpo, _ = dpo_loss(t(0.15), t(0.32), t(0.20), t(0.30), beta=8.0)  # D_w = -0.05, D_l = 0.02
    assert float(loss) == pytest.approx(float(dpo))


def test_rankdpo_lambda_weights():
    d = t(0.1, -0.2, 0.0)  # model scores s = -d: 2nd best first, then 3rd, then 1st
    labels = t(2.0, 1.0, 0.0)
    loss, diag = rankdpo_loss(d, labels, beta=2.0)
    rank = {1: 1, 2: 2, 0: 3}
    gain = [2**2 - 1, 2**1 - 1, 0]
    disc = {i: 1 / math.log2(1 + rank[i]) for i in range(3)}
    expect = 0.0
    for i, j in [(0, 1), (0, 2), (1, 2)]:
        w = abs(gain[i] - gain[j]) * abs(disc[i] - disc[j])
        expect += w * math.log1p(math.exp((2.0 / 2) * (float(d[i]) - float(d[j]))))
    assert float(loss) == pytest.approx(expect)
    assert diag["pairs"].item() == 3 and diag["pair_acc"].item() == pytest.approx(1 / 3)  # only (1, 2) agrees
    with pytest.raises(ConfigError, match="weighting='dcg'"):
        rankdpo_loss(d, labels, 2.0, weighting="dcg")


def test_rankdpo_ignores_tied_labels():
    loss, diag = rankdpo_loss(t(0.3, -0.3), t(1.0, 1.0), beta=1.0)
    assert float(loss) == 0.0 and diag["pairs"].item() == 0


def test_dro_hinge():
    loss, diag = dro_loss(t(0.1, 0.1), t(0.2, 0.2), t(0.3, 0.1), t(0.3, 0.3), margin=0.001)
    # d = (-0.1) - (0.0) = -0.1 -> inactive; (-0.1) - (-0.2) = 0.1 -> 0.101
    assert loss.tolist() == pytest.approx([0.0, 0.101])
    assert diag["hinge_active"].tolist() == [0.0, 1.0]


def test_ddo_at_the_reference_ratio_is_one():
    zero = torch.zeros(3, dtype=torch.float64)
    loss, diag = ddo_loss(zero, zero, alpha=0.5, beta=2.0)
    assert loss.tolist() == pytest.approx([1.5 * LOG2] * 3)
    assert torch.exp(zero).tolist() == [1.0, 1.0, 1.0]  # d = log ratio = 0
    better, _ = ddo_loss(t(1.0), t(-1.0))  # data up, reference samples down
    assert float(better) < 2 * LOG2


def test_rwr_weights_are_a_normalised_exponential():
    r = t(0.0, 1.0, 2.0)
    w = rwr_weights(r, beta=1.0)
    e = [math.exp(v) for v in (0.0, 1.0, 2.0)]
    assert w.tolist() == pytest.approx([3 * x / sum(e) for x in e])
    assert float(w.mean()) == pytest.approx(1.0)
    assert rwr_weights(t(5.0, 5.0), beta=0.1).tolist() == pytest.approx([1.0, 1.0])
    with pytest.raises(ConfigError, match="beta=0"):
        rwr_weights(r, beta=0)


def test_flow_rwr_group_normalisation_weights_each_group_alike_and_drops_ties():
    """normalise: group gives every prompt group mean weight 1 (an easy prompt's perfect images no longer take the
    batch's weight) and drops a group whose rewards all tie; normalise: batch is one softmax over the batch."""
    import numpy as np

    from alignrl.algorithms.preference import FlowRWR

    rewards = np.array([1.0, 1.0, 1.0, 1.0, 0.0, 0.5, 0.25, 0.25])  # group 0 ties at 1, group 1 varies
    keys = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    batch = FlowRWR(beta=0.1).advantages(rewards, keys)
    assert batch.advantages[:4].sum() > 7.0  # the perfect group takes almost all of the batch's weight
    group = FlowRWR(beta=0.1, normalise="group").advantages(rewards, keys)
    assert group.keep.tolist() == [False] * 4 + [True] * 4 and group.stats["tied_group_frac"] == 0.5
    assert group.advantages[4:].mean() == pytest.approx(1.0) and group.advantages[:4].tolist() == [0.0] * 4
    assert group.advantages[5] == group.advantages[4:].max()  # the group's best image weighs most
    with pytest.raises(ConfigError, match="normalise='prompt' is not known"):
        FlowRWR(normalise="prompt")


def test_loss_guidance_scores_the_guided_velocity_with_gradient_through_the_chosen_branches(tiny_sd3):
    """``loss_guidance`` w > 1: the error is that of ``v_u + w (v_c - v_u)`` (the velocity that samples at guidance
    w), the reference's too, and its gradient reaches the unconditional branch; w = 1 is the conditional error."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    from alignrl.algorithms.preference import LossGuidance, denoising_errors

    bb = tiny_sd3
    schedule = bb.make_schedule(1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, *bb.latent_shape(), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    idx = torch.tensor([300, 700])
    prompts = ["a red cat", "a blue dog"]

    def reference(x, ts, cond, w):
        with torch.no_grad():
            return bb.predict(x, ts, cond, w)

    ctx = SimpleNamespace(backbone=bb, device=torch.device("cpu"), autocast=nullcontext, predict_reference=reference)
    sigma, ts = schedule.sigmas[idx], schedule.timesteps[idx]
    x_t = bb.parameterisation.add_noise(x0, eps, sigma)
    target = bb.parameterisation.target(x0, eps, sigma)
    with torch.no_grad():
        v_c = bb.predict(x_t, ts, bb.encode_prompts(prompts), 1.0)
        v_u = bb.predict(x_t, ts, bb.encode_prompts(["", ""]), 1.0)
    weight = bb.objective_weight(sigma)
    for w in (1.0, 3.0):
        e_th, e_ref = denoising_errors(ctx, schedule, x0, prompts, idx, eps, True, w)
        expected = ((v_u + w * (v_c - v_u) - target) ** 2).flatten(1).mean(1) * weight
        torch.testing.assert_close(e_th.detach(), expected, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(e_ref, expected, rtol=1e-4, atol=1e-6)
    # the gradient is that of the guided error with both branches live (not the unconditional one held fixed)
    params = [p for p in bb.transformer.parameters() if p.is_floating_point()]

    def grads(loss):
        return torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)

    w = 3.0
    got = grads(denoising_errors(ctx, schedule, x0, prompts, idx, eps, False, w)[0].sum())
    c = bb.predict(x_t, ts, bb.encode_prompts(prompts), 1.0)
    u = bb.predict(x_t, ts, bb.encode_prompts(["", ""]), 1.0)
    both = grads((((u + w * (c - u) - target) ** 2).flatten(1).mean(1) * weight).sum())
    cond_only = grads((((u.detach() + w * (c - u.detach()) - target) ** 2).flatten(1).mean(1) * weight).sum())
    pairs = [(a, b, d) for a, b, d in zip(got, both, cond_only) if a is not None]
    assert pairs
    for a, b, _ in pairs:
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)
    assert max(float((a - d).abs().max()) for a, _, d in pairs) > 1e-4
    # loss_guidance_trains: conditional scores the same guided error, with the empty-prompt branch held fixed
    guide = LossGuidance(w, "conditional")
    e_c, e_ref_c = denoising_errors(ctx, schedule, x0, prompts, idx, eps, True, guide)
    expected = ((v_u + w * (v_c - v_u) - target) ** 2).flatten(1).mean(1) * weight
    torch.testing.assert_close(e_c.detach(), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(e_ref_c, expected, rtol=1e-4, atol=1e-6)
    got_c = grads(denoising_errors(ctx, schedule, x0, prompts, idx, eps, False, guide)[0].sum())
    pairs = [(a, d) for a, d in zip(got_c, cond_only) if a is not None]
    assert pairs
    for a, d in pairs:
        torch.testing.assert_close(a, d, rtol=1e-3, atol=1e-6)
    # the methods pass their two settings through
    from alignrl.algorithms.preference import SFT, FlowRWR

    assert SFT(loss_guidance=3.0, loss_guidance_trains="conditional").guided_loss == guide
    assert FlowRWR(loss_guidance=3.0).guided_loss == LossGuidance(3.0, "both")


def test_loss_guidance_below_one_and_unknown_branches_are_refused():
    from alignrl.algorithms.preference import SFT, FlowRWR

    for cls in (SFT, FlowRWR):
        with pytest.raises(ConfigError, match="loss_guidance must be >= 1"):
            cls(loss_guidance=0.5)
        with pytest.raises(ConfigError, match="loss_guidance_trains='unconditional' is not known; use both or "
                                              "conditional"):
            cls(loss_guidance_trains="unconditional")
