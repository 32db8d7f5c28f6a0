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

from alignrl.components import as_dict, build_planner
from alignrl.config import validate_batch_arithmetic
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
def _check_start(cfg: DictConfig, run_dir: Path) -> None:
    """What can be refused before anything is written (config.yaml included) or loaded."""
    from alignrl.config import check_finite

    check_finite(cfg)  # sweeps (-m) reach here without the CLI's pre-check
    try:
        int(cfg.seed)
    except (TypeError, ValueError):
        raise ConfigError(f"seed={cfg.seed!r} must be an integer") from None
    if cfg.get("resume") in (None, "", "none", "null") and ckpt.list_checkpoints(run_dir / "checkpoints"):
        raise CheckpointError(f"{run_dir} already holds checkpoints; pass resume=auto to continue it "
                              f"or choose another run_dir")


def _memory_preflight(cfg: DictConfig, world: int) -> None:
    """On a GPU, warn before the models load when `alignrl plan`'s estimate exceeds the GPU's memory."""
    import torch

    if str(cfg.trainer.get("device", "auto")) == "cpu" or not torch.cuda.is_available():
        return
    from alignrl.plan import preflight

    warning = preflight(cfg, float(torch.cuda.get_device_properties(0).total_memory), world)
    if warning and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        print(warning, file=sys.stderr)


def train(cfg: DictConfig) -> int:
    run_dir = _run_dir()
    _check_start(cfg, run_dir)
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
    from alignrl.slurm import apply_torch_env, node_address, slurm_hostnames, torchrun_rendezvous

    apply_torch_env(nproc)  # an srun task per process: RANK, WORLD_SIZE, MASTER_ADDR, ... from SLURM_*
    # an srun task per node that starts nproc processes: the nodes meet at the first host of the step
    nodes = torchrun_rendezvous(os.environ, nproc, slurm_hostnames, node_address) \
        if nproc > 1 and not _in_distributed_child() else None
    if _in_distributed_child():
        world = int(os.environ.get("WORLD_SIZE", nproc))
    else:
        world = nproc * (nodes["nnodes"] if nodes else 1)
    validate_batch_arithmetic(cfg, world)  # before anything loads or spawns
    _memory_preflight(cfg, world)
    if nproc > 1 and not _in_distributed_child():
        if nodes is None or nodes["node_rank"] == 0:
            _save_config(cfg, run_dir)
        return _launch_torchrun(cfg, run_dir, nproc, nodes)
    from alignrl.training.control import record_early_stop_signal
    from alignrl.training.trainer import Trainer

    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker: it dies with its agent (a SIGKILLed agent leaves
        die_with_parent(signal.SIGKILL, os.getppid())  # no process to stop it otherwise); checkpoints are atomic

    if "SLURM_STEP_ID" in os.environ:  # Slurm may signal while the models load: stop at the first check
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, record_early_stop_signal)
    if int(os.environ.get("RANK", "0")) == 0:
        _save_config(cfg, run_dir)
    trainer = Trainer(cfg, run_dir)
    state = trainer.train()
    _close_process_group()
    if trainer.is_main:
        last = ckpt.latest_checkpoint(run_dir / "checkpoints")
        print(f"alignrl: {state} at step {trainer.iteration}; run dir {run_dir}"
              + (f"; checkpoint {last}" if last else ""), file=sys.stderr)
    if "TORCHELASTIC_RUN_ID" in os.environ:
        _exit_worker(0)
    return 0


def _close_process_group() -> None:
    """After a run every process returned from (finished or preempted): meet, then tear the process group down.
    Left to the interpreter's exit, gloo's threads can abort a worker (SIGABRT, "terminate called without an
    active exception") after a finished run, and torchrun then reports the whole run as failed (seen once in 30+
    two-process runs)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _exit_worker(code: int) -> None:
    """End a torchrun worker whose run is complete (checkpoint written, logs closed, process group torn down)
    without running C++ static destructors: even after ``destroy_process_group`` a worker sometimes aborted in
    them (SIGABRT, "terminate called without an active exception"; twice in ~60 two-process runs, once in CI),
    and torchrun then reports a finished run as failed. Python's own exit handlers run first."""
    import atexit
    import logging

    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


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
    launcher_pid = os.getpid()
    # torchrun dies with this launcher (SIGTERM: it stops its workers) instead of running on as an orphan
    child = subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS=threads),
                             preexec_fn=lambda: die_with_parent(signal.SIGTERM, launcher_pid))

    # SIGTERM/SIGUSR1 to this launcher become a stop request the workers see at their next check
    # (they checkpoint and exit 0); torchrun itself is left alone so it does not kill them mid-save.
    def request_stop(signum, frame):
        (run_dir / "STOP").write_text(f"signal {signal.Signals(signum).name} to the launcher\n")

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code != 0:
        _record_worker_failure(run_dir, code)
    return code


