"""One rank's part of an SPMD graph, and the model a rank runs across processes.

The parallel plugin writes every rank's computation into one graph (plugins/parallel.py). Across
processes each rank runs only its part: :func:`rank_program` keeps the nodes tagged with its rank,
keeps its slot of each collective (one input, one output: the transport computes it), turns a
``send_recv`` into a send on the source rank and a receive on the destination, and gives the
rank the edge of the graph it owns — its slice of each KV cache as ``past.*``/``present.*`` (each
rank keeps its own cache between steps), and the outputs its stage computes under their own names.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from ..errors import MinitxError
from ..ir import Graph, Node, Value
from ..model import Model


def _rank_of(name: str) -> int | None:
    head, sep, tail = name.rpartition("@")
    return int(tail) if sep and tail.isdigit() else None


@dataclass
class RankProgram:
    graph: Graph
    params: dict[str, np.ndarray]
    # The model's outputs (not the caches) that pipeline stages must share, with the rank that
    # computes each: every rank needs the logits to pick the same next token.
    shared: dict[str, int] = field(default_factory=dict)


def rank_program(graph: Graph, params: Mapping[str, np.ndarray], rank: int) -> RankProgram:
    """Rank ``rank``'s part of the SPMD graph ``graph`` (see the module docstring)."""
    info = graph.meta.get("parallel")
    if not info:
        raise MinitxError("rank_program: the graph is not sharded (apply the parallel plugin first)")
    if not 0 <= rank < int(info["world"]):
        raise MinitxError(f"rank_program: rank {rank} is outside a world of {info['world']}")
    rename: dict[str, str] = {}
    inputs = {v.name: v for v in graph.inputs}
    new_inputs: dict[str, Value] = {n: v for n, v in inputs.items() if not n.startswith("past.")}
    outputs: list[str] = []
    producer_rank: dict[str, int | None] = {}
    nodes: list[Node] = []
    shapes = graph.infer({"B": 1, "T": 1, "S": 1, "E": 1})
    for n in graph.nodes:
        tags = n.tags
        if "rank" in tags:
            for o in n.outputs:
                producer_rank[o] = int(tags["rank"])
            if int(tags["rank"]) == rank:
                nodes.append(Node(n.name, n.op, list(n.inputs), list(n.outputs), dict(n.attrs), dict(tags)))
        elif n.op == "send_recv":
            src, dst = int(n.attrs["src"]), int(n.attrs["dst"])
            producer_rank[n.outputs[0]] = dst
            if rank == src:
                nodes.append(Node(n.name, n.op, list(n.inputs), [], dict(n.attrs), dict(tags)))
            elif rank == dst:
                nodes.append(Node(n.name, n.op, [], list(n.outputs), dict(n.attrs), dict(tags)))
        elif "ranks" in tags:
            group = [int(r) for r in tags["ranks"]]
            for o, r in zip(n.outputs, group):
                producer_rank[o] = r
            if rank in group:
                k = group.index(rank)
                # one input per rank, then any the ranks share (vocab_cross_entropy's targets)
                nodes.append(Node(n.name, n.op, [n.inputs[k], *n.inputs[len(group):]], [n.outputs[k]], dict(n.attrs),
                                  dict(tags)))
        elif tags.get("interface") and n.op == "split":        # a KV cache cut per rank: ours is an input
            src = inputs[n.inputs[0]]
            for o in n.outputs:
                producer_rank[o] = _rank_of(o)
                if _rank_of(o) == rank:
                    rename[o] = src.name
                    new_inputs[src.name] = Value(src.name, (*src.shape[:-1], shapes[o][0][-1]), src.dtype)
        elif tags.get("interface") and n.op == "concat":       # the ranks' new caches: ours is an output
            for i in n.inputs:
                if _rank_of(i) == rank:
                    rename[i] = n.outputs[0]
                    outputs.append(n.outputs[0])
            producer_rank[n.outputs[0]] = None
        else:
            raise MinitxError(f"rank_program: node {n.name} belongs to no rank")
    # Past caches the rank reads without a split (tp = 1): the whole cache is the rank's.
    for n in nodes:
        for i in n.inputs:
            if i in inputs and i.startswith("past."):
                new_inputs[i] = inputs[i]
    for n in nodes:
        n.inputs = [rename.get(i, i) for i in n.inputs]
        n.outputs = [rename.get(o, o) for o in n.outputs]
    produced = {o for n in nodes for o in n.outputs}
    shared: dict[str, int] = {}
    stages = int(info.get("pp", 1))
    for o in graph.outputs:
        if o in outputs:
            continue
        if not o.startswith("present.") and stages > 1:
            owner = producer_rank.get(o)
            if owner is None:
                raise MinitxError(f"rank_program: no rank computes output {o!r}")
            shared[o] = owner
        mine = f"{o}@{rank}"
        if o in produced:
            outputs.append(o)
        elif mine in produced:                   # the stage's other ranks hold a copy of a replicated result
            for n in nodes:
                n.outputs = [o if x == mine else x for x in n.outputs]
                n.inputs = [o if x == mine else x for x in n.inputs]
            outputs.append(o)
    used = {i for n in nodes for i in n.inputs if i}
    keep_inputs = [v for name, v in new_inputs.items() if not name.startswith("past.") or name in used]
    g = Graph(keep_inputs, outputs, {k: v for k, v in graph.params.items() if k in used}, nodes,
              {**graph.meta, "rank": rank})
    g.validate()
    return RankProgram(g, {k: params[k] for k in g.params}, shared)


