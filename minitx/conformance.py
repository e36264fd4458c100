"""Backend conformance: run every op a backend implements against the spec, and report.

For each op the backend has a kernel for, each case in :data:`CASES` builds inputs (several
shapes, in each dtype the backend computes in); the backend's result is compared with the spec's
result on the same inputs computed in float64. An element passes when

    |backend − spec| ≤ atol·max(1, rms(spec)) + rtol·|spec|        (atol, rtol from TOLERANCE[dtype])

The same is done for the backend's VJPs, with random cotangents. Ops the backend implements but
no case covers are reported SKIPPED, never silently passed. A third party checks its backend in
one line of pytest::

    from minitx.conformance import run_conformance
    def test_conformance(): assert run_conformance("mybackend").ok

or per case, with :func:`pytest_params` / :func:`check`.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from . import ops
from .backend import Backend, get_backend
from .errors import MinitxError

# (atol, rtol) per compute dtype: rtol is a few hundred ulps, so a fused kernel that merely
# reorders a sum passes and a wrong formula fails.
TOLERANCE: dict[str, tuple[float, float]] = {
    "float64": (1e-10, 1e-9),
    "float32": (2e-5, 2e-4),
    "float16": (2e-3, 2e-2),
    "bfloat16": (1.6e-2, 8e-2),
}

Inputs = tuple[tuple[Any, ...], dict[str, Any]]


@dataclass(frozen=True)
class Case:
    """One input configuration for one op: ``make(rng, dtype) -> (inputs, attrs)``."""

    name: str
    make: Callable[[np.random.Generator, str], Inputs]
    tol_scale: float = 1.0  # for ops whose reference itself is ill-conditioned (long reductions)


CASES: dict[str, list[Case]] = {}


def add_case(op: str, name: str, make: Callable[[np.random.Generator, str], Inputs], tol_scale: float = 1.0) -> None:
    """Register a case for ``op`` (plugins adding ops add their cases this way)."""
    CASES.setdefault(op, []).append(Case(name, make, tol_scale))


def _f(rng: np.random.Generator, shape: Sequence[int], dtype: str, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(_np_dtype(dtype))


def _np_dtype(dtype: str) -> Any:
    if dtype == "bfloat16":
        try:
            import ml_dtypes  # type: ignore[import-not-found]

            return ml_dtypes.bfloat16
        except ImportError:
            raise MinitxError("bfloat16 conformance needs the ml_dtypes package") from None
    return np.dtype(dtype)


# ----------------------------------------------------------------------------- the case table
def _unary(op: str, shapes: Iterable[tuple[int, ...]], **attrs: Any) -> None:
    for s in shapes:
        tag = "x".join(map(str, s)) + "".join(f",{k}={v}" for k, v in attrs.items())
        add_case(op, tag, lambda r, d, s=s: ((_f(r, s, d, 2.0),), dict(attrs)))


_SMALL, _BIG = (3, 5, 16), (64, 768)  # _BIG exceeds the size where kernels go multithreaded
for _op in ("relu", "silu"):
    _unary(_op, [_SMALL, _BIG, (1, 1, 7)])
for _ap in ("none", "tanh"):
    _unary("gelu", [_SMALL, _BIG], approximate=_ap)
_unary("swiglu", [(2, 3, 32), (48, 1536)])
_unary("softmax", [_SMALL, _BIG, (2, 3, 1)])
_unary("softmax", [(4, 6, 5)], axis=1)
_unary("l2_normalize", [_SMALL, (64, 384)])
for _s in (_SMALL, _BIG, (1, 1, 768)):
    add_case("layer_norm", "x".join(map(str, _s)),
             lambda r, d, s=_s: ((_f(r, s, d, 3.0) + 1, _f(r, s[-1:], d), _f(r, s[-1:], d)), {"eps": 1e-5}))
    add_case("rms_norm", "x".join(map(str, _s)),
             lambda r, d, s=_s: ((_f(r, s, d, 3.0), _f(r, s[-1:], d)), {"eps": 1e-6}))
add_case("add", "same shape", lambda r, d: ((_f(r, (4, 5, 8), d), _f(r, (4, 5, 8), d)), {}))
add_case("add", "same shape, large", lambda r, d: ((_f(r, _BIG, d), _f(r, _BIG, d)), {}))
add_case("add", "bias over last axis", lambda r, d: ((_f(r, (4, 5, 8), d), _f(r, (8,), d)), {}))
add_case("add", "general broadcast", lambda r, d: ((_f(r, (4, 1, 8), d), _f(r, (5, 1), d)), {}))
for _m in (1, 3, 8, 33):
    add_case("linear", f"{_m} rows, bias", lambda r, d, m=_m: ((_f(r, (1, m, 96), d), _f(r, (96, 300), d, 0.1),
                                                               _f(r, (300,), d)), {}))
add_case("linear", "8 rows, no bias", lambda r, d: ((_f(r, (8, 1, 64), d), _f(r, (64, 1100), d, 0.1), None), {}))
add_case("matmul", "2-D", lambda r, d: ((_f(r, (7, 12), d), _f(r, (12, 9), d)), {}))
add_case("matmul", "batched", lambda r, d: ((_f(r, (2, 3, 7, 12), d), _f(r, (3, 12, 9), d)), {}))
for _m in (1, 3, 8, 20):
    add_case("matmul", f"{_m} rows, transpose_b (LM head)",
             lambda r, d, m=_m: ((_f(r, (m, 1, 64), d), _f(r, (1000, 64), d, 0.1)), {"transpose_b": True}))
add_case("embedding", "gather", lambda r, d: ((r.integers(0, 50, (3, 7)), _f(r, (50, 16), d)), {}))
add_case("split", "q|k|v", lambda r, d: ((_f(r, (2, 3, 24), d),), {"sizes": [8, 8, 8]}))
add_case("split", "uneven", lambda r, d: ((_f(r, (2, 3, 20), d),), {"sizes": [12, 4, 4]}))
add_case("mean_pool", "padded", lambda r, d: ((_f(r, (3, 6, 16), d), (np.arange(6) < np.array([[6], [3], [1]])).astype(np.int64)), {}))


def _attn(B: int, T: int, S: int, H: int, KV: int, D: int, causal: bool, pad: bool, cache: bool,
          dead_row: bool = False) -> Callable[[np.random.Generator, str], Inputs]:
    def make(r: np.random.Generator, d: str) -> Inputs:
        q, k, v = _f(r, (B, T, H * D), d), _f(r, (B, T, KV * D), d), _f(r, (B, T, KV * D), d)
        pk = _f(r, (B, S, KV * D), d) if cache else None
        pv = _f(r, (B, S, KV * D), d) if cache else None
        mask = None
        if pad:
            mask = np.ones((B, S + T), np.int64)
            for b in range(B):
                mask[b, : b % (S + T)] = 0  # left padding of different lengths per row
            if dead_row:
                mask[0] = 0  # a row that sees nothing: the spec averages uniformly
        return (q, k, v, pk, pv, mask), {"n_heads": H, "n_kv_heads": KV, "causal": causal}
    return make


add_case("attention", "MHA causal prefill", _attn(2, 9, 0, 4, 4, 8, True, False, False))
add_case("attention", "GQA decode, cache + padding", _attn(3, 1, 11, 6, 2, 16, True, True, True))
add_case("attention", "GQA prefill after cache, padding", _attn(2, 5, 4, 4, 2, 8, True, True, True))
add_case("attention", "bidirectional, padding", _attn(3, 7, 0, 2, 2, 8, False, True, False))
add_case("attention", "fully masked row", _attn(2, 3, 0, 2, 1, 4, False, True, False, dead_row=True))
# From 8 queries on, backends may switch to a prefill kernel: the same situations again, longer.
add_case("attention", "prefill, left padding", _attn(3, 10, 0, 4, 4, 8, True, True, False))
add_case("attention", "GQA prefill after cache, padding, 12 q", _attn(2, 12, 5, 4, 2, 8, True, True, True))
add_case("attention", "bidirectional, padding, 10 q", _attn(3, 10, 0, 2, 2, 8, False, True, False))
add_case("attention", "fully masked row, 9 q", _attn(2, 9, 0, 2, 1, 4, False, True, False, dead_row=True))


# Ops the plugins introduce: packed weights are built with the plugins' own packers, so the
# backend's kernel is checked on exactly the format a rewritten model stores.
def _packed(op: str, rows: int, n_in: int, n_out: int, pack: Callable, attrs: dict, bias: bool = True):
    def make(r: np.random.Generator, d: str) -> Inputs:
        from minitx.ops import quant as Q

        w = _f(r, (n_in, n_out), "float32", 0.1)
        # Scales in the case's dtype: float32 scales would cap a float64 case at float32 precision.
        packed = [a.astype(d) if a.dtype.kind == "f" else a for a in pack(Q, w)]
        b = _f(r, (n_out,), d) if bias else None
        return (_f(r, (rows, 1, n_in), d), *packed, b), dict(attrs)
    return make


for _m in (1, 3, 8):
    add_case("linear_q8", f"{_m} rows", _packed("linear_q8", _m, 96, 160, lambda Q, w: Q.quantize_per_channel(w), {}))
    add_case("linear_q8_block", f"{_m} rows, block 32",
             _packed("linear_q8_block", _m, 96, 160, lambda Q, w: Q.quantize_blocks(w, 32), {"block": 32}))
    add_case("linear_q4", f"{_m} rows, group 32",
             _packed("linear_q4", _m, 96, 160, lambda Q, w: Q.quantize_int4(w, 32), {"group": 32}))
    add_case("linear_w8a8", f"{_m} rows",
             _packed("linear_w8a8", _m, 96, 160, lambda Q, w: Q.quantize_per_channel(w), {}))


# The decode layouts the quant plugin stores: int8 / int4 weights (out, in) (``transposed``), the
# packed embedding tables, float16 / bfloat16 weights, and attention over an int8 KV cache.
def _packed_t(rows: int, n_in: int, n_out: int, bits: int):
    def make(r: np.random.Generator, d: str) -> Inputs:
        from minitx.ops import quant as Q

        w = _f(r, (n_out, n_in), "float32", 0.1)
        q, s = Q.quantize_per_channel(w, axis=1) if bits == 8 else Q.quantize_int4_rows(w, 32)
        attrs = {"transposed": True} if bits == 8 else {"group": 32, "transposed": True}
        return (_f(r, (rows, 1, n_in), d), q, s.astype(d), _f(r, (n_out,), d) if rows % 2 else None), attrs
    return make


def _table(bits: int):
    def make(r: np.random.Generator, d: str) -> Inputs:
        from minitx.ops import quant as Q

        E = _f(r, (300, 64), "float32")
        q, s = Q.quantize_per_channel(E, axis=1) if bits == 8 else Q.quantize_int4_rows(E, 16)
        return (r.integers(0, 300, (3, 7)), q, s.astype(d)), ({} if bits == 8 else {"group": 16})
    return make


def _cast(rows: int, bf16: bool, transposed: bool = False):
    def make(r: np.random.Generator, d: str) -> Inputs:
        from minitx.ops import quant as Q

        w = _f(r, (96, 160), "float32", 0.1)
        w[0, :4] = [1e-6, -3e-7, 0.0, -0.0]  # float16 subnormals and signed zeros
        w = np.ascontiguousarray(w.T) if transposed else w
        return ((_f(r, (rows, 1, 96), d), Q.to_bfloat16_bits(w) if bf16 else w.astype(np.float16),
                 _f(r, (160,), d)), {"transposed": transposed})
    return make


def _attn_kv8(B: int, T: int, S: int, H: int, KV: int, D: int, causal: bool, pad: bool, dead_row: bool = False):
    base = _attn(B, T, S, H, KV, D, causal, pad, S > 0, dead_row)

    def make(r: np.random.Generator, d: str) -> Inputs:
        from minitx.ops import quant as Q

        (q, k, v, pk, pv, mask), attrs = base(r, d)
        if pk is None:
            return (q, k, v, None, None, None, None, mask), attrs
        pkq, pks = Q.quantize_heads(pk, KV)
        pvq, pvs = Q.quantize_heads(pv, KV)
        return (q, k, v, pkq, pks, pvq, pvs, mask), attrs
    return make


for _m in (1, 3, 8, 20):
    add_case("linear_q8", f"{_m} rows, transposed (out, in)", _packed_t(_m, 96, 160, 8))
    add_case("linear_q4", f"{_m} rows, group 32, transposed (out, in/2)", _packed_t(_m, 96, 160, 4))
    add_case("linear_cast", f"{_m} rows, float16", _cast(_m, False))
    add_case("linear_cast", f"{_m} rows, bfloat16", _cast(_m, True))
    add_case("linear_cast", f"{_m} rows, float16 (out, in)", _cast(_m, False, True))
    add_case("linear_cast", f"{_m} rows, bfloat16 (out, in)", _cast(_m, True, True))
add_case("linear_q4", "LM-head shape, 1 row, transposed", _packed_t(1, 64, 1100, 4))
add_case("embedding_q8", "gather, repeated ids", _table(8))
add_case("embedding_q4", "gather, group 16", _table(4))
add_case("attention_kv8", "MHA causal prefill", _attn_kv8(2, 9, 0, 4, 4, 8, True, False))
add_case("attention_kv8", "GQA decode, int8 cache + padding", _attn_kv8(3, 1, 11, 6, 2, 16, True, True))
add_case("attention_kv8", "GQA prefill after cache, padding", _attn_kv8(2, 5, 4, 4, 2, 8, True, True))
add_case("attention_kv8", "fully masked row", _attn_kv8(2, 3, 0, 2, 1, 4, False, True, dead_row=True))


def _sparse_linear(rows: int, n_in: int, n_out: int, density: float):
    def make(r: np.random.Generator, d: str) -> Inputs:
        from minitx.plugins.sparsity import to_csr

        w = _f(r, (n_in, n_out), d, 0.1)
        data, idx, ptr = to_csr(w, r.random(w.shape) < density)
        return (_f(r, (rows, 2, n_in), d), data, idx, ptr, _f(r, (n_out,), d)), {"shape": [n_out, n_in]}
    return make


def _nm_linear(rows: int, n_in: int, n_out: int):
    def make(r: np.random.Generator, d: str) -> Inputs:
        from minitx.plugins.sparsity import nm_masks, to_nm

        w = _f(r, (n_in, n_out), d, 0.1)
        keep = nm_masks({"w": np.abs(w)}, 2, 4)["w"]
        values, idx = to_nm(w, keep, 2, 4)
        return (_f(r, (rows, 1, n_in), d), values, idx, None), {"n": 2, "m": 4, "in_features": n_in}
    return make


add_case("sparse_linear", "30% dense", _sparse_linear(3, 64, 96, 0.3))
add_case("sparse_linear", "80% dense", _sparse_linear(1, 64, 96, 0.8))
add_case("nm_linear", "2:4, 1 row", _nm_linear(1, 64, 96))
add_case("nm_linear", "2:4, 5 rows", _nm_linear(5, 64, 96))


def _sparse_attn(T: int, S: int, pattern: str, causal: bool = True, **pat) -> Callable:
    base = _attn(2, T, S, 4, 2, 8, causal, True, S > 0)

    def make(r: np.random.Generator, d: str) -> Inputs:
        inputs, attrs = base(r, d)
        return inputs, {**attrs, "pattern": pattern, **pat}
    return make


add_case("sparse_attention", "local window 4", _sparse_attn(16, 0, "local", window=4))
add_case("sparse_attention", "local, decode over cache", _sparse_attn(1, 20, "local", window=6))
add_case("sparse_attention", "block 4", _sparse_attn(16, 0, "block", block=4))
add_case("sparse_attention", "strided 4, bidirectional", _sparse_attn(12, 0, "strided", causal=False, stride=4, window=2))
add_case("sparse_attention", "top-3", _sparse_attn(10, 0, "topk", topk=3))
add_case("attention", "large (parallel)", _attn(2, 64, 0, 8, 4, 64, True, False, False))
add_case("rope", "decode", lambda r, d: ((_f(r, (2, 1, 4 * 8), d), r.integers(0, 100, (2, 1))), {"n_heads": 4}))
add_case("rope", "prefill", lambda r, d: ((_f(r, (2, 50, 12 * 64), d), np.tile(np.arange(50), (2, 1))),
                                          {"n_heads": 12, "theta": 10000.0}))
add_case("cross_entropy", "with ignored", lambda r, d: ((_f(r, (2, 5, 11), d), np.array([[1, 2, -100, 4, 0], [3, 3, 3, -100, 10]])), {}))
add_case("dropout", "inference", lambda r, d: ((_f(r, (4, 8), d),), {"p": 0.1, "seed": 3, "training": False, "step": 0}))
add_case("dropout", "training", lambda r, d: ((_f(r, (4, 8), d),), {"p": 0.1, "seed": 3, "training": True, "step": 2}))
add_case("sinusoidal_positions", "table", lambda r, d: ((r.integers(0, 64, (2, 5)),), {"dim": 16, "max_len": 64, "dtype": d}))


# ------------------------------------------------------------------------------------ running
@dataclass
class Row:
    op: str
    case: str
    dtype: str
    kind: str                 # "forward" or "vjp"
    status: str               # PASS, FAIL or SKIPPED
    max_abs_error: float = float("nan")
    tolerance: float = float("nan")   # the tolerance at the worst element
    used: float = float("nan")        # max over elements of error / tolerance (> 1 fails)
    detail: str = ""


@dataclass
class Report:
    backend: str
    rows: list[Row] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(r.status == "FAIL" for r in self.rows)

    @property
    def failures(self) -> list[Row]:
        return [r for r in self.rows if r.status == "FAIL"]

    def counts(self) -> dict[str, int]:
        out = {"PASS": 0, "FAIL": 0, "SKIPPED": 0}
        for r in self.rows:
            out[r.status] += 1
        return out

    def to_json(self) -> str:
        def clean(v: Any) -> Any:
            return None if isinstance(v, float) and not np.isfinite(v) else v
        return json.dumps({"backend": self.backend, "ok": self.ok, "counts": self.counts(),
                           "rows": [{k: clean(v) for k, v in asdict(r).items()} for r in self.rows]})

    def table(self) -> str:
        head = f"{'op':<16} {'case':<34} {'dtype':<8} {'kind':<7} {'max abs err':>11} {'tolerance':>10} {'used':>7}  status"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            num = (f"{r.max_abs_error:>11.3g} {r.tolerance:>10.3g} {r.used:>6.1%}" if np.isfinite(r.used)
                   else f"{'':>11} {'':>10} {'':>7}")
            lines.append(f"{r.op:<16} {r.case[:34]:<34} {r.dtype:<8} {r.kind:<7} {num}  {r.status}"
                         + (f"  ({r.detail})" if r.detail else ""))
        c = self.counts()
        lines.append(f"{self.backend}: {c['PASS']} passed, {c['FAIL']} failed, {c['SKIPPED']} skipped")
        return "\n".join(lines)


def _tuple(y: Any) -> tuple:
    return y if isinstance(y, tuple) else (y,)


def _up(x: Any) -> Any:
    if isinstance(x, np.ndarray) and x.dtype.kind == "f" or (isinstance(x, np.ndarray) and "bfloat16" in str(x.dtype)):
        return x.astype(np.float64)
    return x


def _compare(got: Sequence[Any], ref: Sequence[Any], dtype: str, scale: float) -> tuple[float, float, float, str]:
    atol, rtol = TOLERANCE[dtype]
    worst = (0.0, 0.0, 0.0)
    for k, (g, r) in enumerate(zip(got, ref)):
        if r is None:
            if g is not None:
                return np.nan, np.nan, np.inf, f"output {k}: expected None, got an array"
            continue
        if g is None:
            return np.nan, np.nan, np.inf, f"output {k}: got None"
        g = np.asarray(g).astype(np.float64)
        r = np.asarray(r, dtype=np.float64)
        if g.shape != r.shape:
            return np.nan, np.nan, np.inf, f"output {k}: shape {g.shape}, spec {r.shape}"
        if r.size == 0:
            continue
        rms = float(np.sqrt(np.mean(r * r)))
        tol = (atol * max(1.0, rms) + rtol * np.abs(r)) * scale
        err = np.abs(g - r)
        err = np.where(np.isnan(g) & np.isnan(r), 0.0, np.where(np.isnan(err), np.inf, err))
        share = err / tol
        i = int(np.argmax(share))
        if share.flat[i] > worst[2] or worst[1] == 0.0:
            worst = (float(err.flat[i]), float(tol.flat[i]), float(share.flat[i]))
    return worst[0], worst[1], worst[2], ""


def _run_case(b: Backend, op: str, case: Case, dtype: str, kind: str, seed: int) -> Row:
    spec = ops.get(op)
    rng = np.random.default_rng(seed)
    row = Row(op, case.name, dtype, kind, "PASS")
    try:
        inputs, attrs = case.make(rng, dtype)
        ref_in = tuple(_up(x) for x in inputs)
        ref_attrs = {**attrs, "dtype": "float64"} if "dtype" in attrs else attrs
        dev_in = [None if x is None else b.asarray(np.asarray(x)) for x in inputs]
        if kind == "forward":
            ref = _tuple(spec.forward(*ref_in, **ref_attrs))
            got = tuple(None if y is None else b.to_numpy(y) for y in _tuple(b.kernels[op](*dev_in, **attrs)))
        else:
            outs = _tuple(spec.forward(*inputs, **attrs))
            cots = tuple(rng.standard_normal(np.shape(y)) for y in outs)
            ref_outs = _tuple(spec.forward(*ref_in, **ref_attrs))
            ref = _tuple(spec.vjp(cots, ref_in, ref_outs, **ref_attrs))
            dev_cots = tuple(b.asarray(c.astype(_np_dtype(dtype))) for c in cots)
            dev_outs = tuple(b.asarray(np.asarray(y)) for y in outs)
            res = b.vjps[op](dev_cots, tuple(dev_in), dev_outs, **attrs)
            got = tuple(None if y is None else b.to_numpy(y) for y in _tuple(res))
            # Non-differentiable inputs: the spec says None; a backend may say None or zeros.
            ref = tuple(None if (k in spec.nondiff or r is None) else r for k, r in enumerate(ref))
            got = tuple(None if ref[k] is None else g for k, g in enumerate(got))
        if len(got) != len(ref):
            raise AssertionError(f"{len(got)} results, the spec has {len(ref)}")
        err, tol, used, detail = _compare(got, ref, dtype, case.tol_scale)
        row.max_abs_error, row.tolerance, row.used, row.detail = err, tol, used, detail
        if used > 1.0 or detail:
            row.status = "FAIL"
    except Exception as e:  # noqa: BLE001 — a crashing kernel is a failure to report, not to raise
        row.status, row.detail = "FAIL", f"{type(e).__name__}: {e}"[:200]
    return row


def _selected(ops_: Iterable[str], include: Iterable[str] | None, exclude: Iterable[str] | None) -> list[str]:
    include = set(include or ())
    exclude = set(exclude or ())
    unknown = (include | exclude) - set(ops.OPS)
    if unknown:
        raise MinitxError(f"unknown op(s) in --include/--exclude: {', '.join(sorted(unknown))}")
    return [o for o in sorted(ops_) if (not include or o in include) and o not in exclude]


def cases_for(backend: str | Backend, include: Iterable[str] | None = None, exclude: Iterable[str] | None = None,
              dtypes: Iterable[str] | None = None) -> list[tuple[str, Case | None, str, str]]:
    """(op, case, dtype, kind) for everything the backend implements; case None = no case (SKIPPED)."""
    b = get_backend(backend)
    wanted = [d for d in ("float32", "float64", "float16", "bfloat16")
              if d in b.dtypes and (dtypes is None or d in set(dtypes)) and d in TOLERANCE]
    out: list[tuple[str, Case | None, str, str]] = []
    for kind, table in (("forward", b.kernels), ("vjp", b.vjps)):
        for op in _selected(table, include, exclude):
            cases = CASES.get(op, [])
            if not cases:
                out.append((op, None, "-", kind))
                continue
            for case in cases:
                for d in wanted:
                    out.append((op, case, d, kind))
    return out


def check(backend: str | Backend, op: str, case: Case | None, dtype: str, kind: str, seed: int = 0) -> Row:
    """Run one (op, case, dtype, kind); the building block of :func:`run_conformance`."""
    if case is None:
        return Row(op, "(no cases)", dtype, kind, "SKIPPED", detail="add cases with minitx.conformance.add_case")
    return _run_case(get_backend(backend), op, case, dtype, kind, seed)


def run_conformance(backend: str | Backend, include: Iterable[str] | None = None,
                    exclude: Iterable[str] | None = None, dtypes: Iterable[str] | None = None,
                    seed: int = 0) -> Report:
    """Check every op (forward and VJP) the backend implements against the spec."""
    b = get_backend(backend)
    report = Report(b.name)
    for op, case, d, kind in cases_for(b, include, exclude, dtypes):
        report.rows.append(check(b, op, case, d, kind, seed))
    return report


def pytest_params(backend: str, **kw: Any) -> list[Any]:
    """``@pytest.mark.parametrize("item", pytest_params("mine"))`` then ``assert_conforms("mine", item)``."""
    import pytest

    return [pytest.param(item, id=f"{item[0]}-{item[3]}-{item[1].name if item[1] else 'none'}-{item[2]}")
            for item in cases_for(backend, **kw)]


def assert_conforms(backend: str | Backend, item: tuple[str, Case | None, str, str]) -> None:
    """Assert one item from :func:`pytest_params` passes (SKIPPED items call pytest.skip)."""
    row = check(backend, *item)
    if row.status == "SKIPPED":
        import pytest

        pytest.skip(f"{row.op}: no conformance cases")
    assert row.status == "PASS", (f"{row.op} [{row.case}, {row.dtype}, {row.kind}]: error {row.max_abs_error:.3g} "
                                  f"vs tolerance {row.tolerance:.3g} ({row.used:.1%} used) {row.detail}")
