"""`alignrl eval` / `sample` on a checkpoint reuse the run's config (backbone, sampler, rewards, eval prompts),
apply only what the command line names, and write into the run directory."""

import json
from pathlib import Path

import pytest

from alignrl.cli import main as cli
from conftest import FAST


def _train(run: Path, *overrides):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    cli(["train", f"run_dir={run}", *FAST, *overrides])


def _only_eval_dir(run: Path, command: str) -> Path:
    found = sorted((run / "eval").glob(f"{command}-step_000002-*"))
    assert found, list((run / "eval").iterdir()) if (run / "eval").is_dir() else "no eval dir"
    return found[-1]


def test_eval_of_a_flux_run_uses_its_sampler_rewards_and_prompts(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    prompts = tmp_path / "held_out.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("a red cat", "a blue boat", "a tree")))
    run = tmp_path / "flux_run"
    _train(run, "recipe=tiny_flowgrpo_flux", f"data.eval={prompts}", "sampler.eval_num_steps=3", "eval.num_prompts=null",
           "reward=jpeg_incompressibility")
    cli(["eval", f"eval.checkpoint={run}"])  # the README's example: nothing else named
    out = _only_eval_dir(run, "eval")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ode_steps"] == 3 and metrics["eval/num_images"] == 3
    assert metrics["prompts"] == str(prompts) and metrics["reward"] == "jpeg_incompressibility"
    assert "flux" in metrics["backbone"] and "(ema weights)" in metrics["model"]
    assert not (tmp_path / "outputs").exists()  # no stray run directory of the default recipe
    # the command line wins where it speaks: a key, and a whole group
    cli(["eval", f"eval.checkpoint={run / 'checkpoints' / 'step_000002'}", "sampler.eval_num_steps=2",
         "reward=jpeg_compressibility", "eval.weights=live", f"eval.out_dir={tmp_path / 'ev2'}"])
    metrics = json.loads((tmp_path / "ev2" / "metrics.json").read_text())
    assert metrics["ode_steps"] == 2 and metrics["reward"] == "jpeg_compressibility"
    assert "(live weights)" in metrics["model"]
    cli(["sample", f"eval.checkpoint={run}", "sample.prompts=[a red cat]", "sample.num_images=1"])
    rows = [json.loads(x) for x in (_only_eval_dir(run, "sample") / "prompts.jsonl").read_text().splitlines()]
    assert rows[0]["prompt"] == "a red cat" and isinstance(rows[0]["seed"], int)
    assert "3 ODE steps" in capsys.readouterr().err  # the run's eval sampler

    with pytest.raises(SystemExit) as e:
        cli(["eval", f"eval.checkpoint={tmp_path / 'nowhere'}"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "eval.checkpoint=" in err and "resume=" not in err, err


def test_a_run_on_real_weights_follows_moved_weights_and_dtype(tmp_path, monkeypatch, capsys):
    """A run that loaded a model with from_pretrained (here a tiny pipeline saved to disk): its weights moved,
    `backbone.pretrained=<new place>` finds them; `backbone.dtype=` takes effect."""
    monkeypatch.chdir(tmp_path)
    weights = tmp_path / "weights"
    cli(["export", f"out={weights}"])  # the tiny SD3 base pipeline, as a user's local diffusers directory
    run = tmp_path / "run"
    _train(run, "backbone=sd35_medium", f"backbone.pretrained={weights}", "backbone.resolution=64",
           "backbone.max_sequence_length=32", "backbone.dtype=fp32", "trainer.device=cpu", "trainer.mixed_precision=no")
    moved = weights.rename(tmp_path / "moved")
    with pytest.raises(SystemExit):
        cli(["eval", f"eval.checkpoint={run}"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "backbone.pretrained" in err and str(weights) in err, err
    cli(["eval", f"eval.checkpoint={run}", f"backbone.pretrained={moved}", "backbone.dtype=bf16",
         f"eval.out_dir={tmp_path / 'ev'}"])
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert "bfloat16" in metrics["backbone"] and metrics["eval/num_images"] == 4


def test_building_a_model_on_cuda_turns_cudnn_attention_off_unless_asked(monkeypatch):
    """cuDNN's fused attention gave NaN gradients on the tiny FLUX (H200, torch 2.11): every command that builds a
    model on CUDA sets it from trainer.cudnn_attention (default off); on the CPU it is left alone."""
    import torch

    from alignrl.components import _attention_kernels
    from alignrl.config import compose

    calls = []
    monkeypatch.setattr(torch.backends.cuda, "enable_cudnn_sdp", calls.append)
    _attention_kernels(compose(["recipe=tiny_flowgrpo"]), torch.device("cpu"))
    assert calls == []
    _attention_kernels(compose(["recipe=tiny_flowgrpo"]), "cuda")
    _attention_kernels(compose(["recipe=tiny_flowgrpo", "trainer.cudnn_attention=true"]), torch.device("cuda", 0))
    assert calls == [False, True]
