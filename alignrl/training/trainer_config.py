"""The trainer's settings as a typed, validated object (``trainer.*`` in a recipe).

The defaults live in one place, ``recipes/trainer/default.yaml`` (what ``alignrl recipes`` shows and Hydra
overrides); this module gives them types, documents what each means and checks them once, before any model
loads: an unknown key (a typo such as ``trainer.max_step``) or a value of the wrong kind is a one-line error
naming the key. A config written before a key existed (an older run's ``config.yaml``) gets the default.

Words: an *iteration* is one rollout + update round (``max_steps`` counts iterations, the run's "step");
an *optimizer step* is one parameter update (``updates_per_iteration`` x ``inner_epochs`` per iteration); the
learning-rate *schedule* advances once per optimizer step (``warmup_steps`` counts optimizer steps).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from alignrl import hostalloc
from alignrl.errors import ConfigError
from alignrl.training.early_stop import EarlyStopSettings

LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


@dataclass(frozen=True)
class LoraSettings:
    rank: int  # adapter rank r
    alpha: float  # scaling alpha (the update is scaled by alpha / r)
    init: str  # peft's init_lora_weights: gaussian | true (zeros for B) | pissa ...
    target_modules: list | None  # module names; None: the backbone's attention projections


OPTIMIZERS = ("adamw", "adafactor")
UPDATE_BY = ("samples", "step", "transitions")


@dataclass(frozen=True)
class OptimizerSettings:
    name: str  # adamw | adafactor (no relative step, no parameter scaling, update clip 1: Diffusion-DPO's SDXL)
    betas: list  # AdamW (beta1, beta2)
    weight_decay: float
    eps: float  # AdamW's epsilon (Adafactor keeps its own pair)


@dataclass(frozen=True)
class EMASettings:
    enabled: bool  # keep an EMA of the trainable weights (evaluated, exported and saved)
    decay: float
    update_every: int  # optimizer steps between EMA updates


@dataclass(frozen=True)
class TrainerConfig:
    device: str  # auto | cpu | cuda | cuda:N
    mixed_precision: str  # no | bf16 | fp16 (fp16 needs a GPU)
    max_steps: int  # iterations to run
    max_minutes: float | None  # also stop after this much training wall-clock (evaluation excluded)
    rollout_batch_size: int  # images per sampling forward, per process
    train_batch_size: int  # samples per training forward, per process
    updates_per_iteration: int  # optimizer steps per iteration (per inner epoch; update_by samples)
    update_by: str  # samples | step | transitions: how an iteration's work splits into optimizer steps
    transitions_per_update: int  # update_by transitions: this process's transitions per optimizer step
    steps_per_pass: int  # schedule steps of a minibatch scored in one training forward (0: all of them)
    inner_epochs: int  # passes over an iteration's samples
    max_grad_norm: float  # gradient clipping (0: off)
    max_nonfinite_iterations: int  # stop after this many iterations in a row with only NaN/inf rewards (0: never)
    lr_schedule: str  # one of LR_SCHEDULES
    warmup_steps: int  # optimizer steps of learning-rate warm-up
    gradient_checkpointing: bool
    compile: bool  # torch.compile each repeated block of the denoiser (regional compilation)
    compile_backend: str  # torch.compile's backend: inductor (generated kernels) | aot_eager (tracing only) | ...
    cudnn_attention: bool  # let PyTorch pick cuDNN's fused attention on CUDA (off: flash / memory-efficient only)
    finetune: str  # lora | full
    text_encoder: str  # frozen | full (train the text encoder too; one-text-encoder backbones)
    lora: LoraSettings
    optimizer: OptimizerSettings
    ema: EMASettings
    host_allocator: str  # auto | tuned | default: glibc malloc settings for CPU runs (alignrl/hostalloc.py)
    reward_workers: int  # threads scoring rewards while the next batch samples
    reward_threads: int | None  # torch intra-op threads in each reward worker (0: torch's default; null: 1 when
    # the sampler runs on the CPU, whose cores it shares, else torch's default)
    checkpoint_every: int  # iterations between checkpoints (0: only at the end and on a stop)
    keep_checkpoints: int  # newest checkpoints kept
    eval_every: int  # iterations between evaluations (0: off)
    eval_every_minutes: float | None  # also evaluate every N minutes of training wall-clock
    eval_at_start: bool  # evaluate the starting model as step 0
    log_images_every: int  # iterations between rollout grids (0: off)
    decay_to_base: float  # per optimizer step, weights -= lr * decay_to_base * (weights - the run's starting weights)
    early_stop: EarlyStopSettings  # stop when an evaluation metric stops improving (alignrl/training/early_stop.py)

    def __post_init__(self):
        checks = [
            (self.mixed_precision in ("no", "bf16", "fp16"),
             f"trainer.mixed_precision='{self.mixed_precision}' is not known; use no, bf16 or fp16"),
            (self.lr_schedule in LR_SCHEDULES,
             f"trainer.lr_schedule='{self.lr_schedule}' is not known; use one of {', '.join(LR_SCHEDULES)}"),
            (self.finetune in ("lora", "full"), f"trainer.finetune='{self.finetune}' is not known; use lora or full"),
            (self.text_encoder in ("frozen", "full"),
             f"trainer.text_encoder='{self.text_encoder}' is not known; use frozen or full"),
            (self.max_nonfinite_iterations >= 0,
             f"trainer.max_nonfinite_iterations={self.max_nonfinite_iterations} must be >= 0 (0: never stop)"),
            (self.inner_epochs >= 1, f"trainer.inner_epochs={self.inner_epochs} must be >= 1"),
            (self.update_by in UPDATE_BY,
             f"trainer.update_by='{self.update_by}' is not known; use {', '.join(UPDATE_BY)}"),
            (self.transitions_per_update >= 1,
             f"trainer.transitions_per_update={self.transitions_per_update} must be >= 1"),
            (self.steps_per_pass >= 0,
             f"trainer.steps_per_pass={self.steps_per_pass} must be >= 0 (1: a forward per schedule step; 0: all)"),
            (self.update_by == "samples" or self.lr_schedule == "constant",
             f"trainer.lr_schedule={self.lr_schedule} counts optimizer steps as updates_per_iteration per iteration, "
             f"which trainer.update_by={self.update_by} does not fix; use lr_schedule=constant or update_by=samples"),
            (self.max_grad_norm >= 0, f"trainer.max_grad_norm={self.max_grad_norm} must be >= 0 (0: no clipping)"),
            (self.warmup_steps >= 0, f"trainer.warmup_steps={self.warmup_steps} must be >= 0"),
            (self.reward_workers >= 1, f"trainer.reward_workers={self.reward_workers} must be >= 1"),
            (self.reward_threads is None or self.reward_threads >= 0,
             f"trainer.reward_threads={self.reward_threads} must be >= 0 (0: torch's default) or null (auto)"),
            (self.keep_checkpoints >= 1, f"trainer.keep_checkpoints={self.keep_checkpoints} must be >= 1"),
            (min(self.checkpoint_every, self.eval_every, self.log_images_every) >= 0,
             "trainer.checkpoint_every, eval_every and log_images_every must be >= 0 (0: off)"),
            (self.max_minutes is None or self.max_minutes > 0,
             f"trainer.max_minutes={self.max_minutes} must be > 0 (or null: no time budget)"),
            (self.eval_every_minutes is None or self.eval_every_minutes > 0,
             f"trainer.eval_every_minutes={self.eval_every_minutes} must be > 0 (or null: off)"),
            (self.optimizer.name in OPTIMIZERS,
             f"trainer.optimizer.name='{self.optimizer.name}' is not known; use {' or '.join(OPTIMIZERS)}"),
            (0 <= self.ema.decay < 1, f"trainer.ema.decay={self.ema.decay} must be in [0, 1)"),
            (self.ema.update_every >= 1, f"trainer.ema.update_every={self.ema.update_every} must be >= 1"),
            (self.decay_to_base >= 0, f"trainer.decay_to_base={self.decay_to_base} must be >= 0 (0: off)"),
            (not self.early_stop.enabled or self.eval_every > 0 or self.eval_every_minutes,
             f"trainer.early_stop watches {self.early_stop.metric}, but the run never evaluates; set "
             f"trainer.eval_every or trainer.eval_every_minutes"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        hostalloc.check_mode(self.host_allocator)
        if self.compile:
            import torch._dynamo

            known = torch._dynamo.list_backends(exclude_tags=())
            if self.compile_backend not in known:
                raise ConfigError(f"trainer.compile_backend='{self.compile_backend}' is not a torch.compile backend; "
                                  f"use inductor or one of {', '.join(sorted(known))}")

    @property
    def optimizer_steps_per_iteration(self) -> int:
        return self.updates_per_iteration * self.inner_epochs

    def build_optimizer(self, params, lr: float) -> torch.optim.Optimizer:
        opt = self.optimizer
        if opt.name == "adafactor":
            from transformers.optimization import Adafactor

            return Adafactor(params, lr=lr, weight_decay=opt.weight_decay, clip_threshold=1.0,
                             scale_parameter=False, relative_step=False)
        return torch.optim.AdamW(params, lr=lr, betas=tuple(opt.betas), weight_decay=opt.weight_decay, eps=opt.eps)

    @classmethod
    def from_config(cls, node) -> "TrainerConfig":
        """Typed settings from ``cfg.trainer`` (missing keys take the packaged defaults)."""
        node = node if isinstance(node, DictConfig) else OmegaConf.create(dict(node or {}))
        given = OmegaConf.to_container(node, resolve=True)
        return _build(cls, _merge(_defaults(), given), "trainer")


@functools.lru_cache(maxsize=1)
def _defaults() -> dict:
    from alignrl.config import recipes_dir

    return OmegaConf.to_container(OmegaConf.load(Path(recipes_dir()) / "trainer" / "default.yaml"), resolve=True)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def _build(cls, values: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    unknown = [k for k in values if k not in names]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, names, n=1)
        hint = f"did you mean {prefix}.{close[0]}?" if close else f"known keys: {', '.join(names)}"
        raise ConfigError(f"{prefix}.{k} is not a setting; {hint}")
    kwargs = {}
    for name in names:
        kwargs[name] = _coerce(values.get(name), hints[name], f"{prefix}.{name}")
    return cls(**kwargs)


def _coerce(value, hint, key: str):
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of settings, got {value!r}")
        return _build(hint, value, key)
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if value is None:
        if optional or base in (list, dict):
            return None
        raise ConfigError(f"{key} is missing (null); set {key}=<value>")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base is str:
            return str(value)
        if base is list:
            if not isinstance(value, (list, tuple)):
                raise ValueError
            return list(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} must be {'a ' + base.__name__ if base is not int else 'an int'}"
                          f"{' or null' if optional else ''}") from None
    return value
