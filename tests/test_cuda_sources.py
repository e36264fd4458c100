"""The CuPy backend's CUDA sources compile, on machines without a GPU.

No GPU reaches CI, so without this a typo in a kernel would first show on someone's H100. NVRTC,
the CUDA runtime compiler, is a plain library (PyPI: ``nvidia-cuda-nvrtc-cu12``, which .ci/run
installs) that needs no driver or device: every raw source is compiled here exactly as
``backends/cupy_gpu/_cuda.function`` assembles it (prelude + element typedefs + source), for
every element-type combination the backend can ask for, for the A100 and H100 architectures.
The one-line ``cupy.ElementwiseKernel`` bodies are compiled too, inside a stand-in for the code
CuPy generates around them (its own headers need CuPy installed). Skipped when NVRTC is not
installed. What it cannot check: that the kernels compute the right thing
(tests/test_backend_cupy.py, on a GPU).
"""
from __future__ import annotations

import ast
import ctypes
import glob
import itertools
import os
import re

import pytest

HERE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "backends", "cupy_gpu")
CTYPE = {"float32": "float", "float16": "half_t"}  # as _cuda.ctype
ARCHES = ("compute_80", "compute_90")


def _nvrtc() -> ctypes.CDLL | None:
    try:
        import nvidia.cuda_nvrtc as pkg

        folders = [os.path.join(p, "lib") for p in pkg.__path__]
    except ImportError:
        folders = []
    for path in [f for d in folders for f in sorted(glob.glob(os.path.join(d, "libnvrtc.so*")))] + ["libnvrtc.so"]:
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


LIB = _nvrtc()
pytestmark = pytest.mark.skipif(LIB is None, reason="NVRTC is not installed (pip install nvidia-cuda-nvrtc-cu12)")


def compile_cuda(code: str, arch: str) -> tuple[bool, str]:
    """(compiled?, NVRTC's log) for ``code``, as CuPy's RawModule compiles it (-std=c++14)."""
    prog = ctypes.c_void_p()
    assert LIB.nvrtcCreateProgram(ctypes.byref(prog), code.encode(), b"minitx.cu", 0, None, None) == 0
    opts = (ctypes.c_char_p * 2)(b"-std=c++14", f"-arch={arch}".encode())
    ok = LIB.nvrtcCompileProgram(prog, 2, opts) == 0
    size = ctypes.c_size_t()
    LIB.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    LIB.nvrtcGetProgramLog(prog, log)
    LIB.nvrtcDestroyProgram(ctypes.byref(prog))
    return ok, log.value.decode(errors="replace")


def _read(name: str) -> str:
    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        return f.read()


def assembled(name: str, T: str, S: str = "float32", O: str = "float32") -> str:
    """What ``_cuda.function(source, name, T, S, O)`` hands to NVRTC."""
    head = f"typedef {CTYPE[T]} T;\ntypedef {CTYPE[S]} S;\ntypedef {CTYPE[O]} O;\n"
    return _read("prelude.cuh") + head + _read(name)


def test_every_source_file_is_covered() -> None:
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(HERE, "*.cu"))) == ["cross_attention.cu", "quant.cu", "rows.cu"]


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("T", sorted(CTYPE))
@pytest.mark.parametrize("name", ["rows.cu", "cross_attention.cu"])
def test_activation_typed_kernels_compile(name: str, arch: str, T: str) -> None:
    ok, log = compile_cuda(assembled(name, T), arch)
    assert ok, log


@pytest.mark.parametrize("arch", ARCHES)
def test_quant_kernels_compile_for_every_dtype_combination(arch: str) -> None:
    for T, S, O in itertools.product(sorted(CTYPE), repeat=3):
        ok, log = compile_cuda(assembled("quant.cu", T, S, O), arch)
        assert ok, f"T={T} S={S} O={O}:\n{log}"


@pytest.mark.parametrize("name", ["rows.cu", "cross_attention.cu"])
def test_a_broken_kernel_is_caught_with_its_line(name: str) -> None:
    """The check can fail: an undefined name in a kernel body is a compile error that names it."""
    good = assembled(name, "float32")
    cut = len(good) - len(_read(name))  # the kernels, after the prelude and typedefs
    code = good[:cut] + good[cut:].replace("NEG_INF", "NEG_INFINITY", 1)
    assert code != good
    ok, log = compile_cuda(code, ARCHES[-1])
    assert not ok and 'identifier "NEG_INFINITY" is undefined' in log


