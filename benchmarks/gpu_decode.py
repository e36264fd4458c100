"""GPU benchmarks: minitx on the cupy backend vs Hugging Face transformers on the same GPU.

One stage per process (``benchmarks/gpu_session.sh`` runs each under ``timeout``, so one that
fails or hangs leaves the others' results); each stage writes ``WORK/<stage>.json`` after every
measurement, so a stage cut short still reports what it finished. ``report`` turns the JSON
files into Markdown with the date, the GPU and library versions.

Stages:
  gpt2     GPT-2-small fp16, random weights: transformers GPT2LMHeadModel (eager PyTorch,
           ``generate``) and minitx with the *same* weights, read through minitx's converter
           (save_pretrained → minitx.convert.plan → parameters). Batch-1 greedy generation.
  llama    A 1.1B LLaMA-shaped fp16 model (22 layers, 2048 wide, 32 heads, 4 KV heads, FFN 5632,
           random weights), same route: batch-1 decode with the HBM roofline (device copy
           bandwidth / weight bytes read per token) beside it, and prefill of 1x1024 tokens.
  quant    The same 1.1B shape built by minitx, quantized by the quant plugin (int8, int4):
           decode tokens/s on cupy vs the float16 model.
  report   Markdown from whatever JSON exists.

``--smoke`` runs the same code on the CPU with tiny shapes, torch on the CPU and the NumPy spec
in place of cupy: it checks the flow (conversion, timing loops, roofline arithmetic, report)
where no GPU exists. Its figures mean nothing.

    python benchmarks/gpu_decode.py gpt2 --work /tmp/w [--smoke]
    python benchmarks/gpu_decode.py report --work /tmp/w --out results.md
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import minitx  # noqa: E402,F401 — before NumPy, as in the CLI

import numpy as np  # noqa: E402

PROMPT = 16
GPT2_SMALL = dict(vocab_size=50257, n_ctx=1024, d_model=768, n_layers=12, n_heads=12, d_ff=3072)
LLAMA_1B = dict(vocab_size=32000, n_ctx=2048, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4, d_ff=5632)
SMOKE_GPT2 = dict(vocab_size=512, n_ctx=128, d_model=64, n_layers=2, n_heads=4, d_ff=256)
SMOKE_LLAMA = dict(vocab_size=512, n_ctx=1100, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=256)


# ----------------------------------------------------------------------------- the setting
class Bench:
    """Where a stage runs: the device, the minitx backend, sizes, and its JSON result file."""

    def __init__(self, stage: str, work: str, smoke: bool) -> None:
        self.stage, self.work, self.smoke = stage, work, smoke
        self.backend = "numpy" if smoke else "cupy"
        self.device = "cpu" if smoke else "cuda"
        self.new_tokens = 4 if smoke else 64
        self.repeat = 1 if smoke else 3
        self.result: dict[str, Any] = {"stage": stage, "smoke": smoke, "errors": []}
        os.makedirs(work, exist_ok=True)
        self.save()

    def save(self) -> None:
        path = os.path.join(self.work, f"{self.stage}.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.result, f, indent=1, default=float)
        os.replace(tmp, path)

    def record(self, key: str, fn: Callable[[], Any]) -> Any:
        """Run one measurement; its value (or its error) goes into the JSON at once."""
        t = time.perf_counter()
        try:
            value = fn()
        except Exception as e:  # noqa: BLE001 — one failing measurement must not stop the rest
            self.result["errors"].append(f"{key}: {type(e).__name__}: {e}")
            traceback.print_exc()
            value = None
        else:
            self.result[key] = value
        print(f"[{self.stage}] {key} = {value!r} ({time.perf_counter() - t:.1f} s)", flush=True)
        self.save()
        return value

    def sync(self) -> None:
        if self.device == "cuda":
            import cupy
            import torch

            cupy.cuda.get_current_stream().synchronize()
            torch.cuda.synchronize()


def median_time(fn: Callable[[], Any], sync: Callable[[], None], repeat: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    sync()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def prompt(vocab: int, T: int = PROMPT, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (1, T))


# ------------------------------------------------------------------- the transformers side
def hf_model(arch: str, cfg: dict, device: str):
    """transformers' model for a minitx config, random weights (seed 0), float16 on a GPU."""
    import torch

    torch.manual_seed(0)
    if arch == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        hc = GPT2Config(vocab_size=cfg["vocab_size"], n_positions=cfg["n_ctx"], n_embd=cfg["d_model"],
                        n_layer=cfg["n_layers"], n_head=cfg["n_heads"], n_inner=cfg["d_ff"],
                        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=cfg["vocab_size"] - 1, eos_token_id=cfg["vocab_size"] - 1)
        cls = GPT2LMHeadModel
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        hc = LlamaConfig(vocab_size=cfg["vocab_size"], hidden_size=cfg["d_model"], intermediate_size=cfg["d_ff"],
                         num_hidden_layers=cfg["n_layers"], num_attention_heads=cfg["n_heads"],
                         num_key_value_heads=cfg["n_kv_heads"], max_position_embeddings=cfg["n_ctx"],
                         rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1,
                         eos_token_id=2)
        cls = LlamaForCausalLM
    dtype = torch.float16 if device == "cuda" else torch.float32
    with torch.device(device):
        m = cls(hc)
    return m.to(dtype).eval()


