"""``alignrl runs [--plot [out.png]] [DIR ...]``: the runs under output directories, with step, last metrics,
state and Slurm job; ``--plot`` also draws their reward curves on one chart.

Reads only files (status.json, metrics.jsonl, slurm.json, config.yaml, .hydra/hydra.yaml) and asks
Slurm (squeue, then scontrol) about the jobs it finds; imports nothing heavy (matplotlib only for --plot).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from alignrl.plots import read_metrics

USAGE = """usage: alignrl runs [--plot [out.png]] [DIR ...]

Lists the runs under DIR (default: outputs/ and multirun/): step, last reward and eval, state, Slurm job.
  --plot [out.png]  also draw their reward mean (and eval reward mean) against step and against training
                    time, one line per run, into out.png (default: runs.png)"""
DEFAULT_PLOT = "runs.png"
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
    for row in read_metrics(path):
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


def parse_args(argv: list[str]) -> tuple[list[str], Path | None]:
    """(directories, plot output or None) from ``[--plot [out.png]] [DIR ...]``; ValueError names a bad option."""
    dirs: list[str] = []
    plot = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--plot":
            plot = Path(DEFAULT_PLOT)
            if i + 1 < len(argv) and argv[i + 1].lower().endswith(".png"):
                plot = Path(argv[i + 1])
                i += 1
        elif arg.startswith("--plot="):
            plot = Path(arg.split("=", 1)[1] or DEFAULT_PLOT)
            if plot.suffix.lower() != ".png":
                raise ValueError(f"--plot writes a PNG: give a file name ending in .png, not '{plot}'")
        elif arg.startswith("-"):
            raise ValueError(f"unknown option '{arg}'")
        else:
            dirs.append(arg)
        i += 1
    return dirs, plot


def _plot_labels(runs: list[Path], names: list[str]) -> list[str]:
    """Each run's directory name; the shortest path tail that tells runs apart when names repeat, and a
    sweep job's overrides (.hydra/overrides.yaml) after its number."""
    labels = []
    for run, name in zip(runs, names):
        parts = Path(name).parts
        depth = 1
        while depth < len(parts) and sum(Path(n).parts[-depth:] == parts[-depth:] for n in names) > 1:
            depth += 1
        label = "/".join(parts[-depth:])
        if run.name.isdigit():
            try:
                overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text()) or []
            except (OSError, yaml.YAMLError):
                overrides = []
            shown = [str(o) for o in overrides if not str(o).startswith(("run_dir=", "hydra.", "launcher"))]
            if shown:
                label += " (" + " ".join(shown) + ")"
        labels.append(label)
    return labels


def plot_run_dirs(runs: list[Path], names: list[str], out: Path) -> Path | None:
    """``alignrl runs --plot``: every run's metrics.jsonl on one chart (see alignrl.plots.plot_runs)."""
    from alignrl.plots import plot_runs

    labels = _plot_labels(runs, names)
    return plot_runs({label: read_metrics(run / "metrics.jsonl") for run, label in zip(runs, labels)}, out)


def list_runs(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    try:
        dirs, plot = parse_args(argv)
    except ValueError as e:
        print(f"alignrl: error: {e}\n{USAGE}", file=sys.stderr)
        return 2
    roots = [Path(d) for d in dirs] if dirs else [Path(d) for d in DEFAULT_DIRS]
    missing = [str(r) for r in roots if not r.exists()]
    runs = find_runs([r for r in roots if r.exists()])
    if not runs:
        where = ", ".join(str(r) for r in roots)
        print(f"no runs under {where}" + (f" ({', '.join(missing)} not found)" if missing else ""))
        return 1 if plot is not None else 0  # a chart was asked for and none can be drawn
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
    if plot is not None:
        written = plot_run_dirs([run for run, _, _ in info], [r[0] for r in rows[1:]], plot)
        if written is None:
            print(f"alignrl: error: no run has logged a reward yet; nothing to plot into {plot}", file=sys.stderr)
            return 1
        print(f"alignrl: wrote {written} ({len(info)} runs)")
    return 0
