"""Attention plugin: softmax attention replaced by linear (kernel) attention.

    minitx optimize model.npz --plugin attention:map=elu -o model.linear.npz --force
    minitx optimize model.npz --plugin attention:map=favor,features=64,seed=0 -o model.favor.npz --force
    minitx optimize bert.npz --plugin attention:map=linformer,k=64 -o bert.linformer.npz --force

Every ``attention`` node (causal or not, with its KV cache inputs) becomes ``linear_attention``
(spec: minitx/ops/linear_attention.py): ``map=elu`` is the linear Transformer's φ(x) = elu(x) + 1;
``map=favor`` is FAVOR+ with ``features`` positive orthogonal random features per head, drawn from
``seed`` (a new seed redraws them; each layer gets its own draw, stored as a parameter
``<node>.favor.proj``, which training leaves fixed).

A decoder's causal attention over a KV cache becomes ``linear_attention_state``: the cache inputs
``past.<i>.k`` / ``past.<i>.v`` are redeclared as the recurrent state S = Σ φ(k) vᵀ (B, Hkv, F, D)
and z = Σ φ(k) (B, Hkv, F), carried by generation like any cache; a decode step costs O(F·D)
per head whatever the length, and the state never grows (tests/test_attention_plugin.py checks
the tokens and logits against causal linear attention recomputed over the whole prefix).

``map=linformer`` (encoders only; a causal model is refused in one line) turns each attention into
``linformer_attention`` (spec: minitx/ops/linformer.py): keys and values projected along the
sequence to ``k`` rows by E, F (k, max length = the position table's rows), parameters
``<node>.linformer.e`` / ``.f`` that training updates. They start as a pooling: exact attention
up to k/2 tokens, block means beyond. On all-MiniLM-L6-v2 that keeps mean cosine 1.000 up to 64
tokens (k=128) but 0.73 (k=64) / 0.84 (k=128) at 65–256 tokens, so it is refused there without a
fine-tune of the whole model; E and F alone, trained layer by layer to each dense attention's
output, did not close that gap (relative error stayed 0.3–0.6). Figures and a recovery on a tiny
encoder: benchmarks/results/attention_recovery.md.

This changes the function — elu+1 is not softmax, FAVOR+ only estimates it — so a trained model
usually falls outside the declared tolerance (perplexity +25%, KL <= 0.25, cosine >= 0.9) and
``minitx optimize`` refuses it unless ``--force``; the rewritten model is then fine-tuned to
recover. Recovery is :func:`minitx.training.fit` (``minitx train``'s loop) on the rewritten graph;
accuracy before and after on the bundled decoder: benchmarks/results/attention_recovery.md
(``benchmarks/attention_recovery.py``).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from minitx.errors import MinitxError
from minitx.ir import Node, Value
from minitx.ops.linear_attention import favor_projection, state_shapes
from minitx.ops.linformer import pooling_projection
from minitx.plugin import Option, Plugin, Tolerance, positive_int
from minitx.rewrite import Context, Replacement, Rule

TOLERANCE = Tolerance(min_cosine=0.9, max_kl=0.25, max_ppl_increase=0.25)


class AttentionPlugin(Plugin):
    name = "attention"
    description = ("linear (kernel) attention: elu+1 or FAVOR+ random features, or Linformer; needs a recovery "
                   "fine-tune")
    order = 32
    positional = None
    exact = False
    options = {
        "map": Option("elu", help="feature map, or linformer", choices=("elu", "favor", "linformer")),
        "features": Option(64, positive_int, "favor: random features per head"),
        "seed": Option(0, int, "favor: seed of the random features (another seed redraws them)"),
        "k": Option(64, positive_int, "linformer: rows the sequence is projected to"),
        **Tolerance.options(),
    }

    def tolerance(self, opts: Mapping[str, Any]) -> Tolerance:
        return TOLERANCE.override(opts)

    def analyze(self, graph, params: Mapping[str, np.ndarray], opts: Mapping[str, Any], calib: Any = None) -> Any:
        """Linformer's E, F span the longest input: the rows of the position-embedding table."""
        if opts["map"] != "linformer":
            return None
        causal = [n.name for n in graph.nodes if n.op == "attention" and n.attrs.get("causal")]
        if causal:
            raise MinitxError(f"attention:map=linformer is bidirectional only (it mixes the whole sequence); "
                              f"{causal[0]} is causal attention: use map=elu or map=favor for a decoder")
        tables = [params[n.inputs[1]] for n in graph.nodes
                  if n.op == "embedding" and n.inputs[0] == "position_ids" and n.inputs[1] in params]
        if not tables:
            raise MinitxError("attention:map=linformer needs a learned position table (its rows bound the "
                              "sequence length E and F span); this model has none")
        return int(tables[0].shape[0])

    def rules(self, opts: Mapping[str, Any]) -> list[Rule]:
        if opts["map"] == "linformer":
            return [Rule("attention.linformer", "attention", _linformer_rule)]
        return [Rule("attention.linear", "attention", _linear_rule)]


