"""Every shipped recipe resolves to the method values its own files say.

A recipe (``# @package _global_``) is composed after the sampler and algorithm groups, so values it
inherits from another recipe override those group files. A recipe built on a recipe of another method
used to take that method's values (DanceGRPO and DiffusionNFT resolved to Flow-GRPO's KL weight 0.01;
DanceGRPO, AWM and NFT to its global std). Two guards: a table of the method-defining values of every
recipe, written out here, and a provenance check that each resolved sampler/algorithm value comes from
the method's own group file or from a recipe of that same method (never from a base or another method).
"""

from __future__ import annotations

import functools

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from alignrl.config import compose, group_options, recipe_descriptions, recipes_dir
from alignrl.errors import ConfigError

METHOD_GROUPS = ("sampler", "algorithm")


def row(algorithm, *, beta, global_std, clip, std_eps, K, lr, sampler, T, noise, cfg, eval_T, backbone, finetune,
        lora, groups, batches, reward, sampler_keys=None, algorithm_keys=None):
    return dict(algorithm=algorithm, beta=beta, global_std=global_std, clip=clip, std_eps=std_eps, K=K, lr=lr,
                sampler=sampler, T=T, noise=noise, cfg=cfg, eval_T=eval_T, sampler_keys=sampler_keys or {},
                algorithm_keys=algorithm_keys or {}, backbone=backbone, finetune=finetune, lora=lora, groups=groups,
                batches=batches, reward=reward)


# Shorthands for the settings shared by many rows (the bases: recipes/base/*.yaml).
SD35 = dict(backbone="sd35_medium", finetune="lora", lora=32, reward=["pickscore"])
FLUX = dict(backbone="flux1_dev", finetune="lora", lora=64, reward=["pickscore"])
TINY = dict(backbone="tiny_sd3", finetune="full", lora=8, groups=4, reward=["jpeg_compressibility"])
FG = {"timestep_fraction": 0.99}  # Flow-GRPO's sampler: steps 0..T-2 trained
DANCE = {"sde_type": "dance", "timestep_fraction": 0.6}
PPO = {"adv_clip_max": 5.0}
SHAPES = dict(backbone="shapes", finetune="full", lora=32, groups=8, batches=(32, 32, 2), reward=["shapes_geneval"])
SHAPES_CFG = 3.0                      # every shapes_* recipe: one guidance for rollout, loss and eval
SAME_G = {"eval_guidance_scale": None}

