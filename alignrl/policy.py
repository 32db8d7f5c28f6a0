"""The trained policy of a run, as ``alignrl eval``, ``sample`` and ``export`` use it.

A checkpoint is read with the config its run was trained with (``<run>/config.yaml``): backbone, sampler,
rewards, eval prompts and resolution come from there, and only what the user names on the command line
changes (``backbone.pretrained=/moved/weights``, ``backbone.dtype=bf16``, ``sampler.eval_num_steps=40``,
``reward=pickscore``). Without a checkpoint the composed config is used as it is (the base model).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from alignrl.config import GROUPS
from alignrl.errors import CheckpointError, ConfigError
from alignrl.training import checkpoint as ckpt

WEIGHTS = ("ema", "live")


@dataclass
class RunSource:
    """Where a policy comes from: a checkpoint of a run (with that run's config), or the base model."""

    cfg: DictConfig  # the config to build the policy with (the run's, with the command's overrides on top)
    checkpoint: Path | None  # a checkpoint directory, or None for the base model

    @property
    def run_dir(self) -> Path | None:
        return self.checkpoint.parent.parent if self.checkpoint is not None else None

    @property
    def step(self) -> int | None:
        if self.checkpoint is None:
            return None
        return int(ckpt.load_json(self.checkpoint / "state.json").get("iteration", 0))


def find_checkpoint(path: str, key: str) -> Path:
    """A checkpoint directory, or a run directory's newest good checkpoint (damaged ones are skipped with a
    warning); ``key`` names the setting in errors."""
    try:
        candidates, explicit = ckpt.resume_candidates(str(path), Path("."))
    except CheckpointError:
        candidates, explicit = [], False
    if not candidates:
        raise CheckpointError(
            f"{key}='{path}' is not a checkpoint (a checkpoints/step_N directory with {ckpt.MARKER}) nor a run "
            f"directory holding one; pass {key}=outputs/<recipe>/<run> or {key}=<run>/checkpoints/step_000010")
    return candidates[ckpt.first_usable(candidates, explicit, what=key)]


def _override_keys(overrides: list[str]) -> list[str]:
    """The config keys the command line sets (``+``/``++`` prefixes dropped, deletions and Hydra's own skipped)."""
    keys = []
    for ov in overrides:
        if "=" not in ov or ov.startswith(("hydra.", "hydra/", "~")):
            continue
        key = ov.split("=", 1)[0].lstrip("+").removeprefix("override ").strip()
        keys.append(key)
    return keys


def run_source(cfg: DictConfig, checkpoint: str | None, overrides: list[str], key: str = "eval.checkpoint") -> RunSource:
    """The run's saved config with the command line's overrides on top (values as the command composed them).

    A group choice on the command line (``reward=pickscore``) replaces the run's whole group; a key
    (``backbone.dtype=bf16``) replaces that key; ``recipe=`` is ignored (with a note): the run's config is used.
    """
    if not checkpoint:
        return RunSource(cfg, None)
    path = find_checkpoint(str(checkpoint), key)
    saved = path.parent.parent / "config.yaml"
    if not saved.is_file():  # a checkpoint copied without its run: the command's config is all there is
        return RunSource(cfg, path)
    try:
        run_cfg = OmegaConf.load(saved)
    except Exception as e:  # noqa: BLE001  a YAML error: name the file
        raise CheckpointError(f"cannot read the run's config {saved}: {str(e).splitlines()[0]}") from None
    keys = _override_keys(overrides)
    _check_keys(run_cfg, keys, saved)
    if "recipe" in keys:  # the run's recipe is already in its config; another one would mix two runs
        import sys

        print(f"alignrl: note: recipe= is ignored with {key}: the run's own config ({saved}) is used, with "
              f"the other overrides on top", file=sys.stderr)
        keys = [k for k in keys if k != "recipe"]
    with open_dict(run_cfg):
        for section in cfg:  # settings added since the run was trained (e.g. export:) come from the command
            if section not in run_cfg:
                run_cfg[section] = _resolved(cfg, section)
        for k in keys:
            value = _resolved(cfg, k)
            if k in GROUPS:  # a group choice replaces the run's whole group
                run_cfg[k] = value
            else:
                OmegaConf.update(run_cfg, k, value, merge=False, force_add=True)
    return RunSource(run_cfg, path)


def _check_keys(run_cfg: DictConfig, keys: list[str], saved: Path) -> None:
    """A dotted key must exist in the run's config (the command's own sections excepted): a misspelt one names the
    closest keys instead of being added silently."""
    import difflib

    from alignrl.config import config_leaves

    replaced = {k for k in keys if k in GROUPS}  # keys of a group chosen anew are checked by Hydra, not here
    for k in keys:
        if "." not in k or k.split(".")[0] in ("eval", "sample", "export", "check", "serve", "datagen", *replaced):
            continue
        if OmegaConf.select(run_cfg, k, default="__missing__") != "__missing__":
            continue
        known = [name for name, _ in config_leaves(run_cfg)]
        close = difflib.get_close_matches(k, known, n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(close)}?" if close else "check the spelling (alignrl eval --cfg job lists them)"
        raise ConfigError(f"'{k}' is not a key of this run's config ({saved}); {hint}")


def _resolved(cfg: DictConfig, key: str):
    """The value of ``key`` as the command composed it, interpolations resolved (they refer to that config)."""
    value = OmegaConf.select(cfg, key)
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def load_policy(source: RunSource, device, weights: str = "ema"):
    """Build the backbone; with a checkpoint, load its trained weights (EMA or live).

    Returns ``(backbone, description)``; LoRA stays as adapter layers (``merge_lora`` folds it in).
    """
    from alignrl.components import as_dict, build_backbone

    if weights not in WEIGHTS:
        raise ConfigError(f"weights='{weights}' is not known; use ema or live")
    cfg = source.cfg
    path = source.checkpoint
    sharded = None  # a sharded checkpoint saved without whole weights: its sharded/ directory, and the key to read
    if path is not None:  # before the model loads: the files we need are there
        state = ckpt.load_json(path / "state.json")
        finetune = str(state.get("finetune", cfg.trainer.finetune))
        file = path / ("ema.safetensors" if weights == "ema" else "trainable.safetensors")
        note = f"{weights} weights"
        if weights == "ema" and state.get("ema") is None:
            file, note = path / "trainable.safetensors", "live weights (the run kept no EMA)"
        if state.get("sharded") and not state.get("whole_weights", True):
            from alignrl.training.sharding import SHARDED_DIR

            sharded = (path / SHARDED_DIR, "ema" if file.name == "ema.safetensors" else "model")
            if not (sharded[0] / ".metadata").is_file():
                raise CheckpointError(f"{sharded[0]} is missing; the checkpoint is incomplete, use another one")
            note += " (from the sharded checkpoint)"
        elif weights == "ema" and not file.is_file() and state.get("ema") is not None:
            raise CheckpointError(f"{file} is missing although the run kept an EMA; the checkpoint is incomplete "
                                  f"(use another checkpoint, or eval.weights=live)")
        elif not file.is_file():
            raise CheckpointError(f"{file} is missing; the checkpoint is incomplete, use another one")
    backbone = build_backbone(cfg, device)
    if path is None:
        return backbone, "base model"
    text_mode = str(state.get("text_encoder", cfg.trainer.get("text_encoder", "frozen")))
    policy = Policy(backbone, finetune, as_dict(cfg.trainer.get("lora")), text_mode)
    if sharded is not None:
        from alignrl.training.sharding import load_sharded_weights

        load_sharded_weights(policy, *sharded)
    else:
        policy.load_trainable(file)
    backbone.transformer.requires_grad_(False).eval()
    if finetune == "full":
        _to_backbone_dtype(backbone)  # training kept fp32 master weights; inference needs none
    if text_mode != "frozen":  # trained with the denoiser: inference needs neither its gradients nor fp32 copies
        text = backbone.text_encoder_module()
        text.requires_grad_(False).eval().to(backbone.dtype)
    return backbone, f"{path} ({note})"


def _to_backbone_dtype(backbone) -> None:
    if any(p.dtype != backbone.dtype for p in backbone.transformer.parameters() if p.is_floating_point()):
        backbone.transformer.to(backbone.dtype)


def is_lora(backbone) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in backbone.transformer.modules())


