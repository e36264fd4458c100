"""Live comparison with transformers (CPU, float32): tiny random GPT-2, LLaMA and BERT models are
saved as HF folders, converted, and must reproduce transformers' logits (full forward and
step-by-step KV-cache decoding) and greedy generations token for token."""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

from minitx import metrics, modelfile
from minitx.convert import convert
from minitx.generate import empty_state, generate, step

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytestmark = pytest.mark.reference

_spec = importlib.util.spec_from_file_location(
    "make_fixtures", os.path.join(os.path.dirname(__file__), "..", "scripts", "make_fixtures.py"))
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)

REL = 1e-5   # max |minitx - transformers| / max |transformers|

DECODERS = {
    "gpt2-odd-heads": lambda f: ref.tiny_gpt2(f, heads=5, d=30, n_ctx=24),
    "gpt2-one-layer": lambda f: ref.tiny_gpt2(f, heads=3, d=12, layers=1, n_ctx=16, d_ff=20, vocab=29, seed=1),
    "llama-gqa3-untied": lambda f: ref.tiny_llama(f, heads=6, kv_heads=2, d=36),
    "llama-mqa-tied": lambda f: ref.tiny_llama(f, heads=4, kv_heads=1, d=32, tied=True, seed=2),
    "llama-mha-theta": lambda f: ref.tiny_llama(f, heads=2, kv_heads=2, d=16, d_ff=24, theta=500000.0,
                                                n_ctx=20, seed=3),
}


@pytest.fixture(scope="module", params=sorted(DECODERS))
def pair(request, tmp_path_factory):
    """(HF model, converted minitx model) for one tiny decoder configuration."""
    d = tmp_path_factory.mktemp(request.param)
    folder = DECODERS[request.param](str(d / "hf"))
    convert(folder, str(d / "m.npz"))
    return ref.load_hf(folder), modelfile.load(str(d / "m.npz"))


def _rel(r: np.ndarray, o: np.ndarray) -> float:
    return metrics.compare(r, o).max_rel


def test_full_forward_matches_transformers(pair):
    hf, m = pair
    rng = np.random.default_rng(0)
    n = m.n_ctx
    seqs = [rng.integers(1, m.vocab_size, k).tolist() for k in (n, n - 7, 2)]  # one fills the context
    x = ref.decoder_inputs(seqs)
    want = ref.decoder_logits(hf, x)
    state = empty_state(m, len(seqs))
    got, _ = step(m, x["input_ids"], state, x["attention_mask"])
    real = x["attention_mask"].astype(bool)
    assert _rel(want[real], got[real]) <= REL
    assert (want[real].argmax(-1) == got[real].argmax(-1)).all()


def test_kv_cache_decoding_matches_transformers(pair):
    """Prefill a left-padded batch, then feed one token at a time through the KV cache; every step's
    logits must equal transformers' full forward at that position."""
    hf, m = pair
    rng = np.random.default_rng(1)
    cont = 6
    prompts = [rng.integers(1, m.vocab_size, k).tolist() for k in (m.n_ctx - cont, 3)]
    tails = rng.integers(1, m.vocab_size, (2, cont))
    x = ref.decoder_inputs([p + t.tolist() for p, t in zip(prompts, tails)])
    want = ref.decoder_logits(hf, x)
    P = x["input_ids"].shape[1] - cont
    state = empty_state(m, 2)
    got, state = step(m, x["input_ids"][:, :P], state, x["attention_mask"][:, :P])
    real = x["attention_mask"][:, :P].astype(bool)
    assert _rel(want[:, :P][real], got[real]) <= REL
    for t in range(cont):
        got, state = step(m, x["input_ids"][:, P + t:P + t + 1], state)
        assert _rel(want[:, P + t], got[:, 0]) <= REL, f"decode step {t}"
    assert state.length == m.n_ctx


def test_greedy_generation_is_identical(pair):
    hf, m = pair
    rng = np.random.default_rng(2)
    eos = m.vocab_size - 1
    for prompts in ([rng.integers(1, eos, 5).tolist()],
                    [rng.integers(1, eos, 7).tolist(), rng.integers(1, eos, 2).tolist()],
                    [rng.integers(1, eos, m.n_ctx - 4).tolist()]):          # runs up to the context
        n_new = min(10, m.n_ctx - max(map(len, prompts)))
        x = ref.decoder_inputs(prompts)
        with torch.no_grad():
            out = hf.generate(input_ids=torch.from_numpy(x["input_ids"]),
                              attention_mask=torch.from_numpy(x["attention_mask"]), do_sample=False,
                              max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=0, eos_token_id=None)
        want = out[:, x["input_ids"].shape[1]:].numpy().tolist()
        got = generate(m, prompts, n_new)
        assert got == want


def test_bert_with_padding_and_token_types(tmp_path):
    folder = ref.tiny_bert(str(tmp_path / "hf"), types=3, heads=3, d=24)
    convert(folder, str(tmp_path / "b.npz"))
    m = modelfile.load(str(tmp_path / "b.npz"))
    assert m.config["normalize"] is False and m.config["max_seq_length"] is None
    rng = np.random.default_rng(3)
    seqs = [rng.integers(0, m.vocab_size, k).tolist() for k in (m.n_ctx, 9, 1)]
    types = [rng.integers(0, 3, len(s)).tolist() for s in seqs]
    x = ref.bert_inputs(seqs, types)
    want = ref.bert_hidden(ref.load_hf(folder), x)
    got = m.executor().run(x)
    real = x["attention_mask"].astype(bool)
    assert _rel(want[real], got["hidden"][real]) <= REL
    # Token types matter: zeroing them must change the result (the test can fail).
    x0 = {**x, "token_type_ids": np.zeros_like(x["token_type_ids"])}
    assert _rel(want[real], m.executor().run(x0)["hidden"][real]) > 1e-3
    # The pooled embedding is the masked mean of the reference hidden states.
    mask = x["attention_mask"][..., None]
    pooled = (want * mask).sum(1) / mask.sum(1)
    assert _rel(pooled, got["embedding"]) <= REL
