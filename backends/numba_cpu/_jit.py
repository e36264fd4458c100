"""Shared compilation settings for the numba kernels.

``fastmath`` is limited to the flags that only reorder arithmetic (reassociation lets sums and
dot products vectorise; contraction allows FMA). We leave out ``nnan``/``ninf``: the attention
kernel relies on ``-inf``-free masking but other kernels must propagate NaN/Inf like the spec.
Every kernel is compiled twice — a parallel version for large inputs and a serial one for small
ones (decode at batch 1), where waking the thread pool costs more than the work.
``error_model="numpy"``: x/0 gives inf or nan as in the spec, instead of a Python exception whose
check in every division would stop LLVM from vectorising the loop.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import os
from typing import Any, Callable

import numba
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

FASTMATH = {"reassoc", "contract", "arcp"}
# Below this much work (elements, or multiply-adds for attention) a kernel runs on one thread.
# Measured on the 2-core machine (benchmarks/results/decode_cpu.md): BLAS's own threads hold the
# cores between calls, and numba's pool competing with them cost more than it gained up to
# GPT-2's 128-token prefill; the LM head at batch 8 (39M) still gains.
PARALLEL_MIN = 1 << 24


def kernel(fn: Callable[..., Any], fastmath: Any = FASTMATH) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """(parallel, serial) compiled versions of ``fn`` (which uses ``numba.prange``); ``fastmath``
    False for a kernel that must round exactly as the spec does (the int8 quantizers).

    The serial one compiles a copy of ``fn`` under another name (:func:`_renamed`): numba's cache
    keys an entry by the function's name, its bytecode and the signature, not by its compile
    flags, so two builds of one function shared one entry, and whichever a process compiled first
    was loaded for both. With the serial build cached first (decode runs before prefill), every
    "parallel" kernel ran on one thread: int8 prefill at 128 x 768 x 3072 took 5.1 ms on one
    thread and 4.9 on two; with the parallel build cached first, every small call woke the pool."""
    par = numba.njit(cache=True, parallel=True, fastmath=fastmath, nogil=True, error_model="numpy")(fn)
    ser = numba.njit(cache=True, parallel=False, fastmath=fastmath, nogil=True, error_model="numpy")(
        _renamed(fn, "serial"))
    _drop_stale_cache(par)
    return par, ser


def _renamed(fn: Callable[..., Any], tag: str) -> Callable[..., Any]:
    """A copy of ``fn`` (same code, globals, defaults and closure) whose qualified name ends in
    ``__tag``: the name numba's cache files are named after."""
    g = type(fn)(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    g.__qualname__ = f"{fn.__qualname__}__{tag}"
    g.__module__, g.__doc__, g.__kwdefaults__ = fn.__module__, fn.__doc__, fn.__kwdefaults__
    return g


STAMP = "minitx-sources.stamp"
_checked: set[str] = set()


def sources_digest() -> str:
    """sha256 over this package's Python sources (names and bytes)."""
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "*.py"))):
        h.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def _drop_stale_cache(dispatcher: Any) -> None:
    """Delete numba's cached kernels of this package when any of its sources changed.

    Why: numba re-validates a cached kernel against its own file only ("cache invalidation fails to
    recognize changes in symbols defined in a different file", numba's notes on caching), yet our
    kernels inline helpers from other files (``_vmath.widen``, ``prefetch``, the vectorised
    ``exp``): after an edit to a helper, every kernel using it would keep its old machine code, and
    a test run would pass on code that no longer exists. One digest of the package's sources, kept
    beside the cache, catches that; checked once per cache folder. (Found when a cached int8 kernel
    ran slower than the same source compiled afresh.)
    """
    path = getattr(getattr(dispatcher, "_cache", None), "_cache_path", None)
    if not path or path in _checked:
        return
    _checked.add(path)
    digest = sources_digest()
    stamp = os.path.join(path, STAMP)
    try:
        with open(stamp) as f:
            if f.read().strip() == digest:
                return
    except OSError:
        pass
    try:
        for old in glob.glob(os.path.join(path, "*.nbi")) + glob.glob(os.path.join(path, "*.nbc")):
            with contextlib.suppress(FileNotFoundError):  # another process got there first
                os.remove(old)
        os.makedirs(path, exist_ok=True)
        tmp = f"{stamp}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(digest + "\n")
        os.replace(tmp, stamp)
    except OSError:  # a read-only cache folder: numba then compiles in memory, nothing to protect
        pass


def pick(pair: tuple[Callable[..., Any], Callable[..., Any]], work: int, minimum: int | None = None) -> Callable[..., Any]:
    """The parallel version from ``minimum`` (default PARALLEL_MIN) units of work on, else serial."""
    lo = PARALLEL_MIN if minimum is None else minimum
    return pair[0] if work >= lo and numba.get_num_threads() > 1 else pair[1]


def rows(x):
    """View ``x`` as (rows, last axis), C-contiguous (copying only when it is not)."""
    import numpy as np

    x = np.ascontiguousarray(x)
    return x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)


@intrinsic
def prefetch(typingctx, arr, index):
    """``prefetch(a, i)``: ask the CPU to start loading the cache line holding ``a.flat[i]`` (``a``
    contiguous; an index past the end is harmless, nothing is read).

    Why: decode streams each weight once, and one core's hardware prefetcher keeps too few lines in
    flight to reach DRAM bandwidth — OpenBLAS's GEMV issues software prefetches for that reason. A
    kernel that streams a weight matrix calls this a few rows ahead of the row it is reading.
    Lowered to LLVM's ``llvm.prefetch`` (read, high locality, data cache).
    """
    if not isinstance(arr, types.Array) or not isinstance(index, types.Integer):
        return None
    sig = types.void(arr, index)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        i = context.cast(builder, args[1], signature.args[1], types.intp)
        base = builder.bitcast(ary.data, ir.IntType(8).as_pointer())
        offset = builder.mul(i, context.get_constant(types.intp, context.get_abi_sizeof(
            context.get_data_type(aryty.dtype))))
        # integer arithmetic, not a GEP: an address past the array is never dereferenced
        addr = builder.inttoptr(builder.add(builder.ptrtoint(base, cgutils.intp_t), offset), base.type)
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
            ir.VoidType(), [base.type, i32, i32, i32]), "llvm.prefetch.p0i8")
        builder.call(fn, [addr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen
