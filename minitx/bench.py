"""``minitx bench``: speed, memory, size and accuracy of each (backend × plugin set), measured.

For every configuration asked, on the same seeded inputs:

* prefill latency at batch 1 and at a larger batch (decoders: a prompt of ``prompt_len`` tokens;
  encoders: one forward pass, reported as sentences/s too);
* decode throughput (decoders): ``new_tokens`` greedy KV-cache steps after the prompt, tokens/s
  at batch 1 and at the larger batch;
* encoder–decoders (T5, BART, Marian, transformer): the encoder's time over a ``prompt_len``-token
  source (``encode_ms``: the encoder stack plus every layer's cross-attention K/V, what runs once
  per input), then decoder tokens/s over ``new_tokens`` greedy steps from the start token; the
  two are reported apart because they scale differently (source length vs. output length);
* peak memory: the process's resident-set high-water mark (VmHWM) while that configuration ran —
  reset before each of its turns through /proc/self/clear_refs where Linux allows it (the maximum
  over its turns), else the process-wide ``ru_maxrss`` (then marked as not reset); device memory
  too when a GPU backend ran;
* model bytes: the parameters' nbytes (for a plugin-rewritten model, its packed weights);
* accuracy against the spec (NumPy backend, no plugin): max abs / rel error, cosine and top-1
  agreement of the logits (or embeddings) on the larger batch, via :mod:`minitx.metrics`;
* the bandwidth roofline beside each batch-1 decode figure on the host: the measured read
  bandwidth (:func:`minitx.machine.read_bandwidth`) over the weight bytes one decode step reads
  (:func:`weight_bytes_per_token`: packed bytes for a quantized model), and the share of it reached.

``vs_torch`` adds the same model in PyTorch (:mod:`minitx.torchref`), same thread count, timed
the same way in the same run, and every minitx row gets speed ratios against it. Every
configuration is warmed up, then measured in ``repeat`` rounds, each round running every
configuration once in turn (interleaved, so that a change of load on a shared machine hits all of
them alike); each timing is the median with min–max over the rounds. A configuration that cannot
run (unknown backend, no GPU, a plugin failing validation) becomes a row with that reason in its
``status`` and the others still run. Nothing here asserts a speed: the figures are reported.
"""
from __future__ import annotations

import os
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from . import feeds, machine, seq2seq
from .errors import MinitxError
from .modelfile import atomic_write
from .threads import budget as thread_budget

SCHEMA = "minitx.bench/1"
Progress = Callable[[int, str], None]


# ------------------------------------------------------------------------------- settings, stats
FLAGS = {"repeat": "--repeat", "batch": "--batch", "prompt_len": "--seq", "new_tokens": "--max-new-tokens"}


@dataclass
class Settings:
    repeat: int = 5
    warmup: int = 1
    batch: int = 4
    prompt_len: int = 32
    new_tokens: int = 16
    seed: int = 0
    threads: int = 0            # 0: the engine's thread budget (minitx.threads)

    def check(self) -> None:
        for k, flag in FLAGS.items():
            if getattr(self, k) < 1:
                raise MinitxError(f"{flag} must be at least 1, got {getattr(self, k)}")
        if self.warmup < 0:
            raise MinitxError(f"warm-up runs must be >= 0, got {self.warmup}")


def stat(values: Sequence[float]) -> dict[str, float]:
    """Median with min and max: the median resists a shared machine's noise, min-max shows it."""
    return {"median": float(statistics.median(values)), "min": float(min(values)), "max": float(max(values)),
            "n": len(values)}


# ----------------------------------------------------------------------------------- memory
def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


class PeakRSS:
    """Resident-set high-water mark over a region of the run."""

    def __init__(self) -> None:
        self.reset_ok = False
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")  # Linux: reset VmHWM to the current RSS
            self.reset_ok = _status_kib("VmHWM") is not None
        except OSError:
            pass
        self.start_kib = _status_kib("VmRSS") or 0

    def peak_mib(self) -> float:
        kib = _status_kib("VmHWM") if self.reset_ok else None
        if kib is None:
            kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return kib / 1024


