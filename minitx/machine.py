"""What machine a measurement ran on: a benchmark figure without it is not a result.

Collected from the system itself (/proc/cpuinfo, os, numpy's build configuration, threadpoolctl
when installed, nvidia-smi / CuPy when a GPU is present) and library versions read from the
installed distributions, so nothing here imports a heavy library just to name its version.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import shutil
import subprocess
from importlib import metadata
from typing import Any

LIBRARIES = ("minitx", "numpy", "scipy", "numba", "torch", "transformers", "cupy-cuda12x", "matplotlib")


# The instruction sets a kernel's speed turns on (AVX-512 and VNNI change int8 and float32 GEMMs
# by 2x): printed beside the CPU's name, which a VM often reduces to "AMD EPYC".
SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx_vnni", "avx512_vnni", "amx_int8")


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's name, family/model and the SIMD_FLAGS it has, e.g. ``AMD EPYC (family 26 model 2;
    avx2 fma avx512f avx512_bf16 avx_vnni avx512_vnni)``."""
    fields: dict[str, str] = {}
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip().lower()
                if not key:
                    break                      # the first processor's block is enough
                fields.setdefault(key, val.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine() or "unknown"
    if "cpu family" not in fields and "flags" not in fields:
        return name
    flags = set(fields.get("flags", "").split())
    simd = " ".join(f for f in SIMD_FLAGS if f in flags)
    return f"{name} (family {fields.get('cpu family', '?')} model {fields.get('model', '?')}; {simd or 'no AVX2'})"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def read_bandwidth(mib: int = 256, passes: int = 5) -> float:
    """Bytes/s the host reads from memory: the best of ``passes`` passes over ``mib`` MiB, one
    slice per usable core, each on a thread of its own (NumPy's reductions release the GIL).

    Why: decoding at batch 1 reads every weight once per token, so bandwidth / weight bytes is a
    speed it cannot beat: the roofline ``minitx bench`` prints beside each decode figure. A byte
    maximum is the cheapest full read NumPy has (SIMD over 32 bytes at a time), so the figure is
    the memory's, not the arithmetic's; the best pass, because a roofline is a bound.
    """
    import time
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    a = np.ones(mib * 2**20, np.uint8)
    n = usable_cores()
    parts = np.array_split(a, n)
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(np.max, parts))  # first touch
        best = float("inf")
        for _ in range(passes):
            t = time.perf_counter()
            list(pool.map(np.max, parts))
            best = min(best, time.perf_counter() - t)
    return a.nbytes / best


def memory_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def blas_info() -> dict[str, Any]:
    """numpy's BLAS: the library it was built against and, with threadpoolctl, what is loaded and
    with how many threads."""
    out: dict[str, Any] = {}
    try:
        import numpy as np

        cfg = np.show_config(mode="dicts")  # numpy >= 1.25
        blas = (cfg or {}).get("Build Dependencies", {}).get("blas", {})
        if blas:
            out["numpy_blas"] = f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except Exception:  # noqa: BLE001 — older numpy: show_config only prints
        pass
    try:
        from threadpoolctl import threadpool_info

        out["threadpools"] = [{k: p.get(k) for k in ("internal_api", "version", "num_threads", "threading_layer",
                                                     "architecture")}
                              for p in threadpool_info()]
    except Exception:  # noqa: BLE001 — optional
        pass
    return out


def blas_threads() -> int:
    """Threads numpy's BLAS uses (threadpoolctl), else the usable cores."""
    try:
        from threadpoolctl import threadpool_info

        n = [p["num_threads"] for p in threadpool_info() if p.get("user_api") == "blas"]
        if n:
            return int(max(n))
    except Exception:  # noqa: BLE001
        pass
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return usable_cores()


def gpu_name() -> str | None:
    if shutil.which("nvidia-smi"):
        try:
            r = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=10)
            if r.returncode == 0 and r.stdout.strip():
                return "; ".join(line.strip() for line in r.stdout.strip().splitlines())
        except (OSError, subprocess.SubprocessError):
            pass
    return None


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for lib in LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            continue
    if "minitx" not in out:
        try:
            from minitx import __version__

            out["minitx"] = f"{__version__} (source checkout)"
        except ImportError:
            pass
    return out


def info() -> dict[str, Any]:
    """Everything above, plus the date, as one JSON-able dict."""
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "logical_cpus": os.cpu_count(),
        "memory_gib": memory_gib(),
        "os": f"{platform.system()} {platform.release()}",
        "gpu": gpu_name(),
        **blas_info(),
        "versions": versions(),
    }


def summary(m: dict[str, Any]) -> str:
    """One line for a table caption."""
    v = m.get("versions", {})
    libs = ", ".join(f"{k} {v[k]}" for k in ("numpy", "numba", "torch", "transformers") if k in v)
    gpu = f"; GPU {m['gpu']}" if m.get("gpu") else "; no GPU"
    # The kernels OpenBLAS chose (or OPENBLAS_CORETYPE forced): Haswell's AVX2 on an AVX-512 CPU
    # is half the float32 GEMM throughput, so a result must say which.
    arch = next((p["architecture"] for p in m.get("threadpools", []) if p.get("architecture")), None)
    blas = (f"; BLAS {m['numpy_blas']}" + (f" ({arch} kernels)" if arch else "")) if m.get("numpy_blas") else ""
    mem = f", {m['memory_gib']} GiB" if m.get("memory_gib") else ""
    return f"{m['cpu']}, {m['cores']} cores{mem}{gpu}{blas}; python {v.get('python', '?')}, {libs}"
