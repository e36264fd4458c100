"""llama.cpp beside minitx on the CPU, the same GPT-2-small-shaped weights, one process, interleaved.

    pip install -r benchmarks/requirements-llamacpp.txt    # builds llama.cpp from source (minutes)
    python benchmarks/llamacpp_cpu.py --out benchmarks/results/llamacpp_cpu.md [--rounds 7] [--threads 2]

The model: ``transformers.GPT2LMHeadModel`` with GPT-2 small's shape (768 wide, 12 layers, 12
heads, vocab 50257, n_ctx 1024, tied head), random weights (torch seed 0, GPT-2's own init), saved
as a Hugging Face folder: config.json (with ``n_ctx``), model.safetensors and a tokenizer.json — a
byte-level BPE made here (the 256 byte symbols, 50000 merges of byte pairs, ``<|endoftext|>``),
since no GPT-2 tokenizer ships offline; only token ids are fed, never text.

* llama.cpp: **GGUF written by this script with the ``gguf`` package** (pinned to the version the
  llama-cpp-python 0.3.16 sdist vendors), not by llama.cpp's ``convert_hf_to_gguf.py``: that
  converter needs ``mistral_common`` at import and refuses a BPE tokenizer whose pre-tokenizer hash
  it does not know (ours). Tensors and keys are the ones it writes for GPT-2 (Conv1D weights
  transposed, no ``output.weight``: the head is tied). f32 as written; Q8_0 made from it by
  llama.cpp's own quantizer (``llama_model_quantize``). Runs through llama-cpp-python with
  ``n_threads`` = ``n_threads_batch`` = threads, default context settings otherwise (f16 KV cache).
* minitx: ``python cli.py convert`` (fp32), then ``python cli.py optimize --plugin quant:int8``
  (weight-only int8; validated on 2 random 16-token sequences only — the default held-out sweep
  takes minutes on this shape and is not what is measured here), numba backend, thread budget =
  threads.

Before timing, the two fp32 engines must compute the same function: the prompt's last-position
logits agree to a stated tolerance and the greedy tokens of the whole decode are identical (else
the script stops). Per round, every configuration in turn (order alternating): decode tokens/s at
batch 1 (``--steps`` greedy tokens after an 8-token prompt) and the latency of a 128-token prefill.
Ratios are medians of per-round ratios (minitx / llama.cpp, > 1: minitx faster).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import minitx  # noqa: E402,F401 — before NumPy, as in the CLI: it sets OpenBLAS's thread timeout

import numpy as np  # noqa: E402

SHAPE = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
PROMPT = [464, 2068, 7586, 21831, 18045, 625, 262, 16931]   # any 8 ids: only ids are fed
# max |llama.cpp − minitx| / max |logit| at the prompt's last position, fp32: llama.cpp keeps its
# KV cache in float16 by default and ggml's GELU reads a float16 table, so ~1e-3 rather than 1e-6.
LOGIT_RTOL = 2e-3


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte → printable character table (byte-level BPE's alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return [chars[b] for b in range(256)]


def vocabulary(n: int) -> tuple[list[str], list[str]]:
    """(tokens, merges) of a byte-level BPE of ``n`` tokens: bytes, byte-pair merges, end of text."""
    alpha = _bytes_to_unicode()
    merges = []
    for a in alpha:
        for b in alpha:
            if len(merges) == n - 257:
                break
            merges.append(f"{a} {b}")
    tokens = alpha + [m.replace(" ", "") for m in merges] + ["<|endoftext|>"]
    assert len(tokens) == n == len(set(tokens))
    return tokens, merges


def hf_folder(folder: str) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(**SHAPE, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)).eval()
    m.save_pretrained(folder, safe_serialization=True)
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    cfg["n_ctx"] = SHAPE["n_positions"]
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    tokens, merges = vocabulary(SHAPE["vocab_size"])
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, [tuple(x.split(" ")) for x in merges]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(os.path.join(folder, "tokenizer.json"))


def write_gguf(folder: str, path: str) -> None:
    """The HF folder as a GGUF f32 file, laid out as llama.cpp's converter lays out GPT-2."""
    import gguf
    from safetensors.numpy import load_file

    with open(os.path.join(folder, "config.json")) as f:
        hp = json.load(f)
    tokens, merges = vocabulary(hp["vocab_size"])
    w = gguf.GGUFWriter(path, "gpt2")
    w.add_name("random GPT-2 small shape")
    w.add_block_count(hp["n_layer"])
    w.add_context_length(hp["n_ctx"])
    w.add_embedding_length(hp["n_embd"])
    w.add_feed_forward_length(4 * hp["n_embd"])
    w.add_head_count(hp["n_head"])
    w.add_layer_norm_eps(hp["layer_norm_epsilon"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.NORMAL] * (len(tokens) - 1) + [gguf.TokenType.CONTROL])
    w.add_token_merges(merges)
    w.add_bos_token_id(len(tokens) - 1)
    w.add_eos_token_id(len(tokens) - 1)
    names = {"wte.weight": "token_embd.weight", "wpe.weight": "position_embd.weight",
             "ln_f.weight": "output_norm.weight", "ln_f.bias": "output_norm.bias"}
    per_block = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
                 "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    for name, a in sorted(load_file(os.path.join(folder, "model.safetensors")).items()):
        name = name.removeprefix("transformer.")
        if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
            continue
        if name.startswith("h."):
            _, i, rest = name.split(".", 2)
            mod, kind = rest.rsplit(".", 1)
            if kind == "weight" and mod in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
                a = a.T   # Conv1D (in, out) -> (out, in), as the converter does
            out = f"blk.{i}.{per_block[mod]}.{kind}"
        else:
            out = names[name]
        w.add_tensor(out, np.ascontiguousarray(a, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantize_q8(src: str, dst: str, threads: int) -> None:
    import llama_cpp
    from llama_cpp._utils import suppress_stdout_stderr

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    p.nthread = threads
    with suppress_stdout_stderr(disable=False):   # a line per tensor
        failed = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), p) != 0
    if failed:
        raise RuntimeError("llama_model_quantize failed")


