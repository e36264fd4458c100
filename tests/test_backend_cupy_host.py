"""The CuPy backend's host-side logic, on any machine (no CuPy, no GPU needed).

T5's relative-position kernel (backends/cupy_gpu/relpos.py) never computes a bucket on the
device: it clamps the key − query distance to [−R, R] and reads a table the spec filled
(``_buckets``). That is only right if every distance beyond R shares R's bucket — checked here
against the spec's own ``buckets`` far past ``max_distance``, for T5's settings and the
conformance cases' odd ones.
"""
from __future__ import annotations

import numpy as np
import pytest

from minitx.backends.cupy_gpu import _buckets
from minitx.ops.relpos import buckets

CONFIGS = [(True, 32, 128), (False, 32, 128), (True, 8, 12), (False, 8, 12), (True, 32, 16), (False, 32, 17),
           (True, 4, 3), (False, 2, 2), (True, 64, 1000)]


@pytest.mark.parametrize("bidirectional,num_buckets,max_distance", CONFIGS)
def test_clamped_table_equals_spec_buckets_at_every_distance(bidirectional: bool, num_buckets: int,
                                                             max_distance: int) -> None:
    found = _buckets.lut(bidirectional, num_buckets, max_distance)
    assert found is not None
    table, R = found
    rel = np.arange(-20 * max_distance - 50, 20 * max_distance + 50)
    want = buckets(rel, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance)
    np.testing.assert_array_equal(_buckets.lookup(table, R, rel), want)
    assert want.min() >= 0 and want.max() < num_buckets


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 9), (8, 3)])
def test_no_table_where_far_distances_do_not_share_a_bucket(num_buckets: int, max_distance: int) -> None:
    """A causal max_distance inside the exact range (the spec's shape rule allows it): the log part
    then shrinks with distance, clamping would be wrong, and the backend runs the spec instead."""
    assert _buckets.lut(False, num_buckets, max_distance) is None
    rel = -np.arange(0, 40 * num_buckets)
    b = buckets(rel, bidirectional=False, num_buckets=num_buckets, max_distance=max_distance)
    assert (b[max_distance:] != b[max_distance]).any()


def _kernel_ops() -> set[str]:
    """Op names in the ``KERNELS`` dicts of the modules the backend loads, read from their source
    (importing them needs CuPy and a GPU)."""
    import ast
    import os

    from minitx.backends import cupy_gpu

    here = os.path.dirname(os.path.abspath(cupy_gpu.__file__))
    found: set[str] = set()
    for mod in cupy_gpu.MODULES:
        with open(os.path.join(here, f"{mod}.py"), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "KERNELS" for t in node.targets):
                found |= {k.value for k in node.value.keys}
    return found


@pytest.mark.parametrize("arch,overrides", [("t5", {}), ("t5", {"activation": "geglu"}), ("bart", {}),
                                            ("marian", {}), ("transformer", {})])
def test_every_encoder_decoder_op_has_a_gpu_kernel(arch: str, overrides: dict) -> None:
    """Every node of the encoder–decoder families runs on the GPU (strict mode needs it; any node
    left to the spec would copy its inputs off the device and back, every decoder step)."""
    from minitx import models
    from minitx.model import Model

    m = Model.from_config({**models.preset(arch, "tiny"), **overrides}, seed=0)
    missing = {n.op for n in m.graph.nodes} - _kernel_ops()
    assert not missing, missing
