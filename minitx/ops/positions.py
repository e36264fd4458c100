"""Position information: rotary embeddings and fixed sinusoidal tables.

Learned positions need no op of their own: they are ``embedding(position_ids, table)``.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from . import register, require
from .cases import Case, add_cases, randn, viewed


def _rope_angles(positions, head_dim, theta):
    """θ_{p,i} = p · theta^(−2i/d) for i < d/2; returns cos and sin, shaped (B, T, 1, d/2)."""
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    ang = positions.astype(np.float64)[..., None, None] * inv_freq
    return np.cos(ang), np.sin(ang)


def rope(x, positions, *, n_heads, theta=10000.0):
    """Rotate each head's (x₁, x₂) halves by the position angle: [x₁cos − x₂sin, x₂cos + x₁sin]."""
    B, T, HD = x.shape
    D = HD // n_heads
    cos, sin = (a.astype(x.dtype) for a in _rope_angles(positions, D, theta))
    xh = x.reshape(B, T, n_heads, D)
    x1, x2 = xh[..., : D // 2], xh[..., D // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(B, T, HD)


def rope_vjp(grads, inputs, outputs, *, n_heads, theta=10000.0):
    """A rotation's transpose is the rotation by −θ."""
    (g,) = grads
    x, positions = inputs
    return rope(g, -positions, n_heads=n_heads, theta=theta), None


def rope_infer(shapes, dtypes, *, n_heads, theta=10000.0):
    x, pos = shapes
    require(len(x) == 3 and x[-1] % n_heads == 0 and (x[-1] // n_heads) % 2 == 0, "rope",
            f"input {x} must be (B, T, {n_heads}·D) with D even")
    require(tuple(pos) == tuple(x[:2]), "rope", f"positions {pos} must be (B, T) = {tuple(x[:2])}")
    return [(tuple(x), dtypes[0])]


register("rope", rope, rope_vjp, rope_infer, flops=lambda s, o, **a: 6 * int(np.prod(o[0])), nondiff=(1,),
         vjp_uses_outputs=False)
_ROPE = [Case("decode", lambda r, d: ((randn(r, (2, 1, 4 * 8), d), r.integers(0, 100, (2, 1))), {"n_heads": 4})),
         Case("prefill", lambda r, d: ((randn(r, (2, 50, 12 * 64), d), np.tile(np.arange(50), (2, 1))),
                                       {"n_heads": 12, "theta": 10000.0}))]
add_cases("rope", _ROPE + [
    # Angles of far positions lose every digit when computed in float32.
    Case("positions near 30000", lambda r, d: ((randn(r, (2, 3, 2 * 16), d), r.integers(29000, 30000, (2, 3))),
                                               {"n_heads": 2}), "large"),
    Case("65 positions, head dim 2", lambda r, d: ((randn(r, (1, 65, 3 * 2), d), np.arange(65)[None]), {"n_heads": 3}),
         "sizes"),
    viewed(_ROPE[1]),
])


@lru_cache(maxsize=8)
def sinusoidal_table(max_len: int, dim: int, halves: bool = False) -> np.ndarray:
    """PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(p / 10000^(2i/d)) (Vaswani et al.);
    with ``halves`` the sines fill the first ⌈d/2⌉ columns and the cosines the rest (Marian's layout)."""
    pos = np.arange(max_len, dtype=np.float64)[:, None]
    inv = 10000.0 ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    table = np.zeros((max_len, dim))
    sin, cos = np.sin(pos * inv), np.cos(pos * inv)[:, : dim // 2]
    if halves:
        table[:, : sin.shape[1]], table[:, sin.shape[1]:] = sin, cos
    else:
        table[:, 0::2], table[:, 1::2] = sin, cos
    table.flags.writeable = False
    return table


def sinusoidal_positions(positions, *, dim, max_len, dtype="float32", halves=False):
    """Rows of the precomputed sinusoidal table for the given positions."""
    return sinusoidal_table(max_len, dim, bool(halves))[positions].astype(dtype)


def sinusoidal_vjp(grads, inputs, outputs, **attrs):
    return (None,)


def sinusoidal_infer(shapes, dtypes, *, dim, max_len, dtype="float32", halves=False):
    require(np.issubdtype(np.dtype(dtypes[0]), np.integer), "sinusoidal_positions", "positions must be integers")
    return [((*shapes[0], dim), dtype)]


register("sinusoidal_positions", sinusoidal_positions, sinusoidal_vjp, sinusoidal_infer, nondiff=(0,),
         vjp_uses_outputs=False)
add_cases("sinusoidal_positions", [
    Case("table", lambda r, d: ((r.integers(0, 64, (2, 5)),), {"dim": 16, "max_len": 64, "dtype": d}))])
