"""Low rank: the factorisations (SVD, randomized SVD, activation-aware), Nyström attention and the
plugin's rewrites. Gradient checks of lowrank_linear / nystrom_attention live in test_ops_grad.py."""
from __future__ import annotations

import numpy as np
import pytest

from minitx import models, plugin
from minitx.errors import MinitxError
from minitx.model import Model
from minitx.ops import attention as A
from minitx.ops import lowrank as L
from minitx.plugins import lowrank as LR
from minitx.feeds import build
from minitx.validate import Calibration


def _low_rank_matrix(rng, m, n, r):
    return rng.standard_normal((m, r)) @ rng.standard_normal((r, n))


def test_randomized_svd_recovers_a_low_rank_matrix_and_is_seeded():
    rng = np.random.default_rng(0)
    a = _low_rank_matrix(rng, 60, 40, 5)
    u, s, vt = LR.randomized_svd(a, 5, seed=3)
    np.testing.assert_allclose((u * s) @ vt, a, atol=1e-9)
    np.testing.assert_allclose(s, np.linalg.svd(a, compute_uv=False)[:5], rtol=1e-10)
    assert np.array_equal(LR.randomized_svd(a, 5, seed=3)[0], u)


def test_power_iterations_bring_rsvd_close_to_the_optimal_truncation():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((200, 120)) * (0.9 ** np.arange(120))  # slowly decaying spectrum
    s = np.linalg.svd(a, compute_uv=False)
    best = np.sqrt((s[10:] ** 2).sum())                  # Eckart–Young: the optimal rank-10 error
    err = {q: np.linalg.norm(a - (lambda u, s_, vt: (u * s_) @ vt)(*LR.randomized_svd(a, 10, power_iters=q)))
           for q in (0, 3)}
    assert err[3] < err[0] and err[3] < 1.02 * best


def test_svd_factors_rank_energy_and_errors():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((12, 8))
    u, v = LR.svd_factors(w, 8)
    np.testing.assert_allclose(u @ v, w, atol=1e-12)    # full rank is exact
    s = np.array([3.0, 2.0, 1.0])                        # energies 9/14, 13/14, 1
    assert [LR.rank_for_energy(s, e) for e in (0.5, 0.9, 13 / 14, 0.95, 1.0)] == [1, 2, 2, 3, 3]
    u, v = LR.svd_factors(w, 0.9)
    sv = np.linalg.svd(w, compute_uv=False)
    assert u.shape[1] == LR.rank_for_energy(sv, 0.9) < 8
    with pytest.raises(MinitxError, match=r"rank 9 is larger than w \(12, 8\) allows \(at most 8\)"):
        LR.svd_factors(w, 9, name="w")


def test_whitened_svd_beats_plain_svd_on_the_calibration_activations():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((500, 16)) * np.geomspace(10, 0.01, 16)   # very anisotropic inputs
    w = rng.standard_normal((16, 16))
    plain = np.linalg.norm(x @ (w - np.matmul(*LR.svd_factors(w, 4))))
    aware = np.linalg.norm(x @ (w - np.matmul(*LR.whitened_factors(w, x, 4))))
    assert aware < 0.5 * plain
    u, v = LR.whitened_factors(w, x, 16)
    np.testing.assert_allclose(u @ v, w, atol=1e-8)


def test_lowrank_linear_is_x_u_v_plus_b():
    rng = np.random.default_rng(4)
    x, u, v, b = rng.standard_normal((2, 3, 5)), rng.standard_normal((5, 2)), rng.standard_normal((2, 4)), rng.standard_normal(4)
    np.testing.assert_allclose(L.lowrank_linear(x, u, v, b), x @ (u @ v) + b, atol=1e-12)


