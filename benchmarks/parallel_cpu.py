"""Tensor, pipeline and data parallelism on this machine, measured, and the cost model checked on it.

GPT-2-small shape (d 768, 12 layers, vocabulary 50257, random weights, seed 0, float32, the NumPy
spec backend). Each configuration runs in a fresh process (or an ``mpiexec -n 2`` job); the
configurations alternate round by round and the load average is written after each.

* per-rank weight memory at tp=2 and pp=2: the bytes of the arrays each rank holds, and its
  resident memory (RSS) after the full model is dropped, against one process;
* decode tokens/s at batch 1 (after a 128-token prefill) and the prefill's time, for one process
  on 1 and on 2 threads and ``mpiexec -n 2`` tp=2 and pp=2 with 1 thread per rank; the time each
  rank spends in collectives is recorded (the transport's kernels are timed);
* DP training: step time of ``fit()`` for one process (2 threads) and ``mpiexec -n 2`` dp=2
  (1 thread per rank), and the share of the step spent in the gradient all-reduce;
* MPI itself: ping-pong and all-reduce times from 8 B to 64 MiB, to which the cost model's α and
  β are fitted (minitx/distributed/cost.py), with the device's matmul FLOP/s and GEMV bandwidth
  on 1 and 2 threads; the model then predicts every configuration above and the error is stated.

    python benchmarks/parallel_cpu.py --out benchmarks/results/parallel_cpu.md [--rounds 3]

Writes the markdown file, a JSON file of the raw figures beside it and a plot (``.png``).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import minitx  # noqa: E402,F401 — before NumPy, as in the CLI

import numpy as np  # noqa: E402

PREFILL = 128
SEED = 0


def _config(layers: int | None = None) -> dict:
    from minitx import models

    cfg = models.preset("gpt2", "small")
    return {**cfg, "n_layers": layers} if layers else cfg


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _held_bytes(params) -> int:
    """Bytes of the distinct buffers behind a model's weights (stand-ins and views count once)."""
    seen, total = set(), 0
    for a in params.values():
        base = a
        while isinstance(base, np.ndarray) and base.base is not None:
            base = base.base
        if id(base) in seen or 0 in a.strides and a.size > 1:
            continue
        seen.add(id(base))
        total += base.nbytes if isinstance(base, np.ndarray) else a.nbytes
    return total


def _emit(obj: dict) -> None:
    print("RESULT " + json.dumps(obj), flush=True)


