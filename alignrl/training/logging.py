"""Metrics: a JSONL file always, wandb when asked (offline works without an account), a console
progress bar with ETA and the key metrics."""

from __future__ import annotations

import json
import math
import os
import sys
import uuid
from pathlib import Path

from tqdm.auto import tqdm

from alignrl.errors import ConfigError
from alignrl.training.checkpoint import atomic_write_text


def _clean(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricsLogger:
    def __init__(self, run_dir: Path, cfg_logger: dict, resolved_config: dict, enabled: bool, total_steps: int,
                 start_step: int, run_name: str):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.wandb = None
        self.bar = None
        if not enabled:
            return
        self._drop_rows_after(start_step)
        kind = cfg_logger.get("kind", "jsonl")
        if kind not in ("jsonl", "wandb"):
            raise ConfigError(f"unknown logger kind '{kind}'; use logger=jsonl or logger=wandb")
        if kind == "wandb":
            self._init_wandb(Path(run_dir), cfg_logger, resolved_config, run_name)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="it", dynamic_ncols=True,
                        file=sys.stderr, mininterval=1.0, disable=cfg_logger.get("progress_bar", True) is False)

    def _drop_rows_after(self, step: int) -> None:
        """A resumed run repeats the steps after its checkpoint: drop their rows from a run that died
        after logging them, so metrics.jsonl holds each step once."""
        if not self.path.is_file():
            return

        def kept(line: str) -> bool:
            if step <= 0:
                return False  # a restart from scratch logs everything again, step 0 included
            try:
                row = json.loads(line)
            except ValueError:
                return False  # a line cut short by a crash
            return isinstance(row, dict) and row.get("step", 0) <= step

        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        keep = [ln if ln.endswith("\n") else ln + "\n" for ln in lines if ln.strip() and kept(ln)]
        if keep != lines:
            atomic_write_text(self.path, "".join(keep))

    def _init_wandb(self, run_dir: Path, cfg: dict, resolved: dict, run_name: str):
        import wandb

        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id)
        mode = cfg.get("mode") or os.environ.get("WANDB_MODE") or "offline"
        self.wandb = wandb.init(
            project=cfg.get("project", "alignrl"), entity=cfg.get("entity"), name=run_name, id=run_id,
            resume="allow", dir=str(run_dir), config=resolved, mode=mode, tags=list(cfg.get("tags") or []),
        )

    def log(self, step: int, metrics: dict, images: dict | None = None) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            payload = dict(row)
            if images:
                import wandb

                payload.update({k: wandb.Image(str(v)) for k, v in images.items()})
            self.wandb.log(payload, step=step)

    def progress(self, step: int, metrics: dict) -> None:
        if self.bar is None:
            return
        keys = [("reward", "reward_mean"), ("kl", "kl"), ("clip", "clipfrac"), ("lr", "lr")]
        post = {}
        for short, key in keys:
            v = metrics.get(key)
            if v is not None:
                post[short] = f"{v:.3g}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(step - self.bar.n)

    def write(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
