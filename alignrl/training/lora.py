"""Trainable parameters: LoRA through peft (diffusers' adapter API) or full fine-tuning."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from safetensors.torch import load_file

from alignrl.errors import CheckpointError, ConfigError


TEXT_PREFIX = "text_encoder."  # names of text-encoder parameters among the trainable ones
TEXT_MODES = ("frozen", "full")


def setup_trainable(backbone, finetune: str, lora_cfg: dict, text_encoder: str = "frozen") -> list[str]:
    """Make the denoiser trainable as configured (and the text encoder with ``text_encoder=full``); returns the
    names of the trainable parameters (text-encoder ones prefixed ``text_encoder.``)."""
    if text_encoder not in TEXT_MODES:
        raise ConfigError(f"trainer.text_encoder='{text_encoder}' is not known; use {' or '.join(TEXT_MODES)}")
    transformer = backbone.transformer
    transformer.requires_grad_(False)
    if finetune == "lora":
        from peft import LoraConfig

        targets = lora_cfg.get("target_modules") or list(backbone.default_lora_targets)
        config = LoraConfig(
            r=int(lora_cfg.get("rank", 32)), lora_alpha=float(lora_cfg.get("alpha", 64)),
            init_lora_weights=lora_cfg.get("init", "gaussian"), target_modules=list(targets),
            lora_dropout=0.0,
        )
        try:
            transformer.add_adapter(config)
        except ValueError as e:
            raise ConfigError(f"LoRA targets {list(targets)} do not fit this {backbone.family} model: {e}") from None
    elif finetune == "full":
        transformer.requires_grad_(True)
    else:
        raise ConfigError(f"trainer.finetune='{finetune}' is not known; use lora or full")
    names = []
    for name, p in transformer.named_parameters():
        if p.requires_grad:
            if p.dtype != torch.float32:  # train in fp32 (master weights); compute runs under autocast
                p.data = p.data.float()
            names.append(name)
    if not names:
        raise ConfigError("no trainable parameters: check trainer.lora.target_modules")
    if text_encoder == "full":
        module = backbone.train_text_encoder()  # the backbone stops caching prompts and lets gradients through
        module.requires_grad_(True)
        for name, p in module.named_parameters():
            if p.dtype != torch.float32:
                p.data = p.data.float()
            names.append(TEXT_PREFIX + name)
    return names


def _parameters(target) -> dict[str, torch.nn.Parameter]:
    """Parameters by trainable name: a denoiser module's own, or a backbone's denoiser and (prefixed) text encoder."""
    if isinstance(target, torch.nn.Module):
        return dict(target.named_parameters())
    params = dict(target.transformer.named_parameters())
    text = target.text_encoder_module(required=False)
    if text is not None:
        params.update({TEXT_PREFIX + n: p for n, p in text.named_parameters()})
    return params


def named_trainable(target, names: list[str]) -> list[torch.nn.Parameter]:
    """The parameters named ``names`` in ``target`` (a denoiser module, or a backbone when the text encoder trains)."""
    params = _parameters(target)
    return [params[n] for n in names]


def reference_context(transformer: torch.nn.Module, finetune: str):
    """Run the frozen base model: for LoRA, the same network with the adapter disabled."""
    if finetune == "lora":
        return _adapters_disabled(transformer)
    return nullcontext()


@contextmanager
def _adapters_disabled(transformer):
    transformer.disable_adapters()
    try:
        yield
    finally:
        transformer.enable_adapters()


def lora_export(transformer: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """The adapter's state dict and config, as diffusers' ``save_lora_weights`` expects them."""
    from peft.utils import get_peft_model_state_dict

    # A copy, never a view: on CPU ``.to("cpu")`` returns the live tensor itself, and a caller that exports
    # with the EMA weights swapped in saves after the swap is undone.
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in get_peft_model_state_dict(transformer).items()}
    meta = transformer.peft_config["default"].to_dict()
    meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}
    return state, meta


def load_trainable_file(target, names: list[str], path, layout=None) -> None:
    """Copy the tensors of ``path`` into ``target``'s parameters ``names`` (a denoiser module or a backbone);
    ``layout(full, param)`` lays a whole tensor out as the parameter (its shard, for sharded weights)."""
    tensors = load_file(str(path))
    missing = [n for n in names if n not in tensors]
    if missing:
        raise CheckpointError(
            f"{path} lacks {len(missing)} trainable tensors (e.g. {missing[0]}); "
            f"was it written with another trainer.finetune or LoRA config?"
        )
    params = _parameters(target)
    with torch.no_grad():
        for n in names:
            if params[n].shape != tensors[n].shape:
                raise CheckpointError(f"{path}: tensor {n} has shape {tuple(tensors[n].shape)}, "
                                      f"the model expects {tuple(params[n].shape)} (different LoRA rank?)")
            params[n].copy_(layout(tensors[n], params[n]) if layout is not None else tensors[n])