# ------------------------------------------------------------------------------- workers
def _clock(fn, acc: dict):
    """``fn`` whose wall time and calls add up in ``acc['s']`` and ``acc['n']``."""
    def wrap(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            acc["s"] += time.perf_counter() - t
            acc["n"] += 1
    return wrap


def _timed(obj, names, acc: dict) -> None:
    """Time ``obj``'s methods ``names`` into ``acc``."""
    for name in names:
        setattr(obj, name, _clock(getattr(obj, name), acc))


def worker_infer(layout: str, threads: int, steps: int, layers: int | None, backend: str = "numpy") -> None:
    from minitx import generate as gen, threads as th
    from minitx.model import Model

    th.configure(threads)
    base_rss = _rss()
    model = Model.from_config(_config(layers), seed=SEED)
    full = model.nbytes()
    acc = {"s": 0.0, "n": 0}
    comm = None
    if layout != "single":
        from minitx.distributed import prepare

        model = prepare(model, layout)
        comm = model.transport.comm
        _timed(model.transport, ["share"], acc)           # the logits a last stage hands every rank
        kernels = model.transport.kernels                  # the collectives, as the executor calls them
        for k, fn in list(kernels.items()):
            kernels[k] = _clock(fn, acc)
    gc.collect()
    held, rss = _held_bytes(model.params), _rss() - base_rss
    rank = comm.Get_rank() if comm is not None else 0
    barrier = comm.Barrier if comm is not None else (lambda: None)
    ids = np.random.default_rng(1).integers(0, 50000, (1, PREFILL))

    def prefill():
        st = gen.empty_state(model, 1)
        barrier()
        t = time.perf_counter()
        logits, st = gen.step(model, ids, st, backends=(backend,))
        return time.perf_counter() - t, logits, st

    prefill()                                              # warm-up
    pre, pre_comm = [], []
    for _ in range(2):
        acc["s"] = 0.0
        t, logits, st = prefill()
        pre.append(t)
        pre_comm.append(acc["s"])
    nxt = np.argmax(logits[:, -1], axis=-1)[:, None]
    acc["s"], acc["n"] = 0.0, 0
    dec = []
    barrier()
    for k in range(steps + 1):
        t = time.perf_counter()
        logits, st = gen.step(model, nxt, st, backends=(backend,))
        if k:                                              # the first step warms the decode path
            dec.append(time.perf_counter() - t)
        else:
            acc["s"], acc["n"] = 0.0, 0
        nxt = np.argmax(logits[:, -1], axis=-1)[:, None]
    nccl = getattr(getattr(model, "transport", None), "nccl", None)
    transport = "none" if comm is None else "nccl" if nccl else "mpi"
    out = {"layout": layout, "threads": threads, "rank": rank, "backend": backend, "transport": transport, "full_param_bytes": full, "held_param_bytes": held,
           "rss_bytes": rss, "prefill_s": min(pre), "prefill_comm_s": pre_comm[int(np.argmin(pre))],
           "decode_tok_s": 1.0 / statistics.median(dec), "decode_step_s": statistics.median(dec),
           "decode_comm_s_per_step": acc["s"] / max(len(dec), 1), "collectives_per_step": acc["n"] / max(len(dec), 1),
           "last_token": int(nxt[0, 0])}
    if comm is not None:
        every = comm.gather(out, root=0)
        if rank == 0:
            _emit({**out, "ranks": every})
    else:
        _emit(out)


def worker_train(layout: str, threads: int, steps: int, batch: int, seq: int, layers: int | None) -> None:
    from minitx import threads as th
    from minitx.distributed import data_parallel
    from minitx.training.loop import fit
    from minitx.training.settings import TrainSettings, fresh_model

    th.configure(threads)
    s = TrainSettings(steps=steps, batch_size=batch, seq_len=seq, warmup=1, eval_every=0, checkpoint_every=0,
                      val_fraction=0.0, seed=SEED)
    st = fresh_model(_config(layers), None, s)
    red = data_parallel.reducer(None if layout == "single" else layout, batch)
    reduce_acc, ar_acc = {"s": 0.0, "n": 0}, {"s": 0.0, "n": 0}
    _timed(red, ["reduce"], reduce_acc)
    if hasattr(red, "transport"):
        _timed(red.transport, ["all_reduce"], ar_acc)
    ids = np.random.default_rng(2).integers(0, 50000, 200_000)
    marks: list[tuple[float, float, float]] = []

    def progress(rec):
        marks.append((time.perf_counter(), reduce_acc["s"], ar_acc["s"]))

    t0 = time.perf_counter()
    marks.append((t0, 0.0, 0.0))
    fit(st, ids, backends=("numpy",), progress=progress if red.is_writer else None, reducer=red)
    if not red.is_writer:
        return
    # The first step pays first-touch of the optimizer state: report the later ones.
    later = [(b[0] - a[0], b[1] - a[1], b[2] - a[2]) for a, b in zip(marks[1:], marks[2:])] or \
            [(b[0] - a[0], b[1] - a[1], b[2] - a[2]) for a, b in zip(marks, marks[1:])]
    step = statistics.median(x[0] for x in later)
    k = min(range(len(later)), key=lambda i: abs(later[i][0] - step))
    _emit({"layout": layout, "threads": threads, "step_s": step, "reduce_s": later[k][1], "allreduce_s": later[k][2],
           "grad_bytes": int(sum(a.nbytes for a in st.model.params.values())), "batch": batch, "seq": seq,
           "final_loss": st.history[-1]["loss"] if st.history else None})


def worker_comm(max_log2: int) -> None:
    """MPI ping-pong (blocking Send/Recv) and all-reduce, raw and through minitx's transport."""
    from minitx.distributed.mpi import MPITransport, load_mpi

    MPI = load_mpi()
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    tr = MPITransport(comm, [(0, 1)])
    rows = []
    for lg in range(3, max_log2 + 1, 2):
        b = 1 << lg
        x = np.ones(b // 4, np.float32)
        y = np.empty_like(x)
        reps = max(3, min(200, (1 << 24) // b))
        res = {"bytes": b}
        for what in ("pingpong", "allreduce_mpi", "allreduce_minitx"):
            comm.Barrier()
            best = []
            for _ in range(3):
                comm.Barrier()
                t = time.perf_counter()
                for _ in range(reps):
                    if what == "pingpong":
                        if rank == 0:
                            comm.Send(x, dest=1)
                            comm.Recv(y, source=1)
                        else:
                            comm.Recv(y, source=0)
                            comm.Send(y, dest=0)
                    elif what == "allreduce_mpi":
                        comm.Allreduce(x, y, op=MPI.SUM)
                    else:
                        tr.all_reduce(x, ranks=(0, 1))
                best.append((time.perf_counter() - t) / reps)
            res[what] = min(best) / (2 if what == "pingpong" else 1)   # ping-pong: one way
        rows.append(res)
    if rank == 0:
        _emit({"comm": rows, "library": tr.version})


def worker_device() -> None:
    """Sustained matmul FLOP/s (a prefill-shaped GEMM) and GEMV bytes/s (a decode-shaped read of a
    weight matrix) on 1 and on 2 threads, and the executor's cost per node (a tiny model's decode
    step over its node count): the device the cost model computes with."""
    from minitx import generate as gen, threads as th
    from minitx.model import Model

    rng = np.random.default_rng(0)
    a = rng.standard_normal((PREFILL, 768), dtype=np.float32)
    w = rng.standard_normal((768, 3072), dtype=np.float32)
    big = rng.standard_normal((768, 50257), dtype=np.float32)
    v = rng.standard_normal((1, 768), dtype=np.float32)
    out = {}
    for n in (1, 2):
        th.configure(n)
        with th.blas(1 << 40):
            for _ in range(3):
                a @ w
            t = min(_best(lambda: a @ w) for _ in range(3))
            out[f"gemm_flops_{n}"] = 2 * a.shape[0] * 768 * 3072 / t
            v @ big
            t = min(_best(lambda: v @ big) for _ in range(3))
            out[f"gemv_bytes_s_{n}"] = big.nbytes / t
    th.configure(1)
    m = Model.from_preset("gpt2", "tiny")
    st = gen.empty_state(m, 1)
    _, st = gen.step(m, np.array([[1, 2, 3]]), st)
    t = min(_best(lambda: gen.step(m, np.array([[4]]), st)) for _ in range(20))
    out["node_overhead_s"] = t / len(m.graph.nodes)
    _emit(out)


def _best(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ------------------------------------------------------------------------------- driver
def _run(cmd: list[str], env: dict, timeout: float) -> dict:
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{' '.join(cmd[:6])}… failed (exit {r.returncode}): {r.stderr.strip()[-800:]}")


def _env(threads: int) -> dict:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(threads), "NUMBA_NUM_THREADS": str(threads),
           "OMP_NUM_THREADS": str(threads), "MINITX_MPI_TIMEOUT": "300"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH", "")]))
    return env


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def drive(args) -> None:
    from minitx import machine
    from minitx.outputs import atomic_write

    if shutil.which("mpiexec") is None:
        sys.exit("parallel_cpu: mpiexec not found (pip install '.[mpi]')")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        sys.exit(f"parallel_cpu: folder {os.path.dirname(args.out)} does not exist")
    me = [sys.executable, os.path.abspath(__file__)]
    mpi = ["mpiexec", "-n", "2"]
    layers = ["--layers", str(args.layers)] if args.layers else []
    t_start = time.time()
    info = machine.info()
    log = {"machine": info, "load_start": _load(), "args": vars(args), "rounds": []}
    print(f"machine: {machine.summary(info)}; load {log['load_start']}", flush=True)
    log["device"] = _run([*me, "--worker", "device"], _env(2), 600)
    log["mpi"] = _run([*mpi, *me, "--worker", "comm", "--max-log2", str(args.max_log2)], _env(1), 600)
    infer = [("single", 1), ("single", 2), ("tp=2", 1), ("pp=2", 1)]
    train = [("single", 2), ("dp=2", 1)]
    for r in range(args.rounds):
        rnd = {"round": r + 1, "infer": [], "train": []}
        order = infer if r % 2 == 0 else infer[::-1]
        for layout, n in order:
            cmd = [*(mpi if layout != "single" else []), *me, "--worker", "infer", "--layout", layout,
                   "--threads", str(n), "--steps", str(args.steps), *layers]
            rnd["infer"].append(_run(cmd, _env(n), 900))
            print(f"round {r + 1} infer {layout} threads {n}: {rnd['infer'][-1]['decode_tok_s']:.2f} tok/s, "
                  f"prefill {rnd['infer'][-1]['prefill_s'] * 1e3:.0f} ms; load {_load()}", flush=True)
        for layout, n in (train if r % 2 == 0 else train[::-1]):
            if not args.train_steps:
                break
            cmd = [*(mpi if layout != "single" else []), *me, "--worker", "train", "--layout", layout,
                   "--threads", str(n), "--steps", str(args.train_steps), "--batch", str(args.batch),
                   "--seq", str(args.seq), *layers]
            rnd["train"].append(_run(cmd, _env(n), 1800))
            print(f"round {r + 1} train {layout}: step {rnd['train'][-1]['step_s']:.2f} s; load {_load()}", flush=True)
        rnd["load"] = _load()
        log["rounds"].append(rnd)
    log["load_end"] = _load()
    log["seconds"] = time.time() - t_start
    base = os.path.splitext(args.out)[0]
    with atomic_write(base + ".json") as f:          # the raw figures first: the report is re-made from them
        f.write(json.dumps(log, indent=1).encode())
    write_report(log, args)


def write_report(log, args) -> None:
    """The markdown report and the plot from the raw figures (``--from-json`` re-makes them)."""
    from minitx.outputs import atomic_write

    base = os.path.splitext(args.out)[0]
    log["model"] = model_check(log, args)
    text = report(log, args)
    with atomic_write(args.out) as f:
        f.write(text.encode())
    plot(log, base + ".png")
    print(text)


def _median(rounds, kind, layout, threads, key):
    xs = [x[key] for rnd in rounds for x in rnd[kind] if x["layout"] == layout and x["threads"] == threads]
    return statistics.median(xs) if xs else float("nan")


def calibrated(log) -> tuple:
    """The cost model's device (1 and 2 threads) and link, from this run's measurements."""
    from minitx.distributed import cost

    d = log["device"]
    devs = {n: cost.Device(f"this CPU, {n} thread(s)", d[f"gemm_flops_{n}"], d[f"gemv_bytes_s_{n}"],
                           d["node_overhead_s"], "measured: GEMM 128×768×3072, GEMV 768×50257, tiny-model node cost")
            for n in (1, 2)}
    rows = log["mpi"]["comm"]
    link = cost.fit_link([r["bytes"] for r in rows], [r["allreduce_minitx"] for r in rows], "all_reduce", 2,
                         "shared memory (MPI)")
    raw = cost.fit_link([r["bytes"] for r in rows], [r["allreduce_mpi"] for r in rows], "all_reduce", 2, "raw MPI")
    pp = cost.fit_link([r["bytes"] for r in rows], [r["pingpong"] for r in rows], "send_recv", 2, "ping-pong")
    return devs, link, raw, pp


def model_check(log, args) -> dict:
    """The cost model's prediction of every measured configuration, from the rewritten graphs."""
    from minitx.distributed import cost

    devs, link, raw, ppl = calibrated(log)
    cfg = _config(args.layers)
    out = {"link": vars(link), "raw_mpi_link": vars(raw), "pingpong_link": vars(ppl),
           "device": {n: vars(d) for n, d in devs.items()}, "infer": {}, "train": {}}
    V = int(cfg["vocab_size"])
    for layout, n in (("single", 1), ("single", 2), ("tp=2", 1), ("pp=2", 1)):
        tp = 2 if layout == "tp=2" else 1
        pp = 2 if layout == "pp=2" else 1
        cl = cost.Cluster(devs[n], link, link, 2)
        pred = {}
        for what, T, S in (("prefill", PREFILL, 0), ("decode", 1, PREFILL + 1)):
            ranks = cost.layout_cost(cfg, tp, pp, batch=1, seq=T, past=S, cluster=cl)
            stage = {}
            for c in ranks.values():
                stage[c.stage] = max(stage.get(c.stage, 0.0), c.compute_s + c.comm_s)
            t = sum(stage.values())
            if pp > 1:   # the last stage's logits go to every rank (the command's output, not the model's)
                t += cost.seconds("broadcast", T * V * 4, 2, link.alpha, link.beta)
            pred[what] = {"seconds": t, "comm_s": max(c.comm_s for c in ranks.values())}
        out["infer"][f"{layout}/{n}"] = pred
    if args.train_steps:
        for layout, n, dp in (("single", 2, 1), ("dp=2", 1, 2)):
            cl = cost.Cluster(devs[n], link, link, 2)
            out["train"][f"{layout}/{n}"] = cost.step_time(cfg, cluster=cl, dp=dp, batch=args.batch, seq=args.seq,
                                                           train=True)
    return out


def _err(pred: float, meas: float) -> str:
    return f"{(pred - meas) / meas:+.0%}"


def report(log, args) -> str:
    from minitx import machine

    R = log["rounds"]
    m = log["model"]
    L = []
    L.append("# Parallelism on this CPU: tp / pp / dp over MPI, and the cost model checked\n")
    L.append(f"`python benchmarks/parallel_cpu.py --out {args.out} --rounds {args.rounds}` — "
             f"{log['seconds'] / 60:.1f} min.\n")
    L.append(f"Machine: {machine.summary(log['machine'])}; {log['mpi']['library']}.  ")
    L.append(f"Load average (1/5/15 min) at start {log['load_start']}, after each round "
             f"{[r['load'] for r in R]}, at the end {log['load_end']} — shared with other jobs: compare the "
             "ratios within a round, not with other files.\n")
    cfgtxt = "GPT-2-small shape" if not args.layers else f"GPT-2-small width, {args.layers} layers"
    L.append(f"Model: {cfgtxt} (d 768, vocabulary 50257), random weights (seed {SEED}), float32, NumPy spec "
             f"backend. Medians over {args.rounds} interleaved rounds (configurations alternate in order round by "
             "round); each configuration a fresh process or `mpiexec -n 2` job.\n")
    # memory
    L.append("## Weight memory per rank\n")
    L.append("| layout | rank | weight arrays held, MiB | share of one process | RSS after load, MiB |")
    L.append("|---|---|---|---|---|")
    first = R[0]["infer"]
    one = next(x for x in first if x["layout"] == "single")
    L.append(f"| one process | – | {one['held_param_bytes'] / 2**20:.1f} | 100 % | {one['rss_bytes'] / 2**20:.0f} |")
    for x in first:
        if x["layout"] == "single":
            continue
        for rk in x["ranks"]:
            L.append(f"| {x['layout']} | {rk['rank']} | {rk['held_param_bytes'] / 2**20:.1f} | "
                     f"{rk['held_param_bytes'] / one['held_param_bytes']:.1%} | {rk['rss_bytes'] / 2**20:.0f} |")
    L.append("\nHeld = the distinct buffers behind the rank's weights (its own shards and replicated norms, "
             "biases and position table); RSS = resident memory after the full model was built, split "
             "and dropped, less the interpreter's before it (it includes the executor's buffers).\n")
    # inference
    L.append(f"## Inference: decode at batch 1 and a {PREFILL}-token prefill\n")
    L.append("| configuration | decode tok/s | × one process, 2 threads | prefill ms | × | comm. per decode step, ms "
             "| collectives / step | model: decode ms | error | model: prefill ms | error |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|")
    ref_d = _median(R, "infer", "single", 2, "decode_tok_s")
    ref_p = _median(R, "infer", "single", 2, "prefill_s")
    names = {("single", 1): "one process, 1 thread (tp=1, pp=1)", ("single", 2): "one process, 2 threads",
             ("tp=2", 1): "`mpiexec -n 2` tp=2, 1 thread/rank", ("pp=2", 1): "`mpiexec -n 2` pp=2, 1 thread/rank"}
    errs = []
    for (layout, n), name in names.items():
        d = _median(R, "infer", layout, n, "decode_tok_s")
        p = _median(R, "infer", layout, n, "prefill_s")
        c = _median(R, "infer", layout, n, "decode_comm_s_per_step")
        k = _median(R, "infer", layout, n, "collectives_per_step")
        pr = m["infer"][f"{layout}/{n}"]
        errs += [(pr["decode"]["seconds"] - 1 / d) * d, (pr["prefill"]["seconds"] - p) / p]
        L.append(f"| {name} | {d:.2f} | {d / ref_d:.2f} | {p * 1e3:.0f} | {ref_p / p:.2f} | {c * 1e3:.2f} | {k:.0f} | "
                 f"{pr['decode']['seconds'] * 1e3:.1f} | {_err(pr['decode']['seconds'], 1 / d)} | "
                 f"{pr['prefill']['seconds'] * 1e3:.0f} | {_err(pr['prefill']['seconds'], p)} |")
    L.append("\n× = speed relative to one process on 2 threads (> 1: faster). Comm. = wall time inside the "
             "transport's collective kernels on rank 0 (for pp also the logits the last stage shares), "
             "waiting for the other rank included.\n")
    # training
    if R[0]["train"]:
        L.append(f"## Data-parallel training step (global batch {args.batch} × {args.seq} tokens)\n")
        L.append("| configuration | step s | × | gradient all-reduce s | share of the step | reduce() s (with packing) "
                 "| model: step s | error | model: all-reduce s |")
        L.append("|---|---|---|---|---|---|---|---|---|")
        ref = _median(R, "train", "single", 2, "step_s")
        for layout, n, name in (("single", 2, "one process, 2 threads"), ("dp=2", 1, "`mpiexec -n 2` dp=2, 1 thread/rank")):
            s = _median(R, "train", layout, n, "step_s")
            a = _median(R, "train", layout, n, "allreduce_s")
            rd = _median(R, "train", layout, n, "reduce_s")
            pr = m["train"][f"{layout}/{n}"]
            errs.append((pr["seconds"] - s) / s)
            L.append(f"| {name} | {s:.2f} | {ref / s:.2f} | {a:.3f} | {a / s:.1%} | {rd:.3f} | {pr['seconds']:.2f} | "
                     f"{_err(pr['seconds'], s)} | {pr['grad_allreduce_s']:.3f} |")
        g = R[0]["train"][0]["grad_bytes"]
        L.append(f"\nThe gradients are {g / 2**20:.0f} MiB (float32), all-reduced in buckets of 4 Mi elements. "
                 "Model: 3× the forward's roofline compute, the ring all-reduce of the weights' bytes, AdamW "
                 "reading/writing 7 weight-sized arrays.\n")
    # MPI calibration
    L.append("## MPI on this machine, and the calibrated cost model\n")
    L.append("| bytes | ping-pong one way µs | MPI all-reduce µs | minitx transport all-reduce µs | model µs |")
    L.append("|---|---|---|---|---|")
    from minitx.distributed import cost

    lk = m["link"]
    for r in log["mpi"]["comm"]:
        mod = cost.seconds("all_reduce", r["bytes"], 2, lk["alpha"], lk["beta"])
        L.append(f"| {r['bytes']:,} | {r['pingpong'] * 1e6:.1f} | {r['allreduce_mpi'] * 1e6:.1f} | "
                 f"{r['allreduce_minitx'] * 1e6:.1f} | {mod * 1e6:.1f} |")
    d = log["device"]
    L.append(f"\nFitted (α from the messages of at most 4 KiB, β from the three largest): transport all-reduce α = {lk['alpha'] * 1e6:.2f} µs, "
             f"β = {lk['beta'] / 1e9:.2f} GB/s; raw MPI all-reduce α = {m['raw_mpi_link']['alpha'] * 1e6:.2f} µs, "
             f"β = {m['raw_mpi_link']['beta'] / 1e9:.2f} GB/s; ping-pong α = {m['pingpong_link']['alpha'] * 1e6:.2f} µs, "
             f"β = {m['pingpong_link']['beta'] / 1e9:.2f} GB/s. Device: GEMM {d['gemm_flops_1'] / 1e9:.1f} / "
             f"{d['gemm_flops_2'] / 1e9:.1f} GFLOP/s and GEMV {d['gemv_bytes_s_1'] / 1e9:.1f} / "
             f"{d['gemv_bytes_s_2'] / 1e9:.1f} GB/s on 1 / 2 threads, {d['node_overhead_s'] * 1e6:.0f} µs per "
             "graph node. The model (minitx/distributed/cost.py) takes the collectives and their bytes from "
             "the rewritten graph, each node's FLOPs and bytes from its spec, and adds no overlap.\n")
    ae = [abs(e) for e in errs if e == e]
    L.append(f"**Model error** over the {len(ae)} measured figures above: median {statistics.median(ae):.0%}, "
             f"largest {max(ae):.0%} (signed errors in the tables: + = the model is slower than measured).\n")
    # Ratios inside a round cancel a slowdown the whole round shared (the machine's load).
    L.append("**Speed ratios inside a round** (each against one process on 1 thread in the same round; median over "
             "rounds), measured and modelled:\n")
    L.append("| configuration | decode, measured | decode, model | prefill, measured | prefill, model |")
    L.append("|---|---|---|---|---|")
    base = m["infer"]["single/1"]
    for (layout, n), name in list(names.items())[1:]:
        rat = {"decode": [], "prefill": []}
        for rnd in R:
            one_ = next((x for x in rnd["infer"] if x["layout"] == "single" and x["threads"] == 1), None)
            it = next((x for x in rnd["infer"] if x["layout"] == layout and x["threads"] == n), None)
            if one_ and it:
                rat["decode"].append(it["decode_tok_s"] / one_["decode_tok_s"])
                rat["prefill"].append(one_["prefill_s"] / it["prefill_s"])
        pr = m["infer"][f"{layout}/{n}"]
        L.append(f"| {name} | {statistics.median(rat['decode']):.2f} | "
                 f"{base['decode']['seconds'] / pr['decode']['seconds']:.2f} | {statistics.median(rat['prefill']):.2f} | "
                 f"{base['prefill']['seconds'] / pr['prefill']['seconds']:.2f} |")
    L.append("\nOn a machine whose load average is several times its core count each runnable process gets a "
             "fair share of the cores: a 2-process job then gets about twice the CPU of a 1-process, 1-thread "
             "run, which flatters `mpiexec -n 2` beyond what the model (which assumes the cores are ours) "
             "predicts; the absolute times are slower than the model for the same reason (the device was "
             "calibrated in short bursts). Re-run on a quiet machine for a clean check.\n")
    return "\n".join(L) + "\n"


def drive_gpu(args) -> None:
    """``--gpu``: decode and prefill on the cupy backend, one process against mpiexec -n 2 tp=2 and
    pp=2, interleaved rounds; which transport each run used (NCCL or MPI) is recorded."""
    from minitx import machine
    from minitx.outputs import atomic_write

    me = [sys.executable, os.path.abspath(__file__)]
    layers = ["--layers", str(args.layers)] if args.layers else []
    backend = args.backend or "cupy"
    info = machine.info()
    log = {"machine": info, "load_start": _load(), "args": vars(args), "rounds": [], "backend": backend}
    confs = [("single", 1)] + ([("tp=2", 1), ("pp=2", 1)] if shutil.which("mpiexec") else [])
    t0 = time.time()
    for r in range(args.rounds):
        rnd = {"round": r + 1, "infer": [], "errors": []}
        for layout, n in (confs if r % 2 == 0 else confs[::-1]):
            cmd = [*(["mpiexec", "-n", "2"] if layout != "single" else []), *me, "--worker", "infer", "--layout",
                   layout, "--threads", str(n), "--steps", str(args.steps), "--backend", backend, *layers]
            try:
                rnd["infer"].append(_run(cmd, _env(n), 600))
                x = rnd["infer"][-1]
                print(f"round {r + 1} {layout} on {backend} ({x['transport']}): {x['decode_tok_s']:.1f} tok/s, "
                      f"prefill {x['prefill_s'] * 1e3:.1f} ms", flush=True)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                rnd["errors"].append(f"{layout}: {str(e)[-400:]}")
                print(f"round {r + 1} {layout}: FAILED {str(e)[-400:]}", flush=True)
        rnd["load"] = _load()
        log["rounds"].append(rnd)
    log["seconds"] = time.time() - t0
    L = [f"# Parallel inference on {info.get('gpu') or 'no GPU'} ({backend} backend)\n",
         f"`python benchmarks/parallel_cpu.py --gpu --out {args.out}` — {log['seconds'] / 60:.1f} min; "
         f"{machine.summary(info)}; load {log['load_start']} → {[r['load'] for r in log['rounds']]}.\n",
         f"GPT-2-small shape{'' if not args.layers else f', {args.layers} layers'}, float32, random weights; medians "
         f"over {args.rounds} interleaved rounds.\n",
         "| configuration | transport | decode tok/s | prefill ms | comm. per decode step ms | weights per rank MiB |",
         "|---|---|---|---|---|---|"]
    for layout, n in confs:
        xs = [x for rnd in log["rounds"] for x in rnd["infer"] if x["layout"] == layout]
        if not xs:
            L.append(f"| mpiexec -n 2 {layout} | failed | | | | |")
            continue
        med = lambda k: statistics.median(x[k] for x in xs)  # noqa: E731
        L.append(f"| {'one process' if layout == 'single' else 'mpiexec -n 2 ' + layout} | {xs[0]['transport']} | "
                 f"{med('decode_tok_s'):.1f} | {med('prefill_s') * 1e3:.1f} | {med('decode_comm_s_per_step') * 1e3:.2f} | "
                 f"{xs[0]['held_param_bytes'] / 2**20:.0f} |")
    errors = [e for rnd in log["rounds"] for e in rnd["errors"]]
    if errors:
        L.append("\nFailures:\n\n" + "\n".join(f"* {e}" for e in errors))
    with atomic_write(os.path.splitext(args.out)[0] + ".json") as f:
        f.write(json.dumps(log, indent=1).encode())
    with atomic_write(args.out) as f:
        f.write(("\n".join(L) + "\n").encode())
    print("\n".join(L))


def plot(log, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install '.[plot]'): no plot", file=sys.stderr)
        return
    from minitx.outputs import atomic_write

    R, m = log["rounds"], log["model"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    confs = [("single", 1, "1 proc\n1 thr"), ("single", 2, "1 proc\n2 thr"), ("tp=2", 1, "tp=2\n2×1 thr"),
             ("pp=2", 1, "pp=2\n2×1 thr")]
    x = np.arange(len(confs))
    for ax, key, mkey, scale, title in ((axes[0], "decode_tok_s", "decode", None, "decode tok/s, batch 1"),
                                        (axes[1], "prefill_s", "prefill", 1e3, f"prefill {PREFILL} tokens, ms")):
        meas = [_median(R, "infer", lay, n, key) for lay, n, _ in confs]
        pred = [m["infer"][f"{lay}/{n}"][mkey]["seconds"] for lay, n, _ in confs]
        if scale is None:
            pred = [1 / p for p in pred]
        else:
            meas, pred = [v * scale for v in meas], [v * scale for v in pred]
        ax.bar(x - 0.2, meas, 0.4, label="measured")
        ax.bar(x + 0.2, pred, 0.4, label="cost model", alpha=0.7)
        ax.set_xticks(x, [c[2] for c in confs])
        ax.set_title(title)
        ax.legend()
    ax = axes[2]
    rows = log["mpi"]["comm"]
    b = [r["bytes"] for r in rows]
    from minitx.distributed import cost

    lk = m["link"]
    ax.loglog(b, [r["allreduce_minitx"] * 1e6 for r in rows], "o-", label="all-reduce (minitx transport)")
    ax.loglog(b, [r["allreduce_mpi"] * 1e6 for r in rows], "s--", label="all-reduce (raw MPI)")
    ax.loglog(b, [r["pingpong"] * 1e6 for r in rows], "^:", label="ping-pong, one way")
    ax.loglog(b, [cost.seconds("all_reduce", v, 2, lk["alpha"], lk["beta"]) * 1e6 for v in b], "k-", lw=0.8,
              label=f"α–β fit: {lk['alpha'] * 1e6:.1f} µs, {lk['beta'] / 1e9:.1f} GB/s")
    ax.set_xlabel("bytes per rank")
    ax.set_ylabel("µs")
    ax.set_title("2 ranks, shared memory")
    ax.legend(fontsize=7)
    fig.suptitle(f"GPT-2-small shape on {log['machine']['cpu']} ({log['machine']['cores']} cores), "
                 f"load {log['load_start'][0]}–{max(r['load'][0] for r in R)}", fontsize=9)
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=110)


# ------------------------------------------------------------------------------- the model at scale
def cluster():
    """The stated machine for predictions beyond this one: DGX-A100-class nodes."""
    from minitx.distributed import cost

    a100 = cost.Device("NVIDIA A100 SXM4 80GB", 0.5 * 156e12, 0.8 * 2.039e12, 5e-6,
                       "datasheet: TF32 tensor cores 156 TFLOP/s dense, HBM2e 2,039 GB/s; assumed sustained: 50 % "
                       "and 80 % of those, 5 µs per kernel launch")
    nvlink = cost.Link("NVLink 3 through NVSwitch, 8 GPUs per node", 2e-6, 240e9,
                       "datasheet: 600 GB/s per GPU (300 GB/s each way); assumed usable 80 %, α 2 µs")
    ib = cost.Link("InfiniBand HDR 200 Gb/s, one port per GPU", 5e-6, 25e9,
                   "200 Gb/s = 25 GB/s per GPU (DGX A100: one HDR port per GPU); assumed α 5 µs")
    return cost.Cluster(a100, nvlink, ib, 8)


LLAMA70 = {"arch": "llama", "vocab_size": 32000, "n_ctx": 4096, "d_model": 8192, "n_layers": 80, "n_heads": 64,
           "n_kv_heads": 8, "d_ff": 28672}


def scale(args) -> None:
    """``--scale``: predicted training step time and tokens/s on 8–1024 GPUs for dp, tp, pp and sp
    (GPT-2 small, weak scaling) and for a LLaMA-2-70B shape (tp × pp × dp); a table and a plot."""
    from minitx.distributed import cost
    from minitx.outputs import atomic_write

    cl = cluster()
    gpt = _config()
    ranks = [8, 16, 32, 64, 128, 256, 512, 1024]
    per = 8                                             # sequences of 1024 tokens per model replica
    lays = {"dp": dict(), "tp=4 × dp": dict(tp=4), "pp=4 × dp (m=8)": dict(pp=4, microbatches=8),
            "sp=4 × dp": dict(sp=4)}
    rows = []
    for name, lay in lays.items():
        width = lay.get("tp", 1) * lay.get("pp", 1) * lay.get("sp", 1)
        for n in ranks:
            dp = n // width
            r = cost.step_time(gpt, cluster=cl, dp=dp, batch=per * dp, seq=1024, train=True,
                               **{"microbatches": 1, **lay})
            rows.append({"model": "GPT-2 small", "layout": name, "ranks": n, **r})
    big = []
    for tp, pp in ((8, 4), (8, 8)):
        for n in [x for x in ranks if x >= tp * pp]:
            dp = n // (tp * pp)
            r = cost.step_time(LLAMA70, cluster=cl, tp=tp, pp=pp, dp=dp, batch=1024, seq=4096,
                               microbatches=1024 // dp, train=True)
            big.append({"model": "LLaMA-2-70B shape", "layout": f"tp={tp} × pp={pp} × dp", "ranks": n, **r})
            print(f"70B tp={tp} pp={pp} on {n}: {r['seconds']:.1f} s", flush=True)
    L = ["# The cost model at scale: predicted training steps on 8–1024 GPUs\n",
         f"`python benchmarks/parallel_cpu.py --scale --out {args.out}` (no measurement: minitx/distributed/cost.py "
         "on the rewritten graphs).\n",
         f"Device: {cl.device.name} — {cl.device.source}. Within a node: {cl.intra.name} ({cl.intra.source}); "
         f"across nodes: {cl.inter.name} ({cl.inter.source}). float32 activations and weights as minitx "
         "computes them; no overlap of communication with compute (an upper bound); AdamW on every rank.\n",
         "## GPT-2 small, 8 sequences × 1024 tokens per model replica (weak scaling)\n",
         "| layout | GPUs | step s | tokens/s | per GPU | comm. share | dp all-reduce s | bubble |",
         "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        L.append(f"| {r['layout']} | {r['ranks']} | {r['seconds']:.3f} | {r['tokens_per_s']:,.0f} | "
                 f"{r['tokens_per_s'] / r['ranks']:,.0f} | {r['comm_share']:.0%} | {r['grad_allreduce_s']:.3f} | "
                 f"{r['bubble']:.0%} |")
    L += ["\n## LLaMA-2-70B shape (d 8192, 80 layers, 64 heads, 8 KV heads), global batch 1024 × 4096 tokens\n",
          "Micro-batches of one sequence: m = 1024 / dp per pipeline.\n",
          "| layout | GPUs | step s | tokens/s | per GPU | comm. share | dp all-reduce s | bubble |",
          "|---|---|---|---|---|---|---|---|"]
    for r in big:
        L.append(f"| {r['layout']} | {r['ranks']} | {r['seconds']:.1f} | {r['tokens_per_s']:,.0f} | "
                 f"{r['tokens_per_s'] / r['ranks']:,.0f} | {r['comm_share']:.0%} | {r['grad_allreduce_s']:.2f} | "
                 f"{r['bubble']:.1%} |")
    base = os.path.splitext(args.out)[0]
    with atomic_write(base + ".json") as f:
        f.write(json.dumps({"cluster": {"device": vars(cl.device), "intra": vars(cl.intra), "inter": vars(cl.inter),
                                        "per_node": cl.per_node}, "gpt2": rows, "llama70b": big}, indent=1).encode())
    with atomic_write(args.out) as f:
        f.write(("\n".join(L) + "\n").encode())
    print("\n".join(L))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install '.[plot]'): no plot", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    ax = axes[0]
    for name in lays:
        xs = [r for r in rows if r["layout"] == name]
        ax.loglog([r["ranks"] for r in xs], [r["tokens_per_s"] for r in xs], "o-", label=name)
    one = next(r for r in rows if r["layout"] == "dp" and r["ranks"] == 8)
    ax.loglog(ranks, [one["tokens_per_s"] * n / 8 for n in ranks], "k:", lw=0.8, label="linear from 8 GPUs")
    ax.set_title("GPT-2 small, 8 × 1024 tokens per replica", fontsize=9)
    ax.set_xlabel("GPUs")
    ax.set_ylabel("predicted training tokens/s")
    ax.legend(fontsize=7)
    ax = axes[1]
    for name in sorted({r["layout"] for r in big}):
        xs = [r for r in big if r["layout"] == name]
        ax.loglog([r["ranks"] for r in xs], [r["tokens_per_s"] for r in xs], "o-", label=name)
        for r in xs:
            ax.annotate(f"{r['comm_share']:.0%}", (r["ranks"], r["tokens_per_s"]), fontsize=6,
                        textcoords="offset points", xytext=(3, -9))
    ax.set_title("LLaMA-2-70B shape, 1024 × 4096 tokens per step (labels: comm. share)", fontsize=9)
    ax.set_xlabel("GPUs")
    ax.legend(fontsize=7)
    fig.suptitle("cost model: A100-class GPUs, NVLink inside 8-GPU nodes, InfiniBand HDR 200 Gb/s across", fontsize=9)
    fig.tight_layout()
    with atomic_write(base + ".png") as f:
        fig.savefig(f, format="png", dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "parallel_cpu.md"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12, help="decode steps timed per configuration and round")
    ap.add_argument("--train-steps", type=int, default=3, help="optimizer steps per training run (0: no training)")
    ap.add_argument("--batch", type=int, default=2, help="global training batch (sequences)")
    ap.add_argument("--seq", type=int, default=64, help="training sequence length")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than GPT-2 small's 12 (a quick check)")
    ap.add_argument("--max-log2", type=int, default=26, help="largest MPI message, log2 bytes")
    ap.add_argument("--gpu", action="store_true",
                    help="the inference rounds on the cupy backend: one GPU, and mpiexec -n 2 tp=2 / pp=2 (NCCL "
                         "when each rank has a GPU of its own, else MPI through the host)")
    ap.add_argument("--backend", default=None, help="with --gpu: the backend (default cupy; numpy for a smoke run)")
    ap.add_argument("--scale", action="store_true",
                    help="no measurement: the cost model's training steps on 8–1024 GPUs (table and plot at --out)")
    ap.add_argument("--from-json", metavar="FILE", help="re-make the report and plot from a run's raw figures")
    ap.add_argument("--worker", choices=["infer", "train", "comm", "device"], help=argparse.SUPPRESS)
    ap.add_argument("--layout", default="single", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "infer":
        worker_infer(args.layout, args.threads, args.steps, args.layers, args.backend or "numpy")
    elif args.worker == "train":
        worker_train(args.layout, args.threads, args.train_steps, args.batch, args.seq, args.layers)
    elif args.worker == "comm":
        worker_comm(args.max_log2)
    elif args.worker == "device":
        worker_device()
    elif args.from_json:
        with open(args.from_json) as f:
            log = json.load(f)
        args.rounds, args.batch, args.seq, args.layers, args.train_steps = (
            log["args"][k] for k in ("rounds", "batch", "seq", "layers", "train_steps"))
        write_report(log, args)
    elif args.gpu:
        drive_gpu(args)
    elif args.scale:
        scale(args)
    else:
        drive(args)


if __name__ == "__main__":
    main()