# One row per tiny_ and shapes_ recipe (the CPU recipes). The paper recipes (sd35, flux, sd15, sdxl) are checked
# value by value against their reference implementations by tests/test_recipe_doc.py (docs/reference_values/);
# every recipe needs a row here or there.
EXPECTED = {
    "shapes_flowgrpo": row("flowgrpo", beta=0.0, global_std=False, clip=1e-3, std_eps=1e-4, K=8, lr=3e-5,
                           sampler="FlowGRPOPlanner", T=8, noise=0.7, cfg=SHAPES_CFG, eval_T=20,
                           sampler_keys={"timestep_fraction": 0.4, **SAME_G}, algorithm_keys=PPO, **SHAPES),
    "shapes_quick": row("flowgrpo", beta=0.0, global_std=False, clip=1e-3, std_eps=1e-4, K=8, lr=1e-4,
                        sampler="FlowGRPOPlanner", T=8, noise=0.7, cfg=SHAPES_CFG, eval_T=20,
                        sampler_keys={"timestep_fraction": 0.4, **SAME_G}, algorithm_keys=PPO,
                        **{**SHAPES, "groups": 4, "batches": (32, 16, 2)}),
    "shapes_flowgrpo_fast": row("flowgrpo", beta=0.0, global_std=False, clip=1e-3, std_eps=1e-4, K=8, lr=3e-5,
                                sampler="FastPlanner", T=8, noise=0.7, cfg=SHAPES_CFG, eval_T=20,
                                sampler_keys={"window_size": 2, "branched": False, **SAME_G}, algorithm_keys=PPO,
                                **SHAPES),
    "shapes_mixgrpo": row("flowgrpo", beta=0.0, global_std=False, clip=1e-3, std_eps=1e-4, K=8, lr=3e-5,
                          sampler="MixGRPOPlanner", T=8, noise=0.7, cfg=SHAPES_CFG, eval_T=20,
                          sampler_keys={"window_size": 2, "strategy": "progressive", "shift_interval": 10,
                                        "ode_after": "ode", **SAME_G},
                          algorithm_keys=PPO, **SHAPES),
    "shapes_branchgrpo": row("flowgrpo", beta=0.0, global_std=False, clip=1e-3, std_eps=1e-4, K=1, lr=1e-4,
                             sampler="BranchPlanner", T=8, noise=0.7, cfg=SHAPES_CFG, eval_T=20,
                             sampler_keys={"split_points": [0, 2, 4], "branch_factor": 2, **SAME_G},
                             algorithm_keys=PPO, **{**SHAPES, "batches": (8, 4, 2)}),
    "shapes_tempflow": row("flowgrpo", beta=0.0, global_std=False, clip=1e-3, std_eps=1e-4, K=1, lr=3e-5,
                           sampler="SideBranchPlanner", T=8, noise=0.7, cfg=SHAPES_CFG, eval_T=20,
                           sampler_keys={"method": "tempflow", "branch_steps": [0, 2, 4], "children": 4,
                                         "noise_aware_weight": True, **SAME_G},
                           algorithm_keys=PPO, **{**SHAPES, "batches": (8, 4, 2)}),
    "shapes_g2rpo": row("flowgrpo", beta=0.0, global_std=False, clip=1e-3, std_eps=1e-4, K=1, lr=3e-5,
                        sampler="SideBranchPlanner", T=8, noise=0.7, cfg=SHAPES_CFG, eval_T=20,
                        sampler_keys={"method": "g2rpo", "branch_steps": [0, 2, 4], "children": 4,
                                      "granularities": [1, 2], **SAME_G},
                        algorithm_keys=PPO, **{**SHAPES, "batches": (8, 4, 2)}),
    "shapes_dancegrpo": row("dancegrpo", beta=0.0, global_std=False, clip=1e-3, std_eps=1e-8, K=8, lr=1e-4,
                            sampler="DancePlanner", T=8, noise=0.7, cfg=SHAPES_CFG, eval_T=20,
                            sampler_keys={**DANCE, **SAME_G}, algorithm_keys={**PPO, "advantage_aggr": "advantage"},
                            **SHAPES),
    "shapes_grpo_guard": row("grpo_guard", beta=0.0, global_std=False, clip=1e-3, std_eps=1e-4, K=8, lr=3e-5,
                             sampler="FlowGRPOPlanner", T=8, noise=0.7, cfg=SHAPES_CFG, eval_T=20,
                             sampler_keys={"timestep_fraction": 0.4, **SAME_G}, algorithm_keys=PPO, **SHAPES),
    "shapes_awm": row("awm", beta=0.0, global_std=False, clip=None, std_eps=1e-4, K=8, lr=1e-4, sampler="ODEPlanner",
                      T=8, noise=0.0, cfg=SHAPES_CFG, eval_T=20, sampler_keys=SAME_G,
                      algorithm_keys={"num_train_timesteps": 3, **PPO}, **SHAPES),
    "shapes_nft": row("nft", beta=0.0, global_std=False, clip=None, std_eps=1e-4, K=8, lr=3e-5, sampler="ODEPlanner",
                      T=8, noise=0.0, cfg=SHAPES_CFG, eval_T=20, sampler_keys=SAME_G,
                      algorithm_keys={"nft_beta": 1.0, "old_policy": "sampling", "num_train_timesteps": 3,
                                      "adv_clip_max": 1.0}, **SHAPES),
    # The tiny CPU recipes (recipes/base/tiny.yaml): 6 steps, CFG 4.5 (SD3) or guidance 3.5 (FLUX).
    "tiny_flowgrpo": row("flowgrpo", beta=0.0, global_std=True, clip=1e-2, std_eps=1e-4, K=8, lr=1e-2,
                         sampler="FlowGRPOPlanner", T=6, noise=0.7, cfg=4.5, eval_T=6, sampler_keys=FG,
                         algorithm_keys=PPO, batches=(16, 16, 2), **TINY),
    "tiny_flowgrpo_flux": row("flowgrpo", beta=0.0, global_std=True, clip=1e-2, std_eps=1e-4, K=8, lr=3e-2,
                              sampler="FlowGRPOPlanner", T=6, noise=0.9, cfg=3.5, eval_T=6, sampler_keys=FG,
                              algorithm_keys=PPO, batches=(16, 16, 2),
                              **{**TINY, "backbone": "tiny_flux", "finetune": "lora"}),
    # video: the tiny Wan2.1 (5 frames, 32px) with the Wan SDE and frame-wise JPEG compressibility
    "tiny_flowgrpo_wan": row("flowgrpo", beta=0.0, global_std=True, clip=1e-2, std_eps=1e-4, K=8, lr=1e-2,
                             sampler="FlowGRPOPlanner", T=6, noise=1.0, cfg=4.5, eval_T=6,
                             sampler_keys={**FG, "sde_type": "wan"}, algorithm_keys=PPO, batches=(16, 16, 2),
                             **{**TINY, "backbone": "tiny_wan"}),
    "tiny_flowgrpo_fast": row("flowgrpo", beta=0.0, global_std=True, clip=1e-2, std_eps=1e-4, K=8, lr=1e-2,
                              sampler="FastPlanner", T=6, noise=0.7, cfg=4.5, eval_T=6,
                              sampler_keys={"window_size": 2}, algorithm_keys=PPO, batches=(16, 16, 2), **TINY),
    "tiny_dancegrpo": row("dancegrpo", beta=0.0, global_std=False, clip=1e-2, std_eps=1e-8, K=8, lr=5e-3,
                          sampler="DancePlanner", T=6, noise=1.0, cfg=4.5, eval_T=6, sampler_keys=DANCE,
                          algorithm_keys={**PPO, "advantage_aggr": "advantage"}, batches=(16, 16, 2), **TINY),
    "tiny_mixgrpo": row("flowgrpo", beta=0.0, global_std=True, clip=1e-2, std_eps=1e-4, K=8, lr=1e-2,
                        sampler="MixGRPOPlanner", T=6, noise=0.7, cfg=4.5, eval_T=6,
                        sampler_keys={"window_size": 2, "strategy": "progressive", "shift_interval": 5,
                                      "ode_after": "ode", "compress_ratio": 1.0},
                        algorithm_keys=PPO, batches=(16, 16, 2), **TINY),
    "tiny_mixgrpo_flash": row("flowgrpo", beta=0.0, global_std=True, clip=1e-2, std_eps=1e-4, K=8, lr=1e-2,
                              sampler="MixGRPOPlanner", T=6, noise=0.7, cfg=4.5, eval_T=6,
                              sampler_keys={"window_size": 2, "strategy": "progressive", "shift_interval": 5,
                                            "ode_after": "dpm2m", "compress_ratio": 0.4},
                              algorithm_keys=PPO, batches=(16, 16, 2), **TINY),
    "tiny_branchgrpo": row("flowgrpo", beta=0.0, global_std=False, clip=1e-2, std_eps=1e-4, K=1, lr=1e-2,
                           sampler="BranchPlanner", T=6, noise=0.7, cfg=4.5, eval_T=6,
                           sampler_keys={"split_points": [0, 2, 3], "branch_factor": 2},
                           algorithm_keys=PPO, batches=(2, 2, 2), **TINY),
    "tiny_g2rpo": row("flowgrpo", beta=0.0, global_std=False, clip=1e-2, std_eps=1e-4, K=1, lr=1e-2,
                      sampler="SideBranchPlanner", T=6, noise=0.7, cfg=4.5, eval_T=6,
                      sampler_keys={"method": "g2rpo", "branch_steps": [0, 2], "children": 4, "granularities": [1, 2]},
                      algorithm_keys=PPO, batches=(2, 2, 2), **TINY),
    "tiny_tempflow": row("flowgrpo", beta=0.0, global_std=False, clip=1e-2, std_eps=1e-4, K=1, lr=1e-2,
                         sampler="SideBranchPlanner", T=6, noise=0.7, cfg=4.5, eval_T=6,
                         sampler_keys={"method": "tempflow", "branch_steps": [0, 2], "children": 4,
                                       "noise_aware_weight": True},
                         algorithm_keys=PPO, batches=(2, 2, 2), **TINY),
    "tiny_grpo_guard": row("grpo_guard", beta=0.0, global_std=False, clip=1e-2, std_eps=1e-4, K=8, lr=1e-2,
                           sampler="FlowGRPOPlanner", T=6, noise=0.7, cfg=4.5, eval_T=6, sampler_keys=FG,
                           algorithm_keys=PPO, batches=(16, 16, 2), **TINY),
    # Flow-GRPO's SD3.5 method values on SDXL with DDIM (eta 1) steps and CFG 5 (ours: no reference runs it there)
    # DDPO: kvablack/ddpo-pytorch@1958463 config/base.py (50 steps, eta 1, CFG 5 also in training, lr 3e-4, clip
    # 1e-4, adv clip 5, timestep_fraction 1, AdamW wd 1e-4, grad clip 1, fp16, LoRA at diffusers' default rank 4)
    # and config/dgx.py: compressibility() (SD1.4, 8 GPUs x 8 x 4 = 256 samples, 4 updates, 100 epochs, tracker
    # 16/16, imagenet_animals), incompressibility(), aesthetic() (simple_animals, 2 updates, 200 epochs, tracker
    # 32/16), prompt_image_alignment() (nouns_activities, 6 GPUs x 8 x 6 = 288 samples, 2 updates, 200 epochs,
    # tracker 32/16); stat_tracking.py: std + 1e-6.
    **{name: row("ddpo", beta=0.0, global_std=False, clip=1e-4, std_eps=1e-6, K=k, lr=3e-4, sampler="FlowGRPOPlanner",
                 T=50, noise=1.0, cfg=5.0, eval_T=50, sampler_keys={"sde_type": "ddim", "timestep_fraction": 1.0},
                 algorithm_keys={**PPO, "stat_buffer_size": buf, "stat_min_count": 16}, backbone="sd15",
                 finetune="lora", lora=4, groups=groups, batches=(8, 4, updates), reward=[reward])
       for name, k, buf, groups, updates, reward in [
           ("ddpo_sd15", 1, 16, 256, 4, "jpeg_compressibility"),
           ("ddpo_sd15_incompressibility", 1, 16, 256, 4, "jpeg_incompressibility"),
           ("ddpo_sd15_aesthetic", 8, 32, 32, 2, "aesthetic"),
           ("ddpo_sd15_alignment", 4, 32, 72, 2, "vlm_judge")]},
    # DDPO (ddpo-pytorch config/base.py, dgx.py): DDIM eta 1, all steps trained, CFG 5 in training, no KL,
    # per-prompt tracker, std eps 1e-6; the tiny twin shortens the tracker and uses the tiny step sizes.
    "tiny_ddpo": row("ddpo", beta=0.0, global_std=False, clip=1e-2, std_eps=1e-6, K=4, lr=3e-2,
                     sampler="FlowGRPOPlanner", T=6, noise=1.0, cfg=5.0, eval_T=6,
                     sampler_keys={"sde_type": "ddim", "timestep_fraction": 1.0},
                     algorithm_keys={**PPO, "stat_buffer_size": 8, "stat_min_count": 4}, batches=(16, 8, 2),
                     **{**TINY, "backbone": "tiny_sd15"}),
    "tiny_awm": row("awm", beta=0.0, global_std=False, clip=None, std_eps=1e-4, K=8, lr=1e-2, sampler="ODEPlanner",
                    T=6, noise=0.0, cfg=4.5, eval_T=6, algorithm_keys={"num_train_timesteps": 3, **PPO},
                    batches=(16, 16, 2), **TINY),
    "tiny_nft": row("nft", beta=0.0, global_std=False, clip=None, std_eps=1e-4, K=8, lr=3e-2, sampler="ODEPlanner",
                    T=6, noise=0.0, cfg=4.5, eval_T=6,
                    algorithm_keys={"nft_beta": 1.0, "old_policy": "sampling", "num_train_timesteps": 3,
                                    "adv_clip_max": 1.0},
                    batches=(16, 16, 2), **TINY),
}


