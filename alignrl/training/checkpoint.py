"""Atomic, verifiable checkpoints holding the whole training state.

Layout of ``<run_dir>/checkpoints/step_000123/``::

    trainable.safetensors   live trainable parameters (LoRA or the whole denoiser)
    ema.safetensors         EMA shadow of the same parameters (when EMA is on)
    optimizer.pt            optimizer state (torch.save; loaded with weights_only=True)
    lr_scheduler.pt         learning-rate schedule state (idem)
    rng/rank_<r>.pt         RNG states of every rank (python, numpy, torch, device)
    rng/algorithm_rank_<r>.safetensors   per-process algorithm state, for methods that keep one (DPOK's replay
                            buffer and value network, ReinFlow's noise network)
    state.json              iteration, counters, sampler / planner / stat-tracker state, world size
    lora/                   the adapter in diffusers' LoRA format (``pipe.load_lora_weights``)
    sharded/                distributed=fsdp: weights, EMA and optimizer states in torch.distributed.checkpoint
                            form, one file per process (no optimizer.pt; the .safetensors only with
                            distributed.whole_weights)
    MANIFEST.json           size and CRC-32 of every file above
    COMPLETE                written last: a directory without it is not a checkpoint

Everything is written into ``step_000123.tmp/`` first, fsynced, and renamed into place, so a crash while
saving leaves the previous checkpoint untouched; ``latest_checkpoint`` ignores incomplete ones. Pruning
removes ``COMPLETE`` first, so a kill mid-prune leaves a directory that is no checkpoint, never a
"complete" one without its weights. ``verify_checkpoint`` checks a checkpoint against its manifest (or,
for checkpoints written before manifests, that the files are there and their headers readable) before
any model loads; ``resolve_resume`` skips unusable ones, saying which and why.

CRC-32 rather than SHA-256: the manifest guards against torn writes and bit rot, not tampering (whoever
can edit a file can edit the manifest), and zlib's CRC-32 ran at 3.7 GB/s against hashlib's SHA-256 at
1.6 GB/s on this project's CPU (256 MiB in memory, measured).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import struct
import sys
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from alignrl.errors import CheckpointError

STEP_RE = re.compile(r"^step_(\d+)$")
OLD_RE = re.compile(r"^step_(\d+)\.old$")  # the previous copy of a step being saved again
MARKER = "COMPLETE"
BEST = "BEST"  # checkpoints/BEST: the step of the best evaluation (trainer.early_stop.keep_best), kept by pruning
MANIFEST = "MANIFEST.json"
REQUIRED = ("state.json", "trainable.safetensors", "optimizer.pt", "lr_scheduler.pt")
_CHUNK = 8 << 20


class CorruptCheckpoint(CheckpointError):
    """A checkpoint whose files are missing, truncated, altered or unreadable (an older one may still be good)."""

    def __init__(self, path: Path, problem: str):
        self.path, self.problem = Path(path), problem
        super().__init__(f"checkpoint {path} is unusable: {problem}")


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def step_of(path: Path) -> int:
    m = STEP_RE.match(path.name) or OLD_RE.match(path.name)
    if m is None:
        raise ValueError(f"{path} is not a step directory")
    return int(m.group(1))


def is_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / MARKER).is_file() and (path / "state.json").is_file()


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first. ``step_N.old`` stands in for ``step_N`` while that step is saved
    again (between the two renames of ``CheckpointWriter.commit``, or after a crash there)."""
    if not ckpt_root.is_dir():
        return []
    found: dict[int, Path] = {}
    for p in ckpt_root.iterdir():
        if STEP_RE.match(p.name) and is_checkpoint(p):
            found[step_of(p)] = p
    for p in ckpt_root.iterdir():
        if OLD_RE.match(p.name) and step_of(p) not in found and is_checkpoint(p):
            found[step_of(p)] = p
    return [found[s] for s in sorted(found)]


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    found = list_checkpoints(ckpt_root)
    return found[-1] if found else None


# ------------------------------------------------------------------------------------ verification
def _file_crc32(path: Path, fsync: bool = False) -> tuple[int, str]:
    """(size, CRC-32 hex) of a file, read in chunks (zlib releases the GIL: files hash in parallel)."""
    crc, size = 0, 0
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            crc = zlib.crc32(view[:n], crc)
            size += n
        if fsync:
            os.fsync(f.fileno())
    return size, f"{crc:08x}"


