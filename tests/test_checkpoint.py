"""Checkpoint atomicity, discovery and the EMA."""

import pytest
import torch

from alignrl.errors import CheckpointError
from alignrl.training import checkpoint as ckpt
from alignrl.training.ema import EMA


def _write(writer, step, payload="x"):
    tmp = writer.begin(step)
    writer.write_rank_rng(step, 0)
    (tmp / "state.json").write_text('{"iteration": %d, "payload": "%s"}' % (step, payload))
    return writer.commit(step)


def test_latest_ignores_incomplete_and_temporary(tmp_path):
    w = ckpt.CheckpointWriter(tmp_path, keep=0)
    _write(w, 1)
    _write(w, 2)
    (tmp_path / "checkpoints" / "step_000003").mkdir()  # crashed before COMPLETE
    w.begin(4)  # a save that never committed
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints").name == "step_000002"
    assert ckpt.resolve_resume("auto", tmp_path).name == "step_000002"
    assert ckpt.resolve_resume(str(tmp_path), tmp_path / "elsewhere").name == "step_000002"
    assert ckpt.resolve_resume(None, tmp_path) is None
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        ckpt.resolve_resume(str(tmp_path / "checkpoints" / "step_000003"), tmp_path)


def test_resaving_a_step_replaces_it_whole(tmp_path):
    w = ckpt.CheckpointWriter(tmp_path, keep=2)
    _write(w, 5, "first")
    final = _write(w, 5, "second")
    assert ckpt.is_checkpoint(final) and "second" in (final / "state.json").read_text()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000005"]


def test_keep_prunes_oldest(tmp_path):
    w = ckpt.CheckpointWriter(tmp_path, keep=2)
    for s in (1, 2, 3):
        _write(w, s)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == ["step_000002", "step_000003"]


def test_rng_state_round_trip(tmp_path):
    import random

    import numpy as np

    state = ckpt.rng_state()
    torch.save(state, tmp_path / "rng.pt")
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.set_rng_state(ckpt.torch_load_trusted(tmp_path / "rng.pt"))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_ema_warmup_and_swap():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([p], decay=0.9, update_every=1)
    with torch.no_grad():
        p.fill_(1.0)
    ema.step()  # step 1: decay min(0.9, 2/11)
    assert torch.allclose(ema.shadow[0], torch.full((3,), 1 - 2 / 11))
    for _ in range(100):
        ema.step()
    assert torch.allclose(ema.shadow[0], torch.ones(3), atol=1e-4)
    with torch.no_grad():
        p.fill_(5.0)
    with ema.swapped():
        assert torch.allclose(p, ema.shadow[0])
    assert torch.equal(p, torch.full((3,), 5.0))
