"""Sparse ops: attention restricted to a pattern of keys, and linears whose weights are stored sparse.

``sparse_attention`` has the inputs and outputs of :mod:`minitx.ops.attention` (GQA, causal,
padding mask, KV cache) plus a ``pattern``. Query t sits at absolute position i = S + t; key j is
kept when the causal/padding rules allow it *and* the pattern does:

* ``dense``     — every key (the pattern of plain attention);
* ``local``     — |i − j| < window;
* ``block``     — j in i's block of ``block`` positions, or in one of the first ``n_global`` blocks;
* ``strided``   — |i − j| < stride, or i − j a multiple of ``stride`` (Child et al., 2019);
* ``topk``      — the ``topk`` highest-scoring keys of the row;
* ``threshold`` — keys whose softmax weight is at least ``threshold`` × the row's largest weight.

With ``dense_below`` > 0 a sequence of at most that many keys uses dense attention (the composite
pattern: exact on short inputs, sparse on long ones). The spec computes the dense scores and masks
them — the readable truth; a backend kernel skips the masked blocks. The data-dependent patterns
(top-k, threshold) are treated as fixed masks in the VJP (they are piecewise constant).

Sparse linears compute y = x W + b from a compact form of W (stored (in, out) when dense):

* ``sparse_linear`` — Wᵀ as a CSR matrix (``data``, ``indices``, ``indptr``), shape (out, in);
* ``nm_linear``     — N:M structured: in every group of m consecutive inputs each output keeps n
  weights; ``values`` (in/m·n, out) and their positions in the group, packed ``bits`` to a byte
  (2 bits for 2:4: half the values and a byte per two groups). Input-major like a dense weight,
  so a kernel streams contiguous rows of outputs — at decode the positions select among four
  inputs held in registers, with no gather.

Both take an optional ``scale`` (out,): the stored weights are then integers (int8, what
quantization after pruning stores) and output o's are multiplied by scale[o].
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import scipy.sparse

from . import register, require, wide, wide_forward, wide_vjp
from .attention import (attention_cases, attention_infer, attention_inputs, concat_cache, head_scale, mix_values,
                        probs, probs_vjp)
from .cases import Case, add_cases, randn

PATTERNS = ("dense", "local", "block", "strided", "topk", "threshold")


# ------------------------------------------------------------------------------ attention patterns
def pattern_keys(pattern: str, T: int, S_total: int, *, window: int = 0, block: int = 0, stride: int = 0,
                 n_global: int = 0) -> np.ndarray | None:
    """Boolean (T, S_total): the keys a static pattern keeps for queries at S_total − T … S_total − 1.
    None for the patterns that keep every key or depend on the scores."""
    i = (S_total - T + np.arange(T))[:, None]
    j = np.arange(S_total)[None, :]
    if pattern == "local":
        return np.abs(i - j) < window
    if pattern == "block":
        return (i // block == j // block) | (j // block < n_global)
    if pattern == "strided":
        return (np.abs(i - j) < stride) | ((i - j) % stride == 0)
    return None


def check_pattern(op: str, pattern: str, window: int, block: int, stride: int, n_global: int, topk: int,
                  threshold: float, dense_below: int) -> None:
    require(pattern in PATTERNS, op, f"unknown pattern {pattern!r} (choose from {', '.join(PATTERNS)})")
    need = {"local": ("window", window), "block": ("block", block), "strided": ("stride", stride),
            "topk": ("topk", topk)}
    if pattern in need:
        key, val = need[pattern]
        require(isinstance(val, (int, np.integer)) and val >= 1, op, f"pattern {pattern} needs {key} >= 1, got {val!r}")
    if pattern == "threshold":
        require(0.0 < threshold <= 1.0, op, f"pattern threshold needs threshold in (0, 1], got {threshold!r}")
    require(n_global >= 0 and dense_below >= 0, op, "n_global and dense_below must be >= 0")


def _restrict(pattern, window, block, stride, n_global, topk, threshold, dense_below):
    """The pattern as a ``restrict(scores, keep)`` for attention.probs: which kept keys stay."""
    def restrict(scores, keep):
        T, S_total = scores.shape[-2:]
        if S_total <= dense_below:
            return keep
        static = pattern_keys(pattern, T, S_total, window=window, block=block, stride=stride, n_global=n_global)
        if static is not None:
            keep = keep & static
        masked = np.where(keep, scores, -np.inf)
        if pattern == "topk":  # the k-th largest kept score of each row is the cut-off
            kth = -np.sort(-masked, axis=-1)[..., min(topk, S_total) - 1:min(topk, S_total)]
            keep = keep & (masked >= kth)
        elif pattern == "threshold":  # e^(s − max s) ≥ threshold
            keep = keep & (masked >= masked.max(axis=-1, keepdims=True) + np.log(threshold))
        return keep
    return restrict


@wide_forward
def sparse_attention(q, k, v, past_k=None, past_v=None, mask=None, *, n_heads, n_kv_heads, causal,
                     pattern="dense", window=0, block=0, stride=0, n_global=0, topk=0, threshold=0.0,
                     dense_below=0, scale=None):
    """softmax over the pattern's keys of Q Kᵀ / √d, times V; returns (out, K, V) like attention."""
    K, V = concat_cache(k, v, past_k, past_v)
    restrict = _restrict(pattern, window, block, stride, n_global, topk, threshold, dense_below)
    p, _, _, _ = probs(q, K, mask, n_heads, n_kv_heads, causal, head_scale(q, n_heads, scale), restrict)
    return mix_values(p, V, n_heads, n_kv_heads, q.shape), K, V


