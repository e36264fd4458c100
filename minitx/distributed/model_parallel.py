"""Tensor- and pipeline-parallel training: ``train --parallel tp=N`` or ``pp=M[,mb=K,schedule=1f1b]``.

:func:`fit <minitx.training.loop.fit>` sees a reducer, as for data parallelism
(``data_parallel.py``), with one more method, ``executor``: it runs the step's forward and
backward pass on the split model instead of the whole one.

* ``tp=N``: the training graph sharded by the parallel rewrite (Megatron's splits, the loss a
  vocabulary-parallel cross-entropy: the logits are never gathered). In one process the whole
  SPMD graph runs with the collectives' specs; under ``mpiexec`` each rank runs its own part with
  the MPI transport. Only the first rank seeds the backward pass (the ranks' losses are one value:
  the collectives' VJPs add the cotangents, so seeding every rank would count the loss N times).
* ``pp=M``: the pipeline of :mod:`minitx.distributed.pipeline`, ``mb`` micro-batches under the
  ``schedule`` (1F1B by default, or GPipe).

Each weight's gradient is put back together from the ranks' shards (an index map records which
element of the weight each shard element is; a weight replicated on several ranks — a norm, a
tied embedding held by the first and the last stage — gets the sum of its copies' gradients)
and summed over the processes with bucketed all-reduces. Every rank then applies the same AdamW
step to the whole weights, so every rank holds the same weights and optimizer state — the global
state, which is all a checkpoint holds: rank 0 writes it, and it resumes under any layout or in
one process. The split saves activation memory and compute per rank, not weight or optimizer
memory (each rank keeps a full copy, as plain data parallelism does).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import MinitxError
from ..executor import Executor, TrainResult
from ..ir import Graph
from . import launched_world, positive
from .pipeline import SCHEDULES, Pipeline, stages

KEYS = ("tp", "pp", "mb", "schedule", "sp", "ring")


def parse(text: str) -> dict[str, Any]:
    """``tp=2`` / ``pp=2,mb=4,schedule=gpipe`` → their values; a one-line error otherwise."""
    vals: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, val = (x.strip() for x in part.partition("="))
        if key in ("dp", "zero"):
            raise MinitxError(f"--parallel {text}: data parallelism with tp or pp is not implemented yet "
                              "(use dp alone, or tp or pp alone)")
        if not sep or key not in KEYS or key in vals:
            raise MinitxError(f"--parallel for training takes dp=N[,zero=1], tp=N, sp=N[,ring=1] or "
                              f"pp=N[,mb=K,schedule=1f1b|gpipe], got {text!r}")
        if key == "schedule":
            if val not in SCHEDULES:
                raise MinitxError(f"--parallel schedule must be one of {', '.join(SCHEDULES)}, got {val!r}")
            vals[key] = val
            continue
        vals[key] = positive(key, val)
    tp, pp, sp = vals.get("tp", 1), vals.get("pp", 1), vals.get("sp", 1)
    if pp > 1 and (tp > 1 or sp > 1):
        raise MinitxError(f"--parallel {text}: training with pp and tp or sp together is not implemented yet")
    if ("mb" in vals or "schedule" in vals) and pp == 1:
        raise MinitxError(f"--parallel {text}: mb and schedule are pipeline options (give pp=N)")
    if vals.get("ring", 0) > 1 or ("ring" in vals and sp == 1):
        raise MinitxError(f"--parallel {text}: ring=1 is how sequence parallelism attends (give sp=N with it)")
    from ..plugins.parallel import Layout

    Layout(tp=tp, sp=sp, ring=vals.get("ring", 0))        # tp with sp: Megatron's, on the same ranks
    return {"tp": tp, "pp": pp, "sp": sp, "ring": vals.get("ring", 0), "mb": vals.get("mb", 1),
            "schedule": vals.get("schedule", "1f1b")}


def wanted(text: str | None) -> bool:
    """Whether ``--parallel`` asks for tensor, sequence or pipeline parallelism (else data parallelism)."""
    return bool(text) and any(p.strip().split("=")[0].strip() in KEYS for p in text.split(","))


def ranks(opts: Mapping[str, Any]) -> int:
    """Processes a layout needs: tp · sp · pp, tp and sp sharing their ranks when together."""
    return (opts["tp"] if opts["tp"] > 1 and opts["sp"] > 1 else opts["tp"] * opts["sp"]) * opts["pp"]


def index_maps(graph: Graph, params: Mapping[str, np.ndarray], layout, only: int | None) -> dict[str, tuple[str, np.ndarray]]:
    """For each sharded weight: (the model's weight, for each of its elements the flat index + 1 of
    the model weight's element it holds, 0 for padding) — the shard of an array of indices."""
    from ..plugins.parallel import shard

    idx = {k: (np.arange(a.size, dtype=np.float64) + 1).reshape(a.shape) for k, a in params.items()}
    _, shards = shard(graph, idx, layout, only_rank=only)
    out = {}
    for name, a in shards.items():
        base, _, r = name.rpartition("@")
        if only is not None and int(r) != only:
            continue
        if base not in params:
            base = base.rsplit(".", 1)[0]         # a weight split two ways: name.kind@rank
        out[name] = (base, np.asarray(a).astype(np.int64))
    return out


class ModelParallel:
    """The reducer of ``train --parallel tp=N`` or ``pp=N`` (see the module docstring)."""

    world = 1                      # the global batch is not split: every rank sees all of it
    local = (0,)

    def __init__(self, opts: Mapping[str, Any], comm: Any = None) -> None:
        self.opts = dict(opts)
        self.comm = comm
        self.rank = comm.Get_rank() if comm is not None else 0
        self.is_writer = self.rank == 0
        self.transport = None
        self.ranks = ranks(self.opts)
        # The rank whose loss is the model's: the first (tp) or the last stage (pp).
        self.owner = self.ranks - 1 if self.opts["pp"] > 1 else 0
        if comm is not None:
            from .mpi import MPITransport

            self.transport = MPITransport(comm, [tuple(range(self.ranks))])
        self._built: tuple | None = None
        self._like: dict[str, np.ndarray] = {}

    # ------------------------------------------------------------------ the step's pass
    def executor(self, graph: Graph, params: Mapping[str, np.ndarray], backends: Sequence[Any]) -> "_Run":
        """What runs this step's forward and backward pass: the split of ``graph`` with ``params``."""
        if self._built is None or self._built[0] is not graph:
            self._built = (graph, *self._build(graph, params))
        self._like = {k: params[k] for k in params}
        return _Run(self, params, backends)

    def _build(self, graph: Graph, params: Mapping[str, np.ndarray]) -> tuple:
        from ..plugins.parallel import Layout, shard
        from .program import rank_program, trainable

        extra = [o for o in graph.outputs if o.startswith("loss.")]
        if extra:
            raise MinitxError(f"--parallel tp/pp trains the plain cross-entropy only; this objective also "
                              f"has {', '.join(extra)}")
        g = graph.copy()
        g.outputs = ["loss"]
        only = self.rank if self.comm is not None else None
        if self.opts["pp"] > 1:
            return ("pp", stages(g, params, self.opts["pp"], only=only))
        L = Layout(tp=self.opts["tp"], sp=self.opts.get("sp", 1), ring=self.opts.get("ring", 0))
        sg, sp = shard(g, params, L, only_rank=only)
        if only is not None:
            sg = trainable(rank_program(sg, sp, only).graph)
        return ("tp", sg, index_maps(g, params, L, only))

    def forward_backward(self, params, backends, feeds, step: int, loss_grad: float) -> TrainResult:
        kind = self._built[1]
        if kind == "pp":
            stage_list = self._built[2]
            for st in stage_list:
                if st is not None:
                    st.params = {k: params[k] for k in st.train.params}
            pipe = Pipeline(stage_list, self.opts["schedule"], self.opts["mb"], backends,
                            self.transport, self.rank if self.comm is not None else None)
            res = pipe.forward_backward(feeds, step=step, loss_grad=loss_grad)
            return res
        sg, maps = self._built[2], self._built[3]
        shards = {}
        for name, (base, idx) in maps.items():
            flat = np.asarray(params[base]).reshape(-1)
            shards[name] = np.where(idx > 0, flat[np.maximum(idx - 1, 0)], flat.dtype.type(0))
        run_on = list(backends) if self.transport is None else [self.transport, *backends]
        feeds = dict(feeds)
        for v in sg.inputs:                     # a rank's KV-cache inputs are its slice (empty in training)
            if v.name.startswith("past.") and v.name in feeds:
                a = feeds[v.name]
                feeds[v.name] = np.zeros((*a.shape[:-1], int(v.shape[-1])), a.dtype)
        seed = loss_grad if self.rank == self.owner or self.transport is None else 0.0
        res = Executor(sg, shards, run_on).forward_backward(feeds, step=step, loss_grad=seed)
        grads: dict[str, np.ndarray] = {}
        for name in sorted(res.grads, key=lambda n: int(n.rpartition("@")[2])):   # rank order
            base, idx = maps[name]
            full = grads.setdefault(base, np.zeros(params[base].size, res.grads[name].dtype))
            keep = idx > 0
            full[idx[keep] - 1] += res.grads[name][keep]
        grads = {k: g.reshape(params[k].shape) for k, g in grads.items()}
        return TrainResult(res.outputs, grads, res.peak_activation_bytes, res.recomputed_nodes)

    def guarded(self, fn, *args):
        """``fn(*args)``; across processes a failure here (a peer that died or never answers) aborts
        the whole MPI job, so that no rank waits for the failed one."""
        try:
            return fn(*args)
        except MinitxError as e:
            if self.comm is not None:
                from . import abort_on_error

                abort_on_error(self.comm, str(e))
            raise

    # ------------------------------------------------------------------ the reducer
    def reduce(self, parts: list[dict[str, np.ndarray]], stats: np.ndarray):
        return self.guarded(self._reduce, parts, stats)

    def _reduce(self, parts: list[dict[str, np.ndarray]], stats: np.ndarray):
        """Across processes: the loss statistics from the rank that owns the loss (the overflow flag
        from any), each weight's gradient summed over the ranks (bucketed all-reduces)."""
        (grads,) = parts
        if self.transport is None:
            return ({}, stats) if stats[-1] else (grads, stats)
        from .data_parallel import buckets

        group = tuple(range(self.ranks))
        mine = np.array(stats, np.float64)
        if self.rank != self.owner:
            mine[:-1] = 0.0
        stats = self.transport.all_reduce(mine, ranks=group)
        if stats[-1]:
            return {}, stats
        # Every weight, in float32 (the gradients' dtype), zeros where this rank holds none of it.
        like = {k: np.broadcast_to(np.zeros((), np.float32), v.shape) for k, v in self._like.items()}
        out = {}
        for keys in buckets(like):
            flat = np.concatenate([grads[k].reshape(-1) if k in grads else np.zeros(like[k].size, np.float32)
                                   for k in keys])
            total = self.transport.all_reduce(flat, ranks=group)
            at = 0
            for k in keys:
                out[k] = total[at: at + like[k].size].reshape(like[k].shape)
                at += like[k].size
        return out, stats

    def agree(self, digest: str, what: str) -> None:
        if self.transport is None:
            return
        mine = np.frombuffer(bytes.fromhex(digest), np.uint8)
        every = self.transport.all_gather(mine[None], ranks=tuple(range(self.ranks)), axis=0)
        differ = [r for r in range(self.ranks) if not np.array_equal(every[r], every[0])]
        if differ:
            raise MinitxError(f"--parallel: rank {differ[0]} has other {what} than rank 0 (every rank must read "
                              "the same files)")

    def step(self, opt, params, grads, lr: float) -> None:
        opt.step(params, grads, lr)

    def save(self, path: str, st) -> None:
        from ..training import checkpoint as ckpt

        if self.is_writer:
            ckpt.save(path, st)


class _Run:
    """The executor :func:`fit` calls for one step (``forward_backward`` only)."""

    def __init__(self, owner: ModelParallel, params, backends) -> None:
        self.owner, self.params, self.backends = owner, params, backends

    def forward_backward(self, feeds, step: int = 0, loss_grad: float = 1.0) -> TrainResult:
        return self.owner.guarded(self.owner.forward_backward, self.params, self.backends, feeds, step, loss_grad)


def reducer(text: str, connect: bool = True) -> ModelParallel:
    """The reducer of ``--parallel tp=N`` / ``pp=N``: simulated without ``mpiexec``, one rank per
    process under it (the world must be tp · pp). Errors come before any communication."""
    opts = parse(text)
    need = ranks(opts)
    world = launched_world()
    if world > 1 and world != need:
        raise MinitxError(f"--parallel {text} needs {need} ranks (tp·sp·pp), but mpiexec started {world}")
    if world == 1 or not connect:
        return ModelParallel(opts)
    from .mpi import load_mpi

    comm = load_mpi().COMM_WORLD
    if comm.Get_size() != need:
        raise MinitxError(f"--parallel {text} needs {need} ranks (tp·sp·pp), but MPI has {comm.Get_size()}")
    return ModelParallel(opts, comm)
