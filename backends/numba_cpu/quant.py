"""Quantized ops on the numba backend: computed from the packed weights, never dequantized whole.

Specs: minitx/ops/quant.py. Decode at batch 1 is memory-bound — each step reads every weight once —
so reading int8 (1 byte) or packed int4 (½ byte) instead of float32 (4 bytes) is the speed-up,
provided the kernel keeps up with memory. The quant plugin stores int8 and int4 weights
``transposed`` (out, in): each output channel is then one contiguous dot product, int8 (or a byte
of two nibbles) widened to float32 in registers, one float32 accumulator per row and output, the
per-channel / per-group scale applied once per channel / group; threads split the output channels,
and each prefetches the rows it will read next (``_jit.prefetch``), which brought the int8 LM head
level with OpenBLAS's float32 GEMV (benchmarks/results/quant_decode_cpu.md).
(The (in, out) layout — int8 blocks, and int8 / 16-bit files from before the plugin transposed
them — is streamed row by row into per-thread column accumulators: correct, but it moves every
accumulator through cache once per input row; int4 in that layout takes the BLAS path.) With
many rows (prefill) the work is compute-bound: tiles of the packed matrix are dequantized into a
small float buffer and multiplied with BLAS, so no full float copy of W ever exists — except
``linear_q8_0`` (int8 weights × int8 activations), whose integer kernel runs at every size.

Also here: the int8 / int4 embedding lookups (only the looked-up rows are widened), float16 and
bfloat16 weights (``linear_cast``, widened per row slice in registers), and attention over an int8
KV cache (``attention_kv8``: scores and values read straight from the int8 cache, scaled per
token and head by attention.py's kernel; the cache grows in place like the float one, see kvcache.py).
"""
from __future__ import annotations

import numba
import numpy as np
from numba import prange

from minitx import threads
from minitx.ops import quant as spec

from ._jit import FASTMATH, kernel, pick, prefetch
from . import int8_vnni as vnni
from . import sgemm
from .int8_simd import BLOCK, TILE_C, TILE_R, dot_q8_0, dot_q8_0_portable, quantize_act_blocks, scales, tile_q8_0
from ._vmath import widen
from .attention import sdpa
from .kvcache import append
from .linalg import SLAB_MIN, SPLIT_ROWS, slabs

SKINNY_MAX_ROWS = 8
AHEAD = 4  # rows of a streamed (out, in) weight prefetched ahead of the one being read
TILE = 256  # input rows dequantized at a time on the BLAS path
CHUNK_M = 64  # tokens per chunk of _q8_0_rows (its 16 weight rows stay in cache while they pass)
PREFILL_CHUNKS = 8  # _q8_0_rows's chunks per hand-out to a thread at prefill

UNSCALED = np.empty((0, 0), np.float32)  # _cols_stream's "no group scales"


