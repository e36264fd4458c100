"""T5's relative position bias: a learned scalar per (head, bucket of key − query distance).

Distances are bucketed as T5 does: half the buckets hold exact small distances, the rest grow
logarithmically up to ``max_distance`` (everything beyond shares the last bucket). The encoder's
bias is bidirectional (separate buckets for keys before and after the query); the decoder's is
causal (only keys at or before the query). One table serves every layer of a stack; the op is
evaluated once per stack and its output fed to each layer's attention.

Keys sit at positions 0 … S−1 (S = the key mask's length); queries at ``query_positions`` (B, T),
or at 0 … S−1 when absent (an encoder attending to itself).
"""
from __future__ import annotations

import math

import numpy as np

from . import register, require, wide_vjp
from .cases import EDGE_ROWS, Case, Make, add_cases, randn, tiny, viewed


def buckets(relative: np.ndarray, *, bidirectional: bool, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bucket index of each relative position (key − query), as T5 computes it (logs in float32)."""
    rel = np.asarray(relative, np.int64)
    out = np.zeros_like(rel)
    n = num_buckets
    if bidirectional:
        n //= 2
        out += (rel > 0) * n
        rel = np.abs(rel)
    else:
        rel = -np.minimum(rel, 0)
    exact = n // 2
    logs = np.log(np.maximum(rel, 1).astype(np.float32) / np.float32(exact))
    large = exact + (logs / np.float32(math.log(max_distance / exact)) * np.float32(n - exact)).astype(np.int64)
    return out + np.where(rel < exact, rel, np.minimum(large, n - 1))


def _bucket_grid(key_mask, query_positions, bidirectional, num_buckets, max_distance):
    S = key_mask.shape[1]
    qpos = np.arange(S)[None] if query_positions is None else np.asarray(query_positions, np.int64)
    rel = np.arange(S)[None, None, :] - qpos[:, :, None]              # (B or 1, T, S)
    return buckets(rel, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance)


def relative_position_bias(table, key_mask, query_positions=None, *, bidirectional, num_buckets=32,
                           max_distance=128):
    """bias[b, h, t, s] = table[bucket(s − pos_t), h]; (1 or B, H, T, S)."""
    idx = _bucket_grid(key_mask, query_positions, bidirectional, num_buckets, max_distance)
    return np.ascontiguousarray(table[idx].transpose(0, 3, 1, 2))


@wide_vjp
def relative_position_bias_vjp(grads, inputs, outputs, *, bidirectional, num_buckets=32, max_distance=128):
    """Each table entry gets the sum of the cotangents of the scores that read it."""
    (g,) = grads
    table, key_mask, query_positions = inputs
    idx = _bucket_grid(key_mask, query_positions, bidirectional, num_buckets, max_distance)
    gt = np.zeros_like(table)
    np.add.at(gt, np.broadcast_to(idx, g.shape[:1] + idx.shape[1:]), g.transpose(0, 2, 3, 1))
    return gt, None, None


def relative_position_bias_infer(shapes, dtypes, *, bidirectional, num_buckets=32, max_distance=128):
    table, mask, qpos = shapes
    op = "relative_position_bias"
    require(len(table) == 2 and table[0] == num_buckets, op, f"table {table} must be ({num_buckets} buckets, heads)")
    require(num_buckets >= (4 if bidirectional else 2) and max_distance > num_buckets // 4, op,
            f"num_buckets {num_buckets} / max_distance {max_distance} leave no logarithmic buckets")
    require(len(mask) == 2, op, f"key mask {mask} must be (batch, keys)")
    if qpos is None:
        return [((1, table[1], mask[1], mask[1]), dtypes[0])]
    require(len(qpos) == 2 and qpos[0] == mask[0], op, f"query positions {qpos} must be (batch {mask[0]}, T)")
    return [((qpos[0], table[1], qpos[1], mask[1]), dtypes[0])]


register("relative_position_bias", relative_position_bias, relative_position_bias_vjp, relative_position_bias_infer,
         nondiff=(1, 2), n_optional=1, vjp_uses_outputs=False)


def _bias_inputs(B: int, S: int, H: int = 4, T: int | None = None, *, bidirectional: bool,
                 num_buckets: int = 32, max_distance: int = 128, scale: float | None = 1.0) -> Make:
    """A (num_buckets, H) table over S keys: the encoder's square bias (``T`` None) or decoder
    queries at positions S − T … S − 1 of each row (the new tokens after a cache). ``scale`` None:
    a subnormal table."""
    def make(r, d):
        table = randn(r, (num_buckets, H), d, tiny(d) if scale is None else scale)
        mask = np.ones((B, S), np.int64)
        qpos = None if T is None else np.broadcast_to(np.arange(S - T, S), (B, T)).copy()
        return (table, mask, qpos), {"bidirectional": bidirectional, "num_buckets": num_buckets,
                                     "max_distance": max_distance}
    return make


add_cases("relative_position_bias", [
    Case("encoder, 9 tokens", _bias_inputs(1, 9, bidirectional=True)),
    Case("decoder prefill, 7 tokens", _bias_inputs(2, 7, T=7, bidirectional=False)),
    Case("decoder step over 12", _bias_inputs(3, 12, T=1, bidirectional=False)),
    Case("few buckets, short max distance", _bias_inputs(2, 20, T=5, bidirectional=True, num_buckets=8,
                                                         max_distance=12)),
    Case("encoder, distances past max_distance", _bias_inputs(1, 40, H=2, bidirectional=True, max_distance=16),
         "large"),
    Case("decoder, distances past max_distance", _bias_inputs(1, 160, H=2, T=3, bidirectional=False),
         "large"),
    Case("large table values", _bias_inputs(1, 9, bidirectional=True, scale=1e3), "large"),
    Case("subnormal table values", _bias_inputs(2, 9, T=3, bidirectional=False, scale=None), "tiny"),
    *[Case(f"encoder, {s} tokens", _bias_inputs(1, s, H=2, bidirectional=True), "sizes") for s in EDGE_ROWS],
    Case("batch 8 decoder steps", _bias_inputs(8, 10, T=1, bidirectional=False), "batch"),
    viewed(Case("decoder prefill, 7 tokens", _bias_inputs(2, 7, T=7, bidirectional=False))),
])
