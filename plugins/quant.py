"""Quantization plugin: weights (and optionally the KV cache) in fewer bits, as graph rewrites.

    minitx optimize model.npz --plugin quant:int8 -o model.q8.npz

Modes (the shorthand ``quant:MODE``):

==============  ==============================================================================
``int8``        int8, one scale per ``block`` (32) inputs, activations quantized to int8 blocks
                at run time, like llama.cpp Q8_0 (``linear_q8_0``; ``int8_block`` is its old name)
``int8_channel``  int8 weight-only, one scale per output channel (``linear_q8``): decodes
                fastest, but one scale over all of a channel's inputs is coarser — on
                all-MiniLM-L6-v2 the worst sentence of the held-out text falls to cosine 0.996
                (block-32: >= 0.999 at every length), so it is not the default
``w8a8``        int8 weights per channel + int8 activations quantized per token at run time
                (``linear_q8_0`` with one block per row)
``int4``        4-bit weights, one scale per ``group`` inputs, two values per byte
``log4``        4-bit power-of-two weights: sign · 2^-e (e 0..6) or 0, times a scale per ``group``
``int2``        2-bit uniform levels ±0.5, ±1.5 at the error-minimising scale per ``group``
``ternary``     2-bit {-1, 0, +1} · scale (TWN: threshold 0.7 · mean|w|, scale = mean kept |w|)
``binary``      1-bit {-1, +1} · scale (XNOR-Net: scale = mean|w| per ``group``); the last four
                are ``linear_lut`` (a codebook, codes packed 8/bits per byte) and lose too much
                without quantization-aware training: use them with ``minitx qat``
``float16``     weights cast to float16; ``bfloat16`` likewise (stored as uint16 bit patterns)
``kv8``         only the KV cache in int8 (per token and head); ``kv=int8`` adds it to any mode,
                on top of a sparse attention pattern too (``sparse_attention_kv8``); on an
                encoder–decoder every cache: the decoder's and the cross-attention K/V (see
                "encoder–decoder caches" below)
``none``        no weight quantization (with ``kv=int8``)
==============  ==============================================================================

After pruning or low rank, quantization packs what remains: a low-rank layer's factors U and V
become two packed linears of the mode, and the kept values of a pruned layer (``sparse_linear``'s
CSR data, ``nm_linear``'s 2:4 values) become int8 with one scale per output channel in every
integer mode (their indices stay as they are): 2:4 then reads 1.25 bytes per kept weight, and
its decode kernel is faster still (benchmarks/results/sparse_crossover.md).

In the integer modes embedding tables are quantized too, and a table tied to the LM head is
quantized once and feeds both (the head reads it as a transposed linear). Tables of at most
``SMALL_TABLE_ROWS`` rows (BERT's token types) stay float: every token reads one of their few
rows, so a row's rounding error would be the same bias on every position of every input —
measurably the largest error int8 added to MiniLM's long inputs — for a saving of a few KiB.
``embeddings=``:

==============  ==============================================================================
``auto``        the default: ``int4`` tables in mode ``int4``, ``int8`` in the other integer modes
``int8``        int8, one scale per row (``embedding_q8``; the head is ``linear_q8``)
``int4``        4-bit, one scale per ``group`` columns of a row (``embedding_q4``; the head is
                ``linear_q4,transposed``) — GPT-2's 50257 x 768 token table is its largest tensor
``false``       tables stay float
==============  ==============================================================================

int8, int4, float16 and bfloat16 weights are stored (out, in) — ``linear_q8,transposed``,
``linear_q4,transposed``, ``linear_cast,transposed`` —: at decode (one row of activations) each output channel is then one
contiguous dot product, which the numba kernels stream at memory bandwidth. Every rewrite is approximate and validated against the declared
tolerance of its mode (``TOLERANCE``; minitx.plugin.Tolerance; ``kv=int8`` or int4 tables in
another mode take the looser of the two):

==============================================  =========  ========  ==========
mode                                            mean cos   KL        perplexity
==============================================  =========  ========  ==========
``float16``                                     >= 0.9999  <= 0.001  <= +0.1%
``int8``, ``int8_channel``, ``kv8``, ``bfloat16``  >= 0.998   <= 0.01   <= +1%
``w8a8``                                        >= 0.99    <= 0.02   <= +2%
``int4``                                        >= 0.93    <= 0.05   <= +5%
``log4`` (after QAT)                            >= 0.9     <= 0.1    <= +10%
``int2``, ``ternary`` (after QAT)               >= 0.8     <= 0.3    <= +30%
``binary`` (after QAT)                          >= 0.7     <= 0.5    <= +50%
==============================================  =========  ========  ==========

(mean per-row cosine of the primary output; mean next-token KL in nats and the relative perplexity
change for decoders; top-1 agreement is reported, and bounded only on request.) The options
``min_cosine=``, ``max_kl=``, ``min_top1=``, ``max_ppl_increase=`` (0.05 = +5%), ``min_row_cosine=``
(the worst row, off by default) and
``max_rel=`` override one bound each (``inf``, or 0 for a minimum, turns one off).

``qat=true`` (modes int8, int8_channel, w8a8, int4, log4, int2, ternary, binary) is
quantization-aware training: instead of packing,
each quantized weight is read through a ``fake_quant`` node (minitx/ops/fakequant.py) that rounds
it exactly as the packed format would — and in int8 and w8a8, whose ``linear_q8_0`` also rounds
its input per block, that input through a ``fake_quant_act`` node —, so the graph trains in float with the
quantization error in its forward and a straight-through gradient. ``minitx qat`` (minitx/qat.py) fine-tunes such a
graph, then applies the same mode without ``qat`` to the fine-tuned weights.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from minitx.errors import MinitxError
from minitx.ir import Node, Value
from minitx.ops import quant as Q
from minitx.plugin import CalibrationData, Option, Plugin, Tolerance, boolean, fraction, positive_int
from minitx.rewrite import Context, Replacement, Rule

LUT_MODES = tuple(Q.CODEBOOKS)   # binary, ternary, int2, log4: linear_lut
MODES = ("int8", "int8_channel", "int8_block", "w8a8", "int4", *LUT_MODES, "float16", "bfloat16", "kv8", "none")
INTEGER_MODES = ("int8", "int8_channel", "int8_block", "w8a8", "int4", *LUT_MODES)
QAT_MODES = ("int8", "int8_channel", "int8_block", "w8a8", "int4", *LUT_MODES)   # fake_quant(_act) reproduce them
SMALL_TABLE_ROWS = 8   # embedding tables this small stay float (see the module docstring)
# Declared tolerance of each mode against the float model (see the module docstring).
_INT8 = Tolerance(min_cosine=0.998, max_kl=0.01, max_ppl_increase=0.01)
TOLERANCE = {"int8": _INT8, "int8_channel": _INT8, "int8_block": _INT8, "kv8": _INT8, "bfloat16": _INT8,
             "w8a8": Tolerance(min_cosine=0.99, max_kl=0.02, max_ppl_increase=0.02),
             "int4": Tolerance(min_cosine=0.93, max_kl=0.05, max_ppl_increase=0.05),
             "float16": Tolerance(min_cosine=0.9999, max_kl=0.001, max_ppl_increase=0.001),
             # after QAT (post-training alone they are far outside: they exist to be fine-tuned)
             "log4": Tolerance(min_cosine=0.9, max_kl=0.1, max_ppl_increase=0.1),
             "int2": Tolerance(min_cosine=0.8, max_kl=0.3, max_ppl_increase=0.3),
             "ternary": Tolerance(min_cosine=0.8, max_kl=0.3, max_ppl_increase=0.3),
             "binary": Tolerance(min_cosine=0.7, max_kl=0.5, max_ppl_increase=0.5),
             "none": Tolerance(exact=True)}


def _skipped(node: Node, opts: Mapping[str, Any]) -> bool:
    pats = [p for p in str(opts.get("skip") or "").split("|") if p]
    return any(fnmatch.fnmatchcase(node.name, p) for p in pats)


def _int8_block(opts: Mapping[str, Any], n_in: int) -> int:
    """Inputs per scale of an int8 linear with ``n_in`` inputs; 0 (one scale per output channel)
    when ``block`` does not divide them (LLaMA-tiny's 176-wide FFN and block 32)."""
    k = int(opts["block"])
    return 0 if n_in % k else k


def _pack(ctx: Context, mode: str, name: str, x: str, w: str, W: np.ndarray, b: str, outputs: list[str],
          tags: Mapping[str, Any]) -> Node:
    """The packed linear of mode ``mode`` computing ``x W + b`` (W (in, out), stored as param ``w``)."""
    opts = ctx.options
    W = W.astype(np.float32)
    n_in = W.shape[0]
    attrs: dict[str, Any] = {}
    if mode == "int8_channel" or (mode in ("int8", "int8_block") and not _int8_block(opts, n_in)):
        q, s = Q.quantize_per_channel(W)
        op, ins, attrs = "linear_q8", [np.ascontiguousarray(q.T), s], {"transposed": True}
    elif mode == "w8a8":  # = Q8_0 with one block per row: a scale per token and per output channel
        q, s = Q.quantize_per_channel(W)
        op, ins, attrs = "linear_q8_0", [np.ascontiguousarray(q.T), s[:, None]], {"block": n_in}
    elif mode in ("int8", "int8_block"):  # Q8_0: activations in int8 blocks too, integer dot products
        k = _int8_block(opts, n_in)
        q, s = Q.quantize_blocks(W, k)
        op, ins, attrs = "linear_q8_0", [np.ascontiguousarray(q.T), np.ascontiguousarray(s.T)], {"block": k}
    elif mode == "int4":
        k = opts["group"]
        if n_in % k:
            raise MinitxError(f"quant: group size {k} does not divide the {n_in} input features of {name} "
                              f"(weight {w} {tuple(W.shape)}; pick another group=, or layers=PATTERN:int8 for it)")
        q, s = Q.quantize_int4_rows(np.ascontiguousarray(W.T), k)  # = quantize_int4(W, k), stored (out, in/2)
        op, ins, attrs = "linear_q4", [q, s], {"group": k, "transposed": True}
    elif mode in LUT_MODES:
        k = opts["group"]
        per = 8 // Q.CODEBOOKS[mode][0]
        if n_in % k or k % per:
            raise MinitxError(f"quant: group size {k} must divide the {n_in} input features of {name} and be a "
                              f"multiple of {per} for {mode} (weight {w} {tuple(W.shape)})")
        q, s = Q.quantize_lut(np.ascontiguousarray(W.T), mode, k)
        op, ins, attrs = "linear_lut", [q, s], {"codebook": mode, "group": k}
    elif mode == "float16":
        op, ins, attrs = "linear_cast", [np.ascontiguousarray(W.T).astype(np.float16)], {"transposed": True}
    else:  # bfloat16
        op, ins, attrs = "linear_cast", [Q.to_bfloat16_bits(np.ascontiguousarray(W.T))], {"transposed": True}
    names = [ctx.add_param(f"{w}.q", ins[0])] + ([ctx.add_param(f"{w}.scale", ins[1])] if len(ins) > 1 else [])
    return Node(name, op, [x, *names, b], list(outputs), attrs, {**tags, "quant": mode})


def _linear_rule(node: Node, ctx: Context) -> Replacement | None:
    mode = _mode_of(node, ctx)
    if mode in ("kv8", "none"):
        return None
    x, w, *rest = node.inputs
    if not ctx.is_param(w):
        return None
    err = ctx.plan.errors.get(node.name) if ctx.plan is not None else None
    tags = {**node.tags, "sensitivity": round(err, 6)} if err is not None else node.tags
    return Replacement([_pack(ctx, mode, node.name, x, w, ctx.param(w), rest[0] if rest else "",
                              list(node.outputs), tags)])


def _lowrank_rule(node: Node, ctx: Context) -> Replacement | None:
    """lowrank_linear(x, U, V, b) → two packed linears: quantization after low rank packs the
    factors, which hold all of the layer's weights."""
    mode = _mode_of(node, ctx)
    x, u, v, *rest = node.inputs
    if mode in ("kv8", "none") or not (ctx.is_param(u) and ctx.is_param(v)):
        return None
    mid = ctx.fresh(node.name + ".h")
    first = _pack(ctx, mode, ctx.fresh(node.name + ".u"), x, u, ctx.param(u), "", [mid], node.tags)
    second = _pack(ctx, mode, ctx.fresh(node.name + ".v"), mid, v, ctx.param(v), rest[0] if rest else "",
                   list(node.outputs), node.tags)
    return Replacement([first, second])


def _compact_rule(node: Node, ctx: Context) -> Replacement | None:
    """Pruned linears (``sparse_linear``: CSR; ``nm_linear``: packed N:M) in an integer mode: the
    stored values become int8 with a scale per output channel (the ops' ``scale`` input), their
    indices and positions unchanged — quantization after pruning packs what pruning kept."""
    mode = _mode_of(node, ctx)
    ins = list(node.inputs) + [""] * (6 - len(node.inputs))
    vals_at, s_at = (1, 5) if node.op == "sparse_linear" else (1, 4)
    if mode not in INTEGER_MODES or ins[s_at] or not ctx.is_param(ins[vals_at]):
        return None
    v = ctx.param(ins[vals_at]).astype(np.float32)
    if node.op == "sparse_linear":
        indptr = ctx.param(ins[3])
        out_of = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))   # output channel of every value
        amax = np.zeros(len(indptr) - 1, np.float32)
        np.maximum.at(amax, out_of, np.abs(v))
    else:
        out_of, amax = slice(None), np.abs(v).max(axis=0)
    scale = np.where(amax > 0, amax / 127, 1).astype(np.float32)
    q = np.clip(np.rint(v / scale[out_of]), -127, 127).astype(np.int8)
    name = ins[vals_at]
    ins[vals_at], ins[s_at] = ctx.add_param(f"{name}.q", q), ctx.add_param(f"{name}.scale", scale)
    return Replacement([Node(node.name, node.op, ins[:s_at + 1], list(node.outputs), dict(node.attrs),
                             {**node.tags, "quant": "int8"})])


