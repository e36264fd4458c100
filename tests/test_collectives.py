"""The collective ops against their definitions, rank by rank, and their VJPs against finite
differences (float64), as tests/test_ops_grad.py does for every other op (it imports the
gradient check below to count these ops as covered)."""
from __future__ import annotations

import numpy as np
import pytest

from minitx import ops
from minitx.errors import MinitxError, ShapeError
from minitx.gradcheck import check_vjp
from minitx.ops import collectives as C

COLLECTIVE_OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "send_recv", "concat",
                  "chunk", "vocab_embedding", "vocab_cross_entropy", "inner",
                  "attention_block", "attention_merge")


def _xs(n, shape, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape) for _ in range(n)]


def _call(op, xs, **attrs):
    out = ops.get(op).forward(*xs, **attrs)
    return list(out) if isinstance(out, tuple) else [out]


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_each_rank_gets_what_the_definition_says(n):
    ranks = list(range(10, 10 + n))          # group ids need not start at 0
    xs = _xs(n, (2, 3, 4 * n), seed=n)
    total = xs[0].copy()
    for x in xs[1:]:
        total = total + x
    for r, y in enumerate(_call("all_reduce", xs, ranks=ranks)):
        np.testing.assert_allclose(y, total, rtol=1e-14, atol=1e-14)
    for r, y in enumerate(_call("all_gather", xs, ranks=ranks, axis=1)):
        assert y.shape == (2, 3 * n, 4 * n)
        for s in range(n):
            np.testing.assert_array_equal(y[:, 3 * s:3 * (s + 1)], xs[s])
    for r, y in enumerate(_call("reduce_scatter", xs, ranks=ranks, axis=-1)):
        np.testing.assert_allclose(y, total[..., 4 * r:4 * (r + 1)], rtol=1e-14, atol=1e-14)
    for r, y in enumerate(_call("all_to_all", xs, ranks=ranks, split_axis=2, concat_axis=0)):
        assert y.shape == (2 * n, 3, 4)
        for s in range(n):
            np.testing.assert_array_equal(y[2 * s:2 * (s + 1)], xs[s][..., 4 * r:4 * (r + 1)])
    root = ranks[-1]
    for y in _call("broadcast", xs, ranks=ranks, root=root):
        np.testing.assert_array_equal(y, xs[-1])


def test_all_to_all_undoes_itself_with_the_axes_swapped():
    xs = _xs(3, (6, 9))
    there = _call("all_to_all", xs, ranks=[0, 1, 2], split_axis=1, concat_axis=0)
    back = _call("all_to_all", there, ranks=[0, 1, 2], split_axis=0, concat_axis=1)
    for a, b in zip(xs, back):
        np.testing.assert_array_equal(a, b)


def test_vocab_embedding_shards_sum_to_the_full_lookup():
    rng = np.random.default_rng(1)
    table = rng.standard_normal((10, 4))
    padded = np.concatenate([table, np.zeros((2, 4))])      # 10 rows padded to 12 for 3 shards
    ids = np.array([[0, 3, 9, 4], [8, 7, 1, 5]])
    parts = [ops.get("vocab_embedding").forward(ids, padded[4 * t:4 * (t + 1)], start=4 * t) for t in range(3)]
    np.testing.assert_allclose(sum(parts), table[ids], rtol=1e-14)


# (op, inputs, attrs): one small case per op; float64 so that finite differences are exact enough.
def _grad_cases():
    r = [3, 5, 7]
    x3 = _xs(3, (2, 6), seed=2)
    return [
        ("all_reduce", x3, {"ranks": r}),
        ("all_gather", x3, {"ranks": r, "axis": 0}),
        ("reduce_scatter", x3, {"ranks": r, "axis": 1}),
        ("all_to_all", x3, {"ranks": r, "split_axis": 1, "concat_axis": 0}),
        ("broadcast", x3, {"ranks": r, "root": 5}),
        ("send_recv", x3[:1], {"src": 0, "dst": 1}),
        ("concat", [x3[0], x3[1][:, :2]], {"axis": 1}),
        ("chunk", _xs(1, (5, 3), 4), {"axis": 0, "n": 2}),
        ("vocab_embedding", [np.array([[0, 4, 5, 2, 4]]), _xs(1, (3, 4), 3)[0]], {"start": 2}),
        ("vocab_cross_entropy", [*_xs(3, (2, 3, 4), 5), np.array([[0, 11, 5], [9, -100, 7]])],
         {"ranks": r, "vocab": 10}),
        ("inner", _xs(2, (3, 4), 6), {}),
        ("attention_block", [*_xs(3, (2, 3, 8), 7), np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 1]])], {"n_heads": 4, "n_kv_heads": 4, "block": 1, "blocks": 2,
                                                    "query_block": 1, "causal": True}),
        ("attention_merge", [_xs(1, (2, 3, 8), 8)[0], _xs(1, (2, 2, 3), 9)[0], _xs(1, (2, 3, 8), 10)[0],
                             _xs(1, (2, 2, 3), 11)[0]], {}),
    ]


