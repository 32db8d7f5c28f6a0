"""Evaluation: ODE sampling on held-out prompts, reward means, an image grid and a Markdown summary.

Used by the trainer's eval hook (with the EMA weights) and by ``alignrl eval`` (a checkpoint or the
base model), so the evaluation a user runs is the one training logged. Noise is keyed by the prompt's
index, so every evaluation of a run sees the same starting latents.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from alignrl.data import PromptSet
from alignrl.eval.report import markdown_table, save_grid
from alignrl.sampling.engine import rollout, sample_generators
from alignrl.sampling.plans import RolloutPlan

EVAL_STREAM = 1_000_000_007  # noise stream for evaluation, distinct from every training iteration


def spread_subset(metadata: list[dict], n: int | None) -> list[int]:
    """Indices of ``n`` prompts (all when ``n`` is falsy or too large) spread over the whole set: round-robin over
    the tags when the rows carry a ``tag`` (eval files list their tags in blocks, so the first ``n`` rows would
    cover only the first tags), evenly spaced otherwise. In file order."""
    total = len(metadata)
    if not n or int(n) >= total:
        return list(range(total))
    n = max(1, int(n))  # a negative count keeps one prompt
    tags: dict = {}
    for i, m in enumerate(metadata):
        tags.setdefault((m or {}).get("tag"), []).append(i)
    if len(tags) > 1:
        queues, chosen = [list(v) for v in tags.values()], []
        while len(chosen) < n:
            for q in queues:
                if q and len(chosen) < n:
                    chosen.append(q.pop(0))
        return sorted(chosen)
    return sorted({int(round(k * (total - 1) / max(1, n - 1))) for k in range(n)}) if n > 1 else [0]


@dataclass
class EvalResult:
    metrics: dict
    images: torch.Tensor | None  # this rank's images (for the grid), CPU
    captions: list[str]
    rewards: np.ndarray  # all ranks' rewards, in prompt order
    table: dict = field(default_factory=dict)  # per-tag rows (when the prompts carry a "tag")
    verdicts: dict = field(default_factory=dict)  # name ("strict", "partial", ...) -> per-image values, all ranks
    groups: list = field(default_factory=list)  # the prompt of each image (the bootstrap's resampling unit)


class Evaluator:
    def __init__(self, backbone, plan: RolloutPlan, prompts: PromptSet, reward, *, seed: int,
                 batch_size: int, num_prompts: int | None = None, images_per_prompt: int = 1,
                 rank: int = 0, world_size: int = 1, gather=None, autocast=None, progress: bool = False,
                 prefix: str = "eval"):
        self.backbone, self.plan, self.reward = backbone, plan, reward
        self.prefix = prefix  # metrics are named <prefix>/...: eval/..., or eval/<set>/... for a named eval set
        keep = spread_subset(prompts.metadata, num_prompts)
        self.prompts = [prompts.prompts[i] for i in keep]
        self.metadata = [prompts.metadata[i] for i in keep]
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
        extra_keys = list(getattr(self.reward, "per_sample_keys", []))
        columns: dict[str, list] = {"reward": [], **{k: [] for k in extra_keys}}
        per_reward: dict[str, list] = {}
        images, captions = [], []
        chunks = [slots[i:i + self.batch_size] for i in range(0, len(slots), self.batch_size)]
        bar = None
        if self.progress:
            from alignrl.training.logging import console_progress

            bar = console_progress(len(slots), "eval", "img")
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
            columns["reward"].append(np.asarray(s, dtype=np.float64))
            for k in extra_keys:
                columns[k].append(np.asarray(info["per_sample"][k], dtype=np.float64))
            for name, arr in info.get("per_reward", {}).items():
                per_reward.setdefault(name, []).append(np.asarray(arr, dtype=np.float64))
            images.append(imgs)
            verdicts = info.get("per_sample", {})
            strict = next((v for k, v in verdicts.items() if k.endswith("/strict")), None)
            for j, (p, v) in enumerate(zip(prompts, s)):  # score (and verdict) first: cells are narrow
                mark = ("PASS " if strict[j] else "FAIL ") if strict is not None else ""
                captions.append(f"{mark}{v:.3g} {p}")
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
        gathered = {k: self._gather(np.concatenate(v) if v else np.zeros(0), per_rank) for k, v in columns.items()}
        rewards = gathered["reward"]
        pre = self.prefix
        metrics = _summary(f"{pre}/reward", rewards)
        for name in getattr(self.reward, "rewards", {}):  # every rank gathers every reward, even with no images
            mine_r = np.concatenate(per_reward[name]) if name in per_reward else np.zeros(0)
            metrics.update(_summary(f"{pre}/{name}", self._gather(mine_r, per_rank)))
        for k in extra_keys:
            metrics[f"{pre}/{k}_mean"] = float(np.nanmean(gathered[k])) if gathered[k].size else float("nan")
        metrics[f"{pre}/num_images"] = int(rewards.size)
        table = self._tag_table(gathered)
        for tag, row in table.items():
            for k, v in row.items():
                if k != "n":
                    metrics[f"{pre}/tag/{tag}/{k}"] = v
        verdicts, prompt_of = {}, []
        if table:  # image-weighted verdicts with a bootstrap interval over prompts (a tag mean weighs tags alike)
            prompt_of = [self.prompts[s // self.images_per_prompt] for s in range(rewards.size)]
            metrics[f"{pre}/num_prompts"] = len(set(prompt_of))
            for k in [k for k in gathered if k != "reward"] or ["reward"]:
                name = k.split("/")[-1]
                verdicts[name] = gathered[k]
                mean, lo, hi = bootstrap_mean(gathered[k], prompt_of)
                metrics.update({f"{pre}/images/{name}": mean, f"{pre}/images/{name}_ci_lo": lo,
                                f"{pre}/images/{name}_ci_hi": hi})
        return EvalResult(metrics, torch.cat(images) if images else None, captions, rewards, table, verdicts,
                          prompt_of)

    def _tag_table(self, gathered: dict[str, np.ndarray]) -> dict:
        """Per-tag means (prompt metadata ``tag``, as GenEval's) and ``overall`` = the mean over tags."""
        n = gathered["reward"].size
        tags = [self.metadata[s // self.images_per_prompt].get("tag") for s in range(n)]
        if n == 0 or not any(tags):
            return {}
        table = {}
        for tag in dict.fromkeys(t for t in tags if t):
            sel = np.array([t == tag for t in tags])
            table[tag] = {k.split("/")[-1] if k != "reward" else "reward": float(np.nanmean(v[sel]))
                          for k, v in gathered.items()}
            table[tag]["n"] = int(sel.sum())
        keys = [k for k in next(iter(table.values())) if k != "n"]
        table["overall"] = {k: float(np.mean([row[k] for row in table.values()])) for k in keys}
        table["overall"]["n"] = n
        return table

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


def bootstrap_mean(values: np.ndarray, groups: list, resamples: int = 1000, seed: int = 0,
                   level: float = 0.95) -> tuple[float, float, float]:
    """The mean of ``values`` (images) and a percentile bootstrap interval that resamples whole groups (the
    prompts the images came from, with their images), so several images of one prompt do not narrow it."""
    values = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(values)
    if not ok.any():
        return float("nan"), float("nan"), float("nan")
    keys = {g: i for i, g in enumerate(dict.fromkeys(groups))}
    index = np.array([keys[g] for g in groups])[ok]
    sums = np.bincount(index, weights=values[ok], minlength=len(keys))
    counts = np.bincount(index, minlength=len(keys)).astype(np.float64)
    present = counts > 0
    sums, counts = sums[present], counts[present]
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(sums), size=(resamples, len(sums)))
    means = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    tail = (1 - level) / 2 * 100
    return float(sums.sum() / counts.sum()), float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def bootstrap_gain(before: np.ndarray, after: np.ndarray, groups: list, resamples: int = 1000, seed: int = 0,
                   level: float = 0.95) -> tuple[float, float, float]:
    """``mean(after) - mean(before)`` over the same images (same prompts, same noise seeds) and a paired
    percentile bootstrap interval that resamples whole prompts: the eval's own noise on a gain, which is far
    narrower than the two intervals of the means, since a prompt's difficulty cancels in the difference."""
    before, after = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    if before.shape != after.shape or len(groups) != before.size:
        raise ValueError(f"a paired gain needs the same images before and after: {before.size} before, "
                         f"{after.size} after, {len(groups)} prompts")
    return bootstrap_mean(after - before, groups, resamples=resamples, seed=seed, level=level)


def _summary(prefix: str, values: np.ndarray) -> dict:
    finite = values[np.isfinite(values)]
    return {f"{prefix}_mean": float(finite.mean()) if finite.size else float("nan"),
            f"{prefix}_std": float(finite.std()) if finite.size else float("nan")}


def report_chart(out: Path, result: EvalResult) -> Path | None:
    """The bar chart beside the summary table: per tag, the verdict columns (strict, partial, ...; the reward
    when there are none), overall included; without tags, every ``eval/<name>_mean`` with its std."""
    from alignrl.plots import bar_chart

    if result.table:
        columns = [k for k in next(iter(result.table.values())) if k != "n"]
        shown = [c for c in columns if c != "reward"] or ["reward"]
        groups = {tag: {c: row.get(c) for c in shown} for tag, row in result.table.items()}
        return bar_chart(groups, out, "per tag (overall = mean over tags)", " / ".join(shown))
    means = {k[len("eval/"):-len("_mean")]: v for k, v in result.metrics.items()
             if k.startswith("eval/") and k.endswith("_mean") and not k.startswith("eval/tag/")}
    terms = [n for n in means if n != "reward" and "/" not in n]
    if len(terms) == 1 and "reward" in means and means[terms[0]] == means["reward"]:
        del means["reward"]  # a lone reward term is the total: one bar, under the reward's name
    stds = {name: result.metrics.get(f"eval/{name}_std") for name in means}
    return bar_chart({name: {"mean": v} for name, v in means.items()}, out, "mean per reward (error bar: std)",
                     "mean", errors={name: {"mean": s} for name, s in stds.items() if s is not None})


def write_report(out_dir: Path, result: EvalResult, title: str, details: dict, grid_size: int = 16) -> dict:
    """Write metrics.json, grid.png, chart.png and summary.md into ``out_dir``; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps({**result.metrics, **details}, indent=2))
    paths = {"metrics": out_dir / "metrics.json"}
    if result.images is not None and len(result.images):
        k = min(grid_size, len(result.images))
        paths["grid"] = save_grid(out_dir / "grid.png", result.images[:k], result.captions[:k])
        if result.images.ndim == 5:  # videos: the grid holds filmstrips; the first grid_size clips as MP4 and GIF
            from alignrl.eval.video import write_videos

            paths["videos"] = out_dir / "videos"
            write_videos(paths["videos"], result.images[:k], [f"{i:03d}" for i in range(k)])
    chart = report_chart(out_dir / "chart.png", result)
    if chart is not None:
        paths["chart"] = chart
    lines = [f"# {title}", ""]
    if result.table:
        cols = ["tag"] + [k for k in next(iter(result.table.values())) if k != "n"] + ["n"]
        lines += ["## Per tag (GenEval style; overall = mean over tags)", "",
                  markdown_table([{"tag": t, **row} for t, row in result.table.items()], cols), ""]
        if chart is not None:
            lines += ["![per tag](chart.png)", ""]
    rows = [{"metric": k, "value": v} for k, v in result.metrics.items() if "/tag/" not in k]
    lines += [markdown_table(rows, ["metric", "value"]), ""]
    if chart is not None and not result.table:
        lines += ["![per reward](chart.png)", ""]
    lines += [f"- {k}: {v}" for k, v in details.items()]
    if "grid" in paths:
        lines += ["", "![samples](grid.png)"]
    if "videos" in paths:
        lines += ["", "Videos (MP4, GIF previews):", ""]
        lines += [f"- {c}: [videos/{i:03d}.mp4](videos/{i:03d}.mp4) ![](videos/{i:03d}.gif)"
                  for i, c in enumerate(result.captions[:k])]
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")
    paths["summary"] = out_dir / "summary.md"
    return paths
