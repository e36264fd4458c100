"""Structured pruning speeds up in proportion: GPT-2-small with a fraction f of its attention heads
and of its MLP neurons removed (``sparsity:weights=heads`` then ``sparsity:weights=ffn``), timed
on the numba backend against f.

    python benchmarks/structured_pruning.py --out benchmarks/results/structured_pruning.md [--rounds 7]

Pruning heads and neurons rewrites the model into a smaller dense one (narrower qkv/out and
up/down matrices, fewer heads in attention and in the KV cache), so the blocks' work falls with
1 − f; the token embedding and the tied LM head (50257 × 768, 39M of the 124M weights) do not
shrink. Each round times every model once (prefill of 128 tokens; one decode step over a
128-token cache), alternating the order between rounds; medians over rounds. Every kernel call is
timed too (the backend's kernels wrapped), so the blocks' time is measured, not inferred: the
model's time less its embedding lookups and LM head (``embedding``, ``matmul``), split into the
linears, attention, and the rest (norms, GELU, residual adds, splits). "Proportional" means the
blocks' time falls as 1 − f. (An earlier version fitted t = a + b·(1 − f) over the four points
and read the blocks' speed-up off the fit: at load average 9 that put 25% pruning at 1.13x, an
artefact of the fit — a few percent of noise in one point moves (t₀ − a)/(t − a) by tens of
percent.) Random weights (speed does not depend on them); calibration on random tokens,
validation off (accuracy is benchmarks/results/plugins_sparse_lowrank.md's business).
"""
from __future__ import annotations

import argparse
import collections
import datetime
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import minitx  # noqa: E402,F401 — before NumPy, as in the CLI: it sets OpenBLAS's thread timeout

import numpy as np  # noqa: E402

from benchmarks import report  # noqa: E402
from minitx import feeds, machine, models, plugin, threads  # noqa: E402
from minitx.executor import Executor  # noqa: E402
from minitx.model import Model  # noqa: E402
from minitx.validate import Calibration  # noqa: E402

FRACTIONS = (0.0, 0.25, 0.5, 0.75)
PROMPT = 128
FIXED = ("embedding", "matmul")   # what pruning does not touch: the lookups and the tied LM head
PARTS = ("linear", "attention")   # the blocks' parts shown apart; "rest" is the other block ops


class OpClock:
    """Wraps a backend's kernels so that every call's time is added to its op's total."""

    def __init__(self, backend) -> None:
        self.t: dict[str, float] = collections.defaultdict(float)
        backend.kernels = {op: self._timed(op, fn) for op, fn in backend.kernels.items()}

    def _timed(self, op, fn):
        def run(*args, **kw):
            t = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                self.t[op] += time.perf_counter() - t
        return run

    def take(self) -> dict[str, float]:
        """The totals since the last take, by part: fixed, linear, attention, rest, blocks."""
        t, self.t = self.t, collections.defaultdict(float)
        fixed = sum(t[op] for op in FIXED)
        parts = {k: t[k] for k in PARTS}
        blocks = sum(t.values()) - fixed
        return {"fixed": fixed, **parts, "rest": blocks - sum(parts.values()), "blocks": blocks}


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
    clock = OpClock(backend)
    ms = {f: pruned(base, f) for f in FRACTIONS}
    run = {f: runners(m, backend) for f, m in ms.items()}
    clock.take()
    times = {(f, k): [] for f in FRACTIONS for k in (0, 1)}
    split = {(f, k): collections.defaultdict(list) for f in FRACTIONS for k in (0, 1)}
    for r in range(args.rounds):
        for f in (FRACTIONS if r % 2 == 0 else FRACTIONS[::-1]):
            for k, reps in ((0, 1), (1, 10)):
                t = time.perf_counter()
                for _ in range(reps):
                    run[f][k]()
                times[(f, k)].append((time.perf_counter() - t) / reps)
                for part, v in clock.take().items():
                    split[(f, k)][part].append(v / reps)
        log.append(f"round {r + 1}: load average {os.getloadavg()}")
    med = {key: statistics.median(v) for key, v in times.items()}
    part = {key: {p: statistics.median(v) for p, v in d.items()} for key, d in split.items()}
    lines = ["# Structured pruning: speed against the fraction pruned (GPT-2-small, numba)", "",
             f"Run {datetime.datetime.now().isoformat(timespec='seconds')} with "
             f"`python benchmarks/structured_pruning.py --rounds {args.rounds} --threads {args.threads}` "
             f"({time.perf_counter() - t0:.0f} s).", "",
             f"Machine: {machine.summary(machine.info())}; thread budget {threads.budget()}", "",
             f"Heads and MLP neurons each pruned by f; prefill of {PROMPT} tokens and one decode step over a "
             f"{PROMPT}-token cache, batch 1, median of {args.rounds} interleaved rounds. Every kernel call "
             "timed: *fixed* = embedding lookups and the tied LM head (not pruned), *blocks* = everything else, "
             "split into the linears, attention and the rest (norms, GELU, adds, splits). Speed-ups are the "
             "unpruned model's time over the pruned one's; proportional is 1/(1 − f).", ""]
    for k, what in ((0, "prefill"), (1, "decode step")):
        p0, t0_ = part[(0.0, k)], med[(0.0, k)]
        lines += [f"## {what}", "",
                  "| f pruned | weights | time | vs unpruned | fixed | blocks | blocks' speed-up | linears' | "
                  "attention's | rest's | 1/(1 − f) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for f in FRACTIONS:
            p, t = part[(f, k)], med[(f, k)]
            lines.append(f"| {f:.2f} | {ms[f].nbytes() / 2**20:.0f} MiB | {t * 1e3:.2f} ms | {t0_ / t:.2f}× | "
                         f"{p['fixed'] * 1e3:.2f} ms | {p['blocks'] * 1e3:.2f} ms | {p0['blocks'] / p['blocks']:.2f}× | "
                         f"{p0['linear'] / p['linear']:.2f}× | {p0['attention'] / p['attention']:.2f}× | "
                         f"{p0['rest'] / p['rest']:.2f}× | {1 / (1 - f):.2f}× |")
        lines.append("")
    lines += ["Load average during the run:", "", *[f"- {s}" for s in log], ""]
    report.write(lines, args.out)


if __name__ == "__main__":
    main()
