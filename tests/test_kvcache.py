"""minitx.kvcache: the growable KV cache both the numba and the CuPy backends use.

Run on NumPy always and on CuPy when a GPU is present: the same logic, so the GPU backend's cache
behaviour is exercised in CI even though its kernels are not.
"""
from __future__ import annotations

import numpy as np
import pytest

from minitx.kvcache import MIN_SPARE, Caches


def _modules():
    yield pytest.param((np, np.asarray, lambda a: a.__array_interface__["data"][0]), id="numpy")
    try:
        import cupy as cp

        ok = cp.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 — not installed, or no driver/GPU
        ok = False
    marks = () if ok else pytest.mark.skip(reason="no cupy with a CUDA device")
    cp_triple = (cp, cp.asnumpy, lambda a: int(a.data.ptr)) if ok else None
    yield pytest.param(cp_triple, id="cupy", marks=marks)


@pytest.mark.parametrize("lib", list(_modules()))
@pytest.mark.parametrize("batch", [1, 3])
def test_append_equals_concatenation_grows_in_place_and_never_clobbers_a_branch(lib, batch: int) -> None:
    xp, host, address = lib
    caches = Caches(xp, address)
    rng = np.random.default_rng(0)
    ref = np.zeros((batch, 0, 8), np.float32)
    K, views, in_place = None, [], 0
    for t in [5] + [1] * (MIN_SPARE + 10):   # crosses the first buffer's capacity
        new = rng.standard_normal((batch, t, 8)).astype(np.float32)
        before = None if K is None else address(caches.storage(K))
        K = caches.append(K, xp.asarray(new))
        in_place += before is not None and address(caches.storage(K)) == before
        ref = np.concatenate([ref, new], axis=1)
        np.testing.assert_array_equal(host(K), ref)
        buf = caches.storage(K)
        assert buf.flags.c_contiguous and buf.shape[1] >= K.shape[1]
        np.testing.assert_array_equal(host(buf[:, :K.shape[1]]), ref)
        views.append((K, ref))
    assert in_place >= MIN_SPARE  # all but the appends that had to move to a bigger buffer
    old, old_ref = views[20]
    branch = caches.append(old, xp.ones((batch, 1, 8), xp.float32))   # a second continuation of an old view
    np.testing.assert_array_equal(host(branch), np.concatenate([old_ref, np.ones((batch, 1, 8))], 1))
    for v, r in views:   # every earlier view still reads what it read
        np.testing.assert_array_equal(host(v), r)


@pytest.mark.parametrize("lib", list(_modules()))
def test_foreign_arrays_are_copied_and_dtypes_promote_like_concatenation(lib) -> None:
    xp, host, address = lib
    caches = Caches(xp, address)
    past = xp.asarray(np.arange(2 * 5 * 4, dtype=np.float32).reshape(2, 5, 4))
    keep = host(past).copy()
    out = caches.append(past[:, :3], xp.ones((2, 1, 4), xp.float32))   # not ours: never written into
    np.testing.assert_array_equal(host(past), keep)
    np.testing.assert_array_equal(host(out), np.concatenate([keep[:, :3], np.ones((2, 1, 4))], axis=1))
    wide = caches.append(out, xp.ones((2, 1, 4), xp.float64))
    assert wide.dtype == np.float64 and wide.shape == (2, 5, 4)
