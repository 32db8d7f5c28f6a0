#!/usr/bin/env python
"""Pretrain the ShapeWorld text-to-image model (rectified flow in pixel space) and save it.

Seeded and reproducible for given arguments. Every sample is a fresh composition of the world
(``world.sample_metadata``: a tag drawn uniformly, colour words on two thirds of the objects, never a held-out
composition), rendered on the fly; 10% of prompts are dropped to "" for CFG; t ~ logit-normal(0, 1),
x_t = (1 - t) x0 + t eps, target eps - x0; AdamW with warm-up then a constant rate; an EMA of the weights with
warm-up, which is what is saved (fp16 safetensors). The text encoder (bidirectional, with the padding mask passed
to the UNet's cross-attention) trains with the UNet. Every --eval-every steps the EMA model is evaluated on the
``in_dist`` and ``held_out`` sets with the exact judge, and the colour-swap cosine of its text encoder is logged.

The options that made the first version's model colour-blind are kept for the ablation (docs/shapes.md):
``--text-encoder clip`` (causal, no mask), ``--data colourless`` (colour words only in the colour tags: the
first version's mix), ``--schedule cosine`` (decay to 10%).

    python scripts/pretrain_shapes.py                                    # writes alignrl/shapes/pretrained
    python scripts/pretrain_shapes.py --minutes 10 --out /tmp/shapes     # a budgeted run (ablations)
    python scripts/pretrain_shapes.py --objective epsilon --threads 1    # the epsilon twin (pretrained_eps)

``--objective epsilon`` trains the same architecture as a DDPM noise predictor (linear betas, t uniform over the
1000 training steps, target eps; ``alignrl.shapes.model.epsilon_scheduler``), the home ground of the UNet-born
methods (DDPO, DPOK, D3PO, SPO, Diffusion-DPO): the ``shapes_eps`` backbone.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from alignrl.eval.evaluate import bootstrap_mean  # noqa: E402
from alignrl.sampling.parameterisation import FLOW  # noqa: E402
from alignrl.shapes.judge import check, per_tag_table  # noqa: E402
from alignrl.shapes.model import TEXT_ENCODERS, build_pipeline, colour_swap_cosine  # noqa: E402
from alignrl.shapes.world import eval_set, render_batch, sample_metadata  # noqa: E402


@torch.no_grad()
def evaluate(pipe, unet, text, metas, steps, guidance, seed, images_per_prompt=1) -> dict:
    """Judge the model on ``metas`` (each ``images_per_prompt`` times): per-tag table, image-weighted strict
    with a bootstrap interval over prompts."""
    metas = [m for m in metas for _ in range(images_per_prompt)]
    results = []
    g = torch.Generator().manual_seed(seed)
    saved = pipe.unet, pipe.text_encoder
    pipe.unet, pipe.text_encoder = unet, text
    try:
        for i in range(0, len(metas), 32):  # 32 prompts (64 rows with CFG): the fastest batch on a CPU
            chunk = metas[i:i + 32]
            x = torch.randn((len(chunk), 3, 32, 32), generator=g)
            imgs = pipe([m["prompt"] for m in chunk], num_inference_steps=steps, guidance_scale=guidance, latents=x)
            arr = (imgs * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            results += [check(a, m) for a, m in zip(arr, chunk)]
    finally:
        pipe.unet, pipe.text_encoder = saved
    table = per_tag_table(metas, results)
    strict, lo, hi = bootstrap_mean(np.array([r["strict"] for r in results]), [m["prompt"] for m in metas])
    return {"strict_images": strict, "ci": [lo, hi], "tags": {k: round(v["strict"], 4) for k, v in table.items()},
            "partial_tags": {k: round(v["partial"], 4) for k, v in table.items()}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps (a --minutes budget may stop earlier)")
    p.add_argument("--minutes", type=float, default=None, help="stop after this much training wall-clock")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--schedule", choices=("constant", "cosine"), default="constant")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--text-encoder", choices=TEXT_ENCODERS, default="bert")
    p.add_argument("--data", choices=("fresh", "colourless"), default="fresh",
                   help="fresh: colour words on 2/3 of objects in every tag; colourless: only in the colour tags")
    p.add_argument("--objective", choices=("flow", "epsilon"), default="flow",
                   help="flow: rectified flow (the shipped model); epsilon: DDPM noise prediction, t uniform over the "
                        "1000 training steps (the twin for the UNet-born methods; writes alignrl/shapes/pretrained_eps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=700, help="steps between evaluations (0: only at the end)")
    p.add_argument("--eval-steps", type=int, default=20)
    p.add_argument("--eval-per-tag", type=int, default=40)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--snapshots", default=None,
                   help="also save the EMA model at every evaluation to <dir>/step_N (to pick a checkpoint later)")
    p.add_argument("--out", default=None, help="default: alignrl/shapes/pretrained (flow) or pretrained_eps (epsilon)")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = str(REPO / "alignrl" / "shapes" / ("pretrained" if args.objective == "flow" else "pretrained_eps"))
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    pipe = build_pipeline(args.seed, text_encoder=args.text_encoder, objective=args.objective).to(device)
    unet, text = pipe.unet, pipe.text_encoder
    alpha_bar = pipe.scheduler.alphas_cumprod.float().to(device) if args.objective == "epsilon" else None
    unet.train()
    text.train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    ema_text = copy.deepcopy(text).eval().requires_grad_(False)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        if args.schedule == "constant":
            return args.lr
        frac = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    sets = {s: eval_set(s, per_tag=args.eval_per_tag, fill=True) for s in ("in_dist", "held_out")}
    rng = random.Random(args.seed)
    color_prob = 2 / 3 if args.data == "fresh" else 0.0
    log = []
    t_start = time.time()
    eval_seconds = 0.0
    print(f"unet {sum(q.numel() for q in unet.parameters()) / 1e6:.2f}M, text ({args.text_encoder}) "
          f"{sum(q.numel() for q in text.parameters()) / 1e6:.2f}M; data {args.data}, schedule {args.schedule}; "
          f"{args.steps} steps" + (f" or {args.minutes} min" if args.minutes else ""), flush=True)

    def run_eval(step):
        nonlocal eval_seconds
        t0 = time.time()
        row = {"step": step, "train_minutes": round((time.time() - t_start - eval_seconds) / 60, 2),
               "colour_swap_cosine": round(colour_swap_cosine(pipe, ema_text), 4)}
        for name, metas in sets.items():
            row[name] = evaluate(pipe, ema, ema_text, metas, args.eval_steps, args.guidance, args.seed)
        log.append(row)
        print("eval", json.dumps(row), flush=True)
        eval_seconds += time.time() - t0
        if args.snapshots:
            t1 = time.time()
            save(Path(args.snapshots) / f"step_{step}", step)
            eval_seconds += time.time() - t1

    def save(out, step):
        """The EMA weights in fp16 as a diffusers pipeline directory, with how they were made."""
        out.mkdir(parents=True, exist_ok=True)
        live = pipe.unet, pipe.text_encoder
        pipe.unet, pipe.text_encoder = copy.deepcopy(ema).half(), copy.deepcopy(ema_text).half()
        try:
            pipe.save_pretrained(str(out), safe_serialization=True)
        finally:
            pipe.unet, pipe.text_encoder = live
        info = {"args": vars(args), "steps": step,
                "train_minutes": round((time.time() - t_start - eval_seconds) / 60, 2),
                "torch_threads": torch.get_num_threads(), "eval": log,
                "note": f"EMA weights, fp16; strict accuracy on the in_dist and held_out sets ({args.eval_per_tag} "
                        f"rows per tag, 1 image each, {args.eval_steps}-step ODE, CFG {args.guidance}); ci: 95% "
                        f"bootstrap over prompts"}
        (out / "training_info.json").write_text(json.dumps(info, indent=2))
        return info

    step = 0
    while step < args.steps:
        if args.minutes and (time.time() - t_start - eval_seconds) / 60 >= args.minutes:
            break
        metas = [sample_metadata(rng, color_prob=color_prob) for _ in range(args.batch)]
        x0 = torch.from_numpy(render_batch(metas, seed=args.seed * 1_000_003 + step)).permute(0, 3, 1, 2)
        x0 = (x0.float() / 127.5 - 1).to(device)
        prompts = ["" if rng.random() < args.dropout else m["prompt"] for m in metas]
        states, mask = pipe.text_embeddings(*pipe.tokenize(prompts, device))
        eps = torch.randn_like(x0)
        if args.objective == "flow":
            t = torch.sigmoid(torch.randn(args.batch, device=device))  # logit-normal
            xt = FLOW.add_noise(x0, eps, t)
            v = unet(xt, t * 1000, encoder_hidden_states=states, encoder_attention_mask=mask).sample
            loss = ((v - FLOW.target(x0, eps, t)) ** 2).mean()
        else:  # DDPM: t uniform over the training steps, x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, target eps
            t = torch.randint(0, alpha_bar.numel(), (args.batch,), device=device)
            a = alpha_bar[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
            out = unet(xt, t, encoder_hidden_states=states, encoder_attention_mask=mask).sample
            loss = ((out - eps) ** 2).mean()
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():  # EMA with warm-up, so early averages do not keep the random init
            decay = min(args.ema, (1 + step) / (10 + step))
            for e, m in ((ema, unet), (ema_text, text)):
                for pe, pm in zip(e.parameters(), m.parameters()):
                    pe.lerp_(pm, 1 - decay)
        step += 1
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.4f} lr {lr_at(step):.2e} "
                  f"{(time.time() - t_start - eval_seconds) / 60:.1f} train-min", flush=True)
        if args.eval_every and step % args.eval_every == 0:
            run_eval(step)
    if not log or log[-1]["step"] != step:
        run_eval(step)

    out = Path(args.out)
    info = save(out, step)
    print(f"saved to {out} ({info['train_minutes']:.1f} train-min, {step} steps)", flush=True)


if __name__ == "__main__":
    main()
