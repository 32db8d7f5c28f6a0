#!/usr/bin/env python
"""Rollout engine vs the diffusers pipeline, and where an iteration's time goes.

1. Sampling: the rollout engine with an ODE plan against ``StableDiffusion3Pipeline.__call__`` on the
   same tiny model, steps, batch, guidance and starting latents (both from cached prompt embeddings,
   both decoding to images), timed alternately in one run; prints the ratio engine / pipeline
   (target <= 1.10).
2. Iteration split: a short run of the tiny recipe with timing hooks on the denoiser's forward and on
   backward; prints rollout / reward wait / update / other, and the share of the iteration spent
   outside model forward/backward and VAE decode (target < 10%).

    python scripts/bench_rollout.py [--batch 8] [--steps 8] [--repeats 20] [--iterations 6] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def bench_sampling(args) -> dict:
    from alignrl.backbones.sd3 import SD3Backbone
    from alignrl.sampling.engine import rollout, sample_generators
    from alignrl.sampling.plans import ode_plan

    bb = SD3Backbone.tiny(device=args.device, resolution=args.resolution)
    prompts = [f"a photo of a red cat number {i}" for i in range(args.batch)]
    cond = bb.encode_prompts(prompts)
    neg = bb.negative_conditioning().expand(args.batch)
    plan = ode_plan(args.steps, args.guidance)

    def engine():
        gens = sample_generators(0, 0, range(args.batch), device=bb.device)
        return bb.decode(rollout(bb, plan, cond, gens, record=False).final)

    def pipeline():
        latents = bb.initial_noise(sample_generators(0, 0, range(args.batch), device=bb.device))
        return bb.pipe(prompt_embeds=cond.tensors["prompt_embeds"], pooled_prompt_embeds=cond.tensors["pooled"],
                       negative_prompt_embeds=neg.tensors["prompt_embeds"],
                       negative_pooled_prompt_embeds=neg.tensors["pooled"], latents=latents,
                       num_inference_steps=args.steps, guidance_scale=args.guidance, output_type="pt",
                       height=args.resolution, width=args.resolution).images

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
    args = p.parse_args()
    torch.set_grad_enabled(True)

    s = bench_sampling(args)
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"sampling {args.batch} images x {args.steps} ODE steps, CFG {args.guidance}, {args.resolution}px "
          f"(tiny SD3), median of {args.repeats}:")
    print(f"  rollout engine     {s['engine_s'] * 1000:8.1f} ms")
    print(f"  diffusers pipeline {s['pipeline_s'] * 1000:8.1f} ms")
    print(f"  ratio engine/pipeline = {s['ratio']:.3f}  (target <= 1.10; max |diff| {s['max_abs_diff']:.2e})")

    it = bench_iteration(args)
    print(f"tiny_flowgrpo iteration (mean of {args.iterations - 1}, after one warm-up):")
    for k in ("rollout", "reward_wait", "update", "other", "iteration"):
        print(f"  {k:<12} {it[k] * 1000:8.1f} ms  ({it[k] / it['iteration']:6.1%})")
    print(f"  model forward+backward+decode {it['model'] * 1000:8.1f} ms; outside the model "
          f"{it['outside_model_frac']:.1%} (target < 10%)")


if __name__ == "__main__":
    main()
