"""The encoder–decoder Transformer (Vaswani et al.), and the pieces BART, Marian and T5 share.

**Representation.** An encoder–decoder model is *one* graph, the teacher-forced model:

    encoder:  encoder_ids, encoder_mask (B, E) [, encoder_position_ids]  →  memory (B, E, C)
              memory · W_kv(layer i)  →  cross.{i}.k, cross.{i}.v  (B, E, C)     (per decoder layer)
    decoder:  input_ids, position_ids (B, T), attention_mask (B, S+T), past.{i}.k/v (B, S, C),
              cross.{i}.k/v, encoder_mask  →  logits (B, T, V), present.{i}.k/v

so training, plugins, golden files and ``show`` see a single graph like every other family's.
Generation cuts it in two at the ``cross.*`` values (:func:`minitx.seq2seq.split`): the encoder
part runs once per input and yields every layer's cross-attention K/V; the decoder part runs per
step with its self-attention KV cache and those K/V fed back in. A rewrite applied to the whole
graph (quantizing the cross K/V projection, say) is therefore seen by both parts.

**The original architecture** (``arch: transformer``): scaled shared embeddings plus sinusoidal
positions, post-norm blocks (x = LN(x + sublayer(x))), ReLU feed-forward, logits tied to the
embedding. BART and Marian are this builder with other switches (``prenorm``, ``positions``,
``activation``, ``emb_norm``, ``logits_bias``, ``shared_embeddings``: one token table for both
stacks, or ``enc.tok_emb``/``dec.tok_emb``; ``tie_embeddings``: the output layer is the decoder's
table transposed, or its own ``lm_head.weight``).
"""
from __future__ import annotations

from typing import Any

from ..ir import Builder, Graph

