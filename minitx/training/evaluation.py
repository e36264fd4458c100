"""Windowed next-token NLL: the one evaluation behind ``minitx eval``, held-out loss during
training, distillation's report and validation's perplexity.

A text is cut into windows of at most ``seq_len`` tokens; each window runs through the model's
graph (no loss node: the logits come out) and :func:`token_nll` scores its targets in float64.
Two ways to place the windows: sliding (every target scored exactly once, each with at least
``seq_len - stride`` tokens of context; ``minitx eval``), or a fixed set of ``count`` evenly
spaced full windows (the held-out loss logged during training: cheap, and the same windows every
time so that values compare across steps).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Sequence

import numpy as np

from .. import data, feeds
from ..errors import MinitxError
from ..executor import Executor
from ..model import Model
from ..precision import Precision, check_precision


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log p(target) for each target that is not -100, in float64 (a flat array, row-major order).

    ``logits`` is (..., V) and ``targets`` its leading shape."""
    z = np.asarray(logits, np.float64).reshape(-1, logits.shape[-1])
    t = np.asarray(targets, np.int64).reshape(-1)
    keep = t != -100
    z, t = z[keep], t[keep]
    z = z - z.max(-1, keepdims=True)
    return np.log(np.exp(z).sum(-1)) - z[np.arange(len(t)), t]


def windows(ids: np.ndarray, seq_len: int, stride: int | None = None,
            count: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(inputs, targets) windows over ``ids``: sliding (:func:`minitx.data.eval_windows`) or, with
    ``count``, that many evenly spaced windows of ``seq_len`` (fewer if the text is short)."""
    if count is None:
        return data.eval_windows(ids, seq_len, stride)
    n = min(count, max((len(ids) - 1) // seq_len, 1))
    L = min(seq_len, len(ids) - 1)
    starts = np.linspace(0, len(ids) - 1 - L, n).astype(np.int64)
    return [(ids[i: i + L], ids[i + 1: i + L + 1]) for i in starts]


def evaluate(model: Model, ids: np.ndarray, *, seq_len: int | None = None, stride: int | None = None,
             count: int | None = None, batch: int = 1, backends: Sequence[Any] = ("numpy",),
             strict: bool = False, precision: str = "float32",
             progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Loss (mean NLL per token, nats) and perplexity of ``ids`` under ``model``.

    Windows of ``seq_len`` tokens (default: the model's context length) placed by :func:`windows`,
    run ``batch`` at a time, computed in ``precision`` (float16/bfloat16: what the model scores
    when it runs in that precision, as ``train --precision`` computes)."""
    check_precision(precision)
    if not model.is_decoder:
        raise MinitxError(f"evaluation scores next-token prediction: needs a decoder, not {model.config['arch']}")
    ids = np.asarray(ids, np.int64)
    if len(ids) < 2:
        raise MinitxError(f"the text has {len(ids)} token(s): at least 2 are needed to score a prediction")
    if int(ids.max()) >= model.vocab_size or int(ids.min()) < 0:
        raise MinitxError(f"token id {int(ids.max())} is outside the model's vocabulary of {model.vocab_size}")
    seq_len = seq_len or model.n_ctx
    if seq_len > model.n_ctx:
        raise MinitxError(f"windows of {seq_len} tokens exceed the model's context length {model.n_ctx}")
    ex = executor(model, backends, strict, precision)
    dtype = Precision(precision).dtype
    wins = windows(ids, seq_len, stride, count)
    total, tokens = 0.0, 0
    # In float16 the masked attention scores (dtype min) overflow harmlessly to -inf; a real
    # overflow shows as a non-finite loss, refused below.
    quiet = np.errstate(over="ignore", invalid="ignore") if precision != "float32" else contextlib.nullcontext()
    with quiet:
        for k in range(0, len(wins), batch):
            group = wins[k: k + batch]
            x = np.stack([w[0] for w in group])
            y = np.stack([w[1] for w in group])
            logits = ex.run(feeds.build(ex.graph, x, cache_dtype=dtype), outputs=["logits"])["logits"]
            nll = token_nll(logits, y)
            total, tokens = total + float(nll.sum()), tokens + nll.size
            if progress:
                progress(min(k + batch, len(wins)), len(wins))
    loss = total / max(tokens, 1)
    if not math.isfinite(loss):
        raise MinitxError(f"the loss is {loss} in {precision}: the model's activations overflow"
                          + (f" {precision} (evaluate in float32)" if precision != "float32" else ""))
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens, "windows": len(wins),
            "precision": precision}


def executor(model: Model, backends: Sequence[Any] = ("numpy",), strict: bool = False,
             precision: str = "float32") -> Executor:
    """The executor :func:`evaluate` runs ``model`` on (``eval --explain`` shows its placement)."""
    prec = Precision(precision)
    return Executor(prec.graph(model.graph), prec.params(model.params), prec.backends(backends), strict)


def compare_plugins(model: Model, ids: np.ndarray, texts: Sequence[str], *, backends: Sequence[Any] = ("numpy",),
                    stride: int | None = None, strict: bool = False, precision: str = "float32",
                    warn: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Perplexity of ``ids`` under ``model`` and under ``model`` rewritten by ``texts``, and the
    delta (``eval --plugin``). The rewrite runs with ``force``: the perplexity is the judge here."""
    from .. import plugin

    opts = dict(stride=stride, backends=backends, strict=strict, precision=precision)
    base = evaluate(model, ids, **opts)
    new = plugin.optimize(model, list(texts), force=True, warn=warn)
    if {v.name: v.dtype for v in new.graph.inputs} != {v.name: v.dtype for v in model.graph.inputs}:
        raise MinitxError(f"{' + '.join(texts)} changes the model's inputs (an int8 KV cache); eval scores "
                          "windows without a cache and cannot feed it — leave kv= out")
    res = evaluate(new, ids, **opts)
    return {**base, "plugins": list(texts), "rewritten": {k: res[k] for k in ("loss", "perplexity")},
            "delta_loss": res["loss"] - base["loss"], "delta_perplexity": res["perplexity"] - base["perplexity"],
            "relative_delta_perplexity": res["perplexity"] / base["perplexity"] - 1.0}
