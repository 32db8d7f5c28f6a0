"""Slurm: the torch.distributed environment of an srun task, submission with submitit, requeue on preemption.

Three pieces:

- ``torch_env_from_slurm``: inside an srun step that runs one task per process, RANK / WORLD_SIZE /
  LOCAL_RANK / MASTER_ADDR / MASTER_PORT derived from SLURM_* (the first host of the step's node list,
  a port derived from the job id). ``torchrun_rendezvous`` does the same for one task per node that
  starts ``launcher.nproc_per_node`` processes with torchrun.
- ``submit``: ``launcher=slurm`` checks the options, writes the sbatch script with submitit (or prints
  it with ``launcher.dry_run=true``) and submits one job whose srun tasks run ``SlurmTrainJob``.
- ``SlurmTrainJob``: the job body. It trains in the run directory fixed at submission with
  ``resume=auto``; when the trainer stopped on SIGUSR1 (sent by Slurm ``signal_lead_s`` before the
  time limit, or by ``scancel --signal=USR1``), or on SIGTERM at the time limit, rank 0 requeues the
  job with ``scontrol requeue`` unless ``launcher.max_requeues`` is spent.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from alignrl.errors import AlignError, ConfigError
from alignrl.runs import read_json

PORT_BASE, PORT_SPAN = 15000, 20000
TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


# ---------------------------------------------------------------------------------------- node lists
def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets: ``a[1-2,4],b`` -> ``['a[1-2,4]', 'b']``."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in node list {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced '[' in node list {text!r}")
    parts.append(text[start:])
    return [p for p in (s.strip() for s in parts) if p]


def expand_nodelist(nodelist: str) -> list[str]:
    """Host names of a Slurm node list, in order: ``node[01-03,07],gpu5`` -> node01 node02 node03 node07 gpu5.

    The expansion is submitit's (the parser its job environment uses), so both agree; several bracket groups
    in one name (``r[1-2]n[1-2]``) expand as their product, like Slurm does. Raises ValueError on a list that
    is not one (unbalanced brackets, a range that is not numeric, a name that expands to nothing).
    """
    from submitit.slurm.slurm import SlurmParseException, _parse_node_list

    hosts = []
    for part in _split_top_level(nodelist):  # checks the brackets, which submitit's parser assumes balanced
        try:
            names = _parse_node_list(part)
        except SlurmParseException:
            names = []
        if not names or not all(names):
            raise ValueError(f"bad node list {nodelist!r} (at {part!r})")
        hosts += names
    return hosts


def slurm_hostnames(nodelist: str) -> list[str]:
    """``scontrol show hostnames`` when it is there (it knows every node-list form), else ``expand_nodelist``."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=30)
            hosts = out.stdout.split()
            if out.returncode == 0 and hosts:
                return hosts
        except (OSError, subprocess.SubprocessError):
            pass
    return expand_nodelist(nodelist)


def expand_tasks_per_node(spec: str) -> list[int]:
    """``SLURM_TASKS_PER_NODE`` form to one count per node: ``2(x3),1`` -> ``[2, 2, 2, 1]``."""
    counts = []
    for item in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not m:
            raise ValueError(f"bad tasks-per-node spec {spec!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def master_port(job_id: str | int) -> int:
    """A port every task of a job derives alike, and that differs between concurrent jobs."""
    digits = re.sub(r"\D", "", str(job_id)) or "0"
    return PORT_BASE + int(digits) % PORT_SPAN


# ---------------------------------------------------------------------------------------- inside a job
def _in_step(env: Mapping[str, str]) -> bool:
    # the batch shell has SLURM_PROCID and SLURM_NTASKS too, but only srun tasks have the step variables
    return "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env and "SLURM_JOB_ID" in env


def node_address(name: str) -> str:
    """An address for the Slurm node ``name``: the name when it resolves, else the node's ``NodeAddr`` as the
    controller knows it (node names need not be host names: several slurmd on one host, or clusters that name
    nodes apart from DNS)."""
    import socket

    try:
        socket.getaddrinfo(name, None)
        return name
    except OSError:
        pass
    try:
        out = subprocess.run(["scontrol", "show", "node", "-o", name], capture_output=True, text=True, timeout=30)
        m = re.search(r"\bNodeAddr=(\S+)", out.stdout)
        if out.returncode == 0 and m:
            return m.group(1)
    except (OSError, subprocess.SubprocessError):
        pass
    return name  # torch.distributed then names the host it cannot reach


def _rendezvous(env: Mapping[str, str], hostnames: Callable[[str], list[str]],
                address: Callable[[str], str] = str) -> tuple[str, str]:
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")
    addr = env.get("MASTER_ADDR") or (address(hostnames(nodelist)[0]) if nodelist else "127.0.0.1")
    port = env.get("MASTER_PORT") or str(master_port(env["SLURM_JOB_ID"]))
    return addr, port


def _tasks_on_this_node(env: Mapping[str, str], hostnames: Callable[[str], list[str]]) -> int:
    counts = expand_tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
                                   or env["SLURM_STEP_NUM_TASKS"])
    index = int(env.get("SLURM_NODEID", 0))
    nodelist = env.get("SLURM_STEP_NODELIST")
    if nodelist and env.get("SLURMD_NODENAME"):  # the step may use a subset of the job's nodes
        hosts = hostnames(nodelist)
        if env["SLURMD_NODENAME"] in hosts:
            index = hosts.index(env["SLURMD_NODENAME"])
    return counts[min(index, len(counts) - 1)]


