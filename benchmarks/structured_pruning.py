"""Structured pruning speeds up in proportion: GPT-2-small with a fraction f of its attention heads
and of its MLP neurons removed (``sparsity:weights=heads`` then ``sparsity:weights=ffn``), timed
on the numba backend against f.

    python benchmarks/structured_pruning.py --out benchmarks/results/structured_pruning.md [--rounds 7]

Pruning heads and neurons rewrites the model into a smaller dense one (narrower qkv/out and
up/down matrices, fewer heads in attention and in the KV cache), so the blocks' work falls with
1 − f; the token embedding and the tied LM head (50257 × 768, 39M of the 124M weights) do not
shrink. Each round times every model once (prefill of 128 tokens; one decode step over a
128-token cache), alternating the order between rounds; medians over rounds. A least-squares fit
t(f) = a + b·(1 − f) over the measured points separates the fixed part a (embeddings, head,
norms) from the prunable part b; "proportional" means the points lie on that line, i.e. the
blocks' time is b·(1 − f). Random weights (speed does not depend on them); calibration on random
tokens, validation off (accuracy is benchmarks/results/plugins_sparse_lowrank.md's business).
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import minitx  # noqa: E402,F401 — before NumPy, as in the CLI: it sets OpenBLAS's thread timeout

import numpy as np  # noqa: E402

from minitx import feeds, machine, models, plugin, threads  # noqa: E402
from minitx.executor import Executor  # noqa: E402
from minitx.model import Model  # noqa: E402
from minitx.outputs import atomic_write  # noqa: E402
from minitx.validate import Calibration  # noqa: E402

FRACTIONS = (0.0, 0.25, 0.5, 0.75)
PROMPT = 128


def pruned(base: Model, f: float) -> Model:
    if f == 0:
        return base
    m = base
    for what in ("heads", "ffn"):   # one sparsity plugin per optimize: applied one after the other
        m = plugin.optimize(m, [f"sparsity:weights={what},sparsity={f}"], calib=Calibration.random(2, 16),
                            validate=False)
    return m


def runners(model: Model, backend) -> tuple:
    """(prefill, decode step) closures on the numba backend, the decode step over the prompt's cache."""
    ex = Executor(model.graph, model.params, [backend])
    ids = np.random.default_rng(0).integers(0, model.vocab_size, (1, PROMPT))
    pre = feeds.build(model.graph, ids)
    out = ex.run(pre)
    past = {k.replace("present.", "past."): v for k, v in out.items() if k.startswith("present.")}
    step = feeds.build(model.graph, ids[:, :1], past=past)
    ex.run(step)
    return (lambda: ex.run(pre)), (lambda: ex.run(step))


def fit(fs, ts) -> tuple[float, float]:
    """Least squares t = a + b·(1 − f)."""
    A = np.stack([np.ones(len(fs)), 1 - np.asarray(fs)], axis=1)
    (a, b), *_ = np.linalg.lstsq(A, np.asarray(ts), rcond=None)
    return float(a), float(b)


def main() -> None:
    from minitx.backends.numba_cpu import NumbaBackend

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the Markdown report here (default: stdout)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="the engine's thread budget (minitx.threads); 1: BLAS "
                    "never switches to its threaded GEMM, whose cut-off (2^28 multiply-adds) the unpruned MLP "
                    "crosses at 128 tokens and the pruned ones do not — a step that is not pruning's doing")
    args = ap.parse_args()
    threads.configure(args.threads)
    t0 = time.perf_counter()
    log = [f"start: load average {os.getloadavg()}"]
    base = Model.from_config(models.preset("gpt2", "small"), seed=0)
    backend = NumbaBackend()
    ms = {f: pruned(base, f) for f in FRACTIONS}
    run = {f: runners(m, backend) for f, m in ms.items()}
    times = {(f, k): [] for f in FRACTIONS for k in (0, 1)}
    for r in range(args.rounds):
        for f in (FRACTIONS if r % 2 == 0 else FRACTIONS[::-1]):
            for k, reps in ((0, 1), (1, 10)):
                t = time.perf_counter()
                for _ in range(reps):
                    run[f][k]()
                times[(f, k)].append((time.perf_counter() - t) / reps)
        log.append(f"round {r + 1}: load average {os.getloadavg()}")
    med = {key: statistics.median(v) for key, v in times.items()}
    lines = ["# Structured pruning: speed against the fraction pruned (GPT-2-small, numba)", "",
             f"Run {datetime.datetime.now().isoformat(timespec='seconds')} with "
             f"`python benchmarks/structured_pruning.py --rounds {args.rounds} --threads {args.threads}` "
             f"({time.perf_counter() - t0:.0f} s).", "",
             f"Machine: {machine.summary(machine.info())}; thread budget {threads.budget()}", "",
             f"Heads and MLP neurons each pruned by f; prefill of {PROMPT} tokens and one decode step over a "
             f"{PROMPT}-token cache, batch 1, median of {args.rounds} interleaved rounds. Fit t = a + b·(1 − f): "
             "a = what pruning cannot remove (embeddings, LM head), b·(1 − f) = the blocks.", ""]
    for k, what in ((0, "prefill"), (1, "decode step")):
        ts = [med[(f, k)] for f in FRACTIONS]
        a, b = fit(FRACTIONS, ts)
        lines += [f"## {what}", "", f"fit: a = {a * 1e3:.2f} ms (fixed), b = {b * 1e3:.2f} ms (blocks, unpruned)", "",
                  "| f pruned | weights | time | vs unpruned | fit a + b·(1 − f) | blocks' speed-up (t₀ − a)/(t − a) "
                  "| 1/(1 − f) |", "|---|---:|---:|---:|---:|---:|---:|"]
        for f, t in zip(FRACTIONS, ts):
            lines.append(f"| {f:.2f} | {ms[f].nbytes() / 2**20:.0f} MiB | {t * 1e3:.2f} ms | {ts[0] / t:.2f}× | "
                         f"{(a + b * (1 - f)) * 1e3:.2f} ms | {(ts[0] - a) / (t - a):.2f}× | {1 / (1 - f):.2f}× |")
        lines.append("")
    lines += ["Load average during the run:", "", *[f"- {s}" for s in log], ""]
    text = "\n".join(lines) + "\n"
    if args.out:
        with atomic_write(args.out) as fh:
            fh.write(text.encode())
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
