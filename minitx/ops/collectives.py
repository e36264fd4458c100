"""Collectives and the layout ops of a sharded graph, as specs that simulate N ranks in one process.

A sharded graph (``plugins/parallel.py``) holds every rank's computation side by side, so a
collective node reads one value per rank and writes one value per rank. Each op is *defined* on a
leading rank axis — ``all_reduce_ranks(X)`` with ``X[r]`` rank r's array — and the op stacks its
inputs, applies the definition and hands rank r its slot; the VJPs are the adjoint collectives
(the VJP of an all-reduce is an all-reduce, of an all-gather a reduce-scatter, and so on).

Across processes each rank runs only its own part of the graph: a collective node then has one
input (that rank's) and the op is run by a transport backend (``minitx/parallel.py`` registers
MPI kernels for these ops). The spec's shape rules accept both forms — one input per rank of the
group (``ranks``) or one rank's input alone — but the spec cannot *compute* one rank's part by
itself; asking it to is an error naming the missing transport.

Ops take up to :data:`MAX_RANKS` inputs (the op registry counts positional parameters, so the
forward declares that many optional ones).
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import MinitxError
from . import register, require
from .cases import EDGE_ROWS, Case, Make, add_cases, np_dtype, randn, signed_zeros, viewed

MAX_RANKS = 64


# --------------------------------------------------------------------- definitions on a rank axis
def all_reduce_ranks(x: np.ndarray) -> np.ndarray:
    """Every rank gets the sum over ranks: out[r] = Σ_s x[s]."""
    return np.broadcast_to(x.sum(axis=0), x.shape).copy()


def all_gather_ranks(x: np.ndarray, axis: int) -> np.ndarray:
    """Every rank gets all ranks' pieces concatenated along ``axis`` (an axis of one rank's array)."""
    whole = np.concatenate(list(x), axis=axis)
    return np.broadcast_to(whole, (x.shape[0], *whole.shape)).copy()


def reduce_scatter_ranks(x: np.ndarray, axis: int) -> np.ndarray:
    """Rank r gets the r-th of N equal pieces (along ``axis``) of the sum over ranks."""
    return np.stack(np.split(x.sum(axis=0), x.shape[0], axis=axis))


def all_to_all_ranks(x: np.ndarray, split_axis: int, concat_axis: int) -> np.ndarray:
    """Rank r gets piece r of every rank's array (cut into N along ``split_axis``), concatenated in
    rank order along ``concat_axis``: the exchange that turns a split over one axis into a split
    over another (sequence ↔ heads)."""
    n = x.shape[0]
    pieces = [np.split(x[s], n, axis=split_axis) for s in range(n)]
    return np.stack([np.concatenate([pieces[s][r] for s in range(n)], axis=concat_axis) for r in range(n)])


def broadcast_ranks(x: np.ndarray, root: int) -> np.ndarray:
    """Every rank gets rank ``root``'s array (``root`` indexes the group)."""
    return np.broadcast_to(x[root], x.shape).copy()


# ------------------------------------------------------------------------ one input per rank
def _variadic(fn: Callable[..., Any], doc: str) -> Callable[..., Any]:
    """An op forward taking ``x0 … x{MAX_RANKS-1}`` (absent ones None) and calling ``fn(xs, **attrs)``."""

    def forward(*xs, **attrs):
        return fn([x for x in xs if x is not None], **attrs)

    P = inspect.Parameter
    # fn's keyword-only attributes stay in the signature: a stored graph's node attributes are
    # checked against them at load.
    attrs = [p for p in inspect.signature(fn).parameters.values() if p.kind == P.KEYWORD_ONLY]
    forward.__signature__ = inspect.Signature(
        [P(f"x{i}", P.POSITIONAL_OR_KEYWORD, default=None) for i in range(MAX_RANKS)] + attrs)
    forward.__doc__ = doc
    forward.__name__ = fn.__name__
    return forward


def _present(shapes: Sequence[Any]) -> list:
    return [s for s in shapes if s is not None]


def _group(op: str, xs: Sequence[np.ndarray], ranks: Sequence[int]) -> np.ndarray:
    """The inputs stacked on a rank axis, after checking there is one per rank of the group."""
    if len(xs) != len(ranks):
        if len(xs) == 1 and len(ranks) > 1:
            raise MinitxError(f"op {op}: one rank's part of a collective over ranks {list(ranks)} needs a "
                              "transport (run under mpiexec with --parallel), not the spec")
        raise MinitxError(f"op {op}: {len(xs)} inputs for a group of {len(ranks)} ranks {list(ranks)}")
    return np.stack(xs)


def _infer_group(op: str, shapes: Sequence[Any], dtypes: Sequence[Any], ranks: Sequence[int],
                 out_shape: Callable[[tuple, int], tuple]) -> list:
    present = _present(shapes)
    n = len(ranks)
    require(len(present) in (n, 1), op, f"{len(present)} inputs for a group of {n} ranks {list(ranks)} "
            "(give one per rank, or one rank's alone)")
    require(len(set(map(tuple, present))) == 1, op, f"ranks' inputs differ in shape: {present}")
    shape = out_shape(tuple(present[0]), n)
    return [(shape, dtypes[0])] * len(present)


def _axis(shape: tuple, axis: int, op: str) -> int:
    require(-len(shape) <= axis < len(shape), op, f"axis {axis} is out of range for shape {shape}")
    return axis % len(shape)



# ------------------------------------------------------------------------ conformance cases
Shape = Callable[[int, int], tuple]     # (ranks, rows) -> one rank's input shape


