#!/usr/bin/env python
"""ShapeWorld arena: several recipes, the same training wall-clock budget, the same machine.

Each recipe trains for --minutes of training time (evaluation excluded) and is evaluated on the held-out
ShapeWorld prompts (20-step ODE, EMA weights, exact judge) at the start and every --eval-every minutes.
Writes a plot (strict accuracy against training seconds, one line per recipe) and a table into
docs/benchmarks.md (between the bench_shapes markers), plus the per-iteration time split.

    python scripts/bench_shapes.py --recipes shapes_flowgrpo --minutes 30 --eval-every 5
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from alignrl.eval.report import line_plot, markdown_table, write_doc_section  # noqa: E402

BEGIN, END = "<!-- bench_shapes:begin -->", "<!-- bench_shapes:end -->"


def run_recipe(recipe: str, minutes: float, eval_every: float, out: Path, extra: list[str],
               reuse: bool = False) -> list[dict]:
    run_dir = out / recipe
    if reuse and (run_dir / "metrics.jsonl").exists():
        print(f"[bench_shapes] {recipe}: reusing {run_dir}", flush=True)
        return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    cmd = [sys.executable, "-m", "alignrl.cli", "train", f"recipe={recipe}", f"run_dir={run_dir}",
           f"trainer.max_minutes={minutes}", f"trainer.eval_every_minutes={eval_every}",
           "trainer.eval_at_start=true", "trainer.max_steps=1000000", "trainer.eval_every=0",
           "trainer.checkpoint_every=0", "trainer.log_images_every=0", "logger.progress_bar=false", *extra]
    t0 = time.time()
    print(f"[bench_shapes] {recipe}: {' '.join(cmd[3:])}", flush=True)
    subprocess.run(cmd, check=True)
    print(f"[bench_shapes] {recipe}: done in {(time.time() - t0) / 60:.1f} min wall-clock", flush=True)
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _eval_images_per_prompt(run_dir: Path) -> int:
    import yaml

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    return int((cfg.get("eval") or {}).get("images_per_prompt", 1))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=["shapes_flowgrpo"])
    p.add_argument("--minutes", type=float, default=30)
    p.add_argument("--eval-every", type=float, default=5)
    p.add_argument("--out", default=str(REPO / "outputs" / "bench_shapes"))
    p.add_argument("--doc", default=str(REPO / "docs" / "benchmarks.md"))
    p.add_argument("--plot", default=str(REPO / "docs" / "shapes_bench.png"))
    p.add_argument("--reuse", action="store_true",
                   help="re-read runs already in --out instead of training again (to rewrite the report)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides applied to every recipe")
    args = p.parse_args()

    out = Path(args.out)
    series, rows, splits = {}, [], []
    for recipe in args.recipes:
        metrics = run_recipe(recipe, args.minutes, args.eval_every, out, args.overrides, args.reuse)
        images_per_prompt = _eval_images_per_prompt(out / recipe)
        evals = list({m["step"]: m for m in metrics if "eval/tag/overall/strict" in m}.values())  # one per step
        series[recipe] = [(m["train_seconds"], m["eval/tag/overall/strict"]) for m in evals]
        for m in evals:
            rows.append({"recipe": recipe, "train min": round(m["train_seconds"] / 60, 1), "iteration": m["step"],
                         "strict": m["eval/tag/overall/strict"], "partial": m["eval/tag/overall/partial"],
                         **{t: m.get(f"eval/tag/{t}/strict", float("nan"))
                            for t in ("counting", "position", "color_attr")}})
        its = [m for m in metrics if "time/iteration" in m]
        if its:
            mean = lambda k: sum(m[k] for m in its) / len(its)  # noqa: E731
            splits.append({"recipe": recipe, "iterations": len(its), "rollout s": mean("time/rollout"),
                           "reward wait s": mean("time/reward_wait"), "update s": mean("time/update"),
                           "iteration s": mean("time/iteration")})
    line_plot(series, Path(args.plot), "training seconds (2 CPU cores unless noted)", "held-out strict",
              title="ShapeWorld", y_range=(0.0, 1.0))
    section = [BEGIN, "", f"Budget {args.minutes} training minutes per recipe, eval every {args.eval_every} minutes "
               f"(held-out prompts, {images_per_prompt} image(s) each, 20-step ODE, EMA weights). Measured "
               f"{time.strftime('%Y-%m-%d')}; extra overrides: {' '.join(args.overrides) or 'none'}.", "",
               f"![ShapeWorld: strict accuracy against training time]({Path(args.plot).name})", "",
               markdown_table(rows, list(rows[0].keys())) if rows else "(no evaluations)", "",
               "Per-iteration time split (means):", "",
               markdown_table(splits, list(splits[0].keys())) if splits else "", "", END]
    write_doc_section(Path(args.doc), BEGIN, END, "ShapeWorld arena (`scripts/bench_shapes.py`)", "\n".join(section))
    print("\n".join(section))


if __name__ == "__main__":
    main()
