"""ONNX export: the minitx IR, op by op, as an ONNX graph that ONNX Runtime (or TensorRT) can run.

Every minitx op maps to a fixed pattern of standard ONNX ops (opset :data:`OPSET`), so the exported
graph computes what the NumPy spec computes: inputs and outputs keep the graph's own names, a
decoder's KV cache stays an explicit input (``past.*``) and output (``present.*``) so a runtime
decodes step by step, and symbolic dims (``B``, ``T``, ``S``) stay symbolic. Rewritten graphs export
too: int8 weights as QDQ (``DequantizeLinear`` → ``MatMul``), W8A8 and Q8_0 (``linear_q8_0``: int8
activations per block too) as ``MatMulInteger``, int4 as
``com.microsoft.MatMulNBits`` (the layout ONNX Runtime's int4 kernels read), int8 KV caches as int8
inputs/outputs with their scales, sparse linears as their dense equivalent, low-rank linears
factored, sparse attention as masks. An op with no ONNX equivalent (Nyström attention's
pseudo-inverse, training losses) is a :class:`MinitxError` naming the op and the node.

The same converter serves the ``onnxruntime`` backend, which exports segments of a graph (or one
node) and runs them in ONNX Runtime sessions.
"""
from __future__ import annotations

import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from . import ops
from .errors import MinitxError
from .ir import Graph, Node, symbols

OPSET = 21                     # DequantizeLinear with block_size, Gelu (20), Split num_outputs (18)
MS_DOMAIN = "com.microsoft"    # MatMulNBits: ONNX Runtime's int4 weight-only matmul
PROTOBUF_LIMIT = 2 ** 31       # a single ONNX protobuf cannot exceed 2 GB


def require_onnx():
    try:
        import onnx
    except ImportError:
        raise MinitxError("ONNX export needs the onnx package: pip install 'minitx[onnx]'") from None
    return onnx


# ------------------------------------------------------------------------------ the builder
@dataclass
class _Ctx:
    """ONNX nodes and initializers under construction, with the dtype of every minitx value."""

    dtypes: dict[str, str]
    shapes: dict[str, tuple]                     # at probe sizes: only ranks and fixed widths are read
    consts: Callable[[str], np.ndarray | None]   # a minitx value's constant array (a parameter), or None
    node: Node | None = None
    nodes: list = field(default_factory=list)
    inits: dict[str, Any] = field(default_factory=dict)
    emitted: Counter = field(default_factory=Counter)
    _small: dict = field(default_factory=dict)   # small constants, shared (every layer reshapes alike)
    _n: int = 0

    def fresh(self, hint: str) -> str:
        self._n += 1
        return f"{self.node.name if self.node else 'g'}/{hint}_{self._n}"

    def op(self, op_type: str, inputs: Sequence[str], outputs: Sequence[str] | int = 1, domain: str = "",
           **attrs: Any) -> Any:
        onnx = require_onnx()
        outs = [self.fresh(op_type) for _ in range(outputs)] if isinstance(outputs, int) else list(outputs)
        self.nodes.append(onnx.helper.make_node(op_type, list(inputs), outs, name=self.fresh(op_type + "_node"),
                                                domain=domain or None, **attrs))
        self.emitted[f"{domain}.{op_type}" if domain else op_type] += 1
        return outs[0] if len(outs) == 1 else outs

    def const(self, a: Any, hint: str = "c") -> str:
        a = np.ascontiguousarray(a)
        key = (a.dtype.str, a.shape, a.tobytes()) if a.size <= 64 else None
        if key in self._small:
            return self._small[key]
        name = self.fresh(hint) if key is None else f"const/{hint}_{len(self._small)}"
        self.inits[name] = require_onnx().numpy_helper.from_array(a, name)
        if key is not None:
            self._small[key] = name
        return name

    def need_const(self, name: str, what: str) -> np.ndarray:
        a = self.consts(name) if name else None
        if a is None:
            n = self.node
            raise MinitxError(f"node {n.name} ({n.op}): its {what} {name!r} must be a parameter to export to ONNX")
        return a

    def width(self, name: str) -> int:
        return int(self.shapes[name][-1])

    def rank(self, name: str) -> int:
        return len(self.shapes[name])

    def ints(self, *v: int) -> str:
        return self.const(np.array(v, np.int64), "i")

    def like(self, x: str, value: float) -> str:
        """A scalar in the float dtype of minitx value ``x``."""
        return self.const(np.array(value, self.dtypes.get(x, "float32")), "k")


def _matmul(cx: _Ctx, x: str, w: str, b: str, out: str) -> None:
    if b:
        cx.op("Add", [cx.op("MatMul", [x, w]), b], [out])
    else:
        cx.op("MatMul", [x, w], [out])


def _swap_last(cx: _Ctx, w: str, rank: int = 2) -> str:
    perm = list(range(rank))
    perm[-1], perm[-2] = perm[-2], perm[-1]
    return cx.op("Transpose", [w], perm=perm)


# ------------------------------------------------------------------------------ op conversions
# Each takes (cx, node, inputs, outputs, attrs); inputs are padded with "" for absent ones.
def _add(cx, n, i, o, a):
    cx.op("Add", i, o)


def _linear(cx, n, i, o, a):
    _matmul(cx, i[0], i[1], i[2], o[0])


def _matmul_op(cx, n, i, o, a):
    b = i[1]
    if a.get("transpose_b"):
        b = _swap_last(cx, b, cx.rank(b))
    cx.op("MatMul", [i[0], b], o)


