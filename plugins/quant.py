"""Quantization plugin: weights (and optionally the KV cache) in fewer bits, as graph rewrites.

    minitx optimize model.npz --plugin quant:int8 -o model.q8.npz

Modes (the shorthand ``quant:MODE``):

==============  ==============================================================================
``int8``        int8 weight-only, one scale per output channel (``linear_q8``)
``int8_block``  int8 weight-only, one scale per ``block`` inputs, like llama.cpp Q8_0
``w8a8``        int8 weights per channel + int8 activations quantized per token at run time
``int4``        4-bit weights, one scale per ``group`` inputs, two values per byte
``float16``     weights cast to float16; ``bfloat16`` likewise (stored as uint16 bit patterns)
``kv8``         only the KV cache in int8 (per token and head); ``kv=int8`` adds it to any mode
``none``        no weight quantization (with ``kv=int8``)
==============  ==============================================================================

In the integer modes embedding tables become int8 with a scale per row (``embeddings=false``
keeps them float); a table tied to the LM head is quantized once and feeds both. Every rewrite is
approximate and validated against the declared tolerance (``min_cosine=`` overrides it).
"""
from __future__ import annotations

import fnmatch
from typing import Any, Mapping

import numpy as np

from minitx.errors import MinitxError
from minitx.ir import Node, Value
from minitx.ops import quant as Q
from minitx.plugin import Option, Plugin, Tolerance, boolean, fraction, positive_int
from minitx.rewrite import Context, Replacement, Rule

MODES = ("int8", "int8_block", "w8a8", "int4", "float16", "bfloat16", "kv8", "none")
INTEGER_MODES = ("int8", "int8_block", "w8a8", "int4")
# Declared minimum cosine (per row of the primary output) of each mode against the float model.
MIN_COSINE = {"int8": 0.999, "int8_block": 0.999, "w8a8": 0.99, "int4": 0.97, "float16": 0.9999,
              "bfloat16": 0.999, "kv8": 0.999, "none": 1.0}


def _skipped(node: Node, opts: Mapping[str, Any]) -> bool:
    pats = [p for p in str(opts.get("skip") or "").split("|") if p]
    return any(fnmatch.fnmatchcase(node.name, p) for p in pats)


def _linear_rule(node: Node, ctx: Context) -> Replacement | None:
    opts = ctx.options
    mode = opts["mode"]
    if mode in ("kv8", "none") or _skipped(node, opts):
        return None
    x, w, *rest = node.inputs
    b = rest[0] if rest else ""
    if not ctx.is_param(w):
        return None
    W = ctx.param(w).astype(np.float32)
    n_in = W.shape[0]
    attrs: dict[str, Any] = {}
    if mode == "int8":
        q, s = Q.quantize_per_channel(W)
        op, ins = "linear_q8", [q, s]
    elif mode == "w8a8":
        q, s = Q.quantize_per_channel(W)
        op, ins = "linear_w8a8", [q, s]
    elif mode == "int8_block":
        k = opts["block"]
        if n_in % k:
            raise MinitxError(f"quant: block size {k} does not divide the {n_in} input features of {node.name} "
                              f"(weight {w} {tuple(W.shape)})")
        q, s = Q.quantize_blocks(W, k)
        op, ins, attrs = "linear_q8_block", [q, s], {"block": k}
    elif mode == "int4":
        k = opts["group"]
        if n_in % k:
            raise MinitxError(f"quant: group size {k} does not divide the {n_in} input features of {node.name} "
                              f"(weight {w} {tuple(W.shape)})")
        q, s = Q.quantize_int4(W, k)
        op, ins, attrs = "linear_q4", [q, s], {"group": k}
    elif mode == "float16":
        op, ins = "linear_cast", [W.astype(np.float16)]
    else:  # bfloat16
        op, ins = "linear_cast", [Q.to_bfloat16_bits(W)]
    names = [ctx.add_param(f"{w}.q", ins[0])] + ([ctx.add_param(f"{w}.scale", ins[1])] if len(ins) > 1 else [])
    new = Node(node.name, op, [x, *names, b], list(node.outputs), attrs, dict(node.tags))
    return Replacement([new])


