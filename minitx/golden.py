"""Golden files: recorded inputs and reference outputs of a model, and their verification.

A golden file pins what a model computes so any backend, rewrite or refactoring can be checked
against it later. It is an ``.npz`` (read with ``allow_pickle=False``) holding:

  ``__golden__``        UTF-8 JSON: format, the model it belongs to (arch + config hash), provenance
                        (who computed the references: ``minitx 0.1.0 / numpy`` or an external
                        reference such as ``transformers 5.23.0 / torch 2.13.0``), names and dtype
  ``in.<name>``         graph inputs (missing KV-cache inputs mean an empty cache)
  ``out.<name>``        graph outputs
  ``node.<name>``       intermediate values, by graph value name (optional)

The same format is written by minitx (``minitx golden``) and by the independent reference
(scripts/make_fixtures.py); :func:`verify` treats both alike. Positions where ``attention_mask``
is 0 are padding: their values are meaningless in every implementation and are not compared.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from . import __version__, feeds, metrics, models
from .backend import Backend
from .errors import MinitxError
from .model import Model
from .modelfile import NpzReader
from .outputs import write_npz_atomic

GOLDEN_FORMAT = 1


def config_hash(config: dict[str, Any]) -> str:
    """A fingerprint of a model's complete config (which fixes every parameter's name and shape)."""
    c = models.complete_config(config)
    return hashlib.sha256(json.dumps(c, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Golden:
    model: dict[str, Any]                  # {"arch": ..., "config_hash": ...}
    provenance: dict[str, Any]             # {"reference": "minitx 0.1.0", "backend": "numpy", ...}
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    nodes: dict[str, np.ndarray] = field(default_factory=dict)

    def header(self) -> dict[str, Any]:
        return {"format": GOLDEN_FORMAT, "model": self.model, "provenance": self.provenance,
                "inputs": list(self.inputs), "outputs": list(self.outputs), "nodes": list(self.nodes)}


# ----------------------------------------------------------------------------------- inputs
def make_feeds(model: Model, seqs: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
    """The feeds minitx itself builds for a batch (:func:`minitx.feeds.for_sequences`: decoders
    left-padded with positions counting real tokens, encoders right-padded, token types 0). Empty
    KV caches are left out: a golden file's absent cache means an empty one."""
    from .generate import check_ids

    check_ids(model, seqs)
    fed = feeds.for_sequences(model.graph, seqs, model.is_decoder)
    return {k: v for k, v in fed.items() if not k.startswith("past.")}


def random_seqs(model: Model, batch: int, length: int, seed: int = 0) -> list[list[int]]:
    """A seeded batch of random token ids; rows get different lengths (length, length-1, …) so
    padding is exercised whenever batch > 1."""
    if batch < 1 or length < 1:
        raise MinitxError(f"--random needs B and T >= 1, got {batch}x{length}")
    if length > model.n_ctx:
        raise MinitxError(f"--random length {length} exceeds the model's context of {model.n_ctx}")
    rng = np.random.default_rng(seed)
    return [rng.integers(0, model.vocab_size, max(1, length - r)).tolist() for r in range(batch)]


