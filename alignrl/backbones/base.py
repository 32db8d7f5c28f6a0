"""The backbone protocol: everything the rollout engine and the trainer need from a model family.

An adapter wraps a diffusers pipeline (it owns the modules; nothing is copied) and exposes:

- ``encode_prompts(prompts)`` -> :class:`Conditioning` (cached per prompt text: the text encoders are frozen)
- ``initial_noise(generators)`` -> the starting latents, one generator per sample
- ``make_schedule(num_steps)`` -> :class:`Schedule` taken from the diffusers scheduler itself
- ``predict(x, timestep, cond, guidance_scale)`` -> velocity, with CFG (or embedded guidance) inside
- ``decode(latents)`` -> images in [0, 1], shape (B, 3, H, W)
- ``transformer``: the denoiser that is trained; ``default_lora_targets``: where LoRA goes
- ``save_lora(dir, state_dict, metadata)``: export in diffusers' LoRA format
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

from alignrl.errors import ConfigError
from alignrl.sampling.parameterisation import FLOW, Parameterisation

_log = logging.getLogger(__name__)

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[str(name).lower()]
    except KeyError:
        raise ConfigError(f"unknown dtype '{name}'; use one of fp32, bf16, fp16") from None


def dtype_kwarg(dtype: torch.dtype) -> dict:
    """``from_pretrained``'s dtype argument: ``dtype`` since diffusers 0.42, ``torch_dtype`` before."""
    import diffusers
    from packaging.version import Version

    key = "dtype" if Version(diffusers.__version__) >= Version("0.42") else "torch_dtype"
    return {key: dtype}


