"""The objective of ``minitx train --pairs``: an encoder–decoder on source<TAB>target pairs.

:func:`minitx.training.loop.fit` draws random windows of a token stream; here the "stream" is the
pairs' indices (:func:`stream`) and a window is one index (:meth:`PairCrossEntropy.context` is 1),
so each batch row is a pair drawn by the loop's own seeded generator. That keeps everything the
loop does for every objective — accumulation, clipping, the schedule, precision, checkpoints and
exact resumes, data-parallel slices of the batch — and one loop. The held-out part is the file's
tail (``--val-fraction``), scored as the mean teacher-forced loss per target token.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .. import models, seq2seq
from ..errors import MinitxError
from ..executor import Executor
from ..ir import Graph
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
