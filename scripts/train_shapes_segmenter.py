#!/usr/bin/env python
"""Train the ShapeWorld segmenter behind ``shapes_seg`` (alignrl/shapes/segmenter.py) by distilling the exact judge.

Images: the shipped ShapeWorld model's own samples of fresh training compositions (half with the recipes' 8-step
ODE, half with the evaluation's 20 steps, guidance 3), and renders of the world (every tag, training and held-out
compositions, so every colour-shape pair) with a random blur, gain and noise. Labels: the judge's reading of each
image as given (:func:`alignrl.shapes.judge.label_map`). Training flips images and labels together (the judge
reads a mirrored image as the mirror of its reading). Validation: the model's samples of the evaluation prompts
(in_dist and held_out, none of which were trained on), where the script prints the pixel accuracy, the accuracy on
object pixels, and the Pearson correlation of ``shapes_seg`` and ``shapes_soft`` with the exact judge's partial
credit. Seeded: the same command gives the same weights on the same machine.

    python scripts/train_shapes_segmenter.py                       # writes alignrl/shapes/segmenter
    python scripts/train_shapes_segmenter.py --model-images 256 --renders 512 --steps 200 --out /tmp/seg
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from alignrl.rewards.jpeg import to_uint8  # noqa: E402
from alignrl.shapes import segmenter as seg  # noqa: E402
from alignrl.shapes.judge import label_map  # noqa: E402
from alignrl.shapes.world import eval_set, render_batch, sample_metadata  # noqa: E402


def model_samples(metas: list[dict], steps: int, guidance: float, seed: int, backbone=None) -> torch.Tensor:
    """(N, 3, 32, 32) samples of the shipped model (ODE), in [0, 1]."""
    from alignrl.sampling.engine import sample_images
    from alignrl.sampling.plans import ode_plan
    from alignrl.shapes.model import ShapesBackbone

    if not metas:
        return torch.zeros(0, 3, 32, 32)
    return sample_images(backbone or ShapesBackbone.pretrained(), ode_plan(steps, guidance),
                         [m["prompt"] for m in metas], range(len(metas)), seed, batch=128)


def blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A separable Gaussian blur per image (``sigma`` in pixels, 0: none)."""
    r = torch.arange(-2, 3, dtype=images.dtype)
    k = torch.exp(-r[None] ** 2 / (2 * sigma.clamp(min=1e-3)[:, None] ** 2))
    k = k / k.sum(dim=1, keepdim=True)  # (N, 5)
    n, c, h, w = images.shape
    x = images.reshape(1, n * c, h, w)
    kx = k.repeat_interleave(c, dim=0)
    x = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (2, 2, 0, 0), mode="replicate"),
                                   kx.view(n * c, 1, 1, 5), groups=n * c)
    x = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 0, 2, 2), mode="replicate"),
                                   kx.view(n * c, 1, 5, 1), groups=n * c)
    return x.reshape(n, c, h, w)


def renders(count: int, seed: int) -> torch.Tensor:
    """Renders of fresh compositions (a third held-out ones) with blur (sigma 0-0.9 px), gain 0.75-1.1 and noise
    (std 0-0.06), as a model draws them; in [0, 1]."""
    rng = random.Random(seed)
    metas = [sample_metadata(rng, held_out=rng.random() < 1 / 3) for _ in range(count)]
    x = torch.from_numpy(render_batch(metas, seed)).permute(0, 3, 1, 2).float() / 255
    g = torch.Generator().manual_seed(seed)
    sigma = torch.rand(count, generator=g) * 0.9
    x = torch.where((sigma > 0.15).view(-1, 1, 1, 1), blur(x, sigma), x)
    gain = 0.75 + 0.35 * torch.rand(count, 1, 1, 1, generator=g)
    noise = torch.randn(x.shape, generator=g) * (0.06 * torch.rand(count, 1, 1, 1, generator=g))
    return (x * gain + noise).clamp(0, 1)


def labels_of(images: torch.Tensor) -> torch.Tensor:
    """The judge's reading of each image, after the 8-bit rounding every reward sees."""
    return torch.from_numpy(np.stack([label_map(im) for im in to_uint8(images)]))


def quantised(images: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2).float() / 255


def evaluate(model: seg.Segmenter, images: torch.Tensor, labels: torch.Tensor) -> dict:
    with torch.no_grad():
        pred = torch.cat([model(images[i:i + 256]).argmax(dim=1) for i in range(0, len(images), 256)])
    obj = labels > 0
    return {"pixel_accuracy": float((pred == labels).float().mean()),
            "object_pixel_accuracy": float((pred[obj] == labels[obj]).float().mean()) if obj.any() else float("nan"),
            "false_object_pixels": float(((pred > 0) & ~obj).float().mean())}


