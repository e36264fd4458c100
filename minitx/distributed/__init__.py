"""Running a model split over ranks: in one process (simulated collectives) or across MPI processes.

``--parallel tp=2,pp=2`` on the command line comes here. :func:`prepare` applies the parallel
plugin (plugins/parallel.py) and then either

* returns the whole SPMD graph — every rank's part in one process, the collectives computed by
  their NumPy specs — validated against the unsharded model like any exact rewrite; or,
* when the process was started by ``mpiexec`` with more than one rank, returns this rank's part
  (:func:`minitx.distributed.program.rank_program`) with the MPI transport
  (:mod:`minitx.distributed.mpi`) running its collectives. Every rank computes the same tokens;
  the command prints on rank 0 only.

Errors are one line on every rank, before any communication: a world size that is not the
product of the layout, heads or KV heads tp cannot split, mpi4py missing, micro-batches of an
encoder–decoder.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable

from ..errors import MinitxError
from ..model import Model

KINDS = ("tp", "pp", "mb", "sp", "ring")
TRAINING_ONLY = {"dp": "data parallelism is for training: minitx train --parallel dp=N"}


def layout(text: str):
    """``"tp=2,pp=2"`` → :class:`plugins.parallel.Layout`; a malformed string is a one-line error."""
    from ..plugins.parallel import Layout

    vals: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, val = part.partition("=")
        key = key.strip()
        if key in TRAINING_ONLY:
            raise MinitxError(f"--parallel {key}: {TRAINING_ONLY[key]} (here: tp, sp, pp, mb)")
        if not sep or key not in KINDS:
            raise MinitxError(f"--parallel expects tp=N,pp=M[,mb=K], got {text!r}")
        n = positive(key, val)
        if key in vals:
            raise MinitxError(f"--parallel gives {key} twice in {text!r}")
        vals[key] = n
    if not vals:
        raise MinitxError(f"--parallel expects tp=N,pp=M, got {text!r}")
    return Layout(**vals)


def positive(key: str, val: str) -> int:
    """One ``--parallel`` count (``tp=2``): a positive integer, or the one-line error naming the key."""
    try:
        n = int(val)
    except ValueError:
        n = 0
    if n <= 0:
        raise MinitxError(f"--parallel {key} must be a positive integer, got {val!r}")
    return n


def launched_world() -> int:
    """How many processes an MPI launcher started (1 when none did): read from the launcher's
    environment, so that a plain run never initialises MPI."""
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "PMIX_SIZE"):
        v = os.environ.get(var)
        if v and v.isdigit():
            return int(v)
    return 1


def plugin_text(text: str) -> str:
    L = layout(text)
    return f"parallel:tp={L.tp},sp={L.sp},pp={L.pp},mb={L.mb},ring={L.ring}"


def prepare(model: Model, text: str, *, warn: Callable[[str], None] | None = None, validate: bool = True) -> Model:
    """``model`` split as ``text`` says, for this process (see the module docstring)."""
    L = layout(text)
    if L.mb > 1 and any(v.name == "encoder_ids" for v in model.graph.inputs):
        raise MinitxError(f"--parallel {text}: micro-batches (mb) do not split encoder–decoders (T5, BART, Marian) "
                          "yet; use tp and pp without mb")
    world = launched_world()
    if world == 1:
        from ..plugin import optimize

        return optimize(model, [plugin_text(text)], warn=warn, validate=validate)
    if world != L.world:
        raise MinitxError(f"--parallel {text} needs {L.world} ranks (tp·sp·pp), but mpiexec started {world}")
    from .mpi import MPITransport, load_mpi
    from .program import RankModel, rank_program
    from ..plugins.parallel import shard

    MPI = load_mpi()
    comm = MPI.COMM_WORLD
    if comm.Get_size() != L.world:
        raise MinitxError(f"--parallel {text} needs {L.world} ranks (tp·sp·pp), but MPI has {comm.Get_size()}")
    rank = comm.Get_rank()
    g, params = shard(model.graph, model.params, L, only_rank=rank)
    prog = rank_program(g, params, rank)
    groups = [n.tags["ranks"] for n in g.nodes if n.op != "send_recv" and "ranks" in n.tags]
    transport = MPITransport(comm, groups)
    m = RankModel(dict(model.config), prog.params, prog.graph, model.tokenizer_json,
                  {**model.meta, "parallel": {"layout": str(L), "rank": rank, "world": L.world}})
    m.transport, m.shared, m.sharded = transport, prog.shared, g
    if rank != 0:
        sys.stdout = open(os.devnull, "w")   # the command's output comes from rank 0 only
    return m


def abort_on_error(comm: Any, message: str, code: int = 2) -> None:
    """A failure on one rank ends every rank: print the line, then abort the MPI job.

    The pause lets the launcher forward the line first: MPI_Abort has the launcher kill every
    process, and it drops what is still in their stderr pipes (seen under load: exit 2, no line)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    time.sleep(0.5)
    comm.Abort(code)


def cost_summary(model: Model, text: str, batch: int, seq: int, past: int) -> dict[str, Any]:
    """``show --parallel``: per-rank weight memory and communication of the split (no MPI needed)."""
    from ..plugins.parallel import shard
    from .cost import summary

    from ..ir import Value

    g, _ = shard(model.graph, model.params, layout(text), only_rank=-1)
    unsharded = model.graph
    if any("E" in v.shape for v in g.inputs):      # an encoder–decoder: its input as long as --seq
        g, unsharded = (x.copy() for x in (g, unsharded))
        for x in (g, unsharded):
            x.inputs = [Value(v.name, tuple("T" if d == "E" else d for d in v.shape), v.dtype) for v in x.inputs]
    return summary(g, model.nbytes(), batch, seq, past, unsharded=unsharded)
