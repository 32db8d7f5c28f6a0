"""The trainer in-process: on-policy ratio, non-finite rewards, reward errors, mixed precision, packaging."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from alignrl.config import compose
from alignrl.errors import RewardError
from conftest import FAST, REPO


def _trainer(tmp_path, *extra):
    from accelerate.state import AcceleratorState

    from alignrl.training.trainer import Trainer

    AcceleratorState._reset_state()  # a process-wide singleton: each test picks its own precision

    cfg = compose([f"run_dir={tmp_path}", *FAST, *extra])
    return Trainer(cfg, tmp_path)


def test_ratio_is_exactly_one_before_the_first_update(tmp_path):
    t = _trainer(tmp_path, "trainer.updates_per_iteration=1", "trainer.steps_per_pass=1")  # the rollout's batches
    t.timing = {}
    batch = t.collect()
    out = t.algorithm.train_step(batch, t.advantages(batch), t.step_context())
    assert out["ratio_dev_before_update"] == 0.0
    assert out["optimizer_steps"] == 1
    t.reward_runner.close()


@pytest.mark.parametrize("setting, expected", [(None, 1), (3, 3), (0, "default")])
def test_the_reward_worker_runs_its_own_intra_op_thread_count(tmp_path, setting, expected):
    """On the CPU the reward worker scores with one intra-op thread by default (a second pool of torch threads on the
    sampler's cores made the default recipe's iteration about 1.4x slower on 2 cores); the sampler keeps its own."""
    import threading

    main_threads = torch.get_num_threads()
    fresh = []  # what a new thread gets without the setting (torch's default for new threads)
    probe = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
    probe.start()
    probe.join()
    extra = [] if setting is None else [f"trainer.reward_threads={setting}"]
    t = _trainer(tmp_path, *extra)
    real = t.reward_runner.reward
    seen = []

    def reward(images, prompts, metadata):
        seen.append(torch.get_num_threads())
        return real(images, prompts, metadata)

    t.reward_runner.reward = reward
    t.timing = {}
    t.collect()
    t.reward_runner.close()
    assert seen and set(seen) == {fresh[0] if expected == "default" else expected}
    assert torch.get_num_threads() == main_threads


def test_nonfinite_rewards_are_dropped_and_counted(tmp_path):
    t = _trainer(tmp_path)
    real = t.reward_runner.reward

    def flaky(images, prompts, metadata):
        scores, info = real(images, prompts, metadata)
        scores = scores.copy()
        scores[0] = np.nan
        scores[1] = np.inf
        return scores, info

    t.reward_runner.reward = flaky
    t.timing = {}
    metrics = t.run_iteration()
    # every rollout batch of 4 lost two samples
    assert metrics["nonfinite_rewards"] == 2 * (8 // 4)
    assert np.isfinite(metrics["reward_mean"]) and np.isfinite(metrics["policy_loss"])
    assert metrics["optimizer_steps"] == 2
    t.reward_runner.close()


def test_reward_exception_stops_with_the_reward_named(tmp_path):
    from alignrl.rewards.base import WeightedReward

    class Broken:
        def __call__(self, images, prompts, metadata):
            raise ValueError("bad checkpoint")

    t = _trainer(tmp_path)
    t.reward_runner.reward = WeightedReward({"my_reward": Broken()}, {"my_reward": 1.0})
    t.timing = {}
    with pytest.raises(RewardError, match="reward 'my_reward' raised ValueError: bad checkpoint"):
        t.run_iteration()
    t.reward_runner.close()


def test_bf16_mixed_precision_runs_with_fp32_master_weights(tmp_path):
    t = _trainer(tmp_path, "trainer.mixed_precision=bf16", "trainer.finetune=lora")
    assert all(p.dtype == torch.float32 for p in t.params)
    t.timing = {}
    metrics = t.run_iteration()
    assert np.isfinite(metrics["policy_loss"]) and metrics["optimizer_steps"] == 2
    t.reward_runner.close()


def test_kl_reference_is_the_base_model(tmp_path):
    """With LoRA the reference forward disables the adapter; with full fine-tuning it uses a frozen copy."""
    for finetune in ("lora", "full"):
        t = _trainer(tmp_path / finetune, f"trainer.finetune={finetune}", "algorithm.beta=0.1",
                     "trainer.updates_per_iteration=1")
        t.timing = {}
        batch = t.collect()
        out = t.algorithm.train_step(batch, t.advantages(batch), t.step_context())
        assert "kl" in out and out["kl"] >= 0
        # after one update the policy moved away from the base, so the KL of the next step is positive
        t.iteration += 1
        batch = t.collect()
        assert t.algorithm.train_step(batch, t.advantages(batch), t.step_context())["kl"] > 0
        t.reward_runner.close()


def test_recipes_ship_in_a_non_editable_install(tmp_path):
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheel_dir), str(REPO)], check=True, capture_output=True)
    wheel = next(wheel_dir.glob("alignrl-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = ("from alignrl.config import recipes_dir, compose; import alignrl; "
            "print(alignrl.__file__); print(recipes_dir()); "
            "c = compose(['recipe=flowgrpo_sd35_geneval']); print(c.algorithm.beta, c.backbone.pretrained)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith(str(target)) and lines[1].startswith(str(target))
    assert lines[2] == "0.04 stabilityai/stable-diffusion-3.5-medium"
    assert Path(lines[1], "recipe", "tiny_flowgrpo.yaml").is_file()


def test_gradient_checkpointing_gives_the_same_update(tmp_path):
    weights = []
    for flag in ("false", "true"):
        t = _trainer(tmp_path / flag, f"trainer.gradient_checkpointing={flag}", "trainer.finetune=lora")
        assert t.denoiser.is_gradient_checkpointing == (flag == "true")
        t.timing = {}
        t.run_iteration()
        weights.append([p.detach().clone() for p in t.params])
        t.reward_runner.close()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*weights))


def test_all_groups_tied_skips_the_update(tmp_path):
    from alignrl.rewards.base import WeightedReward

    class Constant:
        def __call__(self, images, prompts, metadata):
            return np.ones(len(prompts)), {}

    t = _trainer(tmp_path)
    t.reward_runner.reward = WeightedReward({"constant": Constant()}, {"constant": 1.0})
    before = [p.detach().clone() for p in t.params]
    t.timing = {}
    metrics = t.run_iteration()
    assert metrics["zero_std_group_frac"] == 1.0 and metrics["kept_frac"] == 0.0
    assert metrics["optimizer_steps"] == 0
    assert all(torch.equal(a, b) for a, b in zip(before, t.params))
    t.reward_runner.close()


def test_stop_file_abandons_the_iteration_before_any_update(tmp_path):
    t = _trainer(tmp_path, "trainer.max_steps=3")
    t.control.stop_file.write_text("stop")
    state = t.train()  # a stale request from an earlier process is cleared at start: runs normally
    assert state == "finished" and t.iteration == 3
    from alignrl.training.trainer import _StopNow

    t2 = _trainer(tmp_path / "b", "trainer.max_steps=3")
    t2.timing = {}
    t2.control.stop_file.parent.mkdir(parents=True, exist_ok=True)
    t2.control.stop_file.write_text("stop")
    before = [p.detach().clone() for p in t2.params]
    with pytest.raises(_StopNow):
        t2.run_iteration()
    assert all(torch.equal(a, b) for a, b in zip(before, t2.params)) and t2.optimizer_steps == 0
    t2.reward_runner.close()


def test_a_crash_is_recorded_as_failed_and_signal_handlers_are_restored(tmp_path):
    import json
    import signal

    t = _trainer(tmp_path)
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}

    def boom():
        raise RuntimeError("simulated crash")

    t.run_iteration = boom
    with pytest.raises(RuntimeError, match="simulated crash"):
        t.train()
    assert json.loads((tmp_path / "status.json").read_text())["state"] == "failed"
    assert {s: signal.getsignal(s) for s in before} == before  # a later run in this process gets its own


def test_sigusr1_is_not_overridden_by_a_later_sigterm(tmp_path):
    import signal

    t = _trainer(tmp_path)
    previous = t.control.install_signal_handlers()
    try:
        signal.raise_signal(signal.SIGUSR1)
        signal.raise_signal(signal.SIGTERM)
        assert t.control.stop_signal == signal.SIGUSR1  # the Slurm job requeues on USR1: keep it
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        t.reward_runner.close()


def test_a_restart_from_scratch_drops_every_stale_metrics_row(tmp_path):
    import json

    from alignrl.training.logging import MetricsLogger

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "eval/reward_mean": 1.0}\n{"step": 1, "reward_mean": 2.0}\n[1, 2]\n{"step": 2')
    MetricsLogger(tmp_path, {"kind": "jsonl", "progress_bar": False}, {}, True, 4, 1, "r").close()
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [0, 1]  # resumed at 1: keeps 0..1
    MetricsLogger(tmp_path, {"kind": "jsonl", "progress_bar": False}, {}, True, 4, 0, "r").close()
    assert not path.exists() or path.read_text() == ""  # from scratch: the step-0 eval is logged again


def _one_update(tmp_path, *extra):
    t = _trainer(tmp_path, *extra)
    t.timing = {}
    batch = t.collect()
    adv = t.advantages(batch)
    kept = int(np.asarray(adv.transition_keep).sum())
    trained_steps = sorted({int(batch.t_from[i]) for i in np.nonzero(np.asarray(adv.transition_keep))[0]})
    out = t.algorithm.train_step(batch, adv, t.step_context())
    weights = [p.detach().clone() for p in t.params]
    t.reward_runner.close()
    return out, weights, kept, trained_steps


def test_update_cadence_one_step_per_schedule_step_or_per_n_transitions(tmp_path):
    """trainer.update_by: `step` makes one optimizer step per trained schedule step (G2RPO's cadence),
    `transitions` one every N of this process's transitions (BranchGRPO's); all of an iteration's transitions in
    one `transitions` update are the same update as one `samples` update, to the bit."""
    out, _, kept, steps = _one_update(tmp_path / "a", "trainer.update_by=step")
    assert len(steps) > 1 and out["optimizer_steps"] == len(steps)
    out, _, kept, _ = _one_update(tmp_path / "b", "trainer.update_by=transitions", "trainer.transitions_per_update=5")
    assert out["optimizer_steps"] == -(-kept // 5) > 1
    out_all, w_all, _, _ = _one_update(tmp_path / "c", "trainer.update_by=transitions",
                                       f"trainer.transitions_per_update={kept}")
    out_one, w_one, _, _ = _one_update(tmp_path / "d", "trainer.updates_per_iteration=1")
    assert out_all["optimizer_steps"] == out_one["optimizer_steps"] == 1
    assert all(torch.equal(a, b) for a, b in zip(w_all, w_one))
    assert out_all["policy_loss"] == out_one["policy_loss"]


def _update_gradients(tmp_path, *extra):
    """One optimizer step over an iteration: (its summary, the gradients it stepped with, training forwards run)."""
    t = _trainer(tmp_path, "trainer.updates_per_iteration=1", *extra)
    t.timing = {}
    batch = t.collect()
    adv = t.advantages(batch)
    ctx = t.step_context()
    grads, forwards = [], [0]
    step, forward = ctx.optimizer_step, t.denoiser.forward

    def recorded_step():
        grads.append([p.grad.detach().clone() for p in t.params])
        return step()

    def counted_forward(*a, **k):
        forwards[0] += 1
        return forward(*a, **k)

    ctx.optimizer_step, t.denoiser.forward = recorded_step, counted_forward
    out = t.algorithm.train_step(batch, adv, ctx)
    t.reward_runner.close()
    assert len(grads) == 1
    return out, grads[0], forwards[0]


@pytest.mark.parametrize("recipe, extra", [
    ("tiny_flowgrpo", ("algorithm.beta=0.04", "algorithm.kl_include_dt=true")),  # per-row dt and std_t in the KL
    ("tiny_grpo_guard", ("algorithm.beta=0.01",)),  # per-row dt and std in Guard's ratio and reweighting
    ("tiny_tempflow", ()),  # per-row noise weights
    ("tiny_flowgrpo_fast", ("sampler.sde_type=cps", "algorithm.clip_range=1e-5")),  # CPS kernel, a window
    ("tiny_dancegrpo", ()),  # DanceGRPO's kernel, unbiased std
    ("tiny_branchgrpo", ("sampler.num_steps=6", "sampler.eval_num_steps=6")),  # tree rows, per-row end steps
    ("tiny_flowgrpo_flux", ()),  # every backbone: FLUX (embedded guidance, LoRA), Wan (video), SD1.5 (a UNet,
    ("tiny_flowgrpo_wan", ()),  # DDPO's DDIM kernel) and the ShapeWorld UNet
    ("tiny_ddpo", ()),
    ("shapes_flowgrpo", ("sampler.num_steps=8",)),  # a random 40% of the steps per sample
])
def test_packed_schedule_steps_give_the_per_step_gradient_in_fewer_forwards(tmp_path, recipe, extra):
    """trainer.steps_per_pass packs a minibatch's schedule steps into one forward with per-row timesteps: the loss
    is the same sum, so the gradient equals the one-step-a-pass gradient up to float summation order (measured: up to
    1.2e-5 relative per tensor, the UNets' convolutions over larger batches the most; a pass at the wrong timesteps is
    off by far more. AdamW amplifies such differences, so weights after a step are not compared)."""
    one, g_one, n_one = _update_gradients(tmp_path / "one", f"recipe={recipe}", *extra, "trainer.steps_per_pass=1")
    for packed in (2, 0):
        out, g, n = _update_gradients(tmp_path / f"p{packed}", f"recipe={recipe}", *extra,
                                      f"trainer.steps_per_pass={packed}")
        assert n < n_one, (packed, n, n_one)
        for a, b in zip(g_one, g):  # per tensor, against its norm (single elements near 0 differ more)
            assert float((b - a).norm()) <= 1e-4 * float(a.norm()) + 1e-12, (packed, float((b - a).norm()))
        assert out["policy_loss"] == pytest.approx(one["policy_loss"], rel=1e-5, abs=1e-6)  # a sum near 0
        assert out["ratio_dev_before_update"] < 1e-5  # on policy to float rounding (DDPO's DDIM: 3e-6; unpacked: 0)
    assert one["ratio_dev_before_update"] == 0.0


def test_a_loss_that_pairs_the_rows_of_one_step_is_never_packed(tmp_path):
    """D3PO's pairs are the two rows of a root at one step: trainer.steps_per_pass does not apply, and the update is
    the one-step-a-pass update to the bit."""
    d3po = ("recipe=tiny_d3po", "algorithm.group_size=1", "data.groups_per_iteration=4")  # a pair per prompt
    _, g_one, n_one = _update_gradients(tmp_path / "one", *d3po, "trainer.steps_per_pass=1")
    _, g_all, n_all = _update_gradients(tmp_path / "all", *d3po, "trainer.steps_per_pass=0")
    assert n_all == n_one > 1 and all(torch.equal(a, b) for a, b in zip(g_one, g_all))


def test_pack_steps_keeps_kernels_apart_and_counts_steps():
    from types import SimpleNamespace

    from alignrl.algorithms.policy_gradient import pack_steps
    from alignrl.sampling.plans import StepSpec

    sde, cps = StepSpec(kind="sde", noise_level=0.7, trained=True), StepSpec(kind="cps", noise_level=0.8, trained=True)
    # rows 0-1 at step 0 (sde), 2-3 at step 1 (sde), 4-5 at step 2 (cps), 6-7 at step 3 (cps)
    batch = SimpleNamespace(t_spec=[sde] * 4 + [cps] * 4)
    t_from, t_to = [0, 0, 1, 1, 2, 2, 3, 3], [1, 1, 2, 2, 3, 3, 4, 4]
    groups = [[0, 1], [2, 3], [4, 5], [6, 7]]
    every = pack_steps(batch, groups, t_from, t_to, 0, "cpu")
    assert [rows.tolist() for rows, _ in every] == [[0, 1, 2, 3], [4, 5, 6, 7]]  # a pass never mixes kernels
    assert every[0][1][0].tolist() == [0, 0, 1, 1] and every[1][1][1].tolist() == [3, 3, 4, 4]
    one = pack_steps(batch, groups, t_from, t_to, 1, "cpu")
    assert [steps for _, steps in one] == [(0, 1), (1, 2), (2, 3), (3, 4)]  # ints: the kernels' kept factors
    single = pack_steps(SimpleNamespace(t_spec=[sde] * 8), groups, t_from, t_to, 3, "cpu")
    assert [len(rows) for rows, _ in single] == [6, 2] and single[1][1] == (3, 4)


def test_update_cadence_is_refused_for_a_method_without_transitions(tmp_path):
    from alignrl.config import validate_batch_arithmetic
    from alignrl.errors import ConfigError

    for recipe in ("tiny_awm", "tiny_sft", "tiny_d3po"):  # final images, an offline dataset, D3PO's pairs
        cfg = compose([f"recipe={recipe}", "trainer.update_by=step"])
        with pytest.raises(ConfigError, match="trainer.update_by=step .* does not train on them independently"):
            validate_batch_arithmetic(cfg, 1)
        validate_batch_arithmetic(compose([f"recipe={recipe}", "trainer.steps_per_pass=0"]), 1)  # not refused:
        # the default recipe packs, and another algorithm= on it runs one step a pass (tested below for D3PO)
    with pytest.raises(ConfigError, match="steps_per_pass=-1 must be >= 0"):
        _trainer(tmp_path, "trainer.steps_per_pass=-1")
    with pytest.raises(ConfigError, match="update_by='epoch' is not known"):
        _trainer(tmp_path, "trainer.update_by=epoch")
    with pytest.raises(ConfigError, match="lr_schedule=cosine .* use lr_schedule=constant or update_by=samples"):
        _trainer(tmp_path, "trainer.update_by=transitions", "trainer.lr_schedule=cosine")
