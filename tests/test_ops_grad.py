"""Gradient checks for every op in the spec registry (minitx.ops.OPS).

Each test draws small random shapes and attributes with hypothesis, builds float64 inputs from a
drawn seed and calls :func:`minitx.gradcheck.check_vjp`, which compares the op's VJP with central
finite differences. Every test declares the ops it checks with ``@covers(...)``; the registry
test at the bottom fails when an op is registered without a gradient check here.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from minitx import ops
from minitx.gradcheck import check_vjp

# op name -> names of the test functions in this file that gradient-check it
COVERED: dict[str, list[str]] = {}


def covers(*names: str):
    def deco(fn):
        for name in names:
            COVERED.setdefault(name, []).append(fn.__name__)
        return fn

    return deco


# database=None: no example database to replay or grow; deadline=None: timings on slow CI vary.
FAST = settings(max_examples=30, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=10, deadline=None, database=None,
               suppress_health_check=[HealthCheck.too_slow])

seeds = st.integers(0, 2**31 - 1)
small = st.integers(1, 3)


def _rng(seed):
    return np.random.default_rng(seed)


def _away_from_zero(rng, shape, margin=0.05):
    """Normal draws pushed away from 0 so that kinks (relu) are not within the FD step."""
    x = rng.standard_normal(shape)
    return np.sign(x + (x == 0)) * (np.abs(x) + margin)


def _check(op, inputs, attrs=None, *, seed=0, **tolerances):
    results = check_vjp(op, inputs, attrs, seed=seed, **tolerances)
    n_float = sum(
        1 for i, x in enumerate(inputs)
        if x is not None and i not in ops.get(op).nondiff and np.issubdtype(np.asarray(x).dtype, np.floating)
    )
    # check_vjp really looked at every differentiable input.
    assert len(results) == n_float
    return results


def _vjp(op, inputs, attrs=None, seed=0):
    spec = ops.get(op)
    attrs = dict(attrs or {})
    out = spec.forward(*inputs, **attrs)
    outs = out if isinstance(out, tuple) else (out,)
    rng = _rng(seed)
    cots = tuple(rng.standard_normal(np.shape(y)) for y in outs)
    grads = spec.vjp(cots, tuple(inputs), outs, **attrs)
    assert len(grads) == len(inputs)
    return grads


# ------------------------------------------------------------------------------------ linalg

@covers("linear")
@FAST
@given(seed=seeds, lead=st.lists(st.integers(1, 3), min_size=1, max_size=3),
       n_in=st.integers(1, 5), n_out=st.integers(1, 5), with_bias=st.booleans())
def test_linear_grad(seed, lead, n_in, n_out, with_bias):
    rng = _rng(seed)
    x = rng.standard_normal((*lead, n_in))
    w = rng.standard_normal((n_in, n_out))
    b = rng.standard_normal(n_out) if with_bias else None
    _check("linear", [x, w, b], seed=seed)
    grads = _vjp("linear", [x, w, b])
    assert (grads[2] is None) == (b is None)


@covers("matmul")
@FAST
@given(seed=seeds, m=small, k=small, n=small, transpose_b=st.booleans(),
       batching=st.sampled_from(["none", "both", "a_only", "b_only", "stretch"]))
def test_matmul_grad(seed, m, k, n, transpose_b, batching):
    rng = _rng(seed)
    a_batch, b_batch = {
        "none": ((), ()),
        "both": ((2,), (2,)),
        "a_only": ((2, 2), ()),       # b broadcast over a's batch axes
        "b_only": ((), (3,)),          # a broadcast over b's batch axis
        "stretch": ((2, 1), (3,)),     # size-1 axis stretched and a missing axis added
    }[batching]
    a = rng.standard_normal((*a_batch, m, k))
    b = rng.standard_normal((*b_batch, n, k) if transpose_b else (*b_batch, k, n))
    _check("matmul", [a, b], {"transpose_b": transpose_b}, seed=seed)


@covers("add")
@FAST
@given(seed=seeds, B=small, T=small, C=small,
       pattern=st.sampled_from(["same", "channel", "channel_left", "keepdims", "scalar_like"]))
def test_add_grad(seed, B, T, C, pattern):
    rng = _rng(seed)
    shape_a, shape_b = {
        "same": ((B, T, C), (B, T, C)),
        "channel": ((B, T, C), (C,)),          # (B,T,C) + (C,): bias-style broadcast
        "channel_left": ((C,), (B, T, C)),     # the smaller operand first
        "keepdims": ((B, T, C), (1, T, 1)),    # stretched size-1 axes
        "scalar_like": ((B, T, C), (1,)),
    }[pattern]
    _check("add", [rng.standard_normal(shape_a), rng.standard_normal(shape_b)], seed=seed)


@covers("embedding")
@FAST
@given(seed=seeds, B=small, T=st.integers(2, 4), V=st.integers(1, 5), C=small)
def test_embedding_grad(seed, B, T, V, C):
    rng = _rng(seed)
    ids = rng.integers(0, V, size=(B, T))
    ids[0, -1] = ids[0, 0]  # at least one repeated id: its row's gradient must accumulate
    table = rng.standard_normal((V, C))
    _check("embedding", [ids, table], seed=seed)
    assert _vjp("embedding", [ids, table])[0] is None


@covers("split")
@FAST
@given(seed=seeds, lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
       sizes=st.lists(st.integers(1, 4), min_size=1, max_size=4))
def test_split_grad(seed, lead, sizes):
    rng = _rng(seed)
    x = rng.standard_normal((*lead, sum(sizes)))
    _check("split", [x], {"sizes": sizes}, seed=seed)


@covers("last_positions")
@FAST
@given(seed=seeds, B=small, T=st.integers(1, 5), n=st.integers(1, 6), C=small)
def test_last_positions_grad(seed, B, T, n, C):
    x = _rng(seed).standard_normal((B, T, C))
    _check("last_positions", [x], {"n": n}, seed=seed)


# ------------------------------------------------------------------------------------- norms

@covers("layer_norm")
@FAST
@given(seed=seeds, lead=st.lists(st.integers(1, 3), min_size=1, max_size=2), C=st.integers(2, 6),
       eps=st.sampled_from([1e-5, 1e-2]))
def test_layer_norm_grad(seed, lead, C, eps):
    rng = _rng(seed)
    x = rng.standard_normal((*lead, C)) * 2 + 0.5
    _check("layer_norm", [x, rng.standard_normal(C), rng.standard_normal(C)], {"eps": eps}, seed=seed)


@covers("rms_norm")
@FAST
@given(seed=seeds, lead=st.lists(st.integers(1, 3), min_size=1, max_size=2), C=st.integers(1, 6),
       eps=st.sampled_from([1e-6, 1e-2]))
def test_rms_norm_grad(seed, lead, C, eps):
    rng = _rng(seed)
    x = rng.standard_normal((*lead, C)) * 2
    _check("rms_norm", [x, rng.standard_normal(C)], {"eps": eps}, seed=seed)


# ------------------------------------------------------------------------------- activations

@covers("gelu")
@FAST
@given(seed=seeds, shape=st.lists(st.integers(1, 4), min_size=1, max_size=3),
       approximate=st.sampled_from(["none", "tanh"]), spread=st.sampled_from([1.0, 4.0]))
def test_gelu_grad(seed, shape, approximate, spread):
    x = _rng(seed).standard_normal(shape) * spread
    _check("gelu", [x], {"approximate": approximate}, seed=seed)


@covers("relu")
@FAST
@given(seed=seeds, shape=st.lists(st.integers(1, 4), min_size=1, max_size=3))
def test_relu_grad(seed, shape):
    x = _away_from_zero(_rng(seed), shape)
    _check("relu", [x], seed=seed)


@covers("silu")
@FAST
@given(seed=seeds, shape=st.lists(st.integers(1, 4), min_size=1, max_size=3),
       spread=st.sampled_from([1.0, 6.0]))
def test_silu_grad(seed, shape, spread):
    _check("silu", [_rng(seed).standard_normal(shape) * spread], seed=seed)


@covers("swiglu")
@FAST
@given(seed=seeds, lead=st.lists(st.integers(1, 3), min_size=0, max_size=2), F=st.integers(1, 4))
def test_swiglu_grad(seed, lead, F):
    _check("swiglu", [_rng(seed).standard_normal((*lead, 2 * F)) * 2], seed=seed)


@covers("softmax")
@FAST
@given(seed=seeds, shape=st.lists(st.integers(1, 4), min_size=1, max_size=3), data=st.data())
def test_softmax_grad(seed, shape, data):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1), label="axis")
    x = _rng(seed).standard_normal(shape) * 3
    _check("softmax", [x], {"axis": axis}, seed=seed)


@covers("dropout")
@FAST
@given(seed=seeds, shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
       p=st.sampled_from([0.0, 0.1, 0.5, 0.9]), training=st.booleans(),
       drop_seed=st.integers(0, 1000), step=st.integers(0, 1000))
def test_dropout_grad(seed, shape, p, training, drop_seed, step):
    x = _rng(seed).standard_normal(shape)
    attrs = {"p": p, "seed": drop_seed, "training": training, "step": step}
    _check("dropout", [x], attrs, seed=seed)


# ---------------------------------------------------------------------------------- attention

def _padding_mask(rng, B, S, T, causal, kind):
    """(B, S+T) 0/1 mask in which every query row keeps at least one key causality allows.

    Query 0 (absolute position S) sees keys 0..S when causal, so a 1 must lie in 0..S then;
    without causality any position will do.
    """
    L = S + T
    reach = S + 1 if causal else L  # positions every query can see
    mask = np.ones((B, L), dtype=np.int64)
    for b in range(B):
        if kind == "left":
            mask[b, : rng.integers(0, reach)] = 0             # left padding, at most reach-1 pads
        elif kind == "right":
            n_pad = rng.integers(0, L)                      # at most L-1 pads: key 0 stays
            if n_pad:
                mask[b, L - n_pad:] = 0
        else:  # random holes, then one guaranteed visible key
            mask[b] = rng.integers(0, 2, size=L)
            mask[b, rng.integers(0, reach)] = 1
    return mask


attention_cases = st.fixed_dictionaries({
    "B": st.integers(1, 2),
    "T": st.integers(1, 3),
    "S": st.integers(0, 3),             # 0: no KV cache
    "n_kv_heads": st.integers(1, 2),
    "group": st.integers(1, 2),         # n_heads = n_kv_heads * group: MHA when 1, GQA otherwise
    "D": st.sampled_from([1, 2, 3]),
    "causal": st.booleans(),
    "mask": st.sampled_from([None, "left", "right", "random"]),
    "scale": st.sampled_from([None, 0.3]),
})


def _attention_inputs(rng, c):
    B, T, S, Hkv = c["B"], c["T"], c["S"], c["n_kv_heads"]
    H, D = Hkv * c["group"], c["D"]
    q = rng.standard_normal((B, T, H * D))
    k = rng.standard_normal((B, T, Hkv * D))
    v = rng.standard_normal((B, T, Hkv * D))
    pk = rng.standard_normal((B, S, Hkv * D)) if S else None
    pv = rng.standard_normal((B, S, Hkv * D)) if S else None
    mask = None if c["mask"] is None else _padding_mask(rng, B, S, T, c["causal"], c["mask"])
    attrs = {"n_heads": H, "n_kv_heads": Hkv, "causal": c["causal"]}
    if c["scale"] is not None:
        attrs["scale"] = c["scale"]
    return [q, k, v, pk, pv, mask], attrs


@covers("attention")
@settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=seeds, c=attention_cases)
def test_attention_grad(seed, c):
    inputs, attrs = _attention_inputs(_rng(seed), c)
    _check("attention", inputs, attrs, seed=seed)
    grads = _vjp("attention", inputs, attrs, seed=seed)
    assert grads[5] is None  # the mask is not differentiable
    assert (grads[3] is None) == (inputs[3] is None) and (grads[4] is None) == (inputs[4] is None)


def test_attention_padding_mask_strategy_keeps_a_visible_key():
    """The mask generator above must never produce a query row with no allowed key."""
    from minitx.ops.attention import allowed_keys

    rng = _rng(0)
    for _ in range(300):
        B, S, T = rng.integers(1, 3), rng.integers(0, 4), rng.integers(1, 4)
        causal = bool(rng.integers(0, 2))
        for kind in ("left", "right", "random"):
            mask = _padding_mask(rng, B, S, T, causal, kind)
            assert set(np.unique(mask)) <= {0, 1} and mask.shape == (B, S + T)
            assert allowed_keys(T, S + T, mask, causal, B).any(axis=-1).all()


def test_attention_grad_fully_masked_query_row():
    rng = _rng(1)
    B, T, H, D = 1, 3, 2, 2
    q, k, v = (rng.standard_normal((B, T, H * D)) for _ in range(3))
    mask = np.array([[0, 1, 1]])  # causal query 0 sees only key 0, which is padding
    check_vjp("attention", [q, k, v, None, None, mask], {"n_heads": H, "n_kv_heads": H, "causal": True})


# ----------------------------------------------------------------------------------- positions

@covers("rope")
@FAST
@given(seed=seeds, B=st.integers(1, 2), T=st.integers(1, 3), n_heads=st.integers(1, 2),
       half=st.integers(1, 3), theta=st.sampled_from([10000.0, 100.0]),
       positions=st.sampled_from(["arange", "offset", "random", "zeros"]))
def test_rope_grad(seed, B, T, n_heads, half, theta, positions):
    rng = _rng(seed)
    x = rng.standard_normal((B, T, n_heads * 2 * half))
    pos = {
        "arange": np.broadcast_to(np.arange(T), (B, T)).copy(),
        "offset": np.arange(T)[None, :] + rng.integers(0, 50, size=(B, 1)),  # KV-cache decode offsets
        "random": rng.integers(0, 2048, size=(B, T)),
        "zeros": np.zeros((B, T), dtype=np.int64),
    }[positions]
    _check("rope", [x, pos], {"n_heads": n_heads, "theta": theta}, seed=seed)
    assert _vjp("rope", [x, pos], {"n_heads": n_heads, "theta": theta})[1] is None


@covers("sinusoidal_positions")
@FEW
@given(seed=seeds, B=small, T=small, dim=st.integers(1, 8), extra=st.integers(0, 5))
def test_sinusoidal_positions_grad(seed, B, T, dim, extra):
    max_len = T + extra
    pos = _rng(seed).integers(0, max_len, size=(B, T))
    attrs = {"dim": dim, "max_len": max_len}
    # Nothing differentiable: check_vjp has no input to check, and the VJP says so.
    assert check_vjp("sinusoidal_positions", [pos], attrs, seed=seed) == []
    grads = _vjp("sinusoidal_positions", [pos], attrs)
    assert all(g is None for g in grads)


# -------------------------------------------------------------------------------------- losses

@covers("cross_entropy")
@FAST
@given(seed=seeds, lead=st.lists(st.integers(1, 3), min_size=1, max_size=2), V=st.integers(1, 5),
       ignore_frac=st.sampled_from([0.0, 0.3, 1.0]), ignore_index=st.sampled_from([-100, -1]))
def test_cross_entropy_grad(seed, lead, V, ignore_frac, ignore_index):
    rng = _rng(seed)
    logits = rng.standard_normal((*lead, V)) * 2
    targets = rng.integers(0, V, size=lead)
    targets[rng.random(lead) < ignore_frac] = ignore_index
    attrs = {} if ignore_index == -100 else {"ignore_index": ignore_index}
    _check("cross_entropy", [logits, targets], attrs, seed=seed)
    grads = _vjp("cross_entropy", [logits, targets], attrs)
    assert grads[1] is None
    # Ignored positions receive no gradient at all.
    assert np.all(grads[0][targets == ignore_index] == 0)


# ------------------------------------------------------------------------------------- pooling

@covers("mean_pool")
@FAST
@given(seed=seeds, B=small, T=st.integers(1, 4), C=small,
       padding=st.sampled_from(["none", "right", "left", "random"]))
def test_mean_pool_grad(seed, B, T, C, padding):
    rng = _rng(seed)
    x = rng.standard_normal((B, T, C))
    mask = np.ones((B, T), dtype=np.int64)
    for b in range(B):
        n_pad = rng.integers(0, T)
        if padding == "right" and n_pad:
            mask[b, -n_pad:] = 0
        elif padding == "left":
            mask[b, :n_pad] = 0
        elif padding == "random":
            mask[b] = rng.integers(0, 2, size=T)
    _check("mean_pool", [x, mask], seed=seed)
    grads = _vjp("mean_pool", [x, mask])
    assert grads[1] is None
    assert np.all(grads[0][mask == 0] == 0)  # padded tokens get no gradient


@covers("l2_normalize")
@FAST
@given(seed=seeds, lead=st.lists(st.integers(1, 3), min_size=0, max_size=2), C=st.integers(1, 5),
       regime=st.sampled_from(["normal", "clipped"]))
def test_l2_normalize_grad(seed, lead, C, regime):
    rng = _rng(seed)
    x = rng.standard_normal((*lead, C)) + 0.1
    if regime == "clipped":
        # Every row's norm well below eps: the op is x / eps there, a linear map.
        x = x / np.linalg.norm(x, axis=-1, keepdims=True) * 0.1
        attrs = {"eps": 2.0}
    else:
        attrs = {}
    _check("l2_normalize", [x], attrs, seed=seed)


# --------------------------------------------------------- low-rank, sparse and quantized ops

@covers("lowrank_linear")
@FAST
@given(seed=seeds, lead=st.lists(st.integers(1, 3), min_size=1, max_size=2), n_in=st.integers(1, 4),
       rank=st.integers(1, 3), n_out=st.integers(1, 4), with_bias=st.booleans())
def test_lowrank_linear_grad(seed, lead, n_in, rank, n_out, with_bias):
    rng = _rng(seed)
    x = rng.standard_normal((*lead, n_in))
    u, v = rng.standard_normal((n_in, rank)), rng.standard_normal((rank, n_out))
    b = rng.standard_normal(n_out) if with_bias else None
    _check("lowrank_linear", [x, u, v, b], seed=seed)
    assert (_vjp("lowrank_linear", [x, u, v, b])[3] is None) == (b is None)


@covers("nystrom_attention")
@FAST
@given(seed=seeds, c=attention_cases, n_landmarks=st.integers(1, 6))
def test_nystrom_attention_grad(seed, c, n_landmarks):
    c = {**c, "causal": False}  # Nyström attention is non-causal only
    inputs, attrs = _attention_inputs(_rng(seed), c)
    attrs["n_landmarks"] = n_landmarks
    # The output goes through pinv(softmax(Q̃ K̃ᵀ)). With nearly uniform softmax rows that matrix has
    # a condition number of 1e5-1e6, and the round-off it amplifies in the forward swamps any
    # finite-difference step (numeric and analytic then differ by ~1e-4 relative at every step
    # size), so such draws say nothing about the VJP: keep well-conditioned ones. Exactly zero
    # columns (landmarks whose keys are all padding) are fine: their rank never changes.
    from minitx.ops.lowrank import _nystrom_parts

    q, k, v, pk, pv, mask = inputs
    K = k if pk is None else np.concatenate([pk, k], axis=1)
    V = v if pv is None else np.concatenate([pv, v], axis=1)
    D = q.shape[-1] // attrs["n_heads"]
    A = _nystrom_parts(q, K, V, mask, attrs["n_heads"], attrs["n_kv_heads"], n_landmarks,
                       attrs.get("scale", 1.0 / np.sqrt(D)))["A"]
    sv = np.linalg.svd(A, compute_uv=False)
    sv = sv[sv.max(axis=-1) > 0]  # a zero matrix (a row of padding only) has pinv 0 whatever its size
    sv = np.where(sv > 1e-12 * sv.max(axis=-1, keepdims=True), sv, np.nan)
    assume(sv.size == 0 or np.nanmax(sv / np.nanmin(sv, axis=-1, keepdims=True)) < 1e4)
    _check("nystrom_attention", inputs, attrs, seed=seed, eps=1e-5, rtol=1e-4)
    grads = _vjp("nystrom_attention", inputs, attrs, seed=seed)
    assert grads[5] is None and (grads[3] is None) == (inputs[3] is None)


sparse_patterns = st.sampled_from([
    {"pattern": "dense"},
    {"pattern": "local", "window": 2},
    {"pattern": "block", "block": 2, "n_global": 1},
    {"pattern": "strided", "stride": 2},
    {"pattern": "topk", "topk": 2},
    {"pattern": "threshold", "threshold": 0.3},
    {"pattern": "local", "window": 1, "dense_below": 3},
])


@covers("sparse_attention")
@FAST
@given(seed=seeds, c=attention_cases, pattern=sparse_patterns)
def test_sparse_attention_grad(seed, c, pattern):
    inputs, attrs = _attention_inputs(_rng(seed), c)
    attrs.update(pattern)
    _check("sparse_attention", inputs, attrs, seed=seed)
    grads = _vjp("sparse_attention", inputs, attrs, seed=seed)
    assert grads[5] is None and (grads[3] is None) == (inputs[3] is None)


@covers("sparse_linear")
@FAST
@given(seed=seeds, lead=st.lists(st.integers(1, 3), min_size=1, max_size=2), n_in=st.integers(1, 5),
       n_out=st.integers(1, 4), density=st.sampled_from([0.0, 0.3, 0.7, 1.0]), with_bias=st.booleans())
def test_sparse_linear_grad(seed, lead, n_in, n_out, density, with_bias):
    import scipy.sparse

    rng = _rng(seed)
    wt = rng.standard_normal((n_out, n_in)) * (rng.random((n_out, n_in)) < density)
    csr = scipy.sparse.csr_array(wt)
    data, indices, indptr = csr.data.astype(np.float64), csr.indices.astype(np.int64), csr.indptr.astype(np.int64)
    x = rng.standard_normal((*lead, n_in))
    b = rng.standard_normal(n_out) if with_bias else None
    attrs = {"shape": (n_out, n_in)}
    _check("sparse_linear", [x, data, indices, indptr, b, None], attrs, seed=seed)
    q = rng.integers(-127, 128, data.shape).astype(np.int8)   # quantized: the scale per output learns
    _check("sparse_linear", [x, q, indices, indptr, b, rng.random(n_out) + 0.5], attrs, seed=seed)
    grads = _vjp("sparse_linear", [x, data, indices, indptr, b, None], attrs)
    assert grads[2] is None and grads[3] is None


@covers("nm_linear")
@FAST
@given(seed=seeds, lead=st.lists(st.integers(1, 3), min_size=1, max_size=2),
       nm=st.sampled_from([(2, 4), (1, 2), (1, 4), (3, 8), (2, 2)]), groups=st.integers(1, 3),
       n_out=st.integers(1, 3), with_bias=st.booleans())
def test_nm_linear_grad(seed, lead, nm, groups, n_out, with_bias):
    from minitx.ops.sparse import pack_positions

    n, m = nm
    rng = _rng(seed)
    in_features = m * groups
    # n distinct positions in every group of m inputs, for every output
    pos = np.stack([np.concatenate([np.sort(rng.choice(m, n, replace=False)) for _ in range(groups)])
                    for _ in range(n_out)], axis=1)                        # (K, out): input-major
    idx = pack_positions(pos, m)
    values = rng.standard_normal((groups * n, n_out))
    x = rng.standard_normal((*lead, in_features))
    b = rng.standard_normal(n_out) if with_bias else None
    attrs = {"n": n, "m": m, "in_features": in_features}
    _check("nm_linear", [x, values, idx, b, None], attrs, seed=seed)
    assert _vjp("nm_linear", [x, values, idx, b, None], attrs)[2] is None
    # quantized: integer values, the gradient goes to the scale per output
    _check("nm_linear", [x, rng.integers(-127, 128, values.shape).astype(np.int8), idx, b, rng.random(n_out) + 0.5],
           attrs, seed=seed)


@covers("linear_q8")
@FAST
@given(seed=seeds, lead=st.lists(st.integers(1, 3), min_size=1, max_size=2), n_in=st.integers(1, 4),
       n_out=st.integers(1, 4), transposed=st.booleans(), with_bias=st.booleans())
def test_linear_q8_grad(seed, lead, n_in, n_out, transposed, with_bias):
    rng = _rng(seed)
    w = rng.integers(-127, 128, size=(n_out, n_in) if transposed else (n_in, n_out)).astype(np.int8)
    x = rng.standard_normal((*lead, n_in))
    scale = rng.uniform(0.001, 0.02, n_out)
    b = rng.standard_normal(n_out) if with_bias else None
    attrs = {"transposed": transposed}
    _check("linear_q8", [x, w, scale, b], attrs, seed=seed)
    assert _vjp("linear_q8", [x, w, scale, b], attrs)[1] is None


@covers("embedding_q8")
@FAST
@given(seed=seeds, B=small, T=st.integers(2, 4), V=st.integers(1, 5), C=small)
def test_embedding_q8_grad(seed, B, T, V, C):
    rng = _rng(seed)
    ids = rng.integers(0, V, size=(B, T))
    ids[0, -1] = ids[0, 0]  # a repeated id
    table = rng.integers(-127, 128, size=(V, C)).astype(np.int8)
    scale = rng.uniform(0.001, 0.02, V)
    _check("embedding_q8", [ids, table, scale], seed=seed)
    assert _vjp("embedding_q8", [ids, table, scale])[:2] == (None, None)


@covers("linear_q8_block")
@FAST
@given(seed=seeds, lead=st.lists(st.integers(1, 3), min_size=1, max_size=2), block=st.integers(1, 3),
       n_blocks=st.integers(1, 3), n_out=st.integers(1, 3), with_bias=st.booleans())
def test_linear_q8_block_grad(seed, lead, block, n_blocks, n_out, with_bias):
    rng = _rng(seed)
    n_in = block * n_blocks
    w = rng.integers(-127, 128, size=(n_in, n_out)).astype(np.int8)
    scale = rng.uniform(0.001, 0.02, (n_blocks, n_out))
    x = rng.standard_normal((*lead, n_in))
    b = rng.standard_normal(n_out) if with_bias else None
    _check("linear_q8_block", [x, w, scale, b], {"block": block}, seed=seed)


@covers("linear_q4")
@FAST
@given(seed=seeds, lead=st.lists(st.integers(1, 3), min_size=1, max_size=2), group=st.sampled_from([2, 4]),
       n_groups=st.integers(1, 3), n_out=st.integers(1, 3), with_bias=st.booleans())
def test_linear_q4_grad(seed, lead, group, n_groups, n_out, with_bias):
    from minitx.ops.quant import quantize_int4

    rng = _rng(seed)
    n_in = group * n_groups
    w, scale = quantize_int4(rng.standard_normal((n_in, n_out)), group)
    x = rng.standard_normal((*lead, n_in))
    b = rng.standard_normal(n_out) if with_bias else None
    _check("linear_q4", [x, w, scale.astype(np.float64), b], {"group": group}, seed=seed)


@covers("linear_q4")
@FEW
@given(seed=seeds, lead=st.lists(st.integers(1, 3), min_size=1, max_size=2), group=st.sampled_from([2, 4]),
       n_groups=st.integers(1, 3), n_out=st.integers(1, 3), with_bias=st.booleans())
def test_linear_q4_transposed_grad(seed, lead, group, n_groups, n_out, with_bias):
    from minitx.ops.quant import quantize_int4_rows

    rng = _rng(seed)
    n_in = group * n_groups
    w, scale = quantize_int4_rows(rng.standard_normal((n_out, n_in)), group)  # (out, in/2), (out, in/group)
    x = rng.standard_normal((*lead, n_in))
    b = rng.standard_normal(n_out) if with_bias else None
    attrs = {"group": group, "transposed": True}
    _check("linear_q4", [x, w, scale.astype(np.float64), b], attrs, seed=seed)
    assert _vjp("linear_q4", [x, w, scale.astype(np.float64), b], attrs)[1] is None


@covers("linear_lut")
@FEW
@given(seed=seeds, lead=st.lists(st.integers(1, 3), min_size=1, max_size=2),
       cb=st.sampled_from(["binary", "ternary", "int2", "log4"]), n_groups=st.integers(1, 2),
       n_out=st.integers(1, 3), with_bias=st.booleans())
def test_linear_lut_grad(seed, lead, cb, n_groups, n_out, with_bias):
    from minitx.ops.quant import quantize_lut

    rng = _rng(seed)
    n_in = 8 * n_groups
    w, scale = quantize_lut(rng.standard_normal((n_out, n_in)), cb, 8)   # (out, in·bits/8), (out, in/8)
    x = rng.standard_normal((*lead, n_in))
    b = rng.standard_normal(n_out) if with_bias else None
    attrs = {"codebook": cb, "group": 8}
    _check("linear_lut", [x, w, scale.astype(np.float64), b], attrs, seed=seed)
    assert _vjp("linear_lut", [x, w, scale.astype(np.float64), b], attrs)[1] is None


@covers("embedding_q4")
@FAST
@given(seed=seeds, B=small, T=st.integers(2, 4), V=st.integers(1, 5), group=st.sampled_from([2, 4]),
       n_groups=small)
def test_embedding_q4_grad(seed, B, T, V, group, n_groups):
    from minitx.ops.quant import quantize_int4_rows

    rng = _rng(seed)
    ids = rng.integers(0, V, size=(B, T))
    ids[0, -1] = ids[0, 0]  # a repeated id
    table, scale = quantize_int4_rows(rng.standard_normal((V, group * n_groups)), group)
    _check("embedding_q4", [ids, table, scale.astype(np.float64)], {"group": group}, seed=seed)
    assert _vjp("embedding_q4", [ids, table, scale.astype(np.float64)], {"group": group})[:2] == (None, None)


def _far_from_rounding(rng, shape):
    """Rows whose symmetric int8 quantization (s = max|row| / 127) is far from every rounding edge.

    Each row is (integer + offset) · s with |offset| <= 0.3 and |integer| <= 120, and one element is
    exactly ±127 s (the unique max), so a finite-difference step never flips a round().
    """
    *lead, n = shape
    s = rng.uniform(0.005, 0.02, (*lead, 1))
    q = rng.integers(-120, 121, size=shape) + rng.uniform(-0.3, 0.3, size=shape)
    j = rng.integers(0, n, size=(*lead, 1))
    np.put_along_axis(q, j, rng.choice([-127.0, 127.0], size=(*lead, 1)), axis=-1)
    return q * s


@covers("linear_w8a8")
@FAST
@given(seed=seeds, lead=st.lists(st.integers(1, 3), min_size=1, max_size=2), n_in=st.integers(1, 4),
       n_out=st.integers(1, 4), with_bias=st.booleans())
def test_linear_w8a8_grad(seed, lead, n_in, n_out, with_bias):
    rng = _rng(seed)
    x = _far_from_rounding(rng, (*lead, n_in))
    w = rng.integers(-127, 128, size=(n_in, n_out)).astype(np.int8)
    scale = rng.uniform(0.001, 0.02, n_out)
    b = rng.standard_normal(n_out) if with_bias else None
    _check("linear_w8a8", [x, w, scale, b], seed=seed)


@covers("linear_cast")
@FAST
@given(seed=seeds, lead=st.lists(st.integers(1, 3), min_size=1, max_size=2), n_in=st.integers(1, 4),
       n_out=st.integers(1, 4), storage=st.sampled_from(["float16", "bfloat16"]), with_bias=st.booleans(),
       transposed=st.booleans())
def test_linear_cast_grad(seed, lead, n_in, n_out, storage, with_bias, transposed):
    from minitx.ops.quant import to_bfloat16_bits

    rng = _rng(seed)
    w32 = rng.standard_normal((n_out, n_in) if transposed else (n_in, n_out)).astype(np.float32)
    w = w32.astype(np.float16) if storage == "float16" else to_bfloat16_bits(w32)
    x = rng.standard_normal((*lead, n_in))
    b = rng.standard_normal(n_out) if with_bias else None
    _check("linear_cast", [x, w, b], {"transposed": transposed}, seed=seed)
    assert (_vjp("linear_cast", [x, w, b], {"transposed": transposed})[1] is None) == (storage == "bfloat16")


@covers("attention_kv8")
@FAST
@given(seed=seeds, c=attention_cases)
def test_attention_kv8_grad(seed, c):
    from minitx.ops.quant import quantize_heads

    rng = _rng(seed)
    (q, k, v, pk, pv, mask), attrs = _attention_inputs(rng, c)
    B, T, S, Hkv, D = c["B"], c["T"], c["S"], c["n_kv_heads"], c["D"]
    # new keys/values quantized per token and head: keep them away from rounding edges
    k = _far_from_rounding(rng, (B, T, Hkv, D)).reshape(B, T, Hkv * D)
    v = _far_from_rounding(rng, (B, T, Hkv, D)).reshape(B, T, Hkv * D)
    pkq = pks = pvq = pvs = None
    if S:
        pkq, pks = quantize_heads(pk, Hkv)
        pvq, pvs = quantize_heads(pv, Hkv)
    inputs = [q, k, v, pkq, pks, pvq, pvs, mask]
    # The cache scales' gradients are ~127x the activations' (each multiplies an int8 value), so
    # the loss, and its finite-difference round-off, is that much larger: a 1e-6 absolute slack.
    _check("attention_kv8", inputs, attrs, seed=seed, atol=1e-6)
    grads = _vjp("attention_kv8", inputs, attrs, seed=seed)
    assert grads[3] is None and grads[5] is None and grads[7] is None


@covers("sparse_attention_kv8")
@FAST
@given(seed=seeds, c=attention_cases, pattern=sparse_patterns)
def test_sparse_attention_kv8_grad(seed, c, pattern):
    """attention_kv8's gradient check with a pattern (its quantization VJP, sparse_attention's)."""
    from minitx.ops.quant import quantize_heads

    rng = _rng(seed)
    (q, k, v, pk, pv, mask), attrs = _attention_inputs(rng, c)
    B, T, S, Hkv, D = c["B"], c["T"], c["S"], c["n_kv_heads"], c["D"]
    k = _far_from_rounding(rng, (B, T, Hkv, D)).reshape(B, T, Hkv * D)
    v = _far_from_rounding(rng, (B, T, Hkv, D)).reshape(B, T, Hkv * D)
    pkq, pks = quantize_heads(pk, Hkv) if S else (None, None)
    pvq, pvs = quantize_heads(pv, Hkv) if S else (None, None)
    _check("sparse_attention_kv8", [q, k, v, pkq, pks, pvq, pvs, mask], {**attrs, **pattern}, seed=seed, atol=1e-6)


# -------------------------------------------------------------------------------- distillation

@covers("kl_div")
@FAST
@given(seed=seeds, lead=st.lists(st.integers(1, 3), min_size=1, max_size=2), V=st.integers(1, 5),
       temperature=st.sampled_from([0.5, 1.0, 2.0, 4.0]))
def test_kl_div_grad(seed, lead, V, temperature):
    rng = _rng(seed)
    logits, target = rng.standard_normal((*lead, V)) * 2, rng.standard_normal((*lead, V)) * 2
    _check("kl_div", [logits, target], {"temperature": temperature}, seed=seed)
    # At the minimum (student = teacher) both gradients vanish.
    g = _vjp("kl_div", [target, target], {"temperature": temperature})
    assert np.allclose(g[0], 0, atol=1e-12) and np.allclose(g[1], 0, atol=1e-12)
    # Masked positions get no gradient; the others are checked against finite differences.
    mask = rng.integers(0, 2, lead)
    _check("kl_div", [logits, target, mask], {"temperature": temperature}, seed=seed)
    g = _vjp("kl_div", [logits, target, mask], {"temperature": temperature})
    assert np.all(g[0][mask == 0] == 0) and np.all(g[1][mask == 0] == 0) and g[2] is None


@covers("mse")
@FAST
@given(seed=seeds, shape=st.lists(st.integers(1, 4), min_size=1, max_size=3))
def test_mse_grad(seed, shape):
    rng = _rng(seed)
    _check("mse", [rng.standard_normal(shape), rng.standard_normal(shape)], seed=seed)


@covers("prob_kl")
@FAST
@given(seed=seeds, lead=st.lists(st.integers(1, 3), min_size=1, max_size=3), V=st.integers(1, 5))
def test_prob_kl_grad(seed, lead, V):
    rng = _rng(seed)
    # Positive entries (t log t has no derivative at t = 0); any positive arrays, not only distributions.
    p = rng.random((*lead, V)) + 0.05
    t = rng.random((*lead, V)) + 0.05
    _check("prob_kl", [p, t], seed=seed)


def test_prob_kl_zero_target_entries_get_no_gradient():
    p = np.array([[0.2, 0.3, 0.5], [0.0, 0.4, 0.6]])
    t = np.array([[0.0, 0.5, 0.5], [0.0, 0.25, 0.75]])
    gp, gt = _vjp("prob_kl", [p, t])
    assert np.all(gp[t == 0] == 0) and np.all(gt[t == 0] == 0) and np.all(np.isfinite(gp))


@covers("attention_probs")
@FAST
@given(seed=seeds, c=attention_cases, average=st.booleans())
def test_attention_probs_grad(seed, c, average):
    (q, k, v, pk, pv, mask), attrs = _attention_inputs(_rng(seed), c)
    if pk is not None:   # the maps are over all S + T keys (the mask already covers them)
        k = np.concatenate([pk, k], axis=1)
    attrs["n_maps"] = 1 if average else attrs["n_heads"]
    _check("attention_probs", [q, k, mask], attrs, seed=seed)
    assert _vjp("attention_probs", [q, k, mask], attrs, seed=seed)[2] is None


@covers("scale")
@FAST
@given(seed=seeds, shape=st.lists(st.integers(1, 3), min_size=0, max_size=3),
       factor=st.sampled_from([-1.5, 0.0, 0.25, 3.0]))
def test_scale_grad(seed, shape, factor):
    _check("scale", [_rng(seed).standard_normal(shape)], {"factor": factor}, seed=seed)


@covers("fake_quant")
@FAST
@given(seed=seeds, rows=st.sampled_from([4, 8]), cols=st.integers(1, 4),
       fmt=st.sampled_from([(8, 0, 0), (8, 0, 1), (8, 4, 0), (4, 4, 0), (4, 2, 1)]))
def test_fake_quant_grad(seed, rows, cols, fmt):
    """fake_quant's VJP is the straight-through estimator, deliberately not the derivative of its
    forward (zero almost everywhere through round(), plus the max-abs scale's term). What is
    checked: the VJP is exactly the identity on the cotangent, that identity is the derivative of
    the surrogate it stands for (x ↦ x, by finite differences), and the forward's own finite
    differences do disagree with it — so this check could tell the two apart."""
    bits, group, axis = fmt
    if axis == 1 and group:
        cols = group * cols
    rng = _rng(seed)
    w = _away_from_zero(rng, (rows, cols))
    attrs = {"bits": bits, "group": group, "axis": axis}
    g = rng.standard_normal((rows, cols))
    (gw,) = ops.get("fake_quant").vjp((g,), (w,), (ops.get("fake_quant").forward(w, **attrs),), **attrs)
    assert gw is g or np.array_equal(gw, g)
    check_vjp("fake_quant", [w], attrs, forward=lambda x, **a: x, seed=seed)     # the STE's surrogate
    with pytest.raises(AssertionError, match="fake_quant"):
        check_vjp("fake_quant", [w], attrs, seed=seed)                           # not the true derivative


@covers("fake_quant_act")
@FAST
@given(seed=seeds, lead=st.lists(st.integers(1, 3), min_size=0, max_size=2), blocks=st.integers(1, 3),
       group=st.sampled_from([1, 4, 8]))
def test_fake_quant_act_grad(seed, lead, blocks, group):
    """As for fake_quant: the VJP is the identity (straight-through), the derivative of the
    surrogate x ↦ x, and the forward's own finite differences disagree with it. The same view
    linear_q8_0's VJP takes of its activation rounding (test_grad_q8_0_is_straight_through)."""
    rng = _rng(seed)
    x = _away_from_zero(rng, (*lead, blocks * group))
    attrs = {"group": group}
    g = rng.standard_normal(x.shape)
    (gx,) = ops.get("fake_quant_act").vjp((g,), (x,), (ops.get("fake_quant_act").forward(x, **attrs),), **attrs)
    assert gx is g or np.array_equal(gx, g)
    check_vjp("fake_quant_act", [x], attrs, forward=lambda v, **a: v, seed=seed)
    if group > 1:   # a block of one value is its own max: rounded exactly, the forward is x itself
        with pytest.raises(AssertionError, match="fake_quant_act"):
            check_vjp("fake_quant_act", [x], attrs, seed=seed)


# ----------------------------------------------------------------------------- the checker itself

@pytest.mark.parametrize("op, inputs, attrs", [
    ("linear", lambda r: [r.standard_normal((2, 3)), r.standard_normal((3, 2)), r.standard_normal(2)], {}),
    ("layer_norm", lambda r: [r.standard_normal((2, 4)), r.standard_normal(4), r.standard_normal(4)], {}),
    ("attention", lambda r: [r.standard_normal((1, 2, 4)), r.standard_normal((1, 2, 2)),
                             r.standard_normal((1, 2, 2)), None, None, None],
     {"n_heads": 2, "n_kv_heads": 1, "causal": True}),
])
def test_check_vjp_rejects_a_wrong_vjp(op, inputs, attrs):
    """The gradient tests above can fail: a VJP that is off by 1% in one input is caught."""
    spec = ops.get(op)
    xs = inputs(_rng(3))

    def off_by_one_percent(grads, inputs, outputs, **kw):
        g = list(spec.vjp(grads, inputs, outputs, **kw))
        g[0] = g[0] * 1.01
        return tuple(g)

    check_vjp(op, xs, attrs)  # the real VJP passes
    with pytest.raises(AssertionError, match=op):
        check_vjp(op, xs, attrs, vjp=off_by_one_percent)


# ------------------------------------------------------------------ encoder–decoder ops (#17)

@covers("cross_attention")
@FAST
@given(seed=seeds, B=st.integers(1, 2), T=st.integers(1, 3), extra=st.integers(0, 3), H=st.integers(1, 2),
       D=st.sampled_from([1, 2, 3]), causal=st.booleans(), pad=st.booleans(),
       bias=st.sampled_from([None, "shared", "per_row"]), scale=st.sampled_from([None, 1.0]))
def test_cross_attention_grad(seed, B, T, extra, H, D, causal, pad, bias, scale):
    """Queries (B, T) over S = T + extra given keys: the decoder over the encoder (not causal, the
    encoder's padding mask) and T5's biased self-attention over [past; new] (causal)."""
    rng = _rng(seed)
    S = T + extra
    q, k, v = (rng.standard_normal((B, n, H * D)) for n in (T, S, S))
    mask = None
    if pad:  # right padding, as encoder inputs are padded; key 0 stays visible to every query
        mask = (np.arange(S)[None] < rng.integers(1, S + 1, size=(B, 1))).astype(np.int64)
    b = None if bias is None else rng.standard_normal((1 if bias == "shared" else B, H, T, S))
    attrs = {"n_heads": H, "causal": causal, **({} if scale is None else {"scale": scale})}
    _check("cross_attention", [q, k, v, mask, b], attrs, seed=seed)
    assert _vjp("cross_attention", [q, k, v, mask, b], attrs)[3] is None


@covers("quantize_heads")
@FAST
@given(seed=seeds, B=st.integers(1, 2), T=st.integers(1, 3), H=st.integers(1, 3), D=st.integers(1, 4))
def test_quantize_heads_grad(seed, B, T, H, D):
    """kv=int8's rounding of a K/V: no gradient through round(), the scale's through max|x|."""
    x = _far_from_rounding(_rng(seed), (B, T, H, D)).reshape(B, T, H * D)
    _check("quantize_heads", [x], {"n_heads": H}, seed=seed, atol=1e-6)


@covers("cross_attention_kv8")
@FAST
@given(seed=seeds, B=st.integers(1, 2), T=st.integers(1, 3), extra=st.integers(0, 3), H=st.integers(1, 2),
       D=st.sampled_from([1, 2, 3]), causal=st.booleans(), pad=st.booleans(),
       bias=st.sampled_from([None, "shared", "per_row"]))
def test_cross_attention_kv8_grad(seed, B, T, extra, H, D, causal, pad, bias):
    """cross_attention over int8 K/V: gradients for q, the K/V scales and the bias."""
    from minitx.ops.quant import quantize_heads

    rng = _rng(seed)
    S = T + extra
    q = rng.standard_normal((B, T, H * D))
    kq, ks = quantize_heads(rng.standard_normal((B, S, H * D)), H)
    vq, vs = quantize_heads(rng.standard_normal((B, S, H * D)), H)
    mask = (np.arange(S)[None] < rng.integers(1, S + 1, size=(B, 1))).astype(np.int64) if pad else None
    b = None if bias is None else rng.standard_normal((1 if bias == "shared" else B, H, T, S))
    ins = [q, kq, ks, vq, vs, mask, b]
    attrs = {"n_heads": H, "causal": causal, "scale": 0.5}
    _check("cross_attention_kv8", ins, attrs, seed=seed, atol=1e-6)   # scale grads are ~127x the values'
    assert [g is None for g in _vjp("cross_attention_kv8", ins, attrs)[1:6:2]] == [True] * 3


@covers("relative_position_bias")
@FAST
@given(seed=seeds, B=st.integers(1, 2), T=st.integers(1, 4), S=st.integers(1, 9), H=st.integers(1, 3),
       bidirectional=st.booleans(), queries=st.booleans())
def test_relative_position_bias_grad(seed, B, T, S, H, bidirectional, queries):
    rng = _rng(seed)
    table = rng.standard_normal((8, H))
    mask = np.ones((B, S), np.int64)
    qpos = rng.integers(0, S, size=(B, T)) if queries else None
    attrs = {"bidirectional": bidirectional, "num_buckets": 8, "max_distance": 6}
    _check("relative_position_bias", [table, mask, qpos], attrs, seed=seed)
    assert _vjp("relative_position_bias", [table, mask, qpos], attrs)[1:] == (None, None)


@covers("geglu")
@FAST
@given(seed=seeds, lead=st.lists(st.integers(1, 3), min_size=1, max_size=2), F=st.integers(1, 4),
       approximate=st.sampled_from(["tanh", "none"]))
def test_geglu_grad(seed, lead, F, approximate):
    h = _rng(seed).standard_normal((*lead, 2 * F))
    _check("geglu", [h], {"approximate": approximate}, seed=seed)


@FEW
@given(seed=seeds, dim=st.integers(1, 8))
def test_sinusoidal_positions_halves_grad(seed, dim):
    """Marian's layout (sines then cosines) has no differentiable input either."""
    pos = _rng(seed).integers(0, 6, size=(2, 3))
    assert check_vjp("sinusoidal_positions", [pos], {"dim": dim, "max_len": 6, "halves": True}, seed=seed) == []


@covers("concat")
@FAST
@given(seed=seeds, B=small, S=st.integers(0, 3), T=st.integers(1, 3), C=small)
def test_concat_grad(seed, B, S, T, C):
    rng = _rng(seed)
    _check("concat", [rng.standard_normal((B, S, C)), rng.standard_normal((B, T, C))], {"axis": 1}, seed=seed)


# ------------------------------------------------------------------------------ registry coverage

def test_every_registered_op_has_a_gradient_check():
    missing = set(ops.OPS) - set(COVERED)
    unknown = set(COVERED) - set(ops.OPS)
    assert not missing, f"ops without a gradient check in {__file__}: {sorted(missing)}"
    assert not unknown, f"gradient checks for ops that are not registered: {sorted(unknown)}"
    assert set(COVERED) == set(ops.OPS)
    # Every covering function is a collected test of this module.
    for name, fns in COVERED.items():
        for fn in fns:
            assert fn.startswith("test_") and callable(globals().get(fn)), (name, fn)


# The collectives take one input per simulated rank; their checks live in tests/test_collectives.py.
from test_collectives import COLLECTIVE_OPS, test_collective_vjps_match_finite_differences  # noqa: E402
covers(*COLLECTIVE_OPS)(test_collective_vjps_match_finite_differences)

# Linear attention's checks run over its declared cases in tests/test_attention_linear.py.
from test_attention_linear import test_linear_attention_vjps_match_finite_differences  # noqa: E402
covers("linear_attention", "linear_attention_state")(test_linear_attention_vjps_match_finite_differences)
from test_linformer import test_linformer_vjp_matches_finite_differences  # noqa: E402
covers("linformer_attention")(test_linformer_vjp_matches_finite_differences)

# linear_q8_0's VJP is straight-through for its activation rounding; its check (against the
# surrogate's finite differences, and failing against the forward's) is in tests/test_quant_ops.py.
from test_quant_ops import test_grad_q8_0_is_straight_through  # noqa: E402
covers("linear_q8_0")(test_grad_q8_0_is_straight_through)
