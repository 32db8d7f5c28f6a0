"""CLIP-based rewards on ``transformers.CLIPModel``: PickScore, CLIPScore and the LAION aesthetic predictor.

Weights load with ``from_pretrained`` (hub id or local folder) when the reward is built, so a wrong
path stops the run before training starts. Images are preprocessed in torch (shortest side resized
with antialiased bicubic, centre crop, CLIP mean/std), which lets ``differentiable=true`` pass
gradients back to the images. ``score_tensor`` returns the scores as a tensor; calling the reward
returns the float64 numpy scores of the reward contract.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from alignrl.backbones.base import DTYPES
from alignrl.errors import ConfigError
from alignrl.rewards.base import Reward, register_reward

log = logging.getLogger(__name__)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------------------------
# option parsing shared by the model rewards (optional.py uses these too)


def _brief(e: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message``, cut to ``limit`` characters (errors stay one line)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def as_flag(value: Any, reward: str, option: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "false", "no", "0"):
        return value.strip().lower() in ("true", "yes", "1")
    raise ConfigError(f"reward.{reward}.{option}={value!r} is not a boolean; use true or false")


def as_positive_int(value: Any, reward: str, option: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or (isinstance(value, float) and value != n):
        raise ConfigError(f"reward.{reward}.{option}={value!r} must be a positive integer (e.g. {option}=32)")
    return n


def as_scale(value: Any, reward: str, option: str = "scale") -> float:
    """A number, or a fraction written as text (``1/26``)."""
    try:
        if isinstance(value, str) and "/" in value:
            num, den = value.split("/", 1)
            return float(num) / float(den)
        return float(value)
    except (TypeError, ValueError, ZeroDivisionError):
        raise ConfigError(f"reward.{reward}.{option}={value!r} is not a number; give e.g. {option}=0.5 or {option}=1/26") from None


def resolve_device(device: Any, reward: str) -> torch.device:
    """``auto``: this process's CUDA device (``LOCAL_RANK`` when set) if CUDA is available, else the CPU."""
    want = str(device if device is not None else "auto").strip().lower()
    if want == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        rank = os.environ.get("LOCAL_RANK", "")
        count = torch.cuda.device_count()
        index = int(rank) if rank.isdigit() and int(rank) < count else torch.cuda.current_device()
        return torch.device("cuda", index)
    try:
        dev = torch.device(want)
    except (RuntimeError, ValueError):
        raise ConfigError(f"reward.{reward}.device={device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"reward.{reward}.device={device} but no CUDA device is visible; use device=auto or cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"reward.{reward}.device={device} but only {torch.cuda.device_count()} CUDA devices are visible")
    return dev


def resolve_dtype(dtype: Any, device: torch.device, reward: str, differentiable: bool = False) -> torch.dtype:
    """``auto``: float32 on the CPU; on CUDA float16, or bfloat16 (wider range for gradients) when differentiable."""
    want = str(dtype if dtype is not None else "auto").strip().lower()
    if want == "auto":
        if device.type != "cuda":
            return torch.float32
        if differentiable and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16
    if want not in DTYPES:
        raise ConfigError(f"reward.{reward}.dtype={dtype!r} is not known; use auto, fp32, bf16 or fp16")
    out = DTYPES[want]
    if out == torch.float16 and device.type == "cpu":
        raise ConfigError(f"reward.{reward}.dtype=fp16 on the CPU is not supported; use fp32 or bf16 there")
    return out


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else (absolute, relative, home, deeper) is a path."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name or Path(name).exists()


def check_local(name: str, reward: str, option: str, what: str) -> None:
    """A path-like ``name`` that does not exist gets a clear error instead of a hub lookup."""
    if _looks_like_path(name) and not Path(name).expanduser().exists():
        raise ConfigError(f"reward.{reward}.{option}: {what} '{name}' does not exist; set reward.{reward}.{option}=<hub id or local path>")


def from_pretrained_kwargs(dtype: torch.dtype) -> dict:
    """``from_pretrained``'s dtype argument: ``dtype`` since transformers 4.56, ``torch_dtype`` before."""
    import transformers
    from packaging.version import Version

    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {key: dtype}


