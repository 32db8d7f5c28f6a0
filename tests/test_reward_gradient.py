"""The reward-gradient family: the differentiable sampler and its adjoint on a one-weight model (v = w x) where
the gradients have closed forms, the methods behind the protocol, the rewards' differentiability, and the tiny
twins through the real loop."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from alignrl.algorithms.base import PromptBatch
from alignrl.rewards.base import WeightedReward, build_reward
from alignrl.sampling.differentiable import adjoint_backward, grad_sample, ode_states
from conftest import run_inprocess
from test_algorithms import FakeBackbone, make_context


class ImageBackbone(FakeBackbone):
    """The one-weight model with the services a reward-gradient step uses: noise, decode (identity)."""

    def initial_noise(self, generators):
        return torch.stack([torch.randn((2, 4, 4), generator=g) for g in generators])

    def decode_with_grad(self, latents, checkpoint=False):
        return latents


def _loss_grad(backbone, x_T, c, **kw):
    """d/dw of L = sum(c * x_N) for the sample from x_T, and L."""
    w = backbone.denoiser.w
    w.grad = None
    x = grad_sample(backbone, None, x_T, backbone.make_schedule(5), 1.0, **kw)
    loss = (c * x).sum()
    loss.backward()
    return w.grad.clone(), float(loss.detach())


def test_grad_sample_keeps_the_graph_from_the_asked_step_and_checkpointing_changes_nothing():
    """v = w x on a linear 5-step grid (h = -1/5): x_N = (1 + h w)^5 x_T. With the graph from step 0 the gradient
    is the full derivative 5 h (1 + h w)^4 sum(c x_T); from step 4 only the last step's factor is differentiated:
    h (1 + h w)^4 sum(c x_T). Checkpointed calls give the same numbers."""
    backbone = FakeBackbone(0.5)
    x_T = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    c = torch.randn_like(x_T)
    h, w = -0.2, 0.5
    base = float((c * x_T).sum())
    full, loss = _loss_grad(backbone, x_T, c, grad_from=0, checkpoint=False)
    assert loss == pytest.approx((1 + h * w) ** 5 * base, rel=1e-5)
    assert float(full) == pytest.approx(5 * h * (1 + h * w) ** 4 * base, rel=1e-5)
    assert torch.allclose(_loss_grad(backbone, x_T, c, grad_from=0, checkpoint=True)[0], full)
    last, _ = _loss_grad(backbone, x_T, c, grad_from=4)
    assert float(last) == pytest.approx(h * (1 + h * w) ** 4 * base, rel=1e-5)
    # ReFL: stop at step m with its x0 prediction x_m - s_m v = (1 - s_m w) x_m, only step m differentiated
    x0 = grad_sample(backbone, None, x_T, backbone.make_schedule(5), 1.0, grad_from=5, stop_at=2)
    torch.testing.assert_close(x0, (1 - 0.6 * w) * (1 + h * w) ** 2 * x_T)
    backbone.denoiser.w.grad = None
    (c * x0).sum().backward()
    assert float(backbone.denoiser.w.grad) == pytest.approx(-0.6 * (1 + h * w) ** 2 * base, rel=1e-5)


def test_adjoint_with_stored_states_is_the_exact_gradient_and_reconstructed_states_are_close():
    """The adjoint sampler gives the gradient backpropagation through the whole sampler gives (weights and initial
    noise), exactly with the forward states kept and within the reversed step's error without them."""
    backbone = FakeBackbone(0.7)
    schedule = backbone.make_schedule(8)
    x_T = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    c = torch.randn_like(x_T)
    x_in = x_T.clone().requires_grad_(True)
    x_N = grad_sample(backbone, None, x_in, schedule, 1.0, grad_from=0, checkpoint=False)
    (c * x_N).sum().backward()
    want_w, want_x = backbone.denoiser.w.grad.clone(), x_in.grad.clone()
    for states, tol in (("store", 1e-5), ("reconstruct", 0.05)):
        backbone.denoiser.w.grad = None
        final, kept = ode_states(backbone, None, x_T, schedule, 1.0, keep=states == "store")
        dx_T = adjoint_backward(backbone, None, final, c, schedule, 1.0, backward=lambda t: t.backward(),
                                states=kept)
        assert float(backbone.denoiser.w.grad) == pytest.approx(float(want_w), rel=tol), states
        assert torch.allclose(dx_T, want_x, rtol=tol, atol=tol * float(want_x.abs().max())), states


