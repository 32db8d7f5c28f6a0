"""Image datasets beside prompt sets: preference pairs, ranked lists, labelled images, image-caption sets.

The offline methods (Diffusion-DPO, KTO, SmPO, RankDPO, DRO's experts, DDO's data, SFT) train on images rather
than rollouts. A dataset is a JSON-lines file, one row per line, with image paths relative to the file's folder
(or ``root``). ``alignrl data`` writes these files from a reward; a user's own data needs only the fields below.

========  ============================================================================================
kind      fields of a row
========  ============================================================================================
pairs     ``prompt``, ``winner``, ``loser`` (image paths); or the Pick-a-Pic layout ``caption``,
          ``image_0``, ``image_1``, ``label_0`` (1: image_0 preferred, 0: image_1, 0.5: a tie, dropped
          when ``drop_ties``); optional ``score_0``/``score_1`` or ``winner_score``/``loser_score``
          (reward scores, for SmPO's soft labels)
lists     ``prompt``, ``images`` (two or more paths), ``scores`` (one finite number per image, higher
          is better)
labels    ``prompt``, ``image``, ``label`` (1 or true: desirable, 0 or false: undesirable)
captions  ``prompt`` (or ``caption``), ``image``; optional ``score`` (the reward of the image: with
          ``min_score`` set, rows scored below it are left out, e.g. failing images of a best-of-K set)
========  ============================================================================================

``validate()`` reads every row and every image header before training starts; bad data (a missing or
unreadable image, a label out of range, a missing prompt) is a one-line ``ConfigError`` naming the file, the line
and the fix. Pairs are stored winner first.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from alignrl.errors import ConfigError

KINDS = ("pairs", "lists", "labels", "captions")


@dataclass
class ImageRow:
    prompt: str
    images: list[Path]  # pairs: [winner, loser]; lists: k images; labels and captions: one
    scores: list[float] | None = None  # lists: label scores; pairs: reward scores when given (winner first)
    label: float | None = None  # labels: 1.0 desirable, 0.0 undesirable
    where: str = ""  # "<file>:<line>" for messages
    stratum: object = None  # the row's value of data.offline.balance (e.g. its tag), when balancing


@dataclass
class ImageDataset:
    kind: str
    rows: list[ImageRow]
    source: str
    dropped_ties: int = 0
    below_min_score: int = 0  # captions rows left out by min_score
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def prompts(self) -> list[str]:
        return [r.prompt for r in self.rows]

    @classmethod
    def load(cls, path, kind: str, *, root=None, drop_ties: bool = True, what: str = "data.offline",
             balance: str | None = None, min_score: float | None = None) -> "ImageDataset":
        """Parse a JSON-lines dataset of ``kind`` (rows only; ``validate`` opens the images). With ``balance`` (a
        field name such as ``tag``) each row keeps that field's value as its ``stratum``; a row without it is a
        one-line error. With ``min_score`` (captions only) a row whose ``score`` is below it is left out; a row
        without a score is a one-line error."""
        if balance is not None and (not isinstance(balance, str) or not balance.strip()):
            raise ConfigError(f"{what}.balance={balance!r}: give a field of the dataset's rows (e.g. tag) or null")
        if kind not in KINDS:
            raise ConfigError(f"{what}.kind='{kind}' is not known; use one of {', '.join(KINDS)}")
        if min_score is not None:
            if kind != "captions":
                raise ConfigError(f"{what}.min_score applies to captions datasets (SFT, DRO's experts, DDO's data); "
                                  f"this method reads {kind}: set {what}.min_score=null")
            if isinstance(min_score, bool) or not isinstance(min_score, (int, float)) or not math.isfinite(min_score):
                raise ConfigError(f"{what}.min_score={min_score!r}: give a number (rows scored below it are left "
                                  f"out) or null")
        if path is None or not str(path).strip() or str(path).strip() == "???":
            raise ConfigError(f"{what}.path is not set; pass {what}.path=<a .jsonl dataset> (make one with `alignrl data "
                              f"out=<dir> kind={kind}`; alignrl/imagedata.py lists the fields)")
        file = Path(str(path)).expanduser()
        if not file.is_file():
            raise ConfigError(f"{what}.path='{path}' is not a file; give the .jsonl a dataset was written to "
                              f"(`alignrl data` writes one)")
        base = Path(str(root)).expanduser() if root else file.parent
        rows, ties, below = [], 0, 0
        for raw, where in json_rows(file, kind):
            row = _parse_row(raw, kind, base, where, drop_ties)
            if row is None:
                ties += 1
                continue
            if min_score is not None:
                if "score" not in raw:
                    raise ConfigError(f"{where}: {what}.min_score={min_score}, but the row has no \"score\"; score "
                                      f"every row (`alignrl data kind=captions` does) or set {what}.min_score=null")
                if _number(raw["score"], "score", where) < min_score:
                    below += 1
                    continue
            if balance is not None:
                value = raw.get(balance)
                if value is None or isinstance(value, (dict, list)):
                    raise ConfigError(f"{where}: {what}.balance={balance}, but the row has no \"{balance}\" value to "
                                      f"balance over; add it to every row or set {what}.balance=null")
                row.stratum = value
            rows.append(row)
        if not rows:
            why = [f"{ties} ties dropped"] * bool(ties) + [f"{below} scored below {what}.min_score={min_score}"] * bool(below)
            raise ConfigError(f"{what}: '{file}' holds no usable {kind} rows" + (f" ({'; '.join(why)})" if why else ""))
        if kind == "lists":
            k = len(rows[0].images)
            other = next((r for r in rows if len(r.images) != k), None)
            if other is not None:
                raise ConfigError(f"{other.where}: {len(other.images)} images where the first row has {k}; every "
                                  f"list of a dataset must have the same length")
        return cls(kind, rows, str(file), ties, below)

    def validate(self) -> dict:
        """Open every image's header (size, mode); a one-line error at the first bad one. Returns counts."""
        from PIL import Image, UnidentifiedImageError

        sizes: dict[tuple, int] = {}
        for row in self.rows:
            for img in row.images:
                if not img.is_file():
                    raise ConfigError(f"{row.where}: image '{img}' does not exist (paths are relative to the "
                                      f"dataset file's folder, or to data.offline.root)")
                if img.suffix.lower() in VIDEO_SUFFIXES:  # a video: its container and stream header
                    size = _video_size(img, row.where)
                    sizes[size] = sizes.get(size, 0) + 1
                    continue
                try:
                    with Image.open(img) as im:
                        im.verify()
                        sizes[im.size] = sizes.get(im.size, 0) + 1
                except (UnidentifiedImageError, OSError, SyntaxError) as e:
                    raise ConfigError(f"{row.where}: image '{img}' cannot be read as an image ({e}); replace or "
                                      f"remove the row") from None
        self.stats = {"rows": len(self.rows), "images": sum(sizes.values()), "dropped_ties": self.dropped_ties,
                      "below_min_score": self.below_min_score,
                      "sizes": {f"{w}x{h}": n for (w, h), n in sorted(sizes.items())}}
        if self.kind == "labels":
            self.stats["desirable"] = sum(1 for r in self.rows if r.label == 1.0)
        return self.stats


