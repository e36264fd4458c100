"""Where an encoder's time goes, per op: minitx numba against ONNX Runtime's nodes (issue #20).

An all-MiniLM-L6-v2-shaped encoder (``bert`` preset ``small``, random weights, seed 0) at batch
1 × 16 tokens and 32 × 16 (the shapes below ONNX Runtime's speed before this profile existed).
numba: every kernel of the backend wrapped with wall and process CPU time (CPU of all threads, so
a parallel kernel's CPU is its work, its wall its latency); the executor's own share is the pass
minus its kernels. ONNX Runtime: the ``minitx export`` graph in one session (the backend's
settings: the budget's threads, no spinning) with its profiler on, node time summed per node
kind. Per round each shape runs on numba, then on ONNX Runtime, so that load changes hit both;
the load average is recorded at the start and after every round. Medians over all rounds, ms
per forward pass.

    python benchmarks/encoder_ops.py [--rounds 3] [--out benchmarks/results/encoder_ops.md]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import minitx  # noqa: E402,F401 — before NumPy, as in the CLI

import numpy as np  # noqa: E402
from minitx import feeds, machine, models, onnx_export as ox, threads  # noqa: E402
from minitx.model import Model  # noqa: E402
from minitx.outputs import atomic_write  # noqa: E402

SHAPES = ((1, 16, 30), (32, 16, 6))  # batch, tokens, passes per round


class NumbaProfile:
    """The model's numba executor with every kernel timed (wall, process CPU) per op."""

    def __init__(self, model: Model) -> None:
        self.ex = model.executor(["numba"])
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        kernels = self.ex.backends[0].kernels
        for op, fn in list(kernels.items()):
            kernels[op] = self._timed(op, fn)

    def _timed(self, op, fn):
        def run(*args, **kw):
            t, c = time.perf_counter(), time.process_time()
            out = fn(*args, **kw)
            self.wall[op] += time.perf_counter() - t
            self.cpu[op] += time.process_time() - c
            return out
        return run

    def once(self, fed) -> dict[str, tuple[float, float]]:
        self.wall.clear()
        self.cpu.clear()
        t, c = time.perf_counter(), time.process_time()
        self.ex.run(fed, outputs=["embedding"])
        res = {op: (self.wall[op], self.cpu[op]) for op in self.wall}
        res["(whole pass)"] = (time.perf_counter() - t, time.process_time() - c)
        return res


def ort_session(model: Model, prefix: str):
    import onnxruntime as ort

    g = model.graph
    _, env = ox.probe_shapes(g, 2)
    ports = [ox.Port(v.name, env[v.name][1], tuple(v.shape)) for v in g.inputs]
    exported = ox.convert(g.nodes, ports, ["embedding"], {k: d for k, (_, d) in env.items()},
                          {k: s for k, (s, _) in env.items()}, model.params, name="encoder")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads.budget()
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.enable_profiling = True
    so.profile_file_prefix = prefix
    return ort.InferenceSession(exported.model.SerializeToString(), so, providers=["CPUExecutionProvider"]), env


