"""Two-process training runs (split from test_train.py so the test workers share the load evenly)."""

import json

import pytest
import torch

from conftest import FAST, run_inprocess
from test_train import _metrics, _sigterm_after_first_step, _weights


def test_two_processes_match_one(tmp_path):
    args = [*FAST, "trainer.max_steps=2", "trainer.rollout_batch_size=2", "trainer.train_batch_size=2",
            "trainer.checkpoint_every=1"]
    one = tmp_path / "one"
    # one thread each, as the launcher gives each of the 2 processes, so matmuls reduce in the same order
    assert run_inprocess("train", f"run_dir={one}", *args, cwd=tmp_path, threads=1).returncode == 0
    two = tmp_path / "two"
    proc = run_inprocess("train", f"run_dir={two}", *args, "launcher.nproc_per_node=2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "starting 2 processes" in proc.stderr
    m1, m2 = _metrics(one), _metrics(two)
    assert len(m1) == len(m2) == 2
    # iteration 1: the same global batch gives the same samples and rewards, bit for bit
    assert m1[0]["reward_mean"] == m2[0]["reward_mean"]
    for key in ("policy_loss", "clipfrac", "approx_kl"):  # logged over all ranks' samples
        assert m1[0][key] == pytest.approx(m2[0][key], rel=1e-4, abs=1e-9), key
    # and the same update, up to the order in which gradients are summed: Adam scales each step to
    # ~lr (1e-2) per weight, so rounding shows up as < 1e-4 where gradients are near Adam's eps
    w1, w2 = _weights(one, 1), _weights(two, 1)
    base = _weights(one, 2)
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-4), k
    assert max((w1[k] - base[k]).abs().max() for k in w1) > 1e-3  # the update itself is much larger
    # later iterations stay close (JPEG sizes are integers of bytes, so tiny pixel differences can flip one)
    assert m1[1]["reward_mean"] == pytest.approx(m2[1]["reward_mean"], abs=0.01)
    state = json.loads((two / "checkpoints" / "step_000002" / "state.json").read_text())
    assert state["world_size"] == 2 and state["optimizer_steps"] == 4


def test_two_process_run_stops_on_launcher_sigterm_and_resumes(tmp_path):
    args = [*FAST, "trainer.max_steps=8", "trainer.rollout_batch_size=2", "trainer.train_batch_size=2",
            "launcher.nproc_per_node=2"]
    run = tmp_path / "run"
    # to the launcher, as a scheduler or a user would; it becomes a STOP file the workers see
    assert "STOP file" in _sigterm_after_first_step(run, args, tmp_path)
    proc = run_inprocess("train", f"run_dir={run}", *args, "resume=auto", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
