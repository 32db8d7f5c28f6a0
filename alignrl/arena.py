"""The ShapeWorld arena's report: several recipes, one training wall-clock budget, two eval sets.

``scripts/bench_shapes.py`` trains each recipe and records the machine load; this module turns the runs'
metrics.jsonl into ``docs/arena.md`` (between ``BEGIN``/``END``) and ``docs/arena.png``. Everything here is a
function of files and rows, so the report can be rebuilt (``--reuse``) and tested on synthetic metrics.

Keys read from a run's metrics rows, for each eval set S in ``SETS``: ``eval/S/images/strict`` (image-weighted
strict accuracy) with ``_ci_lo``/``_ci_hi`` (95% bootstrap over prompts), ``eval/S/tag/<tag>/strict`` for
``TAGS`` (``overall`` is the GenEval-style tag mean), ``eval/S/num_images``, ``eval/S/num_prompts``; and
``train_seconds``, ``step``, ``time/iteration``, ``time/rollout``, ``time/reward_wait``, ``time/update``.

Time marks: the trainer evaluates after the first iteration whose training time crosses each multiple of
``trainer.eval_every_minutes``, so the evaluation read for a mark is the one nearest to it, at most one
iteration past it; a mark with no evaluation that close (the run stopped earlier) has no value.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from alignrl.plots import _number, read_metrics
from alignrl.runs import read_json
from alignrl.training.checkpoint import atomic_write_text

SETS = ("held_out", "in_dist")
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr", "overall")
BEGIN, END = "<!-- arena:begin -->", "<!-- arena:end -->"
RECORD = "arena.json"  # in the arena's output folder: per recipe, the machine load and the command
GOAL_MINUTES = 30.0
GOAL_STRICT = {"in_dist": 0.95, "held_out": 0.8}  # best method, both at one evaluation
GOAL_FLOWGRPO_GAIN = 0.2  # held_out, absolute over the start
GAINS = (0.1, 0.2)
_EPS = 1e-9

INTRO = """# ShapeWorld arena

Several recipes trained for the same training wall-clock budget (evaluation excluded) on the same machine,
one after another, each evaluated at the start and at fixed training times on two ShapeWorld eval sets:
`held_out` (unseen colour-shape pairs, pairings and coloured counts) and `in_dist` (compositions seen in
training). Accuracy is the exact judge's strict verdict averaged over images, with a 95% bootstrap interval
over prompts. Everything between the markers below is written by `scripts/bench_shapes.py` (the logic is
`alignrl/arena.py`); rebuild it from existing runs with `--reuse`.
"""


# ---------------------------------------------------------------------------------------------- reading
def step_records(rows: list[dict]) -> list[tuple[int, dict]]:
    """One merged record per step, in step order. Rows of one step are merged (the final evaluation is a row
    of its own at the last training step; a later value wins). A resumed run writes steps again from its
    checkpoint on: a row whose step is below the highest seen, or a second training row (``time/iteration``)
    of a step, starts over from that step, so the resumed run's rows replace the ones it repeats."""
    records: dict[int, dict] = {}
    trained: set[int] = set()
    for row in rows:
        step = _number(row.get("step"))
        if step is None:
            continue
        step = int(step)
        is_training = _number(row.get("time/iteration")) is not None
        if records and (step < max(records) or (is_training and step in trained)):
            for s in [s for s in records if s >= step]:
                del records[s]
                trained.discard(s)
        records.setdefault(step, {}).update(row)
        if is_training:
            trained.add(step)
    return sorted(records.items())


@dataclass
class EvalPoint:
    """One evaluation of one eval set."""

    step: int
    seconds: float  # training seconds (evaluation excluded) when it ran
    value: float  # image-weighted strict accuracy
    lo: float | None = None  # 95% bootstrap interval over prompts
    hi: float | None = None
    tags: dict[str, float | None] = field(default_factory=dict)
    num_images: int | None = None
    num_prompts: int | None = None