def _embedding(cx, n, i, o, a):
    cx.op("Gather", [i[1], i[0]], o, axis=0)


def _split(cx, n, i, o, a):
    cx.op("Split", [i[0], cx.ints(*a["sizes"])], o, axis=-1)


def _last_positions(cx, n, i, o, a):
    cx.op("Slice", [i[0], cx.ints(-int(a["n"])), cx.ints(2 ** 62), cx.ints(1)], o)


def _gelu(cx, n, i, o, a):
    cx.op("Gelu", [i[0]], o, approximate=a.get("approximate", "none"))


def _relu(cx, n, i, o, a):
    cx.op("Relu", [i[0]], o)


def _silu_into(cx, x, out):
    cx.op("Mul", [x, cx.op("Sigmoid", [x])], [out] if out else 1)


def _silu(cx, n, i, o, a):
    _silu_into(cx, i[0], o[0])


def _swiglu(cx, n, i, o, a):
    gate, up = cx.op("Split", [i[0]], 2, axis=-1, num_outputs=2)
    cx.op("Mul", [cx.op("Mul", [gate, cx.op("Sigmoid", [gate])]), up], o)


def _softmax(cx, n, i, o, a):
    cx.op("Softmax", [i[0]], o, axis=a.get("axis", -1))


def _identity(cx, n, i, o, a):
    cx.op("Identity", [i[0]], o)


def _scale(cx, n, i, o, a):
    cx.op("Mul", [i[0], cx.like(i[0], a["factor"])], o)


def _layer_norm(cx, n, i, o, a):
    cx.op("LayerNormalization", i[:3], o, axis=-1, epsilon=float(a.get("eps", 1e-5)))


def _rms_norm(cx, n, i, o, a):
    x = i[0]
    ms = cx.op("ReduceMean", [cx.op("Mul", [x, x]), cx.ints(-1)], keepdims=1)
    r = cx.op("Sqrt", [cx.op("Add", [ms, cx.like(x, a.get("eps", 1e-6))])])
    cx.op("Mul", [cx.op("Div", [x, r]), i[1]], o)


def _l2_normalize(cx, n, i, o, a):
    x = i[0]
    nrm = cx.op("Sqrt", [cx.op("ReduceSum", [cx.op("Mul", [x, x]), cx.ints(-1)], keepdims=1)])
    cx.op("Div", [x, cx.op("Max", [nrm, cx.like(x, a.get("eps", 1e-12))])], o)


def _mean_pool(cx, n, i, o, a):
    x, mask = i[0], i[1]
    m = cx.op("Unsqueeze", [cx.op("Cast", [mask], to=_elem(cx.dtypes[x])), cx.ints(-1)])
    num = cx.op("ReduceSum", [cx.op("Mul", [x, m]), cx.ints(1)], keepdims=0)
    den = cx.op("Max", [cx.op("ReduceSum", [m, cx.ints(1)], keepdims=0), cx.like(x, 1e-9)])
    cx.op("Div", [num, den], o)


def _rope(cx, n, i, o, a):
    x, pos = i[0], i[1]
    H = int(a["n_heads"])
    HD = cx.width(x)
    D = HD // H
    inv = float(a.get("theta", 10000.0)) ** (-np.arange(0, D, 2, dtype=np.float64) / D)
    # Angles in float64, as the spec computes them (positions reach thousands of radians).
    ang = cx.op("Mul", [cx.op("Unsqueeze", [cx.op("Cast", [pos], to=_elem("float64")), cx.ints(-1)]),
                        cx.const(inv, "inv_freq")])
    to = _elem(cx.dtypes[x])
    cos = cx.op("Unsqueeze", [cx.op("Cast", [cx.op("Cos", [ang])], to=to), cx.ints(-2)])
    sin = cx.op("Unsqueeze", [cx.op("Cast", [cx.op("Sin", [ang])], to=to), cx.ints(-2)])
    xh = cx.op("Reshape", [x, cx.ints(0, 0, H, D)])
    x1, x2 = cx.op("Split", [xh], 2, axis=-1, num_outputs=2)
    r1 = cx.op("Sub", [cx.op("Mul", [x1, cos]), cx.op("Mul", [x2, sin])])
    r2 = cx.op("Add", [cx.op("Mul", [x2, cos]), cx.op("Mul", [x1, sin])])
    cx.op("Reshape", [cx.op("Concat", [r1, r2], axis=-1), cx.ints(0, 0, HD)], o)


def _sinusoidal(cx, n, i, o, a):
    from .ops.positions import sinusoidal_table

    table = sinusoidal_table(int(a["max_len"]), int(a["dim"])).astype(a.get("dtype", "float32"))
    cx.op("Gather", [cx.const(table, "sinusoid"), i[0]], o, axis=0)


# ---- attention
def _dim(cx, x: str, axis: int) -> str:
    """Scalar int64: the size of ``x`` along ``axis``."""
    return cx.op("Squeeze", [cx.op("Shape", [x], start=axis, end=axis + 1), cx.ints(0)])


def _positions(cx, q: str, K: str) -> tuple[str, str, str]:
    """(i (T, 1), j (1, S_total), S_total): absolute query and key positions, int64."""
    T, S = _dim(cx, q, 1), _dim(cx, K, 1)
    zero, one = cx.const(np.array(0, np.int64)), cx.const(np.array(1, np.int64))
    i = cx.op("Add", [cx.op("Range", [zero, T, one]), cx.op("Sub", [S, T])])
    return cx.op("Unsqueeze", [i, cx.ints(-1)]), cx.op("Unsqueeze", [cx.op("Range", [zero, S, one]), cx.ints(0)]), S


