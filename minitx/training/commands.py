"""What ``minitx train``, ``distill``, ``qat`` and ``eval`` do, as library functions.

The CLI parses flags into :class:`RunOptions` (the flags the three training commands share) and
each command's own arguments, calls one function here, and prints the report it returns. Here
live the decisions: config resolution, settings, resume rules, which files may be written.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Sequence

from .. import data, models, modelfile
from ..errors import MinitxError
from ..model import Model
from . import checkpoint as ckpt
from . import distill as dl
from . import qat as quant_aware
from .evaluation import compare_plugins, evaluate
from .loop import fit
from .progress import ProgressLine
from .settings import TrainSettings, TrainState, fresh_model, new_state

Warn = Callable[[str], None]


@dataclass
class RunOptions:
    """The flags every training command shares."""

    values: dict[str, Any]           # TrainSettings fields as the command line set them (defaults included)
    given: set[str] = field(default_factory=set)   # the fields the user gave explicitly
    output: str = ""
    checkpoint: str | None = None    # default: beside the output
    resume: str | None = None
    backends: tuple[str, ...] = ("numpy",)
    quiet: bool = False

    def settings(self) -> TrainSettings:
        names = {f.name for f in fields(TrainSettings)}
        kw = {k: v for k, v in self.values.items() if k in names}
        kw["plugins"] = tuple(kw.get("plugins", ()))
        s = TrainSettings(**kw)
        s.check()
        return s

    def checkpoint_path(self, inputs: dict[str, str | None]) -> str:
        """The checkpoint file, after checking the outputs can be written without destroying an input."""
        path = self.checkpoint or ckpt.default_path(self.output)
        ckpt.check_paths(self.output, path, {"--resume": self.resume, **inputs})
        return path

    def resumed(self, st: TrainState, changeable: Sequence[str] = ()) -> TrainState:
        """Apply the command line to a resumed run's settings: --steps and --checkpoint-every (and
        ``changeable``) take the new value; any other training flag given with a different value
        than the checkpoint's is an error — the resumed run keeps its settings."""
        free = {"steps", "checkpoint_every", *changeable}
        for f in fields(st.settings):
            if f.name not in self.given or f.name not in self.values:
                continue
            new, old = self.values[f.name], getattr(st.settings, f.name)
            if isinstance(new, (list, tuple)):
                new = tuple(new)
            if new == old or (f.name == "seq_len" and new == 0):
                continue
            if f.name not in free:
                flag, may = _flag(f.name), ", ".join(_flag(k) for k in sorted(free))
                raise MinitxError(f"{st.source}: the checkpoint was made with {flag} {_show(old)}, not {_show(new)} "
                                  f"(a resumed run keeps its settings; only {may} may change)")
            setattr(st.settings, f.name, new)
        st.settings.check()
        return st

    def reporter(self, total: int) -> tuple[ProgressLine | None, Callable[[str], None]]:
        bar = None if self.quiet else ProgressLine(total)
        return bar, (bar.message if bar else (lambda s: None))


_FLAGS = {"batch_size": "--batch", "seq_len": "--seq", "plugins": "--plugin"}


def _flag(name: str) -> str:
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def _show(v: Any) -> str:
    return ",".join(v) if isinstance(v, tuple) else str(v)


