"""Metrics: a JSONL file always, wandb when asked (offline works without an account), progress on the
console, a log file and training plots in the run directory.

Progress: a tqdm bar when stderr is a terminal; otherwise (Slurm, CI, ``| tee``) one plain line per iteration,
at most one per ``logger.log_every_s`` seconds (the first and the last are always printed), such as
``step 12/40 (30%) | 2.1 s/it | ETA 0:00:58 | reward 0.412 kl 0.001 clip 0.02 lr 0.01``.
``<run_dir>/alignrl.log`` (the file Hydra's job logging opens) gets the same lines, timestamped, and every
message passed to ``write()``, whatever ``logger.progress_bar`` says. ``<run_dir>/plots/*.png`` are redrawn
from metrics.jsonl at most every ``logger.plot_every_s`` seconds and when the logger closes.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

from tqdm.auto import tqdm

from alignrl.errors import ConfigError
from alignrl.training.checkpoint import atomic_write_text

WANDB_MODES = ("online", "offline", "disabled", "shared")
# (label, metric) shown in the progress bar and progress lines; approx_kl stands in when kl is not logged
PROGRESS_KEYS = (("reward", "reward_mean"), ("kl", "kl"), ("approx_kl", "approx_kl"), ("clip", "clipfrac"),
                 ("acc", "implicit_acc"), ("epoch", "epoch"), ("lr", "lr"), ("eval", "eval/reward_mean"))


def _clean(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _finite(v) -> float | None:
    v = _clean(v)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class _PlainProgress:
    """A progress counter for a stream that is not a terminal: plain lines (``eval: 8/16 img (50%) | 3.1 img/s |
    ETA 0:00:03``), at most one per ``every_s`` seconds, and the last one at close; tqdm's update/close API."""

    def __init__(self, total: int, desc: str, unit: str, stream, every_s: float):
        self.total, self.desc, self.unit, self.stream, self.every_s = int(total), desc, unit, stream, every_s
        self.n, self.start, self.last, self.printed = 0, time.monotonic(), None, 0

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.last is None or now - self.last >= self.every_s:
            self._line(now)

    def _line(self, now: float) -> None:
        self.last, self.printed = now, self.n
        rate = self.n / max(now - self.start, 1e-9)
        eta = f" | ETA {timedelta(seconds=round((self.total - self.n) / rate))}" if rate > 0 and self.n < self.total \
            else ""
        pct = f" ({100 * self.n // self.total}%)" if self.total else ""
        print(f"{self.desc}: {self.n}/{self.total} {self.unit}{pct} | {rate:.3g} {self.unit}/s{eta}",
              file=self.stream, flush=True)

    def close(self) -> None:
        if self.n != self.printed:  # the final count, unless its line is out already
            self._line(time.monotonic())


def console_progress(total: int, desc: str, unit: str, enabled: bool = True, every_s: float = 10.0):
    """A tqdm bar with ETA on a terminal; plain lines off one (Slurm, CI, ``| tee``); nothing when disabled."""
    if enabled and not _is_tty(sys.stderr):
        return _PlainProgress(total, desc, unit, sys.stderr, every_s)
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr, disable=not enabled)


def _seconds(cfg: dict, key: str, default: float) -> float:
    value = cfg.get(key, default)
    try:
        value = float(default if value is None else value)
    except (TypeError, ValueError):
        value = -1.0
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"logger.{key} must be a number of seconds >= 0, got {cfg.get(key)!r}")
    return value


def progress_line(step: int, total: int, metrics: dict, seconds_per_it: float | None,
                  budget_s: float = 0.0) -> str:
    """``step 12/40 (30%) | 2.1 s/it | ETA 0:00:58 | reward 0.412 kl 0.001 clip 0.02 lr 0.01``.

    With a training-time budget (``trainer.max_minutes``) the line counts training time against it
    (``step 12 | train 0:01:24/0:03:00 (47%)``) and the ETA is the sooner of the two ends (evaluation excluded)."""
    trained = _finite(metrics.get("train_seconds"))
    by_time = bool(budget_s) and trained is not None
    if by_time:
        parts = [f"step {step} | train {timedelta(seconds=round(trained))}/{timedelta(seconds=round(budget_s))} "
                 f"({min(100.0, 100 * trained / budget_s):.0f}%)"]
    else:
        parts = [f"step {step}/{total} ({100 * step / total:.0f}%)" if total else f"step {step}"]
    if seconds_per_it is not None:
        parts.append(f"{seconds_per_it:.2f} s/it" if seconds_per_it < 10 else f"{seconds_per_it:.0f} s/it")
        if total or by_time:
            left = [max(0, total - step) * seconds_per_it] if total else []
            if by_time:
                left.append(max(0.0, budget_s - trained))
            parts.append(f"ETA {timedelta(seconds=round(min(left)))}")
    values = _progress_values(metrics)
    if values:
        parts.append(" ".join(f"{label} {v:.3g}" for label, v in values))
    return " | ".join(parts)


