"""Wan2.1 text-to-video adapter: UMT5 text encoder, 3D causal VAE, flow matching on Wan's own sigma grid.

A sample is a video. Latents are (C=16, F', H/8, W/8) per sample with F' = (F - 1) / 4 + 1 latent frames
(the VAE compresses 4 frames into one after the first); ``decode`` returns frames (B, F, 3, H, W) in [0, 1],
frame axis before channels as diffusers' ``output_type="pt"`` does. Rewards see those 5-D batches: image
rewards are applied frame by frame (alignrl/rewards/base.py, ``frames:`` aggregation), video rewards take the
whole clip.

The schedule is the sigma grid of the pipeline's own scheduler (UniPC with flow sigmas, shift 3 for 480p,
5 for 720p): the engine steps it with its own Euler / SDE kernels, as the reference trainers do (UniPC is a
multistep solver without a per-step Gaussian, so RL needs its own step on Wan's grid). CFG uses the empty
prompt as the negative, two forwards batched into one. Prompt embeddings are UMT5's output cut at the real
tokens and zero-padded to ``max_sequence_length`` (512 in the pipeline's ``__call__``): Wan's cross-attention
has no mask, so the padded length changes the output; keep 512 for real weights.
"""

from __future__ import annotations

from typing import Sequence

import torch

from alignrl.backbones import tiny
from alignrl.backbones.base import Backbone, Conditioning, dtype_kwarg, parse_dtype
from alignrl.errors import ConfigError

# self- and cross-attention projections of every block (the reference's LoRA targets)
WAN_LORA_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")


