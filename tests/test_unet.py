"""UNet backbones (SD1.5, SDXL): the flow frame is exact against diffusers' own DDIM and pipelines, for epsilon and
v-prediction; the DDIM-with-log-prob kernel matches ``DDIMScheduler.step`` and DDPO's closed form."""

from __future__ import annotations

import math

import pytest
import torch

from alignrl.backbones.unet import SD15Backbone, SDXLBackbone
from alignrl.sampling.kernels import ddim_step
from alignrl.sampling.parameterisation import objective_weight, vp_coefficients

BACKBONES = {"sd15": SD15Backbone, "sdxl": SDXLBackbone}


@pytest.fixture(scope="module")
def tiny_unets():
    return {(name, pt): cls.tiny(prediction_type=pt) for name, cls in BACKBONES.items()
            for pt in ("epsilon", "v_prediction")}


def _model_output_to_flow(x_model, out, alpha_bar, prediction_type):
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if prediction_type == "epsilon":
        eps, x0 = out, (x_model - s * out) / a
    else:
        x0, eps = a * x_model - s * out, s * x_model + a * out
    return eps - x0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_kernel_matches_diffusers_step_and_ddpo_logprob(tiny_unets, prediction_type, eta):
    from diffusers import DDIMScheduler

    bb = tiny_unets[("sd15", prediction_type)]
    sched = bb.make_schedule(8)
    ref = DDIMScheduler.from_config(bb.pipe.scheduler.config)
    ref.set_timesteps(8)
    assert torch.equal(ref.timesteps.float(), sched.timesteps)
    g = torch.Generator().manual_seed(0)
    x_model = torch.randn(3, 4, 8, 8, generator=g)
    for i, t in enumerate(ref.timesteps):
        out = torch.randn(3, 4, 8, 8, generator=g)  # what a UNet would predict
        noise = torch.randn(3, 4, 8, 8, generator=g)
        want = ref.step(out, t, x_model, eta=eta, variance_noise=noise).prev_sample
        alpha_bar = ref.alphas_cumprod[int(t)].double()
        v = _model_output_to_flow(x_model.double(), out.double(), alpha_bar, prediction_type).float()
        x = bb.to_frame(x_model, sched.sigmas[i])
        res = ddim_step(x, v, sched.sigmas[i], sched.sigmas[i + 1], noise_level=eta, noise=noise)
        got = bb.from_frame(res.next_x, sched.sigmas[i + 1])
        assert torch.allclose(got, want, atol=2e-5, rtol=1e-5), (i, (got - want).abs().max())
        if eta > 0:  # DDPO's log-prob in the model's own variables: N(mean, std^2), mean over dims
            prev_t = int(t) - ref.config.num_train_timesteps // 8
            std = eta * ref._get_variance(int(t), prev_t).sqrt().double()
            mean = bb.from_frame(res.mean, sched.sigmas[i + 1]).double()
            logp = (-((want.double() - mean) ** 2) / (2 * std**2) - torch.log(std)
                    - math.log(math.sqrt(2 * math.pi))).mean(dim=(1, 2, 3))
            assert torch.allclose(res.logp_mean_per_dim.double(), logp, atol=1e-4), i
            rescored = ddim_step(x, v, sched.sigmas[i], sched.sigmas[i + 1], noise_level=eta, next_x=res.next_x)
            assert torch.equal(rescored.logp_mean_per_dim, res.logp_mean_per_dim)
        x_model = want


