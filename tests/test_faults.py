"""Fault injection on real processes and files: damaged checkpoints, kills mid-prune and mid-run, diverging
updates, rewards that are never finite. Each checks what the user sees (one line, status.json) and that
no data is lost."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from alignrl.errors import AlignError, CheckpointError
from alignrl.training import checkpoint as ckpt
from conftest import FAST, REPO, run_inprocess

ALIGNRL = Path(sys.executable).with_name("alignrl")


def _dead_pid() -> int:
    """The pid of a process that has exited (for leftovers of killed runs)."""
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout)


def _status(run: Path) -> dict:
    return json.loads((run / "status.json").read_text())


def _steps(run: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def _copy_as(src: Path, step: int) -> Path:
    """A copy of checkpoint ``src`` as ``step`` (state.json and manifest agree with the new name)."""
    dst = src.with_name(ckpt.step_dir_name(step))
    shutil.copytree(src, dst)
    state = json.loads((dst / "state.json").read_text())
    state["iteration"] = step
    (dst / "state.json").write_text(json.dumps(state))
    ckpt.write_manifest(dst)
    return dst


def _flip_bit(path: Path, offset: int = -64) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def _kill_after_step(run: Path, args: list, step: int, cwd: Path) -> None:
    """Start `alignrl train`, SIGKILL it once status.json reports ``step`` (nothing gets to clean up)."""
    p = subprocess.Popen([str(ALIGNRL), "train", f"run_dir={run}", *args], cwd=cwd, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        try:
            if _status(run).get("step", 0) >= step:
                break
        except (OSError, ValueError):  # not written yet
            pass
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    _, err = p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL, err[-3000:]


def test_killed_run_and_damaged_checkpoints_resume_from_the_newest_good_one(tmp_path):
    run = tmp_path / "run"
    args = [*FAST, "trainer.max_steps=30", "trainer.checkpoint_every=1", "trainer.keep_checkpoints=10"]
    _kill_after_step(run, args, 3, tmp_path)
    # status.json shows where the killed run was (written every iteration, after its metrics row)
    status, logged = _status(run), _steps(run)
    assert status["state"] == "running" and status["step"] >= 3 and status["train_seconds"] > 0, status
    assert logged[-1] in (status["step"], status["step"] + 1), (logged, status)
    root = run / "checkpoints"
    good = ckpt.latest_checkpoint(root)  # step 2 at least: it was saved before iteration 3 began
    g = ckpt.step_of(good)
    assert g >= 2
    before = load_file(str(good / "trainable.safetensors"))
    # the newest four are damaged copies of it, each a different way
    _flip_bit(_copy_as(good, g + 1) / "trainable.safetensors")  # same size: only the checksum sees it
    with open(_copy_as(good, g + 2) / "trainable.safetensors", "r+b") as f:
        f.truncate(5000)
    (_copy_as(good, g + 3) / "state.json").write_text('{"iteration": 5, "sampler"')
    bad = _copy_as(good, g + 4)  # bytes match its manifest, but the optimizer file holds no torch state
    with zipfile.ZipFile(bad / "optimizer.pt", "w") as z:
        z.writestr("junk", "not a state dict")
    ckpt.write_manifest(bad)
    (good / ckpt.MANIFEST).unlink()  # as written before manifests existed: it must still load
    # leftovers of killed runs (the kill above may have left its own), cleaned by the next successful one
    (root / f"{ckpt.step_dir_name(g + 9)}.tmp" / "rng").mkdir(parents=True)
    (run / f"status.json.tmp{_dead_pid()}").write_text("{")

    proc = run_inprocess("train", f"run_dir={run}", *args, "resume=auto", f"trainer.max_steps={g + 1}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("alignrl: warning: checkpoint")]
    assert len(warnings) == 4, proc.stderr[-3000:]
    for line, (step, problem) in zip(warnings, [(g + 4, "optimizer.pt is unreadable"),
                                                (g + 3, "state.json is unreadable"),
                                                (g + 2, "trainable.safetensors has 5000 bytes, the manifest says"),
                                                (g + 1, "trainable.safetensors fails its checksum")]):
        assert f"{ckpt.step_dir_name(step)} is unusable: {problem}" in line, line
    assert f"resumed from {good}" in proc.stderr
    damaged = sorted(d.name for d in root.glob("*.damaged"))  # moved aside, not deleted
    assert damaged == [f"{ckpt.step_dir_name(g + i)}.damaged" for i in (1, 2, 3, 4)], damaged
    assert f"checkpoint {root / ckpt.step_dir_name(g + 1)}" in proc.stderr.splitlines()[-1]  # the final line
    assert _steps(run) == list(range(1, g + 2))  # training continued from the good checkpoint
    assert _status(run)["state"] == "finished" and _status(run)["step"] == g + 1
    resaved = root / ckpt.step_dir_name(g + 1)
    ckpt.verify_checkpoint(resaved)  # the damaged copy of step g+1 was replaced by a good one
    assert json.loads((resaved / "state.json").read_text())["iteration"] == g + 1
    after = load_file(str(good / "trainable.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)  # the good checkpoint was left untouched
    assert not list(root.glob("*.tmp")) and not list(root.glob("*.old")) and not list(run.glob("*.tmp*"))

    # a damaged checkpoint named explicitly: one line, non-zero exit, no model loaded; status.json says why
    # (and keeps the step the run had reached)
    named = root / ckpt.step_dir_name(g + 2)
    os.replace(root / f"{named.name}.damaged", named)
    proc = run_inprocess("train", f"run_dir={run}", *args, f"resume={named}", cwd=tmp_path)
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert errors[-1].startswith(f"alignrl: error: resume={named} cannot be used: trainable.safetensors has 5000 "
                                 f"bytes") and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert named.is_dir()  # named explicitly: reported, not moved
    status = _status(run)
    assert status["state"] == "failed" and status["step"] == g + 1 and "has 5000 bytes" in status["error"]
    assert status["phase"] == "setup"


PRUNE_SCRIPT = textwrap.dedent("""
    import shutil, sys, time
    from pathlib import Path
    import torch
    from safetensors.torch import save_file
    from alignrl.training import checkpoint as ckpt

    real = shutil.rmtree
    def slow_rmtree(path, *a, **k):  # the weights go first, then the process is killed mid-prune
        (Path(path) / "trainable.safetensors").unlink()
        print("pruning", path, flush=True)
        time.sleep(60)
        real(path, *a, **k)
    ckpt.shutil.rmtree = slow_rmtree

    w = ckpt.CheckpointWriter(Path(sys.argv[1]), keep=1)
    for step in (1, 2):
        tmp = w.begin(step)
        w.write_rank_rng(step, 0)
        save_file({"w": torch.full((8,), float(step))}, str(tmp / "trainable.safetensors"))
        torch.save({"state": {}}, tmp / "optimizer.pt")
        torch.save({"last_epoch": step}, tmp / "lr_scheduler.pt")
        (tmp / "state.json").write_text('{"iteration": %d, "ema": null}' % step)
        w.commit(step)
