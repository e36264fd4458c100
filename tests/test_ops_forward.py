"""Forward tests of the spec ops in float32 against independent closed forms.

Expected values come from python's math/cmath/statistics, explicit loops and known identities,
never from re-running the op's own NumPy formula. Also: shape inference agrees with what the
forward produces, and bad shapes raise ShapeError naming the op.
"""
from __future__ import annotations

import cmath
import math
import statistics

import numpy as np
import pytest

from minitx import ops
from minitx.errors import MinitxError, ShapeError

F32 = np.float32


def fwd(name, *inputs, **attrs):
    return ops.get(name).forward(*inputs, **attrs)


def rand(shape, seed=0, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(F32)


def close(actual, expected, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64),
                               rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------------- norms

def test_layer_norm_unit_weight_gives_zero_mean_unit_variance():
    x = rand((4, 3, 16), seed=1, scale=3.0) + F32(2.0)
    y = fwd("layer_norm", x, np.ones(16, F32), np.zeros(16, F32))
    assert y.dtype == F32 and y.shape == x.shape
    close(y.mean(axis=-1), 0.0, atol=1e-6)
    # var(y) = var(x) / (var(x) + eps) ≈ 1 for var(x) ≈ 9
    close(y.astype(np.float64).var(axis=-1), 1.0, rtol=1e-5, atol=2e-6)


def test_layer_norm_matches_statistics_per_row():
    x = rand((5, 7), seed=2, scale=2.0)
    w, b = rand(7, seed=3), rand(7, seed=4)
    eps = 1e-5
    y = fwd("layer_norm", x, w, b, eps=eps)
    for r in range(5):
        row = [float(v) for v in x[r]]
        mu, var = statistics.fmean(row), statistics.pvariance(row)
        for i in range(7):
            z = (row[i] - mu) / math.sqrt(var + eps)
            close(y[r, i], float(w[i]) * z + float(b[i]), atol=1e-5)


def test_layer_norm_is_invariant_to_shift_and_positive_scale():
    x = rand((3, 8), seed=5)
    w, b = rand(8, seed=6), rand(8, seed=7)
    y1 = fwd("layer_norm", x, w, b, eps=0.0)
    y2 = fwd("layer_norm", x * F32(4.0) + F32(10.0), w, b, eps=0.0)
    close(y1, y2, atol=2e-5)


@pytest.mark.parametrize("c", [3.0, -0.5, 120.0])
def test_rms_norm_of_constant_vector_is_sign_times_weight(c):
    w = rand(6, seed=8)
    x = np.full((2, 6), c, dtype=F32)
    y = fwd("rms_norm", x, w)
    assert y.dtype == F32
    close(y, np.broadcast_to(math.copysign(1.0, c) * w, (2, 6)), rtol=1e-5, atol=1e-5)


def test_rms_norm_matches_explicit_formula():
    x = rand((3, 5), seed=9, scale=2.0)
    w = rand(5, seed=10)
    eps = 1e-6
    y = fwd("rms_norm", x, w, eps=eps)
    for r in range(3):
        rms = math.sqrt(sum(float(v) ** 2 for v in x[r]) / 5 + eps)
        for i in range(5):
            close(y[r, i], float(x[r, i]) / rms * float(w[i]), atol=1e-6)


def test_rms_norm_eps_matters_for_tiny_inputs():
    x = np.full((1, 4), 1e-3, dtype=F32)
    y = fwd("rms_norm", x, np.ones(4, F32), eps=1e-6)
    close(y, 1e-3 / math.sqrt(1e-6 + 1e-6), rtol=1e-5)


# ------------------------------------------------------------------------------- activations

def _gelu_exact(x):
    return 0.5 * x * (1.0 + math.erf(x / math.sqrt(2.0)))


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def test_gelu_special_values():
    x = np.array([0.0, 12.0, -12.0, 1.0], dtype=F32)
    y = fwd("gelu", x)
    assert y.dtype == F32
    assert y[0] == 0.0
    close(y[1], 12.0, rtol=1e-6)            # x·Φ(x) → x
    close(y[2], 0.0, atol=1e-6)             # → 0 from below
    close(y[3], 0.8413447460685429, rtol=1e-6)  # Φ(1) = 0.841344746…


@pytest.mark.parametrize("approximate, ref", [("none", _gelu_exact), ("tanh", _gelu_tanh)])
def test_gelu_matches_math_per_element(approximate, ref):
    x = np.linspace(-6, 6, 97, dtype=F32)
    y = fwd("gelu", x, approximate=approximate)
    close(y, [ref(float(v)) for v in x], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_preserves_float32(approximate):
    x = np.linspace(-3, 3, 7, dtype=F32)
    y = fwd("gelu", x, approximate=approximate)
    assert y.dtype == F32
    (gx,) = ops.get("gelu").vjp((np.ones_like(y),), (x,), (y,), approximate=approximate)
    assert gx.dtype == F32


def test_tanh_gelu_is_close_to_erf_gelu_but_not_equal():
    x = np.linspace(-8, 8, 401, dtype=F32)
    exact = fwd("gelu", x, approximate="none")
    approx = fwd("gelu", x, approximate="tanh")
    diff = np.abs(exact.astype(np.float64) - approx)
    assert diff.max() < 1e-3
    assert diff.max() > 1e-5  # really the approximation, not the same function


def test_relu_and_silu_match_math():
    x = np.linspace(-30, 30, 121, dtype=F32)
    close(fwd("relu", x), [max(float(v), 0.0) for v in x], atol=0)
    close(fwd("silu", x), [float(v) / (1.0 + math.exp(-float(v))) for v in x], rtol=1e-5, atol=1e-6)
    assert fwd("relu", x).dtype == F32 and fwd("silu", x).dtype == F32


def test_silu_extremes_are_finite():
    x = np.array([-1e4, -100.0, 100.0, 1e4], dtype=F32)
    with np.errstate(all="raise"):
        y = fwd("silu", x)
    close(y, [0.0, 0.0, 100.0, 1e4], rtol=1e-6, atol=1e-6)


def test_swiglu_is_silu_gate_times_up_per_element():
    h = rand((2, 3, 8), seed=11, scale=2.0)
    y = fwd("swiglu", h)
    assert y.shape == (2, 3, 4) and y.dtype == F32
    for idx in np.ndindex(2, 3):
        for i in range(4):
            g, u = float(h[idx][i]), float(h[idx][4 + i])
            close(y[idx][i], g / (1.0 + math.exp(-g)) * u, rtol=1e-5, atol=1e-6)


def test_softmax_known_values():
    y = fwd("softmax", np.array([[0.0, math.log(2.0)], [0.0, 0.0]], dtype=F32))
    close(y, [[1 / 3, 2 / 3], [0.5, 0.5]], rtol=1e-6)
    y = fwd("softmax", np.array([1000.0, 1000.0, 0.0], dtype=F32))  # no overflow
    close(y, [0.5, 0.5, 0.0], atol=1e-7)


def test_softmax_rows_sum_to_one_and_shift_invariant():
    x = rand((4, 6, 9), seed=12, scale=4.0)
    y = fwd("softmax", x)
    assert y.dtype == F32
    close(y.sum(axis=-1), 1.0, rtol=1e-6)
    assert (y > 0).all()
    close(fwd("softmax", x + F32(7.5)), y, rtol=1e-5, atol=1e-7)


def test_softmax_other_axis_matches_math():
    x = rand((3, 4), seed=13)
    y = fwd("softmax", x, axis=0)
    for j in range(4):
        col = [math.exp(float(v)) for v in x[:, j]]
        close(y[:, j], [c / sum(col) for c in col], rtol=1e-6)


# ----------------------------------------------------------------------------------- dropout

def test_dropout_inference_is_identity():
    x = rand((8, 9), seed=14)
    assert np.array_equal(fwd("dropout", x, p=0.5), x)
    assert np.array_equal(fwd("dropout", x, p=0.5, training=False, step=3, seed=1), x)
    assert np.array_equal(fwd("dropout", x, p=0.0, training=True, step=3), x)


def test_dropout_training_keeps_fraction_and_scales():
    p = 0.3
    x = np.random.default_rng(15).uniform(1.0, 2.0, size=(200, 500)).astype(F32)  # no zeros in x
    y = fwd("dropout", x, p=p, training=True, seed=7, step=11)
    assert y.dtype == F32 and y.shape == x.shape
    kept = y != 0
    n = x.size
    assert abs(kept.mean() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    close(y[kept], x[kept] / (1 - p), rtol=1e-6)
    # inverted dropout keeps the expectation
    assert abs(y.mean() / x.mean() - 1.0) < 0.01


def test_dropout_mask_is_a_function_of_seed_and_step():
    x = np.ones((64, 64), dtype=F32)
    a = fwd("dropout", x, p=0.5, training=True, seed=3, step=5)
    assert np.array_equal(a, fwd("dropout", x, p=0.5, training=True, seed=3, step=5))
    assert not np.array_equal(a != 0, fwd("dropout", x, p=0.5, training=True, seed=3, step=6) != 0)
    assert not np.array_equal(a != 0, fwd("dropout", x, p=0.5, training=True, seed=4, step=5) != 0)
    # the mask does not depend on the values
    x2 = rand((64, 64), seed=16) + F32(10.0)
    assert np.array_equal(a != 0, fwd("dropout", x2, p=0.5, training=True, seed=3, step=5) != 0)


# -------------------------------------------------------------------------------------- split

@pytest.mark.parametrize("sizes", [[4], [1, 3], [2, 2, 5], [3, 1, 1, 2]])
def test_split_pieces_concatenate_back(sizes):
    x = rand((2, 3, sum(sizes)), seed=17)
    pieces = fwd("split", x, sizes=sizes)
    assert isinstance(pieces, tuple) and len(pieces) == len(sizes)
    start = 0
    for piece, n in zip(pieces, sizes):
        assert piece.shape == (2, 3, n)
        assert np.array_equal(piece, x[..., start:start + n])
        start += n
    assert np.array_equal(np.concatenate(pieces, axis=-1), x)


# ------------------------------------------------------------------------------------- linalg

def test_linear_matches_loops():
    x, w, b = rand((2, 3, 4), seed=18), rand((4, 5), seed=19), rand(5, seed=20)
    y = fwd("linear", x, w, b)
    y0 = fwd("linear", x, w, None)
    assert y.shape == (2, 3, 5) and y.dtype == F32
    for idx in np.ndindex(2, 3):
        for o in range(5):
            s = sum(float(x[idx][i]) * float(w[i, o]) for i in range(4))
            close(y0[idx][o], s, atol=1e-5)
            close(y[idx][o], s + float(b[o]), atol=1e-5)


@pytest.mark.parametrize("transpose_b", [False, True])
def test_matmul_batched_matches_loops(transpose_b):
    a = rand((2, 3, 4), seed=21)
    b = rand((2, 5, 4) if transpose_b else (2, 4, 5), seed=22)
    c = fwd("matmul", a, b, transpose_b=transpose_b)
    assert c.shape == (2, 3, 5)
    for n in range(2):
        for i in range(3):
            for j in range(5):
                s = sum(float(a[n, i, k]) * float(b[n, j, k] if transpose_b else b[n, k, j]) for k in range(4))
                close(c[n, i, j], s, atol=1e-5)


def test_add_broadcasts_bias():
    a, b = rand((2, 3, 4), seed=23), rand(4, seed=24)
    y = fwd("add", a, b)
    for idx in np.ndindex(2, 3, 4):
        close(y[idx], float(a[idx]) + float(b[idx[-1]]), atol=1e-6)


def test_embedding_picks_rows_including_repeats():
    table = rand((6, 3), seed=25)
    ids = np.array([[0, 5, 5], [2, 0, 3]])
    y = fwd("embedding", ids, table)
    assert y.shape == (2, 3, 3) and y.dtype == F32
    for b in range(2):
        for t in range(3):
            assert list(y[b, t]) == list(table[int(ids[b, t])])


# ---------------------------------------------------------------------------------- attention

def naive_mha(q, k, v, n_heads, *, causal=False, mask=None, scale=None):
    """Multi-head attention with explicit loops over heads, queries and keys, in float64.

    k and v hold all L = S + T keys; query t has absolute position S + t.
    """
    B, T, HD = q.shape
    L = k.shape[1]
    D = HD // n_heads
    S = L - T
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = np.zeros((B, T, HD))
    for b in range(B):
        for h in range(n_heads):
            cols = range(h * D, (h + 1) * D)
            for t in range(T):
                keys = [s for s in range(L)
                        if (not causal or s <= S + t) and (mask is None or mask[b][s])]
                if not keys:  # no allowed key: undefined, leave NaN
                    out[b, t, h * D:(h + 1) * D] = np.nan
                    continue
                scores = [scale * sum(float(q[b, t, c]) * float(k[b, s, c]) for c in cols) for s in keys]
                m = max(scores)
                w = [math.exp(x - m) for x in scores]
                z = sum(w)
                for c in cols:
                    out[b, t, c] = sum(wi / z * float(v[b, s, c]) for wi, s in zip(w, keys))
    return out


def repeat_kv(x, n_kv_heads, group):
    B, L, HD = x.shape
    return np.repeat(x.reshape(B, L, n_kv_heads, HD // n_kv_heads), group, axis=2).reshape(B, L, HD * group)


def attn(q, k, v, past_k=None, past_v=None, mask=None, **attrs):
    return fwd("attention", q, k, v, past_k, past_v, mask, **attrs)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("scale", [None, 0.7])
def test_attention_mha_matches_naive_loops(causal, scale):
    H, D = 2, 3
    q, k, v = rand((2, 4, H * D), 26), rand((2, 4, H * D), 27), rand((2, 4, H * D), 28)
    attrs = {} if scale is None else {"scale": scale}
    out, K, V = attn(q, k, v, n_heads=H, n_kv_heads=H, causal=causal, **attrs)
    assert out.dtype == F32 and K.dtype == F32 and V.dtype == F32
    assert np.array_equal(K, k) and np.array_equal(V, v)
    close(out, naive_mha(q, k, v, H, causal=causal, scale=scale), atol=2e-6)


@pytest.mark.parametrize("n_heads, n_kv_heads", [(4, 2), (4, 1), (6, 3)])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_gqa_equals_mha_with_repeated_kv_heads(n_heads, n_kv_heads, causal):
    D, G = 2, n_heads // n_kv_heads
    q = rand((2, 3, n_heads * D), 29)
    k, v = rand((2, 3, n_kv_heads * D), 30), rand((2, 3, n_kv_heads * D), 31)
    out, _, _ = attn(q, k, v, n_heads=n_heads, n_kv_heads=n_kv_heads, causal=causal)
    kr, vr = repeat_kv(k, n_kv_heads, G), repeat_kv(v, n_kv_heads, G)
    close(out, naive_mha(q, kr, vr, n_heads, causal=causal), atol=2e-6)
    # and the op itself agrees when handed the repeated heads as plain MHA
    mha, _, _ = attn(q, kr, vr, n_heads=n_heads, n_kv_heads=n_heads, causal=causal)
    close(out, mha, atol=1e-6)


def test_attention_single_key_returns_its_value():
    H, Hkv, D = 4, 2, 3
    q = rand((2, 1, H * D), 32, scale=5.0)
    k, v = rand((2, 1, Hkv * D), 33), rand((2, 1, Hkv * D), 34)
    for causal in (False, True):
        out, _, _ = attn(q, k, v, n_heads=H, n_kv_heads=Hkv, causal=causal)
        for h in range(H):
            kv = h // (H // Hkv)
            close(out[:, :, h * D:(h + 1) * D], v[:, :, kv * D:(kv + 1) * D], rtol=1e-6)


def test_attention_zero_queries_average_the_allowed_values():
    B, T, H, D = 2, 4, 2, 2
    q = np.zeros((B, T, H * D), F32)
    k, v = rand((B, T, H * D), 35), rand((B, T, H * D), 36)
    out, _, _ = attn(q, k, v, n_heads=H, n_kv_heads=H, causal=False)
    close(out, np.broadcast_to(v.mean(axis=1, keepdims=True), out.shape), atol=1e-6)
    out, _, _ = attn(q, k, v, n_heads=H, n_kv_heads=H, causal=True)
    for t in range(T):
        close(out[:, t], v[:, : t + 1].mean(axis=1), atol=1e-6)
    mask = np.array([[1, 0, 1, 1], [0, 0, 1, 0]])
    out, _, _ = attn(q, k, v, None, None, mask, n_heads=H, n_kv_heads=H, causal=False)
    for b in range(B):
        keep = mask[b].astype(bool)
        close(out[b], np.broadcast_to(v[b, keep].mean(axis=0), (T, H * D)), atol=1e-6)


def test_attention_causal_first_query_sees_only_first_key():
    H, D = 2, 4
    q, k, v = rand((1, 5, H * D), 37, 3.0), rand((1, 5, H * D), 38, 3.0), rand((1, 5, H * D), 39)
    out, _, _ = attn(q, k, v, n_heads=H, n_kv_heads=H, causal=True)
    close(out[:, 0], v[:, 0], rtol=1e-6)
    # changing later keys/values cannot change earlier outputs
    k2, v2 = k.copy(), v.copy()
    k2[:, 3:] += 5.0
    v2[:, 3:] -= 5.0
    out2, _, _ = attn(q, k2, v2, n_heads=H, n_kv_heads=H, causal=True)
    close(out2[:, :3], out[:, :3], rtol=1e-6)
    assert not np.allclose(out2[:, 3:], out[:, 3:])


@pytest.mark.parametrize("n_heads, n_kv_heads", [(2, 2), (4, 2)])
def test_attention_kv_cache_equals_full_sequence(n_heads, n_kv_heads):
    B, L, P, D = 2, 6, 3, 2
    q = rand((B, L, n_heads * D), 40)
    k, v = rand((B, L, n_kv_heads * D), 41), rand((B, L, n_kv_heads * D), 42)
    a = {"n_heads": n_heads, "n_kv_heads": n_kv_heads, "causal": True}
    full, _, _ = attn(q, k, v, **a)
    # prefill P tokens, then the rest in one chunk with the cache
    _, pk, pv = attn(q[:, :P], k[:, :P], v[:, :P], **a)
    out, K, V = attn(q[:, P:], k[:, P:], v[:, P:], pk, pv, **a)
    assert np.array_equal(K, k) and np.array_equal(V, v)
    close(out, full[:, P:], atol=1e-6)
    # then token by token, feeding present_k/present_v back
    pk, pv = k[:, :1], v[:, :1]
    for t in range(1, L):
        step, pk, pv = attn(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], pk, pv, **a)
        close(step[:, 0], full[:, t], atol=1e-6)
    assert pk.shape == (B, L, n_kv_heads * D)


def test_attention_kv_cache_with_left_padding_matches_naive():
    B, S, T, H, D = 2, 3, 2, 2, 2
    q = rand((B, T, H * D), 43)
    k, v = rand((B, T, H * D), 44), rand((B, T, H * D), 45)
    pk, pv = rand((B, S, H * D), 46), rand((B, S, H * D), 47)
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    out, K, V = attn(q, k, v, pk, pv, mask, n_heads=H, n_kv_heads=H, causal=True)
    close(out, naive_mha(q, K, V, H, causal=True, mask=mask), atol=2e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_masked_keys_have_zero_weight(causal):
    B, T, H, D = 2, 5, 2, 2
    q, k, v = rand((B, T, H * D), 48), rand((B, T, H * D), 49), rand((B, T, H * D), 50)
    mask = np.array([[1, 1, 0, 1, 0], [1, 0, 0, 1, 1]])
    out, _, _ = attn(q, k, v, None, None, mask, n_heads=H, n_kv_heads=H, causal=causal)
    k2, v2 = k.copy(), v.copy()
    k2[mask == 0] = 50.0  # would dominate the softmax if it were attended to
    v2[mask == 0] = -99.0
    out2, _, _ = attn(q, k2, v2, None, None, mask, n_heads=H, n_kv_heads=H, causal=causal)
    close(out2, out, rtol=1e-6, atol=1e-7)
    close(out, naive_mha(q, k, v, H, causal=causal, mask=mask), atol=2e-6)
    if not causal:  # equals unmasked attention over the kept keys only
        for b in range(B):
            keep = mask[b].astype(bool)
            close(out[b:b + 1], naive_mha(q[b:b + 1], k[b:b + 1, keep], v[b:b + 1, keep], H), atol=2e-6)


def test_attention_fully_masked_query_is_finite_uniform():
    """Documented: a query with no allowed key gets uniform weights instead of NaN."""
    H, D = 1, 2
    q, k, v = rand((1, 3, H * D), 51), rand((1, 3, H * D), 52), rand((1, 3, H * D), 53)
    mask = np.array([[0, 1, 1]])
    out, _, _ = attn(q, k, v, None, None, mask, n_heads=H, n_kv_heads=H, causal=True)
    assert np.isfinite(out).all()
    close(out[0, 0], v[0].mean(axis=0), atol=1e-6)
    close(out[0, 1:], naive_mha(q, k, v, H, causal=True, mask=mask)[0, 1:], atol=2e-6)


# ------------------------------------------------------------------------------------- rope

def test_rope_matches_complex_rotation():
    B, T, H, D, theta = 2, 3, 2, 6, 10000.0
    x = rand((B, T, H * D), 54)
    pos = np.array([[0, 1, 2], [7, 100, 1023]])
    y = fwd("rope", x, pos, n_heads=H, theta=theta)
    assert y.dtype == F32 and y.shape == x.shape
    half = D // 2
    for b in range(B):
        for t in range(T):
            for h in range(H):
                o = h * D
                for i in range(half):
                    z = complex(float(x[b, t, o + i]), float(x[b, t, o + i + half]))
                    z *= cmath.exp(1j * int(pos[b, t]) * theta ** (-2 * i / D))
                    close(y[b, t, o + i], z.real, atol=1e-5)
                    close(y[b, t, o + i + half], z.imag, atol=1e-5)


def test_rope_position_zero_is_identity_and_norm_is_preserved():
    B, T, H, D = 2, 4, 3, 8
    x = rand((B, T, H * D), 55)
    close(fwd("rope", x, np.zeros((B, T), dtype=np.int64), n_heads=H), x, atol=0)
    pos = np.random.default_rng(56).integers(0, 4096, size=(B, T))
    y = fwd("rope", x, pos, n_heads=H, theta=500.0)
    assert not np.allclose(y, x)
    close(np.linalg.norm(y.reshape(B, T, H, D), axis=-1), np.linalg.norm(x.reshape(B, T, H, D), axis=-1),
          rtol=1e-5)


def test_rope_dot_product_depends_only_on_relative_position():
    D = 8
    q, k = rand((1, 1, D), 57), rand((1, 1, D), 58)

    def score(m, n):
        rq = fwd("rope", q, np.array([[m]]), n_heads=1)
        rk = fwd("rope", k, np.array([[n]]), n_heads=1)
        return float(np.dot(rq.ravel().astype(np.float64), rk.ravel()))

    for m, n in [(5, 2), (0, 3), (10, 10)]:
        for shift in (1, 17, 300):
            close(score(m + shift, n + shift), score(m, n), atol=2e-5)
    assert abs(score(5, 2) - score(6, 2)) > 1e-3  # but it does depend on m - n


# -------------------------------------------------------------------------------- sinusoidal

def test_sinusoidal_row_zero_and_closed_form():
    dim, max_len = 6, 50
    pos = np.array([[0, 1, 49], [3, 3, 10]])
    y = fwd("sinusoidal_positions", pos, dim=dim, max_len=max_len)
    assert y.shape == (2, 3, dim) and y.dtype == F32
    assert list(y[0, 0]) == [0.0, 1.0] * (dim // 2)
    for b in range(2):
        for t in range(3):
            p = int(pos[b, t])
            for i in range(dim // 2):
                ang = p / 10000.0 ** (2 * i / dim)
                close(y[b, t, 2 * i], math.sin(ang), atol=1e-6)
                close(y[b, t, 2 * i + 1], math.cos(ang), atol=1e-6)


def test_sinusoidal_odd_dim_and_dtype():
    y = fwd("sinusoidal_positions", np.array([2, 5]), dim=5, max_len=8, dtype="float64")
    assert y.shape == (2, 5) and y.dtype == np.float64
    for r, p in enumerate((2, 5)):
        expected = []
        for j in range(5):
            ang = p / 10000.0 ** ((j - j % 2) / 5)
            expected.append(math.sin(ang) if j % 2 == 0 else math.cos(ang))
        close(y[r], expected, rtol=1e-12)


# ------------------------------------------------------------------------------------ losses

def test_cross_entropy_uniform_logits_is_log_vocab():
    V = 7
    targets = np.array([[1, 6, -100], [0, -100, 3]])
    logits = np.zeros((2, 3, V), F32)
    logits[targets == -100] = rand((2, V), 59, scale=5.0)  # ignored positions: anything at all
    y = fwd("cross_entropy", logits, targets)
    assert y.shape == () and y.dtype == F32
    close(y, math.log(V), rtol=1e-6)


def test_cross_entropy_known_values_and_ignore_index():
    logits = np.array([[0.0, math.log(2.0)], [0.0, math.log(2.0)]], F32)
    close(fwd("cross_entropy", logits, np.array([1, 0])), (math.log(1.5) + math.log(3.0)) / 2, rtol=1e-6)
    close(fwd("cross_entropy", logits, np.array([1, -100])), math.log(1.5), rtol=1e-6)
    close(fwd("cross_entropy", logits, np.array([-1, 0]), ignore_index=-1), math.log(3.0), rtol=1e-6)
    all_ignored = fwd("cross_entropy", logits, np.array([-100, -100]))
    assert np.isfinite(all_ignored) and float(all_ignored) == 0.0


def test_cross_entropy_matches_math_and_is_stable():
    logits = rand((4, 5), 60, scale=3.0)
    t = np.array([0, 4, 2, 2])
    expected = statistics.fmean(
        math.log(sum(math.exp(float(v)) for v in logits[i])) - float(logits[i, t[i]]) for i in range(4))
    close(fwd("cross_entropy", logits, t), expected, rtol=1e-5)
    big = np.array([[1000.0, 0.0]], F32)
    close(fwd("cross_entropy", big, np.array([0])), 0.0, atol=1e-6)
    close(fwd("cross_entropy", big, np.array([1])), 1000.0, rtol=1e-6)


# ------------------------------------------------------------------------------ distillation

def test_kl_div_two_class_closed_form_with_temperature():
    # p_t = softmax([2 ln 3, 0] / 2) = (3/4, 1/4), p_s = softmax([0, 0] / 2) = (1/2, 1/2).
    t = np.array([[2 * math.log(3.0), 0.0]], F32)
    s = np.zeros((1, 2), F32)
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    close(fwd("kl_div", s, t, temperature=2.0), 4.0 * kl, rtol=1e-6)   # scaled by T² = 4
    close(fwd("kl_div", s * 0, t / 2), kl, rtol=1e-6)                 # T = 1 by default
    # mean over positions: a second, identical row leaves it unchanged; a matching row halves it
    close(fwd("kl_div", np.concatenate([s, s]), np.concatenate([t, t]), temperature=2.0), 4.0 * kl, rtol=1e-6)
    close(fwd("kl_div", np.concatenate([s, t]), np.concatenate([t, t]), temperature=2.0), 2.0 * kl, rtol=1e-6)


def test_kl_div_is_zero_for_equal_and_shifted_logits_and_positive_otherwise():
    x = rand((2, 3, 7), seed=1, scale=3.0)
    close(fwd("kl_div", x, x, temperature=1.5), 0.0, atol=1e-6)
    close(fwd("kl_div", x + 5.0, x, temperature=1.5), 0.0, atol=1e-5)  # softmax ignores a shift
    assert float(fwd("kl_div", rand((2, 3, 7), seed=2), x)) > 0.01


def test_kl_div_matches_torch():
    torch = pytest.importorskip("torch")
    s, t = rand((2, 4, 9), seed=3, scale=2.0), rand((2, 4, 9), seed=4, scale=2.0)
    T = 3.0
    ls = torch.log_softmax(torch.from_numpy(s.reshape(-1, 9)).double() / T, -1)
    pt = torch.softmax(torch.from_numpy(t.reshape(-1, 9)).double() / T, -1)
    ref = torch.nn.functional.kl_div(ls, pt, reduction="batchmean").item() * T * T
    close(fwd("kl_div", s, t, temperature=T), ref, rtol=1e-5)
    # masked: the mean over the counted positions only
    mask = np.array([[1, 1, 0, 0], [1, 0, 1, 0]])
    keep = torch.from_numpy(mask.reshape(-1) == 1)
    ref = torch.nn.functional.kl_div(ls[keep], pt[keep], reduction="batchmean").item() * T * T
    close(fwd("kl_div", s, t, mask, temperature=T), ref, rtol=1e-5)


def test_mse_known_value():
    close(fwd("mse", np.array([[1.0, 2.0], [3.0, 4.0]], F32), np.array([[1.0, 0.0], [0.0, 4.0]], F32)),
          (0 + 4 + 9 + 0) / 4)


def test_prob_kl_matches_scipy_and_skips_zero_targets():
    from scipy.stats import entropy

    p = np.array([[0.2, 0.3, 0.5], [0.1, 0.1, 0.8]], F32)
    t = np.array([[0.0, 0.5, 0.5], [0.6, 0.2, 0.2]], F32)
    close(fwd("prob_kl", p, t), (entropy(t[0], p[0]) + entropy(t[1], p[1])) / 2, rtol=1e-5)
    close(fwd("prob_kl", p, p), 0.0, atol=1e-7)
    # a zero where the target has mass: large but finite
    y = fwd("prob_kl", np.array([[0.0, 1.0]], F32), np.array([[0.5, 0.5]], F32))
    assert np.isfinite(y) and y > 10


def naive_probs(q, k, n_heads, n_kv_heads, causal):
    """Per-head attention probabilities with explicit loops, float64: (B, H, T, S)."""
    B, T, HD = q.shape
    S, D, G = k.shape[1], HD // n_heads, n_heads // n_kv_heads
    out = np.zeros((B, n_heads, T, S))
    for b in range(B):
        for h in range(n_heads):
            kh = h // G
            for t in range(T):
                keys = [s for s in range(S) if not causal or s <= S - T + t]
                sc = [sum(float(q[b, t, h * D + c]) * float(k[b, s, kh * D + c]) for c in range(D)) / math.sqrt(D)
                      for s in keys]
                m = max(sc)
                z = sum(math.exp(x - m) for x in sc)
                for s, x in zip(keys, sc):
                    out[b, h, t, s] = math.exp(x - m) / z
    return out


@pytest.mark.parametrize("n_heads, n_kv_heads", [(2, 2), (4, 2), (4, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_probs_match_loops_and_average_head_groups(n_heads, n_kv_heads, causal):
    D = 3
    q, k = rand((2, 4, n_heads * D), seed=5), rand((2, 4, n_kv_heads * D), seed=6)
    attrs = dict(n_heads=n_heads, n_kv_heads=n_kv_heads, causal=causal)
    ref = naive_probs(q, k, n_heads, n_kv_heads, causal)
    p = fwd("attention_probs", q, k, None, **attrs)
    close(p, ref, rtol=1e-5)
    close(p.sum(axis=-1), np.ones(p.shape[:-1]), rtol=1e-6)
    close(fwd("attention_probs", q, k, None, n_maps=1, **attrs), ref.mean(axis=1, keepdims=True), rtol=1e-5)
    if n_heads == 4:   # two maps: heads 0-1 and 2-3
        pair = np.stack([ref[:, :2].mean(1), ref[:, 2:].mean(1)], axis=1)
        close(fwd("attention_probs", q, k, None, n_maps=2, **attrs), pair, rtol=1e-5)


def test_attention_probs_is_the_attention_ops_weighting():
    # attention(q, k, v) = P V per head: with one-hot value rows, the output columns are P itself.
    q, k = rand((1, 3, 2), seed=7), rand((1, 3, 2), seed=8)
    P = fwd("attention_probs", q, k, None, n_heads=1, n_kv_heads=1, causal=True)
    v = np.eye(3, dtype=F32)[None, :, :2]
    out, _, _ = fwd("attention", q, k, v[..., :2], n_heads=1, n_kv_heads=1, causal=True)
    close(out, P[0, 0][None, :, :2], rtol=1e-5)


def test_scale_multiplies():
    close(fwd("scale", np.array([1.5, -2.0], F32), factor=0.5), [0.75, -1.0])


@pytest.mark.parametrize("name, shapes, dtypes, attrs", [
    ("kl_div", [(2, 3, 5), (2, 3, 4)], ["float32"] * 2, {}),
    ("kl_div", [(2, 5), (2, 5)], ["float32"] * 2, {"temperature": 0.0}),
    ("mse", [(2, 3), (3, 2)], ["float32"] * 2, {}),
    ("prob_kl", [(2, 4, 4), (2, 2, 4)], ["float32"] * 2, {}),
    ("attention_probs", [(1, 2, 8), (1, 2, 4), None], ["float32"] * 2 + [None],
     {"n_heads": 4, "n_kv_heads": 2, "causal": True, "n_maps": 3}),      # n_maps must divide n_heads
    ("attention_probs", [(1, 2, 8), (1, 2, 6), None], ["float32"] * 2 + [None],
     {"n_heads": 4, "n_kv_heads": 2, "causal": True}),                   # k width != kv heads x head_dim
])
def test_distillation_ops_bad_shapes_raise_shape_error(name, shapes, dtypes, attrs):
    dtypes = [None if d is None else np.dtype(d) for d in dtypes]
    with pytest.raises(ShapeError, match=rf"\b{name}\b"):
        ops.get(name).infer(shapes, dtypes, **attrs)


# ----------------------------------------------------------------------------------- pooling

def test_mean_pool_ignores_padding():
    x = rand((3, 4, 2), 61)
    mask = np.array([[1, 1, 0, 0], [0, 1, 1, 1], [1, 1, 1, 1]])
    y = fwd("mean_pool", x, mask)
    assert y.shape == (3, 2) and y.dtype == F32
    for b in range(3):
        for c in range(2):
            vals = [float(x[b, t, c]) for t in range(4) if mask[b, t]]
            close(y[b, c], statistics.fmean(vals), atol=1e-6)
    x2 = x.copy()
    x2[mask == 0] = 1e3
    close(fwd("mean_pool", x2, mask), y, atol=1e-6)


def test_mean_pool_all_padding_row_is_finite():
    y = fwd("mean_pool", rand((1, 3, 2), 62), np.zeros((1, 3), dtype=np.int64))
    assert np.isfinite(y).all()


def test_l2_normalize_unit_norm_and_direction():
    x = rand((3, 4, 5), 63, scale=7.0)
    y = fwd("l2_normalize", x)
    assert y.dtype == F32
    for idx in np.ndindex(3, 4):
        n = math.sqrt(sum(float(v) ** 2 for v in x[idx]))
        close(math.sqrt(sum(float(v) ** 2 for v in y[idx])), 1.0, rtol=1e-6)
        close(y[idx] * n, x[idx], rtol=1e-5, atol=1e-6)
    z = fwd("l2_normalize", np.zeros((2, 3), F32))
    assert np.isfinite(z).all() and not z.any()


def test_l2_normalize_clips_tiny_norms_at_eps():
    x = np.array([[3e-3, 4e-3], [3.0, 4.0]], F32)  # norms 5e-3 (below eps) and 5 (above)
    y = fwd("l2_normalize", x, eps=0.1)
    close(y, [[3e-2, 4e-2], [0.6, 0.8]], rtol=1e-6)


# ------------------------------------------------------------------------------------- infer

def _attention_case():
    q, k, v = rand((2, 3, 8), 64), rand((2, 3, 4), 65), rand((2, 3, 4), 66)
    pk, pv = rand((2, 5, 4), 67), rand((2, 5, 4), 68)
    mask = np.ones((2, 8), dtype=np.int64)
    return [q, k, v, pk, pv, mask], {"n_heads": 4, "n_kv_heads": 2, "causal": True}


INFER_CASES = [
    ("linear", lambda: ([rand((2, 3, 4)), rand((4, 5)), rand(5)], {})),
    ("linear", lambda: ([rand((7, 4)), rand((4, 2)), None], {})),
    ("matmul", lambda: ([rand((2, 3, 4)), rand((5, 4))], {"transpose_b": True})),
    ("matmul", lambda: ([rand((2, 1, 3, 4)), rand((3, 4, 6))], {})),
    ("add", lambda: ([rand((2, 3, 4)), rand((1, 3, 1))], {})),
    ("embedding", lambda: ([np.array([[1, 2, 2]]), rand((4, 6))], {})),
    ("split", lambda: ([rand((2, 9))], {"sizes": [2, 3, 4]})),
    ("layer_norm", lambda: ([rand((2, 3, 4)), rand(4), rand(4)], {})),
    ("rms_norm", lambda: ([rand((3, 4)), rand(4)], {})),
    ("gelu", lambda: ([rand((3, 4))], {})),
    ("gelu", lambda: ([rand((3, 4))], {"approximate": "tanh"})),
    ("swiglu", lambda: ([rand((2, 3, 8))], {})),
    ("softmax", lambda: ([rand((2, 3))], {"axis": 0})),
    ("attention", _attention_case),
    ("attention", lambda: ([rand((1, 2, 6)), rand((1, 2, 6)), rand((1, 2, 6)), None, None, None],
                           {"n_heads": 3, "n_kv_heads": 3, "causal": False})),
    ("rope", lambda: ([rand((2, 3, 8)), np.zeros((2, 3), dtype=np.int64)], {"n_heads": 2})),
    ("sinusoidal_positions", lambda: ([np.array([[0, 1], [2, 3]])], {"dim": 5, "max_len": 9})),
    ("cross_entropy", lambda: ([rand((2, 3, 5)), np.array([[0, 1, -100], [4, 4, 4]])], {})),
    ("mean_pool", lambda: ([rand((2, 3, 4)), np.ones((2, 3), dtype=np.int64)], {})),
    ("l2_normalize", lambda: ([rand((2, 3))], {})),
    ("relu", lambda: ([rand((2, 3))], {})),
    ("silu", lambda: ([rand((2, 3))], {})),
]


def _case_id(i, case):
    name = case.values[0] if hasattr(case, "values") else case[0]
    return f"{name}-{i}"


@pytest.mark.parametrize("name, case", INFER_CASES, ids=[_case_id(i, c) for i, c in enumerate(INFER_CASES)])
def test_infer_matches_forward(name, case):
    inputs, attrs = case()
    spec = ops.get(name)
    shapes = [None if x is None else tuple(np.shape(x)) for x in inputs]
    dtypes = [None if x is None else np.asarray(x).dtype for x in inputs]
    inferred = spec.infer(shapes, dtypes, **attrs)
    out = spec.forward(*inputs, **attrs)
    outs = out if isinstance(out, tuple) else (out,)
    assert len(inferred) == len(outs)
    for (shape, dtype), y in zip(inferred, outs):
        assert tuple(shape) == np.shape(y)
        assert np.dtype(dtype) == np.asarray(y).dtype


def test_dropout_infer_matches_training_forward():
    x = rand((3, 4))
    [(shape, dtype)] = ops.get("dropout").infer([x.shape], [x.dtype], p=0.2, seed=1)
    y = fwd("dropout", x, p=0.2, seed=1, training=True, step=2)
    assert tuple(shape) == y.shape and np.dtype(dtype) == y.dtype


BAD_SHAPES = [
    ("linear", [(2, 3, 4), (5, 6), None], ["float32"] * 2 + [None], {}),
    ("linear", [(2, 4), (4, 6), (5,)], ["float32"] * 3, {}),
    ("linear", [(2, 4), (4, 6, 1), None], ["float32"] * 2 + [None], {}),
    ("matmul", [(2, 3, 4), (2, 5, 4)], ["float32"] * 2, {}),
    ("matmul", [(2, 3, 4), (2, 4, 5)], ["float32"] * 2, {"transpose_b": True}),
    ("matmul", [(3, 4), (4,)], ["float32"] * 2, {}),                    # 1-D operand
    ("add", [(2, 3), (4,)], ["float32"] * 2, {}),
    ("embedding", [(2, 3), (4, 6)], ["float32", "float32"], {}),
    ("split", [(2, 9)], ["float32"], {"sizes": [2, 3]}),
    ("layer_norm", [(2, 4), (4,), (5,)], ["float32"] * 3, {}),
    ("rms_norm", [(2, 4), (3,)], ["float32"] * 2, {}),
    ("gelu", [(2, 4)], ["float32"], {"approximate": "sigmoid"}),
    ("swiglu", [(2, 5)], ["float32"], {}),
    ("dropout", [(2, 5)], ["float32"], {"p": 1.0}),
    ("attention", [(1, 2, 12), (1, 2, 8), (1, 2, 8), None, None, None], ["float32"] * 3 + [None] * 3,
     {"n_heads": 3, "n_kv_heads": 2, "causal": True}),   # n_heads not a multiple of n_kv_heads (else fits)
    ("attention", [(1, 2, 8), (1, 2, 6), (1, 2, 6), None, None, None], ["float32"] * 3 + [None] * 3,
     {"n_heads": 4, "n_kv_heads": 2, "causal": True}),   # k width != n_kv_heads * head_dim
    ("attention", [(1, 2, 8), (1, 2, 4), (1, 2, 4), (1, 3, 4), None, None], ["float32"] * 4 + [None] * 2,
     {"n_heads": 4, "n_kv_heads": 2, "causal": True}),   # past_k without past_v
    ("attention", [(1, 2, 8), (1, 2, 4), (1, 2, 4), (1, 3, 4), (1, 3, 4), (1, 2)], ["float32"] * 5 + ["int64"],
     {"n_heads": 4, "n_kv_heads": 2, "causal": True}),   # mask must cover past + new
    ("attention", [(1, 2, 9), (1, 2, 9), (1, 2, 9), None, None, None], ["float32"] * 3 + [None] * 3,
     {"n_heads": 2, "n_kv_heads": 2, "causal": False}),  # width not divisible by n_heads
    ("rope", [(1, 2, 6), (1, 2)], ["float32", "int64"], {"n_heads": 2}),   # odd head_dim
    ("rope", [(1, 2, 8), (2, 1)], ["float32", "int64"], {"n_heads": 2}),
    ("sinusoidal_positions", [(2, 3)], ["float32"], {"dim": 4, "max_len": 8}),
    ("cross_entropy", [(2, 3, 5), (2, 4)], ["float32", "int64"], {}),
    ("mean_pool", [(2, 3, 4), (2, 4)], ["float32", "int64"], {}),
]


@pytest.mark.parametrize("name, shapes, dtypes, attrs", BAD_SHAPES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(BAD_SHAPES)])
def test_bad_shapes_raise_shape_error_naming_the_op(name, shapes, dtypes, attrs):
    dtypes = [None if d is None else np.dtype(d) for d in dtypes]
    with pytest.raises(ShapeError, match=rf"\b{name}\b") as info:
        ops.get(name).infer(shapes, dtypes, **attrs)
    assert isinstance(info.value, MinitxError)


def test_unknown_op_is_a_minitx_error():
    with pytest.raises(MinitxError, match="no_such_op"):
        ops.get("no_such_op")