def clip_preprocess(images: torch.Tensor, *, resize: int, crop: tuple[int, int],
                    mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> CLIP input: shortest side to ``resize`` (bicubic, antialias), centre crop, mean/std.

    Differentiable; the resized image is clamped to [0, 1] as the uint8 round trip of the reference
    processors would.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    x = images.float()
    h, w = x.shape[-2:]
    ch, cw = crop
    s = resize / min(h, w)
    nh, nw = max(ch, int(round(h * s))), max(cw, int(round(w * s)))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    top, left = (nh - ch) // 2, (nw - cw) // 2
    x = x[..., top: top + ch, left: left + cw]
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    sd = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / sd


def _features(out: Any) -> torch.Tensor:
    """The projected embedding from ``get_*_features``: a tensor (transformers 4) or ``.pooler_output`` (5)."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if isinstance(pooled, torch.Tensor):
        return pooled
    raise TypeError(f"unexpected CLIP feature output {type(out).__name__}")


def _size_field(obj: Any, key: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, int):
        return obj
    value = obj.get(key) if hasattr(obj, "get") else None
    return value if value is not None else getattr(obj, key, None)


def finish_scores(scores: torch.Tensor) -> tuple[np.ndarray, dict]:
    """float64 numpy scores (non-finite -> NaN) and the batch's mean/std for logging."""
    arr = scores.detach().double().cpu().numpy().reshape(-1)
    arr = np.where(np.isfinite(arr), arr, np.nan)
    ok = arr[np.isfinite(arr)]
    info = {"mean": float(ok.mean()) if ok.size else float("nan"), "std": float(ok.std()) if ok.size else float("nan")}
    if ok.size < arr.size:
        info["nonfinite"] = int(arr.size - ok.size)
    return arr, info


# ----------------------------------------------------------------------------------------------


class ChunkedScorer:
    """``score_tensor`` / ``__call__`` for rewards that score with ``_score_batch`` in chunks of ``batch_size``
    under ``self._lock`` (with the graph kept only when ``self.differentiable``)."""

    def _score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def score_tensor(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict] | None = None) -> torch.Tensor:
        """Scores (B,) float32 on the reward's device, in chunks of ``batch_size``.

        With ``differentiable=true`` the graph from ``images`` to the scores is kept (``images`` may be
        on any device and require grad); otherwise this runs under ``torch.no_grad()``.
        """
        prompts = list(prompts)
        if images.shape[0] != len(prompts):
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        if not prompts:
            return torch.zeros(0, device=self.device)
        grad = nullcontext() if self.differentiable else torch.no_grad()
        with self._lock, grad:
            parts = [self._score_batch(images[i: i + self.batch_size], prompts[i: i + self.batch_size])
                     for i in range(0, len(prompts), self.batch_size)]
        return torch.cat(parts)

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]):
        return finish_scores(self.score_tensor(images, prompts, metadata))