def torch_env_from_slurm(env: Mapping[str, str], hostnames: Callable[[str], list[str]] = expand_nodelist,
                         address: Callable[[str], str] = str) -> dict[str, str]:
    """The torch.distributed variables of an srun task running one process of a job (one task per process).

    Empty when not in an srun step or when RANK / WORLD_SIZE / LOCAL_RANK are already set (torchrun's own
    children). MASTER_ADDR and MASTER_PORT already in ``env`` are kept.
    """
    if not _in_step(env) or any(v in env for v in TORCH_VARS):
        return {}
    addr, port = _rendezvous(env, hostnames, address)
    return {
        "RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_STEP_NUM_TASKS"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": str(_tasks_on_this_node(env, hostnames)),
        "GROUP_RANK": env.get("SLURM_NODEID", "0"), "MASTER_ADDR": addr, "MASTER_PORT": port,
    }


def torchrun_rendezvous(env: Mapping[str, str], nproc_per_node: int,
                        hostnames: Callable[[str], list[str]] = expand_nodelist,
                        address: Callable[[str], str] = str) -> dict | None:
    """torchrun's node layout for an srun step with one task per node (``srun torchrun``-style), or None."""
    if not _in_step(env) or any(v in env for v in TORCH_VARS):
        return None
    if _tasks_on_this_node(env, hostnames) != 1:
        raise ConfigError(
            f"launcher.nproc_per_node={nproc_per_node} inside an srun step with several tasks on a node: run one "
            f"task per node (srun --ntasks-per-node=1) or one task per process with launcher.nproc_per_node=1")
    addr, port = _rendezvous(env, hostnames, address)
    return {"nnodes": int(env["SLURM_STEP_NUM_TASKS"]), "node_rank": int(env["SLURM_PROCID"]),
            "master_addr": addr, "master_port": int(port)}


def apply_torch_env(nproc_per_node: int = 1) -> dict[str, str]:
    """Set the torch.distributed variables of this srun task in ``os.environ`` (see ``torch_env_from_slurm``)."""
    if nproc_per_node != 1:
        return {}
    derived = torch_env_from_slurm(os.environ, slurm_hostnames, node_address)
    os.environ.update(derived)
    return derived