def check_num_frames(num_frames: int, temporal: int = 4) -> int:
    n = int(num_frames)
    if n < 1 or (n - 1) % temporal:
        fix = max(1, (n - 1) // temporal * temporal + 1)
        raise ConfigError(f"backbone.num_frames={n}: Wan's VAE takes {temporal}k+1 frames; use {fix} or "
                          f"{fix + temporal}")
    return n


class WanBackbone(Backbone):
    family = "wan21"
    uses_cfg = True
    is_video = True
    default_lora_targets = WAN_LORA_TARGETS

    def __init__(self, pipe, *, resolution: int, max_sequence_length: int, num_frames: int = 9,
                 width: int | None = None, **kwargs):
        self.num_frames = check_num_frames(num_frames, pipe.vae_scale_factor_temporal)
        self.width = int(width) if width else int(resolution)
        super().__init__(pipe, resolution=resolution, max_sequence_length=max_sequence_length, **kwargs)
        multiple = self.latent_multiple()
        if self.width % multiple:
            raise ConfigError(f"backbone.width={self.width} must be a multiple of {multiple} for wan21; use "
                              f"{self.width - self.width % multiple or multiple}")

    # ----- construction ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained: str, *, resolution: int = 240, width: int | None = 416,
                        num_frames: int = 33, max_sequence_length: int = 512, dtype: str = "bf16", device="cpu",
                        revision: str | None = None, variant: str | None = None, cache_prompts: bool = True,
                        flow_shift: float | None = None, frozen_dtype: str | None = None):
        """Real weights (hub id such as ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``, or a local diffusers directory).
        ``resolution`` is the height; ``width`` null means square; ``frozen_dtype`` (null: ``dtype``) is the UMT5
        encoder's and the VAE's."""
        from diffusers import WanPipeline

        pipe = WanPipeline.from_pretrained(pretrained, **dtype_kwarg(parse_dtype(dtype)),
                                           revision=revision, variant=variant)
        return cls(with_flow_shift(pipe, flow_shift), resolution=resolution, width=width, num_frames=num_frames,
                   max_sequence_length=max_sequence_length, device=device, dtype=dtype, cache_prompts=cache_prompts,
                   frozen_dtype=frozen_dtype)

    @classmethod
    def tiny(cls, *, seed: int = 0, resolution: int = 32, width: int | None = None, num_frames: int = 5,
             max_sequence_length: int = 16, num_layers: int = 2, heads: int = 2, head_dim: int = 12,
             vae_dim: int = 8, dtype: str = "fp32", device="cpu", cache_prompts: bool = True,
             flow_shift: float | None = None, frozen_dtype: str | None = None):
        """A random-init Wan2.1 of the real classes (offline tokenizer), seeded so every process agrees."""
        pipe = build_tiny_wan_pipeline(seed=seed, num_layers=num_layers, heads=heads, head_dim=head_dim,
                                       vae_dim=vae_dim)
        return cls(with_flow_shift(pipe, flow_shift), resolution=resolution, width=width, num_frames=num_frames,
                   max_sequence_length=max_sequence_length, device=device, dtype=dtype, cache_prompts=cache_prompts,
                   frozen_dtype=frozen_dtype)

    def frozen_modules(self):
        return [m for m in (self.pipe.text_encoder, self.pipe.vae) if m is not None]

    def latent_multiple(self) -> int:
        return self.pipe.vae_scale_factor_spatial * self.transformer.config.patch_size[1]

    def text_encoder_module(self, required: bool = True) -> torch.nn.Module | None:
        return self.pipe.text_encoder

    # ----- text ----------------------------------------------------------------------------------
    def _encode_uncached(self, prompts: list[str]) -> Conditioning:
        embeds = self.pipe._get_t5_prompt_embeds(prompt=prompts, max_sequence_length=self.max_sequence_length,
                                                 device=self.device)
        return Conditioning({"prompt_embeds": embeds})

    # ----- latents ---------------------------------------------------------------------------------
    @property
    def latent_frames(self) -> int:
        return (self.num_frames - 1) // self.pipe.vae_scale_factor_temporal + 1

    def latent_shape(self) -> tuple[int, ...]:
        s = self.pipe.vae_scale_factor_spatial
        return (self.transformer.config.in_channels, self.latent_frames, self.resolution // s, self.width // s)

    def initial_noise(self, generators: Sequence[torch.Generator]) -> torch.Tensor:
        shape = self.latent_shape()
        return torch.stack([
            torch.randn(shape, generator=g, device=g.device, dtype=torch.float32) for g in generators
        ]).to(self.device)

    def _latent_stats(self, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.vae.config
        shape = (1, cfg.z_dim, 1, 1, 1)
        mean = torch.tensor(cfg.latents_mean, device=device, dtype=dtype).view(shape)
        std = torch.tensor(cfg.latents_std, device=device, dtype=dtype).view(shape)
        return mean, std

    # ----- model -----------------------------------------------------------------------------------
    def predict(self, x, timestep, cond, guidance_scale, transformer=None):
        transformer = transformer or self.transformer
        dtype = self.compute_dtype(transformer)

        def call(x_in, t, c):
            return transformer(hidden_states=x_in.to(dtype), timestep=t,
                               encoder_hidden_states=c.tensors["prompt_embeds"].to(dtype), return_dict=False)[0]

        return self.guided(call, x, timestep, cond, guidance_scale)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Frames (B, F, 3, H, W) in [0, 1]."""
        vae = self.vae
        mean, std = self._latent_stats(latents.device, vae.dtype)
        video = vae.decode(latents.to(vae.dtype) * std + mean, return_dict=False)[0]  # (B, 3, F, H, W)
        return (video.float() / 2 + 0.5).clamp(0, 1).transpose(1, 2).contiguous()

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Latents of videos (B, F, 3, H, W) in [0, 1] (what ``decode`` returns): the posterior mean, normalised
        per channel as ``decode`` undoes it."""
        vae = self.vae
        if images.ndim != 5 or tuple(images.shape[-2:]) != (self.resolution, self.width) \
                or images.shape[1] != self.num_frames:
            raise ValueError(f"videos are {tuple(images.shape)}; wan21 takes (B, {self.num_frames}, 3, "
                             f"{self.resolution}, {self.width}) in [0, 1]")
        x = images.to(self.device, vae.dtype).transpose(1, 2) * 2 - 1
        z = vae.encode(x, return_dict=False)[0].mode()
        mean, std = self._latent_stats(z.device, z.dtype)
        return ((z - mean) / std).float()

    # ----- export ----------------------------------------------------------------------------------
    def euler_scheduler(self):
        """The pipeline's UniPC at first order with its corrector off: in the flow frame that is the Euler step on
        the same sigma grid, so the exported pipeline's ``__call__`` samples what alignrl's ODE evaluation does
        (checked to 1e-6 on the tiny model). Wan's own sampler is UniPC at order 2 with the corrector: set
        ``solver_order=2, disable_corrector=[]`` on the exported scheduler to get it back."""
        scheduler = self.pipe.scheduler
        return type(scheduler).from_config(scheduler.config, solver_order=1,
                                           disable_corrector=list(range(scheduler.config.num_train_timesteps)))

    def save_pipeline(self, directory: str, solver: str = "ode") -> None:
        own = self.pipe.scheduler
        self.pipe.scheduler = self.euler_scheduler()
        try:
            self.pipe.save_pretrained(directory, safe_serialization=True)
        finally:
            self.pipe.scheduler = own

    def pipeline_call_kwargs(self, num_steps: int, guidance_scale: float, solver: str = "ode") -> dict:
        return {"num_inference_steps": int(num_steps), "guidance_scale": float(guidance_scale),
                "height": self.resolution, "width": self.width, "num_frames": self.num_frames,
                "max_sequence_length": self.max_sequence_length}

    def describe(self) -> str:
        return (super().describe().replace(f"{self.resolution}px", f"{self.num_frames} frames "
                                           f"{self.resolution}x{self.width}"))


def with_flow_shift(pipe, shift: float | None):
    """``shift`` (Wan: 3.0 for 480p, 5.0 for 720p) on the pipeline's scheduler; None keeps its own."""
    if shift is not None:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, flow_shift=float(shift))
    return pipe


def build_tiny_wan_pipeline(seed: int = 0, num_layers: int = 2, heads: int = 2, head_dim: int = 12,
                            vae_dim: int = 8):
    """The real Wan classes at toy sizes: WanTransformer3DModel, AutoencoderKLWan, UMT5, UniPC flow sigmas."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    tok = tiny.tiny_t5_tokenizer()
    text_dim = 32
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=16,
        out_channels=16, text_dim=text_dim, freq_dim=32, ffn_dim=32, num_layers=num_layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )
    vae = AutoencoderKLWan(base_dim=vae_dim, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tok), d_model=text_dim, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0))
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=3.0)
    return WanPipeline(tokenizer=tok, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=transformer)
