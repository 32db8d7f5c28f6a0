"""Video: the Wan2.1 backbone (tiny build of the real classes), the Wan SDE step, rewards on videos, the tiny Wan
recipe learning and resuming exactly. (Its export, LoRA in WanPipeline and MP4 evaluation: tests/test_export.py.)"""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from alignrl.backbones.wan import WanBackbone, check_num_frames
from alignrl.errors import ConfigError
from alignrl.rewards.base import Reward, WeightedReward
from alignrl.sampling.kernels import KERNELS
from conftest import FAST, run_inprocess


@pytest.fixture(scope="module")
def wan():
    return WanBackbone.tiny()


def test_tiny_wan_latents_frames_and_prompt_embeddings(wan):
    assert wan.latent_shape() == (16, 2, 4, 4)  # 5 frames -> 1 + 4/4 latent frames, 32px / 8
    cond = wan.encode_prompts(["a red cat", "a blue dog"])
    emb = cond.tensors["prompt_embeds"]
    assert emb.shape == (2, 16, 32)
    n_tokens = len(wan.pipe.tokenizer("a red cat").input_ids)
    assert emb[0, n_tokens:].abs().max() == 0 and emb[0, :n_tokens].abs().min() > 0  # zero-padded after the text
    # the text reaches the output: another prompt, another velocity
    x = torch.randn(2, *wan.latent_shape())
    t = wan.make_schedule(6).timesteps[1]
    v = wan.predict(x, t, cond, guidance_scale=4.5)
    v_swapped = wan.predict(x, t, cond.index([1, 0]), guidance_scale=4.5)
    assert v.shape == x.shape and (v - v_swapped).abs().max() > 1e-4
    video = wan.decode(torch.randn(2, *wan.latent_shape()))
    assert video.shape == (2, 5, 3, 32, 32) and 0 <= video.min() and video.max() <= 1
    # encode inverts decode's normalisation: a decoded clip encodes to latents that decode to nearly the same clip
    again = wan.decode(wan.encode(video))
    assert again.shape == video.shape and (again - video).abs().mean() < (video - video.mean()).abs().mean()


def test_frozen_parts_can_run_in_bf16_beside_fp32_weights():
    """backbone.frozen_dtype: the UMT5 encoder and the VAE in bf16 while the trained denoiser stays fp32 (the 14B
    recipe); embeddings are cast to the denoiser's dtype and the frames come back float32."""
    from alignrl.sampling.engine import rollout, sample_generators
    from alignrl.sampling.plans import ode_plan

    mixed, plain = WanBackbone.tiny(frozen_dtype="bf16"), WanBackbone.tiny()
    assert mixed.transformer.dtype == torch.float32
    assert mixed.pipe.text_encoder.dtype == mixed.vae.dtype == torch.bfloat16
    videos = []
    for bb in (mixed, plain):
        out = rollout(bb, ode_plan(4, 4.5), bb.encode_prompts(["a red cat", "a dog"]), sample_generators(0, 0, [0, 1]))
        videos.append(bb.decode(out.final))
    assert videos[0].dtype == torch.float32 and videos[0].shape == videos[1].shape
    assert 0 < (videos[0] - videos[1]).abs().max() < 0.1  # bf16 rounding, not another model


def test_wan_schedule_is_unipcs_flow_grid():
    """shift 3 over linspace(1, 1/1000, T+1)[:-1], then 0 (the grid Wan's pipeline samples on)."""
    s = WanBackbone.tiny(flow_shift=3.0).make_schedule(8)
    base = np.linspace(1, 1 / 1000, 9)[:-1]
    expected = 3 * base / (1 + 2 * base)
    assert np.allclose(s.sigmas[:-1].numpy(), expected, atol=1e-6) and s.sigmas[-1] == 0
    assert s.timesteps.tolist() == [999, 954, 900, 833, 750, 643, 500, 301]
    assert not np.allclose(WanBackbone.tiny(flow_shift=5.0).make_schedule(8).sigmas.numpy(), s.sigmas.numpy())


