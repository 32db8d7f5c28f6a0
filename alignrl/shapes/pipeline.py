"""The ShapeWorld diffusers pipeline: a pixel-space conditional UNet sampled by rectified flow (Euler ODE, CFG),
or, for the epsilon-prediction twin (a DDIM scheduler in the pipeline), by DDIM with eta 0.

This file imports only torch and diffusers: ``alignrl export`` copies it into an exported pipeline directory
as ``pipeline.py``, so ``DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)`` loads a ShapeWorld
model on a machine without alignrl.

The text encoder is bidirectional (a BERT encoder) and its padding mask reaches the UNet's cross-attention, so
the prompt's words, colour words included, are what the image attends to; a first-version model with a causal
CLIP text encoder (no mask) still loads and samples as it was trained.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline
from diffusers.loaders import StableDiffusionLoraLoaderMixin

MAX_TOKENS = 10  # prompts are padded or cut to this many word tokens (a [CLS] token first)


class ShapesPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    model_cpu_offload_seq = "text_encoder->unet"

    def __init__(self, unet, text_encoder, tokenizer, scheduler):
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)

    @property
    def masked_text(self) -> bool:
        """Whether the text encoder takes a padding mask (and the UNet's cross-attention gets it)."""
        return getattr(self.text_encoder.config, "model_type", "") != "clip_text_model"

    def tokenize(self, prompts: list[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizer(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                             return_tensors="pt")
        device = device or self.text_encoder.device
        return tok.input_ids.to(device), tok.attention_mask.to(device)

    def text_embeddings(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token states and the mask the UNet should use (None: attend to every position); with gradients."""
        if self.masked_text:
            return self.text_encoder(ids, attention_mask=mask)[0], mask
        return self.text_encoder(ids)[0], None

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], device=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.text_embeddings(*self.tokenize(prompts, device))

    @torch.no_grad()
    def __call__(self, prompt: list[str] | str, num_inference_steps: int = 20, guidance_scale: float = 3.0,
                 generator: torch.Generator | list[torch.Generator] | None = None, latents: torch.Tensor | None = None,
                 timesteps: list[int] | None = None):
        """Euler ODE sampling with CFG; returns images in [0, 1], (B, 3, 32, 32).

        ``generator``: one for the whole batch, or a list with one per prompt (each image's noise then
        depends only on its own generator, as in ``alignrl sample``).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        device = self.unet.device
        cond, cond_mask = self.encode_prompt(prompts, device)
        uncond, uncond_mask = self.encode_prompt([""] * len(prompts), device)
        side = self.unet.config.sample_size
        if latents is None:
            if isinstance(generator, (list, tuple)):
                if len(generator) != len(prompts):
                    raise ValueError(f"got {len(generator)} generators for {len(prompts)} prompts")
                latents = torch.stack([torch.randn((3, side, side), generator=g) for g in generator])
            else:
                latents = torch.randn((len(prompts), 3, side, side), generator=generator)
        x = latents.to(device).float()
        dtype = self.unet.dtype
        embeds = torch.cat([uncond, cond]).to(dtype)
        mask = torch.cat([uncond_mask, cond_mask]) if cond_mask is not None else None
        if timesteps is not None:  # a given grid (noise-schedule schedulers: DDIM, DPM-Solver++)
            self.scheduler.set_timesteps(timesteps=list(timesteps))
        else:
            self.scheduler.set_timesteps(num_inference_steps)
        flow = not hasattr(self.scheduler, "alphas_cumprod")  # a noise-schedule (DDIM) scheduler: epsilon or v
        for i, t in enumerate(self.scheduler.timesteps):
            out = self.unet(torch.cat([x, x]).to(dtype), t.expand(2 * len(prompts)), encoder_hidden_states=embeds,
                            encoder_attention_mask=mask).sample
            u, c = out.float().chunk(2)
            guided = u + guidance_scale * (c - u)
            if flow:
                x = x + (self.scheduler.sigmas[i + 1] - self.scheduler.sigmas[i]) * guided
            else:
                x = self.scheduler.step(guided, t, x).prev_sample  # DDIM: eta 0
        return (x / 2 + 0.5).clamp(0, 1)
