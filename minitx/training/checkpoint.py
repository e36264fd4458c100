"""The training checkpoint: one ``.npz`` that resumes a run bit for bit, and nothing else reads.

Layout (written atomically, read with ``allow_pickle=False``): ``__train__`` (JSON: format, kind,
step, settings, RNG state, history, AdamW's step count, ``run`` and, for mixed precision, the
loss scaler), ``__config__``, ``__tokenizer__``, ``__graph__`` (only for a rewritten model:
a pruned or layer-dropped student), ``param.NAME``, ``opt.m.NAME``/``opt.v.NAME``;
trainables outside the model (distillation's feature projections) as ``aux.NAME`` with
``aux_opt.m/v.NAME``. ``kind`` names the command that wrote it (train, distill, qat) and ``run``
what identifies the run beyond its settings (the text's fingerprint, a teacher's, the loss
weights…), which a resume must repeat (:func:`check_run`).

Every field is checked on load: a checkpoint is user input, and a bad one is a one-line
:class:`MinitxError`, never a traceback or a silently different run.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from typing import Any, Mapping

import numpy as np

from .. import models
from ..errors import MinitxError
from ..outputs import check_output
from ..model import Model
from ..modelfile import NpzReader, write_npz_atomic
from ..precision import LossScaler
from .settings import TrainSettings, TrainState

FORMAT = "minitx-checkpoint/1"


def save(path: str | os.PathLike, st: TrainState) -> None:
    meta = {"format": FORMAT, "kind": st.kind, "step": st.step, "settings": asdict(st.settings),
            "rng": st.rng.bit_generator.state, "history": st.history, "opt_t": st.opt.t, "run": st.run}
    if st.scaler is not None:
        meta["scaler"] = st.scaler.state()
    if st.aux:
        meta["aux_opt_t"] = st.aux_opt.t
    arrays: dict[str, np.ndarray] = {
        "__train__": _text(json.dumps(meta)),
        "__config__": _text(json.dumps(st.model.config, sort_keys=True)),
    }
    if st.model.tokenizer_json is not None:
        arrays["__tokenizer__"] = _text(st.model.tokenizer_json)
    if st.kind != "qat" and st.model.graph.to_json() != models.build_graph(st.model.config).to_json():
        # A student that is a rewritten model (pruned, layer-dropped) trains on its own graph
        # (QAT's fake-quant graph is not saved: resume rebuilds it over the float weights).
        arrays["__graph__"] = _text(st.model.graph.to_json())
    arrays.update({f"param.{k}": a for k, a in st.model.params.items()})
    arrays.update(st.opt.state())
    if st.aux:
        arrays.update({f"aux.{k}": a for k, a in st.aux.items()})
        arrays.update({f"aux_{k}": a for k, a in st.aux_opt.state().items()})
    write_npz_atomic(path, arrays)


def load(path: str | os.PathLike, kind: str = "train") -> TrainState:
    """The state saved by :func:`save`; ``kind`` is the command resuming it (a distillation
    checkpoint holds a student and projections that ``minitx train`` cannot continue)."""
    r = NpzReader(path, what="checkpoint")
    where = r.path
    try:
        if "__train__" not in r:
            raise MinitxError(f"{where}: not a minitx training checkpoint (no '__train__' key; "
                              "a model file holds no optimizer state to resume from)")
        meta = _json(r, "__train__")
        if not isinstance(meta, dict):
            raise MinitxError(f"{where}: key '__train__' must be a JSON object, got {type(meta).__name__}")
        if meta.get("format") != FORMAT:
            raise MinitxError(f"{where}: unsupported checkpoint format {meta.get('format')!r}")
        made_by = meta.get("kind", "train")
        if made_by != kind:
            raise MinitxError(f"{where}: a `minitx {made_by}` checkpoint; resume it with `minitx {made_by} --resume`, "
                              f"not `minitx {kind}`")
        for key in ("settings", "step", "rng", "opt_t"):
            if key not in meta:
                raise MinitxError(f"{where}: '__train__' has no {key!r}")
        try:
            settings = TrainSettings.from_dict(meta["settings"])
        except (MinitxError, TypeError) as e:
            raise MinitxError(f"{where}: '__train__' settings are malformed ({e})") from None
        step, opt_t = _count(where, meta, "step"), _count(where, meta, "opt_t")
        if step > settings.steps:
            raise MinitxError(f"{where}: step {step} is beyond the run's {settings.steps} steps")
        history = meta.get("history", [])
        run = meta.get("run") or {}
        if not isinstance(history, list) or not all(isinstance(h, dict) for h in history) or not isinstance(run, dict):
            raise MinitxError(f"{where}: '__train__' history or run is malformed")
        rng = np.random.Generator(np.random.PCG64())
        try:
            if not isinstance(meta["rng"], dict) or meta["rng"].get("bit_generator") != "PCG64":
                raise ValueError("not a PCG64 state")
            rng.bit_generator.state = meta["rng"]
        except (TypeError, ValueError, KeyError, OverflowError) as e:
            raise MinitxError(f"{where}: the random generator's state in '__train__' is malformed ({e})") from None
        try:
            scaler = LossScaler.from_state(meta["scaler"]) if meta.get("scaler") else None
        except (KeyError, TypeError, ValueError) as e:
            raise MinitxError(f"{where}: the loss scaler's state in '__train__' is malformed ({e})") from None
        try:
            config = models.complete_config(_json(r, "__config__"))
        except MinitxError as e:
            raise MinitxError(f"{where}: {e}") from None
        tok = r.text("__tokenizer__") if "__tokenizer__" in r else None
        if "__graph__" in r:
            from ..modelfile import _stored_graph

            try:
                graph = _stored_graph(r.text("__graph__"))
            except MinitxError as e:
                raise MinitxError(f"{where}: {e}") from None
        else:
            graph = models.build_graph(config)
        params = {name: _array(r, f"param.{name}", tuple(v.shape), v.dtype) for name, v in graph.params.items()}
        opt = settings.optimizer(params)
        opt.load_state(_moments(r, "opt.", params), opt_t)
        aux = {k[4:]: np.array(r.array(k)) for k in r.keys if k.startswith("aux.")}
        for k, a in aux.items():
            _check_float32(where, f"aux.{k}", a)
        aux_opt = None
        if aux:
            aux_opt = settings.optimizer(aux)
            aux_opt.load_state(_moments(r, "aux_opt.", aux), _count(where, meta, "aux_opt_t"))
    finally:
        r.close()
    model = Model(config, params, graph, tok, {})
    return TrainState(model, opt, rng, settings, step, list(history), scaler, made_by, dict(run), aux, aux_opt,
                      str(path))


def _json(r: NpzReader, key: str) -> Any:
    try:
        return r.json(key)
    except RecursionError:
        raise MinitxError(f"{r.path}: key {key!r} is nested too deeply") from None


def _count(where: str, meta: Mapping[str, Any], key: str) -> int:
    v = meta.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise MinitxError(f"{where}: '__train__' {key} must be a non-negative integer, got {v!r}")
    return v


def _check_float32(where: str, key: str, a: np.ndarray) -> None:
    if a.dtype != np.float32:
        raise MinitxError(f"{where}: key {key!r} is {a.dtype}; training keeps float32 weights")


def _array(r: NpzReader, key: str, shape: tuple[int, ...], dtype: str = "float32") -> np.ndarray:
    a = r.array(key)
    if tuple(a.shape) != tuple(shape):
        raise MinitxError(f"{r.path}: key {key!r} has shape {a.shape}, expected {tuple(shape)}")
    if a.dtype != np.dtype(dtype):
        raise MinitxError(f"{r.path}: key {key!r} is {a.dtype}, expected {dtype} (training keeps float32 weights)")
    return np.array(a)


def _moments(r: NpzReader, prefix: str, params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """AdamW's ``m``/``v`` arrays for ``params`` under ``prefix``, checked against their shapes."""
    return {f"opt.{which}.{name}": _array(r, f"{prefix}{which}.{name}", p.shape, str(p.dtype))
            for name, p in params.items() for which in ("m", "v")}


