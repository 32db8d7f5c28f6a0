"""Rewards from the command line: weights syntax, named instances, reward-check, training on a remote reward."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from alignrl.config import compose, expand_reward_weights
from alignrl.errors import ConfigError
from alignrl.rewards.base import WeightedReward, build_reward
from conftest import FAST, render_text, run_inprocess, running_server


def test_reward_weights_spelling_expands_to_a_group_list():
    out = expand_reward_weights(["trainer.max_steps=2", "reward={pickscore: 1.0, ocr: 0.5}"])
    assert out == ["trainer.max_steps=2", "reward=[pickscore,ocr]", "reward.pickscore.weight=1.0",
                   "reward.ocr.weight=0.5"]
    cfg = compose(["reward={jpeg_compressibility: 2, ocr: 0.5}"])
    assert dict(cfg.reward.jpeg_compressibility) == {"weight": 2}
    assert cfg.reward.ocr.weight == 0.5 and "min_confidence" in cfg.reward.ocr  # the group's options stay
    for bad in ("reward={ocr}", "reward={ocr: heavy}", "reward={}"):
        with pytest.raises(ConfigError, match="reward"):
            expand_reward_weights([bad])
    with pytest.raises(ConfigError, match="unknown reward 'nope'"):
        compose(["reward=[jpeg_compressibility,nope]"])


def test_one_reward_class_under_two_names():
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    reward = WeightedReward.from_config({"small": {"type": "jpeg_compressibility"},
                                         "big": {"type": "jpeg_incompressibility", "weight": 2.0, "quality": 50}})
    total, info = reward(images, ["a"] * 3, [{}] * 3)
    small, _ = build_reward("jpeg_compressibility")(images, ["a"] * 3, [{}] * 3)
    big, _ = build_reward("jpeg_incompressibility", quality=50)(images, ["a"] * 3, [{}] * 3)
    np.testing.assert_allclose(info["per_reward"]["small"], small)
    np.testing.assert_allclose(info["per_reward"]["big"], big)
    np.testing.assert_allclose(total, small + 2.0 * big)
    # errors name the option under the instance's own name
    with pytest.raises(ConfigError, match=r"reward\.geneval\.url"):
        WeightedReward.from_config({"geneval": {"type": "remote"}})


def _save(t: torch.Tensor, path):
    Image.fromarray((t.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()).save(path)


def test_reward_check_scores_a_folder(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    _save(render_text("HELLO"), folder / "a_hello.png")
    _save(torch.rand(3, 128, 320, generator=g), folder / "b_noise.png")
    _save(render_text("HELLO"), folder / "c_small.png")  # same picture, another size below
    Image.open(folder / "c_small.png").resize((160, 64)).save(folder / "c_small.png")
    (folder / "prompts.jsonl").write_text("\n".join(json.dumps({"image": n, "prompt": 'a sign that says "HELLO"'})
                                                    for n in ("a_hello.png", "b_noise.png", "c_small.png")) + "\n")
    _save(torch.zeros(3, 16, 16), folder / "grid.png")  # as `alignrl sample` writes beside its images
    proc = run_inprocess("reward-check", "reward={ocr: 1.0, jpeg_compressibility: 0.1}", f"images={folder}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "skipping 1 image(s) prompts.jsonl does not name (e.g. grid.png)" in proc.stderr
    report = json.loads((folder / "reward_check.json").read_text())
    rows = {r["image"]: r for r in report["rows"]}
    assert list(rows) == ["a_hello.png", "b_noise.png", "c_small.png"]
    assert rows["a_hello.png"]["ocr"] >= 0.9 and rows["b_noise.png"]["ocr"] <= 0.2
    for r in rows.values():
        assert r["total"] == pytest.approx(r["ocr"] + 0.1 * r["jpeg_compressibility"])
    # the noise image is far less compressible than rendered text
    assert rows["b_noise.png"]["jpeg_compressibility"] < rows["a_hello.png"]["jpeg_compressibility"]
    assert report["summary"]["ocr"]["mean"] == pytest.approx(np.mean([r["ocr"] for r in rows.values()]))
    assert report["prompts"].endswith("prompts.jsonl")
    assert "| a_hello.png |" in proc.stdout and "| reward | mean |" in proc.stdout
    assert not (tmp_path / "outputs").exists()  # a check writes no run directory

    # one prompt for all, a glob, another report path; a prompt without quotes is unscored, not fatal
    out = tmp_path / "r.json"
    proc = run_inprocess("reward-check", "reward=ocr", f"images={folder}/a_*.png", "prompts=just a sign", f"out={out}",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert [r["image"] for r in report["rows"]] == ["a_hello.png"] and report["rows"][0]["ocr"] is None
    assert report["summary"]["ocr"]["unscored"] == 1


@pytest.mark.parametrize("args, needle", [
    (["images=nowhere/"], "names no image files"),
    (["prompts=missing.txt"], "prompts file 'missing.txt' not found"),
    (["prompts=two.txt"], "holds 2 prompts for 1 images"),
])
def test_reward_check_bad_input_is_one_line(tmp_path, args, needle):
    folder = tmp_path / "imgs"
    folder.mkdir()
    _save(torch.zeros(3, 8, 8), folder / "x.png")
    (tmp_path / "two.txt").write_text("one\ntwo\n")
    full = [f"images={folder}", *args] if not args[0].startswith("images=") else args
    proc = run_inprocess("reward-check", "reward=jpeg_compressibility", *full, cwd=tmp_path)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("alignrl: error: ") and needle in last and "Traceback" not in proc.stderr, proc.stderr


def test_training_on_a_remote_reward_matches_in_process(tmp_path):
    """A tiny run scored by a server on loopback logs the same rewards as the same run scored in-process."""
    runs = {}
    with running_server(build_reward("jpeg_compressibility")) as url:
        proc = run_inprocess("train", *FAST, "reward=remote", f"reward.remote.url={url}", f"run_dir={tmp_path / 'remote'}",
                       cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
    proc = run_inprocess("train", *FAST, f"run_dir={tmp_path / 'local'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name in ("remote", "local"):
        runs[name] = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in runs["remote"]] == [1, 2]
    for remote, local in zip(runs["remote"], runs["local"]):
        # PNG carries the uint8 image the JPEG reward encodes in-process: identical scores, identical run
        assert remote["reward_mean"] == local["reward_mean"]
        assert remote["reward/remote_mean"] == local["reward/jpeg_compressibility_mean"]
        assert remote["policy_loss"] == local["policy_loss"]
        assert math.isfinite(remote["reward_std"])


def test_reward_check_takes_a_long_prompt_as_text(tmp_path):
    from alignrl.rewards.check import pair_prompts

    long = "a very detailed prompt, " * 20  # longer than a file name may be
    files = [tmp_path / "a.png", tmp_path / "b.png"]
    kept, prompts, metadata, source = pair_prompts(files, tmp_path, long)
    assert kept == files and prompts == [long, long] and metadata == [{}, {}]
    assert source == "one prompt for all images"
