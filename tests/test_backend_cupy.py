"""The CuPy backend on a real GPU: conformance and decoding. Skipped cleanly without one."""
from __future__ import annotations

import numpy as np
import pytest

from minitx.backend import describe

cp = pytest.importorskip("cupy")
try:
    _n = cp.cuda.runtime.getDeviceCount()
except Exception:  # noqa: BLE001
    _n = 0
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_n == 0, reason="no CUDA device")]


def test_listed_available() -> None:
    info = describe("cupy")
    assert info["available"], info
    assert "linear" in info["forward"] and info["device"].startswith("cuda")


def test_conformance_float32() -> None:
    from minitx.conformance import run_conformance

    report = run_conformance("cupy", dtypes=["float32"])
    assert report.ok, report.table()


def test_decode_matches_spec() -> None:
    from minitx import generate as gen, models
    from minitx.model import Model

    m = Model.from_config(models.preset("llama", "tiny"), seed=0)
    ids, mask = gen.left_pad([[1, 2, 3, 4], [5, 6]])
    a, _ = gen.step(m, ids, gen.empty_state(m, 2), mask, ("numpy",))
    b, _ = gen.step(m, ids, gen.empty_state(m, 2), mask, ("cupy",), strict=True)
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-4)