def _device_mib(backends: Sequence[Any]) -> float | None:
    """Bytes held by CuPy's memory pool (it keeps what the run needed at most), when CuPy ran."""
    if not any(getattr(b, "device", "cpu") != "cpu" for b in backends):
        return None
    try:
        import cupy

        return cupy.get_default_memory_pool().total_bytes() / 2**20
    except Exception:  # noqa: BLE001 — a non-CuPy device backend: not measured
        return None


# ------------------------------------------------------------------------------------ runners
class _MinitxRunner:
    """A model on a backend list, behind the interface the timing loop uses (torchref's)."""

    def __init__(self, model, backends: Sequence[str]) -> None:
        from . import generate

        self.gen = generate
        self.model = model
        self.backends = list(backends)
        self.is_decoder = model.is_decoder
        self.seq2seq = seq2seq.is_encoder_decoder(model)
        ex = model.executor(self.backends)
        self.objs = ex.backends
        self.placement = {b: sum(1 for _, _, x in ex.explain() if x == b) for b in {x for _, _, x in ex.explain()}}

    def sync(self) -> None:
        for b in self.objs:
            b.synchronize()

    def prefill(self, ids: np.ndarray):
        st = self.gen.empty_state(self.model, ids.shape[0])
        return self.gen.step(self.model, ids, st, None, self.backends)

    def step(self, ids: np.ndarray, state):
        if self.seq2seq:   # state: (self-attention cache, cross-attention K/V, source mask)
            past, cross, mask = state
            logits, past = seq2seq.decode_step(self.model, ids, past, cross, mask, self.backends)
            return logits, (past, cross, mask)
        return self.gen.step(self.model, ids, state, None, self.backends)

    def encode(self, ids: np.ndarray):
        """Encoders: the embeddings. Encoder–decoders: the decoder's starting state (an empty
        cache, the cross-attention K/V, the source mask)."""
        if self.seq2seq:
            cross, mask = seq2seq.encode(self.model, ids.tolist(), self.backends)
            return {}, cross, mask
        fed = feeds.build(self.model.graph, ids)   # unpadded rows: every token real, positions 0…T-1
        return self.model.executor(self.backends).run(fed, outputs=["embedding"])["embedding"]

    def start(self, batch: int) -> np.ndarray:
        """An encoder–decoder's first decoder input: its start token per row."""
        return np.full(batch, int(self.model.config["decoder_start_token_id"]), np.int64)


class _TorchRunner:
    def __init__(self, ref) -> None:
        self.ref = ref
        self.is_decoder = ref.is_decoder
        self.objs: list[Any] = []

    def sync(self) -> None:
        pass

    def prefill(self, ids):
        return self.ref.prefill(ids)

    def step(self, ids, state):
        return self.ref.step(ids, state)

    def encode(self, ids):
        return self.ref.encode(ids)