# ---------------------------------------------------------------------------------------- checks
def _launcher_options(lc) -> dict:
    """The launcher group as plain values, with defaults filled in and the checks that need no cluster."""
    def as_int(key, default=None):
        value = lc.get(key, default)
        if value is None:
            return None
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"launcher.{key} must be an integer, got {value!r}") from None

    nodes = as_int("nodes", 1)
    if nodes < 1:
        raise ConfigError(f"launcher.nodes must be >= 1, got {nodes}")
    gpus = as_int("gpus_per_node", 0) or 0
    if gpus < 0:
        raise ConfigError(f"launcher.gpus_per_node must be >= 0, got {gpus}")
    tasks = as_int("tasks_per_node")
    tasks = tasks if tasks is not None else (gpus or 1)
    if tasks < 1:
        raise ConfigError(f"launcher.tasks_per_node must be >= 1, got {tasks}")
    minutes = as_int("time", 60)
    lead = as_int("signal_lead_s", 120)
    if lead < 0:
        raise ConfigError(f"launcher.signal_lead_s must be >= 0, got {lead}")
    if minutes is None or minutes * 60 <= lead:
        raise ConfigError(
            f"launcher.time={minutes} min is not longer than launcher.signal_lead_s={lead} s: the stop signal "
            f"would come before the job starts working; raise launcher.time or lower launcher.signal_lead_s")
    max_requeues = as_int("max_requeues", 3)
    if max_requeues < 0:
        raise ConfigError(f"launcher.max_requeues must be >= 0, got {max_requeues}")
    extra = lc.get("sbatch") or {}
    try:
        extra = {str(k): (v if isinstance(v, (bool, int, float, str)) else str(v)) for k, v in dict(extra).items()}
    except (TypeError, ValueError):
        raise ConfigError("launcher.sbatch must be a mapping of sbatch options, e.g. "
                          "'launcher.sbatch={exclusive: true, mail-type: END}'") from None
    return {
        "nodes": nodes, "gpus_per_node": gpus, "tasks_per_node": tasks, "cpus_per_task": as_int("cpus_per_task"),
        "time": minutes, "signal_lead_s": lead, "max_requeues": max_requeues,
        "partition": lc.get("partition"), "account": lc.get("account"), "qos": lc.get("qos"),
        "constraint": lc.get("constraint"), "mem": None if lc.get("mem") is None else str(lc.get("mem")),
        "job_name": lc.get("job_name"), "sbatch": extra, "log_dir": lc.get("log_dir"),
        "dry_run": bool(lc.get("dry_run", False)),
    }


class ClusterUnreachable(ConfigError):
    """sinfo is installed but got no answer: no Slurm configuration here, or no controller answering."""


def _sinfo_partitions() -> dict[str, list[str]]:
    """Partition -> the Gres of its nodes (``(null)``, ``gpu:4``, ``gpu:a100:8(S:0-1)``); '*' marks the default."""
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P|%G"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        raise ClusterUnreachable(f"sinfo could not ask the cluster about its partitions ({type(e).__name__}: {e}); "
                                 "check that the Slurm controller answers (sinfo), or use launcher=local") from None
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        last = re.sub(r"^sinfo: (?:fatal|error): ", "", last.strip())  # "sinfo: fatal: Could not establish ..."
        raise ClusterUnreachable(f"sinfo failed: {last}")
    parts: dict[str, list[str]] = {}
    for line in out.stdout.splitlines():
        if "|" in line:
            name, gres = line.split("|", 1)
            parts.setdefault(name.strip(), []).append(gres.strip())
    return parts


def gpus_in_gres(gres: str) -> int:
    """GPUs per node in an sinfo Gres field: ``gpu:a100:8(S:0-1),shard:2`` -> 8; ``(null)`` -> 0."""
    total = 0
    for item in _split_top_level(gres.replace("(", "[").replace(")", "]")):
        fields = item.split("[")[0].split(":")
        if fields[0] == "gpu" and len(fields) >= 2 and fields[-1].isdigit():
            total += int(fields[-1])
    return total


def check_cluster(opts: dict) -> str | None:
    """Checks against the cluster: the partition exists and has the GPUs asked for (from ``sinfo``).

    Returns why the checks were skipped (no sinfo), or None when they ran; raises ClusterUnreachable when
    sinfo gets no answer and ConfigError when the options do not fit the cluster.
    """
    if not shutil.which("sinfo"):
        return "sinfo is not on PATH"
    parts = _sinfo_partitions()
    want = opts["partition"]
    if want is None:
        name = next((p for p in parts if p.endswith("*")), None)
        if name is None:
            return None  # no default partition: sbatch says so itself
    else:
        name = next((p for p in parts if p.rstrip("*") == str(want)), None)
        if name is None:
            raise ConfigError(f"launcher.partition='{want}' is not a partition of this cluster; sinfo lists: "
                              f"{', '.join(p.rstrip('*') for p in parts) or 'none'}")
    label = name.rstrip("*")
    most = max((gpus_in_gres(g) for g in parts[name]), default=0)
    if opts["gpus_per_node"] > 0 and most == 0:
        raise ConfigError(f"launcher.gpus_per_node={opts['gpus_per_node']} but partition '{label}' has no GPUs "
                          f"(sinfo Gres: {', '.join(sorted(set(parts[name])))}); use launcher.gpus_per_node=0 "
                          f"or a GPU partition (launcher.partition=...)")
    if opts["gpus_per_node"] > most > 0:
        raise ConfigError(f"launcher.gpus_per_node={opts['gpus_per_node']} but the nodes of partition '{label}' "
                          f"have at most {most} GPUs")
    return None


