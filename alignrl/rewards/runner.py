"""Asynchronous reward scoring: score batch k on a worker thread while batch k+1 samples."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch


class AsyncRewardRunner:
    def __init__(self, reward, workers: int = 1):
        self.reward = reward
        self.pool = ThreadPoolExecutor(max_workers=max(1, int(workers)), thread_name_prefix="reward")

    def submit(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> Future:
        # Images leave the device before the thread starts so the sampler can reuse its memory.
        return self.pool.submit(self.reward, images.detach().float().cpu(), list(prompts), list(metadata))

    def close(self) -> None:
        self.pool.shutdown(wait=True)
