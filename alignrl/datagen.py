"""``alignrl data``: a dataset for the offline methods, made by a model and a reward.

For each prompt, K images are sampled (the base model or a checkpoint, the recipe's evaluation plan, noise keyed
by (seed, prompt, image) so a rerun draws the same images), scored with the recipe's reward (any: the ShapeWorld
judge, PickScore, OCR, a remote reward) and written as PNGs under ``<out>/images/`` with one JSON-lines file
in the layouts of ``alignrl/imagedata.py``:

- ``pairs``: ``best_worst`` (the best and worst image of each prompt; DPO's online recipe) or ``all`` (every
  pair whose score gap is at least ``margin``);
- ``lists``: all K images with their scores (RankDPO);
- ``labels``: the top ``label_fraction`` of each prompt's images desirable, the bottom fraction undesirable (KTO);
  images tied across the boundary are left out (``label_halves``), a prompt whose images all score alike gives none;
- ``captions``: the best image of each prompt (rejection-sampling SFT; ``captions=best``), or every image tied
  with that best score (``captions=top``: a judge that passes six of eight images gives six rows).

Ties (a gap below ``margin``, or no gap at all) make no pair. A run resumes: ``progress.json`` records the
prompts finished and the file's length then, so an interrupted run continues where it stopped and ends with the
rows a single run would have written.

Every sampling run also keeps each prompt's scored images as ``lists.jsonl`` (the ``lists`` layout), and
``from_lists=<a lists .jsonl or its directory>`` derives pairs, labels or captions from it (``derive_from_lists``):
no model, no sampling, the same rows a sampling run of that kind writes (same images, same scores), so one sampling
pass serves every offline method.

``source=<hub id or local directory>`` imports an existing Hugging Face dataset instead (``import_dataset``):
Pick-a-Pic v2's layout for pairs (``caption``, ``jpg_0``, ``jpg_1``, ``label_0``; SmPO's ``ps_score_0/1`` or
``score_0/1`` kept as the pair's scores), ``caption`` + ``jpg``/``image`` (+ ``label``) for captions and labels.
It is read with ``datasets`` (streamed: rows are written as they arrive, so a 300 GB hub dataset needs only
``limit=`` rows of disk), the images written as they are (no re-encoding) under ``<out>/images/``, and resumes
like a sampling run.
"""

from __future__ import annotations

import contextlib
import itertools
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
CAPTION_PICKS = ("best", "top")