def _record_worker_failure(run_dir: Path, code: int) -> None:
    """A worker that died (rank 0 included, e.g. killed) could not record it: status.json must not say running."""
    import time

    from alignrl.runs import read_json

    status = read_json(run_dir / "status.json")
    if status.get("state") not in (None, "running"):
        return  # the workers recorded how they ended
    how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
    status.update({"state": "failed", "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
                   "error": f"a training process died (torchrun {how}); its output above says why"})
    ckpt.atomic_write_text(run_dir / "status.json", json.dumps(status, indent=2))
    print(f"alignrl: error: {status['error']}; status.json says failed (resume with resume=auto run_dir={run_dir})",
          file=sys.stderr)


def die_with_parent(sig: int, parent_pid: int) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies (prctl PR_SET_PDEATHSIG); no-op elsewhere.
    Called in a child right after fork, or at a worker's start."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, int(sig), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os.kill(os.getpid(), int(sig))


# ---------------------------------------------------------------------------------------- eval / sample
def _command_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task)


def _source(cfg: DictConfig, checkpoint, key: str):
    """The policy's config and checkpoint: the run's own config when a checkpoint is given."""
    from alignrl.policy import run_source

    return run_source(cfg, checkpoint, _command_overrides(), key)


def _output_dir(cfg: DictConfig, source, command: str, weights: str) -> Path:
    """``eval.out_dir`` when set; for a checkpoint ``<run>/eval/<command>-<step>-<weights>-<time>/``; else the
    command's own run directory."""
    if cfg.eval.get("out_dir"):
        return Path(str(cfg.eval.out_dir))
    if source.checkpoint is None:
        return _run_dir()
    import time

    base = source.run_dir / "eval" / f"{command}-{source.checkpoint.name}-{weights}-{time.strftime('%Y%m%d-%H%M%S')}"
    out, n = base, 1
    while out.exists():  # two commands in the same second never share a folder
        out, n = base.with_name(f"{base.name}-{n}"), n + 1
    return out


def _device(cfg: DictConfig):
    """The device a sampling command (eval, sample, data) runs on, with the host allocator set for it as training
    sets it (``trainer.host_allocator``; a run config older than the setting takes its default)."""
    from alignrl import hostalloc
    from alignrl.training.trainer import _device_for

    device = torch.device(_device_for(cfg.trainer))
    print(f"alignrl: {hostalloc.tune(str(cfg.trainer.get('host_allocator', 'auto')), device.type)}", file=sys.stderr)
    return device


