"""`alignrl plan`: per-GPU memory of a recipe, what fits, and what would make it fit (alignrl/plan.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from alignrl.components import build_planner
from alignrl.config import compose
from alignrl.plan import GiB, KNOWN, Machine, estimate, suggestions
from conftest import REPO, run_inprocess


def test_mixgrpo_flux_full_fine_tune_fits_only_sharded_and_its_lora_variant_fits():
    cfg = compose(["recipe=mixgrpo_flux", "distributed=ddp"])  # unsharded: every GPU would hold everything
    est = estimate(cfg, Machine(8, 80, 1))
    rows = dict(est.rows)
    full = [v for k, v in rows.items() if k.startswith("denoiser full")]
    assert full == [pytest.approx(16 * KNOWN["flux1_dev"]["denoiser"])]  # 177 GiB: fp32 weight, grad, Adam m, v
    assert rows["text encoders and VAE (frozen)"] == pytest.approx(2 * (123.1e6 + 4.762e9 + 83.8e6))
    assert not est.fits and est.total > 170 * GiB
    assert est.total_sharded < est.limit  # sharded over 8 GPUs it would fit
    tips = suggestions(cfg, est, Machine(8, 80, 1))
    assert any("finetune=lora" in s for s in tips) and tips[0].startswith("distributed=fsdp: sharded full fine-tuning")
    # the recipe itself shards (distributed=fsdp): states / 8, the blocks in flight, and sampling's gathered copy
    sharded = estimate(compose(["recipe=mixgrpo_flux"]), Machine(8, 80, 1))
    srows = dict(sharded.rows)
    assert srows["denoiser full: fp32 weights, grads, optimizer (16 B/param) / 8"] == pytest.approx(full[0] / 8)
    block = 2 * KNOWN["flux1_dev"]["denoiser"] / 57
    assert srows["shard units in flight (2 gathered blocks, 1 block's fp32 grads)"] == pytest.approx(8 * block)  # bf16
    assert sharded.fits and sharded.total == pytest.approx(  # sampling's peak: the whole denoiser gathered in bf16
        4 * GiB + rows["text encoders and VAE (frozen)"] + full[0] / 8 + 2 * KNOWN["flux1_dev"]["denoiser"])
    fp32 = estimate(compose(["recipe=mixgrpo_flux", "distributed.param_dtype=fp32"]), Machine(8, 80, 1))
    assert not fp32.fits and "distributed.param_dtype=bf16 (gather in bf16: half the bytes)" in \
        suggestions(compose(["recipe=mixgrpo_flux", "distributed.param_dtype=fp32"]), fp32, Machine(8, 80, 1))
    lora = estimate(compose(["recipe=mixgrpo_flux_lora"]), Machine(8, 80, 1))
    assert lora.fits and lora.total < est.total / 4
    # FLUX at 720px with T5 512: 2025 + 512 tokens; 65 bytes x 57 layers x 3072 wide per token for fp32 weights
    # under autocast (unsharded), 53 for the bf16 units the recipe's FSDP gathers (measured on an H200)
    tokens = 57 * (45 * 45 + 512) * 3072
    assert est.act_plain == pytest.approx(65 * tokens)
    assert sharded.act_plain == pytest.approx(53 * tokens)
    assert est.act_ckpt < est.act_plain / 10


@pytest.mark.parametrize("overrides,gpus,kind,width", [
    ([], 8, "autocast", 1),  # LoRA on the bf16 base, bf16 autocast
    (["trainer.mixed_precision=no"], 8, "plain", 1),
    (["trainer.mixed_precision=no", "backbone.dtype=fp32"], 8, "plain", 2),  # fp32 activations: twice the bytes
    (["trainer.finetune=full", "trainer.mixed_precision=no"], 8, "plain", 2),  # fp32 master weights, no autocast
    (["trainer.finetune=full"], 8, "fp32", 1),  # fp32 master weights under autocast
    (["trainer.finetune=full", "distributed=fsdp"], 8, "autocast", 1),  # units gathered in bf16
    (["trainer.finetune=full", "distributed=fsdp"], 1, "fp32", 1),  # one process: nothing is gathered
    (["trainer.finetune=full", "distributed=fsdp", "distributed.param_dtype=fp32"], 8, "fp32", 1),
    (["backbone.dtype=fp32"], 8, "fp32", 1),  # a LoRA base kept in fp32
])
def test_activation_coefficient_follows_how_the_forward_runs(overrides, gpus, kind, width):
    from alignrl.plan import TOKEN_COEFF, _forward_kind

    cfg = compose(["recipe=mixgrpo_flux_lora", *overrides])
    assert _forward_kind(cfg, gpus) == kind
    est = estimate(cfg, Machine(gpus, 80, 1))
    L, d = KNOWN["flux1_dev"]["layers"], KNOWN["flux1_dev"]["width"]
    s = (int(cfg.backbone.resolution) // 16) ** 2 + int(cfg.backbone.max_sequence_length)
    micro = int(cfg.trainer.train_batch_size)
    assert est.act_plain == pytest.approx(TOKEN_COEFF["flux"][kind] * width * L * micro * s * d)
    # autocast's 16-bit copies of fp32 weights, kept for backward: whole (not divided by the shards)
    casts = [v for k, v in est.rows if k.startswith("autocast's 16-bit copies")]
    per_block = L if cfg.trainer.gradient_checkpointing else 1
    assert casts == ([pytest.approx(2 * KNOWN["flux1_dev"]["denoiser"] / per_block)] if kind == "fp32" else [])


def test_video_tokens_are_frames_times_patches_and_the_14b_fits_only_sharded():
    """Wan2.1: tokens = latent frames x (H/16) x (W/16). The 1.3B at 33 frames, 240x416 is 9 x 15 x 26 = 3510
    tokens: 98 B x 30 layers x 1536 wide per token, 14.7 GiB per video without checkpointing (backbones.md's
    measured figure); CFG doubles the micro-batch of the GRPO loss."""
    cfg = compose(["recipe=flowgrpo_wan21", "trainer.train_batch_size=1"])
    est = estimate(cfg, Machine(1, 80, 1))
    assert est.act_plain == pytest.approx(2 * 98 * 30 * 3510 * 1536) and est.fits
    assert 14.6 * GiB < est.act_plain / 2 < 14.8 * GiB
    more = estimate(compose(["recipe=flowgrpo_wan21", "trainer.train_batch_size=1", "backbone.num_frames=81"]),
                    Machine(1, 80, 1))
    assert more.act_plain == pytest.approx(est.act_plain * 21 / 9)  # 81 frames: 21 latent frames
    big = compose(["recipe=flowgrpo_wan21_14b"])
    assert estimate(big, Machine(8, 80, 1)).fits
    frozen = {k: dict(estimate(compose(["recipe=flowgrpo_wan21_14b", f"backbone.frozen_dtype={k}"]),
                                    Machine(8, 80, 1)).rows)["text encoders and VAE (frozen)"] for k in ("bf16", "fp32")}
    assert frozen["fp32"] == pytest.approx(2 * frozen["bf16"]) == pytest.approx(4 * (5.681e9 + 126.9e6))
    assert not estimate(compose(["recipe=flowgrpo_wan21_14b", "distributed=ddp"]), Machine(8, 80, 1)).fits


def test_plan_command_prints_the_breakdown_and_exits_by_fit():
    res = run_inprocess("plan", "recipe=flowgrpo_sd35", "machine.gpu_memory_gb=141")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    for part in ("text encoders and VAE", "denoiser base (frozen)", "LoRA r32", "EMA", "activations, micro-batch 18",
                 "CFG doubles it", "-> fits"):
        assert part in out, (part, out)
    cfg, small = compose(["recipe=flowgrpo_sd35"]), Machine(8, 24, 1)
    est = estimate(cfg, small)
    assert not est.fits and any(s.startswith("trainer.gradient_checkpointing=true") for s in suggestions(cfg, est, small))


def test_cfg_doubles_only_the_training_forwards_that_run_it_and_a_reference_counts_when_needed():
    """Flow-GRPO re-scores its steps with CFG (the micro-batch doubles); Flow-RWR's loss runs without CFG and its
    beta is a temperature (no reference copy); the plan also says when the recipe cannot split over the GPUs."""
    grpo = estimate(compose(["recipe=flowgrpo_sd35"]), Machine())
    rwr = estimate(compose(["recipe=flow_rwr_sd35"]), Machine())
    assert any("CFG doubles it" in k for k, _ in grpo.rows) and not any("CFG" in k for k, _ in rwr.rows)
    assert grpo.act_plain == pytest.approx(2 * rwr.act_plain)  # same batch of 9, same tokens
    full = estimate(compose(["recipe=dancegrpo_flux", "algorithm.beta=0.04"]), Machine())
    assert any(k.startswith("frozen reference") for k, _ in full.rows)
    assert not any(k.startswith("frozen reference") for k, _ in
                   estimate(compose(["recipe=flow_rwr_flux", "trainer.finetune=full"]), Machine()).rows)
    res = run_inprocess("plan", "recipe=draft_flux")
    assert "does not run" in res.stdout and "do not split over 8 processes" in res.stdout


def test_packed_steps_multiply_the_activations_and_the_plan_says_how_to_undo_it():
    """trainer.steps_per_pass packs a minibatch's schedule steps into one forward: the activations grow by the steps
    packed (0: every trained step of the sampler's plan), and a recipe that does not fit is told to unpack first."""
    base = estimate(compose(["recipe=flowgrpo_sd35"]), Machine())
    two = estimate(compose(["recipe=flowgrpo_sd35", "trainer.steps_per_pass=2"]), Machine())
    every = estimate(compose(["recipe=flowgrpo_sd35", "trainer.steps_per_pass=0"]), Machine())
    trained = build_planner(compose(["recipe=flowgrpo_sd35"])).max_trained_steps
    assert two.act_plain == pytest.approx(2 * base.act_plain)
    assert every.act_plain > two.act_plain and any("schedule steps a pass" in k for k, _ in every.rows)
    assert trained > 2 and every.act_plain == pytest.approx(trained * base.act_plain)
    small = Machine(1, 24, 1)
    assert suggestions(compose(["recipe=flowgrpo_sd35", "trainer.steps_per_pass=0"]),
                       estimate(compose(["recipe=flowgrpo_sd35", "trainer.steps_per_pass=0"]), small),
                       small)[0].startswith("trainer.steps_per_pass=1")
    assert not any("steps_per_pass" in tip for tip in suggestions(compose(["recipe=flowgrpo_sd35"]), base, small))
    by_step = estimate(compose(["recipe=flowgrpo_sd35", "trainer.steps_per_pass=0", "trainer.update_by=step",
                                "trainer.lr_schedule=constant"]), Machine())
    assert by_step.act_plain == pytest.approx(base.act_plain)  # an optimizer step holds one schedule step
    capped = estimate(compose(["recipe=flowgrpo_sd35", "trainer.steps_per_pass=0", "trainer.update_by=transitions",
                               "trainer.lr_schedule=constant", "trainer.transitions_per_update=18",
                               "trainer.train_batch_size=9"]), Machine())
    assert capped.act_plain == pytest.approx(2 * base.act_plain)  # 18 transitions an update: 2 steps of 9


def test_preflight_warns_before_loading_when_the_gpu_is_too_small():
    from alignrl.plan import preflight

    warning = preflight(compose(["recipe=mixgrpo_flux", "distributed=ddp"]), 80 * 1e9)
    assert warning.startswith("alignrl: warning: this recipe needs about 192 GiB") and "finetune=lora" in warning
    # sharded (the recipe's own distributed=fsdp): fits over 8 processes, not over 2
    assert preflight(compose(["recipe=mixgrpo_flux"]), 80 * 1e9, world=8) is None
    assert "needs about 1" in preflight(compose(["recipe=mixgrpo_flux"]), 80 * 1e9, world=2)
    assert preflight(compose(["recipe=mixgrpo_flux_lora"]), 80 * 1e9) is None
    assert preflight(compose(["recipe=tiny_flowgrpo"]), 1e9) is None  # the planner cannot tell: no warning


def test_unknown_backbone_is_refused_in_one_line():
    from alignrl.errors import ConfigError

    cfg = compose(["recipe=flowgrpo_sd35", "backbone.name=my_model"])
    with pytest.raises(ConfigError, match="alignrl plan knows the backbones"):
        estimate(cfg, Machine())


PEAK = """
import sys, torch
torch.set_num_threads(1)
from alignrl.config import compose
from alignrl.components import build_backbone
bb = build_backbone(compose(["recipe=tiny_flowgrpo"]), torch.device("cpu"))
B = int(sys.argv[1])
den = bb.transformer
den.train()
for p in den.parameters():
    p.requires_grad_(True)
gen = [torch.Generator().manual_seed(i) for i in range(B)]
sch = bb.make_schedule(4)
x, cond = bb.start_latents(gen, sch), bb.encode_prompts(["a photo"] * B)

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current resident size
base = status("VmRSS:")
v = bb.predict(x, sch.timesteps[1], cond, 1.0)
v.float().pow(2).mean().backward()
print(status("VmHWM:") - base)
"""


def test_tiny_activation_estimate_against_the_measured_peak():
    """The planner's activations for the tiny SD3 (the tensors autograd saves in one training forward) against the
    peak resident memory a real forward and backward of that batch adds in a fresh process (the kernel's high-water
    mark, reset just before): the saved tensors plus backward's transients (measured 1.36-1.49x at batch 128)."""
    import torch

    from alignrl.components import build_backbone
    from alignrl.plan import saved_activation_bytes

    bb = build_backbone(compose(["recipe=tiny_flowgrpo"]), torch.device("cpu"))
    one, many = saved_activation_bytes(bb, 8, False), saved_activation_bytes(bb, 128, False)
    assert many == pytest.approx(16 * one, rel=0.05)  # linear in the batch, as the estimate assumes
    assert saved_activation_bytes(bb, 128, True) < many / 2  # checkpointing saves block inputs only
    peak = float(subprocess.run([sys.executable, "-c", PEAK, "128"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip().splitlines()[-1])
    assert 1.0 <= peak / many <= 2.0, (peak, many)


def test_decay_to_base_counts_one_fp32_copy_of_the_trainable_weights_sharded_with_them():
    base = estimate(compose(["recipe=mixgrpo_flux"]), Machine(8, 80, 1))
    held = estimate(compose(["recipe=mixgrpo_flux", "trainer.decay_to_base=100"]), Machine(8, 80, 1))
    rows = dict(held.rows)
    assert rows["starting weights for trainer.decay_to_base (fp32) / 8"] == pytest.approx(
        4 * KNOWN["flux1_dev"]["denoiser"] / 8)
    assert "starting weights for trainer.decay_to_base (fp32) / 8" not in dict(base.rows)


@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_deepspeed_layouts_keep_the_autocast_copies_row(strategy):
    """DeepSpeed keeps fp32 weights under autocast: its layout keeps the 16-bit copies row whole, in the total."""
    cfg = compose(["recipe=mixgrpo_flux", f"distributed={strategy}"])
    est = estimate(cfg, Machine(8, 80, 1))
    rows = dict(est.rows)
    copies = rows["autocast's 16-bit copies of the fp32 weights (kept for backward)"]
    L = KNOWN["flux1_dev"]["layers"]
    assert copies == pytest.approx(2 * KNOWN["flux1_dev"]["denoiser"] / (L if cfg.trainer.gradient_checkpointing else 1))
    assert est.total >= sum(rows.values()) - 1  # the total counts every row (zero3's sampling peak may exceed it)


@pytest.mark.parametrize("recipe, extra, exact", [
    ("tiny_flowgrpo", [], True),  # every trained step in one forward (the CPU default packs them)
    ("tiny_dancegrpo", ["trainer.steps_per_pass=0"], True),  # each sample trains a random subset of its steps
    ("tiny_dancegrpo", ["trainer.steps_per_pass=2"], False),  # two consecutive steps: only where a sample drew both
    ("tiny_branchgrpo", [], True),  # a tree: 8 transitions a root after the last split
    ("tiny_branchgrpo", ["trainer.steps_per_pass=2"], True),  # widths 2 2 4 8 8 packed two at a time: 4+8
    ("tiny_branchgrpo", ["sampler.width_prune_ratio=0.5"], True),  # half the deepest edges dropped
    ("tiny_tempflow", [], True),  # side branches: the children of a branch step
    ("tiny_g2rpo", ["trainer.update_by=step", "trainer.lr_schedule=constant"], True),
    ("tiny_d3po", [], True),  # a pair from one noise: 2 rows a root, one step a pass (never packed)
    ("tiny_awm", [], True),  # final images: a sample is a row
])
def test_the_planned_rows_of_a_training_forward_are_the_rows_the_trainer_runs(tmp_path, recipe, extra, exact):
    """The rows the planner multiplies the activations by (the largest training forward, before CFG doubles it)
    are those of the largest forward a real update of the recipe runs: a tree's width (less pruned edges) and a side
    branch's children count, as do packed steps; where samples train random subsets of their steps the figure is an
    upper bound."""
    from accelerate.state import AcceleratorState

    from alignrl.plan import _pass_rows
    from alignrl.training.trainer import Trainer

    AcceleratorState._reset_state()
    cfg = compose([f"recipe={recipe}", f"run_dir={tmp_path}", "trainer.train_batch_size=2", "logger.progress_bar=false",
                   "trainer.eval_every=0", "trainer.checkpoint_every=0", "trainer.log_images_every=0", *extra])
    trainer = Trainer(cfg, tmp_path)
    seen = []
    real = trainer.backbone.predict

    def predict(x, *a, **k):
        seen.append(x.shape[0])
        return real(x, *a, **k)

    try:
        trainer.timing = {}
        batch = trainer.collect()  # the rollout's forwards are not counted: only the update's below
        trainer.backbone.predict = predict
        trainer.algorithm.train_step(batch, trainer.advantages(batch), trainer.step_context())
    finally:
        trainer.reward_runner.close()
    planned = _pass_rows(cfg)[0]
    assert seen and (planned == max(seen) if exact else planned >= max(seen)), (seen, planned)
