"""Pipeline-parallel training: stages, micro-batches and their schedule (GPipe or 1F1B).

A schedule is data: for each stage, the list of what it runs, in order — ``("F", k)`` the forward
pass of micro-batch k, ``("B", k)`` its backward pass. :func:`gpipe` runs every forward, then
every backward, so a stage holds the inputs of all K micro-batches at once; :func:`one_f_one_b`
(PipeDream-Flush, Narayanan et al., 2021) lets stage s run ``P − s − 1`` forwards ahead, then
alternates one forward and one backward, so it never holds more than ``P − s`` (at most P)
micro-batches, whatever K. :func:`in_flight` reads that peak off a schedule.

The stages come from the parallel rewrite (``plugins/parallel.py``, ``pp=P``): stage s's program
is rank s's part of the SPMD training graph, its ``send_recv`` receives made graph inputs and its
sends graph outputs. A stage that is not the last ends with ``loss = Σ inner(x, dx)`` over the
values x it sends, ``dx`` being the cotangent the next stage sends back: one backward pass from
that scalar is the stage's VJP (the gradient of its weights, and of the values it received, which
it sends back in turn). A stage keeps only its inputs between the forward and the backward pass
of a micro-batch and recomputes its activations in the backward pass (activation recomputation
at the stage boundary, as Megatron-LM offers).

The same :class:`Pipeline` runs the stages in one process (a mailbox stands for the network,
each stage running its next step as soon as what it needs has arrived) or one stage per MPI
process (``transport``: sends and receives with deadlines, so a dead stage is an error, never a
hang).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import MinitxError
from ..ir import Graph, Node, Value

Step = tuple[str, int]
SCHEDULES = ("1f1b", "gpipe")


def gpipe(stages: int, micro: int) -> list[list[Step]]:
    """Every forward, then every backward (last micro-batch first, as the gradients come back)."""
    return [[("F", k) for k in range(micro)] + [("B", k) for k in reversed(range(micro))] for _ in range(stages)]


def one_f_one_b(stages: int, micro: int) -> list[list[Step]]:
    """1F1B: stage s warms up with ``min(P − s − 1, K)`` forwards, then alternates F and B, then
    drains the remaining backwards."""
    out = []
    for s in range(stages):
        warm = min(stages - s - 1, micro)
        steps: list[Step] = [("F", k) for k in range(warm)]
        for i in range(micro - warm):
            steps += [("F", warm + i), ("B", i)]
        steps += [("B", k) for k in range(micro - warm, micro)]
        out.append(steps)
    return out


def schedule(kind: str, stages: int, micro: int) -> list[list[Step]]:
    if kind not in SCHEDULES:
        raise MinitxError(f"--parallel schedule must be one of {', '.join(SCHEDULES)}, got {kind!r}")
    return (gpipe if kind == "gpipe" else one_f_one_b)(stages, micro)


def in_flight(steps: Sequence[Step]) -> int:
    """The most micro-batches one stage holds at once (forward done, backward not yet)."""
    held, peak = set(), 0
    for what, k in steps:
        if what == "F":
            held.add(k)
            peak = max(peak, len(held))
        else:
            held.discard(k)
    return peak


def timeline(plan: Sequence[Sequence[Step]], forward: int = 1, backward: int = 1) -> list[dict[int, Step]]:
    """When each stage runs each step, if a forward takes ``forward`` ticks and a backward
    ``backward``: stage s starts a step once its previous step is done and what it needs has
    arrived (F of micro-batch k from stage s − 1, B of k from stage s + 1, or its own F of k on the
    last stage). Returns, per stage, tick → step; the makespan is the last tick + its duration."""
    P = len(plan)
    done: dict[tuple[int, str, int], int] = {}
    free = [0] * P
    pos = [0] * P
    out: list[dict[int, Step]] = [{} for _ in range(P)]
    while any(pos[s] < len(plan[s]) for s in range(P)):
        progressed = False
        for s in range(P):
            if pos[s] == len(plan[s]):
                continue
            what, k = plan[s][pos[s]]
            need = ((s - 1, "F", k) if s > 0 else None) if what == "F" else \
                ((s + 1, "B", k) if s < P - 1 else (s, "F", k))
            if need is not None and need not in done:
                continue
            start = max(free[s], done.get(need, 0) if need else 0)
            out[s][start] = (what, k)
            free[s] = done[(s, what, k)] = start + (forward if what == "F" else backward)
            pos[s] += 1
            progressed = True
        if not progressed:
            raise MinitxError("pipeline: the schedule deadlocks (no stage can run its next step)")
    return out


def symbolic_shapes(graph: Graph) -> dict[str, tuple]:
    """Every value's shape with the input dims kept symbolic (``B``, ``T``, ``S+T``): inferred at two
    bindings, a dim that moves with them named after the symbol it follows."""
    a = {"B": 2, "T": 3, "S": 11}
    b = {"B": 5, "T": 7, "S": 13}
    ea, eb = graph.infer(a), graph.infer(b)
    names = {(a["B"], b["B"]): "B", (a["T"], b["T"]): "T", (a["S"], b["S"]): "S",
             (a["S"] + a["T"], b["S"] + b["T"]): "S+T"}
    out = {}
    for v, (sa, dt) in ea.items():
        sb = eb[v][0]
        out[v] = (tuple(x if x == y else names.get((x, y), "?") for x, y in zip(sa, sb)), dt)
    return out


@dataclass
class Stage:
    """One stage's programs: ``forward`` (its outputs are what it sends) and ``train`` (outputs
    ``loss``; on a stage that is not the last it also reads the cotangents ``<x>.cot``)."""

    index: int
    forward: Graph
    train: Graph
    params: dict[str, np.ndarray]
    recv: list[tuple[str, str, int]] = field(default_factory=list)    # (message key, value, from stage)
    send: list[tuple[str, str, int]] = field(default_factory=list)    # (message key, value, to stage)


def stages(graph: Graph, params: Mapping[str, np.ndarray], pp: int, only: int | None = None) -> list[Stage | None]:
    """The ``pp`` stages of the training graph ``graph`` (output ``loss``); weights under their own
    names. With ``only``, the other stages are None (one process per stage)."""
    from ..plugins.parallel import Layout, shard
    from .program import rank_program

    g, p = shard(graph, params, Layout(1, pp), only_rank=only)
    shapes = symbolic_shapes(g)
    out: list[Stage | None] = []
    for s in range(pp):
        if only is not None and s != only:
            out.append(None)
            continue
        prog = rank_program(g, p, s)
        nodes, inputs, recv, send = [], list(prog.graph.inputs), [], []
        for n in prog.graph.nodes:
            if n.op != "send_recv":
                nodes.append(n)
            elif int(n.attrs["dst"]) == s:
                recv.append((n.name, n.outputs[0], int(n.attrs["src"])))
                shape, dt = shapes[n.outputs[0]]
                inputs.append(Value(n.outputs[0], shape, dt))
            else:
                send.append((n.name, n.inputs[0], int(n.attrs["dst"])))
        own = {k: k.rsplit("@", 1)[0] for k in prog.graph.params}      # the stage's weights under the model's names
        for n in nodes:
            n.inputs = [own.get(i, i) for i in n.inputs]
        ps = {own[k]: Value(own[k], v.shape, v.dtype) for k, v in prog.graph.params.items()}
        arrays = {own[k]: a for k, a in prog.params.items()}
        sent = list(dict.fromkeys(x for _, x, _ in send))
        fwd = Graph(list(inputs), sent or ["loss"], ps, list(nodes), dict(prog.graph.meta))
        if sent:
            tnodes, tin, terms = list(nodes), list(inputs), []
            for i, x in enumerate(sent):
                shape, dt = shapes[x] if x in shapes else shapes[_base(x)]
                tin.append(Value(f"{x}.cot", shape, dt))
                terms.append(f"loss.inner{i}")
                tnodes.append(Node(f"{x}.inner", "inner", [x, f"{x}.cot"], [terms[-1]], {}, {"stage": s}))
            acc = terms[0]
            for i, t in enumerate(terms[1:]):
                tnodes.append(Node(f"loss.sum{i}", "add", [acc, t], [f"loss.acc{i}"], {}, {"stage": s}))
                acc = f"loss.acc{i}"
            for n in tnodes:
                n.outputs = ["loss" if o == acc else o for o in n.outputs]
            train = Graph(tin, ["loss"], ps, tnodes, dict(prog.graph.meta))
        else:
            train = Graph(list(inputs), ["loss"], ps, list(nodes), dict(prog.graph.meta))
        for gr in (fwd, train):
            gr.validate()
        out.append(Stage(s, fwd, train, arrays, recv, send))
    return out


def _base(v: str) -> str:
    return v.rsplit("@", 1)[0]


def split_feeds(feeds: Mapping[str, np.ndarray], micro: int) -> list[dict[str, np.ndarray]]:
    """The batch's inputs cut into ``micro`` micro-batches along the batch axis."""
    n = min(len(a) for a in feeds.values())
    if n < micro:
        raise MinitxError(f"--parallel mb={micro}: a batch of {n} cannot be cut into {micro} micro-batches")
    out: list[dict[str, np.ndarray]] = [{} for _ in range(micro)]
    for k, a in feeds.items():
        for i, piece in enumerate(np.array_split(a, micro)):
            out[i][k] = piece
    return out