def merge_lora(backbone) -> None:
    """Fold the LoRA adapter into the denoiser's weights and drop the adapter layers (for export)."""
    if not is_lora(backbone):
        return
    transformer = backbone.transformer
    transformer.fuse_lora()
    transformer.unload_lora()
    _to_backbone_dtype(backbone)


class Policy:
    """The model a run trains and every command uses: the backbone, its trainable parameters (the LoRA adapter or
    the whole denoiser, and the text encoder when it trains), their EMA, and the frozen reference.

    Training builds it with ``Policy.for_training``; ``alignrl eval``, ``sample``, ``data`` and ``export`` load a
    checkpoint's weights into one (``load_policy``). The reference is the base model: for LoRA the same network
    with the adapter disabled (no copy), for full fine-tuning a frozen copy made before training.
    """

    def __init__(self, backbone, finetune: str, lora: dict, text_encoder: str = "frozen", *, ema=None,
                 reference: bool = False, gradient_checkpointing: bool = False, sharding=None,
                 compile_backend: str | None = None):
        from alignrl.training.ema import EMA
        from alignrl.training.lora import named_trainable, setup_trainable
        from alignrl.training.sharding import DistributedConfig, Sharding

        self.backbone = backbone
        self.denoiser = backbone.transformer
        self.finetune = finetune
        self.text_encoder = text_encoder
        # distributed=fsdp: the denoiser (and the reference copy) sharded over the processes; else a no-op
        self.sharding = sharding if sharding is not None else Sharding(DistributedConfig(), 1, None)
        self.trainable_names = setup_trainable(backbone, finetune, dict(lora or {}), text_encoder)
        if gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()
        self.reference_denoiser = None
        if reference and finetune == "full":
            import copy

            self.reference_denoiser = copy.deepcopy(self.denoiser).requires_grad_(False).eval()
        if compile_backend:  # each repeated block compiled in place (before sharding, as FSDP2 expects)
            from alignrl.training.sharding import shard_units

            for module in (self.denoiser, self.reference_denoiser):
                for block in shard_units(module) if module is not None else ():
                    block.compile(backend=compile_backend)
        if self.reference_denoiser is not None and self.sharding.settings.shard_reference:
            self.sharding.shard(self.reference_denoiser)
        self.sharding.shard(self.denoiser)  # parameters become DTensors: collected after this
        self.params = named_trainable(backbone, self.trainable_names)
        self._ema_settings = ema if ema is not None and ema.enabled else None
        # distributed=zero2|zero3: built in wrap_optimizer, over this process's part of each weight
        self.ema = EMA(self.params, ema.decay, ema.update_every) \
            if self._ema_settings is not None and not self.sharding.owns_update else None

    def wrap_optimizer(self, optimizer, max_grad_norm: float):
        """The optimizer the loop steps: DeepSpeed's around ``optimizer`` with distributed=zero2|zero3 (the EMA then
        follows this process's part of each weight: a ZeRO-3 partition), else ``optimizer``."""
        from alignrl.training.ema import EMA

        wrapped = self.sharding.wrap(self.denoiser, optimizer, max_grad_norm)
        if self._ema_settings is not None and self.ema is None:  # weights not yet trained
            s = self._ema_settings
            self.ema = EMA(self.sharding.local(self.params), s.decay, s.update_every)
        return wrapped

    def ema_state(self) -> dict:
        """The EMA weights whole and on the CPU, by name (every process must call it when they are sharded)."""
        return {n: self.sharding.full(s, p).contiguous()
                for n, s, p in zip(self.trainable_names, self.ema.shadow, self.params)}

    @classmethod
    def for_training(cls, backbone, settings, needs_reference: bool, sharding=None) -> "Policy":
        """From the typed trainer settings (``alignrl/training/trainer_config.py``)."""
        import dataclasses

        return cls(backbone, settings.finetune, dataclasses.asdict(settings.lora), settings.text_encoder,
                   ema=settings.ema, reference=needs_reference, gradient_checkpointing=settings.gradient_checkpointing,
                   sharding=sharding, compile_backend=settings.compile_backend if settings.compile else None)

    def ema_weights(self):
        """The EMA weights swapped in (restored on exit); the live ones when the run keeps no EMA. Sharded weights
        are gathered inside (for sampling)."""
        return self.weights("ema" if self.ema is not None else "live")

    @contextmanager
    def weights(self, which: str):
        """A context with ``live`` or ``ema`` weights in place (the rollout weights of NFT), or the frozen
        ``reference`` (the initial model: rollouts drawn from it, ``algorithm.rollouts_from=reference``), for
        sampling: with sharded weights they are gathered once for the block (every process enters it together)."""
        if which == "reference":
            with self._reference_in_place():
                yield
            return
        if which == "ema" and self.ema is None:
            raise ConfigError("the EMA weights were asked for, but trainer.ema.enabled=false")
        if which not in WEIGHTS:
            raise ConfigError(f"policy weights '{which}' are not known; use live or ema")
        with self.sharding.weights(self.ema if which == "ema" else None, self.params):
            yield

    @contextmanager
    def _reference_in_place(self):
        """The frozen initial model in the denoiser's place: the adapter disabled (LoRA), or the reference copy's
        tensors swapped in (full fine-tuning; no copy made, swapped back on exit). The trainer checks before the
        model loads that the run is unsharded (``check_strategy``) and keeps a reference (``needs_reference``)."""
        import torch

        from alignrl.training.lora import reference_context

        if self.finetune == "lora":
            with reference_context(self.denoiser, self.finetune):
                yield
            return
        pairs = list(zip(self.denoiser.parameters(), self.reference_denoiser.parameters()))

        def swap():
            with torch.no_grad():
                for live, ref in pairs:
                    live.data, ref.data = ref.data, live.data

        swap()
        try:
            yield
        finally:
            swap()

    def predict_reference(self, x, timestep, cond, guidance_scale, autocast=None):
        """The frozen reference's prediction (no gradient)."""
        import torch
        from contextlib import nullcontext

        from alignrl.training.lora import reference_context

        ref = self.reference_denoiser
        ctx = reference_context(self.denoiser, self.finetune) if ref is None else nullcontext()
        with torch.no_grad(), ctx, (autocast() if autocast else nullcontext()):
            return self.backbone.predict(x, timestep, cond, guidance_scale, transformer=ref)

    def trainable_state(self) -> dict:
        """The trainable tensors by name, whole and on the CPU (what ``trainable.safetensors`` holds). Sharded ones
        are gathered: every process must call it."""
        return self.sharding.trainable_state(self.trainable_names, self.params)

    def weights_finite(self, local_only: bool = False) -> bool:
        """Whether every trainable tensor's L2 norm is finite (no NaN/inf, nor weights past ~1e19 whose squares
        overflow): one fused multi-tensor norm and one sync (over the processes' shards when sharded). The L2 norm
        rather than max-abs: faster on CPU (9.4M LoRA weights on 2 cores: 4.7 ms against 17 ms, where the AdamW
        step itself takes 44 ms; measured)."""
        return self.sharding.all_finite(self.params, local_only=local_only)

    def load_trainable(self, file) -> None:
        from alignrl.training.lora import load_trainable_file

        if self.sharding.owns_update:  # DeepSpeed keeps fp32 master copies (and ZeRO-3 partitions) to fill too
            from safetensors.torch import load_file

            self.sharding.load_weights(load_file(str(file)), self.trainable_names, self.params, file)
            return
        load_trainable_file(self.backbone, self.trainable_names, file, layout=self.sharding.like)

    def export_lora(self, directory) -> None:
        """The adapter (EMA weights when the run keeps an EMA) in diffusers' LoRA format."""
        from alignrl.training.lora import lora_export

        with self.ema_weights():
            state, meta = lora_export(self.denoiser)
        self.backbone.save_lora(str(directory), state, meta)

    def describe(self) -> str:
        n = sum(getattr(p, "ds_numel", p.numel()) for p in self.params)  # ZeRO-3 partitions: the whole sizes
        return (f"{self.backbone.describe()}; {len(self.trainable_names)} trainable tensors ({n / 1e6:.3f}M params, "
                f"{self.finetune})")
