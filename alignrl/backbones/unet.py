"""Stable Diffusion 1.x/2.x (``sd15``) and SDXL (``sdxl``) adapters: UNet2DConditionModel, epsilon or v-prediction,
a variance-preserving (DDPM) noise schedule.

The engine runs every backbone in one *flow frame* (alignrl/sampling/parameterisation.py): a UNet latent ``x`` at
noise level ``abar`` is ``x~ = x / (sqrt(abar) + sqrt(1 - abar))`` at flow time ``t = sqrt(1 - abar) /
(sqrt(abar) + sqrt(1 - abar))``, where DDIM with eta 0 is exactly the Euler step. So ``predict`` takes flow-frame
latents, calls the UNet on its own latents at its own integer timestep, and returns the flow velocity
``eps - x0``; ``make_schedule`` gives DDIM's timesteps (the checkpoint's scheduler config through
``DDIMScheduler.from_config``, as DDPO samples) and their flow times. The last DDIM step goes to
``final_alpha_cumprod`` (``abar[0]`` for SD1.5/SDXL, ``set_alpha_to_one=False``), so schedules end slightly above
t = 0 and the rollout returns the model's own latent there, as the diffusers pipelines decode it. Each step goes
exactly to the next grid timestep; with 'leading' or 'linspace' spacing that is diffusers' DDIM step, with
'trailing' spacing and a step count that does not divide the training steps diffusers' DDIM lands on
``t - T // n`` instead (a slightly different sampler: exported pipelines then differ from alignrl's samples).

Classifier-free guidance combines the UNet's outputs in one batched forward; it is the same combination of
velocities, since the velocity is affine in epsilon (or v) at a fixed latent. SDXL adds its pooled text embedding
and the six size/crop ids; with ``force_zeros_for_empty_prompt`` (SDXL base) the CFG negative is zeros, as in
its pipeline.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import torch

from alignrl.backbones import tiny
from alignrl.backbones.base import Backbone, Conditioning, Schedule, dtype_kwarg, parse_dtype
from alignrl.errors import ConfigError
from alignrl.sampling.parameterisation import PREDICTION_TYPES, _shaped, sigma_of_alpha_bar, vp_coefficients

UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
SINGLE_FILE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def _check_single_file(pretrained: str, config: str | None) -> bool:
    """Whether ``pretrained`` names a single-file checkpoint (the format model sites ship); refuses pickles."""
    suffix = Path(pretrained).suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise ConfigError(f"backbone.pretrained={pretrained}: pickled checkpoints can run code when loaded; convert "
                          f"it to .safetensors (or use a diffusers-layout directory)")
    if suffix not in SINGLE_FILE_SUFFIXES:
        return False
    if not Path(pretrained).is_file():
        raise ConfigError(f"backbone.pretrained={pretrained}: no such file")
    return True


class UNetBackbone(Backbone):
    """What SD1.5 and SDXL share: the UNet, the DDIM schedule in flow time, the frame conversions, CFG."""

    uses_cfg = True
    default_lora_targets = UNET_LORA_TARGETS

    @classmethod
    def _load(cls, pipeline_class, pretrained: str, config, revision, variant, dtype: str, extra: dict, **kwargs):
        """``pipeline_class`` from a single file (with ``config``) or a hub id / directory, then the adapter."""
        kw = {**dtype_kwarg(parse_dtype(dtype)), **extra}
        if _check_single_file(pretrained, config):
            pipe = pipeline_class.from_single_file(pretrained, config=config, **kw)
        else:
            pipe = pipeline_class.from_pretrained(pretrained, revision=revision, variant=variant, **kw)
        return cls(pipe, max_sequence_length=pipe.tokenizer.model_max_length, dtype=dtype, **kwargs)

    def __init__(self, pipe, **kwargs):
        from diffusers import DDIMScheduler

        # DDIM over the checkpoint's own noise schedule (betas, offsets, spacing, prediction type), whatever
        # scheduler class it ships (PNDM for SD1.5, Euler for SDXL); the pipeline keeps its own for export
        self.ddim = DDIMScheduler.from_config(pipe.scheduler.config)
        self.prediction_type = str(self.ddim.config.prediction_type)
        if self.prediction_type not in PREDICTION_TYPES[1:]:
            raise ConfigError(f"{type(self).__name__}: the scheduler's prediction_type '{self.prediction_type}' is "
                              f"not supported; epsilon or v_prediction")
        super().__init__(pipe, **kwargs)
        self._alpha_bar = self.ddim.alphas_cumprod.to(self.device, torch.float64)  # read at every model call

    # ----- modules -------------------------------------------------------------------------------
    @property
    def transformer(self) -> torch.nn.Module:  # the trained denoiser (a UNet; the protocol's name)
        return self.pipe.unet

    @property
    def vae_scale_factor(self) -> int:
        return self.pipe.vae_scale_factor

    def latent_multiple(self) -> int:
        return self.vae_scale_factor * 2 ** (len(self.pipe.unet.config.down_block_types) - 1)

    def latent_shape(self) -> tuple[int, ...]:
        side = self.resolution // self.vae_scale_factor
        return (self.pipe.unet.config.in_channels, side, side)

    def initial_noise(self, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """Standard-normal latents (DDIM's ``init_noise_sigma`` is 1)."""
        shape = self.latent_shape()
        return torch.stack([torch.randn(shape, generator=g, device=g.device, dtype=torch.float32)
                            for g in generators]).to(self.device)

    # ----- the flow frame --------------------------------------------------------------------------
    def to_frame(self, x, sigma):
        return x * _shaped(vp_coefficients(torch.as_tensor(sigma, dtype=torch.float32, device=x.device))[2], x)

    def from_frame(self, x, sigma):
        return x / _shaped(vp_coefficients(torch.as_tensor(sigma, dtype=torch.float32, device=x.device))[2], x)

    def make_schedule(self, num_steps: int) -> Schedule:
        """DDIM's timesteps for ``num_steps`` (all ``num_train_timesteps`` of them, T-1 .. 0, at that count or
        above: the training grid) and their flow times; the last step ends at ``final_alpha_cumprod``."""
        if num_steps not in self._schedules:
            train = int(self.ddim.config.num_train_timesteps)
            if num_steps >= train:
                timesteps = torch.arange(train - 1, -1, -1)
            else:
                scheduler = copy.deepcopy(self.ddim)
                scheduler.set_timesteps(num_steps)
                timesteps = scheduler.timesteps.long()
            alpha_bar = self._alpha_bar.cpu()
            alpha_bar = torch.cat([alpha_bar[timesteps], alpha_bar.new_tensor([float(self.ddim.final_alpha_cumprod)])])
            self._schedules[num_steps] = Schedule(sigma_of_alpha_bar(alpha_bar),
                                                  timesteps.to(torch.float32)).to(self.device)
        return self._schedules[num_steps]

    # ----- model -----------------------------------------------------------------------------------
    def _unet_inputs(self, cond: Conditioning, dtype) -> dict:
        return {"encoder_hidden_states": cond.tensors["prompt_embeds"].to(dtype)}

    def predict(self, x, timestep, cond, guidance_scale, transformer=None):
        unet = transformer or self.transformer
        dtype = self.compute_dtype(unet)
        t_int = torch.as_tensor(timestep, device=x.device).round().long()
        alpha_bar = self._alpha_bar[t_int]
        a = _shaped(alpha_bar.sqrt().to(x.dtype), x)
        s = _shaped((1 - alpha_bar).sqrt().to(x.dtype), x)
        x_model = x * (a + s)  # the UNet's own latent

        def call(x_in, t, c):
            return unet(x_in.to(dtype), t, return_dict=False, **self._unet_inputs(c, dtype))[0]

        out = self.guided(call, x_model, t_int, cond, guidance_scale)  # the UNet's output, CFG combined, float32
        x_model = x_model.float()
        a, s = a.float(), s.float()
        if self.prediction_type == "epsilon":
            eps = out
            x0 = (x_model - s * eps) / a
        else:  # v-prediction: v = a eps - s x0
            x0 = a * x_model - s * out
            eps = s * x_model + a * out
        return eps - x0

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        shift = vae.config.get("shift_factor") or 0.0
        z = latents.to(vae.dtype) / vae.config.scaling_factor + shift
        image = vae.decode(z, return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def save_lora(self, directory: str, state_dict: dict[str, torch.Tensor], metadata: dict) -> None:
        type(self.pipe).save_lora_weights(directory, unet_lora_layers=state_dict, unet_lora_adapter_metadata=metadata,
                                          safe_serialization=True)

    export_solvers = ("ode", "dpm2m")

    def dpm_solver_scheduler(self):
        """diffusers' DPM-Solver++(2M) over the checkpoint's noise schedule, set as alignrl's ``dpm2m`` evaluation
        runs: second order with the midpoint combination, first order at the last step under 15 steps, ending at
        the same noise level as DDIM (``abar[0]``, or clean with ``set_alpha_to_one``). Sample it on alignrl's
        grid: ``pipe(..., timesteps=backbone.timesteps(n))``."""
        from diffusers import DPMSolverMultistepScheduler

        final = "zero" if float(self.ddim.final_alpha_cumprod) >= 1 else "sigma_min"
        return DPMSolverMultistepScheduler.from_config(
            self.ddim.config, algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
            lower_order_final=True, euler_at_final=False, final_sigmas_type=final, use_karras_sigmas=False,
            thresholding=False)

    def timesteps(self, num_steps: int) -> list[int]:
        """The integer UNet timesteps alignrl's ``num_steps`` schedule visits (DDIM's)."""
        return [int(t) for t in self.make_schedule(num_steps).timesteps.round().tolist()]

    def _scheduler_for(self, solver: str):
        if solver not in self.export_solvers:
            raise ConfigError(f"solver '{solver}' is not known; use one of {', '.join(self.export_solvers)}")
        return copy.deepcopy(self.ddim) if solver == "ode" else self.dpm_solver_scheduler()

    def save_pipeline(self, directory: str, solver: str = "ode") -> None:
        """diffusers' layout with the scheduler alignrl evaluates with over the checkpoint's own noise schedule
        (DDIM for ``ode``, DPM-Solver++(2M) for ``dpm2m``), so ``pipe(**pipeline_call_kwargs)`` draws alignrl's
        evaluation samples; any other scheduler swaps in as usual (``pipe.scheduler = X.from_config(...)``)."""
        shipped = self.pipe.scheduler
        self.pipe.scheduler = self._scheduler_for(solver)
        try:
            self.pipe.save_pretrained(directory, safe_serialization=True)
        finally:
            self.pipe.scheduler = shipped

    def pipeline_call_kwargs(self, num_steps: int, guidance_scale: float, solver: str = "ode") -> dict:
        call = {"num_inference_steps": int(num_steps), "guidance_scale": float(guidance_scale),
                "height": self.resolution, "width": self.resolution}
        if solver == "ode":
            return {**call, "eta": 0.0}
        self._scheduler_for(solver)
        return {**call, "timesteps": self.timesteps(num_steps)}  # DDIM's grid, not DPM-Solver's own spacing


class SD15Backbone(UNetBackbone):
    """Stable Diffusion 1.x/2.x: one CLIP text encoder (last hidden state), CFG against the empty prompt."""

    family = "sd15"

    @classmethod
    def from_pretrained(cls, pretrained: str, *, resolution: int = 512, dtype: str = "fp16", device="cpu",
                        revision: str | None = None, variant: str | None = None, config: str | None = None,
                        cache_prompts: bool = True):
        """Real weights: a hub id or diffusers-layout directory, or a single-file ``.safetensors`` checkpoint (as
        model sites ship them; ``config`` names the diffusers-layout model whose configs it uses, a hub id or a
        local directory, which offline machines need)."""
        from diffusers import StableDiffusionPipeline

        return cls._load(StableDiffusionPipeline, pretrained, config, revision, variant, dtype,
                         {"safety_checker": None, "requires_safety_checker": False}, resolution=resolution,
                         device=device, cache_prompts=cache_prompts)

    @classmethod
    def tiny(cls, *, seed: int = 0, resolution: int = 64, prediction_type: str = "epsilon", vae_channels: int = 16,
             dtype: str = "fp32", device="cpu", cache_prompts: bool = True):
        """A random-init SD1.5 of the real classes (offline tokenizer), seeded so every process agrees."""
        return cls(build_tiny_sd15_pipeline(seed=seed, prediction_type=prediction_type, vae_channels=vae_channels),
                   resolution=resolution, max_sequence_length=77, device=device, dtype=dtype,
                   cache_prompts=cache_prompts)

    def frozen_modules(self):
        return [m for m in (self.pipe.text_encoder, self.pipe.vae) if m is not None]

    def text_encoder_module(self, required: bool = True) -> torch.nn.Module:
        return self.pipe.text_encoder

    def _encode_uncached(self, prompts: list[str]) -> Conditioning:
        embeds, _ = self.pipe.encode_prompt(prompts, self.device, 1, False)
        return Conditioning({"prompt_embeds": embeds})


class SDXLBackbone(UNetBackbone):
    """SDXL: two CLIP text encoders (penultimate hidden states side by side), the second one's pooled embedding
    and the size/crop ids as added conditions; zeros as the CFG negative when the checkpoint says so."""

    family = "sdxl"

    @classmethod
    def from_pretrained(cls, pretrained: str, *, resolution: int = 1024, dtype: str = "fp16", device="cpu",
                        revision: str | None = None, variant: str | None = None, config: str | None = None,
                        vae: str | None = None, cache_prompts: bool = True):
        """As ``SD15Backbone.from_pretrained``, for SDXL checkpoints; ``vae`` replaces the checkpoint's VAE (a hub
        id or directory of an AutoencoderKL, e.g. madebyollin/sdxl-vae-fp16-fix, which decodes in fp16)."""
        from diffusers import AutoencoderKL, StableDiffusionXLPipeline

        extra = {"vae": AutoencoderKL.from_pretrained(vae, **dtype_kwarg(parse_dtype(dtype)))} if vae else {}
        return cls._load(StableDiffusionXLPipeline, pretrained, config, revision, variant, dtype, extra,
                         resolution=resolution, device=device, cache_prompts=cache_prompts)

    @classmethod
    def tiny(cls, *, seed: int = 0, resolution: int = 64, prediction_type: str = "epsilon", vae_channels: int = 16,
             dtype: str = "fp32", device="cpu", cache_prompts: bool = True):
        return cls(build_tiny_sdxl_pipeline(seed=seed, prediction_type=prediction_type, vae_channels=vae_channels),
                   resolution=resolution, max_sequence_length=77, device=device, dtype=dtype,
                   cache_prompts=cache_prompts)

    def __init__(self, pipe, **kwargs):
        super().__init__(pipe, **kwargs)
        vae = self.pipe.vae
        if self.dtype == torch.float16 and vae.config.get("force_upcast", False):
            vae.to(torch.float32)  # the SDXL VAE overflows in fp16; it decodes in fp32, as the pipeline upcasts

    def frozen_modules(self):
        p = self.pipe
        return [m for m in (p.text_encoder, p.text_encoder_2, p.vae) if m is not None]

    def _time_ids(self, rows: int) -> torch.Tensor:
        te2 = self.pipe.text_encoder_2
        size = (self.resolution, self.resolution)
        ids = self.pipe._get_add_time_ids(size, (0, 0), size, dtype=torch.float32,
                                          text_encoder_projection_dim=int(te2.config.projection_dim))
        return ids.to(self.device).expand(rows, -1)

    def _encode_uncached(self, prompts: list[str]) -> Conditioning:
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, device=self.device, num_images_per_prompt=1,
                                                       do_classifier_free_guidance=False)
        return Conditioning({"prompt_embeds": embeds, "pooled": pooled, "time_ids": self._time_ids(len(prompts))})

    def negative_conditioning(self) -> Conditioning:
        if not self.pipe.config.get("force_zeros_for_empty_prompt", False):
            return super().negative_conditioning()
        if self._negative is None:
            with torch.no_grad():
                cond = self._encode_uncached([""])
            self._negative = Conditioning({k: (v if k == "time_ids" else torch.zeros_like(v))
                                           for k, v in cond.tensors.items()})
        return self._negative

    def _unet_inputs(self, cond: Conditioning, dtype) -> dict:
        t = cond.tensors
        return {"encoder_hidden_states": t["prompt_embeds"].to(dtype),
                "added_cond_kwargs": {"text_embeds": t["pooled"].to(dtype), "time_ids": t["time_ids"].to(dtype)}}


# ---------------------------------------------------------------------------------------------- tiny builds
def _tiny_scheduler(prediction_type: str):
    from diffusers import DDIMScheduler

    if prediction_type not in PREDICTION_TYPES[1:]:
        raise ConfigError(f"prediction_type '{prediction_type}' is not known for UNet models; epsilon or v_prediction")
    # the betas and offsets SD1.5/SDXL checkpoints ship (in their PNDM/Euler configs)
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
                         prediction_type=prediction_type)


