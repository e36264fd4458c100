"""Shared fixtures: tiny models of each family, in float32 and float64."""
from __future__ import annotations

import numpy as np
import pytest

from minitx import models
from minitx.ir import Graph
from minitx.model import Model


def as_float64(model: Model) -> Model:
    """The same model computing in float64 (for finite-difference checks)."""
    g = model.graph.copy()
    for v in list(g.inputs) + list(g.params.values()):
        if v.dtype == "float32":
            v.dtype = "float64"
    params = {k: a.astype(np.float64) if a.dtype == np.float32 else a for k, a in model.params.items()}
    return Model(model.config, params, g, model.tokenizer_json)


@pytest.fixture
def interrupt_at(monkeypatch):
    """``interrupt_at(n)``: from now on, a training run's progress line raises KeyboardInterrupt
    right after reporting step ``n`` (a Ctrl-C at a known step, for the resume tests;
    ``monkeypatch.undo()`` disarms it)."""
    from minitx.training.progress import ProgressLine

    real = ProgressLine.__call__

    def arm(step: int) -> None:
        def interrupted(self, rec):
            real(self, rec)
            if rec["step"] == step:
                raise KeyboardInterrupt

        monkeypatch.setattr(ProgressLine, "__call__", interrupted)

    return arm


@pytest.fixture(params=["gpt2", "llama", "bert"])
def arch(request) -> str:
    return request.param


@pytest.fixture
def tiny(arch) -> Model:
    return Model.from_config(models.preset(arch, "tiny"), seed=1)


def graph_roundtrip(g: Graph) -> Graph:
    return Graph.from_json(g.to_json())
