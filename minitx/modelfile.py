"""The model file: one ``.npz`` holding weights under stable names plus metadata.

Keys:
  ``__format_version__``   int64 scalar; files from a newer minitx are refused, not misread
  ``__config__``           UTF-8 JSON bytes (uint8): the model config
  ``__tokenizer__``        UTF-8 bytes of a tokenizer.json (optional)
  ``__graph__``            UTF-8 JSON of the IR graph, present only when it differs from the one the
                           config builds (a rewritten, optimized model)
  ``__meta__``             UTF-8 JSON: provenance, applied rewrites and their validation report
  every other key          a parameter, named as in the graph (``layers.0.attn.qkv.weight``)

Loading never unpickles and checks everything before anything runs; every problem is a one-line
:class:`MinitxError` naming the file and the key; config sizes have hard limits and every npy
header is checked before its data is read (see :class:`NpzReader`). Saving goes through
:mod:`minitx.outputs`: atomic, symlinks written through, special files refused.
"""
from __future__ import annotations

import inspect
import json
import os
import zipfile
import zlib
from typing import Any

import numpy as np

from . import models
from .errors import MinitxError, regular_file
from . import ops
from .ir import Graph, symbols
from .model import Model
from .outputs import atomic_write, write_npz_atomic  # noqa: F401  (re-exported for train.py and bench.py)

FORMAT_VERSION = 1
META_KEYS = ("__format_version__", "__config__", "__tokenizer__", "__graph__", "__meta__")


def _text(s: str) -> np.ndarray:
    return np.frombuffer(s.encode("utf-8"), dtype=np.uint8)


def save(model: Model, path: str | os.PathLike, *, graph_differs: bool | None = None) -> None:
    """Write ``model`` to ``path`` atomically."""
    arrays: dict[str, np.ndarray] = {
        "__format_version__": np.array(FORMAT_VERSION, dtype=np.int64),
        "__config__": _text(json.dumps(model.config, sort_keys=True)),
        "__meta__": _text(json.dumps(model.meta, sort_keys=True, default=str)),
    }
    if model.tokenizer_json is not None:
        arrays["__tokenizer__"] = _text(model.tokenizer_json)
    if graph_differs is None:
        graph_differs = model.graph.to_json() != models.build_graph(model.config).to_json()
    if graph_differs:
        arrays["__graph__"] = _text(model.graph.to_json())
    for k, a in model.params.items():
        if k.startswith("__"):
            raise MinitxError(f"parameter name {k!r} is reserved")
        arrays[k] = np.ascontiguousarray(a)
    write_npz_atomic(path, arrays)


MAX_MEMBERS = 1 << 16          # members of one archive (a model has a few per layer)
MAX_TEXT_BYTES = 1 << 28       # a text member (config, tokenizer, graph, meta): 256 MiB


