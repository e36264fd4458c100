"""The numba backend's tiled prefill attention (``_sdpa_gemm``: BLAS tiles + online softmax) and its
vectorised float32 exp, against the NumPy spec computed in float64.

Sizes are chosen to cross the kernel's tile edges (TQ queries, TK keys) at odd counts, and masks to
produce padding rows with no visible key at all (the spec averages V uniformly there) as well as
tiles of a row that see nothing while later tiles do (the online softmax must leave its running
state untouched, not reset it)."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("numba")

from backends.numba_cpu import _vmath, attention as nba  # noqa: E402
from minitx.ops import attention as spec  # noqa: E402

TOL = 2e-5  # float32 against a float64 reference, outputs of order 1


def _inputs(rng, B, T, S0, H, KV, D):
    q = rng.standard_normal((B, T, H * D)).astype(np.float32)
    k = rng.standard_normal((B, S0 + T, KV * D)).astype(np.float32)
    v = rng.standard_normal((B, S0 + T, KV * D)).astype(np.float32)
    return q, k, v


def _ref(q, k, v, mask, **kw):
    f = lambda a: a.astype(np.float64)  # noqa: E731
    return spec.attention(f(q), f(k), f(v), None, None, mask, **kw)[0]


CASES = [
    # B, T, past, H, KV, D, causal: one tile; several query and key tiles at odd counts; GQA; a cache
    (2, 9, 0, 3, 3, 8, False),
    (3, 37, 0, 6, 2, 24, True),
    (2, nba.TQ + 3, nba.TK + 5 - nba.TQ - 3, 4, 4, 16, False),
    (1, 2 * nba.TQ + 1, 0, 4, 1, 32, True),
    (2, 11, 300, 2, 2, 20, True),  # queries at positions 300…310 over a cache longer than a key tile
]


@pytest.mark.parametrize("B,T,past,H,KV,D,causal", CASES)
def test_prefill_matches_spec(B, T, past, H, KV, D, causal) -> None:
    rng = np.random.default_rng(T * 31 + D)
    q, k, v = _inputs(rng, B, T, past, H, KV, D)
    kw = dict(n_heads=H, n_kv_heads=KV, causal=causal)
    out = nba.sdpa(q, k, None, v, None, None, scale=None, **kw)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, _ref(q, k, v, None, **kw), atol=TOL, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_prefill_padding_and_fully_masked_rows(causal) -> None:
    """Row 0: right padding. Row 1: every key masked (a padding sequence): every query averages V.
    Row 2: the first key tile masked entirely, only keys of the second tile visible: the online
    softmax's first tile contributes nothing. Under ``causal`` row 2's early queries see no key."""
    B, T, H, D = 3, nba.TK + 9, 2, 12
    rng = np.random.default_rng(7)
    q, k, v = _inputs(rng, B, T, 0, H, H, D)
    mask = np.ones((B, T), np.int64)
    mask[0, T - 13:] = 0
    mask[1, :] = 0
    mask[2, :nba.TK] = 0
    kw = dict(n_heads=H, n_kv_heads=H, causal=causal)
    out = nba.sdpa(q, k, None, v, None, mask, scale=None, **kw)
    ref = _ref(q, k, v, mask, **kw)
    np.testing.assert_allclose(out, ref, atol=TOL, rtol=0)
    np.testing.assert_allclose(out[1, :, :D], np.broadcast_to(v[1, :, :D].mean(axis=0), (T, D)), atol=TOL)


def test_prefill_large_scores_do_not_overflow() -> None:
    """Scores near float32's exp overflow (scale 30 on unit vectors·√D): the online maximum keeps
    every exp finite, as the spec's max-subtraction does."""
    rng = np.random.default_rng(3)
    q, k, v = _inputs(rng, 1, 40, 0, 2, 2, 16)
    kw = dict(n_heads=2, n_kv_heads=2, causal=True)
    out = nba.sdpa(q * 30, k * 30, None, v, None, None, scale=None, **kw)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, _ref(q * 30, k * 30, v, None, **kw), atol=1e-4, rtol=0)


