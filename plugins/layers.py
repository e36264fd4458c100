"""Layers plugin: remove whole Transformer blocks, the ones the model misses least.

    minitx optimize model.npz --plugin layers:drop=3 --calib file:text.txt -o model.3of6.npz
    minitx optimize model.npz --plugin layers:keep=3,by=alternate -o student.npz
    minitx distill model.npz --student student.npz --data text.txt -o recovered.npz

A block (every node tagged with one ``layer``) maps the residual stream it reads to the one it
writes; dropping it feeds its input straight to whatever read its output (its KV cache inputs
and outputs go too, so a decoder still generates). Which blocks go (``by``):

``importance``  measured: each block is dropped alone and the primary output (a decoder's logits,
                an encoder's embedding) compared with the full model's on the calibration input
                (``--calib``; seeded random tokens without it), as 1 − mean per-row cosine; the
                blocks with the smallest error go (:func:`importance`)
``alternate``   evenly spaced: of L blocks keep round((j+1)·L/k) − 1 for j < k (every other one
                for k = L/2), the last block always kept

The result is a smaller model built from the teacher's own layers, which is what a distillation
student should start from: ``minitx distill TEACHER --student FILE`` trains it on the graph it has.
Dropping blocks is lossy by nature — half of MiniLM's layers gone leaves embeddings far from the
original — so the rewrite declares no bound by default: ``optimize`` validates it and reports
the error (mean cosine, and KL and perplexity for decoders) for information, and the model needs
recovery by distillation. The bounds can still be set (``min_cosine=``, ``max_kl=``, …).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from minitx.errors import MinitxError
from minitx.executor import Executor
from minitx.ir import Graph, Node
from minitx.plugin import CalibrationData, Option, Plugin, Tolerance
from minitx.rewrite import Firing, RewriteResult, check

BY = ("importance", "alternate")


def count(s: str) -> int:
    v = int(s)
    if v < 0:
        raise ValueError("must be an integer >= 0")
    return v


@dataclass(frozen=True)
class Block:
    """One Transformer block: its layer index, its nodes, the residual value it reads and the one it writes."""

    layer: int
    nodes: tuple[str, ...]
    source: str
    result: str


def blocks(graph: Graph) -> list[Block]:
    """The graph's blocks in layer order. A block's input is the first operand of its first
    residual add (``layers.i.res1``); its output the one value its nodes produce that anything
    outside the block reads (KV cache outputs aside)."""
    by_layer: dict[int, list[Node]] = {}
    for n in graph.nodes:
        if "layer" in n.tags:
            by_layer.setdefault(int(n.tags["layer"]), []).append(n)
    out = []
    for i in sorted(by_layer):
        nodes = by_layer[i]
        names = {n.name for n in nodes}
        produced = {o for n in nodes for o in n.outputs}
        res1 = next((n for n in nodes if n.name == f"layers.{i}.res1" and n.op == "add"), None)
        if res1 is None:
            raise MinitxError(f"layers: block {i} has no residual add 'layers.{i}.res1' to find its input by")
        read_outside = {v for n in graph.nodes if n.name not in names for v in n.inputs if v in produced}
        read_outside |= {o for o in graph.outputs if o in produced and not o.startswith("present.")}
        if len(read_outside) != 1:
            raise MinitxError(f"layers: block {i} does not write one residual stream (it writes "
                              f"{sorted(read_outside) or 'nothing'} for the rest of the graph)")
        out.append(Block(i, tuple(n.name for n in nodes), res1.inputs[0], read_outside.pop()))
    if not out:
        raise MinitxError("layers: the graph has no Transformer blocks (no node is tagged with a layer)")
    return out


def drop_blocks(graph: Graph, params: Mapping[str, np.ndarray], drop: Sequence[int],
                notes: Mapping[int, str] | None = None) -> RewriteResult:
    """``graph`` without the blocks ``drop`` (copies): readers of a dropped block's output read its
    input instead (a graph output it wrote is kept by a ``scale`` by 1), and the KV cache inputs,
    outputs and weights only those blocks used are removed."""
    found = {b.layer: b for b in blocks(graph)}
    missing = [i for i in drop if i not in found]
    if missing:
        raise MinitxError(f"layers: no block {missing[0]} (the graph has blocks {', '.join(map(str, sorted(found)))})")
    if len(set(drop)) >= len(found):
        raise MinitxError(f"layers: cannot drop all {len(found)} blocks (keep at least one)")
    g = graph.copy()
    gone = {name for i in drop for name in found[i].nodes}
    alias: dict[str, str] = {}
    keep_as_output: dict[str, Block] = {}
    for i in sorted(drop):
        b = found[i]
        if b.result in g.outputs:
            keep_as_output[b.result] = b
        else:
            alias[b.result] = b.source

    def resolve(v: str) -> str:
        while v in alias:
            v = alias[v]
        return v

    firings, nodes = [], []
    for n in g.nodes:
        if n.name in gone:
            b = keep_as_output.get(n.outputs[0]) if n.outputs else None
            if b is not None and n.outputs[0] == b.result:
                nodes.append(Node(f"layers.{b.layer}.dropped", "scale", [resolve(b.source)], [b.result],
                                  {"factor": 1.0}, {"rule": "layers.drop"}))
            continue
        nodes.append(Node(n.name, n.op, [resolve(v) if v else v for v in n.inputs], list(n.outputs),
                          dict(n.attrs), dict(n.tags)))
    for i in sorted(drop):
        b = found[i]
        firings.append(Firing("layers.drop", f"layers.{i}", "block" + (f" ({notes[i]})" if notes and i in notes else ""),
                              [f"layers.{i}.dropped"] if b.result in keep_as_output else [],
                              ["scale"] if b.result in keep_as_output else [], 0))
    g.nodes = nodes
    produced = {o for n in nodes for o in n.outputs}
    used = {v for n in nodes for v in n.inputs if v}
    g.outputs = [o for o in g.outputs if o in produced]
    g.inputs = [v for v in g.inputs if v.name in used]
    g.params = {k: v for k, v in g.params.items() if k in used}
    p = {k: a for k, a in params.items() if k in g.params}
    check(g, p, "plugin layers")
    return RewriteResult(g, p, firings, 1)


def _primary(graph: Graph) -> str:
    return "embedding" if "embedding" in graph.outputs else "logits" if "logits" in graph.outputs else graph.outputs[0]


def importance(graph: Graph, params: Mapping[str, np.ndarray], sequences: Sequence[Sequence[int]]) -> dict[int, float]:
    """Per block, the error of dropping it alone: 1 − mean per-row cosine of the primary output
    (logits per token, or the sentence embedding) against the full model's, over ``sequences``."""
    from minitx import feeds

    out = _primary(graph)

    def outputs(g: Graph, p: Mapping[str, np.ndarray]) -> np.ndarray:
        ex = Executor(g, p)
        rows = [ex.run(feeds.build(g, np.asarray([list(s)], np.int64)), outputs=[out])[out] for s in sequences]
        return np.concatenate([r.reshape(-1, r.shape[-1]).astype(np.float64) for r in rows])

    ref = outputs(graph, params)
    ref_n = np.linalg.norm(ref, axis=1)
    errs = {}
    for b in blocks(graph):
        res = drop_blocks(graph, params, [b.layer])
        got = outputs(res.graph, res.params)
        cos = (ref * got).sum(axis=1) / np.maximum(ref_n * np.linalg.norm(got, axis=1), 1e-30)
        errs[b.layer] = float(1.0 - cos.mean())
    return errs


