"""Slurm: the torch.distributed environment of srun tasks (pure), and `launcher=slurm`, preemption, requeue,
sweeps, the sbatch template and `alignrl runs` against a real single-node Slurm cluster started here.

The cluster tests are marked `slurm` (deselect with -m "not slurm"). The fixture installs Debian's Slurm
packages when they are missing and skips only where that cannot be done (not root, no apt-get, install failed).
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from alignrl.runs import run_state
from alignrl.slurm import (expand_nodelist, expand_tasks_per_node, gpus_in_gres, master_port, requeue_decision,
                           torch_env_from_slurm, torchrun_rendezvous)
from alignrl.errors import ConfigError
from conftest import FAST, REPO, free_port, run_cli, run_inprocess

# 4 iterations of 8 samples on 2 processes (2 per rollout and train batch): a few seconds per run
ARGS = [*FAST, "trainer.max_steps=4", "trainer.rollout_batch_size=2", "trainer.train_batch_size=2"]
SLURM_DIR = REPO / "scripts" / "slurm"
# one thread per process everywhere, so Slurm tasks and local processes reduce in the same order
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED"}


# node lists and their hosts; test_nodelists_match_scontrol checks them against `scontrol show hostnames`
NODELISTS = {
    "node[01-03,07]": ["node01", "node02", "node03", "node07"],
    "gpu5": ["gpu5"],
    "a[1-3,5]": ["a1", "a2", "a3", "a5"],
    "n[01-02],m7": ["n01", "n02", "m7"],
    "gpu-[1-2]-[3-4]": ["gpu-1-3", "gpu-1-4", "gpu-2-3", "gpu-2-4"],
    "a[8-10],b1,c[1,3]": ["a8", "a9", "a10", "b1", "c1", "c3"],
    "r[1-2]n[01-02]": ["r1n01", "r1n02", "r2n01", "r2n02"],
    "h[009-011],x[1],y": ["h009", "h010", "h011", "x1", "y"],
}


# ---------------------------------------------------------------------------------------- pure
def test_expand_nodelist_forms():
    for nodelist, hosts in NODELISTS.items():
        assert expand_nodelist(nodelist) == hosts, nodelist
    # Slurm 22.05 refuses a suffix after the brackets; the expansion is still the obvious one
    assert expand_nodelist("dgx-[099-101].cluster") == ["dgx-099.cluster", "dgx-100.cluster", "dgx-101.cluster"]
    for bad in ("node[01-03", "node01]", "a[1-x]", "a[3-1]", "a[1-2-3]"):
        with pytest.raises(ValueError):
            expand_nodelist(bad)
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("8") == [8]


def _step_env(**extra):
    """An srun task's SLURM_* variables: task 5 of 8, 2 per node on 4 nodes, on the third node."""
    env = {"SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "node[01-03,07]", "SLURM_STEP_NODELIST": "node[01-03,07]",
           "SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "8", "SLURM_STEP_TASKS_PER_NODE": "2(x4)",
           "SLURM_TASKS_PER_NODE": "2(x4)", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
           "SLURMD_NODENAME": "node03", "SLURM_STEP_ID": "0"}
    env.update(extra)
    return env


def test_torch_env_from_srun_task_one_per_process():
    env = torch_env_from_slurm(_step_env())
    assert env == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "2",
                   "MASTER_ADDR": "node01", "MASTER_PORT": str(15000 + 123456 % 20000)}
    assert master_port("123456") == 18456 and master_port("77_3") == 15773
    # uneven tasks per node: the count of this node, found by name in the step's node list
    env = torch_env_from_slurm(_step_env(SLURM_STEP_TASKS_PER_NODE="3,2(x2),1", SLURM_STEP_NUM_TASKS="8",
                                         SLURMD_NODENAME="node07", SLURM_NODEID="3"))
    assert env["LOCAL_WORLD_SIZE"] == "1"
    # a rendezvous the user set in the sbatch script is kept
    env = torch_env_from_slurm(_step_env(MASTER_ADDR="10.0.0.5", MASTER_PORT="29500"))
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("10.0.0.5", "29500")
    # torchrun's children already have their variables; the batch shell (no step) and no Slurm derive nothing
    assert torch_env_from_slurm(_step_env(RANK="3", WORLD_SIZE="16", LOCAL_RANK="3")) == {}
    batch_shell = {k: v for k, v in _step_env().items() if not k.startswith("SLURM_STEP")}
    assert torch_env_from_slurm(batch_shell) == {}
    assert torch_env_from_slurm({"PATH": "/usr/bin"}) == {}
    # the host resolver is used for the master address (scontrol show hostnames in a real job)
    assert torch_env_from_slurm(_step_env(), hostnames=lambda nl: ["first-of-" + nl])["MASTER_ADDR"] == \
        "first-of-node[01-03,07]"