@pytest.mark.parametrize("name", sorted(BACKBONES))
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_engine_ode_equals_the_pipeline(tiny_unets, name, prediction_type):
    """Euler in the flow frame with CFG 5 == the diffusers pipeline with DDIM, eta 0 (the same initial noise)."""
    from diffusers import DDIMScheduler

    from alignrl.sampling.engine import rollout
    from alignrl.sampling.plans import ODEPlanner

    bb = tiny_unets[(name, prediction_type)]
    prompts = ["a red cat", "a blue dog"]
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    noise = bb.initial_noise([torch.Generator().manual_seed(i) for i in range(2)])
    plan = ODEPlanner(num_steps=4, guidance_scale=5.0).plan()
    ours = rollout(bb, plan, bb.encode_prompts(prompts), gens, record=False).final
    scheduler = bb.pipe.scheduler
    bb.pipe.scheduler = DDIMScheduler.from_config(scheduler.config)
    try:
        theirs = bb.pipe(prompt=prompts, latents=noise.clone(), num_inference_steps=4, guidance_scale=5.0, eta=0.0,
                         output_type="latent", height=64, width=64).images
    finally:
        bb.pipe.scheduler = scheduler
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-4 * float(theirs.abs().max())), (ours - theirs).abs().max()


@pytest.mark.parametrize("name,prediction_type,steps", [("sd15", "epsilon", 6), ("sdxl", "v_prediction", 16)])
def test_dpm_solver_evaluation_equals_diffusers_dpm_solver(tiny_unets, name, prediction_type, steps):
    """sampler.eval_solver=dpm2m == the pipeline with diffusers' DPMSolverMultistepScheduler (dpmsolver++, order 2)
    on alignrl's grid, under 15 steps (first-order last step) and above."""
    from alignrl.sampling.engine import rollout
    from alignrl.sampling.plans import ODEPlanner

    bb = tiny_unets[(name, prediction_type)]
    prompts = ["a red cat", "a blue dog"]
    noise = bb.initial_noise([torch.Generator().manual_seed(i) for i in range(2)])
    cond = bb.encode_prompts(prompts)

    def ours(solver, n):
        plan = ODEPlanner(eval_num_steps=n, guidance_scale=5.0, eval_solver=solver).eval_plan()
        return rollout(bb, plan, cond, [torch.Generator().manual_seed(i) for i in range(2)], record=False).final

    dpm = ours("dpm2m", steps)
    scheduler = bb.pipe.scheduler
    bb.pipe.scheduler = bb.dpm_solver_scheduler()
    try:
        call = bb.pipeline_call_kwargs(steps, 5.0, solver="dpm2m")
        theirs = bb.pipe(prompt=prompts, latents=noise.clone(), output_type="latent", **call).images
    finally:
        bb.pipe.scheduler = scheduler
    assert call["timesteps"] == bb.timesteps(steps) and len(call["timesteps"]) == steps
    assert torch.allclose(dpm, theirs, rtol=1e-5, atol=1e-4 * float(theirs.abs().max())), (dpm - theirs).abs().max()
    assert not torch.allclose(dpm, ours("ode", steps), atol=1e-3)  # a different solver from DDIM on that grid


