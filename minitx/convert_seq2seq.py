"""Hugging Face encoder–decoders in: T5ForConditionalGeneration, BartForConditionalGeneration and
MarianMTModel folders mapped onto minitx's t5 / bart / marian graphs (see
:mod:`minitx.models.transformer` for the names).

Layouts: torch Linear weights (out, in) are transposed; separate q/k/v projections become one
``attn.qkv``, the cross-attention's k/v one ``cross.kv`` (computed once from the encoder output);
T5 v1.1's wi_0/wi_1 become ``mlp.gate_up`` ([gate | up], as the ``geglu`` op splits them). BART's
position tables drop their two offset rows; the final logits bias (1, V) becomes ``lm_head.bias``
(V,). Embeddings shared by encoder, decoder and (when tied) the output layer are one
``tok_emb.weight``; an untied output layer is ``lm_head.weight``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .convert import Plan, _cat, _cat_t, _same, _t
from .errors import MinitxError


def _drop_offset(xs: list[np.ndarray]) -> np.ndarray:     # BART positions: rows 2… are positions 0…
    return xs[0][2:]


_drop_offset.planned_shape = lambda shapes: (shapes[0][0] - 2, *shapes[0][1:])  # type: ignore[attr-defined]


def _row(xs: list[np.ndarray]) -> np.ndarray:             # final_logits_bias (1, V) -> (V,)
    return xs[0].reshape(-1)


_row.planned_shape = lambda shapes: (int(np.prod(shapes[0])),)  # type: ignore[attr-defined]


def _linear(P: dict, dst: str, src: str, bias: bool) -> None:
    P[f"{dst}.weight"] = ([f"{src}.weight"], _t)
    if bias:
        P[f"{dst}.bias"] = ([f"{src}.bias"], _same)


def _ids(hf: dict[str, Any], cfg: dict[str, Any]) -> None:
    for key in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
        v = hf.get(key)
        if isinstance(v, list):
            v = v[0]
        if v is not None:
            cfg[key] = int(v)


# ----------------------------------------------------------------------------------------- T5
def _t5(hf: dict[str, Any], names: set[str]) -> Plan:
    ffn = hf.get("feed_forward_proj", "relu")
    acts = {"relu": "relu", "gated-gelu": "geglu"}
    if ffn not in acts:
        raise MinitxError(f"config.json: T5 feed_forward_proj {ffn!r} is not supported (supported: {', '.join(acts)})")
    tied = "lm_head.weight" not in names
    scale = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True) is not False)
    cfg = {"arch": "t5", "vocab_size": hf["vocab_size"], "n_ctx": int(hf.get("n_positions", 512)),
           "d_model": hf["d_model"], "d_kv": hf["d_kv"], "d_ff": hf["d_ff"], "n_layers": hf["num_layers"],
           "n_decoder_layers": hf.get("num_decoder_layers") or hf["num_layers"], "n_heads": hf["num_heads"],
           "norm_eps": float(hf.get("layer_norm_epsilon", 1e-6)), "activation": acts[ffn],
           "num_buckets": hf.get("relative_attention_num_buckets", 32),
           "max_distance": hf.get("relative_attention_max_distance", 128),
           "tie_embeddings": tied, "scale_logits": bool(scale)}
    _ids(hf, cfg)
    plan = Plan(cfg)
    P = plan.params
    P["tok_emb.weight"] = (["shared.weight"], _same)
    for stack, dst in (("encoder", "enc."), ("decoder", "")):
        n = cfg["n_layers"] if stack == "encoder" else cfg["n_decoder_layers"]
        P[f"{'enc' if dst else 'dec'}.relpos.weight"] = (
            [f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"], _same)
        P[f"{dst}norm_f.weight" if dst else "norm_f.weight"] = ([f"{stack}.final_layer_norm.weight"], _same)
        for i in range(n):
            h, o = f"{stack}.block.{i}.layer.", f"{dst}layers.{i}."
            att = f"{h}0.SelfAttention."
            P[f"{o}attn.norm.weight"] = ([f"{h}0.layer_norm.weight"], _same)
            P[f"{o}attn.qkv.weight"] = ([f"{att}q.weight", f"{att}k.weight", f"{att}v.weight"], _cat_t)
            P[f"{o}attn.out.weight"] = ([f"{att}o.weight"], _t)
            f = 1
            if stack == "decoder":
                x = f"{h}1.EncDecAttention."
                P[f"{o}cross.norm.weight"] = ([f"{h}1.layer_norm.weight"], _same)
                P[f"{o}cross.q.weight"] = ([f"{x}q.weight"], _t)
                P[f"{o}cross.kv.weight"] = ([f"{x}k.weight", f"{x}v.weight"], _cat_t)
                P[f"{o}cross.out.weight"] = ([f"{x}o.weight"], _t)
                f = 2
            d = f"{h}{f}.DenseReluDense."
            P[f"{o}mlp.norm.weight"] = ([f"{h}{f}.layer_norm.weight"], _same)
            if cfg["activation"] == "geglu":
                P[f"{o}mlp.gate_up.weight"] = ([f"{d}wi_0.weight", f"{d}wi_1.weight"], _cat_t)
            else:
                P[f"{o}mlp.up.weight"] = ([f"{d}wi.weight"], _t)
            P[f"{o}mlp.down.weight"] = ([f"{d}wo.weight"], _t)
    if not tied:
        P["lm_head.weight"] = (["lm_head.weight"], _t)
    return plan


# ------------------------------------------------------------------------------- BART, Marian
_ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
         "swish": "silu", "silu": "silu"}


def _bart_like(hf: dict[str, Any], names: set[str], arch: str) -> Plan:
    act = hf.get("activation_function", "gelu")
    if act not in _ACTS:
        raise MinitxError(f"config.json: activation_function {act!r} is not supported (supported: {', '.join(_ACTS)})")
    for a, b in (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim")):
        if hf.get(a) != hf.get(b):
            raise MinitxError(f"config.json: {a} {hf.get(a)} != {b} {hf.get(b)} is not supported")
    if hf.get("normalize_before") or hf.get("add_final_layer_norm"):
        raise MinitxError("config.json: pre-norm BART variants (normalize_before / add_final_layer_norm) are not supported")
    if arch == "marian" and (not hf.get("share_encoder_decoder_embeddings", True)
                             or hf.get("decoder_vocab_size", hf["vocab_size"]) != hf["vocab_size"]):
        raise MinitxError("config.json: Marian with separate source/target vocabularies is not supported")
    tied = hf.get("tie_word_embeddings", True) is not False or "lm_head.weight" not in names
    # Untied checkpoints (transformers 5) keep distinct encoder and decoder tables as well.
    per_stack = not tied and all(f"model.{s}.embed_tokens.weight" in names for s in ("encoder", "decoder"))
    cfg = {"arch": arch, "vocab_size": hf["vocab_size"], "n_ctx": hf["max_position_embeddings"], "d_model": hf["d_model"],
           "n_layers": hf["encoder_layers"], "n_decoder_layers": hf["decoder_layers"],
           "n_heads": hf["encoder_attention_heads"], "d_ff": hf["encoder_ffn_dim"], "activation": _ACTS[act],
           "scale_embeddings": bool(hf.get("scale_embedding", False)), "tie_embeddings": tied,
           "shared_embeddings": not per_stack,
           "logits_bias": "final_logits_bias" in names}
    _ids(hf, cfg)
    plan = Plan(cfg)
    P = plan.params
    if per_stack:
        for stack in ("encoder", "decoder"):
            P[f"{stack[:3]}.tok_emb.weight"] = ([f"model.{stack}.embed_tokens.weight"], _same)
    else:
        P["tok_emb.weight"] = (["model.shared.weight"], _same)
    for stack, dst in (("encoder", "enc."), ("decoder", "")):
        s = f"model.{stack}."
        n = cfg["n_layers"] if stack == "encoder" else cfg["n_decoder_layers"]
        if arch == "bart":
            P[f"{'enc' if dst else 'dec'}.pos_emb.weight"] = ([f"{s}embed_positions.weight"], _drop_offset)
            for leaf in ("weight", "bias"):
                P[f"{'enc' if dst else 'dec'}.emb_norm.{leaf}"] = ([f"{s}layernorm_embedding.{leaf}"], _same)
        for i in range(n):
            h, o = f"{s}layers.{i}.", f"{dst}layers.{i}."
            a = f"{h}self_attn."
            P[f"{o}attn.qkv.weight"] = ([f"{a}q_proj.weight", f"{a}k_proj.weight", f"{a}v_proj.weight"], _cat_t)
            P[f"{o}attn.qkv.bias"] = ([f"{a}q_proj.bias", f"{a}k_proj.bias", f"{a}v_proj.bias"], _cat)
            _linear(P, f"{o}attn.out", f"{a}out_proj", True)
            norms = [("attn.norm", "self_attn_layer_norm"), ("mlp.norm", "final_layer_norm")]
            if stack == "decoder":
                x = f"{h}encoder_attn."
                _linear(P, f"{o}cross.q", f"{x}q_proj", True)
                P[f"{o}cross.kv.weight"] = ([f"{x}k_proj.weight", f"{x}v_proj.weight"], _cat_t)
                P[f"{o}cross.kv.bias"] = ([f"{x}k_proj.bias", f"{x}v_proj.bias"], _cat)
                _linear(P, f"{o}cross.out", f"{x}out_proj", True)
                norms.append(("cross.norm", "encoder_attn_layer_norm"))
            _linear(P, f"{o}mlp.up", f"{h}fc1", True)
            _linear(P, f"{o}mlp.down", f"{h}fc2", True)
            for d, src in norms:
                for leaf in ("weight", "bias"):
                    P[f"{o}{d}.{leaf}"] = ([f"{h}{src}.{leaf}"], _same)
    if not tied:
        P["lm_head.weight"] = (["lm_head.weight"], _t)
    if cfg["logits_bias"]:
        P["lm_head.bias"] = (["final_logits_bias"], _row)
    return plan


def _bart(hf: dict[str, Any], names: set[str]) -> Plan:
    return _bart_like(hf, names, "bart")


def _marian(hf: dict[str, Any], names: set[str]) -> Plan:
    return _bart_like(hf, names, "marian")


ARCHITECTURES = {"T5ForConditionalGeneration": _t5, "BartForConditionalGeneration": _bart, "MarianMTModel": _marian}
MODEL_TYPES = {"t5": "T5ForConditionalGeneration", "bart": "BartForConditionalGeneration", "marian": "MarianMTModel"}
