"""The training loop: one :func:`fit` for every objective.

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` random windows, their
gradients averaged, clipped to a global norm, then an AdamW update at the scheduled rate (linear
warm-up, cosine decay). All randomness (initial weights, window offsets, dropout) derives from
``seed``; the data generator's state is saved in each checkpoint, so an interrupted run resumed
from its last checkpoint continues exactly as if it had never stopped.

What is minimised is the :class:`Objective`'s: it turns the model's graph into a graph whose
output ``loss`` is the scalar to minimise (plain next-token cross-entropy, distillation's mix
of losses, the same cross-entropy through fake quantization), feeds any extra inputs of that
graph (a teacher's outputs), and names what a resume must repeat. Everything else — precision
and loss scaling, exact rewrites such as recompute (``settings.plugins``), accumulation,
clipping, the schedule, held-out evaluation, checkpoints, the peak-memory record, backends — is
here, once, and so works for every objective.

``precision`` float16 or bfloat16 runs the forward and backward passes in that precision while
the weights and AdamW's moments stay float32, with dynamic loss scaling: a step whose gradients
overflow is skipped and the scale lowered (minitx/precision.py; a skipped step still counts
towards ``steps``, as the schedule moves on).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from .. import data, feeds, models
from ..errors import MinitxError
from ..executor import Executor
from ..ir import Graph
from ..model import Model
from ..optim import clip_global_norm, lr_at
from ..precision import LossScaler, Precision
from . import checkpoint as ckpt
from .evaluation import evaluate
from .settings import TrainState

Record = dict[str, Any]


class Objective(Protocol):
    """What :func:`fit` minimises. ``kind`` is the command whose checkpoints it writes."""

    kind: str

    def prepare(self, st: TrainState, backends: Sequence[Any]) -> dict[str, Any]:
        """Check ``st`` can be trained this way, create any trainables outside the model in
        ``st.aux`` (fresh at step 0, else the checkpoint's), and return what a resume must
        repeat (flag → JSON value; see :func:`minitx.training.checkpoint.check_run`)."""

    def context(self, model: Model) -> int:
        """The longest window the objective can train on."""

    def loss_graph(self, graph: Graph) -> Graph:
        """The training graph over ``graph`` (the model's, rewritten by the run's plugins):
        outputs ``loss`` first, then any named terms (``loss.NAME``) to average and log."""

    def extra_feeds(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Inputs of the loss graph beyond the model's own, for the batch of windows ``x``."""

    # An objective whose data is not a token stream (training/pairs.py: pair indices) also has
    # check_data(ids) and held_out(model, ids, backends, batch) -> loss, used instead of the
    # token checks and the next-token evaluation.


@dataclass
class CrossEntropy:
    """Next-token cross-entropy on the true tokens: ``minitx train``, and ``minitx qat`` (whose
    model graph reads its weights through fake quantization; ``run`` names its starting model)."""

    kind: str = "train"
    run: dict[str, Any] = field(default_factory=dict)

    def prepare(self, st: TrainState, backends: Sequence[Any]) -> dict[str, Any]:
        return dict(self.run)

    def context(self, model: Model) -> int:
        return model.n_ctx

    def loss_graph(self, graph: Graph) -> Graph:
        return models.with_loss(graph)

    def extra_feeds(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return {}


def training_graph(model: Model, plugins: Sequence[str] = ()) -> Graph:
    """The model's graph, rewritten by ``plugins`` for training (``--plugin recompute:…``).

    Only exact rewrites that keep every weight are accepted: training updates the model's own
    weights, and a rewrite that changed them (quantization, pruning, low rank) would train
    something else than the model being saved (for quantization-aware training: ``minitx qat``).
    """
    if not plugins:
        return model.graph
    from .. import plugin

    for spec in plugin.plan(plugins):
        if not spec.plugin.exact:
            raise MinitxError(f"--plugin {spec.text}: training takes only exact rewrites such as recompute "
                              f"({spec.name} is approximate; for quantization-aware training use `minitx qat`)")
    rewritten = plugin.optimize(model, list(plugins), validate=False)
    if set(rewritten.params) != set(model.params):
        raise MinitxError(f"--plugin {', '.join(plugins)} changes the model's weights; training needs a rewrite "
                          "that only changes the graph")
    return rewritten.graph


def fit(st: TrainState, ids: np.ndarray, objective: Objective | None = None, *,
        backends: Sequence[Any] = ("numpy",), checkpoint: str | None = None,
        log: Callable[[str], None] | None = None,
        progress: Callable[[Record], None] | None = None, reducer: Any = None) -> TrainState:
    """Train ``st`` up to ``st.settings.steps`` optimizer steps on the token stream ``ids``,
    minimising ``objective`` (default: :class:`CrossEntropy`), writing ``checkpoint`` every
    ``checkpoint_every`` steps and at the end. ``progress`` gets each step's record.
    ``reducer`` splits each batch over data-parallel ranks and averages their gradients
    (minitx/distributed/data_parallel.py; default: one rank), updates the weights (sharding the
    optimizer state with ZeRO-1) and saves; only its writer logs and writes."""
    from ..distributed.data_parallel import LocalReducer

    objective = objective if objective is not None else CrossEntropy()
    red = reducer if reducer is not None else LocalReducer()
    s = st.settings
    s.check()
    if s.batch_size % red.world:
        raise MinitxError(f"--batch {s.batch_size} does not split into {red.world} data-parallel ranks")
    if not red.is_writer:
        log, progress = None, None
    model = st.model
    if not model.is_decoder and not getattr(objective, "trains_encoders", False):
        raise MinitxError(f"training needs a decoder (gpt2 or llama), not {model.config['arch']} "
                          "(an encoder trains on its embeddings: `minitx distill`/`qat` with a bert teacher)")
    if st.step and st.kind != objective.kind:
        raise MinitxError(f"{st.source or 'the state'}: a `minitx {st.kind}` run cannot be resumed by "
                          f"`minitx {objective.kind}`")
    if st.step > s.steps:
        raise MinitxError(f"{st.source or 'the state'}: the checkpoint is at step {st.step}, beyond --steps {s.steps}")
    st.kind = objective.kind
    context = objective.context(model)
    # An objective that reads whole items (training/embedding.py: a sentence per row) cuts them itself.
    seq_len = getattr(objective, "window", None) or s.seq_len or context
    if seq_len > context:
        raise MinitxError(f"--seq {seq_len} exceeds the context length {context}")
    ids = np.asarray(ids, np.int64)
    if hasattr(objective, "check_data"):
        objective.check_data(ids)
    elif len(ids) and (int(ids.max()) >= model.vocab_size or int(ids.min()) < 0):
        raise MinitxError(f"token id {int(ids.max())} is outside the model's vocabulary of {model.vocab_size} "
                          "(the tokenizer is larger than the config's vocab_size)")
    ckpt.check_run(st, {**objective.prepare(st, backends), "--data": ckpt.data_identity(ids)})
    train_ids, val_ids = data.split(ids, s.val_fraction, seq_len)
    log = log or (lambda m: None)
    prec = Precision(s.precision)
    if prec.mixed and st.scaler is None:
        st.scaler = LossScaler(s.loss_scale, s.loss_scale_growth_interval, s.loss_scale_backoff, prec.max_scale())
    scaler = st.scaler if prec.mixed else None
    graph = prec.graph(objective.loss_graph(training_graph(model, s.plugins)))
    terms = [o for o in graph.outputs if o.startswith("loss.")]
    run_on = prec.backends(backends)
    t_last = time.perf_counter()
    while st.step < s.steps:
        rec = _step(st, graph, objective, train_ids, seq_len, prec, scaler, run_on, terms, red)
        st.step += 1
        now = time.perf_counter()
        rec.update(step=st.step, tokens_per_s=s.grad_accum * s.batch_size * seq_len / max(now - t_last, 1e-9))
        t_last = now
        if len(val_ids) >= 2 and ((s.eval_every and st.step % s.eval_every == 0) or st.step == s.steps):
            # Held out: the float32 master weights, i.e. the model that will be saved.
            if hasattr(objective, "held_out"):
                got = objective.held_out(model, val_ids, backends, s.batch_size)
            else:
                got = evaluate(model, val_ids, seq_len=seq_len, count=s.eval_batches * s.batch_size,
                               batch=s.batch_size, backends=backends)["loss"]
            # A float is a loss per token (with its perplexity); a dict names its own measures.
            val = got if isinstance(got, dict) else {"val_loss": got, "val_perplexity": math.exp(min(got, 700.0))}
            rec.update(val)
            keys = ("step", "loss", *val) + (("loss_scale", "skipped_total") if scaler else ())
            st.history.append({k: rec[k] for k in keys})
            parts = ", ".join(f"{k[5:]} {rec[k]:.4f}" for k in terms)
            shown = (f", held-out loss {val['val_loss']:.4f}, perplexity {val['val_perplexity']:.2f}"
                     if "val_perplexity" in val else "".join(f", held-out {k[4:]} {v:.4f}" for k, v in val.items()))
            log(f"step {st.step}: train loss {rec['loss']:.4f}" + (f" ({parts})" if parts else "") + shown)
        if progress:
            progress(rec)
        if checkpoint and ckpt.due(s, st.step):
            red.save(checkpoint, st)   # the writer writes (after gathering any sharded optimizer state)
    return st


def _step(st: TrainState, graph: Graph, objective: Objective, train_ids: np.ndarray, seq_len: int,
          prec: Precision, scaler: LossScaler | None, run_on: Sequence[Any], terms: list[str], red: Any) -> Record:
    """One optimizer step (its micro-batches, the update); returns its record without the step number."""
    s, model = st.settings, st.model
    # Fresh compute-precision copies of the float32 master weights each step.
    # (tensor/pipeline parallel: the reducer runs the split model, minitx/distributed/model_parallel.py)
    ex = getattr(red, "executor", Executor)(graph, prec.params({**model.params, **st.aux}), run_on)
    parts: list[dict[str, np.ndarray]] = [{} for _ in red.local]   # a gradient sum per data-parallel slice
    sums = dict.fromkeys(["loss", *terms], 0.0)
    peak, overflow = 0, False
    for grads, x, y in _slices(st, train_ids, seq_len, red, parts):
        extra = objective.extra_feeds(x)
        inputs = batch_feeds(graph, x, y, extra, prec.dtype)
        if scaler is None:
            res = ex.forward_backward(inputs, step=st.step)
            micro = res.grads
        else:
            with np.errstate(over="ignore", invalid="ignore"):  # overflow is expected: the scaler handles it
                res = ex.forward_backward(inputs, step=st.step, loss_grad=scaler.scale)
            micro = scaler.unscale(res.grads)  # float32, summed in float32 across micro-batches
            overflow = overflow or not scaler.finite(micro)
        for k in sums:
            sums[k] += float(res.outputs[k])
        peak = max(peak, res.peak_activation_bytes)
        if not overflow:  # an overflowed step is skipped whole; its micro-batches still draw their data
            for k, g in micro.items():
                grads[k] = g if k not in grads else grads[k] + g
    # Averaged over the data-parallel ranks: every rank then holds the same gradients and loss.
    grads, avg = red.reduce(parts, np.array([*sums.values(), float(overflow)]))
    sums, overflow = dict(zip(sums, avg[:-1].tolist())), bool(avg[-1])
    if s.grad_accum > 1:
        inv = np.float32(1.0 / s.grad_accum)
        grads = {k: g * inv for k, g in grads.items()}
    rec: Record = {k: v / s.grad_accum for k, v in sums.items()}
    if not math.isfinite(rec["loss"]):
        hint = "lower --lr?" if scaler is None else f"lower --lr, or the forward pass overflows {s.precision}?"
        raise MinitxError(f"training diverged at step {st.step + 1}: loss is {rec['loss']} ({hint})")
    lr = lr_at(st.step, s.lr, s.warmup, s.steps, s.min_lr)
    if overflow:
        gnorm = math.inf  # skip the update: weights and optimizer state stay as they are
    else:
        gnorm = clip_global_norm(grads, s.clip)
        red.step(st.opt, model.params, {k: g for k, g in grads.items() if k in model.params}, lr)
        if st.aux:
            st.aux_opt.step(st.aux, {k: g for k, g in grads.items() if k in st.aux}, lr)
    rec.update(lr=lr, grad_norm=gnorm, peak_activation_bytes=peak)
    if scaler is not None:
        scale_used = scaler.scale
        scaler.update(overflow)
        rec.update(loss_scale=scale_used, skipped=overflow, skipped_total=scaler.skipped)
    return rec


def _slices(st: TrainState, train_ids: np.ndarray, seq_len: int, red: Any, parts: list[dict[str, np.ndarray]]):
    """The step's ``grad_accum`` micro-batches of the global batch, each cut into this process's
    data-parallel slices: (that slice's gradient sum, windows, targets)."""
    s = st.settings
    b = s.batch_size // red.world
    for _ in range(s.grad_accum):
        x, y = data.random_batch(train_ids, s.batch_size, seq_len, st.rng)
        for acc, r in zip(parts, red.local):
            yield acc, x[r * b:(r + 1) * b], y[r * b:(r + 1) * b]


def batch_feeds(graph: Graph, x: np.ndarray, y: np.ndarray | None = None, extra: dict[str, Any] | None = None,
                cache_dtype: Any = None) -> dict[str, Any]:
    """The inputs of ``graph`` for a batch of windows ``x`` (targets ``y``): the model's own, built
    by :func:`minitx.feeds.build`, plus an objective's ``extra`` ones (a teacher's outputs)."""
    extra = extra or {}
    own = Graph([v for v in graph.inputs if v.name not in extra], [], {}, []) if extra else graph
    return {**feeds.build(own, x, targets=y, cache_dtype=cache_dtype), **extra}