def _tiny_vae(scaling_factor: float, channels: int, force_upcast: bool = False):
    vae = tiny.tiny_vae(latent_channels=4, scale_factor=8, channels=channels)
    vae.register_to_config(scaling_factor=scaling_factor, shift_factor=None, force_upcast=force_upcast)
    return vae


def build_tiny_sd15_pipeline(seed: int = 0, prediction_type: str = "epsilon", vae_channels: int = 16):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    return StableDiffusionPipeline(
        vae=_tiny_vae(0.18215, vae_channels), text_encoder=CLIPTextModel(tiny.tiny_clip_config(False, 32)),
        tokenizer=tiny.tiny_clip_tokenizer(), unet=unet, scheduler=_tiny_scheduler(prediction_type),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def build_tiny_sdxl_pipeline(seed: int = 0, prediction_type: str = "epsilon", vae_channels: int = 16):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=32 + 32, norm_num_groups=8,
    )
    return StableDiffusionXLPipeline(
        vae=_tiny_vae(0.13025, vae_channels, force_upcast=True),
        text_encoder=CLIPTextModel(tiny.tiny_clip_config(False, 32)),
        text_encoder_2=CLIPTextModelWithProjection(tiny.tiny_clip_config(True, 32)),
        tokenizer=tiny.tiny_clip_tokenizer(), tokenizer_2=tiny.tiny_clip_tokenizer(), unet=unet,
        scheduler=_tiny_scheduler(prediction_type), force_zeros_for_empty_prompt=True,
    )
