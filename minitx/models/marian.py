"""Marian (MarianMT): the encoder–decoder Transformer with √d-scaled embeddings, sinusoidal
positions laid out as [sines | cosines], post-norm blocks, SiLU feed-forward and a final logits
bias (see :mod:`.transformer`). The decoder starts from the pad token, as in transformers.
"""
from __future__ import annotations

from .transformer import ACTIVATIONS, ENCODER_DECODER, REQUIRED, SWITCHES, build  # noqa: F401

DECODER = True
DEFAULTS = {**SWITCHES, "positions": "sinusoidal_halves", "scale_embeddings": True, "activation": "silu",
            "logits_bias": True, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}
PRESETS = {
    "tiny": dict(vocab_size=512, n_ctx=128, d_model=64, n_layers=2, n_heads=4, d_ff=256),
    "base": dict(vocab_size=58101, n_ctx=512, d_model=512, n_layers=6, n_heads=8, d_ff=2048),
}
