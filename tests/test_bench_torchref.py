"""The torch builds ``minitx bench --vs torch`` compares against agree with the spec to 1e-4.

The direct torch build is written from the published architectures (nn.functional ops, torch's
own SDPA), not from minitx's graph; the transformers path runs a Hugging Face checkpoint itself.
"""
from __future__ import annotations

import numpy as np
import pytest

from minitx import generate as gen
from minitx import models, torchref
from minitx.model import Model

TOL = 1e-4


@pytest.fixture(autouse=True)
def torch():
    """Every test here compares with PyTorch: each skips alone when it is missing (not the file)."""
    return pytest.importorskip("torch")


def _model(arch: str, **over) -> Model:
    return Model.from_config({**models.preset(arch, "tiny"), **over}, seed=3)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_decoder_prefill_and_cached_steps_match_spec(arch):
    m = _model(arch)
    ref = torchref.TorchModel(m.config, m.params)
    ids = np.random.default_rng(0).integers(0, m.vocab_size, (2, 9))
    logits, st = gen.step(m, ids, gen.empty_state(m, 2))
    tl, ts = ref.prefill(ids)
    assert tl.shape == logits.shape
    np.testing.assert_allclose(tl, logits, atol=TOL, rtol=TOL)
    for _ in range(3):  # KV-cache steps
        nxt = logits[:, -1].argmax(-1)[:, None]
        logits, st = gen.step(m, nxt, st)
        tl, ts = ref.step(nxt, ts)
        np.testing.assert_allclose(tl, logits, atol=TOL, rtol=TOL)


def test_llama_untied_gqa_and_tied_variants():
    for over in ({"n_kv_heads": 1}, {"tie_embeddings": True, "n_kv_heads": 4}):
        m = _model("llama", **over)
        ids = np.random.default_rng(1).integers(0, m.vocab_size, (1, 6))
        np.testing.assert_allclose(torchref.TorchModel(m.config, m.params).prefill(ids)[0],
                                   gen.step(m, ids, gen.empty_state(m, 1))[0], atol=TOL, rtol=TOL)


def test_padded_batch_with_explicit_mask_and_positions():
    m = _model("gpt2")
    ref = torchref.TorchModel(m.config, m.params)
    ids, mask = gen.left_pad([[5, 6, 7, 8], [9, 10]])
    logits, _ = gen.step(m, ids, gen.empty_state(m, 2), mask)
    pos = np.cumsum(mask, axis=1) - mask
    tl, _ = ref.forward_full(ids, pos, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(tl[real], logits[real], atol=TOL, rtol=TOL)


def test_encoder_embeddings_match_spec_with_padding():
    m = _model("bert")
    ref = torchref.TorchModel(m.config, m.params)
    seqs = [[1, 2, 3, 4, 5], [6, 7]]
    emb = gen.embed(m, seqs)
    ids = np.zeros((2, 5), np.int64)
    mask = np.zeros((2, 5), np.int64)
    for r, s in enumerate(seqs):
        ids[r, :len(s)], mask[r, :len(s)] = s, 1
    np.testing.assert_allclose(ref.encode(ids, mask), emb, atol=TOL, rtol=TOL)


def test_a_wrong_weight_is_detected():
    """The comparison can fail: perturb one weight in the torch build only."""
    m = _model("gpt2")
    params = dict(m.params)
    params["layers.1.mlp.up.bias"] = params["layers.1.mlp.up.bias"] + 0.01
    ids = np.arange(1, 7)[None]
    diff = np.abs(torchref.TorchModel(m.config, params).prefill(ids)[0] - gen.step(m, ids, gen.empty_state(m, 1))[0])
    assert diff.max() > 10 * TOL


def test_rewritten_weights_are_refused():
    m = _model("gpt2")
    params = {**m.params, "layers.0.attn.qkv.weight": m.params["layers.0.attn.qkv.weight"].astype(np.int8)}
    from minitx.errors import MinitxError

    with pytest.raises(MinitxError, match="plain float weights"):
        torchref.TorchModel(m.config, params)


@pytest.mark.reference
def test_transformers_path_on_a_converted_checkpoint(tmp_path, torch):
    """A tiny GPT-2 saved by transformers, converted by minitx: transformers' logits = the spec's."""
    transformers = pytest.importorskip("transformers")
    convert = pytest.importorskip("minitx.convert")
    from minitx import modelfile

    cfg = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(cfg)
    hf.save_pretrained(tmp_path / "hf")
    convert.convert(str(tmp_path / "hf"), str(tmp_path / "m.npz"))
    m = modelfile.load(tmp_path / "m.npz")
    ref = torchref.build(m, str(tmp_path / "hf"))
    assert isinstance(ref, torchref.TransformersModel)
    ids = np.random.default_rng(2).integers(0, 97, (2, 7))
    logits, st = gen.step(m, ids, gen.empty_state(m, 2))
    tl, ts = ref.prefill(ids)
    np.testing.assert_allclose(tl, logits, atol=TOL, rtol=TOL)
    nxt = logits[:, -1].argmax(-1)[:, None]
    np.testing.assert_allclose(ref.step(nxt, ts)[0], gen.step(m, nxt, st)[0], atol=TOL, rtol=TOL)