def plugin() -> AttentionPlugin:
    """Entry point ``minitx.plugins: attention``."""
    return AttentionPlugin()


def _linear_rule(node: Node, ctx: Context) -> Replacement | None:
    o = ctx.options
    if node.attrs.get("scale") is not None:
        return None  # a custom softmax temperature has no counterpart in the feature maps
    attrs = {k: node.attrs[k] for k in ("n_heads", "n_kv_heads", "causal")}
    attrs["feature"] = o["map"]
    ins = list(node.inputs) + [""] * (6 - len(node.inputs))
    proj = ""
    H, Hkv = int(node.attrs["n_heads"]), int(node.attrs["n_kv_heads"])
    if "attention.shapes" not in ctx.memo:   # before any cache is redeclared: later nodes still read it
        ctx.memo["attention.shapes"] = ctx.shapes()
    D = ctx.memo["attention.shapes"][node.inputs[0]][0][-1] // H
    if o["map"] == "favor":
        layer = int(node.tags.get("layer", 0))
        w = favor_projection(o["features"], D, 1000 * o["seed"] + layer).astype("float32")  # own draw per layer
        proj = ctx.add_param(node.name + ".favor.proj", w)
    name = ctx.fresh(node.name + ".linear")
    graph_in = {v.name: v for v in ctx.graph.inputs}
    pk, pv = ins[3], ins[4]
    if node.attrs["causal"] and pk in graph_in and pv in graph_in:
        # A decoder's KV cache becomes the recurrent state (S, z): same graph inputs/outputs, new
        # shapes, O(1) per decode step and a cache that no longer grows with the length.
        s_shape, z_shape = state_shapes(Hkv, D, o["map"], o["features"])
        dt = graph_in[pk].dtype
        del attrs["causal"]
        return Replacement([Node(name, "linear_attention_state", ins[:6] + [proj], list(node.outputs), attrs,
                                 dict(node.tags))],
                           inputs=[Value(pk, ("B", *s_shape), dt), Value(pv, ("B", *z_shape), dt)])
    return Replacement([Node(name, "linear_attention", ins + ([proj] if proj else []), list(node.outputs), attrs,
                             dict(node.tags))])


def _linformer_rule(node: Node, ctx: Context) -> Replacement | None:
    if node.attrs.get("causal"):
        return None  # refused in analyze()
    ins = list(node.inputs) + [""] * (6 - len(node.inputs))
    if ins[3] or ins[4]:
        return None  # attention over a cache: not an encoder's
    init = pooling_projection(ctx.options["k"], ctx.plan).astype("float32")
    e = ctx.add_param(node.name + ".linformer.e", init)
    f = ctx.add_param(node.name + ".linformer.f", init.copy())
    attrs = {k: node.attrs[k] for k in ("n_heads", "n_kv_heads", "scale") if k in node.attrs}
    return Replacement([Node(ctx.fresh(node.name + ".linformer"), "linformer_attention",
                             ins[:3] + [e, f, ins[5]], list(node.outputs), attrs, dict(node.tags))])
