"""The op registry: every op minitx knows is a NumPy forward, a VJP, and shape rules.

An op is registered once, here in the spec, and backends may only *re-implement* ops that exist
here (principle 1: no op without a spec). The calling conventions are fixed so that an executor,
a backend and a gradient checker can all drive any op the same way:

* ``forward(*inputs, **attrs)`` returns one array or a tuple of arrays. An absent optional input
  is ``None``.
* ``vjp(grads, inputs, outputs, **attrs)`` receives the cotangent of every output (a tuple, same
  length as the outputs), the inputs and the outputs of the forward call, and returns one
  cotangent per input (``None`` for inputs that are not differentiable, such as token ids or
  masks, or absent).
* ``infer(shapes, dtypes, **attrs)`` returns ``[(shape, dtype), ...]`` for the outputs, raising
  :class:`ShapeError` with the op's name when the inputs do not fit. Absent inputs have shape
  ``None``.
* ``flops(shapes, out_shapes, **attrs)`` counts multiply-adds as two FLOPs.

Each op module declares, right under an op's ``register``, its conformance cases
(:func:`add_cases`, :mod:`minitx.ops.cases`): the inputs a backend's kernel for it is checked on.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..errors import MinitxError, ShapeError

Shape = tuple[int, ...]


@dataclass(frozen=True)
class OpSpec:
    name: str
    forward: Callable[..., Any]
    vjp: Callable[..., tuple]
    infer: Callable[..., list]
    flops: Callable[..., int] = field(default=lambda shapes, outs, **a: 0)
    # Inputs that are never differentiable (ids, masks, positions): indices into the inputs.
    nondiff: tuple[int, ...] = ()
    # Number of optional trailing inputs; the rest are required.
    n_optional: int = 0
    # Ops whose result depends on training vs inference (dropout) get ``training=`` and ``step=``.
    mode_dependent: bool = False
    # Whether the VJP reads the forward outputs (if not, the executor need not keep them).
    vjp_uses_outputs: bool = True
    # Whether outputs may share memory with inputs (split's views; attention's present keys are
    # the new keys themselves without a cache). Conformance rejects aliasing anywhere else.
    may_alias: bool = False
    doc: str = ""
    n_inputs: int = 0  # positional inputs of ``forward``, filled in by :func:`register`


OPS: dict[str, OpSpec] = {}


def register(name: str, forward: Callable, vjp: Callable, infer: Callable, **kw: Any) -> OpSpec:
    if name in OPS:
        raise ValueError(f"op {name!r} registered twice")
    params = inspect.signature(forward).parameters.values()
    n_inputs = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)
    spec = OpSpec(name, forward, vjp, infer, doc=(forward.__doc__ or "").strip(), n_inputs=n_inputs, **kw)
    OPS[name] = spec
    return spec


def get(name: str) -> OpSpec:
    try:
        return OPS[name]
    except KeyError:
        raise MinitxError(f"unknown op {name!r} (known: {', '.join(sorted(OPS))})") from None


# ---------------------------------------------------------------- helpers shared by op modules

def same_as(i: int = 0) -> Callable[..., list]:
    """Shape rule for ops whose single output has the shape and dtype of input ``i``."""

    def infer(shapes, dtypes, **attrs):
        return [(tuple(shapes[i]), dtypes[i])]

    return infer


def elementwise_flops(per_element: int) -> Callable[..., int]:
    def flops(shapes, outs, **attrs):
        return per_element * int(np.prod(outs[0]))

    return flops


def wide(x: np.ndarray) -> np.ndarray:
    """``x`` in at least float32: what the spec computes reductions and transcendentals of 16-bit
    floats in (their results are rounded back), as every real kernel does — float16 holds
    neither a sum of squares of 768 activations nor x³ of a large one."""
    return x.astype(np.float32) if x.dtype.kind == "f" and x.dtype.itemsize < 4 else x


def _map(f: Callable[[Any], Any], x: Any) -> Any:
    return tuple(_map(f, y) for y in x) if isinstance(x, tuple) else f(x)


def _narrow(x: Any) -> bool:
    return isinstance(x, np.ndarray) and x.dtype.kind == "f" and x.dtype.itemsize < 4


def wide_forward(forward: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``forward`` on 16-bit float inputs widened to float32 and round its float outputs back
    to the inputs' dtype: matmuls and softmaxes in float16 lose the digits float32 accumulation
    (what every float16 kernel does) keeps."""
    @functools.wraps(forward)
    def run(*args: Any, **attrs: Any) -> Any:
        floats = [a.dtype for a in args if isinstance(a, np.ndarray) and a.dtype.kind == "f"]
        if not any(d.itemsize < 4 for d in floats):
            return forward(*args, **attrs)
        dt = np.result_type(*floats)
        out = forward(*(wide(a) if _narrow(a) else a for a in args), **attrs)
        return _map(lambda y: y.astype(dt, copy=False) if isinstance(y, np.ndarray) and y.dtype.kind == "f" else y, out)
    return run


def wide_vjp(vjp: Callable[..., tuple]) -> Callable[..., tuple]:
    """The VJP counterpart of :func:`wide_forward`; every gradient comes back in its input's dtype."""
    @functools.wraps(vjp)
    def run(grads: tuple, inputs: tuple, outputs: tuple, **attrs: Any) -> tuple:
        w = lambda x: _map(lambda y: wide(y) if _narrow(y) else y, x)  # noqa: E731
        res = vjp(w(grads), w(inputs), w(outputs), **attrs)
        return tuple(None if g is None else g.astype(x.dtype, copy=False)
                     if isinstance(x, np.ndarray) and x.dtype.kind == "f" else g for g, x in zip(res, inputs))
    return run


def require(cond: bool, op: str, msg: str) -> None:
    if not cond:
        raise ShapeError(f"op {op}: {msg}")


def unbroadcast(g: np.ndarray, shape: Shape) -> np.ndarray:
    """Sum a cotangent over the axes that broadcasting added or stretched."""
    while g.ndim > len(shape):
        g = g.sum(axis=0)
    for axis, n in enumerate(shape):
        if n == 1 and g.shape[axis] != 1:
            g = g.sum(axis=axis, keepdims=True)
    return g


from .cases import CASES, Case, add_cases  # noqa: E402,F401 — op modules declare their cases with it

# Importing the op modules registers their ops and their conformance cases.
from . import activations, attention, linalg, losses, norms, positions, pooling, sparse, lowrank, quant  # noqa: E402,F401
from . import fakequant  # noqa: E402,F401
from . import collectives  # noqa: E402,F401
from . import cross_attention, relpos, gated  # noqa: E402,F401  (encoder–decoder ops)
from . import linear_attention, linformer  # noqa: E402,F401
