"""Validate a rewritten model against the model it came from, on calibration inputs.

Rewrites are checked numerically, never trusted (principle 3). Both models run on the NumPy spec
over the same calibration sequences — the user's texts, the lines of a text file, or seeded random
token ids — and the report gives, for the primary output (``logits`` of a decoder, ``embedding``
of an encoder) and every other float output: max abs/rel error, cosine (overall and the minimum
over rows — tokens or sentences), SQNR; for decoders top-1 agreement, KL divergence of the
next-token distributions and perplexity of the calibration text under both models.

Per layer, the error is reported twice:

* *propagated* — the layer's output value in a full run of each model (error accumulated from
  every earlier layer);
* *shadow* — the rewritten layer alone, fed the reference model's own layer input, so one layer's
  error is seen without the others' (a layer is the set of nodes tagged with its ``layer``).

The verdict compares the primary output with the plugin's declared :class:`~minitx.plugin.Tolerance`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from . import metrics
from .errors import MinitxError
from .executor import Executor
from .ir import Graph, Value, bind_shape


# ------------------------------------------------------------------------------ calibration
@dataclass
class Calibration:
    """Where calibration sequences come from. ``sequences(model)`` turns them into token ids."""

    texts: list[str] = field(default_factory=list)
    ids: list[list[int]] = field(default_factory=list)
    n_random: int = 0
    random_len: int = 32
    seed: int = 0
    source: str = ""

    @classmethod
    def random(cls, n: int = 4, length: int = 32, seed: int = 0) -> "Calibration":
        return cls(n_random=n, random_len=length, seed=seed, source=f"random:{n}x{length} (seed {seed})")

    @classmethod
    def parse(cls, items: Sequence[str], seed: int = 0) -> "Calibration":
        """Command-line ``--calib`` values: ``random[:NxLEN]``, ``file:PATH`` (one text per non-empty
        line), ``ids:1,2,3`` or plain text; several may be combined."""
        c = cls(seed=seed)
        src = []
        for it in items:
            if it == "random" or it.startswith("random:"):
                spec = it.partition(":")[2] or "4x32"
                try:
                    n, _, ln = spec.partition("x")
                    c.n_random, c.random_len = int(n), int(ln or 32)
                    if c.n_random <= 0 or c.random_len <= 1:
                        raise ValueError
                except ValueError:
                    raise MinitxError(f"--calib {it!r}: expected random:NxLEN with N >= 1, LEN >= 2") from None
                src.append(f"random:{c.n_random}x{c.random_len}")
            elif it.startswith("file:"):
                path = it[5:]
                if not os.path.isfile(path):
                    raise MinitxError(f"--calib {it!r}: no such file {path}")
                try:
                    with open(path, encoding="utf-8") as f:
                        lines = [ln.strip() for ln in f if ln.strip()]
                except UnicodeDecodeError:
                    raise MinitxError(f"--calib {it!r}: {path} is not UTF-8 text") from None
                if not lines:
                    raise MinitxError(f"--calib {it!r}: {path} holds no text")
                c.texts += lines
                src.append(f"file:{path} ({len(lines)} lines)")
            elif it.startswith("ids:"):
                try:
                    c.ids.append([int(x) for x in it[4:].split(",") if x.strip()])
                except ValueError:
                    raise MinitxError(f"--calib {it!r}: expected ids:1,2,3") from None
                src.append("ids")
            else:
                if not it.strip():
                    raise MinitxError("--calib: empty text")
                c.texts.append(it)
                src.append("text")
        if not items:
            c.n_random = 4
            src.append("random:4x32")
        c.source = ", ".join(src) + (f" (seed {seed})" if c.n_random else "")
        return c

    def sequences(self, model) -> list[list[int]]:
        seqs = [list(s) for s in self.ids]
        if self.texts:
            tok = model.tokenizer
            if tok is None:
                raise MinitxError("calibration texts need a tokenizer, and this model carries none; "
                                  "use --calib random or --calib ids:1,2,3")
            if not model.is_decoder and model.config.get("max_seq_length"):
                tok.enable_truncation(int(model.config["max_seq_length"]))
            for t in self.texts:
                ids = tok.encode(t).ids[: model.n_ctx]
                if ids:
                    seqs.append(ids)
        if self.n_random:
            rng = np.random.default_rng(self.seed)
            length = min(self.random_len, model.n_ctx)
            seqs += [rng.integers(0, model.vocab_size, length).tolist() for _ in range(self.n_random)]
        for k, s in enumerate(seqs):
            bad = [t for t in s if not 0 <= t < model.vocab_size]
            if bad:
                raise MinitxError(f"calibration sequence {k + 1}: token id {bad[0]} is outside the vocabulary")
            if len(s) > model.n_ctx:
                raise MinitxError(f"calibration sequence {k + 1} has {len(s)} tokens; the context is {model.n_ctx}")
        if not seqs:
            raise MinitxError("no calibration sequences")
        return seqs


def feeds_for(graph: Graph, ids: Sequence[int]) -> dict[str, np.ndarray]:
    """Inputs for one sequence (batch 1) with an empty KV cache, for any graph's declared inputs."""
    T = len(ids)
    b = {"B": 1, "T": T, "S": 0}
    out: dict[str, np.ndarray] = {}
    for v in graph.inputs:
        if v.name == "input_ids":
            out[v.name] = np.asarray([ids], np.int64)
        elif v.name == "position_ids":
            out[v.name] = np.arange(T, dtype=np.int64)[None]
        elif v.name == "attention_mask":
            out[v.name] = np.ones((1, T), np.int64)
        else:  # KV cache (empty), token types (0), anything else a rewrite declared: zeros
            out[v.name] = np.zeros(bind_shape(v.shape, b, v.name), v.dtype)
    return out


