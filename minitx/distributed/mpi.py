"""The MPI transport: a backend whose kernels are the collective ops, run across processes by MPI.

Collectives are a backend capability: this backend implements exactly the ops of
``minitx/ops/collectives.py`` (forward and VJP) for one rank's part of a sharded graph, and the
executor places every other node on the compute backends as usual. A third party can ship another
transport (NCCL, Gloo) the same way. Each wait has a deadline (``MINITX_MPI_TIMEOUT`` seconds,
default 60): a rank that died or never arrives makes the others fail with an error naming the
collective instead of hanging, and the CLI then aborts the whole job.
"""
from __future__ import annotations

import atexit
import io
import os
import time
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..backend import Backend
from ..errors import MinitxError

TAG = 19
YIELD_S = 2e-3   # a wait polls with bare yields this long before it sleeps between polls (wait_until)
_yield_core = getattr(os, "sched_yield", None) or (lambda: time.sleep(0))


def wait_until(done: Callable[[], bool], timeout: float, fail: Callable[[], None],
               progress: Callable[[], None] | None = None) -> None:
    """Poll ``done`` until it is true; past ``timeout`` seconds call ``fail``, which raises.

    Why this schedule: MPICH moves a non-blocking collective on only inside Test, and one above
    the eager limit needs several rounds, so sleeping between polls (10 µs doubling to 2 ms, as
    before) turned a 15 µs all-reduce of 32 KiB into 3.4 ms and left tp=2 decode half in
    collectives (benchmarks/results/parallel_cpu.md). For its first YIELD_S a wait polls between
    bare yields (``os.sched_yield``: no delay when the core is ours, the core to any runnable
    process when it is not; ``time.sleep(0)`` sleeps ~60 µs of timer slack), then backs off to
    sleeping, so a rank that waits long (a pipeline stage, a dead peer) does not hold a core.
    8 B / 32 KiB between two ranks: 4 / 18 µs this way against 130 / 470 µs with sleep(0);
    beside a busy process 13 / 48 µs (a bare spin: 2 / 170 µs). The NCCL transport polls its
    stream the same way."""
    start = time.monotonic()
    pause = 5e-5
    while not done():
        if progress is not None:
            progress()
        now = time.monotonic()
        if now - start > timeout:
            fail()
        if now - start < YIELD_S:
            _yield_core()
        else:
            time.sleep(pause)
            pause = min(pause * 2, 2e-3)