def ort_nodes(sess, last: int) -> dict[str, float]:
    """Seconds per run and node kind over the session's ``last`` runs (its profile; ends it)."""
    path = sess.end_profiling()
    with open(path, encoding="utf-8") as f:
        events = json.load(f)
    os.remove(path)
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                  if e.get("cat") == "Session" and e["name"] == "model_run")[-last:]
    per: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and any(a <= e["ts"] <= b for a, b in runs):
            per[e["args"]["op_name"]] += e["dur"] * 1e-6
    return {k: v / max(len(runs), 1) for k, v in per.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "encoder_ops.md"))
    a = ap.parse_args()
    threads.configure(None)
    model = Model.from_config(models.preset("bert", "small"), seed=0)
    prof = NumbaProfile(model)
    rng = np.random.default_rng(0)
    fed = {(B, T): feeds.build(model.graph, rng.integers(1000, model.vocab_size, (B, T))) for B, T, _ in SHAPES}
    numba_s: dict = defaultdict(list)
    ort_s: dict = defaultdict(list)
    loads = [("start", os.getloadavg())]
    tmp = tempfile.mkdtemp(prefix="encoder_ops_")
    for rnd in range(a.rounds):
        for B, T, n in SHAPES:
            for _ in range(2):  # warm-up (and numba's first compile)
                prof.once(fed[(B, T)])
            for _ in range(n):
                for op, v in prof.once(fed[(B, T)]).items():
                    numba_s[(B, T, op)].append(v)
            sess, env = ort_session(model, os.path.join(tmp, "ort"))
            f = {v.name: np.ascontiguousarray(fed[(B, T)][v.name].astype(np.dtype(env[v.name][1])))
                 for v in model.graph.inputs}
            for _ in range(2):
                sess.run(["embedding"], f)
            walls, cpus = [], []
            for _ in range(n):
                t, c = time.perf_counter(), time.process_time()
                sess.run(["embedding"], f)
                walls.append(time.perf_counter() - t)
                cpus.append(time.process_time() - c)
            nodes = ort_nodes(sess, n)
            for k, v in nodes.items():
                ort_s[(B, T, k)].append(v)
            ort_s[(B, T, "(whole pass)")].append((statistics.median(walls), statistics.median(cpus)))
        loads.append((f"after round {rnd + 1}", os.getloadavg()))
        print(f"round {rnd + 1}/{a.rounds} done, load {os.getloadavg()[0]:.2f}", file=sys.stderr)
    with atomic_write(a.out) as fh:
        fh.write(report(numba_s, ort_s, loads, a.rounds).encode())
    print(f"wrote {a.out}", file=sys.stderr)


def report(numba_s, ort_s, loads, rounds: int) -> str:
    mach = machine.info()
    ms = lambda xs, i: statistics.median(x[i] for x in xs) * 1e3  # noqa: E731
    out = ["### Per-op time of an all-MiniLM-L6-v2-shaped encoder: minitx numba and ONNX Runtime", "",
           f"- date: {mach['date']}",
           f"- machine: {machine.summary(mach)}",
           "- load average (1, 5, 15 min): " + "; ".join(f"{n} {l[0]:.2f} {l[1]:.2f} {l[2]:.2f}" for n, l in loads),
           f"- thread budget {threads.budget()}; {rounds} rounds, each shape on numba then ONNX Runtime; "
           "median ms per forward pass",
           "- `python benchmarks/encoder_ops.py` — the machine is shared: compare within a table", ""]
    for B, T, _ in SHAPES:
        ops = sorted({op for (b, t, op) in numba_s if (b, t) == (B, T)},
                     key=lambda op: -ms(numba_s[(B, T, op)], 1) if op != "(whole pass)" else 1)
        out += [f"#### batch {B} × {T} tokens", "", "| numba op | wall ms | CPU ms |", "|---|---:|---:|"]
        kern_w = kern_c = 0.0
        for op in ops:
            w, c = ms(numba_s[(B, T, op)], 0), ms(numba_s[(B, T, op)], 1)
            if op != "(whole pass)":
                kern_w, kern_c = kern_w + w, kern_c + c
            out.append(f"| {op} | {w:.2f} | {c:.2f} |")
        whole = numba_s[(B, T, "(whole pass)")]
        out.append(f"| (executor and Python between kernels) | {ms(whole, 0) - kern_w:.2f} | {ms(whole, 1) - kern_c:.2f} |")
        nodes = sorted({op for (b, t, op) in ort_s if (b, t) == (B, T) and op != "(whole pass)"},
                       key=lambda op: -statistics.median(ort_s[(B, T, op)]))
        out += ["", "| ONNX Runtime node kind | wall ms |", "|---|---:|"]
        out += [f"| {op} | {statistics.median(ort_s[(B, T, op)]) * 1e3:.2f} |" for op in nodes]
        whole = ort_s[(B, T, "(whole pass)")]
        out += [f"| (whole pass; CPU {ms(whole, 1):.2f}) | {ms(whole, 0):.2f} |", ""]
    return "\n".join(out)


if __name__ == "__main__":
    main()
