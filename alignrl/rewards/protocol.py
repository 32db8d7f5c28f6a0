"""Wire protocol between ``alignrl serve-reward`` and the ``remote`` reward (version 1). No pickle.

``POST /score`` takes one of two bodies:

- ``application/json``: ``{"protocol": 1, "prompts": [str], "metadata": [object], "images": [str]}``, each
  image a base64 PNG (8-bit RGB, lossless for uint8 images), all the same size. ``metadata`` may be left
  out (empty dicts).
- ``application/octet-stream``: a safetensors file holding one tensor ``images`` (B, 3, H, W), or videos
  (B, F, 3, H, W), float32 in [0, 1] (exact floats) or uint8, with ``prompts`` and ``metadata`` as JSON strings
  (and ``protocol``) in its ``__metadata__`` header. Videos travel only this way; one prompt per clip. The
  server's limits count clips against ``max_batch`` and every frame's pixels against the pixel limits.

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
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from alignrl.errors import ConfigError

PROTOCOL_VERSION = 1
JSON_TYPE = "application/json"
SAFETENSORS_TYPE = "application/octet-stream"
FORMATS = {"png": JSON_TYPE, "safetensors": SAFETENSORS_TYPE}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors header (prompts and metadata live in it)


TOKEN_ENV = "ALIGNRL_REWARD_TOKEN"


def read_token_file(path, option: str) -> str:
    """The bearer token held in a file (kept out of ``ps`` and shell history); ``option`` names the setting."""
    file = Path(str(path)).expanduser()
    try:
        text = file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{option}={file}: cannot read the token file ({getattr(e, 'strerror', None) or e}); "
                          "point it at a file holding only the token") from None
    if not text:
        raise ConfigError(f"{option}={file} is empty; write the token into it")
    if len(text.split()) != 1 or not text.isascii() or not text.isprintable():
        raise ConfigError(f"{option}={file} holds more than one word or unprintable characters; write only the token")
    return text


class ProtocolError(ValueError):
    """A request or response that does not follow the protocol; ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclass
class ScoreRequest:
    images: torch.Tensor  # (B, 3, H, W) or videos (B, F, 3, H, W), uint8 or float32 in [0, 1]
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
    if images.ndim == 5 and fmt == "png":
        raise ValueError("videos travel as safetensors, not PNG: set the remote reward's format=safetensors")
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
# Every size a request declares (image count, PNG header sizes, the safetensors shape and offsets) is checked
# against the server's limits before anything is decoded or allocated: a small body must not cost gigabytes.
ST_DTYPES = {"F32": (torch.float32, 4), "U8": (torch.uint8, 1)}


@dataclass
class Limits:
    """What one ``/score`` request may declare (``serve.max_batch``, ``max_image_pixels``, ``max_request_pixels``)."""

    max_images: int
    max_pixels: int  # per image
    max_request_pixels: int | None = None  # decoded pixels, summed over the request's images; None: no limit


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


def _check_size(what: str, n: int, height: int, width: int, limits: Limits) -> None:
    """Refuse zero-sized images (422) and sizes over the server's pixel limits (413), before decoding; ``n``
    counts images, or every frame of every clip."""
    if height < 1 or width < 1:
        raise ProtocolError(f"{what} is {width}x{height}: zero-sized; send images of at least 1x1 pixels")
    if height * width > limits.max_pixels:
        raise ProtocolError(f"{what} is {width}x{height}, over the server's max_image_pixels={limits.max_pixels}",
                            status=413)
    total = n * height * width
    if limits.max_request_pixels is not None and total > limits.max_request_pixels:
        raise ProtocolError(f"the request decodes to {total} pixels ({n} images of {width}x{height}), over the "
                            f"server's serve.max_request_pixels={limits.max_request_pixels}; send fewer images per "
                            "request (reward.remote.batch_size)", status=413)


def _check_protocol(version, *, text: bool = False) -> None:
    """JSON bodies carry the integer 1 (not true, "1" or 1.0); a safetensors header holds only strings: "1"."""
    if text:
        number = int(version) if isinstance(version, str) and version.isascii() and version.isdigit() else None
    else:
        number = version if type(version) is int else None
    if number is None:
        want = f'the string "{PROTOCOL_VERSION}"' if text else f"the integer {PROTOCOL_VERSION}"
        simple = isinstance(version, (str, int, float, bool, type(None)))
        shown = json.dumps(version) if simple else type(version).__name__
        raise ProtocolError(f"'protocol' must be {want}, got {shown[:40]}")
    if number != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {number} is not supported; this server speaks {PROTOCOL_VERSION}")