def _ranked(n: int, shape: tuple, attrs: Callable[[int], dict], fill: Callable[..., np.ndarray] = randn) -> Make:
    """One array per rank of a group of ``n`` (ranks 0 … n−1) and the op's ``attrs(n)``."""
    def make(r, d):
        xs = tuple(fill(r, shape, d) if fill is randn else fill(shape, d) for _ in range(n))
        return xs, {"ranks": list(range(n)), **attrs(n)}
    return make


def _magnitude(scale: Callable[[np.finfo], float]) -> Callable[..., np.ndarray]:
    """A deterministic fill (signs and sizes varying along the array) at ``scale(finfo(dtype))``:
    near the dtype's maximum, yet summable over 8 ranks without overflow, or subnormal."""
    def fill(shape: Sequence[int], dtype: str) -> np.ndarray:
        dt = np_dtype(dtype)
        wave = np.cos(np.arange(int(np.prod(shape)), dtype=np.float64)).reshape(tuple(shape))
        return (wave * scale(np.finfo(dt))).astype(dt)
    return fill


def _collective_cases(shape: Shape, attrs: Callable[[int], dict] = lambda n: {}) -> list[Case]:
    """Groups of 2, 3 and 4 ranks, of 1 and 8 (``batch``), row counts across tile edges, signed
    zeros and strided views, for a collective whose rank r input has ``shape(n, rows)``."""
    typical = [Case(f"{n} ranks, {'x'.join(map(str, shape(n, 5)))}", _ranked(n, shape(n, 5), attrs))
               for n in (2, 3, 4)]
    return typical + [
        Case("1 rank", _ranked(1, shape(1, 5), attrs), "batch"),
        Case("8 ranks", _ranked(8, shape(8, 3), attrs), "batch"),
        *[Case(f"2 ranks, {k} rows", _ranked(2, shape(2, k), attrs), "sizes") for k in EDGE_ROWS],
        Case("signed zeros", _ranked(3, shape(3, 4), attrs, signed_zeros), "zeros"),
        Case("near the dtype's maximum", _ranked(3, shape(3, 4), attrs, _magnitude(lambda f: float(f.max) / 16)),
             "large"),
        Case("subnormal", _ranked(3, shape(3, 4), attrs, _magnitude(lambda f: 4 * float(f.smallest_subnormal))),
             "tiny"),
        viewed(typical[1]),
    ]


def _pieces(sizes: Sequence[int], axis: int, lead: tuple = (3,), **attrs: Any) -> Make:
    """Pieces of the given lengths along ``axis``, the other axes ``lead`` (then a width of 4)."""
    def make(r, d):
        other = [*lead, 4]
        return tuple(randn(r, (*other[:axis], k, *other[axis:]), d) for k in sizes), {"axis": axis, **attrs}
    return make


# all_reduce ----------------------------------------------------------------------------------
def _all_reduce(xs, *, ranks):
    return tuple(all_reduce_ranks(_group("all_reduce", xs, ranks)))


def _all_reduce_vjp(grads, inputs, outputs, *, ranks):
    return tuple(all_reduce_ranks(np.stack(grads)))


register("all_reduce", _variadic(_all_reduce, "Sum over the ranks of ``ranks``; every rank gets the sum."),
         _all_reduce_vjp, lambda s, d, *, ranks: _infer_group("all_reduce", s, d, ranks, lambda x, n: x),
         n_optional=MAX_RANKS - 1, vjp_uses_outputs=False)
add_cases("all_reduce", _collective_cases(lambda n, rows: (rows, 6)))


# all_gather ----------------------------------------------------------------------------------
# The ranks' pieces may differ in length along ``axis`` (a sequence of T tokens cut in sp pieces
# when sp does not divide T): the op then works on the list, the rank-axis definition being the
# equal-length case.
def _check_group(op: str, xs: Sequence[np.ndarray], ranks: Sequence[int]) -> None:
    if len(xs) != len(ranks):
        _group(op, xs, ranks)  # raises the error naming the transport or the count


def _all_gather(xs, *, ranks, axis):
    _check_group("all_gather", xs, ranks)
    whole = np.concatenate(xs, axis=axis)
    return tuple(whole.copy() for _ in xs)


def _all_gather_vjp(grads, inputs, outputs, *, ranks, axis):
    xs = [x for x in inputs if x is not None]
    cuts = np.cumsum([x.shape[axis] for x in xs])[:-1]
    total = grads[0].copy()
    for g in grads[1:]:
        total = total + g
    return tuple(np.split(total, cuts, axis=axis))


def _all_gather_infer(shapes, dtypes, *, ranks, axis):
    present = [tuple(x) for x in _present(shapes)]
    n = len(ranks)
    require(len(present) in (n, 1), "all_gather", f"{len(present)} inputs for a group of {n} ranks {list(ranks)}")
    a = _axis(present[0], axis, "all_gather")
    for x in present:
        require(len(x) == len(present[0]) and all(x[k] == present[0][k] for k in range(len(x)) if k != a),
                "all_gather", f"ranks' inputs differ off axis {axis}: {present}")
    total = sum(x[a] for x in present) if len(present) == n else present[0][a] * n
    return [((*present[0][:a], total, *present[0][a + 1:]), dtypes[0])] * len(present)


register("all_gather", _variadic(_all_gather, "Every rank gets all ranks' arrays concatenated along ``axis``."),
         _all_gather_vjp, _all_gather_infer, n_optional=MAX_RANKS - 1, vjp_uses_outputs=False)
