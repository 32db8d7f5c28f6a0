"""``alignrl reward-check``: score a folder of images with the configured reward(s) before a long run.

Images: a folder (its .png/.jpg/.jpeg/.webp/.bmp files, sorted by name) or a glob. Prompts, first match:

- ``prompts=<file>.jsonl``: lines ``{"image": "<file name>", "prompt": "...", ...}``; the other fields are
  the image's metadata (as in prompt sets); images it does not name are skipped (with a warning). Lines
  without ``image`` pair with the images in sorted order.
- ``prompts=<file>.txt``: one prompt per line, paired with the images in sorted order.
- ``prompts="some text"``: one prompt for every image.
- nothing: ``<folder>/prompts.jsonl`` when it exists (``alignrl sample`` writes one), else empty prompts
  (fine for prompt-free rewards such as aesthetic or JPEG; a warning says so).

Prints a table (one row per image, a column per reward, then mean/std/min/max per reward) and writes
the same as JSON (``out=``, default ``<folder>/reward_check.json``).
"""

from __future__ import annotations

import glob
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from alignrl.data import PromptSet
from alignrl.errors import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def find_images(spec: str) -> tuple[list[Path], Path]:
    """The image files named by a folder or a glob (sorted), and the folder they sit in."""
    if not spec:
        raise ConfigError("no images given; pass images=<folder or glob>, e.g. images=outputs/samples")
    from alignrl.imagedata import VIDEO_SUFFIXES

    path = Path(spec).expanduser()
    media = IMAGE_SUFFIXES + VIDEO_SUFFIXES
    if path.is_dir():
        files, folder = sorted(p for p in path.iterdir() if p.suffix.lower() in media), path
    else:
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).suffix.lower() in media)
        folder = files[0].parent if files else path.parent
    videos = [f for f in files if f.suffix.lower() in VIDEO_SUFFIXES]
    if videos:  # a video sample folder also holds each clip's filmstrip PNG: the clips are what is scored
        files = videos
    if not files:
        raise ConfigError(f"images='{spec}' names no image files ({', '.join(IMAGE_SUFFIXES)}); "
                          f"give a folder or a glob such as 'samples/*.png'")
    return files, folder


def pair_prompts(files: list[Path], folder: Path, spec) -> tuple[list[Path], list[str], list[dict], str]:
    """The images to score with their prompts and metadata, and where the prompts came from.

    A .jsonl that names images (``"image"``) selects them: other files in the folder (e.g. the grid
    ``alignrl sample`` writes) are skipped with a warning."""
    if spec is None or str(spec).strip() == "":
        default = folder / "prompts.jsonl"
        if not default.is_file():
            print("alignrl: warning: no prompts given and no prompts.jsonl next to the images; scoring with "
                  "empty prompts (pass prompts=<file or text> for prompt-dependent rewards)", file=sys.stderr)
            return files, [""] * len(files), [{} for _ in files], "none"
        spec = str(default)
    spec = str(spec)
    path = Path(spec).expanduser()
    try:
        is_file = path.is_file()
    except OSError:  # text too long to be a path: it is the prompt itself
        is_file = False
    if path.suffix in (".jsonl", ".txt") and not is_file:
        raise ConfigError(f"prompts file '{spec}' not found; give a .jsonl/.txt path or the prompt text itself")
    if not is_file:
        return files, [spec] * len(files), [{} for _ in files], "one prompt for all images"
    # the prompt-set reader (.jsonl: "prompt" + metadata fields; .txt: a prompt per line); "image" names the file
    table = PromptSet._parse(path.read_text(encoding="utf-8"), path.name, str(path), "prompts")
    # videos are named under "video" (alignrl sample's prompts.jsonl names a clip's filmstrip under "image")
    key = "video" if files and all(f.suffix.lower() not in IMAGE_SUFFIXES for f in files) else "image"
    named = [m.get(key) is not None for m in table.metadata]
    if any(named):
        by_name = {str(m.pop(key)): (p, m) for p, m, n in zip(table.prompts, table.metadata, named) if n}
        for m in by_name.values():
            m[1].pop("image" if key == "video" else "video", None)
        skipped = [f.name for f in files if f.name not in by_name]
        files = [f for f in files if f.name in by_name]
        if not files:
            raise ConfigError(f"{path} names none of the images (e.g. '{skipped[0]}'); give each line "
                              f"\"image\": \"<file name>\"")
        if skipped:
            print(f"alignrl: warning: skipping {len(skipped)} image(s) {path.name} does not name "
                  f"(e.g. {skipped[0]})", file=sys.stderr)
        prompts, metadata = [by_name[f.name][0] for f in files], [by_name[f.name][1] for f in files]
    else:
        prompts, metadata = table.prompts, table.metadata
    if len(prompts) != len(files):
        raise ConfigError(f"{path} holds {len(prompts)} prompts for {len(files)} images; give one per image "
                          f"(sorted by file name) or name each image in a .jsonl")
    return files, prompts, metadata, str(path)


