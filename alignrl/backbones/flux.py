"""FLUX.1 adapter: packed 2x2 latents, embedded guidance (no CFG), resolution-dependent schedule shift."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from alignrl.backbones.base import Backbone, Conditioning, dtype_kwarg, parse_dtype, with_static_shift
from alignrl.backbones import tiny

FLUX_LORA_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
)


class FluxBackbone(Backbone):
    family = "flux"
    uses_cfg = False  # guidance is an input of the model (guidance-distilled), one forward per step
    default_lora_targets = FLUX_LORA_TARGETS

    @classmethod
    def from_pretrained(cls, pretrained: str, *, resolution: int = 512, max_sequence_length: int = 512,
                        dtype: str = "bf16", device="cpu", revision: str | None = None,
                        variant: str | None = None, cache_prompts: bool = True, static_shift: float | None = None):
        from diffusers import FluxPipeline

        pipe = FluxPipeline.from_pretrained(pretrained, **dtype_kwarg(parse_dtype(dtype)), revision=revision,
                                            variant=variant)
        return cls(with_static_shift(pipe, static_shift), resolution=resolution,
                   max_sequence_length=max_sequence_length, device=device, dtype=dtype, cache_prompts=cache_prompts)

    @classmethod
    def tiny(cls, *, seed: int = 0, resolution: int = 64, max_sequence_length: int = 32,
             num_layers: int = 1, num_single_layers: int = 1, hidden: int = 32, vae_channels: int | list[int] = 16,
             dtype: str = "fp32",
             device="cpu", cache_prompts: bool = True, static_shift: float | None = None):
        return cls(with_static_shift(build_tiny_flux_pipeline(seed=seed, num_layers=num_layers,
                                                              num_single_layers=num_single_layers, hidden=hidden,
                                                              vae_channels=vae_channels), static_shift),
                   resolution=resolution, max_sequence_length=max_sequence_length, device=device,
                   dtype=dtype, cache_prompts=cache_prompts)

    def frozen_modules(self):
        p = self.pipe
        return [m for m in (p.text_encoder, p.text_encoder_2, p.vae) if m is not None]

    @property
    def vae_scale_factor(self) -> int:
        return self.pipe.vae_scale_factor

    def latent_multiple(self) -> int:
        return self.vae_scale_factor * 2  # latents are packed in 2x2 patches

    @property
    def _latent_side(self) -> int:
        return 2 * (self.resolution // (self.vae_scale_factor * 2))

    # ----- text ----------------------------------------------------------------------------------
    def _encode_uncached(self, prompts: list[str]) -> Conditioning:
        embeds, pooled, _text_ids = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length,
        )
        return Conditioning({"prompt_embeds": embeds, "pooled": pooled})

    # ----- latents ---------------------------------------------------------------------------------
    def latent_shape(self) -> tuple[int, ...]:
        side = self._latent_side
        channels = self.transformer.config.in_channels // 4
        return ((side // 2) * (side // 2), channels * 4)

    def initial_noise(self, generators: Sequence[torch.Generator]) -> torch.Tensor:
        side = self._latent_side
        channels = self.transformer.config.in_channels // 4
        noise = torch.stack([
            torch.randn((channels, side, side), generator=g, device=g.device, dtype=torch.float32)
            for g in generators
        ]).to(self.device)
        return self.pipe._pack_latents(noise, len(generators), channels, side, side)

    def _schedule_kwargs(self, num_steps: int) -> dict:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        cfg = self.pipe.scheduler.config
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        if not cfg.get("use_dynamic_shifting", False):
            return {"sigmas": sigmas}  # a static shift (backbone.static_shift): the scheduler applies it
        mu = calculate_shift(
            self.latent_shape()[0], cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15),
        )
        return {"sigmas": sigmas, "mu": mu}

    def _image_ids(self) -> torch.Tensor:
        if not hasattr(self, "_img_ids"):
            side = self._latent_side
            self._img_ids = self.pipe._prepare_latent_image_ids(1, side // 2, side // 2, self.device, self.dtype)
            self._txt_ids = torch.zeros(self.max_sequence_length, 3, device=self.device, dtype=self.dtype)
        return self._img_ids

    # ----- model -----------------------------------------------------------------------------------
    def predict(self, x, timestep, cond, guidance_scale, transformer=None):
        transformer = transformer or self.transformer
        dtype = self.compute_dtype(transformer)
        batch = x.shape[0]
        img_ids = self._image_ids()
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((batch,), float(guidance_scale), device=x.device, dtype=torch.float32)
        t = timestep.expand(batch) if timestep.ndim == 0 else timestep
        out = transformer(
            hidden_states=x.to(dtype), timestep=t.to(dtype) / 1000, guidance=guidance,
            pooled_projections=cond.tensors["pooled"].to(dtype),
            encoder_hidden_states=cond.tensors["prompt_embeds"].to(dtype),
            txt_ids=self._txt_ids, img_ids=img_ids, return_dict=False,
        )[0]
        return out.float()

    def pack_latents(self, z: torch.Tensor) -> torch.Tensor:
        b, c, h, w = z.shape
        return self.pipe._pack_latents(z, b, c, h, w)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        z = self.pipe._unpack_latents(latents, self.resolution, self.resolution, self.vae_scale_factor)
        z = z.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(z, return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)


def build_tiny_flux_pipeline(seed: int = 0, num_layers: int = 1, num_single_layers: int = 1, hidden: int = 32,
                             vae_channels: int = 16):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    torch.manual_seed(seed)
    latent_channels = 4
    head_dim = hidden // 2
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, num_layers=num_layers,
        num_single_layers=num_single_layers, attention_head_dim=head_dim, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8),
    )
    text_encoder = CLIPTextModel(tiny.tiny_clip_config(False, 32))
    text_encoder_2 = T5EncoderModel(tiny.tiny_t5_config(d_model=32))
    vae = tiny.tiny_vae(latent_channels=latent_channels, scale_factor=8, channels=vae_channels)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tiny.tiny_clip_tokenizer(),
        text_encoder_2=text_encoder_2, tokenizer_2=tiny.tiny_t5_tokenizer(), transformer=transformer,
    )
