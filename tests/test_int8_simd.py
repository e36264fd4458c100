"""The numba Q8_0 kernel (backends/numba_cpu/int8_simd.py) against the spec: the AVX2 path where the
CPU has it, the portable path always, and the instructions the AVX2 path compiles to."""
import numpy as np
import pytest

pytest.importorskip("numba")

from minitx.backends.numba_cpu import int8_simd as S  # noqa: E402
from minitx.backends.numba_cpu import quant as nq  # noqa: E402
from minitx.ops import quant as Q  # noqa: E402

rng = np.random.default_rng(0)
PATHS = [pytest.param(True, id="avx2" if S.HAS_AVX2 else "avx2-absent-lowers-to-portable"),
         pytest.param(False, id="portable")]


def _weights(n_out, n_in, block=32):
    q, s = Q.quantize_blocks(rng.standard_normal((n_in, n_out)).astype(np.float32) * 0.1, block)
    return np.ascontiguousarray(q.T), np.ascontiguousarray(s.T)


def _close(got, x, w, s, b=None, block=32):
    """float32 kernel vs the float64 spec: block sums are exact integers, so the only error is the
    float32 scale product and accumulation — a few ulps of the sum of |terms|."""
    ref = Q.linear_q8_0(x.astype(np.float64), w, s.astype(np.float64), None if b is None else b.astype(np.float64),
                        block=block)
    mag = np.abs(x).max() * np.abs(s).max() * 127 * 128 * w.shape[1] / block
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6 * mag)
    return ref


@pytest.mark.parametrize("simd", PATHS)
@pytest.mark.parametrize("rows,n_in,n_out", [(1, 32, 1), (1, 96, 37), (3, 224, 61), (9, 160, 17), (65, 64, 33)])
def test_kernel_matches_spec_on_odd_sizes(simd, rows, n_in, n_out):
    w, s = _weights(n_out, n_in)
    x = rng.standard_normal((rows, n_in)).astype(np.float32)
    b = rng.standard_normal(n_out).astype(np.float32)
    _close(nq.linear_q8_0(x, w, s, b, simd=simd), x, w, s, b)


@pytest.mark.parametrize("simd", PATHS)
def test_zero_blocks_and_zero_rows(simd):
    w, s = _weights(40, 128)
    x = rng.standard_normal((3, 128)).astype(np.float32)
    x[0] = 0.0
    x[1, 32:96] = 0.0
    y = nq.linear_q8_0(x, w, s, simd=simd)
    assert np.all(y[0] == 0.0)
    _close(y, x, w, s)


