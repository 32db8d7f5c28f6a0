"""Videos (B, F, 3, H, W) in [0, 1] on disk: MP4 (H.264 through PyAV, which ships FFmpeg's libraries), GIF
previews (PIL), and reading an MP4 back (how the tests check that what eval wrote plays)."""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from PIL import Image

DEFAULT_FPS = 16  # Wan2.1's frame rate


def _frames_uint8(video: torch.Tensor) -> np.ndarray:
    """(F, 3, H, W) in [0, 1] -> (F, H, W, 3) uint8."""
    if video.ndim != 4 or video.shape[1] != 3:
        raise ValueError(f"a video is (frames, 3, H, W); got {tuple(video.shape)}")
    return (video.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _even(frames: np.ndarray) -> np.ndarray:
    """H.264 in yuv420p needs even sides: repeat the last row / column where a side is odd."""
    h, w = frames.shape[1:3]
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge") if h % 2 or w % 2 else frames


def write_mp4(path: str | Path, video: torch.Tensor, fps: int = DEFAULT_FPS, crf: int = 18) -> Path:
    """One clip (F, 3, H, W) as H.264 MP4 (yuv420p, plays in browsers and wandb), written to a temporary name
    and renamed, so a crash leaves no half file under ``path``."""
    try:
        import av
    except ImportError:
        raise ImportError("writing MP4 needs PyAV: pip install av (alignrl's dependencies include it)") from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = _even(_frames_uint8(video))
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.mp4")
    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(int(fps), 1))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(int(crf))}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)
    return path


def read_mp4(path: str | Path) -> tuple[np.ndarray, float]:
    """Decode an MP4: frames (F, H, W, 3) uint8 and the frame rate."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        fps = float(stream.average_rate or stream.base_rate or 0)
    return np.stack(frames), fps


def write_gif(path: str | Path, video: torch.Tensor, fps: int = DEFAULT_FPS, min_side: int = 128) -> Path:
    """A looping GIF preview of one clip, upscaled (nearest) so its shorter side is at least ``min_side``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = _frames_uint8(video)
    h, w = frames.shape[1:3]
    scale = max(1, -(-min_side // min(h, w)))
    pils = [Image.fromarray(f).resize((w * scale, h * scale), Image.NEAREST) for f in frames]
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.gif")
    pils[0].save(tmp, format="GIF", save_all=True, append_images=pils[1:], duration=max(1, round(1000 / fps)),
                 loop=0)
    os.replace(tmp, path)
    return path


def filmstrips(videos: torch.Tensor) -> torch.Tensor:
    """(B, F, 3, H, W) -> (B, 3, H, F * W): each clip's frames side by side, for image grids."""
    b, f, c, h, w = videos.shape
    return videos.permute(0, 2, 3, 1, 4).reshape(b, c, h, f * w)


def write_videos(out_dir: Path, videos: torch.Tensor, names: list[str], fps: int = DEFAULT_FPS,
                 gif: bool = True) -> list[Path]:
    """``names[i].mp4`` (and ``.gif``) per clip under ``out_dir``; returns the MP4 paths."""
    paths = []
    for video, name in zip(videos, names):
        paths.append(write_mp4(out_dir / f"{name}.mp4", video, fps))
        if gif:
            write_gif(out_dir / f"{name}.gif", video, fps)
    return paths
