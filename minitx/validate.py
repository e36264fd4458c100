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

from . import feeds, metrics
from .errors import MinitxError
from .executor import Executor
from .ir import Graph, Value
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
    # Validate on the text shipped with minitx at every length (:func:`heldout_sequences`):
    # "asked" (--validate heldout) or "default" (falls back to random ids without a tokenizer).
    heldout: str = ""

    @classmethod
    def random(cls, n: int = 4, length: int = 32, seed: int = 0) -> "Calibration":
        return cls(n_random=n, random_len=length, seed=seed, source=f"random:{n}x{length} (seed {seed})")

    @classmethod
    def default(cls, seed: int = 0) -> "Calibration":
        """What ``optimize`` uses when the user names nothing: fit on seeded random tokens (with a
        warning, for activation-aware rewrites), validate on the shipped held-out text at every
        length from 1 token to the full context when the model has a tokenizer (random token ids
        otherwise) — users feed text of all lengths, and a rewrite can fail only at some."""
        c = cls.random(seed=seed)
        c.validation = cls(heldout="default", seed=seed, source="heldout")
        return c

    @classmethod
    def parse(cls, items: Sequence[str], seed: int = 0, validate: Sequence[str] = (),
              flag: str = "--calib") -> "Calibration":
        """Command-line ``--calib`` values: ``random[:BxT]``, ``file:PATH`` (one text per non-empty
        line), ``ids:1,2,3``, ``text:TEXT`` or plain text (which must not look like a prefix); several
        may be combined. ``validate`` are ``--validate`` values in the same syntax, plus ``heldout``
        (the text shipped with minitx at every length): the inputs to validate on instead of a
        held-out part. With neither, :meth:`default`."""
        if not items and not validate:
            return cls.default(seed)
        c = cls(seed=seed)
        if validate:
            c.validation = cls.parse(validate, seed=seed, flag="--validate")
        src = []
        for it in items:
            if it == "heldout" and flag == "--validate":
                c.heldout = "asked"
                src.append("heldout")
            elif it == "random" or it.startswith("random:"):
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
        v = self.validation
        if v is not None and v.heldout == "default" and model.tokenizer is None:
            v = None   # the default without a tokenizer: random ids held apart, as below
        if v is not None:
            if v.heldout:
                check = heldout_sequences(model) + v._real(model) + v._random(model, 1)
                return CalibrationSplit(self._checked(real + rand_fit, model), self._checked(check, model, "validation"),
                                        len(rand_fit), self.source or "calibration",
                                        f"held-out text shipped with minitx ({len(check)} sequences of "
                                        f"{min(map(len, check))}-{max(map(len, check))} tokens"
                                        + (f", and {v.source}" if v.source != "heldout" else "") + ")",
                                        True, v.n_random)
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


HELDOUT_TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "heldout.txt")
HELDOUT_WINDOWS = 4   # windows of the held-out text per length


def heldout_passages() -> list[str]:
    """The held-out passages shipped with minitx (minitx/data/heldout.txt, sources in
    DATA_SOURCES.md): public-domain prose and verse in several languages and scripts, code and
    numbers, separated by blank lines. No model is trained or calibrated on them."""
    with open(HELDOUT_TEXT, encoding="utf-8") as f:
        return [p.strip("\n") for p in f.read().split("\n\n") if p.strip()]


def length_ladder(longest: int) -> list[int]:
    """1, 2, 3, 4, 6, 8, 12, 16, 24, 32, … (alternately x1.5 and x4/3) up to and including ``longest``."""
    out, n = [], 1
    while n < longest:
        out.append(n)
        n = 2 if n == 1 else n * 3 // 2 if n & (n - 1) == 0 else n * 4 // 3
    return out + [longest]


