"""The shipped ShapeWorld models (the flow model and its epsilon twin): they load, draw the world, read their
conditioning, sample as their own pipelines, and the pretraining script makes them."""

import json
import random

import numpy as np
import pytest
import torch

from alignrl.shapes.judge import check
from alignrl.shapes.world import prompt_split


# Measured on the shipped weights with these calls for seeds 0-2 (training_info.json in the package holds the
# pretraining evaluation): shapes 0.33-0.54, colors 0.94-1.0, colour follows the word 5-6 of 6. Thresholds sit
# below the measurements and far above a random model (0) or the colour-blind first model (colors 0.28).
SHIPPED_MIN = {"shapes": 0.2, "colors": 0.75, "eps_colors": 0.25}
# The epsilon twin (pretrained_eps, training_info.json): colors 0.375-0.44 for seeds 1-3 with these calls, a
# colour-swap cosine of 0.80; with one fixed noise its colour follows the word only 0-4 times of 6 (seeds 5-8):
# its first DDIM steps fix the colour from the noise, so that check is the flow model's alone.
SHIPPED_MAX_COLOUR_SWAP_COS = 0.9  # the first, colour-blind text encoder: 0.94 (its token states barely moved)


def test_shipped_model_loads_and_draws_the_world():
    """The pretrained weights in the package load through the backbone and draw judge-passing shapes."""
    from alignrl.shapes.model import ShapesBackbone, pretrained_dir

    weights = list(pretrained_dir().rglob("*.safetensors"))
    assert weights and sum(w.stat().st_size for w in weights) < 12e6  # small, safetensors only
    assert not list(pretrained_dir().rglob("*.bin")) and not list(pretrained_dir().rglob("*.pt"))
    backbone = ShapesBackbone.pretrained()
    assert backbone.transformer.dtype == torch.float32 and backbone.vae is None
    metas = [m for m in prompt_split("in_dist") if m["tag"] in ("single_object", "two_object", "counting")]
    metas = random.Random(0).sample(metas, 24)
    images = backbone.pipe([m["prompt"] for m in metas], num_inference_steps=20, guidance_scale=3.0,
                           generator=torch.Generator().manual_seed(0))
    assert images.shape == (24, 3, 32, 32) and torch.isfinite(images).all()
    arr = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    strict = np.mean([check(a, m)["strict"] for a, m in zip(arr, metas)])
    assert strict >= SHIPPED_MIN["shapes"], strict


@pytest.mark.parametrize("twin", ["flow", "epsilon"])
def test_shipped_text_encoder_separates_colour_words_and_the_model_draws_them(twin):
    """The model reads its conditioning (the flow model and its epsilon twin): prompts that differ only in their
    colour word get distinct text states (colour-swap cosine), and the UNet draws the colour asked for: the colors
    tag on in-distribution prompts, and the drawn colour changes with the word for one fixed noise."""
    from alignrl.shapes.judge import detect
    from alignrl.shapes.model import ShapesBackbone, ShapesEpsilonBackbone, colour_swap_cosine

    backbone = (ShapesBackbone if twin == "flow" else ShapesEpsilonBackbone).pretrained()
    assert colour_swap_cosine(backbone.pipe) < SHIPPED_MAX_COLOUR_SWAP_COS
    metas = [m for m in prompt_split("in_dist") if m["tag"] == "colors"]
    metas = (metas * 4)[:32]
    images = backbone.pipe([m["prompt"] for m in metas], num_inference_steps=20, guidance_scale=3.0,
                           generator=torch.Generator().manual_seed(1))
    arr = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    colours = np.mean([check(a, m)["strict"] for a, m in zip(arr, metas)])
    assert colours >= SHIPPED_MIN["colors" if twin == "flow" else "eps_colors"], colours
    if twin == "epsilon":
        return
    # one noise, three colour words: the detected colours follow the word
    words = ["red", "green", "blue"]
    noise = torch.randn((1, 3, 32, 32), generator=torch.Generator().manual_seed(5)).repeat(6, 1, 1, 1)
    prompts = [f"a {c} circle" for c in words] + [f"a {c} triangle" for c in ("green", "blue", "red")]
    imgs = backbone.pipe(prompts, num_inference_steps=20, guidance_scale=3.0, latents=noise)
    arr = (imgs * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    drawn = [{o.color for o in detect(a)} for a in arr]
    hits = sum(want in got for want, got in zip(words + ["green", "blue", "red"], drawn))
    assert hits >= 4, list(zip(prompts, drawn))


@pytest.mark.parametrize("objective", ["flow", "epsilon"])
def test_pretrain_script_runs_and_saves_a_loadable_model(tmp_path, objective):
    """scripts/pretrain_shapes.py end to end at toy size (2 steps, 1 prompt per tag), for the flow model and its
    epsilon twin: the saved folder loads as the matching ShapeWorld backbone and records its arguments and final
    evaluation."""
    import runpy
    from pathlib import Path

    from alignrl.shapes.model import ShapesBackbone, ShapesEpsilonBackbone

    script = Path(__file__).resolve().parents[1] / "scripts" / "pretrain_shapes.py"
    out = tmp_path / "model"
    threads = torch.get_num_threads()
    try:  # the script's own main, in this process (its --threads is restored after)
        runpy.run_path(str(script), run_name="pretrain_shapes")["main"](
            ["--steps", "2", "--batch", "2", "--eval-every", "0", "--eval-per-tag", "1", "--eval-steps", "1",
             "--threads", "1", "--out", str(out), "--objective", objective])
    finally:
        torch.set_num_threads(threads)
    info = json.loads((out / "training_info.json").read_text())
    assert info["steps"] == 2 and info["eval"][-1]["step"] == 2 and info["args"]["objective"] == objective
    assert set(info["eval"][-1]) >= {"in_dist", "held_out", "colour_swap_cosine"}
    cls = ShapesBackbone if objective == "flow" else ShapesEpsilonBackbone
    backbone = cls.pretrained(path=str(out))
    assert backbone.family == ("shapes" if objective == "flow" else "shapes_eps")
    assert backbone.prediction_type == ("flow" if objective == "flow" else "epsilon")


@pytest.mark.parametrize("solver", ["ode", "dpm2m"])
def test_epsilon_twin_samples_as_its_pipeline(solver):
    """The epsilon twin in the engine's flow frame (DDIM, eta 0; or DPM-Solver++(2M)) equals its own pipeline's
    DDIM (or DPMSolverMultistepScheduler on alignrl's grid) from the same noise, CFG 3, to float rounding: the
    exported pipeline reproduces alignrl's evaluation samples."""
    from alignrl.sampling.engine import rollout
    from alignrl.sampling.plans import ODEPlanner
    from alignrl.shapes.model import ShapesEpsilonBackbone

    bb = ShapesEpsilonBackbone.pretrained()  # the shipped twin
    prompts = ["a red circle", "two blue squares"]
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(2)]  # noqa: E731
    noise = bb.initial_noise(gens())
    plan = ODEPlanner(eval_num_steps=6, guidance_scale=3.0, eval_solver=solver).eval_plan()
    ours = bb.decode(rollout(bb, plan, bb.encode_prompts(prompts), gens(), record=False).final)
    scheduler = bb.pipe.scheduler
    bb.pipe.scheduler = bb._scheduler_for(solver)
    try:
        theirs = bb.pipe(prompts, latents=noise.clone(), **bb.pipeline_call_kwargs(6, 3.0, solver=solver))
    finally:
        bb.pipe.scheduler = scheduler
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
