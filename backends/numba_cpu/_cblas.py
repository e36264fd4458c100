"""NumPy's own OpenBLAS GEMV, callable from numba kernels on a block of an array (no copies).

Why: at batch-1 decode ``linear`` and the LM head cut their weight into slabs of output columns,
one GEMV per numba task, so that each core streams its share. numba's ``np.dot`` cannot serve: it
copies any operand that is not contiguous (a slab of columns never is), and it calls SciPy's
OpenBLAS, another build than NumPy's. So :func:`gemv` calls NumPy's ``cblas_?gemv`` directly with
the leading dimension and an element offset, which is all a slab needs.

The symbols are found at import (NumPy's wheels ship ILP64 OpenBLAS as ``scipy_cblas_sgemv64_``;
other builds as ``cblas_sgemv64_``) and registered with LLVM under fixed names, so the compiled
kernels call them by name and stay cacheable. ``AVAILABLE`` is False where NumPy's BLAS is not
such an OpenBLAS (MKL, a 32-bit-integer build): callers then make one plain NumPy call.
"""
from __future__ import annotations

import ctypes
from typing import Any

import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112
_NAMES = ("sgemv", "dgemv")


def _numpy_blas() -> dict[str, int] | None:
    """Addresses of NumPy's ILP64 cblas_?gemv, or None."""
    try:
        from threadpoolctl import ThreadpoolController
        libs = ThreadpoolController().select(user_api="blas", internal_api="openblas").lib_controllers
    except ImportError:
        return None
    for lib in libs:
        if "numpy" not in lib.filepath:  # SciPy's copy, when loaded, is another build
            continue
        try:
            dll = ctypes.CDLL(lib.filepath)
        except OSError:
            continue
        for prefix in ("scipy_cblas_", "cblas_"):
            try:
                return {n: ctypes.cast(getattr(dll, f"{prefix}{n}64_"), ctypes.c_void_p).value for n in _NAMES}
            except AttributeError:
                continue
    return None


_ADDRESSES = _numpy_blas()
AVAILABLE = _ADDRESSES is not None
for _n, _a in (_ADDRESSES or {}).items():
    llvm.add_symbol(f"minitx_cblas_{_n}", _a)


def _at(context: Any, builder: Any, aryty: Any, ary: Any, off: Any, offty: Any) -> Any:
    """Pointer to ``ary.flat[off]`` (as i8*)."""
    a = context.make_array(aryty)(context, builder, ary)
    size = context.get_constant(types.intp, context.get_abi_sizeof(context.get_data_type(aryty.dtype)))
    off = context.cast(builder, off, offty, types.intp)
    base = builder.ptrtoint(a.data, cgutils.intp_t)
    return builder.inttoptr(builder.add(base, builder.mul(off, size)), ir.IntType(8).as_pointer())


def _blas_fn(builder: Any, name: str, dtype: Any, ints: list[str]) -> tuple[Any, Any]:
    """The declared function and its float type; ``ints``: the argument kinds after the layout."""
    fl = ir.FloatType() if dtype == types.float32 else ir.DoubleType()
    kinds = {"e": ir.IntType(32), "i": ir.IntType(64), "f": fl, "p": ir.IntType(8).as_pointer()}
    fnty = ir.FunctionType(ir.VoidType(), [kinds["e"]] + [kinds[k] for k in ints])
    prefix = "s" if dtype == types.float32 else "d"
    return cgutils.get_or_insert_function(builder.module, fnty, f"minitx_cblas_{prefix}{name}"), fl


@intrinsic
def gemv(typingctx, ta, m, n, a, ia, lda, x, y, iy):
    """``y.flat[iy:]`` = op(a.flat[ia:] (m, n; leading dim lda)) @ x, row-major, x and y with
    unit stride; ``ta`` NO_TRANS (y has m entries) or TRANS (n entries)."""
    if not (a.dtype == x.dtype == y.dtype and a.dtype in (types.float32, types.float64)):
        return None
    sig = types.void(ta, m, n, a, ia, lda, x, y, iy)

    def codegen(context, builder, signature, args):
        st = signature.args
        fn, fl = _blas_fn(builder, "gemv", st[3].dtype, ["e", "i", "i", "f", "p", "i", "p", "i", "f", "p", "i"])
        i64 = lambda j: context.cast(builder, args[j], st[j], types.int64)
        one, zero = ir.Constant(ir.IntType(64), 1), context.get_constant(types.intp, 0)
        builder.call(fn, [ir.Constant(ir.IntType(32), ROW_MAJOR), builder.trunc(i64(0), ir.IntType(32)), i64(1), i64(2),
                          ir.Constant(fl, 1.0), _at(context, builder, st[3], args[3], args[4], st[4]), i64(5),
                          _at(context, builder, st[6], args[6], zero, types.intp), one, ir.Constant(fl, 0.0),
                          _at(context, builder, st[7], args[7], args[8], st[8]), one])
        return context.get_dummy_value()

    return sig, codegen
