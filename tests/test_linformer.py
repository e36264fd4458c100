"""Linformer: the spec against torch, its VJP (E and F included) against float64 finite
differences, the pooling start, and the plugin (encoders only)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from minitx import models, plugin
from minitx.errors import MinitxError
from minitx.feeds import for_sequences
from minitx.gradcheck import check_vjp
from minitx.model import Model
from minitx.ops import linformer as L
from minitx.ops.cases import CASES

ROOT = __file__.rsplit("/tests/", 1)[0]


@pytest.mark.parametrize("case", [(c.name, c.make) for c in CASES["linformer_attention"]], ids=lambda c: c[0])
def test_linformer_vjp_matches_finite_differences(case):
    inputs, attrs = case[1](np.random.default_rng(0), "float64")
    results = check_vjp("linformer_attention", inputs, attrs, eps=1e-6, rtol=1e-5)
    assert len(results) == 5   # q, k, v, E, F


def _torch_linformer(q, k, v, e, f, mask, H):
    """The paper's formula written in torch, padded keys zeroed before the projection and
    projected rows no real key reaches left out of the softmax."""
    B, T, HD = q.shape
    D = HD // H
    t = lambda a: torch.tensor(a).reshape(B, T, H, D).transpose(1, 2)  # noqa: E731
    qh, kh, vh = t(q), t(k), t(v)
    m = torch.tensor(mask, dtype=torch.float64)[:, None, :, None]
    E, F = torch.tensor(e[:, :T]), torch.tensor(f[:, :T])
    kp, vp = E @ (kh * m), F @ (vh * m)
    live = ((E[None] * m[:, 0, :, 0][:, None, :]) != 0).any(-1)[:, None, None, :]
    s = (qh @ kp.transpose(-1, -2)) / D ** 0.5
    p = torch.softmax(s.masked_fill(~live, float("-inf")), dim=-1)
    return (p @ vp).transpose(1, 2).reshape(B, T, HD).numpy()


def test_linformer_matches_torch_with_learned_projections_and_padding():
    rng = np.random.default_rng(1)
    B, T, H, D, R, N = 3, 11, 2, 8, 6, 16
    q, k, v = (rng.standard_normal((B, T, H * D)) for _ in range(3))
    e, f = (rng.standard_normal((R, N)) / 4 for _ in range(2))
    mask = np.ones((B, T), np.int64)
    mask[1, 8:] = 0
    mask[2, 4:] = 0
    got = L.linformer_attention(q, k, v, e, f, mask, n_heads=H, n_kv_heads=H)[0]
    np.testing.assert_allclose(got, _torch_linformer(q, k, v, e, f, mask, H), rtol=1e-10, atol=1e-12)


def test_pooling_start_is_exact_attention_for_short_inputs_and_block_means_beyond():
    rng = np.random.default_rng(2)
    B, T, H, D = 2, 7, 2, 8
    q, k, v = (torch.tensor(rng.standard_normal((B, T, H * D))) for _ in range(3))
    mask = np.ones((B, T), np.int64)
    mask[1, 5:] = 0
    P = L.pooling_projection(16, 40)          # exact for up to 8 positions
    got = L.linformer_attention(q.numpy(), k.numpy(), v.numpy(), P, P, mask, n_heads=H, n_kv_heads=H)[0]
    sh = lambda a: a.reshape(B, T, H, D).transpose(1, 2)  # noqa: E731
    ref = torch.nn.functional.scaled_dot_product_attention(sh(q), sh(k), sh(v), attn_mask=torch.tensor(
        mask, dtype=torch.bool)[:, None, None, :]).transpose(1, 2).reshape(B, T, H * D).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)
    assert np.allclose(P.sum(axis=1), 1) and (P >= 0).all()     # every row an average of positions
    assert (P[8:, 8:] > 0).sum(axis=1).min() >= 4                 # the far rows pool blocks


def test_longer_than_the_projections_is_a_shape_error():
    q = np.zeros((1, 9, 8))
    with pytest.raises(MinitxError, match="exceed"):
        L.linformer_attention_infer([q.shape, q.shape, q.shape, (4, 8), (4, 8), None], ["float32"] * 6,
                                    n_heads=1, n_kv_heads=1)


@pytest.fixture(scope="module")
def bert():
    return Model.from_config(models.preset("bert", "tiny"), seed=3)


def test_plugin_makes_trainable_projections_per_layer_and_short_inputs_stay_exact(bert):
    new = plugin.optimize(bert, ["attention:map=linformer,k=16"], validate=False)
    ops = [n.op for n in new.graph.nodes]
    assert "attention" not in ops and ops.count("linformer_attention") == bert.config["n_layers"]
    es = sorted(p for p in new.params if p.endswith(".linformer.e"))
    assert len(es) == bert.config["n_layers"] and new.params[es[0]].shape == (16, bert.config["n_ctx"])
    short, long_ = [list(range(3, 10))], [list(range(3, 60))]
    run = lambda m, s: m.executor().run(for_sequences(m.graph, s, False))["embedding"]  # noqa: E731
    np.testing.assert_allclose(run(new, short), run(bert, short), atol=1e-5)
    assert not np.allclose(run(new, long_), run(bert, long_), atol=1e-4)


def test_a_linformer_encoder_learns_its_projections(bert):
    """The recovery path: gradient steps on E and F alone (through the op's VJP) pull the
    Linformer encoder's embeddings towards the dense model's on inputs longer than k/2."""
    from minitx.executor import Executor
    from minitx.ir import Node, Value

    new = plugin.optimize(bert, ["attention:map=linformer,k=8"], validate=False)
    g = new.graph.copy()
    g.inputs.append(Value("teacher", ("B", bert.config["d_model"]), "float32"))
    g.nodes.append(Node("loss", "mse", ["embedding", "teacher"], ["loss"], {}))
    g.outputs = ["loss"]
    seqs = [list(range(3 + r, 40 + 2 * r)) for r in range(4)]
    fed = {**for_sequences(new.graph, seqs, False),
           "teacher": bert.executor().run(for_sequences(bert.graph, seqs, False))["embedding"]}
    ef = [p for p in new.params if ".linformer." in p]
    params = dict(new.params)
    losses = []
    for _ in range(30):
        res = Executor(g, params).forward_backward(fed, wrt=ef)
        losses.append(float(res.outputs["loss"]))
        assert set(res.grads) == set(ef) and all(np.abs(res.grads[p]).max() > 0 for p in ef)
        norm = np.sqrt(sum(float((res.grads[p] ** 2).sum()) for p in ef))
        for p in ef:   # normalised steps: the tiny random model's loss is ~1e-6
            params[p] = params[p] - 0.05 * res.grads[p] / norm
    assert losses[-1] < 0.5 * losses[0]


def test_decoders_are_refused_in_one_line(tmp_path):
    model = tmp_path / "gpt2.npz"
    subprocess.run([sys.executable, "cli.py", "init", "--arch", "gpt2", "-o", str(model)], cwd=ROOT, check=True,
                   capture_output=True)
    r = subprocess.run([sys.executable, "cli.py", "optimize", str(model), "--plugin", "attention:map=linformer",
                        "-o", str(tmp_path / "out.npz")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "bidirectional only" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.npz").exists()
