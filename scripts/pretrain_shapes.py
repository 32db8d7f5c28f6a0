#!/usr/bin/env python
"""Pretrain the ShapeWorld text-to-image model (rectified flow in pixel space) and save it.

Seeded and reproducible for a given --steps: images are rendered on the fly from the train prompt set
(tags sampled uniformly, then a prompt within the tag), 10% of prompts are dropped to "" for CFG,
t ~ logit-normal(0, 1), x_t = (1 - t) x0 + t eps, target eps - x0, AdamW with warm-up and cosine decay,
EMA of the weights with warm-up (the EMA is what is saved, as fp16 safetensors). Evaluates the EMA model on the
held-out prompts with the exact judge every --eval-every steps.

    python scripts/pretrain_shapes.py                                    # writes alignrl/shapes/pretrained
    python scripts/pretrain_shapes.py --steps 300 --out /tmp/shapes      # a quick smoke run
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

from alignrl.shapes.judge import check, per_tag_table  # noqa: E402
from alignrl.shapes.model import build_pipeline  # noqa: E402
from alignrl.shapes.world import TAGS, prompt_split, render_batch  # noqa: E402


def evaluate(pipe, unet, prompts, steps, guidance, seed, device, images_per_prompt=1):
    metas = [m for m in prompts for _ in range(images_per_prompt)]
    results = []
    g = torch.Generator().manual_seed(seed)
    saved = pipe.unet
    pipe.unet = unet
    try:
        for i in range(0, len(metas), 64):
            chunk = metas[i:i + 64]
            x = torch.randn((len(chunk), 3, 32, 32), generator=g).to(device)
            imgs = pipe([m["prompt"] for m in chunk], num_inference_steps=steps, guidance_scale=guidance, latents=x)
            arr = (imgs * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            results += [check(a, m) for a, m in zip(arr, chunk)]
    finally:
        pipe.unet = saved
    return per_tag_table(metas, results)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3300)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=600)
    p.add_argument("--eval-steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(REPO / "alignrl" / "shapes" / "pretrained"))
    args = p.parse_args()

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    pipe = build_pipeline(args.seed).to(device)
    unet, text = pipe.unet, pipe.text_encoder
    unet.train()
    text.train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    ema_text = copy.deepcopy(text).eval().requires_grad_(False)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    train = prompt_split("train")
    by_tag = {t: [m for m in train if m["tag"] == t] for t in TAGS}
    eval_prompts = prompt_split("eval")
    rng = random.Random(args.seed)
    log = []
    t_start = time.time()
    print(f"unet {sum(q.numel() for q in unet.parameters()) / 1e6:.2f}M, text {sum(q.numel() for q in text.parameters()) / 1e6:.2f}M; "
          f"{len(train)} train prompts, {len(eval_prompts)} eval prompts; {args.steps} steps", flush=True)
    for step in range(args.steps):
        metas = [rng.choice(by_tag[rng.choice(TAGS)]) for _ in range(args.batch)]
        x0 = torch.from_numpy(render_batch(metas, seed=args.seed * 1_000_003 + step)).permute(0, 3, 1, 2)
        x0 = (x0.float() / 127.5 - 1).to(device)
        prompts = ["" if rng.random() < args.dropout else m["prompt"] for m in metas]
        ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(device)
        t = torch.sigmoid(torch.randn(args.batch, device=device))  # logit-normal
        eps = torch.randn_like(x0)
        xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
        v = unet(xt, t * 1000, encoder_hidden_states=text(ids)[0]).sample
        loss = ((v - (eps - x0)) ** 2).mean()
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
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.4f} lr {lr_at(step):.2e} {time.time() - t_start:.0f}s", flush=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            pipe.text_encoder = ema_text
            table = evaluate(pipe, ema, eval_prompts, args.eval_steps, args.guidance, args.seed, device)
            pipe.text_encoder = text
            row = {"step": step + 1, "minutes": (time.time() - t_start) / 60,
                   **{k: round(v["strict"], 4) for k, v in table.items()}}
            log.append(row)
            print("eval", json.dumps(row), flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe.unet, pipe.text_encoder = ema, ema_text
    pipe.to(torch.float16)
    pipe.save_pretrained(str(out), safe_serialization=True)
    info = {"args": vars(args), "minutes": (time.time() - t_start) / 60, "eval": log,
            "note": "EMA weights, fp16; strict accuracy on the held-out eval prompts (1 image each, "
                    f"{args.eval_steps}-step ODE, CFG {args.guidance})"}
    (out / "training_info.json").write_text(json.dumps(info, indent=2))
    print(f"saved to {out} ({info['minutes']:.1f} min)", flush=True)


if __name__ == "__main__":
    main()