add_cases("all_gather", _collective_cases(lambda n, rows: (rows, 6), lambda n: {"axis": 0}) + [
    Case("3 ranks, last axis", _ranked(3, (2, 4, 5), lambda n: {"axis": -1})),
    Case("uneven pieces 4, 3, 3 (10 tokens on 3 ranks)", _pieces((4, 3, 3), 1, ranks=[0, 1, 2])),
    Case("an empty piece (1 token on 2 ranks)", _pieces((1, 0), 1, ranks=[0, 1]), "sizes"),
])


# reduce_scatter ------------------------------------------------------------------------------
# When the axis does not divide into the ranks, the pieces are cut as ``chunk`` cuts them (earlier
# ranks one more: a sequence of 5 tokens on 2 ranks is 3 + 2), the rank-axis definition being
# the equal case.
def _reduce_scatter(xs, *, ranks, axis):
    total = _group("reduce_scatter", xs, ranks).sum(axis=0)
    return tuple(np.ascontiguousarray(p) for p in np.array_split(total, len(ranks), axis=axis))


def _reduce_scatter_vjp(grads, inputs, outputs, *, ranks, axis):
    whole = np.concatenate(grads, axis=axis)
    return tuple(whole.copy() for _ in grads)


def _reduce_scatter_infer(shapes, dtypes, *, ranks, axis):
    present = _present(shapes)
    n = len(ranks)
    require(len(present) in (n, 1), "reduce_scatter", f"{len(present)} inputs for a group of {n} ranks {list(ranks)}")
    require(len(set(map(tuple, present))) == 1, "reduce_scatter", f"ranks' inputs differ in shape: {present}")
    x = tuple(present[0])
    a = _axis(x, axis, "reduce_scatter")
    sizes = [len(p) for p in np.array_split(np.arange(x[a]), n)]
    # One rank's part alone: the first (largest) piece's shape stands for every rank's.
    return [((*x[:a], k, *x[a + 1:]), dtypes[0]) for k in (sizes if len(present) == n else sizes[:1])]


register("reduce_scatter", _variadic(_reduce_scatter, "Rank r gets piece r (along ``axis``) of the sum over ranks."),
         _reduce_scatter_vjp, _reduce_scatter_infer, n_optional=MAX_RANKS - 1, vjp_uses_outputs=False)
add_cases("reduce_scatter", _collective_cases(lambda n, rows: (rows, 3 * n), lambda n: {"axis": 1}) + [
    Case("2 ranks, first axis", _ranked(2, (8, 3), lambda n: {"axis": 0})),
])


# all_to_all ----------------------------------------------------------------------------------
def _all_to_all(xs, *, ranks, split_axis, concat_axis):
    _check_group("all_to_all", xs, ranks)
    n = len(xs)
    pieces = [np.array_split(x, n, axis=split_axis) for x in xs]
    return tuple(np.concatenate([pieces[s][r] for s in range(n)], axis=concat_axis) for r in range(n))


def _all_to_all_vjp(grads, inputs, outputs, *, ranks, split_axis, concat_axis):
    xs = [x for x in inputs if x is not None]
    n = len(xs)
    cuts = np.cumsum([x.shape[concat_axis] for x in xs])[:-1]      # rank s's part of each output
    back = [np.split(g, cuts, axis=concat_axis) for g in grads]
    return tuple(np.concatenate([back[r][s] for r in range(n)], axis=split_axis) for s in range(n))


def _all_to_all_infer(shapes, dtypes, *, ranks, split_axis, concat_axis):
    present = [tuple(x) for x in _present(shapes)]
    n = len(ranks)
    op = "all_to_all"
    require(len(present) in (n, 1), op, f"{len(present)} inputs for a group of {n} ranks {list(ranks)}")
    sa, ca = _axis(present[0], split_axis, op), _axis(present[0], concat_axis, op)
    require(sa != ca, op, "split_axis and concat_axis must differ")
    out = []
    for r in range(len(present)):
        shape = list(present[r])
        shape[sa] = len(np.array_split(np.arange(present[r][sa]), n)[r if len(present) == n else 0])
        shape[ca] = sum(x[ca] for x in present) if len(present) == n else present[0][ca] * n
        out.append((tuple(shape), dtypes[0]))
    return out


register("all_to_all", _variadic(_all_to_all, "Rank r gets piece r of every rank's array, concatenated in rank order."),
         _all_to_all_vjp, _all_to_all_infer, n_optional=MAX_RANKS - 1, vjp_uses_outputs=False)
add_cases("all_to_all", _collective_cases(lambda n, rows: (rows, 2 * n, 3),
                                          lambda n: {"split_axis": 1, "concat_axis": 0}) + [
    Case("heads → sequence", _ranked(2, (4, 6, 3), lambda n: {"split_axis": 0, "concat_axis": 1})),
    Case("uneven split, 7 heads on 2 ranks", _ranked(2, (3, 7), lambda n: {"split_axis": 1, "concat_axis": 0}),
         "sizes"),
])


# broadcast -----------------------------------------------------------------------------------
def _broadcast(xs, *, ranks, root):
    return tuple(broadcast_ranks(_group("broadcast", xs, ranks), ranks.index(root)))


def _broadcast_vjp(grads, inputs, outputs, *, ranks, root):
    g = np.stack(grads)
    out = np.zeros_like(g)
    out[ranks.index(root)] = g.sum(axis=0)
    return tuple(out)


def _broadcast_infer(shapes, dtypes, *, ranks, root):
    require(root in ranks, "broadcast", f"root {root} is not in the group {list(ranks)}")
    return _infer_group("broadcast", shapes, dtypes, ranks, lambda x, n: x)


register("broadcast", _variadic(_broadcast, "Every rank gets the array of rank ``root``."), _broadcast_vjp,
         _broadcast_infer, n_optional=MAX_RANKS - 1, vjp_uses_outputs=False)