def load_image_tensor(path: Path, resolution: int):
    """An image as a (3, resolution, resolution) float tensor in [-1, 1]: resized on its short side and
    centre-cropped (the VAE's input range)."""
    import torch
    from PIL import Image

    with Image.open(path) as im:
        arr = _fit(im.convert("RGB"), resolution, resolution)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _fit(im, height: int, width: int):
    """A PIL image resized (bicubic) until it covers ``height`` x ``width``, centre-cropped to it, as an
    (height, width, 3) float32 array in [-1, 1]."""
    import numpy as np
    from PIL import Image

    w, h = im.size
    s = max(height / h, width / w)
    im = im.resize((max(width, round(w * s)), max(height, round(h * s))), Image.Resampling.BICUBIC)
    w, h = im.size
    left, top = (w - width) // 2, (h - height) // 2
    return np.asarray(im.crop((left, top, left + width, top + height)), dtype=np.float32) / 127.5 - 1.0


VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv")


def _video_size(path: Path, where: str) -> tuple[int, int]:
    """(width, height) of a video file's first video stream; a one-line error when it has none or cannot open."""
    from alignrl.errors import ConfigError

    try:
        import av

        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            return int(stream.codec_context.width), int(stream.codec_context.height)
    except (IndexError, OSError, ValueError) as e:
        raise ConfigError(f"{where}: video '{path}' cannot be read ({e}); replace or remove the row") from None


