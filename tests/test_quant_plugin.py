"""The quant plugin end to end: rewrite, validation, smaller files, save/load, decode, kernels."""
import os

import numpy as np
import pytest

from minitx import generate as gen
from minitx import models, modelfile, plugin
from minitx.errors import MinitxError
from minitx.model import Model
from minitx.validate import Calibration

CAL = Calibration.random(2, 16)


@pytest.fixture(scope="module")
def gpt2():
    return Model.from_config(models.preset("gpt2", "tiny"), seed=0)


@pytest.fixture(scope="module")
def bert():
    return Model.from_config(models.preset("bert", "tiny"), seed=0)


@pytest.mark.parametrize("spec,ops,max_ratio", [
    ("quant:int8", {"linear_q8", "embedding_q8"}, 0.30),
    ("quant:int8_block", {"linear_q8_block", "embedding_q8"}, 0.32),
    ("quant:w8a8", {"linear_w8a8", "embedding_q8"}, 0.30),
    ("quant:int4,group=32", {"linear_q4", "embedding_q8"}, 0.25),
    ("quant:float16", {"linear_cast"}, 0.70),
    ("quant:bfloat16", {"linear_cast"}, 0.70),
])
def test_modes_shrink_and_stay_within_tolerance(gpt2, bert, spec, ops, max_ratio):
    for m in (gpt2, bert):
        new = plugin.optimize(m, [spec], calib=CAL)
        rep = new.meta["rewrites"][-1]
        assert rep["validation"]["passed"], rep["validation"]["failure"]
        assert ops <= {n.op for n in new.graph.nodes}
        assert "linear" not in {n.op for n in new.graph.nodes}
        assert rep["bytes_after"] <= max_ratio * rep["bytes_before"] + 0.32 * 4 * sum(
            a.size for k, a in m.params.items() if "norm" in k or k.endswith("bias") or "emb" in k) * (
            "float" in spec)
        cos = rep["validation"]["outputs"][0]["min_row_cosine"]
        assert cos >= plugin.get_plugin("quant").tolerance(rep["options"]).min_cosine
        assert rep["validation"]["layers"] and "shadow" in rep["validation"]["layers"][0]


def test_saved_model_loads_and_decodes(gpt2, tmp_path):
    new = plugin.optimize(gpt2, ["quant:int4,kv=int8"], calib=CAL)
    path = tmp_path / "q.npz"
    modelfile.save(new, path)
    modelfile.save(gpt2, tmp_path / "f.npz")
    back = modelfile.load(path)
    assert back.graph.to_json() == new.graph.to_json()
    assert back.params["layers.0.mlp.up.weight.q"].dtype == np.uint8 and back.params["tok_emb.weight.q"].dtype == np.int8
    assert back.meta["rewrites"][0]["validation"]["passed"]
    assert os.path.getsize(path) * 4 < os.path.getsize(tmp_path / "f.npz")
    # the int8 cache: past inputs are int8 with per-head scales, and decoding works step by step
    assert {v.dtype for v in back.graph.inputs if v.name.startswith("past.") and v.name.endswith(".k")} == {"int8"}
    ref = gen.generate(gpt2, [[5, 6, 7], [8, 9]], 6)
    out = gen.generate(back, [[5, 6, 7], [8, 9]], 6)
    assert len(out[0]) == len(ref[0]) == 6
    st = gen.empty_state(back, 1)
    _, st = gen.step(back, np.array([[1, 2, 3]]), st)
    assert st.past["past.0.k"].dtype == np.int8 and st.past["past.0.k_scale"].shape == (1, 3, 4)


