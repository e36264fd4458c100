"""Training text: reading it, byte-level BPE tokenizers, the held-out split and batches.

The split is by position (the last ``val_fraction`` of the token stream is held out), so no
window of the evaluation text was ever seen in training.
"""
from __future__ import annotations

import json
import os

import numpy as np

from .errors import MinitxError, regular_file

EOT = "<|endoftext|>"


def _read_utf8(path: str, what: str, not_utf8: str) -> str:
    """The whole of a regular UTF-8 file; every failure one line naming ``path``."""
    regular_file(path, what)
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise MinitxError(f"{path}: {not_utf8} ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise MinitxError(f"{path}: cannot read: {e.strerror}") from None


def read_text(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    text = _read_utf8(path, "data file", "not UTF-8 text")
    if not text.strip():
        raise MinitxError(f"{path}: the data file is empty")
    return text


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise MinitxError("tokenizer training needs the hf extra: pip install 'minitx[hf]'") from None
    return tokenizers


def train_tokenizer(text: str, vocab_size: int) -> str:
    """A byte-level BPE (GPT-2 style: every byte is a token, so no text is unencodable) trained on
    ``text``; returns its tokenizer.json."""
    tk = _tokenizers()
    from .models import LIMITS

    if not 257 <= vocab_size <= LIMITS["vocab_size"]:
        raise MinitxError(f"--vocab-size must be in 257 (256 bytes + end-of-text) … {LIMITS['vocab_size']}, "
                          f"got {vocab_size}")
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_chunks(text), trainer)
    return tok.to_str()


def load_tokenizer_json(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    s = _read_utf8(path, "tokenizer file", "not a valid tokenizer.json: not UTF-8")
    try:
        json.loads(s)
        _tokenizers().Tokenizer.from_str(s)
    except Exception as e:  # the tokenizers library raises its own exception types
        raise MinitxError(f"{path}: not a valid tokenizer.json: {e}") from None
    return s


def _chunks(text: str, size: int = 1 << 16) -> list[str]:
    """Split at line ends into pieces of about ``size`` characters, for batch encoding."""
    out, start = [], 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        out.append(text[start:end])
        start = end
    return out


def encode(tokenizer_json: str, text: str) -> np.ndarray:
    """The whole text as one int64 token stream."""
    tok = _tokenizers().Tokenizer.from_str(tokenizer_json)
    ids = [e.ids for e in tok.encode_batch(_chunks(text), add_special_tokens=False)]
    return np.fromiter((i for part in ids for i in part), dtype=np.int64)


def split(ids: np.ndarray, val_fraction: float, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) token streams; the held-out part is the tail of the text."""
    if not 0.0 <= val_fraction < 1.0:
        raise MinitxError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    n_val = int(len(ids) * val_fraction)
    if n_val and n_val < seq_len + 1:
        n_val = min(seq_len + 1, len(ids) // 2)
    train, val = ids[: len(ids) - n_val], ids[len(ids) - n_val:]
    if len(train) < seq_len + 1:
        raise MinitxError(f"the data has {len(ids)} tokens: too few for training windows of {seq_len}+1 tokens "
                          f"(use more text or a smaller --seq)")
    return train, val


def random_batch(ids: np.ndarray, batch: int, seq_len: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``batch`` windows at random offsets: inputs and next-token targets, both (batch, seq_len)."""
    starts = rng.integers(0, len(ids) - seq_len, size=batch)
    x = np.stack([ids[s: s + seq_len] for s in starts])
    y = np.stack([ids[s + 1: s + seq_len + 1] for s in starts])
    return x, y


def eval_windows(ids: np.ndarray, n_ctx: int, stride: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Sliding windows of up to ``n_ctx`` tokens over ``ids``, every token predicted exactly once.

    Each window after the first starts ``stride`` tokens after the previous one and scores only
    the tokens not scored before (the others get target -100 and only serve as context), so
    every prediction sees at least ``n_ctx - stride`` tokens of context.
    """
    stride = n_ctx if stride is None else stride
    if not 0 < stride <= n_ctx:
        raise MinitxError(f"--stride must be in 1 … {n_ctx}, got {stride}")
    out, scored_to, start = [], 1, 0   # targets ids[1:scored_to] are already counted
    n = len(ids)
    while scored_to < n:
        end = min(start + n_ctx, n - 1)
        x = ids[start:end]
        y = ids[start + 1: end + 1].copy()
        first_new = max(scored_to - 1 - start, 0)   # index in y of the first target not yet scored
        y[:first_new] = -100
        out.append((x, y))
        scored_to = end + 1
        if end >= n - 1:
            break
        start += stride
    return out
