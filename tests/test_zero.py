"""DeepSpeed ZeRO (distributed=zero2|zero3) through DeepSpeed's CPU accelerator, 2 processes over gloo: the tiny
default recipe as a full fine-tune with its KL reference, the EMA, gradient checkpointing and an evaluation whose 3
prompts split unevenly over the processes. ZeRO-2 and ZeRO-3 give the same run; ZeRO-3 resumes bit for bit from its
checkpoint; a ZeRO checkpoint (the ddp layout) resumes onto 1 plain process, which then trains the next iteration as
the 2 ZeRO processes did (the check that ZeRO's update is ddp's: sums over processes, every pass accumulated), and onto
3 ZeRO-3 processes with padded partitions and DeepSpeed's offload, which train it alike too."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FAST, run_inprocess
from test_fsdp import ARGS, ONE_THREAD, _max_diff
from test_train import _metrics, _weights

import importlib.util

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                reason="DeepSpeed is not installed (make install installs it; pip install -e . does not)")


# 3 groups of 4: 12 samples split over 1, 2 and 3 processes (passes of 1 sample: 6 and 4 per process divide)
ZARGS = [*ARGS, "data.groups_per_iteration=3", "trainer.train_batch_size=1"]


def _launch(*args, cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", **ONE_THREAD)
    exe = str(Path(sys.executable).with_name("alignrl"))
    return subprocess.Popen([exe, "train", *ZARGS, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait(proc: subprocess.Popen) -> str:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    return err


# every ZeRO-3 weight partitioned (DeepSpeed keeps parameters under 1e5 elements whole by default, which on the
# tiny model would be all of them): sampling, EMA swaps, checkpoints and resume go through the partitions
ZERO3 = ["distributed=zero3", "distributed.deepspeed={zero_optimization:{stage3_param_persistence_threshold:0}}"]
# on 3 processes no weight's size divides by the process count, so the last partitions are padded; with the
# optimizer's states and the weights offloaded to the host (DeepSpeed's offload on the loop's own AdamW)
UNEVEN = ["distributed=zero3", "launcher.nproc_per_node=3",
          "distributed.deepspeed={zero_optimization:{stage3_param_persistence_threshold:0,"
          "offload_param:{device:cpu},offload_optimizer:{device:cpu}}}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every run with one thread per process (the launcher's workers' reduction order): the ZeRO runs children, two
    launched at a time, then two beside the plain one-process resume, which runs in this test's process."""
    root = tmp_path_factory.mktemp("zero")
    two = _launch(f"run_dir={root / 'zero2'}", "distributed=zero2", "launcher.nproc_per_node=2", cwd=root)
    three = _launch(f"run_dir={root / 'zero3'}", *ZERO3, "launcher.nproc_per_node=2", cwd=root)
    _wait(two), _wait(three)
    # beside each other: ZeRO-3's checkpoint resumed on 2 processes, ZeRO-2's onto 3 ZeRO-3 processes with padded
    # partitions and offload, and ZeRO-2's onto 1 plain process (in this test's process: one thread, as a worker)
    resumed = _launch(f"run_dir={root / 'resumed'}", *ZERO3, "launcher.nproc_per_node=2",
                      f"resume={root / 'zero3' / 'checkpoints' / 'step_000001'}", cwd=root)
    uneven = _launch(f"run_dir={root / 'uneven'}", *UNEVEN, f"resume={root / 'zero2' / 'checkpoints' / 'step_000001'}",
                     cwd=root)
    one = run_inprocess("train", *ZARGS, f"run_dir={root / 'onto_one'}",
                        f"resume={root / 'zero2' / 'checkpoints' / 'step_000001'}", cwd=root, threads=1)
    assert one.returncode == 0, one.stderr[-4000:]
    _wait(resumed), _wait(uneven)
    return root


