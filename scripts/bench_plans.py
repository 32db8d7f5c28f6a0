#!/usr/bin/env python
"""Rollout plans side by side: denoiser evaluations per image, rollout and update time per iteration.

Every plan runs on the same tiny model and prompts in one process, one after another, with warm-up
iterations discarded; times are means over the measured iterations and are printed as ratios to full
Flow-GRPO measured in the same run. Writes a table into docs/benchmarks.md (between the bench_plans
markers) unless --no-doc.

    python scripts/bench_plans.py                      # tiny SD3, 2 warm-up + 4 measured iterations
    python scripts/bench_plans.py --iterations 8 trainer.device=cuda backbone.resolution=128
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BEGIN, END = "<!-- bench_plans:begin -->", "<!-- bench_plans:end -->"
RECIPES = ["tiny_flowgrpo", "tiny_flowgrpo_fast", "tiny_mixgrpo", "tiny_mixgrpo_flash", "tiny_dancegrpo",
           "tiny_grpo_guard", "tiny_branchgrpo", "tiny_tempflow", "tiny_g2rpo", "tiny_awm", "tiny_nft"]


def measure(recipe: str, warmup: int, iterations: int, overrides: list[str]) -> dict:
    import numpy as np
    import torch
    from accelerate.state import AcceleratorState

    from alignrl.config import compose
    from alignrl.training.trainer import Trainer

    AcceleratorState._reset_state()
    run_dir = tempfile.mkdtemp(prefix=f"bench_plans_{recipe}_")
    cfg = compose([f"recipe={recipe}", f"run_dir={run_dir}", "logger.progress_bar=false", "trainer.eval_every=0",
                   "trainer.checkpoint_every=0", "trainer.log_images_every=0",
                   f"trainer.max_steps={warmup + iterations}", *overrides])
    trainer = Trainer(cfg, Path(run_dir))
    rows = []
    try:
        for i in range(warmup + iterations):
            trainer.timing = {}
            metrics = trainer.run_iteration()
            trainer.iteration += 1
            if i >= warmup:
                rows.append(metrics)
        batch = trainer._last_batch
        plan = batch.plan
        roots = len(batch.prompts)
        images = len(batch.leaf_root)
        cfg_factor = 2 if trainer.backbone.uses_cfg and plan.guidance_scale > 1 else 1
        evals = plan.model_evals(roots, cfg_factor)
        trained = len(batch.t_from) if not getattr(trainer.algorithm, "needs_final_latents", False) else \
            images * int(trainer.algorithm.num_train_timesteps)
    finally:
        trainer.reward_runner.close()
    mean = lambda k: float(np.mean([r[k] for r in rows]))  # noqa: E731
    del torch
    return {"recipe": recipe, "plan": plan.name, "images": images, "evals_per_image": evals / images,
            "trained_per_image": trained / images, "rollout_s": mean("time/rollout"),
            "reward_s": mean("time/reward_wait"), "update_s": mean("time/update"), "iteration_s": mean("time/iteration")}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=RECIPES)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iterations", type=int, default=4)
    p.add_argument("--doc", default=str(REPO / "docs" / "benchmarks.md"))
    p.add_argument("--no-doc", action="store_true")
    p.add_argument("overrides", nargs="*", help="Hydra overrides applied to every recipe")
    args = p.parse_args()
    import torch

    from alignrl.eval.report import markdown_table, write_doc_section

    results = []
    for recipe in args.recipes:
        t0 = time.time()
        results.append(measure(recipe, args.warmup, args.iterations, args.overrides))
        print(f"[bench_plans] {recipe}: {time.time() - t0:.1f} s", flush=True)
    base = next((r for r in results if r["recipe"] == "tiny_flowgrpo"), results[0])
    rows = []
    for r in results:
        rows.append({
            "recipe": r["recipe"], "plan": r["plan"], "images/it": r["images"],
            "evals/image": round(r["evals_per_image"], 2),
            "evals/image vs full": round(r["evals_per_image"] / base["evals_per_image"], 2),
            "trained transitions/image": round(r["trained_per_image"], 2),
            "rollout s/it": round(r["rollout_s"], 3), "rollout/image vs full":
                round((r["rollout_s"] / r["images"]) / (base["rollout_s"] / base["images"]), 2),
            "update s/it": round(r["update_s"], 3), "update/image vs full":
                round((r["update_s"] / r["images"]) / (base["update_s"] / base["images"]), 2),
        })
    table = markdown_table(rows, list(rows[0].keys()))
    device = "CUDA " + torch.cuda.get_device_name() if torch.cuda.is_available() and \
        any("cuda" in o for o in args.overrides) else f"CPU ({torch.get_num_threads()} threads)"
    section = "\n".join([
        BEGIN, "",
        f"Measured {time.strftime('%Y-%m-%d')} on {device}, tiny SD3 (JPEG compressibility), {args.warmup} warm-up "
        f"+ {args.iterations} measured iterations per recipe, one process; overrides: {' '.join(args.overrides) or 'none'}. "
        "Ratios are per image against full Flow-GRPO (tiny_flowgrpo) in the same run; evaluations count "
        "denoiser rows (x2 with CFG).", "", table, "", END])
    print(section)
    if not args.no_doc:
        write_doc_section(Path(args.doc), BEGIN, END, "Rollout plans (`scripts/bench_plans.py`)", section)


if __name__ == "__main__":
    main()
