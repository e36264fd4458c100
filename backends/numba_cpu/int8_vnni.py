"""Q8_0 and W8A8 prefill (``linear_q8_0``, many tokens) with AVX-512 VNNI's ``vpdpbusd``.

Why another kernel: int8_simd.py's AVX2 microkernel spends five instructions per block of 32
values and output (sign, two 8-bit multiply-adds, a conversion, an FMA), so Q8_0 prefill only
ties float32 BLAS. ``vpdpbusd`` does 64 u8 × s8 products and their sums by fours into 16 int32
lanes in one instruction, without int16 saturation. Two layout choices take the rest away:

* **One block per lane.** Weights and activations are stored *interleaved* (:func:`interleave`):
  a group of 16 blocks of 32 bytes is 512 bytes, and its c-th 64-byte vector holds bytes 4c..4c+3
  of each of the 16 blocks, block L in lane L. Eight ``vpdpbusd`` over a group then leave block
  L's whole integer sum in lane L — no horizontal sums — and one conversion and one FMA, with the
  16 blocks' scale products (``xs · ws``, one multiply of two vector loads), apply all 16 scales.
  Per 512 values and output: 8 + 3 instructions, where AVX2 takes 80. The blocks after the last
  whole group take one group of 4 (128-bit registers), 8 (256-bit) or 16 (:func:`padded_blocks`),
  padded with zero weights and zero scales. Rows below MIN_K values (a single group of 4) stay on
  the AVX2 kernel, which is faster there.
* **Unsigned activations.** ``vpdpbusd`` multiplies unsigned by signed bytes. The activations
  (int8 in [−127, 127] by the spec) are stored as x + 128 (x XOR 0x80, in [1, 255]) and each
  weight block carries −128 · Σ w (:func:`compensation`), with which each group's sums start:
  Σ (x + 128) w − 128 Σ w = Σ x w, exactly (every partial sum is below 2²⁰).

One block per row (W8A8) keeps int32 sums across all groups and scales once at the end. The
weights are interleaved once per weight array and kept (:func:`packed`) — as ONNX Runtime prepacks
its constant initializers — so the array is made read-only: a later write raises instead of
leaving a stale copy to be multiplied. Activations are interleaved per call (M · K bytes, against
M · N · K multiply-adds).

Measured (benchmarks/results/int8_prefill.md, one core, 128 tokens): 2–5x OpenBLAS's float32
GEMM and 1.5–3x the AVX2 microkernel on GPT-2's and MiniLM's shapes.

Only compiled where the CPU numba targets has AVX-512 F, BW, VL and VNNI (:data:`HAS_VNNI`); the
AVX2 kernel runs elsewhere. Decode (a few tokens) keeps int8_simd.py's streaming kernel: it reads each
weight once, and memory, not arithmetic, bounds it.
"""
from __future__ import annotations

import threading
import weakref

import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._jit import kernel
from .int8_simd import BLOCK, _fn, _Ops, _ptr, target_has

HAS_VNNI = target_has("avx512f", "avx512bw", "avx512vl", "avx512vnni")
LANES = 16                # int32 lanes of a 512-bit register: blocks per full group
# tokens × weight rows of the microkernel (2·R·C + C + 1 of 32 registers). One core, 128 tokens, GFLOP/s
# of 4 x 2 / 4 x 3 / 6 x 2 / 3 x 4 (Q8_0): 241/239/236/267 at K 768, N 3072; 330/355/331/384 at
# 3072 x 768; 180/173/173/167 at 384 x 1536; one block per row at 3072 x 768: 389/480/417/603.
TILE_R, TILE_C = 3, 4


def padded_blocks(g: int) -> int:
    """Blocks of 32 in an interleaved row of ``g`` blocks: whole groups of 16, then the rest in one
    group of 4 lanes (128-bit registers), 8 (256-bit) or 16, padded. A group takes 8 ``vpdpbusd``
    whatever its width, so a rest of 9–12 blocks is cheaper as one padded group of 16 than as 8 + 4
    (K = 384: 190 → 235 GFLOP/s on one core); K = 768 is 16 + 8, K = 128 one group of 4."""
    r = g % LANES
    return g - r + (0 if r == 0 else 4 if r <= 4 else 8 if r <= 8 else LANES)


