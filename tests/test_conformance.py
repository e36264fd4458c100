"""The conformance runner itself, and the shipped backends against the spec.

One pytest item per (op, case, dtype, forward/VJP) for numba: the template a third party copies.
Only the items that need numba skip without it.
"""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from minitx import ops
from minitx.backend import Backend
from minitx.conformance import assert_conforms, cases_for, pytest_params, run_conformance
from minitx.errors import MinitxError
from minitx.ops.cases import CASES, FAMILIES, Case, add_cases


def _has_numba() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


needs_numba = pytest.mark.skipif(not _has_numba(), reason="numba not installed")


@needs_numba
@pytest.mark.parametrize("item", pytest_params("numba"))
def test_numba_conforms(item) -> None:
    assert_conforms("numba", item)


@needs_numba
def test_numba_parallel_kernels_conform(monkeypatch) -> None:
    """Every kernel's multithreaded version, forced on for every size (the policy picks serial for
    most test-sized inputs, so the cases above mostly exercise the serial one)."""
    import numba

    if numba.get_num_threads() < 2:
        pytest.skip("one numba thread: the parallel versions never run")
    from minitx.backends.numba_cpu import _jit, quant

    monkeypatch.setattr(_jit, "PARALLEL_MIN", 0)
    monkeypatch.setattr(quant, "STREAMING_MIN", 0)
    report = run_conformance("numba")
    assert report.ok, report.table()


@needs_numba
def test_numba_delegates_the_spec_functions_it_does_not_implement() -> None:
    from minitx.backend import get_backend

    b = get_backend("numba")
    assert {"add", "embedding", "split"} <= b.delegate
    def unwrapped(f):   # the thread budget wraps BLAS-backed kernels (minitx.threads.size_blas)
        return getattr(f, "__wrapped__", f)

    for op in b.delegate:
        assert unwrapped(b.kernels[op]) is ops.get(op).forward  # placed on numba, run by the spec
    items = cases_for("numba")
    assert not {op for op, *_ in items} & b.delegate            # neither counted nor tested as its own
    spec_functions = {id(s.forward) for s in ops.OPS.values()} | {id(s.vjp) for s in ops.OPS.values()}
    undeclared = {op for table in (b.kernels, b.vjps) for op, f in table.items()
                  if id(unwrapped(f)) in spec_functions and op not in b.delegate}
    assert not undeclared, f"spec functions registered as numba kernels: {undeclared} (declare them in delegate)"
    with pytest.raises(MinitxError, match="numba delegates it to the spec"):
        run_conformance("numba", include=["add"])


def test_the_spec_in_float16_and_float32_against_the_spec_in_float64() -> None:
    """The numpy backend in its low-precision dtypes: real arithmetic against the float64 reference
    (its float64 run would compare the spec with itself, so it is not run here)."""
    report = run_conformance("numpy", dtypes=["float16", "float32"])
    assert report.ok, report


def test_every_op_declares_cases_in_several_families() -> None:
    assert set(ops.OPS) <= set(CASES), f"ops without cases: {sorted(set(ops.OPS) - set(CASES))}"
    families = {c.family for cs in CASES.values() for c in cs}
    assert families == set(FAMILIES)
    for op in ("softmax", "layer_norm", "rms_norm", "gelu", "linear", "attention"):
        fam = {c.family for c in CASES[op]}
        assert {"typical", "large", "sizes"} <= fam, (op, fam)


# ------------------------------------------------------------------ contract checks
class _One(Backend):
    name = "one-kernel"
    dtypes = frozenset({"float32"})

    def __init__(self, op: str, f, vjp=None) -> None:
        super().__init__()
        self.kernels = {op: f}
        if vjp is not None:
            self.vjps = {op: vjp}


def _reasons(b: Backend, op: str) -> str:
    report = run_conformance(b, include=[op])
    assert not report.ok
    assert all(r.detail for r in report.failures)
    return " | ".join(r.detail for r in report.failures)


def test_nan_is_named_with_the_input_family() -> None:
    def softmax(x, *, axis=-1):
        with np.errstate(over="ignore", invalid="ignore"):
            e = np.exp(x)
            return e / e.sum(axis=axis, keepdims=True)
    report = run_conformance(_One("softmax", softmax), include=["softmax"])
    nan = [r for r in report.failures if "NaN" in r.detail]
    assert nan and {r.family for r in nan} == {"large"}
    assert "NaN" in report.table() and '"family": "large"' in report.to_json()