def heldout_sequences(model) -> list[list[int]]:
    """Windows of the held-out text for ``model``: for each length of :func:`length_ladder` from 1
    text token to the full context (an encoder's ``max_seq_length``), ``HELDOUT_WINDOWS``
    windows spread over the text (so over its languages), each wrapped in the tokenizer's special
    tokens ([CLS] … [SEP]) exactly as encoding a text of that length would be."""
    tok = model.tokenizer
    if tok is None:
        raise MinitxError("held-out text validation needs a tokenizer, and this model carries none")
    saved = tok.truncation
    tok.no_truncation()
    try:
        stream: list[int] = []
        for p in heldout_passages():
            stream += tok.encode(p, add_special_tokens=False).ids
        bare, full = tok.encode("a", add_special_tokens=False).ids, tok.encode("a").ids
    finally:
        if saved:
            tok.enable_truncation(**saved)
    at = next((k for k in range(len(full) - len(bare) + 1) if full[k:k + len(bare)] == bare), 0)
    pre, post = full[:at], full[at + len(bare):]
    ctx = model.n_ctx
    if not model.is_decoder and model.config.get("max_seq_length"):
        ctx = min(ctx, int(model.config["max_seq_length"]))
    room = max(1, ctx - len(pre) - len(post))
    seqs = []
    for n in length_ladder(room):
        reps = -(-n // len(stream)) + 1
        text = (stream * reps) if reps > 1 else stream
        span = max(len(stream) - n, 0)
        for k in range(HELDOUT_WINDOWS):
            start = (k * span) // max(HELDOUT_WINDOWS - 1, 1)
            seqs.append(pre + text[start:start + n] + post)
    return seqs


def length_bucket(n: int) -> str:
    """The length bucket of an ``n``-token sequence: 1, 2-4, 5-16, 17-64, 65-256, … (powers of 4)."""
    if n <= 1:
        return "1"
    hi = 4
    while n > hi:
        hi *= 4
    return f"{hi // 4 + 1}-{hi}"


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
    lengths: list[dict[str, Any]] = field(default_factory=list)   # the primary output per length bucket

    def primary(self) -> OutputReport:
        return self.outputs[0]

    def worst_length(self) -> dict[str, Any] | None:
        """The length bucket where the rewrite is furthest from the reference: the highest mean KL
        (decoders) or the lowest single-row cosine (other outputs)."""
        if not self.lengths:
            return None
        if self.lengths[0].get("kl") is not None:
            return max(self.lengths, key=lambda b: b["kl"] if np.isfinite(b["kl"]) else np.inf)
        return min(self.lengths, key=lambda b: b["min_cosine"] if np.isfinite(b["min_cosine"]) else -np.inf)

    def as_dict(self) -> dict[str, Any]:
        return {"calibration": self.calibration, "n_sequences": self.n_sequences, "tolerance": self.tolerance,
                "outputs": [o.as_dict() for o in self.outputs], "layers": self.layers,
                "perplexity": self.perplexity, "passed": self.passed, "failure": self.failure,
                "fitted_on": self.fitted_on, "disjoint": self.disjoint, "lengths": self.lengths}

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
        w = self.worst_length()
        if w is not None and len(self.lengths) > 1:
            what = (f"mean KL {w['kl']:.3g}, top-1 {w['top1']:.3f}" if w.get("kl") is not None
                    else f"min cosine {w['min_cosine']:.6f}, mean {w['mean_cosine']:.6f}")
            parts.append(f"worst length {w['tokens']} tokens ({w['sequences']} sequences): {what}")
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
    g = Graph(inputs, [out_value], params, [n for n in nodes])
    try:   # an outside value the rewrite reshaped (T5's shared position bias, narrowed with the
        g.infer()   # heads pruned from every layer) cannot feed the layer alone: no shadow for it
    except MinitxError:
        return None
    return g


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
    seq_lens: list[int] = []                   # token count of each pair in got[primary]
    for k, ids in enumerate(seqs):
        fr = feeds.build(reference.graph, [ids])
        fn = feeds.build(rewritten.graph, [ids])
        # Keep everything of the reference (calibration runs are small) for shadow-mode feeds.
        keep = [o for n in reference.graph.nodes for o in n.outputs] if shadow else [ends[i] for i in layers]
        r = ref_ex.run(fr, keep=keep)
        o = new_ex.run(fn, keep=[ends[i] for i in layers])
        for n in names:
            if n in r and n in o and _float(r[n]):
                got[n].append((r[n], o[n]))
                if n == primary:
                    seq_lens.append(len(ids))
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
    lengths = _by_length(got[primary], seq_lens, primary == "logits")
    passed, failure = judge(outs, tolerance, ppl, lengths)
    return ValidationReport(part.check_source, len(seqs), tolerance.as_dict(), outs, layer_rows, ppl, passed, failure,
                            part.fit_source, part.disjoint, lengths)


def _by_length(pairs: Sequence[tuple[np.ndarray, np.ndarray]], lens: Sequence[int], logits: bool) -> list[dict[str, Any]]:
    """The primary output's agreement per length bucket (:func:`length_bucket`): a rewrite can be
    fine on average and off on very short or very long inputs, so each bucket is reported (and
    judged) on its own. Cosines are per row (token, or sentence for an encoder's embedding)."""
    groups: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for (a, b), n in zip(pairs, lens):
        groups.setdefault(length_bucket(n), []).append((a, b))
    rows = []
    for label, ps in sorted(groups.items(), key=lambda kv: int(kv[0].split("-")[0])):
        ref = np.concatenate([a.reshape(-1, a.shape[-1]) for a, _ in ps])
        out = np.concatenate([b.reshape(-1, b.shape[-1]) for _, b in ps])
        cos = _row_cosines(ref, out)
        row: dict[str, Any] = {"tokens": label, "sequences": len(ps), "rows": int(cos.size),
                               "mean_cosine": float(cos.mean()), "min_cosine": float(cos.min())}
        if logits:
            c = metrics.compare(ref, out, logits=True)
            row.update(kl=c.kl, top1=c.top1)
        rows.append(row)
    return rows


def judge(outs: Sequence[OutputReport], tol, perplexity: dict[str, float] | None = None,
          lengths: Sequence[dict[str, Any]] = ()) -> tuple[bool, str]:
    """(passed, why not) for the primary output (and, if exact, every output) against ``tol``.

    Every bound of ``tol`` that is set and measurable is checked (KL and top-1 need logits, the
    perplexity change a decoder and real text); a non-finite output or metric fails. The
    perplexity change is a mean over sampled next tokens, noisy on a short text, so it fails only
    when even the low end of its ~95% interval (mean per-token NLL difference minus two standard
    errors) exceeds ``max_ppl_increase``; KL, an expectation over the whole distribution, is the
    precise criterion. The reason names each failed metric, its value and its bound, on one line.

    With several length buckets (``lengths``, from :func:`_by_length`), the averaged bounds
    (``min_cosine``, ``max_kl``, and ``min_row_cosine``) hold in every bucket too: a rewrite that
    is fine on average but not on one-token or full-context inputs is refused, naming the bucket."""
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
    if len(lengths) > 1:
        for label, metric, key, higher in (("mean cosine", "mean_cosine", "min_cosine", True),
                                           ("min row cosine", "min_cosine", "min_row_cosine", True),
                                           ("mean KL", "kl", "max_kl", False)):
            bound = getattr(tol, key)
            if bound is None:
                continue
            bad = [b for b in lengths if b.get(metric) is not None and not (
                np.isfinite(b[metric]) and (b[metric] >= bound if higher else b[metric] <= bound))]
            if not bad:
                continue
            w = (min if higher else max)(bad, key=lambda b: b[metric] if np.isfinite(b[metric]) else
                                         (-np.inf if higher else np.inf))
            more = f" (and {len(bad) - 1} other length buckets)" if len(bad) > 1 else ""
            failed.append(f"{p.name} {label} {w[metric]:.6g} {'<' if higher else '>'} {key} {bound:g} "
                          f"on inputs of {w['tokens']} tokens{more}")
    return (not failed), "; ".join(failed)
