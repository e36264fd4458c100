"""In-process A/B of the numba attention kernels: each sparse pattern against dense attention.

    python benchmarks/attention_patterns_cpu.py [--lengths 500,1024,4096] [--rounds 5] [-o FILE.md]

One causal prefill of GPT-2-small's attention shape (12 heads of 64, batch 1) per call, and one
decode step (one query against a cache of length − 1 keys, as generation runs it). Dense and
the pattern alternate within every round (dense, pattern, dense, pattern, ...), so a change in the
machine's load hits both alike; the figure is the ratio of medians, dense / pattern (> 1: the
pattern is faster). The load average is written beside the results: on a shared machine quote
ratios, not absolute times.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import minitx  # noqa: E402,F401 — before NumPy, as in the CLI: it sets OpenBLAS's thread timeout
import numpy as np  # noqa: E402

from minitx.backends.numba_cpu import attention as A  # noqa: E402
from minitx.backends.numba_cpu import sparse as SP  # noqa: E402
from minitx.outputs import atomic_write  # noqa: E402

PATTERNS = {"local (window 128)": dict(pattern="local", window=128),
            "block (64, 1 global)": dict(pattern="block", block=64, n_global=1),
            "strided (64)": dict(pattern="strided", stride=64),
            "top-k (k 32)": dict(pattern="topk", topk=32),
            "threshold (0.01)": dict(pattern="threshold", threshold=0.01)}
H, D = 12, 64


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run(lengths: list[int], rounds: int, only: list[str] | None) -> list[tuple[int, str, str, float, float, float]]:
    r = np.random.default_rng(0)
    rows = []
    for T in lengths:
        q, k, v = (r.standard_normal((1, T, H * D), dtype=np.float32) for _ in range(3))
        a = dict(n_heads=H, n_kv_heads=H, causal=True)
        # prefill: all T queries at once; decode: the last query against the other T − 1 keys as a cache
        calls = {"prefill": ((q, k, v), rounds),
                 "decode": ((q[:, -1:], k[:, -1:], v[:, -1:], k[:, :-1], v[:, :-1]), rounds * 8)}
        for mode, (args, n) in calls.items():
            dense = lambda args=args: A.attention(*args, **a)  # noqa: E731
            dense()
            for name, pat in PATTERNS.items():
                if only and not any(o in name for o in only):
                    continue
                sp = lambda pat=pat, args=args: SP.sparse_attention(*args, **a, **pat)  # noqa: E731
                sp()
                td, ts = [], []
                for _ in range(n):
                    td.append(_time(dense))
                    ts.append(_time(sp))
                md, ms = statistics.median(td), statistics.median(ts)
                rows.append((T, mode, name, md * 1e3, ms * 1e3, md / ms))
                print(f"T={T:5d} {mode:7s} {name:22s} dense {md * 1e3:8.2f} ms  pattern {ms * 1e3:8.2f} ms  "
                      f"ratio {md / ms:5.2f}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="500,1024,4096")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", default="", help="comma-separated substrings of pattern names")
    ap.add_argument("-o", "--output", default="")
    args = ap.parse_args()
    load0 = os.getloadavg()
    rows = run([int(x) for x in args.lengths.split(",")], args.rounds,
               [s for s in args.only.split(",") if s] or None)
    load1 = os.getloadavg()
    lines = ["# Sparse attention patterns vs dense attention (numba, CPU)", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.platform()}; "
             f"NUMBA_NUM_THREADS={os.environ.get('NUMBA_NUM_THREADS', 'default')}. "
             f"Load average (1, 5, 15 min) before {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, "
             f"after {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}: the machine is shared, quote the ratios.", "",
             f"Causal prefill and decode step, batch 1, {H} heads of {D} (GPT-2-small's attention), float32; "
             f"median of {args.rounds} alternating rounds (decode: {8 * args.rounds}). Command: `python benchmarks/attention_patterns_cpu.py "
             f"--lengths {args.lengths} --rounds {args.rounds}`.", "",
             "| keys | step | pattern | dense ms | pattern ms | dense / pattern |", "|---:|---|---|---:|---:|---:|"]
    lines += [f"| {T} | {m} | {n} | {d:.2f} | {s:.2f} | {x:.2f} |" for T, m, n, d, s, x in rows]
    if args.output:
        with atomic_write(args.output) as f:
            f.write(("\n".join(lines) + "\n").encode())


if __name__ == "__main__":
    main()
