"""float32 GEMM on AVX-512 for prefill: ``y = x W + b`` (``linear``) and ``x Eᵀ`` (the tied head).

Why our own: the BLAS NumPy brings may not use AVX-512 on a CPU that has it — OpenBLAS picks its
kernels by CPU model, and ``OPENBLAS_CORETYPE`` (set to Haswell in this project's environment) or
an older build holds it to AVX2, half the float32 throughput: 100–116 GFLOP/s on one Zen 5 core
where 512-bit FMAs reach 230. ONNX Runtime's MLAS and llama.cpp bring their own AVX-512 kernels
and so ran MiniLM and GPT-2 prefill faster than minitx did. One core, 128 tokens: this kernel runs
at 1.51–1.94x OpenBLAS's AVX2 kernels on GPT-2's and MiniLM's linears (1.35x on GPT-2's head), and
at 0.95–1.00x of OpenBLAS's own AVX-512 (SkylakeX) choice (0.84x on the head)
(benchmarks/results/sgemm_cpu.md). One kernel on every AVX-512 CPU keeps one code path and the
engine's thread budget (numba's tasks, not BLAS's threads) whichever BLAS is installed.

The microkernel (:func:`_tile`) keeps an R × 32 block of y in 2R zmm registers (R = 8: 16
accumulators) and walks k: two vector loads of the weights' 32 columns, R broadcasts of x[m, k],
2R FMAs. The 32 columns are first copied into a contiguous panel (K × 32, in L2; read in place,
a weight row stride of 3072 floats put every row of a panel in one L1 set and ran at 0.6x). Tasks
are (256-token chunk, panel) pairs, panels varying fastest, so that a chunk of x stays in cache
while every panel passes it. The last N mod 32 columns (the head's vocabulary, say) go through
NumPy. The sum runs in k order per element, as a dot product; results differ from BLAS's only by
float32 rounding, which conformance bounds.

Used where the CPU numba targets has AVX-512F (:data:`HAS_AVX512`) for float32 from MIN_ROWS
rows. Below, copying panels out of weights that come from memory is not paid back: MiniLM's 24
linears took 7.7 / 9.3 / 8.3 / 11.1 ms at 16 / 32 / 64 / 128 tokens this way against BLAS's
6.1 / 8.8 / 12.1 / 17.6 (one sentence; the same 16-row product with weights in cache: 1.03–1.13x).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._jit import kernel
from .int8_simd import _fn, _ptr, target_has

HAS_AVX512 = target_has("avx512f")
NR = 32          # columns of a panel: two 512-bit registers
MR = 8           # tokens of the microkernel (6 / 8 / 10 / 12 rows: 153 / 167 / 166 / 77 GFLOP/s at 128 × 768 × 3072)
MC = 256         # tokens of a chunk
MIN_ROWS = 64


def _tile(R: int):
    """An intrinsic ``tile(x, panel, bias, y, m0, n0)``: y[m0 + i, n0 + j] = bias[n0 + j] +
    Σ_k x[m0 + i, k] · panel[k, j] for i < R, j < 32."""

    @intrinsic
    def tile(typingctx, x, panel, bias, y, m0, n0):
        if not all(isinstance(a, types.Array) and a.dtype == types.float32 for a in (x, panel, bias, y)):
            return None
        sig = types.void(x, panel, bias, y, m0, n0)

        def codegen(context, builder, signature, args):
            xa, pa, ba, ya, m0v, n0v = args
            at = signature.args
            i64, i32, f32 = ir.IntType(64), ir.IntType(32), ir.FloatType()
            c = lambda v: ir.Constant(i64, v)  # noqa: E731
            m0v, n0v = (context.cast(builder, v, t, types.int64) for v, t in ((m0v, at[4]), (n0v, at[5])))
            def shape(k, a):
                return cgutils.unpack_tuple(builder, context.make_array(at[k])(context, builder, a).shape)

            K = shape(0, xa)[1]
            N = shape(3, ya)[1]
            fv = ir.VectorType(f32, 16)
            fvp = fv.as_pointer()
            fma = _fn(builder, "llvm.fma.v16f32", fv, [fv, fv, fv])
            pp = _ptr(context, builder, at[1], pa, c(0), f32)
            bp = _ptr(context, builder, at[2], ba, n0v, f32)
            xrow = [_ptr(context, builder, at[0], xa, builder.mul(builder.add(m0v, c(i)), K), f32) for i in range(R)]
            start = [builder.load(builder.bitcast(builder.gep(bp, [c(16 * h)]), fvp), align=4) for h in range(2)]
            acc = [[cgutils.alloca_once_value(builder, start[h]) for h in range(2)] for _ in range(R)]
            splat = ir.Constant(ir.VectorType(i32, 16), [0] * 16)
            with cgutils.for_range(builder, K) as loop:
                k = loop.index
                row = builder.gep(pp, [builder.mul(k, c(NR))])
                wv = [builder.load(builder.bitcast(builder.gep(row, [c(16 * h)]), fvp), align=4) for h in range(2)]
                for i in range(R):
                    s = builder.insert_element(ir.Constant(fv, ir.Undefined), builder.load(builder.gep(xrow[i], [k])),
                                               ir.Constant(i32, 0))
                    xv = builder.shuffle_vector(s, ir.Constant(fv, ir.Undefined), splat)
                    for h in range(2):
                        builder.store(builder.call(fma, [xv, wv[h], builder.load(acc[i][h])]), acc[i][h])
            for i in range(R):
                yp = _ptr(context, builder, at[3], ya, builder.add(builder.mul(builder.add(m0v, c(i)), N), n0v), f32)
                for h in range(2):
                    builder.store(builder.load(acc[i][h]), builder.bitcast(builder.gep(yp, [c(16 * h)]), fvp), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return tile


_TM, _T4, _T1 = _tile(MR), _tile(4), _tile(1)


def _gemm(x, w, transposed, scale, bias, y):
    """y[:, :32·P] for the P = y.shape[1] // 32 whole panels: w (K, N), or (N, K) when ``transposed``
    — then possibly int8 rows with per-row ``scale``s (an int8 tied head), dequantized into the
    panel (``scale`` empty: none)."""
    M, K = x.shape
    npan = y.shape[1] // NR
    nm = (M + MC - 1) // MC
    for t in prange(nm * npan):
        n0 = (t % npan) * NR
        m = (t // npan) * MC
        m_hi = min(M, m + MC)
        panel = np.empty((K, NR), np.float32)
        if transposed:
            for j in range(NR):
                r = w[n0 + j]
                sc = scale[n0 + j] if scale.size else np.float32(1.0)
                for k in range(K):
                    panel[k, j] = r[k] * sc
        else:
            for k in range(K):
                r = w[k]
                p = panel[k]
                for j in range(NR):
                    p[j] = r[n0 + j]
        while m + MR <= m_hi:
            _TM(x, panel, bias, y, m, n0)
            m += MR
        while m + 4 <= m_hi:
            _T4(x, panel, bias, y, m, n0)
            m += 4
        while m < m_hi:
            _T1(x, panel, bias, y, m, n0)
            m += 1


_GEMM = kernel(_gemm)


def usable(x2: np.ndarray, w: np.ndarray, b: np.ndarray | None = None, *, transposed: bool = False) -> bool:
    """Whether :func:`gemm` takes ``x2 @ w (+ b)`` (``x2 @ wᵀ`` when ``transposed``): AVX-512,
    float32 throughout, from MIN_ROWS rows, a C-contiguous 2-D weight of matching width with at
    least one panel of columns. Anything else goes the way it went before (BLAS, the spec)."""
    if not (HAS_AVX512 and x2.ndim == 2 and w.ndim == 2 and x2.shape[0] >= MIN_ROWS
            and x2.dtype == w.dtype == np.float32 and w.flags.c_contiguous):
        return False
    k, n = (w.shape[1], w.shape[0]) if transposed else w.shape
    return x2.shape[1] == k and n >= NR and (b is None or (b.dtype == np.float32 and b.shape == (n,)))


def gemm(x2: np.ndarray, w: np.ndarray, b: np.ndarray | None = None, *, transposed: bool = False,
         scale: np.ndarray | None = None, parallel: bool = True) -> np.ndarray:
    """x2 @ w + b (w (K, N)), or x2 @ (scale · w)ᵀ (w (N, K), ``transposed``; float32, or int8 with
    per-row ``scale``), float32; the whole panels here, the last N mod 32 columns by NumPy.
    ``parallel``: numba's threads split the tasks."""
    x2 = np.ascontiguousarray(x2)
    M, K = x2.shape
    N = w.shape[0] if transposed else w.shape[1]
    y = np.empty((M, N), np.float32)
    full = N // NR * NR
    bias = np.zeros(N, np.float32) if b is None else np.ascontiguousarray(b)
    sc = np.ones(0, np.float32) if scale is None else np.ascontiguousarray(scale, np.float32)
    if full:
        _GEMM[0 if parallel else 1](x2, w, transposed, sc, bias, y)
    if full < N:
        rest = w[full:].astype(np.float32) * (sc[full:, None] if sc.size else 1) if transposed else w[:, full:]
        rest = x2 @ (rest.T if transposed else rest)
        y[:, full:] = rest if b is None else rest + bias[full:]
    return y