# ------------------------------------------------------------------------------ the report
@dataclass
class OutputReport:
    name: str
    max_abs: float
    max_rel: float
    cosine: float | None
    min_row_cosine: float | None
    sqnr_db: float | None
    top1: float | None = None
    kl: float | None = None
    allclose: bool = False

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class ValidationReport:
    calibration: str
    n_sequences: int
    tolerance: dict[str, Any]
    outputs: list[OutputReport]
    layers: list[dict[str, Any]]
    perplexity: dict[str, float] | None
    passed: bool
    failure: str = ""

    def primary(self) -> OutputReport:
        return self.outputs[0]

    def as_dict(self) -> dict[str, Any]:
        return {"calibration": self.calibration, "n_sequences": self.n_sequences, "tolerance": self.tolerance,
                "outputs": [o.as_dict() for o in self.outputs], "layers": self.layers,
                "perplexity": self.perplexity, "passed": self.passed, "failure": self.failure}

    def summary(self) -> str:
        p = self.primary()
        parts = [f"{p.name}: max abs {p.max_abs:.3g}, max rel {p.max_rel:.3g}"]
        if p.cosine is not None:
            parts.append(f"cosine {p.cosine:.6f} (min row {p.min_row_cosine:.6f})")
        if p.sqnr_db is not None:
            parts.append(f"SQNR {p.sqnr_db:.1f} dB")
        if p.top1 is not None:
            parts.append(f"top-1 {p.top1:.3f}, KL {p.kl:.3g}")
        if self.perplexity:
            parts.append(f"ppl {self.perplexity['reference']:.3f} -> {self.perplexity['rewritten']:.3f}")
        return "; ".join(parts)


def _row_cos(ref: np.ndarray, out: np.ndarray) -> float:
    r = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
    o = out.reshape(-1, out.shape[-1]).astype(np.float64)
    nr, no = np.linalg.norm(r, axis=1), np.linalg.norm(o, axis=1)
    ok = (nr > 0) & (no > 0)
    if not ok.any():
        return 1.0
    return float(((r[ok] * o[ok]).sum(1) / (nr[ok] * no[ok])).min())


def _layer_ends(graph: Graph) -> dict[int, str]:
    """Each layer's output value: the first output of the last node tagged with that layer."""
    ends: dict[int, str] = {}
    for n in graph.nodes:
        if "layer" in n.tags:
            ends[int(n.tags["layer"])] = n.outputs[0]
    return ends


def _shadow_graph(graph: Graph, layer: int, out_value: str, env: dict[str, np.ndarray]) -> Graph | None:
    """The nodes of one layer as a graph of their own, reading every outside value as an input."""
    nodes = [n for n in graph.nodes if n.tags.get("layer") == layer]
    produced = {o for n in nodes for o in n.outputs}
    if out_value not in produced:
        return None
    ext = [i for n in nodes for i in n.inputs if i and i not in produced and i not in graph.params]
    ext = list(dict.fromkeys(ext))
    if any(i not in env for i in ext):
        return None
    inputs = [Value(i, tuple(env[i].shape), str(env[i].dtype)) for i in ext]
    params = {k: v for k, v in graph.params.items() if any(k in n.inputs for n in nodes)}
    return Graph(inputs, [out_value], params, [n for n in nodes])


def _float(a: np.ndarray) -> bool:
    return np.issubdtype(np.asarray(a).dtype, np.floating)