def minitx_via_converter(hf, folder: str, dtype: str):
    """The HF model's weights as a minitx Model, through minitx's converter: save_pretrained
    (safetensors), then ``minitx.convert.plan`` maps names and layouts, as ``minitx convert``
    does; parameters are built in memory (no multi-GB .npz round trip), cast to ``dtype``."""
    from minitx import convert, models
    from minitx.model import Model
    from minitx.precision import Precision

    hf.save_pretrained(folder, safe_serialization=True)
    plan, tensors = convert.plan(folder)
    p = Precision(dtype)
    params = {name: build([tensors.get(s) for s in srcs]) for name, (srcs, build) in plan.params.items()}
    params = p.params({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in params.items()})
    return Model(plan.config, params, p.graph(models.build_graph(plan.config)))


def max_logit_diff(b: Bench, hf, m, ids: np.ndarray) -> float:
    import torch

    from minitx import generate as gen

    with torch.inference_mode():
        want = hf(torch.from_numpy(ids).to(b.device)).logits.float().cpu().numpy()
    got, _ = gen.step(m, ids, gen.empty_state(m, 1), None, (b.backend,))
    return float(np.abs(got.astype(np.float32) - want).max())


def hf_generate_tps(b: Bench, hf, ids: np.ndarray, n: int) -> float:
    """transformers ``generate``, greedy, exactly n new tokens after the prompt (eager PyTorch)."""
    import torch

    x = torch.from_numpy(ids).to(b.device)

    def run():
        with torch.inference_mode():
            hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                        pad_token_id=0)
    return n / median_time(run, b.sync, b.repeat)


def hf_decode_tps(b: Bench, hf, ids: np.ndarray, n: int) -> float:
    """transformers forward steps with its KV cache: decode only (the prompt's prefill untimed)."""
    import torch

    x = torch.from_numpy(ids).to(b.device)

    def start():
        with torch.inference_mode():
            return hf(x, use_cache=True)

    def steps(out):
        with torch.inference_mode():
            for _ in range(n):
                out = hf(out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)
    return n / steps_time(b, start, steps)


def steps_time(b: Bench, start: Callable[[], Any], steps: Callable[[Any], Any]) -> float:
    """Median over runs (one warm-up) of the time ``steps`` takes after an untimed ``start``."""
    ts = []
    for r in range(b.repeat + 1):
        s0 = start()
        b.sync()
        t = time.perf_counter()
        steps(s0)
        b.sync()
        if r:
            ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def hf_prefill_tps(b: Bench, hf, ids: np.ndarray) -> float:
    import torch

    x = torch.from_numpy(ids).to(b.device)

    def run():
        with torch.inference_mode():
            hf(x, use_cache=True)
    return ids.shape[1] / median_time(run, b.sync, b.repeat)


