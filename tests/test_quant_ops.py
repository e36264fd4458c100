"""Spec of the quantized ops: gradient checks (float64) and the packed formats."""
import numpy as np
import pytest

from minitx.gradcheck import check_vjp
from minitx.ops import quant as Q

rng = np.random.default_rng(0)
X = rng.standard_normal((2, 3, 64))
W = rng.standard_normal((64, 8))
B = rng.standard_normal(8)


def test_grad_linear_q8():
    q, s = Q.quantize_per_channel(W)
    check_vjp("linear_q8", [X, q, s.astype(np.float64), B])
    q, s = Q.quantize_per_channel(W.T.copy(), axis=1)  # (out, in) per row: the tied-LM-head form
    check_vjp("linear_q8", [X, q, s.astype(np.float64), None], {"transposed": True})


def test_grad_linear_q8_block_and_q4():
    q, s = Q.quantize_blocks(W, 32)
    check_vjp("linear_q8_block", [X, q, s.astype(np.float64), B], {"block": 32})
    q, s = Q.quantize_int4(W, 16)
    check_vjp("linear_q4", [X, q, s.astype(np.float64), B], {"group": 16})


def test_grad_w8a8_cast_embedding():
    q, s = Q.quantize_per_channel(W)
    check_vjp("linear_w8a8", [X, q, s.astype(np.float64), B])
    check_vjp("linear_cast", [X, W.astype(np.float16), B])
    check_vjp("linear_cast", [X, Q.to_bfloat16_bits(W), B])
    E = rng.standard_normal((10, 6))
    q, s = Q.quantize_per_channel(E, axis=1)
    check_vjp("embedding_q8", [np.array([[1, 3, 3], [9, 0, 1]]), q, s.astype(np.float64)])


@pytest.mark.parametrize("past,causal,kv", [(2, True, 2), (0, False, 1)])
def test_grad_attention_kv8(past, causal, kv):
    H, D = 2, 4
    q, k, v = (rng.standard_normal((2, 3, w)) for w in (H * D, kv * D, kv * D))
    ins = [q, k, v, None, None, None, None, None]
    if past:
        pk, pks = Q.quantize_heads(rng.standard_normal((2, past, kv * D)), kv)
        pv, pvs = Q.quantize_heads(rng.standard_normal((2, past, kv * D)), kv)
        mask = np.ones((2, past + 3), np.int64)
        mask[0, 0] = 0
        ins = [q, k, v, pk, pks, pv, pvs, mask]
    check_vjp("attention_kv8", ins, dict(n_heads=H, n_kv_heads=kv, causal=causal))


def test_kv8_matches_float_attention_closely():
    from minitx.ops.attention import attention
    H, D = 4, 16
    q, k, v = (rng.standard_normal((1, 5, H * D)).astype(np.float32) for _ in range(3))
    ref = attention(q, k, v, n_heads=H, n_kv_heads=H, causal=True)[0]
    out, kq, ks, vq, vs = Q.attention_kv8(q, k, v, n_heads=H, n_kv_heads=H, causal=True)
    assert kq.dtype == np.int8 and ks.shape == (1, 5, H)
    assert np.abs(out - ref).max() < 0.02 * np.abs(ref).max()


def test_int4_packing_by_hand():
    # one group of 4 inputs: s = max|w| / 7.5 = 1, so q = rint(w) clipped to [-8, 7]
    w = np.array([[-7.5], [4.2], [0.0], [7.4]], np.float32)
    packed, s = Q.quantize_int4(w, 4)
    assert packed.dtype == np.uint8 and packed.shape == (2, 1) and s.shape == (1, 1)
    q = Q.unpack_int4(packed)[:, 0]
    assert q.tolist() == [-8, 4, 0, 7]
    assert s[0, 0] == 1.0
    assert packed[0, 0] == 0 | (12 << 4) and packed[1, 0] == 8 | (15 << 4)  # q + 8: low nibble = even row


def test_bfloat16_bits_round_to_nearest_even():
    x = np.array([1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, -2.5], np.float32)
    back = Q.widen(Q.to_bfloat16_bits(x))
    assert back.tolist() == [1.0, 1.0, 1.015625, -2.5]


def test_group_must_divide():
    with pytest.raises(ValueError, match="does not divide"):
        Q.quantize_int4(W[:48], 32)
    with pytest.raises(ValueError, match="even"):
        Q.quantize_int4(W, 3)


