"""Sharded full fine-tuning: FSDP2 (``torch.distributed.fsdp.fully_shard``) of the denoiser, chosen with
``distributed=fsdp``.

With ``distributed=ddp`` (the default) every process holds the whole model and the loop sums the gradients in one
all-reduce per optimizer step. With ``distributed=fsdp`` each repeated block of the denoiser (and then the
denoiser itself) is one shard unit: parameters, gradients and the optimizer's states are split over the processes
(``Shard(0)``), a unit's parameters are all-gathered just before it runs and freed after, and gradients are
reduce-scattered in the backward pass. The frozen reference copy of a full fine-tune (the KL term's) is sharded
the same way (``distributed.shard_reference``).

Three rules keep every process in step, since each all-gather is a collective every process must reach:

- Sampling (rollouts, evaluation) runs with the parameters kept gathered (``gathered()``): one all-gather per
  unit at the start, none per forward, so processes may run different numbers of forwards (and the forwards are
  about twice as fast); every unit is resharded at the end.
- A training step runs the same number of forward/backward passes on every process: an algorithm that supports
  sharding (``supports_sharding``) asks ``StepContext.balance(n)`` for the largest count over processes and pads
  with passes whose loss is multiplied by zero (``policy_gradient.train_on_transitions`` and the matching
  methods' ``train_step`` do).
- Gradients are summed, not averaged (divide factor 1): the loop's losses are already normalised by the global
  number of samples, as in the DDP path, so one process and N give the same update.

Checkpoints are sharded with ``torch.distributed.checkpoint`` (``sharded/``: the trainable weights, the EMA and the
optimizer's states, keyed by parameter name, each process writing its shards), so a run resumes on any number of
processes, one included. With ``distributed.whole_weights`` (the default) the main process also writes the whole
weights and EMA (``trainable.safetensors``, ``ema.safetensors``, gathered one tensor at a time) for other tools;
``alignrl eval``, ``sample`` and ``export`` read ``sharded/`` when they are absent.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from alignrl.errors import ConfigError

STRATEGIES = ("ddp", "fsdp", "zero2", "zero3")  # zero2|zero3: DeepSpeed ZeRO (alignrl/training/zero.py)
DTYPES = {None: None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# where each backbone family keeps its repeated blocks (the shard units), in forward order
UNIT_LISTS = ("transformer_blocks", "single_transformer_blocks", "blocks", "down_blocks", "up_blocks")
UNIT_SINGLES = ("mid_block",)


@dataclass
class DistributedConfig:
    strategy: str = "ddp"
    param_dtype: str | None = None  # the dtype units are gathered and computed in; None: as trainer.mixed_precision
    # (bf16 with bf16 mixed precision, else the parameters' own)
    reduce_dtype: str | None = "fp32"  # the dtype gradients are reduce-scattered in
    reshard_after_forward: bool = True  # free a unit's gathered parameters after its forward (gather again in backward)
    shard_reference: bool = True  # shard the frozen reference copy of a full fine-tune too (else every process holds it)
    gather_for_sampling: bool = True  # keep units gathered through a rollout / evaluation (see the module doc)
    whole_weights: bool = True  # checkpoints also hold trainable.safetensors / ema.safetensors (gathered to rank 0)
    deepspeed: dict | None = None  # zero2|zero3: merged into the DeepSpeed engine's config (alignrl/training/zero.py)

    @classmethod
    def from_config(cls, cfg) -> "DistributedConfig":
        from alignrl.components import as_dict

        raw = as_dict(cfg)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"distributed.{unknown[0]} is not a setting; known: {', '.join(sorted(known))}")
        out = cls(**raw)
        if out.strategy not in STRATEGIES:
            raise ConfigError(f"distributed.strategy='{out.strategy}' is not known; use distributed=ddp, fsdp, zero2 "
                              f"or zero3")
        for key in ("param_dtype", "reduce_dtype"):
            if getattr(out, key) not in DTYPES:
                raise ConfigError(f"distributed.{key}={getattr(out, key)} is not known; use null, fp32, bf16 or fp16")
        return out

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp"

    def gather_dtype(self, mixed_precision: str) -> str | None:
        """The dtype blocks are gathered and run in: ``param_dtype``, else bf16 when training in bf16, else the
        weights' own (None)."""
        return self.param_dtype or ("bf16" if mixed_precision == "bf16" else None)