def validate(reference, rewritten, calib: Calibration, tolerance, *, shadow: bool = True) -> ValidationReport:
    """Run both models (minitx.model.Model) on ``calib`` and judge ``rewritten`` by ``tolerance``
    (a minitx.plugin.Tolerance)."""
    seqs = calib.sequences(reference)
    ref_ex = Executor(reference.graph, reference.params)
    new_ex = Executor(rewritten.graph, rewritten.params)
    decoder = reference.is_decoder
    primary = "logits" if decoder else "embedding"
    names = [primary] + [o for o in reference.graph.outputs
                         if o != primary and not o.startswith("present.") and o in rewritten.graph.outputs]
    ends = _layer_ends(reference.graph)
    new_ends = _layer_ends(rewritten.graph)
    layers = sorted(i for i in ends if new_ends.get(i) == ends[i])
    got: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {n: [] for n in names}
    per_layer: dict[int, dict[str, list]] = {i: {"prop": [], "shadow": []} for i in layers}
    nll_ref: list[float] = []
    nll_new: list[float] = []
    for ids in seqs:
        fr = feeds_for(reference.graph, ids)
        fn = feeds_for(rewritten.graph, ids)
        # Keep everything of the reference (calibration runs are small) for shadow-mode feeds.
        keep = [o for n in reference.graph.nodes for o in n.outputs] if shadow else [ends[i] for i in layers]
        r = ref_ex.run(fr, keep=keep)
        o = new_ex.run(fn, keep=[ends[i] for i in layers])
        for n in names:
            if n in r and n in o and _float(r[n]):
                got[n].append((r[n], o[n]))
        for i in layers:
            per_layer[i]["prop"].append((r[ends[i]], o[ends[i]]))
            if shadow:
                env = {**fn, **r}
                sg = _shadow_graph(rewritten.graph, i, ends[i], env)
                if sg is not None:
                    sub = Executor(sg, {k: rewritten.params[k] for k in sg.params}).run(
                        {v.name: env[v.name] for v in sg.inputs})
                    per_layer[i]["shadow"].append((r[ends[i]], sub[ends[i]]))
        if decoder and len(ids) > 1:
            tgt = np.asarray(ids[1:])
            for logits, acc in ((r["logits"], nll_ref), (o["logits"], nll_new)):
                z = logits[0, :-1].astype(np.float64)
                z = z - z.max(-1, keepdims=True)
                lp = z - np.log(np.exp(z).sum(-1, keepdims=True))
                acc.extend((-lp[np.arange(len(tgt)), tgt]).tolist())
    outs = []
    for n in names:
        pairs = got[n]
        if not pairs:
            continue
        ref = np.concatenate([a.reshape(-1, a.shape[-1]) for a, _ in pairs])
        out = np.concatenate([b.reshape(-1, b.shape[-1]) for _, b in pairs])
        c = metrics.compare(ref, out, logits=(n == "logits"))
        outs.append(OutputReport(n, c.max_abs, c.max_rel, c.cosine, _row_cos(ref, out), c.sqnr_db, c.top1, c.kl,
                                 c.passed))
    if not outs or outs[0].name != primary:
        raise MinitxError(f"validation: the rewritten model no longer produces {primary!r}")
    layer_rows = []
    for i in layers:
        row: dict[str, Any] = {"layer": i, "value": ends[i]}
        for mode in ("prop", "shadow"):
            pairs = per_layer[i][mode]
            if not pairs:
                continue
            ref = np.concatenate([a.reshape(-1, a.shape[-1]) for a, _ in pairs])
            out = np.concatenate([b.reshape(-1, b.shape[-1]) for _, b in pairs])
            c = metrics.compare(ref, out)
            key = "propagated" if mode == "prop" else "shadow"
            row[key] = {"max_abs": c.max_abs, "max_rel": c.max_rel, "cosine": c.cosine,
                        "min_row_cosine": _row_cos(ref, out), "sqnr_db": c.sqnr_db}
        layer_rows.append(row)
    ppl = None
    if nll_ref:
        ppl = {"reference": float(np.exp(np.mean(nll_ref))), "rewritten": float(np.exp(np.mean(nll_new)))}
        ppl["change"] = ppl["rewritten"] - ppl["reference"]
    passed, failure = judge(outs, tolerance)
    return ValidationReport(calib.source, len(seqs), tolerance.as_dict(), outs, layer_rows, ppl, passed, failure)


def judge(outs: Sequence[OutputReport], tol) -> tuple[bool, str]:
    """(passed, why not) for the primary output (and, if exact, every output) against ``tol``."""
    p = outs[0]
    if tol.exact:
        bad = [o for o in outs if not o.allclose]
        if bad:
            return False, (f"{bad[0].name} differs beyond float rounding (max abs {bad[0].max_abs:.3g}, "
                           f"max rel {bad[0].max_rel:.3g}) although the rewrite is declared exact")
        return True, ""
    if tol.min_cosine is not None and (p.min_row_cosine or 0.0) < tol.min_cosine:
        return False, f"{p.name} min row cosine {p.min_row_cosine:.6f} < {tol.min_cosine}"
    if tol.max_rel is not None and p.max_rel > tol.max_rel:
        return False, f"{p.name} max rel error {p.max_rel:.4g} > {tol.max_rel}"
    if tol.max_kl is not None and p.kl is not None and p.kl > tol.max_kl:
        return False, f"{p.name} KL {p.kl:.4g} > {tol.max_kl}"
    if tol.min_top1 is not None and p.top1 is not None and p.top1 < tol.min_top1:
        return False, f"{p.name} top-1 agreement {p.top1:.4f} < {tol.min_top1}"
    return True, ""
