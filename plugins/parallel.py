"""Parallel plugin: tensor, sequence and pipeline parallelism as an exact rewrite into one SPMD graph.

    minitx verify model.npz golden.npz --parallel tp=4          # or --plugin parallel:tp=2,pp=2,mb=2

The rewritten graph holds every rank's part side by side: each node carries ``tags["rank"]``
(its global rank), each rank has its own copy or shard of each weight (``name@rank``), and ranks
meet only through collective nodes (``minitx/ops/collectives.py``, tagged with their group) and
``send_recv`` between pipeline stages. One process runs the whole graph — the collectives are
their NumPy specs — and the rewrite is validated against the unsharded model like any exact
plugin (float round-off only). Across processes, :func:`minitx.distributed.program.rank_program` cuts rank
r's part out of the same graph and an MPI transport runs its collectives.

Ranks are numbered ``stage * width + t`` (width = tp or sp): tensor parallelism is innermost, as in
Megatron-LM. docs/parallelism.md explains each kind and its cost.

**Tensor parallel** (Megatron-LM's splits): the QKV, up and gate projections are column-parallel
(rank t holds heads ``t·H/tp …`` and KV heads ``t·KV/tp …``, and for SwiGLU the matching columns
of both gate and up), attention runs on the rank's heads, the output and down projections are
row-parallel — their partial sums meet in one all-reduce, the bias added once after it. The token
embedding is vocabulary-parallel (each rank looks up the ids in its rows; an all-reduce sums the
pieces) and so is the LM head (each rank's logits for its rows, all-gathered), the vocabulary
padded with zero rows to a multiple of tp (GPT-2's 50257 is odd), the padding sliced off the
logits. Norms, residuals and everything else run replicated on every rank. The KV cache a graph
reads and returns stays the unsharded one at the graph's edge (each rank's slice is cut from it,
and the ranks' new caches are concatenated), so callers feed the graph as before.

**Pipeline parallel**: layers go to ``pp`` contiguous stages as evenly as possible, earlier
stages taking one more when they do not divide (3 layers on pp=2: 2 + 1); what precedes the
first layer runs on the first stage, what follows the last on the last. A value used on a later
stage is handed on with ``send_recv``. With ``mb`` micro-batches (:func:`microbatch`) the batch is
cut and the graph repeated per micro-batch, so that the stages overlap (GPipe's forward order).

**Sequence parallel** (``sp``, DeepSpeed Ulysses): each rank computes its piece of the sequence
through every per-token op with replicated weights; around attention an all-to-all trades "my
tokens, all heads" for "all tokens, my heads" and back; whatever needs the whole sequence
(pooling, the graph's outputs) is all-gathered along time. With ``ring=1`` attention is ring
attention instead (K/V pieces passed around the ranks, blocks merged by their log-sum-exps). With
tp (``tp=N,sp=N``, the same ranks) it is Megatron's sequence parallelism: sequence pieces between
the tensor-parallel regions, reduce-scatters instead of all-reduces.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from minitx.errors import MinitxError
from minitx.ir import Graph, Node, Value
from minitx.plugin import Option, Plugin, Tolerance, positive_int
from minitx.rewrite import RewriteResult, check

COLUMN_CONSUMERS = ("split", "gelu", "relu", "silu", "swiglu", "cross_attention")   # these read a column-parallel linear
ON_SHARDS = ("gelu", "relu", "silu", "swiglu", "rope")          # elementwise per head/feature: run on shards
# Ops that compute each token from that token alone (given weights): sequence parallelism runs them on
# the rank's piece of the sequence.
PER_TOKEN = ("embedding", "add", "layer_norm", "rms_norm", "linear", "matmul", "split", "gelu", "relu", "silu",
             "swiglu", "rope", "scale")


@dataclass(frozen=True)
class Layout:
    """How many ways each kind of parallelism splits the model; ranks = tp · sp · pp (tp · pp when
    tp and sp share their ranks)."""

    tp: int = 1
    pp: int = 1
    mb: int = 1          # micro-batches a pipeline streams through its stages
    sp: int = 1          # sequence parallel (Ulysses): each rank a piece of the sequence
    ring: int = 0        # 1: sequence-parallel attention by ring (K/V blocks passed on) instead of all-to-all

    def __post_init__(self) -> None:
        if self.tp > 1 and self.sp > 1 and (self.sp != self.tp or self.ring):
            raise MinitxError(f"parallel: with tp, sequence parallelism runs on the tp ranks themselves (Megatron's): "
                              f"give sp={self.tp} without ring, not sp={self.sp}" + (",ring=1" if self.ring else ""))
        if self.ring not in (0, 1) or (self.ring and self.sp == 1):
            raise MinitxError("parallel: ring=1 is how sequence parallelism attends (give sp=N with it)")

    @property
    def megatron(self) -> bool:
        """tp and sp together: Megatron's sequence parallelism, on the same ranks."""
        return self.tp > 1 and self.sp > 1

    @property
    def width(self) -> int:
        """Ranks per pipeline stage (the tp or the sp group; one group for both)."""
        return self.tp if self.megatron else self.tp * self.sp

    @property
    def world(self) -> int:
        return self.width * self.pp

    def rank(self, stage: int, t: int) -> int:
        return stage * self.width + t

    def group(self, stage: int) -> list[int]:
        return [self.rank(stage, t) for t in range(self.width)]

    def __str__(self) -> str:
        return ",".join(f"{k}={v}" for k, v in (("tp", self.tp), ("sp", self.sp), ("ring", self.ring), ("pp", self.pp),
                                                ("mb", self.mb)) if v > 1 or (k == "ring" and v)) or "tp=1"


