"""Build the recipe's components from the composed config (shared by train, eval and sample).

Every component is named by ``_target_`` (a dotted import path, ``package.module.Class`` or
``package.module:Class``), so a method, reward or backbone that lives in the user's own package needs no
edit here: its YAML names it. The shipped algorithms also answer to their ``name`` (the table below), so an
older config without ``_target_`` still builds.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from alignrl.errors import ConfigError
from alignrl.locate import locate

ALGORITHMS = {
    "flowgrpo": "alignrl.algorithms.flowgrpo:FlowGRPO",
    "dancegrpo": "alignrl.algorithms.flowgrpo:FlowGRPO",
    "grpo_guard": "alignrl.algorithms.guard:GRPOGuard",
    "awm": "alignrl.algorithms.matching:AWM",
    "nft": "alignrl.algorithms.matching:DiffusionNFT",
    "diffusion_dpo": "alignrl.algorithms.preference:DiffusionDPO",
    "flow_dpo": "alignrl.algorithms.preference:FlowDPO",
    "diffusion_kto": "alignrl.algorithms.preference:DiffusionKTO",
    "rankdpo": "alignrl.algorithms.preference:RankDPO",
    "sft": "alignrl.algorithms.preference:SFT",
    "smpo": "alignrl.algorithms.preference:SmPO",
    "diffusion_dro": "alignrl.algorithms.preference:DiffusionDRO",
    "ddo": "alignrl.algorithms.preference:DDO",
    "online_dpo": "alignrl.algorithms.preference:OnlineDPO",
    "flow_rwr": "alignrl.algorithms.preference:FlowRWR",
    "refl": "alignrl.algorithms.reward_gradient:ReFL",
    "draft": "alignrl.algorithms.reward_gradient:DRaFT",
    "draft_lv": "alignrl.algorithms.reward_gradient:DRaFTLV",
    "alignprop": "alignrl.algorithms.reward_gradient:AlignProp",
    "adjointdpm": "alignrl.algorithms.reward_gradient:AdjointDPM",
}



def as_dict(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})


def build_backbone(cfg: DictConfig, device):
    from hydra.utils import instantiate

    spec = as_dict(cfg.backbone)
    if "_target_" not in spec:
        raise ConfigError("backbone config needs a _target_ (e.g. alignrl.backbones.sd3.SD3Backbone.tiny)")
    name = spec.pop("name", spec["_target_"])
    _attention_kernels(cfg, device)
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


def _attention_kernels(cfg: DictConfig, device) -> None:
    """On CUDA, PyTorch's attention may pick cuDNN's fused kernel unless ``trainer.cudnn_attention`` allows it
    (off by default: see ``recipes/trainer/default.yaml``). Process-wide, set by every command that builds a backbone
(train, eval, sample, data, export); the reward server and reward checks run inference only."""
    import torch
    from omegaconf import OmegaConf

    if torch.device(device).type != "cuda":
        return
    # read alone (a run's saved config is checked whole by the trainer; eval and sample need only this flag)
    torch.backends.cuda.enable_cudnn_sdp(bool(OmegaConf.select(cfg, "trainer.cudnn_attention", default=False)))


def build_planner(cfg: DictConfig):
    from hydra.utils import instantiate

    spec = as_dict(cfg.sampler)
    spec.pop("name", None)
    try:
        return instantiate(spec, _convert_="all")
    except Exception as e:  # instantiate wraps constructor errors; surface ours unwrapped
        raise _unwrap(e, "sampler") from None


def algorithm_class(cfg: DictConfig):
    """The class ``algorithm._target_`` (or the shipped ``algorithm.name``) names, imported, not built."""
    spec = cfg.get("algorithm") or {}
    target = spec.get("_target_")
    if target is None:
        name = spec.get("name")
        if name not in ALGORITHMS:
            raise ConfigError(f"unknown algorithm '{name}'; available: {', '.join(sorted(ALGORITHMS))} "
                              f"(or name your own class with algorithm._target_=package.module.Class)")
        target = ALGORITHMS[name]
    return locate(str(target), "algorithm._target_")


def build_algorithm(cfg: DictConfig):
    """The recipe's algorithm: ``algorithm._target_`` with the other keys as arguments (or a shipped method by
    ``algorithm.name``). It must satisfy the protocol in ``alignrl/algorithms/base.py``."""
    from alignrl.algorithms.base import BATCH_KINDS, Algorithm

    spec = as_dict(cfg.algorithm)
    target = spec.pop("_target_", None) or ALGORITHMS.get(spec.get("name"))
    name = spec.get("name")
    cls = algorithm_class(cfg)
    try:
        algo = cls(**spec)
    except TypeError as e:
        raise ConfigError(f"algorithm '{name or target}': {e}") from None
    missing = [m for m in ("batch_kind", "needs_reference", "rollout_weights", "diagnostics", "advantages",
                           "train_step", "state_dict", "load_state_dict", "group_size", "lr") if not hasattr(algo, m)]
    if missing or not isinstance(algo, Algorithm):
        raise ConfigError(f"algorithm '{name or target}' ({target}) lacks {', '.join(missing) or 'a name'} of the "
                          f"algorithm protocol (alignrl/algorithms/base.py); subclass GroupRelative or add them")
    if algo.batch_kind not in BATCH_KINDS:
        raise ConfigError(f"algorithm '{algo.name}' asks for batch_kind '{algo.batch_kind}'; the loop collects "
                          f"{', '.join(BATCH_KINDS)}")
    return algo


def _unwrap(e: Exception, group: str) -> Exception:
    cause = e.__cause__ or e
    if isinstance(cause, ConfigError):
        return cause
    return ConfigError(f"{group} config cannot be built: {cause}")
