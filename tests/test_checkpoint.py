"""Checkpoint atomicity, discovery and the EMA."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from alignrl.errors import CheckpointError
from alignrl.training import checkpoint as ckpt
from alignrl.training.ema import EMA


def _write(writer, step, payload="x"):
    """A checkpoint with every file the trainer writes (small tensors)."""
    tmp = writer.begin(step)
    writer.write_rank_rng(step, 0)
    save_file({"w": torch.full((64, 64), float(step))}, str(tmp / "trainable.safetensors"))
    torch.save({"state": {0: {"exp_avg": torch.ones(64)}}}, tmp / "optimizer.pt")
    torch.save({"last_epoch": step}, tmp / "lr_scheduler.pt")
    (tmp / "state.json").write_text('{"iteration": %d, "payload": "%s", "ema": null}' % (step, payload))
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


def _flip_bit(path, offset=-100):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_manifest_names_what_is_wrong(tmp_path):
    w = ckpt.CheckpointWriter(tmp_path, keep=0)
    paths = {s: _write(w, s) for s in range(1, 7)}
    manifest = json.loads((paths[1] / ckpt.MANIFEST).read_text())
    assert set(manifest["files"]) == {"trainable.safetensors", "optimizer.pt", "lr_scheduler.pt", "state.json",
                                      "rng/rank_0.pt"}
    ckpt.verify_checkpoint(paths[1])
    with open(paths[2] / "trainable.safetensors", "r+b") as f:
        f.truncate(100)
    _flip_bit(paths[3] / "trainable.safetensors")  # same size: only the checksum sees it
    (paths[4] / "optimizer.pt").unlink()
    (paths[5] / "state.json").write_text('{"iteration": 5, "ema"')
    (paths[6] / ckpt.MANIFEST).unlink()  # a checkpoint from before manifests: structural checks only
    expected = {2: "trainable.safetensors has 100 bytes, the manifest says", 3: "trainable.safetensors fails its checksum",
                4: "optimizer.pt is missing", 5: "state.json is unreadable"}
    for step, message in expected.items():
        with pytest.raises(ckpt.CorruptCheckpoint, match=message):
            ckpt.verify_checkpoint(paths[step])
    ckpt.verify_checkpoint(paths[6])
    with open(paths[6] / "trainable.safetensors", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ckpt.CorruptCheckpoint, match="the file has 1000"):
        ckpt.verify_checkpoint(paths[6])
    _flip_bit(paths[6] / "optimizer.pt", 200)  # legacy .pt: the zip members' own CRCs
    (paths[6] / "trainable.safetensors").unlink()
    save_file({"w": torch.zeros(2)}, str(paths[6] / "trainable.safetensors"))
    with pytest.raises(ckpt.CorruptCheckpoint, match="optimizer.pt"):
        ckpt.verify_checkpoint(paths[6])


def test_resume_skips_damaged_checkpoints_with_a_warning(tmp_path, capsys):
    w = ckpt.CheckpointWriter(tmp_path, keep=0)
    for s in (1, 2, 3):
        _write(w, s)
    root = tmp_path / "checkpoints"
    _flip_bit(root / "step_000003" / "trainable.safetensors")
    (root / "step_000002" / "lr_scheduler.pt").unlink()
    assert ckpt.resolve_resume("auto", tmp_path).name == "step_000001"
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln]
    assert len(warnings) == 2
    assert "step_000003 is unusable: trainable.safetensors fails its checksum" in warnings[0]
    assert "step_000002 is unusable: lr_scheduler.pt is missing; trying the previous one" in warnings[1]
    assert ckpt.resolve_resume(str(tmp_path), tmp_path / "elsewhere").name == "step_000001"
    # named explicitly, a damaged checkpoint is a one-line error, not a silent fallback
    with pytest.raises(CheckpointError, match=r"resume=.*step_000003 cannot be used: trainable.safetensors fails") as e:
        ckpt.resolve_resume(str(root / "step_000003"), tmp_path)
    assert "\n" not in str(e.value)
    _flip_bit(root / "step_000001" / "optimizer.pt")
    with pytest.raises(CheckpointError, match=r"no usable checkpoint .*\(3 found"):
        ckpt.resolve_resume("auto", tmp_path)


def test_prune_removes_the_marker_before_the_files(tmp_path, monkeypatch):
    w = ckpt.CheckpointWriter(tmp_path, keep=1)
    _write(w, 1)
    seen = []
    real = shutil.rmtree

    def watching(path, *a, **k):
        seen.append((os.path.basename(path), os.path.exists(os.path.join(path, ckpt.MARKER))))
        return real(path, *a, **k)

    monkeypatch.setattr(ckpt.shutil, "rmtree", watching)
    _write(w, 2)
    assert ("step_000001", False) in seen and all(not complete for _, complete in seen)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == ["step_000002"]


def test_prune_keeps_older_checkpoints_than_abandoned_newer_ones(tmp_path):
    """After resuming from step 1 (step 3 damaged), saving step 2 with keep=1 must not delete step 2's only
    good predecessor chain in favour of the damaged step 3: it prunes only at or before the step it wrote."""
    w = ckpt.CheckpointWriter(tmp_path, keep=1)
    _write(w, 3)
    _flip_bit(tmp_path / "checkpoints" / "step_000003" / "trainable.safetensors")
    _write(w, 2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_000002", "step_000003"]
    assert ckpt.resolve_resume("auto", tmp_path).name == "step_000002"


def test_resave_keeps_a_good_checkpoint_at_every_moment(tmp_path, monkeypatch):
    w = ckpt.CheckpointWriter(tmp_path, keep=1)
    _write(w, 5, "first")
    calls = []
    real = os.replace

    def dies_on_second_rename(src, dst):
        calls.append(os.path.basename(dst))
        if len(calls) == 2:  # killed between moving the old copy aside and moving the new one in
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", dies_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        _write(w, 5, "second")
    monkeypatch.setattr(ckpt.os, "replace", real)
    found = ckpt.latest_checkpoint(tmp_path / "checkpoints")
    assert found.name == "step_000005.old" and "first" in (found / "state.json").read_text()
    ckpt.verify_checkpoint(found)
    w.clean()  # the next run puts the old copy back and drops the unfinished save
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000005"]
    assert ckpt.resolve_resume("auto", tmp_path).name == "step_000005"


def test_clean_removes_leftovers_of_killed_runs(tmp_path):
    w = ckpt.CheckpointWriter(tmp_path, keep=0)
    _write(w, 1)
    root = tmp_path / "checkpoints"
    (root / "step_000002.tmp" / "rng").mkdir(parents=True)  # a save killed before COMPLETE
    (root / "step_000003").mkdir()  # a prune killed after removing COMPLETE
    (root / "step_000003" / "trainable.safetensors").write_bytes(b"x")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)
    (tmp_path / f"status.json.tmp{dead}").write_text("{")
    (tmp_path / f"status.json.tmp{os.getpid()}").write_text("{")  # a live writer's file is left alone
    removed = w.clean() + ckpt.remove_stale_temp_files(tmp_path)
    assert sorted(p.name for p in removed) == sorted(["step_000002.tmp", "step_000003", f"status.json.tmp{dead}"])
    assert sorted(p.name for p in root.iterdir()) == ["step_000001"]
    assert (tmp_path / f"status.json.tmp{os.getpid()}").exists()
