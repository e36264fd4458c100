"""Training a decoder on a text: the loop, evaluation, and checkpoints that resume bit for bit.

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` random windows, their
gradients averaged, clipped to a global norm, then an AdamW update at the scheduled rate. All
randomness (initial weights, window offsets, dropout) derives from ``seed``; the data generator's
state is saved in each checkpoint, so an interrupted run resumed from its last checkpoint
continues exactly as if it had never stopped.

``precision`` float16 or bfloat16 runs the forward and backward passes in that precision while
the weights and AdamW's moments stay float32, with dynamic loss scaling: a step whose gradients
overflow is skipped and the scale lowered (minitx/precision.py; a skipped step still counts
towards ``steps``, as the schedule moves on). The scale and the count of skipped steps are part
of the history, the progress line and the checkpoint.

A checkpoint is one ``.npz`` (written atomically, read with ``allow_pickle=False``):
``__train__`` (JSON: step, settings, RNG state, history), ``__config__``, ``__tokenizer__``,
``param.NAME``, ``opt.m.NAME`` and ``opt.v.NAME``; mixed-precision runs add ``scaler`` (the loss
scaler's state) to ``__train__``. The same file serves ``minitx distill`` and ``minitx qat``:
``__train__`` names the command that wrote it (``kind``) and what identifies its run beyond the
settings (``run``: the text's fingerprint, the teacher's, the loss weights, the plugin…), which a
resume must repeat (:func:`check_run`); trainable arrays that are not the model's (distillation's
feature projections) travel as ``aux.NAME`` with their AdamW moments ``aux_opt.m/v.NAME``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from . import data, models
from .errors import MinitxError
from .executor import Executor
from .model import Model
from .modelfile import NpzReader, write_npz_atomic
from .optim import AdamW, clip_global_norm, lr_at
from .precision import LossScaler, Precision, check_precision

CKPT_FORMAT = "minitx-checkpoint/1"


@dataclass
class TrainSettings:
    steps: int = 200
    batch_size: int = 8
    seq_len: int = 0            # 0 = the model's context length
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip: float = 1.0           # global gradient norm; 0 = off
    eval_every: int = 50        # 0 = only at the end
    eval_batches: int = 4
    checkpoint_every: int = 100  # 0 = only at the end
    val_fraction: float = 0.05
    seed: int = 0
    precision: str = "float32"  # compute precision: float32, float16 or bfloat16 (weights stay float32)
    loss_scale: float = 2.0 ** 15           # initial loss scale (float16/bfloat16 only)
    loss_scale_growth_interval: int = 200   # good steps in a row before the scale doubles
    loss_scale_backoff: float = 0.5         # factor applied to the scale on overflow
    plugins: tuple[str, ...] = ()           # exact graph rewrites for training, e.g. "recompute:sqrt"

    def check(self) -> None:
        for k in ("steps", "batch_size", "grad_accum", "eval_batches"):
            if getattr(self, k) <= 0:
                raise MinitxError(f"--{k.replace('_', '-')} must be a positive integer, got {getattr(self, k)}")
        for k in ("seq_len", "warmup", "eval_every", "checkpoint_every"):
            if getattr(self, k) < 0:
                raise MinitxError(f"--{k.replace('_', '-')} must be >= 0, got {getattr(self, k)}")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise MinitxError(f"need 0 < lr and 0 <= min-lr <= lr, got lr={self.lr}, min-lr={self.min_lr}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise MinitxError("betas must be in [0, 1)")
        check_precision(self.precision)
        if not (math.isfinite(self.loss_scale) and self.loss_scale > 0):
            raise MinitxError(f"--loss-scale must be a positive number, got {self.loss_scale}")
        if self.loss_scale_growth_interval <= 0:
            raise MinitxError("--loss-scale-growth-interval must be a positive integer, "
                              f"got {self.loss_scale_growth_interval}")
        if not 0 < self.loss_scale_backoff < 1:
            raise MinitxError(f"--loss-scale-backoff must be in (0, 1), got {self.loss_scale_backoff}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainSettings":
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "plugins" in kw:  # a JSON list in a checkpoint
            kw["plugins"] = tuple(kw["plugins"])
        return cls(**kw)


@dataclass
class TrainState:
    model: Model
    opt: AdamW
    rng: np.random.Generator
    settings: TrainSettings
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    scaler: LossScaler | None = None  # mixed precision only; made by train() when missing
    kind: str = "train"               # the command whose run this is: train, distill or qat
    run: dict[str, Any] = field(default_factory=dict)   # what a resume must repeat (check_run)
    aux: dict[str, np.ndarray] = field(default_factory=dict)  # trainables outside the model
    aux_opt: AdamW | None = None      # their optimizer
    source: str | None = None         # the checkpoint this state was loaded from


# ------------------------------------------------------------------------------------ batches
def _feeds(config: dict[str, Any], x: np.ndarray, y: np.ndarray | None, dtype, graph=None) -> dict[str, np.ndarray]:
    """Inputs of one batch of windows, with empty KV caches — as wide as ``graph`` declares them
    when given (a rewrite such as head pruning narrows some layers' caches)."""
    B, T = x.shape
    kv = (config.get("n_kv_heads") or config["n_heads"]) * config["d_model"] // config["n_heads"]
    feeds = {"input_ids": x, "position_ids": np.broadcast_to(np.arange(T, dtype=np.int64), (B, T)),
             "attention_mask": np.ones((B, T), np.int64)}
    for i in range(config["n_layers"]):
        feeds[f"past.{i}.k"] = feeds[f"past.{i}.v"] = np.zeros((B, 0, kv), dtype)
    for v in graph.inputs if graph is not None else ():
        if v.name.startswith("past."):
            feeds[v.name] = np.zeros((B, 0, v.shape[-1]), dtype)
    if y is not None:
        feeds["targets"] = y
    return feeds


def _loss_executor(model: Model, backends: Sequence[str], strict: bool = False,
                   precision: str = "float32") -> Executor:
    """The model's graph with its loss, computing in ``precision`` (float16 / emulated bfloat16
    copies of the weights, as ``train --precision`` computes; see minitx/precision.py)."""
    if not model.is_decoder:
        raise MinitxError(f"training needs a decoder (gpt2 or llama), not {model.config['arch']}")
    prec = Precision(precision)
    return Executor(prec.graph(models.with_loss(model.graph)), prec.params(model.params), prec.backends(backends),
                    strict)


def training_graph(model: Model, plugins: Sequence[str] = ()):
    """The model's graph, rewritten by ``plugins`` for training (``--plugin recompute:…``).

    Only exact rewrites that keep every weight are accepted: training updates the model's own
    weights, and a rewrite that changed them (quantization, pruning, low rank) would train
    something else than the model being saved (for quantization-aware training: ``minitx qat``).
    """
    if not plugins:
        return model.graph
    from . import plugin

    for spec in plugin.plan(plugins):
        if not spec.plugin.exact:
            raise MinitxError(f"--plugin {spec.text}: training takes only exact rewrites such as recompute "
                              f"({spec.name} is approximate; for quantization-aware training use `minitx qat`)")
    rewritten = plugin.optimize(model, list(plugins), validate=False)
    if set(rewritten.params) != set(model.params):
        raise MinitxError(f"--plugin {', '.join(plugins)} changes the model's weights; training needs a rewrite "
                          "that only changes the graph")
    return rewritten.graph


def _dtype(model: Model):
    return next(iter(model.params.values())).dtype


# --------------------------------------------------------------------------------- evaluation
def window_nll(ex: Executor, model: Model, x: np.ndarray, y: np.ndarray) -> tuple[float, int]:
    """(summed negative log-likelihood, number of scored targets) for a batch of windows."""
    n = int((y != -100).sum())
    if n == 0:
        return 0.0, 0
    past = next((v for v in ex.graph.inputs if v.name.startswith("past.")), None)
    dtype = np.dtype(past.dtype) if past is not None else _dtype(model)   # the executor's compute dtype
    out = ex.run(_feeds(model.config, x, y, dtype, model.graph), outputs=["loss"])
    return float(out["loss"]) * n, n


def evaluate(model: Model, ids: np.ndarray, backends: Sequence[str] = ("numpy",), stride: int | None = None,
             strict: bool = False, progress: Callable[[int, int], None] | None = None,
             precision: str = "float32") -> dict[str, Any]:
    """Loss (mean NLL per token, nats) and perplexity of ``ids`` under ``model``, with sliding
    windows of the model's context length, computed in ``precision`` (float16 or bfloat16: what
    the model scores when it runs in that precision, as ``train --precision`` computes)."""
    check_precision(precision)
    if len(ids) < 2:
        raise MinitxError(f"the text has {len(ids)} token(s): at least 2 are needed to score a prediction")
    if ids.max() >= model.vocab_size:
        raise MinitxError(f"token id {int(ids.max())} is outside the model's vocabulary of {model.vocab_size}")
    ex = _loss_executor(model, backends, strict, precision)
    total, count = 0.0, 0
    windows = data.eval_windows(ids, model.n_ctx, stride)
    # In float16 the masked attention scores (dtype min) overflow harmlessly to -inf; a real
    # overflow shows as a non-finite loss, refused below.
    with np.errstate(over="ignore", invalid="ignore") if precision != "float32" else contextlib.nullcontext():
        for k, (x, y) in enumerate(windows):
            s, n = window_nll(ex, model, x[None], y[None])
            total, count = total + s, count + n
            if progress:
                progress(k + 1, len(windows))
    loss = total / count
    if precision != "float32" and not math.isfinite(loss):
        raise MinitxError(f"the loss is {loss} in {precision}: the model's activations overflow {precision} "
                          "(evaluate in float32)")
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count, "windows": len(windows),
            "precision": precision}