def label_halves(ranked: list[float], fraction: float) -> tuple[list[int], list[int]]:
    """Positions (in ``ranked``, scores best first) of the desirable and the undesirable images: the top and the
    bottom ``fraction``, every desirable score strictly above every undesirable one. Where the halves share a score
    (a judge's 1s and 0s: six of eight images pass), the images tied across the boundary are left out of the side
    that would lose fewer, so [1, 1, 1, 1, 1, 1, 0, 0] gives four desirable and two undesirable images, not none."""
    n = min(max(1, int(round(len(ranked) * fraction))), len(ranked) // 2)
    if n == 0:
        return [], []
    top, bottom = list(range(n)), list(range(len(ranked) - n, len(ranked)))
    # undesirable first: the bottom images below every top score, then the top ones above what is left
    u_first = [j for j in bottom if ranked[j] < ranked[top[-1]]]
    u_first = ([j for j in top if u_first and ranked[j] > ranked[u_first[0]]], u_first)
    d_first = [j for j in top if ranked[j] > ranked[bottom[0]]]
    d_first = (d_first, [j for j in bottom if d_first and ranked[j] < ranked[d_first[-1]]])
    best = max((u_first, d_first), key=lambda side: (min(len(side[0]), len(side[1])) > 0, len(side[0]) + len(side[1])))
    return best if best[0] and best[1] else ([], [])


def rows_for_prompt(kind: str, prompt: str, names: list[str], scores: np.ndarray, *, pairing: str = "best_worst",
                    margin: float = 0.0, label_fraction: float = 0.5, captions: str = "best",
                    meta: dict | None = None) -> list[dict]:
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
        top, bottom = label_halves([s[i] for i in order], label_fraction)
        return [{"prompt": prompt, "image": names[order[j]], "label": 1, "score": s[order[j]], **meta} for j in top] + \
               [{"prompt": prompt, "image": names[order[j]], "label": 0, "score": s[order[j]], **meta} for j in bottom]
    picked = order[:1] if captions == "best" else [i for i in order if s[i] == s[order[0]]]  # captions
    return [{"prompt": prompt, "image": names[i], "score": s[i], **meta} for i in picked]


# columns read from a Hugging Face dataset, by kind: (row key, candidate column names)
HF_COLUMNS = {
    "pairs": (("caption", ("caption", "prompt")), ("image_0", ("jpg_0", "image_0")), ("image_1", ("jpg_1", "image_1")),
              ("label_0", ("label_0",))),
    "labels": (("caption", ("caption", "prompt")), ("image", ("jpg", "image")), ("label", ("label",))),
    "captions": (("caption", ("caption", "prompt", "text")), ("image", ("jpg", "image"))),
}
HF_OPTIONAL = {"pairs": (("score_0", ("score_0", "ps_score_0")), ("score_1", ("score_1", "ps_score_1")))}


def _image_bytes(value, where: str) -> bytes:
    """An image cell as its encoded bytes: raw bytes, a ``datasets`` Image dict, or a decoded PIL image (PNG)."""
    import io

    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict) and value.get("bytes"):
        return bytes(value["bytes"])
    if isinstance(value, dict) and value.get("path") and Path(value["path"]).is_file():
        return Path(value["path"]).read_bytes()
    if hasattr(value, "save"):  # a PIL image (a decoded Image feature)
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return buf.getvalue()
    raise ConfigError(f"{where}: an image cell holds {type(value).__name__}, not image bytes")


