"""The offline (preference) methods through the real loop on the tiny SD3: data made by `alignrl data`, the
reference frozen, exact mid-epoch resume, one process equal to two, and every tiny twin learning."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli, run_inprocess

KINDS = {"diffusion_dpo": "pairs", "flow_dpo": "pairs", "smpo": "pairs", "diffusion_kto": "labels", "rankdpo": "lists",
         "sft": "captions"}
QUIET = ["logger.progress_bar=false", "logger.plots=false", "trainer.log_images_every=0"]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """One `alignrl data` directory per kind: 16 tiny-train prompts x 8 images of the base model, JPEG scores."""
    root = tmp_path_factory.mktemp("offline_data")
    out = {}
    for kind in ("pairs", "labels", "lists", "captions"):
        proc = run_inprocess("data", "recipe=tiny_diffusion_dpo", f"out={root / kind}", f"kind={kind}",
                             "samples_per_prompt=8", "num_prompts=16", "progress=false", cwd=root)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[kind] = root / kind / f"{kind}.jsonl"
    return out


def _train(tmp_path, method, data, *args, name="run"):
    run = tmp_path / name
    proc = run_inprocess("train", f"recipe=tiny_{method}", f"data.offline.path={data}", f"run_dir={run}", *QUIET,
                         *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run, step, which="trainable"):
    return load_file(str(run / "checkpoints" / f"step_{step:06d}" / f"{which}.safetensors"))


@pytest.mark.parametrize("method", sorted(KINDS))
def test_every_tiny_offline_twin_raises_its_reward(tmp_path, datasets, method):
    """Trained on the base model's own samples ranked by JPEG compressibility, each method's samples (same
    eval prompts and noise before and after) compress better: the eval reward rises by more than its noise."""
    run = _train(tmp_path, method, datasets[KINDS[method]], "trainer.max_steps=30", "trainer.eval_at_start=true",
                 "trainer.eval_every=30", "trainer.checkpoint_every=0")
    rows = _metrics(run)
    evals = [r for r in rows if "eval/reward_mean" in r]
    first, last = evals[0]["eval/reward_mean"], evals[-1]["eval/reward_mean"]
    noise = evals[0]["eval/reward_std"] / np.sqrt(16)  # the standard error of the eval mean
    assert last - first > 2 * noise, (method, first, last, noise)
    train = [r for r in rows if "policy_loss" in r]
    assert len(train) == 30 and all(np.isfinite(r["policy_loss"]) for r in train)


def test_the_reference_is_frozen_and_shares_noise(tmp_path, datasets):
    """Full fine-tuning keeps a frozen copy as the reference: no gradient, its bytes unchanged by training, while
    the policy moves; a pair's two images get the same time and noise (the loss is log 2 where they are equal)."""
    from accelerate.state import AcceleratorState

    from alignrl.config import compose
    from alignrl.training.trainer import Trainer

    AcceleratorState._reset_state()
    cfg = compose(["recipe=tiny_diffusion_dpo", f"data.offline.path={datasets['pairs']}", f"run_dir={tmp_path}",
                   "trainer.max_steps=3", "trainer.eval_every=0", "trainer.checkpoint_every=0", *QUIET])
    t = Trainer(cfg, tmp_path)
    ref = t.reference_denoiser
    assert ref is not None and not any(p.requires_grad for p in ref.parameters())
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    live = [p.detach().clone() for p in t.params]
    t.timing = {}
    t.run_iteration()
    assert all(torch.equal(before[k], v) for k, v in ref.state_dict().items())
    assert any(not torch.equal(a, p) for a, p in zip(live, t.params))
    # shared (t, eps): with the winner's latent copied onto the loser, policy and reference errors cancel
    batch = t.collect_offline()
    batch.latents[:, 1] = batch.latents[:, 0]
    out = t.algorithm.train_step(batch, None, t.step_context())
    assert out["policy_loss"] == pytest.approx(np.log(2), abs=1e-6) and out["implicit_acc"] == 0.5
    t.reward_runner.close()