# ------------------------------------------------------------------------ the minitx side
def mx_generate_tps(b: Bench, m, ids: np.ndarray, n: int) -> float:
    from minitx import generate as gen

    prompts = ids.tolist()
    return n / median_time(lambda: gen.generate(m, prompts, n, backends=(b.backend,)), b.sync, b.repeat)


def mx_decode_tps(b: Bench, m, ids: np.ndarray, n: int) -> float:
    """Decode steps only (the prompt's prefill untimed), as the roofline counts them."""
    from minitx import generate as gen

    def start():
        return gen.step(m, ids, gen.empty_state(m, 1), None, (b.backend,))

    def steps(s0):
        logits, st = s0
        for _ in range(n):
            logits, st = gen.step(m, logits[:, -1].argmax(-1)[:, None], st, None, (b.backend,))
    return n / steps_time(b, start, steps)


def mx_prefill_tps(b: Bench, m, ids: np.ndarray) -> float:
    from minitx import generate as gen

    return ids.shape[1] / median_time(lambda: gen.step(m, ids, gen.empty_state(m, 1), None, (b.backend,)),
                                      b.sync, b.repeat)


def placement(b: Bench, m) -> dict[str, int]:
    ex = m.executor((b.backend,))
    out: dict[str, int] = {}
    for _, _, where in ex.explain():
        out[where] = out.get(where, 0) + 1
    return out


# --------------------------------------------------------------------------------- roofline
def copy_bandwidth(b: Bench) -> float:
    """Device copy bandwidth in bytes/s (read + write counted), best of 5 copies of 1 GiB
    (16 MiB in smoke mode, on the host)."""
    n = (4 * 2**20) if b.smoke else 256 * 2**20
    if b.smoke:
        a = np.ones(n, np.float32)
        out = np.empty_like(a)
        best = min(median_time(lambda: np.copyto(out, a), lambda: None, 1) for _ in range(5))
        return 2 * a.nbytes / best
    import cupy

    a = cupy.ones(n, cupy.float32)
    out = cupy.empty_like(a)
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    cupy.copyto(out, a)
    best = float("inf")
    for _ in range(5):
        start.record()
        cupy.copyto(out, a)
        stop.record()
        stop.synchronize()
        best = min(best, cupy.cuda.get_elapsed_time(start, stop) / 1e3)
    return 2 * a.nbytes / best


def weight_bytes_per_token(m) -> int:
    """Bytes of weights one decode step reads: every parameter once, except embedding tables
    that are only gathered (one row per token) and not also the (tied) LM head."""
    total = 0
    heads = {n.inputs[1] for n in m.graph.nodes if n.op in ("matmul", "linear_q8", "linear_q4")
             and len(n.inputs) > 1}
    gathered = {n.inputs[1] for n in m.graph.nodes if n.op.startswith("embedding")}
    for name, a in m.params.items():
        if name in gathered and name not in heads:
            total += a.nbytes // max(1, a.shape[0])
        else:
            total += a.nbytes
    return int(total)


def roofline(bw: float, wbytes: int) -> float:
    """Upper bound on batch-1 decode tokens/s when every weight byte is read once per token."""
    return bw / wbytes


# ----------------------------------------------------------------------------------- stages
def _models(b: Bench, family: str, cfg: dict) -> tuple[Any, Any]:
    """The transformers model and minitx's conversion of the same weights."""
    b.result["config"] = cfg
    hf = hf_model(family, cfg, b.device)
    b.result["hf_attn_implementation"] = getattr(hf.config, "_attn_implementation", "?")
    with tempfile.TemporaryDirectory() as d:
        return hf, minitx_via_converter(hf, d, "float32" if b.smoke else "float16")


def _checked_prompt(b: Bench, hf: Any, m: Any, cfg: dict) -> tuple[np.ndarray, int]:
    """The prompt and decode length, after recording where minitx's nodes run and how far its
    logits are from transformers' on that prompt."""
    ids = prompt(cfg["vocab_size"])
    b.record("placement", lambda: placement(b, m))
    b.record("max_abs_logit_diff_vs_hf", lambda: max_logit_diff(b, hf, m, ids))
    b.result["new_tokens"] = b.new_tokens
    return ids, b.new_tokens