def _timed(fn: Callable[[], Any], sync: Callable[[], None]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


def _decode(runner, state, first: np.ndarray, n: int) -> np.ndarray | None:
    """``n`` greedy steps from ``first``; the first step's logits (an encoder–decoder's output
    that accuracy compares)."""
    nxt, out = first, None
    for _ in range(n):
        logits, state = runner.step(nxt[:, None], state)
        out = logits if out is None else out
        nxt = logits[:, -1].argmax(-1)
    return out


def phases(is_decoder: bool) -> int:
    """Progress units one configuration takes (for a progress bar's length)."""
    return 4 if is_decoder else 2


class _Job:
    """One configuration in the interleaved measurement: its runner, its samples so far, its peak
    memory over the slices it ran in, and how much progress it has reported."""

    def __init__(self, row: "Row", runner, model, progress: Progress) -> None:
        self.row, self.runner, self.model, self.progress = row, runner, model, progress
        self.samples: dict[str, list[float]] = {}
        self.out_big: np.ndarray | None = None
        self.done = 0
        self.peak_mib = self.delta_mib = 0.0
        self.reset_ok = True

    def once(self, inputs: dict[int, np.ndarray], s: Settings, timed: bool) -> None:
        """Every measurement once (prefill, then decode from that prefill's cache, per batch)."""
        mem = PeakRSS()
        big = max(inputs)
        r = self.runner
        for B, ids in inputs.items():
            key = "b1" if B == 1 else "batch"
            if getattr(r, "seq2seq", False):
                de, state = _timed(lambda: r.encode(ids), r.sync)
                dd, logits = _timed(lambda: _decode(r, state, r.start(B), s.new_tokens), r.sync)
                if timed:
                    self.samples.setdefault(f"encode_ms_{key}", []).append(de * 1e3)
                    self.samples.setdefault(f"decode_tok_s_{key}", []).append(B * s.new_tokens / dd)
            elif r.is_decoder:
                dt, (logits, state) = _timed(lambda: r.prefill(ids), r.sync)
                first = logits[:, -1].argmax(-1)
                dd, _ = _timed(lambda: _decode(r, state, first, s.new_tokens), r.sync)
                if timed:
                    self.samples.setdefault(f"prefill_ms_{key}", []).append(dt * 1e3)
                    self.samples.setdefault(f"decode_tok_s_{key}", []).append(B * s.new_tokens / dd)
            else:
                dt, logits = _timed(lambda: r.encode(ids), r.sync)
                if timed:
                    self.samples.setdefault(f"prefill_ms_{key}", []).append(dt * 1e3)
                    self.samples.setdefault(f"sent_s_{key}", []).append(B / dt)
            if B == big:
                self.out_big = logits
        self.peak_mib = max(self.peak_mib, mem.peak_mib())
        self.delta_mib = max(self.delta_mib, mem.peak_mib() - mem.start_kib / 1024 if mem.start_kib else 0.0)
        self.reset_ok = self.reset_ok and mem.reset_ok

    def report(self, units: int) -> None:
        """Bring the reported progress of this configuration up to ``units``."""
        if units > self.done:
            self.progress(units - self.done, f"{self.row.config}: measuring")
            self.done = units

    def finish(self) -> None:
        self.row.timings = {k: stat(v) for k, v in self.samples.items()}
        self.row.peak_rss_mib = self.peak_mib
        self.row.peak_rss_delta_mib = max(self.delta_mib, 0.0)
        self.row.peak_rss_reset = self.reset_ok


def _interleaved(jobs: list[_Job], inputs: dict[int, np.ndarray], s: Settings, on_error: Callable[[_Job, BaseException], None]) -> None:
    """Warm every configuration up, then run ``repeat`` rounds, each measuring every configuration
    once in turn: a change of load on a shared machine then hits all of them alike, instead of
    whichever happened to run during it. A configuration that fails leaves the rounds."""
    live = list(jobs)
    for rnd in range(-s.warmup, s.repeat):
        for job in list(live):
            try:
                job.once(inputs, s, timed=rnd >= 0)
            except Exception as e:  # noqa: BLE001 — a kernel failing is that row's result
                live.remove(job)
                on_error(job, e)
                continue
            if rnd >= 0:
                job.report(phases(job.runner.is_decoder) * (rnd + 1) // s.repeat)


# ------------------------------------------------------------------------------------ accuracy
def accuracy(ref: np.ndarray, out: np.ndarray, logits: bool) -> dict[str, Any]:
    """max abs / rel error, cosine and top-1 agreement of ``out`` against the spec's ``ref``."""
    try:
        from .metrics import compare

        c = compare(ref, out, logits=logits)
        return {"max_abs": c.max_abs, "max_rel": c.max_rel, "cosine": c.cosine, "top1": c.top1}
    except ImportError:  # metrics not there: the same definitions, inline
        r, o = ref.astype(np.float64), out.astype(np.float64)
        err = float(np.abs(o - r).max())
        scale = float(np.abs(r).max()) or 1.0
        cos = float(r.ravel() @ o.ravel() / (np.linalg.norm(r) * np.linalg.norm(o) or 1.0))
        top1 = float((r.reshape(-1, r.shape[-1]).argmax(-1) == o.reshape(-1, o.shape[-1]).argmax(-1)).mean()) if logits else None
        return {"max_abs": err, "max_rel": err / scale, "cosine": cos, "top1": top1}


# ------------------------------------------------------------------------------------ the run
@dataclass
class Row:
    config: str
    engine: str                 # "minitx" or "torch"
    backend: str
    plugins: list[str]
    status: str = "ok"
    timings: dict[str, Any] = field(default_factory=dict)
    peak_rss_mib: float | None = None
    peak_rss_delta_mib: float | None = None   # above the RSS when the configuration started
    peak_rss_reset: bool = False
    device_mib: float | None = None
    model_bytes: int | None = None
    cache_bytes: dict[str, int] | None = None   # batch 1 after the run's tokens (minitx.cachebytes)
    accuracy: dict[str, Any] | None = None
    vs_torch: dict[str, float] | None = None
    placement: dict[str, int] | None = None
    roofline: dict[str, float] | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def parse_plugin_set(text: str) -> list[str]:
    """``quant:int8+recompute`` → ["quant:int8", "recompute"]; "none" (or "") is the baseline."""
    parts = [p.strip() for p in text.split("+") if p.strip()]
    return [] if parts in ([], ["none"]) else parts


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return msg if isinstance(e, MinitxError) else f"{type(e).__name__}: {msg}"


ROOFLINE = ("roofline: host read bandwidth {bw:.1f} GB/s (best of 5 passes, one thread per core) / weight bytes one "
            "decode step reads (packed bytes for quantized models; embedding tables read by row gathers count one "
            "row) = the batch-1 tok/s memory allows; 'b=1 of roofline' is the share of it reached. Not shown for "
            "GPU rows (their bound is the device's).")
GATHERS = frozenset({"embedding", "embedding_q8", "embedding_q4"})


def weight_bytes_per_token(model) -> int:
    """Bytes of parameters one decode step reads: all of them, except that a table read only by
    row gathers (token and position embeddings; not a tied LM head, which reads all of it)
    counts one row per token."""
    readers: dict[str, set[str]] = {}
    for n in model.graph.nodes:
        for i in n.inputs:
            if i in model.params:
                readers.setdefault(i, set()).add(n.op)
    total = 0
    for name, a in model.params.items():
        gathered = readers.get(name) and readers[name] <= GATHERS and a.ndim >= 1 and a.shape[0]
        total += a.nbytes // a.shape[0] if gathered else a.nbytes
    return int(total)


def roofline(row: Row, bytes_per_token: int, bandwidth: float) -> dict[str, float] | None:
    """Batch-1 decode against what memory allows: ``bandwidth / bytes_per_token`` tokens/s."""
    t = row.timings.get("decode_tok_s_b1") if row.ok else None
    if not t or not bytes_per_token:
        return None
    bound = bandwidth / bytes_per_token
    return {"bytes_per_token": bytes_per_token, "tok_s": bound, "fraction_b1": t["median"] / bound}


def run(model_path: str, backends: Sequence[str] = ("numpy",), plugin_sets: Sequence[Sequence[str]] = ((),),
        vs_torch: bool = False, settings: Settings | None = None, torch_from: str | None = None,
        progress: Progress | None = None, model=None) -> dict[str, Any]:
    """Benchmark ``model_path`` over backends × plugin sets; returns the JSON-able result.

    A model that cannot be loaded is an error (nothing could run); every other failure is kept in
    its row's ``status``. ``model`` may pass an already-loaded Model (tests).
    """
    from . import modelfile

    s = settings or Settings()
    s.check()
    progress = progress or (lambda n, label: None)
    m0 = model if model is not None else modelfile.load(model_path)
    s2s = seq2seq.is_encoder_decoder(m0)
    if s2s and max(s.prompt_len, s.new_tokens) > m0.n_ctx:
        raise MinitxError(f"--seq {s.prompt_len} or --max-new-tokens {s.new_tokens} exceeds the model's "
                          f"context of {m0.n_ctx}")
    if m0.is_decoder and not s2s and s.prompt_len + s.new_tokens > m0.n_ctx:
        raise MinitxError(f"--seq {s.prompt_len} + --max-new-tokens {s.new_tokens} exceeds the model's "
                          f"context of {m0.n_ctx}")
    if not m0.is_decoder and s.prompt_len > m0.n_ctx:
        raise MinitxError(f"--seq {s.prompt_len} exceeds the model's context of {m0.n_ctx}")
    threads = s.threads or thread_budget()
    rng = np.random.default_rng(s.seed)
    big = max(s.batch, 2)
    ids_big = rng.integers(0, m0.vocab_size, size=(big, s.prompt_len), dtype=np.int64)
    inputs = {1: ids_big[:1].copy(), big: ids_big}

    # The reference every row is scored against: the spec, no plugin, on the same inputs.
    spec = _MinitxRunner(m0, ["numpy"])
    if s2s:   # the first decoder step after the source: it reads every encoder and decoder weight
        ref = spec.step(spec.start(big)[:, None], spec.encode(ids_big))[0]
    else:
        ref = spec.prefill(ids_big)[0] if m0.is_decoder else spec.encode(ids_big)
    progress(1, "spec reference")
    # The roofline counts the weights one decoder step reads; an encoder–decoder's step reads only
    # the decoder's, which weight_bytes_per_token does not tell apart: no roofline for them.
    bandwidth = machine.read_bandwidth() if m0.is_decoder and not s2s else None

    rows: list[Row] = []
    jobs: list[_Job] = []
    per = phases(m0.is_decoder)

    def failed(row: Row, e: BaseException, done: int = 0) -> None:
        row.status = f"error: {_short(e)}"
        row.timings = {}
        progress(per - done + 1, f"{row.config}: failed")

    backend_lists = [[x.strip() for x in b.split(",") if x.strip()] for b in backends] or [["numpy"]]
    sets = [list(p) for p in plugin_sets] or [[]]
    for plugins in sets:
        model, perr = m0, None
        if plugins:
            try:
                from .plugin import optimize

                model = optimize(m0, plugins, warn=lambda msg: None)
            except Exception as e:  # noqa: BLE001 — a failing plugin is that row's result
                perr = _short(e)
        for bl in backend_lists:
            name = ",".join(bl) + ("" if not plugins else " + " + "+".join(plugins))
            row = Row(name, "minitx", ",".join(bl), list(plugins))
            rows.append(row)
            if perr:
                row.status = f"plugin failed: {perr}"
                progress(per + 1, f"{name}: {row.status}")
                continue
            row.model_bytes = int(model.nbytes())
            if model.is_decoder:
                from .cachebytes import cache_bytes

                row.cache_bytes = cache_bytes(model.graph, 1, s.new_tokens if s2s else s.prompt_len + s.new_tokens,
                                              s.prompt_len if s2s else 0)
            try:
                runner = _MinitxRunner(model, bl)
            except Exception as e:  # noqa: BLE001 — unknown backend, no GPU
                failed(row, e)
                continue
            row.placement = runner.placement
            jobs.append(_Job(row, runner, model, progress))

    torch_row = None
    if vs_torch:
        torch_row = Row("torch", "torch", "torch", [])
        rows.append(torch_row)
        try:
            from . import torchref

            torchref.set_threads(threads)
            ref_model = torchref.build(m0, torch_from)
            torch_row.backend = ref_model.name
            torch_row.config = "torch+transformers" if "transformers" in ref_model.name else "torch"
            torch_row.model_bytes = int(m0.nbytes())
            jobs.append(_Job(torch_row, _TorchRunner(ref_model), m0, progress))
        except Exception as e:  # noqa: BLE001
            failed(torch_row, e)

    _interleaved(jobs, inputs, s, lambda job, e: failed(job.row, e, job.done))
    for job in jobs:
        row = job.row
        if not row.ok:
            continue
        job.finish()
        row.accuracy = accuracy(ref, job.out_big, m0.is_decoder)
        row.device_mib = _device_mib(job.runner.objs)
        if bandwidth and all(b.device == "cpu" for b in job.runner.objs):  # a GPU's bound is its own
            row.roofline = roofline(row, weight_bytes_per_token(job.model), bandwidth)
        job.report(per)
        progress(1, f"{row.config}: done")
    if torch_row is not None and torch_row.ok:
        for r in rows:
            if r.engine == "minitx" and r.ok:
                r.vs_torch = ratios(r.timings, torch_row.timings)

    return {
        "schema": SCHEMA,
        "model": {"path": os.path.basename(str(model_path)), "arch": m0.config["arch"], "decoder": m0.is_decoder,
                  "encoder_decoder": s2s,
                  "params": m0.n_params(), "bytes": m0.nbytes(), "source": m0.meta.get("source", ""),
                  "config": {k: m0.config[k] for k in ("d_model", "n_layers", "n_heads", "vocab_size", "n_ctx")
                             if k in m0.config}},
        "settings": {**asdict(s), "batch": big, "threads": threads},
        "reference": "minitx spec (numpy backend, no plugin), same inputs",
        "read_bandwidth_Bps": bandwidth,
        "machine": machine.info(),
        "rows": [asdict(r) for r in rows],
    }


def ratios(mine: dict[str, Any], torch: dict[str, Any]) -> dict[str, float]:
    """Speed of minitx relative to torch per metric, as a speed-up (> 1: minitx is faster)."""
    out = {}
    for k, v in mine.items():
        if k not in torch:
            continue
        a, b = v["median"], torch[k]["median"]
        if a > 0 and b > 0:
            out[k] = (b / a) if "_ms_" in k else (a / b)
    return out


def steps_total(n_backends: int, n_sets: int, vs_torch: bool, is_decoder: bool) -> int:
    """Progress units :func:`run` reports in all."""
    per = phases(is_decoder) + 1
    return 1 + per * (n_backends * n_sets + (1 if vs_torch else 0))


# ------------------------------------------------------------------------------------ output
def _fmt_stat(x: dict[str, float] | None, digits: int = 1) -> str:
    if not x:
        return "-"
    return f"{x['median']:.{digits}f} ({x['min']:.{digits}f}–{x['max']:.{digits}f})"


def _fmt_num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _columns(res: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    dec = res["model"]["decoder"]
    first = "encode" if res["model"].get("encoder_decoder") else "prefill"   # the once-per-input phase
    B = res["settings"]["batch"]
    vs = any(r["engine"] == "torch" for r in res["rows"])
    head = ["configuration", "status", f"{first} b=1 ms", f"{first} b={B} ms"]
    head += ["decode b=1 tok/s", "b=1 of roofline", f"decode b={B} tok/s"] if dec else ["b=1 sent/s", f"b={B} sent/s"]
    head += ["peak RSS MiB (+Δ)", "model MiB"] + (["cache KiB b=1"] if dec else []) + ["max abs err", "max rel err", "cosine"] + (["top-1"] if dec else [])
    if vs:
        head += [f"vs torch {first}", "vs torch " + ("decode" if dec else "sent/s")]
    body = []
    for r in res["rows"]:
        t, a = r["timings"], r["accuracy"] or {}
        row = [r["config"], r["status"], _fmt_stat(t.get(f"{first}_ms_b1")), _fmt_stat(t.get(f"{first}_ms_batch"))]
        k = "decode_tok_s" if dec else "sent_s"
        row.append(_fmt_stat(t.get(f"{k}_b1")))
        if dec:
            rl = r.get("roofline")
            row.append(f"{rl['fraction_b1']:.0%} of {rl['tok_s']:.1f}" if rl else "-")
        row.append(_fmt_stat(t.get(f"{k}_batch")))
        dev = f" (+{r['device_mib']:.0f} dev)" if r.get("device_mib") else ""
        rss = "-" if r["status"] != "ok" or r["peak_rss_mib"] is None else f"{r['peak_rss_mib']:.0f}"
        if rss != "-" and r.get("peak_rss_delta_mib") is not None:
            rss += f" (+{r['peak_rss_delta_mib']:.0f})"
        row += [rss + dev,
                _fmt_num(None if r["model_bytes"] is None else r["model_bytes"] / 2**20, ".1f")]
        if dec:
            cb = r.get("cache_bytes")
            row.append("-" if not cb else f"{(cb['self'] + cb['cross']) / 1024:.1f}")
        row += [_fmt_num(a.get("max_abs"), ".2e"), _fmt_num(a.get("max_rel"), ".2e"), _fmt_num(a.get("cosine"), ".6f")]
        if dec:
            row.append(_fmt_num(a.get("top1"), ".3f"))
        if vs:
            v = r.get("vs_torch") or {}
            row += [_fmt_num(v.get(f"{first}_ms_b1"), ".2f") + "x" if v.get(f"{first}_ms_b1") else "-",
                    _fmt_num(v.get(f"{k}_b1"), ".2f") + "x" if v.get(f"{k}_b1") else "-"]
        body.append(row)
    return head, body


def table(res: dict[str, Any]) -> str:
    """The terminal table: one row per configuration, median (min–max) of each timing."""
    head, body = _columns(res)
    # Long statuses go below the table so the columns stay readable.
    notes = []
    for k, row in enumerate(body):
        if row[1] != "ok":
            notes.append(f"[{k + 1}] {row[0]}: {row[1]}")
            row[1] = f"see [{k + 1}]"
    w = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w[i]) for i, h in enumerate(head)),
             "  ".join("-" * w[i] for i in range(len(head)))]
    lines += ["  ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in body]
    s = res["settings"]
    m = res["model"]
    cap = (f"{m['path']}: {m['arch']}, {m['params']:,} parameters; {'source' if m.get('encoder_decoder') else 'prompt'} {s['prompt_len']} tokens"
           + (f", {s['new_tokens']} new tokens" if m["decoder"] else "")
           + f"; {s['warmup']} warm-up + {s['repeat']} runs, median (min–max); {s['threads']} thread(s)")
    out = [cap, *lines]
    if notes:
        out += ["", *notes]
    if any(r.get("roofline") for r in res["rows"]):
        out += ["", ROOFLINE.format(bw=res["read_bandwidth_Bps"] / 1e9)]
    out += ["", "machine: " + machine.summary(res["machine"]),
            "accuracy: against " + res["reference"] + ("; vs torch = speed-up over torch (>1: minitx faster)"
                                                      if any(r["engine"] == "torch" for r in res["rows"]) else "")]
    return "\n".join(out)


def markdown(res: dict[str, Any], title: str | None = None, notes: Sequence[str] = ()) -> str:
    """The same table as Markdown, with the date, machine and settings (benchmarks/results/)."""
    head, body = _columns(res)
    m, s, mach = res["model"], res["settings"], res["machine"]
    out = [f"### {title or m['path']}", "",
           f"- date: {mach['date']}",
           f"- machine: {machine.summary(mach)}",
           f"- model: `{m['path']}` — {m['arch']}, {m['params']:,} parameters ({m['bytes'] / 2**20:.1f} MiB)"
           + (f"; {m['source']}" if m.get("source") else ""),
           f"- inputs: random token ids (seed {s['seed']}), {'source' if m.get('encoder_decoder') else 'prompt'} {s['prompt_len']} tokens"
           + (f", {s['new_tokens']} greedy new tokens" if m["decoder"] else "")
           + f", batch 1 and {s['batch']}; {s['warmup']} warm-up + {s['repeat']} timed runs, "
             f"median (min–max); {s['threads']} thread(s) for BLAS and torch",
           f"- accuracy against: {res['reference']}",
           *([f"- {ROOFLINE.format(bw=res['read_bandwidth_Bps'] / 1e9)}"]
             if any(r.get("roofline") for r in res["rows"]) else []),
           "- peak RSS: the process's resident-set high-water mark while that configuration ran (reset before each "
           "of its turns); it includes what the process already held (the loaded model, imported libraries); "
           "+Δ is the growth above the RSS at the configuration's start",
           *(["- cache KiB b=1: what the KV caches hold at batch 1 after the run's tokens (self-attention, plus "
              "the cross-attention K/V of an encoder–decoder; an int8 cache with its scales)"] if m["decoder"] else []),
           *[f"- {n}" for n in notes], "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in body]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------ plot
def plot(res: dict[str, Any], path: str) -> None:
    """Speed against error (one labelled point per configuration), plus memory and size bars;
    written to a temporary file and renamed, so ``path`` is never half-written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MinitxError("--plot needs matplotlib: pip install 'minitx[plot]'") from None
    from matplotlib.backend_bases import FigureCanvasBase

    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise MinitxError(f"--plot {path}: folder {d} does not exist")
    ext = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    if ext not in FigureCanvasBase.get_supported_filetypes():
        raise MinitxError(f"--plot {path}: unsupported image type {ext!r} (use .png, .svg or .pdf)")
    rows = [r for r in res["rows"] if r["status"] == "ok"]
    if not rows:
        raise MinitxError("--plot: no configuration ran, nothing to plot")
    dec = res["model"]["decoder"]
    key = "decode_tok_s_b1" if dec else "sent_s_batch"
    unit = "decode tokens/s (batch 1)" if dec else f"sentences/s (batch {res['settings']['batch']})"
    fig, axes = plt.subplots(1, 3, figsize=(16, 5), gridspec_kw={"width_ratios": [1.6, 1, 1]})
    ax = axes[0]
    floor = 1e-9
    for r in rows:
        t = r["timings"].get(key)
        err = max((r["accuracy"] or {}).get("max_rel") or 0.0, floor)
        if not t:
            continue
        ax.errorbar([err], [t["median"]], yerr=[[t["median"] - t["min"]], [t["max"] - t["median"]]],
                    fmt="o" if r["engine"] == "minitx" else "s", capsize=3)
        ax.annotate(r["config"], (err, t["median"]), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(f"max relative error vs spec (log; exact = {floor:g})")
    ax.set_ylabel(unit + ", median, min–max")
    ax.set_title("speed vs error")
    ax.grid(True, alpha=0.3)
    labels = [r["config"] for r in rows]
    y = np.arange(len(rows))
    axes[1].barh(y, [r["peak_rss_mib"] or 0 for r in rows], color="tab:orange")
    axes[1].set_title("peak RSS (MiB)")
    axes[2].barh(y, [(r["model_bytes"] or 0) / 2**20 for r in rows], color="tab:green")
    axes[2].set_title("model size (MiB)")
    for a in axes[1:]:
        a.set_yticks(y)
        a.set_yticklabels(labels, fontsize=8)
        a.invert_yaxis()
        a.grid(True, axis="x", alpha=0.3)
    axes[2].set_yticklabels([])
    fig.suptitle(f"minitx bench: {res['model']['path']} ({res['model']['arch']}) — {machine.summary(res['machine'])}",
                 fontsize=8)
    fig.tight_layout()
    try:
        with atomic_write(path) as f:
            fig.savefig(f, format=ext, dpi=110)
    finally:
        plt.close(fig)


def write_text_atomic(path: str, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text.encode("utf-8"))


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: minitx bench MODEL (python cli.py bench …)")
