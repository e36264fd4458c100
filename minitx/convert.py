"""Hugging Face checkpoints in: a model folder (config.json + model.safetensors) becomes a minitx file.

Each family maps HF tensor names onto minitx's parameter names and layouts: torch ``Linear``
weights are (out, in) and are transposed to minitx's (in, out); GPT-2's ``Conv1D`` weights are
already (in, out); separate q/k/v projections are concatenated into ``attn.qkv`` and LLaMA's
gate/up into ``mlp.gate_up`` ([gate | up], as the ``swiglu`` op splits them).

Memory: tensors are read one at a time with the safetensors NumPy API and streamed straight into
the output zip, so a checkpoint never exists twice in memory. Everything that can be checked
before writing is (architecture, config fields, every tensor's presence and shape); the output is a
temporary file renamed into place only once complete.
"""
from __future__ import annotations

import json
import math
import os
import zipfile
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from . import __version__, models
from .errors import MinitxError
from .modelfile import FORMAT_VERSION, _text
from .outputs import atomic_write

# A conversion plan: for each minitx parameter, the HF tensors it is built from and how.
Build = Callable[[list[np.ndarray]], np.ndarray]


@dataclass
class Plan:
    config: dict[str, Any]
    params: dict[str, tuple[list[str], Build]] = field(default_factory=dict)
    tokenizer_json: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def _t(xs: list[np.ndarray]) -> np.ndarray:          # one torch Linear weight (out, in) -> (in, out)
    return xs[0].T


def _same(xs: list[np.ndarray]) -> np.ndarray:
    return xs[0]


def _cat_t(xs: list[np.ndarray]) -> np.ndarray:      # several Linear weights -> one (in, Σ out)
    return np.concatenate([x.T for x in xs], axis=1)


def _cat(xs: list[np.ndarray]) -> np.ndarray:        # several biases -> one
    return np.concatenate(xs, axis=0)


# ------------------------------------------------------------------------------------- reading
MAX_JSON_BYTES = 1 << 28   # config, index and tokenizer files: 256 MiB is far beyond any real one


def _read_json(path: str, required: bool = True, kind: type | None = None) -> Any:
    """A JSON file's content; ``kind`` (dict or list) is what its top level must be. Every failure —
    a folder in its place, bad UTF-8, nesting deep enough to exhaust recursion — is one line."""
    if not os.path.exists(path):
        if required:
            raise MinitxError(f"{path}: no such file")
        return None
    if not os.path.isfile(path):
        raise MinitxError(f"{path}: is not a regular file")
    try:
        if os.path.getsize(path) > MAX_JSON_BYTES:
            raise MinitxError(f"{path}: {os.path.getsize(path):,} bytes is too large for a JSON file of a model folder")
        with open(path, encoding="utf-8") as f:
            out = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MinitxError(f"{path}: not valid JSON: {e}") from None
    except RecursionError:
        raise MinitxError(f"{path}: JSON nested too deeply") from None
    except OSError as e:
        raise MinitxError(f"{path}: cannot read: {e.strerror}") from None
    if kind is not None and not isinstance(out, kind):
        raise MinitxError(f"{path}: expected a JSON {'object' if kind is dict else 'list'}, got {type(out).__name__}")
    return out


def _inside(folder: str, name: Any, what: str) -> str:
    """``folder/name`` for a relative file name from a folder's own JSON; a name that is not a
    string, is absolute or climbs out with ``..`` is refused (it would read files outside)."""
    if not isinstance(name, str) or not name:
        raise MinitxError(f"{folder}/{what}: file name {name!r} must be a non-empty string")
    parts = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or name.startswith(("/", "\\")) or ".." in parts:
        raise MinitxError(f"{folder}/{what}: file name {name!r} points outside the model folder; refused")
    return os.path.join(folder, name)


def _fields(hf: dict[str, Any], ints: tuple[str, ...] = (), floats: tuple[str, ...] = (),
            nullable: tuple[str, ...] = ()) -> None:
    """config.json's numeric fields have the right types (a string n_layer would reach range())."""
    for k in ints:
        v = hf.get(k)
        if k in hf and not (v is None and k in nullable) and (not isinstance(v, int) or isinstance(v, bool)):
            raise MinitxError(f"config.json: {k} must be an integer, got {_short(v)}")
    for k in floats:
        v = hf.get(k)
        if k in hf and not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)):
            raise MinitxError(f"config.json: {k} must be a finite number, got {_short(v)}")


