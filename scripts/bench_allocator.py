#!/usr/bin/env python
"""The host allocator's effect on a CPU training iteration: ``trainer.host_allocator=default`` (glibc's own malloc
settings) against ``tuned`` (alignrl/hostalloc.py), each in its own process (the setting holds for a whole
process), alternated round by round so that the machine's load meets both alike.

Each process is ``scripts/bench_iteration.py`` (the real Trainer, timed iterations after warm-up); printed per
round: the median iteration, model and overhead times and the peak resident memory, then the paired ratio
tuned / default of the median iterations (min, median, max over rounds).

    python scripts/bench_allocator.py [--recipe tiny_flowgrpo] [--rounds 3] [--iterations 10] [overrides ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = ("default", "tuned")


def run_one(recipe: str, mode: str, iterations: int, overrides: list[str], out: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).with_name("bench_iteration.py")), "--recipe", recipe, "--iterations",
           str(iterations), "--json", str(out), "--device", "cpu", f"trainer.host_allocator={mode}", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench_iteration.py failed ({mode}):\n{proc.stderr[-3000:]}")
    data = json.loads(out.read_text())
    rows = data["rows"]["eager"]
    return {key: statistics.median(r[key] for r in rows) for key in ("iteration", "model", "overhead")} | {
        "rss": data["peak_rss_bytes"], "load": data["load_start"]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="tiny_flowgrpo")
    p.add_argument("--rounds", type=int, default=3, help="rounds of one process per setting")
    p.add_argument("--iterations", type=int, default=10, help="timed iterations per process")
    p.add_argument("overrides", nargs="*", help="config overrides for both settings")
    args = p.parse_args()
    print(f"{args.recipe}: {args.rounds} round(s) of {', '.join(MODES)}, {args.iterations} timed iterations each, "
          f"{os.cpu_count()} CPUs")
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            got = {}
            for mode in MODES:
                got[mode] = m = run_one(args.recipe, mode, args.iterations, args.overrides, Path(tmp) / f"{mode}.json")
                print(f"  round {r + 1} {mode:<8} load {m['load']:.2f}: iteration {m['iteration'] * 1000:7.1f} ms, "
                      f"model {m['model'] * 1000:7.1f} ms, overhead {m['overhead'] * 1000:5.1f} ms (medians); "
                      f"peak RSS {m['rss'] / 2**20:.0f} MiB", flush=True)
            ratios.append(got["tuned"]["iteration"] / got["default"]["iteration"])
    print(f"tuned / default, median iteration, paired by round: min {min(ratios):.3f}, median "
          f"{statistics.median(ratios):.3f}, max {max(ratios):.3f}")


if __name__ == "__main__":
    main()
