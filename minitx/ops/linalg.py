"""Linear algebra and table lookups: y = xW + b, A·B, a + b, E[ids], splitting a last axis,
keeping the last positions."""
from __future__ import annotations

import itertools

import numpy as np

from . import register, require, unbroadcast, wide_forward, wide_vjp
from .cases import EDGE_ROWS, Case, add_cases, randn, signed_zeros, viewed


# ----------------------------------------------------------------------------------- linear
def rows_matmul(x, w):
    """x @ w for a 2-D w, with x's leading axes folded into one: NumPy's matmul would otherwise
    call BLAS once per leading index (a batch of 8 one-token rows = 8 passes over W)."""
    return (x.reshape(-1, x.shape[-1]) @ w).reshape(*x.shape[:-1], w.shape[-1])


@wide_forward
def linear(x, w, b=None):
    """y = x W + b, with W stored as (in_features, out_features)."""
    y = rows_matmul(x, w)
    return y if b is None else y + b


@wide_vjp
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


_LINEAR = [Case(f"{m} rows, bias", lambda r, d, m=m: ((randn(r, (1, m, 96), d), randn(r, (96, 300), d, 0.1),
                                                       randn(r, (300,), d)), {}))
           for m in (1, 3, 8, 33)]
_LINEAR_CASES = _LINEAR + [
    Case("8 rows, no bias", lambda r, d: ((randn(r, (8, 1, 64), d), randn(r, (64, 1100), d, 0.1), None), {})),
    # A square weight: using W where Wᵀ is meant gives the right shape and the wrong numbers.
    Case("square weight 64x64", lambda r, d: ((randn(r, (2, 5, 64), d), randn(r, (64, 64), d, 0.1), None), {})),
    Case("large activations", lambda r, d: ((randn(r, (3, 96), d, 1e3 if d != "float16" else 30.0),
                                             randn(r, (96, 40), d, 0.1), randn(r, (40,), d)), {}), "large"),
    Case("zero activations", lambda r, d: ((signed_zeros((3, 96), d), randn(r, (96, 40), d, 0.1), randn(r, (40,), d)),
                                           {}), "zeros"),
    *[Case(f"{m} rows x {m + 1} in x {m + 2} out", lambda r, d, m=m: (
        (randn(r, (m, m + 1), d), randn(r, (m + 1, m + 2), d, 0.3), randn(r, (m + 2,), d)), {}), "sizes")
      for m in EDGE_ROWS],
    Case("batch 256", lambda r, d: ((randn(r, (256, 2, 32), d), randn(r, (32, 24), d, 0.2), randn(r, (24,), d)), {}),
         "batch"),
    viewed(_LINEAR[1]),
]
register("linear", linear, linear_vjp, linear_infer, flops=linear_flops, n_optional=1,
         vjp_uses_outputs=False)
add_cases("linear", _LINEAR_CASES)


# ----------------------------------------------------------------------------------- matmul
@wide_forward
def matmul(a, b, *, transpose_b=False):
    """C = A B (or A Bᵀ), batched over leading axes like numpy's matmul."""
    bm = np.swapaxes(b, -1, -2) if transpose_b else b
    return rows_matmul(a, bm) if bm.ndim == 2 and a.ndim > 2 else a @ bm


@wide_vjp
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
_MATMUL = [Case("2-D", lambda r, d: ((randn(r, (7, 12), d), randn(r, (12, 9), d)), {})),
           Case("batched", lambda r, d: ((randn(r, (2, 3, 7, 12), d), randn(r, (3, 12, 9), d)), {}))]