def _files_under(directory: Path) -> list[Path]:
    return sorted(f for f in directory.rglob("*") if f.is_file() and f.name not in (MANIFEST, MARKER))


def _crc_all(directory: Path, files: list[Path], fsync: bool = False) -> dict[str, tuple[int, str]]:
    with ThreadPoolExecutor(max_workers=max(1, min(4, len(files), os.cpu_count() or 1))) as pool:
        sums = list(pool.map(lambda f: _file_crc32(f, fsync), files))
    return {f.relative_to(directory).as_posix(): s for f, s in zip(files, sums)}


def write_manifest(directory: Path, fsync: bool = True) -> dict:
    """Record size and CRC-32 of every file of ``directory`` in MANIFEST.json (fsyncing each file when asked)."""
    directory = Path(directory)
    sums = _crc_all(directory, _files_under(directory), fsync)
    manifest = {"format": 1, "checksum": "crc32",
                "files": {name: {"size": size, "crc32": crc} for name, (size, crc) in sums.items()}}
    _write_synced(directory / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def _safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a readable safetensors file (header, offsets and length), or None."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                return f"{path.name}: {size} bytes, too short for a safetensors header"
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100 << 20):
                return f"{path.name}: header length {n} does not fit the file's {size} bytes (truncated?)"
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        return f"{path.name}: unreadable safetensors header ({type(e).__name__})"
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError):
            return f"{path.name}: malformed safetensors header entry {name!r}"
    if 8 + n + end != size:
        return f"{path.name}: the header describes {8 + n + end} bytes but the file has {size} (truncated?)"
    return None


def _zip_problem(path: Path, full: bool) -> str | None:
    """Why ``path`` is not a readable torch.save zip archive (directory; with ``full``, every member's CRC)."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip() if full else None
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as e:
        return f"{path.name}: not a readable torch archive ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    return f"{path.name}: member {bad} fails its CRC" if bad else None


def _structure_problem(path: Path, full_zip: bool) -> str | None:
    if path.suffix == ".safetensors":
        return _safetensors_problem(path)
    if path.suffix == ".pt":
        return _zip_problem(path, full_zip)
    return None


def verify_checkpoint(path: Path) -> None:
    """Raise ``CorruptCheckpoint`` naming the first problem: missing file, size or checksum that differs from
    the manifest, unreadable state.json, safetensors header or torch archive. Reads every byte once
    (CRC-32); checkpoints without a manifest (written before it existed) get the checks that need none."""
    path = Path(path)
    if not is_checkpoint(path):
        raise CorruptCheckpoint(path, f"no {MARKER} marker or state.json (an unfinished save?)")
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        if not isinstance(state, dict) or "iteration" not in state:
            raise ValueError("no iteration")
    except (OSError, ValueError) as e:
        raise CorruptCheckpoint(path, f"state.json is unreadable ({type(e).__name__}: {str(e)[:80]})") from None
    required = list(REQUIRED) + (["ema.safetensors"] if state.get("ema") is not None else [])
    if state.get("sharded"):  # distributed=fsdp: weights, EMA and optimizer states in sharded/ (DCP)
        whole = state.get("whole_weights", True)
        required = [r for r in required if r != "optimizer.pt" and (whole or not r.endswith(".safetensors"))]
        required.append("sharded/.metadata")
    missing = [r for r in required if not (path / r).is_file()]
    if missing:
        raise CorruptCheckpoint(path, f"{missing[0]} is missing")
    if (path / MANIFEST).is_file():
        try:
            manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
            listed = {k: (int(v["size"]), str(v["crc32"])) for k, v in manifest["files"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CorruptCheckpoint(path, f"{MANIFEST} is unreadable ({type(e).__name__})") from None
        for name, (size, _) in listed.items():  # sizes first: a truncated file is named without reading it
            f = path / name
            if not f.is_file():
                raise CorruptCheckpoint(path, f"{name} is missing")
            if f.stat().st_size != size:
                raise CorruptCheckpoint(path, f"{name} has {f.stat().st_size} bytes, the manifest says {size} "
                                              f"(truncated or rewritten)")
        unlisted = [r for r in required if r not in listed]
        if unlisted:
            raise CorruptCheckpoint(path, f"{unlisted[0]} is not in {MANIFEST}")
        actual = _crc_all(path, [path / n for n in listed])
        for name, (size, crc) in listed.items():
            if actual[name][1] != crc:
                raise CorruptCheckpoint(path, f"{name} fails its checksum: crc32 {actual[name][1]}, the manifest "
                                              f"says {crc} (the file changed after it was written)")
    for name in required:
        problem = _structure_problem(path / name, full_zip=not (path / MANIFEST).is_file())
        if problem:
            raise CorruptCheckpoint(path, problem)


def warn(message: str) -> None:
    print(f"alignrl: warning: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ resume
def resume_candidates(resume, run_dir: Path) -> tuple[list[Path], bool]:
    """The checkpoints ``resume`` may mean, newest first, and whether it named one checkpoint explicitly.

    ``None``/``none``: none. ``auto``: those of ``run_dir``. A path: that checkpoint directory, or a
    run directory's checkpoints. Reads no weights."""
    if resume in (None, "", "none", "null", False):
        return [], False
    if str(resume) == "auto":
        return list_checkpoints(Path(run_dir) / "checkpoints")[::-1], False
    path = Path(str(resume)).expanduser()
    if is_checkpoint(path):
        return [path], True
    if path.is_dir():
        found = list_checkpoints(path / "checkpoints") or list_checkpoints(path)
        if found:
            return found[::-1], False
    raise CheckpointError(
        f"resume='{resume}' is not a checkpoint (a checkpoints/step_N directory with {MARKER}) "
        f"nor a run directory holding one; use resume=auto or a path such as outputs/<recipe>/<run>/checkpoints/step_000010"
    )


