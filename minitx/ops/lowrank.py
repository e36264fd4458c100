"""Low-rank ops: a linear through a rank-r factorisation, and Nyström-approximated attention.

``lowrank_linear``: y = (x U) V + b with U (in, r), V (r, out) — W ≈ U V costs r·(in + out)
weights and multiply-adds per row instead of in·out.

``nystrom_attention`` (Xiong et al., 2021) has the inputs and outputs of :mod:`.attention`
(non-causal only: the approximation mixes all positions). Queries and keys are averaged over L
contiguous segments into landmarks Q̃, K̃ (padding keys excluded), and

    softmax(Q Kᵀ) V  ≈  softmax(Q K̃ᵀ) · pinv(softmax(Q̃ K̃ᵀ)) · softmax(Q̃ Kᵀ) V,

O(T·L) instead of O(T·S). The pseudo-inverse is the paper's iterative one (its §3.2, after
Razavi et al., 2014), not an SVD: Z₀ = Aᵀ / (‖A‖₁‖A‖∞), then ``pinv_iters`` (6) steps of
Z ← ¼ Z (13I − AZ (15I − AZ (7I − AZ))). An exact pinv of the landmark softmax — whose rows are
nearly alike, so its small singular values are noise — inverts that noise: outputs came out
orders of magnitude beyond anything attention can produce (a convex mix of values). The
iteration converges on the large singular values first and leaves the tiny ones damped (they
start at σ²/‖A‖₁‖A‖∞ ≈ 0 and grow only cubically), which is the regularisation the paper relies
on. It is a polynomial in A, so its VJP is exact backpropagation through the steps. With one
landmark per position and enough iterations it is exact (P P⁺ P = P).

Landmarks are means of segments of the *real* positions of each row (queries and keys alike;
padding is in no segment and an unused landmark drops out), so a row computes the same alone or
in a padded batch. Where it is worth it, measured on all-MiniLM-L6-v2 (held-out text, 20 inputs
of 65–256 tokens, mean embedding cosine against dense): 32 landmarks 0.887, 64 0.927, 128 0.973.
Six iterations is the optimum: 4 give 0.874, 20 give 0.105 at 32 landmarks (the converged
pseudo-inverse inverts the noise again). Only 128 landmarks pass the 0.95 bound, and there the
O(L³) pseudo-inverse costs ~14× dense attention's FLOPs at 256 tokens (MiniLM's limit). By FLOPs
Nyström undercuts dense only at 32 landmarks from ~200 tokens (2.1× at 256, 5.5× at 512) or 64
from ~400 (1.5× at 512, 4.3× at 1024): worth it for long inputs, never for MiniLM's.

Worth it: the cost is O((T + S)·L·D + L³) against O(T·S·D), so it pays when sequences are several
times longer than L (T ≳ 4L); below that dense attention is both exact and as fast.
"""
from __future__ import annotations

import numpy as np

from . import register, require, wide_forward, wide_vjp
from .attention import _heads, _merge, attention_infer, attention_inputs
from .cases import Case, add_cases, randn


# ------------------------------------------------------------------------------ lowrank_linear
@wide_forward
def lowrank_linear(x, u, v, b=None):
    """y = (x U) V + b: the rank-r linear W ≈ U V."""
    y = (x @ u) @ v
    return y if b is None else y + b


@wide_vjp
def lowrank_linear_vjp(grads, inputs, outputs):
    (g,) = grads
    x, u, v, b = inputs
    h = x @ u                                   # (…, r), recomputed rather than stored
    g2 = g.reshape(-1, g.shape[-1])
    gh = g @ v.T
    gv = h.reshape(-1, h.shape[-1]).T @ g2
    gu = x.reshape(-1, x.shape[-1]).T @ gh.reshape(-1, gh.shape[-1])
    gb = None if b is None else g2.sum(axis=0)
    return gh @ u.T, gu, gv, gb


def lowrank_linear_infer(shapes, dtypes):
    x, u, v, b = shapes
    op = "lowrank_linear"
    require(len(u) == 2 and len(v) == 2, op, f"u {u} and v {v} must be 2-D")
    require(x[-1] == u[0], op, f"input features {x[-1]} != rows of u {u}")
    require(u[1] == v[0], op, f"rank of u {u} != rows of v {v}")
    require(b is None or tuple(b) == (v[1],), op, f"bias shape {b} != ({v[1]},)")
    return [((*x[:-1], v[1]), dtypes[0])]