# The preference family's recipes (their algorithms have no GRPO statistics). Values: recipes/algorithm/*.yaml
# comments and ../shared/reference/families.md (the sources named below) for _sd35/_flux; the tiny and
# ShapeWorld twins set their own lr/beta. steps/schedule: trainer.max_steps, lr_schedule, warmup_steps.
def prow(algorithm, *, lr, beta, time_sampling, rows=None, K=1, batches=(16, 8, 2), extra=None, base=None, cfg=4.5,
         T=6, finetune=None, steps=None, schedule=("constant", 0), eval_cfg=None):
    base = dict(base or TINY)
    if finetune:
        base["finetune"] = finetune
    out = dict(algorithm=algorithm, lr=lr, beta=beta, time_sampling=time_sampling, rows=rows, K=K, batches=batches,
               extra=extra or {}, cfg=cfg, eval_cfg=eval_cfg, T=T, schedule=schedule, **base)
    if steps is not None:
        out["steps"] = steps
    return out


SD35P = dict(SD35, groups=48)
FLUXP = dict(FLUX, groups=48)
SHAPESP = {k: v for k, v in SHAPES.items() if k != "batches"}
FULL_WARM = dict(finetune="full", schedule=("constant_with_warmup", 500))
SD15P = dict(backbone="sd15", finetune="lora", lora=4, reward=["jpeg_compressibility"], groups=256)


def published(method, base, cfg):
    """The _sd35/_flux rows: one per method, the same method values on both bases (the references' settings)."""
    rows = {
        # SalesforceAIResearch/DiffusionDPO launchers/sd15.sh: beta 5000, 2.048e-5 full, warm-up 500, 2000 x 2048
        "diffusion_dpo": prow("diffusion_dpo", lr=2.048e-5, beta=5000.0, time_sampling="uniform", rows=2048,
                              batches=(9, 1, 1), extra={"prompt_dropout": 0.2}, steps=2000, **FULL_WARM),
        # yifan123/flow_grpo config/dpo.py: beta 100, LoRA at 3e-4, logit-normal, 39 draws per pair
        "flow_dpo": prow("flow_dpo", lr=3e-4, beta=100.0, time_sampling="logit_normal", rows=32, batches=(9, 4, 1),
                         extra={"draws_per_row": 39}, steps=2000),
        # JaydenLyh/SmPO examples/sd15.sh: beta 2000, 1.024e-5 full, 200 steps, warm-up 100, 5 inversion steps
        "smpo": prow("smpo", lr=1.024e-5, beta=2000.0, time_sampling="uniform", rows=1024, batches=(9, 1, 1),
                     extra={"noise": "inversion", "inversion_steps": 5}, steps=200, finetune="full",
                     schedule=("constant_with_warmup", 100)),
        # jacklishufan/diffusion-kto exps/example.sh: beta 1000, 1e-7 full, warm-up 200, 8 per step, 20k steps
        "diffusion_kto": prow("diffusion_kto", lr=1e-7, beta=1000.0, time_sampling="uniform", rows=8,
                              batches=(9, 2, 1), extra={"prompt_dropout": 0.2}, steps=20000, finetune="full",
                              schedule=("constant_with_warmup", 200)),
        # arXiv 2410.18013: no published values; Diffusion-DPO's
        "rankdpo": prow("rankdpo", lr=2.048e-5, beta=5000.0, time_sampling="uniform", rows=2048, batches=(9, 1, 1),
                        extra={"weighting": "lambda"}, steps=2000, **FULL_WARM),
        # basiclab/DiffusionDRO train.py: lr 1e-4 constant full, margin 1e-3, 256 per step, 1600 steps, 20 steps
        "diffusion_dro": prow("diffusion_dro", lr=1e-4, beta=0.0, time_sampling="uniform", rows=256,
                              batches=(9, 4, 1), extra={"margin": 1e-3, "sample_steps": 20, "prompt_dropout": 0.2},
                              steps=1600, finetune="full"),
        # arXiv 2503.01103: alpha 1; beta and lr ours (no latent text-to-image setting published)
        "ddo": prow("ddo", lr=1e-5, beta=2500.0, time_sampling="logit_normal", rows=256, batches=(9, 4, 1),
                    extra={"alpha": 1.0, "sample_steps": 20}, steps=2000, finetune="full"),
        # yifan123/flow_grpo scripts/train_sd3_sft.py: LoRA at 3e-4 (config shared with dpo.py), logit-normal,
        # 32 prompts per iteration (its weight-100 pull toward the base model is not reproduced: docs/recipes.md)
        "sft": prow("sft", lr=3e-4, beta=0.0, time_sampling="logit_normal", rows=32, batches=(9, 4, 1), steps=2000),
        # yifan123/flow_grpo config/dpo.py: K=24, 40-step SDE noise 0.7, beta 100, LoRA 3e-4, 1 update
        "online_dpo": prow("online_dpo", lr=3e-4, beta=100.0, time_sampling="logit_normal", K=24, batches=(24, 1, 1),
                           extra={"draws_per_sample": 39}, T=40, steps=2000),
        # paper only (KwaiVGI/VideoAlign README): K=24 ODE, LoRA 3e-4, beta 1 (ours)
        "flow_rwr": prow("flow_rwr", lr=3e-4, beta=1.0, time_sampling="logit_normal", K=24, batches=(9, 9, 1),
                         extra={"draws_per_sample": 1}, T=10, steps=2000),
    }[method]
    finetune = base["finetune"] if method in ("flow_dpo", "sft", "online_dpo", "flow_rwr") else rows["finetune"]
    T = rows["T"] if rows["algorithm"] in ("online_dpo", "flow_rwr") else 40  # the offline ones: 40-step ODE eval
    out = {**rows, **base, "finetune": finetune, "cfg": cfg, "T": T}
    if method == "online_dpo":
        out["groups"] = 32  # flow_grpo's 32-GPU launcher: 32 prompts per iteration
    return out


PREFERENCE_METHODS = ("diffusion_dpo", "flow_dpo", "smpo", "diffusion_kto", "rankdpo", "diffusion_dro", "ddo", "sft",
                      "online_dpo", "flow_rwr")

