"""Training encoders: distil a teacher's sentence embeddings into a student (``distill``, ``qat``).

An encoder has no next token to predict, so what it is trained on is what it is used for: its
sentence embedding. The student (a pruned, layer-dropped, low-rank or fake-quantized copy of the
teacher, or a smaller fresh model) learns to reproduce the teacher's embeddings of the same
sentences. The losses are built from existing spec ops, so their gradients are those ops' checked
VJPs:

* ``cosine`` — mean over sentences of 1 − cos(e_s, e_t). With both embeddings L2-normalised,
  ‖e_s − e_t‖² = 2 − 2·cos, so it is ``scale(mse(l2_normalize(e_s), ê_t), C/2)`` (``mse``
  averages over the C features of each of the B rows): no new op is needed;
* ``hidden`` — MSE between the student's and the teacher's last hidden states (every token);
* ``tokens`` — the per-token (pre-pooling) cosine: mean over sentences of the mean over their real
  tokens of 1 − cos(h_s, h_t) at the last layer. Pooling keeps one 384-number summary per
  sentence; this term gives the student each token's direction too, a signal T times richer
  (layer-wise distillation as in TinyBERT and MiniLM, here on hidden states);
* ``layers`` — the same per-token cosine at every block's output, averaged over the blocks
  (student block k ↔ teacher block spread evenly, last to last: one to one at equal depth).

A per-token term is built as 1 − Σ ŝ·W with ŝ = l2_normalize(h_s) and W the teacher's normalised
states weighted by mask_bt / (B·n_b) (computed with the batch, as a constant): ``inner`` gives
Σ ŝ·W, so padded positions weigh nothing and each sentence counts once whatever its length.
The constant 1 is fed (``loss.one``) so that the term reads as 1 − cosine.

The data is the training text cut into sentences (:func:`sentences`). As in
``train --pairs`` (training/pairs.py), :func:`minitx.training.fit` gets the sentences' indices as
its stream and a window is one index, so the loop's seeded generator draws each batch's sentences
and accumulation, clipping, precision, checkpoints and exact resumes apply unchanged. The
teacher's embeddings are computed once, in fixed batches (:meth:`EmbeddingDistillation.prepare`),
so a resumed run sees bit-for-bit the same targets; its hidden states (``hidden``), per batch.
The held-out sentences (the text's tail, ``--val-fraction``) are scored as the mean cosine
between the student's and the teacher's embeddings (``val_cosine``), reported during training.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .. import feeds
from ..errors import MinitxError
from ..ir import Graph, Node, Value
from ..model import Model
from .settings import TrainState

LOSSES = ("cosine", "hidden", "tokens", "layers")
PER_TOKEN = ("tokens", "layers")
_SPLIT = re.compile(r"(?<=[.!?;])\s+")


def parse_losses(specs: Sequence[str]) -> dict[str, float]:
    """``["cosine=1", "hidden=0.5"]`` → weights; a bare name weighs 1; default ``cosine=1``."""
    from .distill import parse_losses as parse

    return parse(specs, LOSSES, "cosine", " for an encoder")


def sentences(model: Model, text: str, max_tokens: int | None = None, min_tokens: int = 3) -> list[list[int]]:
    """The text's sentences (lines, cut after . ! ? ;) as the model tokenizes them (with its special
    tokens), each cut to ``max_tokens`` (default: the model's ``max_seq_length`` or context);
    sentences shorter than ``min_tokens`` are dropped (headings, stray punctuation)."""
    tok = model.tokenizer
    if tok is None:
        raise MinitxError("this model carries no tokenizer, so it cannot read text")
    limit = min(int(max_tokens or model.config.get("max_seq_length") or model.n_ctx), model.n_ctx)
    if limit < 2:
        raise MinitxError(f"--seq {limit}: a sentence needs at least 2 tokens")
    parts = [p.strip() for line in text.splitlines() for p in _SPLIT.split(line)]
    parts = [p for p in parts if p]
    out = [e.ids[:limit] for e in tok.encode_batch(parts)] if parts else []
    out = [s for s in out if len(s) >= min_tokens]
    if not out:
        raise MinitxError("the text has no sentences to train on")
    bad = [t for s in out for t in s if not 0 <= t < model.vocab_size]
    if bad:
        raise MinitxError(f"token id {bad[0]} is outside the model's vocabulary of {model.vocab_size}")
    return out


def stream(sents: Sequence[Sequence[int]]) -> np.ndarray:
    """What :func:`fit` gets as its data: the sentences' indices, in text order."""
    return np.arange(len(sents), dtype=np.int64)


def identity(sents: Sequence[Sequence[int]]) -> str:
    """A digest of the sentences' token ids: a resume must train on the same sentences."""
    h = hashlib.sha256()
    for s in sents:
        h.update(np.asarray(s, np.int64).tobytes() + b"\n")
    return f"{len(sents)} sentences, sha256 {h.hexdigest()[:16]}"


def _embedding_dim(model: Model) -> int:
    return int(model.config["d_model"])


def block_outputs(graph: Graph) -> list[str]:
    """The values each block of a BERT graph ends with (``layers.i.norm2``'s output), in order;
    a layer-dropped model keeps its blocks' names, so its indices may have gaps."""
    found = sorted((int(m.group(1)), n.outputs[0]) for n in graph.nodes
                   if (m := re.fullmatch(r"layers\.(\d+)\.norm2", n.name)))
    if not found:
        raise MinitxError("the model's graph has no block outputs (layers.N.norm2): an encoder (bert) is needed")
    return [v for _, v in found]


def layer_pairs(student: Graph, teacher: Graph) -> list[tuple[str, str]]:
    """(student value, teacher value) per student block for the ``layers`` loss: the k-th of the
    student's blocks faces the teacher's block spread evenly over its depth, last to last."""
    from .distill import default_layer_map

    s, t = block_outputs(student), block_outputs(teacher)
    if len(s) > len(t):
        raise MinitxError(f"--loss layers: the student has {len(s)} blocks, more than the teacher's {len(t)}")
    return [(s[i], t[j]) for i, j in default_layer_map(len(s), len(t))]


def token_weights(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """W = normalised hidden states · mask_bt / (B·n_b): Σ ŝ·W is the mean over the B sentences
    of the mean over each one's n_b real tokens of cos(s, t)."""
    m = mask.astype(np.float64)
    w = m / (m.shape[0] * np.maximum(m.sum(axis=1, keepdims=True), 1.0))
    return (normalized(hidden.astype(np.float64)) * w[..., None]).astype(hidden.dtype)


def loss_graph(graph: Graph, losses: dict[str, float], width: int,
               pairs: Sequence[tuple[str, str]] = ()) -> Graph:
    """``graph`` (an encoder's: outputs ``hidden`` and ``embedding``) with the scalar ``loss``
    (first output) and each term ``loss.NAME``; the teacher's values come in as inputs
    ``teacher.embedding`` (B, C), L2-normalised, ``teacher.hidden`` (B, T, C), and for the
    per-token terms ``teacher.tokens`` and ``teacher.layers.k`` (B, T, C: :func:`token_weights`
    of the last / the k-th pair's hidden states, ``pairs`` from :func:`layer_pairs`) with the
    scalar ``loss.one``."""
    g = graph.copy()
    for need in ("embedding",) + (("hidden",) if "hidden" in losses else ()):
        if need not in g.producers():
            raise MinitxError(f"the student's graph has no {need!r} value: an encoder (bert) is needed")
    dtype = g.params[next(iter(g.params))].dtype if g.params else "float32"

    def node(name: str, op: str, inputs: list[str], **attrs: Any) -> str:
        g.nodes.append(Node(name, op, inputs, [name], attrs))
        return name

    terms: list[tuple[str, float]] = []
    if "cosine" in losses:
        g.inputs.append(Value("teacher.embedding", ("B", width), dtype))
        e = node("embed.normalized", "l2_normalize", ["embedding"])
        d = node("embed.cosine.mse", "mse", [e, "teacher.embedding"])
        terms.append((node("loss.cosine", "scale", [d], factor=width / 2.0), losses["cosine"]))
    if "hidden" in losses:
        g.inputs.append(Value("teacher.hidden", ("B", "T", width), dtype))
        terms.append((node("loss.hidden", "mse", ["hidden", "teacher.hidden"]), losses["hidden"]))
    if any(k in losses for k in PER_TOKEN):
        g.inputs.append(Value("loss.one", (), dtype))

    def one_minus(name: str, sims: list[tuple[str, str]], share: float) -> str:
        """1 − share·Σ_k Σ l2_normalize(student value_k)·(teacher input_k)."""
        dots = []
        for v, t in sims:
            g.inputs.append(Value(t, ("B", "T", width), dtype))
            dots.append(node(f"{t}.dot", "inner", [node(f"{t}.normalized", "l2_normalize", [v]), t]))
        total = dots[0]
        for k, d in enumerate(dots[1:]):
            total = node(f"{name}.sum{k}", "add", [total, d])
        return node(name, "add", [node(f"{name}.neg", "scale", [total], factor=-share), "loss.one"])

    if "tokens" in losses:
        terms.append((one_minus("loss.tokens", [("hidden", "teacher.tokens")], 1.0), losses["tokens"]))
    if "layers" in losses:
        if not pairs:
            raise MinitxError("--loss layers needs the student's and the teacher's blocks paired")
        sims = [(v, f"teacher.layers.{k}") for k, (v, _) in enumerate(pairs)]
        terms.append((one_minus("loss.layers", sims, 1.0 / len(sims)), losses["layers"]))
    scaled = [node(f"{n}.weighted", "scale", [n], factor=float(w)) for n, w in terms]
    total = scaled[0]
    for k, p in enumerate(scaled[1:]):
        total = node(f"loss.sum{k}", "add", [total, p])
    g.nodes.append(Node("loss", "scale", [total], ["loss"], {"factor": 1.0}))
    g.outputs = ["loss", *[n for n, _ in terms]]
    g.validate()
    return g


def normalized(e: np.ndarray) -> np.ndarray:
    return e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)


def teacher_embeddings(teacher: Model, sents: Sequence[Sequence[int]], backends: Sequence[Any] = ("numpy",),
                       batch: int = 32) -> np.ndarray:
    """The teacher's L2-normalised embeddings (N, C) of ``sents``, in fixed batches of sentences
    of similar length (deterministic, so a resumed run gets the same targets)."""
    order = sorted(range(len(sents)), key=lambda i: (len(sents[i]), i))
    emb = np.zeros((len(sents), _embedding_dim(teacher)), np.float32)
    ex = teacher.executor(backends)
    for k in range(0, len(order), batch):
        idx = order[k:k + batch]
        r = ex.run(feeds.for_sequences(teacher.graph, [sents[i] for i in idx], decoder=False), outputs=["embedding"])
        emb[idx] = normalized(r["embedding"].astype(np.float32))
    return emb


def mean_cosine(model: Model, sents: Sequence[Sequence[int]], target: np.ndarray,
                backends: Sequence[Any] = ("numpy",)) -> float:
    """Mean cosine between ``model``'s embeddings of ``sents`` and the normalised ``target`` rows."""
    from ..generate import embed

    e = normalized(embed(model, list(sents), backends=backends).astype(np.float64))
    return float((e * target.astype(np.float64)).sum(axis=1).mean())


@dataclass
class EmbeddingDistillation:
    """The objective :func:`minitx.training.fit` minimises to make the state's encoder reproduce
    ``teacher``'s sentence embeddings of ``sents`` (see the module docstring)."""

    teacher: Model
    sents: list[list[int]]
    losses: dict[str, float] = field(default_factory=lambda: {"cosine": 1.0})
    kind: str = "distill"
    run: dict[str, Any] = field(default_factory=dict)   # what else a resume must repeat (the teacher…)
    window: int = 1                                      # a batch row is one sentence index
    trains_encoders: bool = True
    _emb: np.ndarray | None = field(default=None, repr=False)
    _teacher_ex: Any = field(default=None, repr=False)
    _graph: Graph | None = field(default=None, repr=False)
    _teacher_layers: list[str] = field(default_factory=list, repr=False)   # ``layers``: the teacher's values

    def prepare(self, st: TrainState, backends: Sequence[Any]) -> dict[str, Any]:
        for who, m in (("the student", st.model), ("the teacher", self.teacher)):
            if m.is_decoder or "embedding" not in m.graph.outputs:
                raise MinitxError(f"{who} must be an encoder with sentence embeddings (bert), not {m.config['arch']}")
        if st.model.vocab_size != self.teacher.vocab_size:
            raise MinitxError(f"the student's vocab_size {st.model.vocab_size} differs from the teacher's "
                              f"{self.teacher.vocab_size}: both read the same tokens")
        ws, wt = _embedding_dim(st.model), _embedding_dim(self.teacher)
        if ws != wt:
            raise MinitxError(f"the student's width {ws} differs from the teacher's {wt}: embedding distillation "
                              "compares the two embeddings directly")
        longest = max(len(s) for s in self.sents)
        if longest > min(st.model.n_ctx, self.teacher.n_ctx):
            raise MinitxError(f"a sentence has {longest} tokens, beyond the context {min(st.model.n_ctx, self.teacher.n_ctx)}")
        # A student rewritten from the teacher (layers dropped, neurons pruned) shares the weights
        # it kept with it; training updates them in place, so they get their own copies.
        held = {a.__array_interface__["data"][0] for a in self.teacher.params.values()}
        for k, a in st.model.params.items():
            if a.__array_interface__["data"][0] in held:
                st.model.params[k] = a.copy()
                st.model._executors.clear()   # a cached executor would still read the shared arrays
        if self._emb is None:
            self._emb = teacher_embeddings(self.teacher, self.sents, backends)
        self._teacher_ex = self.teacher.executor(backends)
        if "layers" in self.losses:
            self._teacher_layers = [t for _, t in layer_pairs(st.model.graph, self.teacher.graph)]
        return {**self.run, "--sentences": identity(self.sents),
                "--loss": ",".join(f"{k}={float(self.losses[k])!r}" for k in LOSSES if k in self.losses)}

    def context(self, model: Model) -> int:
        return 1

    def check_data(self, ids: np.ndarray) -> None:
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= len(self.sents)):
            raise MinitxError("the sentence stream must hold indices of the sentences")

    def loss_graph(self, graph: Graph) -> Graph:
        pairs = layer_pairs(graph, self.teacher.graph) if "layers" in self.losses else ()
        return loss_graph(graph, self.losses, _embedding_dim(self.teacher), pairs)

    def extra_feeds(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Every input of the loss graph for the sentences whose indices are ``x[:, 0]``."""
        assert self._emb is not None, "prepare() first"
        idx = [int(i) for i in x[:, 0]]
        chosen = [self.sents[i] for i in idx]
        fed = feeds.for_sequences(self.teacher.graph, chosen, decoder=False)
        if "cosine" in self.losses:
            fed["teacher.embedding"] = self._emb[idx]
        if {"hidden", "tokens", "layers"} & set(self.losses):
            # Live, on this padded batch: then the padded positions' targets are what the teacher
            # computes there too, and no gradient pulls the student's weights towards zeros.
            ex = self._teacher_ex or self.teacher.executor(("numpy",))
            self._teacher_ex = ex
            got = ex.run(dict(fed), outputs=["hidden"], keep=self._teacher_layers)
            mask = fed["attention_mask"]
            if "hidden" in self.losses:
                fed["teacher.hidden"] = got["hidden"]
            if "tokens" in self.losses:
                fed["teacher.tokens"] = token_weights(got["hidden"], mask)
            for k, t in enumerate(self._teacher_layers):
                fed[f"teacher.layers.{k}"] = token_weights(got[t], mask)
            if set(PER_TOKEN) & set(self.losses):
                fed["loss.one"] = np.asarray(1.0, got["hidden"].dtype)
        return fed

    def held_out(self, model: Model, ids: np.ndarray, backends: Sequence[Any], batch: int) -> dict[str, float]:
        """Mean cosine between the student's and the teacher's embeddings of the held-out sentences."""
        assert self._emb is not None, "prepare() first"
        idx = [int(i) for i in ids]
        cos = mean_cosine(model, [self.sents[i] for i in idx], self._emb[idx], backends)
        return {"val_loss": 1.0 - cos, "val_cosine": cos}


def start_student(teacher: Model, settings: Any, *, student: Model | None = None,
                  config: dict[str, Any] | None = None, kind: str = "distill") -> TrainState:
    """The run's student: a given model (pruned, layer-dropped: trained on its own graph) or a
    fresh one whose ``config`` fields override the teacher's; it carries the teacher's tokenizer."""
    from .. import models
    from .settings import fresh_model, new_state

    if student is not None:
        if student.tokenizer_json is None:
            student.tokenizer_json = teacher.tokenizer_json
        return new_state(student, settings, kind)
    if not isinstance(config, dict):
        raise MinitxError("--student-config must be a JSON object")
    try:
        cfg = models.complete_config({**teacher.config, **config, "arch": config.get("arch", teacher.config["arch"])})
    except MinitxError as e:
        raise MinitxError(f"student {e}") from None
    if models.is_decoder(cfg):
        raise MinitxError(f"the student of an encoder teacher must be an encoder, not {cfg['arch']}")
    return fresh_model(cfg, teacher.tokenizer_json, settings, kind)


def run_distill(teacher: Model, teacher_path: str | None, st: TrainState, text: str, losses: dict[str, float],
                output: str, *, backends: Sequence[Any] = ("numpy",), checkpoint: str | None = None,
                log: Any = None, progress: Any = None) -> dict[str, Any]:
    """``minitx distill`` with an encoder teacher: train, save the student to ``output`` and report
    the held-out mean cosine to the teacher before and after."""
    import os
    import time
    from dataclasses import asdict

    from .. import modelfile
    from . import checkpoint as ckpt
    from .loop import fit

    s = st.settings
    sents = sentences(teacher, text, s.seq_len or None)
    obj = EmbeddingDistillation(teacher, sents, losses, kind="distill",
                                run={"teacher": ckpt.model_identity(teacher, teacher_path)})
    from .. import data

    val = data.split(stream(sents), s.val_fraction, 1)[1]
    n_val, before = len(val), None
    if n_val >= 2 and st.step == 0:
        obj._emb = teacher_embeddings(teacher, sents, backends)
        before = mean_cosine(st.model, [sents[i] for i in val], obj._emb[val], backends)
        (log or (lambda m: None))(f"held-out cosine to the teacher before training: {before:.4f} "
                                  f"({n_val} sentences)")
    t0 = time.perf_counter()
    fit(st, stream(sents), obj, backends=backends, checkpoint=checkpoint, log=log, progress=progress)
    seconds = time.perf_counter() - t0
    st.model.meta = {**{k: v for k, v in st.model.meta.items() if k != "history"},
                     "source": "minitx distill", "teacher": os.path.basename(teacher_path or "teacher"),
                     "losses": losses, "settings": asdict(s), "history": st.history}
    modelfile.save(st.model, output)
    last = st.history[-1] if st.history else {}
    return {"teacher_file": teacher_path, "student_file": output, "losses": losses, "steps": st.step,
            "sentences": len(sents), "held_out_sentences": n_val, "distill_seconds": seconds,
            "teacher_params": teacher.n_params(), "student_params": st.model.n_params(),
            "heldout_cosine_before": before, "heldout_cosine": last.get("val_cosine"), "history": st.history}
