"""Activation checkpointing: trade backward-pass compute for activation memory, as a rewrite.

    minitx optimize model.npz --plugin recompute:sqrt -o model.ckpt.npz

The rewrite only tags nodes ``{"recompute": True}``: the executor drops a tagged node's outputs
after the forward pass and recomputes them when the backward pass first needs them
(minitx/executor.py). Untagged values are the checkpoints kept. Policies (``recompute:POLICY``):

* ``every``     — checkpoint every layer: keep each layer's output (the residual stream), recompute
  everything inside the layer except the attention node's output (``attention=recompute`` drops
  that too, at the cost of redoing attention, the costliest node). It does not always lower the
  peak: it saves one (B, T, d) value per layer during the forward, but in the backward a
  recomputed layer then holds its q/k/v, the recomputed attention output and their gradients at
  once. Measured (executor's peak activation bytes, GPT-2-style): 12 layers x 64 tokens
  (d 128, batch 4) 8.0 MiB against ``every``'s 8.5; 4 layers x 256 tokens (d 64, batch 2) 5.25
  against 4.75. It pays with many layers and short sequences; measure before choosing it;
* ``every_k``   — keep only every ``k``-th layer's output (``k=`` option): segments of k layers;
* ``sqrt``      — segments of ⌈√n⌉ layers (the classic O(√n) memory schedule);
* ``selective`` — recompute only the attention nodes (scores and softmax live inside the one
  attention node here), keeping everything else.

The rewrite is exact: the same ops run on the same values, so gradients equal the un-rewritten
graph's to float rounding (in practice bit for bit); validation checks that.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from minitx.ir import Node
from minitx.plugin import Option, Plugin, Tolerance, positive_int
from minitx.rewrite import Context, Replacement, Rule

POLICIES = ("every", "every_k", "sqrt", "selective")
ATTENTION_OPS = ("attention", "attention_kv8", "sparse_attention", "nystrom_attention")


def segment_length(policy: str, n_layers: int, k: int) -> int:
    """Layers per checkpoint segment for a policy (0 for ``selective``, which has no segments)."""
    if policy == "every":
        return 1
    if policy == "every_k":
        return k
    if policy == "sqrt":
        return max(1, math.ceil(math.sqrt(n_layers)))
    return 0


def _kept(ctx: Context) -> set[str]:
    """Names of the nodes whose outputs stay as checkpoints: the last node of each segment."""
    key = "recompute.kept"
    if key not in ctx.memo:
        opts = ctx.options
        layers = ctx.layers()
        seg = segment_length(opts["policy"], len(layers), opts["k"])
        last: dict[int, str] = {}
        for n in ctx.graph.nodes:
            if "layer" in n.tags:
                last[int(n.tags["layer"])] = n.name
        # The segment ends at every seg-th layer (and the final layer).
        ends = {layers[i] for i in range(len(layers)) if (i + 1) % seg == 0 or i == len(layers) - 1} if seg else set()
        ctx.memo[key] = {last[i] for i in ends}
    return ctx.memo[key]


def _rule(node: Node, ctx: Context) -> Replacement | None:
    if node.tags.get("recompute") or "layer" not in node.tags:
        return None
    opts = ctx.options
    if opts["policy"] == "selective":
        wanted = node.op in ATTENTION_OPS
    else:
        wanted = node.name not in _kept(ctx) and not (opts["attention"] == "keep" and node.op in ATTENTION_OPS)
    if not wanted:
        return None
    return Replacement([Node(node.name, node.op, list(node.inputs), list(node.outputs), dict(node.attrs),
                             {**node.tags, "recompute": True})])


class RecomputePlugin(Plugin):
    name = "recompute"
    description = "activation checkpointing: every layer, every k layers, sqrt(n) segments, or attention only"
    order = 90  # last: it tags whatever nodes the other rewrites left
    positional = "policy"
    options = {
        "policy": Option("sqrt", str, "which activations to recompute", POLICIES),
        "k": Option(2, positive_int, "every_k: layers per segment"),
        "attention": Option("keep", str, "segment policies: keep attention outputs (one row of d_model per "
                            "token; the op is the costliest to recompute) or recompute them too",
                            ("keep", "recompute")),
    }
    exact = True

    def tolerance(self, opts: Mapping[str, Any]) -> Tolerance:
        return Tolerance(exact=True)

    def rules(self, opts: Mapping[str, Any]) -> list[Rule]:
        return [Rule(f"recompute.{opts['policy']}", "*", _rule, exact=True)]


def plugin() -> RecomputePlugin:
    """Entry point ``minitx.plugins: recompute``."""
    return RecomputePlugin()
