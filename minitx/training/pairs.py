"""The objective of ``minitx train --pairs``: an encoder–decoder on source<TAB>target pairs.

:func:`minitx.training.loop.fit` draws random windows of a token stream; here the "stream" is the
pairs' indices (:func:`stream`) and a window is one index (:meth:`PairCrossEntropy.context` is 1),
so each batch row is a pair drawn by the loop's own seeded generator. That keeps everything the
loop does for every objective — accumulation, clipping, the schedule, precision, checkpoints and
exact resumes, data-parallel slices of the batch — and one loop. The held-out part is the file's
tail (``--val-fraction``), scored as the mean teacher-forced loss per target token.

:class:`PairDistillation` is ``minitx distill --pairs``: an encoder–decoder student learns a
teacher's teacher-forced next-token distributions on the same pairs (``response``: T² · KL at
temperature T, op ``kl_div`` with the padded target slots masked out), optionally mixed with the
hard-label cross-entropy (``ce``).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .. import models, seq2seq
from ..errors import MinitxError
from ..executor import Executor
from ..ir import Graph, Node, Value
from ..model import Model
from .settings import TrainState

Pair = tuple[list[int], list[int]]


def stream(pairs: Sequence[Pair]) -> np.ndarray:
    """What :func:`fit` gets as its data for ``pairs``: their indices, in file order."""
    return np.arange(len(pairs), dtype=np.int64)


def identity(pairs: Sequence[Pair]) -> str:
    """A digest of the pairs' token ids: a resume must train on the same pairs."""
    h = hashlib.sha256()
    for src, tgt in pairs:
        h.update(np.asarray(src, np.int64).tobytes() + b"\t" + np.asarray(tgt, np.int64).tobytes() + b"\n")
    return f"{len(pairs)} pairs, sha256 {h.hexdigest()[:16]}"