def test_torchrun_rendezvous_for_one_task_per_node():
    env = _step_env(SLURM_STEP_NUM_TASKS="4", SLURM_STEP_TASKS_PER_NODE="1(x4)", SLURM_PROCID="2", SLURM_LOCALID="0")
    assert torchrun_rendezvous(env, 8) == {"nnodes": 4, "node_rank": 2, "master_addr": "node01",
                                           "master_port": 18456}
    with pytest.raises(ConfigError, match="one task per node"):
        torchrun_rendezvous(_step_env(), 8)  # 2 tasks per node, each asking for 8 processes
    assert torchrun_rendezvous({"PATH": "/usr/bin"}, 8) is None


def test_gres_parsing():
    assert gpus_in_gres("(null)") == 0
    assert gpus_in_gres("gpu:4") == 4
    assert gpus_in_gres("gpu:a100:8(S:0-1)") == 8
    assert gpus_in_gres("gpu:a100:4(S:0),gpu:v100:2,shard:8") == 6


def test_requeue_decision():
    pre = {"state": "preempted", "stop": "signal SIGUSR1"}
    assert requeue_decision(pre, 0, 3)[0] is True
    assert requeue_decision(pre, 2, 3)[:1] == (True,) and "3 of" in requeue_decision(pre, 2, 3)[1]
    go, why, limit = requeue_decision(pre, 3, 3)
    assert not go and limit and "limit" in why
    # SIGTERM is scancel's signal too: requeue only when Slurm says the time limit ended the job
    term = {"state": "preempted", "stop": "signal SIGTERM"}
    assert requeue_decision(term, 0, 3, reason="None")[0] is False
    assert requeue_decision(term, 0, 3, reason="TimeLimit")[0] is True
    assert requeue_decision({"state": "preempted", "stop": "STOP file"}, 0, 3)[0] is False
    assert requeue_decision({"state": "preempted", "stop": "STOP file (signal SIGUSR1 to the launcher)"}, 0, 3)[0]
    assert requeue_decision({"state": "finished"}, 0, 3)[0] is False
    assert requeue_decision({"state": "failed"}, 0, 3)[0] is False


def test_a_failed_restart_is_not_requeued(tmp_path, monkeypatch):
    """A requeued job that fails before training finds the previous run's 'preempted' status: no requeue."""
    from alignrl.slurm import after_run

    (tmp_path / "status.json").write_text(json.dumps({"state": "preempted", "stop": "signal SIGUSR1", "step": 1}))
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol: it must not be needed
    out = after_run(tmp_path, max_requeues=3, exit_code=2)
    status = json.loads((tmp_path / "status.json").read_text())
    assert out["state"] == status["state"] == "failed" and status["requeued"] is False
    assert "exit code 2" in status["requeue"]


def _fake_scontrol(bin_dir: Path, restarts: int) -> Path:
    """An ``scontrol`` whose requeue answers with a timeout and whose job shows ``Restarts=restarts``."""
    bin_dir.mkdir(exist_ok=True)
    log = bin_dir / "calls"
    script = bin_dir / "scontrol"
    script.write_text("#!/bin/sh\n"
                      f'echo "$@" >> {log}\n'
                      'if [ "$1" = requeue ]; then echo "Socket timed out on send/recv operation" >&2; exit 1; fi\n'
                      f'echo "JobId=$3 JobState=REQUEUED Reason=None Restarts={restarts}"\n')
    script.chmod(0o755)
    return log