def lowrank_linear_flops(shapes, outs):
    x, u, v, _ = shapes
    return 2 * int(np.prod(x[:-1])) * u[1] * (u[0] + v[1])


register("lowrank_linear", lowrank_linear, lowrank_linear_vjp, lowrank_linear_infer, flops=lowrank_linear_flops,
         n_optional=1, vjp_uses_outputs=False)
add_cases("lowrank_linear", [
    Case(f"{m} rows, rank 8", lambda r, d, m=m: (
        (randn(r, (m, 1, 64), d), randn(r, (64, 8), d, 0.2), randn(r, (8, 96), d, 0.2),
         randn(r, (96,), d) if m % 2 else None), {}))
    for m in (1, 4, 9)])


# ------------------------------------------------------------------------------ Nyström attention
def segments(valid: np.ndarray, L: int) -> np.ndarray:
    """(B, L, N) averaging matrices: per row of ``valid`` (B, N), its real positions cut into
    min(L, count) contiguous, near-equal segments. Padding belongs to no segment, so a short row in
    a padded batch keeps all its landmarks (cutting the padded length instead left a 66-token
    sentence in a 256-wide batch a quarter of them: mean cosine 0.84 against 0.89 alone). A row
    with fewer real positions than L has one landmark per position and the rest empty (zero)."""
    B, N = valid.shape
    M = np.zeros((B, L, N))
    for b in range(B):
        pos = np.flatnonzero(valid[b])
        n = len(pos)
        if n:
            M[b, np.arange(n) * min(L, n) // n, pos] = 1.0
    return M / np.maximum(M.sum(axis=-1, keepdims=True), 1.0)


def _softmax_keep(s, keep):
    s = np.where(keep, s, np.finfo(s.dtype).min)
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _softmax_keep_vjp(g, p, keep):
    return np.where(keep, p * (g - (g * p).sum(axis=-1, keepdims=True)), 0.0)


def _nystrom_parts(q, K, V, mask, n_heads, n_kv_heads, n_landmarks, scale, pinv_iters=6):
    B, T, _ = q.shape
    S = K.shape[1]
    G = n_heads // n_kv_heads
    dt = q.dtype
    qh = _heads(q, n_heads).reshape(B, n_kv_heads, G, T, -1)   # (B, Hkv, G, T, D)
    kh = _heads(K, n_kv_heads)[:, :, None]                     # (B, Hkv, 1, S, D)
    vh = _heads(V, n_kv_heads)[:, :, None]
    valid = np.ones((B, S), bool) if mask is None else mask.astype(bool)
    L = min(n_landmarks, S)
    Mk = segments(valid, L)                            # (B, L, S) over the real keys
    lm_valid = Mk.any(axis=-1)                                 # landmarks with at least one real key
    Mk = Mk.astype(dt)[:, None, None]                          # (B, 1, 1, L, S)
    Mq = segments(valid[:, S - T:], min(n_landmarks, T)).astype(dt)[:, None, None]  # real queries
    qt = Mq @ qh                                               # Q̃ (B, Hkv, G, Lq, D)
    kt = Mk @ kh                                               # K̃ (B, Hkv, 1, Lk, D)
    keep_l = lm_valid[:, None, None, None, :]
    keep_k = valid[:, None, None, None, :]
    F = _softmax_keep((qh @ np.swapaxes(kt, -1, -2)) * scale, keep_l)   # (…, T, Lk)
    live_q = Mq.any(axis=-1, keepdims=True)                    # (B, 1, 1, Lq, 1) query landmarks in use
    A = _softmax_keep((qt @ np.swapaxes(kt, -1, -2)) * scale, keep_l) * live_q   # (…, Lq, Lk)
    Bm = _softmax_keep((qt @ np.swapaxes(kh, -1, -2)) * scale, keep_k) * live_q  # (…, Lq, S)
    steps = iterative_pinv(A, pinv_iters)
    return dict(qh=qh, kh=kh, vh=vh, Mq=Mq, Mk=Mk, qt=qt, kt=kt, keep_l=keep_l, keep_k=keep_k, live_q=live_q,
                F=F, A=A, Bm=Bm, Ap=steps[-1], steps=steps)


def _pinv_scale(a):
    """1 / (‖A‖₁ ‖A‖∞) per matrix (max column sum × max row sum of |A|), and the argmax column/row.
    0 for a zero matrix (a batch row with no real token): Z₀ = 0 then, and every step stays at
    pinv(0) = 0 instead of 0 · ∞ = NaN."""
    col, row = np.abs(a).sum(axis=-2), np.abs(a).sum(axis=-1)
    norm = (col.max(axis=-1) * row.max(axis=-1))[..., None, None]
    inv = np.divide(1.0, norm, out=np.zeros_like(norm), where=norm > 0)
    return inv, col.argmax(axis=-1), row.argmax(axis=-1)


def iterative_pinv(a: np.ndarray, iters: int) -> list[np.ndarray]:
    """The Nyströmformer's iterative Moore–Penrose inverse of each matrix in ``a`` (…, m, n):
    Z₀ = Aᵀ / (‖A‖₁‖A‖∞), Z ← ¼ Z (13I − AZ (15I − AZ (7I − AZ))). Returns [Z₀, …, Z_iters]
    (the VJP walks them back)."""
    eye = np.eye(a.shape[-2], dtype=a.dtype)
    z = _pinv_scale(a)[0].astype(a.dtype) * np.swapaxes(a, -1, -2)
    out = [z]
    for _ in range(iters):
        p = a @ z
        z = 0.25 * z @ (13 * eye - p @ (15 * eye - p @ (7 * eye - p)))
        out.append(z)
    return out


def iterative_pinv_vjp(g: np.ndarray, a: np.ndarray, steps: list[np.ndarray]) -> np.ndarray:
    """Cotangent of A from that of the last step: backpropagation through every step and Z₀."""
    t = lambda x: np.swapaxes(x, -1, -2)  # noqa: E731
    eye = np.eye(a.shape[-2], dtype=a.dtype)
    ga = np.zeros_like(a)
    gz = g
    for z in reversed(steps[:-1]):     # z' = ¼ z M(P), P = A z, M = 13I − 15P + 7P² − P³
        p = a @ z
        p2 = p @ p
        m = 13 * eye - 15 * p + 7 * p2 - p2 @ p
        gm = 0.25 * t(z) @ gz
        pt, p2t = t(p), t(p2)
        gp = -15 * gm + 7 * (gm @ pt + pt @ gm) - (gm @ p2t + pt @ gm @ pt + p2t @ gm)
        ga = ga + gp @ t(z)
        gz = 0.25 * gz @ t(m) + t(a) @ gp
    c, jc, ir = _pinv_scale(a)                  # Z₀ = c Aᵀ, c = 1 / (colsum[jc] · rowsum[ir])
    ga = ga + c * t(gz)
    gc = (gz * t(a)).sum(axis=(-1, -2))[..., None, None]
    col_max = np.take_along_axis(np.abs(a).sum(axis=-2), jc[..., None], -1)[..., None]
    row_max = np.take_along_axis(np.abs(a).sum(axis=-1), ir[..., None], -1)[..., None]
    col_max, row_max = np.where(col_max > 0, col_max, 1), np.where(row_max > 0, row_max, 1)  # A = 0: c = 0 there
    sgn = np.sign(a)
    on_col = (np.arange(a.shape[-1]) == jc[..., None])[..., None, :]
    on_row = (np.arange(a.shape[-2]) == ir[..., None])[..., :, None]
    return ga - gc * c * (on_col * sgn / col_max + on_row * sgn / row_max)


@wide_forward
def nystrom_attention(q, k, v, past_k=None, past_v=None, mask=None, *, n_heads, n_kv_heads, causal=False,
                      n_landmarks, scale=None, pinv_iters=6):
    """softmax(Q K̃ᵀ) pinv(softmax(Q̃ K̃ᵀ)) softmax(Q̃ Kᵀ) V per head; returns (out, K, V) like attention."""
    K = k if past_k is None else np.concatenate([past_k, k], axis=1)
    V = v if past_v is None else np.concatenate([past_v, v], axis=1)
    D = q.shape[-1] // n_heads
    scale = q.dtype.type(1.0 / np.sqrt(D) if scale is None else scale)
    p = _nystrom_parts(q, K, V, mask, n_heads, n_kv_heads, n_landmarks, scale, pinv_iters)
    out = p["F"] @ (p["Ap"] @ (p["Bm"] @ p["vh"]))
    return _merge(out.reshape(q.shape[0], n_heads, q.shape[1], D)), K, V


@wide_vjp
def nystrom_attention_vjp(grads, inputs, outputs, *, n_heads, n_kv_heads, causal=False, n_landmarks, scale=None,
                          pinv_iters=6):
    g_out, g_K, g_V = grads
    q, k, v, past_k, past_v, mask = inputs
    _, K, V = outputs
    B, T, _ = q.shape
    D = q.shape[-1] // n_heads
    G = n_heads // n_kv_heads
    scale = q.dtype.type(1.0 / np.sqrt(D) if scale is None else scale)
    p = _nystrom_parts(q, K, V, mask, n_heads, n_kv_heads, n_landmarks, scale, pinv_iters)
    t = lambda x: np.swapaxes(x, -1, -2)  # noqa: E731
    F, Ap, Bm, vh = p["F"], p["Ap"], p["Bm"], p["vh"]
    W = Bm @ vh                      # (…, Lq, D)
    Z = Ap @ W                       # (…, Lk, D);  out = F Z
    go = _heads(g_out, n_heads).reshape(B, n_kv_heads, G, T, D)
    gF = go @ t(Z)
    gZ = t(F) @ go
    gAp = gZ @ t(W)
    gW = t(Ap) @ gZ
    gBm = gW @ t(vh)
    gvh = (t(Bm) @ gW).sum(axis=2)
    gA = iterative_pinv_vjp(gAp, p["A"], p["steps"])
    gSF = _softmax_keep_vjp(gF, F, p["keep_l"]) * scale   # scores Q K̃ᵀ
    gSA = _softmax_keep_vjp(gA * p["live_q"], p["A"], p["keep_l"]) * scale  # scores Q̃ K̃ᵀ
    gSB = _softmax_keep_vjp(gBm * p["live_q"], Bm, p["keep_k"]) * scale  # scores Q̃ Kᵀ
    gqh = gSF @ p["kt"]
    gqt = gSA @ p["kt"] + gSB @ p["kh"]
    gkt = (t(gSF) @ p["qh"] + t(gSA) @ p["qt"]).sum(axis=2, keepdims=True)
    gkh = (t(gSB) @ p["qt"]).sum(axis=2, keepdims=True)
    gqh = gqh + t(p["Mq"]) @ gqt     # Q̃ = Mq Q
    gkh = gkh + t(p["Mk"]) @ gkt     # K̃ = Mk K
    gq = _merge(gqh.reshape(B, n_heads, T, D))
    gK = _merge(gkh[:, :, 0]) + g_K
    gV = _merge(gvh) + g_V
    S = K.shape[1] - T
    return (gq, gK[:, S:], gV[:, S:],
            None if past_k is None else gK[:, :S], None if past_v is None else gV[:, :S], None)


def nystrom_attention_infer(shapes, dtypes, *, n_heads, n_kv_heads, causal=False, n_landmarks, scale=None,
                            pinv_iters=6):
    op = "nystrom_attention"
    require(not causal, op, "Nyström attention mixes all positions; it does not support causal=True")
    require(isinstance(n_landmarks, (int, np.integer)) and n_landmarks >= 1, op,
            f"n_landmarks must be a positive integer, got {n_landmarks!r}")
    require(isinstance(pinv_iters, (int, np.integer)) and pinv_iters >= 0, op,
            f"pinv_iters must be a non-negative integer, got {pinv_iters!r}")
    return attention_infer(shapes, dtypes, n_heads=n_heads, n_kv_heads=n_kv_heads, causal=False, scale=scale)


def nystrom_attention_flops(shapes, outs, *, n_heads, n_kv_heads, causal=False, n_landmarks, scale=None,
                            pinv_iters=6):
    q = shapes[0]
    T, S, L = q[1], outs[1][1], n_landmarks
    per_row = 2 * (T * L + L * L + L * S) + 2 * (T * L + L * L + L * S)  # scores, then the three products
    return q[0] * q[2] * per_row + q[0] * n_heads * (5 * (T * L + L * L + L * S) + 8 * (pinv_iters + 1) * L ** 3)


register("nystrom_attention", nystrom_attention, nystrom_attention_vjp, nystrom_attention_infer,
         flops=nystrom_attention_flops, nondiff=(5,), n_optional=3, may_alias=True)


def _nystrom(pad):
    base = attention_inputs(2, 12, 0, 4, 2, 8, False, pad, False)

    def make(r, d):
        inputs, attrs = base(r, d)
        return inputs, {**attrs, "n_landmarks": 4}
    return make


# tol_scale: the pseudo-inverse amplifies the inputs' rounding, in the reference too.
add_cases("nystrom_attention", [Case("4 landmarks", _nystrom(False), tol_scale=10),
                                Case("4 landmarks, padding", _nystrom(True), "masked", tol_scale=10)])