def test_bad_frame_counts_and_sides_are_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"backbone.num_frames=8: Wan's VAE takes 4k\+1 frames; use 5 or 9"):
        check_num_frames(8)
    with pytest.raises(ConfigError, match="backbone.width=40 must be a multiple of 16"):
        WanBackbone.tiny(width=40)
    with pytest.raises(ConfigError, match="backbone.resolution=24 must be a multiple of 16"):
        WanBackbone.tiny(resolution=24)


def test_wan_sde_step_is_the_references_formula():
    """std_t = sigma_min + (sigma_max - sigma_min) sigma with sigma_max = sigmas[1], sigma_min = 0; mean as
    Flow-GRPO's SDE; log-density of the sample averaged over every element (written out here on its own)."""
    torch.manual_seed(0)
    x, v, eps = torch.randn(3, 16, 2, 4, 4), torch.randn(3, 16, 2, 4, 4), torch.randn(3, 16, 2, 4, 4)
    sigmas = [1.0, 0.955, 0.9, 0.834]
    for i in range(3):
        s, s_next, s_max = sigmas[i], sigmas[i + 1], sigmas[1]
        dt = s_next - s
        std_t = s_max * s
        mean = x * (1 + std_t ** 2 / (2 * s) * dt) + v * (1 + std_t ** 2 * (1 - s) / (2 * s)) * dt
        std = std_t * math.sqrt(-dt)
        sample = mean + std * eps
        logp = (-((sample - mean) ** 2) / (2 * std ** 2) - math.log(std) - 0.5 * math.log(2 * math.pi)).mean((1, 2, 3, 4))
        res = KERNELS["wan"](x, v, torch.tensor(s), torch.tensor(s_next), noise_level=1.0,
                             sigma_max_guard=torch.tensor(s_max), noise=eps)
        assert torch.allclose(res.next_x, sample, atol=1e-6) and torch.allclose(res.logp_mean_per_dim, logp, atol=1e-5)
        rescored = KERNELS["wan"](x, v, torch.tensor(s), torch.tensor(s_next), noise_level=1.0,
                                  sigma_max_guard=torch.tensor(s_max), next_x=sample)
        assert torch.allclose(rescored.logp_mean_per_dim, logp, atol=1e-5)


class FrameMean(Reward):
    """Scores an image by its mean pixel; records the batch shapes it was called with."""

    def __init__(self):
        self.calls = []

    def __call__(self, images, prompts, metadata):
        self.calls.append((tuple(images.shape), list(prompts), list(metadata)))
        return images.mean(dim=(1, 2, 3)).double().numpy(), {"per_sample": {"m": images.mean(dim=(1, 2, 3)).numpy()}}


@pytest.mark.parametrize("frames, expect", [
    ("mean", lambda f: f.mean(1)), ("min", lambda f: f.min(1).values),
    ("first", lambda f: f[:, 0]), ("last", lambda f: f[:, -1]),
])
def test_image_rewards_score_videos_frame_by_frame(frames, expect):
    videos = torch.rand(2, 5, 3, 8, 8)
    per_frame = videos.mean(dim=(2, 3, 4))
    reward = WeightedReward.from_config({"frame_mean": {"weight": 2.0, "frames": frames,
                                                        "_target_": "test_wan.FrameMean"}})
    total, info = reward(videos, ["a", "b"], [{"k": 1}, {"k": 2}])
    assert np.allclose(total, 2 * expect(per_frame).double().numpy(), atol=1e-6)
    assert np.allclose(info["per_sample"]["frame_mean/m"], expect(per_frame).numpy(), atol=1e-6)
    shape, prompts, metadata = reward.rewards["frame_mean"].calls[0]
    n = 1 if frames in ("first", "last") else 5  # first/last score only their frame
    assert shape == (2 * n, 3, 8, 8) and prompts == ["a"] * n + ["b"] * n and metadata[n] == {"k": 2}