def due(s: TrainSettings, step: int) -> bool:
    """Whether a checkpoint is written after ``step`` (every ``checkpoint_every`` steps and at the end)."""
    return bool(s.checkpoint_every and step % s.checkpoint_every == 0) or step == s.steps


def default_path(output: str) -> str:
    """Where a command's checkpoint goes unless told: beside its output, ``NAME.ckpt.npz``."""
    return (output[:-4] if output.endswith(".npz") else output) + ".ckpt.npz"


def check_paths(output: str, checkpoint: str, inputs: Mapping[str, str | None] = ()) -> None:
    """Refuse, before any work, an output that is the checkpoint or an input (compared by inode: a
    link or another spelling counts); :func:`minitx.outputs.check_output` then checks that both can
    be written (folder, special files, symlinks written through)."""
    if _same(output, checkpoint):
        raise MinitxError(f"-o {output} and --checkpoint {checkpoint} are the same file: the model would "
                          "overwrite the checkpoint a resume needs")
    for flag, path in dict(inputs).items():
        if path and _same(output, path):
            raise MinitxError(f"-o {output} is the same file as {flag} {path}: writing it would destroy an input")
    resume = dict(inputs).get("--resume")
    check_output(output, inputs.values())
    check_output(checkpoint, [p for f, p in dict(inputs).items() if f != "--resume"], in_place=[resume])


