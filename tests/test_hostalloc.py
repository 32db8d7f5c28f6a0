"""trainer.host_allocator: glibc's malloc keeps an activation-sized freed block for reuse when tuned (the CPU
default), and hands it back to the system under its own settings. That the Trainer and the sampling commands apply
it is checked on the default recipe's run through the console script and on `alignrl sample` (tests/test_train.py)."""

import json
import subprocess
import sys

import pytest

from conftest import REPO

def _why_skip() -> str | None:
    import ctypes

    from alignrl.hostalloc import _why_not

    reason = _why_not()  # not glibc, another allocator preloaded, or the environment's own thresholds
    if reason is None and not hasattr(ctypes.CDLL(None), "mallinfo2"):
        reason = "glibc older than 2.33 (no mallinfo2 to read the heap with)"
    return reason


glibc = pytest.mark.skipif(_why_skip() is not None, reason=f"the setting changes nothing here: {_why_skip()}")

# In a fresh process: tune(mode, device), then malloc and free a 24 MiB block (above glibc's starting mmap threshold
# of 128 KiB, below the tuned 32 MiB) and report where it lived (mallinfo2: hblkhd = bytes in mmapped blocks) and how
# much free memory the heap kept after the free (fordblks).
PROBE = r"""
import ctypes, json, sys
from alignrl import hostalloc

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                                "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
line = hostalloc.tune(sys.argv[1], sys.argv[2])
before = libc.mallinfo2()
block = libc.malloc(24 << 20)
ctypes.memset(block, 1, 24 << 20)  # touched, as a tensor's buffer is
during = libc.mallinfo2()
libc.free(block)
after = libc.mallinfo2()
print(json.dumps({"line": line, "mmapped": during.hblkhd - before.hblkhd, "kept_free": after.fordblks}))
"""


def _probe(mode: str, device: str, **env) -> dict:
    import os

    out = subprocess.run([sys.executable, "-c", PROBE, mode, device], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, **env}, check=True)
    return json.loads(out.stdout)


@glibc
@pytest.mark.parametrize("mode, device", [("auto", "cpu"), ("tuned", "cuda")])
def test_tuned_malloc_reuses_an_activation_sized_block_from_the_heap(mode, device):
    got = _probe(mode, device)
    assert got["line"].startswith("host allocator: tuned")
    assert got["mmapped"] == 0  # served from the heap, not a fresh mapping
    assert got["kept_free"] >= 24 << 20  # and kept there after the free, for the next forward


@glibc
@pytest.mark.parametrize("mode, device", [("default", "cpu"), ("auto", "cuda")])
def test_glibcs_own_settings_map_the_block_afresh(mode, device):
    got = _probe(mode, device)
    assert got["line"] == "host allocator: glibc's defaults"
    assert got["mmapped"] >= 24 << 20


@glibc
def test_a_users_own_malloc_settings_are_left_alone():
    got = _probe("tuned", "cpu", MALLOC_ARENA_MAX="2", MALLOC_TRIM_THRESHOLD_="131072")
    assert got["line"] == "host allocator: left as it is (the environment sets glibc's malloc (MALLOC_TRIM_THRESHOLD_))"
    assert got["mmapped"] >= 24 << 20  # glibc's threshold: the user's trim setting fixes it at 128 KiB


def test_an_unknown_setting_is_refused_before_anything_loads():
    from alignrl.config import compose
    from alignrl.errors import ConfigError
    from alignrl.training.trainer_config import TrainerConfig

    with pytest.raises(ConfigError, match="trainer.host_allocator='fast' is not known; use auto"):
        TrainerConfig.from_config(compose(["trainer.host_allocator=fast"]).trainer)
