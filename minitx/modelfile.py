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
:class:`MinitxError` naming the file and the key. Saving is atomic: a temporary file in the same
folder, renamed over the target only once fully written.
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile
import zlib
from contextlib import contextmanager
from typing import Any, BinaryIO, Iterator, Mapping

import numpy as np

from . import models
from .errors import MinitxError
from .ir import Graph
from .model import Model

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


def write_npz_atomic(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
    """np.savez into a temporary file beside ``path``, then rename: no half-written outputs."""
    with atomic_write(path) as f:
        np.savez(f, **arrays)


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file that appears at ``path`` only once the block completes without error.

    It is written beside the target (same filesystem, so the rename is atomic), synced, given the
    usual umask permissions (mkstemp makes 0600), then renamed; on any failure it is removed.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise MinitxError(f"{path}: folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class NpzReader:
    """Reads members of an npz one by one, turning every failure into an error naming file and key."""

    def __init__(self, path: str | os.PathLike, what: str = "model file") -> None:
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise MinitxError(f"{self.path}: no such file")
        if os.path.isdir(self.path):
            raise MinitxError(f"{self.path}: is a folder, not a {what} (.npz)")
        try:
            self.z = np.load(self.path, allow_pickle=False)
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
            raise MinitxError(f"{self.path}: not a valid {what} — not a readable .npz archive (truncated or "
                              f"corrupt?): {e}") from None
        if not isinstance(self.z, np.lib.npyio.NpzFile):
            raise MinitxError(f"{self.path}: not a {what} — a bare .npy array, not an .npz archive")
        self.keys = list(self.z.files)

    def __contains__(self, key: str) -> bool:
        return key in self.keys

    def array(self, key: str) -> np.ndarray:
        if key not in self.keys:
            raise MinitxError(f"{self.path}: missing key {key!r}")
        try:
            return self.z[key]
        except ValueError as e:
            if "allow_pickle" in str(e):
                raise MinitxError(f"{self.path}: key {key!r} holds Python objects; refusing to unpickle") from None
            raise MinitxError(f"{self.path}: key {key!r} is unreadable: {e}") from None
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError, KeyError) as e:
            raise MinitxError(f"{self.path}: key {key!r} is unreadable (truncated or corrupt file?): {e}") from None

    def text(self, key: str) -> str:
        a = self.array(key)
        if a.dtype != np.uint8 or a.ndim != 1:
            raise MinitxError(f"{self.path}: key {key!r} must be UTF-8 bytes (uint8, 1-D), got {a.dtype} {a.shape}")
        try:
            return a.tobytes().decode("utf-8")
        except UnicodeDecodeError:
            raise MinitxError(f"{self.path}: key {key!r} is not valid UTF-8") from None

    def json(self, key: str) -> Any:
        try:
            return json.loads(self.text(key))
        except json.JSONDecodeError as e:
            raise MinitxError(f"{self.path}: key {key!r} is not valid JSON: {e}") from None

    def close(self) -> None:
        self.z.close()


def load(path: str | os.PathLike) -> Model:
    """Read and validate a model file (see the module docstring for what is checked)."""
    r = NpzReader(path)
    try:
        version = r.array("__format_version__")
        if version.shape != () or not np.issubdtype(version.dtype, np.integer):
            raise MinitxError(f"{r.path}: key '__format_version__' must be an integer scalar")
        if int(version) > FORMAT_VERSION:
            raise MinitxError(f"{r.path}: format version {int(version)} is newer than this minitx supports "
                              f"({FORMAT_VERSION}); upgrade minitx")
        config = r.json("__config__")
        if not isinstance(config, dict):
            raise MinitxError(f"{r.path}: key '__config__' must be a JSON object")
        try:
            config = models.complete_config(config)
            if "__graph__" in r:
                graph = Graph.from_json(r.text("__graph__"))
                graph.validate()
            else:
                graph = models.build_graph(config)
        except MinitxError as e:
            raise MinitxError(f"{r.path}: {e}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise MinitxError(f"{r.path}: key '__graph__' is malformed: {e}") from None
        meta = r.json("__meta__") if "__meta__" in r else {}
        tok = r.text("__tokenizer__") if "__tokenizer__" in r else None
        params: dict[str, np.ndarray] = {}
        extra = [k for k in r.keys if k not in graph.params and k not in META_KEYS]
        if extra:
            raise MinitxError(f"{r.path}: unexpected key {extra[0]!r}"
                              + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                              + f" — not a parameter of this {config['arch']} model")
        for name, v in graph.params.items():
            if name not in r:
                raise MinitxError(f"{r.path}: missing key {name!r} (a parameter of shape {tuple(v.shape)})")
            a = r.array(name)
            if tuple(a.shape) != tuple(v.shape):
                raise MinitxError(f"{r.path}: key {name!r} has shape {tuple(a.shape)}, but the config "
                                  f"expects {tuple(v.shape)}")
            if str(a.dtype) != v.dtype:
                raise MinitxError(f"{r.path}: key {name!r} has dtype {a.dtype}, expected {v.dtype}")
            if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
                bad = "NaN" if np.isnan(a).any() else "Inf"
                raise MinitxError(f"{r.path}: key {name!r} contains {bad}")
            params[name] = a
    finally:
        r.close()
    return Model(config, params, graph, tok, meta)
