"""Charts as PNG files: a run's training curves, several runs side by side, and eval bar charts.

matplotlib is imported on first use and drawn on its Agg canvas directly (no pyplot, no display, no global
backend switch), so importing this module is cheap and it works on headless nodes.

- ``write_run_plots(run_dir)``: ``run_dir/plots/{reward,kl,clipfrac,eval,early_stop}.png`` from metrics.jsonl, each
  metric against the iteration and against training wall-clock (``train_seconds``). MetricsLogger refreshes
  them during training (throttled) and when it closes.
- ``plot_runs({name: rows}, out)``: reward (and eval reward) of several runs on one chart (``alignrl runs --plot``).
- ``bar_chart(groups, out)``: the per-tag or per-reward chart ``alignrl eval`` writes beside its table.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

PLOTS_DIR = "plots"
RUN_FIGURES = ("reward", "kl", "clipfrac", "eval", "early_stop")  # the files write_run_plots owns in PLOTS_DIR
_DPI = 90
_MARKERS_UP_TO = 40  # points per line drawn with markers (so a single logged step is visible)
_SMOOTH_FROM = 60  # longer lines get a moving average over a faint raw line


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; a missing file gives [], a line cut short by a crash is skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError:
        return []
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _number(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


class Curves:
    """Each metric's last finite value at each step (a step logged twice, as a resumed run or a final eval
    row does, keeps its latest value), and each step's ``train_seconds`` for the wall-clock axis."""

    def __init__(self, rows: list[dict]):
        self.values: dict[str, dict[int, float]] = {}
        for row in rows:
            step = _number(row.get("step"))
            if step is None:
                continue
            for key, v in row.items():
                x = _number(v)
                if key != "step" and x is not None:
                    self.values.setdefault(key, {})[int(step)] = x

    def has(self, key: str) -> bool:
        return bool(self.values.get(key))

    def series(self, key: str, wall_clock: bool = False) -> tuple[list[float], list[float]]:
        """(x, y) sorted by step; x is the step, or train_seconds (steps without it are left out)."""
        points = self.values.get(key, {})
        seconds = self.values.get("train_seconds", {})
        steps = sorted(s for s in points if not wall_clock or s in seconds)
        return [seconds[s] if wall_clock else s for s in steps], [points[s] for s in steps]

    def same(self, a: str, b: str) -> bool:
        pa, pb = self.values.get(a, {}), self.values.get(b, {})
        return pa.keys() == pb.keys() and all(abs(pa[s] - pb[s]) <= 1e-9 * (1 + abs(pa[s])) for s in pa)


def run_panels(curves: Curves) -> dict[str, list[tuple[str, list[str]]]]:
    """Figure name -> its panels (a y-axis label and the metrics drawn on it); metrics never logged are left out."""
    keys = list(curves.values)

    def present(names):
        return [k for k in names if curves.has(k)]

    def terms(prefix: str, total: str):
        # one panel per reward term (terms have their own scales); a lone term equal to the total adds nothing
        found = sorted(k for k in keys if re.fullmatch(re.escape(prefix) + r"[^/]+_mean", k) and k != total)
        if len(found) == 1 and curves.same(found[0], total):
            return []
        return [(f"{prefix[:-1]} {k[len(prefix):-len('_mean')]}", [k]) for k in found]

    figures: dict[str, list[tuple[str, list[str]]]] = {}
    reward = ([("reward (weighted sum)", ["reward_mean"])] if curves.has("reward_mean") else []) \
        + terms("reward/", "reward_mean")
    if reward:
        figures["reward"] = reward
    if present(["kl", "approx_kl"]):
        figures["kl"] = [("KL", present(["kl", "approx_kl"]))]
    if curves.has("clipfrac"):
        figures["clipfrac"] = [("clip fraction", ["clipfrac"])]
    evaluation = [("eval reward", ["eval/reward_mean"])] if curves.has("eval/reward_mean") else []
    evaluation += terms("eval/", "eval/reward_mean")
    verdicts = sorted(k for k in keys if re.fullmatch(r"eval/(?!tag/)[^/]+/[^/]+_mean", k))
    if verdicts:
        evaluation.append(("eval verdicts", verdicts))
    tag_keys = [k for k in keys if re.fullmatch(r"eval/tag/[^/]+/[^/]+", k)]
    columns = sorted({k.rsplit("/", 1)[1] for k in tag_keys})
    column = next((c for c in ("strict", "accuracy", "exact") if c in columns),
                  next((c for c in columns if c != "reward"), "reward"))
    per_tag = sorted(k for k in tag_keys if k.endswith("/" + column))
    if per_tag:
        evaluation.append((f"eval per tag ({column})", per_tag))
    if evaluation:
        figures["eval"] = evaluation
    # trainer.early_stop: the watched metric with its best so far, the trained one beside it, the count
    guard = [(label, keys) for label, keys in (
        ("early stop: watched (and best)", present(["early_stop/metric", "early_stop/best"])),
        ("early stop: trained", present(["early_stop/trained"])),
        ("evaluations in a row counted bad", present(["early_stop/bad_evals"]))) if keys]
    if guard:
        figures["early_stop"] = guard
    return figures


