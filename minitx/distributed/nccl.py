"""The NCCL transport: the collective ops on GPU arrays, for the cupy backend under ``mpiexec``.

Collectives are a backend capability (docs/parallelism.md). Across processes the MPI transport
(:mod:`minitx.distributed.mpi`) computes them on host arrays; when a rank computes on the GPU
with the cupy backend that would copy every activation to the host and back around each
collective. This transport computes them with NCCL (``cupy.cuda.nccl``) on the arrays where they
lie, and — so that they never leave the device — it is one backend with the cupy backend: its
kernel table is cupy's plus the collectives, its arrays are cupy's (:func:`placement`).

MPI still starts the job: it tells each rank its GPU (the rank among those on its host),
carries NCCL's unique ids to the members of each group, checks that every rank can use NCCL
(all or none: otherwise every rank keeps the MPI transport) and shares the last pipeline
stage's logits. Each wait has the MPI transport's deadline (``MINITX_MPI_TIMEOUT``): a collective
still running after it aborts the communicator and is an error naming the collective.

The shape logic (pieces of different lengths, the axes of all-to-all, send/recv headers) is
written against a small group interface (:class:`Group`), so it is tested on the CPU with a fake
group of threads (``tests/test_nccl.py``); :class:`NcclGroup` is the real one. Nothing here
imports CuPy until a GPU run asks for it.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from ..backend import Backend
from ..errors import MinitxError
from .mpi import wait_until

HEADER = 10          # send_recv header: dtype code, ndim, up to 8 dimensions
DTYPES = ("float16", "float32", "float64", "int64", "int32", "bfloat16")


class Group(Protocol):
    """A communicator over the ranks of one group, on flat contiguous arrays of one dtype.
    ``rank`` and ``size`` are within the group; peers are group indices."""
    rank: int
    size: int

    def all_reduce(self, x: Any) -> Any: ...
    def all_gather(self, x: Any) -> Any: ...           # size · len(x), in rank order
    def reduce_scatter(self, x: Any) -> Any: ...       # this rank's len(x) / size of the sum
    def broadcast(self, x: Any, root: int) -> Any: ...
    def exchange(self, sends: dict[int, Any], recvs: dict[int, Any]) -> None: ...   # grouped send/recv


class NCCLTransport(Backend):
    """The collective ops for one rank over NCCL groups, fused with a compute backend.

    ``groups`` maps each group (a tuple of global ranks) to its :class:`Group`; ``world`` is the
    group of every rank (``send_recv`` goes over it). ``xp`` is the array module (CuPy; NumPy in
    the tests). ``compute`` (the cupy backend) lends its kernels, dtypes and transfers, so that a
    graph runs on one backend and its arrays stay on the device."""

    name = "nccl"

    def __init__(self, groups: dict[tuple[int, ...], Group], world: Group, rank: int, xp: Any,
                 compute: Backend | None = None) -> None:
        super().__init__()
        self.groups, self.world, self.rank, self.xp = groups, world, rank, xp
        self.compute = compute
        coll: dict[str, Callable[..., Any]] = {
            "all_reduce": self.all_reduce, "all_gather": self.all_gather, "reduce_scatter": self.reduce_scatter,
            "all_to_all": self.all_to_all, "broadcast": self.broadcast, "send_recv": self.send_recv}
        vjps: dict[str, Callable[..., tuple]] = {
            "all_reduce": lambda g, i, o, *, ranks: (self.all_reduce(g[0], ranks=ranks),),
            "all_gather": lambda g, i, o, *, ranks, axis: (self.reduce_scatter(g[0], ranks=ranks, axis=axis),),
            "reduce_scatter": lambda g, i, o, *, ranks, axis: (self.all_gather(g[0], ranks=ranks, axis=axis),),
            "all_to_all": lambda g, i, o, *, ranks, split_axis, concat_axis: (
                self.all_to_all(g[0], ranks=ranks, split_axis=concat_axis, concat_axis=split_axis),)}
        if compute is not None:
            self.name = f"nccl+{compute.name}"
            self.device, self.version, self.dtypes = compute.device, compute.version, compute.dtypes
            self.delegate = compute.delegate
            self.kernels, self.vjps = {**compute.kernels, **coll}, {**compute.vjps, **vjps}
        else:
            self.kernels, self.vjps = coll, vjps

    # arrays live where the compute backend keeps them
    def asarray(self, a: np.ndarray) -> Any:
        return self.compute.asarray(a) if self.compute is not None else self.xp.asarray(a)

    def to_numpy(self, a: Any) -> np.ndarray:
        return self.compute.to_numpy(a) if self.compute is not None else np.asarray(a)

    def owns(self, a: Any) -> bool:
        return self.compute.owns(a) if self.compute is not None else False

    def synchronize(self) -> None:
        if self.compute is not None:
            self.compute.synchronize()

    def _group(self, ranks: Sequence[int]) -> Group:
        try:
            return self.groups[tuple(int(r) for r in ranks)]
        except KeyError:
            raise MinitxError(f"nccl: rank {self.rank} has no communicator for group {list(ranks)}") from None

    def _flat(self, x: Any) -> Any:
        return self.xp.ascontiguousarray(x).reshape(-1)

    # ------------------------------------------------------------------ collectives (one rank's part)
    def all_reduce(self, x, *rest, ranks):
        return self._group(ranks).all_reduce(self._flat(x)).reshape(x.shape)

    def _shapes(self, g: Group, shape: Sequence[int]) -> np.ndarray:
        """Every group member's ``shape`` rows (pieces may differ in length along an axis)."""
        mine = self.xp.asarray(np.asarray(shape, np.int64).reshape(-1))
        return np.asarray(_host(g.all_gather(mine))).reshape(g.size, *np.shape(shape))

    def all_gather(self, x, *rest, ranks, axis):
        g = self._group(ranks)
        shapes = self._shapes(g, x.shape)
        counts = shapes.prod(axis=1)
        most = int(counts.max())
        buf = self.xp.zeros(most, x.dtype)        # NCCL gathers equal counts: pad to the longest piece
        buf[: x.size] = self._flat(x)
        got = g.all_gather(buf)
        return self.xp.concatenate([got[k * most: k * most + int(c)].reshape(tuple(sh))
                                    for k, (c, sh) in enumerate(zip(counts, shapes))], axis=axis)

    def reduce_scatter(self, x, *rest, ranks, axis):
        g = self._group(ranks)
        n = g.size
        if x.shape[axis] % n:
            raise MinitxError(f"nccl: reduce_scatter of {x.shape[axis]} along axis {axis} over {n} ranks")
        front = self.xp.moveaxis(x, axis, 0)
        piece = g.reduce_scatter(self._flat(front))
        return self.xp.moveaxis(piece.reshape(front.shape[0] // n, *front.shape[1:]), 0, axis % x.ndim)

    def all_to_all(self, x, *rest, ranks, split_axis, concat_axis):
        g = self._group(ranks)
        pieces = [self.xp.ascontiguousarray(p) for p in self.xp.array_split(x, g.size, axis=split_axis)]
        # Row s of my table: the shape of the piece I send to s; after the gather, got[s][me] is
        # the shape of what s sends me.
        table = self._shapes(g, [p.shape for p in pieces])
        recvs = {s: self.xp.empty(tuple(table[s][g.rank]), x.dtype) for s in range(g.size) if s != g.rank}
        g.exchange({s: pieces[s].reshape(-1) for s in range(g.size) if s != g.rank},
                   {s: r.reshape(-1) for s, r in recvs.items()})
        return self.xp.concatenate([pieces[g.rank] if s == g.rank else recvs[s] for s in range(g.size)],
                                   axis=concat_axis)

    def broadcast(self, x, *rest, ranks, root):
        return self._group(ranks).broadcast(self._flat(x), list(ranks).index(root)).reshape(x.shape)

    def send_recv(self, x=None, *, src, dst):
        """A header (dtype, shape) and then the data, over the world group (peers = ranks)."""
        if self.rank == src:
            x = self.xp.ascontiguousarray(x)
            if x.ndim > HEADER - 2 or str(x.dtype) not in DTYPES:
                raise MinitxError(f"nccl: send_recv of a {x.ndim}-d {x.dtype} array")
            head = np.zeros(HEADER, np.int64)
            head[0], head[1], head[2: 2 + x.ndim] = DTYPES.index(str(x.dtype)), x.ndim, x.shape
            self.world.exchange({dst: self.xp.asarray(head)}, {})
            self.world.exchange({dst: x.reshape(-1)}, {})
            return ()
        head = self.xp.empty(HEADER, np.int64)
        self.world.exchange({}, {src: head})
        head = np.asarray(_host(head))
        shape = tuple(int(v) for v in head[2: 2 + int(head[1])])
        out = self.xp.empty(shape, DTYPES[int(head[0])])
        self.world.exchange({}, {src: out.reshape(-1)})
        return out


def _host(a: Any) -> np.ndarray:
    return a.get() if hasattr(a, "get") else np.asarray(a)


# ---------------------------------------------------------------------------- NCCL itself
class NcclGroup:
    """:class:`Group` over ``cupy.cuda.nccl``: each call queues on the current stream, then waits
    for it with a deadline (a peer that died aborts the communicator and is an error)."""

    def __init__(self, cp: Any, comm: Any, rank: int, size: int, timeout: float, what: str) -> None:
        from cupy.cuda import nccl

        self.cp, self.nccl, self.comm, self.rank, self.size = cp, nccl, comm, rank, size
        self.timeout, self.what = timeout, what

    def _type(self, a: Any) -> int:
        n = self.nccl
        table = {"float16": n.NCCL_FLOAT16, "float32": n.NCCL_FLOAT32, "float64": n.NCCL_FLOAT64,
                 "int64": n.NCCL_INT64, "int32": n.NCCL_INT32}
        try:
            return table[str(a.dtype)]
        except KeyError:
            raise MinitxError(f"nccl: no NCCL type for {a.dtype}") from None

    def _wait(self, op: str) -> None:
        """Poll the stream until the collective is done, as the MPI transport polls
        (:func:`minitx.distributed.mpi.wait_until`), aborting the communicator at the deadline."""
        stream = self.cp.cuda.get_current_stream()

        def fail() -> None:
            self.comm.abort()
            raise MinitxError(f"nccl: {op} over {self.what} got no answer within {self.timeout:g} s "
                              "(another rank failed or died; MINITX_MPI_TIMEOUT sets the limit)")

        wait_until(lambda: stream.done, self.timeout, fail)

    def _stream(self) -> int:
        return self.cp.cuda.get_current_stream().ptr

    def all_reduce(self, x):
        y = self.cp.empty_like(x)
        self.comm.allReduce(x.data.ptr, y.data.ptr, x.size, self._type(x), self.nccl.NCCL_SUM, self._stream())
        self._wait("all_reduce")
        return y

    def all_gather(self, x):
        y = self.cp.empty(x.size * self.size, x.dtype)
        self.comm.allGather(x.data.ptr, y.data.ptr, x.size, self._type(x), self._stream())
        self._wait("all_gather")
        return y

    def reduce_scatter(self, x):
        y = self.cp.empty(x.size // self.size, x.dtype)
        self.comm.reduceScatter(x.data.ptr, y.data.ptr, y.size, self._type(x), self.nccl.NCCL_SUM, self._stream())
        self._wait("reduce_scatter")
        return y

    def broadcast(self, x, root):
        y = x.copy()
        self.comm.broadcast(y.data.ptr, y.data.ptr, y.size, self._type(y), root, self._stream())
        self._wait("broadcast")
        return y

    def exchange(self, sends, recvs):
        s = self._stream()
        self.nccl.groupStart()
        for peer, a in sends.items():
            self.comm.send(a.data.ptr, a.size, self._type(a), peer, s)
        for peer, a in recvs.items():
            self.comm.recv(a.data.ptr, a.size, self._type(a), peer, s)
        self.nccl.groupEnd()
        self._wait("send/recv")


def _nccl_group(cp: Any, mpi_comm: Any, timeout: float, what: str) -> NcclGroup:
    """An NCCL communicator over the members of ``mpi_comm``: rank 0's unique id broadcast by MPI."""
    from cupy.cuda import nccl

    uid = nccl.get_unique_id() if mpi_comm.Get_rank() == 0 else None
    uid = mpi_comm.bcast(uid, root=0)
    n, r = mpi_comm.Get_size(), mpi_comm.Get_rank()
    return NcclGroup(cp, nccl.NcclCommunicator(n, uid, r), r, n, timeout, what)


def usable(MPI: Any, comm: Any) -> tuple[bool, str]:
    """Whether this rank can run NCCL: CuPy with NCCL, and a GPU of its own on its host (ranks
    sharing a GPU cannot be in one NCCL communicator). Selects that GPU."""
    try:
        import cupy
        from cupy.cuda import nccl  # noqa: F401
    except ImportError as e:
        return False, f"cupy.cuda.nccl is not importable ({e})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001 — no driver, no device
        return False, f"no CUDA device ({e})"
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    here, me = local.Get_size(), local.Get_rank()
    if here > n:
        return False, f"{here} ranks on this host share {n} GPU(s)"
    cupy.cuda.Device(me).use()
    return True, ""


def placement(transport: Any, backends: Sequence[Any]) -> list[Any]:
    """The backend list a rank's executor runs on: the MPI transport first (host collectives),
    or — when the cupy backend is asked for and every rank can use NCCL — the NCCL transport
    fused with the cupy backend. Collective over the job (every rank calls it at the same point)."""
    names = [b if isinstance(b, str) else b.name for b in backends]
    if "cupy" not in names:
        return [transport, *backends]
    cached = getattr(transport, "nccl", None)
    if cached is None:
        cached = transport.nccl = _connect(transport)
    if cached is False:
        return [transport, *backends]
    return [cached, *(b for b, n in zip(backends, names) if n != "cupy")]


def _connect(transport: Any) -> Any:
    """An NCCL transport over the MPI transport's groups, or False (all ranks alike) with one line
    on stderr saying why the collectives stay on MPI."""
    MPI, comm = transport.MPI, transport.comm
    ok, why = usable(MPI, comm)
    everyone = comm.allreduce(1 if ok else 0, op=MPI.MIN)
    if not everyone:
        if transport.rank == 0:
            print(f"nccl: not used, collectives go over MPI through the host ({why or 'another rank has no GPU'})",
                  file=sys.stderr, flush=True)
        return False
    import cupy

    from ..backend import get_backend

    compute = get_backend("cupy")
    groups = {g: _nccl_group(cupy, sub, transport.timeout, f"ranks {list(g)}") for g, sub in
              sorted(transport.comms.items())}
    world = _nccl_group(cupy, comm, transport.timeout, "all ranks")
    return NCCLTransport(groups, world, transport.rank, cupy, compute)