def _short(v: Any) -> str:
    r = repr(v) if isinstance(v, (int, float, str, bool, type(None))) else type(v).__name__
    return r if len(r) <= 40 else r[:37] + "..."


def _limits(cfg: dict[str, Any]) -> dict[str, Any]:
    """The minitx config checked (sizes within limits) before a plan loops over its layers."""
    try:
        models.complete_config(cfg)
    except MinitxError as e:
        raise MinitxError(f"config.json: {e}") from None
    return cfg


class _Tensors:
    """The tensors of a safetensors file (or a sharded set), opened lazily and read one at a time."""

    def __init__(self, folder: str) -> None:
        try:
            from safetensors import safe_open
        except ImportError:
            raise MinitxError("converting needs safetensors; install the hf extra: pip install 'minitx[hf]'") from None

        single = os.path.join(folder, "model.safetensors")
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.exists(single):
            files = [single]
        elif os.path.exists(index):
            idx = _read_json(index, kind=dict)
            wm = idx.get("weight_map", {})
            if not isinstance(wm, dict):
                raise MinitxError(f"{index}: weight_map must be a JSON object (tensor name -> file)")
            files = sorted({_inside(folder, f, "model.safetensors.index.json") for f in wm.values()})
        else:
            bins = [f for f in ("pytorch_model.bin", "model.ckpt", "tf_model.h5") if os.path.exists(os.path.join(folder, f))]
            hint = f" (found {bins[0]}; only safetensors checkpoints are read — pickled weights are never loaded)" if bins else ""
            raise MinitxError(f"{single}: no such file{hint}")
        self.folder = folder
        self.where: dict[str, Any] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        self._handles = []
        for path in files:
            if not os.path.exists(path):
                raise MinitxError(f"{path}: no such file (listed in model.safetensors.index.json)")
            try:
                h = safe_open(path, framework="np")
                for k in h.keys():
                    sl = h.get_slice(k)
                    self.where[k] = (h, path)
                    self.shapes[k] = tuple(int(d) for d in sl.get_shape())
                    self.dtypes[k] = sl.get_dtype()
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise MinitxError(f"{path}: not a readable safetensors file (truncated or corrupt?): "
                                  f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
            self._handles.append(h)
            size = os.path.getsize(path)
            # safetensors checks offsets lazily; check up front that the data fits in the file.
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                try:
                    header = json.loads(f.read(n))
                    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
                              default=0)
                except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, AttributeError, KeyError,
                        TypeError, ValueError, IndexError) as e:
                    raise MinitxError(f"{path}: corrupt safetensors header: {e!r}") from None
            if 8 + n + end > size:
                raise MinitxError(f"{path}: truncated — the header describes {8 + n + end:,} bytes, "
                                  f"the file has {size:,}")

    def get(self, name: str) -> np.ndarray:
        h, path = self.where[name]
        if self.dtypes[name] in ("BF16",):
            raw = _read_bf16(h, path, name)
            return raw
        try:
            a = h.get_tensor(name)
        except Exception as e:
            raise MinitxError(f"{path}: tensor {name!r} is unreadable: {e}") from None
        if np.issubdtype(a.dtype, np.floating):
            a = a.astype(np.float32, copy=False)
        return a