def require_sbatch() -> None:
    if not shutil.which("sbatch"):
        raise ConfigError("launcher=slurm needs Slurm's sbatch, which is not on PATH (not a Slurm login node, or "
                          "the Slurm module is not loaded); to train on this machine use launcher=local")


# ---------------------------------------------------------------------------------------- submission
def _job_overrides(overrides: list[str]) -> list[str]:
    """The submitting command's overrides without the ones the job sets itself."""
    keep = []
    for ov in overrides:
        key = ov.split("=", 1)[0].lstrip("+~").removeprefix("override ").strip()
        if key in ("run_dir", "resume", "launcher") or key.startswith("launcher."):
            continue
        keep.append(ov)
    return keep


def _executor(folder: Path, opts: dict, job_name: str, dry_run: bool):
    import submitit

    cls = submitit.SlurmExecutor
    if dry_run and not shutil.which("srun"):
        class _Printer(submitit.SlurmExecutor):  # writes the same script; only the "is srun here" check is off
            @classmethod
            def affinity(cls) -> int:
                return 1

        cls = _Printer
    executor = cls(folder=str(folder), max_num_timeout=0)
    extra = {"signal": f"USR1@{opts['signal_lead_s']}", "requeue": True, **opts["sbatch"]}
    params = dict(
        job_name=job_name, nodes=opts["nodes"], ntasks_per_node=opts["tasks_per_node"], time=opts["time"],
        signal_delay_s=opts["signal_lead_s"], wckey=None, additional_parameters=extra,  # no wckey: may be enforced
        srun_args=["--open-mode=append"],
        setup=[
            "# alignrl: Slurm sends USR1 to the srun tasks (no B: in --signal; the trainer runs as those tasks);",
            "# each finishes its step and checkpoints, then rank 0 requeues the job. submitit's own preemption",
            "# handler listens on USR1 too; the job replaces it at start (it would exit in the middle of a step).",
            "export SUBMITIT_PREEMPT_SIGNAL=USR1",
            "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}",
            "trap 'echo \"alignrl: batch shell got USR1; the srun tasks act on it\" >&2' USR1  # scancel --full",
        ],
    )
    for key in ("partition", "account", "qos", "constraint", "mem", "cpus_per_task"):
        if opts[key] is not None:
            params[key] = opts[key]
    if opts["gpus_per_node"]:
        params["gpus_per_node"] = opts["gpus_per_node"]
    try:
        executor.update_parameters(**params)
    except ValueError as e:
        raise ConfigError(f"launcher options rejected by submitit: {str(e).splitlines()[0]}") from None
    return executor


