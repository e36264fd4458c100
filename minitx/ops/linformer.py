"""Linformer attention (Wang et al., 2020): keys and values projected along the sequence.

``linformer_attention`` takes attention's q, k, v and a padding mask plus two learned matrices
E, F (R, N_max). For an input of T ≤ N_max positions, per head,

    out = softmax(Q (Ē K)ᵀ · scale) (F̄ V),   Ē = E[:, :T] · diag(mask),  F̄ = F[:, :T] · diag(mask)

so the T×T score matrix becomes T×R: O(T·R) time and memory. Slicing the first T columns is
what lets one trained E serve every shorter input; the mask zeroes padded positions' columns so
padding never reaches a projected key or value. A projected row that no real position feeds
(Ē's row all zero: with the pooling start below, the rows of positions beyond T) is masked out of
the softmax — a zero key would otherwise take weight and pull the output towards 0.

Bidirectional only: each projected row mixes positions from the whole sequence, so a query would
see its future. E and F receive gradients (they are trained, one pair per layer, shared by the
heads); the mask gets none. Which rows are dead is piecewise constant in E (like top-k's
selection): a dead row's entries get no gradient, and E is smooth only away from reviving one.
"""
from __future__ import annotations

import numpy as np

from . import register, require, wide_forward, wide_vjp
from .attention import _heads, _merge, attention_inputs
from .cases import Case, add_cases
from .lowrank import _softmax_keep, _softmax_keep_vjp


def _parts(q, k, v, e, f, mask, n_heads, n_kv_heads, scale):
    B, T, _ = q.shape
    G = n_heads // n_kv_heads
    qh = _heads(q, n_heads).reshape(B, n_kv_heads, G, T, -1)   # (B, Hkv, G, T, D)
    kh = _heads(k, n_kv_heads)[:, :, None]                     # (B, Hkv, 1, T, D)
    vh = _heads(v, n_kv_heads)[:, :, None]
    m = (np.ones((B, T)) if mask is None else mask).astype(q.dtype)[:, None, :]   # (B, 1, T)
    eb, fb = e[None, :, :T] * m, f[None, :, :T] * m            # (B, R, T)
    keep = (eb != 0).any(axis=-1)[:, None, None, None, :]      # (B, 1, 1, 1, R) rows fed by a real key
    kp = eb[:, None, None] @ kh                                # (B, Hkv, 1, R, D)
    vp = fb[:, None, None] @ vh
    p = _softmax_keep((qh @ np.swapaxes(kp, -1, -2)) * scale, keep)   # (B, Hkv, G, T, R)
    return qh, kh, vh, m, eb, fb, keep, kp, vp, p