@wide_vjp
def sparse_attention_vjp(grads, inputs, outputs, *, n_heads, n_kv_heads, causal, pattern="dense", window=0,
                         block=0, stride=0, n_global=0, topk=0, threshold=0.0, dense_below=0, scale=None):
    q, mask, K = inputs[0], inputs[5], outputs[1]
    scale = head_scale(q, n_heads, scale)
    restrict = _restrict(pattern, window, block, stride, n_global, topk, threshold, dense_below)
    p, keep, qh, kh = probs(q, K, mask, n_heads, n_kv_heads, causal, scale, restrict)
    return probs_vjp(grads, inputs, outputs, p, keep, qh, kh, n_heads, n_kv_heads, scale)


def sparse_attention_infer(shapes, dtypes, *, n_heads, n_kv_heads, causal, pattern="dense", window=0, block=0,
                           stride=0, n_global=0, topk=0, threshold=0.0, dense_below=0, scale=None):
    check_pattern("sparse_attention", pattern, window, block, stride, n_global, topk, threshold, dense_below)
    return attention_infer(shapes, dtypes, n_heads=n_heads, n_kv_heads=n_kv_heads, causal=causal, scale=scale)


def sparse_attention_flops(shapes, outs, *, n_heads, n_kv_heads, causal, pattern="dense", window=0, block=0,
                           stride=0, n_global=0, topk=0, threshold=0.0, dense_below=0, scale=None):
    """FLOPs over the kept keys (what a kernel that skips masked blocks does)."""
    q = shapes[0]
    T, S = q[1], outs[1][1]
    if S <= dense_below or pattern in ("dense", "threshold"):
        kept = S
    elif pattern == "local":
        kept = min(S, 2 * window - 1)
    elif pattern == "block":
        kept = min(S, (1 + n_global) * block)
    elif pattern == "strided":
        kept = min(S, 2 * stride - 1 + S // stride)
    else:  # topk: all scores, then k values
        return 2 * q[0] * T * S * q[2] + 2 * q[0] * T * min(topk, S) * q[2] + 5 * q[0] * n_heads * T * S
    return 4 * q[0] * T * kept * q[2] + 5 * q[0] * n_heads * T * kept


register("sparse_attention", sparse_attention, sparse_attention_vjp, sparse_attention_infer,
         flops=sparse_attention_flops, nondiff=(5,), n_optional=3, may_alias=True)


# ------------------------------------------------------------------------------ over an int8 KV cache
def sparse_attention_kv8(q, k, v, past_k=None, past_k_scale=None, past_v=None, past_v_scale=None, mask=None, *,
                         n_heads, n_kv_heads, causal, pattern="dense", window=0, block=0, stride=0, n_global=0,
                         topk=0, threshold=0.0, dense_below=0, scale=None):
    """``sparse_attention`` over an int8 KV cache, as ``attention_kv8`` is attention over one:
    new k, v quantized per token and head and appended; the pattern applies to the dequantized
    keys. Returns (out, present_k, present_k_scale, present_v, present_v_scale)."""
    from .quant import kv8_forward

    return kv8_forward(sparse_attention, (q, k, v, past_k, past_k_scale, past_v, past_v_scale, mask),
                       _kv8_attrs(locals()))


def _kv8_attrs(scope) -> dict:
    keys = ("n_heads", "n_kv_heads", "causal", "pattern", "window", "block", "stride", "n_global", "topk",
            "threshold", "dense_below", "scale")
    return {k: scope[k] for k in keys}


@wide_vjp
def sparse_attention_kv8_vjp(grads, inputs, outputs, *, n_heads, n_kv_heads, causal, pattern="dense", window=0,
                             block=0, stride=0, n_global=0, topk=0, threshold=0.0, dense_below=0, scale=None):
    from .quant import kv8_vjp

    return kv8_vjp(sparse_attention, sparse_attention_vjp, grads, inputs, _kv8_attrs(locals()))


def sparse_attention_kv8_infer(shapes, dtypes, *, n_heads, n_kv_heads, causal, pattern="dense", window=0, block=0,
                               stride=0, n_global=0, topk=0, threshold=0.0, dense_below=0, scale=None):
    from .quant import attention_kv8_infer

    check_pattern("sparse_attention_kv8", pattern, window, block, stride, n_global, topk, threshold, dense_below)
    return attention_kv8_infer(shapes, dtypes, n_heads=n_heads, n_kv_heads=n_kv_heads, causal=causal, scale=scale)


register("sparse_attention_kv8", sparse_attention_kv8, sparse_attention_kv8_vjp, sparse_attention_kv8_infer,
         flops=sparse_attention_flops, nondiff=(3, 5, 7), n_optional=5)


def _patterned(inputs: Callable[..., Any], pattern: str, **pat: Any) -> Callable[..., Any]:
    """A case builder: the cases ``inputs`` builds (attention's, or its int8-cache variant's), with
    the pattern's attributes added — the same situations for every pattern op."""
    def build(*args: Any, **kw: Any) -> Any:
        base = inputs(*args, **kw)

        def make(r, d):
            case_inputs, attrs = base(r, d)
            return case_inputs, {**attrs, "pattern": pattern, **pat}
        return make
    return build


def _kv8_inputs(*args: Any, **kw: Any) -> Any:
    from .quant import _attn_kv8   # on use, like this module's other uses of quant (op registration order)

    return _attn_kv8(*args, **kw)


def _sparse_kv8(pattern: str, **pat: Any) -> Callable[..., Any]:
    return _patterned(_kv8_inputs, pattern, **pat)


add_cases("sparse_attention_kv8", [
    Case("local 4, decode over an int8 cache", _sparse_kv8("local", window=4)(3, 1, 11, 6, 2, 16, True, True, True)),
    Case("block 3, prefill after cache", _sparse_kv8("block", block=3, n_global=1)(2, 5, 7, 4, 2, 8, True, True, True)),
    Case("strided 3, prefill", _sparse_kv8("strided", stride=3)(2, 9, 0, 4, 4, 8, True, False, False)),
    Case("top-3, decode", _sparse_kv8("topk", topk=3)(2, 1, 9, 2, 2, 8, True, True, True)),
])


# ------------------------------------------------------------------------------ CSR linear
def _csr(data, indices, indptr, shape):
    return scipy.sparse.csr_array((data, indices, indptr), shape=tuple(shape))


def _real(a):
    """Stored weights as floats for the spec's arithmetic: integers (quantized) to float32, 16-bit
    floats widened (scipy.sparse has no float16)."""
    return a.astype(np.float32) if a.dtype.kind in "iu" else wide(a)


def sparse_linear(x, data, indices, indptr, b=None, scale=None, *, shape):
    """y = x W + b, where Wᵀ (out, in) = CSR(data, indices, indptr): only the kept weights are
    stored. With ``scale`` (out,) the data are integers (int8 after quantization) and output o's
    weights are data · scale[o]."""
    Wt = _csr(_real(data), indices, indptr, shape)
    rows = wide(x).reshape(-1, x.shape[-1])
    y = np.asarray((Wt @ rows.T).T)
    if scale is not None:
        y = y * wide(scale)
    y = y.astype(x.dtype).reshape(*x.shape[:-1], shape[0])
    return y if b is None else y + b


def sparse_linear_vjp(grads, inputs, outputs, *, shape):
    (g,) = grads
    x, data, indices, indptr, b, scale = inputs
    Wt = _csr(_real(data), indices, indptr, shape)
    rows = x.reshape(-1, x.shape[-1])
    g2 = g.reshape(-1, shape[0])
    gs = g2 if scale is None else g2 * scale                    # the cotangent of the unscaled product
    gx = np.asarray(wide(gs) @ Wt).astype(x.dtype).reshape(x.shape)   # ∂/∂x = g W
    out_of = np.repeat(np.arange(shape[0]), np.diff(indptr))    # the output row of every stored weight
    gdata = None
    if scale is None:   # ∂/∂Wᵀ[o, i] = Σ_n g[n, o] x[n, i]; integer data have no gradient
        gdata = np.einsum("nk,nk->k", g2[:, out_of], rows[:, indices]).astype(data.dtype)
    gscale = None if scale is None else np.einsum("no,no->o", g2, np.asarray((Wt @ rows.T).T)).astype(scale.dtype)
    gb = None if b is None else g2.sum(axis=0)
    return gx, gdata, None, None, gb, gscale


def sparse_linear_infer(shapes, dtypes, *, shape):
    x, data, indices, indptr, b, scale = shapes
    op = "sparse_linear"
    require(len(shape) == 2, op, f"shape must be (out, in), got {shape}")
    out_f, in_f = shape
    require(x[-1] == in_f, op, f"input features {x[-1]} != in features {in_f} of shape {tuple(shape)}")
    require(len(data) == 1 and tuple(indices) == tuple(data), op, f"data {data} and indices {indices} must be equal 1-D")
    require(tuple(indptr) == (out_f + 1,), op, f"indptr {indptr} must be ({out_f + 1},)")
    require(np.issubdtype(np.dtype(dtypes[2]), np.integer) and np.issubdtype(np.dtype(dtypes[3]), np.integer), op,
            f"indices/indptr must be integers, got {dtypes[2]}/{dtypes[3]}")
    require(b is None or tuple(b) == (out_f,), op, f"bias shape {b} != ({out_f},)")
    _check_scale(op, dtypes[1], scale, out_f)
    return [((*x[:-1], out_f), dtypes[0])]


def _check_scale(op, dtype, scale, out_f):
    """Float weights alone, or integer weights with one scale per output."""
    integer = np.issubdtype(np.dtype(dtype), np.integer)
    require(integer == (scale is not None), op,
            f"weights of dtype {np.dtype(dtype)} {'need' if integer else 'take no'} scale (out,)")
    require(scale is None or tuple(scale) == (out_f,), op, f"scale shape {scale} != ({out_f},)")


def sparse_linear_flops(shapes, outs, *, shape):
    return 2 * int(np.prod(shapes[0][:-1])) * shapes[1][0]


register("sparse_linear", sparse_linear, sparse_linear_vjp, sparse_linear_infer, flops=sparse_linear_flops,
         nondiff=(2, 3), n_optional=2, vjp_uses_outputs=False)


# ------------------------------------------------------------------------------ N:M linear
def index_bits(m: int) -> int:
    """Bits per stored position for groups of m: 1, 2, 4 or 8 (2 for 2:4)."""
    return next(b for b in (1, 2, 4, 8) if (1 << b) >= m)


def pack_positions(pos: np.ndarray, m: int) -> np.ndarray:
    """(K, out) positions in [0, m) → (⌈K·bits/8⌉, out) uint8: ``8 / bits`` consecutive rows per
    byte, the first in the lowest bits (2:4: the four positions of two groups in one byte)."""
    bits = index_bits(m)
    per = 8 // bits
    K, out_f = pos.shape
    padded = np.zeros((-(-K // per) * per, out_f), dtype=np.uint8)
    padded[:K] = pos
    shifts = (bits * np.arange(per)).astype(np.uint8)[None, :, None]
    return (padded.reshape(-1, per, out_f) << shifts).sum(axis=1).astype(np.uint8)


def unpack_positions(packed: np.ndarray, m: int, K: int) -> np.ndarray:
    bits = index_bits(m)
    per = 8 // bits
    shifts = (bits * np.arange(per)).astype(np.uint8)[None, :, None]
    pos = (packed[:, None, :] >> shifts) & np.uint8((1 << bits) - 1)
    return pos.reshape(-1, packed.shape[1])[:K].astype(np.int64)


def nm_rows(packed, n, m, K):
    """Input feature of every stored value (K, out): (group) · m + (position in the group)."""
    return (np.arange(K) // n)[:, None] * m + unpack_positions(packed, m, K)


def nm_dense(values, packed, *, n, m, in_features, scale=None):
    """The dense W (in, out) an N:M pair (values, packed positions) stands for (times ``scale``
    per output for integer values)."""
    K, out_f = values.shape
    W = np.zeros((in_features, out_f), dtype=_real(values).dtype)
    np.put_along_axis(W, nm_rows(packed, n, m, K), _real(values), axis=0)
    return W if scale is None else W * wide(scale)


def nm_linear(x, values, idx, b=None, scale=None, *, n, m, in_features):
    """y = x W + b with W N:M sparse: per output, n weights kept in every m consecutive inputs.
    Stored like a linear's weight, input-major: ``values`` (in/m·n, out), row k holding slot
    k mod n of group k div n, and ``idx`` their positions in the group, packed along the rows
    (:func:`pack_positions`). With ``scale`` (out,) the values are integers (int8) times it."""
    y = (wide(x) @ nm_dense(values, idx, n=n, m=m, in_features=in_features, scale=scale)).astype(x.dtype)
    return y if b is None else y + b


def nm_linear_vjp(grads, inputs, outputs, *, n, m, in_features):
    (g,) = grads
    x, values, idx, b, scale = inputs
    W = nm_dense(values, idx, n=n, m=m, in_features=in_features)        # unscaled
    g2 = g.reshape(-1, g.shape[-1])
    gs = g2 if scale is None else g2 * scale
    x2 = x.reshape(-1, in_features)
    gvalues = None
    if scale is None:   # ∂/∂W = xᵀ g, read at the stored slots; integer values have no gradient
        gvalues = np.take_along_axis(x2.T @ g2, nm_rows(idx, n, m, values.shape[0]), axis=0).astype(values.dtype)
    gscale = None if scale is None else np.einsum("no,no->o", g2, x2 @ W).astype(scale.dtype)
    gb = None if b is None else g2.sum(axis=0)
    return (gs @ W.T).astype(x.dtype).reshape(x.shape), gvalues, None, gb, gscale


def nm_linear_infer(shapes, dtypes, *, n, m, in_features):
    x, values, idx, b, scale = shapes
    op = "nm_linear"
    require(0 < n <= m <= 256, op, f"need 0 < n <= m <= 256, got {n}:{m}")
    require(in_features % m == 0, op, f"in_features {in_features} is not a multiple of m={m}")
    K = in_features // m * n
    require(x[-1] == in_features, op, f"input features {x[-1]} != in_features {in_features}")
    require(len(values) == 2 and values[0] == K, op, f"values {values} must be ({K}, out) for {n}:{m}")
    per = 8 // index_bits(m)
    require(tuple(idx) == (-(-K // per), values[1]), op, f"idx {idx} must be ({-(-K // per)}, {values[1]})")
    require(np.dtype(dtypes[2]) == np.uint8, op, f"idx must be uint8, got {dtypes[2]}")
    require(b is None or tuple(b) == (values[1],), op, f"bias shape {b} != ({values[1]},)")
    _check_scale(op, dtypes[1], scale, values[1])
    return [((*x[:-1], values[1]), dtypes[0])]


def nm_linear_flops(shapes, outs, *, n, m, in_features):
    return 2 * int(np.prod(shapes[0][:-1])) * shapes[1][0] * shapes[1][1]


register("nm_linear", nm_linear, nm_linear_vjp, nm_linear_infer, flops=nm_linear_flops, nondiff=(2,),
         n_optional=2, vjp_uses_outputs=False)


# ------------------------------------------------------------------------ conformance cases
def _sparse_attn(pattern: str, **pat: Any) -> Callable[..., Any]:
    return _patterned(attention_inputs, pattern, **pat)


add_cases("sparse_attention", [
    Case("local window 4", _sparse_attn("local", window=4)(2, 16, 0, 4, 2, 8, True, True, False)),
    Case("local, decode over cache", _sparse_attn("local", window=6)(2, 1, 20, 4, 2, 8, True, True, True)),
    Case("block 4", _sparse_attn("block", block=4)(2, 16, 0, 4, 2, 8, True, True, False)),
    Case("strided 4, bidirectional",
         _sparse_attn("strided", stride=4, window=2)(2, 12, 0, 4, 2, 8, False, True, False)),
    Case("top-3", _sparse_attn("topk", topk=3)(2, 10, 0, 4, 2, 8, True, True, False)),
    Case("strided 3, causal, prefill after cache", _sparse_attn("strided", stride=3)(2, 13, 7, 4, 2, 8, True, True, True)),
    Case("block 3, 2 global, prefill after cache",
         _sparse_attn("block", block=3, n_global=2)(2, 11, 6, 4, 2, 8, True, True, True)),
    Case("top-4, decode over cache", _sparse_attn("topk", topk=4)(3, 1, 15, 4, 2, 8, True, True, True)),
    Case("top-5, prefill after cache (many queries)", _sparse_attn("topk", topk=5)(2, 12, 6, 4, 2, 8, True, True, True)),
    Case("threshold 0.05, bidirectional", _sparse_attn("threshold", threshold=0.05)(2, 11, 0, 4, 2, 8, False, True, False)),
    Case("top-3 over tied scores", _sparse_attn("topk", topk=3)(2, 10, 0, 4, 2, 8, True, True, False, scale=0.0),
         "ties"),
    # With the dense pattern every attention situation applies.
    *[Case("dense, " + c.name, c.make, c.family) for c in attention_cases(_sparse_attn("dense"))
      if c.family in ("masked", "large", "sizes")],
])


def _csr_of(w, keep):
    """(data, int16 indices, int32 indptr) of the CSR Wᵀ holding the kept weights of w (in, out)."""
    wt, kt = w.T, keep.T
    cols = [np.nonzero(row)[0] for row in kt]
    data = np.concatenate([wt[o, c] for o, c in enumerate(cols)])
    ptr = np.concatenate([[0], np.cumsum([len(c) for c in cols])]).astype(np.int32)
    return data.astype(w.dtype), np.concatenate(cols).astype(np.int16), ptr


def _int8(r, n_out, d):
    """Integer weights in [-127, 127] and one positive scale per output: what quantization stores."""
    return lambda size: r.integers(-127, 128, size).astype(np.int8), (r.random(n_out) * 0.01 + 1e-3).astype(d)


def _sparse_linear(rows, n_in, n_out, density, bias=True, quantized=False):
    def make(r, d):
        w = randn(r, (n_in, n_out), d, 0.1)
        data, idx, ptr = _csr_of(w, r.random(w.shape) < density)
        scale = None
        if quantized:
            ints, scale = _int8(r, n_out, d)
            data = ints(data.size)
        return ((randn(r, (rows, 2, n_in), d), data, idx, ptr, randn(r, (n_out,), d) if bias else None, scale),
                {"shape": [n_out, n_in]})
    return make


add_cases("sparse_linear", [
    Case("30% dense", _sparse_linear(3, 64, 96, 0.3)),
    Case("80% dense", _sparse_linear(1, 64, 96, 0.8)),
    Case("empty output rows", _sparse_linear(2, 64, 96, 0.01, bias=False), "zeros"),
    Case("int8 data, scale per output, 1 row", _sparse_linear(1, 64, 96, 0.4, quantized=True)),
    Case("int8 data, scale per output, 9 rows", _sparse_linear(9, 64, 96, 0.4, bias=False, quantized=True)),
    # many rows: below the backends' density switch (numba: 0.4) the CSR kernel, above it dense panels
    Case("10% dense, 40 rows", _sparse_linear(20, 64, 96, 0.1)),
    Case("int8 data, 10% dense, 40 rows", _sparse_linear(20, 64, 96, 0.1, quantized=True)),
    Case("int8 data, 60% dense, 40 rows", _sparse_linear(20, 64, 96, 0.6, bias=False, quantized=True)),
    *[Case(f"{m} rows, 50% dense", _sparse_linear(m, 33, 65, 0.5), "sizes") for m in (7, 9, 65)],
])


def nm_pack(w: np.ndarray, keep: np.ndarray, n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(values (in/m·n, out), packed positions) of the kept weights of w (in, out), where
    ``keep`` holds exactly n of every m consecutive inputs per output."""
    in_f, out_f = w.shape
    rows = np.nonzero(keep.T)[1].reshape(out_f, in_f // m * n).T   # (K, out), ascending within a group
    values = np.ascontiguousarray(np.take_along_axis(w, rows, axis=0))
    return values, pack_positions(rows % m, m)


def _nm_linear(rows, n_in, n_out, bias=False, quantized=False):
    def make(r, d):
        w = randn(r, (n_in, n_out), d, 0.1)
        g = np.abs(w).reshape(n_in // 4, 4, n_out)
        keep = np.zeros(g.shape, bool)
        np.put_along_axis(keep, np.argsort(-g, axis=1, kind="stable")[:, :2], True, axis=1)
        values, packed = nm_pack(w, keep.reshape(w.shape), 2, 4)
        scale = None
        if quantized:
            ints, scale = _int8(r, n_out, d)
            values = ints(values.shape)
        return (randn(r, (rows, 1, n_in), d), values, packed, randn(r, (n_out,), d) if bias else None, scale), \
            {"n": 2, "m": 4, "in_features": n_in}
    return make


add_cases("nm_linear", [Case("2:4, 1 row", _nm_linear(1, 64, 96)), Case("2:4, 5 rows", _nm_linear(5, 64, 96, True)),
                        Case("2:4, 40 rows (prefill)", _nm_linear(40, 64, 96, True)),
                        Case("2:4 int8, 1 row", _nm_linear(1, 64, 96, True, quantized=True)),
                        Case("2:4 int8, 40 rows", _nm_linear(40, 64, 96, quantized=True)),
                        *[Case(f"2:4, {m} rows", _nm_linear(m, 68, 65), "sizes") for m in (7, 9, 65)]])
