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
    ("quant:int8", {"linear_q8_0", "embedding_q8"}, 0.32),
    ("quant:int8_channel", {"linear_q8", "embedding_q8"}, 0.30),
    ("quant:w8a8", {"linear_q8_0", "embedding_q8"}, 0.30),
    ("quant:int4,group=32", {"linear_q4", "embedding_q4"}, 0.25),
    ("quant:int4,embeddings=int8", {"linear_q4", "embedding_q8"}, 0.25),
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
        tol = plugin.get_plugin("quant").tolerance(rep["options"])
        out = rep["validation"]["outputs"][0]
        assert out["mean_row_cosine"] >= tol.min_cosine and out["min_row_cosine"] <= out["mean_row_cosine"]
        assert m is bert or out["kl"] <= tol.max_kl
        assert rep["validation"]["layers"] and "shadow" in rep["validation"]["layers"][0]


def test_saved_model_loads_and_decodes(gpt2, tmp_path):
    new = plugin.optimize(gpt2, ["quant:int4,kv=int8"], calib=CAL)
    path = tmp_path / "q.npz"
    modelfile.save(new, path)
    modelfile.save(gpt2, tmp_path / "f.npz")
    back = modelfile.load(path)
    assert back.graph.to_json() == new.graph.to_json()
    assert back.params["layers.0.mlp.up.weight.q"].dtype == np.uint8 and back.params["tok_emb.weight.q"].dtype == np.uint8
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
    assert len(warnings) == 1 and "kept anyway" in warnings[0]
    assert new.meta["rewrites"][0]["validation"]["passed"] is False


def test_group_not_dividing_is_a_clear_error(gpt2):
    with pytest.raises(MinitxError, match=r"group size 48 does not divide the 64 input features of layers\.0"):
        plugin.optimize(gpt2, ["quant:int4,group=48,embeddings=int8"], calib=CAL)
    with pytest.raises(MinitxError, match=r"group size 48 does not divide the 64 columns of embedding table tok_emb"):
        plugin.optimize(gpt2, ["quant:int4,group=48"], calib=CAL)


def test_skip_and_embeddings_options(gpt2):
    new = plugin.optimize(gpt2, ["quant:int8,embeddings=false,skip=layers.1.*"], calib=CAL)
    ops = {n.name: n.op for n in new.graph.nodes}
    assert ops["layers.1.mlp.up"] == "linear" and ops["layers.0.mlp.up"] == "linear_q8_0"
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
    assert placed["linear_q8_0"] == "numba" and placed["embedding_q8"] == "numba"
    from minitx.feeds import build
    f = build(new.graph, [[1, 2, 3]])
    np.testing.assert_allclose(ex.run(f)["logits"], new.executor().run(f)["logits"], rtol=1e-4, atol=1e-4)


