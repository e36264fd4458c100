"""The attention plugin: softmax attention rewritten to linear attention (elu+1, FAVOR+)."""
from __future__ import annotations

import numpy as np
import pytest

from minitx import models, plugin
from minitx.feeds import build
from minitx.model import Model


@pytest.fixture(scope="module")
def gpt2():
    return Model.from_config(models.preset("gpt2", "tiny"), seed=1)


def _logits(model, ids):
    return model.executor().run(build(model.graph, [ids]))["logits"]


IDS = list(range(3, 30))


@pytest.mark.parametrize("spec", ["attention:map=elu", "attention:map=favor,features=16,seed=3"])
def test_every_attention_becomes_linear_attention_and_still_runs(gpt2, spec):
    new = plugin.optimize(gpt2, [spec], validate=False)
    ops = [n.op for n in new.graph.nodes]
    # a decoder's attention with its KV cache becomes the recurrent-state form
    assert "attention" not in ops and ops.count("linear_attention_state") == gpt2.config["n_layers"]
    out = _logits(new, IDS)
    assert np.isfinite(out).all() and not np.allclose(out, _logits(gpt2, IDS), atol=1e-3)


def test_favor_features_are_per_layer_and_redrawn_by_the_seed(gpt2):
    a = plugin.optimize(gpt2, ["attention:map=favor,features=16,seed=0"], validate=False)
    b = plugin.optimize(gpt2, ["attention:map=favor,features=16,seed=1"], validate=False)
    pa = sorted(k for k in a.params if k.endswith(".favor.proj"))
    assert len(pa) == gpt2.config["n_layers"]
    assert a.params[pa[0]].shape == (16, gpt2.config["d_model"] // gpt2.config["n_heads"])
    assert not np.allclose(a.params[pa[0]], a.params[pa[1]])          # each layer its own draw
    assert not np.allclose(a.params[pa[0]], b.params[pa[0]])          # another seed, other features


def test_a_decoder_with_linear_attention_trains(gpt2):
    """The recovery path: fit() through linear_attention's VJP lowers the held-out loss."""
    from minitx.training.evaluation import evaluate
    from minitx.training.loop import fit
    from minitx.training.settings import TrainSettings, new_state

    new = plugin.optimize(gpt2, ["attention:map=elu"], validate=False)
    ids = np.tile(np.arange(5, 21), 40)
    before = evaluate(new, ids, seq_len=16, count=4)["loss"]
    st = fit(new_state(new, TrainSettings(steps=12, batch_size=4, seq_len=16, lr=3e-3, warmup=2, eval_every=0,
                                          checkpoint_every=0)), ids)
    assert st.step == 12 and evaluate(st.model, ids, seq_len=16, count=4)["loss"] < before - 0.5


def _kv_linear(model):
    """The same model with causal linear attention over a KV cache (the prefix recomputed every
    step), built by hand: the reference the recurrent state must reproduce."""
    import copy
    ref = copy.deepcopy(model)
    for n in ref.graph.nodes:
        if n.op == "attention":
            n.op, n.attrs = "linear_attention", {**n.attrs, "feature": "elu"}
    return ref


def test_decoding_carries_a_constant_size_state_and_equals_linear_attention_over_the_prefix(gpt2):
    from minitx import generate as G

    new = plugin.optimize(gpt2, ["attention:map=elu"], validate=False)
    assert {n.op for n in new.graph.nodes} >= {"linear_attention_state"} and "linear_attention" not in {
        n.op for n in new.graph.nodes}
    ref = _kv_linear(gpt2)
    prompts = [[5, 9, 11, 3, 7, 2], [8, 4]]                  # left padding in row 2
    toks = G.generate(new, prompts, max_new_tokens=12)
    assert toks == G.generate(ref, prompts, max_new_tokens=12)
    # Step by step: logits equal the KV-cache reference's and a full recompute over the prefix.
    ids, mask = G.left_pad(prompts)
    lg, st = G.step(new, ids, G.empty_state(new, 2), mask)
    rl, rst = G.step(ref, ids, G.empty_state(ref, 2), mask)
    seq, sizes = [list(p) for p in prompts], set()
    for _ in range(8):
        np.testing.assert_allclose(lg[:, -1], rl[:, -1], rtol=1e-4, atol=1e-5)
        full_ids, full_mask = G.left_pad(seq)
        full = ref.executor().run(build(ref.graph, full_ids, mask=full_mask))["logits"]
        np.testing.assert_allclose(lg[:, -1], full[:, -1], rtol=1e-4, atol=1e-5)
        sizes.add(tuple(sorted((n, a.shape) for n, a in st.past.items())))
        nxt = lg[:, -1].argmax(-1)
        for r in range(2):
            seq[r].append(int(nxt[r]))
        lg, st = G.step(new, nxt[:, None], st)
        rl, rst = G.step(ref, nxt[:, None], rst)
    assert len(sizes) == 1 and rst.past["past.0.k"].shape[1] == ids.shape[1] + 8   # the KV cache grew
