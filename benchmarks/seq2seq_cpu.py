"""Encoder–decoders on the CPU: minitx (NumPy spec, numba) beside PyTorch/transformers, same weights.

    python benchmarks/seq2seq_cpu.py --out benchmarks/results/seq2seq_cpu.md [--rounds 5] [--threads 2]

Models: random weights (torch seed 0) in transformers' own classes, saved as Hugging Face folders
and read into minitx by its converter (``minitx.convert``), so both engines hold the same numbers:
T5 (v1.0 shape: ReLU FFN, tied head, relative position buckets) tiny and t5-small-shaped, BART tiny
and 512-wide, and a Marian (opus-mt-shaped: sinusoidal positions, SiLU, 58101 tokens).

Per (model, round, engine), batch 1, a ``--source``-token random source: **once per input** =
the encoder plus the first decoder step (transformers computes the cross-attention K/V inside its
first decoder call, minitx in its encoder part, so only the sum is comparable), then **decode** =
``--steps`` further greedy steps, tokens/s. ``minitx bench`` reports the same phases for one
engine at a time; it has no transformers reference for encoder–decoders, hence this script.
Engines are interleaved round by round in one process; ratios are medians of per-round ratios
to transformers. Before timing, each model's teacher-forced logits are compared with
transformers' (max |difference| / max |logit|) and the greedy outputs of all engines must agree,
else the script stops: a speed comparison of different functions is worthless.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import minitx  # noqa: E402,F401 — before NumPy, as in the CLI: it sets OpenBLAS's thread timeout

import numpy as np  # noqa: E402

# name: (family, transformers config kwargs)
MODELS = {
    "T5 tiny": ("t5", dict(vocab_size=32128, d_model=256, d_kv=32, d_ff=1024, num_layers=4, num_heads=8)),
    "T5 small (t5-small shape)": ("t5", dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6,
                                             num_heads=8)),
    "BART tiny": ("bart", dict(vocab_size=50265, d_model=256, encoder_layers=3, decoder_layers=3,
                               encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=1024,
                               decoder_ffn_dim=1024)),
    "BART 512 wide": ("bart", dict(vocab_size=50265, d_model=512, encoder_layers=6, decoder_layers=6,
                                   encoder_attention_heads=8, decoder_attention_heads=8, encoder_ffn_dim=2048,
                                   decoder_ffn_dim=2048)),
    "Marian (opus-mt shape)": ("marian", dict(vocab_size=58101, decoder_vocab_size=58101, d_model=512,
                                              encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
                                              decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048,
                                              pad_token_id=58100, decoder_start_token_id=58100, eos_token_id=0)),
}
ENGINES = ("minitx numpy", "minitx numba", "transformers")


def hf_model(family: str, kw: dict, folder: str):
    """A random transformers model of ``family`` saved to ``folder`` (no dropout, eager attention)."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    if family == "t5":
        cfg = tf.T5Config(dropout_rate=0.0, feed_forward_proj="relu", pad_token_id=0, eos_token_id=1,
                          decoder_start_token_id=0, **kw)
        cls = tf.T5ForConditionalGeneration
    elif family == "bart":
        cfg = tf.BartConfig(max_position_embeddings=1024, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                            forced_eos_token_id=None, forced_bos_token_id=None, **kw)
        cls = tf.BartForConditionalGeneration
    else:
        cfg = tf.MarianConfig(max_position_embeddings=512, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                              activation_function="swish", scale_embedding=True, forced_eos_token_id=None, **kw)
        cls = tf.MarianMTModel
    m = cls(cfg).eval()
    m.save_pretrained(folder, safe_serialization=True)
    gen = os.path.join(folder, "generation_config.json")
    if os.path.exists(gen):
        os.remove(gen)
    return cls.from_pretrained(folder, attn_implementation="eager").eval()


