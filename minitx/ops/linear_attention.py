"""Linear (kernel) attention: softmax(q·k) replaced by a feature-map product φ(q)·φ(k).

``linear_attention`` has the inputs and outputs of :mod:`.attention` (GQA, causal, padding mask,
KV cache) plus ``proj``, the random features of FAVOR+. Per head, with φ applied to each row,

    out_t = Σ_s a_ts v_s / (Σ_s a_ts + eps),   a_ts = φ(q_t)·φ(k_s)  over the allowed keys s,

which regroups as φ(q_t)ᵀ (Σ_s φ(k_s) v_sᵀ) / φ(q_t)ᵀ (Σ_s φ(k_s)): a (F, D) state and an F-vector
instead of the T×S score matrix — prefix sums of them when causal, so a decoder needs O(1) state
per step (Katharopoulos et al., 2020). The spec computes the masked a_ts matrix, the readable
truth; a kernel keeps the running sums. ``linear_attention_state`` is the causal form that
carries those sums (S, z) from step to step instead of a KV cache: what decoding runs. Feature maps (``feature``):

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


# ------------------------------------------------------------------ recurrent (decode-state) form
def _state_parts(q, k, state_s, state_z, mask, n_heads, n_kv_heads, feature, proj):
    B, T, _ = q.shape
    G = n_heads // n_kv_heads
    qh = _heads(q, n_heads).reshape(B, n_kv_heads, G, T, -1)   # (B, Hkv, G, T, D)
    kh = _heads(k, n_kv_heads)[:, :, None]                     # (B, Hkv, 1, T, D)
    D = qh.shape[-1]
    Fn = D if feature == "elu" else proj.shape[0]
    pq, xq = _phi(qh, feature, proj)
    pk, xk = _phi(kh, feature, proj)
    m = np.ones((B, T), q.dtype) if mask is None else mask[:, -T:].astype(q.dtype)
    m = m[:, None, None, :, None]                              # the new keys that are real
    pkm = pk * m
    s0 = (np.zeros((B, n_kv_heads, Fn, D), q.dtype) if state_s is None else state_s)[:, :, None]  # (B, Hkv, 1, F, D)
    z0 = (np.zeros((B, n_kv_heads, Fn), q.dtype) if state_z is None else state_z)[:, :, None, None]  # (…, 1, 1, F)
    tril = np.tril(np.ones((T, T), bool))
    a = (pq @ np.swapaxes(pkm, -1, -2)) * tril                 # (B, Hkv, G, T, T)
    return qh, kh, pq, xq, pk, xk, m, pkm, s0, z0, tril, a


@wide_forward
def linear_attention_state(q, k, v, state_s=None, state_z=None, mask=None, proj=None, *, n_heads, n_kv_heads,
                           feature="elu"):
    """Causal linear attention continued from a recurrent state instead of a KV cache: with
    S₀ = Σ φ(k) vᵀ and z₀ = Σ φ(k) over the tokens before (per kv head, (F, D) and (F,)),

        out_t = φ(q_t)ᵀ (S₀ + Σ_{s≤t} φ(k_s) v_sᵀ) / (φ(q_t)ᵀ (z₀ + Σ_{s≤t} φ(k_s)) + eps)

    over the new tokens (those ``mask``, (B, T) or (B, past + T) of which the last T are read,
    marks real), and the state grows by their keys. This is :func:`linear_attention` with
    ``causal=True`` over the whole prefix — same sums, same eps — but a decode step costs O(F·D)
    per head whatever the length, and the state is the whole cache. Returns (out, S, z)."""
    qh, kh, pq, xq, pk, xk, m, pkm, s0, z0, tril, a = _state_parts(q, k, state_s, state_z, mask, n_heads,
                                                                   n_kv_heads, feature, proj)
    vh = _heads(v, n_kv_heads)[:, :, None]
    num = pq @ s0 + a @ vh
    den = (pq * z0).sum(axis=-1, keepdims=True) + a.sum(axis=-1, keepdims=True) + EPS
    B, T, HD = q.shape
    out = _merge((num / den).reshape(B, n_heads, T, HD // n_heads))
    s1 = s0[:, :, 0] + (np.swapaxes(pkm, -1, -2) @ vh)[:, :, 0]
    z1 = z0[:, :, 0, 0] + pkm.sum(axis=-2)[:, :, 0]
    return out, s1, z1


@wide_vjp
def linear_attention_state_vjp(grads, inputs, outputs, *, n_heads, n_kv_heads, feature="elu"):
    g_out, g_s, g_z = grads
    q, k, v, state_s, state_z, mask, proj = inputs
    B, T, HD = q.shape
    D = HD // n_heads
    G = n_heads // n_kv_heads
    qh, kh, pq, xq, pk, xk, m, pkm, s0, z0, tril, a = _state_parts(q, k, state_s, state_z, mask, n_heads,
                                                                   n_kv_heads, feature, proj)
    t = lambda x: np.swapaxes(x, -1, -2)  # noqa: E731
    vh = _heads(v, n_kv_heads)[:, :, None]
    den = (pq * z0).sum(axis=-1, keepdims=True) + a.sum(axis=-1, keepdims=True) + EPS
    out = (pq @ s0 + a @ vh) / den
    go = _heads(g_out, n_heads).reshape(B, n_kv_heads, G, T, D)
    g_num = go / den
    g_den = -(go * out).sum(axis=-1, keepdims=True) / den        # (…, T, 1)
    g_s = np.zeros_like(s0[:, :, 0]) if g_s is None else g_s
    g_z = np.zeros_like(z0[:, :, 0, 0]) if g_z is None else g_z
    ga = (g_num @ t(vh) + g_den) * tril
    gpq = g_num @ t(s0) + g_den * z0 + ga @ pkm
    gpkm = (t(ga) @ pq).sum(axis=2, keepdims=True) + vh @ t(g_s[:, :, None]) + g_z[:, :, None, None]
    gvh = (t(a) @ g_num).sum(axis=2) + (pkm @ g_s[:, :, None])[:, :, 0]
    gqh = _phi_vjp(gpq, qh, pq, xq, feature, proj)
    gkh = _phi_vjp(gpkm * m, kh, pk, xk, feature, proj)
    gs0 = (t(pq) @ g_num).sum(axis=2) + g_s
    gz0 = (pq * g_den).sum(axis=(2, 3)) + g_z
    return (_merge(gqh.reshape(B, n_heads, T, D)), _merge(gkh[:, :, 0]), _merge(gvh),
            None if state_s is None else gs0, None if state_z is None else gz0, None, None)


def state_shapes(n_kv_heads: int, head_dim: int, feature: str, n_features: int = 0) -> tuple[tuple, tuple]:
    """Per-row shapes of the recurrent state (S, z): (Hkv, F, D) and (Hkv, F); F = D for elu."""
    F = head_dim if feature == "elu" else n_features
    return (n_kv_heads, F, head_dim), (n_kv_heads, F)


def linear_attention_state_infer(shapes, dtypes, *, n_heads, n_kv_heads, feature="elu"):
    op = "linear_attention_state"
    q, k, v, ss, sz, mask, proj = shapes
    require(feature in FEATURES, op, f"unknown feature map {feature!r} (choose from {', '.join(FEATURES)})")
    base = attention_infer([q, k, v, None, None, None], dtypes[:6], n_heads=n_heads, n_kv_heads=n_kv_heads,
                           causal=True)
    D = q[-1] // n_heads
    if feature == "favor":
        require(proj is not None and len(proj) == 2 and proj[1] == D, op,
                f"feature favor needs proj (features, {D}), got {proj}")
    else:
        require(proj is None, op, f"feature elu takes no proj, got {proj}")
    s_shape, z_shape = state_shapes(n_kv_heads, D, feature, proj[0] if proj is not None else 0)
    s_shape, z_shape = (q[0], *s_shape), (q[0], *z_shape)
    require((ss is None) == (sz is None), op, "state_s and state_z come together")
    if ss is not None:
        require(tuple(ss) == s_shape and tuple(sz) == z_shape, op,
                f"state must be S {s_shape} and z {z_shape}, got {tuple(ss)} and {tuple(sz)}")
    if mask is not None:
        require(len(mask) == 2 and mask[0] == q[0] and mask[1] >= q[1], op,
                f"mask {mask} must be (batch, past + new) with at least the {q[1]} new tokens")
    return [base[0], (s_shape, dtypes[0]), (z_shape, dtypes[0])]


def linear_attention_state_flops(shapes, outs, *, n_heads, n_kv_heads, feature="elu"):
    """The running-sum form: O(T·F·D) per head, independent of how many tokens the state holds."""
    B, T, HD = shapes[0]
    D = HD // n_heads
    F = outs[1][2]
    feats = 2 * B * (n_heads + n_kv_heads) * T * F * D if feature == "favor" else 0
    return feats + 6 * B * n_heads * T * F * D + 2 * B * n_heads * T * T * (F + D)


register("linear_attention_state", linear_attention_state, linear_attention_state_vjp,
         linear_attention_state_infer, flops=linear_attention_state_flops, nondiff=(5, 6), n_optional=4)


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


def _stateful(feature, n_features=0):
    def build(B, T, S, H, KV, D, pad, state, scale=1.0):
        base = attention_inputs(B, T, S, H, KV, D, True, pad, False, False, 0.5 * scale)

        def make(r, d):
            (q, k, v, _, _, mask), attrs = base(r, d)
            k = 0.5 * k
            proj = favor_projection(n_features, D, 0).astype(q.dtype) if feature == "favor" else None
            ss = sz = None
            if state:   # the state S tokens would leave: sums of φ(k) vᵀ and φ(k) over random ones
                pk = _phi(0.5 * r.standard_normal((B, KV, S, D)).astype(d), feature, proj)[0]
                ss = np.swapaxes(pk, -1, -2) @ r.standard_normal((B, KV, S, D)).astype(d)
                sz = pk.sum(axis=-2)
            return (q, k, v, ss, sz, mask, proj), {"n_heads": H, "n_kv_heads": KV, "feature": feature}
        return make
    return build


add_cases("linear_attention_state", [
    Case("elu, prefill from empty", _stateful("elu")(2, 9, 0, 4, 2, 8, False, False)),
    Case("elu, decode from state, padding", _stateful("elu")(3, 1, 11, 4, 2, 8, True, True), "masked"),
    Case("elu, prefill after state, padding", _stateful("elu")(2, 6, 5, 2, 2, 8, True, True), "masked"),
    Case("favor, decode from state", _stateful("favor", 16)(2, 1, 7, 4, 2, 8, False, True)),
    Case("favor, prefill after state", _stateful("favor", 12)(2, 5, 4, 2, 1, 8, True, True)),
    *[Case(f"elu, {t} queries after state", _stateful("elu")(1, t, 3, 2, 1, 8, False, True), "sizes")
      for t in (1, 8, 17)],
    Case("elu, large scores", _stateful("elu")(2, 9, 4, 4, 2, 8, False, True, scale=20.0), "large"),
    Case("elu, subnormal inputs", _stateful("elu")(2, 9, 0, 4, 2, 8, False, False, scale=1e-30), "tiny"),
])
