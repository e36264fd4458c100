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
"""
from __future__ import annotations

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


# Importing the op modules registers their ops.
from . import activations, attention, linalg, losses, norms, positions, pooling, sparse, lowrank, quant  # noqa: E402,F401
from . import fakequant  # noqa: E402,F401
from . import concat, cross_attention, relpos, gated  # noqa: E402,F401  (encoder–decoder ops)
