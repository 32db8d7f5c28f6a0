"""The bodies of ``alignrl train``, ``eval`` and ``sample`` (called with the composed config)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from alignrl.components import as_dict, build_backbone, build_planner
from alignrl.config import validate_batch_arithmetic
from alignrl.data import PromptSet
from alignrl.errors import CheckpointError, ConfigError
from alignrl.training import checkpoint as ckpt


def _run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def _in_distributed_child() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def _save_config(cfg: DictConfig, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))


# ---------------------------------------------------------------------------------------- train
def train(cfg: DictConfig) -> int:
    run_dir = _run_dir()
    launcher = cfg.launcher.get("name", "local")
    if launcher == "slurm":
        from hydra.core.hydra_config import HydraConfig

        from alignrl.slurm import submit

        hc = HydraConfig.get()
        return submit(cfg, run_dir, list(hc.overrides.task), str(hc.runtime.choices.get("recipe") or "run"))
    nproc = int(cfg.launcher.get("nproc_per_node", 1))
    if launcher != "local":
        raise ConfigError(f"launcher '{launcher}' is not available; use launcher=local or launcher=slurm")
    if nproc < 1:
        raise ConfigError(f"launcher.nproc_per_node must be >= 1, got {nproc}")
    from alignrl.slurm import apply_torch_env, torchrun_rendezvous

    apply_torch_env(nproc)  # an srun task per process: RANK, WORLD_SIZE, MASTER_ADDR, ... from SLURM_*
    # an srun task per node that starts nproc processes: the nodes meet at the first host of the step
    nodes = torchrun_rendezvous(os.environ, nproc) if nproc > 1 and not _in_distributed_child() else None
    if _in_distributed_child():
        world = int(os.environ.get("WORLD_SIZE", nproc))
    else:
        world = nproc * (nodes["nnodes"] if nodes else 1)
    validate_batch_arithmetic(cfg, world)  # before anything loads or spawns
    if nproc > 1 and not _in_distributed_child():
        if nodes is None or nodes["node_rank"] == 0:
            _save_config(cfg, run_dir)
        return _launch_torchrun(cfg, run_dir, nproc, nodes)
    from alignrl.training.trainer import Trainer, record_early_stop_signal

    if "SLURM_STEP_ID" in os.environ:  # Slurm may signal while the models load: stop at the first check
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, record_early_stop_signal)
    if int(os.environ.get("RANK", "0")) == 0:
        _save_config(cfg, run_dir)
    trainer = Trainer(cfg, run_dir)
    state = trainer.train()
    if trainer.is_main:
        last = ckpt.latest_checkpoint(run_dir / "checkpoints")
        print(f"alignrl: {state} at step {trainer.iteration}; run dir {run_dir}"
              + (f"; checkpoint {last}" if last else ""), file=sys.stderr)
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_torchrun(cfg: DictConfig, run_dir: Path, nproc: int, nodes: dict | None = None) -> int:
    from hydra.core.hydra_config import HydraConfig

    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith(("run_dir=", "hydra."))]
    if nodes is None:
        nodes = {"nnodes": 1, "node_rank": 0, "master_addr": "127.0.0.1",
                 "master_port": cfg.launcher.get("master_port") or _free_port()}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--nnodes", str(nodes["nnodes"]), "--node_rank", str(nodes["node_rank"]),
        "--master_addr", str(nodes["master_addr"]), "--master_port", str(nodes["master_port"]),
        "-m", "alignrl.cli", "train", *overrides,
        f"run_dir={run_dir}", "hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none",
    ]
    print(f"alignrl: starting {nproc} processes (torchrun) in {run_dir}", file=sys.stderr)
    threads = os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    (run_dir / "STOP").unlink(missing_ok=True)  # a stale request; one written from now on is for these workers
    child = subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS=threads))

    # SIGTERM/SIGUSR1 to this launcher become a stop request the workers see at their next check
    # (they checkpoint and exit 0); torchrun itself is left alone so it does not kill them mid-save.
    def request_stop(signum, frame):
        (run_dir / "STOP").write_text(f"signal {signal.Signals(signum).name} to the launcher\n")

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        return child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------- eval / sample
def _load_policy(cfg: DictConfig, device):
    """Build the backbone; with eval.checkpoint, load its trained weights (EMA or live)."""
    from alignrl.training.lora import load_trainable_file, setup_trainable

    checkpoint = cfg.eval.get("checkpoint")
    path = ckpt.resolve_resume(str(checkpoint), Path(".")) if checkpoint else None
    if checkpoint and path is None:
        raise CheckpointError(f"eval.checkpoint='{checkpoint}' holds no checkpoint")
    model_cfg = cfg
    if path is not None:
        saved = path.parent.parent / "config.yaml"
        if saved.is_file():
            run_cfg = OmegaConf.load(saved)
            model_cfg = OmegaConf.merge(cfg, {"backbone": run_cfg.backbone,
                                              "trainer": {"finetune": run_cfg.trainer.finetune,
                                                          "lora": run_cfg.trainer.lora}})
    backbone = build_backbone(model_cfg, device)
    if path is None:
        return backbone, "base model"
    state = ckpt.load_json(path / "state.json")
    finetune = state.get("finetune", str(model_cfg.trainer.finetune))
    names = setup_trainable(backbone, finetune, as_dict(model_cfg.trainer.lora))
    weights = str(cfg.eval.get("weights", "ema"))
    if weights not in ("ema", "live"):
        raise ConfigError(f"eval.weights='{weights}' is not known; use ema or live")
    file = path / ("ema.safetensors" if weights == "ema" else "trainable.safetensors")
    if weights == "ema" and not file.is_file():
        file = path / "trainable.safetensors"
        weights = "live (no EMA in checkpoint)"
    load_trainable_file(backbone.transformer, names, file)
    backbone.transformer.requires_grad_(False).eval()
    if finetune == "full":
        backbone.transformer.to(backbone.dtype)  # training kept fp32 master weights; inference needs none
    return backbone, f"{path} ({weights} weights)"


def _device(cfg: DictConfig):
    from alignrl.training.trainer import _device_for

    return torch.device(_device_for(cfg.trainer))


def evaluate(cfg: DictConfig) -> int:
    from alignrl.eval.evaluate import Evaluator, write_report
    from alignrl.rewards.base import WeightedReward

    prompts = PromptSet.load(cfg.data.get("eval"), "data.eval")
    reward = WeightedReward.from_config(as_dict(cfg.reward))
    planner = build_planner(cfg)
    device = _device(cfg)
    out_dir = Path(cfg.eval.get("out_dir") or _run_dir())
    torch.manual_seed(int(cfg.seed))
    backbone, source = _load_policy(cfg, device)
    plan = planner.eval_plan()
    evaluator = Evaluator(backbone, plan, prompts, reward, seed=int(cfg.seed),
                          batch_size=int(cfg.eval.batch_size), num_prompts=cfg.eval.get("num_prompts"),
                          images_per_prompt=int(cfg.eval.get("images_per_prompt", 1)), progress=True)
    result = evaluator.run()
    details = {"model": source, "prompts": prompts.source, "ode_steps": plan.num_steps,
               "guidance_scale": plan.guidance_scale, "reward": ", ".join(cfg.reward.keys())}
    paths = write_report(out_dir, result, "alignrl eval", details, grid_size=int(cfg.eval.get("grid_size", 16)))
    if result.table:
        from alignrl.eval.report import markdown_table

        cols = ["tag"] + [k for k in next(iter(result.table.values())) if k != "n"] + ["n"]
        print(markdown_table([{"tag": t, **row} for t, row in result.table.items()], cols))
    for k, v in result.metrics.items():
        if not k.startswith("eval/tag/"):
            print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    print(f"alignrl: wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return 0


def sample(cfg: DictConfig) -> int:
    from alignrl.eval.report import save_grid, to_pil
    from alignrl.sampling.engine import rollout, sample_generators

    prompts = list(cfg.sample.get("prompts") or [])
    metadata = [{} for _ in prompts]
    if not prompts:
        eval_set = PromptSet.load(cfg.data.get("eval"), "data.eval")
        prompts, metadata = eval_set.prompts[:8], eval_set.metadata[:8]
    num = int(cfg.sample.get("num_images", 4))
    if num < 1:
        raise ConfigError(f"sample.num_images must be >= 1, got {num}")
    planner = build_planner(cfg)
    out_dir = Path(cfg.eval.get("out_dir") or _run_dir())
    out_dir.mkdir(parents=True, exist_ok=True)
    backbone, source = _load_policy(cfg, _device(cfg))
    plan = planner.eval_plan()
    all_images, captions, index = [], [], []
    with torch.no_grad():
        for p_idx, prompt in enumerate(prompts):
            cond = backbone.encode_prompts([prompt] * num)
            gens = sample_generators(int(cfg.seed), 0, [p_idx * num + j for j in range(num)], backbone.device)
            images = backbone.decode(rollout(backbone, plan, cond, gens, record=False).final).cpu()
            for j, im in enumerate(to_pil(images)):
                im.save(out_dir / f"{p_idx:03d}_{j:02d}.png")
                index.append(json.dumps({"image": f"{p_idx:03d}_{j:02d}.png", "prompt": prompt, **metadata[p_idx]}))
            all_images.append(images)
            captions += [prompt] * num
    # prompts.jsonl pairs each image with its prompt: `alignrl reward-check images=<this folder>` reads it
    ckpt.atomic_write_text(out_dir / "prompts.jsonl", "\n".join(index) + "\n")
    grid = save_grid(out_dir / "grid.png", torch.cat(all_images)[:64], captions[:64])
    print(f"alignrl: {len(prompts) * num} images from {source} in {out_dir} (grid: {grid})", file=sys.stderr)
    return 0