def test_shape_rules_name_the_op():
    from minitx import ops
    from minitx.errors import ShapeError
    with pytest.raises(ShapeError, match="linear_q4"):
        ops.get("linear_q4").infer([(2, 64), (32, 8), (3, 8), None], ["float32", "uint8", "float32", None], group=32)
    with pytest.raises(ShapeError, match="scale shape"):
        ops.get("linear_q8").infer([(2, 64), (64, 8), (7,), None], ["float32", "int8", "float32", None])


def test_embedding_q4_forward_by_hand():
    # one row, one group of 4 columns: s = max|row| / 7.5 = 1, q = rint(E) clipped to [-8, 7];
    # the second row is zero (scale 1, every nibble 8).
    E = np.array([[-7.5, 4.2, 0.0, 7.4], [0.0, 0.0, 0.0, 0.0]], np.float32)
    packed, s = Q.quantize_int4_rows(E, 4)
    assert packed.dtype == np.uint8 and packed.shape == (2, 2) and s.shape == (2, 1)
    assert packed[0].tolist() == [0 | (12 << 4), 8 | (15 << 4)]  # column 2j low nibble, 2j+1 high
    assert packed[1].tolist() == [8 | (8 << 4)] * 2 and s[:, 0].tolist() == [1.0, 1.0]
    out = Q.embedding_q4(np.array([[0, 1, 0]]), packed, s, group=4)
    assert out.shape == (1, 3, 4)
    assert out[0, 0].tolist() == [-8.0, 4.0, 0.0, 7.0] and out[0, 1].tolist() == [0.0] * 4


def test_int4_table_rows_and_tied_head_agree():
    """embedding_q4 and linear_q4(transposed) read one packed table the same way; the int4
    round trip stays within half a step (s / 2) of every float entry."""
    E = rng.standard_normal((10, 64))
    packed, s = Q.quantize_int4_rows(E, 16)
    deq = Q.embedding_q4(np.arange(10), packed, s, group=16)
    step = np.repeat(s, 16, axis=1)
    assert np.all(np.abs(deq - E) <= step * (0.5 + 1e-6))  # float32 scales: a hair over half a step
    assert np.abs(deq - E).max() > 0.1 * step.max()  # and it is a real rounding, not a float copy
    x = rng.standard_normal((2, 3, 64))
    ref = x @ E.T
    assert np.abs(Q.linear_q4(x, packed, s, group=16, transposed=True) - ref).max() < 0.15 * np.abs(ref).max()
    np.testing.assert_allclose(Q.linear_q4(x, packed, s, group=16, transposed=True), x @ deq.T, rtol=1e-12)


def test_grad_embedding_q4_and_transposed_q4():
    E = rng.standard_normal((10, 8))
    q, s = Q.quantize_int4_rows(E, 4)
    check_vjp("embedding_q4", [np.array([[1, 3, 3], [9, 0, 1]]), q, s.astype(np.float64)], {"group": 4})
    check_vjp("linear_q4", [rng.standard_normal((2, 8)), q, s.astype(np.float64), None],
              {"group": 4, "transposed": True})


def test_embedding_q4_shape_rule():
    from minitx import ops
    from minitx.errors import ShapeError
    spec = ops.get("embedding_q4")
    assert spec.infer([(2, 3), (50, 32), (50, 4), ], ["int64", "uint8", "float32"], group=16) == [((2, 3, 64), "float32")]
    with pytest.raises(ShapeError, match="embedding_q4.*scale shape"):
        spec.infer([(2, 3), (50, 32), (50, 2)], ["int64", "uint8", "float32"], group=16)
    with pytest.raises(ShapeError, match="embedding_q4.*does not divide"):
        spec.infer([(2, 3), (50, 32), (50, 4)], ["int64", "uint8", "float32"], group=24)


def test_w8a8_in_float16_rescales_before_rounding():
    """1024 products of ±127 sum past float16's 65504: a W8A8 layer in float16 must rescale the
    integer accumulator first (it used to cast it, giving inf, then NaN downstream)."""
    x = np.full((2, 1024), 0.5)
    x[:, 0] = 1.0                                      # sₓ = 1/127: the int8 activations are ±127 / ±64
    q, s = Q.quantize_per_channel(np.abs(rng.standard_normal((1024, 16))))
    ref = Q.linear_w8a8(x, q, s.astype(np.float64))
    got = Q.linear_w8a8(x.astype(np.float16), q, s.astype(np.float16))
    assert got.dtype == np.float16 and np.isfinite(got).all()
    np.testing.assert_allclose(got.astype(np.float64), ref, rtol=2e-3)
    gx, _, gs, _ = Q.linear_w8a8_vjp((np.ones_like(got),), (x.astype(np.float16), q, s.astype(np.float16), None), None)
    assert gx.dtype == gs.dtype == np.float16 and np.isfinite(gx).all() and np.isfinite(gs).all()


