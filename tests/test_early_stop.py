"""Guards against reward hacking: early stopping on an evaluation metric (plain and divergence modes, resumable,
the best checkpoint kept, logged and plotted) and the decay toward the starting weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from alignrl.errors import ConfigError
from alignrl.training.early_stop import EarlyStop, EarlyStopSettings
from conftest import run_inprocess


def settings(**kw) -> EarlyStopSettings:
    base = dict(metric="eval/w", mode="max", patience=2, min_delta=0.0, trained=None, keep_best=False)
    return EarlyStopSettings(**{**base, **kw})


def feed(guard: EarlyStop, watched, trained=None):
    out = []
    for i, w in enumerate(watched):
        metrics = {"eval/w": w, **({"eval/t": trained[i]} if trained is not None else {})}
        out.append(guard.observe(10 * i, metrics))
    return out


def test_plain_mode_stops_after_patience_evaluations_without_a_new_best():
    results = feed(EarlyStop(settings(min_delta=0.01)), [0.5, 0.6, 0.605, 0.55, 0.7, 0.6, 0.6])
    assert [new for _, new, _ in results] == [True, True, False, False, True, False, False]
    assert [stop for _, _, stop in results] == [False, False, False, True, False, False, True]
    log = results[-1][0]
    assert log["early_stop/best"] == 0.7 and log["early_stop/best_step"] == 40 and log["early_stop/bad_evals"] == 2
    # min mode: lower is better
    results = feed(EarlyStop(settings(mode="min", patience=1)), [3.0, 2.0, 2.5])
    assert [(new, stop) for _, new, stop in results] == [(True, False), (True, False), (False, True)]


def test_divergence_mode_stops_only_while_the_trained_metric_rises_and_the_watched_one_falls():
    s = settings(trained="eval/t", min_delta=0.01)
    # hacking: the surrogate climbs, the judge falls
    results = feed(EarlyStop(s), [0.50, 0.55, 0.50, 0.48], [0.60, 0.62, 0.70, 0.80])
    assert [stop for _, _, stop in results] == [False, False, False, True]
    assert results[-1][0]["early_stop/trained_gain"] == pytest.approx(0.80 - 0.62)
    # both fall (plain degradation) or both plateau: no stop
    for trained in ([0.60, 0.62, 0.58, 0.55], [0.60, 0.62, 0.62, 0.62]):
        assert not any(stop for _, _, stop in feed(EarlyStop(s), [0.50, 0.55, 0.50, 0.48], trained))
    # one diverging evaluation, then the judge recovers within min_delta of its best: the count restarts
    results = feed(EarlyStop(s), [0.50, 0.55, 0.50, 0.545, 0.50], [0.60, 0.62, 0.70, 0.75, 0.80])
    assert [log["early_stop/bad_evals"] for log, _, _ in results] == [0, 0, 1, 0, 1]
    # a judge that turns NaN while the surrogate climbs counts as falling
    assert feed(EarlyStop(settings(trained="eval/t", patience=1)), [0.5, float("nan")], [0.5, 0.6])[-1][2]


def test_state_round_trips_and_a_resumed_guard_counts_on():
    a = EarlyStop(settings(patience=3))
    feed(a, [0.5, 0.6, 0.55])
    b = EarlyStop(settings(patience=3))
    assert b.load_state_dict(json.loads(json.dumps(a.state_dict()))) is None
    assert b.state_dict() == a.state_dict() and b.bad_evals == 1
    # a resumed run evaluating the step it resumed at again: nothing changes
    assert b.observe(20, {"eval/w": 0.1})[1:] == (False, False) and b.bad_evals == 1
    assert not b.observe(40, {"eval/w": 0.58})[2]
    assert b.observe(50, {"eval/w": 0.59})[2] and "best 0.6 at step 10" in b.reason()
    # a guard that now watches another metric or direction starts afresh, and says why
    for other in (settings(patience=3, mode="min"), settings(patience=3, metric="eval/x")):
        c = EarlyStop(other)
        assert "start afresh" in c.load_state_dict(a.state_dict()) and c.best is None and c.bad_evals == 0


def test_watched_metrics_must_lie_under_an_evaluation_set():
    EarlyStop(settings(metric="eval/in_dist/judge_mean")).check_names(["eval/held_out", "eval/in_dist"])
    EarlyStop(settings(metric="eval/judge_mean")).check_names(["eval"])
    with pytest.raises(ConfigError, match="lies under none of the evaluation's sets; name one under eval/held_out/"):
        EarlyStop(settings(metric="eval/judge_mean")).check_names(["eval/held_out", "eval/in_dist"])
    with pytest.raises(ConfigError, match="trained='eval/train/x'"):
        EarlyStop(settings(metric="eval/held_out/a", trained="eval/train/x")).check_names(["eval/held_out"])
    with pytest.raises(ConfigError, match="has no evaluation prompts"):
        EarlyStop(settings()).check_names([])


def test_bad_settings_and_an_unknown_metric_are_one_line_errors():
    for kw, needle in ((dict(mode="up"), "use max or min"), (dict(patience=0), "patience=0"),
                       (dict(metric="reward_mean"), "not an evaluation metric"),
                       (dict(metric=None, trained="eval/t"), "metric is not"),
                       (dict(trained="eval/w"), "must be another one")):
        with pytest.raises(ConfigError, match=needle):
            settings(**kw)
    with pytest.raises(ConfigError, match="did you mean eval/held_out/reward_mean"):
        EarlyStop(settings(metric="eval/held_out/reward_maen")).observe(1, {"eval/held_out/reward_mean": 1.0})


def test_a_guard_on_a_run_that_never_evaluates_is_refused_before_any_model_loads(tmp_path):
    r = run_inprocess("train", "recipe=tiny_refl", f"run_dir={tmp_path}", "trainer.eval_every=0",
                      "trainer.early_stop.metric=eval/reward_mean")
    assert r.returncode != 0 and "never evaluates" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "checkpoints").exists()


TINY = ["recipe=tiny_refl", "trainer.max_steps=12", "logger.progress_bar=false", "trainer.log_images_every=0",
        "trainer.checkpoint_every=0", "trainer.keep_checkpoints=1", "trainer.eval_every=1",
        "trainer.eval_at_start=true", "eval.num_prompts=4"]


def test_early_stop_ends_the_run_keeps_the_best_checkpoint_plots_and_resumes_where_it_stopped(tmp_path):
    # min_delta larger than any reward: the start is the best and every later evaluation a bad one
    guard = ["trainer.early_stop.metric=eval/reward_mean", "trainer.early_stop.min_delta=1e9",
             "trainer.early_stop.patience=2", "trainer.early_stop.keep_best=true"]
    r = run_inprocess("train", *TINY, *guard, f"run_dir={tmp_path}")
    assert r.returncode == 0, r.stderr[-3000:]
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == 2, status
    assert "early stop" in r.stdout + r.stderr and "step_000000" in r.stdout + r.stderr
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    guard_rows = [row for row in rows if "early_stop/bad_evals" in row]
    assert [(row["step"], row["early_stop/bad_evals"]) for row in guard_rows] == [(0, 0), (1, 1), (2, 2)]
    assert all(row["early_stop/best_step"] == 0 for row in guard_rows)
    assert (tmp_path / "plots" / "early_stop.png").stat().st_size > 0
    # the best (step 0) survives pruning to one checkpoint, beside the one the stop saved
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert ckpts == ["step_000000", "step_000002"], ckpts
    assert (tmp_path / "checkpoints" / "BEST").read_text().strip() == "0"

    # resumed with the same guard: nothing to train, nothing evaluated again
    r = run_inprocess("train", *TINY, *guard, f"run_dir={tmp_path}", "resume=auto")
    assert r.returncode == 0 and "stopped early at step 2" in r.stdout + r.stderr, r.stderr[-3000:]
    assert json.loads((tmp_path / "status.json").read_text())["step"] == 2
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == len(rows)
    # more patience: the counter goes on from 2 and the run stops at the next evaluation; a BEST left naming
    # another step (a crash between saving the best and naming it) is set right from the guard's own state
    (tmp_path / "checkpoints" / "BEST").write_text("7\n")
    r = run_inprocess("train", *TINY, *guard[:2], "trainer.early_stop.patience=3", "trainer.early_stop.keep_best=true",
                      f"run_dir={tmp_path}", "resume=auto")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "status.json").read_text())["step"] == 3
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["early_stop/bad_evals"] for row in rows if row.get("step") == 3 and "early_stop/bad_evals" in row] == [3]
    assert (tmp_path / "checkpoints" / "BEST").read_text().strip() == "0"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()) == ["step_000000", "step_000003"]
    # the guard off: nothing is protected any more and BEST goes; pruning keeps the newest checkpoint only
    r = run_inprocess("train", *TINY, "trainer.max_steps=4", f"run_dir={tmp_path}", "resume=auto")
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (tmp_path / "checkpoints" / "BEST").exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()) == ["step_000004"]


def _trainer(tmp_path, *overrides):
    from accelerate.state import AcceleratorState

    from alignrl.config import compose
    from alignrl.training.trainer import Trainer

    AcceleratorState._reset_state()
    cfg = compose(["recipe=tiny_refl", f"run_dir={tmp_path}", "logger.progress_bar=false", "trainer.eval_every=0",
                   "trainer.checkpoint_every=0", "trainer.log_images_every=0", *overrides])
    return Trainer(cfg, tmp_path)


def _distance_after(tmp_path, iterations: int, *overrides) -> float:
    t = _trainer(tmp_path, *overrides)
    start = [p.detach().clone() for p in t.params]
    try:
        for _ in range(iterations):
            t.timing = {}
            t.run_iteration()
            t.iteration += 1
    finally:
        t.reward_runner.close()
    return float(sum(((p.detach() - s) ** 2).sum() for p, s in zip(t.params, start)) ** 0.5)


def test_decay_to_base_pulls_the_weights_toward_the_starting_ones(tmp_path):
    free = _distance_after(tmp_path / "a", 3)
    held = _distance_after(tmp_path / "b", 3, "trainer.decay_to_base=300")  # lr 1e-3: 30% of the way per step
    pinned = _distance_after(tmp_path / "c", 1, "trainer.decay_to_base=1e9")  # the whole way: back at the start
    assert free > 0 and held < 0.8 * free, (free, held)
    assert pinned == 0.0


def test_decay_to_base_resumes_exactly_and_is_refused_with_deepspeed(tmp_path):
    common = ["recipe=tiny_refl", "logger.progress_bar=false", "trainer.eval_every=0", "trainer.log_images_every=0",
              "trainer.decay_to_base=100", "trainer.max_steps=3"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert run_inprocess("train", *common, f"run_dir={whole}").returncode == 0
    assert run_inprocess("train", *common, "trainer.max_steps=2", f"run_dir={part}").returncode == 0
    r = run_inprocess("train", *common, f"run_dir={part}", "resume=auto")
    assert r.returncode == 0, r.stderr[-3000:]
    a = load_file(str(whole / "checkpoints" / "step_000003" / "trainable.safetensors"))
    b = load_file(str(part / "checkpoints" / "step_000003" / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    r = run_inprocess("train", *common, "distributed=zero2", f"run_dir={tmp_path / 'zero'}")
    assert r.returncode != 0 and "decay_to_base is not supported with distributed=zero2" in r.stderr, r.stderr[-2000:]
    assert "params" not in r.stdout + r.stderr  # refused before the model was built
