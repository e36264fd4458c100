"""A model in memory: config, graph, weights and (optionally) its tokenizer."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from . import models
from .backend import Backend
from .errors import MinitxError
from .executor import Executor
from .ir import Graph


@dataclass
class Model:
    config: dict[str, Any]
    params: dict[str, np.ndarray]
    graph: Graph
    tokenizer_json: str | None = None
    # Free-form provenance: where the weights came from, which rewrites were applied, their report.
    meta: dict[str, Any] = field(default_factory=dict)
    _executors: dict = field(default_factory=dict, repr=False, compare=False)
    _tokenizer: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def from_config(cls, config: dict[str, Any], seed: int = 0, tokenizer_json: str | None = None) -> "Model":
        config = models.complete_config(config)
        return cls(config, models.init_params(config, seed), models.build_graph(config), tokenizer_json)

    @classmethod
    def from_preset(cls, arch: str, preset: str = "tiny", seed: int = 0) -> "Model":
        """A randomly initialised model of a preset size, whose meta says how to make it again."""
        model = cls.from_config(models.preset(arch, preset), seed=seed)
        model.meta = {"source": f"minitx init --arch {arch} --preset {preset} --seed {seed}"}
        return model

    @property
    def is_decoder(self) -> bool:
        return models.is_decoder(self.config)

    @property
    def n_ctx(self) -> int:
        return int(self.config["n_ctx"])

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    def executor(self, backends: Sequence[str | Backend] = ("numpy",), strict: bool = False,
                 last_logits: bool = False) -> Executor:
        """An executor for this model's graph, cached per backend list. ``last_logits``: the graph
        rewritten so that the LM head reads only the last position (what generation samples from;
        :func:`minitx.generate.last_logits_graph`)."""
        key = (tuple(b if isinstance(b, str) else b.name for b in backends), strict, last_logits)
        ex = self._executors.get(key)
        if ex is None:
            graph = self.graph
            if last_logits:
                from .generate import last_logits_graph

                graph = last_logits_graph(self.graph, self.params)
            ex = self._executors[key] = Executor(graph, self.params, backends, strict)
        return ex

    @property
    def tokenizer(self):
        """The ``tokenizers.Tokenizer`` stored with the model, or None."""
        if self.tokenizer_json is None:
            return None
        if self._tokenizer is None:
            try:
                from tokenizers import Tokenizer
            except ImportError:
                raise MinitxError("this model carries a tokenizer; install the hf extra: pip install 'minitx[hf]'") from None
            try:
                self._tokenizer = Tokenizer.from_str(self.tokenizer_json)
            except Exception as e:  # the tokenizers library raises its own exception types
                raise MinitxError(f"the model's stored tokenizer is not readable: {str(e)[:200]}") from None
        return self._tokenizer

    def n_params(self) -> int:
        return int(sum(a.size for a in self.params.values()))

    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.params.values()))