add_cases("broadcast", _collective_cases(lambda n, rows: (rows, 6), lambda n: {"root": n - 1}) + [
    Case("3 ranks, root 0", _ranked(3, (4, 6), lambda n: {"root": 0})),
])


# send_recv: one point-to-point transfer --------------------------------------------------------
def send_recv(x=None, *, src, dst):
    """Rank ``dst`` receives rank ``src``'s array (a pipeline stage hands on its activations). In one
    process this is the identity; across processes the sender's node has the input and no output,
    the receiver's the output and no input."""
    if x is None:
        raise MinitxError(f"op send_recv: rank {dst}'s receive from rank {src} needs a transport (run under "
                          "mpiexec with --parallel), not the spec")
    return x


def _send_recv_vjp(grads, inputs, outputs, *, src, dst):
    return (grads[0],)


def _send_recv_infer(shapes, dtypes, *, src, dst):
    require(shapes[0] is not None, "send_recv", "the receiving rank's shape comes from the sender's input")
    return [(tuple(shapes[0]), dtypes[0])]


register("send_recv", send_recv, _send_recv_vjp, _send_recv_infer, n_optional=1, vjp_uses_outputs=False,
         may_alias=True)  # in one process the receiver's array is the sender's
add_cases("send_recv", [
    Case("activations 2x5x16", lambda r, d: ((randn(r, (2, 5, 16), d),), {"src": 0, "dst": 1})),
    *[Case(f"{k} rows", lambda r, d, k=k: ((randn(r, (k, 6), d),), {"src": 1, "dst": 0}), "sizes") for k in EDGE_ROWS],
])


# concat: joins ranks' shards into the unsharded value a graph's interface promises -------------
def _concat(xs, *, axis):
    return np.concatenate(xs, axis=axis)


def _concat_vjp(grads, inputs, outputs, *, axis):
    (g,) = grads
    xs = [x for x in inputs if x is not None]
    cuts = np.cumsum([x.shape[axis] for x in xs])[:-1]
    return tuple(np.split(g, cuts, axis=axis))


def _concat_infer(shapes, dtypes, *, axis):
    present = _present(shapes)
    require(len(present) >= 1, "concat", "needs at least one input")
    a = _axis(tuple(present[0]), axis, "concat")
    for s in present:
        require(len(s) == len(present[0]) and all(s[k] == present[0][k] for k in range(len(s)) if k != a),
                "concat", f"shapes {present} differ off axis {axis}")
    out = list(present[0])
    out[a] = sum(s[a] for s in present)
    return [(tuple(out), dtypes[0])]


register("concat", _variadic(_concat, "The inputs joined along ``axis`` (ranks' KV-cache shards → one cache)."),
         _concat_vjp, _concat_infer, n_optional=MAX_RANKS - 1, vjp_uses_outputs=False)
add_cases("concat", [
    Case("2 KV-cache shards on the width", _pieces((8, 8), 2, lead=(2, 5))),
    Case("3 pieces of different lengths", _pieces((4, 1, 6), 0, lead=(5,))),
    Case("one piece", _pieces((7,), 1, lead=(3,)), "batch"),
    Case("an empty piece", _pieces((3, 0, 2), 1, lead=(3,)), "sizes"),
    *[Case(f"2 pieces of {k} rows", _pieces((k, k), 0, lead=(6,)), "sizes") for k in EDGE_ROWS],
])


# chunk: cut a batch into micro-batches (the inverse of concat) --------------------------------
def chunk(x, *, axis, n, nonempty=False):
    """``x`` cut into ``n`` consecutive pieces along ``axis``, as even as possible (earlier pieces one
    larger): a pipeline's micro-batches (``nonempty``: each must get a row), a rank's share of a
    sequence (one token on two ranks leaves the second an empty piece)."""
    if nonempty and x.shape[axis] < n:
        raise MinitxError(f"op chunk: {x.shape[axis]} rows (axis {axis} of {x.shape}) cannot be cut into {n} "
                          "non-empty pieces (micro-batches need at least one sequence each)")
    return tuple(np.array_split(x, n, axis=axis))


def _chunk_vjp(grads, inputs, outputs, *, axis, n, nonempty=False):
    return (np.concatenate(grads, axis=axis),)


def _chunk_infer(shapes, dtypes, *, axis, n, nonempty=False):
    (x,) = shapes
    a = _axis(tuple(x), axis, "chunk")
    return [((*x[:a], len(p), *x[a + 1:]), dtypes[0]) for p in np.array_split(np.arange(x[a]), n)]


register("chunk", chunk, _chunk_vjp, _chunk_infer, vjp_uses_outputs=False, may_alias=True)  # views of x
add_cases("chunk", [
    Case("2 micro-batches of 4", lambda r, d: ((randn(r, (8, 5, 6), d),), {"axis": 0, "n": 2, "nonempty": True})),
    Case("10 tokens on 3 ranks", lambda r, d: ((randn(r, (2, 10, 6), d),), {"axis": 1, "n": 3})),
    Case("1 token on 2 ranks (an empty piece)", lambda r, d: ((randn(r, (2, 1, 6), d),), {"axis": 1, "n": 2}),
         "sizes"),
    *[Case(f"{k} rows in 4", lambda r, d, k=k: ((randn(r, (k, 6), d),), {"axis": 0, "n": 4}), "sizes")
      for k in EDGE_ROWS],
])


