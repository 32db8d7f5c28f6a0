"""``alignrl data``: a dataset for the offline methods, made by a model and a reward.

For each prompt, K images are sampled (the base model or a checkpoint, the recipe's evaluation plan, noise keyed
by (seed, prompt, image) so a rerun draws the same images), scored with the recipe's reward (any: the ShapeWorld
judge, PickScore, OCR, a remote reward) and written as PNGs under ``<out>/images/`` with one JSON-lines file
in the layouts of ``alignrl/imagedata.py``:

- ``pairs``: ``best_worst`` (the best and worst image of each prompt; DPO's online recipe) or ``all`` (every
  pair whose score gap is at least ``margin``);
- ``lists``: all K images with their scores (RankDPO);
- ``labels``: the top ``label_fraction`` of each prompt's images desirable, the bottom fraction undesirable (KTO);
- ``captions``: the best image of each prompt (rejection-sampling SFT).

Ties (a gap below ``margin``, or no gap at all) make no pair. A run resumes: ``progress.json`` records the
prompts finished and the file's length then, so an interrupted run continues where it stopped and ends with the
rows a single run would have written.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from alignrl.errors import ConfigError

KINDS = ("pairs", "lists", "labels", "captions")
PAIRINGS = ("best_worst", "all")


def rows_for_prompt(kind: str, prompt: str, names: list[str], scores: np.ndarray, *, pairing: str = "best_worst",
                    margin: float = 0.0, label_fraction: float = 0.5, meta: dict | None = None) -> list[dict]:
    """The dataset rows one prompt's scored images give (images with a non-finite score are left out)."""
    meta = dict(meta or {})
    ok = [i for i in range(len(names)) if math.isfinite(float(scores[i]))]
    if not ok:
        return []
    order = sorted(ok, key=lambda i: (-float(scores[i]), i))  # best first; ties by position
    s = {i: float(scores[i]) for i in ok}
    if kind == "pairs":
        if pairing == "best_worst":
            cands = [(order[0], order[-1])] if len(order) > 1 else []
        else:
            cands = [(a, b) for n, a in enumerate(order) for b in order[n + 1:]]
        gap_min = max(margin, 0.0)
        return [{"prompt": prompt, "winner": names[a], "loser": names[b], "winner_score": s[a], "loser_score": s[b],
                 **meta} for a, b in cands if s[a] - s[b] > 0 and s[a] - s[b] >= gap_min]
    if kind == "lists":
        return [{"prompt": prompt, "images": [names[i] for i in ok], "scores": [s[i] for i in ok], **meta}]
    if kind == "labels":
        n = max(1, int(round(len(order) * label_fraction)))
        n = min(n, len(order) // 2)
        if n == 0:
            return []
        top, bottom = order[:n], order[-n:]
        if s[top[-1]] <= s[bottom[0]]:  # no score gap between the labelled halves: a tie, no labels
            return []
        return [{"prompt": prompt, "image": names[i], "label": 1, "score": s[i], **meta} for i in top] + \
               [{"prompt": prompt, "image": names[i], "label": 0, "score": s[i], **meta} for i in bottom]
    return [{"prompt": prompt, "image": names[order[0]], "score": s[order[0]], **meta}]  # captions


def make_dataset(cfg: DictConfig) -> int:
    from alignrl.commands import _device, _source
    from alignrl.components import as_dict, build_planner
    from alignrl.data import PromptSet, load_eval_sets
    from alignrl.eval.report import to_pil
    from alignrl.policy import load_policy
    from alignrl.rewards.base import WeightedReward
    from alignrl.sampling.engine import rollout, sample_generators
    from alignrl.training import checkpoint as ckpt

    g = as_dict(cfg.get("datagen"))
    kind, pairing = str(g.get("kind", "pairs")), str(g.get("pairing", "best_worst"))
    if kind not in KINDS:
        raise ConfigError(f"kind='{kind}' is not known; use one of {', '.join(KINDS)}")
    if pairing not in PAIRINGS:
        raise ConfigError(f"pairing='{pairing}' is not known; use best_worst or all")
    if not g.get("out"):
        raise ConfigError("out is not set; pass out=<a new or earlier `alignrl data` directory>")
    k = int(g.get("samples_per_prompt", 8))
    if k < 2:
        raise ConfigError(f"samples_per_prompt={k}: a reward ranks at least 2 images per prompt")
    fraction = float(g.get("label_fraction", 0.5))
    if not 0 < fraction <= 0.5:
        raise ConfigError(f"label_fraction={fraction} must be in (0, 0.5]")
    out = Path(str(g["out"])).expanduser()
    source = _source(cfg, g.get("checkpoint"), "checkpoint")
    cfg = source.cfg
    which = str(g.get("prompts") or "train")
    if which == "train":
        prompts = PromptSet.load(cfg.data.train, "data.train")
    elif which == "eval":
        sets = load_eval_sets(cfg.data.get("eval"))
        if not sets:
            raise ConfigError("prompts=eval but data.eval is not set")
        prompts = next(iter(sets.values()))
    else:
        prompts = PromptSet.load(which, "prompts")
    n = len(prompts) if g.get("num_prompts") in (None, "") else min(int(g["num_prompts"]), len(prompts))
    settings = {"kind": kind, "pairing": pairing, "margin": float(g.get("margin", 0.0)), "label_fraction": fraction,
                "samples_per_prompt": k, "seed": int(cfg.seed), "prompts": prompts.source,
                "checkpoint": str(source.checkpoint) if source.checkpoint else None,
                "weights": str(g.get("weights", "ema")), "reward": sorted(cfg.reward.keys())}
    data_file = out / f"{kind}.jsonl"
    progress_file = out / "progress.json"
    done, lines = 0, 0
    if progress_file.is_file():
        progress = json.loads(progress_file.read_text())
        if progress.get("settings") != settings:
            changed = sorted(key for key in settings if progress.get("settings", {}).get(key) != settings[key])
            raise ConfigError(f"{out} was written with other settings ({', '.join(changed)}); use a new out= directory "
                              f"or the original settings to resume")
        done, lines = int(progress["prompts_done"]), int(progress["lines"])
    elif out.exists() and any(out.iterdir()):
        raise ConfigError(f"out={out} exists and is not an `alignrl data` directory; give a new or empty one")
    (out / "images").mkdir(parents=True, exist_ok=True)
    if data_file.exists():  # drop rows past the last recorded prompt (a crash between the two writes)
        kept = data_file.read_text(encoding="utf-8").splitlines()[:lines]
        ckpt.atomic_write_text(data_file, "".join(line + "\n" for line in kept))
    if done >= n:
        print(f"alignrl: {out} already holds {n} prompts ({lines} {kind} rows)", file=sys.stderr)
        return 0

    reward = WeightedReward.from_config(as_dict(cfg.reward))
    backbone, model = load_policy(source, _device(cfg), settings["weights"])
    plan = build_planner(cfg).eval_plan()
    seed = int(cfg.seed)
    batch = max(1, int(g.get("batch_size") or k))
    from tqdm import tqdm

    bar = tqdm(total=n, initial=done, desc=f"alignrl data ({kind})", unit="prompt", file=sys.stderr,
               disable=not bool(g.get("progress", True)))
    t0, skipped = time.time(), 0
    with open(data_file, "a", encoding="utf-8") as fh:
        for i in range(done, n):
            prompt, meta = prompts.prompts[i], prompts.metadata[i]
            images = []
            with torch.no_grad():
                for start in range(0, k, batch):
                    ids = [i * k + j for j in range(start, min(k, start + batch))]
                    cond = backbone.encode_prompts([prompt] * len(ids))
                    gens = sample_generators(seed, 0, ids, backbone.device)
                    images.append(backbone.decode(rollout(backbone, plan, cond, gens, record=False).final).cpu())
            images = torch.cat(images)
            scores, _ = reward(images, [prompt] * k, [meta] * k)
            names = []
            for j, im in enumerate(to_pil(images)):
                name = f"images/{i:05d}_{j:02d}.png"
                tmp = out / (name + ".tmp.png")
                im.save(tmp)
                os.replace(tmp, out / name)
                names.append(name)
            rows = rows_for_prompt(kind, prompt, names, np.asarray(scores), pairing=pairing,
                                   margin=settings["margin"], label_fraction=fraction, meta={"prompt_id": i, **meta})
            skipped += not rows
            for row in rows:
                fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
            lines += len(rows)
            ckpt.atomic_write_text(progress_file, json.dumps({"settings": settings, "prompts_done": i + 1,
                                                              "lines": lines, "model": model}, indent=2))
            bar.update(1)
    bar.close()
    print(f"alignrl: {lines} {kind} rows from {n} prompts x {k} images of {model} in {data_file} "
          f"({skipped} prompts gave no row: ties; {time.time() - t0:.0f} s)", file=sys.stderr)
    return 0
