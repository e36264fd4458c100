"""What a command runs a model on: token ids from text (the model's own tokenizer), from
comma-separated ids, or seeded at random.

Commands take these in one vocabulary (``--prompt`` for decoders, ``--text`` for encoders,
``--ids 1,2,3``, ``--random BxT``); every check happens here, before any model runs, so that a
command fails before it prints or writes anything.
"""
from __future__ import annotations

from typing import Sequence

from .errors import MinitxError
from .generate import check_ids
from .model import Model


def parse_ids(spec: str, flag: str = "--ids") -> list[int]:
    """``"1, 2,3"`` → ``[1, 2, 3]``."""
    try:
        return [int(x) for x in spec.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise MinitxError(f"{flag} expects comma-separated integers, got {spec!r}") from None


def parse_random(spec: str, flag: str = "--random") -> tuple[int, int]:
    """``"4x32"`` → (4, 32): B rows of up to T tokens (``"4,32"``, the old spelling, still parses)."""
    parts = spec.lower().replace(",", "x").split("x")
    try:
        b, t = (int(x) for x in parts)
    except ValueError:
        raise MinitxError(f"{flag} expects BxT (rows x tokens, e.g. 4x32), got {spec!r}") from None
    if b < 1 or t < 1:
        raise MinitxError(f"{flag} needs B and T >= 1, got {spec!r}")
    return b, t


def token_sequences(model: Model, texts: Sequence[str], ids: Sequence[str], flag: str) -> list[list[int]]:
    """Token ids of ``texts`` (tokenized with the model's tokenizer) or of ``ids`` specs, checked
    against the model's vocabulary and context. ``flag`` names the text option in errors."""
    if texts and ids:
        raise MinitxError(f"give either {flag} or --ids, not both")
    if ids:
        seqs = [parse_ids(s) for s in ids]
        check_ids(model, seqs)
        return seqs
    if not texts:
        raise MinitxError(f"nothing to run: give {flag} TEXT or --ids 1,2,3")
    tok = model.tokenizer
    if tok is None:
        raise MinitxError("this model carries no tokenizer; give token ids with --ids 1,2,3")
    if not model.is_decoder and model.config.get("max_seq_length"):
        tok.enable_truncation(int(model.config["max_seq_length"]))
    seqs = [tok.encode(t).ids for t in texts]
    for k, s in enumerate(seqs):
        if not s:
            raise MinitxError(f"{flag} {k + 1} is empty (it has no tokens)")
    check_ids(model, seqs)
    return seqs


def model_inputs(model: Model, prompts: Sequence[str] = (), texts: Sequence[str] = (), ids: Sequence[str] = (),
                 random: str | None = None, seed: int = 0) -> list[list[int]]:
    """A batch for ``model`` from exactly one kind of input: ``prompts`` (decoders), ``texts``
    (encoders), ``ids`` specs, or a ``random`` BxT spec drawn with ``seed``."""
    if random:
        if prompts or texts or ids:
            raise MinitxError("give either --random or --prompt/--text/--ids, not both")
        from .golden import random_seqs

        b, t = parse_random(random)
        return random_seqs(model, b, t, seed)
    if model.is_decoder and texts:
        raise MinitxError("--text is for encoders; use --prompt with a decoder")
    if not model.is_decoder and prompts:
        raise MinitxError("--prompt is for decoders; use --text with an encoder")
    return token_sequences(model, prompts or texts, ids, "--prompt" if model.is_decoder else "--text")


def stop_token(model: Model, s: str) -> int:
    """A ``--stop`` value: a token id, or a string the tokenizer maps to exactly one token."""
    if s.lstrip("-").isdigit():
        tid = int(s)
        if not 0 <= tid < model.vocab_size:
            raise MinitxError(f"--stop {s}: token id outside the vocabulary (0 … {model.vocab_size - 1})")
        return tid
    tok = model.tokenizer
    if tok is not None:
        tid = tok.token_to_id(s)
        if tid is None:
            found = tok.encode(s, add_special_tokens=False).ids
            tid = found[0] if len(found) == 1 else None
        if tid is not None:
            return int(tid)
    raise MinitxError(f"--stop {s!r} is neither a token id nor a single token of this model's tokenizer")