def test_schedule_training_grid_and_ends(tiny_unets):
    bb = tiny_unets[("sd15", "epsilon")]
    grid = bb.make_schedule(1000)
    assert grid.timesteps[0] == 999 and grid.timesteps[-1] == 0 and grid.num_steps == 1000
    assert torch.all(grid.sigmas[1:-1] < grid.sigmas[:-2])  # flow time falls monotonically to the data end
    assert grid.sigmas[-1] == grid.sigmas[-2]  # DDIM's step from t = 0 goes to abar[0] again: a zero step
    alpha_bar_0 = float(bb.ddim.alphas_cumprod[0])  # SD's set_alpha_to_one=False: DDIM ends at abar[0], not 1
    a, s, _ = vp_coefficients(grid.sigmas[-1].double())
    assert math.isclose(float(a**2), alpha_bar_0, rel_tol=1e-5)
    assert 0 < float(grid.sigmas[-1]) < 0.05


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_objective_weight_turns_flow_error_into_the_models_own(prediction_type):
    g = torch.Generator().manual_seed(1)
    x0, eps, eps_hat = (torch.randn(5, 4, 8, 8, generator=g) for _ in range(3))
    t = torch.rand(5, generator=g).clamp(0.05, 0.95)
    a, s, n = (c.view(-1, 1, 1, 1) for c in vp_coefficients(t))
    x_model = a * x0 + s * eps
    x0_hat = (x_model - s * eps_hat) / a
    v_hat, v = eps_hat - x0_hat, eps - x0  # flow velocities of the prediction and of the truth
    flow_err = ((v_hat - v) ** 2).mean(dim=(1, 2, 3))
    if prediction_type == "epsilon":
        own = ((eps_hat - eps) ** 2).mean(dim=(1, 2, 3))
    else:
        own = (((a * eps_hat - s * x0_hat) - (a * eps - s * x0)) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(objective_weight(prediction_type, t) * flow_err, own, rtol=1e-4)


def test_sdxl_negative_is_zeros_and_time_ids(tiny_unets):
    bb = tiny_unets[("sdxl", "epsilon")]
    neg = bb.negative_conditioning()
    assert float(neg.tensors["prompt_embeds"].abs().sum()) == 0 and float(neg.tensors["pooled"].abs().sum()) == 0
    assert neg.tensors["time_ids"].tolist() == [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]
    cond = bb.encode_prompts(["a red cat"])
    assert cond.tensors["prompt_embeds"].shape == (1, 77, 64) and cond.tensors["pooled"].shape == (1, 32)


def test_unet_reads_its_conditioning(tiny_unets):
    """A prompt change moves the prediction (the proving ground must be able to fail for the right reason)."""
    for (name, _), bb in tiny_unets.items():
        sched = bb.make_schedule(4)
        x = bb.to_frame(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), sched.sigmas[1])
        a = bb.predict(x, sched.timesteps[1], bb.encode_prompts(["a red cat"]), 1.0)
        b = bb.predict(x, sched.timesteps[1], bb.encode_prompts(["a blue dog"]), 1.0)
        assert float((a - b).detach().abs().max()) > 1e-4, name


def test_pickled_checkpoint_is_refused_before_loading(tmp_path):
    from alignrl.errors import ConfigError

    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not read")
    with pytest.raises(ConfigError, match="safetensors"):
        SD15Backbone.from_pretrained(str(ckpt))
    with pytest.raises(ConfigError, match="no such file"):
        SDXLBackbone.from_pretrained(str(tmp_path / "missing.safetensors"))


def test_a_single_file_sd15_checkpoint_loads_through_the_recipe_keys(tmp_path):
    """A user's single-file .safetensors (the original SD layout model sites ship), written from a tiny SD1.5, loads
    through backbone=sd15 with backbone.config naming the diffusers configs, every weight equal, and samples what the
    diffusers-layout copy samples."""
    from safetensors.torch import save_file

    from alignrl.backbones.unet import build_tiny_sd15_pipeline
    from alignrl.components import build_backbone
    from alignrl.config import compose
    from alignrl.sampling.engine import rollout, sample_generators
    from alignrl.sampling.plans import ode_plan
    from ldm_checkpoint import sd15_single_file_state

    pipe = build_tiny_sd15_pipeline(seed=3)
    pipe.save_pretrained(tmp_path / "diffusers")
    save_file(sd15_single_file_state(pipe), tmp_path / "model.safetensors")
    common = ["backbone=sd15", "backbone.dtype=fp32", "backbone.resolution=64", "run_dir=/tmp/alignrl-test-unet"]
    single = build_backbone(compose([*common, f"backbone.pretrained={tmp_path / 'model.safetensors'}",
                                     f"backbone.config={tmp_path / 'diffusers'}"]), "cpu")
    layout = build_backbone(compose([*common, f"backbone.pretrained={tmp_path / 'diffusers'}"]), "cpu")
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(single.pipe, name).state_dict(), getattr(layout.pipe, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    plan = ode_plan(3, 5.0)
    outs = [rollout(bb, plan, bb.encode_prompts(["a red cat"]), sample_generators(0, 0, [0]), record=False).final
            for bb in (single, layout)]
    assert torch.equal(outs[0], outs[1])
