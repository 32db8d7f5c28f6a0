"""`alignrl export` and the checkpoint's LoRA adapter, round-tripped through plain diffusers (and `alignrl eval` on
each run).

Every backbone (SD3, FLUX, ShapeWorld, SD1.5, SDXL) and both fine-tuning modes, with the EMA on (the default): a run is trained, `alignrl sample`
draws images from its checkpoint (EMA weights, and live weights to show that the two differ), `alignrl export`
writes the pipeline, and a separate Python process in which alignrl cannot be imported loads each export with
`DiffusionPipeline.from_pretrained` and samples with the pipeline's own `__call__` from the seeds that
`alignrl sample` recorded. For LoRA runs the exported base pipeline plus `load_lora_weights` (the checkpoint's
`lora/` and the export's) must give the same images.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alignrl.cli import main as cli
from conftest import FAST

CASES = {  # name: recipe overrides (2 iterations x 2 updates, EMA after every update so it differs from live)
    "sd3_full": ["recipe=tiny_flowgrpo"],  # the CPU default: full fine-tune
    "sd3_lora": ["recipe=tiny_flowgrpo", "trainer.finetune=lora", "algorithm.lr=5e-2"],
    "flux_lora": ["recipe=tiny_flowgrpo_flux", "algorithm.lr=5e-2"],
    "flux_full": ["recipe=tiny_flowgrpo_flux", "trainer.finetune=full", "algorithm.lr=1e-2"],
    "shapes_full": ["recipe=shapes_flowgrpo", "algorithm.lr=1e-3", "sampler.eval_num_steps=4"],
    # evaluation with DPM-Solver++(2M): the export ships diffusers' DPMSolverMultistepScheduler and the grid
    "sd15_lora": ["recipe=tiny_ddpo", "trainer.finetune=lora", "algorithm.lr=5e-2", "sampler.eval_solver=dpm2m"],
    "sdxl_full": ["recipe=tiny_ddpo", "backbone=tiny_sdxl", "algorithm.lr=1e-2"],
    # video: the exported WanPipeline (first-order UniPC = alignrl's Euler) and its LoRA; PNGs are filmstrips
    "wan_lora": ["recipe=tiny_flowgrpo_wan", "trainer.finetune=lora", "algorithm.lr=5e-2"],
}
PROMPTS = "sample.prompts=[a red circle, a photo of a blue boat]"
LOADER = r"""
import json, sys
sys.modules["alignrl"] = None  # a machine without alignrl: the exports must load with diffusers alone
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import save_file

jobs = json.loads(sys.argv[1])
out = {}
for job in jobs:
    info = json.load(open(job["export"] + "/alignrl_export.json"))
    remote = info["trust_remote_code"]
    def run(pipe):
        gens = [torch.Generator().manual_seed(s) for s in job["seeds"]]
        if remote:
            return pipe(job["prompts"], generator=gens, **info["call"])
        result = pipe(prompt=job["prompts"], generator=gens, output_type="pt", **info["call"])
        if hasattr(result, "frames"):  # videos (B, F, 3, H, W) as the filmstrips alignrl sample writes
            b, f, c, h, w = result.frames.shape
            return result.frames.permute(0, 2, 3, 1, 4).reshape(b, c, h, f * w)
        return result.images
    out[job["name"] + "/export"] = run(DiffusionPipeline.from_pretrained(job["export"], trust_remote_code=remote))
    for i, lora in enumerate(job.get("loras", [])):
        base = DiffusionPipeline.from_pretrained(job["base"], trust_remote_code=remote)
        base.load_lora_weights(lora)
        out[f"{job['name']}/lora{i}"] = run(base)
    if job.get("base"):
        out[job["name"] + "/base"] = run(DiffusionPipeline.from_pretrained(job["base"], trust_remote_code=remote))