DECODER = True
ENCODER_DECODER = True
REQUIRED = {"vocab_size": int, "n_ctx": int, "d_model": int, "n_layers": int, "n_heads": int, "d_ff": int}
# Switches shared by the families this builder serves; each family fixes its own defaults.
SWITCHES = {"n_decoder_layers": None, "norm_eps": 1e-5, "activation": "relu", "dropout": 0.0, "n_kv_heads": None,
            "prenorm": False, "positions": "sinusoidal", "scale_embeddings": True, "emb_norm": False,
            "final_norm": False, "shared_embeddings": True, "tie_embeddings": True, "logits_bias": False,
            "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}
DEFAULTS = dict(SWITCHES)
PRESETS = {
    "tiny": dict(vocab_size=512, n_ctx=128, d_model=64, n_layers=2, n_heads=4, d_ff=256),
    "base": dict(vocab_size=37000, n_ctx=512, d_model=512, n_layers=6, n_heads=8, d_ff=2048),
}

ACTIVATIONS = {"relu": ("relu", {}), "gelu": ("gelu", {}), "gelu_tanh": ("gelu", {"approximate": "tanh"}),
               "silu": ("silu", {}), "geglu": ("geglu", {"approximate": "tanh"})}


def n_decoder_layers(cfg: dict[str, Any]) -> int:
    return int(cfg.get("n_decoder_layers") or cfg["n_layers"])


def cross_names(cfg: dict[str, Any]) -> list[str]:
    """The values at which generation cuts the graph: every decoder layer's cross-attention K/V."""
    return [f"cross.{i}.{t}" for i in range(n_decoder_layers(cfg)) for t in "kv"]


def inputs(b: Builder, cfg: dict[str, Any], width: int, encoder_positions: bool) -> None:
    b.input("encoder_ids", ("B", "E"), "int64")
    b.input("encoder_mask", ("B", "E"), "int64")
    if encoder_positions:
        b.input("encoder_position_ids", ("B", "E"), "int64")
    b.input("input_ids", ("B", "T"), "int64")
    b.input("position_ids", ("B", "T"), "int64")
    b.input("attention_mask", ("B", "S+T"), "int64")
    for i in range(n_decoder_layers(cfg)):
        b.input(f"past.{i}.k", ("B", "S", width))
        b.input(f"past.{i}.v", ("B", "S", width))


def norm(b: Builder, x: str, name: str, cfg: dict[str, Any], tags: dict) -> str:
    C, eps = cfg["d_model"], float(cfg["norm_eps"])
    if cfg.get("arch") == "t5":
        return b.op("rms_norm", x, b.param(f"{name}.weight", (C,)), name=name, eps=eps, tags=tags)
    return b.op("layer_norm", x, b.param(f"{name}.weight", (C,)), b.param(f"{name}.bias", (C,)), name=name,
                eps=eps, tags=tags)


def ffn(b: Builder, p: str, h: str, cfg: dict[str, Any], bias: bool, tags: dict) -> str:
    C, F = cfg["d_model"], cfg["d_ff"]
    op, attrs = ACTIVATIONS[cfg["activation"]]
    gated = op == "geglu"
    up = f"{p}.mlp.gate_up" if gated else f"{p}.mlp.up"
    w = 2 * F if gated else F
    h = b.op("linear", h, b.param(f"{up}.weight", (C, w)), b.param(f"{up}.bias", (w,)) if bias else None,
             name=up, tags=tags)
    h = b.op(op, h, name=f"{p}.mlp.act", tags=tags, **attrs)
    return b.op("linear", h, b.param(f"{p}.mlp.down.weight", (F, C)),
                b.param(f"{p}.mlp.down.bias", (C,)) if bias else None, name=f"{p}.mlp.down", tags=tags)


def cross_kv(b: Builder, i: int, memory: str, d_model: int, width: int, bias: bool) -> None:
    """Layer i's cross-attention K/V from the encoder output, computed once per input."""
    A, p = width, f"layers.{i}.cross"
    kv = b.op("linear", memory, b.param(f"{p}.kv.weight", (d_model, 2 * A)),
              b.param(f"{p}.kv.bias", (2 * A,)) if bias else None, name=f"{p}.kv", tags={"layer": i})
    b.op("split", kv, name=f"{p}.split_kv", outputs=[f"cross.{i}.k", f"cross.{i}.v"], sizes=[A, A],
         tags={"layer": i})


def cross_attention(b: Builder, i: int, h: str, cfg: dict[str, Any], width: int, bias: bool,
                    scale: float | None = None) -> str:
    C, p, tag = cfg["d_model"], f"layers.{i}.cross", {"layer": i}
    q = b.op("linear", h, b.param(f"{p}.q.weight", (C, width)), b.param(f"{p}.q.bias", (width,)) if bias else None,
             name=f"{p}.q", tags=tag)
    attrs = {} if scale is None else {"scale": scale}
    a = b.op("cross_attention", q, f"cross.{i}.k", f"cross.{i}.v", "encoder_mask", None, name=f"{p}.sdpa",
             n_heads=cfg["n_heads"], tags=tag, **attrs)
    return b.op("linear", a, b.param(f"{p}.out.weight", (width, C)), b.param(f"{p}.out.bias", (C,)) if bias else None,
                name=f"{p}.out", tags=tag)


def logits(b: Builder, y: str, cfg: dict[str, Any], wte: str, scale: float | None = None) -> None:
    """Tied (y·Eᵀ, optionally y scaled first, as T5 does) or untied head, plus BART/Marian's
    final logits bias."""
    V, C = cfg["vocab_size"], cfg["d_model"]
    has_bias = bool(cfg.get("logits_bias"))
    out = "lm_head.logits" if has_bias else "logits"
    if scale is not None:
        y = b.op("scale", y, name="lm_head.scale", factor=scale)
    if cfg["tie_embeddings"]:
        x = b.op("matmul", y, wte, name="lm_head", outputs=[out], transpose_b=True)
    else:
        x = b.op("linear", y, b.param("lm_head.weight", (C, V)), name="lm_head", outputs=[out])
    if has_bias:
        b.op("add", x, b.param("lm_head.bias", (V,)), name="lm_head.add_bias", outputs=["logits"])


def _embed(b: Builder, ids: str, pos: str, wte: str, stack: str, cfg: dict[str, Any]) -> str:
    C = cfg["d_model"]
    x = b.op("embedding", ids, wte, name=f"{stack}.tok_emb")
    if cfg["scale_embeddings"]:
        x = b.op("scale", x, name=f"{stack}.emb_scale", factor=float(C) ** 0.5)
    kind = cfg["positions"]
    if kind == "learned":
        pe = b.op("embedding", pos, b.param(f"{stack}.pos_emb.weight", (cfg["n_ctx"], C)), name=f"{stack}.pos_emb")
    else:
        pe = b.op("sinusoidal_positions", pos, name=f"{stack}.pos_emb", dim=C, max_len=cfg["n_ctx"],
                  halves=kind == "sinusoidal_halves")
    x = b.op("add", x, pe, name=f"{stack}.emb")
    if cfg["emb_norm"]:
        x = norm(b, x, f"{stack}.emb_norm", cfg, {})
    return x


def _block(b: Builder, x: str, sublayer, name: str, cfg: dict[str, Any], tags: dict) -> str:
    """x + f(LN(x)) (pre-norm) or LN(x + f(x)) (post-norm)."""
    from .blocks import maybe_dropout

    if cfg["prenorm"]:
        return b.op("add", x, maybe_dropout(b, sublayer(norm(b, x, f"{name}.norm", cfg, tags)), cfg, f"{name}.dropout"),
                    name=f"{name}.res", tags=tags)
    x = b.op("add", x, maybe_dropout(b, sublayer(x), cfg, f"{name}.dropout"), name=f"{name}.res", tags=tags)
    return norm(b, x, f"{name}.norm", cfg, tags)


def _self_attention(b: Builder, p: str, h: str, cfg: dict[str, Any], mask: str, past, outs, causal: bool,
                    tags: dict) -> str:
    C, H = cfg["d_model"], cfg["n_heads"]
    qkv = b.op("linear", h, b.param(f"{p}.qkv.weight", (C, 3 * C)), b.param(f"{p}.qkv.bias", (3 * C,)),
               name=f"{p}.qkv", tags=tags)
    q, k, v = b.op("split", qkv, name=f"{p}.split", n_out=3, sizes=[C, C, C], tags=tags)
    a, _, _ = b.op("attention", q, k, v, *past, mask, name=f"{p}.sdpa", outputs=outs, n_heads=H, n_kv_heads=H,
                   causal=causal, tags=tags)
    return b.op("linear", a, b.param(f"{p}.out.weight", (C, C)), b.param(f"{p}.out.bias", (C,)), name=f"{p}.out",
                tags=tags)


def build(cfg: dict[str, Any]) -> Graph:
    C = cfg["d_model"]
    b = Builder()
    inputs(b, cfg, C, encoder_positions=True)
    V = cfg["vocab_size"]
    # One table for encoder, decoder (and a tied output layer), or one per stack when untied.
    wte = b.param("tok_emb.weight", (V, C)) if cfg["shared_embeddings"] else b.param("enc.tok_emb.weight", (V, C))
    x = _embed(b, "encoder_ids", "encoder_position_ids", wte, "enc", cfg)
    for i in range(cfg["n_layers"]):
        p, tag = f"enc.layers.{i}", {"stack": "encoder", "layer": i}
        outs = [f"{p}.attn.out_heads", f"{p}.attn.k", f"{p}.attn.v"]
        x = _block(b, x, lambda h: _self_attention(b, f"{p}.attn", h, cfg, "encoder_mask", (None, None), outs,
                                                   False, tag), f"{p}.attn", cfg, tag)
        x = _block(b, x, lambda h: ffn(b, p, h, cfg, True, tag), f"{p}.mlp", cfg, tag)
    if cfg["final_norm"]:
        x = norm(b, x, "enc.norm_f", cfg, {})
    for i in range(n_decoder_layers(cfg)):
        cross_kv(b, i, x, C, C, bias=True)
    if not cfg["shared_embeddings"]:
        wte = b.param("dec.tok_emb.weight", (V, C))
    y = _embed(b, "input_ids", "position_ids", wte, "dec", cfg)
    for i in range(n_decoder_layers(cfg)):
        p, tag = f"layers.{i}", {"layer": i}
        outs = [f"{p}.attn.out_heads", f"present.{i}.k", f"present.{i}.v"]
        y = _block(b, y, lambda h: _self_attention(b, f"{p}.attn", h, cfg, "attention_mask",
                                                   (f"past.{i}.k", f"past.{i}.v"), outs, True, tag),
                   f"{p}.attn", cfg, tag)
        y = _block(b, y, lambda h: cross_attention(b, i, h, cfg, C, bias=True), f"{p}.cross", cfg, tag)
        y = _block(b, y, lambda h: ffn(b, p, h, cfg, True, tag), f"{p}.mlp", cfg, tag)
    if cfg["final_norm"]:
        y = norm(b, y, "norm_f", cfg, {})
    logits(b, y, cfg, wte)
    b.output("logits", *[f"present.{i}.{t}" for i in range(n_decoder_layers(cfg)) for t in "kv"])
    return b.graph