def stage_gpt2(b: Bench) -> None:
    cfg = SMOKE_GPT2 if b.smoke else GPT2_SMALL
    hf, m = _models(b, "gpt2", cfg)
    ids, n = _checked_prompt(b, hf, m, cfg)
    b.record("hf_generate_tps", lambda: hf_generate_tps(b, hf, ids, n))
    b.record("minitx_generate_tps", lambda: mx_generate_tps(b, m, ids, n))
    b.record("hf_decode_tps", lambda: hf_decode_tps(b, hf, ids, n))
    b.record("minitx_decode_tps", lambda: mx_decode_tps(b, m, ids, n))


def stage_llama(b: Bench) -> None:
    cfg = SMOKE_LLAMA if b.smoke else LLAMA_1B
    b.record("copy_bandwidth_Bps", lambda: copy_bandwidth(b))
    hf, m = _models(b, "llama", cfg)
    b.result["n_params"] = m.n_params()
    b.record("weight_bytes_per_token", lambda: weight_bytes_per_token(m))
    if b.result.get("copy_bandwidth_Bps") and b.result.get("weight_bytes_per_token"):
        b.result["roofline_tps"] = roofline(b.result["copy_bandwidth_Bps"], b.result["weight_bytes_per_token"])
    ids, n = _checked_prompt(b, hf, m, cfg)
    b.record("minitx_decode_tps", lambda: mx_decode_tps(b, m, ids, n))
    b.record("hf_decode_tps", lambda: hf_decode_tps(b, hf, ids, n))
    b.record("minitx_generate_tps", lambda: mx_generate_tps(b, m, ids, n))
    b.record("hf_generate_tps", lambda: hf_generate_tps(b, hf, ids, n))
    long = prompt(cfg["vocab_size"], 32 if b.smoke else 1024, seed=2)
    b.result["prefill_tokens"] = int(long.shape[1])
    b.record("minitx_prefill_tps", lambda: mx_prefill_tps(b, m, long))
    b.record("hf_prefill_tps", lambda: hf_prefill_tps(b, hf, long))


def stage_quant(b: Bench) -> None:
    from minitx.model import Model
    from minitx.plugin import optimize
    from minitx.precision import Precision

    cfg = {"arch": "llama", **(SMOKE_LLAMA if b.smoke else LLAMA_1B)}
    b.result["config"] = cfg
    t = time.perf_counter()
    base = Model.from_config(cfg, seed=0)
    b.result["build_s"] = time.perf_counter() - t
    ids = prompt(cfg["vocab_size"])
    n = b.new_tokens
    p16 = Precision("float32" if b.smoke else "float16")
    f16 = Model(base.config, p16.params(base.params), p16.graph(base.graph))
    b.record("float16_decode_tps", lambda: mx_decode_tps(b, f16, ids, n))
    b.record("float16_weight_bytes_per_token", lambda: weight_bytes_per_token(f16))
    f16 = None  # free the float16 copy before quantizing
    for mode, spec in (("int8", "quant:int8"), ("int4", "quant:int4")):
        t = time.perf_counter()
        try:
            q = optimize(base, [spec], validate=False)
        except Exception as e:  # noqa: BLE001
            b.result["errors"].append(f"{mode}: quantizing: {type(e).__name__}: {e}")
            b.save()
            continue
        b.result[f"{mode}_quantize_s"] = time.perf_counter() - t
        b.record(f"{mode}_placement", lambda q=q: placement(b, q))
        b.record(f"{mode}_weight_bytes_per_token", lambda q=q: weight_bytes_per_token(q))
        b.record(f"{mode}_decode_tps", lambda q=q: mx_decode_tps(b, q, ids, n))
        del q


STAGES = {"gpt2": stage_gpt2, "llama": stage_llama, "quant": stage_quant}


# ----------------------------------------------------------------------------------- report
def _load(work: str, stage: str) -> dict:
    try:
        with open(os.path.join(work, f"{stage}.json")) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}


def _f(v: Any, fmt: str = "{:.1f}") -> str:
    return "—" if v is None else fmt.format(v)


