"""Running encoder–decoder models: the encoder once per input, then the decoder step by step.

The model's one graph (see :mod:`minitx.models.transformer`) is cut at the cross-attention K/V
values ``cross.{i}.k/v``: everything they depend on is the encoder part, everything else the
decoder part, which takes them as inputs. The encoder runs once per batch of inputs; each decoder
step feeds one new token per row plus its self-attention KV cache and those K/V.

Inputs are right-padded (positions 0… and T5's relative buckets are then exactly those of the
unpadded input; padded keys are masked out of every attention). The decoder starts every row at
the model's ``decoder_start_token_id``; results are the tokens after it, up to and including
``eos_token_id``. No logits processors are applied (no forced BOS/EOS, no n-gram blocking): pass
the same settings to transformers to compare.

Beam search follows transformers' (≥ 4.50) vectorised beam search: 2·N candidates per input each
step; a candidate ending in EOS (or reaching the length limit) among the top N becomes a
finished hypothesis scored sum(log p) / generated_length^length_penalty; ``early_stopping`` True
stops an input once N hypotheses are finished, False once no running beam can beat the worst
finished one at its current length, "never" (with a positive length penalty) at the longest
possible length.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from . import feeds
from .backend import Backend
from .errors import MinitxError
from .executor import Executor
from .generate import Sampling, sample
from .ir import Graph, Value
from .model import Model
from .models import FAMILIES


def is_encoder_decoder(model: Model) -> bool:
    return bool(getattr(FAMILIES.get(model.config.get("arch")), "ENCODER_DECODER", False))


# --------------------------------------------------------------------------------- the cut
def split(graph: Graph) -> tuple[Graph, Graph]:
    """(encoder, decoder) parts of an encoder–decoder graph, cut at the ``cross.*`` values."""
    cut = [o for n in graph.nodes for o in n.outputs if o.startswith("cross.")]
    if not cut:
        raise MinitxError("graph: no cross.* values to split the encoder from the decoder at")
    prod = graph.producers()
    enc: set[str] = set()
    stack = list(cut)
    while stack:
        n = prod.get(stack.pop())
        if n is not None and n.name not in enc:
            enc.add(n.name)
            stack += [i for i in n.inputs if i]
    env = graph.infer({"B": 1, "E": 2, "T": 1, "S": 0})

    def part(nodes, extra_inputs, outputs):
        used = {i for n in nodes for i in n.inputs if i}
        ins = [v for v in graph.inputs if v.name in used] + extra_inputs
        params = {k: v for k, v in graph.params.items() if k in used}
        g = Graph(ins, outputs, params, nodes, dict(graph.meta))
        g.validate()
        return g

    encoder = part([n for n in graph.nodes if n.name in enc], [], cut)
    cross_in = [Value(c, ("B", "E", *env[c][0][2:]), env[c][1]) for c in cut]
    decoder = part([n for n in graph.nodes if n.name not in enc], cross_in, list(graph.outputs))
    return encoder, decoder


def executors(model: Model, backends: Sequence[str | Backend], strict: bool) -> tuple[Executor, Executor]:
    """(encoder, decoder) executors for the two parts of the model's graph, cached on the model.
    A model that runs one rank's part across processes (:class:`minitx.distributed.program.RankModel`)
    builds them itself, ``model.part_executors(split, backends, strict)``: it cuts the whole
    sharded graph with :func:`split`, then each part into its rank's program."""
    key = ("seq2seq", tuple(b if isinstance(b, str) else b.name for b in backends), strict)
    ex = model._executors.get(key)
    if ex is None:
        own = getattr(model, "part_executors", None)
        ex = model._executors[key] = (own(split, backends, strict) if own is not None else
                                      tuple(Executor(g, model.params, backends, strict) for g in split(model.graph)))
    return ex