def test_zero_runs_checkpoint_in_the_ddp_layout(runs):
    for stage in ("zero2", "zero3"):
        run = runs / stage
        log = (run / "alignrl.log").read_text()
        assert f"2 process(es), deepspeed zero-{stage[-1]} over 2 processes" in log
        if stage == "zero3":  # the test's setting reached DeepSpeed: every weight split
            assert "over 2 processes (0 of 66 weight tensors kept whole)" in log
        assert "sd3 SD3Transformer2DModel 0.08M params" in log and "(0.080M params, full)" in log  # whole sizes
        ckpt = run / "checkpoints" / "step_000002"
        state = json.loads((ckpt / "state.json").read_text())
        assert state["world_size"] == 2 and not state["sharded"] and state["optimizer_steps"] == 4
        assert (ckpt / "optimizer.pt").is_file() and not (ckpt / "sharded").exists()
        saved = torch.load(ckpt / "optimizer.pt", weights_only=True)  # a plain AdamW state_dict, per parameter
        w = _weights(run, 2)
        assert len(saved["state"]) == len(w) == 66
        assert {k for s in saved["state"].values() for k in s} == {"step", "exp_avg", "exp_avg_sq"}
        assert sorted(tuple(s["exp_avg"].shape) for s in saved["state"].values()) == \
            sorted(tuple(t.shape) for t in w.values())
        assert all(float(s["step"]) == 4 for s in saved["state"].values())
        assert _max_diff(_weights(run, 1), w) > 1e-3 and _max_diff(w, _weights(run, 2, "ema")) > 1e-4
        evals = [m for m in _metrics(run) if "eval/reward_mean" in m]
        assert [m["step"] for m in evals] == [2] and evals[0]["eval/num_images"] == 3


def test_zero2_and_zero3_train_alike(runs):
    """The same first iteration whether the weights are whole (ZeRO-2) or split (ZeRO-3) in every process, up to the
    order gradients are summed in (Adam's first step, about lr x sign(g), magnifies that for near-zero gradients:
    measured 1.1e-5 with 3 passes per process and update, 2e-6 with 2). The second iteration is compared from one
    checkpoint below: from here on JPEG sizes, a step function of the pixels, can tell the two runs apart."""
    for name in ("trainable", "ema"):
        assert _max_diff(_weights(runs / "zero2", 1, name), _weights(runs / "zero3", 1, name)) < 5e-5, name
    x, y = _metrics(runs / "zero2")[0], _metrics(runs / "zero3")[0]
    assert x["step"] == y["step"] == 1 and x["reward_mean"] == y["reward_mean"]
    for key in ("policy_loss", "kl", "grad_norm"):
        assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-9), key


def test_zero3_resumes_bit_for_bit(runs):
    full, resumed = runs / "zero3", runs / "resumed"
    assert "resumed from" in (resumed / "alignrl.log").read_text()
    for name in ("trainable", "ema"):
        assert _max_diff(_weights(full, 2, name), _weights(resumed, 2, name)) == 0.0, name
    a, b = _metrics(full)[-1], _metrics(resumed)[-1]
    for key in ("reward_mean", "policy_loss", "kl", "grad_norm", "eval/reward_mean", "lr"):
        assert a[key] == b[key], key


def test_a_zero_checkpoint_resumes_onto_one_plain_process(runs):
    """One ddp process trains the second iteration from ZeRO-2's checkpoint (whole weights, EMA, the optimizer's
    states gathered per parameter) as the 2 ZeRO processes did: DeepSpeed's averages are turned back into the
    loop's sums, and every pass of an optimizer step is accumulated (measured 1.5e-7; before the pre-forward hook
    ZeRO-3 kept only the last pass's gradients and was 0.04 off after one iteration)."""
    zero, one = runs / "zero2", runs / "onto_one"
    log = (one / "alignrl.log").read_text()
    assert "1 process(es); run dir" in log and "resumed from" in log
    a, b = _metrics(zero)[-1], _metrics(one)[-1]
    assert a["step"] == b["step"] == 2 and a["reward_mean"] == b["reward_mean"]
    for key in ("policy_loss", "kl", "grad_norm"):
        assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-9), key
    for name in ("trainable", "ema"):
        assert _max_diff(_weights(zero, 2, name), _weights(one, 2, name)) < 1e-5, name
    assert _max_diff(_weights(zero, 1), _weights(one, 2)) > 1e-3  # it did train on


