"""Image grids and Markdown summaries."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Images (B, 3, H, W) in [0, 1] as PIL images; videos (B, F, 3, H, W) as one filmstrip each (the frames side
    by side, left to right)."""
    if images.ndim == 5:
        from alignrl.eval.video import filmstrips

        images = filmstrips(images)
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


CAPTION_MAX_LINES = 6


def wrap_text(text: str, max_width: float, measure, max_lines: int = CAPTION_MAX_LINES) -> list[str]:
    """``text`` broken into lines no wider than ``max_width`` (as ``measure(str)`` gives widths): at spaces,
    and inside a word longer than a line. Past ``max_lines`` the last line ends with '...'."""
    lines: list[str] = []
    for word in str(text).split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and measure(candidate) <= max_width:
            lines[-1] = candidate
            continue
        while measure(word) > max_width and len(word) > 1:  # a word wider than a line: break it
            cut = 1
            while cut < len(word) and measure(word[:cut + 1]) <= max_width:
                cut += 1
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and measure(last + "...") > max_width:
            last = last[:-1]
        lines = lines[:max_lines - 1] + [last.rstrip() + "..."]
    return lines


def image_grid(images: torch.Tensor | Sequence[Image.Image], captions: Sequence[str] | None = None,
               cols: int | None = None, min_cell: int = 128,
               max_caption_lines: int = CAPTION_MAX_LINES) -> Image.Image:
    """A grid of images, upscaled (nearest) to at least ``min_cell`` pixels, each with its caption wrapped to
    the cell width below it (at most ``max_caption_lines`` lines; the strip is as tall as the longest caption)."""
    pils = to_pil(images) if isinstance(images, torch.Tensor) else list(images)
    n = len(pils)
    cols = cols or min(n, int(math.ceil(math.sqrt(n))))
    rows = int(math.ceil(n / cols))
    w, h = pils[0].size
    scale = max(1, int(math.ceil(min_cell / max(w, h))))
    cw, ch = w * scale, h * scale
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
    wrapped = [wrap_text(str(c), cw - 4, lambda t: measure(t, font=font), max_caption_lines)
               for c in captions[:n]] if captions else []
    left, top, right, bottom = font.getbbox("Ag|")
    line_h = bottom - min(top, 0) + 2
    cap_h = (max(map(len, wrapped), default=0) * line_h + 3) if wrapped else 0
    grid = Image.new("RGB", (cols * cw, rows * (ch + cap_h)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, im in enumerate(pils):
        x, y = (i % cols) * cw, (i // cols) * (ch + cap_h)
        grid.paste(im.resize((cw, ch), Image.NEAREST), (x, y))
        for j, line in enumerate(wrapped[i] if i < len(wrapped) else []):
            draw.text((x + 2, y + ch + 1 + j * line_h), line, fill=(0, 0, 0), font=font)
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


def line_plot(series: dict[str, list[tuple[float, float]]], path: Path, xlabel: str, ylabel: str,
              title: str = "", size: tuple[int, int] = (720, 440), y_range: tuple[float, float] | None = None) -> Path:
    """A simple line plot (one line per series, with a legend) drawn with PIL, saved as PNG."""
    palette = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
               (227, 119, 194), (127, 127, 127)]
    w, h = size
    left, right, top, bottom = 60, 20, 30, 50
    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    xs = [x for pts in series.values() for x, _ in pts] or [0, 1]
    ys = [y for pts in series.values() for _, y in pts] or [0, 1]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = y_range or (min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1)

    def to_px(x, y):
        return (left + (x - x0) / (x1 - x0) * (w - left - right), h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom))

    draw.rectangle([left, top, w - right, h - bottom], outline=(0, 0, 0))
    for i in range(6):
        fy = y0 + (y1 - y0) * i / 5
        _, py = to_px(x0, fy)
        draw.line([left, py, w - right, py], fill=(230, 230, 230))
        draw.text((4, py - 5), f"{fy:.2f}", fill=(0, 0, 0), font=font)
        fx = x0 + (x1 - x0) * i / 5
        px, _ = to_px(fx, y0)
        draw.text((px - 10, h - bottom + 5), f"{fx:.0f}", fill=(0, 0, 0), font=font)
    draw.text((w // 2 - 40, h - 20), xlabel, fill=(0, 0, 0), font=font)
    draw.text((4, 8), f"{ylabel}   {title}", fill=(0, 0, 0), font=font)
    for i, (name, pts) in enumerate(series.items()):
        color = palette[i % len(palette)]
        px = [to_px(x, y) for x, y in sorted(pts)]
        if len(px) > 1:
            draw.line(px, fill=color, width=2)
        for p in px:
            draw.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=color)
        draw.text((left + 10, top + 8 + 14 * i), f"- {name}", fill=color, font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def write_doc_section(doc: Path, begin: str, end: str, heading: str, section: str) -> None:
    """Replace the text between the ``begin``/``end`` markers of ``doc`` with ``section`` (which carries the
    markers), or append it under ``## heading`` when the markers are not there yet."""
    doc = Path(doc)
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        text = text[:text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + f"\n\n## {heading}\n\n" + section + "\n"
    doc.write_text(text)
