"""Running models: incremental decoding with a KV cache, sampling, and sentence embeddings.

A batch of prompts is left-padded to one length; the padding is masked out of attention and each
row's positions start at 0 at its first real token, so a padded row computes exactly what it
would alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from . import feeds
from .backend import Backend, to_host
from .errors import MinitxError
from .ir import Graph, Node
from .model import Model
from .rewrite import Context, Replacement, Rule, apply


# ------------------------------------------------------------------------------- decoding state
@dataclass
class DecodeState:
    """Everything a decode step needs: the KV cache, the key mask and each row's next position.

    ``past`` holds the caches as the executor returned them: on a device backend they are that
    device's arrays and never visit the host between steps (only ids, positions and the mask go
    in, only logits come out). Code that reads them on the host calls :meth:`on_host`.
    """

    past: dict[str, Any]
    mask: np.ndarray        # (B, S) 1 = real token
    next_pos: np.ndarray    # (B,)

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def on_host(self) -> "DecodeState":
        """This state with every cache copied to a host NumPy array (explicit transfer)."""
        return DecodeState({k: to_host(v) for k, v in self.past.items()}, self.mask, self.next_pos)


def empty_state(model: Model, batch: int) -> DecodeState:
    """No tokens yet: empty KV caches for every ``past.*`` input the graph declares (a rewritten
    graph may keep another cache, e.g. int8 with per-head scales)."""
    return DecodeState(feeds.empty_caches(model.graph, batch), np.zeros((batch, 0), np.int64),
                       np.zeros(batch, np.int64))


def _last_logits_rule(node: Node, ctx: Context) -> Replacement | None:
    """The node computing ``logits`` reads last_positions(x) instead of x, when it is a linear
    map of one activation row by row (``matmul`` or a linear op — quantized, low-rank, sparse —
    whose other inputs are all weights). Anything else (a sharded head ending in a collective)
    keeps every position: slower, never wrong."""
    if "logits" not in node.outputs or not (node.op == "matmul" or "linear" in node.op.split("_")):
        return None
    x, rest = node.inputs[0], node.inputs[1:]
    if not x or ctx.is_param(x) or any(i and not ctx.is_param(i) for i in rest):
        return None
    made = ctx.producer(x)
    if made is not None and made.op == "last_positions":
        return None
    keep = ctx.node("last_positions", [x], name=f"{x}.last", n=1)
    return Replacement([keep, Node(node.name, node.op, [keep.outputs[0], *rest], list(node.outputs),
                                   dict(node.attrs), dict(node.tags))])


def last_logits_graph(graph: Graph, params: dict[str, np.ndarray]) -> Graph:
    """``graph`` with the LM head on the last position only: a prefill of T tokens then spends
    1/T of the head's multiply-adds (GPT-2's 50257-word head is ~30% of a 128-token prefill) and
    returns logits (B, 1, V) — exactly the last row of the full graph's, because the head maps
    rows independently. Decoders pad on the left, so the last position is real in every row."""
    return apply(graph, params, [Rule("last_logits", "*", _last_logits_rule, exact=True)],
                 where="last_logits").graph


def step(model: Model, ids: np.ndarray, state: DecodeState, mask: np.ndarray | None = None,
         backends: Sequence[str | Backend] = ("numpy",), strict: bool = False,
         last: bool = False) -> tuple[np.ndarray, DecodeState]:
    """Feed ``ids`` (B, T) after the cached tokens; returns logits (B, T, V) — (B, 1, V) with
    ``last``, which is all sampling needs (:func:`last_logits_graph`) — and the new state.

    ``mask`` (B, T) marks real tokens among ``ids`` (default: all real).
    """
    ids = np.asarray(ids, dtype=np.int64)
    B, T = ids.shape
    if state.length + T > model.n_ctx:
        raise MinitxError(f"sequence of {state.length + T} tokens exceeds the model's context of {model.n_ctx}")
    if ids.size and (ids.min() < 0 or ids.max() >= model.vocab_size):
        bad = int(ids[(ids < 0) | (ids >= model.vocab_size)][0])
        raise MinitxError(f"token id {bad} is outside the vocabulary (0 … {model.vocab_size - 1})")
    mask = np.ones((B, T), np.int64) if mask is None else np.asarray(mask, np.int64)
    full_mask = np.concatenate([state.mask, mask], axis=1)
    # Positions count real tokens only, continuing from each row's cached ones (feeds.positions).
    fed = feeds.build(model.graph, ids, mask=full_mask, past=state.past)
    ex = model.executor(backends, strict, last_logits=last)
    # The caches stay where attention computed them; only the logits come to the host.
    out = ex.run(fed, device_outputs=[o for o in ex.graph.outputs if o.startswith("present.")])
    past = {k.replace("present.", "past.", 1): v for k, v in out.items() if k.startswith("present.")}
    return out["logits"], DecodeState(past, full_mask, state.next_pos + mask.sum(axis=1))


# ------------------------------------------------------------------------------------ sampling
@dataclass
class Sampling:
    temperature: float = 0.0   # 0 = greedy
    top_k: int = 0             # 0 = off
    top_p: float = 1.0         # 1 = off
    seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise MinitxError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise MinitxError(f"top-k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise MinitxError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.seed < 0:
            raise MinitxError(f"seed must be >= 0, got {self.seed}")


def sample(logits: np.ndarray, s: Sampling, rng: np.random.Generator) -> np.ndarray:
    """Next token per row from (B, V) logits: greedy, or temperature with top-k / top-p filtering."""
    if np.isnan(logits).any():   # argmax of NaN is token 0: a wrong answer, not an answer
        raise MinitxError("the model produced NaN logits: its weights overflow float32 arithmetic")
    if s.temperature == 0.0:
        return logits.argmax(axis=-1)
    z = logits.astype(np.float64) / s.temperature
    if s.top_k:
        kth = np.sort(z, axis=-1)[:, -min(s.top_k, z.shape[-1])][:, None]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    if s.top_p < 1.0:
        order = np.argsort(-p, axis=-1)
        sorted_p = np.take_along_axis(p, order, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least the first token).
        drop_sorted = np.cumsum(sorted_p, axis=-1) - sorted_p >= s.top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        p = np.where(drop, 0.0, p)
        p /= p.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(p.shape[-1], p=row) for row in p])


# ---------------------------------------------------------------------------------- generation
def check_ids(model: Model, seqs: Sequence[Sequence[int]]) -> None:
    """Reject empty inputs, ids outside the vocabulary and inputs longer than the context."""
    if not seqs:
        raise MinitxError("no input given")
    for k, s in enumerate(seqs):
        if len(s) == 0:
            raise MinitxError(f"input {k + 1} is empty (it has no tokens)")
        bad = [t for t in s if not 0 <= t < model.vocab_size]
        if bad:
            raise MinitxError(f"input {k + 1}: token id {bad[0]} is outside the vocabulary (0 … {model.vocab_size - 1})")
        if len(s) > model.n_ctx:
            raise MinitxError(f"input {k + 1} has {len(s)} tokens, longer than the model's context of {model.n_ctx}")


def left_pad(prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """A batch of prompts as (ids, mask), left-padded (:func:`minitx.feeds.pad`); empty prompts are refused."""
    if not prompts:
        raise MinitxError("no prompt given")
    for k, p in enumerate(prompts):
        if len(p) == 0:
            raise MinitxError(f"prompt {k + 1} is empty (it has no tokens)")
    return feeds.pad(prompts, "left")


def generate(model: Model, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32,
             sampling: Sampling | None = None, stop: Sequence[int] = (),
             backends: Sequence[str | Backend] = ("numpy",), strict: bool = False,
             on_token: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` per prompt; returns the new ids per prompt (stop token excluded).

    ``on_token(row, token)`` is called as each token is produced, for streaming.
    """
    from . import seq2seq

    if seq2seq.is_encoder_decoder(model):  # the prompts are the encoder's inputs; output stops at EOS
        return seq2seq.generate(model, prompts, max_new_tokens, sampling, backends=backends, strict=strict)
    out: list[list[int]] = []
    for out in iter_generate(model, prompts, max_new_tokens, sampling, stop, backends, strict, on_token):
        pass
    return out