def _table(ctx: Context, name: str) -> tuple[str, str]:
    """The int8 form of an embedding table (quantized once per run, shared by its readers)."""
    key = f"quant.table:{name}"
    if key not in ctx.memo:
        q, s = Q.quantize_per_channel(ctx.param(name).astype(np.float32), axis=1)
        ctx.memo[key] = (ctx.add_param(f"{name}.q", q), ctx.add_param(f"{name}.scale", s))
    return ctx.memo[key]


def _embeddings_wanted(node: Node, opts: Mapping[str, Any]) -> bool:
    return opts["mode"] in INTEGER_MODES and opts["embeddings"] and not _skipped(node, opts)


def _embedding_rule(node: Node, ctx: Context) -> Replacement | None:
    ids, table = node.inputs
    if not _embeddings_wanted(node, ctx.options) or not ctx.is_param(table):
        return None
    q, s = _table(ctx, table)
    return Replacement([Node(node.name, "embedding_q8", [ids, q, s], list(node.outputs), {}, dict(node.tags))])


def _lm_head_rule(node: Node, ctx: Context) -> Replacement | None:
    """logits = x Eᵀ with a (tied) table E: read the int8 table as a transposed per-channel linear."""
    x, table = node.inputs
    if not node.attrs.get("transpose_b") or not ctx.is_param(table) or not _embeddings_wanted(node, ctx.options):
        return None
    if len(ctx.graph.params[table].shape) != 2:
        return None
    q, s = _table(ctx, table)
    return Replacement([Node(node.name, "linear_q8", [x, q, s], list(node.outputs), {"transposed": True},
                             dict(node.tags))])


def _kv_rule(node: Node, ctx: Context) -> Replacement | None:
    """attention over a float cache → attention_kv8 over an int8 cache with per-token/head scales."""
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
    new = Node(node.name, "attention_kv8", [q, k, v, pk, names["k"], pv, names["v"], mask], outs,
               dict(node.attrs), dict(node.tags))
    graph_outs = [o for o in (f"{present_k}_scale", f"{present_v}_scale")] if present_k in ctx.graph.outputs else []
    return Replacement([new], inputs=new_inputs, outputs=graph_outs)


class QuantPlugin(Plugin):
    name = "quant"
    description = "int8 / int8-block / W8A8 / int4 / float16 / bfloat16 weights, int8 KV cache"
    order = 60  # after structural rewrites (low rank, sparsity): quantize what remains
    positional = "mode"
    options = {
        "mode": Option("int8", str, "what to quantize (see the module docstring)", MODES),
        "block": Option(32, positive_int, "int8_block: inputs per scale"),
        "group": Option(32, positive_int, "int4: inputs per scale (even; must divide each layer's inputs)"),
        "kv": Option("none", str, "int8: also keep the KV cache in int8", ("none", "int8")),
        "embeddings": Option(True, boolean, "integer modes: quantize embedding tables too (per row)"),
        "skip": Option("", str, "node-name glob patterns to leave alone, separated by |"),
        "min_cosine": Option(None, fraction, "override the declared minimum cosine"),
    }
    exact = False

    def check_options(self, opts: Mapping[str, Any]) -> None:
        if opts["mode"] == "int4" and opts["group"] % 2:
            raise MinitxError(f"group size {opts['group']} must be even (two 4-bit values per byte)")
        if opts["mode"] == "none" and opts["kv"] == "none":
            raise MinitxError("mode=none quantizes nothing; add kv=int8")

    def tolerance(self, opts: Mapping[str, Any]) -> Tolerance:
        if opts.get("min_cosine") is not None:
            return Tolerance(min_cosine=float(opts["min_cosine"]))
        c = MIN_COSINE[opts["mode"]]
        if opts["kv"] == "int8":
            c = min(c, MIN_COSINE["kv8"])
        return Tolerance(min_cosine=c)

    def rules(self, opts: Mapping[str, Any]) -> list[Rule]:
        return [Rule("quant.linear", "linear", _linear_rule), Rule("quant.embedding", "embedding", _embedding_rule),
                Rule("quant.lm_head", "matmul", _lm_head_rule), Rule("quant.kv_cache", "attention", _kv_rule)]


def plugin() -> QuantPlugin:
    """Entry point ``minitx.plugins: quant``."""
    return QuantPlugin()
