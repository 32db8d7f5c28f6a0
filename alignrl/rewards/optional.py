"""Rewards whose packages are optional extras: HPSv2 (open_clip) and ImageReward (image-reward).

Both packages pull torchvision (and with it large CUDA wheels), so they are imported only when the
reward is built; without them the constructor raises a ConfigError naming the extra to install, or
``reward=remote`` to score in a separate environment.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from alignrl.errors import ConfigError
from alignrl.rewards.base import Reward, register_reward
from alignrl.rewards.clip import (
    OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ChunkedScorer, _brief, as_flag, as_positive_int, check_local, clip_preprocess,
    finish_scores, load_state_dict_file, resolve_device, resolve_dtype,
)
from alignrl.rewards.jpeg import to_uint8

log = logging.getLogger(__name__)

HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


def _missing(reward: str, extra: str, package: str) -> ConfigError:
    return ConfigError(f"reward '{reward}' needs the {package} package: pip install 'alignrl[{extra}]' "
                       f"(pulls torchvision), or score it out of process with reward=remote")


@register_reward("hpsv2")
class HPSv2(ChunkedScorer, Reward):
    """HPSv2 / HPSv2.1: open_clip ViT-H-14 with the HPS checkpoint; the score is cos(image, text).

    Options: ``checkpoint`` (path to ``HPS_v2*.pt``; default: downloaded from ``xswu/HPSv2`` for
    ``version``), ``version`` (v2.0 or v2.1), ``device``, ``dtype``, ``batch_size``, ``differentiable``.
    """

    arch = "ViT-H-14"

    def __init__(self, checkpoint: str | None = None, version: str = "v2.1", device: Any = "auto",
                 dtype: Any = "auto", batch_size: int = 32, differentiable: bool = False):
        try:
            import open_clip
        except ImportError:
            raise _missing("hpsv2", "hpsv2", "open_clip (open-clip-torch)") from None
        version = str(version).strip().lower()
        version = version if version.startswith("v") else "v" + version
        if version == "v2":
            version = "v2.0"
        if version not in HPS_FILES:
            raise ConfigError(f"reward.hpsv2.version={version!r} is not known; use v2.0 or v2.1")
        self.version = version
        self.differentiable = as_flag(differentiable, "hpsv2", "differentiable")
        self.batch_size = as_positive_int(batch_size, "hpsv2", "batch_size")
        self.device = resolve_device(device, "hpsv2")
        self.dtype = resolve_dtype(dtype, self.device, "hpsv2", self.differentiable)
        path = self._checkpoint_path(checkpoint)
        try:
            state = load_state_dict_file(path)
        except Exception as e:  # unreadable/unsafe file: name the option
            raise ConfigError(f"reward 'hpsv2' cannot read checkpoint '{path}' ({_brief(e)}); "
                              f"set reward.hpsv2.checkpoint=<{HPS_FILES[version]}>") from e
        try:
            model = open_clip.create_model(self.arch, pretrained=None)
            model.load_state_dict(state, strict=True)
        except Exception as e:  # wrong file for this architecture
            raise ConfigError(f"reward 'hpsv2': checkpoint '{path}' does not fit open_clip {self.arch} ({_brief(e)}); "
                              f"set reward.hpsv2.checkpoint=<{HPS_FILES[version]}>") from e
        self.model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(self.arch)
        cfg = getattr(self.model.visual, "preprocess_cfg", None) or {}
        size = getattr(self.model.visual, "image_size", 224)
        size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
        self.crop, self.resize = size, max(size)
        self.mean = tuple(cfg.get("mean", OPENAI_CLIP_MEAN))
        self.std = tuple(cfg.get("std", OPENAI_CLIP_STD))
        self._lock = threading.Lock()
        log.info("reward hpsv2: %s (%s) on %s", path, version, self.device)

    def _checkpoint_path(self, checkpoint: str | None) -> Path:
        if checkpoint:
            path = Path(str(checkpoint)).expanduser()
            if not path.is_file():
                raise ConfigError(f"reward.hpsv2.checkpoint: file '{checkpoint}' does not exist; "
                                  f"set reward.hpsv2.checkpoint=<path to {HPS_FILES[self.version]}>")
            return path
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(HPS_REPO, HPS_FILES[self.version]))
        except Exception as e:  # offline or no access: the user gives the file
            raise ConfigError(f"reward 'hpsv2' cannot fetch {HPS_FILES[self.version]} from {HPS_REPO} ({_brief(e)}); "
                              f"set reward.hpsv2.checkpoint=<local path>") from e

    def _score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        x = clip_preprocess(images.to(self.device), resize=self.resize, crop=self.crop, mean=self.mean, std=self.std)
        img = F.normalize(self.model.encode_image(x.to(self.dtype)).float(), dim=-1)
        tokens = self.tokenizer(list(prompts)).to(self.device)
        txt = F.normalize(self.model.encode_text(tokens).float(), dim=-1)
        return (img * txt).sum(-1)


@register_reward("imagereward")
class ImageRewardScore(Reward):
    """ImageReward (BLIP-based) through the ``image-reward`` package's own ``score``.

    Options: ``model`` (name such as ImageReward-v1.0, or a checkpoint path), ``med_config`` (BLIP
    config path, for a local checkpoint), ``download_root``, ``device``, ``batch_size``.
    """

    def __init__(self, model: str = "ImageReward-v1.0", med_config: str | None = None,
                 download_root: str | None = None, device: Any = "auto", batch_size: int = 32):
        try:
            import ImageReward as image_reward
        except ImportError:
            raise _missing("imagereward", "imagereward", "image-reward") from None
        self.batch_size = as_positive_int(batch_size, "imagereward", "batch_size")
        self.device = resolve_device(device, "imagereward")
        name = str(model)
        check_local(name, "imagereward", "model", "checkpoint")
        kwargs: dict[str, Any] = {"device": str(self.device)}
        if med_config:
            kwargs["med_config"] = str(med_config)
        if download_root:
            kwargs["download_root"] = str(download_root)
        try:
            net = image_reward.load(name, **kwargs)
        except Exception as e:  # unknown name, offline, incompatible transformers: name the option
            raise ConfigError(f"reward 'imagereward' cannot load '{name}' ({_brief(e)}); set reward.imagereward.model="
                              "<ImageReward-v1.0 or a checkpoint path>, or use reward=remote") from e
        self.model = net.eval().requires_grad_(False)
        self._lock = threading.Lock()

    def __call__(self, images, prompts, metadata):
        from PIL import Image

        pil = [Image.fromarray(a) for a in to_uint8(images)]
        scores = np.full(len(prompts), np.nan, dtype=np.float64)
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(p, []).append(i)
        with self._lock, torch.no_grad():
            for prompt, idx in groups.items():
                for s in range(0, len(idx), self.batch_size):
                    chunk = idx[s: s + self.batch_size]
                    # score() returns a float for one image, a list for several
                    out = self.model.score(prompt, [pil[i] for i in chunk] if len(chunk) > 1 else pil[chunk[0]])
                    scores[chunk] = np.asarray(out, dtype=np.float64).reshape(-1)
        return finish_scores(torch.from_numpy(scores))
