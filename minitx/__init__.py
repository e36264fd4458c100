"""minitx: a Transformer engine whose every op is an executable NumPy spec.

In the repository, `backends/`, `plugins/` and `cli.py` sit beside this package; an installed
wheel carries them inside it as `minitx.backends`, `minitx.plugins` and `minitx.cli`. When run
from a source checkout we extend the package path so that both layouts import the same way.
"""
from __future__ import annotations

import os as _os

__version__ = "0.1.0"

# OpenBLAS's idle threads spin for ~2^28 cycles (~0.1 s) after every call, so during decoding they
# never sleep and take the cores from whatever runs between BLAS calls (numba kernels, the numba
# pool). Sleeping at once (2^4 cycles) measured faster on the 2-core machine
# (benchmarks/results/decode_cpu.md). OpenBLAS reads this when
# it loads, so it only takes effect when minitx is imported before NumPy (the CLI does); a user's
# own setting wins. How many threads BLAS gets, and when, is minitx/threads.py's to decide.
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
# Idle OpenMP workers that spin (libgomp's default) steal the cores from the next kernel and from
# BLAS; on a shared 2-core VM we measured 50x slowdowns (benchmarks/results/decode_cpu.md). Every
# OpenMP runtime reads this when it loads — numba's, and torch's own copy: with torch imported
# before it was set (in the numba backend, formerly), minitx's MiniLM 1x16 ran at 44 ms instead
# of 15. So it is set here, before any of them loads; a user's own setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "backends")) and _os.path.isfile(
    _os.path.join(_root, "cli.py")
):
    __path__.append(_root)  # type: ignore[name-defined]  # source checkout: find backends/, plugins/, cli.py

from .errors import MinitxError  # noqa: E402

__all__ = ["MinitxError", "__version__"]