def _pattern_keep(cx, a: dict, keep: str, scores: str, q: str, K: str) -> str:
    """The sparse pattern narrows ``keep`` (see minitx.ops.sparse._restrict)."""
    pattern = a.get("pattern", "dense")
    if pattern == "dense":
        return keep
    i, j, S = _positions(cx, q, K)
    narrowed = keep
    d = cx.op("Sub", [i, j])
    if pattern == "local":
        narrowed = cx.op("And", [keep, cx.op("Less", [cx.op("Abs", [d]), cx.const(np.int64(a["window"]))])])
    elif pattern == "block":
        blk = cx.const(np.int64(a["block"]))
        jb = cx.op("Div", [j, blk])
        same = cx.op("Equal", [cx.op("Div", [i, blk]), jb])
        glob = cx.op("Less", [jb, cx.const(np.int64(a.get("n_global", 0)))])
        narrowed = cx.op("And", [keep, cx.op("Or", [same, glob])])
    elif pattern == "strided":
        st = cx.const(np.int64(a["stride"]))
        near = cx.op("Less", [cx.op("Abs", [d]), st])
        on = cx.op("Equal", [cx.op("Mod", [d, st]), cx.const(np.int64(0))])
        narrowed = cx.op("And", [keep, cx.op("Or", [near, on])])
    elif pattern in ("topk", "threshold"):
        masked = cx.op("Where", [keep, scores, cx.like(q, -np.inf)])
        if pattern == "topk":
            k = cx.op("Min", [cx.op("Unsqueeze", [S, cx.ints(0)]), cx.ints(int(a["topk"]))])
            vals, _ = cx.op("TopK", [masked, k], 2, axis=-1, largest=1, sorted=1)
            cut = cx.op("ReduceMin", [vals, cx.ints(-1)], keepdims=1)       # the k-th largest kept score
        else:
            mx = cx.op("ReduceMax", [masked, cx.ints(-1)], keepdims=1)
            cut = cx.op("Add", [mx, cx.like(q, float(np.log(a["threshold"])))])
        narrowed = cx.op("And", [keep, cx.op("GreaterOrEqual", [masked, cut])])
    else:
        raise MinitxError(f"node {cx.node.name} (sparse_attention): pattern {pattern!r} has no ONNX mapping")
    if a.get("dense_below", 0):
        short = cx.op("LessOrEqual", [S, cx.const(np.int64(a["dense_below"]))])
        return cx.op("Or", [narrowed, cx.op("And", [keep, short])])   # narrowed ⊆ keep
    return narrowed


def _attend(cx, a: dict, q: str, K: str, V: str, mask: str, out: str) -> None:
    """softmax(Q Kᵀ · scale over the allowed keys) V per head, grouped-query; (B, T, H·D) layout."""
    H, KV = int(a["n_heads"]), int(a["n_kv_heads"])
    G = H // KV
    HD = cx.width(q)
    D = HD // H
    scale = 1.0 / np.sqrt(D) if a.get("scale") is None else float(a["scale"])
    qh = cx.op("Transpose", [cx.op("Reshape", [q, cx.ints(0, 0, KV, G, D)])], perm=[0, 2, 3, 1, 4])   # B,KV,G,T,D
    kt = cx.op("Unsqueeze", [cx.op("Transpose", [cx.op("Reshape", [K, cx.ints(0, 0, KV, D)])], perm=[0, 2, 3, 1]),
                             cx.ints(2)])                                                             # B,KV,1,D,S
    vh = cx.op("Unsqueeze", [cx.op("Transpose", [cx.op("Reshape", [V, cx.ints(0, 0, KV, D)])], perm=[0, 2, 1, 3]),
                             cx.ints(2)])                                                             # B,KV,1,S,D
    scores = cx.op("Mul", [cx.op("MatMul", [qh, kt]), cx.like(q, scale)])                            # B,KV,G,T,S
    keep = None
    if a.get("causal"):
        i, j, _ = _positions(cx, q, K)
        keep = cx.op("LessOrEqual", [j, i])                                                           # T,S
    if mask:
        pad = cx.op("Unsqueeze", [cx.op("Cast", [mask], to=_elem("bool")), cx.ints(1, 2, 3)])          # B,1,1,1,S
        keep = pad if keep is None else cx.op("And", [keep, pad])
    if a.get("pattern", "dense") != "dense":
        if keep is None:
            keep = cx.op("Cast", [cx.op("ConstantOfShape", [cx.op("Shape", [scores])],
                                        value=require_onnx().numpy_helper.from_array(np.array([1], np.int64)))],
                         to=_elem("bool"))
        keep = _pattern_keep(cx, a, keep, scores, q, K)
    if keep is not None:
        # As the spec: a masked score is the dtype's lowest finite value, so a row with no key left
        # becomes uniform rather than NaN.
        scores = cx.op("Where", [keep, scores, cx.like(q, float(np.finfo(cx.dtypes[q]).min))])
    p = cx.op("Softmax", [scores], axis=-1)
    o = cx.op("Transpose", [cx.op("MatMul", [p, vh])], perm=[0, 3, 1, 2, 4])                            # B,T,KV,G,D
    cx.op("Reshape", [o, cx.ints(0, 0, HD)], [out])


def _cache(cx, past: str, new: str, out: str) -> str:
    if past:
        return cx.op("Concat", [past, new], [out], axis=1)
    return cx.op("Identity", [new], [out])