def load_mpi():
    """mpi4py's MPI module, or a one-line error saying how to get it."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise MinitxError(f"--parallel across processes needs MPI: mpi4py is not importable ({e}); "
                          "install it with pip install 'minitx[mpi]'") from None
    return MPI


def timeout_s() -> float:
    try:
        return float(os.environ.get("MINITX_MPI_TIMEOUT", "60"))
    except ValueError:
        raise MinitxError(f"MINITX_MPI_TIMEOUT must be a number of seconds, got "
                          f"{os.environ['MINITX_MPI_TIMEOUT']!r}") from None


class MPITransport(Backend):
    name = "mpi"
    device = "cpu"
    dtypes = frozenset({"float16", "float32", "float64"})

    def __init__(self, comm: Any, groups: Iterable[Sequence[int]]) -> None:
        super().__init__()
        self.MPI = load_mpi()
        self.comm = comm
        self.rank = comm.Get_rank()
        self.version = self.MPI.Get_library_version().splitlines()[0].strip()
        self.timeout = timeout_s()
        # Sends in flight: a send returns without waiting for its receiver (see send_recv).
        self._sends: list[Any] = []
        atexit.register(self._drain)
        # Every rank creates every group's communicator, in the same order (Split is collective).
        self.comms: dict[tuple[int, ...], Any] = {}
        for g in sorted({tuple(int(r) for r in g) for g in groups}):
            sub = comm.Split(0 if self.rank in g else self.MPI.UNDEFINED, g.index(self.rank) if self.rank in g else 0)
            if self.rank in g:
                self.comms[g] = sub
        self.kernels = {"all_reduce": self.all_reduce, "all_gather": self.all_gather,
                        "reduce_scatter": self.reduce_scatter, "all_to_all": self.all_to_all,
                        "broadcast": self.broadcast, "send_recv": self.send_recv,
                        "vocab_cross_entropy": self.vocab_cross_entropy}
        # VJPs are the adjoint collectives, one rank's part each.
        self.vjps = {
            "all_reduce": lambda g, i, o, *, ranks: (self.all_reduce(g[0], ranks=ranks),),
            "all_gather": lambda g, i, o, *, ranks, axis: (self.reduce_scatter(g[0], ranks=ranks, axis=axis),),
            "reduce_scatter": lambda g, i, o, *, ranks, axis: (self.all_gather(g[0], ranks=ranks, axis=axis),),
            "all_to_all": lambda g, i, o, *, ranks, split_axis, concat_axis: (
                self.all_to_all(g[0], ranks=ranks, split_axis=concat_axis, concat_axis=split_axis),),
            "vocab_cross_entropy": self.vocab_cross_entropy_vjp,
            "send_recv": self.send_recv_vjp,
        }

    # ------------------------------------------------------------------ plumbing
    def _comm(self, ranks: Sequence[int]):
        try:
            return self.comms[tuple(int(r) for r in ranks)]
        except KeyError:
            raise MinitxError(f"mpi: rank {self.rank} has no communicator for group {list(ranks)}") from None

    def _progress(self) -> None:
        """Let the sends in flight advance; forget those that are done."""
        self._sends = [r for r in self._sends if not r.Test()]

    def _drain(self) -> None:
        """At exit: give the sends in flight until the deadline to finish (their receivers have
        normally taken them already)."""
        deadline = time.monotonic() + self.timeout
        while self._sends and time.monotonic() < deadline:
            self._progress()
            time.sleep(1e-3)

    def _wait(self, req: Any, what: str) -> None:
        """Wait for a request with a deadline; polling keeps MPI (and the sends in flight) progressing."""
        self._poll(req.Test, f"{what} got no answer")

    def _poll(self, done: Callable[[], bool], failure: str) -> None:
        """Call ``done`` until it is true (:func:`wait_until`), keeping the sends in flight moving."""
        def fail() -> None:
            raise MinitxError(f"mpi: rank {self.rank}: {failure} within {self.timeout:g} s "
                              "(another rank failed or died; MINITX_MPI_TIMEOUT sets the limit)")

        wait_until(done, self.timeout, fail, self._progress)

    # ------------------------------------------------------------------ collectives (one rank's part)
    def all_reduce(self, x, *rest, ranks, op: str = "SUM"):
        x = np.ascontiguousarray(x)
        y = np.empty_like(x)
        self._wait(self._comm(ranks).Iallreduce(x, y, op=getattr(self.MPI, op)), f"all_reduce over ranks {list(ranks)}")
        return y

    def _vce_stats(self, z, targets, ranks, vocab, ignore_index):
        """The vocabulary-parallel cross-entropy's per-token statistics: this shard's, then the max
        and the sums all-reduced (float64, B·T values each; the logits stay where they are)."""
        from ..ops.collectives import vce_local

        t = list(ranks).index(self.rank)
        zm, mx, picked = vce_local(z, targets, t * z.shape[-1], vocab, ignore_index)
        m = self.all_reduce(mx, ranks=ranks, op="MAX")
        sums = self.all_reduce(np.stack([np.exp(zm - m[:, None]).sum(axis=1), picked]), ranks=ranks)
        return zm, m, sums[0], sums[1]

    def vocab_cross_entropy(self, z, targets, *rest, ranks, vocab, ignore_index=-100):
        from ..ops.collectives import vce_loss

        _, m, sumexp, picked = self._vce_stats(z, targets, ranks, vocab, ignore_index)
        return np.asarray(vce_loss(m, sumexp, picked, targets, ignore_index), z.dtype)

    def vocab_cross_entropy_vjp(self, grads, inputs, outputs, *, ranks, vocab, ignore_index=-100):
        from ..ops.collectives import vce_grad

        z, targets = inputs[0], inputs[1]
        zm, m, sumexp, _ = self._vce_stats(z, targets, ranks, vocab, ignore_index)
        g = float(self.all_reduce(np.array([float(grads[0])], np.float64), ranks=ranks)[0])   # the ranks' cotangents add
        t = list(ranks).index(self.rank)
        return vce_grad(zm, m, sumexp, targets, t * z.shape[-1], g, ignore_index, z.shape, z.dtype), None

    def _shapes(self, comm, mine: np.ndarray, what: str, alltoall: bool = False) -> np.ndarray:
        """Every rank's shape(s) — pieces may differ in length (a sequence sp does not divide)."""
        out = np.empty((comm.Get_size(), *mine.shape[-1:]) if not alltoall else mine.shape, np.int64)
        self._wait(comm.Ialltoall(mine, out) if alltoall else comm.Iallgather(mine, out), what)
        return out

    def all_gather(self, x, *rest, ranks, axis):
        comm, what = self._comm(ranks), f"all_gather over ranks {list(ranks)}"
        x = np.ascontiguousarray(x)
        shapes = self._shapes(comm, np.array(x.shape, np.int64), what)
        counts = shapes.prod(axis=1)
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]])
        buf = np.empty(int(counts.sum()), x.dtype)
        self._wait(comm.Iallgatherv(x.reshape(-1), [buf, (counts, displs)]), what)
        return np.concatenate([buf[d:d + c].reshape(sh) for d, c, sh in zip(displs, counts, shapes)], axis=axis)

    def reduce_scatter(self, x, *rest, ranks, axis):
        total = self.all_reduce(x, ranks=ranks)
        return np.ascontiguousarray(np.array_split(total, len(ranks), axis=axis)[list(ranks).index(self.rank)])

    def all_to_all(self, x, *rest, ranks, split_axis, concat_axis):
        comm, what = self._comm(ranks), f"all_to_all over ranks {list(ranks)}"
        pieces = [np.ascontiguousarray(p) for p in np.array_split(x, len(ranks), axis=split_axis)]
        got = self._shapes(comm, np.array([p.shape for p in pieces], np.int64), what, alltoall=True)
        scounts = np.array([p.size for p in pieces])
        rcounts = got.prod(axis=1)
        sdispls = np.concatenate([[0], np.cumsum(scounts)[:-1]])
        rdispls = np.concatenate([[0], np.cumsum(rcounts)[:-1]])
        send = np.concatenate([p.reshape(-1) for p in pieces])
        recv = np.empty(int(rcounts.sum()), send.dtype)
        self._wait(comm.Ialltoallv([send, (scounts, sdispls)], [recv, (rcounts, rdispls)]), what)
        return np.concatenate([recv[d:d + c].reshape(sh) for d, c, sh in zip(rdispls, rcounts, got)], axis=concat_axis)

    def broadcast(self, x, *rest, ranks, root):
        buf = np.array(x, copy=True, order="C")
        self._wait(self._comm(ranks).Ibcast(buf, root=list(ranks).index(root)), f"broadcast from rank {root}")
        return buf

    def send_recv(self, x=None, *, src, dst, tag: int = TAG):
        """The sender sends ``x`` (and passes it through, for a training program's later nodes);
        the receiver returns what arrives (its own input, if any, only carries gradients)."""
        if self.rank == src:
            # Not waited for: a message above MPI's eager limit completes only once its receiver
            # posts the receive, and in a 1F1B step two stages send to each other at once (the
            # next micro-batch's activations one way, a cotangent the other), each then receiving.
            self._sends.append(self.comm.isend(np.ascontiguousarray(x), dest=dst, tag=tag))
            self._progress()
            return x
        self._poll(lambda: self.comm.Iprobe(source=src, tag=tag), f"receive from rank {src} got nothing")
        return self.comm.recv(source=src, tag=tag)

    def send_recv_vjp(self, grads, inputs, outputs, *, src, dst):
        """The transfer backwards (see :func:`minitx.distributed.program.trainable`): the receiver
        sends its cotangent back, the sender adds it to its own value's."""
        if self.rank == dst:
            self.send_recv(np.ascontiguousarray(grads[0]), src=dst, dst=src, tag=TAG + 1)
            return (np.zeros_like(inputs[0]),)
        back = self.send_recv(None, src=dst, dst=src, tag=TAG + 1)
        return (grads[0] + back,)

    def share(self, value: Any, owner: int) -> np.ndarray:
        """Every rank gets ``owner``'s array (a last pipeline stage's logits): its length, then its
        .npy bytes, each a broadcast with a deadline."""
        what = f"sharing a result of rank {owner}"
        data = b""
        if self.rank == owner:
            f = io.BytesIO()
            np.save(f, np.asarray(value), allow_pickle=False)
            data = f.getvalue()
        n = np.array([len(data)], np.int64)
        self._wait(self.comm.Ibcast(n, root=owner), what)
        buf = np.frombuffer(data, np.uint8).copy() if self.rank == owner else np.empty(int(n[0]), np.uint8)
        self._wait(self.comm.Ibcast(buf, root=owner), what)
        return np.load(io.BytesIO(buf.tobytes()), allow_pickle=False)