PREFERENCE_EXPECTED = {
    "tiny_diffusion_dpo": prow("diffusion_dpo", lr=1e-3, beta=500.0, time_sampling="uniform", rows=16,
                               extra={"prompt_dropout": 0.0}),
    "tiny_flow_dpo": prow("flow_dpo", lr=1e-3, beta=50.0, time_sampling="logit_normal", rows=16),
    "tiny_smpo": prow("smpo", lr=3e-4, beta=500.0, time_sampling="uniform", rows=16,
                      extra={"noise": "inversion", "inversion_steps": 5, "score_min": -4.0, "score_max": -3.0}),
    "tiny_diffusion_kto": prow("diffusion_kto", lr=1e-3, beta=20.0, time_sampling="uniform", rows=16,
                               extra={"lambda_desirable": 1.0, "lambda_undesirable": 1.0}),
    "tiny_rankdpo": prow("rankdpo", lr=1e-3, beta=500.0, time_sampling="uniform", rows=16,
                         extra={"weighting": "lambda"}),
    "tiny_sft": prow("sft", lr=1e-3, beta=0.0, time_sampling="logit_normal", rows=16),
    "tiny_diffusion_dro": prow("diffusion_dro", lr=1e-3, beta=0.0, time_sampling="uniform", rows=16,
                               extra={"margin": 1e-3, "sample_steps": 6, "prompt_dropout": 0.0}),
    "tiny_ddo": prow("ddo", lr=1e-3, beta=250.0, time_sampling="logit_normal", rows=16,
                     extra={"alpha": 1.0, "sample_steps": 6}),
    "tiny_online_dpo": prow("online_dpo", lr=1e-3, beta=50.0, time_sampling="logit_normal", K=8,
                            batches=(16, 16, 2), extra={"draws_per_sample": 1}),
    "tiny_flow_rwr": prow("flow_rwr", lr=1e-4, beta=0.01, time_sampling="logit_normal", K=8,
                          batches=(16, 16, 2), extra={"draws_per_sample": 1}),
    # Diffusion-DPO on its home models (SalesforceAIResearch/DiffusionDPO launchers/sd15.sh, sdxl.sh, train.py):
    # beta 5000, 2.048e-5 full, warm-up 500 (SDXL 200), 2000 x 2048 pairs, 20% empty prompts; eval: the
    # pipelines' 50 steps at their default guidance (7.5 SD1.5, 5 SDXL). SDXL's optimizer is checked below.
    "diffusion_dpo_sd15": prow("diffusion_dpo", lr=2.048e-5, beta=5000.0, time_sampling="uniform", rows=2048,
                               batches=(8, 1, 1), extra={"prompt_dropout": 0.2}, steps=2000, base=SD15P, cfg=7.5,
                               T=50, **FULL_WARM),
    "diffusion_dpo_sdxl": prow("diffusion_dpo", lr=2.048e-5, beta=5000.0, time_sampling="uniform", rows=2048,
                               batches=(8, 1, 1), extra={"prompt_dropout": 0.2}, steps=2000,
                               base={**SD15P, "backbone": "sdxl"}, cfg=5.0, T=50, finetune="full",
                               schedule=("constant_with_warmup", 200)),
    "tiny_diffusion_dpo_sd15": prow("diffusion_dpo", lr=1e-3, beta=500.0, time_sampling="uniform", rows=16,
                                    extra={"prompt_dropout": 0.0}, base={**TINY, "backbone": "tiny_sd15"}),
    # ShapeWorld twins: 8-step ODE at guidance 3, full fine-tune at each row's rate, 64 rows (or 8 groups
    # of 8) per iteration, offline rows balanced over the tags
    "shapes_diffusion_dpo": prow("diffusion_dpo", lr=3e-5, beta=500.0, time_sampling="uniform", rows=64,
                                 batches=(32, 32, 2), extra={"prompt_dropout": 0.0}, base=SHAPESP, cfg=3.0, T=8),
    "shapes_flow_dpo": prow("flow_dpo", lr=3e-5, beta=500.0, time_sampling="logit_normal", rows=64,
                            batches=(32, 32, 2), base=SHAPESP, cfg=3.0, T=8),
    "shapes_smpo": prow("smpo", lr=1e-4, beta=500.0, time_sampling="uniform", rows=64, batches=(32, 32, 2),
                        extra={"score_min": 0.0, "score_max": 1.0}, base=SHAPESP, cfg=3.0, T=8),
    "shapes_diffusion_kto": prow("diffusion_kto", lr=3e-5, beta=500.0, time_sampling="uniform", rows=64,
                                 batches=(32, 32, 2), base=SHAPESP, cfg=3.0, T=8),
    "shapes_rankdpo": prow("rankdpo", lr=1e-4, beta=500.0, time_sampling="uniform", rows=64, batches=(32, 32, 2),
                           base=SHAPESP, cfg=3.0, T=8),
    "shapes_diffusion_dro": prow("diffusion_dro", lr=3e-5, beta=0.0, time_sampling="uniform", rows=64,
                                 batches=(32, 32, 2), extra={"sample_steps": 8, "sample_guidance": 1.0,
                                                             "loss_guidance": 1.0}, base=SHAPESP, cfg=3.0, T=8),
    "shapes_ddo": prow("ddo", lr=3e-5, beta=250.0, time_sampling="logit_normal", rows=64, batches=(32, 32, 2),
                       extra={"sample_steps": 20, "sample_guidance": 3.0}, base=SHAPESP, cfg=3.0, T=8),
    "shapes_sft": prow("sft", lr=3e-5, beta=0.0, time_sampling="logit_normal", rows=64, batches=(32, 32, 2),
                       extra={"prompt_dropout": 0.1}, base=SHAPESP, cfg=3.0, T=8),
    "shapes_online_dpo": prow("online_dpo", lr=3e-5, beta=50.0, time_sampling="logit_normal", K=8,
                              batches=(32, 32, 2), base=SHAPESP, cfg=3.0, T=8),
    # guidance-free rollouts drawn by the initial model, the eval at guidance 3 (docs/arena_preference.md, 7th round)
    "shapes_flow_rwr": prow("flow_rwr", lr=1e-5, beta=0.1, time_sampling="logit_normal", K=8, batches=(32, 32, 2),
                            extra={"anchor": 0.0, "normalise": "group", "rollouts_from": "reference"}, base=SHAPESP,
                            cfg=1.0, eval_cfg=3.0, T=8),
    **{f"{m}_sd35": published(m, SD35P, 4.5) for m in PREFERENCE_METHODS},
    **{f"{m}_flux": published(m, FLUXP, 3.5) for m in PREFERENCE_METHODS},
}


# The reward-gradient family's recipes. Values: recipes/algorithm/{refl,draft,draft_lv,alignprop,adjointdpm}.yaml
# comments and ../shared/reference/families.md section 11 (sources named there; DRaFT and AdjointDPM partly ours).
def grow(algorithm, *, lr, T, cfg, loss, groups, batches, base, steps, finetune=None, extra=None):
    base = dict(base)
    if finetune:
        base["finetune"] = finetune
    return dict(algorithm=algorithm, lr=lr, T=T, cfg=cfg, loss=loss, K=1, groups=groups, batches=batches, steps=steps,
                extra=extra or {}, **{k: v for k, v in base.items() if k not in ("groups", "batches")})


def gradient_published(method, base, flux):
    g = 3.5 if flux else None
    return {
        # THUDM/ImageReward scripts/train_refl.sh: 40 steps, m in [30, 40), no CFG, full at 1e-5, 64 per step, 100
        "refl": grow("refl", lr=1e-5, T=40, cfg=g or 1.0, loss="negative", groups=64, batches=(2, 2, 1),
                     base=base, steps=100, finetune="full", extra={"refl_low": 30}),
        # arXiv 2309.17400 (small scale): K = 1, 50 steps, CFG 7.5, lr 4e-4, 4 prompts per step, LoRA r8, 2000
        "draft": grow("draft", lr=4e-4, T=50, cfg=g or 7.5, loss="negative", groups=4, batches=(2, 2, 1),
                      base={**base, "lora": 8}, steps=2000, extra={"last_k": 1}),
        "draft_lv": grow("draft_lv", lr=4e-4, T=50, cfg=g or 7.5, loss="negative", groups=4, batches=(2, 2, 1),
                         base={**base, "lora": 8}, steps=2000, extra={"lv_samples": 2}),
        # mihirp1998/AlignProp config/alignprop_config.py, aesthetic.sh: LoRA 1e-3, 50 steps, CFG 5, N(42, 5), |r - 10|
        "alignprop": grow("alignprop", lr=1e-3, T=50, cfg=g or 5.0, loss="distance", groups=128, batches=(2, 2, 1),
                          base={**base, "reward": ["aesthetic"], "lora": 4}, steps=20,
                          extra={"truncation_mean": 42.0, "truncation_std": 5.0, "target": 10.0}),
        # HanshuYAN/AdjointDPM: the adjoint, 30 steps; other settings ours
        "adjointdpm": grow("adjointdpm", lr=1e-5, T=30, cfg=g or 1.0, loss="negative", groups=64, batches=(2, 2, 1),
                           base=base, steps=200, extra={"states": "reconstruct"}),
    }[method]