# ------------------------------------------------------------------------ linear_q8_0 (Q8_0 × Q8_0)
def _q8_0_weights(n_out, n_in, block=32):
    q, s = Q.quantize_blocks(rng.standard_normal((n_in, n_out)) * 0.1, block)
    return np.ascontiguousarray(q.T), np.ascontiguousarray(s.T).astype(np.float64)


def test_q8_0_matches_torch_integer_reference():
    """Golden values from torch: activations rounded per block of 32 with torch.round (half to
    even, like rint), block sums as int64 matmuls, scaled in float64."""
    import torch
    w, s = _q8_0_weights(24, 96)
    x = rng.standard_normal((2, 3, 96))
    x[0, 0, 32:64] = 0.0                                        # an all-zero block: scale 1, q = 0
    x[1, 2, :32] = np.linspace(-63.5, 63.5, 32) / 127 * 3       # exact .5 ties after scaling
    xt = torch.from_numpy(x.reshape(-1, 3, 32))
    m = xt.abs().amax(-1, keepdim=True)
    sx = torch.where(m > 0, m / 127, torch.ones_like(m))
    qx = torch.clamp(torch.round(xt / sx), -127, 127).to(torch.int64)
    wt = torch.from_numpy(w.astype(np.int64)).reshape(24, 3, 32)
    isum = torch.einsum("rgk,ngk->rgn", qx, wt)                # exact integer block sums
    ref = (isum.double() * sx * torch.from_numpy(s).T[None]).sum(1).numpy().reshape(2, 3, 24)
    np.testing.assert_allclose(Q.linear_q8_0(x, w, s), ref, rtol=1e-13, atol=1e-13)
    # and it is a real rounding of the activations: not the weight-only (dequantized) product
    assert np.abs(Q.linear_q8_0(x, w, s) - Q.linear_q8_0_surrogate(x, w, s)).max() > 1e-4


def test_q8_0_activation_quantizer_by_hand():
    x = np.array([[1.0, -2.0, 0.5, 127 / 254, 0.0, 0.0, 0.0, 0.0]])
    q, s = Q.quantize_act_blocks(x, 4)
    assert s.tolist() == [[2 / 127, 1.0]]                       # the zero block gets scale 1
    assert q.tolist() == [[64, -127, 32, 32, 0, 0, 0, 0]]        # 63.5 → 64 and 31.75 → 32


def test_grad_q8_0_is_straight_through():
    """The VJP is the surrogate's (activations unrounded), checked against finite differences of
    the surrogate; against the real forward the x-gradient is wrong on purpose (zero through rint)."""
    w, s = _q8_0_weights(8, 64)
    check_vjp("linear_q8_0", [X, w, s, B], {"block": 32}, forward=Q.linear_q8_0_surrogate)
    check_vjp("linear_q8_0", [X[0, :1], w, s, None], {"block": 32}, forward=Q.linear_q8_0_surrogate)
    with pytest.raises(AssertionError, match="linear_q8_0: VJP of input 0"):
        check_vjp("linear_q8_0", [X[0, :1], w, s, None], {"block": 32})


def test_q8_0_shape_rule():
    from minitx import ops
    from minitx.errors import ShapeError
    spec = ops.get("linear_q8_0")
    assert spec.infer([(2, 5, 64), (8, 64), (8, 2), (8,)], ["float32", "int8", "float32", "float32"],
                      block=32) == [((2, 5, 8), "float32")]
    with pytest.raises(ShapeError, match="linear_q8_0.*scale shape"):
        spec.infer([(2, 64), (8, 64), (2, 8), None], ["float32", "int8", "float32", None], block=32)
    with pytest.raises(ShapeError, match="linear_q8_0.*does not divide"):
        spec.infer([(2, 64), (8, 64), (8, 3), None], ["float32", "int8", "float32", None], block=24)
    with pytest.raises(ShapeError, match="linear_q8_0.*int8"):
        spec.infer([(2, 64), (8, 64), (8, 2), None], ["float32", "uint8", "float32", None], block=32)