class Pipeline:
    """Runs a schedule over the stages: all of them in one process, or the stage ``rank`` alone
    with ``transport`` carrying the activations and cotangents (see the module docstring)."""

    def __init__(self, stage_list: Sequence[Stage | None], kind: str, micro: int,
                 backends: Sequence[Any] = ("numpy",), transport: Any = None, rank: int | None = None) -> None:
        from ..executor import Executor

        self.stages = list(stage_list)
        self.P, self.K = len(self.stages), micro
        self.plan = schedule(kind, self.P, micro)
        self.transport, self.rank = transport, rank
        mine = range(self.P) if rank is None else [rank]
        self.ex = {s: (Executor(self.stages[s].forward, self.stages[s].params, backends),
                       Executor(self.stages[s].train, self.stages[s].params, backends)) for s in mine}
        self.peak_held: dict[int, int] = {}

    def forward_backward(self, feeds: Mapping[str, np.ndarray], step: int = 0, loss_grad: float = 1.0):
        """One pass of the schedule over the batch ``feeds``: the loss (on the last stage; 0 on the
        others) and the weight gradients of this process's stages, summed over micro-batches."""
        from ..executor import TrainResult

        micro = split_feeds(feeds, self.K)
        counts = [max(int((m["targets"] != -100).sum()), 0) if "targets" in m else len(m) for m in micro]
        total = max(sum(counts), 1)
        weights = [c / total for c in counts]
        mail: dict[tuple[str, int], np.ndarray] = {}
        held: dict[int, dict[int, dict[str, np.ndarray]]] = {s: {} for s in self.ex}
        grads: dict[int, dict[str, np.ndarray]] = {}     # per stage, summed over its micro-batches
        loss, peak = 0.0, 0
        pos = {s: 0 for s in self.ex}

        def ready(s: int, what: str, k: int) -> bool:
            if self.transport is not None:
                return True
            st = self.stages[s]
            if what == "F":
                return all((key, k) in mail for key, _, _ in st.recv)
            return all((f"{key}.cot", k) in mail for key, _, _ in st.send)

        def take(key: str, k: int, src: int) -> np.ndarray:
            if self.transport is None:
                return mail.pop((key, k))
            return self.transport.send_recv(None, src=src, dst=self.rank)

        def give(key: str, k: int, value: np.ndarray, dst: int) -> None:
            if self.transport is None:
                mail[(key, k)] = value
            else:
                self.transport.send_recv(value, src=self.rank, dst=dst)

        while any(pos[s] < len(self.plan[s]) for s in self.ex):
            progressed = False
            for s in self.ex:
                if pos[s] == len(self.plan[s]):
                    continue
                what, k = self.plan[s][pos[s]]
                if not ready(s, what, k):
                    continue
                st = self.stages[s]
                fwd, train = self.ex[s]
                if what == "F":
                    inp = {v.name: micro[k][v.name] for v in st.forward.inputs if v.name in micro[k]}
                    for key, v, src in st.recv:
                        inp[v] = take(key, k, src)
                    held[s][k] = inp
                    self.peak_held[s] = max(self.peak_held.get(s, 0), len(held[s]))
                    if st.send:
                        out = fwd.run(inp, outputs=[x for _, x, _ in st.send])
                        for key, x, dst in st.send:
                            give(key, k, out[x], dst)
                else:
                    inp = dict(held[s].pop(k))
                    for key, x, dst in st.send:
                        inp[f"{x}.cot"] = take(f"{key}.cot", k, dst)
                    recv_names = [v for _, v, _ in st.recv]
                    seed = loss_grad * weights[k] if not st.send else 1.0
                    res = train.forward_backward(inp, step=step, wrt=[*st.train.params, *recv_names], loss_grad=seed)
                    if not st.send:
                        loss += weights[k] * float(res.outputs["loss"])
                    for name, g in res.grads.items():
                        if name in st.train.params:
                            mine = grads.setdefault(s, {})
                            mine[name] = g if name not in mine else mine[name] + g
                    for key, v, src in st.recv:
                        give(f"{key}.cot", k, res.grads.get(v, np.zeros_like(inp[v])), src)
                    peak = max(peak, res.peak_activation_bytes)
                pos[s] += 1
                progressed = True
            if not progressed:
                raise MinitxError("pipeline: the schedule deadlocks (no stage can run its next step)")
        total: dict[str, np.ndarray] = {}
        for s in sorted(grads):        # stage by stage, as an all-reduce over the stages adds them
            for name, g in grads[s].items():
                total[name] = g if name not in total else total[name] + g
        return TrainResult({"loss": np.float32(loss)}, total, peak, 0)