GRADIENT_METHODS = ("refl", "draft", "draft_lv", "alignprop", "adjointdpm")
TINY_G = {**TINY, "reward": ["jpeg_compressibility", "smoothness"]}
GRADIENT_EXPECTED = {
    **{f"{m}_sd35": gradient_published(m, SD35, False) for m in GRADIENT_METHODS},
    **{f"{m}_flux": gradient_published(m, FLUX, True) for m in GRADIENT_METHODS},
    "tiny_refl": grow("refl", lr=1e-3, T=6, cfg=1.0, loss="negative", groups=8, batches=(8, 8, 1), base=TINY_G,
                      steps=40, extra={"refl_low": 3, "loss_scale": 1.0}),
    "tiny_draft": grow("draft", lr=1e-3, T=6, cfg=1.0, loss="negative", groups=8, batches=(8, 8, 1), base=TINY_G,
                       steps=40, extra={"last_k": 1}),
    "tiny_draft_lv": grow("draft_lv", lr=1e-3, T=6, cfg=1.0, loss="negative", groups=8, batches=(8, 8, 1),
                          base=TINY_G, steps=40, extra={"lv_samples": 2}),
    "tiny_alignprop": grow("alignprop", lr=1e-3, T=6, cfg=4.5, loss="negative", groups=8, batches=(8, 8, 1),
                           base=TINY_G, steps=40, extra={"truncation_mean": 4.0, "truncation_std": 1.0}),
    "tiny_adjointdpm": grow("adjointdpm", lr=1e-3, T=6, cfg=1.0, loss="negative", groups=8, batches=(8, 8, 1),
                            base=TINY_G, steps=40, extra={"states": "reconstruct"}),
    # ShapeWorld: 8-step ODE at guidance 3, 18 slots per iteration (3 a tag), full fine-tune at 1e-5, shapes_seg
    **{f"shapes_{m}": grow(m, lr=1e-5, T=8, cfg=3.0, loss="negative", groups=18, batches=(18, 9, 1),
                           base={**SHAPES, "reward": ["shapes_geneval", "shapes_seg"]}, steps=1000000,
                           extra=e)
       for m, e in (("refl", {"refl_low": 5}), ("draft", {"last_k": 1}), ("draft_lv", {"lv_samples": 2}),
                    ("alignprop", {"truncation_mean": 6.0}), ("adjointdpm", {"states": "reconstruct"}))},
}


@pytest.mark.parametrize("name", sorted(GRADIENT_EXPECTED))
def test_reward_gradient_recipe_resolves_to_its_values(name):
    c, like = resolved(name), GRADIENT_EXPECTED[name]
    a, t = c["algorithm"], c["trainer"]
    got = dict(algorithm=a["name"], lr=a["lr"], T=a["num_steps"], cfg=a["guidance_scale"], loss=a["loss"],
               K=a["group_size"], groups=c["data"]["groups_per_iteration"],
               batches=(t["rollout_batch_size"], t["train_batch_size"], t["updates_per_iteration"]),
               steps=t["max_steps"], extra={k: a.get(k, "<absent>") for k in like["extra"]},
               backbone=c["backbone"]["name"], finetune=t["finetune"], lora=t["lora"]["rank"],
               reward=sorted(c["reward"]))
    diff = {k: (got[k], v) for k, v in like.items() if got[k] != v}
    assert not diff, f"{name}: resolved vs expected {diff}"
    assert all(c["reward"][n].get("differentiable", True) for n in c["reward"] if c["reward"][n].get("weight", 1))


@pytest.mark.parametrize("name", sorted(PREFERENCE_EXPECTED))
def test_preference_recipe_resolves_to_its_values(name):
    c, like = resolved(name), PREFERENCE_EXPECTED[name]
    a, t = c["algorithm"], c["trainer"]
    offline = (c["data"].get("offline") or {})
    got = dict(algorithm=a["name"], lr=a["lr"], beta=a["beta"], time_sampling=a["time_sampling"],
               rows=offline.get("rows_per_iteration"), K=a["group_size"],
               batches=(t["rollout_batch_size"], t["train_batch_size"], t["updates_per_iteration"]),
               extra={k: a.get(k, "<absent>") for k in like["extra"]}, backbone=c["backbone"]["name"],
               finetune=t["finetune"], lora=t["lora"]["rank"], groups=c["data"]["groups_per_iteration"],
               reward=sorted(c["reward"]), cfg=c["sampler"]["guidance_scale"], T=c["sampler"]["num_steps"],
               eval_cfg=c["sampler"].get("eval_guidance_scale"),
               schedule=(t["lr_schedule"], t["warmup_steps"]), steps=t["max_steps"])
    diff = {k: (got[k], v) for k, v in like.items() if got[k] != v}
    assert not diff, f"{name}: resolved vs expected {diff}"
    # ShapeWorld's offline data is two thirds position prompts; the eval weighs the tags alike
    assert offline.get("balance") == ("tag" if name.startswith("shapes_") and offline else None) or not offline


# Step-preference methods born on UNets (D3PO; their own algorithm fields). d3po_sd15: yk7333/d3po@40d3175
# config/base.py (SD1.5, 20 steps, eta 1, CFG 5, lr 3e-5, beta 0.1, eps 0.1, sample batch 10 x 2 per epoch, train
# batch 1 with gradient accumulation over the 20 steps only: one optimizer step per pair, 400 epochs, LoRA at
# diffusers' default rank 4, simple_animals, jpeg_compressibility).
def srow(algorithm, *, lr, beta, eps, T, cfg, eval_T, backbone, groups, batches, reward, steps, finetune="lora",
         lora=4, noise=1.0, branch=2, fraction=1.0):
    return dict(algorithm=algorithm, lr=lr, beta=beta, eps=eps, K=1, sampler="SharedNoisePlanner", T=T, noise=noise,
                cfg=cfg, eval_T=eval_T, branch=branch, fraction=fraction, kernel="ddim", backbone=backbone,
                finetune=finetune, lora=lora, groups=groups, batches=batches, reward=reward, steps=steps)


STEP_PREFERENCE_EXPECTED = {
    "d3po_sd15": srow("d3po", lr=3e-5, beta=0.1, eps=0.1, T=20, cfg=5.0, eval_T=20, backbone="sd15", groups=20,
                      batches=(10, 1, 20), reward=["jpeg_compressibility"], steps=400),
    "tiny_d3po": srow("d3po", lr=1e-2, beta=1.0, eps=0.5, T=6, cfg=5.0, eval_T=6, backbone="tiny_sd15", groups=8,
                      batches=(8, 4, 2), reward=["jpeg_compressibility"], steps=40, finetune="full", lora=8),
}


def test_diffusion_dpo_sdxl_takes_the_reference_optimizer_and_vae():
    c = resolved("diffusion_dpo_sdxl")
    assert c["trainer"]["optimizer"]["name"] == "adafactor" and c["trainer"]["optimizer"]["weight_decay"] == 0.01
    assert c["backbone"]["vae"] == "madebyollin/sdxl-vae-fp16-fix" and c["backbone"]["resolution"] == 1024


# DPOK: google-research dpok/README.md (single prompt: alpha 10, KL 0.01, p_batch 4, g_batch 10; multi: alpha 1000,
# KL 0.1, p_batch 2, g_batch 6, 100000 steps) and train_online_pg.py defaults (lr 1e-5, ratio clip 1e-4, buffer
# 1000, grad accumulation 12, p_step 5, v_lr 1e-4, v_batch 256, v_step 5, clip_norm 0.1, AdamW wd 0, LoRA r4,
# ImageReward); sampling: pipeline_stable_diffusion_extended.py (50 DDIM steps, eta 1, CFG 7.5).
def dpok_row(*, K, groups, alpha, kl, batches, steps, lr=1e-5, clip=1e-4, buffer=1000, accum=12, value=(1e-4, 256, 5),
             T=50, cfg=7.5, backbone="sd15", finetune="lora", reward=("imagereward",), grad_clip=0.1, wd=0.0):
    return dict(K=K, groups=groups, alpha=alpha, kl=kl, batches=batches, steps=steps, lr=lr, clip=clip, buffer=buffer,
                accum=accum, value=value, T=T, cfg=cfg, kernel="ddim", eta=1.0, backbone=backbone, finetune=finetune,
                reward=list(reward), grad_clip=grad_clip, wd=wd)


