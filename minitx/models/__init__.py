"""Model families: each turns a config dict into an IR graph and a set of initial weights.

Every family's graph takes ``input_ids``, ``position_ids`` and ``attention_mask`` (1 = a real
token). Decoders also take the KV cache — ``past.{i}.k``/``past.{i}.v`` of shape
(B, S, kv_heads·head_dim), S = 0 for a fresh prompt — and return ``logits`` and
``present.{i}.k``/``present.{i}.v``; one graph serves prefill and every decode step. Encoders
return ``hidden`` and the sentence ``embedding``.
"""
from __future__ import annotations

import os
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
    if not isinstance(arch, str) or arch not in FAMILIES:
        raise MinitxError(f"unknown architecture {_short(arch)} (supported: {', '.join(FAMILIES)})")
    return FAMILIES[arch]


def is_decoder(config: dict[str, Any]) -> bool:
    return family(config).DECODER


# Upper bounds on every size a config can set. They are far above any model minitx can run, and
# exist so that one hostile or mistyped value (n_layers = 10**9) fails at once with one line
# instead of building a graph layer by layer until memory runs out.
LIMITS = {"vocab_size": 1 << 22, "n_ctx": 1 << 20, "type_vocab_size": 1 << 16, "d_model": 1 << 16,
          "n_layers": 1 << 10, "n_heads": 1 << 10, "n_kv_heads": 1 << 10, "d_ff": 1 << 18,
          "max_seq_length": 1 << 20, "d_kv": 1 << 16, "n_decoder_layers": 1 << 10}
ACTIVATIONS = ("gelu", "gelu_tanh")


def _positive_int(key: str, v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise MinitxError(f"config: {key} must be a positive integer, got {_short(v)}")
    if v > LIMITS.get(key, v):
        raise MinitxError(f"config: {key} = {v} exceeds the limit of {LIMITS[key]}")
    return v


def _short(v: Any) -> str:
    r = repr(v) if isinstance(v, (int, float, str, bool, type(None))) else type(v).__name__
    return r if len(r) <= 40 else r[:37] + "..."


def complete_config(config: dict[str, Any]) -> dict[str, Any]:
    """Fill defaults and check every field, naming the first one that is wrong."""
    if not isinstance(config, dict):
        raise MinitxError(f"config: must be a JSON object, got {type(config).__name__}")
    fam = family(config)
    out = {**fam.DEFAULTS, **config}
    unknown = set(out) - set(fam.DEFAULTS) - set(fam.REQUIRED) - {"arch"}
    if unknown:
        raise MinitxError(f"config: unknown field(s) {sorted(map(str, unknown))} for arch {out['arch']}")
    for key, kind in fam.REQUIRED.items():
        if key not in out:
            raise MinitxError(f"config: missing field {key!r} for arch {out['arch']}")
        if kind is int:
            _positive_int(key, out[key])
    for key in ("norm_eps", "rope_theta"):
        if key in out:
            v = out[key]
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf")):
                raise MinitxError(f"config: {key} must be a positive finite number, got {_short(v)}")
    for key in ("normalize", "tie_embeddings"):
        if key in out and not isinstance(out[key], bool):
            raise MinitxError(f"config: {key} must be true or false, got {_short(out[key])}")
    supported = tuple(getattr(fam, "ACTIVATIONS", ACTIVATIONS))   # a family may compute others
    if "activation" in out and (not isinstance(out["activation"], str) or out["activation"] not in supported):
        raise MinitxError(f"config: activation {_short(out['activation'])} is not supported "
                          f"(supported: {', '.join(supported)})")
    if "pooling" in out and out["pooling"] != "mean":
        raise MinitxError(f"config: pooling {_short(out['pooling'])} is not supported (only 'mean')")
    if out.get("max_seq_length") is not None:
        _positive_int("max_seq_length", out["max_seq_length"])
    d = out.get("dropout", 0.0)
    if not (isinstance(d, (int, float)) and not isinstance(d, bool) and 0.0 <= d < 1.0):
        raise MinitxError(f"config: dropout must be in [0, 1), got {_short(d)}")
    if "d_kv" in out:   # T5: attention width n_heads·d_kv is its own, d_model need not divide
        _positive_int("d_kv", out["d_kv"])
    elif out["d_model"] % out["n_heads"]:
        raise MinitxError(f"config: d_model {out['d_model']} is not divisible by n_heads {out['n_heads']}")
    kv = out.get("n_kv_heads")
    if kv is not None:
        _positive_int("n_kv_heads", kv)
        if "n_kv_heads" not in fam.REQUIRED and kv != out["n_heads"]:
            raise MinitxError(f"config: {out['arch']} has no grouped-query attention: n_kv_heads must be "
                              f"null or n_heads ({out['n_heads']}), got {kv}")
        if out["n_heads"] % kv:
            raise MinitxError(f"config: n_heads {out['n_heads']} is not a multiple of n_kv_heads {kv}")
    return out


def n_params(config: dict[str, Any]) -> int:
    """Parameters the config implies, counted from its graph (which allocates no weights)."""
    return sum(int(np.prod(v.shape, dtype=object)) for v in build_graph(config).params.values())


def check_memory(config: dict[str, Any], copies: int = 2) -> None:
    """Refuse, before allocating, a config whose float32 weights (times ``copies``) exceed this
    machine's physical memory: such a model would only swap or be killed."""
    need = 4 * copies * n_params(config)
    have = physical_memory()
    if have and need > have:
        raise MinitxError(f"config: the model needs {need / 2**30:,.1f} GiB for its weights, more than this "
                          f"machine's {have / 2**30:,.1f} GiB of memory")


def physical_memory() -> int:
    """Bytes of RAM (0 when the platform does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


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
    check_memory(config)
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
    fam = FAMILIES.get(arch) if isinstance(arch, str) else None
    if fam is None:
        raise MinitxError(f"unknown architecture {_short(arch)} (supported: {', '.join(FAMILIES)})")
    if not isinstance(name, str) or name not in fam.PRESETS:
        raise MinitxError(f"unknown preset {_short(name)} for {arch} (choose from {', '.join(fam.PRESETS)})")
    return {"arch": arch, **fam.PRESETS[name]}


def with_loss(graph: Graph, logits: str = "logits") -> Graph:
    """The training graph: the model plus ``targets`` (B, T) and a mean cross-entropy ``loss``."""
    g = graph.copy()
    g.inputs.append(Value("targets", ("B", "T"), "int64"))
    g.nodes.append(Node("loss", "cross_entropy", [logits, "targets"], ["loss"], {"ignore_index": -100}))
    g.outputs = ["loss", *g.outputs]
    return g
