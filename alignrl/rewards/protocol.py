"""Wire protocol between ``alignrl serve-reward`` and the ``remote`` reward (version 1). No pickle.

``POST /score`` takes one of two bodies:

- ``application/json``: ``{"protocol": 1, "prompts": [str], "metadata": [object], "images": [str]}``, each
  image a base64 PNG (8-bit RGB, lossless for uint8 images), all the same size. ``metadata`` may be left
  out (empty dicts).
- ``application/octet-stream``: a safetensors file holding one tensor ``images`` (B, 3, H, W), float32 in
  [0, 1] (exact floats) or uint8, with ``prompts`` and ``metadata`` as JSON strings (and ``protocol``) in
  its ``__metadata__`` header.

The answer is JSON: ``{"protocol": 1, "scores": [float|null], "per_reward": {name: [float|null]},
"per_sample": {key: [float|null]}, "info": {key: float|null}}``; null stands for NaN/inf (could not score).
``info`` holds numbers about the server batch the request was scored in. Errors are
``{"error": "<message>"}`` with a 4xx/5xx status.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

PROTOCOL_VERSION = 1
JSON_TYPE = "application/json"
SAFETENSORS_TYPE = "application/octet-stream"
FORMATS = {"png": JSON_TYPE, "safetensors": SAFETENSORS_TYPE}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors header (prompts and metadata live in it)


class ProtocolError(ValueError):
    """A request or response that does not follow the protocol; ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclass
class ScoreRequest:
    images: torch.Tensor  # (B, 3, H, W), uint8 or float32 in [0, 1]
    prompts: list[str]
    metadata: list[dict]

    def __len__(self) -> int:
        return len(self.prompts)

    def float_images(self) -> torch.Tensor:
        if self.images.dtype == torch.uint8:
            return self.images.float() / 255.0
        return self.images.float()