DPOK_EXPECTED = {
    "dpok_sd15": dpok_row(K=10, groups=1, alpha=10.0, kl=0.01, batches=(10, 4, 5), steps=2000),
    "dpok_sd15_multi": dpok_row(K=1, groups=6, alpha=1000.0, kl=0.1, batches=(6, 2, 5), steps=20000),
    "tiny_dpok": dpok_row(K=4, groups=4, alpha=1.0, kl=0.0, batches=(16, 8, 2), steps=40, lr=1e-2, clip=0.2,
                          buffer=512, accum=2, value=(1e-2, 64, 5), T=6, cfg=5.0, backbone="tiny_sd15",
                          finetune="full", reward=("jpeg_compressibility",), grad_clip=1.0, wd=1e-4),
}


# SPO: RockeyCoss/SPO@27a8642 configs/basic_config.py and the two experiment configs (SD1.5: 4 candidates, threshold
# 0.3, lr 6e-5, LoRA r4, 10 prompts x 4 GPUs; SDXL: 2 candidates, threshold 0.4, lr 1e-5, LoRA r64, 2 x 4 GPUs x
# accumulation 2, fp16-fix VAE); 20 steps, eta 1, CFG 5, beta 10, eps 0.1, divert_start_step 4, 10 epochs of 4k
# prompts. Keys are dotted paths into the resolved config.
SPO_COMMON = {"algorithm.name": "spo", "algorithm.beta": 10.0, "algorithm.eps": 0.1, "algorithm.num_steps": 20,
              "algorithm.eta": 1.0, "algorithm.guidance_scale": 5.0, "algorithm.divert_start_step": 4,
              "algorithm.score_scale": 1.0, "reward.step_aware_pickscore.scale": 1.0,
              "reward.step_aware_pickscore.model": "yuvalkirstain/PickScore_v1", "sampler.eval_num_steps": 20,
              "sampler.guidance_scale": 5.0, "trainer.finetune": "lora", "trainer.optimizer.weight_decay": 1e-4,
              "trainer.max_grad_norm": 1.0, "trainer.mixed_precision": "fp16", "trainer.updates_per_iteration": 1}
DOTTED_EXPECTED = {
    "spo_sd15": {**SPO_COMMON, "algorithm.lr": 6e-5, "algorithm.candidates": 4, "algorithm.threshold": 0.3,
                 "backbone.name": "sd15", "trainer.lora.rank": 4, "trainer.lora.alpha": 4,
                 "data.groups_per_iteration": 40, "trainer.rollout_batch_size": 10, "trainer.train_batch_size": 10,
                 "trainer.max_steps": 1000},
    "spo_sdxl": {**SPO_COMMON, "algorithm.lr": 1e-5, "algorithm.candidates": 2, "algorithm.threshold": 0.4,
                 "backbone.name": "sdxl", "backbone.vae": "madebyollin/sdxl-vae-fp16-fix", "trainer.lora.rank": 64,
                 "trainer.lora.alpha": 64, "data.groups_per_iteration": 8, "trainer.rollout_batch_size": 2,
                 "trainer.train_batch_size": 2, "trainer.max_steps": 5000},
    # ReinFlow: ReinFlow/ReinFlow@aed2819 hopper ft_ppo_reflow_mlp.yaml (4 steps, std [0.10, 0.24], clip 0.01, actor
    # lr 4.5e-5, entropy 0.03, 5 update epochs); the FLUX run is ours on FLUX.1-schnell.
    "reinflow_flux": {"algorithm.name": "reinflow", "algorithm.num_steps": 4, "algorithm.sigma_min": 0.1,
                      "algorithm.sigma_max": 0.24, "algorithm.hold_fraction": 0.35, "algorithm.clip_range": 0.01,
                      "algorithm.lr": 4.5e-5, "algorithm.ent_coef": 0.03, "algorithm.logp_clip": 1.0,
                      "algorithm.total_iterations": 1000, "trainer.inner_epochs": 5, "sampler.eval_num_steps": 4,
                      "backbone.pretrained": "black-forest-labs/FLUX.1-schnell", "algorithm.guidance_scale": 0.0},
    "tiny_reinflow": {"algorithm.name": "reinflow", "algorithm.num_steps": 4, "algorithm.lr": 1e-2,
                      "algorithm.clip_range": 0.2, "algorithm.group_size": 4, "backbone.name": "tiny_sd3",
                      "algorithm.total_iterations": 40},
    # ShapeWorld twins of the UNet-born methods on the epsilon model (shapes_eps) and ReinFlow on the flow model:
    # each method's form at shapes_flowgrpo's scale (10 DDIM steps, CFG 3 everywhere, lr 1e-4), ours
    "shapes_ddpo": {"algorithm.name": "ddpo", "backbone.name": "shapes_eps", "sampler.sde_type": "ddim",
                    "sampler.noise_level": 1.0, "sampler.timestep_fraction": 1.0, "sampler.num_steps": 10,
                    "sampler.guidance_scale": 3.0, "sampler.eval_guidance_scale": None, "algorithm.group_size": 8,
                    "algorithm.lr": 1e-4, "algorithm.clip_range": 1e-3, "algorithm.stat_buffer_size": 16,
                    "algorithm.stat_min_count": 8, "reward.shapes_geneval.weight": 1.0},
    "shapes_dpok": {"algorithm.name": "dpok", "backbone.name": "shapes_eps", "sampler.sde_type": "ddim",
                    "sampler.num_steps": 10, "sampler.guidance_scale": 3.0, "algorithm.group_size": 8,
                    "algorithm.lr": 1e-5, "algorithm.reward_weight": 10.0, "algorithm.kl_weight": 0.01,
                    "algorithm.ratio_clip": 1e-3, "algorithm.buffer_size": 2048},
    "shapes_d3po": {"algorithm.name": "d3po", "backbone.name": "shapes_eps", "sampler.branch_factor": 2,
                    "sampler.num_steps": 10, "sampler.guidance_scale": 3.0, "algorithm.lr": 1e-4,
                    "algorithm.beta": 0.1, "algorithm.eps": 0.1, "data.groups_per_iteration": 18,
                    "algorithm.human_file": None},
    "shapes_spo": {"algorithm.name": "spo", "backbone.name": "shapes_eps", "algorithm.num_steps": 10,
                   "algorithm.guidance_scale": 3.0, "sampler.guidance_scale": 3.0, "algorithm.candidates": 4,
                   "algorithm.threshold": 0.3, "algorithm.beta": 10.0, "algorithm.eps": 0.1,
                   "algorithm.divert_start_step": 2, "algorithm.score_scale": 10.0, "algorithm.lr": 1e-4},
    "shapes_diffusion_dpo_eps": {"algorithm.name": "diffusion_dpo", "backbone.name": "shapes_eps",
                                 "algorithm.beta": 500.0, "algorithm.lr": 1e-4, "data.offline.rows_per_iteration": 64},
    "shapes_reinflow": {"algorithm.name": "reinflow", "backbone.name": "shapes", "algorithm.num_steps": 8,
                        "sampler.eval_num_steps": 8, "sampler.guidance_scale": 3.0, "algorithm.guidance_scale": 3.0,
                        "algorithm.lr": 1e-4, "algorithm.noise_lr": 1e-3, "algorithm.total_iterations": 200},
    "tiny_spo": {"algorithm.name": "spo", "algorithm.lr": 3e-3, "algorithm.num_steps": 6,
                 "algorithm.divert_start_step": 1, "algorithm.candidates": 4, "algorithm.threshold": 0.3,
                 "algorithm.score_scale": 100.0, "algorithm.eps": 0.5, "backbone.name": "tiny_sd15",
                 "backbone.resolution": 32, "data.groups_per_iteration": 8, "trainer.finetune": "full"},
}


@pytest.mark.parametrize("name", sorted(DOTTED_EXPECTED))
def test_dotted_recipe_values(name):
    c = resolved(name)

    def get(path):
        node = c
        for part in path.split("."):
            node = node[part]
        return node

    diff = {k: (get(k), v) for k, v in DOTTED_EXPECTED[name].items() if get(k) != v}
    assert not diff, f"{name}: resolved vs expected {diff}"


