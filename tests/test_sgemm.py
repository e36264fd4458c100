"""The AVX-512 float32 GEMM (backends/numba_cpu/sgemm.py) against the float64 spec, at tile, chunk
and panel edges, and the numba backend's linear and tied-head matmul taking it. Skips on a CPU
without AVX-512, where those ops keep to BLAS."""
import numpy as np
import pytest

pytest.importorskip("numba")

from minitx.backends.numba_cpu import linalg as L  # noqa: E402
from minitx.backends.numba_cpu import sgemm as G  # noqa: E402

rng = np.random.default_rng(2)
pytestmark = pytest.mark.skipif(not G.HAS_AVX512, reason="the CPU numba targets has no AVX-512")


def _check(y, ref):
    """float32 products of K terms against float64: a few ulps of the sum of |terms|."""
    assert y.dtype == np.float32 and y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=2e-5, atol=2e-6 * np.sqrt(ref.shape[-1]) * np.abs(ref).max())


@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "serial"])
@pytest.mark.parametrize("M,K,N", [(16, 64, 32), (17, 33, 40), (23, 96, 75), (300, 384, 96), (513, 17, 64), (16, 1, 33)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemm_matches_spec(parallel, M, K, N, bias):
    """Rows past the 8-row tiles (4-row and 1-row tiles), past the 256-row chunks, columns past the
    32-column panels (NumPy's tail), odd K, K = 1."""
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((K, N)).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32) if bias else None
    y = G.gemm(x, w, b, parallel=parallel)
    ref = x.astype(np.float64) @ w.astype(np.float64) + (0 if b is None else b.astype(np.float64))
    _check(y, ref)


@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "serial"])
@pytest.mark.parametrize("M,V", [(16, 32), (40, 2065), (257, 100)])
def test_transposed_gemm_matches_spec(parallel, M, V):
    """x Eᵀ with E (V, K) row-major: the panel is gathered from E's rows."""
    x = rng.standard_normal((M, 48)).astype(np.float32)
    e = rng.standard_normal((V, 48)).astype(np.float32)
    _check(G.gemm(x, e, transposed=True, parallel=parallel), x.astype(np.float64) @ e.astype(np.float64).T)


@pytest.mark.parametrize("V", [64, 2065])
def test_int8_rows_dequantized_into_the_panels(V):
    """The int8 tied head: x (scale · E)ᵀ with E int8 (V, K) and a scale per row, as the spec's
    linear_q8 (transposed) computes it."""
    from minitx.ops import quant as Q
    x = rng.standard_normal((33, 40)).astype(np.float32)
    e = rng.integers(-127, 128, (V, 40)).astype(np.int8)
    s = rng.uniform(0.01, 0.1, V).astype(np.float32)
    _check(G.gemm(x, e, transposed=True, scale=s), Q.linear_q8(x.astype(np.float64), e, s.astype(np.float64), transposed=True))


def test_exact_on_small_integers():
    """Integer operands whose products and sums stay below 2^24: every element exact, so a row,
    column or k slipped by one anywhere shows."""
    x = rng.integers(-8, 9, (37, 70)).astype(np.float32)
    w = rng.integers(-8, 9, (70, 97)).astype(np.float32)
    b = rng.integers(-8, 9, 97).astype(np.float32)
    assert np.array_equal(G.gemm(x, w, b), (x.astype(np.int64) @ w.astype(np.int64) + b.astype(np.int64)).astype(np.float32))


def test_usable_only_where_it_computes_the_same_product():
    x = np.ones((G.MIN_ROWS, 8), np.float32)
    w = np.ones((8, 32), np.float32)
    assert G.usable(x, w) and G.usable(x, w, np.ones(32, np.float32))
    assert G.usable(x, np.ones((32, 8), np.float32), transposed=True)
    assert not G.usable(x[:-1], w)                            # too few rows
    assert not G.usable(x.astype(np.float64), w.astype(np.float64))
    assert not G.usable(x, np.ones((9, 32), np.float32))      # K does not match
    assert not G.usable(x, np.ones((8, 31), np.float32))      # no whole panel
    assert not G.usable(x, np.ones((32, 8), np.float32).T)    # not C-contiguous
    assert not G.usable(x, w, np.ones(31, np.float32))        # a bias of the wrong length


def test_backend_linear_and_head_take_it():
    """From MIN_ROWS rows the numba backend's linear and x Eᵀ head are this kernel's result, bit for bit;
    below, BLAS's."""
    x = rng.standard_normal((2, G.MIN_ROWS // 2 + 3, 64)).astype(np.float32)
    rows = x.shape[0] * x.shape[1]
    w = rng.standard_normal((64, 96)).astype(np.float32)
    b = rng.standard_normal(96).astype(np.float32)
    assert np.array_equal(L.linear(x, w, b), G.gemm(x.reshape(rows, 64), w, b).reshape(*x.shape[:2], 96))
    e = rng.standard_normal((96, 64)).astype(np.float32)
    assert np.array_equal(L.matmul(x, e, transpose_b=True),
                          G.gemm(x.reshape(rows, 64), e, transposed=True).reshape(*x.shape[:2], 96))
    few = x[:1, :4]
    np.testing.assert_allclose(L.linear(few, w, b), few @ w + b, rtol=1e-5, atol=1e-5)


def test_compiles_to_512_bit_fmas():
    """The microkernel, compiled afresh (cached code cannot be inspected), multiplies with zmm FMAs."""
    import numba

    @numba.njit
    def tile(x, panel, bias, y):
        G._TM(x, panel, bias, y, 0, 0)

    x = rng.integers(-4, 5, (G.MR, 16)).astype(np.float32)
    p = rng.integers(-4, 5, (16, G.NR)).astype(np.float32)
    y = np.empty((G.MR, G.NR), np.float32)
    tile(x, p, np.zeros(G.NR, np.float32), y)
    assert np.array_equal(y, x @ p)
    asm = next(iter(tile.inspect_asm().values()))
    assert "vfmadd" in asm and "zmm" in asm
