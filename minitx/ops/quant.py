"""Quantized ops: linears over int8/int4/narrow-float weights, and attention with an int8 KV cache.

Every scheme is symmetric: a real value is ``q · s`` with an integer ``q`` and a float scale ``s``
shared by a group of values (an output channel, a block of 32 inputs, a token's head).

* ``linear_q8``       W = Wq · s[out]                  int8 per output channel (weight-only)
* ``embedding_q8``    E = Eq · s[row]                  int8 table, a scale per row (also the tied LM head)
* ``linear_q8_block`` W = Wq · s[in // block, out]     int8, one scale per 32 inputs (llama.cpp Q8_0)
* ``linear_q4``       W = (nibble − 8) · s[in // group, out], two 4-bit values per byte
                      (``transposed``: stored (out, in/2), the decode layout and the int4 LM head)
* ``embedding_q4``    E = (nibble − 8) · s[row, col // group], packed along rows (also the tied LM head)
* ``linear_w8a8``     x ≈ round(x / sₓ) · sₓ per token (sₓ = max|x_row| / 127), then an integer
                      product with int8 weights, rescaled by sₓ · s[out]
* ``linear_q8_0``     int8 weights (out, in), a scale per output and 32 inputs, times activations
                      quantized to int8 per 32 inputs at run time: llama.cpp's Q8_0 dot product
                      (integer sums per block; VJP straight-through for the activation rounding)
* ``linear_cast``     W stored as float16, or as bfloat16 bit patterns in uint16 (NumPy has none)
* ``attention_kv8``   attention whose cache is int8 with a scale per token and head
* ``linear_lut``      W = level[code] · s[out, in // group] from a codebook: binary (1 bit), ternary
                      and int2 (2 bits), log4 (4-bit powers of two); codes packed along inputs

VJPs give the gradient with respect to every float input (activations, scales, biases) and
``None`` for integer inputs. Where an activation itself is rounded (W8A8, the KV cache) the VJP is
the derivative of the quantized function as written — zero through ``round``, non-zero through the
max-abs scale — so it agrees with finite differences; quantization-aware training would use a
straight-through estimator instead, which is a different function.

The quantizers at the bottom (``quantize_*``) are the one definition of each packed format; the
quant plugin and the tests use them.
"""
from __future__ import annotations

import numpy as np

from . import register, require, wide_vjp
from .attention import attention, attention_infer, attention_inputs, attention_vjp
from .cases import Case, add_cases, int8_grid, randn


def _sum_rows(g: np.ndarray) -> np.ndarray:
    return g.reshape(-1, g.shape[-1]).sum(axis=0)


def _rows(x: np.ndarray) -> np.ndarray:
    return x.reshape(-1, x.shape[-1])


