"""Backend conformance: run every op a backend implements against the spec, and report.

The cases live beside each op's spec (:mod:`minitx.ops.cases`, declared with ``add_cases``);
this module only runs them. For each op the backend has a native kernel for, each case builds
inputs in each dtype the backend computes in; the backend's result is compared with the spec's
result on the same inputs computed in float64. An element passes when

    |backend − spec| ≤ atol·max(1, rms(spec)) + rtol·|spec|        (atol, rtol from TOLERANCE[dtype])

The same is done for the backend's VJPs, with random cotangents. Every call is also held to the
contract: outputs of the spec's shapes and dtypes (gradients in their input's dtype, or the
compute dtype where that is wider), no NaN or Inf where the spec has none, inputs left
unmodified, and no output sharing memory with an input unless the op declares it may
(``OpSpec.may_alias``). Ops without a case are SKIPPED, never
silently passed, and a run that checks nothing is not ``ok``. Ops a backend delegates to the spec
(``Backend.delegate``) are not its kernels and are not checked. A third party checks its backend
in one line of pytest::

    from minitx.conformance import run_conformance
    def test_conformance(): assert run_conformance("mybackend").ok

or per case, with :func:`pytest_params` / :func:`assert_conforms`.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from . import ops
from .backend import Backend, get_backend
from .errors import MinitxError
from .ops.cases import CASES, Case, cases_of, np_dtype  # noqa: F401 — CASES/Case: re-exported for callers

# (atol, rtol) per compute dtype: rtol is a few hundred ulps, so a fused kernel that merely
# reorders a sum passes and a wrong formula fails.
TOLERANCE: dict[str, tuple[float, float]] = {
    "float64": (1e-10, 1e-9),
    "float32": (2e-5, 2e-4),
    "float16": (2e-3, 2e-2),
    "bfloat16": (1.6e-2, 8e-2),
}

Item = tuple[str, "Case | None", str, str]   # (op, case, dtype, kind)


@dataclass
class Row:
    op: str
    case: str
    dtype: str
    kind: str                 # "forward" or "vjp"
    status: str               # PASS, FAIL or SKIPPED
    family: str = ""
    max_abs_error: float = float("nan")
    tolerance: float = float("nan")   # the tolerance at the worst element
    used: float = float("nan")        # max over elements of error / tolerance (> 1 fails)
    detail: str = ""                  # why, for every FAIL and SKIPPED row


@dataclass
class Report:
    """What a run checked: ``rows`` (one per op, case, dtype, kind), ``ok``, ``failures``,
    ``counts()``, ``checked``, ``table()`` and ``to_json()``."""

    backend: str
    rows: list[Row] = field(default_factory=list)

    @property
    def checked(self) -> int:
        """Rows that ran (PASS or FAIL); 0 means the run proved nothing."""
        return sum(r.status != "SKIPPED" for r in self.rows)

    @property
    def ok(self) -> bool:
        """True when something was checked and nothing failed."""
        return self.checked > 0 and not self.failures

    @property
    def failures(self) -> list[Row]:
        return [r for r in self.rows if r.status == "FAIL"]

    def counts(self) -> dict[str, int]:
        out = {"PASS": 0, "FAIL": 0, "SKIPPED": 0}
        for r in self.rows:
            out[r.status] += 1
        return out

    def summary(self) -> str:
        c = self.counts()
        return f"{self.backend}: {c['PASS']} passed, {c['FAIL']} failed, {c['SKIPPED']} skipped"

    def __repr__(self) -> str:
        """What a failing ``assert report.ok`` shows: the count and every failure with its reason."""
        if not self.checked:
            return f"<conformance {self.summary()}: nothing was checked>"
        lines = [f"{r.op} [{r.case}, {r.family}, {r.dtype}, {r.kind}]: {r.detail}" for r in self.failures]
        return "<conformance " + self.summary() + "".join("\n  " + x for x in lines) + ">"

    def to_json(self) -> str:
        def clean(v: Any) -> Any:
            return None if isinstance(v, float) and not np.isfinite(v) else v
        return json.dumps({"backend": self.backend, "ok": self.ok, "checked": self.checked, "counts": self.counts(),
                           "rows": [{k: clean(v) for k, v in asdict(r).items()} for r in self.rows]})

    def table(self) -> str:
        head = (f"{'op':<16} {'case':<34} {'family':<7} {'dtype':<8} {'kind':<7} {'max abs err':>11} "
                f"{'tolerance':>10} {'used':>7}  status")
        lines = [head, "-" * len(head)]
        for r in self.rows:
            num = (f"{r.max_abs_error:>11.3g} {r.tolerance:>10.3g} {r.used:>6.1%}" if np.isfinite(r.used)
                   else f"{'':>11} {'':>10} {'':>7}")
            lines.append(f"{r.op:<16} {r.case[:34]:<34} {r.family:<7} {r.dtype:<8} {r.kind:<7} {num}  {r.status}"
                         + (f"  ({r.detail})" if r.detail else ""))
        lines.append(self.summary())
        return "\n".join(lines)


# ------------------------------------------------------------------------------- one check
def _tuple(y: Any) -> tuple:
    return y if isinstance(y, tuple) else (y,)


def _is_float(x: Any) -> bool:
    return isinstance(x, np.ndarray) and (x.dtype.kind == "f" or "bfloat16" in str(x.dtype))


def _up(x: Any) -> Any:
    return x.astype(np.float64) if _is_float(x) else x


def _index(i: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(j) for j in np.unravel_index(i, shape))


class _Broken(Exception):
    """A contract violation: the message is the row's reason."""


