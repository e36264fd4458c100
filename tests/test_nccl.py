"""The NCCL transport (minitx/distributed/nccl.py): its shape logic on the CPU, each rank a thread
over a fake NCCL group (NumPy arrays), checked rank by rank against the collectives' definitions
on a rank axis (minitx/ops/collectives.py); the real NCCL on a GPU, skipped without one."""
from __future__ import annotations

import os
import queue
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from minitx import ops
from minitx.distributed.nccl import NCCLTransport, placement
from minitx.ops.collectives import all_gather_ranks, all_reduce_ranks, all_to_all_ranks, reduce_scatter_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Rendezvous:
    """What the members of one fake group share: a slot per rank, a barrier, a queue per pair."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.slots: list = [None] * size
        self.barrier = threading.Barrier(size, timeout=20)
        self.queues = {(a, b): queue.Queue() for a in range(size) for b in range(size)}


class FakeGroup:
    """The :class:`minitx.distributed.nccl.Group` interface with NumPy and threads (NCCL's
    semantics: equal counts per rank, sums in rank order, grouped send/recv)."""

    def __init__(self, rv: Rendezvous, rank: int) -> None:
        self.rv, self.rank, self.size = rv, rank, rv.size

    def _all(self, x):
        self.rv.slots[self.rank] = np.array(x, copy=True)
        self.rv.barrier.wait()
        got = list(self.rv.slots)
        self.rv.barrier.wait()
        assert all(g.size == got[0].size and g.dtype == got[0].dtype for g in got), "NCCL needs equal counts"
        return got

    def all_reduce(self, x):
        got = self._all(x)
        out = got[0].copy()
        for g in got[1:]:
            out += g
        return out

    def all_gather(self, x):
        return np.concatenate(self._all(x))

    def reduce_scatter(self, x):
        return np.split(self.all_reduce(x), self.size)[self.rank]

    def broadcast(self, x, root):
        return self._all(x)[root].copy()

    def exchange(self, sends, recvs):
        for peer, a in sends.items():
            self.rv.queues[(self.rank, peer)].put(np.array(a, copy=True))
        for peer, a in recvs.items():
            got = self.rv.queues[(peer, self.rank)].get(timeout=20)
            assert got.size == a.size and got.dtype == a.dtype
            a[...] = got


def run_ranks(n: int, fn):
    """fn(transport) on n threads, one transport per rank over one group and the world; results in rank order."""
    rv, world = Rendezvous(n), Rendezvous(n)
    group = tuple(range(n))

    def one(r):
        t = NCCLTransport({group: FakeGroup(rv, r)}, FakeGroup(world, r), r, np)
        return fn(t, r)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def _x(n, shape, seed=0):
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


@pytest.mark.parametrize("n", [2, 3])
def test_all_reduce_broadcast_reduce_scatter_match_their_definitions(n):
    X = _x(n, (2, 6, 5))
    ranks = tuple(range(n))
    got = run_ranks(n, lambda t, r: t.all_reduce(X[r], ranks=ranks))
    want = all_reduce_ranks(X)
    for r in range(n):
        np.testing.assert_allclose(got[r], want[r], rtol=1e-6)
    got = run_ranks(n, lambda t, r: t.broadcast(X[r], ranks=ranks, root=n - 1))
    for r in range(n):
        np.testing.assert_array_equal(got[r], X[n - 1])
    for axis in (1, -2):     # 6 splits over 2 and 3 ranks
        got = run_ranks(n, lambda t, r: t.reduce_scatter(X[r], ranks=ranks, axis=axis))
        want = reduce_scatter_ranks(X, axis=axis)
        for r in range(n):
            assert got[r].shape == want[r].shape
            np.testing.assert_allclose(got[r], want[r], rtol=1e-6)


@pytest.mark.parametrize("n", [2, 3])
def test_all_gather_equal_and_uneven_pieces(n):
    X = _x(n, (2, 4, 3))
    ranks = tuple(range(n))
    for axis in (0, 1, -1):
        got = run_ranks(n, lambda t, r: t.all_gather(X[r], ranks=ranks, axis=axis))
        want = all_gather_ranks(X, axis=axis)
        for r in range(n):
            np.testing.assert_array_equal(got[r], want[r])
    # a sequence of 5 tokens on n ranks: pieces of different lengths (padded for NCCL, cut after)
    pieces = np.array_split(np.arange(2 * 5 * 3, dtype=np.float32).reshape(2, 5, 3), n, axis=1)
    got = run_ranks(n, lambda t, r: t.all_gather(pieces[r], ranks=ranks, axis=1))
    for r in range(n):
        np.testing.assert_array_equal(got[r], np.concatenate(pieces, axis=1))


@pytest.mark.parametrize("n", [2, 3])
def test_all_to_all_sequence_to_heads_and_back(n):
    X = _x(n, (1, 6, 6, 4))                              # (B, T, heads, dh) per rank
    ranks = tuple(range(n))
    got = run_ranks(n, lambda t, r: t.all_to_all(X[r], ranks=ranks, split_axis=2, concat_axis=1))
    want = all_to_all_ranks(X, split_axis=2, concat_axis=1)
    for r in range(n):
        np.testing.assert_array_equal(got[r], want[r])
    back = run_ranks(n, lambda t, r: t.all_to_all(got[r], ranks=ranks, split_axis=1, concat_axis=2))
    for r in range(n):
        np.testing.assert_array_equal(back[r], X[r])
    # uneven: 5 tokens split over n ranks
    Y = _x(n, (1, 5, 6, 2), seed=3)
    got = run_ranks(n, lambda t, r: t.all_to_all(Y[r], ranks=ranks, split_axis=1, concat_axis=2))
    for r in range(n):
        want = np.concatenate([np.array_split(Y[s], n, axis=1)[r] for s in range(n)], axis=2)
        np.testing.assert_array_equal(got[r], want)


@pytest.mark.parametrize("dtype,shape", [("float32", (2, 3, 4)), ("float16", (7,)), ("int64", (1, 1))])
def test_send_recv_carries_shape_and_dtype(dtype, shape):
    x = np.arange(int(np.prod(shape))).reshape(shape).astype(dtype)
    got = run_ranks(3, lambda t, r: t.send_recv(x if r == 2 else None, src=2, dst=0) if r in (0, 2) else None)
    assert got[2] == ()
    assert got[0].dtype == x.dtype and got[0].shape == x.shape
    np.testing.assert_array_equal(got[0], x)


@pytest.mark.parametrize("op,attrs", [("all_reduce", {}), ("all_gather", {"axis": 1}), ("reduce_scatter", {"axis": 1}),
                                      ("all_to_all", {"split_axis": 1, "concat_axis": 2})])
def test_vjps_are_the_specs_vjps(op, attrs):
    """Each rank's VJP through the transport equals the spec's VJP (simulated ranks) for that rank."""
    n = 2
    X, G = _x(n, (2, 4, 6)), _x(n, (2, 4, 6), seed=5)
    ranks = tuple(range(n))
    spec = ops.get(op)
    outs = spec.forward(*X, ranks=ranks, **attrs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    G = [np.random.default_rng(7 + r).standard_normal(outs[r].shape).astype(np.float32) for r in range(n)]
    want = spec.vjp(tuple(G), tuple(X), outs, ranks=ranks, **attrs)
    got = run_ranks(n, lambda t, r: t.vjps[op]((G[r],), (X[r],), (outs[r],), ranks=ranks, **attrs)[0])
    for r in range(n):
        np.testing.assert_allclose(got[r], want[r], rtol=1e-6)


def test_fused_with_a_compute_backend_it_takes_its_kernels_and_transfers():
    from minitx.backend import SpecBackend

    spec = SpecBackend()
    t = NCCLTransport({}, None, 0, np, spec)
    assert set(spec.kernels) <= set(t.kernels) and t.kernels["all_reduce"] == t.all_reduce
    assert t.kernels["matmul"] is spec.kernels["matmul"] and t.dtypes == spec.dtypes
    t.check()                                            # every kernel names an op with a spec


class _FakeMPI:
    MIN = "min"
    COMM_TYPE_SHARED = 0


class _FakeComm:
    def allreduce(self, v, op=None):
        return v


class _Transport:
    """Stands in for MPITransport in the placement logic."""
    MPI, comm, rank = _FakeMPI(), _FakeComm(), 0


def test_placement_keeps_mpi_without_cupy_and_says_why(capsys):
    t = _Transport()
    assert placement(t, ["numba", "numpy"]) == [t, "numba", "numpy"]      # no GPU asked for: MPI
    try:
        import cupy  # noqa: F401
        pytest.skip("cupy is installed: the fallback is for machines without it")
    except ImportError:
        pass
    assert placement(t, ["cupy", "numpy"]) == [t, "cupy", "numpy"]
    assert "nccl: not used" in capsys.readouterr().err
    assert placement(t, ["cupy"]) == [t, "cupy"]                        # decided once, remembered
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------- on a GPU
def _gpus() -> int:
    try:
        import cupy
        from cupy.cuda import nccl  # noqa: F401

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # noqa: BLE001 — no cupy, no NCCL, no driver
        return 0


@pytest.mark.gpu
@pytest.mark.skipif(_gpus() < 1, reason="needs an NVIDIA GPU with CuPy and NCCL")
def test_nccl_single_gpu_communicator():
    """A one-rank NCCL communicator: every call path reaches NCCL and returns the definition."""
    import cupy as cp
    from cupy.cuda import nccl

    from minitx.distributed.nccl import NcclGroup

    g = NcclGroup(cp, nccl.NcclCommunicator(1, nccl.get_unique_id(), 0), 0, 1, 30.0, "rank 0")
    t = NCCLTransport({(0,): g}, g, 0, cp)
    x = np.random.default_rng(0).standard_normal((2, 6, 4)).astype(np.float32)
    for dtype in ("float32", "float16"):
        d = cp.asarray(x.astype(dtype))
        np.testing.assert_array_equal(t.all_reduce(d, ranks=(0,)).get(), x.astype(dtype))
        np.testing.assert_array_equal(t.all_gather(d, ranks=(0,), axis=1).get(), x.astype(dtype))
        np.testing.assert_array_equal(t.reduce_scatter(d, ranks=(0,), axis=1).get(), x.astype(dtype))
        np.testing.assert_array_equal(t.broadcast(d, ranks=(0,), root=0).get(), x.astype(dtype))
        np.testing.assert_array_equal(t.all_to_all(d, ranks=(0,), split_axis=1, concat_axis=2).get(), x.astype(dtype))


@pytest.mark.gpu
@pytest.mark.skipif(_gpus() < 2 or shutil.which("mpiexec") is None, reason="needs 2 GPUs, CuPy with NCCL and mpiexec")
def test_mpiexec_tp2_on_nccl_prints_what_one_gpu_prints(tmp_path):
    from minitx import modelfile
    from minitx.model import Model

    path = str(tmp_path / "llama.npz")
    cfg = {"arch": "llama", "vocab_size": 509, "n_ctx": 64, "d_model": 64, "n_layers": 3, "n_heads": 8,
           "n_kv_heads": 4, "d_ff": 96}
    modelfile.save(Model.from_config(cfg, seed=11), path)
    env = {**os.environ, "PYTHONPATH": ROOT, "MINITX_MPI_TIMEOUT": "60"}
    args = [os.path.join(ROOT, "cli.py"), "infer", path, "--ids", "5,1,4,1", "-n", "12", "--json", "--backend", "cupy"]
    one = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run(["mpiexec", "-n", "2", sys.executable, *args, "--parallel", "tp=2"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr
    assert "nccl: not used" not in two.stderr
    assert [t for t in two.stdout.split('"token_ids"')[1:]] == [t for t in one.stdout.split('"token_ids"')[1:]]
