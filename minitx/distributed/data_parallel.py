"""Data parallelism for training: ``train --parallel dp=N``.

Every rank draws the same global batch (the data generator is seeded alike and advanced alike on
every rank), keeps its own slice of ``batch_size / N`` windows, and computes that slice's
gradients; the gradients are then averaged over the ranks before clipping and the optimizer
step, so every rank applies the same update and keeps the same weights, optimizer state and
generator — the *global* state, which is all a checkpoint holds. That is why a dp=2 checkpoint
resumes in one process, or on 4 ranks, unchanged.

:func:`fit <minitx.training.loop.fit>` sees only a reducer: which slices this process computes
(``local``), how to average their gradients and loss statistics (``reduce``), how to apply the
optimizer (``step``) and write a checkpoint (``save``), and whether it writes files and progress
(``is_writer``). Two implementations:

* :class:`MPIReducer` — one rank per process under ``mpiexec``; the gradients are concatenated
  into a few flat buffers (buckets of :data:`BUCKET` elements per dtype) and summed with MPI
  all-reduces, each with the transport's deadline (a dead rank is an error, not a hang); with
  ``zero=1`` each rank keeps the AdamW moments of its share of the weights only (ZeRO-1);
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
from . import launched_world, positive

BUCKET = 1 << 22          # elements per flat buffer: few collectives, bounded extra memory
Grads = dict[str, np.ndarray]


def parse(text: str | None) -> tuple[int, bool]:
    """``--parallel dp=N[,zero=1]`` → (N, whether to shard the optimizer state); (1, False) when
    not given. Any other layout is a one-line error."""
    if not text:
        return 1, False
    vals: dict[str, str] = {}
    for part in text.split(","):
        key, sep, val = part.strip().partition("=")
        if not sep or key.strip() not in ("dp", "zero") or key.strip() in vals:
            raise MinitxError(f"--parallel for training takes dp=N[,zero=1] (data parallel), got {text!r}")
        vals[key.strip()] = val.strip()
    n = positive("dp", vals.get("dp", ""))
    if vals.get("zero", "0") not in ("0", "1"):
        raise MinitxError(f"--parallel zero takes 0 or 1 (ZeRO stage 1: optimizer state sharded), got {vals['zero']!r}")
    return n, vals.get("zero") == "1"


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

    def step(self, opt, params: Grads, grads: Grads, lr: float) -> None:
        """The optimizer update (one process holds all of the optimizer state)."""
        opt.step(params, grads, lr)

    def save(self, path: str, st) -> None:
        from ..training import checkpoint as ckpt

        ckpt.save(path, st)


class MPIReducer:
    """One rank per process: the slice ``rank`` here, the sums over MPI."""

    def __init__(self, comm, zero: bool = False) -> None:
        from .mpi import MPITransport

        self.zero = zero
        self.owner: dict[str, int] = {}      # ZeRO-1: the rank that keeps each weight's AdamW moments
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

    # ------------------------------------------------------------------ ZeRO-1
    def step(self, opt, params: Grads, grads: Grads, lr: float) -> None:
        """Without ZeRO every rank updates every weight. With it each rank keeps the AdamW moments
        of its own share of the weights only (a 1/N of the optimizer state), updates that share,
        and sends it to the others (a broadcast per owner, bucketed): the same arithmetic per
        weight, so the same weights bit for bit."""
        if not self.zero:
            opt.step(params, grads, lr)
            return
        if not self.owner:
            self.owner = shards({k: params[k].size for k in grads}, self.world)
            self._like = params             # shapes and dtypes of the weights (and their moments)
        mine = {k: g for k, g in grads.items() if self.owner.get(k) == self.rank}
        for k in [k for k in opt.m if self.owner.get(k, self.rank) != self.rank]:
            del opt.m[k], opt.v[k]           # (after a load: the checkpoint holds every rank's)
        opt.step(params, mine, lr)
        self._share(params, list(grads))

    def _share(self, arrays: Grads, names: list[str]) -> None:
        """Every rank gets each owner's ``arrays`` (shaped as the weights; in place where it has
        them): per owner, its share in flat buckets, broadcast."""
        for r in range(self.world):
            keys = [k for k in sorted(names) if self.owner.get(k) == r]
            for bucket in buckets({k: self._like[k] for k in keys}):
                flat = (np.concatenate([arrays[k].reshape(-1) for k in bucket]) if r == self.rank else
                        np.empty(sum(self._like[k].size for k in bucket), self._like[bucket[0]].dtype))
                got = self.transport.broadcast(flat, ranks=self.group, root=r)
                at = 0
                for k in bucket:
                    n, shape = self._like[k].size, self._like[k].shape
                    if r != self.rank:
                        if k in arrays:
                            arrays[k][...] = got[at: at + n].reshape(shape)
                        else:
                            arrays[k] = got[at: at + n].reshape(shape).copy()
                    at += n

    def save(self, path: str, st) -> None:
        """The writer writes the checkpoint; with ZeRO the moments are first gathered to every
        rank (each owner broadcasts its share) and dropped again after the save."""
        from ..training import checkpoint as ckpt

        if self.zero and self.owner:
            names = sorted(self.owner)
            st.opt.m.update(self._gathered(st.opt.m, names))
            st.opt.v.update(self._gathered(st.opt.v, names))
        if self.is_writer:
            ckpt.save(path, st)
        if self.zero and self.owner:
            for k in [k for k in st.opt.m if self.owner.get(k, self.rank) != self.rank]:
                del st.opt.m[k], st.opt.v[k]

    def _gathered(self, arrays: Grads, names: list[str]) -> Grads:
        out = dict(arrays)
        self._share(out, names)
        return out


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


def shards(sizes: dict[str, int], world: int) -> dict[str, int]:
    """Each weight's owner: largest first, to the rank holding the fewest elements so far
    (ties to the lower rank), so every rank computes the same split."""
    load = [0] * world
    owner: dict[str, int] = {}
    for k in sorted(sizes, key=lambda k: (-sizes[k], k)):
        r = min(range(world), key=lambda i: (load[i], i))
        owner[k] = r
        load[r] += sizes[k]
    return owner


def _scaled(grads: Grads, world: int) -> Grads:
    if world == 1:
        return grads
    return {k: g * g.dtype.type(1.0 / world) for k, g in grads.items()}


def reducer(text: str | None, batch_size: int, connect: bool = True):
    """The reducer ``--parallel`` asks for, after checking ``batch_size`` splits into the ranks.
    Under ``mpiexec`` the world must be dp; without it dp ranks are simulated in this process.
    Errors come before any communication, on every rank alike; ``connect=False`` only checks."""
    from . import model_parallel

    if model_parallel.wanted(text):                  # tp=N or pp=N: the model split, not the batch
        return model_parallel.reducer(text, connect)
    dp, zero = parse(text)
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
    return MPIReducer(comm, zero=zero)


def quiet_unless_writer(red) -> None:
    """Rank 0 prints the command's output; the others are silent (errors still go to stderr)."""
    if not red.is_writer:
        sys.stdout = open(os.devnull, "w")