class NpzReader:
    """Reads members of an npz one by one, turning every failure into an error naming file and key.

    Why not ``np.load``: it decompresses a member before anything can look at it, so a small file
    whose member declares a gigabyte (a zip bomb) costs that gigabyte first. Here each member's
    npy header (shape, dtype) is read on its own — a few hundred bytes — and checked against what
    the caller expects and against this machine's memory before its data is read; the zip's own
    size record must agree with the header, and zipfile never inflates beyond that record.
    """

    def __init__(self, path: str | os.PathLike, what: str = "model file") -> None:
        self.path = os.fspath(path)
        self.what = what
        regular_file(self.path, what)
        try:
            self.z = zipfile.ZipFile(self.path)
            infos = self.z.infolist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError, NotImplementedError) as e:
            if _is_npy(self.path):
                raise MinitxError(f"{self.path}: not a {what} — a bare .npy array, not an .npz archive") from None
            raise MinitxError(f"{self.path}: not a valid {what} — not a readable .npz archive (truncated or "
                              f"corrupt?): {e}") from None
        if len(infos) > MAX_MEMBERS:
            self.z.close()
            raise MinitxError(f"{self.path}: the archive has {len(infos):,} members; a {what} has far fewer")
        self.infos = {(i.filename[:-4] if i.filename.endswith(".npy") else i.filename): i for i in infos}
        self.keys = list(self.infos)

    def __contains__(self, key: str) -> bool:
        return key in self.infos

    def header(self, key: str) -> tuple[tuple[int, ...], np.dtype]:
        """The member's shape and dtype from its npy header, without reading its data."""
        if key not in self.infos:
            shown = repr(key) if len(key) <= 80 else repr(key[:77] + "...")
            raise MinitxError(f"{self.path}: missing key {shown}")
        info = self.infos[key]
        where = f"{self.path}: key {key!r}"
        try:
            with self.z.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    raise MinitxError(f"{where} is an npy array of unsupported version {version}")
                offset = f.tell()
        except MinitxError:
            raise
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError, NotImplementedError, RuntimeError) as e:
            raise MinitxError(f"{where} is unreadable (truncated or corrupt file?): {e}") from None
        except Exception as e:  # numpy parses the header dict with Python's tokenizer: any error type
            raise MinitxError(f"{where} is not an npy array ({str(e).splitlines()[0] if str(e) else e!r})") from None
        if dtype.hasobject:
            raise MinitxError(f"{where} holds Python objects; refusing to unpickle")
        nbytes = _nbytes(shape, dtype)
        if offset + nbytes != info.file_size:
            raise MinitxError(f"{where}: its header declares {nbytes:,} bytes of data but the archive records "
                              f"{max(info.file_size - offset, 0):,} (corrupt file?)")
        return tuple(shape), dtype

    def array(self, key: str, shape: tuple[int, ...] | None = None, dtype: Any = None,
              max_bytes: int | None = None) -> np.ndarray:
        """The member's array, once its header matches ``shape``/``dtype`` (when given) and its size
        fits ``max_bytes`` (default: this machine's memory)."""
        got_shape, got_dtype = self.header(key)
        where = f"{self.path}: key {key!r}"
        if shape is not None and got_shape != tuple(shape):
            raise MinitxError(f"{where} has shape {got_shape}, but the config expects {tuple(shape)}")
        if dtype is not None and got_dtype != np.dtype(dtype):
            raise MinitxError(f"{where} has dtype {got_dtype}, expected {np.dtype(dtype)}")
        nbytes = _nbytes(got_shape, got_dtype)
        limit = max_bytes if max_bytes is not None else models.physical_memory()
        if limit and nbytes > limit:
            raise MinitxError(f"{where} declares {_size(nbytes)} of data ({got_dtype} {got_shape}), more than "
                              f"{'this machine has' if max_bytes is None else 'it can hold'} ({_size(limit)})")
        try:
            with self.z.open(self.infos[key]) as f:
                return np.lib.format.read_array(f, allow_pickle=False)
        except (ValueError, zipfile.BadZipFile, zlib.error, OSError, EOFError, NotImplementedError) as e:
            raise MinitxError(f"{where} is unreadable (truncated or corrupt file?): {e}") from None

    def text(self, key: str) -> str:
        a = self.array(key, max_bytes=MAX_TEXT_BYTES)
        if a.dtype != np.uint8 or a.ndim != 1:
            raise MinitxError(f"{self.path}: key {key!r} must be UTF-8 bytes (uint8, 1-D), got {a.dtype} {a.shape}")
        try:
            return a.tobytes().decode("utf-8")
        except UnicodeDecodeError:
            raise MinitxError(f"{self.path}: key {key!r} is not valid UTF-8") from None

    def json(self, key: str) -> Any:
        return parse_json(self.text(key), f"{self.path}: key {key!r}")

    def close(self) -> None:
        self.z.close()


