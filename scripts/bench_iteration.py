#!/usr/bin/env python
"""Where a training iteration's time goes, and what the loop adds above the model.

Runs a recipe's iterations (default: the CPU default, tiny_flowgrpo) through the real Trainer with timing hooks
on the denoiser's forward, backward, the VAE decode and the optimizer step, and splits each iteration into

    model     denoiser forward + backward + VAE decode + optimizer step, and the text encoders' forwards on
              prompts the cache has not seen yet (the work a loop cannot avoid)
    reward    waiting for the reward (it scores while the next batch samples)
    overhead  everything else: plans, noise, log-probs, advantages, gathers, bookkeeping

and prints min and median over iterations. With ``--compile`` a second trainer with ``trainer.compile=true``
runs alongside, the two alternating iteration by iteration (interleaved: the machine's load hits both alike),
and the ratio compiled / eager is printed (min and median). Target: overhead < 2% of the iteration on the tiny
model.

With ``--compare NAME=OVERRIDES`` (repeatable) any other configuration runs alongside in the same way. Settings
that act on the whole process (a thread pool's size) cannot be compared inside one: run them one process each.

    python scripts/bench_iteration.py [--recipe tiny_flowgrpo] [--iterations 12] [--compile]
                                      [--compare NAME=OVERRIDES ...] [--backend inductor] [--device cpu]
                                      [--json PATH] [overrides ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch


class Clock:
    """Seconds spent in the model's work during one iteration (hooks added to a built Trainer)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.total = 0.0
        self.segments = 0  # model segments ended this iteration (each hands the caches back to the loop)
        self._start: list[float] = []
        cuda = trainer.device.type == "cuda"
        self.sync = (lambda: torch.cuda.synchronize()) if cuda else (lambda: None)
        # the modules' own forward methods are wrapped (not hooks, whose presence sends every call of the module
        # through torch's slower hook path and so would add to the overhead being measured)
        self._wrap(trainer.denoiser, "forward")
        for module in trainer.backbone.frozen_modules():  # the text encoders (new prompts); the VAE is decode's
            if module is not trainer.backbone.vae:
                self._wrap(module, "forward")
        self._wrap(trainer.accelerator, "backward")
        self._wrap(trainer.backbone, "decode")
        self._wrap(trainer.optimizer, "step")

    def _begin(self):  # nested calls (a checkpointed forward inside backward) count once, in the outer one
        if self._start:
            self._start.append(None)
            return
        self.sync()
        self._start.append(time.perf_counter())

    def _end(self):
        start = self._start.pop()
        if start is not None:
            self.sync()
            self.total += time.perf_counter() - start
            self.segments += 1

    def _wrap(self, owner, name):
        fn = getattr(owner, name)

        def timed(*a, **k):
            self._begin()
            try:
                return fn(*a, **k)
            finally:
                self._end()

        setattr(owner, name, timed)


def build(recipe: str, run_dir: str, overrides: list[str]):
    from accelerate.state import AcceleratorState

    from alignrl.config import compose
    from alignrl.training.trainer import Trainer

    AcceleratorState._reset_state()
    cfg = compose([f"recipe={recipe}", f"run_dir={run_dir}", "trainer.max_steps=100000", "logger.progress_bar=false",
                   "trainer.eval_every=0", "trainer.checkpoint_every=0", "trainer.log_images_every=0", *overrides])
    trainer = Trainer(cfg, Path(run_dir))
    return trainer, Clock(trainer)


def one_iteration(trainer, clock) -> dict:
    clock.total, clock.segments = 0.0, 0
    m = trainer.run_iteration()
    trainer.iteration += 1
    it, wait = m["time/iteration"], m.get("time/reward_wait", 0.0)
    return {"iteration": it, "model": clock.total, "reward": wait, "overhead": it - clock.total - wait,
            "rollout": m.get("time/rollout", 0.0), "update": m.get("time/update", 0.0), "segments": clock.segments}


def first_op_after_model(trainer, reps: int = 30) -> dict:
    """The loop's first small operation right after a model segment, against the same operation again at once
    (median seconds): a gather of 8 latent rows, as the update loop makes, after the VAE decode, a denoiser
    forward, and a forward and backward. The difference is paid once per model segment whatever the operation (the model's large
    tensors evicted the caches the loop's code and data were in)."""
    bb = trainer.backbone
    lat = torch.randn(8, *bb.latent_shape(), device=trainer.device)
    rows = torch.randn(160, *bb.latent_shape(), device=trainer.device)
    idx = torch.randperm(160, device=trainer.device)[:8]
    cond = bb.encode_prompts(["a photo"] * 8)
    t = bb.make_schedule(8).timesteps[0]
    def backward():
        with torch.enable_grad():
            bb.predict(lat, t, cond, 1.0).square().mean().backward()
        trainer.optimizer.zero_grad(set_to_none=True)

    segments = {"VAE decode": lambda: bb.decode(lat),
                "denoiser forward": lambda: bb.predict(lat, t, cond, 1.0),
                "denoiser forward and backward": backward}
    out = {}
    with torch.no_grad():
        for name, run in segments.items():
            cold, warm = [], []
            for _ in range(reps):
                run()
                a = time.perf_counter()
                rows.index_select(0, idx)
                b = time.perf_counter()
                rows.index_select(0, idx)
                warm.append(time.perf_counter() - b)
                cold.append(b - a)
            out[name] = (statistics.median(cold), statistics.median(warm))
    return out


