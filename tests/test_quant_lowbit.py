"""Binary, ternary, 2-bit and power-of-two weights: the packed formats against independent
definitions, the quant plugin's modes, the numba kernel, and quantization-aware training."""
import numpy as np
import pytest
from test_qat import _settings, trained  # noqa: F401 — trained: the float model fixture test_qat trains

from minitx import modelfile, models, plugin
from minitx import training as tr
from minitx.executor import Executor
from minitx.model import Model
from minitx.ops import quant as Q
from minitx.training import qat

rng = np.random.default_rng(0)


def test_binary_and_ternary_follow_xnor_and_twn():
    w = rng.standard_normal((6, 64))
    for name in ("binary", "ternary"):
        q, s = Q.quantize_lut(w, name, 32)
        got = Q.dequantize_lut(q, s.astype(np.float64), name, 32)
        g = w.reshape(6, 2, 32)
        if name == "binary":       # sign(w) · mean|w| per group
            want = np.sign(g) * np.abs(g).mean(-1, keepdims=True)
        else:                      # TWN: zero below 0.7·mean|w|, the rest sign · mean of the kept |w|
            keep = np.abs(g) > 0.7 * np.abs(g).mean(-1, keepdims=True)
            alpha = (np.abs(g) * keep).sum(-1, keepdims=True) / keep.sum(-1, keepdims=True)
            want = np.sign(g) * keep * alpha
        np.testing.assert_allclose(got, want.reshape(6, 64), rtol=1e-6)
        assert q.nbytes == w.size * Q.CODEBOOKS[name][0] // 8        # 1 or 2 bits per weight


def test_log4_is_the_nearest_power_of_two_in_the_log_domain():
    w = rng.standard_normal((4, 32)) * np.exp(rng.uniform(-4, 0, (4, 32)))
    q, s = Q.quantize_lut(w, "log4", 32)
    got = Q.dequantize_lut(q, s.astype(np.float64), "log4", 32)
    m = np.abs(w).max(1, keepdims=True)
    e = np.round(np.log2(m / np.abs(w)))
    want = np.where(e > 6, 0.0, np.sign(w) * m * 2.0 ** -np.minimum(e, 6))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    r = got[got != 0] / np.repeat(s, 32, 1)[got != 0]
    assert np.allclose(np.log2(np.abs(r)), np.round(np.log2(np.abs(r))))   # every weight a power of two times s
    assert q.nbytes == w.size // 2


def test_int2_beats_max_abs_scaling_and_round_trips():
    w = rng.standard_normal((16, 128))
    q, s = Q.quantize_lut(w, "int2", 32)
    got = Q.dequantize_lut(q, s.astype(np.float64), "int2", 32)
    assert set(np.unique(np.round(got / np.repeat(s, 32, 1), 6))) <= {-1.5, -0.5, 0.5, 1.5}
    g = w.reshape(16, 4, 32)
    sm = np.abs(g).max(-1, keepdims=True) / 1.5            # max-abs scale on the same levels
    naive = (np.clip(np.floor(g / sm), -2, 1) + 0.5) * sm
    assert np.linalg.norm(got - w) < 0.85 * np.linalg.norm(naive.reshape(w.shape) - w)
    assert np.array_equal(Q.unpack_codes(Q.pack_codes(Q.unpack_codes(q, 2), 2), 2), Q.unpack_codes(q, 2))


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_pack_codes_layout(bits):
    codes = rng.integers(0, 1 << bits, (3, 16)).astype(np.uint8)
    packed = Q.pack_codes(codes, bits)
    assert packed.shape == (3, 16 * bits // 8)
    per = 8 // bits
    assert packed[1, 0] == sum(int(codes[1, j]) << (j * bits) for j in range(per))
    assert np.array_equal(Q.unpack_codes(packed, bits), codes)


@pytest.fixture(scope="module")
def gpt2():
    return Model.from_config(models.preset("gpt2", "tiny"), seed=0)


@pytest.mark.parametrize("mode", list(Q.CODEBOOKS))
def test_modes_pack_every_linear_and_save(gpt2, mode, tmp_path):
    new = plugin.optimize(gpt2, [f"quant:{mode},group=16"], validate=False)
    luts = [n for n in new.graph.nodes if n.op == "linear_lut"]
    assert len(luts) == sum(n.op == "linear" for n in gpt2.graph.nodes) and "linear" not in {n.op for n in new.graph.nodes}
    bits = Q.CODEBOOKS[mode][0]
    for n in luts:
        w_float = gpt2.params[n.inputs[1][:-2]]
        assert new.params[n.inputs[1]].nbytes * 8 == w_float.size * bits
    modelfile.save(new, tmp_path / "m.npz")
    back = modelfile.load(tmp_path / "m.npz")
    x = rng.integers(0, gpt2.vocab_size, (2, 12))
    from minitx import feeds
    f = feeds.build(gpt2.graph, x.tolist())
    spec = Executor(new.graph, new.params, backends=("numpy",)).run(f, outputs=["logits"])["logits"]
    fast = Executor(back.graph, back.params, backends=("numba", "numpy"), strict=False).run(f, outputs=["logits"])["logits"]
    assert np.abs(spec - fast).max() <= 1e-4 * np.abs(spec).max()


@pytest.mark.parametrize("mode", ["ternary", "binary"])
def test_qat_recovers_ternary_and_binary(trained, mode):
    m, ids = trained
    spec = f"quant:{mode},group=32,embeddings=false"
    s = _settings(steps=40, lr=3e-3, min_lr=3e-4, warmup=3)
    val = qat.held_out(ids, s, m.n_ctx)
    res = qat.run(m, ids, spec, s, force=True)
    ppl = lambda mm: tr.evaluate(mm, val)["perplexity"]
    # the fair control: the same steps in float (same batches, schedule), then post-training quantization
    ctrl = tr.new_state(Model(m.config, {k: a.copy() for k, a in m.params.items()}, m.graph), s)
    tr.fit(ctrl, ids)
    p_float, p_ptq, p_qat = ppl(m), ppl(plugin.optimize(m, [spec], validate=False)), ppl(res.packed)
    p_ctrl = ppl(plugin.optimize(ctrl.model, [spec], validate=False))
    print(f"{mode}: held-out perplexity float {p_float:.3f}, PTQ {p_ptq:.3f}, float fine-tune + PTQ {p_ctrl:.3f}, "
          f"QAT {p_qat:.3f}")
    assert p_ptq > p_float and p_qat < p_ptq
    assert p_qat < p_ctrl                  # not only because of the extra training
    assert "linear_lut" in {n.op for n in res.packed.graph.nodes}
    assert res.packed_vs_fake_quant <= 1e-5