def submit(cfg, run_dir: Path, overrides: list[str], recipe: str) -> int:
    """``alignrl train launcher=slurm``: check, then submit one job (or print its script with dry_run)."""
    from alignrl.config import validate_batch_arithmetic

    opts = _launcher_options(cfg.launcher)
    world = opts["nodes"] * opts["tasks_per_node"]
    validate_batch_arithmetic(cfg, world)
    if not opts["dry_run"]:
        require_sbatch()
    try:
        skipped = check_cluster(opts)
    except ClusterUnreachable as e:
        if not opts["dry_run"]:
            raise
        skipped = str(e)  # a dry run only prints the script: it needs no cluster
    if skipped and opts["dry_run"]:
        print(f"alignrl: dry run: cluster checks skipped ({skipped}); launcher.partition and "
              f"launcher.gpus_per_node were not checked against the cluster", file=sys.stderr)

    run_dir = Path(run_dir).resolve()
    log_dir = Path(opts["log_dir"]).resolve() if opts["log_dir"] else run_dir / "slurm"
    job_name = opts["job_name"] or f"alignrl-{recipe}"
    executor = _executor(log_dir, opts, job_name, opts["dry_run"])
    job = SlurmTrainJob(_job_overrides(overrides), str(run_dir), opts["max_requeues"],
                        user_resume=cfg.get("resume"))
    if opts["dry_run"]:
        print(executor._make_submission_file_text(executor._submitit_command_str, "dry-run"))
        print(f"alignrl: dry run, nothing submitted. The job would run {world} task(s) of\n"
              f"  alignrl train {shlex.join(job.job_overrides())}\n"
              f"with logs in {log_dir}", file=sys.stderr)
        return 0

    from alignrl.training.checkpoint import atomic_write_text

    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        submitted = executor.submit(job)
    except Exception as e:  # noqa: BLE001  sbatch's own message is what the user needs
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        hint = next((ln for ln in lines if "error" in ln.lower()), lines[-1] if lines else type(e).__name__)
        raise AlignError(f"sbatch failed: {hint.strip()}") from None
    job_id = str(submitted.job_id)
    stdout, stderr = submitted.paths.stdout, submitted.paths.stderr
    info = {"job_id": job_id, "recipe": recipe, "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "run_dir": str(run_dir), "log_dir": str(log_dir), "stdout": str(stdout), "stderr": str(stderr),
            "sbatch_script": str(submitted.paths.submission_file), "world_size": world,
            "launcher": {k: v for k, v in opts.items() if k not in ("dry_run",)}}
    atomic_write_text(run_dir / "slurm.json", json.dumps(info, indent=2))
    try:  # a run continued by a new submission keeps its step until the job starts
        step = int(read_json(run_dir / "status.json").get("step", 0))
    except (TypeError, ValueError):
        step = 0
    atomic_write_text(run_dir / "status.json", json.dumps(
        {"state": "submitted", "step": step, "max_steps": int(cfg.trainer.max_steps), "slurm_job_id": job_id,
         "updated": info["submitted"]}, indent=2))
    print(f"alignrl: submitted Slurm job {job_id}: {opts['nodes']} node(s) x {opts['tasks_per_node']} task(s)"
          f"{', ' + str(opts['gpus_per_node']) + ' GPU(s)/node' if opts['gpus_per_node'] else ''}, "
          f"partition {opts['partition'] or '(default)'}, {opts['time']} min, USR1 {opts['signal_lead_s']} s "
          f"before the limit, up to {opts['max_requeues']} requeue(s)")
    print(f"  job id   {job_id}")
    print(f"  run dir  {run_dir}")
    print(f"  logs     {stdout}  {stderr}  (one pair per task: {job_id}_<task>_log.out|err)")
    print(f"  watch    squeue -j {job_id}; alignrl runs {run_dir.parent}")
    return 0


# ---------------------------------------------------------------------------------------- the job
class SlurmTrainJob:
    """What each srun task of a submitted job runs (pickled by submitit): train, then requeue when preempted.

    No ``checkpoint()`` method on purpose: submitit calls it from inside its signal handler and then exits,
    which would stop training in the middle of a step. The trainer's own handler (finish the step,
    checkpoint, exit) replaces submitit's, and rank 0 requeues afterwards.
    """

    def __init__(self, overrides: list[str], run_dir: str, max_requeues: int, user_resume=None):
        self.overrides = list(overrides)
        self.run_dir = run_dir
        self.max_requeues = int(max_requeues)
        self.user_resume = None if user_resume in (None, "", "none", "null") else str(user_resume)

    def job_overrides(self, rank: int = 0) -> list[str]:
        from alignrl.training.checkpoint import latest_checkpoint

        resume = "auto"
        if self.user_resume not in (None, "auto") and latest_checkpoint(Path(self.run_dir) / "checkpoints") is None:
            resume = self.user_resume  # the first start continues from the checkpoint the user named
        out = [*self.overrides, "launcher=local", f"run_dir={self.run_dir}", f"resume={resume}",
               "hydra.output_subdir=null"]  # .hydra/ keeps the submitting command's config
        if rank:
            out += ["hydra/job_logging=none", "hydra/hydra_logging=none"]
        return out

    def __call__(self) -> dict:
        from alignrl.training.control import record_early_stop_signal

        for sig in (signal.SIGUSR1, signal.SIGTERM):  # replaces submitit's handlers until the trainer's own
            signal.signal(sig, record_early_stop_signal)
        rank = int(os.environ.get("SLURM_PROCID", "0"))
        from alignrl import cli

        code = 0
        try:
            cli.main(["train", *self.job_overrides(rank)])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        result = {"exit_code": code}
        if rank == 0:
            result.update(after_run(Path(self.run_dir), self.max_requeues, code))
        if code:
            sys.exit(code)
        return result


