"""A zoo of deliberately wrong kernels: the mistakes real kernels make, each packaged as a tiny
third-party backend. tests/test_mutants.py asserts the conformance suite rejects every one; a
mutant that passes means the suite has a blind spot, not that the mutant is harmless.

Every mutant is the spec with one thing wrong, so the only way to catch it is the thing itself.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from minitx import ops
from minitx.backend import Backend
from minitx.ops import activations as A
from minitx.ops import attention as T
from minitx.ops import norms as N
from minitx.ops import positions as P
from minitx.ops import quant as Q


class Mutant(Backend):
    """One wrong kernel (or VJP) for ``op``; everything else is left to the spec."""

    dtypes = frozenset({"float32", "float64"})

    def __init__(self, name: str, op: str, why: str, forward: Callable | None = None, vjp: Callable | None = None,
                 dtypes: frozenset[str] | None = None) -> None:
        super().__init__()
        self.name, self.op, self.why = f"mutant-{name}", op, why
        if dtypes is not None:
            self.dtypes = dtypes
        if forward is not None:
            self.kernels = {op: forward}
        if vjp is not None:
            self.vjps = {op: vjp}


# --------------------------------------------------------------------------- the mistakes
def softmax_no_max(x, *, axis=-1):
    e = np.exp(x)                              # overflows once a logit passes ~88 in float32
    return e / e.sum(axis=axis, keepdims=True)


def softmax_partial_tile_sum(x, *, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    n = e.shape[-1] // 8 * 8 or e.shape[-1]    # the last partial tile of 8 columns is not summed
    return e / e[..., :n].sum(axis=-1, keepdims=True)


def layer_norm_one_pass(x, weight, bias, *, eps=1e-5):
    mu = x.mean(axis=-1, keepdims=True)
    var = (x * x).mean(axis=-1, keepdims=True) - mu * mu    # E[x²] − E[x]²: cancels for offset rows
    return (x - mu) / np.sqrt(np.maximum(var, 0) + eps) * weight + bias


def layer_norm_eps_outside(x, weight, bias, *, eps=1e-5):
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / (np.sqrt(var) + eps) * weight + bias


def layer_norm_float64(x, weight, bias, *, eps=1e-5):
    return N.layer_norm(x.astype(np.float64), weight, bias, eps=eps)   # widens float32 to float64


def layer_norm_vjp_no_mean(grads, inputs, outputs, *, eps=1e-5):
    (g,) = grads
    x, weight, bias = inputs
    mu = x.mean(axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt(((x - mu) ** 2).mean(axis=-1, keepdims=True) + eps)
    xhat = (x - mu) * rstd
    gxhat = g * weight
    gx = rstd * (gxhat - xhat * (gxhat * xhat).mean(axis=-1, keepdims=True))   # forgot − mean(ĝ)
    rows = (-1, x.shape[-1])
    return gx, (g * xhat).reshape(rows).sum(axis=0), g.reshape(rows).sum(axis=0)


def rms_norm_assumes_contiguous(x, weight, *, eps=1e-6):
    """Reads x's memory as if it were row-major, as a kernel taking a raw pointer would."""
    c = np.lib.stride_tricks.as_strided(x, x.shape, tuple(np.cumprod((1,) + x.shape[:0:-1])[::-1] * x.itemsize))
    return N.rms_norm(np.array(c), weight, eps=eps)


def rms_norm_no_eps(x, weight, *, eps=1e-6):
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True)) * weight   # 0/0 on a zero row


def rms_norm_in_place(x, weight, *, eps=1e-6):
    x *= 1.0 / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)     # overwrites its input
    return x * weight


def gelu_wrong_constant(x, *, approximate="none"):
    return 0.5 * x * (1.0 + np.tanh(0.8 * (x + 0.044715 * x**3)))


def gelu_tanh_for_erf(x, *, approximate="none"):
    return A.gelu(x, approximate="tanh")                        # ignores the attribute


