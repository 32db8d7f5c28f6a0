"""A run's checkpoints as the loop uses them: which one to resume (chosen and verified before any model loads),
loading it into the run's parts, and saving new ones atomically.

The files and their integrity (manifests, checksums, atomic commits, damaged ones set aside) are
``alignrl/training/checkpoint.py``; this module decides, over all ranks, what to load and what to write.
A checkpoint holds ``trainable.safetensors`` (and ``ema.safetensors``), the optimizer and LR-schedule states
(with ``distributed=fsdp``: the weights, EMA and optimizer states sharded in ``sharded/``, see
``alignrl/training/sharding.py``),
each rank's RNG state, and ``state.json``: counters, the prompt sampler's, planner's and algorithm's states.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from alignrl.errors import AlignError, CheckpointError
from alignrl.runs import read_json
from alignrl.training import checkpoint as ckpt
from alignrl.training.control import one_line
from alignrl.training.distributed import Collectives
from alignrl.training.sharding import _inner


@dataclass
class RunParts:
    """What a checkpoint saves and restores, besides the loop's counters."""

    policy: Any  # alignrl.policy.Policy
    optimizer: Any  # accelerate's wrapped optimizer (or a plain one)
    lr_scheduler: Any
    batch_sampler: Any
    planner: Any
    algorithm: Any
    backbone_family: str
    seed: int
    finetune: str
    text_encoder: str
    sharded: bool = False  # distributed=fsdp: weights, EMA and optimizer states in DCP (sharded/), any process count
    whole_weights: bool = True  # with sharded: also trainable.safetensors / ema.safetensors (gathered)
    early_stop: Any = None  # alignrl.training.early_stop.EarlyStop when trainer.early_stop watches a metric


@dataclass
class Counters:
    """The loop's position: iterations done, optimizer steps taken, training seconds spent."""

    iteration: int = 0
    optimizer_steps: int = 0
    train_seconds: float = 0.0


@dataclass
class Resumed:
    counters: Counters
    path: Path
    saved_at_step: int | None  # the step a good checkpoint of this run stands at (None: a foreign one)




