"""Data parallelism for training: ``train --parallel dp=N``.

Every rank draws the same global batch (the data generator is seeded alike and advanced alike on
every rank), keeps its own slice of ``batch_size / N`` windows, and computes that slice's
gradients; the gradients are then averaged over the ranks before clipping and the optimizer
step, so every rank applies the same update and keeps the same weights, optimizer state and
generator — the *global* state, which is all a checkpoint holds. That is why a dp=2 checkpoint
resumes in one process, or on 4 ranks, unchanged.

:func:`fit <minitx.training.loop.fit>` sees only a :class:`Reducer`: which slices this process
computes (``local``), how to average their gradients and loss statistics (``reduce``), and
whether it writes files and progress (``is_writer``). Two implementations:

* :class:`MPIReducer` — one rank per process under ``mpiexec``; the gradients are concatenated
  into a few flat buffers (buckets of :data:`BUCKET` elements per dtype) and summed with MPI
  all-reduces, each with the transport's deadline (a dead rank is an error, not a hang);
* :class:`LocalReducer` — without ``mpiexec``, the N slices one after the other in this process,
  summed in rank order: with 2 ranks the same float sums as MPI's, so the simulated run and the
  2-process run agree bit for bit.

Against a plain single-process run (the whole batch in one pass) the weights agree to float
round-off, not bit for bit: each slice's mean loss is scaled by 1/(B/N) and the N slices summed,
where one process scales the whole batch's sum by 1/B. Dropout masks depend on the batch shape,
so with dropout the two runs draw different masks (statistically alike, not the same weights).
"""
from __future__ import annotations

import os
import sys
from typing import Sequence

import numpy as np

from ..errors import MinitxError
from . import launched_world

BUCKET = 1 << 22          # elements per flat buffer: few collectives, bounded extra memory
Grads = dict[str, np.ndarray]


def parse(text: str | None) -> int:
    """``--parallel dp=N`` → N (1 when not given); any other layout is a one-line error."""
    if not text:
        return 1
    key, sep, val = text.strip().partition("=")
    if key.strip() != "dp" or not sep or "," in val:
        raise MinitxError(f"--parallel for training takes dp=N (data parallel), got {text!r}"
                          + ("; tp, pp and sp train later" if key.strip() in ("tp", "pp", "sp", "mb") else ""))
    try:
        n = int(val)
    except ValueError:
        n = 0
    if n <= 0:
        raise MinitxError(f"--parallel dp must be a positive integer, got {val.strip()!r}")
    return n


class LocalReducer:
    """All ``world`` slices in this process (``world`` 1: the plain single-process run)."""

    def __init__(self, world: int = 1) -> None:
        self.world, self.rank, self.is_writer = world, 0, True
        self.local: Sequence[int] = range(world)

    def reduce(self, parts: list[Grads], stats: np.ndarray) -> tuple[Grads, np.ndarray]:
        """``parts[i]`` is slice ``local[i]``'s gradient sum, ``stats`` the sum of the slices'
        statistics (float64), whose last entry is nonzero where a step overflowed (mixed
        precision): then the step is skipped on every rank and no gradients are returned.
        Returns the averages over all ranks."""
        stats = stats / self.world
        if stats[-1]:
            return {}, stats
        total = dict(parts[0])
        for p in parts[1:]:
            for k, g in p.items():
                total[k] = total[k] + g
        return _scaled(total, self.world), stats

    def agree(self, digest: str, what: str) -> None:
        """One process: nothing to compare."""


class MPIReducer:
    """One rank per process: the slice ``rank`` here, the sums over MPI."""

    def __init__(self, comm) -> None:
        from .mpi import MPITransport

        self.world, self.rank = comm.Get_size(), comm.Get_rank()
        self.group = tuple(range(self.world))
        self.transport = MPITransport(comm, [self.group])
        self.is_writer = self.rank == 0
        self.local = (self.rank,)

    def reduce(self, parts: list[Grads], stats: np.ndarray) -> tuple[Grads, np.ndarray]:
        """As :meth:`LocalReducer.reduce`; the statistics go first, so a step that overflowed on
        any rank exchanges no gradients."""
        stats = self.transport.all_reduce(np.ascontiguousarray(stats, np.float64), ranks=self.group) / self.world
        if stats[-1]:
            return {}, stats
        (grads,) = parts
        out: Grads = {}
        for keys in buckets(grads):
            flat = np.concatenate([grads[k].reshape(-1) for k in keys])
            total = self.transport.all_reduce(flat, ranks=self.group)
            at = 0
            for k in keys:
                n = grads[k].size
                out[k] = total[at: at + n].reshape(grads[k].shape)
                at += n
        return _scaled(out, self.world), stats

    def agree(self, digest: str, what: str) -> None:
        """Check every rank holds the same ``what`` (its hex ``digest``): ranks that read or
        tokenised the text differently would otherwise train on different data in silence."""
        mine = np.frombuffer(bytes.fromhex(digest), np.uint8)
        every = self.transport.all_gather(mine[None], ranks=self.group, axis=0)
        differ = [r for r in range(self.world) if not np.array_equal(every[r], every[0])]
        if differ:
            raise MinitxError(f"--parallel dp={self.world}: rank {differ[0]} has other {what} than rank 0 "
                              "(every rank must read the same files)")


def buckets(grads: Grads, size: int = BUCKET) -> list[list[str]]:
    """The gradient names in flat buffers of one dtype and at most ``size`` elements (a larger
    tensor alone), in sorted order so every rank forms the same buffers."""
    out: list[list[str]] = []
    open_: dict[str, tuple[list[str], int]] = {}
    for k in sorted(grads):
        dt, n = grads[k].dtype.str, grads[k].size
        keys, filled = open_.get(dt, ([], 0))
        if keys and filled + n > size:
            out.append(keys)
            keys, filled = [], 0
        keys.append(k)
        open_[dt] = (keys, filled + n)
    out.extend(keys for keys, _ in open_.values() if keys)
    return out


def _scaled(grads: Grads, world: int) -> Grads:
    if world == 1:
        return grads
    return {k: g * g.dtype.type(1.0 / world) for k, g in grads.items()}


def reducer(text: str | None, batch_size: int, connect: bool = True):
    """The reducer ``--parallel`` asks for, after checking ``batch_size`` splits into the ranks.
    Under ``mpiexec`` the world must be dp; without it dp ranks are simulated in this process.
    Errors come before any communication, on every rank alike; ``connect=False`` only checks."""
    dp = parse(text)
    world = launched_world()
    if world > 1 and world != dp:
        raise MinitxError(f"--parallel dp={dp} needs {dp} ranks, but mpiexec started {world}"
                          if text else f"mpiexec started {world} ranks: give --parallel dp={world} to train on them")
    if batch_size % dp:
        raise MinitxError(f"--batch {batch_size} does not split into {dp} data-parallel ranks "
                          f"(the global batch must be a multiple of dp={dp})")
    if world == 1 or not connect:
        return LocalReducer(dp)
    from .mpi import load_mpi

    comm = load_mpi().COMM_WORLD
    if comm.Get_size() != dp:
        raise MinitxError(f"--parallel dp={dp} needs {dp} ranks, but MPI has {comm.Get_size()}")
    return MPIReducer(comm)


def quiet_unless_writer(red) -> None:
    """Rank 0 prints the command's output; the others are silent (errors still go to stderr)."""
    if not red.is_writer:
        sys.stdout = open(os.devnull, "w")
