"""Evaluation: ODE sampling on held-out prompts, reward means, an image grid and a Markdown summary.

Used by the trainer's eval hook (with the EMA weights) and by ``alignrl eval`` (a checkpoint or the
base model), so the evaluation a user runs is the one training logged. Noise is keyed by the prompt's
index, so every evaluation of a run sees the same starting latents.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from alignrl.data import PromptSet
from alignrl.eval.report import markdown_table, save_grid
from alignrl.sampling.engine import rollout, sample_generators
from alignrl.sampling.plans import RolloutPlan

EVAL_STREAM = 1_000_000_007  # noise stream for evaluation, distinct from every training iteration


@dataclass
class EvalResult:
    metrics: dict
    images: torch.Tensor | None  # this rank's images (for the grid), CPU
    captions: list[str]
    rewards: np.ndarray  # all ranks' rewards, in prompt order


class Evaluator:
    def __init__(self, backbone, plan: RolloutPlan, prompts: PromptSet, reward, *, seed: int,
                 batch_size: int, num_prompts: int | None = None, images_per_prompt: int = 1,
                 rank: int = 0, world_size: int = 1, gather=None, autocast=None, progress: bool = False):
        self.backbone, self.plan, self.reward = backbone, plan, reward
        n = len(prompts) if not num_prompts else min(int(num_prompts), len(prompts))
        self.prompts = prompts.prompts[:n]
        self.metadata = prompts.metadata[:n]
        self.seed, self.batch_size = seed, max(1, int(batch_size))
        self.images_per_prompt = max(1, int(images_per_prompt))
        self.rank, self.world = rank, world_size
        self.gather = gather  # callable(tensor) -> tensor concatenated over ranks (None: single process)
        self.autocast = autocast
        self.progress = progress

    def _my_slots(self) -> tuple[list[int], int]:
        total = len(self.prompts) * self.images_per_prompt
        per_rank = math.ceil(total / self.world)
        start = self.rank * per_rank
        return list(range(start, min(start + per_rank, total))), per_rank

    @torch.no_grad()
    def run(self, transformer=None) -> EvalResult:
        slots, per_rank = self._my_slots()
        scores, per_reward, images, captions = [], {}, [], []
        chunks = [slots[i:i + self.batch_size] for i in range(0, len(slots), self.batch_size)]
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(slots), desc="eval", unit="img", dynamic_ncols=True)
        for chunk in chunks:
            pidx = [s // self.images_per_prompt for s in chunk]
            prompts = [self.prompts[i] for i in pidx]
            meta = [self.metadata[i] for i in pidx]
            cond = self.backbone.encode_prompts(prompts)
            gens = sample_generators(self.seed, EVAL_STREAM, chunk, device=self.backbone.device)
            ctx = self.autocast() if self.autocast else torch.autocast("cpu", enabled=False)
            with ctx:
                out = rollout(self.backbone, self.plan, cond, gens, transformer=transformer, record=False)
            imgs = self.backbone.decode(out.final).cpu()
            s, info = self.reward(imgs, prompts, meta)
            scores.append(np.asarray(s, dtype=np.float64))
            for name, arr in info.get("per_reward", {}).items():
                per_reward.setdefault(name, []).append(np.asarray(arr, dtype=np.float64))
            images.append(imgs)
            captions += [f"{v:.3g} {p}" for p, v in zip(prompts, s)]  # score first: cells are narrow
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
        mine = np.concatenate(scores) if scores else np.zeros(0)
        rewards = self._gather(mine, per_rank)
        metrics = _summary("eval/reward", rewards)
        for name in getattr(self.reward, "rewards", {}):  # every rank gathers every reward, even with no images
            mine_r = np.concatenate(per_reward[name]) if name in per_reward else np.zeros(0)
            metrics.update(_summary(f"eval/{name}", self._gather(mine_r, per_rank)))
        metrics["eval/num_images"] = int(rewards.size)
        return EvalResult(metrics, torch.cat(images) if images else None, captions, rewards)

    def _gather(self, values: np.ndarray, per_rank: int) -> np.ndarray:
        if self.gather is None or self.world == 1:
            return values
        padded = np.full(per_rank, np.nan)
        padded[: values.size] = values
        valid = np.zeros(per_rank)
        valid[: values.size] = 1
        both = torch.from_numpy(np.stack([padded, valid], axis=1))
        out = self.gather(both.to(self.backbone.device)).cpu().numpy()
        return out[out[:, 1] > 0, 0]


def _summary(prefix: str, values: np.ndarray) -> dict:
    finite = values[np.isfinite(values)]
    return {f"{prefix}_mean": float(finite.mean()) if finite.size else float("nan"),
            f"{prefix}_std": float(finite.std()) if finite.size else float("nan")}


def write_report(out_dir: Path, result: EvalResult, title: str, details: dict, grid_size: int = 16) -> dict:
    """Write metrics.json, grid.png and summary.md into ``out_dir``; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps({**result.metrics, **details}, indent=2))
    paths = {"metrics": out_dir / "metrics.json"}
    if result.images is not None and len(result.images):
        k = min(grid_size, len(result.images))
        paths["grid"] = save_grid(out_dir / "grid.png", result.images[:k], result.captions[:k])
    rows = [{"metric": k, "value": v} for k, v in result.metrics.items()]
    lines = [f"# {title}", "", markdown_table(rows, ["metric", "value"]), ""]
    lines += [f"- {k}: {v}" for k, v in details.items()]
    if "grid" in paths:
        lines += ["", "![samples](grid.png)"]
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")
    paths["summary"] = out_dir / "summary.md"
    return paths