def summary(rows: list[dict], key: str) -> tuple[float, float]:
    values = [r[key] for r in rows]
    return min(values), statistics.median(values)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="tiny_flowgrpo")
    p.add_argument("--iterations", type=int, default=12, help="timed iterations per trainer (after --warmup)")
    p.add_argument("--warmup", type=int, default=2, help="untimed first iterations (caches; compilation)")
    p.add_argument("--compile", action="store_true", help="also run trainer.compile=true, interleaved")
    p.add_argument("--backend", default="inductor", help="torch.compile backend for --compile")
    p.add_argument("--compare", action="append", default=[], metavar="NAME=OVERRIDES",
                   help="also run a trainer with these space-separated overrides, interleaved (repeatable), e.g. "
                        "--compare 'threads1=trainer.reward_threads=1'")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", metavar="PATH", help="also write every timed iteration's split, the load averages and "
                                                  "the process's peak resident memory as JSON (bench_allocator.py)")
    p.add_argument("overrides", nargs="*", help="config overrides for both trainers")
    args = p.parse_args()
    load = load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {load:.2f} at start, {os.cpu_count()} CPUs")
    base = [f"trainer.device={args.device}", *args.overrides]
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {"eager": build(args.recipe, f"{tmp}/eager", base)}
        if args.compile:
            trainers["compiled"] = build(args.recipe, f"{tmp}/compiled",
                                         [*base, "trainer.compile=true", f"trainer.compile_backend={args.backend}"])
        for spec in args.compare:
            name, _, extra = spec.partition("=")
            if not extra or name in trainers:
                raise SystemExit(f"--compare {spec!r}: give NAME=OVERRIDES with a new name")
            trainers[name] = build(args.recipe, f"{tmp}/{name}", [*base, *extra.split()])
        rows = {name: [] for name in trainers}
        try:
            for name, (t, c) in trainers.items():
                t0 = time.perf_counter()
                for _ in range(args.warmup):
                    one_iteration(t, c)
                print(f"{name}: {args.warmup} warm-up iteration(s) took {time.perf_counter() - t0:.1f} s")
            for _ in range(args.iterations):  # interleaved: one iteration of each in turn
                for name, (t, c) in trainers.items():
                    rows[name].append(one_iteration(t, c))
        finally:
            for t, _ in trainers.values():
                t.reward_runner.close()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{args.recipe}: {args.iterations} iterations each, after {args.warmup} warm-up; load average {load:.2f} "
          f"at the end")
    if args.json:
        import json
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        Path(args.json).write_text(json.dumps({"recipe": args.recipe, "load_start": load_start, "load_end": load,
                                               "peak_rss_bytes": peak, "rows": rows}, indent=1))
    for name, r in rows.items():
        print(f"  {name}:")
        for key in ("iteration", "rollout", "update", "model", "reward", "overhead"):
            lo, med = summary(r, key)
            print(f"    {key:<10} min {lo * 1000:8.1f} ms   median {med * 1000:8.1f} ms")
        share = [x["overhead"] / x["iteration"] for x in r]
        print(f"    overhead share of the iteration: min {min(share):.2%}, median {statistics.median(share):.2%} "
              f"(target < 2%)")
        segs = statistics.median(x["segments"] for x in r)
        print(f"    model segments per iteration (median): {segs:g}")
    t, _ = trainers["eager"]
    probe = first_op_after_model(t)
    for name, (cold, warm) in probe.items():
        print(f"  first loop operation after a {name}: {cold * 1e6:.0f} us, the same again at once {warm * 1e6:.0f} us")
    extra = statistics.median(cold - warm for cold, warm in probe.values())
    segs = statistics.median(x["segments"] for x in rows["eager"])
    med = statistics.median(x["iteration"] for x in rows["eager"])
    print(f"  eager: {segs:g} model segments x {extra * 1e6:.0f} us = {segs * extra * 1000:.1f} ms of the overhead "
          f"({segs * extra / med:.2%} of the median iteration) is the loop refilling the caches each model segment "
          f"evicts; it moves with the number of segments, not with the loop's own operations")
    for name in rows:
        if name == "eager":
            continue
        ratio = [c["iteration"] / e["iteration"] for e, c in zip(rows["eager"], rows[name])]
        model = [c["model"] / e["model"] for e, c in zip(rows["eager"], rows[name])]
        label = f"compiled / eager ({args.backend})" if name == "compiled" else f"{name} / eager"
        print(f"  {label}, paired iterations: iteration min {min(ratio):.3f} median "
              f"{statistics.median(ratio):.3f}; model time min {min(model):.3f} median {statistics.median(model):.3f}")


if __name__ == "__main__":
    main()