def evaluate(cfg: DictConfig) -> int:
    """Every eval set of the run (``data.eval``: one file, or named sets such as ``held_out``/``in_dist``, each
    reported in its own folder)."""
    from alignrl.data import eval_prefix, load_eval_sets
    from alignrl.eval.evaluate import Evaluator, write_report
    from alignrl.eval.report import markdown_table
    from alignrl.policy import load_policy
    from alignrl.rewards.base import WeightedReward

    source = _source(cfg, cfg.eval.get("checkpoint"), "eval.checkpoint")
    cfg = source.cfg
    weights = str(cfg.eval.get("weights", "ema"))
    sets = load_eval_sets(cfg.data.get("eval"))
    if not sets:
        raise ConfigError("data.eval is not set; pass data.eval=<prompt file (.txt or .jsonl)>")
    reward = WeightedReward.from_config(as_dict(cfg.reward))
    planner = build_planner(cfg)
    device = _device(cfg)
    out_dir = _output_dir(cfg, source, "eval", weights)
    torch.manual_seed(int(cfg.seed))
    backbone, model = load_policy(source, device, weights)
    plan = planner.eval_plan()
    written = []
    for name, prompts in sets.items():
        evaluator = Evaluator(backbone, plan, prompts, reward, seed=int(cfg.seed),
                              batch_size=int(cfg.eval.batch_size), num_prompts=cfg.eval.get("num_prompts"),
                              images_per_prompt=int(cfg.eval.get("images_per_prompt", 1)), progress=True,
                              prefix=eval_prefix(name))
        result = evaluator.run()
        details = {"model": model, "backbone": backbone.describe(), "prompts": prompts.source,
                   "ode_steps": plan.num_steps, "guidance_scale": plan.guidance_scale,
                   "reward": ", ".join(cfg.reward.keys())}
        title = "alignrl eval" + (f": {name}" if name else "")
        paths = write_report(out_dir / name if name else out_dir, result, title, details,
                             grid_size=int(cfg.eval.get("grid_size", 16)))
        written += list(paths.values())
        if name:
            print(f"## {name} ({prompts.source})")
        if result.table:
            cols = ["tag"] + [k for k in next(iter(result.table.values())) if k != "n"] + ["n"]
            print(markdown_table([{"tag": t, **row} for t, row in result.table.items()], cols))
        for k, v in result.metrics.items():
            if "/tag/" not in k:
                print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    print(f"alignrl: wrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    return 0


def sample_seed(seed: int, index: int) -> int:
    """The noise seed of image ``index`` (prompt i, image j: ``index = i * num_images + j``) of ``alignrl sample``:
    ``torch.Generator().manual_seed(sample_seed(...))`` gives a diffusers pipeline the same starting noise."""
    from alignrl.sampling.engine import generator_seed

    return generator_seed(seed, 0, index)


def sample(cfg: DictConfig) -> int:
    from alignrl.eval.report import save_grid, to_pil
    from alignrl.policy import load_policy
    from alignrl.sampling.engine import sample_images

    source = _source(cfg, cfg.eval.get("checkpoint"), "eval.checkpoint")
    cfg = source.cfg
    weights = str(cfg.eval.get("weights", "ema"))
    prompts = list(cfg.sample.get("prompts") or [])
    metadata = [{} for _ in prompts]
    if not prompts:
        from alignrl.data import load_eval_sets

        sets = load_eval_sets(cfg.data.get("eval"))
        if not sets:
            raise ConfigError("sample.prompts is empty and data.eval is not set; pass 'sample.prompts=[a red cat]'")
        eval_set = next(iter(sets.values()))  # the first eval set
        prompts, metadata = eval_set.prompts[:8], eval_set.metadata[:8]
    num = int(cfg.sample.get("num_images", 4))
    if num < 1:
        raise ConfigError(f"sample.num_images must be >= 1, got {num}")
    planner = build_planner(cfg)
    out_dir = _output_dir(cfg, source, "sample", weights)
    backbone, model = load_policy(source, _device(cfg), weights)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = planner.eval_plan()
    seed = int(cfg.seed)
    all_images, captions, index = [], [], []
    with torch.no_grad():
        for p_idx, prompt in enumerate(prompts):
            ids = [p_idx * num + j for j in range(num)]
            images = sample_images(backbone, plan, [prompt] * num, ids, seed)
            for j, im in enumerate(to_pil(images)):  # a video's PNG is its filmstrip
                name = f"{p_idx:03d}_{j:02d}.png"
                im.save(out_dir / name)
                entry = {"image": name, "prompt": prompt, "seed": sample_seed(seed, ids[j])}
                if images.ndim == 5:
                    from alignrl.eval.video import write_videos

                    write_videos(out_dir, images[j:j + 1], [name[:-4]])
                    entry["video"] = name[:-4] + ".mp4"
                index.append(json.dumps({**entry, **metadata[p_idx]}))
            all_images.append(images)
            captions += [prompt] * num
    # prompts.jsonl pairs each image with its prompt and noise seed: `alignrl reward-check images=<this folder>`
    # reads it, and the seed reproduces the image with an exported pipeline (README: Export)
    ckpt.atomic_write_text(out_dir / "prompts.jsonl", "\n".join(index) + "\n")
    grid = save_grid(out_dir / "grid.png", torch.cat(all_images)[:64], captions[:64])
    what = "videos (MP4, GIF and a filmstrip PNG each)" if all_images[0].ndim == 5 else "images"
    print(f"alignrl: {len(prompts) * num} {what} from {model} ({plan.num_steps} ODE steps, guidance "
          f"{plan.guidance_scale:g}) in {out_dir} (grid: {grid})", file=sys.stderr)
    return 0
