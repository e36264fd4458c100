"""Linear algebra and table lookups: y = xW + b, A·B, a + b, E[ids], splitting a last axis."""
from __future__ import annotations

import numpy as np

from . import register, require, unbroadcast


# ----------------------------------------------------------------------------------- linear
def rows_matmul(x, w):
    """x @ w for a 2-D w, with x's leading axes folded into one: NumPy's matmul would otherwise
    call BLAS once per leading index (a batch of 8 one-token rows = 8 passes over W)."""
    return (x.reshape(-1, x.shape[-1]) @ w).reshape(*x.shape[:-1], w.shape[-1])


def linear(x, w, b=None):
    """y = x W + b, with W stored as (in_features, out_features)."""
    y = rows_matmul(x, w)
    return y if b is None else y + b


def linear_vjp(grads, inputs, outputs):
    (g,) = grads
    x, w, b = inputs
    gx = rows_matmul(g, w.T)
    gw = x.reshape(-1, x.shape[-1]).T @ g.reshape(-1, g.shape[-1])
    gb = None if b is None else g.reshape(-1, g.shape[-1]).sum(axis=0)
    return gx, gw, gb


def linear_infer(shapes, dtypes):
    x, w, b = shapes
    require(len(w) == 2, "linear", f"weight must be 2-D, got shape {w}")
    require(x[-1] == w[0], "linear", f"input features {x[-1]} != weight rows {w[0]} (weight {w})")
    require(b is None or tuple(b) == (w[1],), "linear", f"bias shape {b} != ({w[1]},)")
    return [((*x[:-1], w[1]), dtypes[0])]


def linear_flops(shapes, outs):
    x, w, _ = shapes
    return 2 * int(np.prod(x[:-1])) * w[0] * w[1]


register("linear", linear, linear_vjp, linear_infer, flops=linear_flops, n_optional=1,
         vjp_uses_outputs=False)


# ----------------------------------------------------------------------------------- matmul
def matmul(a, b, *, transpose_b=False):
    """C = A B (or A Bᵀ), batched over leading axes like numpy's matmul."""
    bm = np.swapaxes(b, -1, -2) if transpose_b else b
    return rows_matmul(a, bm) if bm.ndim == 2 and a.ndim > 2 else a @ bm


def matmul_vjp(grads, inputs, outputs, *, transpose_b=False):
    (g,) = grads
    a, b = inputs
    bm = np.swapaxes(b, -1, -2) if transpose_b else b
    ga = g @ np.swapaxes(bm, -1, -2)
    if a.ndim == 1 or bm.ndim == 1:
        raise NotImplementedError("matmul VJP needs operands of rank >= 2")
    gbm = np.swapaxes(a, -1, -2) @ g
    gbm = unbroadcast(gbm, bm.shape)
    gb = np.swapaxes(gbm, -1, -2) if transpose_b else gbm
    return unbroadcast(ga, a.shape), gb


def matmul_infer(shapes, dtypes, *, transpose_b=False):
    a, b = shapes
    require(len(a) >= 2 and len(b) >= 2, "matmul", f"operands must be at least 2-D, got {a} and {b}")
    bm = (*b[:-2], b[-1], b[-2]) if transpose_b else tuple(b)
    require(a[-1] == bm[-2], "matmul", f"inner dimensions differ: {a} @ {bm}")
    batch = np.broadcast_shapes(tuple(a[:-2]), tuple(bm[:-2]))
    return [((*batch, a[-2], bm[-1]), dtypes[0])]


def matmul_flops(shapes, outs, *, transpose_b=False):
    a = shapes[0]
    return 2 * int(np.prod(outs[0])) * a[-1]


register("matmul", matmul, matmul_vjp, matmul_infer, flops=matmul_flops, vjp_uses_outputs=False)


# -------------------------------------------------------------------------------------- add
def add(a, b):
    """a + b, with numpy broadcasting."""
    return a + b


def add_vjp(grads, inputs, outputs):
    (g,) = grads
    a, b = inputs
    return unbroadcast(g, a.shape), unbroadcast(g, b.shape)


def add_infer(shapes, dtypes):
    try:
        return [(np.broadcast_shapes(tuple(shapes[0]), tuple(shapes[1])), dtypes[0])]
    except ValueError:
        require(False, "add", f"shapes {shapes[0]} and {shapes[1]} do not broadcast")


register("add", add, add_vjp, add_infer, flops=lambda s, o: int(np.prod(o[0])), vjp_uses_outputs=False)


# -------------------------------------------------------------------------------- embedding
def embedding(ids, table):
    """E[ids]: one row of the table per token id (also serves learned position embeddings)."""
    return table[ids]


def embedding_vjp(grads, inputs, outputs):
    (g,) = grads
    ids, table = inputs
    gt = np.zeros_like(table)
    np.add.at(gt, ids.reshape(-1), g.reshape(-1, table.shape[1]))
    return None, gt


def embedding_infer(shapes, dtypes):
    ids, table = shapes
    require(len(table) == 2, "embedding", f"table must be 2-D, got {table}")
    require(np.issubdtype(np.dtype(dtypes[0]), np.integer), "embedding", f"ids must be integers, got {dtypes[0]}")
    return [((*ids, table[1]), dtypes[1])]


register("embedding", embedding, embedding_vjp, embedding_infer, nondiff=(0,), vjp_uses_outputs=False)


# ------------------------------------------------------------------------------------ split
def split(x, *, sizes):
    """Cut the last axis into consecutive pieces of the given sizes (e.g. fused q, k, v)."""
    starts = [0, *np.cumsum(sizes).tolist()]
    return tuple(x[..., a:b] for a, b in zip(starts, starts[1:]))


def split_vjp(grads, inputs, outputs, *, sizes):
    return (np.concatenate(grads, axis=-1),)


def split_infer(shapes, dtypes, *, sizes):
    (x,) = shapes
    require(sum(sizes) == x[-1], "split", f"sizes {list(sizes)} do not add up to the last axis of {x}")
    return [((*x[:-1], n), dtypes[0]) for n in sizes]


register("split", split, split_vjp, split_infer, vjp_uses_outputs=False)