def test_nystrom_with_a_landmark_per_position_is_exact_and_approximate_below():
    rng = np.random.default_rng(5)
    B, T, H, KV, D = 2, 8, 4, 2, 4
    q = rng.standard_normal((B, T, H * D)) * 0.5
    k, v = rng.standard_normal((B, T, KV * D)) * 0.5, rng.standard_normal((B, T, KV * D))
    mask = np.ones((B, T), np.int64)
    mask[1, -3:] = 0
    a = dict(n_heads=H, n_kv_heads=KV, causal=False)
    dense = A.attention(q, k, v, None, None, mask, **a)[0]
    exact = L.nystrom_attention(q, k, v, None, None, mask, n_landmarks=T, pinv_iters=40, **a)[0]  # converged
    np.testing.assert_allclose(exact[0], dense[0], atol=1e-10)
    np.testing.assert_allclose(exact[1, :5], dense[1, :5], atol=1e-10)   # real tokens of the padded sequence
    approx = L.nystrom_attention(q, k, v, None, None, mask, n_landmarks=4, **a)[0]
    err = np.abs(approx[0] - dense[0]).max()
    assert 1e-6 < err < 0.5 * np.abs(dense[0]).max()
    with pytest.raises(MinitxError, match="does not support causal"):
        L.nystrom_attention_infer([q.shape, k.shape, v.shape, None, None, None], ["float64"] * 3 + [None] * 3,
                                  n_heads=H, n_kv_heads=KV, causal=True, n_landmarks=4)


def test_iterative_pinv_converges_to_the_moore_penrose_inverse():
    rng = np.random.default_rng(6)
    a = np.exp(rng.standard_normal((3, 6, 6)))
    a /= a.sum(axis=-1, keepdims=True)                       # softmax-like rows, well conditioned
    np.testing.assert_allclose(L.iterative_pinv(a, 40)[-1], np.linalg.pinv(a), atol=1e-8)


def test_nystrom_outputs_stay_in_the_range_attention_can_produce():
    """Attention mixes values convexly; the SVD pinv of the near-singular landmark softmax gave
    outputs hundreds of times larger than any value on inputs like these (issue 18)."""
    rng = np.random.default_rng(7)
    T, H, D = 256, 4, 16
    q, k, v = (rng.standard_normal((1, T, H * D)) for _ in range(3))
    out = L.nystrom_attention(q, k, v, n_landmarks=32, n_heads=H, n_kv_heads=H, causal=False)[0]
    assert np.abs(out).max() <= np.abs(v).max()
    dense = A.attention(q, k, v, n_heads=H, n_kv_heads=H, causal=False)[0]
    cos = (out * dense).sum(-1) / np.linalg.norm(out, axis=-1) / np.linalg.norm(dense, axis=-1)
    assert cos.mean() > 0.7                                   # random attention is not low rank


# ------------------------------------------------------------------ the plugin
@pytest.fixture(scope="module")
def gpt2():
    return Model.from_config(models.preset("gpt2", "tiny"), seed=1)


def _logits(model, ids):
    return model.executor().run(build(model.graph, [ids]))["logits"]


IDS = list(range(5, 37))


@pytest.mark.parametrize("form,ops", [("op", {"lowrank_linear"}), ("two", {"linear"})])
def test_full_rank_factorisation_is_exact(gpt2, form, ops):
    new = plugin.optimize(gpt2, [f"lowrank:rank=64,form={form}"], validate=False)
    fired = new.meta["rewrites"][-1]["fired"]
    assert fired == {"lowrank.svd": 8}
    assert {n.op for n in new.graph.nodes if "lowrank" in n.name} == ops
    np.testing.assert_allclose(_logits(new, IDS), _logits(gpt2, IDS), atol=1e-4)


def test_per_type_truncation_and_size(gpt2):
    new = plugin.optimize(gpt2, ["lowrank:qkv=none,out=8,mlp=0.5"], validate=False)
    assert "layers.0.attn.qkv.weight" in new.params
    assert new.params["layers.0.attn.out.lowrank.u"].shape == (64, 8)
    assert new.graph.node("layers.1.mlp.up.lowrank").tags["rank"] < 64
    assert new.nbytes() < gpt2.nbytes()


def test_whitened_plugin_is_closer_than_plain_svd_on_calibration_data(gpt2):
    rows = {}
    for method in ("svd", "whiten"):
        new = plugin.optimize(gpt2, [f"lowrank:rank=16,method={method}"], force=True)
        rows[method] = new.meta["rewrites"][-1]["validation"]["outputs"][0]["cosine"]
    assert rows["whiten"] > rows["svd"]


