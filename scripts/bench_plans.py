#!/usr/bin/env python
"""Rollout plans side by side: denoiser evaluations per image, rollout and update time per iteration.

Every plan runs on the same tiny model, at one backbone resolution and with the same number of images per
iteration (``data.groups_per_iteration`` is set per recipe from its group size and its plan's leaves per
root; each iteration is one rollout batch and one minibatch per update). All trainers are built first and
warmed up, then measured round-robin: each round runs every plan for ``--iterations`` iterations, the order
rotating from round to round, so machine-load drift hits every plan alike. Ratios to full Flow-GRPO are taken
within each round (the plans ran seconds apart) and the median over the rounds is printed, with its range.
The load average (os.getloadavg) is printed at start and end. Writes a table into docs/benchmarks.md (between
the bench_plans markers) unless --no-doc.

    python scripts/bench_plans.py                              # 32 px, 32 images/it, 1 warm-up, 4 rounds
    python scripts/bench_plans.py --rounds 8 --resolution 64 trainer.device=cuda
    python scripts/bench_plans.py --recipes tiny_flowgrpo tiny_mixgrpo --rounds 2 --no-doc   # a quick look
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BEGIN, END = "<!-- bench_plans:begin -->", "<!-- bench_plans:end -->"
BASE = "tiny_flowgrpo"
RECIPES = [BASE, "tiny_flowgrpo_fast", "tiny_mixgrpo", "tiny_mixgrpo_flash", "tiny_dancegrpo",
           "tiny_grpo_guard", "tiny_branchgrpo", "tiny_tempflow", "tiny_g2rpo", "tiny_awm", "tiny_nft"]


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f} (1/5/15 min, {os.cpu_count()} CPUs)"


def common_overrides(recipe: str, images: int, resolution: int, overrides: list[str]) -> list[str]:
    """The overrides that give ``recipe`` ``images`` images per iteration at ``resolution`` px."""
    import torch

    from alignrl.components import build_planner
    from alignrl.config import compose
    from alignrl.errors import ConfigError

    fixed = [f"backbone.resolution={resolution}"]
    cfg = compose([f"recipe={recipe}", *overrides, *fixed])
    planner = build_planner(cfg)
    gen = torch.Generator().manual_seed(0)
    planner.begin_iteration(0, gen)
    leaves = planner.plan(gen).leaves_per_root
    group_size, updates = int(cfg.algorithm.group_size), int(cfg.trainer.updates_per_iteration)
    per_group = group_size * leaves
    if images % per_group:
        raise ConfigError(f"{recipe}: one prompt group gives {group_size} x {leaves} = {per_group} images, which "
                          f"does not divide --images {images}; pick a multiple of {per_group}")
    groups = images // per_group
    roots = groups * group_size  # trajectories started per iteration (what the batch sizes count)
    if roots % updates:
        raise ConfigError(f"{recipe}: {roots} trajectories per iteration do not split into "
                          f"trainer.updates_per_iteration={updates} updates; change --images")
    return [*fixed, f"data.groups_per_iteration={groups}", f"trainer.rollout_batch_size={roots}",
            f"trainer.train_batch_size={roots // updates}"]


class PlanRun:
    """One recipe's trainer, kept alive between rounds."""

    def __init__(self, recipe: str, overrides: list[str], total_iterations: int):
        from accelerate.state import AcceleratorState

        from alignrl.config import compose
        from alignrl.training.trainer import Trainer

        AcceleratorState._reset_state()
        self.recipe = recipe
        self.run_dir = tempfile.mkdtemp(prefix=f"bench_plans_{recipe}_")
        cfg = compose([f"recipe={recipe}", f"run_dir={self.run_dir}", "logger.progress_bar=false",
                       "trainer.eval_every=0", "trainer.checkpoint_every=0", "trainer.log_images_every=0",
                       f"trainer.max_steps={total_iterations}", *overrides])
        self.trainer = Trainer(cfg, Path(self.run_dir))
        self.rounds: list[dict] = []  # mean seconds per iteration of each round

    def iterate(self, n: int) -> list[dict]:
        rows = []
        for _ in range(n):
            self.trainer.timing = {}
            rows.append(self.trainer.run_iteration())
            self.trainer.iteration += 1
        return rows

    def measure_round(self, n: int) -> None:
        rows = self.iterate(n)
        self.rounds.append({k: statistics.fmean(r[f"time/{k}"] for r in rows)
                            for k in ("rollout", "reward_wait", "update", "iteration")})

    def shape(self) -> dict:
        """Images, denoiser evaluations and trained transitions per iteration, from the last batch."""
        trainer, batch = self.trainer, self.trainer._last_batch
        plan, roots, images = batch.plan, len(batch.prompts), len(batch.leaf_root)
        cfg_factor = 2 if trainer.backbone.uses_cfg and plan.guidance_scale > 1 else 1
        trained = images * int(trainer.algorithm.num_train_timesteps) \
            if getattr(trainer.algorithm, "needs_final_latents", False) else len(batch.t_from)
        return {"plan": plan.name, "images": images, "evals_per_image": plan.model_evals(roots, cfg_factor) / images,
                "trained_per_image": trained / images}

    def close(self) -> None:
        self.trainer.reward_runner.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)  # a scratch run: metrics and status only


