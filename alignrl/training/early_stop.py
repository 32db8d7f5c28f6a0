"""Early stopping on an evaluation metric: the guard against reward hacking (``trainer.early_stop``).

A reward the run optimises can rise while what it stands for falls: a reward model's blind spots, a surrogate's
(``shapes_seg``), a proxy's (``smoothness``). The guard watches a metric the evaluation logs, normally an
independent reward that trains nothing (weight 0, e.g. the exact ShapeWorld judge ``shapes_geneval`` beside its
surrogate) on a held-out prompt set, and stops the run when it stops improving:

- plain (``trained: null``): after ``patience`` evaluations in a row that do not beat the best so far by more than
  ``min_delta``;
- divergence (``trained``: the trained reward's evaluation metric): after ``patience`` evaluations in a row in
  which the watched metric lies more than ``min_delta`` below its best while the trained one lies above its value
  at that best evaluation. The run is gaining the reward it optimises and losing the one it should not game;
  a plateau of both does not stop it (the budget does).

``keep_best`` checkpoints each new best evaluation and keeps that checkpoint through pruning
(``checkpoints/BEST`` names its step), so the weights the guard would choose are on disk when it stops.

Logged at every evaluation (and plotted in ``plots/early_stop.png``): ``early_stop/metric`` (the watched value),
``early_stop/best``, ``early_stop/best_step``, ``early_stop/bad_evals`` and, in divergence mode,
``early_stop/trained`` and ``early_stop/trained_gain`` (the trained metric minus its value at the best).
The guard's state is saved in each checkpoint, so a resumed run counts on from where it was.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

from alignrl.errors import ConfigError

MODES = ("max", "min")


@dataclass(frozen=True)
class EarlyStopSettings:
    metric: str | None  # the evaluation metric watched (e.g. eval/in_dist/shapes_geneval_mean); null: off
    mode: str  # max | min: which direction is better for the watched (and trained) metric
    patience: int  # bad evaluations in a row before the run stops
    min_delta: float  # how far past the best an evaluation must be to count as better (or, below it, as worse)
    trained: str | None  # the trained reward's eval metric: stop only when it rises while the watched one falls
    keep_best: bool  # checkpoint each new best evaluation and never prune it (checkpoints/BEST)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"trainer.early_stop.mode='{self.mode}' is not known; use max or min")
        if self.patience < 1:
            raise ConfigError(f"trainer.early_stop.patience={self.patience} must be >= 1")
        if self.min_delta < 0:
            raise ConfigError(f"trainer.early_stop.min_delta={self.min_delta} must be >= 0")
        for key, name in (("metric", self.metric), ("trained", self.trained)):
            if name is not None and not name.startswith("eval/"):
                raise ConfigError(f"trainer.early_stop.{key}='{name}' is not an evaluation metric; name one the "
                                  f"evaluation logs, e.g. eval/held_out/reward_mean (see the run's metrics.jsonl)")
        if self.trained is not None and self.metric is None:
            raise ConfigError("trainer.early_stop.trained is set but trainer.early_stop.metric is not; set the "
                              "independent metric to watch (e.g. eval/in_dist/shapes_geneval_mean)")
        if self.trained is not None and self.trained == self.metric:
            raise ConfigError(f"trainer.early_stop.trained and .metric are both '{self.metric}'; the trained metric "
                              f"must be another one (the reward the run optimises, evaluated on the same prompts)")

    @property
    def enabled(self) -> bool:
        return self.metric is not None


class EarlyStop:
    """Decides, from each evaluation's metrics, whether the run should stop (the same on every process: the
    evaluation's metrics are gathered over all of them)."""

    def __init__(self, settings: EarlyStopSettings):
        self.s = settings
        self.best: float | None = None
        self.best_step: int | None = None
        self.trained_at_best: float | None = None
        self.bad_evals = 0
        self.last_step: int | None = None  # the last evaluation observed (a resumed run may evaluate it again)
        self.stopped_at: int | None = None  # set by the loop when it acted on a stop

    def _better(self, a: float, b: float) -> bool:
        """a beats b by more than min_delta."""
        return a > b + self.s.min_delta if self.s.mode == "max" else a < b - self.s.min_delta

    def _value(self, metrics: dict, key: str) -> float:
        if key not in metrics:
            names = sorted(k for k in metrics if k.startswith("eval/"))
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"did you mean {close[0]}?" if close else f"the evaluation logs: {', '.join(names[:12])}"
            raise ConfigError(f"trainer.early_stop watches '{key}', which the evaluation does not log; {hint}")
        return float(metrics[key])

    def check_names(self, prefixes: list[str]) -> None:
        """Before any model loads: the watched metrics must lie under one of the evaluation's prefixes
        (``eval`` for a single set, ``eval/<set>`` for named ones)."""
        if not prefixes:
            raise ConfigError("trainer.early_stop watches an evaluation metric, but the recipe has no evaluation "
                              "prompts (data.eval); add them or set trainer.early_stop.metric=null")
        for key, name in (("metric", self.s.metric), ("trained", self.s.trained)):
            if name is None:
                continue
            if not any(name.startswith(p + "/") for p in prefixes):
                raise ConfigError(f"trainer.early_stop.{key}='{name}' lies under none of the evaluation's sets; "
                                  f"name one under {' or '.join(p + '/' for p in prefixes)} (e.g. "
                                  f"{prefixes[0]}/reward_mean)")

    def observe(self, step: int, metrics: dict) -> tuple[dict, bool, bool]:
        """One evaluation's metrics -> (what to log, is it a new best, should the run stop). An evaluation of a
        step already observed (a run resumed there evaluates it again) changes nothing."""
        value = self._value(metrics, self.s.metric)
        trained = self._value(metrics, self.s.trained) if self.s.trained else None
        if self.last_step is not None and step <= self.last_step:
            return self._log(value, trained), False, False
        self.last_step = step
        new_best = math.isfinite(value) and (self.best is None or self._better(value, self.best))
        if new_best:
            self.best, self.best_step, self.trained_at_best, self.bad_evals = value, step, trained, 0
        elif self.s.trained is None:
            self.bad_evals += 1
        else:  # the watched metric worse than its best while the trained one gained on its value there
            falling = not math.isfinite(value) or self._better(self.best, value)
            gaining = trained is not None and self.trained_at_best is not None and (
                trained > self.trained_at_best if self.s.mode == "max" else trained < self.trained_at_best)
            self.bad_evals = self.bad_evals + 1 if falling and gaining else 0
        return self._log(value, trained), new_best, self.bad_evals >= self.s.patience

    def _log(self, value: float, trained: float | None) -> dict:
        log = {"early_stop/metric": value, "early_stop/best": self.best if self.best is not None else float("nan"),
               "early_stop/best_step": float(self.best_step if self.best_step is not None else -1),
               "early_stop/bad_evals": float(self.bad_evals)}
        if trained is not None:
            log["early_stop/trained"] = trained
            log["early_stop/trained_gain"] = trained - self.trained_at_best \
                if self.trained_at_best is not None else float("nan")
        return log

    @property
    def stopped(self) -> bool:
        """The run stopped here and would stop again at once (the patience was not raised since)."""
        return self.stopped_at is not None and self.bad_evals >= self.s.patience

    def reason(self) -> str:
        what = (f"{self.s.metric} fell below its best while {self.s.trained} rose" if self.s.trained
                else f"{self.s.metric} did not beat its best by more than {self.s.min_delta:g}")
        return (f"early stop: {what} for {self.bad_evals} evaluation(s) in a row (trainer.early_stop.patience="
                f"{self.s.patience}); "
                + (f"best {self.best:.4g} at step {self.best_step}" if self.best is not None else "no finite value yet"))

    def _watching(self) -> dict:
        return {"metric": self.s.metric, "trained": self.s.trained, "mode": self.s.mode}

    def state_dict(self) -> dict:
        return {"watching": self._watching(), "best": self.best, "best_step": self.best_step,
                "trained_at_best": self.trained_at_best, "bad_evals": self.bad_evals, "last_step": self.last_step,
                "stopped_at": self.stopped_at}

    def load_state_dict(self, state: dict | None) -> str | None:
        """Restore a checkpoint's guard; one that watched other metrics (or the other direction) is not carried
        over: the guard starts afresh and the returned line says why (None when restored)."""
        state = state or {}
        if not state:
            return None
        if state.get("watching") != self._watching():
            return (f"trainer.early_stop now watches {self._watching()}, the checkpoint's guard "
                    f"{state.get('watching')}: its best and count start afresh")
        self.best, self.best_step = state.get("best"), state.get("best_step")
        self.trained_at_best, self.last_step = state.get("trained_at_best"), state.get("last_step")
        self.bad_evals, self.stopped_at = int(state.get("bad_evals", 0)), state.get("stopped_at")
        return None
