"""Run a graph: inference, and forward + reverse-mode backward for training.

Each node is placed on the first backend (in the user's order) that implements its op in the
graph's dtype; every other node falls back to the NumPy spec, and arrays move between devices
only where a producer and a consumer sit on different backends. ``placement`` records where
each node runs (``minitx … --explain`` prints it); ``strict=True`` makes a fallback an error.
Results come back as host arrays, except those a caller asks to leave on their device
(``run(device_outputs=…)``); such arrays fed to a later run stay where they are — decoding keeps
its KV cache on the GPU between steps.

Training keeps exactly what the VJPs will read, frees everything else as soon as its last reader
has run, and counts the bytes held: ``peak_activation_bytes`` is the high-water mark of node
outputs plus activation gradients alive at once (parameters and their gradients excluded). Nodes
tagged ``recompute`` drop their outputs after the forward pass; the backward pass recomputes them
on first need — the mechanism the recompute plugin's policies drive.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Collection, Iterable, Mapping, Sequence

import numpy as np

from . import ops
from .backend import Backend, get_backend, owner, spec_backend
from .errors import MinitxError
from .ir import Graph, Node


def _nbytes(a: Any) -> int:
    return int(getattr(a, "nbytes", 0))


@dataclass
class TrainResult:
    outputs: dict[str, np.ndarray]
    grads: dict[str, np.ndarray]
    peak_activation_bytes: int
    recomputed_nodes: int = 0


@dataclass
class _Memory:
    live: int = 0
    peak: int = 0
    sizes: dict[str, int] = field(default_factory=dict)

    def hold(self, key: str, a: Any) -> None:
        n = _nbytes(a)
        self.live += n - self.sizes.get(key, 0)
        self.sizes[key] = n
        self.peak = max(self.peak, self.live)

    def drop(self, key: str) -> None:
        self.live -= self.sizes.pop(key, 0)


class Executor:
    def __init__(self, graph: Graph, params: Mapping[str, np.ndarray],
                 backends: Sequence[str | Backend] = ("numpy",), strict: bool = False) -> None:
        graph.validate()
        self.graph = graph
        self.params = dict(params)
        self.spec = spec_backend()
        self.backends = [get_backend(b) for b in backends] or [self.spec]
        self.strict = strict
        self.dtype = self._compute_dtype()
        self.placement: dict[str, Backend] = {}
        for n in graph.nodes:
            self.placement[n.name] = self._place(n)
        self._specs = {n.name: ops.get(n.op) for n in graph.nodes}
        self._input_dtypes = {v.name: np.dtype(v.dtype) for v in graph.inputs}  # str(dtype) costs 4 µs a feed
        self._device_params: dict[tuple[str, str], Any] = {}
        self._producer = graph.producers()
        # Inference frees each value right after its last reader.
        last_use: dict[str, int] = {}
        for idx, n in enumerate(graph.nodes):
            for i in n.inputs:
                if i:
                    last_use[i] = idx
        keep = set(graph.outputs) | set(graph.params) | {v.name for v in graph.inputs}
        self._free_after: list[list[str]] = [[] for _ in graph.nodes]
        for v, idx in last_use.items():
            if v not in keep:
                self._free_after[idx].append(v)
        self._segments = self._find_segments(last_use)

    # ------------------------------------------------------------------ placement
    def _compute_dtype(self) -> str:
        floats = {v.dtype for v in self.graph.params.values() if np.issubdtype(np.dtype(v.dtype), np.floating)}
        return "float32" if not floats else sorted(floats, key=lambda d: -np.dtype(d).itemsize)[0]

    def _place(self, node: Node) -> Backend:
        for b in self.backends:
            if b.supports(node.op, self.dtype):
                return b
        if self.strict and self.backends != [self.spec]:
            names = ", ".join(b.name for b in self.backends)
            raise MinitxError(f"node {node.name}: op {node.op!r} in {self.dtype} is not implemented by "
                              f"backend {names}, and fallback to the spec is disabled (--no-fallback)")
        return self.spec

    def _find_segments(self, last_use: Mapping[str, int]) -> dict[int, tuple]:
        """Maximal runs of consecutive nodes on a backend that has ``compile_segment`` (ONNX Runtime:
        one session per run). Such a backend gets the run's nodes, the values they read from outside
        it and the values read after it, and returns ``fn(inputs, extra) -> outputs`` (``extra``:
        further values the caller keeps), or None to be run node by node. Inference only."""
        nodes, out, idx = self.graph.nodes, {}, 0
        while idx < len(nodes):
            b, end = self.placement[nodes[idx].name], idx + 1
            while end < len(nodes) and self.placement[nodes[end].name] is b:
                end += 1
            if hasattr(b, "compile_segment"):
                run = nodes[idx:end]
                made = {o for n in run for o in n.outputs}
                ins = list(dict.fromkeys(i for n in run for i in n.inputs
                                         if i and i not in made and i not in self.params))
                outs = [o for n in run for o in n.outputs if last_use.get(o, -1) >= end or o in self.graph.outputs]
                fn = b.compile_segment(self.graph, run, ins, outs, self.params)
                if fn is not None:
                    out[idx] = (end, fn, ins, made)
            idx = end
        return out

    def _run_segment(self, start: int, env: dict[str, Any], loc: dict[str, Backend], wanted: Collection[str],
                     pinned: Collection[str]) -> int:
        end, fn, ins, made = self._segments[start]
        b = self.placement[self.graph.nodes[start].name]
        res = fn({i: self._fetch(i, b, env, loc, pinned) for i in ins}, tuple(sorted(made & set(wanted))))
        for k, a in res.items():
            env[k], loc[k] = a, b
        return end

    def explain(self) -> list[tuple[str, str, str]]:
        """(node, op, backend) for every node, in execution order."""
        return [(n.name, n.op, self.placement[n.name].name) for n in self.graph.nodes]

    # ------------------------------------------------------------------ arrays
    def _param(self, name: str, b: Backend) -> Any:
        key = (b.name, name)
        a = self._device_params.get(key)
        if a is None:
            a = self.params[name] if b is self.spec else b.asarray(self.params[name])
            self._device_params[key] = a
        return a

    def _fetch(self, name: str, b: Backend, env: dict[str, Any], loc: dict[str, Backend],
               pinned: Collection[str] = ()) -> Any:
        if name in self.params:
            return self._param(name, b)
        a = env[name]
        src = loc[name]
        if src is b:
            return a
        host = a if src is self.spec else src.to_numpy(a)
        moved = host if b is self.spec else b.asarray(host)
        if (b is not self.spec or src is not self.spec) and name not in pinned:
            env[name], loc[name] = moved, b  # keep the moved copy: later readers on b reuse it
        return moved

    def _run_node(self, node: Node, env: dict[str, Any], loc: dict[str, Backend], training: bool, step: int,
                  pinned: Collection[str] = ()) -> None:
        spec = self._specs[node.name]
        b = self.placement[node.name]
        args = [self._fetch(i, b, env, loc, pinned) if i else None for i in node.inputs]
        args += [None] * (spec.n_inputs - len(args))
        attrs = node.attrs
        if spec.mode_dependent:
            attrs = {**attrs, "training": training, "step": step}
        out = b.kernels[node.op](*args, **attrs)
        if not isinstance(out, tuple):
            out = (out,)
        for name, a in zip(node.outputs, out):
            env[name] = a
            loc[name] = b

    def _feeds(self, feeds: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Backend]]:
        """Graph inputs and where they lie: host data on the spec, and arrays some backend owns
        (device arrays an earlier run returned) on that backend, untouched — never through
        ``np.asarray``, which would copy them to the host or fail."""
        env: dict[str, Any] = {}
        loc: dict[str, Backend] = {}
        for v in self.graph.inputs:
            if v.name not in feeds:
                raise MinitxError(f"missing graph input {v.name!r}")
            a = feeds[v.name]
            b = owner(a, self.backends)
            if b is None:
                a, b = np.asarray(a), self.spec
            dt = self._input_dtypes[v.name]
            env[v.name] = a.astype(dt, copy=False) if a.dtype != dt else a
            loc[v.name] = b
        return env, loc

    def _host(self, name: str, env: dict[str, Any], loc: dict[str, Backend]) -> np.ndarray:
        a = env[name]
        return a if loc[name] is self.spec else loc[name].to_numpy(a)

    # ------------------------------------------------------------------ inference
    def run(self, feeds: Mapping[str, Any], outputs: Iterable[str] | None = None,
            keep: Iterable[str] = (), device_outputs: Iterable[str] = ()) -> dict[str, Any]:
        """Forward pass; returns the graph outputs (or the named values) as host arrays.

        ``keep`` names intermediate values to return as well (golden files, per-layer reports).
        ``device_outputs`` names returned values to leave where they were computed, as the array
        type of the backend that produced them (a NumPy array on a host backend): decoding keeps
        its KV cache on the GPU this way. Feeds may be such arrays; they are used where they lie
        (see :meth:`Backend.owns`), and a node on another backend gets a copy, as for any value.
        """
        env, loc = self._feeds(feeds)
        keep = set(keep)
        on_device = set(device_outputs)
        wanted = list(outputs) if outputs is not None else list(self.graph.outputs)
        idx, nodes = 0, self.graph.nodes
        while idx < len(nodes):
            if idx in self._segments:
                end = self._run_segment(idx, env, loc, keep | set(wanted), on_device)
            else:
                self._run_node(nodes[idx], env, loc, training=False, step=0, pinned=on_device)
                end = idx + 1
            for j in range(idx, end):
                for v in self._free_after[j]:
                    if v not in keep:
                        env.pop(v, None)
            idx = end
        return {k: env[k] if k in on_device else self._host(k, env, loc)
                for k in (*wanted, *sorted(keep)) if k in env}

    # ------------------------------------------------------------------ training
    def forward_backward(self, feeds: Mapping[str, np.ndarray], loss: str = "loss", step: int = 0,
                         wrt: Iterable[str] | None = None, loss_grad: float = 1.0) -> TrainResult:
        """Forward in training mode, then reverse-mode backward from the scalar ``loss``.

        Returns the graph outputs, the gradient of ``loss`` for each parameter (or for the names in
        ``wrt``, which may include graph inputs), and the peak activation bytes. ``loss_grad`` is
        the cotangent the backward pass starts from: mixed-precision training passes its loss
        scale here, so that small float16 gradients do not flush to zero (minitx/precision.py).
        """
        g = self.graph
        wrt = set(g.params) if wrt is None else set(wrt)
        # Values on a path from a differentiated leaf: only those get gradients.
        tracked = set(wrt)
        for n in g.nodes:
            spec = self._specs[n.name]
            if any(i in tracked for k, i in enumerate(n.inputs) if i and k not in spec.nondiff):
                tracked.update(n.outputs)
        if loss not in tracked:
            raise MinitxError(f"loss {loss!r} does not depend on any parameter being differentiated")
        bwd_nodes = [n for n in g.nodes
                     if any(o in tracked for o in n.outputs)
                     and any(i in tracked for k, i in enumerate(n.inputs) if i and k not in self._specs[n.name].nondiff)]
        # What each VJP reads, counted, so values are freed as soon as the last VJP has read them.
        saved: dict[str, int] = {}
        for n in bwd_nodes:
            reads = [i for i in n.inputs if i]
            if self._specs[n.name].vjp_uses_outputs:
                reads += n.outputs
            for v in reads:
                saved[v] = saved.get(v, 0) + 1
        fwd_uses: dict[str, int] = {}
        for n in g.nodes:
            for i in n.inputs:
                if i:
                    fwd_uses[i] = fwd_uses.get(i, 0) + 1
        leaves = set(g.params) | {v.name for v in g.inputs}
        outputs = set(g.outputs)
        mem = _Memory()
        env, loc = self._feeds(feeds)

        def free(v: str) -> None:
            if v not in leaves and v not in outputs and v in env:
                del env[v]
                mem.drop(v)

        # ---- forward
        for node in g.nodes:
            self._run_node(node, env, loc, training=True, step=step)
            for o in node.outputs:
                mem.hold(o, env[o])
            for i in node.inputs:
                if i:
                    fwd_uses[i] -= 1
                    if fwd_uses[i] == 0 and (saved.get(i, 0) == 0 or self._recompute(i)):
                        free(i)
            for o in node.outputs:
                if fwd_uses.get(o, 0) == 0 and (saved.get(o, 0) == 0 or self._recompute(o)):
                    free(o)
        result_outputs = {k: self._host(k, env, loc) for k in g.outputs if k in env}

        # ---- backward
        grads: dict[str, Any] = {}
        recomputed = 0

        def ensure(v: str) -> None:
            nonlocal recomputed
            if v in env or v in self.params:
                return
            node = self._producer[v]
            for i in node.inputs:
                if i:
                    ensure(i)
            self._run_node(node, env, loc, training=True, step=step)
            recomputed += 1
            for o in node.outputs:
                mem.hold(o, env[o])

        ensure(loss)
        grads[loss] = np.full_like(self._host(loss, env, loc), loss_grad)
        for node in reversed(bwd_nodes):
            if not any(o in grads for o in node.outputs):
                continue
            spec = self._specs[node.name]
            b = self.placement[node.name]
            vjp = b.vjps.get(node.op)
            if vjp is None:
                b = self.spec
                vjp = spec.vjp
            for i in node.inputs:
                if i:
                    ensure(i)
            if spec.vjp_uses_outputs:
                for o in node.outputs:
                    ensure(o)
            ins = [self._fetch(i, b, env, loc) if i else None for i in node.inputs]
            ins += [None] * (spec.n_inputs - len(ins))
            outs = [self._fetch(o, b, env, loc) for o in node.outputs] if spec.vjp_uses_outputs else None
            gouts = []
            for o in node.outputs:
                go = grads.pop(o, None)
                if go is None:  # an output nothing downstream differentiates (e.g. a KV-cache output)
                    ensure(o)
                    go = np.zeros(env[o].shape, env[o].dtype)
                else:
                    mem.drop("grad:" + o)
                gouts.append(go if b is self.spec else b.asarray(go) if isinstance(go, np.ndarray) else go)
            attrs = node.attrs
            if spec.mode_dependent:
                attrs = {**attrs, "training": True, "step": step}
            gins = vjp(tuple(gouts), tuple(ins), tuple(outs) if outs is not None else None, **attrs)
            for k, (i, gi) in enumerate(zip(node.inputs, gins)):
                if not i or gi is None or i not in tracked or k in spec.nondiff:
                    continue
                gi = gi if b is self.spec else b.to_numpy(gi)
                if i in grads:
                    grads[i] = grads[i] + gi
                else:
                    grads[i] = gi
                if i not in self.params and i not in wrt:
                    mem.hold("grad:" + i, grads[i])
            reads = [i for i in node.inputs if i] + (list(node.outputs) if spec.vjp_uses_outputs else [])
            for v in reads:
                saved[v] -= 1
                if saved[v] == 0:
                    free(v)
            # Values recomputed only to rebuild others are not needed any more.
            for v in [v for v in env if v not in leaves and saved.get(v, 0) == 0 and v not in outputs]:
                free(v)
        return TrainResult(result_outputs, {k: np.asarray(grads[k]) for k in wrt if k in grads},
                           mem.peak, recomputed)

    def _recompute(self, v: str) -> bool:
        node = self._producer.get(v)
        return bool(node is not None and node.tags.get("recompute"))