@pytest.mark.parametrize("restarts_after", [1, 0])
def test_requeue_answered_with_an_error_is_checked_against_the_restart_count(tmp_path, monkeypatch, restarts_after):
    """A busy controller may time out after requeueing: the restart count decides, a retry is not sent twice."""
    from alignrl.slurm import after_run

    log = _fake_scontrol(tmp_path / "bin", restarts_after)
    (tmp_path / "status.json").write_text(json.dumps({"state": "preempted", "stop": "signal SIGUSR1", "step": 1}))
    monkeypatch.setenv("SLURM_JOB_ID", "9")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    monkeypatch.setattr("alignrl.slurm.time.sleep", lambda s: None)
    out = after_run(tmp_path, max_requeues=3)
    status = json.loads((tmp_path / "status.json").read_text())
    requeues = [c for c in log.read_text().splitlines() if c.startswith("requeue")]
    if restarts_after:  # requeued in spite of the error: recorded as requeued, asked once
        assert out["requeued"] is status["requeued"] is True and len(requeues) == 1
        assert "requeued (1 of launcher.max_requeues=3)" in status["requeue"]
    else:  # not requeued: asked three times, then the error is recorded
        assert out["requeued"] is status["requeued"] is False and len(requeues) == 3
        assert status["requeue"] == "scontrol requeue failed: Socket timed out on send/recv operation"


def test_run_state_words():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    local = {"state": "running", "pid": dead.pid, "host": socket.gethostname()}
    assert run_state(local, None, True) == "stale"
    assert run_state({**local, "pid": os.getpid()}, None, True) == "running"
    job = {"slurm_job_id": "7"}
    assert run_state({**job, "state": "running"}, "RUNNING") == "running"
    assert run_state({**job, "state": "running"}, None) == "stale"
    assert run_state({**job, "state": "running"}, "TIMEOUT") == "failed"
    assert run_state({**job, "state": "running"}, "RUNNING", slurm_reachable=False) == "running?"
    assert run_state({**job, "state": "preempted"}, "PENDING") == "requeued"
    assert run_state({**job, "state": "preempted", "requeue_limit_reached": True}, "COMPLETED") == \
        "preempted (requeue limit)"
    assert run_state({**job, "state": "submitted"}, "PENDING") == "queued"
    assert run_state({**job, "state": "finished"}, None) == "finished"


# ---------------------------------------------------------------------------------------- the cluster
def _ensure_slurm_installed() -> str | None:
    """None when Slurm's daemons and clients are installed (installing them if needed), else why not."""
    needed = ["/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/sbin/munged", "/usr/bin/sbatch"]
    if all(Path(p).exists() for p in needed):
        return None
    if os.geteuid() != 0:
        return "Slurm is not installed and installing it needs root"
    if not shutil.which("apt-get"):
        return "Slurm is not installed and there is no apt-get to install it"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    steps = [["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]]
    for cmd in steps:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            return f"`{' '.join(cmd)}` failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}"
    return None if all(Path(p).exists() for p in needed) else "apt-get installed Slurm but its binaries are missing"


@pytest.fixture(scope="module")
def dead_controller_conf(tmp_path_factory):
    """Slurm's clients installed, and a slurm.conf whose controller does not run (nothing listens on its port)."""
    reason = _ensure_slurm_installed()
    if reason is not None:
        pytest.skip(reason)
    conf = tmp_path_factory.mktemp("dead_slurm") / "slurm.conf"
    conf.write_text(f"ClusterName=dead\nSlurmctldHost=deadhost(127.0.0.1)\nSlurmctldPort={free_port()}\n"
                    "AuthType=auth/munge\nNodeName=deadhost CPUs=1 State=UNKNOWN\n"
                    "PartitionName=debug Nodes=ALL Default=YES\n")
    return conf


@pytest.mark.slurm
def test_nodelists_match_scontrol(dead_controller_conf):
    """expand_nodelist (submitit's parser) gives what Slurm's own `scontrol show hostnames` gives."""
    env = dict(os.environ, SLURM_CONF=str(dead_controller_conf))  # a config to parse; no controller needed
    for nodelist, hosts in NODELISTS.items():
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], env=env, capture_output=True, text=True,
                             timeout=30)
        assert out.returncode == 0, (nodelist, out.stderr)
        assert out.stdout.split() == hosts == expand_nodelist(nodelist), nodelist


