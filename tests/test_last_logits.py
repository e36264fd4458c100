"""Generation's LM head on the last position only (minitx/generate.py, ``last_logits_graph``): the
rewritten graph returns exactly the last row of the full graph's logits — for plain, tied,
quantized, low-rank and sparse models, padded batches, prefill and decode, on every host backend
(ONNX Runtime included: the op exports as a Slice) — and
leaves a head it cannot prove row-wise alone."""
from __future__ import annotations

import numpy as np
import pytest

from minitx import generate as gen
from minitx import models, plugin
from minitx.ir import Node
from minitx.model import Model
from minitx.rewrite import check


def _model(arch: str, *plugins: str) -> Model:
    m = Model.from_config(models.complete_config(models.preset(arch, "tiny")), seed=3)
    return plugin.optimize(m, list(plugins), validate=False) if plugins else m


CASES = [("gpt2",), ("llama",), ("gpt2", "quant:int8"), ("llama", "quant:int4,group=16"), ("llama", "lowrank:rank=8"),
         ("llama", "sparsity:weights=magnitude,sparsity=0.5")]


@pytest.mark.parametrize("case", CASES, ids=["+".join(c) for c in CASES])
@pytest.mark.parametrize("backend", ["numpy", "numba", "onnxruntime"])
def test_last_logits_are_the_last_row_of_the_full_logits(case, backend):
    if backend != "numpy":
        pytest.importorskip(backend)
    m = _model(*case)
    g = gen.last_logits_graph(m.graph, m.params)
    check(g, m.params)
    head = g.producers()["logits"]
    assert g.producers()[head.inputs[0]].op == "last_positions"      # the rewrite fired
    placed = {op: b for _, op, b in m.executor((backend,), last_logits=True).explain()}
    assert placed["last_positions"] == backend                         # no fallback to the spec for it
    ids = np.array([[0, 0, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6]])
    mask = (np.arange(6) >= np.array([[2], [0]])).astype(np.int64)    # row 0 left-padded
    full, st_full = gen.step(m, ids, gen.empty_state(m, 2), mask, (backend,))
    last, st_last = gen.step(m, ids, gen.empty_state(m, 2), mask, (backend,), last=True)
    assert last.shape == (2, 1, full.shape[-1])
    np.testing.assert_allclose(last[:, 0], full[:, -1], rtol=1e-5, atol=1e-5)
    for k in st_full.past:                                            # the caches are the same too
        np.testing.assert_array_equal(np.asarray(st_last.past[k]), np.asarray(st_full.past[k]))
    nxt = full[:, -1].argmax(-1)[:, None]
    full2, _ = gen.step(m, nxt, st_full, None, (backend,))
    last2, _ = gen.step(m, nxt, st_last, None, (backend,), last=True)
    np.testing.assert_allclose(last2, full2, rtol=1e-5, atol=1e-5)


def test_generate_uses_the_last_position_and_matches_full_logits_greedy():
    m = _model("gpt2")
    prompts = [[5, 6, 7], [1, 2, 3, 4, 9]]
    got = gen.generate(m, prompts, max_new_tokens=6)
    assert any(k[2] for k in m._executors)           # generate ran the last-logits graph
    # the same greedy loop on the full logits, by hand
    ids, mask = gen.left_pad(prompts)
    logits, st = gen.step(m, ids, gen.empty_state(m, 2), mask)
    want: list[list[int]] = [[], []]
    for _ in range(6):
        nxt = logits[:, -1].argmax(-1)
        for r in range(2):
            want[r].append(int(nxt[r]))
        logits, st = gen.step(m, nxt[:, None], st)
    assert got == want


def test_a_head_that_is_not_row_wise_is_left_alone():
    m = _model("gpt2")
    g = m.graph.copy()
    head = g.producers()["logits"]
    # the head reads a second activation (not a weight): it may mix positions, so no rewrite
    i = g.nodes.index(head)
    g.nodes[i] = Node(head.name, "matmul", [head.inputs[0], head.inputs[0]], list(head.outputs), {"transpose_b": True})
    assert "last_positions" not in {n.op for n in gen.last_logits_graph(g, m.params).nodes}
    assert "last_positions" in {n.op for n in gen.last_logits_graph(m.graph, m.params).nodes}