class Minitx:
    def __init__(self, model, backend: str) -> None:
        self.model, self.backends = model, (backend,)

    def run(self, src: list[int], steps: int) -> tuple[float, float, list[int]]:
        from minitx import seq2seq

        t0 = time.perf_counter()
        cross, mask = seq2seq.encode(self.model, [src], self.backends)
        start = np.array([[self.model.config["decoder_start_token_id"]]], np.int64)
        logits, past = seq2seq.decode_step(self.model, start, {}, cross, mask, self.backends)
        t1 = time.perf_counter()
        out = [int(logits[0, -1].argmax())]
        for _ in range(steps):
            logits, past = seq2seq.decode_step(self.model, np.array([[out[-1]]]), past, cross, mask, self.backends)
            out.append(int(logits[0, -1].argmax()))
        return t1 - t0, time.perf_counter() - t1, out

    def logits(self, src: list[int], tgt: list[int]) -> np.ndarray:
        from minitx import seq2seq

        return seq2seq.logits(self.model, [src], [tgt], self.backends)


class Transformers:
    def __init__(self, model) -> None:
        self.model = model

    def run(self, src: list[int], steps: int) -> tuple[float, float, list[int]]:
        import torch

        m = self.model
        with torch.no_grad():
            ids = torch.tensor([src])
            mask = torch.ones_like(ids)
            t0 = time.perf_counter()
            enc = m.get_encoder()(input_ids=ids, attention_mask=mask)
            o = m(encoder_outputs=enc, attention_mask=mask, use_cache=True,
                  decoder_input_ids=torch.tensor([[m.config.decoder_start_token_id]]))
            t1 = time.perf_counter()
            out = [int(o.logits[0, -1].argmax())]
            for _ in range(steps):
                o = m(encoder_outputs=enc, attention_mask=mask, past_key_values=o.past_key_values, use_cache=True,
                      decoder_input_ids=torch.tensor([[out[-1]]]))
                out.append(int(o.logits[0, -1].argmax()))
        return t1 - t0, time.perf_counter() - t1, out

    def logits(self, src: list[int], tgt: list[int]) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.model(input_ids=torch.tensor([src]), decoder_input_ids=torch.tensor([tgt]),
                              use_cache=False).logits.float().numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "seq2seq_cpu.md"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--source", type=int, default=64, help="source tokens")
    ap.add_argument("--steps", type=int, default=32, help="timed greedy decode steps after the first")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of: " + ", ".join(MODELS))
    args = ap.parse_args()

    import torch
    import transformers

    from minitx import machine, threads
    from minitx.convert import convert
    from minitx.modelfile import load
    from minitx.outputs import atomic_write

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        sys.exit(f"seq2seq_cpu.py: unknown model(s) {unknown}; known: {list(MODELS)}")
    threads.configure(args.threads)
    torch.set_num_threads(args.threads)
    info = machine.info()
    load0 = os.getloadavg()
    t_start = time.time()
    tmp = tempfile.mkdtemp(prefix="seq2seq_bench_")
    rng = np.random.default_rng(0)
    setups, checks = {}, {}
    for name in names:
        family, kw = MODELS[name]
        folder = os.path.join(tmp, family + str(len(setups)))
        print(f"building {name} ...", flush=True)
        hf = hf_model(family, kw, folder)
        path = folder + ".npz"
        convert(folder, path)
        m = load(path)
        engines = {"minitx numpy": Minitx(m, "numpy"), "minitx numba": Minitx(m, "numba"),
                   "transformers": Transformers(hf)}
        special = {hf.config.pad_token_id, hf.config.eos_token_id, hf.config.decoder_start_token_id}
        src = [int(t) for t in rng.integers(3, kw["vocab_size"] - 1, args.source) if int(t) not in special]
        tgt = [hf.config.decoder_start_token_id] + [int(t) for t in rng.integers(3, kw["vocab_size"] - 1, 15)]
        ref = engines["transformers"].logits(src, tgt)
        err = {e: float(np.abs(engines[e].logits(src, tgt) - ref).max() / np.abs(ref).max())
               for e in ENGINES[:2]}
        outs = {e: eng.run(src, args.steps)[2] for e, eng in engines.items()}   # also the warm-up (JIT)
        if err["minitx numba"] > 1e-4 or len({tuple(o) for o in outs.values()}) != 1:
            sys.exit(f"{name}: engines disagree (relative logit error {err}, greedy outputs {outs}): not timing")
        checks[name] = (err, outs["transformers"][:8])
        params = sum(p.numel() for p in hf.parameters())
        setups[name] = (engines, src, params, family)

    rounds: dict[str, dict[str, list[tuple[float, float]]]] = {n: {e: [] for e in ENGINES} for n in names}
    loads = []
    for r in range(args.rounds):
        for name in names:
            engines, src, _, _ = setups[name]
            order = ENGINES if r % 2 == 0 else ENGINES[::-1]
            for e in order:
                once, dec, _ = engines[e].run(src, args.steps)
                rounds[name][e].append((once * 1e3, args.steps / dec))
        loads.append(os.getloadavg()[0])
        print(f"round {r + 1}/{args.rounds} done, load {loads[-1]:.2f}", flush=True)
    elapsed = time.time() - t_start

    def med(xs):
        return statistics.median(xs)

    lines = ["# Encoder–decoders on the CPU: minitx beside transformers", "",
             f"Date: {info['date']}  ", f"Machine: {machine.summary(info)}  ",
             f"Load average at start: {load0[0]:.2f}, {load0[1]:.2f}, {load0[2]:.2f}; after each round: "
             + ", ".join(f"{x:.2f}" for x in loads) + "  ",
             f"torch {torch.__version__}, transformers {transformers.__version__}; {args.threads} threads for every "
             f"engine (minitx's budget, torch.set_num_threads)  ",
             f"Run time: {elapsed / 60:.1f} min", "",
             f"Reproduce: `python benchmarks/seq2seq_cpu.py --out benchmarks/results/seq2seq_cpu.md --rounds "
             f"{args.rounds} --threads {args.threads} --source {args.source} --steps {args.steps}`", "",
             f"Batch 1, a {args.source}-token random source, greedy. **once** = encoder + first decoder step (ms: "
             f"the cross-attention K/V are computed in the encoder by minitx, in the first decoder call by "
             f"transformers, so only the sum compares); **decode** = the next {args.steps} steps, tokens/s. Random "
             f"weights (torch seed 0) in transformers' classes, converted to minitx by `minitx.convert`. Engines "
             f"interleaved within each of {args.rounds} rounds (order alternating); medians over rounds; "
             f"\"vs transformers\" = median of per-round ratios (> 1: minitx faster).", "",
             "| model | params | engine | once ms | decode tok/s | once vs transformers | decode vs transformers |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for name in names:
        _, _, params, _ = setups[name]
        tr = rounds[name]["transformers"]
        for e in ENGINES:
            xs = rounds[name][e]
            once, dec = med([x[0] for x in xs]), med([x[1] for x in xs])
            if e == "transformers":
                ro = rd = "1"
            else:
                ro = f"{med([b[0] / a[0] for a, b in zip(xs, tr)]):.2f}x"
                rd = f"{med([a[1] / b[1] for a, b in zip(xs, tr)]):.2f}x"
            lines.append(f"| {name} | {params / 1e6:.1f} M | {e} | {once:.1f} | {dec:.1f} | {ro} | {rd} |")
    lines += ["", "## Same function (checked before timing)", "",
              "Teacher-forced logits of a 16-token random target over the source (every position, every "
              "token). Random weights make greedy decoding repeat one token, so equal greedy outputs are a weak "
              "check here; the logits are the real one.", "",
              "| model | teacher-forced logits, max \\|diff\\| / max \\|logit\\| vs transformers (numpy; numba) | "
              "greedy outputs (all engines equal; first 8) |", "|---|---|---|"]
    for name in names:
        err, out = checks[name]
        lines.append(f"| {name} | {err['minitx numpy']:.1e}; {err['minitx numba']:.1e} | {out} |")
    lines += ["", "Every round's figures (once ms / decode tok/s):", ""]
    for name in names:
        for e in ENGINES:
            lines.append(f"- {name}, {e}: " + "; ".join(f"{a:.1f} / {b:.1f}" for a, b in rounds[name][e]))
    with atomic_write(args.out) as f:
        f.write(("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