def test_dtype_shape_in_place_and_aliasing_are_contract_failures() -> None:
    assert "dtype float64" in _reasons(_One("relu", lambda x: np.maximum(x, 0).astype(np.float64)), "relu")
    assert "shape" in _reasons(_One("relu", lambda x: np.maximum(x, 0)[..., :1]), "relu")
    assert "modified in place" in _reasons(_One("relu", lambda x: np.maximum(x, 0, out=x)), "relu")
    assert "shares memory" in _reasons(_One("relu", lambda x: x if (x >= 0).all() else np.maximum(x, 0)), "relu")
    assert "raised ZeroDivisionError" in _reasons(_One("relu", lambda x: 1 // 0), "relu")


def test_declared_aliasing_is_allowed() -> None:
    assert ops.get("split").may_alias
    assert run_conformance(_One("split", ops.get("split").forward), include=["split"]).ok


# ------------------------------------------------------------------ no vacuous pass
class _ClassTable(Backend):
    name = "class-table"
    dtypes = frozenset({"float32"})
    kernels = {"relu": lambda x: np.maximum(x, 0)}


def test_requests_that_would_check_nothing_are_errors() -> None:
    b = _One("relu", lambda x: np.maximum(x, 0))
    with pytest.raises(MinitxError, match="unknown dtype.*fp32"):
        run_conformance(b, dtypes=["fp32"])
    with pytest.raises(MinitxError, match="does not compute in float16"):
        run_conformance(b, dtypes=["float16"])
    with pytest.raises(MinitxError, match="--include gelu: backend one-kernel has no kernel"):
        run_conformance(b, include=["gelu"])
    with pytest.raises(MinitxError, match="class attribute"):
        run_conformance(_ClassTable())


def test_a_run_without_cases_is_not_ok(monkeypatch) -> None:
    monkeypatch.setitem(CASES, "relu", [])
    report = run_conformance(_One("relu", lambda x: np.maximum(x, 0)))
    assert report.checked == 0 and not report.ok and "nothing was checked" in repr(report)


@pytest.mark.parametrize("args", [["--include", "softmax", "--dtype", "fp32"],
                                  ["--include", "softmax", "--dtype", "bfloat16"],
                                  ["--include", "relu"]], ids=["unknown dtype", "undeclared dtype", "no cases"])
def test_cli_errors_exit_2_with_one_line(args, monkeypatch) -> None:
    import cli

    monkeypatch.setitem(CASES, "relu", [])
    r = CliRunner().invoke(cli.main, ["conformance", "--backend", "numpy", *args])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_pytest_helpers_skip_an_unavailable_backend_and_fail_with_the_reason(monkeypatch) -> None:
    from minitx import backend as reg

    monkeypatch.setitem(reg.entries(), "gone", reg.Entry("gone", "<test>", factory=lambda: 1 / 0))
    (param,) = pytest_params("gone")
    assert param.marks and param.marks[0].name == "skip" and "unavailable" in param.marks[0].kwargs["reason"]
    bad = _One("relu", lambda x: np.maximum(x, 0).astype(np.float64))
    item = next(i for i in cases_for(bad) if i[1] is not None)
    with pytest.raises(pytest.fail.Exception, match="dtype float64"):
        assert_conforms(bad, item)


# ------------------------------------------------------------------ extra cases, scoped
def test_extra_cases_are_scoped_to_their_backend(monkeypatch) -> None:
    monkeypatch.setitem(CASES, "relu", list(CASES["relu"]))
    add_cases("relu", [Case("mine only", lambda r, d: ((np.ones((2, 3), d),), {}), backend="one-kernel")])
    b = _One("relu", lambda x: np.maximum(x, 0))
    assert "mine only" in {c.name for _, c, _, _ in cases_for(b)}
    assert "mine only" not in {c.name for _, c, _, _ in cases_for("numpy", include=["relu"])}
    with pytest.raises(MinitxError, match="unknown op"):
        add_cases("no_such_op", [])
    with pytest.raises(MinitxError, match="unknown input family"):
        Case("x", lambda r, d: ((), {}), family="weird")
