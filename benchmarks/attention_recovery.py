"""Linear attention on the bundled decoder: perplexity before and after a short recovery fine-tune.

    python benchmarks/attention_recovery.py [--text FILE] [--steps 150] [-o FILE.md]

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
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minitx import data, plugin  # noqa: E402
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", default=DEFAULT_TEXT, help="training/evaluation text (file or folder of files)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--maps", default="elu,favor")
    ap.add_argument("-o", "--output", default="")
    args = ap.parse_args()
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
    for r in rows:
        print(f"{r[0]:40s} before {r[1]:9.2f}  after {r[2]:9.2f}  ({r[3]:.0f} s)", flush=True)
    lines = ["# Linear attention: accuracy before and after a recovery fine-tune", "",
             f"Bundled decoder (GPT-2 style, {base.config['n_layers']} layers, {base.config['n_heads']} heads, "
             f"context {n_ctx}); text `{args.text}` ({len(ids)} tokens; last 10% held out); {args.steps} steps of "
             "`minitx.training.fit` (batch 8, lr 1e-3 cosine to 1e-4). Perplexity on 16 held-out windows. "
             f"Command: `python benchmarks/attention_recovery.py --steps {args.steps}`.", "",
             "| model | perplexity before | after fine-tune | fine-tune s |", "|---|---:|---:|---:|"]
    lines += [f"| {r[0]} | {r[1]:.2f} | {r[2]:.2f} | {r[3]:.0f} |" for r in rows]
    if args.output:
        with atomic_write(args.output) as f:
            f.write(("\n".join(lines) + "\n").encode())


if __name__ == "__main__":
    main()