def _scale(q, n_heads, scale):
    return q.dtype.type(1.0 / np.sqrt(q.shape[-1] // n_heads) if scale is None else scale)


@wide_forward
def linformer_attention(q, k, v, e, f, mask=None, *, n_heads, n_kv_heads, scale=None):
    """softmax(Q (Ē K)ᵀ) (F̄ V) per head over E, F's first T columns; returns (out, k, v) like attention."""
    *_, vp, p = _parts(q, k, v, e, f, mask, n_heads, n_kv_heads, _scale(q, n_heads, scale))
    B, T, HD = q.shape
    return _merge((p @ vp).reshape(B, n_heads, T, HD // n_heads)), k, v


@wide_vjp
def linformer_attention_vjp(grads, inputs, outputs, *, n_heads, n_kv_heads, scale=None):
    g_out, g_k, g_v = grads
    q, k, v, e, f, mask = inputs
    B, T, HD = q.shape
    D = HD // n_heads
    G = n_heads // n_kv_heads
    sc = _scale(q, n_heads, scale)
    qh, kh, vh, m, eb, fb, keep, kp, vp, p = _parts(q, k, v, e, f, mask, n_heads, n_kv_heads, sc)
    t = lambda x: np.swapaxes(x, -1, -2)  # noqa: E731
    go = _heads(g_out, n_heads).reshape(B, n_kv_heads, G, T, D)
    gvp = (t(p) @ go).sum(axis=2, keepdims=True)
    gs = _softmax_keep_vjp(go @ t(vp), p, keep) * sc
    gqh = gs @ kp
    gkp = (t(gs) @ qh).sum(axis=2, keepdims=True)
    gkh = t(eb[:, None, None]) @ gkp
    gvh = t(fb[:, None, None]) @ gvp
    ge, gf = np.zeros_like(e), np.zeros_like(f)
    ge[:, :T] = ((gkp @ t(kh)).sum(axis=(1, 2)) * m).sum(axis=0)
    gf[:, :T] = ((gvp @ t(vh)).sum(axis=(1, 2)) * m).sum(axis=0)
    gq = _merge(gqh.reshape(B, n_heads, T, D))
    gk = _merge(gkh[:, :, 0]) + (0 if g_k is None else g_k)
    gv = _merge(gvh[:, :, 0]) + (0 if g_v is None else g_v)
    return gq, gk, gv, ge, gf, None


def linformer_attention_infer(shapes, dtypes, *, n_heads, n_kv_heads, scale=None):
    op = "linformer_attention"
    q, k, v, e, f, mask = shapes
    require(len(q) == 3 and len(k) == 3 and len(v) == 3, op, f"q, k, v must be (B, T, H·D), got {q}, {k}, {v}")
    require(n_heads % n_kv_heads == 0 and q[-1] % n_heads == 0, op,
            f"q width {q[-1]} must split into {n_heads} heads, a multiple of {n_kv_heads} kv heads")
    kv = (q[0], q[1], n_kv_heads * (q[-1] // n_heads))
    require(tuple(k) == kv and tuple(v) == kv, op, f"k {k} and v {v} must be {kv}")
    require(len(e) == 2 and tuple(f) == tuple(e), op, f"E {e} and F {f} must both be (k, max length)")
    require(q[1] <= e[1], op, f"{q[1]} positions exceed the projections' maximum length {e[1]}")
    if mask is not None:
        require(tuple(mask) == (q[0], q[1]), op, f"mask {mask} must be (batch, tokens) = {(q[0], q[1])}")
    return [(tuple(q), dtypes[0]), (tuple(k), dtypes[1]), (tuple(v), dtypes[2])]


def linformer_attention_flops(shapes, outs, *, n_heads, n_kv_heads, scale=None):
    """Projecting K and V (2·R·T·D per kv head each), then scores and mix over R rows, not T."""
    B, T, HD = shapes[0]
    R = shapes[3][0]
    D = HD // n_heads
    return 4 * B * n_kv_heads * R * T * D + 4 * B * n_heads * T * R * D + 5 * B * n_heads * T * R


register("linformer_attention", linformer_attention, linformer_attention_vjp, linformer_attention_infer,
         flops=linformer_attention_flops, nondiff=(5,), n_optional=1, may_alias=True)


def pooling_projection(k: int, n_max: int) -> np.ndarray:
    """A starting E = F (k, n_max) that is not noise: the first k/2 rows pick positions 0 … k/2 − 1
    one each (inputs that short get exact attention), the other rows average k/2 contiguous,
    near-equal segments of the remaining positions (longer inputs attend to block means). Training
    moves from there."""
    near = min(k // 2, n_max)
    out = np.zeros((k, n_max))
    out[np.arange(near), np.arange(near)] = 1.0
    rest = n_max - near
    rows = k - near
    if rest and rows:
        seg = np.arange(rest) * rows // rest
        for r in range(min(rows, rest)):
            cols = near + np.flatnonzero(seg == r)
            out[near + r, cols] = 1.0 / len(cols)
    return out


def _linformer(R, N, init="random"):
    def build(B, T, H, KV, D, pad, scale=1.0):
        base = attention_inputs(B, T, 0, H, KV, D, False, pad, False, False, scale)

        def make(r, d):
            (q, k, v, _, _, mask), attrs = base(r, d)
            if init == "pool":
                e = f = pooling_projection(R, N).astype(d)
                f = f.copy()
            else:
                e, f = (r.standard_normal((R, N)).astype(d) / np.sqrt(N) for _ in range(2))
            return (q, k, v, e, f, mask), {"n_heads": H, "n_kv_heads": KV}
        return make
    return build


add_cases("linformer_attention", [
    Case("8 rows, 12 positions of 16", _linformer(8, 16)(2, 12, 4, 2, 8, False)),
    Case("padding", _linformer(6, 10)(3, 10, 2, 2, 8, True), "masked"),
    # Full length, no padding: a short or padded input leaves rows of the pooling start dead, and a
    # perturbed zero would revive one (a jump the finite differences would see).
    Case("pooling start", _linformer(8, 20, "pool")(3, 20, 4, 4, 8, False)),
    *[Case(f"{t} positions", _linformer(5, 17)(1, t, 2, 1, 8, False), "sizes") for t in (1, 8, 17)],
    Case("large scores", _linformer(6, 12)(2, 9, 4, 2, 8, False, scale=12.0), "large"),
])