@pytest.mark.parametrize("simd", PATHS)
def test_extreme_integers_do_not_saturate(simd):
    """|w| = 128 (int8's minimum, allowed by the format) against ±127 activations: pair sums of
    2·128·127 stay below int16's 32767 only because |w| is the unsigned operand; every block sum
    here is ±32·127·128 or near it, exact."""
    n_in = 1024
    w = np.where(rng.random((8, n_in)) < 0.5, -128, 127).astype(np.int8)
    w[0] = -128
    s = np.ones((8, n_in // 32), np.float32)
    x = np.where(rng.random((2, n_in)) < 0.5, -127.0, 127.0).astype(np.float32)
    x[0] = -127.0
    y = nq.linear_q8_0(x, w, s, simd=simd)
    assert y[0, 0] == 127.0 * 128 * n_in                          # exact: 16.6M < 2^24
    ref = _close(y, x, w, s)
    assert np.array_equal(y, ref.astype(np.float32))             # integers all the way


@pytest.mark.parametrize("rows", [5, S.PARALLEL_ROWS_MIN // 96 + 1])   # the serial and the parallel quantizer
def test_activation_quantizer_is_bit_exact_with_spec(rows):
    x = (rng.standard_normal((rows, 96)) * np.exp(rng.uniform(-20, 20, (rows, 1)))).astype(np.float32)
    x[1, :32] = np.linspace(-63.5, 63.5, 32).astype(np.float32)   # halves: round to even
    x[2, 32:64] = 0.0
    q, s = np.empty((rows, 96), np.int8), np.empty((rows, 3), np.float32)
    S.quantize_act_blocks(x, 32, q, s)
    qr, sr = Q.quantize_act_blocks(x, 32)                          # the spec in float32
    assert np.array_equal(q, qr) and np.array_equal(s, sr)


def _exact_case(M, N, K, block):
    """Integer weights and activations with scales of 1 (every block sum, every partial sum and the
    total below 2^24): the product is the exact integer matrix, so any element the kernel gets
    wrong — a tile edge, a token or row slipped by one, a scale from the wrong block — shows."""
    w = rng.integers(-128, 128, (N, K)).astype(np.int8)
    x = rng.integers(-127, 128, (M, K)).astype(np.int8)
    x[:, :32] = 127                                   # block maxima 127: the quantizer keeps x exactly
    ref = x.astype(np.int64) @ w.astype(np.int64).T
    assert np.abs(ref).max() < 2 ** 24
    return w, np.ones((N, K // block), np.float32), x, ref


@pytest.mark.parametrize("par", [0, 1], ids=["parallel", "serial"])
@pytest.mark.parametrize("M,N", [(4, 2), (7, 5), (13, 17), (66, 33), (131, 19)])
@pytest.mark.parametrize("block", [32, 224])       # Q8_0 and one block per row (w8a8)
def test_tile_kernel_every_element_exact(par, M, N, block):
    """The prefill microkernel over M tokens × N rows that are not multiples of its tile (TILE_R ×
    TILE_C), chunks (64 tokens × 16 rows) or both: every element of y, the tiles' and the edges'
    (the single dot products), equals the exact integer product. y starts as NaN: an element the
    kernel never writes fails too."""
    w, s, xq, ref = _exact_case(M, N, 224, block)
    xs = np.ones((M, 224 // block), np.float32)
    y = np.full((M, N), np.nan, np.float32)
    nq._Q8_0[par](xq, xs, w, s, block, True, y)
    assert np.array_equal(y, ref.astype(np.float32))


@pytest.mark.parametrize("M,N", [(4, 2), (9, 7), (70, 35)])
def test_tile_kernel_scales_per_block_and_element(M, N):
    """Distinct scales per (token, block) and (row, block), powers of two, activations within ±15:
    every product and partial sum is exact in float32 (|block sum| < 2^16, scale products 2^-2..2^2,
    5 blocks), so y must be Σ_b xs[m, b] ws[n, b] S[m, n, b] exactly for each element — a scale
    product taken from another token, row or block changes the value."""
    K = 160
    w, _, _, _ = _exact_case(M, N, K, 32)
    xq = rng.integers(-15, 16, (M, K)).astype(np.int8)
    xs = (2.0 ** rng.integers(-1, 2, (M, K // 32))).astype(np.float32)
    ws = (2.0 ** rng.integers(-1, 2, (N, K // 32))).astype(np.float32)
    S_ = np.einsum("mbk,nbk->mnb", xq.reshape(M, -1, 32).astype(np.int64), w.reshape(N, -1, 32).astype(np.int64))
    ref = (S_ * xs[:, None, :].astype(np.float64) * ws[None, :, :]).sum(-1)
    y = np.full((M, N), np.nan, np.float32)
    nq._Q8_0[1](xq, xs, w, ws, 32, True, y)
    assert np.array_equal(y.astype(np.float64), ref)


@pytest.mark.parametrize("M,N", [(4, 2), (13, 17), (66, 33)])
def test_tile_kernel_matches_spec(M, N):
    """Real scales: the microkernel against the float64 spec, element by element."""
    w, s = _weights(N, 224)
    x = rng.standard_normal((M, 224)).astype(np.float32)
    _close(nq.linear_q8_0(x, w, s), x, w, s)


def test_parallel_kernel_equals_serial():
    w, s = _weights(4096, 256)
    x = rng.standard_normal((2, 256)).astype(np.float32)
    q, sx = Q.quantize_act_blocks(x, 32)
    out = [np.empty((2, 4096), np.float32) for _ in range(2)]
    for k, fn in enumerate(nq._Q8_0):
        fn(q, sx.astype(np.float32), w, s, 32, True, out[k])
    assert np.array_equal(out[0], out[1])
    _close(out[0], x, w, s)


def test_other_dtypes_run_the_spec():
    w, s = _weights(8, 64)
    x = rng.standard_normal((2, 64))
    np.testing.assert_array_equal(nq.linear_q8_0(x, w, s.astype(np.float64)), Q.linear_q8_0(x, w, s.astype(np.float64)))


@pytest.mark.skipif(not S.HAS_AVX2, reason="the CPU numba targets has no AVX2: the portable path runs")
def test_avx2_path_compiles_to_8bit_multiply_adds():
    """The intrinsic's loop, compiled afresh (cached code cannot be inspected), uses vpmaddubsw and
    vpmaddwd with the sign trick, and no int8→float widening."""
    import numba

    @numba.njit
    def dot(w, ws, x, xs):
        return S.dot_q8_0(w, 0, ws, 0, x, 0, xs, 0, ws.size, 1)

    w, s = _weights(1, 256)
    x, sx = Q.quantize_act_blocks(rng.standard_normal((1, 256)).astype(np.float32), 32)
    got = dot(w, s, x, sx.astype(np.float32))
    _close(np.array([[got]]), x.astype(np.float32) * np.repeat(sx, 32, axis=1), w, s)
    asm = next(iter(dot.inspect_asm().values()))
    for ins in ("vpmaddubsw", "vpmaddwd", "vpsignb", "vpabsb", "vcvtdq2ps", "vfmadd"):
        assert ins in asm, ins
    assert "vpmovsxbd" not in asm


def test_target_detection_follows_numba_config(monkeypatch):
    import numba
    monkeypatch.setattr(numba.config, "CPU_NAME", "generic")
    monkeypatch.setattr(numba.config, "CPU_FEATURES", None)
    assert S.target_has("avx2") is False
    monkeypatch.setattr(numba.config, "CPU_FEATURES", "+sse2,+avx2,+fma")
    assert S.target_has("avx2") is True
    monkeypatch.setattr(numba.config, "CPU_FEATURES", "+sse2,-avx2")
    assert S.target_has("avx2") is False


@pytest.mark.parametrize("simd", PATHS)
@pytest.mark.parametrize("rows", [1, 6])
@pytest.mark.parametrize("block", [64, 224, 48])
def test_wide_and_odd_blocks(simd, rows, block):
    """Blocks of several 32-byte chunks (int32 sums within a block; 224: one block per row, the
    W8A8 layout) and a block that is no multiple of 32 (48: the portable loop)."""
    w, s = _weights(19, {64: 320, 224: 224, 48: 240}[block], block)
    x = rng.standard_normal((rows, w.shape[1])).astype(np.float32)
    _close(nq.linear_q8_0(x, w, s, block=block, simd=simd), x, w, s, block=block)


@pytest.mark.parametrize("mode", ["int8", "w8a8"])
def test_quant_plugin_packs_q8_0_and_numba_runs_it(mode):
    """``optimize --plugin quant:int8`` (and w8a8) gives linear_q8_0 — blocks of 32, or one block per
    row for w8a8 — with weights stored (out, in); the model on the numba backend matches the spec."""
    from minitx import models, plugin
    from minitx.feeds import build
    from minitx.model import Model
    from minitx.validate import Calibration

    m = Model.from_config(models.preset("gpt2", "tiny"), seed=0)
    new = plugin.optimize(m, [f"quant:{mode}"], calib=Calibration.random(2, 16))
    up = next(n for n in new.graph.nodes if n.name == "layers.0.mlp.up")
    W = m.params["layers.0.mlp.up.weight"]
    assert up.op == "linear_q8_0" and up.attrs == {"block": 32 if mode == "int8" else W.shape[0]}
    assert new.params["layers.0.mlp.up.weight.q"].shape == W.shape[::-1]
    ex = new.executor(("numba",))
    assert {op: b for _, op, b in ex.explain()}["linear_q8_0"] == "numba"
    f = build(new.graph, [[1, 2, 3, 4, 5]])
    np.testing.assert_allclose(ex.run(f)["logits"], new.executor().run(f)["logits"], rtol=1e-4, atol=1e-4)


def test_without_avx2_the_intrinsics_lower_to_the_portable_loop(tmp_path):
    """numba told to target a generic x86-64 (no AVX2): HAS_AVX2 is false, every intrinsic compiles
    to the portable sums, and the op still passes conformance — the path a CPU without AVX2 runs."""
    import os
    import subprocess
    import sys

    code = ("from minitx.backends.numba_cpu import int8_simd as S; assert not S.HAS_AVX2\n"
            "from minitx.conformance import run_conformance\n"
            "r = run_conformance('numba', include=['linear_q8_0']); print(r.summary()); assert r.ok, r.table()\n")
    env = {**os.environ, "NUMBA_CPU_NAME": "generic", "NUMBA_CACHE_DIR": str(tmp_path), "NUMBA_NUM_THREADS": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "0 failed" in out.stdout


def test_int8_head_at_prefill_in_slices():
    """``linear_q8`` transposed (the tied int8 LM head) at prefill: output rows dequantized and
    multiplied slice by slice — several slices here, the last one short — against the spec."""
    n_out = 2 * 4 * nq.TILE + 37
    w = rng.integers(-127, 128, (n_out, 96)).astype(np.int8)
    s = rng.uniform(0.5, 1.5, n_out).astype(np.float32)
    x = rng.standard_normal((nq.SKINNY_MAX_ROWS + 5, 96)).astype(np.float32)
    ref = Q.linear_q8(x.astype(np.float64), w, s.astype(np.float64), transposed=True)
    np.testing.assert_allclose(nq.linear_q8(x, w, s, transposed=True), ref, rtol=1e-4, atol=1e-3)