@dataclass
class PairCrossEntropy:
    """Teacher-forced cross-entropy of the target given the source (seq2seq.training_feeds)."""

    pairs: list[Pair]
    kind: str = "train"
    model: Model | None = field(default=None, repr=False)

    def prepare(self, st: TrainState, backends: Sequence[Any]) -> dict[str, Any]:
        if not seq2seq.is_encoder_decoder(st.model):
            raise MinitxError(f"--pairs trains an encoder–decoder (t5, bart, marian, transformer), "
                              f"not {st.model.config['arch']}")
        self.model = st.model
        seq2seq.training_feeds(st.model, self.pairs)   # every pair fits the context, checked once
        return {"--pairs": identity(self.pairs)}

    def context(self, model: Model) -> int:
        return 1   # a window is one pair index

    def check_data(self, ids: np.ndarray) -> None:
        """The stream holds pair indices, not token ids (those were checked by read_pairs)."""
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= len(self.pairs)):
            raise MinitxError("the pair stream must hold indices of the pairs")

    def loss_graph(self, graph: Graph) -> Graph:
        return models.with_loss(graph)

    def extra_feeds(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Every input of the loss graph, for the pairs whose indices are ``x[:, 0]``."""
        assert self.model is not None, "prepare() first"
        names = {v.name for v in self.model.graph.inputs} | {"targets"}
        fed = seq2seq.training_feeds(self.model, [self.pairs[int(i)] for i in x[:, 0]])
        return {k: v for k, v in fed.items() if k in names}

    def held_out(self, model: Model, ids: np.ndarray, backends: Sequence[Any], batch: int) -> float:
        """Mean teacher-forced loss per target token over the pairs ``ids``."""
        ex = Executor(models.with_loss(model.graph), model.params, backends)
        names = {v.name for v in ex.graph.inputs}
        total = count = 0.0
        for k in range(0, len(ids), batch):
            chosen = [self.pairs[int(i)] for i in ids[k:k + batch]]
            fed = seq2seq.training_feeds(model, chosen)
            n = float((fed["targets"] != -100).sum())
            total += float(ex.run({k2: v for k2, v in fed.items() if k2 in names})["loss"]) * n
            count += n
        return total / max(count, 1.0)


SPECIAL = ("pad_token_id", "eos_token_id", "decoder_start_token_id")


@dataclass
class PairDistillation(PairCrossEntropy):
    """Distil ``teacher`` into the state's encoder–decoder on ``pairs``: the weighted sum of
    ``response`` (KL to the teacher's softened distributions on every real target slot) and
    ``ce`` (cross-entropy on the targets). The teacher runs forward only, once per micro-batch."""

    teacher: Model | None = None
    losses: dict[str, float] = field(default_factory=lambda: {"response": 1.0})
    temperature: float = 2.0
    teacher_file: str | None = None
    kind: str = "distill"
    _teacher_ex: Executor | None = field(default=None, repr=False)

    def prepare(self, st: TrainState, backends: Sequence[Any]) -> dict[str, Any]:
        from . import checkpoint as ckpt

        t, s = self.teacher, st.model
        assert t is not None, "a teacher is required"
        if not seq2seq.is_encoder_decoder(t):
            raise MinitxError(f"the teacher must be an encoder–decoder to distil on --pairs, not {t.config['arch']}")
        if not set(self.losses) <= {"response", "ce"} or not self.losses:
            raise MinitxError(f"--pairs distillation takes the losses response and ce, got {', '.join(self.losses) or 'none'}")
        if s.vocab_size != t.vocab_size:
            raise MinitxError(f"student vocab_size {s.vocab_size} differs from the teacher's {t.vocab_size}")
        for k in SPECIAL:
            if int(s.config[k]) != int(t.config[k]):
                raise MinitxError(f"student {k} {s.config[k]} differs from the teacher's {t.config[k]}: they must "
                                  "read the same token ids")
        out = super().prepare(st, backends)
        seq2seq.training_feeds(t, self.pairs)   # the pairs fit the teacher's context too
        self._teacher_ex = Executor(t.graph, t.params, backends)
        return {**out, "teacher": ckpt.model_identity(t, self.teacher_file),
                "--loss": ",".join(f"{k}={float(w)!r}" for k, w in sorted(self.losses.items())),
                "--temperature": float(self.temperature)}

    def loss_graph(self, graph: Graph) -> Graph:
        g = graph.copy()
        V = self.teacher.vocab_size if self.teacher is not None else 0
        dtype = g.params[next(iter(g.params))].dtype
        terms = []
        if "response" in self.losses:
            g.inputs += [Value("teacher.logits", ("B", "T", V), dtype), Value("target_mask", ("B", "T"), "int64")]
            g.nodes.append(Node("loss.response", "kl_div", ["logits", "teacher.logits", "target_mask"],
                                ["loss.response"], {"temperature": float(self.temperature)}))
            terms.append("loss.response")
        if "ce" in self.losses:
            g.inputs.append(Value("targets", ("B", "T"), "int64"))
            g.nodes.append(Node("loss.ce", "cross_entropy", ["logits", "targets"], ["loss.ce"], {"ignore_index": -100}))
            terms.append("loss.ce")
        parts = []
        for name in terms:
            g.nodes.append(Node(f"{name}.weighted", "scale", [name], [f"{name}.weighted"],
                                {"factor": float(self.losses[name[5:]])}))
            parts.append(f"{name}.weighted")
        total = parts[0]
        for k, p in enumerate(parts[1:]):
            g.nodes.append(Node(f"loss.sum{k}", "add", [total, p], [f"loss.sum{k}"], {}))
            total = f"loss.sum{k}"
        g.nodes.append(Node("loss", "scale", [total], ["loss"], {"factor": 1.0}))
        g.outputs = ["loss", *terms]
        g.validate()
        return g

    def extra_feeds(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """The student's inputs for the pairs ``x[:, 0]``, the teacher's logits on the same pairs
        and the mask of real target slots."""
        assert self.model is not None and self.teacher is not None and self._teacher_ex is not None, "prepare() first"
        chosen = [self.pairs[int(i)] for i in x[:, 0]]
        fed = seq2seq.training_feeds(self.model, chosen)
        t_fed = seq2seq.training_feeds(self.teacher, chosen)
        t_names = {v.name for v in self.teacher.graph.inputs}
        t_logits = self._teacher_ex.run({k: v for k, v in t_fed.items() if k in t_names}, outputs=["logits"])["logits"]
        names = {v.name for v in self.model.graph.inputs} | {"targets"}
        out = {k: v for k, v in fed.items() if k in names}
        if "response" in self.losses:
            out["teacher.logits"] = t_logits
            out["target_mask"] = (fed["targets"] != -100).astype(np.int64)
        return out