def _read_bf16(h: Any, path: str, name: str) -> np.ndarray:
    """bfloat16 has no NumPy dtype: read the raw 16-bit words and widen them to float32."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        start, end = header[name]["data_offsets"]
        f.seek(8 + n + start)
        words = np.frombuffer(f.read(end - start), dtype="<u2")
    return (words.astype(np.uint32) << 16).view(np.float32).reshape(header[name]["shape"])


# ------------------------------------------------------------------------------------- families
def _strip_prefix(names: set[str], prefixes: tuple[str, ...]) -> str:
    """The prefix (e.g. ``transformer.`` or ``bert.``) under which this checkpoint stores its body."""
    for p in prefixes:
        if any(n.startswith(p) for n in names):
            return p
    return ""


def _gpt2(hf: dict[str, Any], names: set[str]) -> Plan:
    _fields(hf, ints=("n_embd", "vocab_size", "n_positions", "n_ctx", "n_layer", "n_head", "n_inner"),
            floats=("layer_norm_epsilon",), nullable=("n_inner",))
    act = hf.get("activation_function", "gelu_new")
    acts = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
    if not isinstance(act, str) or act not in acts:
        raise MinitxError(f"config.json: GPT-2 activation_function {act!r} is not supported (supported: {', '.join(acts)})")
    for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                    ("add_cross_attention", False)):
        if key in hf and bool(hf[key]) != ok:
            raise MinitxError(f"config.json: GPT-2 with {key}={hf[key]} is not supported")
    C = hf["n_embd"]
    cfg = {"arch": "gpt2", "vocab_size": hf["vocab_size"], "n_ctx": hf.get("n_positions", hf.get("n_ctx", 1024)),
           "d_model": C, "n_layers": hf["n_layer"], "n_heads": hf["n_head"],
           "d_ff": hf.get("n_inner") or 4 * C, "norm_eps": float(hf.get("layer_norm_epsilon", 1e-5)),
           "activation": acts[act]}
    _limits(cfg)
    p = _strip_prefix(names, ("transformer.",))
    plan = Plan(cfg)
    P = plan.params
    P["tok_emb.weight"] = ([f"{p}wte.weight"], _same)
    P["pos_emb.weight"] = ([f"{p}wpe.weight"], _same)
    for i in range(cfg["n_layers"]):
        h, o = f"{p}h.{i}.", f"layers.{i}."
        for src, dst in (("ln_1", "norm1"), ("ln_2", "norm2")):
            P[f"{o}{dst}.weight"] = ([f"{h}{src}.weight"], _same)
            P[f"{o}{dst}.bias"] = ([f"{h}{src}.bias"], _same)
        # Conv1D stores (in, out) already, and c_attn is the fused [q | k | v] projection.
        for src, dst in (("attn.c_attn", "attn.qkv"), ("attn.c_proj", "attn.out"),
                         ("mlp.c_fc", "mlp.up"), ("mlp.c_proj", "mlp.down")):
            P[f"{o}{dst}.weight"] = ([f"{h}{src}.weight"], _same)
            P[f"{o}{dst}.bias"] = ([f"{h}{src}.bias"], _same)
    P["norm_f.weight"] = ([f"{p}ln_f.weight"], _same)
    P["norm_f.bias"] = ([f"{p}ln_f.bias"], _same)
    if "lm_head.weight" in names and hf.get("tie_word_embeddings", True) is False:
        raise MinitxError("config.json: GPT-2 with an untied lm_head is not supported (minitx's GPT-2 ties it)")
    return plan


def _bert(hf: dict[str, Any], names: set[str]) -> Plan:
    _fields(hf, ints=("vocab_size", "max_position_embeddings", "type_vocab_size", "hidden_size", "num_hidden_layers",
                      "num_attention_heads", "intermediate_size"), floats=("layer_norm_eps",))
    act = hf.get("hidden_act", "gelu")
    acts = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
    if not isinstance(act, str) or act not in acts:
        raise MinitxError(f"config.json: BERT hidden_act {act!r} is not supported (supported: {', '.join(acts)})")
    pet = hf.get("position_embedding_type", "absolute")
    if pet != "absolute":
        raise MinitxError(f"config.json: BERT position_embedding_type {pet!r} is not supported (only 'absolute')")
    cfg = {"arch": "bert", "vocab_size": hf["vocab_size"], "n_ctx": hf.get("max_position_embeddings", 512),
           "type_vocab_size": hf.get("type_vocab_size", 2), "d_model": hf["hidden_size"],
           "n_layers": hf["num_hidden_layers"], "n_heads": hf["num_attention_heads"],
           "d_ff": hf["intermediate_size"], "norm_eps": float(hf.get("layer_norm_eps", 1e-12)),
           "activation": acts[act], "normalize": False, "max_seq_length": None}
    _limits(cfg)
    p = _strip_prefix(names, ("bert.", "model."))
    plan = Plan(cfg)
    P = plan.params
    e = f"{p}embeddings."
    P["tok_emb.weight"] = ([f"{e}word_embeddings.weight"], _same)
    P["pos_emb.weight"] = ([f"{e}position_embeddings.weight"], _same)
    P["type_emb.weight"] = ([f"{e}token_type_embeddings.weight"], _same)
    P["emb_norm.weight"] = ([f"{e}LayerNorm.weight"], _same)
    P["emb_norm.bias"] = ([f"{e}LayerNorm.bias"], _same)
    for i in range(cfg["n_layers"]):
        h, o = f"{p}encoder.layer.{i}.", f"layers.{i}."
        a = f"{h}attention.self."
        P[f"{o}attn.qkv.weight"] = ([f"{a}query.weight", f"{a}key.weight", f"{a}value.weight"], _cat_t)
        P[f"{o}attn.qkv.bias"] = ([f"{a}query.bias", f"{a}key.bias", f"{a}value.bias"], _cat)
        for src, dst in (("attention.output.dense", "attn.out"), ("intermediate.dense", "mlp.up"),
                         ("output.dense", "mlp.down")):
            P[f"{o}{dst}.weight"] = ([f"{h}{src}.weight"], _t)
            P[f"{o}{dst}.bias"] = ([f"{h}{src}.bias"], _same)
        for src, dst in (("attention.output.LayerNorm", "norm1"), ("output.LayerNorm", "norm2")):
            P[f"{o}{dst}.weight"] = ([f"{h}{src}.weight"], _same)
            P[f"{o}{dst}.bias"] = ([f"{h}{src}.bias"], _same)
    return plan


def _rope_theta(hf: dict[str, Any]) -> float:
    """rope_theta from either config layout; any scaling minitx's ``rope`` op does not implement is refused."""
    for key in ("rope_scaling", "rope_parameters"):
        rp = hf.get(key)
        if rp is not None and not isinstance(rp, dict):
            raise MinitxError(f"config.json: {key} must be a JSON object or null, got {_short(rp)}")
        if rp:
            _fields(rp, floats=("rope_theta",))
            kind = rp.get("rope_type", rp.get("type", "default"))
            if kind != "default":
                raise MinitxError(f"config.json: {key} of type {kind!r} is not supported "
                                  f"(minitx implements plain RoPE only)")
            if "rope_theta" in rp:
                return float(rp["rope_theta"])
    return float(hf.get("rope_theta", 10000.0))