def pearson(a, b) -> float:
    return float(np.corrcoef(a, b)[0, 1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-images", type=int, default=1536, help="samples of the shipped model to train on")
    p.add_argument("--renders", type=int, default=3072, help="blurred, noisy renders to train on")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-images", type=int, default=1, help="samples per evaluation prompt to validate on")
    p.add_argument("--val-per-tag", type=int, default=40, help="evaluation prompts per tag and split (40: all)")
    p.add_argument("--out", default=str(seg.default_dir()))
    args = p.parse_args(argv)
    command = shlex.join(["python", "scripts/train_shapes_segmenter.py", *(sys.argv[1:] if argv is None else argv)])
    torch.manual_seed(args.seed)
    load = os.getloadavg()
    print(f"# load before: {load[0]:.2f}; {torch.get_num_threads()} threads", flush=True)
    from alignrl.shapes.model import ShapesBackbone

    backbone = ShapesBackbone.pretrained()
    t0 = time.perf_counter()
    rng = random.Random(args.seed)
    half = args.model_images // 2
    train_metas = [sample_metadata(rng) for _ in range(args.model_images)]
    x_model = torch.cat([model_samples(train_metas[:half], 8, 3.0, args.seed, backbone),
                         model_samples(train_metas[half:], 20, 3.0, args.seed + 1, backbone)])
    x = quantised(torch.cat([x_model, renders(args.renders, args.seed)]))
    y = labels_of(x)
    val = [(split, m) for split in ("in_dist", "held_out")
           for m in eval_set(split, per_tag=args.val_per_tag) for _ in range(args.val_images)]
    val_split, val_metas = [s for s, _ in val], [m for _, m in val]
    x_val = quantised(model_samples(val_metas, 20, 3.0, args.seed + 2, backbone))
    y_val = labels_of(x_val)
    t_data = time.perf_counter() - t0
    counts = torch.bincount(y.flatten(), minlength=seg.NUM_CLASSES)
    print(f"data: {len(x_model)} model samples, {args.renders} renders, {len(x_val)} validation samples in "
          f"{t_data:.0f} s; object pixels per class: {counts[1:].tolist()}", flush=True)

    model = seg.Segmenter(args.width)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    g = torch.Generator().manual_seed(args.seed)
    t1 = time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = torch.randint(len(x), (args.batch,), generator=g)
        xb, yb = x[idx], y[idx]
        if torch.rand((), generator=g) < 0.5:
            xb, yb = xb.flip(-1), yb.flip(-1)
        if torch.rand((), generator=g) < 0.25:
            xb, yb = xb.flip(-2), yb.flip(-2)
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % max(1, args.steps // 10) == 0 or step == args.steps:
            done = time.perf_counter() - t1
            print(f"step {step}/{args.steps} loss {loss.item():.4f} | {done:.0f} s, ETA "
                  f"{done / step * (args.steps - step):.0f} s", flush=True)
    t_train = time.perf_counter() - t1
    model.eval()
    metrics = {"validation": evaluate(model, x_val, y_val), "train": evaluate(model, x[:2048], y[:2048])}
    print(f"validation (model samples of the eval prompts): {metrics['validation']}", flush=True)

    from alignrl.rewards.shapes import ShapesGenEval, ShapesSeg, ShapesSoft

    prompts = [m["prompt"] for m in val_metas]
    exact, _ = ShapesGenEval()(x_val, prompts, val_metas)
    soft = ShapesSoft().score_tensor(x_val, prompts, val_metas).numpy()
    with torch.no_grad():
        segr = ShapesSeg(model=model).score_tensor(x_val, prompts, val_metas).numpy()
    corr = {}
    for split in ("in_dist", "held_out"):
        idx = [i for i, s in enumerate(val_split) if s == split]
        corr[split] = {"shapes_seg": pearson(segr[idx], exact[idx]), "shapes_soft": pearson(soft[idx], exact[idx])}
    corr["all"] = {"shapes_seg": pearson(segr, exact), "shapes_soft": pearson(soft, exact)}
    metrics["pearson_with_judge_partial"] = corr
    print(f"Pearson r with the exact judge's partial credit on {len(val_metas)} validation samples: {corr}",
          flush=True)
    info = {"command": command, "seed": args.seed, "width": args.width, "steps": args.steps, "batch": args.batch,
            "lr": args.lr, "model_images": len(x_model), "renders": args.renders, "validation_images": len(x_val),
            "data_seconds": round(t_data, 1), "train_seconds": round(t_train, 1), "load_before": round(load[0], 2),
            "load_after": round(os.getloadavg()[0], 2), "threads": torch.get_num_threads(), "metrics": metrics}
    seg.save(model, Path(args.out), info)
    print(f"wrote {Path(args.out) / seg.WEIGHTS} ({sum(p.numel() for p in model.parameters())} parameters); "
          f"data {t_data:.0f} s, training {t_train:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