@dataclass
class PendingRequest:
    """A request whose declared sizes passed the checks; ``decode()`` does the expensive part."""

    n: int
    height: int
    width: int
    prompts: list[str]
    metadata: list[dict]
    _decode: Any
    frames: int = 1  # frames per clip (1: images)

    @property
    def pixels(self) -> int:
        """Decoded pixels (per channel-triple) the request will hold: what the server's budget counts."""
        return self.n * self.frames * self.height * self.width

    def decode(self) -> ScoreRequest:
        return ScoreRequest(self._decode(), self.prompts, self.metadata)


def open_png(data: str, index: int) -> Image.Image:
    """One base64 PNG, opened lazily: its size and mode are known, its pixels not yet decoded."""
    if not isinstance(data, str):
        raise ProtocolError(f"images[{index}] must be a base64 string")
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(f"images[{index}] is not valid base64") from None
    if not raw:
        raise ProtocolError(f"images[{index}] is empty; send a PNG image")
    try:
        im = Image.open(io.BytesIO(raw), formats=["PNG"])
    except Image.DecompressionBombError:
        raise ProtocolError(f"images[{index}] is too large", status=413) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise ProtocolError(f"images[{index}] is not a PNG image") from None
    if im.mode not in ("RGB", "RGBA", "L", "LA", "P"):
        raise ProtocolError(f"images[{index}] has PNG mode {im.mode}; send 8-bit RGB")
    return im


def _png_pixels(im: Image.Image, index: int, out: np.ndarray) -> None:
    """Decode one opened PNG into ``out`` (H, W, 3) uint8."""
    try:
        im.load()
        out[...] = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    except (OSError, ValueError, SyntaxError, EOFError):
        raise ProtocolError(f"images[{index}] is a damaged PNG") from None
    finally:
        im.close()


def decode_png(data: str, index: int, max_pixels: int) -> np.ndarray:
    """One base64 PNG -> (H, W, 3) uint8; the size is checked before the pixels are decoded."""
    im = open_png(data, index)
    w, h = im.size
    _check_size(f"images[{index}]", 1, h, w, Limits(1, max_pixels))
    out = np.empty((h, w, 3), np.uint8)
    _png_pixels(im, index, out)
    return out


def _inspect_json(body: bytes, limits: Limits) -> PendingRequest:
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
    _check_count(len(images), limits.max_images)
    prompts, metadata = _check_lists(obj.get("prompts"), obj.get("metadata"), len(images))
    opened = []
    for i, s in enumerate(images):  # headers only: sizes are known before any pixel is decoded
        opened.append(open_png(s, i))
        images[i] = None  # the base64 text is no longer needed
        w, h = opened[-1].size
        _check_size(f"images[{i}]", 1, h, w, limits)
    sizes = {im.size for im in opened}
    if len(sizes) > 1:
        for im in opened:
            im.close()
        raise ProtocolError(f"images differ in size ({', '.join(f'{w}x{h}' for w, h in sorted(sizes))}); "
                            "send one size per request")
    (w, h), = sizes
    _check_size("each image", len(opened), h, w, limits)

    def decode() -> torch.Tensor:
        out = np.empty((len(opened), h, w, 3), np.uint8)  # filled in place: no per-image copies kept
        for i, im in enumerate(opened):
            _png_pixels(im, i, out[i])
        return torch.from_numpy(out).permute(0, 3, 1, 2)  # (B, 3, H, W), a view

    return PendingRequest(len(opened), h, w, prompts, metadata, decode)


def _is_count(value) -> bool:
    return type(value) is int and value >= 0  # not a bool, a float or a string