def _prompt_batch(n=4):
    return PromptBatch(prompts=[f"p{i}" for i in range(n)], metadata=[{}] * n, prompt_ids=np.arange(n),
                       global_index=np.arange(n))


def _train(algo, backbone, score=lambda images, prompts, meta: -(images ** 2).mean(dim=(1, 2, 3))):
    ctx, steps = make_context(backbone, lr=0.0)
    ctx.score = score
    grads = []
    inner = ctx.optimizer_step
    ctx.optimizer_step = lambda: (grads.append(backbone.denoiser.w.grad.clone()), inner())[1]
    out = algo.train_step(_prompt_batch(), None, ctx)
    return out, grads, ctx


@pytest.mark.parametrize("name", ["refl", "draft", "draft_lv", "alignprop", "adjointdpm"])
def test_every_method_steps_behind_the_protocol_and_its_gradient_matches_autograd(name):
    """Each method's step on the one-weight model: the logged reward is the score of the latents it decoded, and
    its gradient equals autograd's through the same sampler piece (written out here per method)."""
    from alignrl.components import ALGORITHMS
    from alignrl.locate import locate

    cls = locate(ALGORITHMS[name].replace(":", "."), "algorithm")
    kw = {"refl": dict(refl_low=2), "alignprop": dict(truncation_mean=3.0, truncation_std=1.0),
          "adjointdpm": dict(states="store"), "draft_lv": dict(lv_samples=3)}.get(name, {})
    algo = cls(num_steps=5, lr=1e-3, loss="negative", loss_scale=1.0, **kw)
    assert algo.batch_kind == "prompts" and not algo.needs_reference
    backbone = ImageBackbone(0.4)
    out, grads, ctx = _train(algo, backbone)
    assert len(grads) == 1 and torch.isfinite(grads[0]) and float(grads[0].abs()) > 0
    # the same loss through plain autograd: the full sampler for the methods whose graph covers what they
    # differentiate; the ones that stop the graph are checked against their own piece
    batch = _prompt_batch()
    x_T = batch.initial_noise(ctx, torch.arange(4))
    schedule = backbone.make_schedule(5)
    w = backbone.denoiser.w
    w.grad = None
    if name == "adjointdpm":
        x = grad_sample(backbone, None, x_T, schedule, 1.0, grad_from=0, checkpoint=False)
        loss = ((x ** 2).mean(dim=(1, 2, 3))).sum() / 4
    elif name == "draft":
        x = grad_sample(backbone, None, x_T, schedule, 1.0, grad_from=4)
        loss = ((x ** 2).mean(dim=(1, 2, 3))).sum() / 4
    else:
        loss = None
    if loss is not None:
        loss.backward()
        assert float(grads[0]) == pytest.approx(float(w.grad), rel=1e-5)
    assert out["reward_mean"] < 0 and out["policy_loss"] == pytest.approx(-out["reward_mean"], rel=1e-5)


def test_truncations_are_drawn_once_per_optimizer_step_and_stay_in_range():
    from alignrl.algorithms.reward_gradient import AlignProp, ReFL

    g = torch.Generator().manual_seed(0)
    ks = [AlignProp(num_steps=50).draw(g)["k"] for _ in range(300)]
    assert min(ks) >= 1 and max(ks) < 50 and abs(np.mean(ks) - 42) < 1.0
    ms = [ReFL().draw(g)["m"] for _ in range(300)]
    assert set(ms) == set(range(30, 40))


def test_smoothness_reward_closed_form_and_gradient():
    r = build_reward("smoothness")
    flat = torch.full((1, 3, 4, 4), 0.3)
    stripes = torch.zeros(1, 3, 4, 4)
    stripes[..., ::2] = 1.0  # columns alternate 1, 0: every horizontal neighbour differs by 1, vertical by 0
    assert float(r.score_tensor(flat, ["a"])) == 0.0
    assert float(r.score_tensor(stripes, ["a"])) == pytest.approx(-100.0)
    x = stripes.clone().requires_grad_(True)
    r.score_tensor(x, ["a"]).sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    scores, _ = r(stripes, ["a"], [{}])
    assert scores.tolist() == pytest.approx([-100.0])


