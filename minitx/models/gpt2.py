"""GPT-2: pre-LN decoder, learned positions, tanh-GELU MLP, LM head tied to the token embedding.

    x = E[ids] + P[pos]
    x = x + Attn(LN₁(x));  x = x + W₂·GELU(W₁·LN₂(x))     (per layer)
    logits = LN_f(x) · Eᵀ
"""
from __future__ import annotations

from ..ir import Builder, Graph
from .blocks import decoder_inputs, maybe_dropout, self_attention

DECODER = True
REQUIRED = {"vocab_size": int, "n_ctx": int, "d_model": int, "n_layers": int, "n_heads": int, "d_ff": int}
DEFAULTS = {"norm_eps": 1e-5, "activation": "gelu_tanh", "dropout": 0.0, "n_kv_heads": None}
PRESETS = {
    "tiny": dict(vocab_size=512, n_ctx=128, d_model=64, n_layers=2, n_heads=4, d_ff=256),
    "small": dict(vocab_size=50257, n_ctx=1024, d_model=768, n_layers=12, n_heads=12, d_ff=3072),
}


def build(cfg: dict) -> Graph:
    cfg = {**cfg, "n_kv_heads": cfg["n_heads"]}
    C, eps = cfg["d_model"], float(cfg["norm_eps"])
    approx = "tanh" if cfg["activation"] == "gelu_tanh" else "none"
    b = Builder()
    decoder_inputs(b, cfg)
    wte = b.param("tok_emb.weight", (cfg["vocab_size"], C))
    wpe = b.param("pos_emb.weight", (cfg["n_ctx"], C))
    x = b.op("add", b.op("embedding", "input_ids", wte, name="tok_emb"),
             b.op("embedding", "position_ids", wpe, name="pos_emb"), name="emb")
    x = maybe_dropout(b, x, cfg, "emb.dropout")
    for i in range(cfg["n_layers"]):
        p, tag = f"layers.{i}", {"layer": i}
        h = b.op("layer_norm", x, b.param(f"{p}.norm1.weight", (C,)), b.param(f"{p}.norm1.bias", (C,)),
                 name=f"{p}.norm1", eps=eps, tags=tag)
        a = self_attention(b, i, h, cfg, bias=True, causal=True, cache=True)
        x = b.op("add", x, maybe_dropout(b, a, cfg, f"{p}.attn.dropout", i), name=f"{p}.res1", tags=tag)
        h = b.op("layer_norm", x, b.param(f"{p}.norm2.weight", (C,)), b.param(f"{p}.norm2.bias", (C,)),
                 name=f"{p}.norm2", eps=eps, tags=tag)
        h = b.op("linear", h, b.param(f"{p}.mlp.up.weight", (C, cfg["d_ff"])),
                 b.param(f"{p}.mlp.up.bias", (cfg["d_ff"],)), name=f"{p}.mlp.up", tags=tag)
        h = b.op("gelu", h, name=f"{p}.mlp.act", approximate=approx, tags=tag)
        h = b.op("linear", h, b.param(f"{p}.mlp.down.weight", (cfg["d_ff"], C)),
                 b.param(f"{p}.mlp.down.bias", (C,)), name=f"{p}.mlp.down", tags=tag)
        x = b.op("add", x, maybe_dropout(b, h, cfg, f"{p}.mlp.dropout", i), name=f"{p}.res2", tags=tag)
    x = b.op("layer_norm", x, b.param("norm_f.weight", (C,)), b.param("norm_f.bias", (C,)), name="norm_f", eps=eps)
    b.op("matmul", x, wte, name="lm_head", outputs=["logits"], transpose_b=True)
    b.output("logits", *[f"present.{i}.{t}" for i in range(cfg["n_layers"]) for t in "kv"])
    return b.graph
