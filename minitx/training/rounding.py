"""Better post-training rounding for int4 (GPTQ-style), as a starting point for QAT.

Round-to-nearest (RTN, what ``quant:int4`` does) rounds each weight on its own. For a linear
y = x W the error that matters is ‖X (W − Q)‖² over the inputs X the layer sees, and rounding
one input row i up or down can be compensated by the rows not yet rounded: with H = XᵀX
(damped), GPTQ (Frantar et al., 2022) rounds rows in order and spreads each row's error e_i over
the later rows through the Cholesky factor U of H⁻¹ (W[j] −= U[i, j] · e_i / U[i, i]). Here
the scales are those ``quant:int4`` computes from the float weights (max |group| / 7.5 per group
of ``group`` input rows and column), and the result must survive re-packing unchanged, because
``minitx qat`` and ``quant:int4`` re-derive the scales from the weights they are given. So:

* each group's largest weight keeps its float value (it fixes the scale) and its packed code;
* every other weight becomes q·s with |q| ≤ 7, strictly inside the group's max, so the scale is
  unchanged and round-to-nearest of q·s gives q back.

:func:`round_linears` returns the model with such weights (still float, same graph): packing it
with ``quant:int4`` stores exactly the chosen codes (checked by :func:`check_repacks`), and QAT
can start from it instead of from the float weights.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .. import data, feeds, plugin
from ..errors import MinitxError
from ..model import Model
from ..ops.fakequant import fake_quant
from ..ops.quant import _group_scales
from . import embedding
from .settings import TrainSettings

MAX_SEQUENCES = 256   # training sequences ``qat --rounding gptq`` measures the layers' inputs on


def gptq_int4(w: np.ndarray, h: np.ndarray, group: int, damp: float = 0.01, act_order: bool = True) -> np.ndarray:
    """``w`` (in, out) rounded for inputs whose second moment is ``h`` = XᵀX (in, in); returns
    float weights that ``quantize_int4(·, group)`` packs to the chosen codes (see the module
    docstring). ``act_order`` rounds the rows of the largest inputs first (the scales are fixed
    beforehand, so the order is free), leaving their errors the most rows to be spread over."""
    if act_order:
        perm = np.argsort(-np.diag(h), kind="stable")
        inv = np.argsort(perm)
        return _gptq(np.asarray(w, np.float32), np.asarray(h), group, damp, perm)[inv]
    return _gptq(np.asarray(w, np.float32), np.asarray(h), group, damp, np.arange(w.shape[0]))


def _gptq(w: np.ndarray, h: np.ndarray, group: int, damp: float, perm: np.ndarray) -> np.ndarray:
    """:func:`gptq_int4` with the rows rounded in the order ``perm`` (returned in that order)."""
    n_in, n_out = w.shape
    if h.shape != (n_in, n_in):
        raise MinitxError(f"rounding: Hessian {h.shape} does not match weight {w.shape}")
    w32 = np.asarray(w, np.float32)
    s = np.repeat(_group_scales(w32, group, 7.5), group, axis=0).astype(np.float64)   # (in, out)
    rtn = fake_quant(w32, bits=4, group=group).astype(np.float64)
    g = np.abs(w32).reshape(n_in // group, group, n_out)
    top = np.zeros((n_in // group, group, n_out), bool)
    np.put_along_axis(top, g.argmax(axis=1)[:, None, :], True, axis=1)
    top = top.reshape(n_in, n_out)
    s, rtn, top, w32 = s[perm], rtn[perm], top[perm], w32[perm]
    H = np.array(h, np.float64, copy=True)[np.ix_(perm, perm)]
    dead = np.diag(H) <= 0
    H[dead, dead] = 1.0
    H[np.diag_indices(n_in)] += damp * float(np.mean(np.diag(H)))
    try:
        U = np.linalg.cholesky(np.linalg.inv(H)).T          # upper: H⁻¹ = Uᵀ U
    except np.linalg.LinAlgError:
        raise MinitxError("rounding: the inputs' second-moment matrix is not positive definite") from None
    W = w32.astype(np.float64)
    Q = np.zeros_like(W)
    for i in range(n_in):
        q = np.clip(np.rint(W[i] / s[i]), -7, 7) * s[i]
        q = np.where(top[i], rtn[i], q)
        Q[i] = q
        err = (W[i] - q) / U[i, i]
        W[i + 1:] -= np.outer(U[i, i + 1:], err)
    out = np.where(top, w32, Q).astype(np.float32)      # the maxima stay: they fix the scales
    return out


def check_repacks(w: np.ndarray, group: int) -> float:
    """Max |fake_quant(w) − w| off the groups' maxima: 0 up to float rounding when ``w`` came from
    :func:`gptq_int4` (packing keeps the chosen codes)."""
    n_in, n_out = w.shape
    fq = fake_quant(np.asarray(w, np.float32), bits=4, group=group)
    g = np.abs(w).reshape(n_in // group, group, n_out)
    top = np.zeros(g.shape, bool)
    np.put_along_axis(top, g.argmax(axis=1)[:, None, :], True, axis=1)
    return float(np.abs(np.where(top.reshape(n_in, n_out), 0, fq - w)).max())


def round_linears(model: Model, sents: Sequence[Sequence[int]], group: int = 32, batch: int = 32,
                  damp: float = 0.01, act_order: bool = True) -> Model:
    """``model`` with every linear's weight rounded by :func:`gptq_int4` against the inputs it
    sees on ``sents`` (the float model's own activations, real tokens only: an encoder's
    sentences, a decoder's windows of text); other parameters (embedding tables: a lookup has no
    inputs to compensate over) are shared unchanged."""
    if any(v.name == "encoder_ids" for v in model.graph.inputs):
        raise MinitxError("rounding gptq: encoder-decoder models are not supported (a decoder or an encoder is)")
    lin = [n for n in model.graph.nodes if n.op == "linear" and n.inputs[1] in model.params]
    if not lin:
        raise MinitxError("rounding: the model has no linear layers")
    bad = [n.inputs[1] for n in lin if model.params[n.inputs[1]].shape[0] % group]
    if bad:
        raise MinitxError(f"rounding gptq: {bad[0]} has {model.params[bad[0]].shape[0]} inputs, "
                          f"not a multiple of group={group}")
    hs = {n.inputs[1]: np.zeros((model.params[n.inputs[1]].shape[0],) * 2) for n in lin}
    ex = model.executor(("numpy",))
    out = "logits" if model.is_decoder else "embedding"
    for k in range(0, len(sents), batch):
        fed = feeds.for_sequences(model.graph, list(sents[k:k + batch]), decoder=model.is_decoder)
        got = ex.run(dict(fed), outputs=[out], keep=[n.inputs[0] for n in lin])
        real = fed["attention_mask"].astype(bool)
        for n in lin:
            x = got[n.inputs[0]][real].astype(np.float64)
            hs[n.inputs[1]] += x.T @ x
    params = dict(model.params)
    for name, h in hs.items():
        params[name] = gptq_int4(model.params[name], h, group, damp, act_order)
    return Model(dict(model.config), params, model.graph, model.tokenizer_json,
                 {**model.meta, "rounding": {"method": "gptq", "group": group, "act_order": act_order,
                                             "sequences": len(sents)}})


def gptq_start(model: Model, text_or_ids: str | np.ndarray, packed_text: str, settings: TrainSettings) -> Model:
    """Where ``minitx qat --rounding gptq`` starts: ``model`` rounded by :func:`round_linears` for
    ``packed_text`` (plain ``quant:int4``: every linear quantized, so every linear is rounded) on
    up to MAX_SEQUENCES sequences of the training part of the data — never the held-out tail the
    run is scored on: an encoder's sentences, a decoder's windows of ``seq_len`` tokens."""
    o = plugin.parse_spec(packed_text).options
    if o["mode"] != "int4" or o["skip"] or o["layers"] or o["sensitive"]:
        raise MinitxError(f"--rounding gptq rounds every linear for int4: it needs --plugin quant:int4[,group=N]"
                          f"[,embeddings=…], not {packed_text!r}")
    if model.is_decoder:
        L = min(settings.seq_len or model.n_ctx, model.n_ctx)
        train = data.split(np.asarray(text_or_ids), settings.val_fraction, L)[0]
        seqs = [train[i:i + L].tolist() for i in range(0, len(train) - L + 1, L)]
    else:
        sents = embedding.sentences(model, str(text_or_ids), settings.seq_len or None)
        seqs = [sents[i] for i in data.split(embedding.stream(sents), settings.val_fraction, 1)[0]]
    if not seqs:
        raise MinitxError("--rounding gptq: the data has no training sequence to measure the layers' inputs on")
    return round_linears(model, seqs[::max(len(seqs) // MAX_SEQUENCES, 1)][:MAX_SEQUENCES], int(o["group"]))
