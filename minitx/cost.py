"""Static cost of a graph: shapes, parameter counts, FLOPs and bytes moved per node."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from . import ops
from .errors import MinitxError
from .ir import Graph


def graph_table(graph: Graph, params: Mapping[str, np.ndarray], bindings: dict[str, int]) -> tuple[list[dict], dict]:
    """One row per node; bytes = everything the node reads plus everything it writes.

    A parameter shared by several nodes (tied embeddings) is counted at its first use only.
    """
    env = graph.infer(bindings)
    rows = []
    counted: set[str] = set()
    for n in graph.nodes:
        spec = ops.get(n.op)
        ins = [env[i][0] if i else None for i in n.inputs] + [None] * (spec.n_inputs - len(n.inputs))
        outs = [env[o][0] for o in n.outputs]
        nbytes = sum(int(np.prod(env[v][0])) * np.dtype(env[v][1]).itemsize for v in (*n.inputs, *n.outputs) if v)
        rows.append({
            "node": n.name, "op": n.op, "shapes": [list(s) for s in outs],
            "params": int(sum(params[i].size for i in set(n.inputs) - counted if i in params)),
            "flops": int(spec.flops(ins, outs, **n.attrs)), "bytes": int(nbytes),
        })
        counted.update(n.inputs)
    totals = {"params": int(sum(a.size for a in params.values())),
              "flops": sum(r["flops"] for r in rows), "bytes": sum(r["bytes"] for r in rows)}
    return rows, totals


def model_cost(model: Any, batch: int = 1, seq: int | None = None, past: int = 0) -> dict[str, Any]:
    """:func:`graph_table` for one step of ``model``: ``batch`` sequences of ``seq`` new tokens
    (default: what the context leaves after ``past``) after ``past`` cached ones. Returns
    ``{"nodes", "totals", "seq"}``. An encoder–decoder's source (``E``) is taken as long as the
    decoder's whole sequence, ``past + seq``: one number for both sides keeps ``show``'s options
    those of every model, and the default (the full context) is the costliest case of each."""
    if batch < 1:
        raise MinitxError(f"--batch must be at least 1, got {batch}")
    if past < 0:
        raise MinitxError(f"--past must be >= 0, got {past}")
    if seq is None:
        seq = model.n_ctx - past
        if seq < 1:
            raise MinitxError(f"--past {past} leaves no room in the model's context of {model.n_ctx}")
    if seq < 1:
        raise MinitxError(f"--seq must be at least 1, got {seq}")
    if seq + past > model.n_ctx:
        raise MinitxError(f"--seq {seq} + --past {past} exceeds the model's context of {model.n_ctx}")
    rows, totals = graph_table(model.graph, model.params, {"B": batch, "T": seq, "S": past, "E": past + seq})
    return {"nodes": rows, "totals": totals, "seq": seq}
