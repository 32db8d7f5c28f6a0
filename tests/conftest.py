import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_sd3():
    from alignrl.backbones.sd3 import SD3Backbone

    return SD3Backbone.tiny()


@pytest.fixture(scope="session")
def tiny_flux():
    from alignrl.backbones.flux import FluxBackbone

    return FluxBackbone.tiny()


def run_cli(*args, cwd=None, env=None, timeout=600):
    """Run the real console script; returns CompletedProcess with text output."""
    exe = Path(sys.executable).with_name("alignrl")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "alignrl.cli"]
    # HF_HUB_OFFLINE: a hub id that is not cached fails at once instead of retrying the network
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", **(env or {}))
    return subprocess.run(cmd + list(args), cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


# Small, fast overrides for end-to-end CLI runs of the tiny recipe.
FAST = [
    "trainer.max_steps=2", "data.groups_per_iteration=2", "algorithm.group_size=4",
    "trainer.rollout_batch_size=4", "trainer.train_batch_size=4", "trainer.updates_per_iteration=2",
    "sampler.num_steps=4", "sampler.eval_num_steps=4", "eval.num_prompts=4", "logger.progress_bar=false",
    "trainer.eval_every=0", "trainer.log_images_every=0", "trainer.checkpoint_every=0",
]