SHORT_CASES = [
    # B, T, past, H, KV, D, causal: odd query and key counts (an unpaired last query, keys not a
    # multiple of four), one query, GQA, odd head width, a cache, the longest key count taken
    (2, 9, 0, 3, 3, 8, False),
    (3, 7, 0, 5, 5, 7, True),
    (1, 1, 0, 2, 2, 16, False),
    (2, 13, 0, 6, 2, 24, True),
    (2, 5, 6, 4, 1, 12, True),
    (1, nba.SHORT_KEYS, 0, 12, 12, 32, False),
]


def _short(q, k, v, mask, H, KV, causal):
    """_sdpa_short called directly (``sdpa`` takes it for 8+ queries over at most SHORT_KEYS keys)."""
    has = mask is not None
    m = np.ascontiguousarray(mask, np.int64) if has else np.zeros((1, 1), np.int64)
    D = q.shape[-1] // H
    outs = [np.empty_like(q), np.empty_like(q)]
    for fn, out in zip(nba._SDPA_SHORT, outs):   # the parallel and the serial build
        fn(q, 0, k, 0, v, 0, k.shape[1], m, has, causal, np.float32(1 / np.sqrt(D)), H, KV, np.float32(0), out)
    np.testing.assert_array_equal(outs[0], outs[1])
    return outs[0]


