"""Image grids and Markdown summaries."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def image_grid(images: torch.Tensor | Sequence[Image.Image], captions: Sequence[str] | None = None,
               cols: int | None = None, min_cell: int = 128) -> Image.Image:
    """A grid of images, upscaled (nearest) to at least ``min_cell`` pixels, each with a caption strip."""
    pils = to_pil(images) if isinstance(images, torch.Tensor) else list(images)
    n = len(pils)
    cols = cols or min(n, int(math.ceil(math.sqrt(n))))
    rows = int(math.ceil(n / cols))
    w, h = pils[0].size
    scale = max(1, int(math.ceil(min_cell / max(w, h))))
    cw, ch = w * scale, h * scale
    cap_h = 14 if captions else 0
    grid = Image.new("RGB", (cols * cw, rows * (ch + cap_h)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i, im in enumerate(pils):
        x, y = (i % cols) * cw, (i // cols) * (ch + cap_h)
        grid.paste(im.resize((cw, ch), Image.NEAREST), (x, y))
        if captions:
            text = str(captions[i])
            max_chars = max(4, cw // 6)
            draw.text((x + 2, y + ch + 1), text[:max_chars], fill=(0, 0, 0), font=font)
    return grid


def markdown_table(rows: list[dict], columns: Sequence[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4f}" if np.isfinite(v) else str(v)
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def save_grid(path: Path, images, captions=None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, captions).save(path)
    return path
