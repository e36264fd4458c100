"""The AVX-512 VNNI prefill kernel (backends/numba_cpu/int8_vnni.py) against exact integer products
and the spec; its byte layout and its cache of packed weights. The kernel tests skip on a CPU
without AVX-512 VNNI, where linear_q8_0 never takes this path."""
import numpy as np
import pytest

pytest.importorskip("numba")

from minitx.backends.numba_cpu import int8_vnni as V  # noqa: E402
from minitx.backends.numba_cpu import quant as nq  # noqa: E402
from minitx.ops import quant as Q  # noqa: E402

rng = np.random.default_rng(1)
vnni = pytest.mark.skipif(not V.HAS_VNNI, reason="the CPU numba targets has no AVX-512 VNNI")


def _run(par, w, ws, x, xs, block):
    wp, cp, wsp = V.packed(w, ws, block)
    y = np.full((x.shape[0], w.shape[0]), np.nan, np.float32)
    V.ROWS[par](wp, cp, wsp, V.interleave(x, 0x80), V.pad_scales(xs, block), block == w.shape[1], y)
    return y


@vnni
@pytest.mark.parametrize("par", [0, 1], ids=["parallel", "serial"])
@pytest.mark.parametrize("M,N,K", [(4, 2, 512), (1, 1, 32), (7, 5, 224), (13, 17, 768), (66, 33, 1024), (131, 19, 544),
                                   (9, 6, 384), (5, 3, 128), (6, 4, 800), (5, 2, 928)])