def load_image(path: Path) -> torch.Tensor:
    """An image (3, H, W), or a video file's clip (F, 3, H, W), in [0, 1]."""
    from PIL import Image

    from alignrl.imagedata import VIDEO_SUFFIXES

    if path.suffix.lower() in VIDEO_SUFFIXES:
        from alignrl.eval.video import read_mp4

        try:
            frames, _ = read_mp4(path)
        except (OSError, ValueError, IndexError) as e:
            raise ConfigError(f"cannot read video '{path}': {e}") from None
        return torch.from_numpy(frames.astype(np.float32) / 255.0).permute(0, 3, 1, 2)

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except OSError as e:
        raise ConfigError(f"cannot read image '{path}': {e}") from None
    return torch.from_numpy(arr).permute(2, 0, 1)


def reward_check(reward, files: list[Path], prompts: list[str], metadata: list[dict], batch_size: int = 16,
                 progress: bool = True) -> dict:
    """Score every image; returns {"rows": [...], "summary": {reward: stats}} (NaN kept as None)."""
    from alignrl.training.logging import console_progress

    names = list(reward.rewards)
    rows = []
    t0 = time.perf_counter()
    bar = console_progress(len(files), "scoring", "img", enabled=progress)
    i = 0
    while i < len(files):
        # one batch holds consecutive images (or clips) of one size: rewards take (B, 3, H, W) or (B, F, 3, H, W)
        images = [load_image(files[i])]
        j = i + 1
        while j < len(files) and j - i < batch_size:
            nxt = load_image(files[j])
            if nxt.shape != images[0].shape:
                break
            images.append(nxt)
            j += 1
        total, info = reward(torch.stack(images), prompts[i:j], metadata[i:j])
        for k in range(j - i):
            row = {"image": files[i + k].name, "prompt": prompts[i + k], "total": _num(total[k])}  # or a video
            row.update({n: _num(info["per_reward"][n][k]) for n in names})
            rows.append(row)
        bar.update(j - i)
        i = j
    bar.close()
    summary = {}
    for key in ["total", *names] if len(names) > 1 else names:
        vals = np.array([np.nan if r[key] is None else r[key] for r in rows], dtype=np.float64)
        ok = vals[np.isfinite(vals)]
        summary[key] = {"mean": _num(ok.mean()) if ok.size else None, "std": _num(ok.std()) if ok.size else None,
                        "min": _num(ok.min()) if ok.size else None, "max": _num(ok.max()) if ok.size else None,
                        "unscored": int((~np.isfinite(vals)).sum())}
    seconds = time.perf_counter() - t0
    return {"rows": rows, "summary": summary, "weights": dict(reward.weights), "seconds": seconds,
            "images_per_second": len(files) / seconds if seconds > 0 else None}


def _num(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def format_report(report: dict, max_rows: int = 50) -> str:
    from alignrl.eval.report import markdown_table

    names = [k for k in report["rows"][0] if k not in ("image", "prompt")] if report["rows"] else []
    if list(report["weights"]) and len(report["weights"]) == 1:
        names = [n for n in names if n != "total"]
    rows = [{"image": r["image"], "prompt": (r["prompt"][:48] + "...") if len(r["prompt"]) > 51 else r["prompt"],
             **{n: ("nan" if r[n] is None else r[n]) for n in names}} for r in report["rows"][:max_rows]]
    parts = [markdown_table(rows, ["image", "prompt", *names])]
    if len(report["rows"]) > max_rows:
        parts.append(f"... {len(report['rows']) - max_rows} more rows in the JSON report")
    stats = [{"reward": k, **{s: ("-" if v is None else v) for s, v in st.items()}}
             for k, st in report["summary"].items()]
    parts += ["", markdown_table(stats, ["reward", "mean", "std", "min", "max", "unscored"])]
    return "\n".join(parts)


def run(cfg) -> int:
    """The body of ``alignrl reward-check`` (``cfg.check`` and ``cfg.reward``)."""
    from alignrl.components import as_dict
    from alignrl.rewards.base import WeightedReward
    from alignrl.training.checkpoint import atomic_write_text

    check = cfg.check
    batch_size = int(check.get("batch_size") or 16)
    if batch_size < 1:
        raise ConfigError(f"check.batch_size must be >= 1, got {batch_size}")
    files, folder = find_images(check.get("images"))
    files, prompts, metadata, source = pair_prompts(files, folder, check.get("prompts"))
    reward = WeightedReward.from_config(as_dict(cfg.reward))  # after the inputs are known to be good
    report = reward_check(reward, files, prompts, metadata, batch_size, progress=bool(check.get("progress", True)))
    report.update({"images": str(check.get("images")), "prompts": source})
    print(format_report(report))
    out = Path(check.get("out") or folder / "reward_check.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(report, indent=2))
    print(f"alignrl: scored {len(files)} images ({report['images_per_second']:.1f} images/s); report {out}",
          file=sys.stderr)
    return 0