class ClipModelReward(ChunkedScorer, Reward):
    """A frozen ``CLIPModel`` plus its tokenizer; subclasses define ``_score_batch``.

    Options: ``model`` (hub id or folder), ``processor`` (tokenizer/image-processor source; default:
    the model's), ``device`` (auto/cpu/cuda[:N]), ``dtype`` (auto/fp32/bf16/fp16), ``batch_size``,
    ``differentiable`` (keep the autograd graph from the images to the scores).
    """

    default_model = "openai/clip-vit-large-patch14"
    default_processor: str | None = None
    uses_text = True

    def __init__(self, model: str | None = None, processor: str | None = None, device: Any = "auto",
                 dtype: Any = "auto", batch_size: int = 32, differentiable: bool = False):
        name = self.reward_name
        self.differentiable = as_flag(differentiable, name, "differentiable")
        self.batch_size = as_positive_int(batch_size, name, "batch_size")
        self.device = resolve_device(device, name)
        self.dtype = resolve_dtype(dtype, self.device, name, self.differentiable)
        self.model_id = str(model or self.default_model)
        proc_option = "processor" if (processor or self.default_processor) else "model"
        self.processor_id = str(processor or self.default_processor or self.model_id)
        self._validate_options()
        check_local(self.processor_id, name, proc_option, "processor")
        check_local(self.model_id, name, "model", "model")
        self._lock = threading.Lock()
        self.tokenizer, image_processor = self._load_processor(proc_option)
        self.model = self._load_model()
        self._set_geometry(image_processor, proc_option)
        self._load_extra()
        log.info("reward %s: %s on %s (%s), input %dx%d", name, self.model_id, self.device,
                 str(self.dtype).replace("torch.", ""), *self.crop)

    # -- loading ------------------------------------------------------------------------------

    def _validate_options(self) -> None:
        """Cheap checks that must fail before the model loads (subclasses)."""

    def _load_extra(self) -> None:
        """Anything loaded after the CLIP model (subclasses)."""

    def _load_processor(self, option: str):
        name = self.reward_name
        from transformers import AutoProcessor

        try:
            proc = AutoProcessor.from_pretrained(self.processor_id)
        except Exception as e:  # any failure to load is the user's path/id: say which option to set
            raise ConfigError(
                f"reward '{name}' cannot load the CLIP processor '{self.processor_id}' ({_brief(e)}); "
                f"set reward.{name}.{option}=<hub id or local folder with the CLIP tokenizer and image processor>"
                + ("" if option == "processor" else f" or reward.{name}.processor=<...>")) from e
        tokenizer = getattr(proc, "tokenizer", None)
        if tokenizer is None and callable(proc) and hasattr(proc, "model_max_length"):
            tokenizer = proc  # a bare tokenizer folder
        if self.uses_text and tokenizer is None:
            raise ConfigError(f"reward '{name}': '{self.processor_id}' has no tokenizer; "
                              f"set reward.{name}.{option}=<folder or hub id of a CLIP processor>")
        return tokenizer, getattr(proc, "image_processor", None)

    def _load_model(self):
        name = self.reward_name
        from transformers import CLIPModel

        try:
            model = CLIPModel.from_pretrained(self.model_id, **from_pretrained_kwargs(self.dtype))
        except Exception as e:  # any failure to load is the user's path/id: say which option to set
            raise ConfigError(f"reward '{name}' cannot load CLIP model '{self.model_id}' ({_brief(e)}); "
                              f"set reward.{name}.model=<hub id or local folder of a CLIPModel>") from e
        return model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)

    def _set_geometry(self, image_processor, option: str) -> None:
        """Input size and normalisation from the image processor, else from the model config and CLIP defaults."""
        size = int(self.model.config.vision_config.image_size)
        crop, resize = (size, size), size
        mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        if image_processor is not None:
            mean = tuple(float(v) for v in getattr(image_processor, "image_mean", None) or mean)
            std = tuple(float(v) for v in getattr(image_processor, "image_std", None) or std)
            cs = getattr(image_processor, "crop_size", None)
            if getattr(image_processor, "do_center_crop", False) and cs is not None:
                crop = (int(_size_field(cs, "height")), int(_size_field(cs, "width")))
            short = _size_field(getattr(image_processor, "size", None), "shortest_edge")
            resize = int(short) if short else max(crop)
        if crop != (size, size):
            raise ConfigError(f"reward '{self.reward_name}': processor '{self.processor_id}' crops to {crop[0]}x{crop[1]} "
                              f"but model '{self.model_id}' takes {size}x{size}; set reward.{self.reward_name}.{option} to the model's processor")
        self.crop, self.resize, self.mean, self.std = crop, max(resize, max(crop)), mean, std

    # -- scoring ------------------------------------------------------------------------------

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device)
        x = clip_preprocess(x, resize=self.resize, crop=self.crop, mean=self.mean, std=self.std)
        return x.to(self.dtype)

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised float32 image embeddings (B, D)."""
        feats = _features(self.model.get_image_features(pixel_values=self.preprocess(images)))
        return F.normalize(feats.float(), dim=-1)

    def embed_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised float32 text embeddings, one row per prompt (each distinct prompt encoded once)."""
        unique = list(dict.fromkeys(prompts))
        max_len = min(int(self.tokenizer.model_max_length),
                      int(self.model.config.text_config.max_position_embeddings))
        enc = self.tokenizer(unique, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        feats = _features(self.model.get_text_features(
            input_ids=enc["input_ids"].to(self.device),
            attention_mask=enc["attention_mask"].to(self.device) if "attention_mask" in enc else None))
        feats = F.normalize(feats.float(), dim=-1)
        index = {p: i for i, p in enumerate(unique)}
        return feats[torch.tensor([index[p] for p in prompts], device=feats.device)]

@register_reward("pickscore")
class PickScore(ClipModelReward):
    """PickScore: ``scale * logit_scale.exp() * cos(image, text)``; ``scale`` defaults to 1/26 as the reference."""

    default_model = "yuvalkirstain/PickScore_v1"
    default_processor = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

    def __init__(self, model: str | None = None, processor: str | None = None, scale: Any = 1 / 26, **options):
        self.scale = as_scale(scale, "pickscore")
        super().__init__(model=model, processor=processor, **options)

    def _score_batch(self, images, prompts):
        cos = (self.embed_images(images) * self.embed_texts(prompts)).sum(-1)
        return self.scale * self.model.logit_scale.float().exp() * cos


@register_reward("clipscore")
class ClipScore(ClipModelReward):
    """CLIP image-text cosine times ``scale`` (default 100; ``scale: 1.0`` gives the plain cosine)."""

    default_model = "openai/clip-vit-large-patch14"

    def __init__(self, model: str | None = None, processor: str | None = None, scale: Any = 100.0, **options):
        self.scale = as_scale(scale, "clipscore")
        super().__init__(model=model, processor=processor, **options)

    def _score_batch(self, images, prompts):
        return self.scale * (self.embed_images(images) * self.embed_texts(prompts)).sum(-1)


class AestheticHead(nn.Module):
    """The LAION improved-aesthetic-predictor MLP (state-dict keys ``layers.N.weight/bias``)."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).squeeze(-1)


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file, or a torch pickle read with ``weights_only=True`` (a nested ``state_dict`` is unwrapped)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"expected a state dict, found {type(state).__name__}")
    return state


def read_weights_option(value, reward: str, option: str, what: str) -> dict[str, torch.Tensor]:
    """The state dict named by ``reward.<reward>.<option>`` (``what``: the file it must be), or a one-line
    ConfigError naming the option: unset, missing, or unreadable/unsafe (pickles load with ``weights_only``)."""
    if not value:
        raise ConfigError(f"reward '{reward}' needs {what}: set reward.{reward}.{option}=<.safetensors, or a "
                          f".pth/.bin loadable with weights_only=True>")
    path = Path(str(value)).expanduser()
    if not path.is_file():
        raise ConfigError(f"reward.{reward}.{option}: file '{value}' does not exist; set reward.{reward}.{option}="
                          f"<.safetensors or .pth/.bin>")
    try:
        return load_state_dict_file(path)
    except Exception as e:  # unreadable/unsafe file: name the option
        raise ConfigError(f"reward '{reward}' cannot read {option} '{path}' ({_brief(e)}); set reward.{reward}.{option}"
                          f"=<.safetensors, or a .pth/.bin loadable with weights_only=True>") from e


@register_reward("aesthetic")
class Aesthetic(ClipModelReward):
    """LAION aesthetic score: CLIP image embedding (L2-normalised) -> MLP head. The prompt is ignored."""

    default_model = "openai/clip-vit-large-patch14"
    uses_text = False

    def __init__(self, head: str | None = None, model: str | None = None, processor: str | None = None, **options):
        self.head_path = head
        super().__init__(model=model, processor=processor, **options)

    def _validate_options(self) -> None:
        self._head_state = read_weights_option(self.head_path, "aesthetic", "head", "its MLP head (LAION "
                                               "sac+logos+ava1-l14-linearMSE.pth or a .safetensors conversion)")
        first = self._head_state.get("layers.0.weight")
        if not isinstance(first, torch.Tensor) or first.ndim != 2:
            raise ConfigError(f"reward.aesthetic.head='{path}' has no 'layers.0.weight'; "
                              "it must be the LAION improved-aesthetic-predictor MLP (layers.N.weight/bias)")

    def _load_extra(self) -> None:
        state = self._head_state
        del self._head_state
        dim = int(state["layers.0.weight"].shape[1])
        proj = int(self.model.config.projection_dim)
        if dim != proj:
            raise ConfigError(f"reward 'aesthetic': head '{self.head_path}' takes {dim}-d embeddings but model "
                              f"'{self.model_id}' gives {proj}-d; set reward.aesthetic.model to the head's CLIP (ViT-L/14: 768)")
        head = AestheticHead(dim)
        try:
            head.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        except RuntimeError as e:
            raise ConfigError(f"reward 'aesthetic': head '{self.head_path}' does not fit the "
                              f"768-1024-128-64-16-1 MLP ({_brief(e)}); set reward.aesthetic.head to the LAION file") from e
        self.head = head.to(self.device).eval().requires_grad_(False)

    def _score_batch(self, images, prompts):
        return self.head(self.embed_images(images))


# ----------------------------------------------------------------------------------------------
# SPO's step-aware preference model


class TimestepEmbedding(nn.Module):
    """Sinusoidal features of a (possibly fractional) timestep, cosines first (256, max period 10^4), through
    Linear-SiLU-Linear to the vision width: the step-aware model's time input."""

    def __init__(self, width: int, frequencies: int = 256):
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(frequencies, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequencies // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(self.mlp[0].weight.dtype))


class StepAwareVision(nn.Module):
    """The time conditioning SPO's step-aware PickScore adds to a CLIP vision tower: per encoder layer an adaLN
    (SiLU, Linear to 6 x width: shift, scale and gate of the attention and of the MLP branch), and on the pooled
    output one more (shift, scale). Holds only the added modules; the CLIP weights stay in the CLIPModel."""

    def __init__(self, width: int, layers: int):
        super().__init__()
        self.t_embedder = TimestepEmbedding(width)
        self.layer_modulation = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
                                              for _ in range(layers))
        self.pooled_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, vision, pixel_values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The pooled, modulated image state (before CLIP's visual projection)."""
        cond = self.t_embedder(t)
        h = vision.pre_layrnorm(vision.embeddings(pixel_values))
        for layer, mod in zip(vision.encoder.layers, self.layer_modulation):
            shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod(cond).chunk(6, dim=1)
            a = layer.layer_norm1(h) * (1 + scale_a[:, None]) + shift_a[:, None]
            h = h + layer.self_attn(hidden_states=a, attention_mask=None)[0] * gate_a[:, None]
            m = layer.layer_norm2(h) * (1 + scale_m[:, None]) + shift_m[:, None]
            h = h + layer.mlp(m) * gate_m[:, None]
        pooled = vision.post_layernorm(h[:, 0])
        shift, scale = self.pooled_modulation(cond).chunk(2, dim=1)
        return pooled * (1 + scale) + shift

    @staticmethod
    def from_reference_keys(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        """Split a reference checkpoint (``StepAwarePreferenceModel`` state dict: ``model.`` + the time-conditioned
        CLIP's keys) into the CLIPModel's keys and this module's keys."""
        clip, added = {}, {}
        for key, value in state.items():
            k = key.removeprefix("model.")
            if k.startswith("t_embedder."):
                added[k] = value
            elif k.startswith("vision_model.adaLN_modulation."):
                added["pooled_modulation." + k.removeprefix("vision_model.adaLN_modulation.")] = value
            elif ".adaLN_modulation." in k and k.startswith("vision_model.encoder.layers."):
                i, rest = k.removeprefix("vision_model.encoder.layers.").split(".adaLN_modulation.")
                added[f"layer_modulation.{i}.{rest}"] = value
            else:
                clip[k] = value
        return clip, added


@register_reward("step_aware_pickscore")
class StepAwarePickScore(ClipModelReward):
    """SPO's step-aware preference model: PickScore whose vision tower reads the denoising timestep, scoring the
    decoded x0 prediction of a noisy latent (``logit_scale.exp() * cos``, times ``scale``). ``checkpoint``: the
    reference's step-aware model (``sd-v1-5_step-aware_preference_model.bin`` or the SDXL one, read with
    ``weights_only=True``; or a ``.safetensors`` of the same keys) over ``model`` (PickScore_v1). The timestep
    comes from each image's metadata ``spo_timestep`` (SPO sets it: the UNet timestep of the step whose x0
    prediction is scored, 0 for the final image); images without it are scored at ``timestep`` (default 0, a
    clean image). Preprocessing as the reference: bicubic resize of the shortest side without antialiasing, centre
    crop, clamp to [0, 1], CLIP normalisation."""

    default_model = "yuvalkirstain/PickScore_v1"
    default_processor = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

    def __init__(self, checkpoint: str | None = None, model: str | None = None, processor: str | None = None,
                 scale: Any = 1.0, timestep: Any = 0, **options):
        self.checkpoint = checkpoint
        self.scale = as_scale(scale, "step_aware_pickscore")
        self.default_timestep = as_scale(timestep, "step_aware_pickscore", "timestep")
        super().__init__(model=model, processor=processor, **options)

    def _validate_options(self) -> None:
        self._state = read_weights_option(self.checkpoint, "step_aware_pickscore", "checkpoint",
                                          "its time-conditioned weights (SPO's sd-v1-5_step-aware_preference_model.bin "
                                          "or a .safetensors of its keys)")

    def _load_extra(self) -> None:
        state, path = self._state, self.checkpoint
        del self._state
        vision = self.model.config.vision_config
        layers, width = int(vision.num_hidden_layers), int(vision.hidden_size)
        clip_keys, added_keys = StepAwareVision.from_reference_keys(state)
        self.time = StepAwareVision(width, layers)
        missing = sorted(set(self.time.state_dict()) - set(added_keys))
        if missing:
            raise ConfigError(f"reward 'step_aware_pickscore': '{path}' lacks the time conditioning ({missing[0]}, "
                              f"{len(missing)} keys); it must be SPO's step-aware preference model checkpoint")
        try:
            self.time.load_state_dict({k: v.float() for k, v in added_keys.items()}, strict=True)
            result = self.model.load_state_dict({k: v.to(self.dtype) for k, v in clip_keys.items()}, strict=False)
        except RuntimeError as e:
            raise ConfigError(f"reward 'step_aware_pickscore': '{path}' does not fit model '{self.model_id}' "
                              f"({_brief(e)}); set reward.step_aware_pickscore.model to its PickScore") from e
        unexpected = [k for k in result.unexpected_keys if "position_ids" not in k]
        if unexpected:
            raise ConfigError(f"reward 'step_aware_pickscore': '{path}' has keys model '{self.model_id}' lacks "
                              f"({unexpected[0]}, {len(unexpected)} keys); set reward.step_aware_pickscore.model")
        self.time = self.time.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device).float()
        h, w = x.shape[-2:]
        s = self.resize / min(h, w)
        size = (int(h * s + 0.5), int(w * s + 0.5))
        if size != (h, w):
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
        ch, cw = self.crop
        top, left = (x.shape[-2] - ch) // 2, (x.shape[-1] - cw) // 2
        x = x[..., top: top + ch, left: left + cw].clamp(0, 1)
        m = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        sd = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return ((x - m) / sd).to(self.dtype)

    def score_tensor(self, images, prompts, metadata=None):
        """Scores (B,) at each image's ``spo_timestep`` (else ``timestep``), in chunks of ``batch_size``."""
        prompts = list(prompts)
        meta = list(metadata) if metadata is not None else [{}] * len(prompts)
        if images.shape[0] != len(prompts) or len(meta) != len(prompts):
            raise ValueError(f"{images.shape[0]} images, {len(prompts)} prompts and {len(meta)} metadata rows")
        t = torch.tensor([float(m.get("spo_timestep", self.default_timestep)) for m in meta], device=self.device)
        grad = nullcontext() if self.differentiable else torch.no_grad()
        with self._lock, grad:
            parts = [self._score_at(images[i: i + self.batch_size], prompts[i: i + self.batch_size],
                                    t[i: i + self.batch_size]) for i in range(0, len(prompts), self.batch_size)]
        return torch.cat(parts) if parts else torch.zeros(0, device=self.device)

    def _score_at(self, images, prompts, t):
        pooled = self.time(self.model.vision_model, self.preprocess(images), t)
        image = F.normalize(self.model.visual_projection(pooled).float(), dim=-1)
        cos = (image * self.embed_texts(prompts)).sum(-1)
        return self.scale * self.model.logit_scale.float().exp() * cos
