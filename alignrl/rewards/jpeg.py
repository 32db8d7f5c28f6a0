"""JPEG (in)compressibility (DDPO): the size of the image saved as JPEG at quality 95, in kB."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from alignrl.rewards.base import Reward, register_reward


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) floats in [0, 1] -> (B, H, W, 3) uint8, rounding as PIL/diffusers do."""
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return arr.permute(0, 2, 3, 1).cpu().numpy()


def jpeg_size_kb(image: np.ndarray, quality: int = 95) -> float:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.tell() / 1000.0


@register_reward("jpeg_incompressibility")
class JpegIncompressibility(Reward):
    sign = 1.0

    def __init__(self, quality: int = 95):
        self.quality = int(quality)

    def __call__(self, images, prompts, metadata):
        sizes = np.array([jpeg_size_kb(im, self.quality) for im in to_uint8(images)], dtype=np.float64)
        return self.sign * sizes, {"size_kb": float(sizes.mean())}


@register_reward("jpeg_compressibility")
class JpegCompressibility(JpegIncompressibility):
    sign = -1.0
