"""Quantization-aware training (QAT): fine-tune a float model through its quantization, then pack it.

Post-training quantization rounds weights that were never trained to survive rounding. QAT
rewrites the model with ``quant:MODE,qat=true`` — each weight the mode would pack is read through
a ``fake_quant`` node computing exactly the packed format's values — and keeps training the
float weights with the straight-through gradient (minitx/ops/fakequant.py), so they settle where
their rounded values predict well. Conversion is then the ordinary ``quant:MODE`` rewrite of the
fine-tuned float weights, validated like ``minitx optimize``; the packed graph computes what the
fake-quant graph computed (to float rounding: :func:`packed_vs_fake_quant`).

The loop is :func:`minitx.training.fit` with the cross-entropy objective on a state whose model
has the fake-quant graph: same batches, schedule, precision, clipping, AdamW, held-out
evaluation and checkpoints as ``minitx train``. A checkpoint
holds the float weights being fine-tuned (``kind`` "qat"); resuming rebuilds the fake-quant graph
over them, after checking that the starting model, the plugin and the text are the run's own.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np

from .. import data, plugin
from ..errors import MinitxError
from ..executor import Executor
from ..model import Model
from . import checkpoint as ckpt
from . import embedding
from .evaluation import evaluate
from .loop import CrossEntropy, batch_feeds, fit
from .settings import TrainSettings, TrainState, new_state as _new_state



def split_spec(text: str) -> tuple[str, str]:
    """``quant:int4[,qat=true],…`` → (the fake-quant spec for training, the packing spec).

    Raises a one-line MinitxError for anything but one quant plugin in a mode QAT reproduces (``QAT_MODES``)."""
    spec = plugin.parse_spec(text)          # validates names, options and values
    if spec.name != "quant":
        raise MinitxError(f"--plugin {text!r}: quantization-aware training needs the quant plugin "
                          f"(e.g. quant:int4), not {spec.name}")
    name, _, rest = text.strip().partition(":")
    items = [i.strip() for i in rest.split(",") if i.strip() and not i.strip().startswith("qat=")]
    packed = name.strip() + (":" + ",".join(items) if items else "")
    fake = packed + (",qat=true" if items else ":qat=true")
    try:
        plugin.parse_spec(fake)             # the quant plugin decides which modes QAT can reproduce
    except MinitxError as e:
        raise MinitxError(f"--plugin {text!r}: {e}") from None
    return fake, packed


def check_float(model: Model, what: str = "the model") -> None:
    """QAT starts from a float model that no rewrite has touched (a decoder, trained on next
    tokens, or an encoder, trained to keep the float model's sentence embeddings)."""
    if not model.is_decoder and "embedding" not in model.graph.outputs:
        raise MinitxError(f"quantization-aware training needs a decoder or a sentence encoder, not {model.config['arch']}")
    done = [r.get("spec", r.get("plugin")) for r in model.meta.get("rewrites", [])]
    if done:
        raise MinitxError(f"{what} was already rewritten ({', '.join(map(str, done))}); "
                          "quantization-aware training starts from a float model")


def fake_quant_model(model: Model, text: str) -> Model:
    """The model with ``text``'s fake-quant graph over its own float weights (copied: training
    updates them in place, and ``model`` stays as it was)."""
    fake, _ = split_spec(text)
    check_float(model)
    params = {k: np.array(a, copy=True) for k, a in model.params.items()}
    res = plugin.get_plugin("quant").apply(model.graph, params, plugin.parse_spec(fake).options)
    if set(res.graph.params) != set(model.graph.params):
        raise MinitxError(f"--plugin {text!r}: the fake-quant rewrite changed the parameter set")
    return Model(dict(model.config), res.params, res.graph, model.tokenizer_json,
                 {**model.meta, "qat_graph": {"spec": fake, "fired": res.counts()}})


@dataclass
class QATResult:
    packed: Model                 # the converted model (what gets saved)
    fine_tuned: Model             # the fine-tuned float weights in the float graph
    fake_quant: Model             # the training graph (fake_quant nodes) with those weights
    state: TrainState
    packed_vs_fake_quant: float   # max |logits| difference on a check batch


def new_state(model: Model, text: str, settings: TrainSettings, model_file: str | None = None) -> TrainState:
    """A fresh QAT run: the fake-quant model over a copy of ``model``'s weights, a new AdamW.
    ``model`` may be a rounded start (:func:`rounding.gptq_start`): its meta says so."""
    settings.check()
    fq = fake_quant_model(model, text)
    st = _new_state(fq, settings, kind="qat")
    ckpt.check_run(st, run_identity(model, fq, text, model_file))
    return st


def resume(path: str, model: Model, text: str, model_file: str | None = None) -> TrainState:
    """The QAT run saved in checkpoint ``path``, which must have started from ``model`` with ``text``."""
    st = ckpt.load(path, kind="qat")
    fq = fake_quant_model(st.model, text)   # the fine-tuned float weights, read through fake_quant
    ckpt.check_run(st, run_identity(model, fq, text, model_file))
    st.model = fq
    return st


def run_identity(model: Model, fq: Model, text: str, model_file: str | None = None) -> dict[str, Any]:
    """What a resumed QAT run must repeat besides the training settings (its text is checked too):
    how the start was rounded, the starting model, and the fake-quant graph it trains through —
    the plugin options that shape it, not the conversion's tolerances (which may change)."""
    return {"--rounding": model.meta.get("rounding", {}).get("method", "nearest"),
            "model": ckpt.model_identity(model, model_file),
            "--plugin": {"what": split_spec(text)[1], "sha256": ckpt.fingerprint({"graph": fq.graph.to_json()})}}


def finetune(model: Model, ids: np.ndarray | str, text: str, settings: TrainSettings, *,
             backends: Sequence[str] = ("numpy",), state: TrainState | None = None,
             checkpoint: str | None = None, log: Callable[[str], None] | None = None,
             progress: Callable[[dict[str, float]], None] | None = None,
             losses: dict[str, float] | None = None) -> tuple[Model, Model, TrainState]:
    """Train ``model`` through ``text``'s fake quantization (or continue ``state``, from
    :func:`resume`) on ``ids`` (a decoder's token stream; an encoder's text), checkpointing to ``checkpoint``; returns (fine-tuned float model, fake-quant
    model, the training state). ``model`` itself is not modified. An encoder's ``losses`` are
    :func:`embedding.parse_losses`' (default cosine=1)."""
    st = state if state is not None else new_state(model, text, settings)
    fq = st.model
    if model.is_decoder:
        st = fit(st, ids, CrossEntropy(kind="qat"), backends=backends, checkpoint=checkpoint, log=log,
                 progress=progress)
    else:   # an encoder keeps the float model's embeddings of the text's sentences
        sents = embedding.sentences(model, ids, st.settings.seq_len or None)
        st = fit(st, embedding.stream(sents), embedding.EmbeddingDistillation(model, sents, losses or {"cosine": 1.0}, kind="qat"),
                 backends=backends, checkpoint=checkpoint, log=log, progress=progress)
    meta = {k: v for k, v in model.meta.items() if k != "qat_graph"}
    meta["qat"] = {"spec": split_spec(text)[0], "steps": st.step, "settings": asdict(st.settings),
                   "history": st.history}
    fine = Model(dict(model.config), fq.params, model.graph, model.tokenizer_json, meta)
    return fine, fq, st


def packed_vs_fake_quant(packed: Model, fake: Model, seed: int = 0, batch: int = 2, length: int = 32) -> float:
    """Max |logits| (an encoder: |embedding|) difference of the packed and the fake-quant graph on
    seeded random tokens."""
    rng = np.random.default_rng(seed)
    L = min(length, packed.n_ctx)
    x = rng.integers(0, packed.vocab_size, (batch, L))
    out = "logits" if packed.is_decoder else "embedding"
    outs = []
    for m in (packed, fake):
        outs.append(Executor(m.graph, m.params).run(batch_feeds(m.graph, x), outputs=[out])[out])
    return float(np.abs(outs[0].astype(np.float64) - outs[1]).max())


def run(model: Model, ids: np.ndarray | str, text: str, settings: TrainSettings, *,
        backends: Sequence[str] = ("numpy",), calib=None, force: bool = False,
        state: TrainState | None = None, checkpoint: str | None = None,
        warn: Callable[[str], None] | None = None, log: Callable[[str], None] | None = None,
        progress: Callable[[dict[str, float]], None] | None = None,
        losses: dict[str, float] | None = None) -> QATResult:
    """Fine-tune with fake quantization, then convert to the packed form (validated against the
    fine-tuned float model with the plugin's declared tolerance, as ``minitx optimize`` does)."""
    _, packed_text = split_spec(text)
    fine, fq, st = finetune(model, ids, text, settings, backends=backends, state=state, checkpoint=checkpoint,
                            log=log, progress=progress, losses=losses)
    packed = plugin.optimize(fine, [packed_text], calib=calib, force=force, warn=warn)
    diff = packed_vs_fake_quant(packed, fq, seed=st.settings.seed)
    packed.meta["qat"] = {**packed.meta.get("qat", {}), "packed_vs_fake_quant_max_abs": diff}
    return QATResult(packed, fine, fq, st, diff)


def held_out(ids: np.ndarray, settings: TrainSettings, n_ctx: int) -> np.ndarray:
    """The held-out tail fit() scores during training (never trained on)."""
    return data.split(ids, settings.val_fraction, settings.seq_len or n_ctx)[1]


def _baselines(model: Model, packed_text: str, start: Model | None) -> list[tuple[str, Model]]:
    """What QAT is scored against: post-training quantization of the float model, and of the
    rounded start when QAT began from one (what the rounding alone bought)."""
    out = [("ptq", plugin.optimize(model, [packed_text], force=True))]
    if start is not None and start is not model:
        out.append((start.meta.get("rounding", {}).get("method", "start"),
                    plugin.optimize(start, [packed_text], force=True)))
    return out


def compare(model: Model, ids: np.ndarray | str, res: QATResult, text: str,
            backends: Sequence[str] = ("numpy",), start: Model | None = None) -> dict[str, Any]:
    """Held-out perplexity of the float model, its post-training quantization (and that of a
    rounded ``start``) and the QAT model (empty when the run held nothing out); recorded in the
    packed model's metadata too."""
    packed_text = split_spec(text)[1]
    if not model.is_decoder:
        return _compare_encoder(model, ids, res, packed_text, backends, start)
    val = held_out(ids, res.state.settings, model.n_ctx)
    if len(val) < 2:
        return {}
    score = {name: evaluate(m, val, backends=backends) for name, m in
             (("float", model), *_baselines(model, packed_text, start), ("qat", res.packed))}
    out: dict[str, Any] = {"held_out_tokens": score["float"]["tokens"]}
    out.update({f"{k}_perplexity": v["perplexity"] for k, v in score.items()})
    res.packed.meta["qat"]["comparison"] = {k: v for k, v in out.items() if k.endswith("perplexity")}
    return out


def _compare_encoder(model: Model, text: str, res: QATResult, packed_text: str,
                     backends: Sequence[str], start: Model | None) -> dict[str, Any]:
    """Held-out mean cosine to the float model's embeddings of its post-training quantization
    and of the QAT model (the held-out sentences fit() scored)."""
    s = res.state.settings
    sents = embedding.sentences(model, text, s.seq_len or None)
    val = data.split(embedding.stream(sents), s.val_fraction, 1)[1]
    if len(val) < 2:
        return {}
    chosen = [sents[i] for i in val]
    ref = embedding.teacher_embeddings(model, chosen, backends)
    out: dict[str, Any] = {"held_out_sentences": len(chosen)}
    for name, m in (*_baselines(model, packed_text, start), ("qat", res.packed)):
        out[f"{name}_cosine"] = embedding.mean_cosine(m, chosen, ref, backends)
    res.packed.meta["qat"]["comparison"] = {k: v for k, v in out.items() if k.endswith("cosine")}
    return out
