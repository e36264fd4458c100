"""Quantized inference on the CPU, numba backend: decode at batch 1, prefill of 128 tokens, and an
encoder batch, for fp32 / int8 (Q8_0) / w8a8 / int4 side by side (issue #20).

    python benchmarks/quant_decode_cpu.py --out benchmarks/results/quant_decode_cpu.md [--rounds 5] [--threads N]

Models: ``models.preset("gpt2", "small")`` (12 layers, d 768, vocab 50257, tied LM head) and
``models.preset("bert", "small")`` (the all-MiniLM-L6-v2 shape), random weights (seed 0), each
rewritten by ``minitx.plugin.optimize`` with ``quant:int8`` (``linear_q8_0``: int8 weights and
activations in blocks of 32, AVX2 8-bit multiply-adds), ``quant:w8a8`` and ``quant:int4,group=32``
— the path ``minitx optimize --plugin quant:int8`` writes. Everything runs in this one process on
the engine's thread budget (``minitx.threads``); every round times every (workload, variant) once,
variants alternating, so load from other jobs hits all of them alike. Reported: the median over
rounds, and each variant's speed relative to fp32 as the median of per-round ratios. The roofline
of a decode step is the bytes of every parameter (each weight is read once per token; the tied
table once, as the LM head) over the machine's read bandwidth (``machine.read_bandwidth``).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import minitx  # noqa: E402,F401 — before NumPy, as in the CLI

import numpy as np  # noqa: E402

VARIANTS = ["fp32", "quant:int8", "quant:w8a8", "quant:int4,group=32"]
ENCODER_VARIANTS = ["fp32", "quant:int8", "quant:w8a8"]


def _build(base, v):
    from minitx import plugin
    from minitx.validate import Calibration

    return base if v == "fp32" else plugin.optimize(base, [v], calib=Calibration.random(1, 8), force=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=16, help="decode steps timed per round")
    ap.add_argument("--prefill", type=int, default=128, help="prompt tokens of the prefill workload")
    ap.add_argument("--layers", type=int, default=12, help="fewer for a smoke run")
    ap.add_argument("--threads", type=int, default=0, help="the engine's thread budget (0: every core)")
    ap.add_argument("--out", "-o", default=os.path.join(ROOT, "benchmarks", "results", "quant_decode_cpu.md"))
    args = ap.parse_args()

    from minitx import bench, machine, models, threads
    from minitx.model import Model
    from minitx.outputs import atomic_write

    n_threads = threads.configure(args.threads)
    info = machine.info()
    load0 = os.getloadavg()
    bw = machine.read_bandwidth()
    t_start = time.perf_counter()
    gpt = Model.from_config({**models.preset("gpt2", "small"), "n_layers": args.layers}, seed=0)
    enc = Model.from_config(models.preset("bert", "small"), seed=0)
    dec = {v: _build(gpt, v) for v in VARIANTS}
    encs = {v: _build(enc, v) for v in ENCODER_VARIANTS}
    nbytes = {v: sum(int(np.asarray(p).nbytes) for p in m.params.values()) for v, m in dec.items()}
    runners = {v: bench._MinitxRunner(m, ["numba"]) for v, m in dec.items()}
    erun = {v: bench._MinitxRunner(m, ["numba"]) for v, m in encs.items()}
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, gpt.vocab_size, (1, args.prefill))
    sents = rng.integers(0, enc.vocab_size, (32, 128))

    def timed(fn):
        """(wall s, CPU s of this process): CPU time counts what the cores did for us, so it moves
        less than wall time when other jobs take the cores (stalls on memory still count)."""
        t, c = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - t, time.process_time() - c

    def decode(r):
        logits, st = r.prefill(prompt[:, :8])
        box = [logits[:, -1].argmax(-1)[:, None], st]

        def run():
            for _ in range(args.steps):
                lg, box[1] = r.step(box[0], box[1])
                box[0] = lg[:, -1].argmax(-1)[:, None]
        wall, cpu = timed(run)
        return args.steps / wall, args.steps / cpu

    def prefill(r):
        wall, cpu = timed(lambda: r.prefill(prompt))
        return wall * 1e3, cpu * 1e3

    def encode(r):
        wall, cpu = timed(lambda: r.encode(sents))
        return sents.shape[0] / wall, sents.shape[0] / cpu

    work = {"decode tok/s": (decode, runners), f"prefill {args.prefill} ms": (prefill, runners),
            "MiniLM 32x128 sent/s": (encode, erun)}
    for fn, rs in work.values():  # warm-up: JIT, buffers
        for r in rs.values():
            fn(r)
    res: dict[str, dict[str, list[float]]] = {w: {v: [] for v in rs} for w, (_, rs) in work.items()}
    cpu: dict[str, dict[str, list[float]]] = {w: {v: [] for v in rs} for w, (_, rs) in work.items()}
    loads = []
    for k in range(args.rounds):
        for w, (fn, rs) in work.items():
            for v, r in rs.items():
                wall, c = fn(r)
                res[w][v].append(wall)
                cpu[w][v].append(c)
        loads.append(os.getloadavg()[0])
        print(f"round {k + 1}: " + "; ".join(f"{w}: " + ", ".join(f"{v} {x[-1]:.1f}" for v, x in d.items())
                                              for w, d in res.items()) + f" (load {loads[-1]:.2f})", flush=True)

    def ratio(w, v, src=res):  # > 1: faster than fp32 (prefill is a time, the others rates)
        a, b = src[w][v], src[w]["fp32"]
        return statistics.median((y / x) if "ms" in w else (x / y) for x, y in zip(a, b))

    lines = ["# Quantized inference on the CPU (numba backend): decode, prefill, encoder", "",
             f"Date: {time.strftime('%Y-%m-%d %H:%M')}  ",
             f"Machine: {machine.summary(info)}  ",
             f"Threads: {n_threads} (minitx.threads budget); read bandwidth {bw / 1e9:.1f} GB/s (best pass)  ",
             f"Load average at start: {load0[0]:.2f}, {load0[1]:.2f}, {load0[2]:.2f}; after each round: "
             + ", ".join(f"{x:.2f}" for x in loads), "",
             f"Reproduce: `python benchmarks/quant_decode_cpu.py --out benchmarks/results/quant_decode_cpu.md "
             f"--rounds {args.rounds}" + (f" --threads {args.threads}" if args.threads else "")
             + f"` ({time.perf_counter() - t_start:.0f} s here)", "",
             f"GPT-2-small shape ({args.layers} layers, d 768, vocab 50257, tied head), random weights; decode: "
             f"{args.steps} greedy steps at batch 1 after an 8-token prompt; prefill: {args.prefill} tokens at batch 1. "
             "MiniLM: all-MiniLM-L6-v2 shape, 32 sentences x 128 tokens. All in one process, variants interleaved "
             f"round by round, median of {args.rounds} rounds; \"vs fp32\" = median of per-round ratios "
             "(> 1: faster); \"CPU\" columns: the same from the process's CPU time instead of wall time "
             "(less moved by other jobs on a shared machine; the roofline is a wall-time bound).", "",
             "| weights | op of the linears | param MiB | decode tok/s | vs fp32 | vs fp32 (CPU) | roofline tok/s | "
             f"% of roofline | prefill {args.prefill} ms | vs fp32 | vs fp32 (CPU) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ops_of = {v: sorted({n.op for n in m.graph.nodes if n.op.startswith("linear")}) for v, m in dec.items()}
    dw, pw = "decode tok/s", f"prefill {args.prefill} ms"
    for v in VARIANTS:
        d = statistics.median(res[dw][v])
        roof = bw / nbytes[v]
        lines.append(f"| `{v}` | {', '.join(ops_of[v])} | {nbytes[v] / 2**20:.0f} | {d:.1f} | {ratio(dw, v):.2f}x | "
                     f"{ratio(dw, v, cpu):.2f}x | {roof:.0f} | {d / roof:.0%} | {statistics.median(res[pw][v]):.0f} | "
                     f"{ratio(pw, v):.2f}x | {ratio(pw, v, cpu):.2f}x |")
    ew = "MiniLM 32x128 sent/s"
    lines += ["", "| MiniLM 32x128 | sentences/s | vs fp32 | vs fp32 (CPU) |", "|---|---:|---:|---:|"]
    lines += [f"| `{v}` | {statistics.median(res[ew][v]):.1f} | {ratio(ew, v):.2f}x | {ratio(ew, v, cpu):.2f}x |"
              for v in ENCODER_VARIANTS]
    lines += ["", "## Every round", "", "```"]
    for w, d in res.items():
        for v, x in d.items():
            lines.append(f"{w:24s} {v:22s} " + " ".join(f"{y:7.1f}" for y in x) + "   CPU: "
                         + " ".join(f"{y:7.1f}" for y in cpu[w][v]))
    lines += ["```", ""]
    text = "\n".join(lines)
    with atomic_write(args.out) as f:
        f.write(text.encode())
    print(text)


if __name__ == "__main__":
    main()