def test_offline_resume_mid_epoch_is_exact(tmp_path, datasets):
    """16 pairs at 16 rows per iteration... with 6 rows per iteration an epoch ends mid-iteration; stopping at
    step 2 (mid-epoch) and resuming reads the same rows as never stopping: identical weights."""
    args = ["data.offline.rows_per_iteration=6", "trainer.train_batch_size=3", "trainer.eval_every=0",
            "trainer.checkpoint_every=0"]
    straight = _train(tmp_path, "diffusion_dpo", datasets["pairs"], *args, "trainer.max_steps=4", name="straight")
    split = _train(tmp_path, "diffusion_dpo", datasets["pairs"], *args, "trainer.max_steps=2", name="split")
    _train(tmp_path, "diffusion_dpo", datasets["pairs"], *args, "trainer.max_steps=4", "resume=auto", name="split")
    a, b = _weights(straight, 4), _weights(split, 4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ea, eb = _weights(straight, 4, "ema"), _weights(split, 4, "ema")
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    assert [r["epoch"] for r in _metrics(split)] == pytest.approx([r["epoch"] for r in _metrics(straight)])


def test_offline_two_processes_match_one(tmp_path, datasets):
    args = [f"data.offline.path={datasets['pairs']}", "recipe=tiny_diffusion_dpo", "trainer.max_steps=2",
            "trainer.eval_every=0", "trainer.checkpoint_every=1", "data.offline.rows_per_iteration=8",
            "trainer.train_batch_size=2", *QUIET]
    one = tmp_path / "one"
    assert run_cli("train", f"run_dir={one}", *args, cwd=tmp_path, env={"OMP_NUM_THREADS": "1"}).returncode == 0
    two = tmp_path / "two"
    proc = run_inprocess("train", f"run_dir={two}", *args, "launcher.nproc_per_node=2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    m1, m2 = _metrics(one), _metrics(two)
    assert m1[0]["policy_loss"] == pytest.approx(m2[0]["policy_loss"], rel=1e-5)
    a, b = _weights(one, 2), _weights(two, 2)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.parametrize("method", ["online_dpo", "flow_rwr"])
def test_online_final_image_twins_raise_their_reward(tmp_path, method):
    """Online DPO and Flow-RWR on the tiny task's own rollouts: the eval reward rises by more than its noise."""
    run = tmp_path / "run"
    proc = run_inprocess("train", f"recipe=tiny_{method}", f"run_dir={run}", "trainer.max_steps=30",
                         "trainer.eval_at_start=true", "trainer.eval_every=30", "trainer.checkpoint_every=0", *QUIET,
                         cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evals = [r for r in _metrics(run) if "eval/reward_mean" in r]
    first, last = evals[0]["eval/reward_mean"], evals[-1]["eval/reward_mean"]
    noise = evals[0]["eval/reward_std"] / np.sqrt(16)
    assert last - first > 2 * noise, (method, first, last, noise)


def test_a_missing_or_bad_dataset_is_one_line_before_any_model_loads(tmp_path):
    proc = run_inprocess("train", "recipe=tiny_diffusion_dpo", f"run_dir={tmp_path / 'a'}", cwd=tmp_path)
    assert proc.returncode != 0 and "data.offline.path" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "bad.jsonl").write_text('{"prompt": "p", "winner": "gone.png", "loser": "gone.png"}\n')
    proc = run_inprocess("train", "recipe=tiny_diffusion_dpo", f"data.offline.path={tmp_path / 'bad.jsonl'}",
                         f"run_dir={tmp_path / 'b'}", cwd=tmp_path)
    assert proc.returncode != 0 and "bad.jsonl:1: image" in proc.stderr and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr and "SD3Transformer2DModel" not in proc.stderr  # no model was built