def test_weighted_reward_differentiates_only_its_weighted_members():
    both = WeightedReward.from_config({"smoothness": 1.0, "jpeg_compressibility": 0.0})
    assert both.differentiable and list(both.gradient_rewards) == ["smoothness"]
    images = torch.rand(2, 3, 8, 8, requires_grad=True)
    total = both.score_tensor(images, ["a", "b"], [{}, {}])
    assert total.requires_grad  # the weighted total is smoothness alone: the weight-0 JPEG is not scored
    assert torch.equal(total, both.rewards["smoothness"].score_tensor(images, ["a", "b"]))
    mixed = WeightedReward.from_config({"smoothness": 1.0, "jpeg_compressibility": 1.0})
    assert not mixed.differentiable and mixed.not_differentiable == ["jpeg_compressibility"]


def test_a_non_differentiable_reward_is_one_line_before_any_model_loads(tmp_path):
    proc = run_inprocess("train", "recipe=tiny_refl", "reward=jpeg_compressibility", f"run_dir={tmp_path / 'r'}",
                         cwd=tmp_path)
    assert proc.returncode != 0 and "jpeg_compressibility cannot be differentiated" in proc.stderr
    assert "Traceback" not in proc.stderr and "SD3Transformer2DModel" not in proc.stderr


def test_checkpointed_steps_keep_a_few_latents_each_not_the_networks_activations(tiny_sd3):
    """Bytes the autograd graph holds (saved tensors) for the graph through the last K of 6 steps of the tiny SD3:
    with per-step checkpointing each further step adds a few latents (the step's own arithmetic), without it the
    transformer's activations."""
    backbone = tiny_sd3
    schedule = backbone.make_schedule(6)
    cond = backbone.encode_prompts(["a red cube"] * 2)
    x_T = backbone.initial_noise([torch.Generator().manual_seed(i) for i in range(2)])
    latent_bytes = x_T.numel() * 4

    def saved_bytes(k, checkpoint):
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            x = grad_sample(backbone, cond, x_T, schedule, 1.0, grad_from=6 - k, checkpoint=checkpoint)
        del x
        return total[0]

    per_step_ckpt = (saved_bytes(3, True) - saved_bytes(1, True)) / 2
    per_step_full = (saved_bytes(3, False) - saved_bytes(1, False)) / 2
    assert per_step_ckpt <= 8 * latent_bytes, (per_step_ckpt, latent_bytes)
    assert per_step_full > 10 * per_step_ckpt, (per_step_full, per_step_ckpt)


def test_shapes_soft_agrees_with_the_exact_judge_on_renders_and_passes_gradients():
    """The surrogate on ground-truth renders scored against their own prompt and against another tag's prompt:
    it ranks them as the exact judge does (Pearson r > 0.7 over about 100 image-prompt pairs; matching pairs score
    above 0.8 on average) and its gradient reaches the pixels."""
    from alignrl.rewards.shapes import ShapesGenEval, ShapesSoft
    from alignrl.shapes.world import eval_set, render_batch

    metas = eval_set("in_dist", per_tag=10)
    rng = np.random.default_rng(0)
    images = torch.from_numpy(render_batch(metas, seed=3)).permute(0, 3, 1, 2).float() / 255
    others = [metas[int(j)] for j in rng.permutation(len(metas))]
    pairs = [(i, m) for i, m in enumerate(metas)] + [(i, m) for i, m in enumerate(others)]
    imgs = images[[i for i, _ in pairs]]
    ms = [m for _, m in pairs]
    soft = ShapesSoft().score_tensor(imgs, [m["prompt"] for m in ms], ms)
    exact, _ = ShapesGenEval()(imgs, [m["prompt"] for m in ms], ms)
    r = np.corrcoef(soft.numpy(), exact)[0, 1]
    assert r > 0.7, r
    assert float(soft[:len(metas)].mean()) > 0.8
    x = images[:4].clone().requires_grad_(True)
    ShapesSoft().score_tensor(x, [m["prompt"] for m in metas[:4]], metas[:4]).sum().backward()
    assert float(x.grad.abs().sum()) > 0


GRADIENT_LEARNING = {"tiny_refl": 20, "tiny_draft": 20, "tiny_draft_lv": 12, "tiny_alignprop": 12,
                     "tiny_adjointdpm": 12}


