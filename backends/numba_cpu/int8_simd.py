"""Q8_0 × Q8_0 dot products (``linear_q8_0``) with AVX2's 8-bit multiply-adds, called from numba.

Why integers: a CPU without VNNI (this one: AMD EPYC, AVX2 + FMA) has no float × int8 product, so
a weight-only kernel widens every int8 weight to float32 (load-and-extend, convert, FMA: three
operations per 8 weights). Quantizing the activation vector to int8 blocks too (the spec:
minitx/ops/quant.py ``linear_q8_0``) turns each block of 32 into one exact integer sum, which
AVX2 computes in two instructions — ``vpmaddubsw`` (32 u8 × s8 products, adjacent pairs added to
16 int16) and ``vpmaddwd`` against ones (pairs again, to 8 int32) — after which one convert and one
FMA apply the block's two scales. llama.cpp's Q8_0 dot product does the same.

``vpmaddubsw`` multiplies an *unsigned* operand by a signed one and saturates the pair sums to
int16. The weights take the unsigned side as |w| and the activations carry w's sign
(``vpsignb(x, w)``): |w| ≤ 128 even for w = −128 (which the format allows, though the quantizer
never writes it), the activations are in [−127, 127] by the spec, so a pair sum is at most
2 · 128 · 127 = 32512 < 32767 and nothing saturates — the block sums are exact, and the only
rounding is the float32 scale product and accumulation (conformance holds them to float32's
tolerance against the float64 spec). The other way round (|x|, sign(w, x)) would wrap −128.

The intrinsic :func:`dot_q8_0` emits the loop over a row's blocks in LLVM IR calling
``llvm.x86.avx2.pmadd.ub.sw`` and ``llvm.x86.avx2.pmadd.wd`` directly, with ``llvm.abs`` and
``llvm.x86.avx2.psign.b`` for the sign trick and ``llvm.fma`` for the accumulation. It is only
compiled where the CPU numba targets has AVX2 (:data:`HAS_AVX2`, from llvmlite's host features or
numba's ``NUMBA_CPU_NAME`` / ``NUMBA_CPU_FEATURES``); elsewhere — and for blocks that are not 32
wide — :func:`dot_q8_0_portable`, plain numba integer arithmetic, computes the same sums.

Prefill runs the :func:`_tile` microkernel (4 tokens × 2 weight rows). Per block of 32 and output
the integer work is three instructions (``vpsignb``, ``vpmaddubsw``, ``vpmaddwd``; ``|w|`` once per
weight row and block), then one ``vcvtdq2ps`` and one FMA with a *broadcast load* of the block's
scale product ``xs · ws``, computed beforehand for a column of tiles (:func:`scales`, vectorised
along the tokens). Measured on this AMD EPYC (AVX2, FMA, no VNNI), one core, 128 tokens: a second
float multiply in the loop instead (``fmul`` by the weight scale, FMA by the activation scale, the
old kernel) ran at 0.6–0.75x of OpenBLAS's float32 GEMM; one FMA of a broadcast load, without the
``scales`` pass, at 0.92–1.0x; with it 0.75–0.9x; the same loop with int32 accumulation only (what
one block per row, ``quant:w8a8``, needs: no conversion or float work per 32 values) at 1.2–1.6x.
The 8-bit multiply-adds, the conversion and the FMAs compete for the same few vector ports, so
per-32 blocks cost about two cycles per block and output where float32 spends two FMAs (16 × 2
flops) per cycle. Larger tiles (4 × 3, 3 × 4, 6 × 2, 2 × 6) spill accumulators and ran slower.

Where the CPU has AVX-512 VNNI, prefill of rows of 256 values or more runs int8_vnni.py's kernel
instead (one ``vpdpbusd`` per 64 products, on an interleaved copy of the weights); decode and the
other shapes stay here.
"""
from __future__ import annotations

import numba
import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._jit import FASTMATH, kernel
from ._vmath import _f32_from_bits