def _block(n: int) -> int:
    per = -(-n // max(1, numba.get_num_threads()))
    return int(min(2048, max(64, -(-per // 64) * 64)))


def _prefill(pair, rows: int, weights: int):
    """The parallel build where float32's ``linear`` splits the same product into tasks (from
    SPLIT_ROWS rows and two slabs of SLAB_MIN multiply-adds), else the serial one: with the general
    PARALLEL_MIN (2^24) the bundled model's 128 x 128 x 384 ran on one core against float32's two,
    and its int8 prefill at 4 x 32 was 0.91x fp32."""
    return pick(pair, rows * weights if rows >= SPLIT_ROWS else 0, 2 * SLAB_MIN)


@numba.njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy")
def _add_scaled(acc, part, sg):
    """acc[m·n + j] += part[m·n + j]·sg[j] for every row m: a group's partial sums, scaled once."""
    n = sg.size
    for m in range(acc.size // n):
        a = acc[m * n:(m + 1) * n]
        p = part[m * n:(m + 1) * n]
        for j in range(n):
            a[j] += p[j] * sg[j]


@numba.njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy")
def _store(y, acc, j0):
    """y[m, j0:j0+n] = the m-th row of the flat accumulator (n = len(acc) / rows of y)."""
    M = y.shape[0]
    n = acc.size // M
    for m in range(M):
        for j in range(n):
            y[m, j0 + j] = acc[m * n + j]


def _rows_dot(x, w, bf16, y):
    """y[m, n] = x[m, :] · float(w[n, :]) for a narrow weight (N, K) row-major — int8 (unscaled),
    or float16 / bfloat16 bits (``bf16``) — widened in registers (``_vmath.widen``); the row AHEAD
    rows on is prefetched while row n is read."""
    M, K = x.shape
    N = w.shape[0]
    for blk in prange((N + 63) // 64):
        for n in range(blk * 64, min(N, blk * 64 + 64)):
            for c in range(0, K, 32):  # every 64-byte line of a 16-bit row (an int8 row: twice)
                prefetch(w, (n + AHEAD) * K + c)
            wn = w[n]
            for m in range(M):
                xm = x[m]
                acc = np.float32(0.0)
                for k in range(K):
                    acc += xm[k] * widen(wn, k, bf16)
                y[m, n] = acc


def _q4_skinny_t(xe, xo, xsum, w, s, y, shift):
    """y[m, n] = Σ_k x[m, k] (q[n, k] − 8) s[n, k >> shift] for packed uint8 w (N, K/2): byte i of a
    row holds inputs 2i (low nibble) and 2i+1 (high), ``xe``/``xo`` are x's even / odd columns and
    each group spans 2^shift bytes. One long loop per row (a loop per group is too short to
    vectorise); nibbles are split in float arithmetic (numba's integer ops widen to int64, which
    AVX2 cannot convert to float in vectors), and the −8 offset is one term per group:
    −8 Σ_g s[n, g] xsum[m, g]."""
    M, Kh = xe.shape
    N = w.shape[0]
    G = xsum.shape[1]
    for blk in prange((N + 15) // 16):
        for n in range(blk * 16, min(N, blk * 16 + 16)):
            for c in range(0, Kh, 64):
                prefetch(w, (n + 2 * AHEAD) * Kh + c)
            wn = w[n]
            sn = s[n]
            for m in range(M):
                xm = xe[m]
                xq = xo[m]
                acc = np.float32(0.0)
                for i in range(Kh):
                    v = np.float32(wn[i])
                    hi = np.floor(v * np.float32(0.0625))
                    acc += (xm[i] * (v - np.float32(16.0) * hi) + xq[i] * hi) * sn[i >> shift]
                for g in range(G):
                    acc -= np.float32(8.0) * xsum[m, g] * sn[g]
                y[m, n] = acc


def _lut_skinny(x, w, table, s, group, y):
    """y[m, n] = Σ_g s[n, g] Σ_{k in g} x[m, k] level[code(n, k)] for packed codes w (N, K·bits/8):
    ``table[byte]`` holds the levels of a byte's 8/bits codes, so one byte load and one table row
    decode them all (no per-code shifts in the inner loop)."""
    M = x.shape[0]
    N, nb = w.shape
    per = table.shape[1]
    gb = group // per  # bytes per group
    for blk in prange((N + 15) // 16):
        for n in range(blk * 16, min(N, blk * 16 + 16)):
            for c in range(0, nb, 64):
                prefetch(w, (n + 2 * AHEAD) * nb + c)
            wn = w[n]
            sn = s[n]
            for m in range(M):
                xm = x[m]
                acc = np.float32(0.0)
                for g in range(nb // gb):
                    part = np.float32(0.0)
                    for i in range(g * gb, (g + 1) * gb):
                        t = table[wn[i]]
                        for j in range(per):
                            part += xm[i * per + j] * t[j]
                    acc += part * sn[g]
                y[m, n] = acc


def _embed_q8(ids, table, scale, out):
    for i in prange(ids.shape[0]):
        r = ids[i]
        sc = scale[r]
        for c in range(table.shape[1]):
            out[i, c] = np.float32(table[r, c]) * sc


def _embed_q4(ids, table, scale, out, group):
    for i in prange(ids.shape[0]):
        r = ids[i]
        for c2 in range(table.shape[1]):
            byte = np.int32(table[r, c2])
            sc = scale[r, (2 * c2) // group]
            out[i, 2 * c2] = np.float32((byte & 15) - 8) * sc
            out[i, 2 * c2 + 1] = np.float32((byte >> 4) - 8) * sc


def _cols_stream(x, w, bf16, s, group, y, block):
    """y = x @ (float(w) · s[k // group]) for a narrow weight (K, N) — int8, or float16 / bfloat16
    bits (``bf16``) — widened in registers (``_vmath.widen``) and streamed row by row into
    per-thread column accumulators, parallel over column blocks. ``s`` (K / group, N) scales each
    group's partial sums once (int8 blocks); an empty ``s`` means unscaled (one group: K)."""
    M, K = x.shape
    N = w.shape[1]
    for blk in prange((N + block - 1) // block):
        j0 = blk * block
        j1 = min(N, j0 + block)
        n = j1 - j0
        acc = np.zeros(M * n, np.float32)
        part = np.zeros(M * n, np.float32)
        for g in range(K // group):
            part[:] = 0.0
            for k in range(g * group, (g + 1) * group):
                wk = w[k, j0:j1]
                for m in range(M):
                    xv = x[m, k]
                    p = part[m * n:(m + 1) * n]
                    for j in range(n):
                        p[j] += xv * widen(wk, j, bf16)
            if s.size:
                _add_scaled(acc, part, s[g, j0:j1])
            else:
                acc += part
        _store(y, acc, j0)


def _q8_0_rows(xq, xs, w, ws, block, simd, y):
    """y[m, n] = Σ_g xs[m, g] ws[n, g] Σ_{k in g} xq[m, k] w[n, k] (``linear_q8_0``): int8
    activations (M, K) and weights (N, K), one exact integer sum per block (int8_simd.py: AVX2's
    8-bit multiply-adds when ``simd`` and the block is a multiple of 32, else the portable loop). Threads
    split chunks of 16 output rows × CHUNK_M tokens, the rows varying fastest: a chunk of tokens
    stays in cache while every weight row passes it (with the tokens varying fastest, all the
    tokens passed every 16 rows: 0.56x of float32's speed at 4096 × 384 × 1536, from L3). Decode (few tokens) streams each weight row once,
    prefetched AHEAD rows before it is read; prefill runs the TILE_R × TILE_C microkernel over each
    chunk, whose 16 weight rows stay in cache while its tokens pass them, with the scale products
    of each column of tiles computed first (``scales``, on transposed scales)."""
    M, K = xq.shape
    N = w.shape[0]
    G = K // block
    per = block // BLOCK
    wide = simd and block % BLOCK == 0
    tiled = wide and M >= TILE_R
    nm = (M + CHUNK_M - 1) // CHUNK_M
    if tiled:
        xs_t = np.ascontiguousarray(xs.T)
        ws_t = np.ascontiguousarray(ws.T)
    else:
        xs_t = ws_t = xs[:0]
    nn = (N + 15) // 16
    for t in prange(nn * nm):
        n_lo = (t % nn) * 16
        n_hi = min(N, n_lo + 16)
        m_lo = (t // nn) * CHUNK_M
        m_hi = min(M, m_lo + CHUNK_M)
        n = n_lo
        if tiled:
            d = np.empty((G, TILE_C, m_hi - m_lo), np.float32)
            while n + TILE_C <= n_hi:
                scales(ws_t, n, xs_t, m_lo, m_hi, d)
                m = m_lo
                while m + TILE_R <= m_hi:
                    tile_q8_0(w, n, xq, m, per, d, m - m_lo, y)
                    m += TILE_R
                for r in range(m, m_hi):
                    for j in range(n, n + TILE_C):
                        y[r, j] = dot_q8_0(w, j * K, ws, j * G, xq, r * K, xs, r * G, G, per)
                n += TILE_C
        for j in range(n, n_hi):
            if m_lo == 0:
                for c in range(0, K, 64):
                    prefetch(w, (j + AHEAD) * K + c)
            for r in range(m_lo, m_hi):
                if wide:
                    y[r, j] = dot_q8_0(w, j * K, ws, j * G, xq, r * K, xs, r * G, G, per)
                else:
                    y[r, j] = dot_q8_0_portable(w, j * K, ws, j * G, xq, r * K, xs, r * G, G, block)


_ROWS_DOT = kernel(_rows_dot)
_Q8_0 = kernel(_q8_0_rows)
_Q4T = kernel(_q4_skinny_t)
_LUT = kernel(_lut_skinny)
_EMB8 = kernel(_embed_q8)
_EMB4 = kernel(_embed_q4)
_COLS = kernel(_cols_stream)


# These kernels stream the packed weights in place of BLAS, so unlike the float kernels they want
# every core from small sizes on: memory bandwidth needs more than one thread, and unpacking int4
# is arithmetic (GPT-2-small int4 decode: 54 tok/s from 2^15, 40 from 2^22, quiet Zen 5 host).
STREAMING_MIN = 1 << 15
# Q8_0's integer dot products are cheap per byte, so one core keeps up with its share of memory
# below this many weight elements (times rows), and waking the pool (~35 µs) costs more than it
# saves: a 768 x 768 Q8_0 GEMV took 14 µs serial and 49 µs parallel, GPT-2's 38.6M-element head
# 1280 µs serial and 705 parallel; GPT-2-small int8 decode went from 142 to 185 tok/s when this
# moved from 2^15 to 2^22 (170 on one thread; after the kernel cache fix in _jit.kernel).
Q8_0_STREAMING_MIN = 1 << 22


def _pick(pair, work: int):
    return pick(pair, work, STREAMING_MIN)


def _rows(x):
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x.reshape(-1, x.shape[-1])


def _finish(y, x, b):
    y = y.reshape(*x.shape[:-1], y.shape[-1])
    return y if b is None else y + b


def _tiled(x2, n_out, dequant_rows, tile=TILE):
    """BLAS path: y = Σ over input tiles of x[:, tile] @ W[tile], W[tile] dequantized on the fly."""
    y = np.zeros((x2.shape[0], n_out), np.float32)
    for k0 in range(0, x2.shape[1], tile):
        k1 = min(x2.shape[1], k0 + tile)
        y += x2[:, k0:k1] @ dequant_rows(k0, k1)
    return y


def _widen_scaled(w, n0, s, out):
    """out[j] = float32(w[n0 + j]) · s[n0 + j]: rows of an int8 (N, K) weight, dequantized."""
    for j in prange(out.shape[0]):
        o = out[j]
        r = w[n0 + j]
        sc = s[n0 + j]
        for k in range(o.size):
            o[k] = np.float32(r[k]) * sc


_WIDEN_SCALED = kernel(_widen_scaled)


def _tiled_t(x2, w, s):
    """BLAS path for x @ (w · s)ᵀ with int8 w (N, K) and per-row scales s: 4·TILE output rows at a
    time dequantized (scaled, vectorised) into one buffer and multiplied into their columns of y,
    with BLAS on the budget when the whole product is big enough (``threads.blas``), as float32's
    tied head (``matmul``) runs. Dequantizing with NumPy's ``astype`` on one BLAS thread took GPT-2's
    int8 head to 89 ms at 128 tokens against float32's 49, and the bundled model's to 714 µs against
    625; this way 58 against 58 ms and 639 µs (quiet Zen 5 host, interleaved). On AVX-512 the rows
    are dequantized straight into sgemm.py's panels instead."""
    M, N = x2.shape[0], w.shape[0]
    if sgemm.HAS_AVX512 and M >= sgemm.MIN_ROWS and N >= sgemm.NR:  # dequantized into its panels
        return sgemm.gemm(x2, w, transposed=True, scale=s, parallel=M >= SPLIT_ROWS and slabs(M * w.size) > 1)
    y = np.empty((M, N), np.float32)
    buf = np.empty((min(4 * TILE, N), w.shape[1]), np.float32)
    with threads.blas(M * w.size):
        for n0 in range(0, N, 4 * TILE):
            n = min(4 * TILE, N - n0)
            _WIDEN_SCALED[1](w, n0, s, buf[:n])
            np.matmul(x2, buf[:n].T, out=y[:, n0:n0 + n])
    return y


def linear_q8(x, w, scale, b=None, *, transposed=False):
    if x.dtype != np.float32:
        return spec.linear_q8(x, w, scale, b, transposed=transposed)
    x2 = _rows(x)
    if transposed:
        if x2.shape[0] <= SKINNY_MAX_ROWS:
            y = np.empty((x2.shape[0], w.shape[0]), np.float32)
            _pick(_ROWS_DOT, w.size)(x2, w, False, y)
            return _finish(y * scale, x, b)
        return _finish(_tiled_t(x2, w, np.ascontiguousarray(scale, np.float32)), x, b)
    if x2.shape[0] <= SKINNY_MAX_ROWS:
        y = np.empty((x2.shape[0], w.shape[1]), np.float32)
        _pick(_COLS, w.size)(x2, w, False, UNSCALED, x2.shape[1], y, _block(w.shape[1]))
    else:
        y = _tiled(x2, w.shape[1], lambda a, c: w[a:c].astype(np.float32))
    return _finish(y * scale, x, b)


def linear_q8_block(x, w, scale, b=None, *, block=32):
    if x.dtype != np.float32:
        return spec.linear_q8_block(x, w, scale, b, block=block)
    x2 = _rows(x)
    s = np.ascontiguousarray(scale, np.float32)
    if x2.shape[0] <= SKINNY_MAX_ROWS:
        y = np.empty((x2.shape[0], w.shape[1]), np.float32)
        _pick(_COLS, w.size)(x2, w, False, s, block, y, _block(w.shape[1]))
    else:
        y = _tiled(x2, w.shape[1], lambda a, c: spec.dequantize_blocks(w[a:c], s[a // block:c // block], block))
    return _finish(y, x, b)


def linear_q8_0(x, w, scale, b=None, *, block=32, simd=True):
    """Every token count runs the integer kernel (``_q8_0_rows``), prefill included: dequantizing
    the weights for a float32 GEMM instead cost that GEMM plus the dequantization, so it could
    never beat fp32 (benchmarks/results/int8_prefill.md). Prefill takes int8_vnni.py's kernel where
    the CPU has AVX-512 VNNI and the blocks are 32 or one per row. ``simd=False`` takes the portable integer
    loop even where AVX2 is there (the tests' way to check it on this machine; int8_simd.py lowers
    to it by itself on CPUs without AVX2)."""
    if x.dtype != np.float32 or scale.dtype != np.float32:
        return spec.linear_q8_0(x, w, scale, b, block=block)
    x2 = _rows(x)
    M, K = x2.shape
    xs = np.empty((M, K // block), np.float32)
    w, scale = np.ascontiguousarray(w), np.ascontiguousarray(scale)
    xq = np.empty((M, K), np.int8)
    quantize_act_blocks(x2, block, xq, xs)
    y = np.empty((M, w.shape[0]), np.float32)
    if simd and M > SKINNY_MAX_ROWS and vnni.supports(K, block):  # prefill on AVX-512 VNNI (int8_vnni.py)
        wp, cp, ws = vnni.packed(w, scale, block)
        with numba.parallel_chunksize(PREFILL_CHUNKS):
            _prefill(vnni.ROWS, M, w.size)(wp, cp, ws, vnni.interleave(xq, 0x80),
                                                              vnni.pad_scales(xs, block), block == K, y)
        return _finish(y, x, b)
    # decode streams the weights (every core from Q8_0_STREAMING_MIN on); prefill is compute-bound,
    # and waking the pool for a small product costs more than it gains, as for the float kernels
    if M <= SKINNY_MAX_ROWS:
        pick(_Q8_0, w.size * M, Q8_0_STREAMING_MIN)(xq, xs, w, scale, block, simd, y)
    else:  # chunks handed out as threads free up: a thread another process delays holds up less
        with numba.parallel_chunksize(PREFILL_CHUNKS):  # (static halves: ~10% slower at load 8)
            _prefill(_Q8_0, M, w.size)(xq, xs, w, scale, block, simd, y)
    return _finish(y, x, b)


def linear_q4(x, w, scale, b=None, *, group=32, transposed=False):
    if x.dtype != np.float32 or group % 2:
        return spec.linear_q4(x, w, scale, b, group=group, transposed=transposed)
    x2 = _rows(x)
    s = np.ascontiguousarray(scale, np.float32)
    if transposed:
        n_out = w.shape[0]
        gh = group // 2
        if x2.shape[0] <= SKINNY_MAX_ROWS and gh & (gh - 1) == 0:  # groups of 2^shift bytes
            y = np.empty((x2.shape[0], n_out), np.float32)
            xe, xo = np.ascontiguousarray(x2[:, 0::2]), np.ascontiguousarray(x2[:, 1::2])
            xsum = (xe + xo).reshape(x2.shape[0], -1, gh).sum(axis=-1, dtype=np.float32)
            _pick(_Q4T, w.size * 2)(xe, xo, xsum, np.ascontiguousarray(w), s, y, gh.bit_length() - 1)
        else:
            y = np.empty((x2.shape[0], n_out), np.float32)
            for n0 in range(0, n_out, 4 * TILE):  # dequantize 4·TILE output channels at a time
                wt = spec.unpack_int4_rows(w[n0:n0 + 4 * TILE]).astype(np.float32)
                wt *= np.repeat(s[n0:n0 + 4 * TILE], group, axis=1)
                y[:, n0:n0 + 4 * TILE] = x2 @ wt.T
        return _finish(y, x, b)
    # (in, out): files from before the plugin stored int4 (out, in); tiles of whole groups
    # (TILE is a multiple of any group dividing it; else the group) are unpacked for BLAS
    tile = TILE if TILE % group == 0 else group
    y = _tiled(x2, w.shape[1], lambda a, c: spec.dequantize_blocks(
        spec.unpack_int4(w[a // 2:c // 2]), s[a // group:c // group], group), tile)
    return _finish(y, x, b)


def embedding_q8(ids, table, scale):
    if scale.dtype != np.float32:
        return spec.embedding_q8(ids, table, scale)
    flat = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
    out = np.empty((flat.size, table.shape[1]), np.float32)
    _pick(_EMB8, out.size)(flat, table, scale, out)
    return out.reshape(*np.shape(ids), table.shape[1])


def embedding_q4(ids, table, scale, *, group=32):
    if scale.dtype != np.float32 or group % 2:
        return spec.embedding_q4(ids, table, scale, group=group)
    flat = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
    out = np.empty((flat.size, table.shape[1] * 2), np.float32)
    _pick(_EMB4, out.size)(flat, table, np.ascontiguousarray(scale), out, group)
    return out.reshape(*np.shape(ids), out.shape[1])


def linear_cast(x, w, b=None, *, transposed=False):
    if x.dtype != np.float32:
        return spec.linear_cast(x, w, b, transposed=transposed)
    x2 = _rows(x)
    bits = np.ascontiguousarray(w).view(np.uint16)
    bf16 = w.dtype == np.uint16
    if transposed:
        if x2.shape[0] <= SKINNY_MAX_ROWS:
            y = np.empty((x2.shape[0], w.shape[0]), np.float32)
            _pick(_ROWS_DOT, w.size)(x2, bits, bf16, y)
        else:
            y = np.empty((x2.shape[0], w.shape[0]), np.float32)
            for n0 in range(0, w.shape[0], 4 * TILE):  # widen 4·TILE output channels at a time
                y[:, n0:n0 + 4 * TILE] = x2 @ spec.widen(w[n0:n0 + 4 * TILE]).T
    elif x2.shape[0] <= SKINNY_MAX_ROWS:
        y = np.empty((x2.shape[0], w.shape[1]), np.float32)
        _pick(_COLS, w.size)(x2, bits, bf16, UNSCALED, x2.shape[1], y, _block(w.shape[1]))
    else:
        y = _tiled(x2, w.shape[1], lambda a, c: spec.widen(w[a:c]))
    return _finish(y, x, b)


def attention_kv8(q, k, v, past_k=None, past_k_scale=None, past_v=None, past_v_scale=None, mask=None, *,
                  n_heads, n_kv_heads, causal, scale=None):
    if q.dtype != np.float32:
        return spec.attention_kv8(q, k, v, past_k, past_k_scale, past_v, past_v_scale, mask, n_heads=n_heads,
                                  n_kv_heads=n_kv_heads, causal=causal, scale=scale)
    kq, ks = spec.quantize_heads(k, n_kv_heads)  # only the new tokens: T rows
    vq, vs = spec.quantize_heads(v, n_kv_heads)
    K, KS = append(past_k, kq), append(past_k_scale, ks)
    V, VS = append(past_v, vq), append(past_v_scale, vs)
    out = sdpa(q, K, KS, V, VS, mask, n_heads=n_heads, n_kv_heads=n_kv_heads, causal=causal, scale=scale)
    return out, K, KS, V, VS


def linear_w8a8(x, w, scale, b=None):
    if x.dtype != np.float32:
        return spec.linear_w8a8(x, w, scale, b)
    q, sx = spec.quantize_rows(_rows(x))
    # The product of integers is exact in float32 only while |acc| < 2^24; the spec's float64
    # accumulation is exact, so accumulate integer products in float64 tiles here too.
    qf = q.astype(np.float64)
    acc = np.zeros((q.shape[0], w.shape[1]), np.float64)
    for k0 in range(0, q.shape[1], TILE):
        acc += qf[:, k0:k0 + TILE] @ w[k0:k0 + TILE].astype(np.float64)
    y = acc.astype(np.float32) * sx * scale
    return _finish(y, x, b)


_BYTE_TABLES: dict[str, np.ndarray] = {}


def _byte_table(name: str) -> np.ndarray:
    """(256, 8/bits) float32: the levels of every byte's codes, decoded once per codebook."""
    if name not in _BYTE_TABLES:
        bits, _ = spec.codebook(name)
        codes = spec.unpack_codes(np.arange(256, dtype=np.uint8)[:, None], bits)
        _BYTE_TABLES[name] = np.ascontiguousarray(np.asarray(spec.CODEBOOKS[name][1], np.float32)[codes])
    return _BYTE_TABLES[name]


def linear_lut(x, w, scale, b=None, *, codebook="int2", group=32):
    bits = spec.CODEBOOKS[codebook][0]
    if x.dtype != np.float32 or group % (8 // bits):
        return spec.linear_lut(x, w, scale, b, codebook=codebook, group=group)
    x2 = _rows(x)
    s = np.ascontiguousarray(scale, np.float32)
    n_out = w.shape[0]
    y = np.empty((x2.shape[0], n_out), np.float32)
    if x2.shape[0] <= SKINNY_MAX_ROWS:
        _pick(_LUT, w.size * 8 // bits)(x2, np.ascontiguousarray(w), _byte_table(codebook), s, group, y)
    else:
        for n0 in range(0, n_out, 4 * TILE):  # dequantize 4·TILE output channels at a time for BLAS
            y[:, n0:n0 + 4 * TILE] = x2 @ spec.dequantize_lut(w[n0:n0 + 4 * TILE], s[n0:n0 + 4 * TILE],
                                                              codebook, group).T
    return _finish(y, x, b)


KERNELS = {"linear_lut": linear_lut, "linear_q8": linear_q8, "linear_q8_block": linear_q8_block,
           "linear_q8_0": linear_q8_0, "linear_q4": linear_q4,
           "linear_w8a8": linear_w8a8, "linear_cast": linear_cast, "embedding_q8": embedding_q8,
           "embedding_q4": embedding_q4, "attention_kv8": attention_kv8}