def first_usable(candidates: list[Path], explicit: bool, start: int = 0, what: str = "resume") -> int | None:
    """Index of the first candidate from ``start`` on that passes ``verify_checkpoint``; each one skipped is
    named in a one-line warning. An explicit checkpoint that fails, or a list in which none passes, raises
    ``CheckpointError``; an empty list gives None."""
    for i in range(start, len(candidates)):
        try:
            verify_checkpoint(candidates[i])
            return i
        except CorruptCheckpoint as e:
            if explicit:
                raise CheckpointError(f"{what}={e.path} cannot be used: {e.problem}; pick another checkpoint "
                                      f"(or the run directory, for its newest good one)") from None
            skipped_to = "trying the previous one" if i + 1 < len(candidates) else "no older checkpoint is left"
            warn(f"checkpoint {e.path} is unusable: {e.problem}; {skipped_to}")
    if not candidates:
        return None
    raise CheckpointError(f"no usable checkpoint in {candidates[0].parent} ({len(candidates)} found, every one "
                          f"damaged; the warnings above say how); move them aside to start over, or use another run_dir")


def resolve_resume(resume: str | None, run_dir: Path, verify: bool = True) -> Path | None:
    """``None``: fresh start. ``auto``: the newest usable checkpoint of ``run_dir`` (fresh if none).
    A path: a checkpoint directory, or a run directory (its newest usable checkpoint).

    With ``verify`` each candidate is checked (``verify_checkpoint``); a damaged newest one is skipped with a
    warning, a damaged explicit one is an error."""
    candidates, explicit = resume_candidates(resume, run_dir)
    if not candidates:
        return None
    if not verify:
        return candidates[0]
    return candidates[first_usable(candidates, explicit)]


