"""``alignrl plan``: the per-GPU memory a recipe needs on a machine, and what would make it fit.

    alignrl plan recipe=mixgrpo_flux machine.gpus=8 machine.gpu_memory_gb=80 machine.nodes=1

Estimate, in bytes, per GPU (``P`` denoiser parameters, ``N`` the sharding divisor):

- a fixed 4 GiB (CUDA context, allocator slack, NCCL);
- frozen residents: the text encoders and the VAE in the backbone's dtype;
- the denoiser: LoRA keeps the base in the backbone's dtype plus 16 bytes per adapter parameter (fp32 weight,
  gradient, Adam's two moments); a full fine-tune keeps 16 bytes per parameter (fp32 master weight, gradient and
  Adam's moments) divided by ``N``;
- the frozen reference (a KL weight > 0): nothing with LoRA (the adapters are switched off), a copy in the
  backbone's dtype for a full fine-tune; the EMA: an fp32 copy of the trainable weights, and another for
  ``trainer.decay_to_base`` (the starting weights it pulls toward);
- activations of the largest training forward (``_pass_rows``: ``trainer.train_batch_size`` samples times their
  transitions at the schedule steps ``trainer.steps_per_pass`` packs into one forward, a tree's width or a side
  branch's children counting per sample, at most ``transitions_per_update`` under ``update_by=transitions``; doubled
  when CFG runs in the training forward), with and without gradient checkpointing. The published transformers use
  per-token coefficients ``c`` measured on a GPU on reduced real configurations (``TOKEN_COEFF``: by whether
  autocast runs and the weights it casts are fp32): ``c L B S d`` bytes without checkpointing,
  ``2 L B S d + c B S d`` with it (an upper figure: measured 0.14-0.95x); Wan per model, SD1.5 and SDXL per sample
  at their native size, scaled by pixels (a meta-device forward summing saved tensors); the built-in tiny and
  ShapeWorld backbones are measured here, by one training forward that sums the tensors autograd saves. Weights kept
  in fp32 under autocast (a full fine-tune not gathered in half precision, an fp32 LoRA base) add autocast's 16-bit
  copy of each (2 B/param; one block's with checkpointing).

With ``distributed=ddp`` (data-parallel) ``N`` is 1 and the fully sharded figure (``N`` = every GPU) is printed
beside it; with ``distributed=fsdp`` (a full fine-tune) ``N`` is every GPU of the job, plus the shard units in
flight: two gathered blocks in the gather dtype and one block's unsharded fp32 gradients (a block taken as
``2 P / L``, an upper figure for unequal blocks). It fits when the total is at most 90% of the GPU's memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from alignrl.errors import ConfigError

GiB = float(2**30)
OVERHEAD = 4 * GiB
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

# Parameter counts of the published models (exact, from their real configurations on the meta device).
KNOWN = {
    "sd15": dict(denoiser=859.5e6, text=123.1e6, vae=83.7e6, family="unet", layers=16, width=1280),
    "sdxl": dict(denoiser=2.567e9, text=123.1e6 + 694.7e6, vae=83.7e6, family="unet", layers=70, width=1280),
    "sd35_medium": dict(denoiser=2.243e9, text=123.1e6 + 694.7e6 + 4.762e9, vae=83.8e6, family="sd3", layers=24,
                        width=1536),
    "flux1_dev": dict(denoiser=11.90e9, text=123.1e6 + 4.762e9, vae=83.8e6, family="flux", layers=57, width=3072),
    # Wan2.1: UMT5-XXL text encoder, the 3D VAE; per-model activation coefficients (measured, see TOKEN_COEFF)
    "wan21_t2v_1_3b": dict(denoiser=1.419e9, text=5.681e9, vae=126.9e6, family="wan", layers=30, width=1536,
                           coeff=98.0),
    "wan21_t2v_14b": dict(denoiser=14.29e9, text=5.681e9, vae=126.9e6, family="wan", layers=40, width=5120,
                          coeff=83.0),
}
# Activation coefficients: bytes per token, layer and unit of width that one training forward keeps for backward,
# measured on an H200 (scripts/bench_memory.py: reduced real configurations, 512 px, T5 128, batches 1 and 2; CUDA
# memory allocated after the forward, above the weights), by how the forward runs:
#   plain     half-precision weights, no autocast (trainer.mixed_precision=no)
#   autocast  half-precision weights under autocast (a bf16/fp16 LoRA base, or FSDP's units gathered in bf16):
#             autocast keeps norms and softmax in fp32, SD3 measured 1.19-1.20x its plain figure, FLUX 1.25x
#   fp32      fp32 weights under autocast (a full fine-tune that no FSDP gathers in half precision, an fp32 LoRA
#             base): 1.29x (SD3) and 1.55x (FLUX) the plain figure, besides autocast's bf16 copy of every weight it
#             casts (2 B/param, measured), kept for backward: a row of its own (an optimizer step of several passes
#             holds them beside the gradients of the passes before)
TOKEN_COEFF = {"sd3": {"plain": 71.0, "autocast": 85.0, "fp32": 92.0},
               "flux": {"plain": 42.0, "autocast": 53.0, "fp32": 65.0}}
# UNets: GiB per sample (no checkpointing, block checkpointing) at their native side.
UNET_ACT = {"sd15": (512, 0.92, 0.14), "sdxl": (1024, 6.81, 0.55)}


@dataclass(frozen=True)
class Machine:
    gpus: int = 8  # per node
    gpu_memory_gb: float = 80.0
    nodes: int = 1

    def __post_init__(self):
        if self.gpus < 1 or self.nodes < 1 or self.gpu_memory_gb <= 0:
            raise ConfigError("machine.gpus and machine.nodes must be >= 1 and machine.gpu_memory_gb > 0")


@dataclass
class Estimate:
    rows: list[tuple[str, float]]  # (component, bytes) with checkpointing as the recipe sets it
    act_plain: float
    act_ckpt: float
    total: float
    total_sharded: float
    limit: float
    notes: list[str]

    @property
    def fits(self) -> bool:
        return self.total <= self.limit


def _lora_params(rank: int, width: int, layers: int, targets: int) -> float:
    """Adapter parameters: rank x (in + out) per targeted projection, one per target name and layer."""
    return float(rank) * 2 * width * layers * targets


def _measured(cfg: DictConfig, batch: int) -> tuple[dict, float, float]:
    """Counts and activation bytes of a backbone built here (the tiny and ShapeWorld ones)."""
    import torch

    from alignrl.components import build_backbone

    backbone = build_backbone(cfg, torch.device("cpu"))
    denoiser = backbone.transformer
    frozen = sum(p.numel() for m in backbone.frozen_modules() for p in m.parameters())
    counts = dict(denoiser=float(sum(p.numel() for p in denoiser.parameters())), text=float(frozen), vae=0.0,
                  family=backbone.family, layers=0, width=0)
    plain = saved_activation_bytes(backbone, batch, checkpointing=False)
    ckpt = saved_activation_bytes(backbone, batch, checkpointing=True)
    return counts, plain, ckpt


class SavedTensorBytes:
    """A context that sums the bytes of the distinct non-parameter tensors autograd saves inside it (``.total``),
    each storage once; the parameters of ``module`` are left out."""

    def __init__(self, module):
        self._params = {p.untyped_storage().data_ptr() for p in module.parameters()}
        self._seen: dict[int, int] = {}

    def _pack(self, t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in self._params:
            self._seen[storage.data_ptr()] = storage.nbytes()
        return t

    def __enter__(self):
        import torch

        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)

    @property
    def total(self) -> float:
        return float(sum(self._seen.values()))


def saved_activation_bytes(backbone, batch: int, checkpointing: bool) -> float:
    """Bytes of the distinct non-parameter tensors autograd saves in one training forward of ``batch`` samples."""
    import torch

    denoiser = backbone.transformer
    saved = SavedTensorBytes(denoiser)
    if checkpointing:
        denoiser.enable_gradient_checkpointing()
    denoiser.train()
    gen = [torch.Generator().manual_seed(i) for i in range(batch)]
    schedule = backbone.make_schedule(4)
    x = backbone.start_latents(gen, schedule)
    cond = backbone.encode_prompts(["a photo"] * batch)
    trainable = [p for p in denoiser.parameters()]
    flags = [p.requires_grad for p in trainable]
    for p in trainable:
        p.requires_grad_(True)
    try:
        with saved:
            v = backbone.predict(x, schedule.timesteps[1], cond, 1.0)
        v.float().pow(2).mean().backward()
    finally:
        for p, f in zip(trainable, flags):
            p.requires_grad_(f)
            p.grad = None
        if checkpointing:
            denoiser.disable_gradient_checkpointing()
    return saved.total


def _compute_weight_bytes(cfg: DictConfig, world: int) -> int:
    """Bytes per weight as the training forward reads them: a full fine-tune's fp32 master weights, unless FSDP
    (more than one process) gathers its units in half precision; a LoRA base in the backbone's dtype."""
    t = cfg.trainer
    if str(t.finetune) == "full":
        gathered = _distributed(cfg).gather_dtype(str(t.get("mixed_precision", "no")))
        return 2 if sharded_run(cfg) and world > 1 and gathered in ("bf16", "fp16") else 4
    return DTYPE_BYTES.get(str(cfg.backbone.get("dtype", "fp32")), 4)