# ------------------------------------------------------------------ mixed precision per layer
WEIGHT_MODES = ("int8", "int8_channel", "int8_block", "w8a8", "int4", *LUT_MODES, "float16", "bfloat16", "none")


def _layer_modes(s: str) -> tuple[tuple[str, str], ...]:
    """``layers=`` value: ``GLOB:MODE|GLOB:MODE`` → ((glob, mode), ...); the first match wins."""
    out = []
    for item in (t.strip() for t in s.split("|")):
        if not item:
            continue
        pat, sep, mode = item.rpartition(":")
        if not sep or not pat or mode not in WEIGHT_MODES:
            raise ValueError(f"{item!r} is not GLOB:MODE with MODE one of {', '.join(WEIGHT_MODES)}")
        out.append((pat, mode))
    return tuple(out)


def _mode_of(node: Node, ctx: Context) -> str:
    """The weight mode of one node: ``skip`` → none, then the first ``layers=`` glob that matches,
    then the measured-sensitivity plan (``sensitive=``), then ``mode``."""
    opts = ctx.options
    if _skipped(node, opts):
        return "none"
    for pat, mode in opts.get("layers") or ():
        if fnmatch.fnmatchcase(node.name, pat):
            return mode
    plan = ctx.plan
    if plan is not None and node.name in plan.promoted:
        return opts["high"]
    return opts["mode"]


