"""Mixed-precision training: compute in float16 or bfloat16, keep float32 master weights.

Each optimizer step casts the float32 master weights to the compute precision, runs the forward
and backward passes there, and hands the gradients back in float32 to an AdamW whose moments are
float32 too. Two things make that work:

* **Loss scaling.** float16 flushes magnitudes below 6·10⁻⁸ to zero, where many gradients live.
  The backward pass therefore starts from ``scale`` instead of 1 (``Executor.forward_backward``'s
  ``loss_grad``), every gradient comes out ``scale`` times too large, and :class:`LossScaler`
  divides it back out in float32. A scale that is too large overflows: then some gradient is
  inf/NaN, the step is skipped (weights and optimizer state untouched) and the scale is lowered
  (× ``backoff``). After ``growth_interval`` consecutive good steps it is doubled again, so it
  hovers just below the overflow threshold (Micikevicius et al., "Mixed Precision Training", 2018).
  The scale never exceeds the largest power of two the compute dtype holds (2¹⁵ in float16): the
  starting cotangent itself must be finite.
* **Where the compute dtype comes from.** The executor computes in the dtype its graph declares
  for the parameters, and casts feeds to the graph's input dtypes. For float16 :class:`Precision`
  hands it a copy of the training graph declaring float16 parameters and float inputs, and
  float16 copies of the weights; the spec ops keep float16 end to end (norms, softmax and the loss
  reduce in whatever NumPy accumulates in, and return float16).

bfloat16 is *emulated*: values are float32 arrays rounded to bfloat16's 8 significant bits (round
to nearest even) — the weights when they are cast, and every output of every forward kernel and
VJP (:class:`Bfloat16Emulation` wraps each backend). Why not a real dtype: NumPy has none; the
``ml_dtypes`` package adds one, but NumPy then runs matmuls on it without BLAS (orders of
magnitude slower) and several spec ops would need bfloat16-specific care; and the CuPy backend's
hand-written kernels exist for float and __half only, while CuPy's own bfloat16 (via ml_dtypes)
is new and experimental. Emulation is what bfloat16 hardware computes anyway — bfloat16 operands,
float32 accumulation inside a kernel, rounding when a result is stored — so the numerics match,
it runs on every backend that computes in float32 (numpy, numba, cupy: the rounding is a few
integer operations on the array's own module), and it needs no new dependency. What it does not
give is bfloat16's speed or halved activation memory: those need a backend that declares and
implements a real bfloat16 dtype (on CuPy: kernels instantiated for __nv_bfloat16, CuPy ≥ 14
with ml_dtypes for the host side of transfers); none does yet. Gradient contributions that the
executor sums across several uses of one value, and the loss scale's unscaling, are float32.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .backend import Backend, get_backend, spec_backend
from .errors import MinitxError
from .ir import Graph

PRECISIONS = ("float32", "float16", "bfloat16")


def check_precision(name: str) -> str:
    if name not in PRECISIONS:
        raise MinitxError(f"--precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    return name


# ------------------------------------------------------------------------------- bfloat16
_LOW = np.uint32(0x7FFF)
_ONE = np.uint32(1)
_HIGH = np.uint32(0xFFFF0000)


def round_to_bfloat16(a: Any) -> Any:
    """float32 array → float32 array holding the nearest bfloat16 values (ties to even).

    Works on any array type with NumPy's ``view``/operator API (NumPy, CuPy). Other dtypes pass
    through unchanged. Overflow rounds to ±inf; a NaN stays non-finite (it may become inf)."""
    if getattr(a, "dtype", None) != np.float32:
        return a
    u = a.view(np.uint32)
    u = (u + ((u >> 16) & _ONE) + _LOW) & _HIGH  # the array stays on the left: CuPy arrays too
    return u.view(np.float32)


def _round_all(out: Any) -> Any:
    if isinstance(out, tuple):
        return tuple(round_to_bfloat16(o) for o in out)
    return round_to_bfloat16(out)


class Bfloat16Emulation(Backend):
    """Another backend, with every forward and VJP output rounded to bfloat16 precision.

    Ops the wrapped backend runs forward but has no VJP for get the spec's VJP, run on the host
    and rounded there, so that no gradient escapes the rounding through the executor's fallback.
    """

    def __init__(self, inner: Backend) -> None:
        super().__init__()
        self.inner = inner
        self.name = f"{inner.name}+bf16"
        self.device, self.version = inner.device, inner.version
        self.dtypes = frozenset({"float32"}) & inner.dtypes
        spec = spec_backend()
        self.kernels = {op: _rounding(f) for op, f in inner.kernels.items()}
        self.vjps = {op: _rounding(inner.vjps[op]) if op in inner.vjps else self._on_host(spec.vjps[op])
                     for op in inner.kernels}

    def asarray(self, a: np.ndarray) -> Any:
        return self.inner.asarray(a)

    def to_numpy(self, a: Any) -> np.ndarray:
        return self.inner.to_numpy(a)

    def owns(self, a: Any) -> bool:
        return self.inner.owns(a)

    def synchronize(self) -> None:
        self.inner.synchronize()

    def _on_host(self, vjp: Callable[..., tuple]) -> Callable[..., tuple]:
        def host(a: Any) -> Any:
            return None if a is None else self.inner.to_numpy(a)

        def run(grads, inputs, outputs, **attrs):
            gins = vjp(tuple(host(g) for g in grads), tuple(host(i) for i in inputs),
                       None if outputs is None else tuple(host(o) for o in outputs), **attrs)
            return tuple(None if g is None else self.inner.asarray(round_to_bfloat16(np.asarray(g))) for g in gins)

        return run


def _rounding(f: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **attrs: Any) -> Any:
        return _round_all(f(*args, **attrs))

    return run


# ------------------------------------------------------------------------------ precision
class Precision:
    """How one compute precision turns the float32 training setup into what the executor runs."""

    def __init__(self, name: str) -> None:
        self.name = check_precision(name)
        # The array dtype the executor sees: bfloat16 values live in float32 arrays.
        self.dtype = np.dtype(np.float16 if name == "float16" else np.float32)

    @property
    def mixed(self) -> bool:
        return self.name != "float32"

    def graph(self, g: Graph) -> Graph:
        """The graph with float parameters and inputs declared in the compute dtype."""
        if self.name != "float16":
            return g
        out = g.copy()
        for v in [*out.params.values(), *out.inputs]:
            if np.issubdtype(np.dtype(v.dtype), np.floating):
                v.dtype = "float16"
        return out

    def params(self, master: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Compute-precision copies of the float32 master weights."""
        if self.name == "float16":
            return {k: a.astype(np.float16) for k, a in master.items()}
        if self.name == "bfloat16":
            return {k: round_to_bfloat16(np.asarray(a, np.float32)) for k, a in master.items()}
        return dict(master)

    def backends(self, names: Sequence[str | Backend]) -> list[Backend]:
        """The backends to run on; for bfloat16 each one wrapped in the rounding, with the spec
        (wrapped too) last, so that no node can fall back to unrounded arithmetic."""
        bs = [get_backend(b) for b in names] or [spec_backend()]
        if self.name != "bfloat16":
            return bs
        spec = spec_backend()
        return [Bfloat16Emulation(b) for b in bs] + ([] if spec in bs else [Bfloat16Emulation(spec)])

    def max_scale(self) -> float:
        """The largest power of two the compute dtype holds: a larger scale overflows at once."""
        top = 65504.0 if self.name == "float16" else float(np.finfo(np.float32).max)
        return 2.0 ** math.floor(math.log2(top))


