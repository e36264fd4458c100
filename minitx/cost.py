"""Static cost of a graph: shapes, parameter counts, FLOPs and bytes moved per node."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from . import ops
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
