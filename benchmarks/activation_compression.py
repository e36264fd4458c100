"""Activation compression (``--plugin activations:int8|fp8``) against exact training and recompute:
peak activation memory, gradient error, step time and the loss curve of a training run.

    python benchmarks/activation_compression.py --out benchmarks/results/activation_compression.md

The model is the bundled model's configuration (GPT-2 style, 4 layers, d 128, its BPE of 2048),
trained from the same seed on the same batches for every configuration — the repo's own prose
(README, docs, the held-out text), so only the storage of saved activations differs. Memory is
the executor's count of activation bytes held at once (parameters excluded); gradient error is
each configuration's gradient against exact training's on one batch (worst per-tensor cosine and
relative L2); step time is interleaved round by round in one process, the load recorded.
"""
from __future__ import annotations

import argparse
import glob
import os
import time

import numpy as np

from minitx import bundled, machine, models, plugin
from minitx import training as tr
from minitx.executor import Executor
from minitx.outputs import atomic_write
from minitx.training.loop import batch_feeds, training_graph

CONFIGS = {"exact": (), "activations:int8": ("activations:int8",), "activations:fp8": ("activations:fp8",),
           "recompute:sqrt": ("recompute:sqrt",), "recompute:sqrt + int8": ("recompute:sqrt", "activations:int8")}


def corpus(model) -> np.ndarray:
    files = ["README.md", *sorted(glob.glob("docs/*.md")), "minitx/data/heldout.txt"]
    text = "\n".join(open(f, encoding="utf-8").read() for f in files)
    return np.array(model.tokenizer.encode(text).ids, np.int64)


def load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    base = bundled.load_model(None)
    ids = corpus(base)
    start_load = load()
    settings = dict(steps=a.steps, batch_size=8, seq_len=64, lr=3e-3, min_lr=3e-4, warmup=10, eval_every=25,
                    eval_batches=4, checkpoint_every=0, seed=0)
    # Memory, gradient error and step time on one batch.
    rng = np.random.default_rng(0)
    starts = rng.integers(0, len(ids) - 65, 8)
    x = np.stack([ids[s:s + 64] for s in starts])
    y = np.stack([ids[s + 1:s + 65] for s in starts])
    model = models_fresh(base, settings)
    exes, results = {}, {}
    for name, specs in CONFIGS.items():
        g = models.with_loss(training_graph(model, specs))
        exes[name] = (Executor(g, model.params), batch_feeds(g, x, y))
        results[name] = exes[name][0].forward_backward(exes[name][1])
    times: dict[str, list[float]] = {k: [] for k in CONFIGS}
    loads = []
    for _ in range(a.rounds):
        for name, (ex, feeds) in exes.items():
            t = time.perf_counter()
            ex.forward_backward(feeds)
            times[name].append(time.perf_counter() - t)
        loads.append(load())
    exact = results["exact"]
    rows = []
    for name, r in results.items():
        cos = min(float(np.dot(r.grads[k].ravel(), exact.grads[k].ravel()) /
                        (np.linalg.norm(r.grads[k]) * np.linalg.norm(exact.grads[k]) + 1e-30))
                  for k in exact.grads if np.any(exact.grads[k]))
        rel = max(float(np.linalg.norm(r.grads[k] - exact.grads[k]) / (np.linalg.norm(exact.grads[k]) + 1e-30))
                  for k in exact.grads if np.any(exact.grads[k]))
        rows.append((name, r.peak_activation_bytes, cos, rel, float(np.median(times[name])),
                     float(r.outputs["loss"]) == float(exact.outputs["loss"])))
    # Training runs: the same seed, batches and schedule.
    curves = {}
    for name, specs in CONFIGS.items():
        if name.startswith("recompute"):
            continue      # exact: the same curve as "exact" (tests/test_recompute.py)
        st = tr.fresh_model(base.config, base.tokenizer_json, tr.TrainSettings(**settings, plugins=specs))
        recs: list[dict] = []
        tr.fit(st, ids, progress=recs.append)
        curves[name] = recs
    t0 = rows[0][4]
    m = machine.info()
    with atomic_write(a.out) as f:
        w = lambda s="": f.write((s + "\n").encode())  # noqa: E731
        w("# Activation compression: saved activations in int8 / fp8 against exact training\n")
        w(f"Machine: {machine.summary(m)}. Load average at start {start_load}; after each timing round "
          f"{', '.join(loads)}.\n")
        w(f"Command: `python benchmarks/activation_compression.py --out {a.out}` (steps {a.steps}, "
          f"rounds {a.rounds}). Model: the bundled model's config trained from seed 0 on the repo's prose "
          f"({len(ids)} tokens), batch 8 x 64 tokens, numpy backend.\n")
        w("## One step (batch 8 x 64)\n")
        w("| configuration | peak activation MiB | vs exact | loss bit-equal | worst grad cosine | worst grad rel L2 | step time vs exact |")
        w("|---|---|---|---|---|---|---|")
        for name, peak, cos, rel, t, same in rows:
            w(f"| `{name}` | {peak / 2**20:.2f} | {peak / rows[0][1]:.2f} | {'yes' if same else 'NO'} | "
              f"{cos:.6f} | {rel:.2e} | {t / t0:.2f} |")
        w("\nStep time: median of the rounds, interleaved; compression costs a pass over each saved value each way.\n")
        w(f"## Training {a.steps} steps: held-out loss\n")
        w("The held-out tail of the corpus is the multilingual held-out text, unlike the English prose trained "
          "on, hence the gap between train and held-out loss: compare the columns with each other.\n")
        names = list(curves)
        w("| step | " + " | ".join(f"`{n}`" for n in names) + " |")
        w("|---" * (len(names) + 1) + "|")
        evals = {n: {r["step"]: r["val_loss"] for r in curves[n] if "val_loss" in r} for n in names}
        for step in sorted(evals["exact"]):
            w(f"| {step} | " + " | ".join(f"{evals[n].get(step, float('nan')):.4f}" for n in names) + " |")
        last = {n: np.mean([r["loss"] for r in curves[n][-10:]]) for n in names}
        w("\nMean train loss over the last 10 steps: " +
          ", ".join(f"`{n}` {last[n]:.4f}" for n in names) + ".")


def models_fresh(base, settings):
    return tr.fresh_model(base.config, base.tokenizer_json, tr.TrainSettings(**settings)).model


if __name__ == "__main__":
    main()
