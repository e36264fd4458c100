"""Speed that holds on a busy machine (issue #20): minitx numba, the NumPy spec and PyTorch, each
with and without one competing busy process, interleaved round by round.

Workloads: the bundled model's prefill at batch 1 (32 tokens) and decode at batch 1, and an
all-MiniLM-L6-v2-shaped encoder (random weights, seed 0) on 32 sentences x 128 tokens and on
1 sentence x 16 tokens. Engines: minitx numba with the default thread budget; the same with
OpenBLAS threaded on every call (how it ran before #20: ``threads.BLAS_PARALLEL_MIN = 0``); the
NumPy spec; PyTorch (the direct torch build of the same weights, ``torch.set_num_threads`` = the
budget, and OpenMP's own wait policy, not minitx's). Each engine lives in its own worker process,
as a user would run it (in one process, torch's OpenMP would sleep when idle, as minitx has every
OpenMP runtime do; before minitx set that on import, torch's spinning pool slowed the minitx
kernels 2-3x in a first version of this script). The parent sends the workers their calls one at
a time, so only one computes at any moment.

Each round runs both conditions — quiet, then with one ``while True: pass`` process (the order
alternates between rounds) — and in each condition every workload on every engine in turn (short
workloads several times, the engines alternating between samples, their order rotating),
so that changes of the machine's own load hit all of them alike. The load average is recorded at
the start, at every round and at the end: on a shared machine "quiet" is only as quiet as the
others let it be, which is why the targets are ratios.

Targets: under load, numba no slower than the spec, and numba's slowdown (busy / quiet) no worse
than PyTorch's.

    python benchmarks/busy_cpu.py [--rounds 3] [--out benchmarks/results/busy_cpu.md]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_OMP = os.environ.get("OMP_WAIT_POLICY")  # before minitx sets its default: torch's worker keeps it
sys.path.insert(0, ROOT)
import minitx  # noqa: E402,F401 — before NumPy, as in the CLI

import numpy as np  # noqa: E402
from minitx import bench, bundled, machine, modelfile, models, threads  # noqa: E402
from minitx.model import Model  # noqa: E402

ENGINES = ("numba", "numba, BLAS threaded on every call (before #20)", "numpy spec", "torch")


# samples per workload, condition and round: short calls more often, the engines alternating
REPS = {"bundled prefill 1x32": 10, "bundled decode 1x16 steps": 3, "MiniLM 32x128": 1, "MiniLM 1x16": 10}


def workloads() -> dict[str, tuple[object, object]]:
    """name → (model, the call to time given a runner)."""
    tiny = modelfile.load(bundled.default_model_path())
    minilm = Model.from_config(models.preset("bert", "small"), seed=0)
    rng = np.random.default_rng(0)
    p32 = rng.integers(0, tiny.vocab_size, (1, 32))
    s32 = rng.integers(0, minilm.vocab_size, (32, 128))
    s1 = rng.integers(0, minilm.vocab_size, (1, 16))

    def decode(r):  # 16 greedy steps after an 8-token prompt
        logits, st = r.prefill(p32[:, :8])
        for _ in range(16):
            logits, st = r.step(logits[:, -1].argmax(-1)[:, None], st)

    return {
        "bundled prefill 1x32": (tiny, lambda r: r.prefill(p32)),
        "bundled decode 1x16 steps": (tiny, decode),
        "MiniLM 32x128": (minilm, lambda r: r.encode(s32)),
        "MiniLM 1x16": (minilm, lambda r: r.encode(s1)),
    }


def runner(engine: str, model):
    if engine == "torch":
        from minitx import torchref

        torchref.set_threads(threads.budget())
        return bench._TorchRunner(torchref.build(model))
    return bench._MinitxRunner(model, ["numpy"] if engine == "numpy spec" else ["numba"])


def worker(engine: str) -> None:
    """Build ``engine``'s runners, warm them up, then time each workload named on stdin."""
    out, sys.stdout = sys.stdout, sys.stderr  # stdout carries the timings only
    if engine == "torch":  # torch's OpenMP as a user gets it, not with minitx's default
        if USER_OMP is None:
            os.environ.pop("OMP_WAIT_POLICY", None)
        else:
            os.environ["OMP_WAIT_POLICY"] = USER_OMP
    threads.configure(None)
    threads.BLAS_PARALLEL_MIN = 0 if "before" in engine else DEFAULT_MIN
    wl = workloads()
    runners = {w: runner(engine, m) for w, (m, _) in wl.items()}
    for w, r in runners.items():  # numba's kernels load, torch allocates
        wl[w][1](r)
    print("ready", file=out, flush=True)
    for line in sys.stdin:
        w = line.strip()
        t = time.perf_counter()
        wl[w][1](runners[w])
        print(time.perf_counter() - t, file=out, flush=True)