def _write_image(out: Path, data: bytes, row: int, key: str) -> str:
    """The image bytes as they are under ``out/images/`` (named by row and slot, the extension by format;
    a file PIL cannot open is caught by the validation pass when training reads it); its relative path."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            ext = (im.format or "img").lower().replace("jpeg", "jpg")
    except Exception:  # noqa: BLE001  unreadable: named in one line by ImageDataset.validate
        ext = "img"
    name = f"images/{row:08d}_{key.rsplit('_', 1)[-1] if '_' in key else '0'}.{ext}"
    tmp = out / (name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, out / name)
    return name


def _open_hf(source: str, split: str):
    try:
        import datasets
    except ImportError:
        raise ConfigError("source= reads Hugging Face datasets: pip install 'alignrl[hf]' (the datasets package)") \
            from None
    path = Path(source).expanduser()
    try:
        if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
            ds = datasets.load_from_disk(str(path))  # a save_to_disk directory (Arrow)
            return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        return datasets.load_dataset(str(path) if path.is_dir() else source, split=split, streaming=True)
    except Exception as e:  # noqa: BLE001  the library's errors name network, split or layout problems
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"cannot read dataset '{source}' (split {split}): {first} (give a hub id with network "
                          f"access, or a local directory of parquet/arrow files)") from None


def _open_output(out: Path, data_file: Path, settings: dict, done_key: str) -> tuple[int, int]:
    """(units done, rows written) of an earlier run of the same settings in ``out`` (0, 0 for a new one); rows past
    the last recorded unit (a crash between the two writes) are dropped. Other settings are refused, as is a
    directory `alignrl data` did not write."""
    from alignrl.training import checkpoint as ckpt

    progress_file = out / "progress.json"
    done, lines = 0, 0
    if progress_file.is_file():
        progress = json.loads(progress_file.read_text())
        if "sampling" in settings and "sampling" not in progress.get("settings", {}):
            progress.setdefault("settings", {})["sampling"] = settings["sampling"]  # written before it was recorded
        if progress.get("settings") != settings:
            changed = sorted(key for key in settings if progress.get("settings", {}).get(key) != settings[key])
            raise ConfigError(f"{out} was written with other settings ({', '.join(changed)}); use a new out= directory "
                              f"or the original settings to resume")
        done, lines = int(progress[done_key]), int(progress["lines"])
    elif out.exists() and any(out.iterdir()):
        raise ConfigError(f"out={out} exists and is not an `alignrl data` directory; give a new or empty one")
    (out / "images").mkdir(parents=True, exist_ok=True)
    if data_file.exists():
        kept = data_file.read_text(encoding="utf-8").splitlines()[:lines]
        ckpt.atomic_write_text(data_file, "".join(line + "\n" for line in kept))
    return done, lines


def import_dataset(g: dict, out: Path, kind: str) -> int:
    """Rows of a Hugging Face dataset (``g['source']``) written in the layouts of ``alignrl/imagedata.py``."""
    from alignrl.training import checkpoint as ckpt

    if kind not in HF_COLUMNS:
        raise ConfigError(f"source= imports pairs, labels or captions; kind={kind} is made by sampling (drop source=)")
    source, split = str(g["source"]), str(g.get("split") or "train")
    limit = None if g.get("limit") in (None, "") else int(g["limit"])
    settings = {"source": source, "split": split, "kind": kind}
    data_file, progress_file = out / f"{kind}.jsonl", out / "progress.json"
    done, lines = _open_output(out, data_file, settings, "rows_done")
    if limit is not None and done >= limit:
        print(f"alignrl: {out} already holds {done} rows of {source}", file=sys.stderr)
        return 0
    ds = _open_hf(source, split)
    from tqdm import tqdm

    bar = tqdm(total=limit, initial=done, desc=f"alignrl data ({kind} from {source})", unit="row", file=sys.stderr,
               disable=not bool(g.get("progress", True)))
    t0, rows_done = time.time(), done

    def commit(fh) -> None:  # rows written so far become durable, then progress.json says how many
        fh.flush()
        os.fsync(fh.fileno())
        ckpt.atomic_write_text(progress_file, json.dumps({"settings": settings, "rows_done": rows_done,
                                                          "lines": lines}, indent=2))

    with open(data_file, "a", encoding="utf-8") as fh:
        for i, raw in enumerate(itertools.islice(ds, done, limit), start=done):
            where = f"{source}[{split}] row {i}"
            row = {}
            for key, names in HF_COLUMNS[kind]:
                col = next((n for n in names if n in raw), None)
                if col is None:
                    raise ConfigError(f"{where}: no column {' or '.join(names)} (columns: {', '.join(sorted(raw))}); "
                                      f"kind={kind} needs {', '.join(n[0] for _, n in HF_COLUMNS[kind])}")
                if key.startswith("image"):
                    row[key] = _write_image(out, _image_bytes(raw[col], where), i, key)
                else:
                    row[key] = raw[col].item() if hasattr(raw[col], "item") else raw[col]
            for key, names in HF_OPTIONAL.get(kind, ()):
                col = next((n for n in names if n in raw), None)
                if col is not None:
                    row[key] = raw[col].item() if hasattr(raw[col], "item") else raw[col]
            fh.write(json.dumps(row) + "\n")
            lines += 1
            rows_done = i + 1
            if lines % 100 == 0:
                commit(fh)
            bar.update(1)
        commit(fh)
    bar.close()
    print(f"alignrl: {lines} {kind} rows of {source} ({split}) in {data_file} ({time.time() - t0:.0f} s; ties are "
          f"kept in the file and dropped when training reads it)", file=sys.stderr)
    return 0


def derive_from_lists(g: dict, kind: str, pairing: str, fraction: float, captions: str = "best") -> int:
    """``kind`` rows from an earlier run's ``lists.jsonl`` (every sampling run keeps one): each list is one prompt's
    scored images, exactly what a sampling run ranks, so the rows equal that run's. Only the lines the source run
    committed are read (its progress.json says how many: one still running, or one that crashed, has more). Written
    to ``out`` (default: the lists file's folder), the image paths relative to it (resolved: a symlinked out= is
    followed); an existing file of that kind is refused, never overwritten."""
    from alignrl.training import checkpoint as ckpt

    if kind == "lists":
        raise ConfigError("from_lists= derives pairs, labels or captions; kind=lists is the source itself")
    if g.get("source"):
        raise ConfigError("from_lists= and source= both given; derive from an earlier run (from_lists=) or import a "
                          "dataset (source=), not both")
    src = Path(str(g["from_lists"])).expanduser()
    if src.is_dir():
        src = src / "lists.jsonl"
    if not src.is_file():
        raise ConfigError(f"from_lists='{g['from_lists']}' is not a lists .jsonl (or a folder holding lists.jsonl); "
                          f"any `alignrl data out=<dir>` sampling run writes <dir>/lists.jsonl")
    out = Path(str(g.get("out") or src.parent)).expanduser()
    data_file = out / f"{kind}.jsonl"
    if data_file.exists():
        raise ConfigError(f"{data_file} exists; remove it or give another out=")
    from alignrl.imagedata import json_rows

    committed = None
    progress_file = src.parent / "progress.json"
    if src.name == "lists.jsonl" and progress_file.is_file():  # the rows the source run committed, no more
        progress = json.loads(progress_file.read_text())
        committed = progress.get("lists_lines", progress.get("lines")
                                 if progress.get("settings", {}).get("kind") == "lists" else None)
    margin = float(g.get("margin", 0.0))
    rows, prompts, skipped = [], 0, 0
    for raw, where in json_rows(src, "lists", None if committed is None else int(committed)):
        # the row's own checks, not the training loader's: a sampled list keeps a prompt with one finite score
        try:
            names, scores, prompt = raw["images"], raw["scores"], raw["prompt"]
            ok = isinstance(names, list) and all(isinstance(n, str) for n in names) and isinstance(scores, list)
            scores = np.asarray(scores, dtype=np.float64)
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{where}: not a lists row ({type(e).__name__}: {e}); a row needs prompt, images "
                              f"(paths) and scores (numbers)") from None
        if not ok or scores.ndim != 1 or len(names) != len(scores):
            raise ConfigError(f"{where}: images must be a list of paths and scores a list of as many numbers")
        paths = [(src.parent / n).resolve() for n in names]
        missing = next((n for n, p in zip(names, paths) if not p.is_file()), None)
        if missing is not None:
            raise ConfigError(f"{where}: image '{missing}' does not exist (paths are relative to {src.parent}); "
                              f"copy the run's images/ with its lists.jsonl")
        meta = {k: v for k, v in raw.items() if k not in ("prompt", "images", "scores")}
        got = rows_for_prompt(kind, prompt, [p.as_posix() for p in paths], scores, pairing=pairing, margin=margin,
                              label_fraction=fraction, captions=captions, meta=meta)
        prompts += 1
        skipped += not got
        rows += got
    out.mkdir(parents=True, exist_ok=True)
    base = out.resolve()
    for row in rows:  # image paths relative to out=, as the layouts read them
        for key in ("winner", "loser", "image"):
            if key in row:
                row[key] = Path(os.path.relpath(row[key], base)).as_posix()
    ckpt.atomic_write_text(data_file, "".join(json.dumps(r) + "\n" for r in rows))
    print(f"alignrl: {len(rows)} {kind} rows from the {prompts} lists of {src} in {data_file} ({skipped} prompts gave "
          f"no row: ties, or fewer than two finite scores)", file=sys.stderr)
    return 0


def select_prompts(cfg: DictConfig, which):
    """``prompts=``: train (data.train), eval (the first data.eval set) or a prompt file."""
    from alignrl.data import PromptSet, load_eval_sets

    which = str(which or "train")
    if which == "train":
        return PromptSet.load(cfg.data.train, "data.train")
    if which == "eval":
        sets = load_eval_sets(cfg.data.get("eval"))
        if not sets:
            raise ConfigError("prompts=eval but data.eval is not set")
        return next(iter(sets.values()))
    return PromptSet.load(which, "prompts")


def make_dataset(cfg: DictConfig) -> int:
    from alignrl.commands import _device, _source
    from alignrl.components import as_dict, build_planner
    from alignrl.eval.report import to_pil
    from alignrl.policy import load_policy
    from alignrl.rewards.base import WeightedReward
    from alignrl.sampling.engine import sample_images
    from alignrl.training import checkpoint as ckpt

    g = as_dict(cfg.get("datagen"))
    kind, pairing = str(g.get("kind", "pairs")), str(g.get("pairing", "best_worst"))
    if kind == "trajectories":
        if g.get("from_lists"):
            raise ConfigError("from_lists= derives pairs, labels or captions; trajectories are sampled (drop from_lists=)")
        if not g.get("out"):
            raise ConfigError("out is not set; pass out=<a new or earlier `alignrl data` directory>")
        from alignrl.trajectories import make_trajectories

        return make_trajectories(cfg, g, Path(str(g["out"])).expanduser())
    if kind not in KINDS:
        raise ConfigError(f"kind='{kind}' is not known; use one of {', '.join(KINDS)} or trajectories")
    if pairing not in PAIRINGS:
        raise ConfigError(f"pairing='{pairing}' is not known; use best_worst or all")
    fraction = float(g.get("label_fraction", 0.5))
    if not 0 < fraction <= 0.5:
        raise ConfigError(f"label_fraction={fraction} must be in (0, 0.5]")
    captions = str(g.get("captions", "best"))
    if captions not in CAPTION_PICKS:
        raise ConfigError(f"captions='{captions}' is not known; use best (one image per prompt) or top (every image "
                          f"tied with the best score)")
    if g.get("from_lists"):
        return derive_from_lists(g, kind, pairing, fraction, captions)
    if not g.get("out"):
        raise ConfigError("out is not set; pass out=<a new or earlier `alignrl data` directory>")
    if g.get("source"):
        return import_dataset(g, Path(str(g["out"])).expanduser(), kind)
    k = int(g.get("samples_per_prompt", 8))
    if k < 2:
        raise ConfigError(f"samples_per_prompt={k}: a reward ranks at least 2 images per prompt")
    out = Path(str(g["out"])).expanduser()
    source = _source(cfg, g.get("checkpoint"), "checkpoint")
    cfg = source.cfg
    prompts = select_prompts(cfg, g.get("prompts"))
    n = len(prompts) if g.get("num_prompts") in (None, "") else min(int(g["num_prompts"]), len(prompts))
    settings = {"kind": kind, "pairing": pairing, "margin": float(g.get("margin", 0.0)), "label_fraction": fraction,
                "samples_per_prompt": k, "seed": int(cfg.seed), "prompts": prompts.source,
                "checkpoint": str(source.checkpoint) if source.checkpoint else None,
                "weights": str(g.get("weights", "ema")), "reward": sorted(cfg.reward.keys())}
    if captions != "best":  # recorded only when set, so runs written before the option existed still resume
        settings["captions"] = captions
    plan = build_planner(cfg).eval_plan()  # the recipe's evaluation sampler draws the images
    if g.get("guidance_scale") is not None:  # at another CFG scale than the eval's
        from dataclasses import replace

        scale = float(g["guidance_scale"])
        if not scale >= 1:
            raise ConfigError(f"datagen.guidance_scale={scale}: give a CFG scale >= 1 (1: none), or null for the "
                              f"eval's")
        plan = replace(plan, guidance_scale=scale)
    settings["sampling"] = {"solver": plan.name, "steps": len(plan.steps), "guidance": plan.guidance_scale}
    data_file = out / f"{kind}.jsonl"
    progress_file = out / "progress.json"
    done, lines = _open_output(out, data_file, settings, "prompts_done")
    if done >= n:
        print(f"alignrl: {out} already holds {n} prompts ({lines} {kind} rows)", file=sys.stderr)
        return 0
    # every image's score is kept beside the other kinds (lists.jsonl), so any kind can be derived later
    lists_file, lists_lines = (out / "lists.jsonl" if kind != "lists" else None), 0
    if lists_file is not None:
        progress = json.loads(progress_file.read_text()) if progress_file.is_file() else {}
        if done and "lists_lines" not in progress:
            lists_file = None  # a directory an earlier version began: it goes on without the scores file
        else:
            lists_lines = int(progress.get("lists_lines", 0))
            kept = lists_file.read_text(encoding="utf-8").splitlines()[:lists_lines] if lists_file.exists() else []
            if len(kept) < lists_lines:  # removed or cut since: appending would leave out its first prompts
                print(f"alignrl: {lists_file} holds {len(kept)} of the {lists_lines} lists written; it is not "
                      f"continued (from_lists= would miss prompts)", file=sys.stderr)
                lists_file = None
            else:
                ckpt.atomic_write_text(lists_file, "".join(line + "\n" for line in kept))

    reward = WeightedReward.from_config(as_dict(cfg.reward))
    backbone, model = load_policy(source, _device(cfg), settings["weights"])
    seed = int(cfg.seed)
    batch = max(1, int(g.get("batch_size") or k))
    from tqdm import tqdm

    bar = tqdm(total=n, initial=done, desc=f"alignrl data ({kind})", unit="prompt", file=sys.stderr,
               disable=not bool(g.get("progress", True)))
    t0, skipped = time.time(), 0
    with open(data_file, "a", encoding="utf-8") as fh, \
            (open(lists_file, "a", encoding="utf-8") if lists_file else contextlib.nullcontext()) as lh:
        for i in range(done, n):
            prompt, meta = prompts.prompts[i], prompts.metadata[i]
            images = sample_images(backbone, plan, [prompt] * k, [i * k + j for j in range(k)], seed, batch)
            scores, _ = reward(images, [prompt] * k, [meta] * k)
            names = [f"images/{i:05d}_{j:02d}.{'mp4' if images.ndim == 5 else 'png'}" for j in range(len(images))]
            if images.ndim == 5:  # videos: an H.264 MP4 per clip (written atomically), what offline training reads
                from alignrl.eval.video import write_mp4

                for name, clip in zip(names, images):
                    write_mp4(out / name, clip)
            else:
                for name, im in zip(names, to_pil(images)):
                    tmp = out / (name + ".tmp.png")
                    im.save(tmp)
                    os.replace(tmp, out / name)
            rows = rows_for_prompt(kind, prompt, names, np.asarray(scores), pairing=pairing,
                                   margin=settings["margin"], label_fraction=fraction, captions=captions,
                                   meta={"prompt_id": i, **meta})
            skipped += not rows
            for row in rows:
                fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
            lines += len(rows)
            progress = {"settings": settings, "prompts_done": i + 1, "lines": lines, "model": model}
            if lists_file is not None:
                for row in rows_for_prompt("lists", prompt, names, np.asarray(scores), meta={"prompt_id": i, **meta}):
                    lh.write(json.dumps(row) + "\n")
                    lists_lines += 1
                lh.flush()
                os.fsync(lh.fileno())
                progress["lists_lines"] = lists_lines
            ckpt.atomic_write_text(progress_file, json.dumps(progress, indent=2))
            bar.update(1)
    bar.close()
    print(f"alignrl: {lines} {kind} rows from {n} prompts x {k} images of {model} in {data_file} "
          f"({skipped} prompts gave no row: ties; {time.time() - t0:.0f} s)"
          + (f"; every image's score in {lists_file} (other kinds: from_lists={out})" if lists_file else ""),
          file=sys.stderr)
    return 0