# vocab_embedding: one rank's rows of a vocabulary-parallel table --------------------------------
def vocab_embedding(ids, table, *, start):
    """E[ids] for the ids in this shard's rows [start, start + rows), zeros for the others: summed
    over the shards (an all-reduce) it is the full table's lookup (Megatron's vocabulary-parallel
    embedding)."""
    local = ids - start
    inside = (local >= 0) & (local < table.shape[0])
    out = table[np.where(inside, local, 0)]
    return np.where(inside[..., None], out, out.dtype.type(0))


def _vocab_embedding_vjp(grads, inputs, outputs, *, start):
    (g,) = grads
    ids, table = inputs
    local = (ids - start).reshape(-1)
    inside = (local >= 0) & (local < table.shape[0])
    gt = np.zeros_like(table)
    np.add.at(gt, local[inside], g.reshape(-1, table.shape[1])[inside])
    return None, gt


def _vocab_embedding_infer(shapes, dtypes, *, start):
    ids, table = shapes
    require(len(table) == 2, "vocab_embedding", f"table must be 2-D, got {table}")
    require(np.issubdtype(np.dtype(dtypes[0]), np.integer), "vocab_embedding", f"ids must be integers, got {dtypes[0]}")
    return [((*ids, table[1]), dtypes[1])]


register("vocab_embedding", vocab_embedding, _vocab_embedding_vjp, _vocab_embedding_infer, nondiff=(0,),
         vjp_uses_outputs=False)


def _shard_lookup(ids: Callable[[np.random.Generator], np.ndarray], start: int, rows: int = 25) -> Make:
    """ids over a 100-token vocabulary, looked up in the shard holding rows [start, start + rows)."""
    return lambda r, d: ((ids(r), randn(r, (rows, 16), d)), {"start": start})


add_cases("vocab_embedding", [
    Case("second of 4 shards", _shard_lookup(lambda r: r.integers(0, 100, (3, 7)), 25)),
    Case("first shard", _shard_lookup(lambda r: r.integers(0, 100, (2, 9)), 0)),
    Case("last shard, its edge rows", _shard_lookup(lambda r: np.array([[74, 75, 98, 99, 0]]), 75)),
    Case("no id in the shard", _shard_lookup(lambda r: r.integers(0, 50, (2, 5)), 50), "zeros"),
    Case("one id repeated", _shard_lookup(lambda r: np.full((2, 9), 30), 25), "ties"),
    *[Case(f"{k} ids", _shard_lookup(lambda r, k=k: r.integers(0, 100, (1, k)), 50), "sizes") for k in EDGE_ROWS],
])


# vocab_cross_entropy: Megatron's vocabulary-parallel cross-entropy --------------------------------
# Each rank holds a vocabulary shard of the logits (its columns of the LM head). The loss needs
# three numbers per token from the whole vocabulary — the max (for a stable log-sum-exp), the sum
# of exponentials and the target's logit — and each is a reduction over the ranks of a local one:
# a max all-reduce, then two sum all-reduces of B·T values. The (B, T, V) logits are never
# gathered. Columns at or beyond ``vocab`` are padding (the vocabulary padded to a multiple of
# the ranks) and count for nothing.
def _vce_parts(xs, ranks, op):
    """(logits shards, targets) of a vocab_cross_entropy node: one shard per rank, then the targets."""
    *shards, targets = xs
    if len(shards) != len(ranks):
        if len(shards) == 1 and len(ranks) > 1:
            raise MinitxError(f"op {op}: one rank's part of a collective over ranks {list(ranks)} needs a "
                              "transport (run under mpiexec with --parallel), not the spec")
        raise MinitxError(f"op {op}: {len(shards)} logits shards for a group of {len(ranks)} ranks")
    return shards, targets


def vce_local(z: np.ndarray, targets: np.ndarray, start: int, vocab: int, ignore_index: int):
    """One shard's local statistics in float64: the column mask of real (unpadded) columns, its
    max per token, and the target's logit where this shard holds the target (else 0)."""
    z = z.astype(np.float64).reshape(-1, z.shape[-1])
    real = (start + np.arange(z.shape[1])) < vocab
    zm = np.where(real, z, -np.inf)
    t = targets.reshape(-1)
    local = t - start
    mine = (t != ignore_index) & (local >= 0) & (local < z.shape[1])
    picked = np.where(mine, z[np.arange(len(t)), np.where(mine, local, 0)], 0.0)
    return zm, zm.max(axis=1) if zm.shape[1] else np.full(len(t), -np.inf), picked


def vce_loss(m: np.ndarray, sumexp: np.ndarray, picked: np.ndarray, targets: np.ndarray, ignore_index: int) -> float:
    keep = targets.reshape(-1) != ignore_index
    per = np.log(sumexp) + m - picked
    return float(per[keep].sum()) / max(int(keep.sum()), 1)


def vce_grad(zm: np.ndarray, m: np.ndarray, sumexp: np.ndarray, targets: np.ndarray, start: int, g: float,
             ignore_index: int, shape: tuple, dtype) -> np.ndarray:
    """One shard's gradient: g/N · (softmax − one-hot) on its columns, zero on padding and ignored tokens."""
    t = targets.reshape(-1)
    keep = t != ignore_index
    p = np.exp(zm - m[:, None]) / sumexp[:, None]
    local = t - start
    mine = keep & (local >= 0) & (local < zm.shape[1])
    p[np.nonzero(mine)[0], local[mine]] -= 1.0
    p[~keep] = 0.0
    return (p * (g / max(int(keep.sum()), 1))).reshape(shape).astype(dtype)