def output_errors(graph, params: Mapping[str, np.ndarray], weights: Mapping[str, Mapping[str, Any]],
                  sequences) -> dict[str, float]:
    """For each weight name → fake_quant attributes: the relative error ‖y − y₀‖ / ‖y₀‖ of the
    graph's primary output over ``sequences`` when that weight alone is rounded as it would be
    packed. What a layer's rounding does to the model's output, not to the layer's own output
    (on all-MiniLM-L6-v2 the layer-local error ranked layers no better than their position)."""
    from minitx import feeds
    from minitx.executor import Executor
    from minitx.ops.fakequant import fake_quant

    out = graph.outputs[0]
    fs = [feeds.build(graph, [list(ids)]) for ids in sequences]
    ref = [np.asarray(Executor(graph, params).run(f, outputs=[out])[out], np.float64) for f in fs]
    norm = np.sqrt(sum(float(np.sum(r * r)) for r in ref)) or 1.0
    errors = {}
    for w, attrs in weights.items():
        W = np.asarray(params[w])
        ex = Executor(graph, {**params, w: fake_quant(W.astype(np.float32), **attrs).astype(W.dtype)})
        diff = sum(float(np.sum((np.asarray(ex.run(f, outputs=[out])[out], np.float64) - r) ** 2))
                   for f, r in zip(fs, ref))
        errors[w] = float(np.sqrt(diff) / norm)
    return errors


@dataclass(frozen=True)
class QuantPlan:
    """What :meth:`QuantPlugin.analyze` measured: the model's relative output error with each
    candidate linear alone at the base mode (:func:`output_errors`), and the ``sensitive`` fraction with the largest errors,
    which get mode ``high``."""

    errors: dict[str, float] = field(default_factory=dict)
    promoted: frozenset[str] = frozenset()


def _table_format(s: str) -> str | bool:
    """``embeddings=`` value: "auto", "int8", "int4", or False (true means auto)."""
    t = s.strip().lower()
    return False if t == "false" else "auto" if t == "true" else t


def _table(ctx: Context, name: str) -> tuple[str, str, str, dict[str, Any]]:
    """The packed form of an embedding table — (q, scale, lookup op, attrs) — quantized once per
    run and shared by its readers (the lookup and the tied LM head)."""
    key = f"quant.table:{name}"
    if key not in ctx.memo:
        opts = ctx.options
        fmt = opts["embeddings"] if opts["embeddings"] != "auto" else ("int4" if opts["mode"] == "int4" else "int8")
        E = ctx.param(name).astype(np.float32)
        if fmt == "int4":
            k = opts["group"]
            if E.ndim != 2 or E.shape[1] % k:
                raise MinitxError(f"quant: group size {k} does not divide the {E.shape[-1]} columns of embedding "
                                  f"table {name} {tuple(E.shape)} (embeddings=int8 keeps tables int8)")
            (q, s), op, attrs = Q.quantize_int4_rows(E, k), "embedding_q4", {"group": k}
        else:
            (q, s), op, attrs = Q.quantize_per_channel(E, axis=1), "embedding_q8", {}
        ctx.memo[key] = (ctx.add_param(f"{name}.q", q), ctx.add_param(f"{name}.scale", s), op, attrs)
    return ctx.memo[key]


def _embeddings_wanted(node: Node, opts: Mapping[str, Any]) -> bool:
    return opts["mode"] in INTEGER_MODES and opts["embeddings"] and not _skipped(node, opts)


def _small(ctx: Context, table: str) -> bool:
    return int(ctx.graph.params[table].shape[0]) <= SMALL_TABLE_ROWS


def _embedding_rule(node: Node, ctx: Context) -> Replacement | None:
    ids, table = node.inputs
    if not _embeddings_wanted(node, ctx.options) or not ctx.is_param(table) or _small(ctx, table):
        return None
    q, s, op, attrs = _table(ctx, table)
    return Replacement([Node(node.name, op, [ids, q, s], list(node.outputs), dict(attrs), dict(node.tags))])


def _lm_head_rule(node: Node, ctx: Context) -> Replacement | None:
    """logits = x Eᵀ with a (tied) table E: read the packed table as a transposed linear
    (int8: ``linear_q8``, a scale per row = per output; int4: ``linear_q4`` with row groups)."""
    x, table = node.inputs
    if not node.attrs.get("transpose_b") or not ctx.is_param(table) or not _embeddings_wanted(node, ctx.options):
        return None
    if len(ctx.graph.params[table].shape) != 2:
        return None
    q, s, op, attrs = _table(ctx, table)
    head = "linear_q4" if op == "embedding_q4" else "linear_q8"
    return Replacement([Node(node.name, head, [x, q, s], list(node.outputs), {**attrs, "transposed": True},
                             dict(node.tags))])


def _kv_rule(node: Node, ctx: Context) -> Replacement | None:
    """attention over a float cache → attention_kv8 over an int8 cache with per-token/head scales
    (sparse_attention → sparse_attention_kv8: kv=int8 on top of a sparsity pattern)."""
    if not (ctx.options["kv"] == "int8" or ctx.options["mode"] == "kv8") or _skipped(node, ctx.options):
        return None
    q, k, v, pk, pv, mask = (node.inputs + [""] * 6)[:6]
    inputs = {x.name: x for x in ctx.graph.inputs}
    if not pk or pk not in inputs or pv not in inputs:
        return None  # no cache (an encoder, or a cache fed by something else)
    hkv = int(node.attrs["n_kv_heads"])
    out, present_k, present_v = node.outputs
    new_inputs, names = [], {}
    for t, past in (("k", pk), ("v", pv)):
        B, S, W = inputs[past].shape
        names[t] = f"{past}_scale"
        new_inputs += [Value(past, (B, S, W), "int8"), Value(names[t], (B, S, hkv), inputs[past].dtype)]
    outs = [out, present_k, f"{present_k}_scale", present_v, f"{present_v}_scale"]
    op = "sparse_attention_kv8" if node.op == "sparse_attention" else "attention_kv8"   # a pattern stays
    new = Node(node.name, op, [q, k, v, pk, names["k"], pv, names["v"], mask], outs, dict(node.attrs), dict(node.tags))
    graph_outs = [o for o in (f"{present_k}_scale", f"{present_v}_scale")] if present_k in ctx.graph.outputs else []
    return Replacement([new], inputs=new_inputs, outputs=graph_outs)


# ------------------------------------------------------------------ encoder–decoder caches
# An encoder–decoder (minitx/models/transformer.py) has caches the rule above does not see: the
# cross-attention K/V (``cross.{i}.k/v``, split from a projection of the encoder output, computed
# once per input and read by every decode step) and T5's decoder self-attention cache
# (``present.{i}.k = concat(past.{i}.k, k)``, read by ``cross_attention`` with the position
# bias). kv=int8 rounds each where it is made (``quantize_heads``: int8 plus a scale per token
# and head, kept under the same value name with the scales beside it as ``{name}_scale``) and
# the ``cross_attention`` reading it becomes ``cross_attention_kv8``. The cross K/V are thus
# quantized in the encoder part of the graph (minitx/seq2seq.py cuts at ``cross.*``): once per
# input, handed to the decoder as int8. The three rules decide with the same predicate, so in a
# sweep either a cache and all its readers change together or nothing does.
def _kv_wanted(node: Node, ctx: Context) -> bool:
    return (ctx.options["kv"] == "int8" or ctx.options["mode"] == "kv8") and not _skipped(node, ctx.options)


def _seq2seq_cache(value: str, ctx: Context) -> bool:
    """``value`` is a float cross-attention K/V or T5 self-attention cache, read by cross_attention only."""
    prod = ctx.producer(value)
    if prod is None or not _kv_wanted(prod, ctx):
        return False
    if prod.op == "split":
        made = value.startswith("cross.") and all(o.startswith("cross.") for o in prod.outputs)
    elif prod.op == "concat":
        # (not yet quantized: the new K/V is not a quantize_heads output; the graph's declared
        # inputs change mid-sweep, the producers seen by the rules do not)
        past, new = (prod.inputs + [""])[:2]
        made = (len(prod.inputs) == 2 and past.startswith("past.") and past in {v.name for v in ctx.graph.inputs}
                and getattr(ctx.producer(new), "op", "") != "quantize_heads" and value in ctx.graph.outputs)
    else:
        return False
    readers = ctx.consumers(value)
    return made and bool(readers) and all(r.op == "cross_attention" and value in r.inputs[1:3] for r in readers)


def _kv8_reader(node: Node, ctx: Context) -> bool:
    """``node`` (a cross_attention) will read int8 K/V: both its caches are quantized, and none of
    their readers is skipped."""
    if node.op != "cross_attention" or not _kv_wanted(node, ctx):
        return False
    kv = node.inputs[1:3]
    return all(_seq2seq_cache(x, ctx) and all(_kv_wanted(r, ctx) for r in ctx.consumers(x)) for x in kv)


def _heads_of(value: str, ctx: Context) -> int:
    return int(ctx.consumers(value)[0].attrs["n_heads"])


def _cross_kv_rule(node: Node, ctx: Context) -> Replacement | None:
    """split → cross.{i}.k/v  ⇒  split → float K/V → quantize_heads → cross.{i}.k/v (int8) + scales."""
    if not node.outputs or not all(_seq2seq_cache(o, ctx) and all(_kv8_reader(r, ctx) for r in ctx.consumers(o))
                                   for o in node.outputs):
        return None
    floats = [ctx.fresh(f"{node.name}.{o.rsplit('.', 1)[-1]}") for o in node.outputs]  # not cross.*: not cut
    new = [Node(node.name, node.op, list(node.inputs), floats, dict(node.attrs), dict(node.tags))]
    for o, f in zip(node.outputs, floats):
        new.append(ctx.node("quantize_heads", [f], [o, f"{o}_scale"], name=f"{node.name}.q8.{o.rsplit('.', 1)[-1]}",
                            tags=node.tags, n_heads=_heads_of(o, ctx)))
    return Replacement(new)


def _self_kv_rule(node: Node, ctx: Context) -> Replacement | None:
    """present = concat(past, k) (T5)  ⇒  present = concat(past int8, quantize_heads(k)), and the
    scales likewise: ``past.{i}.k_scale`` in, ``present.{i}.k_scale`` out."""
    present = node.outputs[0]
    if not (_seq2seq_cache(present, ctx) and all(_kv8_reader(r, ctx) for r in ctx.consumers(present))):
        return None
    past, new_kv = node.inputs
    H = _heads_of(present, ctx)
    decl = {v.name: v for v in ctx.graph.inputs}[past]
    B, S, W = decl.shape
    kq, ks = f"{node.name}.q8", f"{node.name}.q8_scale"
    quant = ctx.node("quantize_heads", [new_kv], [ctx.fresh(kq), ctx.fresh(ks)], name=f"{node.name}.q8",
                     tags=node.tags, n_heads=H)
    cat = Node(node.name, "concat", [past, quant.outputs[0]], [present], dict(node.attrs), dict(node.tags))
    cat_s = ctx.node("concat", [f"{past}_scale", quant.outputs[1]], [f"{present}_scale"], name=f"{node.name}.scale",
                     tags=node.tags, **node.attrs)
    return Replacement([quant, cat, cat_s], inputs=[Value(past, (B, S, W), "int8"), Value(f"{past}_scale", (B, S, H),
                                                                                       decl.dtype)],
                       outputs=[f"{present}_scale"])


def _kv8_read_rule(node: Node, ctx: Context) -> Replacement | None:
    """cross_attention over caches the two rules above quantize ⇒ cross_attention_kv8 over them."""
    if not _kv8_reader(node, ctx):
        return None
    q, k, v, *rest = node.inputs
    rest = (rest + ["", ""])[:2]
    return Replacement([Node(node.name, "cross_attention_kv8", [q, k, f"{k}_scale", v, f"{v}_scale", *rest],
                             list(node.outputs), dict(node.attrs), {**node.tags, "quant": "kv8"})])


# ------------------------------------------------------------------ quantization-aware training
def _qat_weight_attrs(opts: Mapping[str, Any], mode: str, n_in: int) -> dict[str, Any]:
    """fake_quant attributes that reproduce the packed linear weights of ``mode``."""
    if mode == "int4":
        return {"bits": 4, "group": int(opts["group"])}
    if mode in LUT_MODES:
        return {"bits": Q.CODEBOOKS[mode][0], "group": int(opts["group"]), "codebook": mode}
    if mode in ("int8", "int8_block") and _int8_block(opts, n_in):
        return {"bits": 8, "group": int(opts["block"])}
    return {"bits": 8}


def _qat_act_group(opts: Mapping[str, Any], mode: str, n_in: int) -> int:
    """Inputs per activation scale of the packed linear of ``mode`` — int8 and W8A8 pack to
    ``linear_q8_0``, which rounds its input per block at run time (see ``_pack``) —, or 0: weight-only."""
    if mode == "w8a8":
        return n_in
    return _int8_block(opts, n_in) if mode in ("int8", "int8_block") else 0


def _qat_linear_rule(node: Node, ctx: Context) -> Replacement | None:
    """linear(x, W) → linear(x, fake_quant(W)): the weight stays float and trainable; where the
    mode packs to ``linear_q8_0``, x is read through ``fake_quant_act`` as well."""
    x, w, *rest = node.inputs
    mode = _mode_of(node, ctx)
    if mode == "none" or not ctx.is_param(w):
        return None
    n_in = ctx.graph.params[w].shape[0]
    attrs = _qat_weight_attrs(ctx.options, mode, n_in)
    if attrs.get("group") and n_in % attrs["group"]:
        raise MinitxError(f"quant: group size {attrs['group']} does not divide the {n_in} input features of "
                          f"{node.name} (weight {w} {tuple(ctx.graph.params[w].shape)})")
    fq = ctx.node("fake_quant", [w], name=f"{node.name}.fake_quant", tags=node.tags, **attrs)
    new = [fq]
    act = _qat_act_group(ctx.options, mode, n_in)
    if act:   # the packed op (linear_q8_0) rounds its input too: so does the training graph
        new.append(ctx.node("fake_quant_act", [x], name=f"{node.name}.fake_quant_act", tags=node.tags, group=act))
        x = new[-1].outputs[0]
    return Replacement([*new, Node(node.name, node.op, [x, fq.outputs[0], *rest], list(node.outputs),
                                   dict(node.attrs), dict(node.tags))])


def _qat_table(node: Node, ctx: Context, table: str) -> Node:
    """fake_quant of an embedding table in the format ``_table`` packs it: int8 with a scale per
    row, or int4 with a scale per ``group`` columns of a row (same choice of format as ``_table``)."""
    opts = ctx.options
    fmt = opts["embeddings"] if opts["embeddings"] != "auto" else ("int4" if opts["mode"] == "int4" else "int8")
    attrs = {"bits": 4, "group": int(opts["group"])} if fmt == "int4" else {"bits": 8}
    shape = tuple(ctx.graph.params[table].shape)
    if attrs.get("group") and (len(shape) != 2 or shape[1] % attrs["group"]):
        raise MinitxError(f"quant: group size {attrs['group']} does not divide the {shape[-1]} columns of embedding "
                          f"table {table} {shape} (embeddings=int8 keeps tables int8)")
    return ctx.node("fake_quant", [table], name=f"{node.name}.fake_quant", tags=node.tags, axis=1, **attrs)


def _qat_embedding_rule(node: Node, ctx: Context) -> Replacement | None:
    ids, table = node.inputs
    if not _embeddings_wanted(node, ctx.options) or not ctx.is_param(table) or _small(ctx, table):
        return None
    fq = _qat_table(node, ctx, table)
    return Replacement([fq, Node(node.name, node.op, [ids, fq.outputs[0]], list(node.outputs), dict(node.attrs),
                                 dict(node.tags))])


def _qat_lm_head_rule(node: Node, ctx: Context) -> Replacement | None:
    x, table = node.inputs
    if not node.attrs.get("transpose_b") or not ctx.is_param(table) or not _embeddings_wanted(node, ctx.options):
        return None
    if len(ctx.graph.params[table].shape) != 2:
        return None
    fq = _qat_table(node, ctx, table)
    return Replacement([fq, Node(node.name, node.op, [x, fq.outputs[0]], list(node.outputs), dict(node.attrs),
                                 dict(node.tags))])


