"""Pieces the three families share: graph inputs and the attention sub-block."""
from __future__ import annotations

from typing import Any

from ..ir import Builder


def decoder_inputs(b: Builder, cfg: dict[str, Any]) -> None:
    b.input("input_ids", ("B", "T"), "int64")
    b.input("position_ids", ("B", "T"), "int64")
    b.input("attention_mask", ("B", "S+T"), "int64")
    kv = cfg["n_kv_heads"] * cfg["d_model"] // cfg["n_heads"]
    for i in range(cfg["n_layers"]):
        b.input(f"past.{i}.k", ("B", "S", kv))
        b.input(f"past.{i}.v", ("B", "S", kv))


def self_attention(b: Builder, i: int, h: str, cfg: dict[str, Any], *, bias: bool, causal: bool,
                   cache: bool, rope_positions: str | None = None) -> str:
    """qkv = h·W_qkv; (rotary on q and k); attention over [past; new]; output projection."""
    C, H, KV = cfg["d_model"], cfg["n_heads"], cfg["n_kv_heads"]
    kv = KV * C // H
    p = f"layers.{i}.attn"
    tag = {"layer": i}
    w = b.param(f"{p}.qkv.weight", (C, C + 2 * kv))
    bb = b.param(f"{p}.qkv.bias", (C + 2 * kv,)) if bias else None
    qkv = b.op("linear", h, w, bb, name=f"{p}.qkv", tags=tag)
    q, k, v = b.op("split", qkv, name=f"{p}.split", n_out=3, sizes=[C, kv, kv], tags=tag)
    if rope_positions is not None:
        q = b.op("rope", q, rope_positions, name=f"{p}.rope_q", n_heads=H, theta=float(cfg["rope_theta"]), tags=tag)
        k = b.op("rope", k, rope_positions, name=f"{p}.rope_k", n_heads=KV, theta=float(cfg["rope_theta"]), tags=tag)
    past = (f"past.{i}.k", f"past.{i}.v") if cache else (None, None)
    outs = [f"{p}.out_heads", f"present.{i}.k", f"present.{i}.v"]
    a, _, _ = b.op("attention", q, k, v, *past, "attention_mask", name=f"{p}.sdpa", outputs=outs,
                   n_heads=H, n_kv_heads=KV, causal=causal, tags=tag)
    wo = b.param(f"{p}.out.weight", (C, C))
    bo = b.param(f"{p}.out.bias", (C,)) if bias else None
    return b.op("linear", a, wo, bo, name=f"{p}.out", tags=tag)


def maybe_dropout(b: Builder, x: str, cfg: dict[str, Any], name: str, layer: int | None = None) -> str:
    p = float(cfg.get("dropout", 0.0))
    if p == 0.0:
        return x
    seed = sum(ord(c) * (k + 1) for k, c in enumerate(name)) % (2**31)
    return b.op("dropout", x, name=name, p=p, seed=seed, tags={} if layer is None else {"layer": layer})
