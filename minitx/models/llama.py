"""LLaMA: pre-RMSNorm decoder, rotary positions, SwiGLU MLP, grouped-query attention.

    x = E[ids]
    x = x + Attn(RMS₁(x), rope(q), rope(k));  x = x + W_down·(SiLU(W_gate·h) ⊙ W_up·h), h = RMS₂(x)
    logits = RMS_f(x) · W_head            (W_head = Eᵀ when tie_embeddings)
"""
from __future__ import annotations

from ..ir import Builder, Graph
from .blocks import decoder_inputs, maybe_dropout, self_attention

DECODER = True
REQUIRED = {"vocab_size": int, "n_ctx": int, "d_model": int, "n_layers": int, "n_heads": int, "n_kv_heads": int,
            "d_ff": int}
DEFAULTS = {"norm_eps": 1e-6, "rope_theta": 10000.0, "tie_embeddings": False, "dropout": 0.0}
PRESETS = {
    "tiny": dict(vocab_size=512, n_ctx=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=176),
    "small": dict(vocab_size=32000, n_ctx=2048, d_model=768, n_layers=12, n_heads=12, n_kv_heads=4, d_ff=2048),
}


def build(cfg: dict) -> Graph:
    C, F, eps = cfg["d_model"], cfg["d_ff"], float(cfg["norm_eps"])
    b = Builder()
    decoder_inputs(b, cfg)
    wte = b.param("tok_emb.weight", (cfg["vocab_size"], C))
    x = b.op("embedding", "input_ids", wte, name="tok_emb")
    x = maybe_dropout(b, x, cfg, "emb.dropout")
    for i in range(cfg["n_layers"]):
        p, tag = f"layers.{i}", {"layer": i}
        h = b.op("rms_norm", x, b.param(f"{p}.norm1.weight", (C,)), name=f"{p}.norm1", eps=eps, tags=tag)
        a = self_attention(b, i, h, cfg, bias=False, causal=True, cache=True, rope_positions="position_ids")
        x = b.op("add", x, maybe_dropout(b, a, cfg, f"{p}.attn.dropout", i), name=f"{p}.res1", tags=tag)
        h = b.op("rms_norm", x, b.param(f"{p}.norm2.weight", (C,)), name=f"{p}.norm2", eps=eps, tags=tag)
        h = b.op("linear", h, b.param(f"{p}.mlp.gate_up.weight", (C, 2 * F)), name=f"{p}.mlp.gate_up", tags=tag)
        h = b.op("swiglu", h, name=f"{p}.mlp.act", tags=tag)
        h = b.op("linear", h, b.param(f"{p}.mlp.down.weight", (F, C)), name=f"{p}.mlp.down", tags=tag)
        x = b.op("add", x, maybe_dropout(b, h, cfg, f"{p}.mlp.dropout", i), name=f"{p}.res2", tags=tag)
    x = b.op("rms_norm", x, b.param("norm_f.weight", (C,)), name="norm_f", eps=eps)
    if cfg["tie_embeddings"]:
        b.op("matmul", x, wte, name="lm_head", outputs=["logits"], transpose_b=True)
    else:
        b.op("linear", x, b.param("lm_head.weight", (C, cfg["vocab_size"])), name="lm_head", outputs=["logits"])
    b.output("logits", *[f"present.{i}.{t}" for i in range(cfg["n_layers"]) for t in "kv"])
    return b.graph