@dataclass
class Conditioning:
    """Text conditioning for a batch: every tensor has the batch as its first dimension. ``with_negative``: the
    rows are already [empty-prompt rows; prompt rows] (``Backbone.cfg_conditioning``), so guidance adds none."""

    tensors: dict[str, torch.Tensor]
    with_negative: bool = False

    @property
    def batch_size(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    @property
    def prompt_rows(self) -> int:
        """The number of prompts (rows without their negative rows)."""
        return self.batch_size // 2 if self.with_negative else self.batch_size

    def index(self, idx: torch.Tensor | Sequence[int] | slice) -> "Conditioning":
        """Rows ``idx``; of a conditioning ``with_negative``, prompt rows ``idx`` with their negative rows."""
        if not isinstance(idx, (slice, torch.Tensor)):
            idx = torch.as_tensor(list(idx), dtype=torch.long)
        if self.with_negative:
            if not isinstance(idx, torch.Tensor) or idx.dtype == torch.bool or idx.ndim != 1:
                raise ValueError("Conditioning.index: a conditioning with its negative rows takes a 1-D tensor of "
                                 "prompt rows")
            n = self.batch_size // 2
            return Conditioning(Conditioning(self.tensors).index(torch.cat([idx, idx + n])).tensors, True)
        if isinstance(idx, torch.Tensor):
            idx = idx.to(next(iter(self.tensors.values())).device)
            if idx.dtype != torch.bool:  # index_select: several times faster than v[idx] inside the loop (measured)
                return Conditioning({k: v.index_select(0, idx.reshape(-1)) if idx.ndim <= 1 else v[idx]
                                     for k, v in self.tensors.items()})
        return Conditioning({k: v[idx] for k, v in self.tensors.items()})

    def expand(self, batch_size: int) -> "Conditioning":
        """Broadcast a batch-1 conditioning (e.g. the empty prompt) to ``batch_size`` rows without copying."""
        return Conditioning({k: v.expand(batch_size, *v.shape[1:]) for k, v in self.tensors.items()})

    @staticmethod
    def cat(parts: Iterable["Conditioning"]) -> "Conditioning":
        parts = list(parts)
        return Conditioning({k: torch.cat([p.tensors[k] for p in parts]) for k in parts[0].tensors})

    def to(self, device=None, dtype=None) -> "Conditioning":
        return Conditioning({k: v.to(device=device, dtype=dtype) for k, v in self.tensors.items()}, self.with_negative)


@dataclass
class PromptTable:
    """The conditioning rows of a set of prompts, each distinct prompt once (and the empty prompt's row first when
    classifier-free guidance runs): ``conditioning`` gathers any sequence of the prompts (with their negative rows
    under CFG) in one gather per tensor, where a cache lookup, a gather and a concatenation with the negative rows
    would make three. Built by ``Backbone.prompt_table``."""

    rows: Conditioning
    row_of: list[int]  # the row of each prompt the table was built for
    negative: int | None  # the empty prompt's row (CFG), or None

    def conditioning(self, items: Sequence[int]) -> Conditioning:
        """The conditioning of prompts ``items`` (indices into the table's prompts), laid out for ``predict``:
        [negative rows; prompt rows] under CFG (``with_negative``), the prompt rows otherwise."""
        rows = [self.row_of[i] for i in items]
        if self.negative is not None:
            rows = [self.negative] * len(rows) + rows
        first = next(iter(self.rows.tensors.values()))
        idx = torch.tensor(rows, dtype=torch.long, device=first.device)
        return Conditioning({k: v.index_select(0, idx) for k, v in self.rows.tensors.items()},
                            with_negative=self.negative is not None)


@dataclass
class Schedule:
    """A sampling schedule: ``sigmas[0..T]`` (sigmas[T] == 0) and the model timesteps ``timesteps[0..T-1]``.

    Both come from the diffusers scheduler itself (not a recomputed linspace) so that they match the
    pipeline exactly; a step maps to its sigma by index.
    """

    sigmas: torch.Tensor  # float32, (T+1,)
    timesteps: torch.Tensor  # float32, (T,)
    # per-step factors the kernels derive from the sigmas alone (apply_step's), kept with the schedule they came from
    memo: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def to(self, device) -> "Schedule":
        return Schedule(self.sigmas.to(device), self.timesteps.to(device))


# prompts encoded per text-encoder pass, always (padded with empty prompts): a fixed shape keeps each prompt's
# embedding independent of its batch-mates
ENCODE_BATCH = 8


def set_training(module: torch.nn.Module, training: bool) -> None:
    """``module.train(training)``, skipped when every submodule is in that mode already: the check reads a flag per
    module, where ``train()`` sets one through ``Module.__setattr__`` (about 140 us on the tiny SD3, twice an
    iteration)."""
    if any(m.training != training for m in module.modules()):
        module.train(training)


def token_ids(tokenizer, prompts: Sequence[str], max_length: int, what: str) -> torch.Tensor:
    """``prompts``' token ids padded and truncated to ``max_length`` (as the pipelines tokenize), with a warning naming
    each prompt that was cut (``what``: the encoder and its limit, for the message)."""
    enc = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                    add_special_tokens=True, return_tensors="pt")
    encodings = getattr(enc, "encodings", None)
    if encodings is not None:  # a fast tokenizer says what it cut
        cut = [i for i, e in enumerate(encodings) if e.overflowing]
    else:
        full = tokenizer(list(prompts), add_special_tokens=True).input_ids
        cut = [i for i, ids in enumerate(full) if len(ids) > max_length]
    for i in cut:
        text = prompts[i] if len(prompts[i]) <= 120 else prompts[i][:117] + "..."
        _log.warning("prompt truncated to the %s limit: %r", what, text)
    return enc.input_ids


@dataclass
class PromptCache:
    """Per-prompt cache of text embeddings (valid because the text encoders are frozen)."""

    max_entries: int = 100_000
    entries: dict[str, Conditioning] = field(default_factory=dict)

    def split(self, prompts: Sequence[str]) -> list[str]:
        """Return the distinct prompts that are not cached yet, in first-seen order."""
        return list(dict.fromkeys(p for p in prompts if p not in self.entries))

    def put(self, prompts: Sequence[str], cond: Conditioning) -> None:
        if len(self.entries) + len(prompts) > self.max_entries:
            self.entries.clear()  # a simple bound: prompt sets larger than this re-encode
        for i, p in enumerate(prompts):
            self.entries[p] = cond.index(slice(i, i + 1))

    def get(self, prompts: Sequence[str]) -> Conditioning:
        distinct = list(dict.fromkeys(prompts))
        if len(distinct) == len(prompts):
            return Conditioning.cat(self.entries[p] for p in prompts)
        # a group's K copies of one prompt: the distinct rows once, then one gather
        at = {p: i for i, p in enumerate(distinct)}
        return Conditioning.cat(self.entries[p] for p in distinct).index(torch.tensor([at[p] for p in prompts]))



