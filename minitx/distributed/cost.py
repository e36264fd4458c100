"""What a split costs: weight memory per rank, bytes each collective sends, and a latency–bandwidth
model of the time they take.

The bytes are those of the collectives the parallel rewrite actually put in the graph, at the
shapes of a given step. Per collective the model is the textbook ring / tree cost (Thakur,
Rabenseifner & Gropp 2005), with α the per-message latency and β the link bandwidth:

==================  ============================  =========================
collective          bytes each rank sends          messages in sequence
==================  ============================  =========================
all_reduce          2 (n-1)/n · b                  2 (n-1)
all_gather          (n-1) · b   (b: one piece)      n-1
reduce_scatter      (n-1)/n · b                    n-1
all_to_all          (n-1)/n · b                    n-1
broadcast           b                              ⌈log₂ n⌉
send_recv           b                              1
==================  ============================  =========================

time = messages · α + bytes / β.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ..ir import Graph

# A default interconnect for the model: 100 Gb/s Ethernet-class links, 5 µs per message.
ALPHA_S = 5e-6
BETA_BPS = 12.5e9


def sent_bytes(op: str, b: float, n: int) -> float:
    """Bytes each rank sends in one ``op`` over ``n`` ranks whose input is ``b`` bytes per rank."""
    if n <= 1 and op != "send_recv":
        return 0.0
    return {"all_reduce": 2 * (n - 1) / n * b, "all_gather": (n - 1) * b, "reduce_scatter": (n - 1) / n * b,
            "all_to_all": (n - 1) / n * b, "broadcast": b, "send_recv": b}[op]


def messages(op: str, n: int) -> int:
    if n <= 1 and op != "send_recv":
        return 0
    return {"all_reduce": 2 * (n - 1), "all_gather": n - 1, "reduce_scatter": n - 1, "all_to_all": n - 1,
            "broadcast": math.ceil(math.log2(n)), "send_recv": 1}[op]


def seconds(op: str, b: float, n: int, alpha: float = ALPHA_S, beta: float = BETA_BPS) -> float:
    return messages(op, n) * alpha + sent_bytes(op, b, n) / beta


@dataclass
class Comm:
    node: str
    op: str
    ranks: list[int]
    bytes_in: int          # per rank
    bytes_sent: float      # per rank
    seconds: float


def collectives(graph: Graph, bindings: Mapping[str, int], alpha: float = ALPHA_S,
                beta: float = BETA_BPS) -> list[Comm]:
    """Every collective of a sharded graph at these shapes, with its modelled cost."""
    env = graph.infer(dict(bindings))
    out = []
    for n in graph.nodes:
        if "ranks" not in n.tags:
            continue
        shape, dtype = env[n.inputs[0]]
        b = int(np.prod(shape)) * np.dtype(dtype).itemsize
        size = 2 if n.op == "send_recv" else len(n.tags["ranks"])
        out.append(Comm(n.name, n.op, [int(r) for r in n.tags["ranks"]], b, sent_bytes(n.op, b, size),
                        seconds(n.op, b, size, alpha, beta)))
    return out


def param_bytes_per_rank(graph: Graph) -> dict[int, int]:
    out: dict[int, int] = {}
    for name, v in graph.params.items():
        _, sep, r = name.rpartition("@")
        if sep:
            out[int(r)] = out.get(int(r), 0) + int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
    return dict(sorted(out.items()))


def _local(n, rank: int | None) -> tuple[list[str], list[str]]:
    """What node ``n`` of a sharded graph reads and writes on ``rank`` (everything when None)."""
    if rank is None:
        return [i for i in n.inputs if i], list(n.outputs)
    if "rank" in n.tags:
        return ([i for i in n.inputs if i], list(n.outputs)) if int(n.tags["rank"]) == rank else ([], [])
    if n.op == "send_recv":
        return ([n.inputs[0]], []) if int(n.attrs["src"]) == rank else ([], list(n.outputs)) \
            if int(n.attrs["dst"]) == rank else ([], [])
    if "ranks" in n.tags:
        group = [int(r) for r in n.tags["ranks"]]
        return ([n.inputs[group.index(rank)]], [n.outputs[group.index(rank)]]) if rank in group else ([], [])
    if n.op == "concat":                     # the ranks' caches joined at the edge: each keeps its own
        return [i for i in n.inputs if i.endswith(f"@{rank}")], []
    return [], []                            # a cache cut at the edge: the rank's slice is an input


def peak_activation_bytes(graph: Graph, bindings: Mapping[str, int], rank: int | None = None) -> int:
    """The most bytes of node outputs alive at once on ``rank`` (the whole graph when None) when
    ``graph`` runs forward in its order, each value freed after its last local reader (the
    executor's inference policy); weights and graph inputs excluded, graph outputs kept."""
    env = graph.infer(dict(bindings))
    steps = [_local(n, rank) for n in graph.nodes]
    last: dict[str, int] = {}
    for k, (ins, _) in enumerate(steps):
        for i in ins:
            last[i] = k
    keep = set(graph.outputs)
    size = {v: int(np.prod(sh)) * np.dtype(d).itemsize for v, (sh, d) in env.items()}
    alive: set[str] = set()
    live = peak = 0
    for k, (ins, outs) in enumerate(steps):
        for o in outs:
            alive.add(o)
            live += size[o]
        peak = max(peak, live)
        for v in [v for v in (*ins, *outs) if v in alive and v not in keep and last.get(v, -1) <= k]:
            alive.discard(v)
            live -= size[v]
    return peak


def summary(graph: Graph, unsharded_bytes: int, batch: int, seq: int, past: int,
            unsharded: Graph | None = None) -> dict[str, Any]:
    """Per-rank weight memory and peak activation memory (prefill), and, for a prefill of ``seq``
    tokens and for one decode step, the bytes each rank sends per token and the modelled
    communication time."""
    info = graph.meta["parallel"]
    mem = param_bytes_per_rank(graph)
    prefill = {"B": batch, "T": seq, "S": past}
    act = {r: peak_activation_bytes(graph, prefill, r) for r in mem}
    steps = {}
    for what, T, S in (("prefill", seq, past), ("decode", 1, past + seq)):
        comms = collectives(graph, {"B": batch, "T": T, "S": S})
        sent: dict[int, float] = {r: 0.0 for r in mem}
        secs: dict[int, float] = {r: 0.0 for r in mem}
        for c in comms:
            members = c.ranks if c.op != "send_recv" else c.ranks[:1]
            for r in members:
                sent[r] += c.bytes_sent
                secs[r] += c.seconds
        tokens = batch * T
        steps[what] = {"tokens": tokens, "collectives": len(comms),
                       "bytes_sent_per_token": {r: v / tokens for r, v in sent.items()},
                       "comm_seconds_model": secs}
    out = {"layout": {k: info[k] for k in ("tp", "sp", "pp", "mb", "world")}, "unsharded_param_bytes": unsharded_bytes,
           "param_bytes_per_rank": mem, "peak_activation_bytes_per_rank": act, "steps": steps,
           "model": {"alpha_s": ALPHA_S, "beta_bytes_per_s": BETA_BPS}}
    if unsharded is not None:
        out["unsharded_peak_activation_bytes"] = peak_activation_bytes(unsharded, prefill)
    return out


def format_summary(s: dict[str, Any]) -> str:
    L = s["layout"]
    lines = [f"parallel tp={L['tp']} sp={L['sp']} pp={L['pp']} mb={L['mb']} on {L['world']} ranks; cost model "
             f"α={s['model']['alpha_s'] * 1e6:g} µs, β={s['model']['beta_bytes_per_s'] / 1e9:g} GB/s"]
    one = s.get("unsharded_peak_activation_bytes")
    if one is not None:
        lines.append(f"one process: weights {s['unsharded_param_bytes'] / 2**20:.2f} MiB, peak activations "
                     f"{one / 2**20:.2f} MiB (prefill)")
    lines.append(f"{'rank':>4}  {'weights MiB':>11} {'share':>6}  {'act. MiB':>8}  {'prefill B/token':>15} "
                 f"{'decode B/token':>14} {'decode comm µs':>14}")
    for r, b in s["param_bytes_per_rank"].items():
        pf, dc = s["steps"]["prefill"], s["steps"]["decode"]
        lines.append(f"{r:>4}  {b / 2**20:>11.2f} {b / max(s['unsharded_param_bytes'], 1):>6.1%}  "
                     f"{s['peak_activation_bytes_per_rank'][r] / 2**20:>8.2f}  "
                     f"{pf['bytes_sent_per_token'][r]:>15,.0f} {dc['bytes_sent_per_token'][r]:>14,.0f} "
                     f"{dc['comm_seconds_model'][r] * 1e6:>14.1f}")
    return "\n".join(lines)


# ------------------------------------------------------------------ analytic model for many ranks
def predict(config: Mapping[str, Any], tp: int = 1, pp: int = 1, sp: int = 1, *, batch: int = 1, seq: int = 1,
            alpha: float = ALPHA_S, beta: float = BETA_BPS, itemsize: int = 4) -> dict[str, float]:
    """The communication of one forward step of a decoder split ``tp`` × ``pp`` (or ``sp`` × ``pp``),
    from the model's shape alone — the collectives the parallel rewrite inserts, counted the way
    :func:`collectives` counts them on the graph (``tests/test_parallel.py`` checks the two agree),
    so that layouts too large to build (8–1024 ranks) can be predicted.

    Returns the busiest rank's bytes sent per token and modelled seconds per step (what bounds a
    full pipeline's throughput), and the seconds along the path one step takes through all stages
    in turn (a lone decode step's latency).
    """
    from ..plugins.parallel import stage_sizes

    d, L, V = int(config["d_model"]), int(config["n_layers"]), int(config["vocab_size"])
    H = int(config["n_heads"])
    KV = int(config.get("n_kv_heads") or H)
    kv = KV * d // H
    tokens = batch * seq
    piece = -(-seq // sp) * batch                        # the busiest sp rank's tokens
    stages = []
    for st, layers in enumerate(stage_sizes(L, pp)):
        cost = {"bytes": 0.0, "seconds": 0.0}

        def add(op: str, b: float, n: int, times: int = 1) -> None:
            cost["bytes"] += times * sent_bytes(op, b, n)
            cost["seconds"] += times * seconds(op, b, n, alpha, beta)

        last = st == pp - 1
        if tp > 1:
            add("all_reduce", tokens * d * itemsize, tp, 2 * layers + (st == 0))   # two per layer + the embedding
            if last:
                add("all_gather", tokens * (-(-V // tp)) * itemsize, tp)          # the vocabulary's logits
        if sp > 1:
            for width in (d, kv, kv):                                             # q, k, v: tokens → heads
                add("all_to_all", piece * width * itemsize, sp, layers)
            add("all_to_all", tokens * (d // sp) * itemsize, sp, layers)          # the output: heads → tokens
            if last:
                add("all_gather", piece * V * itemsize, sp)
        if not last:
            add("send_recv", (piece if sp > 1 else tokens) * d * itemsize, 2)     # the residual stream on
        stages.append(cost)
    return {"bytes_sent_per_token": max(c["bytes"] for c in stages) / tokens,
            "comm_seconds": max(c["seconds"] for c in stages),
            "comm_seconds_path": sum(c["seconds"] for c in stages), "ranks": tp * sp * pp}
