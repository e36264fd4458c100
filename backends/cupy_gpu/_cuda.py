"""Compiling the backend's raw CUDA kernels: one module per element type, no CUDA headers.

Half precision is read and written with the PTX conversions themselves (``cvt.f32.f16`` and
``cvt.rn.f16.f32``, exactly what ``__half2float``/``__float2half`` compile to), through a 16-bit
struct, so the sources need no ``cuda_fp16.h`` (whose presence on NVRTC's include path depends
on how CuPy was installed). A source names its element types ``T`` (activations), ``S`` (scales)
and ``O`` (outputs); :func:`function` compiles it once per combination with those typedefs and
caches the module. Within a source, small C++ templates share one body between kernels that
differ in a type (the cache or weight element, the reduction). All arithmetic is float32.
"""
from __future__ import annotations

import os
from typing import Any

import cupy as cp


def source(name: str) -> str:
    """The CUDA source file ``name`` beside this module (``*.cu``, ``prelude.cuh``): kept as files
    so that CI can compile them with NVRTC on a machine without a GPU (tests/test_cuda_sources.py)."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), name), encoding="utf-8") as f:
        return f.read()


PRELUDE = source("prelude.cuh")
ROWS = source("rows.cu")   # the one-block-per-row kernels; one string, so compiled once per dtype

_CTYPE = {"float32": "float", "float16": "half_t"}
_modules: dict[tuple[int, str, str, str], Any] = {}


def ctype(dtype: Any) -> str:
    t = _CTYPE.get(str(dtype))
    if t is None:
        raise TypeError(f"cupy backend: float32 and float16 only, not {dtype}")
    return t


def function(source: str, name: str, T: Any = "float32", S: Any = "float32", O: Any = "float32") -> Any:
    """The kernel ``name`` of ``source`` compiled for activations T, scales S and outputs O."""
    key = (id(source), str(T), str(S), str(O))
    mod = _modules.get(key)
    if mod is None:
        head = f"typedef {ctype(T)} T;\ntypedef {ctype(S)} S;\ntypedef {ctype(O)} O;\n"
        mod = _modules[key] = cp.RawModule(code=PRELUDE + head + source, options=("-std=c++14",))
    return mod.get_function(name)


def threads(n: int) -> int:
    """Threads for a one-block-per-row kernel over rows of n: a power of two in [32, 1024]."""
    return int(min(1024, max(32, 1 << (max(n, 1) - 1).bit_length())))


def contiguous(a: Any, dtype: Any = None) -> Any:
    return cp.ascontiguousarray(a, dtype=dtype)


def rows(x: Any) -> Any:
    """x as a contiguous (rows, last axis) matrix."""
    x = contiguous(x)
    return x.reshape(-1, x.shape[-1])