def _vocab_cross_entropy(xs, *, ranks, vocab, ignore_index=-100):
    shards, targets = _vce_parts(xs, ranks, "vocab_cross_entropy")
    n = shards[0].shape[-1]
    stats = [vce_local(z, targets, t * n, vocab, ignore_index) for t, z in enumerate(shards)]
    m = np.max([s[1] for s in stats], axis=0)                                  # the max all-reduce
    sumexp = np.sum([np.exp(zm - m[:, None]).sum(axis=1) for zm, _, _ in stats], axis=0)   # a sum all-reduce
    picked = np.sum([s[2] for s in stats], axis=0)                             # a sum all-reduce
    loss = np.asarray(vce_loss(m, sumexp, picked, targets, ignore_index), shards[0].dtype)
    return tuple(loss.copy() for _ in shards)


def _vocab_cross_entropy_vjp(grads, inputs, outputs, *, ranks, vocab, ignore_index=-100):
    shards, targets = _vce_parts([x for x in inputs if x is not None], ranks, "vocab_cross_entropy")
    n = shards[0].shape[-1]
    g = float(np.sum([float(x) for x in grads]))       # every rank's loss is the same value: cotangents add
    stats = [vce_local(z, targets, t * n, vocab, ignore_index) for t, z in enumerate(shards)]
    m = np.max([s[1] for s in stats], axis=0)
    sumexp = np.sum([np.exp(zm - m[:, None]).sum(axis=1) for zm, _, _ in stats], axis=0)
    return (*(vce_grad(zm, m, sumexp, targets, t * n, g, ignore_index, z.shape, z.dtype)
              for t, ((zm, _, _), z) in enumerate(zip(stats, shards))), None)


def _vocab_cross_entropy_infer(shapes, dtypes, *, ranks, vocab, ignore_index=-100):
    present = _present(shapes)
    require(len(present) >= 2, "vocab_cross_entropy", "needs the logits shards and the targets")
    *shards, targets = present
    require(len(shards) in (len(ranks), 1), "vocab_cross_entropy",
            f"{len(shards)} logits shards for a group of {len(ranks)} ranks {list(ranks)}")
    require(len(set(map(tuple, shards))) == 1, "vocab_cross_entropy", f"ranks' shards differ in shape: {shards}")
    require(tuple(targets) == tuple(shards[0][:-1]), "vocab_cross_entropy",
            f"targets {targets} must match the logits shards {shards[0]} without the class axis")
    require(shards[0][-1] * len(ranks) >= vocab, "vocab_cross_entropy",
            f"{len(ranks)} shards of {shards[0][-1]} columns hold fewer than the vocabulary of {vocab}")
    return [((), dtypes[0])] * len(shards)


register("vocab_cross_entropy",
         _variadic(_vocab_cross_entropy, "Cross-entropy from vocabulary shards of the logits (the targets last): "
                   "max and sum of exponentials all-reduced, the logits never gathered."),
         _vocab_cross_entropy_vjp, _vocab_cross_entropy_infer, n_optional=MAX_RANKS - 1, vjp_uses_outputs=False)


def _vce_case(n: int, cols: int, vocab: int, lead: tuple = (2, 5)) -> Make:
    def make(r, d):
        targets = r.integers(0, vocab, lead)
        targets[0, 0] = -100
        return (*(randn(r, (*lead, cols), d, 2.0) for _ in range(n)), targets), {"ranks": list(range(n)), "vocab": vocab}
    return make


add_cases("vocab_cross_entropy", [
    Case("2 shards of 6", _vce_case(2, 6, 12)),
    Case("3 shards, vocabulary padded by 2", _vce_case(3, 4, 10)),
    Case("1 shard", _vce_case(1, 9, 9), "batch"),
])


# inner: the scalar a pipeline stage's backward pass starts from ----------------------------------
def inner(x, g):
    """Σ x·g, a scalar whose gradient with respect to ``x`` is ``g``: a pipeline stage that is not
    the last ends its training graph with it, ``g`` being the cotangent the next stage sent back,
    so that one backward pass from this scalar is the stage's VJP."""
    return np.asarray(float(np.sum(x.astype(np.float64) * g.astype(np.float64))), x.dtype)


def _inner_vjp(grads, inputs, outputs):
    (go,) = grads
    x, g = inputs
    return (g * go).astype(x.dtype), (x * go).astype(g.dtype)


def _inner_infer(shapes, dtypes):
    require(tuple(shapes[0]) == tuple(shapes[1]), "inner", f"shapes {shapes[0]} and {shapes[1]} differ")
    return [((), dtypes[0])]


register("inner", inner, _inner_vjp, _inner_infer, vjp_uses_outputs=False)
add_cases("inner", [
    Case("activations 2x5x8", lambda r, d: ((randn(r, (2, 5, 8), d), randn(r, (2, 5, 8), d)), {})),
    *[Case(f"{k} rows", lambda r, d, k=k: ((randn(r, (k, 6), d), randn(r, (k, 6), d)), {}), "sizes") for k in EDGE_ROWS],
])


# attention_block / attention_merge: ring attention (sequence parallel) --------------------------
# Ring attention (Liu et al., 2023) gives each rank a piece of the sequence and passes the K/V
# pieces around the ranks with send_recv; a rank attends its queries to one block of keys at a
# time (attention_block: the block's softmax-normalised output and its log-sum-exp per query and
# head) and combines the blocks' results exactly (attention_merge: the "online softmax"), so no
# rank ever holds the scores against the whole sequence. Which keys a block holds follows from
# its attributes: ``block`` -1 is the KV cache before this step (S positions, all visible);
# ``block`` b ≥ 0 is piece b of this step's T tokens cut into ``blocks`` pieces as ``chunk``
# cuts them; with ``causal`` a query sees its own piece up to itself (``block == query_block``)
# and no piece after its own. The padding mask covers the S + T positions, as for ``attention``;
# ``past`` is the cache (only its length is read) so that the op knows S.
def _block_geometry(k, mask, past, block, blocks):
    """The padding-mask columns of this block (None without a mask)."""
    S = 0 if past is None else past.shape[1]
    if mask is None:
        return None
    if block < 0:
        return mask[:, :S]
    T = mask.shape[1] - S
    piece = np.array_split(np.arange(T), blocks)[block]
    return mask[:, S + piece]


