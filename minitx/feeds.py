"""Model inputs: the one place where token ids become a graph's feeds.

Every command gives a graph the same kinds of input — token ids, positions, an attention mask,
token types and (for decoders) KV caches, empty or carried over. They are built here and only
here, from the inputs the graph itself declares, so that a rewrite which changes those inputs (an
int8 cache with per-token scales, a cache narrowed by head pruning) is followed by training,
evaluation, validation, golden files, generation and benchmarks alike.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from .errors import MinitxError
from .ir import Graph, bind_shape


def pad(seqs: Sequence[Sequence[int]], side: str = "right") -> tuple[np.ndarray, np.ndarray]:
    """A batch of token-id lists as (ids, mask), both (B, T) int64, padded with id 0 on ``side``.

    Decoders pad on the left (the next token follows every row's last real token); encoders on the
    right.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if not seqs:
        raise MinitxError("no input sequences")
    T = max(len(s) for s in seqs)
    ids = np.zeros((len(seqs), T), np.int64)
    mask = np.zeros((len(seqs), T), np.int64)
    for r, s in enumerate(seqs):
        if len(s):
            cols = slice(T - len(s), T) if side == "left" else slice(0, len(s))
            ids[r, cols] = s
            mask[r, cols] = 1
    return ids, mask


def positions(mask: np.ndarray, start: np.ndarray | int = 0) -> np.ndarray:
    """Position ids that count real tokens only: a padding slot takes the position of the next real
    token, so left padding does not shift a row's positions. ``start`` is each row's first position
    (the number of real tokens already in its KV cache)."""
    mask = np.asarray(mask, np.int64)
    return (np.asarray(start, np.int64).reshape(-1, 1) + np.cumsum(mask, axis=1) - mask).astype(np.int64)


def empty_caches(graph: Graph, batch: int, dtype: Any = None) -> dict[str, np.ndarray]:
    """Zero-length KV caches for every ``past.*`` input ``graph`` declares, as wide as it declares
    them. ``dtype`` overrides the declared dtype of floating-point caches (mixed precision computes
    in float16); integer caches (int8 KV) keep theirs."""
    out: dict[str, np.ndarray] = {}
    for v in graph.inputs:
        if v.name.startswith("past."):
            shape = bind_shape(v.shape, {"B": batch, "S": 0, "T": 0}, v.name)
            dt = np.dtype(v.dtype)
            if dtype is not None and dt.kind == "f":
                dt = np.dtype(dtype)
            out[v.name] = np.zeros(shape, dt)
    return out


def cache_length(past: Mapping[str, np.ndarray], graph: Graph | None = None) -> int:
    """Tokens held in a set of KV caches (0 when there are none). With ``graph``, only caches it
    declares as (B, S, …) count: a recurrent state (linear attention's S, z) holds no length."""
    growing = None if graph is None else {v.name for v in graph.inputs if len(v.shape) > 1 and v.shape[1] == "S"}
    for k, a in past.items():
        if k.startswith("past.") and (growing is None or k in growing):
            return int(a.shape[1])
    return 0


def build(graph: Graph, ids: np.ndarray, *, mask: np.ndarray | None = None,
          position_ids: np.ndarray | None = None, token_type_ids: np.ndarray | None = None,
          targets: np.ndarray | None = None, past: Mapping[str, Any] | None = None,
          cache_dtype: Any = None, encoder_ids: np.ndarray | None = None,
          encoder_mask: np.ndarray | None = None, encoder_position_ids: np.ndarray | None = None
          ) -> dict[str, Any]:
    """Every input ``graph`` declares, for a (B, T) batch of ``ids``.

    Defaults: positions count from the cache's length (or from 0), the mask marks every token real
    (covering the cached tokens too), token types are 0, caches are empty. ``mask`` may cover the
    new tokens only (B, T) or the cached ones too (B, S+T). An encoder–decoder's source
    (``encoder_ids``, (B, E)) defaults to ``ids`` themselves, so that a command which has one batch
    of ids (a benchmark, a calibration run) feeds every family alike; its mask defaults to all
    real, its positions to 0 … E−1. An input the graph declares that is none of these is an error
    naming it, never a silent zero.
    """
    ids = np.asarray(ids, np.int64)
    if ids.ndim != 2:
        raise MinitxError(f"input_ids must be (batch, tokens), got shape {ids.shape}")
    B, T = ids.shape
    past = dict(past) if past is not None else {}
    S = cache_length(past, graph)
    if not S and mask is not None and np.ndim(mask) == 2 and np.shape(mask)[1] > T:
        S = np.shape(mask)[1] - T   # the earlier tokens live in recurrent states, not KV caches
    declared = {v.name for v in graph.inputs}
    if any(n.startswith("past.") for n in declared) and not past:
        past = empty_caches(graph, B, cache_dtype)
    if mask is None:
        mask = np.ones((B, S + T), np.int64)
    else:
        mask = np.asarray(mask, np.int64)
        if mask.shape == (B, T) and S:
            mask = np.concatenate([np.ones((B, S), np.int64), mask], axis=1)
    if position_ids is None:
        position_ids = positions(mask[:, S:], mask[:, :S].sum(axis=1))
    src = ids if encoder_ids is None else np.asarray(encoder_ids, np.int64)
    if src.ndim != 2 or src.shape[0] != B:
        raise MinitxError(f"encoder_ids must be (batch {B}, tokens), got shape {src.shape}")
    src_mask = np.ones_like(src) if encoder_mask is None else np.asarray(encoder_mask, np.int64)
    src_pos = (np.broadcast_to(np.arange(src.shape[1], dtype=np.int64), src.shape).copy()
               if encoder_position_ids is None else np.asarray(encoder_position_ids, np.int64))
    for what, a in (("encoder_mask", src_mask), ("encoder_position_ids", src_pos)):
        if a.shape != src.shape:
            raise MinitxError(f"{what} must have encoder_ids' shape {src.shape}, got {a.shape}")
    feeds: dict[str, Any] = {}
    for v in graph.inputs:
        n = v.name
        if n == "input_ids":
            feeds[n] = ids
        elif n == "position_ids":
            feeds[n] = np.asarray(position_ids, np.int64)
        elif n == "attention_mask":
            feeds[n] = mask
        elif n == "token_type_ids":
            feeds[n] = np.zeros_like(ids) if token_type_ids is None else np.asarray(token_type_ids, np.int64)
        elif n == "targets":
            if targets is None:
                raise MinitxError("this graph computes a loss: it needs targets")
            feeds[n] = np.asarray(targets, np.int64)
        elif n == "encoder_ids":
            feeds[n] = src
        elif n == "encoder_mask":
            feeds[n] = src_mask
        elif n == "encoder_position_ids":
            feeds[n] = src_pos
        elif n.startswith("past."):
            if n not in past:
                raise MinitxError(f"KV cache {n!r} is missing from the carried-over state")
            feeds[n] = past[n]
        else:
            raise MinitxError(f"the graph declares an input {n!r} that minitx does not know how to feed")
    return feeds


def for_sequences(graph: Graph, seqs: Sequence[Sequence[int]], decoder: bool,
                  token_types: Sequence[Sequence[int]] | None = None) -> dict[str, Any]:
    """Feeds for a batch of token-id lists as minitx itself pads them: decoders on the left with
    positions counting real tokens, encoders on the right with positions 0… and token types 0
    (or ``token_types``). An encoder–decoder reads the sequences on both sides, right-padded
    with positions 0… as in teacher forcing (a causal decoder never sees the padding after its
    real tokens)."""
    seq2seq = any(v.name == "encoder_ids" for v in graph.inputs)
    ids, mask = pad(seqs, "left" if decoder and not seq2seq else "right")
    if seq2seq:
        pos = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy()
        return build(graph, ids, mask=mask, position_ids=pos, encoder_ids=ids, encoder_mask=mask)
    if decoder:
        return build(graph, ids, mask=mask)
    T = ids.shape[1]
    types = None
    if token_types is not None:
        types = np.zeros_like(ids)
        for r, t in enumerate(token_types):
            types[r, :len(t)] = t
    pos = np.broadcast_to(np.arange(T, dtype=np.int64), ids.shape).copy()
    return build(graph, ids, mask=mask, position_ids=pos, token_type_ids=types)
