"""The encoder–decoder ops' forwards against independent references (torch, transformers).

Gradient checks for these ops live with every other op's in test_ops_grad.py.
"""
from __future__ import annotations

import numpy as np
import pytest

from minitx import ops

torch = pytest.importorskip("torch")


def fwd(op, *inputs, **attrs):
    return ops.get(op).forward(*inputs, **attrs)


@pytest.mark.parametrize("causal", [False, True])
def test_cross_attention_matches_torch_sdpa_with_bias_and_padding(causal):
    rng = np.random.default_rng(0)
    B, T, S, H, D = 2, 3, 5, 2, 4
    q, k, v = (rng.standard_normal((B, n, H * D)) for n in (T, S, S))
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    if causal:
        mask = np.ones_like(mask)  # causal rows may see only padding otherwise
    bias = rng.standard_normal((1, H, T, S))
    got = fwd("cross_attention", q, k, v, mask, bias, n_heads=H, causal=causal, scale=0.7)

    def heads(x):
        return torch.tensor(x).reshape(B, -1, H, D).transpose(1, 2)

    allowed = torch.tensor(mask, dtype=torch.bool)[:, None, None, :].expand(B, 1, T, S)
    if causal:
        allowed = allowed & torch.ones(T, S, dtype=torch.bool).tril(S - T)
    add = torch.tensor(bias).expand(B, H, T, S).masked_fill(~allowed, float("-inf"))
    ref = torch.nn.functional.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=add, scale=0.7)
    np.testing.assert_allclose(got, ref.transpose(1, 2).reshape(B, T, H * D).numpy(), rtol=1e-12, atol=1e-12)


def test_cross_attention_rejects_mismatched_keys():
    from minitx.errors import ShapeError

    spec = ops.get("cross_attention")
    with pytest.raises(ShapeError, match="cross_attention"):
        spec.infer([(1, 2, 4), (1, 3, 4), (1, 3, 4), (1, 2), None], ["float32"] * 3 + ["int64", None], n_heads=2)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20)])
def test_relative_position_buckets_match_transformers_t5(bidirectional, num_buckets, max_distance):
    T5Attention = pytest.importorskip("transformers.models.t5.modeling_t5").T5Attention
    from minitx.ops.relpos import buckets

    rel = np.arange(-300, 301)[None, :] - np.zeros((1, 1), np.int64)
    ref = T5Attention._relative_position_bucket(torch.tensor(rel), bidirectional=bidirectional,
                                                num_buckets=num_buckets, max_distance=max_distance)
    got = buckets(rel, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance)
    np.testing.assert_array_equal(got, ref.numpy())


def test_relative_position_bias_layout_and_decoder_queries():
    """Output (1|B, H, T, S): table rows picked by bucket(key − query), heads moved before time."""
    from minitx.ops.relpos import buckets

    table = np.arange(16 * 2, dtype=np.float64).reshape(16, 2)
    enc = fwd("relative_position_bias", table, np.ones((1, 4)), None, bidirectional=True, num_buckets=16,
              max_distance=32)
    rel = np.arange(4)[None, :] - np.arange(4)[:, None]
    idx = buckets(rel, bidirectional=True, num_buckets=16, max_distance=32)
    np.testing.assert_array_equal(enc[0, 1], table[idx, 1])
    # A decode step: the one new query at position 3 attends keys 0 … 3.
    dec = fwd("relative_position_bias", table, np.ones((2, 4)), np.array([[3], [3]]), bidirectional=False,
              num_buckets=16, max_distance=32)
    assert dec.shape == (2, 2, 1, 4)
    full = fwd("relative_position_bias", table, np.ones((1, 4)), np.arange(4)[None], bidirectional=False,
               num_buckets=16, max_distance=32)
    np.testing.assert_array_equal(dec[0, :, 0], full[0, :, 3])


def test_geglu_matches_torch():
    h = np.random.default_rng(1).standard_normal((2, 3, 8))
    gate, up = torch.tensor(h).chunk(2, dim=-1)
    for approx in ("tanh", "none"):
        ref = torch.nn.functional.gelu(gate, approximate=approx) * up
        np.testing.assert_allclose(fwd("geglu", h, approximate=approx), ref.numpy(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dim", [6, 7])
def test_sinusoidal_halves_match_marian(dim):
    marian = pytest.importorskip("transformers.models.marian.modeling_marian")
    emb = marian.MarianSinusoidalPositionalEmbedding(12, dim)
    ref = emb.create_weight().numpy()
    got = fwd("sinusoidal_positions", np.arange(12)[None], dim=dim, max_len=12, halves=True)[0]
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-7)
