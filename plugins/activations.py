"""Activation compression: the values the backward pass reads are held in 8 bits, as a rewrite.

    minitx train model.npz --plugin activations:int8 ...      # or fp8, block=64
    minitx train model.npz --plugin activations:int8 --plugin recompute:sqrt ...

The rewrite only tags the nodes inside the layers ``{"save": FORMAT, "save_block": BLOCK}``: the
executor keeps each tagged output a VJP will read compressed (minitx/saved.py: int8 or emulated
float8 e4m3, one float32 scale per ``block`` values) from its last forward reader until the
backward pass first reads it, then decompresses it. Values outside the layers (embeddings, the
final norm, the logits and the loss) stay exact, as do integer values (masks, ids).

What it changes: the forward pass not at all (the loss is bit for bit the exact one, so the
rewrite's validation passes as exact); the backward pass evaluates each VJP at the decompressed
value, so gradients carry a small error, and the peak activation memory falls by the share of
saved float32 values that are compressed (4 bytes become 1 + 4/block). With ``recompute`` the
checkpoints kept are compressed too; recomputed values are exact. The measured effect — peak
activation bytes, gradient cosine against exact training, and the loss curve of a training run
beside exact training — is in benchmarks/results/activation_compression.md.
"""
from __future__ import annotations

from typing import Any, Mapping

from minitx.ir import Node
from minitx.plugin import Option, Plugin, Tolerance, positive_int
from minitx.rewrite import Context, Replacement, Rule
from minitx.saved import FORMATS


def _rule(node: Node, ctx: Context) -> Replacement | None:
    opts = ctx.options
    if "layer" not in node.tags or node.tags.get("save") == opts["format"] and \
            node.tags.get("save_block") == opts["block"]:
        return None
    return Replacement([Node(node.name, node.op, list(node.inputs), list(node.outputs), dict(node.attrs),
                             {**node.tags, "save": opts["format"], "save_block": opts["block"]})])


class ActivationsPlugin(Plugin):
    name = "activations"
    description = "saved activations for the backward pass held in int8 or fp8 (forward exact, gradients approximate)"
    order = 95  # after recompute: it tags whatever nodes are left
    positional = "format"
    options = {
        "format": Option("int8", str, "how saved activations are stored", FORMATS),
        "block": Option(64, positive_int, "values per float32 scale"),
    }
    exact = True   # the forward pass, which is what validation compares; see the module docstring

    def tolerance(self, opts: Mapping[str, Any]) -> Tolerance:
        return Tolerance(exact=True)

    def rules(self, opts: Mapping[str, Any]) -> list[Rule]:
        return [Rule(f"activations.{opts['format']}", "*", _rule, exact=True)]


def plugin() -> ActivationsPlugin:
    """Entry point ``minitx.plugins: activations``."""
    return ActivationsPlugin()