# ------------------------------------------------------------------ ElementwiseKernel bodies
SCALAR = {"float32": "float", "float64": "double", "int32": "int", "int64": "long long", "int8": "signed char",
          "uint8": "unsigned char"}
# CuPy's float16 converts to and from float like this (cupy/carray.cuh); the prelude has h2f/f2h.
HALF = """
struct float16 {
    unsigned short x;
    __device__ float16() {}
    __device__ float16(float f) : x(f2h(f)) {}
    __device__ operator float() const { return h2f(x); }
};
"""


def elementwise_kernels() -> list[tuple[str, str, str, str]]:
    """(in_params, out_params, operation, name) of every ``cp.ElementwiseKernel(...)`` in the
    backend's modules, read from their source (importing them needs CuPy and a GPU)."""
    found = []
    for path in sorted(glob.glob(os.path.join(HERE, "*.py"))):
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "ElementwiseKernel":
                args = [a.value for a in node.args]
                assert len(args) == 4 and all(isinstance(a, str) for a in args), ast.dump(node)[:200]
                found.append(tuple(args))
    return found


def _params(spec: str) -> list[tuple[bool, str, str]]:
    out = []
    for p in filter(None, (x.strip() for x in spec.split(","))):
        words = p.split()
        out.append((words[0] == "raw", words[-2], words[-1]))
    return out


def stand_in(kernels: list[tuple[str, str, str, str]]) -> str:
    """One translation unit: each kernel, once per float32/float16 choice of each of its type
    placeholders (one-letter names), in a namespace of its own, shaped as CuPy's: inputs by value
    (``raw`` ones as pointers), outputs assigned, ``i`` the element index."""
    parts = [_read("prelude.cuh"), HALF]
    for k, (ins, outs, op, name) in enumerate(kernels):
        params = _params(ins) + [(False, t, n) for _, t, n in _params(outs)]
        holders = sorted({t for _, t, _ in params if re.fullmatch(r"[A-Z]", t)})
        for combo in itertools.product(("float", "float16"), repeat=len(holders)):
            ctype = dict(zip(holders, combo), **SCALAR)
            n_in = len(_params(ins))
            sig = [f"const {ctype[t]}* {n}" if raw else f"{ctype[t]} {n}" for raw, t, n in params[:n_in]]
            sig += [f"{ctype[t]}* _out_{n}" for _, t, n in params[n_in:]]
            typedefs = "".join(f"typedef {c} {h};\n" for h, c in zip(holders, combo))
            locals_ = "".join(f"{ctype[t]} {n};\n" for _, t, n in params[n_in:])
            stores = "".join(f"_out_{n}[i] = {n};\n" for _, _, n in params[n_in:])
            parts.append(f"namespace {name}_{k}_{'_'.join(combo)} {{\n{typedefs}"
                         f"__global__ void kernel({', '.join(sig)}) {{\n"
                         f"long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;\n"
                         f"{locals_}{{\n{op}\n}}\n{stores}}}\n}}\n")
    return "\n".join(parts)


def test_elementwise_kernels_are_all_found() -> None:
    names = {k[3] for k in elementwise_kernels()}
    assert {"minitx_gelu_tanh", "minitx_rope", "minitx_deq4_t", "minitx_emb4", "minitx_relpos",
            "minitx_geglu_erf"} <= names and len(names) >= 14


@pytest.mark.parametrize("arch", ARCHES)
def test_elementwise_kernel_bodies_compile(arch: str) -> None:
    ok, log = compile_cuda(stand_in(elementwise_kernels()), arch)
    assert ok, log


def test_a_broken_elementwise_body_is_caught() -> None:
    ks = elementwise_kernels()
    broken = [(ins, outs, op.replace("(float)", "(flaot)", 1), name) if name == "minitx_gelu_erf" else (ins, outs, op, name)
              for ins, outs, op, name in ks]
    assert broken != ks
    ok, log = compile_cuda(stand_in(broken), ARCHES[-1])
    assert not ok and "flaot" in log