@pytest.mark.parametrize("B,T,past,H,KV,D,causal", SHORT_CASES)
def test_short_prefill_matches_spec(B, T, past, H, KV, D, causal) -> None:
    rng = np.random.default_rng(T * 17 + D)
    q, k, v = _inputs(rng, B, T, past, H, KV, D)
    kw = dict(n_heads=H, n_kv_heads=KV, causal=causal)
    np.testing.assert_allclose(_short(q, k, v, None, H, KV, causal), _ref(q, k, v, None, **kw), atol=TOL, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_short_prefill_padding_and_fully_masked_rows(causal) -> None:
    """Row 0: right padding of an odd length. Row 1: every key masked: every query averages V.
    Row 2: left padding, so that under ``causal`` its first queries see no key at all."""
    B, T, H, D = 3, 11, 3, 8
    rng = np.random.default_rng(11)
    q, k, v = _inputs(rng, B, T, 0, H, H, D)
    mask = np.ones((B, T), np.int64)
    mask[0, T - 5:] = 0
    mask[1, :] = 0
    mask[2, :4] = 0
    kw = dict(n_heads=H, n_kv_heads=H, causal=causal)
    out = _short(q, k, v, mask, H, H, causal)
    np.testing.assert_allclose(out, _ref(q, k, v, mask, **kw), atol=TOL, rtol=0)
    np.testing.assert_allclose(out[1, :, D:2 * D], np.broadcast_to(v[1, :, D:2 * D].mean(axis=0), (T, D)), atol=TOL)


@pytest.mark.parametrize("lead", [0, 3])
def test_short_prefill_reads_a_fused_projection_in_place(lead) -> None:
    """The encoder's case: q, k, v are column slices of one (B, T, lead + 3·H·D) projection and no
    cache; ``attention`` reads them where they lie (at column offsets, ``lead`` columns in not a
    multiple of the head width) with padding and a fully masked row, and returns k and v as the
    present K/V, like the spec."""
    B, T, H, D = 3, 13, 4, 8
    rng = np.random.default_rng(lead)
    qkv = rng.standard_normal((B, T, lead + 3 * H * D)).astype(np.float32)
    q, k, v = (qkv[:, :, lead + i * H * D:lead + (i + 1) * H * D] for i in range(3))
    mask = np.ones((B, T), np.int64)
    mask[0, 9:] = 0
    mask[2, :] = 0
    kw = dict(n_heads=H, n_kv_heads=H, causal=False)
    out, K, V = nba.attention(q, k, v, None, None, mask, **kw)
    assert K is k and V is v
    np.testing.assert_allclose(out, _ref(q, k, v, mask, **kw), atol=TOL, rtol=0)
    np.testing.assert_allclose(out[2, :, D:2 * D], np.broadcast_to(v[2, :, D:2 * D].mean(axis=0), (T, D)), atol=TOL)


def test_short_prefill_is_taken_for_short_sequences(monkeypatch) -> None:
    """``sdpa`` routes 8+ queries over at most SHORT_KEYS keys to _sdpa_short, longer ones to the
    tiles, and both agree with the spec."""
    calls = []
    for name in ("_SDPA_SHORT", "_SDPA_GEMM"):
        pair = getattr(nba, name)
        monkeypatch.setattr(nba, name, tuple((lambda f, n: lambda *a: (calls.append(n), f(*a)))(f, name) for f in pair))
    rng = np.random.default_rng(2)
    for T in (16, nba.SHORT_KEYS + 1):
        q, k, v = _inputs(rng, 2, T, 0, 4, 4, 8)
        kw = dict(n_heads=4, n_kv_heads=4, causal=False)
        out = nba.sdpa(q, k, None, v, None, None, scale=None, **kw)
        np.testing.assert_allclose(out, _ref(q, k, v, None, **kw), atol=TOL, rtol=0)
    assert calls == ["_SDPA_SHORT", "_SDPA_GEMM"]


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_above_the_parallel_threshold_matches_spec(approximate) -> None:
    """GELU over more than EXP_PARALLEL_MIN values (numba's parallel build, on two threads where
    there are two) against the spec in float64, every element."""
    from backends.numba_cpu import activations as act
    from minitx.ops import activations as spec_act

    x = np.random.default_rng(4).standard_normal(act.EXP_PARALLEL_MIN + 1001).astype(np.float32) * 3
    y = _on_two_threads(act.gelu, x.reshape(-1, 5), approximate=approximate).reshape(-1)
    ref = spec_act.gelu(x.astype(np.float64), approximate=approximate)
    np.testing.assert_allclose(y, ref, atol=1e-6, rtol=1e-5)


def test_vectorised_exp_is_float32_and_accurate() -> None:
    """The float32 exp must stay float32 end to end (a float64 intermediate — math.floor returns
    an int64 — made every kernel using it 3-5x slower) and within 2 ulp of NumPy's."""
    import numba

    @numba.njit
    def run(x, y):
        for i in range(x.size):
            y[i] = _vmath.exp(x[i])
        return _vmath.exp(x[0])

    x = np.linspace(-87, 88, 100_003, dtype=np.float32)
    y = np.empty_like(x)
    run(x, y)
    assert run.nopython_signatures[0].return_type == numba.float32
    ref = np.exp(x.astype(np.float64))
    ulp = np.spacing(ref.astype(np.float32)).astype(np.float64)
    assert (np.abs(y - ref) / ulp).max() <= 2.0


def _on_two_threads(fn, *args, **kw):
    import numba

    before = numba.get_num_threads()
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    try:
        return fn(*args, **kw)
    finally:
        numba.set_num_threads(before)


def _spy(monkeypatch, linalg, name):
    """Record the slab counts the kernel pair ``linalg.<name>`` is called with."""
    pair, calls = getattr(linalg, name), []

    def par(*args):
        calls.append(args[-1])
        return pair[0](*args)

    monkeypatch.setattr(linalg, name, (par, pair[1]))
    return calls


def _close(y, ref):
    np.testing.assert_allclose(y, ref, atol=2e-5 * max(1.0, float(np.sqrt((ref ** 2).mean()))), rtol=2e-4)


SPLIT = 2 ** 19 + 1  # multiply-adds: at least two slabs of linalg.SLAB_MIN


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,bias", [((65, 96), True), ((2, 67, 48), False), ((3, 129, 40), True),
                                        ((1, 768), True), ((1, 1, 300), False), ((5, 200), True), ((2, 31, 64), False)])