def test_zero3_with_padded_partitions_and_offload_resumes_and_trains_as_one_process(runs):
    """A ZeRO-2 checkpoint resumed onto 3 ZeRO-3 processes (every weight's size leaves the last partition padded)
    with the weights and the optimizer's states offloaded to the host: the second iteration samples what 1 ddp
    process samples from the same checkpoint and trains to the same weights up to the order of a 3-way sum. (Such
    a run once stopped as diverged: the finiteness check read the padding, unset memory; it is NaN only at times,
    so the unit test below pins that down.)"""
    uneven, one = runs / "uneven", runs / "onto_one"
    log = (uneven / "alignrl.log").read_text()
    assert "3 process(es), deepspeed zero-3 over 3 processes (0 of 66 weight tensors kept whole)" in log
    assert "resumed from" in log
    a, b = _metrics(one)[-1], _metrics(uneven)[-1]
    assert a["step"] == b["step"] == 2 and a["reward_mean"] == b["reward_mean"]
    for key in ("policy_loss", "kl", "grad_norm"):
        assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-9), key
    for name in ("trainable", "ema"):  # measured 7e-7
        assert _max_diff(_weights(one, 2, name), _weights(uneven, 2, name)) < 1e-5, name
    # the evaluation samples with the EMA weights gathered from padded partitions (before ZeRO-3's weights were
    # swapped in whole, its small parameters kept their live values: off by 0.017)
    assert a["eval/reward_mean"] == pytest.approx(b["eval/reward_mean"], abs=1e-3)
    saved = torch.load(uneven / "checkpoints" / "step_000002" / "optimizer.pt", weights_only=True)
    assert sorted(tuple(s["exp_avg"].shape) for s in saved["state"].values()) == \
        sorted(tuple(t.shape) for t in _weights(uneven, 2).values())