class LlamaCpp:
    def __init__(self, path: str, threads: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(path, n_ctx=1024, n_batch=512, n_threads=threads, n_threads_batch=threads, seed=0,
                         verbose=False)

    def _logits(self) -> np.ndarray:
        """The last token's logits where llama.cpp left them (``Llama.eval`` keeps none without
        ``logits_all``, which would make every prefill token produce logits)."""
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))

    def last_logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return self._logits().copy()

    def decode(self, steps: int) -> tuple[float, list[int]]:
        out = [int(self.last_logits(PROMPT).argmax())]
        t = time.perf_counter()
        for _ in range(steps):
            self.llm.eval([out[-1]])
            out.append(int(self._logits().argmax()))
        return steps / (time.perf_counter() - t), out

    def prefill(self, ids: list[int]) -> float:
        self.llm.reset()
        t = time.perf_counter()
        self.llm.eval(ids)
        return (time.perf_counter() - t) * 1e3


ALL_LOGITS = "minitx numba fp32, every position's logits"


class Minitx:
    def __init__(self, path: str, last: bool = True) -> None:
        from minitx import modelfile

        self.m = modelfile.load(path)
        self.last = last

    def _step(self, ids, st):
        from minitx import generate as gen

        # last: the LM head on the last position only, as generation runs it (and as llama.cpp
        # does without logits_all); else every position's logits, as before (a row of its own)
        return gen.step(self.m, np.asarray(ids, np.int64), st, backends=("numba",), last=self.last)

    def last_logits(self, ids: list[int]) -> np.ndarray:
        from minitx import generate as gen

        logits, _ = self._step([ids], gen.empty_state(self.m, 1))
        return logits[0, -1]

    def decode(self, steps: int) -> tuple[float, list[int]]:
        from minitx import generate as gen

        logits, st = self._step([PROMPT], gen.empty_state(self.m, 1))
        out = [int(logits[0, -1].argmax())]
        t = time.perf_counter()
        for _ in range(steps):
            logits, st = self._step([[out[-1]]], st)
            out.append(int(logits[0, -1].argmax()))
        return steps / (time.perf_counter() - t), out

    def prefill(self, ids: list[int]) -> float:
        from minitx import generate as gen

        st = gen.empty_state(self.m, 1)
        t = time.perf_counter()
        self._step([ids], st)
        return (time.perf_counter() - t) * 1e3


