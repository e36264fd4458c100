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

import functools
import json
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import MinitxError
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
        steps[what] = {"tokens": tokens, "collectives": len(comms), "bytes_sent_per_step": sent,
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
    pf, dc = s["steps"]["prefill"], s["steps"]["decode"]
    lines.append(f"bytes each rank sends: per token and per step, prefill = {pf['tokens']} tokens, decode = "
                 f"{dc['tokens']} token(s)")
    lines.append(f"{'rank':>4}  {'weights MiB':>11} {'share':>6}  {'act. MiB':>8}  {'prefill B/token':>15} "
                 f"{'prefill B/step':>14} {'decode B/token':>14} {'decode comm µs':>14}")
    for r, b in s["param_bytes_per_rank"].items():
        lines.append(f"{r:>4}  {b / 2**20:>11.2f} {b / max(s['unsharded_param_bytes'], 1):>6.1%}  "
                     f"{s['peak_activation_bytes_per_rank'][r] / 2**20:>8.2f}  "
                     f"{pf['bytes_sent_per_token'][r]:>15,.0f} {pf['bytes_sent_per_step'][r]:>14,.0f} "
                     f"{dc['bytes_sent_per_token'][r]:>14,.0f} {dc['comm_seconds_model'][r] * 1e6:>14.1f}")
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


# ------------------------------------------------------------------ a machine, its links, and time
@dataclass(frozen=True)
class Link:
    """A latency–bandwidth (α–β) model of the links a collective uses: a message costs α, a byte 1/β."""
    name: str
    alpha: float            # seconds per message
    beta: float             # bytes per second per rank
    source: str = ""


@dataclass(frozen=True)
class Device:
    """What one rank computes with: a node costs max(FLOPs / flops, bytes / bandwidth) (a roofline)
    plus a fixed dispatch cost; ``flops`` and ``bandwidth`` are sustained rates, not peaks."""
    name: str
    flops: float            # FLOP/s
    bandwidth: float        # bytes/s
    node_overhead: float = 0.0
    source: str = ""


@dataclass(frozen=True)
class Cluster:
    """Ranks on nodes of ``per_node`` devices: a group inside one node uses ``intra``, any other
    ``inter`` (its slowest link). Ranks are numbered tp innermost, then sp, then the stages, then
    data parallelism (Megatron-LM's order), so a tp group of at most ``per_node`` stays in a node."""
    device: Device
    intra: Link
    inter: Link
    per_node: int = 8

    def link(self, ranks: Sequence[int]) -> Link:
        return self.intra if len({int(r) // self.per_node for r in ranks}) <= 1 else self.inter


def fit_link(sizes: Sequence[float], secs: Sequence[float], op: str = "all_reduce", n: int = 2,
             name: str = "measured") -> Link:
    """α and β from measured times of ``op`` over ``n`` ranks for inputs of ``sizes`` bytes per
    rank: α from the small messages (the least time per message of those sending at most 4 KiB),
    β from the three largest (sent bytes over the time α does not explain, their median). Two
    regimes rather than one least-squares line, because on a shared machine a few descheduled
    small messages would otherwise drag β anywhere."""
    m = np.array([messages(op, n) for _ in sizes], float)
    s = np.array([sent_bytes(op, b, n) for b in sizes], float)
    t = np.asarray(secs, float)
    small = s <= 4096
    alpha = float(np.min(t[small] / m[small])) if small.any() else 0.0
    big = np.argsort(s)[-3:]
    beta = float(np.median(s[big] / np.maximum(t[big] - m[big] * alpha, 1e-12)))
    return Link(name, alpha, beta, f"fitted to {len(t)} measured {op} times over {n} ranks")


LOOKUPS = ("embedding", "vocab_embedding")


def node_work(graph: Graph, bindings: Mapping[str, int]) -> list[tuple[Any, float, float]]:
    """(node, FLOPs, bytes read + written) of every compute node — collectives and the layout
    ops at the graph's edge excluded: they are communication, not work."""
    from .. import ops

    env = graph.infer(dict(bindings))
    out = []
    for n in graph.nodes:
        if "ranks" in n.tags or n.op == "send_recv" or n.tags.get("interface"):
            continue
        spec = ops.get(n.op)
        ins = [env[i][0] if i else None for i in n.inputs] + [None] * (spec.n_inputs - len(n.inputs))
        outs = [env[o][0] for o in n.outputs]
        size = {v: int(np.prod(env[v][0])) * np.dtype(env[v][1]).itemsize for v in (*n.inputs, *n.outputs) if v}
        if n.op in LOOKUPS:          # a lookup reads the rows it returns, not the whole table
            size[n.inputs[1]] = sum(size[o] for o in n.outputs)
        out.append((n, float(spec.flops(ins, outs, **n.attrs)), float(sum(size.values()))))
    return out


def compute_seconds(graph: Graph, bindings: Mapping[str, int], device: Device) -> dict[int, float]:
    """Modelled forward compute time per rank (rank 0 alone for an unsharded graph)."""
    out: dict[int, float] = {}
    for n, flops, nbytes in node_work(graph, bindings):
        r = int(n.tags.get("rank", 0))
        out[r] = out.get(r, 0.0) + max(flops / device.flops, nbytes / device.bandwidth) + device.node_overhead
    return out


# ------------------------------------------------------------------ graph-derived model of a layout
def _standins(graph: Graph) -> dict[str, np.ndarray]:
    """Weights of the right shape that take no memory: the rewrite only needs their shapes."""
    return {k: np.broadcast_to(np.zeros((), v.dtype), v.shape) for k, v in graph.params.items()}


@dataclass
class RankCost:
    """One rank's share of one forward step of a layout (what :func:`layout_cost` returns per rank)."""
    stage: int
    compute_s: float = 0.0
    comm_s: float = 0.0
    bytes_sent: float = 0.0
    param_bytes: float = 0.0
    collectives: int = 0


@functools.lru_cache(maxsize=8)
def _sharded(config_json: str, n_layers: int, tp: int, pp: int, sp: int) -> tuple[Graph, dict[int, int]]:
    """The model's graph rewritten tp × sp × pp (stand-in weights), and each rank's weight bytes;
    kept for the next call — a sweep over batch sizes and dp reuses the same few rewrites."""
    from .. import models
    from ..plugins.parallel import Layout, shard

    cfg = models.complete_config({**json.loads(config_json), "n_layers": n_layers})
    g = models.build_graph(cfg)
    L = Layout(tp=tp, pp=pp, sp=sp)
    if L.world == 1:
        return g, {0: sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in g.params.values())}
    g, _ = shard(g, _standins(g), L, only_rank=-1)
    return g, param_bytes_per_rank(g)


def _rank_costs(config: Mapping[str, Any], n_layers: int, tp: int, pp: int, sp: int,
                bindings: Mapping[str, int], cluster: Cluster) -> dict[int, RankCost]:
    g, params = _sharded(json.dumps(dict(config), sort_keys=True), n_layers, tp, pp, sp)
    width = tp * sp
    out = {r: RankCost(r // width, param_bytes=float(b)) for r, b in params.items()}
    for r, s in compute_seconds(g, bindings, cluster.device).items():
        out[r].compute_s += s
    for c in collectives(g, bindings):
        size = 2 if c.op == "send_recv" else len(c.ranks)
        link = cluster.link(c.ranks)
        secs = seconds(c.op, c.bytes_in, size, link.alpha, link.beta)
        for r in (c.ranks[:1] if c.op == "send_recv" else c.ranks):
            out[r].comm_s += secs
            out[r].bytes_sent += c.bytes_sent
            out[r].collectives += 1
    return out


def layout_cost(config: Mapping[str, Any], tp: int = 1, pp: int = 1, sp: int = 1, *, batch: int = 1,
                seq: int = 1, past: int = 0, cluster: Cluster) -> dict[int, RankCost]:
    """Per rank: modelled compute and communication time, bytes sent and weight bytes of one
    forward step (``batch`` × ``seq`` new tokens after ``past`` cached ones) of the model
    ``config`` split tp × sp × pp.

    The collectives and their bytes are those of the rewritten graph itself (the parallel plugin
    applied to the model's graph, with stand-in weights that take no memory). A model of 80
    layers is not rewritten whole: every layer of a stage is the same, so each rank's figures are
    linear in its stage's layer count — the graph is rewritten with one and with two layers per
    stage and the line extended to the real count (exact: ``tests/test_parallel_cost.py``)."""
    from ..plugins.parallel import stage_sizes

    L = int(config["n_layers"])
    if pp > L:
        raise MinitxError(f"pp={pp} needs at least {pp} layers, the model has {L}")
    b = {"B": batch, "T": seq, "S": past}
    one = _rank_costs(config, pp, tp, pp, sp, b, cluster)
    if L == pp:
        return one
    two = _rank_costs(config, 2 * pp, tp, pp, sp, b, cluster)
    sizes = stage_sizes(L, pp)
    out = {}
    for r, a in one.items():
        k = sizes[a.stage] - 1
        c = two[r]
        out[r] = RankCost(a.stage, *(getattr(a, f) + k * (getattr(c, f) - getattr(a, f))
                                     for f in ("compute_s", "comm_s", "bytes_sent", "param_bytes", "collectives")))
    return out


def step_time(config: Mapping[str, Any], *, cluster: Cluster, tp: int = 1, pp: int = 1, sp: int = 1, dp: int = 1,
              batch: int = 1, seq: int = 128, microbatches: int = 1, train: bool = False) -> dict[str, float]:
    """Modelled time of one step on ``dp × tp × sp × pp`` ranks, no overlap of compute and
    communication (an upper bound a good runtime beats by overlapping).

    Inference (``train=False``): a forward pass of ``batch`` sequences of ``seq`` tokens, its
    stages in turn (a lone step's latency). Training: ``batch`` is the global batch; each of the
    ``dp`` replicas runs ``microbatches`` micro-batches through its ``pp`` stages, GPipe/1F1B
    schedule, so a step lasts (m + p − 1) micro-batch stage times (the bubble is (p − 1)/(m + p − 1)
    of it); a micro-batch's forward + backward is 3× the forward's compute and 2× its tensor /
    sequence-parallel communication (the VJP of a collective is a collective of the same size);
    then the gradients are all-reduced over dp (ring, each rank's weight bytes) and AdamW reads
    and writes 7 arrays as large as the weights (weight, gradient, two moments; 4 read, 3 written).
    """
    if train:
        per = batch // (dp * microbatches)
        if per < 1 or per * dp * microbatches != batch:
            raise MinitxError(f"batch {batch} does not split into dp={dp} × {microbatches} micro-batches")
    else:
        per = batch
    ranks = layout_cost(config, tp, pp, sp, batch=per, seq=seq, cluster=cluster)
    stages: dict[int, list[RankCost]] = {}
    for c in ranks.values():
        stages.setdefault(c.stage, []).append(c)
    stage_s = [max(c.compute_s + c.comm_s for c in cs) for _, cs in sorted(stages.items())]
    compute = max(c.compute_s for c in ranks.values())
    comm = max(c.comm_s for c in ranks.values())
    width = tp * sp * pp
    if not train:
        t = sum(stage_s)
        return {"seconds": t, "tokens_per_s": batch * seq / t, "compute_s": sum(
            max(c.compute_s for c in cs) for cs in stages.values()), "comm_s": t - sum(
            max(c.compute_s for c in cs) for cs in stages.values()), "ranks": width,
            "bytes_sent_per_token": max(c.bytes_sent for c in ranks.values()) / (per * seq)}
    mb_stage = max(3 * c.compute_s + 2 * c.comm_s for c in ranks.values())
    pipe = (microbatches + pp - 1) * mb_stage
    grads = max(c.param_bytes for c in ranks.values())
    # A dp group is every width-th rank from an offset; the step waits for the slowest group.
    allreduce = max(seconds("all_reduce", grads, dp, lk.alpha, lk.beta) for lk in
                    (cluster.link([j + k * width for k in range(dp)]) for j in range(width)))
    adam = 7 * grads / cluster.device.bandwidth
    t = pipe + allreduce + adam
    return {"seconds": t, "tokens_per_s": batch * seq / t, "pipeline_s": pipe,
            "bubble": (pp - 1) / (microbatches + pp - 1), "grad_allreduce_s": allreduce, "optimizer_s": adam,
            "compute_s": microbatches * 3 * compute, "tp_sp_pp_comm_s": microbatches * 2 * comm,
            "comm_share": (allreduce + (microbatches + pp - 1) * 2 * comm) / t, "ranks": dp * width,
            "grad_bytes_sent": sent_bytes("all_reduce", grads, dp)}
