"""Model families: each turns a config dict into an IR graph and a set of initial weights.

Every family's graph takes ``input_ids``, ``position_ids`` and ``attention_mask`` (1 = a real
token). Decoders also take the KV cache — ``past.{i}.k``/``past.{i}.v`` of shape
(B, S, kv_heads·head_dim), S = 0 for a fresh prompt — and return ``logits`` and
``present.{i}.k``/``present.{i}.v``; one graph serves prefill and every decode step. Encoders
return ``hidden`` and the sentence ``embedding``.
"""
from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from ..errors import MinitxError
from ..ir import Graph, Node, Value
from . import bart, bert, gpt2, llama, marian, t5, transformer

FAMILIES: dict[str, ModuleType] = {"gpt2": gpt2, "bert": bert, "llama": llama,
                                     # encoder–decoders (ENCODER_DECODER = True): minitx.seq2seq runs them
                                     "t5": t5, "bart": bart, "marian": marian, "transformer": transformer}


def family(config: dict[str, Any]) -> ModuleType:
    arch = config.get("arch")
    if arch not in FAMILIES:
        raise MinitxError(f"unknown architecture {arch!r} (supported: {', '.join(FAMILIES)})")
    return FAMILIES[arch]


def is_decoder(config: dict[str, Any]) -> bool:
    return family(config).DECODER


def complete_config(config: dict[str, Any]) -> dict[str, Any]:
    """Fill defaults and check every field, naming the first one that is wrong."""
    fam = family(config)
    out = {**fam.DEFAULTS, **config}
    unknown = set(out) - set(fam.DEFAULTS) - set(fam.REQUIRED) - {"arch"}
    if unknown:
        raise MinitxError(f"config: unknown field(s) {sorted(unknown)} for arch {out['arch']}")
    for key, kind in fam.REQUIRED.items():
        if key not in out:
            raise MinitxError(f"config: missing field {key!r} for arch {out['arch']}")
        v = out[key]
        if kind is int and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            raise MinitxError(f"config: {key} must be a positive integer, got {v!r}")
    for key in ("norm_eps", "rope_theta"):
        if key in out and not (isinstance(out[key], (int, float)) and out[key] > 0):
            raise MinitxError(f"config: {key} must be a positive number, got {out[key]!r}")
    if out["d_model"] % out["n_heads"]:
        raise MinitxError(f"config: d_model {out['d_model']} is not divisible by n_heads {out['n_heads']}")
    kv = out.get("n_kv_heads") or out["n_heads"]
    if out["n_heads"] % kv:
        raise MinitxError(f"config: n_heads {out['n_heads']} is not a multiple of n_kv_heads {kv}")
    if not (0.0 <= float(out.get("dropout", 0.0)) < 1.0):
        raise MinitxError(f"config: dropout must be in [0, 1), got {out['dropout']!r}")
    return out


def build_graph(config: dict[str, Any]) -> Graph:
    config = complete_config(config)
    g = family(config).build(config)
    g.meta["arch"] = config["arch"]
    g.validate()
    return g


def init_params(config: dict[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights in the usual GPT-2/BERT style: N(0, 0.02), residual projections scaled by
    1/√(2·layers), norms at 1, biases at 0."""
    config = complete_config(config)
    g = build_graph(config)
    rng = np.random.default_rng(seed)
    std = 0.02
    out = {}
    for name, v in g.params.items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "bias":
            a = np.zeros(v.shape)
        elif "norm" in name:
            a = np.ones(v.shape)
        else:
            s = std / np.sqrt(2 * config["n_layers"]) if name.endswith(("attn.out.weight", "mlp.down.weight")) else std
            a = rng.normal(0.0, s, v.shape)
        out[name] = a.astype(v.dtype)
    return out


def preset(arch: str, name: str) -> dict[str, Any]:
    fam = FAMILIES.get(arch)
    if fam is None:
        raise MinitxError(f"unknown architecture {arch!r} (supported: {', '.join(FAMILIES)})")
    if name not in fam.PRESETS:
        raise MinitxError(f"unknown preset {name!r} for {arch} (choose from {', '.join(fam.PRESETS)})")
    return {"arch": arch, **fam.PRESETS[name]}


def with_loss(graph: Graph, logits: str = "logits") -> Graph:
    """The training graph: the model plus ``targets`` (B, T) and a mean cross-entropy ``loss``."""
    g = graph.copy()
    g.inputs.append(Value("targets", ("B", "T"), "int64"))
    g.nodes.append(Node("loss", "cross_entropy", [logits, "targets"], ["loss"], {"ignore_index": -100}))
    g.outputs = ["loss", *g.outputs]
    return g