def stage_sizes(n_layers: int, pp: int) -> list[int]:
    """Layers per stage: contiguous and as even as possible, the earlier stages one more (3/2 → 2+1)."""
    if pp > n_layers:
        raise MinitxError(f"parallel: pp={pp} stages for a model of {n_layers} layer(s): each stage needs at least one")
    return [n_layers // pp + (1 if s < n_layers % pp else 0) for s in range(pp)]


def pieces(n: int, tp: int) -> list[np.ndarray]:
    """Rank t's indices of ``n`` features: contiguous, as even as possible (an FFN width that tp
    does not divide is split unevenly; heads must divide, see ``_heads``)."""
    return np.array_split(np.arange(n), tp)


def padded_vocab(vocab: int, tp: int) -> int:
    return -(-vocab // tp) * tp


class _Sharder:
    """One pass over the original graph, writing each node's per-rank replacement."""

    def __init__(self, graph: Graph, params: Mapping[str, np.ndarray], layout: Layout,
                 only_rank: int | None = None) -> None:
        self.g, self.src, self.L, self.only = graph, params, layout, only_rank
        self.inputs = {v.name for v in graph.inputs}
        self.input_shape = {v.name: v.shape for v in graph.inputs}
        self.time_values: set[str] = set()      # micro-batches of per-token inputs
        self.nodes: list[Node] = []
        self.params: dict[str, np.ndarray] = {}
        # original value -> (kind, stage); kind: "rep" (whole on every rank), "col" (a rank's heads or
        # features), "seq" (a rank's piece of the sequence)
        self.values: dict[str, tuple[str, int]] = {}
        self.param_kind: dict[str, str] = {}
        self.done: set[tuple] = set()             # nodes emitted once: ("send", v, rank), ("cache", v, stage), …
        self.consumers = graph.consumers()
        self.stage = self._stages()
        # Each layer's attention (an encoder–decoder's two stacks number their layers alike; a
        # decoder layer's self- and cross-attention have the same heads).
        self.attn: dict[tuple, Node] = {}
        for n in graph.nodes:
            if n.op in ("attention", "cross_attention"):
                self.attn.setdefault((n.tags.get("stack"), n.tags.get("layer")), n)
        self.vocab_size: dict[str, int] = {}     # logits left sharded by vocabulary → the true vocabulary

    # ------------------------------------------------------------------ placement
    def _stages(self) -> dict[str, int]:
        layers = sorted({int(n.tags["layer"]) for n in self.g.nodes if "layer" in n.tags})
        L = self.L
        if L.pp > 1 and not layers:
            raise MinitxError("parallel: pp needs a graph whose nodes carry layer tags")
        of_layer: dict[int, int] = {}
        if layers:
            k = 0
            for s, n in enumerate(stage_sizes(len(layers), L.pp)):
                for layer in layers[k:k + n]:
                    of_layer[layer] = s
                k += n
        # A node outside the layers runs where its inputs are (the latest of their stages): the
        # embeddings on the first stage, the final norm and the head on the last.
        out: dict[str, int] = {}
        where: dict[str, int] = {}
        for n in self.g.nodes:
            if "layer" in n.tags:
                st = of_layer[int(n.tags["layer"])]
            else:
                st = max([where.get(i, 0) for i in n.inputs if i], default=0)
            out[n.name] = st
            for o in n.outputs:
                where[o] = st
        return out

    # ------------------------------------------------------------------ naming
    @staticmethod
    def at(v: str, rank: int) -> str:
        return f"{v}@{rank}"

    def param(self, p: str, rank: int, kind: str, make) -> str:
        """Rank ``rank``'s copy or shard of weight ``p`` (``make()`` builds it); one kind per weight."""
        name = self.at(p, rank) if self.param_kind.setdefault(p, kind) == kind else self.at(f"{p}.{kind}", rank)
        if name not in self.params:
            a = make()
            # Across processes a rank materialises its own weights only; the others are stand-ins
            # of the right shape that take no memory.
            self.params[name] = (np.ascontiguousarray(a) if self.only in (None, rank)
                                 else np.broadcast_to(np.zeros((), a.dtype), a.shape))
        return name

    def read(self, v: str, stage: int, t: int, node: Node) -> str:
        """The name of value ``v`` on rank (stage, t), handing it on from an earlier stage if needed."""
        if not v:
            return v
        if v in self.inputs:
            return self.cache_shard(v, stage, t) if self.is_cache(v) else v
        if v in self.g.params:
            return self.param(v, self.L.rank(stage, t), "rep", lambda: self.src[v])
        kind, s = self.values[v]
        if s == stage:
            return self.at(v, self.L.rank(stage, t))
        src, dst = self.L.rank(s, t), self.L.rank(stage, t)
        out = self.at(v, dst)
        if ("send", v, dst) not in self.done:
            self.done.add(("send", v, dst))
            self.emit(Node(f"{v}.send@{src}>{dst}", "send_recv", [self.at(v, src)], [out], {"src": src, "dst": dst},
                           {"ranks": [src, dst], "sends": v}))
        return out

    def is_cache(self, v: str) -> bool:
        """A KV cache at the graph's edge, which tensor parallelism splits by KV heads."""
        return self.L.width > 1 and not self.L.ring and v in self.inputs and v.startswith("past.")

    def kind(self, v: str) -> str | None:
        return "col" if self.is_cache(v) else self.values[v][0] if v in self.values else None

    def cache_shard(self, v: str, stage: int, t: int) -> str:
        """Rank (stage, t)'s KV heads of cache ``v``: one split at the graph's edge, per stage."""
        outs = [self.at(v, r) for r in self.L.group(stage)]
        if ("cache", v, stage) not in self.done:
            self.done.add(("cache", v, stage))
            width = next(int(x.shape[-1]) for x in self.g.inputs if x.name == v)
            n = self.L.width
            if width % n:
                raise MinitxError(f"parallel: {n} ranks do not divide the {width} columns of KV cache {v}")
            self.emit(Node(f"{v}.shard@{stage}", "split", [v], outs, {"sizes": [width // n] * n},
                           {"interface": True, "stage": stage}))
        return outs[t]

    def emit(self, node: Node) -> None:
        self.nodes.append(node)

    def replicate(self, node: Node, stage: int, kind: str = "rep", attrs: dict | None = None,
                  read=None) -> None:
        read = read or self.read
        for t in range(self.L.width):
            r = self.L.rank(stage, t)
            self.emit(Node(self.at(node.name, r), node.op, [read(i, stage, t, node) for i in node.inputs],
                           [self.at(o, r) for o in node.outputs], dict(attrs if attrs is not None else node.attrs),
                           {**node.tags, "rank": r}))
        for o in node.outputs:
            self.values[o] = (kind, stage)

    def all_reduce(self, name: str, parts: list[str], stage: int, out: str) -> list[str]:
        outs = [self.at(out, r) for r in self.L.group(stage)]
        self.emit(Node(name, "all_reduce", parts, outs, {"ranks": self.L.group(stage)},
                       {"ranks": self.L.group(stage), "stage": stage}))
        return outs

    # ------------------------------------------------------------------ rules
    def run(self) -> None:
        for node in self.g.nodes:
            s = self.stage[node.name]
            kinds = {self.kind(i) for i in node.inputs if i}
            if self.L.megatron:
                self.megatron(node, s, kinds)
            elif self.L.sp > 1:
                self.sequence_parallel(node, s, kinds)
            elif self.L.tp == 1:
                self.replicate(node, s)
            else:
                self.tensor_parallel(node, s, kinds, self.replicate)

    def tensor_parallel(self, node: Node, s: int, kinds: set, otherwise: Callable[[Node, int], None]) -> None:
        """tp's rule for one node (Megatron's splits); ``otherwise`` places a node tp does not split."""
        if node.op == "embedding" and node.inputs[0] in ("input_ids", "encoder_ids") and node.inputs[1] in self.g.params:
            self.vocab_embedding(node, s)
        elif node.op in ("matmul", "linear") and any(o == "logits" or o.startswith("logits.mb") for o in node.outputs):
            self.lm_head(node, s)
        elif node.op == "cross_entropy" and "vocab" in kinds:
            self.vocab_cross_entropy(node, s)
        elif node.op == "linear" and "col" in kinds:
            self.row_parallel(node, s)
        elif node.op == "linear" and self.is_column(node):
            self.column_parallel(node, s)
        elif node.op == "relative_position_bias" and node.inputs[0] in self.g.params:
            self.head_bias(node, s)
        elif "col" in kinds:
            self.on_shards(node, s)
        else:
            otherwise(node, s)

    def megatron(self, node: Node, s: int, kinds: set) -> None:
        """tp with Megatron's sequence parallelism (Korthikanti et al., 2022): between the tensor-
        parallel regions — norms, residual adds, dropout, position embeddings — each rank keeps its
        piece of the sequence (kind "seq"); a column-parallel linear first all-gathers the pieces
        along time, and a row-parallel linear's partial sums meet in a reduce-scatter along time
        instead of an all-reduce (the same bytes: an all-reduce is a reduce-scatter plus an
        all-gather; the activations between the regions divided by tp)."""
        self.tensor_parallel(node, s, kinds, lambda n, st: self.sequence_parallel(n, st, kinds))

    def read_whole(self, v: str, stage: int, t: int, node: Node) -> str:
        """Like :meth:`read`, but a sequence piece comes whole (all-gathered along time)."""
        return self.gather_seq(v, stage)[t] if self.kind(v) == "seq" else self.read(v, stage, t, node)

    def scatter_or_reduce(self, name: str, parts: list[str], s: int, out: str) -> list[str]:
        """The partial sums' meeting: an all-reduce (tp), or a reduce-scatter along time into the
        ranks' sequence pieces (tp with sp, Megatron)."""
        if not self.L.megatron:
            return self.all_reduce(name, parts, s, out)
        group = self.L.group(s)
        outs = [self.at(out, r) for r in group]
        self.emit(Node(name.replace("all_reduce", "reduce_scatter"), "reduce_scatter", parts, outs,
                       {"ranks": group, "axis": 1}, {"ranks": group, "stage": s}))
        return outs

    def is_column(self, node: Node) -> bool:
        cons = self.consumers.get(node.outputs[0], [])
        return (node.inputs[1] in self.g.params and bool(cons) and all(c.op in COLUMN_CONSUMERS for c in cons))

    def _heads(self, node: Node) -> tuple[int, int]:
        a = self.attn.get((node.tags.get("stack"), node.tags.get("layer")))
        if a is None:
            raise MinitxError(f"parallel: cannot find the attention of {node.name} to split its heads")
        H = int(a.attrs["n_heads"])
        KV = int(a.attrs.get("n_kv_heads", H))           # cross_attention: as many K/V heads as queries
        kind, n = ("tp", self.L.tp) if self.L.tp > 1 else ("sp", self.L.sp)
        if H % n or KV % n:
            raise MinitxError(f"parallel: {kind}={n} cannot split {H} attention heads and {KV} KV heads "
                              f"({a.name}): both must be multiples of {kind}")
        return H, KV

    # ------------------------------------------------------------------ sequence parallel (Ulysses)
    def is_time_input(self, v: str) -> bool:
        """A graph input with one entry per token (ids, positions, token types, targets)."""
        return (v in self.inputs and tuple(self.input_shape[v]) == ("B", "T")) or v in self.time_values

    def read_seq(self, v: str, stage: int, t: int, node: Node) -> str:
        """Like :meth:`read`, but a per-token graph input comes as the rank's piece of the sequence."""
        if not self.is_time_input(v):
            return self.read(v, stage, t, node)
        r = self.L.rank(stage, t)
        outs = [self.at(f"{v}.seq{k}", r) for k in range(self.L.sp)]
        if ("seq", v, r) not in self.done:
            self.done.add(("seq", v, r))
            src = v if v in self.inputs else self.read(v, stage, t, node)
            self.emit(Node(self.at(f"{v}.seq", r), "chunk", [src], outs, {"axis": 1, "n": self.L.sp}, {"rank": r}))
        return outs[t]

    def gather_seq(self, v: str, stage: int) -> list[str]:
        """Every rank gets the whole sequence of ``v`` (an all-gather of the pieces along time)."""
        outs = [self.at(f"{v}.whole", r) for r in self.L.group(stage)]
        if ("whole", v, stage) not in self.done:
            self.done.add(("whole", v, stage))
            group = self.L.group(stage)
            # (pieces computed on an earlier stage are handed on first)
            self.emit(Node(f"{v}.gather@{stage}", "all_gather", [self.read(v, stage, t, None) for t in range(len(group))], outs,
                           {"ranks": group, "axis": 1}, {"ranks": group, "stage": stage}))
        return outs

    def sequence_parallel(self, node: Node, s: int, kinds: set) -> None:
        per_token = node.op in PER_TOKEN and (node.op not in ("linear", "matmul") or node.inputs[1] in self.g.params)
        if node.op == "attention":
            return self.seq_attention(node, s)
        if node.op == "chunk" and all(self.is_time_input(i) for i in node.inputs):   # micro-batches of ids
            self.time_values.update(node.outputs)
            return self.replicate(node, s)
        kinds = {self.kind(i) for i in node.inputs if i and not self.is_time_input(i)}
        if "col" in kinds and node.op in ("chunk", "concat") and int(node.attrs["axis"]) == 0:   # caches' micro-batches
            return self.replicate(node, s, "col")
        if per_token and ("seq" in kinds or any(self.is_time_input(i) for i in node.inputs)):
            if "rep" in kinds:
                raise MinitxError(f"parallel: sp: {node.name} ({node.op}) mixes a sequence piece with a whole sequence")
            return self.replicate(node, s, "seq", read=self.read_seq)
        whole = {i: self.gather_seq(i, s) for i in node.inputs if i and self.kind(i) == "seq"}

        def read(v, stage, t, n):
            return whole[v][t] if v in whole else self.read(v, stage, t, n)

        self.replicate(node, s, read=read)

    def seq_attention(self, node: Node, s: int) -> None:
        """Each rank's tokens of q, k, v → all tokens of its heads (all-to-all), attention on those
        heads with its slice of the KV cache, and back to its tokens of all heads."""
        if self.L.ring:
            return self.ring_attention(node, s)
        n = self.L.sp
        H, KV = self._heads(node)
        group = self.L.group(s)
        heads = {}
        for x in node.inputs[:3]:
            outs = [self.at(f"{x}.heads", r) for r in group]
            self.emit(Node(f"{x}.to_heads@{s}", "all_to_all", [self.read(x, s, t, node) for t in range(n)], outs,
                           {"ranks": group, "split_axis": 2, "concat_axis": 1}, {"ranks": group, "stage": s}))
            heads[x] = outs
        out, *present = node.outputs
        attrs = {**node.attrs, "n_heads": H // n, "n_kv_heads": KV // n}
        for t, r in enumerate(group):
            ins = [heads[x][t] for x in node.inputs[:3]] + [self.read(i, s, t, node) for i in node.inputs[3:]]
            self.emit(Node(self.at(node.name, r), "attention", ins,
                           [self.at(f"{out}.heads", r), *[self.at(o, r) for o in present]], attrs,
                           {**node.tags, "rank": r}))
        self.emit(Node(f"{out}.to_tokens@{s}", "all_to_all", [self.at(f"{out}.heads", r) for r in group],
                       [self.at(out, r) for r in group], {"ranks": group, "split_axis": 1, "concat_axis": 2},
                       {"ranks": group, "stage": s}))
        self.values[out] = ("seq", s)
        for o in present:
            self.values[o] = ("col", s)

    def ring_attention(self, node: Node, s: int) -> None:
        """Ring attention: each rank keeps its piece of q and passes its K/V piece on to the next
        rank (send_recv), attending to one block at a time (attention_block: its output and
        log-sum-exp) and combining the blocks exactly (attention_merge, the online softmax). With a
        causal mask a block only travels forward (rank b's keys are no use to earlier ranks) and
        rank t attends to blocks 0 … t. The KV cache before this step is whole on every rank (one
        more block, attended locally); a cache the graph returns is the past plus this step's
        K/V all-gathered along time."""
        n, group = self.L.sp, self.L.group(s)
        q, k, v, pk, pv, mask = [*node.inputs, "", "", ""][:6]
        H, KV = int(node.attrs["n_heads"]), int(node.attrs["n_kv_heads"])
        causal = bool(node.attrs["causal"])
        base = {"n_heads": H, "n_kv_heads": KV, "blocks": n, "causal": causal,
                **({"scale": node.attrs["scale"]} if node.attrs.get("scale") is not None else {})}
        have = {(x, t, t): self.read(x, s, t, node) for x in (k, v) for t in range(n)}
        for j in range(1, n):                           # ring step j: block b moves from rank b+j−1 to b+j
            for b in range(n):
                src_t, dst_t = (b + j - 1) % n, (b + j) % n
                if causal and b + j >= n:               # would wrap to an earlier rank, which does not need it
                    continue
                src, dst = self.L.rank(s, src_t), self.L.rank(s, dst_t)
                for x in (k, v):
                    out = self.at(f"{x}.blk{b}", dst)
                    self.emit(Node(f"{x}.blk{b}.send@{src}>{dst}", "send_recv", [have[(x, b, src_t)]], [out],
                                   {"src": src, "dst": dst}, {"ranks": [src, dst], "sends": x, "ring": j}))
                    have[(x, b, dst_t)] = out
        out, *present = node.outputs
        for t, r in enumerate(group):
            qn = self.read(q, s, t, node)
            m = self.read(mask, s, t, node) if mask else ""
            past = self.read(pk, s, t, node) if pk else ""
            blocks = ([(-1, past, self.read(pv, s, t, node))] if pk else []) + [
                (b, have[(k, b, t)], have[(v, b, t)]) for b in range(n) if not (causal and b > t)]
            parts = []
            for b, kb, vb in blocks:
                o, lse = self.at(f"{out}.blk{b}", r), self.at(f"{out}.lse{b}", r)
                self.emit(Node(self.at(f"{node.name}.blk{b}", r), "attention_block", [qn, kb, vb, m, past], [o, lse],
                               {**base, "block": b, "query_block": t}, {**node.tags, "rank": r}))
                parts += [o, lse]
            self.emit(Node(self.at(f"{node.name}.merge", r), "attention_merge", parts, [self.at(out, r)], {},
                           {**node.tags, "rank": r}))
        self.values[out] = ("seq", s)
        for o, x, p in zip(present, (k, v), (pk, pv)):
            if o not in self.g.outputs and not self.consumers.get(o):
                continue                                  # (training: no cache to return)
            whole = self.gather_seq(x, s)
            for t, r in enumerate(group):
                ins = [self.read(p, s, t, node), whole[t]] if p else [whole[t]]
                self.emit(Node(self.at(f"{o}.cache", r), "concat", ins, [self.at(o, r)], {"axis": 1},
                               {**node.tags, "rank": r}))
            self.values[o] = ("rep", s)

    def column_parallel(self, node: Node, s: int) -> None:
        x, w, *rest = node.inputs
        b = rest[0] if rest else ""
        W = self.src[w]
        n_out = W.shape[1]
        tp = self.L.tp
        cons = self.consumers[node.outputs[0]]
        if cons[0].op == "split":                       # fused q | k | v: split by heads
            H, KV = self._heads(node)
            sizes = list(cons[0].attrs["sizes"])
            if len(sizes) not in (2, 3):
                raise MinitxError(f"parallel: {node.name} feeds a split into {len(sizes)} parts, not q, k, v "
                                  "(or a cross-attention's k, v)")
            starts = np.cumsum([0, *sizes])
            cols = lambda t: np.concatenate([np.arange(starts[k] + t * sizes[k] // tp, starts[k] + (t + 1) * sizes[k] // tp)
                                             for k in range(len(sizes))])
        elif cons[0].op == "swiglu":                    # [gate | up]: the same features of both halves
            F = n_out // 2
            cols = lambda t: np.concatenate([pieces(F, tp)[t] + h * F for h in (0, 1)])
        else:
            cols = lambda t: pieces(n_out, tp)[t]
        for t in range(tp):
            r = self.L.rank(s, t)
            ins = [self.read_whole(x, s, t, node), self.param(w, r, "col", lambda: W[:, cols(t)])]
            if b:
                ins.append(self.param(b, r, "col", lambda: self.src[b][cols(t)]))
            self.emit(Node(self.at(node.name, r), "linear", ins, [self.at(node.outputs[0], r)], dict(node.attrs),
                           {**node.tags, "rank": r, "parallel": "column"}))
        self.values[node.outputs[0]] = ("col", s)

    def on_shards(self, node: Node, s: int) -> None:
        tp = self.L.tp
        attrs = dict(node.attrs)
        if node.op == "split":
            if any(int(n) % tp for n in attrs["sizes"]):
                raise MinitxError(f"parallel: tp={tp} does not divide the split sizes {attrs['sizes']} of {node.name}")
            attrs["sizes"] = [int(n) // tp for n in attrs["sizes"]]
        elif node.op == "rope":
            attrs["n_heads"] = int(attrs["n_heads"]) // tp
        elif node.op == "attention":
            H, KV = self._heads(node)
            attrs["n_heads"], attrs["n_kv_heads"] = H // tp, KV // tp
        elif node.op == "cross_attention":
            q, k, v, *rest = node.inputs
            bias = rest[1] if len(rest) > 1 else ""
            if any(self.kind(x) != "col" for x in (q, k, v)) or (bias and self.kind(bias) != "col"):
                raise MinitxError(f"parallel: {node.name} (cross_attention) reads q, k, v or a bias that tp does "
                                  "not split by heads")
            self._heads(node)
            attrs["n_heads"] = int(attrs["n_heads"]) // tp
        elif node.op in ("chunk", "concat"):
            if int(attrs["axis"]) not in (0, 1):      # a KV cache grows along time (1): its heads stay split
                raise MinitxError(f"parallel: {node.name} ({node.op}) cuts a tensor-parallel shard along axis "
                                  f"{attrs['axis']}; only the batch (0) and time (1) axes can be")
        elif node.op not in ON_SHARDS:
            raise MinitxError(f"parallel: node {node.name} ({node.op}) reads a tensor-parallel shard; only "
                              f"{', '.join(ON_SHARDS + ('split', 'attention', 'linear', 'chunk', 'concat'))} can")
        self.replicate(node, s, "col", attrs)

    def head_bias(self, node: Node, s: int) -> None:
        """T5's relative position bias, (buckets, H) → (1, H, T, S): each rank computes its heads'
        (the table's columns), as attention runs on the rank's heads."""
        table = node.inputs[0]
        W = self.src[table]
        if W.shape[1] % self.L.tp:
            raise MinitxError(f"parallel: tp={self.L.tp} cannot split the {W.shape[1]} heads of {node.name} "
                              "(relative_position_bias)")
        for t in range(self.L.tp):
            r = self.L.rank(s, t)
            cols = pieces(W.shape[1], self.L.tp)[t]
            ins = [self.param(table, r, "col", lambda: W[:, cols]), *(self.read(i, s, t, node) for i in node.inputs[1:])]
            self.emit(Node(self.at(node.name, r), node.op, ins, [self.at(o, r) for o in node.outputs], dict(node.attrs),
                           {**node.tags, "rank": r, "parallel": "column"}))
        self.values[node.outputs[0]] = ("col", s)

    def row_parallel(self, node: Node, s: int) -> None:
        x, w, *rest = node.inputs
        b = rest[0] if rest else ""
        W = self.src[w]
        tp = self.L.tp
        if W.shape[0] < tp:
            raise MinitxError(f"parallel: tp={tp} is more ranks than the {W.shape[0]} inputs of {node.name} ({w})")
        out = node.outputs[0]
        partial = f"{out}.partial"
        parts = []
        for t in range(tp):
            r = self.L.rank(s, t)
            ins = [self.read(x, s, t, node), self.param(w, r, "row", lambda: W[pieces(W.shape[0], tp)[t]])]
            parts.append(self.at(partial, r))
            self.emit(Node(self.at(f"{node.name}.partial", r), "linear", ins, [parts[-1]], {},
                           {**node.tags, "rank": r, "parallel": "row"}))
        summed = self.scatter_or_reduce(f"{node.name}.all_reduce@{s}", parts, s, f"{out}.sum" if b else out)
        if b:
            for t in range(tp):
                r = self.L.rank(s, t)
                self.emit(Node(self.at(f"{node.name}.bias", r), "add",
                               [summed[t], self.param(b, r, "rep", lambda: self.src[b])], [self.at(out, r)], {},
                               {**node.tags, "rank": r}))
        self.values[out] = ("seq" if self.L.megatron else "rep", s)

    def _vocab_shard(self, p: str, transposed: bool):
        """Rank t's rows (columns when ``transposed``) of a vocabulary table padded to a multiple of tp."""
        tp = self.L.tp
        A = self.src[p].T if transposed else self.src[p]
        Vp = padded_vocab(A.shape[0], tp)
        n = Vp // tp

        def shard(t: int) -> np.ndarray:
            rows = np.zeros((n, A.shape[1]), A.dtype)
            piece = A[t * n:(t + 1) * n]
            rows[:len(piece)] = piece
            return rows.T if transposed else rows

        return A.shape[0], Vp, n, shard

    def vocab_embedding(self, node: Node, s: int) -> None:
        ids, table = node.inputs
        V, Vp, n, shard = self._vocab_shard(table, False)
        parts = []
        for t in range(self.L.tp):
            r = self.L.rank(s, t)
            parts.append(self.at(f"{node.outputs[0]}.part", r))
            self.emit(Node(self.at(node.name, r), "vocab_embedding",
                           [ids, self.param(table, r, "vocab", lambda: shard(t))], [parts[-1]], {"start": t * n},
                           {**node.tags, "rank": r, "parallel": "vocab"}))
        self.scatter_or_reduce(f"{node.name}.all_reduce@{s}", parts, s, node.outputs[0])
        self.values[node.outputs[0]] = ("seq" if self.L.megatron else "rep", s)

    def lm_head(self, node: Node, s: int) -> None:
        x, w, *rest = node.inputs
        if w not in self.g.params or (rest and rest[0]):
            raise MinitxError(f"parallel: the LM head {node.name} must read a weight and no bias to be split by vocabulary")
        transposed = node.op == "linear"            # linear's weight is (C, V); matmul(transpose_b)'s (V, C)
        if node.op == "matmul" and not node.attrs.get("transpose_b"):
            raise MinitxError(f"parallel: the LM head {node.name} is a matmul without transpose_b")
        V, Vp, n, shard = self._vocab_shard(w, transposed)
        out = node.outputs[0]
        local = []
        for t in range(self.L.tp):
            r = self.L.rank(s, t)
            local.append(self.at(f"{out}.shard", r))
            self.emit(Node(self.at(node.name, r), node.op,
                           [self.read_whole(x, s, t, node), self.param(w, r, "vocab", lambda: shard(t))],
                           [local[-1]], dict(node.attrs), {**node.tags, "rank": r, "parallel": "vocab"}))
        group = self.L.group(s)
        if out not in self.g.outputs and all(c.op == "cross_entropy" for c in self.consumers.get(out, [])):
            # Only a loss reads the logits: it takes them sharded (vocab_cross_entropy), never gathered.
            self.values[out] = ("vocab", s)
            self.vocab_size[out] = V
            return
        full = [self.at(f"{out}.padded" if Vp > V else out, r) for r in group]
        self.emit(Node(f"{node.name}.all_gather@{s}", "all_gather", local, full, {"ranks": group, "axis": -1},
                       {"ranks": group, "stage": s}))
        if Vp > V:
            for t, r in enumerate(group):
                self.emit(Node(self.at(f"{node.name}.unpad", r), "split", [full[t]],
                               [self.at(out, r), self.at(f"{out}.pad", r)], {"sizes": [V, Vp - V]},
                               {**node.tags, "rank": r}))
        self.values[out] = ("rep", s)

    def vocab_cross_entropy(self, node: Node, s: int) -> None:
        """Megatron's vocabulary-parallel cross-entropy on the ranks' logits shards: a max and two
        sums all-reduced inside the op (minitx/ops/collectives.py), the logits never gathered."""
        logits, targets = node.inputs
        group = self.L.group(s)
        outs = [self.at(node.outputs[0], r) for r in group]
        ins = [self.at(f"{logits}.shard", r) for r in group] + [self.read(targets, s, 0, node)]
        self.emit(Node(f"{node.name}.vocab_parallel@{s}", "vocab_cross_entropy", ins, outs,
                       {"ranks": group, "vocab": self.vocab_size[logits],
                        "ignore_index": int(node.attrs.get("ignore_index", -100))},
                       {"ranks": group, "stage": s, "shared_inputs": 1}))
        self.values[node.outputs[0]] = ("rep", s)

    # ------------------------------------------------------------------ the graph's edge
    def finish(self) -> Graph:
        # A per-token result of sequence parallelism: its pieces become ``o.part``, gathered into ``o``.
        parts: dict[str, str] = {}
        for o in self.g.outputs:
            kind, s = self.values[o]
            if kind == "seq":
                for r in self.L.group(s):
                    parts[self.at(o, r)] = self.at(f"{o}.part", r)
                    parts[self.at(f"{o}.whole", r)] = self.at(o, r)
        for n in self.nodes:
            n.inputs = [parts.get(i, i) for i in n.inputs]
            n.outputs = [parts.get(x, x) for x in n.outputs]
        for o in self.g.outputs:
            kind, s = self.values[o]
            if kind == "seq":
                group = self.L.group(s)
                if ("whole", o, s) not in self.done:
                    self.done.add(("whole", o, s))
                    self.emit(Node(f"{o}.gather@{s}", "all_gather", [self.at(f"{o}.part", r) for r in group],
                                   [self.at(o, r) for r in group], {"ranks": group, "axis": 1},
                                   {"ranks": group, "stage": s}))
                self.values[o] = ("rep", s)
        rename: dict[str, str] = {}
        outputs_extra: list[Node] = []
        for o in self.g.outputs:
            kind, s = self.values[o]
            group = self.L.group(s)
            if kind == "rep":
                rename[self.at(o, group[0])] = o
            else:                                   # a rank-sharded result (the KV cache): join the shards
                outputs_extra.append(Node(f"{o}.join@{s}", "concat", [self.at(o, r) for r in group], [o],
                                          {"axis": -1}, {"interface": True, "stage": s}))
        # Replicated intermediates keep their name on their stage's first rank (golden-file checks).
        for v, (kind, s) in self.values.items():
            if kind == "rep" and v not in self.g.outputs:
                rename.setdefault(self.at(v, self.L.group(s)[0]), v)
        nodes = []
        for n in self.nodes + outputs_extra:
            n.inputs = [rename.get(i, i) for i in n.inputs]
            n.outputs = [rename.get(o, o) for o in n.outputs]
            nodes.append(n)
        params = {k: Value(k, tuple(int(d) for d in a.shape), str(a.dtype)) for k, a in self.params.items()}
        meta = {**self.g.meta, "parallel": {"tp": self.L.tp, "sp": self.L.sp, "pp": self.L.pp, "mb": self.L.mb,
                                             "world": self.L.world}}
        return Graph(list(self.g.inputs), list(self.g.outputs), params, nodes, meta)


def shard(graph: Graph, params: Mapping[str, np.ndarray], layout: Layout,
          only_rank: int | None = None) -> tuple[Graph, dict[str, np.ndarray]]:
    """The SPMD graph of ``layout`` for ``graph``: every rank's part, with its weights (only
    ``only_rank``'s materialised, when given: the other ranks' are zero-memory stand-ins)."""
    if graph.meta.get("parallel"):
        raise MinitxError("parallel: the graph is already sharded")
    sh = _Sharder(microbatch(graph, layout.mb), params, layout, only_rank)
    sh.run()
    g = sh.finish()
    check(g, sh.params, f"parallel {layout}")
    check_spmd(g)
    return g, sh.params


def microbatch(graph: Graph, m: int) -> Graph:
    """``graph`` run on ``m`` micro-batches one after the other (GPipe's forward order): every
    batched input is cut along the batch (``chunk``), the whole graph is repeated per micro-batch,
    and each output joined back (``concat``). Sharded, each stage then works on micro-batch k + 1
    while the next stage works on k. A layer's KV cache is cut and joined on that layer's stage."""
    if m == 1:
        return graph
    consumers, producers = graph.consumers(), graph.producers()

    def layer_tag(nodes) -> dict:
        layers = {n.tags.get("layer") for n in nodes}
        return {"layer": layers.pop()} if len(layers) == 1 and None not in layers else {}

    nodes: list[Node] = []
    piece: dict[str, list[str]] = {}
    for v in graph.inputs:
        if v.shape and v.shape[0] == "B":
            piece[v.name] = [f"{v.name}.mb{k}" for k in range(m)]
            nodes.append(Node(f"{v.name}.chunk", "chunk", [v.name], piece[v.name], {"axis": 0, "n": m, "nonempty": True},
                              layer_tag(consumers.get(v.name, []))))
    for k in range(m):
        def name(v: str) -> str:
            if not v or v in graph.params:
                return v
            return piece[v][k] if v in piece else v if v not in producers else f"{v}.mb{k}"
        for n in graph.nodes:
            nodes.append(Node(f"{n.name}.mb{k}", n.op, [name(i) for i in n.inputs], [name(o) for o in n.outputs],
                              dict(n.attrs), {**n.tags, "microbatch": k}))
    for o in graph.outputs:
        nodes.append(Node(f"{o}.microbatches", "concat", [f"{o}.mb{k}" for k in range(m)], [o], {"axis": 0},
                          layer_tag([producers[o]])))
    return Graph(list(graph.inputs), list(graph.outputs), dict(graph.params), nodes, dict(graph.meta))


def check_spmd(graph: Graph) -> None:
    """Every node reads only its own rank's values (and the shared graph inputs), except collectives,
    ``send_recv`` and the cache split/join at the graph's edge — so that each rank can run alone."""
    where: dict[str, int | None] = {v.name: None for v in graph.inputs}
    for p in graph.params:
        where[p] = int(p.rsplit("@", 1)[1]) if "@" in p else None
    for n in graph.nodes:
        ranks = n.tags.get("ranks")
        if "rank" in n.tags:
            r = int(n.tags["rank"])
            for i in n.inputs:
                if i and where.get(i) not in (None, r):
                    raise MinitxError(f"parallel: node {n.name} on rank {r} reads {i!r} of rank {where[i]}")
            for o in n.outputs:
                where[o] = r
        elif ranks is not None and n.op == "send_recv":
            where[n.outputs[0]] = int(n.attrs["dst"])
        elif ranks is not None:
            for i, o, r in zip(n.inputs, n.outputs, ranks):
                if where.get(i) not in (None, r):
                    raise MinitxError(f"parallel: collective {n.name} takes {i!r} from rank {where[i]}, not {r}")
                where[o] = r
        elif n.tags.get("interface"):
            if n.op == "split":
                for o in n.outputs:
                    r = int(o.rsplit("@", 1)[1])
                    where[o] = r
            else:
                where[n.outputs[0]] = None
        else:
            raise MinitxError(f"parallel: node {n.name} belongs to no rank")


class ParallelPlugin(Plugin):
    name = "parallel"
    description = "tensor (Megatron), sequence (Ulysses, ring) and pipeline parallelism: one SPMD graph, every rank's part"
    order = 95            # last: shard what the other rewrites produced
    exact = True
    options = {
        "tp": Option(1, positive_int, "tensor-parallel ranks (heads, KV heads, FFN and vocabulary split)"),
        "pp": Option(1, positive_int, "pipeline stages (contiguous layers)"),
        "mb": Option(1, positive_int, "micro-batches streamed through the pipeline (batch >= mb)"),
        "sp": Option(1, positive_int, "sequence-parallel ranks (Ulysses: all-to-all between tokens and heads)"),
        "ring": Option(0, int, "1: sequence-parallel attention by ring attention (K/V blocks around the ranks)"),
    }

    def tolerance(self, opts: Mapping[str, Any]) -> Tolerance:
        return Tolerance(exact=True)

    def apply(self, graph: Graph, params: Mapping[str, np.ndarray], opts: Mapping[str, Any], *,
              calib=None) -> RewriteResult:
        from minitx.rewrite import Firing

        layout = Layout(int(opts.get("tp", 1)), int(opts.get("pp", 1)), int(opts.get("mb", 1)), int(opts.get("sp", 1)),
                        int(opts.get("ring", 0)))
        g, p = shard(graph, params, layout)
        firings = [Firing("parallel", n.name, n.op, [n.name], [n.op], 0) for n in g.nodes
                   if n.tags.get("parallel") or n.tags.get("ranks")]
        return RewriteResult(g, p, firings, 1)


def plugin() -> ParallelPlugin:
    return ParallelPlugin()
