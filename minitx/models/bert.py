"""BERT: post-LN encoder with token-type embeddings and a padding mask; mean pooling gives the
sentence embedding (optionally L2-normalised, as sentence-transformers models do).

    x = LN(E[ids] + P[pos] + T[types])
    x = LN₁(x + Attn(x));  x = LN₂(x + W₂·GELU(W₁·x))      (per layer)
    embedding = mean over real tokens of x  (then x/‖x‖ when normalize)
"""
from __future__ import annotations

from ..ir import Builder, Graph
from .blocks import maybe_dropout, self_attention

DECODER = False
REQUIRED = {"vocab_size": int, "n_ctx": int, "type_vocab_size": int, "d_model": int, "n_layers": int,
            "n_heads": int, "d_ff": int}
DEFAULTS = {"norm_eps": 1e-12, "activation": "gelu", "dropout": 0.0, "normalize": True, "max_seq_length": None,
            "n_kv_heads": None, "pooling": "mean"}
PRESETS = {
    "tiny": dict(vocab_size=512, n_ctx=128, type_vocab_size=2, d_model=64, n_layers=2, n_heads=4, d_ff=256),
    "small": dict(vocab_size=30522, n_ctx=512, type_vocab_size=2, d_model=384, n_layers=6, n_heads=12, d_ff=1536),
}


def build(cfg: dict) -> Graph:
    cfg = {**cfg, "n_kv_heads": cfg["n_heads"]}
    C, F, eps = cfg["d_model"], cfg["d_ff"], float(cfg["norm_eps"])
    approx = "tanh" if cfg["activation"] == "gelu_tanh" else "none"
    b = Builder()
    b.input("input_ids", ("B", "T"), "int64")
    b.input("position_ids", ("B", "T"), "int64")
    b.input("token_type_ids", ("B", "T"), "int64")
    b.input("attention_mask", ("B", "T"), "int64")
    x = b.op("embedding", "input_ids", b.param("tok_emb.weight", (cfg["vocab_size"], C)), name="tok_emb")
    pe = b.op("embedding", "position_ids", b.param("pos_emb.weight", (cfg["n_ctx"], C)), name="pos_emb")
    te = b.op("embedding", "token_type_ids", b.param("type_emb.weight", (cfg["type_vocab_size"], C)), name="type_emb")
    x = b.op("add", b.op("add", x, pe, name="emb_add1"), te, name="emb_add2")
    x = b.op("layer_norm", x, b.param("emb_norm.weight", (C,)), b.param("emb_norm.bias", (C,)), name="emb_norm", eps=eps)
    x = maybe_dropout(b, x, cfg, "emb.dropout")
    for i in range(cfg["n_layers"]):
        p, tag = f"layers.{i}", {"layer": i}
        a = self_attention(b, i, x, cfg, bias=True, causal=False, cache=False)
        x = b.op("add", x, maybe_dropout(b, a, cfg, f"{p}.attn.dropout", i), name=f"{p}.res1", tags=tag)
        x = b.op("layer_norm", x, b.param(f"{p}.norm1.weight", (C,)), b.param(f"{p}.norm1.bias", (C,)),
                 name=f"{p}.norm1", eps=eps, tags=tag)
        h = b.op("linear", x, b.param(f"{p}.mlp.up.weight", (C, F)), b.param(f"{p}.mlp.up.bias", (F,)),
                 name=f"{p}.mlp.up", tags=tag)
        h = b.op("gelu", h, name=f"{p}.mlp.act", approximate=approx, tags=tag)
        h = b.op("linear", h, b.param(f"{p}.mlp.down.weight", (F, C)), b.param(f"{p}.mlp.down.bias", (C,)),
                 name=f"{p}.mlp.down", tags=tag)
        x = b.op("add", x, maybe_dropout(b, h, cfg, f"{p}.mlp.dropout", i), name=f"{p}.res2", tags=tag)
        x = b.op("layer_norm", x, b.param(f"{p}.norm2.weight", (C,)), b.param(f"{p}.norm2.bias", (C,)),
                 name=f"{p}.norm2", eps=eps, tags=tag, outputs=["hidden"] if i == cfg["n_layers"] - 1 else None)
    e = b.op("mean_pool", x, "attention_mask", name="pool")
    if cfg["normalize"]:
        e = b.op("l2_normalize", e, name="normalize")
    b.graph.nodes[-1].outputs = ["embedding"]
    b.output("hidden", "embedding")
    return b.graph