def test_strided_mean_of_positive_frames_is_the_reference_video_ocr_reduction():
    """Flow-GRPO's video OCR: every 4th frame (0, 4, 8, ...), the mean of those scoring above 0, 0 when none."""
    per_frame = torch.tensor([[0.5, 9, 9, 9, 0.0, 9, 9, 9, 0.7], [0.0, 9, 9, 9, 0.0, 9, 9, 9, 0.0]])
    videos = per_frame[:, :, None, None, None].expand(2, 9, 3, 2, 2).contiguous()
    reward = WeightedReward.from_config({"frame_mean": {"frames": "mean_positive", "frame_stride": 4,
                                                        "_target_": "test_wan.FrameMean"}})
    total, _ = reward(videos, ["a", "b"], [{}, {}])
    assert np.allclose(total, [0.6, 0.0]) and reward.rewards["frame_mean"].calls[0][0] == (6, 3, 2, 2)


def test_frames_option_is_checked_and_a_nan_frame_drops_the_clip():
    with pytest.raises(ConfigError, match=r"reward.jpeg_compressibility.frames='median': .* mean, min, first, last"):
        WeightedReward.from_config({"jpeg_compressibility": {"frames": "median"}})
    with pytest.raises(ConfigError, match=r"reward.ocr.frame_stride=0: score every k-th frame"):
        WeightedReward.from_config({"ocr": {"frame_stride": 0}})

    class NanOnFirstFrame(Reward):
        def __call__(self, images, prompts, metadata):
            s = np.ones(len(prompts))
            s[0] = np.nan
            return s, {}

    total, _ = WeightedReward({"r": NanOnFirstFrame()}, {"r": 1.0})(torch.rand(2, 3, 3, 4, 4), ["a", "b"], [{}, {}])
    assert np.isnan(total[0]) and total[1] == 1.0


def test_motion_and_temporal_consistency_on_known_clips():
    still = torch.full((1, 5, 3, 8, 8), 0.3)
    flicker = torch.stack([torch.zeros(3, 8, 8) if i % 2 else torch.ones(3, 8, 8) for i in range(5)])[None]
    moving = torch.zeros(1, 5, 3, 16, 16)
    for i in range(5):
        moving[0, i, :, 4:8, 2 * i:2 * i + 4] = 1.0  # a square sliding right
    clips = torch.cat([still, flicker, torch.nn.functional.interpolate(moving[0], size=8)[None]])
    reward = WeightedReward.from_config({"motion": 1.0, "temporal_consistency": {"weight": 1.0, "size": 8}})
    _, info = reward(clips, ["x"] * 3, [{}] * 3)
    motion, consistency = info["per_reward"]["motion"], info["per_reward"]["temporal_consistency"]
    assert motion[0] == 0 and motion[1] == pytest.approx(1.0) and 0 < motion[2] < 0.2
    assert consistency[0] == pytest.approx(0.0, abs=1e-6)  # constant frames centre to zero vectors
    assert consistency[1] == pytest.approx(0.0, abs=1e-6)  # and so do uniform ones, however bright
    assert 0 < consistency[2] < 1
    targeted = WeightedReward.from_config({"motion": {"target": 0.1, "scale": 10.0}})
    scores, _ = targeted(clips, ["x"] * 3, [{}] * 3)
    assert scores[0] == pytest.approx(-1.0) and scores[1] == pytest.approx(-9.0)
    # differentiable: the gradient reaches the pixels
    x = clips.clone().requires_grad_(True)
    assert reward.differentiable
    reward.score_tensor(x, ["x"] * 3, [{}] * 3).sum().backward()
    assert x.grad.abs().sum() > 0
    with pytest.raises(Exception, match=r"motion scores videos \(B, F, 3, H, W\)"):
        reward(torch.rand(2, 3, 8, 8), ["x", "y"], [{}, {}])