class Workers:
    """One worker process per engine, asked for one timing at a time."""

    def __init__(self) -> None:
        torch_env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        if USER_OMP is not None:
            torch_env["OMP_WAIT_POLICY"] = USER_OMP
        self.p = {e: subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", e], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True, env=torch_env if e == "torch" else None)
                  for e in ENGINES}
        for e, p in self.p.items():
            if p.stdout.readline().strip() != "ready":
                raise SystemExit(f"worker {e!r} failed to start")

    def time(self, engine: str, workload: str) -> float:
        p = self.p[engine]
        p.stdin.write(workload + "\n")
        p.stdin.flush()
        return float(p.stdout.readline())

    def close(self) -> None:
        for p in self.p.values():
            p.stdin.close()
            p.wait()


class Busy:
    """One competing process spinning on a core while the block runs."""

    def __enter__(self):
        self.p = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.3)  # let it reach the run queue
        return self

    def __exit__(self, *exc):
        self.p.kill()
        self.p.wait()


DEFAULT_MIN = threads.BLAS_PARALLEL_MIN


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None, help="write the Markdown table here (default: print it)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker)
    budget = threads.configure(None)
    reps = REPS
    workers = Workers()
    samples: dict[tuple[str, str, str], list[float]] = {}
    loads = [("start", os.getloadavg())]
    for rnd in range(a.rounds):
        for cond in (("quiet", "busy") if rnd % 2 == 0 else ("busy", "quiet")):
            ctx = Busy() if cond == "busy" else None
            if ctx:
                ctx.__enter__()
            try:
                for w in reps:
                    for i in range(reps[w]):
                        # rotate the order, so that each engine follows each other one alike (torch's
                        # OpenMP workers spin a while after each call and slow whatever runs next)
                        k = (rnd * 7 + i) % len(ENGINES)
                        for e in ENGINES[k:] + ENGINES[:k]:
                            samples.setdefault((w, e, cond), []).append(workers.time(e, w))
            finally:
                if ctx:
                    ctx.__exit__(None, None, None)
        loads.append((f"after round {rnd + 1}", os.getloadavg()))
        print(f"round {rnd + 1}/{a.rounds} done, load {os.getloadavg()[0]:.2f}", file=sys.stderr)
    workers.close()
    text = report(samples, reps, loads, budget, a.rounds)
    if a.out:
        bench.write_text_atomic(a.out, text)
    print(text)


def report(samples, wl, loads, budget: int, rounds: int) -> str:
    med = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
    mach = machine.info()
    out = ["### minitx numba, NumPy spec and PyTorch with and without one competing busy process", "",
           f"- date: {mach['date']}",
           f"- machine: {machine.summary(mach)}",
           f"- load average (1, 5, 15 min): " + "; ".join(f"{n} {l[0]:.2f} {l[1]:.2f} {l[2]:.2f}" for n, l in loads),
           f"- thread budget {budget} (minitx numba's pool; BLAS one thread except calls of at least "
           f"{DEFAULT_MIN:,} multiply-adds); torch.set_num_threads({budget})",
           f"- {rounds} interleaved rounds (quiet / busy, order alternating; every engine and workload once per "
           f"condition per round, short ones several times: prefill and MiniLM 1x16 10, decode 3; the order of "
           f"the engines rotating); each engine in its own worker process, one computing at a time; median, ms; "
           f"slowdown = busy / quiet",
           "- `python benchmarks/busy_cpu.py` — the machine is shared: compare ratios within this table, not "
           "absolute times across tables", "",
           "| workload | engine | quiet ms | busy ms | slowdown | busy vs spec |", "|---|---|---|---|---|---|"]
    for w in wl:
        spec_busy = med[(w, "numpy spec", "busy")]
        for e in ENGINES:
            q, b = med[(w, e, "quiet")], med[(w, e, "busy")]
            out.append(f"| {w} | {e} | {q:.1f} | {b:.1f} | {b / q:.2f}x | {spec_busy / b:.2f}x faster |")
    out += ["", "Targets (busy): numba no slower than the spec; numba's slowdown no worse than torch's.", "",
            "| workload | numba vs spec (busy) | numba slowdown | torch slowdown | met |", "|---|---|---|---|---|"]
    for w in wl:
        nq, nb = med[(w, "numba", "quiet")], med[(w, "numba", "busy")]
        tq, tb = med[(w, "torch", "quiet")], med[(w, "torch", "busy")]
        vs = med[(w, "numpy spec", "busy")] / nb
        ok = vs >= 1 and nb / nq <= tb / tq
        out.append(f"| {w} | {vs:.2f}x | {nb / nq:.2f}x | {tb / tq:.2f}x | {'yes' if ok else 'no'} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
