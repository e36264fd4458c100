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
on first need — the mechanism the recompute plugin's policies drive. Nodes tagged
``{"save": "int8"|"fp8"}`` keep their outputs compressed (minitx/saved.py) from their last forward
reader to their first VJP reader, which gets them decompressed — the activations plugin.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Collection, Iterable, Mapping, Sequence

import numpy as np

from . import ops, saved as saved_values
from .backend import Backend, get_backend, owner, spec_backend
from .errors import MinitxError
from .ir import Graph, Node


def kernel_error(node: Node, b: Backend, e: BaseException, what: str = "kernel") -> MinitxError:
    """One line for a kernel that raised: node, op, backend and the exception's first line (a
    numba or CUDA error runs to dozens of lines; the chained exception keeps them all)."""
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    return MinitxError(f"node {node.name}: the {what} of op {node.op} on backend {b.name} raised "
                       f"{type(e).__name__}" + (f": {first}" if first else ""))


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
        self._plans: dict[tuple[str, frozenset[str]], _BackwardPlan] = {}
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
        try:
            out = b.kernels[node.op](*args, **attrs)
        except MinitxError:
            raise
        except Exception as e:  # noqa: BLE001 — any kernel failure becomes one line naming where
            raise kernel_error(node, b, e) from e
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

        The steps: the backward plan (computed once per ``loss``/``wrt`` and cached), the
        training-mode forward that frees what no VJP reads, the seed cotangent, then one VJP per
        planned node in reverse order (recomputing dropped values on first need).
        """
        names = list(self.graph.params) if wrt is None else list(dict.fromkeys(wrt))   # the order of the result
        plan = self._backward_plan(loss, frozenset(names))
        st = _Pass(step=step, saved=dict(plan.saved), keep=plan.keep)
        st.env, st.loc = self._feeds(feeds)
        self._forward_for_training(plan, st)
        outputs = {k: self._host(k, st.env, st.loc) for k in self.graph.outputs if k in st.env}
        self._ensure(loss, st)
        st.grads[loss] = np.full_like(self._host(loss, st.env, st.loc), loss_grad)
        for node in reversed(plan.nodes):
            if any(o in st.grads for o in node.outputs):
                self._backprop(node, plan, st)
        grads = {k: np.asarray(st.grads[k]) for k in names if k in st.grads}
        return TrainResult(outputs, grads, st.mem.peak, st.recomputed)

    def _backward_plan(self, loss: str, wrt: frozenset[str]) -> "_BackwardPlan":
        """Which values get gradients, which nodes run a VJP, and how often each value is read —
        a function of the graph alone, so it is built once per (loss, wrt) and reused."""
        key = (loss, wrt)
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        g = self.graph

        def diff_inputs(n: Node) -> list[str]:
            nondiff = self._specs[n.name].nondiff
            return [i for k, i in enumerate(n.inputs) if i and k not in nondiff]

        # Values on a path from a differentiated leaf: only those get gradients.
        tracked = set(wrt)
        for n in g.nodes:
            if any(i in tracked for i in diff_inputs(n)):
                tracked.update(n.outputs)
        if loss not in tracked:
            raise MinitxError(f"loss {loss!r} does not depend on any parameter being differentiated")
        nodes = tuple(n for n in g.nodes
                      if any(o in tracked for o in n.outputs) and any(i in tracked for i in diff_inputs(n)))
        # What each VJP reads, counted, so values are freed as soon as the last VJP has read them.
        saved: dict[str, int] = {}
        for n in nodes:
            for v in self._vjp_reads(n):
                saved[v] = saved.get(v, 0) + 1
        fwd_uses: dict[str, int] = {}
        for n in g.nodes:
            for i in n.inputs:
                if i:
                    fwd_uses[i] = fwd_uses.get(i, 0) + 1
        # After the forward, a value survives its last forward reader only if a VJP reads it and
        # it is not tagged for recompute; graph inputs, parameters and outputs are never freed.
        keep = set(g.params) | {v.name for v in g.inputs} | set(g.outputs)
        # A value a VJP reads whose producer is tagged ``save`` is compressed instead, once its
        # last forward reader has run.
        dropped: list[list[str]] = [[] for _ in g.nodes]
        compressed: list[list[tuple[str, str, int]]] = [[] for _ in g.nodes]

        def settle(v: str, idx: int) -> None:
            if saved.get(v, 0) == 0 or self._recompute(v):
                dropped[idx].append(v)
            elif v not in keep and (fmt := self._save_format(v)) is not None:
                compressed[idx].append((v, *fmt))

        remaining = dict(fwd_uses)
        for idx, n in enumerate(g.nodes):
            for i in n.inputs:
                if i:
                    remaining[i] -= 1
                    if remaining[i] == 0:
                        settle(i, idx)
            for o in n.outputs:
                if remaining.get(o, 0) == 0:
                    settle(o, idx)
        plan = _BackwardPlan(wrt, frozenset(tracked), nodes, saved, frozenset(keep),
                             [[v for v in d if v not in keep] for d in dropped], compressed)
        self._plans[key] = plan
        return plan

    def _vjp_reads(self, node: Node) -> list[str]:
        """The values the VJP of ``node`` reads: its inputs, and its outputs if the spec says so."""
        reads = [i for i in node.inputs if i]
        if self._specs[node.name].vjp_uses_outputs:
            reads += node.outputs
        return reads

    def _forward_for_training(self, plan: "_BackwardPlan", st: "_Pass") -> None:
        """Run every node in training mode, counting the bytes held and dropping each value the
        plan says nothing will read again (the backward pass recomputes tagged ones)."""
        for idx, node in enumerate(self.graph.nodes):
            self._run_node(node, st.env, st.loc, training=True, step=st.step)
            for o in node.outputs:
                st.mem.hold(o, st.env[o])
            for v in plan.dropped_after[idx]:
                st.free(v)
            for v, fmt, block in plan.compressed_after[idx]:
                if v in st.env and saved_values.compressible(a := self._host(v, st.env, st.loc)):
                    st.env[v], st.loc[v] = saved_values.compress(a, fmt, block), self.spec
                    st.mem.hold(v, st.env[v])

    def _ensure(self, v: str, st: "_Pass") -> None:
        """Make ``v`` present again, recomputing it (and what it needs) if the forward dropped it."""
        if v in self.params:
            return
        if v in st.env:
            if isinstance(st.env[v], saved_values.Compressed):
                st.env[v] = saved_values.decompress(st.env[v])
                st.mem.hold(v, st.env[v])
            return
        node = self._producer[v]
        for i in node.inputs:
            if i:
                self._ensure(i, st)
        self._run_node(node, st.env, st.loc, training=True, step=st.step)
        st.recomputed += 1
        for o in node.outputs:
            st.mem.hold(o, st.env[o])

    def _backprop(self, node: Node, plan: "_BackwardPlan", st: "_Pass") -> None:
        """One VJP: gather its inputs (on the node's backend, or the spec if that backend has no
        VJP for the op), call it, accumulate the input gradients, free what it read last."""
        spec = self._specs[node.name]
        b = self.placement[node.name]
        vjp = b.vjps.get(node.op)
        if vjp is None:
            b, vjp = self.spec, spec.vjp
        reads = self._vjp_reads(node)
        for v in reads:
            self._ensure(v, st)
        ins = [self._fetch(i, b, st.env, st.loc) if i else None for i in node.inputs]
        ins += [None] * (spec.n_inputs - len(ins))
        outs = tuple(self._fetch(o, b, st.env, st.loc) for o in node.outputs) if spec.vjp_uses_outputs else None
        attrs = node.attrs
        if spec.mode_dependent:
            attrs = {**attrs, "training": True, "step": st.step}
        gouts = self._output_grads(node, b, st)
        try:
            gins = vjp(gouts, tuple(ins), outs, **attrs)
        except MinitxError:
            raise
        except Exception as e:  # noqa: BLE001 — as in _run_node
            raise kernel_error(node, b, e, "VJP") from e
        for k, (i, gi) in enumerate(zip(node.inputs, gins)):
            if i and gi is not None and i in plan.tracked and k not in spec.nondiff:
                self._accumulate(i, gi if b is self.spec else b.to_numpy(gi), plan, st)
        for v in reads:
            st.saved[v] -= 1
            if st.saved[v] == 0:
                st.free(v)
        # Values recomputed only to rebuild others are not needed any more.
        for v in [v for v in st.env if st.saved.get(v, 0) == 0]:
            st.free(v)

    def _output_grads(self, node: Node, b: Backend, st: "_Pass") -> tuple:
        """The cotangents of ``node``'s outputs, on backend ``b``; zeros for an output nothing
        downstream differentiates (e.g. a KV-cache output)."""
        gouts = []
        for o in node.outputs:
            go = st.grads.pop(o, None)
            if go is None:
                self._ensure(o, st)
                go = np.zeros(st.env[o].shape, st.env[o].dtype)
            else:
                st.mem.drop("grad:" + o)
            gouts.append(go if b is self.spec else b.asarray(go) if isinstance(go, np.ndarray) else go)
        return tuple(gouts)

    def _accumulate(self, name: str, g: np.ndarray, plan: "_BackwardPlan", st: "_Pass") -> None:
        """Add one gradient contribution (in the order the VJPs run: results are bit-for-bit)."""
        st.grads[name] = st.grads[name] + g if name in st.grads else g
        if name not in self.params and name not in plan.wrt:
            st.mem.hold("grad:" + name, st.grads[name])

    def _recompute(self, v: str) -> bool:
        node = self._producer.get(v)
        return bool(node is not None and node.tags.get("recompute"))

    def _save_format(self, v: str) -> tuple[str, int] | None:
        """(format, block) a tagged producer asks its saved outputs to be kept in, else None."""
        node = self._producer.get(v)
        fmt = node.tags.get("save") if node is not None else None
        return (str(fmt), int(node.tags.get("save_block", 64))) if fmt else None


@dataclass(frozen=True)
class _BackwardPlan:
    """What :meth:`Executor.forward_backward` needs to know about the graph for one ``loss`` and
    set of differentiated names, computed once: values that get gradients (``tracked``), the
    nodes whose VJP runs (forward order), how often VJPs read each value (``saved``), values never
    freed (``keep``: leaves and graph outputs), what to free after each forward node, and what to
    compress after it (value, format, block)."""

    wrt: frozenset[str]
    tracked: frozenset[str]
    nodes: tuple[Node, ...]
    saved: dict[str, int]
    keep: frozenset[str]
    dropped_after: list[list[str]]
    compressed_after: list[list[tuple[str, str, int]]]


@dataclass
class _Pass:
    """The state of one forward/backward pass: values and where they lie, memory accounting, the
    VJP reads still to come, gradients so far, and how many nodes were recomputed."""

    step: int
    saved: dict[str, int]
    keep: frozenset[str] = frozenset()
    env: dict[str, Any] = field(default_factory=dict)
    loc: dict[str, Backend] = field(default_factory=dict)
    mem: _Memory = field(default_factory=_Memory)
    grads: dict[str, Any] = field(default_factory=dict)
    recomputed: int = 0

    def free(self, v: str) -> None:
        if v not in self.keep and v in self.env:
            del self.env[v]
            self.mem.drop(v)