def trainable(graph: Graph) -> Graph:
    """A rank's program whose point-to-point transfers carry gradients back (training across
    processes; ring attention's K/V blocks). The executor runs a node's VJP only when the node has
    an input and an output on a path to the loss, so: a send passes its value through
    (``x`` → ``x.sent``, which this rank's later nodes read instead: the VJP adds the cotangent the
    receiver sends back), and a receive reads this rank's own value of the same name (the VJP
    sends the cotangent of what it received back to the sender, and gives that input zero)."""
    nodes = [Node(n.name, n.op, list(n.inputs), list(n.outputs), dict(n.attrs), dict(n.tags)) for n in graph.nodes]
    rank = int(graph.meta["rank"])
    produced: set[str] = {v.name for v in graph.inputs} | set(graph.params)
    for k, n in enumerate(nodes):
        if n.op == "send_recv" and int(n.attrs["src"]) == rank and not n.outputs:
            x = n.inputs[0]
            n.outputs = [f"{x}.sent"]
            for later in nodes[k + 1:]:
                later.inputs = [f"{x}.sent" if i == x else i for i in later.inputs]
        elif n.op == "send_recv" and int(n.attrs["dst"]) == rank and not n.inputs:
            sends = str(n.tags.get("sends", ""))
            own = next((c for c in (f"{sends}@{rank}", sends) if c in produced), None)
            if own is None:
                raise MinitxError(f"rank_program: rank {rank} receives {n.outputs[0]} with no value of its own to "
                                  "carry the gradient back (training through this transfer is not supported)")
            n.inputs = [own]
        produced.update(n.outputs)
    g = Graph(list(graph.inputs), list(graph.outputs), dict(graph.params), nodes, dict(graph.meta))
    g.validate()
    return g


class RankExecutor:
    """An executor for one rank's program that hands every rank the model's outputs: an output a
    later pipeline stage computes (the logits) is broadcast from its rank, so that every rank
    samples the same next token. A failure on this rank (a peer that never answers) aborts the
    whole MPI job, so that no rank waits for it."""

    def __init__(self, inner, shared: Mapping[str, int], transport) -> None:
        self.inner = inner
        self.shared = dict(shared)
        self.transport = transport

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def run(self, feeds: Mapping[str, Any], outputs: Iterable[str] | None = None, keep: Iterable[str] = (),
            device_outputs: Iterable[str] = ()) -> dict[str, Any]:
        try:
            return self._run(feeds, outputs, keep, device_outputs)
        except MinitxError as e:
            from . import abort_on_error

            abort_on_error(self.transport.comm, str(e))
            raise

    def _run(self, feeds, outputs, keep, device_outputs) -> dict[str, Any]:
        mine = set(self.inner.graph.outputs)
        wanted = list(outputs) if outputs is not None else [*self.inner.graph.outputs,
                                                           *(o for o in self.shared if o not in mine)]
        out = self.inner.run(feeds, outputs=[o for o in wanted if o in mine], keep=keep,
                             device_outputs=device_outputs)
        for o in sorted(o for o in wanted if o in self.shared):   # the same order on every rank
            out[o] = self.transport.share(out.get(o), self.shared[o])
        return out


class RankModel(Model):
    """A :class:`Model` whose graph is one rank's program; its executors run the collectives on
    ``transport`` (first in the backend list) and share outputs between stages (:class:`RankExecutor`).
    An encoder–decoder asks it for its two parts' executors (:meth:`part_executors`)."""

    transport: Any = None
    shared: Any = None
    sharded: Any = None      # the whole SPMD graph the rank's program was cut from

    def executor(self, backends: Sequence[Any] = ("numpy",), strict: bool = False, last_logits: bool = False):
        # last_logits is not applied to a rank's program (a sharded head ends in collectives):
        # every position's logits come back, and the last is among them
        key = (tuple(b if isinstance(b, str) else b.name for b in backends), strict)
        ex = self._executors.get(key)
        if ex is None:
            ex = self._executors[key] = self._rank_executor(self.graph, self.shared, backends, strict)
        return ex

    def part_executors(self, split: Callable[[Graph], tuple[Graph, Graph]], backends: Sequence[Any] = ("numpy",),
                       strict: bool = False) -> tuple[RankExecutor, RankExecutor]:
        """Executors for this rank's encoder and decoder parts (:func:`minitx.seq2seq.executors`).
        The whole sharded graph is cut first, then each part into this rank's program: so the
        encoder part holds every transfer of encoder states between pipeline stages (a rank's own
        program has sends without outputs, which no cut would place). Each rank keeps its own
        cross-attention K/V (nothing shared after the encoder); the decoder reads only its own."""
        rank = int(self.graph.meta["rank"])
        parts = split(self.sharded)
        enc, dec = (rank_program(p, self.params, rank) for p in parts)
        others = set(parts[0].outputs) - set(enc.graph.outputs)
        g = dec.graph
        g = Graph([v for v in g.inputs if v.name not in others], g.outputs, g.params, g.nodes, g.meta)
        g.validate()
        return (self._rank_executor(enc.graph, {}, backends, strict),
                self._rank_executor(g, dec.shared, backends, strict))

    def _rank_executor(self, graph: Graph, shared: Mapping[str, int], backends: Sequence[Any],
                       strict: bool) -> RankExecutor:
        from ..executor import Executor
        from .nccl import placement

        # The MPI transport first, or NCCL fused with the cupy backend when it runs on GPUs.
        inner = Executor(graph, self.params, placement(self.transport, backends), strict)
        return RankExecutor(inner, shared, self.transport)
