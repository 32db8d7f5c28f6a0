#!/usr/bin/env python
"""How well the judge's differentiable surrogates (``shapes_soft``: colour masks; ``shapes_seg``: the segmenter
distilled from the judge) track the exact judge on the model's own samples: the shipped ShapeWorld model samples
each eval prompt (20-step ODE, guidance 3, the arena's setting), the rewards score every image against its prompt,
and the Pearson and Spearman correlations of each surrogate with the exact partial credit are printed, overall and
per tag.

    python scripts/check_shapes_soft.py --split held_out --images 2
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from alignrl.rewards.shapes import ShapesGenEval, ShapesSeg, ShapesSoft  # noqa: E402
from alignrl.sampling.engine import sample_images  # noqa: E402
from alignrl.sampling.plans import ode_plan  # noqa: E402
from alignrl.shapes.model import ShapesBackbone  # noqa: E402
from alignrl.shapes.world import TAGS, eval_set  # noqa: E402


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--split", default="held_out", choices=["held_out", "in_dist"])
    p.add_argument("--images", type=int, default=2, help="images per prompt")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(f"# load before: {os.getloadavg()}", flush=True)
    backbone = ShapesBackbone.pretrained()
    plan = ode_plan(args.steps, args.guidance)
    metas = [m for m in eval_set(args.split) for _ in range(args.images)]
    prompts = [m["prompt"] for m in metas]
    images = sample_images(backbone, plan, prompts, range(len(metas)), args.seed, batch=64)
    exact, _ = ShapesGenEval()(images, prompts, metas)
    print(f"{len(metas)} images of the shipped model ({args.split}, {args.images} per prompt, {args.steps}-step ODE, "
          f"guidance {args.guidance}); mean exact partial {exact.mean():.3f}")
    for name, reward in (("shapes_soft", ShapesSoft()), ("shapes_seg", ShapesSeg())):
        score, _ = reward(images, prompts, metas)
        print(f"{name}: Pearson {np.corrcoef(score, exact)[0, 1]:.3f}, Spearman {spearman(score, exact):.3f}; "
              f"mean {score.mean():.3f}")
        for tag in TAGS:
            idx = [i for i, m in enumerate(metas) if m["tag"] == tag]
            if len(idx) > 2 and np.std(exact[idx]) > 0 and np.std(score[idx]) > 0:
                print(f"  {tag:14s} n={len(idx):3d}  Pearson {np.corrcoef(score[idx], exact[idx])[0, 1]:.3f}")
            else:
                print(f"  {tag:14s} n={len(idx):3d}  (constant: no correlation)")
    print(f"# load after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
