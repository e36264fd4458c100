"""The ONNX Runtime backend: minitx graphs exported to ONNX (minitx.onnx_export) and run in sessions.

Written the way a third party would write a backend (docs/backends.md), on the public pieces only:
it registers through the ``minitx.backends`` entry point, and its op table is the set of ops the
exporter maps. Inference runs each maximal run of consecutive nodes placed here as one ONNX Runtime
session (``compile_segment``, the executor's hook for whole-subgraph backends) — usually the whole
graph — so ONNX Runtime sees, fuses and threads the model as a deployment would. Each op also has
a per-node kernel (a one-node session, cached by signature): what ``minitx conformance`` checks,
and what training's forward pass calls. There are no VJPs: the backward pass runs on the spec.

The sessions keep the spec's numerics (minitx.onnx_export.session: float32 accumulation where ONNX
Runtime rewrites DequantizeLinear → MatMul into MatMulNBits).
"""
from __future__ import annotations

import hashlib
import threading
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from minitx import ops
from minitx.backend import Backend
from minitx.ir import Graph, Node
from minitx.onnx_export import session as _session


class _Segment:
    """Consecutive nodes as one ONNX Runtime session, built on first use; one per set of outputs."""

    def __init__(self, graph: Graph, nodes: Sequence[Node], inputs: Sequence[str], outputs: Sequence[str],
                 params: Mapping[str, np.ndarray]) -> None:
        self.graph, self.nodes, self.inputs, self.outputs, self.params = graph, list(nodes), list(inputs), \
            list(outputs), params
        self._sessions: dict[tuple[str, ...], Any] = {}
        self._lock = threading.Lock()
        self._env: dict | None = None

    def _build(self, names: tuple[str, ...]) -> Any:
        from minitx import onnx_export as ox

        if self._env is None:
            _, env = ox.probe_shapes(self.graph, 2)
            self._env = env
        env = self._env
        declared = {v.name: v for v in self.graph.inputs}
        ports = [ox.Port(i, env[i][1], tuple(declared[i].shape) if i in declared else None) for i in self.inputs]
        exported = ox.convert(self.nodes, ports, list(names), {k: d for k, (_, d) in env.items()},
                              {k: s for k, (s, _) in env.items()}, self.params, name="segment")
        return _session(exported.model)

    def __call__(self, feeds: Mapping[str, np.ndarray], extra: Sequence[str] = ()) -> dict[str, np.ndarray]:
        names = tuple(dict.fromkeys([*self.outputs, *extra]))
        with self._lock:
            sess = self._sessions.get(names)
            if sess is None:
                sess = self._sessions[names] = self._build(names)
        return dict(zip(names, sess.run(list(names), {k: np.ascontiguousarray(v) for k, v in feeds.items()})))


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    device = "cpu"
    dtypes = frozenset({"float32"})

    def __init__(self) -> None:
        super().__init__()
        try:
            import onnx  # noqa: F401 — the exporter's
            import onnxruntime
        except ImportError as e:
            raise ImportError(f"{e.name} not installed") from None
        from minitx import onnx_export as ox

        self.version = onnxruntime.__version__
        self._cache: dict[tuple, Any] = {}
        self._lock = threading.Lock()
        # dropout is left to the spec: its training-mode mask is the spec's own random stream.
        self.kernels = {op: self._kernel(op) for op in ox.CONVERTERS if op != "dropout"}

    def compile_segment(self, graph: Graph, nodes: Sequence[Node], inputs: Sequence[str], outputs: Sequence[str],
                        params: Mapping[str, np.ndarray]) -> Callable | None:
        """The executor's hook: these nodes, run together as one session."""
        return _Segment(graph, nodes, inputs, outputs, params)

    # ---------------------------------------------------------------- one node, one session
    def _kernel(self, op: str) -> Callable[..., Any]:
        def kernel(*args: Any, **attrs: Any) -> Any:
            return self._run_one(op, args, attrs)
        kernel.__name__ = f"ort_{op}"
        return kernel

    def _run_one(self, op: str, args: Sequence[Any], attrs: dict[str, Any]) -> Any:
        from minitx import onnx_export as ox

        spec = ops.get(op)
        attrs = {k: v for k, v in attrs.items() if k not in ("training", "step")}
        const_at = set(ox.CONST_INPUTS.get(op, ()))
        arrays = [None if a is None else np.asarray(a) for a in args] + [None] * (spec.n_inputs - len(args))
        names = [f"in{k}" if a is not None else "" for k, a in enumerate(arrays)]
        outs_info = spec.infer([None if a is None else a.shape for a in arrays],
                               [None if a is None else str(a.dtype) for a in arrays], **attrs)
        out_names = [f"out{k}" for k in range(len(outs_info))]
        consts = {n: a for k, (n, a) in enumerate(zip(names, arrays)) if n and k in const_at}
        digest = hashlib.sha1()
        for n in sorted(consts):
            digest.update(consts[n].tobytes())
        dyn = [(n, a) for k, (n, a) in enumerate(zip(names, arrays)) if n and k not in const_at]
        key = (op, repr(sorted(attrs.items())), tuple((n, str(a.dtype), a.ndim, a.shape[-1] if a.ndim else 0)
                                                      for n, a in dyn), tuple(names), digest.hexdigest())
        with self._lock:
            sess = self._cache.get(key)
            if sess is None:
                node = Node(f"{op}", op, names, out_names, attrs)
                dtypes = {n: str(a.dtype) for n, a in zip(names, arrays) if n}
                shapes = {n: a.shape for n, a in zip(names, arrays) if n}
                for o, (s, d) in zip(out_names, outs_info):
                    dtypes[o], shapes[o] = str(np.dtype(d)), tuple(s)
                ports = [ox.Port(n, str(a.dtype), (None,) * (a.ndim - 1) + (a.shape[-1],) if a.ndim else ())
                         for n, a in dyn]
                model = ox.convert([node], ports, out_names, dtypes, shapes, consts, name=op).model
                if len(self._cache) >= 256:  # one-node sessions for new weights each call (conformance)
                    self._cache.clear()
                sess = self._cache[key] = _session(model)
        res = sess.run(out_names, {n: np.ascontiguousarray(a) for n, a in dyn})
        # ONNX Runtime returns a 0-d result as shape (1,): give back the spec's shape.
        res = [r.reshape(s) if r.shape != tuple(s) else r for r, (s, _) in zip(res, outs_info)]
        return res[0] if len(res) == 1 else tuple(res)


def remedy(error: BaseException) -> str | None:
    """What to do when :func:`backend` failed with ``error`` (asked by minitx's registry)."""
    if isinstance(error, ImportError):
        return "install the onnx extra: pip install 'minitx[onnx]'"
    return None


def backend() -> OnnxRuntimeBackend:
    """Entry point ``minitx.backends: onnxruntime``."""
    return OnnxRuntimeBackend()
