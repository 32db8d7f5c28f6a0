#!/usr/bin/env python
"""Rollout engine vs the diffusers pipeline, and where an iteration's time goes.

1. Sampling: the rollout engine with an ODE plan against the diffusers pipeline's ``__call__`` on the
   same tiny model, steps, batch, guidance and starting latents (both from cached prompt embeddings,
   both decoding to images), timed alternately in one run, for SD3 (``StableDiffusion3Pipeline``, target
   <= 1.10), SD1.5 and SDXL (``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` with DDIM, eta 0,
   which the engine's ODE equals; target <= 1.05) and Wan2.1 video (``WanPipeline`` with first-order UniPC without
   corrector, the engine's Euler on Wan's sigma grid; 9 frames; target <= 1.05); prints the ratio engine / pipeline.
2. Iteration split: a short run of the tiny recipe with timing hooks on the denoiser's forward and on
   backward; prints rollout / reward wait / update / other, and the share of the iteration spent
   outside model forward/backward and VAE decode (target < 10%).

    python scripts/bench_rollout.py [--batch 8] [--steps 8] [--repeats 20] [--iterations 6] [--device cpu]
                                    [--backbone all|sd3|sd15|sdxl|wan] [--sampling-only]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _tiny(family: str, args):
    from alignrl.backbones.sd3 import SD3Backbone
    from alignrl.backbones.unet import SD15Backbone, SDXLBackbone
    from alignrl.backbones.wan import WanBackbone

    if family == "wan":
        return WanBackbone.tiny(device=args.device, resolution=args.resolution, num_frames=args.frames)
    if family == "sd3":
        return SD3Backbone.tiny(device=args.device, resolution=args.resolution)
    return {"sd15": SD15Backbone, "sdxl": SDXLBackbone}[family].tiny(device=args.device, resolution=args.resolution)


def _pipeline_kwargs(family: str, bb, cond, neg) -> dict:
    """The pipeline's own arguments for the cached embeddings (each pipeline names them its way)."""
    t = cond.tensors
    if family == "wan":
        return {"prompt_embeds": t["prompt_embeds"], "negative_prompt_embeds": neg.tensors["prompt_embeds"],
                "num_frames": bb.num_frames}
    if family == "sd15":
        return {"prompt_embeds": t["prompt_embeds"], "negative_prompt_embeds": neg.tensors["prompt_embeds"],
                "eta": 0.0}
    kw = {"prompt_embeds": t["prompt_embeds"], "pooled_prompt_embeds": t["pooled"],
          "negative_prompt_embeds": neg.tensors["prompt_embeds"],
          "negative_pooled_prompt_embeds": neg.tensors["pooled"]}
    return {**kw, "eta": 0.0} if family == "sdxl" else kw


def bench_sampling(args, family: str = "sd3") -> dict:
    """The engine's ODE against the family's diffusers pipeline (UNets: with DDIM, eta 0, the scheduler the
    engine's ODE equals) on the same tiny model, starting latents and cached embeddings, alternately timed."""
    from diffusers import DDIMScheduler

    from alignrl.sampling.engine import rollout, sample_generators
    from alignrl.sampling.plans import ode_plan

    bb = _tiny(family, args)
    if family == "wan":
        bb.pipe.scheduler = bb.euler_scheduler()
    elif family != "sd3":
        bb.pipe.scheduler = DDIMScheduler.from_config(bb.pipe.scheduler.config)
    prompts = [f"a photo of a red cat number {i}" for i in range(args.batch)]
    cond = bb.encode_prompts(prompts)
    neg = bb.negative_conditioning().expand(args.batch)
    plan = ode_plan(args.steps, args.guidance)
    call = _pipeline_kwargs(family, bb, cond, neg)

    def engine():
        gens = sample_generators(0, 0, range(args.batch), device=bb.device)
        return bb.decode(rollout(bb, plan, cond, gens, record=False).final)

    def pipeline():
        latents = bb.initial_noise(sample_generators(0, 0, range(args.batch), device=bb.device))
        out = bb.pipe(latents=latents, num_inference_steps=args.steps, guidance_scale=args.guidance,
                      output_type="pt", height=args.resolution, width=args.resolution, **call)
        return out.frames if family == "wan" else out.images

    with torch.no_grad():
        a, b = engine(), pipeline()  # warm-up, and the outputs must agree
        max_diff = (a - b).abs().max().item()
        times = {"engine": [], "pipeline": []}
        for _ in range(args.repeats):  # alternate so drift in machine load hits both alike
            for name, fn in (("engine", engine), ("pipeline", pipeline)):
                if bb.device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                if bb.device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"engine_s": med["engine"], "pipeline_s": med["pipeline"], "ratio": med["engine"] / med["pipeline"],
            "max_abs_diff": max_diff}