save_file({k: v.float().contiguous() for k, v in out.items()}, sys.argv[2])
"""


def _reset_accelerate():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()


def _images(folder: Path) -> tuple[torch.Tensor, list[dict]]:
    rows = [json.loads(x) for x in (folder / "prompts.jsonl").read_text().splitlines()]
    ims = [torch.from_numpy(np.array(Image.open(folder / r["image"]))).permute(2, 0, 1).float() / 255 for r in rows]
    return torch.stack(ims), rows


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Train, sample (EMA and live), export each case in-process through the CLI; load the exports elsewhere."""
    root = tmp_path_factory.mktemp("export")
    fast = [a for a in FAST if not a.startswith("sampler.eval_num_steps")] + ["sampler.eval_num_steps=4",
                                                                              "trainer.ema.update_every=1"]
    results, jobs = {}, []
    for name, overrides in CASES.items():
        run = root / name
        _reset_accelerate()
        cli(["train", f"run_dir={run}", *fast, *overrides])
        samples = {}
        for weights in ("ema", "live"):
            folder = root / f"{name}_{weights}"
            cli(["sample", f"eval.checkpoint={run}", f"eval.out_dir={folder}", f"eval.weights={weights}", PROMPTS,
                 "sample.num_images=2", "sampler.eval_num_steps=4"])
            samples[weights] = _images(folder)
        cli(["eval", f"eval.checkpoint={run}", f"eval.out_dir={root / (name + '_eval')}", "eval.num_prompts=2",
             "sampler.eval_num_steps=4"])  # alignrl eval on every backbone's run
        cli(["export", f"checkpoint={run}", f"out={root / (name + '_export')}"])
        job = {"name": name, "export": str(root / (name + "_export")),
               "prompts": [r["prompt"] for r in samples["ema"][1]], "seeds": [r["seed"] for r in samples["ema"][1]]}
        lora = "trainer.finetune=lora" in overrides or name == "flux_lora"
        if lora or name == "shapes_full":  # the base model as a pipeline of its own (no checkpoint)
            cli(["export", *[o for o in overrides if o.startswith(("recipe=", "sampler.eval_solver="))],
                 f"out={root / (name + '_base')}",
                 "sampler.eval_num_steps=4"])
            job["base"] = str(root / (name + "_base"))
        if lora:
            job["loras"] = [str(run / "checkpoints" / "step_000002" / "lora"), job["export"] + "/lora"]
        jobs.append(job)
        results[name] = samples
    out_file = root / "pipelines.safetensors"
    proc = subprocess.run([sys.executable, "-c", LOADER, json.dumps(jobs), str(out_file)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    return results, load_file(str(out_file)), root


PNG = 1.01 / 255  # alignrl sample writes PNGs: values are rounded to 1/255


@pytest.mark.parametrize("name", list(CASES))
def test_exported_pipeline_reproduces_alignrl_sample(exported, name):
    results, pipelines, root = exported
    ema, rows = results[name]["ema"]
    live, _ = results[name]["live"]
    assert (live - ema).abs().max() > 4 / 255, "EMA and live weights sample alike: the test could not tell them apart"
    theirs = pipelines[f"{name}/export"]
    assert (theirs - ema).abs().max() <= PNG, (theirs - ema).abs().max() * 255
    if f"{name}/base" in pipelines:  # the base pipeline exports too, and it is not the trained one
        assert (pipelines[f"{name}/base"] - ema).abs().max() > 4 / 255
    info = json.loads((root / f"{name}_export" / "alignrl_export.json").read_text())
    assert info["weights"] == "ema" and info["step"] == 2
    assert all("seed" in r for r in rows)
    if name == "sd15_lora":
        scheduler = json.loads((root / f"{name}_export" / "scheduler" / "scheduler_config.json").read_text())
        assert scheduler["_class_name"] == "DPMSolverMultistepScheduler" and len(info["call"]["timesteps"]) == 4
    if name == "sd3_full":  # a full fine-tune's denoiser in diffusers' layout: loads strictly on its own
        from diffusers import SD3Transformer2DModel

        SD3Transformer2DModel.from_pretrained(str(root / f"{name}_export"), subfolder="transformer")


@pytest.mark.parametrize("name", list(CASES))
def test_eval_runs_on_every_backbone(exported, name):
    _, _, root = exported
    out = root / f"{name}_eval"
    sets = ["held_out", "in_dist"] if name.startswith("shapes") else [None]  # ShapeWorld evaluates two sets
    for split in sets:
        folder, key = (out / split, f"eval/{split}/") if split else (out, "eval/")
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics[key + "num_images"] == 2 and np.isfinite(metrics[key + "reward_mean"])
        assert "step_000002" in metrics["model"] and (folder / "grid.png").is_file()
    if name.startswith("wan"):  # a video backbone's eval writes MP4s that decode back to its frames
        from alignrl.eval.video import read_mp4

        frames, fps = read_mp4(out / "videos" / "000.mp4")
        assert frames.shape == (5, 32, 32, 3) and fps == 16 and frames.std() > 1
        assert (out / "videos" / "001.gif").stat().st_size > 0 and "videos/000.mp4" in (out / "summary.md").read_text()


@pytest.mark.parametrize("name", [n for n in CASES if "lora" in n])
def test_lora_adapters_hold_the_ema_weights(exported, name):
    """The checkpoint's lora/ (written during training) and the export's lora/ on the base pipeline give the
    EMA policy's images, not the live weights' ones."""
    results, pipelines, _ = exported
    ema, _ = results[name]["ema"]
    live, _ = results[name]["live"]
    for i, where in enumerate(("checkpoint", "export")):
        got = pipelines[f"{name}/lora{i}"]
        assert (got - ema).abs().max() <= PNG, (where, float((got - ema).abs().max() * 255))
        assert (got - live).abs().max() > 4 / 255, where


def test_export_refuses_a_non_empty_directory_before_loading(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = subprocess.run([str(Path(sys.executable).with_name("alignrl")), "export", f"out={out}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not an empty directory" in proc.stderr, proc.stderr
    assert (out / "keep.txt").read_text() == "mine"