class Checkpointer:
    def __init__(self, run_dir: Path, resume, dist: Collectives, is_main: bool, keep: int):
        """Find the resume candidates (newest first); a run directory that already holds checkpoints with no
        ``resume`` is refused, so a run is never overwritten by accident."""
        self.run_dir = Path(run_dir)
        self.dist = dist
        self.is_main = is_main
        self.keep = keep
        self.protected: int | None = None  # a step pruning keeps (trainer.early_stop.keep_best: the best one)
        self.parts: RunParts | None = None
        self.candidates, self.explicit = ckpt.resume_candidates(resume, self.run_dir)
        if not self.candidates and resume in (None, "", "none") and \
                ckpt.latest_checkpoint(self.run_dir / "checkpoints") is not None:
            raise CheckpointError(f"{self.run_dir} already holds checkpoints; pass resume=auto to continue it "
                                  f"or choose another run_dir")
        self.prior_step = int(read_json(self.run_dir / "status.json").get("step") or 0) \
            if is_main and self.candidates else 0  # the step status.json shows until a checkpoint is loaded
        self.index: int | None = None

    @property
    def resuming(self) -> bool:
        return bool(self.candidates)

    def verify(self) -> None:
        """Choose the newest candidate whose files verify (checksums, headers): before the models load."""
        self.index = self._agreed_first_usable(0)

    def attach(self, parts: RunParts) -> None:
        self.parts = parts

    # ------------------------------------------------------------------ save
    def save(self, counters: Counters) -> None:
        """A checkpoint at ``counters.iteration`` (``step_N``), committed atomically by the main process."""
        p = self.parts
        step = counters.iteration
        writer = ckpt.CheckpointWriter(self.run_dir, self.keep, protect=self.protected)
        if self.is_main:
            writer.begin(step)
        self.dist.barrier()
        writer.write_rank_rng(step, self.dist.rank)
        if hasattr(p.algorithm, "save_rank_state"):  # per-process algorithm state (DPOK's replay buffer)
            p.algorithm.save_rank_state(writer.tmp_dir(step) / "rng" / f"algorithm_rank_{self.dist.rank}.safetensors")
        self.dist.barrier()
        tmp = writer.tmp_dir(step)
        policy = p.policy
        whole = not p.sharded or p.whole_weights
        gather = whole and policy.sharding.gathers  # sharded tensors are gathered by every process, written by rank 0
        trainable = policy.trainable_state() if whole and (self.is_main or gather) else None
        ema = policy.ema_state() if whole and policy.ema is not None and (self.is_main or gather) else None
        # the optimizer's states in the ddp layout; distributed=zero2|zero3 gathers them from every process
        optimizer_state = policy.sharding.optimizer_state_dict(p.optimizer) \
            if not p.sharded and (self.is_main or policy.sharding.owns_update) else None
        if p.sharded:  # every process writes its shards of the weights, the EMA and the optimizer's states
            from alignrl.training.sharding import SHARDED_DIR, save_sharded

            save_sharded(policy, _inner(p.optimizer), tmp / SHARDED_DIR)
        if self.is_main:
            if trainable is not None:
                save_file(trainable, str(tmp / "trainable.safetensors"))
            if ema is not None:
                save_file(ema, str(tmp / "ema.safetensors"))
            if optimizer_state is not None:
                torch.save(optimizer_state, tmp / "optimizer.pt")
            torch.save(p.lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
            if p.finetune == "lora":
                policy.export_lora(tmp / "lora")
            state = {
                "iteration": step, "optimizer_steps": counters.optimizer_steps, "world_size": self.dist.world,
                "train_seconds": counters.train_seconds,
                "finetune": p.finetune, "trainable": len(policy.trainable_names),
                "text_encoder": p.text_encoder,
                "sharded": p.sharded, "whole_weights": whole,
                "prompt_sampler": p.batch_sampler.state_dict(), "planner": p.planner.state_dict(),
                "algorithm": p.algorithm.state_dict(),
                "ema": policy.ema.counters() if policy.ema is not None else None,
                "backbone": p.backbone_family, "seed": p.seed,
            }
            if p.early_stop is not None:
                state["early_stop"] = p.early_stop.state_dict()
            (tmp / "state.json").write_text(json.dumps(state, indent=2))
            writer.commit(step)
        self.dist.barrier()

    # ------------------------------------------------------------------ resume
    def _agreed_first_usable(self, start: int) -> int | None:
        """Index of the first resume candidate from ``start`` on that verifies (checksums, headers).

        The main process reads and checks the files (every byte once); the others take its answer, so N
        processes do not read the checkpoint N times."""
        index, failure = -1, None
        if self.is_main:
            try:
                found = ckpt.first_usable(self.candidates, self.explicit, start)
                index = -1 if found is None else found
            except CheckpointError as e:
                failure, index = e, -2
        index = self.dist.broadcast_int(index)
        if failure is not None:
            raise failure
        if index == -2:
            raise CheckpointError("the main process found no usable checkpoint (its error is printed above)")
        return None if index == -1 else index

    def load(self) -> Resumed | None:
        """Load the chosen checkpoint into the parts; one whose files verify but still cannot be read is skipped
        like a damaged one (the next older one is verified and loaded), unless it was named explicitly."""
        while self.index is not None:
            path = self.candidates[self.index]
            failure = None
            try:
                loaded = self._read(path)
            except Exception as e:  # noqa: BLE001  every rank must learn of it before anyone raises
                failure = e
            code = 0 if failure is None else 1 if isinstance(failure, ckpt.CorruptCheckpoint) else 2
            agreed = self.dist.max_int(code)
            if agreed == 0:
                resumed = self._apply(path, loaded)
                self._set_aside_damaged()
                return resumed
            if code == 2:
                raise failure
            if agreed == 2:
                raise AlignError("another process could not load the checkpoint (its error is printed above)")
            problem = failure.problem if failure is not None else "another process could not read it (see its warning)"
            if failure is not None and not self.is_main:  # the main process cannot know what this one saw
                ckpt.warn(f"process {self.dist.rank}: checkpoint {path} is unusable: {problem}")
            if self.explicit:
                raise CheckpointError(f"resume={path} cannot be used: {problem}; pick another checkpoint "
                                      f"(or the run directory, for its newest good one)")
            if self.is_main:
                more = "trying the previous one" if self.index + 1 < len(self.candidates) \
                    else "no older checkpoint is left"
                ckpt.warn(f"checkpoint {path} is unusable: {problem}; {more}")
            self.index = self._agreed_first_usable(self.index + 1)
        return None

    def _set_aside_damaged(self) -> None:
        """After falling back, rename the damaged newer checkpoints (``step_N.damaged``): the run's newest
        checkpoint is a good one again (for ``eval``, the launcher, the next resume), nothing is deleted."""
        damaged = self.candidates[:self.index]
        if self.is_main and damaged and not self.explicit:
            moved = [ckpt.set_aside(c).name for c in damaged]
            ckpt.warn(f"moved the damaged checkpoint(s) aside, kept for inspection: {', '.join(moved)}")
        self.dist.barrier()

    def _read(self, path: Path) -> dict:
        """Read everything a checkpoint holds into memory and load its trainable weights.

        A file that cannot be read raises ``CorruptCheckpoint`` before any state changes (the trainable
        weights are read last, and ``load_file`` reads the whole file before anything is copied); a checkpoint
        of another setup (finetune, LoRA shapes, EMA) raises ``CheckpointError``."""
        p = self.parts
        policy = p.policy

        def read(name, fn):
            try:
                return fn(path / name)
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001  any reader error means the file cannot be used
                raise ckpt.CorruptCheckpoint(path, f"{name} is unreadable ({one_line(e)[:160]})") from None

        state = read("state.json", lambda f: json.loads(f.read_text(encoding="utf-8")))
        if state.get("finetune") != p.finetune:
            raise CheckpointError(f"{path} was trained with finetune={state.get('finetune')}, "
                                  f"this config says {p.finetune}")
        loaded = {"state": state, "ema": None, "sharded": None, "optimizer": None}
        sharded = bool(state.get("sharded"))
        if policy.ema is not None and state.get("ema") is None:
            raise CheckpointError(f"{path} has no ema.safetensors: the run was trained with trainer.ema.enabled="
                                  f"false; continue it with trainer.ema.enabled=false")
        if sharded and policy.sharding.owns_update:
            raise CheckpointError(f"{path} was saved with distributed=fsdp (sharded states); resume it with "
                                  f"distributed=fsdp, or from a ddp, zero2 or zero3 run's checkpoint")
        if sharded:  # weights, EMA and optimizer states read (resharded) when applied: a collective
            from alignrl.training.sharding import SHARDED_DIR

            loaded["sharded"] = path / SHARDED_DIR
        elif p.sharded and policy.sharding.active:
            raise CheckpointError(f"{path} was saved with distributed=ddp; its optimizer states cannot be sharded: "
                                  f"resume it with distributed=ddp")
        else:
            if policy.ema is not None:
                if not (path / "ema.safetensors").is_file():
                    raise ckpt.CorruptCheckpoint(path, "ema.safetensors is missing although the run keeps an EMA")
                from safetensors.torch import load_file

                ema = read("ema.safetensors", lambda f: load_file(str(f)))
                missing = [n for n in policy.trainable_names if n not in ema]
                if missing:
                    raise CheckpointError(f"{path / 'ema.safetensors'} lacks {len(missing)} trainable tensors "
                                          f"(e.g. {missing[0]}); was it written with another LoRA config?")
                if not all(bool(torch.isfinite(ema[n]).all()) for n in policy.trainable_names):
                    raise CheckpointError(f"{path / 'ema.safetensors'} holds NaN/inf weights: resume from an earlier "
                                          f"checkpoint (resume=<run>/checkpoints/step_N)")
                loaded["ema"] = ema
            loaded["optimizer"] = read("optimizer.pt", ckpt.torch_load_trusted)
        loaded["lr_scheduler"] = read("lr_scheduler.pt", ckpt.torch_load_trusted)
        rng_name = f"rng/rank_{self.dist.rank}.pt"
        loaded["rng"] = read(rng_name, ckpt.torch_load_trusted) if (path / rng_name).is_file() else None
        loaded["algorithm_rank"] = None
        if hasattr(p.algorithm, "load_rank_state"):
            name = f"rng/algorithm_rank_{self.dist.rank}.safetensors"
            if not (path / name).is_file():
                raise CheckpointError(f"{path} holds no {name}: the algorithm keeps per-process state (a replay "
                                      f"buffer); resume with the number of processes the run was saved with "
                                      f"({state.get('world_size')})")
            loaded["algorithm_rank"] = path / name
        if sharded:
            return loaded
        read("trainable.safetensors", policy.load_trainable)
        if not policy.weights_finite(local_only=True):  # no collective here: load() agrees on the outcome
            raise CheckpointError(f"{path / 'trainable.safetensors'} holds NaN/inf weights: resume from an earlier "
                                  f"checkpoint (resume=<run>/checkpoints/step_N)")
        return loaded

    def _apply(self, path: Path, loaded: dict) -> Resumed:
        p = self.parts
        state = loaded["state"]
        if loaded["ema"] is not None:
            p.policy.ema.load_state_tensors(p.policy.trainable_names, loaded["ema"], layout=p.policy.sharding.like)
            p.policy.ema.load_counters(state["ema"])
        if loaded["sharded"] is not None:
            from alignrl.training.sharding import load_sharded

            load_sharded(p.policy, _inner(p.optimizer), loaded["sharded"])
            if p.policy.ema is not None:
                p.policy.ema.load_counters(state["ema"])
            if not p.policy.weights_finite():  # every process agrees (a reduce over the shards)
                raise CheckpointError(f"{loaded['sharded']} holds NaN/inf weights: resume from an earlier checkpoint "
                                      f"(resume=<run>/checkpoints/step_N)")
        else:
            p.policy.sharding.load_optimizer_state_dict(p.optimizer, loaded["optimizer"])
        p.lr_scheduler.load_state_dict(loaded["lr_scheduler"])
        p.batch_sampler.load_state_dict(state.get("prompt_sampler", state.get("sampler")))  # "sampler" before 12-2026
        p.planner.load_state_dict(state.get("planner", {}))
        p.algorithm.load_state_dict(state.get("algorithm", {}))
        if p.early_stop is not None:  # a checkpoint from before the guard was on: it starts afresh
            note = p.early_stop.load_state_dict(state.get("early_stop"))
            if note and self.is_main:
                ckpt.warn(note)
        if loaded.get("algorithm_rank") is not None:
            p.algorithm.load_rank_state(loaded["algorithm_rank"])
        if loaded["rng"] is not None:
            ckpt.set_rng_state(loaded["rng"])
        iteration = int(state["iteration"])
        return Resumed(Counters(iteration, int(state["optimizer_steps"]), float(state.get("train_seconds", 0.0))),
                       path, iteration if path.name == ckpt.step_dir_name(iteration) else None)