# ------------------------------------------------------------------------------------------ encoding
def encode_png(image: np.ndarray) -> str:
    """(H, W, 3) uint8 -> base64 PNG."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _json_default(obj: Any):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON-serializable")


def _dumps(obj: Any) -> str:
    return json.dumps(obj, default=_json_default, allow_nan=False, separators=(",", ":"))


def encode_request(images: torch.Tensor, prompts: list[str], metadata: list[dict],
                   fmt: str = "png") -> tuple[bytes, str]:
    """Body and content type of a ``/score`` request; ``fmt`` is ``png`` or ``safetensors``."""
    from alignrl.rewards.jpeg import to_uint8

    metadata = [dict(m or {}) for m in metadata] if metadata else [{} for _ in prompts]
    if fmt == "png":
        body = {"protocol": PROTOCOL_VERSION, "prompts": list(prompts), "metadata": metadata,
                "images": [encode_png(im) for im in to_uint8(images)]}
        return _dumps(body).encode("utf-8"), JSON_TYPE
    if fmt == "safetensors":
        from safetensors.torch import save

        header = {"protocol": str(PROTOCOL_VERSION), "prompts": _dumps(list(prompts)), "metadata": _dumps(metadata)}
        tensor = images.detach().to("cpu", torch.float32).contiguous()
        return save({"images": tensor}, metadata=header), SAFETENSORS_TYPE
    raise ValueError(f"unknown format {fmt!r}; use png or safetensors")


def _finite_list(values) -> list[float | None]:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    return [float(v) if math.isfinite(v) else None for v in arr]


def _number(value) -> float | None:
    v = float(value)
    return v if math.isfinite(v) else None


def is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) or (
        isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "biuf")


def encode_response(scores, per_reward: dict, per_sample: dict, info: dict) -> dict:
    """The JSON answer to one request (NaN/inf become null; non-numeric info is left out)."""
    return {"protocol": PROTOCOL_VERSION, "scores": _finite_list(scores),
            "per_reward": {k: _finite_list(v) for k, v in per_reward.items()},
            "per_sample": {k: _finite_list(v) for k, v in per_sample.items()},
            "info": {k: _number(v) for k, v in info.items() if is_number(v)}}


# ------------------------------------------------------------------------------------------ decoding
def _check_lists(prompts, metadata, n_images: int) -> tuple[list[str], list[dict]]:
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ProtocolError("'prompts' must be a list of strings")
    if metadata is None:
        metadata = [{} for _ in prompts]
    if not isinstance(metadata, list) or not all(isinstance(m, dict) for m in metadata):
        raise ProtocolError("'metadata' must be a list of objects (one per image)")
    if not (len(prompts) == len(metadata) == n_images):
        raise ProtocolError(f"lengths differ: {n_images} images, {len(prompts)} prompts, {len(metadata)} metadata; "
                            "send one prompt and one metadata object per image")
    return prompts, metadata


def _check_count(n: int, max_images: int) -> None:
    if n == 0:
        raise ProtocolError("no images in the request")
    if n > max_images:
        raise ProtocolError(f"{n} images exceed the server's max_batch={max_images}; send at most {max_images} "
                            "per request (reward.remote.batch_size)", status=413)


def decode_png(data: str, index: int, max_pixels: int) -> np.ndarray:
    """One base64 PNG -> (H, W, 3) uint8; the size is checked before the pixels are decoded."""
    if not isinstance(data, str):
        raise ProtocolError(f"images[{index}] must be a base64 string")
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(f"images[{index}] is not valid base64") from None
    try:
        im = Image.open(io.BytesIO(raw), formats=["PNG"])
    except Image.DecompressionBombError:
        raise ProtocolError(f"images[{index}] is too large", status=413) from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise ProtocolError(f"images[{index}] is not a PNG image") from None
    w, h = im.size
    if w * h > max_pixels or w < 1 or h < 1:
        raise ProtocolError(f"images[{index}] is {w}x{h}, over the server's max_image_pixels={max_pixels}", status=413)
    if im.mode not in ("RGB", "RGBA", "L", "LA", "P"):
        raise ProtocolError(f"images[{index}] has PNG mode {im.mode}; send 8-bit RGB")
    try:
        return np.asarray(im.convert("RGB"))
    except (OSError, ValueError, SyntaxError):
        raise ProtocolError(f"images[{index}] is a damaged PNG") from None


def _decode_json(body: bytes, max_images: int, max_pixels: int) -> ScoreRequest:
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError(f"body is not valid JSON ({e})", status=400) from None
    if not isinstance(obj, dict):
        raise ProtocolError("body must be a JSON object with prompts, metadata and images")
    _check_protocol(obj.get("protocol", PROTOCOL_VERSION))
    images = obj.get("images")
    if not isinstance(images, list):
        raise ProtocolError("'images' must be a list of base64 PNG strings")
    _check_count(len(images), max_images)
    prompts, metadata = _check_lists(obj.get("prompts"), obj.get("metadata"), len(images))
    arrays = [decode_png(s, i, max_pixels) for i, s in enumerate(images)]
    sizes = {a.shape for a in arrays}
    if len(sizes) > 1:
        raise ProtocolError(f"images differ in size ({', '.join(f'{s[1]}x{s[0]}' for s in sorted(sizes))}); "
                            "send one size per request")
    tensor = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return ScoreRequest(tensor, prompts, metadata)


def _check_protocol(version) -> None:
    try:
        ok = int(version) == PROTOCOL_VERSION
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ProtocolError(f"protocol version {version!r} is not supported; this server speaks {PROTOCOL_VERSION}")


def _decode_safetensors(body: bytes, max_images: int, max_pixels: int) -> ScoreRequest:
    if len(body) < 8:
        raise ProtocolError("body is too short for a safetensors file", status=400)
    n = int.from_bytes(body[:8], "little")
    if n > min(len(body) - 8, MAX_HEADER_BYTES):
        raise ProtocolError("safetensors header length is larger than the body", status=400)
    try:
        header = json.loads(body[8:8 + n])
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError("safetensors header is not valid JSON", status=400) from None
    if not isinstance(header, dict):
        raise ProtocolError("safetensors header is not an object", status=400)
    meta = header.pop("__metadata__", None) or {}
    if set(header) != {"images"}:
        raise ProtocolError(f"safetensors body must hold exactly one tensor 'images', found {sorted(header)}")
    spec = header["images"]
    shape = spec.get("shape") if isinstance(spec, dict) else None
    if not isinstance(shape, list) or len(shape) != 4 or shape[1] != 3:
        raise ProtocolError(f"'images' must have shape (B, 3, H, W), got {shape}")
    if spec.get("dtype") not in ("F32", "U8"):
        raise ProtocolError(f"'images' must be float32 or uint8, got {spec.get('dtype')}")
    _check_count(int(shape[0]), max_images)
    if shape[2] * shape[3] > max_pixels:
        raise ProtocolError(f"images are {shape[3]}x{shape[2]}, over the server's max_image_pixels={max_pixels}",
                            status=413)
    _check_protocol(meta.get("protocol", PROTOCOL_VERSION))
    try:
        prompts = json.loads(meta.get("prompts", "null"))
        metadata = json.loads(meta.get("metadata", "null"))
    except (TypeError, ValueError):
        raise ProtocolError("prompts/metadata in the safetensors header are not valid JSON") from None
    prompts, metadata = _check_lists(prompts, metadata, int(shape[0]))
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        images = load(body)["images"]
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise ProtocolError(f"safetensors body cannot be read: {e}", status=400) from None
    if images.dtype == torch.float32 and not torch.isfinite(images).all():
        raise ProtocolError("images contain NaN or inf")
    if images.dtype == torch.float32 and images.numel() and (images.min() < 0 or images.max() > 1):
        raise ProtocolError("float32 images must lie in [0, 1]")
    return ScoreRequest(images, prompts, metadata)


def decode_request(body: bytes, content_type: str, *, max_images: int, max_pixels: int) -> ScoreRequest:
    """Parse and check a ``/score`` body; raises ``ProtocolError`` with the status to answer."""
    if content_type == JSON_TYPE:
        return _decode_json(body, max_images, max_pixels)
    if content_type == SAFETENSORS_TYPE:
        return _decode_safetensors(body, max_images, max_pixels)
    raise ProtocolError(f"content type {content_type!r} is not supported; send {JSON_TYPE} (PNG images) or "
                        f"{SAFETENSORS_TYPE} (safetensors)", status=415)


def _floats(values, n: int, what: str) -> np.ndarray:
    if not isinstance(values, list) or len(values) != n:
        raise ProtocolError(f"'{what}' must be a list of {n} numbers")
    try:
        return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        raise ProtocolError(f"'{what}' holds something other than numbers and null") from None


def decode_response(obj: Any, n: int) -> tuple[np.ndarray, dict, dict, dict]:
    """A ``/score`` answer for ``n`` images -> (scores, per_reward, per_sample, info); null -> NaN."""
    if not isinstance(obj, dict) or "scores" not in obj:
        raise ProtocolError("answer is not a score response (no 'scores')")
    scores = _floats(obj["scores"], n, "scores")
    groups = []
    for key in ("per_reward", "per_sample"):
        part = obj.get(key) or {}
        if not isinstance(part, dict):
            raise ProtocolError(f"'{key}' must be an object")
        groups.append({str(k): _floats(v, n, f"{key}.{k}") for k, v in part.items()})
    info = obj.get("info") or {}
    if not isinstance(info, dict):
        raise ProtocolError("'info' must be an object")
    numbers = {str(k): (np.nan if v is None else float(v)) for k, v in info.items()
               if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))}
    return scores, groups[0], groups[1], numbers
