"""The graph IR: typed values, op nodes in topological order, named parameters.

A graph is plain data — it serialises to JSON and back losslessly — so that rewrites, model files
and backends all see the same thing. Input shapes may be symbolic (``"B"``, ``"T"``, ``"S"``);
shapes of everything else are inferred per op once the symbols are bound.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from . import ops
from .errors import MinitxError, ShapeError

Dim = int | str


@dataclass
class Value:
    name: str
    shape: tuple[Dim, ...]
    dtype: str = "float32"

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, d: dict) -> "Value":
        return cls(d["name"], tuple(d["shape"]), d["dtype"])


@dataclass
class Node:
    name: str
    op: str
    inputs: list[str]  # "" marks an absent optional input
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)  # passed to the op as keyword arguments
    # Hints for the executor and for reports, never seen by the op: "layer" (index of the block the
    # node belongs to), "recompute" (drop the outputs after the forward pass and recompute them
    # when the backward pass needs them), "rule" (which rewrite produced the node).
    tags: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        d = {"name": self.name, "op": self.op, "inputs": list(self.inputs), "outputs": list(self.outputs),
             "attrs": _jsonable(self.attrs)}
        if self.tags:
            d["tags"] = _jsonable(self.tags)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Node":
        return cls(d["name"], d["op"], list(d["inputs"]), list(d["outputs"]), dict(d.get("attrs", {})),
                   dict(d.get("tags", {})))


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


@dataclass
class Graph:
    inputs: list[Value]
    outputs: list[str]
    params: dict[str, Value]
    nodes: list[Node]
    meta: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ structure
    def producers(self) -> dict[str, Node]:
        return {o: n for n in self.nodes for o in n.outputs}

    def consumers(self) -> dict[str, list[Node]]:
        out: dict[str, list[Node]] = {}
        for n in self.nodes:
            for i in n.inputs:
                if i:
                    out.setdefault(i, []).append(n)
        return out

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def validate(self) -> None:
        """Structural invariants: known ops, arity, defined-before-use, single assignment."""
        defined = {v.name for v in self.inputs} | set(self.params)
        if len(defined) != len(self.inputs) + len(self.params):
            raise MinitxError("graph: an input and a parameter share a name")
        names = set()
        for n in self.nodes:
            spec = ops.get(n.op)
            if n.name in names:
                raise MinitxError(f"graph: duplicate node name {n.name!r}")
            names.add(n.name)
            for i in n.inputs:
                if i and i not in defined:
                    raise MinitxError(f"graph: node {n.name} ({n.op}) reads {i!r} before it is defined")
            n_in = spec.n_inputs
            if not (n_in - spec.n_optional <= len(n.inputs) <= n_in):
                raise MinitxError(f"graph: node {n.name} ({n.op}) has {len(n.inputs)} inputs, expected {n_in}")
            for o in n.outputs:
                if o in defined:
                    raise MinitxError(f"graph: value {o!r} is assigned twice (node {n.name})")
                defined.add(o)
        for o in self.outputs:
            if o not in defined:
                raise MinitxError(f"graph: output {o!r} is never computed")

    # ------------------------------------------------------------------ shapes
    def infer(self, bindings: dict[str, int] | None = None) -> dict[str, tuple[tuple[int, ...], str]]:
        """Concrete (shape, dtype) of every value, with symbolic input dims bound to integers."""
        bindings = bindings or {}
        env: dict[str, tuple[tuple[int, ...], str]] = {}
        for v in self.inputs:
            env[v.name] = (bind_shape(v.shape, bindings, v.name), v.dtype)
        for name, v in self.params.items():
            env[name] = (tuple(v.shape), v.dtype)
        for n in self.nodes:
            spec = ops.get(n.op)
            ins = [env[i] if i else (None, None) for i in n.inputs]
            ins += [(None, None)] * (spec.n_inputs - len(ins))
            try:
                outs = spec.infer([s for s, _ in ins], [d for _, d in ins], **n.attrs)
            except ShapeError as e:
                raise ShapeError(f"node {n.name}: {e}") from None
            for o, sd in zip(n.outputs, outs):
                env[o] = (tuple(int(x) for x in sd[0]), str(np.dtype(sd[1])))
        return env

    # ------------------------------------------------------------------ serialisation
    def to_json(self) -> str:
        return json.dumps({
            "inputs": [v.to_json() for v in self.inputs],
            "outputs": self.outputs,
            "params": [v.to_json() for v in self.params.values()],
            "nodes": [n.to_json() for n in self.nodes],
            "meta": _jsonable(self.meta),
        })

    @classmethod
    def from_json(cls, text: str) -> "Graph":
        d = json.loads(text)
        return cls(
            inputs=[Value.from_json(v) for v in d["inputs"]],
            outputs=list(d["outputs"]),
            params={v["name"]: Value.from_json(v) for v in d["params"]},
            nodes=[Node.from_json(n) for n in d["nodes"]],
            meta=d.get("meta", {}),
        )

    def copy(self) -> "Graph":
        return Graph.from_json(self.to_json())


def bind_shape(shape: Iterable[Dim], bindings: dict[str, int], what: str = "value") -> tuple[int, ...]:
    """Resolve symbolic dims; a dim may be a sum of symbols such as ``"S+T"``."""
    out = []
    for d in shape:
        if isinstance(d, str):
            try:
                d = sum(bindings[s.strip()] for s in d.split("+"))
            except KeyError as e:
                raise MinitxError(f"graph: {what} has symbolic dim {e.args[0]!r} with no binding") from None
        out.append(int(d))
    return tuple(out)


def symbols(graph: Graph) -> set[str]:
    return {s.strip() for v in graph.inputs for d in v.shape if isinstance(d, str) for s in d.split("+")}


class Builder:
    """Writes a graph the way one writes the model's math: ``h = b.op("gelu", x)``."""

    def __init__(self) -> None:
        self.graph = Graph([], [], {}, [])
        self._counts: dict[str, int] = {}

    def input(self, name: str, shape: Iterable[Dim], dtype: str = "float32") -> str:
        self.graph.inputs.append(Value(name, tuple(shape), dtype))
        return name

    def param(self, name: str, shape: Iterable[int], dtype: str = "float32") -> str:
        self.graph.params[name] = Value(name, tuple(shape), dtype)
        return name

    def op(self, op: str, *inputs: str | None, name: str | None = None, outputs: Iterable[str] | None = None,
           n_out: int = 1, tags: dict | None = None, **attrs: Any) -> Any:
        """Append a node; returns its output name (or a tuple of names when it has several)."""
        if name is None:
            k = self._counts.get(op, 0)
            self._counts[op] = k + 1
            name = f"{op}_{k}"
        outs = list(outputs) if outputs is not None else (
            [name] if n_out == 1 else [f"{name}:{i}" for i in range(n_out)])
        self.graph.nodes.append(Node(name, op, [i or "" for i in inputs], outs, attrs, dict(tags or {})))
        return outs[0] if len(outs) == 1 else tuple(outs)

    def output(self, *names: str) -> None:
        self.graph.outputs.extend(names)
