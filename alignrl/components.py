"""Build the recipe's components from the composed config (shared by train, eval and sample)."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from alignrl.errors import ConfigError

ALGORITHMS = {
    "flowgrpo": "alignrl.algorithms.flowgrpo:FlowGRPO",
    "dancegrpo": "alignrl.algorithms.flowgrpo:FlowGRPO",
    "grpo_guard": "alignrl.algorithms.guard:GRPOGuard",
    "awm": "alignrl.algorithms.matching:AWM",
    "nft": "alignrl.algorithms.matching:DiffusionNFT",
}


def _import(path: str):
    import importlib

    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def as_dict(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})


def build_backbone(cfg: DictConfig, device):
    from hydra.utils import instantiate

    spec = as_dict(cfg.backbone)
    if "_target_" not in spec:
        raise ConfigError("backbone config needs a _target_ (e.g. alignrl.backbones.sd3.SD3Backbone.tiny)")
    name = spec.pop("name", spec["_target_"])
    try:
        return instantiate(spec, device=device, _convert_="all")
    except Exception as e:  # hydra wraps the constructor's error; report it in one line
        cause = e.__cause__ or e  # what the constructor raised (its own causes may be network internals)
        if isinstance(cause, ConfigError):
            raise cause from None
        if isinstance(cause, TypeError) and "argument" in str(cause):
            raise ConfigError(f"backbone '{name}': {cause} (check the backbone.* keys)") from None
        if isinstance(cause, (OSError, ValueError)):
            where = spec.get("pretrained", "")
            first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
            raise ConfigError(f"cannot load backbone '{name}' from '{where}': {first} (set backbone.pretrained to "
                              f"a hub id or a local diffusers directory; gated models need HF_TOKEN)") from None
        raise


def build_planner(cfg: DictConfig):
    from hydra.utils import instantiate

    spec = as_dict(cfg.sampler)
    spec.pop("name", None)
    try:
        return instantiate(spec, _convert_="all")
    except Exception as e:  # instantiate wraps constructor errors; surface ours unwrapped
        raise _unwrap(e, "sampler") from None


def build_algorithm(cfg: DictConfig):
    spec = as_dict(cfg.algorithm)
    name = spec.get("name")
    if name not in ALGORITHMS:
        raise ConfigError(f"unknown algorithm '{name}'; available: {', '.join(sorted(ALGORITHMS))}")
    cls = _import(ALGORITHMS[name])
    try:
        return cls(**spec)
    except TypeError as e:
        raise ConfigError(f"algorithm '{name}': {e}") from None


def _unwrap(e: Exception, group: str) -> Exception:
    cause = e.__cause__ or e
    if isinstance(cause, ConfigError):
        return cause
    return ConfigError(f"{group} config cannot be built: {cause}")
