"""Linear (kernel) attention: the spec against its definitions, its VJP against float64 finite
differences (collected into test_ops_grad's registry coverage), and FAVOR+ against softmax."""
from __future__ import annotations

import numpy as np
import pytest

from minitx.gradcheck import check_vjp
from minitx.ops import attention as A
from minitx.ops import linear_attention as LA
from minitx.ops.cases import CASES


@pytest.mark.parametrize("op,case", [(op, c) for op in ("linear_attention", "linear_attention_state")
                                     for c in CASES[op]], ids=lambda x: x if isinstance(x, str) else x.name)
def test_linear_attention_vjps_match_finite_differences(op, case):
    inputs, attrs = case.make(np.random.default_rng(0), "float64")
    results = check_vjp(op, inputs, attrs, eps=1e-6, rtol=1e-5)
    assert len(results) >= 3


def _recurrent(q, k, v, feature, proj, causal):
    """The running-sum form, one head, written independently: state S = Σ φ(k) vᵀ, z = Σ φ(k)."""
    phi = (lambda x: np.where(x > 0, x + 1, np.exp(x))) if feature == "elu" else \
        (lambda x: np.exp((x / x.shape[-1] ** 0.25) @ proj.T - 0.5 * ((x / x.shape[-1] ** 0.25) ** 2).sum(-1, keepdims=True))
         / np.sqrt(proj.shape[0]))
    pq, pk = phi(q), phi(k)
    out = np.empty_like(v)
    if not causal:
        S, z = pk.T @ v, pk.sum(0)
        return (pq @ S) / (pq @ z + LA.EPS)[:, None]
    S, z = np.zeros((pk.shape[1], v.shape[1])), np.zeros(pk.shape[1])
    for t in range(len(q)):
        S += np.outer(pk[t], v[t])
        z += pk[t]
        out[t] = pq[t] @ S / (pq[t] @ z + LA.EPS)
    return out


@pytest.mark.parametrize("feature", ["elu", "favor"])
@pytest.mark.parametrize("causal", [True, False])
def test_linear_attention_equals_its_running_sum_form(feature, causal):
    rng = np.random.default_rng(1)
    T, D = 11, 8
    q, k, v = (rng.standard_normal((1, T, D)) * 0.5 for _ in range(3))
    proj = LA.favor_projection(16, D, 3) if feature == "favor" else None
    got = LA.linear_attention(q, k, v, None, None, None, proj, n_heads=1, n_kv_heads=1, causal=causal,
                              feature=feature)[0][0]
    np.testing.assert_allclose(got, _recurrent(q[0], k[0], v[0], feature, proj, causal), atol=1e-12)


def test_favor_approaches_softmax_attention_with_many_features_and_a_seed_redraws_them():
    rng = np.random.default_rng(2)
    T, D = 16, 8
    q, k, v = (rng.standard_normal((1, T, D)) * 0.4 for _ in range(3))
    a = dict(n_heads=1, n_kv_heads=1, causal=False)
    dense = A.attention(q, k, v, **a)[0]
    err = {F: np.abs(LA.linear_attention(q, k, v, None, None, None, LA.favor_projection(F, D, 0), feature="favor",
                                         **a)[0] - dense).max() for F in (8, 4096)}
    assert err[4096] < 0.05 < err[8] or err[4096] < err[8] / 3
    assert not np.allclose(LA.favor_projection(8, D, 0), LA.favor_projection(8, D, 1))
    np.testing.assert_array_equal(LA.favor_projection(8, D, 5), LA.favor_projection(8, D, 5))


@pytest.mark.parametrize("feature", ["elu", "favor"])
def test_state_steps_equal_causal_linear_attention_over_the_whole_prefix(feature):
    """Chunks of 5, 1, 1, 3 tokens through the recurrent state, left padding in row 1, give what
    causal linear attention over all 10 tokens gives; the state's size never changes."""
    rng = np.random.default_rng(4)
    B, T, H, KV, D = 2, 10, 4, 2, 8
    q = rng.standard_normal((B, T, H * D)) * 0.5
    k, v = (rng.standard_normal((B, T, KV * D)) * 0.5 for _ in range(2))
    mask = np.ones((B, T), np.int64)
    mask[1, :3] = 0
    proj = LA.favor_projection(16, D, 2) if feature == "favor" else None
    a = dict(n_heads=H, n_kv_heads=KV, feature=feature)
    want = LA.linear_attention(q, k, v, None, None, mask, proj, causal=True, **a)[0]
    s = z = None
    got, shapes = [], set()
    start = 0
    for n in (5, 1, 1, 3):
        sl = slice(start, start + n)
        o, s, z = LA.linear_attention_state(q[:, sl], k[:, sl], v[:, sl], s, z, mask[:, :start + n], proj, **a)
        got.append(o)
        shapes.add((s.shape, z.shape))
        start += n
    np.testing.assert_allclose(np.concatenate(got, axis=1), want, rtol=1e-10, atol=1e-12)
    assert len(shapes) == 1


# ------------------------------------------- Nyström (minitx/ops/lowrank.py): landmarks and padding
def test_nystrom_row_is_the_same_alone_or_in_a_padded_batch_and_exact_with_a_landmark_per_token():
    import torch
    from minitx.ops import lowrank as LR

    rng = np.random.default_rng(5)
    H, D, L = 2, 8, 6
    lens = (20, 9, 5)
    T = max(lens)
    q, k, v = (rng.standard_normal((len(lens), T, H * D)) * 0.5 for _ in range(3))
    mask = np.zeros((len(lens), T), np.int64)
    for b, n in enumerate(lens):
        mask[b, :n] = 1
    a = dict(n_heads=H, n_kv_heads=H, n_landmarks=L)
    batch = LR.nystrom_attention(q, k, v, None, None, mask, **a)[0]
    for b, n in enumerate(lens):
        alone = LR.nystrom_attention(q[b:b + 1, :n], k[b:b + 1, :n], v[b:b + 1, :n], **a)[0]
        np.testing.assert_allclose(batch[b, :n], alone[0], rtol=1e-10, atol=1e-12)
    # 5 real tokens, 6 landmarks: every landmark one token, and the iteration converged -> softmax attention
    n = lens[2]
    got = LR.nystrom_attention(q[2:, :n], k[2:, :n], v[2:, :n], pinv_iters=30, **a)[0]
    sh = lambda x: torch.tensor(x[2:, :n]).reshape(1, n, H, D).transpose(1, 2)  # noqa: E731
    ref = torch.nn.functional.scaled_dot_product_attention(sh(q), sh(k), sh(v)).transpose(1, 2).reshape(1, n, H * D)
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-8, atol=1e-9)