def test_kv8_decode_matches_prefill(gpt2):
    """Token-by-token decoding over the int8 cache equals one prefill (the new tokens are
    quantized in the same step), so the cache is used consistently."""
    new = plugin.optimize(gpt2, ["quant:kv8"], calib=CAL)
    ids = np.array([[3, 1, 4, 1, 5]])
    full, _ = gen.step(new, ids, gen.empty_state(new, 1))
    st = gen.empty_state(new, 1)
    rows = []
    for t in range(ids.shape[1]):
        lg, st = gen.step(new, ids[:, t:t + 1], st)
        rows.append(lg[:, 0])
    np.testing.assert_allclose(np.stack(rows, 1), full, rtol=1e-4, atol=1e-5)
    ref, _ = gen.step(gpt2, ids, gen.empty_state(gpt2, 1))
    assert not np.array_equal(full, ref) and np.abs(full - ref).max() < 0.05 * np.abs(ref).max()


def test_tolerance_refuses_unless_forced(gpt2):
    with pytest.raises(MinitxError, match="exceeds its declared tolerance.*--force"):
        plugin.optimize(gpt2, ["quant:int4,group=64,min_cosine=1.0"], calib=CAL)
    warnings = []
    new = plugin.optimize(gpt2, ["quant:int4,group=64,min_cosine=1.0"], calib=CAL, force=True,
                          warn=warnings.append)
    assert len(warnings) == 1 and "kept because of --force" in warnings[0]
    assert new.meta["rewrites"][0]["validation"]["passed"] is False


def test_group_not_dividing_is_a_clear_error(gpt2):
    with pytest.raises(MinitxError, match=r"group size 48 does not divide the 64 input features of layers\.0"):
        plugin.optimize(gpt2, ["quant:int4,group=48"], calib=CAL)


def test_skip_and_embeddings_options(gpt2):
    new = plugin.optimize(gpt2, ["quant:int8,embeddings=false,skip=layers.1.*"], calib=CAL)
    ops = {n.name: n.op for n in new.graph.nodes}
    assert ops["layers.1.mlp.up"] == "linear" and ops["layers.0.mlp.up"] == "linear_q8"
    assert ops["tok_emb"] == "embedding" and new.params["tok_emb.weight"].dtype == np.float32


def test_numba_kernels_match_spec():
    pytest.importorskip("numba")
    from minitx.backends.numba_cpu import quant as nq
    from minitx.ops import quant as Q
    rng = np.random.default_rng(1)
    W = rng.standard_normal((128, 96)).astype(np.float32)
    b = rng.standard_normal(96).astype(np.float32)
    for rows in (1, 3, 20):  # decode kernel and the tiled BLAS path
        x = rng.standard_normal((1, rows, 128)).astype(np.float32)
        for op, (q, s), attrs in [("linear_q8", Q.quantize_per_channel(W), {}),
                                  ("linear_q8_block", Q.quantize_blocks(W, 32), {"block": 32}),
                                  ("linear_q4", Q.quantize_int4(W, 32), {"group": 32}),
                                  ("linear_w8a8", Q.quantize_per_channel(W), {})]:
            ref = getattr(Q, op)(x, q, s, b, **attrs)
            np.testing.assert_allclose(nq.KERNELS[op](x, q, s, b, **attrs), ref, rtol=1e-4, atol=1e-4, err_msg=op)
        q, s = Q.quantize_per_channel(W, axis=1)  # tied LM head: (vocab, d) table read transposed
        xt = x[..., :96].copy()
        np.testing.assert_allclose(nq.linear_q8(xt, q, s, transposed=True), Q.linear_q8(xt, q, s, transposed=True),
                                   rtol=1e-4, atol=1e-4)


def test_quantized_model_runs_on_numba_backend(gpt2):
    pytest.importorskip("numba")
    new = plugin.optimize(gpt2, ["quant:int8"], calib=CAL)
    ex = new.executor(("numba",))
    placed = {op: b for _, op, b in ex.explain()}
    assert placed["linear_q8"] == "numba"
    from minitx.validate import feeds_for
    f = feeds_for(new.graph, [1, 2, 3])
    np.testing.assert_allclose(ex.run(f)["logits"], new.executor().run(f)["logits"], rtol=1e-4, atol=1e-4)