@pytest.mark.slurm
def test_dry_run_prints_the_script_when_no_controller_answers(tmp_path, dead_controller_conf):
    """sbatch and sinfo installed, no controller: a dry run still prints the script, with one note on stderr."""
    base = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}  # the cluster fixture may have set it
    empty = tmp_path / "empty.conf"
    empty.write_text("")
    cases = {  # name: (SLURM_CONF, dry run, what sinfo says); a dead controller costs sinfo ~9 s of retries
        "empty config": (str(empty), True, "Unable to process configuration file"),
        "not a dry run": (str(empty), False, "Unable to process configuration file"),
    }
    if not Path("/etc/slurm/slurm.conf").exists():  # the packages ship none: Slurm then tries DNS and gives up
        cases["no config"] = (None, True, "Could not establish a configuration source")
    else:
        cases["controller down"] = (str(dead_controller_conf), True, "Unable to contact slurm controller")
    exe = Path(sys.executable).with_name("alignrl")
    procs = {}
    for name, (conf, dry, _) in cases.items():  # side by side: sinfo retries a dead controller for ~9 s
        env = dict(base, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", **({"SLURM_CONF": conf} if conf else {}))
        run = tmp_path / name.replace(" ", "_")
        procs[name] = (run, subprocess.Popen(
            [str(exe), "train", f"run_dir={run}", *FAST, "launcher=slurm", f"launcher.dry_run={str(dry).lower()}",
             "launcher.partition=debug", "launcher.time=30", "launcher.signal_lead_s=90"],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for name, (run, p) in procs.items():
        out, err = p.communicate(timeout=300)
        conf, dry, says = cases[name]
        lines = err.strip().splitlines()
        if not dry:  # a submission still needs the cluster: one-line error, nothing written
            assert p.returncode == 2, (name, out, err)
            assert len(lines) == 1 and lines[0].startswith("alignrl: error: sinfo failed: ") and says in lines[0], \
                (name, err)
            assert not (run / "slurm.json").exists() and not (run / "status.json").exists(), name
            continue
        assert p.returncode == 0, (name, out, err)
        script = out.splitlines()
        assert script[0] == "#!/bin/bash" and "#SBATCH --partition=debug" in script, (name, out)
        assert sum("srun " in ln and "submitit.core._submit" in ln for ln in script) == 1, (name, out)
        notes = [ln for ln in lines if "cluster checks skipped" in ln]
        assert len(notes) == 1 and notes[0].startswith("alignrl: dry run: cluster checks skipped (sinfo failed: ") \
            and says in notes[0] and "launcher.partition" in notes[0], (name, err)
        assert "dry run, nothing submitted" in err and not (run / "slurm.json").exists(), (name, err)


def free_port_pair() -> int:
    """A port p such that p and p + 1 are free (the two slurmd daemons listen on consecutive ports)."""
    for _ in range(100):
        p = free_port()
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("127.0.0.1", p))
                b.bind(("127.0.0.1", p + 1))
            except OSError:
                continue
        return p
    raise RuntimeError("no two consecutive free ports")


@pytest.fixture(scope="module")
def slurm_cluster():
    """A private two-node cluster on this host (two slurmd daemons; own state dir, ports and job-id range), stopped
    after this file."""
    reason = _ensure_slurm_installed()
    if reason is not None:
        pytest.skip(reason)
    if os.geteuid() != 0:
        pytest.skip("starting the Slurm daemons needs root")
    lab = Path(tempfile.mkdtemp(prefix="alignrl-slurm-", dir="/tmp"))  # short: munge's socket path is limited
    first_job = 1000 * (os.getpid() % 15 + 1)  # job ids, and so master ports, differ from another session's
    env = dict(os.environ, SLURM_LAB=str(lab), SLURM_LAB_CTLD_PORT=str(free_port()),
               SLURM_LAB_SLURMD_PORT=str(free_port_pair()), SLURM_LAB_FIRST_JOB_ID=str(first_job), SLURM_LAB_NODES="2",
               SLURM_LAB_PROCTRACK="proctrack/pgid", SLURM_LAB_CRED_EXPIRE="10",
               SLURM_LAB_CPUS=str(max(2, os.cpu_count() or 1)))  # 2-task jobs fit on a 1-core runner too
    start = subprocess.run([str(SLURM_DIR / "start-local-slurm.sh"), "--clean"], env=env, capture_output=True,
                           text=True, timeout=120)
    saved = os.environ.get("SLURM_CONF")
    try:
        assert start.returncode == 0, f"start-local-slurm.sh failed:\n{start.stdout}\n{start.stderr}"
        os.environ["SLURM_CONF"] = str(lab / "etc" / "slurm.conf")
        yield lab
    finally:
        stop = subprocess.run([str(SLURM_DIR / "stop-local-slurm.sh")], env=env, capture_output=True, text=True,
                              timeout=120)
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved
        shutil.rmtree(lab, ignore_errors=True)
        assert stop.returncode == 0, stop.stderr


def _job(job_id: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def _logs(run: Path) -> str:
    return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                     for p in sorted((run / "slurm").glob("*_log.*")))


def _wait_job(job_id: str, run: Path | None = None, restarts: int = 0, timeout: float = 240, seen: list | None = None):
    """Wait until the job has ended after ``restarts`` requeues; ``seen`` collects status.json versions."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = _job(job_id)
        if seen is not None and run is not None and (run / "status.json").is_file():
            try:
                status = json.loads((run / "status.json").read_text())
                if not seen or seen[-1] != status:
                    seen.append(status)
            except ValueError:
                pass  # read while being replaced: the next poll sees it
        if info["JobState"] in ENDED and int(info["Restarts"]) >= restarts:
            return info
        if info["JobState"] == "PENDING" and info.get("Reason") == "BeginTime":
            # a requeued job is held for cred_expire + 1 s before it may start: only cluster latency, skip it
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True)
        time.sleep(0.3)
    pytest.fail(f"job {job_id} not done after {timeout} s: {_job(job_id)}\n{_logs(run) if run else ''}")


def _submit(*args, cwd) -> tuple[str, subprocess.CompletedProcess]:
    proc = run_cli("train", *args, "launcher=slurm", cwd=cwd, env=ONE_THREAD)  # sbatch passes the env on
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    ids = re.findall(r"submitted Slurm job (\d+)", proc.stdout)
    assert ids, proc.stdout
    return ids[0], proc


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _final(run: Path, name: str = "trainable") -> dict:
    return load_file(str(run / "checkpoints" / "step_000004" / f"{name}.safetensors"))


def _signal_after_first_step(run: Path, job_id: str, *scancel_args: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().strip():
            out = subprocess.run(["scancel", *scancel_args, "--signal=USR1", job_id], capture_output=True, text=True)
            assert out.returncode == 0, out.stderr
            return
        time.sleep(0.1)
    pytest.fail(f"job {job_id} logged no step in {timeout} s\n{_logs(run)}")


@pytest.fixture(scope="module")
def work(tmp_path_factory, slurm_cluster):
    return tmp_path_factory.mktemp("slurm_runs")


@pytest.fixture(scope="module")
def straight_runs(work):
    """The same tiny recipe as a 2-node Slurm job (one task on each node) and as a local 2-process run (side by
    side)."""
    slurm_run, local_run = work / "straight_slurm", work / "straight_local"
    job_id, proc = _submit(f"run_dir={slurm_run}", *ARGS, "launcher.nodes=2", "launcher.tasks_per_node=1",
                           "launcher.time=10",
                           "launcher.signal_lead_s=60", cwd=work)
    local = run_cli("train", f"run_dir={local_run}", *ARGS, "launcher.nproc_per_node=2", cwd=work, env=ONE_THREAD)
    assert local.returncode == 0, local.stderr[-3000:]
    info = _wait_job(job_id, slurm_run)
    return {"slurm": slurm_run, "local": local_run, "job_id": job_id, "info": info, "submit": proc}


@pytest.mark.slurm
def test_submitted_job_matches_local_two_process_run(straight_runs):
    run, job_id = straight_runs["slurm"], straight_runs["job_id"]
    out = straight_runs["submit"].stdout
    assert f"run dir  {run}" in out and f"{run}/slurm/{job_id}_0_log.out" in out  # printed at submission
    assert straight_runs["info"]["JobState"] == "COMPLETED", _logs(run)
    assert straight_runs["info"]["NumTasks"] == "2" and straight_runs["info"]["NumNodes"] == "2"
    assert expand_nodelist(straight_runs["info"]["NodeList"]) == [f"{socket.gethostname().split('.')[0]}{i}"
                                                                  for i in (1, 2)]  # two slurmd, one host
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == 4 and status["slurm_job_id"] == job_id
    assert json.loads((run / "slurm.json").read_text())["job_id"] == job_id
    err0 = (run / "slurm" / f"{job_id}_0_log.err").read_text()
    assert "2 process(es)" in err0
    assert "alignrl:" not in (run / "slurm" / f"{job_id}_1_log.err").read_text()  # rank 1 reports nothing
    state = json.loads((run / "checkpoints" / "step_000004" / "state.json").read_text())
    assert state["world_size"] == 2
    m_slurm, m_local = _metrics(run), _metrics(straight_runs["local"])
    assert [r["step"] for r in m_slurm] == [1, 2, 3, 4]
    for a, b in zip(m_slurm, m_local):  # same seed, same world size, one thread each: bit for bit
        for key in ("reward_mean", "reward_std", "policy_loss", "clipfrac", "approx_kl", "grad_norm"):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
    wa, wb = _final(run), _final(straight_runs["local"])
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def preempted_run(work):
    """The straight run's recipe as a 2-task job signalled (USR1) after its first step."""
    run = work / "preempted"
    job_id, _ = _submit(f"run_dir={run}", *ARGS, "launcher.tasks_per_node=2", "launcher.time=10",
                        "launcher.signal_lead_s=60", "launcher.max_requeues=2", "logger=wandb", cwd=work)
    _signal_after_first_step(run, job_id)  # to the srun tasks, as Slurm's --signal=USR1@lead does
    seen: list[dict] = []
    info = _wait_job(job_id, run, restarts=1, seen=seen)
    return {"run": run, "job_id": job_id, "info": info, "seen": seen}


@pytest.mark.slurm
def test_preempted_job_checkpoints_requeues_and_resumes_to_the_same_weights(preempted_run, straight_runs):
    run, job_id, info, seen = (preempted_run[k] for k in ("run", "job_id", "info", "seen"))
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, _logs(run))
    # the first run stopped after a step, checkpointed and requeued itself
    stopped = [s for s in seen if s["state"] == "preempted" and "requeue" in s]  # after the launcher's decision
    assert stopped and stopped[0]["stop"] == "signal SIGUSR1" and stopped[0]["requeued"] is True, seen
    k = stopped[0]["step"]
    assert 1 <= k < 4 and (run / "checkpoints" / f"step_{k:06d}" / "COMPLETE").is_file()
    # the second run (SLURM_RESTART_COUNT=1) resumed in the same run dir from that checkpoint and finished
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == 4 and status["restarts"] == 1
    err0 = (run / "slurm" / f"{job_id}_0_log.err").read_text()
    assert f"resumed from {run}/checkpoints/step_{k:06d}" in err0
    out0 = (run / "slurm" / f"{job_id}_0_log.out").read_text()
    assert out0.count("Starting with JobEnvironment") == 2  # --open-mode=append kept the first run's log
    assert [r["step"] for r in _metrics(run)] == [1, 2, 3, 4]  # each step once
    # both runs logged to the same wandb run (offline here): its id is kept in the run dir
    run_id = (run / "wandb_run_id").read_text().strip()
    assert len(list((run / "wandb").glob(f"offline-run-*-{run_id}"))) == 2
    straight = straight_runs["slurm"]
    for name in ("trainable", "ema"):
        a, b = _final(straight, name), _final(run, name)
        assert a.keys() == b.keys() and all(torch.equal(a[x], b[x]) for x in a), name


@pytest.fixture(scope="module")
def limit_run(work):
    """A 1-task job with launcher.max_requeues=0, signalled after its first step."""
    run = work / "limit"
    job_id, _ = _submit(f"run_dir={run}", *FAST, "trainer.max_steps=200", "launcher.max_requeues=0",
                        "launcher.time=10", "launcher.signal_lead_s=60", cwd=work)
    _signal_after_first_step(run, job_id)
    return {"run": run, "job_id": job_id, "info": _wait_job(job_id, run)}


@pytest.mark.slurm
def test_requeue_limit_stops_requeueing(limit_run):
    run, info = limit_run["run"], limit_run["info"]
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", info
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "preempted" and status["requeued"] is False and status["requeue_limit_reached"]
    assert "requeue limit reached" in status["requeue"] and status["step"] < 200


@pytest.fixture(scope="module")
def sweep_runs(work):
    """`alignrl train -m launcher=slurm algorithm.lr=1e-3,3e-3`: two 1-task jobs."""
    proc = run_cli("train", "-m", "launcher=slurm", "launcher.time=10", "launcher.signal_lead_s=60",
                   "algorithm.lr=1e-3,3e-3", *FAST, "trainer.max_steps=2", cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = re.findall(r"submitted Slurm job (\d+)", proc.stdout)
    runs = [Path(p) for p in re.findall(r"run dir  (\S+)", proc.stdout)]
    infos = [_wait_job(job_id, run) for job_id, run in zip(ids, runs)]
    return {"ids": ids, "runs": runs, "infos": infos, "stdout": proc.stdout}


@pytest.mark.slurm
def test_multirun_sweep_submits_one_job_per_point(sweep_runs, work):
    ids, runs = sweep_runs["ids"], sweep_runs["runs"]
    assert len(ids) == 2 and len(set(ids)) == 2 and len(set(runs)) == 2, sweep_runs["stdout"]
    assert all(r.parent.parent.parent == work / "multirun" for r in runs)  # multirun/<recipe>/<time>/<n>
    lrs = []
    for job_id, run, info in zip(ids, runs, sweep_runs["infos"]):
        assert info["JobState"] == "COMPLETED", _logs(run)
        status = json.loads((run / "status.json").read_text())
        assert status["state"] == "finished" and status["slurm_job_id"] == job_id
        assert [r["step"] for r in _metrics(run)] == [1, 2]
        lrs.append(yaml.safe_load((run / "config.yaml").read_text())["algorithm"]["lr"])
    assert sorted(lrs) == [1e-3, 3e-3]


@pytest.mark.slurm
def test_sbatch_template_requeues_on_batch_signal(work):
    run = work / "template"
    env = dict(os.environ, ALIGNRL=str(Path(sys.executable).with_name("alignrl")), RUN_DIR=str(run))
    out = subprocess.run(["sbatch", "--parsable", "--time=10", "--output", str(work / "template-%j.out"),
                          str(SLURM_DIR / "train.sbatch"), *FAST, "trainer.max_steps=4"],
                         cwd=work, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip().split(";")[0]
    _signal_after_first_step(run, job_id, "--batch")  # B:USR1 goes to the batch shell, which forwards it
    info = _wait_job(job_id, run, restarts=1)
    log = (work / f"template-{job_id}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, log)
    assert "requeue 1 of 3" in log and "resumed from" in log, log
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    assert [r["step"] for r in _metrics(run)] == [1, 2, 3, 4]


@pytest.mark.slurm
def test_dry_run_prints_the_script_and_submits_nothing(work):
    run = work / "dry"
    proc = run_cli("train", f"run_dir={run}", *ARGS, "data.groups_per_iteration=4",  # 16 samples over 4 tasks
                   "launcher=slurm", "launcher.dry_run=true", "launcher.nodes=2",
                   "launcher.tasks_per_node=2", "launcher.time=30", "launcher.signal_lead_s=90",
                   "launcher.partition=debug", "launcher.max_requeues=5", cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "#!/bin/bash"
    for directive in ("--nodes=2", "--ntasks-per-node=2", "--signal=USR1@90", "--requeue", "--time=30",
                      "--open-mode=append", "--partition=debug"):
        assert f"#SBATCH {directive}" in lines, directive
    srun = [ln for ln in lines if ln.startswith("srun ")]
    assert len(srun) == 1 and "submitit.core._submit" in srun[0] and "--open-mode=append" in srun[0]
    assert "launcher=local" in proc.stderr and "resume=auto" in proc.stderr and f"run_dir={run}" in proc.stderr
    assert not (run / "slurm.json").exists() and not (run / "slurm").exists()


@pytest.mark.slurm
def test_bad_slurm_options_fail_in_one_line_before_submission(work):
    venv_bin = str(Path(sys.executable).parent)
    cases = [
        (["launcher.nodes=0"], {}, ["launcher.nodes must be >= 1"]),
        (["launcher.time=1", "launcher.signal_lead_s=120"], {}, ["launcher.time=1", "signal_lead_s=120"]),
        (["launcher.gpus_per_node=1"], {}, ["gpus_per_node=1", "partition 'debug' has no GPUs"]),
        (["launcher.partition=nope"], {}, ["'nope' is not a partition", "debug"]),
        ([], {"PATH": venv_bin}, ["sbatch", "not on PATH", "launcher=local"]),
    ]
    for i, (args, env, needles) in enumerate(cases):  # in this process: each fails before any model or job
        proc = run_inprocess("train", f"run_dir={work / f'bad{i}'}", *FAST, "launcher=slurm", *args, cwd=work,
                             env=env)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("alignrl: error: "), (args, proc.stderr)
        for n in needles:
            assert n in lines[0], (n, lines[0])
        assert not (work / f"bad{i}" / "slurm.json").exists()


@pytest.mark.slurm
def test_runs_lists_states_steps_metrics_and_jobs(work, straight_runs, preempted_run, limit_run, sweep_runs):
    proc = run_cli("runs", str(work), cwd=work)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["RUN", "RECIPE", "STEP", "REWARD", "EVAL", "STATE", "SLURM"]
    rows = {ln.split()[0]: ln.split() for ln in lines[1:]}
    last_reward = _metrics(work / "straight_slurm")[-1]["reward_mean"]
    assert rows["straight_slurm"][1:] == ["tiny_flowgrpo", "4/4", f"{last_reward:.4g}", "-", "finished",
                                          straight_runs["job_id"], "COMPLETED"]
    assert rows["straight_local"][2:] == ["4/4", f"{_metrics(work / 'straight_local')[-1]['reward_mean']:.4g}",
                                          "-", "finished", "-"]
    assert rows["preempted"][2] == "4/4" and rows["preempted"][-3:] == ["finished", preempted_run["job_id"],
                                                                          "COMPLETED"]
    limit = " ".join(rows["limit"])
    assert "/200" in rows["limit"][2] and "preempted (requeue limit)" in limit
    sweep = [r for name, r in rows.items() if name.startswith("multirun/")]
    assert len(sweep) == 2 and all(r[2] == "2/2" and r[-3] == "finished" for r in sweep)
    assert sorted(r[-2] for r in sweep) == sorted(sweep_runs["ids"])
    # a submitted job that has not started yet (held) shows as queued
    job_id, _ = _submit(f"run_dir={work / 'queued'}", *FAST, "launcher.time=10", "launcher.signal_lead_s=60",
                        "launcher.sbatch={hold: true}", cwd=work)
    try:
        proc = run_cli("runs", str(work / "queued"), cwd=work)
        assert proc.stdout.splitlines()[1].split()[-3:] == ["queued", job_id, "PENDING"], proc.stdout
    finally:
        subprocess.run(["scancel", job_id], check=True)
