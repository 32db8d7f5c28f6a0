"""D3PO's human mode: stored trajectories ranked by people, and the collector that trains on them.

``alignrl data recipe=<a d3po recipe> kind=trajectories out=DIR samples_per_prompt=K`` samples, for each prompt, K
images from ONE initial noise with the recipe's training plan (DDIM with eta 1, CFG: the D3PO sampler, its pair
widened to K), by the initial model (or ``checkpoint=``). It writes

- ``trajectories/<row>.safetensors``: ``latents`` (K, S + 1, *latent): each image's chain over the S trained steps
  (steps 0 .. S - 1, in the backbone's flow frame), float32;
- ``images/<row>_<k>.png``: the decoded images, for the people who rank them;
- ``ranks.jsonl``: one row per prompt, ``{"row", "prompt", "images": [...], "ranks": null}``; fill ``ranks`` with K
  integers, 1 the best, equal numbers for images judged alike (``ranks=reward`` fills them from the recipe's
  reward instead, to try the pipeline or to let a model rank first);
- ``manifest.json``: the backbone, the plan and the model that drew them.

``algorithm.human_file=DIR/ranks.jsonl`` then trains D3PO on those trajectories instead of fresh rollouts, as the
reference's human mode does: every pair of a prompt's images with different ranks (K = 7 gives up to 21) is a
pair, the better-ranked image preferred; the ratio is against the frozen initial model, which drew them.
Every row must be ranked before training starts; the store must match the recipe's backbone and plan.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from alignrl.algorithms.base import RolloutBatch
from alignrl.errors import ConfigError

MANIFEST_KEYS = ("backbone", "resolution", "num_steps", "guidance_scale", "sde_type", "noise_level", "trained_steps")


def _plan_identity(backbone_family: str, resolution: int, plan) -> dict:
    trained = [i for i, s in enumerate(plan.steps) if s.trained]
    first = plan.steps[0]
    return {"backbone": backbone_family, "resolution": int(resolution), "num_steps": len(plan.steps),
            "guidance_scale": float(plan.guidance_scale), "sde_type": first.kind,
            "noise_level": float(first.noise_level), "trained_steps": len(trained)}


def _shared_noise_plan(planner, k: int):
    from alignrl.sampling.plans import SharedNoisePlanner

    if not isinstance(planner, SharedNoisePlanner):
        raise ConfigError("kind=trajectories stores D3PO's shared-noise rollouts; use a recipe with sampler=d3po "
                          "(e.g. recipe=d3po_sd15)")
    return replace(planner, branch_factor=k).plan()


def make_trajectories(cfg, g: dict, out: Path) -> int:
    """``alignrl data ... kind=trajectories``: see the module docstring. Resumes like the other kinds."""
    from alignrl.commands import _device, _source
    from alignrl.components import as_dict, build_planner
    from alignrl.datagen import _open_output, select_prompts
    from alignrl.eval.report import to_pil
    from alignrl.policy import load_policy
    from alignrl.rewards.base import WeightedReward
    from alignrl.sampling.engine import rollout, sample_generators
    from alignrl.training import checkpoint as ckpt

    k = int(g.get("samples_per_prompt", 7))
    if k < 2:
        raise ConfigError(f"samples_per_prompt={k}: people rank at least 2 images per prompt")
    rank_by = str(g.get("ranks") or "empty")
    if rank_by not in ("empty", "reward"):
        raise ConfigError(f"ranks='{rank_by}' is not known; use empty (people fill them) or reward")
    source = _source(cfg, g.get("checkpoint"), "checkpoint")
    cfg = source.cfg
    plan = _shared_noise_plan(build_planner(cfg), k)
    prompts = select_prompts(cfg, g.get("prompts"))
    n = len(prompts) if g.get("num_prompts") in (None, "") else min(int(g["num_prompts"]), len(prompts))
    settings = {"kind": "trajectories", "samples_per_prompt": k, "seed": int(cfg.seed), "prompts": prompts.source,
                "checkpoint": str(source.checkpoint) if source.checkpoint else None,
                "weights": str(g.get("weights", "ema")), "ranks": rank_by}
    data_file = out / "ranks.jsonl"
    done, lines = _open_output(out, data_file, settings, "prompts_done")
    (out / "trajectories").mkdir(exist_ok=True)
    if done >= n:
        print(f"alignrl: {out} already holds {n} prompts", file=sys.stderr)
        return 0
    backbone, model = load_policy(source, _device(cfg), settings["weights"])
    manifest = {**_plan_identity(backbone.family, backbone.resolution, plan), "samples_per_prompt": k,
                "model": model, "dtype": str(backbone.dtype).removeprefix("torch.")}
    ckpt.atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2))
    reward = WeightedReward.from_config(as_dict(cfg.reward)) if rank_by == "reward" else None
    from safetensors.torch import save_file
    from tqdm import tqdm

    bar = tqdm(total=n, initial=done, desc="alignrl data (trajectories)", unit="prompt", file=sys.stderr,
               disable=not bool(g.get("progress", True)))
    with open(data_file, "a", encoding="utf-8") as fh:
        for i in range(done, n):
            prompt, meta = prompts.prompts[i], prompts.metadata[i]
            with torch.no_grad():
                cond = backbone.encode_prompts([prompt])
                out_ = rollout(backbone, plan, cond, sample_generators(int(cfg.seed), 0, [i], backbone.device))
                images = backbone.decode(out_.final).cpu()
            chain = [out_.records[0].x] + [r.next_x for r in out_.records]  # each (K, *latent), step order
            latents = torch.stack(chain, dim=1).float().cpu().contiguous()
            tmp = out / "trajectories" / f".{i:05d}.tmp.safetensors"
            save_file({"latents": latents}, str(tmp))
            os.replace(tmp, out / "trajectories" / f"{i:05d}.safetensors")
            names = []
            for j, im in enumerate(to_pil(images)):
                name = f"images/{i:05d}_{j:02d}.png"
                im.save(out / (name + ".tmp.png"))
                os.replace(out / (name + ".tmp.png"), out / name)
                names.append(name)
            ranks = None
            if reward is not None:
                scores, _ = reward(images, [prompt] * k, [meta] * k)
                ranks = ranks_from_scores(np.asarray(scores, dtype=np.float64))
            fh.write(json.dumps({"row": i, "prompt": prompt, "images": names, "ranks": ranks}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
            lines += 1
            ckpt.atomic_write_text(out / "progress.json", json.dumps(
                {"settings": settings, "prompts_done": i + 1, "lines": lines, "model": model}, indent=2))
            bar.update(1)
    bar.close()
    print(f"alignrl: {n} prompts x {k} trajectories of {model} in {out}; "
          + ("ranked by the reward" if reward else f"rank them in {data_file} (1 = best), then train with "
             f"algorithm.human_file={data_file}"), file=sys.stderr)
    return 0


def ranks_from_scores(scores: np.ndarray) -> list[int]:
    """Competition ranks, 1 the highest score; equal scores share a rank."""
    return [int(1 + np.sum(scores > s)) for s in scores]


@dataclass
class TrajectoryStore:
    """A ranked trajectory directory: its manifest, rows and the pairs they make."""

    root: Path
    manifest: dict
    prompts: list[str]  # per row
    files: list[Path]  # per row
    ranks: list[list[int]]  # per row: each image's rank, 1 the best
    pairs: list[tuple[int, int, int]]  # (row, a, b), a ranked better than b

    @classmethod
    def load(cls, ranks_file: str) -> "TrajectoryStore":
        path = Path(str(ranks_file)).expanduser()
        if not path.is_file():
            raise ConfigError(f"algorithm.human_file={ranks_file}: no such file; make one with `alignrl data "
                              f"kind=trajectories out=<dir>` and rank its images")
        root = path.parent
        manifest_file = root / "manifest.json"
        if not manifest_file.is_file():
            raise ConfigError(f"{root} has no manifest.json: human_file must be the ranks.jsonl of an `alignrl data "
                              f"kind=trajectories` directory")
        manifest = json.loads(manifest_file.read_text())
        k = int(manifest["samples_per_prompt"])
        prompts, files, rank_rows, pairs = [], [], [], []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path} line {n} is not JSON ({e.msg})") from None
            ranks = row.get("ranks")
            if not isinstance(ranks, list) or len(ranks) != k or \
                    not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranks):
                raise ConfigError(f"{path} line {n} (prompt '{row.get('prompt')}'): 'ranks' must list {k} integers "
                                  f">= 1 (1 = best, equal for a tie), got {ranks!r}; rank every row before training")
            file = root / "trajectories" / f"{int(row['row']):05d}.safetensors"
            if not file.is_file():
                raise ConfigError(f"{path} line {n}: its trajectories {file} are missing")
            r = len(prompts)
            prompts.append(str(row["prompt"]))
            files.append(file)
            rank_rows.append(ranks)
            for a, b in itertools.combinations(range(k), 2):
                if ranks[a] != ranks[b]:
                    pairs.append((r, a, b) if ranks[a] < ranks[b] else (r, b, a))
        if not pairs:
            raise ConfigError(f"{path} makes no pair: every prompt's images share one rank")
        return cls(root, manifest, prompts, files, rank_rows, pairs)

    def check(self, backbone_family: str, resolution: int, plan) -> None:
        """The store must be what this config would train on (its backbone, resolution and plan)."""
        mine = _plan_identity(backbone_family, resolution, plan)
        diff = [f"{key} {self.manifest.get(key)!r} (here {mine[key]!r})" for key in MANIFEST_KEYS
                if key != "trained_steps" and self.manifest.get(key) != mine[key]]  # the store's chains are trained
        if diff:
            raise ConfigError(f"the trajectories in {self.root} were drawn with other settings: {', '.join(diff)}; "
                              f"train with the recipe and overrides that made them")

    def chains(self, row: int) -> torch.Tensor:
        from safetensors.torch import load_file

        return load_file(str(self.files[row]))["latents"]


@dataclass
class RecordedCollector:
    """``RolloutCollector``'s place in the loop for D3PO's human mode: each slot is one pair of the store; its
    two images are one root's two leaves, their stored chains its transitions, their ranks its rewards
    (minus the rank). The loop's advantages and D3PO's update then run unchanged."""

    store: TrajectoryStore
    sampler: object  # KRepeatPromptSampler over the store's pairs
    plan: object  # the D3PO plan (two leaves per root)
    device: torch.device

    def __post_init__(self):
        self._cache: dict[int, torch.Tensor] = {}

    def _chain(self, row: int) -> torch.Tensor:
        if row not in self._cache:
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[row] = self.store.chains(row)
        return self._cache[row]

    @torch.no_grad()
    def collect(self, iteration: int) -> tuple[RolloutBatch, float]:
        slots = self.sampler.rank_slots(iteration)
        steps = int(self.store.manifest["trained_steps"])
        spec = self.plan.steps[0]
        spec = replace(spec, branch=1, trained=True)
        xs, nxs, t_from, t_root, t_leaf = [], [], [], [], []
        rewards, prompts = [], []
        ranks = self.store.ranks
        for r, slot in enumerate(slots):
            row, a, b = self.store.pairs[slot.prompt_id]
            chain = self._chain(row)
            prompts.append(self.store.prompts[row])
            rewards += [-float(ranks[row][a]), -float(ranks[row][b])]
            for j in range(steps):
                for leaf, image in enumerate((a, b)):
                    xs.append(chain[image, j])
                    nxs.append(chain[image, j + 1])
                    t_from.append(j)
                    t_root.append(r)
                    t_leaf.append(2 * r + leaf)
        n = len(xs)
        x = torch.stack(xs).to(self.device)
        nan = torch.full((n,), float("nan"), device=self.device)
        long = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
        batch = RolloutBatch(
            prompts=prompts, prompt_ids=np.array([s.prompt_id for s in slots]),
            global_index=np.array([s.global_index for s in slots]), plan=self.plan,
            leaf_root=torch.arange(len(slots)).repeat_interleave(2), leaves_per_root=2, leaf_x0=None,
            leaf_path_logp=torch.zeros(2 * len(slots)), leaf_tag=torch.zeros(2 * len(slots), dtype=torch.long),
            # the store's chains were drawn by the initial model; D3PO needs no sampling-policy log-probs
            x=x, next_x=torch.stack(nxs).to(self.device), logp_old=nan, mean_old=nan.view(n, *[1] * (x.dim() - 1)),
            t_from=long(t_from), t_to=long(t_from) + 1, t_spec=[spec] * n, t_root=long(t_root),
            t_leaf_lo=long(t_leaf), t_leaf_count=torch.ones(n, dtype=torch.long),
            t_key=torch.ones(n, dtype=torch.long), t_weight=torch.ones(n),
        )
        batch.rewards = np.array(rewards)
        batch.per_reward = {"human_rank": np.array(rewards)}
        return batch, 0.0