add_cases("matmul", _MATMUL + [
    *[Case(f"{m} rows, transpose_b (LM head)", lambda r, d, m=m: (
        (randn(r, (m, 1, 64), d), randn(r, (1000, 64), d, 0.1)), {"transpose_b": True})) for m in (1, 3, 8, 20)],
    # Square operands: a kernel that transposes the wrong one keeps every shape right.
    Case("square, transpose_b", lambda r, d: ((randn(r, (2, 32, 32), d), randn(r, (32, 32), d)),
                                              {"transpose_b": True})),
    Case("square", lambda r, d: ((randn(r, (32, 32), d), randn(r, (32, 32), d)), {})),
    *[Case(f"{m} rows, transpose_b, {m + 2} keys", lambda r, d, m=m: (
        (randn(r, (m, 1, 16), d), randn(r, (m + 2, 16), d)), {"transpose_b": True}), "sizes") for m in EDGE_ROWS],
    viewed(_MATMUL[1]),
])


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
add_cases("add", [
    Case("same shape", lambda r, d: ((randn(r, (4, 5, 8), d), randn(r, (4, 5, 8), d)), {})),
    Case("same shape, large", lambda r, d: ((randn(r, (64, 768), d), randn(r, (64, 768), d)), {})),
    Case("bias over last axis", lambda r, d: ((randn(r, (4, 5, 8), d), randn(r, (8,), d)), {})),
    Case("general broadcast", lambda r, d: ((randn(r, (4, 1, 8), d), randn(r, (5, 1), d)), {})),
    Case("broadcast view", lambda r, d: ((randn(r, (4, 5, 8), d), np.broadcast_to(randn(r, (8,), d), (4, 5, 8))), {}),
         "views"),
])


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
add_cases("embedding", [
    Case("gather", lambda r, d: ((r.integers(0, 50, (3, 7)), randn(r, (50, 16), d)), {})),
    Case("one id repeated", lambda r, d: ((np.full((2, 9), 4), randn(r, (50, 16), d)), {}), "ties"),
    Case("batch 1, first and last row", lambda r, d: ((np.array([[0, 49]]), randn(r, (50, 16), d)), {}), "batch"),
])


# ------------------------------------------------------------------------------------ split
def split(x, *, sizes):
    """Cut the last axis into consecutive pieces of the given sizes (e.g. fused q, k, v)."""
    starts = [0, *itertools.accumulate(sizes)]
    return tuple(x[..., a:b] for a, b in zip(starts, starts[1:]))


def split_vjp(grads, inputs, outputs, *, sizes):
    return (np.concatenate(grads, axis=-1),)


def split_infer(shapes, dtypes, *, sizes):
    (x,) = shapes
    require(sum(sizes) == x[-1], "split", f"sizes {list(sizes)} do not add up to the last axis of {x}")
    return [((*x[:-1], n), dtypes[0]) for n in sizes]


register("split", split, split_vjp, split_infer, vjp_uses_outputs=False, may_alias=True)  # views of x
add_cases("split", [
    Case("q|k|v", lambda r, d: ((randn(r, (2, 3, 24), d),), {"sizes": [8, 8, 8]})),
    Case("uneven", lambda r, d: ((randn(r, (2, 3, 20), d),), {"sizes": [12, 4, 4]})),
])


# --------------------------------------------------------------------------- last_positions
def last_positions(x, *, n):
    """x[:, -n:]: the last n positions of (batch, time, …) — generation needs only the last
    position's logits, so the LM head reads this instead of every position (the role of
    transformers' ``logits_to_keep``). A contiguous copy, not a view of x."""
    return x[:, -n:].copy()


def last_positions_vjp(grads, inputs, outputs, *, n):
    (g,), (x,) = grads, inputs
    gx = np.zeros_like(x)
    gx[:, -n:] = g
    return (gx,)


def last_positions_infer(shapes, dtypes, *, n):
    (x,) = shapes
    require(n >= 1, "last_positions", f"n must be >= 1, got {n}")
    require(len(x) >= 2, "last_positions", f"input must be (batch, time, ...), got {x}")
    return [((x[0], min(n, x[1]), *x[2:]), dtypes[0])]


register("last_positions", last_positions, last_positions_vjp, last_positions_infer, vjp_uses_outputs=False)
add_cases("last_positions", [
    Case("last of 5", lambda r, d: ((randn(r, (3, 5, 8), d),), {"n": 1})),
    Case("last 3 of 5", lambda r, d: ((randn(r, (2, 5, 8), d),), {"n": 3})),
    Case("n beyond the length", lambda r, d: ((randn(r, (2, 2, 8), d),), {"n": 4}), "sizes"),
    Case("odd sizes", lambda r, d: ((randn(r, (3, 7, 13), d),), {"n": 2}), "sizes"),
    Case("GPT-2 prefill, last of 512", lambda r, d: ((randn(r, (4, 512, 768), d),), {"n": 1}), "large"),
    Case("one position, one feature", lambda r, d: ((randn(r, (1, 1, 1), d),), {"n": 1}), "tiny"),
])
