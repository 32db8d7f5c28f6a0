"""DPOK: the FIFO replay buffer, an iteration through the loop (buffer, value baseline, policy steps), and an exact
resume that restores every process's buffer, value network and value optimizer."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from alignrl.algorithms.dpok import ReplayBuffer
from conftest import FAST, run_inprocess


def test_replay_buffer_keeps_the_newest_transitions_with_their_prompts():
    buf = ReplayBuffer(capacity=5)
    for k in range(3):  # 3 rounds of 2 transitions: the oldest one falls out
        buf.add(torch.full((2, 1, 2, 2), float(k)), torch.zeros(2, 1, 2, 2), torch.tensor([k, k + 0.5]),
                torch.tensor([0, 1]), torch.tensor([10.0 * k, 10.0 * k]), [f"p{k}a", f"p{k}b"])
    assert len(buf) == 5 and buf.prompts == ["p0b", "p1a", "p1b", "p2a", "p2b"]
    assert buf.logp.tolist() == [0.5, 1.0, 1.5, 2.0, 2.5] and buf.reward.tolist() == [0, 10, 10, 20, 20]
    assert buf.x[:, 0, 0, 0].tolist() == [0, 1, 1, 2, 2]
    again = ReplayBuffer(capacity=5)
    again.load(buf.tensors(), buf.prompts)
    assert all(torch.equal(a, b) for a, b in zip(again.tensors().values(), buf.tensors().values()))


def _args():
    return [a for a in FAST if not a.startswith(("algorithm.group_size", "trainer.train_batch_size"))] + [
        "recipe=tiny_dpok", "trainer.train_batch_size=2", "algorithm.grad_accumulation=2",
        "algorithm.value_batch_size=8", "algorithm.value_steps=2"]


def test_dpok_resumes_exactly_with_its_buffer_and_value_network(tmp_path):
    args = [*_args(), "trainer.max_steps=4", "trainer.checkpoint_every=2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    proc = run_inprocess("train", f"run_dir={straight}", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert run_inprocess("train", f"run_dir={split}", *args, "trainer.max_steps=2", cwd=tmp_path).returncode == 0
    saved = split / "checkpoints" / "step_000002" / "rng" / "algorithm_rank_0.safetensors"
    state = load_file(str(saved))
    assert state["buffer.x"].shape[0] == 2 * 8 * 4  # 2 iterations x 8 images x 4 trained steps
    assert any(k.startswith("value.") for k in state) and any(k.startswith("value_opt.") for k in state)
    proc = run_inprocess("train", f"run_dir={split}", *args, "resume=auto", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_file(str(straight / "checkpoints" / "step_000004" / "trainable.safetensors"))
    b = load_file(str(split / "checkpoints" / "step_000004" / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    va = load_file(str(straight / "checkpoints" / "step_000004" / "rng" / "algorithm_rank_0.safetensors"))
    vb = load_file(str(split / "checkpoints" / "step_000004" / "rng" / "algorithm_rank_0.safetensors"))
    assert va.keys() == vb.keys() and all(torch.equal(va[k], vb[k]) for k in va)
