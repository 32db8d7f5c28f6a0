"""End-to-end training on the tiny models: learning, exact resume, preemption, export, eval, 2 processes."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from conftest import FAST, run_cli, run_inprocess


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run: Path, step: int, name: str = "trainable") -> dict:
    return load_file(str(run / "checkpoints" / f"step_{step:06d}" / f"{name}.safetensors"))


def _sigterm_after_first_step(run: Path, args: list, cwd: Path) -> str:
    """Start `alignrl train`, SIGTERM it once the first iteration is logged; check it stopped cleanly.

    Returns its stderr."""
    exe = Path(sys.executable).with_name("alignrl")
    p = subprocess.Popen([str(exe), "train", f"run_dir={run}", *args], cwd=cwd,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text()):
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "preempted" and 1 <= status["step"] < 8, status
    return err


def test_default_recipe_raises_the_reward(tmp_path):
    """`alignrl train` as the README runs it (tiny SD3, JPEG compressibility) must visibly learn."""
    run = tmp_path / "run"
    proc = run_cli("train", f"run_dir={run}", "logger.progress_bar=false", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _metrics(run)
    rewards = np.array([r["reward_mean"] for r in rows])
    k = max(3, len(rewards) // 5)
    first, last = rewards[:k].mean(), rewards[-k:].mean()
    spread = np.mean([r["reward_std"] for r in rows[:k]])
    assert last - first > 1.5 * spread, (first, last, spread)  # a clear gain, not noise
    evals = [r for r in rows if "eval/reward_mean" in r]
    assert len(evals) >= 2 and evals[-1]["eval/reward_mean"] > evals[0]["eval/reward_mean"]
    assert (run / "samples").is_dir() and list((run / "eval").glob("*.png"))
    from alignrl.hostalloc import _why_not  # on the CPU (auto): glibc's malloc tuned before the model was built

    expected = "tuned (glibc" if _why_not() is None else f"left as it is ({_why_not()})"
    assert f"alignrl: host allocator: {expected}" in (run / "alignrl.log").read_text()


def test_resume_is_exact_and_sigterm_checkpoints(tmp_path):
    args = [*FAST, "trainer.max_steps=5", "trainer.checkpoint_every=0"]
    straight = tmp_path / "straight"
    proc = run_inprocess("train", f"run_dir={straight}", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # k steps, stop, resume to N (the runs in this process; the SIGTERM case below resumes in a new one)
    split = tmp_path / "split"
    assert run_inprocess("train", f"run_dir={split}", *args, "trainer.max_steps=2", cwd=tmp_path).returncode == 0
    refused = run_inprocess("train", f"run_dir={split}", *args, cwd=tmp_path)
    assert refused.returncode != 0 and "resume=auto" in refused.stderr  # never silently overwrites
    proc = run_inprocess("train", f"run_dir={split}", *args, "resume=auto", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _weights(straight, 5), _weights(split, 5)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ea, eb = _weights(straight, 5, "ema"), _weights(split, 5, "ema")
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    # the resumed run logged steps 3..5 and its metrics equal the straight run's
    ra = {r["step"]: r["reward_mean"] for r in _metrics(straight)}
    rb = {r["step"]: r["reward_mean"] for r in _metrics(split)}
    assert sorted(rb) == list(range(1, 6)) and all(ra[s] == rb[s] for s in ra)

    # SIGTERM mid-run: checkpoint at the end of the current step, clean exit, resume to the same weights
    pre = tmp_path / "preempted"
    assert "signal SIGTERM" in _sigterm_after_first_step(pre, args, tmp_path)
    proc = run_inprocess("train", f"run_dir={pre}", *args, "resume=auto", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    c = _weights(pre, 5)
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert json.loads((pre / "status.json").read_text())["state"] == "finished"


def test_lora_export_loads_in_diffusers_and_reproduces_policy(tmp_path):
    run = tmp_path / "run"
    proc = run_inprocess("train", f"run_dir={run}", *FAST, "trainer.max_steps=2", "trainer.ema.enabled=false",
                   "trainer.finetune=lora", "algorithm.lr=3e-2",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lora_dir = run / "checkpoints" / "step_000002" / "lora"
    assert (lora_dir / "pytorch_lora_weights.safetensors").is_file()

    from alignrl.backbones.sd3 import SD3Backbone, build_tiny_sd3_pipeline
    from alignrl.sampling.engine import rollout, sample_generators
    from alignrl.sampling.plans import ode_plan
    from alignrl.training.lora import load_trainable_file, setup_trainable

    # our policy: base + trained adapter
    ours = SD3Backbone.tiny()
    names = setup_trainable(ours, "lora", {"rank": 8, "alpha": 8, "init": "gaussian"})
    load_trainable_file(ours.transformer, names, run / "checkpoints" / "step_000002" / "trainable.safetensors")
    prompts = ["a photo of a red cat", "a photo of a blue boat"]
    cond = ours.encode_prompts(prompts)
    mine = rollout(ours, ode_plan(6, 4.5), cond, sample_generators(0, 0, range(2))).final

    # diffusers: the same base weights, the exported adapter, the pipeline's own loop
    pipe = build_tiny_sd3_pipeline()
    base_out = pipe(prompt=prompts, latents=ours.initial_noise(sample_generators(0, 0, range(2))),
                    num_inference_steps=6, guidance_scale=4.5, output_type="latent", height=64, width=64,
                    max_sequence_length=32).images
    pipe.load_lora_weights(str(lora_dir))
    theirs = pipe(prompt=prompts, latents=ours.initial_noise(sample_generators(0, 0, range(2))),
                  num_inference_steps=6, guidance_scale=4.5, output_type="latent", height=64, width=64,
                  max_sequence_length=32).images
    assert not torch.allclose(base_out, theirs, atol=1e-4)  # the adapter changes the samples
    assert torch.allclose(mine, theirs, atol=1e-4), (mine - theirs).abs().max()


def test_eval_and_sample_commands(tmp_path):
    run = tmp_path / "run"
    assert run_inprocess("train", f"run_dir={run}", *FAST, cwd=tmp_path).returncode == 0
    out = tmp_path / "ev"
    proc = run_inprocess("eval", f"eval.checkpoint={run}", f"eval.out_dir={out}", "eval.num_prompts=4",
                   "sampler.eval_num_steps=4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval/num_images"] == 4 and np.isfinite(metrics["eval/reward_mean"])
    assert "step_000002" in metrics["model"] and "ema" in metrics["model"]
    assert (out / "grid.png").is_file() and "eval/reward_mean" in (out / "summary.md").read_text()
    base = tmp_path / "base"
    proc = run_inprocess("eval", f"eval.out_dir={base}", "eval.num_prompts=4", "sampler.eval_num_steps=4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((base / "metrics.json").read_text())["model"] == "base model"
    samples = tmp_path / "samples"
    proc = run_inprocess("sample", f"eval.checkpoint={run}", f"eval.out_dir={samples}", "sample.prompts=[a red cat]",
                   "sample.num_images=2", "sampler.eval_num_steps=4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in samples.glob("*.png")) == ["000_00.png", "000_01.png", "grid.png"]
    from alignrl.hostalloc import _why_not  # sampling sets it as training does

    expected = "tuned (glibc" if _why_not() is None else f"left as it is ({_why_not()})"
    assert f"alignrl: host allocator: {expected}" in proc.stderr
    index = [json.loads(x) for x in (samples / "prompts.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "seed"} for r in index] == \
        [{"image": "000_00.png", "prompt": "a red cat"}, {"image": "000_01.png", "prompt": "a red cat"}]
    assert len({r["seed"] for r in index}) == 2  # each image its own noise seed


def test_tiny_flux_recipe_and_wandb_offline(tmp_path):
    run = tmp_path / "run"
    proc = run_inprocess("train", "recipe=tiny_flowgrpo_flux", f"run_dir={run}", *FAST, "logger=wandb",
                   "trainer.eval_every=2", cwd=tmp_path, env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _metrics(run)
    assert len(rows) == 2 and "eval/reward_mean" in rows[-1]
    assert (run / "wandb").is_dir() and (run / "wandb_run_id").is_file()
    cfg = (run / "config.yaml").read_text()
    assert "FluxBackbone" in cfg