def iter_generate(model: Model, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32,
                  sampling: Sampling | None = None, stop: Sequence[int] = (),
                  backends: Sequence[str | Backend] = ("numpy",), strict: bool = False,
                  on_token: Callable[[int, int], None] | None = None) -> Iterator[list[list[int]]]:
    """Like :func:`generate`, yielding the ids generated so far after every step."""
    if not model.is_decoder:
        raise MinitxError(f"{model.config['arch']} is an encoder; it embeds text, it does not generate")
    if max_new_tokens < 0:
        raise MinitxError(f"max new tokens must be >= 0, got {max_new_tokens}")
    sampling = sampling or Sampling()
    ids, mask = left_pad(prompts)
    if ids.shape[1] > model.n_ctx:
        raise MinitxError(f"prompt of {ids.shape[1]} tokens is longer than the model's context of {model.n_ctx}")
    # The context bounds prompt + generation: stop when it is full rather than fail mid-way.
    max_new_tokens = min(max_new_tokens, model.n_ctx - ids.shape[1] + 1)
    rng = np.random.default_rng(sampling.seed)
    stop = set(int(s) for s in stop)
    out: list[list[int]] = [[] for _ in prompts]
    done = np.zeros(len(prompts), bool)
    state = empty_state(model, len(prompts))
    logits, state = step(model, ids, state, mask, backends, strict, last=True)
    for k in range(max_new_tokens):
        nxt = sample(logits[:, -1], sampling, rng)
        for r, t in enumerate(nxt):
            if done[r]:
                continue
            if int(t) in stop:
                done[r] = True
                continue
            out[r].append(int(t))
            if on_token:
                on_token(r, int(t))
        yield out
        if done.all() or k == max_new_tokens - 1:
            break
        feed = np.where(done, 0, nxt)[:, None]
        logits, state = step(model, feed, state, (~done).astype(np.int64)[:, None], backends, strict, last=True)