# ------------------------------------------------------------------------------ the two parts
def encode(model: Model, sources: Sequence[Sequence[int]], backends: Sequence[str | Backend] = ("numpy",),
           strict: bool = False) -> tuple[dict[str, Any], np.ndarray]:
    """Every decoder layer's cross-attention K/V for a batch of inputs, and the inputs' padding mask."""
    from .generate import check_ids   # generate routes encoder–decoders here: imported on use

    check_ids(model, sources)
    ids, mask = feeds.pad(sources, "right")
    enc, _ = executors(model, backends, strict)
    fed = {"encoder_ids": ids, "encoder_mask": mask,
           "encoder_position_ids": np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()}
    fed = {v.name: fed[v.name] for v in enc.graph.inputs}
    return enc.run(fed), mask


def decode_step(model: Model, ids: np.ndarray, past: dict[str, Any], cross: dict[str, Any], encoder_mask: np.ndarray,
                backends: Sequence[str | Backend] = ("numpy",), strict: bool = False
                ) -> tuple[np.ndarray, dict[str, Any]]:
    """Feed ``ids`` (B, T) after the cached decoder tokens; returns logits (B, T, V) and the new cache."""
    _, dec = executors(model, backends, strict)
    ids = np.asarray(ids, np.int64)
    S = feeds.cache_length(past)
    if S + ids.shape[1] > model.n_ctx:
        raise MinitxError(f"decoder sequence of {S + ids.shape[1]} tokens exceeds the model's context of {model.n_ctx}")
    plain = Graph([v for v in dec.graph.inputs if v.name in ("input_ids", "position_ids", "attention_mask")
                   or v.name.startswith("past.")], [], {}, [])
    pos = np.broadcast_to(S + np.arange(ids.shape[1]), ids.shape)
    fed = feeds.build(plain, ids, position_ids=pos, past=past or None)
    fed.update(cross)
    fed["encoder_mask"] = encoder_mask
    out = dec.run(fed)
    return out["logits"], {k.replace("present.", "past.", 1): v for k, v in out.items() if k.startswith("present.")}


def logits(model: Model, sources: Sequence[Sequence[int]], targets: Sequence[Sequence[int]],
           backends: Sequence[str | Backend] = ("numpy",), strict: bool = False) -> np.ndarray:
    """Teacher-forced logits (B, T, V) of decoder inputs ``targets`` (equal lengths) given ``sources``."""
    cross, mask = encode(model, sources, backends, strict)
    return decode_step(model, np.asarray(targets, np.int64), {}, cross, mask, backends, strict)[0]


# ------------------------------------------------------------------------------------ search
def generate(model: Model, sources: Sequence[Sequence[int]], max_new_tokens: int = 32,
             sampling: Sampling | None = None, beams: int = 1, length_penalty: float = 1.0,
             early_stopping: bool | str = False, backends: Sequence[str | Backend] = ("numpy",),
             strict: bool = False) -> list[list[int]]:
    """Output tokens per input (after the decoder start token, up to and including EOS)."""
    if max_new_tokens < 0:
        raise MinitxError(f"max new tokens must be >= 0, got {max_new_tokens}")
    if beams < 1:
        raise MinitxError(f"beams must be >= 1, got {beams}")
    if early_stopping not in (True, False, "never"):
        raise MinitxError(f"early stopping must be true, false or 'never', got {early_stopping!r}")
    sampling = sampling or Sampling()
    if beams > 1 and sampling.temperature:
        raise MinitxError("beam search is deterministic: use --beams or --temperature, not both")
    # The decoder's positions bound the output: the start token plus max_new_tokens − 1 fed back.
    max_new_tokens = min(max_new_tokens, model.n_ctx)
    cross, mask = encode(model, sources, backends, strict)
    if max_new_tokens == 0:
        return [[] for _ in sources]
    if beams > 1:
        return _beam_search(model, cross, mask, max_new_tokens, beams, length_penalty, early_stopping, backends, strict)
    cfg = model.config
    eos, pad = int(cfg["eos_token_id"]), int(cfg["pad_token_id"])
    rng = np.random.default_rng(sampling.seed)
    B = len(sources)
    out: list[list[int]] = [[] for _ in range(B)]
    done = np.zeros(B, bool)
    feed = np.full((B, 1), int(cfg["decoder_start_token_id"]), np.int64)
    past: dict[str, Any] = {}
    for k in range(max_new_tokens):
        lg, past = decode_step(model, feed, past, cross, mask, backends, strict)
        nxt = sample(lg[:, -1], sampling, rng)
        for r, t in enumerate(nxt):
            if not done[r]:
                out[r].append(int(t))
                done[r] = int(t) == eos
        if done.all():
            break
        feed = np.where(done, pad, nxt)[:, None].astype(np.int64)
    return out


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def _take(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """a[b, idx[b, j]] along axis 1, for a of any rank ≥ 2."""
    return np.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1)


