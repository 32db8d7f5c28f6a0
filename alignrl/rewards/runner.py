"""Asynchronous reward scoring: score batch k on a worker thread while batch k+1 samples."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch


class AsyncRewardRunner:
    """``workers`` threads score the rewards; ``threads``: torch's intra-op threads in each of them (0: torch's
    default, the sampler's). One keeps a reward's torch work from running a second pool of intra-op threads beside
    the sampler's on the same cores (measured on 2 CPU cores: the default recipe's iteration took 0.99 s with two,
    0.69 s with one)."""

    def __init__(self, reward, workers: int = 1, threads: int = 0):
        self.reward = reward
        # torch.set_num_threads in a worker sets that thread's pool (OpenMP's thread count is per thread); threads
        # started later take it as their default, while the sampler's (the main thread's) keeps its own
        init = (lambda: torch.set_num_threads(threads)) if threads > 0 else None
        self.pool = ThreadPoolExecutor(max_workers=max(1, int(workers)), thread_name_prefix="reward",
                                       initializer=init)

    def submit(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> Future:
        # Images leave the device before the thread starts so the sampler can reuse its memory.
        return self.pool.submit(self.reward, images.detach().float().cpu(), list(prompts), list(metadata))

    def close(self) -> None:
        self.pool.shutdown(wait=True)