class QuantPlugin(Plugin):
    name = "quant"
    description = "int8 / int8-block / W8A8 / int4 / float16 / bfloat16 weights, int8 KV cache"
    order = 60  # after structural rewrites (low rank, sparsity): quantize what remains
    positional = "mode"
    options = {
        "mode": Option("int8", str, "what to quantize (see the module docstring)", MODES),
        "block": Option(32, positive_int, "int8: inputs per scale"),
        "group": Option(32, positive_int, "int4, log4, int2, ternary, binary: inputs per scale (must divide each "
                        "layer's inputs)"),
        "kv": Option("none", str, "int8: also keep the KV cache in int8", ("none", "int8")),
        "embeddings": Option("auto", _table_format, "integer modes: embedding tables as int8 | int4 | false "
                             "(auto: int4 in mode int4, else int8)", ("auto", "int8", "int4", "false", "true")),
        "skip": Option("", str, "node-name glob patterns to leave alone, separated by |"),
        **Tolerance.options(),
        "qat": Option(False, boolean, "int8/int8_channel/w8a8/int4/LUT modes: fake_quant nodes over float weights, for training "
                                      "(minitx qat)"),
        "layers": Option((), _layer_modes, "per-layer modes: GLOB:MODE|GLOB:MODE (node-name globs; first match wins)"),
        "sensitive": Option(0.0, fraction, "fraction of the block linears, most sensitive first (measured on the "
                                           "calibration inputs), given mode high"),
        "high": Option("int8", str, "mode of the sensitive layers", WEIGHT_MODES),
    }
    exact = False

    def modes(self, opts: Mapping[str, Any]) -> set[str]:
        """Every weight mode these options can give a layer."""
        return ({opts["mode"]} | {m for _, m in opts.get("layers") or ()}
                | ({opts["high"]} if opts.get("sensitive") else set()))

    def check_options(self, opts: Mapping[str, Any]) -> None:
        modes = self.modes(opts)
        if ("int4" in modes or opts["embeddings"] == "int4") and opts["group"] % 2:
            raise MinitxError(f"group size {opts['group']} must be even (two 4-bit values per byte)")
        if modes == {"none"} and opts["kv"] == "none":
            raise MinitxError("mode=none quantizes nothing; add kv=int8")
        if opts["sensitive"] and opts["mode"] in ("kv8", "none"):
            raise MinitxError(f"sensitive= ranks layers by their error in the base mode; mode={opts['mode']} has none")
        if opts.get("qat") and opts["sensitive"]:
            raise MinitxError("qat=true with sensitive=: the packed model would re-measure the fine-tuned weights "
                              "and may promote other layers; pass the measured choice as layers=GLOB:MODE")
        if opts.get("qat") and (not modes - {"none"} <= set(QAT_MODES) or opts["kv"] != "none"):
            raise MinitxError(f"qat=true supports the modes {', '.join(QAT_MODES)} without kv=int8, "
                              f"not {', '.join(sorted(modes - set(QAT_MODES) - {'none'}))}"
                              + (f", kv={opts['kv']}" if opts["kv"] != "none" else ""))

    def tolerance(self, opts: Mapping[str, Any]) -> Tolerance:
        parts = [TOLERANCE[m] for m in sorted(self.modes(opts))]
        if opts["kv"] == "int8":
            parts.append(TOLERANCE["kv8"])
        if opts.get("embeddings") == "int4":  # int4 tables (and tied head) in another mode
            parts.append(TOLERANCE["int4"])
        return Tolerance.loosest(*parts).override(opts)

    def rules(self, opts: Mapping[str, Any]) -> list[Rule]:
        if opts.get("qat"):
            return [Rule("quant.qat_linear", "linear", _qat_linear_rule),
                    Rule("quant.qat_embedding", "embedding", _qat_embedding_rule),
                    Rule("quant.qat_lm_head", "matmul", _qat_lm_head_rule)]
        return [Rule("quant.linear", "linear", _linear_rule), Rule("quant.lowrank", "lowrank_linear", _lowrank_rule),
                Rule("quant.sparse_linear", "sparse_linear", _compact_rule), Rule("quant.nm_linear", "nm_linear", _compact_rule),
                Rule("quant.embedding", "embedding", _embedding_rule),
                Rule("quant.lm_head", "matmul", _lm_head_rule), Rule("quant.kv_cache", "attention", _kv_rule),
                Rule("quant.kv_cache", "sparse_attention", _kv_rule), Rule("quant.cross_kv", "split", _cross_kv_rule),
                Rule("quant.kv_cache", "concat", _self_kv_rule), Rule("quant.kv8_read", "cross_attention", _kv8_read_rule)]

    def uses_calibration(self, opts: Mapping[str, Any]) -> bool:
        return bool(opts.get("sensitive"))

    def analyze(self, graph, params: Mapping[str, np.ndarray], opts: Mapping[str, Any],
                calib: CalibrationData | None = None) -> QuantPlan:
        """With ``sensitive=F``: measure :func:`output_errors` of every block linear left to the base
        mode (not skipped, not named by ``layers=``) and promote the ``ceil(F · n)`` worst to ``high``."""
        if not opts.get("sensitive"):
            return QuantPlan()
        from .sparsity import block_linears

        fixed = {n.name for n in graph.nodes for pat, _ in opts.get("layers") or () if fnmatch.fnmatchcase(n.name, pat)}
        nodes = [n for n in block_linears(graph) if n.name not in fixed and not _skipped(n, opts)]
        if not nodes:
            return QuantPlan()
        if calib is None or not calib.sequences:
            raise MinitxError("quant: sensitive= measures each layer on calibration sequences; apply it with "
                              "minitx.plugin.optimize (or `minitx optimize --calib ...`), which passes them")
        by_weight = output_errors(graph, params, {n.inputs[1]: _qat_weight_attrs(
            opts, opts["mode"], params[n.inputs[1]].shape[0]) for n in nodes}, calib.sequences)
        errors = {n.name: by_weight[n.inputs[1]] for n in nodes}
        k = int(np.ceil(opts["sensitive"] * len(nodes)))
        worst = sorted(errors, key=lambda name: -errors[name])[:k]
        return QuantPlan(errors, frozenset(worst))


def plugin() -> QuantPlugin:
    """Entry point ``minitx.plugins: quant``."""
    return QuantPlugin()
