"""Sharded full fine-tuning (distributed=fsdp, FSDP2 over gloo on the CPU): a 2-process run of the tiny default
recipe with its KL reference (sharded too), the EMA, and an evaluation whose 3 prompts split unevenly over the 2
processes; it resumes bit for bit from its checkpoint (weights and EMA whole, optimizer states sharded in DCP),
resumes onto 1 process, and matches a 1-process run of the same global batch."""

import json
import os
import subprocess
import sys
import warnings
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
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", **ONE_THREAD)
    exe = str(Path(sys.executable).with_name("alignrl"))
    # side by side: resumed onto 1 process (a child), and resumed on 2 (launched from here); the 1-process run
    # saves sharded checkpoints without whole weights (distributed.whole_weights=false)
    one = subprocess.Popen([exe, "train", *ARGS, f"run_dir={root / 'onto_one'}", f"resume={step1}", "distributed=fsdp",
                            "distributed.whole_weights=false"], cwd=root, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    two = run_inprocess("train", *ARGS, f"run_dir={root / 'resumed'}", f"resume={step1}", "distributed=fsdp",
                        "launcher.nproc_per_node=2", cwd=root)
    _, err = one.communicate(timeout=600)
    assert two.returncode == 0, two.stderr[-4000:]
    assert one.returncode == 0, err[-4000:]
    return {"root": root, "sharded": sharded, "onto_one_err": err}


def test_sharded_run_checkpoints_sharded_states_and_whole_weights(runs):
    run = runs["sharded"]
    log = (run / "alignrl.log").read_text()
    assert "2 process(es), fsdp over 2 processes (6 shard units)" in log  # 2 blocks + root, twice
    assert "sd3 SD3Transformer2DModel 0.08M params" in log  # the model's own class, its whole size
    ckpt = run / "checkpoints" / "step_000002"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["world_size"] == 2 and state["sharded"] and state["whole_weights"] and state["optimizer_steps"] == 4
    assert (ckpt / "sharded" / ".metadata").is_file() and not (ckpt / "optimizer.pt").exists()
    assert len(list((ckpt / "sharded").glob("*.distcp"))) == 2  # one shard file per process
    manifest = json.loads((ckpt / "MANIFEST.json").read_text())["files"]
    assert "sharded/.metadata" in manifest  # checksummed like every other file
    import torch.distributed.checkpoint as dcp

    keys = dcp.FileSystemReader(str(ckpt / "sharded")).read_metadata().state_dict_metadata
    assert {k.split(".")[0] for k in keys} == {"model", "ema", "optimizer"}
    half = [m for k, m in keys.items() if k.startswith("model.") and m.size[0] >= 2]
    assert half and all(len(m.chunks) == 2 for m in half)  # each process wrote its half of dim 0
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
    """The sharded weights, EMA and optimizer states load resharded into one unsharded process, which then
    trains the second iteration as the 2 processes did: the same samples (the global batch is split, not changed)
    and the same update up to the order gradients are summed in (measured 4.6e-7; Adam moves each weight ~lr =
    1e-2 per step). It saves sharded checkpoints without whole weights (read back here from its shards)."""
    full, one = runs["sharded"], runs["root"] / "onto_one"
    log = (one / "alignrl.log").read_text()
    assert "1 process(es), fsdp (1 process: nothing to shard)" in log and "resumed from" in log
    a, b = _metrics(full)[-1], _metrics(one)[-1]
    assert a["step"] == b["step"] == 2 and a["reward_mean"] == b["reward_mean"]
    for key in ("policy_loss", "kl", "clipfrac"):
        assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-9), key
    assert _max_diff(_weights(full, 2), _shards(one, 2, "model")) < 1e-4
    assert _max_diff(_weights(full, 2, "ema"), _shards(one, 2, "ema")) < 1e-4
    assert _max_diff(_weights(full, 1), _shards(one, 2, "model")) > 1e-3  # it did train on