""")


def test_kill_during_prune_leaves_no_complete_checkpoint_without_weights(tmp_path):
    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-c", PRUNE_SCRIPT, str(run)], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    assert line.startswith("pruning") and "step_000001" in line, (line, p.stderr.read() if p.poll() else "")
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    root = run / "checkpoints"
    assert (root / "step_000001").is_dir() and not (root / "step_000001" / "trainable.safetensors").exists()
    for d in root.iterdir():  # whatever carries COMPLETE is whole
        if (d / ckpt.MARKER).exists():
            ckpt.verify_checkpoint(d)
    assert [c.name for c in ckpt.list_checkpoints(root)] == ["step_000002"]
    assert ckpt.resolve_resume("auto", run).name == "step_000002"
    ckpt.CheckpointWriter(run).clean()  # the next run removes the half-deleted directory
    assert sorted(d.name for d in root.iterdir()) == ["step_000002"]


def test_diverging_update_fails_the_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()  # an existing run directory is kept whatever happens (the CLI removes a new one a failed start made)
    proc = run_inprocess("train", f"run_dir={run}", *FAST, "trainer.max_steps=3", "trainer.checkpoint_every=1",
                   "algorithm.lr=1e30", cwd=tmp_path)
    assert proc.returncode != 0
    last = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1]
    assert last.startswith("alignrl: error: the update diverged: the trainable weights are not finite") and \
        "lower algorithm.lr (now 1e+30)" in last and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    status = _status(run)
    assert status["state"] == "failed" and status["error"] == last.removeprefix("alignrl: error: ")
    assert status["phase"] == "train"
    for c in ckpt.list_checkpoints(run / "checkpoints"):  # nothing non-finite was saved
        assert all(torch.isfinite(t).all() for t in load_file(str(c / "trainable.safetensors")).values())


def _trainer(tmp_path, *extra):
    from accelerate.state import AcceleratorState

    from alignrl.config import compose
    from alignrl.training.trainer import Trainer

    AcceleratorState._reset_state()
    return Trainer(compose([f"run_dir={tmp_path}", *FAST, *extra]), tmp_path)


def test_rewards_never_finite_stop_the_run(tmp_path):
    t = _trainer(tmp_path, "trainer.max_steps=6", "trainer.max_nonfinite_iterations=2")

    def nan_reward(images, prompts, metadata):
        return np.full(len(prompts), np.nan), {}

    t.reward_runner.reward = nan_reward
    with pytest.raises(AlignError, match=r"every reward was NaN/inf for 2 iterations in a row \(iterations 1-2\)"):
        t.train()
    status = _status(tmp_path)
    assert status["state"] == "failed" and "every reward was NaN/inf" in status["error"]
    assert status["step"] == 1 and t.optimizer_steps == 0
    assert not list((tmp_path / "checkpoints").glob("step_*"))


def test_checkpoint_without_ema_or_with_nan_weights_is_refused(tmp_path):
    t = _trainer(tmp_path, "trainer.ema.enabled=false")
    t.save_checkpoint()
    t.reward_runner.close()
    with pytest.raises(CheckpointError, match=r"has no ema.safetensors.*trainer.ema.enabled=false"):
        _trainer(tmp_path, "resume=auto")
    status = _status(tmp_path)
    assert status["state"] == "failed" and "ema.safetensors" in status["error"]
    path = tmp_path / "checkpoints" / "step_000000"
    weights = load_file(str(path / "trainable.safetensors"))
    next(iter(weights.values()))[0] = float("nan")
    save_file(weights, str(path / "trainable.safetensors"))
    ckpt.write_manifest(path)  # the file is intact as written: the NaN is in the weights themselves
    with pytest.raises(CheckpointError, match=r"trainable.safetensors holds NaN/inf weights"):
        _trainer(tmp_path, "resume=auto", "trainer.ema.enabled=false")
