"""Graph rewrites: pattern → replacement rules over the IR, applied to a fixed point.

Optimizations are rewrites (principle 3). A :class:`Rule` targets one op name; its function looks
at a matching node (and, through the :class:`Context`, at the whole graph and the weights) and
returns a :class:`Replacement` or ``None`` for "no match". :func:`apply` sweeps the graph, splicing
each replacement in place of the node it replaces, until a sweep changes nothing — the fixed
point — and records every firing. After every sweep the graph must still pass
``graph.validate()`` and ``graph.infer()``, and the weights must match the declared parameters:
a broken rule is caught at the pass that broke the graph, not later at run time.

The contract a rule keeps:

* the replacement's nodes compute the matched node's outputs **under the same value names**
  (other nodes, graph outputs and per-layer reports keep referring to them); it may add new
  intermediate values, new parameters (``Context.add_param``), new graph inputs/outputs (a
  quantized KV cache), or change the dtype of a graph input it now reads differently;
* parameters nobody reads any more are dropped after the sweep (an fp32 weight replaced by its
  int8 form disappears from the file);
* a rule must not match its own output (return ``None`` once a node is done, e.g. check a tag),
  or the fixed point is never reached — :func:`apply` stops with an error after ``max_passes``.

Whether a rewrite is *exact* (recompute tags, fusions: results equal to rounding) or
*approximate* (quantization, low rank, sparsity: within a declared tolerance) is declared on the
rule; :mod:`minitx.validate` checks the claim numerically against the spec.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from .errors import MinitxError
from .ir import Graph, Node, Value, symbols


@dataclass
class Replacement:
    """What a rule returns: nodes that replace the matched node (in this order).

    ``inputs`` adds graph inputs or redeclares existing ones (e.g. the KV cache becoming int8);
    ``outputs`` appends graph outputs. New parameters are registered through
    :meth:`Context.add_param`, not here. An empty ``nodes`` list is allowed only when the
    matched node's outputs are produced elsewhere (rare).
    """

    nodes: list[Node]
    inputs: list[Value] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Rule:
    """``fn(node, ctx) -> Replacement | None`` applied to every node whose op is ``op``.

    ``exact``: the rewrite preserves results up to float rounding (else it is approximate and
    validated against a tolerance). ``op="*"`` targets every node.
    """

    name: str
    op: str
    fn: Callable[[Node, "Context"], Replacement | None]
    exact: bool = False


@dataclass
class Firing:
    """One entry of the firing log: ``rule`` replaced ``node`` (an ``op``) by ``new_nodes``."""

    rule: str
    node: str
    op: str
    new_nodes: list[str]
    new_ops: list[str]
    pass_index: int

    def as_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "node": self.node, "op": self.op, "new_nodes": self.new_nodes,
                "new_ops": self.new_ops, "pass": self.pass_index}


class Context:
    """What a rule sees: the graph being rewritten, the weights, and helpers to add to them;
    ``options`` are the user's (parsed) plugin options, ``plan`` what the plugin's analysis of the
    whole graph decided before the rules ran (:meth:`minitx.plugin.Plugin.analyze`; None if none)."""

    def __init__(self, graph: Graph, params: dict[str, np.ndarray], options: Mapping[str, Any] | None = None,
                 memo: dict[str, Any] | None = None, plan: Any = None) -> None:
        self.graph = graph
        self.params = params
        self.options = dict(options or {})
        self.plan = plan
        # Scratch space kept for the whole apply() run (all passes): e.g. a tied weight quantized
        # once and shared by the two nodes that read it.
        self.memo: dict[str, Any] = memo if memo is not None else {}
        self._names = {n.name for n in graph.nodes} | {o for n in graph.nodes for o in n.outputs} | set(
            params) | {v.name for v in graph.inputs}
        self._pending_params: dict[str, Value] = {}
        self._consumers: dict[str, list[Node]] | None = None
        self._producers: dict[str, Node] | None = None

    # ---- reading
    def is_param(self, name: str) -> bool:
        return bool(name) and name in self.graph.params

    def param(self, name: str) -> np.ndarray:
        return self.params[name]

    def consumers(self, value: str) -> list[Node]:
        """Nodes reading ``value`` (as of the start of this sweep, plus nothing spliced since)."""
        if self._consumers is None:
            self._consumers = self.graph.consumers()
        return self._consumers.get(value, [])

    def producer(self, value: str) -> Node | None:
        if self._producers is None:
            self._producers = self.graph.producers()
        return self._producers.get(value)

    def layers(self) -> list[int]:
        """Sorted distinct ``layer`` tags in the graph (the blocks of a Transformer)."""
        return sorted({int(n.tags["layer"]) for n in self.graph.nodes if "layer" in n.tags})

    def shapes(self, bindings: Mapping[str, int] | None = None) -> dict[str, tuple[tuple[int, ...], str]]:
        """Concrete (shape, dtype) per value, symbolic dims bound to 1 unless given."""
        b = {s: 1 for s in symbols(self.graph)}
        b.update(bindings or {})
        return self.graph.infer(b)

    # ---- writing
    def fresh(self, base: str) -> str:
        """A name not used by any node, value, input or parameter (``base`` itself if free)."""
        name = base
        for k in itertools.count(1):
            if name not in self._names:
                break
            name = f"{base}.{k}"
        self._names.add(name)
        return name

    def add_param(self, name: str, array: np.ndarray) -> str:
        """Register a new weight (any dtype: int8, uint8, float16…); returns its (fresh) name."""
        name = self.fresh(name)
        a = np.ascontiguousarray(array)
        self.params[name] = a
        self._pending_params[name] = Value(name, tuple(int(d) for d in a.shape), str(a.dtype))
        return name

    def node(self, op: str, inputs: Iterable[str | None], outputs: Iterable[str] | None = None, *,
             name: str, tags: Mapping[str, Any] | None = None, n_out: int = 1, **attrs: Any) -> Node:
        """A new node with a fresh name (and fresh output names unless ``outputs`` is given)."""
        name = self.fresh(name)
        if outputs is None:
            outputs = [name] if n_out == 1 else [self.fresh(f"{name}:{i}") for i in range(n_out)]
        else:
            outputs = list(outputs)
            for o in outputs:
                self._names.add(o)
        return Node(name, op, [i or "" for i in inputs], outputs, dict(attrs), dict(tags or {}))


@dataclass
class RewriteResult:
    graph: Graph
    params: dict[str, np.ndarray]
    firings: list[Firing]
    passes: int

    def counts(self) -> dict[str, int]:
        """How often each rule fired."""
        out: dict[str, int] = {}
        for f in self.firings:
            out[f.rule] = out.get(f.rule, 0) + 1
        return out


def check(graph: Graph, params: Mapping[str, np.ndarray], where: str = "") -> None:
    """Structural invariants of a (rewritten) graph with its weights; raises MinitxError."""
    prefix = f"{where}: " if where else ""
    try:
        graph.validate()
        graph.infer({s: 2 for s in symbols(graph)})
    except MinitxError as e:
        raise MinitxError(f"{prefix}rewritten graph is invalid: {e}") from None
    for name, v in graph.params.items():
        a = params.get(name)
        if a is None:
            raise MinitxError(f"{prefix}parameter {name!r} is declared but has no weights")
        if tuple(a.shape) != tuple(v.shape) or str(a.dtype) != v.dtype:
            raise MinitxError(f"{prefix}parameter {name!r} is {a.dtype}{tuple(a.shape)}, declared "
                              f"{v.dtype}{tuple(v.shape)}")
    extra = set(params) - set(graph.params)
    if extra:
        raise MinitxError(f"{prefix}weights {sorted(extra)[:3]} are not parameters of the graph")


def _same(a: Node, b: Node) -> bool:
    return a.to_json() == b.to_json()


def apply(graph: Graph, params: Mapping[str, np.ndarray], rules: Iterable[Rule], *,
          options: Mapping[str, Any] | None = None, plan: Any = None, max_passes: int = 16,
          where: str = "rewrite") -> RewriteResult:
    """Apply ``rules`` to a copy of ``graph``/``params`` until none fires; the inputs are untouched.

    In each sweep every node is offered to the rules targeting its op, in rule order; the first
    rule returning a replacement wins and the sweep moves on past the new nodes. Sweeps repeat
    until one changes nothing. ``options`` is handed to rules as ``ctx.options``, ``plan`` as
    ``ctx.plan``.
    """
    rules = list(rules)
    g = graph.copy()
    p = dict(params)
    check(g, p, where)
    firings: list[Firing] = []
    by_op: dict[str, list[Rule]] = {}
    for r in rules:
        by_op.setdefault(r.op, []).append(r)
    memo: dict[str, Any] = {}
    for pass_index in range(max_passes):
        ctx = Context(g, p, options, memo, plan)
        changed = False
        new_nodes: list[Node] = []
        for node in g.nodes:
            rep = None
            for rule in by_op.get(node.op, []) + by_op.get("*", []):
                rep = rule.fn(node, ctx)
                if rep is None or (len(rep.nodes) == 1 and _same(rep.nodes[0], node) and not rep.inputs
                                   and not rep.outputs):
                    rep = None
                    continue
                produced = {o for n in rep.nodes for o in n.outputs}
                missing = [o for o in node.outputs if o not in produced]
                if missing:
                    raise MinitxError(f"{where}: rule {rule.name} on node {node.name} does not produce "
                                      f"{missing[0]!r}, which the matched node did")
                for n in rep.nodes:
                    if n.name != node.name and n.name in {m.name for m in g.nodes}:
                        raise MinitxError(f"{where}: rule {rule.name} reuses node name {n.name!r}")
                    if rule.name and "rule" not in n.tags and not _same(n, node):
                        n.tags = {**n.tags, "rule": rule.name}
                firings.append(Firing(rule.name, node.name, node.op, [n.name for n in rep.nodes],
                                      [n.op for n in rep.nodes], pass_index))
                break
            if rep is None:
                new_nodes.append(node)
                continue
            changed = True
            new_nodes.extend(rep.nodes)
            for v in rep.inputs:  # redeclare in place, or append a new graph input
                names = [x.name for x in g.inputs]
                if v.name in names:
                    g.inputs[names.index(v.name)] = v
                else:
                    g.inputs.append(v)
            for o in rep.outputs:
                if o not in g.outputs:
                    g.outputs.append(o)
        g.nodes = new_nodes
        g.params.update(ctx._pending_params)
        # Drop weights nobody reads any more.
        used = {i for n in g.nodes for i in n.inputs if i}
        for name in [k for k in g.params if k not in used]:
            del g.params[name]
            p.pop(name, None)
        check(g, p, f"{where} (pass {pass_index + 1})")
        if not changed:
            return RewriteResult(g, p, firings, pass_index + 1)
    raise MinitxError(f"{where}: no fixed point after {max_passes} passes — a rule keeps matching its own output")
