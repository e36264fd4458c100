"""Where unstructured (CSR) pruning starts to beat dense on the numba backend: one GPT-2-small
MLP up projection (768 → 3072), dense float32 (BLAS) against ``sparse_linear``'s numba kernel at
a range of sparsities and 2:4 (``nm_linear``), for decode (1 row) and prefill (128 rows).

    python benchmarks/sparse_crossover.py > benchmarks/results/sparse_crossover.md

In-process A/B: each round times dense and every sparsity once, in alternating order; the table
gives the median over rounds and the ratio dense / sparse (> 1: sparse is faster). The machine
is shared, so only ratios are quoted, with the load average at start and end.
"""
import os
import time

import numpy as np

from backends.numba_cpu import sparse as K
from plugins.sparsity import to_csr, to_nm

SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
ROUNDS = 15


def _time(fn, reps):
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def main() -> None:
    rng = np.random.default_rng(0)
    n_in, n_out = 768, 3072
    W = rng.standard_normal((n_in, n_out)).astype(np.float32)
    print(f"load average at start: {os.getloadavg()}\n")
    print(f"| rows | sparsity | dense / sparse (median of {ROUNDS} rounds) |\n|---|---|---|")
    for rows, reps in ((1, 50), (128, 3)):
        x = rng.standard_normal((rows, n_in)).astype(np.float32)
        cases = {}
        for sp in SPARSITIES:
            keep = np.abs(W) > np.quantile(np.abs(W), sp)
            data, idx, ptr = to_csr(W, keep)
            args = (data.astype(np.float32), idx, ptr)
            K.sparse_linear(x, *args, shape=(n_out, n_in))   # compile
            cases[sp] = (lambda a=args, x=x: K.sparse_linear(x, *a, shape=(n_out, n_in)))
        g = np.abs(W).reshape(n_in // 4, 4, n_out)
        keep = (np.argsort(np.argsort(-g, axis=1), axis=1) < 2).reshape(n_in, n_out)   # 2 largest of 4
        vals, pos = to_nm(W, keep, 2, 4)
        K.nm_linear(x, vals, pos, n=2, m=4, in_features=n_in)
        cases["2:4"] = (lambda x=x: K.nm_linear(x, vals, pos, n=2, m=4, in_features=n_in))
        dense = lambda x=x: x @ W
        times = {k: [] for k in ("dense", *SPARSITIES, "2:4")}
        for r in range(ROUNDS):
            order = ["dense", *SPARSITIES, "2:4"] if r % 2 == 0 else ["2:4", *SPARSITIES, "dense"]
            for k in order:
                times[k].append(_time(dense if k == "dense" else cases[k], reps))
        d = np.median(times["dense"])
        for sp in (*SPARSITIES, "2:4"):
            label = sp if isinstance(sp, str) else f"{sp:.2f}"
            print(f"| {rows} | {label} | {d / np.median(times[sp]):.2f} |", flush=True)
    print(f"\nload average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
