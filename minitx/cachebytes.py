"""How many bytes a model's caches hold while it generates — what ``kv=int8`` shrinks.

A decoder keeps its self-attention K/V (``past.*``: one row per generated or prompt token, and
per-token scales when int8); an encoder–decoder also keeps the cross-attention K/V (``cross.*``:
one row per source token, computed once per input and read by every step). Both are read from
the graph's own declarations and shape rules, so a rewrite that changes a cache's dtype or width
(an int8 cache with its scales, heads pruned away) is counted as it now is.
"""
from __future__ import annotations

import numpy as np

from .ir import Graph, bind_shape, symbols

_ITEMSIZE = {"bfloat16": 2}


def _bytes(shape: tuple[int, ...], dtype: str) -> int:
    return int(np.prod(shape)) * (_ITEMSIZE.get(dtype) or np.dtype(dtype).itemsize)


def cache_bytes(graph: Graph, batch: int, tokens: int, source: int = 0) -> dict[str, int]:
    """{"self": bytes, "cross": bytes} of the caches after ``tokens`` decoder tokens for
    ``batch`` inputs (of ``source`` tokens each, for an encoder–decoder; "cross" is 0 otherwise)."""
    own = {"B": batch, "S": tokens, "E": max(source, 1), "T": 1}
    self_b = sum(_bytes(bind_shape(v.shape, {**{s: 1 for s in symbols(graph)}, **own}, v.name), v.dtype)
                 for v in graph.inputs if v.name.startswith("past."))
    cross = [o for n in graph.nodes for o in n.outputs if o.startswith("cross.")]
    cross_b = 0
    if cross and source:
        env = graph.infer({**{s: 1 for s in symbols(graph)}, **own})
        cross_b = sum(_bytes(*env[c]) for c in cross)
    return {"self": self_b, "cross": cross_b}


def describe(c: dict[str, int]) -> str:
    """"self-attention 12.0 KiB, cross-attention 3.0 KiB" (the cross part only when there is one)."""
    return f"self-attention {c['self'] / 1024:.1f} KiB" + (f", cross-attention {c['cross'] / 1024:.1f} KiB"
                                                           if c["cross"] else "")
