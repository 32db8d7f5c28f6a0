"""The ShapeWorld text-to-image model: a pixel-space conditional UNet (diffusers ``UNet2DConditionModel``)
trained by rectified flow, a 2-layer CLIP text encoder and an offline word-level tokenizer.

``ShapesPipeline`` is a diffusers pipeline (save/load with ``save_pretrained``/``from_pretrained``, LoRA
through ``load_lora_weights``, plain sampling with ``__call__``); ``ShapesBackbone`` puts it behind the
backbone protocol so every plan, loss and command works on it. The pretrained weights ship inside the
package (``alignrl/shapes/pretrained``), made by ``scripts/pretrain_shapes.py``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Sequence

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DConditionModel

from alignrl.backbones.base import Backbone, Conditioning, dtype_kwarg, parse_dtype
from alignrl.backbones.unet import UNetBackbone
from alignrl.errors import ConfigError
from alignrl.shapes.pipeline import MAX_TOKENS, ShapesPipeline
from alignrl.shapes.world import COLORS, COUNT_WORDS, RELATIONS, SHAPES

__all__ = ["MAX_TOKENS", "ShapesPipeline", "ShapesBackbone", "ShapesEpsilonBackbone", "build_pipeline"]


def vocabulary() -> list[str]:
    words = {"a", "an", "and", "of"} | set(SHAPES) | {s + "s" for s in SHAPES} | set(COLORS)
    words |= set(COUNT_WORDS.values())
    for rel in RELATIONS:
        words |= set(rel.split())
    return ["[PAD]", "[UNK]", "[CLS]"] + sorted(words)


def build_tokenizer():
    """Word-level, offline; ``[CLS]`` first, so even the empty prompt has one token to attend to."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A", special_tokens=[("[CLS]", vocab["[CLS]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   model_max_length=MAX_TOKENS)


TEXT_ENCODERS = ("bert", "clip")


def build_text_encoder(kind: str = "bert", hidden: int = 128, layers: int = 2):
    """``bert``: bidirectional attention with the padding mask (the shipped design). ``clip``: the first version's
    causal CLIP text encoder without a mask (kept for the ablation in docs/shapes.md)."""
    if kind == "clip":
        from transformers import CLIPTextConfig, CLIPTextModel

        cfg = CLIPTextConfig(vocab_size=len(vocabulary()), hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
                             projection_dim=hidden, pad_token_id=0, bos_token_id=2, eos_token_id=1)
        return CLIPTextModel(cfg)
    if kind != "bert":
        raise ValueError(f"text encoder '{kind}' is not known; use one of {', '.join(TEXT_ENCODERS)}")
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=len(vocabulary()), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=2 * hidden, max_position_embeddings=MAX_TOKENS, type_vocab_size=1,
                     pad_token_id=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertModel(cfg)


def build_unet(channels: Sequence[int] = (32, 64, 128), cross_dim: int = 128) -> UNet2DConditionModel:
    """Pixel-space UNet; cross-attention only at the lowest resolution (8x8 for 32px images)."""
    n = len(channels)
    return UNet2DConditionModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=tuple(channels),
        down_block_types=("DownBlock2D",) * (n - 1) + ("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",) + ("UpBlock2D",) * (n - 1),
        cross_attention_dim=cross_dim, attention_head_dim=8, norm_num_groups=8,
    )


OBJECTIVES = ("flow", "epsilon")


def epsilon_scheduler():
    """The epsilon twin's noise schedule: DDPM's linear betas (1e-4 .. 0.02 over 1000 steps, the pixel-space
    standard), sampled by DDIM as SD is: 'leading' spacing, offset 1, the last step ending at ``abar[0]`` (noise
    std 0.01, so a DDIM step with eta > 0 has a log-prob there, as DDPO's last step on SD), no clipping, so the
    pipeline and the backbone's flow-frame sampler agree exactly. ('trailing' spacing would
    not: diffusers' DDIM steps each timestep to ``t - 1000 // n``, which misses the next grid timestep when n does
    not divide 1000.)"""
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=1e-4, beta_end=0.02, beta_schedule="linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")


def build_pipeline(seed: int = 0, channels: Sequence[int] = (32, 64, 128), text_hidden: int = 128,
                   text_encoder: str = "bert", objective: str = "flow") -> ShapesPipeline:
    """An untrained ShapeWorld model; ``objective``: ``flow`` (rectified flow, the shipped model) or ``epsilon``
    (a DDPM noise-prediction twin, the home ground of the UNet-born methods)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective '{objective}' is not known; use one of {', '.join(OBJECTIVES)}")
    torch.manual_seed(seed)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0) if objective == "flow" else epsilon_scheduler()
    return ShapesPipeline(unet=build_unet(channels, text_hidden),
                          text_encoder=build_text_encoder(text_encoder, text_hidden),
                          tokenizer=build_tokenizer(), scheduler=scheduler)


@torch.no_grad()
def colour_swap_cosine(pipe, text_encoder=None) -> float:
    """How alike the text encoder makes prompts that differ only in their colour word.

    The mean cosine similarity of the (padding-masked, flattened) token states of ``a <colour> <shape>`` over
    every pair of colours and every shape. Near 1, the UNet receives the same conditioning whatever the colour
    word (the first shipped model: 0.97-0.99). ``text_encoder`` replaces the pipeline's for the measurement.
    """
    saved = pipe.text_encoder
    if text_encoder is not None:
        pipe.text_encoder = text_encoder
    try:
        sims = []
        for shape in SHAPES:
            prompts = [f"a {c} {shape}" for c in COLORS]
            states, mask = pipe.encode_prompt(prompts)
            keep = mask if mask is not None else torch.ones(states.shape[:2], device=states.device)
            flat = torch.nn.functional.normalize((states.float() * keep.unsqueeze(-1)).flatten(1), dim=1)
            n = len(prompts)
            sims.append(float(((flat @ flat.T).sum() - n) / (n * (n - 1))))
    finally:
        pipe.text_encoder = saved
    return sum(sims) / len(sims)


def pretrained_dir(name: str = "pretrained") -> Path:
    return Path(str(resources.files("alignrl.shapes") / name))


class ShapesBackbone(Backbone):
    family = "shapes"
    uses_cfg = True
    remote_code = True  # an exported pipeline loads with trust_remote_code (its pipeline.py)
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    objective = "flow"
    shipped = "pretrained"  # the package folder of the shipped weights
    pretrain_hint = "python scripts/pretrain_shapes.py"

    @classmethod
    def pretrained(cls, *, path: str | None = None, resolution: int = 32, dtype: str = "fp32", device="cpu",
                   cache_prompts: bool = True):
        """The shipped pretrained model (or one saved by scripts/pretrain_shapes.py at ``path``)."""
        where = Path(path) if path else pretrained_dir(cls.shipped)
        if not (where / "model_index.json").is_file():
            raise ConfigError(f"no ShapeWorld model at {where}; run `{cls.pretrain_hint}` or set "
                              f"backbone.path to its output directory")
        pipe = ShapesPipeline.from_pretrained(str(where), **dtype_kwarg(parse_dtype(dtype)))
        return cls(pipe, resolution=resolution, max_sequence_length=MAX_TOKENS, device=device, dtype=dtype,
                   cache_prompts=cache_prompts)

    @classmethod
    def random_init(cls, *, seed: int = 0, resolution: int = 32, dtype: str = "fp32", device="cpu",
                    cache_prompts: bool = True):
        """An untrained model of the same architecture (pretraining starts here)."""
        return cls(build_pipeline(seed, objective=cls.objective), resolution=resolution,
                   max_sequence_length=MAX_TOKENS, device=device, dtype=dtype, cache_prompts=cache_prompts)

    @property
    def transformer(self) -> torch.nn.Module:  # the denoiser (a UNet here)
        return self.pipe.unet

    @property
    def vae(self):
        return None

    def latent_multiple(self) -> int:
        return 2 ** (len(self.pipe.unet.config.block_out_channels) - 1)

    def text_encoder_module(self, required: bool = True) -> torch.nn.Module:
        return self.pipe.text_encoder

    def frozen_modules(self):
        return [self.pipe.text_encoder]

    def _encode_uncached(self, prompts: list[str]) -> Conditioning:
        embeds, mask = self.pipe.text_embeddings(*self.pipe.tokenize(prompts, self.device))  # grad: the caller's
        return Conditioning({"prompt_embeds": embeds} if mask is None else {"prompt_embeds": embeds, "mask": mask})

    def latent_shape(self) -> tuple[int, ...]:
        return (3, self.resolution, self.resolution)

    def initial_noise(self, generators: Sequence[torch.Generator]) -> torch.Tensor:
        return torch.stack([torch.randn(self.latent_shape(), generator=g, device=g.device) for g in generators]
                           ).to(self.device)

    def _unet_inputs(self, cond: Conditioning, dtype) -> dict:
        return {"encoder_hidden_states": cond.tensors["prompt_embeds"].to(dtype),
                "encoder_attention_mask": cond.tensors.get("mask")}

    def predict(self, x, timestep, cond, guidance_scale, transformer=None):
        unet = transformer or self.transformer
        dtype = self.compute_dtype(unet)

        def call(x_in, t, c):
            return unet(x_in.to(dtype), t, **self._unet_inputs(c, dtype)).sample

        return self.guided(call, x, timestep, cond, guidance_scale)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Pixel space: the latent is the image in [-1, 1] (the inverse of ``decode`` inside [0, 1])."""
        if images.shape[-2:] != (self.resolution, self.resolution):
            raise ValueError(f"images are {tuple(images.shape[-2:])}, the backbone samples at {self.resolution}px")
        return images.to(self.device).float() * 2 - 1

    def save_pipeline(self, directory: str, solver: str = "ode") -> None:
        """diffusers' layout plus the pipeline's code (``pipeline.py``): load it with
        ``DiffusionPipeline.from_pretrained(directory, trust_remote_code=True)``, no alignrl needed."""
        import json
        import shutil

        from alignrl.shapes import pipeline

        self._save_with_scheduler(directory, solver)
        shutil.copyfile(pipeline.__file__, Path(directory) / "pipeline.py")
        index_file = Path(directory) / "model_index.json"
        index = json.loads(index_file.read_text())
        index["_class_name"] = ["pipeline", "ShapesPipeline"]  # diffusers' custom-pipeline form: <file>, <class>
        index_file.write_text(json.dumps(index, indent=2) + "\n")

    def _save_with_scheduler(self, directory: str, solver: str) -> None:
        self.pipe.save_pretrained(directory, safe_serialization=True)

    def pipeline_call_kwargs(self, num_steps: int, guidance_scale: float, solver: str = "ode") -> dict:
        return {"num_inference_steps": int(num_steps), "guidance_scale": float(guidance_scale)}

    def save_lora(self, directory: str, state_dict: dict[str, torch.Tensor], metadata: dict) -> None:
        ShapesPipeline.save_lora_weights(directory, unet_lora_layers=state_dict, unet_lora_adapter_metadata=metadata,
                                         safe_serialization=True)


class ShapesEpsilonBackbone(UNetBackbone, ShapesBackbone):
    """The ShapeWorld epsilon twin (``shapes_eps``): the same pixel-space UNet and text encoder trained as a DDPM
    noise predictor (``scripts/pretrain_shapes.py --objective epsilon``), run like SD1.5/SDXL: DDIM over its own
    noise schedule in the engine's flow frame (alignrl/backbones/unet.py), so DDPO, DPOK, D3PO, SPO and
    Diffusion-DPO meet the model class they were born on. Text, pixels, export and LoRA are ShapeWorld's."""

    family = "shapes_eps"
    objective = "epsilon"
    shipped = "pretrained_eps"
    pretrain_hint = "python scripts/pretrain_shapes.py --objective epsilon"

    @property
    def vae_scale_factor(self) -> int:
        return 1

    def latent_multiple(self) -> int:
        return ShapesBackbone.latent_multiple(self)

    def latent_shape(self) -> tuple[int, ...]:
        return ShapesBackbone.latent_shape(self)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        return ShapesBackbone._decode(self, latents)

    def _unet_inputs(self, cond: Conditioning, dtype) -> dict:  # with the text padding mask
        return ShapesBackbone._unet_inputs(self, cond, dtype)

    def save_pipeline(self, directory: str, solver: str = "ode") -> None:  # ShapeWorld's, with the solver's scheduler
        ShapesBackbone.save_pipeline(self, directory, solver)

    def _save_with_scheduler(self, directory: str, solver: str) -> None:
        UNetBackbone.save_pipeline(self, directory, solver)

    def pipeline_call_kwargs(self, num_steps: int, guidance_scale: float, solver: str = "ode") -> dict:
        call = ShapesBackbone.pipeline_call_kwargs(self, num_steps, guidance_scale)
        return call if solver == "ode" else {**call, "timesteps": UNetBackbone.pipeline_call_kwargs(
            self, num_steps, guidance_scale, solver)["timesteps"]}
