"""Check an op's VJP against central finite differences, in float64.

Used by the test suite for every spec op (a backend's VJPs are checked against the spec's by
:mod:`minitx.conformance`, and ``forward``/``vjp`` here let a backend author probe one directly). The
scalar probed is L = Σ_k <c_k, y_k> for random cotangents c_k, so ∂L/∂x is exactly what the VJP
returns for those cotangents. Small inputs are perturbed element by element; large ones along
random directions (a directional derivative), which still catches any wrong entry with high
probability.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from . import ops


@dataclass
class GradCheckResult:
    op: str
    input_index: int
    max_abs_error: float
    scale: float

    @property
    def rel_error(self) -> float:
        return self.max_abs_error / max(self.scale, 1e-12)


def _as_tuple(y):
    return y if isinstance(y, tuple) else (y,)


def check_vjp(
    op: str,
    inputs: Sequence[np.ndarray | None],
    attrs: dict | None = None,
    *,
    forward: Callable | None = None,
    vjp: Callable | None = None,
    eps: float = 1e-6,
    rtol: float = 1e-5,
    atol: float = 1e-7,
    seed: int = 0,
    max_elementwise: int = 256,
    n_directions: int = 6,
) -> list[GradCheckResult]:
    """Compare the VJP of ``op`` with finite differences; raise AssertionError on a mismatch.

    ``forward``/``vjp`` default to the spec's, so a backend can check its own kernels the same way.
    """
    spec = ops.get(op)
    attrs = dict(attrs or {})
    forward = forward or spec.forward
    vjp = vjp or spec.vjp
    rng = np.random.default_rng(seed)
    inputs = list(inputs)
    outs = _as_tuple(forward(*inputs, **attrs))
    cots = tuple(rng.standard_normal(np.shape(y)) for y in outs)

    def loss(xs):
        ys = _as_tuple(forward(*xs, **attrs))
        return sum(float(np.sum(c * y)) for c, y in zip(cots, ys))

    grads = vjp(cots, tuple(inputs), outs, **attrs)
    results = []
    for i, x in enumerate(inputs):
        if x is None or i in spec.nondiff or not np.issubdtype(np.asarray(x).dtype, np.floating):
            continue
        g = grads[i]
        assert g is not None, f"{op}: VJP returned None for differentiable input {i}"
        assert np.shape(g) == np.shape(x), f"{op}: gradient of input {i} has shape {np.shape(g)}, input {np.shape(x)}"

        def perturbed(d):
            xs = list(inputs)
            xs[i] = x + eps * d
            up = loss(xs)
            xs[i] = x - eps * d
            return (up - loss(xs)) / (2 * eps)

        if x.size <= max_elementwise:
            numeric = np.zeros(x.size)
            for j in range(x.size):
                d = np.zeros(x.size)
                d[j] = 1.0
                numeric[j] = perturbed(d.reshape(x.shape))
            analytic = np.asarray(g, dtype=np.float64).reshape(-1)
        else:
            dirs = [rng.standard_normal(x.shape) for _ in range(n_directions)]
            numeric = np.array([perturbed(d) for d in dirs])
            analytic = np.array([float(np.sum(g * d)) for d in dirs])
        err = np.abs(numeric - analytic)
        scale = float(np.max(np.abs(numeric), initial=0.0))
        results.append(GradCheckResult(op, i, float(err.max(initial=0.0)), scale))
        bad = err > atol + rtol * np.abs(numeric)
        assert not bad.any(), (
            f"{op}: VJP of input {i} disagrees with finite differences: max abs error {err.max():.3g} "
            f"(numeric {numeric[bad][:3]}, analytic {analytic[bad][:3]})"
        )
    return results