def _beam_search(model: Model, cross: dict[str, Any], mask: np.ndarray, max_new_tokens: int, K: int,
                 length_penalty: float, early_stopping: bool | str, backends, strict) -> list[list[int]]:
    cfg = model.config
    eos, pad = int(cfg["eos_token_id"]), int(cfg["pad_token_id"])
    B, V = mask.shape[0], model.vocab_size
    L = 1 + max_new_tokens                                       # the start token + the new ones
    cross = {k: np.repeat(v, K, axis=0) for k, v in cross.items()}
    mask = np.repeat(mask, K, axis=0)
    NEG = np.float32(-1e9)
    running = np.full((B, K, L), pad, np.int64)
    running[:, :, 0] = int(cfg["decoder_start_token_id"])
    scores = np.zeros((B, K), np.float32)
    scores[:, 1:] = NEG                                          # all beams start identical: use one
    finished_seqs, finished_scores = running.copy(), np.full((B, K), NEG, np.float32)
    finished_len = np.zeros((B, K), np.int64)
    finished = np.zeros((B, K), bool)
    improvable = np.ones((B, 1), bool)
    top = np.arange(2 * K) < K
    past: dict[str, Any] = {}
    cur = 1
    while True:
        lg, past = decode_step(model, running[:, :, cur - 1].reshape(B * K, 1), past, cross, mask, backends, strict)
        lp = (_log_softmax(lg[:, -1]).reshape(B, K, V) + scores[:, :, None]).reshape(B, K * V)
        idx = np.argsort(-lp, axis=1, kind="stable")[:, :2 * K]
        cand_lp = np.take_along_axis(lp, idx, axis=1)
        src, tok = idx // V, idx % V
        cand = _take(running, src).copy()
        cand[:, :, cur] = tok
        hits = (tok == eos) | (cur + 1 >= L)
        # The next running beams: the best K candidates that did not just finish.
        run_lp = cand_lp + hits * NEG
        keep = np.argsort(-run_lp, axis=1, kind="stable")[:, :K]
        running, scores, parent = _take(cand, keep), np.take_along_axis(run_lp, keep, 1), np.take_along_axis(src, keep, 1)
        # Finished hypotheses: the top K candidates that end here, length-penalised, merged with the old.
        just = hits & top[None]
        fin_lp = cand_lp / np.float32((cur + 1 - 1) ** length_penalty)
        full = finished.all(axis=1, keepdims=True) & (early_stopping is True)
        fin_lp = fin_lp + full * NEG + (~improvable) * NEG + (~just) * NEG
        m_scores = np.concatenate([finished_scores, fin_lp], axis=1)
        best = np.argsort(-m_scores, axis=1, kind="stable")[:, :K]
        finished_seqs = _take(np.concatenate([finished_seqs, cand], axis=1), best)
        finished_scores = np.take_along_axis(m_scores, best, 1)
        finished_len = np.take_along_axis(np.concatenate([finished_len, np.full((B, 2 * K), cur + 1)], axis=1), best, 1)
        finished = np.take_along_axis(np.concatenate([finished, just], axis=1), best, 1)
        rows = (np.arange(B)[:, None] * K + parent).reshape(-1)
        past = {k: v[rows] for k, v in past.items()}
        cur += 1
        hyp_len = (L - 1) if early_stopping == "never" and length_penalty > 0 else (cur - 1)
        best_running = scores[:, :1] / np.float32(hyp_len ** length_penalty)
        worst = np.where(finished, finished_scores.min(axis=1, keepdims=True), NEG)
        improvable = improvable & (best_running > worst).any(axis=1, keepdims=True)
        if not (improvable.any() and not (finished.all() and early_stopping is True) and not hits.all()):
            break
    return [finished_seqs[b, 0, 1:finished_len[b, 0]].tolist() for b in range(B)]


