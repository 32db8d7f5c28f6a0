"""The collectives the training loop, its checkpointer and its run control agree through.

With one process every call is the identity (no process group needed); with several, each call is one
collective every rank must reach at the same point, so decisions taken on its answer (stop, skip a damaged
checkpoint, a time budget) are the same everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Collectives:
    rank: int
    world: int
    device: torch.device
    accelerator: object = None  # accelerate's Accelerator (gather, wait_for_everyone); None: one process

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(t) if self.world > 1 else t

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """In place (and returned): the sum over ranks."""
        if self.world > 1:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return t

    def agreed_max(self, value: float) -> float:
        """The largest of the ranks' values, so decisions taken on it (time budgets) agree everywhere."""
        if self.world == 1:
            return value
        return float(self.all_reduce_max(torch.tensor([value], dtype=torch.float64, device=self.device)).item())

    def max_int(self, value: int) -> int:
        """The largest of the ranks' integers (a flag or an error code every rank then acts on)."""
        if self.world == 1:
            return int(value)
        return int(self.all_reduce_max(torch.tensor([int(value)], device=self.device)).item())

    def broadcast_int(self, value: int, src: int = 0) -> int:
        if self.world == 1:
            return int(value)
        t = torch.tensor([int(value)], dtype=torch.long, device=self.device)
        torch.distributed.broadcast(t, src=src)
        return int(t.item())

    def gather_sizes(self, n: int) -> list[int]:
        if self.world == 1:
            return [n]
        return self.gather(torch.tensor([n], device=self.device)).cpu().tolist()

    def gather_uneven(self, t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Every rank's rows of ``t`` (rank ``i`` holds ``sizes[i]``) in rank order."""
        if self.world == 1:
            return t
        pad = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=t.device)
        pad[:len(t)] = t
        full = self.gather(pad)
        return torch.cat([full[i * max(sizes): i * max(sizes) + n] for i, n in enumerate(sizes)])

    def sum_gradients(self, params: list[torch.Tensor]) -> None:
        """Replace each parameter's gradient by its sum over ranks (one flat all-reduce)."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
            offset += g.numel()

    def barrier(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()