def _attention(cx, n, i, o, a):
    q, k, v, pk, pv, mask = i[:6]
    K = _cache(cx, pk, k, o[1])
    V = _cache(cx, pv, v, o[2])
    _attend(cx, a, q, K, V, mask, o[0])


def _quantize_heads(cx, x: str, n_heads: int) -> tuple[str, str]:
    """x (B, T, H·D) → (int8 (B, T, H·D), scale (B, T, H)), as minitx.ops.quant.quantize_heads."""
    HD = cx.width(x)
    xh = cx.op("Reshape", [x, cx.ints(0, 0, n_heads, HD // n_heads)])
    m = cx.op("ReduceMax", [cx.op("Abs", [xh]), cx.ints(-1)], keepdims=0)
    zero = cx.like(x, 0.0)
    pos = cx.op("Greater", [m, zero])
    s = cx.op("Where", [pos, cx.op("Div", [m, cx.like(x, 127.0)]), zero])
    safe = cx.op("Unsqueeze", [cx.op("Where", [cx.op("Greater", [s, zero]), s, cx.like(x, 1.0)]), cx.ints(-1)])
    r = cx.op("Clip", [cx.op("Round", [cx.op("Div", [xh, safe])]), cx.like(x, -127.0), cx.like(x, 127.0)])
    q = cx.op("Reshape", [cx.op("Cast", [r], to=_elem("int8")), cx.ints(0, 0, HD)])
    return q, s


def _dequantize_heads(cx, q: str, s: str, x_like: str, HD: int, n_heads: int) -> str:
    qh = cx.op("Reshape", [cx.op("Cast", [q], to=_elem(cx.dtypes[x_like])), cx.ints(0, 0, n_heads, HD // n_heads)])
    return cx.op("Reshape", [cx.op("Mul", [qh, cx.op("Unsqueeze", [s, cx.ints(-1)])]), cx.ints(0, 0, HD)])


def _attention_kv8(cx, n, i, o, a):
    q, k, v, pk, pks, pv, pvs, mask = i[:8]
    KV = int(a["n_kv_heads"])
    W = cx.width(k)
    kq, ks = _quantize_heads(cx, k, KV)
    vq, vs = _quantize_heads(cx, v, KV)
    Kq, Ks = _cache(cx, pk, kq, o[1]), _cache(cx, pks, ks, o[2])
    Vq, Vs = _cache(cx, pv, vq, o[3]), _cache(cx, pvs, vs, o[4])
    # Attention reads the dequantized cache, the new tokens included (as the spec).
    _attend(cx, a, q, _dequantize_heads(cx, Kq, Ks, k, W, KV), _dequantize_heads(cx, Vq, Vs, v, W, KV), mask, o[0])


# ---- quantized and compressed linears
def _linear_q8(cx, n, i, o, a):
    x, w, s, b = i[:4]
    t = bool(a.get("transposed"))
    wd = cx.op("DequantizeLinear", [w, s], axis=0 if t else 1)
    _matmul(cx, x, _swap_last(cx, wd) if t else wd, b, o[0])


def _linear_q8_block(cx, n, i, o, a):
    x, w, s, b = i[:4]
    wd = cx.op("DequantizeLinear", [w, s], axis=0, block_size=int(a.get("block", 32)))
    _matmul(cx, x, wd, b, o[0])


def _linear_q4(cx, n, i, o, a):
    """int4 weights as MatMulNBits: per output channel, K values in blocks of ``group``, two per byte
    (low nibble first), zero point 8 — exactly minitx's nibbles (q + 8). A group MatMulNBits does
    not take (under 16, or not a power of two) becomes a block-wise int4 DequantizeLinear → MatMul."""
    from .ops.quant import unpack_int4

    x, w, s, b = i[:4]
    group = int(a.get("group", 32))
    wa, sa = cx.need_const(w, "weight"), cx.need_const(s, "scale")
    if a.get("transposed"):
        rows, scales = wa, sa                                  # (N, K/2) packed along K, (N, K/group)
    else:
        q = (unpack_int4(wa).T.astype(np.int16) + 8).astype(np.uint8)   # (N, K) nibbles
        rows = q[:, 0::2] | (q[:, 1::2] << 4)
        scales = sa.T
    N, K = rows.shape[0], rows.shape[1] * 2
    if group < 16 or group & (group - 1):
        onnx = require_onnx()
        nib = np.empty((N, K), np.int8)
        nib[:, 0::2], nib[:, 1::2] = rows & 0x0F, rows >> 4
        name = cx.fresh("int4")
        cx.inits[name] = onnx.helper.make_tensor(name, onnx.TensorProto.INT4, (N, K), (nib - 8).reshape(-1))
        wd = cx.op("DequantizeLinear", [name, cx.const(np.ascontiguousarray(scales), "int4_scale")], axis=1,
                   block_size=group)
        _matmul(cx, x, _swap_last(cx, wd), b, o[0])
        return
    B = np.ascontiguousarray(rows.reshape(N, K // group, group // 2), dtype=np.uint8)
    inputs = [x, cx.const(B, "nbits"), cx.const(np.ascontiguousarray(scales.reshape(-1)), "nbits_scale")]
    y = cx.op("MatMulNBits", inputs, domain=MS_DOMAIN, K=K, N=N, bits=4, block_size=group)
    if b:
        cx.op("Add", [y, b], o)
    else:
        cx.op("Identity", [y], o)


def _round_blocks(cx, xb: str, x: str) -> tuple[str, str]:
    """Blocks along the last axis rounded to int8 as ``quantize_act_blocks`` does: (q as floats, the
    max-abs scales with keepdims; 1 for an all-zero block). Round is half to even, like ``rint``."""
    m = cx.op("ReduceMax", [cx.op("Abs", [xb]), cx.ints(-1)], keepdims=1)
    sx = cx.op("Where", [cx.op("Greater", [m, cx.like(x, 0.0)]), cx.op("Div", [m, cx.like(x, 127.0)]), cx.like(x, 1.0)])
    return cx.op("Clip", [cx.op("Round", [cx.op("Div", [xb, sx])]), cx.like(x, -127.0), cx.like(x, 127.0)]), sx


def _linear_w8a8(cx, n, i, o, a):
    """Per-token int8 activations × int8 weights as MatMulInteger (an exact int32 product)."""
    x, w, s, b = i[:4]
    r, sx = _round_blocks(cx, x, x)
    acc = cx.op("MatMulInteger", [cx.op("Cast", [r], to=_elem("int8")), w])
    y = cx.op("Mul", [cx.op("Mul", [cx.op("Cast", [acc], to=_elem(cx.dtypes[x])), sx]), s])
    if b:
        cx.op("Add", [y, b], o)
    else:
        cx.op("Identity", [y], o)


def _linear_q8_0(cx, n, i, o, a):
    """Q8_0 × Q8_0 as ``MatMulInteger`` per block of inputs — exact int32 block sums, as the spec:
    x (…, K) → (…, G, block), each block rounded to int8 by its max-abs scale (Round is half to
    even, like ``rint``), moved to the front, (G, …, rows, block) × Wq (G, block, out), then each
    block's sums times its two scales and summed over the G blocks. The weights are repacked (and
    their scales laid out) at export time: constants."""
    x, w, s, b = i[:4]
    block = int(a.get("block", 32))
    wa, sa = cx.need_const(w, "weight"), cx.need_const(s, "scale")      # (out, K) int8, (out, G)
    N, K = wa.shape
    G, r = K // block, cx.rank(x)
    dt = cx.dtypes[x]
    xb = cx.op("Transpose", [cx.op("Reshape", [x, cx.ints(*([0] * (r - 1)), G, block)])],
               perm=[r - 1, *range(r - 1), r])                                          # (G, …, rows, block)
    q, sx = _round_blocks(cx, xb, x)
    lead = [1] * (r - 2)
    wq = np.ascontiguousarray(wa.reshape(N, G, block).transpose(1, 2, 0).reshape(G, *lead, block, N))
    acc = cx.op("MatMulInteger", [cx.op("Cast", [q], to=_elem("int8")), cx.const(wq, "q8_0")])  # (G, …, rows, N)
    sw = cx.const(np.ascontiguousarray(sa.T.reshape(G, *lead, 1, N)).astype(dt), "q8_0_scale")
    part = cx.op("Mul", [cx.op("Mul", [cx.op("Cast", [acc], to=_elem(dt)), sx]), sw])
    y = cx.op("ReduceSum", [part, cx.ints(0)], keepdims=0)
    if b:
        cx.op("Add", [y, b], o)
    else:
        cx.op("Identity", [y], o)


def _linear_cast(cx, n, i, o, a):
    onnx = require_onnx()
    x, w, b = i[:3]
    if cx.dtypes[w] == "uint16":      # bfloat16 bit patterns: the same bits, typed BFLOAT16
        wa = np.ascontiguousarray(cx.need_const(w, "weight"))
        w = cx.fresh("bf16")
        cx.inits[w] = onnx.helper.make_tensor(w, onnx.TensorProto.BFLOAT16, wa.shape, wa.tobytes(), raw=True)
    wf = cx.op("Cast", [w], to=_elem(cx.dtypes[x]))
    _matmul(cx, x, _swap_last(cx, wf) if a.get("transposed") else wf, b, o[0])


def _embedding_q8(cx, n, i, o, a):
    ids, table, s = i[:3]
    rows = cx.op("Cast", [cx.op("Gather", [table, ids], axis=0)], to=_elem(cx.dtypes[s]))
    cx.op("Mul", [rows, cx.op("Unsqueeze", [cx.op("Gather", [s, ids], axis=0), cx.ints(-1)])], o)


def _embedding_q4(cx, n, i, o, a):
    ids, table, s = i[:3]
    group = int(a.get("group", 32))
    C = cx.width(table) * 2
    lead = [0] * cx.rank(ids)
    to = _elem(cx.dtypes[s])
    packed = cx.op("Gather", [table, ids], axis=0)                                   # (…, C/2) uint8
    lo = cx.op("BitwiseAnd", [packed, cx.const(np.uint8(0x0F))])
    hi = cx.op("BitShift", [packed, cx.const(np.uint8(4))], direction="RIGHT")
    both = cx.op("Concat", [cx.op("Unsqueeze", [lo, cx.ints(-1)]), cx.op("Unsqueeze", [hi, cx.ints(-1)])], axis=-1)
    q = cx.op("Sub", [cx.op("Cast", [cx.op("Reshape", [both, cx.ints(*lead, C)])], to=to), cx.like(s, 8.0)])
    sg = cx.op("Unsqueeze", [cx.op("Gather", [s, ids], axis=0), cx.ints(-1)])          # (…, C/group, 1)
    rep = cx.op("Reshape", [cx.op("Expand", [sg, cx.ints(*([1] * (len(lead) + 1)), group)]), cx.ints(*lead, C)])
    cx.op("Mul", [q, rep], o)


def _dense(cx, w: np.ndarray, x: str, b: str, out: str) -> None:
    _matmul(cx, x, cx.const(np.ascontiguousarray(w.astype(cx.dtypes[x])), "dense"), b, out)


def _sparse_linear(cx, n, i, o, a):
    from .ops.sparse import _csr

    x, data, idx, ptr, b, scale = (list(i) + [""] * 6)[:6]
    Wt = _csr(cx.need_const(data, "data"), cx.need_const(idx, "indices"), cx.need_const(ptr, "indptr"), a["shape"])
    s = cx.need_const(scale, "scale")[:, None] if scale else 1
    _dense(cx, (Wt.toarray() * s).T, x, b, o[0])      # the dense equivalent: (in, out)


def _nm_linear(cx, n, i, o, a):
    from .ops.sparse import nm_dense

    x, values, idx, b, scale = (list(i) + [""] * 5)[:5]
    W = nm_dense(cx.need_const(values, "values"), cx.need_const(idx, "positions"), n=int(a["n"]), m=int(a["m"]),
                 in_features=int(a["in_features"]), scale=cx.need_const(scale, "scale") if scale else None)
    _dense(cx, W, x, b, o[0])


def _lowrank_linear(cx, n, i, o, a):
    x, u, v, b = i[:4]
    _matmul(cx, cx.op("MatMul", [x, u]), v, b, o[0])    # kept factored: r·(in + out) weights


def _fake_quant(cx, n, i, o, a):
    from .ops.fakequant import fake_quant

    w = cx.need_const(i[0], "weight")
    cx.op("Identity", [cx.const(fake_quant(w, **a), "fq")], o)   # folded: the weights it stands for


def _fake_quant_act(cx, n, i, o, a):
    x = i[0]
    group, r = int(a.get("group", 32)), cx.rank(x)
    xb = cx.op("Reshape", [x, cx.ints(*([0] * (r - 1)), cx.width(x) // group, group)])
    q, sx = _round_blocks(cx, xb, x)
    cx.op("Reshape", [cx.op("Mul", [q, sx]), cx.ints(*([0] * (r - 1)), cx.width(x))], o)


CONVERTERS: dict[str, Callable[..., None]] = {
    "add": _add, "linear": _linear, "matmul": _matmul_op, "embedding": _embedding, "split": _split,
    "last_positions": _last_positions,
    "gelu": _gelu, "relu": _relu, "silu": _silu, "swiglu": _swiglu, "softmax": _softmax, "dropout": _identity,
    "scale": _scale, "layer_norm": _layer_norm, "rms_norm": _rms_norm, "l2_normalize": _l2_normalize,
    "mean_pool": _mean_pool, "rope": _rope, "sinusoidal_positions": _sinusoidal,
    "attention": _attention, "sparse_attention": _attention, "attention_kv8": _attention_kv8,
    "linear_q8": _linear_q8, "linear_q8_block": _linear_q8_block, "linear_q4": _linear_q4,
    "linear_w8a8": _linear_w8a8, "linear_q8_0": _linear_q8_0, "linear_cast": _linear_cast, "embedding_q8": _embedding_q8,
    "embedding_q4": _embedding_q4, "sparse_linear": _sparse_linear, "nm_linear": _nm_linear,
    "lowrank_linear": _lowrank_linear, "fake_quant": _fake_quant,
    "fake_quant_act": _fake_quant_act,
}
# Inputs a conversion reads at export time (repacked or densified): they must be constants.
CONST_INPUTS: dict[str, tuple[int, ...]] = {
    "linear_q4": (1, 2), "linear_q8_0": (1, 2), "sparse_linear": (1, 2, 3, 5), "nm_linear": (1, 2, 4), "fake_quant": (0,), "linear_cast": (1,),
}
_WHY_NOT = {
    "nystrom_attention": "its landmark pseudo-inverse has no ONNX op",
    "cross_entropy": "training losses are not exported", "kl_div": "training losses are not exported",
    "mse": "training losses are not exported", "prob_kl": "training losses are not exported",
    "attention_probs": "distillation targets are not exported",
}


_ELEM = {"float16": 10, "float32": 1, "float64": 11, "int8": 3, "uint8": 2, "int16": 5, "uint16": 4,
         "int32": 6, "int64": 7, "bool": 9, "bfloat16": 16}


def _elem(dtype: str) -> int:
    try:
        return _ELEM[str(np.dtype(dtype)) if dtype != "bfloat16" else dtype]
    except KeyError:
        raise MinitxError(f"dtype {dtype} has no ONNX equivalent") from None


# ------------------------------------------------------------------------------ graph → ONNX
@dataclass
class Exported:
    """An ONNX model and what went into it."""

    model: Any                              # onnx.ModelProto
    ops: dict[str, int]                     # ONNX op type (domain-qualified when not ai.onnx) → count
    opset: int = OPSET


@dataclass
class Port:
    """A graph input of an exported (sub)graph: name, dtype and shape (None: unknown)."""

    name: str
    dtype: str
    shape: tuple | None = None


def convert(nodes: Sequence[Node], inputs: Sequence[Port], outputs: Sequence[str], dtypes: Mapping[str, str],
            shapes: Mapping[str, tuple], consts: Mapping[str, np.ndarray], name: str = "minitx",
            output_shapes: Mapping[str, tuple] | None = None) -> Exported:
    """Nodes (in order) → an ONNX model whose inputs are ``inputs`` and outputs ``outputs``; every
    value a node reads that is neither an input nor produced becomes an initializer from ``consts``."""
    onnx = require_onnx()
    helper = onnx.helper
    cx = _Ctx(dict(dtypes), dict(shapes), lambda k: consts.get(k))
    for node in nodes:
        conv = CONVERTERS.get(node.op)
        if conv is None:
            why = _WHY_NOT.get(node.op, "no ONNX mapping")
            raise MinitxError(f"node {node.name}: op {node.op!r} has no ONNX equivalent ({why})")
        cx.node = node
        spec = ops.get(node.op)
        ins = list(node.inputs) + [""] * (spec.n_inputs - len(node.inputs))
        conv(cx, node, ins, list(node.outputs), node.attrs)
    cx.node = None
    fed = {p.name for p in inputs}
    produced = {o for n in cx.nodes for o in n.output}
    for o in outputs:
        if o not in produced:
            raise MinitxError(f"graph output {o!r} is not computed by any node; ONNX cannot export it under its name")
    outs = list(outputs)
    used = {i for n in cx.nodes for i in n.input if i}
    for k in sorted(used - fed - set(cx.inits) - produced):
        a = consts.get(k)
        if a is None:
            raise MinitxError(f"value {k!r} is read but is neither an input, a parameter nor computed")
        cx.inits[k] = onnx.numpy_helper.from_array(np.ascontiguousarray(a), k)
    for k in [k for k in cx.inits if k not in used]:
        del cx.inits[k]

    def vi(name: str, dtype: str, shape: tuple | None):
        if shape is None:  # rank known, sizes not
            shape = (None,) * len(shapes[name])
        return helper.make_tensor_value_info(name, _elem(dtype), [d if d is None or isinstance(d, str) else int(d)
                                                                  for d in shape])

    oshapes = output_shapes or {}
    g = helper.make_graph(cx.nodes, name, [vi(p.name, p.dtype, p.shape) for p in inputs],
                          [vi(o, dtypes[o], oshapes.get(o)) for o in outs], list(cx.inits.values()))
    opsets = [helper.make_opsetid("", OPSET)]
    if any(n.domain == MS_DOMAIN for n in cx.nodes):
        opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
    model = helper.make_model(g, opset_imports=opsets, producer_name="minitx", ir_version=10)
    return Exported(model, dict(sorted(cx.emitted.items())))


def probe_shapes(graph: Graph, base: int) -> tuple[dict[str, int], dict]:
    """Shape inference with the symbolic dims bound to distinct small values."""
    b = {s: base + 3 * k for k, s in enumerate(sorted(symbols(graph)))}
    return b, graph.infer(b)


def symbolic_shapes(graph: Graph, names: Iterable[str]) -> dict[str, tuple]:
    """Output shapes in the inputs' symbols: a dim that moves with the bindings is named by the input
    dim expression (``B``, ``S+T``) that moves the same way under two probes; None if none does."""
    from .ir import bind_shape

    (b1, env1), (b2, env2) = probe_shapes(graph, 2), probe_shapes(graph, 5)
    exprs = {d for v in graph.inputs for d in v.shape if isinstance(d, str)}
    table = {(bind_shape([e], b1)[0], bind_shape([e], b2)[0]): e for e in sorted(exprs, key=len, reverse=True)}
    out = {}
    for k in names:
        s1, s2 = env1[k][0], env2[k][0]
        out[k] = tuple(d1 if d1 == d2 else table.get((d1, d2)) for d1, d2 in zip(s1, s2))
    return out


def graph_to_onnx(graph: Graph, params: Mapping[str, np.ndarray]) -> Exported:
    """The whole graph: its inputs (symbolic dims kept), its outputs, its parameters as initializers."""
    graph.validate()
    _, env = probe_shapes(graph, 2)
    dtypes = {k: d for k, (_, d) in env.items()}
    shapes = {k: s for k, (s, _) in env.items()}
    missing = [k for k in graph.params if k not in params]
    if missing:
        raise MinitxError(f"parameter {missing[0]!r} is missing")
    return convert(graph.nodes, [Port(v.name, v.dtype, tuple(v.shape)) for v in graph.inputs], graph.outputs,
                   dtypes, shapes, params, name=str(graph.meta.get("arch", "minitx")),
                   output_shapes=symbolic_shapes(graph, graph.outputs))


# ------------------------------------------------------------------------------ writing
@dataclass
class Written:
    path: str
    ops: dict[str, int]
    opset: int
    bytes: int
    external_data: str | None  # the external data file, when the weights are stored beside the model


def _param_bytes(model: Any) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def save(exported: Exported, path: str, external_data: bool | None = None, check: bool = True) -> Written:
    """Write atomically (temporary files in the target folder, renamed once complete and checked).

    ``external_data``: None stores the weights beside the model (``<path>.data``) only when the
    model would exceed protobuf's 2 GB; False makes that case an error; True always does it."""
    onnx = require_onnx()
    model = exported.model
    size = _param_bytes(model)
    too_big = size >= PROTOBUF_LIMIT - (64 << 20)
    if too_big and external_data is False:
        raise MinitxError(f"{path}: the model holds {size / 2**30:.2f} GiB of weights, over ONNX's 2 GB protobuf "
                          "limit; export with external data (drop --no-external-data)")
    use_ext = bool(external_data) or too_big
    folder = os.path.dirname(os.path.abspath(path)) or "."
    base = os.path.basename(path)
    data_name = base + ".data"
    if not os.path.isdir(folder):
        raise MinitxError(f"{path}: folder {folder} does not exist")
    try:
        tmpdir = tempfile.mkdtemp(prefix=".minitx-export-", dir=folder)
    except OSError as e:
        raise MinitxError(f"{path}: cannot write there ({e.strerror})") from None
    try:
        tmp = os.path.join(tmpdir, base)
        if use_ext:
            onnx.save_model(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
        else:
            onnx.save_model(model, tmp)
        if check:
            try:
                onnx.checker.check_model(tmp, full_check=True)
            except Exception as e:  # noqa: BLE001 — a checker failure is a bug in this exporter
                raise RuntimeError(f"the exported ONNX model fails onnx.checker: {e}") from e
        total = os.path.getsize(tmp)
        try:
            if use_ext:
                total += os.path.getsize(os.path.join(tmpdir, data_name))
                os.replace(os.path.join(tmpdir, data_name), os.path.join(folder, data_name))
            os.replace(tmp, path)
        except OSError as e:
            raise MinitxError(f"{path}: cannot write there ({e.strerror})") from None
    finally:
        for f in os.listdir(tmpdir):
            os.unlink(os.path.join(tmpdir, f))
        os.rmdir(tmpdir)
    return Written(path, exported.ops, exported.opset, total, os.path.join(folder, data_name) if use_ext else None)


def export(model: Any, path: str, external_data: bool | None = None) -> Written:
    """``minitx export``: a model (any family, any rewrite) → a checked ONNX file at ``path``.

    The model's config travels in the file's metadata (``minitx.config``), so a golden file
    recorded for the model can be verified against the exported file (:func:`load`)."""
    import json

    from . import __version__

    exported = graph_to_onnx(model.graph, model.params)
    require_onnx().helper.set_model_props(exported.model, {"minitx.config": json.dumps(model.config, sort_keys=True),
                                                    "minitx.version": __version__})
    return save(exported, path, external_data)


# ------------------------------------------------------------------------------ running exported files
def session(model: Any, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session (a ModelProto or a path) that keeps the spec's numerics: ONNX
    Runtime rewrites DequantizeLinear → MatMul into MatMulNBits, which by default quantizes the
    activations to int8 (accuracy level 4); level 1 accumulates in float32."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise MinitxError("running ONNX needs onnxruntime: pip install 'minitx[onnx]'") from None
    from . import threads as _threads

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or _threads.budget()
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    # Idle pool threads that spin take the cores from everything else (as OpenMP's do, see the numba
    # backend): MiniLM, 64 tokens, 2 threads on the shared 2-core VM: 136 ms spinning, 63 ms not.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    src = model if isinstance(model, str) else model.SerializeToString()
    try:
        return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 — a file ONNX Runtime refuses is the user's input
        if isinstance(model, str):
            raise MinitxError(f"{model}: ONNX Runtime cannot load it ({str(e).splitlines()[0][:200]})") from None
        raise


_ONNX_DTYPES = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
                "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
                "tensor(bool)": "bool"}


class _FileRunner:
    """The executor interface (``run``, ``explain``) over an exported file in ONNX Runtime."""

    def __init__(self, path: str) -> None:
        self.sess = session(path)
        self.inputs = {i.name: np.dtype(_ONNX_DTYPES.get(i.type, "float32")) for i in self.sess.get_inputs()}
        self.outputs = [o.name for o in self.sess.get_outputs()]

    def run(self, feeds: Mapping[str, Any], outputs: Iterable[str] | None = None, keep: Iterable[str] = (),
            device_outputs: Iterable[str] = ()) -> dict[str, np.ndarray]:
        missing = [k for k in self.inputs if k not in feeds]
        if missing:
            raise MinitxError(f"missing graph input {missing[0]!r}")
        f = {k: np.ascontiguousarray(np.asarray(feeds[k]).astype(dt, copy=False)) for k, dt in self.inputs.items()}
        res = dict(zip(self.outputs, self.sess.run(self.outputs, f)))
        wanted = list(outputs) if outputs is not None else self.outputs
        return {k: res[k] for k in wanted if k in res}

    def explain(self) -> list[tuple[str, str, str]]:
        return [("(exported graph)", "onnx", "onnxruntime")]


def load(path: str) -> Any:
    """An exported file as a model that ``minitx verify`` can check: its config from the file's
    metadata, its graph reduced to inputs and outputs, run by ONNX Runtime whatever the backend."""
    import json

    from .ir import Value
    from .model import Model

    onnx = require_onnx()
    try:
        proto = onnx.load(path, load_external_data=False)
    except FileNotFoundError:
        raise MinitxError(f"{path}: no such file") from None
    except Exception as e:  # noqa: BLE001
        raise MinitxError(f"{path}: not an ONNX file ({type(e).__name__})") from None
    props = {p.key: p.value for p in proto.metadata_props}
    if "minitx.config" not in props:
        raise MinitxError(f"{path}: carries no minitx config (not written by `minitx export`)")

    def dims(v: Any) -> tuple:
        return tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim)

    elem = {v: k for k, v in _ELEM.items()}
    ins = [Value(v.name, dims(v), elem.get(v.type.tensor_type.elem_type, "float32")) for v in proto.graph.input]
    graph = Graph(ins, [o.name for o in proto.graph.output], {}, [])
    runner = _FileRunner(path)

    class ExportedModel(Model):
        def executor(self, backends: Any = (), strict: bool = False, last_logits: bool = False) -> Any:  # noqa: ARG002
            return runner   # the file's graph as exported: every position's logits (the last is among them)

    return ExportedModel(json.loads(props["minitx.config"]), {}, graph, meta={"source": path})