def _linear_infer(op: str, packed_rows: int = 1):
    """Shape rule shared by the quantized linears: x (…, in), weight (in / packed_rows, out)."""

    def infer(shapes, dtypes, **attrs):
        x, w, s, b = shapes
        require(len(w) == 2, op, f"weight must be 2-D, got shape {w}")
        n_in = w[0] * packed_rows
        require(x[-1] == n_in, op, f"input features {x[-1]} != weight rows {n_in} (weight {w})")
        require(b is None or tuple(b) == (w[1],), op, f"bias shape {b} != ({w[1]},)")
        group = attrs.get("block") or attrs.get("group")
        if group is None:
            require(tuple(s) == (w[1],), op, f"scale shape {s} != ({w[1]},)")
        else:
            require(n_in % group == 0, op, f"group size {group} does not divide the input features {n_in}")
            require(tuple(s) == (n_in // group, w[1]), op, f"scale shape {s} != ({n_in // group}, {w[1]})")
        return [((*x[:-1], w[1]), dtypes[0])]

    return infer


def _linear_flops(packed_rows: int = 1):
    def flops(shapes, outs, **attrs):
        x, w = shapes[0], shapes[1]
        return 2 * int(np.prod(x[:-1])) * w[0] * packed_rows * w[1]

    return flops


# ------------------------------------------------------------------------ int8 per channel
def linear_q8(x, w, scale, b=None, *, transposed=False):
    """y = x (Wq · s) + b, Wq int8 (in, out), s (out,): one scale per output channel.

    ``transposed``: Wq is stored (out, in) — a tied embedding table quantized per row serving as
    the LM head (logits = x Eᵀ), so one int8 copy feeds both."""
    wf = w.astype(x.dtype)
    y = (x @ (wf.T if transposed else wf)) * scale
    return y if b is None else y + b


def linear_q8_vjp(grads, inputs, outputs, *, transposed=False):
    (g,) = grads
    x, w, scale, b = inputs
    wf = w.astype(g.dtype)
    wf = wf.T if transposed else wf
    gx = (g * scale) @ wf.T
    gs = (g * (x @ wf)).reshape(-1, g.shape[-1]).sum(axis=0)
    return gx, None, gs, None if b is None else _sum_rows(g)


def _linear_q8_infer(shapes, dtypes, *, transposed=False):
    x, w, s, b = shapes
    if transposed and w is not None and len(w) == 2:
        w = (w[1], w[0])
    return _linear_infer("linear_q8")([x, w, s, b], dtypes)


def _linear_q8_flops(shapes, outs, *, transposed=False):
    return 2 * int(np.prod(shapes[0][:-1])) * shapes[1][0] * shapes[1][1]


register("linear_q8", linear_q8, linear_q8_vjp, _linear_q8_infer, flops=_linear_q8_flops,
         n_optional=1, vjp_uses_outputs=False)


# ------------------------------------------------------------------------ int8 embedding table
def embedding_q8(ids, table, scale):
    """E[ids] with E = Eq · s[row]: int8 table (V, C), one scale per row; only looked-up rows are
    dequantized."""
    return table[ids].astype(scale.dtype) * scale[ids][..., None]


def embedding_q8_vjp(grads, inputs, outputs):
    (g,) = grads
    ids, table, scale = inputs
    gs = np.zeros_like(scale)
    np.add.at(gs, ids.reshape(-1), (g * table[ids]).reshape(-1, table.shape[1]).sum(axis=1))
    return None, None, gs


def _embedding_q8_infer(shapes, dtypes):
    ids, table, scale = shapes
    require(len(table) == 2, "embedding_q8", f"table must be 2-D, got {table}")
    require(tuple(scale) == (table[0],), "embedding_q8", f"scale shape {scale} != ({table[0]},)")
    require(np.issubdtype(np.dtype(dtypes[0]), np.integer), "embedding_q8", f"ids must be integers, got {dtypes[0]}")
    return [((*ids, table[1]), dtypes[2])]


register("embedding_q8", embedding_q8, embedding_q8_vjp, _embedding_q8_infer, nondiff=(0,), vjp_uses_outputs=False)


# ------------------------------------------------------------------------ int8 block-wise
def dequantize_blocks(w, scale, block):
    """Wq · s, with each scale repeated over its ``block`` consecutive input rows."""
    return w.astype(scale.dtype) * np.repeat(scale, block, axis=0)


def linear_q8_block(x, w, scale, b=None, *, block=32):
    """y = x W + b, W = Wq · s[in // block, out]: int8 with one scale per ``block`` inputs (Q8_0)."""
    y = x @ dequantize_blocks(w, scale, block).astype(x.dtype)
    return y if b is None else y + b


def linear_q8_block_vjp(grads, inputs, outputs, *, block=32):
    (g,) = grads
    x, w, scale, b = inputs
    gx = g @ dequantize_blocks(w, scale, block).astype(g.dtype).T
    gW = _rows(x).T @ _rows(g)                         # gradient of the dequantized matrix
    gs = (gW * w).reshape(-1, block, w.shape[1]).sum(axis=1)
    return gx, None, gs, None if b is None else _sum_rows(g)


register("linear_q8_block", linear_q8_block, linear_q8_block_vjp, _linear_infer("linear_q8_block"),
         flops=_linear_flops(), n_optional=1, vjp_uses_outputs=False)


# ------------------------------------------------------------------------ int4 group-wise
def unpack_int4(packed):
    """uint8 (in/2, out) → int8 (in, out) in [-8, 7]: row 2i in the low nibble, 2i+1 in the high one."""
    lo = (packed & 0x0F).astype(np.int8) - 8
    hi = (packed >> 4).astype(np.int8) - 8
    out = np.empty((packed.shape[0] * 2, packed.shape[1]), np.int8)
    out[0::2], out[1::2] = lo, hi
    return out


def linear_q4(x, w, scale, b=None, *, group=32, transposed=False):
    """y = x W + b, W = q · s[in // group, out], q ∈ [-8, 7] packed two per byte (uint8 (in/2, out)).

    ``transposed``: stored (out, in/2) with scales (out, in/group) — each output channel's inputs
    contiguous (the decode kernel's layout), or an int4 embedding table read as the tied LM head."""
    if transposed:
        return linear_q4(x, w.T, scale.T, b, group=group)
    y = x @ dequantize_blocks(unpack_int4(w), scale, group).astype(x.dtype)
    return y if b is None else y + b


def linear_q4_vjp(grads, inputs, outputs, *, group=32, transposed=False):
    (g,) = grads
    x, w, scale, b = inputs
    if transposed:
        gx, _, gs, gb = linear_q4_vjp(grads, (x, w.T, scale.T, b), outputs, group=group)
        return gx, None, gs.T, gb
    q = unpack_int4(w)
    gx = g @ dequantize_blocks(q, scale, group).astype(g.dtype).T
    gW = _rows(x).T @ _rows(g)
    gs = (gW * q).reshape(-1, group, q.shape[1]).sum(axis=1)
    return gx, None, gs, None if b is None else _sum_rows(g)


def _linear_q4_infer(shapes, dtypes, *, group=32, transposed=False):
    x, w, s, b = shapes
    if transposed:
        require(len(w) == 2 and len(s) == 2, "linear_q4", f"weight {w} and scale {s} must be 2-D")
        w, s = (w[1], w[0]), (s[1], s[0])
    return _linear_infer("linear_q4", packed_rows=2)([x, w, s, b], dtypes, group=group)


def _linear_q4_flops(shapes, outs, **attrs):
    return 2 * int(np.prod(shapes[0][:-1])) * shapes[1][0] * shapes[1][1] * 2


register("linear_q4", linear_q4, linear_q4_vjp, _linear_q4_infer, flops=_linear_q4_flops, n_optional=1,
         vjp_uses_outputs=False)


# ------------------------------------------------------------------------ int4 embedding table
def unpack_int4_rows(packed):
    """uint8 (…, C/2) → int8 (…, C) in [-8, 7]: column 2j in the low nibble, 2j+1 in the high one."""
    out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), np.int8)
    out[..., 0::2] = (packed & 0x0F).astype(np.int8) - 8
    out[..., 1::2] = (packed >> 4).astype(np.int8) - 8
    return out


def embedding_q4(ids, table, scale, *, group=32):
    """E[ids] with E[v, c] = q[v, c] · s[v, c // group], q ∈ [-8, 7] packed two per byte along the
    row (uint8 (V, C/2)), scales (V, C/group). The same arrays, read as ``linear_q4`` with
    ``transposed=True``, are the tied LM head. Only looked-up rows are unpacked."""
    q = unpack_int4_rows(table[ids]).astype(scale.dtype)
    return q * np.repeat(scale[ids], group, axis=-1)