def _same(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:   # one does not exist yet: the same path spelled alike
        return os.path.realpath(a) == os.path.realpath(b)


def fingerprint(arrays: Mapping[str, Any]) -> str:
    """SHA-256 of named arrays and JSON values (name, dtype, shape, bytes): two runs on the same
    text, or from the same model, fingerprint alike however the files are named."""
    h = hashlib.sha256()
    for k in sorted(arrays):
        v = arrays[k]
        if isinstance(v, np.ndarray):
            a = np.ascontiguousarray(v)
            h.update(f"{k}:{a.dtype.str}:{a.shape};".encode())
            h.update(a.tobytes())
        else:
            h.update(f"{k}={json.dumps(v, sort_keys=True)};".encode())
    return h.hexdigest()


def data_identity(ids: np.ndarray) -> dict[str, Any]:
    """What a resume checks about the token stream: it must be the same text."""
    return {"what": f"{len(ids):,} tokens", "sha256": fingerprint({"ids": np.asarray(ids, np.int64)})}


def model_identity(model: Model, path: str | os.PathLike | None = None) -> dict[str, Any]:
    """What a resume checks about a model it reads (distillation's teacher, QAT's starting point):
    its config and weights, whatever file they come from."""
    what = os.path.basename(str(path)) if path else "the model"
    return {"what": what, "sha256": fingerprint({"__config__": model.config, **model.params})}


def check_run(st: TrainState, run: Mapping[str, Any]) -> None:
    """Record ``run`` (flag → value) on a fresh state; on a resumed one, require the same values.

    Values are JSON; a dict with ``sha256`` compares by that alone and shows its ``what``.
    A key the checkpoint does not have (an older one) is recorded, not compared."""
    for key, new in run.items():
        if key in st.run and _ident(st.run[key]) != _ident(new):
            where = st.source or "the resumed state"
            raise MinitxError(f"{where}: the checkpoint was made with {key} {_show(st.run[key])}, not {_show(new)} "
                              "(a resumed run must repeat its settings)")
    st.run.update(run)


def _ident(v: Any) -> Any:
    return v["sha256"] if isinstance(v, dict) and "sha256" in v else v


def _show(v: Any) -> str:
    if isinstance(v, dict) and "sha256" in v:
        return f"{v.get('what', '')} (sha256 {str(v['sha256'])[:12]})".strip()
    return v if isinstance(v, str) else json.dumps(v)


def _text(s: str) -> np.ndarray:
    return np.frombuffer(s.encode("utf-8"), dtype=np.uint8)