def test_int4_tables_tied_head_and_formats(gpt2):
    """int4 mode: token and position tables are int4 (embedding_q4), the tied LM head reads the
    same packed token table as linear_q4(transposed); embeddings=int8 / int4 / false choose."""
    new = plugin.optimize(gpt2, ["quant:int4,group=32"], calib=CAL)
    nodes = {n.name: n for n in new.graph.nodes}
    assert nodes["tok_emb"].op == "embedding_q4" and nodes["tok_emb"].attrs == {"group": 32}
    head = nodes["lm_head"]
    assert head.op == "linear_q4" and head.attrs == {"group": 32, "transposed": True}
    assert head.inputs[1:3] == nodes["tok_emb"].inputs[1:3]  # one packed copy feeds both
    q = new.params["tok_emb.weight.q"]
    assert q.dtype == np.uint8 and q.shape == (gpt2.config["vocab_size"], gpt2.config["d_model"] // 2)
    assert "tok_emb.weight" not in new.params
    ops8 = {n.name: n.op for n in plugin.optimize(gpt2, ["quant:int4,embeddings=int8"], calib=CAL).graph.nodes}
    assert ops8["tok_emb"] == "embedding_q8" and ops8["lm_head"] == "linear_q8"
    ops4 = {n.name: n.op for n in plugin.optimize(gpt2, ["quant:int8,embeddings=int4"], calib=CAL).graph.nodes}
    assert ops4["tok_emb"] == "embedding_q4" and ops4["lm_head"] == "linear_q4"
    assert ops4["layers.0.mlp.up"] == "linear_q8_0"
    with pytest.raises(MinitxError, match="bad value 'int2' for embeddings"):
        plugin.optimize(gpt2, ["quant:int4,embeddings=int2"], calib=CAL)
    # the int4 table makes the file smaller than with int8 tables
    assert new.meta["rewrites"][-1]["bytes_after"] < 0.9 * plugin.optimize(
        gpt2, ["quant:int4,embeddings=int8"], calib=CAL).meta["rewrites"][-1]["bytes_after"]


def test_int8_blocks_of_32_and_per_channel_weights_stored_out_in(gpt2, bert):
    """int8 is one scale per 32 inputs; where 32 does not divide a layer's inputs (LLaMA-tiny's
    176-wide FFN) that layer gets one scale per channel; a tiny table (token types) stays float."""
    from minitx.ops import quant as Q

    new = plugin.optimize(gpt2, ["quant:int8"], calib=CAL)
    up = next(n for n in new.graph.nodes if n.name == "layers.0.mlp.up")
    assert up.op == "linear_q8_0" and up.attrs == {"block": 32}
    W = gpt2.params["layers.0.mlp.up.weight"]
    np.testing.assert_array_equal(new.params["layers.0.mlp.up.weight.q"], Q.quantize_blocks(W, 32)[0].T)
    llama = Model.from_config(models.preset("llama", "tiny"), seed=0)
    ops = {n.name: n.op for n in plugin.optimize(llama, ["quant:int8"], calib=CAL).graph.nodes}
    assert ops["layers.0.mlp.down"] == "linear_q8" and ops["layers.0.mlp.gate_up"] == "linear_q8_0"
    qb = plugin.optimize(bert, ["quant:int8"], calib=CAL)
    assert qb.params["type_emb.weight"].dtype == np.float32 and "tok_emb.weight" not in qb.params
    new = plugin.optimize(gpt2, ["quant:int8_channel"], calib=CAL)
    up = next(n for n in new.graph.nodes if n.name == "layers.0.mlp.up")
    assert up.attrs == {"transposed": True}
    W = gpt2.params["layers.0.mlp.up.weight"]
    assert new.params["layers.0.mlp.up.weight.q"].shape == W.shape[::-1]


def test_numba_kernels_for_new_ops_match_spec():
    """The decode layouts and the ops that ran on the spec before (embedding lookups, float16 /
    bfloat16 weights, the int8 KV cache) on the numba backend, against the spec."""
    pytest.importorskip("numba")
    from minitx.backends.numba_cpu import quant as nq
    from minitx.ops import quant as Q
    rng = np.random.default_rng(2)
    W = rng.standard_normal((96, 128)).astype(np.float32)  # (out, in)
    for rows in (1, 3, 20):
        x = rng.standard_normal((rows, 128)).astype(np.float32)
        q, s = Q.quantize_per_channel(W, axis=1)
        np.testing.assert_allclose(nq.linear_q8(x, q, s, transposed=True), Q.linear_q8(x, q, s, transposed=True),
                                   rtol=1e-4, atol=1e-4)
        q, s = Q.quantize_int4_rows(W, 32)
        a = dict(group=32, transposed=True)
        np.testing.assert_allclose(nq.linear_q4(x, q, s, **a), Q.linear_q4(x, q, s, **a), rtol=1e-4, atol=1e-4)
        for w in (W.T.astype(np.float16), Q.to_bfloat16_bits(W.T)):
            np.testing.assert_allclose(nq.linear_cast(x, w), Q.linear_cast(x, w), rtol=1e-4, atol=1e-4)
    ids = rng.integers(0, 96, (2, 5))
    q, s = Q.quantize_per_channel(W, axis=1)
    np.testing.assert_array_equal(nq.embedding_q8(ids, q, s), Q.embedding_q8(ids, q, s))
    q, s = Q.quantize_int4_rows(W, 32)
    np.testing.assert_array_equal(nq.embedding_q4(ids, q, s, group=32), Q.embedding_q4(ids, q, s, group=32))
    H, D = 4, 8
    qq, k, v = (rng.standard_normal((2, 1, H * D)).astype(np.float32) for _ in range(3))
    pk, pks = Q.quantize_heads(rng.standard_normal((2, 6, H * D)).astype(np.float32), H)
    pv, pvs = Q.quantize_heads(rng.standard_normal((2, 6, H * D)).astype(np.float32), H)
    mask = np.ones((2, 7), np.int64)
    mask[1, :3] = 0
    args, attrs = (qq, k, v, pk, pks, pv, pvs, mask), dict(n_heads=H, n_kv_heads=H, causal=True)
    for got, ref in zip(nq.attention_kv8(*args, **attrs), Q.attention_kv8(*args, **attrs)):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_int4_and_kv8_model_decodes_on_numba_like_the_spec(gpt2):
    pytest.importorskip("numba")
    new = plugin.optimize(gpt2, ["quant:int4,kv=int8"], calib=CAL)
    placed = {op: b for _, op, b in new.executor(("numba",)).explain()}
    assert placed["embedding_q4"] == placed["attention_kv8"] == placed["linear_q4"] == "numba"
    st_n, st_s = gen.empty_state(new, 1), gen.empty_state(new, 1)
    for ids in ([[5, 6, 7]], [[8]], [[9]]):
        ln, st_n = gen.step(new, np.array(ids), st_n, backends=("numba",))
        ls, st_s = gen.step(new, np.array(ids), st_s)
        np.testing.assert_allclose(ln, ls, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("arch", ["bart", "marian", "t5"])
def test_cross_attention_projections_are_quantized(arch):
    """The cross-attention K/V projection (run once per input on the encoder output), its query
    and output linears are packed like every other linear; teacher-forced logits stay within int8's
    budget of the float model's, and BART/Marian's decoder self-attention cache takes kv=int8."""
    from minitx import seq2seq

    m = Model.from_config(models.preset(arch, "tiny"), seed=0)
    q = plugin.optimize(m, ["quant:int8,kv=int8"], calib=CAL)
    ops = {n.name: n.op for n in q.graph.nodes}
    for i in range(m.config["n_layers"]):
        for part in ("kv", "q", "out"):
            assert ops[f"layers.{i}.cross.{part}"].startswith("linear_q8"), (i, part)
    assert q.meta["rewrites"][-1]["validation"]["passed"]
    assert ("attention_kv8" in ops.values()) == (arch != "t5")   # T5's cache feeds cross_attention
    src, tgt = [[5, 6, 7, 8, 9, 10]], [[0, 11, 12, 13]]
    a, b = seq2seq.logits(q, src, tgt).ravel(), seq2seq.logits(m, src, tgt).ravel()
    assert np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.999
    assert seq2seq.generate(q, src, 4) and len(seq2seq.generate(q, src, 4)[0]) <= 4


def test_kv8_on_top_of_a_sparse_attention_pattern(gpt2):
    """sparsity:attention=local then quant kv=int8: the pattern stays (sparse_attention_kv8) over
    an int8 cache. Decoding token by token equals one prefill; a window covering the sequence
    equals plain attention over the int8 cache (quant:kv8 alone); a short window does not; the
    numba kernel follows the spec."""
    ids = np.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    local = plugin.optimize(gpt2, ["sparsity:attention=local,window=3", "quant:kv8"], calib=CAL, force=True)
    wide = plugin.optimize(gpt2, ["sparsity:attention=local,window=64", "quant:kv8"], calib=CAL)
    plain = plugin.optimize(gpt2, ["quant:kv8"], calib=CAL)
    assert {n.op for n in local.graph.nodes} >= {"sparse_attention_kv8"}
    assert all(n.attrs["pattern"] == "local" for n in local.graph.nodes if n.op == "sparse_attention_kv8")
    assert wide.meta["rewrites"][-1]["validation"]["passed"]
    full, _ = gen.step(local, ids, gen.empty_state(local, 1))
    st, rows = gen.empty_state(local, 1), []
    for t in range(ids.shape[1]):
        lg, st = gen.step(local, ids[:, t:t + 1], st)
        rows.append(lg[:, 0])
        assert st.past["past.0.k"].dtype == np.int8
    np.testing.assert_allclose(np.stack(rows, 1), full, rtol=1e-4, atol=1e-5)
    ref, _ = gen.step(plain, ids, gen.empty_state(plain, 1))
    np.testing.assert_allclose(gen.step(wide, ids, gen.empty_state(wide, 1))[0], ref, rtol=1e-5, atol=1e-6)
    assert np.abs(full - ref).max() > 1e-3
    pytest.importorskip("numba")
    placed = {op: b for _, op, b in local.executor(("numba",)).explain()}
    assert placed["sparse_attention_kv8"] == "numba"
    st_n, st_s = gen.empty_state(local, 1), gen.empty_state(local, 1)
    for step in ([[5, 6, 7, 8, 9]], [[8]], [[9]]):
        ln, st_n = gen.step(local, np.array(step), st_n, backends=("numba",))
        ls, st_s = gen.step(local, np.array(step), st_s)
        np.testing.assert_allclose(ln, ls, rtol=1e-3, atol=1e-4)