# ------------------------------------------------------------------------------------ writing
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    _write_synced(tmp, text)
    os.replace(tmp, path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp_files(directory: Path) -> list[Path]:
    """Delete ``<name>.tmp<pid>`` files (``atomic_write_text`` leftovers) of processes that are gone."""
    removed = []
    if not Path(directory).is_dir():
        return removed
    for f in Path(directory).iterdir():
        m = re.search(r"\.tmp(\d+)$", f.name)
        if m and f.is_file() and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            f.unlink(missing_ok=True)
            removed.append(f)
    return removed


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_python_state(state["python"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_python_state(s):
    version, internal, gauss = s
    return (version, tuple(internal), gauss)


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint directory, its COMPLETE marker first (fsynced): a kill part-way leaves a directory
    that is no checkpoint (``clean`` removes it later), never a 'complete' one without its weights."""
    marker = Path(path) / MARKER
    if marker.exists():
        marker.unlink()
        _fsync_dir(Path(path))
    shutil.rmtree(path, ignore_errors=True)


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint to ``step_N.damaged`` (``.damaged2``, ... if taken): no longer found or
    pruned, kept for inspection."""
    path = Path(path)
    target, n = path.with_name(path.name + ".damaged"), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.damaged{n}")
    os.replace(path, target)
    _fsync_dir(path.parent)
    return target


class CheckpointWriter:
    """Writes checkpoints in the two phases multi-process runs need (every rank's RNG, then rank 0)."""

    def __init__(self, run_dir: Path, keep: int = 3, protect: int | None = None):
        self.root = Path(run_dir) / "checkpoints"
        self.keep = int(keep)
        self.protect = protect  # a step prune never removes (the best evaluation's, trainer.early_stop.keep_best)

    def tmp_dir(self, step: int) -> Path:
        return self.root / (step_dir_name(step) + ".tmp")

    def clean(self) -> list[Path]:
        """Remove what interrupted saves and prunes left: ``step_N.tmp`` directories, step directories without
        COMPLETE (a prune killed part-way), ``step_N.old`` copies (restored when ``step_N`` itself is gone)."""
        removed = []
        if not self.root.is_dir():
            return removed
        for p in sorted(self.root.iterdir()):
            if not p.is_dir():
                continue
            if p.name.startswith("step_") and p.name.endswith(".tmp"):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
            elif STEP_RE.match(p.name) and not (p / MARKER).is_file():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
        for p in sorted(self.root.iterdir()):
            if OLD_RE.match(p.name):
                final = p.with_name(step_dir_name(step_of(p)))
                if not is_checkpoint(final) and is_checkpoint(p):
                    os.replace(p, final)  # a crash between commit's two renames: the old copy is the checkpoint
                    _fsync_dir(self.root)
                else:
                    remove_checkpoint(p)
                    removed.append(p)
        return removed

    def begin(self, step: int) -> Path:
        """Rank 0: create an empty temporary directory for ``step`` (after clearing interrupted saves)."""
        self.clean()
        tmp = self.tmp_dir(step)
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "rng").mkdir(parents=True)
        _fsync_dir(self.root.parent)  # the checkpoints/ entry itself, the first time
        return tmp

    def write_rank_rng(self, step: int, rank: int) -> None:
        torch.save(rng_state(), self.tmp_dir(step) / "rng" / f"rank_{rank}.pt")

    def commit(self, step: int) -> Path:
        """Rank 0, after every file is written: fsync and checksum every file (MANIFEST.json), mark complete,
        rename into place, prune old ones. A step saved again keeps its old copy as ``step_N.old`` (which
        ``list_checkpoints`` accepts) until the new one is in place, so a good checkpoint exists throughout."""
        tmp = self.tmp_dir(step)
        write_manifest(tmp, fsync=True)
        _write_synced(tmp / MARKER, "ok\n")
        for d in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
            _fsync_dir(d)
        final = self.root / step_dir_name(step)
        old = None
        if final.exists():
            old = final.with_name(final.name + ".old")
            if old.exists():
                remove_checkpoint(old)
            os.replace(final, old)
            _fsync_dir(self.root)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        if old is not None:
            remove_checkpoint(old)
        self.prune(step)
        return final

    def prune(self, newest: int | None = None) -> list[Path]:
        """Keep the ``keep`` newest checkpoints at or before step ``newest`` (the one just written). Ones after
        it belong to a timeline the run abandoned (it resumed from an earlier checkpoint): left alone, and
        replaced when the run saves those steps again."""
        if self.keep <= 0:
            return []
        found = [p for p in list_checkpoints(self.root) if (newest is None or step_of(p) <= newest)
                 and step_of(p) != self.protect]
        removed = found[: -self.keep]
        for old in removed:
            remove_checkpoint(old)
        return removed


def mark_best(run_dir: Path, step: int) -> None:
    """Name ``step`` as the run's best checkpoint (kept through pruning)."""
    atomic_write_text(Path(run_dir) / "checkpoints" / BEST, f"{int(step)}\n")


def load_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def torch_load_trusted(path: Path):
    """Load a file this program wrote (optimizer/scheduler/RNG state): tensors and plain types only."""
    return torch.load(path, map_location="cpu", weights_only=True)