def _figure(nrows: int, ncols: int, width: float, row_height: float, top: float = 0.45, bottom: float = 0.55,
            gap: float = 0.7):
    """A figure of nrows x ncols axes with fixed margins in inches (a constrained layout measures every tick
    label and doubles the drawing time); ``row_height`` is one row's axes plus the gap below it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    height = row_height * nrows - gap + top + bottom
    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.8 / width, right=1 - 0.25 / width, top=1 - top / height, bottom=bottom / height,
                        wspace=0.22, hspace=gap / (row_height - gap))
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _save(fig, path: Path) -> Path:
    """Write the PNG through a temporary file, so a reader never sees half an image."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fig.savefig(tmp, format="png", pil_kwargs={"compress_level": 3})  # zlib's default 6 is slower, barely smaller
    os.replace(tmp, path)
    return path


def _time_unit(max_seconds: float) -> tuple[str, float]:
    if max_seconds >= 2 * 3600:
        return "h", 3600.0
    if max_seconds >= 120:
        return "min", 60.0
    return "s", 1.0


def _line(ax, xs, ys, label: str, color=None, band=None) -> None:
    import numpy as np

    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    marker = "o" if len(x) <= _MARKERS_UP_TO else None
    if band is not None:
        lo, hi = band
        ax.fill_between(x, lo, hi, color=color, alpha=0.12, linewidth=0)
    if len(x) >= _SMOOTH_FROM:
        (raw,) = ax.plot(x, y, color=color, alpha=0.3, linewidth=0.8)
        w = max(5, len(x) // 25)
        smooth = np.convolve(y, np.ones(w) / w, mode="valid")
        ax.plot(x[w - 1:], smooth, color=raw.get_color(), linewidth=1.6, label=f"{label} (mean of {w})")
    else:
        ax.plot(x, y, color=color, marker=marker, markersize=3, linewidth=1.4, label=label)


def _integer_ticks(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps, not 1.25


def _panel(ax, curves: Curves, keys: list[str], ylabel: str, wall_clock: bool, unit: tuple[str, float]) -> None:
    name, scale = unit
    drawn = 0
    for key in keys:
        xs, ys = curves.series(key, wall_clock)
        if not xs:
            continue
        xs = [x / scale for x in xs] if wall_clock else xs
        band = None
        std_key = key[: -len("_mean")] + "_std" if key.endswith("_mean") else None
        if std_key and len(keys) <= 2 and curves.has(std_key):
            sx, sy = curves.series(std_key, wall_clock)
            std = dict(zip([x / scale for x in sx] if wall_clock else sx, sy))
            if all(x in std for x in xs):
                band = ([y - std[x] for x, y in zip(xs, ys)], [y + std[x] for x, y in zip(xs, ys)])
        _line(ax, xs, ys, key, band=band)
        drawn += 1
    ax.set_xlabel(f"training time ({name})" if wall_clock else "step")
    if not wall_clock:
        _integer_ticks(ax)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if not drawn:
        ax.text(0.5, 0.5, "no train_seconds logged" if wall_clock else "no data", ha="center", va="center",
                transform=ax.transAxes, color="gray")
    elif not wall_clock:  # the same lines on both axes: one legend (placing it costs time)
        ax.legend(fontsize=7, loc="best")


def write_run_plots(run_dir: Path, rows: list[dict] | None = None) -> list[Path]:
    """(Re)write ``run_dir/plots/<figure>.png`` from ``rows`` (default: run_dir/metrics.jsonl); returns the
    files written. A figure whose metrics were never logged is not written, and one left from earlier rows
    (a run restarted from scratch) is removed."""
    run_dir = Path(run_dir)
    curves = Curves(read_metrics(run_dir / "metrics.jsonl") if rows is None else rows)
    seconds = list(curves.values.get("train_seconds", {}).values())
    unit = _time_unit(max(seconds) if seconds else 0.0)
    figures = run_panels(curves)
    for stale in set(RUN_FIGURES) - set(figures):
        (run_dir / PLOTS_DIR / f"{stale}.png").unlink(missing_ok=True)
    written = []
    for figure, panels in figures.items():
        fig, axes = _figure(len(panels), 2, width=11, row_height=2.8)
        for (ylabel, keys), row in zip(panels, axes):
            _panel(row[0], curves, keys, ylabel, False, unit)
            _panel(row[1], curves, keys, ylabel, True, unit)
        fig.suptitle(f"{run_dir.name}: {figure}", fontsize=10, y=1 - 0.08 / fig.get_figheight(), va="top")
        written.append(_save(fig, run_dir / PLOTS_DIR / f"{figure}.png"))
    return written


def plot_runs(runs: dict[str, list[dict]], out: Path) -> Path | None:
    """Reward mean (and eval reward mean, when any run logged it) of several runs against step and against
    training wall-clock, one line per run labelled by its name; None when no run logged a reward."""
    curves = {name: Curves(rows) for name, rows in runs.items()}
    panels = [(label, key) for label, key in (("reward mean (train rollouts)", "reward_mean"),
                                                ("eval reward mean", "eval/reward_mean"))
              if any(c.has(key) for c in curves.values())]
    if not panels:
        return None
    seconds = [s for c in curves.values() for s in c.values.get("train_seconds", {}).values()]
    unit = _time_unit(max(seconds) if seconds else 0.0)
    legend_rows = math.ceil(len(curves) / 3)
    fig, axes = _figure(len(panels), 2, width=12, row_height=3.4, bottom=0.6 + 0.22 * legend_rows)
    colors = [f"C{i % 10}" for i in range(len(curves))]
    for (ylabel, key), row in zip(panels, axes):
        for wall_clock, ax in zip((False, True), row):
            for color, (name, c) in zip(colors, curves.items()):
                xs, ys = c.series(key, wall_clock)
                if xs:
                    _line(ax, [x / unit[1] for x in xs] if wall_clock else xs, ys, name, color=color)
            ax.set_xlabel(f"training time ({unit[0]})" if wall_clock else "step")
            if not wall_clock:
                _integer_ticks(ax)
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if not handles:
        handles, labels = axes[0][1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncols=min(3, max(1, len(labels))), fontsize=8, frameon=False)
    return _save(fig, Path(out))


def bar_chart(groups: dict[str, dict[str, float]], out: Path, title: str, ylabel: str,
              errors: dict[str, dict[str, float]] | None = None) -> Path | None:
    """Grouped bars: one group per key of ``groups`` (a tag, a reward), one bar per series inside it, the value
    printed on each bar; ``errors`` (same shape) draws error bars. None when there is nothing to draw."""
    import numpy as np

    series = list(dict.fromkeys(s for row in groups.values() for s in row))
    names = list(groups)
    if not names or not series:
        return None
    width = 0.8 / len(series)
    longest = max(map(len, names))
    slanted = len(names) > 4 or longest > 12
    fig, axes = _figure(1, 1, width=max(5.0, min(16.0, 1.0 + 0.9 * len(names) * max(1, len(series) / 2))),
                        row_height=3.6, top=0.4, bottom=0.35 + (0.045 * min(30, longest) if slanted else 0.2), gap=0.0)
    ax = axes[0][0]
    x = np.arange(len(names))
    for i, s in enumerate(series):
        values = [groups[n].get(s) for n in names]
        heights = [v if v is not None and math.isfinite(v) else 0.0 for v in values]
        err = None
        if errors:
            err = [(errors.get(n) or {}).get(s) or 0.0 for n in names]
            err = [e if math.isfinite(e) else 0.0 for e in err]
        bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, heights, width, yerr=err, capsize=3 if err else 0,
                      label=s)
        ax.bar_label(bars, labels=["n/a" if v is None or not math.isfinite(v) else f"{v:.3g}" for v in values],
                     fontsize=7, padding=2)
    ax.set_xticks(x, names, rotation=30 if slanted else 0, ha="right" if slanted else "center", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.margins(y=0.15)
    if len(series) > 1:
        ax.legend(fontsize=8)
    return _save(fig, Path(out))
