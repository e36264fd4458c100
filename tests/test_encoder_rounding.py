"""GPTQ-style int4 rounding (minitx/training/rounding.py): it lowers the layer's output error
on the inputs it was measured on below round-to-nearest's, and ``quant:int4``'s packing keeps
its codes (same scales, same values) — so QAT and conversion start where it left off."""
from __future__ import annotations

import numpy as np
import pytest

from minitx import models, plugin
from minitx.model import Model
from minitx.ops.fakequant import fake_quant
from minitx.ops.quant import dequantize_blocks, quantize_int4, unpack_int4
from minitx.training import rounding


def correlated(rng, n, d):
    """Inputs with strongly correlated features (as a layer's activations are): where GPTQ's
    error compensation has something to work with."""
    base = rng.standard_normal((n, d // 4))
    return np.repeat(base, 4, axis=1) + 0.3 * rng.standard_normal((n, d))


@pytest.mark.parametrize("group,act_order", [(16, False), (32, False), (32, True)])
def test_gptq_beats_round_to_nearest_and_repacks_to_its_own_codes(group, act_order):
    rng = np.random.default_rng(0)
    x = correlated(rng, 512, 64) * rng.uniform(0.2, 3.0, 64)     # features of unequal size: act order matters
    w = (0.05 * rng.standard_normal((64, 24))).astype(np.float32)
    g = rounding.gptq_int4(w, x.T @ x, group, act_order=act_order)
    q, s = quantize_int4(g, group)
    packed = dequantize_blocks(unpack_int4(q), s, group)
    _, s0 = quantize_int4(w, group)
    np.testing.assert_array_equal(s, s0)                      # the scales are the float weights' own
    assert rounding.check_repacks(g, group) == 0.0            # every other weight packs to itself
    err = lambda v: float(np.square(x @ (w.astype(np.float64) - v)).sum())   # noqa: E731
    rtn = err(fake_quant(w, bits=4, group=group).astype(np.float64))
    assert err(packed.astype(np.float64)) < 0.8 * rtn, (err(packed), rtn)


def test_round_linears_on_an_encoder_lowers_the_int4_embedding_error():
    cfg = models.complete_config({**models.preset("bert", "tiny")})
    m = Model.from_config(cfg, seed=0)
    rng = np.random.default_rng(1)
    sents = [list(rng.integers(5, cfg["vocab_size"], int(n))) for n in rng.integers(6, 20, 48)]
    r = rounding.round_linears(m, sents, group=32)
    assert set(r.params) == set(m.params)
    assert all(rounding.check_repacks(r.params[n.inputs[1]], 32) == 0.0 for n in r.graph.nodes if n.op == "linear")
    from minitx.generate import embed

    ref = embed(m, sents)
    err = {}
    for name, start in (("nearest", m), ("gptq", r)):
        e = embed(plugin.optimize(start, ["quant:int4,embeddings=false"], force=True), sents)
        err[name] = float(np.square(e - ref).sum())
    assert err["gptq"] < err["nearest"], err