def target_has(*features: str) -> bool:
    """Whether the code numba generates may use every one of ``features`` (LLVM's names: "avx2",
    "avx512vnni"): numba compiles for the host CPU unless ``NUMBA_CPU_NAME`` /
    ``NUMBA_CPU_FEATURES`` say otherwise (a portable cache, say)."""
    feats = numba.config.CPU_FEATURES
    if feats is None:
        name = numba.config.CPU_NAME
        if name not in (None, "host"):
            return False  # a named target without a feature list: assume the baseline
        feats = llvm.get_host_cpu_features().flatten()
    have = set(feats.split(","))
    return all(f"+{f}" in have for f in features)


HAS_AVX2 = target_has("avx2")
BLOCK = 32  # bytes in one AVX2 register: the block the SIMD kernel handles


def _ptr(context, builder, aryty, ary, offset, elem):
    """Address of ``ary.flat[offset]`` as a pointer to ``elem``."""
    a = context.make_array(aryty)(context, builder, ary)
    return builder.bitcast(builder.gep(a.data, [offset]), elem.as_pointer())


def _fn(builder, name, ret, args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


class _Ops:
    """The LLVM declarations one kernel body uses, and the one block step they share."""

    def __init__(self, builder):
        self.b = builder
        self.i8v, self.i16v, self.i32v = (ir.VectorType(ir.IntType(b), n) for b, n in ((8, 32), (16, 16), (32, 8)))
        self.f32v = ir.VectorType(ir.FloatType(), 8)
        i8v, i16v, i32v, f32v = self.i8v, self.i16v, self.i32v, self.f32v
        self.absb = _fn(builder, "llvm.abs.v32i8", i8v, [i8v, ir.IntType(1)])
        self.sign = _fn(builder, "llvm.x86.avx2.psign.b", i8v, [i8v, i8v])
        self.maddubs = _fn(builder, "llvm.x86.avx2.pmadd.ub.sw", i16v, [i8v, i8v])
        self.maddwd = _fn(builder, "llvm.x86.avx2.pmadd.wd", i32v, [i16v, i16v])
        self.fma = _fn(builder, "llvm.fma.v8f32", f32v, [f32v, f32v, f32v])
        self.ones = ir.Constant(i16v, [1] * 16)

    def load(self, p, off):
        return self.b.load(self.b.bitcast(self.b.gep(p, [off]), self.i8v.as_pointer()), align=1)

    def unsigned(self, w):
        return self.b.call(self.absb, [w, ir.Constant(ir.IntType(1), 0)])  # |−128| = 128 read unsigned

    def dot32(self, aw, w, x):
        """8 int32 partial sums of Σ w·x over 32 bytes: |w| (unsigned) × x with w's sign."""
        return self.b.call(self.maddwd, [self.b.call(self.maddubs, [aw, self.b.call(self.sign, [x, w])]), self.ones])

    def splat(self, v):
        i32 = ir.IntType(32)
        u = self.b.insert_element(ir.Constant(self.f32v, ir.Undefined), v, ir.Constant(i32, 0))
        return self.b.shuffle_vector(u, ir.Constant(self.f32v, ir.Undefined), ir.Constant(self.i32v, [0] * 8))

    def hsum8(self, vs):
        """The eight lane sums of eight vectors, as one vector (pairwise adds of lane pairs, as
        ``vhaddps`` does, three levels deep): 9 shuffles and 7 adds where eight :meth:`hsum` take 56."""
        b = self.b
        m = lambda idx: ir.Constant(ir.VectorType(ir.IntType(32), len(idx)), idx)  # noqa: E731

        def hadd(x, y):  # [x0+x1, x2+x3, y0+y1, y2+y3 | the same for lanes 4..7]
            return b.fadd(b.shuffle_vector(x, y, m([0, 2, 8, 10, 4, 6, 12, 14])),
                          b.shuffle_vector(x, y, m([1, 3, 9, 11, 5, 7, 13, 15])))

        q0 = hadd(hadd(vs[0], vs[1]), hadd(vs[2], vs[3]))  # lanes k and k + 4: halves of sum k
        q1 = hadd(hadd(vs[4], vs[5]), hadd(vs[6], vs[7]))
        return b.fadd(b.shuffle_vector(q0, q1, m([0, 1, 2, 3, 8, 9, 10, 11])),
                      b.shuffle_vector(q0, q1, m([4, 5, 6, 7, 12, 13, 14, 15])))

    def hsum(self, v):
        lanes = [self.b.extract_element(v, ir.Constant(ir.IntType(32), i)) for i in range(8)]
        while len(lanes) > 1:  # pairwise: the same order on every call
            lanes = [self.b.fadd(lanes[i], lanes[i + 1]) for i in range(0, len(lanes), 2)]
        return lanes[0]


@intrinsic
def dot_q8_0(typingctx, w, w_off, ws, ws_off, x, x_off, xs, xs_off, n_blocks, per):
    """Σ_b ws.flat[ws_off + b] · xs.flat[xs_off + b] · Σ_{k < 32·per} w.flat[w_off + 32·per·b + k] ·
    x.flat[x_off + 32·per·b + k] over ``n_blocks`` blocks of ``per`` × 32 values: one row of int8
    weights against one row of int8 activations, both C-contiguous, scales float32. Within a block
    the sums stay int32 (exact below 2³¹: blocks up to 131k values); each block is converted once
    and scaled with one FMA. AVX2 only (see the module docstring)."""
    if not (isinstance(w, types.Array) and isinstance(x, types.Array) and w.dtype == types.int8
            and x.dtype == types.int8 and isinstance(ws, types.Array) and ws.dtype == types.float32
            and isinstance(xs, types.Array) and xs.dtype == types.float32):
        return None
    sig = types.float32(w, w_off, ws, ws_off, x, x_off, xs, xs_off, n_blocks, per)

    def codegen(context, builder, signature, args):
        if not HAS_AVX2:  # the same sums, portably (the intrinsics would not compile)
            return context.compile_internal(builder, lambda w, wo, ws, so, x, xo, xs, to, nb, per: dot_q8_0_portable(
                w, wo, ws, so, x, xo, xs, to, nb, BLOCK * per), signature, args)
        wa, wo, sa, so, xa, xo, ta, to, nb, per = args
        at = signature.args
        i64, f32 = ir.IntType(64), ir.FloatType()
        wo, so, xo, to, nb, per = (context.cast(builder, v, t, types.int64) for v, t in
                                   zip((wo, so, xo, to, nb, per), (at[1], at[3], at[5], at[7], at[8], at[9])))
        o = _Ops(builder)
        wp = _ptr(context, builder, at[0], wa, wo, ir.IntType(8))
        xp = _ptr(context, builder, at[4], xa, xo, ir.IntType(8))
        sp = _ptr(context, builder, at[2], sa, so, f32)
        tp = _ptr(context, builder, at[6], ta, to, f32)
        accs = [cgutils.alloca_once_value(builder, ir.Constant(o.f32v, [0.0] * 8)) for _ in range(2)]
        isum = cgutils.alloca_once(builder, o.i32v)

        def scaled(b, s, acc):  # acc += float(s) · ws[b] · xs[b]
            d = builder.fmul(builder.load(builder.gep(sp, [b])), builder.load(builder.gep(tp, [b])))
            builder.store(builder.call(o.fma, [builder.sitofp(s, o.f32v), o.splat(d), builder.load(acc)]), acc)

        def block32(b, acc):
            off = builder.mul(b, ir.Constant(i64, BLOCK))
            wv = o.load(wp, off)
            scaled(b, o.dot32(o.unsigned(wv), wv, o.load(xp, off)), acc)

        with builder.if_else(builder.icmp_unsigned("==", per, ir.Constant(i64, 1))) as (one, wide):
            with one:  # Q8_0: blocks of 32, two per iteration into two accumulators (FMA latency)
                with cgutils.for_range(builder, builder.udiv(nb, ir.Constant(i64, 2))) as loop:
                    b0 = builder.mul(loop.index, ir.Constant(i64, 2))
                    block32(b0, accs[0])
                    block32(builder.add(b0, ir.Constant(i64, 1)), accs[1])
                with builder.if_then(builder.icmp_unsigned("!=", builder.urem(nb, ir.Constant(i64, 2)),
                                                           ir.Constant(i64, 0))):
                    block32(builder.sub(nb, ir.Constant(i64, 1)), accs[0])
            with wide:  # per × 32 values per block: int32 sums within it, one conversion per block
                with cgutils.for_range(builder, nb) as blk:
                    b = blk.index
                    builder.store(ir.Constant(o.i32v, [0] * 8), isum)
                    with cgutils.for_range(builder, per) as ch:
                        off = builder.mul(builder.add(builder.mul(b, per), ch.index), ir.Constant(i64, BLOCK))
                        wv = o.load(wp, off)
                        builder.store(builder.add(builder.load(isum), o.dot32(o.unsigned(wv), wv, o.load(xp, off))),
                                      isum)
                    scaled(b, builder.load(isum), accs[0])
        return o.hsum(builder.fadd(builder.load(accs[0]), builder.load(accs[1])))

    return sig, codegen


def _tile(R: int, C: int):
    """An intrinsic ``tile(w, n0, x, m0, per, d, dm, y)``: y[m0 + i, n0 + j] for i < R, j < C, each a
    ``dot_q8_0`` of token row m0 + i against weight row n0 + j — the prefill microkernel, whose
    scale products ``d[b, j, dm + i] = xs[m0 + i, b] · ws[n0 + j, b]`` come precomputed (:func:`scales`).
    One pass over the blocks serves the R × C outputs: each weight vector is loaded and made
    unsigned once for R tokens, each activation vector loaded once for C rows, and each output's
    block sum is converted and added (one FMA) as soon as it is made, so that only the R·C float
    accumulators stay live across the loop (R·C + 2C + 3 of AVX2's 16 registers). Blocks of
    ``per`` × 32 values (``per`` > 1: w8a8's one block per row) keep int32 sums within the block."""

    @intrinsic
    def tile(typingctx, w, n0, x, m0, per, d, dm, y):
        if not (isinstance(w, types.Array) and w.dtype == types.int8 and isinstance(x, types.Array)
                and x.dtype == types.int8 and isinstance(y, types.Array) and y.dtype == types.float32):
            return None
        sig = types.void(w, n0, x, m0, per, d, dm, y)

        def codegen(context, builder, signature, args):
            if not HAS_AVX2:  # portably, output by output (the intrinsics would not compile)
                return context.compile_internal(builder, _portable_tile(R, C), signature, args)
            wa, n0v, xa, m0v, per, da, dm, ya = args
            at = signature.args
            i64, f32 = ir.IntType(64), ir.FloatType()
            n0v, m0v, per, dm = (context.cast(builder, v, t, types.int64) for v, t in
                                 zip((n0v, m0v, per, dm), (at[1], at[3], at[4], at[6])))
            K = cgutils.unpack_tuple(builder, context.make_array(at[0])(context, builder, wa).shape)[1]
            N = cgutils.unpack_tuple(builder, context.make_array(at[7])(context, builder, ya).shape)[1]
            MB = cgutils.unpack_tuple(builder, context.make_array(at[5])(context, builder, da).shape)[2]
            dstride = builder.mul(MB, ir.Constant(i64, C))
            G = builder.udiv(K, builder.mul(per, ir.Constant(i64, BLOCK)))
            c = lambda v: ir.Constant(i64, v)  # noqa: E731
            o = _Ops(builder)
            wrow = [_ptr(context, builder, at[0], wa, builder.mul(builder.add(n0v, c(j)), K), ir.IntType(8))
                    for j in range(C)]
            xrow = [_ptr(context, builder, at[2], xa, builder.mul(builder.add(m0v, c(i)), K), ir.IntType(8))
                    for i in range(R)]
            drow = [[_ptr(context, builder, at[5], da, builder.add(builder.mul(c(j), MB), builder.add(dm, c(i))), f32)
                     for j in range(C)] for i in range(R)]
            accs = [[cgutils.alloca_once_value(builder, ir.Constant(o.f32v, [0.0] * 8)) for _ in range(C)]
                    for _ in range(R)]
            isums = [[cgutils.alloca_once(builder, o.i32v) for _ in range(C)] for _ in range(R)]

            def scaled(i, j, b, s):  # accs[i][j] += float(s) · d[i·C + j, b]: one convert, one FMA
                a = accs[i][j]
                f = o.splat(builder.load(builder.gep(drow[i][j], [builder.mul(b, dstride)])))
                builder.store(builder.call(o.fma, [builder.sitofp(s, o.f32v), f, builder.load(a)]), a)

            with builder.if_else(builder.icmp_unsigned("==", per, c(1))) as (one, wide):
                with one:  # Q8_0: each output's block sum converted and accumulated at once
                    with cgutils.for_range(builder, G) as blk:
                        b = blk.index
                        off = builder.mul(b, c(BLOCK))
                        wv = [o.load(wrow[j], off) for j in range(C)]
                        aw = [o.unsigned(v) for v in wv]
                        for i in range(R):
                            xv = o.load(xrow[i], off)
                            for j in range(C):
                                scaled(i, j, b, o.dot32(aw[j], wv[j], xv))
                with wide:  # int32 sums across each block of per × 32 values, scaled once a block
                    with cgutils.for_range(builder, G) as blk:
                        b = blk.index
                        for row in isums:
                            for p in row:
                                builder.store(ir.Constant(o.i32v, [0] * 8), p)
                        with cgutils.for_range(builder, per) as ch:
                            off = builder.mul(builder.add(builder.mul(b, per), ch.index), c(BLOCK))
                            wv = [o.load(wrow[j], off) for j in range(C)]
                            aw = [o.unsigned(v) for v in wv]
                            for i in range(R):
                                xv = o.load(xrow[i], off)
                                for j in range(C):
                                    p = isums[i][j]
                                    builder.store(builder.add(builder.load(p), o.dot32(aw[j], wv[j], xv)), p)
                        for i in range(R):
                            for j in range(C):
                                scaled(i, j, b, builder.load(isums[i][j]))
            flat = [builder.load(a) for row in accs for a in row]
            if len(flat) == 8:  # eight sums at once (a tile of small K spends much of its time here)
                sums = o.hsum8(flat)
                for i in range(R):
                    yo = builder.add(builder.mul(builder.add(m0v, c(i)), N), n0v)
                    part = builder.shuffle_vector(sums, sums, ir.Constant(ir.VectorType(ir.IntType(32), C),
                                                                          list(range(i * C, i * C + C))))
                    yp = builder.bitcast(_ptr(context, builder, at[7], ya, yo, f32), part.type.as_pointer())
                    builder.store(part, yp, align=4)
            else:
                for i in range(R):
                    for j in range(C):
                        yo = builder.add(builder.mul(builder.add(m0v, c(i)), N), builder.add(n0v, c(j)))
                        builder.store(o.hsum(flat[i * C + j]), _ptr(context, builder, at[7], ya, yo, f32))
            return context.get_dummy_value()

        return sig, codegen

    return tile


@numba.njit(cache=True, nogil=True, error_model="numpy", fastmath=FASTMATH)
def scales(ws_t, n0, xs_t, m_lo, m_hi, d):
    """d[b, j, i − m_lo] = xs_t[b, i] · ws_t[b, n0 + j] for the tokens m_lo ≤ i < m_hi and the d.shape[1]
    weight rows from n0: the scale products of a column of tiles, so that the microkernel spends
    one FMA (of a broadcast load) per block and output. Both scales come transposed (blocks, rows):
    the inner loop runs along the tokens, long and contiguous."""
    n = m_hi - m_lo
    for b in range(d.shape[0]):
        xr = xs_t[b, m_lo:m_hi]
        for j in range(d.shape[1]):
            sw = ws_t[b, n0 + j]
            dr = d[b, j]
            for i in range(n):  # indices from 0: no wraparound test, so the loop vectorises
                dr[i] = xr[i] * sw


TILE_R, TILE_C = 4, 2
tile_q8_0 = _tile(TILE_R, TILE_C)


def _portable_tile(R: int, C: int):
    def tile(w, n0, x, m0, per, d, dm, y):
        K = w.shape[1]
        G = K // (BLOCK * per)
        for i in range(R):
            for j in range(C):
                acc = np.float32(0.0)
                for b in range(G):
                    s = 0.0
                    o = b * BLOCK * per
                    for k in range(BLOCK * per):
                        s += np.float64(w[n0 + j, o + k]) * np.float64(x[m0 + i, o + k])
                    acc += np.float32(s) * d[b, j, dm + i]
                y[m0 + i, n0 + j] = acc
    return tile


@numba.njit(cache=True, nogil=True, error_model="numpy", fastmath=FASTMATH)
def dot_q8_0_portable(w, w_off, ws, ws_off, x, x_off, xs, xs_off, n_blocks, block):
    """:func:`dot_q8_0` for any CPU and any block size: the same exact integer block sums, taken
    in float64 — every product and partial sum is an integer below 2⁵³, so any order (the
    vectoriser's) gives the exact sum, and LLVM vectorises the loop with whatever the target has
    (numba's integer products widen to int64, which it does not) — scaled in float32."""
    wf = w.reshape(-1)
    xf = x.reshape(-1)
    sf = ws.reshape(-1)
    tf = xs.reshape(-1)
    acc = np.float32(0.0)
    for b in range(n_blocks):
        s = 0.0
        o = b * block
        for k in range(block):
            s += np.float64(wf[w_off + o + k]) * np.float64(xf[x_off + o + k])
        acc += np.float32(s) * (sf[ws_off + b] * tf[xs_off + b])
    return acc


def _quantize_rows(x, block, q, s):
    """The spec's ``quantize_act_blocks`` for float32 rows x (M, K): q (M, K) int8 and s
    (M, K / block) float32. No fastmath: x / s must round exactly as NumPy's division does (a
    reciprocal multiply could move a value across a rounding boundary). The block maximum of |x|
    is taken on the bit patterns (sign bit cleared): for floats ≥ 0 integer order is float order
    and any NaN is above inf, so it propagates as in NumPy's max, and an integer maximum
    vectorises where a float one needs fastmath. Parallel over rows."""
    M, K = x.shape
    bits = x.view(np.int32)
    for m in prange(M):
        for g in range(K // block):
            xb = x[m, g * block:(g + 1) * block]  # slices indexed from 0: no wraparound test, so the
            bb = bits[m, g * block:(g + 1) * block]  # loops vectorise (6 cycles a value without)
            qb = q[m, g * block:(g + 1) * block]
            mb = np.int32(0)
            for k in range(block):
                mb = max(mb, bb[k] & np.int32(0x7FFFFFFF))
            mx = _f32_from_bits(np.int32(mb))
            sc = mx / np.float32(127.0) if mx > 0 else np.float32(1.0)
            s[m, g] = sc
            for k in range(block):
                qb[k] = np.int8(min(max(np.rint(xb[k] / sc), np.float32(-127.0)), np.float32(127.0)))


_QUANT = kernel(_quantize_rows, fastmath=False)
# values of x from which the quantizer runs on every thread: waking the pool costs ~35-50 µs, and one
# thread quantizes 64k values in ~12 µs (128 x 512 took 53 µs parallel, quiet Zen 5 host)
PARALLEL_ROWS_MIN = 1 << 19


def quantize_act_blocks(x, block, q, s):
    """q, s = the spec's quantize_act_blocks(x, block) for float32 x (M, K), written in place."""
    _QUANT[0 if x.size >= PARALLEL_ROWS_MIN else 1](x, block, q, s)