def _block_probs(q, k, mask, past, n_heads, n_kv_heads, scale, block, blocks, query_block, causal):
    B, Tq, HD = q.shape
    Tk = k.shape[1]
    G, D = n_heads // n_kv_heads, HD // n_heads
    sc = (1.0 / np.sqrt(D)) if scale is None else scale
    qh = q.astype(np.float64).reshape(B, Tq, n_kv_heads, G, D).transpose(0, 2, 3, 1, 4)       # (B, KV, G, Tq, D)
    kh = k.astype(np.float64).reshape(B, Tk, n_kv_heads, D).transpose(0, 2, 1, 3)[:, :, None]  # (B, KV, 1, Tk, D)
    scores = (qh @ np.swapaxes(kh, -1, -2)) * sc
    keep = np.ones((B, 1, 1, Tq, Tk), bool)
    cols = _block_geometry(k, mask, past, block, blocks)
    if cols is not None:
        keep &= cols.astype(bool)[:, None, None, None, :]
    if causal and block == query_block:
        keep &= np.tril(np.ones((Tq, Tk), bool))[None, None, None]
    m = np.where(keep, scores, -np.inf).max(axis=-1, keepdims=True) if Tk else np.full((*scores.shape[:-1], 1), -np.inf)
    e = np.where(keep, np.exp(scores - np.where(np.isfinite(m), m, 0.0)), 0.0)
    l = e.sum(axis=-1, keepdims=True)
    p = np.divide(e, l, out=np.zeros_like(e), where=l > 0)
    with np.errstate(divide="ignore"):
        lse = np.where(l > 0, np.log(np.where(l > 0, l, 1.0)) + np.where(np.isfinite(m), m, 0.0), -np.inf)
    return p, keep, qh, kh, lse[..., 0], sc


def _block_check(block, query_block, causal, op="attention_block"):
    if causal and block > query_block:
        raise MinitxError(f"op {op}: with causal attention, block {block} lies after the queries' block {query_block}")


