"""T5: pre-norm encoder–decoder with RMS-style norms (no mean, no bias), no biases anywhere,
unscaled attention plus a learned relative position bias, and a ReLU (v1.0) or gated-GELU
(v1.1, ``activation: geglu``) feed-forward.

    encoder:  x = E[ids];  x += Attn(RMS(x), bias_enc);  x += FFN(RMS(x));  memory = RMS_f(x)
    decoder:  y = E[ids];  y += Attn(RMS(y), bias_dec, causal);  y += Cross(RMS(y), memory);
              y += FFN(RMS(y));  logits = (RMS_f(y) · d^-½) · Eᵀ   (tied; untied: RMS_f(y) · W)

The position bias is computed once per stack (bidirectional buckets in the encoder, causal in the
decoder) and added to every layer's scores. Attention width is n_heads · d_kv, which need not be
d_model. The graph is cut for generation as :mod:`.transformer` describes.
"""
from __future__ import annotations

from typing import Any

from ..ir import Builder, Graph
from .blocks import maybe_dropout
from .transformer import ACTIVATIONS, ENCODER_DECODER, cross_attention, cross_kv, ffn, inputs, logits, n_decoder_layers, norm  # noqa: F401

DECODER = True
REQUIRED = {"vocab_size": int, "n_ctx": int, "d_model": int, "n_layers": int, "n_heads": int, "d_ff": int, "d_kv": int}
DEFAULTS = {"n_decoder_layers": None, "norm_eps": 1e-6, "activation": "relu", "dropout": 0.0, "n_kv_heads": None,
            "num_buckets": 32, "max_distance": 128, "tie_embeddings": True, "scale_logits": True,
            "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}
PRESETS = {
    "tiny": dict(vocab_size=512, n_ctx=128, d_model=64, n_layers=2, n_heads=4, d_kv=16, d_ff=256),
    "small": dict(vocab_size=32128, n_ctx=512, d_model=512, n_layers=6, n_heads=8, d_kv=64, d_ff=2048),
}


def _attend(b: Builder, p: str, h: str, cfg: dict[str, Any], kv_from: str | None, mask: str, bias: str,
            past: tuple[str, str] | None, present: list[str] | None, causal: bool, tags: dict) -> str:
    """Self-attention of ``h`` with the stack's position bias; with ``past``, over [past; new]."""
    C, A, H = cfg["d_model"], cfg["n_heads"] * cfg["d_kv"], cfg["n_heads"]
    qkv = b.op("linear", h, b.param(f"{p}.qkv.weight", (C, 3 * A)), name=f"{p}.qkv", tags=tags)
    q, k, v = b.op("split", qkv, name=f"{p}.split", n_out=3, sizes=[A, A, A], tags=tags)
    if past is not None:
        k = b.op("concat", past[0], k, name=f"{p}.cache_k", outputs=[present[0]], axis=1, tags=tags)
        v = b.op("concat", past[1], v, name=f"{p}.cache_v", outputs=[present[1]], axis=1, tags=tags)
    a = b.op("cross_attention", q, k, v, mask, bias, name=f"{p}.sdpa", n_heads=H, causal=causal, scale=1.0, tags=tags)
    return b.op("linear", a, b.param(f"{p}.out.weight", (A, C)), name=f"{p}.out", tags=tags)


def _residual(b: Builder, x: str, sub, name: str, cfg: dict[str, Any], tags: dict) -> str:
    h = norm(b, x, f"{name}.norm", cfg, tags)
    return b.op("add", x, maybe_dropout(b, sub(h), cfg, f"{name}.dropout"), name=f"{name}.res", tags=tags)


def build(cfg: dict[str, Any]) -> Graph:
    C, A = cfg["d_model"], cfg["n_heads"] * cfg["d_kv"]
    rp = {"num_buckets": int(cfg["num_buckets"]), "max_distance": int(cfg["max_distance"])}
    b = Builder()
    inputs(b, cfg, A, encoder_positions=False)
    wte = b.param("tok_emb.weight", (cfg["vocab_size"], C))
    x = b.op("embedding", "encoder_ids", wte, name="enc.tok_emb")
    bias = b.op("relative_position_bias", b.param("enc.relpos.weight", (rp["num_buckets"], cfg["n_heads"])),
                "encoder_mask", None, name="enc.relpos", bidirectional=True, **rp)
    for i in range(cfg["n_layers"]):
        p, tag = f"enc.layers.{i}", {"stack": "encoder", "layer": i}
        x = _residual(b, x, lambda h: _attend(b, f"{p}.attn", h, cfg, None, "encoder_mask", bias, None, None, False,
                                              tag), f"{p}.attn", cfg, tag)
        x = _residual(b, x, lambda h: ffn(b, p, h, cfg, False, tag), f"{p}.mlp", cfg, tag)
    memory = norm(b, x, "enc.norm_f", cfg, {})
    for i in range(n_decoder_layers(cfg)):
        cross_kv(b, i, memory, C, A, bias=False)
    y = b.op("embedding", "input_ids", wte, name="dec.tok_emb")
    bias = b.op("relative_position_bias", b.param("dec.relpos.weight", (rp["num_buckets"], cfg["n_heads"])),
                "attention_mask", "position_ids", name="dec.relpos", bidirectional=False, **rp)
    for i in range(n_decoder_layers(cfg)):
        p, tag = f"layers.{i}", {"layer": i}
        y = _residual(b, y, lambda h: _attend(b, f"{p}.attn", h, cfg, None, "attention_mask", bias,
                                              (f"past.{i}.k", f"past.{i}.v"), [f"present.{i}.k", f"present.{i}.v"],
                                              True, tag), f"{p}.attn", cfg, tag)
        y = _residual(b, y, lambda h: cross_attention(b, i, h, cfg, A, bias=False, scale=1.0), f"{p}.cross", cfg, tag)
        y = _residual(b, y, lambda h: ffn(b, p, h, cfg, False, tag), f"{p}.mlp", cfg, tag)
    y = norm(b, y, "norm_f", cfg, {})
    scale = float(C) ** -0.5 if cfg["scale_logits"] else None  # transformers 5 scales tied or not
    logits(b, y, cfg, wte, scale)
    b.output("logits", *[f"present.{i}.{t}" for i in range(n_decoder_layers(cfg)) for t in "kv"])
    return b.graph