def _compare(got: Sequence[Any], ref: Sequence[Any], dtype: str, scale: float) -> tuple[float, float, float, str]:
    """(max abs error, tolerance there, share used, reason) over all outputs. An output stored in
    a narrower float than the case's dtype (the gradient of float16 weights) gets that one's tolerance."""
    worst = (0.0, 0.0, 0.0, "")
    for k, (g, r) in enumerate(zip(got, ref)):
        if r is None:
            continue
        own = str(np.asarray(g).dtype)
        atol, rtol = max(TOLERANCE[dtype], TOLERANCE.get(own, (0.0, 0.0)))
        g = np.asarray(g).astype(np.float64)
        r = np.asarray(r, dtype=np.float64)
        if r.size == 0:
            continue
        bad = ~np.isfinite(g) & np.isfinite(r)
        if bad.any():
            what = "NaN" if np.isnan(g[bad]).any() else "Inf"
            raise _Broken(f"{what} in output {k} at {int(bad.sum())} of {g.size} elements where the spec is finite "
                          f"(first at index {_index(int(np.argmax(bad)), g.shape)})")
        fin = np.isfinite(r)
        rms = float(np.sqrt(np.mean(np.where(fin, r, 0.0) ** 2)))
        tol = (atol * max(1.0, rms) + rtol * np.abs(np.where(fin, r, 0.0))) * scale
        err = np.where(fin, np.abs(g - np.where(fin, r, 0.0)), np.where(g == r, 0.0, np.inf))
        share = err / tol
        i = int(np.argmax(share))
        if share.flat[i] > worst[2] or worst[1] == 0.0:
            where = f"output {k} at index {_index(i, g.shape)}: got {g.flat[i]:.6g}, spec {r.flat[i]:.6g}"
            worst = (float(err.flat[i]), float(tol.flat[i]), float(share.flat[i]), where)
    return worst


def _contract(got: Sequence[Any], raw: Sequence[Any], want: Sequence[tuple[Any, Any]], inputs: Sequence[Any],
              may_alias: bool) -> None:
    """Shapes and dtypes as ``want`` [(shape, dtype) or None], and no output sharing an input's memory."""
    if len(got) != len(want):
        raise _Broken(f"{len(got)} results, the spec has {len(want)}")
    for k, (g, w) in enumerate(zip(got, want)):
        if w is None:
            continue
        if g is None:
            raise _Broken(f"output {k}: got None, the spec returns an array")
        shape, dtype = w
        if tuple(g.shape) != tuple(shape):
            raise _Broken(f"output {k}: shape {tuple(g.shape)}, the spec's is {tuple(shape)}")
        if dtype is not None and g.dtype != dtype:
            raise _Broken(f"output {k}: dtype {g.dtype}, the spec's is {dtype}")
    if not may_alias:
        for k, y in enumerate(raw):
            for j, x in enumerate(inputs):
                if isinstance(y, np.ndarray) and isinstance(x, np.ndarray) and np.shares_memory(y, x):
                    raise _Broken(f"output {k} shares memory with input {j} (the op does not declare may_alias)")