@pytest.mark.parametrize("name", sorted(DPOK_EXPECTED))
def test_dpok_recipe_resolves_to_its_values(name):
    c, like = resolved(name), DPOK_EXPECTED[name]
    a, s, t = c["algorithm"], c["sampler"], c["trainer"]
    got = dict(K=a["group_size"], groups=c["data"]["groups_per_iteration"], alpha=a["reward_weight"],
               kl=a["kl_weight"], batches=(t["rollout_batch_size"], t["train_batch_size"], t["updates_per_iteration"]),
               steps=t["max_steps"], lr=a["lr"], clip=a["ratio_clip"], buffer=a["buffer_size"],
               accum=a["grad_accumulation"], value=(a["value_lr"], a["value_batch_size"], a["value_steps"]),
               T=s["num_steps"], cfg=s["guidance_scale"], kernel=s["sde_type"], eta=s["noise_level"],
               backbone=c["backbone"]["name"], finetune=t["finetune"], reward=sorted(c["reward"]),
               grad_clip=t["max_grad_norm"], wd=t["optimizer"]["weight_decay"])
    diff = {k: (got[k], v) for k, v in like.items() if got[k] != v}
    assert not diff, f"{name}: resolved vs expected {diff}"


@pytest.mark.parametrize("name", sorted(STEP_PREFERENCE_EXPECTED))
def test_step_preference_recipe_resolves_to_its_values(name):
    c, like = resolved(name), STEP_PREFERENCE_EXPECTED[name]
    a, s, t = c["algorithm"], c["sampler"], c["trainer"]
    got = dict(algorithm=a["name"], lr=a["lr"], beta=a["beta"], eps=a["eps"], K=a["group_size"],
               sampler=s["_target_"].rsplit(".", 1)[-1], T=s["num_steps"], noise=s["noise_level"],
               cfg=s["guidance_scale"], eval_T=s["eval_num_steps"], branch=s["branch_factor"],
               fraction=s["timestep_fraction"], kernel=s["sde_type"], backbone=c["backbone"]["name"],
               finetune=t["finetune"], lora=t["lora"]["rank"], groups=c["data"]["groups_per_iteration"],
               batches=(t["rollout_batch_size"], t["train_batch_size"], t["updates_per_iteration"]),
               reward=sorted(c["reward"]), steps=t["max_steps"])
    diff = {k: (got[k], v) for k, v in like.items() if got[k] != v}
    assert not diff, f"{name}: resolved vs expected {diff}"


@functools.lru_cache(maxsize=None)
def resolved(name: str) -> dict:
    cfg = compose([f"recipe={name}", "run_dir=/tmp/alignrl-test-recipes"])
    return OmegaConf.to_container(cfg, resolve=True)


def actual_row(c: dict, like: dict) -> dict:
    a, s, t = c["algorithm"], c["sampler"], c["trainer"]
    return dict(algorithm=a["name"], beta=a["beta"], global_std=a["global_std"], clip=a.get("clip_range"),
                std_eps=a["std_eps"], K=a["group_size"], lr=a["lr"], sampler=s["_target_"].rsplit(".", 1)[-1],
                T=s["num_steps"], noise=s["noise_level"], cfg=s["guidance_scale"], eval_T=s["eval_num_steps"],
                sampler_keys={k: s.get(k, "<absent>") for k in like["sampler_keys"]},
                algorithm_keys={k: a.get(k, "<absent>") for k in like["algorithm_keys"]},
                backbone=c["backbone"]["name"], finetune=t["finetune"], lora=t["lora"]["rank"],
                groups=c["data"]["groups_per_iteration"],
                batches=(t["rollout_batch_size"], t["train_batch_size"], t["updates_per_iteration"]),
                reward=sorted(c["reward"]))


def _reference_covered() -> set[str]:
    from alignrl.recipedoc import load_values

    return {r for data in load_values().values() for r in (data.get("recipes") or {})}


def test_the_table_covers_every_recipe():
    shipped = set(group_options("recipe"))
    assert shipped, "no recipes found"
    rows = (EXPECTED.keys() | PREFERENCE_EXPECTED.keys() | GRADIENT_EXPECTED.keys() | STEP_PREFERENCE_EXPECTED.keys()
            | DPOK_EXPECTED.keys() | DOTTED_EXPECTED.keys() | _reference_covered())
    assert not shipped - rows, f"recipes without a row in EXPECTED: {sorted(shipped - rows)}"
    assert not rows - shipped, f"rows for recipes that do not exist: {sorted(rows - shipped)}"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_resolves_to_its_method_values(name):
    got = actual_row(resolved(name), EXPECTED[name])
    diff = {k: (got[k], v) for k, v in EXPECTED[name].items() if got[k] != v}
    assert not diff, f"{name}: resolved vs expected {diff}"


# --- provenance: sampler and algorithm values come from the method's own files -----------------------