def _ratio(a: Any, b: Any) -> str:
    return f"{a / b:.2f}x" if a and b else "—"


def machine_record(smoke: bool) -> dict:
    from minitx import machine

    info = machine.info()
    if not smoke:
        try:
            import cupy

            props = cupy.cuda.runtime.getDeviceProperties(0)
            name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
            info["gpu_cupy"] = (f"{name}, {props['totalGlobalMem'] / 2**30:.1f} GiB, {props['multiProcessorCount']} SMs, "
                                f"CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}, driver "
                                f"{cupy.cuda.runtime.driverGetVersion()}")
            info["versions"]["cupy"] = cupy.__version__
        except Exception as e:  # noqa: BLE001
            info["gpu_cupy"] = f"unavailable: {e}"
    return info


def report(work: str, smoke: bool) -> str:
    from minitx import machine

    info = machine_record(smoke)
    g, ll, q = _load(work, "gpt2"), _load(work, "llama"), _load(work, "quant")
    v = info.get("versions", {})
    L = ["# GPU benchmarks: minitx cupy backend vs transformers", ""]
    if smoke:
        L += ["**SMOKE RUN** (CPU, tiny shapes, NumPy spec in place of cupy): checks the flow only; "
              "the figures mean nothing.", ""]
    L += [f"Date: {info['date']}. Command: `bash benchmarks/gpu_session.sh` (stages of "
          "`benchmarks/gpu_decode.py`).", "",
          f"Machine: {machine.summary(info)}.", "",
          f"GPU (CuPy): {info.get('gpu_cupy', '-')}; cupy {v.get('cupy', '-')}, torch {v.get('torch', '-')}, "
          f"transformers {v.get('transformers', '-')}.", "",
          "Batch 1, greedy, prompt of 16 random tokens; medians of 3 runs after a warm-up. *generate*: "
          "new tokens / wall time of a whole generate call (prefill included; transformers' "
          "`generate`, minitx's `generate`). *decode*: steps with a KV cache only. transformers runs "
          "eager PyTorch (no torch.compile, no CUDA graphs) with its default attention "
          "implementation (named below). minitx reads the same weights through its converter.", ""]
    L += ["## GPT-2-small, float16", "",
          f"transformers attention: {g.get('hf_attn_implementation', '-')}; max |logit diff| minitx vs "
          f"transformers: {_f(g.get('max_abs_logit_diff_vs_hf'), '{:.3g}')}; minitx placement: "
          f"{g.get('placement', '-')}.", "",
          "| tokens/s | transformers | minitx cupy | minitx / transformers |", "|---|---:|---:|---:|",
          f"| generate, {g.get('new_tokens', '-')} new tokens | {_f(g.get('hf_generate_tps'))} | "
          f"{_f(g.get('minitx_generate_tps'))} | {_ratio(g.get('minitx_generate_tps'), g.get('hf_generate_tps'))} |",
          f"| decode steps | {_f(g.get('hf_decode_tps'))} | {_f(g.get('minitx_decode_tps'))} | "
          f"{_ratio(g.get('minitx_decode_tps'), g.get('hf_decode_tps'))} |", ""]
    bw, wb, roof = ll.get("copy_bandwidth_Bps"), ll.get("weight_bytes_per_token"), ll.get("roofline_tps")
    L += ["## 1.1B LLaMA shape, float16 (22 layers, 2048 wide, 32 heads, 4 KV heads, FFN 5632)", "",
          f"Parameters: {_f(ll.get('n_params'), '{:,}')}; transformers attention: "
          f"{ll.get('hf_attn_implementation', '-')}; max |logit diff| vs transformers: "
          f"{_f(ll.get('max_abs_logit_diff_vs_hf'), '{:.3g}')}; minitx placement: {ll.get('placement', '-')}.", "",
          f"HBM roofline: device copy bandwidth {_f(bw and bw / 1e9)} GB/s (cupy copy of 1 GiB, read + write) / "
          f"{_f(wb and wb / 1e6)} MB of weights read per token = **{_f(roof)} tokens/s**.", "",
          "| tokens/s | transformers | minitx cupy | minitx / transformers | minitx / roofline |",
          "|---|---:|---:|---:|---:|",
          f"| decode steps | {_f(ll.get('hf_decode_tps'))} | {_f(ll.get('minitx_decode_tps'))} | "
          f"{_ratio(ll.get('minitx_decode_tps'), ll.get('hf_decode_tps'))} | "
          f"{_f(roof and ll.get('minitx_decode_tps') and ll['minitx_decode_tps'] / roof, '{:.0%}')} |",
          f"| generate | {_f(ll.get('hf_generate_tps'))} | {_f(ll.get('minitx_generate_tps'))} | "
          f"{_ratio(ll.get('minitx_generate_tps'), ll.get('hf_generate_tps'))} | |",
          f"| prefill 1x{ll.get('prefill_tokens', 1024)} | {_f(ll.get('hf_prefill_tps'))} | "
          f"{_f(ll.get('minitx_prefill_tps'))} | {_ratio(ll.get('minitx_prefill_tps'), ll.get('hf_prefill_tps'))} | |",
          ""]
    L += ["## Quantized decode on cupy (same 1.1B shape, built by minitx, quant plugin)", "",
          "| weights | bytes read / token (MB) | decode tokens/s | vs float16 | placement |", "|---|---:|---:|---:|---|"]
    for mode in ("float16", "int8", "int4"):
        L.append(f"| {mode} | {_f(q.get(f'{mode}_weight_bytes_per_token') and q[f'{mode}_weight_bytes_per_token'] / 1e6)} | "
                 f"{_f(q.get(f'{mode}_decode_tps'))} | {_ratio(q.get(f'{mode}_decode_tps'), q.get('float16_decode_tps'))} | "
                 f"{q.get(f'{mode}_placement', '') if mode != 'float16' else ''} |")
    gm, gh = g.get("minitx_generate_tps"), g.get("hf_generate_tps")
    dm = ll.get("minitx_decode_tps")
    pm, ph = ll.get("minitx_prefill_tps"), ll.get("hf_prefill_tps")

    def met(x: Any, goal: float) -> str:
        return "—" if x is None else ("yes" if x >= goal else "no")
    L += ["", "## Targets (issue 6)", "", "| target | measured | met? |", "|---|---:|---|",
          f"| GPT-2-small fp16 generate b1 >= 5x transformers eager | {_ratio(gm, gh)} | {met(gm and gh and gm / gh, 5)} |",
          f"| 1.1B LLaMA fp16 decode b1 >= 50% of HBM roofline | {_f(dm and roof and dm / roof, '{:.0%}')} | "
          f"{met(dm and roof and dm / roof, 0.5)} |",
          f"| prefill 1x1024 >= transformers | {_ratio(pm, ph)} | {met(pm and ph and pm / ph, 1.0)} |", ""]
    errs = [f"{s}: {e}" for s, d in (("gpt2", g), ("llama", ll), ("quant", q)) for e in d.get("errors", [])]
    missing = [s for s, d in (("gpt2", g), ("llama", ll), ("quant", q)) if not d]
    if errs or missing:
        L += ["## Errors", ""] + [f"- {e}" for e in errs] + [f"- stage {s}: no result (failed or timed out "
                                                            "before its first measurement; see the log)" for s in missing]
        L.append("")
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("stage", choices=[*STAGES, "report"])
    ap.add_argument("--work", required=True, help="folder for the stages' JSON results")
    ap.add_argument("--out", help="report: the Markdown file to write (default: print)")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, the spec in place of cupy")
    a = ap.parse_args(argv)
    if a.stage == "report":
        text = report(a.work, a.smoke)
        if a.out:
            from minitx.bench import write_text_atomic

            write_text_atomic(a.out, text)
        print(text)
        return 0
    b = Bench(a.stage, a.work, a.smoke)
    try:
        STAGES[a.stage](b)
    except Exception as e:  # noqa: BLE001 — recorded, and the exit status says it
        b.result["errors"].append(f"stage: {type(e).__name__}: {e}")
        b.save()
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