def _heldout_loss(ex: Executor, model: Model, val: np.ndarray, seq_len: int, n_batches: int, batch: int) -> float:
    """Mean loss over a fixed, evenly spaced set of held-out windows (the same ones every time)."""
    n_win = min(n_batches * batch, max((len(val) - 1) // seq_len, 1))
    L = min(seq_len, len(val) - 1)
    starts = np.linspace(0, len(val) - 1 - L, n_win).astype(np.int64)
    total, count = 0.0, 0
    for k in range(0, n_win, batch):
        s = starts[k: k + batch]
        x = np.stack([val[i: i + L] for i in s])
        y = np.stack([val[i + 1: i + L + 1] for i in s])
        t, n = window_nll(ex, model, x, y)
        total, count = total + t, count + n
    return total / max(count, 1)


# -------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: str | os.PathLike, st: TrainState) -> None:
    meta = {"format": CKPT_FORMAT, "kind": st.kind, "step": st.step, "settings": asdict(st.settings),
            "rng": st.rng.bit_generator.state, "history": st.history, "opt_t": st.opt.t, "run": st.run}
    if st.scaler is not None:
        meta["scaler"] = st.scaler.state()
    if st.aux:
        meta["aux_opt_t"] = st.aux_opt.t
    arrays: dict[str, np.ndarray] = {
        "__train__": _text(json.dumps(meta)),
        "__config__": _text(json.dumps(st.model.config, sort_keys=True)),
    }
    if st.model.tokenizer_json is not None:
        arrays["__tokenizer__"] = _text(st.model.tokenizer_json)
    arrays.update({f"param.{k}": a for k, a in st.model.params.items()})
    arrays.update(st.opt.state())
    if st.aux:
        arrays.update({f"aux.{k}": a for k, a in st.aux.items()})
        arrays.update({f"aux_{k}": a for k, a in st.aux_opt.state().items()})
    write_npz_atomic(path, arrays)


def load_checkpoint(path: str | os.PathLike, kind: str = "train") -> TrainState:
    """The state saved by :func:`save_checkpoint`; ``kind`` is the command resuming it (a
    distillation checkpoint holds a student and projections that ``minitx train`` cannot continue)."""
    r = NpzReader(path, what="checkpoint")
    try:
        if "__train__" not in r:
            raise MinitxError(f"{r.path}: not a minitx training checkpoint (no '__train__' key; "
                              "a model file holds no optimizer state to resume from)")
        meta = r.json("__train__")
        if meta.get("format") != CKPT_FORMAT:
            raise MinitxError(f"{r.path}: unsupported checkpoint format {meta.get('format')!r}")
        made_by = meta.get("kind", "train")
        if made_by != kind:
            raise MinitxError(f"{r.path}: a `minitx {made_by}` checkpoint; resume it with `minitx {made_by} --resume`, "
                              f"not `minitx {kind}`")
        try:
            config = models.complete_config(r.json("__config__"))
        except MinitxError as e:
            raise MinitxError(f"{r.path}: {e}") from None
        tok = r.text("__tokenizer__") if "__tokenizer__" in r else None
        graph = models.build_graph(config)
        params = {}
        for name, v in graph.params.items():
            a = r.array(f"param.{name}")
            if tuple(a.shape) != tuple(v.shape):
                raise MinitxError(f"{r.path}: key 'param.{name}' has shape {a.shape}, expected {tuple(v.shape)}")
            params[name] = np.array(a)
        settings = TrainSettings.from_dict(meta["settings"])
        opt = AdamW(params, (settings.beta1, settings.beta2), settings.eps, settings.weight_decay)
        opt.load_state(_moments(r, "opt.", params), int(meta["opt_t"]))
        aux = {k[4:]: np.array(r.array(k)) for k in r.keys if k.startswith("aux.")}
        aux_opt = None
        if aux:
            aux_opt = AdamW(aux, (settings.beta1, settings.beta2), settings.eps, settings.weight_decay)
            aux_opt.load_state(_moments(r, "aux_opt.", aux), int(meta.get("aux_opt_t", meta["opt_t"])))
        rng = np.random.Generator(np.random.PCG64())
        rng.bit_generator.state = meta["rng"]
    finally:
        r.close()
    model = Model(config, params, graph, tok, {})
    try:
        scaler = LossScaler.from_state(meta["scaler"]) if meta.get("scaler") else None
    except (KeyError, TypeError, ValueError) as e:
        raise MinitxError(f"{r.path}: the loss scaler's state in '__train__' is malformed ({e})") from None
    return TrainState(model, opt, rng, settings, int(meta["step"]), list(meta.get("history", [])), scaler,
                      made_by, dict(meta.get("run") or {}), aux, aux_opt, str(path))


def _moments(r: NpzReader, prefix: str, params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """AdamW's ``m``/``v`` arrays for ``params`` under ``prefix``, checked against their shapes."""
    out = {}
    for name, p in params.items():
        for which in ("m", "v"):
            key = f"{prefix}{which}.{name}"
            a = r.array(key)
            if a.shape != p.shape:
                raise MinitxError(f"{r.path}: key {key!r} has shape {a.shape}, expected {p.shape}")
            out[f"opt.{which}.{name}"] = a
    return out


def checkpoint_due(s: TrainSettings, step: int) -> bool:
    """Whether a checkpoint is written after ``step`` (every ``checkpoint_every`` steps and at the end)."""
    return bool(s.checkpoint_every and step % s.checkpoint_every == 0) or step == s.steps


def fingerprint(arrays: Mapping[str, Any]) -> str:
    """SHA-256 of named arrays and JSON values (name, dtype, shape, bytes): two runs on the same
    text, or from the same model, fingerprint alike however the files are named."""
    h = hashlib.sha256()
    for k in sorted(arrays):
        v = arrays[k]
        if isinstance(v, np.ndarray):
            a = np.ascontiguousarray(v)
            h.update(f"{k}:{a.dtype.str}:{a.shape};".encode())
            h.update(a.tobytes())
        else:
            h.update(f"{k}={json.dumps(v, sort_keys=True)};".encode())
    return h.hexdigest()


def data_identity(ids: np.ndarray) -> dict[str, Any]:
    """What a resume checks about the token stream: it must be the same text."""
    return {"what": f"{len(ids):,} tokens", "sha256": fingerprint({"ids": np.asarray(ids, np.int64)})}


def model_identity(model: Model, path: str | os.PathLike | None = None) -> dict[str, Any]:
    """What a resume checks about a model it reads (distillation's teacher, QAT's starting point):
    its config and weights, whatever file they come from."""
    what = os.path.basename(str(path)) if path else "the model"
    return {"what": what, "sha256": fingerprint({"__config__": model.config, **model.params})}


def check_run(st: TrainState, run: Mapping[str, Any]) -> None:
    """Record ``run`` (flag → value) on a fresh state; on a resumed one, require the same values.

    Values are JSON; a dict with ``sha256`` compares by that alone and shows its ``what``.
    A key the checkpoint does not have (an older one) is recorded, not compared."""
    for key, new in run.items():
        if key in st.run and _ident(st.run[key]) != _ident(new):
            where = st.source or "the resumed state"
            raise MinitxError(f"{where}: the checkpoint was made with {key} {_show(st.run[key])}, not {_show(new)} "
                              "(a resumed run must repeat its settings)")
    st.run.update(run)


def _ident(v: Any) -> Any:
    return v["sha256"] if isinstance(v, dict) and "sha256" in v else v


def _show(v: Any) -> str:
    if isinstance(v, dict) and "sha256" in v:
        return f"{v.get('what', '')} (sha256 {v['sha256'][:12]})".strip()
    return v if isinstance(v, str) else json.dumps(v)


def _text(s: str) -> np.ndarray:
    return np.frombuffer(s.encode("utf-8"), dtype=np.uint8)


# ---------------------------------------------------------------------------------- the loop
def new_state(config: dict[str, Any], tokenizer_json: str | None, settings: TrainSettings) -> TrainState:
    settings.check()
    model = Model.from_config(config, seed=settings.seed, tokenizer_json=tokenizer_json)
    if not model.is_decoder:
        raise MinitxError(f"training needs a decoder (gpt2 or llama), not {model.config['arch']}")
    opt = AdamW(model.params, (settings.beta1, settings.beta2), settings.eps, settings.weight_decay)
    # The data stream gets its own generator, seeded apart from the weights' initialisation.
    rng = np.random.Generator(np.random.PCG64([settings.seed, 1]))
    return TrainState(model, opt, rng, settings)


def train(st: TrainState, ids: np.ndarray, *, backends: Sequence[str] = ("numpy",),
          checkpoint: str | None = None, log: Callable[[str], None] | None = None,
          progress: Callable[[dict[str, float]], None] | None = None) -> TrainState:
    """Run ``st`` up to ``st.settings.steps`` optimizer steps on the token stream ``ids``."""
    s = st.settings
    s.check()
    model = st.model
    if not model.is_decoder:
        raise MinitxError(f"training needs a decoder (gpt2 or llama), not {model.config['arch']}")
    seq_len = s.seq_len or model.n_ctx
    if seq_len > model.n_ctx:
        raise MinitxError(f"--seq-len {seq_len} exceeds the model's context length {model.n_ctx}")
    if len(ids) and int(ids.max()) >= model.vocab_size:
        raise MinitxError(f"token id {int(ids.max())} is outside the model's vocabulary of {model.vocab_size} "
                          "(the tokenizer is larger than the config's vocab_size)")
    check_run(st, {"--data": data_identity(ids)})
    train_ids, val_ids = data.split(ids, s.val_fraction, seq_len)
    log = log or (lambda m: None)
    dtype = _dtype(model)
    prec = Precision(s.precision)
    if prec.mixed and st.scaler is None:
        st.scaler = LossScaler(s.loss_scale, s.loss_scale_growth_interval, s.loss_scale_backoff, prec.max_scale())
    scaler = st.scaler if prec.mixed else None
    loss_graph = prec.graph(models.with_loss(training_graph(model, s.plugins)))
    run_on = prec.backends(backends)
    t_last, tok_since = time.perf_counter(), 0
    while st.step < s.steps:
        # Mixed precision: fresh compute-precision copies of the float32 master weights each step.
        ex = Executor(loss_graph, prec.params(model.params), run_on)
        grads: dict[str, np.ndarray] = {}
        loss_sum, peak, overflow = 0.0, 0, False
        for _ in range(s.grad_accum):
            x, y = data.random_batch(train_ids, s.batch_size, seq_len, st.rng)
            if scaler is None:
                res = ex.forward_backward(_feeds(model.config, x, y, dtype, loss_graph), step=st.step)
                micro = res.grads
            else:
                with np.errstate(over="ignore", invalid="ignore"):  # overflow is expected: the scaler handles it
                    res = ex.forward_backward(_feeds(model.config, x, y, prec.dtype, loss_graph), step=st.step,
                                              loss_grad=scaler.scale)
                micro = scaler.unscale(res.grads)  # float32, summed in float32 across micro-batches
                overflow = overflow or not scaler.finite(micro)
            loss_sum += float(res.outputs["loss"])
            peak = max(peak, res.peak_activation_bytes)
            if not overflow:  # an overflowed step is skipped whole; its micro-batches still draw their data
                for k, g in micro.items():
                    grads[k] = g if k not in grads else grads[k] + g
        if s.grad_accum > 1:
            inv = np.asarray(1.0 / s.grad_accum, dtype)
            grads = {k: g * inv for k, g in grads.items()}
        loss = loss_sum / s.grad_accum
        if not math.isfinite(loss):
            hint = "lower --lr?" if scaler is None else f"lower --lr, or the forward pass overflows {s.precision}?"
            raise MinitxError(f"training diverged at step {st.step + 1}: loss is {loss} ({hint})")
        lr = lr_at(st.step, s.lr, s.warmup, s.steps, s.min_lr)
        if overflow:
            gnorm = math.inf  # skip the update: weights and optimizer state stay as they are
        else:
            gnorm = clip_global_norm(grads, s.clip)
            st.opt.step(model.params, grads, lr)
        if scaler is not None:
            scale_used = scaler.scale
            scaler.update(overflow)
        st.step += 1
        tok_since += s.grad_accum * s.batch_size * seq_len
        now = time.perf_counter()
        rec = {"step": st.step, "loss": loss, "lr": lr, "grad_norm": gnorm,
               "tokens_per_s": tok_since / max(now - t_last, 1e-9), "peak_activation_bytes": peak}
        if scaler is not None:
            rec.update(loss_scale=scale_used, skipped=overflow, skipped_total=scaler.skipped)
        t_last, tok_since = now, 0
        last = st.step == s.steps
        if len(val_ids) >= 2 and ((s.eval_every and st.step % s.eval_every == 0) or last):
            # Held out: the float32 master weights, i.e. the model that will be saved.
            vl = _heldout_loss(Executor(models.with_loss(model.graph), model.params, backends), model, val_ids,
                               seq_len, s.eval_batches, s.batch_size)
            rec.update(val_loss=vl, val_perplexity=math.exp(min(vl, 700.0)))
            keys = ("step", "loss", "val_loss", "val_perplexity")
            if scaler is not None:
                keys += ("loss_scale", "skipped_total")
            st.history.append({k: rec[k] for k in keys})
            log(f"step {st.step}: train loss {loss:.4f}, held-out loss {vl:.4f}, perplexity {rec['val_perplexity']:.2f}")
        if progress:
            progress(rec)
        if checkpoint and checkpoint_due(s, st.step):
            save_checkpoint(checkpoint, st)
    return st


# ---------------------------------------------------------------------------- progress line
class ProgressLine:
    """One status line on stderr, rewritten in place on a terminal, printed every N steps otherwise."""

    def __init__(self, total: int, every: int = 10, stream=None) -> None:
        self.total, self.every = total, every
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.t0 = time.perf_counter()

    def __call__(self, rec: dict[str, float]) -> None:
        step = int(rec["step"])
        width = 24
        done = int(width * step / self.total)
        bar = "#" * done + "-" * (width - done)
        el = time.perf_counter() - self.t0
        line = (f"[{bar}] {step}/{self.total} loss {rec['loss']:.4f} lr {rec['lr']:.2e} "
                f"{rec['tokens_per_s']:,.0f} tok/s {el:,.0f}s")
        if "loss_scale" in rec:
            line += f" scale {rec['loss_scale']:g} skipped {rec['skipped_total']}"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if step == self.total else ""))
            self.stream.flush()
        elif step % self.every == 0 or step == self.total:
            self.stream.write(line + "\n")
            self.stream.flush()

    def message(self, text: str) -> None:
        self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
        self.stream.flush()