@pytest.mark.parametrize("recipe", sorted(GRADIENT_LEARNING))
def test_every_tiny_reward_gradient_twin_raises_its_reward(tmp_path, recipe):
    """Each twin through the real trainer raises the smoothness of its samples: the last 4 iterations' mean beats
    the first 4 by more than 3 times their spread (each iteration scores 8 fresh prompt slots)."""
    from accelerate.state import AcceleratorState

    from alignrl.config import compose
    from alignrl.training.trainer import Trainer

    n = GRADIENT_LEARNING[recipe]
    AcceleratorState._reset_state()
    cfg = compose([f"recipe={recipe}", f"run_dir={tmp_path}", f"trainer.max_steps={n}", "logger.progress_bar=false",
                   "trainer.eval_every=0", "trainer.checkpoint_every=0", "trainer.log_images_every=0"])
    t = Trainer(cfg, tmp_path)
    rewards = []
    try:
        for _ in range(n):
            t.timing = {}
            rewards.append(t.run_iteration()["reward_mean"])
            t.iteration += 1
    finally:
        t.reward_runner.close()
    first, last = np.mean(rewards[:4]), np.mean(rewards[-4:])
    assert last - first > 3 * np.std(rewards[:4]), (recipe, rewards)


class ConvDenoiser(torch.nn.Module):
    """A small float64 network v(x, t, c): two convolutions with the time and a conditioning vector mixed in."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.c1 = torch.nn.Conv2d(2, 8, 3, padding=1).double()
        self.c2 = torch.nn.Conv2d(8, 2, 3, padding=1).double()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64))

    def forward(self, x, t, c):
        h = torch.tanh(self.c1(x) + c.view(-1, 8, 1, 1) + t.view(-1, 1, 1, 1))
        return self.c2(h)


class Float64Backbone(FakeBackbone):
    def __init__(self):
        self.denoiser = ConvDenoiser()

    def make_schedule(self, num_steps):
        from alignrl.backbones.base import Schedule

        sigmas = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
        return Schedule(sigmas, sigmas[:-1] * 1000)

    def predict(self, x, timestep, cond, guidance_scale, transformer=None):
        return self.denoiser(x, timestep / 1000, cond)


def _float64_case(n_steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    backbone = Float64Backbone()
    x_T = torch.randn(2, 2, 6, 6, generator=g, dtype=torch.float64)
    cond = torch.randn(2, 8, generator=g, dtype=torch.float64)
    c = torch.randn(2, 2, 6, 6, generator=g, dtype=torch.float64)
    return backbone, x_T, cond, c, backbone.make_schedule(n_steps)


def _grads(backbone, *tensors):
    return [p.grad.clone() for p in backbone.denoiser.parameters()] + [t.grad.clone() for t in tensors]


def test_truncated_and_checkpointed_gradients_equal_backprop_through_the_truncated_graph_in_float64():
    """DRaFT-K / AlignProp: the graph from step k equals plain backpropagation through the sampler with the latent
    detached at step k; checkpointed calls give the identical gradient."""
    backbone, x_T, cond, c, schedule = _float64_case(6)
    for k in (5, 3, 0):
        results = []
        for ckpt in (False, True):
            backbone.denoiser.zero_grad(set_to_none=True)
            (c * grad_sample(backbone, cond, x_T, schedule, 1.0, grad_from=k, checkpoint=ckpt)).sum().backward()
            results.append(_grads(backbone))
        backbone.denoiser.zero_grad(set_to_none=True)
        x = x_T
        for i in range(6):  # written out: no graph before step k, the Euler step after
            if i == k:
                x = x.detach()
            with torch.set_grad_enabled(i >= k):
                v = backbone.predict(x, schedule.timesteps[i].expand(2), cond, 1.0)
                x = x + (schedule.sigmas[i + 1] - schedule.sigmas[i]) * v
        (c * x).sum().backward()
        want = _grads(backbone)
        assert all(torch.equal(a, b) for a, b in zip(results[0], results[1])), k  # checkpointing: identical
        assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-14) for a, b in zip(results[0], want)), k


def test_adjoint_gradients_match_backprop_within_a_tolerance_that_shrinks_with_the_step():
    """AdjointDPM in float64: weights, conditioning and initial noise. Stored states give backpropagation's
    gradient to rounding. Reconstructed states (the backward state solve) err by a relative amount that halves
    as the steps halve (first order), and each fixed-point refinement of the reconstruction cuts it further."""
    errors = {}
    for n in (4, 8, 16):
        backbone, x_T, cond, c, schedule = _float64_case(n)
        cond_b, x_b = cond.clone().requires_grad_(True), x_T.clone().requires_grad_(True)
        (c * grad_sample(backbone, cond_b, x_b, schedule, 1.0, grad_from=0, checkpoint=False)).sum().backward()
        want = _grads(backbone, cond_b, x_b)
        for states, refine in (("store", 0), ("reconstruct", 0), ("reconstruct", 1), ("reconstruct", 3)):
            backbone.denoiser.zero_grad(set_to_none=True)
            cond_a = cond.clone().requires_grad_(True)
            final, kept = ode_states(backbone, cond_a, x_T, schedule, 1.0, keep=states == "store")
            dx = adjoint_backward(backbone, cond_a, final, c, schedule, 1.0, backward=lambda t: t.backward(),
                                  states=kept, refine=refine)
            got = _grads(backbone, cond_a) + [dx]
            errors[(n, states, refine)] = max(float((a - b).norm() / b.norm()) for a, b in zip(got, want))
    assert all(errors[(n, "store", 0)] < 1e-10 for n in (4, 8, 16)), errors
    for refine in (0, 1, 3):
        e = [errors[(n, "reconstruct", refine)] for n in (4, 8, 16)]
        assert e[1] < 0.7 * e[0] and e[2] < 0.7 * e[1], (refine, e)
    assert all(errors[(n, "reconstruct", 3)] < errors[(n, "reconstruct", 1)] < errors[(n, "reconstruct", 0)]
               for n in (4, 8, 16)), errors


def test_adjoint_refuses_fp16_loss_scaling_in_one_line():
    from alignrl.algorithms.reward_gradient import AdjointDPM
    from alignrl.errors import ConfigError

    backbone = ImageBackbone(0.4)
    ctx, _ = make_context(backbone)
    ctx.mixed_precision = "fp16"
    with pytest.raises(ConfigError, match="trainer.mixed_precision=bf16"):
        AdjointDPM(num_steps=3).train_step(_prompt_batch(), None, ctx)


@pytest.mark.parametrize("recipe", ["tiny_refl", "tiny_draft_lv", "tiny_alignprop", "tiny_adjointdpm", "tiny_reinflow",
                                    "tiny_spo"])
def test_padding_microbatches_for_sharded_weights_change_nothing(tmp_path, recipe):
    """distributed=fsdp: a process with fewer microbatches pads with passes that make the same denoiser calls (the
    sampler's forwards, the backward's recomputations; the adjoint's steps; ReinFlow's chain log-probability; an
    SPO pair's policy and reference forwards) with a loss of zero: the update equals the unpadded one while the denoiser ran more often (ReinFlow's noise network
    included)."""
    from test_plans import _trainer

    results = {}
    for pad in (0, 2):
        t = _trainer(tmp_path / f"pad{pad}", recipe)
        t.sharding.balance = lambda n, pad=pad: n + pad
        calls = []
        forward = t.policy.denoiser.forward
        t.policy.denoiser.forward = lambda *a, **k: (calls.append(1), forward(*a, **k))[1]
        try:
            t.timing = {}
            m = t.run_iteration()
        finally:
            t.reward_runner.close()
        noise_net = getattr(t.algorithm, "noise_net", None)
        extra = [p.detach().clone() for p in noise_net.parameters()] if noise_net is not None else []
        results[pad] = ([p.detach().clone() for p in t.params] + extra, m, len(calls))
    (w0, m0, c0), (w2, m2, c2) = results[0], results[2]
    assert all(torch.equal(a, b) for a, b in zip(w0, w2)) and m2["policy_loss"] == m0["policy_loss"]
    assert c2 > c0


def test_refl_sharded_two_processes_match_one(tmp_path):
    """distributed=fsdp for the reward-gradient family: ReFL's differentiable sampler through sharded weights on 2
    processes against one unsharded process (measured: 1.1e-7 after an update of 1e-3)."""
    from safetensors.torch import load_file

    args = ["recipe=tiny_refl", "trainer.max_steps=1", "trainer.eval_every=0", "trainer.checkpoint_every=1",
            "trainer.log_images_every=0", "logger.progress_bar=false", "logger.plots=false",
            "trainer.rollout_batch_size=4", "trainer.train_batch_size=4"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_inprocess("train", f"run_dir={one}", *args, cwd=tmp_path, threads=1).returncode == 0
    proc = run_inprocess("train", f"run_dir={two}", *args, "distributed=fsdp", "launcher.nproc_per_node=2",
                         cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    a = load_file(str(one / "checkpoints" / "step_000001" / "trainable.safetensors"))
    b = load_file(str(two / "checkpoints" / "step_000001" / "trainable.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    la, lb = (json.loads((r / "metrics.jsonl").read_text().splitlines()[0])["policy_loss"] for r in (one, two))
    assert la == pytest.approx(lb, rel=1e-6)
