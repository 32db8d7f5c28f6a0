import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub id that is not cached fails at once (in-process runs too)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Runs that name no recipe use the tiny random SD3 one (seconds) even where a user's environment names another
# default; tests of the default itself remove this (tests/test_shapes.py).
os.environ["ALIGNRL_DEFAULT_RECIPE"] = "tiny_flowgrpo"
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs one worker per core: one thread each, children too
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parent.parent

# `make test` hands whole files to its workers (--dist loadfile) in collection order (--no-loadscope-reorder); the
# slowest files go first so that none starts alone at the end while the other worker idles. Seconds per file, the
# tests' summed wall-clock in a 2-worker run (1,197 tests in 697 s, 2026-12-05 evening); every other file follows, in
# name order.
SLOW_FILES = {"test_slurm.py": 165, "test_offline.py": 125, "test_plans.py": 105, "test_zero.py": 96, "test_train.py": 93,
              "test_wan.py": 67, "test_export.py": 61, "test_reward_gradient.py": 57, "test_new_methods.py": 57,
              "test_shapes_models.py": 56, "test_shapes.py": 56, "test_procs.py": 46, "test_train_multiprocess.py": 45,
              "test_trainer_inprocess.py": 44, "test_fsdp.py": 40, "test_recipes.py": 33, "test_reward_server.py": 28,
              "test_plan.py": 23, "test_datagen.py": 20, "test_shapes_seg.py": 16, "test_early_stop.py": 15}


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: -SLOW_FILES.get(item.path.name, 0))  # stable: a file's own order is kept


@pytest.fixture(scope="session")
def tiny_sd3():
    from alignrl.backbones.sd3 import SD3Backbone

    return SD3Backbone.tiny()


@pytest.fixture(scope="session")
def tiny_flux():
    from alignrl.backbones.flux import FluxBackbone

    return FluxBackbone.tiny()


def run_inprocess(*args, cwd=None, env=None, threads: int | None = None):
    """Run ``alignrl <args>`` through the console script's own entry point in this process (no interpreter start
    and imports: seconds faster); returns a CompletedProcess like ``run_cli``. For tests that need no process of
    their own (signals, several processes and a terminal-less stderr do). ``threads``: torch's intra-op threads for
    the run (1: the reduction order of a launcher's worker, for 1-vs-N-process comparisons), restored after."""
    import contextlib
    import io
    import traceback

    from accelerate.state import AcceleratorState

    from alignrl.cli import main

    AcceleratorState._reset_state()  # a process-wide singleton: each run sets its own
    out, err = io.StringIO(), io.StringIO()
    old_cwd, old_env, old_argv = os.getcwd(), dict(os.environ), list(sys.argv)
    old_threads = torch.get_num_threads()
    code = 0
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        os.chdir(cwd or old_cwd)
        os.environ.update(env or {})
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(list(args))
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:  # what the console script would die with: a traceback and exit status 1
                traceback.print_exc()
                code = 1
    finally:
        torch.set_num_threads(old_threads)
        os.chdir(old_cwd)
        os.environ.clear()
        os.environ.update(old_env)
        sys.argv[:] = old_argv
    return subprocess.CompletedProcess(["alignrl", *args], code, out.getvalue(), err.getvalue())


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
    "sampler.num_steps=4", "sampler.eval_num_steps=4", "eval.num_prompts=4", "logger.progress_bar=false", "logger.plots=false",
    "trainer.eval_every=0", "trainer.log_images_every=0", "trainer.checkpoint_every=0",
]


def _font(size):
    for path in ("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        if Path(path).is_file():
            return ImageFont.truetype(path, size)
    found = sorted(Path("/usr/share/fonts").rglob("*.ttf")) if Path("/usr/share/fonts").is_dir() else []
    return ImageFont.truetype(str(found[0]), size) if found else ImageFont.load_default(size=size)


def render_text(text, h=128, w=320, size=52):
    """Black text on white, (3, h, w) floats in [0, 1] (OCR reward tests)."""
    im = Image.new("RGB", (w, h), "white")
    ImageDraw.Draw(im).text((w // 2, h // 2), text, fill="black", font=_font(size), anchor="mm")
    return torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255


def running_server(reward, **options):
    """The reward served on a free loopback port from a thread of this process (yields its URL)."""
    from alignrl.rewards.server import serve_in_background

    return serve_in_background(reward, **options)


def free_port() -> int:
    """A TCP port nobody listens on right now (for servers and dead-server checks)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
