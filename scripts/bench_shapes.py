#!/usr/bin/env python
"""ShapeWorld arena: several recipes, the same training wall-clock budget, the same machine.

Each recipe trains, one after another, for --minutes of training time (evaluation excluded), evaluated on the
held_out and in_dist ShapeWorld sets at the start and every --eval-every training minutes (default: the
greatest common divisor of the --eval-minutes marks). The report (docs/arena.md between its markers, and the
plot docs/arena.png) gives the accuracy at each mark with its 95% interval, the time to +0.1 and +0.2 over the
start, the issue's goals checked, the per-iteration time split and the machine load around each run.

    python scripts/bench_shapes.py --recipes shapes_flowgrpo shapes_awm --minutes 30 --eval-minutes 0 5 10 20 30
    python scripts/bench_shapes.py --recipes shapes_flowgrpo --reuse          # rebuild the report from the runs
    python scripts/bench_shapes.py --recipes shapes_flowgrpo -- eval.images_per_prompt=4   # overrides for all

Runs go to --out/<recipe>; the load before, during and after each run goes to --out/arena.json. A run
directory that exists already is refused (pass --reuse, or another --out). Each finished run's small files
(metrics.jsonl, config.yaml, status.json) and its arena.json entry are also copied to --archive
(docs/arena_runs, kept in the repository), so the report can be rebuilt after the run directories are gone:
--reuse reads a recipe from --out when its run is there, else from --archive.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from alignrl import arena  # noqa: E402
from alignrl.errors import ConfigError  # noqa: E402
from alignrl.runs import read_json  # noqa: E402
from alignrl.training.checkpoint import atomic_write_text  # noqa: E402

LOAD_SAMPLE_S = 5.0


def nproc() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def eval_interval(marks: list[float], every: float | None) -> float:
    """Minutes between evaluations: ``every``, or the largest interval that lands on every nonzero mark."""
    nonzero = [m for m in marks if m > 0]
    if every is None:
        if not nonzero:
            raise ConfigError("--eval-minutes has no mark after 0: add one (e.g. --eval-minutes 0 30) or pass "
                              "--eval-every")
        seconds = [round(m * 60) for m in nonzero]
        if any(abs(s - m * 60) > 1e-6 for s, m in zip(seconds, nonzero)):
            raise ConfigError(f"--eval-minutes {' '.join(f'{m:g}' for m in nonzero)}: marks must be whole seconds; "
                              f"pass --eval-every")
        return math.gcd(*seconds) / 60
    if not every > 0:
        raise ConfigError(f"--eval-every {every:g}: must be > 0 minutes")
    off = [m for m in nonzero if abs(m / every - round(m / every)) > 1e-6]
    if off:
        raise ConfigError(f"--eval-every {every:g} does not land on the marks {' '.join(f'{m:g}' for m in off)}: "
                          f"choose an interval that divides every --eval-minutes mark")
    return every


def check_args(args) -> list[float]:
    """Every argument checked before anything runs; returns the sorted marks."""
    from alignrl.config import recipes_dir

    if not args.minutes > 0:
        raise ConfigError(f"--minutes {args.minutes:g}: the training budget must be > 0")
    marks = sorted(set(args.eval_minutes))
    bad = [m for m in marks if m < 0 or m > args.minutes + 1e-9]
    if bad:
        raise ConfigError(f"--eval-minutes {' '.join(f'{m:g}' for m in bad)}: marks must lie in 0..--minutes "
                          f"({args.minutes:g})")
    for r in args.recipes:
        if "=" in r:
            raise ConfigError(f"--recipes {r}: looks like an override; put overrides after '--' "
                              f"(--recipes shapes_flowgrpo -- {r})")
    dup = sorted({r for r in args.recipes if args.recipes.count(r) > 1})
    if dup:
        raise ConfigError(f"--recipes names {', '.join(dup)} twice: each recipe runs once")
    known = sorted(p.stem for p in (recipes_dir() / "recipe").glob("*.yaml"))
    unknown = [r for r in args.recipes if r not in known]
    if unknown and not args.reuse:
        shapes = ", ".join(r for r in known if r.startswith("shapes")) or "none"
        raise ConfigError(f"unknown recipe {', '.join(unknown)} (ShapeWorld recipes: {shapes}; "
                          f"`alignrl recipes` lists all)")
    out = Path(args.out)
    for r in args.recipes:
        run_dir = out / r
        if args.reuse and not (run_dir / "metrics.jsonl").is_file() \
                and not (Path(args.archive) / r / "metrics.jsonl").is_file():
            raise ConfigError(f"--reuse: {run_dir / 'metrics.jsonl'} is missing (and {r} is not in --archive "
                              f"{args.archive}); run {r} first (without --reuse) or drop it from --recipes")
        if not args.reuse and run_dir.exists() and any(run_dir.iterdir()):
            raise ConfigError(f"{run_dir} exists already; rebuild the report from it with --reuse, or pass another "
                              f"--out (or remove it) to train again")
    return marks


def train_command(recipe: str, run_dir: Path, minutes: float, every: float, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "alignrl.cli", "train", f"recipe={recipe}", f"run_dir={run_dir}",
            f"trainer.max_minutes={minutes:g}", "trainer.max_steps=1000000", "trainer.eval_at_start=true",
            "trainer.eval_every=0", f"trainer.eval_every_minutes={every:g}", "trainer.checkpoint_every=0",
            "trainer.log_images_every=0", "logger.progress_bar=false", *overrides]


ARCHIVED = ("metrics.jsonl", "config.yaml", "status.json")


def archive_run(run_dir: Path, entry: dict, archive: Path) -> Path:
    """Copy a run's report inputs (a few hundred kB) and its arena entry to ``archive/<recipe>/``, atomically
    per file; checkpoints and images stay in the run directory."""
    dest = archive / run_dir.name
    dest.mkdir(parents=True, exist_ok=True)
    for name in ARCHIVED:
        if (run_dir / name).is_file():
            atomic_write_text(dest / name, (run_dir / name).read_text())
    atomic_write_text(dest / arena.RECORD, json.dumps(entry, indent=2) + "\n")
    return dest


def load_archived(archive: Path, recipe: str) -> tuple[Path, dict] | None:
    """(run directory, arena entry) of an archived run, or None."""
    dest = archive / recipe
    if not (dest / "metrics.jsonl").is_file():
        return None
    return dest, read_json(dest / arena.RECORD)


def run_recipe(cmd: list[str]) -> dict:
    """Run one training process; returns its record: load averages before and after, the mean 1-minute load
    sampled every few seconds while it ran, its own CPU use in cores, wall-clock and exit code."""
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    load_before = list(os.getloadavg())
    usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    samples = []
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        while True:
            try:
                code = proc.wait(timeout=LOAD_SAMPLE_S)
                break
            except subprocess.TimeoutExpired:
                samples.append(os.getloadavg()[0])
    except KeyboardInterrupt:  # the terminal sent SIGINT to the trainer too: it saves a checkpoint and stops
        proc.wait()
        raise
    wall = time.monotonic() - t0
    usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    return {"started": started, "wall_s": round(wall, 1), "exit_code": code,
            "load_before": [round(x, 2) for x in load_before],
            "load_during": round(sum(samples) / len(samples), 2) if samples else None,
            "load_samples": len(samples), "cpu_cores": round(cpu / wall, 2) if wall > 0 else None,
            "load_after": [round(x, 2) for x in os.getloadavg()],
            "command": shlex.join(["python", *cmd[1:]])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=["shapes_flowgrpo"])
    p.add_argument("--minutes", type=float, default=30.0, help="training minutes per recipe (evaluation excluded)")
    p.add_argument("--eval-minutes", type=float, nargs="+", default=[0, 5, 10, 20, 30],
                   help="training times (minutes) reported in the tables")
    p.add_argument("--eval-every", type=float, default=None,
                   help="minutes between evaluations (default: the gcd of the --eval-minutes marks)")
    p.add_argument("--out", default=str(REPO / "outputs" / "arena"), help="run directories and arena.json")
    p.add_argument("--doc", default=str(REPO / "docs" / "arena.md"))
    p.add_argument("--plot", default=str(REPO / "docs" / "arena.png"))
    p.add_argument("--archive", default=str(REPO / "docs" / "arena_runs"),
                   help="where each run's metrics, config, status and arena entry are kept ('' : nowhere)")
    p.add_argument("--reuse", action="store_true", help="rebuild the report from the runs in --out; train nothing")
    p.add_argument("--busy-load", type=float, default=1.5,
                   help="flag a run when the load besides its own exceeded this (the machine was not idle)")
    p.add_argument("--flowgrpo-recipe", default="shapes_flowgrpo", help="the recipe the Flow-GRPO goal is checked on")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every recipe (after '--')")
    args = p.parse_args(argv)
    command = shlex.join(["python", os.path.relpath(sys.argv[0]) if argv is None else "scripts/bench_shapes.py",
                          *(sys.argv[1:] if argv is None else argv)])
    try:
        marks = check_args(args)
        every = eval_interval(marks, args.eval_every)
    except ConfigError as e:
        print(f"bench_shapes: error: {e}", file=sys.stderr)
        return 2

    out = Path(args.out).resolve()
    record_path = out / arena.RECORD
    record = read_json(record_path)
    entries = record.get("runs") if isinstance(record.get("runs"), dict) else {}
    failed = []
    if not args.reuse:
        out.mkdir(parents=True, exist_ok=True)
        for recipe in args.recipes:
            cmd = train_command(recipe, out / recipe, args.minutes, every, args.overrides)
            print(f"[bench_shapes] {recipe}: {shlex.join(cmd[3:])}", flush=True)
            entry = run_recipe(cmd)
            entry.update({"arena_command": command, "nproc": nproc(), "minutes": args.minutes,
                          "eval_every_minutes": every})
            entries[recipe] = entry
            atomic_write_text(record_path, json.dumps({"runs": entries}, indent=2) + "\n")
            print(f"[bench_shapes] {recipe}: exit {entry['exit_code']} after {entry['wall_s'] / 60:.1f} min "
                  f"wall-clock; load {entry['load_before'][0]:.2f} before, {entry['load_after'][0]:.2f} after, "
                  f"own CPU {entry['cpu_cores']} cores", flush=True)
            if entry["exit_code"] != 0:
                failed.append(recipe)
            elif args.archive:
                print(f"[bench_shapes] {recipe}: archived in {archive_run(out / recipe, entry, Path(args.archive))}",
                      flush=True)

    runs = []
    for r in args.recipes:
        archived = load_archived(Path(args.archive), r) if args.archive else None
        if not (out / r / "metrics.jsonl").is_file() and archived is not None:
            entries.setdefault(r, archived[1])
            runs.append(arena.load_run(archived[0], r, archived[1]))
        else:
            runs.append(arena.load_run(out / r, r, entries.get(r)))
    used = [entries[r] for r in args.recipes if r in entries]
    commands = list(dict.fromkeys(e.get("arena_command") for e in used if e.get("arena_command")))
    nprocs = sorted({e["nproc"] for e in used if e.get("nproc")})
    note = ""
    if args.reuse:
        note = f"Report rebuilt on {datetime.date.today().isoformat()} from the runs in `{out}` (`--reuse`)."
    if len(nprocs) > 1:
        note += f" The runs were made on machines with different core counts ({', '.join(map(str, nprocs))})."
    dates = sorted(e["started"][:10] for e in used if e.get("started"))
    date = (dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}") if dates else \
        f"{datetime.date.today().isoformat()} (run dates not recorded)"
    minutes_used = {e.get("minutes") for e in used if e.get("minutes")}
    minutes = max(minutes_used) if minutes_used else args.minutes
    if len(minutes_used) > 1:  # runs of several budgets in one report (--reuse)
        budgets = ", ".join(f"{r} {entries[r]['minutes']:g}" for r in args.recipes if entries.get(r, {}).get("minutes"))
        note += (f" The training budgets differ by recipe (minutes: {budgets}); the budget named above is the "
                 f"largest, and a mark past a run's budget shows '-'.")
    every_used = {e.get("eval_every_minutes") for e in used if e.get("eval_every_minutes")}
    every = every_used.pop() if len(every_used) == 1 else every  # what the runs used (--reuse)
    plot = arena.plot_arena(runs, Path(args.plot), minutes)
    section = arena.render_section(
        runs, minutes=minutes, marks_min=marks, eval_every_min=every, plot=arena.relative_link(plot, Path(args.doc)),
        date=date, commands=commands, nproc=nprocs[0] if len(nprocs) == 1 else None,
        busy_load=args.busy_load, flowgrpo_recipe=args.flowgrpo_recipe, note=note.strip())
    doc = arena.write_report(Path(args.doc), section)
    print(section)
    print(f"[bench_shapes] wrote {doc} and {plot}", flush=True)
    if failed:
        print(f"bench_shapes: error: {', '.join(failed)} failed (see status.json in {out}/<recipe>)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