@pytest.mark.parametrize("reward", ["jpeg_compressibility", "motion", "temporal_consistency"])
def test_tiny_wan_raises_its_reward(tmp_path, reward):
    """Flow-GRPO through the one trainer lifts the tiny Wan's reward: the recipe's frame-wise JPEG compressibility,
    and each video reward alone (the JPEG term's weight 0). Measured on 2 cores, the last four of 24 iterations
    against the first four, in first-four within-batch stds: JPEG 2.3 (-1.229 -> -1.166; at 12 iterations only
    0.95), motion 2.1 (0.162 -> 0.171), temporal consistency 1.6 (0.467 -> 0.519). The test asks for > 1."""
    from test_plans import assert_reward_rises

    extra = [] if reward == "jpeg_compressibility" else [f"reward={reward}", "reward.jpeg_compressibility.weight=0"]
    assert_reward_rises(tmp_path, "tiny_flowgrpo_wan", 24, *extra)


def test_tiny_wan_resumes_exactly(tmp_path):
    args = [*FAST, "recipe=tiny_flowgrpo_wan", "trainer.max_steps=3", "trainer.checkpoint_every=0"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_inprocess("train", f"run_dir={straight}", *args, cwd=tmp_path).returncode == 0
    assert run_inprocess("train", f"run_dir={split}", *args, "trainer.max_steps=1", cwd=tmp_path).returncode == 0
    proc = run_inprocess("train", f"run_dir={split}", *args, "resume=auto", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("trainable", "ema"):
        a = load_file(str(straight / "checkpoints" / "step_000003" / f"{name}.safetensors"))
        b = load_file(str(split / "checkpoints" / "step_000003" / f"{name}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    rows = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    resumed = {r["step"]: r for r in map(json.loads, (split / "metrics.jsonl").read_text().splitlines())}
    assert all(resumed[r["step"]]["reward_mean"] == r["reward_mean"] for r in rows)
    first = load_file(str(split / "checkpoints" / "step_000001" / "trainable.safetensors"))
    assert any(not torch.equal(first[k], a[k]) for k in a)  # the two resumed iterations moved the weights


@pytest.mark.parametrize("recipe", ["tiny_dancegrpo", "tiny_mixgrpo", "tiny_branchgrpo", "tiny_tempflow", "tiny_nft",
                                    "tiny_refl", "tiny_adjointdpm", "tiny_online_dpo"])
def test_every_family_trains_the_tiny_wan(tmp_path, recipe):
    """Each family's tiny recipe with backbone=tiny_wan: two iterations on videos move the weights, finite
    reward (GRPO trees and side branches, matching, reward gradients through the decoded frames, online pairs)."""
    from test_plans import _trainer

    t = _trainer(tmp_path, recipe, "backbone=tiny_wan")
    assert t.backbone.family == "wan21"
    before = [p.detach().clone() for p in t.params]
    try:
        for _ in range(2):
            t.timing = {}
            m = t.run_iteration()
            t.iteration += 1
    finally:
        t.reward_runner.close()
    assert np.isfinite(m["reward_mean"])
    assert any(not torch.equal(a, p) for a, p in zip(before, t.params))


def test_offline_methods_train_on_generated_videos(tmp_path):
    """`alignrl data` with a video recipe writes an MP4 per clip; Diffusion-DPO trains the tiny Wan on those pairs
    (the clips decoded, encoded by Wan's VAE and cached)."""
    from alignrl.eval.video import read_mp4

    data = tmp_path / "pairs"
    proc = run_inprocess("data", "recipe=tiny_flowgrpo_wan", f"out={data}", "kind=pairs", "samples_per_prompt=4",
                         "num_prompts=4", "progress=false", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (data / "pairs.jsonl").read_text().splitlines()]
    assert rows and rows[0]["winner"].endswith(".mp4")
    frames, _ = read_mp4(data / rows[0]["winner"])
    assert frames.shape == (5, 32, 32, 3)
    run = tmp_path / "dpo"
    proc = run_inprocess("train", "recipe=tiny_diffusion_dpo", "backbone=tiny_wan", f"run_dir={run}",
                         f"data.offline.path={data / 'pairs.jsonl'}", *FAST, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [json.loads(x).get("policy_loss") for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(v is not None and np.isfinite(v) for v in losses)
    with pytest.raises(ConfigError, match="trains on videos; the dataset must name video files"):
        from alignrl.imagedata import load_media_tensor

        load_media_tensor(tmp_path / "x.png", WanBackbone.tiny())


def test_the_tiny_wan_trains_sharded_on_two_processes(tmp_path):
    """distributed=fsdp (as flowgrpo_wan21_14b) on the video backbone: Wan's blocks are the shard units, gradient
    checkpointing on, a sharded checkpoint written, and `alignrl eval` reads the run (MP4s included)."""
    run = tmp_path / "run"
    proc = run_inprocess("train", "recipe=tiny_flowgrpo_wan", f"run_dir={run}", *FAST, "distributed=fsdp",
                         "launcher.nproc_per_node=2", "trainer.rollout_batch_size=2", "trainer.train_batch_size=2",
                         "trainer.gradient_checkpointing=true", "trainer.checkpoint_every=2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "fsdp over 2 processes (3 shard units)" in (run / "alignrl.log").read_text()  # 2 blocks + root
    ckpt = run / "checkpoints" / "step_000002"
    assert json.loads((ckpt / "state.json").read_text())["sharded"] and (ckpt / "sharded" / ".metadata").is_file()
    out = tmp_path / "eval"
    proc = run_inprocess("eval", f"eval.checkpoint={run}", f"eval.out_dir={out}", "eval.num_prompts=2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "videos" / "001.mp4").is_file()


def test_reward_check_scores_the_clips_alignrl_sample_writes(tmp_path):
    """`alignrl sample` of a video recipe writes an MP4, a GIF and a filmstrip PNG per clip; `alignrl reward-check`
    on that folder scores the clips (not the filmstrips) with their prompts from prompts.jsonl."""
    out = tmp_path / "samples"
    proc = run_inprocess("sample", "recipe=tiny_flowgrpo_wan", f"eval.out_dir={out}", "sample.num_images=2",
                         "sample.prompts=[a red cat, a blue dog]", "sampler.eval_num_steps=3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list(out.glob("*.mp4"))) == len(list(out.glob("*.gif"))) == 4
    rows = [json.loads(x) for x in (out / "prompts.jsonl").read_text().splitlines()]
    assert rows[0]["video"] == "000_00.mp4" and rows[0]["image"] == "000_00.png"
    proc = run_inprocess("reward-check", "reward={motion: 1.0, jpeg_compressibility: 0.1}",
                         "reward.jpeg_compressibility.frames=min", f"images={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "reward_check.json").read_text())
    assert [r["image"] for r in report["rows"]] == ["000_00.mp4", "000_01.mp4", "001_00.mp4", "001_01.mp4"]
    assert [r["prompt"] for r in report["rows"]] == ["a red cat", "a red cat", "a blue dog", "a blue dog"]
    assert all(0 < r["motion"] < 1 and r["jpeg_compressibility"] < 0 for r in report["rows"])


def test_any_reward_takes_its_frame_options_on_the_command_line():
    """reward.<name>.frames / frame_stride are set for any reward, listed in its YAML or not; a bad value is a
    one-line error when the rewards are built."""
    from alignrl.config import compose

    cfg = compose(["recipe=tiny_flowgrpo", "reward.jpeg_compressibility.frames=min",
                   "reward.jpeg_compressibility.frame_stride=2", "run_dir=/tmp/alignrl-test-wan"])
    assert cfg.reward.jpeg_compressibility.frames == "min" and cfg.reward.jpeg_compressibility.frame_stride == 2
    reward = WeightedReward.from_config(cfg.reward)
    assert reward.frames["jpeg_compressibility"] == ("min", 2)
