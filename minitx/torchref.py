"""The same model in PyTorch: the yardstick ``minitx bench --vs torch`` measures against.

Two builds, one interface (:class:`TorchRef`):

* :class:`TorchModel` — GPT-2, BERT and LLaMA written directly in torch from a minitx config and
  weights (stored (in, out); transposed here once into ``nn.Linear``'s (out, in) so torch runs the
  layout a PyTorch user would have). It follows the published architectures, not minitx's graph,
  so agreeing with the spec is evidence, not a tautology.
* :class:`TransformersModel` — the Hugging Face checkpoint a model was converted from, loaded by
  ``transformers`` itself: the reference users actually run.

Both take token ids and return NumPy logits (decoders, with a KV cache) or sentence embeddings
(encoders), in float32.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from .errors import MinitxError


def _torch():
    try:
        import torch
    except ImportError:
        raise MinitxError("--vs torch needs PyTorch: pip install 'minitx[reference]' (torch==2.13.0)") from None
    return torch


class TorchRef:
    """Interface: ``prefill(ids)`` → (logits, state); ``step(ids, state)`` → (logits, state);
    ``encode(ids)`` → embeddings. ``name`` says which build it is."""

    name = "torch"
    is_decoder = True

    def prefill(self, ids: np.ndarray) -> tuple[np.ndarray, Any]:
        raise NotImplementedError

    def step(self, ids: np.ndarray, state: Any) -> tuple[np.ndarray, Any]:
        raise NotImplementedError

    def encode(self, ids: np.ndarray) -> np.ndarray:
        raise NotImplementedError


# ------------------------------------------------------------------------------ direct build
class TorchModel(TorchRef):
    """GPT-2 / BERT / LLaMA in plain torch from a minitx config and (in, out)-stored weights."""

    def __init__(self, config: Mapping[str, Any], params: Mapping[str, np.ndarray]) -> None:
        torch = _torch()
        self.torch = torch
        self.cfg = dict(config)
        arch = self.cfg.get("arch")
        if arch not in ("gpt2", "bert", "llama"):
            raise MinitxError(f"no torch build for architecture {arch!r}")
        self.arch = arch
        self.is_decoder = arch != "bert"
        self.name = f"torch {torch.__version__.split('+')[0]} ({arch}, minitx weights)"
        self.H = int(self.cfg["n_heads"])
        self.KV = int(self.cfg.get("n_kv_heads") or self.H) if arch == "llama" else self.H
        self.eps = float(self.cfg["norm_eps"])
        for k, a in params.items():
            if not np.issubdtype(a.dtype, np.floating):
                raise MinitxError(f"the torch build needs plain float weights; {k!r} is {a.dtype} "
                                  f"(a rewritten model: compare the original model file instead)")
        self.w: dict[str, Any] = {}
        for k, a in params.items():
            t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
            # Linear weights to torch's (out, in) layout, once.
            self.w[k] = t.t().contiguous() if (a.ndim == 2 and k.startswith(("layers.", "lm_head"))) else t

    # -- building blocks, as the papers write them
    def _linear(self, x, name: str, bias: bool = True):
        b = self.w.get(f"{name}.bias") if bias else None
        return self.torch.nn.functional.linear(x, self.w[f"{name}.weight"], b)

    def _ln(self, x, name: str):
        C = x.shape[-1]
        return self.torch.nn.functional.layer_norm(x, (C,), self.w[f"{name}.weight"], self.w[f"{name}.bias"], self.eps)

    def _rms(self, x, name: str):
        return x * self.torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.w[f"{name}.weight"]

    def _rope(self, x, pos, n_heads: int):
        torch = self.torch
        B, T, HD = x.shape
        D = HD // n_heads
        inv = float(self.cfg["rope_theta"]) ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
        ang = pos.to(torch.float64)[..., None] * inv                      # (B, T, D/2)
        cos = torch.cat([ang.cos(), ang.cos()], -1).to(x.dtype)[:, :, None]
        sin = torch.cat([ang.sin(), ang.sin()], -1).to(x.dtype)[:, :, None]
        xh = x.view(B, T, n_heads, D)
        rot = torch.cat([-xh[..., D // 2:], xh[..., : D // 2]], -1)        # rotate_half
        return (xh * cos + rot * sin).reshape(B, T, HD)

    def _attention(self, q, k, v, mask, causal: bool):
        """Multi-head / grouped-query attention; ``mask`` (B, S) over all keys, 1 = attend."""
        torch = self.torch
        B, T, C = q.shape
        S = k.shape[1]
        D = C // self.H
        qh = q.view(B, T, self.H, D).transpose(1, 2)
        kh = k.view(B, S, self.KV, D).transpose(1, 2)
        vh = v.view(B, S, self.KV, D).transpose(1, 2)
        if self.KV != self.H:
            kh = kh.repeat_interleave(self.H // self.KV, dim=1)
            vh = vh.repeat_interleave(self.H // self.KV, dim=1)
        allowed = mask.bool()[:, None, None, :]
        if causal:
            allowed = allowed & (torch.arange(S)[None, :] <= (S - T) + torch.arange(T)[:, None])
        bias = torch.zeros(allowed.shape, dtype=q.dtype).masked_fill(~allowed, torch.finfo(q.dtype).min)
        out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias)
        return out.transpose(1, 2).reshape(B, T, C)

    def _self_attn(self, i: int, h, pos, mask, past, causal: bool, bias: bool):
        C = h.shape[-1]
        kv = self.KV * C // self.H
        q, k, v = self._linear(h, f"layers.{i}.attn.qkv", bias).split([C, kv, kv], dim=-1)
        if self.arch == "llama":
            q, k = self._rope(q, pos, self.H), self._rope(k, pos, self.KV)
        if past is not None:
            k = self.torch.cat([past[0], k], 1)
            v = self.torch.cat([past[1], v], 1)
        a = self._attention(q, k, v, mask, causal)
        return self._linear(a, f"layers.{i}.attn.out", bias), (k, v)

    def _decoder(self, ids, pos, mask, past):
        F = self.torch.nn.functional
        L = int(self.cfg["n_layers"])
        x = F.embedding(ids, self.w["tok_emb.weight"])
        if self.arch == "gpt2":
            x = x + F.embedding(pos, self.w["pos_emb.weight"])
        present = []
        for i in range(L):
            p = f"layers.{i}"
            if self.arch == "gpt2":
                a, kv = self._self_attn(i, self._ln(x, f"{p}.norm1"), pos, mask, past[i] if past else None, True, True)
                x = x + a
                h = self._linear(self._ln(x, f"{p}.norm2"), f"{p}.mlp.up")
                approx = "tanh" if self.cfg.get("activation", "gelu_tanh") == "gelu_tanh" else "none"
                x = x + self._linear(F.gelu(h, approximate=approx), f"{p}.mlp.down")
            else:
                a, kv = self._self_attn(i, self._rms(x, f"{p}.norm1"), pos, mask, past[i] if past else None, True, False)
                x = x + a
                gate, up = self._linear(self._rms(x, f"{p}.norm2"), f"{p}.mlp.gate_up", False).chunk(2, dim=-1)
                x = x + self._linear(F.silu(gate) * up, f"{p}.mlp.down", False)
            present.append(kv)
        if self.arch == "gpt2":
            logits = self._ln(x, "norm_f") @ self.w["tok_emb.weight"].t()
        else:
            x = self._rms(x, "norm_f")
            logits = (x @ self.w["tok_emb.weight"].t() if self.cfg.get("tie_embeddings")
                      else self._linear(x, "lm_head", False))
        return logits, present

    def prefill(self, ids: np.ndarray) -> tuple[np.ndarray, Any]:
        torch = self.torch
        ids_t = torch.from_numpy(np.asarray(ids, np.int64))
        B, T = ids_t.shape
        pos = torch.arange(T).expand(B, T)
        mask = torch.ones(B, T, dtype=torch.int64)
        with torch.inference_mode():
            logits, present = self._decoder(ids_t, pos, mask, None)
        return logits.numpy(), (present, T)

    def step(self, ids: np.ndarray, state: Any) -> tuple[np.ndarray, Any]:
        torch = self.torch
        past, S = state
        ids_t = torch.from_numpy(np.asarray(ids, np.int64))
        B, T = ids_t.shape
        pos = (S + torch.arange(T)).expand(B, T)
        mask = torch.ones(B, S + T, dtype=torch.int64)
        with torch.inference_mode():
            logits, present = self._decoder(ids_t, pos, mask, past)
        return logits.numpy(), (present, S + T)

    def forward_full(self, ids: np.ndarray, pos: np.ndarray, mask: np.ndarray, past=None):
        """One call with explicit positions, key mask and cache (the tests' way in)."""
        torch = self.torch
        with torch.inference_mode():
            logits, present = self._decoder(torch.from_numpy(ids), torch.from_numpy(pos), torch.from_numpy(mask), past)
        return logits.numpy(), present

    def encode(self, ids: np.ndarray, mask: np.ndarray | None = None, types: np.ndarray | None = None) -> np.ndarray:
        torch = self.torch
        F = torch.nn.functional
        ids_t = torch.from_numpy(np.asarray(ids, np.int64))
        B, T = ids_t.shape
        m = torch.ones(B, T, dtype=torch.int64) if mask is None else torch.from_numpy(np.asarray(mask, np.int64))
        tt = torch.zeros(B, T, dtype=torch.int64) if types is None else torch.from_numpy(np.asarray(types, np.int64))
        approx = "tanh" if self.cfg.get("activation") == "gelu_tanh" else "none"
        with torch.inference_mode():
            x = (F.embedding(ids_t, self.w["tok_emb.weight"]) + F.embedding(torch.arange(T).expand(B, T),
                 self.w["pos_emb.weight"]) + F.embedding(tt, self.w["type_emb.weight"]))
            x = self._ln(x, "emb_norm")
            for i in range(int(self.cfg["n_layers"])):
                p = f"layers.{i}"
                a, _ = self._self_attn(i, x, None, m, None, False, True)
                x = self._ln(x + a, f"{p}.norm1")
                h = F.gelu(self._linear(x, f"{p}.mlp.up"), approximate=approx)
                x = self._ln(x + self._linear(h, f"{p}.mlp.down"), f"{p}.norm2")
            mf = m.to(x.dtype)[..., None]
            e = (x * mf).sum(1) / mf.sum(1).clamp_min(1e-9)
            if self.cfg.get("normalize", True):
                e = F.normalize(e, p=2.0, dim=-1, eps=1e-12)
        return e.numpy()


# ------------------------------------------------------------------------------ transformers
class TransformersModel(TorchRef):
    """The Hugging Face checkpoint in ``folder``, run by ``transformers`` (float32, eager attention)."""

    def __init__(self, folder: str, config: Mapping[str, Any]) -> None:
        torch = _torch()
        try:
            import transformers
        except ImportError:
            raise MinitxError("--torch-from needs transformers: pip install 'minitx[reference]'") from None
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise MinitxError(f"{folder}: not a Hugging Face model folder (no config.json)")
        self.torch = torch
        self.cfg = dict(config)
        self.is_decoder = self.cfg.get("arch") != "bert"
        cls = transformers.AutoModelForCausalLM if self.is_decoder else transformers.AutoModel
        kw: dict[str, Any] = {"attn_implementation": "eager"}
        try:
            self.m = cls.from_pretrained(folder, dtype=torch.float32, **kw)
        except TypeError:
            self.m = cls.from_pretrained(folder, torch_dtype=torch.float32, **kw)
        self.m.eval()
        self.name = (f"torch {torch.__version__.split('+')[0]} + transformers {transformers.__version__} "
                     f"({type(self.m).__name__}, {os.path.basename(os.path.normpath(folder))})")

    def prefill(self, ids: np.ndarray) -> tuple[np.ndarray, Any]:
        torch = self.torch
        ids_t = torch.from_numpy(np.asarray(ids, np.int64))
        with torch.inference_mode():
            out = self.m(input_ids=ids_t, attention_mask=torch.ones_like(ids_t), use_cache=True)
        return out.logits.float().numpy(), (out.past_key_values, ids_t.shape[1])

    def step(self, ids: np.ndarray, state: Any) -> tuple[np.ndarray, Any]:
        torch = self.torch
        past, S = state
        ids_t = torch.from_numpy(np.asarray(ids, np.int64))
        B, T = ids_t.shape
        with torch.inference_mode():
            out = self.m(input_ids=ids_t, attention_mask=torch.ones(B, S + T, dtype=torch.int64),
                         position_ids=(S + torch.arange(T)).expand(B, T), past_key_values=past, use_cache=True)
        return out.logits.float().numpy(), (out.past_key_values, S + T)

    def encode(self, ids: np.ndarray, mask: np.ndarray | None = None, types: np.ndarray | None = None) -> np.ndarray:
        torch = self.torch
        ids_t = torch.from_numpy(np.asarray(ids, np.int64))
        m = torch.ones_like(ids_t) if mask is None else torch.from_numpy(np.asarray(mask, np.int64))
        tt = torch.zeros_like(ids_t) if types is None else torch.from_numpy(np.asarray(types, np.int64))
        with torch.inference_mode():
            x = self.m(input_ids=ids_t, attention_mask=m, token_type_ids=tt).last_hidden_state
            mf = m.to(x.dtype)[..., None]
            e = (x * mf).sum(1) / mf.sum(1).clamp_min(1e-9)
            if self.cfg.get("normalize", True):
                e = torch.nn.functional.normalize(e, p=2.0, dim=-1)
        return e.numpy()


def hf_folder(meta: Mapping[str, Any]) -> str | None:
    """The Hugging Face folder a converted model came from, when its meta records one that exists."""
    for key in ("hf_folder", "source_folder", "source_path", "hf_model"):
        v = meta.get(key)
        if isinstance(v, str) and os.path.isfile(os.path.join(v, "config.json")):
            return v
    return None


def build(model, torch_from: str | None = None) -> TorchRef:
    """The torch reference for a minitx Model: transformers on its source checkpoint when one is
    given or recorded, else the direct torch build from its config and weights."""
    folder = torch_from or hf_folder(getattr(model, "meta", {}) or {})
    if folder:
        return TransformersModel(folder, model.config)
    return TorchModel(model.config, model.params)


def set_threads(n: int) -> None:
    _torch().set_num_threads(max(1, int(n)))


def version() -> str:
    return _torch().__version__


__all__ = ["TorchRef", "TorchModel", "TransformersModel", "build", "hf_folder", "set_threads", "version"]
