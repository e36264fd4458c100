"""Validate a rewritten model against the model it came from, on calibration inputs.

Rewrites are checked numerically, never trusted (principle 3). Both models run on the NumPy spec
over the same calibration sequences — the user's texts, the lines of a text file, or seeded random
token ids — and the report gives, for the primary output (``logits`` of a decoder, ``embedding``
of an encoder) and every other float output: max abs/rel error, cosine (overall and the minimum
over rows — tokens or sentences), SQNR; for decoders top-1 agreement, KL divergence of the
next-token distributions and perplexity of the validation text under both models (real sequences
only: the perplexity of random tokens says nothing about a language model, and a broken model
with flatter predictions even scores better on them).

Per layer, the error is reported twice:

* *propagated* — the layer's output value in a full run of each model (error accumulated from
  every earlier layer);
* *shadow* — the rewritten layer alone, fed the reference model's own layer input, so one layer's
  error is seen without the others' (a layer is the set of nodes tagged with its ``layer``).

The verdict (:func:`judge`) compares the primary output with the plugin's declared
:class:`~minitx.plugin.Tolerance`: decoders by mean next-token KL, top-1 agreement and the relative
perplexity change, other outputs by the mean per-row cosine; the worst row is reported, and
judged only when a tolerance asks for it (a minimum over rows gets stricter the more text it sees).

Validation never reuses what an activation-aware rewrite was fitted on: :meth:`Calibration.split`
holds out every 4th real sequence (or takes the user's ``--validate`` input) and draws the random
sequences of validation independently of those of calibration; the report names both parts.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from . import metrics
from .errors import MinitxError
from .executor import Executor
from .ir import Graph, Value, bind_shape
from .training.evaluation import token_nll


# ------------------------------------------------------------------------------ calibration
HOLD_OUT_EVERY = 4   # without --validate, every 4th real calibration sequence is held out for validation


@dataclass(frozen=True)
class CalibrationSplit:
    """Disjoint parts of a calibration: ``fit`` (what activation-aware rewrites collect
    activations on; its last ``fit_random`` sequences are random tokens) and ``check`` (what the
    rewrite is validated on). ``disjoint`` is False only when no real sequence could be held out
    (a single text and no ``--validate``) or the ``--validate`` input repeats calibration sequences."""

    fit: list[list[int]]
    check: list[list[int]]
    fit_random: int
    fit_source: str
    check_source: str
    disjoint: bool
    check_random: int = 0   # the last ``check_random`` of ``check`` are random tokens


@dataclass
class Calibration:
    """Where calibration sequences come from. ``sequences(model)`` turns them into token ids;
    ``split(model)`` divides them into a part to fit on and a disjoint part to validate on.
    ``validation`` (``--validate``) replaces the held-out part by inputs of its own."""

    texts: list[str] = field(default_factory=list)
    ids: list[list[int]] = field(default_factory=list)
    n_random: int = 0
    random_len: int = 32
    seed: int = 0
    source: str = ""
    validation: "Calibration | None" = None

    @classmethod
    def random(cls, n: int = 4, length: int = 32, seed: int = 0) -> "Calibration":
        return cls(n_random=n, random_len=length, seed=seed, source=f"random:{n}x{length} (seed {seed})")

    @classmethod
    def parse(cls, items: Sequence[str], seed: int = 0, validate: Sequence[str] = (),
              flag: str = "--calib") -> "Calibration":
        """Command-line ``--calib`` values: ``random[:BxT]``, ``file:PATH`` (one text per non-empty
        line), ``ids:1,2,3``, ``text:TEXT`` or plain text (which must not look like a prefix); several may be combined. ``validate`` are ``--validate``
        values in the same syntax: the inputs to validate on instead of a held-out part."""
        c = cls(seed=seed)
        if validate:
            c.validation = cls.parse(validate, seed=seed, flag="--validate")
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
                    raise MinitxError(f"{flag} {it!r}: expected random:NxLEN with N >= 1, LEN >= 2") from None
                src.append(f"random:{c.n_random}x{c.random_len}")
            elif it.startswith("file:"):
                path = it[5:]
                if not os.path.isfile(path):
                    raise MinitxError(f"{flag} {it!r}: no such file {path}")
                try:
                    with open(path, encoding="utf-8") as f:
                        lines = [ln.strip() for ln in f if ln.strip()]
                except UnicodeDecodeError:
                    raise MinitxError(f"{flag} {it!r}: {path} is not UTF-8 text") from None
                if not lines:
                    raise MinitxError(f"{flag} {it!r}: {path} holds no text")
                c.texts += lines
                src.append(f"file:{path} ({len(lines)} lines)")
            elif it.startswith("ids:"):
                try:
                    c.ids.append([int(x) for x in it[4:].split(",") if x.strip()])
                except ValueError:
                    raise MinitxError(f"{flag} {it!r}: expected ids:1,2,3") from None
                src.append("ids")
            else:
                if it.startswith("text:"):
                    it = it[5:]
                elif re.match(r"[a-z]+:\S", it):   # a mistyped prefix (fille:x.txt) is not text
                    raise MinitxError(f"{flag} {it!r}: unknown prefix {it.split(':')[0]!r} (use file:, ids:, random: "
                                      f"or text:, e.g. text:{it})")
                if not it.strip():
                    raise MinitxError(f"{flag}: empty text")
                c.texts.append(it)
                src.append("text")
        if not items:
            c.n_random = 4
            src.append("random:4x32")
        c.source = ", ".join(src) + (f" (seed {seed})" if c.n_random else "")
        return c

    def sequences(self, model) -> list[list[int]]:
        """Every sequence: the real ones (ids, texts), then the random ones."""
        return self._checked(self._real(model) + self._random(model, 0), model)

    def split(self, model) -> CalibrationSplit:
        """The part to fit on and the disjoint part to validate on (see the module docstring).

        Without ``validation``, every ``HOLD_OUT_EVERY``-th real sequence (the last one when there
        are fewer than that, none when there is only one) is held out; random sequences are drawn
        twice from independent streams of the seed. With ``validation``, all of this calibration
        is fitted on and the validation inputs are checked on."""
        real = self._real(model)
        rand_fit = self._random(model, 0)
        if self.validation is not None:
            v = self.validation
            check = v._real(model) + v._random(model, 1)
            fit = real + rand_fit
            seen = {tuple(x) for x in fit}
            shared = sum(tuple(x) in seen for x in check)
            note = (f"; {shared} of them also in the calibration input" if shared
                    else "; disjoint from the calibration input")
            return CalibrationSplit(self._checked(fit, model), self._checked(check, model, "validation"),
                                    len(rand_fit), self.source or "calibration",
                                    f"--validate {v.source}" + note, shared == 0, v.n_random)
        n = len(real)
        held = [k for k in range(n) if k % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1] or ([n - 1] if n >= 2 else [])
        out = set(held)
        fit = [s for k, s in enumerate(real) if k not in out] + rand_fit
        check = [real[k] for k in held] + self._random(model, 1)
        parts_fit, parts_check = [], []
        if n:
            parts_fit.append(f"{n - len(held)} of {n} real sequences")
            how = f"every {HOLD_OUT_EVERY}th" if n >= HOLD_OUT_EVERY else "the last"
            parts_check.append(f"{len(held)} of {n} real sequences held out ({how})"
                               if held else f"the {n} real sequence itself (too few to hold one out)")
            if not held:
                check = real + check
        if self.n_random:
            parts_fit.append(f"{len(rand_fit)} random")
            parts_check.append(f"{len(rand_fit)} random drawn apart from calibration's")
        disjoint = not ({tuple(x) for x in check} & {tuple(x) for x in fit})
        note = ("disjoint from the calibration part" if disjoint else
                "NOT disjoint from the calibration part (give more text or --validate SPEC)")
        return CalibrationSplit(self._checked(fit, model), self._checked(check, model, "validation"), len(rand_fit),
                                f"{self.source}: {', '.join(parts_fit)}",
                                f"{self.source}: {', '.join(parts_check)}; {note}", disjoint, self.n_random)

    def _real(self, model) -> list[list[int]]:
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
        return seqs

    def _random(self, model, stream: int) -> list[list[int]]:
        """The seeded random sequences; stream 0 (calibration) is ``default_rng(seed)`` as it always
        was, stream 1 (validation) an independent draw."""
        if not self.n_random:
            return []
        rng = np.random.default_rng(self.seed if stream == 0 else [self.seed, stream])
        length = min(self.random_len, model.n_ctx)
        return [rng.integers(0, model.vocab_size, length).tolist() for _ in range(self.n_random)]

    @staticmethod
    def _checked(seqs: list[list[int]], model, what: str = "calibration") -> list[list[int]]:
        for k, s in enumerate(seqs):
            bad = [t for t in s if not 0 <= t < model.vocab_size]
            if bad:
                raise MinitxError(f"{what} sequence {k + 1}: token id {bad[0]} is outside the vocabulary")
            if len(s) > model.n_ctx:
                raise MinitxError(f"{what} sequence {k + 1} has {len(s)} tokens; the context is {model.n_ctx}")
        if not seqs:
            raise MinitxError(f"no {what} sequences")
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
    mean_row_cosine: float | None = None   # mean over rows of the per-row cosine (None in older reports)
    nonfinite: int = 0                     # inf/NaN elements of the output where the reference is finite

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class ValidationReport:
    calibration: str                    # what it was validated on (the held-out / --validate part)
    n_sequences: int
    tolerance: dict[str, Any]
    outputs: list[OutputReport]
    layers: list[dict[str, Any]]
    perplexity: dict[str, float] | None
    passed: bool
    failure: str = ""
    fitted_on: str = ""                 # the calibration part activation-aware rewrites collect on
    disjoint: bool | None = None        # validation shares no sequence with that part

    def primary(self) -> OutputReport:
        return self.outputs[0]

    def as_dict(self) -> dict[str, Any]:
        return {"calibration": self.calibration, "n_sequences": self.n_sequences, "tolerance": self.tolerance,
                "outputs": [o.as_dict() for o in self.outputs], "layers": self.layers,
                "perplexity": self.perplexity, "passed": self.passed, "failure": self.failure,
                "fitted_on": self.fitted_on, "disjoint": self.disjoint}

    def summary(self) -> str:
        p = self.primary()
        parts = [f"{p.name}: max abs {p.max_abs:.3g}, max rel {p.max_rel:.3g}"]
        if p.mean_row_cosine is not None:
            parts.append(f"mean cosine {p.mean_row_cosine:.6f} (min row {p.min_row_cosine:.6f})")
        elif p.cosine is not None:
            parts.append(f"cosine {p.cosine:.6f} (min row {p.min_row_cosine:.6f})")
        if p.sqnr_db is not None:
            parts.append(f"SQNR {p.sqnr_db:.1f} dB")
        if p.top1 is not None:
            parts.append(f"top-1 {p.top1:.3f}" + (f", mean KL {p.kl:.3g}" if p.kl is not None else ""))
        if self.perplexity:
            ppl = self.perplexity
            rel = ppl.get("relative_change", ppl["rewritten"] / ppl["reference"] - 1)
            parts.append(f"ppl {ppl['reference']:.3f} -> {ppl['rewritten']:.3f} ({100 * rel:+.2f}%)")
        return "; ".join(parts)


def _row_cosines(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Cosine of each row (last axis) of ``out`` with the same row of ``ref``; rows where either is
    all zeros count as 1 if both are, else 0; NaN where ``out`` is not finite."""
    r = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
    o = out.reshape(-1, out.shape[-1]).astype(np.float64)
    nr, no = np.linalg.norm(r, axis=1), np.linalg.norm(o, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        c = (r * o).sum(1) / (nr * no)
    zero = (nr == 0) | (no == 0)
    c[zero] = np.where((nr == 0) & (no == 0), 1.0, 0.0)[zero]
    return c


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
    """Run both models (minitx.model.Model) on the validation part of ``calib``
    (:meth:`Calibration.split`) and judge ``rewritten`` by ``tolerance`` (a minitx.plugin.Tolerance)."""
    part = calib.split(reference)
    seqs = part.check
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
    n_text = len(seqs) - part.check_random     # perplexity is a measure of real text only
    for k, ids in enumerate(seqs):
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
        if decoder and len(ids) > 1 and k < n_text:
            tgt = np.asarray(ids[1:])
            for logits, acc in ((r["logits"], nll_ref), (o["logits"], nll_new)):
                acc.extend(token_nll(logits[0, :-1], tgt).tolist())
    outs = []
    for n in names:
        pairs = got[n]
        if not pairs:
            continue
        ref = np.concatenate([a.reshape(-1, a.shape[-1]) for a, _ in pairs])
        out = np.concatenate([b.reshape(-1, b.shape[-1]) for _, b in pairs])
        c = metrics.compare(ref, out, logits=(n == "logits"))
        rows = _row_cosines(ref, out)
        bad = int((~np.isfinite(out) & np.isfinite(ref)).sum())
        outs.append(OutputReport(n, c.max_abs, c.max_rel, c.cosine, float(rows.min()), c.sqnr_db, c.top1, c.kl,
                                 c.passed, float(rows.mean()), bad))
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
            rows = _row_cosines(ref, out)
            row[key] = {"max_abs": c.max_abs, "max_rel": c.max_rel, "cosine": c.cosine,
                        "mean_row_cosine": float(rows.mean()), "min_row_cosine": float(rows.min()),
                        "sqnr_db": c.sqnr_db}
        layer_rows.append(row)
    ppl = None
    if nll_ref:
        ppl = {"reference": float(np.exp(np.mean(nll_ref))), "rewritten": float(np.exp(np.mean(nll_new)))}
        ppl["change"] = ppl["rewritten"] - ppl["reference"]
        # ppl ratio = exp(mean per-token NLL difference); its noise is that mean's standard error
        d = np.asarray(nll_new) - np.asarray(nll_ref)
        se = float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else float("inf")
        ppl["relative_change"] = float(np.expm1(d.mean()))
        ppl["relative_change_low"] = float(np.expm1(d.mean() - 2.0 * se))
        ppl["tokens"] = int(d.size)
    passed, failure = judge(outs, tolerance, ppl)
    return ValidationReport(part.check_source, len(seqs), tolerance.as_dict(), outs, layer_rows, ppl, passed, failure,
                            part.fit_source, part.disjoint)


def judge(outs: Sequence[OutputReport], tol, perplexity: dict[str, float] | None = None) -> tuple[bool, str]:
    """(passed, why not) for the primary output (and, if exact, every output) against ``tol``.

    Every bound of ``tol`` that is set and measurable is checked (KL and top-1 need logits, the
    perplexity change a decoder and real text); a non-finite output or metric fails. The
    perplexity change is a mean over sampled next tokens, noisy on a short text, so it fails only
    when even the low end of its ~95% interval (mean per-token NLL difference minus two standard
    errors) exceeds ``max_ppl_increase``; KL, an expectation over the whole distribution, is the
    precise criterion. The reason names each failed metric, its value and its bound, on one line."""
    p = outs[0]
    if tol.exact:
        bad = [o for o in outs if not o.allclose]
        if bad:
            return False, (f"{bad[0].name} differs beyond float rounding (max abs {bad[0].max_abs:.3g}, "
                           f"max rel {bad[0].max_rel:.3g}) although the rewrite is declared exact")
        return True, ""
    if p.nonfinite:
        return False, f"{p.name} has {p.nonfinite} inf/NaN values where the reference is finite"
    rel = None
    if perplexity:   # judged at the low end of its ~95% interval: a small text's noise refuses nothing
        rel = perplexity.get("relative_change_low", perplexity["rewritten"] / perplexity["reference"] - 1.0)
    # (label, measured value, bound name, bound, higher is better, format)
    checks = [("mean cosine", p.mean_row_cosine, "min_cosine", tol.min_cosine, True, "{:.6f}"),
              ("min row cosine", p.min_row_cosine, "min_row_cosine", tol.min_row_cosine, True, "{:.6f}"),
              ("max rel error", p.max_rel, "max_rel", tol.max_rel, False, "{:.4g}"),
              ("mean KL", p.kl, "max_kl", tol.max_kl, False, "{:.4g}"),
              ("top-1 agreement", p.top1, "min_top1", tol.min_top1, True, "{:.4f}"),
              ("perplexity change", rel, "max_ppl_increase", tol.max_ppl_increase, False, "{:+.2%}")]
    failed = []
    for label, value, key, bound, higher, fmt in checks:
        if bound is None or value is None:
            continue
        if np.isfinite(value) and (value >= bound if higher else value <= bound):
            continue
        shown = fmt.format(value) if np.isfinite(value) else str(value)
        if key == "max_ppl_increase":
            label = "perplexity"
            shown = (f"{perplexity.get('relative_change', value):+.2%} ({perplexity['reference']:.3f} -> "
                     f"{perplexity['rewritten']:.3f} over {perplexity.get('tokens', '?')} tokens; at least {shown} "
                     "at ~95% confidence)")
        else:
            label = f"{p.name} {label}"
        failed.append(f"{label} {shown} {'<' if higher else '>'} {key} {bound:g}")
    return (not failed), "; ".join(failed)