def _shards(run: Path, step: int, key: str) -> dict:
    """The whole ``key`` tensors (model, ema) of a sharded checkpoint, read in this process."""
    import torch.distributed.checkpoint as dcp

    d = run / "checkpoints" / f"step_{step:06d}" / "sharded"
    meta = dcp.FileSystemReader(str(d)).read_metadata().state_dict_metadata
    state = {key: {k.split(".", 1)[1]: torch.zeros(tuple(m.size), dtype=m.properties.dtype)
                   for k, m in meta.items() if k.startswith(key + ".")}}
    with warnings.catch_warnings():  # one process, no process group: intended
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(d))
    return state[key]


def test_a_checkpoint_without_whole_weights_evaluates_from_its_shards(runs, tmp_path):
    """distributed.whole_weights=false: the checkpoint holds sharded/ only; `alignrl sample` reads its EMA and live
    weights from there (the same images as from the whole-weights checkpoint of the same weights)."""
    one = runs["root"] / "onto_one" / "checkpoints" / "step_000002"
    state = json.loads((one / "state.json").read_text())
    assert state["sharded"] and not state["whole_weights"]
    assert not (one / "trainable.safetensors").exists() and not (one / "ema.safetensors").exists()
    out = {}
    for name, ckpt in (("shards", one), ("whole", runs["sharded"] / "checkpoints" / "step_000002")):
        for weights in ("ema", "live"):
            folder = tmp_path / f"{name}_{weights}"
            res = run_inprocess("sample", f"eval.checkpoint={ckpt}", f"eval.out_dir={folder}", f"eval.weights={weights}",
                                "sample.prompts=[a red circle]", "sample.num_images=2", "sampler.eval_num_steps=4")
            assert res.returncode == 0, res.stderr[-3000:]
            out[name, weights] = _pixels(folder)
    assert (out["shards", "ema"] - out["shards", "live"]).abs().max() > 0  # two different weight sets were read
    for weights in ("ema", "live"):  # the two runs' step-2 weights agree to 5e-7: the same images up to rounding
        assert (out["shards", weights] - out["whole", weights]).abs().max() <= 2 / 255, weights


def _pixels(folder: Path) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    rows = [json.loads(x) for x in (folder / "prompts.jsonl").read_text().splitlines()]  # the samples, not the grid
    return torch.stack([torch.from_numpy(np.array(Image.open(folder / r["image"]))).float() / 255 for r in rows])


@pytest.mark.parametrize("overrides, says", [
    (["trainer.finetune=lora"], "distributed=fsdp shards full fine-tunes"),
    (["distributed.strategy=zero1"], "distributed.strategy='zero1' is not known; use distributed=ddp, fsdp, zero2 or zero3"),
    (["distributed.param_dtype=int8"], "distributed.param_dtype=int8 is not known"),
])
def test_unsupported_sharded_setups_fail_in_one_line(tmp_path, overrides, says):
    proc = run_inprocess("train", f"run_dir={tmp_path / 'run'}", *FAST, "distributed=fsdp", *overrides, cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and says in lines[0], proc.stderr[-2000:]



@pytest.mark.parametrize("recipe", ["tiny_ddo", "tiny_diffusion_dro", "tiny_diffusion_dpo", "tiny_online_dpo",
                                    "tiny_refl", "tiny_adjointdpm", "tiny_nft", "tiny_d3po", "tiny_ddpo", "tiny_dpok",
                                    "tiny_spo", "tiny_reinflow"])
def test_every_shipped_method_shards_and_a_method_of_ones_own_must_say_so(recipe):
    """Every shipped method balances its passes over processes; an algorithm that does not declare
    ``supports_sharding`` (a user's own, through ``_target_``) is refused in one line naming the fix."""
    from types import SimpleNamespace

    from alignrl.components import build_algorithm
    from alignrl.config import compose
    from alignrl.errors import ConfigError
    from alignrl.training.sharding import DistributedConfig, check_strategy

    cfg = compose([f"recipe={recipe}", "distributed=fsdp", "run_dir=/tmp/alignrl-test-fsdp"])
    dist = DistributedConfig.from_config(cfg.distributed)
    kw = dict(finetune="full", text_encoder="frozen", mixed_precision="no")
    check_strategy(dist, algorithm=build_algorithm(cfg), **kw)
    own = SimpleNamespace(name="my_method")
    with pytest.raises(ConfigError, match="algorithm my_method does not declare supports_sharding = True"):
        check_strategy(dist, algorithm=own, **kw)