def _yaml(path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def _defaults(data: dict) -> tuple[list[str], dict[str, str]]:
    """(plain config entries, {group: option} overrides) of a defaults list."""
    plain, overrides = [], {}
    for entry in data.get("defaults", []):
        if isinstance(entry, str):
            if entry != "_self_":
                plain.append(entry)
        else:
            for key, value in entry.items():
                overrides[key.removeprefix("override ").lstrip("/")] = value
    return plain, overrides


def _recipe(name: str) -> dict:
    return _yaml(recipes_dir() / "recipe" / f"{name}.yaml")


def _recipe_chain(name: str) -> list[str]:
    """The recipe and the recipes it builds on, root first (bases, written /base/..., are not recipes)."""
    plain, _ = _defaults(_recipe(name))
    parents = [p for p in plain if not p.startswith("/")]
    assert len(parents) <= 1, f"{name}: builds on several recipes {parents}"
    return (_recipe_chain(parents[0]) if parents else []) + [name]


def _choice(name: str, group: str) -> str:
    for r in reversed(_recipe_chain(name)):
        _, overrides = _defaults(_recipe(r))
        if group in overrides:
            return overrides[group]
    for entry in _yaml(recipes_dir() / "config.yaml")["defaults"]:
        if isinstance(entry, dict) and group in entry:
            return entry[group]
    raise AssertionError(f"no default for {group}")


def _lineage(group: str, option: str) -> list[str]:
    """The group file and the files of the same group it extends (mixgrpo_flash extends mixgrpo), base first."""
    plain, _ = _defaults(_yaml(recipes_dir() / group / f"{option}.yaml"))
    return [x for p in plain for x in _lineage(group, p)] + [option]


def _group_values(group: str, option: str) -> dict:
    merged = OmegaConf.create()
    for o in _lineage(group, option):
        data = _yaml(recipes_dir() / group / f"{o}.yaml")
        data.pop("defaults", None)
        merged = OmegaConf.merge(merged, data)
    return merged


@pytest.mark.parametrize("group", METHOD_GROUPS)
@pytest.mark.parametrize("name", sorted(p.stem for p in (recipes_dir() / "recipe").glob("*.yaml")))
def test_method_values_come_from_the_method_own_files(name, group):
    """What the group file says, overridden only by recipes that chose this same group option.

    A recipe that chose another sampler or algorithm (another method) contributes nothing: values it sets
    would silently override the method's own file (dancegrpo_flux on flowgrpo_sd35 got beta 0.01).
    """
    choice = _choice(name, group)
    same_method = _lineage(group, choice)
    expected = _group_values(group, choice)
    for r in _recipe_chain(name):
        if _choice(r, group) in same_method:
            expected = OmegaConf.merge(expected, _recipe(r).get(group) or {})
    expected = OmegaConf.to_container(expected)
    got = resolved(name)[group]
    diff = {k: (got.get(k, "<absent>"), v) for k, v in expected.items()
            if got.get(k, "<absent>") != v and not (isinstance(v, str) and v.startswith("${"))}  # interpolations resolve
    diff.update({k: (v, "<absent>") for k, v in got.items() if k not in expected})
    assert not diff, (f"{name}: {group} values (resolved, from its own {group}/{choice}.yaml and same-method "
                      f"recipes) differ: {diff}; a recipe of another method in {_recipe_chain(name)} sets them")


def test_bases_hold_no_method_values_and_are_not_recipes():
    bases = sorted(p.stem for p in (recipes_dir() / "base").glob("*.yaml"))
    assert bases
    recipes = set(group_options("recipe"))
    assert not recipes & set(bases)
    assert not {n for n, _ in recipe_descriptions()} & set(bases)
    for b in bases:
        data = _yaml(recipes_dir() / "base" / f"{b}.yaml")
        _, overrides = _defaults(data)
        assert not set(METHOD_GROUPS) & (data.keys() | overrides.keys()), \
            f"base/{b}.yaml sets sampler or algorithm values; keep them in the method's files"
        assert "description" not in data, f"base/{b}.yaml has a description: a base is not a recipe"
        for spelling in (b, f"base/{b}", f"/base/{b}"):
            with pytest.raises(ConfigError, match="unknown recipe"):
                compose([f"recipe={spelling}", "run_dir=/tmp/alignrl-test-recipes"])


@pytest.mark.parametrize("recipe", sorted(p.stem for p in (recipes_dir() / "recipe").glob("*.yaml")))
def test_every_recipe_builds_its_parts_and_has_valid_typed_settings(recipe):
    """From the composed recipe (composed once per recipe in this file): its planner, algorithm and batch
    arithmetic build, its backbone's keys bind to the backbone's constructor (no weights loaded: a key inherited
    from a recipe of another backbone, a T5 length on SDXL, fails here rather than after minutes of start-up), its
    trainer settings are valid, and a recipe that shards is one the sharded path supports."""
    import inspect

    from hydra.utils import get_method

    from alignrl.components import build_algorithm, build_planner
    from alignrl.config import validate_batch_arithmetic
    from alignrl.training.sharding import DistributedConfig, check_strategy
    from alignrl.training.trainer_config import TrainerConfig

    c = resolved(recipe)
    cfg = OmegaConf.create(c)
    planner, algorithm = build_planner(cfg), build_algorithm(cfg)
    validate_batch_arithmetic(cfg, 1)
    plan = planner.plan(torch.Generator().manual_seed(0))
    assert plan.model_evals(1) >= 1 and algorithm.lr > 0
    spec = dict(c["backbone"])
    spec.pop("name", None)
    inspect.signature(get_method(spec.pop("_target_"))).bind(**spec, device="cpu")
    settings = TrainerConfig.from_config(c["trainer"])
    assert settings.max_steps >= 1 and settings.optimizer_steps_per_iteration >= 1
    if recipe.startswith(("shapes_", "tiny_")):  # the built-in prompt sets: the prompt sampler as `train` builds it
        _check_prompt_sampler(cfg, algorithm)
    dist = DistributedConfig.from_config(c["distributed"])
    if dist.sharded:  # else its run would stop at start
        check_strategy(dist, algorithm=algorithm, finetune=settings.finetune, text_encoder=settings.text_encoder,
                       mixed_precision=settings.mixed_precision)
    # the FLUX full fine-tunes of the GRPO family shard the 12B denoiser (alignrl plan); their LoRA variants do not
    if recipe in SHARDED:
        assert dist.sharded, recipe
    if recipe.removesuffix("_lora") in SHARDED:
        assert dist.sharded == (not recipe.endswith("_lora")), recipe


def _check_prompt_sampler(cfg, algorithm) -> None:
    """The training prompts, the batch arithmetic over them and the prompt sampler with its balancing, as
    ``alignrl train`` checks them before any model loads (an online method on its built-in prompts). The
    ShapeWorld reward-gradient recipes once asked for 32 balanced prompts a tag where single_object has 3."""
    from alignrl.algorithms.base import OFFLINE_KINDS
    from alignrl.config import validate_batch_arithmetic
    from alignrl.data import PromptSet
    from alignrl.training.sampler import KRepeatPromptSampler, balance_strata

    if algorithm.batch_kind in OFFLINE_KINDS or getattr(algorithm, "human_file", None):
        return
    prompts = PromptSet.load(cfg.data.train, "data.train")
    validate_batch_arithmetic(cfg, 1, num_prompts=len(prompts))
    KRepeatPromptSampler(num_prompts=len(prompts), groups_per_iteration=int(cfg.data.groups_per_iteration),
                         group_size=int(algorithm.group_size), strata=balance_strata(prompts, cfg.data.get("balance")))


SHARDED = {"dancegrpo_flux", "mixgrpo_flux", "mixgrpo_flash_flux", "branchgrpo_flux", "g2rpo_flux", "flowgrpo_wan21_14b"}


def test_trainer_settings_name_the_bad_key():
    from alignrl.errors import ConfigError
    from alignrl.training.trainer_config import TrainerConfig

    base = compose(["recipe=tiny_flowgrpo"]).trainer
    with pytest.raises(ConfigError, match=r"trainer.max_step is not a setting; did you mean trainer.max_steps\?"):
        TrainerConfig.from_config({**base, "max_step": 3})
    with pytest.raises(ConfigError, match=r"trainer.ema.decay=1.5 must be in \[0, 1\)"):
        TrainerConfig.from_config({**base, "ema": {"decay": 1.5}})
    with pytest.raises(ConfigError, match=r"trainer.max_steps='ten' must be an int"):
        TrainerConfig.from_config({**base, "max_steps": "ten"})
    with pytest.raises(ConfigError, match=r"trainer.eval_at_start=3 must be a bool"):
        TrainerConfig.from_config({**base, "eval_at_start": 3})
    with pytest.raises(ConfigError, match="trainer.lr_schedule='cosin' is not known"):
        TrainerConfig.from_config({**base, "lr_schedule": "cosin"})
    # an older run's config without a newer key gets the packaged default
    old = {k: v for k, v in base.items() if k != "max_nonfinite_iterations"}
    assert TrainerConfig.from_config(old).max_nonfinite_iterations == 3
    # a partial nested mapping keeps the other nested defaults
    assert TrainerConfig.from_config({**base, "ema": {"decay": 0.5}}).ema.update_every == 8


def test_adafactor_optimizer_has_the_reference_settings_and_its_state_resumes(tmp_path):
    """trainer.optimizer.name=adafactor (Diffusion-DPO's SDXL optimizer): no relative step, no parameter scaling,
    update clip 1; its state saves and loads as checkpoints do (torch.load weights_only) and resumes exactly."""
    from alignrl.errors import ConfigError
    from alignrl.training.trainer_config import TrainerConfig

    base = compose(["recipe=tiny_flowgrpo"]).trainer
    settings = TrainerConfig.from_config({**base, "optimizer": {"name": "adafactor", "weight_decay": 0.01}})

    def make():
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(6, 5))
        return w, settings.build_optimizer([w], 1e-3)

    def step(w, opt, k):
        loss = ((w * (k + 1)) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()

    w, opt = make()
    group = opt.param_groups[0]
    assert type(opt).__name__ == "Adafactor" and group["relative_step"] is False
    assert group["scale_parameter"] is False and group["clip_threshold"] == 1.0 and group["weight_decay"] == 0.01
    for k in range(4):
        step(w, opt, k)
    w2, opt2 = make()
    for k in range(2):
        step(w2, opt2, k)
    torch.save(opt2.state_dict(), tmp_path / "optimizer.pt")
    w3, opt3 = make()
    with torch.no_grad():
        w3.copy_(w2)
    opt3.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    for k in range(2, 4):
        step(w3, opt3, k)
    assert torch.equal(w, w3)
    with pytest.raises(ConfigError, match="trainer.optimizer.name='sgd' is not known"):
        TrainerConfig.from_config({**base, "optimizer": {"name": "sgd"}})


def test_shapes_sft_data_are_drawn_without_guidance_and_the_other_offline_recipes_at_the_eval_s():
    """shapes_sft's and shapes_diffusion_dro's data are drawn without CFG (docs/arena_preference.md, sixth round); the other ShapeWorld offline
    recipes' data at the eval's guidance (datagen.guidance_scale null); every one evaluates at guidance 3."""
    for name in ("shapes_sft", "shapes_ddo", "shapes_diffusion_dro", "shapes_flow_dpo", "shapes_rankdpo"):
        c = resolved(name)
        assert c["datagen"]["guidance_scale"] == (1.0 if name in ("shapes_sft", "shapes_diffusion_dro") else None), name
        assert c["sampler"]["guidance_scale"] == 3.0 and c["sampler"]["eval_guidance_scale"] is None, name
