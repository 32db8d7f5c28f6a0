"""The `alignrl` console script (its entry point, in-process where no process of its own is needed): listing,
config printing, and one-line errors on bad input."""

import json
from pathlib import Path

from conftest import FAST, run_cli, run_inprocess


def _one_line_error(proc, *needles):
    assert proc.returncode != 0, proc.stdout + proc.stderr
    err = proc.stderr.strip().splitlines()
    assert err, "expected an error message"
    last = err[-1]
    assert last.startswith("alignrl: error: "), proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for n in needles:
        assert n in last, last
    return last


def test_recipes_lists_every_recipe_with_description():
    proc = run_cli("recipes")
    assert proc.returncode == 0
    for name in ("tiny_flowgrpo", "tiny_flowgrpo_flux", "flowgrpo_sd35", "flowgrpo_sd35_geneval",
                 "flowgrpo_sd35_ocr", "flowgrpo_sd35_pickscore", "flowgrpo_flux"):
        line = next(ln for ln in proc.stdout.splitlines() if ln.strip().startswith(name + " "))
        assert len(line.split(None, 1)[1]) > 20  # a real description


def test_help_and_usage():
    proc = run_cli("--help")
    assert proc.returncode == 0 and "alignrl train" in proc.stdout and "recipes" in proc.stdout
    proc = run_cli("train", "--help")
    assert proc.returncode == 0
    assert "recipe" in proc.stdout and "tiny_flowgrpo" in proc.stdout and "backbone" in proc.stdout


def test_cfg_job_prints_resolved_config_with_overrides():
    proc = run_inprocess("train", "recipe=flowgrpo_sd35_geneval", "trainer.max_steps=20", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "pretrained: stabilityai/stable-diffusion-3.5-medium" in out
    assert "max_steps: 20" in out and "beta: 0.04" in out and "geneval:" in out


def test_unknown_recipe_lists_valid_ones(tmp_path):
    line = _one_line_error(run_inprocess("train", "recipe=nope", cwd=tmp_path), "unknown recipe 'nope'", "tiny_flowgrpo")
    assert "flowgrpo_sd35" in line


def test_unknown_group_option(tmp_path):
    _one_line_error(run_inprocess("train", "backbone=sd99", cwd=tmp_path), "unknown backbone 'sd99'", "tiny_flux")


def test_unknown_command():
    proc = run_cli("fly")
    assert proc.returncode == 2 and "unknown command 'fly'" in proc.stderr


def test_missing_prompt_file(tmp_path):
    _one_line_error(run_inprocess("train", "data.train=/no/such/prompts.txt", *FAST, cwd=tmp_path),
                    "prompt file not found", "/no/such/prompts.txt")


def test_batch_arithmetic_checked_before_models_load(tmp_path):
    line = _one_line_error(
        run_inprocess("train", *FAST, "trainer.rollout_batch_size=5", cwd=tmp_path),
        "trainer.rollout_batch_size=5",
    )
    assert "8" in line  # names the per-process sample count it must divide
    _one_line_error(run_inprocess("train", *FAST, "launcher.nproc_per_node=3", cwd=tmp_path), "3 processes")
    _one_line_error(run_inprocess("train", *FAST, "algorithm.group_size=1", cwd=tmp_path), "group_size")


def test_checkpoint_path_that_is_not_one(tmp_path):
    (tmp_path / "junk").mkdir()
    _one_line_error(run_inprocess("train", f"resume={tmp_path / 'junk'}", *FAST, cwd=tmp_path),
                    "is not a checkpoint")
    _one_line_error(run_inprocess("eval", f"eval.checkpoint={tmp_path / 'junk'}", cwd=tmp_path), "is not a checkpoint")


def test_reward_whose_weights_cannot_load_is_named(tmp_path):
    # the hub id is not cached here: a one-line error naming the reward and the option, no traceback
    proc = run_inprocess("train", "reward=pickscore", *FAST, cwd=tmp_path)
    _one_line_error(proc, "pickscore")
    assert "set reward.pickscore." in proc.stderr


def test_train_writes_run_dir_layout(tmp_path):
    proc = run_inprocess("train", *FAST, "trainer.checkpoint_every=1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    runs = list((tmp_path / "outputs" / "tiny_flowgrpo").iterdir())
    assert len(runs) == 1
    run = runs[0]
    assert (run / "config.yaml").is_file() and (run / ".hydra" / "config.yaml").is_file()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward_mean", "clipfrac", "approx_kl", "policy_loss", "lr", "zero_std_group_frac",
                "reward/jpeg_compressibility_mean", "time/rollout", "time/update"):
        assert key in rows[0], key
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000001", "step_000002"]


def test_multirun_sweep_gives_one_run_per_point(tmp_path):
    proc = run_inprocess("train", "-m", "seed=1,2", *FAST, "trainer.max_steps=1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    status = sorted((tmp_path / "multirun").rglob("status.json"))
    assert len(status) == 2
    assert all(json.loads(s.read_text())["state"] == "finished" for s in status)
    seeds = sorted(s.parent.joinpath("config.yaml").read_text().split("seed: ")[1].split()[0] for s in status)
    assert seeds == ["1", "2"]


def test_every_script_compiles_on_the_oldest_python_we_support():
    """scripts/*.py are run by hand, not imported by the suite: a syntax only a newer Python accepts (an f-string
    reusing its own quotes, 3.12+) would reach users as a SyntaxError."""
    import ast

    for path in sorted((Path(__file__).resolve().parent.parent / "scripts").glob("*.py")):
        ast.parse(path.read_text(encoding="utf-8"), filename=str(path), feature_version=(3, 10))