def _forward_kind(cfg: DictConfig, world: int) -> str:
    """How a training forward runs (the key of TOKEN_COEFF): ``plain`` without autocast, ``fp32`` for fp32 weights
    under autocast, else ``autocast`` (half-precision weights under autocast). ``world``: the job's processes."""
    if str(cfg.trainer.get("mixed_precision", "no")) == "no":
        return "plain"
    return "fp32" if _compute_weight_bytes(cfg, world) == 4 else "autocast"


def _pass_rows(cfg: DictConfig, steps_per_pass: int | None = None) -> tuple[int, int]:
    """(rows of the largest training forward before CFG doubles them, schedule steps it packs at most), as
    ``train_on_transitions`` forms its passes: ``trainer.train_batch_size`` samples (roots) a minibatch, their
    transitions split by schedule step, consecutive steps of one kernel packed ``trainer.steps_per_pass`` at a time
    (0: all; ``steps_per_pass`` overrides the setting). A sample contributes its plan's transitions at a step: one on
    a linear plan, a tree's width (less its pruned edges) or a side branch's children on a branching one (D3PO's
    pair, BranchGRPO's tree, TempFlow's and G2RPO's branches). One step a pass for the methods that do not train on
    per-step transitions independently and under ``update_by=step``. Exact under ``update_by=samples`` when every
    sample trains every trained step; an upper figure where a sample trains a random subset of its steps
    (DanceGRPO's ``timestep_fraction``) or an optimizer step holds a slice of the transitions
    (``update_by=transitions``, which also caps a pass at ``transitions_per_update`` rows)."""
    import torch

    from alignrl.components import build_planner
    from alignrl.config import _batch_kind, steps_per_pass as packed_steps

    t = cfg.trainer
    batch = int(t.train_batch_size)
    if _batch_kind(cfg) != "transitions":  # final images, offline rows, prompts: a sample is a row
        return batch, 1
    planner = build_planner(cfg)
    gen = torch.Generator().manual_seed(0)
    planner.begin_iteration(0, gen)
    plan = planner.plan(gen)
    steps = plan.transitions_per_root(width_pruned=int(cfg.algorithm.get("group_size", 1)) == 1) or [(1, None)]
    n = packed_steps(cfg) if steps_per_pass is None else steps_per_pass
    update_by = str(t.get("update_by", "samples"))
    if update_by == "step":  # an optimizer step holds one schedule step
        n = 1
    n = len(steps) if n == 0 else min(n, len(steps))
    runs, last = [], object()  # consecutive steps of one kernel: a pass never mixes kernels
    for rows, kernel in steps:
        if kernel != last:
            runs.append([])
        runs[-1].append(rows)
        last = kernel
    per_sample_steps = len(steps)
    if plan.sample_fraction is not None:  # each sample trains this many of its steps, drawn at random
        per_sample_steps = max(1, int(len(steps) * plan.sample_fraction))
    exact = update_by == "samples" and per_sample_steps == len(steps)
    if exact:  # the passes' step blocks are fixed: n at a time from each run's first step
        per_sample = max(sum(run[k:k + n]) for run in runs for k in range(0, len(run), n))
    else:  # the blocks can fall anywhere: the largest n consecutive steps, no more than a sample trains
        widest = max(rows for rows, _ in steps)
        per_sample = min(max(sum(run[k:k + n]) for run in runs for k in range(len(run))),
                         per_sample_steps * widest)
    rows = batch * per_sample
    if update_by == "transitions":  # a pass holds at most one optimizer step's transitions
        rows = min(rows, int(t.get("transitions_per_update", 1)))
    return rows, min(n, max(len(run) for run in runs), per_sample_steps)