def with_static_shift(pipe, shift: float | None):
    """A flow-matching ``pipe`` on its own schedule (``shift`` None: FLUX's resolution-dependent shift, SD3's
    static 3) or with a static shift ``s t / (1 + (s - 1) t)``. On FLUX, whose grid is ``linspace(1, 1/N, N)``,
    that is DanceGRPO's and MixGRPO's schedule (3) over ``linspace(1, 0, N + 1)``; on SD3 it sets the shift of
    SD3's own grid. The scheduler itself is replaced, so training, evaluation and an exported pipeline share it."""
    if shift is None:
        return pipe
    if shift <= 0:
        raise ConfigError(f"backbone.static_shift={shift} must be > 0 (or null: the model's own schedule)")
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, use_dynamic_shifting=False,
                                                                 shift=float(shift))
    return pipe

class Backbone:
    """Base class of the model-family adapters. Subclasses set ``pipe`` and implement the hooks."""

    family: str = "base"
    uses_cfg: bool = True
    parameterisation: Parameterisation = FLOW  # what predict() returns (alignrl/sampling/parameterisation.py)
    prediction_type: str = "flow"  # what the network itself predicts: flow, epsilon or v_prediction
    default_lora_targets: tuple[str, ...] = ()
    remote_code: bool = False  # an exported pipeline needs trust_remote_code (it ships its own pipeline.py)
    is_video: bool = False  # samples are clips: latents (C, F', h, w), decode gives (B, F, 3, H, W)

    def __init__(self, pipe, *, resolution: int, max_sequence_length: int, device="cpu",
                 dtype: str | torch.dtype = "fp32", cache_prompts: bool = True,
                 frozen_dtype: str | torch.dtype | None = None):
        self.pipe = pipe
        self.resolution = int(resolution)
        self.max_sequence_length = int(max_sequence_length)
        self.device = torch.device(device)
        self.dtype = parse_dtype(dtype)
        self.cache = PromptCache() if cache_prompts else None
        self.text_trainable = False  # set by train_text_encoder(): no cache, gradients reach the text encoder
        self._negative: Conditioning | None = None
        self._cfg_memo: tuple | None = None  # (cond, rows, [negative; cond]) of the last CFG call (guided)
        self._schedules: dict[int, Schedule] = {}
        multiple = self.latent_multiple()
        if self.resolution % multiple:
            raise ConfigError(
                f"backbone.resolution={self.resolution} must be a multiple of {multiple} for {self.family}; "
                f"use {self.resolution - self.resolution % multiple or multiple}"
            )
        # frozen_dtype: the text encoders' and VAE's dtype when it differs from the denoiser's (a full fine-tune
        # holding fp32 master weights keeps its frozen parts in bf16, as the references' inference dtype)
        self.frozen_dtype = parse_dtype(frozen_dtype) if frozen_dtype else self.dtype
        frozen = self.frozen_modules()
        for module in frozen:
            module.requires_grad_(False)
            module.eval()
        for module in self.pipe.components.values():
            if isinstance(module, torch.nn.Module):
                want = self.frozen_dtype if any(module is f for f in frozen) else self.dtype
                if module.dtype != want:  # real weights come in the right dtype already
                    module.to(dtype=want)
                module.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)

    # ----- modules -------------------------------------------------------------------------------
    @property
    def transformer(self) -> torch.nn.Module:
        return self.pipe.transformer

    @property
    def vae(self):
        return self.pipe.vae

    def frozen_modules(self) -> list[torch.nn.Module]:
        """Modules that are never trained here (text encoders, VAE)."""
        raise NotImplementedError

    def latent_multiple(self) -> int:
        """Image sides must be a multiple of this."""
        raise NotImplementedError

    # ----- text ----------------------------------------------------------------------------------
    def _encode_uncached(self, prompts: list[str]) -> Conditioning:
        raise NotImplementedError

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Embeddings of ``prompts``. The prompts missing from the cache are encoded together, in batches of
        exactly ``ENCODE_BATCH`` rows (short ones padded with empty prompts): with one fixed batch shape a row's
        embedding is a pure function of its text (matmul kernels depend on shapes, not on the other rows; checked
        bit for bit on every backbone), so it does not depend on which prompts it happened to be batched with, and
        resumed and multi-process runs stay bit-identical to single runs. With the cache that costs one batch per
        ``ENCODE_BATCH`` distinct prompts per run. While the text encoder trains (``train_text_encoder``) nothing
        is cached, each prompt is encoded on its own and gradients follow the caller's mode."""
        prompts = list(prompts)
        if self.text_trainable:
            return Conditioning.cat(self._encode_uncached([p]) for p in prompts)
        with torch.no_grad():
            if self.cache is None:
                return self._encode_fixed(prompts)
            self.cache_prompts(prompts)
            return self.cache.get(prompts)

    def cache_prompts(self, prompts: Sequence[str]) -> None:
        """Encode the ``prompts`` missing from the cache, together (``ENCODE_BATCH`` rows a batch)."""
        missing = self.cache.split(prompts)
        if missing:
            with torch.no_grad():
                self.cache.put(missing, self._encode_fixed(missing))

    def _encode_fixed(self, prompts: list[str]) -> Conditioning:
        """``prompts`` encoded in batches of exactly ``ENCODE_BATCH`` rows (see ``encode_prompts``)."""
        n = ENCODE_BATCH
        chunks = [prompts[i:i + n] for i in range(0, len(prompts), n)]
        parts = self._encode_chunks([c + [""] * (n - len(c)) for c in chunks])
        return Conditioning.cat(part.index(slice(0, len(c))) for part, c in zip(parts, chunks))

    def _encode_chunks(self, chunks: list[list[str]]) -> list[Conditioning]:
        """``_encode_uncached`` of each chunk (a backbone may tokenize all of them at once)."""
        return [self._encode_uncached(c) for c in chunks]

    def prompt_table(self, prompts: Sequence[str], guidance_scale: float) -> PromptTable | None:
        """``prompts``' conditioning rows for ``predict`` at ``guidance_scale`` (see ``PromptTable``), or None while the
        text encoder trains (each pass then encodes its own prompts, with gradients)."""
        if self.text_trainable:
            return None
        distinct = list(dict.fromkeys(prompts))
        at = {p: i for i, p in enumerate(distinct)}
        if self.cache is not None:
            self.cache_prompts(distinct)
            parts = [self.cache.entries[p] for p in distinct]
        else:
            parts = [self.encode_prompts(distinct)]
        cfg = self.cfg_active(guidance_scale)
        if cfg:
            parts = [self.negative_conditioning()] + parts
        return PromptTable(Conditioning.cat(parts), [at[p] + cfg for p in prompts], 0 if cfg else None)

    def negative_conditioning(self) -> Conditioning:
        """The empty-prompt conditioning used as the CFG negative (batch 1)."""
        if self.text_trainable:
            return self._encode_uncached([""])
        if self._negative is None:
            with torch.no_grad():
                self._negative = self._encode_fixed([""])
        return self._negative

    def text_encoder_module(self, required: bool = True) -> torch.nn.Module | None:
        """The text encoder that ``trainer.text_encoder=full`` trains (families with one text encoder)."""
        if required:
            raise ConfigError(f"trainer.text_encoder=full is not available for {self.family} (it has several text "
                              f"encoders); use trainer.text_encoder=frozen")
        return None

    def train_text_encoder(self) -> torch.nn.Module:
        """Let the text encoder train: prompts are no longer cached and their embeddings keep gradients."""
        module = self.text_encoder_module()
        self.text_trainable = True
        self.cache, self._negative = None, None
        return module

    # ----- latents and schedule --------------------------------------------------------------------
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one sample's latent as the denoiser sees it (packed for FLUX)."""
        raise NotImplementedError

    def initial_noise(self, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """One standard-normal latent per generator, float32, on the backbone's device."""
        raise NotImplementedError

    def to_frame(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """The model's own latents at ``sigma`` in the flow frame the engine runs in (identity for flow models;
        variance-preserving UNets scale them, see alignrl/sampling/parameterisation.py)."""
        return x

    def from_frame(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """The inverse of ``to_frame``: what the rollout returns, decodes and trains offline methods on."""
        return x

    def start_latents(self, generators: Sequence[torch.Generator], schedule: "Schedule") -> torch.Tensor:
        """The initial noise of a sample over ``schedule``, in the flow frame."""
        return self.to_frame(self.initial_noise(generators), schedule.sigmas[0])

    def objective_weight(self, t):
        """Turns a flow-velocity squared error at time ``t`` into the model's own objective's (epsilon or v)."""
        from alignrl.sampling.parameterisation import objective_weight

        return objective_weight(self.prediction_type, t)

    def make_schedule(self, num_steps: int) -> Schedule:
        if num_steps not in self._schedules:
            scheduler = copy.deepcopy(self.pipe.scheduler)
            scheduler.set_timesteps(**self._schedule_kwargs(num_steps))
            self._schedules[num_steps] = Schedule(
                scheduler.sigmas.to(torch.float32), scheduler.timesteps.to(torch.float32)
            ).to(self.device)
        return self._schedules[num_steps]

    def _schedule_kwargs(self, num_steps: int) -> dict:
        return {"num_inference_steps": num_steps}

    # ----- model -----------------------------------------------------------------------------------
    def compute_dtype(self, transformer: torch.nn.Module) -> torch.dtype:
        """The dtype ``transformer``'s base weights are in (inputs are cast to it): the backbone dtype,
        or fp32 when a full fine-tune keeps fp32 master weights (autocast then runs the matmuls). The first floating
        weight is found once per module and read live after that (its dtype follows ``.to()``); the walk is made again
        when that weight is no longer registered where it was (a wrapper such as FSDP replaced it)."""
        memo = self.__dict__.setdefault("_dtype_memo", {})
        hit = memo.get(id(transformer))
        if hit is not None and hit[0] is transformer and hit[1]._parameters.get(hit[2]) is hit[3]:
            return hit[3].dtype
        for owner in transformer.modules():
            for name, p in owner._parameters.items():
                if p is not None and p.is_floating_point():
                    memo[id(transformer)] = (transformer, owner, name, p)
                    return p.dtype
        return self.dtype

    def guided(self, call, x: torch.Tensor, timestep: torch.Tensor, cond: Conditioning,
               guidance_scale: float) -> torch.Tensor:
        """``call(x, t, cond)`` once over [empty-prompt rows; prompt rows] combined by classifier-free
        guidance ``v_u + w (v_c - v_u)``, or once over the prompt rows when CFG is off; float32."""
        use_cfg = self.cfg_active(guidance_scale)
        if use_cfg:
            if not cond.with_negative:
                cond = self._with_negative(cond, x.shape[0])
            elif cond.batch_size != 2 * x.shape[0]:
                raise ValueError(f"guided: a conditioning with its negative rows has {cond.batch_size} rows for "
                                 f"{x.shape[0]} latents (it needs twice as many)")
            x = torch.cat([x, x])
        elif cond.with_negative:
            raise ValueError("guided: a conditioning with its negative rows was given to a call without guidance")
        t = timestep.expand(x.shape[0]) if timestep.ndim == 0 else timestep.repeat(1 + use_cfg)
        out = call(x, t, cond)
        if use_cfg:
            uncond, text = out.chunk(2)
            out = uncond + guidance_scale * (text - uncond)
        return out.float()

    def cfg_active(self, guidance_scale: float) -> bool:
        """Whether ``predict`` at this guidance runs classifier-free guidance (a negative row per prompt row)."""
        return self.uses_cfg and guidance_scale > 1.0

    def cfg_conditioning(self, cond: Conditioning) -> Conditioning:
        """[empty-prompt rows; ``cond``], marked so that ``guided`` uses it as it is: callers that run many passes
        over rows of one conditioning build it once, and ``index`` then gathers each pass's prompt rows with their
        negatives (one gather a pass instead of a gather and a concatenation)."""
        return Conditioning(Conditioning.cat([self.negative_conditioning().expand(cond.batch_size), cond]).tensors,
                            with_negative=True)

    def _with_negative(self, cond: Conditioning, n: int) -> Conditioning:
        """[empty-prompt rows; ``cond``] for CFG, built once per conditioning: a rollout's steps reuse it (the last
        one is kept; not while the text encoder trains, whose outputs carry gradients)."""
        memo = self._cfg_memo
        if memo is not None and memo[0] is cond and memo[1] == n:
            return memo[2]
        both = Conditioning.cat([self.negative_conditioning().expand(n), cond])
        self._cfg_memo = None if self.text_trainable else (cond, n, both)
        return both

    def predict(self, x: torch.Tensor, timestep: torch.Tensor, cond: Conditioning,
                guidance_scale: float, transformer: torch.nn.Module | None = None) -> torch.Tensor:
        """Velocity prediction (float32) for latents ``x`` at scheduler timestep ``timestep``.

        ``transformer`` overrides the module that is called (e.g. a DDP wrapper or a frozen copy).
        """
        raise NotImplementedError

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._decode(latents)

    def decode_with_grad(self, latents: torch.Tensor, checkpoint: bool = False) -> torch.Tensor:
        """``decode`` keeping the autograd graph from the latents to the images (the VAE stays frozen), for
        reward-gradient methods; ``checkpoint`` stores none of the VAE's activations and recomputes them in the
        backward pass (its memory is then one image batch instead of the decoder's activations)."""
        if checkpoint and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint as recompute

            return recompute(self._decode, latents, use_reentrant=False)
        return self._decode(latents)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] from latents, graph kept (``decode`` wraps it in no_grad)."""
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Latents of images (B, 3, H, W) in [0, 1] (what ``decode`` returns), at ``latent_shape()``: the VAE's
        posterior mean (deterministic, so a cache of it is reproducible), shifted and scaled as ``decode``
        undoes it. Offline methods (DPO, KTO, SFT) train on these."""
        vae = self.vae
        if images.shape[-2:] != (self.resolution, self.resolution):
            raise ValueError(f"images are {tuple(images.shape[-2:])}, the backbone samples at {self.resolution}px; "
                             f"resize them first (alignrl.imagedata.load_image_tensor)")
        x = images.to(self.device, vae.dtype) * 2 - 1
        z = vae.encode(x, return_dict=False)[0].mode()
        shift = vae.config.get("shift_factor") or 0.0
        z = (z.float() - shift) * vae.config.scaling_factor
        return self.pack_latents(z)

    def pack_latents(self, z: torch.Tensor) -> torch.Tensor:
        """The VAE's latents (B, C, h, w) in the layout the denoiser takes (FLUX packs 2x2 patches)."""
        return z

    # ----- export ----------------------------------------------------------------------------------
    def save_lora(self, directory: str, state_dict: dict[str, torch.Tensor], metadata: dict) -> None:
        type(self.pipe).save_lora_weights(
            directory, transformer_lora_layers=state_dict, transformer_lora_adapter_metadata=metadata,
            safe_serialization=True,
        )

    # the evaluation solvers whose sampling an exported pipeline reproduces (its scheduler and call arguments)
    export_solvers: tuple[str, ...] = ("ode",)

    def save_pipeline(self, directory: str, solver: str = "ode") -> None:
        """The whole pipeline in diffusers' layout (``DiffusionPipeline.from_pretrained(directory)`` loads it)."""
        self.pipe.save_pretrained(directory, safe_serialization=True)

    def pipeline_call_kwargs(self, num_steps: int, guidance_scale: float, solver: str = "ode") -> dict:
        """Arguments of the pipeline's own ``__call__`` that sample as this adapter's ODE plan does."""
        return {"num_inference_steps": int(num_steps), "guidance_scale": float(guidance_scale),
                "height": self.resolution, "width": self.resolution,
                "max_sequence_length": self.max_sequence_length}

    def describe(self) -> str:
        n = sum(getattr(p, "ds_numel", p.numel()) for p in self.transformer.parameters())  # ZeRO-3: whole sizes
        cls = type(self.transformer)
        if cls.__name__.startswith("FSDP") and len(cls.__bases__) == 2:  # FSDP2's wrapper: name the model's class
            cls = cls.__bases__[1]
        return f"{self.family} {cls.__name__} {n / 1e6:.2f}M params, {self.resolution}px, dtype {self.dtype}"
