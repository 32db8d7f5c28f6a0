"""SD3 / SD3.5 adapter: three text encoders, shifted flow-match schedule, CFG in one batched forward."""

from __future__ import annotations

from typing import Sequence

import torch

from alignrl.backbones.base import Backbone, Conditioning, dtype_kwarg, parse_dtype, token_ids, with_static_shift
from alignrl.backbones import tiny

SD3_LORA_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
)


class SD3Backbone(Backbone):
    family = "sd3"
    uses_cfg = True
    default_lora_targets = SD3_LORA_TARGETS

    # ----- construction ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained: str, *, resolution: int = 512, max_sequence_length: int = 256,
                        dtype: str = "bf16", device="cpu", revision: str | None = None,
                        variant: str | None = None, cache_prompts: bool = True, static_shift: float | None = None):
        """Load real weights (hub id or local directory) through diffusers."""
        from diffusers import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline.from_pretrained(
            pretrained, **dtype_kwarg(parse_dtype(dtype)), revision=revision, variant=variant
        )
        return cls(with_static_shift(pipe, static_shift), resolution=resolution,
                   max_sequence_length=max_sequence_length, device=device, dtype=dtype, cache_prompts=cache_prompts)

    @classmethod
    def tiny(cls, *, seed: int = 0, resolution: int = 64, max_sequence_length: int = 32,
             num_layers: int = 2, hidden: int = 32, vae_channels: int | list[int] = 16, dtype: str = "fp32", device="cpu",
             cache_prompts: bool = True, static_shift: float | None = None):
        """A random-init SD3 of the real classes (offline tokenizers), seeded so every process agrees."""
        return cls(with_static_shift(build_tiny_sd3_pipeline(seed=seed, num_layers=num_layers, hidden=hidden,
                                                             vae_channels=vae_channels), static_shift),
                   resolution=resolution, max_sequence_length=max_sequence_length, device=device,
                   dtype=dtype, cache_prompts=cache_prompts)

    def frozen_modules(self):
        p = self.pipe
        return [m for m in (p.text_encoder, p.text_encoder_2, p.text_encoder_3, p.vae) if m is not None]

    @property
    def vae_scale_factor(self) -> int:
        return self.pipe.vae_scale_factor

    def latent_multiple(self) -> int:
        return self.vae_scale_factor * self.transformer.config.patch_size

    # ----- text ----------------------------------------------------------------------------------
    def _encode_uncached(self, prompts: list[str]) -> Conditioning:
        return self._encode_chunks([prompts])[0]

    def _encode_chunks(self, chunks: list[list[str]]) -> list[Conditioning]:
        """What the pipeline's ``encode_prompt`` returns for each chunk (the same numbers, checked bit for bit in the
        tests), with each tokenizer called once over all the chunks' prompts, instead of twice per chunk (the
        pipeline tokenizes a second time, untruncated, only to warn about truncation: here the tokenizer's own
        overflow says that)."""
        pipe = self.pipe
        rows = [p for chunk in chunks for p in chunk]
        clip_ids = [token_ids(tok, rows, pipe.tokenizer_max_length, f"CLIP ({pipe.tokenizer_max_length} tokens)")
                    for tok in (pipe.tokenizer, pipe.tokenizer_2)]
        t5_ids = None if pipe.text_encoder_3 is None else \
            token_ids(pipe.tokenizer_3, rows, self.max_sequence_length,
                      f"T5 (backbone.max_sequence_length={self.max_sequence_length})")
        out, lo = [], 0
        for chunk in chunks:
            hi = lo + len(chunk)
            out.append(self._encode_ids([ids[lo:hi] for ids in clip_ids], None if t5_ids is None else t5_ids[lo:hi]))
            lo = hi
        return out

    def _encode_ids(self, clip_ids: list[torch.Tensor], t5_ids: torch.Tensor | None) -> Conditioning:
        """The pipeline's prompt embeddings from token ids: both CLIPs' penultimate hidden states side by side, zero
        padded to T5's width, followed by T5's sequence (zeros without T5); the CLIPs' pooled outputs side by side."""
        pipe, device = self.pipe, self.device
        embeds, pooled = [], []
        for encoder, ids in zip((pipe.text_encoder, pipe.text_encoder_2), clip_ids):
            out = encoder(ids.to(device), output_hidden_states=True)
            pooled.append(out[0])
            embeds.append(out.hidden_states[-2].to(dtype=pipe.text_encoder.dtype, device=device))
        clip = torch.cat(embeds, dim=-1)
        if t5_ids is None:
            t5 = torch.zeros((clip.shape[0], self.max_sequence_length, self.transformer.config.joint_attention_dim),
                             device=device, dtype=pipe.text_encoder.dtype)
        else:
            t5 = pipe.text_encoder_3(t5_ids.to(device))[0].to(dtype=pipe.text_encoder_3.dtype, device=device)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return Conditioning({"prompt_embeds": torch.cat([clip, t5], dim=-2), "pooled": torch.cat(pooled, dim=-1)})

    # ----- latents ---------------------------------------------------------------------------------
    def latent_shape(self) -> tuple[int, ...]:
        side = self.resolution // self.vae_scale_factor
        return (self.transformer.config.in_channels, side, side)

    def initial_noise(self, generators: Sequence[torch.Generator]) -> torch.Tensor:
        shape = self.latent_shape()
        return torch.stack([
            torch.randn(shape, generator=g, device=g.device, dtype=torch.float32) for g in generators
        ]).to(self.device)

    # ----- model -----------------------------------------------------------------------------------
    def predict(self, x, timestep, cond, guidance_scale, transformer=None):
        transformer = transformer or self.transformer
        dtype = self.compute_dtype(transformer)

        def call(x_in, t, c):
            return transformer(hidden_states=x_in.to(dtype), timestep=t,
                               encoder_hidden_states=c.tensors["prompt_embeds"].to(dtype),
                               pooled_projections=c.tensors["pooled"].to(dtype), return_dict=False)[0]

        return self.guided(call, x, timestep, cond, guidance_scale)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        z = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(z, return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)


def build_tiny_sd3_pipeline(seed: int = 0, num_layers: int = 2, hidden: int = 32, vae_channels: int = 16):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    torch.manual_seed(seed)
    clip_hidden = 32
    t5_dim = 2 * clip_hidden  # joint dim must hold both CLIP hidden states side by side
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=num_layers,
        attention_head_dim=hidden // 2, num_attention_heads=2, joint_attention_dim=t5_dim,
        caption_projection_dim=hidden, pooled_projection_dim=2 * clip_hidden, pos_embed_max_size=32,
    )
    text_encoder = CLIPTextModelWithProjection(tiny.tiny_clip_config(True, clip_hidden))
    text_encoder_2 = CLIPTextModelWithProjection(tiny.tiny_clip_config(True, clip_hidden))
    text_encoder_3 = T5EncoderModel(tiny.tiny_t5_config(d_model=t5_dim))
    vae = tiny.tiny_vae(latent_channels=4, scale_factor=8, channels=vae_channels)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae,
        text_encoder=text_encoder, tokenizer=tiny.tiny_clip_tokenizer(),
        text_encoder_2=text_encoder_2, tokenizer_2=tiny.tiny_clip_tokenizer(),
        text_encoder_3=text_encoder_3, tokenizer_3=tiny.tiny_t5_tokenizer(),
    )
