"""The loop's evaluation hook: every eval set sampled with the EMA weights at the eval points, its grids and
metrics written into the run, and the run's headline ``before -> after`` lines at the end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from alignrl.data import eval_prefix
from alignrl.eval.evaluate import Evaluator, bootstrap_gain
from alignrl.eval.report import save_grid


class EvalHook:
    def __init__(self, eval_sets: dict, *, backbone, plan, reward, seed: int, ecfg: dict, default_batch: int,
                 rank: int, world: int, gather: Callable, autocast: Callable, policy, run_dir: Path, is_main: bool):
        self.evaluators = {name: Evaluator(
            backbone, plan, prompts, reward, seed=seed, batch_size=int(ecfg.get("batch_size", default_batch)),
            num_prompts=ecfg.get("num_prompts"), images_per_prompt=int(ecfg.get("images_per_prompt", 1)),
            rank=rank, world_size=world, gather=gather, autocast=autocast, prefix=eval_prefix(name),
        ) for name, prompts in eval_sets.items()}  # none without data.eval
        self.policy = policy
        self.run_dir = Path(run_dir)
        self.is_main = is_main
        self.grids: dict[str, Path] = {}  # the last evaluation's grids, by set
        self._evals: list = []  # (step, metrics, results by prefix) of the first and the latest evaluation

    def __bool__(self) -> bool:
        return bool(self.evaluators)

    def evaluate(self, step: int) -> dict:
        """Every eval set with the EMA weights; grids ``eval/step_N[_<set>].png`` (kept in ``grids``) and the
        metrics ``eval/step_N.json``."""
        self.policy.denoiser.eval()
        metrics, self.grids = {}, {}
        with self.policy.ema_weights():
            results = {name: evaluator.run() for name, evaluator in self.evaluators.items()}
        for name, result in results.items():
            metrics.update(result.metrics)
            if self.is_main and result.images is not None:
                k = min(16, len(result.images))
                path = self.run_dir / "eval" / (f"step_{step:06d}" + (f"_{name}" if name else "") + ".png")
                self.grids["eval" + (f"_{name}" if name else "")] = path
                save_grid(path, result.images[:k], result.captions[:k])
                if result.images.ndim == 5:  # a video backbone: the first clip as MP4 too (wandb logs it)
                    from alignrl.eval.video import write_mp4

                    self.grids["eval_video" + (f"_{name}" if name else "")] = write_mp4(path.with_suffix(".mp4"),
                                                                                       result.images[0])
        if self.is_main and results:
            (self.run_dir / "eval").mkdir(parents=True, exist_ok=True)
            (self.run_dir / "eval" / f"step_{step:06d}.json").write_text(json.dumps(metrics, indent=2))
        by_prefix = {eval_prefix(name): r for name, r in results.items()}
        self._evals = [*self._evals[:1], (step, metrics, by_prefix)]
        return metrics

    def summary_lines(self) -> list[str]:
        """The headline eval numbers of the first and last evaluation: ``before -> after (+gain)``."""
        if len(self._evals) < 2:
            return []
        (s0, first, first_res), (s1, last, last_res) = self._evals[0], self._evals[-1]
        keys = [k for k in last if k.endswith(("/images/strict", "/tag/overall/strict")) or k == "eval/reward_mean"]
        lines = []
        for k in keys or [k for k in last if k.endswith("reward_mean")]:
            if k in first and isinstance(first[k], float) and isinstance(last[k], float):
                ci = [last.get(k + "_ci_lo"), last.get(k + "_ci_hi")]
                band = f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if None not in ci else ""
                lines.append(f"alignrl: {k}: {first[k]:.3f} at step {s0} -> {last[k]:.3f} at step {s1} "
                             f"({last[k] - first[k]:+.3f}){band}{self._gain_band(k, first_res, last_res)}")
        return lines

    @staticmethod
    def _gain_band(key: str, first: dict, last: dict) -> str:
        """For an image-weighted verdict (``.../images/strict``): the paired 95% interval of the gain, the same
        images before and after resampled by prompt (the eval's noise on the difference)."""
        if "/images/" not in key:
            return ""
        prefix, name = key.split("/images/")
        a, b = first.get(prefix), last.get(prefix)
        if a is None or b is None or name not in a.verdicts or name not in b.verdicts or a.groups != b.groups:
            return ""
        _, lo, hi = bootstrap_gain(a.verdicts[name], b.verdicts[name], a.groups)
        return f"; gain 95% CI {lo:+.3f} to {hi:+.3f} (paired over prompts)"
