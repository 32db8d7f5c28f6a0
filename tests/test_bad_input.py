"""Bad values stop `alignrl train` with one line naming the problem and the fix, before any model loads, and
leave nothing behind (no run directory, no rewritten config.yaml). Driven through the real CLI entry point."""


import pytest

from alignrl.cli import main as cli


def _fails(capsys, *args) -> str:
    with pytest.raises(SystemExit) as e:
        cli(list(args))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("alignrl: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("override, expected", [
    ("trainer.max_stpes=3", "did you mean trainer.max_steps"),
    ("algorithm.lr=inf", "algorithm.lr=inf is not a finite number"),
    ("algorithm.clip_range=nan", "algorithm.clip_range=nan is not a finite number"),
    ("algorithm.beta=nan", "algorithm.beta=nan is not a finite number"),
    ("seed=abc", "seed='abc' must be a number"),
    ("trainer.ema.enabled=maybe", "must be true or false"),
])
def test_bad_values_stop_before_hydra_makes_a_run_dir(tmp_path, monkeypatch, capsys, override, expected):
    monkeypatch.chdir(tmp_path)
    err = _fails(capsys, "train", override)
    assert expected in err, err
    assert "+trainer" not in err  # never Hydra's hint to append the misspelt key
    assert not (tmp_path / "outputs").exists()


def test_type_checks_follow_a_changed_config_file(tmp_path, monkeypatch):
    """The defaults that plain overrides are type-checked against are composed once per process and set of group
    choices, and composed again when a config file changes: a user's recipe whose seed turns from a number into a
    string is checked against the new file."""
    import os

    from alignrl.config import precheck_overrides
    from alignrl.errors import ConfigError

    recipe = tmp_path / "configs" / "recipe" / "my_tiny.yaml"
    recipe.parent.mkdir(parents=True)
    recipe.write_text("# @package _global_\ndefaults:\n  - tiny_flowgrpo\nseed: 3\n")
    monkeypatch.setenv("ALIGNRL_CONFIG_PATH", str(tmp_path / "configs"))
    with pytest.raises(ConfigError, match="seed='x' must be a number"):
        precheck_overrides(["recipe=my_tiny", "seed=x"])
    precheck_overrides(["recipe=my_tiny", "seed=4"])  # again from the kept defaults: a number is fine
    recipe.write_text("# @package _global_\ndefaults:\n  - tiny_flowgrpo\nseed: abc\n")
    stat = recipe.stat()
    os.utime(recipe, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a later time, whatever the clock's grain
    precheck_overrides(["recipe=my_tiny", "seed=x"])  # the new file's default is a string: any string is fine


def test_optional_offline_settings_name_the_plus_and_typos_the_setting(tmp_path, monkeypatch, capsys):
    """data.offline's optional settings (balance_power, min_score, ...) are absent from a recipe that leaves them
    out: setting one without '+' names the '+' form (not a "did you mean" list of other keys), and a misspelt one
    given with '+' is refused by name instead of being ignored."""
    monkeypatch.chdir(tmp_path)
    path = "data.offline.path=rows.jsonl"
    err = _fails(capsys, "train", "recipe=shapes_sft", path, "data.offline.balance_power=0.5")
    assert "+data.offline.balance_power=VALUE" in err and "did you mean" not in err, err
    err = _fails(capsys, "train", "recipe=shapes_sft", path, "+data.offline.balance_pwr=0.5")
    assert "data.offline.balance_pwr is not a setting of data.offline; did you mean data.offline.balance_power?" \
        in err, err
    err = _fails(capsys, "train", "recipe=shapes_sft", path, "+data.offline.colour=1")
    assert "data.offline.colour is not a setting" in err and "min_score" in err, err
    assert not (tmp_path / "outputs").exists()


def test_bad_files_and_run_dirs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "latin1.txt").write_bytes("a caf\xe9 at night\n".encode("latin-1"))
    err = _fails(capsys, "train", "data.train=latin1.txt")
    assert "not UTF-8" in err and "latin1.txt" in err
    assert not (tmp_path / "outputs").exists()  # the failed start removed what Hydra created
    (tmp_path / "a_file").write_text("x")
    assert "is a file, not a directory" in _fails(capsys, "train", "run_dir=a_file")
    assert "is a file, not a directory" in _fails(capsys, "train", "run_dir=a_file/run")
    err = _fails(capsys, "train", "run_dir=fresh", "data.train=missing.txt")
    assert "prompt file not found" in err and not (tmp_path / "fresh").exists()


def test_refused_resume_keeps_the_runs_config(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    step = run / "checkpoints" / "step_000004"
    step.mkdir(parents=True)
    (step / "state.json").write_text('{"iteration": 4}')
    (step / "COMPLETE").write_text("ok\n")
    (run / "config.yaml").write_text("seed: 7  # the run's own\n")
    err = _fails(capsys, "train", f"run_dir={run}", "seed=8")
    assert "already holds checkpoints" in err and "resume=auto" in err
    assert (run / "config.yaml").read_text() == "seed: 7  # the run's own\n"
    assert step.is_dir()  # nothing of the run was touched


def test_hydra_quoting_of_reward_check_prompts(tmp_path, capsys):
    """The README's OCR example: a prompt with spaces and quotes needs no Hydra quoting."""
    from conftest import render_text
    from alignrl.eval.report import to_pil

    folder = tmp_path / "imgs"
    folder.mkdir()
    to_pil(render_text("HELLO").unsqueeze(0))[0].save(folder / "a.png")
    cli(["reward-check", "reward=jpeg_compressibility", f"images={folder}", 'prompts=a sign that says "HELLO"'])
    import json

    report = json.loads((folder / "reward_check.json").read_text())
    assert report["rows"][0]["prompt"] == 'a sign that says "HELLO"', report