def alternate(layers: Sequence[int], keep: int) -> list[int]:
    """Evenly spaced blocks to keep, the last included (every other one when keep = L/2)."""
    L = len(layers)
    return sorted({layers[max(round((j + 1) * L / keep) - 1, 0)] for j in range(keep)})


@dataclass(frozen=True)
class LayersPlan:
    """What :meth:`LayersPlugin.analyze` decided: the blocks to drop and, measured, each block's error alone."""

    drop: tuple[int, ...]
    errors: dict[int, float] | None = None


class LayersPlugin(Plugin):
    name = "layers"
    description = "drop whole Transformer blocks by measured importance (lossy: recover with distill --student)"
    order = 10           # before pruning and quantization, which then work on the blocks that remain
    positional = "drop"
    exact = False
    options = {
        "drop": Option(0, count, "blocks to remove"),
        "keep": Option(0, count, "blocks to keep (instead of drop=)"),
        "by": Option("importance", help="which blocks go: least important measured on --calib, or evenly spaced",
                     choices=BY),
        **Tolerance.options(),
    }

    def check_options(self, opts: Mapping[str, Any]) -> None:
        if bool(opts["drop"]) == bool(opts["keep"]):
            raise MinitxError("give one of drop=N or keep=N (N >= 1)")

    def uses_calibration(self, opts: Mapping[str, Any]) -> bool:
        return opts["by"] == "importance"

    def tolerance(self, opts: Mapping[str, Any]) -> Tolerance:
        # No bound by default: validation measures and reports the loss, recovery is distillation's job.
        return Tolerance().override(opts)

    def analyze(self, graph: Graph, params: Mapping[str, np.ndarray], opts: Mapping[str, Any],
                calib: CalibrationData | None = None) -> LayersPlan:
        layers = [b.layer for b in blocks(graph)]
        keep = opts["keep"] or len(layers) - opts["drop"]
        if not 1 <= keep < len(layers):
            raise MinitxError(f"layers: the graph has {len(layers)} blocks; "
                              + (f"keep={opts['keep']}" if opts["keep"] else f"drop={opts['drop']}")
                              + f" must leave between 1 and {len(layers) - 1} of them")
        if opts["by"] == "alternate":
            kept = alternate(layers, keep)
            return LayersPlan(tuple(i for i in layers if i not in kept))
        if calib is None or not calib.sequences:
            raise MinitxError("layers: by=importance measures each block on calibration input; apply it with "
                              "minitx.plugin.optimize (or `minitx optimize --calib ...`), which passes it")
        errs = importance(graph, params, calib.sequences)
        order = sorted(layers, key=lambda i: (errs[i], i))
        return LayersPlan(tuple(sorted(order[:len(layers) - keep])), errs)

    def rules(self, opts: Mapping[str, Any]) -> list:
        return []    # one whole-graph surgery (apply), not node-by-node rules

    def apply(self, graph: Graph, params: Mapping[str, np.ndarray], opts: Mapping[str, Any], *,
              calib: CalibrationData | None = None) -> RewriteResult:
        plan = self.analyze(graph, params, opts, calib)
        notes = {i: f"error alone {e:.4g}" for i, e in plan.errors.items()} if plan.errors else None
        return drop_blocks(graph, params, plan.drop, notes)


def plugin() -> LayersPlugin:
    """Entry point ``minitx.plugins: layers``."""
    return LayersPlugin()
