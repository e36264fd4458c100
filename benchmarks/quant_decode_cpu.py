"""Quantized decode on the CPU: tokens/s and file size of GPT-2-small-shaped models, numba backend.

    python benchmarks/quant_decode_cpu.py [--rounds 9] [--steps 24] [-o benchmarks/results/quant_decode_cpu.md]

Model: ``models.preset("gpt2", "small")`` (12 layers, 768 wide, vocab 50257, tied LM head), random
weights (seed 0). Variants: fp32, ``quant:int8`` (with and without ``embeddings=false``),
``quant:int8_block``, ``quant:int4,group=32`` (int4 embedding table and LM head),
``quant:int4,group=32,embeddings=int8`` and ``quant:float16``. Each is saved once (the file
sizes), then every (round, variant) decodes in a fresh subprocess that loads the file — variants
alternate round by round, so load from other jobs on a shared machine hits all of them alike —
and the report gives the median of the rounds, every round's value, and speed-ups as the median of
per-round ratios to fp32. Batch 1, greedy, after an
8-token prompt and one warm-up step (JIT). Finally one in-process profile of a decode step (time
per op, summed over the graph's nodes) shows where fp32 and int8 spend the step.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import minitx  # noqa: E402,F401 — before NumPy, as in the CLI: it sets OpenBLAS's thread timeout

import numpy as np  # noqa: E402

VARIANTS = ["fp32", "quant:int8", "quant:int8,embeddings=false", "quant:int8_block", "quant:int4,group=32",
            "quant:int4,group=32,embeddings=int8", "quant:float16"]


def _decode(path: str, steps: int) -> float:
    """tokens/s of ``steps`` greedy decode steps at batch 1 on the numba backend."""
    from minitx import generate as gen
    from minitx import modelfile

    m = modelfile.load(path)
    st = gen.empty_state(m, 1)
    logits, st = gen.step(m, np.arange(1, 9)[None], st, backends=("numba",))
    nxt = np.array([[int(logits[0, -1].argmax())]])
    logits, st = gen.step(m, nxt, st, backends=("numba",))  # warm-up (JIT, cache buffers)
    t = time.perf_counter()
    for _ in range(steps):
        nxt = np.array([[int(logits[0, -1].argmax())]])
        logits, st = gen.step(m, nxt, st, backends=("numba",))
    return steps / (time.perf_counter() - t)


def _profile(path: str, steps: int = 8) -> tuple[float, dict[str, float]]:
    """ms per decode step and ms per op (summed over its nodes), timing each executor node."""
    from minitx import generate as gen
    from minitx import modelfile
    from minitx.executor import Executor

    per_op: dict[str, float] = collections.defaultdict(float)
    orig = Executor._run_node

    def timed(self, node, *a, **k):
        t = time.perf_counter()
        orig(self, node, *a, **k)
        per_op[f"{node.op} ({self.placement[node.name].name})"] += time.perf_counter() - t

    m = modelfile.load(path)
    st = gen.empty_state(m, 1)
    _, st = gen.step(m, np.arange(1, 9)[None], st, backends=("numba",))
    _, st = gen.step(m, np.array([[1]]), st, backends=("numba",))
    Executor._run_node = timed
    try:
        t = time.perf_counter()
        for _ in range(steps):
            _, st = gen.step(m, np.array([[1]]), st, backends=("numba",))
        total = (time.perf_counter() - t) / steps
    finally:
        Executor._run_node = orig
    return total * 1e3, {k: v / steps * 1e3 for k, v in per_op.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--layers", type=int, default=12, help="fewer for a smoke run")
    ap.add_argument("-o", "--output", default=os.path.join(ROOT, "benchmarks", "results", "quant_decode_cpu.md"))
    ap.add_argument("--child", nargs=2, metavar=("PATH", "STEPS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps({"tps": _decode(args.child[0], int(args.child[1]))}))
        return

    from minitx import machine, models, modelfile, plugin
    from minitx.bench import write_text_atomic
    from minitx.model import Model
    from minitx.validate import Calibration

    info = machine.info()
    cfg = {**models.preset("gpt2", "small"), "n_layers": args.layers}
    base = Model.from_config(cfg, seed=0)
    tmp = tempfile.mkdtemp()
    paths, sizes, cosines = {}, {}, {}
    for v in VARIANTS:
        print(f"building {v} ...", flush=True)
        m = base if v == "fp32" else plugin.optimize(base, [v], calib=Calibration.random(1, 8), force=True)
        if v != "fp32":
            val = m.meta["rewrites"][-1]["validation"]
            cosines[v] = val["outputs"][0]["min_row_cosine"]
        paths[v] = os.path.join(tmp, f"{len(paths)}.npz")
        modelfile.save(m, paths[v])
        sizes[v] = os.path.getsize(paths[v])
    load = os.getloadavg()
    tps: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        for v in VARIANTS:
            out = subprocess.run([sys.executable, __file__, "--child", paths[v], str(args.steps)], check=True,
                                 capture_output=True, text=True, cwd=ROOT).stdout
            tps[v].append(json.loads(out.strip().splitlines()[-1])["tps"])
            print(f"round {r + 1} {v}: {tps[v][-1]:.1f} tok/s", flush=True)
    prof = {v: _profile(paths[v]) for v in ("fp32", "quant:int8")}
    for p in paths.values():
        os.unlink(p)

    med = {v: statistics.median(x) for v, x in tps.items()}
    # Ratios pair each round's variant with the same round's fp32 run (they ran back to back), so a
    # machine whose speed drifts between rounds moves both alike; the median of those ratios is quoted.
    ratio = {v: statistics.median(a / b for a, b in zip(x, tps["fp32"])) for v, x in tps.items()}
    s0 = sizes["fp32"]
    lines = ["# Quantized decode on the CPU (numba backend, GPT-2-small shape)", "",
             f"Date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}  ",
             "Machine: " + machine.summary(info) + f"  ",
             f"Load average before timing: {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}", "",
             f"Reproduce: `python benchmarks/quant_decode_cpu.py --rounds {args.rounds} --steps {args.steps}`", "",
             f"Model: {cfg['n_layers']} layers, d_model {cfg['d_model']}, vocab {cfg['vocab_size']}, tied LM head, "
             f"random weights (seed 0). Batch 1, greedy, {args.steps} decode steps after an 8-token prompt and a "
             f"warm-up step; each (round, variant) in a fresh process loading the saved file; variants alternate; "
             f"median of {args.rounds} rounds; \"vs fp32\" is the median over rounds of the ratio to that round's fp32 run.", "",
             "| weights | file MiB | smaller than fp32 | min row cosine vs fp32 (validation) | tokens/s (median) | vs fp32 |",
             "|---|---:|---:|---:|---:|---:|"]
    for v in VARIANTS:
        c = f"{cosines[v]:.5f}" if v in cosines else "-"
        lines.append(f"| `{v}` | {sizes[v] / 2**20:.0f} | {s0 / sizes[v]:.2f}x | {c} | {med[v]:.1f} | "
                     f"{ratio[v]:.2f}x |")
    r8, r4 = ratio["quant:int8"], s0 / sizes["quant:int4,group=32"]
    lines += ["", "## Targets (issue 7)", "", "| target | measured | met |", "|---|---:|---|",
              f"| int8 weight-only decode >= 2x fp32 tokens/s (batch 1) | {r8:.2f}x | {'yes' if r8 >= 2 else 'NO'} |",
              f"| int4-g32 file >= 6x smaller than fp32 | {r4:.2f}x | {'yes' if r4 >= 6 else 'NO'} |",
              "", "## Per round (tokens/s)", "", "```"]
    for v in VARIANTS:
        lines.append(f"{v:40s} " + " ".join(f"{x:6.1f}" for x in tps[v]))
    lines += ["", "int8 / fp32, per round:".ljust(41) + " ".join(
        f"{a / b:6.2f}" for a, b in zip(tps["quant:int8"], tps["fp32"])), "```", "", "## Where a decode step goes (one in-process profile, ms per step, top ops)", ""]
    for v, (total, ops_) in prof.items():
        top = sorted(ops_.items(), key=lambda kv: -kv[1])[:8]
        lines += [f"`{v}`: {total:.1f} ms per step ({sum(ops_.values()):.1f} ms inside nodes)", "",
                  "| op (backend) | ms | share |", "|---|---:|---:|"]
        lines += [f"| {k} | {ms:.2f} | {ms / total:.0%} |" for k, ms in top] + [""]
    write_text_atomic(args.output, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
