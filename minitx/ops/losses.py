"""Training objectives."""
from __future__ import annotations

import numpy as np

from . import register, require
from .cases import Case, add_cases, exp_range, randn


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
_TARGETS = np.array([[1, 2, -100, 4, 0], [3, 3, 3, -100, 10]])
add_cases("cross_entropy", [
    Case("with ignored", lambda r, d: ((randn(r, (2, 5, 11), d, 2.0), _TARGETS), {})),
    Case("logits near exp overflow", lambda r, d: ((randn(r, (2, 5, 11), d, exp_range(d) / 3), _TARGETS), {}), "large"),
    Case("every target ignored", lambda r, d: ((randn(r, (2, 5, 11), d), np.full((2, 5), -100)), {}), "masked"),
    Case("tied logits", lambda r, d: ((np.zeros((2, 5, 11), d), _TARGETS), {}), "ties"),
])


# ------------------------------------------------------------------------- distillation (minitx distill)
# A student learns from a teacher through these: the teacher's softened next-token distribution
# (kl_div), its hidden states (mse, after a learned projection) and its attention maps
# (attention_probs + prob_kl). The teacher's side is a constant in training, but every input gets
# its exact gradient so the spec stays complete.

from . import same_as  # noqa: E402


def kl_div(logits, target_logits, mask=None, *, temperature=1.0):
    """T² · mean over positions of KL(p_t ‖ p_s) = Σ_v p_t,v (log p_t,v − log p_s,v),
    p_s = softmax(logits / T), p_t = softmax(target_logits / T). ``mask`` (the positions' shape,
    1 = counted) leaves out padding: an encoder–decoder's padded target slots."""
    T = temperature
    ls, lt = _log_softmax(logits / T), _log_softmax(target_logits / T)
    per_row = (np.exp(lt) * (lt - ls)).sum(axis=-1)
    if mask is None:
        return np.asarray(T * T * float(per_row.sum()) / max(per_row.size, 1), dtype=logits.dtype)
    m = mask != 0
    return np.asarray(T * T * float(per_row[m].sum()) / max(int(m.sum()), 1), dtype=logits.dtype)


def kl_div_vjp(grads, inputs, outputs, *, temperature=1.0):
    # ∂/∂s = T/N · (p_s − p_t);   ∂/∂t = T/N · p_t ⊙ (d − Σ p_t d),  d = log p_t − log p_s
    (g,) = grads
    logits, target, mask = (*inputs, None)[:3]
    T = temperature
    ls, lt = _log_softmax(logits / T), _log_softmax(target / T)
    ps, pt = np.exp(ls), np.exp(lt)
    if mask is None:
        c = g * T / max(int(np.prod(logits.shape[:-1])), 1)
    else:
        m = (mask != 0)[..., None]
        c = g * T * m / max(int(m.sum()), 1)
    d = lt - ls
    g_t = pt * (d - (pt * d).sum(axis=-1, keepdims=True))
    return ((c * (ps - pt)).astype(logits.dtype), (c * g_t).astype(target.dtype), None)[:len(inputs)]


def _same_shape_scalar(op):
    def infer(shapes, dtypes, **attrs):
        a, b = shapes
        require(tuple(a) == tuple(b), op, f"input {tuple(a)} and target {tuple(b)} must have the same shape")
        require(len(a) >= 1, op, "inputs need at least one axis")
        return [((), dtypes[0])]
    return infer


def _kl_div_check(shapes, dtypes, *, temperature=1.0):
    require(temperature > 0, "kl_div", f"temperature must be > 0, got {temperature}")
    a, b, m = (*shapes, None)[:3]
    require(m is None or tuple(m) == tuple(a[:-1]), "kl_div",
            f"mask {m} must match the logits {a} without the class axis")
    return _same_shape_scalar("kl_div")([a, b], dtypes)


register("kl_div", kl_div, kl_div_vjp, _kl_div_check,
         flops=lambda s, o, **a: 10 * int(np.prod(s[0])), nondiff=(2,), n_optional=1, vjp_uses_outputs=False)
_PAD = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
add_cases("kl_div", [
    Case("T=1", lambda r, d: ((randn(r, (2, 5, 11), d, 2.0), randn(r, (2, 5, 11), d, 2.0)), {})),
    Case("T=2", lambda r, d: ((randn(r, (3, 17), d, 2.0), randn(r, (3, 17), d, 2.0)), {"temperature": 2.0})),
    Case("logits near exp overflow", lambda r, d: ((randn(r, (3, 17), d, exp_range(d) / 3),
                                                    randn(r, (3, 17), d, exp_range(d) / 3)), {}), "large"),
    Case("padded positions masked", lambda r, d: ((randn(r, (2, 5, 11), d, 2.0), randn(r, (2, 5, 11), d, 2.0),
                                                   _PAD), {"temperature": 2.0}), "masked"),
    Case("every position masked", lambda r, d: ((randn(r, (2, 5, 11), d), randn(r, (2, 5, 11), d),
                                                 np.zeros((2, 5), np.int64)), {}), "masked"),
])


def mse(x, target):
    """mean((x − target)²) over every element."""
    # Summed in float64: in float16 the sum of squares overflows long before their mean does.
    d = x.astype(np.float64) - target.astype(np.float64)
    return np.asarray(float(np.square(d).sum()) / max(x.size, 1), dtype=x.dtype)


def mse_vjp(grads, inputs, outputs):
    (g,) = grads
    x, target = inputs
    d = (x.astype(np.float64) - target) * (2.0 * np.float64(g) / max(x.size, 1))
    return d.astype(x.dtype), (-d).astype(target.dtype)


register("mse", mse, mse_vjp, _same_shape_scalar("mse"),
         flops=lambda s, o, **a: 3 * int(np.prod(s[0])), vjp_uses_outputs=False)
add_cases("mse", [Case("3x5x16", lambda r, d: ((randn(r, (3, 5, 16), d), randn(r, (3, 5, 16), d)), {})),
                  Case("equal inputs", lambda r, d: ((np.ones((4, 8), d), np.ones((4, 8), d)), {}), "zeros")])


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


def _probs(r, shape, d, zeros=False):
    e = np.exp(r.standard_normal(shape))
    if zeros:
        e[..., ::3] = 0.0      # masked keys: the target puts no mass there
    return (e / e.sum(axis=-1, keepdims=True)).astype(d)


add_cases("prob_kl", [
    Case("attention maps", lambda r, d: ((_probs(r, (2, 3, 4, 9), d), _probs(r, (2, 3, 4, 9), d)), {})),
    Case("target zero on masked keys", lambda r, d: ((_probs(r, (2, 4, 9), d), _probs(r, (2, 4, 9), d, True)), {}),
         "masked"),
])


def scale(x, *, factor):
    """factor · x (weights a loss term in a sum of losses)."""
    return np.asarray(x * x.dtype.type(factor))


register("scale", scale, lambda grads, inputs, outputs, *, factor: (np.asarray(grads[0] * factor, inputs[0].dtype),),
         same_as(0), flops=lambda s, o, **a: int(np.prod(o[0])), vjp_uses_outputs=False)
add_cases("scale", [Case("0.25", lambda r, d: ((randn(r, (3, 7), d),), {"factor": 0.25})),
                    Case("scalar loss", lambda r, d: ((np.asarray(randn(r, (1,), d)[0]),), {"factor": 3.0}))])
