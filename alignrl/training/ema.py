"""Exponential moving average of the trainable parameters.

Updated every ``update_every`` optimizer steps with ``decay_s = min(decay, (1 + s) / (10 + s))``
(s = optimizer steps so far: a warm-up so early averages are not dominated by the init).
Flow-GRPO's default, decay 0.9 every 8 steps, averages over roughly the last 80-160 steps.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


class EMA:
    def __init__(self, params: list[torch.nn.Parameter], decay: float = 0.9, update_every: int = 8):
        self.params = list(params)
        self.decay = float(decay)
        self.update_every = max(1, int(update_every))
        self.shadow = [p.detach().clone().float() for p in self.params]
        self.num_updates = 0
        self.optimizer_steps = 0

    @torch.no_grad()
    def step(self) -> None:
        self.optimizer_steps += 1
        if self.optimizer_steps % self.update_every:
            return
        step = self.optimizer_steps
        decay = min(self.decay, (1 + step) / (10 + step))
        sources = [p if p.dtype == torch.float32 else p.float() for p in self.params]  # no_grad: no detach needed
        if any(type(s) is not torch.Tensor for s in self.shadow):  # sharded (DTensor) shadows: one lerp each
            for s, src in zip(self.shadow, sources):
                s.lerp_(src, 1 - decay)
        else:  # one call for all tensors: the same lerp per element, without an operation's dispatch per tensor
            torch._foreach_lerp_(self.shadow, sources, 1 - decay)
        self.num_updates += 1

    @contextmanager
    def swapped(self):
        """Temporarily load the EMA weights into the live parameters (evaluation, export)."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s.to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    p.copy_(b)

    def state_tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        return {n: s.contiguous() for n, s in zip(names, self.shadow)}

    def load_state_tensors(self, names: list[str], tensors: dict[str, torch.Tensor], layout=None) -> None:
        """``layout(full, shadow)``: a whole tensor laid out as the shadow (its shard, for sharded weights)."""
        for i, n in enumerate(names):
            full = tensors[n].to(self.shadow[i].device)
            self.shadow[i].copy_(layout(full, self.shadow[i]) if layout is not None else full)

    def counters(self) -> dict:
        return {"num_updates": self.num_updates, "optimizer_steps": self.optimizer_steps}

    def load_counters(self, state: dict) -> None:
        self.num_updates = int(state["num_updates"])
        self.optimizer_steps = int(state["optimizer_steps"])
