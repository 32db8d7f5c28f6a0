#!/usr/bin/env python
"""Memory and time of one reward-gradient step against the number of sampler steps the gradient flows through.

Modes (alignrl/sampling/differentiable.py), each for N = 1, 2, 4, ... sampler steps:

- ``full``: the graph through all N steps, no checkpointing (what a naive loop does);
- ``checkpointed``: the graph through all N steps, every model call checkpointed (only its input is kept);
- ``truncated``: the graph through the last step only (DRaFT-1; AlignProp's truncation keeps a few);
- ``adjoint``: no graph; the adjoint sampler, one vector-Jacobian product per step (AdjointDPM).

Each measurement runs in a fresh process: the backbone is built, one step runs to warm the allocator, then the
measured step (sample, decode with the graph, the smoothness reward, backward) runs while a thread samples the
resident set (/proc/self/statm) every millisecond; the peak above the resident set before the step is reported
(CPU; glibc's mmap threshold is fixed at 64 KiB in the child, so freed tensors leave the resident set), or
torch.cuda.max_memory_allocated above the allocation before it (CUDA). Models: the tiny SD3 (0.08M
parameters) and a mid-size random-init SD3 of the same classes (``--mid-layers``/``--mid-hidden``).

    python scripts/bench_gradient.py                      # writes the table to stdout
    python scripts/bench_gradient.py --steps 1 2 4 8 16 --device cuda --resolution 256
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODES = ("full", "checkpointed", "truncated", "adjoint")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(args) -> dict:
    """One (model, mode, steps) measurement in this process."""
    import torch

    sys.path.insert(0, str(REPO))
    from alignrl.backbones.sd3 import SD3Backbone
    from alignrl.rewards.pixel import Smoothness
    from alignrl.sampling.differentiable import adjoint_backward, grad_sample, ode_states

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    if args.model == "tiny":
        backbone = SD3Backbone.tiny(resolution=args.resolution, device=args.device)
    else:
        backbone = SD3Backbone.tiny(resolution=args.resolution, device=args.device, num_layers=args.mid_layers,
                                    hidden=args.mid_hidden)
    params = [p for p in backbone.transformer.parameters()]
    for p in params:
        p.requires_grad_(True)
    reward = Smoothness()
    cond = backbone.encode_prompts(["a photo of a red cube"] * args.batch)
    x_T = backbone.initial_noise([torch.Generator(device=args.device).manual_seed(i) for i in range(args.batch)])
    schedule = backbone.make_schedule(args.steps)

    def step():
        for p in params:
            p.grad = None
        if args.mode == "adjoint":
            final, _ = ode_states(backbone, cond, x_T, schedule, 1.0)
            leaf = final.detach().requires_grad_(True)
            loss = -reward.score_tensor(backbone.decode_with_grad(leaf, checkpoint=True), []).sum()
            (g,) = torch.autograd.grad(loss, leaf)
            adjoint_backward(backbone, cond, final, g, schedule, 1.0, backward=lambda t: t.backward())
        else:
            grad_from = args.steps - 1 if args.mode == "truncated" else 0
            x = grad_sample(backbone, cond, x_T, schedule, 1.0, grad_from=grad_from,
                            checkpoint=args.mode != "full")
            loss = -reward.score_tensor(backbone.decode_with_grad(x, checkpoint=args.mode != "full"), []).sum()
            loss.backward()

    step()  # warm-up: allocator caches, lazy initialisation
    cuda = args.device.startswith("cuda")
    peak, stop = [0], threading.Event()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_bytes()

        def poll():
            while not stop.is_set():
                peak[0] = max(peak[0], _rss_bytes())
                time.sleep(0.001)

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
    t0 = time.perf_counter()
    step()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if cuda:
        extra = torch.cuda.max_memory_allocated() - before
    else:
        stop.set()
        thread.join()
        extra = max(peak[0], _rss_bytes()) - before
    n_params = sum(p.numel() for p in params)
    return {"model": args.model, "mode": args.mode, "steps": args.steps, "peak_mb": extra / 2**20,
            "seconds": seconds, "params_m": n_params / 1e6, "device": args.device}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--models", nargs="+", default=["tiny", "mid"], choices=["tiny", "mid"])
    p.add_argument("--mid-layers", type=int, default=4)
    p.add_argument("--mid-hidden", type=int, default=256)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # internal: one measurement
    p.add_argument("--model", default="tiny", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="full", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        args.steps = args.steps[0]
        print(json.dumps(measure(args)))
        return 0
    print(f"# load before: {os.getloadavg()}; nproc {os.cpu_count()}; device {args.device}", flush=True)
    rows = []
    for model in args.models:
        for mode in args.modes:
            for n in args.steps:
                cmd = [sys.executable, __file__, "--one", "--model", model, "--mode", mode, "--steps", str(n),
                       "--mid-layers", str(args.mid_layers), "--mid-hidden", str(args.mid_hidden),
                       "--resolution", str(args.resolution), "--batch", str(args.batch), "--device", args.device,
                       "--threads", str(args.threads)]
                # glibc hands large blocks back to the OS when freed only below its mmap threshold, which otherwise
                # grows after frees: fixed here, the resident set follows the live tensors (no allocator slack)
                env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
                out = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if out.returncode != 0:
                    print(out.stderr[-2000:], file=sys.stderr)
                    return 1
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                r = rows[-1]
                print(f"{model:5s} {mode:13s} steps {n:3d}: peak +{r['peak_mb']:8.1f} MB  {r['seconds']:7.2f} s",
                      flush=True)
    print(f"# load after: {os.getloadavg()}")
    print()
    print("| model | params | mode | " + " | ".join(f"{n} steps" for n in args.steps) + " |")
    print("|---|---|---|" + "---|" * len(args.steps))
    for model in args.models:
        for mode in args.modes:
            cells = [r for r in rows if r["model"] == model and r["mode"] == mode]
            params = cells[0]["params_m"]
            print(f"| {model} | {params:.2f}M | {mode} | " +
                  " | ".join(f"+{r['peak_mb']:.1f} MB, {r['seconds']:.2f} s" for r in cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