def padded(k: int) -> int:
    """Bytes of an interleaved row of ``k`` values."""
    return padded_blocks(k // BLOCK) * BLOCK


def _interleave(src, flip, dst):
    """Per group of W lanes from block B: word c of block B + L (bytes 4c..4c+3) goes to word
    8B + W·c + L of the row, XOR flip; past the last block, flip. Rows as uint32 words. Groups:
    whole 16s, then one of 8 or 4."""
    M, K = src.shape
    G = K // 8  # blocks of 8 words
    gp = dst.shape[1] // 8
    rest = gp % LANES
    for m in prange(M):
        s = src[m]
        d = dst[m]
        B = 0
        while B < gp:
            W = LANES if B + LANES <= gp - rest else (8 if B == gp - rest and rest >= 8 else 4)
            for c in range(8):
                o = 8 * B + W * c
                for lane in range(W):
                    b = B + lane
                    d[o + lane] = (s[8 * b + c] ^ flip) if b < G else flip
            B += W


_INTERLEAVE = kernel(_interleave, fastmath=False)
PARALLEL_WORDS = 1 << 17  # 4-byte words from which interleaving wakes the pool (as the quantizer)


def interleave(src: np.ndarray, flip: int) -> np.ndarray:
    """``src`` (M, K) bytes in the group layout (module docstring), each XOR ``flip`` (0x80: the
    activations' x + 128), rows padded to whole groups with ``flip``."""
    src = np.ascontiguousarray(src).view(np.uint32)
    dst = np.empty((src.shape[0], padded(4 * src.shape[1])), np.uint8)
    _INTERLEAVE[0 if src.size >= PARALLEL_WORDS else 1](src, np.uint32(flip * 0x01010101), dst.view(np.uint32))
    return dst


def compensation(w: np.ndarray) -> np.ndarray:
    """−128 · Σ of each block of 32 weights (N, padded blocks) int32, zero past the last block: the
    start of each lane's sum, which cancels the activations' +128."""
    N, K = w.shape
    c = np.zeros((N, padded_blocks(K // BLOCK)), np.int32)
    c[:, :K // BLOCK] = -128 * w.reshape(N, K // BLOCK, BLOCK).sum(axis=2, dtype=np.int32)
    return c


def pad_scales(s: np.ndarray, block: int) -> np.ndarray:
    """Block scales (rows, K / 32) widened to the padded blocks with zeros; one block per row stays (rows, 1)."""
    s = np.ascontiguousarray(s, np.float32)
    if block != BLOCK:
        return s
    out = np.zeros((s.shape[0], padded_blocks(s.shape[1])), np.float32)
    out[:, :s.shape[1]] = s
    return out


_packs: dict[int, tuple[weakref.ref, int, tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
_lock = threading.Lock()


def packed(w: np.ndarray, scale: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(interleaved w, its compensation, padded scales) of weights ``w`` (N, K) int8, made once per
    array and kept while it lives. The array is made read-only (a write would otherwise leave the
    copy stale); one that does not own its memory, whose base could still change, is packed anew
    on every call."""
    make = lambda: (interleave(w, 0), compensation(w), pad_scales(scale, block))  # noqa: E731
    if w.base is not None:
        return make()
    key = id(w)
    with _lock:
        hit = _packs.get(key)
        if hit is not None and hit[0]() is w and hit[1] == block:
            return hit[2]
    value = make()
    w.flags.writeable = False
    with _lock:
        _packs[key] = (weakref.ref(w, lambda _r, key=key: _packs.pop(key, None)), block, value)
    return value


def _splat(builder, v, ty):
    u = builder.insert_element(ir.Constant(ty, ir.Undefined), v, ir.Constant(ir.IntType(32), 0))
    zeros = ir.Constant(ir.VectorType(ir.IntType(32), ty.count), [0] * ty.count)
    return builder.shuffle_vector(u, ir.Constant(ty, ir.Undefined), zeros)


def _halves(builder, v, add):
    """The low half of ``v`` plus its high half: a vector of half the lanes."""
    n = v.type.count // 2
    idx = lambda k: ir.Constant(ir.VectorType(ir.IntType(32), n), list(range(k, k + n)))  # noqa: E731
    return add(builder.shuffle_vector(v, v, idx(0)), builder.shuffle_vector(v, v, idx(n)))


def _widen(builder, v):
    """A 4-lane vector as 8 lanes, the upper four zero."""
    zero = ir.Constant(v.type, [0] * 4 if isinstance(v.type.element, ir.IntType) else [0.0] * 4)
    return builder.shuffle_vector(v, zero, ir.Constant(ir.VectorType(ir.IntType(32), 8), list(range(8))))


def _tile(R: int, C: int):
    """An intrinsic ``tile(wp, cp, ws, n0, xp, xs, m0, one, y)``: y[m0 + i, n0 + j] for i < R, j < C
    from interleaved weights ``wp`` (N, Kp) with compensation ``cp`` (N, Kp / 32) and interleaved
    activations ``xp`` (M, Kp) — Q8_0 (``one`` false: padded scales xs (M, Kp / 32), ws (N, Kp / 32))
    or one block per row (``one``: xs (M, 1), ws (N, 1)). Each weight vector is loaded once for R
    tokens, each activation vector once for C rows. The groups of 16 blocks run on 512-bit
    registers; their sums are folded to 8 lanes for a last group of 8 (256-bit), to which a last
    group of 4 (128-bit) is added; the R · C outputs' lanes are then summed together."""

    @intrinsic
    def tile(typingctx, wp, cp, ws, n0, xp, xs, m0, one, y):
        if not all(isinstance(a, types.Array) for a in (wp, cp, ws, xp, xs, y)):
            return None
        sig = types.void(wp, cp, ws, n0, xp, xs, m0, one, y)

        def codegen(context, builder, signature, args):
            wa, ca, sa, n0v, xa, ta, m0v, onev, ya = args
            at = signature.args
            i64, i32, f32 = ir.IntType(64), ir.IntType(32), ir.FloatType()
            c = lambda v: ir.Constant(i64, v)  # noqa: E731
            n0v, m0v = (context.cast(builder, v, t, types.int64) for v, t in ((n0v, at[3]), (m0v, at[6])))
            def shape(k, a):
                return cgutils.unpack_tuple(builder, context.make_array(at[k])(context, builder, a).shape)

            Kp = shape(0, wa)[1]
            Gp = shape(1, ca)[1]
            N = shape(8, ya)[1]
            GS = shape(2, sa)[1]  # scale columns: Gp, or 1 for one block per row
            is_one = builder.icmp_unsigned("!=", context.cast(builder, onev, at[7], types.int64), c(0))
            wrow = [builder.mul(builder.add(n0v, c(j)), Kp) for j in range(C)]
            xrow = [builder.mul(builder.add(m0v, c(i)), Kp) for i in range(R)]
            crow = [builder.mul(builder.add(n0v, c(j)), Gp) for j in range(C)]
            srow_w = [builder.mul(builder.add(n0v, c(j)), GS) for j in range(C)]
            srow_x = [builder.mul(builder.add(m0v, c(i)), GS) for i in range(R)]

            def vec(k, a, off, ty):  # a vector load at a.flat[off]
                return builder.load(_ptr(context, builder, at[k], a, off, ty), align=1)

            def accs(W):  # R × C float and int32 accumulators of W lanes, zero
                fv, iv = ir.VectorType(f32, W), ir.VectorType(i32, W)
                def zeros(v):
                    return [[cgutils.alloca_once_value(builder, v) for _ in range(C)] for _ in range(R)]
                return zeros(ir.Constant(fv, [0.0] * W)), zeros(ir.Constant(iv, [0] * W))

            def group(W, B, facc, sacc):
                """The group of W blocks from block B (an i64 value): 8 vpdpbusd per output from the
                compensation, then the sums carried (one block per row) or scaled into facc."""
                fv, iv = ir.VectorType(f32, W), ir.VectorType(i32, W)
                dp = _fn(builder, f"llvm.x86.avx512.vpdpbusd.{32 * W}", iv, [iv, iv, iv])
                fma = _fn(builder, f"llvm.fma.v{W}f32", fv, [fv, fv, fv])
                cv = [vec(1, ca, builder.add(crow[j], B), iv) for j in range(C)]
                t = [[builder.select(is_one, builder.add(builder.load(sacc[i][j]), cv[j]), cv[j]) for j in range(C)]
                     for i in range(R)]
                base = builder.mul(B, c(BLOCK))
                for ch in range(BLOCK // 4):
                    off = builder.add(base, c(ch * 4 * W))
                    wv = [vec(0, wa, builder.add(wrow[j], off), iv) for j in range(C)]
                    for i in range(R):
                        xv = vec(4, xa, builder.add(xrow[i], off), iv)
                        t[i] = [builder.call(dp, [t[i][j], xv, wv[j]]) for j in range(C)]
                with builder.if_else(is_one) as (whole_row, q8_0):
                    with whole_row:  # int32 sums carried to the next group
                        for i in range(R):
                            for j in range(C):
                                builder.store(t[i][j], sacc[i][j])
                    with q8_0:  # block L's sum in lane L: convert, scale by xs·ws, accumulate
                        wsv = [vec(2, sa, builder.add(srow_w[j], B), fv) for j in range(C)]
                        for i in range(R):
                            xsv = vec(5, ta, builder.add(srow_x[i], B), fv)
                            for j in range(C):
                                a = facc[i][j]
                                builder.store(builder.call(fma, [builder.sitofp(t[i][j], fv), builder.fmul(xsv, wsv[j]),
                                                                 builder.load(a)]), a)

            rest = builder.urem(Gp, c(LANES))
            f16, s16 = accs(LANES)
            with cgutils.for_range(builder, builder.udiv(Gp, c(LANES))) as grp:
                group(LANES, builder.mul(grp.index, c(LANES)), f16, s16)
            f8, s8 = accs(8)
            for i in range(R):
                for j in range(C):
                    builder.store(_halves(builder, builder.load(f16[i][j]), builder.fadd), f8[i][j])
                    builder.store(_halves(builder, builder.load(s16[i][j]), builder.add), s8[i][j])
            tail = builder.sub(Gp, rest)
            with builder.if_then(builder.icmp_unsigned(">=", rest, c(8))):
                group(8, tail, f8, s8)
            with builder.if_then(builder.icmp_unsigned("==", builder.urem(rest, c(8)), c(4))):
                f4, s4 = accs(4)
                group(4, builder.add(tail, builder.and_(rest, c(8))), f4, s4)
                for i in range(R):
                    for j in range(C):
                        for acc8, acc4, add in ((f8, f4, builder.fadd), (s8, s4, builder.add)):
                            a8 = acc8[i][j]
                            builder.store(add(builder.load(a8), _widen(builder, builder.load(acc4[i][j]))), a8)

            with builder.if_then(is_one):  # one block per row: the int32 sums, scaled once
                f8v = ir.VectorType(f32, 8)
                for i in range(R):
                    xs0 = builder.load(_ptr(context, builder, at[5], ta, srow_x[i], f32))
                    for j in range(C):
                        ws0 = builder.load(_ptr(context, builder, at[2], sa, srow_w[j], f32))
                        builder.store(builder.fmul(builder.sitofp(builder.load(s8[i][j]), f8v),
                                                   _splat(builder, builder.fmul(xs0, ws0), f8v)), f8[i][j])
            ops = _Ops(builder)
            flat = [builder.load(a) for row in f8 for a in row]
            if len(flat) == 1:
                sums = [ops.hsum(flat[0])]
            else:  # eight outputs' lane sums at once, pairwise, the same order every call
                zero = ir.Constant(flat[0].type, [0.0] * 8)
                sums = []
                for k in range(0, len(flat), 8):
                    part = flat[k:k + 8]
                    both = ops.hsum8(part + [zero] * (8 - len(part)))
                    sums += [builder.extract_element(both, ir.Constant(i32, q)) for q in range(len(part))]
            for i in range(R):
                for j in range(C):
                    yo = builder.add(builder.mul(builder.add(m0v, c(i)), N), builder.add(n0v, c(j)))
                    builder.store(sums[i * C + j], _ptr(context, builder, at[8], ya, yo, f32))
            return context.get_dummy_value()

        return sig, codegen

    return tile


_T_RC, _T_1C, _T_R1, _T_11 = _tile(TILE_R, TILE_C), _tile(1, TILE_C), _tile(TILE_R, 1), _tile(1, 1)
MIN_K = 8 * BLOCK
CHUNK_M = 64   # tokens per chunk (the 16 weight rows of a chunk stay in cache while they pass)


def _rows(wp, cp, ws, xp, xs, one, y):
    """y = the product of every token with every weight row, in chunks of 16 rows × CHUNK_M tokens
    handed to the threads (rows varying fastest), tiles inside a chunk, edges by smaller tiles."""
    M, N = y.shape
    nn = (N + 15) // 16
    nm = (M + CHUNK_M - 1) // CHUNK_M
    for t in prange(nn * nm):
        n_lo = (t % nn) * 16
        n_hi = min(N, n_lo + 16)
        m_lo = (t // nn) * CHUNK_M
        m_hi = min(M, m_lo + CHUNK_M)
        n = n_lo
        while n + TILE_C <= n_hi:
            m = m_lo
            while m + TILE_R <= m_hi:
                _T_RC(wp, cp, ws, n, xp, xs, m, one, y)
                m += TILE_R
            while m < m_hi:
                _T_1C(wp, cp, ws, n, xp, xs, m, one, y)
                m += 1
            n += TILE_C
        while n < n_hi:
            m = m_lo
            while m + TILE_R <= m_hi:
                _T_R1(wp, cp, ws, n, xp, xs, m, one, y)
                m += TILE_R
            while m < m_hi:
                _T_11(wp, cp, ws, n, xp, xs, m, one, y)
                m += 1
            n += 1


ROWS = kernel(_rows)


def supports(K: int, block: int) -> bool:
    """Whether the VNNI kernel computes ``linear_q8_0`` with this block: Q8_0's 32, or one block per
    row of whole 32-byte chunks, in rows of at least MIN_K values (below, one group of 4 lanes a
    row, the tile's fixed cost outweighs its gain: 128 × 128 × 512 took 263 µs against AVX2's 167;
    at K = 256, 221 against 232)."""
    return HAS_VNNI and K % BLOCK == 0 and K >= MIN_K and block in (BLOCK, K)
