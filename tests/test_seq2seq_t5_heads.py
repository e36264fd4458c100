"""Heads pruning of T5's self-attention: its relative-position table gives head h the same bias
column in every layer of a stack, so a stack keeps one set of heads — those with the largest
importance summed over its layers — and the table keeps their columns.

The check is independent of the rewrite: removing heads must equal the unpruned graph with those
heads' rows of the output projection zeroed (their bias columns then do not matter).
"""
from __future__ import annotations

import numpy as np
import pytest

from minitx import models, plugin, seq2seq
from minitx.model import Model
from minitx.validate import Calibration


@pytest.fixture(scope="module")
def pruned():
    m = Model.from_config({**models.preset("t5", "tiny"), "n_ctx": 32}, seed=0)
    return m, plugin.optimize(m, ["sparsity:weights=heads,sparsity=0.5"], calib=Calibration.random(2, 12), force=True)


def test_each_stack_keeps_one_set_of_heads_and_its_bias_columns(pruned):
    m, new = pruned
    H = m.config["n_heads"]
    kept = {}
    for n in new.graph.nodes:
        if n.op == "cross_attention" and ".attn." in n.name:
            assert n.attrs["n_heads"] == H // 2
            kept.setdefault(n.name.startswith("enc."), set()).add(tuple(n.tags["kept_kv_groups"]))
    assert sorted(kept) == [False, True] and all(len(s) == 1 for s in kept.values())   # one set per stack
    for stack, table in ((True, "enc.relpos.weight"), (False, "dec.relpos.weight")):
        (heads,) = kept[stack]
        rp = next(n for n in new.graph.nodes if n.op == "relative_position_bias" and n.name.startswith(
            "enc." if stack else "dec."))
        np.testing.assert_array_equal(new.params[rp.inputs[0]], m.params[table][:, list(heads)])
    A = 2 * m.config["d_kv"]   # the decoder's self-attention cache narrows with the heads
    assert all(v.shape[-1] == A for v in new.graph.inputs if v.name.startswith("past."))


def test_pruned_equals_the_unpruned_graph_with_those_heads_zeroed(pruned):
    m, new = pruned
    H = m.config["n_heads"]
    zeroed = {k: np.array(a, copy=True) for k, a in m.params.items()}
    for n in new.graph.nodes:
        if "kept_kv_groups" in n.tags:
            w = zeroed[n.name.replace(".sdpa.heads", ".out.weight")]
            D = w.shape[0] // H
            for h in set(range(H)) - set(n.tags["kept_kv_groups"]):
                w[h * D:(h + 1) * D] = 0
    ref = Model(dict(m.config), zeroed, m.graph)
    src, tgt = [[5, 6, 7, 8, 9], [3, 4]], [[0, 11, 12], [0, 7, 8]]
    a, b = seq2seq.logits(new, src, tgt), seq2seq.logits(ref, src, tgt)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())
    assert seq2seq.generate(new, src, 6, beams=2) == seq2seq.generate(ref, src, 6, beams=2)
    # quantization after pruning, int8 caches included, on numba with no fallback
    q = plugin.optimize(new, ["quant:int8,kv=int8"], force=True)
    assert seq2seq.generate(q, src, 6, beams=2, backends=("numba",), strict=True) == seq2seq.generate(q, src, 6, beams=2)