def ratio_text(values: list[float]) -> str:
    med = statistics.median(values)
    return f"{med:.2f}" if len(values) == 1 else f"{med:.2f} ({min(values):.2f}-{max(values):.2f})"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=RECIPES, help=f"the first is the base of the ratios ({BASE})")
    p.add_argument("--resolution", type=int, default=32, help="backbone resolution of every plan (px)")
    p.add_argument("--images", type=int, default=32, help="images per iteration of every plan")
    p.add_argument("--warmup", type=int, default=1, help="iterations per plan before the rounds (not measured)")
    p.add_argument("--rounds", type=int, default=4, help="round-robin rounds over the plans")
    p.add_argument("--iterations", type=int, default=1, help="iterations per plan in each round")
    p.add_argument("--doc", default=str(REPO / "docs" / "benchmarks.md"))
    p.add_argument("--no-doc", action="store_true")
    p.add_argument("overrides", nargs="*", help="Hydra overrides applied to every recipe")
    args = p.parse_args()
    if args.rounds < 1 or args.iterations < 1 or args.warmup < 0:
        p.error("--rounds and --iterations must be >= 1, --warmup >= 0")
    import torch

    from alignrl.errors import ConfigError
    from alignrl.eval.report import markdown_table, write_doc_section

    load_start, t_start = load(), time.time()
    print(f"[bench_plans] load at start: {load_start}", flush=True)
    total = args.warmup + args.rounds * args.iterations
    runs = []
    try:
        sizes = {}
        for recipe in args.recipes:  # every plan's sizes are checked before any model is built
            try:
                sizes[recipe] = common_overrides(recipe, args.images, args.resolution, args.overrides)
            except ConfigError as e:
                p.error(str(e))
        for recipe in args.recipes:
            t0 = time.time()
            run = PlanRun(recipe, [*args.overrides, *sizes[recipe]], total)
            runs.append(run)
            run.iterate(args.warmup)
            print(f"[bench_plans] {recipe}: built and warmed up in {time.time() - t0:.1f} s", flush=True)
        for r in range(args.rounds):
            k = r % len(runs)
            for run in runs[k:] + runs[:k]:  # rotate the order: no plan always runs first or last
                run.measure_round(args.iterations)
            print(f"[bench_plans] round {r + 1}/{args.rounds} done ({time.time() - t_start:.0f} s, "
                  f"load {os.getloadavg()[0]:.2f})", flush=True)
        shapes = [run.shape() for run in runs]
    finally:
        for run in runs:
            run.close()
    load_end = load()
    print(f"[bench_plans] load at end: {load_end}", flush=True)

    base, base_shape = runs[0], shapes[0]
    rows = []
    for run, shape in zip(runs, shapes):
        per_round = lambda key: [a[key] / b[key] for a, b in zip(run.rounds, base.rounds)]  # noqa: E731
        mean = lambda key: statistics.fmean(x[key] for x in run.rounds)  # noqa: E731
        rows.append({
            "recipe": run.recipe, "plan": shape["plan"], "images/it": shape["images"],
            "evals/image": round(shape["evals_per_image"], 2),
            "evals/image vs base": round(shape["evals_per_image"] / base_shape["evals_per_image"], 2),
            "trained transitions/image": round(shape["trained_per_image"], 2),
            "rollout s/it": round(mean("rollout"), 3), "rollout vs base": ratio_text(per_round("rollout")),
            "update s/it": round(mean("update"), 3), "update vs base": ratio_text(per_round("update")),
        })
    table = markdown_table(rows, list(rows[0].keys()))
    device = "CUDA " + torch.cuda.get_device_name() if torch.cuda.is_available() and \
        any("cuda" in o for o in args.overrides) else f"CPU ({torch.get_num_threads()} threads)"
    section = "\n".join([
        BEGIN, "",
        f"Measured {time.strftime('%Y-%m-%d')} on {device}, tiny SD3 (JPEG compressibility), every plan at "
        f"{args.resolution} px with {args.images} images per iteration (one rollout batch; one minibatch per "
        f"update), one process. {args.warmup} warm-up iteration(s) per plan, then {args.rounds} round-robin "
        f"round(s) of {args.iterations} iteration(s) per plan (order rotated each round); overrides: "
        f"{' '.join(args.overrides) or 'none'}. Load average at start {load_start}, at end {load_end}. "
        f"Times are means over the rounds; 'vs base' is the median over the rounds of the time ratio to "
        f"{base.recipe} in the same round (range in brackets). Evaluations count denoiser rows (x2 with CFG).",
        "", table, "", END])
    print(section)
    if not args.no_doc:
        write_doc_section(Path(args.doc), BEGIN, END, "Rollout plans (`scripts/bench_plans.py`)", section)


if __name__ == "__main__":
    main()