@pytest.mark.parametrize("case", _grad_cases(), ids=lambda c: c[0])
def test_collective_vjps_match_finite_differences(case):
    op, xs, attrs = case
    results = check_vjp(op, xs, attrs)
    assert len(results) == sum(1 for x in xs if np.issubdtype(x.dtype, np.floating))


def test_grad_cases_cover_every_op_of_the_module():
    assert {c[0] for c in _grad_cases()} == set(COLLECTIVE_OPS)
    assert set(C.COLLECTIVES) < set(COLLECTIVE_OPS)


def test_a_wrong_vjp_is_caught():
    """The gradient check can fail: an all-gather VJP that forgets the other ranks' cotangents."""
    op, xs, attrs = _grad_cases()[1]

    def wrong(grads, inputs, outputs, **a):
        return tuple(np.split(g, 3, axis=0)[k] for k, g in enumerate(grads))

    with pytest.raises(AssertionError, match="all_gather"):
        check_vjp(op, xs, attrs, vjp=wrong)


def test_shapes_for_every_rank_or_one_rank():
    spec = ops.get("all_gather")
    pad = [None] * (C.MAX_RANKS - 2)
    assert spec.infer([(2, 3), (2, 3), *pad], ["float32"] * C.MAX_RANKS, ranks=[0, 1], axis=-1) == [
        ((2, 6), "float32")] * 2
    one = spec.infer([(2, 3), None, *pad], ["float32"] * C.MAX_RANKS, ranks=[0, 1], axis=-1)
    assert one == [((2, 6), "float32")]
    # 3 columns on 2 ranks: 2 + 1, as chunk cuts them
    assert ops.get("reduce_scatter").infer([(2, 3), (2, 3), *pad], ["float32"] * C.MAX_RANKS, ranks=[0, 1], axis=1) == [
        ((2, 2), "float32"), ((2, 1), "float32")]
    with pytest.raises(ShapeError, match="reduce_scatter"):
        ops.get("reduce_scatter").infer([(2, 3), (2, 4), *pad], ["float32"] * C.MAX_RANKS, ranks=[0, 1], axis=1)


def test_the_spec_cannot_run_one_ranks_part_alone():
    with pytest.raises(MinitxError, match="needs a transport"):
        ops.get("all_reduce").forward(np.ones(3), ranks=[0, 1])
    with pytest.raises(MinitxError, match="needs a transport"):
        ops.get("send_recv").forward(None, src=0, dst=1)


def test_chunk_cuts_micro_batches_and_concat_joins_them():
    x = np.arange(10.0).reshape(5, 2)
    pieces = _call("chunk", [x], axis=0, n=3)
    assert [p.shape[0] for p in pieces] == [2, 2, 1]
    np.testing.assert_array_equal(ops.get("concat").forward(*pieces, axis=0), x)
    with pytest.raises(MinitxError, match="cannot be cut into 6"):
        ops.get("chunk").forward(x, axis=0, n=6, nonempty=True)
    assert [p.shape[0] for p in _call("chunk", [x], axis=0, n=6)] == [1, 1, 1, 1, 1, 0]


def test_uneven_pieces_gather_and_exchange():
    """A sequence of 5 tokens on 2 ranks (3 + 2): all-gather joins them, all-to-all over heads
    gives each rank all 5 tokens of its heads, and back."""
    x = np.arange(5 * 4.0).reshape(1, 5, 4)
    xs = np.array_split(x, 2, axis=1)
    for y in _call("all_gather", xs, ranks=[0, 1], axis=1):
        np.testing.assert_array_equal(y, x)
    heads = _call("all_to_all", xs, ranks=[0, 1], split_axis=2, concat_axis=1)
    np.testing.assert_array_equal(heads[1], x[..., 2:])
    back = _call("all_to_all", heads, ranks=[0, 1], split_axis=1, concat_axis=2)
    for a, b in zip(back, xs):
        np.testing.assert_array_equal(a, b)
    check_vjp("all_to_all", [a.astype(np.float64) for a in xs], {"ranks": [0, 1], "split_axis": 2, "concat_axis": 1})
    check_vjp("all_gather", [a.astype(np.float64) for a in xs], {"ranks": [0, 1], "axis": 1})