def check_strategy(settings: DistributedConfig, *, algorithm, finetune: str, text_encoder: str,
                   mixed_precision: str, optimizer: str = "adamw") -> None:
    """Refuse what the sharded paths (fsdp, zero2, zero3) do not support, before any model loads."""
    name = settings.strategy
    if name == "ddp":
        return
    if name in ("zero2", "zero3"):
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError(f"distributed={name} needs DeepSpeed, which is not installed; pip install "
                              f"'alignrl[deepspeed]' (or use distributed=fsdp)")
        if optimizer != "adamw":
            raise ConfigError(f"distributed={name} keeps AdamW's states in DeepSpeed's partitions; "
                              f"trainer.optimizer.name={optimizer} needs distributed=ddp or fsdp")
    if getattr(algorithm, "rollout_weights", "live") == "reference":
        raise ConfigError(f"distributed={name} with rollouts from the reference (algorithm {algorithm.name}, "
                          f"rollouts_from=reference) is not supported; use distributed=ddp, or "
                          f"algorithm.rollouts_from=policy")
    if not getattr(algorithm, "supports_sharding", False):
        raise ConfigError(f"distributed={name} needs every process to run as many forward/backward passes (every "
                          f"shipped method pads to the largest count); algorithm {algorithm.name} does not declare "
                          f"supports_sharding = True: use distributed=ddp, or balance its passes with "
                          f"alignrl.algorithms.base.balanced_passes and declare it")
    if text_encoder != "frozen":
        raise ConfigError(f"distributed={name} shards the denoiser only; trainer.text_encoder={text_encoder} needs "
                          f"distributed=ddp (or trainer.text_encoder=frozen)")
    if mixed_precision == "fp16":
        raise ConfigError(f"distributed={name} trains with fp32 or bf16 (fp16 loss scaling of sharded gradients is "
                          f"not supported); use trainer.mixed_precision=bf16")
    if finetune != "full":
        raise ConfigError(f"distributed={name} shards full fine-tunes (the whole denoiser trains); a {finetune} run's "
                          f"trained weights are small: use distributed=ddp, or trainer.finetune=full")


def make_sharding(settings: DistributedConfig, world: int, device: torch.device, mixed_precision: str = "no"):
    """The run's sharding for ``distributed.strategy``: ``Sharding`` (ddp, fsdp) or ``ZeroSharding`` (zero2, zero3)."""
    if settings.strategy in ("zero2", "zero3"):
        from alignrl.training.zero import ZeroSharding

        return ZeroSharding(settings, world, device, mixed_precision)
    return Sharding(settings, world, device, mixed_precision)


