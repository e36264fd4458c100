"""exp and erf that LLVM can vectorise: the transcendentals the hot kernels need.

Without Intel's SVML, numba compiles ``math.exp`` to a scalar libm call per element, so a GELU or
a softmax over a few thousand values runs one value at a time (~15 ns each). :func:`exp` on
float32 uses only arithmetic LLVM turns into SIMD: Cody–Waite range reduction
x = n·ln2 + r with |r| ≤ ln2/2, a degree-7 Taylor polynomial for eʳ (truncation error below
1e-8, under float32 rounding), and 2ⁿ built directly from its IEEE-754 bit pattern. NaN
propagates; inputs are clamped to [-87, 88], where eˣ is still a normal float32 (so it never
returns inf: callers use it in σ(x) = 1/(1 + e⁻ˣ) and softmax, where that is harmless).
float64 keeps ``math.exp``.

:func:`erf` on float32 (the exact GELU of BERT-family models) is Abramowitz & Stegun's 7.1.26,
erf(x) = 1 − t·P(t)·e^(−x²) with t = 1/(1 + p·x), absolute error below 1.5e-7 (about one float32
ulp at 1) — built on the exp above, so it vectorises too. float64 keeps ``math.erf``.

:func:`half` and :func:`bfloat` read a 16-bit float (stored as uint16 bits) and widen it to
float32 in LLVM IR (``fpext half``; a 16-bit shift for bfloat16), so a loop over them vectorises —
to ``vcvtph2ps`` on x86 with F16C. numba has no float16 type, and widening with integer bit
tricks (subnormals, inf/NaN) in Python-level code does not vectorise.
"""
from __future__ import annotations

import math

import numpy as np

from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

_LOG2E = 1.4426950408889634
_LN2_HI = 0.693359375          # ln 2 split so that n·_LN2_HI is exact in float32
_LN2_LO = -2.12194440e-4


@intrinsic
def _f32_from_bits(typingctx, bits):
    """Reinterpret an int32 as the float32 with the same bits."""
    if bits != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


def exp(x):
    """eˣ (vectorisable for float32; see the module docstring)."""
    return math.exp(x)


@overload(exp, jit_options={"fastmath": {"reassoc", "contract", "arcp"}})
def _exp_impl(x):
    if isinstance(x, types.Float) and x.bitwidth == 32:
        def impl(x):
            f = types.float32
            if x < f(-87.0):
                x = f(-87.0)
            if x > f(88.0):
                x = f(88.0)
            n = np.floor(x * f(_LOG2E) + f(0.5))  # float32 (math.floor returns int64, widening the rest to float64)
            r = x - n * f(_LN2_HI) - n * f(_LN2_LO)
            p = f(1.0 / 5040.0)
            p = p * r + f(1.0 / 720.0)
            p = p * r + f(1.0 / 120.0)
            p = p * r + f(1.0 / 24.0)
            p = p * r + f(1.0 / 6.0)
            p = p * r + f(0.5)
            p = p * r + f(1.0)
            p = p * r + f(1.0)
            return p * _f32_from_bits(types.int32((types.int32(n) + 127) << 23))
        return impl
    return lambda x: math.exp(x)


# Abramowitz & Stegun 7.1.26 (Handbook of Mathematical Functions, 1964).
_AS_P = 0.3275911
_AS_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def erf(x):
    """erf(x) (vectorisable for float32; see the module docstring)."""
    return math.erf(x)


@overload(erf, jit_options={"fastmath": {"reassoc", "contract", "arcp"}})
def _erf_impl(x):
    if isinstance(x, types.Float) and x.bitwidth == 32:
        def impl(x):
            f = types.float32
            a = abs(x)
            t = f(1.0) / (f(1.0) + f(_AS_P) * a)
            poly = f(_AS_A[4])
            poly = poly * t + f(_AS_A[3])
            poly = poly * t + f(_AS_A[2])
            poly = poly * t + f(_AS_A[1])
            poly = poly * t + f(_AS_A[0])
            y = f(1.0) - poly * t * exp(-a * a)
            return y if x >= f(0.0) else -y
        return impl
    return lambda x: math.erf(x)


def _widen16(arr, index, body):
    """Signature and codegen for a float32 read of ``arr[index]``: ``arr`` 1-D uint16 and C-contiguous
    (a row of a C array is), so the element address is a plain offset LLVM can vectorise over."""
    if not (isinstance(arr, types.Array) and arr.ndim == 1 and arr.dtype == types.uint16
            and arr.layout == "C" and isinstance(index, types.Integer)):
        return None
    sig = types.float32(arr, index)

    def codegen(context, builder, signature, args):
        aryty, idxty = signature.args
        ary = context.make_array(aryty)(context, builder, args[0])
        i = context.cast(builder, args[1], idxty, types.intp)
        bits = builder.load(builder.gep(ary.data, [i], inbounds=True))
        return body(builder, bits)

    return sig, codegen


@intrinsic
def half(typingctx, arr, index):
    """float32(float16 with bits ``arr[index]``): exact, subnormals, ±inf and NaN included."""
    return _widen16(arr, index, lambda b, bits: b.fpext(b.bitcast(bits, ir.HalfType()), ir.FloatType()))


@intrinsic
def bfloat(typingctx, arr, index):
    """float32(bfloat16 with bits ``arr[index]``): the bits are the float32's high half."""
    return _widen16(arr, index, lambda b, bits: b.bitcast(
        b.shl(b.zext(bits, ir.IntType(32)), ir.Constant(ir.IntType(32), 16)), ir.FloatType()))


def widen(arr, i, bf16):
    """float32 of ``arr[i]``: an int8 weight, or a 16-bit float's bits (bfloat16 if ``bf16``, else
    float16) — one kernel body serves every narrow weight format."""
    return np.float32(arr[i])


@overload(widen)
def _widen_impl(arr, i, bf16):
    if isinstance(arr, types.Array) and arr.dtype == types.uint16:
        def impl(arr, i, bf16):
            return bfloat(arr, i) if bf16 else half(arr, i)
        return impl

    def impl_int(arr, i, bf16):
        return types.float32(arr[i])
    return impl_int


@njit(inline="always", fastmath={"reassoc", "contract", "arcp"})
def dot4(q, k0, k1, k2, k3, D, zero):
    """Four dot products of ``q`` with four key rows in one pass over ``q``: the score loop every
    attention kernel unrolls (each ``q[d]`` is loaded once for four keys)."""
    a0 = a1 = a2 = a3 = zero
    for d in range(D):
        qd = q[d]
        a0 += qd * k0[d]
        a1 += qd * k1[d]
        a2 += qd * k2[d]
        a3 += qd * k3[d]
    return a0, a1, a2, a3
