"""Multi-process runs end with their launcher: no orphaned workers, and status.json tells how the run ended.

Real processes: `alignrl train launcher.nproc_per_node=2` starts torchrun, which starts two workers; the tests
SIGKILL one of the three kinds of process once training has begun.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FAST

ARGS = [*FAST, "trainer.max_steps=200", "trainer.rollout_batch_size=2", "trainer.train_batch_size=2",
        "launcher.nproc_per_node=2"]


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc)."""
    parent_of = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
                parent_of[int(d.name)] = int(fields[1])
            except (OSError, IndexError, ValueError):
                continue
    out, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent_of.items() if pp == p]
        out += kids
        frontier += kids
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _start(run: Path, cwd: Path):
    """The launcher, once its two workers have logged an iteration; returns (launcher, agent pid, worker pids)."""
    exe = Path(sys.executable).with_name("alignrl")
    p = subprocess.Popen([str(exe), "train", f"run_dir={run}", *ARGS], cwd=cwd, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text()):
        assert p.poll() is None, p.communicate()[1][-3000:]
        time.sleep(0.05)
    agents = [c for c in _children(p.pid) if "torch.distributed.run" in Path(f"/proc/{c}/cmdline").read_text()]
    assert len(agents) == 1
    workers = [c for c in _children(agents[0]) if "alignrl.cli" in Path(f"/proc/{c}/cmdline").read_text()]
    assert len(workers) == 2, workers
    return p, agents[0], workers


def _gone_within(pids: list[int], seconds: float) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if not any(_alive(pid) for pid in pids):
            return True
        time.sleep(0.1)
    return False


def _kill_all(pids):
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("victim", ["launcher", "agent", "rank0"])
def test_killing_any_process_stops_the_run(tmp_path, victim):
    run = tmp_path / "run"
    launcher, agent, workers = _start(run, tmp_path)
    try:
        rank0 = min(workers, key=lambda w: int(dict(
            x.split("=", 1) for x in Path(f"/proc/{w}/environ").read_text().split("\0") if "=" in x)["RANK"]))
        target = {"launcher": launcher.pid, "agent": agent, "rank0": rank0}[victim]
        os.kill(target, signal.SIGKILL)
        # the launcher's death reaches torchrun (SIGTERM: its workers stop); the agent's reaches the workers
        assert _gone_within([agent, *workers], 90), {p: _alive(p) for p in [agent, *workers]}
        if victim != "launcher":
            _, err = launcher.communicate(timeout=60)
            assert launcher.returncode != 0
            status = json.loads((run / "status.json").read_text())
            assert status["state"] == "failed" and "died" in status["error"], status
            assert "status.json says failed" in err
        else:
            launcher.wait(timeout=10)
            status = json.loads((run / "status.json").read_text())
            assert status["state"] != "running", status  # the workers stopped (and said so) on the SIGTERM
    finally:
        _kill_all([launcher.pid, agent, *workers])