def gelu_vjp_half(grads, inputs, outputs, *, approximate="none"):
    return (0.5 * A.gelu_vjp(grads, inputs, outputs, approximate=approximate)[0],)   # wrong VJP scale


def silu_float64(x):
    return A.silu(x.astype(np.float64))


def relu_in_place(x):
    return np.maximum(x, 0, out=x)


def relu_alias_fast_path(x):
    return x if not (x < 0).any() else np.maximum(x, 0)    # returns its input when nothing changes


def linear_square_transposed(x, w, b=None):
    wm = w.T if w.shape[0] == w.shape[1] else w               # the wrong layout, right shape
    y = x @ wm
    return y if b is None else y + b


def linear_drops_last_tile(x, w, b=None):
    rows = x.reshape(-1, x.shape[-1])
    y = np.zeros((rows.shape[0], w.shape[1]), x.dtype)
    full = rows.shape[0] // 8 * 8                             # tiles of 8 rows; the remainder is lost
    y[:full] = rows[:full] @ w
    if b is not None:
        y += b
    return y.reshape(*x.shape[:-1], w.shape[1])


def matmul_ignores_transpose_on_square(a, b, *, transpose_b=False):
    t = transpose_b and b.shape[-1] != b.shape[-2]
    return a @ (np.swapaxes(b, -1, -2) if t else b)


def _attention(q, k, v, past_k=None, past_v=None, mask=None, *, n_heads, n_kv_heads, causal, scale=None,
               restrict=None, scale_of=None):
    K, V = T.concat_cache(k, v, past_k, past_v)
    sc = T.head_scale(q, n_heads, scale) if scale_of is None else scale_of(q, n_heads)
    p, _, _, _ = T.probs(q, K, mask, n_heads, n_kv_heads, causal, sc, restrict)
    return T.mix_values(p, V, n_heads, n_kv_heads, q.shape), K, V


def attention_mask_ignored(q, k, v, past_k=None, past_v=None, mask=None, **kw):
    return _attention(q, k, v, past_k, past_v, None, **kw)


def attention_never_causal(q, k, v, past_k=None, past_v=None, mask=None, *, causal, **kw):
    return _attention(q, k, v, past_k, past_v, mask, causal=False, **kw)


def attention_cache_offset(q, k, v, past_k=None, past_v=None, mask=None, *, causal, **kw):
    """Causal query t may see keys ≤ t, forgetting the S cached positions before it."""
    T_ = q.shape[1]
    early = (lambda s, keep: keep & (np.arange(s.shape[-1])[None, :] <= np.arange(T_)[:, None])) if causal else None
    return _attention(q, k, v, past_k, past_v, mask, causal=False, restrict=early, **kw)