def eval_series(records: list[tuple[int, dict]], set_name: str) -> list[EvalPoint]:
    """The evaluations of ``set_name`` (rows with ``eval/<set>/images/strict`` and ``train_seconds``) in
    training-time order; [] when the set was never evaluated."""
    pre = f"eval/{set_name}"
    points = []
    for step, rec in records:
        value, seconds = _number(rec.get(f"{pre}/images/strict")), _number(rec.get("train_seconds"))
        if value is None or seconds is None:
            continue
        count = lambda k: None if _number(rec.get(k)) is None else int(rec[k])  # noqa: E731
        points.append(EvalPoint(step, seconds, value, _number(rec.get(f"{pre}/images/strict_ci_lo")),
                                _number(rec.get(f"{pre}/images/strict_ci_hi")),
                                {t: _number(rec.get(f"{pre}/tag/{t}/strict")) for t in TAGS},
                                count(f"{pre}/num_images"), count(f"{pre}/num_prompts")))
    return sorted(points, key=lambda p: (p.seconds, p.step))


def iteration_stats(records: list[tuple[int, dict]]) -> dict:
    """Training iterations done and the mean seconds of each part of an iteration (None where never logged);
    ``max_iteration_s`` bounds how far past a time mark its evaluation can lie."""
    its = [rec for _, rec in records if _number(rec.get("time/iteration")) is not None]

    def mean(key):
        xs = [x for x in (_number(r.get(key)) for r in its) if x is not None]
        return sum(xs) / len(xs) if xs else None

    return {"iterations": len(its), "iteration_s": mean("time/iteration"), "rollout_s": mean("time/rollout"),
            "reward_wait_s": mean("time/reward_wait"), "update_s": mean("time/update"),
            "max_iteration_s": max((_number(r["time/iteration"]) for r in its), default=0.0),
            "train_seconds": max((x for x in (_number(r.get("train_seconds")) for _, r in records) if x is not None),
                                 default=0.0)}


def start_point(series: list[EvalPoint]) -> EvalPoint | None:
    """The evaluation before any training (step 0), if there was one."""
    return next((p for p in series if p.step == 0), None)


def value_at(series: list[EvalPoint], mark_s: float, tolerance_s: float) -> EvalPoint | None:
    """The evaluation nearest to ``mark_s`` training seconds if it lies within ``tolerance_s`` (one iteration)
    of it, else None (the run never got there). A tie goes to the later one."""
    best = min(series, key=lambda p: (abs(p.seconds - mark_s), -p.seconds), default=None)
    if best is None or abs(best.seconds - mark_s) > tolerance_s + _EPS:
        return None
    return best


def time_to_gain(series: list[EvalPoint], gain: float) -> float | None:
    """Training seconds at which accuracy first reached the start's value + ``gain``, linearly interpolated
    between the evaluation before and the first one at or above it; None when no evaluation reached it or
    there was no start evaluation."""
    start = start_point(series)
    if start is None:
        return None
    target = start.value + gain
    if gain <= 0:
        return start.seconds
    prev = start
    for p in series:
        if p.seconds < start.seconds or p is start:
            continue
        if p.value >= target - _EPS:
            if p.value <= prev.value:  # reached within rounding of the previous value
                return p.seconds
            return prev.seconds + (target - prev.value) / (p.value - prev.value) * (p.seconds - prev.seconds)
        prev = p
    return None


@dataclass
class ArenaRun:
    """One recipe's run in the arena: its merged metrics and what the arena recorded about it."""

    name: str
    run_dir: Path
    records: list[tuple[int, dict]]
    state: str = "unknown"  # status.json's state: finished | failed | preempted | running
    config: dict = field(default_factory=dict)
    machine: dict = field(default_factory=dict)  # the arena's record: load, wall time, exit code, command

    def series(self, set_name: str) -> list[EvalPoint]:
        return eval_series(self.records, set_name)

    @property
    def stats(self) -> dict:
        return iteration_stats(self.records)

    @property
    def tolerance_s(self) -> float:
        """How far an evaluation may lie from its mark: one iteration, the longest this run had."""
        return self.stats["max_iteration_s"]

    def within(self, set_name: str, minutes: float) -> list[EvalPoint]:
        """Evaluations up to ``minutes`` of training (the one at that mark included)."""
        limit = minutes * 60 + self.tolerance_s + _EPS
        return [p for p in self.series(set_name) if p.seconds <= limit]