def _job_field(job_id: str, field: str) -> str:
    """One ``Key=value`` field of ``scontrol show job``; '' when Slurm cannot be asked or lacks it."""
    try:
        out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return ""
    m = re.search(rf"\b{field}=(\S+)", out.stdout)
    return m.group(1) if m else ""


def _job_reason(job_id: str) -> str:
    return _job_field(job_id, "Reason")  # unknown: a SIGTERM is then not taken for the time limit (no requeue)


def _requeue(job_id: str, restarts: int, attempts: int = 3, wait_s: float = 2.0) -> str:
    """``scontrol requeue`` the job; '' once it is requeued, else why not.

    A busy controller can answer with an error (a socket timeout) after it has requeued the job, and a retry
    would then be refused: the job's restart count, raised by every requeue, is the check that it happened.
    """
    failure = ""
    for attempt in range(attempts):
        try:
            out = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
            failure = "" if out.returncode == 0 else (out.stderr.strip() or f"exit {out.returncode}")
        except (OSError, subprocess.SubprocessError) as e:
            failure = f"{type(e).__name__}: {e}"
        if not failure:
            return ""
        count = _job_field(job_id, "Restarts")
        if count.isdigit() and int(count) > restarts:
            return ""  # requeued in spite of the error
        if attempt + 1 < attempts:
            time.sleep(wait_s)
    return failure


def requeue_decision(status: dict, restarts: int, max_requeues: int, reason: str = "") -> tuple[bool, str, bool]:
    """(requeue?, why, limit reached?) for a job whose trainer stopped with ``status`` (pure).

    SIGUSR1 is the signal the job asks for before its time limit, and the one to send for a manual
    preemption. SIGTERM requeues only when Slurm's reason is TimeLimit: it is also what ``scancel`` sends,
    and a cancelled job must stay cancelled (requeueing is allowed while it completes).
    """
    if status.get("state") != "preempted":
        return False, f"run {status.get('state', 'unknown')}", False
    stop = str(status.get("stop", ""))
    if "SIGUSR1" in stop:
        why = "SIGUSR1 (time limit ahead or preemption)"
    elif "SIGTERM" in stop and reason == "TimeLimit":
        why = "SIGTERM at the time limit"
    else:
        return False, f"stopped by {stop or 'request'}, not by a preemption signal: not requeued", False
    if restarts >= max_requeues:
        return False, f"{why}; requeue limit reached ({restarts} of launcher.max_requeues={max_requeues})", True
    return True, f"{why}; requeued ({restarts + 1} of launcher.max_requeues={max_requeues})", False


def after_run(run_dir: Path, max_requeues: int, exit_code: int = 0) -> dict:
    """Rank 0, after the trainer returned: requeue a preempted run (within the limit) and record it.

    A non-zero exit never requeues: the status file may still be the previous (preempted) run's when
    this one failed before training started, and requeueing it would only fail again.
    """
    from alignrl.training.checkpoint import atomic_write_text

    path = run_dir / "status.json"
    status = read_json(path)
    if not status:
        if not exit_code:
            return {"state": "failed", "requeue": "no status.json"}
        status = {"state": "failed"}
    if exit_code:
        status.update(state="failed", exit_code=exit_code, requeued=False,
                      requeue=f"exit code {exit_code}: not requeued")
        atomic_write_text(path, json.dumps(status, indent=2))
        return {"state": "failed", "requeued": False, "requeue": status["requeue"]}
    job_id = os.environ.get("SLURM_JOB_ID", "")
    restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)  # unset on the first run
    reason = ""
    if status.get("state") == "preempted" and "SIGTERM" in str(status.get("stop", "")) and job_id:
        reason = _job_reason(job_id)
    requeue, why, limit = requeue_decision(status, restarts, max_requeues, reason)
    status["restarts"] = restarts
    if status.get("state") == "preempted":
        status.update(requeue=why, requeued=requeue, requeue_limit_reached=limit)
    atomic_write_text(path, json.dumps(status, indent=2))  # before the requeue, which ends this job
    if requeue:
        failure = _requeue(job_id, restarts)
        if failure:
            status.update(requeued=False, requeue=f"scontrol requeue failed: {failure}")
            atomic_write_text(path, json.dumps(status, indent=2))
    if status.get("state") == "preempted":
        print(f"alignrl: preempted at step {status.get('step')}: {status['requeue']}", file=sys.stderr, flush=True)
    return {"state": status["state"], "requeued": bool(status.get("requeued")), "requeue": status.get("requeue")}