def _unchanged(b: Backend, dev: Sequence[Any], before: Sequence[Any], what: str) -> None:
    for j, (d, x) in enumerate(zip(dev, before)):
        if x is None:
            continue
        now = b.to_numpy(d)
        if now.shape != x.shape or not np.array_equal(now, x, equal_nan=x.dtype.kind in "fc"):
            raise _Broken(f"{what} {j} was modified in place")


def _run_case(b: Backend, op: str, case: Case, dtype: str, kind: str, seed: int) -> Row:
    spec = ops.get(op)
    rng = np.random.default_rng(seed)
    row = Row(op, case.name, dtype, kind, "PASS", case.family)
    try:
        inputs, attrs = case.make(rng, dtype)
        ref_in = tuple(_up(x) for x in inputs)
        ref_attrs = {**attrs, "dtype": "float64"} if "dtype" in attrs else attrs
        with np.errstate(all="ignore"):
            ref = _tuple(spec.forward(*ref_in, **ref_attrs))
            outs = _tuple(spec.forward(*inputs, **attrs))      # the spec in the case's dtype
        host_in = [None if x is None else np.array(x, copy=True) for x in inputs]
        dev_in = [None if x is None else b.asarray(np.asarray(x)) for x in inputs]
        if kind == "forward":
            raw = _tuple(b.kernels[op](*dev_in, **attrs))
            want = [None if y is None else (np.shape(y), np.asarray(y).dtype) for y in outs]
            _unchanged(b, dev_in, host_in, "input")
        else:
            # Cotangents in the case's dtype, and the reference gets exactly those values.
            host_cots = [rng.standard_normal(np.shape(y)).astype(np_dtype(dtype)) for y in outs]
            with np.errstate(all="ignore"):
                ref = _tuple(spec.vjp(tuple(_up(c) for c in host_cots), ref_in, ref, **ref_attrs))
            dev_cots = tuple(b.asarray(c) for c in host_cots)
            dev_outs = tuple(b.asarray(np.asarray(y)) for y in outs)
            raw = _tuple(b.vjps[op](dev_cots, tuple(dev_in), dev_outs, **attrs))
            # Non-differentiable inputs: the spec says None; a backend may say None or zeros.
            ref = tuple(None if (k in spec.nondiff or r is None) else r for k, r in enumerate(ref))
            # A gradient comes in its input's dtype, or the compute dtype where that is wider (the
            # gradient of float16 weights in a float32 graph).
            want = [None if r is None else (np.shape(x), np.promote_types(x.dtype, np_dtype(dtype))
                                            if _is_float(x) and dtype != "bfloat16" else None)
                    for r, x in zip(ref, inputs)]
            raw = tuple(None if k >= len(ref) or ref[k] is None else g for k, g in enumerate(raw))
            _unchanged(b, dev_in, host_in, "input")
            _unchanged(b, dev_cots, host_cots, "cotangent")
        got = tuple(None if y is None else b.to_numpy(y) for y in raw)
        _contract(got, raw, want, dev_in, spec.may_alias)
        row.max_abs_error, row.tolerance, row.used, where = _compare(got, ref, dtype, case.tol_scale)
        if row.used > 1.0:
            row.status, row.detail = "FAIL", f"beyond tolerance: {where}"
    except _Broken as e:
        row.status, row.detail = "FAIL", str(e)
    except Exception as e:  # noqa: BLE001 — a crashing kernel is a failure to report, not to raise
        row.status, row.detail = "FAIL", f"raised {type(e).__name__}: {e}"[:300]
    return row


# --------------------------------------------------------------------------- what to run
def native(b: Backend, kind: str) -> list[str]:
    """The ops ``b`` has its own kernels (or VJPs) for: its tables minus what it delegates."""
    table = b.kernels if kind == "forward" else b.vjps
    return sorted(set(table) - set(getattr(b, "delegate", ())))


def _check_backend(b: Backend) -> None:
    for klass in type(b).__mro__:
        for attr in ("kernels", "vjps"):
            if klass is not Backend and attr in vars(klass):
                raise MinitxError(f"backend {b.name}: {attr!r} is a class attribute of {klass.__name__}; "
                                  f"Backend.__init__ replaces it with an empty table — assign self.{attr} "
                                  f"in __init__, after super().__init__()")


