"""``alignrl export checkpoint=<run or checkpoint> out=<dir> [weights=ema|live]``.

Writes a standalone diffusers pipeline with the chosen weights merged into the denoiser
(``DiffusionPipeline.from_pretrained(out)`` loads it without alignrl), plus, for LoRA runs, the adapter in
diffusers' LoRA format (``out/lora/``, for ``pipe.load_lora_weights`` on the base model). Without a
checkpoint it exports the base model of the composed recipe (the tiny and ShapeWorld models included).
Everything is written into a temporary sibling directory and renamed into place at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig

from alignrl.errors import ConfigError

README = """# {title}

Exported by `alignrl export` from {source}.

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{out}"{remote})
images = pipe({prompt_arg}, generator=[torch.Generator().manual_seed(s) for s in seeds],
              {call})
```

`seeds`: the `seed` column of the `prompts.jsonl` that `alignrl sample` writes beside its images; with these
arguments the pipeline's own sampling loop reproduces those images (`alignrl_export.json` holds the same
settings).{lora}
"""


def _check_out(out: str | None) -> Path:
    if not out:
        raise ConfigError("export needs out=<directory> (it must not exist yet, or be empty)")
    path = Path(str(out)).expanduser()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError(f"out='{out}' exists and is not an empty directory; choose a new one (nothing is overwritten)")
    if not os.access(path.parent if path.parent.exists() else Path("."), os.W_OK):
        raise ConfigError(f"out='{out}': its parent directory is not writable; choose another place")
    return path


def export(cfg: DictConfig) -> int:
    from alignrl.components import build_planner
    from alignrl.policy import is_lora, load_policy, merge_lora, run_source
    from alignrl.training.lora import lora_export

    ecfg = cfg.get("export") or {}
    out = _check_out(ecfg.get("out")).resolve()
    weights = str(ecfg.get("weights", "ema"))
    from hydra.core.hydra_config import HydraConfig

    source = run_source(cfg, ecfg.get("checkpoint"), list(HydraConfig.get().overrides.task), key="checkpoint")
    cfg = source.cfg
    plan = build_planner(cfg).eval_plan()
    device = torch.device(str(ecfg.get("device", "cpu")))
    backbone, model = load_policy(source, device, weights)
    lora = is_lora(backbone)

    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        if lora:  # the adapter first, from the adapter layers (merging removes them)
            state, meta = lora_export(backbone.transformer)
            backbone.save_lora(str(tmp / "lora"), state, meta)
        merge_lora(backbone)
        solver = plan.name  # ode or dpm2m (an evaluation plan)
        if solver not in backbone.export_solvers:
            print(f"alignrl: warning: the run evaluates with sampler.eval_solver={solver}; the exported {backbone.family} "
                  f"pipeline samples with its own scheduler ({', '.join(backbone.export_solvers)})", file=sys.stderr)
            solver = "ode"
        backbone.save_pipeline(str(tmp), solver=solver)
        call = backbone.pipeline_call_kwargs(plan.num_steps, plan.guidance_scale, solver=solver)
        remote = backbone.remote_code
        info = {
            "source": model, "checkpoint": str(source.checkpoint.resolve()) if source.checkpoint else None,
            "step": source.step, "weights": weights if source.checkpoint else None, "backbone": backbone.family,
            "finetune": "lora" if lora else ("full" if source.checkpoint else None), "call": call,
            "seed": int(cfg.seed), "lora": "lora" if lora else None, "trust_remote_code": remote,
            "seeds": "alignrl sample's image k (prompt i, image j: k = i * sample.num_images + j) starts from "
                     "torch.Generator().manual_seed(s) with s its 'seed' in prompts.jsonl",
        }
        (tmp / "alignrl_export.json").write_text(json.dumps(info, indent=2) + "\n")
        (tmp / "README.md").write_text(README.format(
            title=f"{backbone.family} pipeline", source=model, out=out,
            remote=", trust_remote_code=True" if remote else "",
            prompt_arg="prompt=prompts" if not remote else "prompts",
            call=", ".join(f"{k}={v!r}" for k, v in call.items()),
            lora="\n\nThe adapter alone (diffusers' LoRA format) is in `lora/`: "
                 "`base_pipe.load_lora_weights(\"<this dir>/lora\")`." if lora else ""))
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    what = "pipeline" + (" + LoRA adapter (lora/)" if lora else "")
    print(f"alignrl: exported {what} from {model} to {out}", file=sys.stderr)
    return 0