def attention_block(q, k, v, mask=None, past=None, *, n_heads, n_kv_heads, block, blocks, query_block, causal,
                    scale=None):
    """Attention of the queries ``q`` to one block of keys/values only: (the block's softmax-
    normalised output (B, T, H·D), its log-sum-exp per head and query (B, H, T); −inf where the
    block holds no key the query may see, the output then 0)."""
    _block_check(block, query_block, causal)
    B, Tq, HD = q.shape
    p, _, _, _, lse, _ = _block_probs(q, k, mask, past, n_heads, n_kv_heads, scale, block, blocks, query_block, causal)
    vh = v.astype(np.float64).reshape(B, v.shape[1], n_kv_heads, HD // n_heads).transpose(0, 2, 1, 3)[:, :, None]
    o = (p @ vh).reshape(B, n_heads, Tq, HD // n_heads).transpose(0, 2, 1, 3).reshape(B, Tq, HD)
    return o.astype(q.dtype), lse.reshape(B, n_heads, Tq).astype(q.dtype)


def _attention_block_vjp(grads, inputs, outputs, *, n_heads, n_kv_heads, block, blocks, query_block, causal,
                         scale=None):
    g_o, g_lse = grads
    q, k, v, mask, past = (*inputs, None, None)[:5]
    B, Tq, HD = q.shape
    D, KV, G = HD // n_heads, n_kv_heads, n_heads // n_kv_heads
    p, keep, qh, kh, _, sc = _block_probs(q, k, mask, past, n_heads, n_kv_heads, scale, block, blocks, query_block,
                                          causal)
    vh = v.astype(np.float64).reshape(B, v.shape[1], KV, D).transpose(0, 2, 1, 3)[:, :, None]
    go = g_o.astype(np.float64).reshape(B, Tq, KV, G, D).transpose(0, 2, 3, 1, 4)
    gl = g_lse.astype(np.float64).reshape(B, KV, G, Tq, 1)
    gv = (np.swapaxes(p, -1, -2) @ go).sum(axis=2)                                   # (B, KV, Tk, D)
    gp = go @ np.swapaxes(vh, -1, -2)
    gs = np.where(keep, p * (gp - (gp * p).sum(axis=-1, keepdims=True)) + gl * p, 0.0) * sc   # d lse / d s = p
    gq = (gs @ kh).transpose(0, 3, 1, 2, 4).reshape(B, Tq, HD)
    gk = (np.swapaxes(gs, -1, -2) @ qh).sum(axis=2)
    gk, gv = (x.transpose(0, 2, 1, 3).reshape(B, x.shape[2], KV * D) for x in (gk, gv))
    return (gq.astype(q.dtype), gk.astype(k.dtype), gv.astype(v.dtype), None, None)[:max(len(inputs), 3)]


def _attention_block_infer(shapes, dtypes, *, n_heads, n_kv_heads, block, blocks, query_block, causal, scale=None):
    q, k, v = shapes[:3]
    op = "attention_block"
    require(len(q) == 3 and len(k) == 3 and tuple(v) == tuple(k), op, f"q {q}, k {k}, v {v} must be (B, T, width)")
    require(n_heads % n_kv_heads == 0 and q[-1] % n_heads == 0, op, f"{n_heads} heads, {n_kv_heads} KV heads, width {q[-1]}")
    require(k[-1] == n_kv_heads * (q[-1] // n_heads) and k[0] == q[0], op, f"k {k} does not match q {q}")
    require(-1 <= block < blocks and 0 <= query_block < blocks, op, f"block {block} / query_block {query_block} of {blocks}")
    require(not (causal and block > query_block), op, f"causal: block {block} lies after the queries' block {query_block}")
    return [(tuple(q), dtypes[0]), ((q[0], n_heads, q[1]), dtypes[0])]


register("attention_block", attention_block, _attention_block_vjp, _attention_block_infer, n_optional=2,
         nondiff=(3, 4), vjp_uses_outputs=False)


def _merge_parts(xs, op="attention_merge"):
    if len(xs) % 2 or not xs:
        raise MinitxError(f"op {op}: takes pairs (output, log-sum-exp), got {len(xs)} inputs")
    return xs[0::2], xs[1::2]


def _merge_weights(lses):
    """Each block's share exp(lse_b − lse), lse = log Σ_b exp(lse_b); 0 where no block has a key."""
    L = np.stack([x.astype(np.float64) for x in lses])
    top = L.max(axis=0)
    safe = np.where(np.isfinite(top), top, 0.0)
    e = np.where(np.isfinite(L), np.exp(L - safe), 0.0)
    tot = e.sum(axis=0)
    return np.divide(e, tot, out=np.zeros_like(e), where=tot > 0)          # (blocks, B, H, T)


def _attention_merge(xs):
    outs, lses = _merge_parts(xs)
    w = _merge_weights(lses)
    B, T, HD = outs[0].shape
    H = lses[0].shape[1]
    total = sum(w[b].transpose(0, 2, 1)[..., None] * o.astype(np.float64).reshape(B, T, H, HD // H)
                for b, o in enumerate(outs))
    return np.asarray(total).reshape(B, T, HD).astype(outs[0].dtype)


def _attention_merge_vjp(grads, inputs, outputs):
    (g,) = grads
    outs, lses = _merge_parts([x for x in inputs if x is not None])
    w = _merge_weights(lses)
    B, T, HD = outs[0].shape
    H = lses[0].shape[1]
    gh = g.astype(np.float64).reshape(B, T, H, HD // H)
    oh = [o.astype(np.float64).reshape(B, T, H, HD // H) for o in outs]
    whole = sum(w[b].transpose(0, 2, 1)[..., None] * oh[b] for b in range(len(outs)))
    res = []
    for b in range(len(outs)):
        wb = w[b].transpose(0, 2, 1)[..., None]                                # (B, T, H, 1)
        res.append((wb * gh).reshape(B, T, HD).astype(outs[b].dtype))
        res.append((wb[..., 0] * (gh * (oh[b] - whole)).sum(axis=-1)).transpose(0, 2, 1).astype(lses[b].dtype))
    return tuple(res)


def _attention_merge_infer(shapes, dtypes):
    present = _present(shapes)
    require(len(present) >= 2 and len(present) % 2 == 0, "attention_merge", f"needs (output, lse) pairs, got {len(present)}")
    o = tuple(present[0])
    for k in range(0, len(present), 2):
        require(tuple(present[k]) == o and len(present[k + 1]) == 3 and present[k + 1][0] == o[0]
                and present[k + 1][2] == o[1], "attention_merge", f"pair {k // 2}: {present[k]}, {present[k + 1]} vs {o}")
    return [(o, dtypes[0])]


register("attention_merge", _variadic(_attention_merge, "The blocks' attention outputs combined by their log-sum-exps "
                                       "(the online softmax): the attention over all their keys."),
         _attention_merge_vjp, _attention_merge_infer, n_optional=MAX_RANKS - 1, vjp_uses_outputs=False)


def _block_case(Tq: int, Tk: int, block: int, query_block: int, causal: bool, pad: bool = False) -> Make:
    """q over one block of a 2-piece sequence (Tq = Tk tokens each, a cache of 3), 4 heads on 2 KV heads."""
    def make(r, d):
        B, H, KV, D, S = 2, 4, 2, 3, 3
        T = Tq + Tk if block != query_block else 2 * Tq
        mask = np.ones((B, S + T), np.int64)
        if pad:
            mask[1, :2] = 0
        n = S if block < 0 else Tk
        ins = (randn(r, (B, Tq, H * D), d), randn(r, (B, n, KV * D), d), randn(r, (B, n, KV * D), d), mask,
               randn(r, (B, S, KV * D), d))
        return ins, {"n_heads": H, "n_kv_heads": KV, "block": block, "blocks": 2, "query_block": query_block,
                     "causal": causal}
    return make


add_cases("attention_block", [
    Case("the queries' own block, causal", _block_case(3, 3, 1, 1, True)),
    Case("an earlier block, causal", _block_case(3, 3, 0, 1, True)),
    Case("the cache block, padded", _block_case(3, 3, -1, 0, True, pad=True), "masked"),
    Case("a later block, bidirectional", _block_case(3, 3, 1, 0, False)),
])


def _merge_case(blocks: int, dead: bool = False) -> Make:
    def make(r, d):
        xs = []
        for b in range(blocks):
            lse = randn(r, (2, 4, 5), d)
            if dead and b == 0:
                lse[:, :, 0] = -np.inf
            xs += [randn(r, (2, 5, 12), d), lse]
        return tuple(xs), {}
    return make


add_cases("attention_merge", [
    Case("3 blocks", _merge_case(3)),
    Case("one block", _merge_case(1), "batch"),
    Case("a block without keys for a query", _merge_case(2, dead=True), "masked"),
])

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "send_recv")
