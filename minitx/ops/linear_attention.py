"""Linear (kernel) attention: softmax(q·k) replaced by a feature-map product φ(q)·φ(k).

``linear_attention`` has the inputs and outputs of :mod:`.attention` (GQA, causal, padding mask,
KV cache) plus ``proj``, the random features of FAVOR+. Per head, with φ applied to each row,

    out_t = Σ_s a_ts v_s / (Σ_s a_ts + eps),   a_ts = φ(q_t)·φ(k_s)  over the allowed keys s,

which regroups as φ(q_t)ᵀ (Σ_s φ(k_s) v_sᵀ) / φ(q_t)ᵀ (Σ_s φ(k_s)): a (F, D) state and an F-vector
instead of the T×S score matrix — prefix sums of them when causal, so a decoder needs O(1) state
per step (Katharopoulos et al., 2020). The spec computes the masked a_ts matrix, the readable
truth; a kernel keeps the running sums. Feature maps (``feature``):

* ``elu``   — φ(x) = elu(x) + 1 (the linear Transformer's);
* ``favor`` — FAVOR+ positive random features (Choromanski et al., 2021): with x' = x / D^¼ and
  ``proj`` W (F, D) of Gaussian rows (orthogonalised and redrawn with a seed by whoever builds
  them), φ(x) = exp(W x' − ‖x'‖²/2) / √F, an unbiased estimate of exp(q'·k') = exp(q·k/√D).

These change the function (``elu`` is not softmax at all; ``favor`` only in expectation), so a
rewrite to them is paired with a recovery fine-tune. ``proj`` is a fixed draw, not trained: it
gets no gradient.
"""
from __future__ import annotations

import numpy as np

from . import register, require, wide_forward, wide_vjp
from .attention import _heads, _merge, allowed_keys, attention_infer, attention_inputs, concat_cache
from .cases import Case, add_cases

FEATURES = ("elu", "favor")
EPS = 1e-6


def _phi(x, feature, proj):
    """Feature map of the rows of x (…, D), and what its VJP needs."""
    if feature == "elu":
        return np.where(x > 0, x + 1, np.exp(np.minimum(x, 0))), None
    D = x.shape[-1]
    xs = x / D ** 0.25
    u = xs @ proj.T - 0.5 * (xs * xs).sum(axis=-1, keepdims=True)
    return np.exp(u) / float(proj.shape[0]) ** 0.5, xs   # a Python float: keeps the dtype


def _phi_vjp(g, x, phi, xs, feature, proj):
    if feature == "elu":
        return g * np.where(x > 0, 1, phi)
    gu = g * phi
    return (gu @ proj - gu.sum(axis=-1, keepdims=True) * xs) / x.shape[-1] ** 0.25


def _parts(q, K, mask, n_heads, n_kv_heads, causal, feature, proj):
    B, T, _ = q.shape
    G = n_heads // n_kv_heads
    qh = _heads(q, n_heads).reshape(B, n_kv_heads, G, T, -1)   # (B, Hkv, G, T, D)
    kh = _heads(K, n_kv_heads)[:, :, None]                     # (B, Hkv, 1, S, D)
    pq, xq = _phi(qh, feature, proj)
    pk, xk = _phi(kh, feature, proj)
    keep = allowed_keys(T, K.shape[1], mask, causal, B)[:, :, None]   # (B, 1, 1, T, S)
    a = (pq @ np.swapaxes(pk, -1, -2)) * keep
    return qh, kh, pq, xq, pk, xk, keep, a