def test_vocab_cross_entropy_of_the_shards_is_the_full_cross_entropy():
    """Megatron's vocabulary-parallel loss against the plain cross-entropy of the whole logits
    (padding columns beyond the vocabulary ignored), value and gradient, for 1 to 4 shards."""
    rng = np.random.default_rng(3)
    V = 10
    full = rng.standard_normal((2, 5, V)) * 3
    t = rng.integers(0, V, (2, 5))
    t[1, 2] = -100
    want = ops.get("cross_entropy").forward(full, t)
    (gwant, _) = ops.get("cross_entropy").vjp((np.float64(1.0),), (full, t), None)
    for n in (1, 2, 3, 4):
        cols = -(-V // n)
        padded = np.concatenate([full, np.full((2, 5, cols * n - V), 50.0)], axis=-1)   # padding must not count
        shards = [padded[..., k * cols:(k + 1) * cols] for k in range(n)]
        got = _call("vocab_cross_entropy", [*shards, t], ranks=list(range(n)), vocab=V)
        for y in got:
            np.testing.assert_allclose(y, want, rtol=1e-12)
        cot = [np.float64(1.0)] + [np.float64(0.0)] * (n - 1)          # one rank seeds the backward pass
        g = ops.get("vocab_cross_entropy").vjp(tuple(cot), (*shards, t), None, ranks=list(range(n)), vocab=V)
        np.testing.assert_allclose(np.concatenate(g[:n], axis=-1)[..., :V], gwant, rtol=1e-10, atol=1e-14)
        assert not np.concatenate(g[:n], axis=-1)[..., V:].any()


def test_inner_seeds_a_backward_pass_with_a_given_cotangent():
    x, g = _xs(2, (2, 3), seed=9)
    assert float(ops.get("inner").forward(x, g)) == pytest.approx(float((x * g).sum()))
    dx, _ = ops.get("inner").vjp((np.float64(1.0),), (x, g), None)
    np.testing.assert_array_equal(dx, g)


def test_ring_blocks_merge_into_the_whole_attention():
    """attention_block over a cache block and three pieces of 7 new tokens (3 + 2 + 2), merged by
    attention_merge, is the attention op over all keys — causal (blocks up to the queries' own) and
    bidirectional, grouped-query, with padding in the cache."""
    rng = np.random.default_rng(4)
    B, H, KV, D, S, T, N = 2, 4, 2, 3, 3, 7, 3
    q, k, v = (rng.standard_normal((B, T, w)) for w in (H * D, KV * D, KV * D))
    pk, pv = rng.standard_normal((B, S, KV * D)), rng.standard_normal((B, S, KV * D))
    mask = np.ones((B, S + T), np.int64)
    mask[1, :2] = 0
    for causal in (True, False):
        want = ops.get("attention").forward(q, k, v, pk, pv, mask, n_heads=H, n_kv_heads=KV, causal=causal)[0]
        qs, ks, vs = (np.array_split(x, N, axis=1) for x in (q, k, v))
        got = []
        for r in range(N):
            attrs = {"n_heads": H, "n_kv_heads": KV, "blocks": N, "query_block": r, "causal": causal}
            parts = list(ops.get("attention_block").forward(qs[r], pk, pv, mask, pk, block=-1, **attrs))
            for b in range(N):
                if not (causal and b > r):
                    parts += ops.get("attention_block").forward(qs[r], ks[b], vs[b], mask, pk, block=b, **attrs)
            got.append(ops.get("attention_merge").forward(*parts))
        np.testing.assert_allclose(np.concatenate(got, axis=1), want, rtol=1e-12, atol=1e-13)
    with pytest.raises(MinitxError, match="lies after the queries' block"):
        ops.get("attention_block").forward(qs[0], ks[1], vs[1], mask, pk, n_heads=H, n_kv_heads=KV, block=1,
                                           blocks=N, query_block=0, causal=True)


def test_reduce_scatter_of_uneven_pieces():
    """5 tokens on 2 ranks: the sum's 3 + 2 pieces; the VJP (all-gather of the pieces) checks out."""
    xs = _xs(2, (1, 5, 4), seed=12)
    got = _call("reduce_scatter", xs, ranks=[0, 1], axis=1)
    assert [g.shape[1] for g in got] == [3, 2]
    np.testing.assert_allclose(np.concatenate(got, axis=1), xs[0] + xs[1], rtol=1e-14)
    check_vjp("reduce_scatter", xs, {"ranks": [0, 1], "axis": 1})
