"""CUDA paths (they skip on a machine without a GPU, as CI is): every built-in backbone family trains and evaluates
on the GPU in its recipe's precision and in bf16 and fp16 mixed precision, the compiled denoiser matches the eager
one, and a `distributed=fsdp` full fine-tune on one GPU resumes from its sharded (DCP) checkpoint (one process:
nothing is sharded, but the checkpoint is written and read in the sharded layout, from CUDA tensors)."""

import json
import math

import pytest
import torch

from conftest import run_inprocess
from test_train import _metrics, _weights

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")

SHORT = ["trainer.device=cuda", "trainer.max_steps=2", "logger.progress_bar=false", "logger.plots=false",
         "trainer.log_images_every=0", "trainer.checkpoint_every=2", "trainer.eval_every=0"]


def _train_and_eval(tmp_path, recipe: str, *extra: str):
    run = tmp_path / "run"
    proc = run_inprocess("train", f"recipe={recipe}", f"run_dir={run}", *SHORT, *extra, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [r for r in _metrics(run) if "step" in r]
    assert len(rows) >= 2, rows
    bad = {k: v for r in rows for k, v in r.items() if isinstance(v, float) and not math.isfinite(v)}
    assert not bad, f"non-finite metrics: {bad}"
    out = tmp_path / "eval"
    res = run_inprocess("eval", f"eval.checkpoint={run}", f"eval.out_dir={out}", "eval.num_prompts=2",
                        "logger.progress_bar=false", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    metrics = json.loads(next(out.rglob("metrics.json")).read_text())
    assert metrics, "eval wrote no metrics"
    return run, proc


@pytest.mark.parametrize("recipe,extra", [
    ("tiny_flowgrpo", ["trainer.mixed_precision=bf16"]),  # SD3 (the default's family)
    ("tiny_flowgrpo", ["trainer.mixed_precision=fp16"]),  # fp16 with loss scaling, as the Flow-GRPO SD3 recipes
    ("tiny_flowgrpo", ["backbone.dtype=bf16", "trainer.mixed_precision=bf16"]),  # a bf16 LoRA base
    ("tiny_flowgrpo_flux", ["trainer.mixed_precision=bf16"]),
    ("tiny_flowgrpo_wan", ["trainer.mixed_precision=bf16"]),
    ("tiny_ddpo", ["trainer.mixed_precision=fp16"]),  # the SD1.5 UNet (epsilon prediction)
    ("tiny_ddpo", ["backbone=tiny_sdxl", "trainer.mixed_precision=bf16"]),
    ("tiny_alignprop", ["trainer.mixed_precision=bf16"]),  # reward gradients through the sampler
    ("tiny_awm", ["trainer.mixed_precision=bf16"]),  # the matching family
    ("shapes_quick", ["trainer.mixed_precision=bf16", "eval.num_prompts=4"]),  # `make run`'s recipe
], ids=["sd3-bf16", "sd3-fp16", "sd3-bf16-weights", "flux", "wan", "sd15-fp16", "sdxl", "alignprop", "awm",
        "shapes_quick"])
def test_trains_and_evaluates_on_cuda(tmp_path, recipe, extra):
    if recipe.endswith("_wan"):
        pytest.importorskip("av", reason="the video eval writes MP4 with PyAV (a dependency; a bare GPU image lacks it)")
    _train_and_eval(tmp_path, recipe, *extra)


def test_compiled_blocks_match_eager_on_cuda():
    from alignrl.components import build_backbone
    from alignrl.config import compose
    from alignrl.training.sharding import shard_units

    bb = build_backbone(compose(["recipe=tiny_flowgrpo"]), torch.device("cuda"))
    g = [torch.Generator().manual_seed(i) for i in range(4)]
    schedule = bb.make_schedule(4)
    x = bb.start_latents(g, schedule).cuda()
    cond = bb.encode_prompts(["a red circle", "two squares", "a photo", "a cat"])
    with torch.no_grad():
        reference = bb.predict(x, schedule.timesteps[1], cond, 1.0)
        for block in shard_units(bb.transformer):
            block.compile(backend="inductor")
        compiled = bb.predict(x, schedule.timesteps[1], cond, 1.0)
    torch.testing.assert_close(compiled, reference, rtol=1e-4, atol=1e-5)


def test_sharded_full_fine_tune_resumes_on_one_gpu(tmp_path):
    """One process: FSDP2 has nothing to shard, so this checks the DCP checkpoint's save and load on CUDA, not the
    sharding itself (that needs two GPUs; tests/test_fsdp.py runs it on two CPU processes)."""
    args = ["recipe=tiny_flowgrpo", "trainer.device=cuda", "trainer.max_steps=2", "trainer.checkpoint_every=1",
            "trainer.eval_every=0", "trainer.log_images_every=0", "logger.progress_bar=false", "logger.plots=false",
            "distributed=fsdp", "trainer.finetune=full", "trainer.mixed_precision=bf16", "algorithm.beta=0.04"]
    whole = run_inprocess("train", f"run_dir={tmp_path / 'whole'}", *args, cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-4000:]
    step1 = tmp_path / "whole" / "checkpoints" / "step_000001"
    resumed = run_inprocess("train", f"run_dir={tmp_path / 'resumed'}", f"resume={step1}", *args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    a, b = _weights(tmp_path / "whole", 2), _weights(tmp_path / "resumed", 2)
    assert a.keys() == b.keys()
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert diff == 0.0, f"resumed weights differ by up to {diff:g}"