def estimate(cfg: DictConfig, machine: Machine) -> Estimate:
    t, b = cfg.trainer, cfg.backbone
    name = str(b.get("name", ""))
    dtype_bytes = DTYPE_BYTES.get(str(b.get("dtype", "fp32")), 4)
    frozen_bytes = DTYPE_BYTES.get(str(b.get("frozen_dtype") or b.get("dtype", "fp32")), 4)  # text encoders, VAE
    batch = int(t.train_batch_size)
    from alignrl.components import build_algorithm
    from alignrl.config import _batch_kind

    guidance = float(cfg.sampler.get("guidance_scale", 1.0) or 1.0)
    # CFG runs in the training forward only for the methods that re-score sampled steps (the GRPO family,
    # D3PO, DPOK); FLUX's guidance is embedded (one forward)
    cfg_in_loss = guidance > 1.0 and _batch_kind(cfg) == "transitions" and "flux" not in name
    rows_per_pass, packed = _pass_rows(cfg)
    micro = rows_per_pass * (2 if cfg_in_loss else 1)
    algorithm = build_algorithm(cfg)
    needs_reference = bool(algorithm.needs_reference)
    opt_bytes = 8 if str(t.optimizer.get("name", "adamw")) == "adamw" else 1  # Adafactor: factored moments
    world = machine.gpus * machine.nodes
    kind = _forward_kind(cfg, world)  # how the training forward reads its weights (TOKEN_COEFF's key)
    notes = ["not counted: the reward models' weights, and for reward-gradient methods the graph through the "
             "sampler and the decode"]
    if name in KNOWN:
        counts = KNOWN[name]
        res = int(b.get("resolution", 512))
        if counts["family"] == "unet":
            side, plain1, ckpt1 = UNET_ACT[name]
            scale = (res / side) ** 2
            act_plain, act_ckpt = plain1 * GiB * scale * micro, ckpt1 * GiB * scale * micro
        else:  # transformers: c bytes per token, layer and unit of width; S tokens per sample
            if counts["family"] == "wan":  # video: latent frames x (H/16) x (W/16); text enters by cross-attention
                frames = (int(b.get("num_frames", 33)) - 1) // 4 + 1
                rows, cols = res // 16, int(b.get("width") or res) // 16
                s = frames * rows * cols
                notes.append(f"video: {frames} latent frames x {rows} x {cols} patches = {s} tokens per sample "
                             f"(frames multiply the activations)")
            else:
                text = int(b.get("max_sequence_length", 256)) + (77 if counts["family"] == "sd3" else 0)
                s = (res // 16) ** 2 + text
            L, d = counts["layers"], counts["width"]
            c = counts.get("coeff") or TOKEN_COEFF[counts["family"]][kind]
            if kind == "plain":  # no autocast: the activations take the weights' dtype (fp32: twice the bytes)
                c *= _compute_weight_bytes(cfg, world) / 2
            act_plain = c * L * micro * s * d
            act_ckpt = 2 * L * micro * s * d + c * micro * s * d
    elif name.startswith(("tiny", "shapes")):
        counts, act1, ck1 = _measured(cfg, 1)
        act_plain, act_ckpt = act1 * micro, ck1 * micro
        notes.append("activations measured here: one training forward of this backbone (fp32 on CPU)")
    else:
        raise ConfigError(f"alignrl plan knows the backbones sd15, sdxl, sd35_medium, flux1_dev, wan21_t2v_1_3b, "
                          f"wan21_t2v_14b and the built-in tiny "
                          f"and ShapeWorld ones, not '{name}'; plan with the published backbone of the same size")
    P = counts["denoiser"]
    shards = world
    lora = str(t.finetune) == "lora"
    ckpt_on = bool(t.get("gradient_checkpointing", False))
    on_cpu = str(t.get("device", "auto")) == "cpu"
    rows = [("CUDA context, allocator, NCCL" if not on_cpu else "CUDA context (none: a CPU recipe)",
             0.0 if on_cpu else OVERHEAD),
            ("text encoders and VAE (frozen)", frozen_bytes * (counts["text"] + counts["vae"]))]
    casts = 0.0  # autocast's 16-bit copies of fp32 weights, whole in every process, in training only
    if lora:
        n_targets = len(t.lora.get("target_modules") or []) or 4
        if counts.get("family") == "wan":  # a suffix such as to_q matches both attentions of a block (attn1, attn2)
            n_targets *= 2
        # a measured (tiny) backbone has no layer table: 1% of its weights stands in for the adapters
        p_lora = _lora_params(int(t.lora.rank), counts["width"], counts["layers"], n_targets) \
            if counts["layers"] else 0.01 * P
        per = 8 + opt_bytes
        rows += [("denoiser base (frozen)", dtype_bytes * P),
                 (f"LoRA r{int(t.lora.rank)}: weights, grads, optimizer (~{p_lora / 1e6:.0f}M params x {per} B)",
                  per * p_lora)]
        trainable = p_lora
        sharded_model = dtype_bytes * P / shards + per * p_lora / shards
        model = dtype_bytes * P + per * p_lora
    else:
        per = 8 + opt_bytes
        rows.append((f"denoiser full: fp32 weights, grads, optimizer ({per} B/param)", per * P))
        trainable = P
        model = per * P
        sharded_model = per * P / shards
        if needs_reference:
            rows.append(("frozen reference for the KL (a copy)", dtype_bytes * P))
            model += dtype_bytes * P
            sharded_model += dtype_bytes * P / shards
    if kind == "fp32" and counts["layers"]:
        # autocast's 16-bit copy of each fp32 weight (a LoRA base, or a full fine-tune's master weights), kept for
        # backward, one block's with checkpointing: 2 B/param (scripts/bench_memory.py). Neither the adapters' states
        # nor a full fine-tune's 16 B/param cover it: an optimizer step of several passes holds the copies beside
        # the gradients of its earlier passes
        casts = 2 * P / (counts["layers"] if ckpt_on else 1)
        rows.append((f"autocast's 16-bit copies of the fp32 {'base' if lora else 'weights'} (kept for backward)",
                     casts))
        model += casts
    copies = (("EMA of the trainable weights (fp32)", bool(t.ema.get("enabled", False))),
              ("starting weights for trainer.decay_to_base (fp32)",  # what it pulls toward (ZeRO refuses it)
               float(t.get("decay_to_base", 0.0) or 0.0) > 0 and _distributed(cfg).strategy not in ("zero2", "zero3")))
    for label, held in copies:  # fp32 copies of the trainable weights
        if held:
            rows.append((label, 4 * trainable))
            model += 4 * trainable
            sharded_model += 4 * trainable / shards
    act = act_ckpt if ckpt_on else act_plain
    rows.append((f"activations, micro-batch {micro}{' (CFG doubles it)' if cfg_in_loss else ''}"
                 f"{f', {packed} schedule steps a pass' if packed > 1 else ''}, "
                 f"{'with' if ckpt_on else 'without'} gradient checkpointing", act))
    fixed = rows[0][1] + rows[1][1]
    total = fixed + model + act
    block = 2 * P / counts["layers"] if counts["layers"] else P  # a measured backbone: the whole denoiser, at most
    dist = _distributed(cfg)
    gather = dist.gather_dtype(str(t.get("mixed_precision", "no"))) or "fp32"
    gather_bytes = DTYPE_BYTES[gather]
    units = 2 * gather_bytes * block + 4 * block
    # the fully sharded figure of a ddp recipe is FSDP's default gather (half precision under autocast: no copies)
    total_sharded = fixed + sharded_model + units + act + (casts if sharded_run(cfg) or lora else 0.0)
    # sampling keeps the whole denoiser gathered (distributed.gather_for_sampling): a peak of its own, no activations
    sampling_peak = fixed + sharded_model + gather_bytes * P if dist.gather_for_sampling else 0.0
    if sampling_peak > total_sharded:
        if dist.strategy not in ("zero2", "zero3"):
            notes.append(f"sharded, sampling peaks higher than training: {sampling_peak / GiB:.1f} GiB with the whole "
                         f"denoiser gathered in {gather} (distributed.gather_for_sampling)")
        total_sharded = sampling_peak
    if dist.strategy in ("zero2", "zero3") and not lora:  # DeepSpeed's layout (alignrl/training/zero.py)
        rows, total = _zero_rows(rows, dist.strategy, P, shards, per, dtype_bytes * P if needs_reference else 0.0,
                                 4 * trainable if bool(t.ema.get("enabled", False)) else 0.0,
                                 3 * 4 * block, dist.deepspeed or {}, notes)  # ZeRO-3 gathers fp32 blocks
        return Estimate(rows, act_plain, act_ckpt, total, total_sharded, 0.9 * machine.gpu_memory_gb * GiB, notes)
    if sharded_run(cfg):  # the rows as this run holds them: the model's states divided over every GPU
        divided = ("denoiser full", "frozen reference", "EMA", "starting weights")  # the rows sharded_model divides
        rows = [(f"{label} / {shards}", value / shards) if label.startswith(divided) else (label, value)
                for label, value in rows]
        rows.insert(-1, ("shard units in flight (2 gathered blocks, 1 block's fp32 grads)", units))
        total = total_sharded
    return Estimate(rows, act_plain, act_ckpt, total, total_sharded, 0.9 * machine.gpu_memory_gb * GiB, notes)


def _zero_rows(rows: list, strategy: str, P: float, shards: int, per: float, reference: float, ema: float,
               units: float, extra: dict, notes: list) -> tuple[list, float]:
    """A full fine-tune's rows under DeepSpeed ZeRO over ``shards`` GPUs: DeepSpeed keeps an fp32 master copy of
    each partition beside the weights (4 B/param more); ZeRO-2 keeps the whole weights and the EMA in every process
    and splits the gradients, Adam's moments and the master copy; ZeRO-3 splits all of them (and the EMA) and adds
    the modules in flight (two gathered fp32 blocks and one block's fp32 gradients). The KL reference stays whole
    in every process. DeepSpeed's communication buckets (fp32; its defaults, or ``distributed.deepspeed``'s
    ``zero_optimization`` sizes) count too."""
    fixed = rows[:2]
    act = rows[-1]
    casts = [r for r in rows[2:-1] if r[0].startswith("autocast's")]  # whole in every process (gathered weights)
    zo = dict(extra.get("zero_optimization") or {})
    reduce_b = float(zo.get("reduce_bucket_size", 5e8))
    if strategy == "zero2":
        buckets = ("DeepSpeed buckets: reduce + all-gather (fp32)",
                   4 * (reduce_b + float(zo.get("allgather_bucket_size", 5e8))))
    else:
        buckets = ("DeepSpeed buckets: reduce + prefetch (fp32)",
                   4 * (reduce_b + float(zo.get("stage3_prefetch_bucket_size", 5e7))))
    if strategy == "zero2":
        body = [("denoiser full: fp32 weights (whole in every process)", 4 * P),
                (f"gradients, Adam's moments, fp32 master / {shards} ({per:.0f} B/param)",
                 per * P / shards)]
        if ema:
            body.append(("EMA of the trainable weights (fp32, whole)", ema))
    else:
        body = [(f"denoiser full: fp32 weights, grads, Adam, fp32 master / {shards} ({per + 4:.0f} B/param)",
                 (per + 4) * P / shards),
                ("modules in flight (2 gathered blocks, 1 block's fp32 grads)", units)]
        if ema:
            body.append((f"EMA of the trainable weights (fp32) / {shards}", ema / shards))
    if reference:
        body.append(("frozen reference for the KL (a whole copy in every process)", reference))
    body.append(buckets)
    out = fixed + body + casts + [act]
    total = sum(v for _, v in out)
    if strategy == "zero3":  # sampling gathers the whole denoiser (fp32 weights) once per batch, no activations
        sampling = total - act[1] - units - buckets[1] + 4 * P
        if sampling > total:
            notes.append(f"zero3: sampling peaks higher than training: {sampling / GiB:.1f} GiB with the whole denoiser "
                         f"gathered in fp32 (the total counts it; distributed=fsdp gathers in bf16)")
            total = sampling
    return out, total


def _distributed(cfg: DictConfig):
    from alignrl.training.sharding import DistributedConfig

    return DistributedConfig.from_config(cfg.get("distributed"))


def _zero(cfg: DictConfig) -> str | None:
    """``zero2`` or ``zero3`` when the recipe is a full fine-tune under DeepSpeed ZeRO, else None."""
    strategy = _distributed(cfg).strategy
    return strategy if strategy in ("zero2", "zero3") and str(cfg.trainer.finetune) == "full" else None


def sharded_run(cfg: DictConfig) -> bool:
    """Whether the recipe trains with sharded weights (distributed=fsdp on a full fine-tune)."""
    return _distributed(cfg).sharded and str(cfg.trainer.finetune) == "full"


def suggestions(cfg: DictConfig, est: Estimate, machine: Machine) -> list[str]:
    """Settings that would bring the estimate under the limit, cheapest first."""
    out = []
    t = cfg.trainer
    if est.fits:
        return out
    if _pass_rows(cfg, steps_per_pass=1)[0] < _pass_rows(cfg)[0]:
        out.append("trainer.steps_per_pass=1 (memory only: one schedule step a forward, the same loss)")
    if not t.get("gradient_checkpointing", False) and est.act_plain - est.act_ckpt > 0.05 * est.limit:
        saved = (est.act_plain - est.act_ckpt) / GiB
        out.append(f"trainer.gradient_checkpointing=true (saves {saved:.1f} GiB)")
    if int(t.train_batch_size) > 1:
        out.append("trainer.train_batch_size=1 (memory only: the same samples, smaller forwards)")
    if str(t.finetune) == "full":
        if not sharded_run(cfg) and est.total_sharded <= est.limit:
            out.append(f"distributed=fsdp: sharded full fine-tuning over {machine.gpus * machine.nodes} GPUs "
                       f"({est.total_sharded / GiB:.1f} GiB each)")
        out.append("trainer.finetune=lora (the recipe's _lora variant where one exists)")
    if sharded_run(cfg) and _distributed(cfg).gather_for_sampling:
        out.append("distributed.gather_for_sampling=false (gather one block at a time while sampling: slower)")
        if _distributed(cfg).param_dtype != "bf16":
            out.append("distributed.param_dtype=bf16 (gather in bf16: half the bytes)")
    if not out:
        out.append("a GPU with more memory")
    return out


def _size(value: float) -> str:
    return f"{value / GiB:8.2f} GiB" if value >= 0.1 * GiB else f"{value / 2**20:8.1f} MiB"


def run(cfg: DictConfig) -> int:
    m = cfg.get("machine") or {}
    machine = Machine(int(m.get("gpus", 8)), float(m.get("gpu_memory_gb", 80)), int(m.get("nodes", 1)))
    from alignrl.config import validate_batch_arithmetic

    est = estimate(cfg, machine)
    name = cfg.backbone.get("name")
    try:
        validate_batch_arithmetic(cfg, machine.gpus * machine.nodes)
    except ConfigError as e:
        est.notes.append(f"on {machine.gpus * machine.nodes} processes this recipe does not run: {e}")
    print(f"alignrl plan: {cfg.get('description') or name} on {machine.nodes} node(s) x {machine.gpus} GPU(s) "
          f"of {machine.gpu_memory_gb:g} GB; per GPU ("
          + (f"distributed=fsdp, sharded over {machine.gpus * machine.nodes})" if sharded_run(cfg)
             else f"distributed={_zero(cfg)}, DeepSpeed over {machine.gpus * machine.nodes})" if _zero(cfg)
             else "data-parallel, no sharding)") + ":")
    width = max(len(r[0]) for r in est.rows)
    for label, value in est.rows:
        print(f"  {label:<{width}}  {_size(value)}")
    print(f"  {'total':<{width}}  {_size(est.total)}  (limit 90%: {est.limit / GiB:.1f} GiB) -> "
          f"{'fits' if est.fits else 'does not fit'}")
    print(f"  activations per micro-batch: {_size(est.act_plain).strip()} without, {_size(est.act_ckpt).strip()} "
          f"with gradient checkpointing"
          + ("" if sharded_run(cfg) or _zero(cfg) else f"; fully sharded over {machine.gpus * machine.nodes} GPUs (distributed=fsdp) "
                                         f"the total would be {_size(est.total_sharded).strip()}")
          + "; add 10-20% for transients")
    for n in est.notes:
        print(f"  note: {n}")
    for s in suggestions(cfg, est, machine):
        print(f"  to fit: {s}")
    return 0 if est.fits else 1


def preflight(cfg: DictConfig, gpu_memory_bytes: float, world: int = 1) -> str | None:
    """A one-line warning when the recipe's estimate does not fit this GPU, before any model loads (a sharded run
    divides over its ``world`` processes); None when it fits or the backbone is not one the planner knows (the run
    then finds out for itself)."""
    if str(cfg.backbone.get("name", "")) not in KNOWN:
        return None
    machine = Machine(max(1, int(world)), gpu_memory_bytes / GiB, 1)
    est = estimate(cfg, machine)
    if est.fits:
        return None
    tips = "; ".join(suggestions(cfg, est, machine)[:2])
    return (f"alignrl: warning: this recipe needs about {est.total / GiB:.0f} GiB per GPU (alignrl plan) and this GPU "
            f"has {gpu_memory_bytes / GiB:.0f} GiB; to fit: {tips}")