def load_video_tensor(path: Path, height: int, width: int, frames: int):
    """A video as a (frames, 3, height, width) float tensor in [-1, 1]: each frame resized on its short side and
    centre-cropped. The clip must hold exactly ``frames`` frames (the video backbone's ``num_frames``)."""
    import numpy as np
    import torch
    from PIL import Image

    from alignrl.errors import ConfigError
    from alignrl.eval.video import read_mp4

    raw, _ = read_mp4(path)
    if raw.shape[0] != frames:
        raise ConfigError(f"{path}: {raw.shape[0]} frames, the backbone samples {frames}; cut the clips to "
                          f"{frames} frames or set backbone.num_frames={raw.shape[0]} (if it is 4k+1)")
    frames = np.stack([_fit(Image.fromarray(frame), height, width) for frame in raw])
    return torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()


def load_media_tensor(path: Path, backbone):
    """What ``backbone.encode`` takes for one file, in [-1, 1]: an image (3, H, W), or for a video backbone a clip
    (F, 3, H, W) from a video file."""
    from alignrl.errors import ConfigError

    if backbone.is_video:
        if Path(path).suffix.lower() not in VIDEO_SUFFIXES:
            raise ConfigError(f"{path}: {backbone.family} trains on videos; the dataset must name video files "
                              f"({', '.join(VIDEO_SUFFIXES)}), e.g. made by `alignrl data` with a video recipe")
        return load_video_tensor(path, backbone.resolution, backbone.width, backbone.num_frames)
    if Path(path).suffix.lower() in VIDEO_SUFFIXES:
        raise ConfigError(f"{path} is a video; {backbone.family} trains on images")
    return load_image_tensor(path, backbone.resolution)


def json_rows(file: Path, kind: str, limit: int | None = None):
    """``(row, "<file>:<line>")`` for each non-empty line of a JSON-lines dataset of ``kind`` (only the first
    ``limit`` lines when given); text that is not UTF-8, a line that is not JSON or not an object is a one-line error."""
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ConfigError(f"{file} is not UTF-8 text; save the dataset as UTF-8 JSON lines") from None
    for lineno, line in enumerate(lines[:limit], 1):
        if not line.strip():
            continue
        where = f"{file}:{lineno}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: a row must be a JSON object with the {kind} fields")
        yield raw, where


def _text(raw: dict, keys: tuple[str, ...], where: str, what: str) -> str:
    for k in keys:
        if k in raw:
            value = raw[k]
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"{where}: \"{k}\" must be a non-empty string, got {value!r}")
            return value
    raise ConfigError(f"{where}: the row has no {what} (a \"{keys[0]}\" field)")