def shard_units(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The denoiser's repeated blocks, each one shard unit (the root is sharded last, holding the rest)."""
    units = []
    for name in UNIT_LISTS:
        blocks = getattr(module, name, None)
        if isinstance(blocks, torch.nn.ModuleList):
            units.extend(blocks)
    for name in UNIT_SINGLES:
        block = getattr(module, name, None)
        if isinstance(block, torch.nn.Module):
            units.append(block)
    return units


def _inner(optimizer):
    """The torch optimizer inside accelerate's wrapper."""
    return optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer


def _fsdp():
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    return FSDPModule, MixedPrecisionPolicy, fully_shard


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


class Sharding:
    """The run's sharding: which modules are sharded and how (``distributed=fsdp`` with several processes), or
    nothing at all (``ddp``, or one process), in which case every method is the identity."""

    def __init__(self, settings: DistributedConfig, world: int, device: torch.device, mixed_precision: str = "no"):
        self.settings = settings
        self.param_dtype = settings.gather_dtype(mixed_precision)
        self.world = int(world)
        self.device = device
        self.active = settings.sharded and self.world > 1
        self.modules: list[torch.nn.Module] = []  # the sharded roots (denoiser, reference)
        self._mesh = None

    @property
    def owns_update(self) -> bool:
        """Whether the strategy runs the backward passes and the optimizer step itself (DeepSpeed's engine)."""
        return False

    @property
    def gathers(self) -> bool:
        """Whether whole weights are gathered from every process's shards (checkpoints: every process calls)."""
        return self.active

    def wrap(self, denoiser: torch.nn.Module, optimizer, max_grad_norm: float):
        """The optimizer the loop steps (DeepSpeed's, built around the loop's; here the loop's own)."""
        return optimizer

    def local(self, params: list[torch.Tensor], padded: bool = True) -> list[torch.Tensor]:
        """This process's part of each parameter: a sharded DTensor's local shard, else the parameter. ``padded``:
        keep a partition's padding (ZeRO-3's partitions are equal in size, the last ones padded with unset memory:
        gathers need it, checks must skip it); FSDP's local shards carry none."""
        return [t.to_local() for t in params] if self.active else list(params)

    def trainable_state(self, names: list[str], params: list[torch.Tensor]) -> dict:
        """The tensors whole and on the CPU, by name (every process must call it: sharded ones are gathered)."""
        return {n: self.full(p).contiguous() for n, p in zip(names, params)}

    @staticmethod
    def optimizer_state_dict(optimizer) -> dict:
        """The optimizer's ``state_dict()`` (the torch optimizer inside accelerate's wrapper)."""
        return _inner(optimizer).state_dict()

    @staticmethod
    def load_optimizer_state_dict(optimizer, saved: dict) -> None:
        _inner(optimizer).load_state_dict(saved)

    def describe(self) -> str:
        if not self.settings.sharded:
            return "ddp"
        if not self.active:
            return "fsdp (1 process: nothing to shard)"
        units = sum(len(shard_units(m)) + 1 for m in self.modules)
        return f"fsdp over {self.world} processes ({units} shard units)"

    # ------------------------------------------------------------------ build
    def shard(self, module: torch.nn.Module) -> torch.nn.Module:
        """``fully_shard`` each repeated block, then the module (in place); parameters become DTensors, so collect
        trainable parameters and build the optimizer after this."""
        if not self.active:
            return module
        from torch.distributed.device_mesh import init_device_mesh

        FSDPModule, MixedPrecisionPolicy, fully_shard = _fsdp()
        if self._mesh is None:
            self._mesh = init_device_mesh(self.device.type, (self.world,))
        dtypes = {p.dtype for p in module.parameters()}
        if len(dtypes) > 1:  # FSDP2 gathers a unit as one flat buffer of one dtype
            raise ConfigError(f"distributed=fsdp needs one parameter dtype per model, this denoiser holds "
                              f"{sorted(str(d) for d in dtypes)}; keep the weights in one dtype (backbone.dtype) and "
                              f"set distributed.param_dtype=bf16 for bf16 compute")
        mp = MixedPrecisionPolicy(param_dtype=DTYPES[self.param_dtype],
                                  reduce_dtype=DTYPES[self.settings.reduce_dtype])
        kw = dict(mesh=self._mesh, mp_policy=mp, reshard_after_forward=self.settings.reshard_after_forward)
        for unit in shard_units(module):
            fully_shard(unit, **kw)
        fully_shard(module, **kw)
        for m in module.modules():
            if isinstance(m, FSDPModule):
                m.set_gradient_divide_factor(1.0)  # sums: the loop's losses are normalised by the global count
                m.set_force_sum_reduction_for_comms(True)  # plain SUM collectives (gloo has no PREMUL_SUM)
        self.modules.append(module)
        return module

    # ------------------------------------------------------------------ sampling
    @contextmanager
    def gathered(self):
        """Every sharded module's parameters gathered once for the block (no collective per forward); resharded
        on exit. Every process must enter it together."""
        if not self.active or not self.settings.gather_for_sampling:
            yield
            return
        FSDPModule, _, _ = _fsdp()
        units = [m for root in self.modules for m in root.modules() if isinstance(m, FSDPModule)]
        for m in units:
            m.set_reshard_after_forward(False, recurse=False)
            m.unshard()
        try:
            yield
        finally:
            for m in units:
                m.reshard()  # every unit: the root's reshard() alone leaves the blocks gathered
                m.set_reshard_after_forward(self.settings.reshard_after_forward, recurse=False)

    @contextmanager
    def weights(self, ema, params: list[torch.Tensor]):
        """Sampling weights for the block: the EMA's (``ema``) swapped in, or the live ones (``ema=None``), gathered
        once (every process enters it together)."""
        from contextlib import nullcontext

        with (ema.swapped() if ema is not None else nullcontext()), self.gathered():
            yield

    # ------------------------------------------------------------------ collectives on parameters
    def balance(self, count: int) -> int:
        """The largest of the processes' pass counts (the count each pads to); ``count`` when not sharded."""
        if not self.active:
            return count
        t = torch.tensor([int(count)], dtype=torch.long, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t.item())

    def all_finite(self, tensors: list[torch.Tensor], local_only: bool = False) -> bool:
        """Whether every process's part of every tensor has a finite L2 norm (one fused norm, one reduce; with
        ``local_only`` this process's part, no collective)."""
        with torch.no_grad():
            local = [t for t in self.local(tensors, padded=False) if t.numel()]
            ok = bool(torch.stack(torch._foreach_norm(local, 2.0)).isfinite().all()) if local else True
        if not self.active or local_only:
            return ok
        flag = torch.tensor([0 if ok else 1], dtype=torch.long, device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return not bool(flag.item())

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float) -> float:
        """Clip the (sharded) gradients to a total L2 norm of ``max_norm``; returns the norm before clipping."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return 0.0
        total = torch.nn.utils.get_total_norm(grads, 2.0)
        if _is_dtensor(total):
            total = total.full_tensor()
        torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, total)
        return float(total)

    def full(self, t: torch.Tensor, param: torch.Tensor | None = None) -> torch.Tensor:
        """The whole tensor on the CPU (an all-gather for a sharded one: every process must call it); ``param``:
        the parameter ``t`` is laid out as (``t`` itself here)."""
        t = t.detach()
        return (t.full_tensor() if _is_dtensor(t) else t).cpu()

    @staticmethod
    def like(full: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``full`` laid out as ``target``: this process's shard of it for a sharded ``target``."""
        if not _is_dtensor(target):
            return full
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(target.device, target.dtype), target.device_mesh, target.placements,
                                 src_data_rank=None)  # each process reads the whole file: no scatter needed