def _progress_values(metrics: dict) -> list[tuple[str, float]]:
    values = []
    for label, key in PROGRESS_KEYS:
        v = _finite(metrics.get(key))
        if v is not None and not (key == "approx_kl" and _finite(metrics.get("kl")) is not None):
            values.append((label, v))
    return values


class MetricsLogger:
    """Used by the trainer: ``log(step, metrics, images)`` after each iteration, ``progress(step, metrics)``,
    ``write(message)`` for one-line notices, ``close()`` at the end (plots are drawn one last time). Only the
    process built with ``enabled=True`` (the main one) writes anything."""

    def __init__(self, run_dir: Path, cfg_logger: dict, resolved_config: dict, enabled: bool, total_steps: int,
                 start_step: int, run_name: str, budget_s: float = 0.0):
        self.enabled = enabled
        self.budget_s = float(budget_s or 0.0)  # trainer.max_minutes in seconds: progress counts training time
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.log_path: Path | None = self.run_dir / "alignrl.log"
        self.wandb = None
        self.bar = None
        self.plain = False  # plain progress lines on stderr (not a terminal)
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._drop_rows_after(start_step)
        kind = cfg_logger.get("kind", "jsonl")
        if kind not in ("jsonl", "wandb"):
            raise ConfigError(f"unknown logger kind '{kind}'; use logger=jsonl or logger=wandb")
        self.total, self.start_step = int(total_steps), int(start_step)
        self.log_every_s = _seconds(cfg_logger, "log_every_s", 10.0)
        self.plot_every_s = _seconds(cfg_logger, "plot_every_s", 120.0)
        self.plots = cfg_logger.get("plots", True) is not False
        self._t0 = time.monotonic()
        self._last_line_at: float | None = None
        self._pending_line: str | None = None  # the latest progress line not printed (throttled)
        self._next_plot_at = self._t0 + self.plot_every_s
        self._plotted_size = -1  # metrics.jsonl size at the last refresh
        self.plot_seconds: list[float] = []  # the measured cost of each refresh
        self._warned: set[str] = set()
        if kind == "wandb":
            self._init_wandb(self.run_dir, cfg_logger, resolved_config, run_name)
        if cfg_logger.get("progress_bar", True) is not False:
            if _is_tty(sys.stderr):
                if self.budget_s:  # the bar fills with training time; its postfix names the step
                    self.bar = tqdm(total=round(self.budget_s), initial=0, desc="train", unit="s",
                                    dynamic_ncols=True, file=sys.stderr, mininterval=1.0,
                                    bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s "
                                               "[{elapsed}<{remaining}{postfix}]")
                else:
                    self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="it",
                                    dynamic_ncols=True, file=sys.stderr, mininterval=1.0)
            else:
                self.plain = True

    def _drop_rows_after(self, step: int) -> None:
        """A resumed run repeats the steps after its checkpoint: drop their rows from a run that died
        after logging them, so metrics.jsonl holds each step once."""
        if not self.path.is_file():
            return

        def kept(line: str) -> bool:
            if step <= 0:
                return False  # a restart from scratch logs everything again, step 0 included
            try:
                row = json.loads(line)
            except ValueError:
                return False  # a line cut short by a crash
            return isinstance(row, dict) and row.get("step", 0) <= step

        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        keep = [ln if ln.endswith("\n") else ln + "\n" for ln in lines if ln.strip() and kept(ln)]
        if keep != lines:
            atomic_write_text(self.path, "".join(keep))

    def _init_wandb(self, run_dir: Path, cfg: dict, resolved: dict, run_name: str):
        # WANDB_MODE, when set, wins over logger.mode: a cluster or CI can switch wandb off (or online) for
        # every recipe without editing any
        env_mode = os.environ.get("WANDB_MODE")
        mode = env_mode or cfg.get("mode") or "offline"
        if mode not in WANDB_MODES:
            source = "WANDB_MODE" if env_mode else "logger.mode"
            raise ConfigError(f"{source}={mode!r} is not a wandb mode; use one of {', '.join(WANDB_MODES)}")
        if mode == "disabled":
            self.write(f"alignrl: wandb disabled ({'WANDB_MODE' if env_mode else 'logger.mode'}=disabled); "
                       "metrics go to metrics.jsonl only")
            return
        import wandb

        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id)
        self.wandb = wandb.init(
            project=cfg.get("project") or os.environ.get("WANDB_PROJECT") or "alignrl", entity=cfg.get("entity"),
            name=run_name, id=run_id, resume="allow", dir=str(run_dir), config=resolved, mode=mode,
            tags=list(cfg.get("tags") or []),
        )

    def log(self, step: int, metrics: dict, images: dict | None = None) -> None:
        """Append a row to metrics.jsonl (and wandb, with ``images``: name -> PNG path, logged as
        ``images/<name>``; an .mp4 or .gif path is logged as a video); redraw the plots when ``logger.plot_every_s`` has passed."""
        if not self.enabled:
            return
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            payload = dict(row)
            for name, path in (images or {}).items():
                if path is None:
                    continue
                if not Path(path).is_file():
                    self._warn_once(f"image:{name}", f"alignrl: image '{name}' not logged to wandb: {path} is missing")
                    continue
                import wandb

                media = wandb.Video if Path(path).suffix in (".mp4", ".gif") else wandb.Image
                payload[f"images/{name}"] = media(str(path), caption=f"{name}, step {step}")
            self.wandb.log(payload, step=step)
        if time.monotonic() >= self._next_plot_at:
            self.refresh_plots()

    def refresh_plots(self) -> list[Path]:
        """Redraw run_dir/plots/ from metrics.jsonl (skipped when no row was added since the last time).
        The next refresh waits ``plot_every_s`` and at least 50x this one's cost, so drawing never takes more
        than ~2% of the run. A failure is reported once and turns plotting off; training goes on."""
        if not (self.enabled and self.plots):
            return []
        try:
            size = self.path.stat().st_size
        except OSError:
            return []
        if size == self._plotted_size:
            return []
        t = time.perf_counter()
        try:
            from alignrl.plots import write_run_plots

            written = write_run_plots(self.run_dir)
        except Exception as e:  # noqa: BLE001  a plot must never stop a training run
            self.plots = False
            self.write(f"alignrl: plots turned off for this run, drawing failed: {type(e).__name__}: {e}")
            return []
        cost = time.perf_counter() - t
        self.plot_seconds.append(cost)
        self._plotted_size = size
        self._next_plot_at = time.monotonic() + max(self.plot_every_s, 50 * cost)
        return written

    def progress(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        trained = _finite(metrics.get("train_seconds"))
        if self.bar is not None:
            values = {label: f"{v:.3g}" for label, v in _progress_values(metrics)}
            if self.budget_s and trained is not None:
                self.bar.set_postfix({"step": step, **values}, refresh=False)
                self.bar.update(min(round(self.budget_s), round(trained)) - self.bar.n)
            else:
                self.bar.set_postfix(values, refresh=False)
                self.bar.update(step - self.bar.n)
        now = time.monotonic()
        done = step - self.start_step
        line = progress_line(step, self.total, metrics, (now - self._t0) / done if done > 0 else None,
                             self.budget_s)
        evaluated = _finite(metrics.get("eval/reward_mean")) is not None  # an eval result is always shown
        due = self._last_line_at is None or now - self._last_line_at >= self.log_every_s
        if due or step >= self.total or evaluated:
            self._emit_progress(line)
            self._last_line_at = now
        else:
            self._pending_line = line

    def _emit_progress(self, line: str) -> None:
        self._pending_line = None
        if self.plain:
            print(line, file=sys.stderr, flush=True)
        self._append_log(line)

    def _append_log(self, message: str) -> None:
        if self.log_path is None:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        try:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write("".join(f"[{stamp}] {line}\n" for line in message.splitlines() or [""]))
        except OSError as e:
            self.log_path = None
            print(f"alignrl: not writing {self.run_dir / 'alignrl.log'} any more: {e}", file=sys.stderr)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.write(message)

    def write(self, message: str) -> None:
        """A notice for the console (above the bar) and alignrl.log."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)
        self._append_log(message)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._pending_line is not None:  # the last iteration's line, when the throttle held it back
            self._emit_progress(self._pending_line)
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.refresh_plots()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
