"""Training objectives."""
from __future__ import annotations

import numpy as np

from . import register, require


def _log_softmax(x):
    z = x - x.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def cross_entropy(logits, targets, *, ignore_index=-100):
    """mean over counted positions of −log softmax(logits)[target]; targets == ignore_index are skipped."""
    logp = _log_softmax(logits).reshape(-1, logits.shape[-1])
    t = targets.reshape(-1)
    keep = t != ignore_index
    picked = logp[np.nonzero(keep)[0], t[keep]]
    return np.asarray(-picked.sum() / max(int(keep.sum()), 1), dtype=logits.dtype)


def cross_entropy_vjp(grads, inputs, outputs, *, ignore_index=-100):
    (g,) = grads
    logits, targets = inputs
    V = logits.shape[-1]
    p = np.exp(_log_softmax(logits)).reshape(-1, V)
    t = targets.reshape(-1)
    keep = t != ignore_index
    rows = np.nonzero(keep)[0]
    p[rows, t[keep]] -= 1.0
    p[~keep] = 0.0
    return (p * (g / max(int(keep.sum()), 1))).reshape(logits.shape).astype(logits.dtype), None


def cross_entropy_infer(shapes, dtypes, *, ignore_index=-100):
    logits, targets = shapes
    require(tuple(targets) == tuple(logits[:-1]), "cross_entropy",
            f"targets {targets} must match logits {logits} without the class axis")
    return [((), dtypes[0])]


register("cross_entropy", cross_entropy, cross_entropy_vjp, cross_entropy_infer,
         flops=lambda s, o, **a: 4 * int(np.prod(s[0])), nondiff=(1,), vjp_uses_outputs=False)


# ------------------------------------------------------------------------- distillation (minitx distill)
# A student learns from a teacher through these: the teacher's softened next-token distribution
# (kl_div), its hidden states (mse, after a learned projection) and its attention maps
# (attention_probs + prob_kl). The teacher's side is a constant in training, but every input gets
# its exact gradient so the spec stays complete.

from . import attention as _attn  # noqa: E402  (attention_probs reuses the attention op's softmax)
from . import same_as  # noqa: E402


def kl_div(logits, target_logits, *, temperature=1.0):
    """T² · mean over positions of KL(p_t ‖ p_s) = Σ_v p_t,v (log p_t,v − log p_s,v),
    p_s = softmax(logits / T), p_t = softmax(target_logits / T)."""
    T = temperature
    ls, lt = _log_softmax(logits / T), _log_softmax(target_logits / T)
    rows = max(int(np.prod(logits.shape[:-1])), 1)
    return np.asarray(T * T * float((np.exp(lt) * (lt - ls)).sum()) / rows, dtype=logits.dtype)


def kl_div_vjp(grads, inputs, outputs, *, temperature=1.0):
    # ∂/∂s = T/N · (p_s − p_t);   ∂/∂t = T/N · p_t ⊙ (d − Σ p_t d),  d = log p_t − log p_s
    (g,) = grads
    logits, target = inputs
    T = temperature
    ls, lt = _log_softmax(logits / T), _log_softmax(target / T)
    ps, pt = np.exp(ls), np.exp(lt)
    c = g * T / max(int(np.prod(logits.shape[:-1])), 1)
    d = lt - ls
    g_t = pt * (d - (pt * d).sum(axis=-1, keepdims=True))
    return (c * (ps - pt)).astype(logits.dtype), (c * g_t).astype(target.dtype)


def _same_shape_scalar(op):
    def infer(shapes, dtypes, **attrs):
        a, b = shapes
        require(tuple(a) == tuple(b), op, f"input {tuple(a)} and target {tuple(b)} must have the same shape")
        require(len(a) >= 1, op, "inputs need at least one axis")
        return [((), dtypes[0])]
    return infer


def _kl_div_check(shapes, dtypes, *, temperature=1.0):
    require(temperature > 0, "kl_div", f"temperature must be > 0, got {temperature}")
    return _same_shape_scalar("kl_div")(shapes, dtypes)


register("kl_div", kl_div, kl_div_vjp, _kl_div_check,
         flops=lambda s, o, **a: 10 * int(np.prod(s[0])), vjp_uses_outputs=False)


def mse(x, target):
    """mean((x − target)²) over every element."""
    return np.asarray(float(np.square(x - target).sum()) / max(x.size, 1), dtype=x.dtype)


def mse_vjp(grads, inputs, outputs):
    (g,) = grads
    x, target = inputs
    d = (x - target) * (2.0 * g / max(x.size, 1))
    return d.astype(x.dtype), (-d).astype(target.dtype)


register("mse", mse, mse_vjp, _same_shape_scalar("mse"),
         flops=lambda s, o, **a: 3 * int(np.prod(s[0])), vjp_uses_outputs=False)


def prob_kl(p, target):
    """mean over rows (every axis but the last) of KL(target ‖ p) = Σ_j t_j (log t_j − log p_j).

    Entries where the target is 0 add nothing (masked keys of an attention map); p is floored at
    the dtype's smallest normal number so a 0 where the target is not becomes a large, finite loss.
    """
    rows = max(int(np.prod(p.shape[:-1])), 1)
    pos = target > 0
    t = np.where(pos, target, 1)
    terms = np.where(pos, target * (np.log(t) - np.log(np.maximum(p, np.finfo(p.dtype).tiny))), 0)
    return np.asarray(float(terms.sum()) / rows, dtype=p.dtype)