def _json_arg(src: str, what: str, inline: bool = False) -> Any:
    """A JSON value from a file (or, with ``inline``, from text starting with ``{``)."""
    try:
        if inline and src.strip().startswith("{"):
            return json.loads(src)
        with open(src, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise MinitxError(f"{what}: no such file" + (" (give a JSON file or inline JSON)" if inline else "")) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MinitxError(f"{what}: not valid JSON: {e}") from None
    except RecursionError:
        raise MinitxError(f"{what}: JSON nested too deeply") from None
    except OSError as e:
        raise MinitxError(f"{what}: cannot read: {e.strerror}") from None


def resolve_config(arch: str | None, preset: str, config_path: str | None) -> dict[str, Any]:
    """``train``'s starting config: the preset of ``arch``, overridden by a JSON config file."""
    if config_path:
        user = _json_arg(config_path, config_path)
        if not isinstance(user, dict):
            raise MinitxError(f"{config_path}: a config must be a JSON object")
        a = user.get("arch", arch)
        if a is None:
            raise MinitxError(f"{config_path}: no 'arch' field; give --arch gpt2|llama")
        if arch is not None and a != arch:
            raise MinitxError(f"{config_path}: arch {user['arch']!r} contradicts --arch {arch}")
        return {**models.preset(a, preset), **user, "arch": a}
    if arch is None:
        raise MinitxError("give --arch gpt2|llama (or --config cfg.json, or --resume ckpt.npz)")
    return models.preset(arch, preset)


def _check_early(opts: RunOptions, parallel: bool = False) -> None:
    """Refuse bad settings and plugins before any slow work (a tokenizer, a teacher).
    ``parallel``: the command trains data-parallel (only ``train`` so far)."""
    from ..distributed import data_parallel

    if opts.values.get("parallel") and not parallel:
        raise MinitxError("--parallel: data-parallel training is available for `minitx train` only, so far")
    if opts.resume is None:
        s = opts.settings()
        if parallel:
            data_parallel.reducer(opts.values.get("parallel"), s.batch_size, connect=False)
    plugins = opts.values.get("plugins") or ()
    if plugins:
        from .. import plugin

        plugin.plan(plugins)


# ----------------------------------------------------------------------------------- train
def _reducer(opts: RunOptions, st: TrainState):
    """This process's share of ``--parallel dp=N`` (one rank without it); only rank 0 reports."""
    from ..distributed import data_parallel

    red = data_parallel.reducer(opts.values.get("parallel"), st.settings.batch_size)
    opts.quiet = opts.quiet or not red.is_writer
    data_parallel.quiet_unless_writer(red)
    return red


def _trained(opts: RunOptions, checkpoint: str, st: TrainState, t0: float) -> dict[str, Any]:
    """What ``train`` reports: output, checkpoint, steps, time, size and the last held-out loss."""
    last = st.history[-1] if st.history else {}
    return {"output": opts.output, "checkpoint": checkpoint, "steps": st.step,
            "seconds": time.perf_counter() - t0, "params": st.model.n_params(),
            "val_loss": last.get("val_loss"), "val_perplexity": last.get("val_perplexity"), "history": st.history}


def train(opts: RunOptions, data_path: str, *, arch: str | None = None, preset: str = "tiny",
          config_path: str | None = None, tokenizer_path: str | None = None,
          vocab_size: int | None = None) -> dict[str, Any]:
    """``minitx train``: a new decoder (or a resumed run) trained on a text, saved to the output."""
    _check_early(opts, parallel=True)
    text = data.read_text(data_path)
    checkpoint = opts.checkpoint_path({"--data": data_path, "--config": config_path, "--tokenizer": tokenizer_path})
    t0 = time.perf_counter()
    if opts.resume:
        st = opts.resumed(ckpt.load(opts.resume), changeable=("precision", "plugins"))
        tok_json = st.model.tokenizer_json
        if tok_json is None:
            raise MinitxError(f"{opts.resume}: the checkpoint carries no tokenizer")
    else:
        config = resolve_config(arch, preset, config_path)
        if getattr(models.FAMILIES.get(config["arch"]), "ENCODER_DECODER", False):
            raise MinitxError(f"{config['arch']} is an encoder–decoder: train it on --pairs source<TAB>target lines")
        models.complete_config(dict(config))   # every field and size checked before a tokenizer is trained
        if tokenizer_path:
            tok_json = data.load_tokenizer_json(tokenizer_path)
        else:
            tok_json = data.train_tokenizer(text, vocab_size or int(config.get("vocab_size", 512)))
        from tokenizers import Tokenizer

        config["vocab_size"] = Tokenizer.from_str(tok_json).get_vocab_size()
        st = fresh_model(models.complete_config(config), tok_json, opts.settings())
    red = _reducer(opts, st)
    ids = data.encode(tok_json, text)
    red.agree(ckpt.data_identity(ids)["sha256"], "tokens of the text")
    m, s = st.model, st.settings
    bar, log = opts.reporter(s.steps)
    log(f"{m.config['arch']}: {m.n_params():,} parameters, vocab {m.vocab_size}, context {m.n_ctx}; "
        f"{len(ids):,} tokens of text; step {st.step} of {s.steps}; backend {', '.join(opts.backends)}"
        + (f"; {s.precision} compute, float32 weights" if s.precision != "float32" else "")
        + (f"; rewrites {', '.join(s.plugins)}" if s.plugins else ""))
    fit(st, ids, backends=opts.backends, checkpoint=checkpoint, log=log, progress=bar, reducer=red)
    m.meta = {"source": "minitx train", "data": os.path.basename(data_path), "steps": st.step,
              "settings": asdict(s), "history": st.history}
    if red.is_writer:
        modelfile.save(m, opts.output)
    return _trained(opts, checkpoint, st, t0)


def train_pairs(opts: RunOptions, pairs_path: str, *, arch: str | None = None, preset: str = "tiny",
                config_path: str | None = None, tokenizer_path: str | None = None) -> dict[str, Any]:
    """``minitx train --pairs``: an encoder–decoder on source<TAB>target lines, through the one
    loop (training/pairs.py), saved to the output.

    Each side is text for ``--tokenizer`` (or a resumed model's tokenizer), else token ids
    separated by spaces or commas (seq2seq.read_pairs): a BPE trained here would not know the
    config's pad / EOS / decoder-start ids, so none is trained."""
    from .. import seq2seq
    from . import pairs as pair_objective

    _check_early(opts, parallel=True)
    checkpoint = opts.checkpoint_path({"--pairs": pairs_path, "--config": config_path, "--tokenizer": tokenizer_path})
    t0 = time.perf_counter()
    if opts.resume:
        st = opts.resumed(ckpt.load(opts.resume), changeable=("precision", "plugins"))
    else:
        config = resolve_config(arch, preset, config_path)
        tok_json = data.load_tokenizer_json(tokenizer_path) if tokenizer_path else None
        if tok_json is not None:
            from tokenizers import Tokenizer

            config["vocab_size"] = Tokenizer.from_str(tok_json).get_vocab_size()
        st = fresh_model(models.complete_config(config), tok_json, opts.settings())
    red = _reducer(opts, st)
    m, s = st.model, st.settings
    pairs = seq2seq.read_pairs(pairs_path, m)
    red.agree(hashlib.sha256(json.dumps(pairs).encode()).hexdigest(), "pairs of the file")
    bar, log = opts.reporter(s.steps)
    log(f"{m.config['arch']}: {m.n_params():,} parameters, vocab {m.vocab_size}, context {m.n_ctx}; "
        f"{len(pairs):,} pairs; step {st.step} of {s.steps}; backend {', '.join(opts.backends)}")
    fit(st, pair_objective.stream(pairs), pair_objective.PairCrossEntropy(pairs), backends=opts.backends,
        checkpoint=checkpoint, log=log, progress=bar, reducer=red)
    m.meta = {"source": "minitx train", "pairs": os.path.basename(pairs_path), "steps": st.step,
              "settings": asdict(s), "history": st.history}
    if red.is_writer:
        modelfile.save(m, opts.output)
    return _trained(opts, checkpoint, st, t0)


# --------------------------------------------------------------------------------- distill
def distill(opts: RunOptions, teacher_path: str | None, student_config: str | None, data_path: str | None, *,
            losses: Sequence[str] = (), temperature: float = 2.0, layer_map: str | None = None,
            baseline: bool = False, decode_tokens: int = 32, student_path: str | None = None,
            pairs_path: str | None = None) -> dict[str, Any]:
    """``minitx distill``: a student trained against a teacher (default: the bundled model). The
    student is a fresh model (``student_config``) or a model file (``student_path``: a pruned or
    layer-dropped teacher). An encoder teacher is distilled through its sentence embeddings
    (training/embedding.py), an encoder–decoder through its next-token distributions on the
    source<TAB>target lines of ``pairs_path`` (training/pairs.py)."""
    from ..bundled import default_model_path

    if (student_config is None) == (student_path is None) and not opts.resume:
        raise MinitxError("give one of --student-config JSON (a fresh student) or --student FILE (a model to start from)")
    if (data_path is None) == (pairs_path is None):
        raise MinitxError("give one of --data TEXT (decoder and encoder teachers) or --pairs FILE (an encoder–decoder teacher)")
    if decode_tokens < 0:
        raise MinitxError(f"--max-new-tokens must be >= 0, got {decode_tokens}")
    _check_early(opts)
    teacher_path = teacher_path if teacher_path is not None else default_model_path()
    checkpoint = opts.checkpoint_path({"--data": data_path, "--pairs": pairs_path, "TEACHER": teacher_path,
                                       "--student": student_path})
    t = modelfile.load(teacher_path)
    from .. import seq2seq

    if seq2seq.is_encoder_decoder(t) or pairs_path is not None:
        return _distill_pairs(opts, t, teacher_path, student_config, student_path, pairs_path, losses, temperature,
                              layer_map, baseline, checkpoint)
    if t.tokenizer_json is None:
        raise MinitxError(f"{teacher_path}: the teacher carries no tokenizer, so it cannot read the text")
    if not t.is_decoder:
        return _distill_encoder(opts, t, teacher_path, student_config, student_path, data_path, losses,
                                layer_map, baseline, checkpoint)
    ds = dl.DistillSettings(dl.parse_losses(losses), temperature,
                            dl.parse_layer_map(layer_map) if layer_map is not None else None)
    ds.check()
    if student_path is not None:
        if baseline:
            raise MinitxError("--baseline trains a fresh student of --student-config; not with --student FILE")
        start = modelfile.load(student_path)
        start.tokenizer_json = start.tokenizer_json or t.tokenizer_json
        student_config = json.dumps(start.config)
    config = dl.student_config(t, _json_arg(student_config, f"--student-config {student_config.strip()}",
                                            inline=True)) if student_config is not None else None
    if opts.resume:
        st = opts.resumed(ckpt.load(opts.resume, kind="distill"), changeable=("precision", "plugins"))
        if config is not None and st.model.config != config:
            diff = sorted(k for k in {*config, *st.model.config} if config.get(k) != st.model.config.get(k))
            raise MinitxError(f"{opts.resume}: the checkpoint's student differs from --student-config in "
                              f"{', '.join(diff)}")
    elif student_path is not None:
        st = new_state(start, opts.settings(), "distill")
    else:
        st = dl.new_student(config, t, opts.settings())
    dl.plan(t, st.model, ds)   # bad layer maps and the like fail before any text is read
    ids = data.encode(t.tokenizer_json, data.read_text(data_path))
    bar, log = opts.reporter(st.settings.steps)
    log(f"teacher {t.n_params():,} parameters, student {st.model.n_params():,}; {len(ids):,} tokens of text; "
        f"losses {', '.join(f'{k}={v:g}' for k, v in ds.losses.items())}")
    return dl.run_report(t, teacher_path, st, ids, ds, opts.output, baseline=baseline, decode_tokens=decode_tokens,
                         backends=opts.backends, checkpoint=checkpoint, log=log, progress=bar)


def _distill_encoder(opts: RunOptions, t: Model, teacher_path: str, student_config: str | None,
                     student_path: str | None, data_path: str, losses: Sequence[str], layer_map: str | None,
                     baseline: bool, checkpoint: str) -> dict[str, Any]:
    """``minitx distill`` with an encoder teacher: the student learns the teacher's sentence
    embeddings (losses ``cosine``, ``hidden``, ``tokens``, ``layers``) on the text's sentences."""
    from . import embedding as emb

    weights = emb.parse_losses(losses)
    if layer_map is not None or baseline:
        raise MinitxError(f"{'--layer-map' if layer_map is not None else '--baseline'} is for decoder teachers; "
                          "an encoder is distilled through its embeddings (--loss cosine, hidden, tokens, layers)")
    if opts.resume:
        st = opts.resumed(ckpt.load(opts.resume, kind="distill"), changeable=("precision", "plugins"))
    else:
        start = modelfile.load(student_path) if student_path is not None else None
        user = None if start is not None else _json_arg(student_config or "", f"--student-config {student_config}",
                                                         inline=True)
        st = emb.start_student(t, opts.settings(), student=start, config=user)
    text = data.read_text(data_path)
    bar, log = opts.reporter(st.settings.steps)
    log(f"teacher {t.n_params():,} parameters, student {st.model.n_params():,}; "
        f"losses {', '.join(f'{k}={v:g}' for k, v in weights.items())}")
    return emb.run_distill(t, teacher_path, st, text, weights, opts.output, backends=opts.backends,
                           checkpoint=checkpoint, log=log, progress=bar)


def _distill_pairs(opts: RunOptions, t: Model, teacher_path: str, student_config: str | None,
                   student_path: str | None, pairs_path: str | None, losses: Sequence[str], temperature: float,
                   layer_map: str | None, baseline: bool, checkpoint: str) -> dict[str, Any]:
    """``minitx distill --pairs``: an encoder–decoder student learns an encoder–decoder teacher's
    teacher-forced distributions (``response``) and/or the targets (``ce``) on source<TAB>target
    lines (text for the teacher's tokenizer, else token ids); reports both models' held-out loss
    and how often their greedy outputs agree on the held-out sources."""
    from .. import seq2seq
    from . import pairs as pair_objective

    if not seq2seq.is_encoder_decoder(t):
        raise MinitxError(f"--pairs distils an encoder–decoder teacher (t5, bart, marian, transformer), "
                          f"not {t.config['arch']}: give --data TEXT")
    if pairs_path is None:
        raise MinitxError(f"{teacher_path}: an encoder–decoder teacher is distilled on --pairs source<TAB>target lines")
    if layer_map is not None or baseline:
        raise MinitxError(f"{'--layer-map' if layer_map is not None else '--baseline'} is for decoder teachers; an "
                          "encoder–decoder is distilled through its next-token distributions (--loss response, ce)")
    weights = dl.parse_losses(losses, ("response", "ce"), "response", " for an encoder–decoder")
    t0 = time.perf_counter()
    if opts.resume:
        st = opts.resumed(ckpt.load(opts.resume, kind="distill"), changeable=("precision", "plugins"))
    elif student_path is not None:
        start = modelfile.load(student_path)
        start.tokenizer_json = start.tokenizer_json or t.tokenizer_json
        st = new_state(start, opts.settings(), "distill")
    else:
        user = _json_arg(student_config or "", f"--student-config {student_config}", inline=True)
        if not isinstance(user, dict):
            raise MinitxError("--student-config must be a JSON object")
        try:
            config = models.complete_config({**t.config, **user})
        except MinitxError as e:
            raise MinitxError(f"student {e}") from None
        st = fresh_model(config, t.tokenizer_json, opts.settings(), kind="distill")
    pairs = seq2seq.read_pairs(pairs_path, t)
    obj = pair_objective.PairDistillation(pairs, teacher=t, losses=weights, temperature=temperature,
                                          teacher_file=teacher_path)
    bar, log = opts.reporter(st.settings.steps)
    log(f"teacher {t.n_params():,} parameters, student {st.model.n_params():,}; {len(pairs):,} pairs; "
        f"losses {', '.join(f'{k}={v:g}' for k, v in weights.items())}")
    fit(st, pair_objective.stream(pairs), obj, backends=opts.backends, checkpoint=checkpoint, log=log, progress=bar)
    m = st.model
    m.meta = {"source": "minitx distill", "teacher": os.path.basename(teacher_path),
              "pairs": os.path.basename(pairs_path), "steps": st.step, "settings": asdict(st.settings),
              "history": st.history}
    modelfile.save(m, opts.output)
    _, held = data.split(pair_objective.stream(pairs), st.settings.val_fraction, 1)
    sources = [pairs[int(i)][0] for i in held]
    agree = None
    if sources:
        longest = max(len(p[1]) for p in pairs) + 1
        ts = seq2seq.generate(t, sources, longest, backends=opts.backends)
        ss = seq2seq.generate(m, sources, longest, backends=opts.backends)
        agree = sum(a == b for a, b in zip(ts, ss)) / len(sources)
    rep = _trained(opts, checkpoint, st, t0)
    return {**rep, "teacher_params": t.n_params(), "student_params": m.n_params(),
            "teacher_val_loss": obj.held_out(t, held, opts.backends, st.settings.batch_size) if len(held) else None,
            "held_out_pairs": int(len(held)), "greedy_agreement": agree}


# ------------------------------------------------------------------------------------- qat
def qat(opts: RunOptions, model_path: str | None, data_path: str, plugin_texts: Sequence[str], *,
        calib: Sequence[str] = (), validate: Sequence[str] = (), force: bool = False, compare: bool = True,
        rounding: str = "nearest", warn: Warn | None = None) -> dict[str, Any]:
    """``minitx qat``: fine-tune through fake quantization, convert, score, save. Of ``plugin_texts``
    the one ``quant:`` spec is what to train for; the others are exact training rewrites (recompute).
    ``rounding="gptq"`` starts from GPTQ-rounded int4 weights (:func:`rounding.gptq_start`) instead
    of the float ones; the float model stays the teacher and the reference of every comparison."""
    from ..bundled import default_model_path
    from ..validate import Calibration

    from ..plugin import parse_spec

    target = [p for p in plugin_texts if not parse_spec(p).plugin.exact]
    if len(target) != 1:
        raise MinitxError("give one --plugin quant:MODE[,OPTS] to train for (e.g. quant:int4), besides exact "
                          "training rewrites such as recompute" + (f"; got {', '.join(target)}" if target else ""))
    text = target[0]
    opts.values["plugins"] = tuple(p for p in plugin_texts if p not in target)
    if "plugins" in opts.given and not opts.values["plugins"]:
        opts.given.discard("plugins")
    packed_text = quant_aware.split_spec(text)[1]       # bad options fail before any work
    _check_early(opts)
    cal = Calibration.parse(list(calib), validate=list(validate))
    model_file = model_path if model_path is not None else default_model_path()
    checkpoint = opts.checkpoint_path({"--data": data_path, "MODEL": model_file})
    m = modelfile.load(model_file)
    quant_aware.check_float(m, model_path or "the bundled model")
    if m.tokenizer_json is None:
        raise MinitxError("this model carries no tokenizer, so it cannot read text")
    if rounding not in ("nearest", "gptq"):
        raise MinitxError(f"--rounding must be nearest or gptq, not {rounding!r}")
    raw = data.read_text(data_path)
    ids = data.encode(m.tokenizer_json, raw) if m.is_decoder else raw   # an encoder trains on sentences
    start = m
    if rounding == "gptq":
        from .rounding import gptq_start

        start = gptq_start(m, ids, packed_text, opts.settings())
    if opts.resume:
        st = opts.resumed(quant_aware.resume(opts.resume, start, text, model_file), changeable=("precision", "plugins"))
    else:
        st = quant_aware.new_state(start, text, opts.settings(), model_file)
    bar, log = opts.reporter(st.settings.steps)
    res = quant_aware.run(m, ids, text, st.settings, backends=opts.backends, calib=cal, force=force, state=st,
                checkpoint=checkpoint, warn=warn, log=log, progress=bar)
    res.packed.meta["qat"]["rounding"] = start.meta.get("rounding", {"method": "nearest"})
    report: dict[str, Any] = {"plugin": packed_text, "rounding": rounding, "steps": res.state.step,
                              "packed_vs_fake_quant_max_abs": res.packed_vs_fake_quant}
    v = res.packed.meta["rewrites"][-1].get("validation")
    if v:
        report["validation"] = {k: v[k] for k in ("calibration", "n_sequences", "passed", "failure")}
    if compare:
        report.update(quant_aware.compare(m, ids, res, text, opts.backends, start=start))
    modelfile.save(res.packed, opts.output)
    return report


# ------------------------------------------------------------------------------------ eval
def evaluate_file(model: Model, data_path: str, *, stride: int | None = None, plugins: Sequence[str] = (),
                  backends: Sequence[str] = ("numpy",), strict: bool = False, precision: str = "float32",
                  warn: Warn | None = None) -> dict[str, Any]:
    """``minitx eval``: loss and perplexity of ``model`` on a text (and of its rewrite by ``plugins``)."""
    from ..precision import check_precision

    check_precision(precision)
    if not model.is_decoder:
        raise MinitxError(f"eval scores next-token prediction: needs a decoder, not {model.config['arch']}")
    if model.tokenizer_json is None:
        raise MinitxError("this model carries no tokenizer, so it cannot read text")
    if plugins:
        from ..plugin import plan

        plan(plugins)    # bad plugin options fail before any scoring
    ids = data.encode(model.tokenizer_json, data.read_text(data_path))
    if plugins:
        return compare_plugins(model, ids, plugins, backends=backends, stride=stride, strict=strict,
                               precision=precision, warn=warn)
    return evaluate(model, ids, stride=stride, backends=backends, strict=strict, precision=precision)

