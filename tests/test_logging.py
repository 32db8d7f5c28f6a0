"""MetricsLogger: plain progress lines off a terminal, alignrl.log, plots during and after training, and wandb
(WANDB_MODE precedence, images)."""

import json
import re

import pytest
import torch
from conftest import FAST, run_cli
from PIL import Image

from alignrl.errors import ConfigError
from alignrl.training.logging import MetricsLogger, progress_line

LINE = re.compile(r"^step (\d+)/(\d+) \((\d+)%\) \| [\d.]+ s/it \| ETA \d+:\d\d:\d\d \| reward -?[\d.e+-]+")


def test_real_run_logs_lines_plots_and_honours_wandb_mode_disabled(tmp_path):
    """A subprocess's stderr is a pipe: one plain line per iteration, no carriage-return bar; alignrl.log gets
    the lines and the notices; plots/ is drawn; WANDB_MODE=disabled beats logger.mode=offline."""
    run = tmp_path / "run"
    fast = [o for o in FAST if not o.startswith(("trainer.max_steps=", "logger.progress_bar=", "logger.plots="))]
    proc = run_cli("train", f"run_dir={run}", *fast, "trainer.max_steps=3", "logger=wandb", "logger.mode=offline",
                   "logger.progress_bar=true", env={"WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "\r" not in proc.stderr  # no tqdm bar redrawn in place
    lines = [ln for ln in proc.stderr.splitlines() if LINE.match(ln)]
    steps = [int(LINE.match(ln).group(1)) for ln in lines]
    assert steps[0] == 1 and steps[-1] == 3 and steps == sorted(set(steps)), proc.stderr
    assert lines[-1].startswith("step 3/3 (100%)")
    log = (run / "alignrl.log").read_text()
    for ln in lines:
        assert ln in log
    assert "trainable tensors" in log  # the start notice passed to write()
    assert "wandb disabled (WANDB_MODE=disabled)" in log
    assert not (run / "wandb").exists() and not (run / "wandb_run_id").exists()
    for name in ("reward.png", "kl.png", "clipfrac.png"):
        with Image.open(run / "plots" / name) as im:
            im.verify()
    with Image.open(run / "plots" / "reward.png") as im:
        assert len(set(im.convert("RGB").getdata())) > 20  # drawn, not blank


def make_logger(run_dir, total=5, start=0, **cfg):
    return MetricsLogger(run_dir, {"kind": "jsonl", **cfg}, {}, True, total, start, run_dir.name)


def test_progress_lines_throttle_and_log_file(tmp_path, capsys):
    logger = make_logger(tmp_path, total=5, log_every_s=3600, plot_every_s=3600)
    for step in range(1, 4):  # stopped early (a time budget): step 3 of 5 is the last
        logger.log(step, {"reward_mean": 0.1 * step, "clipfrac": 0.02, "lr": 0.01, "train_seconds": float(step)})
        logger.progress(step, {"reward_mean": 0.1 * step, "clipfrac": 0.02, "lr": 0.01})
    logger.log(4, {"eval/reward_mean": 0.7})
    logger.progress(4, {"reward_mean": 0.4, "eval/reward_mean": 0.7})  # an eval result is always shown
    logger.progress(5, {"reward_mean": 0.5})  # the last step is always shown
    logger.write("alignrl: a notice\nover two lines")
    logger.close()
    err = capsys.readouterr().err
    shown = [ln for ln in err.splitlines() if ln.startswith("step ")]
    assert [ln.split()[1] for ln in shown] == ["1/5", "4/5", "5/5"]  # steps 2 and 3 held back (log_every_s)
    assert "eval 0.7" in shown[1] and shown[0].endswith("reward 0.1 clip 0.02 lr 0.01")
    log = (tmp_path / "alignrl.log").read_text().splitlines()
    assert all(re.match(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] ", ln) for ln in log)
    assert [ln.split("] ", 1)[1] for ln in log] == shown + ["alignrl: a notice", "over two lines"]
    # the close drew the plots once, from all rows
    assert (tmp_path / "plots" / "reward.png").is_file() and len(logger.plot_seconds) == 1


def test_pending_line_printed_at_close_and_progress_bar_false(tmp_path, capsys):
    logger = make_logger(tmp_path, total=10, log_every_s=3600, progress_bar=False, plots=False)
    logger.progress(1, {"reward_mean": 1.0})
    logger.progress(2, {"reward_mean": 2.0})  # held back; a time-budget stop ends the run here
    logger.close()
    assert "step " not in capsys.readouterr().err  # progress_bar=false: no progress on the console
    log = (tmp_path / "alignrl.log").read_text()
    assert "step 1/10 (10%)" in log and "step 2/10 (20%)" in log  # the log file still gets the lines
    assert not (tmp_path / "plots").exists()  # plots=false


def test_plots_refresh_during_training_and_at_close(tmp_path):
    logger = make_logger(tmp_path, total=50, plot_every_s=0)
    logger.log(1, {"reward_mean": 0.0, "train_seconds": 1.0})  # due at once: plot_every_s=0
    png = tmp_path / "plots" / "reward.png"
    assert png.is_file() and len(logger.plot_seconds) == 1
    first = png.read_bytes()
    for step in range(2, 40):
        logger.log(step, {"reward_mean": step / 40, "train_seconds": float(step)})
    # the next refresh waits at least 50x the last one's cost, so 38 quick rows did not redraw 38 times
    assert len(logger.plot_seconds) < 5
    logger.close()
    assert png.read_bytes() != first  # the close drew every row
    n = len(logger.plot_seconds)
    logger.refresh_plots()
    assert len(logger.plot_seconds) == n  # no new row since the last drawing: skipped


def test_resumed_logger_keeps_rows_and_plots_them(tmp_path):
    rows = [{"step": s, "reward_mean": s / 10, "train_seconds": float(s)} for s in range(1, 7)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    logger = make_logger(tmp_path, total=8, start=4)  # resumed from the step-4 checkpoint: 5, 6 are dropped
    logger.log(5, {"reward_mean": 5.5, "train_seconds": 5.0})
    logger.close()
    from alignrl.plots import Curves, read_metrics

    assert Curves(read_metrics(tmp_path / "metrics.jsonl")).series("reward_mean") == \
        ([1, 2, 3, 4, 5], [0.1, 0.2, 0.3, 0.4, 5.5])
    assert (tmp_path / "plots" / "reward.png").is_file()


def test_progress_line_format():
    line = progress_line(12, 40, {"reward_mean": 0.4123, "kl": 0.001, "approx_kl": 0.5, "clipfrac": 0.02,
                                  "lr": 0.01, "eval/reward_mean": float("nan")}, 2.1)
    assert line == "step 12/40 (30%) | 2.10 s/it | ETA 0:00:59 | reward 0.412 kl 0.001 clip 0.02 lr 0.01"
    assert progress_line(1, 40, {"approx_kl": 0.5}, None) == "step 1/40 (2%) | approx_kl 0.5"
    # a training-time budget (trainer.max_minutes=3, max_steps huge): time against the budget, and its ETA
    line = progress_line(12, 1_000_000, {"train_seconds": 84.4, "reward_mean": 0.5}, 9.0, budget_s=180)
    assert line == "step 12 | train 0:01:24/0:03:00 (47%) | 9.00 s/it | ETA 0:01:36 | reward 0.5"
    # the sooner end wins: 2 steps left at 9 s/it before 96 s of budget
    assert "ETA 0:00:18" in progress_line(38, 40, {"train_seconds": 84.4}, 9.0, budget_s=180)


def test_bad_logger_settings_are_config_errors(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="logger.log_every_s"):
        make_logger(tmp_path, log_every_s="often")
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ConfigError, match="WANDB_MODE='sometimes'"):
        make_logger(tmp_path, kind="wandb", mode="offline")


def test_wandb_mode_env_wins_and_images_reach_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    off = make_logger(tmp_path / "off", kind="wandb", mode="offline", progress_bar=False)
    off.log(1, {"reward_mean": 1.0})
    off.close()
    assert off.wandb is None and not (tmp_path / "off" / "wandb").exists()
    assert not (tmp_path / "off" / "wandb_run_id").exists()

    monkeypatch.setenv("WANDB_MODE", "offline")  # and logger.mode=disabled: the environment wins again
    run = tmp_path / "on"
    Image.new("RGB", (16, 16), (255, 0, 0)).save(tmp_path / "rollouts.png")
    Image.new("RGB", (16, 16), (0, 0, 255)).save(tmp_path / "eval.png")
    from alignrl.eval.video import write_mp4  # a video backbone's eval clip goes to wandb as a video

    write_mp4(tmp_path / "eval_video.mp4", torch.rand(5, 3, 16, 16))
    logger = make_logger(run, kind="wandb", mode="disabled", progress_bar=False, plots=False)
    assert logger.wandb is not None
    logger.log(1, {"reward_mean": 1.0}, images={"rollouts": tmp_path / "rollouts.png", "eval": tmp_path / "eval.png",
                                                "eval_video": tmp_path / "eval_video.mp4"})
    logger.close()
    media = list(run.glob("wandb/offline-run-*/files/media/images/**/*.png"))
    assert sorted(p.name.split("_")[0] for p in media) == ["eval", "rollouts"]
    videos = list(run.glob("wandb/offline-run-*/files/media/videos/**/*.mp4"))
    assert len(videos) == 1 and videos[0].name.startswith("eval_video")
