"""The ShapeWorld arena's report (alignrl/arena.py, scripts/bench_shapes.py) on synthetic metrics files."""

import importlib.util
import json
import sys

import numpy as np
import pytest
from PIL import Image

from alignrl import arena
from alignrl.arena import (BEGIN, END, EvalPoint, eval_series, goal_checks, iteration_stats, load_run, load_warnings,
                           plot_arena, render_section, set_table, step_records, time_to_gain, value_at, write_report)
from conftest import REPO

BLUE = (31, 119, 180)  # matplotlib's C0
BLUE_BAND = (228, 239, 246)  # C0 at alpha 0.12 on white: the interval band


def bench_module():
    spec = importlib.util.spec_from_file_location("bench_shapes", REPO / "scripts" / "bench_shapes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def eval_keys(curves, minutes, ci=True):
    keys = {}
    for s, f in curves.items():
        v = min(1.0, f(minutes))
        keys.update({f"eval/{s}/images/strict": v, f"eval/{s}/num_images": 80, f"eval/{s}/num_prompts": 40,
                     **{f"eval/{s}/tag/{t}/strict": v for t in arena.TAGS}})
        if ci:
            keys.update({f"eval/{s}/images/strict_ci_lo": max(0.0, v - 0.05),
                         f"eval/{s}/images/strict_ci_hi": min(1.0, v + 0.05)})
    return keys


def synthetic_rows(curves, minutes=30.0, iteration_s=21.0, every_min=5.0, ci=True):
    """Rows as the trainer writes them: an eval row at step 0, then one row per iteration, with the evaluation
    merged into the row of the first iteration that crosses each multiple of ``every_min``."""
    rows = [{"step": 0, "train_seconds": 0.0, **eval_keys(curves, 0.0, ci)}]
    seconds, step, every = 0.0, 0, every_min * 60
    while seconds < minutes * 60:
        before, seconds, step = seconds, seconds + iteration_s, step + 1
        row = {"step": step, "reward_mean": 0.3, "time/rollout": 0.6 * iteration_s, "time/reward_wait": 0.1,
               "time/update": 0.4 * iteration_s - 0.1, "time/iteration": iteration_s, "train_seconds": seconds}
        if int(seconds // every) > int(before // every):
            row.update(eval_keys(curves, seconds / 60, ci))
        rows.append(row)
    return rows


def write_run(run_dir, rows, state="finished"):
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "status.json").write_text(json.dumps({"state": state}))
    (run_dir / "config.yaml").write_text("sampler:\n  eval_num_steps: 20\n  eval_guidance_scale: 3.0\n"
                                         "eval:\n  images_per_prompt: 2\n")
    return run_dir


def colour_pixels(path, rgb, tol):
    arr = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int((np.abs(arr - np.array(rgb)).max(axis=2) <= tol).sum())


LINEAR = {"held_out": lambda m: 0.3 + 0.01 * m, "in_dist": lambda m: 0.5 + 0.01 * m}


def test_marks_read_the_nearest_evaluation_within_one_iteration():
    records = step_records(synthetic_rows(LINEAR, minutes=30, iteration_s=21.0))
    series = eval_series(records, "held_out")
    assert [p.step for p in series][:3] == [0, 15, 29]  # 315 s and 609 s: the first iterations past 300 and 600
    stats = iteration_stats(records)
    assert stats["iterations"] == 86 and stats["iteration_s"] == pytest.approx(21.0)
    assert stats["rollout_s"] == pytest.approx(12.6) and stats["max_iteration_s"] == pytest.approx(21.0)
    p = value_at(series, 300, stats["max_iteration_s"])
    assert p.seconds == 315 and p.value == pytest.approx(0.3 + 0.01 * 5.25)
    assert (p.lo, p.hi) == (pytest.approx(p.value - 0.05), pytest.approx(p.value + 0.05))
    assert value_at(series, 1800, 21.0).seconds == 1806
    assert value_at(series, 0, 21.0).step == 0
    assert value_at(series, 2400, 21.0) is None  # the run stopped at 30 minutes
    assert value_at(series, 1000, 21.0) is None  # no evaluation within one iteration of 1000 s


def test_time_to_gain_interpolates_and_says_when_not_reached():
    series = eval_series(step_records(synthetic_rows(LINEAR)), "held_out")
    # accuracy is linear in training time, so interpolating between evaluations is exact
    assert time_to_gain(series, 0.1) == pytest.approx(600.0)
    assert time_to_gain(series, 0.2) == pytest.approx(1200.0)
    assert time_to_gain(series, 0.4) is None  # 0.3 -> 0.6 at most
    points = [EvalPoint(0, 0.0, 0.2), EvalPoint(5, 300.0, 0.15), EvalPoint(10, 600.0, 0.25), EvalPoint(15, 900.0, 0.45)]
    assert time_to_gain(points, 0.1) == pytest.approx(600 + (0.3 - 0.25) / 0.2 * 300)  # 675 s
    assert time_to_gain(points, 0.3) is None
    assert time_to_gain(points[1:], 0.1) is None  # no start evaluation: no baseline to gain over


def test_resumed_run_rows_replace_the_ones_they_repeat():
    first = synthetic_rows(LINEAR, minutes=5, iteration_s=20.0)[:11]  # steps 0..10 of a run killed there
    first[8].update(eval_keys(LINEAR, 0.0))  # an evaluation the first attempt made at step 8
    first[8]["eval/held_out/images/strict"] = 0.99
    resumed = [dict(r, reward_mean=0.7) for r in synthetic_rows(LINEAR, minutes=5, iteration_s=20.0)[7:16]]
    final = {"step": 15, "train_seconds": 300.0, **eval_keys(LINEAR, 5.0)}  # the final evaluation's own row
    records = step_records(first + resumed + [final])
    assert [s for s, _ in records] == list(range(16))
    held = eval_series(records, "held_out")
    assert [p.step for p in held] == [0, 15] and max(p.value for p in held) < 0.9  # the stale step-8 eval is gone
    assert records[15][1]["time/iteration"] == 20.0 and records[15][1]["reward_mean"] == 0.7
    assert iteration_stats(records)["iterations"] == 15
    # killed right after logging step 7, resumed from step 6: the repeated training row of step 7 wins
    again = synthetic_rows(LINEAR, minutes=5, iteration_s=20.0)
    repeat = dict(again[7], reward_mean=0.5)
    again[7] = dict(again[7], **{"eval/in_dist/images/strict": 0.0})  # only the first attempt evaluated there
    records = step_records(again[:8] + [repeat] + again[8:])
    assert dict(records)[7]["reward_mean"] == 0.5 and "eval/in_dist/images/strict" not in dict(records)[7]


def test_missing_set_and_missing_ci(tmp_path):
    run = load_run(write_run(tmp_path / "shapes_flowgrpo", synthetic_rows({"held_out": LINEAR["held_out"]}, ci=False)))
    assert run.series("in_dist") == [] and len(run.series("held_out")) == 7
    held = set_table([run], "held_out", [0, 5, 10, 20, 30])
    assert "| 0.300 |" in held and "[" not in held  # no interval without CI columns
    assert "| 10.0 min | 20.0 min |" in held  # time to +0.1 and +0.2
    missing = set_table([run], "in_dist", [0, 5, 10, 20, 30])
    assert "no evaluations of in_dist" in missing and "no start eval" in missing
    (goal, reached, evidence), flow = goal_checks([run])
    assert not reached and "no evaluation of in_dist" in evidence
    assert "best held_out 0.601 (shapes_flowgrpo, 30.1 min)" in evidence
    assert flow[1] and "+0.2 at 20.0 min" in flow[2]
    path = plot_arena([run], tmp_path / "arena.png", 30)
    with_ci = load_run(write_run(tmp_path / "ci" / "shapes_flowgrpo", synthetic_rows({"held_out": LINEAR["held_out"]})))
    banded = plot_arena([with_ci], tmp_path / "banded.png", 30)
    assert colour_pixels(path, BLUE, 12) > 200  # the line is drawn either way, the band only with an interval
    assert colour_pixels(banded, BLUE_BAND, 4) > 10 * colour_pixels(path, BLUE_BAND, 4)


def test_goals_reached_not_reached_and_not_checked(tmp_path):
    flow = load_run(write_run(tmp_path / "shapes_flowgrpo", synthetic_rows(LINEAR)))
    fast = load_run(write_run(tmp_path / "shapes_awm", synthetic_rows(
        {"held_out": lambda m: 0.5 + 0.015 * m, "in_dist": lambda m: 0.6 + 0.02 * m})))
    (g1, r1, e1), (g2, r2, e2) = goal_checks([flow, fast])
    assert "0.95" in g1 and "0.8" in g1 and r1
    assert e1.startswith("shapes_awm at 20.3 min") and "held_out 0.804" in e1  # 1218 s: the first eval past 0.8
    assert r2 and "+0.2 at 20.0 min" in e2 and "start 0.300 [0.250, 0.350]" in e2
    slow = load_run(write_run(tmp_path / "slow" / "shapes_flowgrpo", synthetic_rows(
        {"held_out": lambda m: 0.3 + 0.005 * m, "in_dist": lambda m: 0.5 + 0.005 * m}, minutes=10)))
    (_, r1, e1), (_, r2, e2) = goal_checks([slow])
    assert not r1 and not r2
    assert "best in_dist 0.551" in e1 and "cover only 10.2 of 30 training minutes" in e1  # 0.5 + 0.005 * 10.15
    assert e2 == ("start 0.300 [0.250, 0.350]; 0.351 [0.301, 0.401] (+0.051) at 10.2 min; "
                  "the runs cover only 10.2 of 30 training minutes")
    (_, r1, _), (_, r2, e2) = goal_checks([fast])
    assert r1 and r2 is None and e2 == "no shapes_flowgrpo run in this arena"


def test_load_warnings():
    idle = {"load_before": [0.1, 0.2, 0.3], "load_during": 2.1, "cpu_cores": 1.95}
    assert load_warnings(idle, 1.5) == []
    busy = {"load_before": [2.2, 2.0, 1.9], "load_during": 4.0, "cpu_cores": 1.0}
    warnings = load_warnings(busy, 1.5)
    assert len(warnings) == 2 and "2.20 before" in warnings[0] and "3.00 beyond its own 1.00 cores" in warnings[1]
    assert load_warnings({"load_before": [0.0], "load_during": None, "cpu_cores": None}, 1.5) == []


def test_report_section_and_doc_rewrite(tmp_path):
    runs = [load_run(write_run(tmp_path / "shapes_flowgrpo", synthetic_rows(LINEAR)),
                     machine={"started": "2026-01-02T03:04:05+00:00", "wall_s": 2100.0, "exit_code": 0,
                              "load_before": [2.5, 2.0, 1.0], "load_during": 2.0, "cpu_cores": 1.9,
                              "load_after": [2.0, 2.0, 1.5]})]
    section = render_section(runs, minutes=30, marks_min=[0, 5, 10, 20, 30], eval_every_min=5, plot="arena.png",
                             date="2026-01-02", commands=["python scripts/bench_shapes.py --minutes 30"], nproc=2)
    assert section.startswith(BEGIN) and section.endswith(END)
    assert "![ShapeWorld arena" in section and "    python scripts/bench_shapes.py --minutes 30" in section
    assert "    shapes_flowgrpo: not recorded" in section  # its training command
    assert "**not checked** (no shapes_flowgrpo run" in render_section(
        [], minutes=30, marks_min=[0, 30], eval_every_min=30, plot=None, date="d", commands=[], nproc=None)
    assert "**not reached**" in section and "**reached**" in section
    assert "(here at most 18.0 s)" in section  # 1218 s for the 20-minute mark, the largest offset
    assert "| shapes_flowgrpo | 0.300 [0.250, 0.350] | 0.352 [0.302, 0.402] |" in section
    assert "| shapes_flowgrpo | 86 | 12.60 | 0.10 | 8.30 | 21.00 | 30.1 |" in section  # the time split
    assert "Warning**: shapes_flowgrpo: the machine was not idle (load 2.50 before it started)" in section
    doc = tmp_path / "docs" / "arena.md"
    write_report(doc, arena.placeholder_section("python scripts/bench_shapes.py"))
    assert doc.read_text().startswith("# ShapeWorld arena") and "No arena run" in doc.read_text()
    doc.write_text(doc.read_text() + "\nNotes kept below the report.\n")
    write_report(doc, section)
    write_report(doc, section)
    text = doc.read_text()
    assert text.count(BEGIN) == 1 and "No arena run" not in text and text.endswith("Notes kept below the report.\n")


def test_script_reuse_writes_report_and_plot(tmp_path, capsys):
    bench = bench_module()
    out = tmp_path / "runs"
    write_run(out / "shapes_flowgrpo", synthetic_rows(LINEAR))
    write_run(out / "shapes_awm", synthetic_rows({"held_out": lambda m: 0.4}), state="failed")  # no in_dist, no gain
    (out / "arena.json").write_text(json.dumps({"runs": {"shapes_flowgrpo": {
        "started": "2026-01-02T03:04:05+00:00", "wall_s": 2000.0, "exit_code": 0, "load_before": [0.1, 0.1, 0.1],
        "load_during": 2.0, "cpu_cores": 1.9, "load_after": [1.9, 1.5, 0.8], "nproc": 2, "minutes": 30.0,
        "command": "python -m alignrl.cli train recipe=shapes_flowgrpo trainer.max_minutes=30",
        "arena_command": "python scripts/bench_shapes.py --recipes shapes_flowgrpo shapes_awm"}}}))
    doc, plot = tmp_path / "docs" / "arena.md", tmp_path / "docs" / "arena.png"
    code = bench.main(["--recipes", "shapes_flowgrpo", "shapes_awm", "--reuse", "--out", str(out), "--doc", str(doc),
                       "--plot", str(plot)])
    assert code == 0
    text = doc.read_text()
    assert "Measured 2026-01-02." in text and "on 2 CPU core(s)" in text and "(`--reuse`)" in text
    assert "![ShapeWorld arena: strict accuracy against training time](arena.png)" in text
    assert "| shapes_awm | 0.400 [0.350, 0.450] |" in text and "not reached | not reached |" in text
    assert "| shapes_awm | failed |" in text and "| shapes_awm | not recorded |" in text
    assert "No run was flagged: the machine was otherwise idle (for the runs recorded)." in text
    assert ("    python -m alignrl.cli train recipe=shapes_flowgrpo trainer.max_minutes=30\n"
            "    shapes_awm: not recorded") in text  # the training commands
    assert colour_pixels(plot, BLUE, 12) > 200 and colour_pixels(plot, BLUE_BAND, 4) > 500  # line and CI band
    assert capsys.readouterr().out.count(BEGIN) == 1


def test_a_report_over_runs_of_different_budgets_names_each_budget(tmp_path):
    bench = bench_module()
    out = tmp_path / "runs"
    write_run(out / "shapes_flowgrpo", synthetic_rows(LINEAR))
    write_run(out / "shapes_awm", synthetic_rows(LINEAR))
    entry = {"started": "2026-01-02T03:04:05+00:00", "wall_s": 2000.0, "exit_code": 0, "nproc": 2}
    (out / "arena.json").write_text(json.dumps({"runs": {"shapes_flowgrpo": {**entry, "minutes": 30.0},
                                                         "shapes_awm": {**entry, "minutes": 20.0}}}))
    doc, plot = tmp_path / "arena.md", tmp_path / "arena.png"
    assert bench.main(["--recipes", "shapes_flowgrpo", "shapes_awm", "--reuse", "--out", str(out), "--doc", str(doc),
                       "--plot", str(plot)]) == 0
    text = doc.read_text()
    assert "Budget 30 training minutes per recipe" in text
    assert "The training budgets differ by recipe (minutes: shapes_flowgrpo 30, shapes_awm 20)" in text


def test_archived_runs_rebuild_the_report_after_the_run_directories_are_gone(tmp_path):
    bench = bench_module()
    out, archive = tmp_path / "runs", tmp_path / "archive"
    write_run(out / "shapes_flowgrpo", synthetic_rows(LINEAR))
    (out / "shapes_flowgrpo" / "checkpoints").mkdir()
    (out / "shapes_flowgrpo" / "checkpoints" / "big.safetensors").write_bytes(b"x" * 1000)
    entry = {"started": "2026-01-02T03:04:05+00:00", "wall_s": 2000.0, "exit_code": 0, "nproc": 2, "minutes": 30.0,
             "command": "python -m alignrl.cli train recipe=shapes_flowgrpo"}
    (out / "arena.json").write_text(json.dumps({"runs": {"shapes_flowgrpo": entry}}))
    dest = bench.archive_run(out / "shapes_flowgrpo", entry, archive)
    assert sorted(p.name for p in dest.iterdir()) == ["arena.json", "config.yaml", "metrics.jsonl", "status.json"]
    doc, plot = tmp_path / "arena.md", tmp_path / "arena.png"
    args = ["--recipes", "shapes_flowgrpo", "--reuse", "--out", str(out), "--doc", str(doc), "--plot", str(plot)]
    assert bench.main([*args, "--archive", str(archive)]) == 0
    from_runs = doc.read_text()
    import shutil
    shutil.rmtree(out)
    assert bench.main([*args, "--archive", ""]) == 2  # nowhere to read it from
    assert bench.main([*args, "--archive", str(archive)]) == 0
    rebuilt = doc.read_text()
    # the same tables, read from the archive (the runs table names where each run was read)
    assert rebuilt == from_runs.replace(str(out / "shapes_flowgrpo"), str(archive / "shapes_flowgrpo"))
    assert "Measured 2026-01-02." in rebuilt and "python -m alignrl.cli train recipe=shapes_flowgrpo" in rebuilt


@pytest.mark.parametrize("args, message", [
    (["--recipes", "no_such_recipe"], "unknown recipe no_such_recipe (ShapeWorld recipes: "),
    (["--recipes", "shapes_flowgrpo", "trainer.lr=1"], "looks like an override; put overrides after '--'"),
    (["--eval-minutes", "0", "40"], "--eval-minutes 40: marks must lie in 0..--minutes (30)"),
    (["--eval-minutes", "0", "10", "15", "--eval-every", "10"], "--eval-every 10 does not land on the marks 15"),
    (["--recipes", "shapes_flowgrpo", "shapes_flowgrpo"], "names shapes_flowgrpo twice"),
    (["--reuse"], "metrics.jsonl is missing (and shapes_flowgrpo is not in --archive"),
    (["--existing"], "exists already; rebuild the report from it with --reuse"),
])
def test_script_refuses_bad_arguments_before_running(tmp_path, capsys, args, message):
    bench = bench_module()
    if args == ["--existing"]:
        (tmp_path / "shapes_flowgrpo").mkdir()
        (tmp_path / "shapes_flowgrpo" / "metrics.jsonl").write_text("")
        args = []
    assert bench.main([*args, "--out", str(tmp_path), "--doc", str(tmp_path / "a.md"),
                       "--plot", str(tmp_path / "a.png"), "--archive", str(tmp_path / "archive")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bench_shapes: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "a.md").exists() and not (tmp_path / "arena.json").exists()


def test_eval_interval_is_the_gcd_of_the_marks():
    bench = bench_module()
    assert bench.eval_interval([0, 5, 10, 20, 30], None) == 5
    assert bench.eval_interval([0, 10, 20, 30], None) == 10
    assert bench.eval_interval([0, 0.5, 1.5], None) == pytest.approx(0.5)
    assert bench.eval_interval([0, 10, 20], 2.5) == 2.5


def test_run_recipe_records_exit_code_and_own_cpu(monkeypatch):
    bench = bench_module()
    monkeypatch.setattr(bench, "LOAD_SAMPLE_S", 0.2)
    busy = "import time, sys\nt = time.process_time()\nwhile time.process_time() - t < 0.8: pass\nsys.exit(3)"
    entry = bench.run_recipe([sys.executable, "-c", busy])
    assert entry["exit_code"] == 3 and entry["load_samples"] >= 2
    # its own CPU (cores x wall-clock) holds the 0.8 s it burnt, whatever the machine's load stretched the wall-clock
    # to (0.38 cores was seen on a loaded machine); one thread never exceeds a core
    assert entry["cpu_cores"] * entry["wall_s"] >= 0.7 and entry["cpu_cores"] <= 1.2
    assert len(entry["load_before"]) == 3 and len(entry["load_after"]) == 3 and entry["load_during"] is not None
    assert entry["command"].startswith("python -c ")


def paired_run(path, rewards, seed=42, group_size=8, eval_row=True, train="builtin:shapes_train"):
    """A run directory whose iteration i (step i + 1) logged ``rewards[i]``, with an evaluation row merged into one
    step (as the trainer writes it), under the config keys that decide the draws."""
    rows = [{"step": 0, "train_seconds": 0.0, **eval_keys(LINEAR, 0.0)}]
    for i, r in enumerate(rewards):
        rows.append({"step": i + 1, "iteration": i, "reward_mean": r, "time/iteration": 10.0,
                     "train_seconds": 10.0 * (i + 1)})
        if eval_row and i == 2:  # an evaluation's own row right after its iteration's
            rows.append({"step": 3, "train_seconds": 30.0, **eval_keys(LINEAR, 0.5)})
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "config.yaml").write_text(f"seed: {seed}\nalgorithm:\n  group_size: {group_size}\ndata:\n"
                                      f"  train: {train}\n  balance: tag\n  groups_per_iteration: 8\n"
                                      f"trainer:\n  rollout_batch_size: 32\n")
    return path


def test_paired_training_differences_are_per_iteration_and_windowed(tmp_path):
    base = [0.5, 0.6, 0.4, 0.55, 0.45, 0.5, 0.62]
    gain = [0.0, 0.01, 0.02, 0.03, 0.05, 0.08, 0.09]  # A pulls ahead of B over the iterations
    a = load_run(paired_run(tmp_path / "a", [b + g for b, g in zip(base, gain)]))
    b = load_run(paired_run(tmp_path / "b", base[:6]))  # B stopped one iteration earlier
    c = arena.paired_training(a, b, window=3)
    assert c.iterations == 6 and c.start_equal  # iteration 0 scored alike: the same start, the same draws
    assert [(w.first, w.last) for w in c.windows] == [(1, 3), (4, 6)]
    assert c.windows[0].mean == pytest.approx(0.01) and c.windows[1].mean == pytest.approx((0.03 + 0.05 + 0.08) / 3)
    sd = np.std([0.03, 0.05, 0.08], ddof=1)
    assert c.windows[1].half_width == pytest.approx(1.96 * sd / np.sqrt(3))
    assert c.overall.mean == pytest.approx(np.mean(gain[:6]))
    # the per-iteration pairing is what removes the prompts' spread: the base rewards' swings (0.4-0.62) cancel
    assert c.overall.half_width < 0.05 < np.std(base, ddof=1)
    flipped = arena.paired_training(b, a, window=3)
    assert flipped.overall.mean == pytest.approx(-c.overall.mean)
    text = arena.paired_report(a, b, c)
    assert "a - b: reward_mean, paired by iteration (6 iterations in common; first iteration's value the same)" in text
    assert "steps 4-6" in text and "+0.0533 +- " in text


def test_paired_training_refuses_runs_that_draw_differently(tmp_path):
    a = load_run(paired_run(tmp_path / "a", [0.5, 0.6]))
    other_seed = load_run(paired_run(tmp_path / "s", [0.5, 0.6], seed=1))
    with pytest.raises(ValueError, match=r"not paired \(seed: 42 vs 1\)"):
        arena.paired_training(a, other_seed)
    other_group = load_run(paired_run(tmp_path / "g", [0.5, 0.6], group_size=16))
    with pytest.raises(ValueError, match=r"algorithm.group_size: 8 vs 16"):
        arena.paired_training(a, other_group)
    other_prompts = load_run(paired_run(tmp_path / "p", [0.5, 0.6], train="prompts.txt"))  # another prompt set
    with pytest.raises(ValueError, match=r"data.train: 'builtin:shapes_train' vs 'prompts.txt'"):
        arena.paired_training(a, other_prompts)
    started_elsewhere = load_run(paired_run(tmp_path / "x", [0.7, 0.6]))
    assert not arena.paired_training(a, started_elsewhere).start_equal
    with pytest.raises(ValueError, match="no training iteration with 'reward/x' in common"):
        arena.paired_training(a, started_elsewhere, key="reward/x")


def test_compare_runs_script(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("compare_runs", REPO / "scripts" / "compare_runs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    a = paired_run(tmp_path / "a", [0.5, 0.7, 0.8])
    b = paired_run(tmp_path / "b", [0.5, 0.6, 0.6])
    assert module.main([str(a), str(b), "--window", "2"]) == 0
    out = capsys.readouterr().out
    assert "steps 1-2" in out and "steps 3-3              +0.2000" in out and "all                    +0.1000" in out
    assert module.main([str(a), str(tmp_path / "none")]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err
    other = paired_run(tmp_path / "s", [0.5], seed=3)
    assert module.main([str(a), str(other)]) == 2
    assert "not paired (seed: 42 vs 3)" in capsys.readouterr().err