def _inspect_safetensors(body: bytes, limits: Limits) -> PendingRequest:
    if len(body) < 8:
        raise ProtocolError("body is too short for a safetensors file", status=400)
    n = int.from_bytes(body[:8], "little")
    if n > min(len(body) - 8, MAX_HEADER_BYTES):
        raise ProtocolError("safetensors header length is larger than the body", status=400)
    try:
        header = json.loads(bytes(body[8:8 + n]))
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError("safetensors header is not valid JSON", status=400) from None
    if not isinstance(header, dict):
        raise ProtocolError("safetensors header is not an object", status=400)
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ProtocolError("safetensors __metadata__ must map strings to strings", status=400)
    if set(header) != {"images"}:
        raise ProtocolError(f"safetensors body must hold exactly one tensor 'images', found {sorted(header)[:8]}")
    spec = header["images"]
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
        raise ProtocolError("safetensors tensor 'images' must have exactly dtype, shape and data_offsets", status=400)
    dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if not isinstance(dtype, str) or dtype not in ST_DTYPES:
        raise ProtocolError(f"'images' must be float32 or uint8 (F32 or U8), got {str(dtype)[:20]}")
    if not isinstance(shape, list) or len(shape) not in (4, 5) or not all(_is_count(s) for s in shape) \
            or shape[-3] != 3:
        raise ProtocolError(f"'images' must have shape (B, 3, H, W), or (B, F, 3, H, W) for videos, of non-negative "
                            f"integers, got {json.dumps(shape)[:80]}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise ProtocolError(f"safetensors data_offsets must be two non-negative integers, got "
                            f"{json.dumps(offsets)[:80]}", status=400)
    video = len(shape) == 5
    b, f, h, w = (shape[0], shape[1], shape[3], shape[4]) if video else (shape[0], 1, shape[2], shape[3])
    _check_count(b, limits.max_images)
    if video and f < 1:
        raise ProtocolError("videos have no frames; send clips of at least 1 frame")
    _check_size("each frame" if video else "each image", b * f, h, w, limits)  # bounded ints from here on
    torch_dtype, itemsize = ST_DTYPES[dtype]
    nbytes = b * f * 3 * h * w * itemsize
    data_bytes = len(body) - 8 - n
    if offsets != [0, nbytes] or data_bytes != nbytes:
        raise ProtocolError(f"safetensors data_offsets {offsets} and the body's {data_bytes} data bytes do not match "
                            f"shape {shape} of {dtype} ({nbytes} bytes)", status=400)
    _check_protocol(meta.get("protocol", str(PROTOCOL_VERSION)), text=True)
    try:
        prompts = json.loads(meta.get("prompts", "null"))
        metadata = json.loads(meta.get("metadata", "null"))
    except (TypeError, ValueError, RecursionError):
        raise ProtocolError("prompts/metadata in the safetensors header are not valid JSON") from None
    prompts, metadata = _check_lists(prompts, metadata, b)
    start = 8 + n

    def decode() -> torch.Tensor:
        data = np.frombuffer(body, dtype=np.uint8 if itemsize == 1 else "<f4", count=b * f * 3 * h * w,
                             offset=start)
        if isinstance(body, bytearray) and sys.byteorder == "little" and start % itemsize == 0:
            images = torch.from_numpy(data)  # a view of the (writable) body: no copy
        else:
            images = torch.from_numpy(data.astype(data.dtype.newbyteorder("="), copy=True))
        images = images.view(b, f, 3, h, w) if video else images.view(b, 3, h, w)
        if torch_dtype == torch.float32:
            if not torch.isfinite(images).all():
                raise ProtocolError("images contain NaN or inf")
            if images.min() < 0 or images.max() > 1:
                raise ProtocolError("float32 images must lie in [0, 1]")
        return images

    return PendingRequest(b, h, w, prompts, metadata, decode, f)


def inspect_request(body: bytes | bytearray, content_type: str, limits: Limits) -> PendingRequest:
    """Parse a ``/score`` body and check every declared size against ``limits`` without decoding any pixels;
    raises ``ProtocolError`` with the status to answer. ``.decode()`` on the result gives the ``ScoreRequest``."""
    if content_type == JSON_TYPE:
        return _inspect_json(body, limits)
    if content_type == SAFETENSORS_TYPE:
        return _inspect_safetensors(body, limits)
    raise ProtocolError(f"content type {content_type!r} is not supported; send {JSON_TYPE} (PNG images) or "
                        f"{SAFETENSORS_TYPE} (safetensors)", status=415)


def decode_request(body: bytes | bytearray, content_type: str, *, max_images: int, max_pixels: int,
                   max_request_pixels: int | None = None) -> ScoreRequest:
    """Parse, check and decode a ``/score`` body; raises ``ProtocolError`` with the status to answer."""
    return inspect_request(body, content_type, Limits(max_images, max_pixels, max_request_pixels)).decode()


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
