"""Sparsity plugin: attention over a pattern of keys, and pruned weights stored compactly.

    minitx optimize model.npz --plugin sparsity:attention=local,window=128 -o model.local.npz
    minitx optimize model.npz --plugin sparsity:weights=wanda,sparsity=0.5 -o model.w50.npz

Attention (``attention=``): every ``attention`` node becomes ``sparse_attention`` with the pattern
``local`` (``window``), ``block`` (``block``, ``n_global``), ``strided`` (``stride``), ``topk``
(``topk``; dense up to ``dense_below`` keys, where selecting costs more than it saves),
``threshold`` (``threshold``) or ``composite`` — dense up to ``dense_below`` keys, the ``long``
pattern beyond. Weights (``weights=``), on the linears inside the Transformer blocks
(``targets=all|attn|mlp``):

==============  ==============================================================================
``magnitude``   drop the smallest |W|, per layer or over all layers at once (``scope=global``)
``wanda``       drop the smallest |W_io|·‖X_i‖ per output (Sun et al., 2023), X = calibration inputs
``nm``          N:M structured (``n``:``m``, 2:4 by default): per output, n of every m inputs
``heads``       remove whole attention heads (KV groups under GQA) of lowest calibrated importance,
                in self- and cross-attention (an encoder–decoder's cross-attention keys/values
                shrink with its heads; T5's self-attention keeps one set of heads per stack,
                those most important summed over its layers, as its relative-position table
                gives head h the same bias column in every layer: the table keeps those columns)
``ffn``         remove MLP neurons of lowest calibrated importance ‖a_j‖·‖W_down[j]‖
==============  ==============================================================================

Unstructured pruning stores Wᵀ as CSR (``sparse_linear``; ``format=dense`` keeps zeros in a plain
linear); N:M stores packed values and 2-bit positions, input-major (``nm_linear``); heads/ffn
shrink the matrices. Speed on the numba backend (benchmarks/results/sparse_crossover.md,
structured_pruning.md): heads/ffn make a smaller dense model whose blocks run in proportion to
what is kept; 2:4 decodes through a packed kernel at or above dense speed (faster still with
int8 values, ``quant`` after pruning) and prefills (dense panels + BLAS above 16 rows) at about
0.6-0.8× dense; CSR beats dense only at high sparsity (decode about 86-90%, prefill about 80%).
Every mode but an attention pattern that covers the sequence is approximate, and ``minitx optimize`` checks it against the declared
tolerance (``TOLERANCE``; minitx.plugin.Tolerance):

==========================  =========  =======  ==========
mode                        mean cos   KL       perplexity
==========================  =========  =======  ==========
attention patterns          >= 0.99    <= 0.05  <= +5%
magnitude / wanda / nm      >= 0.95    <= 0.05  <= +5%
heads / ffn (structural)    >= 0.9     <= 0.1   <= +10%
==========================  =========  =======  ==========

(KL: mean next-token KL in nats; KL and perplexity apply to decoders, the mean per-row cosine
to every primary output; top-1 agreement is reported, and bounded only with ``min_top1=``.) On the bundled Austen decoder, validated on held-out
text, 50% magnitude or Wanda pruning and 25% of heads pass (KL about 0.01, perplexity +0.5 to
+1.5%) although single tokens' logits fall to cosine 0.85; 70% magnitude pruning (KL 0.07,
+8%) and 95% (KL 1.3) are refused. The options ``min_cosine=``, ``max_kl=``,
``min_top1=``, ``max_ppl_increase=`` (relative: 0.05 = +5%), ``min_row_cosine=`` (the worst row,
off by default) and ``max_rel=`` override one bound each; ``inf`` (or 0 for a minimum) turns one off.

``wanda``, ``heads`` and ``ffn`` read activations: they run the graph on the calibration input of
``minitx optimize`` (``--calib file:PATH``, texts or ids), less the sequences held out to validate
the rewrite on (minitx.validate.Calibration.split). Without ``--calib`` those are seeded random
tokens, whose activation norms are unrepresentative of text; the rewrite's log entry and a
warning say so.

The weight transforms are pure functions of arrays (``magnitude_masks``, ``wanda_masks``,
``nm_masks``, ``to_csr``, ``to_nm``, ``head_importance``, ``neuron_importance``), tested alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np
import scipy.sparse

from minitx.errors import MinitxError
from minitx.executor import Executor
from minitx.ir import Graph, Node, Value
from minitx.ops import sparse as S
from minitx.plugin import CalibrationData, Option, Plugin, Tolerance, positive_int
from minitx.rewrite import Context, Replacement, Rule

ATTENTION = ("none", "dense", "local", "block", "strided", "topk", "threshold", "composite")
WEIGHTS = ("none", "magnitude", "wanda", "nm", "heads", "ffn")
CALIBRATED = ("wanda", "heads", "ffn")     # weight methods that read activations on calibration inputs
# Declared tolerance per mode (see the module docstring); a rewrite combining modes gets the loosest.
_UNSTRUCTURED = Tolerance(min_cosine=0.95, max_kl=0.05, max_ppl_increase=0.05)
_STRUCTURAL = Tolerance(min_cosine=0.9, max_kl=0.1, max_ppl_increase=0.1)
TOLERANCE = {"attention": Tolerance(min_cosine=0.99, max_kl=0.05, max_ppl_increase=0.05),
             "magnitude": _UNSTRUCTURED, "wanda": _UNSTRUCTURED, "nm": _UNSTRUCTURED,
             "heads": _STRUCTURAL, "ffn": _STRUCTURAL}


def sparsity_fraction(s: str) -> float:
    v = float(s)
    if not 0.0 <= v < 1.0:
        raise ValueError("sparsity must be in [0, 1)")
    return v


def unit_interval(s: str) -> float:
    v = float(s)
    if not 0.0 < v <= 1.0:
        raise ValueError("must be in (0, 1]")
    return v


# ================================================================== pure weight transforms
def magnitude_masks(weights: Mapping[str, np.ndarray], sparsity: float, scope: str = "layer") -> dict[str, np.ndarray]:
    """Keep-masks dropping the ``sparsity`` fraction of smallest |W|: within each matrix
    (``layer``) or with one threshold over all of them (``global``)."""
    if not 0.0 <= sparsity < 1.0:
        raise MinitxError(f"sparsity must be in [0, 1), got {sparsity}")
    if scope == "global":
        allw = np.concatenate([np.abs(w).ravel() for w in weights.values()])
        k = int(sparsity * allw.size)
        cut = np.partition(allw, k - 1)[k - 1] if k else -np.inf
        return {n: np.abs(w) > cut for n, w in weights.items()}
    if scope != "layer":
        raise MinitxError(f"scope must be layer or global, got {scope!r}")
    out = {}
    for n, w in weights.items():
        k = int(sparsity * w.size)
        order = np.argsort(np.abs(w), axis=None, kind="stable")
        keep = np.ones(w.size, bool)
        keep[order[:k]] = False
        out[n] = keep.reshape(w.shape)
    return out


def wanda_masks(weights: Mapping[str, np.ndarray], input_norms: Mapping[str, np.ndarray],
                sparsity: float) -> dict[str, np.ndarray]:
    """Wanda: score |W_io|·‖X_i‖₂ (W stored (in, out), ‖X_i‖ over calibration tokens) and drop the
    lowest ``sparsity`` fraction of each output's inputs."""
    if not 0.0 <= sparsity < 1.0:
        raise MinitxError(f"sparsity must be in [0, 1), got {sparsity}")
    out = {}
    for n, w in weights.items():
        score = np.abs(w) * input_norms[n][:, None]
        k = int(sparsity * w.shape[0])
        order = np.argsort(score, axis=0, kind="stable")[:k]      # per output column
        keep = np.ones(w.shape, bool)
        np.put_along_axis(keep, order, False, axis=0)
        out[n] = keep
    return out