# ---------------------------------------------------------------------- sharded checkpoints (DCP)
SHARDED_DIR = "sharded"


@contextmanager
def _one_process_quiet():
    """DCP warns that it runs in one process when no process group exists; that is intended here."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _state(policy, optimizer=None, ema: bool = True, model: bool = True) -> dict:
    """The tensors a sharded checkpoint holds, by name: the trainable weights (``model``), the EMA (``ema``), the
    optimizer's states (keyed by parameter name). Views of the live tensors: DCP reads into them in place."""
    state = {}
    if model:
        state["model"] = {n: p.detach() for n, p in zip(policy.trainable_names, policy.params)}
    if ema and policy.ema is not None:
        state["ema"] = dict(zip(policy.trainable_names, policy.ema.shadow))
    if optimizer is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        state["optimizer"] = get_optimizer_state_dict(policy.denoiser, optimizer,
                                                      options=StateDictOptions(ignore_frozen_params=True))
    return state


def save_sharded(policy, optimizer, directory: Path) -> None:
    """Weights, EMA and optimizer states with ``torch.distributed.checkpoint``: each process writes its shards
    (every process calls it); loadable on any number of processes."""
    import torch.distributed.checkpoint as dcp

    with _one_process_quiet():
        dcp.save(_state(policy, optimizer), checkpoint_id=str(directory))


def load_sharded(policy, optimizer, directory: Path) -> None:
    """Load ``save_sharded``'s checkpoint into the run's tensors, resharded to this run's processes (every process
    calls it; one process needs no process group)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state = _state(policy, optimizer)
    with _one_process_quiet():
        dcp.load(state, checkpoint_id=str(directory))
    set_optimizer_state_dict(policy.denoiser, optimizer, optim_state_dict=state["optimizer"],
                             options=StateDictOptions(ignore_frozen_params=True))


def load_sharded_weights(policy, directory: Path, which: str) -> None:
    """The ``model`` (live) or ``ema`` weights of a sharded checkpoint into ``policy``'s trainable weights, in one
    process (``alignrl eval``, ``sample``, ``export`` of a run saved without whole weights)."""
    import torch.distributed.checkpoint as dcp

    state = {which: {n: p.detach() for n, p in zip(policy.trainable_names, policy.params)}}
    with _one_process_quiet():
        dcp.load(state, checkpoint_id=str(directory))