# ---------------------------------------------------------------------------- loss scaler
@dataclass
class LossScaler:
    """Dynamic loss scaling: skip and lower on overflow, grow after a run of good steps."""

    scale: float = 2.0 ** 15
    growth_interval: int = 200
    backoff: float = 0.5
    max_scale: float = 2.0 ** 15
    good_steps: int = 0      # consecutive finite steps since the last change of scale
    skipped: int = 0         # steps skipped so far, in total

    def __post_init__(self) -> None:
        self.scale = min(float(self.scale), self.max_scale)

    def unscale(self, grads: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Gradients divided by the scale, in float32 (the master weights' dtype)."""
        inv = np.float32(1.0 / self.scale)
        return {k: np.asarray(g).astype(np.float32) * inv for k, g in grads.items()}

    @staticmethod
    def finite(grads: Mapping[str, np.ndarray]) -> bool:
        return all(bool(np.isfinite(g).all()) for g in grads.values())

    def update(self, overflow: bool) -> None:
        """After a step: on overflow lower the scale (the caller skipped the update), otherwise
        count the good step and double the scale after ``growth_interval`` of them in a row."""
        if overflow:
            self.skipped += 1
            self.good_steps = 0
            self.scale = max(self.scale * self.backoff, float(np.finfo(np.float32).tiny))
            return
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.good_steps = 0
            self.scale = min(self.scale * 2.0, self.max_scale)

    def state(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, d: Mapping[str, Any]) -> "LossScaler":
        return cls(**{k: d[k] for k in ("scale", "growth_interval", "backoff", "max_scale", "good_steps", "skipped")})