@wide_forward
def linear_attention(q, k, v, past_k=None, past_v=None, mask=None, proj=None, *, n_heads, n_kv_heads, causal,
                     feature="elu"):
    """Σ_s φ(q_t)·φ(k_s) v_s / Σ_s φ(q_t)·φ(k_s) per head over the allowed keys; returns (out, K, V)."""
    K, V = concat_cache(k, v, past_k, past_v)
    *_, a = _parts(q, K, mask, n_heads, n_kv_heads, causal, feature, proj)
    vh = _heads(V, n_kv_heads)[:, :, None]
    out = (a @ vh) / (a.sum(axis=-1, keepdims=True) + EPS)
    B, T, HD = q.shape
    return _merge(out.reshape(B, n_heads, T, HD // n_heads)), K, V


@wide_vjp
def linear_attention_vjp(grads, inputs, outputs, *, n_heads, n_kv_heads, causal, feature="elu"):
    g_out, g_K, g_V = grads
    q, k, v, past_k, past_v, mask, proj = inputs
    _, K, V = outputs
    B, T, HD = q.shape
    D = HD // n_heads
    G = n_heads // n_kv_heads
    qh, kh, pq, xq, pk, xk, keep, a = _parts(q, K, mask, n_heads, n_kv_heads, causal, feature, proj)
    vh = _heads(V, n_kv_heads)[:, :, None]
    den = a.sum(axis=-1, keepdims=True) + EPS
    out = (a @ vh) / den
    go = _heads(g_out, n_heads).reshape(B, n_kv_heads, G, T, D)
    g_num = go / den
    g_den = -(go * out).sum(axis=-1, keepdims=True) / den
    ga = (g_num @ np.swapaxes(vh, -1, -2) + g_den) * keep       # (…, T, S)
    gvh = (np.swapaxes(a, -1, -2) @ g_num).sum(axis=2)
    gpq = ga @ pk
    gpk = (np.swapaxes(ga, -1, -2) @ pq).sum(axis=2, keepdims=True)
    gqh = _phi_vjp(gpq, qh, pq, xq, feature, proj)
    gkh = _phi_vjp(gpk, kh, pk, xk, feature, proj)
    gq = _merge(gqh.reshape(B, n_heads, T, D))
    gK = _merge(gkh[:, :, 0]) + g_K
    gV = _merge(gvh) + g_V
    S = K.shape[1] - T
    return (gq, gK[:, S:], gV[:, S:], None if past_k is None else gK[:, :S], None if past_v is None else gV[:, :S],
            None, None)


def linear_attention_infer(shapes, dtypes, *, n_heads, n_kv_heads, causal, feature="elu"):
    op = "linear_attention"
    require(feature in FEATURES, op, f"unknown feature map {feature!r} (choose from {', '.join(FEATURES)})")
    proj = shapes[6]
    if feature == "favor":
        D = shapes[0][-1] // n_heads if n_heads else 0
        require(proj is not None and len(proj) == 2 and proj[1] == D, op,
                f"feature favor needs proj (features, {D}), got {proj}")
    else:
        require(proj is None, op, f"feature elu takes no proj, got {proj}")
    return attention_infer(shapes[:6], dtypes[:6], n_heads=n_heads, n_kv_heads=n_kv_heads, causal=causal)


def linear_attention_flops(shapes, outs, *, n_heads, n_kv_heads, causal, feature="elu"):
    """FLOPs of the running-sum form a kernel uses: O((T + S)·F·D), not O(T·S·D)."""
    q, proj = shapes[0], shapes[6]
    B, T, HD = q
    S = outs[1][1]
    D = HD // n_heads
    F = proj[0] if proj is not None else D
    feats = 2 * B * n_heads * (T + S) * F * D if proj is not None else 0
    return feats + 4 * B * n_heads * (T + S) * F * D


register("linear_attention", linear_attention, linear_attention_vjp, linear_attention_infer,
         flops=linear_attention_flops, nondiff=(5, 6), n_optional=4, may_alias=True)


def favor_projection(n_features: int, head_dim: int, seed: int) -> np.ndarray:
    """FAVOR+'s random features (F, D): blocks of D orthogonal Gaussian directions (QR of a Gaussian
    matrix), each row rescaled to a χ_D-distributed norm as a Gaussian row would have; ``seed``
    redraws them."""
    r = np.random.default_rng(seed)
    blocks = []
    for _ in range(-(-n_features // head_dim)):
        qm, _ = np.linalg.qr(r.standard_normal((head_dim, head_dim)))
        blocks.append(qm.T)
    w = np.concatenate(blocks)[:n_features]
    return w * np.linalg.norm(r.standard_normal((n_features, head_dim)), axis=1, keepdims=True)


def _linear(feature, n_features=0):
    def build(B, T, S, H, KV, D, causal, pad, cache, dead_row=False, scale=1.0, offset=0.0):
        base = attention_inputs(B, T, S, H, KV, D, causal, pad, cache, dead_row, 0.5 * scale, offset)

        def make(r, d):
            (q, k, v, pk, pv, mask), attrs = base(r, d)
            k = 0.5 * k
            pk = None if pk is None else 0.5 * pk
            proj = favor_projection(n_features, D, 0).astype(q.dtype) if feature == "favor" else None
            return (q, k, v, pk, pv, mask, proj), {**attrs, "feature": feature}
        return make
    return build


add_cases("linear_attention", [
    Case("elu, causal prefill", _linear("elu")(2, 9, 0, 4, 2, 8, True, False, False)),
    Case("elu, bidirectional, padding", _linear("elu")(3, 7, 0, 2, 2, 8, False, True, False), "masked"),
    Case("elu, decode over cache", _linear("elu")(2, 1, 11, 4, 2, 8, True, True, True)),
    Case("favor, causal prefill after cache", _linear("favor", 16)(2, 6, 4, 4, 2, 8, True, True, True)),
    Case("favor, bidirectional", _linear("favor", 12)(2, 10, 0, 2, 1, 8, False, False, False)),
    *[Case(f"elu, {t} queries", _linear("elu")(1, t, 2, 2, 1, 8, True, False, True), "sizes") for t in (1, 8, 17)],
    Case("elu, large scores", _linear("elu")(2, 9, 0, 4, 2, 8, True, False, False, scale=20.0), "large"),
    Case("favor, large scores", _linear("favor", 16)(2, 9, 0, 4, 2, 8, True, False, False, scale=3.0), "large"),
    Case("elu, subnormal inputs", _linear("elu")(2, 9, 0, 4, 2, 8, True, False, False, scale=1e-30), "tiny"),
])