def load_run(run_dir: Path, name: str | None = None, machine: dict | None = None) -> ArenaRun:
    """A run directory's metrics.jsonl (a line cut short by a crash is skipped), status.json and config.yaml."""
    import yaml

    run_dir = Path(run_dir)
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        config = {}
    return ArenaRun(name or run_dir.name, run_dir, step_records(read_metrics(run_dir / "metrics.jsonl")),
                    str(read_json(run_dir / "status.json").get("state", "unknown")),
                    config if isinstance(config, dict) else {}, dict(machine or {}))


# ---------------------------------------------------------------------------------------------- paired runs
# what two runs must share for their iteration i to draw the same prompts and the same noise: the seed, the batch
# layout, and the prompt set with the way groups are spread over it
PAIRING_KEYS = ("seed", "data.train", "data.balance", "data.groups_per_iteration", "algorithm.group_size",
                "trainer.rollout_batch_size")
TRAIN_KEY = "reward_mean"


@dataclass
class PairedWindow:
    """Mean of run A's minus run B's per-iteration value over iterations ``first``..``last`` (both included)."""

    first: int
    last: int
    mean: float
    half_width: float | None  # 95% normal interval of the mean; None with one iteration


@dataclass
class PairedComparison:
    key: str
    iterations: int  # the iterations both runs logged
    start_equal: bool  # the first common iteration scored alike (the same start, the same draws)
    windows: list[PairedWindow]
    overall: PairedWindow