# ---------------------------------------------------------------------------------- training
def read_pairs(path: str, model: Model) -> list[tuple[list[int], list[int]]]:
    """A text-pair file: one ``source<TAB>target`` per line. Sides are tokenized with the model's
    tokenizer, or, without one, read as token ids separated by spaces or commas."""
    tok = model.tokenizer
    pairs = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise MinitxError(f"{path}: cannot read the pair file: {e}") from None
    for k, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if line.count("\t") != 1:
            raise MinitxError(f"{path}:{k}: expected 'source<TAB>target', found {line.count(chr(9))} tabs")
        sides = []
        for side in line.split("\t"):
            if tok is not None:
                ids = tok.encode(side, add_special_tokens=False).ids
            else:
                try:
                    ids = [int(t) for t in side.replace(",", " ").split()]
                except ValueError:
                    raise MinitxError(f"{path}:{k}: without a tokenizer each side must be token ids, got {side!r}") from None
            bad = [t for t in ids if not 0 <= t < model.vocab_size]
            if bad:
                raise MinitxError(f"{path}:{k}: token id {bad[0]} is outside the vocabulary (0 … {model.vocab_size - 1})")
            sides.append(ids)
        if not sides[0]:
            raise MinitxError(f"{path}:{k}: the source is empty")
        pairs.append((sides[0], sides[1]))
    if not pairs:
        raise MinitxError(f"{path}: no source<TAB>target pairs")
    return pairs


def training_feeds(model: Model, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> dict[str, np.ndarray]:
    """Teacher forcing: the decoder reads [start, y₁ … yₙ] and is scored on [y₁ … yₙ, EOS]; padded
    target slots are ignored (-100) and, being after every real token, never seen causally."""
    cfg = model.config
    src_ids, src_mask = feeds.pad([p[0] for p in pairs], "right")
    tgt = [list(p[1]) + [int(cfg["eos_token_id"])] for p in pairs]
    T = max(len(t) for t in tgt)
    dec = np.full((len(pairs), T), int(cfg["pad_token_id"]), np.int64)
    targets = np.full((len(pairs), T), -100, np.int64)
    for r, t in enumerate(tgt):
        dec[r, 0] = int(cfg["decoder_start_token_id"])
        dec[r, 1:len(t)] = t[:-1]
        targets[r, :len(t)] = t
    if max(src_ids.shape[1], T) > model.n_ctx:
        raise MinitxError(f"a pair of {max(src_ids.shape[1], T)} tokens exceeds the model's context of {model.n_ctx}")
    B = len(pairs)
    out = {"encoder_ids": src_ids, "encoder_mask": src_mask,
           "encoder_position_ids": np.broadcast_to(np.arange(src_ids.shape[1]), src_ids.shape).copy(),
           "input_ids": dec, "position_ids": np.broadcast_to(np.arange(T), dec.shape).copy(),
           "attention_mask": np.ones((B, T), np.int64), "targets": targets}
    for v in model.graph.inputs:
        if v.name.startswith("past."):
            out[v.name] = np.zeros((B, 0, int(v.shape[2])), np.dtype(v.dtype))
    return out
