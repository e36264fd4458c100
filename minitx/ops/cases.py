"""Conformance cases: the inputs each op declares, beside its spec, for checking backends.

A :class:`Case` builds one input configuration, ``make(rng, dtype) -> (inputs, attrs)``, in the
case's compute dtype; the conformance runner (:mod:`minitx.conformance`) feeds it to a backend
and to the spec in float64 and compares. Cases are grouped in *families* that name what they
probe, so a failure says which kind of input broke a kernel:

``typical``  randn at a few scales            ``large``   near the dtype's overflow (exp-based
``tiny``     subnormal magnitudes                         ops) or large mean offsets (norms)
``zeros``    exact and signed zeros           ``masked``  fully masked rows / ignored targets
``ties``     equal values (argmax, top-k)     ``views``   non-contiguous / transposed inputs
``sizes``    odd sizes across tile edges      ``batch``   batch 1 and a large batch

:func:`add_cases` is the one way to declare cases, for minitx's own ops (each op module calls
it right under its ``register``) and for third parties alike; ``backend=`` on a case scopes it
to one backend's runs.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..errors import MinitxError

Inputs = tuple[tuple[Any, ...], dict[str, Any]]
Make = Callable[[np.random.Generator, str], Inputs]

FAMILIES = ("typical", "large", "tiny", "zeros", "masked", "ties", "views", "sizes", "batch")
# Row counts that straddle the tile / vector widths kernels use (4, 8, 16, 32, 64).
EDGE_ROWS = (1, 7, 8, 9, 63, 64, 65)


@dataclass(frozen=True)
class Case:
    """One input configuration for one op: ``make(rng, dtype) -> (inputs, attrs)``."""

    name: str
    make: Make
    family: str = "typical"
    tol_scale: float = 1.0      # for ops whose reference itself is ill-conditioned (long reductions)
    backend: str | None = None  # only run for this backend (a third party's extra cases)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise MinitxError(f"case {self.name!r}: unknown input family {self.family!r} "
                              f"(known: {', '.join(FAMILIES)})")


CASES: dict[str, list[Case]] = {}


def add_cases(op: str, cases: Iterable[Case]) -> None:
    """Declare conformance cases for ``op`` (which must have a spec): the one way to add them."""
    from . import OPS

    if op not in OPS:
        raise MinitxError(f"cases for unknown op {op!r}: register its spec first")
    CASES.setdefault(op, []).extend(cases)


def cases_of(op: str, backend: str | None = None) -> list[Case]:
    """The cases a run for ``backend`` uses: the op's own plus those scoped to that backend."""
    return [c for c in CASES.get(op, []) if c.backend is None or c.backend == backend]


# ------------------------------------------------------------------------ building inputs
def np_dtype(dtype: str) -> Any:
    if dtype == "bfloat16":
        try:
            import ml_dtypes  # type: ignore[import-not-found]

            return ml_dtypes.bfloat16
        except ImportError:
            raise MinitxError("bfloat16 conformance needs the ml_dtypes package") from None
    return np.dtype(dtype)


def randn(rng: np.random.Generator, shape: Sequence[int], dtype: str, scale: float = 1.0,
          offset: float = 0.0) -> np.ndarray:
    return (rng.standard_normal(tuple(shape)) * scale + offset).astype(np_dtype(dtype))


def exp_range(dtype: str) -> float:
    """A logit magnitude where exp() overflows in ``dtype`` (1.5·ln(max)): 17 for float16, 133
    for float32, 1065 for float64. A kernel that exponentiates without subtracting the maximum
    returns inf/NaN there; one that does it right is exact."""
    return 1.5 * float(np.log(np.finfo(np_dtype(dtype) if dtype != "bfloat16" else np.float32).max))


def norm_offset(dtype: str) -> float:
    """A mean offset that makes one-pass variance (E[x²] − E[x]²) cancel catastrophically in
    ``dtype`` while two-pass statistics stay exact to the dtype's precision."""
    return {"float16": 60.0, "bfloat16": 30.0, "float32": 100.0}.get(dtype, 1e5)


def tiny(dtype: str) -> float:
    """A subnormal magnitude of ``dtype``."""
    f = np.finfo(np.float32 if dtype == "bfloat16" else np_dtype(dtype))
    return float(f.tiny) * 1e-2


def int8_grid(rng: np.random.Generator, shape: Sequence[int], dtype: str, heads: int = 1) -> np.ndarray:
    """Values n·2ᵉ⁻⁵, |n| ≤ 127, with one n = ±127 in each row (in each of ``heads`` slices of a
    row) and a random e ∈ [−2, 2] per slice: symmetric int8 quantization of them is exact in every
    dtype, float16 included, and the slices' scales differ. Ops that
    round inside (W8A8 activations, the int8 KV cache, fake quantization) get these, since a
    low-precision run and the float64 reference may otherwise round a boundary value apart."""
    x = rng.integers(-126, 127, tuple(shape)).astype(np.float64)
    xh = x.reshape(*shape[:-1], heads, shape[-1] // heads)
    xh[..., 0] = np.where(rng.random(xh.shape[:-1]) < 0.5, -127, 127)
    xh *= 2.0 ** rng.integers(-2, 3, xh.shape[:-1])[..., None]
    return (x / 32).astype(np_dtype(dtype))


def signed_zeros(shape: Sequence[int], dtype: str) -> np.ndarray:
    z = np.zeros(tuple(shape), np_dtype(dtype))
    z.reshape(-1)[::2] = -0.0
    return z


def as_view(a: Any) -> Any:
    """The same values as a non-contiguous view: column-major for matrices and up (a transposed
    buffer), every other element of a larger buffer for vectors. Other inputs pass unchanged."""
    if not isinstance(a, np.ndarray) or a.dtype.kind not in "fiu" or a.ndim == 0 or a.size < 2:
        return a
    if a.ndim == 1:
        buf = np.zeros(2 * a.shape[0], a.dtype)
        buf[::2] = a
        return buf[::2]
    return np.asfortranarray(a)


def viewed(case: Case) -> Case:
    """``case`` with every array input replaced by a non-contiguous view of the same values."""
    def make(rng: np.random.Generator, dtype: str) -> Inputs:
        inputs, attrs = case.make(rng, dtype)
        return tuple(as_view(x) for x in inputs), attrs
    return replace(case, name=f"{case.name}, strided views", make=make, family="views")
