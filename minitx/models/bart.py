"""BART: the encoder–decoder Transformer with learned positions, an embedding LayerNorm, post-norm
blocks, exact-GELU feed-forward and a final logits bias (see :mod:`.transformer` for the graph
and how generation splits it).

HF stores BART's position tables with two extra leading rows (its ``offset = 2``); conversion
drops them, so position p reads row p here.
"""
from __future__ import annotations

from .transformer import ACTIVATIONS, ENCODER_DECODER, REQUIRED, SWITCHES, build  # noqa: F401

DECODER = True
DEFAULTS = {**SWITCHES, "positions": "learned", "scale_embeddings": False, "emb_norm": True, "activation": "gelu",
            "logits_bias": True, "pad_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 2}
PRESETS = {
    "tiny": dict(vocab_size=512, n_ctx=128, d_model=64, n_layers=2, n_heads=4, d_ff=256),
    "base": dict(vocab_size=50265, n_ctx=1024, d_model=768, n_layers=6, n_heads=12, d_ff=3072),
}