# ---------------------------------------------------------------------------------- encoders
def embed(model: Model, sequences: Sequence[Sequence[int]], token_types: Sequence[Sequence[int]] | None = None,
          backends: Sequence[str | Backend] = ("numpy",), strict: bool = False, batch_size: int = 32) -> np.ndarray:
    """Sentence embeddings (N, d) for an encoder, in batches right-padded to their longest member."""
    if model.is_decoder:
        raise MinitxError(f"{model.config['arch']} is a decoder; use generation, not embedding")
    out = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        for k, s in enumerate(chunk):
            if len(s) == 0:
                raise MinitxError(f"input {start + k + 1} is empty (it has no tokens)")
            if len(s) > model.n_ctx:
                raise MinitxError(f"input {start + k + 1} has {len(s)} tokens; the model's context is {model.n_ctx}")
        if any(t < 0 or t >= model.vocab_size for seq in chunk for t in seq):
            bad = next(t for seq in chunk for t in seq if t < 0 or t >= model.vocab_size)
            raise MinitxError(f"token id {bad} is outside the vocabulary (0 … {model.vocab_size - 1})")
        types = token_types[start:start + batch_size] if token_types is not None else None
        fed = feeds.for_sequences(model.graph, chunk, decoder=False, token_types=types)
        out.append(model.executor(backends, strict).run(fed, outputs=["embedding"])["embedding"])
    emb = np.concatenate(out, axis=0)
    if np.isnan(emb).any():
        raise MinitxError("the model produced NaN embeddings: its weights overflow float32 arithmetic")
    return emb


def cosine_similarity(emb: np.ndarray) -> np.ndarray:
    """(N, N) cosine similarity of N embeddings (a zero vector is similar to nothing)."""
    norm = np.linalg.norm(emb, axis=1)
    return emb @ emb.T / np.outer(norm, norm).clip(1e-12)
