"""The numba backend against the spec, one pytest item per (op, case, dtype, forward/VJP).

This is also the template for a third party: two lines give a full per-case suite.
"""
from __future__ import annotations

import pytest

from minitx.conformance import CASES, assert_conforms, pytest_params, run_conformance

pytest.importorskip("numba")


@pytest.mark.parametrize("item", pytest_params("numba"))
def test_numba_conforms(item) -> None:
    assert_conforms("numba", item)


def test_spec_conforms_to_itself_and_every_case_builds() -> None:
    report = run_conformance("numpy", dtypes=["float64"])
    assert report.ok, report.table()
    covered = {r.op for r in report.rows if r.status == "PASS"}
    assert set(CASES) <= covered | {op for op in CASES if op not in __import__("minitx").ops.OPS}


def test_numba_parallel_kernels_conform(monkeypatch) -> None:
    """Every kernel's multithreaded version, forced on for every size (the policy picks serial for
    most test-sized inputs, so the cases above mostly exercise the serial one)."""
    numba = pytest.importorskip("numba")
    if numba.get_num_threads() < 2:
        pytest.skip("one numba thread: the parallel versions never run")
    from minitx.backends.numba_cpu import _jit, quant

    monkeypatch.setattr(_jit, "PARALLEL_MIN", 0)
    monkeypatch.setattr(quant, "STREAMING_MIN", 0)
    report = run_conformance("numba")
    assert report.ok, report.table()