def attention_scale_1_over_d(q, k, v, past_k=None, past_v=None, mask=None, **kw):
    return _attention(q, k, v, past_k, past_v, mask, **kw,
                      scale_of=lambda q, h: q.dtype.type(1.0 / (q.shape[-1] // h)))


def attention_dead_row_nan(q, k, v, past_k=None, past_v=None, mask=None, *, n_heads, n_kv_heads, causal,
                           scale=None):
    K, V = T.concat_cache(k, v, past_k, past_v)
    B, Tq, _ = q.shape
    G = n_heads // n_kv_heads
    qh = T._heads(q, n_heads).reshape(B, n_kv_heads, G, Tq, -1)
    kh = T._heads(K, n_kv_heads)[:, :, None]
    s = (qh @ np.swapaxes(kh, -1, -2)) * T.head_scale(q, n_heads, scale)
    s = np.where(T.allowed_keys(Tq, K.shape[1], mask, causal, B)[:, :, None], s, -np.inf)   # −inf rows → NaN
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return T.mix_values(e / e.sum(axis=-1, keepdims=True), V, n_heads, n_kv_heads, q.shape), K, V


def attention_gqa_interleaved(q, k, v, past_k=None, past_v=None, mask=None, *, n_heads, n_kv_heads, causal,
                              scale=None):
    """Query head h reads kv head h % KV instead of h // G."""
    B, Tq, HD = q.shape
    D, G = HD // n_heads, n_heads // n_kv_heads
    perm = np.arange(n_heads).reshape(G, n_kv_heads).T.reshape(-1)    # heads grouped the other way
    qp = q.reshape(B, Tq, n_heads, D)[:, :, perm].reshape(B, Tq, HD)
    out, K, V = T.attention(qp, k, v, past_k, past_v, mask, n_heads=n_heads, n_kv_heads=n_kv_heads,
                            causal=causal, scale=scale)
    inv = np.argsort(perm)
    return out.reshape(B, Tq, n_heads, D)[:, :, inv].reshape(B, Tq, HD), K, V


def attention_vjp_unscaled(grads, inputs, outputs, *, n_heads, n_kv_heads, causal, scale=None):
    q, mask, K = inputs[0], inputs[5], outputs[1]
    sc = T.head_scale(q, n_heads, scale)
    p, keep, qh, kh = T.probs(q, K, mask, n_heads, n_kv_heads, causal, sc)
    return T.probs_vjp(grads, inputs, outputs, p, keep, qh, kh, n_heads, n_kv_heads, q.dtype.type(1))


def rope_sign(x, positions, *, n_heads, theta=10000.0):
    return P.rope(x, -positions, n_heads=n_heads, theta=theta)       # rotates the other way


def rope_float32_angles(x, positions, *, n_heads, theta=10000.0):
    B, Tq, HD = x.shape
    D = HD // n_heads
    inv = (np.float32(theta) ** (-np.arange(0, D, 2, dtype=np.float32) / np.float32(D))).astype(np.float32)
    ang = positions.astype(np.float32)[..., None, None] * inv
    cos, sin = np.cos(ang).astype(x.dtype), np.sin(ang).astype(x.dtype)
    xh = x.reshape(B, Tq, n_heads, D)
    x1, x2 = xh[..., : D // 2], xh[..., D // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(B, Tq, HD)


def cross_entropy_counts_ignored(logits, targets, *, ignore_index=-100):
    keep = targets != ignore_index
    return np.asarray(ops.get("cross_entropy").forward(logits, targets, ignore_index=ignore_index)
                      * max(int(keep.sum()), 1) / targets.size, dtype=logits.dtype)


def mean_pool_mask_ignored(x, mask):
    return x.mean(axis=1)


def l2_normalize_no_eps(x, *, eps=1e-12):
    return x / np.sqrt((x * x).sum(axis=-1, keepdims=True))


def linear_q4_nibbles_swapped(x, w, scale, b=None, *, group=32, transposed=False):
    swapped = ((w >> 4) | (w << 4)).astype(np.uint8)
    return Q.linear_q4(x, swapped, scale, b, group=group, transposed=transposed)


def linear_w8a8_cast_first(x, w, scale, b=None):
    q, sx = Q.quantize_rows(x)
    acc = (q.astype(np.float64) @ w.astype(np.float64)).astype(x.dtype)   # overflows float16 at 65504
    y = acc * sx * scale
    return y if b is None else y + b


def attention_kv8_swapped_scales(q, k, v, past_k=None, past_k_scale=None, past_v=None, past_v_scale=None,
                                 mask=None, **kw):
    return Q.attention_kv8(q, k, v, past_k, past_v_scale, past_v, past_k_scale, mask, **kw)


def sparse_local_window_off_by_one(q, k, v, past_k=None, past_v=None, mask=None, *, window=0, pattern="dense", **kw):
    w = window + 1 if pattern == "local" else window
    return ops.get("sparse_attention").forward(q, k, v, past_k, past_v, mask, pattern=pattern, window=w, **kw)


def embedding_clamps_last_row(ids, table):
    return table[np.minimum(ids, table.shape[0] - 2)]      # an exclusive bound where it was inclusive


F16 = frozenset({"float16"})

ZOO: list[Mutant] = [
    Mutant("softmax-no-max", "softmax", "exp without subtracting the row max", softmax_no_max),
    Mutant("softmax-partial-tile", "softmax", "last partial tile left out of the sum", softmax_partial_tile_sum),
    Mutant("layer-norm-one-pass", "layer_norm", "one-pass variance E[x²]−E[x]²", layer_norm_one_pass),
    Mutant("layer-norm-eps-outside", "layer_norm", "ε added outside the square root", layer_norm_eps_outside),
    Mutant("layer-norm-float64", "layer_norm", "float32 in, float64 out", layer_norm_float64),
    Mutant("layer-norm-vjp-no-mean", "layer_norm", "VJP without the −mean(ĝ) term", vjp=layer_norm_vjp_no_mean),
    Mutant("rms-norm-no-eps", "rms_norm", "no ε: zero rows divide 0 by 0", rms_norm_no_eps),
    Mutant("rms-norm-raw-pointer", "rms_norm", "strided input read as row-major memory", rms_norm_assumes_contiguous),
    Mutant("rms-norm-in-place", "rms_norm", "normalises its input in place", rms_norm_in_place),
    Mutant("gelu-constant", "gelu", "√(2/π) mistyped", gelu_wrong_constant),
    Mutant("gelu-tanh-for-erf", "gelu", "tanh form where erf was asked", gelu_tanh_for_erf),
    Mutant("gelu-vjp-half", "gelu", "VJP off by a factor of 2", vjp=gelu_vjp_half),
    Mutant("silu-float64", "silu", "dtype widening to float64", silu_float64),
    Mutant("relu-in-place", "relu", "writes the result into its input", relu_in_place),
    Mutant("relu-alias", "relu", "returns its input object when nothing is negative", relu_alias_fast_path),
    Mutant("linear-square-transposed", "linear", "Wᵀ for W on square weights", linear_square_transposed),
    Mutant("linear-last-tile", "linear", "rows past the last full tile of 8 dropped", linear_drops_last_tile),
    Mutant("matmul-transpose-square", "matmul", "transpose_b ignored for square b",
           matmul_ignores_transpose_on_square),
    Mutant("attention-mask-ignored", "attention", "padding mask ignored", attention_mask_ignored),
    Mutant("attention-not-causal", "attention", "causal flag ignored", attention_never_causal),
    Mutant("attention-cache-offset", "attention", "causal mask forgets the KV-cache offset", attention_cache_offset),
    Mutant("attention-scale", "attention", "scores scaled by 1/d instead of 1/√d", attention_scale_1_over_d),
    Mutant("attention-dead-row-nan", "attention", "fully masked rows give NaN", attention_dead_row_nan),
    Mutant("attention-gqa-groups", "attention", "query heads mapped to kv heads interleaved",
           attention_gqa_interleaved),
    Mutant("attention-vjp-unscaled", "attention", "VJP forgets the score scale", vjp=attention_vjp_unscaled),
    Mutant("rope-sign", "rope", "rotates by −θ", rope_sign),
    Mutant("rope-float32-angles", "rope", "angles of far positions in float32", rope_float32_angles),
    Mutant("cross-entropy-ignored", "cross_entropy", "ignored targets counted in the mean",
           cross_entropy_counts_ignored),
    Mutant("mean-pool-mask-ignored", "mean_pool", "padding averaged in", mean_pool_mask_ignored),
    Mutant("l2-normalize-no-eps", "l2_normalize", "no ε: zero rows give NaN", l2_normalize_no_eps),
    Mutant("linear-q4-nibbles", "linear_q4", "low and high nibbles swapped", linear_q4_nibbles_swapped),
    Mutant("w8a8-cast-first", "linear_w8a8", "integer sums cast to float16 before rescaling",
           linear_w8a8_cast_first, dtypes=F16),
    Mutant("kv8-scales-swapped", "attention_kv8", "key and value cache scales swapped",
           attention_kv8_swapped_scales),
    Mutant("sparse-local-off-by-one", "sparse_attention", "local window one key too wide",
           sparse_local_window_off_by_one),
    Mutant("embedding-last-row", "embedding", "last table row unreachable", embedding_clamps_last_row),
]


def by_name() -> dict[str, Any]:
    return {m.name: m for m in ZOO}
