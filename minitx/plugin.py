"""Optimization plugins: named sets of rewrite rules with options and a declared tolerance.

A plugin is a :class:`Plugin` object. It declares its options (``Option``: default, parser,
help), whether it is exact, its :class:`Tolerance`, its position in a composition (``order``:
lower runs first; ties keep the user's order) and turns parsed options into
:class:`minitx.rewrite.Rule` s. Whole-graph decisions (importance scores, masks, which heads to
cut) belong in :meth:`Plugin.analyze`, whose typed plan the rules read as ``ctx.plan``; the user's
options stay as given in ``ctx.options``. :meth:`Plugin.apply` runs the analysis, then the rules
to a fixed point with :func:`minitx.rewrite.apply`.

Activation-aware rewrites (Wanda pruning, whitened SVD, …) need the model's activations on
representative inputs. Such a plugin says so per options with :meth:`Plugin.uses_calibration`;
:func:`optimize` then tokenizes the user's calibration input (``--calib``; the sequences held out
of it for validation excepted, see :meth:`minitx.validate.Calibration.split`) for the model being
rewritten and calls
``apply(graph, params, opts, calib=CalibrationData)``. Plugins that do not declare it are called
exactly as before, ``apply(graph, params, opts)``, so third-party plugins keep working. When the
user gave no calibration input, the sequences are seeded random tokens: the rewrite's log entry
records it (``calibration.random``) and a warning says so — random tokens give unrepresentative
activation norms, so an activation-aware rewrite calibrated on them is a poorer approximation.

Plugins are discovered from the entry-point group ``minitx.plugins``: an entry point names a
zero-argument factory (or class) returning a Plugin. As with backends, through the same
:mod:`minitx.registry`, nothing is imported until a plugin is used, one that fails to load is
reported with its reason while the others keep working, and a name two packages declare is an
error naming both. Built-in plugins are also found from a source checkout that was never
installed.

Option strings, as on the command line: ``name``, ``name:key=value,key2=value2``, or the
shorthand ``name:value`` which sets the plugin's ``positional`` option (``quant:int8`` is
``quant:mode=int8``). Every malformed string is a one-line MinitxError.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np

from . import rewrite
from .errors import MinitxError
from .registry import Entry, Registry

GROUP = "minitx.plugins"

# Shipped plugins, found even when the package was never installed (then no entry points exist).
BUILTIN = {
    "quant": "minitx.plugins.quant:plugin",
    "recompute": "minitx.plugins.recompute:plugin",
    "sparsity": "minitx.plugins.sparsity:plugin",
    "lowrank": "minitx.plugins.lowrank:plugin",
    "parallel": "minitx.plugins.parallel:plugin",
    "attention": "minitx.plugins.attention:plugin",
    "activations": "minitx.plugins.activations:plugin",
    "layers": "minitx.plugins.layers:plugin",
}


# ------------------------------------------------------------------------------ declarations
@dataclass(frozen=True)
class Option:
    """One plugin option: ``parse`` turns the command-line string into a value or raises ValueError
    with a short reason; ``choices`` (if given) lists the accepted strings."""

    default: Any
    parse: Callable[[str], Any] = str
    help: str = ""
    choices: tuple[str, ...] | None = None


def positive_int(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise ValueError("must be a positive integer")
    return v


def fraction(s: str) -> float:
    v = float(s)
    if not 0.0 <= v <= 1.0:
        raise ValueError("must be between 0 and 1")
    return v


def boolean(s: str) -> bool:
    t = s.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def non_negative(s: str) -> float:
    v = float(s)
    if not v >= 0.0:
        raise ValueError("must be a number >= 0 (inf turns the bound off)")
    return v


@dataclass(frozen=True)
class Tolerance:
    """What an approximate rewrite promises on the validation outputs (None = not checked).

    :func:`minitx.validate.judge` checks every bound that is set and measurable on the primary
    output (``logits`` of a decoder, ``embedding`` of an encoder):

    ================  ========================================================================
    ``min_cosine``    mean over rows (tokens, sentences) of each row's cosine to the reference
    ``min_row_cosine``  the worst single row's cosine (opt-in, see below)
    ``max_rel``       max |out - ref| / max |ref|
    ``max_kl``        mean KL(reference ‖ rewritten) of the next-token distributions, nats (logits)
    ``min_top1``      share of positions whose argmax agrees with the reference (logits)
    ``max_ppl_increase``  relative perplexity increase of the validation text (decoders): 0.05 = +5%;
                      judged at the low end of its ~95% interval, so a short text's noise alone
                      refuses nothing
    ================  ========================================================================

    Decoders are judged by the distribution they predict (KL, perplexity) — logits are
    shift-invariant under softmax, so their cosine is only a coarse sanity bound there — and other
    outputs by mean cosine. Top-1 agreement is reported but bounded only on request
    (``min_top1=``): where the reference is nearly undecided between two tokens (a random-weight
    model, or any flat distribution), a negligible change flips the argmax, as int8 did for 9% of a
    random GPT-2's positions at KL below 1e-4. The defaults bound averages, not the worst row: the minimum over N rows
    keeps falling as N grows, so a worst-row bound refuses a rewrite more often the more validation
    text it is given. ``min_row_cosine`` is there for a user who wants that guarantee anyway.

    ``exact=True`` means "equal to float rounding": every output element must pass
    :func:`minitx.metrics.compare` with the dtype's default tolerance.

    Built-in plugins declare one Tolerance per mode and let the user override any bound with the
    option of the same name (:meth:`options`, :meth:`override`): ``max_kl=0.1``, ``min_top1=0``,
    ``max_ppl_increase=inf`` (off).
    """

    exact: bool = False
    min_cosine: float | None = None        # mean over rows of the per-row cosine
    max_rel: float | None = None           # max |out - ref| / max |ref|
    max_kl: float | None = None            # mean KL of next-token distributions (logits), nats
    min_top1: float | None = None          # share of positions whose argmax agrees (logits)
    max_ppl_increase: float | None = None  # perplexity(rewritten) / perplexity(reference) - 1 (decoders)
    min_row_cosine: float | None = None    # worst row's cosine (stricter the more rows; opt-in)

    BOUNDS: ClassVar[tuple[str, ...]] = ("min_cosine", "min_row_cosine", "max_rel", "max_kl", "min_top1",
                                         "max_ppl_increase")

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None and v is not False}

    @staticmethod
    def options() -> dict[str, Option]:
        """The plugin options that override one declared bound each (same names as the fields)."""
        return {
            "min_cosine": Option(None, fraction, "override the bound on the mean per-row cosine"),
            "min_row_cosine": Option(None, fraction, "also bound the worst row's cosine (off by default)"),
            "max_rel": Option(None, non_negative, "also bound max |out-ref| / max |ref| (off by default)"),
            "max_kl": Option(None, non_negative, "override the bound on the mean next-token KL, nats (decoders)"),
            "min_top1": Option(None, fraction, "override the bound on top-1 agreement (decoders)"),
            "max_ppl_increase": Option(None, non_negative, "override the bound on the relative perplexity "
                                       "increase, 0.05 = +5% (decoders)"),
        }

    def override(self, opts: Mapping[str, Any]) -> "Tolerance":
        """This tolerance with every bound the user set in ``opts`` (not None) replaced."""
        given = {k: float(opts[k]) for k in self.BOUNDS if opts.get(k) is not None}
        return replace(self, **given) if given else self

    @staticmethod
    def loosest(*tols: "Tolerance") -> "Tolerance":
        """One tolerance no stricter than any of ``tols`` (a rewrite combining several modes): per
        bound the loosest value; a bound that one of them leaves unchecked stays unchecked."""
        approx = [t for t in tols if not t.exact]       # an exact part adds no error of its own
        if not approx:
            return Tolerance(exact=True)
        out: dict[str, Any] = {}
        for k in Tolerance.BOUNDS:
            vals = [getattr(t, k) for t in approx]
            if any(v is None for v in vals):
                continue
            out[k] = min(vals) if k.startswith("min_") else max(vals)
        return Tolerance(**out)


@dataclass(frozen=True)
class CalibrationData:
    """The token sequences an activation-aware rewrite runs the graph on (one run per sequence,
    batch 1, as :func:`minitx.feeds.build` builds its inputs).

    ``source`` describes where they came from (``--calib``); the last ``n_random`` sequences are
    seeded random tokens rather than real text (all of them when the user gave no calibration).
    They are the *fitting* part of the calibration (:meth:`minitx.validate.Calibration.split`):
    the sequences the rewrite is then validated on are held out from them.
    """

    sequences: tuple[tuple[int, ...], ...]
    source: str
    n_random: int = 0

    @classmethod
    def of(cls, calib, model) -> "CalibrationData":
        """The sequences of ``calib`` (a :class:`minitx.validate.Calibration`) for ``model``."""
        part = calib.split(model)
        return cls(tuple(tuple(int(t) for t in s) for s in part.fit), part.fit_source, part.fit_random)

    @property
    def random(self) -> bool:
        """True when every sequence is random tokens: no real text reached the rewrite."""
        return self.n_random >= len(self.sequences)

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "sequences": len(self.sequences),
                "tokens": sum(len(s) for s in self.sequences), "random_sequences": self.n_random,
                "random": self.random}


class Plugin:
    """Base class of an optimization plugin; subclasses set the class attributes and ``rules``."""

    name: str = "unnamed"
    description: str = ""
    order: int = 50                    # composition position: lower runs first
    positional: str | None = None      # the option ``name:value`` sets
    options: dict[str, Option] = {}
    exact: bool = False

    def tolerance(self, opts: Mapping[str, Any]) -> Tolerance:
        """The declared tolerance for these options (exact plugins: ``Tolerance(exact=True)``)."""
        return Tolerance(exact=True) if self.exact else Tolerance(min_cosine=0.99)

    def rules(self, opts: Mapping[str, Any]) -> list[rewrite.Rule]:
        raise NotImplementedError

    def check_options(self, opts: Mapping[str, Any]) -> None:
        """Cross-option checks after parsing (raise MinitxError)."""

    def uses_calibration(self, opts: Mapping[str, Any]) -> bool:
        """Whether ``apply`` with these options reads activations on calibration inputs; if so,
        :func:`optimize` passes them as the keyword ``calib`` (a :class:`CalibrationData`)."""
        return False

    def analyze(self, graph, params: Mapping[str, np.ndarray], opts: Mapping[str, Any],
                calib: CalibrationData | None = None) -> Any:
        """Whole-graph work a rule cannot do node by node — importance scores, masks, which heads
        or layers to cut, calibration activations — done once before the rules run. Return a typed
        plan (a dataclass); the rules read it as ``ctx.plan``, beside the user's ``ctx.options``.
        The default plans nothing (None)."""
        return None

    def apply(self, graph, params: Mapping[str, np.ndarray], opts: Mapping[str, Any], *,
              calib: CalibrationData | None = None) -> rewrite.RewriteResult:
        """Rewrite ``graph``/``params`` (copies; the inputs are not modified): :meth:`analyze`,
        then :meth:`rules` to a fixed point. ``calib`` is given only to a plugin whose
        :meth:`uses_calibration` is true for ``opts``."""
        plan = self.analyze(graph, params, opts, calib)
        return rewrite.apply(graph, params, self.rules(opts), options=opts, plan=plan, where=f"plugin {self.name}")


# ------------------------------------------------------------------------------ registry
def _make(target: Any) -> Plugin:
    p = target() if callable(target) and not isinstance(target, Plugin) else target
    if not isinstance(p, Plugin):
        raise TypeError(f"entry point returned {type(p).__name__}, not a minitx Plugin")
    return p


REGISTRY: Registry[Plugin] = Registry(GROUP, "plugin", _make, BUILTIN)


def entries() -> dict[str, Entry[Plugin]]:
    """Every plugin declared in the entry-point group (or shipped), none imported yet."""
    return REGISTRY.entries()


def register(name: str, factory: Callable[[], Plugin]) -> None:
    """Register a plugin in-process (tests, notebooks); installed packages use the entry point.
    A name already taken is an error."""
    REGISTRY.register(name, factory)


def get_plugin(name: str) -> Plugin:
    return REGISTRY.get(name)


# ------------------------------------------------------------------------------ option strings
@dataclass
class PluginSpec:
    """A plugin with parsed options, as named on the command line (``text``)."""

    plugin: Plugin
    options: dict[str, Any]
    text: str

    @property
    def name(self) -> str:
        return self.plugin.name


def parse_spec(text: str) -> PluginSpec:
    """``name[:key=value,...]`` or ``name:value`` → PluginSpec with every option filled in."""
    text = text.strip()
    name, _, rest = text.partition(":")
    name = name.strip()
    if not name:
        raise MinitxError(f"--plugin {text!r}: missing plugin name (expected NAME or NAME:key=value,...)")
    p = get_plugin(name)
    raw: dict[str, str] = {}
    for k, item in enumerate(x.strip() for x in rest.split(",")) if rest.strip() else ():
        if not item:
            raise MinitxError(f"--plugin {text!r}: empty option")
        if "=" in item:
            key, _, val = item.partition("=")
            key, val = key.strip(), val.strip()
        elif k == 0 and p.positional:
            key, val = p.positional, item
        else:
            raise MinitxError(f"--plugin {text!r}: option {item!r} must be key=value"
                              + (f" (only the first may be a bare value, for {p.positional!r})" if p.positional else ""))
        if key not in p.options:
            known = ", ".join(sorted(p.options)) or "none"
            raise MinitxError(f"--plugin {text!r}: unknown option {key!r} for plugin {name} (known: {known})")
        if key in raw:
            raise MinitxError(f"--plugin {text!r}: option {key!r} given twice")
        raw[key] = val
    opts: dict[str, Any] = {}
    for key, o in p.options.items():
        if key not in raw:
            opts[key] = o.default
            continue
        val = raw[key]
        if o.choices is not None and val not in o.choices:
            raise MinitxError(f"--plugin {text!r}: bad value {val!r} for {key} (choose from: {', '.join(o.choices)})")
        try:
            opts[key] = o.parse(val)
        except (ValueError, TypeError) as e:
            raise MinitxError(f"--plugin {text!r}: bad value {val!r} for {key}: {e}") from None
    try:
        p.check_options(opts)
    except MinitxError as e:
        raise MinitxError(f"--plugin {text!r}: {e}") from None
    return PluginSpec(p, opts, text)


def plan(texts: Sequence[str]) -> list[PluginSpec]:
    """Parse option strings and put them in composition order (``order``, then as given)."""
    specs = [parse_spec(t) for t in texts]
    seen: set[str] = set()
    for s in specs:
        if s.name in seen:
            raise MinitxError(f"--plugin {s.name} given twice; combine its options into one --plugin")
        seen.add(s.name)
    return [s for _, _, s in sorted((s.plugin.order, k, s) for k, s in enumerate(specs))]


def describe() -> list[dict[str, Any]]:
    """One row per discovered plugin for ``minitx plugins``: name, status, options (loads each)."""
    rows = []
    for name, e in sorted(entries().items()):
        p = REGISTRY.load(e)
        row: dict[str, Any] = {"name": name, "target": e.target, "available": p is not None}
        if p is None:
            row["error"] = e.error
            if e.remedy:
                row["remedy"] = e.remedy
        else:
            row.update(description=p.description, exact=p.exact, order=p.order, positional=p.positional,
                       options={k: {"default": o.default, "help": o.help, "choices": list(o.choices or [])}
                                for k, o in p.options.items()})
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------ applying
def optimize(model, texts: Sequence[str], *, calib=None, force: bool = False, validate: bool = True,
             warn: Callable[[str], None] | None = None):
    """Apply the plugins named by ``texts`` to ``model`` (a minitx.model.Model), in composition
    order; each step is validated against the model before it on ``calib`` (a
    :class:`minitx.validate.Calibration`; by default :meth:`~minitx.validate.Calibration.default`:
    fitted on seeded random tokens, validated on the held-out text shipped with minitx at every
    length when the model has a tokenizer) and refused when it
    exceeds its plugin's declared tolerance — unless ``force``, which only warns. A plugin whose
    rewrite is activation-aware (:meth:`Plugin.uses_calibration`) collects its activations on the
    fitting part of ``calib``; every step is validated on the part held out from it
    (:meth:`minitx.validate.Calibration.split`). If the fitting part is random tokens, ``warn`` says so.

    Returns a new Model whose ``meta["rewrites"]`` holds, per plugin, its options, the firing log,
    weight bytes before/after, the calibration an activation-aware rewrite used and the validation
    report.
    """
    from . import validate as val
    from .model import Model

    specs = plan(texts)
    if not specs:
        raise MinitxError("no plugin given (use --plugin NAME[:options]; `minitx plugins` lists them)")
    calib = calib if calib is not None else val.Calibration.default()
    current = model
    log = list(model.meta.get("rewrites", []))
    for s in specs:
        data = CalibrationData.of(calib, current) if s.plugin.uses_calibration(s.options) else None
        res = (s.plugin.apply(current.graph, current.params, s.options, calib=data) if data is not None
               else s.plugin.apply(current.graph, current.params, s.options))
        new = Model(dict(current.config), res.params, res.graph, current.tokenizer_json, dict(current.meta))
        entry: dict[str, Any] = {
            "plugin": s.name, "spec": s.text, "options": s.options, "exact": s.plugin.exact,
            "tolerance": s.plugin.tolerance(s.options).as_dict(),
            "fired": res.counts(), "firings": [f.as_dict() for f in res.firings], "passes": res.passes,
            "bytes_before": current.nbytes(), "bytes_after": new.nbytes(),
        }
        if data is not None:
            entry["calibration"] = data.as_dict()
            if data.n_random and warn:
                what = "random tokens" if data.random else f"{data.n_random} of {len(data.sequences)} sequences random tokens"
                warn(f"warning: plugin {s.text} collected its activations on {what} ({data.source}), not real text; "
                     "give --calib file:PATH (or text) for representative activations")
        if not res.firings and warn:
            warn(f"warning: plugin {s.text} changed nothing (no node matched its rules)")
        if validate and res.firings:
            rep = val.validate(current, new, calib, s.plugin.tolerance(s.options))
            entry["validation"] = rep.as_dict()
            if not rep.passed:
                msg = f"plugin {s.text}: exceeds its declared tolerance — {rep.failure}"
                if not force:
                    raise MinitxError(msg + " (`optimize`, `infer` and `qat` keep it with --force)")
                if warn:
                    warn("warning: " + msg + " (kept anyway)")
        log.append(entry)
        new.meta["rewrites"] = log
        current = new
    return current
