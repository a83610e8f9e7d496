"""Checkpoints that resume training exactly.

A checkpoint is a directory ``checkpoint-{step:08d}`` holding one file per rank (``rank{r}.pt``):
model, optimiser, scheduler, strategy state, data position (epoch, batches done in the epoch), step
counters and every random generator's state. Each rank writes its file into
``checkpoint-{step}.tmp``; after a barrier rank 0 renames the directory, so a checkpoint either exists
complete or not at all. Loading uses ``torch.load(weights_only=True)``: only tensors and plain
Python containers are stored (numpy's generator state is converted to a tensor).
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from asr_parallel.utils.io import atomic_path

_NAME = re.compile(r"^checkpoint-(\d{8})$")
_UNUSABLE = re.compile(r"^checkpoint-\d{8}\.unusable-(\d+)$")  # set aside by a resume that could not read it


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x):
    """random.setstate wants tuples; a round trip through torch.save may give lists."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (a full disk, a file-size limit, ...)."""


def _fsync(path: Path) -> None:
    """Flush a file, or a directory's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(exp_dir: Path, step: int, rank: int, world_size: int, state: dict, barrier, keep: int,
         all_ok=None) -> Path:
    """Write this rank's part of checkpoint ``step``; every rank must call it (collective).

    Each file is fsynced before the directory is published, and publishing never leaves a moment
    without a complete checkpoint: the new directory is renamed into place (an older one of the same
    step moved aside first, to ``checkpoint-{step}.old``, which :func:`complete_checkpoints` puts
    back if the process dies between the two renames), and only then are older checkpoints pruned.
    A write that fails (a full disk, a file-size limit) raises :class:`CheckpointError` naming the
    file; the checkpoints before stay as they were. ``all_ok(ok)`` (a collective: True when every
    rank's ``ok`` is; default: ``barrier()`` and ``ok``) tells the ranks whether every write
    succeeded, so that all of them raise, not only the one whose write failed."""
    final = exp_dir / f"checkpoint-{step:08d}"
    tmp = exp_dir / f"checkpoint-{step:08d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    target = tmp / f"rank{rank}.pt"
    failure = None
    try:
        with atomic_path(target) as path:
            torch.save(state, path)
            _fsync(path)
    except Exception as e:  # noqa: BLE001 - torch.save reports a full disk as RuntimeError or OSError
        failure = e
    if all_ok is None:
        def all_ok(ok):
            barrier()
            return ok
    everyone = all_ok(failure is None)
    if failure is not None or not everyone:
        previous = latest(exp_dir, world_size)
        newest = (f", the newest is {previous}" if previous else "")
        if failure is None:
            raise CheckpointError(f"checkpoint {tmp} was not completed: another rank's write failed (its error "
                                  f"names the file); the checkpoints before it are untouched{newest}")
        raise CheckpointError(f"writing checkpoint {target} failed: {type(failure).__name__}: {failure} (disk full "
                              f"or a file-size limit?); the checkpoints before it are untouched{newest}") from failure
    if rank == 0:
        _fsync(tmp)
        aside = exp_dir / f"checkpoint-{step:08d}.old"
        if final.exists():  # the same step written again (a resumed run): keep it until the new one is in
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
        os.replace(tmp, final)
        _fsync(exp_dir)
        shutil.rmtree(aside, ignore_errors=True)
        prune(exp_dir, keep)
    barrier()
    return final


def _restore_set_aside(exp_dir: Path) -> None:
    """Put back a ``checkpoint-{step}.old`` whose replacement never arrived (the process died between
    :func:`save`'s two renames). Several ranks may race here: the first rename wins."""
    for old in exp_dir.glob("checkpoint-*.old"):
        final = old.with_name(old.name[:-len(".old")])
        if _NAME.match(final.name) and not final.exists():
            try:
                os.replace(old, final)
            except FileNotFoundError:
                pass


def complete_checkpoints(exp_dir: Path, world_size: int) -> list[Path]:
    """Finished checkpoints with a file for every rank, oldest first."""
    if not exp_dir.is_dir():
        return []
    _restore_set_aside(exp_dir)
    found = []
    for d in exp_dir.iterdir():
        if _NAME.match(d.name) and all((d / f"rank{r}.pt").is_file() for r in range(world_size)):
            found.append(d)
    return sorted(found)


def latest(exp_dir: Path, world_size: int) -> Path | None:
    ckpts = complete_checkpoints(exp_dir, world_size)
    return ckpts[-1] if ckpts else None


def load(path: Path, rank: int, device: torch.device | str = "cpu") -> dict:
    return torch.load(path / f"rank{rank}.pt", map_location=device, weights_only=True)


def prune(exp_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` step checkpoints (epoch models are kept separately), and the ``keep``
    checkpoints most recently set aside as unreadable (``*.unusable-<time>``, for inspection)."""
    ckpts = sorted(d for d in exp_dir.iterdir() if _NAME.match(d.name))
    unusable = sorted((d for d in exp_dir.iterdir() if _UNUSABLE.match(d.name)),
                      key=lambda d: int(_UNUSABLE.match(d.name).group(1)))
    for group in (ckpts, unusable):
        for d in group[:-keep] if keep > 0 else []:
            shutil.rmtree(d, ignore_errors=True)


def save_model(path: Path, model_state: dict, meta: dict) -> None:
    """A model for decoding (rank 0's evaluation model), written atomically."""
    with atomic_path(path) as tmp:
        torch.save({"model": model_state, "meta": meta}, tmp)


def average_models(paths: list[Path]) -> dict:
    """Parameter average of several saved models (as icefall's ``--avg``)."""
    avg = None
    for p in paths:
        state = torch.load(p, map_location="cpu", weights_only=True)["model"]
        if avg is None:
            avg = {k: v.clone().double() if v.is_floating_point() else v.clone() for k, v in state.items()}
        else:
            for k, v in state.items():
                if v.is_floating_point():
                    avg[k] += v.double()
    n = len(paths)
    return {k: (v / n).float() if v.is_floating_point() else v for k, v in avg.items()}
