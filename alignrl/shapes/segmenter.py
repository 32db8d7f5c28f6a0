"""A small convolutional net that reads a ShapeWorld image as the exact judge does, pixel by pixel: for each
pixel, background or one of the 12 (colour, shape) classes of :data:`alignrl.shapes.judge.CLASSES`. It is the
shape-aware part of the differentiable surrogate ``shapes_seg`` (the colour-threshold surrogate ``shapes_soft``
cannot tell a circle from a square).

It is distilled from the judge: ``scripts/train_shapes_segmenter.py`` labels images with
:func:`alignrl.shapes.judge.label_map` (the judge's own colour masks, components and shape classes, on the image
as given) and trains the net to predict those labels. The images are the shipped ShapeWorld model's own samples of
training prompts (the distribution a policy starts from) and renders of the world with blur and noise (every
colour-shape pair, held-out ones included, which the model seldom draws). The weights ship inside the package
(``alignrl/shapes/segmenter``, 191 kB), with the command and the measured accuracy in ``training_info.json``.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from alignrl.shapes.judge import CLASSES

NUM_CLASSES = 1 + len(CLASSES)
WEIGHTS = "model.safetensors"
INFO = "training_info.json"


class Segmenter(nn.Module):
    """(B, 3, H, W) images in [0, 1] -> (B, 13, H, W) logits. Six 3x3 convolutions (dilations 1, 1, 2, 4, 2, 1:
    a 23-pixel receptive field, over the largest object of 11) with residual connections, then a 1x1 head."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Conv2d(width, width, 3, padding=d, dilation=d) for d in (1, 2, 4, 2, 1))
        self.head = nn.Conv2d(width, NUM_CLASSES, 1)
        self.width = width

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = nn.functional.gelu(self.stem(images * 2 - 1))
        for conv in self.blocks:
            h = h + nn.functional.gelu(conv(h))
        return self.head(h)


def default_dir() -> Path:
    return Path(str(resources.files("alignrl.shapes") / "segmenter"))


def save(model: Segmenter, folder: Path, info: dict) -> None:
    from safetensors.torch import save_file

    from alignrl.training.checkpoint import atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (WEIGHTS + ".tmp")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp),
              metadata={"width": str(model.width)})
    tmp.chmod(0o644)
    tmp.replace(folder / WEIGHTS)
    atomic_write_text(folder / INFO, json.dumps(info, indent=2) + "\n")


_CACHE: dict[str, Segmenter] = {}


def load(folder: str | Path | None = None) -> Segmenter:
    """The trained segmenter (the package's unless ``folder`` names another), frozen, in eval mode; cached."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from alignrl.errors import ConfigError

    path = Path(folder) if folder else default_dir()
    key = str(path.resolve())
    if key not in _CACHE:
        weights = path / WEIGHTS
        if not weights.is_file():
            raise ConfigError(f"no ShapeWorld segmenter at {weights}; train one with "
                              f"python scripts/train_shapes_segmenter.py --out {path}")
        with safe_open(str(weights), "pt") as f:
            width = int((f.metadata() or {}).get("width", 32))
        model = Segmenter(width)
        model.load_state_dict(load_file(str(weights)))
        model.eval().requires_grad_(False)
        _CACHE[key] = model
    return _CACHE[key]