def test_whitening_uses_the_calibration_given(gpt2):
    """The whitened factors are those of the layer inputs on exactly the sequences given."""
    ids = [[7, 3, 99, 4, 12, 5, 6, 200, 1]]
    new = plugin.optimize(gpt2, ["lowrank:rank=16,method=whiten"], calib=Calibration(ids=ids, source="ids"),
                          validate=False)
    node = gpt2.graph.node("layers.0.mlp.up")
    x = gpt2.executor().run(build(gpt2.graph, [ids[0]]), keep=[node.inputs[0]])[node.inputs[0]]
    U, V = LR.whitened_factors(gpt2.params[node.inputs[1]], x, 16)
    np.testing.assert_allclose(new.params["layers.0.mlp.up.lowrank.u"] @ new.params["layers.0.mlp.up.lowrank.v"],
                               U @ V, rtol=1e-4, atol=1e-5)
    other = plugin.optimize(gpt2, ["lowrank:rank=16,method=whiten"], calib=Calibration(ids=[[1, 2, 3, 4, 5, 6]]),
                            validate=False)
    assert not np.allclose(other.params["layers.0.mlp.up.lowrank.u"], new.params["layers.0.mlp.up.lowrank.u"])
    cal = new.meta["rewrites"][-1]["calibration"]
    # a single sequence cannot be held out: it is fitted on (and validated on, as the report says)
    assert cal == {"source": "ids: 1 of 1 real sequences", "sequences": 1, "tokens": 9, "random_sequences": 0,
                   "random": False}
    warnings: list[str] = []
    rand = plugin.optimize(gpt2, ["lowrank:rank=16,method=whiten"], validate=False, warn=warnings.append)
    assert rand.meta["rewrites"][-1]["calibration"]["random"] and "random tokens" in warnings[0]
    svd = plugin.optimize(gpt2, ["lowrank:rank=16"], validate=False, warn=warnings.append)
    assert "calibration" not in svd.meta["rewrites"][-1] and len(warnings) == 1


def test_nystrom_rewrites_only_non_causal_attention():
    bert = Model.from_config(models.preset("bert", "tiny"), seed=0)
    new = plugin.optimize(bert, ["lowrank:attention=nystrom,landmarks=4,qkv=none,out=none,mlp=none"],
                          validate=False)
    assert sum(n.op == "nystrom_attention" for n in new.graph.nodes) == bert.config["n_layers"]
    gpt = plugin.optimize(Model.from_config(models.preset("gpt2", "tiny")),
                          ["lowrank:attention=nystrom,qkv=none,out=none,mlp=none"], validate=False)
    assert not any(n.op == "nystrom_attention" for n in gpt.graph.nodes)


@pytest.mark.parametrize("spec,msg", [
    ("lowrank:rank=65", r"rank 65 is larger than layers\.0\.attn\.qkv\.weight \(64, 192\)"),
    ("lowrank:rank=0", "must be a positive integer"),
    ("lowrank:energy=1.5", r"must be in \(0, 1\]"),
    ("lowrank:qkv=lots", "bad value 'lots' for qkv"),
    ("lowrank:method=qr,rank=4", "bad value 'qr' for method"),
    ("lowrank", "nothing to do"),
])
def test_bad_options_are_one_line_errors(gpt2, spec, msg):
    with pytest.raises(MinitxError, match=msg) as e:
        plugin.optimize(gpt2, [spec])
    assert "\n" not in str(e.value)


def test_declared_tolerance_passes_rank_64_and_refuses_rank_2_on_a_trained_decoder():
    """The bundled Austen decoder, validated on text held out from what whitening calibrated on."""
    from minitx import modelfile
    from minitx.bundled import default_model_path

    m = modelfile.load(default_model_path())
    cal = Calibration(texts=[
        "She had not the least wish to be married herself, and could not imagine why anybody should think it a duty.",
        "It was a pleasant evening, and the whole party walked together to the end of the garden.",
        "Her sister was very much in love with a young man of good family, but of no fortune.",
        "There was no time for reflection; the letter must be answered at once, and she sat down to write it.",
    ], source="4 passages")
    good = plugin.optimize(m, ["lowrank:rank=64,method=whiten"], calib=cal)
    v = good.meta["rewrites"][-1]["validation"]
    assert v["passed"] and v["disjoint"] and v["n_sequences"] == 1 and v["outputs"][0]["kl"] < 0.01
    assert good.meta["rewrites"][-1]["calibration"]["sequences"] == 3
    with pytest.raises(MinitxError, match=r"lowrank:rank=2: exceeds its declared tolerance — logits mean cosine "
                                          r"[0-9.]+ < min_cosine 0.95; logits mean KL [0-9.]+ > max_kl 0.05"):
        plugin.optimize(m, ["lowrank:rank=2"], calib=cal)
