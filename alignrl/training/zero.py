"""DeepSpeed ZeRO for full fine-tunes, chosen with ``distributed=zero2`` or ``distributed=zero3`` (DeepSpeed must be
installed: ``pip install 'alignrl[deepspeed]'``).

ZeRO-2 splits the optimizer's states and the gradients over the processes (every process keeps the whole weights);
ZeRO-3 splits the weights too (each parameter's flat elements, ``param.ds_tensor``), gathering a module's weights just
before it runs. DeepSpeed is meant for GPUs; on a CPU it runs through its CPU accelerator (that is how the tests run
it, 2 processes over gloo), where ``distributed=fsdp`` is the usual choice.

How the loop drives DeepSpeed's engine, so that ZeRO gives the same update as ``ddp``:

- The loop keeps its own optimizer (AdamW), learning-rate schedule, EMA and checkpoints; the engine is built around the
  optimizer (``deepspeed.initialize(model=denoiser, optimizer=...)``) in fp32 weights with the loop's autocast, and the
  loop calls the denoiser itself (ZeRO-3's gathering hooks sit on the denoiser's sub-modules; a pre-forward hook does
  what the engine's forward does first: without it ZeRO-3 kept only the last pass's gradients, measured).
- Gradient accumulation belongs to the loop (``managed_gradient_accumulation: false``): each forward/backward pass
  adds into the partitioned gradients, and ``engine.step()`` is the boundary (reduce, clip to
  ``trainer.max_grad_norm``, AdamW step). DeepSpeed averages over processes; the loop's losses are already
  normalised by the global sample count, so each pass's loss is multiplied by the process count (sums, as ``ddp``).
- Gradients are reduced in every backward pass (a collective), so every process runs as many passes: the same
  ``supports_sharding`` balancing as ``fsdp``.
- Rollouts and evaluation run with ZeRO-3's weights gathered once (``GatheredParameters``), as ``fsdp``'s
  ``gather_for_sampling``. The frozen reference of the KL term stays whole in every process.
- Checkpoints are the ``ddp`` layout: whole weights and EMA in safetensors and the optimizer's states per parameter
  (gathered from the partitions with DeepSpeed's ``safe_get_full_optimizer_state``), so a ZeRO run resumes onto any
  number of processes and any strategy, and ``eval``, ``sample`` and ``export`` read it as any other.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from alignrl.errors import ConfigError
from alignrl.training.sharding import Sharding

ZERO_STAGES = {"zero2": 2, "zero3": 3}
ADAM_STATES = ("exp_avg", "exp_avg_sq")


def import_deepspeed(strategy: str, device_type: str):
    """DeepSpeed, imported for ``distributed=<strategy>`` (its CPU accelerator on a CPU run); a one-line error
    naming the fix when it is not installed."""
    if device_type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed picks its accelerator at import
    try:
        import deepspeed
    except ImportError as e:
        raise ConfigError(f"distributed={strategy} needs DeepSpeed, which is not installed ({e}); "
                          f"pip install 'alignrl[deepspeed]' (or use distributed=fsdp)") from None
    return deepspeed


def deepspeed_config(stage: int, max_grad_norm: float, extra: dict | None = None) -> dict:
    """The engine's configuration: ZeRO ``stage``, the loop's clipping, accumulation owned by the loop; ``extra``
    (``distributed.deepspeed``) is merged in, one level deep (e.g. ``{zero_optimization: {offload_optimizer:
    {device: cpu}}}``)."""
    cfg = {
        "train_micro_batch_size_per_gpu": 1,  # bookkeeping only: the loop forms its own batches
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,  # step() is the boundary: any number of passes before it
        "gradient_clipping": float(max_grad_norm),
        "zero_optimization": {"stage": stage, "overlap_comm": False, "contiguous_gradients": True},
        "zero_allow_untested_optimizer": True,  # the loop's own torch AdamW
        # offload_optimizer steps the loop's AdamW on the host copy (DeepSpeedCPUAdam is not used: its states
        # would leave the checkpoint's plain AdamW layout)
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2 ** 62,
        "wall_clock_breakdown": False,
    }
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


class ZeroSharding(Sharding):
    """``distributed=zero2|zero3`` over several processes (one process: nothing to split, the ``ddp`` path).

    Built like ``Sharding`` (``shard`` does nothing: the engine wraps the denoiser once the optimizer exists, in
    ``wrap``); afterwards it owns the backward pass and the optimizer step, and reads and writes the optimizer's
    states in the ``ddp`` layout."""

    def __init__(self, settings, world: int, device: torch.device, mixed_precision: str = "no"):
        super().__init__(settings, world, device, mixed_precision)
        self.stage = ZERO_STAGES[settings.strategy]
        self.active = self.world > 1
        self.engine = None  # DeepSpeed's engine (its ``module`` is the denoiser), once wrap() ran
        self.param_groups: list[list[torch.nn.Parameter]] = []  # the optimizer's groups before DeepSpeed flattens them

    @property
    def owns_update(self) -> bool:
        return self.active

    def describe(self) -> str:
        if not self.active:
            return f"{self.settings.strategy} (1 process: nothing to split)"
        out = f"deepspeed zero-{self.stage} over {self.world} processes"
        if self.partitioned and self.engine is not None:  # DeepSpeed keeps small weights whole (persistence)
            params = list(self.engine.module.parameters())
            whole = sum(bool(getattr(p, "ds_persist", False)) for p in params)
            out += f" ({whole} of {len(params)} weight tensors kept whole)"
        return out

    def shard(self, module: torch.nn.Module) -> torch.nn.Module:
        return module  # the engine is built in wrap(), around the optimizer

    @property
    def partitioned(self) -> bool:
        """Whether the weights themselves are split (ZeRO-3 over several processes)."""
        return self.active and self.stage == 3

    # ------------------------------------------------------------------ build
    def wrap(self, denoiser: torch.nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float):
        """The DeepSpeed engine around ``denoiser`` and the loop's ``optimizer``; returns the optimizer the loop
        steps through (DeepSpeed's ZeRO optimizer). The learning-rate schedule built on ``optimizer`` keeps working:
        DeepSpeed keeps its parameter groups (their ``lr``) and swaps only their tensors."""
        if not self.active:
            return optimizer
        deepspeed = import_deepspeed(self.settings.strategy, self.device.type)
        self.param_groups = [list(g["params"]) for g in optimizer.param_groups]
        config = deepspeed_config(self.stage, max_grad_norm, self.settings.deepspeed)
        engine, ds_optimizer, _, _ = deepspeed.initialize(model=denoiser, optimizer=optimizer, config=config,
                                                          dist_init_required=False)
        self.engine = engine
        # the loop calls the denoiser, not the engine: what the engine does before each forward (a new pass's
        # gradients are added to, not taken for another phase of the previous backward) is done here
        denoiser.register_forward_pre_hook(lambda *_: ds_optimizer.clear_backward_seen_flag())
        return ds_optimizer

    def local(self, params: list[torch.Tensor], padded: bool = True) -> list[torch.Tensor]:
        """This process's part of each parameter: its ZeRO-3 partition, else the parameter. A size that does not
        divide by the process count leaves the last partitions padded with unset memory (NaN at times: a finiteness
        check over it failed on 3 processes, measured); ``padded=False`` leaves the padding out."""
        if not self.partitioned:
            return list(params)
        if padded:
            return [p.ds_tensor for p in params]
        out = []
        for p in params:
            size = p.ds_tensor.numel()
            out.append(p.ds_tensor.narrow(0, 0, max(0, min(size, p.ds_numel - self.rank * size))))
        return out

    # ------------------------------------------------------------------ the update
    def backward(self, loss: torch.Tensor) -> None:
        """One pass's gradients, added into the partitioned gradients (a reduction every process must reach)."""
        self.engine.backward(loss * self.world)  # DeepSpeed averages over processes; the loop's losses sum

    def step(self) -> float:
        """Reduce, clip, step the optimizer, zero the gradients; the gradient norm before clipping. DeepSpeed skips
        the step when the norm is not finite (the weights stay finite): the caller treats that as the divergence
        the other strategies detect in the weights."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    # ------------------------------------------------------------------ sampling
    @contextmanager
    def gathered(self):
        """ZeRO-3: every weight of the denoiser gathered for the block, with ZeRO-3's per-module hooks taken off
        (they would free each module's weights after its forward and gather them again in the next: a collective
        per forward, which processes sampling different numbers of images cannot all reach); put back on exit."""
        if not self.partitioned:
            yield
            return
        from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

        with unwrap_model_for_generation(self.engine):
            yield

    @contextmanager
    def weights(self, ema, params: list[torch.Tensor]):
        """Sampling weights for the block: the EMA's (``ema``) or the live ones (``ema=None``), gathered. ZeRO-3
        gathers first and swaps the EMA into the whole weights (its small parameters stay whole in every process
        between forwards, so a swap into the partitions alone would not reach them; measured)."""
        if not self.partitioned:
            with super().weights(ema, params):
                yield
            return
        with self.gathered():
            if ema is None:
                yield
                return
            # the live weights stay in the partitions (ds_tensor), which the gathered copies are freed back to on
            # exit; only the small parameters ZeRO-3 keeps whole need their live values put back
            backup = {i: p.detach().clone() for i, p in enumerate(params) if getattr(p, "ds_persist", False)}
            with torch.no_grad():
                for s, p in zip(ema.shadow, params):
                    p.copy_(self._gather_flat(s, p.device)[:p.ds_numel].view_as(p))
            try:
                yield
            finally:
                with torch.no_grad():
                    for i, b in backup.items():
                        params[i].copy_(b)

    # ------------------------------------------------------------------ collectives on parameters
    @property
    def gathers(self) -> bool:
        return self.partitioned  # ZeRO-2 keeps the whole weights in every process

    def _gather_flat(self, part: torch.Tensor, device) -> torch.Tensor:
        """Every process's ``part`` (a ZeRO-3 partition: equal sizes, the last padded) in rank order, flat, on
        ``device`` (every process must call it)."""
        out = torch.empty(part.numel() * self.world, dtype=part.dtype, device=self.device)
        torch.distributed.all_gather_into_tensor(out, part.detach().reshape(-1).to(self.device).contiguous())
        return out.to(device)

    def full(self, t: torch.Tensor, param: torch.Tensor | None = None) -> torch.Tensor:
        """The whole tensor on the CPU. ZeRO-3: ``t`` is a partition of ``param`` (its ``ds_tensor`` or an EMA
        shadow of it), all-gathered (every process must call it); only the main process keeps it (the others get
        an empty tensor: checkpoints are written by the main process, and a 12B model's whole weights in every
        process's host memory would not fit)."""
        if not self.partitioned or param is None:
            return t.detach().cpu()
        flat = self._gather_flat(t, self.device)
        if self.rank != 0:
            return torch.empty(0)
        return flat[:param.ds_numel].view(param.ds_shape).cpu()

    def like(self, full: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``full`` as ``target`` holds it: this process's ZeRO-3 partition when ``target`` is one."""
        if not self.partitioned or target.numel() == full.numel():
            return full
        size = target.numel()
        flat = full.reshape(-1)
        flat = torch.cat([flat, flat.new_zeros(size * self.world - flat.numel())])
        return flat[self.rank * size:(self.rank + 1) * size].view_as(target).to(target.dtype)

    @property
    def rank(self) -> int:
        return torch.distributed.get_rank()

    # ------------------------------------------------------------------ weights and optimizer states (ddp layout)
    def trainable_state(self, names: list[str], params: list[torch.Tensor]) -> dict:
        return {n: self.full(self.local([p])[0], p).contiguous() for n, p in zip(names, params)}

    def load_weights(self, tensors: dict, names: list[str], params: list[torch.Tensor], path) -> None:
        """Whole weights (a checkpoint's ``path``) into the live parameters and DeepSpeed's fp32 master copies."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_local_fp32_param

        from alignrl.errors import CheckpointError

        for n, p in zip(names, params):
            shape = tuple(p.ds_shape) if self.partitioned else tuple(p.shape)
            if n not in tensors or tuple(tensors[n].shape) != shape:
                raise CheckpointError(f"{path}: tensor {n} is missing or has another shape than the model's {shape}; "
                                      f"was it written with another trainer.finetune or model?")
        with torch.no_grad():
            for n, p in zip(names, params):
                full = tensors[n]
                if self.partitioned:  # this process's part (padded), into the partition and its fp32 master
                    part = self.like(full.to(p.ds_tensor.device, p.ds_tensor.dtype), p.ds_tensor)
                    p.ds_tensor.copy_(part)
                    safe_set_local_fp32_param(p, part.to(self.device, torch.float32).reshape(-1))
                    if p.numel() == p.ds_numel:  # a small parameter ZeRO-3 keeps whole between forwards
                        p.copy_(full)
                else:
                    p.copy_(full)
                    safe_set_full_fp32_param(p, full.to(self.device, torch.float32))

    def optimizer_state_dict(self, optimizer) -> dict:
        """The optimizer's states as a plain torch AdamW's ``state_dict()`` over the original parameters (every
        process must call it: the partitions are gathered)."""
        if not self.active:  # one process: the loop's own optimizer, no engine (the ddp path)
            return Sharding.optimizer_state_dict(optimizer)
        from deepspeed.utils import safe_get_full_optimizer_state

        keep = self.rank == 0  # every process takes part in the gathers; the main process writes the file
        inner = optimizer.optimizer  # the loop's AdamW, its groups now over DeepSpeed's flat partitions
        steps = [s.get("step") for s in inner.state.values() if "step" in s]
        state, groups, index = {}, [], 0
        for group, params in zip(inner.param_groups, self.param_groups):
            ids = []
            for p in params:
                if steps:
                    entry = {"step": steps[0].detach().clone().cpu() if torch.is_tensor(steps[0]) else steps[0]}
                    for key in ADAM_STATES:
                        value = safe_get_full_optimizer_state(p, key)  # a collective
                        if keep:
                            entry[key] = value.detach().reshape(p.ds_shape if self.partitioned else p.shape).cpu()
                        del value
                    if keep:
                        state[index] = entry
                ids.append(index)
                index += 1
            groups.append({k: v for k, v in group.items() if k != "params"} | {"params": ids})
        return {"state": state, "param_groups": groups}

    @staticmethod
    def _init_states(optimizer) -> None:
        """AdamW's states for DeepSpeed's flat partitions as AdamW creates them at its first step (zeros, step 0),
        linked to the parameters, so a checkpoint's states can be written into them before any step."""
        inner = optimizer.optimizer
        # ZeRO-3 lends its flat fp32 partitions to the optimizer's groups only while it steps
        flats = getattr(optimizer, "fp32_partitioned_groups_flat", None) \
            or [flat for group in inner.param_groups for flat in group["params"]]
        for flat in flats:
            state = inner.state[flat]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(flat, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(flat, memory_format=torch.preserve_format)
        if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2 map each parameter to its slices
            optimizer._lazy_init_hp_params_optimizer_state()

    def load_optimizer_state_dict(self, optimizer, saved: dict) -> None:
        """A plain AdamW ``state_dict()`` (from any strategy and process count) into DeepSpeed's partitions."""
        if not self.active:
            return Sharding.load_optimizer_state_dict(optimizer, saved)
        from deepspeed.utils import safe_set_full_optimizer_state, safe_set_local_optimizer_state

        inner = optimizer.optimizer
        self._init_states(optimizer)
        if len(saved["param_groups"]) != len(inner.param_groups):
            raise ConfigError(f"the checkpoint's optimizer has {len(saved['param_groups'])} parameter groups, this "
                              f"run's {len(inner.param_groups)}: resume with the same trainer.optimizer settings")
        for group, saved_group in zip(inner.param_groups, saved["param_groups"]):
            for key, value in saved_group.items():
                if key != "params":
                    group[key] = value
        step = None
        for saved_group, params in zip(saved["param_groups"], self.param_groups):
            for i, p in zip(saved_group["params"], params):
                entry = saved["state"].get(i) or saved["state"].get(str(i))
                if entry is None:
                    continue
                step = entry["step"]
                for key in ADAM_STATES:
                    value = entry[key].to(self.device, torch.float32)
                    if self.partitioned:  # this process's part (padded), as load_weights
                        safe_set_local_optimizer_state(p, self.like(value, p.ds_tensor).reshape(-1), key)
                    else:
                        safe_set_full_optimizer_state(p, value, key)
        if step is not None:
            for s in inner.state.values():
                if "step" in s:
                    s["step"] = step.clone() if torch.is_tensor(step) else step
