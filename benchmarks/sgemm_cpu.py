"""float32 GEMM on one core: NumPy's OpenBLAS against minitx's AVX-512 kernel (backends/numba_cpu/sgemm.py).

    python benchmarks/sgemm_cpu.py --out benchmarks/results/sgemm_cpu.md [--rounds 9]

Shapes: the prefill linears of GPT-2 small and MiniLM at 128 tokens (x (M, K) · W (K, N)), MiniLM's
QKV at 32 × 128 tokens, and GPT-2's tied head x · Eᵀ at 128 tokens. Per round each engine runs
each shape once, in alternating order; reported is the best CPU time over rounds as GFLOP/s (2MKN
per second), both on one thread. The table is made twice: with the environment as it is (this
project's sets ``OPENBLAS_CORETYPE=Haswell``, AVX2 kernels) and in a child process without
``OPENBLAS_CORETYPE``, where OpenBLAS picks its kernels itself (SkylakeX's AVX-512 on Zen 5).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import minitx  # noqa: E402,F401 — before NumPy, as in the CLI

import numpy as np  # noqa: E402

from minitx import machine, threads  # noqa: E402
from minitx.outputs import atomic_write  # noqa: E402

SHAPES = [("GPT-2 QKV", 128, 768, 2304, False), ("GPT-2 MLP up", 128, 768, 3072, False),
          ("GPT-2 MLP down", 128, 3072, 768, False), ("MiniLM MLP up", 128, 384, 1536, False),
          ("MiniLM MLP down", 128, 1536, 384, False), ("MiniLM QKV, 32 × 128", 4096, 384, 1152, False),
          ("GPT-2 head x·Eᵀ", 128, 768, 50257, True)]


def measure(rounds: int) -> dict:
    from minitx.backends.numba_cpu import sgemm
    threads.configure(1)
    rng = np.random.default_rng(0)
    out = {"machine": machine.summary(machine.info()), "rows": []}
    for name, M, K, N, tr in SHAPES:
        x = rng.standard_normal((M, K)).astype(np.float32)
        w = rng.standard_normal((N, K) if tr else (K, N)).astype(np.float32)
        ref = x.astype(np.float64) @ (w.T if tr else w).astype(np.float64)
        engines = {"openblas": lambda: x @ (w.T if tr else w),
                   "minitx": lambda: sgemm.gemm(x, w, transposed=tr, parallel=False)}
        for f in engines.values():  # warm-up, and the same product
            got = f()
            assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max(), name
        best = {k: float("inf") for k in engines}
        for r in range(rounds):
            for k in (list(engines) if r % 2 == 0 else list(engines)[::-1]):
                t = time.process_time()
                engines[k]()
                best[k] = min(best[k], time.process_time() - t)
        flop = 2 * M * K * N / 1e9
        out["rows"].append([name, f"{M} × {K} × {N}", round(flop / best["openblas"]), round(flop / best["minitx"]),
                            best["openblas"] / best["minitx"]])
    return out


def table(res: dict) -> list[str]:
    lines = [f"Machine: {res['machine']}", "",
             "| product | M × K × N | OpenBLAS GFLOP/s | minitx sgemm GFLOP/s | minitx / OpenBLAS |",
             "|---|---|---:|---:|---:|"]
    lines += [f"| {a} | {b} | {c} | {d} | {e:.2f}x |" for a, b, c, d, e in res["rows"]]
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--json", action="store_true", help="print the measurement as JSON (the child run)")
    a = ap.parse_args(argv)
    if a.json:
        print(json.dumps(measure(a.rounds)))
        return
    t0 = time.time()
    load = "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    here = measure(a.rounds)
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    child = subprocess.run([sys.executable, os.path.abspath(__file__), "--json", "--rounds", str(a.rounds)],
                           env=env, capture_output=True, text=True, check=True)
    unpinned = json.loads(child.stdout.strip().splitlines()[-1])
    lines = ["# float32 GEMM, one core: OpenBLAS against minitx's AVX-512 kernel", "",
             f"Command: `python benchmarks/sgemm_cpu.py --out {a.out} --rounds {a.rounds}`", "",
             f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average at start {load}; "
             f"{a.rounds} interleaved rounds, best CPU time, one thread each.", "",
             f"## Environment as set (OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')})", ""]
    lines += table(here)
    lines += ["", "## Without OPENBLAS_CORETYPE (OpenBLAS chooses its kernels)", ""] + table(unpinned)
    lines += ["", f"Load average at the end {'{:.2f} {:.2f} {:.2f}'.format(*os.getloadavg())}; "
              f"run time {time.time() - t0:.0f} s.", ""]
    with atomic_write(a.out) as f:
        f.write("\n".join(lines).encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