def bench_iteration(args) -> dict:
    from alignrl.config import compose
    from alignrl.training.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose([f"run_dir={tmp}", f"trainer.max_steps={args.iterations}", "trainer.eval_every=0",
                       "trainer.checkpoint_every=0", "trainer.log_images_every=0", "logger.progress_bar=false",
                       f"trainer.device={args.device}"])
        trainer = Trainer(cfg, Path(tmp))
        clock = {"forward": 0.0, "backward": 0.0, "decode": 0.0}
        starts = {}

        def sync():
            if trainer.device.type == "cuda":
                torch.cuda.synchronize()

        def pre(_m, _a, _k=None):
            sync()
            starts["f"] = time.perf_counter()

        def post(_m, _a, _o, _k=None):
            sync()
            clock["forward"] += time.perf_counter() - starts["f"]

        trainer.denoiser.register_forward_pre_hook(pre)
        trainer.denoiser.register_forward_hook(post)
        backward, decode = trainer.accelerator.backward, trainer.backbone.decode

        def timed_backward(loss):
            sync()
            t0 = time.perf_counter()
            backward(loss)
            sync()
            clock["backward"] += time.perf_counter() - t0

        def timed_decode(latents):
            sync()
            t0 = time.perf_counter()
            out = decode(latents)
            sync()
            clock["decode"] += time.perf_counter() - t0
            return out

        trainer.accelerator.backward = timed_backward
        trainer.backbone.decode = timed_decode
        trainer.run_iteration()  # warm-up (prompt cache, allocator)
        trainer.iteration += 1
        for k in clock:
            clock[k] = 0.0
        totals = {"rollout": 0.0, "reward_wait": 0.0, "update": 0.0, "iteration": 0.0}
        for _ in range(args.iterations - 1):
            m = trainer.run_iteration()
            trainer.iteration += 1
            for k in totals:
                totals[k] += m[f"time/{k}"]
        trainer.reward_runner.close()
    n = args.iterations - 1
    per_it = {k: v / n for k, v in totals.items()}
    model = (clock["forward"] + clock["backward"] + clock["decode"]) / n
    per_it["other"] = per_it["iteration"] - per_it["rollout"] - per_it["reward_wait"] - per_it["update"]
    per_it["model"] = model
    per_it["outside_model_frac"] = 1 - model / per_it["iteration"]
    return per_it


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--guidance", type=float, default=4.5)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--iterations", type=int, default=6)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--frames", type=int, default=9, help="video frames (wan; 4k+1)")
    p.add_argument("--backbone", default="all", choices=["all", "sd3", "sd15", "sdxl", "wan"],
                   help="whose engine-vs-pipeline sampling to time (all: one after another)")
    p.add_argument("--sampling-only", action="store_true", help="skip the iteration split")
    args = p.parse_args()
    torch.set_grad_enabled(True)

    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    targets = {"sd3": 1.10, "sd15": 1.05, "sdxl": 1.05, "wan": 1.05}
    pipes = {"sd3": "StableDiffusion3Pipeline", "sd15": "StableDiffusionPipeline (DDIM)",
             "sdxl": "StableDiffusionXLPipeline (DDIM)", "wan": "WanPipeline (UniPC order 1)"}
    for family in (("sd3", "sd15", "sdxl", "wan") if args.backbone == "all" else (args.backbone,)):
        s = bench_sampling(args, family)
        what = f"videos ({args.frames} frames)" if family == "wan" else "images"
        print(f"sampling {args.batch} {what} x {args.steps} ODE steps, CFG {args.guidance}, {args.resolution}px "
              f"(tiny {family}), median of {args.repeats}:")
        print(f"  {'rollout engine':<34} {s['engine_s'] * 1000:8.1f} ms")
        print(f"  {pipes[family]:<34} {s['pipeline_s'] * 1000:8.1f} ms")
        print(f"  ratio engine/pipeline = {s['ratio']:.3f}  (target <= {targets[family]:.2f}; "
              f"max |diff| {s['max_abs_diff']:.2e})")
    if args.sampling_only:
        return

    it = bench_iteration(args)
    print(f"tiny_flowgrpo iteration (mean of {args.iterations - 1}, after one warm-up):")
    for k in ("rollout", "reward_wait", "update", "other", "iteration"):
        print(f"  {k:<12} {it[k] * 1000:8.1f} ms  ({it[k] / it['iteration']:6.1%})")
    print(f"  model forward+backward+decode {it['model'] * 1000:8.1f} ms; outside the model "
          f"{it['outside_model_frac']:.1%} (target < 10%)")


if __name__ == "__main__":
    main()