def _llama(hf: dict[str, Any], names: set[str]) -> Plan:
    _fields(hf, ints=("hidden_size", "num_attention_heads", "vocab_size", "max_position_embeddings",
                      "num_hidden_layers", "num_key_value_heads", "intermediate_size", "head_dim", "pretraining_tp"),
            floats=("rms_norm_eps", "rope_theta"), nullable=("num_key_value_heads", "head_dim"))
    if hf.get("hidden_act", "silu") != "silu":
        raise MinitxError(f"config.json: LLaMA hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise MinitxError(f"config.json: LLaMA with {key}=true is not supported")
    if hf.get("pretraining_tp", 1) != 1:
        raise MinitxError(f"config.json: LLaMA with pretraining_tp={hf['pretraining_tp']} is not supported")
    C, H = hf["hidden_size"], hf["num_attention_heads"]
    if H <= 0:
        raise MinitxError(f"config.json: num_attention_heads must be positive, got {H}")
    if hf.get("head_dim") not in (None, C // H):
        raise MinitxError(f"config.json: head_dim {hf['head_dim']} differs from hidden_size/num_attention_heads "
                          f"= {C // H}; not supported")
    tied = bool(hf.get("tie_word_embeddings", False))
    cfg = {"arch": "llama", "vocab_size": hf["vocab_size"], "n_ctx": hf.get("max_position_embeddings", 2048),
           "d_model": C, "n_layers": hf["num_hidden_layers"], "n_heads": H,
           "n_kv_heads": hf.get("num_key_value_heads") or H, "d_ff": hf["intermediate_size"],
           "norm_eps": float(hf.get("rms_norm_eps", 1e-6)), "rope_theta": _rope_theta(hf), "tie_embeddings": tied}
    _limits(cfg)
    p = _strip_prefix(names, ("model.",))
    plan = Plan(cfg)
    P = plan.params
    P["tok_emb.weight"] = ([f"{p}embed_tokens.weight"], _same)
    for i in range(cfg["n_layers"]):
        h, o = f"{p}layers.{i}.", f"layers.{i}."
        P[f"{o}norm1.weight"] = ([f"{h}input_layernorm.weight"], _same)
        P[f"{o}norm2.weight"] = ([f"{h}post_attention_layernorm.weight"], _same)
        P[f"{o}attn.qkv.weight"] = ([f"{h}self_attn.{t}_proj.weight" for t in "qkv"], _cat_t)
        P[f"{o}attn.out.weight"] = ([f"{h}self_attn.o_proj.weight"], _t)
        P[f"{o}mlp.gate_up.weight"] = ([f"{h}mlp.gate_proj.weight", f"{h}mlp.up_proj.weight"], _cat_t)
        P[f"{o}mlp.down.weight"] = ([f"{h}mlp.down_proj.weight"], _t)
    P["norm_f.weight"] = ([f"{p}norm.weight"], _same)
    if not tied:
        P["lm_head.weight"] = (["lm_head.weight"], _t)
    return plan


ARCHITECTURES: dict[str, Callable[[dict[str, Any], set[str]], Plan]] = {
    "GPT2LMHeadModel": _gpt2, "GPT2Model": _gpt2,
    "BertModel": _bert,
    "LlamaForCausalLM": _llama, "LlamaModel": _llama,
}
_MODEL_TYPES = {"gpt2": "GPT2LMHeadModel", "bert": "BertModel", "llama": "LlamaForCausalLM"}

from . import convert_seq2seq  # noqa: E402  (T5, BART, Marian: the encoder–decoders of #17)

ARCHITECTURES.update(convert_seq2seq.ARCHITECTURES)
_MODEL_TYPES.update(convert_seq2seq.MODEL_TYPES)


# ------------------------------------------------------------------------ sentence-transformers
def _sentence_transformers(folder: str, cfg: dict[str, Any], hf: dict[str, Any]) -> dict[str, Any]:
    """Apply a sentence-transformers pipeline (modules.json): mean pooling, Normalize, max_seq_length."""
    mods = _read_json(os.path.join(folder, "modules.json"), kind=list)
    if not all(isinstance(m, dict) for m in mods):
        raise MinitxError(f"{folder}/modules.json: expected a list of module objects")
    if not all(isinstance(m.get("idx", 0), int) for m in mods):
        raise MinitxError(f"{folder}/modules.json: a module's idx must be an integer")
    st: dict[str, Any] = {"modules": []}
    cfg = {**cfg, "normalize": False}
    pooled = False
    for m in sorted(mods, key=lambda m: m.get("idx", 0)):
        kind = str(m.get("type", "")).rsplit(".", 1)[-1]
        path = _inside(folder, m.get("path") or ".", "modules.json")
        st["modules"].append(kind)
        if kind == "Transformer":
            if m.get("path", "") not in ("", "."):
                raise MinitxError(f"{folder}/modules.json: a Transformer module in a subfolder "
                                  f"({m['path']}) is not supported")
            sb = _read_json(os.path.join(folder, "sentence_bert_config.json"), required=False, kind=dict) or {}
            msl = sb.get("max_seq_length")
            if msl is None:
                tc = _read_json(os.path.join(folder, "tokenizer_config.json"), required=False, kind=dict) or {}
                mml = tc.get("model_max_length", 10**9)
                if not isinstance(mml, (int, float)) or isinstance(mml, bool):
                    raise MinitxError(f"{folder}/tokenizer_config.json: model_max_length must be a number, "
                                      f"got {_short(mml)}")
                msl = min(int(hf.get("max_position_embeddings", 512)), int(min(mml, 10**9)))
            elif not isinstance(msl, int) or isinstance(msl, bool) or msl <= 0:
                raise MinitxError(f"{folder}/sentence_bert_config.json: max_seq_length must be a positive integer, "
                                  f"got {_short(msl)}")
            cfg["max_seq_length"] = int(msl)
            st["do_lower_case"] = bool(sb.get("do_lower_case", False))
        elif kind == "Pooling":
            pc = _read_json(os.path.join(path, "config.json"), kind=dict)
            modes = [k[len("pooling_mode_"):] for k, v in pc.items() if k.startswith("pooling_mode_") and v is True]
            if pc.get("pooling_mode") is not None:
                modes = [pc["pooling_mode"]]
            if modes not in (["mean_tokens"], ["mean"]):
                raise MinitxError(f"{path}/config.json: pooling mode {'+'.join(modes) or 'none'} is not supported "
                                  f"(minitx implements mean pooling only)")
            if pc.get("include_prompt", True) is False:
                raise MinitxError(f"{path}/config.json: include_prompt=false is not supported")
            pooled = True
        elif kind == "Normalize":
            cfg["normalize"] = True
        else:
            raise MinitxError(f"{folder}/modules.json: sentence-transformers module {m.get('type')!r} is not supported "
                              f"(supported: Transformer, Pooling (mean), Normalize)")
    if not pooled:
        raise MinitxError(f"{folder}/modules.json: no Pooling module; minitx needs mean pooling for embeddings")
    cfg["_st"] = st
    return cfg


def _tokenizer(folder: str, cfg: dict[str, Any], lowercase: bool) -> str | None:
    """tokenizer.json with its fixed padding removed (padding is done per batch, as transformers does)
    and truncation set to the model's max_seq_length, so ``Tokenizer.encode`` behaves like the
    tokenizer call sentence-transformers makes."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.exists(path):
        return None
    tj = _read_json(path, kind=dict)
    if "model" not in tj:
        raise MinitxError(f"{path}: not a tokenizers tokenizer.json")
    tj["padding"] = None
    msl = cfg.get("max_seq_length")
    tj["truncation"] = ({"direction": "Right", "max_length": int(msl), "strategy": "LongestFirst", "stride": 0}
                        if msl else None)
    if lowercase:
        norm = tj.get("normalizer")
        if isinstance(norm, dict) and norm.get("type") == "BertNormalizer":
            norm["lowercase"] = True
        else:
            tj["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Lowercase"}] + ([norm] if norm else [])}
    text = json.dumps(tj, ensure_ascii=False)
    try:
        from tokenizers import Tokenizer

        Tokenizer.from_str(text)
    except ImportError:
        pass
    except Exception as e:
        raise MinitxError(f"{path}: the tokenizers library cannot read it: {e}") from None
    return text


# ---------------------------------------------------------------------------------- the plan
def source_files(folder: str) -> list[str]:
    """The files of ``folder`` a conversion may read: an output must not be one of them."""
    names = ["config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json",
             "modules.json", "sentence_bert_config.json", "tokenizer_config.json"]
    out = [os.path.join(folder, n) for n in names]
    out += [os.path.join(folder, n) for n in _listdir(folder) if n.endswith(".safetensors")]
    for sub in _listdir(folder):   # sentence-transformers modules keep their config in subfolders
        if os.path.isdir(os.path.join(folder, sub)):
            out.append(os.path.join(folder, sub, "config.json"))
    return out


def _listdir(folder: str) -> list[str]:
    try:
        return sorted(os.listdir(folder))[:10000]
    except OSError:
        return []


def plan(folder: str) -> tuple[Plan, "_Tensors"]:
    """Read config and tensor headers, map names, and check every shape — before anything is written."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise MinitxError(f"{folder}: not a folder (expected a Hugging Face model folder with config.json "
                          f"and model.safetensors)")
    hf = _read_json(os.path.join(folder, "config.json"), kind=dict)
    mt = hf.get("model_type")
    if mt is not None and not isinstance(mt, str):
        raise MinitxError(f"{folder}/config.json: model_type must be a string, got {_short(mt)}")
    archs = hf.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise MinitxError(f"{folder}/config.json: architectures must be a list of strings, got {_short(archs)}")
    archs = archs or ([_MODEL_TYPES[mt]] if mt in _MODEL_TYPES else [])
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise MinitxError(f"{folder}/config.json: architecture {', '.join(archs) or hf.get('model_type') or '(none)'} "
                          f"is not supported (supported: {', '.join(ARCHITECTURES)})")
    tensors = _Tensors(folder)
    names = set(tensors.shapes)
    try:
        p = ARCHITECTURES[arch](hf, names)
    except KeyError as e:
        raise MinitxError(f"{folder}/config.json: missing field {e.args[0]!r} for {arch}") from None
    lowercase = False
    if p.config["arch"] == "bert" and os.path.exists(os.path.join(folder, "modules.json")):
        p.config = _sentence_transformers(folder, p.config, hf)
        lowercase = p.config["_st"].get("do_lower_case", False)
    st = p.config.pop("_st", None)
    try:
        p.config = models.complete_config(p.config)
        graph = models.build_graph(p.config)
    except MinitxError as e:
        raise MinitxError(f"{folder}/config.json: {e}") from None
    missing = sorted(p.params.keys() - graph.params.keys()) + sorted(graph.params.keys() - p.params.keys())
    if missing:  # a bug in a family's mapping, not a user error
        raise AssertionError(f"conversion plan and graph disagree on {missing[:3]}")
    for name, (srcs, build) in p.params.items():
        for s in srcs:
            if s not in names:
                raise MinitxError(f"{folder}: tensor {s!r} (for {name}) is missing from the checkpoint")
        want = tuple(graph.params[name].shape)
        got = _planned_shape(build, [tensors.shapes[s] for s in srcs])
        if got != want:
            detail = ", ".join(f"{s} {tensors.shapes[s]}" for s in srcs)
            raise MinitxError(f"{folder}: {detail} gives {name} the shape {got}, but config.json implies {want}")
        if 8 * int(np.prod(want, dtype=object)) > (models.physical_memory() or 1 << 62):   # read + widened copy
            raise MinitxError(f"{folder}: tensor {name} {want} would not fit in this machine's memory")
    p.tokenizer_json = _tokenizer(folder, p.config, lowercase)
    dtypes = sorted({tensors.dtypes[s] for srcs, _ in p.params.values() for s in srcs})
    p.meta = {"source": f"converted from Hugging Face {arch}", "hf_architecture": arch,
              "hf_model": (hf.get("_name_or_path") if isinstance(hf.get("_name_or_path"), str) else None)
              or os.path.basename(os.path.abspath(folder)),
              "hf_dtypes": dtypes, "converted_by": f"minitx {__version__}"}
    if st:
        p.meta["sentence_transformers"] = st["modules"]
    return p, tensors


def _planned_shape(build: Build, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    """The shape ``build`` will produce from tensors of these shapes, without reading any data."""
    if hasattr(build, "planned_shape"):  # a family's own build step carries its shape rule
        return build.planned_shape(shapes)
    if build is _same:
        return shapes[0]
    if build is _t:
        return tuple(reversed(shapes[0]))
    if build is _cat:
        if any(len(s) != 1 for s in shapes):
            return shapes[0]
        return (sum(s[0] for s in shapes),)
    if build is _cat_t:
        if any(len(s) != 2 or s[1] != shapes[0][1] for s in shapes):
            return tuple(reversed(shapes[0]))
        return (shapes[0][1], sum(s[0] for s in shapes))
    raise AssertionError(f"no shape rule for {build}")


# ------------------------------------------------------------------------------------ writing
def stream_npz(path: str, items: Iterator[tuple[str, np.ndarray]]) -> None:
    """Write (name, array) pairs into an .npz one member at a time, to a temporary file renamed into
    place at the end — np.savez would need every array in memory at once."""
    with atomic_write(path) as f:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, a in items:
                with zf.open(name + ".npy", "w", force_zip64=True) as m:
                    np.lib.format.write_array(m, np.ascontiguousarray(a) if a.ndim else a, allow_pickle=False)


def convert(folder: str, output: str, progress: Callable[[int], None] | None = None) -> Plan:
    """Convert the HF model in ``folder`` to the minitx file ``output``; returns the plan used."""
    p, tensors = plan(folder)
    write(p, tensors, output, progress)
    return p


def write(p: Plan, tensors: "_Tensors", output: str, progress: Callable[[int], None] | None = None) -> None:
    """Stream the planned parameters into ``output``. ``progress(n)`` gets the bytes of each parameter
    just written."""
    folder = tensors.folder

    def items() -> Iterator[tuple[str, np.ndarray]]:
        yield "__format_version__", np.array(FORMAT_VERSION, dtype=np.int64)
        yield "__config__", _text(json.dumps(p.config, sort_keys=True))
        yield "__meta__", _text(json.dumps(p.meta, sort_keys=True))
        if p.tokenizer_json is not None:
            yield "__tokenizer__", _text(p.tokenizer_json)
        for name, (srcs, build) in p.params.items():
            a = build([tensors.get(s) for s in srcs])
            if not np.issubdtype(a.dtype, np.floating):
                raise MinitxError(f"{folder}: tensor {srcs[0]!r} has dtype {a.dtype}; expected floating point")
            a = np.asarray(a, dtype=np.float32)
            if not np.isfinite(a).all():
                raise MinitxError(f"{folder}: tensor {srcs[0]!r} contains NaN or Inf")
            yield name, a
            if progress:
                progress(a.nbytes)

    stream_npz(output, items())


def total_bytes(p: Plan, tensors: "_Tensors") -> int:
    """float32 bytes of the converted parameters (for a progress bar)."""
    return sum(4 * int(np.prod(_planned_shape(b, [tensors.shapes[s] for s in srcs])))
               for srcs, b in p.params.values())

