"""``alignrl runs [DIR ...]``: the runs under output directories, with step, last metrics, state and Slurm job.

Reads only files (status.json, metrics.jsonl, slurm.json, config.yaml, .hydra/hydra.yaml) and asks
Slurm (squeue, then scontrol) about the jobs it finds; imports nothing heavy.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import yaml

DEFAULT_DIRS = ("outputs", "multirun")
SLURM_ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT"}


def find_runs(roots: list[Path]) -> list[Path]:
    """Run directories: those holding status.json (a run that started or was submitted)."""
    found = set()
    for root in roots:
        if (root / "status.json").is_file():
            found.add(root.resolve())
        if root.is_dir():
            for status in root.rglob("status.json"):
                if "checkpoints" not in status.parts:
                    found.add(status.parent.resolve())
    return sorted(found)


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; {} when it is missing, unreadable or not an object (status files)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _last_metrics(path: Path) -> tuple[int | None, float | None, float | None]:
    """(last logged step, last reward_mean, last eval/reward_mean) of a metrics.jsonl."""
    step = reward = evaluation = None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None, None, None
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if not isinstance(row, dict):
            continue
        step = row.get("step", step)
        if row.get("reward_mean") is not None:
            reward = row["reward_mean"]
        if row.get("eval/reward_mean") is not None:
            evaluation = row["eval/reward_mean"]
    return step, reward, evaluation


def _recipe(run: Path, slurm: dict) -> str:
    if slurm.get("recipe"):
        return str(slurm["recipe"])
    try:
        hydra = yaml.safe_load((run / ".hydra" / "hydra.yaml").read_text()) or {}
        choice = hydra.get("hydra", {}).get("runtime", {}).get("choices", {}).get("recipe")
        if choice:
            return str(choice)
    except (OSError, yaml.YAMLError, AttributeError):
        pass
    return "?"


def _max_steps(run: Path, status: dict):
    if status.get("max_steps") is not None:
        return status["max_steps"]
    try:
        cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
        return cfg.get("trainer", {}).get("max_steps")
    except (OSError, yaml.YAMLError, AttributeError):
        return None


def slurm_states(job_ids: list[str]) -> dict[str, str] | None:
    """Job id -> Slurm state (squeue for queued/running jobs, scontrol for recently ended ones);
    None when there is no Slurm to ask (not installed, or its controller does not answer)."""
    if not shutil.which("squeue"):
        return None
    states: dict[str, str] = {}
    if not job_ids:
        return states
    try:
        out = subprocess.run(["squeue", "-h", "-o", "%i %T", "-j", ",".join(job_ids)], capture_output=True,
                             text=True, timeout=30)
        if out.returncode != 0 and "Invalid job id" not in out.stderr:
            return None
        for line in out.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2:
                states[parts[0]] = parts[1]
        for job in job_ids:
            if job in states or not shutil.which("scontrol"):
                continue
            out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=30)
            for word in out.stdout.split():
                if word.startswith("JobState="):
                    states[job] = word.split("=", 1)[1]
                    break
    except (OSError, subprocess.SubprocessError):
        return None
    return states


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except PermissionError:
        return True  # alive, another user's
    except (OSError, TypeError, ValueError):
        return False
    try:  # a reused pid belongs to something else
        return b"python" in Path(f"/proc/{int(pid)}/cmdline").read_bytes()
    except OSError:
        return True


def run_state(status: dict, slurm_state: str | None, slurm_reachable: bool = True) -> str:
    """One word for the table: running, finished, preempted, requeued, queued, failed, cancelled, stale, ...

    ``slurm_state`` is None when Slurm does not know the job (any more); ``slurm_reachable`` False when
    there is no Slurm to ask, so a Slurm run's own word is shown with a question mark.
    """
    state = status.get("state", "unknown")
    if status.get("slurm_job_id"):
        if state == "preempted" and status.get("requeue_limit_reached"):
            return "preempted (requeue limit)"
        if state in ("finished", "failed"):
            return state
        if not slurm_reachable:
            return f"{state}?"
        if slurm_state in SLURM_ACTIVE:
            if state == "preempted":
                return "requeued"
            if state == "submitted":
                return "queued" if slurm_state == "PENDING" else "starting"
            return state
        if state == "preempted":
            return state
        if slurm_state == "CANCELLED":
            return "cancelled"
        if slurm_state in (None, "COMPLETED"):
            return "stale"  # said running (or queued) but the job is gone
        return "failed"
    if state == "running" and status.get("host") in (None, socket.gethostname()) and not _pid_alive(status.get("pid")):
        return "stale"
    return state


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def list_runs(dirs: list[str]) -> int:
    roots = [Path(d) for d in dirs] if dirs else [Path(d) for d in DEFAULT_DIRS]
    missing = [str(r) for r in roots if not r.exists()]
    runs = find_runs([r for r in roots if r.exists()])
    if not runs:
        where = ", ".join(str(r) for r in roots)
        print(f"no runs under {where}" + (f" ({', '.join(missing)} not found)" if missing else ""))
        return 0
    info = []
    for run in runs:
        status = read_json(run / "status.json")
        slurm = read_json(run / "slurm.json")
        job = status.get("slurm_job_id") or slurm.get("job_id")
        if job:
            status["slurm_job_id"] = str(job)
        info.append((run, status, slurm))
    states = slurm_states(sorted({s["slurm_job_id"] for _, s, _ in info if s.get("slurm_job_id")}))
    reachable = states is not None
    states = states or {}
    cwd = Path.cwd()
    rows = [("RUN", "RECIPE", "STEP", "REWARD", "EVAL", "STATE", "SLURM")]
    for run, status, slurm in info:
        logged, reward, evaluation = _last_metrics(run / "metrics.jsonl")
        step = status.get("step", logged)
        job = status.get("slurm_job_id")
        slurm_state = states.get(job) if job else None
        try:
            name = str(run.relative_to(cwd))
        except ValueError:
            name = str(run)
        rows.append((name, _recipe(run, slurm), f"{_fmt(step)}/{_fmt(_max_steps(run, status))}", _fmt(reward),
                     _fmt(evaluation), run_state(status, slurm_state, reachable),
                     f"{job} {slurm_state or ''}".strip() if job else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0