def _dtypes(b: Backend, dtypes: Iterable[str] | None) -> list[str]:
    order = [d for d in TOLERANCE if d in b.dtypes]
    if dtypes is None:
        return order
    asked = list(dict.fromkeys(dtypes))
    unknown = [d for d in asked if d not in TOLERANCE]
    if unknown:
        raise MinitxError(f"unknown dtype(s) {', '.join(unknown)} (known: {', '.join(TOLERANCE)})")
    undeclared = [d for d in asked if d not in b.dtypes]
    if undeclared:
        raise MinitxError(f"backend {b.name} does not compute in {', '.join(undeclared)} "
                          f"(its dtypes: {', '.join(sorted(b.dtypes))})")
    return [d for d in order if d in asked]


def _selected(b: Backend, kind: str, include: Iterable[str] | None, exclude: Iterable[str] | None) -> list[str]:
    include = set(include or ())
    exclude = set(exclude or ())
    unknown = (include | exclude) - set(ops.OPS)
    if unknown:
        raise MinitxError(f"unknown op(s) in --include/--exclude: {', '.join(sorted(unknown))}")
    return [o for o in native(b, kind) if (not include or o in include) and o not in exclude]


def cases_for(backend: str | Backend, include: Iterable[str] | None = None, exclude: Iterable[str] | None = None,
              dtypes: Iterable[str] | None = None) -> list[Item]:
    """(op, case, dtype, kind) for everything the backend implements; case None = no case (SKIPPED).

    Raises MinitxError for a request that would check nothing or not what was asked: an unknown
    or undeclared dtype, an ``include`` naming an op the backend has no kernel for, kernel tables
    declared as class attributes."""
    b = get_backend(backend)
    _check_backend(b)
    wanted = _dtypes(b, dtypes)
    if include:
        mine = set(native(b, "forward")) | set(native(b, "vjp"))
        missing = sorted(set(include) & set(ops.OPS) - mine)
        delegated = sorted(set(missing) & set(getattr(b, "delegate", ())))
        if delegated:
            raise MinitxError(f"--include {', '.join(delegated)}: backend {b.name} delegates "
                              f"{'it' if len(delegated) == 1 else 'them'} to the spec; "
                              f"there is no kernel of its own to check")
        if missing:
            raise MinitxError(f"--include {', '.join(missing)}: backend {b.name} has no kernel for "
                              f"{'it' if len(missing) == 1 else 'them'} "
                              f"(its kernels: {', '.join(sorted(mine)) or 'none'})")
    out: list[Item] = []
    for kind in ("forward", "vjp"):
        for op in _selected(b, kind, include, exclude):
            cases = cases_of(op, b.name)
            if not cases:
                out.append((op, None, "-", kind))
                continue
            out.extend((op, case, d, kind) for case in cases for d in wanted)
    return out


def check(backend: str | Backend, op: str, case: Case | None, dtype: str, kind: str, seed: int = 0) -> Row:
    """Run one (op, case, dtype, kind); the building block of :func:`run_conformance`."""
    if case is None:
        return Row(op, "(no cases)", dtype, kind, "SKIPPED", detail="no cases: declare some with minitx.ops.add_cases")
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


def _item_id(item: Item) -> str:
    op, case, dtype, kind = item
    return f"{op}-{kind}-{case.family + ':' + case.name if case else 'none'}-{dtype}"


def pytest_params(backend: str, **kw: Any) -> list[Any]:
    """``@pytest.mark.parametrize("item", pytest_params("mine"))`` then ``assert_conforms("mine", item)``.

    An unavailable backend gives one skipped item naming the reason (collection never fails)."""
    import pytest

    try:
        items = cases_for(backend, **kw)
    except MinitxError as e:
        if "unavailable" not in str(e):
            raise
        return [pytest.param(None, id=f"{backend}-unavailable", marks=pytest.mark.skip(reason=str(e)))]
    return [pytest.param(item, id=_item_id(item)) for item in items]


def assert_conforms(backend: str | Backend, item: Item) -> None:
    """Fail (with the reason) unless one item from :func:`pytest_params` passes; SKIPPED → skip."""
    import pytest

    row = check(backend, *item)
    if row.status == "SKIPPED":
        pytest.skip(f"{row.op}: {row.detail}")
    if row.status != "PASS":
        pytest.fail(f"{row.op} [{row.case}, {row.family}, {row.dtype}, {row.kind}]: {row.detail}", pytrace=False)