def complete_feeds(model: Model, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Graph feeds from recorded inputs: an absent KV cache is an empty one (as wide and of the
    dtype the graph declares); absent token types are 0. Any other input the graph needs must be
    recorded."""
    for v in model.graph.inputs:
        if v.name not in inputs and not v.name.startswith("past.") and v.name != "token_type_ids":
            raise MinitxError(f"golden file has no input {v.name!r}, which this model's graph needs")
    past = {k: a for k, a in inputs.items() if k.startswith("past.")}
    return feeds.build(model.graph, inputs["input_ids"], mask=inputs.get("attention_mask"),
                       position_ids=inputs.get("position_ids"), token_type_ids=inputs.get("token_type_ids"),
                       past=past or None,
                       **{k: inputs.get(k) for k in ("encoder_ids", "encoder_mask", "encoder_position_ids")})


# ------------------------------------------------------------------------------ record / io
def record(model: Model, feeds: dict[str, np.ndarray], backends: Sequence[str | Backend] = ("numpy",),
           intermediates: bool = False, note: str | None = None) -> Golden:
    """Run the model on ``feeds`` and keep inputs, outputs (and every node's value)."""
    ex = model.executor(backends)
    keep = [o for n in model.graph.nodes for o in n.outputs if o not in model.graph.outputs] if intermediates else []
    res = ex.run(complete_feeds(model, feeds), keep=keep)
    outputs = {k: res[k] for k in model.graph.outputs if k in res}
    nodes = {k: res[k] for k in keep if k in res}
    names = [b if isinstance(b, str) else b.name for b in backends]
    prov = {"reference": f"minitx {__version__}", "backend": ",".join(names),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if note:
        prov["note"] = note
    return Golden({"arch": model.config["arch"], "config_hash": config_hash(model.config)}, prov,
                  dict(feeds), outputs, nodes)


def save(g: Golden, path: str | os.PathLike) -> None:
    arrays: dict[str, np.ndarray] = {
        "__golden__": np.frombuffer(json.dumps(g.header(), sort_keys=True).encode(), np.uint8)}
    for prefix, group in (("in.", g.inputs), ("out.", g.outputs), ("node.", g.nodes)):
        for k, a in group.items():
            arrays[prefix + k] = np.asarray(a)
    write_npz_atomic(path, arrays)


def load(path: str | os.PathLike) -> Golden:
    """Read a golden file, checking its header and every array's kind before any model runs it."""
    r = NpzReader(path, "golden file")
    try:
        if "__golden__" not in r:
            raise MinitxError(f"{r.path}: not a golden file (no '__golden__' key)")
        h = r.json("__golden__")
        if not isinstance(h, dict) or not isinstance(h.get("model"), dict):
            raise MinitxError(f"{r.path}: key '__golden__' is malformed")
        fmt = h.get("format", 0)
        if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < 1:
            raise MinitxError(f"{r.path}: key '__golden__': format must be a positive integer, got {fmt!r:.40}")
        if fmt > GOLDEN_FORMAT:
            raise MinitxError(f"{r.path}: golden format {fmt} is newer than this minitx supports")
        for k in ("arch", "config_hash"):
            v = h["model"].get(k)
            if not (isinstance(v, str) and len(v) <= 100):
                raise MinitxError(f"{r.path}: key '__golden__': model.{k} must be a short string")
        prov = h.get("provenance", {})
        if not isinstance(prov, dict):
            raise MinitxError(f"{r.path}: key '__golden__': provenance must be a JSON object")
        groups: list[dict[str, np.ndarray]] = [{}, {}, {}]
        for key, prefix, group in (("inputs", "in.", groups[0]), ("outputs", "out.", groups[1]),
                                   ("nodes", "node.", groups[2])):
            names = h.get(key, [])
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise MinitxError(f"{r.path}: key '__golden__': {key} must be a list of names")
            for name in names:
                group[name] = _checked(r, prefix + name, is_input=prefix == "in.")
        if not groups[1]:
            raise MinitxError(f"{r.path}: golden file holds no outputs")
        return Golden(h["model"], prov, *groups)
    finally:
        r.close()


def _checked(r: NpzReader, key: str, is_input: bool) -> np.ndarray:
    """A recorded array, refused unless it is what a graph takes or gives: token-like inputs are
    integer (B, T) arrays (float ids would be truncated silently), every value is real-valued."""
    shape, dtype = r.header(key)
    where = f"{r.path}: key {key!r}"
    if dtype.kind not in "biuf":
        raise MinitxError(f"{where} has dtype {dtype}; golden values must be real numbers")
    name = key.split(".", 1)[1]
    if is_input and not name.startswith("past."):
        if dtype.kind not in "iu":
            raise MinitxError(f"{where} has dtype {dtype}; {name} must be integers")
        if len(shape) != 2:
            raise MinitxError(f"{where} has shape {shape}; {name} must be 2-D (batch, tokens)")
    return r.array(key)


# ----------------------------------------------------------------------------------- verify
@dataclass
class Row:
    name: str
    kind: str                      # "output" or "node"
    cmp: metrics.Comparison | None  # None: the value no longer exists in this (rewritten) graph

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "kind": self.kind}
        if self.cmp is None:
            d["status"] = "SKIP"
        else:
            d.update(self.cmp.as_dict())
            d["status"] = "PASS" if self.cmp.passed else "FAIL"
        return d


def check_matches(model: Model, g: Golden, path: str = "golden file") -> None:
    """Refuse a golden file recorded for a different model (arch, config, input/output names, shapes)."""
    arch = model.config["arch"]
    if g.model.get("arch") != arch:
        raise MinitxError(f"{path}: recorded for a {g.model.get('arch')} model, but this model is {arch}")
    h = config_hash(model.config)
    if g.model.get("config_hash") != h:
        raise MinitxError(f"{path}: recorded for a model with config hash {g.model.get('config_hash')}, "
                          f"this model's is {h} (a different model or configuration)")
    graph_inputs = {v.name for v in model.graph.inputs}
    for k in g.inputs:
        if k not in graph_inputs:
            raise MinitxError(f"{path}: input {k!r} is not an input of this model")
    if "input_ids" not in g.inputs:
        raise MinitxError(f"{path}: golden file has no 'input_ids'")
    ids = g.inputs["input_ids"]
    if ids.size and (ids.min() < 0 or ids.max() >= model.vocab_size):
        raise MinitxError(f"{path}: input_ids hold id {int(ids.max())} outside this model's vocabulary "
                          f"({model.vocab_size})")
    for k in g.outputs:
        if k not in model.graph.outputs:
            raise MinitxError(f"{path}: output {k!r} is not an output of this model "
                              f"(outputs: {', '.join(model.graph.outputs)})")


def _valid_rows(a: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Keep only real-token positions of a (B, T, …) value (padding positions are meaningless)."""
    if mask is not None and a.ndim >= 2 and a.shape[:2] == mask.shape:
        return a[mask.astype(bool)]
    return a


def verify(model: Model, g: Golden, backends: Sequence[str | Backend] = ("numpy",), strict: bool = False,
           atol: float | None = None, rtol: float | None = None, path: str = "golden file") -> list[Row]:
    """Recompute the golden file's outputs (and nodes) and compare each with its reference."""
    check_matches(model, g, path)
    feeds = complete_feeds(model, g.inputs)
    produced = {o for n in model.graph.nodes for o in n.outputs}
    keep = [k for k in g.nodes if k in produced and k not in model.graph.outputs]
    res = model.executor(backends, strict).run(feeds, outputs=list(g.outputs), keep=keep)
    mask = g.inputs.get("attention_mask")
    rows = []
    for kind, group in (("output", g.outputs), ("node", g.nodes)):
        for name, ref in group.items():
            if name not in res:
                rows.append(Row(name, kind, None))
                continue
            out = res[name]
            if out.shape != ref.shape:
                raise MinitxError(f"{path}: {kind} {name!r} has shape {tuple(ref.shape)} in the golden file, "
                                  f"but the model computes {tuple(out.shape)}")
            r, o = _valid_rows(ref, mask), _valid_rows(out, mask)
            a, t = metrics.default_tolerance(ref.dtype)
            rows.append(Row(name, kind, metrics.compare(r, o, a if atol is None else atol, t if rtol is None else rtol,
                                                        logits=name == "logits")))
    return rows


def passed(rows: Sequence[Row]) -> bool:
    return all(r.cmp is None or r.cmp.passed for r in rows)


def format_table(rows: Sequence[Row]) -> str:
    """A fixed-width table: one line per compared value."""
    w = max([len(r.name) for r in rows] + [4])

    def f(x: float | None, fmt: str) -> str:
        return format(x, fmt) if x is not None else format("-", ">" + fmt.split(".")[0])

    lines = [f"{'name':<{w}}  {'kind':<6} {'max abs':>9} {'max rel':>9} {'cosine':>10} {'top-1':>6} "
             f"{'atol':>7} {'rtol':>7} {'budget':>7}  result"]
    for r in rows:
        c = r.cmp
        if c is None:
            lines.append(f"{r.name:<{w}}  {r.kind:<6} {'(not in this graph)':>57}  SKIP")
            continue
        lines.append(f"{r.name:<{w}}  {r.kind:<6} {c.max_abs:9.2e} {c.max_rel:9.2e} {f(c.cosine, '10.7f')} "
                     f"{f(c.top1, '6.3f')} {c.atol:7.0e} {c.rtol:7.0e} {c.budget_used:7.1%}  "
                     f"{'PASS' if c.passed else 'FAIL'}")
    return "\n".join(lines)