def test_linear_slabs_match_spec(monkeypatch, shape, bias, dtype) -> None:
    """``linear`` cut over two numba tasks, each one BLAS call on its slab: of rows from SPLIT_ROWS
    rows on, of output columns for one row (a GEMV each; an odd column count leaves a last slab
    that is not whole 64-byte lines), bias added in place; 2 to SPLIT_ROWS - 1 rows stay one call.
    On AVX-512, float32 from SPLIT_ROWS rows is sgemm.py's kernel, on numba's threads. The split
    must actually run where it is meant to."""
    from backends.numba_cpu import _cblas, linalg

    rows = int(np.prod(shape[:-1]))
    if rows == 1 and not _cblas.AVAILABLE:
        pytest.skip("NumPy's BLAS is not an ILP64 OpenBLAS: one row is one NumPy call")
    N = -(-SPLIT // (rows * shape[-1])) | 1  # odd, and enough work for two slabs
    rng = np.random.default_rng(len(shape) * 7 + shape[-1])
    x = rng.standard_normal(shape).astype(dtype)
    w = (rng.standard_normal((shape[-1], N)) * 0.1).astype(dtype)
    b = rng.standard_normal(N).astype(dtype) if bias else None
    from backends.numba_cpu import sgemm
    own = sgemm.usable(x.reshape(rows, -1), w, b)  # AVX-512 float32 from sgemm.MIN_ROWS: sgemm.py's kernel
    calls = _spy(monkeypatch, linalg, "_GEMM_ROWS" if rows >= linalg.SPLIT_ROWS else "_GEMV_COLS")
    pair, tasks = sgemm._GEMM, []
    monkeypatch.setattr(sgemm, "_GEMM", (lambda *a: tasks.append("parallel") or pair[0](*a),
                                         lambda *a: tasks.append("serial") or pair[1](*a)))
    y = _on_two_threads(linalg.linear, x, w, b)
    if numba_threads() >= 2:
        assert calls == ([] if 1 < rows < linalg.SPLIT_ROWS or own else [2])
        assert tasks == (["parallel"] if own else [])
    ref = x.astype(np.float64) @ w.astype(np.float64) + (0 if b is None else b.astype(np.float64))
    assert y.dtype == dtype and y.shape == (*shape[:-1], N)
    _close(y, ref)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lm_head_one_row_split_matches_spec(monkeypatch, dtype) -> None:
    """The tied LM head ``x @ Eᵀ`` for one row: E's rows cut into contiguous slabs, one GEMV each."""
    from backends.numba_cpu import _cblas, linalg

    if not _cblas.AVAILABLE:
        pytest.skip("NumPy's BLAS is not an ILP64 OpenBLAS")
    rng = np.random.default_rng(5)
    e = rng.standard_normal((SPLIT // 96 + 7, 96)).astype(dtype)
    x = rng.standard_normal((1, 1, 96)).astype(dtype)
    calls = _spy(monkeypatch, linalg, "_XET_COLS")
    y = _on_two_threads(linalg.matmul, x, e, transpose_b=True)
    if numba_threads() >= 2:
        assert calls == [2]
    assert y.dtype == dtype and y.shape == (1, 1, e.shape[0])
    _close(y, x.astype(np.float64) @ e.astype(np.float64).T)


def test_small_linear_is_not_split() -> None:
    """Below two slabs of work ``linear`` is one NumPy call (waking a thread costs more)."""
    from backends.numba_cpu import linalg

    assert linalg.slabs(2 * linalg.SLAB_MIN - 1) == 1


def test_large_linear_is_split_not_left_to_openblas_threads() -> None:
    """However big, a many-row ``linear`` goes to numba's tasks (one-thread GEMMs each): OpenBLAS's
    own threads spin against each other on a busy machine."""
    from backends.numba_cpu import linalg
    import numba

    assert linalg.slabs(1 << 34) == numba.get_num_threads()


def numba_threads() -> int:
    import numba

    return numba.config.NUMBA_NUM_THREADS