def _path(raw: dict, key: str, base: Path, where: str) -> Path:
    if key not in raw:
        raise ConfigError(f"{where}: the row has no \"{key}\" image path")
    value = raw[key]
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: \"{key}\" must be an image path, got {value!r}")
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def _number(value, key: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ConfigError(f"{where}: \"{key}\" must be a finite number, got {value!r}")
    return float(value)


def _parse_row(raw: dict, kind: str, base: Path, where: str, drop_ties: bool) -> ImageRow | None:
    if kind == "pairs":
        if "winner" in raw or "loser" in raw:
            prompt = _text(raw, ("prompt", "caption"), where, "prompt")
            images = [_path(raw, "winner", base, where), _path(raw, "loser", base, where)]
            scores = None
            if "winner_score" in raw or "loser_score" in raw:
                scores = [_number(raw.get("winner_score"), "winner_score", where),
                          _number(raw.get("loser_score"), "loser_score", where)]
            return ImageRow(prompt, images, scores, where=where)
        prompt = _text(raw, ("caption", "prompt"), where, "caption")
        if "label_0" not in raw:
            raise ConfigError(f"{where}: a pair needs \"winner\"/\"loser\" or \"image_0\"/\"image_1\" with \"label_0\"")
        label = _number(raw["label_0"], "label_0", where)
        if label not in (0.0, 0.5, 1.0):
            raise ConfigError(f"{where}: \"label_0\" must be 1 (image_0 preferred), 0 (image_1) or 0.5 (a tie), "
                              f"got {raw['label_0']!r}")
        images = [_path(raw, "image_0", base, where), _path(raw, "image_1", base, where)]
        scores = None
        if "score_0" in raw or "score_1" in raw:
            scores = [_number(raw.get("score_0"), "score_0", where), _number(raw.get("score_1"), "score_1", where)]
        if label == 0.5:
            if drop_ties:
                return None
            raise ConfigError(f"{where}: a tie (label_0 0.5) in a pair dataset with drop_ties=false; a pair "
                              f"needs a winner")
        if label == 0.0:
            images.reverse()
            scores = scores[::-1] if scores else None
        return ImageRow(prompt, images, scores, where=where)
    if kind == "lists":
        prompt = _text(raw, ("prompt", "caption"), where, "prompt")
        files, scores = raw.get("images"), raw.get("scores")
        if not isinstance(files, list) or len(files) < 2:
            raise ConfigError(f"{where}: \"images\" must list two or more image paths")
        if not isinstance(scores, list) or len(scores) != len(files):
            raise ConfigError(f"{where}: \"scores\" must hold one number per image ({len(files)})")
        images = [_path({"image": f}, "image", base, where) for f in files]
        return ImageRow(prompt, images, [_number(s, "scores", where) for s in scores], where=where)
    if kind == "labels":
        prompt = _text(raw, ("prompt", "caption"), where, "prompt")
        if "label" not in raw:
            raise ConfigError(f"{where}: the row has no \"label\" (1 desirable, 0 undesirable)")
        value = raw["label"]
        label = float(value) if isinstance(value, bool) else _number(value, "label", where)
        if label not in (0.0, 1.0):
            raise ConfigError(f"{where}: \"label\" must be 1 (desirable) or 0 (undesirable), got {value!r}")
        return ImageRow(prompt, [_path(raw, "image", base, where)], label=label, where=where)
    prompt = _text(raw, ("prompt", "caption"), where, "prompt")  # captions
    return ImageRow(prompt, [_path(raw, "image", base, where)], where=where)


class LatentCache:
    """Latents of dataset images, encoded once and kept on disk (``<directory>/<key>.safetensors``).

    A latent's key hashes the image file (resolved path, size, modification time), the resolution and the
    backbone's VAE fingerprint (family, VAE config, a checksum of its weights): an edited image, another
    resolution or another VAE encodes again instead of reusing a stale latent. Files are written atomically.
    """

    def __init__(self, directory, backbone):
        self.directory = Path(directory).expanduser()
        self.backbone = backbone
        self.fingerprint = vae_fingerprint(backbone)
        self.hits = self.misses = 0

    def key(self, path: Path) -> str:
        import hashlib

        st = Path(path).stat()
        text = f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}|{self.backbone.resolution}|{self.fingerprint}"
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def latents(self, paths: list[Path], batch_size: int = 8):
        """(N, *latent_shape) float32 latents of the images at ``paths``, encoding the ones not cached yet."""
        import os

        import torch
        from safetensors.torch import load_file, save_file

        self.directory.mkdir(parents=True, exist_ok=True)
        keys = [self.key(p) for p in paths]
        out: list = [None] * len(paths)
        todo = []
        for i, k in enumerate(keys):
            f = self.directory / f"{k}.safetensors"
            if f.is_file():
                out[i] = load_file(str(f))["latent"]
                self.hits += 1
            else:
                todo.append(i)
        for start in range(0, len(todo), batch_size):
            idx = todo[start:start + batch_size]
            images = torch.stack([load_media_tensor(paths[i], self.backbone) for i in idx]) / 2 + 0.5
            z = self.backbone.encode(images).float().cpu()
            for j, i in enumerate(idx):
                f = self.directory / f"{keys[i]}.safetensors"
                tmp = f.with_suffix(f".tmp{os.getpid()}")
                save_file({"latent": z[j].contiguous()}, str(tmp))
                os.replace(tmp, f)
                out[i] = z[j]
            self.misses += len(idx)
        return torch.stack(out)


def vae_fingerprint(backbone) -> str:
    """Family, VAE config and a checksum of the VAE's weights (pixel-space backbones: family and resolution)."""
    import hashlib

    import torch

    vae = backbone.vae
    if vae is None:
        return f"{backbone.family}-pixels"
    h = hashlib.sha256(f"{backbone.family}|{json.dumps(dict(vae.config), sort_keys=True, default=str)}".encode())
    with torch.no_grad():
        for name, p in vae.named_parameters():
            h.update(f"{name}:{tuple(p.shape)}:{float(p.double().sum()):.12e}".encode())
    return h.hexdigest()[:16]
