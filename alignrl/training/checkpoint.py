"""Atomic checkpoints holding the whole training state.

Layout of ``<run_dir>/checkpoints/step_000123/``::

    trainable.safetensors   live trainable parameters (LoRA or the whole denoiser)
    ema.safetensors         EMA shadow of the same parameters (when EMA is on)
    optimizer.pt            optimizer state (torch.save; loaded with weights_only=True)
    lr_scheduler.pt         learning-rate schedule state (idem)
    rng/rank_<r>.pt         RNG states of every rank (python, numpy, torch, device)
    state.json              iteration, counters, sampler / planner / stat-tracker state, world size
    lora/                   the adapter in diffusers' LoRA format (``pipe.load_lora_weights``)
    COMPLETE                written last: a directory without it is not a checkpoint

Everything is written into ``step_000123.tmp/`` first and renamed into place, so a crash while
saving leaves the previous checkpoint untouched; ``latest_checkpoint`` ignores incomplete ones.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from alignrl.errors import CheckpointError

STEP_RE = re.compile(r"^step_(\d+)$")
MARKER = "COMPLETE"


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def is_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / MARKER).is_file() and (path / "state.json").is_file()


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir() if STEP_RE.match(p.name) and is_checkpoint(p)]
    return sorted(found, key=lambda p: int(STEP_RE.match(p.name).group(1)))


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    found = list_checkpoints(ckpt_root)
    return found[-1] if found else None


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """``None``: fresh start. ``auto``: the latest good checkpoint of ``run_dir`` (fresh if none).
    A path: a checkpoint directory, or a run directory (its latest good checkpoint)."""
    if resume in (None, "", "none", "null", False):
        return None
    if str(resume) == "auto":
        return latest_checkpoint(run_dir / "checkpoints")
    path = Path(str(resume)).expanduser()
    if is_checkpoint(path):
        return path
    if path.is_dir():
        found = latest_checkpoint(path / "checkpoints") or latest_checkpoint(path)
        if found is not None:
            return found
    raise CheckpointError(
        f"resume='{resume}' is not a checkpoint (a checkpoints/step_N directory with {MARKER}) "
        f"nor a run directory holding one; use resume=auto or a path such as outputs/<recipe>/<run>/checkpoints/step_000010"
    )


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_python_state(state["python"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_python_state(s):
    version, internal, gauss = s
    return (version, tuple(internal), gauss)


class CheckpointWriter:
    """Writes checkpoints in the two phases multi-process runs need (every rank's RNG, then rank 0)."""

    def __init__(self, run_dir: Path, keep: int = 3):
        self.root = Path(run_dir) / "checkpoints"
        self.keep = int(keep)

    def tmp_dir(self, step: int) -> Path:
        return self.root / (step_dir_name(step) + ".tmp")

    def begin(self, step: int) -> Path:
        """Rank 0: create an empty temporary directory for ``step``."""
        tmp = self.tmp_dir(step)
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "rng").mkdir(parents=True)
        return tmp

    def write_rank_rng(self, step: int, rank: int) -> None:
        torch.save(rng_state(), self.tmp_dir(step) / "rng" / f"rank_{rank}.pt")

    def commit(self, step: int) -> Path:
        """Rank 0, after every file is written: mark complete, rename into place, prune old ones."""
        tmp = self.tmp_dir(step)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        (tmp / MARKER).write_text("ok\n")
        final = self.root / step_dir_name(step)
        old = None
        if final.exists():  # re-saving a step: move the old copy aside, drop it once the new one is in place
            old = final.with_name(final.name + ".old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self.prune()
        return final

    def prune(self) -> None:
        if self.keep <= 0:
            return
        for old in list_checkpoints(self.root)[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)


def load_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def torch_load_trusted(path: Path):
    """Load a file this program wrote (optimizer/scheduler/RNG state): tensors and plain types only."""
    return torch.load(path, map_location="cpu", weights_only=True)
