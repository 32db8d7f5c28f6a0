"""Sharded full fine-tuning (distributed=fsdp, FSDP2 over gloo on the CPU): a 2-process run of the tiny default
recipe with its KL reference (sharded too), the EMA, and an evaluation whose 3 prompts split unevenly over the 2
processes; it resumes bit for bit from its checkpoint (weights and EMA whole, optimizer states sharded in DCP),
resumes onto 1 process, and matches a 1-process run of the same global batch."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FAST, run_cli, run_inprocess
from test_train import _metrics, _weights

ARGS = [*FAST, "trainer.rollout_batch_size=2", "trainer.train_batch_size=2", "trainer.checkpoint_every=1",
        "algorithm.beta=0.04",  # the frozen reference copy enters the loss (and is sharded)
        "trainer.ema.update_every=1", "trainer.eval_every=2", "eval.num_prompts=3",  # 2 + 1 prompts per process
        "trainer.gradient_checkpointing=true"]  # as the sharded FLUX recipes
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # as the launcher gives each process: the same reduction order


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    sharded = root / "sharded"
    proc = run_inprocess("train", f"run_dir={sharded}", *ARGS, "distributed=fsdp", "launcher.nproc_per_node=2",
                         cwd=root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    step1 = sharded / "checkpoints" / "step_000001"
    env = dict(__import__("os").environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", **ONE_THREAD)
    exe = str(Path(sys.executable).with_name("alignrl"))
    jobs = {  # side by side: resumed on 2 processes, resumed on 1, and a plain 1-process run from the start
        "resumed": [f"run_dir={root / 'resumed'}", f"resume={step1}", "distributed=fsdp", "launcher.nproc_per_node=2"],
        "onto_one": [f"run_dir={root / 'onto_one'}", f"resume={step1}", "distributed=fsdp"],
        "one": [f"run_dir={root / 'one'}", "trainer.max_steps=1"],
    }
    procs = {k: subprocess.Popen([exe, "train", *ARGS, *v], cwd=root, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for k, v in jobs.items()}
    errs = {}
    for k, p in procs.items():
        _, errs[k] = p.communicate(timeout=600)
        assert p.returncode == 0, (k, errs[k][-4000:])
    return {"root": root, "sharded": sharded, "errs": errs}


def test_sharded_run_checkpoints_whole_weights_and_sharded_optimizer_states(runs):
    run = runs["sharded"]
    log = (run / "alignrl.log").read_text()
    assert "2 process(es), fsdp over 2 processes (6 shard units)" in log  # 2 blocks + root, twice
    ckpt = run / "checkpoints" / "step_000002"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["world_size"] == 2 and state["optimizer_format"] == "dcp" and state["optimizer_steps"] == 4
    assert (ckpt / "optimizer" / ".metadata").is_file() and not (ckpt / "optimizer.pt").exists()
    assert len(list((ckpt / "optimizer").glob("*.distcp"))) == 2  # one shard file per process
    manifest = json.loads((ckpt / "MANIFEST.json").read_text())["files"]
    assert "optimizer/.metadata" in manifest  # checksummed like every other file
    # the whole weights, as `alignrl eval` reads them; trained away from the start, EMA apart from live
    w1, w2, ema = _weights(run, 1), _weights(run, 2), _weights(run, 2, "ema")
    from alignrl.backbones.sd3 import SD3Backbone

    assert w2.keys() == {n for n, _ in SD3Backbone.tiny().transformer.named_parameters()}
    assert _max_diff(w1, w2) > 1e-3 and _max_diff(w2, ema) > 1e-4
    evals = [m for m in _metrics(run) if "eval/reward_mean" in m]
    assert [m["step"] for m in evals] == [2] and evals[0]["eval/num_images"] == 3


def test_sharded_run_resumes_bit_for_bit(runs):
    full, resumed = runs["sharded"], runs["root"] / "resumed"
    assert "resumed from" in (resumed / "alignrl.log").read_text()
    for name in ("trainable", "ema"):
        assert _max_diff(_weights(full, 2, name), _weights(resumed, 2, name)) == 0.0, name
    a, b = _metrics(full)[-1], _metrics(resumed)[-1]
    for key in ("reward_mean", "policy_loss", "kl", "grad_norm", "eval/reward_mean"):
        assert a[key] == b[key], key


def test_sharded_checkpoint_resumes_onto_one_process(runs):
    """The optimizer's sharded states load resharded into one unsharded process; the second iteration then
    matches the 2-process one up to the order gradients are summed in (measured 4.6e-7 here; Adam moves each
    weight ~lr = 1e-2 per step)."""
    full, one = runs["sharded"], runs["root"] / "onto_one"
    err = runs["errs"]["onto_one"]
    assert "1 process(es), fsdp (1 process: nothing to shard)" in err and "resumed from" in err
    assert _max_diff(_weights(full, 2), _weights(one, 2)) < 1e-4
    assert _max_diff(_weights(full, 2, "ema"), _weights(one, 2, "ema")) < 1e-4
    assert _max_diff(_weights(full, 1), _weights(one, 2)) > 1e-3  # it did train on


def test_two_sharded_processes_match_one_plain_process(runs):
    """The same global batch on 2 sharded processes and 1 plain one: the same samples, and the same update up to
    summation order (measured 3.1e-5 against an update of 2e-2)."""
    sharded, one = runs["sharded"], runs["root"] / "one"
    a, b = _metrics(sharded)[0], _metrics(one)[0]
    assert a["reward_mean"] == b["reward_mean"]
    for key in ("policy_loss", "kl", "clipfrac"):
        assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-9), key
    assert _max_diff(_weights(sharded, 1), _weights(one, 1)) < 1e-4


@pytest.mark.parametrize("overrides, says", [
    (["trainer.finetune=lora"], "distributed=fsdp shards full fine-tunes"),
    (["recipe=tiny_online_dpo"], "does not balance its passes over processes"),
    (["distributed.strategy=zero3"], "distributed.strategy='zero3' is not known"),
    (["distributed.param_dtype=int8"], "distributed.param_dtype=int8 is not known"),
])
def test_unsupported_sharded_setups_fail_in_one_line(tmp_path, overrides, says):
    proc = run_inprocess("train", f"run_dir={tmp_path / 'run'}", *FAST, "distributed=fsdp", *overrides, cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and says in lines[0], proc.stderr[-2000:]

