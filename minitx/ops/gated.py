"""GEGLU: the gated-GELU middle of T5 v1.1's feed-forward block (SwiGLU's sibling).

On a packed (…, 2F) input [gate | up]: GELU(gate) · up, with the tanh approximation T5 uses
(``gelu_new``) or the exact erf form.
"""
from __future__ import annotations

import numpy as np

from . import elementwise_flops, register, require
from .activations import _pointwise_cases, gelu, gelu_vjp
from .cases import add_cases


def geglu(h, *, approximate="tanh"):
    """GELU(gate) · up on [gate | up] along the last axis."""
    gate, up = np.split(h, 2, axis=-1)
    return gelu(gate, approximate=approximate) * up


def geglu_vjp(grads, inputs, outputs, *, approximate="tanh"):
    (g,) = grads
    gate, up = np.split(inputs[0], 2, axis=-1)
    (ggate,) = gelu_vjp((g * up,), (gate,), None, approximate=approximate)
    return (np.concatenate([ggate, g * gelu(gate, approximate=approximate)], axis=-1),)


def _geglu_infer(shapes, dtypes, *, approximate="tanh"):
    (h,) = shapes
    require(h[-1] % 2 == 0, "geglu", f"last axis of {h} must be even ([gate | up])")
    require(approximate in ("none", "tanh"), "geglu", f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return [((*h[:-1], h[-1] // 2), dtypes[0])]


register("geglu", geglu, geglu_vjp, _geglu_infer, flops=elementwise_flops(10), vjp_uses_outputs=False)
add_cases("geglu", _pointwise_cases(pair=True, approximate="tanh") + _pointwise_cases(pair=True, approximate="none"))