def parse_json(text: str, where: str) -> Any:
    """``json.loads`` whose every failure — including nesting deep enough to exhaust Python's
    recursion — is one line naming ``where``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise MinitxError(f"{where} is not valid JSON: {e}") from None
    except RecursionError:
        raise MinitxError(f"{where} is JSON nested too deeply") from None


def _nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    n = dtype.itemsize
    for d in shape:
        n *= int(d)
    return n


def _size(n: int) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} bytes"


def _is_npy(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(6) == b"\x93NUMPY"
    except OSError:
        return False


def load(path: str | os.PathLike) -> Model:
    """Read and validate a model file (see the module docstring for what is checked).

    Order matters for hostile files: the config is checked against hard limits, then every
    parameter's npy header against the graph the config (or ``__graph__``) implies, and only then
    is any weight data read.
    """
    r = NpzReader(path)
    try:
        version = r.array("__format_version__", max_bytes=64)
        if version.shape != () or not np.issubdtype(version.dtype, np.integer):
            raise MinitxError(f"{r.path}: key '__format_version__' must be an integer scalar")
        if int(version) > FORMAT_VERSION:
            raise MinitxError(f"{r.path}: format version {int(version)} is newer than this minitx supports "
                              f"({FORMAT_VERSION}); upgrade minitx")
        if int(version) < 1:
            raise MinitxError(f"{r.path}: format version {int(version)} is not a valid version (1 … {FORMAT_VERSION})")
        config = r.json("__config__")
        if not isinstance(config, dict):
            raise MinitxError(f"{r.path}: key '__config__' must be a JSON object")
        graph_text = r.text("__graph__") if "__graph__" in r else None
        try:
            config = models.complete_config(config)
            if graph_text is not None:
                graph = _stored_graph(graph_text)
            else:
                graph = models.build_graph(config)
        except MinitxError as e:
            raise MinitxError(f"{r.path}: {e}") from None
        meta = r.json("__meta__") if "__meta__" in r else {}
        if not isinstance(meta, dict):
            raise MinitxError(f"{r.path}: key '__meta__' must be a JSON object, not {type(meta).__name__}")
        # The tokenizer stays text: it is parsed only if a command needs it (Model.tokenizer).
        tok = r.text("__tokenizer__") if "__tokenizer__" in r else None
        extra = [k for k in r.keys if k not in graph.params and k not in META_KEYS]
        if extra:
            raise MinitxError(f"{r.path}: unexpected key {extra[0]!r}"
                              + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                              + f" — not a parameter of this {config['arch']} model")
        total = 0
        for name, v in graph.params.items():   # every header first: no data is read from a bad file
            if name not in r:
                raise MinitxError(f"{r.path}: missing key {name!r} (a parameter of shape {tuple(v.shape)})")
            shape, dtype = r.header(name)
            if shape != tuple(v.shape):
                raise MinitxError(f"{r.path}: key {name!r} has shape {shape}, but the config "
                                  f"expects {tuple(v.shape)}")
            if str(dtype) != v.dtype:
                raise MinitxError(f"{r.path}: key {name!r} has dtype {dtype}, expected {v.dtype}")
            total += _nbytes(shape, dtype)
        have = models.physical_memory()
        if have and total > have:
            raise MinitxError(f"{r.path}: the parameters declare {_size(total)}, more than this machine's "
                              f"{_size(have)} of memory")
        params: dict[str, np.ndarray] = {}
        for name, v in graph.params.items():
            a = r.array(name, tuple(v.shape), v.dtype)
            if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
                bad = "NaN" if np.isnan(a).any() else "Inf"
                raise MinitxError(f"{r.path}: key {name!r} contains {bad}")
            params[name] = a
    finally:
        r.close()
    return Model(config, params, graph, tok, meta)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


# What a stored graph's node attributes may hold (ops take them as keyword arguments, and most
# are used only when the graph runs, where a string ``eps`` would surface as a TypeError).
_ATTR_RULES: dict[str, tuple[str, Any]] = {
    **{k: ("an integer", _is_int) for k in ("axis", "seed", "step", "ignore_index")},
    **{k: ("a non-negative integer", lambda v: _is_int(v) and v >= 0)
       for k in ("bits", "block", "group", "dense_below", "n_global", "stride", "topk", "window")},
    **{k: ("a positive integer", lambda v: _is_int(v) and v > 0)
       for k in ("dim", "in_features", "m", "n", "max_len", "n_heads", "n_kv_heads", "n_landmarks")},
    "n_maps": ("a positive integer or null", lambda v: v is None or (_is_int(v) and v > 0)),
    **{k: ("true or false", lambda v: isinstance(v, bool)) for k in ("causal", "transpose_b", "transposed", "training")},
    **{k: ("a finite number", _is_num) for k in ("eps", "theta", "threshold", "temperature", "p", "factor")},
    "scale": ("a finite number or null", lambda v: v is None or _is_num(v)),
    "approximate": ("'none' or 'tanh'", lambda v: v in ("none", "tanh")),
    **{k: ("a string", lambda v: isinstance(v, str)) for k in ("pattern", "dtype")},
    **{k: ("a list of non-negative integers", lambda v: isinstance(v, list) and all(_is_int(x) and x >= 0 for x in v))
       for k in ("shape", "sizes")},
}


def _check_attrs(n: Any, known: dict[str, Any]) -> None:
    for k, v in n.attrs.items():
        if k not in known:
            raise MinitxError(f"key '__graph__': node {n.name} ({n.op}) has unknown attribute {k!r} "
                              f"(known: {', '.join(sorted(known)) or 'none'})")
        what, ok = _ATTR_RULES.get(k, (None, None))
        if ok is None:   # an attribute without a rule must at least have its default's type
            d = known[k]
            if d is None or d is inspect.Parameter.empty or type(v) is type(d):
                continue
            what, ok = f"of type {type(d).__name__}", lambda x: False
        if not ok(v):
            shown = repr(v) if len(repr(v)) <= 40 else type(v).__name__
            raise MinitxError(f"key '__graph__': node {n.name} ({n.op}) attribute {k} must be {what}, got {shown}")


def _stored_graph(text: str) -> Graph:
    """A rewritten model's graph, checked as far as it can be without running it: structure, value
    declarations, every node's attributes against its op, and shape inference."""
    d = parse_json(text, "key '__graph__'")
    try:
        graph = Graph.from_json(json.dumps(d))
        values = list(graph.inputs) + list(graph.params.values())
        for v in values:
            if not isinstance(v.name, str) or not isinstance(v.dtype, str):
                raise TypeError(f"value {v.name!r}: name and dtype must be strings")
            np.dtype(v.dtype)
            for dim in v.shape:
                if not (isinstance(dim, str) or (isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0)):
                    raise TypeError(f"value {v.name!r} has dimension {dim!r}")
        for n in graph.nodes:
            if not all(isinstance(x, str) for x in (n.name, n.op, *n.inputs, *n.outputs)):
                raise TypeError(f"node {n.name!r}: names must be strings")
            if not all(isinstance(k, str) for k in (*n.attrs, *n.tags)):
                raise TypeError(f"node {n.name!r}: attribute names must be strings")
        if not all(isinstance(o, str) for o in graph.outputs) or not isinstance(graph.meta, dict):
            raise TypeError("outputs must be names and meta an object")
        graph.validate()
    except MinitxError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as e:
        raise MinitxError(f"key '__graph__' is malformed: {e}") from None
    for n in graph.nodes:
        spec = ops.get(n.op)
        _check_attrs(n, {p.name: p.default for p in inspect.signature(spec.forward).parameters.values()
                         if p.kind == p.KEYWORD_ONLY})
    try:
        graph.infer({s: 1 for s in symbols(graph)})
    except MinitxError as e:
        raise MinitxError(f"key '__graph__': {e}") from None
    except Exception as e:  # an op's shape rule fed attributes of the wrong type
        raise MinitxError(f"key '__graph__': shape inference fails ({type(e).__name__}: {e})") from None
    return graph