def _pairing_values(config: dict) -> dict:
    """The run's value of each of PAIRING_KEYS (None where unset), its config built once."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(config)
    return {k: OmegaConf.select(cfg, k, default=None, throw_on_resolution_failure=False) for k in PAIRING_KEYS}


def _mean_interval(values: list[float]) -> tuple[float, float | None]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, 1.96 * math.sqrt(var / n)


def paired_training(a: ArenaRun, b: ArenaRun, key: str = TRAIN_KEY, window: int = 15) -> PairedComparison:
    """Run ``a`` against run ``b`` iteration by iteration on a training metric (default the rollouts' mean reward).

    Runs of one seed, prompt set and batch layout draw the same prompts and the same noise at iteration i,
    whatever else differs (the sampler is a function of the seed and the iteration), so ``a_i - b_i`` holds only
    the two policies' difference: far less noise than comparing two evaluations. Windows of ``window`` iterations
    show how the difference grows; each interval treats the window's iterations as independent draws. Raises ValueError
    when the runs are not paired (another seed, prompt set or layout, or no common iteration)."""
    va_all, vb_all = _pairing_values(a.config), _pairing_values(b.config)
    differs = {k: (va_all[k], vb_all[k]) for k in PAIRING_KEYS if va_all[k] != vb_all[k]}
    if differs:
        detail = ", ".join(f"{k}: {va!r} vs {vb!r}" for k, (va, vb) in differs.items())
        raise ValueError(f"{a.name} and {b.name} are not paired ({detail}): their iterations draw other prompts or "
                         f"noise; compare runs of one seed, one prompt set and one batch layout")
    rows_a = {s: _number(r.get(key)) for s, r in a.records if _number(r.get("time/iteration")) is not None}
    rows_b = {s: _number(r.get(key)) for s, r in b.records if _number(r.get("time/iteration")) is not None}
    steps = sorted(s for s in set(rows_a) & set(rows_b) if rows_a[s] is not None and rows_b[s] is not None)
    if not steps:
        raise ValueError(f"{a.name} and {b.name} have no training iteration with '{key}' in common")
    diffs = [rows_a[s] - rows_b[s] for s in steps]
    windows, width = [], max(1, int(window))
    for lo in range(0, len(steps), width):
        chunk = diffs[lo:lo + width]
        windows.append(PairedWindow(steps[lo], steps[lo + len(chunk) - 1], *_mean_interval(chunk)))
    return PairedComparison(key, len(steps), abs(diffs[0]) <= 1e-12, windows,
                            PairedWindow(steps[0], steps[-1], *_mean_interval(diffs)))


def paired_report(a: ArenaRun, b: ArenaRun, comparison: PairedComparison) -> str:
    """The comparison as text: a line per window, then the whole run."""
    def line(w: PairedWindow, label: str) -> str:
        ci = "" if w.half_width is None else f" +- {w.half_width:.3f}"
        return f"  {label:<22} {w.mean:+.4f}{ci}"

    start = "the same" if comparison.start_equal else "NOT the same (another starting model?)"
    out = [f"{a.name} - {b.name}: {comparison.key}, paired by iteration ({comparison.iterations} iterations in "
           f"common; first iteration's value {start})"]
    out += [line(w, f"steps {w.first}-{w.last}") for w in comparison.windows]
    out.append(line(comparison.overall, "all"))
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- load
def load_warnings(machine: dict, busy_load: float) -> list[str]:
    """Why a run's timings may be slow: the machine was loaded before it started, or, during it, the 1-minute
    load average beyond what the run itself used (its CPU seconds over its wall-clock) exceeded ``busy_load``."""
    out = []
    before = (machine.get("load_before") or [None])[0]
    if _number(before) is not None and before > busy_load:
        out.append(f"load {before:.2f} before it started")
    during, own = _number(machine.get("load_during")), _number(machine.get("cpu_cores"))
    if during is not None and own is not None and during - own > busy_load:
        out.append(f"load {during:.2f} during it, {during - own:.2f} beyond its own {own:.2f} cores")
    return out


# ---------------------------------------------------------------------------------------------- markdown
def _f(v, digits: int = 3) -> str:
    return "n/a" if _number(v) is None else f"{v:.{digits}f}"


def _minutes(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds / 60:.1f} min"


def _with_ci(p: EvalPoint | None) -> str:
    if p is None:
        return "-"
    ci = f" [{p.lo:.3f}, {p.hi:.3f}]" if p.lo is not None and p.hi is not None else ""
    return f"{p.value:.3f}{ci}"


def _signed(v: float | None) -> str:
    return "n/a" if v is None else f"{v:+.3f}"


def _table(rows: list[dict], columns: list[str]) -> str:
    from alignrl.eval.report import markdown_table

    return markdown_table(rows, columns)


def _mark_label(m: float) -> str:
    return f"{m:g} min"


def set_table(runs: list[ArenaRun], set_name: str, marks_min: list[float]) -> str:
    """Per recipe: accuracy [95% CI] at each mark, the gain of the last mark over the start, the training time
    to +0.1 and +0.2 over the start, iterations done and mean seconds per iteration."""
    last = marks_min[-1]
    rows = []
    for run in runs:
        series, stats = run.series(set_name), run.stats
        at = {m: value_at(series, m * 60, run.tolerance_s) for m in marks_min}
        start = start_point(series)
        row = {"recipe": run.name}
        row.update({_mark_label(m): _with_ci(at[m]) for m in marks_min})
        row[f"gain at {_mark_label(last)}"] = (_signed(at[last].value - start.value)
                                                if at[last] is not None and start is not None else "n/a")
        for g in GAINS:
            t = time_to_gain(series, g)
            row[f"to +{g:g}"] = ("no start eval" if start is None else "not reached" if t is None else _minutes(t))
        row["iterations"] = str(stats["iterations"])
        row["s/iteration"] = _f(stats["iteration_s"], 2)
        if not series:
            row[_mark_label(marks_min[0])] = f"no evaluations of {set_name}"
        rows.append(row)
    columns = ["recipe", *[_mark_label(m) for m in marks_min], f"gain at {_mark_label(last)}",
               *[f"to +{g:g}" for g in GAINS], "iterations", "s/iteration"]
    return _table(rows, columns)


def tag_table(runs: list[ArenaRun], set_name: str, mark_min: float) -> str:
    """Per recipe, the evaluation at ``mark_min`` (or the last one before it when the run stopped earlier):
    strict accuracy per tag, the tag mean (overall) and the image-weighted value."""
    rows = []
    for run in runs:
        series = run.within(set_name, mark_min)
        p = value_at(series, mark_min * 60, run.tolerance_s) or (series[-1] if series else None)
        if p is None:
            rows.append({"recipe": run.name, "train min": f"no evaluations of {set_name}"})
            continue
        rows.append({"recipe": run.name, "train min": f"{p.seconds / 60:.1f}", "step": str(p.step),
                     **{t: _f(p.tags.get(t)) for t in TAGS}, "images": _with_ci(p),
                     "n images": "n/a" if p.num_images is None else str(p.num_images),
                     "n prompts": "n/a" if p.num_prompts is None else str(p.num_prompts)})
    return _table(rows, ["recipe", "train min", "step", *TAGS, "images", "n images", "n prompts"])


def split_table(runs: list[ArenaRun]) -> str:
    """Mean seconds of each part of a training iteration, per recipe."""
    rows = []
    for run in runs:
        s = run.stats
        rows.append({"recipe": run.name, "iterations": str(s["iterations"]), "rollout s": _f(s["rollout_s"], 2),
                     "reward wait s": _f(s["reward_wait_s"], 2), "update s": _f(s["update_s"], 2),
                     "iteration s": _f(s["iteration_s"], 2), "training min": f"{s['train_seconds'] / 60:.1f}"})
    return _table(rows, ["recipe", "iterations", "rollout s", "reward wait s", "update s", "iteration s",
                         "training min"])


def goal_checks(runs: list[ArenaRun], flowgrpo_recipe: str = "shapes_flowgrpo",
                minutes: float = GOAL_MINUTES) -> list[tuple[str, bool | None, str]]:
    """The issue's goals as (goal, reached, evidence), judged on evaluations within the first ``minutes`` of
    training (the one at the mark included); reached is None for a goal that could not be checked (the
    Flow-GRPO recipe was not in the arena)."""
    covered = max((r.stats["train_seconds"] for r in runs), default=0.0) / 60
    short = f"; the runs cover only {covered:.1f} of {minutes:g} training minutes" if covered < minutes - 1e-6 else ""
    checks = []

    goal = (f"best method >= {GOAL_STRICT['in_dist']:g} strict on in_dist and >= {GOAL_STRICT['held_out']:g} on "
            f"held_out (one evaluation) within {minutes:g} minutes")
    hit, best = None, {s: None for s in SETS}
    for run in runs:
        by_step = {s: {p.step: p for p in run.within(s, minutes)} for s in SETS}
        for s in SETS:
            for p in by_step[s].values():
                if best[s] is None or p.value > best[s][1].value:
                    best[s] = (run.name, p)
        for step in sorted(set(by_step["in_dist"]) & set(by_step["held_out"])):
            i, h = by_step["in_dist"][step], by_step["held_out"][step]
            if i.value >= GOAL_STRICT["in_dist"] - _EPS and h.value >= GOAL_STRICT["held_out"] - _EPS:
                if hit is None or h.seconds < hit[1].seconds:
                    hit = (run.name, h, i)
                break
    if hit:
        name, h, i = hit
        checks.append((goal, True, f"{name} at {_minutes(h.seconds)}: in_dist {_with_ci(i)}, held_out {_with_ci(h)}"))
    else:
        parts = [f"best {s} {_with_ci(best[s][1])} ({best[s][0]}, {_minutes(best[s][1].seconds)})"
                 if best[s] else f"no evaluation of {s}" for s in ("in_dist", "held_out")]
        checks.append((goal, False, "; ".join(parts) + short))

    goal = (f"Flow-GRPO ({flowgrpo_recipe}) at least +{GOAL_FLOWGRPO_GAIN:g} absolute on held_out within "
            f"{minutes:g} minutes")
    run = next((r for r in runs if r.name == flowgrpo_recipe), None)
    if run is None:
        checks.append((goal, None, f"no {flowgrpo_recipe} run in this arena"))
        return checks
    series = run.within("held_out", minutes)
    start = start_point(series)
    if start is None:
        checks.append((goal, False, "no start evaluation of held_out" + short))
        return checks
    t = time_to_gain(series, GOAL_FLOWGRPO_GAIN)
    final = value_at(series, minutes * 60, run.tolerance_s) or series[-1]
    best_p = max(series, key=lambda p: p.value)
    evidence = (f"start {_with_ci(start)}; {_with_ci(final)} ({_signed(final.value - start.value)}) at "
                f"{_minutes(final.seconds)}")
    if best_p is not final:
        evidence += f"; best {_with_ci(best_p)} ({_signed(best_p.value - start.value)}) at {_minutes(best_p.seconds)}"
    if t is not None:
        checks.append((goal, True, f"+{GOAL_FLOWGRPO_GAIN:g} at {_minutes(t)} (interpolated); " + evidence))
    else:
        checks.append((goal, False, evidence + short))
    return checks


def machine_table(runs: list[ArenaRun], busy_load: float) -> tuple[str, list[str]]:
    """Per recipe: when it ran, wall-clock, exit code, load before/during/after and its own CPU use; and the
    warnings for runs on a machine that was not idle."""
    rows, warnings = [], []

    def loads(v):
        return "n/a" if not v else " / ".join(f"{x:.2f}" for x in v)

    for run in runs:
        m = run.machine
        if not m:
            rows.append({"recipe": run.name, "started": "not recorded"})
            continue
        rows.append({"recipe": run.name, "started": str(m.get("started", "n/a")),
                     "wall min": _f(None if m.get("wall_s") is None else m["wall_s"] / 60, 1),
                     "exit": str(m.get("exit_code", "n/a")), "load before (1/5/15 min)": loads(m.get("load_before")),
                     "load during (1 min, mean)": _f(m.get("load_during"), 2),
                     "own CPU cores": _f(m.get("cpu_cores"), 2), "load after (1/5/15 min)": loads(m.get("load_after"))})
        warnings += [f"{run.name}: the machine was not idle ({w}); its timings are pessimistic"
                     for w in load_warnings(m, busy_load)]
    columns = ["recipe", "started", "wall min", "exit", "load before (1/5/15 min)", "load during (1 min, mean)",
               "own CPU cores", "load after (1/5/15 min)"]
    return _table(rows, columns), warnings


def runs_table(runs: list[ArenaRun]) -> str:
    """Per recipe: where the run is, its state and its evaluation settings (from its config.yaml)."""
    rows = []
    for run in runs:
        sampler, ev = run.config.get("sampler") or {}, run.config.get("eval") or {}
        rows.append({"recipe": run.name, "state": run.state, "run dir": f"`{run.run_dir}`",
                     "eval steps": str(sampler.get("eval_num_steps", "n/a")),
                     "eval CFG": str(sampler.get("eval_guidance_scale", "n/a")),
                     "images per prompt": str(ev.get("images_per_prompt", "n/a"))})
    return _table(rows, ["recipe", "state", "run dir", "eval steps", "eval CFG", "images per prompt"])


def render_section(runs: list[ArenaRun], *, minutes: float, marks_min: list[float], eval_every_min: float | None,
                   plot: str | None, date: str, commands: list[str], nproc: int | None, busy_load: float = 1.5,
                   flowgrpo_recipe: str = "shapes_flowgrpo", note: str = "") -> str:
    """The report between the markers (the markers included)."""
    marks_min = sorted(marks_min)
    lines = [BEGIN, "", f"Measured {date}. Budget {minutes:g} training minutes per recipe (evaluation excluded), "
             f"recipes run one after another on {nproc if nproc else 'n/a'} CPU core(s) (`nproc`)"
             + (f", an evaluation every {eval_every_min:g} training minutes" if eval_every_min else "") + "."]
    if note:
        lines += ["", note]
    lines += ["", "Command" + ("s" if len(commands) > 1 else "") + ":", ""]
    lines += [f"    {c}" for c in commands] or ["    (not recorded)"]
    lines += ["", "Training runs (one process each, from the repository root):", ""]
    lines += [f"    {run.machine['command']}" if run.machine.get("command") else f"    {run.name}: not recorded"
              for run in runs]
    lines += [""]
    if plot:
        lines += [f"![ShapeWorld arena: strict accuracy against training time]({plot})", ""]
    lines += ["### Goals", ""]
    for goal, reached, evidence in goal_checks(runs, flowgrpo_recipe):
        verdict = "not checked" if reached is None else "reached" if reached else "not reached"
        lines.append(f"- {goal}: **{verdict}** ({evidence})")
    offsets = []
    for run in runs:
        for s in SETS:
            series = run.series(s)
            offsets += [p.seconds - m * 60 for m in marks_min
                        if (p := value_at(series, m * 60, run.tolerance_s)) is not None]
    lines += ["", "### Accuracy by training time", "",
              "Strict accuracy over images [95% bootstrap interval over prompts], EMA weights. A mark's value is the "
              "evaluation nearest to it: evaluations run after the first iteration that crosses each multiple of "
              "the eval interval, so one lies up to one iteration past its mark"
              + (f" (here at most {max(map(abs, offsets)):.1f} s)" if offsets else "")
              + "; '-' marks a time the run did not reach. Times to a gain are interpolated linearly between "
              "the evaluations around it.", ""]
    for s in SETS:
        lines += [f"**{s}**", "", set_table(runs, s, marks_min), ""]
    lines += [f"Per tag at {marks_min[-1]:g} training minutes (strict; overall is the GenEval-style tag mean, "
              "images the image-weighted accuracy):", ""]
    for s in SETS:
        lines += [f"**{s}**", "", tag_table(runs, s, marks_min[-1]), ""]
    lines += ["### Per-iteration time split (means)", "", split_table(runs), "", "### Runs", "", runs_table(runs), ""]
    table, warnings = machine_table(runs, busy_load)
    lines += ["### Machine", "", f"nproc {nproc if nproc else 'n/a'}. Load averages from `os.getloadavg()`; "
              f"'load during' is the mean of the 1-minute load sampled while the run trained, 'own CPU cores' the "
              f"run's CPU seconds over its wall-clock. A run is flagged when the load before it, or the load "
              f"during it beyond its own cores, was above {busy_load:g}.", "", table, ""]
    recorded = sum(bool(run.machine) for run in runs)
    lines += [f"- **Warning**: {w}" for w in warnings] or [
        "The machine load was not recorded for these runs." if not recorded else
        "No run was flagged: the machine was otherwise idle" + (" (for the runs recorded)." if recorded < len(runs)
                                                                   else ".")]
    lines += ["", END]
    return "\n".join(lines)


def placeholder_section(command: str) -> str:
    return "\n".join([BEGIN, "", "No arena run has been recorded yet. Produce this report with:", "",
                      f"    {command}", "", END])


def write_report(doc: Path, section: str) -> Path:
    """Replace what lies between the markers of ``doc`` (written whole, atomically) with ``section``; a doc
    without the markers gets the intro and the section (text outside the markers is kept otherwise)."""
    doc = Path(doc)
    text = doc.read_text(encoding="utf-8") if doc.exists() else ""
    if BEGIN in text and END in text and text.index(BEGIN) < text.index(END):
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else INTRO + "\n") + section + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(doc, text)
    return doc


# ---------------------------------------------------------------------------------------------- plot
def plot_arena(runs: list[ArenaRun], out: Path, minutes: float | None = None) -> Path:
    """Two panels (held_out, in_dist): strict accuracy against training minutes, one line per recipe with its
    95% interval as a band, the goal as a dashed line."""
    from alignrl.plots import _figure, _line, _save

    legend_rows = math.ceil(max(1, len(runs)) / 3)
    fig, axes = _figure(1, 2, width=12, row_height=3.8, bottom=0.6 + 0.22 * legend_rows)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for ax, set_name in zip(axes[0], SETS):
        drawn = 0
        for color, run in zip(colors, runs):
            series = run.series(set_name)
            if not series:
                continue
            xs = [p.seconds / 60 for p in series]
            band = None
            if any(p.lo is not None and p.hi is not None for p in series):
                band = ([math.nan if p.lo is None else p.lo for p in series],
                        [math.nan if p.hi is None else p.hi for p in series])
            _line(ax, xs, [p.value for p in series], run.name, color=color, band=band)
            drawn += 1
        goal = GOAL_STRICT[set_name]
        ax.axhline(goal, color="gray", linestyle="--", linewidth=0.9)
        ax.text(0.01, goal, f" goal {goal:g}", transform=ax.get_yaxis_transform(), va="bottom", fontsize=7,
                color="gray")
        if minutes:
            ax.set_xlim(0, minutes * 1.03)
        ax.set_ylim(0, 1.02)  # a line at 1.0 stays visible
        ax.set_xlabel("training time (min, evaluation excluded)")
        ax.set_ylabel(f"{set_name} strict (images)")
        ax.set_title(f"ShapeWorld {set_name}", fontsize=10)
        ax.grid(True, alpha=0.3)
        if not drawn:
            ax.text(0.5, 0.5, f"no evaluations of {set_name}", ha="center", va="center", transform=ax.transAxes,
                    color="gray")
    handles, labels = [], []
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="lower center", ncols=min(3, len(labels)), fontsize=8, frameon=False)
    return _save(fig, Path(out))


def relative_link(target: Path, doc: Path) -> str:
    """``target`` as a link from ``doc``'s folder."""
    return Path(os.path.relpath(Path(target).resolve(), Path(doc).resolve().parent)).as_posix()