def _cli(*args: str) -> None:
    subprocess.run([sys.executable, os.path.join(ROOT, "cli.py"), *args], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "llamacpp_cpu.md"))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=64, help="greedy decode steps timed after the prompt")
    ap.add_argument("--prefill", type=int, default=128, help="prefill length in tokens")
    args = ap.parse_args()
    try:
        import gguf  # noqa: F401
        import llama_cpp
    except ImportError as e:
        print(f"llamacpp_cpu.py: {e}; install with: CMAKE_ARGS=\"-DGGML_NATIVE=ON\" "
              "pip install -r benchmarks/requirements-llamacpp.txt", file=sys.stderr)
        sys.exit(2)

    from minitx import machine, threads
    from minitx.outputs import atomic_write

    t_start = time.time()
    threads.configure(args.threads)
    info = machine.info()
    load0 = os.getloadavg()
    tmp = tempfile.mkdtemp(prefix="llamacpp_bench_")
    try:
        folder = os.path.join(tmp, "gpt2")
        paths = {k: os.path.join(tmp, f) for k, f in (("f32", "f32.gguf"), ("q8", "q8_0.gguf"), ("fp32", "fp32.npz"),
                                                       ("int8", "int8.npz"))}
        print("building the HF folder, GGUF f32 and Q8_0, minitx fp32 and int8 ...", flush=True)
        hf_folder(folder)
        write_gguf(folder, paths["f32"])
        quantize_q8(paths["f32"], paths["q8"], args.threads)
        _cli("convert", folder, "-o", paths["fp32"])
        _cli("optimize", paths["fp32"], "--plugin", "quant:int8", "--threads", str(args.threads), "--force",
             "--validate", "random:2x16",
             "-o", paths["int8"])
        sizes = {k: os.path.getsize(p) for k, p in paths.items()}
        shutil.rmtree(folder)
        engines = {"llama.cpp f32": LlamaCpp(paths["f32"], args.threads),
                   "llama.cpp Q8_0": LlamaCpp(paths["q8"], args.threads),
                   "minitx numba fp32": Minitx(paths["fp32"]), "minitx numba int8": Minitx(paths["int8"]),
                   ALL_LOGITS: Minitx(paths["fp32"], last=False)}
        setup_s = time.time() - t_start

        # Same function first: fp32 logits and the greedy decode of both engines.
        ref = engines["llama.cpp f32"].last_logits(PROMPT)
        got = engines["minitx numba fp32"].last_logits(PROMPT)
        logit_err = float(np.abs(got - ref).max() / np.abs(ref).max())
        greedy = {k: e.decode(args.steps)[1] for k, e in engines.items()}   # also warms up (JIT)
        same = greedy["llama.cpp f32"] == greedy["minitx numba fp32"]
        if logit_err > LOGIT_RTOL or not same:
            sys.exit(f"llama.cpp f32 and minitx fp32 disagree (logit error {logit_err:.2e}, greedy equal: {same}): "
                     "not timing")
        q_agree = sum(a == b for a, b in zip(greedy["llama.cpp Q8_0"], greedy["minitx numba int8"]))
        q_vs_f = {k: sum(a == b for a, b in zip(greedy[k], greedy["llama.cpp f32"])) for k in greedy}
        rng = np.random.default_rng(0)
        long_prompt = [int(x) for x in rng.integers(0, SHAPE["vocab_size"] - 1, args.prefill)]

        names = list(engines)
        dec: dict[str, list[float]] = {k: [] for k in names}
        pre: dict[str, list[float]] = {k: [] for k in names}
        loads = []
        for r in range(args.rounds):
            for k in (names if r % 2 == 0 else names[::-1]):
                dec[k].append(engines[k].decode(args.steps)[0])
                pre[k].append(engines[k].prefill(long_prompt))
            loads.append(os.getloadavg()[0])
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {dec[k][-1]:.1f} tok/s {pre[k][-1]:.0f} ms"
                                                             for k in names) + f"; load {loads[-1]:.2f}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.time() - t_start

    med = statistics.median

    def ratio(a: str, b: str, xs: dict[str, list[float]], higher_better: bool) -> float:
        return med([(x / y if higher_better else y / x) for x, y in zip(xs[a], xs[b])])

    pairs = [("minitx numba fp32", "llama.cpp f32"), ("minitx numba int8", "llama.cpp Q8_0"),
             ("minitx numba int8", "minitx numba fp32"), ("llama.cpp Q8_0", "llama.cpp f32"),
             ("minitx numba fp32", ALL_LOGITS)]
    size_of = {"llama.cpp f32": "f32", "llama.cpp Q8_0": "q8", "minitx numba fp32": "fp32", "minitx numba int8": "int8",
               ALL_LOGITS: "fp32"}
    lines = ["# llama.cpp beside minitx on the CPU (GPT-2-small shape, same weights)", "",
             f"Date: {info['date']}  ", f"Machine: {machine.summary(info)}  ",
             f"llama.cpp: llama-cpp-python {llama_cpp.__version__}, built from source here; "
             f"{llama_cpp.llama_print_system_info().decode().strip()}  ",
             f"Load average at start: {load0[0]:.2f}, {load0[1]:.2f}, {load0[2]:.2f}; after each round: "
             + ", ".join(f"{x:.2f}" for x in loads) + "  ",
             f"{args.threads} threads for every engine; {args.rounds} rounds, configurations interleaved in one "
             f"process (order alternating); run time {elapsed / 60:.1f} min (setup {setup_s / 60:.1f} min)", "",
             "Reproduce: `pip install -r benchmarks/requirements-llamacpp.txt && python benchmarks/llamacpp_cpu.py "
             f"--out benchmarks/results/llamacpp_cpu.md --rounds {args.rounds} --threads {args.threads}`", "",
             f"Model: GPT-2 small's shape (768 wide, 12 layers, 12 heads, vocab 50257, n_ctx 1024, tied head), random "
             f"weights (torch seed 0, GPT-2's init). llama.cpp reads a GGUF this script writes with the `gguf` package "
             f"(llama.cpp's converter refuses the synthetic tokenizer and needs mistral_common); Q8_0 by "
             f"llama.cpp's quantizer. minitx: `cli.py convert`, `cli.py optimize --plugin quant:int8`. Decode: "
             f"{args.steps} greedy tokens at batch 1 after an 8-token prompt; prefill: {args.prefill} tokens at batch 1. "
             f"minitx computes the LM head on the last position only, as its generation does and as llama.cpp does "
             f"without logits_all; '{ALL_LOGITS}' is the same model computing every position's logits.",
             "", "| engine | file MiB | decode tok/s (median) | min–max | prefill ms (median) | min–max |",
             "|---|---:|---:|---:|---:|---:|"]
    for k in names:
        lines.append(f"| {k} | {sizes[size_of[k]] / 2**20:.0f} | {med(dec[k]):.1f} | {min(dec[k]):.1f}–{max(dec[k]):.1f} "
                     f"| {med(pre[k]):.0f} | {min(pre[k]):.0f}–{max(pre[k]):.0f} |")
    lines += ["", "Ratios (median of per-round ratios; > 1: the first is faster):", "",
              "| pair | decode | prefill |", "|---|---:|---:|"]
    for a, b in pairs:
        lines.append(f"| {a} / {b} | {ratio(a, b, dec, True):.2f}x | {ratio(a, b, pre, False):.2f}x |")
    lines += ["", "## Same function (checked before timing)", "",
              f"- fp32: prompt's last-position logits, max |llama.cpp − minitx| / max |logit| = {logit_err:.1e} "
              f"(tolerance {LOGIT_RTOL:g}); greedy tokens identical over all {args.steps + 1} steps.",
              "- greedy tokens equal to llama.cpp f32's: " + ", ".join(f"{k} {v}/{args.steps + 1}"
                                                                        for k, v in q_vs_f.items())
              + f"; Q8_0 vs minitx int8 {q_agree}/{args.steps + 1} (different quantizers and "
                "scales: not expected equal).", "",
              "Every round (decode tok/s / prefill ms):", ""]
    for k in names:
        lines.append(f"- {k}: " + "; ".join(f"{a:.1f} / {b:.0f}" for a, b in zip(dec[k], pre[k])))
    with atomic_write(args.out) as f:
        f.write(("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