def embedding_q4_vjp(grads, inputs, outputs, *, group=32):
    (g,) = grads
    ids, table, scale = inputs
    C = table.shape[1] * 2
    part = (g * unpack_int4_rows(table[ids])).reshape(-1, C // group, group).sum(axis=-1)  # ∂L/∂s per lookup
    gs = np.zeros_like(scale)
    np.add.at(gs, ids.reshape(-1), part)
    return None, None, gs


def _embedding_q4_infer(shapes, dtypes, *, group=32):
    ids, table, scale = shapes
    op = "embedding_q4"
    require(len(table) == 2 and len(scale) == 2, op, f"table {table} and scale {scale} must be 2-D")
    C = table[1] * 2
    require(group > 0 and C % group == 0, op, f"group size {group} does not divide the {C} columns")
    require(tuple(scale) == (table[0], C // group), op, f"scale shape {scale} != ({table[0]}, {C // group})")
    require(dtypes[1] == "uint8", op, f"table must be uint8 (packed nibbles), got {dtypes[1]}")
    require(np.issubdtype(np.dtype(dtypes[0]), np.integer), op, f"ids must be integers, got {dtypes[0]}")
    return [((*ids, C), dtypes[2])]


register("embedding_q4", embedding_q4, embedding_q4_vjp, _embedding_q4_infer, nondiff=(0,), vjp_uses_outputs=False)


# ------------------------------------------------------------------------ W8A8 (dynamic)
def quantize_rows(x):
    """Per-row (token) symmetric int8: (q int8, s (…, 1)) with s = max|row| / 127 (1 for a zero row)."""
    m = np.abs(x).max(axis=-1, keepdims=True)
    s = np.where(m > 0, m / 127, 1).astype(x.dtype)
    return np.clip(np.rint(x / s), -127, 127).astype(np.int8), s


def linear_w8a8(x, w, scale, b=None):
    """y = (q(x) Wq) · sₓ · s + b: x quantized per token on the fly, an exact integer product
    (accumulated in float64, exact below 2⁵³), then rescaled. Wq int8 (in, out), s (out,)."""
    q, sx = quantize_rows(x)
    acc = q.astype(np.float64) @ w.astype(np.float64)
    # Rescale before rounding to the activations' dtype: the integer sums alone pass float16's 65504.
    y = (acc * sx * scale).astype(np.result_type(x.dtype, scale.dtype))
    return y if b is None else y + b


@wide_vjp
def linear_w8a8_vjp(grads, inputs, outputs):
    (g,) = grads
    x, w, scale, b = inputs
    q, sx = quantize_rows(x)
    acc = q.astype(np.float64) @ w.astype(np.float64)      # exact; float16 could not hold it
    # y depends on x only through sₓ = max|x_row| / 127 (round() is flat almost everywhere).
    dsx = (g * acc * scale).sum(axis=-1, keepdims=True)          # ∂L/∂sₓ per row
    gx = np.zeros_like(x)
    j = np.abs(x).argmax(axis=-1)[..., None]
    xj = np.take_along_axis(x, j, axis=-1)
    np.put_along_axis(gx, j, (np.sign(xj) / 127 * dsx * (xj != 0)).astype(x.dtype), axis=-1)
    gs = _sum_rows(g * acc * sx).astype(scale.dtype)
    return gx, None, gs, None if b is None else _sum_rows(g)


register("linear_w8a8", linear_w8a8, linear_w8a8_vjp, _linear_infer("linear_w8a8"), flops=_linear_flops(),
         n_optional=1, vjp_uses_outputs=False)


# ------------------------------------------------------------------------ Q8_0: int8 weights and activations
def quantize_act_blocks(x, block=32):
    """Activations → (q int8 (…, K), s (…, K / block)), per ``block`` consecutive values of the last
    axis: s = max|block| / 127 in x's dtype (1 for an all-zero block), q = clip(rint(x / s), ±127)."""
    xb = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)
    m = np.abs(xb).max(axis=-1)
    s = np.where(m > 0, m / 127, 1).astype(x.dtype)
    q = np.clip(np.rint(xb / s[..., None]), -127, 127).astype(np.int8)
    return q.reshape(x.shape), s


def linear_q8_0(x, w, scale, b=None, *, block=32):
    """y[…, n] = Σ_g sₓ[…, g] · s[n, g] · Σ_{k in block g} qₓ[…, k] · Wq[n, k] + b — llama.cpp's
    Q8_0 × Q8_0 dot product: Wq int8 stored (out, in) with a scale per output and ``block`` inputs
    (out, in / block), and the activations quantized the same way at run time
    (:func:`quantize_act_blocks`), so each block's sum is an exact integer (|sum| ≤ block·127·128)
    that CPUs without float-int8 products compute with 8-bit multiply-adds. Unlike
    ``linear_q8_block`` (weights only) the activations are rounded too: a different function.
    Accumulated in float64; the result in the wider of x's and the scales' dtypes."""
    q, sx = quantize_act_blocks(x, block)
    q2, sx2 = q.reshape(-1, q.shape[-1]), sx.reshape(-1, sx.shape[-1]).astype(np.float64)
    acc = np.zeros((q2.shape[0], w.shape[0]), np.float64)
    for g in range(w.shape[1] // block):
        k = slice(g * block, (g + 1) * block)
        isum = q2[:, k].astype(np.float64) @ w[:, k].astype(np.float64).T      # exact integers
        acc += isum * sx2[:, g:g + 1] * scale[:, g].astype(np.float64)
    y = acc.astype(np.result_type(x.dtype, scale.dtype)).reshape(*x.shape[:-1], w.shape[0])
    return y if b is None else y + b


def dequantize_rows(w, scale, block, dtype):
    """Wq (out, in) · s (out, in / block), each scale repeated over its ``block`` inputs, in ``dtype``."""
    return w.astype(dtype) * np.repeat(scale, block, axis=1).astype(dtype)


def linear_q8_0_surrogate(x, w, scale, b=None, *, block=32):
    """What :func:`linear_q8_0_vjp` differentiates: the same linear with the activations left
    unrounded, y = x (Wq · s)ᵀ + b (the straight-through view of the activation quantizer)."""
    y = x @ dequantize_rows(w, scale, block, x.dtype).T
    return y if b is None else y + b


@wide_vjp
def linear_q8_0_vjp(grads, inputs, outputs, *, block=32):
    """Straight-through for the activation rounding: q(x)·sₓ(x) is treated as x, so this is the
    VJP of :func:`linear_q8_0_surrogate`, not of the forward — whose derivative in x is zero
    through ``rint`` almost everywhere, useless for training through a quantized model (compare
    ``linear_w8a8``, whose VJP is the exact derivative). The scale and bias gradients are the
    surrogate's too."""
    (g,) = grads
    x, w, scale, b = inputs
    gx = g @ dequantize_rows(w, scale, block, g.dtype)
    gW = _rows(g).T @ _rows(x)                                                    # (out, in)
    gs = (gW * w).reshape(w.shape[0], -1, block).sum(axis=-1)
    return gx, None, gs.astype(scale.dtype, copy=False), None if b is None else _sum_rows(g)


def _linear_q8_0_infer(shapes, dtypes, *, block=32):
    op = "linear_q8_0"
    x, w, s, b = shapes
    require(len(w) == 2 and len(s) == 2, op, f"weight {w} and scale {s} must be 2-D (out, in) and (out, in / block)")
    require(dtypes[1] == "int8", op, f"weight must be int8, got {dtypes[1]}")
    require(x[-1] == w[1], op, f"input features {x[-1]} != weight columns {w[1]} (weight {w}, stored (out, in))")
    require(block > 0 and w[1] % block == 0, op, f"block size {block} does not divide the input features {w[1]}")
    require(tuple(s) == (w[0], w[1] // block), op, f"scale shape {s} != ({w[0]}, {w[1] // block})")
    require(b is None or tuple(b) == (w[0],), op, f"bias shape {b} != ({w[0]},)")
    return [((*x[:-1], w[0]), dtypes[0])]


def _linear_q8_0_flops(shapes, outs, **attrs):
    return 2 * int(np.prod(shapes[0][:-1])) * shapes[1][0] * shapes[1][1]


register("linear_q8_0", linear_q8_0, linear_q8_0_vjp, _linear_q8_0_infer, flops=_linear_q8_0_flops, n_optional=1,
         vjp_uses_outputs=False)


# ------------------------------------------------------------------------ narrow float weights
def widen(w, dtype=np.float32):
    """float16 → dtype; uint16 bfloat16 bit patterns → float32 (the high half of a float32)."""
    if w.dtype == np.uint16:
        return (w.astype(np.uint32) << 16).view(np.float32).astype(dtype, copy=False)
    return w.astype(dtype)


def linear_cast(x, w, b=None, *, transposed=False):
    """y = x · float(W) + b, W stored as float16 or as bfloat16 (uint16 bit patterns); (out, in)
    when ``transposed`` (the quant plugin's layout: one contiguous row per output, as for int8)."""
    wf = widen(w, x.dtype)
    y = x @ (wf.T if transposed else wf)
    return y if b is None else y + b


def linear_cast_vjp(grads, inputs, outputs, *, transposed=False):
    (g,) = grads
    x, w, b = inputs
    wf = widen(w, g.dtype)
    wf = wf.T if transposed else wf
    # float16 weights are floats (a gradient exists); bfloat16 bit patterns are integers to NumPy.
    gw = None
    if w.dtype != np.uint16:
        gw = _rows(x).T @ _rows(g)
        gw = gw.T if transposed else gw
    return g @ wf.T, gw, None if b is None else _sum_rows(g)


def _linear_cast_infer(shapes, dtypes, *, transposed=False):
    x, w, b = shapes
    op = "linear_cast"
    require(dtypes[1] in ("float16", "uint16"), op, f"weight must be float16 or uint16 (bfloat16), got {dtypes[1]}")
    require(len(w) == 2, op, f"weight must be 2-D, got {w}")
    n_in, n_out = (w[1], w[0]) if transposed else (w[0], w[1])
    require(x[-1] == n_in, op, f"input features {x[-1]} do not fit weight {w}"
            + (" (stored transposed: out, in)" if transposed else ""))
    require(b is None or tuple(b) == (n_out,), op, f"bias shape {b} != ({n_out},)")
    return [((*x[:-1], n_out), dtypes[0])]


register("linear_cast", linear_cast, linear_cast_vjp, _linear_cast_infer, n_optional=1,
         flops=lambda s, o, **a: 2 * int(np.prod(s[0][:-1])) * s[1][0] * s[1][1], vjp_uses_outputs=False)


# ------------------------------------------------------------------------ int8 KV cache
def quantize_heads(x, n_heads):
    """(B, T, H·D) → (int8 (B, T, H·D), scale (B, T, H)): symmetric int8 per token and head."""
    B, T, HD = x.shape
    xh = x.reshape(B, T, n_heads, HD // n_heads)
    m = np.abs(xh).max(axis=-1)
    s = np.where(m > 0, m / 127, 0).astype(x.dtype)
    q = np.clip(np.rint(xh / np.where(s > 0, s, 1)[..., None]), -127, 127).astype(np.int8)
    return q.reshape(B, T, HD), s


def dequantize_heads(q, s):
    B, T, HD = q.shape
    H = s.shape[-1]
    return (q.reshape(B, T, H, HD // H).astype(s.dtype) * s[..., None]).reshape(B, T, HD)


def _round_trip_vjp(x, g, n_heads):
    """VJP of x ↦ dequantize(quantize(x)): only the max-abs element of each head moves its scale."""
    B, T, HD = x.shape
    xh = x.reshape(B, T, n_heads, HD // n_heads)
    q, _ = quantize_heads(x, n_heads)
    ds = (g.reshape(xh.shape) * q.reshape(xh.shape)).sum(axis=-1, keepdims=True)   # ∂L/∂s
    return _scale_vjp(xh, ds).reshape(B, T, HD)


def _scale_vjp(xh, ds):
    """Pull ∂L/∂s back to x through s = max|x| / 127 over the last axis (ds has that axis as 1)."""
    gx = np.zeros_like(xh)
    j = np.abs(xh).argmax(axis=-1)[..., None]
    xj = np.take_along_axis(xh, j, axis=-1)
    np.put_along_axis(gx, j, np.sign(xj) / 127 * ds, axis=-1)
    return gx


def attention_kv8(q, k, v, past_k=None, past_k_scale=None, past_v=None, past_v_scale=None, mask=None, *,
                  n_heads, n_kv_heads, causal, scale=None):
    """Attention over an int8 cache: new k, v are quantized per token and head, appended to the
    cache, and attention reads the dequantized cache (the new tokens too, so every step sees the
    values later steps will). Returns (out, present_k, present_k_scale, present_v, present_v_scale)."""
    return kv8_forward(attention, (q, k, v, past_k, past_k_scale, past_v, past_v_scale, mask),
                       dict(n_heads=n_heads, n_kv_heads=n_kv_heads, causal=causal, scale=scale))


def kv8_forward(attend, inputs, attrs):
    """``attend`` (attention, or sparse_attention with its pattern in ``attrs``) over the int8 cache."""
    q, k, v, past_k, past_k_scale, past_v, past_v_scale, mask = inputs
    n_kv_heads = attrs["n_kv_heads"]
    kq, ks = quantize_heads(k, n_kv_heads)
    vq, vs = quantize_heads(v, n_kv_heads)
    pk = None if past_k is None else dequantize_heads(past_k, past_k_scale)
    pv = None if past_v is None else dequantize_heads(past_v, past_v_scale)
    out, _, _ = attend(q, dequantize_heads(kq, ks), dequantize_heads(vq, vs), pk, pv, mask, **attrs)
    cat = (lambda a, b: b if a is None else np.concatenate([a, b], axis=1))
    return out, cat(past_k, kq), cat(past_k_scale, ks), cat(past_v, vq), cat(past_v_scale, vs)


@wide_vjp
def attention_kv8_vjp(grads, inputs, outputs, *, n_heads, n_kv_heads, causal, scale=None):
    return kv8_vjp(attention, attention_vjp, grads, inputs,
                   dict(n_heads=n_heads, n_kv_heads=n_kv_heads, causal=causal, scale=scale))


def kv8_vjp(attend, attend_vjp, grads, inputs, attrs):
    """The VJP of :func:`kv8_forward` with ``attend`` and its VJP."""
    g_out, _, g_ks, _, g_vs = grads
    q, k, v, past_k, past_k_scale, past_v, past_v_scale, mask = inputs
    n_kv_heads = attrs["n_kv_heads"]
    S = 0 if past_k is None else past_k.shape[1]
    kq, ks = quantize_heads(k, n_kv_heads)
    vq, vs = quantize_heads(v, n_kv_heads)
    kd, vd = dequantize_heads(kq, ks), dequantize_heads(vq, vs)
    pk = None if past_k is None else dequantize_heads(past_k, past_k_scale)
    pv = None if past_v is None else dequantize_heads(past_v, past_v_scale)
    fwd = attend(q, kd, vd, pk, pv, mask, **attrs)
    zero = np.zeros_like(fwd[1])
    gq, gkd, gvd, gpk, gpv, _ = attend_vjp((g_out, zero, zero), (q, kd, vd, pk, pv, mask), fwd, **attrs)
    B, T, HD = k.shape
    D = HD // n_kv_heads
    shp = (B, T, n_kv_heads, D)

    def new_grad(x, xq, gd, g_scale):
        # dequantized value and the returned scale both depend on x only through the scale
        ds = (gd.reshape(shp) * xq.reshape(shp)).sum(-1, keepdims=True) + g_scale[:, S:, :, None]
        return _scale_vjp(x.reshape(shp), ds).reshape(B, T, HD)

    def past_scale_grad(pq, gd, g_scale):
        if pq is None:
            return None
        ps = (B, S, n_kv_heads, D)
        return (gd.reshape(ps) * pq.reshape(ps)).sum(-1) + g_scale[:, :S]

    return (gq, new_grad(k, kq, gkd, g_ks), new_grad(v, vq, gvd, g_vs),
            None, past_scale_grad(past_k, gpk, g_ks), None, past_scale_grad(past_v, gpv, g_vs), None)


def attention_kv8_infer(shapes, dtypes, *, n_heads, n_kv_heads, causal, scale=None):
    q, k, v, pk, pks, pv, pvs, mask = shapes
    op = "attention_kv8"
    require((pk is None) == (pks is None) == (pv is None) == (pvs is None), op,
            "past_k, past_k_scale, past_v, past_v_scale come together")
    if pk is not None:
        require(dtypes[3] == "int8" and dtypes[5] == "int8", op, f"the cache must be int8, got {dtypes[3]}/{dtypes[5]}")
        want = (pk[0], pk[1], n_kv_heads)
        require(tuple(pks) == want and tuple(pvs) == want, op, f"cache scales {pks}/{pvs} must be {want}")
    out, present, _ = attention_infer([q, k, v, pk, pv, mask], [dtypes[0], dtypes[1], dtypes[2], dtypes[1],
                                                                dtypes[2], None],
                                      n_heads=n_heads, n_kv_heads=n_kv_heads, causal=causal, scale=scale)
    sc = ((*present[0][:2], n_kv_heads), dtypes[1])
    return [out, (present[0], "int8"), sc, (present[0], "int8"), sc]


def attention_kv8_flops(shapes, outs, **attrs):
    q = shapes[0]
    S = outs[1][1]
    return 4 * q[0] * q[1] * S * q[2] + 5 * q[0] * attrs["n_heads"] * q[1] * S


register("attention_kv8", attention_kv8, attention_kv8_vjp, attention_kv8_infer, flops=attention_kv8_flops,
         nondiff=(3, 5, 7), n_optional=5)


# ------------------------------------------------------------------------ the packed formats
def quantize_per_channel(w, axis=0):
    """float (in, out) → (int8 (in, out), float32 scale (out,)), symmetric, max-abs per column
    (``axis=1``: per row, for embedding tables)."""
    m = np.abs(w).max(axis=axis)
    s = np.where(m > 0, m / 127, 1).astype(np.float32)
    se = s if axis == 0 else s[:, None]
    return np.clip(np.rint(w / se), -127, 127).astype(np.int8), s


def _group_scales(w, group, qmax):
    n_in, n_out = w.shape
    if n_in % group:
        raise ValueError(f"group size {group} does not divide the input features {n_in}")
    m = np.abs(w.reshape(n_in // group, group, n_out)).max(axis=1)
    return np.where(m > 0, m / qmax, 1).astype(np.float32)


def quantize_blocks(w, block=32):
    """float (in, out) → (int8 (in, out), scale (in / block, out)): Q8_0-style block scales."""
    s = _group_scales(w, block, 127)
    q = np.clip(np.rint(w / np.repeat(s, block, axis=0)), -127, 127).astype(np.int8)
    return q, s


def quantize_int4(w, group=32):
    """float (in, out) → (uint8 (in / 2, out) packed nibbles, scale (in / group, out)), q ∈ [-8, 7]
    with s = max|group| / 7.5 so both ends of the range are used (+7 clips by at most half a step)."""
    if group % 2:
        raise ValueError(f"group size {group} must be even (two 4-bit values per byte)")
    s = _group_scales(w, group, 7.5)
    q = np.clip(np.rint(w / np.repeat(s, group, axis=0)), -8, 7).astype(np.int16) + 8
    return (q[0::2] | (q[1::2] << 4)).astype(np.uint8), s


def quantize_int4_rows(table, group=32):
    """float (V, C) → (uint8 (V, C/2), scale (V, C/group)): ``quantize_int4`` along each row (the
    embedding_q4 / transposed linear_q4 layout), i.e. of the transpose, transposed back."""
    q, s = quantize_int4(np.asarray(table).T, group)
    return np.ascontiguousarray(q.T), np.ascontiguousarray(s.T)


def to_bfloat16_bits(w):
    """float32 → uint16 bfloat16 bit patterns, rounded to nearest even."""
    u = np.ascontiguousarray(w, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = u + 0x7FFF + ((u >> 16) & 1)
    return (u >> 16).astype(np.uint16)


# ------------------------------------------------------------------------ 1/2/4-bit codebook weights
# A codebook maps each packed code to a level; a weight is level · s[out, in // group]. Binary and
# ternary follow XNOR-Net / TWN (scale = mean |w| of the kept weights); int2 is the uniform grid
# {±0.5, ±1.5} at the squared-error-optimal clipping scale; log4 is power-of-two (logarithmic)
# quantization: sign · 2^-e, e in 0..6, or 0 — each weight a shift of the scale, fine near zero where most weights are, coarse at the top.
CODEBOOKS: dict[str, tuple[int, tuple[float, ...]]] = {
    "binary": (1, (-1.0, 1.0)),
    "ternary": (2, (0.0, 1.0, -1.0, 0.0)),
    "int2": (2, (-1.5, -0.5, 0.5, 1.5)),
    "log4": (4, (0.0, *(2.0 ** -e for e in range(7)), 0.0, *(-(2.0 ** -e) for e in range(7)))),
}


def codebook(name):
    """(bits per weight, levels as float64) of a codebook name."""
    if name not in CODEBOOKS:
        raise ValueError(f"unknown codebook {name!r} (known: {', '.join(CODEBOOKS)})")
    bits, levels = CODEBOOKS[name]
    return bits, np.asarray(levels, np.float64)


def pack_codes(codes, bits):
    """uint8 codes (…, K) < 2^bits → uint8 (…, K·bits/8): code j of a byte in bits [j·bits, (j+1)·bits)."""
    per = 8 // bits
    c = codes.astype(np.uint8).reshape(*codes.shape[:-1], -1, per)
    out = np.zeros(c.shape[:-1], np.uint8)
    for j in range(per):
        out |= (c[..., j] << (j * bits)).astype(np.uint8)
    return out


def unpack_codes(packed, bits):
    """uint8 (…, K·bits/8) → uint8 codes (…, K), the inverse of :func:`pack_codes`."""
    per, mask = 8 // bits, (1 << bits) - 1
    out = np.empty((*packed.shape, per), np.uint8)
    for j in range(per):
        out[..., j] = (packed >> (j * bits)) & mask
    return out.reshape(*packed.shape[:-1], -1)


def quantize_lut(w, name, group=32):
    """float (out, in) → (uint8 (out, in·bits/8) packed codes, float32 scale (out, in / group)): the
    one definition of each codebook's rounding (rows = output channels, groups along inputs)."""
    bits, _ = codebook(name)
    n_out, n_in = w.shape
    if n_in % group or group % (8 // bits):
        raise ValueError(f"group size {group} must divide the input features {n_in} and be a multiple of "
                         f"{8 // bits} ({bits}-bit codes, {8 // bits} per byte)")
    g = np.asarray(w, np.float64).reshape(n_out, n_in // group, group)
    a = np.abs(g)
    if name == "binary":
        codes = (g >= 0).astype(np.uint8)
        s = a.mean(axis=-1)
    elif name == "ternary":
        keep = a > 0.7 * a.mean(axis=-1, keepdims=True)
        codes = np.where(keep, np.where(g > 0, 1, 2), 0).astype(np.uint8)
        s = (a * keep).sum(axis=-1) / np.maximum(keep.sum(axis=-1), 1)
    elif name == "int2":
        # levels ±0.5, ±1.5: the clipping scale that minimises the group's squared error, searched
        # over fractions of max-abs (max-abs itself wastes two of four levels on the tails)
        best, s, codes = None, None, None
        for c in np.linspace(0.3, 1.0, 15):
            sc = np.where(a.max(axis=-1) > 0, c * a.max(axis=-1) / 1.5, 1)[..., None]
            k = np.clip(np.floor(g / sc), -2, 1)          # level k + 0.5
            err = ((g - (k + 0.5) * sc) ** 2).sum(axis=-1)
            pick = err < best if best is not None else np.ones(err.shape, bool)
            best = np.where(pick, err, best) if best is not None else err
            s = np.where(pick, sc[..., 0], s) if s is not None else sc[..., 0]
            codes = np.where(pick[..., None], k + 2, codes) if codes is not None else k + 2
        codes = codes.astype(np.uint8)
    else:  # log4
        s = a.max(axis=-1)
        with np.errstate(divide="ignore"):
            e = np.rint(-np.log2(a / np.where(s > 0, s, 1)[..., None]))
        zero = ~(e <= 6)   # below 2^-6.5 of the group's largest (and exact zeros) round to 0
        e = np.where(zero, 0, e).astype(np.uint8)
        codes = np.where(zero, 0, np.where(g > 0, 1 + e, 9 + e)).astype(np.uint8)
    s = np.where(s > 0, s, 1).astype(np.float32)
    return pack_codes(codes.reshape(n_out, n_in), bits), s


def dequantize_lut(w, scale, name, group=32):
    """packed codes (out, in·bits/8) and scales (out, in / group) → float (out, in) in scale's dtype."""
    bits, levels = codebook(name)
    q = levels.astype(scale.dtype)[unpack_codes(w, bits)]
    return q * np.repeat(scale, group, axis=-1)


def linear_lut(x, w, scale, b=None, *, codebook="int2", group=32):
    """y = x Wᵀ + b with W (out, in) = level[code] · s[out, in // group], codes packed 8/bits per byte
    along each output channel's inputs (uint8 (out, in·bits/8)), scales (out, in / group)."""
    y = x @ dequantize_lut(w, scale, codebook, group).astype(x.dtype).T
    return y if b is None else y + b


def linear_lut_vjp(grads, inputs, outputs, *, codebook="int2", group=32):
    (g,) = grads
    x, w, scale, b = inputs
    bits, levels = CODEBOOKS[codebook][0], np.asarray(CODEBOOKS[codebook][1])
    lv = levels.astype(g.dtype)[unpack_codes(w, bits)]                        # (out, in)
    gx = g @ (lv * np.repeat(scale, group, axis=-1)).astype(g.dtype)
    gW = _rows(g).T @ _rows(x)                                                 # (out, in)
    gs = (gW * lv).reshape(w.shape[0], -1, group).sum(axis=-1)
    return gx, None, gs, None if b is None else _sum_rows(g)


def _linear_lut_infer(shapes, dtypes, *, codebook="int2", group=32):
    op = "linear_lut"
    x, w, s, b = shapes
    require(codebook in CODEBOOKS, op, f"unknown codebook {codebook!r} (known: {', '.join(CODEBOOKS)})")
    bits = CODEBOOKS[codebook][0]
    require(len(w) == 2 and len(s) == 2, op, f"weight {w} and scale {s} must be 2-D")
    require(dtypes[1] == "uint8", op, f"weight must be uint8 (packed codes), got {dtypes[1]}")
    n_in = w[1] * 8 // bits
    require(x[-1] == n_in, op, f"input features {x[-1]} != {n_in} ({w[1]} bytes of {bits}-bit codes)")
    require(group > 0 and n_in % group == 0, op, f"group size {group} does not divide the input features {n_in}")
    require(tuple(s) == (w[0], n_in // group), op, f"scale shape {s} != ({w[0]}, {n_in // group})")
    require(b is None or tuple(b) == (w[0],), op, f"bias shape {b} != ({w[0]},)")
    return [((*x[:-1], w[0]), dtypes[0])]


def _linear_lut_flops(shapes, outs, *, codebook="int2", group=32):
    return 2 * int(np.prod(shapes[0][:-1])) * shapes[1][0] * shapes[1][1] * 8 // CODEBOOKS[codebook][0]


register("linear_lut", linear_lut, linear_lut_vjp, _linear_lut_infer, flops=_linear_lut_flops, n_optional=1,
         vjp_uses_outputs=False)


# ------------------------------------------------------------------------ conformance cases
# Packed weights are built with the packers above, the format a rewritten model stores. Rounding
# is discontinuous, so activations that are rounded inside an op (W8A8, the KV cache) are drawn
# on the int8 grid of a power-of-two scale: quantization is then exact in every dtype and the
# low-precision run and the float64 reference agree on every integer.
def _packed(rows, n_in, n_out, pack, attrs, bias=True, grid=False):
    def make(r, d):
        w = randn(r, (n_in, n_out), "float32", 0.1)
        # Scales in the case's dtype: float32 scales would cap a float64 case at float32 precision.
        packed = [a.astype(d) if a.dtype.kind == "f" else a for a in pack(w)]
        x = int8_grid(r, (rows, 1, n_in), d) if grid else randn(r, (rows, 1, n_in), d)
        return (x, *packed, randn(r, (n_out,), d) if bias else None), dict(attrs)
    return make


def _packed_t(rows, n_in, n_out, bits):
    def make(r, d):
        w = randn(r, (n_out, n_in), "float32", 0.1)
        q, s = quantize_per_channel(w, axis=1) if bits == 8 else quantize_int4_rows(w, 32)
        attrs = {"transposed": True} if bits == 8 else {"group": 32, "transposed": True}
        return (randn(r, (rows, 1, n_in), d), q, s.astype(d), randn(r, (n_out,), d) if rows % 2 else None), attrs
    return make


def _table(bits, ids=None):
    def make(r, d):
        E = randn(r, (300, 64), "float32")
        q, s = quantize_per_channel(E, axis=1) if bits == 8 else quantize_int4_rows(E, 16)
        ids_ = r.integers(0, 300, (3, 7)) if ids is None else ids
        return (ids_, q, s.astype(d)), ({} if bits == 8 else {"group": 16})
    return make


def _cast(rows, bf16, transposed=False):
    def make(r, d):
        w = randn(r, (96, 160), "float32", 0.1)
        w[0, :4] = [1e-6, -3e-7, 0.0, -0.0]  # float16 subnormals and signed zeros
        w = np.ascontiguousarray(w.T) if transposed else w
        return ((randn(r, (rows, 1, 96), d), to_bfloat16_bits(w) if bf16 else w.astype(np.float16),
                 randn(r, (160,), d)), {"transposed": transposed})
    return make


def _attn_kv8(B, T, S, H, KV, D, causal, pad, cache, dead_row=False, scale=1.0, offset=0.0):
    base = attention_inputs(B, T, S, H, KV, D, causal, pad, cache, dead_row, scale, offset)

    def make(r, d):
        (q, k, v, pk, pv, mask), attrs = base(r, d)
        k, v = int8_grid(r, k.shape, d, KV), int8_grid(r, v.shape, d, KV)
        if pk is None:
            return (q, k, v, None, None, None, None, mask), attrs
        pkq, pks = quantize_heads(int8_grid(r, pk.shape, d, KV), KV)
        pvq, pvs = quantize_heads(int8_grid(r, pv.shape, d, KV), KV)
        return (q, k, v, pkq, pks, pvq, pvs, mask), attrs
    return make


_per_channel = quantize_per_channel
for _m in (1, 3, 8):
    add_cases("linear_q8", [Case(f"{_m} rows", _packed(_m, 96, 160, _per_channel, {}))])
    add_cases("linear_q8_block", [Case(f"{_m} rows, block 32",
                                       _packed(_m, 96, 160, lambda w: quantize_blocks(w, 32), {"block": 32}))])
    add_cases("linear_q4", [Case(f"{_m} rows, group 32",
                                 _packed(_m, 96, 160, lambda w: quantize_int4(w, 32), {"group": 32}))])
    add_cases("linear_w8a8", [Case(f"{_m} rows", _packed(_m, 96, 160, _per_channel, {}, grid=True))])
for _m in (1, 3, 8, 20):
    add_cases("linear_q8", [Case(f"{_m} rows, transposed (out, in)", _packed_t(_m, 96, 160, 8))])
    add_cases("linear_q4", [Case(f"{_m} rows, group 32, transposed (out, in/2)", _packed_t(_m, 96, 160, 4))])
    add_cases("linear_cast", [Case(f"{_m} rows, float16", _cast(_m, False)),
                              Case(f"{_m} rows, bfloat16", _cast(_m, True)),
                              Case(f"{_m} rows, float16 (out, in)", _cast(_m, False, True)),
                              Case(f"{_m} rows, bfloat16 (out, in)", _cast(_m, True, True))])
add_cases("linear_q8", [Case(f"{m} rows, transposed, tile edge", _packed_t(m, 64, 72, 8), "sizes") for m in (7, 9, 65)])
add_cases("linear_q4", [Case("LM-head shape, 1 row, transposed", _packed_t(1, 64, 1100, 4)),
                        *[Case(f"{m} rows, tile edge",
                               _packed(m, 64, 72, lambda w: quantize_int4(w, 32), {"group": 32}), "sizes")
                          for m in (7, 9, 65)]])
add_cases("linear_w8a8", [
    # Integer sums of 1024 products of ±127 pass float16's 65504 before the rescale.
    Case("sums beyond float16's range", _packed(2, 1024, 16, lambda w: quantize_per_channel(np.abs(w)), {},
                                                grid=True), "large"),
    Case("a zero row", lambda r, d: ((lambda x: (x, *_packed(2, 64, 16, _per_channel, {})(r, d)[0][1:]))(
        np.concatenate([np.zeros((1, 1, 64), d), int8_grid(r, (1, 1, 64), d)])), {}), "zeros"),
])
add_cases("embedding_q8", [Case("gather, repeated ids", _table(8)),
                           Case("one id repeated", _table(8, np.full((2, 5), 7)), "ties")])
add_cases("embedding_q4", [Case("gather, group 16", _table(4))])
add_cases("attention_kv8", [
    Case("MHA causal prefill", _attn_kv8(2, 9, 0, 4, 4, 8, True, False, False)),
    Case("GQA decode, int8 cache + padding", _attn_kv8(3, 1, 11, 6, 2, 16, True, True, True)),
    Case("GQA prefill after cache, padding", _attn_kv8(2, 5, 4, 4, 2, 8, True, True, True)),
    Case("fully masked row", _attn_kv8(2, 3, 0, 2, 1, 4, False, True, False, dead_row=True), "masked"),
    Case("decode, large scores", _attn_kv8(2, 1, 9, 2, 2, 8, True, True, True, scale=3.0), "large"),
    *[Case(f"{t} queries over {t + 2} cached", _attn_kv8(1, t, t + 2, 2, 1, 8, True, False, True), "sizes")
      for t in (1, 8, 9)],
])


def _q8_0(rows, n_in, n_out, block=32, bias=True, x_scale=1.0, zero_block=False, extreme=False):
    """linear_q8_0 inputs: weights quantized per (out, block), activations on the int8 grid of
    each block (one ±127 per block, a power-of-two scale per block) so that activation rounding is
    exact in every dtype. ``extreme``: weights of ±127 and -128 (the int8 minimum, which the
    quantizer never writes but the format allows) against ±127 activations — the largest pair
    sums an 8-bit multiply-add can meet. In float16 large activations are scaled down to at most 1
    by a power of two (the same integers q): its range cannot hold their scale gradients."""
    def make(r, d):
        q, s = quantize_blocks(randn(r, (n_in, n_out), "float32", 0.1), block)
        q, s = np.ascontiguousarray(q.T), np.ascontiguousarray(s.T)
        x = int8_grid(r, (rows, 1, n_in), d, n_in // block)
        if extreme:
            q = np.where(r.random(q.shape) < 0.5, -128, 127).astype(np.int8)
            x = np.where(r.random(x.shape) < 0.5, -127, 127).astype(d)
        if zero_block:
            x[..., block:2 * block] = 0
        x = x.astype(np.float64) * x_scale
        if (extreme or x_scale != 1) and str(d) == "float16":
            # float16: the scale gradient Σ g·x·Wq would pass 65504; a power of two keeps every q
            x /= 2.0 ** np.ceil(np.log2(np.abs(x).max()))
        x = x.astype(d)
        return (x, q, s.astype(d), randn(r, (n_out,), d) if bias else None), {"block": block}
    return make


for _m in (1, 3, 8, 20):
    add_cases("linear_q8_0", [Case(f"{_m} rows, block 32", _q8_0(_m, 96, 160, bias=_m % 2 == 1))])
add_cases("linear_q8_0", [
    *[Case(f"{m} rows, odd outputs and blocks", _q8_0(m, 32 * 7, 37), "sizes") for m in (7, 9, 65)],
    Case("block 64", _q8_0(3, 192, 40, block=64), "sizes"),
    Case("block 16 (the portable kernel)", _q8_0(2, 96, 40, block=16), "sizes"),
    Case("an all-zero block", _q8_0(2, 96, 40, zero_block=True), "zeros"),
    Case("extreme integers: w in {-128, 127}, x = ±127", _q8_0(3, 1024, 24, extreme=True), "large"),
    Case("activations near 2^60 (float16: at most 1)", _q8_0(2, 96, 40, x_scale=2.0 ** 60), "large"),
])


def _lut(rows, n_in, n_out, name, group, bias=True, x_scale=1.0):
    def make(r, d):
        q, sc = quantize_lut(randn(r, (n_out, n_in), "float32", 0.1), name, group)
        return (randn(r, (rows, 1, n_in), d, x_scale), q, sc.astype(d), randn(r, (n_out,), d) if bias else None), \
            {"codebook": name, "group": group}
    return make


for _cb in CODEBOOKS:
    add_cases("linear_lut", [Case(f"{_cb}, {m} rows, group 32", _lut(m, 96, 40, _cb, 32, m % 2 == 1))
                             for m in (1, 3, 9)])
    add_cases("linear_lut", [Case(f"{_cb}, tile edges", _lut(65, 64, 72, _cb, 16), "sizes"),
                             Case(f"{_cb}, large inputs", _lut(3, 96, 40, _cb, 32, x_scale=1e3), "large"),
                             Case(f"{_cb}, subnormal inputs", _lut(3, 96, 40, _cb, 32, x_scale=1e-40), "tiny")])