def prob_kl_vjp(grads, inputs, outputs):
    # ∂/∂p_j = −t_j / p_j;   ∂/∂t_j = log t_j − log p_j + 1   (0 where t_j = 0: the term is absent)
    (g,) = grads
    p, target = inputs
    c = g / max(int(np.prod(p.shape[:-1])), 1)
    pos = target > 0
    pf = np.maximum(p, np.finfo(p.dtype).tiny)
    t = np.where(pos, target, 1)
    g_p = np.where(pos, -target / pf, 0) * c
    g_t = np.where(pos, np.log(t) - np.log(pf) + 1, 0) * c
    return g_p.astype(p.dtype), g_t.astype(target.dtype)


register("prob_kl", prob_kl, prob_kl_vjp, _same_shape_scalar("prob_kl"),
         flops=lambda s, o, **a: 6 * int(np.prod(s[0])), vjp_uses_outputs=False)


def attention_probs(q, k, mask=None, *, n_heads, n_kv_heads, causal, scale=None, n_maps=None):
    """The attention op's probabilities softmax(Q Kᵀ·scale) over allowed keys, (B, n_maps, T, S):
    per head (n_maps = n_heads, the default) or averaged over contiguous groups of n_heads / n_maps
    heads, so models with different head counts can be compared map for map."""
    B, T, _ = q.shape
    D = q.shape[-1] // n_heads
    m = n_maps or n_heads
    sc = q.dtype.type(1.0 / np.sqrt(D) if scale is None else scale)
    p, _, _, _ = _attn.probs(q, k, mask, n_heads, n_kv_heads, causal, sc)
    p = p.reshape(B, m, n_heads // m, T, k.shape[1])
    return p.mean(axis=2) if n_heads != m else p[:, :, 0]


def attention_probs_vjp(grads, inputs, outputs, *, n_heads, n_kv_heads, causal, scale=None, n_maps=None):
    (g,) = grads
    q, k, mask = inputs
    B, T, _ = q.shape
    D = q.shape[-1] // n_heads
    m = n_maps or n_heads
    sc = q.dtype.type(1.0 / np.sqrt(D) if scale is None else scale)
    p, _, qh, kh = _attn.probs(q, k, mask, n_heads, n_kv_heads, causal, sc)
    gp = (np.repeat(g, n_heads // m, axis=1) / (n_heads // m)).reshape(p.shape)
    gs = p * (gp - (gp * p).sum(axis=-1, keepdims=True)) * sc      # softmax VJP, then the scale
    gs = np.where(_attn.allowed_keys(T, k.shape[1], mask, causal, B)[:, :, None], gs, 0)
    gq = _attn._merge((gs @ kh).reshape(B, n_heads, T, D))
    gk = _attn._merge((np.swapaxes(gs, -1, -2) @ qh).sum(axis=2))
    return gq.astype(q.dtype), gk.astype(k.dtype), None


def attention_probs_infer(shapes, dtypes, *, n_heads, n_kv_heads, causal, scale=None, n_maps=None):
    q, k, mask = shapes
    op = "attention_probs"
    require(len(q) == 3 and len(k) == 3, op, f"q, k must be (B, T, H·D), got {q}, {k}")
    require(n_heads % n_kv_heads == 0, op, f"n_heads {n_heads} is not a multiple of n_kv_heads {n_kv_heads}")
    require(q[-1] % n_heads == 0, op, f"q width {q[-1]} is not divisible by n_heads {n_heads}")
    m = n_maps or n_heads
    require(n_heads % m == 0, op, f"n_heads {n_heads} is not a multiple of n_maps {m}")
    kv = n_kv_heads * (q[-1] // n_heads)
    require(k[0] == q[0] and k[2] == kv, op, f"k {k} must be ({q[0]}, S, {kv}) for {n_kv_heads} kv heads")
    if mask is not None:
        require(tuple(mask) == (q[0], k[1]), op, f"mask {mask} must be (batch, keys) = {(q[0], k[1])}")
    return [((q[0], m, q[1], k[1]), dtypes[0])]


def attention_probs_flops(shapes, outs, *, n_heads, **attrs):
    (B, T, HD), S = shapes[0], shapes[1][1]
    return 2 * B * T * S * HD + 5 * B * n_heads * T * S    # Q Kᵀ, then the softmax


register("attention_probs", attention_probs, attention_probs_vjp, attention_probs_infer, flops=attention_probs_flops,
         nondiff=(2,), n_optional=1, vjp_uses_outputs=False)


def scale(x, *, factor):
    """factor · x (weights a loss term in a sum of losses)."""
    return np.asarray(x * x.dtype.type(factor))


register("scale", scale, lambda grads, inputs, outputs, *, factor: (np.asarray(grads[0] * factor, inputs[0].dtype),),
         same_as(0), flops=lambda s, o, **a: int(np.prod(o[0])), vjp_uses_outputs=False)
