"""The conformance suite against a zoo of wrong kernels (tests/mutants): it must reject every one.

A mutant that passes is a blind spot of the suite, whatever the mutant's error: add the input
family or contract check that catches it. The kill rate is reported in docs/backends.md.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from minitx.conformance import run_conformance
from mutants import ZOO

# The mutants overflow and divide by zero on purpose; the suite judges their results.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def test_the_zoo_is_big_enough_and_its_kill_rate_documented() -> None:
    assert len(ZOO) >= 25 and len({m.name for m in ZOO}) == len(ZOO)
    docs = (Path(__file__).parents[1] / "docs" / "backends.md").read_text(encoding="utf-8")
    assert f"kill rate {len(ZOO)}/{len(ZOO)} (100%)" in docs


@pytest.mark.parametrize("mutant", ZOO, ids=[m.name for m in ZOO])
def test_conformance_kills(mutant) -> None:
    report = run_conformance(mutant, include=[mutant.op])
    assert report.checked, f"{mutant.name}: nothing was checked"
    assert not report.ok, f"{mutant.name} ({mutant.why}) survived: {report.summary()}"
    assert all(r.detail for r in report.failures), "every FAIL row says why"
