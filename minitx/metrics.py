"""Numeric comparison of an output against a reference: the one place tolerances are decided.

Used by golden-file verification and by rewrite/plugin validation reports. A comparison passes when
every element satisfies ``|out - ref| <= atol + rtol * |ref|`` (numpy.isclose's rule); "budget
used" is the worst element's error as a fraction of its own allowance, so 1.0 is exactly at the
limit and 0.1 leaves a 10x margin.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

# (atol, rtol) by the dtype the computation ran in. float32 allows for accumulation-order
# differences between implementations (BLAS blocking, fused kernels); float64 is near exact.
_TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-10, 1e-8),
    "float32": (1e-5, 1e-4),
    "float16": (1e-3, 1e-2),
    "bfloat16": (1e-2, 5e-2),
}


def default_tolerance(dtype: Any) -> tuple[float, float]:
    """(atol, rtol) for outputs computed in ``dtype``; integer outputs must match exactly."""
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name in _TOLERANCES:
        return _TOLERANCES[name]
    if np.issubdtype(np.dtype(name), np.integer) or np.dtype(name) == np.bool_:
        return (0.0, 0.0)
    raise ValueError(f"no default tolerance for dtype {name}")


@dataclass(frozen=True)
class Comparison:
    """How far ``out`` is from ``ref``. Fields that do not apply are None."""

    shape: tuple[int, ...]
    atol: float
    rtol: float
    max_abs: float          # max |out - ref|
    max_rel: float          # max |out - ref| / max(|ref|) — relative to the reference's scale
    cosine: float | None    # cosine similarity of the flattened arrays (float outputs only)
    top1: float | None      # share of rows whose argmax over the last axis agrees (logits)
    sqnr_db: float | None   # signal-to-quantization-noise ratio, 10 log10(|ref|² / |out-ref|²)
    kl: float | None        # mean KL(softmax(ref) || softmax(out)) over rows (logits)
    budget_used: float      # max over elements of |out-ref| / (atol + rtol |ref|)
    passed: bool

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


def _softmax_log(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def compare(ref: np.ndarray, out: np.ndarray, atol: float | None = None, rtol: float | None = None,
            logits: bool = False) -> Comparison:
    """Compare ``out`` with ``ref`` (same shape). ``logits=True`` adds top-1 agreement and KL over
    the last axis. Tolerances default to :func:`default_tolerance` of the reference's dtype."""
    ref = np.asarray(ref)
    out = np.asarray(out)
    if ref.shape != out.shape:
        raise ValueError(f"shape mismatch: reference {ref.shape}, output {out.shape}")
    d_atol, d_rtol = default_tolerance(ref.dtype) if (atol is None or rtol is None) else (0.0, 0.0)
    atol = d_atol if atol is None else float(atol)
    rtol = d_rtol if rtol is None else float(rtol)
    is_float = np.issubdtype(ref.dtype, np.floating) or np.issubdtype(out.dtype, np.floating)
    r = ref.astype(np.float64)
    o = out.astype(np.float64)
    if ref.size == 0:
        return Comparison(ref.shape, atol, rtol, 0.0, 0.0, None, None, None, None, 0.0, True)
    finite_same = np.array_equal(np.isfinite(r), np.isfinite(o)) and np.array_equal(r[~np.isfinite(r)],
                                                                                  o[~np.isfinite(o)])
    fin = np.isfinite(r) & np.isfinite(o)
    err = np.where(fin, np.abs(o - r), np.where(r == o, 0.0, np.inf))
    max_abs = float(err.max())
    scale = float(np.abs(r[fin]).max()) if fin.any() else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    allow = atol + rtol * np.abs(np.where(fin, r, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(err == 0, 0.0, err / allow)
    budget = float(ratio.max())
    cosine = sqnr = kl = top1 = None
    if is_float:
        rf, of = r[fin].ravel(), o[fin].ravel()
        nr, no = np.linalg.norm(rf), np.linalg.norm(of)
        cosine = float(rf @ of / (nr * no)) if nr > 0 and no > 0 else (1.0 if nr == no else 0.0)
        noise = float(((of - rf) ** 2).sum())
        sqnr = float("inf") if noise == 0 else float(10 * np.log10((rf ** 2).sum() / noise)) if nr > 0 else float("-inf")
    if logits and ref.ndim >= 1 and ref.shape[-1] > 1:
        rr = r.reshape(-1, ref.shape[-1])
        oo = o.reshape(-1, ref.shape[-1])
        top1 = float((rr.argmax(-1) == oo.argmax(-1)).mean())
        if np.isfinite(rr).all() and np.isfinite(oo).all():
            lp, lq = _softmax_log(rr), _softmax_log(oo)
            kl = float(np.maximum((np.exp(lp) * (lp - lq)).sum(-1), 0.0).mean())
    passed = bool(finite_same and budget <= 1.0)
    return Comparison(tuple(ref.shape), atol, rtol, max_abs, max_rel, cosine, top1, sqnr, kl, budget, passed)