@pytest.mark.parametrize("block", ["q8_0", "row"])
def test_every_element_exact(par, M, N, K, block):
    """Integer operands, scales 1, extreme values included (w = −128, x = ±127): every element is
    the exact integer product, at tile edges (M, N not multiples of 4 × 2, chunks of 64 × 16) and
    with rows whose tails take groups of 4, 8 and 16 lanes, padded or not (K = 224, 384, 544, 768,
    800, 928). y starts as NaN: an element the
    kernel never writes fails."""
    block = 32 if block == "q8_0" else K
    w = rng.integers(-128, 128, (N, K)).astype(np.int8)
    x = rng.integers(-127, 128, (M, K)).astype(np.int8)
    w[0, :32], x[0, :32] = -128, -127
    ref = x.astype(np.int64) @ w.astype(np.int64).T
    assert np.abs(ref).max() < 2 ** 24
    y = _run(par, w, np.ones((N, K // block), np.float32), x, np.ones((M, K // block), np.float32), block)
    assert np.array_equal(y, ref.astype(np.float32))


@vnni
def test_scales_per_block_token_and_row():
    """Distinct power-of-two scales per (token, block) and (row, block), small activations: every
    product and sum is exact in float32, so a scale taken from another block, token or row (or a
    block's sum landing in another lane) changes the value."""
    M, N, K = 9, 7, 800   # 25 blocks: one full group and one of 9 blocks
    w = rng.integers(-128, 128, (N, K)).astype(np.int8)
    x = rng.integers(-15, 16, (M, K)).astype(np.int8)
    xs = (2.0 ** rng.integers(-1, 2, (M, K // 32))).astype(np.float32)
    ws = (2.0 ** rng.integers(-1, 2, (N, K // 32))).astype(np.float32)
    S = np.einsum("mbk,nbk->mnb", x.reshape(M, -1, 32).astype(np.int64), w.reshape(N, -1, 32).astype(np.int64))
    ref = (S * xs[:, None, :].astype(np.float64) * ws[None, :, :]).sum(-1)
    assert np.array_equal(_run(1, w, ws, x, xs, 32).astype(np.float64), ref)


@vnni
@pytest.mark.parametrize("block", [32, 384])
def test_linear_q8_0_prefill_matches_spec(block):
    """Real scales through the op (prefill takes the VNNI kernel) against the float64 spec."""
    q, s = Q.quantize_blocks(rng.standard_normal((384, 40)).astype(np.float32) * 0.1, block)
    w, ws = np.ascontiguousarray(q.T), np.ascontiguousarray(s.T)
    x = rng.standard_normal((2, 11, 384)).astype(np.float32)
    b = rng.standard_normal(40).astype(np.float32)
    got = nq.linear_q8_0(x, w, ws, b, block=block)
    ref = Q.linear_q8_0(x.astype(np.float64), w, ws.astype(np.float64), b.astype(np.float64), block=block)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    assert not w.flags.writeable  # it went through the packed path


@vnni
def test_compiles_to_512_bit_vpdpbusd():
    """The microkernel, compiled afresh (cached code cannot be inspected), uses vpdpbusd on zmm
    registers and widens no int8 to int32 or float."""
    import numba

    @numba.njit
    def tile(wp, cp, ws, xp, xs, y):
        V._T_RC(wp, cp, ws, 0, xp, xs, 0, False, y)

    R, C = V.TILE_R, V.TILE_C
    w = rng.integers(-128, 128, (C, 512)).astype(np.int8)
    x = rng.integers(-127, 128, (R, 512)).astype(np.int8)
    wp, cp, ws = V.packed(w, np.ones((C, 16), np.float32), 32)
    y = np.empty((R, C), np.float32)
    tile(wp, cp, ws, V.interleave(x, 0x80), np.ones((R, 16), np.float32), y)
    assert np.array_equal(y, (x.astype(np.int64) @ w.astype(np.int64).T).astype(np.float32))
    asm = next(iter(tile.inspect_asm().values()))
    assert "vpdpbusd" in asm and "zmm" in asm
    assert "vpmovsxbd" not in asm


def _layout(x, flip, widths):
    """The interleaved layout written out group by group: lane L of a group of W holds its block L."""
    M, K = x.shape
    total = sum(widths)
    blocks = np.full((M, total, 8, 4), flip, np.uint8)                   # row, block, word, byte
    blocks[:, :K // 32] = (x.view(np.uint8) ^ flip).reshape(M, K // 32, 8, 4)
    out, b0 = [], 0
    for W in widths:
        out.append(blocks[:, b0:b0 + W].transpose(0, 2, 1, 3).reshape(M, -1))   # word, lane, byte
        b0 += W
    return np.concatenate(out, axis=1)


@pytest.mark.parametrize("blocks,widths", [(21, [16, 8]), (24, [16, 8]), (12, [16]), (4, [4]), (1, [4]),
                                           (25, [16, 16]), (20, [16, 4]), (32, [16, 16]), (6, [8])])
def test_interleave_puts_block_l_in_lane_l(blocks, widths):
    """Groups of 16 blocks, then the rest in 4, 8 or 16 lanes;
    byte t of the c-th 4-byte word of a group's block L at 4W·c + 4L + t, XOR flip; padding is flip."""
    x = rng.integers(-128, 128, (3, 32 * blocks)).astype(np.int8)
    assert V.padded_blocks(blocks) == sum(widths)
    for flip in (0, 0x80):
        got = V.interleave(x, flip)
        assert got.dtype == np.uint8 and np.array_equal(got, _layout(x, flip, widths))


def test_compensation_cancels_the_offset():
    w = rng.integers(-128, 128, (5, 96)).astype(np.int8)
    c = V.compensation(w)
    assert c.shape == (5, 4) and not c[:, 3:].any()
    x = rng.integers(-127, 128, 96)
    blocks = ((x + 128) * w).reshape(5, 3, 32).sum(-1) + c[:, :3]
    assert np.array_equal(blocks, (x * w).reshape(5, 3, 32).sum(-1))


def test_packed_weights_are_kept_and_frozen():
    """Packed once per array: the second call returns the same arrays, the weights become read-only
    (a write raises rather than leave a stale copy), and the entry goes when the array does."""
    w = rng.integers(-128, 128, (4, 64)).astype(np.int8)
    s = np.ones((4, 2), np.float32)
    first = V.packed(w, s, 32)
    assert all(a is b for a, b in zip(first, V.packed(w, s, 32)))
    with pytest.raises(ValueError):
        w[0, 0] = 1
    assert V.packed(w, s[:, :1], 64)[2].shape == (4, 1)   # another block size: packed anew
    key = id(w)
    del w, first
    assert key not in V._packs


def test_views_are_packed_each_time():
    """A view's memory can change through its base, so it is never cached nor frozen."""
    base = rng.integers(-128, 128, (4, 64)).astype(np.int8)
    view = base[:2]
    a = V.packed(view, np.ones((2, 2), np.float32), 32)
    base[0] += 1
    b = V.packed(view, np.ones((2, 2), np.float32), 32)
    assert base.flags.writeable and not np.array_equal(a[0], b[0])


def test_target_detection_needs_all_three_features(monkeypatch):
    import numba

    from minitx.backends.numba_cpu import int8_simd as S
    monkeypatch.setattr(numba.config, "CPU_NAME", "host")
    monkeypatch.setattr(numba.config, "CPU_FEATURES", "+avx2,+avx512f,+avx512bw")
    assert not S.target_has("avx512f", "avx512bw", "avx512vnni")
    monkeypatch.setattr(numba.config, "CPU_FEATURES", "+avx2,+avx512f,+avx512bw,+avx512vnni")
    assert S.target_has("avx512f", "avx512bw", "avx512vnni")