def nm_masks(scores: Mapping[str, np.ndarray], n: int, m: int) -> dict[str, np.ndarray]:
    """Per output, keep the ``n`` highest-scoring of every ``m`` consecutive inputs."""
    if not 0 < n < m:
        raise MinitxError(f"N:M needs 0 < n < m, got {n}:{m}")
    out = {}
    for name, s in scores.items():
        if s.shape[0] % m:
            raise MinitxError(f"N:M {n}:{m}: {name} has {s.shape[0]} inputs, not a multiple of {m}")
        g = s.reshape(s.shape[0] // m, m, s.shape[1])
        top = np.argsort(-g, axis=1, kind="stable")[:, :n]
        keep = np.zeros(g.shape, bool)
        np.put_along_axis(keep, top, True, axis=1)
        out[name] = keep.reshape(s.shape)
    return out


def to_csr(w: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(data, indices, indptr) of the CSR Wᵀ (out, in) holding the kept weights; indices in int16
    when the inputs fit (6 bytes per float32 weight instead of 8)."""
    csr = scipy.sparse.csr_array(np.where(keep, w, 0).T)
    csr.eliminate_zeros()
    idx_t = np.int16 if w.shape[0] <= np.iinfo(np.int16).max else np.int32
    ptr_t = np.int32 if csr.nnz <= np.iinfo(np.int32).max else np.int64
    return csr.data.astype(w.dtype), csr.indices.astype(idx_t), csr.indptr.astype(ptr_t)


def to_nm(w: np.ndarray, keep: np.ndarray, n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(values (in/m·n, out), packed positions) of an N:M keep-mask (exactly n per group)."""
    return S.nm_pack(w, keep, n, m)


def head_importance(out_heads: np.ndarray, w_out: np.ndarray, n_units: int) -> np.ndarray:
    """Per unit (a head, or a KV group of heads), ‖its share of the output projection‖²:
    Σ_tokens ‖a_h W_o[h rows]‖² with a_h the unit's slice of the attention output."""
    a = out_heads.reshape(-1, out_heads.shape[-1])
    width = a.shape[1] // n_units
    return np.array([np.sum((a[:, u * width:(u + 1) * width] @ w_out[u * width:(u + 1) * width]) ** 2)
                     for u in range(n_units)])


def neuron_importance(acts: np.ndarray, w_down: np.ndarray) -> np.ndarray:
    """Per MLP neuron j: ‖a_j‖₂ over calibration tokens times ‖W_down[j, :]‖₂."""
    a = acts.reshape(-1, acts.shape[-1])
    return np.linalg.norm(a, axis=0) * np.linalg.norm(w_down, axis=1)


def keep_top(scores: np.ndarray, fraction_removed: float) -> np.ndarray:
    """Sorted indices of the units kept when the lowest ``fraction_removed`` go (at least one stays)."""
    k = min(int(fraction_removed * scores.size), scores.size - 1)
    return np.sort(np.argsort(scores, kind="stable")[k:])


# ================================================================== graph helpers
def block_linears(graph: Graph, targets: str = "all") -> list[Node]:
    """The ``linear`` nodes inside Transformer blocks (tagged with a layer) whose weight is a
    parameter: attention (``.attn.``) and/or MLP (``.mlp.``) projections."""
    want = {"all": (".attn.", ".mlp."), "attn": (".attn.",), "mlp": (".mlp.",)}[targets]
    return [n for n in graph.nodes if n.op == "linear" and "layer" in n.tags and n.inputs[1] in graph.params
            and any(w in n.name for w in want)]


def calibration_run(graph: Graph, params: Mapping[str, np.ndarray], keep: Iterable[str],
                    calib: CalibrationData | None, who: str = "sparsity") -> dict[str, list[np.ndarray]]:
    """The values named in ``keep``, as (tokens, features) rows, on every calibration sequence
    (one run each). ``calib`` is what :func:`minitx.plugin.optimize` passes to an activation-aware
    plugin's ``apply``; without it there is nothing representative to measure, so it is an error."""
    from minitx import feeds

    if calib is None or not calib.sequences:
        raise MinitxError(f"{who}: this rewrite reads activations and needs calibration sequences; apply it with "
                          "minitx.plugin.optimize (or `minitx optimize --calib ...`), which passes them")
    ex = Executor(graph, params)
    keep = list(keep)
    got: dict[str, list[np.ndarray]] = {k: [] for k in keep}
    for ids in calib.sequences:
        r = ex.run(feeds.build(graph, [list(ids)]), outputs=[], keep=keep)
        for k in keep:
            got[k].append(r[k].reshape(-1, r[k].shape[-1]))
    return got


def _done(node: Node) -> bool:
    return "rule" in node.tags


# ================================================================== the plugin
class SparsityPlugin(Plugin):
    name = "sparsity"
    description = "sparse attention patterns; pruned weights stored compactly (CSR, N:M), heads/neurons removed"
    order = 30
    positional = None
    exact = False
    options = {
        "attention": Option("none", help="attention pattern", choices=ATTENTION),
        "window": Option(128, positive_int, "local: keys within this distance"),
        "block": Option(64, positive_int, "block: block size"),
        "n_global": Option(1, int, "block: leading blocks every query sees"),
        "stride": Option(64, positive_int, "strided: stride (and local width)"),
        "topk": Option(32, positive_int, "topk: keys kept per query"),
        "threshold": Option(0.01, unit_interval, "threshold: min weight relative to the row's largest"),
        "dense_below": Option(1024, positive_int, "composite and topk: dense up to this many keys"),
        "long": Option("local", help="composite: pattern beyond dense_below",
                       choices=("local", "block", "strided", "topk", "threshold")),
        "weights": Option("none", help="weight pruning method", choices=WEIGHTS),
        "sparsity": Option(0.5, sparsity_fraction, "fraction of weights (heads, neurons) removed, in [0, 1)"),
        "scope": Option("layer", help="magnitude: per layer or global", choices=("layer", "global")),
        "n": Option(2, positive_int, "N of N:M"),
        "m": Option(4, positive_int, "M of N:M"),
        "targets": Option("all", help="which block linears", choices=("all", "attn", "mlp")),
        "format": Option("compact", help="compact (CSR / N:M ops) or dense (zeros kept)", choices=("compact", "dense")),
        **Tolerance.options(),
    }

    def check_options(self, opts: Mapping[str, Any]) -> None:
        if opts["attention"] == "none" and opts["weights"] == "none":
            raise MinitxError("nothing to do: give attention=PATTERN and/or weights=METHOD")
        if opts["weights"] == "nm" and not opts["n"] < opts["m"]:
            raise MinitxError(f"N:M needs n < m, got {opts['n']}:{opts['m']}")
        if opts["m"] > 256:
            raise MinitxError(f"m must be at most 256, got {opts['m']}")

    def uses_calibration(self, opts: Mapping[str, Any]) -> bool:
        return opts["weights"] in CALIBRATED

    def tolerance(self, opts: Mapping[str, Any]) -> Tolerance:
        if opts["weights"] == "none" and opts["attention"] == "dense":
            return Tolerance(exact=True)
        keys = ([opts["weights"]] if opts["weights"] != "none" else []) + (
            ["attention"] if opts["attention"] != "none" else [])
        return Tolerance.loosest(*(TOLERANCE[k] for k in keys)).override(opts)

    # ---------------------------------------------------------------- rules
    def rules(self, opts: Mapping[str, Any]) -> list[Rule]:
        out = []
        if opts["attention"] != "none":
            out.append(Rule("sparsity.attention", "attention", _attention_rule, exact=opts["attention"] == "dense"))
        method = opts["weights"]
        if method in ("magnitude", "wanda", "nm"):
            out.append(Rule(f"sparsity.{method}", "linear", _pruned_linear_rule))
        elif method == "heads":
            out += [Rule("sparsity.heads", op, _heads_rule)
                    for op in ("linear", "split", "rope", "attention", "cross_attention", "concat",
                               "relative_position_bias")]
        elif method == "ffn":
            out.append(Rule("sparsity.ffn", "linear", _ffn_rule))
        return out

    def analyze(self, graph: Graph, params: Mapping[str, np.ndarray], opts: Mapping[str, Any],
                calib: CalibrationData | None = None) -> "SparsityPlan":
        method = opts["weights"]
        if method in ("magnitude", "wanda", "nm"):
            return SparsityPlan(masks=_weight_masks(graph, params, opts, calib))
        if method == "heads":
            return SparsityPlan(heads=_plan_heads(graph, params, opts, calib))
        if method == "ffn":
            return SparsityPlan(ffn=_plan_ffn(graph, params, opts, calib))
        return SparsityPlan()


@dataclass(frozen=True)
class KeptHeads:
    """The heads one attention block keeps: counts, the columns of its qkv and output weights
    that belong to them, the split sizes of q/k/v, and which KV groups survive."""

    n_heads: int
    n_kv_heads: int
    q_cols: np.ndarray
    qkv_cols: np.ndarray
    sizes: list[int]
    groups: list[int]


@dataclass(frozen=True)
class SparsityPlan:
    """What :meth:`SparsityPlugin.analyze` decided, per weight pruning method: ``masks`` (weight
    name → boolean keep mask; magnitude, wanda, N:M), ``heads`` (node name → its role in an
    attention block and the heads kept there) or ``ffn`` (node name → "up"/"down" and the kept
    neuron indices, or the kept columns of a gated up projection)."""

    masks: dict[str, np.ndarray] = field(default_factory=dict)
    heads: dict[str, tuple[str, KeptHeads]] = field(default_factory=dict)
    ffn: dict[str, tuple[str, np.ndarray]] = field(default_factory=dict)


def plugin() -> SparsityPlugin:
    """Entry point ``minitx.plugins: sparsity``."""
    return SparsityPlugin()


# ---------------------------------------------------------------- attention
def _attention_rule(node: Node, ctx: Context) -> Replacement | None:
    o = ctx.options
    pat = o["attention"]
    attrs = dict(node.attrs)
    if pat == "composite":
        pat = o["long"]
    if o["attention"] == "composite" or pat == "topk":
        # top-k is dense up to dense_below (1024) keys: below ~1000 keys selecting costs about what
        # the values' pass saves (benchmarks/results/attention_patterns_cpu.md)
        attrs["dense_below"] = o["dense_below"]
    attrs["pattern"] = pat
    extra = {"local": ("window",), "block": ("block", "n_global"), "strided": ("stride",), "topk": ("topk",),
             "threshold": ("threshold",)}.get(pat, ())
    for k in extra:
        attrs[k] = o[k]
    new = Node(ctx.fresh(node.name + ".sparse"), "sparse_attention", list(node.inputs), list(node.outputs), attrs,
               dict(node.tags))
    return Replacement([new])


# ---------------------------------------------------------------- unstructured / N:M
def _weight_masks(graph: Graph, params: Mapping[str, np.ndarray], opts: Mapping[str, Any],
                  calib: CalibrationData | None) -> dict[str, np.ndarray]:
    nodes = block_linears(graph, opts["targets"])
    if not nodes:
        raise MinitxError("sparsity: no linear layer inside a Transformer block to prune")
    weights = {n.inputs[1]: np.asarray(params[n.inputs[1]]) for n in nodes}
    method = opts["weights"]
    if method == "magnitude":
        return magnitude_masks(weights, opts["sparsity"], opts["scope"])
    if method == "wanda":
        acts = calibration_run(graph, params, sorted({n.inputs[0] for n in nodes}), calib)
        norms = {n.inputs[1]: np.linalg.norm(np.concatenate(acts[n.inputs[0]]).astype(np.float64), axis=0)
                 for n in nodes}
        return wanda_masks(weights, norms, opts["sparsity"])
    n, m = opts["n"], opts["m"]
    for name, w in weights.items():
        if w.shape[0] % m:
            raise MinitxError(f"sparsity: N:M {n}:{m} needs in_features divisible by {m}; {name} has {w.shape[0]}")
    return nm_masks({k: np.abs(w) for k, w in weights.items()}, n, m)


def _pruned_linear_rule(node: Node, ctx: Context) -> Replacement | None:
    o = ctx.options
    x, w, *rest = node.inputs
    masks = ctx.plan.masks
    if w not in masks or _done(node):
        return None
    W, keep = ctx.param(w), masks[w]
    b = rest[0] if rest else ""
    base = w[:-len(".weight")] if w.endswith(".weight") else w
    if o["format"] == "dense":
        nw = ctx.add_param(w + ".pruned", np.where(keep, W, 0).astype(W.dtype))
        new = ctx.node("linear", [x, nw, b], node.outputs, name=node.name + ".pruned", tags=node.tags)
    elif o["weights"] == "nm":
        values, packed = to_nm(W, keep, o["n"], o["m"])
        nv, ni = ctx.add_param(base + ".nm.values", values), ctx.add_param(base + ".nm.idx", packed)
        new = ctx.node("nm_linear", [x, nv, ni, b], node.outputs, name=node.name + ".nm", tags=node.tags,
                       n=o["n"], m=o["m"], in_features=int(W.shape[0]))
    else:
        data, indices, indptr = to_csr(W, keep)
        ins = [x] + [ctx.add_param(f"{base}.csr.{k}", a) for k, a in
                     (("data", data), ("indices", indices), ("indptr", indptr))] + [b]
        new = ctx.node("sparse_linear", ins, node.outputs, name=node.name + ".csr", tags=node.tags,
                       shape=[int(W.shape[1]), int(W.shape[0])])
    return Replacement([new])


# ---------------------------------------------------------------- heads
def _attention_blocks(graph: Graph) -> list[dict[str, Node]]:
    """Per attention node: its qkv linear, split, ropes and output linear (the models' layout)."""
    prod = graph.producers()
    cons = graph.consumers()
    blocks = []
    for a in graph.nodes:
        if a.op != "attention":
            continue
        parts: dict[str, Node] = {"attn": a}
        src = prod.get(a.inputs[0])
        if src is not None and src.op == "rope":
            parts["rope_q"] = src
            kr = prod.get(a.inputs[1])
            if kr is None or kr.op != "rope":
                continue
            parts["rope_k"] = kr
            src = prod.get(src.inputs[0])
        if src is None or src.op != "split":
            continue
        parts["split"] = src
        qkv = prod.get(src.inputs[0])
        outs = cons.get(a.outputs[0], [])
        if qkv is None or qkv.op != "linear" or len(outs) != 1 or outs[0].op != "linear":
            continue
        if qkv.inputs[1] not in graph.params or outs[0].inputs[1] not in graph.params:
            continue
        parts["qkv"], parts["out"] = qkv, outs[0]
        blocks.append(parts)
    return blocks


def _cross_blocks(graph: Graph) -> list[dict[str, Node]]:
    """Per ``cross_attention`` node without a position bias (an encoder–decoder's cross-attention):
    its query linear, the linear and split making its keys/values from the encoder output (run
    once per input at generation), and its output linear. T5's self-attention is a
    ``cross_attention`` too, but with the relative-position bias its stack shares (:func:`_t5_blocks`)."""
    prod, cons = graph.producers(), graph.consumers()
    blocks = []
    for a in graph.nodes:
        if a.op != "cross_attention" or (len(a.inputs) > 4 and a.inputs[4]):
            continue
        q, split = prod.get(a.inputs[0]), prod.get(a.inputs[1])
        kv = prod.get(split.inputs[0]) if split is not None and split.op == "split" else None
        outs = cons.get(a.outputs[0], [])
        if (q is None or kv is None or q.op != "linear" or kv.op != "linear" or prod.get(a.inputs[2]) is not split
                or len(split.outputs) != 2 or len(outs) != 1 or outs[0].op != "linear"):
            continue
        if not all(n.inputs[1] in graph.params for n in (q, kv, outs[0])):
            continue
        blocks.append({"cross": a, "q": q, "qkv": kv, "split": split, "out": outs[0]})
    return blocks


def _t5_blocks(graph: Graph) -> list[dict[str, Node]]:
    """Per ``cross_attention`` biased by a ``relative_position_bias`` (T5's self-attention): its
    qkv linear and split, the concats onto the decoder's cache (``cache_k``/``cache_v``, if any),
    the output linear, and the bias node its stack shares (``relpos``)."""
    prod, cons = graph.producers(), graph.consumers()
    blocks = []
    for a in graph.nodes:
        if a.op != "cross_attention" or len(a.inputs) < 5 or not a.inputs[4]:
            continue
        rp, split = prod.get(a.inputs[4]), prod.get(a.inputs[0])
        if rp is None or rp.op != "relative_position_bias" or split is None or split.op != "split" \
                or len(split.outputs) != 3:
            continue
        parts: dict[str, Node] = {"t5attn": a, "split": split, "relpos": rp}
        for key, x, j in (("cache_k", a.inputs[1], 1), ("cache_v", a.inputs[2], 2)):
            src = prod.get(x)
            if src is not None and src.op == "concat" and len(src.inputs) == 2:
                parts[key], x = src, src.inputs[1]
            if x != split.outputs[j]:
                break
        else:
            qkv, outs = prod.get(split.inputs[0]), cons.get(a.outputs[0], [])
            if (qkv is not None and qkv.op == "linear" and len(outs) == 1 and outs[0].op == "linear"
                    and qkv.inputs[1] in graph.params and outs[0].inputs[1] in graph.params
                    and rp.inputs[0] in graph.params):
                parts["qkv"], parts["out"] = qkv, outs[0]
                blocks.append(parts)
    return blocks


def _plan_heads(graph: Graph, params: Mapping[str, np.ndarray], opts: Mapping[str, Any],
                calib: CalibrationData | None) -> dict[str, tuple[str, KeptHeads]]:
    """node name → its role and the kept query/KV heads of its attention block, from calibration."""
    blocks, cross, t5 = _attention_blocks(graph), _cross_blocks(graph), _t5_blocks(graph)
    if not blocks and not cross and not t5:
        raise MinitxError("sparsity: heads pruning found no qkv → attention → out block")
    acts = calibration_run(graph, params, [b["attn"].outputs[0] for b in blocks]
                           + [b["cross"].outputs[0] for b in cross]
                           + [b["t5attn"].outputs[0] for b in t5], calib)
    plan: dict[str, tuple[str, KeptHeads]] = {}
    stacks: dict[str, list[dict[str, Node]]] = {}
    for b in t5:
        stacks.setdefault(b["relpos"].name, []).append(b)
    readers = graph.consumers()
    for bs in stacks.values():   # T5: one set of heads per stack, the bias table's columns with them
        rp = bs[0]["relpos"]
        if {n.name for n in readers.get(rp.outputs[0], [])} != {b["t5attn"].name for b in bs}:
            continue   # the bias feeds something else too: its heads stay
        H = int(bs[0]["t5attn"].attrs["n_heads"])
        D = params[bs[0]["out"].inputs[1]].shape[0] // H
        score = sum(head_importance(np.concatenate(acts[b["t5attn"].outputs[0]]), params[b["out"].inputs[1]], H)
                    for b in bs)
        heads = keep_top(score, opts["sparsity"])
        cols = np.concatenate([np.arange(h * D, (h + 1) * D) for h in heads])
        info = KeptHeads(len(heads), len(heads), cols, np.concatenate([cols, H * D + cols, 2 * H * D + cols]),
                         [len(cols)] * 3, heads.tolist())
        plan[rp.name] = ("relpos", info)
        for b in bs:
            for key in ("t5attn", "qkv", "split", "out", "cache_k", "cache_v"):
                if key in b:
                    plan[b[key].name] = (key, info)
    for b in cross:   # keys/values from the encoder, one unit = one head
        a = b["cross"]
        H = int(a.attrs["n_heads"])
        Wo = params[b["out"].inputs[1]]
        D = Wo.shape[0] // H
        heads = keep_top(head_importance(np.concatenate(acts[a.outputs[0]]), Wo, H), opts["sparsity"])
        cols = np.concatenate([np.arange(h * D, (h + 1) * D) for h in heads])
        info = KeptHeads(len(heads), len(heads), cols, np.concatenate([cols, H * D + cols]), [len(cols)] * 2,
                         heads.tolist())
        for key in ("cross", "q", "qkv", "split", "out"):
            plan[b[key].name] = (key, info)
    for b in blocks:
        a = b["attn"]
        H, KV = int(a.attrs["n_heads"]), int(a.attrs["n_kv_heads"])
        Wo = params[b["out"].inputs[1]]
        D = Wo.shape[0] // H
        G = H // KV
        score = head_importance(np.concatenate(acts[a.outputs[0]]), Wo, KV)   # one unit = a KV group
        groups = keep_top(score, opts["sparsity"])
        q_heads = np.concatenate([np.arange(g * G, (g + 1) * G) for g in groups])
        q_cols = np.concatenate([np.arange(h * D, (h + 1) * D) for h in q_heads])
        kv_cols = np.concatenate([np.arange(g * D, (g + 1) * D) for g in groups])
        C = H * D
        qkv_cols = np.concatenate([q_cols, C + kv_cols, C + KV * D + kv_cols])
        info = KeptHeads(len(q_heads), len(groups), q_cols, qkv_cols, [len(q_cols), len(kv_cols), len(kv_cols)],
                         groups.tolist())
        for key in ("attn", "qkv", "out", "split", "rope_q", "rope_k"):
            if key in b:
                plan[b[key].name] = (key, info)
    return plan


def _heads_rule(node: Node, ctx: Context) -> Replacement | None:
    entry = ctx.plan.heads.get(node.name)
    if entry is None or _done(node):
        return None
    role, info = entry
    attrs, ins = dict(node.attrs), list(node.inputs)
    if role == "qkv":
        ins[1] = ctx.add_param(ins[1] + ".heads", ctx.param(ins[1])[:, info.qkv_cols])
        if len(ins) > 2 and ins[2]:
            ins[2] = ctx.add_param(ins[2] + ".heads", ctx.param(ins[2])[info.qkv_cols])
    elif role == "q":
        ins[1] = ctx.add_param(ins[1] + ".heads", ctx.param(ins[1])[:, info.q_cols])
        if len(ins) > 2 and ins[2]:
            ins[2] = ctx.add_param(ins[2] + ".heads", ctx.param(ins[2])[info.q_cols])
    elif role in ("cross", "t5attn"):
        attrs["n_heads"] = info.n_heads
    elif role == "relpos":   # (num_buckets, H) → the kept heads' columns
        ins[0] = ctx.add_param(ins[0] + ".heads", ctx.param(ins[0])[:, np.asarray(info.groups)])
    elif role == "out":
        ins[1] = ctx.add_param(ins[1] + ".heads", ctx.param(ins[1])[info.q_cols])
    elif role == "split":
        attrs["sizes"] = info.sizes
    elif role == "rope_q":
        attrs["n_heads"] = info.n_heads
    elif role == "rope_k":
        attrs["n_heads"] = info.n_kv_heads
    elif role == "attn":
        attrs["n_heads"], attrs["n_kv_heads"] = info.n_heads, info.n_kv_heads
    redeclared = []
    if role in ("attn", "cache_k", "cache_v"):  # the KV cache inputs narrow with the kept KV heads
        width = info.sizes[1]
        for name in (ins[3:5] if role == "attn" else ins[:1]):
            v = next((v for v in ctx.graph.inputs if v.name == name), None) if name else None
            if v is not None:
                redeclared.append(Value(v.name, (*v.shape[:-1], width), v.dtype))
    new = Node(ctx.fresh(node.name + ".heads"), node.op, ins, list(node.outputs), attrs,
               {**node.tags, "kept_kv_groups": info.groups} if role in ("attn", "cross", "t5attn") else dict(node.tags))
    return Replacement([new], inputs=redeclared)


# ---------------------------------------------------------------- ffn neurons
def _plan_ffn(graph: Graph, params: Mapping[str, np.ndarray], opts: Mapping[str, Any],
              calib: CalibrationData | None) -> dict[str, tuple[str, np.ndarray]]:
    prod = graph.producers()
    plan: dict[str, tuple[str, np.ndarray]] = {}
    downs = [n for n in graph.nodes if n.op == "linear" and n.name.endswith(".mlp.down") and n.inputs[1] in graph.params]
    pairs = []
    for d in downs:
        act = prod.get(d.inputs[0])
        up = prod.get(act.inputs[0]) if act is not None else None
        if act is None or up is None or up.op != "linear" or up.inputs[1] not in graph.params:
            continue
        pairs.append((up, act, d))
    if not pairs:
        raise MinitxError("sparsity: ffn pruning found no up → activation → down MLP")
    acts = calibration_run(graph, params, [d.inputs[0] for _, _, d in pairs], calib)
    for up, act, d in pairs:
        score = neuron_importance(np.concatenate(acts[d.inputs[0]]), params[d.inputs[1]])
        kept = keep_top(score, opts["sparsity"])
        F = params[d.inputs[1]].shape[0]
        up_cols = np.concatenate([kept, F + kept]) if act.op == "swiglu" else kept  # gate | up halves
        plan[up.name] = ("up", up_cols)
        plan[d.name] = ("down", kept)
    return plan


def _ffn_rule(node: Node, ctx: Context) -> Replacement | None:
    entry = ctx.plan.ffn.get(node.name)
    if entry is None or _done(node):
        return None
    role, idx = entry
    ins = list(node.inputs)
    if role == "up":
        ins[1] = ctx.add_param(ins[1] + ".ffn", ctx.param(ins[1])[:, idx])
        if len(ins) > 2 and ins[2]:
            ins[2] = ctx.add_param(ins[2] + ".ffn", ctx.param(ins[2])[idx])
    else:
        ins[1] = ctx.add_param(ins[1] + ".ffn", ctx.param(ins[1])[idx])
    return Replacement([Node(ctx.fresh(node.name + ".ffn"), node.op, ins, list(node.outputs), dict(node.attrs),
                             dict(node.tags))])