@pytest.mark.parametrize("overrides, says", [
    (["trainer.finetune=lora"], "distributed=zero3 shards full fine-tunes"),
    (["trainer.optimizer.name=adafactor"], "trainer.optimizer.name=adafactor needs distributed=ddp or fsdp"),
    (["trainer.text_encoder=full"], "distributed=zero3 shards the denoiser only"),
])
def test_unsupported_zero_setups_fail_in_one_line(tmp_path, overrides, says):
    proc = run_inprocess("train", f"run_dir={tmp_path / 'run'}", *FAST, "trainer.finetune=full", "distributed=zero3",
                         *overrides, cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and says in lines[0], proc.stderr[-2000:]


def test_zero_without_deepspeed_names_the_install(monkeypatch):
    import importlib.util
    from types import SimpleNamespace

    from alignrl.errors import ConfigError
    from alignrl.training.sharding import DistributedConfig, check_strategy

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    algo = SimpleNamespace(name="flowgrpo", supports_sharding=True)
    with pytest.raises(ConfigError, match=r"distributed=zero2 needs DeepSpeed.*pip install 'alignrl\[deepspeed\]'"):
        check_strategy(DistributedConfig(strategy="zero2"), algorithm=algo, finetune="full", text_encoder="frozen",
                       mixed_precision="no")


def test_deepspeed_config_merges_user_settings():
    from alignrl.training.zero import deepspeed_config

    cfg = deepspeed_config(3, 1.0, {"zero_optimization": {"offload_param": {"device": "cpu"}}, "bf16": {"enabled": False}})
    assert cfg["zero_optimization"] == {"stage": 3, "overlap_comm": False, "contiguous_gradients": True,
                                        "offload_param": {"device": "cpu"}}
    assert cfg["managed_gradient_accumulation"] is False and cfg["gradient_clipping"] == 1.0
    assert cfg["bf16"] == {"enabled": False}


def test_plan_counts_deepspeeds_layout():
    """`alignrl plan` under ZeRO: ZeRO-2 keeps the whole fp32 weights in every GPU, ZeRO-3 divides them (and
    DeepSpeed's fp32 master copy, 4 B/param more than fsdp's states) but gathers the whole fp32 denoiser to sample,
    which the total counts; both with the KL reference whole."""
    from alignrl.config import compose
    from alignrl.plan import KNOWN, Machine, estimate

    machine = Machine(8, 80.0, 1)
    est = {d: estimate(compose(["recipe=mixgrpo_flux", f"distributed={d}"]), machine) for d in ("fsdp", "zero2",
                                                                                               "zero3")}
    P = KNOWN["flux1_dev"]["denoiser"]
    rows = {d: dict(e.rows) for d, e in est.items()}
    assert rows["zero2"]["denoiser full: fp32 weights (whole in every process)"] == 4 * P
    assert rows["zero2"]["gradients, Adam's moments, fp32 master / 8 (16 B/param)"] == 16 * P / 8
    assert rows["zero3"]["denoiser full: fp32 weights, grads, Adam, fp32 master / 8 (20 B/param)"] == 20 * P / 8
    training3 = sum(rows["zero3"].values())
    assert est["zero3"].total > training3 and any("gathered in fp32" in n for n in est["zero3"].notes)
    assert est["zero2"].total > est["fsdp"].total and not est["zero2"].fits and est["fsdp"].fits


def test_finiteness_check_reads_a_padded_partition_without_its_padding(monkeypatch):
    """ZeRO-3 pads the last partitions of a weight whose size does not divide by the process count with unset
    memory; the divergence check reads each partition's own elements only (with the padding read, a 3-process run
    stopped as diverged after its first step, though its weights were finite)."""
    from types import SimpleNamespace

    from alignrl.training.sharding import DistributedConfig
    from alignrl.training.zero import ZeroSharding

    sharding = ZeroSharding(DistributedConfig(strategy="zero3"), world=3, device=torch.device("cpu"))
    monkeypatch.setattr(ZeroSharding, "rank", property(lambda self: 2))
    # 8 elements over 3 processes: partitions of 3, the last holds elements 6 and 7 and one padding slot
    param = SimpleNamespace(ds_numel=8, ds_tensor=torch.tensor([1.0, 2.0, float("nan")]))
    assert [t.tolist() for t in sharding.local([param], padded=False)] == [[1.0, 2.0]]
    assert sharding.local([param])[0] is param.ds_tensor  # gathers need the equal, padded sizes
    assert sharding.all_finite([param], local_only=True)
    param.ds_tensor[1] = float("inf")
    assert not sharding.all_finite([param], local_only=True)
    monkeypatch.setattr(ZeroSharding, "rank", property(lambda self: 0))  # a whole partition, no padding
    param.ds_tensor = torch.tensor([1.0, 2.0, 3.0])
    assert [t.tolist() for t in sharding.local([param], padded=False)] == [[1.0, 2.0, 3.0]]


def test_one_process_zero_is_the_ddp_path_and_saves_and_resumes_its_optimizer(tmp_path):
    """distributed=zero2 on one process splits nothing: the loop's own optimizer, whose states the checkpoint keeps
    and a resume restores (it used to fail at the first save)."""
    common = ["recipe=tiny_refl", "logger.progress_bar=false", "trainer.eval_every=0", "trainer.log_images_every=0",
              "distributed=zero2"]
    r = run_inprocess("train", *common, "trainer.max_steps=1", f"run_dir={tmp_path}")
    assert r.returncode == 0 and "nothing to split" in r.stdout + r.stderr, r.stderr[-3000:]
    saved = torch.load(tmp_path / "checkpoints" / "step_000001" / "optimizer.pt", weights_only=True)
    assert saved["state"] and all(int(s["step"]) == 1 for s in saved["state"].values())
    r = run_inprocess("train", *common, "trainer.max_steps=2", f"run_dir={tmp_path}", "resume=auto")
    assert r.returncode == 0 and "resumed from" in r.stdout + r.stderr, r.stderr[-3000:]
    saved = torch.load(tmp_path / "checkpoints" / "step_000002" / "optimizer.pt", weights_only=True)
    assert all(int(s["step"]) == 2 for s in saved["state"].values())  # counted on from the restored states
